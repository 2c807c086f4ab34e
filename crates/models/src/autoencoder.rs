//! The KL autoencoder FLUX and SD3 share (the latent-diffusion layout: `encoder.down.N`,
//! `decoder.up.N`, 16 latent channels), run by candle-transformers' implementation, with each
//! family's latent normalisation `(z − shift) · scale` applied here.
//!
//! Sizes (base width, levels, channel multipliers, residual blocks) come from the tensor
//! shapes. It runs at f32 whatever the model's precision: it is small (84 M parameters, a few
//! hundred MiB), half precision costs its convolutions visible detail, and candle's CPU matmul
//! has no bf16 path for its attention block.

use candle_core::{DType, Device, Tensor};
use candle_nn::Module;
use candle_transformers::models::flux::autoencoder::{Config, Decoder, Encoder};

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
        let encoder = Encoder::new(&config, vb.pp("encoder")).map_err(|e| piece.load_error(e))?;
        let decoder = Decoder::new(&config, vb.pp("decoder")).map_err(|e| piece.load_error(e))?;
        Ok(LatentAutoencoder {
            encoder,
            decoder,
            scale,
            shift,
            downsample: 1 << (config.ch_mult.len() - 1),
        })
    }

    /// A `[1, 16, h, w]` normalised latent as a `[3, H, W]` image in [0, 1].
    pub fn decode(&self, latent: &Tensor) -> anyhow::Result<Tensor> {
        let z = ((latent.to_dtype(DTYPE)? / self.scale)? + self.shift)?;
        let image = self.decoder.forward(&z)?;
        Ok(((image + 1.0)? / 2.0)?.clamp(0f32, 1f32)?.squeeze(0)?)
    }

    /// A `[3, H, W]` image in [0, 1] on `device` as a `[1, 16, h, w]` normalised latent.
    pub fn encode(&self, image: &Tensor) -> anyhow::Result<Tensor> {
        let pixels = ((image.to_dtype(DTYPE)? * 2.0)? - 1.0)?.unsqueeze(0)?;
        // The encoder gives mean and log-variance; the mean is the latent (no sampling, so an
        // image always encodes the same way).
        let moments = self.encoder.forward(&pixels)?;
        let mean = moments.narrow(1, 0, LATENT_CHANNELS)?;
        Ok(((mean - self.shift)? * self.scale)?)
    }
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
