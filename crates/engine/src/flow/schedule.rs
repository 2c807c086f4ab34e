//! σ schedules: the ladder σ_0 = start … σ_N = 0 that a sampler walks down.
//!
//! Every scheduler here is a monotone warp `σ = w(t)` of a uniform time grid t ∈ [0, 1].
//! A run that starts below σ = 1 (a source-image start) walks the *same* curve from
//! `t_start = w⁻¹(σ_start)` down to 0 in its N steps, so strength 0.6 with the shifted
//! scheduler spends its steps where the full run would have spent them.

/// Which warp of the time grid to use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheduler {
    /// Linear σ: `σ_i = 1 − i/N`.
    Simple,
    /// SD3's shift: `σ' = s·σ / (1 + (s−1)·σ)`; s > 1 spends more steps at high noise.
    Shifted { shift: f64 },
    /// FLUX's resolution-dependent shift: `μ` is linear in the number of image tokens
    /// (`base_shift` at 256 tokens, `max_shift` at 4096) and `σ' = e^μ / (e^μ + 1/σ − 1)`,
    /// which is the SD3 shift with `s = e^μ`.
    Flux {
        base_shift: f64,
        max_shift: f64,
        image_tokens: usize,
    },
}

/// FLUX's defaults for [`Scheduler::Flux`].
pub const FLUX_BASE_SHIFT: f64 = 0.5;
/// FLUX's defaults for [`Scheduler::Flux`].
pub const FLUX_MAX_SHIFT: f64 = 1.15;
const FLUX_BASE_TOKENS: f64 = 256.0;
const FLUX_MAX_TOKENS: f64 = 4096.0;

/// FLUX's μ for a number of image tokens: the line through (256, base) and (4096, max).
pub fn flux_mu(base_shift: f64, max_shift: f64, image_tokens: usize) -> f64 {
    let slope = (max_shift - base_shift) / (FLUX_MAX_TOKENS - FLUX_BASE_TOKENS);
    base_shift + slope * (image_tokens as f64 - FLUX_BASE_TOKENS)
}

impl Scheduler {
    /// The shift factor `s` of the warp (1 for the linear scheduler).
    pub fn shift_factor(&self) -> f64 {
        match *self {
            Scheduler::Simple => 1.0,
            Scheduler::Shifted { shift } => shift,
            Scheduler::Flux {
                base_shift,
                max_shift,
                image_tokens,
            } => flux_mu(base_shift, max_shift, image_tokens).exp(),
        }
    }

    /// σ at time `t` ∈ [0, 1].
    pub fn warp(&self, t: f64) -> f64 {
        let s = self.shift_factor();
        s * t / (1.0 + (s - 1.0) * t)
    }

    /// The time `t` at which the warp reaches `sigma` (inverse of [`Scheduler::warp`]).
    pub fn unwarp(&self, sigma: f64) -> f64 {
        let s = self.shift_factor();
        sigma / (s - (s - 1.0) * sigma)
    }

    /// `steps + 1` values from `start_sigma` down to exactly 0.
    pub fn sigmas(&self, steps: usize, start_sigma: f64) -> Vec<f64> {
        let t_start = self.unwarp(start_sigma.clamp(0.0, 1.0));
        (0..=steps)
            .map(|i| {
                if i == 0 {
                    start_sigma
                } else if i == steps {
                    0.0
                } else {
                    self.warp(t_start * (1.0 - i as f64 / steps as f64))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn simple_is_linear_from_one_to_zero() {
        let s = Scheduler::Simple.sigmas(4, 1.0);
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn shifted_matches_sd3_formula() {
        let shift = 3.0;
        let s = Scheduler::Shifted { shift }.sigmas(8, 1.0);
        assert_eq!(s.len(), 9);
        for (i, sigma) in s.iter().enumerate() {
            let t = 1.0 - i as f64 / 8.0;
            let expected = shift * t / (1.0 + (shift - 1.0) * t);
            assert!(close(*sigma, expected), "step {i}: {sigma} vs {expected}");
        }
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        assert!(s[4] > 0.5, "a shift above 1 keeps the midpoint noisy");
    }

    #[test]
    fn flux_mu_is_linear_in_tokens_through_the_published_points() {
        assert!(close(flux_mu(0.5, 1.15, 256), 0.5));
        assert!(close(flux_mu(0.5, 1.15, 4096), 1.15));
        assert!(close(flux_mu(0.5, 1.15, 2176), 0.825));
    }

    #[test]
    fn flux_matches_its_formula() {
        let tokens = 1024;
        let mu = flux_mu(FLUX_BASE_SHIFT, FLUX_MAX_SHIFT, tokens);
        let sched = Scheduler::Flux {
            base_shift: FLUX_BASE_SHIFT,
            max_shift: FLUX_MAX_SHIFT,
            image_tokens: tokens,
        };
        let s = sched.sigmas(10, 1.0);
        for (i, sigma) in s.iter().enumerate().take(10).skip(1) {
            let t = 1.0 - i as f64 / 10.0;
            let expected = mu.exp() / (mu.exp() + 1.0 / t - 1.0);
            assert!(close(*sigma, expected), "step {i}: {sigma} vs {expected}");
        }
        assert_eq!(s[0], 1.0);
        assert_eq!(s[10], 0.0);
    }

    #[test]
    fn truncated_schedule_starts_at_start_sigma_on_the_same_curve() {
        let sched = Scheduler::Shifted { shift: 3.0 };
        let s = sched.sigmas(5, 0.6);
        assert_eq!(s[0], 0.6);
        assert_eq!(s[5], 0.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        let t0 = sched.unwarp(0.6);
        assert!(close(sched.warp(t0), 0.6));
        for (i, sigma) in s.iter().enumerate().skip(1) {
            assert!(close(*sigma, sched.warp(t0 * (1.0 - i as f64 / 5.0))));
        }
    }
}
