//! `flowline train`: trains the shapes model on the CPU with a progress bar, checkpointing as
//! it goes so a run can stop at any time and resume.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use flowline::model::shapes::train::{Growth, ShapeWeights, TimeSampling, TrainSettings, Trainer};

use super::{EXIT_BAD_INPUT, EXIT_FAILURE, TrainingSession, fail};

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// The shipped model's configuration.
    Default,
    /// A very small network that trains in seconds (tests, CI).
    Tiny,
}

/// How training draws the time the σ shift warps (see [`TimeSampling`]).
#[derive(Clone, Copy, ValueEnum)]
enum TimeSamplingArg {
    /// The sigmoid of a standard normal (SD3's logit-normal): most draws mid-path.
    LogitNormal,
    /// Uniform, as a sampler with evenly spaced steps visits it.
    Uniform,
}

impl From<TimeSamplingArg> for TimeSampling {
    fn from(arg: TimeSamplingArg) -> Self {
        match arg {
            TimeSamplingArg::LogitNormal => TimeSampling::LogitNormal,
            TimeSamplingArg::Uniform => TimeSampling::Uniform,
        }
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// Folder for checkpoints and the trained model (config.json, model.safetensors).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "default")]
    preset: Preset,
    /// Stop once this many steps are done in total.
    #[arg(long, default_value_t = 20_000)]
    steps: usize,
    /// Stop after this many minutes of this session, whatever the step.
    #[arg(long)]
    minutes: Option<f64>,
    /// Continue the run checkpointed in --out.
    #[arg(long)]
    resume: bool,
    /// Shift of the training σ distribution (on --resume: changes it from now on).
    #[arg(long)]
    sigma_shift: Option<f64>,
    /// How the time that the σ shift warps is drawn (on --resume: changes it from now on).
    #[arg(long, value_enum)]
    time_sampling: Option<TimeSamplingArg>,
    /// Adam's learning rate (on --resume: changes it from now on).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Share of the weights' moving average each step keeps: nearer 1, the shipped weights
    /// average over more steps (on --resume: changes it from now on).
    #[arg(long, value_name = "DECAY")]
    ema_decay: Option<f64>,
    /// Channels of the convolutional head (on --resume: adds one to a run that has none).
    #[arg(long, value_name = "CHANNELS")]
    conv_head: Option<usize>,
    /// Resolutions the convolutional head works at, each more at half the side (on --resume:
    /// adds the coarser ones to a run's head).
    #[arg(long, value_name = "COUNT", value_parser = clap::value_parser!(u16).range(1..=4))]
    conv_head_scales: Option<u16>,
    /// Residual blocks of the convolutional head at latent resolution (on --resume: appends new
    /// ones, which start as the identity).
    #[arg(long, value_name = "BLOCKS")]
    conv_head_blocks: Option<usize>,
    /// Whether the convolutional head gets the DiT's last token features beside its output (on
    /// --resume: adds them to a head without, starting at zero).
    #[arg(long)]
    conv_head_features: bool,
    /// DiT blocks in all (on --resume: appends new ones, which start as the identity).
    #[arg(long, value_name = "BLOCKS")]
    depth: Option<usize>,
    /// Further pictures of each caption drawn every step, whose posterior mean (with the batch's
    /// own picture) is the regression target; 0: the batch's picture alone (on --resume: changes
    /// it from now on).
    #[arg(long, value_name = "COUNT")]
    posterior_references: Option<usize>,
    /// How far a new run whitens its latent channels: 0, one scale for all; 1, each channel to
    /// unit deviation, so the edge channels are not drowned by noise long after the mean colours
    /// (a run keeps the latent space it started with).
    #[arg(long, value_name = "W")]
    latent_whitening: Option<f64>,
    /// How far each noise level's share of the gradient is evened out: 0, the plain mean squared
    /// error; 1, every picture's error divided by the running mean loss at its σ, so every noise
    /// level weighs alike (on --resume: changes it from now on).
    #[arg(long, value_name = "P", value_parser = balance_power)]
    loss_balance: Option<f64>,
    /// How far the latent channels' shares of the loss are evened out: 0, the plain mean; 1,
    /// every channel's error divided by its variance, so the faint channels that place edges
    /// inside a patch weigh like the mean colours (on --resume: changes it from now on).
    #[arg(long, value_name = "P", value_parser = balance_power)]
    channel_loss_power: Option<f64>,
    /// How often each shape is trained on relative to the others, as `cross=2,star=1.5`
    /// (shapes not named weigh 1; a picture is kept with probability its shape's weight over
    /// the largest); an empty list trains every shape alike (on --resume: changes it from now
    /// on).
    #[arg(long, value_name = "SHAPE=WEIGHT,...", value_parser = ShapeWeights::parse)]
    shape_weights: Option<ShapeWeights>,
    /// Checkpoint this often (minutes).
    #[arg(long, default_value_t = 5.0)]
    save_every: f64,
}

/// A `--loss-balance` or `--channel-loss-power` power, between 0 and 1.
fn balance_power(text: &str) -> Result<f64, String> {
    let power: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&power) {
        Ok(power)
    } else {
        Err(format!("the power must be between 0 and 1, not {power}"))
    }
}

/// The first option given that shapes the convolutional head, by its name on the command line.
fn head_shaping_option(args: &TrainArgs) -> Option<&'static str> {
    [
        (args.conv_head_scales.is_some(), "--conv-head-scales"),
        (args.conv_head_blocks.is_some(), "--conv-head-blocks"),
        (args.conv_head_features, "--conv-head-features"),
    ]
    .into_iter()
    .find_map(|(given, name)| given.then_some(name))
}

/// Steps per entry of the recorded loss history.
const LOSS_BLOCK: usize = 100;

pub fn train(args: TrainArgs) -> ExitCode {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let device = candle_core::Device::Cpu;
    let trainer = if args.resume {
        if args.latent_whitening.is_some() {
            return fail(
                EXIT_BAD_INPUT,
                "--latent-whitening sets a new run's latent space; a resumed run keeps its own",
            );
        }
        Trainer::resume(
            &args.out,
            &device,
            Growth {
                conv_head: args.conv_head,
                conv_head_scales: args.conv_head_scales.map(usize::from),
                conv_head_blocks: args.conv_head_blocks,
                depth: args.depth,
                conv_head_features: args.conv_head_features,
            },
        )
    } else {
        let mut settings = match args.preset {
            Preset::Default => TrainSettings::default_model(),
            Preset::Tiny => TrainSettings::tiny(),
        };
        if let Some(channels) = args.conv_head {
            settings.network.conv_head = channels;
        }
        if let Some(scales) = args.conv_head_scales {
            settings.network.conv_head_scales = usize::from(scales);
        }
        if let Some(blocks) = args.conv_head_blocks {
            settings.network.conv_head_blocks = blocks;
        }
        if let Some(depth) = args.depth {
            settings.network.depth = depth;
        }
        settings.network.conv_head_features |= args.conv_head_features;
        if settings.network.conv_head == 0
            && let Some(option) = head_shaping_option(&args)
        {
            return fail(
                EXIT_BAD_INPUT,
                format!("{option} shapes the convolutional head, which --conv-head 0 leaves out"),
            );
        }
        if let Some(whitening) = args.latent_whitening {
            settings.latent_whitening = whitening;
        }
        Trainer::new(settings, &device)
    };
    let mut trainer = match trainer {
        Ok(t) => t,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{e:#}")),
    };
    if let Some(shift) = args.sigma_shift {
        trainer.set_sigma_shift(shift);
    }
    if let Some(rate) = args.learning_rate {
        trainer.set_learning_rate(rate);
    }
    if let Some(decay) = args.ema_decay
        && let Err(e) = trainer.set_ema_decay(decay)
    {
        return fail(EXIT_BAD_INPUT, format!("{e:#}"));
    }
    if let Some(sampling) = args.time_sampling {
        trainer.set_time_sampling(sampling.into());
    }
    if let Some(count) = args.posterior_references {
        trainer.set_posterior_references(count);
    }
    if let Some(balance) = args.loss_balance {
        trainer.set_loss_balance(balance);
    }
    if let Some(weights) = args.shape_weights.clone() {
        trainer.set_shape_weights(weights);
    }
    if let Some(power) = args.channel_loss_power
        && let Err(e) = trainer.set_channel_loss_power(power)
    {
        return fail(EXIT_FAILURE, format!("{e:#}"));
    }
    match run(&mut trainer, &args, &command) {
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

fn run(trainer: &mut Trainer, args: &TrainArgs, command: &str) -> anyhow::Result<()> {
    let mut session = TrainingSession::new(
        args.minutes,
        args.save_every,
        args.steps,
        trainer.step_count(),
    );
    let (mut block_sum, mut block_count, mut smoothed) = (0.0f32, 0usize, None::<f32>);
    let mut session_steps = 0;
    while trainer.step_count() < args.steps && session.has_time() {
        let loss = trainer.train_step(session_steps)?;
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
            trainer.save(&args.out, command)?;
        }
    }
    session.progress.finish_and_clear();
    trainer.save(&args.out, command)
}
