//! A ComfyUI workflow in one shape, whichever of ComfyUI's two file formats it came in: nodes
//! with their class and their inputs by name, each input a value or a link to another node's
//! output. The converter reads only this, so the formats' quirks stay in `parse`; and the
//! table of the classes Flowline imports lives here, below both, because each needs it.

use std::collections::BTreeMap;

use serde_json::Value;

/// The widget name ComfyUI's editor adds after a seed ("fixed", "randomize", …); its value is
/// stored among the widgets' but is no input of the node.
pub const CONTROL_AFTER_GENERATE: &str = "control_after_generate";

/// Every ComfyUI class Flowline imports, with the names of its widgets in the order the UI
/// format stores their values.
pub const CLASSES: [(&str, &[&str]); 28] = [
    ("CheckpointLoaderSimple", &["ckpt_name"]),
    ("UNETLoader", &["unet_name", "weight_dtype"]),
    (
        "DualCLIPLoader",
        &["clip_name1", "clip_name2", "type", "device"],
    ),
    (
        "TripleCLIPLoader",
        &["clip_name1", "clip_name2", "clip_name3"],
    ),
    ("CLIPLoader", &["clip_name", "type", "device"]),
    ("VAELoader", &["vae_name"]),
    ("LoraLoaderModelOnly", &["lora_name", "strength_model"]),
    (
        "LoraLoader",
        &["lora_name", "strength_model", "strength_clip"],
    ),
    ("CLIPTextEncode", &["text"]),
    ("CLIPTextEncodeFlux", &["clip_l", "t5xxl", "guidance"]),
    ("FluxGuidance", &["guidance"]),
    ("EmptyLatentImage", &["width", "height", "batch_size"]),
    ("EmptySD3LatentImage", &["width", "height", "batch_size"]),
    (
        "KSampler",
        &[
            "seed",
            CONTROL_AFTER_GENERATE,
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "denoise",
        ],
    ),
    (
        "KSamplerAdvanced",
        &[
            "add_noise",
            "noise_seed",
            CONTROL_AFTER_GENERATE,
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "start_at_step",
            "end_at_step",
            "return_with_leftover_noise",
        ],
    ),
    ("SamplerCustomAdvanced", &[]),
    ("RandomNoise", &["noise_seed", CONTROL_AFTER_GENERATE]),
    ("BasicGuider", &[]),
    ("CFGGuider", &["cfg"]),
    ("KSamplerSelect", &["sampler_name"]),
    ("BasicScheduler", &["scheduler", "steps", "denoise"]),
    (
        "ModelSamplingFlux",
        &["max_shift", "base_shift", "width", "height"],
    ),
    ("ModelSamplingSD3", &["shift"]),
    ("LoadImage", &["image", "upload"]),
    ("VAEEncode", &[]),
    ("VAEDecode", &[]),
    ("SaveImage", &["filename_prefix"]),
    ("PreviewImage", &[]),
];

/// The widget names of `class`, in the UI format's order, if Flowline imports it.
pub fn widget_names(class: &str) -> Option<&'static [&'static str]> {
    CLASSES
        .iter()
        .find(|(name, _)| *name == class)
        .map(|(_, widgets)| *widgets)
}

/// Why a ComfyUI workflow cannot become a Flowline workflow.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A node whose settings or inputs Flowline cannot express.
    #[error("ComfyUI node {id} ({class}): {message}")]
    Node {
        id: String,
        class: String,
        message: String,
    },
    /// Nodes of classes Flowline has no counterpart for, as (id, class).
    #[error(
        "no Flowline counterpart for ComfyUI {}; Flowline imports {}",
        .0.iter().map(|(id, class)| format!("node {id} ({class})")).collect::<Vec<_>>().join(", "),
        CLASSES.map(|(class, _)| class).join(", ")
    )]
    Unmapped(Vec<(String, String)>),
    /// The file is not laid out as a ComfyUI workflow.
    #[error("{0}")]
    Format(String),
}

/// One input of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A widget's value.
    Value(Value),
    /// Output `output` of node `node`.
    Link { node: String, output: usize },
}

/// One node: its id, its class, its inputs by name and where it sits on ComfyUI's canvas
/// (which only the UI format records).
#[derive(Debug, Clone, PartialEq)]
pub struct ComfyNode {
    pub id: String,
    pub class: String,
    pub inputs: BTreeMap<String, Input>,
    pub position: Option<[f32; 2]>,
}

impl ComfyNode {
    /// An [`ImportError`] about this node.
    pub fn error(&self, message: impl Into<String>) -> ImportError {
        ImportError::Node {
            id: self.id.clone(),
            class: self.class.clone(),
            message: message.into(),
        }
    }

    /// The value of widget `name`, or `None` where the node has none.
    fn optional_value(&self, name: &str) -> Result<Option<&Value>, ImportError> {
        match self.inputs.get(name) {
            None => Ok(None),
            Some(Input::Value(value)) => Ok(Some(value)),
            Some(Input::Link { node, .. }) => Err(self.error(format!(
                "{name} comes from node {node}; Flowline imports it only as a value"
            ))),
        }
    }

    fn value(&self, name: &str) -> Result<&Value, ImportError> {
        self.optional_value(name)?
            .ok_or_else(|| self.error(format!("{name} is missing")))
    }

    pub fn text(&self, name: &str) -> Result<&str, ImportError> {
        self.value(name)?
            .as_str()
            .ok_or_else(|| self.error(format!("{name} is not text")))
    }

    /// The text of widget `name`, or `default` where the node has none.
    pub fn text_or<'a>(&'a self, name: &str, default: &'a str) -> Result<&'a str, ImportError> {
        match self.optional_value(name)? {
            None => Ok(default),
            Some(_) => self.text(name),
        }
    }

    pub fn number(&self, name: &str) -> Result<f64, ImportError> {
        self.value(name)?
            .as_f64()
            .ok_or_else(|| self.error(format!("{name} is not a number")))
    }

    /// The number of widget `name`, or `default` where the node has none.
    pub fn number_or(&self, name: &str, default: f64) -> Result<f64, ImportError> {
        match self.optional_value(name)? {
            None => Ok(default),
            Some(_) => self.number(name),
        }
    }

    /// A whole number ≥ 0 (steps, seeds, sizes; ComfyUI's seeds go up to 2⁶⁴ − 1).
    pub fn count(&self, name: &str) -> Result<u64, ImportError> {
        let value = self.value(name)?;
        value
            .as_u64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|x| x.fract() == 0.0 && *x >= 0.0 && *x < u64::MAX as f64)
                    .map(|x| x as u64)
            })
            .ok_or_else(|| self.error(format!("{name} {value} is not a whole number ≥ 0")))
    }

    /// The output input `name` is linked to, as (node id, output index), if it is linked.
    pub fn link(&self, name: &str) -> Option<(&str, usize)> {
        match self.inputs.get(name) {
            Some(Input::Link { node, output }) => Some((node, *output)),
            _ => None,
        }
    }
}

/// A whole ComfyUI workflow: its nodes, ordered by id.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ComfyGraph {
    pub nodes: Vec<ComfyNode>,
}

impl ComfyGraph {
    pub fn node(&self, id: &str) -> Option<&ComfyNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The node and output feeding input `name` of `node`, or `None` where nothing does.
    pub fn optional_source(
        &self,
        node: &ComfyNode,
        name: &str,
    ) -> Result<Option<(&ComfyNode, usize)>, ImportError> {
        let Some((id, output)) = node.link(name) else {
            return Ok(None);
        };
        match self.node(id) {
            Some(source) => Ok(Some((source, output))),
            None => Err(node.error(format!(
                "{name} comes from node {id}, which the workflow does not have"
            ))),
        }
    }

    /// The node and output feeding input `name` of `node`.
    pub fn source(&self, node: &ComfyNode, name: &str) -> Result<(&ComfyNode, usize), ImportError> {
        self.optional_source(node, name)?
            .ok_or_else(|| node.error(format!("input {name} is not connected")))
    }
}
