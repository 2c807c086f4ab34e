//! Load Latent: a start latent from a safetensors file, as ComfyUI's `.latent` files hold one
//! (under `latent_tensor`). Noise drawn by another program, or a latent saved midway, starts a
//! run here exactly as it started there: the diffusers twin benchmark (`bench/`) feeds both
//! programs the same noise this way.

use std::path::Path;

use crate::error::InputError;
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::{Latent, Value};
use crate::model::LATENT_PROBE_SIDE;
use crate::nodes::context::{NodeContext, NodeDef};

/// The tensor name ComfyUI's Save Latent writes; a file with one tensor may name it anything.
const COMFYUI_LATENT: &str = "latent_tensor";

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "load_latent",
            title: "Load Latent",
            category: "latent",
            description: "Reads a [batch, channels, height, width] latent from a safetensors file (ComfyUI's .latent files too) to start from.",
            inputs: vec![PortSpec::required("model", PortType::Model)],
            outputs: vec![PortSpec::required("latent", PortType::Latent)],
            params: vec![
                ParamSpec::path("path", false, "safetensors or .latent file"),
                ParamSpec::float(
                    "sigma",
                    0.0,
                    1.0,
                    1.0,
                    "the latent's noise level: 1 for pure noise",
                ),
            ],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let path = Path::new(ctx.text("path"));
    if path.as_os_str().is_empty() {
        return Err(InputError("no latent file chosen".into()).into());
    }
    let model = ctx.model("model")?;
    let mut tensors = candle_core::safetensors::load(path, model.device())
        .map_err(|e| InputError(format!("cannot read latent file {}: {e}", path.display())))?;
    let tensor = match tensors.remove(COMFYUI_LATENT) {
        Some(tensor) => tensor,
        None if tensors.len() == 1 => tensors.into_values().next().expect("one tensor"),
        None => {
            return Err(InputError(format!(
                "latent file {} holds {} tensors and none is named {COMFYUI_LATENT}",
                path.display(),
                tensors.len()
            ))
            .into());
        }
    };
    check_layout(model.as_ref(), tensor.dims())
        .map_err(|why| InputError(format!("latent file {}: {why}", path.display())))?;
    Ok(vec![Value::Latent(Latent {
        tensor: tensor.to_dtype(candle_core::DType::F32)?,
        sigma: ctx.float("sigma"),
    })])
}

/// Whether `dims` is a latent the model can start from: its channels, and a size the model
/// gives some image.
fn check_layout(model: &dyn crate::model::FlowModel, dims: &[usize]) -> Result<(), String> {
    let probe = model
        .latent_shape(LATENT_PROBE_SIDE, LATENT_PROBE_SIDE)
        .map_err(|e| e.to_string())?;
    let [_, channels, height, width] = *dims else {
        return Err(format!(
            "the latent has shape {dims:?}; a [batch, channels, height, width] one is needed"
        ));
    };
    if channels != probe[1] {
        return Err(format!(
            "the latent has {channels} channels but the model's have {}",
            probe[1]
        ));
    }
    let pixels_per_cell = LATENT_PROBE_SIDE / probe[2];
    let expected = model
        .latent_shape(width * pixels_per_cell, height * pixels_per_cell)
        .map_err(|e| format!("a {width}×{height} latent: {e}"))?;
    if expected[2..] != dims[2..] {
        return Err(format!(
            "the latent has shape {dims:?}, which is no image size of the model's"
        ));
    }
    Ok(())
}
