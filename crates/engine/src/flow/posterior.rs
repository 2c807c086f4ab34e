//! The exact clean estimate when the data are a finite set of candidate pictures.
//!
//! On the path `x = σ·ε + (1−σ)·x0`, a noisy point came from candidate `c_k` with posterior
//! weight `w_k ∝ exp(−‖x − (1−σ)·c_k‖² / 2σ²)` (equally likely candidates), and the best clean
//! estimate is `x̂0 = Σ w_k c_k`. The exemplar model samples with it, and training uses it to
//! regress the posterior mean over many pictures of a caption instead of one picture's
//! velocity (a lower-variance target with the same optimum).

use candle_core::{D, DType, Result, Tensor};

/// Posterior weights `[B, K]` of candidates `[B, K, N]` for noisy points `x` (`[B, N]`) at
/// noise levels `sigma` (`[B]`, each in (0, 1]).
///
/// The exponent is expanded as `(α·x·c_k − α²‖c_k‖²/2)/σ²` with α = 1 − σ, dropping `‖x‖²`,
/// which is the same for every candidate: one matrix product instead of a `[B, K, N]`
/// difference, which matters where the exemplar model calls it at every sampling step.
pub fn weights(x: &Tensor, sigma: &Tensor, candidates: &Tensor) -> Result<Tensor> {
    let sigma = sigma.to_dtype(DType::F32)?.unsqueeze(1)?;
    let alpha = (1.0 - &sigma)?;
    let variance = sigma.sqr()?;
    let cross = x
        .unsqueeze(1)?
        .matmul(&candidates.transpose(1, 2)?)?
        .squeeze(1)?;
    let norms = candidates.sqr()?.sum(D::Minus1)?;
    let logits = (cross.broadcast_mul(&alpha)? - norms.broadcast_mul(&(alpha.sqr()? * 0.5)?)?)?
        .broadcast_div(&variance)?;
    candle_nn::ops::softmax(&logits, D::Minus1)
}

/// The posterior mean `[B, N]` of candidates `[B, K, N]` given noisy points `x` (`[B, N]`) at
/// noise levels `sigma` (`[B]`, each in (0, 1]).
pub fn clean_estimate(x: &Tensor, sigma: &Tensor, candidates: &Tensor) -> Result<Tensor> {
    weights(x, sigma, candidates)?
        .unsqueeze(1)?
        .matmul(candidates)?
        .squeeze(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_weights_follow_the_gaussian_likelihood_of_each_candidate() {
        let device = Device::Cpu;
        let candidates = Tensor::new(&[[[1f32, 0.0], [-1.0, 0.0], [0.0, 2.0]]], &device).unwrap();
        let x = Tensor::new(&[[0.3f32, 0.1]], &device).unwrap();
        let sigma = 0.5f32;
        let got: Vec<f32> = weights(&x, &Tensor::new(&[sigma], &device).unwrap(), &candidates)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let alpha = 1.0 - sigma;
        let likelihood = |c: [f32; 2]| {
            let d = (0.3 - alpha * c[0]).powi(2) + (0.1 - alpha * c[1]).powi(2);
            (-d / (2.0 * sigma * sigma)).exp()
        };
        let raw = [
            likelihood([1.0, 0.0]),
            likelihood([-1.0, 0.0]),
            likelihood([0.0, 2.0]),
        ];
        let total: f32 = raw.iter().sum();
        for (g, r) in got.iter().zip(raw) {
            assert!((g - r / total).abs() < 1e-5, "{got:?} against {raw:?}");
        }
    }

    #[test]
    fn at_full_noise_the_estimate_is_the_mean_and_near_data_the_nearest_candidate() {
        let device = Device::Cpu;
        let candidates = Tensor::new(&[[[2f32, 0.0], [0.0, 4.0]]], &device).unwrap();
        let x = Tensor::new(&[[1.9f32, 0.1]], &device).unwrap();
        let estimate = |sigma: f32| -> Vec<f32> {
            clean_estimate(&x, &Tensor::new(&[sigma], &device).unwrap(), &candidates)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let full = estimate(1.0);
        assert!((full[0] - 1.0).abs() < 1e-5 && (full[1] - 2.0).abs() < 1e-5);
        let near = estimate(0.01);
        assert!((near[0] - 2.0).abs() < 1e-5 && near[1].abs() < 1e-5);
    }
}
