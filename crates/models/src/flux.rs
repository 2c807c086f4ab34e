//! FLUX.1 \[schnell\] and \[dev\] from the user's own files, run by Flowline's own transformer
//! ([`crate::flux_network`]) and autoencoder under Flowline's sampler.
//!
//! Pieces: the transformer (`flux1-schnell.safetensors` / `flux1-dev.safetensors`, original
//! layout, optionally inside a single-file checkpoint under `model.diffusion_model.`, or a
//! quantized `.gguf`, whose matrices stay quantized), the
//! autoencoder (`ae.safetensors`), CLIP-L, T5-XXL and the two `tokenizer.json` files. Every
//! network size is read from the tensor shapes, so pruned and tiny variants load as well.
//!
//! The transformer sees the latent as 2×2 patches ("packed"), the noise level as `t = σ` (it
//! scales by 1000 itself) and, for \[dev\], the distilled guidance strength; it predicts
//! `ε − x0`, which is Flowline's velocity, so its output is used as is. The autoencoder's
//! latents are normalised as `(z − 0.1159) · 0.3611` (see [`super::autoencoder`]).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::flux::WithForward;
use candle_transformers::models::flux::model::Config as TransformerConfig;
use candle_transformers::models::flux::sampling::{State, unpack};

use crate::autoencoder::{
    DTYPE as AUTOENCODER_DTYPE, LATENT_CHANNELS, LatentAutoencoder, check_latent_channels,
};
use crate::checkpoint::{Piece, available_memory, check_fits, fits, human_bytes};
use crate::flux_network::{FluxTransformer, Weights};
use crate::locate::{Locator, WeightSpec};
use crate::lora;
use crate::text_encoders::{
    CLIP_L, CLIP_TOKENIZER_NAMES, ClipEncoder, OnDemand, PromptTokenizer, T5_TOKENIZER_NAMES,
    T5_XXL, T5Encoder, t5_dtype, t5_width, truncation_warnings,
};
use flowline_engine::error::InputError;
use flowline_engine::model::{Conditioning, Family, FlowModel, LatentPreview, LoadRequest};

/// The Load Model parameters FLUX.1 reads: its pieces and how to run them.
const PIECES_AND_SETTINGS: &[&str] = &[
    "path",
    "transformer",
    "vae",
    "clip_l",
    "t5",
    "clip_tokenizer",
    "t5_tokenizer",
    "precision",
    "device",
    "text_encoders",
];

pub const SCHNELL: Family = Family {
    name: crate::locate::FLUX_SCHNELL,
    description: "FLUX.1 [schnell] (4 steps, no guidance) from your own files",
    needs_path: true,
    uses: PIECES_AND_SETTINGS,
    load: load_schnell,
};

pub const DEV: Family = Family {
    name: crate::locate::FLUX_DEV,
    description: "FLUX.1 [dev] (distilled guidance) from your own files",
    needs_path: true,
    uses: PIECES_AND_SETTINGS,
    load: load_dev,
};

/// The autoencoder's latent normalisation (Black Forest Labs' `flux/util.py`).
pub const LATENT_SCALE: f64 = 0.3611;
pub const LATENT_SHIFT: f64 = 0.1159;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Schnell,
    Dev,
}

impl Variant {
    fn title(self) -> &'static str {
        match self {
            Variant::Schnell => "FLUX.1 [schnell]",
            Variant::Dev => "FLUX.1 [dev]",
        }
    }

    fn family(self) -> &'static str {
        match self {
            Variant::Schnell => SCHNELL.name,
            Variant::Dev => DEV.name,
        }
    }

    /// T5 tokens of a prompt, as each release was trained.
    fn t5_tokens(self) -> usize {
        match self {
            Variant::Schnell => 256,
            Variant::Dev => 512,
        }
    }

    fn transformer(self) -> WeightSpec {
        WeightSpec {
            role: "the FLUX transformer",
            param: "transformer",
            probe: "img_in.weight",
            prefixes: &["", "model.diffusion_model."],
            optional: false,
            main: true,
            names: match self {
                Variant::Schnell => &[
                    "flux1-schnell*.safetensors",
                    "unet/flux1-schnell*.safetensors",
                    "diffusion_models/flux1-schnell*.safetensors",
                    "flux1-schnell*.gguf",
                    "unet/flux1-schnell*.gguf",
                    "diffusion_models/flux1-schnell*.gguf",
                ],
                Variant::Dev => &[
                    "flux1-dev*.safetensors",
                    "unet/flux1-dev*.safetensors",
                    "diffusion_models/flux1-dev*.safetensors",
                    "flux1-dev*.gguf",
                    "unet/flux1-dev*.gguf",
                    "diffusion_models/flux1-dev*.gguf",
                ],
            },
        }
    }
}

const AUTOENCODER: WeightSpec = WeightSpec {
    role: "the FLUX autoencoder",
    param: "vae",
    probe: "decoder.conv_in.weight",
    prefixes: &["", "vae.", "first_stage_model."],
    optional: false,
    main: false,
    names: &[
        "ae.safetensors",
        "vae/ae.safetensors",
        "../vae/ae.safetensors",
    ],
};

/// Latent→RGB factors for FLUX latents, from ComfyUI's `comfy/latent_formats.py` (class
/// `Flux`, fitted by its authors against decoded images). ComfyUI maps latents to [−1, 1]; the
/// preview here maps to [0, 1] (see [`LatentPreview::from_signed`]).
const PREVIEW_FACTORS: [[f32; LATENT_CHANNELS]; 3] = [
    [
        -0.0346, 0.0034, 0.0275, -0.0174, 0.0859, 0.0004, 0.0405, -0.0236, -0.0245, 0.1008,
        -0.0515, 0.0428, 0.0817, -0.1264, -0.0280, -0.1262,
    ],
    [
        0.0244, 0.0210, -0.0668, 0.0160, 0.0721, 0.0383, 0.0861, -0.0185, 0.0250, 0.0755, 0.0201,
        -0.0012, 0.0765, -0.0522, -0.0881, -0.0982,
    ],
    [
        0.0681, 0.0687, -0.0433, 0.0617, 0.0329, 0.0115, 0.0915, -0.0259, 0.1180, -0.0421, 0.0011,
        -0.0036, 0.0749, -0.1103, -0.0499, -0.0778,
    ],
];
const PREVIEW_BIAS: [f32; 3] = [-0.0329, -0.0718, -0.0851];

fn load_schnell(
    request: &LoadRequest,
    report: &mut dyn FnMut(String),
) -> anyhow::Result<Arc<dyn FlowModel>> {
    Ok(Arc::new(FluxModel::load(
        request,
        Variant::Schnell,
        report,
    )?))
}

fn load_dev(
    request: &LoadRequest,
    report: &mut dyn FnMut(String),
) -> anyhow::Result<Arc<dyn FlowModel>> {
    Ok(Arc::new(FluxModel::load(request, Variant::Dev, report)?))
}

/// The prompt encoders: where they are, and the loaded networks while they are kept.
struct TextStage {
    clip: Piece,
    t5: Piece,
    clip_tokenizer: PromptTokenizer,
    /// Token positions CLIP has (77 in CLIP-L).
    clip_positions: usize,
    t5_tokenizer: PromptTokenizer,
    encoders: OnDemand<(ClipEncoder, T5Encoder)>,
}

/// A loaded FLUX.1 model.
#[derive(Clone)]
pub struct FluxModel {
    variant: Variant,
    /// The transformer, from safetensors or quantized from GGUF.
    transformer: FluxTransformer,
    /// The precision the transformer computes at: the chosen one, or f32 for GGUF weights.
    network_dtype: DType,
    guidance_input: bool,
    autoencoder: Arc<LatentAutoencoder>,
    /// Shared with the copies LoRAs make, which only change the transformer.
    text: Arc<TextStage>,
    /// The precision of the text encoders (T5 adjusted by [`t5_dtype`]).
    dtype: DType,
    device: Device,
    preview: LatentPreview,
    description: String,
}

impl FluxModel {
    fn load(
        request: &LoadRequest,
        variant: Variant,
        report: &mut dyn FnMut(String),
    ) -> anyhow::Result<FluxModel> {
        let mut locator = Locator::new(request)?;
        let transformer = locator.weights(&variant.transformer())?;
        let guidance_input = transformer.has("guidance_in.in_layer.weight");
        let found = if guidance_input {
            Variant::Dev
        } else {
            Variant::Schnell
        };
        if found != variant {
            return Err(InputError(format!(
                "{} is a {} transformer, not {}: set the Load Model family to {}",
                transformer.location(),
                found.title(),
                variant.title(),
                found.family()
            ))
            .into());
        }
        let autoencoder = locator.weights(&AUTOENCODER)?;
        let clip = locator.weights(&CLIP_L)?;
        let t5 = locator.weights(&T5_XXL)?;
        let clip_tokenizer = PromptTokenizer::clip(&locator.file(
            "the CLIP tokenizer (tokenizer.json)",
            "clip_tokenizer",
            CLIP_TOKENIZER_NAMES,
            &clip,
        )?)?;
        let t5_tokenizer = PromptTokenizer::t5(&locator.file(
            "the T5 tokenizer (tokenizer.json)",
            "t5_tokenizer",
            T5_TOKENIZER_NAMES,
            &t5,
        )?)?;

        let transformer_config = transformer_config(&transformer)?;
        let clip_positions = clip.dim("text_model.embeddings.position_embedding.weight", 2, 0)?;
        check_latent_channels(&autoencoder, "FLUX")?;
        check_packed_channels(&transformer, &transformer_config, &autoencoder)?;
        check_agreement_text(&transformer, &transformer_config, &clip, &t5)?;

        // fp8 matrices stay fp8, upcast a layer at a time.
        let fp8_matrices = transformer.fp8_matrices();
        let bytes_at = |dtype| {
            transformer.loaded_bytes_keeping(dtype, &fp8_matrices)
                + autoencoder.loaded_bytes(AUTOENCODER_DTYPE)
                + clip.loaded_bytes(dtype)
                + t5.loaded_bytes(t5_dtype(dtype))
        };
        let dtype = request.precision.resolve(&request.device, || {
            fits(bytes_at(DType::F32), available_memory())
        });
        let needed = bytes_at(dtype);
        report(format!(
            "loading {} at {dtype:?}: about {} of weights",
            variant.title(),
            human_bytes(needed)
        ));
        if request.device.is_cpu() {
            check_fits(variant.title(), needed, available_memory())?;
        }
        let device = &request.device;
        let (weights, network_dtype, stored) = if transformer.is_gguf() {
            (
                Weights::Quantized(transformer.quantized_var_builder(device)?),
                DType::F32,
                "quantized GGUF".to_string(),
            )
        } else if fp8_matrices.is_empty() {
            (
                Weights::Plain(transformer.var_builder(dtype, device)?),
                dtype,
                format!("{dtype:?}"),
            )
        } else {
            let weights = Weights::Fp8 {
                vb: transformer.var_builder(dtype, device)?,
                matrices: Arc::new(fp8_matrices),
            };
            (
                weights,
                dtype,
                format!("fp8 matrices upcast to {dtype:?} per layer"),
            )
        };
        let network = FluxTransformer::load(&transformer_config, &weights)
            .map_err(|e| transformer.load_error(e))?;
        let autoencoder =
            LatentAutoencoder::load(&autoencoder, LATENT_SCALE, LATENT_SHIFT, device)?;
        let description = format!(
            "{} ({} double + {} single blocks, width {}; {} on {:?}; about {} of weights)",
            variant.title(),
            transformer_config.depth,
            transformer_config.depth_single_blocks,
            transformer_config.hidden_size,
            stored,
            device.location(),
            human_bytes(needed)
        );
        Ok(FluxModel {
            variant,
            transformer: network,
            network_dtype,
            guidance_input,
            autoencoder: Arc::new(autoencoder),
            text: Arc::new(TextStage {
                clip,
                t5,
                clip_tokenizer,
                clip_positions,
                t5_tokenizer,
                encoders: OnDemand::new(request.keep_text_encoders),
            }),
            dtype,
            device: device.clone(),
            preview: LatentPreview::from_signed(&PREVIEW_FACTORS, PREVIEW_BIAS),
            description,
        })
    }

    /// Loads the text encoders (for one prompt, or to keep).
    fn text_encoders(&self) -> anyhow::Result<(ClipEncoder, T5Encoder)> {
        let dtype = self.dtype;
        Ok((
            ClipEncoder::load(&self.text.clip, dtype, &self.device)?,
            T5Encoder::load(&self.text.t5, t5_dtype(dtype), &self.device)?,
        ))
    }
}

/// The transformer's configuration, from its tensor shapes.
fn transformer_config(piece: &Piece) -> anyhow::Result<TransformerConfig> {
    let (hidden_size, in_channels) = (
        piece.dim("img_in.weight", 2, 0)?,
        piece.dim("img_in.weight", 2, 1)?,
    );
    let norm = "double_blocks.0.img_attn.norm.query_norm.scale";
    let head_dim = piece.dim(norm, 1, 0)?;
    // The rotary embedding splits each head over (image index, row, column) as 16/56/56 of
    // 128 channels in the released models; the same proportions serve smaller heads.
    let first = head_dim / 8;
    let axes_dim = vec![first, (head_dim - first) / 2, (head_dim - first) / 2];
    if head_dim == 0
        || hidden_size % head_dim != 0
        || axes_dim.iter().sum::<usize>() != head_dim
        || axes_dim.iter().any(|a| a % 2 == 1)
    {
        return Err(piece
            .shape_error(
                norm,
                &format!("a head width that divides {hidden_size} and is a multiple of 32"),
                piece.shape(norm)?,
            )
            .into());
    }
    let mlp = piece.dim("double_blocks.0.img_mlp.0.weight", 2, 0)?;
    Ok(TransformerConfig {
        in_channels,
        vec_in_dim: piece.dim("vector_in.in_layer.weight", 2, 1)?,
        context_in_dim: piece.dim("txt_in.weight", 2, 1)?,
        hidden_size,
        mlp_ratio: mlp as f64 / hidden_size as f64,
        num_heads: hidden_size / head_dim,
        depth: piece.count_blocks("double_blocks"),
        depth_single_blocks: piece.count_blocks("single_blocks"),
        axes_dim,
        theta: 10_000,
        qkv_bias: piece.has("double_blocks.0.img_attn.qkv.bias"),
        guidance_embed: piece.has("guidance_in.in_layer.weight"),
    })
}

/// The transformer must take the autoencoder's latents packed 2×2.
fn check_packed_channels(
    transformer: &Piece,
    config: &TransformerConfig,
    autoencoder: &Piece,
) -> Result<(), InputError> {
    if config.in_channels != 4 * LATENT_CHANNELS {
        return Err(InputError(format!(
            "{} takes {} input channels, but the autoencoder {} makes {LATENT_CHANNELS}-channel \
             latents (packed 2×2: {}); they are not from the same model",
            transformer.location(),
            config.in_channels,
            autoencoder.location(),
            4 * LATENT_CHANNELS
        )));
    }
    Ok(())
}

/// The text encoders' widths must be what the transformer takes.
fn check_agreement_text(
    transformer: &Piece,
    config: &TransformerConfig,
    clip: &Piece,
    t5: &Piece,
) -> Result<(), InputError> {
    let clip_width = clip.dim("text_model.embeddings.token_embedding.weight", 2, 1)?;
    let t5_width = t5_width(t5)?;
    for (piece, width, takes, input) in [
        (clip, clip_width, config.vec_in_dim, "vector_in"),
        (t5, t5_width, config.context_in_dim, "txt_in"),
    ] {
        if width != takes {
            return Err(InputError(format!(
                "{} makes {width}-wide embeddings but {}'s {input} takes {takes}: they are not \
                 from the same model",
                piece.location(),
                transformer.location()
            )));
        }
    }
    Ok(())
}

impl FlowModel for FluxModel {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn with_lora(&self, path: &Path, strength: f64) -> anyhow::Result<Arc<dyn FlowModel>> {
        let layers = self.transformer.layers();
        let adapters =
            lora::read_adapters(path, &layers, strength, self.network_dtype, &self.device)?;
        let transformer = self
            .transformer
            .with_adapters(&adapters)
            .map_err(|e| InputError(format!("the LoRA {}: {e}", path.display())))?;
        let file = path
            .file_name()
            .unwrap_or(path.as_os_str())
            .to_string_lossy();
        Ok(Arc::new(FluxModel {
            transformer,
            description: format!(
                "{} + LoRA {file} at {strength} ({} layers)",
                self.description,
                adapters.len()
            ),
            ..self.clone()
        }))
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn latent_shape(&self, width: usize, height: usize) -> anyhow::Result<Vec<usize>> {
        let downsample = self.autoencoder.downsample;
        let multiple = 2 * downsample;
        if !width.is_multiple_of(multiple) || !height.is_multiple_of(multiple) {
            return Err(InputError(format!(
                "{} draws sizes that are multiples of {multiple} pixels, not {width}×{height}",
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
        shape[2..].iter().map(|side| side / 2).product()
    }

    fn encode_prompt(&self, text: &str) -> anyhow::Result<Conditioning> {
        let clip_tokens = self
            .text
            .clip_tokenizer
            .tokens(text, self.text.clip_positions)?;
        let t5_tokens = self
            .text
            .t5_tokenizer
            .tokens(text, self.variant.t5_tokens())?;
        let (pooled, context) = self.text.encoders.with(
            || self.text_encoders(),
            |(clip, t5)| {
                let (_, pooled) = clip.encode(&clip_tokens, &self.device)?;
                Ok((pooled, t5.encode(&t5_tokens, &self.device)?))
            },
        )?;
        let warnings = truncation_warnings(&[("CLIP", &clip_tokens), ("T5", &t5_tokens)]);
        Ok(Conditioning {
            context: context.to_dtype(self.network_dtype)?,
            pooled: Some(pooled.to_dtype(self.network_dtype)?),
            prompt: text.to_string(),
            warnings,
            distilled_guidance: None,
        })
    }

    fn velocity(&self, x: &Tensor, sigma: f64, cond: &Conditioning) -> anyhow::Result<Tensor> {
        let pooled = cond.pooled.as_ref().ok_or_else(|| {
            anyhow::anyhow!("FLUX needs a pooled CLIP vector in its conditioning")
        })?;
        let (_, _, height, width) = x.dims4()?;
        let dtype = self.network_dtype;
        let state = State::new(&cond.context, pooled, &x.to_dtype(dtype)?)?;
        let timesteps = Tensor::full(sigma as f32, 1, &self.device)?.to_dtype(dtype)?;
        let guidance = if self.guidance_input {
            let strength = cond
                .distilled_guidance
                .unwrap_or(flowline_engine::model::DEFAULT_DISTILLED_GUIDANCE);
            Some(Tensor::full(strength as f32, 1, &self.device)?.to_dtype(dtype)?)
        } else {
            None
        };
        let packed = self.transformer.forward(
            &state.img,
            &state.img_ids,
            &state.txt,
            &state.txt_ids,
            &timesteps,
            &state.vec,
            guidance.as_ref(),
        )?;
        // `unpack` takes the image size in pixels of FLUX's 8× autoencoder.
        Ok(unpack(&packed, height * 8, width * 8)?.to_dtype(DType::F32)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preview_maps_comfyui_signed_factors_to_unit_range() {
        let preview = LatentPreview::from_signed(&PREVIEW_FACTORS, PREVIEW_BIAS);
        // A zero latent shows ComfyUI's bias, moved from [−1, 1] to [0, 1].
        for (shown, bias) in preview.bias.iter().zip(PREVIEW_BIAS) {
            assert!((shown - (bias + 1.0) / 2.0).abs() < 1e-7);
        }
        assert_eq!(preview.matrix[0].len(), LATENT_CHANNELS);
        assert_eq!(preview.matrix[2][8], PREVIEW_FACTORS[2][8] / 2.0);
    }
}
