//! AdamW whose moments and step count go into the checkpoint.
//!
//! candle's `AdamW` keeps its moments private, so a resumed run used to start them from zero
//! (and warm its learning rate up again): it went on close to, but not as, the run would have
//! without the stop. This one makes the same update as candle's and can hand its state over
//! and take it back, so a run resumed from a checkpoint continues exactly where it stopped.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use candle_nn::ParamsAdamW;

/// Prefixes of the first and second moments' names in the saved state.
const FIRST_MOMENT: &str = "m.";
const SECOND_MOMENT: &str = "v.";

struct Moments {
    name: String,
    var: Var,
    first: Tensor,
    second: Tensor,
}

/// AdamW (Loshchilov & Hutter) over named variables.
pub struct Adam {
    moments: Vec<Moments>,
    /// Updates made so far, for the bias correction.
    steps: usize,
    params: ParamsAdamW,
}

impl Adam {
    /// An optimizer for the floating-point `vars`, its moments at zero.
    pub fn new(vars: Vec<(String, Var)>, params: ParamsAdamW) -> candle_core::Result<Self> {
        let moments = vars
            .into_iter()
            .filter(|(_, var)| var.dtype().is_float())
            .map(|(name, var)| {
                let zeros = var.zeros_like()?;
                Ok(Moments {
                    name,
                    first: zeros.clone(),
                    second: zeros,
                    var,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Adam {
            moments,
            steps: 0,
            params,
        })
    }

    pub fn set_learning_rate(&mut self, rate: f64) {
        self.params.lr = rate;
    }

    /// Updates made so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Backpropagates `loss` and updates every variable as candle's `AdamW` does.
    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let gradients = loss.backward()?;
        self.steps += 1;
        let ParamsAdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let scale_first = 1.0 / (1.0 - beta1.powi(self.steps as i32));
        let scale_second = 1.0 / (1.0 - beta2.powi(self.steps as i32));
        for moments in &mut self.moments {
            let Some(gradient) = gradients.get(&moments.var) else {
                continue;
            };
            let first = ((&moments.first * beta1)? + (gradient * (1.0 - beta1))?)?;
            let second = ((&moments.second * beta2)? + (gradient.sqr()? * (1.0 - beta2))?)?;
            let step = ((&first * scale_first)? / ((&second * scale_second)?.sqrt()? + eps)?)?;
            let decayed = (moments.var.as_tensor() * (1.0 - lr * weight_decay))?;
            moments.var.set(&(decayed - (step * lr)?)?)?;
            // Detached: a moment computed from a gradient would otherwise keep the step's whole
            // graph alive, and each step's the one before it.
            moments.first = first.detach();
            moments.second = second.detach();
        }
        Ok(())
    }

    /// The moments by name, to save beside the weights; with [`Adam::steps`] they are the
    /// whole state.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.moments
            .iter()
            .flat_map(|m| {
                [
                    (format!("{FIRST_MOMENT}{}", m.name), m.first.clone()),
                    (format!("{SECOND_MOMENT}{}", m.name), m.second.clone()),
                ]
            })
            .collect()
    }

    /// Takes back a saved state: `steps` and the moments `state` holds. A variable the state
    /// has no moments for (a part added since) keeps its moments at zero.
    pub fn restore(
        &mut self,
        steps: usize,
        state: &HashMap<String, Tensor>,
    ) -> candle_core::Result<()> {
        self.steps = steps;
        for moments in &mut self.moments {
            let saved = |prefix: &str| state.get(&format!("{prefix}{}", moments.name));
            if let (Some(first), Some(second)) = (saved(FIRST_MOMENT), saved(SECOND_MOMENT)) {
                moments.first = first.to_device(moments.var.device())?;
                moments.second = second.to_device(moments.var.device())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{AdamW, Optimizer};

    fn loss(var: &Var) -> Tensor {
        var.as_tensor().sqr().unwrap().sum_all().unwrap()
    }

    #[test]
    fn it_updates_as_candles_adamw_does() {
        let start = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
        let (ours, theirs) = (
            Var::from_tensor(&start).unwrap(),
            Var::from_tensor(&start).unwrap(),
        );
        let params = ParamsAdamW {
            lr: 0.1,
            weight_decay: 0.01,
            ..ParamsAdamW::default()
        };
        let mut adam = Adam::new(vec![("w".into(), ours.clone())], params.clone()).unwrap();
        let mut reference = AdamW::new(vec![theirs.clone()], params).unwrap();
        for _ in 0..5 {
            adam.backward_step(&loss(&ours)).unwrap();
            reference.backward_step(&loss(&theirs)).unwrap();
        }
        let difference = (ours.as_tensor() - theirs.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(difference < 1e-6, "{difference}");
    }

    #[test]
    fn a_restored_state_goes_on_as_if_never_stopped() {
        let start = Tensor::new(&[0.3f32, -1.5, 2.0], &Device::Cpu).unwrap();
        let run = |stop_after: Option<usize>| {
            let var = Var::from_tensor(&start).unwrap();
            let mut adam =
                Adam::new(vec![("w".into(), var.clone())], ParamsAdamW::default()).unwrap();
            for step in 0..6 {
                if Some(step) == stop_after {
                    let (steps, state) = (adam.steps(), adam.state());
                    adam =
                        Adam::new(vec![("w".into(), var.clone())], ParamsAdamW::default()).unwrap();
                    adam.restore(steps, &state).unwrap();
                }
                adam.backward_step(&loss(&var)).unwrap();
            }
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(None), run(Some(3)));
    }
}
