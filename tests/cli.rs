//! The `flowline` binary as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

const DEFAULT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/workflows/default.json");
const TINY_PRESET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/presets/tiny.toml");

fn flowline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowline"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn run_writes_a_png_and_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let out = dir.path().join("out");
    let output = flowline(&[
        "run",
        DEFAULT,
        "--out",
        out.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--set",
        "sampler.steps=6",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let written: Vec<&str> = stdout.lines().collect();
    assert_eq!(written.len(), 1, "{stdout}");
    assert!(written[0].ends_with("flowline_00001.png"));
    let image = image::open(written[0]).unwrap();
    assert_eq!((image.width(), image.height()), (64, 64));

    let trace: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    let sigmas: Vec<f64> = serde_json::from_value(trace["sigmas"].clone()).unwrap();
    assert_eq!(sigmas.len(), 7);
    assert_eq!((sigmas[0], sigmas[6]), (1.0, 0.0));
    assert!(sigmas.windows(2).all(|w| w[0] > w[1]));
    let straightness = trace["straightness"].as_f64().unwrap();
    assert!(straightness > 0.0 && straightness <= 1.0, "{straightness}");
    assert_eq!(trace["steps"].as_array().unwrap().len(), 6);
}

/// The pixels of the image `flowline run` writes for the default workflow with `assignments`.
fn run_pixels(assignments: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["run", DEFAULT, "--out", dir.path().to_str().unwrap()];
    for assignment in assignments {
        args.extend(["--set", assignment]);
    }
    let output = flowline(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let path = String::from_utf8(output.stdout).unwrap();
    image::open(path.trim()).unwrap().to_rgb8().into_raw()
}

#[test]
fn the_ancestral_sampler_is_reproducible_from_its_noise_seed() {
    let ancestral = ["sampler.steps=6", "sampler.sampler=euler_ancestral"];
    let with = |extra: &[&'static str]| run_pixels(&[&ancestral[..], extra].concat());
    let seeded = with(&["sampler.noise_seed=3"]);
    assert_eq!(seeded, with(&["sampler.noise_seed=3"]));
    assert_ne!(seeded, with(&["sampler.noise_seed=4"]));
    // At η = 0 no noise is drawn afresh: every step is the Euler step.
    assert_eq!(
        with(&["sampler.eta=0", "sampler.noise_seed=4"]),
        run_pixels(&["sampler.steps=6", "sampler.sampler=euler"])
    );
}

fn assert_bad_input(output: &Output, expected: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains(expected), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_broken_workflow_exits_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.json");
    std::fs::write(
        &broken,
        "{\"format\": \"flowline-workflow\", \"version\": 1,\n \"nodes\": [}",
    )
    .unwrap();
    assert_bad_input(
        &flowline(&["run", broken.to_str().unwrap()]),
        "broken.json: line 2, column 12",
    );
    std::fs::write(
        &broken,
        r#"{"format": "flowline-workflow", "version": 1, "nodes": [{"id": "x", "type": "upscale"}]}"#,
    )
    .unwrap();
    assert_bad_input(
        &flowline(&["run", broken.to_str().unwrap()]),
        "unknown type \"upscale\"",
    );
    assert_bad_input(
        &flowline(&["run", "/no/such/workflow.json"]),
        "cannot read workflow /no/such/workflow.json",
    );
}

#[test]
fn bad_parameters_exit_2() {
    assert_bad_input(
        &flowline(&["run", DEFAULT, "--set", "sampler.steps=0"]),
        "out of range",
    );
    assert_bad_input(
        &flowline(&["run", DEFAULT, "--set", "nothing"]),
        "is not NODE.PARAM=VALUE",
    );
    let dir = tempfile::tempdir().unwrap();
    let output = flowline(&[
        "run",
        DEFAULT,
        "--out",
        dir.path().to_str().unwrap(),
        "--set",
        "model.family=exemplar",
        "--set",
        "prompt.text=a glowing blue",
    ]);
    assert_bad_input(&output, "node \"prompt\" failed");
    assert!(!Path::new(&dir.path().join("flowline_00001.png")).exists());

    let run = dir.path().join("run");
    let run = run.to_str().unwrap();
    let preset = dir.path().join("preset.toml");
    let tiny = std::fs::read_to_string(TINY_PRESET).unwrap();
    let cases: [(&[(&str, &str)], &str); 5] = [
        (
            &[("latent_whitening = 0.0", "latent_whitening = 2.0")],
            "latent_whitening must be between 0 and 1, not 2",
        ),
        (
            &[("loss_balance = 0.0", "loss_balance = 1.5")],
            "loss_balance must be between 0 and 1, not 1.5",
        ),
        (
            &[
                ("conv_head = 8", "conv_head = 0"),
                ("conv_head_features = false", "conv_head_features = true"),
            ],
            "network.conv_head_features needs a convolutional head",
        ),
        (
            &[("seed = 7", "seed = 7\nseeds = 8")],
            "unknown field `seeds`",
        ),
        (&[("batch = 8", "")], "missing field `batch`"),
    ];
    for (edits, message) in cases {
        let broken = edits
            .iter()
            .fold(tiny.clone(), |text, (from, to)| text.replace(from, to));
        std::fs::write(&preset, broken).unwrap();
        let output = flowline(&["train", "--out", run, "--preset", preset.to_str().unwrap()]);
        assert_bad_input(&output, "preset.toml is not valid");
        assert_bad_input(&output, message);
    }
    assert_bad_input(
        &flowline(&["train", "--out", run, "--preset", "/no/such/preset.toml"]),
        "cannot read preset /no/such/preset.toml",
    );
    assert_bad_input(
        &flowline(&["train", "--out", run, "--resume"]),
        "checkpoint.json",
    );
    assert!(!Path::new(run).exists());
}

/// Runs `flowline eval` with `args` and `--json`; returns the JSON report and what it printed.
fn eval_report(args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("eval.json");
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    all.extend(["--json", json.to_str().unwrap()]);
    let output = flowline(&all);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (report, String::from_utf8(output.stdout).unwrap())
}

/// How many images a row's `shapes_seen` tallies.
fn tallied(row: &serde_json::Value) -> u64 {
    row["shapes_seen"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|seen| seen.as_object().unwrap().values())
        .map(|count| count.as_u64().unwrap())
        .sum()
}

#[test]
fn eval_runs_on_the_shipped_weights_and_writes_json() {
    let (report, stdout) = eval_report(&[
        "--family",
        "shapes",
        "--prompts",
        "2",
        "--samplers",
        "euler",
        "--steps",
        "1,2",
    ]);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["steps"], 2);
    assert_eq!(rows[1]["images"], 2);
    assert!(stdout.contains("adherence"), "{stdout}");
    assert_eq!(
        tallied(&rows[1]),
        2,
        "every image is tallied once: {}",
        rows[1]
    );
}

#[test]
fn eval_tallies_the_shape_seen_for_each_shape_asked() {
    let (report, _) = eval_report(&[
        "--family",
        "exemplar",
        "--prompts",
        "12",
        "--samplers",
        "euler",
        "--steps",
        "16",
        "--cfg",
        "1",
    ]);
    let row = &report["rows"][0];
    // Unguided, the exemplar model draws pictures of its prompt, so the tally is diagonal.
    for (asked, found) in row["shapes_seen"].as_object().unwrap() {
        assert_eq!(
            found.as_object().unwrap().keys().collect::<Vec<_>>(),
            [asked],
            "{report}"
        );
    }
    assert_eq!(tallied(row), 12);
}

#[test]
fn eval_reports_every_case_and_saves_its_image_named_by_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let (report, _) = eval_report(&[
        "--prompts",
        "6",
        "--samplers",
        "euler",
        "--steps",
        "2",
        "--images",
        images.to_str().unwrap(),
    ]);
    let row = &report["rows"][0];
    let cases = row["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    let adherent = cases.iter().filter(|c| c["adherent"] == true).count();
    assert_eq!(row["adherence"].as_f64().unwrap(), adherent as f64 / 6.0);

    let mut files: Vec<_> = std::fs::read_dir(images.join("euler-2"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 6, "{files:?}");
    for (index, (case, file)) in cases.iter().zip(&files).enumerate() {
        let wrong: Vec<&str> = case["wrong"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        assert_eq!(case["adherent"], wrong.is_empty(), "{case}");
        let verdict = match wrong.as_slice() {
            [] => "ok".to_string(),
            wrong => format!("wrong-{}", wrong.join("-")),
        };
        let prompt = case["prompt"].as_str().unwrap().replace(' ', "-");
        let name = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("{index:03}-{verdict}-{prompt}.png"));
        // The saved picture is the one judged: the analyser reads it the same way again.
        let picture = image::open(file).unwrap().to_rgb8();
        match flowline_shapes::analyse::analyse(&picture) {
            Ok(seen) => {
                assert_eq!(case["seen"]["shape"], seen.shape.name(), "{case}");
                assert_eq!(case["seen"]["color"], seen.color.name(), "{case}");
            }
            Err(_) => assert!(case["seen"].is_null(), "{case}"),
        }
    }
}

#[test]
fn eval_refuses_an_image_folder_it_cannot_create() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "not a folder").unwrap();
    let output = flowline(&[
        "eval",
        "--prompts",
        "1",
        "--samplers",
        "euler",
        "--steps",
        "1",
        "--images",
        blocker.to_str().unwrap(),
    ]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot create {}", blocker.display())),
        "{err}"
    );
    assert_eq!(std::fs::read(&blocker).unwrap(), b"not a folder");
}

/// Three prompts, two Euler steps: enough to see a setting reach the report.
const QUICK_EVAL: [&str; 6] = ["--prompts", "3", "--samplers", "euler", "--steps", "2"];

#[test]
fn eval_guides_with_the_variant_and_interval_asked_for() {
    let (report, stdout) = eval_report(
        &[
            QUICK_EVAL.as_slice(),
            &[
                "--guidance",
                "cfg_zero_star",
                "--guidance-interval",
                "0.2,0.9",
            ],
        ]
        .concat(),
    );
    assert_eq!(report["guidance"], "cfg_zero_star");
    assert_eq!(report["guidance_interval"], serde_json::json!([0.2, 0.9]));
    assert_eq!(tallied(&report["rows"][0]), 3);
    assert!(
        stdout.contains("guidance cfg_zero_star at scale 3 for σ in [0.2, 0.9]"),
        "{stdout}"
    );

    let output = flowline(&["eval", "--guidance", "louder"]);
    assert_bad_input(&output, "unknown guidance \"louder\"");
    let output = flowline(&["eval", "--guidance-interval", "0.9,0.2"]);
    assert_bad_input(&output, "0 ≤ LOW ≤ HIGH ≤ 1");
}

#[test]
fn eval_autoguides_with_the_model_asked_for() {
    let guide = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/models/shapes-guide");
    let (report, stdout) = eval_report(
        &[
            QUICK_EVAL.as_slice(),
            &["--autoguide-model", guide, "--autoguide-scale", "3"],
        ]
        .concat(),
    );
    assert_eq!(report["autoguide"]["folder"], guide);
    assert_eq!(report["autoguide"]["scale"], 3.0);
    assert_eq!(tallied(&report["rows"][0]), 3);
    assert!(stdout.contains(", autoguided by shapes model"), "{stdout}");

    let output = flowline(&["eval", "--autoguide-model", "/nowhere/guide"]);
    assert_bad_input(&output, "/nowhere/guide/config.json");
}

#[test]
fn eval_can_start_from_right_pictures_noised_to_a_given_level() {
    let (report, stdout) = eval_report(&[
        "--prompts",
        "10",
        "--samplers",
        "euler",
        "--steps",
        "2",
        "--start-sigma",
        "0.05",
    ]);
    assert_eq!(report["start_sigma"], 0.05);
    assert!(
        stdout.contains("starting from right pictures noised to σ = 0.05"),
        "{stdout}"
    );
    // Barely noised, the pictures are the prompts' own, and the model only cleans them up.
    let adherence = report["rows"][0]["adherence"].as_f64().unwrap();
    assert!(adherence >= 0.9, "{report}");

    let output = flowline(&["eval", "--start-sigma", "0"]);
    assert_bad_input(&output, "not a noise level in (0, 1]");
}

#[test]
fn bench_times_the_default_workflow_with_the_changes_asked_for() {
    let output = flowline(&[
        "bench",
        "--repeats",
        "1",
        "--steps",
        "2",
        "--set",
        "model.family=shapes",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("model shapes loaded"), "{stdout}");
    assert!(stdout.contains("wall time"), "{stdout}");
    assert!(stdout.contains("Training step"), "{stdout}");

    // Any workflow file: its end-to-end time and a row per node that ran, nothing else.
    let output = flowline(&[
        "bench",
        DEFAULT,
        "--repeats",
        "1",
        "--set",
        "sampler.steps=2",
        "--set",
        "cfg.autoguide_scale=1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("default.json end to end"), "{stdout}");
    let row = |node: &str| {
        stdout
            .lines()
            .find(|line| line.starts_with(&format!("{node} ")))
    };
    for (node, type_name) in [
        ("model", "load_model"),
        ("sampler", "sampler"),
        ("save", "save_image"),
    ] {
        let line = row(node).unwrap_or_else(|| panic!("no row for {node}: {stdout}"));
        assert!(line.contains(type_name) && line.contains("MiB"), "{line}");
    }
    assert!(!stdout.contains("Training step"), "{stdout}");

    let output = flowline(&["bench", "--set", "model.size=9"]);
    assert_bad_input(&output, "has no parameter \"size\"");
}

#[test]
fn a_caption_classifier_trains_in_a_model_folder_resumes_and_guides_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let model = model.to_str().unwrap();
    let output = flowline(&[
        "train",
        "--out",
        model,
        "--preset",
        TINY_PRESET,
        "--steps",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let classifier = |extra: &[&str]| {
        let mut args = vec!["train-classifier", "--model", model, "--preset", "tiny"];
        args.extend_from_slice(extra);
        let output = flowline(&args);
        assert!(output.status.success(), "{}", stderr(&output));
        let file = Path::new(model).join("classifier.json");
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(file).unwrap()).unwrap()
    };
    let record = classifier(&["--steps", "100", "--batch", "8"]);
    assert_eq!(record["training"]["steps"], 100);
    let history = record["training"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "one entry per 100 steps: {record}");
    let record = classifier(&["--steps", "110", "--resume"]);
    assert_eq!(record["training"]["steps"], 110);
    assert_eq!(record["training"]["commands"].as_array().unwrap().len(), 2);

    let out = dir.path().join("out");
    let guided = flowline(&[
        "run",
        DEFAULT,
        "--out",
        out.to_str().unwrap(),
        "--set",
        &format!("model.path={model}"),
        "--set",
        "cfg.autoguide_scale=1",
        "--set",
        "cfg.classifier_scale=3",
        "--set",
        "sampler.steps=3",
    ]);
    assert!(guided.status.success(), "{}", stderr(&guided));
    assert!(out.join("flowline_00001.png").exists());

    let (report, stdout) = eval_report(
        &[
            QUICK_EVAL.as_slice(),
            &["--model", model, "--classifier-scale", "2"],
        ]
        .concat(),
    );
    assert_eq!(report["classifier_scale"], 2.0);
    assert_eq!(tallied(&report["rows"][0]), 3);
    assert!(
        stdout.contains(", classifier guidance at scale 2"),
        "{stdout}"
    );

    assert_bad_input(
        &flowline(&["train-classifier", "--model", "/nowhere/model"]),
        "/nowhere/model/config.json",
    );
    // The shipped model has no classifier: asking for its guidance is refused, not ignored.
    assert_bad_input(
        &flowline(&["eval", "--prompts", "1", "--classifier-scale", "2"]),
        "has none (train one with `flowline train-classifier`",
    );
    let refused = flowline(&[
        "run",
        DEFAULT,
        "--out",
        out.to_str().unwrap(),
        "--set",
        "cfg.classifier_scale=2",
    ]);
    assert_bad_input(&refused, "needs a caption classifier beside the model");
}

#[test]
fn reflow_copies_its_teacher_generates_couplings_then_trains_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher");
    let teacher = teacher.to_str().unwrap();
    let output = flowline(&[
        "train",
        "--out",
        teacher,
        "--preset",
        TINY_PRESET,
        "--steps",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let run = dir.path().join("run");
    let reflow = |couplings: &str, steps: &str| {
        flowline(&[
            "reflow",
            "--out",
            run.to_str().unwrap(),
            "--teacher",
            teacher,
            "--guide",
            teacher,
            "--couplings",
            couplings,
            "--batch",
            "2",
            "--steps",
            steps,
        ])
    };
    let output = reflow("4", "4");
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("reflow trained steps 2 to 4"), "{stdout}");
    let prompts: Vec<String> =
        serde_json::from_slice(&std::fs::read(run.join("couplings.json")).unwrap()).unwrap();
    assert_eq!(prompts.len(), 4);
    let history = std::fs::read_to_string(run.join("HISTORY.md")).unwrap();
    assert!(
        history.contains("reflow on 4 couplings: steps 2 to 4"),
        "{history}"
    );
    // A second session adds couplings, then trains on from where the first stopped.
    let output = reflow("6", "5");
    assert!(output.status.success(), "{}", stderr(&output));
    let prompts: Vec<String> =
        serde_json::from_slice(&std::fs::read(run.join("couplings.json")).unwrap()).unwrap();
    assert_eq!(prompts.len(), 6);
    let history = std::fs::read_to_string(run.join("HISTORY.md")).unwrap();
    assert!(
        history.contains("reflow on 6 couplings: steps 4 to 5"),
        "{history}"
    );
}
