//! The node editor: how engine nodes look and behave on the egui-snarl canvas.
//!
//! Everything about a node comes from its [`NodeSpec`]: pins from its ports (coloured by type),
//! widgets from its parameters (ranges, choices, paths, seeds), the search list from the
//! registry. A wire of the wrong type is refused; an input takes one wire, so a new one
//! replaces the old. Run states and errors come from [`Runs`].

use std::collections::HashMap;

use eframe::egui::{self, Color32, Pos2, Rect, RichText, Stroke, emath::TSTransform};
use egui_snarl::ui::{AnyPins, PinInfo, SnarlPin, SnarlViewer};
use egui_snarl::{InPin, InPinId, NodeId, OutPin, OutPinId, Snarl};
use flowline_engine::graph::spec::{MAX_SEED, NodeSpec, ParamKind, ParamSpec};
use flowline_engine::graph::{Node, ParamValue, PortType};
use flowline_engine::nodes::{self, REGISTRY};

use super::document::{SeedControl, add_node, seed_control, set_seed_control};
use super::runs::{NodeStatus, Runs};

/// The colour of a port type, on pins and wires.
pub fn port_color(ty: PortType) -> Color32 {
    match ty {
        PortType::Model => Color32::from_rgb(180, 120, 240),
        PortType::Conditioning => Color32::from_rgb(240, 190, 70),
        PortType::Guider => Color32::from_rgb(90, 200, 160),
        PortType::Latent => Color32::from_rgb(240, 110, 170),
        PortType::Image => Color32::from_rgb(100, 160, 240),
    }
}

fn spec_of(node: &Node) -> Option<&'static NodeSpec> {
    nodes::find(&node.type_name).map(|d| &d.spec)
}

/// A file dialog the editor asked for; the app opens it off the UI thread.
pub struct FileRequest {
    pub node: NodeId,
    pub param: &'static str,
    pub folder: bool,
}

/// Node types whose title, type name or description contains every word of `query`.
pub fn search(query: &str) -> Vec<&'static NodeSpec> {
    let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
    REGISTRY
        .iter()
        .map(|d| &d.spec)
        .filter(|spec| {
            let haystack =
                format!("{} {} {}", spec.title, spec.type_name, spec.description).to_lowercase();
            words.iter().all(|w| haystack.contains(w.as_str()))
        })
        .collect()
}

/// A search box with the matching node types; returns the type picked (click or Enter).
pub fn node_search_list(
    ui: &mut egui::Ui,
    query: &mut String,
    accepts: impl Fn(&NodeSpec) -> bool,
) -> Option<&'static str> {
    let edit = ui
        .horizontal(|ui| {
            let label = ui.label("Find");
            ui.add(
                egui::TextEdit::singleline(query)
                    .hint_text("node name")
                    .desired_width(170.0),
            )
            .labelled_by(label.id)
        })
        .inner;
    let enter =
        (edit.has_focus() || edit.lost_focus()) && ui.input(|i| i.key_pressed(egui::Key::Enter));
    edit.request_focus();
    let matches: Vec<&NodeSpec> = search(query).into_iter().filter(|s| accepts(s)).collect();
    if enter && let Some(first) = matches.first() {
        return Some(first.type_name);
    }
    let mut picked = None;
    for spec in matches {
        if ui
            .button(spec.title)
            .on_hover_text(spec.description)
            .clicked()
        {
            picked = Some(spec.type_name);
        }
    }
    picked
}

/// The egui-snarl viewer for Flowline graphs, built fresh each frame over the app's state.
pub struct GraphViewer<'a> {
    pub runs: &'a Runs,
    pub ui_state: &'a mut serde_json::Value,
    pub search: &'a mut String,
    pub file_requests: &'a mut Vec<FileRequest>,
    /// A line for the status bar, e.g. why a connection was refused.
    pub notice: &'a mut Option<String>,
    /// Node rectangles in graph coordinates, for fitting the view.
    pub node_rects: &'a mut HashMap<NodeId, Rect>,
    /// The type and side (output or not) of the wire being dragged, as seen last frame.
    pub wire_drag: Option<(PortType, bool)>,
    /// Where this frame saw a wire drag start, for the next frame's `wire_drag`.
    pub wire_drag_seen: &'a mut Option<(PortType, bool)>,
    /// The view transform; set `fit_to` to replace it.
    pub transform: &'a mut TSTransform,
    pub fit_to: Option<TSTransform>,
}

impl GraphViewer<'_> {
    /// Shows a port's label and returns its pin. Notes a wire drag that starts on the pin
    /// (beside the label, on the node's outer side) and greys the pin while a wire it would
    /// refuse is being dragged: one of another type from the other side.
    fn labelled_pin(
        &mut self,
        ui: &mut egui::Ui,
        label: String,
        ty: PortType,
        output: bool,
        connected: bool,
    ) -> PinInfo {
        let label = ui.label(label).on_hover_text(ty.to_string()).rect;
        let edge = if output { label.right() } else { label.left() };
        let outward = if output { PIN_ZONE } else { -PIN_ZONE };
        let zone = Rect::from_x_y_ranges(
            edge.min(edge + outward)..=edge.max(edge + outward),
            label.y_range(),
        );
        let origin = ui.input(|i| {
            i.pointer
                .primary_down()
                .then(|| i.pointer.press_origin())
                .flatten()
        });
        if let Some(origin) = origin
            && zone.contains(self.transform.inverse() * origin)
        {
            *self.wire_drag_seen = Some((ty, output));
        }
        let refused = self
            .wire_drag
            .is_some_and(|(dragged, from_output)| from_output != output && dragged != ty);
        port_pin(Some(ty), connected, refused)
    }

    fn param_widget(
        &mut self,
        ui: &mut egui::Ui,
        node: &mut Node,
        snarl_id: NodeId,
        param: &ParamSpec,
    ) {
        let value = node
            .params
            .entry(param.name.to_string())
            .or_insert_with(|| param.default.clone());
        ui.label(param.name).on_hover_text(param.help);
        match &param.kind {
            ParamKind::Int { min, max } => {
                let mut number = as_int(value);
                ui.add(egui::DragValue::new(&mut number).range(*min..=*max));
                *value = ParamValue::Int(number);
            }
            ParamKind::Seed => {
                let mut seed = as_int(value);
                let current = seed_control(self.ui_state, &node.id, param.name);
                let mut chosen = current;
                ui.horizontal(|ui| {
                    ui.add(egui::DragValue::new(&mut seed).range(0..=MAX_SEED));
                    if ui
                        .small_button("🎲")
                        .on_hover_text("new random seed")
                        .clicked()
                    {
                        seed = (rand::random::<u64>() >> 11) as i64;
                    }
                    egui::ComboBox::from_id_salt((snarl_id, param.name, "control"))
                        .selected_text(chosen.name())
                        .width(84.0)
                        .show_ui(ui, |ui| {
                            for control in SeedControl::ALL {
                                ui.selectable_value(&mut chosen, control, control.name());
                            }
                        })
                        .response
                        .on_hover_text("what the seed does after each Run");
                });
                *value = ParamValue::Int(seed);
                if chosen != current {
                    set_seed_control(self.ui_state, &node.id, param.name, chosen);
                }
            }
            ParamKind::Float { min, max } => {
                let mut number = as_float(value);
                let speed = ((max - min) / 500.0).clamp(0.001, 1.0);
                ui.add(
                    egui::DragValue::new(&mut number)
                        .range(*min..=*max)
                        .speed(speed)
                        .max_decimals(3),
                );
                *value = ParamValue::Float(number);
            }
            ParamKind::Text { multiline } => {
                let mut text = as_text(value);
                if *multiline {
                    ui.add(
                        egui::TextEdit::multiline(&mut text)
                            .desired_rows(3)
                            .desired_width(200.0),
                    );
                } else {
                    ui.add(egui::TextEdit::singleline(&mut text).desired_width(160.0));
                }
                *value = ParamValue::Text(text);
            }
            ParamKind::Choice(options) => {
                let mut choice = as_text(value);
                egui::ComboBox::from_id_salt((snarl_id, param.name))
                    .selected_text(choice.clone())
                    .show_ui(ui, |ui| {
                        for option in *options {
                            ui.selectable_value(&mut choice, option.to_string(), *option);
                        }
                    });
                *value = ParamValue::Text(choice);
            }
            ParamKind::Path { folder } => {
                let mut text = as_text(value);
                ui.horizontal(|ui| {
                    ui.add(
                        egui::TextEdit::singleline(&mut text)
                            .hint_text(if *folder { "folder" } else { "file" })
                            .desired_width(130.0),
                    );
                    if ui
                        .small_button("…")
                        .on_hover_text("choose on disk")
                        .clicked()
                    {
                        self.file_requests.push(FileRequest {
                            node: snarl_id,
                            param: param.name,
                            folder: *folder,
                        });
                    }
                });
                *value = ParamValue::Text(text);
            }
        }
        ui.end_row();
    }

    fn status_badge(&self, node: &Node) -> Option<RichText> {
        let status = self.runs.node_status.get(&node.id);
        Some(match status {
            Some(NodeStatus::Running) => RichText::new("● running").color(Color32::LIGHT_BLUE),
            Some(NodeStatus::Done { seconds }) => {
                RichText::new(format!("✔ {seconds:.2} s")).color(Color32::LIGHT_GREEN)
            }
            Some(NodeStatus::Cached) => RichText::new("✔ cached").color(Color32::GRAY),
            Some(NodeStatus::Failed(_)) => RichText::new("✖ failed").color(Color32::LIGHT_RED),
            None if self.runs.invalid.contains_key(&node.id) => {
                RichText::new("✖ invalid").color(Color32::LIGHT_RED)
            }
            None => return None,
        })
    }
}

fn as_int(value: &ParamValue) -> i64 {
    match value {
        ParamValue::Int(i) => *i,
        ParamValue::Float(x) => *x as i64,
        _ => 0,
    }
}

fn as_float(value: &ParamValue) -> f64 {
    match value {
        ParamValue::Int(i) => *i as f64,
        ParamValue::Float(x) => *x,
        _ => 0.0,
    }
}

fn as_text(value: &ParamValue) -> String {
    match value {
        ParamValue::Text(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A pin in its type's colour, brighter when connected; while a wire of another type is being
/// dragged, the pins that would refuse it turn dark grey.
fn port_pin(ty: Option<PortType>, connected: bool, refused: bool) -> PinInfo {
    let color = ty.map_or(Color32::GRAY, port_color);
    let fill = if refused {
        Color32::from_gray(60)
    } else if connected {
        color
    } else {
        color.gamma_multiply(0.6)
    };
    PinInfo::circle().with_fill(fill).with_wire_color(color)
}

/// How far beside its label a pin is looked for (graph units): the pin and the gap before
/// the label.
const PIN_ZONE: f32 = 22.0;

impl SnarlViewer<Node> for GraphViewer<'_> {
    fn title(&mut self, node: &Node) -> String {
        spec_of(node).map_or_else(|| node.type_name.clone(), |s| s.title.to_string())
    }

    fn node_frame(
        &mut self,
        default: egui::Frame,
        node: NodeId,
        _inputs: &[InPin],
        _outputs: &[OutPin],
        snarl: &Snarl<Node>,
    ) -> egui::Frame {
        match self.runs.problem(&snarl[node].id) {
            Some(_) => default.stroke(Stroke::new(2.0, Color32::from_rgb(230, 60, 60))),
            None => match self.runs.node_status.get(&snarl[node].id) {
                Some(NodeStatus::Running) => {
                    default.stroke(Stroke::new(2.0, Color32::from_rgb(90, 160, 240)))
                }
                _ => default,
            },
        }
    }

    fn show_header(
        &mut self,
        node: NodeId,
        _inputs: &[InPin],
        _outputs: &[OutPin],
        ui: &mut egui::Ui,
        snarl: &mut Snarl<Node>,
    ) {
        let title = self.title(&snarl[node]);
        ui.horizontal(|ui| {
            ui.label(RichText::new(title).strong());
            ui.label(RichText::new(&snarl[node].id).weak().small());
            if let Some(badge) = self.status_badge(&snarl[node]) {
                ui.label(badge.small());
            }
        });
    }

    fn inputs(&mut self, node: &Node) -> usize {
        spec_of(node).map_or(0, |s| s.inputs.len())
    }

    fn outputs(&mut self, node: &Node) -> usize {
        spec_of(node).map_or(0, |s| s.outputs.len())
    }

    fn show_input(
        &mut self,
        pin: &InPin,
        ui: &mut egui::Ui,
        snarl: &mut Snarl<Node>,
    ) -> impl SnarlPin + 'static {
        let port = spec_of(&snarl[pin.id.node]).and_then(|s| s.inputs.get(pin.id.input));
        let Some(port) = port else {
            return port_pin(None, false, false);
        };
        let label = if port.optional {
            format!("{} (optional)", port.name)
        } else {
            port.name.to_string()
        };
        self.labelled_pin(ui, label, port.ty, false, !pin.remotes.is_empty())
    }

    fn show_output(
        &mut self,
        pin: &OutPin,
        ui: &mut egui::Ui,
        snarl: &mut Snarl<Node>,
    ) -> impl SnarlPin + 'static {
        let port = spec_of(&snarl[pin.id.node]).and_then(|s| s.outputs.get(pin.id.output));
        let Some(port) = port else {
            return port_pin(None, false, false);
        };
        self.labelled_pin(
            ui,
            port.name.to_string(),
            port.ty,
            true,
            !pin.remotes.is_empty(),
        )
    }

    fn has_body(&mut self, node: &Node) -> bool {
        spec_of(node).is_some_and(|s| !s.params.is_empty())
    }

    fn show_body(
        &mut self,
        node: NodeId,
        _inputs: &[InPin],
        _outputs: &[OutPin],
        ui: &mut egui::Ui,
        snarl: &mut Snarl<Node>,
    ) {
        let Some(spec) = spec_of(&snarl[node]) else {
            return;
        };
        egui::Grid::new((node, "params"))
            .num_columns(2)
            .spacing([6.0, 4.0])
            .show(ui, |ui| {
                for param in &spec.params {
                    self.param_widget(ui, &mut snarl[node], node, param);
                }
            });
    }

    fn has_footer(&mut self, node: &Node) -> bool {
        self.runs.problem(&node.id).is_some()
            || self.runs.warnings.iter().any(|(n, _)| *n == node.id)
            || self.runs.infos.iter().any(|(n, _)| *n == node.id)
    }

    fn show_footer(
        &mut self,
        node: NodeId,
        _inputs: &[InPin],
        _outputs: &[OutPin],
        ui: &mut egui::Ui,
        snarl: &mut Snarl<Node>,
    ) {
        let id = &snarl[node].id;
        ui.set_max_width(260.0);
        // Wrapped explicitly: the footer's layout would otherwise widen the node to the longest
        // message and lay it over its neighbours.
        let mut note = |text: RichText| ui.add(egui::Label::new(text).wrap());
        if let Some(problem) = self.runs.problem(id) {
            note(RichText::new(problem).color(Color32::from_rgb(255, 110, 110)));
        }
        for (_, info) in self.runs.infos.iter().filter(|(n, _)| n == id) {
            note(RichText::new(info).weak());
        }
        for (_, warning) in self.runs.warnings.iter().filter(|(n, _)| n == id) {
            note(RichText::new(format!("⚠ {warning}")).color(Color32::from_rgb(240, 200, 90)));
        }
    }

    fn final_node_rect(
        &mut self,
        node: NodeId,
        rect: Rect,
        _ui: &mut egui::Ui,
        _snarl: &mut Snarl<Node>,
    ) {
        self.node_rects.insert(node, rect);
    }

    fn current_transform(&mut self, to_global: &mut TSTransform, _snarl: &mut Snarl<Node>) {
        if let Some(fit) = self.fit_to.take() {
            *to_global = fit;
        }
        *self.transform = *to_global;
    }

    fn connect(&mut self, from: &OutPin, to: &InPin, snarl: &mut Snarl<Node>) {
        let out_port = spec_of(&snarl[from.id.node]).and_then(|s| s.outputs.get(from.id.output));
        let in_port = spec_of(&snarl[to.id.node]).and_then(|s| s.inputs.get(to.id.input));
        let (Some(out_port), Some(in_port)) = (out_port, in_port) else {
            return;
        };
        if out_port.ty != in_port.ty {
            *self.notice = Some(format!(
                "not connected: {}.{} gives {} but {}.{} takes {}",
                snarl[from.id.node].id,
                out_port.name,
                out_port.ty,
                snarl[to.id.node].id,
                in_port.name,
                in_port.ty
            ));
            return;
        }
        snarl.drop_inputs(to.id);
        snarl.connect(from.id, to.id);
    }

    fn has_graph_menu(&mut self, _pos: Pos2, _snarl: &mut Snarl<Node>) -> bool {
        true
    }

    fn show_graph_menu(&mut self, pos: Pos2, ui: &mut egui::Ui, snarl: &mut Snarl<Node>) {
        ui.label("Add node");
        if let Some(type_name) = node_search_list(ui, self.search, |_| true) {
            add_node(snarl, type_name, pos);
            self.search.clear();
            ui.close();
        }
    }

    fn has_dropped_wire_menu(&mut self, _src_pins: AnyPins, _snarl: &mut Snarl<Node>) -> bool {
        true
    }

    fn show_dropped_wire_menu(
        &mut self,
        pos: Pos2,
        ui: &mut egui::Ui,
        src_pins: AnyPins,
        snarl: &mut Snarl<Node>,
    ) {
        let (ty, outs, ins): (Option<PortType>, Vec<OutPinId>, Vec<InPinId>) = match src_pins {
            AnyPins::Out(pins) => (
                pins.first().and_then(|p| {
                    spec_of(&snarl[p.node])
                        .and_then(|s| s.outputs.get(p.output))
                        .map(|p| p.ty)
                }),
                pins.to_vec(),
                Vec::new(),
            ),
            AnyPins::In(pins) => (
                pins.first().and_then(|p| {
                    spec_of(&snarl[p.node])
                        .and_then(|s| s.inputs.get(p.input))
                        .map(|p| p.ty)
                }),
                Vec::new(),
                pins.to_vec(),
            ),
        };
        let Some(ty) = ty else {
            return;
        };
        ui.label(format!("Add a node for this {ty} wire"));
        let dragging_out = !outs.is_empty();
        let picked = node_search_list(ui, self.search, |spec| {
            if dragging_out {
                spec.inputs.iter().any(|p| p.ty == ty)
            } else {
                spec.outputs.iter().any(|p| p.ty == ty)
            }
        });
        let Some(type_name) = picked else {
            return;
        };
        let Some(new_node) = add_node(snarl, type_name, pos) else {
            return;
        };
        let spec = spec_of(&snarl[new_node]).expect("just added a registered type");
        if dragging_out {
            if let Some(input) = spec.inputs.iter().position(|p| p.ty == ty) {
                let to = InPinId {
                    node: new_node,
                    input,
                };
                for from in outs {
                    snarl.connect(from, to);
                }
            }
        } else if let Some(output) = spec.outputs.iter().position(|p| p.ty == ty) {
            let from = OutPinId {
                node: new_node,
                output,
            };
            for to in ins {
                snarl.drop_inputs(to);
                snarl.connect(from, to);
            }
        }
        self.search.clear();
        ui.close();
    }

    fn has_node_menu(&mut self, _node: &Node) -> bool {
        true
    }

    fn show_node_menu(
        &mut self,
        node: NodeId,
        _inputs: &[InPin],
        _outputs: &[OutPin],
        ui: &mut egui::Ui,
        snarl: &mut Snarl<Node>,
    ) {
        if ui.button("Remove").clicked() {
            snarl.remove_node(node);
            ui.close();
        }
    }
}
