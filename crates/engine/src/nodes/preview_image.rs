//! Preview Image: shows an image without writing a file.

use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, PortSpec};
use crate::graph::value::Value;
use crate::nodes::context::{NodeContext, NodeDef, NodeEvent};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "preview_image",
            title: "Preview Image",
            category: "image",
            description: "Shows the image in the app.",
            inputs: vec![PortSpec::required("image", PortType::Image)],
            outputs: vec![],
            params: vec![],
            is_output: true,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let image = ctx.image("image")?;
    let _ = ctx.emit(NodeEvent::Image { image, path: None });
    Ok(vec![])
}
