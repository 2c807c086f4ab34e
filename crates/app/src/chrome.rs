//! The window's chrome: keyboard shortcuts, the menu bar with Run/Cancel and the queue, the
//! status bar, and the modal dialogs (errors, crash recovery, unsaved changes).

use eframe::egui::{self, Color32, Id, Key, KeyboardShortcut, Modifiers, RichText};
use egui_snarl::ui::get_selected_nodes;

use flowline_engine::workflow::EXAMPLE_WORKFLOWS;

use super::document::Document;
use super::{FlowlineApp, GRAPH_ID, Pending, runs};

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
const GROUP: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::G);

fn shortcut_button<'a>(
    label: &'a str,
    shortcut: &KeyboardShortcut,
    ui: &egui::Ui,
) -> egui::Button<'a> {
    egui::Button::new(label).shortcut_text(ui.ctx().format_shortcut(shortcut))
}

impl FlowlineApp {
    pub(super) fn shortcuts(&mut self, ctx: &egui::Context) {
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
            self.dialogs.open_workflow();
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
        if ctx.input_mut(|i| i.consume_shortcut(&GROUP)) {
            self.group_selected(&selected);
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

    pub(super) fn menu_bar(&mut self, ui: &mut egui::Ui) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.add(shortcut_button("New", &NEW, ui)).clicked() {
                    self.guarded(Pending::New);
                }
                if ui.add(shortcut_button("Open…", &OPEN, ui)).clicked() {
                    self.dialogs.open_workflow();
                }
                ui.menu_button("Open example", |ui| {
                    for (index, example) in EXAMPLE_WORKFLOWS.iter().enumerate() {
                        if ui.button(example.title).clicked() {
                            self.guarded(Pending::Example(index));
                        }
                    }
                });
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
                    self.dialogs.output_folder();
                }
                if ui
                    .button("ComfyUI models folder…")
                    .on_hover_text(
                        "where the model files that ComfyUI workflows name are looked for, \
                         besides the Hugging Face cache",
                    )
                    .clicked()
                {
                    self.dialogs.comfyui_models_folder();
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
                    .add_enabled(
                        !selected.is_empty(),
                        shortcut_button("Group selected nodes", &GROUP, ui),
                    )
                    .clicked()
                {
                    self.group_selected(&selected);
                }
                if ui
                    .add(egui::Button::new("Fit view").shortcut_text("F"))
                    .clicked()
                {
                    self.fit_requested = true;
                }
            });
            if ui
                .button("⛶ Fit")
                .on_hover_text("Fit the whole graph in view (F)")
                .clicked()
            {
                self.fit_requested = true;
            }
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
            ui.label("queue:");
            let pending: Vec<(u64, bool)> = self
                .runs
                .pending()
                .map(|r| (r.id, r.state == runs::RunState::Running))
                .collect();
            if pending.is_empty() {
                ui.label("empty");
            }
            for (id, running) in pending {
                let text = format!("#{id} {} ✖", if running { "running" } else { "waiting" });
                if ui
                    .small_button(text)
                    .on_hover_text("cancel this run")
                    .clicked()
                {
                    self.executor.cancel(id);
                }
            }
        });
    }

    pub(super) fn status_bar(&mut self, ui: &mut egui::Ui) {
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

    pub(super) fn dialogs_ui(&mut self, ctx: &egui::Context) {
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
