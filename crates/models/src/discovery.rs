//! Finding the models a user already has: the Hugging Face cache and a ComfyUI-style `models/`
//! folder, so an existing install works without copying anything.
//!
//! A model is recognised by the tensor names in its safetensors header (never by file name
//! alone), and reported with the family and the path to give the Load Model node.

use std::path::{Path, PathBuf};

use crate::checkpoint::Header;
use crate::locate::identify;

/// A model found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundModel {
    /// The Load Model family that runs it.
    pub family: &'static str,
    /// What to set as the Load Model `path`.
    pub path: PathBuf,
    /// Where it was found, for people: "Hugging Face cache (black-forest-labs/FLUX.1-schnell)".
    pub source: String,
}

/// The Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    let home = std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE"))?;
    Some(PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// The family that runs what `header` holds, if Flowline runs it.
fn family_of(header: &Header) -> Option<&'static str> {
    identify(header)?.family()
}

/// The first runnable model among the `.safetensors` files directly in `folder`.
fn model_in(folder: &Path) -> Option<&'static str> {
    safetensors_files(folder)
        .iter()
        .filter_map(|file| Header::read(file).ok())
        .find_map(|header| family_of(&header))
}

fn safetensors_files(folder: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

fn sorted_dirs(folder: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Every snapshot in a Hugging Face hub cache (`models--org--name/snapshots/REV/`), with the
/// id of its repository (`org/name`).
fn hf_snapshots(cache: &Path) -> Vec<(String, PathBuf)> {
    let mut snapshots = Vec::new();
    for repo in sorted_dirs(cache) {
        let Some(name) = repo.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(id) = name.strip_prefix("models--") else {
            continue;
        };
        let id = id.replacen("--", "/", 1);
        for snapshot in sorted_dirs(&repo.join("snapshots")) {
            snapshots.push((id.clone(), snapshot));
        }
    }
    snapshots
}

/// Models in a Hugging Face hub cache: each snapshot whose top-level safetensors hold a model
/// Flowline runs (the loader finds the other pieces in the snapshot).
pub fn scan_hf_cache(cache: &Path) -> Vec<FoundModel> {
    hf_snapshots(cache)
        .into_iter()
        .filter_map(|(id, snapshot)| {
            let family = model_in(&snapshot)?;
            Some(FoundModel {
                family,
                path: snapshot,
                source: format!("Hugging Face cache ({id})"),
            })
        })
        .collect()
}

/// The file a ComfyUI workflow names by its place in a models folder (`flux1-dev.safetensors`,
/// `flux/ae.safetensors`): under one of `subfolders` of the ComfyUI `models` folder, else in a
/// snapshot of the Hugging Face cache, at its top or one folder down (where releases keep
/// their text encoders and autoencoders).
pub fn find_named_file(
    name: &str,
    subfolders: &[&str],
    models: Option<&Path>,
    hf_cache: Option<&Path>,
) -> Option<PathBuf> {
    let name = name.replace('\\', "/");
    let file_name = Path::new(&name).file_name()?;
    let mut places: Vec<PathBuf> = models
        .into_iter()
        .flat_map(|models| subfolders.iter().map(|sub| models.join(sub).join(&name)))
        .collect();
    if let Some(cache) = hf_cache {
        for (_, snapshot) in hf_snapshots(cache) {
            places.push(snapshot.join(&name));
            places.push(snapshot.join(file_name));
            places.extend(sorted_dirs(&snapshot).iter().map(|d| d.join(file_name)));
        }
    }
    places.into_iter().find(|path| path.is_file())
}

/// Models in a ComfyUI-style `models/` folder: transformers in `unet/`, `diffusion_models/`
/// or `checkpoints/` (the loader finds `vae/`, `clip/` and `text_encoders/` beside them).
pub fn scan_models_folder(models: &Path) -> Vec<FoundModel> {
    let mut found = Vec::new();
    for sub in ["diffusion_models", "unet", "checkpoints"] {
        for file in safetensors_files(&models.join(sub)) {
            if let Some(family) = Header::read(&file).ok().as_ref().and_then(family_of) {
                found.push(FoundModel {
                    family,
                    path: file,
                    source: format!("models folder {}", models.display()),
                });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_files_are_found_in_a_models_folder_then_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let touch = |path: PathBuf| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"").unwrap();
            path
        };
        let models = dir.path().join("models");
        let cache = dir.path().join("hub");
        let unet = touch(models.join("unet/flux/flux1-dev.safetensors"));
        let snapshot = cache.join("models--stabilityai--stable-diffusion-3.5-large/snapshots/c0de");
        let clip_g = touch(snapshot.join("text_encoders/clip_g.safetensors"));
        let cached_unet = touch(snapshot.join("flux1-dev.safetensors"));
        let find = |name: &str, subfolders: &[&str]| {
            find_named_file(name, subfolders, Some(&models), Some(&cache))
        };
        let both = ["diffusion_models", "unet"];
        assert_eq!(find("flux\\flux1-dev.safetensors", &both), Some(unet));
        assert_eq!(find("flux1-dev.safetensors", &both), Some(cached_unet));
        assert_eq!(find("clip_g.safetensors", &["clip"]), Some(clip_g));
        assert_eq!(find("t5xxl_fp16.safetensors", &["clip"]), None);
        assert_eq!(
            find_named_file("clip_g.safetensors", &["clip"], None, None),
            None
        );
    }
}
