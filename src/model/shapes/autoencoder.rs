//! The shapes model's autoencoder: 64×64×3 pixels ↔ 16×16×C latents.
//!
//! It is linear: each 4×4×3 pixel patch is projected onto its C principal components
//! (`encoder`, orthonormal columns), which is the best any linear autoencoder can do in squared
//! error, and decoding projects back. Fitting is closed-form (an eigen-decomposition of the
//! patch covariance), so the whole CPU training budget goes to the velocity network. Latents
//! are normalised SD3-style, `z = (raw − shift)·scale`, to unit standard deviation.

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, SymmetricEigen};

use crate::model::LatentPreview;

/// Pixels per latent position along each axis.
pub const PATCH: usize = 4;
/// Values in one patch: RGB × PATCH × PATCH.
pub const PATCH_VALUES: usize = 3 * PATCH * PATCH;

/// The fitted autoencoder.
#[derive(Debug, Clone)]
pub struct PatchAutoencoder {
    /// `[PATCH_VALUES]`, the mean patch.
    pub mean: Tensor,
    /// `[PATCH_VALUES, C]`, orthonormal principal directions.
    pub encoder: Tensor,
    pub scale: f64,
    pub shift: f64,
}

impl PatchAutoencoder {
    /// Fits `channels` principal components to the patches of `images` (`[N, 3, H, W]`, values
    /// in [0, 1], H and W multiples of [`PATCH`]) and the latent normalisation.
    pub fn fit(images: &Tensor, channels: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=PATCH_VALUES).contains(&channels),
            "channels must be between 1 and {PATCH_VALUES}"
        );
        let patches = patchify(&images.to_dtype(DType::F64)?)?;
        let rows = patches.dim(0)?;
        let mean = (patches.sum(0)? / rows as f64)?;
        let centred = patches.broadcast_sub(&mean)?;
        let covariance = (centred.t()?.matmul(&centred)? / rows as f64)?;
        let values: Vec<f64> = covariance.flatten_all()?.to_vec1()?;
        let eigen =
            SymmetricEigen::new(DMatrix::from_row_slice(PATCH_VALUES, PATCH_VALUES, &values));
        let mut order: Vec<usize> = (0..PATCH_VALUES).collect();
        order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
        let mut directions = vec![0f64; PATCH_VALUES * channels];
        for (column, &index) in order.iter().take(channels).enumerate() {
            let vector = eigen.eigenvectors.column(index);
            // Eigenvectors have no sign; fix one so fits are reproducible.
            let largest = vector
                .iter()
                .copied()
                .max_by(|a, b| a.abs().total_cmp(&b.abs()));
            let sign = if largest.unwrap_or(1.0) < 0.0 {
                -1.0
            } else {
                1.0
            };
            for row in 0..PATCH_VALUES {
                directions[row * channels + column] = sign * vector[row];
            }
        }
        let encoder = Tensor::from_vec(directions, (PATCH_VALUES, channels), &Device::Cpu)?;
        let raw = centred.matmul(&encoder)?;
        let shift = raw.mean_all()?.to_scalar::<f64>()?;
        let variance = raw
            .broadcast_sub(&Tensor::new(shift, &Device::Cpu)?)?
            .sqr()?
            .mean_all()?;
        Ok(PatchAutoencoder {
            mean: mean.to_dtype(DType::F32)?,
            encoder: encoder.to_dtype(DType::F32)?,
            scale: 1.0 / variance.to_scalar::<f64>()?.sqrt(),
            shift,
        })
    }

    pub fn channels(&self) -> usize {
        self.encoder.dims()[1]
    }

    /// `[N, 3, H, W]` images in [0, 1] to `[N, C, H/4, W/4]` normalised latents.
    pub fn encode(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _, height, width) = images.dims4()?;
        let (h, w) = (height / PATCH, width / PATCH);
        let raw = patchify(images)?
            .broadcast_sub(&self.mean)?
            .matmul(&self.encoder)?;
        raw.affine(self.scale, -self.shift * self.scale)?
            .reshape((n, h, w, self.channels()))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }

    /// `[N, C, h, w]` normalised latents to `[N, 3, 4h, 4w]` images (not clamped).
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let (n, channels, h, w) = latents.dims4()?;
        let raw = latents
            .affine(1.0 / self.scale, self.shift)?
            .permute((0, 2, 3, 1))?
            .reshape((n * h * w, channels))?;
        let patches = raw.matmul(&self.encoder.t()?)?.broadcast_add(&self.mean)?;
        patches
            .reshape(vec![n, h, w, 3, PATCH, PATCH])?
            .permute([0, 3, 1, 4, 2, 5])?
            .reshape((n, 3, h * PATCH, w * PATCH))
    }
}

impl PatchAutoencoder {
    /// The least-squares linear map from a latent position to its patch's mean colour, fitted
    /// on `images` (`[N, 3, H, W]` in [0, 1]): previews without decoding.
    pub fn fit_preview(&self, images: &Tensor) -> anyhow::Result<LatentPreview> {
        let channels = self.channels();
        let latents = self.encode(images)?.permute((0, 2, 3, 1))?;
        let rows = latents.elem_count() / channels;
        let inputs = Tensor::cat(
            &[
                latents.reshape((rows, channels))?,
                Tensor::ones((rows, 1), DType::F32, latents.device())?,
            ],
            1,
        )?
        .to_dtype(DType::F64)?;
        let colours = patchify(&images.to_dtype(DType::F64)?)?
            .reshape((rows, 3, PATCH * PATCH))?
            .mean(2)?;
        let gram = inputs.t()?.matmul(&inputs)?;
        let moments = inputs.t()?.matmul(&colours)?;
        let size = channels + 1;
        let gram = DMatrix::from_row_slice(size, size, &gram.flatten_all()?.to_vec1::<f64>()?);
        let moments = DMatrix::from_row_slice(size, 3, &moments.flatten_all()?.to_vec1::<f64>()?);
        let solution = gram
            .lu()
            .solve(&moments)
            .context("the preview fit is singular: too few or too uniform images")?;
        let row = |colour: usize| {
            (0..channels)
                .map(|c| solution[(c, colour)] as f32)
                .collect()
        };
        Ok(LatentPreview {
            matrix: [row(0), row(1), row(2)],
            bias: [0, 1, 2].map(|colour| solution[(channels, colour)] as f32),
        })
    }
}

/// `[N, 3, H, W]` to `[N·(H/4)·(W/4), 48]`, one row per patch in row-major order.
fn patchify(images: &Tensor) -> candle_core::Result<Tensor> {
    let (n, channels, height, width) = images.dims4()?;
    let (h, w) = (height / PATCH, width / PATCH);
    images
        .reshape(vec![n, channels, h, PATCH, w, PATCH])?
        .permute([0, 2, 4, 1, 3, 5])?
        .reshape((n * h * w, channels * PATCH * PATCH))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::sample;
    use crate::model::tensor_from_image;

    fn images(seed: u64, count: u64) -> Tensor {
        let list: Vec<Tensor> = (0..count)
            .map(|i| tensor_from_image(&sample(seed, i).image).unwrap())
            .collect();
        Tensor::stack(&list, 0).unwrap()
    }

    #[test]
    fn reconstructs_unseen_pictures_closely_with_unit_latents() {
        let ae = PatchAutoencoder::fit(&images(1, 64), 16).unwrap();
        let held_out = images(2, 16);
        let latents = ae.encode(&held_out).unwrap();
        assert_eq!(latents.dims(), [16, 16, 16, 16]);
        let std = latents
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((0.8..1.25).contains(&std), "latent std {std}");
        let preview = ae.fit_preview(&images(1, 64)).unwrap();
        let rgb = preview.to_rgb(&latents.narrow(0, 0, 1).unwrap()).unwrap();
        let truth = image::imageops::thumbnail(&sample(2, 0).image, 16, 16);
        let worst = rgb
            .as_raw()
            .iter()
            .zip(truth.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(
            worst <= 8,
            "preview differs from the patch means by up to {worst}/255"
        );
        let back = ae.decode(&latents).unwrap();
        let mse = (back - &held_out)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let psnr = -10.0 * mse.to_scalar::<f32>().unwrap().log10();
        assert!(psnr > 30.0, "PSNR {psnr} dB");
    }
}
