//! The shapes model's networks: a small transformer prompt encoder and a small DiT that
//! predicts the flow velocity.
//!
//! The DiT follows the FLUX single-stream design at toy scale: latent patches and prompt
//! tokens form one sequence with joint self-attention, and the noise level (with a pooled
//! prompt vector) modulates every block through adaLN-Zero, so an untrained block starts as
//! the identity. Token positions are fixed sinusoids (2-D for the latent grid, 1-D for the
//! prompt), so "top left" and "red … on a blue background" are readable from the first step.
//!
//! A first model of exactly that design, trained for the hour a CPU allows, decided every
//! token on its own: its samples were a patchwork of object- and background-coloured tokens.
//! Models trained since add four things against it, each a switch in [`NetworkConfig`] so the
//! older files still load: EDM-style preconditioning (the noise passes through a skip instead
//! of through the network), grid positions beside the patch features instead of added to
//! them, a 3×3 depthwise convolution that mixes neighbouring tokens in every block, and ReLU
//! MLPs (far less CPU than GELU). With them, samples are whole objects, of the prompted colour
//! and place, but blobs whatever the shape word. A convolutional head at latent resolution
//! ([`ConvHead`]), which a run can add to a trained network, has since made the outline follow
//! the shape word about half the time. Coarser scales for that head (`CoarseScale`,
//! U-Net style) gave no measurable gain in a trial of 2 000 steps, so the shipped head works
//! at latent resolution only. Nor did more depth, resumed from the shipped weights: two more
//! head blocks (3 900 steps: 64.5 % adherence against 63.5 % on 400 held-out prompts) or two
//! more DiT blocks (1 500 steps: 64 % against 65.5 % on 200; later 5 900 steps: 77.9 % against
//! 78.6 % for the same run without them, on 1 000). What did help: giving the head
//! the DiT's last token features beside its output, with two more head blocks (3 700 steps
//! from a run at 70.8 %: 76.2 %, beyond chance case by case).
//! Sizes come from [`NetworkConfig`], stored beside the weights.

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::layers::{Conv3x3, Dense, LocalMixing, repeat_rows};

/// Sizes of both networks. A field this version does not know is refused rather than skipped:
/// it is a part of the network that would otherwise be left out without a word.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Latent channels and side (latents are `[C, side, side]`).
    pub latent_channels: usize,
    pub latent_size: usize,
    /// Latent positions per image token along each axis.
    pub patch: usize,
    pub hidden: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    pub text_dim: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub vocabulary_size: usize,
    pub max_tokens: usize,
    /// The longest period of the latent grid's position features, in tokens. The usual 10 000
    /// leaves almost every feature flat across a grid of 8 tokens, so position barely reaches
    /// attention; twice the grid side spreads the frequencies over the grid. Older models were
    /// trained with 10 000 and say nothing, so that is the default when it is absent.
    #[serde(default = "classic_position_period")]
    pub grid_position_period: f32,
    /// Whether each block mixes neighbouring image tokens with a 3×3 depthwise convolution
    /// over the token grid before its MLP (as SANA's Mix-FFN does inside it). Attention alone
    /// left a small model, trained for the hours a CPU allows, deciding every token on its own:
    /// samples were a patchwork of object- and background-coloured tokens. The convolution gives
    /// every token its neighbours from the first step. Older models have none.
    #[serde(default)]
    pub local_mixing: bool,
    /// Whether the network is wrapped in EDM-style preconditioning for the flow path (see
    /// `Preconditioning`). Without it the network has to pass the noise through itself to
    /// predict `ε − x0`, and what it gets wrong leaks into the image token by token. Older
    /// models have none.
    #[serde(default)]
    pub preconditioning: bool,
    /// How many of an image token's `hidden` features are its grid position, set beside the
    /// patch's features instead of added to them. Added, the position shares every feature
    /// with the patch, which at high noise is pure noise of larger size: the network then
    /// cannot tell where a token is without first learning to unmix the two, and places the
    /// object token by token at random. Beside it, the noise level's modulation can simply turn
    /// the patch features down. 0 (older models): added.
    #[serde(default)]
    pub position_features: usize,
    /// The MLPs' nonlinearity (older models: GELU).
    #[serde(default)]
    pub activation: Activation,
    /// Channels of a convolutional head that refines the DiT's output at latent resolution
    /// (see [`ConvHead`]); 0 (older models): none.
    #[serde(default)]
    pub conv_head: usize,
    /// Resolutions the convolutional head works at: 1 (older models) is latent resolution
    /// only; each more adds a coarser one at half the side and twice the channels (see
    /// `CoarseScale`).
    #[serde(default = "single_scale")]
    pub conv_head_scales: usize,
    /// Residual blocks of the convolutional head at latent resolution (see [`ConvHead`]);
    /// older models have two. With its input and output convolutions, two blocks see 11 latent
    /// positions (44 pixels), a large shape's whole box; each block more sees four positions
    /// further, so the edge it draws can depend on more of the shape around it.
    #[serde(default = "two_conv_head_blocks")]
    pub conv_head_blocks: usize,
    /// Whether the convolutional head also sees the DiT's last token features, each token's
    /// projected onto its patch of latent positions (see [`ConvHead`]); older models: only the
    /// DiT's output.
    #[serde(default)]
    pub conv_head_features: bool,
}

fn single_scale() -> usize {
    1
}

fn two_conv_head_blocks() -> usize {
    2
}

/// The nonlinearity inside every MLP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// GELU, tanh approximation.
    #[default]
    Gelu,
    /// ReLU: far cheaper on the CPU — GELU's tanh and its gradient's powers took about a
    /// quarter of every training step.
    Relu,
}

fn classic_position_period() -> f32 {
    MAX_PERIOD
}

impl NetworkConfig {
    /// Image tokens per picture.
    pub fn image_tokens(&self) -> usize {
        (self.latent_size / self.patch).pow(2)
    }
}

/// Features of the sinusoidal noise-level embedding.
pub(super) const TIME_FEATURES: usize = 64;
const NORM_EPS: f64 = 1e-6;

/// Layer normalisation over the last dimension, without learned parameters.
fn normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred.broadcast_div(&(variance + NORM_EPS)?.sqrt()?)
}

/// Layer normalisation with a learned scale and offset.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(size: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        normalize(x)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

struct Attention {
    qkv: Dense,
    out: Dense,
    heads: usize,
}

impl Attention {
    fn new(dim: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Attention {
            qkv: Dense::new(dim, 3 * dim, vb.pp("qkv"))?,
            out: Dense::new(dim, dim, vb.pp("out"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, tokens, dim) = x.dims3()?;
        let head_dim = dim / self.heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((batch, tokens, 3, self.heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
        let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let mixed = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, tokens, dim))?;
        self.out.forward(&mixed)
    }
}

struct Mlp {
    up: Dense,
    down: Dense,
    activation: Activation,
}

impl Mlp {
    fn new(dim: usize, config: &NetworkConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Mlp {
            up: Dense::new(dim, dim * config.mlp_ratio, vb.pp("up"))?,
            down: Dense::new(dim * config.mlp_ratio, dim, vb.pp("down"))?,
            activation: config.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.up.forward(x)?;
        let hidden = match self.activation {
            Activation::Gelu => hidden.gelu()?,
            Activation::Relu => hidden.relu()?,
        };
        self.down.forward(&hidden)
    }
}

/// Normalisation over the channels of every latent position (`[B, C, H, W]`), without learned
/// parameters.
pub(super) fn normalize_channels(x: &Tensor) -> candle_core::Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(1)?)?;
    let variance = centred.sqr()?.mean_keepdim(1)?;
    centred.broadcast_div(&(variance + NORM_EPS)?.sqrt()?)
}

/// A residual block of two 3×3 convolutions, each after a normalisation modulated by the
/// noise level and the pooled prompt (FiLM), the second starting at zero so the block starts
/// as the identity.
pub(super) struct ConvBlock {
    modulation: Dense,
    first: Conv3x3,
    second: Conv3x3,
}

impl ConvBlock {
    pub(super) fn new(channels: usize, hidden: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(ConvBlock {
            modulation: Dense::zero(hidden, 4 * channels, vb.pp("modulation"))?,
            first: Conv3x3::new(channels, channels, None, vb.pp("first"))?,
            second: Conv3x3::new(channels, channels, Some(Init::Const(0.0)), vb.pp("second"))?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, conditioning: &Tensor) -> candle_core::Result<Tensor> {
        let m: Vec<Tensor> = self
            .modulation
            .forward(conditioning)?
            .chunk(4, D::Minus1)?
            .into_iter()
            .map(|t| t.unsqueeze(2)?.unsqueeze(3))
            .collect::<candle_core::Result<_>>()?;
        let film = |x: &Tensor, shift: &Tensor, scale: &Tensor| {
            normalize_channels(x)?
                .broadcast_mul(&(scale + 1.0)?)?
                .broadcast_add(shift)?
                .relu()
        };
        let h = self.first.forward(&film(x, &m[0], &m[1])?)?;
        x + self.second.forward(&film(&h, &m[2], &m[3])?)?
    }
}

/// A small convolutional network at latent resolution that refines the DiT's output: it sees
/// that output beside the (scaled) input latent, and adds its own correction, which starts at
/// zero, so a head added to a trained model changes nothing until it learns.
///
/// Why: the DiT renders each token's 8×8 pixels from that token's features alone and knows
/// where a token is only through absolute position features, so drawing a star at every place
/// and size is something it must learn place by place; a model trained for the hours a CPU
/// allows drew blobs for every shape word. Convolutions are the same at every place, so a
/// shape's edges learnt in one place are drawn in all.
///
/// With `conv_head_features`, the head also gets the DiT's last token features, each token's
/// projected (from zero, so again nothing changes until it learns) onto its patch's latent
/// positions. The DiT's output alone is its estimate of the velocity, a blurred average of
/// what the picture might be; what the DiT knows beyond it (which shape the prompt asks for,
/// where this token lies on the object) reaches the head only through that bottleneck and
/// the pooled prompt.
pub struct ConvHead {
    input: Conv3x3,
    features: Option<Dense>,
    patch: usize,
    coarse: Option<CoarseScale>,
    blocks: Vec<ConvBlock>,
    output: Conv3x3,
}

impl ConvHead {
    fn new(config: &NetworkConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let channels = config.conv_head;
        Ok(ConvHead {
            input: Conv3x3::new(2 * config.latent_channels, channels, None, vb.pp("input"))?,
            features: config
                .conv_head_features
                .then(|| {
                    Dense::zero(
                        config.hidden,
                        channels * config.patch * config.patch,
                        vb.pp("features"),
                    )
                })
                .transpose()?,
            patch: config.patch,
            coarse: CoarseScale::chain(
                channels,
                config.conv_head_scales.saturating_sub(1),
                config.hidden,
                vb.pp(COARSE_SCALE_NAME),
            )?,
            blocks: (0..config.conv_head_blocks)
                .map(|i| ConvBlock::new(channels, config.hidden, vb.pp(format!("blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            output: Conv3x3::new(
                channels,
                config.latent_channels,
                Some(Init::Const(0.0)),
                vb.pp("output"),
            )?,
        })
    }

    /// The DiT's output `raw` refined, given the network's input `x` (both `[B, C, S, S]`)
    /// and the DiT's last image token features `tokens` (`[B, T, hidden]`, those `raw` was
    /// projected from).
    fn forward(
        &self,
        raw: &Tensor,
        x: &Tensor,
        tokens: &Tensor,
        conditioning: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let mut h = self.input.forward(&Tensor::cat(&[raw, x], 1)?)?;
        if let Some(features) = &self.features {
            let (_, channels, side, _) = h.dims4()?;
            h = (h + unpatchify(&features.forward(tokens)?, channels, side, self.patch)?)?;
        }
        if let Some(coarse) = &self.coarse {
            h = (&h + coarse.forward(&h, conditioning)?)?;
        }
        for block in &self.blocks {
            h = block.forward(&h, conditioning)?;
        }
        raw + self.output.forward(&normalize_channels(&h)?.relu()?)?
    }
}

/// The name under which a head or a coarse scale keeps its next coarser scale's weights.
pub const COARSE_SCALE_NAME: &str = "coarse";

/// A coarser resolution of a [`ConvHead`]: a strided convolution halves the side and doubles
/// the channels, convolution blocks work there (around any coarser scale still), and a
/// convolution after nearest-neighbour upsampling returns a correction for the finer features,
/// starting at zero so a scale added to a trained head changes nothing until it learns.
///
/// Why: the outline of a star or a cross depends on where the edge sits relative to the whole
/// object, which is wider than the latent-resolution blocks can see at once; at half the side
/// the same convolutions see twice as far, for a quarter of the cost per channel (as in a
/// U-Net).
struct CoarseScale {
    down: Conv2d,
    before: ConvBlock,
    coarser: Option<Box<CoarseScale>>,
    after: ConvBlock,
    up: Conv3x3,
}

impl CoarseScale {
    /// `count` nested scales below features of `channels` channels (none for 0).
    fn chain(
        channels: usize,
        count: usize,
        hidden: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Option<Self>> {
        if count == 0 {
            return Ok(None);
        }
        let inner = 2 * channels;
        let down_config = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Conv2dConfig::default()
        };
        Ok(Some(CoarseScale {
            down: candle_nn::conv2d(channels, inner, 3, down_config, vb.pp("down"))?,
            before: ConvBlock::new(inner, hidden, vb.pp("before"))?,
            coarser: CoarseScale::chain(inner, count - 1, hidden, vb.pp(COARSE_SCALE_NAME))?
                .map(Box::new),
            after: ConvBlock::new(inner, hidden, vb.pp("after"))?,
            up: Conv3x3::new(inner, channels, Some(Init::Const(0.0)), vb.pp("up"))?,
        }))
    }

    /// The correction for features `x` (`[B, channels, S, S]`, S even).
    fn forward(&self, x: &Tensor, conditioning: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let mut h = self.before.forward(&self.down.forward(x)?, conditioning)?;
        if let Some(coarser) = &self.coarser {
            h = (&h + coarser.forward(&h, conditioning)?)?;
        }
        let h = self.after.forward(&h, conditioning)?;
        self.up.forward(&h.upsample_nearest2d(height, width)?)
    }
}

/// The prompt encoder: token embeddings plus positions through a pre-norm transformer.
pub struct TextEncoder {
    embedding: Embedding,
    position: Tensor,
    blocks: Vec<(LayerNorm, Attention, LayerNorm, Mlp)>,
    final_norm: LayerNorm,
}

impl TextEncoder {
    pub fn new(config: &NetworkConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = config.text_dim;
        let blocks = (0..config.text_layers)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok((
                    LayerNorm::new(dim, vb.pp("norm1"))?,
                    Attention::new(dim, config.text_heads, vb.pp("attention"))?,
                    LayerNorm::new(dim, vb.pp("norm2"))?,
                    Mlp::new(dim, config, vb.pp("mlp"))?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(TextEncoder {
            embedding: candle_nn::embedding(config.vocabulary_size, dim, vb.pp("embedding"))?,
            position: text_positions(config.max_tokens, dim, vb.device())?,
            blocks,
            final_norm: LayerNorm::new(dim, vb.pp("final_norm"))?,
        })
    }

    /// `[B, T]` token ids to `[B, T, text_dim]` context.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.embedding.forward(ids)?.broadcast_add(&self.position)?;
        for (norm1, attention, norm2, mlp) in &self.blocks {
            x = (&x + attention.forward(&norm1.forward(&x)?)?)?;
            x = (&x + mlp.forward(&norm2.forward(&x)?)?)?;
        }
        self.final_norm.forward(&x)
    }
}

struct DitBlock {
    modulation: Dense,
    attention: Attention,
    mlp: Mlp,
    local_mixing: Option<LocalMixing>,
}

/// `x·(1 + scale) + shift` (`x` `[B, T, D]`) with `[B, D]` modulation the same for every token.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    let tokens = x.dim(1)?;
    (x * repeat_rows(&(scale + 1.0)?, tokens)?)? + repeat_rows(shift, tokens)?
}

impl DitBlock {
    /// `x` holds `text_tokens` prompt tokens, then `image_tokens` image tokens.
    fn forward(
        &self,
        x: &Tensor,
        conditioning: &Tensor,
        text_tokens: usize,
        image_tokens: usize,
    ) -> candle_core::Result<Tensor> {
        let m = self.modulation.forward(conditioning)?.chunk(6, D::Minus1)?;
        let attended = self
            .attention
            .forward(&modulate(&normalize(x)?, &m[0], &m[1])?)?;
        let tokens = x.dim(1)?;
        let x = (x + (attended * repeat_rows(&m[2], tokens)?)?)?;
        let inputs = modulate(&normalize(&x)?, &m[3], &m[4])?;
        let inputs = match &self.local_mixing {
            Some(local) => {
                let image = inputs.narrow(1, text_tokens, image_tokens)?;
                let image = (&image + local.forward(&image)?)?;
                Tensor::cat(&[&inputs.narrow(1, 0, text_tokens)?, &image], 1)?
            }
            None => inputs,
        };
        let mixed = self.mlp.forward(&inputs)?;
        &x + (mixed * repeat_rows(&m[5], tokens)?)?
    }
}

/// The velocity network.
pub struct VelocityNet {
    config: NetworkConfig,
    patch_in: Dense,
    position: Tensor,
    text_in: Dense,
    pooled_in: Dense,
    time_in: Dense,
    time_out: Dense,
    blocks: Vec<DitBlock>,
    final_modulation: Dense,
    final_out: Dense,
    conv_head: Option<ConvHead>,
}

impl VelocityNet {
    pub fn new(config: &NetworkConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let hidden = config.hidden;
        let patch_values = config.latent_channels * config.patch * config.patch;
        let blocks = (0..config.depth)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(DitBlock {
                    modulation: Dense::zero(hidden, 6 * hidden, vb.pp("modulation"))?,
                    attention: Attention::new(hidden, config.heads, vb.pp("attention"))?,
                    mlp: Mlp::new(hidden, config, vb.pp("mlp"))?,
                    local_mixing: config
                        .local_mixing
                        .then(|| {
                            LocalMixing::new(
                                hidden,
                                config.latent_size / config.patch,
                                vb.pp("local"),
                            )
                        })
                        .transpose()?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(VelocityNet {
            config: config.clone(),
            patch_in: Dense::new(
                patch_values,
                hidden - config.position_features,
                vb.pp("patch_in"),
            )?,
            position: grid_positions(
                config.latent_size / config.patch,
                match config.position_features {
                    0 => hidden,
                    beside => beside,
                },
                config.grid_position_period,
                vb.device(),
            )?,
            text_in: Dense::new(config.text_dim, hidden, vb.pp("text_in"))?,
            pooled_in: Dense::new(config.text_dim, hidden, vb.pp("pooled_in"))?,
            time_in: Dense::new(TIME_FEATURES, hidden, vb.pp("time_in"))?,
            time_out: Dense::new(hidden, hidden, vb.pp("time_out"))?,
            blocks,
            final_modulation: Dense::zero(hidden, 2 * hidden, vb.pp("final_modulation"))?,
            final_out: Dense::zero(hidden, patch_values, vb.pp("final_out"))?,
            conv_head: (config.conv_head > 0)
                .then(|| ConvHead::new(config, vb.pp("conv_head")))
                .transpose()?,
        })
    }

    /// The velocity for latents `x` (`[B, C, S, S]`) at noise levels `sigma` (`[B]`) given
    /// prompt context `[B, T, text_dim]`.
    pub fn forward(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if !self.config.preconditioning {
            return self.network(x, sigma, context);
        }
        let p = Preconditioning::at(sigma)?;
        let raw = self.network(&x.broadcast_mul(&p.input)?, sigma, context)?;
        x.broadcast_mul(&p.skip)? + raw.broadcast_mul(&p.output)?
    }

    /// The network itself: latents, noise levels and context to its raw output.
    fn network(&self, x: &Tensor, sigma: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, channels, size, _) = x.dims4()?;
        let (p, grid) = (self.config.patch, size / self.config.patch);
        let patches = x
            .reshape(vec![batch, channels, grid, p, grid, p])?
            .permute([0, 2, 4, 1, 3, 5])?
            .reshape((batch, grid * grid, channels * p * p))?;
        let content = self.patch_in.forward(&patches)?;
        let image = match self.config.position_features {
            0 => content.broadcast_add(&self.position)?,
            beside => Tensor::cat(
                &[
                    content,
                    self.position.broadcast_as((batch, grid * grid, beside))?,
                ],
                2,
            )?,
        };
        let text = self.text_in.forward(context)?;
        let time = self.time_out.forward(&candle_nn::ops::silu(
            &self.time_in.forward(&time_features(sigma)?)?,
        )?)?;
        let conditioning =
            candle_nn::ops::silu(&(time + self.pooled_in.forward(&context.mean(1)?)?)?)?;

        let text_tokens = text.dim(1)?;
        let mut tokens = Tensor::cat(&[&text, &image], 1)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, &conditioning, text_tokens, grid * grid)?;
        }
        let image = tokens.narrow(1, text_tokens, grid * grid)?;
        let m = self
            .final_modulation
            .forward(&conditioning)?
            .chunk(2, D::Minus1)?;
        let features = modulate(&normalize(&image)?, &m[0], &m[1])?;
        let out = unpatchify(&self.final_out.forward(&features)?, channels, size, p)?;
        match &self.conv_head {
            Some(head) => head.forward(&out, x, &features, &conditioning),
            None => Ok(out),
        }
    }
}

/// Image tokens' values `[B, T, C·p·p]` (a grid of tokens in row-major order, each its
/// `p`×`p` patch's values channel by channel) laid out as latents `[B, C, side, side]`.
fn unpatchify(
    tokens: &Tensor,
    channels: usize,
    side: usize,
    p: usize,
) -> candle_core::Result<Tensor> {
    let batch = tokens.dim(0)?;
    let grid = side / p;
    tokens
        .reshape(vec![batch, grid, grid, channels, p, p])?
        .permute([0, 3, 1, 4, 2, 5])?
        .reshape((batch, channels, side, side))
}

/// EDM's preconditioning (Karras et al. 2022) worked out for the flow path
/// `x = σ·ε + (1 − σ)·x0` with unit-variance latents: the velocity is predicted as
/// `skip·x + output·F(input·x)`, where `input` scales `x` to unit variance, `skip·x` is the
/// least-squares prediction of `v = ε − x0` from `x` alone, and `output` the standard
/// deviation of what is left, so the network `F` always has a unit-variance target. At σ = 1
/// the skip passes the noise straight through and `F` only has to say where the picture goes.
struct Preconditioning {
    input: Tensor,
    skip: Tensor,
    output: Tensor,
}

impl Preconditioning {
    /// The coefficients for noise levels `[B]`, each `[B, 1, 1, 1]`.
    fn at(sigma: &Tensor) -> candle_core::Result<Self> {
        let sigma = sigma.to_dtype(DType::F32)?.reshape(((), 1, 1, 1))?;
        // Var(x) = σ² + (1 − σ)²; Cov(v, x) = σ − (1 − σ) = 2σ − 1; Var(v) = 2.
        let variance = (sigma.sqr()? + (1.0 - &sigma)?.sqr()?)?;
        let covariance = sigma.affine(2.0, -1.0)?;
        let skip = (&covariance / &variance)?;
        let left = (2.0 - (covariance.sqr()? / &variance)?)?;
        Ok(Preconditioning {
            input: variance.sqrt()?.recip()?,
            skip,
            output: left.sqrt()?,
        })
    }
}

/// The longest period of the usual sinusoidal features (Transformer, DiT), used for prompt
/// positions and the noise level.
const MAX_PERIOD: f32 = 10_000.0;

/// Fixed sinusoidal position features, `[N, dim]` for N points of any number of coordinates:
/// each coordinate gets an equal share of the features, half sines and half cosines at
/// frequencies spaced geometrically from 1 down to 1/`max_period` (as in the Transformer and
/// DiT). Fixed rather than learned, so the networks know where every token is from the first
/// step.
fn sinusoidal<const K: usize>(
    points: &[[f32; K]],
    dim: usize,
    max_period: f32,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let per_axis = dim / K;
    let half = per_axis / 2;
    let frequencies: Vec<f32> = (0..half)
        .map(|i| (-(max_period.ln()) * i as f32 / half as f32).exp())
        .collect();
    let mut values = Vec::with_capacity(points.len() * dim);
    for point in points {
        for coordinate in point {
            values.extend(frequencies.iter().map(|f| (coordinate * f).sin()));
            values.extend(frequencies.iter().map(|f| (coordinate * f).cos()));
        }
        values.resize(values.len() + dim - K * 2 * half, 0.0);
    }
    Tensor::from_vec(values, (points.len(), dim), device)
}

/// Position features of a sequence of `length` tokens.
fn text_positions(length: usize, dim: usize, device: &Device) -> candle_core::Result<Tensor> {
    let points: Vec<[f32; 1]> = (0..length).map(|t| [t as f32]).collect();
    sinusoidal(&points, dim, MAX_PERIOD, device)
}

/// Position features of a `side`×`side` token grid in row-major order.
fn grid_positions(
    side: usize,
    dim: usize,
    max_period: f32,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let points: Vec<[f32; 2]> = (0..side * side)
        .map(|i| [(i / side) as f32, (i % side) as f32])
        .collect();
    sinusoidal(&points, dim, max_period, device)
}

/// Sinusoidal features of 1000·σ, `[B]` to `[B, TIME_FEATURES]`.
pub(super) fn time_features(sigma: &Tensor) -> candle_core::Result<Tensor> {
    let half = TIME_FEATURES / 2;
    let frequencies: Vec<f32> = (0..half)
        .map(|i| (-(MAX_PERIOD.ln()) * i as f32 / half as f32).exp())
        .collect();
    let frequencies = Tensor::from_vec(frequencies, (1, half), sigma.device())?;
    let angles =
        (sigma.to_dtype(DType::F32)?.unsqueeze(1)? * 1000.0)?.broadcast_mul(&frequencies)?;
    Tensor::cat(&[angles.cos()?, angles.sin()?], 1)
}

/// Both networks, as one unit that is trained and loaded together.
pub struct Networks {
    pub text: TextEncoder,
    pub velocity: VelocityNet,
}

impl Networks {
    pub fn new(config: &NetworkConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Networks {
            text: TextEncoder::new(config, vb.pp("text"))?,
            velocity: VelocityNet::new(config, vb.pp("velocity"))?,
        })
    }

    /// The velocity for latents `x` at noise levels `sigma` for prompts `ids` (`[B, T]`).
    pub fn velocity(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        ids: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.velocity.forward(x, sigma, &self.text.forward(ids)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline_engine::flow::noise::gaussian;

    #[test]
    fn preconditioning_gives_the_network_unit_variance_input_and_target() {
        let device = Device::Cpu;
        let count = 200_000;
        let noise = gaussian(4, count, &device).unwrap();
        let data = gaussian(5, count, &device).unwrap();
        let velocity = (&noise - &data).unwrap();
        let mean = |t: &Tensor| t.mean_all().unwrap().to_scalar::<f32>().unwrap();
        for sigma in [0.02f32, 0.3, 0.5, 0.8, 1.0] {
            let p = Preconditioning::at(&Tensor::new(&[sigma], &device).unwrap()).unwrap();
            let coefficient = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            let (input, skip, output) = (
                coefficient(&p.input),
                coefficient(&p.skip),
                coefficient(&p.output),
            );
            let x = ((&noise * sigma as f64).unwrap() + (&data * (1.0 - sigma) as f64).unwrap())
                .unwrap();
            let target =
                ((&velocity - (&x * skip as f64).unwrap()).unwrap() / output as f64).unwrap();
            let scaled = (&x * input as f64).unwrap();
            assert!(
                (mean(&scaled.sqr().unwrap()) - 1.0).abs() < 0.02,
                "σ {sigma}"
            );
            assert!(
                (mean(&target.sqr().unwrap()) - 1.0).abs() < 0.02,
                "σ {sigma}"
            );
            assert!(mean(&(&target * &x).unwrap()).abs() < 0.02, "σ {sigma}");
        }
    }
}
