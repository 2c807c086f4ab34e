//! Weight files as they lie on disk: safetensors headers, pieces of a model inside them, and
//! the checks made before anything heavy is read.
//!
//! A safetensors header lists every tensor's name, dtype and shape, so a family can detect what
//! a file is, derive its network sizes and estimate the memory a load needs without touching the
//! weights. GGUF files (quantized weights, for the families candle has quantized networks for)
//! list the same in their own header. Pickle-based formats (`.ckpt`, `.pt`, `.pth`, `.bin`) are
//! refused: unpickling runs whatever code the file carries.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::quantized_var_builder::VarBuilder as QuantizedVarBuilder;
use serde::Deserialize;

use flowline_engine::error::InputError;

use crate::parallel_load::ParallelSafetensors;

/// File extensions of pickle-based checkpoints.
const PICKLE_EXTENSIONS: [&str; 5] = ["ckpt", "pt", "pth", "bin", "pkl"];
/// A header larger than this is not a real safetensors header.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Refuses pickle files, saying why; anything else passes.
pub fn refuse_pickle(path: &Path) -> Result<(), InputError> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if PICKLE_EXTENSIONS.contains(&extension.as_str()) {
        return Err(InputError(format!(
            "{} is a pickle file (.{extension}); Flowline does not open pickle files because \
             loading one can run arbitrary code hidden in it. Use the .safetensors version of \
             these weights (most model pages offer one), or convert the file to safetensors.",
            path.display()
        )));
    }
    Ok(())
}

/// Whether `path` is a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// One tensor as its header describes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<usize>,
    /// The bytes of a GGUF tensor, which stays quantized once loaded.
    #[serde(skip)]
    pub quantized_bytes: Option<u64>,
}

impl TensorInfo {
    /// Bytes per value as stored, or `None` for a dtype Flowline does not know.
    fn stored_bytes_per_value(&self) -> Option<usize> {
        Some(match self.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
            _ => return None,
        })
    }

    pub fn values(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The header of one safetensors file.
#[derive(Debug, Clone)]
pub struct Header {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl Header {
    /// Reads the header of `path`; errors name the file.
    pub fn read(path: &Path) -> Result<Header, InputError> {
        refuse_pickle(path)?;
        if is_gguf(path) {
            return Self::read_gguf(path);
        }
        let broken = |why: String| InputError(format!("{} {why}", path.display()));
        let mut file = File::open(path).map_err(|e| broken(format!("cannot be opened: {e}")))?;
        let mut length = [0u8; 8];
        file.read_exact(&mut length)
            .map_err(|_| broken("is too short to be a safetensors file".into()))?;
        let length = u64::from_le_bytes(length);
        if length > MAX_HEADER_BYTES {
            return Err(broken(
                "is not a safetensors file (its first bytes are not a header length)".into(),
            ));
        }
        let mut json = vec![0u8; length as usize];
        file.read_exact(&mut json)
            .map_err(|_| broken("is cut short inside its safetensors header".into()))?;
        let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&json)
            .map_err(|e| broken(format!("has a broken safetensors header: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo = serde_json::from_value(entry)
                .map_err(|e| broken(format!("describes tensor {name} badly: {e}")))?;
            tensors.insert(name, info);
        }
        Ok(Header {
            path: path.to_path_buf(),
            tensors,
        })
    }

    fn read_gguf(path: &Path) -> Result<Header, InputError> {
        let mut file = File::open(path)
            .map_err(|e| InputError(format!("{} cannot be opened: {e}", path.display())))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| InputError(format!("{} has a broken GGUF header: {e}", path.display())))?;
        let tensors = content
            .tensor_infos
            .into_iter()
            .map(|(name, info)| {
                let dtype = info.ggml_dtype;
                let values = info.shape.elem_count();
                let bytes = values / dtype.block_size() * dtype.type_size();
                let info = TensorInfo {
                    dtype: format!("{dtype:?}"),
                    shape: info.shape.dims().to_vec(),
                    quantized_bytes: Some(bytes as u64),
                };
                (name, info)
            })
            .collect();
        Ok(Header {
            path: path.to_path_buf(),
            tensors,
        })
    }
}

/// One piece of a model (a transformer, an autoencoder, a text encoder): the files holding it
/// (several for a sharded one) and the name prefix its tensors carry there (empty for a file of
/// its own, e.g. `model.diffusion_model.` inside a single-file checkpoint).
#[derive(Debug, Clone)]
pub struct Piece {
    /// What the piece is, for messages: "the FLUX transformer", "the T5 text encoder".
    pub role: &'static str,
    pub files: Vec<PathBuf>,
    pub prefix: String,
    /// Tensors of the piece, names without the prefix.
    tensors: BTreeMap<String, TensorInfo>,
}

impl Piece {
    /// The tensors under `prefix` in `headers`, which must hold at least one.
    pub fn new(role: &'static str, headers: &[Header], prefix: &str) -> Piece {
        let tensors = headers
            .iter()
            .flat_map(|h| &h.tensors)
            .filter_map(|(name, info)| {
                name.strip_prefix(prefix)
                    .map(|short| (short.to_string(), info.clone()))
            })
            .collect();
        Piece {
            role,
            files: headers.iter().map(|h| h.path.clone()).collect(),
            prefix: prefix.to_string(),
            tensors,
        }
    }

    /// The files, for messages.
    pub fn location(&self) -> String {
        let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        match self.prefix.as_str() {
            "" => files.join(", "),
            prefix => format!("{} (tensors {prefix}*)", files.join(", ")),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The shape of tensor `name`, or an error naming the tensor and the file.
    pub fn shape(&self, name: &str) -> Result<&[usize], InputError> {
        self.tensors
            .get(name)
            .map(|t| t.shape.as_slice())
            .ok_or_else(|| {
                InputError(format!(
                    "tensor {}{name} of {} is missing from {}",
                    self.prefix,
                    self.role,
                    self.location()
                ))
            })
    }

    /// Dimension `axis` of tensor `name`, checking its rank.
    pub fn dim(&self, name: &str, rank: usize, axis: usize) -> Result<usize, InputError> {
        let shape = self.shape(name)?;
        if shape.len() != rank {
            return Err(self.shape_error(name, &format!("{rank} dimensions"), shape));
        }
        Ok(shape[axis])
    }

    /// An error for tensor `name` whose shape is not what `expected` describes.
    pub fn shape_error(&self, name: &str, expected: &str, found: &[usize]) -> InputError {
        InputError(format!(
            "tensor {}{name} in {} has shape {found:?}, expected {expected}",
            self.prefix,
            self.location()
        ))
    }

    /// How many blocks `prefix.0.`, `prefix.1.`, … there are (the depth of a stack).
    pub fn count_blocks(&self, prefix: &str) -> usize {
        let start = format!("{prefix}.");
        let indices: BTreeSet<usize> = self
            .tensors
            .keys()
            .filter_map(|name| name.strip_prefix(&start))
            .filter_map(|rest| rest.split('.').next()?.parse().ok())
            .collect();
        indices.len()
    }

    /// Whether the piece is in a GGUF file (quantized weights).
    pub fn is_gguf(&self) -> bool {
        self.files.iter().any(|f| is_gguf(f))
    }

    /// Bytes the piece takes once loaded as `dtype` (integer tensors keep their size, GGUF
    /// tensors stay quantized).
    pub fn loaded_bytes(&self, dtype: DType) -> u64 {
        self.loaded_bytes_keeping(dtype, &BTreeSet::new())
    }

    /// [`Piece::loaded_bytes`] with the tensors named in `kept` (full names, as
    /// [`Piece::fp8_matrices`] gives them) staying as stored.
    pub fn loaded_bytes_keeping(&self, dtype: DType, kept: &BTreeSet<String>) -> u64 {
        self.tensors
            .iter()
            .map(|(name, t)| {
                if let Some(bytes) = t.quantized_bytes {
                    return bytes;
                }
                let stored = t.stored_bytes_per_value().unwrap_or(4);
                let floating = t.dtype.starts_with('F') || t.dtype == "BF16";
                let as_stored = kept.contains(&format!("{}{name}", self.prefix));
                let per_value = if floating && !as_stored {
                    dtype.size_in_bytes()
                } else {
                    stored
                };
                (t.values() * per_value) as u64
            })
            .sum()
    }

    /// Full names (prefix included) of the matrices stored as fp8 (e4m3), as ComfyUI's
    /// `*_fp8_e4m3fn` checkpoints hold their linear layers: a network may keep them so and
    /// upcast one layer at a time.
    pub fn fp8_matrices(&self) -> BTreeSet<String> {
        self.tensors
            .iter()
            .filter(|(_, t)| t.dtype == "F8_E4M3" && t.shape.len() == 2)
            .map(|(name, _)| format!("{}{name}", self.prefix))
            .collect()
    }

    /// A variable builder over the piece, memory-mapped, converting to `dtype` on `device`.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<VarBuilder<'static>> {
        // SAFETY: the files are mapped read-only; like every tool that memory-maps weights,
        // Flowline assumes nobody rewrites a weight file while it is being loaded.
        let mapped = unsafe { MmapedSafetensors::multi(&self.files) }
            .map_err(|e| InputError(format!("cannot map {}: {e}", self.location())))?;
        let vb =
            VarBuilder::from_backend(Box::new(ParallelSafetensors(mapped)), dtype, device.clone());
        Ok(match self.prefix.strip_suffix('.') {
            Some(prefix) => vb.pp(prefix),
            None => vb,
        })
    }

    /// A variable builder over the piece's GGUF file, keeping the weights quantized.
    pub fn quantized_var_builder(&self, device: &Device) -> anyhow::Result<QuantizedVarBuilder> {
        let vb = QuantizedVarBuilder::from_gguf(&self.files[0], device)
            .map_err(|e| InputError(format!("cannot read {}: {e}", self.location())))?;
        Ok(match self.prefix.strip_suffix('.') {
            Some(prefix) => vb.pp(prefix),
            None => vb,
        })
    }

    /// Wraps an error raised while building a network from this piece with the files it came
    /// from, as bad input: a tensor candle could not find or whose shape it did not expect.
    pub fn load_error(&self, error: impl std::fmt::Display) -> InputError {
        InputError(format!(
            "cannot load {} from {}: {error}",
            self.role,
            self.location()
        ))
    }
}

/// A byte count for people: "12.3 GiB".
pub fn human_bytes(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let bytes = bytes as f64;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes / GIB)
    } else {
        format!("{:.1} MiB", bytes / MIB)
    }
}

/// The memory the system can still give, from `/proc/meminfo` (`MemAvailable`) on Linux;
/// `None` where that is unknown.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether `needed` bytes fit in `available` (unknown: assumed to fit).
pub fn fits(needed: u64, available: Option<u64>) -> bool {
    available.is_none_or(|available| needed <= available)
}

/// An error when `needed` bytes exceed `available`, saying both and what to do.
pub fn check_fits(what: &str, needed: u64, available: Option<u64>) -> Result<(), InputError> {
    match available {
        Some(available) if !fits(needed, Some(available)) => Err(InputError(format!(
            "{what} needs about {} of memory but only {} is available; choose a smaller \
             precision (bf16 or f16 halve f32), close other programs, or use a GPU device",
            human_bytes(needed),
            human_bytes(available)
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickle_files_are_refused_with_the_reason() {
        for name in ["model.ckpt", "model.PT", "weights.pth", "pytorch_model.bin"] {
            let error = refuse_pickle(Path::new(name)).unwrap_err().0;
            assert!(error.contains(name), "{error}");
            assert!(error.contains("arbitrary code"), "{error}");
        }
        assert!(refuse_pickle(Path::new("model.safetensors")).is_ok());
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn a_load_that_does_not_fit_is_refused_with_both_sizes() {
        let error = check_fits("FLUX.1 [dev]", 24 << 30, Some(8 << 30))
            .unwrap_err()
            .0;
        assert!(
            error.contains("24.0 GiB") && error.contains("8.0 GiB"),
            "{error}"
        );
        assert!(check_fits("FLUX.1 [dev]", 4 << 30, Some(8 << 30)).is_ok());
        assert!(check_fits("FLUX.1 [dev]", 4 << 30, None).is_ok());
    }

    #[test]
    fn a_piece_counts_blocks_and_estimates_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let device = Device::Cpu;
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = [
            ("model.diffusion_model.blocks.0.w", (2, 3)),
            ("model.diffusion_model.blocks.1.w", (2, 3)),
            ("model.diffusion_model.blocks.10.w", (2, 3)),
            ("vae.other", (4, 4)),
        ]
        .into_iter()
        .map(|(n, s)| {
            let t = candle_core::Tensor::zeros(s, DType::F32, &device).unwrap();
            (n.to_string(), t)
        })
        .collect();
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let header = Header::read(&path).unwrap();
        let piece = Piece::new("the test piece", &[header], "model.diffusion_model.");
        assert_eq!(piece.count_blocks("blocks"), 3);
        assert_eq!(piece.loaded_bytes(DType::F32), 3 * 6 * 4);
        assert_eq!(piece.loaded_bytes(DType::BF16), 3 * 6 * 2);
        let missing = piece.shape("blocks.2.w").unwrap_err().0;
        assert!(
            missing.contains("model.diffusion_model.blocks.2.w")
                && missing.contains("t.safetensors"),
            "{missing}"
        );
    }
}
