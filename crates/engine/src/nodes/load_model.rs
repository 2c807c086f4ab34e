//! Load Model: turns a family, a path and its settings into a MODEL.
//!
//! `path` is a model folder or a single-file checkpoint; the family finds the other pieces by
//! their usual names, and each piece parameter, when set, names that piece's file instead.

use std::path::PathBuf;

use candle_core::{DType, Device};

use crate::error::InputError;
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, ParamView, PortSpec};
use crate::graph::value::Value;
use crate::model::{LoadRequest, Precision, family, family_names};
use crate::nodes::context::{NodeContext, NodeDef, NodeEvent};

/// Parameters naming one piece's file, by the name families look them up under.
const PIECES: [(&str, &str); 7] = [
    (
        "transformer",
        "transformer / MMDiT file (default: found from path)",
    ),
    ("vae", "autoencoder file (default: found from path)"),
    (
        "clip_l",
        "CLIP-L text encoder file (default: found from path)",
    ),
    (
        "clip_g",
        "CLIP-G text encoder file, SD3.5 only (default: found from path; none: without)",
    ),
    (
        "t5",
        "T5-XXL text encoder file (default: found from path; none: without, SD3.5 only)",
    ),
    (
        "clip_tokenizer",
        "CLIP tokenizer.json (default: found from path)",
    ),
    (
        "t5_tokenizer",
        "T5 tokenizer.json (default: found from path)",
    ),
];
const PRECISIONS: [&str; 4] = ["auto", "bf16", "f16", "f32"];
const DEVICES: [&str; 3] = ["cpu", "cuda", "metal"];
const TEXT_ENCODERS: [&str; 2] = ["free", "keep"];

pub fn definition() -> NodeDef {
    let mut params = vec![
        ParamSpec::choice(
            "family",
            family_names(),
            family_names().first().copied().unwrap_or_default(),
            "which kind of model",
        ),
        ParamSpec::path("path", true, "model folder or single-file checkpoint")
            .when(used_by_family),
    ];
    params.extend(PIECES.iter().map(|&(name, help)| {
        ParamSpec::path(name, false, help)
            .when(used_by_family)
            .folded()
    }));
    params.extend([
        ParamSpec::choice(
            "precision",
            &PRECISIONS,
            "auto",
            "number format of FLUX/SD3.5 weights: auto is f32 on a CPU where it fits (faster there), else bf16",
        )
        .when(used_by_family),
        ParamSpec::choice("device", &DEVICES, "cpu", "where the networks run").when(used_by_family),
        ParamSpec::choice(
            "text_encoders",
            &TEXT_ENCODERS,
            "free",
            "free the text encoders after each prompt, or keep them loaded",
        )
        .when(used_by_family),
    ]);
    NodeDef {
        spec: NodeSpec {
            type_name: "load_model",
            title: "Load Model",
            category: "loaders",
            description: "Loads a flow-matching model: prompt encoder, velocity network and autoencoder.",
            inputs: vec![],
            outputs: vec![PortSpec::required("model", PortType::Model)],
            params,
            is_output: false,
        },
        run,
    }
}

/// Whether the chosen family reads `param` (the piece files, folded away, are found from the
/// path unless named).
fn used_by_family(view: &ParamView<'_>, param: &str) -> bool {
    family(view.text("family")).is_some_and(|family| family.uses.contains(&param))
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let family = family(ctx.text("family")).expect("validated choice");
    let path = PathBuf::from(ctx.text("path"));
    if family.needs_path && !path.as_os_str().is_empty() && !path.exists() {
        return Err(InputError(format!("model path {} does not exist", path.display())).into());
    }
    let request = LoadRequest {
        path,
        pieces: PIECES
            .iter()
            .map(|&(name, _)| (name, ctx.text(name)))
            .filter(|(_, file)| !file.is_empty())
            .map(|(name, file)| (name.to_string(), PathBuf::from(file)))
            .collect(),
        precision: match ctx.text("precision") {
            "f32" => Precision::Fixed(DType::F32),
            "f16" => Precision::Fixed(DType::F16),
            "bf16" => Precision::Fixed(DType::BF16),
            _ => Precision::Auto,
        },
        device: device(ctx.text("device"))?,
        keep_text_encoders: ctx.text("text_encoders") == "keep",
    };
    let model = (family.load)(&request, &mut |line| {
        let _ = ctx.emit(NodeEvent::Info(line));
    })?;
    Ok(vec![Value::Model(model)])
}

/// The device named by the `device` parameter, or an error saying how to get it.
fn device(name: &str) -> Result<Device, InputError> {
    let device = match name {
        "cuda" => Device::new_cuda(0),
        "metal" => Device::new_metal(0),
        _ => return Ok(Device::Cpu),
    };
    device.map_err(|e| {
        InputError(format!(
            "device {name} is not available ({e}); a build for it needs `cargo build --release \
             --features {name}` and a {} GPU",
            if name == "cuda" { "NVIDIA" } else { "Apple" }
        ))
    })
}
