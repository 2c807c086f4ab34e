//! Checks a graph before anything runs, and turns it into an execution plan.
//!
//! Every problem names the node and the port or parameter at fault, so the GUI can point at it
//! and the command line can print it; all problems are reported at once, not the first alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use crate::graph::{Graph, ParamValue, PortType};
use crate::nodes::{self, context::NodeDef};

/// One problem with a graph.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationError {
    /// The node at fault (None for a problem of the whole graph).
    pub node: Option<String>,
    /// The port or parameter at fault, as `input x`, `output y` or `parameter z`.
    pub item: Option<String>,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.node, &self.item) {
            (Some(node), Some(item)) => write!(f, "node {node:?}, {item}: {}", self.message),
            (Some(node), None) => write!(f, "node {node:?}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// A graph that passed validation: the nodes to run in order, with complete parameters.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Nodes that feed an output node, in dependency order.
    pub order: Vec<String>,
    /// Every parameter of every planned node: stored values in canonical form, defaults filled.
    pub params: HashMap<String, BTreeMap<String, ParamValue>>,
}

/// Validates `graph` and plans its execution.
pub fn validate(graph: &Graph) -> Result<Plan, Vec<ValidationError>> {
    let mut errors = Vec::new();
    let mut error = |node: &str, item: Option<String>, message: String| {
        errors.push(ValidationError {
            node: Some(node.to_string()),
            item,
            message,
        })
    };

    let mut defs: HashMap<&str, &NodeDef> = HashMap::new();
    let mut params = HashMap::new();
    for node in &graph.nodes {
        if defs.contains_key(node.id.as_str()) {
            error(
                &node.id,
                None,
                "the id is used by more than one node".into(),
            );
            continue;
        }
        let Some(def) = nodes::find(&node.type_name) else {
            error(
                &node.id,
                None,
                format!("unknown node type {:?}", node.type_name),
            );
            continue;
        };
        defs.insert(&node.id, def);
        let mut complete = BTreeMap::new();
        for (name, value) in &node.params {
            match def.spec.param(name) {
                None => error(
                    &node.id,
                    Some(format!("parameter {name}")),
                    "no such parameter".into(),
                ),
                Some(spec) => match spec.check(value) {
                    Ok(v) => {
                        complete.insert(name.clone(), v);
                    }
                    Err(message) => error(&node.id, Some(format!("parameter {name}")), message),
                },
            }
        }
        for spec in &def.spec.params {
            complete
                .entry(spec.name.to_string())
                .or_insert_with(|| spec.default.clone());
        }
        params.insert(node.id.clone(), complete);
    }

    // The outputs linked to a node's `Any` inputs, with their declared types: what a reroute
    // passes on.
    let feeding_any_input = |node: &str| -> Vec<(&str, PortType)> {
        let Some(def) = defs.get(node) else {
            return Vec::new();
        };
        def.spec
            .inputs
            .iter()
            .filter(|input| input.ty == PortType::Any)
            .filter_map(|input| graph.link_into(node, input.name))
            .filter_map(|link| {
                let from = defs
                    .get(link.from.node.as_str())?
                    .spec
                    .output(&link.from.port)?;
                Some((link.from.node.as_str(), from.ty))
            })
            .collect()
    };
    let mut fed: HashSet<(&str, &str)> = HashSet::new();
    let mut upstream: HashMap<&str, Vec<&str>> = HashMap::new();
    for link in &graph.links {
        let (Some(from_def), Some(to_def)) = (
            defs.get(link.from.node.as_str()),
            defs.get(link.to.node.as_str()),
        ) else {
            for end in [&link.from, &link.to] {
                if !defs.contains_key(end.node.as_str()) && graph.node(&end.node).is_none() {
                    error(
                        &end.node,
                        None,
                        format!("a link refers to {end}, but there is no such node"),
                    );
                }
            }
            continue;
        };
        let Some(output) = from_def.spec.output(&link.from.port) else {
            error(
                &link.from.node,
                Some(format!("output {}", link.from.port)),
                "no such output".into(),
            );
            continue;
        };
        let Some(input) = to_def.spec.input(&link.to.port) else {
            error(
                &link.to.node,
                Some(format!("input {}", link.to.port)),
                "no such input".into(),
            );
            continue;
        };
        if !fed.insert((&link.to.node, &link.to.port)) {
            error(
                &link.to.node,
                Some(format!("input {}", link.to.port)),
                "has more than one link".into(),
            );
        }
        let given = match output.ty {
            PortType::Any => PortType::resolve(link.from.node.as_str(), &feeding_any_input),
            ty => ty,
        };
        if !given.fits(input.ty) {
            error(
                &link.to.node,
                Some(format!("input {}", link.to.port)),
                format!("expects {} but {} gives {}", input.ty, link.from, given),
            );
            continue;
        }
        upstream
            .entry(&link.to.node)
            .or_default()
            .push(&link.from.node);
    }

    for node in &graph.nodes {
        let Some(def) = defs.get(node.id.as_str()) else {
            continue;
        };
        for input in def.spec.inputs.iter().filter(|i| !i.optional) {
            if !fed.contains(&(node.id.as_str(), input.name)) {
                error(
                    &node.id,
                    Some(format!("input {}", input.name)),
                    format!("required {} input is not connected", input.ty),
                );
            }
        }
    }

    let order = topological_order(graph, &upstream);
    let in_order: HashSet<&str> = order.iter().copied().collect();
    for node in &graph.nodes {
        if defs.contains_key(node.id.as_str()) && !in_order.contains(node.id.as_str()) {
            error(&node.id, None, "is part of a cycle".into());
        }
    }

    let needed = needed_by_outputs(graph, &defs, &upstream);
    if needed.is_empty() && errors.is_empty() {
        errors.push(ValidationError {
            node: None,
            item: None,
            message: "nothing to do: the graph has no Save Image or Preview Image node".into(),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Plan {
        order: order
            .into_iter()
            .filter(|id| needed.contains(id))
            .map(String::from)
            .collect(),
        params,
    })
}

/// Kahn's algorithm in file order; nodes on a cycle are left out.
fn topological_order<'g>(graph: &'g Graph, upstream: &HashMap<&str, Vec<&'g str>>) -> Vec<&'g str> {
    let mut done: HashSet<&str> = HashSet::new();
    let mut order = Vec::new();
    loop {
        let ready: Vec<&str> = graph
            .nodes
            .iter()
            .map(|n| n.id.as_str())
            .filter(|id| !done.contains(id))
            .filter(|id| {
                upstream
                    .get(id)
                    .is_none_or(|ups| ups.iter().all(|u| done.contains(u)))
            })
            .collect();
        if ready.is_empty() {
            return order;
        }
        for id in ready {
            if done.insert(id) {
                order.push(id);
            }
        }
    }
}

fn needed_by_outputs<'g>(
    graph: &'g Graph,
    defs: &HashMap<&str, &NodeDef>,
    upstream: &HashMap<&str, Vec<&'g str>>,
) -> HashSet<&'g str> {
    let mut needed = HashSet::new();
    let mut stack: Vec<&str> = graph
        .nodes
        .iter()
        .map(|n| n.id.as_str())
        .filter(|id| defs.get(id).is_some_and(|d| d.spec.is_output))
        .collect();
    while let Some(id) = stack.pop() {
        if needed.insert(id) {
            stack.extend(upstream.get(id).into_iter().flatten());
        }
    }
    needed
}
