//! The app's files: file dialogs off the UI thread, the crash-recovery file, settings kept
//! between runs, and the optional frame-time log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use eframe::egui;
use egui_snarl::NodeId;
use flowline_engine::files::write_atomic;
use flowline_engine::workflow::Workflow;
use serde::{Deserialize, Serialize};

use super::editor::FileRequest;

/// What a finished file dialog chose.
pub enum DialogResult {
    Open(PathBuf),
    SaveWorkflow(PathBuf),
    SaveImage(PathBuf),
    Param {
        node: NodeId,
        param: &'static str,
        path: PathBuf,
    },
    OutputFolder(PathBuf),
    ComfyuiModels(PathBuf),
}

/// Opens native dialogs (rfd, through the XDG desktop portal on Linux) on their own threads,
/// so the window keeps drawing while one is open; a choice comes back over a channel and
/// wakes the UI.
pub struct FileDialog {
    ctx: egui::Context,
    pub sender: Sender<DialogResult>,
}

impl FileDialog {
    pub fn new(ctx: egui::Context, sender: Sender<DialogResult>) -> Self {
        FileDialog { ctx, sender }
    }

    fn spawn(&self, show: impl FnOnce() -> Option<DialogResult> + Send + 'static) {
        let (ctx, sender) = (self.ctx.clone(), self.sender.clone());
        std::thread::spawn(move || {
            if let Some(result) = show() {
                let _ = sender.send(result);
                ctx.request_repaint();
            }
        });
    }

    pub fn open_workflow(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Open workflow")
                .add_filter("Workflow or image", &["json", "png"])
                .pick_file()
                .map(DialogResult::Open)
        });
    }

    pub fn save_workflow(&self, current: Option<PathBuf>) {
        self.spawn(move || {
            let mut dialog = rfd::FileDialog::new()
                .set_title("Save workflow")
                .add_filter("Workflow", &["json"]);
            dialog = match current {
                Some(path) => dialog.set_file_name(
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                None => dialog.set_file_name("workflow.json"),
            };
            dialog.save_file().map(DialogResult::SaveWorkflow)
        });
    }

    pub fn save_image(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Save image")
                .add_filter("PNG image", &["png"])
                .set_file_name("flowline.png")
                .save_file()
                .map(DialogResult::SaveImage)
        });
    }

    pub fn output_folder(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("Folder for saved images")
                .pick_folder()
                .map(DialogResult::OutputFolder)
        });
    }

    pub fn comfyui_models_folder(&self) {
        self.spawn(|| {
            rfd::FileDialog::new()
                .set_title("ComfyUI models folder (for the files ComfyUI workflows name)")
                .pick_folder()
                .map(DialogResult::ComfyuiModels)
        });
    }

    pub fn param_path(&self, request: FileRequest) {
        self.spawn(move || {
            let dialog = rfd::FileDialog::new().set_title(format!("Choose {}", request.param));
            let path = if request.folder {
                dialog.pick_folder()
            } else {
                dialog.pick_file()
            };
            path.map(|path| DialogResult::Param {
                node: request.node,
                param: request.param,
                path,
            })
        });
    }
}

/// The recovery file: the open graph, written every few seconds and removed on a clean exit,
/// so after a crash the next start can offer it back.
pub struct Recovery {
    path: Option<PathBuf>,
}

impl Recovery {
    /// The recovery file in Flowline's app-data folder (where eframe keeps its settings).
    pub fn in_app_data() -> Self {
        Recovery {
            path: eframe::storage_dir("Flowline").map(|dir| dir.join("recovery.json")),
        }
    }

    #[cfg(test)]
    pub fn at(path: PathBuf) -> Self {
        Recovery { path: Some(path) }
    }

    pub fn read(&self) -> Option<Workflow> {
        let path = self.path.as_ref()?;
        path.exists().then(|| Workflow::load(path).ok()).flatten()
    }

    pub fn write(&self, workflow: &Workflow) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)?;
        }
        write_atomic(path, workflow.to_json().as_bytes())
    }

    pub fn clear(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Settings kept between runs, in eframe's storage (window layout is kept by eframe itself).
#[derive(Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub output_dir: PathBuf,
    pub recent: Vec<PathBuf>,
    /// The ComfyUI `models/` folder where the files ComfyUI workflows name are looked for,
    /// besides the Hugging Face cache.
    pub comfyui_models: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            output_dir: PathBuf::from("out"),
            recent: Vec::new(),
            comfyui_models: None,
        }
    }
}

const SETTINGS_KEY: &str = "flowline-settings";

impl Settings {
    pub fn load(storage: &dyn eframe::Storage) -> Self {
        storage
            .get_string(SETTINGS_KEY)
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    pub fn store(&self, storage: &mut dyn eframe::Storage) {
        if let Ok(text) = serde_json::to_string(self) {
            storage.set_string(SETTINGS_KEY, text);
        }
    }
}

/// Frame times and how long steps took to reach the screen, for measuring responsiveness:
/// set `FLOWLINE_FRAME_LOG=FILE` and the app writes a summary there each time runs stop
/// streaming and when it closes (`bench/frames.sh` reads it). While a run streams, the app then
/// draws frames back to back, and the time between frame starts is kept too: that interval is
/// the whole frame (build, tessellate, render, present), beside the sampler's work.
pub struct FrameLog {
    path: PathBuf,
    ui_times: Vec<Duration>,
    /// UI build times of the frames drawn while a run streamed.
    streaming_ui_times: Vec<Duration>,
    intervals: Vec<Duration>,
    latencies: Vec<Duration>,
    last_start: Option<Instant>,
}

impl FrameLog {
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("FLOWLINE_FRAME_LOG")?;
        Some(FrameLog {
            path: PathBuf::from(path),
            ui_times: Vec::new(),
            streaming_ui_times: Vec::new(),
            intervals: Vec::new(),
            latencies: Vec::new(),
            last_start: None,
        })
    }

    /// A frame that started at `started` built its UI in `took`; `streaming` while a run runs.
    pub fn frame(&mut self, started: Instant, took: Duration, streaming: bool) {
        self.ui_times.push(took);
        if streaming {
            self.streaming_ui_times.push(took);
            if let Some(last) = self.last_start {
                self.intervals.push(started - last);
            }
        } else if self.last_start.is_some() {
            self.write();
        }
        self.last_start = streaming.then_some(started);
    }

    /// A step event reached the UI thread, which shows it in the frame being built.
    pub fn step_arrived(&mut self, sent_at: Instant) {
        self.latencies.push(sent_at.elapsed());
    }

    pub fn write(&self) {
        let summary = serde_json::json!({
            "frames": self.ui_times.len(),
            "ui_ms": percentiles(&self.ui_times),
            "streaming_frames": self.intervals.len(),
            "streaming_ui_ms": percentiles(&self.streaming_ui_times),
            "streaming_frame_interval_ms": percentiles(&self.intervals),
            "steps": self.latencies.len(),
            "step_to_frame_ms": percentiles(&self.latencies),
        });
        if let Err(e) = write_atomic(&self.path, summary.to_string().as_bytes()) {
            eprintln!("error: cannot write the frame log: {e:#}");
        }
    }
}

fn percentiles(values: &[Duration]) -> serde_json::Value {
    let mut ms: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
    };
    serde_json::json!({ "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ms.last() })
}

/// Whether `path` looks like something the app opens: a workflow or a PNG, Flowline's or
/// ComfyUI's (which of them is told by the content).
pub fn is_openable(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json") || e.eq_ignore_ascii_case("png"))
}
