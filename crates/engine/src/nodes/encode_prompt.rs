//! Encode Prompt: text to CONDITIONING through the model's own prompt encoder.

use std::sync::Arc;

use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::Value;
use crate::nodes::context::{NodeContext, NodeDef, NodeEvent};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "encode_prompt",
            title: "Encode Prompt",
            category: "conditioning",
            description: "Encodes a prompt with the model's text encoder; an empty prompt is the unconditional one.",
            inputs: vec![PortSpec::required("model", PortType::Model)],
            outputs: vec![PortSpec::required("conditioning", PortType::Conditioning)],
            params: vec![ParamSpec::text(
                "text",
                true,
                "",
                "what the picture should show",
            )],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let model = ctx.model("model")?;
    let conditioning = model.encode_prompt(ctx.text("text"))?;
    for warning in &conditioning.warnings {
        let _ = ctx.emit(NodeEvent::Warning(warning.clone()));
    }
    Ok(vec![Value::Conditioning(Arc::new(conditioning))])
}
