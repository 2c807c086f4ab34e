//! Validation names the node and the port or parameter at fault, before anything runs.

use std::path::Path;

use flowline_engine::graph::{Endpoint, Graph, Link, ParamValue};
use flowline_engine::validate::validate;
use flowline_engine::workflow::Workflow;

fn default_graph() -> Graph {
    Workflow::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/workflows/default.json"
    )))
    .unwrap()
    .graph
}

fn errors(graph: &Graph) -> Vec<String> {
    validate(graph)
        .err()
        .unwrap_or_default()
        .iter()
        .map(|e| e.to_string())
        .collect()
}

fn link(from: (&str, &str), to: (&str, &str)) -> Link {
    let end = |(node, port): (&str, &str)| Endpoint {
        node: node.into(),
        port: port.into(),
    };
    Link {
        from: end(from),
        to: end(to),
    }
}

#[test]
fn the_default_graph_plans_every_node_in_dependency_order() {
    flowline::install_model_families();
    let plan = validate(&default_graph()).unwrap();
    let position = |id: &str| plan.order.iter().position(|n| n == id).unwrap();
    assert_eq!(plan.order.len(), 9);
    assert!(position("model") < position("prompt"));
    assert!(position("guide") < position("cfg"));
    assert!(position("cfg") < position("sampler"));
    assert!(position("start") < position("sampler"));
    assert!(position("decode") < position("save"));
    assert_eq!(plan.params["sampler"]["base_shift"], ParamValue::Float(0.5));
}

#[test]
fn a_missing_required_input_is_named() {
    flowline::install_model_families();
    let mut graph = default_graph();
    graph
        .links
        .retain(|l| !(l.to.node == "sampler" && l.to.port == "latent"));
    assert_eq!(
        errors(&graph),
        ["node \"sampler\", input latent: required LATENT input is not connected"]
    );
}

#[test]
fn a_type_mismatch_is_named() {
    flowline::install_model_families();
    let mut graph = default_graph();
    graph
        .links
        .retain(|l| !(l.to.node == "sampler" && l.to.port == "latent"));
    graph
        .links
        .push(link(("prompt", "conditioning"), ("sampler", "latent")));
    assert_eq!(
        errors(&graph),
        [
            "node \"sampler\", input latent: expects LATENT but prompt.conditioning gives CONDITIONING"
        ]
    );
}

#[test]
fn a_cycle_is_named() {
    flowline::install_model_families();
    let mut graph = default_graph();
    graph.nodes.push(flowline_engine::graph::Node {
        id: "again".into(),
        type_name: "sampler".into(),
        position: [0.0, 0.0],
        params: Default::default(),
    });
    graph
        .links
        .retain(|l| !(l.to.node == "sampler" && l.to.port == "latent"));
    graph
        .links
        .push(link(("again", "latent"), ("sampler", "latent")));
    graph
        .links
        .push(link(("sampler", "latent"), ("again", "latent")));
    graph
        .links
        .push(link(("cfg", "guider"), ("again", "guider")));
    let errors = errors(&graph);
    assert!(
        errors.contains(&"node \"sampler\": is part of a cycle".to_string()),
        "{errors:?}"
    );
    assert!(
        errors.contains(&"node \"again\": is part of a cycle".to_string()),
        "{errors:?}"
    );
}

#[test]
fn bad_parameters_are_named() {
    flowline::install_model_families();
    let mut graph = default_graph();
    let cfg = graph.node_mut("cfg").unwrap();
    cfg.params
        .insert("method".into(), ParamValue::Text("louder".into()));
    cfg.params.insert("scael".into(), ParamValue::Float(2.0));
    graph
        .node_mut("start")
        .unwrap()
        .params
        .insert("seed".into(), ParamValue::Text("x".into()));
    let errors = errors(&graph);
    assert_eq!(
        errors,
        [
            "node \"start\", parameter seed: \"x\" is not an integer",
            "node \"cfg\", parameter method: \"louder\" is not one of cfg, rescale, cfg_zero_star, apg",
            "node \"cfg\", parameter scael: no such parameter",
        ]
    );
}

#[test]
fn doubled_inputs_and_dangling_links_are_named() {
    flowline::install_model_families();
    let mut graph = default_graph();
    graph
        .links
        .push(link(("prompt", "conditioning"), ("cfg", "positive")));
    graph
        .links
        .push(link(("ghost", "latent"), ("decode", "latent")));
    graph
        .links
        .push(link(("model", "model"), ("decode", "mystery")));
    let errors = errors(&graph);
    assert!(
        errors.contains(&"node \"cfg\", input positive: has more than one link".to_string()),
        "{errors:?}"
    );
    assert!(
        errors.contains(
            &"node \"ghost\": a link refers to ghost.latent, but there is no such node".to_string()
        ),
        "{errors:?}"
    );
    assert!(
        errors.contains(&"node \"decode\", input mystery: no such input".to_string()),
        "{errors:?}"
    );
}

#[test]
fn a_graph_without_outputs_has_nothing_to_do() {
    flowline::install_model_families();
    let mut graph = default_graph();
    graph.nodes.retain(|n| n.id != "save");
    graph.links.retain(|l| l.to.node != "save");
    assert_eq!(
        errors(&graph),
        ["nothing to do: the graph has no Save Image or Preview Image node"]
    );
}

/// The default graph with reroutes `ids` (a chain, in order) put between output `from` and
/// input `to` instead of the link into `to`.
fn rerouted(from: (&str, &str), ids: &[&str], to: (&str, &str)) -> Graph {
    let mut graph = default_graph();
    graph
        .links
        .retain(|l| !(l.to.node == to.0 && l.to.port == to.1));
    let mut previous = from;
    for id in ids {
        graph.nodes.push(flowline_engine::graph::Node {
            id: id.to_string(),
            type_name: "reroute".into(),
            position: [0.0, 0.0],
            params: Default::default(),
        });
        graph.links.push(link(previous, (id, "value")));
        previous = (id, "value");
    }
    graph.links.push(link(previous, to));
    graph
}

#[test]
fn a_chain_of_reroutes_passes_its_type_on() {
    flowline::install_model_families();
    let graph = rerouted(
        ("sampler", "latent"),
        &["tidy", "tidier"],
        ("decode", "latent"),
    );
    let plan = validate(&graph).unwrap();
    let position = |id: &str| plan.order.iter().position(|n| n == id).unwrap();
    assert!(position("sampler") < position("tidy"));
    assert!(position("tidy") < position("tidier"));
    assert!(position("tidier") < position("decode"));
}

#[test]
fn a_wrong_type_through_reroutes_is_named() {
    flowline::install_model_families();
    assert_eq!(
        errors(&rerouted(
            ("model", "model"),
            &["tidy"],
            ("decode", "latent")
        )),
        ["node \"decode\", input latent: expects LATENT but tidy.value gives MODEL"]
    );
    assert_eq!(
        errors(&rerouted(
            ("model", "model"),
            &["tidy", "tidier", "tidiest"],
            ("decode", "latent")
        )),
        ["node \"decode\", input latent: expects LATENT but tidiest.value gives MODEL"]
    );
}

#[test]
fn a_reroute_fed_by_nothing_is_named() {
    flowline::install_model_families();
    let mut graph = rerouted(("sampler", "latent"), &["tidy"], ("decode", "latent"));
    graph.links.retain(|l| l.to.node != "tidy");
    assert_eq!(
        errors(&graph),
        ["node \"tidy\", input value: required ANY input is not connected"]
    );
}
