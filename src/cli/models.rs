//! `flowline models`: lists the FLUX and SD3.5 models already on this machine, with the family
//! and path to give the Load Model node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use flowline_models::discovery::{hf_cache_dir, scan_hf_cache, scan_models_folder};

#[derive(Args)]
pub struct ModelsArgs {
    /// A ComfyUI-style models folder (with unet/ or diffusion_models/, vae/, clip/ or
    /// text_encoders/) to search besides the Hugging Face cache.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub fn models(args: ModelsArgs) -> ExitCode {
    let mut found = Vec::new();
    match hf_cache_dir() {
        Some(cache) => {
            println!("Hugging Face cache: {}", cache.display());
            found.extend(scan_hf_cache(&cache));
        }
        None => println!("Hugging Face cache: unknown (set HF_HOME)"),
    }
    if let Some(dir) = &args.dir {
        println!("models folder: {}", dir.display());
        found.extend(scan_models_folder(dir));
    }
    if found.is_empty() {
        println!("no FLUX or SD3.5 models found");
    }
    for model in found {
        println!(
            "{:<14} {}   [{}]",
            model.family,
            model.path.display(),
            model.source
        );
    }
    ExitCode::SUCCESS
}
