//! The node editor: how engine nodes look and behave on the egui-snarl canvas.
//!
//! Everything about a node comes from its [`NodeSpec`]: pins from its ports (coloured by type),
//! widgets from its parameters (ranges, choices, paths, seeds), the search list from the
//! registry. A wire of the wrong type is refused; an input takes one wire, so a new one
//! replaces the old. A reroute's ANY pins take the type that flows through it, so it is
//! coloured and refused like the port it stands in for. Run states and errors come from
//! [`Runs`].

use std::collections::HashMap;
use std::sync::Arc;

use eframe::egui::{self, Color32, Pos2, Rect, RichText, Stroke, emath::TSTransform};
use egui_snarl::ui::{
    AnyPins, BackgroundPattern, NodeLayout, PinInfo, SnarlPin, SnarlStyle, SnarlViewer,
};
use egui_snarl::{InPin, InPinId, NodeId, OutPin, OutPinId, Snarl};
use flowline_engine::graph::spec::{MAX_SEED, NodeSpec, ParamKind, ParamSpec, ParamView, PortSpec};
use flowline_engine::graph::{Node, ParamValue, PortType};
use flowline_engine::nodes::{self, REGISTRY};
use nucleo_matcher::pattern::{CaseMatching, Normalization, Pattern};
use nucleo_matcher::{Config, Matcher, Utf32Str};

use super::document::{SeedControl, add_node, seed_control, set_seed_control};
use super::groups::GroupsUi;
use super::preview::{self, LatentFrame};
use super::runs::{NodeStatus, Runs};

/// The side of the live preview a sampler node shows of its latest step, in points.
pub const NODE_PREVIEW_SIDE: f32 = 96.0;

/// The colour of a port type, on pins and wires.
pub fn port_color(ty: PortType) -> Color32 {
    match ty {
        PortType::Model => Color32::from_rgb(180, 120, 240),
        PortType::Conditioning => Color32::from_rgb(240, 190, 70),
        PortType::Guider => Color32::from_rgb(90, 200, 160),
        PortType::Latent => Color32::from_rgb(240, 110, 170),
        PortType::Image => Color32::from_rgb(100, 160, 240),
        PortType::Any => Color32::GRAY,
    }
}

fn spec_of(node: &Node) -> Option<&'static NodeSpec> {
    nodes::find(&node.type_name).map(|d| &d.spec)
}

/// The pins wired to `node`'s ANY ports (a reroute's) on one side, each with its node and
/// declared type: upstream, what feeds its input; downstream, what its output feeds.
fn wired_to_any_ports(
    snarl: &Snarl<Node>,
    node: NodeId,
    upstream: bool,
) -> Vec<(NodeId, PortType)> {
    let Some(spec) = snarl.get_node(node).and_then(spec_of) else {
        return Vec::new();
    };
    let is_any = |(_, port): &(usize, &PortSpec)| port.ty == PortType::Any;
    if upstream {
        spec.inputs
            .iter()
            .enumerate()
            .filter(is_any)
            .flat_map(|(input, _)| snarl.in_pin(InPinId { node, input }).remotes)
            .filter_map(|from| {
                let port = spec_of(snarl.get_node(from.node)?)?
                    .outputs
                    .get(from.output)?;
                Some((from.node, port.ty))
            })
            .collect()
    } else {
        spec.outputs
            .iter()
            .enumerate()
            .filter(is_any)
            .flat_map(|(output, _)| snarl.out_pin(OutPinId { node, output }).remotes)
            .filter_map(|to| {
                let port = spec_of(snarl.get_node(to.node)?)?.inputs.get(to.input)?;
                Some((to.node, port.ty))
            })
            .collect()
    }
}

/// The type the wires of `node`'s ANY ports lead to, downstream (through further reroutes).
fn demanded_type(snarl: &Snarl<Node>, node: NodeId) -> PortType {
    PortType::resolve(node, |n| wired_to_any_ports(snarl, n, false))
}

/// What flows through `node`'s ANY ports: the type fed in, else the type its wires lead to;
/// ANY while neither is known.
fn flowing_type(snarl: &Snarl<Node>, node: NodeId) -> PortType {
    match PortType::resolve(node, |n| wired_to_any_ports(snarl, n, true)) {
        PortType::Any => demanded_type(snarl, node),
        ty => ty,
    }
}

/// The type output `pin` gives: its declared type, or what flows through a reroute.
fn output_type(snarl: &Snarl<Node>, pin: OutPinId) -> Option<PortType> {
    let port = spec_of(snarl.get_node(pin.node)?)?
        .outputs
        .get(pin.output)?;
    Some(match port.ty {
        PortType::Any => flowing_type(snarl, pin.node),
        ty => ty,
    })
}

/// The type input `pin` takes: its declared type, or for a reroute the type its output leads
/// to (what feeds it now does not count: a new wire replaces it).
fn input_type(snarl: &Snarl<Node>, pin: InPinId) -> Option<PortType> {
    let port = spec_of(snarl.get_node(pin.node)?)?.inputs.get(pin.input)?;
    Some(match port.ty {
        PortType::Any => demanded_type(snarl, pin.node),
        ty => ty,
    })
}

/// Whether `spec` only passes a value on (its ports are ANY, as a reroute's): such a node is
/// drawn small, its pins on one row without labels.
fn passes_through(spec: &NodeSpec) -> bool {
    spec.inputs
        .iter()
        .chain(&spec.outputs)
        .all(|port| port.ty == PortType::Any)
}

/// A file dialog the editor asked for; the app opens it off the UI thread.
pub struct FileRequest {
    pub node: NodeId,
    pub param: &'static str,
    pub folder: bool,
}

/// Node types for `query`, best first: matched fuzzily on title, type name and category (the
/// query's letters in order, gaps allowed, as ComfyUI's search does), then those whose
/// description holds every word of it. An empty query lists every type in registry order.
pub fn search(query: &str) -> Vec<&'static NodeSpec> {
    let pattern = Pattern::parse(query, CaseMatching::Ignore, Normalization::Smart);
    let mut matcher = Matcher::new(Config::DEFAULT);
    let mut characters = Vec::new();
    let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
    let mut ranked: Vec<(u32, &'static NodeSpec)> = REGISTRY
        .iter()
        .map(|d| &d.spec)
        .filter_map(|spec| {
            let name = format!("{} {} {}", spec.title, spec.type_name, spec.category);
            let fuzzy = pattern.score(Utf32Str::new(&name, &mut characters), &mut matcher);
            let description = spec.description.to_lowercase();
            let described = words.iter().all(|w| description.contains(w.as_str()));
            // Name matches rank above description matches, whatever their score.
            fuzzy
                .map(|score| score + 1)
                .or(described.then_some(0))
                .map(|rank| (rank, spec))
        })
        .collect();
    ranked.sort_by_key(|&(rank, _)| std::cmp::Reverse(rank));
    ranked.into_iter().map(|(_, spec)| spec).collect()
}

/// A search box with the matching node types; returns the type picked (click or Enter, which
/// takes the best match). With an empty box the types are listed under their categories.
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
    let mut category = None;
    for spec in matches {
        if query.trim().is_empty() && category != Some(spec.category) {
            category = Some(spec.category);
            ui.label(RichText::new(spec.category).small().weak());
        }
        let button = ui
            .horizontal(|ui| {
                let button = ui.button(spec.title);
                if !query.trim().is_empty() {
                    ui.label(RichText::new(spec.category).small().weak());
                }
                button
            })
            .inner;
        if button.on_hover_text(spec.description).clicked() {
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
    /// The latest step of the shown run: the node that made it and its predicted image, which
    /// that node shows small, so the emergence is visible on the canvas too.
    pub latest_step: Option<(&'a str, &'a Arc<LatentFrame>)>,
    /// The groups' drag and rename state; the groups are drawn behind the nodes.
    pub groups: &'a mut GroupsUi,
}

impl GraphViewer<'_> {
    /// Shows a port's label and returns its pin, in the colour of type `shown`. Notes a wire
    /// drag that starts on the pin (beside the label, on the node's outer side) and greys the
    /// pin while a wire it would refuse is being dragged: one from the other side that does
    /// not fit type `takes` (a reroute's input shows what flows through it but takes what its
    /// output leads to).
    fn labelled_pin(
        &mut self,
        ui: &mut egui::Ui,
        label: String,
        (shown, takes): (PortType, PortType),
        output: bool,
        connected: bool,
    ) -> PinInfo {
        let label = ui.label(label).on_hover_text(shown.to_string()).rect;
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
            *self.wire_drag_seen = Some((takes, output));
        }
        let refused = self
            .wire_drag
            .is_some_and(|(dragged, from_output)| from_output != output && !dragged.fits(takes));
        port_pin(Some(shown), connected, refused)
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
        let spec = spec_of(&snarl[pin.id.node]);
        let port = spec.and_then(|s| s.inputs.get(pin.id.input));
        let (Some(spec), Some(port), Some(takes)) = (spec, port, input_type(snarl, pin.id)) else {
            return port_pin(None, false, false);
        };
        let label = if passes_through(spec) {
            String::new()
        } else if port.optional {
            format!("{} (optional)", port.name)
        } else {
            port.name.to_string()
        };
        let shown = match port.ty {
            PortType::Any => flowing_type(snarl, pin.id.node),
            ty => ty,
        };
        self.labelled_pin(ui, label, (shown, takes), false, !pin.remotes.is_empty())
    }

    fn show_output(
        &mut self,
        pin: &OutPin,
        ui: &mut egui::Ui,
        snarl: &mut Snarl<Node>,
    ) -> impl SnarlPin + 'static {
        let spec = spec_of(&snarl[pin.id.node]);
        let port = spec.and_then(|s| s.outputs.get(pin.id.output));
        let (Some(spec), Some(port), Some(gives)) = (spec, port, output_type(snarl, pin.id)) else {
            return port_pin(None, false, false);
        };
        let label = if passes_through(spec) {
            String::new()
        } else {
            port.name.to_string()
        };
        self.labelled_pin(ui, label, (gives, gives), true, !pin.remotes.is_empty())
    }

    fn node_layout(
        &mut self,
        default: NodeLayout,
        node: NodeId,
        _inputs: &[InPin],
        _outputs: &[OutPin],
        snarl: &Snarl<Node>,
    ) -> NodeLayout {
        if spec_of(&snarl[node]).is_some_and(passes_through) {
            NodeLayout::coil()
        } else {
            default
        }
    }

    fn has_body(&mut self, node: &Node) -> bool {
        spec_of(node).is_some_and(|s| !s.params.is_empty())
    }

    fn show_body(
        &mut self,
        node: NodeId,
        inputs: &[InPin],
        _outputs: &[OutPin],
        ui: &mut egui::Ui,
        snarl: &mut Snarl<Node>,
    ) {
        let Some(spec) = spec_of(&snarl[node]) else {
            return;
        };
        let connected = |name: &str| {
            let index = spec.inputs.iter().position(|p| p.name == name);
            index.is_some_and(|i| inputs.get(i).is_some_and(|pin| !pin.remotes.is_empty()))
        };
        let view = ParamView::new(spec, &snarl[node].params, &connected);
        let (shown, folded): (Vec<&ParamSpec>, Vec<&ParamSpec>) = spec
            .applicable_params(&view)
            .into_iter()
            .partition(|p| !p.folded);
        let mut grid = |ui: &mut egui::Ui, part: &str, params: &[&ParamSpec]| {
            egui::Grid::new((node, part))
                .num_columns(2)
                .spacing([6.0, 4.0])
                .show(ui, |ui| {
                    for param in params {
                        self.param_widget(ui, &mut snarl[node], node, param);
                    }
                });
        };
        grid(ui, "params", &shown);
        if !folded.is_empty() {
            egui::CollapsingHeader::new(RichText::new("more").small())
                .id_salt((node, "more"))
                .show(ui, |ui| grid(ui, "more", &folded));
        }
    }

    fn has_footer(&mut self, node: &Node) -> bool {
        self.latest_step.is_some_and(|(id, _)| id == node.id)
            || self.runs.problem(&node.id).is_some()
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
        // The preview, then one note under another, each wrapped: the footer's layout would
        // otherwise set them side by side or widen the node to the longest and lay it over its
        // neighbours.
        ui.vertical(|ui| {
            if let Some((_, frame)) = self.latest_step.filter(|(step_node, _)| step_node == id) {
                preview::show(ui, preview::NODE_SLOT, frame, NODE_PREVIEW_SIDE);
            }
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
        });
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

    fn draw_background(
        &mut self,
        background: Option<&BackgroundPattern>,
        viewport: &Rect,
        snarl_style: &SnarlStyle,
        style: &egui::Style,
        painter: &egui::Painter,
        snarl: &Snarl<Node>,
    ) {
        if let Some(background) = background {
            background.draw(viewport, snarl_style, style, painter);
        }
        self.groups
            .show(self.ui_state, self.node_rects, snarl, painter);
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
        let types = (output_type(snarl, from.id), input_type(snarl, to.id));
        let (Some(out_port), Some(in_port), (Some(gives), Some(takes))) =
            (out_port, in_port, types)
        else {
            return;
        };
        if !gives.fits(takes) {
            *self.notice = Some(format!(
                "not connected: {}.{} gives {} but {}.{} takes {}",
                snarl[from.id.node].id,
                out_port.name,
                gives,
                snarl[to.id.node].id,
                in_port.name,
                takes
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
                pins.first().and_then(|&p| output_type(snarl, p)),
                pins.to_vec(),
                Vec::new(),
            ),
            AnyPins::In(pins) => (
                pins.first().and_then(|&p| input_type(snarl, p)),
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
                spec.inputs.iter().any(|p| p.ty.fits(ty))
            } else {
                spec.outputs.iter().any(|p| p.ty.fits(ty))
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
            if let Some(input) = spec.inputs.iter().position(|p| p.ty.fits(ty)) {
                let to = InPinId {
                    node: new_node,
                    input,
                };
                for from in outs {
                    snarl.connect(from, to);
                }
            }
        } else if let Some(output) = spec.outputs.iter().position(|p| p.ty.fits(ty)) {
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
