//! `flowline import`: converts a ComfyUI workflow (either of its JSON formats, or a PNG that
//! ComfyUI saved) into a Flowline workflow file, to edit or run later.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{EXIT_FAILURE, fail, open_workflow};

#[derive(Args)]
pub struct ImportArgs {
    /// The ComfyUI workflow: its editor's JSON, its API (prompt) JSON, or a PNG it saved.
    input: PathBuf,
    /// The Flowline workflow file to write.
    output: PathBuf,
    /// The ComfyUI models folder in which to find the model files the workflow names, besides
    /// the Hugging Face cache.
    #[arg(long, value_name = "DIR")]
    models: Option<PathBuf>,
}

pub fn import(args: ImportArgs) -> ExitCode {
    let workflow = match open_workflow(&args.input, args.models.as_deref()) {
        Ok(workflow) => workflow,
        Err(code) => return code,
    };
    if let Err(e) = workflow.save(&args.output) {
        return fail(EXIT_FAILURE, format!("{e:#}"));
    }
    println!("{}", args.output.display());
    ExitCode::SUCCESS
}
