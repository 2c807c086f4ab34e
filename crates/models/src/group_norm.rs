//! Group normalisation, optionally followed by SiLU, in one pass that writes one tensor: what
//! the autoencoder does before nearly every convolution.
//!
//! candle's `GroupNorm` builds its result from tensor operations (subtract the mean, square,
//! divide, scale, shift), each writing a tensor as large as its input, and SiLU writes one
//! more. In the FLUX and SD3 autoencoder's decoder at 1024² the input is 256 channels of
//! 1024² (1 GiB at f32), so those temporaries, with the 1×1 shortcut's ([`crate::pointwise`]),
//! set the decode's peak memory: 5.0 GiB above the weights, now 2.6. Here the CPU path reads
//! the input twice (mean, then variance about it) and writes the output once, with a
//! vectorised `exp` for SiLU.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{GroupNorm, VarBuilder};
use rayon::prelude::*;

use crate::vector_math::exp_in_place;

/// Values per block of the sums and of the SiLU's `exp` (whose buffer stays in cache).
const CHUNK: usize = 4096;

/// A group normalisation with its learned per-channel scale and shift, and SiLU after it
/// where `swish` is set.
pub struct GroupNormSwish {
    /// candle's layer, for other devices and precisions.
    reference: GroupNorm,
    op: FusedGroupNorm,
}

struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    swish: bool,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl GroupNormSwish {
    /// Loads `weight` and `bias` of `channels` under `vb`.
    pub fn load(
        groups: usize,
        channels: usize,
        eps: f64,
        swish: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let host = |t: &Tensor| t.to_dtype(DType::F32)?.to_vec1::<f32>();
        let op = FusedGroupNorm {
            groups,
            eps,
            swish,
            weight: host(&weight)?,
            bias: host(&bias)?,
        };
        let reference = GroupNorm::new(weight, bias, channels, groups, eps)?;
        Ok(GroupNormSwish { reference, op })
    }
}

impl Module for GroupNormSwish {
    /// `[B, C, …]` normalised over each group of channels and all positions.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return x.contiguous()?.apply_op1_no_bwd(&self.op);
        }
        let normed = self.reference.forward(x)?;
        if self.op.swish {
            candle_nn::ops::silu(&normed)
        } else {
            Ok(normed)
        }
    }
}

impl CustomOp1 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "group-norm-swish"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("group norm: the fused path takes f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("group norm: the fused path takes a contiguous tensor");
        };
        let dims = layout.shape().dims();
        let channels = dims.get(1).copied().unwrap_or(0);
        if dims.len() < 2 || channels != self.weight.len() || channels % self.groups != 0 {
            candle_core::bail!(
                "group norm: input {dims:?} does not have {} channels in {} groups",
                self.weight.len(),
                self.groups
            );
        }
        let values = &values[start..end];
        let plane: usize = dims[2..].iter().product();
        let group_channels = channels / self.groups;
        let mut out = vec![0f32; values.len()];
        // One task per (image, group): its channels are adjacent in memory.
        out.par_chunks_mut(group_channels * plane)
            .zip(values.par_chunks(group_channels * plane))
            .enumerate()
            .for_each(|(task, (output, input))| {
                let first_channel = (task % self.groups) * group_channels;
                let count = input.len() as f64;
                let mean = sum_of(input, |v| v) / count;
                let mean_f32 = mean as f32;
                let variance = sum_of(input, |v| (v - mean_f32) * (v - mean_f32)) / count;
                let inverse_deviation = 1.0 / (variance + self.eps).sqrt();
                for (channel, (output, input)) in output
                    .chunks_mut(plane)
                    .zip(input.chunks(plane))
                    .enumerate()
                {
                    let scale = f64::from(self.weight[first_channel + channel]) * inverse_deviation;
                    let shift = f64::from(self.bias[first_channel + channel]) - mean * scale;
                    let (scale, shift) = (scale as f32, shift as f32);
                    for (y, &x) in output.iter_mut().zip(input) {
                        *y = x * scale + shift;
                    }
                    if self.swish {
                        swish_in_place(output);
                    }
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `Σ f(v)` over `values`: in eight f32 lanes within blocks of [`CHUNK`] values, so that the
/// compiler vectorises it, and in f64 across blocks.
fn sum_of(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    values
        .chunks(CHUNK)
        .map(|block| {
            let mut lanes = [0f32; 8];
            let mut eights = block.chunks_exact(8);
            for eight in &mut eights {
                for (lane, &v) in lanes.iter_mut().zip(eight) {
                    *lane += f(v);
                }
            }
            let rest: f32 = eights.remainder().iter().map(|&v| f(v)).sum();
            f64::from(lanes.iter().sum::<f32>() + rest)
        })
        .sum()
}

/// `x · sigmoid(x)`, written `x / (1 + exp(−x))`.
fn swish_in_place(values: &mut [f32]) {
    let mut exponentials = [0f32; CHUNK];
    for chunk in values.chunks_mut(CHUNK) {
        let exponentials = &mut exponentials[..chunk.len()];
        for (e, &x) in exponentials.iter_mut().zip(chunk.iter()) {
            *e = -x;
        }
        exp_in_place(exponentials);
        for (x, e) in chunk.iter_mut().zip(exponentials.iter()) {
            *x /= 1.0 + e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    use crate::test_support::largest_difference;

    /// Both variants against candle's group norm (and SiLU), on a shape whose sides are odd
    /// and whose values are far from zero mean, with learned scales and shifts.
    #[test]
    fn it_equals_candles_group_norm_and_silu() {
        let device = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (2, 12, 7, 5), &device).unwrap() + 4.0).unwrap();
        let tensors = HashMap::from([
            (
                "weight".to_string(),
                Tensor::randn(0.5f32, 1.0, 12, &device).unwrap(),
            ),
            (
                "bias".to_string(),
                Tensor::randn(0f32, 1.0, 12, &device).unwrap(),
            ),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        for swish in [false, true] {
            let layer = GroupNormSwish::load(4, 12, 1e-6, swish, vb.clone()).unwrap();
            let mut expected = layer.reference.forward(&x).unwrap();
            if swish {
                expected = candle_nn::ops::silu(&expected).unwrap();
            }
            let ours = layer.forward(&x).unwrap();
            assert_eq!(ours.dims(), x.dims());
            let difference = largest_difference(&ours, &expected);
            assert!(difference < 2e-5, "swish {swish}: off by {difference}");
        }
    }
}
