//! The shapes model family: training, saving, loading through the Load Model node, and the
//! messages a user gets for broken model files. These tests train a tiny configuration in a
//! temporary folder; the shipped weights are tested in `shipped_model.rs`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use flowline_engine::executor::{Event, Executor, RunFailure};
use flowline_engine::flow::noise::gaussian;
use flowline_engine::model::{FlowModel, image_from_tensor};
use flowline_engine::nodes::context::RunEnv;
use flowline_engine::workflow::{DEFAULT_WORKFLOW, Workflow};
use flowline_shapes::config::WEIGHTS_FILE;
use flowline_shapes::dataset::{GRAMMAR, is_held_out};
use flowline_shapes::model::ShapesModel;
use flowline_shapes::reflow::{coupling_cases, generate};
use flowline_shapes::train::{
    CHECKPOINT_FILE, Growth, OPTIMIZER_FILE, TimeSampling, TrainSettings, Trainer,
};

/// The JSON file at `path`.
fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Trains the tiny configuration for `steps` steps and saves the run into `folder`.
fn train_tiny(folder: &Path, steps: usize) {
    let mut trainer = Trainer::new(TrainSettings::tiny(), &Device::Cpu).unwrap();
    for _ in 0..steps {
        trainer.train_step().unwrap();
    }
    trainer.save(folder, "test").unwrap();
}

fn mean(values: &[f32]) -> f32 {
    values.iter().sum::<f32>() / values.len() as f32
}

/// Trains a run of `settings` for 120 steps, checks that its loss fell by a fifth, and saves it
/// into `folder`.
fn train_until_the_loss_falls(settings: TrainSettings, folder: &Path) {
    let mut trainer = Trainer::new(settings, &Device::Cpu).unwrap();
    let losses: Vec<f32> = (0..120).map(|_| trainer.train_step().unwrap()).collect();
    let (first, last) = (mean(&losses[..20]), mean(&losses[100..]));
    assert!(last < 0.8 * first, "loss went from {first} to {last}");
    trainer.save(folder, "test").unwrap();
}

#[test]
fn a_few_training_steps_lower_the_loss() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    train_until_the_loss_falls(TrainSettings::tiny(), dir.path());
}

#[test]
fn posterior_mean_targets_lower_the_loss_and_setting_changes_are_recorded() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TrainSettings::tiny();
    settings.posterior_references = 4;
    train_until_the_loss_falls(settings, dir.path());

    let mut resumed = Trainer::resume(dir.path(), &Device::Cpu, Growth::default()).unwrap();
    assert_eq!(resumed.settings().posterior_references, 4);
    resumed.set_posterior_references(0);
    resumed.set_time_sampling(TimeSampling::Uniform);
    resumed.set_loss_balance(1.0);
    resumed.set_ema_decay(0.9995).unwrap();
    assert!(resumed.set_ema_decay(1.0).is_err());
    assert!(resumed.train_step().unwrap().is_finite());
    resumed.save(dir.path(), "test").unwrap();
    let config = read_json(&dir.path().join("config.json"));
    let notes = config["training"]["notes"].to_string();
    for change in [
        "from step 120: posterior_references 0 (was 4)",
        "from step 120: time_sampling uniform (was logit_normal)",
        "from step 120: loss_balance 1 (was 0)",
        "from step 120: ema_decay 0.9995 (was 0.999)",
    ] {
        assert!(notes.contains(change), "{notes}");
    }
}

#[test]
fn a_balanced_loss_lowers_the_loss_and_keeps_its_band_means_across_a_resume() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TrainSettings::tiny();
    settings.loss_balance = 1.0;
    train_until_the_loss_falls(settings, dir.path());

    let band_means = |folder: &Path| {
        read_json(&folder.join("checkpoint.json"))["loss_by_sigma"]["means"].clone()
    };
    let saved = band_means(dir.path());
    assert_eq!(saved.as_array().unwrap().len(), 20, "{saved}");
    let resumed = Trainer::resume(dir.path(), &Device::Cpu, Growth::default()).unwrap();
    assert_eq!(resumed.settings().loss_balance, 1.0);
    let again = tempfile::tempdir().unwrap();
    resumed.save(again.path(), "test").unwrap();
    assert_eq!(band_means(again.path()), saved);
}

#[test]
fn a_channel_weighted_loss_lowers_the_loss_and_is_kept_across_a_resume() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TrainSettings::tiny();
    settings.channel_loss_power = 0.5;
    train_until_the_loss_falls(settings, dir.path());

    let mut resumed = Trainer::resume(dir.path(), &Device::Cpu, Growth::default()).unwrap();
    assert_eq!(resumed.settings().channel_loss_power, 0.5);
    resumed.set_channel_loss_power(1.0).unwrap();
    assert!(resumed.train_step().unwrap().is_finite());
    resumed.save(dir.path(), "test").unwrap();
    let notes = read_json(&dir.path().join("config.json"))["training"]["notes"].to_string();
    assert!(
        notes.contains("from step 120: channel_loss_power 1 (was 0.5)"),
        "{notes}"
    );
}

#[test]
fn training_resumes_where_it_stopped() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), 3);
    let mut resumed = Trainer::resume(dir.path(), &Device::Cpu, Growth::default()).unwrap();
    assert_eq!(resumed.step_count(), 3);
    // The averaged weights come back from the model file; the checkpoint holds no copy.
    let again = tempfile::tempdir().unwrap();
    resumed.save(again.path(), "test").unwrap();
    let read = |p: &Path| std::fs::read(p.join(WEIGHTS_FILE)).unwrap();
    assert!(read(dir.path()) == read(again.path()));
    let checkpoint =
        candle_core::safetensors::load(dir.path().join(CHECKPOINT_FILE), &Device::Cpu).unwrap();
    assert!(checkpoint.keys().all(|name| !name.starts_with("ema.")));
    resumed.train_step().unwrap();
    assert_eq!(resumed.step_count(), 4);
    let config = read_json(&dir.path().join("config.json"));
    assert_eq!(config["training"]["steps"], 3);
    assert_eq!(config["training"]["command"], "test");
}

#[test]
fn a_resumed_run_trains_the_same_weights_as_one_never_stopped() {
    let (whole, halves) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_tiny(whole.path(), 4);
    train_tiny(halves.path(), 2);
    let mut resumed = Trainer::resume(halves.path(), &Device::Cpu, Growth::default()).unwrap();
    for _ in 0..2 {
        resumed.train_step().unwrap();
    }
    resumed.save(halves.path(), "test").unwrap();
    for file in [CHECKPOINT_FILE, WEIGHTS_FILE, OPTIMIZER_FILE] {
        let read = |folder: &Path| std::fs::read(folder.join(file)).unwrap();
        assert!(
            read(whole.path()) == read(halves.path()),
            "{file} differs after a stop and resume"
        );
    }
}

/// A copy of the run in `from`, as `flowline reflow` starts one from its teacher.
fn copy_run(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn a_reflow_run_trains_on_the_teachers_couplings_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let teacher_dir = dir.path().join("teacher");
    train_tiny(&teacher_dir, 2);
    let teacher: Arc<dyn FlowModel> =
        Arc::new(ShapesModel::load(&teacher_dir, &Device::Cpu).unwrap());
    let cases = coupling_cases(0, 6);
    assert!(cases.iter().all(|case| !is_held_out(&case.caption)));
    let couplings = generate(&teacher, &teacher, &cases, 3).unwrap();
    assert_eq!(couplings.len(), 6);
    let expected_noise = gaussian(
        cases[4].seed,
        couplings.noise.dims()[1..].to_vec(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        couplings
            .noise
            .narrow(0, 4, 1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap(),
        expected_noise.to_vec3::<f32>().unwrap()
    );
    assert_eq!(couplings.prompts[4], cases[4].caption.text());

    let (whole, halves) = (dir.path().join("whole"), dir.path().join("halves"));
    for run in [&whole, &halves] {
        copy_run(&teacher_dir, run);
        couplings.write(run).unwrap();
    }
    let mut trainer = Trainer::resume(&whole, &Device::Cpu, Growth::default()).unwrap();
    trainer.set_couplings(couplings.clone()).unwrap();
    for _ in 0..4 {
        assert!(trainer.train_step().unwrap().is_finite());
    }
    trainer.save(&whole, "test").unwrap();
    let mut trainer = Trainer::resume(&halves, &Device::Cpu, Growth::default()).unwrap();
    trainer.set_couplings(couplings).unwrap();
    for _ in 0..2 {
        trainer.train_step().unwrap();
    }
    trainer.save(&halves, "test").unwrap();
    // The couplings come back from the run's folder.
    let mut resumed = Trainer::resume(&halves, &Device::Cpu, Growth::default()).unwrap();
    for _ in 0..2 {
        resumed.train_step().unwrap();
    }
    resumed.save(&halves, "test").unwrap();
    for file in [CHECKPOINT_FILE, WEIGHTS_FILE, OPTIMIZER_FILE] {
        let read = |folder: &Path| std::fs::read(folder.join(file)).unwrap();
        assert!(
            read(&whole) == read(&halves),
            "{file} differs after a stop and resume"
        );
    }
}

#[test]
fn a_preset_moves_a_resumed_run_and_grows_its_network() {
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), 2);
    let mut preset = TrainSettings::tiny();
    preset.learning_rate = 1e-3;
    preset.posterior_references = 3;
    preset.network.depth += 1;
    preset.network.conv_head_features = true;
    let mut resumed = Trainer::resume_toward(dir.path(), &Device::Cpu, Some(&preset)).unwrap();
    assert_eq!(resumed.settings(), &preset);
    resumed.train_step().unwrap();
    resumed.save(dir.path(), "test").unwrap();
    let notes = read_json(&dir.path().join("config.json"))["training"]["notes"].clone();
    for change in [
        "from step 2: learning_rate 0.001 (was 0.002)",
        "from step 2: posterior_references 3 (was 0)",
        "from step 2: depth 2 (was 1)",
        "from step 2: conv_head_features true (was false)",
    ] {
        assert!(
            notes.as_array().unwrap().iter().any(|n| n == change),
            "{change} missing from {notes}"
        );
    }

    let refused = |change: fn(&mut TrainSettings)| {
        let mut changed = preset.clone();
        change(&mut changed);
        match Trainer::resume_toward(dir.path(), &Device::Cpu, Some(&changed)) {
            Ok(_) => panic!("a preset that cannot apply to the run was taken"),
            Err(e) => format!("{e:#}"),
        }
    };
    let wider = refused(|p| p.network.hidden = 64);
    assert!(
        wider.contains("network.hidden cannot change from 32 to 64"),
        "{wider}"
    );
    let shallower = refused(|p| p.network.depth = 1);
    assert!(
        shallower.contains("its DiT already has 2 blocks (asked for 1)"),
        "{shallower}"
    );
    let reseeded = refused(|p| p.seed = 8);
    assert!(
        reseeded.contains("seed is fixed when a run starts"),
        "{reseeded}"
    );
}

/// The largest difference between the velocities the model saved in `folder` gives before
/// and after `grow` (which resumes the run there, grows it and saves it again).
fn change_from_growth(folder: &Path, grow: impl FnOnce() -> Trainer) -> (f32, Trainer) {
    let x = Tensor::randn(0f32, 1.0, (1, 16, 16, 16), &Device::Cpu).unwrap();
    let velocity = || {
        let model = ShapesModel::load(folder, &Device::Cpu).unwrap();
        let cond = model.encode_prompt("a red star").unwrap();
        model.velocity(&x, 0.7, &cond).unwrap()
    };
    let before = velocity();
    let grown = grow();
    grown.save(folder, "test").unwrap();
    let change = (&velocity() - &before)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap();
    (change, grown)
}

#[test]
fn parts_added_to_a_run_start_as_the_identity_and_train() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TrainSettings::tiny();
    settings.network.conv_head = 0;
    let mut trainer = Trainer::new(settings, &Device::Cpu).unwrap();
    for _ in 0..3 {
        trainer.train_step().unwrap();
    }
    trainer.save(dir.path(), "test").unwrap();
    let resume = |growth: Growth| Trainer::resume(dir.path(), &Device::Cpu, growth);

    let head = Growth {
        conv_head: Some(4),
        ..Growth::default()
    };
    let (change, mut resumed) = change_from_growth(dir.path(), || resume(head).unwrap());
    assert!(
        change < 1e-5,
        "the added head changed the output by {change}"
    );
    assert_eq!(resumed.settings().network.conv_head, 4);
    assert!(resumed.train_step().unwrap().is_finite());
    resumed.save(dir.path(), "test").unwrap();

    let scales = Growth {
        conv_head_scales: Some(3),
        ..Growth::default()
    };
    let (change, mut resumed) = change_from_growth(dir.path(), || resume(scales).unwrap());
    assert!(
        change < 1e-5,
        "the added scales changed the output by {change}"
    );
    assert_eq!(resumed.settings().network.conv_head_scales, 3);
    let first = resumed.train_step().unwrap();
    assert!(first.is_finite());
    resumed.save(dir.path(), "test").unwrap();

    let blocks = Growth {
        conv_head_blocks: Some(4),
        ..Growth::default()
    };
    let (change, mut resumed) = change_from_growth(dir.path(), || resume(blocks).unwrap());
    assert!(
        change < 1e-5,
        "the added head blocks changed the output by {change}"
    );
    assert_eq!(resumed.settings().network.conv_head_blocks, 4);
    assert!(resumed.train_step().unwrap().is_finite());
    resumed.save(dir.path(), "test").unwrap();

    let features = Growth {
        conv_head_features: true,
        ..Growth::default()
    };
    let (change, mut resumed) = change_from_growth(dir.path(), || resume(features).unwrap());
    assert!(
        change < 1e-5,
        "the DiT's features given to the head changed the output by {change}"
    );
    assert!(resumed.settings().network.conv_head_features);
    assert!(resumed.train_step().unwrap().is_finite());
    resumed.save(dir.path(), "test").unwrap();

    let depth = resumed.settings().network.depth;
    let deeper = Growth {
        depth: Some(depth + 2),
        ..Growth::default()
    };
    let (change, mut resumed) = change_from_growth(dir.path(), || resume(deeper).unwrap());
    assert!(
        change < 1e-5,
        "the added blocks changed the output by {change}"
    );
    assert_eq!(resumed.settings().network.depth, depth + 2);
    assert!(resumed.train_step().unwrap().is_finite());
    resumed.save(dir.path(), "test").unwrap();

    let config = read_json(&dir.path().join("config.json"));
    assert_eq!(config["network"]["conv_head"], 4);
    assert_eq!(config["network"]["conv_head_scales"], 3);
    assert_eq!(config["network"]["conv_head_blocks"], 4);
    assert_eq!(config["network"]["conv_head_features"], true);
    assert_eq!(config["network"]["depth"], depth + 2);
    let notes = config["training"]["notes"].to_string();
    assert!(notes.contains("conv_head 4 (was 0)"), "{notes}");
    assert!(notes.contains("conv_head_scales 3 (was 1)"), "{notes}");
    assert!(notes.contains("conv_head_blocks 4 (was 2)"), "{notes}");
    assert!(
        notes.contains("conv_head_features true (was false)"),
        "{notes}"
    );
    let depth_note = format!("depth {} (was {depth})", depth + 2);
    assert!(notes.contains(&depth_note), "{notes}");
    for (growth, expected) in [
        (head, "already has a convolutional head"),
        (
            Growth {
                conv_head_scales: Some(2),
                ..Growth::default()
            },
            "already works at 3 scales",
        ),
        (
            Growth {
                conv_head_blocks: Some(3),
                ..Growth::default()
            },
            "already has 4 blocks",
        ),
        (features, "already gets the DiT's features"),
        (
            Growth {
                depth: Some(depth),
                ..Growth::default()
            },
            "DiT already has",
        ),
    ] {
        let message = format!("{:#}", resume(growth).err().unwrap());
        assert!(message.contains(expected), "{message}");
    }
}

#[test]
fn the_same_seed_trains_the_same_weights() {
    flowline::install_model_families();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_tiny(a.path(), 2);
    train_tiny(b.path(), 2);
    let read = |p: &Path| std::fs::read(p.join(WEIGHTS_FILE)).unwrap();
    assert!(
        read(a.path()) == read(b.path()),
        "weights differ between identical runs"
    );
}

/// Runs the default workflow on the shapes model in `model` (without the shipped model's
/// autoguidance) with `assignments`, writing into `out`; returns every event of the run.
fn run_default_workflow(model: &Path, out: &Path, assignments: &[&str]) -> Vec<Event> {
    let mut workflow = Workflow::from_json(DEFAULT_WORKFLOW, "default").unwrap();
    workflow.apply_assignment("cfg.autoguide_scale=1").unwrap();
    workflow
        .apply_assignment(&format!("model.path={}", model.display()))
        .unwrap();
    for assignment in assignments {
        workflow.apply_assignment(assignment).unwrap();
    }
    let mut executor = Executor::spawn();
    let env = RunEnv {
        output_dir: out.to_path_buf(),
        workflow_json: None,
    };
    executor.run(workflow.graph, env);
    let mut events = Vec::new();
    loop {
        let event = executor
            .events()
            .recv_timeout(Duration::from_secs(120))
            .unwrap();
        let done = event.is_terminal();
        events.push(event);
        if done {
            return events;
        }
    }
}

#[test]
fn a_trained_folder_runs_through_the_default_workflow() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), 2);
    let assignments = ["sampler.steps=3", "prompt.text=a red star, thanks"];
    let events = run_default_workflow(dir.path(), dir.path(), &assignments);
    assert!(
        matches!(events.last(), Some(Event::RunFinished { .. })),
        "{events:?}"
    );
    let previews: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step { step, .. } => {
                Some(step.preview.to_rgb(&step.record.x).unwrap().dimensions())
            }
            _ => None,
        })
        .collect();
    assert_eq!(previews, [(16, 16); 3]);
    let warnings: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Warning { message, .. } => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(warnings, ["unknown words ignored: thanks"]);
    assert!(dir.path().join("flowline_00001.png").exists());
}

fn load_error(folder: &Path) -> String {
    match ShapesModel::load(folder, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", folder.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn broken_model_files_are_named() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    assert!(
        load_error(&missing).contains("nothing-here/config.json"),
        "{}",
        load_error(&missing)
    );

    train_tiny(dir.path(), 1);
    let weights = dir.path().join(WEIGHTS_FILE);
    let original = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();

    std::fs::write(&weights, b"not a safetensors file").unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("cannot read model weights") && err.contains(WEIGHTS_FILE),
        "{err}"
    );

    let mut without: HashMap<String, Tensor> = original.clone();
    without.remove("velocity.final_out.weight");
    candle_core::safetensors::save(&without, &weights).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("velocity.final_out.weight"), "{err}");

    let mut misshapen = original.clone();
    misshapen.insert(
        "autoencoder.encoder".into(),
        Tensor::zeros((48, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&misshapen, &weights).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("autoencoder.encoder has shape [48, 3], expected [48, 16]"),
        "{err}"
    );

    let mut narrow = original;
    narrow.insert(
        "velocity.time_out.weight".into(),
        Tensor::zeros((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&narrow, &weights).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("velocity.time_out.weight"), "{err}");

    // A network part this version does not know (from a newer Flowline) is refused, not
    // skipped: the model would otherwise run without it.
    let config_path = dir.path().join("config.json");
    let mut config = read_json(&config_path);
    config["network"]["attention_pooling"] = serde_json::json!(true);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("config.json is broken") && err.contains("unknown field `attention_pooling`"),
        "{err}"
    );
}

#[test]
fn a_bad_model_path_fails_the_load_node_as_bad_input() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let events = run_default_workflow(Path::new("/no/such/model"), dir.path(), &[]);
    let Some(Event::RunFailed {
        failure:
            RunFailure::Node {
                node,
                message,
                bad_input,
            },
        ..
    }) = events.last()
    else {
        panic!("{events:?}")
    };
    assert_eq!(node, "model");
    assert!(*bad_input);
    assert!(message.contains("/no/such/model/config.json"), "{message}");
}

/// Mean absolute error, in 1/255, of a held-out picture encoded and decoded by the model in
/// `folder`.
fn round_trip_error(folder: &Path) -> f64 {
    let model = ShapesModel::load(folder, &Device::Cpu).unwrap();
    let picture = flowline_shapes::dataset::sample(5, 0).image;
    let latent = model
        .encode_image(&flowline_engine::model::tensor_from_image(&picture).unwrap())
        .unwrap();
    assert_eq!(latent.dims(), [1, 16, 16, 16]);
    let back = image_from_tensor(&model.decode(&latent).unwrap()).unwrap();
    back.as_raw()
        .iter()
        .zip(picture.as_raw())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / picture.as_raw().len() as f64
}

#[test]
fn decoding_an_encoded_picture_gives_it_back() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), 1);
    let error = round_trip_error(dir.path());
    assert!(error < 4.0, "mean absolute error {error}/255");
}

#[test]
fn a_whitened_run_keeps_its_latent_space_when_saved_loaded_and_resumed() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = TrainSettings::tiny();
    settings.latent_whitening = 1.0;
    let mut trainer = Trainer::new(settings, &Device::Cpu).unwrap();
    assert!(trainer.train_step().unwrap().is_finite());
    trainer.save(dir.path(), "test").unwrap();
    let config_path = dir.path().join("config.json");
    let read_config = || read_json(&config_path);
    let scales = read_config()["autoencoder"]["channel_scales"].clone();
    let values = scales.as_array().expect("channel scales are stored");
    assert_eq!(values.len(), 16);
    assert!(
        values.first().unwrap().as_f64() < values.last().unwrap().as_f64(),
        "the faint last channel is scaled up more than the first: {scales}"
    );
    let error = round_trip_error(dir.path());
    assert!(error < 4.0, "mean absolute error {error}/255");

    let resumed = Trainer::resume(dir.path(), &Device::Cpu, Growth::default()).unwrap();
    assert_eq!(resumed.settings().latent_whitening, 1.0);
    resumed.save(dir.path(), "test").unwrap();
    assert_eq!(read_config()["autoencoder"]["channel_scales"], scales);

    let mut config = read_config();
    config["autoencoder"]["channel_scales"] = serde_json::json!([1.0, 2.0, 3.0]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("autoencoder.channel_scales has 3 entries, expected 16"),
        "{err}"
    );
}

#[test]
fn prompts_outside_the_caption_grammar_are_warned_about() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), 1);
    let model = ShapesModel::load(dir.path(), &Device::Cpu).unwrap();
    let warnings = |text: &str| model.encode_prompt(text).unwrap().warnings;

    let no_color = warnings("a cross in the top right");
    assert_eq!(no_color.len(), 1, "{no_color:?}");
    assert!(
        no_color[0].contains("names no color") && no_color[0].contains(GRAMMAR),
        "{no_color:?}"
    );
    let two_shapes = warnings("a red star and a blue heart");
    assert!(
        two_shapes.iter().any(|w| w.contains("more than one color")),
        "{two_shapes:?}"
    );
    assert!(warnings("A large red star, in the top left!").is_empty());
    assert!(
        warnings("").is_empty(),
        "the empty prompt is the unconditional one"
    );
}

#[test]
fn prompts_evaluated_as_one_batch_give_each_prompts_own_velocity() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), 3);
    let model = ShapesModel::load(dir.path(), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (2, 16, 16, 16), &Device::Cpu).unwrap();
    let star = model.encode_prompt("a red star").unwrap();
    let unconditional = model.encode_prompt("").unwrap();
    let together = model.velocities(&x, 0.6, &[&star, &unconditional]).unwrap();
    assert_eq!(together.len(), 2);
    for (batched, cond) in together.iter().zip([&star, &unconditional]) {
        let alone = model.velocity(&x, 0.6, cond).unwrap();
        let difference = (batched - &alone)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap();
        assert!(difference < 1e-5, "{} differs by {difference}", cond.prompt);
    }
    let apart = (&together[0] - &together[1])
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap();
    assert!(apart > 1e-4, "the two prompts gave the same velocity");
}

/// Reflow's teacher runs as the default workflow does: its guidance and sampling settings are
/// the default workflow's (stored there, or the nodes' defaults).
#[test]
fn the_reflow_teacher_samples_as_the_default_workflow_does() {
    use flowline_engine::graph::ParamValue;
    use flowline_shapes::reflow::{
        TEACHER_AUTOGUIDE_SCALE, TEACHER_GUIDANCE, TEACHER_SHIFT, TEACHER_STEPS,
    };
    flowline::install_model_families();
    let workflow = Workflow::from_json(DEFAULT_WORKFLOW, "default").unwrap();
    let value = |node: &str, param: &str| {
        let stored = workflow
            .graph
            .node(node)
            .unwrap()
            .params
            .get(param)
            .cloned();
        let type_name = &workflow.graph.node(node).unwrap().type_name;
        let spec = &flowline_engine::nodes::find(type_name).unwrap().spec;
        stored.unwrap_or_else(|| spec.param(param).unwrap().default.clone())
    };
    let number = |node: &str, param: &str| match value(node, param) {
        ParamValue::Float(x) => x,
        ParamValue::Int(n) => n as f64,
        other => panic!("{node}.{param} is {other}"),
    };
    let guidance = TEACHER_GUIDANCE;
    assert_eq!(number("cfg", "scale"), guidance.scale);
    assert_eq!(
        value("cfg", "method"),
        ParamValue::Text(guidance.method.name().into())
    );
    assert_eq!(
        number("cfg", "rescale_multiplier"),
        guidance.rescale_multiplier
    );
    assert_eq!(
        number("cfg", "apg_parallel_scale"),
        guidance.apg_parallel_scale
    );
    assert_eq!(
        number("cfg", "apg_norm_threshold"),
        guidance.apg_norm_threshold
    );
    assert_eq!(
        (
            number("cfg", "interval_low"),
            number("cfg", "interval_high")
        ),
        guidance.interval
    );
    assert_eq!(number("cfg", "autoguide_scale"), TEACHER_AUTOGUIDE_SCALE);
    assert_eq!(number("sampler", "steps"), TEACHER_STEPS as f64);
    assert_eq!(
        value("sampler", "sampler"),
        ParamValue::Text("euler".into())
    );
    assert_eq!(
        value("sampler", "scheduler"),
        ParamValue::Text("shifted".into())
    );
    assert_eq!(number("sampler", "shift"), TEACHER_SHIFT);
}
