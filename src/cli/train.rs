//! `flowline train`: trains the shapes model on the CPU with a progress bar, checkpointing as
//! it goes so a run can stop at any time and resume.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use flowline_shapes::train::{TrainSettings, Trainer};

use super::{EXIT_BAD_INPUT, EXIT_FAILURE, TrainingSession, fail};

#[derive(Args)]
pub struct TrainArgs {
    /// Folder for checkpoints and the trained model (config.json, model.safetensors).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The run's settings: a TOML file (or JSON, by its name) such as the shipped model's
    /// assets/models/shapes/preset.toml, the default for a new run. With --resume: the settings
    /// the run moves to from now on (its network can only grow).
    #[arg(long, value_name = "FILE")]
    preset: Option<PathBuf>,
    /// Stop once this many steps are done in total.
    #[arg(long, default_value_t = 20_000)]
    steps: usize,
    /// Stop after this many minutes of this session, whatever the step.
    #[arg(long)]
    minutes: Option<f64>,
    /// Continue the run checkpointed in --out.
    #[arg(long)]
    resume: bool,
    /// Checkpoint this often (minutes).
    #[arg(long, default_value_t = 5.0)]
    save_every: f64,
}

/// Steps per entry of the recorded loss history.
const LOSS_BLOCK: usize = 100;

/// The preset a `--preset FILE` option names, if any; a file that cannot be read is bad input.
pub fn preset_arg(path: Option<&std::path::Path>) -> Result<Option<TrainSettings>, ExitCode> {
    path.map(TrainSettings::read_preset)
        .transpose()
        .map_err(|e| fail(EXIT_BAD_INPUT, format!("{e:#}")))
}

pub fn train(args: TrainArgs) -> ExitCode {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let device = candle_core::Device::Cpu;
    let preset = match preset_arg(args.preset.as_deref()) {
        Ok(preset) => preset,
        Err(code) => return code,
    };
    let trainer = if args.resume {
        Trainer::resume_toward(&args.out, &device, preset.as_ref())
    } else {
        Trainer::new(preset.unwrap_or_else(TrainSettings::default_model), &device)
    };
    let mut trainer = match trainer {
        Ok(t) => t,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{e:#}")),
    };
    let session = TrainingSession::new(
        args.minutes,
        args.save_every,
        args.steps,
        trainer.step_count(),
    );
    match train_session(&mut trainer, session, &args.out, args.steps, &command) {
        Ok(()) => {
            println!(
                "trained {} steps in {:.0} s; model written to {}",
                trainer.step_count(),
                trainer.seconds(),
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_FAILURE, format!("{e:#}")),
    }
}

/// Trains until `steps` are done in all or `session` runs out of time, saving into `out` as
/// the session says and at the end, with the progress bar showing the smoothed loss.
pub fn train_session(
    trainer: &mut Trainer,
    mut session: TrainingSession,
    out: &Path,
    steps: usize,
    command: &str,
) -> anyhow::Result<()> {
    let (mut block_sum, mut block_count, mut smoothed) = (0.0f32, 0usize, None::<f32>);
    let mut session_steps = 0;
    while trainer.step_count() < steps && session.has_time() {
        let loss = trainer.train_step()?;
        anyhow::ensure!(
            loss.is_finite(),
            "the loss diverged at step {}",
            trainer.step_count()
        );
        session_steps += 1;
        block_sum += loss;
        block_count += 1;
        let s = smoothed.map_or(loss, |s| 0.98 * s + 0.02 * loss);
        smoothed = Some(s);
        if trainer.step_count().is_multiple_of(LOSS_BLOCK) {
            trainer.record_loss(block_sum / block_count as f32);
            (block_sum, block_count) = (0.0, 0);
        }
        let rate = session_steps as f64 / session.started.elapsed().as_secs_f64();
        session.progress.set_position(trainer.step_count() as u64);
        session
            .progress
            .set_message(format!("loss {s:.4}, {rate:.2} steps/s"));
        if session.save_is_due() {
            trainer.save(out, command)?;
        }
    }
    session.progress.finish_and_clear();
    trainer.save(out, command)
}
