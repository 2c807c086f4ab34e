//! The open workflow as the editor holds it: an egui-snarl graph of engine [`Node`]s, the
//! file it came from, and its undo history.
//!
//! The engine's [`Graph`] stays the one description of a workflow: the editor converts to it
//! for running, saving, copying and undo, and back from it for opening, pasting and undoing.
//! Undo works on whole-workflow snapshots (the graph and the `ui` state beside it: seed
//! controls, groups) taken when an edit is over (no mouse button held), so every kind of edit
//! — a parameter, a wire, a move, a paste, a group — is undoable without each widget having
//! to record what it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use eframe::egui::{Pos2, pos2, vec2};
use egui_snarl::{InPinId, NodeId, OutPinId, Snarl};
use flowline_engine::graph::spec::{MAX_SEED, ParamKind};
use flowline_engine::graph::{Endpoint, Graph, Link, Node};
use flowline_engine::nodes;
use flowline_engine::workflow::{Workflow, WorkflowError};

/// How many edits undo remembers.
const HISTORY_LIMIT: usize = 200;

/// What a seed does after each Run, as in ComfyUI's "control after generate".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedControl {
    Fixed,
    Increment,
    Randomize,
}

impl SeedControl {
    pub const ALL: [SeedControl; 3] = [
        SeedControl::Fixed,
        SeedControl::Increment,
        SeedControl::Randomize,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SeedControl::Fixed => "fixed",
            SeedControl::Increment => "increment",
            SeedControl::Randomize => "randomize",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

pub struct Document {
    pub snarl: Snarl<Node>,
    /// The file this workflow is saved in, if any.
    pub path: Option<PathBuf>,
    /// The workflow's `ui` object from its file, kept and written back (seed controls and
    /// groups live here).
    pub ui_state: serde_json::Value,
    /// The workflow as last saved or opened, to tell whether there are unsaved changes.
    saved: Workflow,
    /// The workflow after the last finished edit.
    current: Workflow,
    undo: Vec<Workflow>,
    redo: Vec<Workflow>,
}

impl Document {
    /// The document for `workflow`. Parameters the file leaves out are filled in with their
    /// defaults, as the editor's widgets show them, so opening a file is not an edit.
    pub fn new(workflow: Workflow, path: Option<PathBuf>) -> Self {
        let mut snarl = snarl_from_graph(&workflow.graph);
        for node in snarl.nodes_mut() {
            if let Some(def) = nodes::find(&node.type_name) {
                for param in &def.spec.params {
                    node.params
                        .entry(param.name.to_string())
                        .or_insert_with(|| param.default.clone());
                }
            }
        }
        let current = Workflow {
            graph: graph_from_snarl(&snarl),
            ui: workflow.ui,
        };
        Document {
            snarl,
            path,
            ui_state: current.ui.clone(),
            saved: current.clone(),
            current,
            undo: Vec::new(),
            redo: Vec::new(),
        }
    }

    /// The graph as it is on screen now.
    pub fn graph(&self) -> Graph {
        graph_from_snarl(&self.snarl)
    }

    pub fn workflow(&self) -> Workflow {
        Workflow {
            graph: self.graph(),
            ui: self.ui_state.clone(),
        }
    }

    pub fn is_modified(&self) -> bool {
        self.workflow() != self.saved
    }

    /// Records that the document now matches what is on disk at `path`.
    pub fn mark_saved(&mut self, path: PathBuf) {
        self.path = Some(path);
        self.saved = self.workflow();
    }

    /// Ends the edit in progress: if the workflow changed since the last call, the previous
    /// state becomes an undo step. Call when no drag is under way, so a drag is one step.
    pub fn commit_edits(&mut self) {
        let now = self.workflow();
        if now != self.current {
            let before = std::mem::replace(&mut self.current, now);
            self.undo.push(before);
            if self.undo.len() > HISTORY_LIMIT {
                self.undo.remove(0);
            }
            self.redo.clear();
        }
    }

    pub fn can_undo(&self) -> bool {
        !self.undo.is_empty()
    }

    pub fn can_redo(&self) -> bool {
        !self.redo.is_empty()
    }

    pub fn undo(&mut self) {
        self.commit_edits();
        if let Some(previous) = self.undo.pop() {
            let now = std::mem::replace(&mut self.current, previous);
            self.redo.push(now);
            self.show_current();
        }
    }

    pub fn redo(&mut self) {
        self.commit_edits();
        if let Some(next) = self.redo.pop() {
            let now = std::mem::replace(&mut self.current, next);
            self.undo.push(now);
            self.show_current();
        }
    }

    /// Puts the workflow after the last finished edit back on screen (after undo or redo).
    fn show_current(&mut self) {
        self.snarl = snarl_from_graph(&self.current.graph);
        self.ui_state = self.current.ui.clone();
    }

    /// Adds a node of `type_name` with default parameters at `position`.
    pub fn add_node(&mut self, type_name: &str, position: Pos2) -> Option<NodeId> {
        add_node(&mut self.snarl, type_name, position)
    }

    pub fn remove_nodes(&mut self, ids: &[NodeId]) {
        for &id in ids {
            if self.snarl.get_node(id).is_some() {
                self.snarl.remove_node(id);
            }
        }
    }

    /// The selected nodes and the links among them, as workflow JSON for the clipboard.
    pub fn copy(&self, ids: &[NodeId]) -> String {
        let graph = self.graph();
        let chosen: BTreeSet<String> = ids
            .iter()
            .filter_map(|&id| self.snarl.get_node(id).map(|n| n.id.clone()))
            .collect();
        let part = Graph {
            nodes: graph
                .nodes
                .into_iter()
                .filter(|n| chosen.contains(&n.id))
                .collect(),
            links: graph
                .links
                .into_iter()
                .filter(|l| chosen.contains(&l.from.node) && chosen.contains(&l.to.node))
                .collect(),
        };
        Workflow::new(part).to_json()
    }

    /// Pastes workflow JSON (from [`Document::copy`] or a workflow file) so that its top-left
    /// node lands at `at`; node ids that are taken get fresh ones. Returns the new nodes.
    pub fn paste(&mut self, json: &str, at: Pos2) -> Result<Vec<NodeId>, WorkflowError> {
        let pasted = Workflow::from_json(json, "the clipboard")?.graph;
        let origin = pasted
            .nodes
            .iter()
            .map(|n| pos2(n.position[0], n.position[1]))
            .reduce(|a, b| a.min(b))
            .unwrap_or(at);
        let mut renamed = HashMap::new();
        let mut added_by_id = HashMap::new();
        let mut added = Vec::new();
        for mut node in pasted.nodes {
            let fresh = self.free_id(&node.id);
            renamed.insert(node.id.clone(), fresh.clone());
            node.id = fresh.clone();
            let position = at + (pos2(node.position[0], node.position[1]) - origin);
            node.position = [position.x, position.y];
            let type_name = node.type_name.clone();
            let id = self.snarl.insert_node(position, node);
            added_by_id.insert(fresh, (id, type_name));
            added.push(id);
        }
        for link in pasted.links {
            let (Some(from), Some(to)) = (renamed.get(&link.from.node), renamed.get(&link.to.node))
            else {
                continue;
            };
            if let (Some(out_pin), Some(in_pin)) = (
                out_pin_of(&added_by_id, from, &link.from.port),
                in_pin_of(&added_by_id, to, &link.to.port),
            ) {
                self.snarl.connect(out_pin, in_pin);
            }
        }
        Ok(added)
    }

    /// Copies and pastes `ids` a little down and to the right.
    pub fn duplicate(&mut self, ids: &[NodeId]) -> Vec<NodeId> {
        let Some(top_left) = ids
            .iter()
            .filter_map(|&id| self.snarl.get_node_info(id).map(|n| n.pos))
            .reduce(|a, b| a.min(b))
        else {
            return Vec::new();
        };
        let json = self.copy(ids);
        self.paste(&json, top_left + vec2(40.0, 40.0))
            .expect("a copy of the graph is a valid workflow")
    }

    /// The node whose workflow id is `id`.
    #[cfg(test)]
    pub fn node_by_workflow_id(&self, id: &str) -> Option<NodeId> {
        self.snarl
            .node_ids()
            .find(|(_, node)| node.id == id)
            .map(|(snarl_id, _)| snarl_id)
    }

    /// Applies every seed's control after a run was queued: increments or redraws seeds.
    pub fn advance_seeds(&mut self, random: &mut impl FnMut() -> i64) {
        let mut changes = Vec::new();
        for (id, node) in self.snarl.node_ids() {
            let Some(def) = nodes::find(&node.type_name) else {
                continue;
            };
            for param in &def.spec.params {
                if param.kind != ParamKind::Seed {
                    continue;
                }
                let seed = match node.params.get(param.name) {
                    Some(flowline_engine::graph::ParamValue::Int(seed)) => *seed,
                    _ => 0,
                };
                let next = match seed_control(&self.ui_state, &node.id, param.name) {
                    SeedControl::Fixed => continue,
                    SeedControl::Increment => (seed + 1) % (MAX_SEED + 1),
                    SeedControl::Randomize => random().rem_euclid(MAX_SEED + 1),
                };
                changes.push((id, param.name, next));
            }
        }
        for (id, param, seed) in changes {
            self.snarl[id].params.insert(
                param.to_string(),
                flowline_engine::graph::ParamValue::Int(seed),
            );
        }
    }

    fn free_id(&self, base: &str) -> String {
        free_id(&self.snarl, base)
    }
}

/// Adds a node of `type_name` with default parameters at `position` (graph coordinates).
pub fn add_node(snarl: &mut Snarl<Node>, type_name: &str, position: Pos2) -> Option<NodeId> {
    let def = nodes::find(type_name)?;
    let params = def
        .spec
        .params
        .iter()
        .map(|p| (p.name.to_string(), p.default.clone()))
        .collect();
    let node = Node {
        id: free_id(snarl, type_name),
        type_name: type_name.to_string(),
        position: [position.x, position.y],
        params,
    };
    Some(snarl.insert_node(position, node))
}

/// `base`, or `base_2`, `base_3`, … whichever no node has.
fn free_id(snarl: &Snarl<Node>, base: &str) -> String {
    let taken: BTreeSet<&str> = snarl.nodes().map(|n| n.id.as_str()).collect();
    if !taken.contains(base) {
        return base.to_string();
    }
    let stem = match base.rsplit_once('_') {
        Some((stem, n)) if n.parse::<u32>().is_ok() => stem,
        _ => base,
    };
    (2..)
        .map(|n| format!("{stem}_{n}"))
        .find(|candidate| !taken.contains(candidate.as_str()))
        .expect("some number is free")
}

/// The seed control of `node`'s seed parameter `param`, kept in the workflow's `ui` object.
pub fn seed_control(ui_state: &serde_json::Value, node: &str, param: &str) -> SeedControl {
    ui_state
        .pointer(&format!("/seed_control/{node}/{param}"))
        .and_then(|v| v.as_str())
        .and_then(SeedControl::from_name)
        .unwrap_or(SeedControl::Fixed)
}

pub fn set_seed_control(
    ui_state: &mut serde_json::Value,
    node: &str,
    param: &str,
    control: SeedControl,
) {
    if !ui_state.is_object() {
        *ui_state = serde_json::json!({});
    }
    if !ui_state["seed_control"].is_object() {
        ui_state["seed_control"] = serde_json::json!({});
    }
    let controls = &mut ui_state["seed_control"];
    if !controls[node].is_object() {
        controls[node] = serde_json::json!({});
    }
    controls[node][param] = control.name().into();
}

fn out_pin_of(
    nodes_by_id: &HashMap<String, (NodeId, String)>,
    node: &str,
    port: &str,
) -> Option<OutPinId> {
    let (id, type_name) = nodes_by_id.get(node)?;
    let spec = &nodes::find(type_name)?.spec;
    let output = spec.outputs.iter().position(|p| p.name == port)?;
    Some(OutPinId { node: *id, output })
}

fn in_pin_of(
    nodes_by_id: &HashMap<String, (NodeId, String)>,
    node: &str,
    port: &str,
) -> Option<InPinId> {
    let (id, type_name) = nodes_by_id.get(node)?;
    let spec = &nodes::find(type_name)?.spec;
    let input = spec.inputs.iter().position(|p| p.name == port)?;
    Some(InPinId { node: *id, input })
}

/// The editor graph for an engine graph. Links to ports a node type does not have are left
/// out (the engine's validation would reject them anyway).
pub fn snarl_from_graph(graph: &Graph) -> Snarl<Node> {
    let mut snarl = Snarl::new();
    let mut ids = HashMap::new();
    for node in &graph.nodes {
        let position = pos2(node.position[0], node.position[1]);
        let id = snarl.insert_node(position, node.clone());
        ids.insert(node.id.clone(), (id, node.type_name.clone()));
    }
    for link in &graph.links {
        if let (Some(from), Some(to)) = (
            out_pin_of(&ids, &link.from.node, &link.from.port),
            in_pin_of(&ids, &link.to.node, &link.to.port),
        ) {
            snarl.connect(from, to);
        }
    }
    snarl
}

/// The engine graph for what the editor shows: nodes in the editor's id order, with their
/// positions on the canvas, and links sorted for a stable file.
pub fn graph_from_snarl(snarl: &Snarl<Node>) -> Graph {
    let mut by_snarl_id = BTreeMap::new();
    let nodes: Vec<Node> = snarl
        .nodes_pos_ids()
        .map(|(id, position, node)| {
            by_snarl_id.insert(id, node);
            Node {
                position: [position.x.round(), position.y.round()],
                ..node.clone()
            }
        })
        .collect();
    let endpoint = |id: NodeId, port: Option<&'static str>| {
        let node = by_snarl_id.get(&id)?;
        Some(Endpoint {
            node: node.id.clone(),
            port: port?.to_string(),
        })
    };
    let mut links: Vec<Link> = snarl
        .wires()
        .filter_map(|(out_pin, in_pin)| {
            let from_node = by_snarl_id.get(&out_pin.node)?;
            let to_node = by_snarl_id.get(&in_pin.node)?;
            let from_spec = &nodes::find(&from_node.type_name)?.spec;
            let to_spec = &nodes::find(&to_node.type_name)?.spec;
            Some(Link {
                from: endpoint(
                    out_pin.node,
                    from_spec.outputs.get(out_pin.output).map(|p| p.name),
                )?,
                to: endpoint(
                    in_pin.node,
                    to_spec.inputs.get(in_pin.input).map(|p| p.name),
                )?,
            })
        })
        .collect();
    links.sort_by(|a, b| {
        (&a.to.node, &a.to.port, &a.from.node).cmp(&(&b.to.node, &b.to.port, &b.from.node))
    });
    Graph { nodes, links }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline_engine::workflow::DEFAULT_WORKFLOW;

    fn default_document() -> Document {
        Document::new(
            Workflow::from_json(DEFAULT_WORKFLOW, "default").unwrap(),
            None,
        )
    }

    #[test]
    fn a_workflow_survives_the_round_trip_through_the_editor() {
        flowline_engine::model::install_families(flowline_shapes::FAMILIES);
        let workflow = Workflow::from_json(DEFAULT_WORKFLOW, "default").unwrap();
        let graph = graph_from_snarl(&snarl_from_graph(&workflow.graph));
        assert_eq!(graph.nodes, workflow.graph.nodes);
        let document = Document::new(workflow.clone(), None);
        assert!(!document.is_modified(), "opening is not an edit");
        let sampler = document.graph();
        let sampler = sampler.node("sampler").unwrap();
        assert_eq!(
            sampler.params["max_shift"],
            flowline_engine::graph::ParamValue::Float(1.15)
        );
        let mut expected = workflow.graph.links.clone();
        let mut found = graph.links.clone();
        expected.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        found.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        assert_eq!(found, expected);
    }

    #[test]
    fn copy_paste_renames_and_keeps_inner_links() {
        flowline_engine::model::install_families(flowline_shapes::FAMILIES);
        let mut doc = default_document();
        let picked: Vec<NodeId> = ["model", "prompt"]
            .iter()
            .map(|id| doc.node_by_workflow_id(id).unwrap())
            .collect();
        let json = doc.copy(&picked);
        let added = doc.paste(&json, pos2(500.0, 500.0)).unwrap();
        assert_eq!(added.len(), 2);
        let before = doc.graph();
        let (model, prompt) = (
            before.node("model").unwrap(),
            before.node("prompt").unwrap(),
        );
        let corner = [
            model.position[0].min(prompt.position[0]),
            model.position[1].min(prompt.position[1]),
        ];
        let landed = |p: [f32; 2]| [500.0 + p[0] - corner[0], 500.0 + p[1] - corner[1]];
        let graph = doc.graph();
        assert!(graph.node("model_2").is_some() && graph.node("prompt_2").is_some());
        assert!(
            graph.links.iter().any(|l| l.from.node == "model_2"
                && l.to.node == "prompt_2"
                && l.to.port == "model")
        );
        // The pasted group's top-left corner lands where it is pasted.
        assert_eq!(
            graph.node("model_2").unwrap().position,
            landed(model.position)
        );
        assert_eq!(
            graph.node("prompt_2").unwrap().position,
            landed(prompt.position)
        );
    }

    #[test]
    fn undo_and_redo_walk_the_edits() {
        flowline_engine::model::install_families(flowline_shapes::FAMILIES);
        let mut doc = default_document();
        let original = doc.graph();
        let sampler = doc.node_by_workflow_id("sampler").unwrap();
        doc.snarl[sampler]
            .params
            .insert("steps".into(), flowline_engine::graph::ParamValue::Int(4));
        doc.commit_edits();
        let edited = doc.graph();
        doc.remove_nodes(&[sampler]);
        doc.commit_edits();
        assert!(doc.graph().node("sampler").is_none());
        doc.undo();
        assert_eq!(doc.graph(), edited);
        doc.undo();
        assert_eq!(doc.graph(), original);
        assert!(!doc.can_undo());
        doc.redo();
        assert_eq!(doc.graph(), edited);
        assert!(doc.is_modified());
    }

    #[test]
    fn seeds_follow_their_control_after_a_run() {
        flowline_engine::model::install_families(flowline_shapes::FAMILIES);
        let mut doc = default_document();
        set_seed_control(&mut doc.ui_state, "start", "seed", SeedControl::Increment);
        doc.advance_seeds(&mut || 7);
        assert_eq!(
            doc.graph().node("start").unwrap().params["seed"],
            flowline_engine::graph::ParamValue::Int(43)
        );
        set_seed_control(&mut doc.ui_state, "start", "seed", SeedControl::Randomize);
        doc.advance_seeds(&mut || 7);
        assert_eq!(
            doc.graph().node("start").unwrap().params["seed"],
            flowline_engine::graph::ParamValue::Int(7)
        );
        assert_eq!(
            doc.workflow().ui["seed_control"]["start"]["seed"],
            "randomize"
        );
    }
}
