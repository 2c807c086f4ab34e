//! A shapes model folder's `config.json`: network sizes, vocabulary, autoencoder
//! normalisation, the latent→RGB preview and a record of the training that made the weights,
//! with the names of the folder's files. Training writes it; loading reads it.

use std::path::Path;

use flowline_engine::error::InputError;
use serde::{Deserialize, Serialize};

use crate::network::NetworkConfig;

/// Where the shipped weights live: `assets/models/shapes` at the top of the repository.
pub const SHIPPED_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../assets/models/shapes");
/// Where the shipped weights of [`GUIDE_FAMILY`](crate::model::GUIDE_FAMILY) live.
pub const SHIPPED_GUIDE_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/models/shapes-guide"
);
/// Where the shipped weights of [`FAST_FAMILY`](crate::model::FAST_FAMILY) live.
pub const SHIPPED_FAST_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/models/shapes-fast"
);
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The `format` value of every config.
pub const FORMAT: &str = "flowline-shapes";
/// Image side in pixels.
pub const IMAGE_SIZE: usize = 64;

/// Everything in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapesConfig {
    pub format: String,
    pub network: NetworkConfig,
    pub vocabulary: Vec<String>,
    pub autoencoder: AutoencoderConfig,
    pub preview: PreviewConfig,
    /// How the weights were made, so anyone can reproduce them.
    pub training: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderConfig {
    pub scale: f64,
    pub shift: f64,
    /// Per-channel factors of a whitened latent space (see [`crate::autoencoder`]); absent in files
    /// of one scale for all channels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channel_scales: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewConfig {
    pub matrix: [Vec<f32>; 3],
    pub bias: [f32; 3],
}

/// Reads `config.json` from `folder`.
pub fn read_config(folder: &Path) -> anyhow::Result<ShapesConfig> {
    let path = folder.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| InputError(format!("cannot read model config {}: {e}", path.display())))?;
    let config: ShapesConfig = serde_json::from_str(&text)
        .map_err(|e| InputError(format!("model config {} is broken: {e}", path.display())))?;
    if config.format != FORMAT {
        return Err(InputError(format!(
            "{} has format {:?}, not {FORMAT:?}: this is not a shapes model",
            path.display(),
            config.format
        ))
        .into());
    }
    Ok(config)
}
