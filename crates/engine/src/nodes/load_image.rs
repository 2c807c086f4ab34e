//! Load Image: a PNG or JPEG from disk as an IMAGE.

use std::path::Path;

use crate::error::InputError;
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::{Image, Value};
use crate::model::tensor_from_image;
use crate::nodes::context::{NodeContext, NodeDef};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "load_image",
            title: "Load Image",
            category: "loaders",
            description: "Reads an image file.",
            inputs: vec![],
            outputs: vec![PortSpec::required("image", PortType::Image)],
            params: vec![ParamSpec::path("path", false, "image file")],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let path = Path::new(ctx.text("path"));
    if path.as_os_str().is_empty() {
        return Err(InputError("no image file chosen".into()).into());
    }
    let decoded = image::open(path)
        .map_err(|e| InputError(format!("cannot read image {}: {e}", path.display())))?;
    Ok(vec![Value::Image(Image(tensor_from_image(
        &decoded.to_rgb8(),
    )?))])
}
