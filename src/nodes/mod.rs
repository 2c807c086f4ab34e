//! Node types: each file declares one node's ports, parameters and behaviour in one place,
//! as ComfyUI's nodes do, so adding a node touches its own file and one line of [`REGISTRY`].

mod cfg;
mod decode;
mod encode_prompt;
mod gaussian_start;
mod load_image;
mod load_model;
mod preview_image;
mod sampler;
mod save_image;
mod source_image_start;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use crate::flow::sampler::{SampleOutput, StepRecord};
use crate::graph::value::{Guider, Image, Latent, Value};
use crate::graph::{ParamValue, PortType};
use crate::model::{Conditioning, FlowModel, LatentPreview};

/// Every node type Flowline knows, in the order a user browses them.
pub static REGISTRY: LazyLock<Vec<NodeDef>> = LazyLock::new(|| {
    vec![
        load_model::definition(),
        encode_prompt::definition(),
        gaussian_start::definition(),
        source_image_start::definition(),
        load_image::definition(),
        cfg::definition(),
        sampler::definition(),
        decode::definition(),
        save_image::definition(),
        preview_image::definition(),
    ]
});

/// The node type registered under `type_name`.
pub fn find(type_name: &str) -> Option<&'static NodeDef> {
    REGISTRY.iter().find(|d| d.spec.type_name == type_name)
}

/// A node type: its declaration and the function that runs it.
pub struct NodeDef {
    pub spec: NodeSpec,
    pub run: fn(&mut NodeContext<'_>) -> anyhow::Result<Vec<Value>>,
}

/// What a node type declares: its ports and parameters.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The name stored in workflow files.
    pub type_name: &'static str,
    /// The name a person reads.
    pub title: &'static str,
    pub description: &'static str,
    pub inputs: Vec<PortSpec>,
    pub outputs: Vec<PortSpec>,
    pub params: Vec<ParamSpec>,
    /// Output nodes (save, preview) are what a run is for; they always execute.
    pub is_output: bool,
}

impl NodeSpec {
    pub fn input(&self, name: &str) -> Option<&PortSpec> {
        self.inputs.iter().find(|p| p.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&PortSpec> {
        self.outputs.iter().find(|p| p.name == name)
    }

    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// An input or output port.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: &'static str,
    pub ty: PortType,
    pub optional: bool,
}

impl PortSpec {
    pub fn required(name: &'static str, ty: PortType) -> Self {
        PortSpec {
            name,
            ty,
            optional: false,
        }
    }

    pub fn optional(name: &'static str, ty: PortType) -> Self {
        PortSpec {
            name,
            ty,
            optional: true,
        }
    }
}

/// The kind of a parameter: what values it takes and which widget edits it.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamKind {
    Int {
        min: i64,
        max: i64,
    },
    /// A random seed: an integer in [0, 2⁵³) (exact in JSON everywhere).
    Seed,
    Float {
        min: f64,
        max: f64,
    },
    Text {
        multiline: bool,
    },
    Choice(&'static [&'static str]),
    /// A file or folder on disk; empty means "none".
    Path {
        folder: bool,
    },
}

/// The largest seed: 2⁵³ − 1, the largest integer every JSON reader keeps exactly.
pub const MAX_SEED: i64 = (1 << 53) - 1;

/// A parameter: its name, kind, default and a line of help.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    pub default: ParamValue,
    pub help: &'static str,
}

impl ParamSpec {
    pub fn int(name: &'static str, min: i64, max: i64, default: i64, help: &'static str) -> Self {
        let kind = ParamKind::Int { min, max };
        Self::new(name, kind, ParamValue::Int(default), help)
    }

    pub fn seed(name: &'static str, help: &'static str) -> Self {
        Self::new(name, ParamKind::Seed, ParamValue::Int(0), help)
    }

    pub fn float(name: &'static str, min: f64, max: f64, default: f64, help: &'static str) -> Self {
        let kind = ParamKind::Float { min, max };
        Self::new(name, kind, ParamValue::Float(default), help)
    }

    pub fn text(name: &'static str, multiline: bool, default: &str, help: &'static str) -> Self {
        let kind = ParamKind::Text { multiline };
        Self::new(name, kind, ParamValue::Text(default.into()), help)
    }

    pub fn choice(
        name: &'static str,
        options: &'static [&'static str],
        default: &str,
        help: &'static str,
    ) -> Self {
        let kind = ParamKind::Choice(options);
        Self::new(name, kind, ParamValue::Text(default.into()), help)
    }

    pub fn path(name: &'static str, folder: bool, help: &'static str) -> Self {
        let kind = ParamKind::Path { folder };
        Self::new(name, kind, ParamValue::Text(String::new()), help)
    }

    fn new(name: &'static str, kind: ParamKind, default: ParamValue, help: &'static str) -> Self {
        ParamSpec {
            name,
            kind,
            default,
            help,
        }
    }

    /// Checks a stored value against this parameter, returning it in its canonical form
    /// (integral floats become integers for integer parameters, integers become floats for
    /// float parameters).
    pub fn check(&self, value: &ParamValue) -> Result<ParamValue, String> {
        let in_range = |x: f64, min: f64, max: f64| {
            if x < min || x > max {
                Err(format!("{x} is out of range [{min}, {max}]"))
            } else {
                Ok(())
            }
        };
        let integer_bounds = match self.kind {
            ParamKind::Int { min, max } => Some((min, max)),
            ParamKind::Seed => Some((0, MAX_SEED)),
            _ => None,
        };
        if let Some((min, max)) = integer_bounds {
            let n = match *value {
                ParamValue::Int(n) => n,
                ParamValue::Float(x) if x.fract() == 0.0 && x.abs() < 2f64.powi(63) => x as i64,
                _ => return Err(format!("{value} is not {}", self.kind_description())),
            };
            in_range(n as f64, min as f64, max as f64)?;
            return Ok(ParamValue::Int(n));
        }
        match (&self.kind, value) {
            (ParamKind::Float { min, max }, ParamValue::Int(n)) => {
                in_range(*n as f64, *min, *max)?;
                Ok(ParamValue::Float(*n as f64))
            }
            (ParamKind::Float { min, max }, ParamValue::Float(x)) => {
                if !x.is_finite() {
                    return Err(format!("{x} is not a finite number"));
                }
                in_range(*x, *min, *max)?;
                Ok(value.clone())
            }
            (ParamKind::Choice(options), ParamValue::Text(s)) => {
                if options.contains(&s.as_str()) {
                    Ok(value.clone())
                } else {
                    Err(format!("{s:?} is not one of {}", options.join(", ")))
                }
            }
            (ParamKind::Text { .. } | ParamKind::Path { .. }, ParamValue::Text(_)) => {
                Ok(value.clone())
            }
            _ => Err(format!("{value} is not {}", self.kind_description())),
        }
    }

    /// Parses a value typed by a person (for example on the command line) for this parameter.
    pub fn parse(&self, text: &str) -> Result<ParamValue, String> {
        let value = match self.kind {
            ParamKind::Int { .. } | ParamKind::Seed => text
                .trim()
                .parse::<i64>()
                .map(ParamValue::Int)
                .map_err(|_| format!("{text:?} is not {}", self.kind_description()))?,
            ParamKind::Float { .. } => text
                .trim()
                .parse::<f64>()
                .map(ParamValue::Float)
                .map_err(|_| format!("{text:?} is not {}", self.kind_description()))?,
            _ => ParamValue::Text(text.to_string()),
        };
        self.check(&value)
    }

    fn kind_description(&self) -> String {
        match self.kind {
            ParamKind::Int { .. } | ParamKind::Seed => "an integer".into(),
            ParamKind::Float { .. } => "a number".into(),
            ParamKind::Text { .. } => "text".into(),
            ParamKind::Choice(options) => format!("one of {}", options.join(", ")),
            ParamKind::Path { .. } => "a path".into(),
        }
    }
}

/// A failure caused by what the user gave (a file, a parameter, a prompt) rather than by the
/// program: the command line exits 2 for these, 1 for other failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// Returns early with an [`InputError`].
#[macro_export]
macro_rules! input_error {
    ($($arg:tt)*) => {
        return Err($crate::nodes::InputError(format!($($arg)*)).into())
    };
}

/// Something a running node reports beyond its outputs.
pub enum NodeEvent {
    /// A sampler step, with the latent→RGB preview of the model that made it.
    Step(StepRecord, LatentPreview),
    /// A sampler finished its trajectory.
    Trajectory(SampleOutput),
    /// An image for the user: shown, and saved at `path` if a file was written.
    Image { image: Image, path: Option<PathBuf> },
    /// Something the user should know that did not stop the node (e.g. unknown prompt words).
    Warning(String),
    /// Something worth knowing that is not a problem (e.g. the memory a model load needs).
    Info(String),
}

/// Where a run writes and what it records into its files.
#[derive(Debug, Clone, Default)]
pub struct RunEnv {
    /// Relative save paths are resolved against this folder.
    pub output_dir: PathBuf,
    /// The workflow being run, as JSON, embedded into saved PNGs.
    pub workflow_json: Option<Arc<String>>,
}

/// What a node sees while it runs: its inputs, parameters and a channel for events.
pub struct NodeContext<'a> {
    pub node_id: &'a str,
    pub env: &'a RunEnv,
    spec: &'a NodeSpec,
    inputs: BTreeMap<&'static str, Value>,
    params: BTreeMap<String, ParamValue>,
    events: &'a mut dyn FnMut(NodeEvent) -> ControlFlow<()>,
}

impl<'a> NodeContext<'a> {
    /// `params` must already be validated against `spec` (see [`crate::graph::validate`]).
    pub fn new(
        node_id: &'a str,
        spec: &'a NodeSpec,
        env: &'a RunEnv,
        inputs: BTreeMap<&'static str, Value>,
        params: BTreeMap<String, ParamValue>,
        events: &'a mut dyn FnMut(NodeEvent) -> ControlFlow<()>,
    ) -> Self {
        NodeContext {
            node_id,
            env,
            spec,
            inputs,
            params,
            events,
        }
    }

    /// Reports an event; `Break` means the run was cancelled and the node should stop.
    pub fn emit(&mut self, event: NodeEvent) -> ControlFlow<()> {
        (self.events)(event)
    }

    fn param(&self, name: &str) -> &ParamValue {
        self.params
            .get(name)
            .or_else(|| self.spec.param(name).map(|p| &p.default))
            .unwrap_or_else(|| panic!("node type {} has no parameter {name}", self.spec.type_name))
    }

    pub fn int(&self, name: &str) -> i64 {
        match self.param(name) {
            ParamValue::Int(n) => *n,
            other => panic!("parameter {name} holds {other}, not an integer"),
        }
    }

    pub fn float(&self, name: &str) -> f64 {
        match self.param(name) {
            ParamValue::Float(x) => *x,
            ParamValue::Int(n) => *n as f64,
            other => panic!("parameter {name} holds {other}, not a number"),
        }
    }

    pub fn text(&self, name: &str) -> &str {
        match self.param(name) {
            ParamValue::Text(s) => s,
            other => panic!("parameter {name} holds {other}, not text"),
        }
    }

    fn input(&self, name: &str) -> Option<&Value> {
        self.inputs.get(name)
    }

    fn required(&self, name: &str) -> anyhow::Result<&Value> {
        self.input(name).ok_or_else(|| not_connected(name))
    }

    pub fn model(&self, name: &str) -> anyhow::Result<Arc<dyn FlowModel>> {
        self.optional_model(name)?
            .ok_or_else(|| not_connected(name))
    }

    pub fn optional_model(&self, name: &str) -> anyhow::Result<Option<Arc<dyn FlowModel>>> {
        match self.input(name) {
            None => Ok(None),
            Some(Value::Model(m)) => Ok(Some(m.clone())),
            Some(other) => wrong_type(name, other),
        }
    }

    pub fn conditioning(&self, name: &str) -> anyhow::Result<Option<Arc<Conditioning>>> {
        match self.input(name) {
            None => Ok(None),
            Some(Value::Conditioning(c)) => Ok(Some(c.clone())),
            Some(other) => wrong_type(name, other),
        }
    }

    pub fn guider(&self, name: &str) -> anyhow::Result<Arc<Guider>> {
        match self.required(name)? {
            Value::Guider(g) => Ok(g.clone()),
            other => wrong_type(name, other),
        }
    }

    pub fn latent(&self, name: &str) -> anyhow::Result<Latent> {
        match self.required(name)? {
            Value::Latent(l) => Ok(l.clone()),
            other => wrong_type(name, other),
        }
    }

    pub fn image(&self, name: &str) -> anyhow::Result<Image> {
        match self.required(name)? {
            Value::Image(i) => Ok(i.clone()),
            other => wrong_type(name, other),
        }
    }
}

fn not_connected(name: &str) -> anyhow::Error {
    anyhow::anyhow!("input {name} is not connected")
}

fn wrong_type<T>(name: &str, value: &Value) -> anyhow::Result<T> {
    anyhow::bail!("input {name} received a {} value", value.port_type())
}
