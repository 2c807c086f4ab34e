//! What a node's `run` function sees and reports: its inputs and parameters, the run's
//! environment, and the events it streams back (sampler steps, images, warnings).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use crate::flow::sampler::{SampleOutput, StepRecord};
use crate::graph::ParamValue;
use crate::graph::spec::NodeSpec;
use crate::graph::value::{Guider, Image, Latent, Value};
use crate::model::{Conditioning, FlowModel, LatentPreview};

/// A node type: its declaration and the function that runs it.
pub struct NodeDef {
    pub spec: NodeSpec,
    pub run: fn(&mut NodeContext<'_>) -> anyhow::Result<Vec<Value>>,
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
    /// `params` must already be validated against `spec` (see [`crate::validate::validate`]).
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

    /// The value on input `name`, whatever its type.
    pub fn value(&self, name: &str) -> anyhow::Result<Value> {
        self.required(name).cloned()
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
        self.optional_guider(name)?
            .ok_or_else(|| not_connected(name))
    }

    pub fn optional_guider(&self, name: &str) -> anyhow::Result<Option<Arc<Guider>>> {
        match self.input(name) {
            None => Ok(None),
            Some(Value::Guider(g)) => Ok(Some(g.clone())),
            Some(other) => wrong_type(name, other),
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
