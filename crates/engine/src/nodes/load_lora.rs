//! Load LoRA: a MODEL with a LoRA file's low-rank adapters added to its velocity network, as
//! ComfyUI's LoraLoaderModelOnly does. The base model's weights are shared, not copied, so
//! chaining several Load LoRA nodes costs only their adapters; the text encoders are left as
//! they are.

use std::path::PathBuf;

use crate::error::InputError;
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::Value;
use crate::nodes::context::{NodeContext, NodeDef, NodeEvent};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "load_lora",
            title: "Load LoRA",
            category: "loaders",
            description: "Adds a LoRA file's adapters to the model's velocity network.",
            inputs: vec![PortSpec::required("model", PortType::Model)],
            outputs: vec![PortSpec::required("model", PortType::Model)],
            params: vec![
                ParamSpec::path("path", false, "LoRA .safetensors file"),
                ParamSpec::float(
                    "strength",
                    -100.0,
                    100.0,
                    1.0,
                    "how much of the LoRA to add (0 = none, negative = its opposite)",
                ),
            ],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let model = ctx.model("model")?;
    let path = PathBuf::from(ctx.text("path"));
    if path.as_os_str().is_empty() {
        return Err(InputError("no LoRA file is set: choose one in path".into()).into());
    }
    if !path.is_file() {
        return Err(InputError(format!("LoRA file {} does not exist", path.display())).into());
    }
    let adapted = model.with_lora(&path, ctx.float("strength"))?;
    let _ = ctx.emit(NodeEvent::Info(adapted.describe()));
    Ok(vec![Value::Model(adapted)])
}
