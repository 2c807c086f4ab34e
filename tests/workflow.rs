//! Workflow files: round trips, atomic saves and clear errors for broken files.

use std::path::Path;

use flowline_engine::workflow::{Workflow, WorkflowError};

const DEFAULT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/workflows/default.json");

fn error_text(json: &str) -> String {
    Workflow::from_json(json, "test.json")
        .unwrap_err()
        .to_string()
}

#[test]
fn the_default_workflow_has_the_documented_nodes_and_parameters() {
    flowline::install_model_families();
    let workflow = Workflow::load(Path::new(DEFAULT)).unwrap();
    let ids: Vec<&str> = workflow.graph.nodes.iter().map(|n| n.id.as_str()).collect();
    for id in [
        "model", "guide", "prompt", "negative", "start", "cfg", "sampler", "decode", "save",
    ] {
        assert!(ids.contains(&id), "missing node {id}");
    }
    let mut workflow = workflow;
    for assignment in [
        "prompt.text=a small green ring",
        "start.seed=3",
        "start.width=64",
        "start.height=64",
        "sampler.steps=8",
        "sampler.sampler=heun",
        "sampler.scheduler=flux",
        "sampler.shift=2.5",
        "cfg.scale=5",
        "cfg.method=apg",
        "cfg.autoguide_scale=2.5",
        "guide.path=assets/models/shapes-guide",
        "save.path=out/picture",
    ] {
        workflow.apply_assignment(assignment).unwrap();
    }
}

#[test]
fn save_then_load_round_trips_and_keeps_ui_state() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.json");
    let mut workflow = Workflow::load(Path::new(DEFAULT)).unwrap();
    workflow.ui = serde_json::json!({ "zoom": 1.5 });
    workflow.save(&path).unwrap();
    assert_eq!(Workflow::load(&path).unwrap(), workflow);
}

#[test]
fn a_syntax_error_gives_line_and_column() {
    flowline::install_model_families();
    let text = "{\n  \"format\": \"flowline-workflow\",\n  \"version\": 1,\n  \"nodes\": [ }\n";
    let err = Workflow::from_json(text, "test.json").unwrap_err();
    let WorkflowError::Syntax { line, column, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!((*line, *column), (4, 14));
    assert!(
        err.to_string()
            .starts_with("test.json: line 4, column 14: "),
        "{err}"
    );
}

#[test]
fn a_missing_field_is_named() {
    flowline::install_model_families();
    let err =
        error_text(r#"{"format": "flowline-workflow", "version": 1, "nodes": [{"id": "a"}]}"#);
    assert!(err.contains("missing field `type`"), "{err}");
}

#[test]
fn an_unknown_node_type_is_named() {
    flowline::install_model_families();
    let err = error_text(
        r#"{"format": "flowline-workflow", "version": 1, "nodes": [{"id": "up", "type": "upscale"}]}"#,
    );
    assert!(
        err.starts_with(
            "test.json: node \"up\" has unknown type \"upscale\" (known types: load_model,"
        ),
        "{err}"
    );
}

#[test]
fn other_formats_and_newer_versions_are_refused() {
    flowline::install_model_families();
    let err = error_text(r#"{"format": "comfy", "version": 1, "nodes": []}"#);
    assert!(err.contains("this is not a Flowline workflow"), "{err}");
    let err = error_text(r#"{"format": "flowline-workflow", "version": 9, "nodes": []}"#);
    assert!(
        err.contains("version 9 was written by a newer Flowline"),
        "{err}"
    );
}

#[test]
fn assignments_name_what_is_wrong() {
    flowline::install_model_families();
    let mut workflow = Workflow::load(Path::new(DEFAULT)).unwrap();
    let err = workflow.apply_assignment("sampler.steps=many").unwrap_err();
    assert_eq!(err, "sampler.steps: \"many\" is not an integer");
    let err = workflow.apply_assignment("sampler.stepz=3").unwrap_err();
    assert!(
        err.starts_with("node \"sampler\" (Sampler) has no parameter \"stepz\""),
        "{err}"
    );
    let err = workflow.apply_assignment("smapler.steps=3").unwrap_err();
    assert!(
        err.starts_with("no node \"smapler\" in the workflow"),
        "{err}"
    );
    let err = workflow.apply_assignment("cfg.scale=99").unwrap_err();
    assert_eq!(err, "cfg.scale: 99 is out of range [0, 30]");
}

#[test]
fn every_shipped_workflow_is_an_example_and_valid() {
    use flowline_engine::workflow::EXAMPLE_WORKFLOWS;

    flowline::install_model_families();
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/workflows");
    let mut shipped: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    shipped.sort();
    let mut examples: Vec<String> = EXAMPLE_WORKFLOWS
        .iter()
        .map(|e| e.file.to_string())
        .collect();
    examples.sort();
    assert_eq!(examples, shipped);
    for example in &EXAMPLE_WORKFLOWS {
        let built_in = Workflow::from_json(example.json, example.file).unwrap();
        let on_disk = Workflow::load(&folder.join(example.file)).unwrap();
        assert_eq!(built_in, on_disk, "{}", example.file);
        if let Err(errors) = flowline_engine::validate::validate(&built_in.graph) {
            panic!("{}: {errors:?}", example.file);
        }
    }
}
