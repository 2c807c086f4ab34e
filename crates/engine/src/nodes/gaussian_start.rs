//! Gaussian Start: the σ = 1 starting latent, portable noise from a seed.

use crate::flow::noise::gaussian;
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::{Latent, Value};
use crate::nodes::context::{NodeContext, NodeDef};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "gaussian_start",
            title: "Gaussian Start",
            category: "latent",
            description: "Pure noise at σ = 1, bit-identical for a seed on every machine.",
            inputs: vec![PortSpec::required("model", PortType::Model)],
            outputs: vec![PortSpec::required("latent", PortType::Latent)],
            params: vec![
                ParamSpec::seed("seed", "noise seed"),
                ParamSpec::int("width", 16, 4096, 64, "image width in pixels"),
                ParamSpec::int("height", 16, 4096, 64, "image height in pixels"),
            ],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let model = ctx.model("model")?;
    let shape = model.latent_shape(ctx.int("width") as usize, ctx.int("height") as usize)?;
    let noise = gaussian(ctx.int("seed") as u64, shape, model.device())?;
    Ok(vec![Value::Latent(Latent {
        tensor: noise,
        sigma: 1.0,
    })])
}
