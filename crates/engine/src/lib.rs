//! Flowline's engine: flow-matching mathematics, the node graph and its node types, the
//! background executor, workflow files, and the interface every model family implements.
//!
//! It knows nothing of any user interface, nor of any particular model: the desktop app and
//! the command line are thin layers on top, and model families (FLUX.1 and SD3.5 in
//! `flowline-models`, the embedded shapes model in `flowline-shapes`) implement
//! [`model::FlowModel`] above it and are installed at start with
//! [`model::install_families`].
//!
//! Modules from the bottom up, each using only those before it: [`error`], [`flow`] (the σ
//! convention and the samplers), [`files`], [`contact_sheet`] (labelled grids of pictures),
//! [`model`], [`graph`] (plain graph data, node declarations, the values on links), [`nodes`]
//! (one file per node type and the registry), [`validate`], [`workflow`], [`executor`].

pub mod contact_sheet;
pub mod error;
pub mod executor;
pub mod files;
pub mod flow;
pub mod graph;
pub mod model;
pub mod nodes;
pub mod validate;
pub mod workflow;
