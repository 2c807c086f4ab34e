//! Reading ComfyUI's two file formats into a [`ComfyGraph`].
//!
//! The UI format (what ComfyUI's editor saves, and the `workflow` text of its PNGs) lists
//! `nodes` with positional `widgets_values` and numbered `links`, and keeps what only the
//! editor has: notes, reroutes, primitive nodes feeding widgets, muted and bypassed nodes. The
//! API format (the `prompt` text of its PNGs, and "Export (API)") is what ComfyUI runs: a map
//! from node id to `class_type` and named `inputs`, where a link is `[node id, output index]`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use super::graph::{
    CONTROL_AFTER_GENERATE, ComfyGraph, ComfyNode, ImportError, Input, widget_names,
};

/// Classes that only the editor has; they run nothing. Links through reroutes are followed to
/// what feeds them, and a primitive node's value goes into the widget it is linked to.
const NOTES: [&str; 2] = ["Note", "MarkdownNote"];
const REROUTE: &str = "Reroute";
const PRIMITIVE: &str = "PrimitiveNode";
/// ComfyUI's node modes besides 0 (runs): 2 ("never") is muted, 4 is bypassed, which passes
/// each input on to the output of the same type.
const MUTED: i64 = 2;
const BYPASSED: i64 = 4;

/// Whether `value` is a ComfyUI workflow, in either format.
pub fn is_comfyui(value: &Value) -> bool {
    ui_nodes(value).is_some() || api_nodes(value).is_some()
}

/// Reads a ComfyUI workflow in either format, with warnings about the nodes left out.
pub fn read(value: &Value) -> Result<(ComfyGraph, Vec<String>), ImportError> {
    let (mut nodes, warnings) = if let Some(nodes) = ui_nodes(value) {
        UiReader::new(nodes, value.get("links"))?.read()?
    } else if let Some(map) = api_nodes(value) {
        (read_api(map), Vec::new())
    } else {
        return Err(ImportError::Format(
            "this is neither ComfyUI's workflow format nor its API format".into(),
        ));
    };
    nodes.sort_by_key(|n| (n.id.parse::<u64>().unwrap_or(u64::MAX), n.id.clone()));
    Ok((ComfyGraph { nodes }, warnings))
}

fn ui_nodes(value: &Value) -> Option<&Vec<Value>> {
    let nodes = value.get("nodes")?.as_array()?;
    value.get("links")?.is_array().then_some(nodes)
}

/// The nodes of an API-format workflow, bare or inside the `prompt` of a request to ComfyUI's
/// server.
fn api_nodes(value: &Value) -> Option<&Map<String, Value>> {
    let map = value
        .get("prompt")
        .filter(|p| p.is_object())
        .unwrap_or(value)
        .as_object()?;
    let is_node = |node: &Value| node.get("class_type").is_some_and(Value::is_string);
    (!map.is_empty() && map.values().all(is_node)).then_some(map)
}

fn read_api(map: &Map<String, Value>) -> Vec<ComfyNode> {
    map.iter()
        .map(|(id, node)| ComfyNode {
            id: id.clone(),
            class: node["class_type"].as_str().unwrap_or_default().to_string(),
            inputs: node
                .get("inputs")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(name, value)| (name.clone(), api_input(value)))
                .collect(),
            position: None,
        })
        .collect()
}

/// An API-format input: `[node id, output index]` is a link, anything else a value.
fn api_input(value: &Value) -> Input {
    if let Some([node, output]) = value.as_array().map(Vec::as_slice)
        && let (Some(node), Some(output)) = (id_text(node), output.as_u64())
    {
        return Input::Link {
            node,
            output: output as usize,
        };
    }
    Input::Value(value.clone())
}

/// A node id as text: the UI format writes ids as numbers, the API format as strings.
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn mode(node: &Value) -> i64 {
    node.get("mode").and_then(Value::as_i64).unwrap_or(0)
}

fn class_of(node: &Value) -> &str {
    node.get("type").and_then(Value::as_str).unwrap_or_default()
}

/// Where a UI-format link comes from: a node's output, and the type it carries.
struct UiLink {
    origin: String,
    slot: usize,
    kind: String,
}

/// A UI-format workflow's nodes and links, indexed for following links.
struct UiReader<'a> {
    /// The nodes in file order, with their ids.
    nodes: Vec<(String, &'a Value)>,
    by_id: HashMap<String, &'a Value>,
    links: HashMap<u64, UiLink>,
}

impl<'a> UiReader<'a> {
    fn new(nodes: &'a [Value], links: Option<&'a Value>) -> Result<Self, ImportError> {
        let nodes = nodes
            .iter()
            .map(|node| match node.get("id").and_then(id_text) {
                Some(id) => Ok((id, node)),
                None => Err(ImportError::Format(format!(
                    "a node has no id: {}",
                    short(node)
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let by_id = nodes.iter().map(|(id, node)| (id.clone(), *node)).collect();
        let links = links
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|link| {
                ui_link(link).ok_or_else(|| {
                    ImportError::Format(format!(
                        "link {} is not [id, from node, from slot, to node, to slot, type]",
                        short(link)
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(UiReader {
            nodes,
            by_id,
            links,
        })
    }

    fn read(&self) -> Result<(Vec<ComfyNode>, Vec<String>), ImportError> {
        let mut nodes = Vec::new();
        let mut warnings = Vec::new();
        for (id, node) in &self.nodes {
            let class = class_of(node);
            if NOTES.contains(&class) || class == REROUTE || class == PRIMITIVE {
                continue;
            }
            let left_out = match mode(node) {
                MUTED => "muted",
                BYPASSED => "bypassed",
                _ => {
                    nodes.push(self.node(id, class, node)?);
                    continue;
                }
            };
            warnings.push(format!(
                "ComfyUI node {id} ({class}) is {left_out} there, so it is left out"
            ));
        }
        Ok((nodes, warnings))
    }

    fn node(&self, id: &str, class: &str, node: &Value) -> Result<ComfyNode, ImportError> {
        let mut inputs = widgets(class, node.get("widgets_values"));
        for input in node
            .get("inputs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(name), Some(link)) = (
                input.get("name").and_then(Value::as_str),
                input.get("link").and_then(Value::as_u64),
            ) else {
                continue;
            };
            if let Some(fed) = self.follow(link, id)? {
                inputs.insert(name.to_string(), fed);
            }
        }
        Ok(ComfyNode {
            id: id.to_string(),
            class: class.to_string(),
            inputs,
            position: position(node),
        })
    }

    /// What `link` brings into node `to`: the output it comes from, past reroutes and bypassed
    /// nodes, or the value of the primitive node it comes from; `None` where nothing feeds it.
    fn follow(&self, mut link: u64, to: &str) -> Result<Option<Input>, ImportError> {
        for _ in 0..=self.nodes.len() {
            let from = self.links.get(&link).ok_or_else(|| {
                ImportError::Format(format!(
                    "node {to} is fed by link {link}, which the workflow does not have"
                ))
            })?;
            let origin = self.by_id.get(&from.origin).ok_or_else(|| {
                ImportError::Format(format!(
                    "link {link} comes from node {}, which the workflow does not have",
                    from.origin
                ))
            })?;
            let class = class_of(origin);
            let next = if class == PRIMITIVE {
                let value = origin.get("widgets_values").and_then(|w| w.get(0));
                return Ok(value.cloned().map(Input::Value));
            } else if class == REROUTE {
                input_link(origin, |_| true)
            } else if mode(origin) == BYPASSED {
                input_link(origin, |input| {
                    input.get("type").and_then(Value::as_str) == Some(&from.kind)
                })
            } else if mode(origin) == MUTED {
                return Err(ImportError::Format(format!(
                    "node {to} takes an input from node {} ({class}), which is muted",
                    from.origin
                )));
            } else {
                return Ok(Some(Input::Link {
                    node: from.origin.clone(),
                    output: from.slot,
                }));
            };
            match next {
                Some(previous) => link = previous,
                None => return Ok(None),
            }
        }
        Err(ImportError::Format(format!(
            "the links into node {to} go round in a circle"
        )))
    }
}

/// A link as `[id, from node, from slot, to node, to slot, type]` or, in newer files, as an
/// object with those fields named.
fn ui_link(link: &Value) -> Option<(u64, UiLink)> {
    let field = |index: usize, key: &str| match link {
        Value::Array(fields) => fields.get(index),
        _ => link.get(key),
    };
    let id = field(0, "id")?.as_u64()?;
    let origin = id_text(field(1, "origin_id")?)?;
    let slot = field(2, "origin_slot")?.as_u64()? as usize;
    let kind = field(5, "type").and_then(Value::as_str).unwrap_or_default();
    Some((
        id,
        UiLink {
            origin,
            slot,
            kind: kind.to_string(),
        },
    ))
}

/// The link into the first input of `node` that `wanted` accepts.
fn input_link(node: &Value, wanted: impl Fn(&Value) -> bool) -> Option<u64> {
    node.get("inputs")?
        .as_array()?
        .iter()
        .find(|input| wanted(input))?
        .get("link")?
        .as_u64()
}

/// The widget values of a node of `class`, by name. A seed's "control after generate" value
/// follows it in the list, except in files from editors that did not store it.
fn widgets(class: &str, values: Option<&Value>) -> BTreeMap<String, Input> {
    let Some(names) = widget_names(class) else {
        return BTreeMap::new();
    };
    let inputs: Vec<&str> = names
        .iter()
        .copied()
        .filter(|name| *name != CONTROL_AFTER_GENERATE)
        .collect();
    let value = |name: &str, value: &Value| (name.to_string(), Input::Value(value.clone()));
    match values {
        Some(Value::Array(values)) => {
            let order = if values.len() == inputs.len() {
                &inputs
            } else {
                names
            };
            order
                .iter()
                .zip(values)
                .filter(|(name, _)| **name != CONTROL_AFTER_GENERATE)
                .map(|(name, v)| value(name, v))
                .collect()
        }
        Some(Value::Object(map)) => inputs
            .iter()
            .filter_map(|name| Some(value(name, map.get(*name)?)))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// A node's canvas position, stored as `[x, y]` or, by some editors, as `{"0": x, "1": y}`.
fn position(node: &Value) -> Option<[f32; 2]> {
    let pos = node.get("pos")?;
    let coordinate = |axis: usize| {
        pos.get(axis)
            .or_else(|| pos.get(axis.to_string()))
            .and_then(Value::as_f64)
    };
    Some([coordinate(0)? as f32, coordinate(1)? as f32])
}

/// The start of `value`'s JSON, for messages.
fn short(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn value(node: &ComfyNode, name: &str) -> Input {
        node.inputs[name].clone()
    }

    #[test]
    fn the_editor_format_follows_primitives_reroutes_and_bypassed_nodes() {
        let workflow = json!({
            "nodes": [
                {"id": 1, "type": "UNETLoader", "pos": {"0": 5, "1": 6}, "mode": 0,
                 "outputs": [{"name": "MODEL", "type": "MODEL"}],
                 "widgets_values": ["flux1-dev.safetensors", "default"]},
                {"id": 2, "type": "LoraLoaderModelOnly", "mode": 4,
                 "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
                 "widgets_values": ["style.safetensors", 1.0]},
                {"id": 3, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 2}]},
                {"id": 4, "type": "PrimitiveNode", "widgets_values": [12, "fixed"]},
                {"id": 5, "type": "KSampler", "pos": [100, 200], "mode": 0,
                 "inputs": [
                     {"name": "model", "type": "MODEL", "link": 3},
                     {"name": "steps", "type": "INT", "link": 4, "widget": {"name": "steps"}}
                 ],
                 "widgets_values": [42, "randomize", 20, 1.0, "euler", "simple", 1.0]},
                {"id": 6, "type": "KSampler", "widgets_values": [7, 4, 1.0, "euler", "simple", 1.0]},
                {"id": 7, "type": "SaveImage", "mode": 2, "widgets_values": ["muted"]},
                {"id": 8, "type": "Note", "widgets_values": ["a note"]}
            ],
            "links": [
                [1, 1, 0, 2, 0, "MODEL"],
                {"id": 2, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 0,
                 "type": "MODEL"},
                [3, 3, 0, 5, 0, "MODEL"],
                [4, 4, 0, 5, 1, "INT"]
            ]
        });
        assert!(is_comfyui(&workflow));
        let (graph, warnings) = read(&workflow).unwrap();
        let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["1", "5", "6"]);
        assert_eq!(
            warnings,
            [
                "ComfyUI node 2 (LoraLoaderModelOnly) is bypassed there, so it is left out",
                "ComfyUI node 7 (SaveImage) is muted there, so it is left out"
            ]
        );
        assert_eq!(graph.nodes[0].position, Some([5.0, 6.0]));
        let sampler = graph.node("5").unwrap();
        assert_eq!(sampler.position, Some([100.0, 200.0]));
        assert_eq!(
            value(sampler, "model"),
            Input::Link {
                node: "1".into(),
                output: 0
            },
            "through the reroute and the bypassed LoRA"
        );
        assert_eq!(
            value(sampler, "steps"),
            Input::Value(json!(12)),
            "from the primitive"
        );
        assert_eq!(value(sampler, "seed"), Input::Value(json!(42)));
        assert_eq!(
            value(sampler, "cfg"),
            Input::Value(json!(1.0)),
            "after the seed control"
        );
        assert!(!sampler.inputs.contains_key(CONTROL_AFTER_GENERATE));
        let without_control = graph.node("6").unwrap();
        assert_eq!(value(without_control, "steps"), Input::Value(json!(4)));
        assert_eq!(
            value(without_control, "sampler_name"),
            Input::Value(json!("euler"))
        );
    }

    #[test]
    fn a_link_from_a_muted_node_or_a_missing_link_is_named() {
        let muted = json!({
            "nodes": [
                {"id": 1, "type": "UNETLoader", "mode": 2, "widgets_values": ["a", "default"]},
                {"id": 2, "type": "ModelSamplingSD3", "widgets_values": [3.0],
                 "inputs": [{"name": "model", "type": "MODEL", "link": 1}]}
            ],
            "links": [[1, 1, 0, 2, 0, "MODEL"]]
        });
        let error = read(&muted).unwrap_err().to_string();
        assert!(
            error.contains("node 1 (UNETLoader), which is muted"),
            "{error}"
        );
        let missing = json!({
            "nodes": [{"id": 2, "type": "VAEDecode",
                       "inputs": [{"name": "vae", "type": "VAE", "link": 9}]}],
            "links": []
        });
        let error = read(&missing).unwrap_err().to_string();
        assert!(error.contains("link 9"), "{error}");
    }

    #[test]
    fn the_api_format_takes_pairs_for_links_and_anything_else_for_values() {
        let prompt = json!({"prompt": {
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["11", 1]}},
            "11": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}}
        }, "client_id": "abc"});
        assert!(is_comfyui(&prompt));
        let (graph, warnings) = read(&prompt).unwrap();
        assert!(warnings.is_empty());
        let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["3", "11"], "ordered by number");
        let encode = graph.node("3").unwrap();
        assert_eq!(
            value(encode, "clip"),
            Input::Link {
                node: "11".into(),
                output: 1
            }
        );
        assert_eq!(value(encode, "text"), Input::Value(json!("a fox")));
        assert!(encode.position.is_none());
        assert!(!is_comfyui(&json!({"format": "flowline-workflow"})));
        assert!(!is_comfyui(&json!({"3": {"inputs": {}}})));
    }
}
