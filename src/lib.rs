//! The `flowline` program over its crates: the engine, the model families and the app.
//!
//! The engine knows no model family; the program decides which it offers. This library says
//! so in one place, for the command line, the app and the tests alike.

/// Installs every model family Flowline offers into the engine: the embedded shapes model
/// and its companions first (the default workflow's), then FLUX.1 and SD3.5. Call it before
/// the engine reads a workflow or its node registry; calling it again does nothing.
pub fn install_model_families() {
    flowline_engine::model::install_families(
        flowline_shapes::FAMILIES
            .into_iter()
            .chain(flowline_models::FAMILIES),
    );
}
