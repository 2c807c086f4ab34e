//! Opening ComfyUI's workflows as Flowline workflows.
//!
//! People come to Flowline with workflows made in ComfyUI, as its JSON files (the editor's
//! format or the API "prompt" format) and as the PNGs it saves, which carry both. So every
//! front end opens a workflow through [`open_workflow`], which tells the kinds apart by their
//! content and converts a ComfyUI one: its node types become Flowline's (see `convert` for the
//! mapping), and the model files it names are looked for in a ComfyUI `models/` folder and the
//! Hugging Face cache, as `flowline models` finds them. A node Flowline cannot express stops
//! the import with an [`ImportError`] naming it; nothing is dropped without a word.
//!
//! It lives here, above the engine, because resolving file names and telling the family of a
//! model file needs [`crate::discovery`] and [`crate::locate`].

mod convert;
mod graph;
mod parse;

use std::path::Path;

use flowline_engine::files::{PNG_WORKFLOW_KEY, read_png_text};
use flowline_engine::workflow::{Workflow, WorkflowError};

use self::convert::ModelFolders;
pub use self::graph::ImportError;
use crate::discovery::hf_cache_dir;

/// The PNG text chunks a workflow may ride in, in the order they are preferred: Flowline's
/// own, then ComfyUI's editor workflow (it has the node positions), then ComfyUI's API prompt.
const PNG_KEYS: [&str; 3] = [PNG_WORKFLOW_KEY, "workflow", "prompt"];

/// A workflow file, opened.
#[derive(Debug)]
pub struct Opened {
    pub workflow: Workflow,
    /// What the user should check in a converted ComfyUI workflow: files not found, settings
    /// Flowline does not have.
    pub warnings: Vec<String>,
    /// Whether it was converted from ComfyUI's, so that saving over the file it came from
    /// would replace ComfyUI's workflow with Flowline's.
    pub from_comfyui: bool,
}

/// Why a workflow file could not be opened: all of it is bad input.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
    #[error("{source_name}: {error}")]
    Import {
        source_name: String,
        error: ImportError,
    },
}

/// Opens a Flowline workflow (`.json`, or a PNG Flowline saved) or a ComfyUI one (JSON in
/// either format, or a PNG ComfyUI saved), telling them apart by their content. ComfyUI's
/// model file names are looked up in `models_dir` (a ComfyUI `models/` folder) and the Hugging
/// Face cache.
pub fn open_workflow(path: &Path, models_dir: Option<&Path>) -> Result<Opened, OpenError> {
    let source_name = path.display().to_string();
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let text = if is_png {
        png_workflow(path, &source_name)?
    } else {
        std::fs::read_to_string(path).map_err(|source| WorkflowError::Io {
            path: path.to_path_buf(),
            source,
        })?
    };
    let comfyui = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .filter(|value| value.get("format").is_none() && parse::is_comfyui(value));
    let Some(value) = comfyui else {
        return Ok(Opened {
            workflow: Workflow::from_json(&text, &source_name)?,
            warnings: Vec::new(),
            from_comfyui: false,
        });
    };
    let folders = ModelFolders {
        comfyui: models_dir.map(Path::to_path_buf),
        hf_cache: hf_cache_dir(),
    };
    let imported = parse::read(&value).and_then(|(graph, mut warnings)| {
        let (workflow, more) = convert::convert(&graph, &folders)?;
        warnings.extend(more);
        Ok((workflow, warnings))
    });
    match imported {
        Ok((workflow, warnings)) => Ok(Opened {
            workflow,
            warnings,
            from_comfyui: true,
        }),
        Err(error) => Err(OpenError::Import { source_name, error }),
    }
}

/// The workflow text a PNG carries, whoever saved it.
fn png_workflow(path: &Path, source_name: &str) -> Result<String, WorkflowError> {
    let content = |message: String| WorkflowError::Content {
        source_name: source_name.to_string(),
        message,
    };
    for key in PNG_KEYS {
        if let Some(text) = read_png_text(path, key).map_err(|e| content(format!("{e:#}")))? {
            return Ok(text);
        }
    }
    Err(content(
        "this PNG carries no workflow, neither Flowline's nor ComfyUI's".into(),
    ))
}
