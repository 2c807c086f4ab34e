//! Flowline's real model families: FLUX.1 \[schnell\] and \[dev\] and Stable Diffusion 3.5 Large
//! and Medium, loaded from the user's own weight files.
//!
//! Every family implements the engine's [`flowline_engine::model::FlowModel`] and derives its
//! network's configuration from the files themselves (tensor names and shapes, as ComfyUI
//! does), so pruned, "lite" and tiny test variants load as well as the full releases.
//!
//! Modules from the bottom up: [`checkpoint`] (reading safetensors and GGUF headers and
//! weights, memory checks) and [`parallel_load`], [`locate`] (finding a model's pieces on disk and telling what a
//! file holds), [`conv`] and [`autoencoder_networks`] (the autoencoder's networks, fast on the CPU),
//! [`vector_math`], [`attention`] and [`flux_network`] (FLUX's transformer, likewise), [`autoencoder`] and
//! [`text_encoders`] (the pieces FLUX and SD3.5 share), [`mmdit_network`] (SD3.5's), the families [`flux`] and [`sd3`], [`discovery`] (models in the Hugging Face cache and
//! ComfyUI-style folders), and [`comfyui`] (opening workflows, ComfyUI's converted).

pub mod attention;
pub mod autoencoder;
pub mod autoencoder_networks;
pub mod checkpoint;
pub mod comfyui;
pub mod conv;
pub mod discovery;
pub mod flux;
pub mod flux_network;
pub mod group_norm;
pub mod locate;
pub mod lora;
pub mod mmdit_network;
pub mod parallel_load;
pub mod pointwise;
pub mod sd3;
pub mod text_encoders;
pub mod vector_math;

use flowline_engine::model::Family;

/// The families this crate provides, in the order the Load Model node offers them.
pub const FAMILIES: [Family; 4] = [flux::SCHNELL, flux::DEV, sd3::LARGE, sd3::MEDIUM];

/// What the crate's unit tests share.
#[cfg(test)]
mod test_support {
    use candle_core::Tensor;

    /// The largest absolute difference between two tensors of one shape.
    pub fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap()
    }
}
