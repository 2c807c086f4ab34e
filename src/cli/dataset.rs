//! `flowline dataset`: writes a labelled grid of the procedural training data, so a person can
//! look at what the default model learns from.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use flowline_engine::files::write_atomic;
use flowline_shapes::dataset::sample_grid;

use super::{EXIT_FAILURE, fail};

#[derive(Args)]
pub struct DatasetArgs {
    /// The PNG to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Which data set (training and held-out sets use different seeds).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 8)]
    columns: u32,
    #[arg(long, default_value_t = 4)]
    rows: u32,
}

pub fn dataset(args: DatasetArgs) -> ExitCode {
    let grid = sample_grid(args.seed, args.columns, args.rows);
    let mut bytes = Vec::new();
    let encoded = grid.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    );
    match encoded
        .map_err(anyhow::Error::from)
        .and_then(|_| write_atomic(&args.out, &bytes))
    {
        Ok(()) => {
            println!("{}", args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_FAILURE, format!("{e:#}")),
    }
}
