//! LoRA files for FLUX: low-rank adapters read from a `.safetensors` file and added to the
//! transformer's layers at run time, so the base weights stay shared and unchanged (fp8 and
//! GGUF ones included) and a Load LoRA node costs only the adapters' memory.
//!
//! Each adapted layer has a `down` matrix `[rank, inputs]`, an `up` matrix `[outputs, rank]`
//! and optionally an `alpha`; the layer's output gains `strength · alpha / rank · up · down · x`
//! (alpha defaults to the rank). The tensors are `lora_A` / `lora_B` or `lora_down` /
//! `lora_up` and `alpha` under a layer's name, in any of the namings LoRA trainers write:
//! - Black Forest Labs' layer names, bare or under `diffusion_model.` (ComfyUI),
//!   `transformer.` or `base_model.model.`: `diffusion_model.double_blocks.0.img_attn.qkv`;
//! - kohya's (sd-scripts), the same names with `_` for `.` under `lora_unet_`:
//!   `lora_unet_double_blocks_0_img_attn_qkv`;
//! - diffusers' (PEFT, ai-toolkit), bare or under `transformer.`, or with `_` for `.` under
//!   `lora_transformer_`: `transformer.transformer_blocks.0.attn.to_q`. diffusers splits
//!   the projections Black Forest Labs' layout fuses (a double block's `qkv`, a single
//!   block's `linear1`: queries, keys, values and MLP), so the adapters of the parts of one
//!   fused layer become one adapter on it, block-diagonal: each part's `up` writes only its
//!   own rows. The final modulation's two halves come in the other order in diffusers
//!   (scale, shift) and are swapped back.
//!
//! Text-encoder parts (`lora_te…`, `text_encoder…`) are left out, as ComfyUI's
//! LoraLoaderModelOnly does. Other adapter kinds (LoHa, LoKr, DoRA, full differences) and
//! names that are no layer of the network are refused with the first such tensor's name
//! rather than guessed at.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use flowline_engine::error::InputError;

use crate::flux_network::{Layer, LowRank};

/// Prefixes before Black Forest Labs' layer names in the files that use them.
const BFL_PREFIXES: [&str; 5] = [
    "",
    "diffusion_model.",
    "model.diffusion_model.",
    "transformer.",
    "base_model.model.",
];
/// Prefixes before diffusers' layer names.
const DIFFUSERS_PREFIXES: [&str; 3] = ["", "transformer.", "base_model.model.transformer."];
/// Prefixes of text-encoder adapters, which a model-only LoRA leaves out.
const TEXT_ENCODER_PREFIXES: [&str; 3] = ["lora_te", "text_encoder", "te_"];

/// What one tensor of a LoRA file is to its layer.
#[derive(Clone, Copy)]
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

/// Where the adapter under one name goes: a layer in Black Forest Labs' names, the part of a
/// fused layer's outputs for diffusers' split projections, and whether the two halves of its
/// outputs come swapped.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    layer: String,
    part: Option<usize>,
    swap_halves: bool,
}

#[derive(Default)]
struct Pieces {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// The adapters in the LoRA file at `path` for a network of `layers`, scaled by `strength`,
/// as `dtype` on `device`, by layer name.
pub fn read_adapters(
    path: &Path,
    layers: &[Layer],
    strength: f64,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<BTreeMap<String, LowRank>> {
    let file = path.display();
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| InputError(format!("cannot read the LoRA {file}: {e}")))?;
    let targets = targets(layers);
    let mut pieces: BTreeMap<Target, Pieces> = BTreeMap::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        if TEXT_ENCODER_PREFIXES.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let Some((module, part)) = PARTS
            .iter()
            .find_map(|&(suffix, part)| Some((name.strip_suffix(suffix)?, part)))
        else {
            return Err(InputError(format!(
                "the LoRA {file} holds {name}, which is not a LoRA down, up or alpha tensor \
                 (LoHa, LoKr, DoRA and full differences are not read)"
            ))
            .into());
        };
        let Some(target) = targets.get(module) else {
            return Err(InputError(format!(
                "the LoRA {file} adapts {module}, which is no layer of this FLUX network"
            ))
            .into());
        };
        let tensor = tensors[name].to_dtype(DType::F32)?;
        let entry = pieces.entry(target.clone()).or_default();
        match part {
            Part::Down => entry.down = Some(tensor),
            Part::Up => entry.up = Some(tensor),
            Part::Alpha => {
                let values = tensor.flatten_all()?.to_vec1::<f32>()?;
                let [alpha] = values[..] else {
                    return Err(InputError(format!(
                        "the LoRA {file} holds {name} with {} values, where an alpha is one",
                        values.len()
                    ))
                    .into());
                };
                entry.alpha = Some(f64::from(alpha));
            }
        }
    }
    // Each part's `up` with its alpha / rank taken in, by layer and part.
    let mut by_layer: BTreeMap<String, Vec<(Option<usize>, Tensor, Tensor)>> = BTreeMap::new();
    for (target, pieces) in pieces {
        let layer = &target.layer;
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
        let mut up = (up * (pieces.alpha.unwrap_or(rank as f64) / rank as f64))?;
        if target.swap_halves {
            let half = up.dim(0)? / 2;
            up = Tensor::cat(&[up.narrow(0, half, half)?, up.narrow(0, 0, half)?], 0)?;
        }
        by_layer
            .entry(target.layer)
            .or_default()
            .push((target.part, down, up));
    }
    by_layer
        .into_iter()
        .map(|(layer, parts)| {
            let (down, up) = match parts.as_slice() {
                [(None, down, up)] => (down.clone(), up.clone()),
                _ => {
                    let rows = layers
                        .iter()
                        .find(|l| l.name == layer)
                        .and_then(|l| l.parts.clone())
                        .expect("split adapters target fused layers");
                    block_diagonal(&layer, &parts, &rows)
                        .map_err(|e| InputError(format!("the LoRA {file}: {e}")))?
                }
            };
            let adapter = LowRank {
                down: down.to_dtype(dtype)?.to_device(device)?,
                up: up.to_dtype(dtype)?.to_device(device)?,
                scale: strength,
            };
            Ok((layer, adapter))
        })
        .collect()
}

/// One adapter for fused `layer` from the adapters of some of its parts (`rows` each):
/// their `down`s stacked, and an `up` that maps each part's ranks to that part's rows only.
fn block_diagonal(
    layer: &str,
    parts: &[(Option<usize>, Tensor, Tensor)],
    rows: &[usize],
) -> anyhow::Result<(Tensor, Tensor)> {
    let ranks: usize = parts
        .iter()
        .map(|(_, down, _)| down.dim(0).unwrap_or(0))
        .sum();
    let device = Device::Cpu;
    let mut blocks = Vec::with_capacity(rows.len());
    for (index, &height) in rows.iter().enumerate() {
        let mut before = 0;
        let mut block = None;
        for (part, down, up) in parts {
            let Some(part) = part else {
                anyhow::bail!("{layer} has adapters for the whole layer and for its parts");
            };
            let rank = down.dim(0)?;
            if *part == index {
                if up.dim(0)? != height {
                    anyhow::bail!(
                        "part {index} of {layer} has {height} outputs, its adapter {}",
                        up.dim(0)?
                    );
                }
                let zeros = |width| Tensor::zeros((height, width), DType::F32, &device);
                let after = ranks - before - rank;
                block = Some(Tensor::cat(
                    &[zeros(before)?, up.clone(), zeros(after)?],
                    1,
                )?);
            }
            before += rank;
        }
        blocks.push(match block {
            Some(block) => block,
            None => Tensor::zeros((height, ranks), DType::F32, &device)?,
        });
    }
    let downs: Vec<&Tensor> = parts.iter().map(|(_, down, _)| down).collect();
    Ok((Tensor::cat(&downs, 0)?, Tensor::cat(&blocks, 0)?))
}

/// Every name a LoRA file may give each layer of `layers`, with where it goes.
fn targets(layers: &[Layer]) -> HashMap<String, Target> {
    let mut targets = HashMap::new();
    for layer in layers {
        let whole = Target {
            layer: layer.name.clone(),
            part: None,
            swap_halves: false,
        };
        for prefix in BFL_PREFIXES {
            targets.insert(format!("{prefix}{}", layer.name), whole.clone());
        }
        targets.insert(
            format!("lora_unet_{}", layer.name.replace('.', "_")),
            whole.clone(),
        );
        for (diffusers, part) in diffusers_names(&layer.name) {
            let target = Target {
                part,
                swap_halves: layer.name == "final_layer.adaLN_modulation.1",
                ..whole.clone()
            };
            for prefix in DIFFUSERS_PREFIXES {
                targets.insert(format!("{prefix}{diffusers}"), target.clone());
            }
            targets.insert(
                format!("lora_transformer_{}", diffusers.replace('.', "_")),
                target,
            );
        }
    }
    targets
}

/// diffusers' names for FLUX layer `layer` (Black Forest Labs' name), each with the part of
/// the fused layer it is.
fn diffusers_names(layer: &str) -> Vec<(String, Option<usize>)> {
    let whole = |name: String| vec![(name, None)];
    let split = |block: String, names: &[&str]| {
        names
            .iter()
            .enumerate()
            .map(|(part, name)| (format!("{block}.{name}"), Some(part)))
            .collect()
    };
    let embedders = [
        ("time_in", "timestep_embedder"),
        ("vector_in", "text_embedder"),
        ("guidance_in", "guidance_embedder"),
    ];
    for (ours, theirs) in embedders {
        for (half, linear) in [("in_layer", "linear_1"), ("out_layer", "linear_2")] {
            if layer == format!("{ours}.{half}") {
                return whole(format!("time_text_embed.{theirs}.{linear}"));
            }
        }
    }
    match layer {
        "img_in" => return whole("x_embedder".into()),
        "txt_in" => return whole("context_embedder".into()),
        "final_layer.adaLN_modulation.1" => return whole("norm_out.linear".into()),
        "final_layer.linear" => return whole("proj_out".into()),
        _ => {}
    }
    let mut words = layer.split('.');
    let (Some(kind), Some(index), rest) = (words.next(), words.next(), words.collect::<Vec<_>>())
    else {
        return Vec::new();
    };
    let rest = rest.join(".");
    match kind {
        "double_blocks" => {
            let block = format!("transformer_blocks.{index}");
            let name = match rest.as_str() {
                "img_attn.qkv" => return split(format!("{block}.attn"), &["to_q", "to_k", "to_v"]),
                "txt_attn.qkv" => {
                    return split(
                        format!("{block}.attn"),
                        &["add_q_proj", "add_k_proj", "add_v_proj"],
                    );
                }
                "img_attn.proj" => "attn.to_out.0",
                "txt_attn.proj" => "attn.to_add_out",
                "img_mlp.0" => "ff.net.0.proj",
                "img_mlp.2" => "ff.net.2",
                "txt_mlp.0" => "ff_context.net.0.proj",
                "txt_mlp.2" => "ff_context.net.2",
                "img_mod.lin" => "norm1.linear",
                "txt_mod.lin" => "norm1_context.linear",
                _ => return Vec::new(),
            };
            whole(format!("{block}.{name}"))
        }
        "single_blocks" => {
            let block = format!("single_transformer_blocks.{index}");
            match rest.as_str() {
                "linear1" => split(block, &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
                "linear2" => whole(format!("{block}.proj_out")),
                "modulation.lin" => whole(format!("{block}.norm.linear")),
                _ => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}
