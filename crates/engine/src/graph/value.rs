//! The values that travel along links while a graph runs, one variant per [`PortType`].

use std::sync::Arc;

use candle_core::Tensor;

use super::PortType;
use crate::error::InputError;
use crate::flow::guidance::Guidance;
use crate::model::{Conditioning, FlowModel, LATENT_PROBE_SIDE};

/// A latent with the noise level it sits at (1 for pure noise, less for a source-image start).
#[derive(Debug, Clone)]
pub struct Latent {
    pub tensor: Tensor,
    pub sigma: f64,
}

/// Everything a sampler needs to ask for a guided velocity: the CFG node's output.
#[derive(Clone)]
pub struct Guider {
    pub model: Arc<dyn FlowModel>,
    pub positive: Arc<Conditioning>,
    pub negative: Option<Arc<Conditioning>>,
    pub guidance: Guidance,
    pub autoguide: Option<Autoguide>,
    pub classifier: Option<ClassifierGuide>,
}

/// Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
/// itself"): a weaker version of the same model — trained less, or smaller — makes the same
/// kinds of mistakes as the model, only more of them, so stepping away from its conditional
/// prediction steps away from those mistakes. Unlike CFG it does not push the picture away from
/// what the prompt allows, so it sharpens without burning in.
#[derive(Clone)]
pub struct Autoguide {
    /// The weaker model; it must share the model's latent space.
    pub model: Arc<dyn FlowModel>,
    /// The positive prompt as the weaker model encodes it.
    pub positive: Arc<Conditioning>,
    /// `w` in `v + (w − 1)·(v_c − v_weak)`: 1 is off.
    pub scale: f64,
}

impl Autoguide {
    /// Refuses a guide whose latents differ from the model's: it cannot be a weaker version of
    /// the same model.
    pub fn check_compatible(model: &dyn FlowModel, weak: &dyn FlowModel) -> anyhow::Result<()> {
        let (ours, theirs) = (
            model.latent_shape(LATENT_PROBE_SIDE, LATENT_PROBE_SIDE)?,
            weak.latent_shape(LATENT_PROBE_SIDE, LATENT_PROBE_SIDE)?,
        );
        if ours != theirs {
            return Err(InputError(format!(
                "the guide model ({}) has latents of shape {theirs:?} where the model ({}) has \
                 {ours:?}: autoguidance needs a weaker version of the same model (autoguidance \
                 scale 1 turns it off)",
                weak.describe(),
                model.describe()
            ))
            .into());
        }
        Ok(())
    }
}

/// Classifier guidance (Dhariwal & Nichol 2021): the model's own caption classifier says how
/// likely each noisy picture shows what its prompt states, and the gradient of that
/// log-probability is added to the flow's score, `∇ log p(x_σ) + w·∇ log p(prompt | x_σ)`.
/// On the flow path `x = σ·ε + (1 − σ)·x0` the score is `−E[ε | x]/σ`, so the velocity moves
/// by `−w·σ/(1 − σ)·∇ log p(prompt | x_σ)`. Unlike CFG it needs no second pass of the velocity
/// network, only the classifier's forward and backward pass.
#[derive(Clone)]
pub struct ClassifierGuide {
    /// The prompt of each row of the latents.
    pub prompts: Vec<String>,
    /// `w` above: 0 is off.
    pub scale: f64,
}

impl ClassifierGuide {
    /// Near σ = 1 the picture says almost nothing of the prompt, yet the factor σ/(1 − σ)
    /// grows without bound: it is capped as if 1 − σ were never below this.
    pub const SMALLEST_DATA_SHARE: f64 = 0.1;

    /// Refuses guidance by a model that has no caption classifier.
    pub fn check_available(&self, model: &dyn FlowModel) -> anyhow::Result<()> {
        if self.scale != 0.0 && !model.has_prompt_classifier() {
            return Err(InputError(format!(
                "classifier guidance at scale {} needs a caption classifier beside the model, \
                 and {} has none (train one with `flowline train-classifier`, or set scale 0)",
                self.scale,
                model.describe()
            ))
            .into());
        }
        Ok(())
    }

    /// The velocity's change at `x`, `sigma` for `model`.
    fn velocity_change(
        &self,
        model: &dyn FlowModel,
        x: &Tensor,
        sigma: f64,
    ) -> anyhow::Result<Tensor> {
        let gradient = model.prompt_gradient(x, sigma, &self.prompts)?;
        let factor = -self.scale * sigma / (1.0 - sigma).max(Self::SMALLEST_DATA_SHARE);
        Ok((gradient * factor)?)
    }
}

impl Guider {
    /// The guided velocity at `x`, `sigma`; the unconditional pass runs only when needed.
    pub fn velocity(&self, x: &Tensor, sigma: f64) -> anyhow::Result<Tensor> {
        let (cond, guided) = match &self.negative {
            Some(negative) if self.guidance.needs_unconditional(sigma) => {
                let both = self
                    .model
                    .velocities(x, sigma, &[&self.positive, negative])?;
                let guided = self.guidance.combine(x, sigma, &both[0], &both[1])?;
                (both[0].clone(), guided)
            }
            _ => {
                let cond = self.model.velocity(x, sigma, &self.positive)?;
                (cond.clone(), cond)
            }
        };
        let guided = match &self.autoguide {
            Some(weak) if weak.scale != 1.0 && self.guidance.guides_at(sigma) => {
                let weak_cond = weak.model.velocity(x, sigma, &weak.positive)?;
                (guided + ((cond - weak_cond)? * (weak.scale - 1.0))?)?
            }
            _ => guided,
        };
        match &self.classifier {
            Some(classifier) if classifier.scale != 0.0 && self.guidance.guides_at(sigma) => {
                Ok((guided + classifier.velocity_change(self.model.as_ref(), x, sigma)?)?)
            }
            _ => Ok(guided),
        }
    }
}

/// An RGB image as a `[3, height, width]` f32 tensor with values in [0, 1], on the CPU.
#[derive(Debug, Clone)]
pub struct Image(pub Tensor);

/// A value on a link.
#[derive(Clone)]
pub enum Value {
    Model(Arc<dyn FlowModel>),
    Conditioning(Arc<Conditioning>),
    Guider(Arc<Guider>),
    Latent(Latent),
    Image(Image),
}

impl Value {
    pub fn port_type(&self) -> PortType {
        match self {
            Value::Model(_) => PortType::Model,
            Value::Conditioning(_) => PortType::Conditioning,
            Value::Guider(_) => PortType::Guider,
            Value::Latent(_) => PortType::Latent,
            Value::Image(_) => PortType::Image,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::Device;

    use super::*;
    use crate::model::LatentPreview;

    /// Predicts v = x·k, where k is the conditioning's single value; counts its calls.
    struct CountingModel {
        calls: AtomicUsize,
        preview: LatentPreview,
    }

    impl FlowModel for CountingModel {
        fn describe(&self) -> String {
            "counting".into()
        }
        fn device(&self) -> &Device {
            &Device::Cpu
        }
        fn latent_shape(&self, _: usize, _: usize) -> anyhow::Result<Vec<usize>> {
            Ok(vec![1, 1, 1, 2])
        }
        fn image_tokens(&self, _: &[usize]) -> usize {
            2
        }
        fn encode_prompt(&self, _: &str) -> anyhow::Result<Conditioning> {
            unreachable!("the test builds conditionings itself")
        }
        fn velocity(&self, x: &Tensor, _: f64, cond: &Conditioning) -> anyhow::Result<Tensor> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(x.broadcast_mul(&cond.context)?)
        }
        fn decode(&self, latent: &Tensor) -> anyhow::Result<Tensor> {
            Ok(latent.clone())
        }
        fn encode_image(&self, image: &Tensor) -> anyhow::Result<Tensor> {
            Ok(image.clone())
        }
        fn preview(&self) -> &LatentPreview {
            &self.preview
        }
        fn has_prompt_classifier(&self) -> bool {
            true
        }
        /// The latent itself, as if the classifier's log-probability were ‖x‖²/2.
        fn prompt_gradient(&self, x: &Tensor, _: f64, _: &[String]) -> anyhow::Result<Tensor> {
            Ok(x.clone())
        }
    }

    fn conditioning(k: f32) -> Arc<Conditioning> {
        Arc::new(Conditioning {
            context: Tensor::new(&[k], &Device::Cpu).unwrap(),
            pooled: None,
            prompt: String::new(),
            warnings: vec![],
            distilled_guidance: None,
        })
    }

    fn counting_model() -> Arc<CountingModel> {
        Arc::new(CountingModel {
            calls: AtomicUsize::new(0),
            preview: LatentPreview {
                matrix: [vec![1.0], vec![1.0], vec![1.0]],
                bias: [0.0; 3],
            },
        })
    }

    fn guider(scale: f64, interval: (f64, f64)) -> (Guider, Arc<CountingModel>) {
        let model = counting_model();
        let guider = Guider {
            model: model.clone(),
            positive: conditioning(2.0),
            negative: Some(conditioning(1.0)),
            guidance: Guidance {
                scale,
                interval,
                ..Guidance::default()
            },
            autoguide: None,
            classifier: None,
        };
        (guider, model)
    }

    #[test]
    fn scale_one_runs_the_model_once_per_evaluation() {
        let x = Tensor::new(&[[[[1f32, 3.0]]]], &Device::Cpu).unwrap();
        let (unguided, model) = guider(1.0, (0.0, 1.0));
        let v = unguided.velocity(&x, 0.5).unwrap();
        assert_eq!(model.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [2.0, 6.0]
        );

        let (guided, model) = guider(3.0, (0.0, 1.0));
        let v = guided.velocity(&x, 0.5).unwrap();
        assert_eq!(model.calls.load(Ordering::SeqCst), 2);
        // v_u + 3·(v_c − v_u) with v_c = 2x and v_u = x gives 4x.
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [4.0, 12.0]
        );
    }

    #[test]
    fn outside_the_interval_only_the_positive_prompt_runs() {
        let x = Tensor::new(&[[[[1f32, 3.0]]]], &Device::Cpu).unwrap();
        let (guided, model) = guider(3.0, (0.2, 0.6));
        let v = guided.velocity(&x, 0.9).unwrap();
        assert_eq!(model.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [2.0, 6.0]
        );
    }

    /// [`guider`] autoguided at `autoguide_scale` by a counting model whose positive
    /// conditioning is 1.5, and that model.
    fn autoguided(
        scale: f64,
        interval: (f64, f64),
        autoguide_scale: f64,
    ) -> (Guider, Arc<CountingModel>) {
        let (mut guided, _) = guider(scale, interval);
        let weak = counting_model();
        guided.autoguide = Some(Autoguide {
            model: weak.clone(),
            positive: conditioning(1.5),
            scale: autoguide_scale,
        });
        (guided, weak)
    }

    #[test]
    fn autoguidance_steps_away_from_the_weak_models_conditional_prediction() {
        let x = Tensor::new(&[[[[1f32, 3.0]]]], &Device::Cpu).unwrap();
        for (scale, weak_calls, expected) in [
            // CFG 3 gives 4x; 3 − 1 times (v_c − v_weak) = 2·(2x − 1.5x) adds x.
            (3.0, 1, [5.0, 15.0]),
            (1.0, 0, [4.0, 12.0]),
        ] {
            let (guided, weak) = autoguided(3.0, (0.0, 1.0), scale);
            let v = guided.velocity(&x, 0.5).unwrap();
            assert_eq!(weak.calls.load(Ordering::SeqCst), weak_calls);
            assert_eq!(v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
        }

        // Like CFG, autoguidance applies only inside the guidance interval.
        let (guided, weak) = autoguided(3.0, (0.2, 0.6), 3.0);
        let v = guided.velocity(&x, 0.9).unwrap();
        assert_eq!(weak.calls.load(Ordering::SeqCst), 0);
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [2.0, 6.0]
        );
    }

    #[test]
    fn classifier_guidance_moves_the_velocity_against_the_gradient_by_the_noise_share() {
        let x = Tensor::new(&[[[[1f32, 3.0]]]], &Device::Cpu).unwrap();
        let (mut guided, _) = guider(1.0, (0.2, 0.96));
        guided.classifier = Some(ClassifierGuide {
            prompts: vec!["a red star".into()],
            scale: 2.0,
        });
        // v = 2x; the gradient is x; the change is −2·σ/max(1 − σ, 0.1)·x.
        for (sigma, expected) in [
            (0.5, [0.0, 0.0]),
            (0.8, [-6.0, -18.0]),
            (0.95, [-17.0, -51.0]),
            (0.1, [2.0, 6.0]),
            (0.99, [2.0, 6.0]),
        ] {
            let v = guided.velocity(&x, sigma).unwrap();
            let got: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            for (g, e) in got.iter().zip(expected) {
                assert!(
                    (g - e).abs() < 1e-4,
                    "σ {sigma}: {got:?}, expected {expected:?}"
                );
            }
        }
    }
}
