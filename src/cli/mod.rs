//! Subcommands of the `flowline` binary.

pub mod bench;
pub mod dataset;
pub mod eval;
pub mod import;
pub mod models;
pub mod reflow;
pub mod run;
pub mod train;
pub mod train_classifier;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flowline_engine::workflow::Workflow;
use indicatif::{ProgressBar, ProgressStyle};

/// Exit status for bad input: a file, a workflow or a parameter the user gave.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for a failure while running.
pub const EXIT_FAILURE: u8 = 1;

/// Prints `message` as an error and returns `code`.
pub fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

/// Opens a Flowline or ComfyUI workflow file, printing the warnings of a conversion; a file
/// that cannot be opened is bad input, and the error holds the exit status.
pub fn open_workflow(path: &Path, models_dir: Option<&Path>) -> Result<Workflow, ExitCode> {
    let opened = flowline_models::comfyui::open_workflow(path, models_dir)
        .map_err(|e| fail(EXIT_BAD_INPUT, e))?;
    for warning in &opened.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(opened.workflow)
}

/// The clock of one training session: when it must stop, when it next saves, and the progress
/// bar it draws, shared by the training commands.
pub struct TrainingSession {
    pub started: Instant,
    deadline: Option<Instant>,
    save_every: Duration,
    last_save: Instant,
    pub progress: ProgressBar,
}

impl TrainingSession {
    /// A session of at most `minutes` (none: no limit) that saves every `save_every` minutes,
    /// towards `total` steps of which `done` are done.
    pub fn new(minutes: Option<f64>, save_every: f64, total: usize, done: usize) -> Self {
        let started = Instant::now();
        let progress = ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template("[{elapsed_precise}] [{bar:30}] {pos}/{len} {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        progress.set_position(done as u64);
        TrainingSession {
            started,
            deadline: minutes.map(|m| started + Duration::from_secs_f64(m * 60.0)),
            save_every: Duration::from_secs_f64(save_every * 60.0),
            last_save: started,
            progress,
        }
    }

    /// Whether the session may take another step.
    pub fn has_time(&self) -> bool {
        self.deadline.is_none_or(|d| Instant::now() < d)
    }

    /// Whether it is time to save; if so, the next save is due `save_every` from now.
    pub fn save_is_due(&mut self) -> bool {
        let due = self.last_save.elapsed() >= self.save_every;
        if due {
            self.last_save = Instant::now();
        }
        due
    }
}
