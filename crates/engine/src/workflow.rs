//! Workflow files: a graph on disk, as versioned JSON.
//!
//! ```json
//! { "format": "flowline-workflow", "version": 1,
//!   "nodes": [ { "id": "prompt", "type": "encode_prompt", "position": [0, 0],
//!                "params": { "text": "a red circle" } } ],
//!   "links": [ { "from": { "node": "model", "port": "model" },
//!                "to":   { "node": "prompt", "port": "model" } } ],
//!   "ui": { } }
//! ```
//! `ui` is free for the app's state (view, selection) and is kept as it is. Loading never
//! panics: a broken file gives a [`WorkflowError`] naming the file and, for syntax errors, the
//! line and column; saving replaces the file atomically.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::write_atomic;
use crate::graph::{Graph, Link, Node};
use crate::nodes::{self, REGISTRY};

/// The `format` value of every workflow file.
pub const FORMAT: &str = "flowline-workflow";
/// The newest version this build reads and the one it writes.
pub const VERSION: u32 = 1;

/// The text-to-image workflow the app opens with, built into the binary.
pub const DEFAULT_WORKFLOW: &str = include_str!("../../../assets/workflows/default.json");

/// A workflow shipped in `assets/workflows`.
pub struct ExampleWorkflow {
    /// What it does, as a menu lists it.
    pub title: &'static str,
    /// Its file name in `assets/workflows`.
    pub file: &'static str,
    pub json: &'static str,
}

/// Every shipped workflow, built into the binary so the app offers them wherever it runs.
pub const EXAMPLE_WORKFLOWS: [ExampleWorkflow; 6] = [
    ExampleWorkflow {
        title: "Text to image (shapes, 16 steps)",
        file: "default.json",
        json: DEFAULT_WORKFLOW,
    },
    ExampleWorkflow {
        title: "Few steps (shapes-fast, 4 steps)",
        file: "shapes-fast.json",
        json: include_str!("../../../assets/workflows/shapes-fast.json"),
    },
    ExampleWorkflow {
        title: "Step sweep: shapes against shapes-fast",
        file: "step-sweep.json",
        json: include_str!("../../../assets/workflows/step-sweep.json"),
    },
    ExampleWorkflow {
        title: "FLUX.1 [schnell] (set the model path)",
        file: "flux-schnell.json",
        json: include_str!("../../../assets/workflows/flux-schnell.json"),
    },
    ExampleWorkflow {
        title: "FLUX.1 [dev] (set the model path)",
        file: "flux-dev.json",
        json: include_str!("../../../assets/workflows/flux-dev.json"),
    },
    ExampleWorkflow {
        title: "SD3.5 (set the model path)",
        file: "sd3.5.json",
        json: include_str!("../../../assets/workflows/sd3.5.json"),
    },
];

/// A graph plus the app's state, as stored in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub graph: Graph,
    pub ui: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowFile {
    format: String,
    version: u32,
    nodes: Vec<Node>,
    #[serde(default)]
    links: Vec<Link>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    ui: serde_json::Value,
}

/// Why a workflow could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("cannot read workflow {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source_name}: line {line}, column {column}: {message}")]
    Syntax {
        source_name: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{source_name}: {message}")]
    Content {
        source_name: String,
        message: String,
    },
}

impl Workflow {
    pub fn new(graph: Graph) -> Self {
        Workflow {
            graph,
            ui: serde_json::Value::Null,
        }
    }

    /// Reads and checks a workflow file.
    pub fn load(path: &Path) -> Result<Self, WorkflowError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkflowError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses workflow JSON; `source_name` (a file name, "clipboard", …) prefixes errors.
    pub fn from_json(text: &str, source_name: &str) -> Result<Self, WorkflowError> {
        let content = |message: String| WorkflowError::Content {
            source_name: source_name.to_string(),
            message,
        };
        let file: WorkflowFile = serde_json::from_str(text).map_err(|e| {
            let message = e.to_string();
            let message = match message.rfind(" at line ") {
                Some(cut) => message[..cut].to_string(),
                None => message,
            };
            WorkflowError::Syntax {
                source_name: source_name.to_string(),
                line: e.line(),
                column: e.column(),
                message,
            }
        })?;
        if file.format != FORMAT {
            return Err(content(format!(
                "format is {:?}, not {FORMAT:?}: this is not a Flowline workflow",
                file.format
            )));
        }
        if file.version > VERSION {
            return Err(content(format!(
                "version {} was written by a newer Flowline; this one reads up to version {VERSION}",
                file.version
            )));
        }
        for node in &file.nodes {
            if nodes::find(&node.type_name).is_none() {
                let known: Vec<&str> = REGISTRY.iter().map(|d| d.spec.type_name).collect();
                return Err(content(format!(
                    "node {:?} has unknown type {:?} (known types: {})",
                    node.id,
                    node.type_name,
                    known.join(", ")
                )));
            }
        }
        Ok(Workflow {
            graph: Graph {
                nodes: file.nodes,
                links: file.links,
            },
            ui: file.ui,
        })
    }

    /// Reads the workflow embedded in a PNG that Flowline saved.
    pub fn from_png(path: &Path) -> Result<Self, WorkflowError> {
        let source_name = path.display().to_string();
        match crate::files::read_png_workflow(path) {
            Ok(Some(json)) => Self::from_json(&json, &source_name),
            Ok(None) => Err(WorkflowError::Content {
                source_name,
                message: "this PNG carries no Flowline workflow".into(),
            }),
            Err(e) => Err(WorkflowError::Content {
                source_name,
                message: format!("{e:#}"),
            }),
        }
    }

    pub fn to_json(&self) -> String {
        let file = WorkflowFile {
            format: FORMAT.to_string(),
            version: VERSION,
            nodes: self.graph.nodes.clone(),
            links: self.graph.links.clone(),
            ui: self.ui.clone(),
        };
        serde_json::to_string_pretty(&file).expect("a workflow serialises")
    }

    /// Writes the workflow to `path` atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_atomic(path, self.to_json().as_bytes())
    }

    /// Applies `NODE.PARAM=VALUE`, parsing VALUE for that parameter's kind.
    pub fn apply_assignment(&mut self, assignment: &str) -> Result<(), String> {
        let (target, text) = assignment
            .split_once('=')
            .ok_or_else(|| format!("{assignment:?} is not NODE.PARAM=VALUE"))?;
        let (node_id, param) = target
            .split_once('.')
            .ok_or_else(|| format!("{target:?} is not NODE.PARAM"))?;
        let ids: Vec<String> = self.graph.nodes.iter().map(|n| n.id.clone()).collect();
        let node = self.graph.node_mut(node_id).ok_or_else(|| {
            format!(
                "no node {node_id:?} in the workflow (nodes: {})",
                ids.join(", ")
            )
        })?;
        let def = nodes::find(&node.type_name).expect("loaded workflows have known types");
        let spec = def.spec.param(param).ok_or_else(|| {
            let known: Vec<&str> = def.spec.params.iter().map(|p| p.name).collect();
            format!(
                "node {node_id:?} ({}) has no parameter {param:?} (parameters: {})",
                def.spec.title,
                known.join(", ")
            )
        })?;
        let value = spec
            .parse(text)
            .map_err(|e| format!("{node_id}.{param}: {e}"))?;
        node.params.insert(param.to_string(), value);
        Ok(())
    }
}
