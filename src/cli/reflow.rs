//! `flowline reflow`: straightens the shapes model's paths (see `flowline_shapes::reflow`).
//!
//! The run's folder starts as a copy of the teacher's; the teacher's couplings are generated
//! into it in chunks, each saved, then the copy trains on them. Every stage picks up where the
//! last session stopped, so a run spreads over as many sessions as it needs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use flowline_engine::model::FlowModel;
use flowline_shapes::config::{CONFIG_FILE, SHIPPED_DIR, SHIPPED_GUIDE_DIR, WEIGHTS_FILE};
use flowline_shapes::model::ShapesModel;
use flowline_shapes::reflow::{Couplings, coupling_cases, generate};
use flowline_shapes::train::{CHECKPOINT_FILE, CHECKPOINT_STATE, OPTIMIZER_FILE, Trainer};

use super::train::{preset_arg, train_session};
use super::{EXIT_BAD_INPUT, EXIT_FAILURE, TrainingSession, fail};

#[derive(Args)]
pub struct ReflowArgs {
    /// Folder of the reflow run: a copy of the teacher, its couplings, checkpoints and the
    /// straightened model (config.json, model.safetensors).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The teacher (default: the shipped shapes model).
    #[arg(long, value_name = "DIR")]
    teacher: Option<PathBuf>,
    /// The teacher's weaker guide, for its autoguidance (default: the shipped shapes-guide).
    #[arg(long, value_name = "DIR")]
    guide: Option<PathBuf>,
    /// Couplings (noise, teacher's picture) to generate before training.
    #[arg(long, default_value_t = 20_000)]
    couplings: usize,
    /// Couplings the teacher generates at once.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// The student's settings from now on (a TOML or JSON preset; the network can only grow,
    /// and posterior references are off whatever it says).
    #[arg(long, value_name = "FILE")]
    preset: Option<PathBuf>,
    /// Stop once the run has this many training steps in all (the teacher's included).
    #[arg(long)]
    steps: usize,
    /// Stop after this many minutes of this session, whatever the stage.
    #[arg(long)]
    minutes: Option<f64>,
    /// Checkpoint this often (minutes).
    #[arg(long, default_value_t = 5.0)]
    save_every: f64,
}

/// Couplings generated and saved at a time.
const CHUNK: usize = 200;
/// The history file a run keeps beside its model.
const HISTORY_FILE: &str = "HISTORY.md";

pub fn reflow(args: ReflowArgs) -> ExitCode {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let started = Instant::now();
    let deadline = args
        .minutes
        .map(|minutes| started + Duration::from_secs_f64(minutes * 60.0));
    let teacher = args.teacher.clone().unwrap_or_else(|| SHIPPED_DIR.into());
    let guide = args
        .guide
        .clone()
        .unwrap_or_else(|| SHIPPED_GUIDE_DIR.into());
    let preset = match preset_arg(args.preset.as_deref()) {
        Ok(preset) => preset,
        Err(code) => return code,
    };
    if let Err(e) = copy_teacher(&teacher, &args.out) {
        return fail(EXIT_BAD_INPUT, format!("{e:#}"));
    }
    let couplings = match couplings(&args, &teacher, &guide, deadline) {
        Ok(couplings) => couplings,
        Err(e) => return fail(EXIT_FAILURE, format!("{e:#}")),
    };
    if couplings.len() < args.couplings {
        println!(
            "{} of {} couplings generated; run again to go on",
            couplings.len(),
            args.couplings
        );
        return ExitCode::SUCCESS;
    }
    let mut trainer = match Trainer::resume_toward(&args.out, &Device::Cpu, preset.as_ref())
        .and_then(|mut trainer| {
            // Each noise trains towards the teacher's own picture of it, not a posterior mean.
            trainer.set_posterior_references(0);
            trainer.set_couplings(couplings)?;
            Ok(trainer)
        }) {
        Ok(trainer) => trainer,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{e:#}")),
    };
    let first_step = trainer.step_count();
    let minutes_left =
        deadline.map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64() / 60.0);
    let session = TrainingSession::new(
        minutes_left,
        args.save_every,
        args.steps,
        trainer.step_count(),
    );
    let trained = train_session(&mut trainer, session, &args.out, args.steps, &command)
        .and_then(|()| record(&args.out, &trainer, first_step, args.couplings));
    match trained {
        Ok(()) => {
            println!(
                "reflow trained steps {first_step} to {}; model written to {}",
                trainer.step_count(),
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_FAILURE, format!("{e:#}")),
    }
}

/// Starts the run's folder as a copy of the teacher's, where it has no checkpoint yet.
fn copy_teacher(teacher: &Path, out: &Path) -> anyhow::Result<()> {
    if out.join(CHECKPOINT_STATE).exists() {
        return Ok(());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for file in [
        CONFIG_FILE,
        WEIGHTS_FILE,
        CHECKPOINT_FILE,
        CHECKPOINT_STATE,
        OPTIMIZER_FILE,
    ] {
        let from = teacher.join(file);
        // Every file but the optimizer's moments, which shipped models leave out, is needed.
        if from.exists() || file != OPTIMIZER_FILE {
            std::fs::copy(&from, out.join(file)).with_context(|| {
                format!(
                    "cannot copy the teacher's {} into {}",
                    from.display(),
                    out.display()
                )
            })?;
        }
    }
    Ok(())
}

/// The run's couplings: those saved, then more from the teacher, a chunk at a time, until
/// there are as many as asked or the session's time is up.
fn couplings(
    args: &ReflowArgs,
    teacher: &Path,
    guide: &Path,
    deadline: Option<Instant>,
) -> anyhow::Result<Couplings> {
    let device = Device::Cpu;
    let mut couplings = Couplings::read(&args.out, &device)?;
    let done = couplings.as_ref().map_or(0, Couplings::len);
    if done >= args.couplings {
        return couplings.context("couplings were read");
    }
    let load = |folder: &Path| -> anyhow::Result<Arc<dyn FlowModel>> {
        Ok(Arc::new(ShapesModel::load(folder, &device)?))
    };
    let (teacher, guide) = (load(teacher)?, load(guide)?);
    let progress = indicatif::ProgressBar::new(args.couplings as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] [{bar:30}] {pos}/{len} couplings",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    progress.set_position(done as u64);
    let mut done = done;
    while done < args.couplings && deadline.is_none_or(|d| Instant::now() < d) {
        let cases = coupling_cases(done, CHUNK.min(args.couplings - done));
        let more = generate(&teacher, &guide, &cases, args.batch)?;
        let all = match couplings {
            Some(saved) => saved.extended(more)?,
            None => more,
        };
        all.write(&args.out)?;
        done = all.len();
        couplings = Some(all);
        progress.set_position(done as u64);
    }
    progress.finish_and_clear();
    couplings.context("no couplings were generated before the time ran out")
}

/// Appends this session's figures to the run's history file.
fn record(
    out: &Path,
    trainer: &Trainer,
    first_step: usize,
    couplings: usize,
) -> anyhow::Result<()> {
    use std::io::Write;
    let path = out.join(HISTORY_FILE);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let loss = trainer
        .loss_history()
        .last()
        .map_or("none yet".to_string(), |(_, loss)| format!("{loss:.4}"));
    writeln!(
        file,
        "- reflow on {couplings} couplings: steps {first_step} to {}, {:.0} s of training in all, \
         last mean loss {loss}",
        trainer.step_count(),
        trainer.seconds()
    )
    .with_context(|| format!("cannot write {}", path.display()))
}
