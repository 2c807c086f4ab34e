//! The KL autoencoder's encoder and decoder networks, in the latent-diffusion layout FLUX and
//! SD3 share: `conv_in`; levels of residual blocks, going down with strided convolutions or up
//! with nearest-neighbour upsampling; a middle of two residual blocks around self-attention;
//! `norm_out`, `conv_out`. They are written here rather than taken from candle-transformers so
//! that their 3×3 convolutions, nearly all of the time, run as [`Conv3x3`], and their
//! self-attention as the transformers' blocked [`attention`], which never holds the score
//! matrix: at 1024² that is 16 384² floats (1 GiB), and softmax wrote a second.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Conv2d, VarBuilder, conv2d};
use candle_transformers::models::flux::autoencoder::Config;

use crate::attention::attention;
use crate::conv::Conv3x3;
use crate::group_norm::GroupNormSwish;
use crate::pointwise::Conv1x1;

const GROUPS: usize = 32;
const EPS: f64 = 1e-6;

/// The group norm and SiLU before a convolution.
fn norm_swish(channels: usize, vb: VarBuilder) -> Result<GroupNormSwish> {
    GroupNormSwish::load(GROUPS, channels, EPS, true, vb)
}

struct ResidualBlock {
    norm1: GroupNormSwish,
    conv1: Conv3x3,
    norm2: GroupNormSwish,
    conv2: Conv3x3,
    /// A 1×1 convolution where the block changes the channel count.
    shortcut: Option<Conv1x1>,
}

impl ResidualBlock {
    fn load(inputs: usize, outputs: usize, vb: VarBuilder) -> Result<Self> {
        Ok(ResidualBlock {
            norm1: norm_swish(inputs, vb.pp("norm1"))?,
            conv1: Conv3x3::load(inputs, outputs, vb.pp("conv1"))?,
            norm2: norm_swish(outputs, vb.pp("norm2"))?,
            conv2: Conv3x3::load(outputs, outputs, vb.pp("conv2"))?,
            shortcut: (inputs != outputs)
                .then(|| Conv1x1::load(inputs, outputs, vb.pp("nin_shortcut")))
                .transpose()?,
        })
    }

    /// A level's `count` blocks, `block.0` to `block.{count − 1}` under `vb`: the first from
    /// `inputs` channels to `outputs`, the rest at `outputs`.
    fn load_level(
        inputs: usize,
        outputs: usize,
        count: usize,
        vb: &VarBuilder,
    ) -> Result<Vec<Self>> {
        (0..count)
            .map(|block| {
                let inputs = if block == 0 { inputs } else { outputs };
                ResidualBlock::load(inputs, outputs, vb.pp(format!("block.{block}")))
            })
            .collect()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Assigned, not shadowed, so that each intermediate is freed as soon as the next
        // exists: at 1024² each is 512 MiB or more.
        let mut h = self.conv1.forward(&self.norm1.forward(x)?)?;
        h = self.norm2.forward(&h)?;
        h = self.conv2.forward(&h)?;
        match &self.shortcut {
            Some(shortcut) => shortcut.forward_plus(x, &h),
            None => x + h,
        }
    }
}

/// Single-head self-attention over every latent position, with 1×1 convolutions for the
/// projections.
struct Attention {
    norm: GroupNormSwish,
    q: Conv1x1,
    k: Conv1x1,
    v: Conv1x1,
    out: Conv1x1,
}

impl Attention {
    fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        let projection = |name| Conv1x1::load(channels, channels, vb.pp(name));
        Ok(Attention {
            norm: GroupNormSwish::load(GROUPS, channels, EPS, false, vb.pp("norm"))?,
            q: projection("q")?,
            k: projection("k")?,
            v: projection("v")?,
            out: projection("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // [B, C, H, W] → [B, 1 head, HW, C]
        let tokens = |conv: &Conv1x1| {
            conv.forward(&normed)?
                .flatten_from(2)?
                .transpose(1, 2)?
                .unsqueeze(1)
        };
        let (q, k, v) = (tokens(&self.q)?, tokens(&self.k)?, tokens(&self.v)?);
        // [B, HW, C] → [B, C, H, W]
        let attended = attention(&q, &k, &v)?
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        self.out.forward_plus(&attended, x)
    }
}

struct DownLevel {
    blocks: Vec<ResidualBlock>,
    /// Halves the side (a 3×3 convolution of stride 2 after padding right and bottom); the
    /// last level has none.
    downsample: Option<Conv2d>,
}

/// The encoder: `[B, 3, H, W]` in about [−1, 1] to `[B, 2z, h, w]`, the latent's mean and log
/// variance.
pub struct Encoder {
    conv_in: Conv3x3,
    /// From the shallowest level (largest side) to the deepest.
    levels: Vec<DownLevel>,
    middle: Middle,
    norm_out: GroupNormSwish,
    conv_out: Conv3x3,
}

impl Encoder {
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let widths: Vec<usize> = config.ch_mult.iter().map(|m| config.ch * m).collect();
        let mut channels = config.ch;
        let conv_in = Conv3x3::load(config.in_channels, channels, vb.pp("conv_in"))?;
        let mut levels = Vec::new();
        for (level, &width) in widths.iter().enumerate() {
            let vb = vb.pp(format!("down.{level}"));
            let blocks = ResidualBlock::load_level(channels, width, config.num_res_blocks, &vb)?;
            channels = width;
            let strided = candle_nn::Conv2dConfig {
                stride: 2,
                ..Default::default()
            };
            let downsample = (level + 1 < widths.len())
                .then(|| conv2d(channels, channels, 3, strided, vb.pp("downsample.conv")))
                .transpose()?;
            levels.push(DownLevel { blocks, downsample });
        }
        Ok(Encoder {
            conv_in,
            levels,
            middle: Middle::load(channels, &vb)?,
            norm_out: norm_swish(channels, vb.pp("norm_out"))?,
            conv_out: Conv3x3::load(channels, 2 * config.z_channels, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.levels {
            for block in &level.blocks {
                h = block.forward(&h)?;
            }
            if let Some(conv) = &level.downsample {
                let padded = h
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
                h = conv.forward(&padded)?;
            }
        }
        h = self.middle.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward(&h)?)
    }
}

/// Two residual blocks around self-attention, at the deepest level.
struct Middle(ResidualBlock, Attention, ResidualBlock);

impl Middle {
    fn load(channels: usize, vb: &VarBuilder) -> Result<Self> {
        Ok(Middle(
            ResidualBlock::load(channels, channels, vb.pp("mid.block_1"))?,
            Attention::load(channels, vb.pp("mid.attn_1"))?,
            ResidualBlock::load(channels, channels, vb.pp("mid.block_2"))?,
        ))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.2.forward(&self.1.forward(&self.0.forward(x)?)?)
    }
}

struct UpLevel {
    blocks: Vec<ResidualBlock>,
    /// Doubles the side, then a 3×3 convolution; the last level has none.
    upsample: Option<Conv3x3>,
}

/// The decoder: a `[B, z, h, w]` latent (already un-normalised) to `[B, 3, H, W]` in about
/// [−1, 1].
pub struct Decoder {
    conv_in: Conv3x3,
    middle: Middle,
    /// From the deepest level (smallest side) to the shallowest.
    levels: Vec<UpLevel>,
    norm_out: GroupNormSwish,
    conv_out: Conv3x3,
}

impl Decoder {
    pub fn load(config: &Config, vb: VarBuilder) -> Result<Self> {
        let widths: Vec<usize> = config.ch_mult.iter().map(|m| config.ch * m).collect();
        let mut channels = *widths.last().unwrap_or(&config.ch);
        let conv_in = Conv3x3::load(config.z_channels, channels, vb.pp("conv_in"))?;
        let middle = Middle::load(channels, &vb)?;
        let mut levels = Vec::new();
        for (level, &width) in widths.iter().enumerate().rev() {
            let vb = vb.pp(format!("up.{level}"));
            let blocks =
                ResidualBlock::load_level(channels, width, config.num_res_blocks + 1, &vb)?;
            channels = width;
            let upsample = (level > 0)
                .then(|| Conv3x3::load(channels, channels, vb.pp("upsample.conv")))
                .transpose()?;
            levels.push(UpLevel { blocks, upsample });
        }
        Ok(Decoder {
            conv_in,
            middle,
            levels,
            norm_out: norm_swish(channels, vb.pp("norm_out"))?,
            conv_out: Conv3x3::load(channels, config.out_ch, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.middle.forward(&self.conv_in.forward(z)?)?;
        for level in &self.levels {
            for block in &level.blocks {
                h = block.forward(&h)?;
            }
            if let Some(conv) = &level.upsample {
                let (_, _, height, width) = h.dims4()?;
                h = conv.forward(&h.upsample_nearest2d(2 * height, 2 * width)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&h)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::test_support::largest_difference;

    /// The largest difference between `ours` and `reference`, and the reference's largest
    /// magnitude.
    fn compare(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
        let zero = reference.zeros_like().unwrap();
        (
            largest_difference(ours, reference),
            largest_difference(reference, &zero),
        )
    }

    #[test]
    fn they_encode_and_decode_as_candle_transformers_networks_do() {
        let device = Device::Cpu;
        let config = Config {
            resolution: 256,
            in_channels: 3,
            ch: 32,
            out_ch: 3,
            ch_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            z_channels: 16,
            scale_factor: 1.0,
            shift_factor: 0.0,
        };
        // candle-transformers' networks fill the variables with their initialisation; ours
        // read the same variables.
        let variables = VarMap::new();
        let vb = VarBuilder::from_varmap(&variables, DType::F32, &device);
        let (decoder_vb, encoder_vb) = (vb.pp("decoder"), vb.pp("encoder"));
        use candle_transformers::models::flux::autoencoder as reference;
        let reference_decoder = reference::Decoder::new(&config, decoder_vb.clone()).unwrap();
        let reference_encoder = reference::Encoder::new(&config, encoder_vb.clone()).unwrap();
        let ours = Decoder::load(&config, decoder_vb).unwrap();
        let our_encoder = Encoder::load(&config, encoder_vb).unwrap();
        let z = Tensor::randn(0f32, 1.0, (1, 16, 6, 10), &device).unwrap();
        let decoded = ours.forward(&z).unwrap();
        assert_eq!(decoded.dims(), [1, 3, 24, 40]);
        let (difference, scale) = compare(&decoded, &reference_decoder.forward(&z).unwrap());
        assert!(
            difference <= 1e-4 * scale.max(1.0),
            "decoder: {difference} of {scale}"
        );

        let image = Tensor::randn(0f32, 1.0, (1, 3, 24, 40), &device).unwrap();
        let encoded = our_encoder.forward(&image).unwrap();
        assert_eq!(encoded.dims(), [1, 32, 6, 10]);
        let expected = reference_encoder.forward(&image).unwrap();
        let (difference, scale) = compare(&encoded, &expected);
        assert!(
            difference <= 1e-4 * scale.max(1.0),
            "encoder: {difference} of {scale}"
        );
    }
}
