//! Evaluation: how well a model follows its prompts, judged by the deterministic analyser.
//!
//! Prompts are the held-out captions of the shapes data set (see
//! [`crate::dataset::is_held_out`]), each with its own noise seed, so nothing evaluated was
//! trained on. Every image is generated through the same [`Guider`] and sampler as a graph run,
//! then analysed and judged attribute by attribute. A case is adherent when no attribute its
//! prompt states is wrong.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::analyse::{Verdict, analyse, judge};
use crate::dataset::{Attribute, CANVAS_SIZE, Caption, Scene, is_held_out, sample};
use flowline_engine::flow::guidance::Guidance;
use flowline_engine::flow::interpolate;
use flowline_engine::flow::noise::gaussian;
use flowline_engine::flow::sampler::{FreshNoise, SamplerKind, sample as run_sampler};
use flowline_engine::flow::schedule::Scheduler;
use flowline_engine::graph::value::{Autoguide, ClassifierGuide, Guider};
use flowline_engine::model::{Conditioning, FlowModel, image_from_tensor, tensor_from_image};

/// The data-set seed evaluation prompts are drawn from (training uses others).
pub const EVAL_PROMPT_SEED: u64 = 9_001;

/// One prompt and the seed of its start noise.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub caption: Caption,
    pub seed: u64,
}

/// The first `count` held-out prompts, each with its own seed.
pub fn held_out_cases(count: usize) -> Vec<Case> {
    (0u64..)
        .map(|index| (index, sample(EVAL_PROMPT_SEED, index).caption))
        .filter(|(_, caption)| is_held_out(caption))
        .take(count)
        .map(|(index, caption)| Case {
            caption,
            seed: 1_000_000 + index,
        })
        .collect()
}

/// How the images are generated.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub samplers: Vec<SamplerKind>,
    pub steps: Vec<usize>,
    pub scheduler: Scheduler,
    pub guidance: Guidance,
    /// Images generated together (models that cannot batch prompts generate one at a time).
    pub batch: usize,
    /// The noise level images start from: 1 is pure noise; below 1 each starts, as a
    /// source-image start does, from a right picture of its prompt (drawn by the data set's
    /// renderer from the case's seed) noised to this σ. Which σ a model still keeps the prompted
    /// shape from tells where it stops being able to draw it from the words alone.
    pub start_sigma: f64,
    /// The ancestral sampler's η (see [`FreshNoise`]); its noise is seeded by each case's seed.
    pub eta: f64,
    /// Classifier guidance scale by the model's own caption classifier (0: off; see
    /// [`ClassifierGuide`]).
    pub classifier_scale: f64,
}

/// Correct verdicts among the cases that state an attribute.
#[derive(Debug, Clone, Serialize)]
pub struct AttributeScore {
    pub attribute: String,
    pub correct: usize,
    pub stated: usize,
}

/// What the analyser made of one case's image.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub prompt: String,
    pub seed: u64,
    /// Every attribute the prompt states is right.
    pub adherent: bool,
    /// The stated attributes the image gets wrong (all of them when no object is found).
    pub wrong: Vec<String>,
    /// What the analyser saw (absent when no object stands out from the background).
    pub seen: Option<Seen>,
}

/// The analyser's reading of an image, by name.
#[derive(Debug, Clone, Serialize)]
pub struct Seen {
    pub background: String,
    pub color: String,
    pub shape: String,
    pub position: String,
    /// Side of the fitted shape's box, in pixels.
    pub extent: f32,
}

/// The results for one sampler at one step count.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub sampler: String,
    pub steps: usize,
    pub images: usize,
    /// Share of images with every stated attribute right.
    pub adherence: f64,
    pub attributes: Vec<AttributeScore>,
    /// For each shape asked for, how often the analyser saw each shape (`none`: no object),
    /// which tells a model that draws one shape for every word from one that draws nothing.
    pub shapes_seen: BTreeMap<String, BTreeMap<String, usize>>,
    pub mean_straightness: f64,
    pub seconds: f64,
    /// Each case's verdict, in case order, so the failures can be picked out and looked at.
    pub cases: Vec<CaseResult>,
}

/// A weaker version of the evaluated model to autoguide it with, and the autoguidance scale.
pub struct WeakGuide {
    pub model: Arc<dyn FlowModel>,
    pub scale: f64,
}

/// Generates and judges every case for every sampler and step count, handing each finished row
/// to `on_row` with its images (in case order).
pub fn evaluate(
    model: &Arc<dyn FlowModel>,
    weak: Option<&WeakGuide>,
    cases: &[Case],
    settings: &EvalSettings,
    on_row: &mut dyn FnMut(&Row, &[image::RgbImage]),
) -> anyhow::Result<Vec<Row>> {
    let generator = Generator::new(model, weak, cases, settings)?;
    let mut rows = Vec::new();
    for &sampler in &settings.samplers {
        for &steps in &settings.steps {
            let started = std::time::Instant::now();
            let (latents, straightness) = generator.latents(sampler, steps)?;
            let images = latents
                .iter()
                .map(|latent| anyhow::Ok(image_from_tensor(&model.decode(latent)?)?))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let row = score(
                sampler,
                steps,
                cases,
                &images,
                straightness,
                started.elapsed().as_secs_f64(),
            );
            on_row(&row, &images);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Generates the cases' images as a graph run would, through the same [`Guider`] and sampler,
/// with the prompts encoded and the start latents drawn once for every sampler and step count.
pub struct Generator<'a> {
    model: &'a Arc<dyn FlowModel>,
    weak: Option<&'a WeakGuide>,
    cases: &'a [Case],
    settings: &'a EvalSettings,
    negative: Arc<Conditioning>,
    positives: Vec<Conditioning>,
    weak_positives: Option<Vec<Conditioning>>,
    starts: Vec<Tensor>,
}

impl<'a> Generator<'a> {
    pub fn new(
        model: &'a Arc<dyn FlowModel>,
        weak: Option<&'a WeakGuide>,
        cases: &'a [Case],
        settings: &'a EvalSettings,
    ) -> anyhow::Result<Self> {
        if let Some(weak) = weak {
            Autoguide::check_compatible(model.as_ref(), weak.model.as_ref())?;
        }
        ClassifierGuide {
            prompts: Vec::new(),
            scale: settings.classifier_scale,
        }
        .check_available(model.as_ref())?;
        let encode_all = |model: &Arc<dyn FlowModel>| {
            cases
                .iter()
                .map(|case| model.encode_prompt(&case.caption.text()))
                .collect::<anyhow::Result<Vec<Conditioning>>>()
        };
        let shape = model.latent_shape(CANVAS_SIZE as usize, CANVAS_SIZE as usize)?;
        Ok(Generator {
            model,
            weak,
            cases,
            settings,
            negative: Arc::new(model.encode_prompt("")?),
            positives: encode_all(model)?,
            weak_positives: weak.map(|weak| encode_all(&weak.model)).transpose()?,
            starts: cases
                .iter()
                .map(|case| start(model.as_ref(), case, &shape, settings.start_sigma))
                .collect::<anyhow::Result<_>>()?,
        })
    }

    /// The `[1, C, h, w]` latent each case starts from, in case order.
    pub fn starts(&self) -> &[Tensor] {
        &self.starts
    }

    /// Every case's final `[1, C, h, w]` latent, in case order, and the paths' mean
    /// straightness.
    pub fn latents(
        &self,
        sampler: SamplerKind,
        steps: usize,
    ) -> anyhow::Result<(Vec<Tensor>, f64)> {
        let (model, cases, settings) = (self.model, self.cases, self.settings);
        let batch = if model.batches_prompts() {
            settings.batch.max(1)
        } else {
            1
        };
        let mut latents = Vec::with_capacity(cases.len());
        let mut straightness = 0.0;
        for chunk in (0..cases.len()).collect::<Vec<_>>().chunks(batch) {
            let gather = |model: &Arc<dyn FlowModel>, all: &[Conditioning]| {
                anyhow::Ok(Arc::new(match chunk {
                    [single] => all[*single].clone(),
                    _ => {
                        let list: Vec<Conditioning> =
                            chunk.iter().map(|&i| all[i].clone()).collect();
                        model.batch_conditioning(&list)?
                    }
                }))
            };
            let start: Vec<&Tensor> = chunk.iter().map(|&i| &self.starts[i]).collect();
            let start = Tensor::cat(&start, 0)?;
            let autoguide = match (self.weak, &self.weak_positives) {
                (Some(weak), Some(all)) => Some(Autoguide {
                    model: weak.model.clone(),
                    positive: gather(&weak.model, all)?,
                    scale: weak.scale,
                }),
                _ => None,
            };
            let guider = Guider {
                model: model.clone(),
                positive: gather(model, &self.positives)?,
                negative: Some(self.negative.clone()),
                guidance: settings.guidance,
                autoguide,
                classifier: Some(ClassifierGuide {
                    prompts: chunk.iter().map(|&i| cases[i].caption.text()).collect(),
                    scale: settings.classifier_scale,
                }),
            };
            let mut field = |x: &Tensor, sigma: f64| guider.velocity(x, sigma);
            let sigmas = settings.scheduler.sigmas(steps, settings.start_sigma);
            let noise = FreshNoise {
                eta: settings.eta,
                seeds: chunk.iter().map(|&i| cases[i].seed).collect(),
            };
            let output = run_sampler(sampler, &mut field, &start, &sigmas, &noise, &mut |_| {
                ControlFlow::Continue(())
            })?;
            straightness += output.straightness * chunk.len() as f64;
            for i in 0..chunk.len() {
                latents.push(output.latent.narrow(0, i, 1)?);
            }
        }
        Ok((latents, straightness / cases.len().max(1) as f64))
    }
}

/// Where `case` starts: its seed's noise, mixed at σ = `sigma` < 1 with a right picture.
fn start(
    model: &dyn FlowModel,
    case: &Case,
    shape: &[usize],
    sigma: f64,
) -> anyhow::Result<Tensor> {
    let noise = gaussian(case.seed, shape, model.device())?;
    if sigma >= 1.0 {
        return Ok(noise);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(case.seed);
    let picture = Scene::sample_for(&case.caption, &mut rng).render();
    let clean = model.encode_image(&tensor_from_image(&picture)?.to_device(model.device())?)?;
    Ok(interpolate(&clean, &noise, sigma)?)
}

fn score(
    sampler: SamplerKind,
    steps: usize,
    cases: &[Case],
    images: &[image::RgbImage],
    mean_straightness: f64,
    seconds: f64,
) -> Row {
    let mut adherent = 0;
    let mut tallies = Attribute::ALL.map(|attribute| AttributeScore {
        attribute: attribute.name().to_string(),
        correct: 0,
        stated: 0,
    });
    let mut shapes_seen: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut results = Vec::with_capacity(cases.len());
    for (case, image) in cases.iter().zip(images) {
        let found = analyse(image).ok();
        let seen = found.map_or("none", |found| found.shape.name());
        *shapes_seen
            .entry(case.caption.shape.name().to_string())
            .or_default()
            .entry(seen.to_string())
            .or_default() += 1;
        // An image with no object found gets every attribute its prompt states wrong.
        let verdicts = found.map(|found| judge(&case.caption, &found).verdicts());
        let stated = stated_attributes(&case.caption);
        let mut wrong = Vec::new();
        for (index, tally) in tallies.iter_mut().enumerate() {
            if stated[index] {
                tally.stated += 1;
                match verdicts.map(|v| v[index].1) {
                    Some(Verdict::Correct) => tally.correct += 1,
                    Some(Verdict::Wrong) | None => wrong.push(tally.attribute.clone()),
                    Some(Verdict::Unstated) => {}
                }
            }
        }
        adherent += usize::from(wrong.is_empty());
        results.push(CaseResult {
            prompt: case.caption.text(),
            seed: case.seed,
            adherent: wrong.is_empty(),
            wrong,
            seen: found.map(|found| Seen {
                background: found.background.name().to_string(),
                color: found.color.name().to_string(),
                shape: found.shape.name().to_string(),
                position: found.position.phrase().to_string(),
                extent: found.extent,
            }),
        });
    }
    Row {
        sampler: sampler.name().to_string(),
        steps,
        images: images.len(),
        adherence: adherent as f64 / images.len().max(1) as f64,
        attributes: tallies.to_vec(),
        shapes_seen,
        mean_straightness,
        seconds,
        cases: results,
    }
}

/// Which attributes `caption` states, in [`Attribute::ALL`] order.
fn stated_attributes(caption: &Caption) -> [bool; 5] {
    Attribute::ALL.map(|attribute| match attribute {
        Attribute::Background => caption.background.is_some(),
        Attribute::Color | Attribute::Shape => true,
        Attribute::Position => caption.position.is_some(),
        Attribute::Size => caption.size.is_some(),
    })
}
