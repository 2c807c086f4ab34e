//! Sampler: walks the start latent down the σ schedule with the guider's velocity, streaming
//! every step.

use crate::flow::sampler::{FreshNoise, SampleOutput, SamplerKind, sample};
use crate::flow::schedule::{FLUX_BASE_SHIFT, FLUX_MAX_SHIFT, Scheduler};
use crate::graph::PortType;
use crate::graph::spec::{NodeSpec, ParamSpec, ParamView, PortSpec};
use crate::graph::value::{Guider, Latent, Value};
use crate::nodes::context::{NodeContext, NodeDef, NodeEvent};

const SCHEDULERS: [&str; 3] = ["simple", "shifted", "flux"];

pub fn definition() -> NodeDef {
    NodeDef {
        spec: NodeSpec {
            type_name: "sampler",
            title: "Sampler",
            category: "sampling",
            description: "Integrates the flow from the start latent to σ = 0.",
            inputs: vec![
                PortSpec::required("guider", PortType::Guider),
                PortSpec::required("latent", PortType::Latent),
            ],
            outputs: vec![PortSpec::required("latent", PortType::Latent)],
            params: integration_params(ParamSpec::int("steps", 1, 1000, 16, "number of steps")),
            is_output: false,
        },
        run,
    }
}

/// The parameters that say how a run integrates, `steps` among them: the sampler, its
/// scheduler and their settings. The Step Sweep node integrates the same way.
pub(super) fn integration_params(steps: ParamSpec) -> Vec<ParamSpec> {
    vec![
        ParamSpec::choice(
            "sampler",
            &SamplerKind::NAMES,
            "euler",
            "integration method",
        ),
        ParamSpec::choice(
            "scheduler",
            &SCHEDULERS,
            "shifted",
            "how σ falls over the steps",
        ),
        steps,
        ParamSpec::float(
            "eta",
            0.0,
            1.0,
            1.0,
            "euler_ancestral: share of each step redrawn as fresh noise",
        )
        .when(ancestral),
        ParamSpec::seed("noise_seed", "euler_ancestral: seed of the fresh noise").when(ancestral),
        ParamSpec::float(
            "shift",
            0.01,
            100.0,
            3.0,
            "shifted: s in σ' = sσ/(1+(s−1)σ)",
        )
        .when(|view, _| view.text("scheduler") == "shifted"),
        ParamSpec::float(
            "base_shift",
            0.0,
            10.0,
            FLUX_BASE_SHIFT,
            "flux: μ at 256 image tokens",
        )
        .when(|view, _| view.text("scheduler") == "flux"),
        ParamSpec::float(
            "max_shift",
            0.0,
            10.0,
            FLUX_MAX_SHIFT,
            "flux: μ at 4096 image tokens",
        )
        .when(|view, _| view.text("scheduler") == "flux"),
    ]
}

/// Whether the sampler redraws noise at each step, which `eta` and `noise_seed` control.
fn ancestral(view: &ParamView<'_>, _param: &str) -> bool {
    view.text("sampler") == "euler_ancestral"
}

/// How a node's parameters (see [`integration_params`]) integrate a start latent.
pub(super) struct Integration {
    kind: SamplerKind,
    scheduler: Scheduler,
    noise: FreshNoise,
}

impl Integration {
    pub(super) fn from_params(
        ctx: &NodeContext<'_>,
        guider: &Guider,
        start: &Latent,
    ) -> anyhow::Result<Integration> {
        let scheduler = match ctx.text("scheduler") {
            "simple" => Scheduler::Simple,
            "shifted" => Scheduler::Shifted {
                shift: ctx.float("shift"),
            },
            _ => Scheduler::Flux {
                base_shift: ctx.float("base_shift"),
                max_shift: ctx.float("max_shift"),
                image_tokens: guider.model.image_tokens(start.tensor.dims()),
            },
        };
        let noise_seed = ctx.int("noise_seed") as u64;
        Ok(Integration {
            kind: SamplerKind::from_name(ctx.text("sampler")).expect("validated choice"),
            scheduler,
            noise: FreshNoise {
                eta: ctx.float("eta"),
                seeds: (0..start.tensor.dim(0)? as u64)
                    .map(|image| noise_seed + image)
                    .collect(),
            },
        })
    }

    /// The same integration with the shifted scheduler's shift set to `shift` (other
    /// schedulers unchanged): a second model may be at its best on another schedule.
    pub(super) fn with_shift(mut self, shift: f64) -> Integration {
        if let Scheduler::Shifted { .. } = self.scheduler {
            self.scheduler = Scheduler::Shifted { shift };
        }
        self
    }

    /// Integrates `start` in `steps` steps with `guider`'s velocity, streaming each step as
    /// the guider's model previews it.
    pub(super) fn run(
        &self,
        ctx: &mut NodeContext<'_>,
        guider: &Guider,
        start: &Latent,
        steps: usize,
    ) -> anyhow::Result<SampleOutput> {
        let sigmas = self.scheduler.sigmas(steps, start.sigma);
        let preview = guider.model.preview().clone();
        let mut field = |x: &candle_core::Tensor, sigma: f64| guider.velocity(x, sigma);
        Ok(sample(
            self.kind,
            &mut field,
            &start.tensor,
            &sigmas,
            &self.noise,
            &mut |record| ctx.emit(NodeEvent::Step(record.clone(), preview.clone())),
        )?)
    }
}

fn run(ctx: &mut NodeContext<'_>) -> anyhow::Result<Vec<Value>> {
    let guider = ctx.guider("guider")?;
    let start = ctx.latent("latent")?;
    let integration = Integration::from_params(ctx, &guider, &start)?;
    let steps = ctx.int("steps") as usize;
    let output = integration.run(ctx, &guider, &start, steps)?;
    let latent = output.latent.clone();
    let _ = ctx.emit(NodeEvent::Trajectory(output));
    Ok(vec![Value::Latent(Latent {
        tensor: latent,
        sigma: 0.0,
    })])
}
