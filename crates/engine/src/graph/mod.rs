//! The node graph: what a workflow *is*, independent of how it is run or drawn.
//!
//! A [`Graph`] is plain data (node ids, type names, parameter values, positions, links) so the
//! GUI can edit it, the workflow file can store it, and the executor can run a snapshot of it.
//! What each node type declares (its ports and parameters) is in [`spec`]; the node types
//! themselves are in `crate::nodes`.

pub mod spec;
pub mod value;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The type of a port; a link may only join an output and an input of the same type, where
/// a reroute's `Any` stands for the type that flows through it (see [`PortType::fits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PortType {
    Model,
    Conditioning,
    Guider,
    Latent,
    Image,
    /// A port that passes on whatever reaches it (a reroute's): its node's `Any` outputs carry
    /// the type that flows into its `Any` input, found by [`PortType::resolve`].
    Any,
}

impl PortType {
    /// Whether a link may join ports of these types: the same type, or one not yet known.
    pub fn fits(self, other: PortType) -> bool {
        self == other || self == PortType::Any || other == PortType::Any
    }

    /// The type an `Any` port of node `start` stands for: the first fixed type met walking the
    /// links from node to node, where `neighbours(node)` gives the ports linked to `node`'s
    /// `Any` ports on one side (upstream: what feeds its input; downstream: what its output
    /// feeds), each with its node and declared type. A neighbour's `Any` port is walked
    /// through, so a chain of reroutes carries one type. `Any` where the walk meets no fixed
    /// type (nothing connected, or a loop of reroutes).
    pub fn resolve<N: Copy + PartialEq>(
        start: N,
        mut neighbours: impl FnMut(N) -> Vec<(N, PortType)>,
    ) -> PortType {
        let mut seen = vec![start];
        let mut to_visit = vec![start];
        while let Some(node) = to_visit.pop() {
            for (neighbour, ty) in neighbours(node) {
                if ty != PortType::Any {
                    return ty;
                }
                if !seen.contains(&neighbour) {
                    seen.push(neighbour);
                    to_visit.push(neighbour);
                }
            }
        }
        PortType::Any
    }
}

impl fmt::Display for PortType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            PortType::Model => "MODEL",
            PortType::Conditioning => "CONDITIONING",
            PortType::Guider => "GUIDER",
            PortType::Latent => "LATENT",
            PortType::Image => "IMAGE",
            PortType::Any => "ANY",
        };
        f.write_str(name)
    }
}

/// A parameter's value as stored in a workflow file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// One end of a link: a node and one of its ports, by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub node: String,
    pub port: String,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.node, self.port)
    }
}

/// A wire from an output port to an input port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub from: Endpoint,
    pub to: Endpoint,
}

/// A node instance: which type it is, its parameter values and where it sits on the canvas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub id: String,
    #[serde(rename = "type")]
    pub type_name: String,
    #[serde(default)]
    pub position: [f32; 2],
    #[serde(default)]
    pub params: BTreeMap<String, ParamValue>,
}

/// A whole graph: nodes in file order and the links between them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub links: Vec<Link>,
}

impl Graph {
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn node_mut(&mut self, id: &str) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.id == id)
    }

    /// The link feeding input `port` of node `node`, if any.
    pub fn link_into(&self, node: &str, port: &str) -> Option<&Link> {
        self.links
            .iter()
            .find(|l| l.to.node == node && l.to.port == port)
    }
}
