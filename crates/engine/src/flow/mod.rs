//! Flow-matching mathematics: the part of Flowline that must be exactly right.
//!
//! Convention (as in FLUX, SD3 and ComfyUI): σ = 1 is the start (pure noise), σ = 0 is data.
//! A sample on the path is `x_σ = σ·ε + (1−σ)·x0`, the network predicts the velocity
//! `v = ε − x0`, the clean estimate is `x̂0 = x − σ·v`, and an Euler step from σ to σ' is
//! `x ← x + (σ' − σ)·v`. Because the paths are straight lines, plain Euler already works well,
//! and few steps keep quality after distillation.
//!
//! The pieces are independent of any network: [`schedule`] makes the σ ladder, [`noise`] makes
//! the portable start noise, [`guidance`] combines conditional and unconditional predictions,
//! [`sampler`] integrates a [`sampler::VelocityField`] while reporting every step, and
//! [`posterior`] gives the exact clean estimate when the data are a finite set of pictures.

pub mod guidance;
pub mod noise;
pub mod posterior;
pub mod sampler;
pub mod schedule;

use candle_core::{DType, Result, Tensor};

/// The point on the straight path between data `x0` and noise `eps` at noise level `sigma`.
pub fn interpolate(x0: &Tensor, eps: &Tensor, sigma: f64) -> Result<Tensor> {
    eps.affine(sigma, 0.0)? + x0.affine(1.0 - sigma, 0.0)?
}

/// The clean-image estimate `x̂0 = x − σ·v` implied by a velocity prediction.
pub fn clean_estimate(x: &Tensor, velocity: &Tensor, sigma: f64) -> Result<Tensor> {
    x - velocity.affine(sigma, 0.0)?
}

/// The velocity `v = (x − x̂0)/σ` implied by a clean-image estimate (σ > 0).
pub fn velocity_from_clean(x: &Tensor, clean: &Tensor, sigma: f64) -> Result<Tensor> {
    (x - clean)?.affine(1.0 / sigma, 0.0)
}

/// `t` in a precision fit for summing over a whole latent: f32 and f64 as they are, half
/// precision widened to f32.
pub fn widened(t: &Tensor) -> Result<Tensor> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(t.clone()),
        _ => t.to_dtype(DType::F32),
    }
}

/// The sum of all elements as an f64.
pub fn sum(t: &Tensor) -> Result<f64> {
    widened(t)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

/// Euclidean norm of all elements.
pub fn l2_norm(t: &Tensor) -> Result<f64> {
    sum(&widened(t)?.sqr()?).map(f64::sqrt)
}

/// Inner product of all elements.
pub fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    sum(&(widened(a)? * widened(b)?)?)
}
