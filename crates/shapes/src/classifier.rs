//! The shapes model's caption classifier: which background, colour, shape, place and size a
//! noisy latent shows, for classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat
//! GANs on Image Synthesis").
//!
//! Why: the velocity network draws the prompted colour, place and size almost always, but its
//! outline follows the shape word only about two times in three, and the outline is decided at
//! high noise (from σ = 1 down to about 0.6), where the network barely reads the shape word.
//! Telling shapes apart looked an easier task than drawing them. The gradient of a classifier's
//! log-probability of what the prompt states, `∇ₓ log p(prompt | x_σ)`, points to where the
//! picture shows it more clearly, and the guider adds it to the flow's score (see
//! [`flowline_engine::graph::value::ClassifierGuide`]).
//!
//! The classifier works in the latent space of the model whose folder holds it
//! (`classifier.json`, `classifier.safetensors` beside `config.json`), is trained by
//! `flowline train-classifier` on the same procedural data set (held-out prompts excluded) at
//! σ uniform in [0, 1], and is conditioned on σ the way the velocity network's convolutions
//! are. Its record keeps each attribute's accuracy every 100 steps, which also measures how
//! hard each attribute is to read from the latents.
//!
//! What the trial found (2 cores, batch 64, about 0.75 s a step): background, colour, place
//! and size are learnt within a few hundred steps, the shape is not. After 1 700 steps the
//! shape was right 28 % of the time over all σ (chance: 12.5 %), and a run on nearly clean
//! latents (σ ≤ 0.05) still only 26 % after 300 steps while its colour was right 97 % of the
//! time. Neither twice the channels, nor each latent channel scaled to unit deviation, nor a
//! colour-independent outline channel, nor a plain convolutional network without
//! normalisation, nor the pictures themselves (lossless, at 16² and 32² positions) instead of
//! latents changed that curve. A longer run of the design above (3 400 steps, 42 minutes)
//! reached 29 %, gaining about half a point per 100 steps. Guiding the shipped model with the
//! 1 700-step classifier at scale 3 (default guidance beside it, 100 held-out prompts) lowered
//! adherence from 51 % to 40 % at 4 steps and from 68 % to 65 % at 16: a classifier that
//! cannot tell the shapes apart pushes towards its own mistakes. So no classifier ships and the
//! default workflow leaves classifier guidance off.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autoencoder::PatchAutoencoder;
use crate::dataset::{Attribute, Caption, Color, Position, Sample, Shape, Size, is_held_out};
use crate::layers::{Conv3x3, Dense};
use crate::network::{ConvBlock, TIME_FEATURES, normalize_channels, time_features};
use crate::train::redraw_initial_weights;
use flowline_engine::error::InputError;
use flowline_engine::files::save_safetensors;
use flowline_engine::files::write_atomic;
use flowline_engine::flow::noise::gaussian;
use flowline_engine::model::tensor_from_image;

pub const CLASSIFIER_CONFIG_FILE: &str = "classifier.json";
pub const CLASSIFIER_WEIGHTS_FILE: &str = "classifier.safetensors";

/// The attributes the classifier answers, in the order of its outputs, with their class
/// counts.
const ANSWERS: [(Attribute, usize); 5] = [
    (Attribute::Background, Color::ALL.len()),
    (Attribute::Color, Color::ALL.len()),
    (Attribute::Shape, Shape::ALL.len()),
    (Attribute::Position, Position::ALL.len()),
    (Attribute::Size, Size::ALL.len()),
];

/// Sizes of the classifier. A field this version does not know is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    pub latent_channels: usize,
    pub latent_size: usize,
    /// Channels at each resolution: the latent's side, then halved for each further entry.
    pub channels: Vec<usize>,
    /// Width of the noise-level embedding that modulates every block.
    pub conditioning: usize,
    /// Width of the hidden layer between the coarsest features and the answers.
    pub head: usize,
}

impl ClassifierConfig {
    /// The shipped classifier's sizes, for latents of `channels` × `size`².
    pub fn default_for(channels: usize, size: usize) -> Self {
        ClassifierConfig {
            latent_channels: channels,
            latent_size: size,
            channels: vec![32, 64, 64],
            conditioning: 64,
            head: 128,
        }
    }

    /// A very small classifier that trains in seconds (tests, CI).
    pub fn tiny_for(channels: usize, size: usize) -> Self {
        ClassifierConfig {
            latent_channels: channels,
            latent_size: size,
            channels: vec![8, 16],
            conditioning: 16,
            head: 32,
        }
    }

    /// The side of the coarsest features.
    fn coarsest_side(&self) -> usize {
        self.latent_size >> (self.channels.len() - 1)
    }
}

/// `classifier.json`: the sizes, and how the weights were made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassifierFile {
    pub config: ClassifierConfig,
    pub training: ClassifierTraining,
}

/// Everything that decides the classifier's weights, and how far its training got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierTraining {
    pub batch: usize,
    pub learning_rate: f64,
    pub data_seed: u64,
    pub seed: u64,
    pub steps: usize,
    pub seconds: f64,
    /// The data set index the next batch starts at.
    pub next_index: u64,
    /// The command lines that trained it, in order.
    pub commands: Vec<String>,
    /// `(step, mean loss, accuracy per attribute)` every block of steps.
    pub history: Vec<(usize, f32, Vec<f32>)>,
}

/// The class of each attribute something states, in the order of `ANSWERS`; `None` where it
/// is left unsaid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Labels([Option<usize>; ANSWERS.len()]);

fn index_of<T: PartialEq>(all: &[T], item: &T) -> usize {
    all.iter()
        .position(|x| x == item)
        .expect("every value is in its ALL list")
}

impl Labels {
    /// What a prompt asks for.
    pub fn of_caption(caption: &Caption) -> Labels {
        Labels([
            caption.background.map(|c| index_of(&Color::ALL, &c)),
            Some(index_of(&Color::ALL, &caption.color)),
            Some(index_of(&Shape::ALL, &caption.shape)),
            caption.position.map(|p| index_of(&Position::ALL, &p)),
            caption.size.map(|s| index_of(&Size::ALL, &s)),
        ])
    }

    /// What a training picture shows: everything of its scene (its place as the nearest grid
    /// cell), but its size only where the caption states it, since an unstated size is any
    /// extent between small and large.
    pub fn of_sample(sample: &Sample) -> Labels {
        let scene = &sample.scene;
        Labels([
            Some(index_of(&Color::ALL, &scene.background)),
            Some(index_of(&Color::ALL, &scene.color)),
            Some(index_of(&Shape::ALL, &scene.shape)),
            Some(index_of(
                &Position::ALL,
                &Position::nearest_to(scene.centre),
            )),
            sample.caption.size.map(|s| index_of(&Size::ALL, &s)),
        ])
    }
}

/// `[B, classes]` one-hot rows of attribute `answer` for each item (zero rows where unsaid).
fn one_hot(labels: &[Labels], answer: usize, device: &Device) -> candle_core::Result<Tensor> {
    let classes = ANSWERS[answer].1;
    let mut values = vec![0f32; labels.len() * classes];
    for (row, item) in labels.iter().enumerate() {
        if let Some(class) = item.0[answer] {
            values[row * classes + class] = 1.0;
        }
    }
    Tensor::from_vec(values, (labels.len(), classes), device)
}

/// The classifier network: a 3×3 convolution into the first channels, then at each resolution
/// a residual block modulated by the noise level, average pooling and a convolution into the
/// next channels between them, and a small MLP from the coarsest features to every attribute's
/// logits. The MLP sees those features both flattened, so it knows where things are, and
/// averaged over the picture, the same wherever the object is, so a shape learnt in one place
/// is known in all.
pub struct CaptionClassifier {
    config: ClassifierConfig,
    time_in: Dense,
    time_out: Dense,
    stem: Conv3x3,
    blocks: Vec<ConvBlock>,
    widen: Vec<Conv3x3>,
    hidden: Dense,
    answers: Dense,
}

impl CaptionClassifier {
    pub fn new(config: &ClassifierConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        let levels = config.channels.len();
        anyhow::ensure!(
            levels >= 1 && config.latent_size.is_multiple_of(1 << (levels - 1)),
            "a classifier of {levels} resolutions cannot halve a latent of side {} at each",
            config.latent_size
        );
        let emb = config.conditioning;
        let coarsest = config.channels[levels - 1] * (config.coarsest_side().pow(2) + 1);
        Ok(CaptionClassifier {
            config: config.clone(),
            time_in: Dense::new(TIME_FEATURES, emb, vb.pp("time_in"))?,
            time_out: Dense::new(emb, emb, vb.pp("time_out"))?,
            stem: Conv3x3::new(
                config.latent_channels,
                config.channels[0],
                None,
                vb.pp("stem"),
            )?,
            blocks: config
                .channels
                .iter()
                .enumerate()
                .map(|(i, &c)| ConvBlock::new(c, emb, vb.pp(format!("blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            widen: config
                .channels
                .windows(2)
                .enumerate()
                .map(|(i, pair)| Conv3x3::new(pair[0], pair[1], None, vb.pp(format!("widen.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            hidden: Dense::new(coarsest, config.head, vb.pp("hidden"))?,
            answers: Dense::new(
                config.head,
                ANSWERS.iter().map(|(_, n)| n).sum(),
                vb.pp("answers"),
            )?,
        })
    }

    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }

    /// Every attribute's logits, `[B, Σ classes]`, for latents `x` (`[B, C, S, S]`) at noise
    /// levels `sigma` (`[B]`).
    fn logits(&self, x: &Tensor, sigma: &Tensor) -> candle_core::Result<Tensor> {
        let conditioning = candle_nn::ops::silu(&self.time_out.forward(&candle_nn::ops::silu(
            &self.time_in.forward(&time_features(sigma)?)?,
        )?)?)?;
        // The noisy latent has variance σ² + (1 − σ)²: brought to unit variance, as the
        // velocity network's preconditioning does.
        let sigma = sigma.to_dtype(DType::F32)?.reshape(((), 1, 1, 1))?;
        let spread = (sigma.sqr()? + (1.0 - &sigma)?.sqr()?)?.sqrt()?;
        let mut h = self.stem.forward(&x.broadcast_div(&spread)?)?;
        for (level, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, &conditioning)?;
            if let Some(widen) = self.widen.get(level) {
                h = widen.forward(&h.avg_pool2d(2)?)?;
            }
        }
        let h = normalize_channels(&h)?.relu()?;
        let features = Tensor::cat(&[h.flatten_from(1)?, h.mean((2, 3))?], 1)?;
        self.answers
            .forward(&self.hidden.forward(&features)?.relu()?)
    }

    /// For each item, `[B]`, the log-probability of everything its labels state (the sum over
    /// the stated attributes), and each attribute's logits.
    fn log_probability(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        labels: &[Labels],
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let logits = self.logits(x, sigma)?;
        let mut total = Tensor::zeros(labels.len(), DType::F32, x.device())?;
        let mut per_answer = Vec::with_capacity(ANSWERS.len());
        let mut offset = 0;
        for (answer, &(_, classes)) in ANSWERS.iter().enumerate() {
            let these = logits.narrow(1, offset, classes)?;
            offset += classes;
            let chosen = (candle_nn::ops::log_softmax(&these, D::Minus1)?
                * one_hot(labels, answer, x.device())?)?
            .sum(1)?;
            total = (total + chosen)?;
            per_answer.push(these);
        }
        Ok((total, per_answer))
    }

    /// `∇ₓ log p(labels | x_σ)`, the same shape as `x`: the direction in which each picture
    /// shows more clearly what its labels state.
    pub fn gradient(&self, x: &Tensor, sigma: f64, labels: &[Labels]) -> anyhow::Result<Tensor> {
        let x = Var::from_tensor(&x.to_dtype(DType::F32)?)?;
        let sigma = Tensor::full(sigma as f32, labels.len(), x.device())?;
        let (log_probability, _) = self.log_probability(x.as_tensor(), &sigma, labels)?;
        let gradients = log_probability.sum_all()?.backward()?;
        gradients
            .get(x.as_tensor())
            .cloned()
            .context("the classifier's output does not depend on its input")
    }

    /// Loads `classifier.json` and `classifier.safetensors` from a model folder, or `None`
    /// where the folder has no classifier; errors name the file at fault.
    pub fn load_from(
        folder: &Path,
        latent_channels: usize,
        latent_size: usize,
        device: &Device,
    ) -> anyhow::Result<Option<Self>> {
        let config_path = folder.join(CLASSIFIER_CONFIG_FILE);
        if !config_path.exists() {
            return Ok(None);
        }
        let file = read_file(&config_path)?;
        let config = file.config;
        if (config.latent_channels, config.latent_size) != (latent_channels, latent_size) {
            return Err(InputError(format!(
                "{} is for latents of {} channels × {}², the model's are {latent_channels} × \
                 {latent_size}²",
                config_path.display(),
                config.latent_channels,
                config.latent_size
            ))
            .into());
        }
        let weights_path = folder.join(CLASSIFIER_WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
            InputError(format!(
                "cannot read classifier weights {}: {e}",
                weights_path.display()
            ))
        })?;
        let classifier = CaptionClassifier::new(
            &config,
            VarBuilder::from_tensors(tensors, DType::F32, device),
        )
        .map_err(|e| InputError(format!("{}: {e:#}", weights_path.display())))?;
        Ok(Some(classifier))
    }
}

fn read_file(path: &Path) -> anyhow::Result<ClassifierFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| InputError(format!("cannot read {}: {e}", path.display())))?;
    Ok(serde_json::from_str(&text)
        .map_err(|e| InputError(format!("{} is broken: {e}", path.display())))?)
}

/// The share of items whose attribute `answer` the logits get right, over the items that
/// state it (`None` if none does).
fn accuracy(logits: &Tensor, labels: &[Labels], answer: usize) -> anyhow::Result<Option<f32>> {
    let predicted: Vec<u32> = logits.argmax(1)?.to_vec1()?;
    let judged: Vec<bool> = labels
        .iter()
        .zip(&predicted)
        .filter_map(|(item, &p)| item.0[answer].map(|class| class == p as usize))
        .collect();
    Ok((!judged.is_empty())
        .then(|| judged.iter().filter(|&&right| right).count() as f32 / judged.len() as f32))
}

/// Trains a classifier in a model folder's latent space.
pub struct ClassifierTrainer {
    config: ClassifierConfig,
    training: ClassifierTraining,
    varmap: VarMap,
    classifier: CaptionClassifier,
    optimizer: AdamW,
    autoencoder: PatchAutoencoder,
    device: Device,
}

/// What one training step saw.
pub struct StepReport {
    pub loss: f32,
    /// Accuracy per attribute, in [`ClassifierTrainer::attribute_names`] order (NaN where the
    /// batch stated none).
    pub accuracy: Vec<f32>,
}

impl ClassifierTrainer {
    /// A fresh classifier for the latents of `autoencoder`.
    pub fn new(
        config: ClassifierConfig,
        autoencoder: PatchAutoencoder,
        batch: usize,
        learning_rate: f64,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let training = ClassifierTraining {
            batch,
            learning_rate,
            data_seed: seed,
            seed,
            steps: 0,
            seconds: 0.0,
            next_index: 0,
            commands: Vec::new(),
            history: Vec::new(),
        };
        Self::assemble(config, training, autoencoder, None, device)
    }

    /// Continues the classifier in `folder` (Adam's moments are re-estimated).
    pub fn resume(
        folder: &Path,
        autoencoder: PatchAutoencoder,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let file = read_file(&folder.join(CLASSIFIER_CONFIG_FILE))?;
        let weights_path = folder.join(CLASSIFIER_WEIGHTS_FILE);
        let saved = candle_core::safetensors::load(&weights_path, device)
            .with_context(|| format!("cannot read {}", weights_path.display()))?;
        Self::assemble(file.config, file.training, autoencoder, Some(saved), device)
    }

    fn assemble(
        config: ClassifierConfig,
        training: ClassifierTraining,
        autoencoder: PatchAutoencoder,
        saved: Option<HashMap<String, Tensor>>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            autoencoder.channels() == config.latent_channels,
            "the classifier takes {} latent channels, the model's autoencoder makes {}",
            config.latent_channels,
            autoencoder.channels()
        );
        let varmap = VarMap::new();
        let classifier = CaptionClassifier::new(
            &config,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        match &saved {
            None => redraw_initial_weights(&varmap, training.seed, device, |_| true)?,
            Some(saved) => {
                for (name, var) in varmap
                    .data()
                    .lock()
                    .expect("the var map is not poisoned")
                    .iter()
                {
                    var.set(
                        saved
                            .get(name)
                            .with_context(|| format!("the classifier has no tensor {name}"))?,
                    )?;
                }
            }
        }
        let optimizer = AdamW::new(
            varmap.all_vars(),
            ParamsAdamW {
                lr: training.learning_rate,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?;
        Ok(ClassifierTrainer {
            config,
            training,
            varmap,
            classifier,
            optimizer,
            autoencoder,
            device: device.clone(),
        })
    }

    pub fn steps(&self) -> usize {
        self.training.steps
    }

    /// The attributes in the order of [`StepReport::accuracy`].
    pub fn attribute_names() -> Vec<&'static str> {
        ANSWERS.iter().map(|(a, _)| a.name()).collect()
    }

    /// One optimiser step on a fresh batch of training pictures, each at a σ uniform in [0, 1].
    pub fn train_step(&mut self) -> anyhow::Result<StepReport> {
        let started = Instant::now();
        let batch = self.training.batch;
        let mut rng = ChaCha8Rng::seed_from_u64(self.training.seed);
        rng.set_stream(self.training.steps as u64);
        let mut images = Vec::with_capacity(batch);
        let mut labels = Vec::with_capacity(batch);
        while images.len() < batch {
            let drawn = crate::dataset::sample(self.training.data_seed, self.training.next_index);
            self.training.next_index += 1;
            if is_held_out(&drawn.caption) {
                continue;
            }
            images.push(tensor_from_image(&drawn.image)?);
            labels.push(Labels::of_sample(&drawn));
        }
        let clean = self
            .autoencoder
            .encode(&Tensor::stack(&images, 0)?.to_device(&self.device)?)?;
        let noise = gaussian(rng.random::<u64>(), clean.shape(), &self.device)?;
        let sigmas: Vec<f32> = (0..batch).map(|_| rng.random::<f32>()).collect();
        let sigma = Tensor::from_vec(sigmas, batch, &self.device)?;
        let sigma_4d = sigma.reshape((batch, 1, 1, 1))?;
        let noisy =
            (noise.broadcast_mul(&sigma_4d)? + clean.broadcast_mul(&(1.0 - &sigma_4d)?)?)?;
        let (log_probability, logits) = self.classifier.log_probability(&noisy, &sigma, &labels)?;
        let loss = log_probability.mean_all()?.neg()?;
        self.optimizer.backward_step(&loss)?;
        let accuracy = logits
            .iter()
            .enumerate()
            .map(|(answer, logits)| Ok(accuracy(logits, &labels, answer)?.unwrap_or(f32::NAN)))
            .collect::<anyhow::Result<_>>()?;
        self.training.steps += 1;
        self.training.seconds += started.elapsed().as_secs_f64();
        Ok(StepReport {
            loss: loss.to_scalar()?,
            accuracy,
        })
    }

    /// Records a block's mean loss and accuracies in the history saved with the weights.
    pub fn record(&mut self, loss: f32, accuracy: Vec<f32>) {
        self.training
            .history
            .push((self.training.steps, loss, accuracy));
    }

    /// Writes `classifier.safetensors` and `classifier.json` into the model folder, atomically,
    /// adding `command` to the record once.
    pub fn save(&mut self, folder: &Path, command: &str) -> anyhow::Result<()> {
        if self.training.commands.last().map(String::as_str) != Some(command) {
            self.training.commands.push(command.to_string());
        }
        let tensors: HashMap<String, Tensor> = self
            .varmap
            .data()
            .lock()
            .expect("the var map is not poisoned")
            .iter()
            .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
            .collect();
        save_safetensors(&tensors, &folder.join(CLASSIFIER_WEIGHTS_FILE))?;
        let file = ClassifierFile {
            config: self.config.clone(),
            training: self.training.clone(),
        };
        write_atomic(
            &folder.join(CLASSIFIER_CONFIG_FILE),
            serde_json::to_string_pretty(&file)?.as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::sample;
    use crate::layers::max_difference;

    const CHANNELS: usize = 4;
    const SIDE: usize = 16;

    fn tiny_trainer() -> ClassifierTrainer {
        let images: Vec<Tensor> = (0..64)
            .map(|i| tensor_from_image(&sample(5, i).image).unwrap())
            .collect();
        let autoencoder =
            PatchAutoencoder::fit(&Tensor::stack(&images, 0).unwrap(), CHANNELS, 0.0).unwrap();
        ClassifierTrainer::new(
            ClassifierConfig::tiny_for(CHANNELS, SIDE),
            autoencoder,
            32,
            3e-3,
            5,
            &Device::Cpu,
        )
        .unwrap()
    }

    fn mean_loss(trainer: &mut ClassifierTrainer, steps: usize) -> f32 {
        (0..steps)
            .map(|_| trainer.train_step().unwrap().loss)
            .sum::<f32>()
            / steps as f32
    }

    #[test]
    fn training_lowers_the_loss_and_the_gradient_raises_the_prompted_probability() {
        let mut trainer = tiny_trainer();
        let first = mean_loss(&mut trainer, 5);
        mean_loss(&mut trainer, 60);
        let last = mean_loss(&mut trainer, 5);
        assert!(last < 0.9 * first, "loss {first} → {last}");

        let caption = Caption::parse("a large red star on the left on a blue background")
            .unwrap()
            .caption;
        let labels = [Labels::of_caption(&caption)];
        let x = gaussian(3, (1, CHANNELS, SIDE, SIDE), &Device::Cpu).unwrap();
        let sigma = 0.6;
        let gradient = trainer.classifier.gradient(&x, sigma, &labels).unwrap();
        let log_probability = |x: &Tensor| {
            let sigma = Tensor::full(sigma as f32, 1, &Device::Cpu).unwrap();
            let (total, _) = trainer
                .classifier
                .log_probability(x, &sigma, &labels)
                .unwrap();
            total.to_vec1::<f32>().unwrap()[0]
        };
        // A small step along the gradient raises the log-probability by about step·|g|².
        let step = 1e-3;
        let squared_norm: f32 = gradient
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let rise =
            log_probability(&(&x + (&gradient * step).unwrap()).unwrap()) - log_probability(&x);
        let expected = step as f32 * squared_norm;
        assert!(
            (rise - expected).abs() < 0.2 * expected,
            "the log-probability rose {rise}, the gradient says {expected}"
        );
    }

    #[test]
    fn a_saved_classifier_loads_and_resumes_with_the_same_weights_and_refuses_other_latents() {
        let folder = tempfile::tempdir().unwrap();
        let mut trainer = tiny_trainer();
        mean_loss(&mut trainer, 3);
        trainer.save(folder.path(), "test").unwrap();

        let x = gaussian(4, (2, CHANNELS, SIDE, SIDE), &Device::Cpu).unwrap();
        let sigma = Tensor::new(&[0.3f32, 0.9], &Device::Cpu).unwrap();
        let loaded = CaptionClassifier::load_from(folder.path(), CHANNELS, SIDE, &Device::Cpu)
            .unwrap()
            .expect("the folder has a classifier");
        let expected = trainer.classifier.logits(&x, &sigma).unwrap();
        assert_eq!(
            max_difference(&loaded.logits(&x, &sigma).unwrap(), &expected),
            0.0
        );
        let autoencoder = trainer.autoencoder.clone();
        let resumed = ClassifierTrainer::resume(folder.path(), autoencoder, &Device::Cpu).unwrap();
        assert_eq!(resumed.steps(), 3);
        assert_eq!(resumed.training.commands, ["test"]);
        assert_eq!(
            max_difference(&resumed.classifier.logits(&x, &sigma).unwrap(), &expected),
            0.0
        );

        let error = CaptionClassifier::load_from(folder.path(), 16, SIDE, &Device::Cpu)
            .err()
            .expect("latents of other channels are refused")
            .to_string();
        assert!(
            error.contains(CLASSIFIER_CONFIG_FILE) && error.contains("16"),
            "{error}"
        );
        std::fs::write(
            folder.path().join(CLASSIFIER_WEIGHTS_FILE),
            b"not safetensors",
        )
        .unwrap();
        let error = CaptionClassifier::load_from(folder.path(), CHANNELS, SIDE, &Device::Cpu)
            .err()
            .expect("corrupt weights are refused")
            .to_string();
        assert!(error.contains(CLASSIFIER_WEIGHTS_FILE), "{error}");
        let empty = tempfile::tempdir().unwrap();
        assert!(
            CaptionClassifier::load_from(empty.path(), CHANNELS, SIDE, &Device::Cpu)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn labels_state_what_the_caption_states_and_what_the_scene_shows() {
        let caption = Caption::parse("a red heart in the top left")
            .unwrap()
            .caption;
        let labels = Labels::of_caption(&caption);
        assert_eq!(labels.0[0], None, "no background stated");
        assert_eq!(labels.0[1], Some(index_of(&Color::ALL, &Color::Red)));
        assert_eq!(labels.0[2], Some(index_of(&Shape::ALL, &Shape::Heart)));
        assert_eq!(
            labels.0[3],
            Some(index_of(&Position::ALL, &Position::TopLeft))
        );
        assert_eq!(labels.0[4], None, "no size stated");
        for index in 0..50 {
            let drawn = sample(3, index);
            let labels = Labels::of_sample(&drawn);
            assert!(labels.0[..4].iter().all(Option::is_some));
            assert_eq!(labels.0[4].is_some(), drawn.caption.size.is_some());
            if let Some(position) = drawn.caption.position {
                assert_eq!(labels.0[3], Some(index_of(&Position::ALL, &position)));
            }
        }
    }
}
