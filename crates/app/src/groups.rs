//! Groups: titled frames that gather nodes on the canvas and move them together, as ComfyUI's
//! groups do, so the parts of a large graph can be told apart and tidied.
//!
//! A group is drawing, not part of the graph the engine runs, so it lives in the workflow's
//! `ui` state, `"groups": [{"title": …, "rect": [x, y, width, height]}]` in graph coordinates
//! (ComfyUI's bounding box), and is edited there through the [`Document`], whose undo history
//! and unsaved-changes mark cover that state. A group holds a rectangle, not a list of nodes:
//! the nodes it moves are those inside it when its title bar is grabbed, as in ComfyUI, so
//! adding, removing, pasting or undoing nodes (undo rebuilds the editor's graph under new node
//! ids) needs no bookkeeping.
//!
//! The frames are drawn from the viewer's `draw_background`, on the editor's own layer before
//! the nodes and wires, so they lie behind them and their title bars take only the drags no
//! node takes. Moving nodes needs the graph mutably, which egui-snarl lends only outside its
//! drawing, so a drag is applied by [`GroupsUi::apply_drag`] once the editor is drawn.

use std::collections::HashMap;

use eframe::egui::{
    self, Align2, Color32, CornerRadius, FontId, Id, Key, Pos2, Rect, Sense, Stroke, UiBuilder,
    Vec2, pos2, vec2,
};
use egui_snarl::{NodeId, Snarl};
use flowline_engine::graph::Node;
use serde::{Deserialize, Serialize};

use super::FlowlineApp;
use super::document::Document;

/// The space between a new group's frame and the nodes it is made around (graph units).
const MARGIN: f32 = 20.0;
/// The height of a group's title bar, the part that is dragged (graph units).
const TITLE_BAR: f32 = 30.0;
/// The title a new group gets.
const NEW_TITLE: &str = "Group";
/// ComfyUI's default group colour.
const TINT: Color32 = Color32::from_rgb(63, 120, 158);

/// A titled frame on the canvas, as the workflow's `ui` state stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub title: String,
    /// Left, top, width and height in graph coordinates, the title bar included.
    pub rect: [f32; 4],
}

impl Group {
    /// A group framing `rects` with a margin, and a title bar above them; none for no rects.
    fn around(title: &str, rects: impl IntoIterator<Item = Rect>) -> Option<Group> {
        let inner = rects.into_iter().reduce(Rect::union)?.expand(MARGIN);
        let mut group = Group {
            title: title.to_string(),
            rect: [0.0; 4],
        };
        group.set_frame(Rect::from_min_max(
            inner.min - vec2(0.0, TITLE_BAR),
            inner.max,
        ));
        Some(group)
    }

    pub fn frame(&self) -> Rect {
        let [x, y, width, height] = self.rect;
        Rect::from_min_size(pos2(x, y), vec2(width, height))
    }

    fn set_frame(&mut self, frame: Rect) {
        self.rect = [frame.min.x, frame.min.y, frame.width(), frame.height()];
    }

    fn title_bar(&self) -> Rect {
        let frame = self.frame();
        Rect::from_min_max(frame.min, pos2(frame.max.x, frame.min.y + TITLE_BAR))
    }
}

/// The groups kept in a workflow's `ui` state, in drawing order; none where the state holds
/// none it understands.
pub fn groups(ui_state: &serde_json::Value) -> Vec<Group> {
    ui_state
        .get("groups")
        .and_then(|groups| serde_json::from_value(groups.clone()).ok())
        .unwrap_or_default()
}

/// Stores `groups` in a workflow's `ui` state; no groups leave no entry.
fn set_groups(ui_state: &mut serde_json::Value, groups: &[Group]) {
    if groups.is_empty() {
        if let Some(state) = ui_state.as_object_mut() {
            state.remove("groups");
        }
        return;
    }
    if !ui_state.is_object() {
        *ui_state = serde_json::json!({});
    }
    if let Ok(groups) = serde_json::to_value(groups) {
        ui_state["groups"] = groups;
    }
}

/// A title bar being dragged.
struct GroupDrag {
    /// The group's index in the stored list.
    group: usize,
    /// The group's frame when the drag began.
    frame: Rect,
    /// The nodes inside the frame when the drag began, with their positions then.
    members: Vec<(NodeId, Pos2)>,
    /// How far the pointer has moved since the drag began (graph units).
    offset: Vec2,
    /// The button was released: the drag is applied one last time.
    released: bool,
}

/// What the canvas remembers of the groups between frames: a drag, a title being edited.
#[derive(Default)]
pub struct GroupsUi {
    drag: Option<GroupDrag>,
    /// The group whose title is being edited, and the text so far.
    renaming: Option<(usize, String)>,
}

impl GroupsUi {
    /// Draws the groups of `ui_state` with `painter` (the editor's layer, graph coordinates)
    /// and handles their title bars: a drag moves the group and the nodes inside it (see
    /// [`GroupsUi::apply_drag`]); a right-click offers Rename, an inline field where Enter or
    /// a click elsewhere keeps the new title and Escape the old, and Remove group, which
    /// leaves the nodes where they are.
    pub fn show(
        &mut self,
        ui_state: &mut serde_json::Value,
        node_rects: &HashMap<NodeId, Rect>,
        snarl: &Snarl<Node>,
        painter: &egui::Painter,
    ) {
        let mut groups = groups(ui_state);
        if groups.is_empty() {
            return;
        }
        let id = Id::new("flowline-groups");
        let mut ui = egui::Ui::new(
            painter.ctx().clone(),
            id,
            UiBuilder::new()
                .layer_id(painter.layer_id())
                .max_rect(painter.clip_rect()),
        );
        let mut edited = false;
        let mut removed = None;
        for (index, group) in groups.iter_mut().enumerate() {
            let bar = group.title_bar();
            let corners = CornerRadius::same(6);
            painter.rect(
                group.frame(),
                corners,
                TINT.gamma_multiply(0.15),
                Stroke::new(1.5, TINT),
                egui::StrokeKind::Inside,
            );
            let bar_corners = CornerRadius {
                sw: 0,
                se: 0,
                ..corners
            };
            painter.rect_filled(bar, bar_corners, TINT.gamma_multiply(0.6));
            let grip = ui.interact(bar, id.with(index), Sense::click_and_drag());
            self.follow_drag(index, group, &grip, node_rects, snarl);
            grip.context_menu(|menu| {
                if menu.button("Rename").clicked() {
                    self.renaming = Some((index, group.title.clone()));
                    menu.close();
                }
                if menu.button("Remove group").clicked() {
                    removed = Some(index);
                    menu.close();
                }
            });
            match &mut self.renaming {
                Some((renamed, text)) if *renamed == index => {
                    let edit = ui.put(
                        bar.shrink2(vec2(6.0, 3.0)),
                        egui::TextEdit::singleline(text),
                    );
                    if edit.lost_focus() {
                        if !ui.input(|i| i.key_pressed(Key::Escape)) {
                            group.title = text.clone();
                            edited = true;
                        }
                        self.renaming = None;
                    } else if !edit.has_focus() {
                        edit.request_focus();
                    }
                }
                _ => {
                    painter.text(
                        bar.left_center() + vec2(10.0, 0.0),
                        Align2::LEFT_CENTER,
                        &group.title,
                        FontId::proportional(16.0),
                        Color32::from_gray(235),
                    );
                }
            }
        }
        if let Some(index) = removed {
            groups.remove(index);
            self.drag = None;
            self.renaming = None;
            edited = true;
        }
        if edited {
            set_groups(ui_state, &groups);
        }
    }

    /// Starts, follows or ends a drag of group `index` by its title bar `grip`.
    fn follow_drag(
        &mut self,
        index: usize,
        group: &Group,
        grip: &egui::Response,
        node_rects: &HashMap<NodeId, Rect>,
        snarl: &Snarl<Node>,
    ) {
        if grip.drag_started() {
            let frame = group.frame();
            let members = snarl
                .nodes_pos_ids()
                .filter(|(node, _, _)| {
                    node_rects
                        .get(node)
                        .is_some_and(|r| frame.contains_rect(*r))
                })
                .map(|(node, position, _)| (node, position))
                .collect();
            self.drag = Some(GroupDrag {
                group: index,
                frame,
                members,
                offset: Vec2::ZERO,
                released: false,
            });
        }
        let Some(drag) = self.drag.as_mut().filter(|drag| drag.group == index) else {
            return;
        };
        if let Some(offset) = grip.total_drag_delta() {
            drag.offset = offset;
        }
        drag.released |= grip.drag_stopped();
    }

    /// Moves the dragged group and the nodes it held to where the drag has taken them.
    pub fn apply_drag(&mut self, doc: &mut Document) {
        let Some(drag) = &self.drag else {
            return;
        };
        for &(node, start) in &drag.members {
            if let Some(info) = doc.snarl.get_node_info_mut(node) {
                info.pos = start + drag.offset;
            }
        }
        let mut groups = groups(&doc.ui_state);
        if let Some(group) = groups.get_mut(drag.group) {
            group.set_frame(drag.frame.translate(drag.offset));
            set_groups(&mut doc.ui_state, &groups);
        }
        if drag.released {
            self.drag = None;
        }
    }
}

impl FlowlineApp {
    /// Frames the nodes `selected` in a new group (Edit ▸ Group selected nodes, Ctrl+G).
    pub(super) fn group_selected(&mut self, selected: &[NodeId]) {
        let rects = selected
            .iter()
            .filter_map(|id| self.node_rects.get(id).copied());
        let Some(group) = Group::around(NEW_TITLE, rects) else {
            self.notice = Some("no group made: select the nodes to group first".into());
            return;
        };
        let mut all = groups(&self.doc.ui_state);
        all.push(group);
        set_groups(&mut self.doc.ui_state, &all);
    }
}
