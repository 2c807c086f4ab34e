//! ComfyUI workflows opened as Flowline workflows: both of ComfyUI's JSON formats and its
//! PNGs, the node types Flowline maps, the model files found in a ComfyUI models folder, and
//! the errors for what cannot be mapped.
//!
//! The workflows in `tests/data/comfyui/` were written for these tests in ComfyUI's formats:
//! `flux-dev.json` as its editor saves (with a note and a reroute), the others as "Export
//! (API)" writes. Model files are stand-ins: safetensors holding the one tensor name by which
//! Flowline tells what a file is (the end-to-end run with real tensor layouts is in
//! `real_families.rs`).

use std::collections::{BTreeSet, HashMap};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use flowline_engine::graph::ParamValue;
use flowline_engine::validate::validate;
use flowline_engine::workflow::Workflow;
use flowline_models::comfyui::{Opened, open_workflow};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/comfyui");

/// Tensor names by which Flowline recognises a file's contents.
const FLUX_DEV_TENSOR: &str = "guidance_in.in_layer.weight";
const SD35_MEDIUM_TENSOR: &str = "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight";
const CLIP_TENSOR: &str = "text_model.embeddings.token_embedding.weight";
const T5_TENSOR: &str = "encoder.block.0.layer.0.SelfAttention.q.weight";
const AUTOENCODER_TENSOR: &str = "decoder.conv_in.weight";

fn data(name: &str) -> PathBuf {
    Path::new(DATA).join(name)
}

/// A safetensors file holding one tiny tensor named `tensor`.
fn stand_in(path: &Path, tensor: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let zeros = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([(tensor.to_string(), zeros)]), path).unwrap();
}

/// A ComfyUI `models/` folder with FLUX.1 [dev]'s files where ComfyUI keeps them.
fn flux_models(models: &Path) {
    stand_in(&models.join("unet/flux1-dev.safetensors"), FLUX_DEV_TENSOR);
    stand_in(&models.join("clip/clip_l.safetensors"), CLIP_TENSOR);
    stand_in(
        &models.join("text_encoders/t5xxl_fp16.safetensors"),
        T5_TENSOR,
    );
    stand_in(&models.join("vae/ae.safetensors"), AUTOENCODER_TENSOR);
}

fn open(path: &Path, models: Option<&Path>) -> Opened {
    open_workflow(path, models).unwrap_or_else(|e| panic!("{e}"))
}

fn import_error(path: &Path) -> String {
    match open_workflow(path, None) {
        Ok(opened) => panic!("imported: {}", opened.workflow.to_json()),
        Err(e) => e.to_string(),
    }
}

fn param(workflow: &Workflow, node: &str, name: &str) -> ParamValue {
    let node_data = workflow
        .graph
        .node(node)
        .unwrap_or_else(|| panic!("no node {node}: {}", workflow.to_json()));
    node_data
        .params
        .get(name)
        .unwrap_or_else(|| panic!("{node} has no {name}: {:?}", node_data.params))
        .clone()
}

fn text(value: &str) -> ParamValue {
    ParamValue::Text(value.to_string())
}

fn path_text(path: &Path) -> ParamValue {
    text(&path.display().to_string())
}

/// The node types by id.
fn types(workflow: &Workflow) -> Vec<(&str, &str)> {
    workflow
        .graph
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.type_name.as_str()))
        .collect()
}

/// The links as `node.port -> node.port`.
fn links(workflow: &Workflow) -> BTreeSet<String> {
    workflow
        .graph
        .links
        .iter()
        .map(|l| format!("{} -> {}", l.from, l.to))
        .collect()
}

fn expected_links(lines: &[&str]) -> BTreeSet<String> {
    lines.iter().map(|l| l.to_string()).collect()
}

fn assert_valid(workflow: &Workflow) {
    if let Err(problems) = validate(&workflow.graph) {
        panic!("{problems:?}\n{}", workflow.to_json());
    }
}

/// The API-format workflow `file` with input `name` of node `node` set to `value`, written in
/// `dir`.
/// LoRA loaders on the model's way become Load LoRA nodes in the same order, their files
/// looked for in `models/loras/`; LoraLoader's CLIP output passes the text encoders on, with
/// a warning where its CLIP strength would have changed them.
#[test]
fn lora_loaders_become_load_lora_nodes_between_the_model_and_the_sampler() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    flux_models(&models);
    stand_in(
        &models.join("loras/style.safetensors"),
        "lora_unet_img_in.alpha",
    );
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data("flux-sampler-custom-advanced-api.json")).unwrap(),
    )
    .unwrap();
    json["40"] = serde_json::json!({"class_type": "LoraLoader", "inputs": {
        "lora_name": "style.safetensors", "strength_model": 0.8, "strength_clip": 1.0,
        "model": ["12", 0], "clip": ["11", 0]}});
    json["41"] = serde_json::json!({"class_type": "LoraLoaderModelOnly", "inputs": {
        "lora_name": "detail.safetensors", "strength_model": 0.5, "model": ["40", 0]}});
    json["30"]["inputs"]["model"] = serde_json::json!(["41", 0]);
    json["6"]["inputs"]["clip"] = serde_json::json!(["40", 1]);
    let input = dir.path().join("loras-api.json");
    std::fs::write(&input, json.to_string()).unwrap();

    let opened = open(&input, Some(&models));
    let workflow = &opened.workflow;
    assert_eq!(
        param(workflow, "lora", "path"),
        path_text(&models.join("loras/style.safetensors"))
    );
    assert_eq!(param(workflow, "lora", "strength"), ParamValue::Float(0.8));
    assert_eq!(
        param(workflow, "lora_2", "path"),
        text("detail.safetensors")
    );
    assert_eq!(
        param(workflow, "lora_2", "strength"),
        ParamValue::Float(0.5)
    );
    let links = links(workflow);
    for expected in [
        "model.model -> lora.model",
        "lora.model -> lora_2.model",
        "lora_2.model -> cfg.model",
        "model.model -> prompt.model",
    ] {
        assert!(
            links.contains(expected),
            "{expected} missing from {links:?}"
        );
    }
    assert_eq!(opened.warnings.len(), 2, "{:?}", opened.warnings);
    assert!(opened.warnings[0].contains("node 41 (LoraLoaderModelOnly)"));
    assert!(opened.warnings[0].contains("lora_name detail.safetensors was not found"));
    assert!(opened.warnings[1].contains("node 40 (LoraLoader)"));
    assert!(
        opened.warnings[1].contains(
            "strength_clip is left out: Flowline adds a LoRA to the diffusion model only"
        )
    );
    assert_valid(workflow);
}

fn edited_api(dir: &Path, file: &str, node: &str, name: &str, value: serde_json::Value) -> PathBuf {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data(file)).unwrap()).unwrap();
    json[node]["inputs"][name] = value;
    let path = dir.join(format!("{node}-{name}.json"));
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

fn flowline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowline"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_flux_dev_workflow_from_comfyuis_editor_becomes_flowlines_graph() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("ComfyUI/models");
    flux_models(&models);
    let opened = open(&data("flux-dev.json"), Some(&models));
    assert!(opened.from_comfyui);
    assert_eq!(opened.warnings, Vec::<String>::new());
    let workflow = &opened.workflow;
    assert_eq!(
        types(workflow),
        [
            ("model", "load_model"),
            ("prompt", "encode_prompt"),
            ("negative", "encode_prompt"),
            ("cfg", "cfg"),
            ("start", "gaussian_start"),
            ("sampler", "sampler"),
            ("decode", "decode"),
            ("save", "save_image"),
        ],
        "the note is left out, the loaders fold into one node, the KSampler is CFG + Sampler"
    );
    assert_eq!(param(workflow, "model", "family"), text("flux-dev"));
    for (name, file) in [
        ("path", "unet/flux1-dev.safetensors"),
        ("clip_l", "clip/clip_l.safetensors"),
        ("t5", "text_encoders/t5xxl_fp16.safetensors"),
        ("vae", "vae/ae.safetensors"),
    ] {
        assert_eq!(
            param(workflow, "model", name),
            path_text(&models.join(file))
        );
    }
    assert_eq!(
        param(workflow, "prompt", "text"),
        text("a lighthouse on a rocky coast at sunset, warm light, detailed photograph")
    );
    assert_eq!(param(workflow, "negative", "text"), text(""));
    assert_eq!(param(workflow, "cfg", "scale"), ParamValue::Float(1.0));
    assert_eq!(
        param(workflow, "cfg", "distilled_guidance"),
        ParamValue::Float(3.5)
    );
    for (name, value) in [("seed", 42), ("width", 1024), ("height", 1024)] {
        assert_eq!(param(workflow, "start", name), ParamValue::Int(value));
    }
    assert_eq!(param(workflow, "sampler", "sampler"), text("euler"));
    assert_eq!(param(workflow, "sampler", "steps"), ParamValue::Int(20));
    assert_eq!(
        param(workflow, "sampler", "noise_seed"),
        ParamValue::Int(42)
    );
    // No ModelSamplingFlux: ComfyUI samples FLUX.1 [dev] at μ = 1.15 at every size.
    assert_eq!(param(workflow, "sampler", "scheduler"), text("flux"));
    assert_eq!(
        param(workflow, "sampler", "base_shift"),
        ParamValue::Float(1.15)
    );
    assert_eq!(
        param(workflow, "sampler", "max_shift"),
        ParamValue::Float(1.15)
    );
    assert_eq!(param(workflow, "save", "path"), text("flux-dev"));
    assert_eq!(
        links(workflow),
        expected_links(&[
            "model.model -> prompt.model",
            "model.model -> negative.model",
            "model.model -> cfg.model",
            "prompt.conditioning -> cfg.positive",
            "negative.conditioning -> cfg.negative",
            "model.model -> start.model",
            "cfg.guider -> sampler.guider",
            "start.latent -> sampler.latent",
            "model.model -> decode.model",
            "sampler.latent -> decode.latent",
            "decode.image -> save.image",
        ]),
        "the VAE reaches the decoder through the reroute"
    );
    let position = |id: &str| workflow.graph.node(id).unwrap().position;
    assert_eq!(
        position("sampler"),
        [860.0, 180.0],
        "ComfyUI's positions are kept"
    );
    assert_eq!(position("model"), [-320.0, 80.0]);
    assert_valid(workflow);
}

#[test]
fn an_sd35_workflow_in_the_api_format_converts_with_warnings_for_files_not_found() {
    flowline::install_model_families();
    let opened = open(&data("sd3.5-large-api.json"), None);
    let workflow = &opened.workflow;
    assert_eq!(
        param(workflow, "model", "family"),
        text("sd3.5-large"),
        "told by the TripleCLIPLoader and ModelSamplingSD3, and the file name"
    );
    for (name, file) in [
        ("path", "sd3.5_large.safetensors"),
        ("clip_l", "clip_l.safetensors"),
        ("clip_g", "clip_g.safetensors"),
        ("t5", "t5xxl_fp16.safetensors"),
    ] {
        assert_eq!(
            param(workflow, "model", name),
            text(file),
            "a file not found keeps its ComfyUI name"
        );
    }
    assert!(
        !workflow
            .graph
            .node("model")
            .unwrap()
            .params
            .contains_key("vae"),
        "the autoencoder comes from the checkpoint, as in ComfyUI"
    );
    for (node, file) in [
        ("4 (CheckpointLoaderSimple)", "sd3.5_large.safetensors"),
        ("11 (TripleCLIPLoader)", "clip_g.safetensors"),
    ] {
        assert!(
            opened
                .warnings
                .iter()
                .any(|w| w.contains(&format!("ComfyUI node {node}")) && w.contains(file)),
            "{:?}",
            opened.warnings
        );
    }
    assert_eq!(opened.warnings.len(), 4, "{:?}", opened.warnings);
    assert_eq!(
        param(workflow, "prompt", "text"),
        text("a lighthouse on a rocky coast at sunset")
    );
    assert_eq!(
        param(workflow, "negative", "text"),
        text("blurry, low quality")
    );
    assert_eq!(param(workflow, "cfg", "scale"), ParamValue::Float(4.5));
    assert_eq!(param(workflow, "sampler", "scheduler"), text("shifted"));
    assert_eq!(param(workflow, "sampler", "shift"), ParamValue::Float(3.0));
    assert_eq!(param(workflow, "sampler", "steps"), ParamValue::Int(28));
    assert_eq!(param(workflow, "start", "seed"), ParamValue::Int(7));
    assert!(links(workflow).contains("negative.conditioning -> cfg.negative"));
    let positions: BTreeSet<[u32; 2]> = workflow
        .graph
        .nodes
        .iter()
        .map(|n| n.position.map(|c| c as u32))
        .collect();
    assert_eq!(
        positions.len(),
        workflow.graph.nodes.len(),
        "a workflow without positions is laid out"
    );
    assert_valid(workflow);
}

#[test]
fn sampler_custom_advanced_takes_its_settings_from_the_nodes_that_feed_it() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    flux_models(&models);
    let opened = open(
        &data("flux-sampler-custom-advanced-api.json"),
        Some(&models),
    );
    assert_eq!(opened.warnings, Vec::<String>::new());
    let workflow = &opened.workflow;
    assert_eq!(
        types(workflow),
        [
            ("model", "load_model"),
            ("prompt", "encode_prompt"),
            ("cfg", "cfg"),
            ("start", "gaussian_start"),
            ("sampler", "sampler"),
            ("decode", "decode"),
            ("save", "save_image"),
        ],
        "RandomNoise, KSamplerSelect, BasicScheduler, FluxGuidance and ModelSamplingFlux \
         become parameters"
    );
    assert_eq!(
        param(workflow, "cfg", "scale"),
        ParamValue::Float(1.0),
        "BasicGuider"
    );
    assert_eq!(
        param(workflow, "cfg", "distilled_guidance"),
        ParamValue::Float(2.5),
        "FluxGuidance"
    );
    assert_eq!(
        param(workflow, "start", "seed"),
        ParamValue::Int(1234),
        "RandomNoise"
    );
    assert_eq!(param(workflow, "start", "height"), ParamValue::Int(768));
    assert_eq!(
        param(workflow, "sampler", "sampler"),
        text("heun"),
        "KSamplerSelect"
    );
    assert_eq!(
        param(workflow, "sampler", "steps"),
        ParamValue::Int(24),
        "BasicScheduler"
    );
    assert_eq!(param(workflow, "sampler", "scheduler"), text("flux"));
    assert_eq!(
        param(workflow, "sampler", "base_shift"),
        ParamValue::Float(0.5),
        "ModelSamplingFlux"
    );
    assert_eq!(
        param(workflow, "sampler", "max_shift"),
        ParamValue::Float(1.15)
    );
    assert_valid(workflow);
}

#[test]
fn an_image_to_image_workflow_starts_from_the_image_at_comfyuis_denoise() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let comfyui = dir.path().join("ComfyUI");
    let models = comfyui.join("models");
    stand_in(
        &models.join("checkpoints/sd3.5_medium.safetensors"),
        SD35_MEDIUM_TENSOR,
    );
    let image = comfyui.join("input/harbour.png");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    image::RgbImage::new(8, 8).save(&image).unwrap();
    let opened = open(&data("sd3.5-medium-img2img-api.json"), Some(&models));
    assert_eq!(opened.warnings, Vec::<String>::new());
    let workflow = &opened.workflow;
    assert_eq!(param(workflow, "model", "family"), text("sd3.5-medium"));
    assert_eq!(param(workflow, "image", "path"), path_text(&image));
    assert_eq!(
        workflow.graph.node("start").unwrap().type_name,
        "source_image_start"
    );
    // 20 steps at denoise 0.6 are the last 20 of 33, from t = 20/33, which SD3's shift of 3
    // puts at σ = 3t / (1 + 2t).
    let t = 20.0 / 33.0;
    let ParamValue::Float(strength) = param(workflow, "start", "strength") else {
        panic!("strength is not a number");
    };
    assert!(
        (strength - 3.0 * t / (1.0 + 2.0 * t)).abs() < 1e-12,
        "{strength}"
    );
    assert_eq!(param(workflow, "start", "seed"), ParamValue::Int(5));
    assert_eq!(param(workflow, "sampler", "sampler"), text("dpmpp_2m"));
    assert_eq!(param(workflow, "sampler", "steps"), ParamValue::Int(20));
    assert!(links(workflow).is_superset(&expected_links(&[
        "image.image -> start.image",
        "start.latent -> sampler.latent",
        "decode.image -> preview.image",
    ])));
    assert_valid(workflow);
}

/// A PNG as ComfyUI saves one: the workflow in tEXt chunks `prompt` (API format) and, where
/// given, `workflow` (the editor's format).
fn comfyui_png(path: &Path, prompt: &str, editor_workflow: Option<&str>) {
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(BufWriter::new(file), 2, 2);
    encoder.set_color(png::ColorType::Rgb);
    encoder
        .add_text_chunk("prompt".into(), prompt.into())
        .unwrap();
    if let Some(workflow) = editor_workflow {
        encoder
            .add_text_chunk("workflow".into(), workflow.into())
            .unwrap();
    }
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(&[128; 12]).unwrap();
    writer.finish().unwrap();
}

#[test]
fn a_comfyui_png_opens_from_its_editor_workflow_else_from_its_prompt() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let prompt = std::fs::read_to_string(data("sd3.5-large-api.json")).unwrap();
    let editor = std::fs::read_to_string(data("flux-dev.json")).unwrap();
    let both = dir.path().join("ComfyUI_00001_.png");
    comfyui_png(&both, &prompt, Some(&editor));
    let opened = open(&both, None);
    assert!(opened.from_comfyui);
    assert_eq!(param(&opened.workflow, "model", "family"), text("flux-dev"));
    assert_eq!(
        opened.workflow.graph.node("sampler").unwrap().position,
        [860.0, 180.0]
    );
    let prompt_only = dir.path().join("ComfyUI_00002_.png");
    comfyui_png(&prompt_only, &prompt, None);
    let opened = open(&prompt_only, None);
    assert_eq!(
        param(&opened.workflow, "model", "family"),
        text("sd3.5-large")
    );
    assert_valid(&opened.workflow);

    let plain = dir.path().join("plain.png");
    image::RgbImage::new(2, 2).save(&plain).unwrap();
    let error = import_error(&plain);
    assert!(error.contains("carries no workflow"), "{error}");
}

#[test]
fn flowline_files_open_as_they_are() {
    flowline::install_model_families();
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/workflows/default.json");
    let opened = open(&default, None);
    assert!(!opened.from_comfyui);
    assert_eq!(opened.workflow, Workflow::load(&default).unwrap());
    let png = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/default-workflow-seed-42.png");
    let opened = open(&png, None);
    assert!(!opened.from_comfyui);
    assert_eq!(opened.workflow, Workflow::from_png(&png).unwrap());
}

#[test]
fn a_node_flowline_cannot_map_is_named_and_the_import_exits_2() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("flux-dev.json")).unwrap()).unwrap();
    json["nodes"].as_array_mut().unwrap().push(serde_json::json!({
        "id": 50, "type": "UpscaleModelLoader", "pos": [0, 600], "mode": 0,
        "inputs": [], "outputs": [{"name": "UPSCALE_MODEL", "type": "UPSCALE_MODEL", "links": []}],
        "widgets_values": ["4x-UltraSharp.pth"]
    }));
    let input = dir.path().join("upscale.json");
    std::fs::write(&input, json.to_string()).unwrap();
    let error = import_error(&input);
    assert!(
        error.contains("ComfyUI node 50 (UpscaleModelLoader)"),
        "{error}"
    );
    assert!(error.contains("no Flowline counterpart"), "{error}");

    let output = dir.path().join("out.json");
    let result = flowline(&["import", input.to_str().unwrap(), output.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("node 50 (UpscaleModelLoader)"), "{stderr}");
    assert!(!output.exists(), "nothing is written");
    let result = flowline(&["run", input.to_str().unwrap()]);
    assert_eq!(result.status.code(), Some(2));
}

#[test]
fn samplers_and_schedulers_flowline_lacks_are_named_with_their_node() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let file = "sd3.5-large-api.json";
    let sampler = edited_api(dir.path(), file, "3", "sampler_name", "dpmpp_2m_sde".into());
    let error = import_error(&sampler);
    assert!(error.contains("ComfyUI node 3 (KSampler)"), "{error}");
    assert!(error.contains("\"dpmpp_2m_sde\""), "{error}");
    let scheduler = edited_api(dir.path(), file, "3", "scheduler", "karras".into());
    let error = import_error(&scheduler);
    assert!(error.contains("ComfyUI node 3 (KSampler)"), "{error}");
    assert!(error.contains("\"karras\""), "{error}");
    let custom = "flux-sampler-custom-advanced-api.json";
    let scheduler = edited_api(dir.path(), custom, "17", "scheduler", "beta".into());
    let error = import_error(&scheduler);
    assert!(
        error.contains("ComfyUI node 17 (BasicScheduler)"),
        "{error}"
    );
    let clip_type = edited_api(dir.path(), custom, "11", "type", "sdxl".into());
    let error = import_error(&clip_type);
    assert!(
        error.contains("ComfyUI node 11 (DualCLIPLoader)"),
        "{error}"
    );
    assert!(error.contains("\"sdxl\""), "{error}");
}

#[test]
fn the_import_command_writes_a_flowline_workflow_and_prints_its_warnings() {
    flowline::install_model_families();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    flux_models(&models);
    std::fs::remove_file(models.join("vae/ae.safetensors")).unwrap();
    let output = dir.path().join("converted/flux-dev.json");
    let result = flowline(&[
        "import",
        data("flux-dev.json").to_str().unwrap(),
        output.to_str().unwrap(),
        "--models",
        models.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&result.stdout).trim(),
        output.display().to_string()
    );
    assert!(
        stderr.contains(
            "warning: ComfyUI node 12 (VAELoader): vae_name ae.safetensors was not found"
        ),
        "{stderr}"
    );
    let written = Workflow::load(&output).unwrap();
    assert_eq!(param(&written, "model", "vae"), text("ae.safetensors"));
    assert_eq!(
        param(&written, "model", "path"),
        path_text(&models.join("unet/flux1-dev.safetensors"))
    );
}
