//! The background executor, driven as the GUI drives it: queue runs, read events, cancel.

use std::time::{Duration, Instant};

use flowline_engine::executor::{Event, Executor, RunFailure, RunId};
use flowline_engine::graph::ParamValue;
use flowline_engine::nodes::context::RunEnv;
use flowline_engine::workflow::{DEFAULT_WORKFLOW, Workflow};

/// The default workflow on the weightless exemplar model, without the autoguidance meant for
/// the shapes model: these tests are about the executor, not about any trained model.
fn default_workflow() -> Workflow {
    let mut workflow = Workflow::from_json(DEFAULT_WORKFLOW, "default").unwrap();
    workflow.apply_assignment("model.family=exemplar").unwrap();
    workflow.apply_assignment("cfg.autoguide_scale=1").unwrap();
    workflow
}

fn env(dir: &tempfile::TempDir) -> RunEnv {
    RunEnv {
        output_dir: dir.path().to_path_buf(),
        workflow_json: None,
    }
}

/// Collects the events of `run` until it ends.
fn events_of(executor: &Executor, run: RunId) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = executor
            .events()
            .recv_timeout(Duration::from_secs(120))
            .expect("the run ends");
        if event.run() != run {
            continue;
        }
        let done = event.is_terminal();
        events.push(event);
        if done {
            return events;
        }
    }
}

fn nodes_where(events: &[Event], pick: fn(&Event) -> Option<&String>) -> Vec<String> {
    let mut nodes: Vec<String> = events.iter().filter_map(pick).cloned().collect();
    nodes.sort();
    nodes
}

fn cached(e: &Event) -> Option<&String> {
    match e {
        Event::NodeCached { node, .. } => Some(node),
        _ => None,
    }
}

fn started(e: &Event) -> Option<&String> {
    match e {
        Event::NodeStarted { node, .. } => Some(node),
        _ => None,
    }
}

#[test]
fn changing_only_the_seed_serves_loader_and_prompts_from_cache() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let mut workflow = default_workflow();
    let first = executor.run(workflow.graph.clone(), env(&dir));
    let events = events_of(&executor, first);
    assert!(
        matches!(events.last(), Some(Event::RunFinished { .. })),
        "{events:?}"
    );
    assert!(nodes_where(&events, cached).is_empty());

    workflow.apply_assignment("start.seed=7").unwrap();
    let second = executor.run(workflow.graph.clone(), env(&dir));
    let events = events_of(&executor, second);
    assert!(
        matches!(events.last(), Some(Event::RunFinished { .. })),
        "{events:?}"
    );
    assert_eq!(
        nodes_where(&events, cached),
        ["cfg", "guide", "model", "negative", "prompt"]
    );
    assert_eq!(
        nodes_where(&events, started),
        ["decode", "sampler", "save", "start"]
    );
    let saved = events
        .iter()
        .filter(|e| matches!(e, Event::Image { path: Some(_), .. }))
        .count();
    assert_eq!(saved, 1);
}

#[test]
fn every_step_streams_a_record_and_previews() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let run = executor.run(default_workflow().graph, env(&dir));
    let events = events_of(&executor, run);
    let steps: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, .. } => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len(), 16);
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(step.record.index, i);
        assert_eq!(step.record.x.dims(), [1, 3, 64, 64]);
        assert_eq!(step.record.clean.dims(), [1, 3, 64, 64]);
        let preview = step.preview.to_rgb(&step.record.clean).unwrap();
        assert_eq!(preview.dimensions(), (64, 64));
    }
    assert_eq!(steps[0].record.sigma, 1.0);
    let straightness = events.iter().find_map(|e| match e {
        Event::Trajectory {
            straightness,
            sigmas,
            ..
        } => Some((*straightness, sigmas.clone())),
        _ => None,
    });
    let (straightness, sigmas) = straightness.expect("the sampler reports its trajectory");
    assert!(straightness > 0.0 && straightness <= 1.0 + 1e-9);
    assert_eq!((sigmas.len(), sigmas[0], sigmas[16]), (17, 1.0, 0.0));
}

#[test]
fn cancel_takes_effect_within_one_step() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let mut workflow = default_workflow();
    workflow.apply_assignment("sampler.steps=1000").unwrap();
    let run = executor.run(workflow.graph, env(&dir));
    let mut cancelled_at = None;
    let mut steps_sent_after_cancel = 0;
    loop {
        let event = executor
            .events()
            .recv_timeout(Duration::from_secs(120))
            .unwrap();
        match event {
            Event::Step { step, .. } => match cancelled_at {
                None if step.record.index == 3 => {
                    cancelled_at = Some(Instant::now());
                    executor.cancel(run);
                }
                Some(at) if step.sent_at > at => steps_sent_after_cancel += 1,
                _ => {}
            },
            Event::RunCancelled { .. } => break,
            Event::RunFinished { .. } | Event::RunFailed { .. } => {
                panic!("run ended without cancel: {event:?}")
            }
            _ => {}
        }
    }
    assert!(cancelled_at.is_some());
    assert!(
        steps_sent_after_cancel <= 1,
        "{steps_sent_after_cancel} steps after the cancel"
    );
}

#[test]
fn queued_runs_execute_in_order_and_a_queued_run_can_be_cancelled() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let graph = default_workflow().graph;
    let mut long = default_workflow();
    long.apply_assignment("sampler.steps=1000").unwrap();
    let a = executor.run(long.graph, env(&dir));
    let b = executor.run(graph.clone(), env(&dir));
    let c = executor.run(graph, env(&dir));
    executor.cancel(b);
    let mut ends = Vec::new();
    while ends.len() < 3 {
        let event = executor
            .events()
            .recv_timeout(Duration::from_secs(120))
            .unwrap();
        if event.is_terminal() {
            ends.push((event.run(), matches!(event, Event::RunFinished { .. })));
        }
    }
    assert_eq!(ends, [(b, false), (a, true), (c, true)]);
}

/// The message of the run's failure, which must be bad input to `node`.
fn failed_node_message(events: &[Event], node: &str) -> String {
    match events.last() {
        Some(Event::RunFailed {
            failure:
                RunFailure::Node {
                    node: failed,
                    message,
                    bad_input,
                },
            ..
        }) => {
            assert_eq!(failed, node);
            assert!(*bad_input, "{message}");
            message.clone()
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failing_node_fails_its_run_but_not_the_executor() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let mut workflow = default_workflow();
    workflow
        .apply_assignment("prompt.text=a shiny red")
        .unwrap();
    let run = executor.run(workflow.graph, env(&dir));
    let events = events_of(&executor, run);
    let message = failed_node_message(&events, "prompt");
    assert!(message.contains("names no shape"), "{message}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::NodeFailed { node, .. } if node == "prompt"))
    );
    let run = executor.run(default_workflow().graph, env(&dir));
    assert!(matches!(
        events_of(&executor, run).last(),
        Some(Event::RunFinished { .. })
    ));
}

#[test]
fn a_guide_model_of_another_latent_space_is_refused_by_name() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let mut workflow = default_workflow();
    workflow.apply_assignment("cfg.autoguide_scale=2").unwrap();
    let run = executor.run(workflow.graph, env(&dir));
    let message = failed_node_message(&events_of(&executor, run), "cfg");
    assert!(
        message.contains("the guide model (shapes model"),
        "{message}"
    );
    assert!(
        message.contains("autoguidance needs a weaker version of the same model"),
        "{message}"
    );
}

#[test]
fn an_invalid_graph_fails_before_anything_runs() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let mut workflow = default_workflow();
    workflow
        .graph
        .node_mut("sampler")
        .unwrap()
        .params
        .insert("steps".into(), ParamValue::Int(0));
    let run = executor.run(workflow.graph, env(&dir));
    let events = events_of(&executor, run);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::NodeStarted { .. }))
    );
    let Some(Event::RunFailed {
        failure: RunFailure::Invalid(errors),
        ..
    }) = events.last()
    else {
        panic!("{events:?}")
    };
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors[0].to_string(),
        "node \"sampler\", parameter steps: 0 is out of range [1, 1000]"
    );
}

#[test]
fn unknown_prompt_words_reach_the_event_stream_by_name() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let mut workflow = default_workflow();
    workflow
        .apply_assignment("prompt.text=a shiny red star, please")
        .unwrap();
    let run = executor.run(workflow.graph, env(&dir));
    let events = events_of(&executor, run);
    assert!(
        matches!(events.last(), Some(Event::RunFinished { .. })),
        "{events:?}"
    );
    let warnings: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Warning { node, message, .. } if node == "prompt" => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(warnings, ["unknown words ignored: shiny, please"]);
}

#[test]
fn a_source_image_start_walks_the_schedule_from_its_strength() {
    flowline::install_model_families();
    use flowline_engine::graph::{Endpoint, Graph, Link, Node};
    use flowline_shapes::analyse::analyse;

    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.png");
    // A rough orange blob in the bottom right on a white background.
    let mut picture = image::RgbImage::from_pixel(64, 64, image::Rgb([245, 245, 245]));
    for (x, y, pixel) in picture.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - 48.0, y as f32 - 47.0);
        if dx * dx / 1.3 + dy * dy < 80.0 {
            *pixel = image::Rgb([235, 150, 50]);
        }
    }
    picture.save(&source).unwrap();

    let node = |id: &str, type_name: &str, params: &[(&str, ParamValue)]| Node {
        id: id.into(),
        type_name: type_name.into(),
        position: [0.0, 0.0],
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    };
    let link = |from: &str, from_port: &str, to: &str, to_port: &str| Link {
        from: Endpoint {
            node: from.into(),
            port: from_port.into(),
        },
        to: Endpoint {
            node: to.into(),
            port: to_port.into(),
        },
    };
    let text = |s: &str| ParamValue::Text(s.into());
    let graph = Graph {
        nodes: vec![
            node("model", "load_model", &[("family", text("exemplar"))]),
            node(
                "image",
                "load_image",
                &[("path", text(source.to_str().unwrap()))],
            ),
            node(
                "prompt",
                "encode_prompt",
                &[("text", text("an orange circle"))],
            ),
            node(
                "start",
                "source_image_start",
                &[("strength", ParamValue::Float(0.7))],
            ),
            node("cfg", "cfg", &[("scale", ParamValue::Float(1.0))]),
            node("sampler", "sampler", &[("steps", ParamValue::Int(8))]),
            node("decode", "decode", &[]),
            node("show", "preview_image", &[]),
        ],
        links: vec![
            link("model", "model", "prompt", "model"),
            link("model", "model", "start", "model"),
            link("image", "image", "start", "image"),
            link("model", "model", "cfg", "model"),
            link("prompt", "conditioning", "cfg", "positive"),
            link("cfg", "guider", "sampler", "guider"),
            link("start", "latent", "sampler", "latent"),
            link("model", "model", "decode", "model"),
            link("sampler", "latent", "decode", "latent"),
            link("decode", "image", "show", "image"),
        ],
    };
    let mut executor = Executor::spawn();
    let run = executor.run(graph, env(&dir));
    let events = events_of(&executor, run);
    assert!(
        matches!(events.last(), Some(Event::RunFinished { .. })),
        "{events:?}"
    );
    let sigmas = events
        .iter()
        .find_map(|e| match e {
            Event::Trajectory { sigmas, .. } => Some(sigmas.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!((sigmas.len(), sigmas[0], sigmas[8]), (9, 0.7, 0.0));
    let image = events
        .iter()
        .find_map(|e| match e {
            Event::Image {
                image, path: None, ..
            } => Some(image.clone()),
            _ => None,
        })
        .unwrap();
    // The exemplar model can only land on one of its exemplars for the prompt, so only what
    // the prompt states is certain; a trained model also keeps place and background.
    let found = analyse(&image).unwrap();
    assert_eq!(
        (found.color.name(), found.shape.name()),
        ("orange", "circle")
    );
}

#[test]
fn an_empty_positive_prompt_is_pointed_out() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let mut workflow = default_workflow();
    workflow.apply_assignment("prompt.text=").unwrap();
    let run = executor.run(workflow.graph, env(&dir));
    let events = events_of(&executor, run);
    assert!(
        matches!(events.last(), Some(Event::RunFinished { .. })),
        "{events:?}"
    );
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Warning { node, message, .. }
            if node == "cfg" && message.contains("positive prompt is empty")
    )));
}

/// The image of the first Image event that carries a saved file.
fn saved_image(events: &[Event]) -> image::RgbImage {
    events
        .iter()
        .find_map(|e| match e {
            Event::Image {
                image,
                path: Some(_),
                ..
            } => Some(image.clone()),
            _ => None,
        })
        .expect("Save Image wrote the image")
}

#[test]
fn a_reroute_passes_its_value_on_and_is_cached_like_any_node() {
    use flowline_engine::graph::{Endpoint, Node};

    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let plain = default_workflow().graph;
    let run = executor.run(plain.clone(), env(&dir));
    let direct = saved_image(&events_of(&executor, run));

    // The sampler's latent reaches Decode through two reroutes.
    let mut rerouted = plain;
    let decoded = rerouted
        .links
        .iter_mut()
        .find(|l| l.to.node == "decode" && l.to.port == "latent")
        .unwrap();
    let endpoint = |node: &str| Endpoint {
        node: node.into(),
        port: "value".into(),
    };
    decoded.to = endpoint("tidy");
    for id in ["tidy", "tidier"] {
        rerouted.nodes.push(Node {
            id: id.into(),
            type_name: "reroute".into(),
            position: [0.0, 0.0],
            params: Default::default(),
        });
    }
    rerouted.links.push(flowline_engine::graph::Link {
        from: endpoint("tidy"),
        to: endpoint("tidier"),
    });
    rerouted.links.push(flowline_engine::graph::Link {
        from: endpoint("tidier"),
        to: Endpoint {
            node: "decode".into(),
            port: "latent".into(),
        },
    });
    let run = executor.run(rerouted.clone(), env(&dir));
    let events = events_of(&executor, run);
    assert!(
        matches!(events.last(), Some(Event::RunFinished { .. })),
        "{events:?}"
    );
    assert_eq!(
        nodes_where(&events, started),
        ["decode", "save", "tidier", "tidy"]
    );
    assert_eq!(saved_image(&events), direct);

    let run = executor.run(rerouted, env(&dir));
    let events = events_of(&executor, run);
    let served = nodes_where(&events, cached);
    assert!(
        served.contains(&"tidy".to_string()) && served.contains(&"tidier".to_string()),
        "{served:?}"
    );
}

/// Where `picture`, enlarged `zoom` times, lies whole inside `sheet`.
fn places_of(sheet: &image::RgbImage, picture: &image::RgbImage, zoom: u32) -> Vec<(u32, u32)> {
    let (w, h) = (picture.width() * zoom, picture.height() * zoom);
    let mut places = Vec::new();
    for top in 0..=sheet.height().saturating_sub(h) {
        for left in 0..=sheet.width().saturating_sub(w) {
            let matches = (0..h).all(|y| {
                (0..w).all(|x| {
                    sheet.get_pixel(left + x, top + y) == picture.get_pixel(x / zoom, y / zoom)
                })
            });
            if matches {
                places.push((left, top));
            }
        }
    }
    places
}

#[test]
fn a_step_sweep_lays_out_the_pictures_the_sampler_draws_with_each_step_count() {
    use flowline_engine::graph::{Endpoint, Link, Node};

    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let mut pictures = Vec::new();
    // The trained model, whose paths bend enough for the schedule to change a 3-step picture
    // (the exemplar model's become straight lines at once).
    let trained = || {
        let mut workflow = default_workflow();
        workflow.apply_assignment("model.family=shapes").unwrap();
        workflow
    };
    for (steps, shift) in [(1, 3), (3, 3), (3, 6)] {
        let mut workflow = trained();
        for assignment in [
            format!("sampler.steps={steps}"),
            format!("sampler.shift={shift}"),
        ] {
            workflow.apply_assignment(&assignment).unwrap();
        }
        let run = executor.run(workflow.graph, env(&dir));
        pictures.push(saved_image(&events_of(&executor, run)));
    }

    // The same graph with a sweep in place of Sampler → Decode, both rows on the same guider,
    // the second on a schedule shifted by 6.
    let mut graph = trained().graph;
    graph
        .links
        .retain(|l| !matches!(l.to.node.as_str(), "sampler" | "decode" | "save"));
    graph
        .nodes
        .retain(|n| !matches!(n.id.as_str(), "sampler" | "decode"));
    graph.nodes.push(Node {
        id: "sweep".into(),
        type_name: "step_sweep".into(),
        position: [0.0, 0.0],
        params: [
            ("steps".to_string(), ParamValue::Text("1, 3".into())),
            ("label_b".to_string(), ParamValue::Text("again".into())),
            ("shift_b".to_string(), ParamValue::Float(6.0)),
        ]
        .into(),
    });
    let link = |from: (&str, &str), to: (&str, &str)| Link {
        from: Endpoint {
            node: from.0.into(),
            port: from.1.into(),
        },
        to: Endpoint {
            node: to.0.into(),
            port: to.1.into(),
        },
    };
    graph.links.extend([
        link(("cfg", "guider"), ("sweep", "guider")),
        link(("cfg", "guider"), ("sweep", "guider_b")),
        link(("start", "latent"), ("sweep", "latent")),
        link(("sweep", "image"), ("save", "image")),
    ]);
    let run = executor.run(graph, env(&dir));
    let events = events_of(&executor, run);
    assert!(
        matches!(events.last(), Some(Event::RunFinished { .. })),
        "{events:?}"
    );
    let sheet = saved_image(&events);
    // 64² pictures are drawn at 128²: the 1-step picture (which no shift changes) in both
    // rows of its column, each row's 3-step picture at its own shift right of it.
    let one = places_of(&sheet, &pictures[0], 2);
    let three = places_of(&sheet, &pictures[1], 2);
    let three_shifted = places_of(&sheet, &pictures[2], 2);
    assert_eq!(one.len(), 2, "the 1-step picture at {one:?}");
    assert_eq!(three.len(), 1, "the 3-step picture at {three:?}");
    assert_eq!(
        three_shifted.len(),
        1,
        "the shifted 3-step picture at {three_shifted:?}"
    );
    assert_eq!(one[0].0, one[1].0, "one column");
    assert!(
        three[0].0 > one[0].0 && three[0].1 == one[0].1,
        "1 step left of 3 steps in the first row"
    );
    assert!(
        three_shifted[0].0 == three[0].0 && three_shifted[0].1 == one[1].1,
        "the shifted 3 steps in the second row"
    );
    // Every run streamed its steps: 1 + 3 per row.
    let steps = events
        .iter()
        .filter(|e| matches!(e, Event::Step { node, .. } if node == "sweep"))
        .count();
    assert_eq!(steps, 8);
    let captions: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Info { node, message, .. } if node == "sweep" => Some(message.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(captions.len(), 2, "{captions:?}");
    assert!(captions[0].starts_with("model A, straightness by steps: 1: 1.000 in "));
    assert!(captions[1].starts_with("again, straightness by steps: 1: 1.000 in "));
    assert!(captions[1].contains(", 3: "));
}

/// The default graph with its Gaussian Start replaced by a Load Latent reading `path`.
fn starting_from_file(path: &std::path::Path) -> flowline_engine::graph::Graph {
    let mut graph = default_workflow().graph;
    let start = graph.nodes.iter_mut().find(|n| n.id == "start").unwrap();
    start.type_name = "load_latent".into();
    start.params = [(
        "path".to_string(),
        ParamValue::Text(path.display().to_string()),
    )]
    .into();
    graph
}

#[test]
fn a_loaded_latent_starts_the_run_as_the_same_noise_drawn_in_place() {
    use candle_core::{Device, Tensor};
    use flowline_engine::model::{LoadRequest, family};

    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let run = executor.run(default_workflow().graph, env(&dir));
    let drawn = saved_image(&events_of(&executor, run));

    // The noise Gaussian Start draws for seed 42, saved as ComfyUI's Save Latent would.
    let model =
        (family("exemplar").unwrap().load)(&LoadRequest::new("", &Device::Cpu), &mut |_| {})
            .unwrap();
    let shape = model.latent_shape(64, 64).unwrap();
    let noise = flowline_engine::flow::noise::gaussian(42, shape.clone(), &Device::Cpu).unwrap();
    let file = dir.path().join("noise.latent");
    noise.save_safetensors("latent_tensor", &file).unwrap();
    let run = executor.run(starting_from_file(&file), env(&dir));
    let events = events_of(&executor, run);
    assert_eq!(saved_image(&events), drawn);

    // A latent of the wrong layout is refused, naming the file and both channel counts.
    let wrong = Tensor::zeros(
        (1, shape[1] + 1, shape[2], shape[3]),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let file = dir.path().join("wrong.latent");
    wrong.save_safetensors("latent_tensor", &file).unwrap();
    let run = executor.run(starting_from_file(&file), env(&dir));
    let message = failed_node_message(&events_of(&executor, run), "start");
    assert!(
        message.contains("wrong.latent")
            && message.contains(&format!("{} channels", shape[1] + 1))
            && message.contains(&format!("model's have {}", shape[1])),
        "{message}"
    );
}
