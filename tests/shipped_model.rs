//! The shipped shapes model (`assets/models/shapes`, with its guide in
//! `assets/models/shapes-guide`): it loads through the default workflow,
//! a fixed seed reproduces its reference image, the README's prompt gives that picture, and a
//! rough blob given as the start comes back clean, and 200 held-out prompts meet the 16-step
//! and 4-step adherence targets; its reflowed few-step version (`assets/models/shapes-fast`)
//! meets its 1-, 2- and 4-step targets. 200 prompts are a check, not the measurement: the
//! README's figures are for 1 000 and 2 000 held-out prompts. No test here trains.

use std::path::Path;
use std::time::Duration;

use flowline_engine::executor::{Event, Executor};
use flowline_engine::flow::guidance::{Guidance, GuidanceMethod};
use flowline_engine::flow::sampler::SamplerKind;
use flowline_engine::flow::schedule::Scheduler;
use flowline_engine::graph::ParamValue;
use flowline_engine::model::{FlowModel, LoadRequest};
use flowline_engine::nodes::context::RunEnv;
use flowline_engine::workflow::{DEFAULT_WORKFLOW, Workflow};
use flowline_shapes::analyse::{analyse, judge};
use flowline_shapes::config;
use flowline_shapes::dataset::Caption;
use flowline_shapes::eval::{EvalSettings, WeakGuide, evaluate, held_out_cases};
use flowline_shapes::model as shapes;
use flowline_shapes::train::TrainSettings;

const WORKFLOWS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/workflows");
/// Least adherence of `shapes-fast` on the first 200 held-out prompts at 1, 2 and 4 steps, on
/// its workflow's schedule (shift 9): what they measured (70.5, 84 and 88 %), less 2.5 to 3
/// points for the floating-point differences between machines.
const FAST_TARGETS: [f64; 3] = [0.68, 0.81, 0.85];

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/default-workflow-seed-42.png"
);

/// Runs `workflow` and returns the image it saved.
fn run(workflow: Workflow) -> image::RgbImage {
    let dir = tempfile::tempdir().unwrap();
    let mut executor = Executor::spawn();
    let env = RunEnv {
        output_dir: dir.path().to_path_buf(),
        workflow_json: None,
    };
    executor.run(workflow.graph, env);
    loop {
        match executor
            .events()
            .recv_timeout(Duration::from_secs(120))
            .unwrap()
        {
            Event::Image {
                path: Some(path), ..
            } => return image::open(path).unwrap().to_rgb8(),
            event if event.is_terminal() => panic!("{event:?}"),
            _ => {}
        }
    }
}

/// The default workflow, which runs the shipped shapes model autoguided by its guide.
fn shapes_workflow() -> Workflow {
    let workflow = Workflow::from_json(DEFAULT_WORKFLOW, "default").unwrap();
    let family = |node: &str| workflow.graph.node(node).unwrap().params["family"].clone();
    assert_eq!(
        family("model"),
        ParamValue::Text(shapes::FAMILY.name.into())
    );
    assert_eq!(
        family("guide"),
        ParamValue::Text(shapes::GUIDE_FAMILY.name.into())
    );
    workflow
}

#[test]
fn a_fixed_seed_reproduces_the_reference_image() {
    flowline::install_model_families();
    let workflow = shapes_workflow();
    assert_eq!(
        workflow.graph.node("start").unwrap().params["seed"],
        ParamValue::Int(42)
    );
    let image = run(workflow);
    let reference = image::open(REFERENCE).unwrap().to_rgb8();
    // Float summation order may differ between CPUs; a pixel may move by a level or two.
    let worst = image
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 3,
        "the image differs from the reference by up to {worst}/255"
    );
}

#[test]
fn the_readme_prompt_gives_that_picture() {
    flowline::install_model_families();
    let mut workflow = shapes_workflow();
    let prompt = "a large red star in the top left on a blue background";
    workflow
        .apply_assignment(&format!("prompt.text={prompt}"))
        .unwrap();
    let image = run(workflow);
    let caption = Caption::parse(prompt).unwrap().caption;
    let judgement = judge(&caption, &analyse(&image).unwrap());
    assert!(judgement.all_correct(), "{judgement:?}");
}

/// Adherence of the shipped model with its guide on the first `prompts` held-out prompts at
/// `steps` Euler steps, with the default workflow's guidance at CFG scale `scale`.
fn held_out_adherence(prompts: usize, steps: usize, scale: f64) -> f64 {
    let load = |family: &flowline_engine::model::Family| {
        (family.load)(
            &LoadRequest::new("", &candle_core::Device::Cpu),
            &mut |_| {},
        )
        .unwrap()
    };
    let model = load(&shapes::FAMILY);
    let default_guidance = Guidance {
        scale: 4.0,
        method: GuidanceMethod::Rescale,
        interval: (0.3, 1.0),
        ..Guidance::default()
    };
    let weak = WeakGuide {
        model: load(&shapes::GUIDE_FAMILY),
        scale: 4.0,
    };
    // The default workflow's settings, so this measures what a user gets.
    let workflow = shapes_workflow();
    let cfg = &workflow.graph.node("cfg").unwrap().params;
    for (name, value) in [
        ("scale", default_guidance.scale),
        ("interval_low", default_guidance.interval.0),
        ("autoguide_scale", weak.scale),
    ] {
        assert_eq!(cfg[name], ParamValue::Float(value), "{name}");
    }
    assert_eq!(
        cfg["method"],
        ParamValue::Text(default_guidance.method.name().into())
    );
    let settings = EvalSettings {
        samplers: vec![SamplerKind::Euler],
        steps: vec![steps],
        scheduler: Scheduler::Shifted { shift: 3.0 },
        guidance: Guidance {
            scale,
            ..default_guidance
        },
        batch: 40,
        start_sigma: 1.0,
        eta: 1.0,
        // No caption classifier ships (see the README), so the default workflow has none.
        classifier_scale: 0.0,
    };
    let cases = held_out_cases(prompts);
    let rows = evaluate(&model, Some(&weak), &cases, &settings, &mut |_, _| {}).unwrap();
    println!("{steps} steps at CFG {scale}: {:?}", rows[0]);
    rows[0].adherence
}

/// At 4 steps the default scale burns in (see the README), so this measures the scale the
/// README gives for few steps, 2.
#[test]
fn four_steps_at_cfg_2_meet_the_few_step_adherence_target() {
    flowline::install_model_families();
    let adherence = held_out_adherence(200, 4, 2.0);
    assert!(adherence >= 0.75, "4 steps: {adherence}");
}

#[test]
fn sixteen_steps_meet_the_adherence_target() {
    flowline::install_model_families();
    let adherence = held_out_adherence(200, 16, 4.0);
    assert!(adherence >= 0.90, "16 steps: {adherence}");
}

/// The few-step model as its workflow runs it (Euler on the workflow's shifted schedule, CFG
/// scale 1): its adherence on the first 200 held-out prompts at 1, 2 and 4 steps, and the
/// mean path straightness at 4.
fn fast_adherence() -> Vec<(usize, f64, f64)> {
    let workflow = Workflow::load(&Path::new(WORKFLOWS).join("shapes-fast.json")).unwrap();
    let params = |node: &str| workflow.graph.node(node).unwrap().params.clone();
    assert_eq!(
        params("model")["family"],
        ParamValue::Text(shapes::FAST_FAMILY.name.into())
    );
    assert_eq!(params("cfg")["scale"], ParamValue::Float(1.0));
    assert_eq!(
        params("sampler")["scheduler"],
        ParamValue::Text("shifted".into())
    );
    assert_eq!(params("sampler")["steps"], ParamValue::Int(4));
    let ParamValue::Float(shift) = params("sampler")["shift"] else {
        panic!("the sampler's shift is not a number");
    };
    let model = (shapes::FAST_FAMILY.load)(
        &LoadRequest::new("", &candle_core::Device::Cpu),
        &mut |_| {},
    )
    .unwrap();
    let settings = EvalSettings {
        samplers: vec![SamplerKind::Euler],
        steps: vec![1, 2, 4],
        scheduler: Scheduler::Shifted { shift },
        guidance: Guidance {
            scale: 1.0,
            ..Guidance::default()
        },
        batch: 40,
        start_sigma: 1.0,
        eta: 1.0,
        classifier_scale: 0.0,
    };
    let rows = evaluate(
        &model,
        None,
        &held_out_cases(200),
        &settings,
        &mut |_, _| {},
    )
    .unwrap();
    rows.iter()
        .map(|row| (row.steps, row.adherence, row.mean_straightness))
        .collect()
}

/// The README gives the figures for 1 000 held-out prompts; this checks the first 200.
#[test]
fn the_reflowed_model_draws_the_prompt_in_one_to_four_steps() {
    flowline::install_model_families();
    let rows = fast_adherence();
    println!("{rows:?}");
    for ((steps, adherence, _), target) in rows.iter().zip(FAST_TARGETS) {
        assert!(adherence >= &target, "{steps} steps: {adherence}");
    }
    // Its paths are straighter than the teacher's: 0.998 at 4 steps, where the guided
    // teacher's are 0.864 (and 0.939 at 16 steps; the README has both).
    let (_, _, straightness) = rows[2];
    assert!(straightness > 0.98, "4 steps: straightness {straightness}");
}

#[test]
fn a_rough_blob_comes_back_as_a_clean_shape_of_its_colour_and_place() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("blob.png");
    // A lumpy hand-drawn-looking purple disc in the bottom left of a yellow page.
    let mut picture = image::RgbImage::from_pixel(64, 64, image::Rgb([236, 214, 52]));
    for (x, y, pixel) in picture.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - 13.0, y as f32 - 50.0);
        let wobble = 1.0 + 0.15 * (3.0 * dy.atan2(dx)).sin();
        if (dx * dx + dy * dy).sqrt() < 9.0 * wobble {
            *pixel = image::Rgb([150, 70, 180]);
        }
    }
    picture.save(&source).unwrap();
    for strength in [0.6, 0.7, 0.8] {
        let text = |s: &str| ParamValue::Text(s.into());
        let mut workflow = shapes_workflow();
        let graph = &mut workflow.graph;
        graph.nodes.push(flowline_engine::graph::Node {
            id: "image".into(),
            type_name: "load_image".into(),
            position: [0.0, 0.0],
            params: [("path".to_string(), text(source.to_str().unwrap()))].into(),
        });
        let start = graph.node_mut("start").unwrap();
        start.type_name = "source_image_start".into();
        start.params = [("strength".to_string(), ParamValue::Float(strength))].into();
        graph.links.push(flowline_engine::graph::Link {
            from: flowline_engine::graph::Endpoint {
                node: "image".into(),
                port: "image".into(),
            },
            to: flowline_engine::graph::Endpoint {
                node: "start".into(),
                port: "image".into(),
            },
        });
        workflow
            .apply_assignment("prompt.text=a purple circle")
            .unwrap();
        let found = analyse(&run(workflow)).unwrap();
        assert_eq!(
            found.color.name(),
            "purple",
            "strength {strength}: {found:?}"
        );
        assert_eq!(
            found.background.name(),
            "yellow",
            "strength {strength}: {found:?}"
        );
        assert_eq!(
            found.shape.name(),
            "circle",
            "strength {strength}: {found:?}"
        );
        assert_eq!(
            found.position.phrase(),
            "in the bottom left",
            "strength {strength}: {found:?}"
        );
    }
}

#[test]
fn the_shipped_files_are_small_and_record_their_training() {
    flowline::install_model_families();
    let folders = [
        config::SHIPPED_DIR,
        config::SHIPPED_GUIDE_DIR,
        config::SHIPPED_FAST_DIR,
    ]
    .map(Path::new);
    let size: u64 = folders
        .iter()
        .flat_map(|folder| std::fs::read_dir(folder).unwrap())
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(size <= 25 * 1024 * 1024, "{size} bytes");
    for folder in folders {
        let config = config::read_config(folder).unwrap();
        assert!(config.training["seconds"].as_f64().unwrap() > 0.0);
        let command = config.training["command"].as_str().unwrap();
        assert!(
            command.contains("flowline train") || command.contains(" reflow --out"),
            "{command}"
        );
        let model = shapes::ShapesModel::load(folder, &candle_core::Device::Cpu).unwrap();
        assert!(model.describe().contains("shapes model"));
    }
}

#[test]
fn the_shipped_preset_holds_the_settings_the_shipped_weights_were_last_trained_with() {
    let config = config::read_config(Path::new(config::SHIPPED_DIR)).unwrap();
    let recorded: TrainSettings =
        serde_json::from_value(config.training["settings"].clone()).unwrap();
    assert_eq!(TrainSettings::default_model(), recorded);
}

/// The shipped model has no LoRA files to take, and says so instead of ignoring one.
#[test]
fn the_shipped_model_refuses_a_lora_by_name() {
    let model = (shapes::FAMILY.load)(
        &LoadRequest::new("", &candle_core::Device::Cpu),
        &mut |_| {},
    )
    .unwrap();
    let error = model
        .with_lora(Path::new("style.safetensors"), 1.0)
        .err()
        .expect("the shapes model takes no LoRA")
        .to_string();
    assert!(error.ends_with("takes no LoRA"), "{error}");
}
