//! Decode: LATENT to IMAGE through the model's autoencoder.

use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, PortSpec};
use crate::graph::value::{Image, Value};
use crate::nodes::context::{NodeContext, NodeDef};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "decode",
            title: "Decode",
            category: "image",
            description: "Decodes a latent into an image with the model's autoencoder.",
            inputs: vec![
                PortSpec::required("model", PortType::Model),
                PortSpec::required("latent", PortType::Latent),
            ],
            outputs: vec![PortSpec::required("image", PortType::Image)],
            params: vec![],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let model = ctx.model("model")?;
    let latent = ctx.latent("latent")?;
    let image = model
        .decode(&latent.tensor)?
        .to_device(&candle_core::Device::Cpu)?;
    Ok(vec![Value::Image(Image(image))])
}
