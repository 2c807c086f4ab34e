//! The desktop app: a node editor, a live step preview and workflow files, over the engine.
//!
//! The UI thread owns a `Document` (the graph being edited) and a `Runs` view of the
//! executor's events. Run sends a snapshot of the graph to the executor thread; events are
//! drained without blocking at the start of every frame, so the UI never waits on the engine.
//! Step latents are drawn by the GPU shader in `preview`. File dialogs run on their own
//! threads and report back through a channel, for the same reason.

mod chrome;
mod document;
mod editor;
mod files;
mod groups;
mod panel;
mod preview;
mod runs;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, unbounded};
use eframe::egui::{self, Id, emath::TSTransform};
use egui_snarl::NodeId;
use egui_snarl::ui::{NodeLayout, SnarlStyle, SnarlWidget};
use flowline_engine::executor::Executor;
use flowline_engine::graph::ParamValue;
use flowline_engine::nodes::context::RunEnv;
use flowline_engine::workflow::{DEFAULT_WORKFLOW, EXAMPLE_WORKFLOWS, Workflow};
use flowline_models::comfyui::open_workflow;

use document::Document;
use editor::{FileRequest, GraphViewer, node_search_list};
use files::{FileDialog, Recovery};
use preview::{StepFrames, probe_values};
use runs::Runs;

/// The egui id of the node editor, under which egui-snarl keeps its selection.
const GRAPH_ID: &str = "flowline-graph";
/// How often the open graph is written to the recovery file.
const AUTOSAVE_EVERY: Duration = Duration::from_secs(5);
/// Most recent files kept in the File menu.
const RECENT_LIMIT: usize = 8;

/// Opens the app window on `path`, or on the default workflow. Call it before the process
/// starts other threads (it sets an environment variable, see `leave_a_core_to_the_display`).
pub fn launch(path: Option<PathBuf>) -> ExitCode {
    leave_a_core_to_the_display();
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1280.0, 800.0])
            .with_min_inner_size([640.0, 400.0])
            .with_drag_and_drop(true),
        renderer: eframe::Renderer::Wgpu,
        ..Default::default()
    };
    let result = eframe::run_native(
        "Flowline",
        options,
        Box::new(move |cc| {
            Ok(Box::new(FlowlineApp::new(
                cc,
                path,
                Recovery::in_app_data(),
            )))
        }),
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: the window could not open: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Has Mesa's software renderers (lavapipe, llvmpipe) rasterise on one thread fewer than there
/// are cores, unless `LP_NUM_THREADS` says otherwise; hardware drivers ignore the variable.
///
/// Without a GPU every frame is rasterised on the CPU and then copied to the display server,
/// which needs a core of its own at the same time (under X without DRI3 the frame goes
/// through the X socket). With a rasteriser thread per core the two fight for the cores, and
/// during a run the executor fills whatever is left. On 2 cores under Xvfb at 1600×1000,
/// `bench/frames.sh` measured the p99 frame time during runs at 28–44 ms with two
/// rasteriser threads (median of nine runs 35) and 21–37 ms with one (median of 17: 27).
fn leave_a_core_to_the_display() {
    const VARIABLE: &str = "LP_NUM_THREADS";
    if std::env::var_os(VARIABLE).is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // SAFETY: `launch` runs before the process starts any other thread (its contract), so
    // nothing reads or writes the environment concurrently.
    unsafe { std::env::set_var(VARIABLE, (cores - 1).to_string()) };
}

/// Something that would lose unsaved changes, waiting for the user's answer.
enum Pending {
    New,
    Open(PathBuf),
    /// One of [`flowline_engine::workflow::EXAMPLE_WORKFLOWS`], as a new untitled document.
    Example(usize),
    Quit,
}

pub struct FlowlineApp {
    doc: Document,
    executor: Executor,
    /// Executor events, forwarded by a thread that also wakes the UI for each one.
    events: Receiver<flowline_engine::executor::Event>,
    runs: Runs,
    output_dir: PathBuf,
    recent: Vec<PathBuf>,
    /// Where the files ComfyUI workflows name are looked for, besides the Hugging Face cache.
    comfyui_models: Option<PathBuf>,
    recovery: Recovery,
    /// A workflow found in the recovery file at start-up, offered for restoring.
    recovered: Option<Workflow>,
    last_autosave: Instant,
    autosaved: Option<Workflow>,
    dialogs: FileDialog,
    dialog_results: Receiver<files::DialogResult>,
    file_requests: Vec<FileRequest>,
    pending: Option<Pending>,
    allow_close: bool,
    error: Option<String>,
    notice: Option<String>,
    search: String,
    /// Where a double-click on the canvas opened the node search (screen position).
    canvas_search: Option<egui::Pos2>,
    node_rects: HashMap<NodeId, egui::Rect>,
    transform: TSTransform,
    fit_requested: bool,
    /// The groups' drag and rename state.
    groups: groups::GroupsUi,
    /// The wire being dragged (its type and whether it comes from an output), if any.
    wire_drag: Option<(flowline_engine::graph::PortType, bool)>,
    /// The step the scrubber shows; `None` follows the newest step.
    scrub: Option<usize>,
    frames: Vec<StepFrames>,
    /// Latent values at a few fixed positions per step, for the σ plot.
    traces: Vec<(f64, Vec<f32>)>,
    image_texture: Option<(u64, egui::TextureHandle)>,
    zoom: f32,
    gpu_preview: bool,
    /// The window title last sent, so it is only sent again when it changes.
    shown_title: String,
    /// Frame times and step-to-screen latencies, written out when FLOWLINE_FRAME_LOG is set.
    frame_log: Option<files::FrameLog>,
}

impl FlowlineApp {
    pub fn new(
        cc: &eframe::CreationContext<'_>,
        path: Option<PathBuf>,
        recovery: Recovery,
    ) -> Self {
        let gpu_preview = match cc.wgpu_render_state.as_ref() {
            Some(render_state) => {
                preview::install(render_state);
                true
            }
            None => false,
        };
        let settings = cc.storage.map(files::Settings::load).unwrap_or_default();
        let recovered = recovery.read();
        let (dialog_sender, dialog_results) = unbounded();
        let executor = Executor::spawn_in_background();
        let events = forward_events(executor.events().clone(), cc.egui_ctx.clone());
        let mut app = FlowlineApp {
            doc: Document::new(default_workflow(), None),
            executor,
            events,
            runs: Runs::default(),
            output_dir: settings.output_dir,
            recent: settings.recent,
            comfyui_models: settings.comfyui_models,
            recovery,
            recovered,
            last_autosave: Instant::now(),
            autosaved: None,
            dialogs: FileDialog::new(cc.egui_ctx.clone(), dialog_sender),
            dialog_results,
            file_requests: Vec::new(),
            pending: None,
            allow_close: false,
            error: None,
            notice: None,
            search: String::new(),
            canvas_search: None,
            node_rects: HashMap::new(),
            transform: TSTransform::IDENTITY,
            fit_requested: true,
            groups: groups::GroupsUi::default(),
            wire_drag: None,
            scrub: None,
            frames: Vec::new(),
            traces: Vec::new(),
            image_texture: None,
            zoom: 4.0,
            gpu_preview,
            shown_title: String::new(),
            frame_log: files::FrameLog::from_env(),
        };
        if let Some(path) = path {
            app.open(&path);
        }
        app
    }

    /// The document being edited (for tests).
    #[cfg(test)]
    fn document(&self) -> &Document {
        &self.doc
    }

    fn title(&self) -> String {
        let name = self
            .doc
            .path
            .as_ref()
            .and_then(|p| p.file_name())
            .map_or_else(
                || "untitled".to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
        let marker = if self.doc.is_modified() { " •" } else { "" };
        format!("{name}{marker} — Flowline")
    }

    /// Opens a workflow file, Flowline's or ComfyUI's. Only a Flowline `.json` becomes the
    /// document's file: saving over a PNG or a ComfyUI workflow would replace it.
    fn open(&mut self, path: &Path) {
        match open_workflow(path, self.comfyui_models.as_deref()) {
            Ok(opened) => {
                let is_json = !path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("png"));
                let keeps_file = is_json && !opened.from_comfyui;
                let file = keeps_file.then(|| path.to_path_buf());
                self.doc = Document::new(opened.workflow, file);
                self.after_replacing_document();
                if keeps_file {
                    self.remember(path);
                }
                let mut notice = format!("opened {}", path.display());
                if opened.from_comfyui {
                    notice.push_str(" (converted from ComfyUI)");
                }
                for warning in &opened.warnings {
                    notice.push_str("; warning: ");
                    notice.push_str(warning);
                }
                self.notice = Some(notice);
            }
            Err(e) => self.error = Some(e.to_string()),
        }
    }

    fn new_document(&mut self) {
        self.doc = Document::new(default_workflow(), None);
        self.after_replacing_document();
    }

    fn open_example(&mut self, index: usize) {
        let example = &EXAMPLE_WORKFLOWS[index];
        match Workflow::from_json(example.json, example.file) {
            Ok(workflow) => {
                self.doc = Document::new(workflow, None);
                self.after_replacing_document();
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    fn after_replacing_document(&mut self) {
        self.fit_requested = true;
        self.groups = groups::GroupsUi::default();
        self.node_rects.clear();
        self.runs.invalid.clear();
        self.runs.node_status.clear();
    }

    fn remember(&mut self, path: &Path) {
        let path = path.to_path_buf();
        self.recent.retain(|p| *p != path);
        self.recent.insert(0, path);
        self.recent.truncate(RECENT_LIMIT);
    }

    fn save_to(&mut self, path: PathBuf) {
        match self.doc.workflow().save(&path) {
            Ok(()) => {
                self.notice = Some(format!("saved {}", path.display()));
                self.remember(&path);
                self.doc.mark_saved(path);
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    fn save(&mut self) {
        match self.doc.path.clone() {
            Some(path) => self.save_to(path),
            None => self.save_as(),
        }
    }

    fn save_as(&mut self) {
        self.dialogs.save_workflow(self.doc.path.clone());
    }

    /// Runs `action` now, or after asking what to do with unsaved changes.
    fn guarded(&mut self, action: Pending) {
        if self.doc.is_modified() {
            self.pending = Some(action);
        } else {
            self.perform(action);
        }
    }

    fn perform(&mut self, action: Pending) {
        match action {
            Pending::New => self.new_document(),
            Pending::Example(index) => self.open_example(index),
            Pending::Open(path) => self.open(&path),
            Pending::Quit => self.allow_close = true,
        }
    }

    fn run(&mut self) {
        self.doc.commit_edits();
        let workflow = self.doc.workflow();
        let json = Arc::new(workflow.to_json());
        let env = RunEnv {
            output_dir: self.output_dir.clone(),
            workflow_json: Some(json.clone()),
        };
        let id = self.executor.run(workflow.graph, env);
        self.runs.queued(id, json);
        self.doc
            .advance_seeds(&mut || (rand::random::<u64>() >> 11) as i64);
        self.doc.commit_edits();
    }

    fn cancel(&mut self) {
        if let Some(run) = self.runs.active() {
            self.executor.cancel(run);
        }
    }

    fn drain_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            let started = matches!(event, flowline_engine::executor::Event::RunStarted { .. });
            self.runs.apply(event);
            if started || self.runs.steps.len() < self.frames.len() {
                self.frames.clear();
                self.traces.clear();
                self.scrub = None;
            }
            for index in self.frames.len()..self.runs.steps.len() {
                let step = &self.runs.steps[index];
                let key = (index as u64) << 1;
                let frames = preview::LatentFrame::new(key, &step.record.x, &step.preview)
                    .and_then(|canvas| {
                        let clean =
                            preview::LatentFrame::new(key | 1, &step.record.clean, &step.preview)?;
                        Ok((canvas, clean))
                    });
                match frames {
                    Ok((canvas, clean)) => self.frames.push(StepFrames {
                        canvas: Arc::new(canvas),
                        clean: Arc::new(clean),
                    }),
                    Err(e) => {
                        self.notice = Some(format!("no preview: {e:#}"));
                        break;
                    }
                }
                self.traces
                    .push((step.record.sigma, probe_values(&step.record.x)));
                if let Some(log) = &mut self.frame_log {
                    log.step_arrived(step.sent_at);
                }
            }
        }
    }

    fn handle_dialog_results(&mut self) {
        while let Ok(result) = self.dialog_results.try_recv() {
            match result {
                files::DialogResult::Open(path) => self.guarded(Pending::Open(path)),
                files::DialogResult::SaveWorkflow(path) => self.save_to(path),
                files::DialogResult::SaveImage(path) => {
                    if let Some(image) = &self.runs.image {
                        // The workflow that made the image, not the graph as edited since.
                        let json = image.workflow.as_deref();
                        match flowline_engine::files::save_png(&path, &image.image, json) {
                            Ok(()) => self.notice = Some(format!("saved {}", path.display())),
                            Err(e) => self.error = Some(format!("{e:#}")),
                        }
                    }
                }
                files::DialogResult::Param { node, param, path } => {
                    if let Some(node) = self.doc.snarl.get_node_mut(node) {
                        node.params.insert(
                            param.to_string(),
                            ParamValue::Text(path.display().to_string()),
                        );
                    }
                }
                files::DialogResult::OutputFolder(path) => self.output_dir = path,
                files::DialogResult::ComfyuiModels(path) => {
                    self.notice = Some(format!(
                        "ComfyUI workflows opened from now on find their models in {}",
                        path.display()
                    ));
                    self.comfyui_models = Some(path);
                }
            }
        }
        for request in self.file_requests.drain(..) {
            self.dialogs.param_path(request);
        }
    }

    fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        if let Some(path) = dropped.into_iter().next() {
            if files::is_openable(&path) {
                self.guarded(Pending::Open(path));
            } else {
                self.error = Some(format!(
                    "{}: drop a workflow (.json, Flowline's or ComfyUI's) or a PNG either saved",
                    path.display()
                ));
            }
        }
    }

    fn autosave(&mut self) {
        if self.last_autosave.elapsed() < AUTOSAVE_EVERY {
            return;
        }
        self.last_autosave = Instant::now();
        let workflow = self.doc.workflow();
        if self.autosaved.as_ref() == Some(&workflow) {
            return;
        }
        if let Err(e) = self.recovery.write(&workflow) {
            self.notice = Some(format!("autosave failed: {e:#}"));
        }
        self.autosaved = Some(workflow);
    }

    fn editor(&mut self, ui: &mut egui::Ui) {
        let pressed_modifiers = self.translate_selection_click(ui.ctx(), ui.max_rect());
        let fit_to = if self.fit_requested && !self.node_rects.is_empty() {
            self.fit_requested = false;
            let group_frames = groups::groups(&self.doc.ui_state)
                .into_iter()
                .map(|g| g.frame());
            let bounds = self
                .node_rects
                .values()
                .copied()
                .chain(group_frames)
                .reduce(|a, b| a.union(b))
                .expect("not empty")
                .expand(40.0);
            let view = ui.max_rect();
            let scale = (view.width() / bounds.width())
                .min(view.height() / bounds.height())
                .clamp(0.2, 1.5);
            Some(TSTransform::new(
                view.center().to_vec2() - bounds.center().to_vec2() * scale,
                scale,
            ))
        } else {
            None
        };
        let Document {
            snarl, ui_state, ..
        } = &mut self.doc;
        let mut wire_drag_seen = None;
        let mut viewer = GraphViewer {
            wire_drag: self.wire_drag,
            wire_drag_seen: &mut wire_drag_seen,
            runs: &self.runs,
            ui_state,
            search: &mut self.search,
            file_requests: &mut self.file_requests,
            notice: &mut self.notice,
            node_rects: &mut self.node_rects,
            transform: &mut self.transform,
            fit_to,
            latest_step: self
                .runs
                .step_node
                .as_deref()
                .zip(self.frames.last().map(|frames| &frames.clean)),
            groups: &mut self.groups,
        };
        let style = SnarlStyle {
            centering: Some(false),
            node_layout: Some(NodeLayout::sandwich()),
            pin_size: Some(10.0),
            wire_width: Some(2.5),
            // The canvas colour comes from clearing the frame (see `clear_color`), not from a
            // fill drawn over it: on a software renderer every filled pixel costs.
            bg_frame: Some(egui::Frame::canvas(ui.style()).fill(egui::Color32::TRANSPARENT)),
            // A window shadow is a blended band around each node, several times its border.
            node_frame: Some(egui::Frame::window(ui.style()).shadow(egui::Shadow::NONE)),
            ..SnarlStyle::new()
        };
        // Labels on nodes are not text to select: a click on a title selects the node.
        ui.style_mut().interaction.selectable_labels = false;
        let response =
            SnarlWidget::new()
                .id(Id::new(GRAPH_ID))
                .style(style)
                .show(snarl, &mut viewer, ui);
        if let Some(modifiers) = pressed_modifiers {
            ui.ctx().input_mut(|input| input.modifiers = modifiers);
        }
        self.node_rects
            .retain(|id, _| self.doc.snarl.get_node(*id).is_some());
        self.groups.apply_drag(&mut self.doc);
        self.wire_drag = wire_drag_seen;
        let double_clicked = ui.input(|i| {
            i.pointer
                .button_double_clicked(egui::PointerButton::Primary)
                .then(|| i.pointer.interact_pos())
                .flatten()
        });
        if let Some(at) = double_clicked
            && response.rect.contains(at)
            && !self.on_a_node(at)
        {
            self.canvas_search = Some(at);
            self.search.clear();
        }
        if let Some(at) = self.canvas_search {
            let mut close = false;
            egui::Area::new(Id::new("canvas-search"))
                .fixed_pos(at)
                .order(egui::Order::Foreground)
                .show(ui.ctx(), |ui| {
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.label("Add node");
                        if let Some(type_name) = node_search_list(ui, &mut self.search, |_| true) {
                            let position = self.transform.inverse() * at;
                            self.doc.add_node(type_name, position);
                            close = true;
                        }
                    });
                });
            if close {
                self.canvas_search = None;
                self.search.clear();
            }
        }
    }

    /// egui-snarl selects a node by Shift-click (with Ctrl: that node alone), clears its
    /// selection by Ctrl-click on the canvas, and keeps the selection private. ComfyUI users
    /// expect a plain click to select a node alone, Ctrl- or Shift-click to add it, and a
    /// click on the empty canvas to clear it; so a click this frame is handed to egui-snarl
    /// with the modifiers that mean that there. Returns the modifiers to restore once
    /// egui-snarl has seen them, where they were changed.
    fn translate_selection_click(
        &self,
        ctx: &egui::Context,
        canvas: egui::Rect,
    ) -> Option<egui::Modifiers> {
        ctx.input_mut(|input| {
            let at = input.pointer.interact_pos()?;
            if !input.pointer.primary_clicked() || !canvas.contains(at) {
                return None;
            }
            let adds = input.modifiers.shift || input.modifiers.command;
            let translated = match (self.on_a_node(at), adds) {
                (true, false) => egui::Modifiers::SHIFT | egui::Modifiers::COMMAND,
                (true, true) => egui::Modifiers::SHIFT,
                (false, false) => egui::Modifiers::COMMAND,
                (false, true) => return None,
            };
            Some(std::mem::replace(&mut input.modifiers, translated))
        })
    }

    /// Whether screen point `at` is on a node of the editor.
    fn on_a_node(&self, at: egui::Pos2) -> bool {
        let in_graph = self.transform.inverse() * at;
        self.node_rects.values().any(|r| r.contains(in_graph))
    }
}

/// Forwards executor events to the UI and asks for a repaint as each arrives, so a step is
/// drawn in the next frame and an idle window uses no CPU.
fn forward_events(
    source: Receiver<flowline_engine::executor::Event>,
    ctx: egui::Context,
) -> Receiver<flowline_engine::executor::Event> {
    let (sender, receiver) = unbounded();
    std::thread::Builder::new()
        .name("flowline-events".into())
        .spawn(move || {
            for event in source {
                if sender.send(event).is_err() {
                    break;
                }
                ctx.request_repaint();
            }
        })
        .expect("the event thread starts");
    receiver
}

fn default_workflow() -> Workflow {
    Workflow::from_json(DEFAULT_WORKFLOW, "the default workflow")
        .expect("the default workflow is valid")
}

impl eframe::App for FlowlineApp {
    /// The colour of the canvas and the panels, which draw no fill over it (see `editor`).
    fn clear_color(&self, visuals: &egui::Visuals) -> [f32; 4] {
        visuals.extreme_bg_color.to_normalized_gamma_f32()
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let started = Instant::now();
        let ctx = ui.ctx().clone();
        self.drain_events();
        self.handle_dialog_results();
        self.handle_dropped_files(&ctx);
        if ctx.input(|i| i.viewport().close_requested())
            && !self.allow_close
            && self.doc.is_modified()
        {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            self.pending = Some(Pending::Quit);
        }
        self.shortcuts(&ctx);

        // Panels draw no fill over the cleared frame (see `clear_color`): on a software
        // renderer every filled pixel costs, and these cover most of the window.
        let panel = egui::Frame::side_top_panel(ui.style()).fill(egui::Color32::TRANSPARENT);
        egui::Panel::top("menu")
            .frame(panel)
            .show(ui, |ui| self.menu_bar(ui));
        egui::Panel::bottom("status")
            .frame(panel)
            .show(ui, |ui| self.status_bar(ui));
        egui::Panel::right("preview")
            .frame(panel)
            .resizable(true)
            .default_size(420.0)
            .min_size(260.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.preview_panel(ui));
            });
        egui::CentralPanel::no_frame().show(ui, |ui| self.editor(ui));
        self.dialogs_ui(&ctx);

        if !ctx.input(|i| i.pointer.any_down()) && !ctx.egui_wants_keyboard_input() {
            self.doc.commit_edits();
        }
        self.autosave();
        let title = self.title();
        if title != self.shown_title {
            ctx.send_viewport_cmd(egui::ViewportCommand::Title(title.clone()));
            self.shown_title = title;
        }
        ctx.request_repaint_after(AUTOSAVE_EVERY);
        let streaming = self.runs.active().is_some();
        if let Some(log) = &mut self.frame_log {
            log.frame(started, started.elapsed(), streaming);
            // Measuring: frames back to back while a run streams, so the time between their
            // starts is what a frame costs, not the time between steps.
            if streaming {
                ctx.request_repaint();
            }
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        files::Settings {
            output_dir: self.output_dir.clone(),
            recent: self.recent.clone(),
            comfyui_models: self.comfyui_models.clone(),
        }
        .store(storage);
    }

    fn on_exit(&mut self) {
        self.recovery.clear();
        if let Some(log) = &self.frame_log {
            log.write();
        }
    }
}
