//! The desktop app: a node editor, a live step preview and workflow files, over the engine.
//!
//! The UI thread owns a [`Document`] (the graph being edited) and a [`Runs`] view of the
//! executor's events. Run sends a snapshot of the graph to the executor thread; events are
//! drained without blocking at the start of every frame, so the UI never waits on the engine.
//! Step latents are drawn by the GPU shader in [`preview`]. File dialogs run on their own
//! threads and report back through a channel, for the same reason.

mod document;
mod editor;
mod files;
mod preview;
mod runs;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use eframe::egui::{
    self, Color32, Id, Key, KeyboardShortcut, Modifiers, RichText, emath::TSTransform,
};
use egui_snarl::NodeId;
use egui_snarl::ui::{NodeLayout, SnarlStyle, SnarlWidget, get_selected_nodes};
use flowline::executor::Executor;
use flowline::graph::ParamValue;
use flowline::nodes::RunEnv;
use flowline::workflow::{DEFAULT_WORKFLOW, Workflow};

use document::Document;
use editor::{FileRequest, GraphViewer, node_search_list};
use files::{FileDialog, Recovery};
use runs::Runs;

/// The egui id of the node editor, under which egui-snarl keeps its selection.
const GRAPH_ID: &str = "flowline-graph";
/// How often the open graph is written to the recovery file.
const AUTOSAVE_EVERY: Duration = Duration::from_secs(5);
/// Most recent files kept in the File menu.
const RECENT_LIMIT: usize = 8;

const RUN: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter);
const SAVE: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::S);
const SAVE_AS: KeyboardShortcut =
    KeyboardShortcut::new(Modifiers::COMMAND.plus(Modifiers::SHIFT), Key::S);
const OPEN: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);
const NEW: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::N);
const UNDO: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Z);
const REDO: KeyboardShortcut =
    KeyboardShortcut::new(Modifiers::COMMAND.plus(Modifiers::SHIFT), Key::Z);
const QUIT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Q);
const DUPLICATE: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::D);

/// Opens the app window on `path`, or on the default workflow.
pub fn launch(path: Option<PathBuf>) -> ExitCode {
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

/// Something that would lose unsaved changes, waiting for the user's answer.
enum Pending {
    New,
    Open(PathBuf),
    Quit,
}

/// What the preview shows for one step.
struct StepFrames {
    canvas: Arc<preview::LatentFrame>,
    clean: Arc<preview::LatentFrame>,
}

pub struct FlowlineApp {
    doc: Document,
    executor: Executor,
    /// Executor events, forwarded by a thread that also wakes the UI for each one.
    events: Receiver<flowline::executor::Event>,
    runs: Runs,
    output_dir: PathBuf,
    recent: Vec<PathBuf>,
    recovery: Recovery,
    /// A workflow found in the recovery file at start-up, offered for restoring.
    recovered: Option<Workflow>,
    last_autosave: Instant,
    autosaved_graph: Option<flowline::graph::Graph>,
    dialogs: FileDialog,
    dialog_results: Receiver<files::DialogResult>,
    dialog_sender: Sender<files::DialogResult>,
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
    /// The wire being dragged (its type and whether it comes from an output), if any.
    wire_drag: Option<(flowline::graph::PortType, bool)>,
    /// The step the scrubber shows; `None` follows the newest step.
    scrub: Option<usize>,
    frames: Vec<StepFrames>,
    /// Latent values at a few fixed positions per step, for the σ plot.
    traces: Vec<(f64, Vec<f32>)>,
    image_texture: Option<(u64, egui::TextureHandle)>,
    zoom: f32,
    gpu_preview: bool,
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
        let executor = Executor::spawn();
        let events = forward_events(executor.events().clone(), cc.egui_ctx.clone());
        let mut app = FlowlineApp {
            doc: Document::new(default_workflow(), None),
            executor,
            events,
            runs: Runs::default(),
            output_dir: settings.output_dir,
            recent: settings.recent,
            recovery,
            recovered,
            last_autosave: Instant::now(),
            autosaved_graph: None,
            dialogs: FileDialog::default(),
            dialog_results,
            dialog_sender,
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
            wire_drag: None,
            scrub: None,
            frames: Vec::new(),
            traces: Vec::new(),
            image_texture: None,
            zoom: 4.0,
            gpu_preview,
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

    fn open(&mut self, path: &Path) {
        match Workflow::open(path) {
            Ok(workflow) => {
                let is_json = !path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("png"));
                let file = is_json.then(|| path.to_path_buf());
                self.doc = Document::new(workflow, file);
                self.after_replacing_document();
                if is_json {
                    self.remember(path);
                }
                self.notice = Some(format!("opened {}", path.display()));
            }
            Err(e) => self.error = Some(e.to_string()),
        }
    }

    fn new_document(&mut self) {
        self.doc = Document::new(default_workflow(), None);
        self.after_replacing_document();
    }

    fn after_replacing_document(&mut self) {
        self.fit_requested = true;
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
        self.dialogs
            .save_workflow(self.dialog_sender.clone(), self.doc.path.clone());
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
            Pending::Open(path) => self.open(&path),
            Pending::Quit => self.allow_close = true,
        }
    }

    fn run(&mut self) {
        self.doc.commit_edits();
        let workflow = self.doc.workflow();
        let env = RunEnv {
            output_dir: self.output_dir.clone(),
            workflow_json: Some(Arc::new(workflow.to_json())),
        };
        let id = self.executor.run(workflow.graph, env);
        self.runs.queued(id);
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
            let started = matches!(event, flowline::executor::Event::RunStarted { .. });
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
                        let json = self.doc.workflow().to_json();
                        match flowline::files::save_png(&path, &image.image, Some(&json)) {
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
            }
        }
        for request in self.file_requests.drain(..) {
            self.dialogs.param_path(self.dialog_sender.clone(), request);
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
                    "{}: drop a workflow (.json) or a PNG saved by Flowline",
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
        let graph = self.doc.graph();
        if self.autosaved_graph.as_ref() == Some(&graph) {
            return;
        }
        if let Err(e) = self.recovery.write(&self.doc.workflow()) {
            self.notice = Some(format!("autosave failed: {e:#}"));
        }
        self.autosaved_graph = Some(graph);
    }

    fn shortcuts(&mut self, ctx: &egui::Context) {
        let typing = ctx.egui_wants_keyboard_input();
        if ctx.input_mut(|i| i.consume_shortcut(&RUN)) {
            self.run();
        }
        if ctx.input_mut(|i| i.consume_shortcut(&SAVE_AS)) {
            self.save_as();
        }
        if ctx.input_mut(|i| i.consume_shortcut(&SAVE)) {
            self.save();
        }
        if ctx.input_mut(|i| i.consume_shortcut(&OPEN)) {
            self.dialogs.open_workflow(self.dialog_sender.clone());
        }
        if ctx.input_mut(|i| i.consume_shortcut(&NEW)) {
            self.guarded(Pending::New);
        }
        if ctx.input_mut(|i| i.consume_shortcut(&QUIT)) {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        if typing {
            return;
        }
        if ctx.input(|i| i.key_pressed(Key::Escape)) {
            if self.canvas_search.is_some() {
                self.canvas_search = None;
            } else {
                self.cancel();
            }
        }
        if ctx.input_mut(|i| i.consume_shortcut(&REDO)) {
            self.doc.redo();
        }
        if ctx.input_mut(|i| i.consume_shortcut(&UNDO)) {
            self.doc.undo();
        }
        let selected = get_selected_nodes(Id::new(GRAPH_ID), ctx);
        if ctx.input_mut(|i| i.consume_shortcut(&DUPLICATE)) {
            self.doc.duplicate(&selected);
        }
        if ctx.input(|i| i.key_pressed(Key::Delete) || i.key_pressed(Key::Backspace)) {
            self.doc.remove_nodes(&selected);
        }
        if ctx.input(|i| i.key_pressed(Key::F) && i.modifiers.is_none()) {
            self.fit_requested = true;
        }
        let (copied, cut, pasted) = ctx.input(|i| {
            let mut pasted = None;
            let (mut copied, mut cut) = (false, false);
            for event in &i.events {
                match event {
                    egui::Event::Copy => copied = true,
                    egui::Event::Cut => cut = true,
                    egui::Event::Paste(text) => pasted = Some(text.clone()),
                    _ => {}
                }
            }
            (copied, cut, pasted)
        });
        if (copied || cut) && !selected.is_empty() {
            ctx.copy_text(self.doc.copy(&selected));
            if cut {
                self.doc.remove_nodes(&selected);
            }
        }
        if let Some(text) = pasted {
            let at = ctx
                .pointer_latest_pos()
                .map_or(egui::pos2(0.0, 0.0), |p| self.transform.inverse() * p);
            if let Err(e) = self.doc.paste(&text, at) {
                self.notice = Some(format!("nothing pasted: {e}"));
            }
        }
    }

    fn menu_bar(&mut self, ui: &mut egui::Ui) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.add(shortcut_button("New", &NEW, ui)).clicked() {
                    self.guarded(Pending::New);
                }
                if ui.add(shortcut_button("Open…", &OPEN, ui)).clicked() {
                    self.dialogs.open_workflow(self.dialog_sender.clone());
                }
                ui.menu_button("Open recent", |ui| {
                    if self.recent.is_empty() {
                        ui.label("no recent files");
                    }
                    for path in self.recent.clone() {
                        if ui.button(path.display().to_string()).clicked() {
                            self.guarded(Pending::Open(path));
                        }
                    }
                });
                if ui.add(shortcut_button("Save", &SAVE, ui)).clicked() {
                    self.save();
                }
                if ui.add(shortcut_button("Save As…", &SAVE_AS, ui)).clicked() {
                    self.save_as();
                }
                ui.separator();
                if ui.button("Output folder…").clicked() {
                    self.dialogs.output_folder(self.dialog_sender.clone());
                }
                ui.separator();
                if ui.add(shortcut_button("Quit", &QUIT, ui)).clicked() {
                    ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
                }
            });
            ui.menu_button("Edit", |ui| {
                if ui
                    .add_enabled(self.doc.can_undo(), shortcut_button("Undo", &UNDO, ui))
                    .clicked()
                {
                    self.doc.undo();
                }
                if ui
                    .add_enabled(self.doc.can_redo(), shortcut_button("Redo", &REDO, ui))
                    .clicked()
                {
                    self.doc.redo();
                }
                ui.separator();
                let selected = get_selected_nodes(Id::new(GRAPH_ID), ui.ctx());
                if ui
                    .add_enabled(
                        !selected.is_empty(),
                        shortcut_button("Duplicate", &DUPLICATE, ui),
                    )
                    .clicked()
                {
                    self.doc.duplicate(&selected);
                }
                if ui
                    .add_enabled(
                        !selected.is_empty(),
                        egui::Button::new("Delete").shortcut_text("Del"),
                    )
                    .clicked()
                {
                    self.doc.remove_nodes(&selected);
                }
                if ui
                    .add(egui::Button::new("Fit view").shortcut_text("F"))
                    .clicked()
                {
                    self.fit_requested = true;
                }
            });
            ui.separator();
            if ui
                .add(
                    egui::Button::new(RichText::new("▶ Run").strong())
                        .shortcut_text(ui.ctx().format_shortcut(&RUN)),
                )
                .clicked()
            {
                self.run();
            }
            let active = self.runs.active();
            if ui
                .add_enabled(
                    active.is_some(),
                    egui::Button::new("■ Cancel").shortcut_text("Esc"),
                )
                .clicked()
            {
                self.cancel();
            }
            let pending: Vec<String> = self
                .runs
                .pending()
                .map(|r| {
                    format!(
                        "#{} {}",
                        r.id,
                        match r.state {
                            runs::RunState::Running => "running",
                            _ => "waiting",
                        }
                    )
                })
                .collect();
            ui.label(format!(
                "queue: {}",
                if pending.is_empty() {
                    "empty".to_string()
                } else {
                    pending.join(", ")
                }
            ));
        });
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some(outcome) = &self.runs.outcome {
                ui.label(outcome.lines().next().unwrap_or_default());
                ui.separator();
            }
            if let Some(notice) = &self.notice {
                ui.label(RichText::new(notice).italics());
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.label(format!("output: {}", self.output_dir.display()));
            });
        });
    }

    fn editor(&mut self, ui: &mut egui::Ui) {
        let fit_to = if self.fit_requested && !self.node_rects.is_empty() {
            self.fit_requested = false;
            let bounds = self
                .node_rects
                .values()
                .copied()
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
        };
        let style = SnarlStyle {
            centering: Some(false),
            node_layout: Some(NodeLayout::sandwich()),
            pin_size: Some(10.0),
            wire_width: Some(2.5),
            ..SnarlStyle::new()
        };
        // Labels on nodes are not text to select: a click on a title selects the node.
        ui.style_mut().interaction.selectable_labels = false;
        let response =
            SnarlWidget::new()
                .id(Id::new(GRAPH_ID))
                .style(style)
                .show(snarl, &mut viewer, ui);
        self.node_rects
            .retain(|id, _| self.doc.snarl.get_node(*id).is_some());
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

    /// Whether screen point `at` is on a node of the editor.
    fn on_a_node(&self, at: egui::Pos2) -> bool {
        let in_graph = self.transform.inverse() * at;
        self.node_rects.values().any(|r| r.contains(in_graph))
    }

    fn preview_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Live preview");
        let count = self.frames.len();
        if count == 0 {
            ui.label("Press Run (Ctrl+Enter): every sampler step appears here as it happens.");
        } else {
            let shown = self.scrub.unwrap_or(count - 1).min(count - 1);
            let record = &self.runs.steps[shown].record;
            ui.label(format!(
                "step {} of {}   σ {:.3} to {:.3}   |v| {:.1}",
                record.index + 1,
                record.steps,
                record.sigma,
                record.sigma_next,
                record.velocity_norm
            ));
            let side = ((ui.available_width() - 12.0) / 2.0).clamp(64.0, 320.0);
            ui.horizontal(|ui| {
                ui.vertical(|ui| {
                    ui.label("canvas x_σ");
                    self.latent_view(ui, 0, shown, side, false);
                });
                ui.vertical(|ui| {
                    ui.label("predicted final x0");
                    self.latent_view(ui, 1, shown, side, true);
                });
            });
            let mut step = shown + 1;
            let finished = self.runs.trajectory.is_some();
            ui.horizontal(|ui| {
                ui.label("step");
                let slider = ui.add_enabled(
                    finished || count > 1,
                    egui::Slider::new(&mut step, 1..=count),
                );
                if slider.changed() {
                    self.scrub = if step == count { None } else { Some(step - 1) };
                }
                if self.scrub.is_some() && ui.button("live").clicked() {
                    self.scrub = None;
                }
            });
            self.sigma_plot(ui);
            if let Some((_, straightness)) = &self.runs.trajectory {
                ui.label(format!(
                    "straightness {straightness:.3} (1 = a straight line)"
                ));
            }
        }
        ui.separator();
        self.final_image(ui);
    }

    fn latent_view(&self, ui: &mut egui::Ui, slot: u32, step: usize, side: f32, clean: bool) {
        let frames = &self.frames[step];
        let frame = if clean { &frames.clean } else { &frames.canvas };
        if self.gpu_preview {
            preview::show(ui, slot, frame, side);
        } else {
            ui.label("(no GPU renderer: previews need wgpu)");
        }
    }

    fn sigma_plot(&self, ui: &mut egui::Ui) {
        use egui_plot::{Line, Plot, PlotPoints};
        let probes = self.traces.first().map_or(0, |(_, values)| values.len());
        let mut end = None;
        if self.runs.trajectory.is_some()
            && let Some(last) = self.runs.steps.last()
        {
            end = Some((last.record.sigma_next, probe_values(&last.record.clean)));
        }
        Plot::new("sigma-plot")
            .height(140.0)
            .x_axis_label("σ")
            .allow_scroll(false)
            .allow_drag(false)
            .show(ui, |plot| {
                for probe in 0..probes {
                    let points: PlotPoints = self
                        .traces
                        .iter()
                        .chain(end.iter())
                        .map(|(sigma, values)| [*sigma, f64::from(values[probe])])
                        .collect();
                    plot.line(Line::new(format!("latent {probe}"), points));
                }
            });
    }

    fn final_image(&mut self, ui: &mut egui::Ui) {
        let Some(image) = &self.runs.image else {
            ui.label("The decoded image appears here when a run ends.");
            return;
        };
        let version = self.runs.image_version;
        if self
            .image_texture
            .as_ref()
            .is_none_or(|(v, _)| *v != version)
        {
            let size = [image.image.width() as usize, image.image.height() as usize];
            let color = egui::ColorImage::from_rgb(size, image.image.as_raw());
            let texture =
                ui.ctx()
                    .load_texture("final-image", color, egui::TextureOptions::NEAREST);
            self.image_texture = Some((version, texture));
        }
        ui.horizontal(|ui| {
            ui.label(RichText::new("Image").strong());
            ui.add(egui::Slider::new(&mut self.zoom, 0.5..=8.0).text("zoom"));
            if ui.button("Save Image…").clicked() {
                self.dialogs.save_image(self.dialog_sender.clone());
            }
        });
        match &image.path {
            Some(path) => ui.label(format!("from {}, saved as {}", image.node, path.display())),
            None => ui.label(format!("from {} (not saved)", image.node)),
        };
        if let Some((_, texture)) = &self.image_texture {
            egui::ScrollArea::both().show(ui, |ui| {
                ui.add(
                    egui::Image::new(texture).fit_to_exact_size(texture.size_vec2() * self.zoom),
                );
            });
        }
    }

    fn dialogs_ui(&mut self, ctx: &egui::Context) {
        if let Some(message) = self.error.clone() {
            egui::Modal::new(Id::new("error")).show(ctx, |ui| {
                ui.heading("Something is wrong");
                ui.label(RichText::new(message).color(Color32::from_rgb(255, 120, 120)));
                ui.label("Nothing was changed.");
                if ui.button("OK").clicked() {
                    self.error = None;
                }
            });
        }
        if let Some(recovered) = self.recovered.clone() {
            egui::Modal::new(Id::new("recover")).show(ctx, |ui| {
                ui.heading("Restore unsaved work?");
                ui.label(
                    "Flowline did not close normally last time. The graph it was editing was kept.",
                );
                ui.horizontal(|ui| {
                    if ui.button("Restore").clicked() {
                        self.doc = Document::new(recovered, None);
                        self.after_replacing_document();
                        self.recovered = None;
                    }
                    if ui.button("Discard").clicked() {
                        self.recovery.clear();
                        self.recovered = None;
                    }
                });
            });
        }
        if self.pending.is_some() {
            let mut answer = None;
            egui::Modal::new(Id::new("unsaved")).show(ctx, |ui| {
                ui.heading("Unsaved changes");
                ui.label(format!(
                    "{} has changes that are not saved.",
                    self.doc
                        .path
                        .as_ref()
                        .map_or("This workflow".into(), |p| p.display().to_string())
                ));
                ui.horizontal(|ui| {
                    if ui.button("Save").clicked() {
                        answer = Some(true);
                    }
                    if ui.button("Discard changes").clicked() {
                        answer = Some(false);
                    }
                    if ui.button("Cancel").clicked() {
                        self.pending = None;
                    }
                });
            });
            if let Some(save) = answer {
                let action = self.pending.take().expect("checked above");
                if save {
                    self.save();
                    if self.doc.is_modified() {
                        return;
                    }
                }
                self.perform(action);
                if self.allow_close {
                    ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                }
            }
        }
    }
}

/// Forwards executor events to the UI and asks for a repaint as each arrives, so a step is
/// drawn in the next frame and an idle window uses no CPU.
fn forward_events(
    source: Receiver<flowline::executor::Event>,
    ctx: egui::Context,
) -> Receiver<flowline::executor::Event> {
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

fn shortcut_button<'a>(
    label: &'a str,
    shortcut: &KeyboardShortcut,
    ui: &egui::Ui,
) -> egui::Button<'a> {
    egui::Button::new(label).shortcut_text(ui.ctx().format_shortcut(shortcut))
}

/// How many latent values the σ plot follows.
const PROBES: usize = 6;

/// A few latent values at fixed, spread-out positions, for the σ plot.
fn probe_values(latent: &candle_core::Tensor) -> Vec<f32> {
    let values = latent
        .flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_default();
    if values.is_empty() {
        return Vec::new();
    }
    (0..PROBES)
        .map(|i| values[(i * 7919 + 13) % values.len()])
        .collect()
}

fn default_workflow() -> Workflow {
    Workflow::from_json(DEFAULT_WORKFLOW, "the default workflow")
        .expect("the default workflow is valid")
}

impl eframe::App for FlowlineApp {
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

        egui::Panel::top("menu").show(ui, |ui| self.menu_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::right("preview")
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
        ctx.send_viewport_cmd(egui::ViewportCommand::Title(self.title()));
        if self.dialogs.is_open() {
            ctx.request_repaint_after(Duration::from_millis(100));
        } else {
            ctx.request_repaint_after(AUTOSAVE_EVERY);
        }
        let streaming = self.runs.active().is_some();
        if let Some(log) = &mut self.frame_log {
            log.frame(started, started.elapsed(), streaming);
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        files::Settings {
            output_dir: self.output_dir.clone(),
            recent: self.recent.clone(),
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
