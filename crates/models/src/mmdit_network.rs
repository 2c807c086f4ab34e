//! SD3.5's MMDiT: candle-transformers' blocks, with the last joint block Flowline's own.
//!
//! In the last joint block the text tokens only give their queries, keys and values (their
//! output is not used), and in SD3.5 those queries and keys are RMS-normalised per head like
//! every other block's (`ln_q`, `ln_k` in the files). candle-transformers 0.11's
//! `ContextQkvOnlyJointBlock` leaves that normalisation out, which moved a tiny SD3.5's velocity
//! by about 2 % and its picture by up to 9/255 against diffusers' on the same files and noise
//! (`sd35_draws_what_diffusers_draws_from_the_same_files_and_noise`). Here that block is
//! rebuilt with the normalisation, when the file has it, and its joint attention runs on
//! [`crate::attention`]; every other part is candle-transformers' own.

use candle_core::{D, Module, Tensor};
use candle_nn::{Linear, RmsNorm, VarBuilder};
use candle_transformers::models::mmdit::blocks::{
    DiTBlock, FinalLayer, JointBlock, LayerNormNoAffine, MMDiTJointBlock, MMDiTXJointBlock,
};
use candle_transformers::models::mmdit::embedding::{
    PatchEmbedder, PositionEmbedder, TimestepEmbedder, Unpatchifier, VectorEmbedder,
};
use candle_transformers::models::mmdit::model::Config;

use crate::attention::attention;
use crate::flux_network::shifted_and_scaled;

/// The MMDiT of SD3 and SD3.5 (Medium's MMDiT-X blocks included).
pub struct Mmdit {
    patch_embedder: PatchEmbedder,
    position_embedder: PositionEmbedder,
    timestep_embedder: TimestepEmbedder,
    vector_embedder: VectorEmbedder,
    context_embedder: Linear,
    joint_blocks: Vec<Box<dyn JointBlock>>,
    last_block: LastJointBlock,
    final_layer: FinalLayer,
    unpatchifier: Unpatchifier,
}

impl Mmdit {
    pub fn new(config: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let hidden = config.head_size * config.depth;
        let heads = config.depth;
        let joint_blocks = (0..config.depth - 1)
            .map(|index| -> candle_core::Result<Box<dyn JointBlock>> {
                let vb = vb.pp(format!("joint_blocks.{index}"));
                Ok(if vb.contains_tensor("x_block.attn2.qkv.weight") {
                    Box::new(MMDiTXJointBlock::new(hidden, heads, false, vb)?)
                } else {
                    Box::new(MMDiTJointBlock::new(hidden, heads, false, vb)?)
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Mmdit {
            patch_embedder: PatchEmbedder::new(
                config.patch_size,
                config.in_channels,
                hidden,
                vb.pp("x_embedder"),
            )?,
            position_embedder: PositionEmbedder::new(
                hidden,
                config.patch_size,
                config.pos_embed_max_size,
                vb.clone(),
            )?,
            timestep_embedder: TimestepEmbedder::new(
                hidden,
                config.frequency_embedding_size,
                vb.pp("t_embedder"),
            )?,
            vector_embedder: VectorEmbedder::new(
                config.adm_in_channels,
                hidden,
                vb.pp("y_embedder"),
            )?,
            context_embedder: candle_nn::linear(
                config.context_embed_size,
                hidden,
                vb.pp("context_embedder"),
            )?,
            joint_blocks,
            last_block: LastJointBlock::new(
                hidden,
                heads,
                vb.pp(format!("joint_blocks.{}", config.depth - 1)),
            )?,
            final_layer: FinalLayer::new(
                hidden,
                config.patch_size,
                config.out_channels,
                vb.pp("final_layer"),
            )?,
            unpatchifier: Unpatchifier::new(config.patch_size, config.out_channels)?,
        })
    }

    /// The velocity for latent `x` `[batch, channels, h, w]` at timesteps `t` (`[batch]`,
    /// 1000·σ), given the pooled text vector `y` and the text tokens `context`.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        y: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (height, width) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        let positions = self
            .position_embedder
            .get_cropped_pos_embed(height, width)?;
        let mut x = self.patch_embedder.forward(x)?.broadcast_add(&positions)?;
        let c = (self.timestep_embedder.forward(t)? + self.vector_embedder.forward(y)?)?;
        let mut context = self.context_embedder.forward(context)?;
        for block in &self.joint_blocks {
            (context, x) = block.forward(&context, &x, &c)?;
        }
        let x = self.last_block.forward(&context, &x, &c)?;
        let x = self.final_layer.forward(&x, &c)?;
        self.unpatchifier
            .unpatchify(&x, height, width)?
            .narrow(2, 0, height)?
            .narrow(3, 0, width)
    }
}

/// The last joint block: the image tokens go through a whole block; the text tokens only
/// give their (normalised) queries, keys and values.
struct LastJointBlock {
    x_block: DiTBlock,
    /// The text stream's shift and scale from the conditioning vector.
    context_modulation: Linear,
    context_qkv: Linear,
    /// The text stream's per-head query and key normalisation, where the file has it.
    context_norms: Option<(RmsNorm, RmsNorm)>,
    heads: usize,
}

impl LastJointBlock {
    fn new(hidden: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let context = vb.pp("context_block");
        let attention = context.pp("attn");
        let head_width = hidden / heads;
        let context_norms = if attention.contains_tensor("ln_q.weight") {
            Some((
                candle_nn::rms_norm(head_width, 1e-6, attention.pp("ln_q"))?,
                candle_nn::rms_norm(head_width, 1e-6, attention.pp("ln_k"))?,
            ))
        } else {
            None
        };
        Ok(LastJointBlock {
            x_block: DiTBlock::new(hidden, heads, vb.pp("x_block"))?,
            context_modulation: candle_nn::linear(
                hidden,
                2 * hidden,
                context.pp("adaLN_modulation.1"),
            )?,
            context_qkv: candle_nn::linear(hidden, 3 * hidden, attention.pp("qkv"))?,
            context_norms,
            heads,
        })
    }

    fn forward(&self, context: &Tensor, x: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
        let modulated = shifted_and_scaled(
            &LayerNormNoAffine::new(1e-6).forward(context)?,
            c,
            &self.context_modulation,
        )?;
        let (batch, text_tokens, _) = modulated.dims3()?;
        // [batch, tokens, 3, heads, width]: the text stream's queries, keys and values.
        let qkv =
            modulated
                .apply(&self.context_qkv)?
                .reshape((batch, text_tokens, 3, self.heads, ()))?;
        let (mut text_q, mut text_k, text_v) = (
            qkv.get_on_dim(2, 0)?,
            qkv.get_on_dim(2, 1)?,
            qkv.get_on_dim(2, 2)?,
        );
        if let Some((query_norm, key_norm)) = &self.context_norms {
            text_q = text_q.apply(query_norm)?;
            text_k = text_k.apply(key_norm)?;
        }
        let (image, intermediates) = self.x_block.pre_attention(x, c)?;
        let image_tokens = x.dim(1)?;
        // candle's image queries and keys are [batch, tokens, heads·width], its values
        // [batch, tokens, heads, width]; attention takes [batch, heads, tokens, width].
        let joined = |text: Tensor, image: &Tensor| -> candle_core::Result<Tensor> {
            let image = image.reshape((batch, image_tokens, self.heads, ()))?;
            Tensor::cat(&[&text, &image], 1)?
                .transpose(1, 2)?
                .contiguous()
        };
        let attended = attention(
            &joined(text_q, &image.q)?,
            &joined(text_k, &image.k)?,
            &joined(text_v, &image.v)?,
        )?;
        let image_attended = attended.narrow(1, text_tokens, image_tokens)?;
        self.x_block
            .post_attention(&image_attended, x, &intermediates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use candle_transformers::models::mmdit::model::MMDiT;

    use crate::test_support::largest_difference;

    /// Where the file has no query and key normalisation (SD3 Medium), candle-transformers'
    /// network is right, and this one must predict what it predicts. Both run at f16, as
    /// candle's timestep embedding requires.
    #[test]
    fn without_qk_norms_it_predicts_what_candle_transformers_mmdit_predicts() {
        let device = Device::Cpu;
        let config = Config {
            patch_size: 2,
            in_channels: 16,
            out_channels: 16,
            depth: 3,
            head_size: 16,
            adm_in_channels: 24,
            pos_embed_max_size: 16,
            context_embed_size: 40,
            frequency_embedding_size: 32,
        };
        let variables = VarMap::new();
        let vb = VarBuilder::from_varmap(&variables, DType::F16, &device);
        let reference = MMDiT::new(&config, false, vb.clone()).unwrap();
        let ours = Mmdit::new(&config, vb).unwrap();
        let half = |shape: &[usize]| {
            Tensor::randn(0f32, 1.0, shape, &device)
                .and_then(|t| t.to_dtype(DType::F16))
                .unwrap()
        };
        let (x, y, context) = (half(&[1, 16, 8, 10]), half(&[1, 24]), half(&[1, 7, 40]));
        // The timestep embedder takes f32 timesteps on Stability's 0–1000 scale.
        let t = Tensor::new(&[700f32], &device).unwrap();
        let as_f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let expected = as_f32(reference.forward(&x, &t, &y, &context, None).unwrap());
        let predicted = as_f32(ours.forward(&x, &t, &y, &context).unwrap());
        assert_eq!(predicted.dims(), expected.dims());
        let scale = largest_difference(&expected, &expected.zeros_like().unwrap());
        let difference = largest_difference(&predicted, &expected);
        assert!(scale > 0.0);
        assert!(
            difference < 1e-4 * scale.max(1.0),
            "{difference} of {scale}"
        );
    }
}
