//! The exemplar model: the exact flow-matching velocity of a finite set of pictures.
//!
//! For data made of K equally likely exemplars e_k, the velocity a perfect network would learn
//! is closed form: the posterior weight of exemplar k at (x, σ) is
//! `w_k ∝ exp(−‖x − (1−σ)·e_k‖² / 2σ²)`, the clean estimate is `x̂0 = Σ w_k e_k`, and
//! `v = (x − x̂0)/σ`. The prompt picks the exemplars: pictures drawn from Flowline's procedural
//! shapes data set that match every attribute the prompt states, in pixel space (the "latent"
//! is the image scaled to [−1, 1]). It needs no weights, so it runs anywhere, instantly, and
//! serves as the reference a trained model is measured against: it cannot generalise, but it
//! can never miss the prompt.

use std::sync::Arc;

use anyhow::Context;
use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use crate::dataset::{Caption, Scene};
use flowline_engine::error::InputError;
use flowline_engine::flow::{posterior, velocity_from_clean};
use flowline_engine::model::{
    Conditioning, Family, FlowModel, LatentPreview, LoadRequest, require_size, tensor_from_image,
};

pub const FAMILY: Family = Family {
    name: "exemplar",
    description: "built-in shapes model with the exact velocity of exemplar pictures (no weights)",
    needs_path: false,
    uses: &[],
    load,
};

/// Pictures drawn per prompt: enough variety for unstated attributes, cheap per step.
const EXEMPLARS_PER_PROMPT: u64 = 48;
/// The side of the pictures, in pixels.
const SIDE: usize = 64;
/// Exemplars are drawn from this fixed stream so a prompt always means the same pictures.
const EXEMPLAR_SEED: u64 = 0x5EED_E4E3;
/// Smallest σ the posterior is evaluated at (the sampler never evaluates at σ = 0).
const MIN_SIGMA: f64 = 1e-4;

fn load(
    request: &LoadRequest,
    _report: &mut dyn FnMut(String),
) -> anyhow::Result<Arc<dyn FlowModel>> {
    Ok(Arc::new(ExemplarModel {
        device: request.device.clone(),
        preview: LatentPreview {
            matrix: [
                vec![0.5, 0.0, 0.0],
                vec![0.0, 0.5, 0.0],
                vec![0.0, 0.0, 0.5],
            ],
            bias: [0.5; 3],
        },
    }))
}

struct ExemplarModel {
    device: Device,
    preview: LatentPreview,
}

impl ExemplarModel {
    /// `[K, 3·SIDE·SIDE]` exemplars in latent space: scenes for `caption`, or for random
    /// captions when the prompt is empty (the unconditional distribution).
    fn exemplars(&self, caption: Option<&Caption>) -> anyhow::Result<Tensor> {
        let pictures = (0..EXEMPLARS_PER_PROMPT)
            .map(|k| {
                let mut rng =
                    ChaCha8Rng::seed_from_u64(EXEMPLAR_SEED ^ k.wrapping_mul(0x9E37_79B9));
                let caption = match caption {
                    Some(c) => *c,
                    None => Caption::sample(&mut rng),
                };
                let image = Scene::sample_for(&caption, &mut rng).render();
                tensor_from_image(&image)?.affine(2.0, -1.0)?.flatten_all()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&pictures, 0)?.to_device(&self.device)?)
    }
}

impl FlowModel for ExemplarModel {
    fn describe(&self) -> String {
        format!(
            "exemplar shapes model ({EXEMPLARS_PER_PROMPT} exemplars per prompt, {SIDE}×{SIDE} pixels)"
        )
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn latent_shape(&self, width: usize, height: usize) -> anyhow::Result<Vec<usize>> {
        require_size("exemplar", SIDE, width, height)?;
        Ok(vec![1, 3, SIDE, SIDE])
    }

    fn image_tokens(&self, shape: &[usize]) -> usize {
        shape[2] * shape[3]
    }

    fn encode_prompt(&self, text: &str) -> anyhow::Result<Conditioning> {
        let (caption, warnings) = if text.trim().is_empty() {
            (None, Vec::new())
        } else {
            let parsed =
                Caption::parse(text).map_err(|e| InputError(format!("prompt {text:?}: {e}")))?;
            let warnings = if parsed.unknown_words.is_empty() {
                Vec::new()
            } else {
                vec![format!(
                    "unknown words ignored: {}",
                    parsed.unknown_words.join(", ")
                )]
            };
            (Some(parsed.caption), warnings)
        };
        Ok(Conditioning {
            context: self.exemplars(caption.as_ref())?,
            pooled: None,
            prompt: text.to_string(),
            warnings,
            distilled_guidance: None,
        })
    }

    fn velocity(&self, x: &Tensor, sigma: f64, cond: &Conditioning) -> anyhow::Result<Tensor> {
        let sigma = sigma.max(MIN_SIGMA);
        let clean = posterior::clean_estimate(
            &x.flatten_all()?.unsqueeze(0)?,
            &Tensor::new(&[sigma as f32], &self.device)?,
            &cond.context.unsqueeze(0)?,
        )?
        .reshape(x.shape())?;
        Ok(velocity_from_clean(x, &clean, sigma)?)
    }

    fn decode(&self, latent: &Tensor) -> anyhow::Result<Tensor> {
        Ok(latent.squeeze(0)?.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)
    }

    fn encode_image(&self, image: &Tensor) -> anyhow::Result<Tensor> {
        let (_, height, width) = image.dims3().context("an image is [3, H, W]")?;
        self.latent_shape(width, height)?;
        Ok(image
            .to_device(&self.device)?
            .affine(2.0, -1.0)?
            .unsqueeze(0)?)
    }

    fn preview(&self) -> &LatentPreview {
        &self.preview
    }
}
