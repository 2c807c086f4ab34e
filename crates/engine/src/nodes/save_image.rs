//! Save Image: writes a PNG that carries its workflow, without ever replacing a file.

use std::path::Path;

use crate::error::InputError;
use crate::files::save_png_numbered;
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::Value;
use crate::model::image_from_tensor;
use crate::nodes::context::{NodeContext, NodeDef, NodeEvent};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "save_image",
            title: "Save Image",
            category: "image",
            description: "Saves a PNG as PATH_00001.png, PATH_00002.png, … with the workflow inside.",
            inputs: vec![PortSpec::required("image", PortType::Image)],
            outputs: vec![],
            params: vec![ParamSpec::text(
                "path",
                false,
                "flowline",
                "file name prefix; relative to the output folder",
            )],
            is_output: true,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let image = ctx.image("image")?;
    let prefix = ctx.text("path");
    if prefix.trim().is_empty() {
        return Err(InputError("path is empty".into()).into());
    }
    let prefix = ctx.env.output_dir.join(Path::new(prefix));
    let pixels = image_from_tensor(&image.0)?;
    let path = save_png_numbered(&prefix, &pixels, ctx.env.workflow_json.as_deref())?;
    let _ = ctx.emit(NodeEvent::Image {
        image,
        path: Some(path),
    });
    Ok(vec![])
}
