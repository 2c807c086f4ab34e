//! Node types: each file declares one node's ports, parameters and behaviour in one place,
//! as ComfyUI's nodes do, so adding a node touches its own file and one line of [`REGISTRY`].

mod cfg;
mod decode;
mod encode_prompt;
mod gaussian_start;
mod load_image;
mod load_latent;
mod load_lora;
mod load_model;
mod preview_image;
mod reroute;
mod sampler;
mod save_image;
mod source_image_start;
mod step_sweep;

pub mod context;

use std::sync::LazyLock;

use self::context::NodeDef;

/// Every node type Flowline knows, in the order a user browses them (by category).
pub static REGISTRY: LazyLock<Vec<NodeDef>> = LazyLock::new(|| {
    vec![
        load_model::definition(),
        load_lora::definition(),
        load_image::definition(),
        encode_prompt::definition(),
        gaussian_start::definition(),
        load_latent::definition(),
        source_image_start::definition(),
        cfg::definition(),
        sampler::definition(),
        step_sweep::definition(),
        decode::definition(),
        save_image::definition(),
        preview_image::definition(),
        reroute::definition(),
    ]
});

/// The node type registered under `type_name`.
pub fn find(type_name: &str) -> Option<&'static NodeDef> {
    REGISTRY.iter().find(|d| d.spec.type_name == type_name)
}
