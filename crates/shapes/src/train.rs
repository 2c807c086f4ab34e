//! Training the shapes model: rectified-flow loss on the procedural data set, on the CPU.
//!
//! Each step draws a fresh batch (`dataset::sample(data_seed, index)` for consecutive indices,
//! so a resumed run sees exactly the data it would have seen, skipping the held-out prompts
//! that evaluation uses), drops 10% of captions (so CFG has an unconditional prompt to push
//! away from), draws a time (logit-normal, or uniform as evenly spaced sampling steps visit it)
//! and shifts it into σ like the sampler's schedule (so the high noise levels where the
//! composition is decided are trained often), and regresses the velocity `ε − x0`. With
//! `posterior_references` it regresses instead the velocity towards the posterior mean over the
//! batch's picture and further pictures of its caption: the same optimum, but at high noise the
//! target says what the caption looks like on average rather than what one picture of it
//! happened to be. An EMA of the weights is what ships. A checkpoint holds the raw weights and
//! the step beside the model file, whose weights are the EMA (older checkpoints hold a copy of
//! the EMA too); Adam's moments are not stored by candle's optimiser, so a resumed run
//! re-estimates them, with a short learning-rate warm-up.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::autoencoder::PatchAutoencoder;
use crate::config::{
    AutoencoderConfig, CONFIG_FILE, FORMAT, PreviewConfig, ShapesConfig, WEIGHTS_FILE,
};
use crate::dataset::{Caption, Scene, Shape, is_held_out, sample};
use crate::network::{COARSE_SCALE_NAME, NetworkConfig, Networks};
use crate::optimizer::Adam;
use crate::reflow::Couplings;
use crate::tokenizer::Tokenizer;
use flowline_engine::files::{save_safetensors, write_atomic};
use flowline_engine::flow::noise::{gaussian, gaussian_values};
use flowline_engine::flow::posterior;
use flowline_engine::flow::schedule::Scheduler;
use flowline_engine::model::{LatentPreview, tensor_from_image};

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const CHECKPOINT_STATE: &str = "checkpoint.json";
/// The optimizer's moments, beside the checkpoint: with them a resumed run goes on exactly as
/// it would have without the stop (a run without them warms its learning rate up again).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Prefix of the optimised weights' names in a checkpoint.
const RAW_PREFIX: &str = "raw.";
/// Prefix of the averaged weights' names in a run's tensors once read (see [`Trainer::resume`]).
const AVERAGED_PREFIX: &str = "ema.";
/// Stream of the pictures drawn for posterior targets, apart from noise and dropout.
const REFERENCE_STREAM: u64 = 0x5245_4645;
/// Stream of the keep-or-skip draws of shape weighting, one per data index.
const SHAPE_WEIGHTING_STREAM: u64 = 0x5348_4150;
/// Smallest σ a posterior target is worked out at (σ = 0 has no posterior).
const MIN_POSTERIOR_SIGMA: f64 = 1e-4;

/// Everything that decides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    pub network: NetworkConfig,
    pub batch: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub ema_decay: f64,
    pub caption_dropout: f64,
    /// Seed of the training data set (held-out evaluation uses other seeds).
    pub data_seed: u64,
    /// Seed of parameter initialisation, noise, σ and caption dropout.
    pub seed: u64,
    /// Pictures the autoencoder and preview are fitted on.
    pub autoencoder_images: usize,
    /// Shift applied to the logit-normal σ (as the sampler's `shifted` scheduler does), so
    /// training sees the high noise levels where sampling decides the composition.
    #[serde(default = "no_shift")]
    pub sigma_shift: f64,
    /// Share of each batch whose σ is drawn uniformly from (0, 1) instead: the shifted
    /// logit-normal almost never draws σ < 0.2, where edges are finished.
    #[serde(default)]
    pub uniform_sigma_share: f64,
    /// How the time that the shift warps into σ is drawn (older runs: logit-normal).
    #[serde(default)]
    pub time_sampling: TimeSampling,
    /// Further pictures of each caption drawn every step, so the regression target is the
    /// posterior mean over them and the batch's own picture (see [`flowline_engine::flow::posterior`])
    /// instead of that one picture's velocity: the same optimum, with far less variance at high
    /// noise, where one picture says little about what a caption looks like on average. 0 (older
    /// runs): one picture.
    #[serde(default)]
    pub posterior_references: usize,
    /// How far the autoencoder whitens its latent channels (see
    /// [`PatchAutoencoder::fit`]): 0 (older runs) one scale for all, 1 each to unit deviation.
    #[serde(default)]
    pub latent_whitening: f64,
    /// How far each noise level's share of the gradient is evened out (see [`LossBalance`]):
    /// every picture's squared error is divided by the running mean loss at its σ raised to
    /// this power. 0 (older runs): plain mean squared error, 1: every noise level weighs alike.
    #[serde(default)]
    pub loss_balance: f64,
    /// How far each latent channel's share of the loss is evened out (see
    /// `ChannelWeights`): every channel's squared error is multiplied by its clean
    /// variance raised to minus this power. 0 (older runs): the plain mean over channels.
    #[serde(default)]
    pub channel_loss_power: f64,
    /// How often each shape is trained on, relative to the others (see [`ShapeWeights`]).
    /// Empty (older runs): every shape as often as the data set draws it.
    #[serde(default, skip_serializing_if = "ShapeWeights::is_uniform")]
    pub shape_weights: ShapeWeights,
}

/// Relative training frequencies of the shapes, by shape word; a shape not named weighs 1.
/// A picture of a shape weighing `w` is kept with probability `w / w_max` (the largest weight
/// of any shape), the rest skipped.
///
/// Why: every caption states its shape, so this changes which captions training sees most
/// often, not what any caption looks like; the steps and the network's capacity go where its
/// outlines are most often wrong (a cross or a star read as a blob) rather than to circles it
/// already draws right. Only the unconditional prediction, trained on dropped captions, sees
/// the shapes in the weighted proportions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, f64>", into = "BTreeMap<String, f64>")]
pub struct ShapeWeights(BTreeMap<String, f64>);

/// Shape words and positive weights; an empty map trains every shape alike.
impl TryFrom<BTreeMap<String, f64>> for ShapeWeights {
    type Error = String;

    fn try_from(weights: BTreeMap<String, f64>) -> Result<Self, String> {
        for (word, &weight) in &weights {
            if Shape::from_word(word).is_none() {
                let known: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
                return Err(format!("'{word}' is not a shape ({})", known.join(", ")));
            }
            if !(weight.is_finite() && weight > 0.0) {
                return Err(format!(
                    "the weight of {word} must be positive, not {weight}"
                ));
            }
        }
        Ok(ShapeWeights(weights))
    }
}

impl From<ShapeWeights> for BTreeMap<String, f64> {
    fn from(weights: ShapeWeights) -> Self {
        weights.0
    }
}

impl ShapeWeights {
    fn weight(&self, shape: Shape) -> f64 {
        self.0.get(shape.name()).copied().unwrap_or(1.0)
    }

    /// Whether every shape weighs the same, so nothing is skipped.
    pub fn is_uniform(&self) -> bool {
        Shape::ALL
            .iter()
            .all(|s| self.weight(*s) == self.weight(Shape::ALL[0]))
    }

    /// The probability that a picture of `shape` is trained on.
    pub fn keep_probability(&self, shape: Shape) -> f64 {
        let largest = Shape::ALL
            .iter()
            .map(|s| self.weight(*s))
            .fold(0.0, f64::max);
        self.weight(shape) / largest
    }

    /// Whether to train on a picture of `shape`, drawing from `rng` only when the answer is in
    /// doubt (so a uniform weighting leaves every random stream as older runs had it).
    fn keeps<R: Rng>(&self, shape: Shape, rng: &mut R) -> bool {
        let probability = self.keep_probability(shape);
        probability >= 1.0 || rng.random::<f64>() < probability
    }
}

impl std::fmt::Display for ShapeWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_uniform() {
            return f.write_str("uniform");
        }
        let entries: Vec<String> = self.0.iter().map(|(s, w)| format!("{s}={w}")).collect();
        f.write_str(&entries.join(","))
    }
}

/// How training draws the time `t` ∈ (0, 1) that the σ shift warps into a noise level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeSampling {
    /// The sigmoid of a standard normal (SD3's logit-normal): most draws mid-path.
    #[default]
    LogitNormal,
    /// Uniform, as a sampler with evenly spaced steps visits it. The first steps, near σ = 1,
    /// are where a picture's composition is drawn from the prompt alone; at shift 3 the
    /// logit-normal draws σ > 0.95 about 3 % of the time, while 16 sampling steps spend 3 there.
    Uniform,
}

impl std::fmt::Display for TimeSampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeSampling::LogitNormal => "logit_normal",
            TimeSampling::Uniform => "uniform",
        })
    }
}

fn no_shift() -> f64 {
    1.0
}

/// The shipped model's training preset: the settings its weights were last trained with.
pub const SHIPPED_PRESET: &str = include_str!("../../../assets/models/shapes/preset.toml");
/// A very small preset that trains in seconds, for tests and CI.
pub const TINY_PRESET: &str = include_str!("../../../assets/presets/tiny.toml");

impl TrainSettings {
    /// The shipped model's settings ([`SHIPPED_PRESET`]).
    pub fn default_model() -> Self {
        Self::from_toml(SHIPPED_PRESET).expect("the shipped preset is valid (a test checks it)")
    }

    /// A very small configuration for tests and CI ([`TINY_PRESET`]).
    pub fn tiny() -> Self {
        Self::from_toml(TINY_PRESET).expect("the tiny preset is valid (a test checks it)")
    }

    /// Settings from a preset in TOML, checked.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let settings: TrainSettings = toml::from_str(text)?;
        settings.check()?;
        Ok(settings)
    }

    /// Reads a preset file: JSON where its name ends in `.json`, TOML otherwise. Errors name
    /// the file and, where the file is at fault, the field.
    pub fn read_preset(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read preset {}", path.display()))?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let settings = if is_json {
            serde_json::from_str::<TrainSettings>(&text)
                .map_err(anyhow::Error::from)
                .and_then(|settings| settings.check().map(|()| settings))
        } else {
            Self::from_toml(&text)
        };
        settings.with_context(|| format!("preset {} is not valid", path.display()))
    }

    /// Refuses settings no run can train with, naming the field.
    pub fn check(&self) -> anyhow::Result<()> {
        let unit = |name: &str, value: f64| {
            anyhow::ensure!(
                (0.0..=1.0).contains(&value),
                "{name} must be between 0 and 1, not {value}"
            );
            Ok(())
        };
        unit("latent_whitening", self.latent_whitening)?;
        unit("loss_balance", self.loss_balance)?;
        unit("channel_loss_power", self.channel_loss_power)?;
        unit("caption_dropout", self.caption_dropout)?;
        unit("uniform_sigma_share", self.uniform_sigma_share)?;
        anyhow::ensure!(
            (0.0..1.0).contains(&self.ema_decay),
            "ema_decay must be at least 0 and below 1, not {}",
            self.ema_decay
        );
        for (name, value) in [
            ("learning_rate", self.learning_rate),
            ("sigma_shift", self.sigma_shift),
        ] {
            anyhow::ensure!(
                value.is_finite() && value > 0.0,
                "{name} must be positive, not {value}"
            );
        }
        for (name, value) in [
            ("batch", self.batch),
            ("autoencoder_images", self.autoencoder_images),
        ] {
            anyhow::ensure!(value > 0, "{name} must be positive, not 0");
        }
        let network = &self.network;
        let tokenizer = Tokenizer::for_shapes(network.max_tokens);
        anyhow::ensure!(
            network.vocabulary_size == tokenizer.vocabulary().len(),
            "network.vocabulary_size must be {}, the shapes vocabulary's size, not {}",
            tokenizer.vocabulary().len(),
            network.vocabulary_size
        );
        anyhow::ensure!(
            network.conv_head > 0 || !network.conv_head_features,
            "network.conv_head_features needs a convolutional head (network.conv_head is 0)"
        );
        Ok(())
    }
}

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    settings: TrainSettings,
    step: usize,
    seconds: f64,
    autoencoder: AutoencoderConfig,
    preview: PreviewConfig,
    /// Mean loss of each block of steps, for the record.
    loss_history: Vec<(usize, f32)>,
    /// The next data-set index to draw.
    next_index: u64,
    /// Changes of settings during the run, for the record.
    #[serde(default)]
    notes: Vec<String>,
    /// The running mean loss at each noise level (older runs: none yet).
    #[serde(default)]
    loss_by_sigma: LossBalance,
    /// Updates the optimizer has made with the moments in [`OPTIMIZER_FILE`] (older runs and
    /// folders without that file: 0).
    #[serde(default)]
    optimizer_steps: usize,
    /// The reflow couplings the run trained on when saved (0: the data set's pictures).
    #[serde(default)]
    couplings: usize,
}

/// A training run in progress.
pub struct Trainer {
    settings: TrainSettings,
    tokenizer: Tokenizer,
    varmap: VarMap,
    networks: Networks,
    optimizer: Adam,
    ema: HashMap<String, Tensor>,
    autoencoder: PatchAutoencoder,
    preview: LatentPreview,
    step: usize,
    seconds: f64,
    loss_history: Vec<(usize, f32)>,
    next_index: u64,
    notes: Vec<String>,
    loss_by_sigma: LossBalance,
    /// `[1, C, 1, 1]` weights of the latent channels' squared errors; none at power 0.
    channel_weights: Option<Tensor>,
    /// A reflow run's teacher couplings, trained on instead of the data set's pictures.
    couplings: Option<Couplings>,
    device: Device,
}

fn pictures(seed: u64, count: usize, device: &Device) -> anyhow::Result<Tensor> {
    let images: Vec<Tensor> = (0..count as u64)
        .map(|i| tensor_from_image(&sample(seed, i).image))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::stack(&images, 0)?.to_device(device)?)
}

/// Where the names of a convolutional head's weights start.
const CONV_HEAD_PREFIX: &str = "velocity.conv_head.";
/// Where the names of the DiT blocks' weights start (then the block's index).
const BLOCK_PREFIX: &str = "velocity.blocks.";

/// Parts a resumed run adds to its network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Growth {
    /// A convolutional head of this many channels, for a run that has none.
    pub conv_head: Option<usize>,
    /// The resolutions the convolutional head works at, more than it has.
    pub conv_head_scales: Option<usize>,
    /// Residual blocks of the convolutional head at latent resolution, more than it has: the
    /// new ones go after the last, where, with their second convolution at zero, they pass the
    /// features on unchanged until they learn.
    pub conv_head_blocks: Option<usize>,
    /// DiT blocks in all, more than it has: the new ones go after the last, where, with their
    /// adaLN-Zero gates at zero, they pass the tokens on unchanged until they learn.
    pub depth: Option<usize>,
    /// Whether the convolutional head gets the DiT's token features, for a head without them:
    /// their projection starts at zero, so the head is unchanged until it learns.
    pub conv_head_features: bool,
}

impl Growth {
    /// What `current` must grow by to become `wanted`; refuses any other difference, naming
    /// the field (a run's widths, heads and latent layout are fixed at its start).
    pub fn toward(current: &NetworkConfig, wanted: &NetworkConfig) -> anyhow::Result<Growth> {
        let changed = |a: usize, b: usize| (a != b).then_some(b);
        let growth = Growth {
            conv_head: (current.conv_head == 0 && wanted.conv_head > 0).then_some(wanted.conv_head),
            conv_head_scales: changed(current.conv_head_scales, wanted.conv_head_scales),
            conv_head_blocks: changed(current.conv_head_blocks, wanted.conv_head_blocks),
            depth: changed(current.depth, wanted.depth),
            conv_head_features: wanted.conv_head_features && !current.conv_head_features,
        };
        let mut grown = current.clone();
        growth.apply(&mut grown)?;
        let (grown, wanted) = (serde_json::to_value(&grown)?, serde_json::to_value(wanted)?);
        if let Some((field, value)) = wanted
            .as_object()
            .into_iter()
            .flatten()
            .find(|(field, value)| grown.get(field.as_str()) != Some(value))
        {
            anyhow::bail!(
                "network.{field} cannot change from {} to {value}: only the convolutional head \
                 and the depth can grow on --resume",
                grown[field.as_str()]
            );
        }
        Ok(growth)
    }

    /// Changes `network` as asked; returns the prefixes of the new weights' names.
    fn apply(self, network: &mut NetworkConfig) -> anyhow::Result<Vec<String>> {
        let mut added = Vec::new();
        if let Some(channels) = self.conv_head {
            anyhow::ensure!(
                network.conv_head == 0,
                "it already has a convolutional head ({} channels)",
                network.conv_head
            );
            anyhow::ensure!(channels > 0, "a convolutional head needs channels");
            network.conv_head = channels;
            added.push(CONV_HEAD_PREFIX.to_string());
        }
        if let Some(scales) = self.conv_head_scales {
            anyhow::ensure!(
                network.conv_head > 0,
                "it has no convolutional head to add scales to"
            );
            anyhow::ensure!(
                scales >= network.conv_head_scales.max(1),
                "its convolutional head already works at {} scales (asked for {scales})",
                network.conv_head_scales
            );
            anyhow::ensure!(
                network.latent_size.is_multiple_of(1 << (scales - 1)),
                "{scales} scales do not divide a latent side of {}",
                network.latent_size
            );
            // A head added in the same call is new as a whole, coarse scales and all.
            if scales > network.conv_head_scales && self.conv_head.is_none() {
                added.push(format!(
                    "{CONV_HEAD_PREFIX}{}",
                    format!("{COARSE_SCALE_NAME}.").repeat(network.conv_head_scales)
                ));
            }
            network.conv_head_scales = scales;
        }
        if let Some(blocks) = self.conv_head_blocks {
            anyhow::ensure!(
                network.conv_head > 0,
                "it has no convolutional head to add blocks to"
            );
            anyhow::ensure!(
                blocks >= network.conv_head_blocks,
                "its convolutional head already has {} blocks (asked for {blocks})",
                network.conv_head_blocks
            );
            // A head added in the same call is new as a whole, blocks and all.
            if self.conv_head.is_none() {
                added.extend(
                    (network.conv_head_blocks..blocks)
                        .map(|block| format!("{CONV_HEAD_PREFIX}blocks.{block}.")),
                );
            }
            network.conv_head_blocks = blocks;
        }
        if self.conv_head_features {
            anyhow::ensure!(
                network.conv_head > 0,
                "it has no convolutional head to give the DiT's features to"
            );
            anyhow::ensure!(
                !network.conv_head_features,
                "its convolutional head already gets the DiT's features"
            );
            if self.conv_head.is_none() {
                added.push(format!("{CONV_HEAD_PREFIX}features."));
            }
            network.conv_head_features = true;
        }
        if let Some(depth) = self.depth {
            anyhow::ensure!(
                depth >= network.depth,
                "its DiT already has {} blocks (asked for {depth})",
                network.depth
            );
            added.extend((network.depth..depth).map(|block| format!("{BLOCK_PREFIX}{block}.")));
            network.depth = depth;
        }
        Ok(added)
    }
}

/// What the checkpoint in `folder` records besides its tensors.
fn read_state(folder: &Path) -> anyhow::Result<CheckpointState> {
    let state_path = folder.join(CHECKPOINT_STATE);
    serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("{} is broken", state_path.display()))
}

/// The seed the autoencoder is fitted on, apart from the training stream.
const AUTOENCODER_SEED_OFFSET: u64 = 1_000_003;

/// The pictures a run's autoencoder and preview are fitted on (and its channel weights
/// measured on), from a seed apart from the training stream.
fn autoencoder_pictures(settings: &TrainSettings, device: &Device) -> anyhow::Result<Tensor> {
    pictures(
        settings.data_seed + AUTOENCODER_SEED_OFFSET,
        settings.autoencoder_images,
        device,
    )
}

impl Trainer {
    /// Starts a run: fits the autoencoder and preview, initialises the networks.
    pub fn new(settings: TrainSettings, device: &Device) -> anyhow::Result<Self> {
        let fit_images = autoencoder_pictures(&settings, device)?;
        let autoencoder = PatchAutoencoder::fit(
            &fit_images,
            settings.network.latent_channels,
            settings.latent_whitening,
        )?;
        let preview = autoencoder.fit_preview(&fit_images)?;
        let state = CheckpointState {
            autoencoder: autoencoder.config(),
            preview: PreviewConfig {
                matrix: preview.matrix.clone(),
                bias: preview.bias,
            },
            settings,
            step: 0,
            seconds: 0.0,
            loss_history: Vec::new(),
            next_index: 0,
            notes: Vec::new(),
            loss_by_sigma: LossBalance::default(),
            optimizer_steps: 0,
            couplings: 0,
        };
        Self::assemble(state, autoencoder, None, None, Some(&fit_images), device)
    }

    /// Continues the run checkpointed in `folder`, first adding to its network whatever
    /// `growth` asks for: freshly initialised, starting as the identity, noted in the record.
    pub fn resume(folder: &Path, device: &Device, growth: Growth) -> anyhow::Result<Self> {
        let mut state = read_state(folder)?;
        let old_network = state.settings.network.clone();
        let added = growth.apply(&mut state.settings.network).with_context(|| {
            format!("cannot grow the network of the run in {}", folder.display())
        })?;
        let tensors_path = folder.join(CHECKPOINT_FILE);
        let mut tensors = candle_core::safetensors::load(&tensors_path, device)
            .with_context(|| format!("cannot read {}", tensors_path.display()))?;
        let optimizer_path = folder.join(OPTIMIZER_FILE);
        let optimizer_state = optimizer_path
            .exists()
            .then(|| candle_core::safetensors::load(&optimizer_path, device))
            .transpose()
            .with_context(|| format!("cannot read {}", optimizer_path.display()))?;
        if !tensors.keys().any(|name| name.starts_with(AVERAGED_PREFIX)) {
            let model_path = folder.join(WEIGHTS_FILE);
            let averaged = candle_core::safetensors::load(&model_path, device)
                .with_context(|| format!("cannot read {}", model_path.display()))?;
            tensors.extend(
                averaged
                    .into_iter()
                    .map(|(name, tensor)| (format!("{AVERAGED_PREFIX}{name}"), tensor)),
            );
        }
        let tensor = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .with_context(|| format!("{} has no tensor {name}", tensors_path.display()))
        };
        let autoencoder = PatchAutoencoder::from_parts(
            tensor("autoencoder.mean")?,
            tensor("autoencoder.encoder")?,
            &state.autoencoder,
        );
        let new_network = state.settings.network.clone();
        let couplings = Couplings::read(folder, device)?;
        let couplings_trained = state.couplings;
        let mut trainer = Self::assemble(
            state,
            autoencoder,
            Some((&tensors, &added)),
            optimizer_state.as_ref(),
            None,
            device,
        )?;
        trainer.note_change("conv_head", old_network.conv_head, new_network.conv_head);
        trainer.note_change(
            "conv_head_scales",
            old_network.conv_head_scales,
            new_network.conv_head_scales,
        );
        trainer.note_change(
            "conv_head_blocks",
            old_network.conv_head_blocks,
            new_network.conv_head_blocks,
        );
        trainer.note_change(
            "conv_head_features",
            old_network.conv_head_features,
            new_network.conv_head_features,
        );
        trainer.note_change("depth", old_network.depth, new_network.depth);
        if let Some(couplings) = couplings {
            trainer.note_change("couplings", couplings_trained, couplings.len());
            trainer.couplings = Some(couplings);
        }
        Ok(trainer)
    }

    /// Builds the trainer's networks: from a checkpoint's raw and averaged weights, where one
    /// is given (with the prefixes of the parts added since, which are initialised fresh), or
    /// freshly initialised. `fit_images` are the autoencoder's pictures where the caller has
    /// them at hand (else they are rendered again if the loss weights need them).
    fn assemble(
        state: CheckpointState,
        autoencoder: PatchAutoencoder,
        checkpoint: Option<(&HashMap<String, Tensor>, &[String])>,
        optimizer_state: Option<&HashMap<String, Tensor>>,
        fit_images: Option<&Tensor>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let settings = state.settings;
        let varmap = VarMap::new();
        let networks = Networks::new(
            &settings.network,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        let is_added = |name: &str| match checkpoint {
            None => true,
            Some((_, added)) => added.iter().any(|prefix| name.starts_with(prefix.as_str())),
        };
        redraw_initial_weights(&varmap, settings.seed, device, is_added)?;
        let mut ema = HashMap::new();
        for (name, var) in varmap
            .data()
            .lock()
            .expect("the var map is not poisoned")
            .iter()
        {
            if let Some((saved, _)) = checkpoint.filter(|_| !is_added(name)) {
                let raw = saved
                    .get(&format!("{RAW_PREFIX}{name}"))
                    .with_context(|| format!("the checkpoint has no tensor {RAW_PREFIX}{name}"))?;
                var.set(raw)?;
                let averaged = saved
                    .get(&format!("{AVERAGED_PREFIX}{name}"))
                    .with_context(|| {
                        format!("neither the checkpoint nor {WEIGHTS_FILE} has the averaged {name}")
                    })?;
                ema.insert(name.clone(), averaged.clone());
            } else {
                ema.insert(name.clone(), var.as_detached_tensor().copy()?);
            }
        }
        let channel_weights =
            ChannelWeights::for_settings(&settings, &autoencoder, fit_images, device)?;
        let named_vars = varmap
            .data()
            .lock()
            .expect("the var map is not poisoned")
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        let mut optimizer = Adam::new(
            named_vars,
            ParamsAdamW {
                lr: settings.learning_rate,
                weight_decay: 0.0,
                ..ParamsAdamW::default()
            },
        )?;
        if let Some(saved) = optimizer_state {
            optimizer.restore(state.optimizer_steps, saved)?;
        }
        Ok(Trainer {
            tokenizer: Tokenizer::for_shapes(settings.network.max_tokens),
            settings,
            varmap,
            networks,
            optimizer,
            ema,
            autoencoder,
            preview: LatentPreview {
                matrix: state.preview.matrix,
                bias: state.preview.bias,
            },
            step: state.step,
            seconds: state.seconds,
            loss_history: state.loss_history,
            next_index: state.next_index,
            notes: state.notes,
            loss_by_sigma: state.loss_by_sigma,
            channel_weights,
            couplings: None,
            device: device.clone(),
        })
    }

    /// Resumes the run checkpointed in `folder`, moved to `preset`'s settings where one is
    /// given: its network grows to the preset's (see [`Growth::toward`]) and the settings a run
    /// can change take the preset's values from now on (see [`Trainer::adopt`]).
    pub fn resume_toward(
        folder: &Path,
        device: &Device,
        preset: Option<&TrainSettings>,
    ) -> anyhow::Result<Self> {
        let Some(preset) = preset else {
            return Self::resume(folder, device, Growth::default());
        };
        let growth = Growth::toward(&read_state(folder)?.settings.network, &preset.network)
            .with_context(|| {
                format!("cannot grow the network of the run in {}", folder.display())
            })?;
        let mut trainer = Self::resume(folder, device, growth)?;
        trainer.adopt(preset)?;
        Ok(trainer)
    }

    /// Takes `preset`'s values for every setting a run can change midway, noting each change
    /// in the run's record; refuses a preset that differs in a setting fixed at a run's start.
    pub fn adopt(&mut self, preset: &TrainSettings) -> anyhow::Result<()> {
        let current = &self.settings;
        for (name, same) in [
            ("network", current.network == preset.network),
            ("batch", current.batch == preset.batch),
            ("warmup_steps", current.warmup_steps == preset.warmup_steps),
            (
                "caption_dropout",
                current.caption_dropout == preset.caption_dropout,
            ),
            ("data_seed", current.data_seed == preset.data_seed),
            ("seed", current.seed == preset.seed),
            (
                "autoencoder_images",
                current.autoencoder_images == preset.autoencoder_images,
            ),
            (
                "uniform_sigma_share",
                current.uniform_sigma_share == preset.uniform_sigma_share,
            ),
            (
                "latent_whitening",
                current.latent_whitening == preset.latent_whitening,
            ),
        ] {
            anyhow::ensure!(
                same,
                "{name} is fixed when a run starts; the preset differs from the run's"
            );
        }
        self.set_sigma_shift(preset.sigma_shift);
        self.set_time_sampling(preset.time_sampling);
        self.set_learning_rate(preset.learning_rate);
        self.set_ema_decay(preset.ema_decay)?;
        self.set_posterior_references(preset.posterior_references);
        self.set_loss_balance(preset.loss_balance);
        self.set_shape_weights(preset.shape_weights.clone());
        if preset.channel_loss_power != self.settings.channel_loss_power {
            self.set_channel_loss_power(preset.channel_loss_power)?;
        }
        Ok(())
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    pub fn seconds(&self) -> f64 {
        self.seconds
    }

    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    /// Changes the σ shift of a resumed run from now on, noting the change in the record.
    pub fn set_sigma_shift(&mut self, shift: f64) {
        let old = std::mem::replace(&mut self.settings.sigma_shift, shift);
        self.note_change("sigma_shift", old, shift);
    }

    /// Changes the posterior references of a resumed run from now on, noting the change in the
    /// record.
    pub fn set_posterior_references(&mut self, count: usize) {
        let old = std::mem::replace(&mut self.settings.posterior_references, count);
        self.note_change("posterior_references", old, count);
    }

    /// Changes the learning rate of a resumed run from now on, noting the change in the record.
    pub fn set_learning_rate(&mut self, rate: f64) {
        let old = std::mem::replace(&mut self.settings.learning_rate, rate);
        self.note_change("learning_rate", old, rate);
    }

    /// Changes how slowly the shipped weights average the trained ones from now on (each step
    /// keeps `decay` of the average), noting the change in the record. The average goes on from
    /// where it is, so a longer one reaches its full length only after about `1 / (1 − decay)`
    /// more steps.
    pub fn set_ema_decay(&mut self, decay: f64) -> anyhow::Result<()> {
        anyhow::ensure!(
            (0.0..1.0).contains(&decay),
            "the EMA decay must be at least 0 and below 1, not {decay}"
        );
        let old = std::mem::replace(&mut self.settings.ema_decay, decay);
        self.note_change("ema_decay", old, decay);
        Ok(())
    }

    /// Changes how far the noise levels' shares of the gradient are evened out from now on,
    /// noting the change in the record.
    pub fn set_loss_balance(&mut self, balance: f64) {
        let old = std::mem::replace(&mut self.settings.loss_balance, balance);
        self.note_change("loss_balance", old, balance);
    }

    /// Changes how far the latent channels' shares of the loss are evened out from now on,
    /// noting the change in the record.
    /// The weights are measured first, so a failure leaves the run as it was.
    pub fn set_channel_loss_power(&mut self, power: f64) -> anyhow::Result<()> {
        let settings = TrainSettings {
            channel_loss_power: power,
            ..self.settings.clone()
        };
        self.channel_weights =
            ChannelWeights::for_settings(&settings, &self.autoencoder, None, &self.device)?;
        let old = std::mem::replace(&mut self.settings.channel_loss_power, power);
        self.note_change("channel_loss_power", old, power);
        Ok(())
    }

    /// Changes how often each shape is trained on from now on, noting the change in the record.
    pub fn set_shape_weights(&mut self, weights: ShapeWeights) {
        let old = std::mem::replace(&mut self.settings.shape_weights, weights.clone());
        self.note_change("shape_weights", old, weights);
    }

    /// Changes how the time warped into σ is drawn from now on, noting the change in the record.
    pub fn set_time_sampling(&mut self, sampling: TimeSampling) {
        let old = std::mem::replace(&mut self.settings.time_sampling, sampling);
        self.note_change("time_sampling", old, sampling);
    }

    fn note_change<T: PartialEq + std::fmt::Display>(&mut self, setting: &str, old: T, new: T) {
        if old != new {
            let step = self.step;
            self.notes
                .push(format!("from step {step}: {setting} {new} (was {old})"));
        }
    }

    /// Trains on `couplings` from now on (a reflow run: each noise to the teacher's own picture
    /// of it) instead of the data set's pictures, noting it in the run's record.
    pub fn set_couplings(&mut self, couplings: Couplings) -> anyhow::Result<()> {
        anyhow::ensure!(!couplings.is_empty(), "there are no couplings to train on");
        let before = self.couplings.as_ref().map_or(0, Couplings::len);
        self.note_change("couplings", before, couplings.len());
        self.couplings = Some(couplings);
        Ok(())
    }

    /// One optimisation step on a fresh batch; returns its loss.
    pub fn train_step(&mut self) -> anyhow::Result<f32> {
        let started = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(self.settings.seed);
        rng.set_stream(self.step as u64);
        let batch = self.settings.batch;
        anyhow::ensure!(
            self.couplings.is_none() || self.settings.posterior_references == 0,
            "a reflow run trains each noise towards the teacher's own picture of it, which \
             posterior references would replace; use a preset with posterior_references = 0"
        );
        let (clean, noise, texts, captions, noise_seed) = match &self.couplings {
            Some(couplings) => {
                let indices: Vec<u32> = (0..batch)
                    .map(|_| rng.random_range(0..couplings.len() as u32))
                    .collect();
                let (noise, clean, texts) = couplings.batch(&indices)?;
                (clean, noise, texts, Vec::new(), rng.random::<u64>())
            }
            None => {
                let (images, captions) = self.draw_batch(&mut rng)?;
                let clean = self
                    .autoencoder
                    .encode(&Tensor::stack(&images, 0)?.to_device(&self.device)?)?;
                let texts: Vec<String> = captions
                    .iter()
                    .map(|c| c.as_ref().map(Caption::text).unwrap_or_default())
                    .collect();
                let noise_seed = rng.random::<u64>();
                let noise = gaussian(noise_seed, clean.shape(), &self.device)?;
                (clean, noise, texts, captions, noise_seed)
            }
        };
        let settings = &self.settings;
        let ids = self.tokenizer.batch(&texts, &self.device)?;
        let sigmas = draw_sigmas(settings, noise_seed, batch, &mut rng);
        let sigma = Tensor::from_slice(&sigmas, batch, &self.device)?;
        let sigma_4d = sigma.reshape((batch, 1, 1, 1))?;
        let noisy =
            (noise.broadcast_mul(&sigma_4d)? + clean.broadcast_mul(&(1.0 - &sigma_4d)?)?)?;
        let target = match settings.posterior_references {
            0 => (&noise - &clean)?,
            count => {
                let references = self.references(&captions, count)?;
                posterior_target(&noise, &clean, &noisy, &sigma, &references)?
            }
        };

        // Warm up while the optimizer's moments are young: from a run's start, or from a resume
        // without its saved moments.
        let warmup = (self.optimizer.steps() + 1) as f64 / settings.warmup_steps.max(1) as f64;
        self.optimizer
            .set_learning_rate(settings.learning_rate * warmup.min(1.0));
        let predicted = self.networks.velocity(&noisy, &sigma, &ids)?;
        let squared = (predicted - target)?.sqr()?;
        let squared = match &self.channel_weights {
            Some(weights) => squared.broadcast_mul(weights)?,
            None => squared,
        };
        let per_picture = squared.flatten_from(1)?.mean(1)?;
        let losses: Vec<f32> = per_picture.to_vec1()?;
        self.loss_by_sigma.record(&sigmas, &losses);
        let weights = self.loss_by_sigma.weights(&sigmas, settings.loss_balance);
        let weighted = (per_picture * Tensor::from_vec(weights, batch, &self.device)?)?;
        self.optimizer.backward_step(&weighted.mean_all()?)?;

        let decay = settings
            .ema_decay
            .min((1 + self.step) as f64 / (10 + self.step) as f64);
        for (name, var) in self
            .varmap
            .data()
            .lock()
            .expect("the var map is not poisoned")
            .iter()
        {
            let averaged = self.ema.get_mut(name).expect("every var has an average");
            // Detached, or every average would keep the previous one alive through its graph.
            *averaged =
                ((&*averaged * decay)? + (var.as_detached_tensor() * (1.0 - decay))?)?.detach();
        }
        self.step += 1;
        self.seconds += started.elapsed().as_secs_f64();
        Ok(losses.iter().sum::<f32>() / batch as f32)
    }

    /// The next batch's pictures and captions (`None` where dropped), skipping held-out
    /// captions and the pictures that shape weighting leaves out; `rng` decides the dropout.
    fn draw_batch(
        &mut self,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<(Vec<Tensor>, Vec<Option<Caption>>)> {
        let settings = &self.settings;
        let mut images = Vec::with_capacity(settings.batch);
        let mut captions = Vec::with_capacity(settings.batch);
        while images.len() < settings.batch {
            let index = self.next_index;
            self.next_index += 1;
            let drawn = sample(settings.data_seed, index);
            let mut weighting =
                ChaCha8Rng::seed_from_u64(settings.data_seed ^ SHAPE_WEIGHTING_STREAM);
            weighting.set_stream(index);
            if is_held_out(&drawn.caption)
                || !settings
                    .shape_weights
                    .keeps(drawn.caption.shape, &mut weighting)
            {
                continue;
            }
            images.push(tensor_from_image(&drawn.image)?);
            let dropped = rng.random::<f64>() < settings.caption_dropout;
            captions.push((!dropped).then_some(drawn.caption));
        }
        Ok((images, captions))
    }

    /// `[B, count, N]` latents of further pictures of each caption (of random captions where
    /// the caption was dropped), drawn from the step's own stream so a resumed run draws the
    /// same ones.
    fn references(&self, captions: &[Option<Caption>], count: usize) -> anyhow::Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.settings.seed ^ REFERENCE_STREAM);
        rng.set_stream(self.step as u64);
        let mut pictures = Vec::with_capacity(captions.len() * count);
        for caption in captions {
            for _ in 0..count {
                let caption = match caption {
                    Some(caption) => *caption,
                    None => loop {
                        let drawn = Caption::sample(&mut rng);
                        if !is_held_out(&drawn)
                            && self.settings.shape_weights.keeps(drawn.shape, &mut rng)
                        {
                            break drawn;
                        }
                    },
                };
                pictures.push(tensor_from_image(
                    &Scene::sample_for(&caption, &mut rng).render(),
                )?);
            }
        }
        let latents = self
            .autoencoder
            .encode(&Tensor::stack(&pictures, 0)?.to_device(&self.device)?)?;
        Ok(latents.reshape((captions.len(), count, ()))?)
    }

    /// The mean loss of each block of steps so far, by the step ending it.
    pub fn loss_history(&self) -> &[(usize, f32)] {
        &self.loss_history
    }

    /// Records a block's mean loss in the history kept with the checkpoint.
    pub fn record_loss(&mut self, mean_loss: f32) {
        self.loss_history.push((self.step, mean_loss));
    }

    /// Writes the checkpoint and the usable model (EMA weights) into `folder`, atomically.
    pub fn save(&self, folder: &Path, command: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let autoencoder_tensors = [
            (
                "autoencoder.mean".to_string(),
                self.autoencoder.mean.clone(),
            ),
            (
                "autoencoder.encoder".to_string(),
                self.autoencoder.encoder.clone(),
            ),
        ];
        let vars: Vec<(String, Var)> = self
            .varmap
            .data()
            .lock()
            .expect("the var map is not poisoned")
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();

        let mut checkpoint: HashMap<String, Tensor> = autoencoder_tensors.iter().cloned().collect();
        for (name, var) in &vars {
            checkpoint.insert(format!("{RAW_PREFIX}{name}"), var.as_detached_tensor());
        }
        save_safetensors(&checkpoint, &folder.join(CHECKPOINT_FILE))?;
        save_safetensors(&self.optimizer.state(), &folder.join(OPTIMIZER_FILE))?;
        let autoencoder = self.autoencoder.config();
        let preview = PreviewConfig {
            matrix: self.preview.matrix.clone(),
            bias: self.preview.bias,
        };
        let state = CheckpointState {
            settings: self.settings.clone(),
            step: self.step,
            seconds: self.seconds,
            autoencoder: autoencoder.clone(),
            preview: preview.clone(),
            loss_history: self.loss_history.clone(),
            next_index: self.next_index,
            notes: self.notes.clone(),
            loss_by_sigma: self.loss_by_sigma.clone(),
            optimizer_steps: self.optimizer.steps(),
            couplings: self.couplings.as_ref().map_or(0, Couplings::len),
        };
        write_atomic(
            &folder.join(CHECKPOINT_STATE),
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;

        let mut model: HashMap<String, Tensor> = autoencoder_tensors.into_iter().collect();
        model.extend(self.ema.iter().map(|(n, t)| (n.clone(), t.clone())));
        save_safetensors(&model, &folder.join(WEIGHTS_FILE))?;
        let config = ShapesConfig {
            format: FORMAT.to_string(),
            network: self.settings.network.clone(),
            vocabulary: self.tokenizer.vocabulary().to_vec(),
            autoencoder,
            preview,
            training: serde_json::json!({
                "command": command,
                "settings": self.settings,
                "steps": self.step,
                "seconds": self.seconds,
                "machine": format!("{} logical CPU cores", std::thread::available_parallelism().map_or(1, |n| n.get())),
                "loss_history": self.loss_history,
                "notes": self.notes,
                "flowline_version": env!("CARGO_PKG_VERSION"),
            }),
        };
        write_atomic(
            &folder.join(CONFIG_FILE),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )
    }
}

/// candle's CPU generator cannot be seeded, so every randomly initialised weight is redrawn
/// from Flowline's portable generator, at the scale candle's initialiser uses for it:
/// embeddings N(0, 1), linear and convolution weights Kaiming-normal
/// (std √(2/fan_in)), their biases with the variance of U(±1/√fan_in). Constant
/// initialisations (norm scales, adaLN-Zero's zeros) stay. A seed thus reproduces the run.
/// Only the weights `wanted` names are drawn (a resumed run draws only the parts it adds).
pub(super) fn redraw_initial_weights(
    varmap: &VarMap,
    seed: u64,
    device: &Device,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let data = varmap.data().lock().expect("the var map is not poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (index, name) in names.iter().enumerate() {
        if !wanted(name) {
            continue;
        }
        let current = data[*name].as_tensor();
        let spread = current
            .broadcast_sub(&current.mean_all()?)?
            .sqr()?
            .sum_all()?;
        if spread.to_scalar::<f32>()? == 0.0 {
            continue;
        }
        // Inputs per output: a matrix's columns, a convolution's input channels × kernel.
        let fan_in = |weight: &str| {
            data.get(weight)
                .map(|w| w.dims()[1..].iter().product::<usize>() as f64)
        };
        let std = if name.ends_with("embedding.weight") {
            1.0
        } else if let Some(layer) = name.strip_suffix(".bias") {
            let fan_in = fan_in(&format!("{layer}.weight")).context("a bias has its weight")?;
            1.0 / (3.0 * fan_in).sqrt()
        } else {
            (2.0 / fan_in(name).context("a weight has inputs")?).sqrt()
        };
        let stream = seed.wrapping_mul(1_000_003).wrapping_add(index as u64);
        data[*name].set(&gaussian(stream, current.shape(), device)?.affine(std, 0.0)?)?;
    }
    Ok(())
}

/// Weights of the latent channels' squared errors for `channel_loss_power` P > 0:
/// `variance_c^−P`, scaled to a mean of 1, where `variance_c` is channel `c`'s variance over
/// the pictures the autoencoder was fitted on.
///
/// Why: the shipped latent keeps the principal components' unequal sizes (see
/// [`PatchAutoencoder`]): the three mean-colour channels have a variance hundreds of times
/// that of the thirteen that say where inside its patch an edge runs, so the plain mean
/// squared error is almost blind to a notch or a point smaller than a patch, the detail that
/// tells a heart from a circle. Whitening the latent itself evens them out too, but also
/// drowns the mean colours in noise at once and changes what the sampler sees; weighting the
/// loss leaves the path and the optimum (every channel's posterior mean) as they are and only
/// moves the network's effort. Resumed from the shipped weights (step 28 881) for about 3 400
/// steps each, side by side, P = 0.25 gave 51 % and 69 % adherence at 4 and 16 Euler steps and
/// P = 0.5 48 % and 64 % (200 held-out prompts, default guidance; the shipped 55 % and 65.5 %):
/// within the noise of the sample, so the shipped run keeps P = 0.
struct ChannelWeights;

impl ChannelWeights {
    /// The weights for `settings`' power (none at P = 0), measured on `fit_images`, or on the
    /// autoencoder's pictures rendered again where those are not given.
    fn for_settings(
        settings: &TrainSettings,
        autoencoder: &PatchAutoencoder,
        fit_images: Option<&Tensor>,
        device: &Device,
    ) -> anyhow::Result<Option<Tensor>> {
        let power = settings.channel_loss_power;
        if power == 0.0 {
            return Ok(None);
        }
        let latents = match fit_images {
            Some(images) => autoencoder.encode(images)?,
            None => autoencoder.encode(&autoencoder_pictures(settings, device)?)?,
        };
        let channels = latents.dim(1)?;
        let variances: Vec<f64> = latents
            .transpose(0, 1)?
            .flatten_from(1)?
            .to_dtype(DType::F64)?
            .var_keepdim(1)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Some(
            Self::from_variances(&variances, power, device)?.reshape((1, channels, 1, 1))?,
        ))
    }

    /// `variance^−power` for each channel, scaled to a mean of 1.
    fn from_variances(variances: &[f64], power: f64, device: &Device) -> anyhow::Result<Tensor> {
        let raw: Vec<f64> = variances
            .iter()
            .map(|v| v.max(f64::MIN_POSITIVE).powf(-power))
            .collect();
        let mean = raw.iter().sum::<f64>() / raw.len() as f64;
        let weights: Vec<f32> = raw.iter().map(|w| (w / mean) as f32).collect();
        Ok(Tensor::from_vec(weights, variances.len(), device)?)
    }
}

/// The running mean of the per-picture loss in each of [`LossBalance::BANDS`] equal bands of
/// σ, by which a run with `loss_balance` P > 0 weights every picture's squared error, as
/// `(band mean / mean of the band means)^−P`.
///
/// Why: with the plain mean, each noise level weighs by how large its loss happens to be. In
/// the shipped run (step 28 881, posterior targets over 31 references) the band means run from
/// 0.21 and 0.13 below σ = 0.1, where the network must tell the noise from fine detail, down to
/// 0.03 between σ = 0.3 and 0.6, and up again to 0.08 between 0.85 and 0.95, where the outline
/// is decided. EDM2 (Karras et al. 2024) found evening out the levels' shares with a learnt
/// weight per level trains better; a running mean does the same without more parameters.
/// Resumed from the shipped weights for 2 023 steps at P = 1 it did not help here (52.5 % and
/// 63.5 % adherence at 4 and 16 steps on 200 held-out prompts, against 55 % and 65.5 %).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LossBalance {
    /// One entry per band, from σ = 0 up; none until a picture of the band has been seen.
    means: Vec<Option<f64>>,
}

impl LossBalance {
    /// Bands of σ, each 0.05 wide.
    pub const BANDS: usize = 20;
    /// How much of a band's mean each new picture replaces: about the last hundred count.
    const UPDATE: f64 = 0.01;

    fn band(sigma: f32) -> usize {
        ((sigma.max(0.0) * Self::BANDS as f32) as usize).min(Self::BANDS - 1)
    }

    /// Folds the losses of pictures at noise levels `sigmas` into their bands' means.
    pub fn record(&mut self, sigmas: &[f32], losses: &[f32]) {
        self.means.resize(Self::BANDS, None);
        for (&sigma, &loss) in sigmas.iter().zip(losses) {
            let mean = &mut self.means[Self::band(sigma)];
            *mean = Some(match *mean {
                Some(m) => m + Self::UPDATE * (loss as f64 - m),
                None => loss as f64,
            });
        }
    }

    /// The weight of a picture at each of `sigmas` for balance `power`: 1 where the power is 0
    /// or the band has no mean yet.
    pub fn weights(&self, sigmas: &[f32], power: f64) -> Vec<f32> {
        let seen: Vec<f64> = self.means.iter().flatten().copied().collect();
        if power == 0.0 || seen.is_empty() {
            return vec![1.0; sigmas.len()];
        }
        let overall = seen.iter().sum::<f64>() / seen.len() as f64;
        sigmas
            .iter()
            .map(
                |&sigma| match self.means.get(Self::band(sigma)).copied().flatten() {
                    Some(mean) => (mean / overall).powf(-power) as f32,
                    None => 1.0,
                },
            )
            .collect()
    }
}

/// `count` training noise levels: a time drawn as `settings` say, warped by their σ shift, and
/// a share of σ drawn uniformly instead.
fn draw_sigmas(
    settings: &TrainSettings,
    seed: u64,
    count: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let shift = Scheduler::Shifted {
        shift: settings.sigma_shift,
    };
    let uniform_share = settings.uniform_sigma_share;
    gaussian_values(seed ^ 0x5167_4D41, count)
        .into_iter()
        .map(|n| {
            let sigma = if uniform_share > 0.0 && rng.random::<f64>() < uniform_share {
                rng.random::<f64>()
            } else {
                shift.warp(match settings.time_sampling {
                    TimeSampling::LogitNormal => 1.0 / (1.0 + (-n as f64).exp()),
                    TimeSampling::Uniform => rng.random::<f64>(),
                })
            };
            sigma as f32
        })
        .collect()
}

/// The velocity target whose clean picture is the posterior mean over each item's own picture
/// `clean` and its `references` (`[B, K, N]`), written as the usual `ε − x0` plus the
/// correction `(x0 − x̂0)/σ`, which vanishes where the own picture takes all the weight.
fn posterior_target(
    noise: &Tensor,
    clean: &Tensor,
    noisy: &Tensor,
    sigma: &Tensor,
    references: &Tensor,
) -> anyhow::Result<Tensor> {
    let sigma = sigma.clamp(MIN_POSTERIOR_SIGMA, 1.0)?;
    let own = clean.flatten_from(1)?;
    let candidates = Tensor::cat(&[&own.unsqueeze(1)?, references], 1)?;
    let estimate = posterior::clean_estimate(&noisy.flatten_from(1)?, &sigma, &candidates)?;
    let correction = (own - estimate)?.broadcast_div(&sigma.unsqueeze(1)?)?;
    Ok(((noise - clean)? + correction.reshape(clean.shape())?)?)
}

/// Writes safetensors atomically.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_difference;

    #[test]
    fn uniform_times_train_the_first_sampling_steps_as_often_as_they_are_sampled() {
        let share_above = |sampling: TimeSampling, level: f32| {
            let mut settings = TrainSettings::default_model();
            settings.time_sampling = sampling;
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let sigmas = draw_sigmas(&settings, 11, 20_000, &mut rng);
            assert!(sigmas.iter().all(|s| (0.0..=1.0).contains(s)));
            sigmas.iter().filter(|s| **s > level).count() as f64 / sigmas.len() as f64
        };
        // 16 steps at shift 3 spend 3 evaluations (t = 1, 15/16, 14/16) above σ = 0.95.
        let sampled = 3.0 / 16.0;
        let uniform = share_above(TimeSampling::Uniform, 0.95);
        let logit_normal = share_above(TimeSampling::LogitNormal, 0.95);
        assert!(uniform > 0.6 * sampled, "uniform: {uniform}");
        assert!(logit_normal < 0.3 * sampled, "logit-normal: {logit_normal}");
    }

    /// Shape weights from `(word, weight)` pairs, checked as a preset file's are.
    fn shape_weights(pairs: &[(&str, f64)]) -> Result<ShapeWeights, String> {
        let map: BTreeMap<String, f64> = pairs.iter().map(|&(w, x)| (w.to_string(), x)).collect();
        ShapeWeights::try_from(map)
    }

    #[test]
    fn shape_weights_are_checked_and_give_keep_probabilities() {
        let weights = shape_weights(&[("cross", 2.0), ("star", 1.5)]).expect("valid");
        assert_eq!(weights.keep_probability(Shape::Cross), 1.0);
        assert_eq!(weights.keep_probability(Shape::Star), 0.75);
        assert_eq!(weights.keep_probability(Shape::Circle), 0.5);
        assert_eq!(weights.to_string(), "cross=2,star=1.5");
        assert!(shape_weights(&[]).expect("empty is uniform").is_uniform());
        let all_three: Vec<(&str, f64)> = Shape::ALL.iter().map(|s| (s.name(), 3.0)).collect();
        assert!(shape_weights(&all_three).expect("valid").is_uniform());
        for (pairs, fault) in [
            (&[("blob", 2.0)][..], "'blob' is not a shape"),
            (&[("cross", 0.0)], "must be positive"),
            (&[("cross", -1.0)], "must be positive"),
            (&[("cross", f64::NAN)], "must be positive"),
        ] {
            let error = shape_weights(pairs).expect_err(fault);
            assert!(error.contains(fault), "{pairs:?}: {error}");
        }
    }

    #[test]
    fn weighted_shapes_are_trained_on_in_their_proportions() {
        let mut trainer = Trainer::new(TrainSettings::tiny(), &Device::Cpu).expect("builds");
        trainer.set_shape_weights(shape_weights(&[("cross", 4.0)]).expect("valid"));
        let mut counts: HashMap<Shape, usize> = HashMap::new();
        let mut dropout = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..200 {
            let (_, captions) = trainer.draw_batch(&mut dropout).expect("draws");
            for caption in captions.into_iter().flatten() {
                *counts.entry(caption.shape).or_default() += 1;
            }
        }
        let crosses = counts[&Shape::Cross] as f64;
        let others = Shape::ALL.iter().filter(|s| **s != Shape::Cross);
        let mean_other = others.map(|s| counts[s] as f64).sum::<f64>() / 7.0;
        let ratio = crosses / mean_other;
        assert!(
            (3.3..4.8).contains(&ratio),
            "crosses / other shapes: {ratio}"
        );
        assert!(
            trainer
                .notes
                .iter()
                .any(|n| n.contains("shape_weights cross=4 (was uniform)"))
        );
    }

    #[test]
    fn the_posterior_target_is_the_mean_at_full_noise_and_the_own_velocity_near_data() {
        let device = Device::Cpu;
        let shape = (2, 3, 4, 4);
        let clean = Tensor::randn(0f32, 1.0, shape, &device).unwrap();
        let noise = Tensor::randn(0f32, 1.0, shape, &device).unwrap();
        let references = Tensor::randn(0f32, 1.0, (2, 5, 48), &device).unwrap();
        let target_at = |sigma: f32| {
            let sigmas = Tensor::new(&[sigma, sigma], &device).unwrap();
            let noisy =
                ((&noise * sigma as f64).unwrap() + (&clean * (1.0 - sigma as f64))).unwrap();
            posterior_target(&noise, &clean, &noisy, &sigmas, &references).unwrap()
        };

        let all = Tensor::cat(
            &[
                &clean.flatten_from(1).unwrap().unsqueeze(1).unwrap(),
                &references,
            ],
            1,
        )
        .unwrap();
        let mean = all.mean(1).unwrap().reshape(shape).unwrap();
        let at_full_noise = (&noise - &mean).unwrap();
        assert!(max_difference(&target_at(1.0), &at_full_noise) < 1e-5);

        let own = (&noise - &clean).unwrap();
        assert!(max_difference(&target_at(0.01), &own) < 1e-4);
    }

    #[test]
    fn a_full_loss_balance_gives_every_noise_level_the_same_weighted_loss() {
        let mut balance = LossBalance::default();
        let sigmas = [0.02, 0.5, 0.97];
        assert_eq!(
            balance.weights(&sigmas, 1.0),
            vec![1.0; 3],
            "nothing seen yet"
        );
        // Three bands whose losses differ sixteenfold; their means settle on the latest losses.
        for _ in 0..2_000 {
            balance.record(&sigmas, &[0.8, 0.2, 0.05]);
        }
        let weights = balance.weights(&sigmas, 1.0);
        let weighted: Vec<f32> = [0.8, 0.2, 0.05]
            .iter()
            .zip(&weights)
            .map(|(loss, weight)| loss * weight)
            .collect();
        assert!(
            weighted.iter().all(|w| (w - weighted[0]).abs() < 1e-3),
            "{weighted:?}"
        );

        let half = balance.weights(&sigmas, 0.5);
        assert!(half[0] < half[1] && half[1] < half[2], "{half:?}");
        assert!((half[2] / half[0] - 4.0).abs() < 1e-2, "{half:?}");
        assert_eq!(balance.weights(&sigmas, 0.0), vec![1.0; 3]);
        // A band nothing was seen in yet is weighted 1.
        assert_eq!(balance.weights(&[0.3], 1.0), vec![1.0]);
    }

    #[test]
    fn channel_weights_even_out_the_channels_variances_and_average_one() {
        let device = Device::Cpu;
        let variances = [4.0, 1.0, 0.25];
        let weights = |power: f64| -> Vec<f32> {
            ChannelWeights::from_variances(&variances, power, &device)
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let full = weights(1.0);
        let weighted: Vec<f64> = variances
            .iter()
            .zip(&full)
            .map(|(v, w)| v * f64::from(*w))
            .collect();
        assert!(
            weighted.iter().all(|w| (w - weighted[0]).abs() < 1e-5),
            "{full:?}"
        );
        let half = weights(0.5);
        for (got, want) in half.iter().zip([3.0 / 7.0, 6.0 / 7.0, 12.0 / 7.0]) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{half:?}");
        }
        assert_eq!(weights(0.0), vec![1.0; 3]);
    }
}
