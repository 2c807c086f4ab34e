//! Classifier-free guidance and its variants: how the CFG node turns a conditional and an
//! unconditional velocity into the one the sampler follows.
//!
//! Flow models "burn in" (over-saturate) at lower CFG scales than diffusion models, so besides
//! plain CFG Flowline offers three counter-measures. Rescale and APG act on the clean-image
//! estimates `x̂0 = x − σ·v`, where saturation actually lives; the combined estimate is turned
//! back into a velocity with `v = (x − x̂0)/σ`. CFG-Zero* was designed for flow velocities and
//! acts on them directly. Their norms and statistics run over each image's whole latent: a batch
//! of latents (`[B, C, H, W]`, as `flowline eval` samples) is guided image by image.

use candle_core::{Result, Tensor};

use super::{clean_estimate, dot, l2_norm, sum, velocity_from_clean};

/// How conditional and unconditional predictions are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuidanceMethod {
    /// `v_u + s·(v_c − v_u)`.
    Cfg,
    /// CFG whose clean estimate is rescaled toward the conditional estimate's standard
    /// deviation, blended by `rescale_multiplier` (Lin et al. 2023).
    Rescale,
    /// CFG-Zero*: the unconditional velocity is first scaled by the optimal
    /// `α = ⟨v_c, v_u⟩ / ‖v_u‖²` (Fan et al. 2025).
    CfgZeroStar,
    /// Adaptive projected guidance: the guidance difference is clipped to a norm threshold and
    /// its component parallel to the conditional estimate is scaled by `apg_parallel_scale`
    /// (Sadat et al. 2024).
    Apg,
}

impl GuidanceMethod {
    /// Every method, in the order a user sees them.
    pub const ALL: [GuidanceMethod; 4] = [
        GuidanceMethod::Cfg,
        GuidanceMethod::Rescale,
        GuidanceMethod::CfgZeroStar,
        GuidanceMethod::Apg,
    ];

    /// The names used in workflow files and on the command line, in the order of [`Self::ALL`].
    pub const NAMES: [&'static str; 4] = ["cfg", "rescale", "cfg_zero_star", "apg"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn from_name(name: &str) -> Option<Self> {
        let index = Self::NAMES.iter().position(|n| *n == name)?;
        Some(Self::ALL[index])
    }
}

/// Everything the CFG node decides; the sampler asks it once per model evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    pub scale: f64,
    pub method: GuidanceMethod,
    /// Blend between rescaled (1) and plain (0) CFG for [`GuidanceMethod::Rescale`].
    pub rescale_multiplier: f64,
    /// Weight kept of the parallel component for [`GuidanceMethod::Apg`] (0 drops it).
    pub apg_parallel_scale: f64,
    /// Largest norm of the guidance difference for [`GuidanceMethod::Apg`] (0: no limit).
    pub apg_norm_threshold: f64,
    /// Guidance applies only for σ in `[lo, hi]`; elsewhere the conditional prediction is used.
    pub interval: (f64, f64),
}

impl Default for Guidance {
    fn default() -> Self {
        Guidance {
            scale: 1.0,
            method: GuidanceMethod::Cfg,
            rescale_multiplier: 0.7,
            apg_parallel_scale: 0.0,
            apg_norm_threshold: 0.0,
            interval: (0.0, 1.0),
        }
    }
}

impl Guidance {
    /// Whether the unconditional pass is needed at `sigma`; when not, the model runs once.
    pub fn needs_unconditional(&self, sigma: f64) -> bool {
        self.scale != 1.0 && self.guides_at(sigma)
    }

    /// Whether `sigma` lies in the guidance interval, where any guidance (autoguidance too)
    /// applies.
    pub fn guides_at(&self, sigma: f64) -> bool {
        (self.interval.0..=self.interval.1).contains(&sigma)
    }

    /// The guided velocity at `x`, `sigma` (call only where [`Self::needs_unconditional`]).
    pub fn combine(
        &self,
        x: &Tensor,
        sigma: f64,
        cond: &Tensor,
        uncond: &Tensor,
    ) -> Result<Tensor> {
        let images = if x.rank() == 4 { x.dim(0)? } else { 1 };
        if images == 1 || self.method == GuidanceMethod::Cfg {
            return self.combine_image(x, sigma, cond, uncond);
        }
        let guided = (0..images)
            .map(|i| {
                let image = |t: &Tensor| t.narrow(0, i, 1);
                self.combine_image(&image(x)?, sigma, &image(cond)?, &image(uncond)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&guided, 0)
    }

    /// [`Self::combine`] for one image, whose whole latent the statistics run over.
    fn combine_image(
        &self,
        x: &Tensor,
        sigma: f64,
        cond: &Tensor,
        uncond: &Tensor,
    ) -> Result<Tensor> {
        let s = self.scale;
        match self.method {
            GuidanceMethod::Cfg => cfg(cond, uncond, s),
            GuidanceMethod::CfgZeroStar => {
                let uncond_norm_sq = dot(uncond, uncond)?;
                let alpha = if uncond_norm_sq > 0.0 {
                    dot(cond, uncond)? / uncond_norm_sq
                } else {
                    1.0
                };
                cfg(cond, &uncond.affine(alpha, 0.0)?, s)
            }
            GuidanceMethod::Rescale => {
                let clean_cond = clean_estimate(x, cond, sigma)?;
                let clean_cfg = clean_estimate(x, &cfg(cond, uncond, s)?, sigma)?;
                let ratio = std_dev(&clean_cond)? / std_dev(&clean_cfg)?.max(f64::MIN_POSITIVE);
                let phi = self.rescale_multiplier;
                let blended = clean_cfg.affine(phi * ratio + (1.0 - phi), 0.0)?;
                velocity_from_clean(x, &blended, sigma)
            }
            GuidanceMethod::Apg => {
                let clean_cond = clean_estimate(x, cond, sigma)?;
                let clean_uncond = clean_estimate(x, uncond, sigma)?;
                let mut diff = (&clean_cond - &clean_uncond)?;
                let diff_norm = l2_norm(&diff)?;
                if self.apg_norm_threshold > 0.0 && diff_norm > self.apg_norm_threshold {
                    diff = diff.affine(self.apg_norm_threshold / diff_norm, 0.0)?;
                }
                let cond_norm_sq = dot(&clean_cond, &clean_cond)?;
                let parallel = if cond_norm_sq > 0.0 {
                    clean_cond.affine(dot(&diff, &clean_cond)? / cond_norm_sq, 0.0)?
                } else {
                    diff.zeros_like()?
                };
                let orthogonal = (&diff - &parallel)?;
                let guided_diff = (orthogonal + parallel.affine(self.apg_parallel_scale, 0.0)?)?;
                let guided = (clean_cond + guided_diff.affine(s - 1.0, 0.0)?)?;
                velocity_from_clean(x, &guided, sigma)
            }
        }
    }
}

fn cfg(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor> {
    uncond + (cond - uncond)?.affine(scale, 0.0)?
}

fn std_dev(t: &Tensor) -> Result<f64> {
    let n = t.elem_count() as f64;
    let mean = sum(t)? / n;
    Ok((dot(t, t)? / n - mean * mean).max(0.0).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn vec(t: &Tensor) -> Vec<f64> {
        t.to_vec1().unwrap()
    }

    fn assert_close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    fn guidance(method: GuidanceMethod, scale: f64) -> Guidance {
        Guidance {
            method,
            scale,
            ..Guidance::default()
        }
    }

    #[test]
    fn plain_cfg_extrapolates_from_unconditional() {
        let g = guidance(GuidanceMethod::Cfg, 3.0);
        let v = g
            .combine(&t(&[0.0, 0.0]), 0.5, &t(&[1.0, 2.0]), &t(&[0.5, 1.0]))
            .unwrap();
        assert_close(&vec(&v), &[2.0, 4.0]);
    }

    #[test]
    fn scale_one_and_interval_skip_the_unconditional_pass() {
        assert!(!guidance(GuidanceMethod::Cfg, 1.0).needs_unconditional(0.5));
        let g = Guidance {
            scale: 4.0,
            interval: (0.2, 0.8),
            ..Guidance::default()
        };
        assert!(g.needs_unconditional(0.5));
        assert!(!g.needs_unconditional(0.9));
        assert!(!g.needs_unconditional(0.1));
    }

    #[test]
    fn cfg_zero_star_uses_the_optimal_scale() {
        let cond = t(&[1.0, 2.0, -1.0]);
        let uncond = t(&[2.0, 4.0, -2.0]);
        let g = guidance(GuidanceMethod::CfgZeroStar, 5.0);
        let v = g.combine(&t(&[0.0; 3]), 0.5, &cond, &uncond).unwrap();
        // α = ⟨c,u⟩/‖u‖² = 1/2 so α·u = c and guidance adds nothing.
        assert_close(&vec(&v), &vec(&cond));
        let cond = t(&[1.0, 0.0]);
        let uncond = t(&[1.0, 1.0]);
        let v = g.combine(&t(&[0.0; 2]), 0.5, &cond, &uncond).unwrap();
        assert_close(&vec(&v), &[0.5 + 5.0 * 0.5, 0.5 - 5.0 * 0.5]);
    }

    #[test]
    fn a_batch_is_guided_image_by_image() {
        let latent = |values: &[f64]| {
            Tensor::new(values, &Device::Cpu)
                .unwrap()
                .reshape((2, 1, 1, 2))
                .unwrap()
        };
        let x = latent(&[0.3, -0.2, 0.9, 0.1]);
        let cond = latent(&[1.0, -1.0, 0.5, 0.0]);
        let uncond = latent(&[0.2, 0.3, -4.0, 2.0]);
        for method in GuidanceMethod::ALL {
            let g = guidance(method, 4.0);
            let batch = g.combine(&x, 0.6, &cond, &uncond).unwrap();
            for i in 0..2 {
                let image = |t: &Tensor| t.narrow(0, i, 1).unwrap();
                let alone = g
                    .combine(&image(&x), 0.6, &image(&cond), &image(&uncond))
                    .unwrap();
                assert_close(
                    &vec(&image(&batch).flatten_all().unwrap()),
                    &vec(&alone.flatten_all().unwrap()),
                );
            }
        }
    }

    #[test]
    fn rescale_matches_the_conditional_spread() {
        let x = t(&[0.3, -0.2, 0.9, 0.1]);
        let cond = t(&[1.0, -1.0, 0.5, 0.0]);
        let uncond = t(&[0.2, 0.3, -0.4, 0.1]);
        let sigma = 0.6;
        let full = Guidance {
            rescale_multiplier: 1.0,
            ..guidance(GuidanceMethod::Rescale, 6.0)
        };
        let v = full.combine(&x, sigma, &cond, &uncond).unwrap();
        let clean = clean_estimate(&x, &v, sigma).unwrap();
        let clean_cond = clean_estimate(&x, &cond, sigma).unwrap();
        assert!((std_dev(&clean).unwrap() - std_dev(&clean_cond).unwrap()).abs() < 1e-9);
        let none = Guidance {
            rescale_multiplier: 0.0,
            ..full
        };
        let plain = guidance(GuidanceMethod::Cfg, 6.0);
        assert_close(
            &vec(&none.combine(&x, sigma, &cond, &uncond).unwrap()),
            &vec(&plain.combine(&x, sigma, &cond, &uncond).unwrap()),
        );
    }

    #[test]
    fn apg_drops_the_parallel_component_and_clips_the_norm() {
        let x = t(&[0.5, -0.5, 0.2]);
        let cond = t(&[1.0, 0.2, -0.3]);
        let uncond = t(&[0.1, 0.4, 0.6]);
        let sigma = 0.7;
        let apg = guidance(GuidanceMethod::Apg, 4.0);
        let v = apg.combine(&x, sigma, &cond, &uncond).unwrap();
        let clean = clean_estimate(&x, &v, sigma).unwrap();
        let clean_cond = clean_estimate(&x, &cond, sigma).unwrap();
        let added = (&clean - &clean_cond).unwrap();
        assert!(dot(&added, &clean_cond).unwrap().abs() < 1e-9);

        let keep_all = Guidance {
            apg_parallel_scale: 1.0,
            ..apg
        };
        let plain = guidance(GuidanceMethod::Cfg, 4.0);
        assert_close(
            &vec(&keep_all.combine(&x, sigma, &cond, &uncond).unwrap()),
            &vec(&plain.combine(&x, sigma, &cond, &uncond).unwrap()),
        );

        let clipped = Guidance {
            apg_parallel_scale: 1.0,
            apg_norm_threshold: 0.01,
            ..apg
        };
        let v = clipped.combine(&x, sigma, &cond, &uncond).unwrap();
        let moved = (clean_estimate(&x, &v, sigma).unwrap() - &clean_cond).unwrap();
        assert!((l2_norm(&moved).unwrap() - 3.0 * 0.01).abs() < 1e-9);
    }
}
