//! The sampling loop: integrates a velocity field down a σ ladder and reports every step.
//!
//! Samplers are written for the flow convention of [`crate::flow`]. Each step produces a
//! [`StepRecord`] for the observer (the executor streams it to the UI); the observer may stop
//! the run, so a cancel takes effect within one step. Non-finite or exploding latents stop the
//! run with [`SampleError::Diverged`], naming the step and σ.

use std::ops::ControlFlow;

use candle_core::Tensor;

use super::noise::gaussian;
use super::{clean_estimate, l2_norm, sum, widened};

/// A latent whose root-mean-square exceeds this is taken to have exploded. Flow latents live
/// near unit scale (noise has RMS 1), so healthy runs stay orders of magnitude below it.
pub const DIVERGENCE_RMS_LIMIT: f64 = 1e3;

/// Numerical integrators for the flow ODE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// First order; one model evaluation per step.
    Euler,
    /// Second order (trapezoidal predictor–corrector); two evaluations per step, the last
    /// step (to σ = 0, where the model is not evaluated) is plain Euler.
    Heun,
    /// DPM-Solver++(2M) written for flows (α = 1 − σ): second-order multistep on x̂0 with one
    /// evaluation per step; first-order on the first step and exact x̂0 on the last.
    Dpmpp2m,
    /// Euler ancestral for flows: each step goes by Euler below σ_next and then adds fresh
    /// noise back up to σ_next (see [`FreshNoise`]); one evaluation per step. What the model got
    /// wrong in earlier steps is partly replaced by noise that later steps decide afresh, so a
    /// model whose early steps leave stray fragments can correct them (as EDM's stochastic
    /// sampler does), at the price of a less straight path.
    EulerAncestral,
}

impl SamplerKind {
    /// Every sampler, in the order a user sees them.
    pub const ALL: [SamplerKind; 4] = [
        SamplerKind::Euler,
        SamplerKind::Heun,
        SamplerKind::Dpmpp2m,
        SamplerKind::EulerAncestral,
    ];

    /// The names used in workflow files and on the command line, in the order of [`Self::ALL`].
    pub const NAMES: [&'static str; 4] = ["euler", "heun", "dpmpp_2m", "euler_ancestral"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn from_name(name: &str) -> Option<Self> {
        let index = Self::NAMES.iter().position(|n| *n == name)?;
        Some(Self::ALL[index])
    }
}

/// The fresh noise an ancestral sampler adds at every step; the other samplers use none.
#[derive(Debug, Clone, PartialEq)]
pub struct FreshNoise {
    /// How much of each step is taken back and redrawn: the step goes by Euler down to
    /// σ_down = σ_next·(1 + η·(σ_next/σ − 1)) and noise brings it back to σ_next. 0 is the
    /// Euler step; 1 (ComfyUI's default) goes down to σ_next²/σ.
    pub eta: f64,
    /// One seed per image of the batch, so an image's noise does not depend on the batch it
    /// is generated in; each step draws from its own mix of the seed and the step's index.
    pub seeds: Vec<u64>,
}

impl FreshNoise {
    /// No fresh noise (for the deterministic samplers).
    pub fn none() -> Self {
        FreshNoise {
            eta: 0.0,
            seeds: Vec::new(),
        }
    }

    /// The seed of the noise added at step `step` to the image seeded `seed`: the seed XOR an
    /// odd multiple of the step, through SplitMix64's (bijective) finaliser, so the steps of
    /// one image never share noise, and neighbouring seeds give unrelated noise.
    fn step_seed(seed: u64, step: usize) -> u64 {
        let mut z = seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Standard-normal noise shaped like `x` (`[B, …]`, one seed per image) for step `step`.
    fn draw(&self, x: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        if self.seeds.len() != dims[0] {
            candle_core::bail!(
                "{} noise seeds for a batch of {} images",
                self.seeds.len(),
                dims[0]
            );
        }
        let images: Vec<Tensor> = self
            .seeds
            .iter()
            .map(|&seed| gaussian(Self::step_seed(seed, step), &dims[1..], x.device()))
            .collect::<candle_core::Result<_>>()?;
        Tensor::stack(&images, 0)?.to_dtype(x.dtype())
    }
}

/// One Euler ancestral step: Euler from `sigma` down to σ_down, then scaled and noised so the
/// result is a point of the path at `sigma_next` (`x_σ = σ·ε + (1 − σ)·x0` with fresh ε).
fn euler_ancestral_step(
    x: &Tensor,
    velocity: &Tensor,
    sigma: f64,
    sigma_next: f64,
    noise: &FreshNoise,
    step: usize,
) -> candle_core::Result<Tensor> {
    if sigma_next <= 0.0 || noise.eta <= 0.0 {
        return x + velocity.affine(sigma_next - sigma, 0.0)?;
    }
    let sigma_down = sigma_next * (1.0 + noise.eta * (sigma_next / sigma - 1.0));
    let down = (x + velocity.affine(sigma_down - sigma, 0.0)?)?;
    // x_down = σ_down·ε + (1 − σ_down)·x0: scaling by a keeps (1 − σ_next)·x0 and leaves
    // a·σ_down of noise, topped up to σ_next by independent noise.
    let a = (1.0 - sigma_next) / (1.0 - sigma_down);
    let fresh = (sigma_next * sigma_next - (a * sigma_down).powi(2))
        .max(0.0)
        .sqrt();
    down.affine(a, 0.0)? + noise.draw(x, step)?.affine(fresh, 0.0)?
}

/// Anything that predicts a velocity at a point and noise level.
pub trait VelocityField {
    fn velocity(&mut self, x: &Tensor, sigma: f64) -> anyhow::Result<Tensor>;
}

impl<F: FnMut(&Tensor, f64) -> anyhow::Result<Tensor>> VelocityField for F {
    fn velocity(&mut self, x: &Tensor, sigma: f64) -> anyhow::Result<Tensor> {
        self(x, sigma)
    }
}

/// What the sampler knows after evaluating the model at step `index`.
#[derive(Debug, Clone)]
pub struct StepRecord {
    /// 0-based step index; the run has `steps` of them.
    pub index: usize,
    pub steps: usize,
    /// Noise level of `x` (σ_index) and the level this step moves to.
    pub sigma: f64,
    pub sigma_next: f64,
    /// The current canvas x_σ.
    pub x: Tensor,
    /// The predicted final image x̂0 = x − σ·v.
    pub clean: Tensor,
    /// Euclidean norm of the velocity the model predicted.
    pub velocity_norm: f64,
}

/// The end of a completed run.
#[derive(Debug, Clone)]
pub struct SampleOutput {
    pub latent: Tensor,
    pub sigmas: Vec<f64>,
    /// ‖x_end − x_start‖ / Σ‖x_{k+1} − x_k‖: 1 for a perfectly straight path.
    pub straightness: f64,
}

/// Why a run did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("diverged at step {step} of {steps} (σ={sigma:.4}): {reason}")]
    Diverged {
        /// 1-based, as a person counts steps.
        step: usize,
        steps: usize,
        sigma: f64,
        reason: String,
    },
    #[error("cancelled after step {completed} of {steps}")]
    Cancelled { completed: usize, steps: usize },
    #[error("model failed at step {step} (σ={sigma:.4}): {source:#}")]
    Model {
        step: usize,
        sigma: f64,
        source: anyhow::Error,
    },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Integrates `field` from `start` (at σ = `sigmas[0]`) to σ = `sigmas.last()` (normally 0).
///
/// `noise` is what the ancestral sampler adds at every step (the others use none).
/// `observer` sees every step before it is taken and may return `Break` to cancel.
pub fn sample(
    kind: SamplerKind,
    field: &mut dyn VelocityField,
    start: &Tensor,
    sigmas: &[f64],
    noise: &FreshNoise,
    observer: &mut dyn FnMut(&StepRecord) -> ControlFlow<()>,
) -> Result<SampleOutput, SampleError> {
    let steps = sigmas.len().saturating_sub(1);
    let mut x = start.clone();
    let mut path_length = 0.0;
    let mut history: Option<(Tensor, f64)> = None;
    for index in 0..steps {
        let (sigma, sigma_next) = (sigmas[index], sigmas[index + 1]);
        let mut evaluate = |x: &Tensor, at: f64| -> Result<Tensor, SampleError> {
            let v = field.velocity(x, at).map_err(|source| SampleError::Model {
                step: index + 1,
                sigma: at,
                source,
            })?;
            check_finite(&v, "the predicted velocity", index + 1, steps, at)?;
            Ok(v)
        };
        let velocity = evaluate(&x, sigma)?;
        let clean = clean_estimate(&x, &velocity, sigma)?;
        let record = StepRecord {
            index,
            steps,
            sigma,
            sigma_next,
            x: x.clone(),
            clean: clean.clone(),
            velocity_norm: l2_norm(&velocity)?,
        };
        if observer(&record).is_break() {
            return Err(SampleError::Cancelled {
                completed: index,
                steps,
            });
        }
        let dt = sigma_next - sigma;
        let next = match kind {
            SamplerKind::Euler => (&x + velocity.affine(dt, 0.0)?)?,
            SamplerKind::Heun if sigma_next > 0.0 => {
                let predicted = (&x + velocity.affine(dt, 0.0)?)?;
                let corrected = evaluate(&predicted, sigma_next)?;
                (&x + (velocity + corrected)?.affine(dt / 2.0, 0.0)?)?
            }
            SamplerKind::Heun => (&x + velocity.affine(dt, 0.0)?)?,
            SamplerKind::Dpmpp2m => dpmpp_2m_step(&x, &clean, sigma, sigma_next, &mut history)?,
            SamplerKind::EulerAncestral => {
                euler_ancestral_step(&x, &velocity, sigma, sigma_next, noise, index)?
            }
        };
        check_finite(&next, "the latent", index + 1, steps, sigma_next)?;
        let rms = l2_norm(&next)? / (next.elem_count() as f64).sqrt();
        if rms > DIVERGENCE_RMS_LIMIT {
            return Err(SampleError::Diverged {
                step: index + 1,
                steps,
                sigma: sigma_next,
                reason: format!(
                    "the latent exploded (RMS {rms:.3e}, limit {DIVERGENCE_RMS_LIMIT:.0e}); \
                     try fewer CFG, a CFG variant, or more steps"
                ),
            });
        }
        path_length += l2_norm(&(&next - &x)?)?;
        x = next;
    }
    let chord = l2_norm(&(&x - start)?)?;
    let straightness = if path_length > 0.0 {
        chord / path_length
    } else {
        1.0
    };
    Ok(SampleOutput {
        latent: x,
        sigmas: sigmas.to_vec(),
        straightness,
    })
}

fn check_finite(
    t: &Tensor,
    what: &str,
    step: usize,
    steps: usize,
    sigma: f64,
) -> Result<(), SampleError> {
    if sum(&widened(t)?.abs()?)?.is_finite() {
        return Ok(());
    }
    Err(SampleError::Diverged {
        step,
        steps,
        sigma,
        reason: format!("{what} contains NaN or infinite values"),
    })
}

/// log-SNR λ = ln(α/σ) with α = 1 − σ.
fn log_snr(sigma: f64) -> f64 {
    ((1.0 - sigma) / sigma).ln()
}

/// One DPM-Solver++(2M) step from `sigma` to `sigma_next`; `history` carries the previous
/// clean estimate and step size in λ.
fn dpmpp_2m_step(
    x: &Tensor,
    clean: &Tensor,
    sigma: f64,
    sigma_next: f64,
    history: &mut Option<(Tensor, f64)>,
) -> candle_core::Result<Tensor> {
    if sigma_next <= 0.0 {
        return Ok(clean.clone());
    }
    let h = log_snr(sigma_next) - log_snr(sigma);
    let estimate = match history.take() {
        Some((previous, h_previous)) if h.is_finite() && h_previous.is_finite() => {
            let r = h_previous / h;
            (clean.affine(1.0 + 1.0 / (2.0 * r), 0.0)? - previous.affine(1.0 / (2.0 * r), 0.0)?)?
        }
        _ => clean.clone(),
    };
    *history = Some((clean.clone(), h));
    // x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·D; at σ_s = 1 (h = ∞) this is the Euler step.
    let decay = if h.is_finite() { -(-h).exp_m1() } else { 1.0 };
    x.affine(sigma_next / sigma, 0.0)? + estimate.affine((1.0 - sigma_next) * decay, 0.0)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::noise::gaussian;
    use crate::flow::schedule::Scheduler;
    use candle_core::{DType, Device};

    const MEAN: f64 = 0.7;
    const STD: f64 = 0.5;

    /// The exact flow-matching velocity for data x0 ~ N(MEAN, STD²) per dimension:
    /// v = E[ε − x0 | x_σ = x] = (σ − a·s²)(x − a·μ)/(σ² + a²s²) − μ with a = 1 − σ.
    fn gaussian_field(x: &Tensor, sigma: f64) -> anyhow::Result<Tensor> {
        let a = 1.0 - sigma;
        let variance = sigma * sigma + a * a * STD * STD;
        let gain = (sigma - a * STD * STD) / variance;
        Ok(x.affine(gain, -gain * a * MEAN - MEAN)?)
    }

    /// Along the exact flow each start z lands on MEAN + STD·z.
    fn exact_endpoint(start: &Tensor) -> Tensor {
        start.affine(STD, MEAN).unwrap()
    }

    fn start(n: usize) -> Tensor {
        gaussian(3, n, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    }

    fn endpoint_error(kind: SamplerKind, steps: usize) -> f64 {
        let x = start(256);
        let sigmas = Scheduler::Simple.sigmas(steps, 1.0);
        let out = unobserved(kind, &mut gaussian_field, &x, &sigmas).unwrap();
        let err = (out.latent - exact_endpoint(&x)).unwrap();
        l2_norm(&err).unwrap() / 16.0
    }

    fn observed_order(kind: SamplerKind) -> f64 {
        let coarse = endpoint_error(kind, 128);
        let fine = endpoint_error(kind, 256);
        (coarse / fine).log2()
    }

    #[test]
    fn euler_converges_at_first_order() {
        let order = observed_order(SamplerKind::Euler);
        assert!((0.95..1.05).contains(&order), "order {order}");
    }

    #[test]
    fn heun_converges_at_second_order() {
        let order = observed_order(SamplerKind::Heun);
        assert!((1.95..2.05).contains(&order), "order {order}");
    }

    #[test]
    fn dpmpp_2m_converges_at_second_order() {
        // On a uniform σ ladder the last steps before σ = 0 keep a λ-size of ln 2 however
        // many steps there are, which costs a logarithmic factor: error ~ ln(N)/N², whose
        // observed order from 128 to 256 steps is 2 − log2(ln 256 / ln 128) ≈ 1.81.
        let order = observed_order(SamplerKind::Dpmpp2m);
        assert!((1.75..2.05).contains(&order), "order {order}");
    }

    #[test]
    fn errors_shrink_as_steps_double() {
        // The ancestral sampler draws a different endpoint for each noise, not the ODE's.
        let deterministic = SamplerKind::ALL
            .into_iter()
            .filter(|&kind| kind != SamplerKind::EulerAncestral);
        for kind in deterministic {
            let errors: Vec<f64> = [4, 8, 16, 32].map(|n| endpoint_error(kind, n)).to_vec();
            assert!(
                errors.windows(2).all(|w| w[1] < w[0]),
                "{kind:?}: {errors:?}"
            );
        }
    }

    /// A run of the deterministic `kind` on `field` from `x` down `sigmas` that nothing
    /// observes.
    fn unobserved(
        kind: SamplerKind,
        field: &mut dyn VelocityField,
        x: &Tensor,
        sigmas: &[f64],
    ) -> Result<SampleOutput, SampleError> {
        let noise = FreshNoise::none();
        sample(kind, field, x, sigmas, &noise, &mut |_| {
            ControlFlow::Continue(())
        })
    }

    /// The run of `kind` with `noise` on the exact Gaussian field from `x` down `sigmas`.
    fn run_to_end(
        kind: SamplerKind,
        x: &Tensor,
        sigmas: &[f64],
        noise: &FreshNoise,
    ) -> SampleOutput {
        sample(kind, &mut gaussian_field, x, sigmas, noise, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
    }

    /// The mean and standard deviation of all of `t`'s (f64) values.
    fn mean_and_std(t: &Tensor) -> (f64, f64) {
        let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / n).sqrt();
        (mean, std)
    }

    #[test]
    fn endpoint_distribution_is_the_target_gaussian() {
        let x = gaussian(11, 20_000, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let sigmas = Scheduler::Shifted { shift: 3.0 }.sigmas(64, 1.0);
        let out = unobserved(SamplerKind::Heun, &mut gaussian_field, &x, &sigmas).unwrap();
        let (mean, std) = mean_and_std(&out.latent);
        assert!((mean - MEAN).abs() < 0.01, "mean {mean}");
        assert!((std - STD).abs() < 0.01, "std {std}");
        // The exact path is x(σ) = (1−σ)·μ + g(σ)·z with g = √(σ² + (1−σ)²s²): two nearly
        // orthogonal directions (the constant μ and the noise z) moving at different rates,
        // so it bends. Its straightness is the chord over the arc length of that curve.
        let g = |sigma: f64| (sigma * sigma + (1.0 - sigma).powi(2) * STD * STD).sqrt();
        let pieces = 100_000;
        let arc: f64 = (0..pieces)
            .map(|i| {
                let (a, b) = (i as f64 / pieces as f64, (i + 1) as f64 / pieces as f64);
                (MEAN * MEAN * (b - a).powi(2) + (g(b) - g(a)).powi(2)).sqrt()
            })
            .sum();
        let expected = (MEAN * MEAN + (STD - 1.0).powi(2)).sqrt() / arc;
        assert!(
            (out.straightness - expected).abs() < 0.01,
            "straightness {} vs {expected}",
            out.straightness
        );
    }

    #[test]
    fn euler_ancestral_draws_the_target_gaussian_and_is_reproducible() {
        let x = gaussian(12, (2, 20_000), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let sigmas = Scheduler::Shifted { shift: 3.0 }.sigmas(200, 1.0);
        let noise = FreshNoise {
            eta: 1.0,
            seeds: vec![5, 6],
        };
        let run =
            |noise: &FreshNoise| run_to_end(SamplerKind::EulerAncestral, &x, &sigmas, noise).latent;
        let out = run(&noise);
        let (mean, std) = mean_and_std(&out);
        assert!((mean - MEAN).abs() < 0.01, "mean {mean}");
        assert!((std - STD).abs() < 0.02, "std {std}");

        let again = run(&noise);
        assert_eq!(l2_norm(&(&again - &out).unwrap()).unwrap(), 0.0);
        // Each image's noise comes from its own seed alone: the first image is the same with
        // another second seed, and the fresh noise moved it away from the ODE's endpoint.
        let other = run(&FreshNoise {
            eta: 1.0,
            seeds: vec![5, 7],
        });
        let first = |t: &Tensor| t.get(0).unwrap();
        assert_eq!(
            l2_norm(&(first(&other) - first(&out)).unwrap()).unwrap(),
            0.0
        );
        let second = |t: &Tensor| t.get(1).unwrap();
        assert!(l2_norm(&(second(&other) - second(&out)).unwrap()).unwrap() > 1.0);
        let ode = unobserved(SamplerKind::Euler, &mut gaussian_field, &x, &sigmas)
            .unwrap()
            .latent;
        assert!(l2_norm(&(&ode - &out).unwrap()).unwrap() > 1.0);

        let wrong = FreshNoise {
            eta: 1.0,
            seeds: vec![5],
        };
        let err = sample(
            SamplerKind::EulerAncestral,
            &mut gaussian_field,
            &x,
            &sigmas,
            &wrong,
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("1 noise seeds for a batch of 2"),
            "{err}"
        );
    }

    #[test]
    fn records_carry_sigma_canvas_and_clean_estimate() {
        let x = start(64);
        let sigmas = Scheduler::Simple.sigmas(4, 1.0);
        let mut records = Vec::new();
        sample(
            SamplerKind::Euler,
            &mut gaussian_field,
            &x,
            &sigmas,
            &FreshNoise::none(),
            &mut |r| {
                records.push(r.clone());
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        assert_eq!(records.len(), 4);
        for (i, r) in records.iter().enumerate() {
            assert_eq!((r.index, r.steps, r.sigma), (i, 4, sigmas[i]));
            let v = gaussian_field(&r.x, r.sigma).unwrap();
            let expected = clean_estimate(&r.x, &v, r.sigma).unwrap();
            assert!(l2_norm(&(&r.clean - expected).unwrap()).unwrap() < 1e-12);
            assert!((r.velocity_norm - l2_norm(&v).unwrap()).abs() < 1e-9);
        }
        assert!(l2_norm(&(&records[0].x - &x).unwrap()).unwrap() == 0.0);
    }

    #[test]
    fn constant_velocity_path_is_perfectly_straight() {
        let x = start(16);
        let direction = start(16).affine(-1.0, 0.3).unwrap();
        let mut field = |_: &Tensor, _: f64| Ok(direction.clone());
        let sigmas = Scheduler::Shifted { shift: 2.0 }.sigmas(7, 1.0);
        let out = unobserved(SamplerKind::Euler, &mut field, &x, &sigmas).unwrap();
        assert!((out.straightness - 1.0).abs() < 1e-12);
        let mut zigzag = |x: &Tensor, sigma: f64| {
            let sign = if (sigma * 10.0).round() as i64 % 2 == 0 {
                1.0
            } else {
                -1.0
            };
            Ok(x.ones_like()?.affine(sign, 0.0)?)
        };
        let out = unobserved(
            SamplerKind::Euler,
            &mut zigzag,
            &x,
            &Scheduler::Simple.sigmas(10, 1.0),
        )
        .unwrap();
        assert!(out.straightness < 0.5, "straightness {}", out.straightness);
    }

    #[test]
    fn nan_velocity_is_reported_with_step_and_sigma() {
        let x = start(8);
        let sigmas = Scheduler::Simple.sigmas(8, 1.0);
        let mut field = |x: &Tensor, sigma: f64| {
            let v = x.zeros_like()?;
            Ok(if sigma < 0.7 {
                v.affine(f64::NAN, 0.0)?
            } else {
                v
            })
        };
        let err = unobserved(SamplerKind::Euler, &mut field, &x, &sigmas).unwrap_err();
        assert_eq!(
            err.to_string(),
            "diverged at step 4 of 8 (σ=0.6250): the predicted velocity contains NaN or infinite values"
        );
    }

    #[test]
    fn exploding_latent_is_reported() {
        let x = start(8);
        let sigmas = Scheduler::Simple.sigmas(8, 1.0);
        let mut field = |x: &Tensor, _: f64| Ok(x.affine(-1e3, 0.0)?);
        let err = unobserved(SamplerKind::Euler, &mut field, &x, &sigmas).unwrap_err();
        let SampleError::Diverged { step, reason, .. } = &err else {
            panic!("{err}")
        };
        assert!(*step <= 2, "{err}");
        assert!(reason.contains("exploded"), "{err}");
    }

    #[test]
    fn observer_cancels_within_one_step() {
        let x = start(8);
        let sigmas = Scheduler::Simple.sigmas(10, 1.0);
        let mut evaluations = 0;
        let mut field = |x: &Tensor, sigma: f64| {
            evaluations += 1;
            gaussian_field(x, sigma)
        };
        let err = sample(
            SamplerKind::Euler,
            &mut field,
            &x,
            &sigmas,
            &FreshNoise::none(),
            &mut |r| {
                if r.index == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap_err();
        assert!(matches!(
            err,
            SampleError::Cancelled {
                completed: 3,
                steps: 10
            }
        ));
        assert_eq!(evaluations, 4);
    }
}
