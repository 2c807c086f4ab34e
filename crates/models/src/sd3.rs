//! Stable Diffusion 3.5 Large and Medium from the user's own files, run by the MMDiT (and
//! MMDiT-X for Medium) of [`crate::mmdit_network`] and the shared KL autoencoder under
//! Flowline's sampler.
//!
//! Pieces: the MMDiT (`sd3.5_large.safetensors` / `sd3.5_medium.safetensors`, Stability's
//! single-file layout with the MMDiT under `model.diffusion_model.` and the autoencoder under
//! `first_stage_model.`), CLIP-L, CLIP-G and T5-XXL (Stability's `text_encoders/` folder or
//! ComfyUI's `clip/`), and the CLIP and T5 tokenizers. Any text encoder may be set to `none`:
//! as in ComfyUI, a left-out CLIP's part of the conditioning is zeros and a left-out T5's
//! tokens are dropped.
//!
//! The MMDiT takes the noise level as `t = 1000·σ` and predicts `ε − x0`, Flowline's velocity.
//! candle's MMDiT computes its timestep embedding in f16, so the MMDiT always runs at f16; the
//! precision setting applies to the text encoders. Latents are normalised as
//! `(z − 0.0609) · 1.5305`.

use std::sync::Arc;
use std::sync::mpsc;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::mmdit::model::Config as MmditConfig;

use crate::autoencoder::{
    DTYPE as AUTOENCODER_DTYPE, LATENT_CHANNELS, LatentAutoencoder, check_latent_channels,
};
use crate::checkpoint::{Piece, available_memory, check_fits, fits, human_bytes};
use crate::locate::{Locator, WeightSpec};
use crate::mmdit_network::Mmdit;
use crate::text_encoders::{
    CLIP_L, ClipSize, OnDemand, PenultimateClip, PromptTokenizer, T5_XXL, T5Encoder, Tokens,
    t5_dtype, t5_width, truncation_warnings,
};
use flowline_engine::error::InputError;
use flowline_engine::model::{Conditioning, Family, FlowModel, LatentPreview, LoadRequest};

/// The Load Model parameters SD3.5 reads: its pieces and how to run them.
const PIECES_AND_SETTINGS: &[&str] = &[
    "path",
    "transformer",
    "vae",
    "clip_l",
    "clip_g",
    "t5",
    "clip_tokenizer",
    "t5_tokenizer",
    "precision",
    "device",
    "text_encoders",
];

pub const LARGE: Family = Family {
    name: crate::locate::SD35_LARGE,
    description: "Stable Diffusion 3.5 Large from your own files",
    needs_path: true,
    uses: PIECES_AND_SETTINGS,
    load: load_large,
};

pub const MEDIUM: Family = Family {
    name: crate::locate::SD35_MEDIUM,
    description: "Stable Diffusion 3.5 Medium (MMDiT-X) from your own files",
    needs_path: true,
    uses: PIECES_AND_SETTINGS,
    load: load_medium,
};

/// The autoencoder's latent normalisation (Stability's `sd3_impls.py`).
pub const LATENT_SCALE: f64 = 1.5305;
pub const LATENT_SHIFT: f64 = 0.0609;
/// The precision candle's MMDiT runs at (its timestep embedding is f16).
const MMDIT_DTYPE: DType = DType::F16;
/// Tokens of each encoder's part of a prompt, as Stability's reference code uses them.
const PROMPT_TOKENS: usize = 77;

/// Latent→RGB factors for SD3 latents, from ComfyUI's `comfy/latent_formats.py` (class
/// `SD3`, fitted by its authors against decoded images), as [R, G, B] rows of 16 channel
/// weights, in ComfyUI's [−1, 1] convention.
const PREVIEW_FACTORS: [[f32; LATENT_CHANNELS]; 3] = [
    [
        -0.0922, 0.0311, 0.1994, 0.0856, 0.0587, -0.0006, 0.0978, -0.0042, -0.0194, -0.0488,
        0.0922, -0.0278, 0.0332, -0.0069, -0.0596, -0.1448,
    ],
    [
        -0.0175, 0.0633, 0.0927, 0.0339, 0.0272, 0.1104, 0.0306, 0.1038, 0.0020, 0.0130, 0.0988,
        0.0524, 0.0456, -0.0030, -0.0465, -0.1463,
    ],
    [
        0.0749, 0.0954, 0.0458, 0.0902, -0.0496, 0.0309, 0.0427, 0.1358, 0.0669, -0.0268, 0.0951,
        -0.0542, 0.0895, -0.0810, -0.0293, -0.1189,
    ],
];
const PREVIEW_BIAS: [f32; 3] = [0.2394, 0.2135, 0.1925];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Large,
    Medium,
}

impl Variant {
    fn title(self) -> &'static str {
        match self {
            Variant::Large => "SD3.5 Large",
            Variant::Medium => "SD3.5 Medium",
        }
    }

    fn family(self) -> &'static str {
        match self {
            Variant::Large => LARGE.name,
            Variant::Medium => MEDIUM.name,
        }
    }

    fn mmdit(self) -> WeightSpec {
        WeightSpec {
            role: "the SD3.5 MMDiT",
            param: "transformer",
            probe: "x_embedder.proj.weight",
            prefixes: &["", "model.diffusion_model."],
            optional: false,
            main: true,
            names: match self {
                Variant::Large => &[
                    "sd3.5_large*.safetensors",
                    "unet/sd3.5_large*.safetensors",
                    "diffusion_models/sd3.5_large*.safetensors",
                    "checkpoints/sd3.5_large*.safetensors",
                ],
                Variant::Medium => &[
                    "sd3.5_medium*.safetensors",
                    "unet/sd3.5_medium*.safetensors",
                    "diffusion_models/sd3.5_medium*.safetensors",
                    "checkpoints/sd3.5_medium*.safetensors",
                ],
            },
        }
    }
}

const AUTOENCODER: WeightSpec = WeightSpec {
    role: "the SD3 autoencoder",
    param: "vae",
    probe: "decoder.conv_in.weight",
    prefixes: &["", "first_stage_model.", "vae."],
    optional: false,
    main: false,
    names: &[
        "sd3_vae.safetensors",
        "vae/sd3_vae.safetensors",
        "../vae/sd3_vae.safetensors",
    ],
};

const SD3_CLIP_L: WeightSpec = WeightSpec {
    optional: true,
    prefixes: &["", "text_encoders.clip_l.transformer."],
    names: &[
        "clip_l.safetensors",
        "text_encoders/clip_l.safetensors",
        "text_encoder/model.safetensors",
        "clip/clip_l.safetensors",
        "../text_encoders/clip_l.safetensors",
        "../clip/clip_l.safetensors",
    ],
    ..CLIP_L
};

const CLIP_G: WeightSpec = WeightSpec {
    role: "the CLIP-G text encoder",
    param: "clip_g",
    probe: "text_model.embeddings.token_embedding.weight",
    prefixes: &["", "text_encoders.clip_g.transformer."],
    optional: true,
    main: false,
    names: &[
        "clip_g.safetensors",
        "text_encoders/clip_g.safetensors",
        "text_encoder_2/model.safetensors",
        "clip/clip_g.safetensors",
        "../text_encoders/clip_g.safetensors",
        "../clip/clip_g.safetensors",
    ],
};

const SD3_T5: WeightSpec = WeightSpec {
    optional: true,
    names: &[
        "t5xxl*.safetensors",
        "text_encoders/t5xxl*.safetensors",
        "text_encoder_3/model.safetensors",
        "text_encoder_3/model-*-of-*.safetensors",
        "clip/t5xxl*.safetensors",
        "../text_encoders/t5xxl*.safetensors",
        "../clip/t5xxl*.safetensors",
    ],
    ..T5_XXL
};

/// Usual places of CLIP's tokenizer (CLIP-L and CLIP-G share its vocabulary): a
/// `tokenizer.json`, or diffusers' `vocab.json` with `merges.txt` beside it.
const CLIP_TOKENIZER_NAMES: &[&str] = &[
    "tokenizer/tokenizer.json",
    "tokenizer_2/tokenizer.json",
    "clip_l.tokenizer.json",
    "clip_g.tokenizer.json",
    "tokenizer/vocab.json",
    "tokenizer_2/vocab.json",
];
/// Usual places of the T5 `tokenizer.json`.
const T5_TOKENIZER_NAMES: &[&str] = &["tokenizer_3/tokenizer.json", "t5xxl.tokenizer.json"];

fn load_large(
    request: &LoadRequest,
    report: &mut dyn FnMut(String),
) -> anyhow::Result<Arc<dyn FlowModel>> {
    Ok(Arc::new(Sd3Model::load(request, Variant::Large, report)?))
}

fn load_medium(
    request: &LoadRequest,
    report: &mut dyn FnMut(String),
) -> anyhow::Result<Arc<dyn FlowModel>> {
    Ok(Arc::new(Sd3Model::load(request, Variant::Medium, report)?))
}

/// The text encoders present (each may be left out).
struct Encoders {
    clip_l: Option<PenultimateClip>,
    clip_g: Option<PenultimateClip>,
    t5: Option<T5Encoder>,
}

/// The prompt encoders: where they are, their tokenizers, and the loaded networks.
struct TextStage {
    clip_l: Option<Piece>,
    clip_g: Option<Piece>,
    t5: Option<Piece>,
    clip_l_tokenizer: Option<PromptTokenizer>,
    clip_g_tokenizer: Option<PromptTokenizer>,
    t5_tokenizer: Option<PromptTokenizer>,
    encoders: OnDemand<Encoders>,
}

/// A loaded SD3.5 model.
pub struct Sd3Model {
    variant: Variant,
    mmdit: MmditThread,
    config: MmditConfig,
    autoencoder: LatentAutoencoder,
    text: TextStage,
    /// The precision of the text encoders.
    dtype: DType,
    device: Device,
    preview: LatentPreview,
    description: String,
}

impl Sd3Model {
    fn load(
        request: &LoadRequest,
        variant: Variant,
        report: &mut dyn FnMut(String),
    ) -> anyhow::Result<Sd3Model> {
        let mut locator = Locator::new(request)?;
        let mmdit = locator.weights(&variant.mmdit())?;
        let found = if mmdit.has("joint_blocks.0.x_block.attn2.qkv.weight") {
            Variant::Medium
        } else {
            Variant::Large
        };
        if found != variant {
            return Err(InputError(format!(
                "{} is an {} MMDiT, not {}: set the Load Model family to {}",
                mmdit.location(),
                found.title(),
                variant.title(),
                found.family()
            ))
            .into());
        }
        let autoencoder = locator.weights(&AUTOENCODER)?;
        let clip_l = locator.optional_weights(&SD3_CLIP_L)?;
        let clip_g = locator.optional_weights(&CLIP_G)?;
        let t5 = locator.optional_weights(&SD3_T5)?;
        let config = mmdit_config(&mmdit)?;
        check_latent_channels(&autoencoder, "SD3")?;
        for (piece, size) in [(&clip_l, ClipSize::L), (&clip_g, ClipSize::G)] {
            if let Some(piece) = piece {
                size.check(piece)?;
            }
        }
        check_text_widths(&mmdit, &config, clip_l.is_some() || clip_g.is_some(), &t5)?;

        let clip_tokenizer = match clip_l.as_ref().or(clip_g.as_ref()) {
            Some(clip) => Some(locator.file(
                "the CLIP tokenizer (tokenizer.json)",
                "clip_tokenizer",
                CLIP_TOKENIZER_NAMES,
                clip,
            )?),
            None => None,
        };
        let clip_tokenizer_for = |piece: &Option<Piece>| match (piece, &clip_tokenizer) {
            (Some(_), Some(path)) => PromptTokenizer::clip(path).map(Some),
            _ => Ok(None),
        };
        let clip_l_tokenizer = clip_tokenizer_for(&clip_l)?;
        // CLIP-G pads with `!` where CLIP-L pads with its end token (as Stability's code does).
        let clip_g_tokenizer = clip_tokenizer_for(&clip_g)?
            .map(|t| t.padded_with("!"))
            .transpose()?;
        let t5_tokenizer = match &t5 {
            Some(piece) => Some(PromptTokenizer::t5(&locator.file(
                "the T5 tokenizer (tokenizer.json)",
                "t5_tokenizer",
                T5_TOKENIZER_NAMES,
                piece,
            )?)?),
            None => None,
        };

        let bytes_at = |dtype| {
            mmdit.loaded_bytes(MMDIT_DTYPE)
                + autoencoder.loaded_bytes(AUTOENCODER_DTYPE)
                + [&clip_l, &clip_g]
                    .into_iter()
                    .flatten()
                    .map(|p| p.loaded_bytes(dtype))
                    .sum::<u64>()
                + t5.as_ref().map_or(0, |p| p.loaded_bytes(t5_dtype(dtype)))
        };
        let dtype = request.precision.resolve(&request.device, || {
            fits(bytes_at(DType::F32), available_memory())
        });
        let needed = bytes_at(dtype);
        report(format!(
            "loading {} (MMDiT at F16, text encoders at {dtype:?}): about {} of weights",
            variant.title(),
            human_bytes(needed)
        ));
        if request.device.is_cpu() {
            check_fits(variant.title(), needed, available_memory())?;
        }
        let device = &request.device;
        let network = MmditThread::spawn(&config, mmdit.var_builder(MMDIT_DTYPE, device)?)
            .map_err(|e| mmdit.load_error(e))?;
        let autoencoder =
            LatentAutoencoder::load(&autoencoder, LATENT_SCALE, LATENT_SHIFT, device)?;
        let left_out: Vec<&str> = [("CLIP-L", &clip_l), ("CLIP-G", &clip_g), ("T5", &t5)]
            .into_iter()
            .filter(|(_, piece)| piece.is_none())
            .map(|(name, _)| name)
            .collect();
        let description = format!(
            "{} ({} joint blocks, width {}; {}on {:?}; about {} of weights)",
            variant.title(),
            config.depth,
            config.depth * config.head_size,
            if left_out.is_empty() {
                String::new()
            } else {
                format!("without {}; ", left_out.join(", "))
            },
            device.location(),
            human_bytes(needed)
        );
        Ok(Sd3Model {
            variant,
            mmdit: network,
            config,
            autoencoder,
            text: TextStage {
                clip_l,
                clip_g,
                t5,
                clip_l_tokenizer,
                clip_g_tokenizer,
                t5_tokenizer,
                encoders: OnDemand::new(request.keep_text_encoders),
            },
            dtype,
            device: device.clone(),
            preview: LatentPreview::from_signed(&PREVIEW_FACTORS, PREVIEW_BIAS),
            description,
        })
    }

    fn text_encoders(&self) -> anyhow::Result<Encoders> {
        let clip = |piece: &Option<Piece>, size| {
            piece
                .as_ref()
                .map(|p| PenultimateClip::load(p, size, self.dtype, &self.device))
                .transpose()
        };
        Ok(Encoders {
            clip_l: clip(&self.text.clip_l, ClipSize::L)?,
            clip_g: clip(&self.text.clip_g, ClipSize::G)?,
            t5: self
                .text
                .t5
                .as_ref()
                .map(|p| T5Encoder::load(p, t5_dtype(self.dtype), &self.device))
                .transpose()?,
        })
    }

    /// A `[1, tokens, width]` zero tensor at the MMDiT's precision.
    fn zeros(&self, tokens: usize, width: usize) -> candle_core::Result<Tensor> {
        Tensor::zeros((1, tokens, width), MMDIT_DTYPE, &self.device)
    }
}

/// The MMDiT holds candle's blocks as trait objects that do not promise `Send`, so it lives on
/// a thread of its own (built there) and the model asks it for velocities over a channel: safe
/// Rust instead of asserting a thread safety candle does not declare.
struct MmditThread {
    requests: mpsc::Sender<MmditRequest>,
}

struct MmditRequest {
    x: Tensor,
    timesteps: Tensor,
    pooled: Tensor,
    context: Tensor,
    reply: mpsc::Sender<candle_core::Result<Tensor>>,
}

impl MmditThread {
    fn spawn(config: &MmditConfig, vb: VarBuilder<'static>) -> anyhow::Result<MmditThread> {
        let (requests, inbox) = mpsc::channel::<MmditRequest>();
        let (ready, built) = mpsc::channel();
        let config = config.clone();
        std::thread::Builder::new()
            .name("mmdit".into())
            .spawn(move || {
                let mmdit = match Mmdit::new(&config, vb) {
                    Ok(mmdit) => mmdit,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                for request in inbox {
                    let velocity = mmdit.forward(
                        &request.x,
                        &request.timesteps,
                        &request.pooled,
                        &request.context,
                    );
                    let _ = request.reply.send(velocity);
                }
            })?;
        built
            .recv()
            .map_err(|_| anyhow::anyhow!("the MMDiT thread stopped while loading"))??;
        Ok(MmditThread { requests })
    }

    fn forward(
        &self,
        x: Tensor,
        timesteps: Tensor,
        pooled: Tensor,
        context: Tensor,
    ) -> anyhow::Result<Tensor> {
        let stopped = || anyhow::anyhow!("the MMDiT thread stopped");
        let (reply, answer) = mpsc::channel();
        self.requests
            .send(MmditRequest {
                x,
                timesteps,
                pooled,
                context,
                reply,
            })
            .map_err(|_| stopped())?;
        Ok(answer.recv().map_err(|_| stopped())??)
    }
}

/// The MMDiT's configuration, from its tensor shapes.
fn mmdit_config(piece: &Piece) -> anyhow::Result<MmditConfig> {
    let patch = "x_embedder.proj.weight";
    let (hidden, in_channels, patch_size) = (
        piece.dim(patch, 4, 0)?,
        piece.dim(patch, 4, 1)?,
        piece.dim(patch, 4, 2)?,
    );
    let depth = piece.count_blocks("joint_blocks");
    if depth == 0 || !hidden.is_multiple_of(depth) {
        piece.shape("joint_blocks.0.x_block.attn.qkv.weight")?;
        return Err(piece
            .shape_error(
                patch,
                &format!("a width divisible by the {depth} joint blocks (one head per block)"),
                piece.shape(patch)?,
            )
            .into());
    }
    let positions = piece.dim("pos_embed", 3, 1)?;
    let side = positions.isqrt();
    if side * side != positions {
        return Err(piece
            .shape_error(
                "pos_embed",
                "a square number of positions",
                piece.shape("pos_embed")?,
            )
            .into());
    }
    let final_linear = piece.dim("final_layer.linear.weight", 2, 0)?;
    Ok(MmditConfig {
        patch_size,
        in_channels,
        out_channels: final_linear / (patch_size * patch_size),
        depth,
        head_size: hidden / depth,
        adm_in_channels: piece.dim("y_embedder.mlp.0.weight", 2, 1)?,
        pos_embed_max_size: side,
        context_embed_size: piece.dim("context_embedder.weight", 2, 1)?,
        frequency_embedding_size: piece.dim("t_embedder.mlp.0.weight", 2, 1)?,
    })
}

/// The text encoders' widths must be what the MMDiT takes: CLIP-L and CLIP-G side by side
/// (768 + 1280) for the pooled vector and within the context width, T5 at the context width.
fn check_text_widths(
    mmdit: &Piece,
    config: &MmditConfig,
    any_clip: bool,
    t5: &Option<Piece>,
) -> Result<(), InputError> {
    let clip_width = ClipSize::L.width() + ClipSize::G.width();
    if any_clip && (config.adm_in_channels != clip_width || config.context_embed_size < clip_width)
    {
        return Err(InputError(format!(
            "{} takes a {}-wide pooled vector and {}-wide context, but CLIP-L and CLIP-G give \
             {clip_width}; set clip_l and clip_g to none for a model without CLIP",
            mmdit.location(),
            config.adm_in_channels,
            config.context_embed_size
        )));
    }
    if let Some(t5) = t5 {
        let width = t5_width(t5)?;
        if width != config.context_embed_size {
            return Err(InputError(format!(
                "{} makes {width}-wide embeddings but {}'s context_embedder takes {}: they are \
                 not from the same model",
                t5.location(),
                mmdit.location(),
                config.context_embed_size
            )));
        }
    }
    Ok(())
}

impl FlowModel for Sd3Model {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn latent_shape(&self, width: usize, height: usize) -> anyhow::Result<Vec<usize>> {
        let downsample = self.autoencoder.downsample;
        let multiple = downsample * self.config.patch_size;
        let largest = multiple * self.config.pos_embed_max_size;
        if !width.is_multiple_of(multiple) || !height.is_multiple_of(multiple) {
            return Err(InputError(format!(
                "{} draws sizes that are multiples of {multiple} pixels, not {width}×{height}",
                self.variant.title()
            ))
            .into());
        }
        if width > largest || height > largest {
            return Err(InputError(format!(
                "{} draws at most {largest}×{largest} pixels, not {width}×{height}",
                self.variant.title()
            ))
            .into());
        }
        Ok(vec![
            1,
            LATENT_CHANNELS,
            height / downsample,
            width / downsample,
        ])
    }

    fn image_tokens(&self, shape: &[usize]) -> usize {
        let patch = self.config.patch_size;
        shape[2..].iter().map(|side| side / patch).product()
    }

    fn encode_prompt(&self, text: &str) -> anyhow::Result<Conditioning> {
        let tokens = |tokenizer: &Option<PromptTokenizer>| {
            tokenizer
                .as_ref()
                .map(|t| t.tokens(text, PROMPT_TOKENS))
                .transpose()
        };
        let clip_l_tokens = tokens(&self.text.clip_l_tokenizer)?;
        let clip_g_tokens = tokens(&self.text.clip_g_tokenizer)?;
        let t5_tokens = tokens(&self.text.t5_tokenizer)?;
        let context_width = self.config.context_embed_size;
        let (context, pooled) = self.text.encoders.with(
            || self.text_encoders(),
            |encoders| {
                let clip =
                    |encoder: &Option<PenultimateClip>, tokens: &Option<Tokens>, size: ClipSize| {
                        match (encoder, tokens) {
                            (Some(encoder), Some(tokens)) => {
                                let (hidden, pooled) = encoder.encode(tokens, &self.device)?;
                                Ok((hidden.to_dtype(MMDIT_DTYPE)?, pooled.to_dtype(MMDIT_DTYPE)?))
                            }
                            _ => Ok::<_, anyhow::Error>((
                                self.zeros(PROMPT_TOKENS, size.width())?,
                                Tensor::zeros((1, size.width()), MMDIT_DTYPE, &self.device)?,
                            )),
                        }
                    };
                let any_clip = encoders.clip_l.is_some() || encoders.clip_g.is_some();
                let (clip_context, pooled) = if any_clip {
                    let (l_hidden, l_pooled) = clip(&encoders.clip_l, &clip_l_tokens, ClipSize::L)?;
                    let (g_hidden, g_pooled) = clip(&encoders.clip_g, &clip_g_tokens, ClipSize::G)?;
                    let hidden = Tensor::cat(&[l_hidden, g_hidden], D::Minus1)?;
                    let padding = context_width - hidden.dim(D::Minus1)?;
                    let hidden =
                        Tensor::cat(&[hidden, self.zeros(PROMPT_TOKENS, padding)?], D::Minus1)?;
                    (hidden, Tensor::cat(&[l_pooled, g_pooled], D::Minus1)?)
                } else {
                    (
                        self.zeros(PROMPT_TOKENS, context_width)?,
                        Tensor::zeros((1, self.config.adm_in_channels), MMDIT_DTYPE, &self.device)?,
                    )
                };
                let context = match (&mut encoders.t5, &t5_tokens) {
                    (Some(t5), Some(tokens)) => {
                        let t5_context = t5.encode(tokens, &self.device)?.to_dtype(MMDIT_DTYPE)?;
                        Tensor::cat(&[clip_context, t5_context], 1)?
                    }
                    _ => clip_context,
                };
                Ok((context, pooled))
            },
        )?;
        let encoded: Vec<(&str, &Tokens)> = [
            ("CLIP-L", &clip_l_tokens),
            ("CLIP-G", &clip_g_tokens),
            ("T5", &t5_tokens),
        ]
        .into_iter()
        .filter_map(|(name, tokens)| tokens.as_ref().map(|t| (name, t)))
        .collect();
        Ok(Conditioning {
            context,
            pooled: Some(pooled),
            prompt: text.to_string(),
            warnings: truncation_warnings(&encoded),
            distilled_guidance: None,
        })
    }

    fn velocity(&self, x: &Tensor, sigma: f64, cond: &Conditioning) -> anyhow::Result<Tensor> {
        let pooled = cond.pooled.as_ref().ok_or_else(|| {
            anyhow::anyhow!("SD3.5 needs a pooled CLIP vector in its conditioning")
        })?;
        // candle's timestep embedder takes f32 timesteps on Stability's 0–1000 scale.
        let timesteps = Tensor::full((sigma * 1000.0) as f32, 1, &self.device)?;
        let velocity = self.mmdit.forward(
            x.to_dtype(MMDIT_DTYPE)?,
            timesteps,
            pooled.clone(),
            cond.context.clone(),
        )?;
        Ok(velocity.to_dtype(DType::F32)?)
    }

    fn decode(&self, latent: &Tensor) -> anyhow::Result<Tensor> {
        self.autoencoder.decode(latent)
    }

    fn encode_image(&self, image: &Tensor) -> anyhow::Result<Tensor> {
        let (_, height, width) = image.dims3()?;
        self.latent_shape(width, height)?;
        self.autoencoder.encode(&image.to_device(&self.device)?)
    }

    fn preview(&self) -> &LatentPreview {
        &self.preview
    }
}
