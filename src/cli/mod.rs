//! Subcommands of the `flowline` binary.

pub mod bench;
pub mod dataset;
pub mod eval;
pub mod models;
pub mod run;
pub mod train;

use std::process::ExitCode;

/// Exit status for bad input: a file, a workflow or a parameter the user gave.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for a failure while running.
pub const EXIT_FAILURE: u8 = 1;

/// Prints `message` as an error and returns `code`.
pub fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}
