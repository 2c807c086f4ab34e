//! Source Image Start: an image, partly noised, as the start (img2img and edit flows).

use crate::flow::interpolate;
use crate::flow::noise::gaussian;
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::{Latent, Value};
use crate::nodes::context::{NodeContext, NodeDef};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "source_image_start",
            title: "Source Image Start",
            category: "latent",
            description: "Starts at σ = strength from the image: x = σ·ε + (1−σ)·x_image.",
            inputs: vec![
                PortSpec::required("model", PortType::Model),
                PortSpec::required("image", PortType::Image),
            ],
            outputs: vec![PortSpec::required("latent", PortType::Latent)],
            params: vec![
                ParamSpec::float(
                    "strength",
                    0.0,
                    1.0,
                    0.7,
                    "how far back toward noise (1 = ignore the image)",
                ),
                ParamSpec::seed("seed", "noise seed"),
            ],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let model = ctx.model("model")?;
    let image = ctx.image("image")?;
    let clean = model.encode_image(&image.0)?;
    let sigma = ctx.float("strength");
    let noise = gaussian(ctx.int("seed") as u64, clean.shape(), model.device())?;
    Ok(vec![Value::Latent(Latent {
        tensor: interpolate(&clean, &noise, sigma)?,
        sigma,
    })])
}
