//! Finding the pieces of a model on disk by their usual names.
//!
//! A user points the Load Model node at a folder (a Hugging Face snapshot, a diffusers-style
//! folder, a flat folder of downloads) or at one file (a transformer inside a ComfyUI
//! `models/` tree, or a single-file checkpoint holding everything). The loader then finds every
//! other piece where the original releases and ComfyUI put it, unless the user names that
//! piece's file on its own. When a piece is missing, the error lists every place it looked.

use std::path::{Path, PathBuf};

use flowline_engine::model::LoadRequest;

use crate::checkpoint::{Header, Piece, refuse_pickle};
use flowline_engine::error::InputError;

/// The piece parameter value that asks a family to run without that piece.
pub const NONE: &str = "none";

/// Where to look for one weight piece.
pub struct WeightSpec {
    /// What the piece is, for messages.
    pub role: &'static str,
    /// The Load Model parameter that names its file directly.
    pub param: &'static str,
    /// A tensor every file of this piece holds (after the prefix), to recognise it.
    pub probe: &'static str,
    /// Prefixes the piece's tensors carry inside a single-file checkpoint.
    pub prefixes: &'static [&'static str],
    /// Whether the family can run without this piece (the user sets its parameter to `none`).
    pub optional: bool,
    /// Whether a single-file path must hold this piece (the transformer): then a file holding
    /// something else is reported as what it is, instead of searching beside it.
    pub main: bool,
    /// Usual file names relative to the model folder; `*` matches any run of characters, and
    /// several matches of a `-of-` pattern are shards of one piece.
    pub names: &'static [&'static str],
}

/// Finds pieces for one [`LoadRequest`].
pub struct Locator<'a> {
    request: &'a LoadRequest,
    /// The folder usual names are relative to.
    folder: PathBuf,
    /// The checkpoint file other pieces are looked for in first: `request.path` when it is a
    /// file, else the file the main piece was found in.
    single_file: Option<Header>,
}

impl<'a> Locator<'a> {
    pub fn new(request: &'a LoadRequest) -> Result<Locator<'a>, InputError> {
        let path = &request.path;
        if path.as_os_str().is_empty() {
            return Err(InputError(
                "no model path: set the Load Model parameter path to a model folder or a \
                 checkpoint file"
                    .into(),
            ));
        }
        if !path.exists() {
            return Err(InputError(format!(
                "model path {} does not exist",
                path.display()
            )));
        }
        if path.is_dir() {
            return Ok(Locator {
                request,
                folder: path.clone(),
                single_file: None,
            });
        }
        let header = Header::read(path)?;
        Ok(Locator {
            request,
            folder: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            single_file: Some(header),
        })
    }

    /// The piece `spec` describes, or `None` when the user set its parameter to `none` (for
    /// pieces a family can run without).
    pub fn optional_weights(&mut self, spec: &WeightSpec) -> Result<Option<Piece>, InputError> {
        if self
            .request
            .pieces
            .get(spec.param)
            .is_some_and(|p| p.as_os_str() == NONE)
        {
            return Ok(None);
        }
        self.weights(spec).map(Some)
    }

    /// The piece `spec` describes: the file the user named, else the checkpoint file itself
    /// when it holds the piece, else the first usual name that exists. A main piece found in a
    /// folder becomes the checkpoint later pieces are looked for in first (a single-file
    /// release such as `sd3.5_large.safetensors` holds its autoencoder too).
    pub fn weights(&mut self, spec: &WeightSpec) -> Result<Piece, InputError> {
        if let Some(path) = self.request.pieces.get(spec.param) {
            if !path.exists() {
                return Err(InputError(format!(
                    "{} file {} (parameter {}) does not exist",
                    spec.role,
                    path.display(),
                    spec.param
                )));
            }
            let header = Header::read(path)?;
            let piece = piece_from(spec, std::slice::from_ref(&header))?;
            if spec.main {
                self.single_file = Some(header);
            }
            return Ok(piece);
        }
        if let Some(header) = &self.single_file {
            if spec.main {
                return piece_from(spec, std::slice::from_ref(header));
            }
            if let Some(prefix) = find_prefix(spec, header) {
                return Ok(Piece::new(spec.role, std::slice::from_ref(header), prefix));
            }
        }
        let mut looked = Vec::new();
        for name in spec.names {
            let files = matches(&self.folder, name);
            if files.is_empty() {
                looked.push(self.folder.join(name).display().to_string());
                continue;
            }
            let headers = files
                .iter()
                .map(|f| Header::read(f))
                .collect::<Result<Vec<_>, _>>()?;
            let piece = piece_from(spec, &headers)?;
            if spec.main
                && let [header] = headers.as_slice()
            {
                self.single_file = Some(header.clone());
            }
            return Ok(piece);
        }
        let inside = match &self.single_file {
            Some(h) => format!("inside {} and ", h.path.display()),
            None => String::new(),
        };
        let none = if spec.optional {
            format!(", or to {NONE} to run without it")
        } else {
            String::new()
        };
        Err(InputError(format!(
            "{} is missing: looked {inside}for {}; put it there or set the Load Model \
             parameter {} to its file{none}",
            spec.role,
            looked.join(", "),
            spec.param
        )))
    }

    /// A plain file (a tokenizer): the one the user named under `param`, else the first of
    /// `names` that exists in the model folder or in the folder of `beside` (the piece the
    /// file belongs to).
    pub fn file(
        &self,
        role: &str,
        param: &str,
        names: &[&str],
        beside: &Piece,
    ) -> Result<PathBuf, InputError> {
        if let Some(path) = self.request.pieces.get(param) {
            refuse_pickle(path)?;
            return if path.is_file() {
                Ok(path.clone())
            } else {
                Err(InputError(format!(
                    "{role} file {} (parameter {param}) does not exist",
                    path.display()
                )))
            };
        }
        let mut looked = Vec::new();
        let mut folders = vec![self.folder.as_path()];
        if let Some(folder) = beside.files[0].parent()
            && folder != self.folder
        {
            folders.push(folder);
        }
        for folder in folders {
            for name in names {
                let candidate = folder.join(name);
                if candidate.is_file() {
                    return Ok(candidate);
                }
                looked.push(candidate.display().to_string());
            }
        }
        Err(InputError(format!(
            "{role} is missing: looked for {}; put it there or set the Load Model parameter \
             {param} to its file",
            looked.join(", ")
        )))
    }
}

/// The piece in `headers`, or an error naming what the file holds instead.
fn piece_from(spec: &WeightSpec, headers: &[Header]) -> Result<Piece, InputError> {
    match find_prefix(spec, &headers[0]) {
        Some(prefix) => Ok(Piece::new(spec.role, headers, prefix)),
        None => {
            let path = headers[0].path.display();
            Err(InputError(match identify(&headers[0]) {
                Some(what) => format!("{path} is {}, not {}", what.describe(), spec.role),
                None => format!(
                    "{path} is not {}: it has no tensor {}",
                    spec.role, spec.probe
                ),
            }))
        }
    }
}

fn find_prefix(spec: &WeightSpec, header: &Header) -> Option<&'static str> {
    spec.prefixes
        .iter()
        .find(|prefix| {
            header
                .tensors
                .contains_key(&format!("{prefix}{}", spec.probe))
        })
        .copied()
}

/// Files matching `pattern` (relative to `folder`; `*` in the file name only), sorted. A
/// pattern containing `-of-` returns every shard; any other returns at most one file.
fn matches(folder: &Path, pattern: &str) -> Vec<PathBuf> {
    let path = folder.join(pattern);
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    if !name.contains('*') {
        return if path.is_file() {
            vec![path]
        } else {
            Vec::new()
        };
    }
    let parent = path.parent().unwrap_or(folder);
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| glob_match(n, name))
        })
        .collect();
    found.sort();
    if !pattern.contains("-of-") {
        found.truncate(1);
    }
    found
}

/// Whether `name` matches `pattern`, where each `*` stands for any run of characters.
fn glob_match(name: &str, pattern: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The Load Model names of this crate's families. They are here, below the families, so that
/// recognising a file ([`Contents::family`]) needs nothing of the families' code.
pub const FLUX_SCHNELL: &str = "flux-schnell";
pub const FLUX_DEV: &str = "flux-dev";
pub const SD35_LARGE: &str = "sd3.5-large";
pub const SD35_MEDIUM: &str = "sd3.5-medium";

/// What a weight file holds, judged by its tensor names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Contents {
    FluxDev,
    FluxSchnell,
    Sd35Medium,
    Sd3Large,
    DiffusersTransformer,
    StableDiffusionUnet,
    Autoencoder,
    Clip,
    T5,
    Shapes,
}

impl Contents {
    /// "a FLUX.1 \[dev\] transformer", for "this is X, not Y" messages.
    pub fn describe(self) -> &'static str {
        match self {
            Contents::FluxDev => "a FLUX.1 [dev] transformer",
            Contents::FluxSchnell => "a FLUX.1 [schnell] transformer",
            Contents::Sd35Medium => "an SD3.5 Medium MMDiT-X",
            Contents::Sd3Large => "an SD3/SD3.5 Large MMDiT",
            Contents::DiffusersTransformer => {
                "a transformer in diffusers layout (Flowline reads the original release layout, \
                 e.g. flux1-schnell.safetensors)"
            }
            Contents::StableDiffusionUnet => {
                "a Stable Diffusion 1.x/2.x/XL UNet (not a flow-matching model Flowline runs)"
            }
            Contents::Autoencoder => "an autoencoder (VAE)",
            Contents::Clip => "a CLIP text encoder",
            Contents::T5 => "a T5 text encoder",
            Contents::Shapes => "a Flowline shapes model",
        }
    }

    /// The Load Model family that runs a file of these contents, if there is one.
    pub fn family(self) -> Option<&'static str> {
        match self {
            Contents::FluxDev => Some(FLUX_DEV),
            Contents::FluxSchnell => Some(FLUX_SCHNELL),
            Contents::Sd35Medium => Some(SD35_MEDIUM),
            Contents::Sd3Large => Some(SD35_LARGE),
            _ => None,
        }
    }
}

/// What `header`'s file holds, if Flowline recognises it (the diffusion network first, so a
/// single-file checkpoint is named by its transformer).
pub fn identify(header: &Header) -> Option<Contents> {
    let has = |suffix: &str| header.tensors.keys().any(|k| k.ends_with(suffix));
    Some(if has("guidance_in.in_layer.weight") {
        Contents::FluxDev
    } else if has("double_blocks.0.img_attn.qkv.weight") {
        Contents::FluxSchnell
    } else if has("x_block.attn2.qkv.weight") {
        Contents::Sd35Medium
    } else if has("joint_blocks.0.x_block.attn.qkv.weight") {
        Contents::Sd3Large
    } else if has("transformer_blocks.0.attn.to_q.weight") {
        Contents::DiffusersTransformer
    } else if has("input_blocks.0.0.weight") {
        Contents::StableDiffusionUnet
    } else if has("decoder.conv_in.weight") {
        Contents::Autoencoder
    } else if has("text_model.embeddings.token_embedding.weight") {
        Contents::Clip
    } else if has("encoder.block.0.layer.0.SelfAttention.q.weight") {
        Contents::T5
    } else if header.tensors.keys().any(|k| k.starts_with("velocity.")) {
        Contents::Shapes
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_find_one_file_or_every_shard() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("text_encoder_2");
        std::fs::create_dir(&sub).unwrap();
        for name in [
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
        ] {
            std::fs::write(sub.join(name), b"").unwrap();
        }
        std::fs::write(dir.path().join("t5xxl_fp8_e4m3fn.safetensors"), b"").unwrap();
        std::fs::write(dir.path().join("t5xxl_fp16.safetensors"), b"").unwrap();
        let shards = matches(dir.path(), "text_encoder_2/model-*-of-*.safetensors");
        assert_eq!(shards.len(), 2);
        assert!(shards[0].ends_with("model-00001-of-00002.safetensors"));
        assert!(glob_match(
            "model-00001-of-00002.safetensors",
            "model-*-of-*.safetensors"
        ));
        assert!(!glob_match("model.safetensors", "model-*-of-*.safetensors"));
        assert!(glob_match("t5xxl.safetensors", "t5xxl*.safetensors"));
        assert!(!glob_match("t5xxl_fp16.gguf", "t5xxl*.safetensors"));
        let one = matches(dir.path(), "t5xxl*.safetensors");
        assert_eq!(one, [dir.path().join("t5xxl_fp16.safetensors")]);
        assert!(matches(dir.path(), "clip_l.safetensors").is_empty());
    }
}
