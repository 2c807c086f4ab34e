//! The model interface: what the Load Model node hands to the rest of the graph.
//!
//! A [`FlowModel`] bundles what a text-to-image flow model needs — prompt encoder, velocity
//! network and autoencoder — so the graph and the sampler never care which family they drive.
//! The families themselves live in crates above the engine (`flowline-models` for FLUX and
//! SD3.5, `flowline-shapes` for the embedded model): a program installs them once at start
//! with [`install_families`], and the Load Model node finds them by name. The engine so
//! depends on no model family, and a new family needs no change here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

use crate::error::InputError;

/// An image side every family takes, at which a model's latent layout is asked for (to compare
/// two models' latent spaces, or to check a latent read from a file).
pub const LATENT_PROBE_SIDE: usize = 64;

/// The distilled guidance FLUX.1 \[dev\] gets when the conditioning names none.
pub const DEFAULT_DISTILLED_GUIDANCE: f64 = 3.5;

/// An encoded prompt: what the velocity network attends to.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Per-token (or per-exemplar) context, family-specific in shape.
    pub context: Tensor,
    /// A pooled vector, for families that take one (CLIP's pooled output in FLUX and SD3).
    pub pooled: Option<Tensor>,
    /// The prompt as the user wrote it.
    pub prompt: String,
    /// Things the user should know, e.g. words the tokenizer does not know and dropped.
    pub warnings: Vec<String>,
    /// The guidance strength for networks distilled to take it as an input (FLUX.1 \[dev\]),
    /// set by the CFG node; `None` leaves the family's default.
    pub distilled_guidance: Option<f64>,
}

/// A linear latent→RGB map, `rgb = matrix · latent + bias`, good enough to watch a run.
#[derive(Debug, Clone, PartialEq)]
pub struct LatentPreview {
    /// One row of per-channel weights for each of R, G, B.
    pub matrix: [Vec<f32>; 3],
    pub bias: [f32; 3],
}

impl LatentPreview {
    /// A map published in ComfyUI's convention (`rgb = factors · latent + bias` in [−1, 1]),
    /// moved to [0, 1]: factors halved, bias halved and raised by ½.
    pub fn from_signed<const C: usize>(factors: &[[f32; C]; 3], bias: [f32; 3]) -> LatentPreview {
        LatentPreview {
            matrix: factors.map(|row| row.iter().map(|f| f / 2.0).collect()),
            bias: bias.map(|b| (b + 1.0) / 2.0),
        }
    }

    /// An sRGB preview of a `[1, C, h, w]` latent, one pixel per latent position.
    pub fn to_rgb(&self, latent: &Tensor) -> candle_core::Result<image::RgbImage> {
        let latent = latent
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .squeeze(0)?;
        let (channels, height, width) = latent.dims3()?;
        let weights: Vec<f32> = self.matrix.iter().flatten().copied().collect();
        let weights = Tensor::from_vec(weights, (3, channels), &Device::Cpu)?;
        let bias = Tensor::new(&self.bias, &Device::Cpu)?.reshape((3, 1))?;
        let rgb = weights
            .matmul(&latent.reshape((channels, height * width))?)?
            .broadcast_add(&bias)?
            .reshape((3, height, width))?;
        image_from_tensor(&rgb)
    }
}

/// A text-to-image flow-matching model.
pub trait FlowModel: Send + Sync {
    /// A line saying what was loaded, for logs and the UI.
    fn describe(&self) -> String;

    /// The device the networks run on.
    fn device(&self) -> &Device;

    /// The `[1, C, h, w]` latent shape for an image of `width` × `height` pixels, or an error
    /// saying which sizes the model supports.
    fn latent_shape(&self, width: usize, height: usize) -> anyhow::Result<Vec<usize>>;

    /// How many image tokens the network sees for a latent of `shape` (FLUX's schedule shift
    /// depends on it).
    fn image_tokens(&self, shape: &[usize]) -> usize;

    fn encode_prompt(&self, text: &str) -> anyhow::Result<Conditioning>;

    /// The velocity `v = ε − x0` at latent `x` and noise level `sigma`.
    fn velocity(&self, x: &Tensor, sigma: f64, cond: &Conditioning) -> anyhow::Result<Tensor>;

    /// The velocities at the same `x` and `sigma` under each of `conds`, in order (CFG's
    /// conditional and unconditional pass). A model that takes a batch of different prompts
    /// runs them as one batch, which on a CPU costs much less than a pass each.
    fn velocities(
        &self,
        x: &Tensor,
        sigma: f64,
        conds: &[&Conditioning],
    ) -> anyhow::Result<Vec<Tensor>> {
        conds
            .iter()
            .map(|cond| self.velocity(x, sigma, cond))
            .collect()
    }

    /// Decodes a `[1, C, h, w]` latent into a `[3, H, W]` image with values in [0, 1].
    fn decode(&self, latent: &Tensor) -> anyhow::Result<Tensor>;

    /// Encodes a `[3, H, W]` image with values in [0, 1] into a `[1, C, h, w]` latent.
    fn encode_image(&self, image: &Tensor) -> anyhow::Result<Tensor>;

    fn preview(&self) -> &LatentPreview;

    /// This model with the LoRA file at `path` applied at `strength` to its velocity network,
    /// sharing its weights; families without LoRA support say so.
    fn with_lora(&self, path: &Path, strength: f64) -> anyhow::Result<Arc<dyn FlowModel>> {
        let _ = (path, strength);
        Err(InputError(format!("{} takes no LoRA", self.describe())).into())
    }

    /// Whether [`FlowModel::batch_conditioning`] works: the model can generate a batch of
    /// different prompts at once.
    fn batches_prompts(&self) -> bool {
        false
    }

    /// One conditioning for a batch of prompts, in order, for models that can generate a batch
    /// of different prompts at once.
    fn batch_conditioning(&self, list: &[Conditioning]) -> anyhow::Result<Conditioning> {
        let _ = list;
        anyhow::bail!(
            "{} cannot take a batch of different prompts",
            self.describe()
        )
    }

    /// Whether a caption classifier comes with the model, for classifier guidance.
    fn has_prompt_classifier(&self) -> bool {
        false
    }

    /// `∇ₓ log p(prompt | x_σ)` for each row of `x` and its prompt in `prompts`, by the
    /// model's caption classifier (only where [`FlowModel::has_prompt_classifier`]).
    fn prompt_gradient(
        &self,
        x: &Tensor,
        sigma: f64,
        prompts: &[String],
    ) -> anyhow::Result<Tensor> {
        let _ = (x, sigma, prompts);
        anyhow::bail!("{} has no caption classifier", self.describe())
    }
}

/// Loads a family's model for a request; `report` receives lines for the user while it does
/// (the memory the load needs, before the weights are read).
pub type LoadFn =
    fn(&LoadRequest, report: &mut dyn FnMut(String)) -> anyhow::Result<Arc<dyn FlowModel>>;

/// A model family: how to load it from a path.
#[derive(Clone)]
pub struct Family {
    pub name: &'static str,
    pub description: &'static str,
    /// Whether the family needs a path (built-in models do not).
    pub needs_path: bool,
    /// The Load Model parameters the family reads, besides `family`: the editor shows only
    /// these.
    pub uses: &'static [&'static str],
    pub load: LoadFn,
}

/// The number format a Load Model node asks the networks to run at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Precision {
    /// f32 on a CPU when the weights fit in memory at f32, else bf16; bf16 on a GPU. candle's
    /// CPU kernels have no fast bf16 path (they convert as they go), so on a CPU bf16 only
    /// saves memory: FLUX sampled 3.5 times slower at bf16 than at f32.
    Auto,
    Fixed(DType),
}

impl Precision {
    /// The format to load at on `device`; `fits_at_f32` says whether the weights fit in
    /// memory at f32 (asked only on a CPU, under `Auto`).
    pub fn resolve(self, device: &Device, fits_at_f32: impl FnOnce() -> bool) -> DType {
        match self {
            Precision::Fixed(dtype) => dtype,
            Precision::Auto if device.is_cpu() && fits_at_f32() => DType::F32,
            Precision::Auto => DType::BF16,
        }
    }
}

/// What a family is asked to load: the Load Model node's parameters.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// A model folder or a single-file checkpoint (empty for built-in models).
    pub path: PathBuf,
    /// Files the user named for single pieces, by piece parameter name (`vae`, `t5`, …).
    pub pieces: BTreeMap<String, PathBuf>,
    /// The number format the networks run at.
    pub precision: Precision,
    pub device: Device,
    /// Keep the text encoders in memory between prompts instead of freeing them after each.
    pub keep_text_encoders: bool,
}

impl LoadRequest {
    /// A request for `path` on `device` at f32, every piece found from `path`.
    pub fn new(path: impl Into<PathBuf>, device: &Device) -> LoadRequest {
        LoadRequest {
            path: path.into(),
            pieces: BTreeMap::new(),
            precision: Precision::Fixed(DType::F32),
            device: device.clone(),
            keep_text_encoders: false,
        }
    }
}

/// Every installed model family, in the order the Load Model node offers them.
static FAMILIES: OnceLock<Vec<Family>> = OnceLock::new();

/// Installs the model families a program offers; call once at start, before the node
/// registry is first read (the Load Model node's `family` choice lists them). Installing the
/// same families again does nothing.
///
/// # Panics
/// If different families were installed before: that is a program error, not a user's.
pub fn install_families(families: impl IntoIterator<Item = Family>) {
    let families: Vec<Family> = families.into_iter().collect();
    let names = |list: &[Family]| list.iter().map(|f| f.name).collect::<Vec<_>>();
    let installed = FAMILIES.get_or_init(|| families.clone());
    assert_eq!(
        names(installed),
        names(&families),
        "model families were installed twice, differently"
    );
}

/// Every installed model family.
///
/// # Panics
/// If none were installed: a program must call [`install_families`] first.
pub fn families() -> &'static [Family] {
    FAMILIES.get().expect(
        "no model families installed: call flowline_engine::model::install_families at start",
    )
}

/// The names of the installed families, for the Load Model node's choice.
pub fn family_names() -> &'static [&'static str] {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES.get_or_init(|| families().iter().map(|f| f.name).collect())
}

/// The installed family called `name`.
pub fn family(name: &str) -> Option<&'static Family> {
    families().iter().find(|f| f.name == name)
}

/// The error for an image size a fixed-size model cannot draw, as bad input.
pub fn require_size(model: &str, side: usize, width: usize, height: usize) -> anyhow::Result<()> {
    if (width, height) == (side, side) {
        return Ok(());
    }
    Err(InputError(format!(
        "the {model} model draws {side}×{side} pictures, not {width}×{height}"
    ))
    .into())
}

/// Converts a `[3, H, W]` tensor in [0, 1] to an 8-bit sRGB image (values are clamped).
pub fn image_from_tensor(t: &Tensor) -> candle_core::Result<image::RgbImage> {
    let (_, height, width) = t.dims3()?;
    let bytes: Vec<u8> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    Ok(
        image::RgbImage::from_raw(width as u32, height as u32, bytes)
            .expect("a [3, H, W] tensor has 3·H·W values"),
    )
}

/// Converts an 8-bit RGB image to a `[3, H, W]` f32 tensor in [0, 1] on the CPU.
pub fn tensor_from_image(image: &image::RgbImage) -> candle_core::Result<Tensor> {
    let (width, height) = image.dimensions();
    let values: Vec<f32> = image.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    Tensor::from_vec(values, (height as usize, width as usize, 3), &Device::Cpu)?.permute((2, 0, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_precision_is_f32_on_a_cpu_where_it_fits_and_bf16_elsewhere() {
        let cpu = Device::Cpu;
        assert_eq!(Precision::Auto.resolve(&cpu, || true), DType::F32);
        assert_eq!(Precision::Auto.resolve(&cpu, || false), DType::BF16);
        let fixed = Precision::Fixed(DType::BF16);
        assert_eq!(
            fixed.resolve(&cpu, || panic!("a fixed precision asks nothing")),
            DType::BF16
        );
    }
}
