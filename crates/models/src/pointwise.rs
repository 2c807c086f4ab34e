//! A 1×1 convolution as one matrix product over the channel-first layout, optionally added to
//! a residual in the same pass: the autoencoder's channel-changing shortcuts and its
//! attention projections.
//!
//! candle's `conv2d` runs a 1×1 kernel by im2col: it copies the input into a pixel-major
//! matrix, multiplies, and returns a transposed view that the next operation copies again.
//! In the decoder's first 1024² block (256 → 128 channels) that is a 1 GiB copy and a 512 MiB
//! one on top of the block's own tensors, and the residual sum `shortcut(x) + h` wrote a
//! third tensor. Here `W · x` is computed straight into an output that already holds the
//! bias (and the residual), so the output is the only tensor written.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// A 1×1 convolution layer with bias, loaded as candle's `conv2d` (tensors `weight`
/// `[out, in, 1, 1]` and `bias` `[out]`).
#[derive(Debug, Clone)]
pub struct Conv1x1 {
    /// `[out, in]`.
    weight: Tensor,
    bias: Tensor,
    cpu: Arc<CpuWeights>,
}

#[derive(Debug)]
struct CpuWeights {
    /// `[out][in]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
}

impl Conv1x1 {
    pub fn load(
        in_channels: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_channels, in_channels, 1, 1), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        Self::new(weight, bias)
    }

    pub fn new(weight: Tensor, bias: Tensor) -> candle_core::Result<Self> {
        let (out_channels, in_channels, _, _) = weight.dims4()?;
        let weight = weight.reshape((out_channels, in_channels))?;
        let host = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        let cpu = Arc::new(CpuWeights {
            weight: host(&weight)?,
            bias: host(&bias)?,
            in_channels,
            out_channels,
        });
        Ok(Conv1x1 { weight, bias, cpu })
    }

    /// `residual + conv(x)`, where `residual` has the output's shape.
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && [x, residual].iter().all(|t| t.dtype() == DType::F32) {
            return x
                .contiguous()?
                .apply_op2_no_bwd(&residual.contiguous()?, &PlusResidual(self.cpu.clone()));
        }
        self.by_tensor_operations(x)? + residual
    }

    /// The layer as candle operations, for other devices and precisions.
    fn by_tensor_operations(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        self.weight
            .broadcast_matmul(&x.reshape((batch, channels, height * width))?)?
            .broadcast_add(&self.bias.reshape((1, (), 1))?)?
            .reshape((batch, (), height, width))
    }
}

impl Module for Conv1x1 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return x.contiguous()?.apply_op1_no_bwd(&Plain(self.cpu.clone()));
        }
        self.by_tensor_operations(x)
    }
}

/// `W · x + b` on the CPU.
struct Plain(Arc<CpuWeights>);
/// `r + W · x + b` on the CPU.
struct PlusResidual(Arc<CpuWeights>);

impl CustomOp1 for Plain {
    fn name(&self) -> &'static str {
        "conv1x1"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let zeros = vec![0f32; output_shape(&self.0, layout)?.elem_count()];
        project(&self.0, storage, layout, zeros)
    }
}

impl CustomOp2 for PlusResidual {
    fn name(&self) -> &'static str {
        "conv1x1-plus-residual"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = output_shape(&self.0, layout)?;
        if residual_layout.shape() != &shape {
            candle_core::bail!(
                "conv1x1: the residual is {:?}, the output {:?}",
                residual_layout.shape(),
                shape
            );
        }
        let residual = contiguous_f32(residual, residual_layout)?.to_vec();
        project(&self.0, storage, layout, residual)
    }
}

/// `initial + b + W · x` for the input `x` in `storage`: the bias added to each output plane,
/// then the product added to all.
fn project(
    weights: &CpuWeights,
    storage: &CpuStorage,
    layout: &Layout,
    mut output: Vec<f32>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let shape = output_shape(weights, layout)?;
    let plane: usize = shape.dims()[2..].iter().product();
    output
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(row, out)| {
            let bias = weights.bias[row % weights.out_channels];
            out.iter_mut().for_each(|v| *v += bias);
        });
    multiply_into(
        weights,
        contiguous_f32(storage, layout)?,
        layout,
        &mut output,
    )?;
    Ok((CpuStorage::F32(output), shape))
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("conv1x1: the input is not contiguous"),
        _ => candle_core::bail!("conv1x1: the input is not f32"),
    }
}

fn output_shape(weights: &CpuWeights, layout: &Layout) -> candle_core::Result<Shape> {
    let (batch, channels, height, width) = layout.shape().dims4()?;
    if channels != weights.in_channels {
        candle_core::bail!(
            "conv1x1: input has {channels} channels, the weights take {}",
            weights.in_channels
        );
    }
    Ok(Shape::from((batch, weights.out_channels, height, width)))
}

/// `output += W · input` for each image: `[out, in] × [in, h·w]`.
fn multiply_into(
    weights: &CpuWeights,
    input: &[f32],
    layout: &Layout,
    output: &mut [f32],
) -> candle_core::Result<()> {
    let (_, _, height, width) = layout.shape().dims4()?;
    let plane = height * width;
    let (inputs, outputs) = (weights.in_channels, weights.out_channels);
    let parallelism = gemm::Parallelism::Rayon(rayon::current_num_threads());
    for (image, out) in input
        .chunks(inputs * plane)
        .zip(output.chunks_mut(outputs * plane))
    {
        // SAFETY: dst is [outputs, plane] row-major, lhs [outputs, inputs] row-major, rhs
        // [inputs, plane] row-major, each within its slice; read_dst with alpha 1 adds the
        // product to what dst holds.
        unsafe {
            gemm::gemm(
                outputs,
                plane,
                inputs,
                out.as_mut_ptr(),
                1,
                plane as isize,
                true,
                weights.weight.as_ptr(),
                1,
                inputs as isize,
                image.as_ptr(),
                1,
                plane as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::test_support::largest_difference;

    #[test]
    fn it_equals_candles_convolution_with_and_without_a_residual() {
        let device = Device::Cpu;
        for (batch, inputs, outputs, height, width) in [(1, 3, 5, 7, 9), (2, 8, 4, 16, 5)] {
            let x = Tensor::randn(0f32, 1.0, (batch, inputs, height, width), &device).unwrap();
            let weight = Tensor::randn(0f32, 0.5, (outputs, inputs, 1, 1), &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, outputs, &device).unwrap();
            let residual =
                Tensor::randn(0f32, 1.0, (batch, outputs, height, width), &device).unwrap();
            let expected = x
                .conv2d(&weight, 0, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, outputs, 1, 1)).unwrap())
                .unwrap();
            let layer = Conv1x1::new(weight, bias).unwrap();
            let plain = layer.forward(&x).unwrap();
            let plus = layer.forward_plus(&x, &residual).unwrap();
            let by_operations = layer.by_tensor_operations(&x).unwrap();
            assert_eq!(plain.dims(), expected.dims());
            for (name, ours, reference) in [
                ("plain", &plain, expected.clone()),
                ("plus", &plus, (&expected + &residual).unwrap()),
                ("tensor operations", &by_operations, expected.clone()),
            ] {
                let difference = largest_difference(ours, &reference);
                assert!(
                    difference < 1e-5,
                    "{name}, {batch}×{inputs}→{outputs}, {height}×{width}: {difference}"
                );
            }
        }
    }
}
