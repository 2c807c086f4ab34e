//! `flowline bench`: what a run costs.
//!
//! First a workflow end to end (the default one, or any file `flowline run` reads; model load
//! included, a fresh executor each time, so nothing is cached), the time each node took and
//! the process's peak memory once it finished, so users can see where their own models spend
//! time and memory; `--set` changes the workflow as in `flowline run`, so
//! `--set cfg.autoguide_scale=1` measures the shapes model without its guide. For the default
//! workflow, then how much the sampling loop itself costs per step, apart from the model: the
//! overhead is measured with a velocity field that costs nothing (it returns a tensor computed
//! beforehand), so what remains is record keeping, norms, divergence checks and the update
//! itself; the workflow model's own time per evaluation is measured separately. Last, what one
//! training step of the shipped model's configuration costs (`flowline train`'s default preset,
//! its batch of 32), the number that decides how far a CPU session of training gets.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use flowline_engine::executor::{Event, Executor};
use flowline_engine::flow::noise::gaussian;
use flowline_engine::flow::sampler::{FreshNoise, SamplerKind, sample};
use flowline_engine::flow::schedule::Scheduler;
use flowline_engine::graph::ParamValue;
use flowline_engine::model::{LoadRequest, family, family_names};
use flowline_engine::nodes::context::RunEnv;
use flowline_engine::workflow::{DEFAULT_WORKFLOW, Workflow};
use flowline_shapes::train::{TrainSettings, Trainer};

use super::{EXIT_BAD_INPUT, EXIT_FAILURE, fail, open_workflow};

#[derive(Args)]
pub struct BenchArgs {
    /// The workflow to measure (default: the default workflow); a ComfyUI workflow too, as
    /// `flowline run` reads it. Only the default workflow's bench adds the sampler, model and
    /// training rows.
    workflow: Option<PathBuf>,
    /// The ComfyUI models folder a ComfyUI workflow's model files are found in.
    #[arg(long, value_name = "DIR")]
    models: Option<PathBuf>,
    /// Steps per measured run.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Measured runs per row (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Overrides a parameter of the default workflow, e.g. --set cfg.autoguide_scale=1.
    #[arg(long = "set", value_name = "NODE.PARAM=VALUE")]
    set: Vec<String>,
}

const LATENT_SHAPES: [[usize; 4]; 3] = [[1, 3, 64, 64], [1, 16, 64, 64], [1, 16, 128, 128]];

pub fn bench(args: BenchArgs) -> ExitCode {
    let workflow = match &args.workflow {
        Some(path) => open_workflow(path, args.models.as_deref()),
        None => Workflow::from_json(DEFAULT_WORKFLOW, "default workflow")
            .map_err(|e| fail(EXIT_FAILURE, format!("{e:#}"))),
    };
    let mut workflow = match workflow {
        Ok(workflow) => workflow,
        Err(code) => return code,
    };
    for assignment in &args.set {
        if let Err(e) = workflow.apply_assignment(assignment) {
            return fail(EXIT_BAD_INPUT, format!("--set {assignment}: {e}"));
        }
    }
    match run(&args, &workflow) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_FAILURE, format!("{e:#}")),
    }
}

fn median_seconds(
    repeats: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let started = Instant::now();
        f()?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// One node's share of a run: its seconds and the process's peak memory once it finished.
struct NodeCost {
    node: String,
    seconds: f64,
    peak_mib: Option<f64>,
}

/// Runs the workflow once on a fresh executor; returns the seconds it took and what each node
/// cost, in the order they finished.
fn run_workflow(workflow: &Workflow, output: &Path) -> anyhow::Result<(f64, Vec<NodeCost>)> {
    let workflow = workflow.clone();
    let started = Instant::now();
    let mut executor = Executor::spawn();
    let env = RunEnv {
        output_dir: output.to_path_buf(),
        workflow_json: None,
    };
    executor.run(workflow.graph, env);
    let mut nodes = Vec::new();
    loop {
        match executor.events().recv()? {
            Event::NodeFinished { node, seconds, .. } => nodes.push(NodeCost {
                node,
                seconds,
                peak_mib: peak_memory_mib(),
            }),
            Event::RunFinished { .. } => return Ok((started.elapsed().as_secs_f64(), nodes)),
            Event::RunFailed { failure, .. } => anyhow::bail!("{failure}"),
            Event::RunCancelled { .. } => anyhow::bail!("the run was cancelled"),
            _ => {}
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Each node's median seconds over `runs`, its share of the run, and the process's peak memory
/// once it finished in the first run (the peak only grows, so the node that raises it is the
/// one to look at).
fn print_node_costs(workflow: &Workflow, runs: &[(f64, Vec<NodeCost>)]) {
    println!(
        "Per node, median of {} (peak memory: the process's, once the node finished, first run)",
        runs.len()
    );
    println!(
        "{:<16} {:<20} {:>10} {:>7} {:>12}",
        "node", "type", "seconds", "share", "peak memory"
    );
    let total: f64 = median(runs.iter().map(|(seconds, _)| *seconds).collect());
    for first in &runs[0].1 {
        let seconds = median(
            runs.iter()
                .filter_map(|(_, nodes)| nodes.iter().find(|n| n.node == first.node))
                .map(|n| n.seconds)
                .collect(),
        );
        let type_name = workflow
            .graph
            .node(&first.node)
            .map_or("", |n| n.type_name.as_str());
        let peak = first
            .peak_mib
            .map_or("n/a".to_string(), |mib| format!("{mib:.0} MiB"));
        println!(
            "{:<16} {:<20} {:>10.3} {:>6.1}% {:>12}",
            first.node,
            type_name,
            seconds,
            100.0 * seconds / total,
            peak
        );
    }
}

/// The process's peak resident memory in MiB, where the system tells it (Linux).
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn run(args: &BenchArgs, workflow: &Workflow) -> anyhow::Result<()> {
    let output = tempfile::tempdir()?;
    let mut runs = Vec::with_capacity(args.repeats.max(1));
    for _ in 0..args.repeats.max(1) {
        runs.push(run_workflow(workflow, output.path())?);
    }
    let seconds = median(runs.iter().map(|(seconds, _)| *seconds).collect());
    let model_node = workflow.graph.node("model").map(|n| &n.params);
    let family_name = match model_node.and_then(|p| p.get("family")) {
        Some(ParamValue::Text(name)) => name.clone(),
        _ => family_names()[0].to_string(),
    };
    match &args.workflow {
        Some(path) => println!(
            "{} end to end (model load included), median of {}",
            path.display(),
            args.repeats
        ),
        None => {
            let sampler = workflow.graph.node("sampler").map(|n| &n.params);
            let describe = |key: &str| {
                sampler
                    .and_then(|p| p.get(key))
                    .map_or("default".to_string(), |v| v.to_string())
            };
            println!(
                "Default workflow end to end (model {family_name} loaded, prompts, {} {} steps with CFG, decode, save), median of {}",
                describe("steps"),
                describe("sampler"),
                args.repeats
            );
        }
    }
    println!("{:<24} {:>10}", "wall time", format!("{:.3} s", seconds));
    match peak_memory_mib() {
        Some(mib) => println!(
            "{:<24} {:>10}",
            "peak memory (process)",
            format!("{mib:.0} MiB")
        ),
        None => println!("{:<24} {:>10}", "peak memory (process)", "n/a"),
    }
    println!();
    print_node_costs(workflow, &runs);
    if args.workflow.is_some() {
        return Ok(());
    }
    println!();

    let sigmas = Scheduler::Shifted { shift: 3.0 }.sigmas(args.steps, 1.0);
    println!(
        "Sampler overhead per step (model cost excluded), median of {} runs of {} steps",
        args.repeats, args.steps
    );
    println!(
        "{:<16} {:<16} {:>14} {:>12}",
        "sampler", "latent", "overhead/step", "evals/step"
    );
    for shape in LATENT_SHAPES {
        let start = gaussian(1, &shape[..], &Device::Cpu)?;
        let velocity = gaussian(2, &shape[..], &Device::Cpu)?.affine(1e-3, 0.0)?;
        for kind in SamplerKind::ALL {
            let mut evaluations = 0usize;
            let mut field = |_: &Tensor, _: f64| {
                evaluations += 1;
                Ok(velocity.clone())
            };
            let noise = FreshNoise {
                eta: 1.0,
                seeds: vec![3; shape[0]],
            };
            let seconds = median_seconds(args.repeats, || {
                sample(kind, &mut field, &start, &sigmas, &noise, &mut |_| {
                    ControlFlow::Continue(())
                })?;
                Ok(())
            })?;
            let evals = evaluations as f64 / (args.repeats.max(1) * args.steps) as f64;
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            println!(
                "{:<16} {:<16} {:>11.1} µs {:>12.2}",
                kind.name(),
                dims.join("×"),
                seconds / args.steps as f64 * 1e6,
                evals
            );
        }
    }

    let family = family(&family_name).with_context(|| format!("no model family {family_name}"))?;
    let model = (family.load)(&LoadRequest::new("", &Device::Cpu), &mut |_| {})?;
    let shape = model.latent_shape(64, 64)?;
    let conditioning = model.encode_prompt("a red circle")?;
    let x = gaussian(3, shape, &Device::Cpu)?;
    let seconds = median_seconds(args.repeats * 4, || {
        model.velocity(&x, 0.5, &conditioning)?;
        Ok(())
    })?;
    println!();
    println!("Model time per evaluation, for comparison");
    println!("{:<10} {:>14}", "model", "time/eval");
    println!("{:<10} {:>11.1} µs", family.name, seconds * 1e6);

    let settings = TrainSettings::default_model();
    let batch = settings.batch;
    let mut trainer = Trainer::new(settings, &Device::Cpu)?;
    trainer.train_step()?;
    let seconds = median_seconds(args.repeats, || {
        trainer.train_step()?;
        Ok(())
    })?;
    println!();
    println!(
        "Training step of the shapes model (train's default preset, batch {batch}), median of {}",
        args.repeats
    );
    println!("{:<24} {:>10}", "time/step", format!("{seconds:.3} s"));
    Ok(())
}
