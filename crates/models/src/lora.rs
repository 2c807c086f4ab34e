//! LoRA files for FLUX: low-rank adapters read from a `.safetensors` file and added to the
//! transformer's layers at run time, so the base weights stay shared and unchanged (fp8 and
//! GGUF ones included) and a Load LoRA node costs only the adapters' memory.
//!
//! Each adapted layer has a `down` matrix `[rank, inputs]`, an `up` matrix `[outputs, rank]`
//! and optionally an `alpha`; the layer's output gains `strength · alpha / rank · up · down · x`
//! (alpha defaults to the rank). Two naming schemes are read, which between them cover the
//! LoRAs trained with kohya's sd-scripts and those ComfyUI and Black Forest Labs' code save:
//! - Black Forest Labs' layer names, bare or under `diffusion_model.` (ComfyUI),
//!   `transformer.` or `base_model.model.`, with `lora_A` / `lora_B` or `lora_down` /
//!   `lora_up`: `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`;
//! - kohya's, the same names with `_` for `.` under `lora_unet_`:
//!   `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`.
//!
//! Text-encoder parts (`lora_te…`, `text_encoder…`) are left out, as ComfyUI's
//! LoraLoaderModelOnly does. diffusers' own layer names (`transformer_blocks.0.attn.to_q`,
//! which split FLUX's fused projections) and other adapter kinds (LoHa, LoKr, DoRA, full
//! differences) are refused with the first tensor's name rather than guessed at.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flowline_engine::error::InputError;

use crate::flux_network::LowRank;

/// Prefixes before Black Forest Labs' layer names in the files that use them.
const PREFIXES: [&str; 4] = [
    "diffusion_model.",
    "model.diffusion_model.",
    "transformer.",
    "base_model.model.",
];
/// kohya's prefix for the diffusion network's layers.
const KOHYA_PREFIX: &str = "lora_unet_";
/// Prefixes of text-encoder adapters, which a model-only LoRA leaves out.
const TEXT_ENCODER_PREFIXES: [&str; 3] = ["lora_te", "text_encoder", "te_"];

/// What one tensor of a LoRA file is to its layer.
enum Part {
    Down,
    Up,
    Alpha,
}

const PARTS: [(&str, Part); 5] = [
    (".lora_A.weight", Part::Down),
    (".lora_down.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

#[derive(Default)]
struct Pieces {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// The adapters in the LoRA file at `path` for a network with the layers `layers` (Black
/// Forest Labs' names), scaled by `strength`, as `dtype` on `device`.
pub fn read_adapters(
    path: &Path,
    layers: &[String],
    strength: f64,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<BTreeMap<String, LowRank>> {
    let file = path.display();
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| InputError(format!("cannot read the LoRA {file}: {e}")))?;
    let by_kohya_name: HashMap<String, &String> = layers
        .iter()
        .map(|layer| (layer.replace('.', "_"), layer))
        .collect();
    let mut pieces: BTreeMap<String, Pieces> = BTreeMap::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        if TEXT_ENCODER_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let Some((module, part)) = PARTS
            .iter()
            .find_map(|(suffix, part)| Some((name.strip_suffix(suffix)?, part)))
        else {
            return Err(InputError(format!(
                "the LoRA {file} holds {name}, which is not a LoRA down, up or alpha tensor \
                 (LoHa, LoKr, DoRA and full differences are not read)"
            ))
            .into());
        };
        let layer = match module.strip_prefix(KOHYA_PREFIX) {
            Some(kohya) => by_kohya_name.get(kohya).map(|layer| (*layer).clone()),
            None => PREFIXES
                .iter()
                .find_map(|prefix| module.strip_prefix(prefix))
                .or(Some(module))
                .filter(|bare| layers.iter().any(|layer| layer == bare))
                .map(str::to_owned),
        };
        let Some(layer) = layer else {
            return Err(InputError(format!(
                "the LoRA {file} adapts {module}, which is no layer of this FLUX network \
                 (diffusers' layer names are not mapped)"
            ))
            .into());
        };
        let tensor = &tensors[name];
        let entry = pieces.entry(layer).or_default();
        match part {
            Part::Down => entry.down = Some(tensor.clone()),
            Part::Up => entry.up = Some(tensor.clone()),
            Part::Alpha => {
                entry.alpha = Some(tensor.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?[0])
            }
        }
    }
    pieces
        .into_iter()
        .map(|(layer, pieces)| {
            let (Some(down), Some(up)) = (pieces.down, pieces.up) else {
                return Err(InputError(format!(
                    "the LoRA {file} has only half of {layer}'s adapter (down and up are needed)"
                ))
                .into());
            };
            let rank = down.dim(0)?;
            if up.rank() != 2 || down.rank() != 2 || up.dim(1)? != rank {
                return Err(InputError(format!(
                    "the LoRA {file} has {layer}'s down {:?} and up {:?}, which do not make a \
                     rank-{rank} pair",
                    down.dims(),
                    up.dims()
                ))
                .into());
            }
            let alpha = pieces.alpha.unwrap_or(rank as f64);
            let adapter = LowRank {
                down: down.to_dtype(dtype)?.to_device(device)?,
                up: up.to_dtype(dtype)?.to_device(device)?,
                scale: strength * alpha / rank as f64,
            };
            Ok((layer, adapter))
        })
        .collect()
}
