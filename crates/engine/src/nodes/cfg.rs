//! CFG: model + positive + negative conditioning → GUIDER, with the guidance variants that
//! counter flow models' burn-in at high scales.
//!
//! FLUX.1 [dev]'s distilled guidance lives here too: like CFG it is a per-run guidance
//! setting, not a property of the weights, so changing it must not reload the model (the Load
//! Model node's output is cached) nor re-encode the prompt. The node stamps it on the
//! conditionings it passes on; families without a guidance input ignore it.
//!
//! Autoguidance needs a second model, so it is an input here rather than a method: a weaker
//! version of the model (the shapes model earlier in its training, say) on `guide_model` adds
//! `(w − 1)·(v_c − v_weak)` to whichever guidance the method gives (see
//! [`crate::graph::value::Autoguide`]). Like CFG it applies only inside the guidance interval;
//! at scale 1 it is off, and the guide model is not run.

use std::sync::Arc;

use crate::error::InputError;
use crate::flow::guidance::{Guidance, GuidanceMethod};
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, PortSpec};
use crate::graph::value::{Autoguide, ClassifierGuide, Guider, Value};
use crate::model::{Conditioning, FlowModel};
use crate::nodes::context::{NodeContext, NodeDef, NodeEvent};

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "cfg",
            title: "CFG",
            category: "sampling",
            description: "Classifier-free guidance; scale 1 uses the positive prompt alone at half the cost. A weaker version of the model on guide_model adds autoguidance.",
            inputs: vec![
                PortSpec::required("model", PortType::Model),
                PortSpec::required("positive", PortType::Conditioning),
                PortSpec::optional("negative", PortType::Conditioning),
                PortSpec::optional("guide_model", PortType::Model),
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
                )
                .when(|view, _| view.text("method") == "rescale"),
                ParamSpec::float(
                    "apg_parallel_scale",
                    0.0,
                    1.0,
                    0.0,
                    "apg: weight of the parallel component",
                )
                .when(|view, _| view.text("method") == "apg"),
                ParamSpec::float(
                    "apg_norm_threshold",
                    0.0,
                    1000.0,
                    0.0,
                    "apg: largest guidance norm (0 = no limit)",
                )
                .when(|view, _| view.text("method") == "apg"),
                ParamSpec::float(
                    "distilled_guidance",
                    0.0,
                    30.0,
                    crate::model::DEFAULT_DISTILLED_GUIDANCE,
                    "FLUX.1 [dev]'s built-in guidance input (other models ignore it)",
                )
                .folded(),
                ParamSpec::float(
                    "interval_low",
                    0.0,
                    1.0,
                    0.0,
                    "guide (and autoguide) only for σ ≥ this",
                )
                .folded(),
                ParamSpec::float(
                    "interval_high",
                    0.0,
                    1.0,
                    1.0,
                    "guide (and autoguide) only for σ ≤ this",
                )
                .folded(),
                ParamSpec::float(
                    "autoguide_scale",
                    1.0,
                    10.0,
                    2.0,
                    "autoguidance: how far to step away from guide_model, a weaker version of the model (1 = off)",
                )
                .when(|view, _| view.is_connected("guide_model")),
                ParamSpec::float(
                    "classifier_scale",
                    0.0,
                    20.0,
                    0.0,
                    "classifier guidance by the model's own caption classifier, where it has one (0 = off)",
                )
                .folded(),
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
    let distilled_guidance = Some(ctx.float("distilled_guidance"));
    let with_distilled_guidance = |c: Arc<Conditioning>| {
        Arc::new(Conditioning {
            distilled_guidance,
            ..(*c).clone()
        })
    };
    let positive = with_distilled_guidance(
        ctx.conditioning("positive")?
            .expect("validated required input"),
    );
    if positive.prompt.trim().is_empty() {
        let _ = ctx.emit(NodeEvent::Warning(
            "the positive prompt is empty, so the model draws anything it likes".into(),
        ));
    }
    let negative = ctx.conditioning("negative")?.map(with_distilled_guidance);
    if negative.is_none() && guidance.scale != 1.0 {
        return Err(InputError(format!(
            "input negative is not connected, but scale {} needs it (connect a prompt, or set scale 1)",
            guidance.scale
        ))
        .into());
    }
    let model = ctx.model("model")?;
    let autoguide_scale = ctx.float("autoguide_scale");
    let autoguide = match ctx.optional_model("guide_model")? {
        Some(weak) if autoguide_scale != 1.0 => {
            Some(autoguide(&model, weak, &positive, autoguide_scale)?)
        }
        _ => None,
    };
    let classifier = ClassifierGuide {
        prompts: vec![positive.prompt.clone()],
        scale: ctx.float("classifier_scale"),
    };
    classifier.check_available(model.as_ref())?;
    Ok(vec![Value::Guider(Arc::new(Guider {
        model,
        positive,
        negative,
        guidance,
        autoguide,
        classifier: Some(classifier),
    }))])
}

/// Autoguidance of `model` by `weak`, which must share its latent space: the positive prompt
/// is encoded again by the weak model's own prompt encoder.
fn autoguide(
    model: &Arc<dyn FlowModel>,
    weak: Arc<dyn FlowModel>,
    positive: &Conditioning,
    scale: f64,
) -> anyhow::Result<Autoguide> {
    Autoguide::check_compatible(model.as_ref(), weak.as_ref())?;
    let encoded = weak.encode_prompt(&positive.prompt)?;
    Ok(Autoguide {
        model: weak,
        positive: Arc::new(Conditioning {
            distilled_guidance: positive.distilled_guidance,
            ..encoded
        }),
        scale,
    })
}
