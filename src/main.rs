//! The `flowline` command: a thin layer over the engine library.

mod app;
mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// candle allocates a fresh buffer for every tensor of every step; with the system allocator
/// each large one is a new mapping, paid for in page faults and TLB flushes (a tenth of a
/// training step, measured). mimalloc keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Opens the app on a workflow file (or a PNG saved by Flowline).
    Open {
        /// The workflow (.json) or image (.png).
        file: PathBuf,
    },
    /// Runs a workflow headless and prints the paths of the images it writes.
    Run(cli::run::RunArgs),
    /// Times the default workflow end to end, and the sampler's per-step overhead apart from model time.
    Bench(cli::bench::BenchArgs),
    /// Writes a labelled sample grid of the procedural shapes data set.
    Dataset(cli::dataset::DatasetArgs),
    /// Measures prompt adherence on held-out prompts.
    Eval(cli::eval::EvalArgs),
    /// Trains the embedded shapes model.
    Train(cli::train::TrainArgs),
    /// Lists models found in the Hugging Face cache and a ComfyUI-style models folder.
    Models(cli::models::ModelsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Run(args)) => cli::run::run(args),
        Some(Command::Bench(args)) => cli::bench::bench(args),
        Some(Command::Dataset(args)) => cli::dataset::dataset(args),
        Some(Command::Train(args)) => cli::train::train(args),
        Some(Command::Eval(args)) => cli::eval::eval(args),
        Some(Command::Open { file }) => app::launch(Some(file)),
        None => app::launch(None),
        Some(Command::Models(args)) => cli::models::models(args),
    }
}
