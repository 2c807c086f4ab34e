//! CFG: model + positive + negative conditioning → GUIDER, with the guidance variants that
//! counter flow models' burn-in at high scales.

use std::sync::Arc;

use super::{InputError, NodeContext, NodeDef, NodeEvent, NodeSpec, ParamSpec, PortSpec};
use crate::flow::guidance::{Guidance, GuidanceMethod};
use crate::graph::PortType;
use crate::graph::value::{Guider, Value};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "cfg",
            title: "CFG",
            description: "Classifier-free guidance; scale 1 uses the positive prompt alone at half the cost.",
            inputs: vec![
                PortSpec::required("model", PortType::Model),
                PortSpec::required("positive", PortType::Conditioning),
                PortSpec::optional("negative", PortType::Conditioning),
            ],
            outputs: vec![PortSpec::required("guider", PortType::Guider)],
            params: vec![
                ParamSpec::float("scale", 0.0, 30.0, 4.0, "guidance scale (1 = off)"),
                ParamSpec::choice(
                    "method",
                    &GuidanceMethod::NAMES,
                    "cfg",
                    "how to combine the predictions",
                ),
                ParamSpec::float(
                    "rescale_multiplier",
                    0.0,
                    1.0,
                    0.7,
                    "rescale: share of the rescaled estimate",
                ),
                ParamSpec::float(
                    "apg_parallel_scale",
                    0.0,
                    1.0,
                    0.0,
                    "apg: weight of the parallel component",
                ),
                ParamSpec::float(
                    "apg_norm_threshold",
                    0.0,
                    1000.0,
                    0.0,
                    "apg: largest guidance norm (0 = no limit)",
                ),
                ParamSpec::float("interval_low", 0.0, 1.0, 0.0, "guide only for σ ≥ this"),
                ParamSpec::float("interval_high", 0.0, 1.0, 1.0, "guide only for σ ≤ this"),
            ],
            is_output: false,
        },
        run,
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let guidance = Guidance {
        scale: ctx.float("scale"),
        method: GuidanceMethod::from_name(ctx.text("method")).expect("validated choice"),
        rescale_multiplier: ctx.float("rescale_multiplier"),
        apg_parallel_scale: ctx.float("apg_parallel_scale"),
        apg_norm_threshold: ctx.float("apg_norm_threshold"),
        interval: (ctx.float("interval_low"), ctx.float("interval_high")),
    };
    if guidance.interval.0 > guidance.interval.1 {
        return Err(InputError(format!(
            "interval_low ({}) is above interval_high ({})",
            guidance.interval.0, guidance.interval.1
        ))
        .into());
    }
    let positive = ctx
        .conditioning("positive")?
        .expect("validated required input");
    if positive.prompt.trim().is_empty() {
        let _ = ctx.emit(NodeEvent::Warning(
            "the positive prompt is empty, so the model draws anything it likes".into(),
        ));
    }
    let negative = ctx.conditioning("negative")?;
    if negative.is_none() && guidance.scale != 1.0 {
        return Err(InputError(format!(
            "input negative is not connected, but scale {} needs it (connect a prompt, or set scale 1)",
            guidance.scale
        ))
        .into());
    }
    Ok(vec![Value::Guider(Arc::new(Guider {
        model: ctx.model("model")?,
        positive,
        negative,
        guidance,
    }))])
}
