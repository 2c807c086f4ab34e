//! A 3×3 convolution (stride 1, padding 1) that runs on the CPU by Winograd's minimal
//! filtering F(2×2, 3×3), instead of candle's im2col.
//!
//! The FLUX autoencoder's decoder is nearly all 3×3 convolutions: about 10 TFLOP for one
//! 1024² picture when computed directly, which both candle (after this file's first version
//! removed its im2col copies) and PyTorch ran at the machine's peak. Winograd's algorithm
//! computes each 2×2 block of outputs from a 4×4 block of inputs with 16 products per channel
//! pair instead of 36: the input blocks and the kernels are transformed (`Bᵀ d B`, `G g Gᵀ`),
//! the 16 transformed positions become 16 matrix products over all channels, and the results
//! are transformed back (`Aᵀ m A`). The kernels are transformed once, at load; the picture is
//! processed a band of block rows at a time, so the transformed inputs and products stay a few
//! tens of MB whatever its size. The transforms only add and subtract, so the results match a
//! direct convolution to float rounding (the tests hold it to candle's within 1e-4). Other
//! devices and precisions use candle's own convolution.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// A 3×3, stride-1, padding-1 convolution layer with bias, loaded as candle's `conv2d`
/// (tensors `weight` `[out, in, 3, 3]` and `bias` `[out]`).
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    weight: Tensor,
    bias: Tensor,
    /// The weights per kernel offset, `[9][out][in]`, and the bias, for the CPU path.
    cpu: Arc<CpuWeights>,
}

#[derive(Debug)]
struct CpuWeights {
    /// The kernels transformed, `G g Gᵀ`: `[16][out][in]`, one matrix per position of the
    /// 4×4 transformed block.
    transformed: Vec<f32>,
    bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
}

impl Conv3x3 {
    pub fn load(
        in_channels: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_channels, in_channels, 3, 3), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        Self::new(weight, bias)
    }

    pub fn new(weight: Tensor, bias: Tensor) -> candle_core::Result<Self> {
        let (out_channels, in_channels, _, _) = weight.dims4()?;
        let kernels = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let pairs = out_channels * in_channels;
        let mut transformed = vec![0f32; 16 * pairs];
        for (pair, kernel) in kernels.chunks(9).enumerate() {
            for (position, value) in transform_kernel(kernel).into_iter().enumerate() {
                transformed[position * pairs + pair] = value;
            }
        }
        let cpu = Arc::new(CpuWeights {
            transformed,
            bias: bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            in_channels,
            out_channels,
        });
        Ok(Conv3x3 { weight, bias, cpu })
    }
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return x.apply_op1_no_bwd(&Winograd(self.cpu.clone()));
        }
        let out = x.conv2d(&self.weight, 1, 1, 1, 1)?;
        out.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

struct Winograd(Arc<CpuWeights>);

impl CustomOp1 for Winograd {
    fn name(&self) -> &'static str {
        "conv3x3-winograd"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let weights = &self.0;
        let (batch, channels, height, width) = layout.shape().dims4()?;
        if channels != weights.in_channels {
            candle_core::bail!(
                "conv3x3: input has {channels} channels, the weights take {}",
                weights.in_channels
            );
        }
        let input = match (storage, layout.contiguous_offsets()) {
            (CpuStorage::F32(values), Some((start, end))) => &values[start..end],
            (CpuStorage::F32(_), None) => {
                candle_core::bail!("conv3x3: the input is not contiguous")
            }
            _ => candle_core::bail!("conv3x3: the input is not f32"),
        };
        let plane = channels * height * width;
        let out_plane = weights.out_channels * height * width;
        let mut output = vec![0f32; batch * out_plane];
        for (image, out) in input.chunks(plane).zip(output.chunks_mut(out_plane)) {
            convolve(weights, image, height, width, out);
        }
        let shape = Shape::from((batch, weights.out_channels, height, width));
        Ok((CpuStorage::F32(output), shape))
    }
}

/// `G g Gᵀ` for a 3×3 kernel `g` (row-major), as a row-major 4×4 block, with
/// `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
fn transform_kernel(g: &[f32]) -> [f32; 16] {
    let transform = |a: f32, b: f32, c: f32| [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c];
    // G g: each column of g becomes four values.
    let mut columns = [[0f32; 4]; 3];
    for (column, out) in columns.iter_mut().enumerate() {
        *out = transform(g[column], g[3 + column], g[6 + column]);
    }
    // (G g) Gᵀ: each row of G g becomes four values.
    let mut block = [0f32; 16];
    for row in 0..4 {
        let values = transform(columns[0][row], columns[1][row], columns[2][row]);
        block[4 * row..4 * row + 4].copy_from_slice(&values);
    }
    block
}

/// `Bᵀ d B` of a 4×4 input block `d`, with `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0],
/// [0, 1, 0, −1]]`; one direction of it is this function, applied to rows then columns.
#[inline(always)]
fn transform_input(d: [f32; 4]) -> [f32; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// One direction of `Aᵀ m A`, `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`: four values to two.
#[inline(always)]
fn transform_output(m: [f32; 4]) -> [f32; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// Transformed blocks handled at once: whole rows of blocks, at least this many blocks.
const BAND_BLOCKS: usize = 2048;

/// One image `[in, h, w]` into `out` `[out, h, w]`.
fn convolve(weights: &CpuWeights, image: &[f32], height: usize, width: usize, out: &mut [f32]) {
    let (inputs, outputs) = (weights.in_channels, weights.out_channels);
    // 2×2 output blocks, each read from the 4×4 input block one pixel up and left of it
    // (zeros outside the picture: the padding).
    let (block_rows, block_columns) = (height.div_ceil(2), width.div_ceil(2));
    let band_rows = BAND_BLOCKS.div_ceil(block_columns).min(block_rows);
    let band_capacity = band_rows * block_columns;
    let mut transformed = vec![0f32; 16 * inputs * band_capacity];
    let mut products = vec![0f32; 16 * outputs * band_capacity];
    let parallelism = gemm::Parallelism::Rayon(rayon::current_num_threads());
    let plane = height * width;
    let out_address = out.as_mut_ptr() as usize;
    for first_row in (0..block_rows).step_by(band_rows) {
        let rows = band_rows.min(block_rows - first_row);
        let blocks = rows * block_columns;
        // Bᵀ d B of every block of the band, per input channel: [16][in][blocks].
        let transformed_address = transformed.as_mut_ptr() as usize;
        image
            .par_chunks(height * width)
            .enumerate()
            .for_each(|(channel, input)| {
                // SAFETY: each channel writes its own rows of `transformed`, which outlives
                // the loop: row (position, channel) is `blocks` values from its start.
                let destination = |position: usize, block_row: usize| unsafe {
                    let start = (position * inputs + channel) * band_capacity
                        + (block_row - first_row) * block_columns;
                    std::slice::from_raw_parts_mut(
                        (transformed_address as *mut f32).add(start),
                        block_columns,
                    )
                };
                let mut scratch = InputScratch::new(block_columns);
                for block_row in first_row..first_row + rows {
                    scratch.transform_rows(input, width, block_row);
                    for column in 0..4 {
                        let [x0, x1, x2, x3] = scratch.column(column);
                        let [d0, d1, d2, d3] =
                            [0, 1, 2, 3].map(|i| destination(4 * i + column, block_row));
                        for b in 0..block_columns {
                            [d0[b], d1[b], d2[b], d3[b]] =
                                transform_input([x0[b], x1[b], x2[b], x3[b]]);
                        }
                    }
                }
            });
        for position in 0..16 {
            let kernel = &weights.transformed[position * outputs * inputs..][..outputs * inputs];
            let input = &transformed[position * inputs * band_capacity..];
            let product = &mut products[position * outputs * band_capacity..];
            // SAFETY: dst is [outputs, blocks] with row stride band_capacity; lhs is
            // [outputs, inputs] row-major; rhs is [inputs, blocks] with row stride
            // band_capacity; all within their buffers.
            unsafe {
                gemm::gemm(
                    outputs,
                    blocks,
                    inputs,
                    product.as_mut_ptr(),
                    1,
                    band_capacity as isize,
                    false,
                    kernel.as_ptr(),
                    1,
                    inputs as isize,
                    input.as_ptr(),
                    1,
                    band_capacity as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        // Aᵀ m A of every block, plus the bias, into the output planes.
        let products = &products;
        (0..outputs).into_par_iter().for_each(|channel| {
            let bias = weights.bias[channel];
            // SAFETY: each channel writes only its own plane of `out`, which outlives the loop.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    (out_address as *mut f32).add(channel * plane),
                    plane,
                )
            };
            // Aᵀ m of every block of a row, `[row of Aᵀ m][column][block]`.
            let mut halves: [[Vec<f32>; 4]; 2] =
                std::array::from_fn(|_| std::array::from_fn(|_| vec![0f32; block_columns]));
            let mut line = vec![0f32; 2 * block_columns];
            for block_row in first_row..first_row + rows {
                let at = |position: usize| {
                    let start = (position * outputs + channel) * band_capacity
                        + (block_row - first_row) * block_columns;
                    &products[start..start + block_columns]
                };
                // Aᵀ m: each column of every block's 4×4 m becomes two values.
                let [upper, lower] = &mut halves;
                for (column, (upper, lower)) in upper.iter_mut().zip(lower).enumerate() {
                    let (m0, m1, m2, m3) =
                        (at(column), at(4 + column), at(8 + column), at(12 + column));
                    for b in 0..block_columns {
                        [upper[b], lower[b]] = transform_output([m0[b], m1[b], m2[b], m3[b]]);
                    }
                }
                // (Aᵀ m) A: each of the two rows becomes two output pixels per block.
                for (i, [c0, c1, c2, c3]) in halves.iter().enumerate() {
                    let y = 2 * block_row + i;
                    if y >= height {
                        continue;
                    }
                    for (b, pixels) in line.chunks_exact_mut(2).enumerate() {
                        let [left, right] = transform_output([c0[b], c1[b], c2[b], c3[b]]);
                        pixels[0] = left + bias;
                        pixels[1] = right + bias;
                    }
                    out[y * width..(y + 1) * width].copy_from_slice(&line[..width]);
                }
            }
        });
    }
}

/// A channel's working rows for the input transform of one row of blocks.
struct InputScratch {
    /// The even and odd columns of one input row, from one column left of the picture.
    even: Vec<f32>,
    odd: Vec<f32>,
    /// `d B` for the block row: for each of the 4 input rows and 4 transformed columns, one
    /// value per block, `[row][column][block]`.
    rows: Vec<f32>,
    blocks: usize,
}

impl InputScratch {
    fn new(blocks: usize) -> Self {
        InputScratch {
            even: vec![0f32; blocks + 1],
            odd: vec![0f32; blocks + 1],
            rows: vec![0f32; 16 * blocks],
            blocks,
        }
    }

    /// `d B` of every block of block row `block_row` of a channel `input` (`width` wide),
    /// whose 4×4 blocks start one row up and one column left of their 2×2 outputs, outside the
    /// picture reading zeros. Splitting each input row into even and odd columns first makes
    /// every block's four inputs `even[b], odd[b], even[b + 1], odd[b + 1]`: contiguous
    /// loops the compiler vectorises.
    fn transform_rows(&mut self, input: &[f32], width: usize, block_row: usize) {
        let blocks = self.blocks;
        let height = input.len() / width;
        for k in 0..4 {
            // Input row 2·block_row − 1 + k, from column −1.
            let line = (2 * block_row + k)
                .checked_sub(1)
                .filter(|&y| y < height)
                .map(|y| &input[y * width..(y + 1) * width]);
            let pixel = |x: usize| line.and_then(|line| line.get(x)).copied().unwrap_or(0.0);
            for m in 0..=blocks {
                self.even[m] = if m == 0 { 0.0 } else { pixel(2 * m - 1) };
                self.odd[m] = pixel(2 * m);
            }
            let (even, odd) = (&self.even, &self.odd);
            let out = &mut self.rows[4 * k * blocks..4 * (k + 1) * blocks];
            let (t0, rest) = out.split_at_mut(blocks);
            let (t1, rest) = rest.split_at_mut(blocks);
            let (t2, t3) = rest.split_at_mut(blocks);
            for b in 0..blocks {
                [t0[b], t1[b], t2[b], t3[b]] =
                    transform_input([even[b], odd[b], even[b + 1], odd[b + 1]]);
            }
        }
    }

    /// Transformed column `column` of every block, from the four input rows.
    fn column(&self, column: usize) -> [&[f32]; 4] {
        let blocks = self.blocks;
        [0, 1, 2, 3].map(|k| &self.rows[(4 * k + column) * blocks..][..blocks])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::test_support::largest_difference;

    #[test]
    fn it_equals_candles_convolution_with_bias() {
        let device = Device::Cpu;
        for (batch, inputs, outputs, height, width) in
            [(1, 3, 5, 7, 9), (2, 8, 4, 16, 5), (1, 32, 32, 1, 1)]
        {
            let x = Tensor::randn(0f32, 1.0, (batch, inputs, height, width), &device).unwrap();
            let weight = Tensor::randn(0f32, 0.2, (outputs, inputs, 3, 3), &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, outputs, &device).unwrap();
            let expected = x
                .conv2d(&weight, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, outputs, 1, 1)).unwrap())
                .unwrap();
            let ours = Conv3x3::new(weight, bias).unwrap().forward(&x).unwrap();
            assert_eq!(ours.dims(), expected.dims());
            let difference = largest_difference(&ours, &expected);
            assert!(
                difference < 1e-4,
                "{batch}×{inputs}→{outputs}, {height}×{width}: {difference}"
            );
        }
    }
}
