//! `flowline run`: executes a workflow headless with a progress bar.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use flowline_engine::executor::{Event, Executor, RunFailure};
use flowline_engine::files::write_atomic;
use flowline_engine::nodes::context::RunEnv;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::{EXIT_BAD_INPUT, EXIT_FAILURE, fail, open_workflow};

#[derive(Args)]
pub struct RunArgs {
    /// The workflow: a Flowline .json or a PNG Flowline saved, or a ComfyUI workflow (its
    /// editor's or API JSON, or a PNG it saved), converted as `flowline import` does.
    workflow: PathBuf,
    /// The ComfyUI models folder in which to find the model files a ComfyUI workflow names,
    /// besides the Hugging Face cache.
    #[arg(long, value_name = "DIR")]
    models: Option<PathBuf>,
    /// Overrides a parameter, e.g. --set prompt.text="a red star" (repeatable).
    #[arg(long = "set", value_name = "NODE.PARAM=VALUE")]
    assignments: Vec<String>,
    /// Folder that relative save paths are resolved against.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Writes a JSON trace of the run: σ values, straightness, per-step norms, each node's time.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> ExitCode {
    let mut workflow = match open_workflow(&args.workflow, args.models.as_deref()) {
        Ok(workflow) => workflow,
        Err(code) => return code,
    };
    for assignment in &args.assignments {
        if let Err(e) = workflow.apply_assignment(assignment) {
            return fail(EXIT_BAD_INPUT, format!("--set {assignment}: {e}"));
        }
    }
    let env = RunEnv {
        output_dir: args.out.clone(),
        workflow_json: Some(Arc::new(workflow.to_json())),
    };
    let started = Instant::now();
    let mut executor = Executor::spawn();
    executor.run(workflow.graph.clone(), env);

    let progress = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let mut steps = Vec::new();
    let mut samplers = Vec::new();
    let mut images = Vec::new();
    let mut node_seconds = Vec::new();
    let outcome = loop {
        let Ok(event) = executor.events().recv() else {
            break Err(fail(EXIT_FAILURE, "the executor stopped unexpectedly"));
        };
        match event {
            Event::NodeStarted { node, .. } => {
                progress.set_prefix(node);
                progress.set_message("");
            }
            Event::NodeCached { node, .. } => progress.println(format!("{node}: from cache")),
            Event::NodeFinished { node, seconds, .. } => {
                progress.println(format!("{node}: {seconds:.2} s"));
                node_seconds.push(json!({ "node": node, "seconds": seconds }));
            }
            Event::Warning { node, message, .. } => {
                tell(&progress, format!("warning: node {node:?}: {message}"));
            }
            Event::Info { node, message, .. } => tell(&progress, format!("{node}: {message}")),
            Event::Step { node, step, .. } => {
                let r = &step.record;
                progress.set_length(r.steps as u64);
                progress.set_position(r.index as u64 + 1);
                progress.set_message(format!("σ={:.3}", r.sigma));
                steps.push(json!({
                    "node": node, "index": r.index, "sigma": r.sigma,
                    "sigma_next": r.sigma_next, "velocity_norm": r.velocity_norm,
                }));
            }
            Event::Trajectory {
                node,
                sigmas,
                straightness,
                ..
            } => {
                samplers
                    .push(json!({ "node": node, "sigmas": sigmas, "straightness": straightness }));
            }
            Event::Image {
                path: Some(path), ..
            } => {
                progress.suspend(|| println!("{}", path.display()));
                images.push(path.display().to_string());
            }
            Event::RunFinished { .. } => break Ok(()),
            Event::RunCancelled { .. } => break Err(fail(EXIT_FAILURE, "the run was cancelled")),
            Event::RunFailed { failure, .. } => {
                progress.finish_and_clear();
                let code = match &failure {
                    RunFailure::Invalid(_)
                    | RunFailure::Node {
                        bad_input: true, ..
                    } => EXIT_BAD_INPUT,
                    RunFailure::Node { .. } => EXIT_FAILURE,
                };
                break Err(fail(code, failure));
            }
            _ => {}
        }
    };
    progress.finish_and_clear();
    if let Err(code) = outcome {
        return code;
    }
    if let Some(trace_path) = &args.trace {
        let last = samplers.last().cloned().unwrap_or_else(|| json!({}));
        let trace = json!({
            "workflow": args.workflow.display().to_string(),
            "sigmas": last.get("sigmas"),
            "straightness": last.get("straightness"),
            "samplers": samplers,
            "steps": steps,
            "images": images,
            "nodes": node_seconds,
            "seconds": started.elapsed().as_secs_f64(),
        });
        let text = serde_json::to_string_pretty(&trace).expect("a trace serialises");
        if let Err(e) = write_atomic(trace_path, text.as_bytes()) {
            return fail(EXIT_FAILURE, format!("{e:#}"));
        }
    }
    ExitCode::SUCCESS
}

/// Shows a line the user must see: above the progress bar on a terminal, on stderr otherwise
/// (a hidden bar drops its lines, and logs need warnings too).
fn tell(progress: &ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}
