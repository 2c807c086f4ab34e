//! Models: the networks behind the Load Model node, behind one interface.
//!
//! A [`FlowModel`] bundles what a text-to-image flow model needs — prompt encoder, velocity
//! network and autoencoder — so the graph and the sampler never care which family they drive.
//! Families are found by name in [`FAMILIES`]; each derives its configuration from its files.

pub mod autoencoder;
pub mod checkpoint;
pub mod discovery;
pub mod exemplar;
pub mod flux;
pub mod locate;
pub mod sd3;
pub mod shapes;
pub mod text_encoders;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

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
    /// The guidance strength for networks distilled to take it as an input (FLUX.1 [dev]),
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

    /// Whether a caption classifier comes with the model, for classifier guidance
    /// ([`crate::graph::value::ClassifierGuide`]).
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
pub struct Family {
    pub name: &'static str,
    pub description: &'static str,
    /// Whether the family needs a path (built-in models do not).
    pub needs_path: bool,
    pub load: LoadFn,
}

pub use locate::LoadRequest;

/// Every model family, by name.
pub const FAMILIES: &[Family] = &[
    exemplar::FAMILY,
    shapes::FAMILY,
    shapes::GUIDE_FAMILY,
    flux::SCHNELL,
    flux::DEV,
    sd3::LARGE,
    sd3::MEDIUM,
];

/// The names of [`FAMILIES`], for the Load Model node's choice.
pub const FAMILY_NAMES: &[&str] = &[
    exemplar::FAMILY.name,
    shapes::FAMILY.name,
    shapes::GUIDE_FAMILY.name,
    flux::SCHNELL.name,
    flux::DEV.name,
    sd3::LARGE.name,
    sd3::MEDIUM.name,
];

pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// The error for an image size a fixed-size model cannot draw, as bad input.
pub fn require_size(model: &str, side: usize, width: usize, height: usize) -> anyhow::Result<()> {
    if (width, height) == (side, side) {
        return Ok(());
    }
    Err(crate::nodes::InputError(format!(
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
