//! The `flowline` command: a thin layer over the engine, the model families and the app.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// candle allocates a fresh buffer for every tensor of every step; with the system allocator
/// each large one is a new mapping, paid for in page faults and TLB flushes (a tenth of a
/// training step, measured). mimalloc keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`: its place in `mi_option_e` (mimalloc.h, where retired
/// options keep their places so the numbers stay stable); the Rust bindings name only some.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays committed before mimalloc gives it back to the system. Its
/// default, 10 ms, is far shorter than a training step, so each step's buffers came back as
/// fresh pages the kernel zeroed again (system time was 7–16 % of a single-threaded training
/// step, measured; 2 % with a delay of seconds). A FLUX step at 512² takes about 6 s on two
/// cores, so a delay of 5 s still purged every step's buffers before the next step (8.7 GiB in
/// a 4-step run, against 4.5 GiB, the text encoders freed after the prompt, with a minute).
/// A minute keeps them from step to step and still returns the memory after a run.
const PURGE_DELAY_MS: std::ffi::c_long = 60_000;

#[derive(Parser)]
#[command(
    name = "flowline",
    version,
    about = "Flow-matching image generation as a node graph",
    long_about = "Flow-matching image generation as a node graph.\n\n\
                  Without a command, this opens the app on the default workflow."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Opens the app on a workflow file, Flowline's or ComfyUI's (or a PNG either saved).
    Open {
        /// The workflow (.json) or image (.png).
        file: PathBuf,
    },
    /// Runs a workflow headless and prints the paths of the images it writes.
    Run(cli::run::RunArgs),
    /// Converts a ComfyUI workflow (JSON or PNG) into a Flowline workflow file.
    Import(cli::import::ImportArgs),
    /// Times the default workflow end to end, the sampler's per-step overhead apart from model time, and a training step.
    Bench(cli::bench::BenchArgs),
    /// Writes a labelled sample grid of the procedural shapes data set.
    Dataset(cli::dataset::DatasetArgs),
    /// Measures prompt adherence on held-out prompts.
    Eval(cli::eval::EvalArgs),
    /// Trains the embedded shapes model.
    Train(cli::train::TrainArgs),
    /// Straightens the shapes model's paths for few steps: trains a copy on the teacher's own
    /// (noise, picture) couplings (2-rectified flow).
    Reflow(cli::reflow::ReflowArgs),
    /// Trains a shapes model's caption classifier, for classifier guidance.
    TrainClassifier(cli::train_classifier::TrainClassifierArgs),
    /// Lists models found in the Hugging Face cache and a ComfyUI-style models folder.
    Models(cli::models::ModelsArgs),
}

fn main() -> ExitCode {
    // SAFETY: mi_option_set only stores the value; any option number is accepted.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    flowline::install_model_families();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Run(args)) => cli::run::run(args),
        Some(Command::Import(args)) => cli::import::import(args),
        Some(Command::Bench(args)) => cli::bench::bench(args),
        Some(Command::Dataset(args)) => cli::dataset::dataset(args),
        Some(Command::Train(args)) => cli::train::train(args),
        Some(Command::Reflow(args)) => cli::reflow::reflow(args),
        Some(Command::TrainClassifier(args)) => cli::train_classifier::train_classifier(args),
        Some(Command::Eval(args)) => cli::eval::eval(args),
        Some(Command::Open { file }) => flowline_app::launch(Some(file)),
        None => flowline_app::launch(None),
        Some(Command::Models(args)) => cli::models::models(args),
    }
}
