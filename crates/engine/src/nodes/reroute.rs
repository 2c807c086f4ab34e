//! Reroute: passes on whatever reaches it, so a long wire can be led around other nodes, as
//! ComfyUI's Reroute does. Its ports are of type ANY; validation looks through it (and through
//! chains of reroutes) to the type that flows in, so a wrong connection is still refused.

use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, PortSpec};
use crate::graph::value::Value;
use crate::nodes::context::{NodeContext, NodeDef};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "reroute",
            title: "Reroute",
            category: "utility",
            description: "Passes on whatever flows into it, to tidy long wires.",
            inputs: vec![PortSpec::required("value", PortType::Any)],
            outputs: vec![PortSpec::required("value", PortType::Any)],
            params: vec![],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    Ok(vec![ctx.value("value")?])
}
