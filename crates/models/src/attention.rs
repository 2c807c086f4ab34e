//! Multi-head attention for the transformers, without writing the score matrix to memory on
//! the CPU.
//!
//! candle-transformers' attention computes `softmax(QKᵀ/√d)·V` for all heads at once. At
//! 1024² FLUX attends over 4 352 tokens, so the scores are 24 × 4 352² floats (1.8 GB) that
//! one product writes, a scaling reads and writes, the softmax reads and writes and the second
//! product reads again: five trips through memory per block, with a scalar `exp` per score
//! (see [`crate::vector_math`]).
//! Here one rayon task takes one head and a block of [`QUERY_BLOCK`] queries: its scores
//! (256 × 4 352 floats, 4.5 MB) stay in cache from the first product through a vectorised
//! softmax to the product with V, and the result is written straight into the token-major
//! layout `[batch, tokens, heads·width]` that the output projection reads.
//!
//! The queries and keys are prepared the same way: [`split_heads`] takes the fused `qkv`
//! projection and, in one pass, splits it into heads, RMS-normalises queries and keys and
//! rotates them by the rotary embedding (FLUX's QK norm and RoPE), where candle-transformers
//! makes four strided copies. SD3.5's last joint block uses [`attention`] alone.
//!
//! On other devices and precisions both run the same arithmetic as candle tensor operations;
//! the tests hold the two paths to each other.

use candle_core::{CpuStorage, CustomOp3, D, DType, IndexOp, Layout, Shape, Tensor};
use candle_nn::RmsNorm;
use rayon::prelude::*;

use crate::vector_math::exp_in_place;

/// Queries per task of the CPU attention: their scores against 4 352 keys take 4.5 MB, within
/// a server CPU's L3 cache. Each task packs the head's keys and values for its products, so
/// blocks of 64 queries ran 1.2× slower than 128 and 256 (FLUX at 1024², 2 cores); 512 gained
/// another 5 % but would leave smaller caches.
pub const QUERY_BLOCK: usize = 256;

/// The learned scales of the RMS normalisation applied to each head's queries and keys.
#[derive(Debug, Clone)]
pub struct HeadNorms {
    query: RmsNorm,
    key: RmsNorm,
    /// The scales as plain vectors, for the fused CPU pass.
    query_scale: Vec<f32>,
    key_scale: Vec<f32>,
    eps: f32,
}

impl HeadNorms {
    pub fn new(query_scale: Tensor, key_scale: Tensor, eps: f64) -> candle_core::Result<Self> {
        let plain = |scale: &Tensor| scale.to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok(HeadNorms {
            query_scale: plain(&query_scale)?,
            key_scale: plain(&key_scale)?,
            query: RmsNorm::new(query_scale, eps),
            key: RmsNorm::new(key_scale, eps),
            eps: eps as f32,
        })
    }
}

/// The rotary embedding's angles for every token, as cosines and sines `[tokens, width/2]`:
/// the pair `(x₂ᵢ, x₂ᵢ₊₁)` of a head at token `t` turns by the angle at `[t, i]`.
#[derive(Debug, Clone)]
pub struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Splits a fused projection `[batch, tokens, 3·heads·width]` (whose rows may be a strided
/// view, as FLUX's single blocks make) into queries, keys and values, each
/// `[batch, heads, tokens, width]`, with queries and keys RMS-normalised and rotated.
pub fn split_heads(
    qkv: &Tensor,
    heads: usize,
    norms: &HeadNorms,
    rotary: &Rotary,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let fused = qkv.device().is_cpu()
        && qkv.dtype() == DType::F32
        && rotary.cos.dtype() == DType::F32
        && rotary.sin.dtype() == DType::F32;
    if !fused {
        return split_heads_by_tensor_operations(qkv, heads, norms, rotary);
    }
    let split = qkv.apply_op3_no_bwd(
        &rotary.cos.contiguous()?,
        &rotary.sin.contiguous()?,
        &SplitHeads {
            heads,
            query_scale: &norms.query_scale,
            key_scale: &norms.key_scale,
            eps: norms.eps,
        },
    )?;
    Ok((split.i(0)?, split.i(1)?, split.i(2)?))
}

/// [`split_heads`] as candle operations, for any device and precision.
fn split_heads_by_tensor_operations(
    qkv: &Tensor,
    heads: usize,
    norms: &HeadNorms,
    rotary: &Rotary,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (batch, tokens, _) = qkv.dims3()?;
    let qkv = qkv.reshape((batch, tokens, 3, heads, ()))?;
    let part = |index: usize| qkv.i((.., .., index))?.transpose(1, 2)?.contiguous();
    let (cos, sin) = (
        rotary.cos.to_dtype(qkv.dtype())?,
        rotary.sin.to_dtype(qkv.dtype())?,
    );
    let rotate = |x: Tensor| candle_nn::rotary_emb::rope_i(&x.contiguous()?, &cos, &sin);
    Ok((
        rotate(part(0)?.apply(&norms.query)?)?,
        rotate(part(1)?.apply(&norms.key)?)?,
        part(2)?,
    ))
}

struct SplitHeads<'a> {
    heads: usize,
    query_scale: &'a [f32],
    key_scale: &'a [f32],
    eps: f32,
}

impl CustomOp3 for SplitHeads<'_> {
    fn name(&self) -> &'static str {
        "split-heads-qk-norm-rope"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, tokens, fused) = qkv_layout.shape().dims3()?;
        let heads = self.heads;
        let width = fused / (3 * heads);
        if fused != 3 * heads * width || width % 2 == 1 || self.query_scale.len() != width {
            candle_core::bail!(
                "split heads: {fused} values per token are not 3 × {heads} heads of width {}",
                self.query_scale.len()
            );
        }
        let [batch_stride, token_stride, 1] = qkv_layout.stride() else {
            candle_core::bail!("split heads: the projection's rows must be contiguous");
        };
        let (batch_stride, token_stride) = (*batch_stride, *token_stride);
        let (CpuStorage::F32(qkv), CpuStorage::F32(cos), CpuStorage::F32(sin)) = (qkv, cos, sin)
        else {
            candle_core::bail!("split heads: the fused path takes f32");
        };
        let qkv = &qkv[qkv_layout.start_offset()..];
        let pairs = width / 2;
        let angles = |storage: &'_ [f32], layout: &Layout| -> candle_core::Result<Vec<f32>> {
            if layout.shape().dims() != [tokens, pairs] {
                candle_core::bail!(
                    "split heads: rotary angles {:?} for {tokens} tokens of width {width}",
                    layout.shape()
                );
            }
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("rotary angles not contiguous".into()))?;
            Ok(storage[start..end].to_vec())
        };
        let (cos, sin) = (angles(cos, cos_layout)?, angles(sin, sin_layout)?);
        let plane = tokens * width;
        let mut out = vec![0f32; 3 * batch * heads * plane];
        out.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(index, plane)| {
                let (part, rest) = (index / (batch * heads), index % (batch * heads));
                let (b, head) = (rest / heads, rest % heads);
                let scale = match part {
                    0 => Some(self.query_scale),
                    1 => Some(self.key_scale),
                    _ => None,
                };
                let column = (part * heads + head) * width;
                for (token, row) in plane.chunks_mut(width).enumerate() {
                    let start = b * batch_stride + token * token_stride + column;
                    let source = &qkv[start..start + width];
                    let Some(scale) = scale else {
                        row.copy_from_slice(source);
                        continue;
                    };
                    let mean_square = source.iter().map(|x| x * x).sum::<f32>() / width as f32;
                    let inverse = 1.0 / (mean_square + self.eps).sqrt();
                    let turns = token * pairs..(token + 1) * pairs;
                    for (((pair, out), (&cos, &sin)), scale) in source
                        .chunks(2)
                        .zip(row.chunks_mut(2))
                        .zip(cos[turns.clone()].iter().zip(&sin[turns]))
                        .zip(scale.chunks(2))
                    {
                        let x0 = pair[0] * inverse * scale[0];
                        let x1 = pair[1] * inverse * scale[1];
                        out[0] = x0 * cos - x1 * sin;
                        out[1] = x0 * sin + x1 * cos;
                    }
                }
            });
        Ok((
            CpuStorage::F32(out),
            Shape::from((3, batch, heads, tokens, width)),
        ))
    }
}

/// `softmax(q·kᵀ/√width)·v` for queries `[batch, heads, queries, width]` and keys and values
/// `[batch, heads, keys, width]`, returned token-major as `[batch, queries, heads·width]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let fused = q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if !fused {
        return attention_by_tensor_operations(q, k, v);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3_no_bwd(&k, &v, &BlockedAttention)
}

/// [`attention`] as candle operations, for any device and precision.
fn attention_by_tensor_operations(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores)?
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .flatten_from(2)
}

struct BlockedAttention;

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, heads, queries, width) = q_layout.shape().dims4()?;
        let keys = k_layout.shape().dims4()?.2;
        if k_layout.shape().dims() != [batch, heads, keys, width]
            || v_layout.shape() != k_layout.shape()
        {
            candle_core::bail!(
                "attention: queries {:?}, keys {:?} and values {:?} do not match",
                q_layout.shape(),
                k_layout.shape(),
                v_layout.shape()
            );
        }
        let (q, k, v) = (
            contiguous_f32(q, q_layout)?,
            contiguous_f32(k, k_layout)?,
            contiguous_f32(v, v_layout)?,
        );
        let row = heads * width;
        let mut out = vec![0f32; batch * queries * row];
        let blocks = queries.div_ceil(QUERY_BLOCK);
        let scale = 1.0 / (width as f32).sqrt();
        // Each task writes its block's rows of one head: disjoint column ranges of the shared
        // output, so the pointer is passed as an address.
        let out_address = out.as_mut_ptr() as usize;
        (0..batch * heads * blocks)
            .into_par_iter()
            .for_each(|task| {
                let (pair, block) = (task / blocks, task % blocks);
                let (b, head) = (pair / heads, pair % heads);
                let first = block * QUERY_BLOCK;
                let count = QUERY_BLOCK.min(queries - first);
                let head_keys = &k[pair * keys * width..(pair + 1) * keys * width];
                let head_values = &v[pair * keys * width..(pair + 1) * keys * width];
                let block_queries = &q[(pair * queries + first) * width..][..count * width];
                let mut scores = vec![0f32; count * keys];
                // SAFETY: scores is [count, keys] row-major; the queries are [count, width]
                // row-major; kᵀ[i][j] = head_keys[j·width + i]. All within their slices.
                unsafe {
                    gemm::gemm(
                        count,
                        keys,
                        width,
                        scores.as_mut_ptr(),
                        1,
                        keys as isize,
                        false,
                        block_queries.as_ptr(),
                        1,
                        width as isize,
                        head_keys.as_ptr(),
                        width as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                let sums: Vec<f32> = scores.chunks_mut(keys).map(exponentiate_row).collect();
                let out_start = (b * queries + first) * row + head * width;
                // SAFETY: the destination is `count` rows of `width` values with stride `row`,
                // starting at this task's block and head: inside `out`, and no other task writes
                // these values. `out` outlives the parallel loop.
                unsafe {
                    let destination = (out_address as *mut f32).add(out_start);
                    gemm::gemm(
                        count,
                        width,
                        keys,
                        destination,
                        1,
                        row as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        keys as isize,
                        head_values.as_ptr(),
                        1,
                        width as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                    for (index, sum) in sums.iter().enumerate() {
                        let line =
                            std::slice::from_raw_parts_mut(destination.add(index * row), width);
                        line.iter_mut().for_each(|value| *value /= sum);
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((batch, queries, row))))
    }
}

/// The values of a contiguous f32 tensor.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&values[start..end]),
        _ => candle_core::bail!("attention: the fused path takes contiguous f32"),
    }
}

/// Replaces a row of scores by `exp(score − max)` and returns their sum: the softmax's
/// numerators and denominator, the division left to the (shorter) output row.
fn exponentiate_row(row: &mut [f32]) -> f32 {
    let max = lane_fold(row, f32::NEG_INFINITY, f32::max);
    row.iter_mut().for_each(|value| *value -= max);
    exp_in_place(row);
    lane_fold(row, 0.0, |a, b| a + b)
}

/// Folds a slice eight lanes at a time, so the compiler keeps the lanes in vector registers.
#[inline(always)]
fn lane_fold(values: &[f32], start: f32, combine: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [start; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane = combine(*lane, value);
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(start, |a, &b| combine(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::test_support::largest_difference;

    fn random(shape: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn blocked_attention_equals_the_materialised_softmax() {
        // More queries than one block, a block that is cut short, and keys of another count.
        for (batch, heads, queries, keys, width) in
            [(1, 3, QUERY_BLOCK * 2 + 17, 300, 16), (2, 2, 5, 5, 8)]
        {
            let q = random(&[batch, heads, queries, width], 1.5);
            let k = random(&[batch, heads, keys, width], 1.5);
            let v = random(&[batch, heads, keys, width], 1.0);
            let ours = attention(&q, &k, &v).unwrap();
            let reference = attention_by_tensor_operations(&q, &k, &v).unwrap();
            assert_eq!(ours.dims(), [batch, queries, heads * width]);
            let difference = largest_difference(&ours, &reference);
            assert!(difference < 1e-5, "{queries}×{keys}: {difference}");
        }
    }

    #[test]
    fn the_fused_head_split_equals_the_tensor_operations() {
        let (batch, tokens, heads, width) = (2, 7, 3, 8);
        let wide = random(&[batch, tokens, 3 * heads * width + 5], 2.0);
        // A strided view, as FLUX's single blocks pass: the rows carry 5 more values.
        let qkv = wide.narrow(2, 0, 3 * heads * width).unwrap();
        let norms = HeadNorms::new(random(&[width], 1.0), random(&[width], 1.0), 1e-6).unwrap();
        let angles = random(&[tokens, width / 2], 3.0);
        let rotary = Rotary {
            cos: angles.cos().unwrap(),
            sin: angles.sin().unwrap(),
        };
        let ours = split_heads(&qkv, heads, &norms, &rotary).unwrap();
        let reference = split_heads_by_tensor_operations(&qkv, heads, &norms, &rotary).unwrap();
        for (ours, reference) in [
            (ours.0, reference.0),
            (ours.1, reference.1),
            (ours.2, reference.2),
        ] {
            assert_eq!(ours.dims(), [batch, heads, tokens, width]);
            assert!(ours.is_contiguous());
            let difference = largest_difference(&ours, &reference);
            assert!(difference < 1e-5, "{difference}");
        }
    }
}
