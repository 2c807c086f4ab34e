//! `flowline train-classifier`: trains a shapes model's caption classifier (for classifier
//! guidance) in the model's own folder, with a progress bar, saving as it goes so a run can
//! stop at any time and resume.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use flowline_shapes::classifier::{ClassifierConfig, ClassifierTrainer};
use flowline_shapes::model::ShapesModel;

use super::{EXIT_BAD_INPUT, EXIT_FAILURE, TrainingSession, fail};

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// The shipped classifier's sizes.
    Default,
    /// A very small classifier that trains in seconds (tests, CI).
    Tiny,
}

#[derive(Args)]
pub struct TrainClassifierArgs {
    /// The shapes model folder: the classifier learns its latent space and is written into it
    /// (classifier.json, classifier.safetensors).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[arg(long, value_enum, default_value = "default")]
    preset: Preset,
    /// Stop once this many steps are done in total.
    #[arg(long, default_value_t = 3_000)]
    steps: usize,
    /// Stop after this many minutes of this session, whatever the step.
    #[arg(long)]
    minutes: Option<f64>,
    /// Continue the classifier in --model.
    #[arg(long)]
    resume: bool,
    /// Pictures per step (new runs).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Adam's learning rate (new runs).
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,
    /// Seed of the data and the initial weights (new runs).
    #[arg(long, default_value_t = 11)]
    seed: u64,
    /// Save this often (minutes).
    #[arg(long, default_value_t = 2.0)]
    save_every: f64,
}

/// Steps per entry of the recorded history.
const BLOCK: usize = 100;

pub fn train_classifier(args: TrainClassifierArgs) -> ExitCode {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let device = candle_core::Device::Cpu;
    let model = match ShapesModel::load(&args.model, &device) {
        Ok(model) => model,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{e:#}")),
    };
    let autoencoder = model.autoencoder().clone();
    let trainer = if args.resume {
        ClassifierTrainer::resume(&args.model, autoencoder, &device)
    } else {
        let network = &model.config().network;
        let (channels, size) = (network.latent_channels, network.latent_size);
        let config = match args.preset {
            Preset::Default => ClassifierConfig::default_for(channels, size),
            Preset::Tiny => ClassifierConfig::tiny_for(channels, size),
        };
        ClassifierTrainer::new(
            config,
            autoencoder,
            args.batch,
            args.learning_rate,
            args.seed,
            &device,
        )
    };
    let mut trainer = match trainer {
        Ok(t) => t,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{e:#}")),
    };
    match run(&mut trainer, &args, &command) {
        Ok(()) => {
            println!(
                "trained the classifier {} steps; written to {}",
                trainer.steps(),
                args.model.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_FAILURE, format!("{e:#}")),
    }
}

fn run(
    trainer: &mut ClassifierTrainer,
    args: &TrainClassifierArgs,
    command: &str,
) -> anyhow::Result<()> {
    let mut session =
        TrainingSession::new(args.minutes, args.save_every, args.steps, trainer.steps());
    let names = ClassifierTrainer::attribute_names();
    let mut block: Vec<(f32, Vec<f32>)> = Vec::new();
    while trainer.steps() < args.steps && session.has_time() {
        let report = trainer.train_step()?;
        anyhow::ensure!(
            report.loss.is_finite(),
            "the loss diverged at step {}",
            trainer.steps()
        );
        block.push((report.loss, report.accuracy));
        if trainer.steps().is_multiple_of(BLOCK) || block.len() == BLOCK {
            let loss = block.iter().map(|(l, _)| l).sum::<f32>() / block.len() as f32;
            let accuracy: Vec<f32> = (0..names.len())
                .map(|i| {
                    let seen: Vec<f32> = block
                        .iter()
                        .map(|(_, a)| a[i])
                        .filter(|a| a.is_finite())
                        .collect();
                    seen.iter().sum::<f32>() / seen.len().max(1) as f32
                })
                .collect();
            let summary = names
                .iter()
                .zip(&accuracy)
                .map(|(name, a)| format!("{name} {:.0}%", 100.0 * a))
                .collect::<Vec<_>>()
                .join(", ");
            session
                .progress
                .set_message(format!("loss {loss:.3}; {summary}"));
            trainer.record(loss, accuracy);
            block.clear();
        }
        session.progress.set_position(trainer.steps() as u64);
        if session.save_is_due() {
            trainer.save(&args.model, command)?;
        }
    }
    session.progress.finish_and_clear();
    trainer.save(&args.model, command)
}
