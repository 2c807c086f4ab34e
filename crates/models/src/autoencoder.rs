//! The KL autoencoder FLUX and SD3 share (the latent-diffusion layout: `encoder.down.N`,
//! `decoder.up.N`, 16 latent channels), run by Flowline's own networks
//! ([`crate::autoencoder_networks`], faster on the CPU than candle-transformers'), with each
//! family's latent normalisation `(z − shift) · scale` applied here.
//!
//! Sizes (base width, levels, channel multipliers, residual blocks) come from the tensor
//! shapes. It runs at f32 whatever the model's precision: it is small (84 M parameters, a few
//! hundred MiB), half precision costs its convolutions visible detail, and candle's CPU matmul
//! has no bf16 path for its attention block.

use candle_core::{DType, Device, Tensor};
use candle_nn::Module;
use candle_transformers::models::flux::autoencoder::Config;

use crate::autoencoder_networks::{Decoder, Encoder};
use crate::checkpoint::Piece;
use flowline_engine::error::InputError;

/// The precision the autoencoder runs at.
pub const DTYPE: DType = DType::F32;
/// Latent channels of the FLUX and SD3 autoencoders; their preview factors are for these.
pub const LATENT_CHANNELS: usize = 16;

/// A loaded autoencoder with its family's latent normalisation.
pub struct LatentAutoencoder {
    encoder: Encoder,
    decoder: Decoder,
    scale: f64,
    shift: f64,
    /// Image pixels per latent position along each side.
    pub downsample: usize,
}

impl LatentAutoencoder {
    /// Loads the autoencoder in `piece`, normalising latents as `(z − shift) · scale`.
    pub fn load(
        piece: &Piece,
        scale: f64,
        shift: f64,
        device: &Device,
    ) -> anyhow::Result<LatentAutoencoder> {
        let config = config(piece, scale, shift)?;
        let vb = piece.var_builder(DTYPE, device)?;
        let encoder = Encoder::load(&config, vb.pp("encoder")).map_err(|e| piece.load_error(e))?;
        let decoder = Decoder::load(&config, vb.pp("decoder")).map_err(|e| piece.load_error(e))?;
        Ok(LatentAutoencoder {
            encoder,
            decoder,
            scale,
            shift,
            downsample: 1 << (config.ch_mult.len() - 1),
        })
    }

    /// A `[1, 16, h, w]` normalised latent as a `[3, H, W]` image in [0, 1]. A latent wider or
    /// taller than [`TILE`] is decoded in overlapping tiles (see [`tiled`]).
    pub fn decode(&self, latent: &Tensor) -> anyhow::Result<Tensor> {
        let z = ((latent.to_dtype(DTYPE)? / self.scale)? + self.shift)?;
        let image = tiled(&z, TILE, TILE_OVERLAP, self.downsample as f64, |tile| {
            Ok(self.decoder.forward(tile)?)
        })?;
        Ok(((image + 1.0)? / 2.0)?.clamp(0f32, 1f32)?.squeeze(0)?)
    }

    /// A `[3, H, W]` image in [0, 1] on `device` as a `[1, 16, h, w]` normalised latent. An
    /// image wider or taller than [`TILE`] latent positions is encoded in overlapping tiles.
    pub fn encode(&self, image: &Tensor) -> anyhow::Result<Tensor> {
        let pixels = ((image.to_dtype(DTYPE)? * 2.0)? - 1.0)?.unsqueeze(0)?;
        let ratio = self.downsample;
        // The encoder gives mean and log-variance; the mean is the latent (no sampling, so an
        // image always encodes the same way).
        let mean = tiled(
            &pixels,
            TILE * ratio,
            TILE_OVERLAP * ratio,
            1.0 / ratio as f64,
            |tile| Ok(self.encoder.forward(tile)?.narrow(1, 0, LATENT_CHANNELS)?),
        )?;
        Ok(((mean - self.shift)? * self.scale)?)
    }
}

/// The largest latent side the autoencoder takes in one piece (1024 pixels): its memory grows
/// with the area, so larger images are done in tiles of this side, within a fixed budget (at
/// 1024² each 128-channel activation of the full-size FLUX autoencoder is 512 MiB at f32, and
/// a residual block holds a few at once). Tiles cost time: their overlaps are computed twice,
/// and 1024² in 512² tiles decoded 2.25 times the pixels, so a tile is as large as the budget
/// allows.
pub const TILE: usize = 128;
/// How far neighbouring tiles overlap, in latent positions: over the overlap the two are
/// blended linearly, so no seam shows where group norms and attention saw different tiles.
pub const TILE_OVERLAP: usize = 16;

/// `f` applied to `[1, C, h, w]` input `x` in square tiles of side `tile` overlapping by
/// `overlap`, the outputs (`scale` times the input's side) blended linearly over the overlaps;
/// `f` of the whole input where it fits one tile. For a local `f` the result is `f(x)`.
pub fn tiled(
    x: &Tensor,
    tile: usize,
    overlap: usize,
    scale: f64,
    f: impl Fn(&Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    if height <= tile && width <= tile {
        return f(x);
    }
    let scaled = |n: usize| (n as f64 * scale).round() as usize;
    let (rows, columns) = (
        tile_starts(height, tile, overlap),
        tile_starts(width, tile, overlap),
    );
    let mut sum: Option<Tensor> = None;
    let mut weights: Option<Tensor> = None;
    for &top in &rows {
        for &left in &columns {
            let (h, w) = (tile.min(height), tile.min(width));
            let out = f(&x.narrow(2, top, h)?.narrow(3, left, w)?)?;
            let (_, _, out_h, out_w) = out.dims4()?;
            let ramp = |length: usize, start: usize, end_of_input: usize, side: usize| {
                blend_ramp(
                    length,
                    scaled(overlap),
                    start > 0,
                    start + side < end_of_input,
                )
            };
            let weight_y = ramp(out_h, top, height, h);
            let weight_x = ramp(out_w, left, width, w);
            let weight = Tensor::from_vec(weight_y, (out_h, 1), out.device())?
                .broadcast_mul(&Tensor::from_vec(weight_x, (1, out_w), out.device())?)?
                .to_dtype(out.dtype())?;
            let (full_h, full_w) = (scaled(height), scaled(width));
            let (pad_top, pad_left) = (scaled(top), scaled(left));
            let place = |t: &Tensor| -> candle_core::Result<Tensor> {
                t.pad_with_zeros(2, pad_top, full_h - pad_top - out_h)?
                    .pad_with_zeros(3, pad_left, full_w - pad_left - out_w)
            };
            let weighted = place(&out.broadcast_mul(&weight.reshape((1, 1, out_h, out_w))?)?)?;
            let weight = place(&weight.reshape((1, 1, out_h, out_w))?)?;
            sum = Some(match sum {
                Some(total) => (total + weighted)?,
                None => weighted,
            });
            weights = Some(match weights {
                Some(total) => (total + weight)?,
                None => weight,
            });
        }
    }
    let (sum, weights) = (
        sum.expect("at least one tile"),
        weights.expect("at least one tile"),
    );
    Ok(sum.broadcast_div(&weights)?)
}

/// Where the tiles along a side of `length` start: `tile` apart less `overlap`, the last one
/// flush with the end.
fn tile_starts(length: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if length <= tile {
        return vec![0];
    }
    let stride = tile - overlap;
    let mut starts: Vec<usize> = (0..length - tile).step_by(stride).collect();
    starts.push(length - tile);
    starts
}

/// A tile's weights along one side of `length` outputs: rising linearly over the first
/// `overlap` where a tile comes before it, falling over the last where one comes after, 1
/// between. Never 0, so every output has weight.
fn blend_ramp(length: usize, overlap: usize, rises: bool, falls: bool) -> Vec<f32> {
    (0..length)
        .map(|i| {
            let from_start = (i + 1) as f32 / (overlap + 1) as f32;
            let from_end = (length - i) as f32 / (overlap + 1) as f32;
            let mut weight = 1f32;
            if rises {
                weight = weight.min(from_start);
            }
            if falls {
                weight = weight.min(from_end);
            }
            weight
        })
        .collect()
}

/// Checks that `piece` makes 16-channel latents, as FLUX's and SD3's autoencoders do.
pub fn check_latent_channels(piece: &Piece, family: &str) -> Result<(), InputError> {
    let name = "decoder.conv_in.weight";
    if piece.dim(name, 4, 1)? != LATENT_CHANNELS {
        return Err(piece.shape_error(
            name,
            &format!("{LATENT_CHANNELS} latent channels (a {family} autoencoder)"),
            piece.shape(name)?,
        ));
    }
    Ok(())
}

/// The configuration, from the tensor shapes in `piece`.
fn config(piece: &Piece, scale: f64, shift: f64) -> anyhow::Result<Config> {
    let ch = piece.dim("encoder.conv_in.weight", 4, 0)?;
    let levels = piece.count_blocks("encoder.down");
    if levels == 0 {
        piece.shape("encoder.down.0.block.0.conv1.weight")?;
    }
    let ch_mult = (0..levels)
        .map(|level| {
            let conv = format!("encoder.down.{level}.block.0.conv1.weight");
            Ok(piece.dim(&conv, 4, 0)? / ch)
        })
        .collect::<Result<Vec<_>, InputError>>()?;
    Ok(Config {
        resolution: 256,
        in_channels: piece.dim("encoder.conv_in.weight", 4, 1)?,
        ch,
        out_ch: piece.dim("decoder.conv_out.weight", 4, 0)?,
        ch_mult,
        num_res_blocks: piece.count_blocks("encoder.down.0.block"),
        z_channels: piece.dim("decoder.conv_in.weight", 4, 1)?,
        scale_factor: scale,
        shift_factor: shift,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::largest_difference;

    #[test]
    fn tiles_of_a_local_map_blend_back_into_the_whole() {
        let (height, width) = (TILE + 36, 2 * TILE + 12);
        let latent = Tensor::randn(0f32, 1.0, (1, 4, height, width), &Device::Cpu).unwrap();
        let upsample = |x: &Tensor| {
            let (_, _, h, w) = x.dims4()?;
            Ok(x.upsample_nearest2d(h * 8, w * 8)?)
        };
        let whole = upsample(&latent).unwrap();
        let pieced = tiled(&latent, TILE, TILE_OVERLAP, 8.0, upsample).unwrap();
        assert_eq!(pieced.dims(), whole.dims());
        assert!(largest_difference(&pieced, &whole) < 1e-5);

        let pixels = Tensor::randn(0f32, 1.0, (1, 3, 8 * height, 8 * width), &Device::Cpu).unwrap();
        let pool = |x: &Tensor| Ok(x.avg_pool2d(8)?);
        let whole = pool(&pixels).unwrap();
        let pieced = tiled(&pixels, TILE * 8, TILE_OVERLAP * 8, 1.0 / 8.0, pool).unwrap();
        assert_eq!(pieced.dims(), whole.dims());
        assert!(largest_difference(&pieced, &whole) < 1e-5);
    }

    #[test]
    fn tiles_cover_each_side_and_overlap_by_at_least_the_overlap() {
        assert_eq!(tile_starts(64, 64, 16), [0]);
        assert_eq!(tile_starts(100, 64, 16), [0, 36]);
        assert_eq!(tile_starts(160, 64, 16), [0, 48, 96]);
        let ramp = blend_ramp(8, 3, true, false);
        assert_eq!(ramp, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]);
    }
}
