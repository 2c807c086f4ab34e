//! Load Model: turns a family name and a path into a MODEL.

use std::path::Path;

use candle_core::Device;

use super::{InputError, NodeContext, NodeDef, NodeSpec, ParamSpec, PortSpec};
use crate::graph::PortType;
use crate::graph::value::Value;
use crate::model::{FAMILY_NAMES, family};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "load_model",
            title: "Load Model",
            description: "Loads a flow-matching model: prompt encoder, velocity network and autoencoder.",
            inputs: vec![],
            outputs: vec![PortSpec::required("model", PortType::Model)],
            params: vec![
                ParamSpec::choice(
                    "family",
                    FAMILY_NAMES,
                    FAMILY_NAMES[0],
                    "which kind of model",
                ),
                ParamSpec::path("path", true, "model folder or single-file checkpoint"),
            ],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let family = family(ctx.text("family")).expect("validated choice");
    let path = Path::new(ctx.text("path"));
    if family.needs_path && !path.exists() {
        return Err(InputError(format!("model path {} does not exist", path.display())).into());
    }
    let model = (family.load)(path, &Device::Cpu)?;
    Ok(vec![Value::Model(model)])
}
