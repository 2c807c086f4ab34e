//! The embedded default model, trained by Flowline itself on the procedural shapes data set.
//!
//! A folder holds `config.json` (network sizes, vocabulary, autoencoder normalisation, the
//! latent→RGB preview and a record of the training that made the weights) and
//! `model.safetensors` (all tensors: `text.*`, `velocity.*`, `autoencoder.*`). It is loaded
//! through the same Load Model path as every other family.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use flowline_engine::error::InputError;
use flowline_engine::model::{
    Conditioning, Family, FlowModel, LatentPreview, LoadRequest, require_size,
};

use crate::autoencoder::PatchAutoencoder;
use crate::classifier::{CaptionClassifier, Labels};
use crate::config::{
    IMAGE_SIZE, SHIPPED_DIR, SHIPPED_FAST_DIR, SHIPPED_GUIDE_DIR, ShapesConfig, WEIGHTS_FILE,
    read_config,
};
use crate::dataset::{Caption, GRAMMAR};
use crate::network::Networks;
use crate::tokenizer::Tokenizer;

pub const FAMILY: Family = Family {
    name: "shapes",
    description: "Flowline's own small text-to-image model of coloured shapes (64×64)",
    needs_path: false,
    uses: &["path", "device"],
    load,
};

/// The shapes model as it was earlier in its training: the weaker version of it that the
/// default workflow autoguides it with (see `flowline_engine::graph::value::Autoguide`). Any shapes
/// model folder loads through it too; only the built-in weights differ.
pub const GUIDE_FAMILY: Family = Family {
    name: "shapes-guide",
    description: "the shapes model earlier in its training, to autoguide the shapes model with",
    needs_path: false,
    uses: &["path", "device"],
    load: load_guide,
};

/// The shapes model with straightened paths (`flowline reflow`: a 2-rectified flow trained
/// on the shapes model's own guided pictures): it draws in 1 to 4 steps what the shapes model
/// needs 16 for, with no guidance, so its workflow runs CFG at scale 1.
pub const FAST_FAMILY: Family = Family {
    name: "shapes-fast",
    description: "the shapes model reflowed for few steps (1–4, no guidance needed)",
    needs_path: false,
    uses: &["path", "device"],
    load: load_fast,
};

fn load(
    request: &LoadRequest,
    _report: &mut dyn FnMut(String),
) -> anyhow::Result<Arc<dyn FlowModel>> {
    load_or_shipped(request, SHIPPED_DIR)
}

fn load_guide(
    request: &LoadRequest,
    _report: &mut dyn FnMut(String),
) -> anyhow::Result<Arc<dyn FlowModel>> {
    load_or_shipped(request, SHIPPED_GUIDE_DIR)
}

fn load_fast(
    request: &LoadRequest,
    _report: &mut dyn FnMut(String),
) -> anyhow::Result<Arc<dyn FlowModel>> {
    load_or_shipped(request, SHIPPED_FAST_DIR)
}

/// The model in the request's folder, or in `shipped` where the request names none.
fn load_or_shipped(request: &LoadRequest, shipped: &str) -> anyhow::Result<Arc<dyn FlowModel>> {
    let folder = if request.path.as_os_str().is_empty() {
        PathBuf::from(shipped)
    } else {
        request.path.clone()
    };
    Ok(Arc::new(ShapesModel::load(&folder, &request.device)?))
}

/// The loaded model.
pub struct ShapesModel {
    config: ShapesConfig,
    tokenizer: Tokenizer,
    networks: Networks,
    autoencoder: PatchAutoencoder,
    preview: LatentPreview,
    /// The caption classifier beside the weights, if the folder has one.
    classifier: Option<CaptionClassifier>,
    device: Device,
}

impl ShapesModel {
    /// Loads `config.json` and `model.safetensors` from `folder`; errors name the file and, for
    /// a missing or misshapen tensor, the tensor.
    pub fn load(folder: &Path, device: &Device) -> anyhow::Result<Self> {
        let config = read_config(folder)?;
        let weights_path = folder.join(WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
            InputError(format!(
                "cannot read model weights {}: {e}",
                weights_path.display()
            ))
        })?;
        let mut model = Self::from_tensors(config, tensors, device)
            .map_err(|e| InputError(format!("{}: {e:#}", weights_path.display())))?;
        let network = &model.config.network;
        model.classifier = CaptionClassifier::load_from(
            folder,
            network.latent_channels,
            network.latent_size,
            device,
        )?;
        Ok(model)
    }

    /// Builds the model from its config and named tensors.
    pub fn from_tensors(
        config: ShapesConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::new(config.vocabulary.clone(), config.network.max_tokens)?;
        anyhow::ensure!(
            tokenizer.vocabulary().len() == config.network.vocabulary_size,
            "the config lists {} words but the network expects {}",
            tokenizer.vocabulary().len(),
            config.network.vocabulary_size
        );
        let tensor = |name: &str| {
            tensors
                .get(name)
                .cloned()
                .with_context(|| format!("missing tensor {name}"))
        };
        let autoencoder = PatchAutoencoder::from_parts(
            tensor("autoencoder.mean")?,
            tensor("autoencoder.encoder")?,
            &config.autoencoder,
        );
        let expected = [
            crate::autoencoder::PATCH_VALUES,
            config.network.latent_channels,
        ];
        anyhow::ensure!(
            autoencoder.encoder.dims() == expected,
            "tensor autoencoder.encoder has shape {:?}, expected {expected:?}",
            autoencoder.encoder.dims()
        );
        let scales = &config.autoencoder.channel_scales;
        anyhow::ensure!(
            scales.is_empty() || scales.len() == config.network.latent_channels,
            "autoencoder.channel_scales has {} entries, expected {} (one per latent channel)",
            scales.len(),
            config.network.latent_channels
        );
        let networks = Networks::new(
            &config.network,
            VarBuilder::from_tensors(tensors, DType::F32, device),
        )?;
        let preview = LatentPreview {
            matrix: config.preview.matrix.clone(),
            bias: config.preview.bias,
        };
        Ok(ShapesModel {
            tokenizer,
            networks,
            autoencoder,
            preview,
            config,
            classifier: None,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ShapesConfig {
        &self.config
    }

    /// The autoencoder, whose latent space a caption classifier is trained in.
    pub fn autoencoder(&self) -> &PatchAutoencoder {
        &self.autoencoder
    }
}

impl FlowModel for ShapesModel {
    fn describe(&self) -> String {
        let n = &self.config.network;
        format!(
            "shapes model (DiT {}×{} over {} tokens, {}-channel latents)",
            n.depth,
            n.hidden,
            n.image_tokens(),
            n.latent_channels
        )
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn latent_shape(&self, width: usize, height: usize) -> anyhow::Result<Vec<usize>> {
        require_size("shapes", IMAGE_SIZE, width, height)?;
        let n = &self.config.network;
        Ok(vec![1, n.latent_channels, n.latent_size, n.latent_size])
    }

    fn image_tokens(&self, _shape: &[usize]) -> usize {
        self.config.network.image_tokens()
    }

    fn encode_prompt(&self, text: &str) -> anyhow::Result<Conditioning> {
        let tokens = self.tokenizer.encode(text);
        let mut warnings = Vec::new();
        if !tokens.unknown_words.is_empty() {
            warnings.push(format!(
                "unknown words ignored: {}",
                tokens.unknown_words.join(", ")
            ));
        }
        if !text.trim().is_empty()
            && let Err(problem) = Caption::parse(text)
        {
            warnings.push(format!(
                "{problem}, so the picture is unpredictable: the shapes model knows only \"{GRAMMAR}\""
            ));
        }
        if tokens.truncated > 0 {
            warnings.push(format!(
                "the prompt is longer than {} words; the last {} were cut",
                self.tokenizer.max_tokens() - 1,
                tokens.truncated
            ));
        }
        let ids = Tensor::new(tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok(Conditioning {
            context: self.networks.text.forward(&ids)?,
            pooled: None,
            prompt: text.to_string(),
            warnings,
            distilled_guidance: None,
        })
    }

    fn velocity(&self, x: &Tensor, sigma: f64, cond: &Conditioning) -> anyhow::Result<Tensor> {
        Ok(self.velocities(x, sigma, &[cond])?.remove(0))
    }

    fn velocities(
        &self,
        x: &Tensor,
        sigma: f64,
        conds: &[&Conditioning],
    ) -> anyhow::Result<Vec<Tensor>> {
        let batch = x.dim(0)?;
        let contexts = conds
            .iter()
            .map(|cond| {
                let (_, tokens, width) = cond.context.dims3()?;
                cond.context
                    .broadcast_as((batch, tokens, width))?
                    .contiguous()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let context = Tensor::cat(&contexts, 0)?;
        let x = Tensor::cat(&vec![x; conds.len()], 0)?;
        let sigma = Tensor::full(sigma as f32, batch * conds.len(), &self.device)?;
        let velocity = self.networks.velocity.forward(&x, &sigma, &context)?;
        Ok((0..conds.len())
            .map(|i| velocity.narrow(0, i * batch, batch))
            .collect::<candle_core::Result<_>>()?)
    }

    fn decode(&self, latent: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self
            .autoencoder
            .decode(latent)?
            .squeeze(0)?
            .clamp(0f32, 1f32)?)
    }

    fn encode_image(&self, image: &Tensor) -> anyhow::Result<Tensor> {
        let (_, height, width) = image.dims3()?;
        self.latent_shape(width, height)?;
        Ok(self
            .autoencoder
            .encode(&image.to_device(&self.device)?.unsqueeze(0)?)?)
    }

    fn preview(&self) -> &LatentPreview {
        &self.preview
    }

    fn batches_prompts(&self) -> bool {
        true
    }

    fn has_prompt_classifier(&self) -> bool {
        self.classifier.is_some()
    }

    fn prompt_gradient(
        &self,
        x: &Tensor,
        sigma: f64,
        prompts: &[String],
    ) -> anyhow::Result<Tensor> {
        let Some(classifier) = &self.classifier else {
            anyhow::bail!("{} has no caption classifier", self.describe());
        };
        anyhow::ensure!(
            prompts.len() == x.dim(0)?,
            "{} prompts for {} latents",
            prompts.len(),
            x.dim(0)?
        );
        // A prompt the grammar cannot read states nothing the classifier can judge: its row's
        // gradient is zero.
        let labels: Vec<Labels> = prompts
            .iter()
            .map(|p| {
                Caption::parse(p)
                    .map(|parsed| Labels::of_caption(&parsed.caption))
                    .unwrap_or_default()
            })
            .collect();
        classifier.gradient(x, sigma, &labels)
    }

    fn batch_conditioning(&self, list: &[Conditioning]) -> anyhow::Result<Conditioning> {
        let contexts: Vec<&Tensor> = list.iter().map(|c| &c.context).collect();
        Ok(Conditioning {
            context: Tensor::cat(&contexts, 0)?,
            pooled: None,
            prompt: list
                .iter()
                .map(|c| c.prompt.as_str())
                .collect::<Vec<_>>()
                .join(" | "),
            warnings: list.iter().flat_map(|c| c.warnings.clone()).collect(),
            distilled_guidance: None,
        })
    }
}
