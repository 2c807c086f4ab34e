//! Reading memory-mapped safetensors weights into tensors on all cores.
//!
//! candle's safetensors loader copies each tensor out of the mapping in its stored precision
//! and then converts it on one thread, so a bf16 FLUX transformer loaded at f32 is written
//! twice, once at half size, and every new page is faulted in by one core. On this project's
//! virtual machines a fresh page costs more than the copy itself (the kernel zeroes it, and
//! the host backs it), so that loading was bound by one core's page faults. Here each tensor is
//! converted straight from the mapping into its final buffer, in parallel chunks, so the page
//! faults and the conversion share the cores. Pairs other than bf16/f16/f32 to f32 and plain
//! copies of bf16/f16 (fp8, integer tensors) and other devices go through candle's loader.
//!
//! ComfyUI's scaled fp8 checkpoints (`*_fp8_scaled`, `*fp8mixed*`; common for T5-XXL and
//! SD3.5) store each fp8 matrix divided by a scale kept beside it; read without the scale the
//! network would compute noise. Weights read here come multiplied back.

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype as Stored;

/// Values converted per parallel task.
const CHUNK: usize = 1 << 16;

/// Memory-mapped safetensors files read as a candle variable-builder backend.
pub struct ParallelSafetensors(pub MmapedSafetensors);

impl ParallelSafetensors {
    /// Tensor `name` at `dtype`; an fp8 weight that a scaled checkpoint stores divided by a
    /// scale comes multiplied back, unless it is read as fp8 (then the reader applies
    /// [`fp8_scale`] itself).
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.convert(name, dtype, device)?;
        if matches!(dtype, DType::F8E4M3) {
            return Ok(tensor);
        }
        match self.fp8_scale(name)? {
            Some(scale) => {
                let scale = fp8_scale_for(&scale, tensor.dims(), tensor.dtype(), name)?;
                tensor.broadcast_mul(&scale.to_device(device)?)
            }
            None => Ok(tensor),
        }
    }

    /// The scale of fp8 weight `name` in ComfyUI's scaled fp8 checkpoints: `….weight_scale`
    /// (with a `….comfy_quant` note of the format) or, in older files, `….scale_weight`.
    /// Refuses ComfyUI's other quantized formats (nvfp4, int8), whose weights would read as
    /// noise.
    fn fp8_scale(&self, name: &str) -> candle_core::Result<Option<Tensor>> {
        let Some(stem) = name.strip_suffix(".weight") else {
            return Ok(None);
        };
        if let Ok(note) = self.0.get(&format!("{stem}.comfy_quant")) {
            let format = serde_json::from_slice::<serde_json::Value>(note.data())
                .ok()
                .and_then(|v| v.get("format")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| "an unknown format".to_owned());
            if !FP8_FORMATS.contains(&format.as_str()) {
                candle_core::bail!(
                    "{name} is quantized as {format} (ComfyUI's comfy_quant), which Flowline \
                     does not read; use a bf16, fp16, fp8 or GGUF file"
                );
            }
        }
        if !matches!(self.0.get(name)?.dtype(), Stored::F8_E4M3 | Stored::F8_E5M2) {
            return Ok(None);
        }
        SCALE_NAMES
            .iter()
            .map(|scale| format!("{stem}.{scale}"))
            .find(|scale| self.0.get(scale).is_ok())
            .map(|scale| self.0.load(&scale, &Device::Cpu)?.to_dtype(DType::F32))
            .transpose()
    }

    fn convert(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let view = self.0.get(name)?;
        let shape = Shape::from(view.shape());
        let bytes = view.data();
        if !device.is_cpu() {
            return self.0.load(name, device)?.to_dtype(dtype);
        }
        let tensor = match (view.dtype(), dtype) {
            (Stored::BF16, DType::F32) => Tensor::from_vec(
                convert(bytes, |b| bf16::from_le_bytes(b).to_f32()),
                shape,
                device,
            ),
            (Stored::F16, DType::F32) => Tensor::from_vec(
                convert(bytes, |b| f16::from_le_bytes(b).to_f32()),
                shape,
                device,
            ),
            (Stored::F32, DType::F32) => {
                Tensor::from_vec(convert(bytes, f32::from_le_bytes), shape, device)
            }
            (Stored::BF16, DType::BF16) => {
                Tensor::from_vec(convert(bytes, bf16::from_le_bytes), shape, device)
            }
            (Stored::F16, DType::F16) => {
                Tensor::from_vec(convert(bytes, f16::from_le_bytes), shape, device)
            }
            _ => self.0.load(name, device)?.to_dtype(dtype),
        }?;
        Ok(tensor)
    }
}

/// The names, after a weight's stem, under which scaled fp8 checkpoints store its scale:
/// ComfyUI's current one and its older one.
const SCALE_NAMES: [&str; 2] = ["weight_scale", "scale_weight"];
/// `comfy_quant` formats that are fp8 with one scale, which [`ParallelSafetensors`] reads.
const FP8_FORMATS: [&str; 2] = ["float8_e4m3fn", "float8_e5m2"];

/// The scale of the fp8 weight `weight` under `vb` (see [`ParallelSafetensors`]), ready to
/// multiply it once it is upcast to `vb`'s precision, for a network that keeps it fp8 and
/// upcasts it when it runs; checked against `weight` here, at load, where its name is known.
pub fn fp8_scale(vb: &VarBuilder, weight: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let Some(scale) = SCALE_NAMES.iter().find(|scale| vb.contains_tensor(scale)) else {
        return Ok(None);
    };
    let scale = vb.get_unchecked_dtype(scale, DType::F32)?;
    let name = format!("{}.weight", vb.prefix());
    fp8_scale_for(&scale, weight.dims(), vb.dtype(), &name).map(Some)
}

/// `scale` shaped to multiply a weight of `dims` (named `name`, for errors) at `dtype`: one
/// value for the whole tensor, or one per output row.
fn fp8_scale_for(
    scale: &Tensor,
    dims: &[usize],
    dtype: DType,
    name: &str,
) -> candle_core::Result<Tensor> {
    let rows = dims.first().copied().unwrap_or(1);
    let mut shape = vec![1; dims.len()];
    if scale.elem_count() == rows {
        shape[0] = rows;
    } else if scale.elem_count() != 1 {
        candle_core::bail!(
            "{name}: its fp8 scale has shape {:?}, neither one value nor one per row of {:?}",
            scale.dims(),
            dims
        );
    }
    scale.to_dtype(dtype)?.reshape(shape)
}

/// Decodes little-endian values of `N` bytes into `T`, in parallel chunks.
fn convert<const N: usize, T: Copy + Default + Send>(
    bytes: &[u8],
    decode: impl Fn([u8; N]) -> T + Sync,
) -> Vec<T> {
    let mut values = vec![T::default(); bytes.len() / N];
    values
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * N))
        .for_each(|(values, bytes)| {
            for (value, stored) in values.iter_mut().zip(bytes.chunks_exact(N)) {
                *value = decode(stored.try_into().expect("chunks of N bytes"));
            }
        });
    values
}

impl SimpleBackend for ParallelSafetensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn it_reads_what_candles_loader_reads_in_every_precision_pair() {
        let device = Device::Cpu;
        let original = Tensor::randn(0f32, 3.0, (3, 70_001), &device).unwrap();
        let tensors: HashMap<String, Tensor> = [DType::F32, DType::BF16, DType::F16, DType::U8]
            .into_iter()
            .map(|dtype| (format!("{dtype:?}"), original.to_dtype(dtype).unwrap()))
            .collect();
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("weights.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        // SAFETY: the test's own file, not changed while mapped.
        let ours = ParallelSafetensors(unsafe { MmapedSafetensors::new(&path) }.unwrap());
        let candles = unsafe { MmapedSafetensors::new(&path) }.unwrap();
        for name in tensors.keys() {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let expected =
                    SimpleBackend::get_unchecked(&candles, name, dtype, &device).unwrap();
                let read = ours
                    .get(
                        expected.shape().clone(),
                        name,
                        candle_nn::Init::Const(0.0),
                        dtype,
                        &device,
                    )
                    .unwrap();
                assert_eq!(read.dtype(), dtype);
                let same = read
                    .to_dtype(DType::F32)
                    .unwrap()
                    .eq(&expected.to_dtype(DType::F32).unwrap())
                    .unwrap()
                    .min_all()
                    .unwrap()
                    .to_scalar::<u8>()
                    .unwrap();
                assert_eq!(same, 1, "{name} read as {dtype:?}");
            }
        }
        let wrong = ours.get(
            Shape::from((2, 2)),
            "F32",
            candle_nn::Init::Const(0.0),
            DType::F32,
            &device,
        );
        assert!(
            wrong
                .unwrap_err()
                .to_string()
                .contains("shape mismatch for F32")
        );
    }

    /// ComfyUI's scaled fp8 files, old and new naming, a scale per tensor and per row: the
    /// weight reads as the fp8 values times the scale at every precision but fp8, and as the
    /// bare fp8 values at fp8 (for networks that apply [`fp8_scale`] themselves).
    #[test]
    fn scaled_fp8_weights_read_multiplied_by_their_scale() {
        use crate::test_support::largest_difference;
        let device = Device::Cpu;
        let original = Tensor::randn(0f32, 0.05, (6, 10), &device).unwrap();
        let stored = (&original * 1000.0)
            .unwrap()
            .to_dtype(DType::F8E4M3)
            .unwrap();
        let per_row = Tensor::arange(1u32, 7, &device)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(1e-3, 0.0)
            .unwrap();
        let one = Tensor::new(1e-3f32, &device).unwrap();
        let note = |format: &str| {
            Tensor::new(format!("{{\"format\": \"{format}\"}}").as_bytes(), &device).unwrap()
        };
        let tensors: HashMap<String, Tensor> = [
            ("old.weight", stored.clone()),
            ("old.scale_weight", one.clone()),
            ("new.weight", stored.clone()),
            ("new.weight_scale", one),
            ("new.comfy_quant", note("float8_e4m3fn")),
            ("rows.weight", stored.clone()),
            ("rows.weight_scale", per_row.clone()),
            ("plain.weight", stored.clone()),
            (
                "packed.weight",
                Tensor::zeros((6, 5), DType::U8, &device).unwrap(),
            ),
            ("packed.comfy_quant", note("nvfp4")),
        ]
        .into_iter()
        .map(|(name, t)| (name.to_string(), t))
        .collect();
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("scaled.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        // SAFETY: the test's own file, not changed while mapped.
        let ours = ParallelSafetensors(unsafe { MmapedSafetensors::new(&path) }.unwrap());
        let fp8_values = stored.to_dtype(DType::F32).unwrap();
        let read = |name: &str, dtype| ours.get_unchecked(name, dtype, &device);
        let largest_difference =
            |a: &Tensor, b: &Tensor| largest_difference(&a.to_dtype(DType::F32).unwrap(), b);
        for dtype in [DType::F32, DType::BF16] {
            let tolerance = if dtype == DType::F32 { 1e-6 } else { 5e-3 };
            let whole = (&fp8_values * 1e-3).unwrap();
            for name in ["old.weight", "new.weight"] {
                let difference = largest_difference(&read(name, dtype).unwrap(), &whole);
                assert!(difference < tolerance, "{name} at {dtype:?}: {difference}");
            }
            let rows = fp8_values
                .broadcast_mul(&per_row.reshape((6, 1)).unwrap())
                .unwrap();
            let difference = largest_difference(&read("rows.weight", dtype).unwrap(), &rows);
            assert!(difference < tolerance, "per row at {dtype:?}: {difference}");
        }
        // Unscaled fp8, and a scaled weight read as fp8, come as stored.
        for name in ["plain.weight", "new.weight"] {
            let dtype = if name == "plain.weight" {
                DType::F32
            } else {
                DType::F8E4M3
            };
            assert_eq!(
                largest_difference(&read(name, dtype).unwrap(), &fp8_values),
                0.0
            );
        }
        let vb = VarBuilder::from_backend(Box::new(ours), DType::F32, device.clone());
        let scale = fp8_scale(&vb.pp("old"), &stored)
            .unwrap()
            .expect("the old name is found");
        assert_eq!(
            scale.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1e-3]
        );
        assert!(fp8_scale(&vb.pp("plain"), &stored).unwrap().is_none());
        let wrong = Tensor::zeros((5, 10), DType::F8E4M3, &device).unwrap();
        let refused = fp8_scale(&vb.pp("rows"), &wrong).unwrap_err().to_string();
        assert!(
            refused.contains("rows.weight: its fp8 scale has shape [6]"),
            "{refused}"
        );
        let refused = vb.get_unchecked("packed.weight").unwrap_err().to_string();
        assert!(
            refused.contains("packed.weight is quantized as nvfp4"),
            "{refused}"
        );
    }
}
