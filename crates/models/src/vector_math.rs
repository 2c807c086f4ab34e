//! Element-wise functions for the CPU that the compiler vectorises, and the GELU built on them.
//!
//! candle's CPU `exp` and `gelu` call the C library's `expf` / `tanhf` once per value on one
//! thread. FLUX at 1024² applies GELU to 100 million values and exponentiates 900 million
//! attention scores per step, so both matter: here `exp` is a polynomial the compiler turns
//! into vector instructions (AVX2 where the CPU has it), and [`gelu`] runs it over all cores.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `exp` of every value.
///
/// Cephes' `expf` written so that the compiler vectorises it: `x = n·ln 2 + r` with
/// `|r| ≤ ln 2 / 2`, a degree-6 polynomial for `eʳ` and `2ⁿ` built in the exponent bits.
/// Relative error below 2·10⁻⁷ for arguments in [−87, 88]; below −87 (where `exp` is under
/// 1.7·10⁻³⁸) it gives that bound instead of a subnormal, above 88 infinity.
pub fn exp_in_place(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { exp_in_place_avx2(values) };
        return;
    }
    exp_in_place_portable(values);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_in_place_avx2(values: &mut [f32]) {
    exp_in_place_portable(values);
}

#[inline(always)]
fn exp_in_place_portable(values: &mut [f32]) {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HIGH is exact.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a branch.
    const ROUNDER: f32 = 12_582_912.0;
    for value in values.iter_mut() {
        let x = value.clamp(-87.0, 88.5);
        let n = (x * LOG2_E + ROUNDER) - ROUNDER;
        let r = x - n * LN2_HIGH - n * LN2_LOW;
        let mut p = 1.987_569_1e-4;
        p = p * r + 1.398_199_9e-3;
        p = p * r + 8.333_452e-3;
        p = p * r + 4.166_579_6e-2;
        p = p * r + 0.166_666_65;
        p = p * r + 0.5;
        let polynomial = p * r * r + r + 1.0;
        // 2ⁿ for n ≤ 127; n = 128 gives the bits of infinity.
        let power = f32::from_bits(((n as i32 + 127) as u32) << 23);
        *value = polynomial * power;
    }
}

/// GELU with the tanh approximation (as FLUX and candle's `gelu` use), on all cores for f32
/// on the CPU and by candle elsewhere. `0.5·x·(1 + tanh(z))` is written as
/// `x / (1 + exp(−2z))`, which is the same function.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op1_no_bwd(&Gelu)
    } else {
        x.gelu()
    }
}

struct Gelu;

/// Values per task of the parallel GELU.
const GELU_CHUNK: usize = 16_384;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh-vectorised"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("gelu: the vectorised path takes f32");
        };
        let dims = layout.shape().dims();
        let width = *dims.last().unwrap_or(&1);
        let rows = layout.shape().elem_count() / width.max(1);
        // Rows may be a strided view (FLUX's single blocks pass a slice of a projection);
        // within a row the values must be adjacent.
        let row_start = |row: usize| -> usize {
            let mut rest = row;
            let mut offset = layout.start_offset();
            for (&dim, &stride) in dims.iter().zip(layout.stride()).rev().skip(1) {
                offset += (rest % dim) * stride;
                rest /= dim;
            }
            offset
        };
        if dims.len() > 1 && layout.stride().last() != Some(&1) {
            candle_core::bail!("gelu: the values of a row must be adjacent");
        }
        let mut out = vec![0f32; rows * width];
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(row, line)| {
                let start = row_start(row);
                line.copy_from_slice(&values[start..start + width]);
            });
        out.par_chunks_mut(GELU_CHUNK).for_each(|chunk| {
            const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
            let mut exponents: Vec<f32> = chunk
                .iter()
                .map(|&x| -2.0 * SQRT_TWO_OVER_PI * x * (1.0 + 0.044_715 * x * x))
                .collect();
            exp_in_place(&mut exponents);
            for (value, exponential) in chunk.iter_mut().zip(&exponents) {
                *value /= 1.0 + exponential;
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::test_support::largest_difference;

    #[test]
    fn the_vectorised_exp_matches_the_library_exp() {
        let mut values: Vec<f32> = (0..200_001)
            .map(|i| -100.0 + 188.0 * i as f32 / 200_000.0)
            .collect();
        let expected: Vec<f32> = values.iter().map(|x| x.clamp(-87.0, 88.0).exp()).collect();
        exp_in_place(&mut values);
        for (ours, exact) in values.iter().zip(&expected) {
            assert!(
                ((ours - exact) / exact).abs() < 2e-7,
                "exp: {ours} against {exact}"
            );
        }
    }

    #[test]
    fn the_parallel_gelu_equals_candles_on_whole_tensors_and_strided_rows() {
        let wide = Tensor::randn(0f32, 4.0, (2, 300, 70), &Device::Cpu).unwrap();
        for x in [wide.clone(), wide.narrow(2, 10, 50).unwrap()] {
            let ours = gelu(&x).unwrap();
            let reference = x.gelu().unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let difference = largest_difference(&ours, &reference);
            assert!(difference < 1e-5, "{difference}");
        }
    }
}
