//! Flowline's embedded shapes model and the research around it: the model the default
//! workflow runs, with no download, and everything that made and measures it.
//!
//! Modules from the bottom up: [`dataset`] (the procedural pictures and their captions),
//! [`analyse`] (reads a picture back into a caption, to judge adherence), [`layers`],
//! [`network`] and [`autoencoder`] (the networks), [`tokenizer`], [`config`] (a model
//! folder's `config.json`), [`optimizer`] (AdamW with a saved state), [`classifier`] (the caption classifier for classifier guidance),
//! [`model`] (the loaded model, a [`flowline_engine::model::FlowModel`]), [`exemplar`] (the
//! exact velocity of exemplar pictures, a reference that needs no weights), [`train`],
//! [`eval`] (held-out prompt adherence) and [`reflow`] (straighter paths for few steps).

pub mod analyse;
pub mod autoencoder;
pub mod classifier;
pub mod config;
pub mod dataset;
pub mod eval;
pub mod exemplar;
pub mod layers;
pub mod model;
pub mod network;
pub mod optimizer;
pub mod reflow;
pub mod tokenizer;
pub mod train;

use flowline_engine::model::Family;

/// The families this crate provides, in the order the Load Model node offers them: the
/// exemplar reference, the shapes model (the default workflow's), its weaker guide and its
/// few-step reflowed version.
pub const FAMILIES: [Family; 4] = [
    exemplar::FAMILY,
    model::FAMILY,
    model::GUIDE_FAMILY,
    model::FAST_FAMILY,
];
