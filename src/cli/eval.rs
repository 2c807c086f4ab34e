//! `flowline eval`: measures prompt adherence on held-out prompts and prints a table.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use flowline_engine::error::InputError;
use flowline_engine::files::{save_png, write_atomic};
use flowline_engine::flow::guidance::{Guidance, GuidanceMethod};
use flowline_engine::flow::sampler::SamplerKind;
use flowline_engine::flow::schedule::Scheduler;
use flowline_engine::model::{LoadRequest, family};
use flowline_shapes::eval::{EvalSettings, Row, WeakGuide, evaluate, held_out_cases};
use image::RgbImage;

use super::{EXIT_BAD_INPUT, EXIT_FAILURE, fail};

#[derive(Args)]
pub struct EvalArgs {
    /// Model family to evaluate.
    #[arg(long, default_value = "shapes")]
    family: String,
    /// Model folder (default: the family's built-in weights).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Number of held-out prompts.
    #[arg(long, default_value_t = 200)]
    prompts: usize,
    /// Samplers to compare.
    #[arg(long, value_delimiter = ',', default_value = "euler,heun")]
    samplers: Vec<String>,
    /// Step counts to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    steps: Vec<usize>,
    /// CFG scale (1 = no guidance).
    #[arg(long, default_value_t = 3.0)]
    cfg: f64,
    /// How guidance combines the predictions: cfg, rescale, cfg_zero_star or apg (the CFG
    /// node's other settings at their defaults).
    #[arg(long, default_value = "cfg")]
    guidance: String,
    /// Guides only for σ in LOW,HIGH (the CFG node's interval).
    #[arg(long, default_value = "0,1", value_name = "LOW,HIGH", value_parser = parse_interval)]
    guidance_interval: (f64, f64),
    /// Shift of the shifted scheduler.
    #[arg(long, default_value_t = 3.0)]
    shift: f64,
    /// Start each image from a right picture of its prompt noised to this σ (as a source-image
    /// start does) instead of from pure noise (1): the share of shapes kept from each σ shows
    /// where a model stops drawing them from the words alone.
    #[arg(long, default_value_t = 1.0, value_parser = parse_sigma)]
    start_sigma: f64,
    /// The euler_ancestral sampler's η: the share of each step redrawn as fresh noise (the
    /// Sampler node's eta).
    #[arg(long, default_value_t = 1.0, value_parser = parse_eta)]
    eta: f64,
    /// A weaker version of the model (an earlier checkpoint of its run, say) to autoguide it
    /// with (the CFG node's guide_model input).
    #[arg(long, value_name = "DIR")]
    autoguide_model: Option<PathBuf>,
    /// Autoguidance scale (1 = off).
    #[arg(long, default_value_t = 2.0)]
    autoguide_scale: f64,
    /// Classifier guidance scale by the model's own caption classifier (the CFG node's
    /// classifier_scale; 0 = off).
    #[arg(long, default_value_t = 0.0)]
    classifier_scale: f64,
    /// Images generated at once.
    #[arg(long, default_value_t = 25)]
    batch: usize,
    /// Writes the table as JSON, with every case's verdict.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Saves every image in this folder, one subfolder per sampler and step count, each named
    /// by its case number, its verdict (`ok`, or what is wrong) and its prompt, so the misses can
    /// be looked at.
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
}

/// `LOW,HIGH`, two noise levels in [0, 1] with LOW ≤ HIGH.
fn parse_interval(text: &str) -> Result<(f64, f64), String> {
    let bounds = text
        .split(',')
        .map(|part| part.trim().parse::<f64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{text:?} is not LOW,HIGH: {e}"))?;
    match bounds[..] {
        [low, high] if (0.0..=high).contains(&low) && high <= 1.0 => Ok((low, high)),
        _ => Err(format!("{text:?} is not LOW,HIGH with 0 ≤ LOW ≤ HIGH ≤ 1")),
    }
}

/// A noise level in (0, 1].
fn parse_sigma(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(sigma) if sigma > 0.0 && sigma <= 1.0 => Ok(sigma),
        Ok(_) => Err(format!("{text:?} is not a noise level in (0, 1]")),
        Err(e) => Err(format!("{text:?} is not a number: {e}")),
    }
}

fn parse_eta(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(eta) if (0.0..=1.0).contains(&eta) => Ok(eta),
        Ok(_) => Err(format!("{text:?} is not an η in [0, 1]")),
        Err(e) => Err(format!("{text:?} is not a number: {e}")),
    }
}

pub fn eval(args: EvalArgs) -> ExitCode {
    let Some(family) = family(&args.family) else {
        return fail(
            EXIT_BAD_INPUT,
            format!("unknown model family {:?}", args.family),
        );
    };
    let mut samplers = Vec::new();
    for name in &args.samplers {
        match SamplerKind::from_name(name) {
            Some(kind) => samplers.push(kind),
            None => return fail(EXIT_BAD_INPUT, format!("unknown sampler {name:?}")),
        }
    }
    let Some(method) = GuidanceMethod::from_name(&args.guidance) else {
        return fail(
            EXIT_BAD_INPUT,
            format!(
                "unknown guidance {:?} (known: {})",
                args.guidance,
                GuidanceMethod::NAMES.join(", ")
            ),
        );
    };
    let interval = args.guidance_interval;
    let folder = args.model.clone().unwrap_or_default();
    let model = match (family.load)(&LoadRequest::new(folder, &Device::Cpu), &mut |line| {
        println!("{line}")
    }) {
        Ok(m) => m,
        Err(e) => return fail(EXIT_BAD_INPUT, format!("{e:#}")),
    };
    let weak = match &args.autoguide_model {
        None => None,
        Some(folder) => match (family.load)(
            &LoadRequest::new(folder.clone(), &Device::Cpu),
            &mut |line| println!("{line}"),
        ) {
            Ok(model) => Some(WeakGuide {
                model,
                scale: args.autoguide_scale,
            }),
            Err(e) => return fail(EXIT_BAD_INPUT, format!("{e:#}")),
        },
    };
    let settings = EvalSettings {
        samplers,
        steps: args.steps.clone(),
        scheduler: Scheduler::Shifted { shift: args.shift },
        guidance: Guidance {
            scale: args.cfg,
            method,
            interval,
            ..Guidance::default()
        },
        batch: args.batch,
        start_sigma: args.start_sigma,
        eta: args.eta,
        classifier_scale: args.classifier_scale,
    };
    let cases = held_out_cases(args.prompts);
    let start = if args.start_sigma < 1.0 {
        format!(
            "starting from right pictures noised to σ = {}",
            args.start_sigma
        )
    } else {
        "starting from noise".to_string()
    };
    let autoguided = weak
        .as_ref()
        .map(|weak| {
            format!(
                ", autoguided by {} at scale {}",
                weak.model.describe(),
                weak.scale
            )
        })
        .unwrap_or_default();
    let classified = match args.classifier_scale {
        0.0 => String::new(),
        scale => format!(", classifier guidance at scale {scale}"),
    };
    println!(
        "{} on {} held-out prompts, guidance {} at scale {} for σ in [{}, {}]{autoguided}{classified}, shifted scheduler (shift {}), {start}",
        model.describe(),
        cases.len(),
        method.name(),
        args.cfg,
        interval.0,
        interval.1,
        args.shift
    );
    println!(
        "{:<15} {:>5} {:>10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>12} {:>8}",
        "sampler",
        "steps",
        "adherence",
        "bg",
        "color",
        "shape",
        "pos",
        "size",
        "straightness",
        "seconds"
    );
    let print = |row: &Row| {
        let share = |i: usize| {
            let a = &row.attributes[i];
            100.0 * a.correct as f64 / a.stated.max(1) as f64
        };
        println!(
            "{:<15} {:>5} {:>9.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>12.4} {:>8.1}",
            row.sampler,
            row.steps,
            100.0 * row.adherence,
            share(0),
            share(1),
            share(2),
            share(3),
            share(4),
            row.mean_straightness,
            row.seconds
        );
    };
    // A folder that cannot be made is found before the images are, not after.
    if let Some(Err(e)) = args.images.as_deref().map(create_folder) {
        return fail(EXIT_FAILURE, format!("{e:#}"));
    }
    let mut saved = Ok(());
    let outcome = evaluate(
        &model,
        weak.as_ref(),
        &cases,
        &settings,
        &mut |row, images| {
            print(row);
            if let (Some(folder), Ok(())) = (&args.images, &saved) {
                saved = save_images(folder, row, images);
            }
        },
    );
    if let Err(e) = saved {
        return fail(EXIT_FAILURE, format!("{e:#}"));
    }
    let rows = match outcome {
        Ok(rows) => rows,
        Err(e) if e.is::<InputError>() => return fail(EXIT_BAD_INPUT, format!("{e:#}")),
        Err(e) => return fail(EXIT_FAILURE, format!("{e:#}")),
    };
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "model": model.describe(),
            "prompts": cases.len(),
            "cfg": args.cfg,
            "guidance": method.name(),
            "guidance_interval": [interval.0, interval.1],
            "autoguide": weak.as_ref().map(|weak| serde_json::json!({
                "model": weak.model.describe(),
                "folder": args.autoguide_model,
                "scale": weak.scale,
            })),
            "classifier_scale": args.classifier_scale,
            "shift": args.shift,
            "start_sigma": args.start_sigma,
            "eta": args.eta,
            "rows": rows,
        });
        let text = serde_json::to_string_pretty(&report).expect("a report serialises");
        if let Err(e) = write_atomic(path, text.as_bytes()) {
            return fail(EXIT_FAILURE, format!("{e:#}"));
        }
    }
    ExitCode::SUCCESS
}

/// Writes one row's images to `folder/<sampler>-<steps>/NNN-<verdict>-<prompt>.png`.
fn save_images(folder: &Path, row: &Row, images: &[RgbImage]) -> anyhow::Result<()> {
    let folder = folder.join(format!("{}-{}", row.sampler, row.steps));
    create_folder(&folder)?;
    for (index, (case, image)) in row.cases.iter().zip(images).enumerate() {
        let verdict = match case.wrong.as_slice() {
            [] => "ok".to_string(),
            wrong => format!("wrong-{}", wrong.join("-")),
        };
        let prompt = case.prompt.replace(' ', "-");
        save_png(
            &folder.join(format!("{index:03}-{verdict}-{prompt}.png")),
            image,
            None,
        )?;
    }
    Ok(())
}

fn create_folder(folder: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(folder).with_context(|| format!("cannot create {}", folder.display()))
}
