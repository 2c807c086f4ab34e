//! Flowline's engine: flow-matching mathematics, the node graph, the background executor,
//! workflow files and the models. It knows nothing of any user interface; the desktop app and
//! the command line are thin layers on top.

pub mod analyse;
pub mod dataset;
pub mod eval;
pub mod executor;
pub mod files;
pub mod flow;
pub mod graph;
pub mod model;
pub mod nodes;
pub mod workflow;
