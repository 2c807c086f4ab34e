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

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype as Stored;

/// Values converted per parallel task.
const CHUNK: usize = 1 << 16;

/// Memory-mapped safetensors files read as a candle variable-builder backend.
pub struct ParallelSafetensors(pub MmapedSafetensors);

impl ParallelSafetensors {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
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
}
