//! FLUX.1's transformer, Flowline's own, for plain and GGUF-quantized weights.
//!
//! The network is Black Forest Labs' (double-stream blocks, where image and text tokens keep
//! their own weights but attend jointly, then single-stream blocks over the joined sequence)
//! under the tensor names of their release, configured by candle-transformers' `Config` as
//! [`crate::flux`] reads it from the files. It is Flowline's own rather than
//! candle-transformers' for its attention: [`crate::attention`] keeps the 1.8 GB score matrix
//! of a 1024² picture out of memory and prepares queries and keys in one pass, which made
//! candle-transformers' network 1.2× slower than diffusers at 1024² on the CPU. The tests
//! hold it to candle-transformers' network on the same weights. One definition serves weights
//! from safetensors at any precision, fp8 matrices kept as stored and upcast one layer at a
//! time (half the memory of bf16), and GGUF kept quantized ([`Weights`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use candle_transformers::models::flux::WithForward;
use candle_transformers::models::flux::model::Config;
use candle_transformers::quantized_nn;
use candle_transformers::quantized_var_builder::VarBuilder as QuantizedVarBuilder;

use crate::attention::{HeadNorms, Rotary, attention, split_heads};
use crate::parallel_load::fp8_scale;
use crate::vector_math::gelu;

/// Where the transformer's weights come from.
#[derive(Clone)]
pub enum Weights {
    /// Safetensors, converted to the builder's precision.
    Plain(VarBuilder<'static>),
    /// Safetensors whose `matrices` (full tensor names) are fp8 and stay so in memory, each
    /// upcast to the builder's precision when its layer runs; everything else as `Plain`.
    Fp8 {
        vb: VarBuilder<'static>,
        matrices: Arc<BTreeSet<String>>,
    },
    /// GGUF, matrices kept quantized and multiplied as such; the network computes in f32.
    Quantized(QuantizedVarBuilder),
}

impl Weights {
    fn pp(&self, name: impl ToString) -> Weights {
        match self {
            Weights::Plain(vb) => Weights::Plain(vb.pp(name)),
            Weights::Fp8 { vb, matrices } => Weights::Fp8 {
                vb: vb.pp(name),
                matrices: matrices.clone(),
            },
            Weights::Quantized(vb) => Weights::Quantized(vb.pp(name)),
        }
    }

    fn projection(
        &self,
        inputs: usize,
        outputs: usize,
        bias: bool,
    ) -> candle_core::Result<Projection> {
        Ok(match self {
            Weights::Fp8 { vb, matrices }
                if matrices.contains(&format!("{}.weight", vb.prefix())) =>
            {
                let weight = vb.get_with_hints_dtype(
                    (outputs, inputs),
                    "weight",
                    candle_nn::Init::Const(0.0),
                    DType::F8E4M3,
                )?;
                let bias = bias.then(|| vb.get(outputs, "bias")).transpose()?;
                Projection::Upcast {
                    scale: fp8_scale(vb, &weight)?,
                    weight,
                    bias,
                    dtype: vb.dtype(),
                }
            }
            Weights::Plain(vb) | Weights::Fp8 { vb, .. } => {
                Projection::Plain(candle_nn::linear_b(inputs, outputs, bias, vb.clone())?)
            }
            Weights::Quantized(vb) => {
                let layer = quantized_nn::linear_b(inputs, outputs, bias, vb.clone())?;
                Projection::Quantized(layer, (outputs, inputs))
            }
        })
    }

    fn vector(&self, length: usize, name: &str) -> candle_core::Result<Tensor> {
        match self {
            Weights::Plain(vb) | Weights::Fp8 { vb, .. } => vb.get(length, name),
            Weights::Quantized(vb) => vb.get(length, name)?.dequantize(vb.device()),
        }
    }

    /// The precision the network computes at.
    fn dtype(&self) -> DType {
        match self {
            Weights::Plain(vb) | Weights::Fp8 { vb, .. } => vb.dtype(),
            Weights::Quantized(_) => DType::F32,
        }
    }

    fn device(&self) -> &Device {
        match self {
            Weights::Plain(vb) | Weights::Fp8 { vb, .. } => vb.device(),
            Weights::Quantized(vb) => vb.device(),
        }
    }

    /// A layer normalisation without learned scale or shift, as FLUX's blocks use.
    fn plain_layer_norm(&self, width: usize) -> candle_core::Result<LayerNorm> {
        let ones = Tensor::ones(width, self.dtype(), self.device())?;
        Ok(LayerNorm::new_no_bias(ones, 1e-6))
    }

    fn head_norms(&self, width: usize) -> candle_core::Result<HeadNorms> {
        HeadNorms::new(
            self.vector(width, "query_norm.scale")?,
            self.vector(width, "key_norm.scale")?,
            1e-6,
        )
    }
}

/// A linear layer with plain, fp8 or quantized weights.
#[derive(Clone)]
enum Projection {
    Plain(candle_nn::Linear),
    /// fp8 weights, upcast to `dtype` (and multiplied by their scale, in a scaled
    /// checkpoint, already shaped and at `dtype`) for each product and dropped after it.
    Upcast {
        weight: Tensor,
        scale: Option<Tensor>,
        bias: Option<Tensor>,
        dtype: DType,
    },
    /// Quantized weights (GGUF), with the `(outputs, inputs)` they were loaded as.
    Quantized(quantized_nn::Linear, (usize, usize)),
    /// A layer with low-rank adapters (LoRA) added to its output.
    Adapted {
        base: Box<Projection>,
        adapters: Vec<LowRank>,
    },
}

/// A layer of the network, as LoRA files address it: its name in Black Forest Labs' layout
/// and, for a fused layer, the rows of each of its parts (see
/// [`FluxTransformer::fused_parts`]).
pub struct Layer {
    pub name: String,
    pub parts: Option<Vec<usize>>,
}

/// One low-rank adapter: `scale · up · down · x` added to a layer's output.
#[derive(Clone)]
pub struct LowRank {
    /// `[rank, inputs]`.
    pub down: Tensor,
    /// `[outputs, rank]`.
    pub up: Tensor,
    pub scale: f64,
}

impl Projection {
    /// `(outputs, inputs)` of the layer's weight matrix.
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Projection::Plain(layer) => layer.weight().dims2(),
            Projection::Upcast { weight, .. } => weight.dims2(),
            Projection::Quantized(_, dims) => Ok(*dims),
            Projection::Adapted { base, .. } => base.dims(),
        }
    }
}

impl Module for Projection {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Projection::Plain(layer) => layer.forward(x),
            Projection::Upcast {
                weight,
                scale,
                bias,
                dtype,
            } => {
                let mut upcast = weight.to_dtype(*dtype)?;
                if let Some(scale) = scale {
                    upcast = upcast.broadcast_mul(scale)?;
                }
                candle_nn::Linear::new(upcast, bias.clone()).forward(x)
            }
            Projection::Quantized(layer, _) => layer.forward(x),
            Projection::Adapted { base, adapters } => {
                let mut y = base.forward(x)?;
                for adapter in adapters {
                    let down = x.broadcast_matmul(&adapter.down.t()?)?;
                    let update = down.broadcast_matmul(&adapter.up.t()?)?;
                    y = (y + (update * adapter.scale)?)?;
                }
                Ok(y)
            }
        }
    }
}

/// FLUX.1's transformer: it takes the packed latent, the text tokens, the noise level and the
/// pooled text vector and predicts the velocity for the packed latent.
#[derive(Clone)]
pub struct FluxTransformer {
    img_in: Projection,
    txt_in: Projection,
    time_in: Embedder,
    vector_in: Embedder,
    guidance_in: Option<Embedder>,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    final_layer: FinalLayer,
    /// The rotary embedding's channel pairs per position axis (image index, row, column).
    axes: Vec<usize>,
    theta: f64,
    /// The model width and the MLPs' hidden width.
    width: usize,
    mlp: usize,
}

impl FluxTransformer {
    pub fn load(config: &Config, weights: &Weights) -> candle_core::Result<Self> {
        let hidden = config.hidden_size;
        let double = weights.pp("double_blocks");
        let single = weights.pp("single_blocks");
        Ok(FluxTransformer {
            img_in: weights
                .pp("img_in")
                .projection(config.in_channels, hidden, true)?,
            txt_in: weights
                .pp("txt_in")
                .projection(config.context_in_dim, hidden, true)?,
            time_in: Embedder::load(TIME_CHANNELS, hidden, &weights.pp("time_in"))?,
            vector_in: Embedder::load(config.vec_in_dim, hidden, &weights.pp("vector_in"))?,
            guidance_in: config
                .guidance_embed
                .then(|| Embedder::load(TIME_CHANNELS, hidden, &weights.pp("guidance_in")))
                .transpose()?,
            double_blocks: (0..config.depth)
                .map(|index| DoubleBlock::load(config, &double.pp(index)))
                .collect::<candle_core::Result<_>>()?,
            single_blocks: (0..config.depth_single_blocks)
                .map(|index| SingleBlock::load(config, &single.pp(index)))
                .collect::<candle_core::Result<_>>()?,
            final_layer: FinalLayer::load(hidden, config.in_channels, &weights.pp("final_layer"))?,
            axes: config.axes_dim.iter().map(|width| width / 2).collect(),
            theta: config.theta as f64,
            width: hidden,
            mlp: (hidden as f64 * config.mlp_ratio) as usize,
        })
    }

    /// Every linear layer with its name in Black Forest Labs' layout
    /// (`double_blocks.0.img_attn.qkv`), the names LoRA files address.
    fn projections_mut(&mut self) -> Vec<(String, &mut Projection)> {
        let mut all: Vec<(String, &mut Projection)> = vec![
            ("img_in".into(), &mut self.img_in),
            ("txt_in".into(), &mut self.txt_in),
        ];
        let embedders = [
            ("time_in", Some(&mut self.time_in)),
            ("vector_in", Some(&mut self.vector_in)),
            ("guidance_in", self.guidance_in.as_mut()),
        ];
        for (name, embedder) in embedders {
            if let Some(embedder) = embedder {
                all.push((format!("{name}.in_layer"), &mut embedder.in_layer));
                all.push((format!("{name}.out_layer"), &mut embedder.out_layer));
            }
        }
        for (index, block) in self.double_blocks.iter_mut().enumerate() {
            for (stream, prefix) in [(&mut block.image, "img"), (&mut block.text, "txt")] {
                let at = |layer: &str| format!("double_blocks.{index}.{prefix}_{layer}");
                all.push((at("mod.lin"), &mut stream.modulation));
                all.push((at("attn.qkv"), &mut stream.qkv));
                all.push((at("attn.proj"), &mut stream.projection));
                all.push((at("mlp.0"), &mut stream.mlp_in));
                all.push((at("mlp.2"), &mut stream.mlp_out));
            }
        }
        for (index, block) in self.single_blocks.iter_mut().enumerate() {
            let at = |layer: &str| format!("single_blocks.{index}.{layer}");
            all.push((at("modulation.lin"), &mut block.modulation));
            all.push((at("linear1"), &mut block.linear1));
            all.push((at("linear2"), &mut block.linear2));
        }
        all.push((
            "final_layer.adaLN_modulation.1".into(),
            &mut self.final_layer.modulation,
        ));
        all.push(("final_layer.linear".into(), &mut self.final_layer.linear));
        all
    }

    /// Every linear layer, by name, with its parts where it is fused (see
    /// [`FluxTransformer::with_adapters`]).
    pub fn layers(&self) -> Vec<Layer> {
        self.clone()
            .projections_mut()
            .into_iter()
            .map(|(name, _)| Layer {
                parts: self.fused_parts(&name),
                name,
            })
            .collect()
    }

    /// The output rows of each projection a fused layer computes at once, in order: a double
    /// block's `qkv` (queries, keys, values) and a single block's `linear1` (those and the
    /// MLP's); `None` for other layers.
    pub fn fused_parts(&self, layer: &str) -> Option<Vec<usize>> {
        if layer.ends_with("_attn.qkv") {
            Some(vec![self.width; 3])
        } else if layer.ends_with(".linear1") {
            Some(vec![self.width, self.width, self.width, self.mlp])
        } else {
            None
        }
    }

    /// A copy sharing this network's weights, with `adapters` added to the layers they name
    /// (see [`FluxTransformer::layers`]). A name that is no layer here is an error.
    pub fn with_adapters(
        &self,
        adapters: &BTreeMap<String, LowRank>,
    ) -> candle_core::Result<FluxTransformer> {
        let mut adapted = self.clone();
        let mut unused: BTreeSet<&String> = adapters.keys().collect();
        for (name, projection) in adapted.projections_mut() {
            if let Some(adapter) = adapters.get(&name) {
                unused.remove(&name);
                let adapter_dims = (adapter.up.dim(0)?, adapter.down.dim(1)?);
                let dims = projection.dims()?;
                if dims != adapter_dims {
                    candle_core::bail!(
                        "the adapter of {name} maps {} inputs to {} outputs, the layer {} to {}",
                        adapter_dims.1,
                        adapter_dims.0,
                        dims.1,
                        dims.0
                    );
                }
                // Cloning a layer copies handles to its weights, not the weights.
                *projection = match projection.clone() {
                    Projection::Adapted { base, mut adapters } => {
                        adapters.push(adapter.clone());
                        Projection::Adapted { base, adapters }
                    }
                    other => Projection::Adapted {
                        base: Box::new(other),
                        adapters: vec![adapter.clone()],
                    },
                };
            }
        }
        if let Some(name) = unused.first() {
            candle_core::bail!("the network has no layer {name}");
        }
        Ok(adapted)
    }

    /// The rotary angles of every token from its position `[batch, tokens, 3]` (shared by
    /// the batch): each axis turns its own share of a head's channel pairs, at frequencies
    /// `θ^(−2i/width)` over that share.
    fn rotary(&self, ids: &Tensor) -> candle_core::Result<Rotary> {
        let positions = ids.get(0)?.to_dtype(DType::F32)?;
        let tokens = positions.dim(0)?;
        let per_axis = self
            .axes
            .iter()
            .enumerate()
            .map(|(axis, &pairs)| {
                let frequencies: Vec<f32> = (0..pairs)
                    .map(|i| self.theta.powf(-(i as f64) / pairs as f64) as f32)
                    .collect();
                let frequencies = Tensor::from_vec(frequencies, (1, pairs), ids.device())?;
                positions
                    .narrow(1, axis, 1)?
                    .broadcast_mul(&frequencies)?
                    .reshape((tokens, pairs))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let angles = Tensor::cat(&per_axis, 1)?;
        Ok(Rotary {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }
}

/// candle-transformers' interface for FLUX networks, which its samplers call.
impl WithForward for FluxTransformer {
    /// The velocity for `img` `[batch, patches, channels]` at noise level `timesteps`
    /// (`[batch]`, σ), given the text tokens `txt`, the pooled vector `y`, the positions of
    /// both (`[batch, tokens, 3]`) and, for \[dev\], the distilled guidance strength.
    fn forward(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        timesteps: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let dtype = img.dtype();
        let rotary = self.rotary(&Tensor::cat(&[txt_ids, img_ids], 1)?)?;
        let mut txt = txt.apply(&self.txt_in)?;
        let mut img = img.apply(&self.img_in)?;
        let mut vector = self.time_in.forward(&time_channels(timesteps, dtype)?)?;
        if let (Some(embedder), Some(strength)) = (&self.guidance_in, guidance) {
            vector = (vector + embedder.forward(&time_channels(strength, dtype)?)?)?;
        }
        let vector = (vector + self.vector_in.forward(y)?)?;
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &vector, &rotary)?;
        }
        let text_tokens = txt.dim(1)?;
        let mut joined = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single_blocks {
            joined = block.forward(&joined, &vector, &rotary)?;
        }
        let img = joined.narrow(1, text_tokens, joined.dim(1)? - text_tokens)?;
        self.final_layer.forward(&img, &vector)
    }
}

/// Sinusoidal channels of the noise level (and of the distilled guidance strength).
const TIME_CHANNELS: usize = 256;

/// `[cos(1000·t·fᵢ), sin(1000·t·fᵢ)]` for frequencies `fᵢ = 10000^(−i/128)`.
fn time_channels(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let half = TIME_CHANNELS / 2;
    let frequencies: Vec<f32> = (0..half)
        .map(|i| (-(10_000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let frequencies = Tensor::from_vec(frequencies, (1, half), t.device())?;
    let arguments =
        (t.to_dtype(DType::F32)?.unsqueeze(1)? * 1000.0)?.broadcast_mul(&frequencies)?;
    Tensor::cat(&[arguments.cos()?, arguments.sin()?], D::Minus1)?.to_dtype(dtype)
}

/// Two linear layers with a SiLU between: the noise level's, the guidance's and the pooled
/// text vector's way into the model width.
#[derive(Clone)]
struct Embedder {
    in_layer: Projection,
    out_layer: Projection,
}

impl Embedder {
    fn load(inputs: usize, width: usize, weights: &Weights) -> candle_core::Result<Self> {
        Ok(Embedder {
            in_layer: weights.pp("in_layer").projection(inputs, width, true)?,
            out_layer: weights.pp("out_layer").projection(width, width, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.apply(&self.in_layer)?.silu()?.apply(&self.out_layer)
    }
}

/// One adaptive-normalisation triple from the conditioning vector, each `[batch, 1, width]`.
struct Modulation {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl Modulation {
    /// `count` triples from `silu(vector)` through `layer`.
    fn from_vector(
        layer: &Projection,
        vector: &Tensor,
        count: usize,
    ) -> candle_core::Result<Vec<Modulation>> {
        let chunks = vector
            .silu()?
            .apply(layer)?
            .unsqueeze(1)?
            .chunk(3 * count, D::Minus1)?;
        Ok(chunks
            .chunks(3)
            .map(|triple| Modulation {
                shift: triple[0].clone(),
                scale: triple[1].clone(),
                gate: triple[2].clone(),
            })
            .collect())
    }

    fn scale_shift(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(&(&self.scale + 1.0)?)?
            .broadcast_add(&self.shift)
    }

    /// `residual + gate · update`.
    fn gated_add(&self, residual: &Tensor, update: &Tensor) -> candle_core::Result<Tensor> {
        residual + update.broadcast_mul(&self.gate)?
    }
}

/// One stream (image or text) of a double block: its own modulation, attention projections
/// and MLP.
#[derive(Clone)]
struct Stream {
    modulation: Projection,
    /// The parameter-free layer normalisation before the attention and before the MLP.
    norm: LayerNorm,
    qkv: Projection,
    head_norms: HeadNorms,
    projection: Projection,
    mlp_in: Projection,
    mlp_out: Projection,
}

impl Stream {
    fn load(config: &Config, prefix: &str, weights: &Weights) -> candle_core::Result<Self> {
        let width = config.hidden_size;
        let mlp = (width as f64 * config.mlp_ratio) as usize;
        let attention = weights.pp(format!("{prefix}_attn"));
        let mlp_weights = weights.pp(format!("{prefix}_mlp"));
        Ok(Stream {
            modulation: weights.pp(format!("{prefix}_mod")).pp("lin").projection(
                width,
                6 * width,
                true,
            )?,
            norm: weights.plain_layer_norm(width)?,
            qkv: attention
                .pp("qkv")
                .projection(width, 3 * width, config.qkv_bias)?,
            head_norms: attention.pp("norm").head_norms(width / config.num_heads)?,
            projection: attention.pp("proj").projection(width, width, true)?,
            mlp_in: mlp_weights.pp("0").projection(width, mlp, true)?,
            mlp_out: mlp_weights.pp("2").projection(mlp, width, true)?,
        })
    }
}

/// A double-stream block: image and text tokens attend jointly, each with its own weights.
#[derive(Clone)]
struct DoubleBlock {
    image: Stream,
    text: Stream,
    heads: usize,
}

impl DoubleBlock {
    fn load(config: &Config, weights: &Weights) -> candle_core::Result<Self> {
        Ok(DoubleBlock {
            image: Stream::load(config, "img", weights)?,
            text: Stream::load(config, "txt", weights)?,
            heads: config.num_heads,
        })
    }

    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vector: &Tensor,
        rotary: &Rotary,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let text_tokens = txt.dim(1)?;
        let image_tokens = img.dim(1)?;
        let streams = [
            (&self.text, txt, 0, text_tokens),
            (&self.image, img, text_tokens, image_tokens),
        ];
        let mut modulations = Vec::with_capacity(2);
        let mut heads = Vec::with_capacity(2);
        for (stream, x, first, tokens) in streams {
            let modulation = Modulation::from_vector(&stream.modulation, vector, 2)?;
            let qkv = modulation[0]
                .scale_shift(&x.apply(&stream.norm)?)?
                .apply(&stream.qkv)?;
            let rotary = Rotary {
                cos: rotary.cos.narrow(0, first, tokens)?,
                sin: rotary.sin.narrow(0, first, tokens)?,
            };
            heads.push(split_heads(&qkv, self.heads, &stream.head_norms, &rotary)?);
            modulations.push(modulation);
        }
        let joined = |part: fn(&(Tensor, Tensor, Tensor)) -> &Tensor| {
            Tensor::cat(&[part(&heads[0]), part(&heads[1])], 2)
        };
        let attended = attention(&joined(|h| &h.0)?, &joined(|h| &h.1)?, &joined(|h| &h.2)?)?;
        let finish = |(stream, x, first, tokens): (&Stream, &Tensor, usize, usize),
                      modulation: &[Modulation]| {
            let attended = attended
                .narrow(1, first, tokens)?
                .apply(&stream.projection)?;
            let x = modulation[0].gated_add(x, &attended)?;
            let hidden = modulation[1]
                .scale_shift(&x.apply(&stream.norm)?)?
                .apply(&stream.mlp_in)?;
            modulation[1].gated_add(&x, &gelu(&hidden)?.apply(&stream.mlp_out)?)
        };
        let txt = finish(streams[0], &modulations[0])?;
        let img = finish(streams[1], &modulations[1])?;
        Ok((img, txt))
    }
}

/// A single-stream block over the joined text and image tokens: attention and MLP computed
/// side by side from one projection.
#[derive(Clone)]
struct SingleBlock {
    modulation: Projection,
    norm: LayerNorm,
    /// Projects to the attention's qkv and the MLP's hidden layer at once.
    linear1: Projection,
    /// Projects the attention's output and the MLP's activations back at once.
    linear2: Projection,
    head_norms: HeadNorms,
    width: usize,
    mlp: usize,
    heads: usize,
}

impl SingleBlock {
    fn load(config: &Config, weights: &Weights) -> candle_core::Result<Self> {
        let width = config.hidden_size;
        let mlp = (width as f64 * config.mlp_ratio) as usize;
        Ok(SingleBlock {
            modulation: weights
                .pp("modulation")
                .pp("lin")
                .projection(width, 3 * width, true)?,
            norm: weights.plain_layer_norm(width)?,
            linear1: weights
                .pp("linear1")
                .projection(width, 3 * width + mlp, true)?,
            linear2: weights.pp("linear2").projection(width + mlp, width, true)?,
            head_norms: weights.pp("norm").head_norms(width / config.num_heads)?,
            width,
            mlp,
            heads: config.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, vector: &Tensor, rotary: &Rotary) -> candle_core::Result<Tensor> {
        let modulation = Modulation::from_vector(&self.modulation, vector, 1)?;
        let modulation = &modulation[0];
        let projected = modulation
            .scale_shift(&x.apply(&self.norm)?)?
            .apply(&self.linear1)?;
        let qkv = projected.narrow(2, 0, 3 * self.width)?;
        let (q, k, v) = split_heads(&qkv, self.heads, &self.head_norms, rotary)?;
        let mlp = gelu(&projected.narrow(2, 3 * self.width, self.mlp)?)?;
        let output = Tensor::cat(&[attention(&q, &k, &v)?, mlp], 2)?.apply(&self.linear2)?;
        modulation.gated_add(x, &output)
    }
}

/// The final adaptive normalisation and projection back to packed latent channels.
#[derive(Clone)]
struct FinalLayer {
    norm: LayerNorm,
    modulation: Projection,
    linear: Projection,
}

impl FinalLayer {
    fn load(width: usize, channels: usize, weights: &Weights) -> candle_core::Result<Self> {
        Ok(FinalLayer {
            norm: weights.plain_layer_norm(width)?,
            modulation: weights
                .pp("adaLN_modulation.1")
                .projection(width, 2 * width, true)?,
            linear: weights.pp("linear").projection(width, channels, true)?,
        })
    }

    fn forward(&self, x: &Tensor, vector: &Tensor) -> candle_core::Result<Tensor> {
        shifted_and_scaled(&x.apply(&self.norm)?, vector, &self.modulation)?.apply(&self.linear)
    }
}

/// `normed · (1 + scale) + shift`, with shift and scale `[batch, width]` from
/// `silu(vector)` through `layer`: the two-way adaptive normalisation that FLUX's final layer
/// and SD3's last text stream apply.
pub(crate) fn shifted_and_scaled(
    normed: &Tensor,
    vector: &Tensor,
    layer: &impl Module,
) -> candle_core::Result<Tensor> {
    let chunks = vector
        .silu()?
        .apply(layer)?
        .unsqueeze(1)?
        .chunk(2, D::Minus1)?;
    let (shift, scale) = (&chunks[0], &chunks[1]);
    normed.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;
    use candle_transformers::models::flux::model::Flux;
    use candle_transformers::models::flux::sampling::State;

    use crate::test_support::largest_difference;

    fn tiny_config(guidance_embed: bool) -> Config {
        Config {
            in_channels: 64,
            vec_in_dim: 24,
            context_in_dim: 40,
            hidden_size: 64,
            mlp_ratio: 4.0,
            num_heads: 2,
            depth: 2,
            depth_single_blocks: 2,
            axes_dim: vec![4, 14, 14],
            theta: 10_000,
            qkv_bias: true,
            guidance_embed,
        }
    }

    /// Random inputs: a packed 12×20 latent, 7 text tokens, a pooled vector, σ = 0.7.
    fn inputs() -> (State, Tensor) {
        let device = Device::Cpu;
        let latent = Tensor::randn(0f32, 1.0, (1, 16, 12, 20), &device).unwrap();
        let text = Tensor::randn(0f32, 1.0, (1, 7, 40), &device).unwrap();
        let pooled = Tensor::randn(0f32, 1.0, (1, 24), &device).unwrap();
        let state = State::new(&text, &pooled, &latent).unwrap();
        (state, Tensor::new(&[0.7f32], &device).unwrap())
    }

    fn predict(
        network: &dyn WithForward,
        (state, timesteps): &(State, Tensor),
        guidance: Option<&Tensor>,
    ) -> Tensor {
        network
            .forward(
                &state.img,
                &state.img_ids,
                &state.txt,
                &state.txt_ids,
                timesteps,
                &state.vec,
                guidance,
            )
            .unwrap()
    }

    #[test]
    fn it_predicts_what_candle_transformers_flux_predicts_from_the_same_weights() {
        let device = Device::Cpu;
        for guidance_embed in [false, true] {
            let config = tiny_config(guidance_embed);
            // candle-transformers' network fills the variables with its initialisation; ours
            // reads the same variables.
            let variables = VarMap::new();
            let vb = VarBuilder::from_varmap(&variables, DType::F32, &device);
            let reference = Flux::new(&config, vb.clone()).unwrap();
            // The layer initialisation leaves the QK-norm scales at one: vary them too.
            for (name, variable) in variables.data().lock().unwrap().iter() {
                if name.ends_with("norm.scale") {
                    let varied = Tensor::randn(1f32, 0.3, variable.dims(), &device).unwrap();
                    variable.set(&varied).unwrap();
                }
            }
            let ours = FluxTransformer::load(&config, &Weights::Plain(vb)).unwrap();
            let inputs = inputs();
            let strength = Tensor::new(&[3.5f32], &device).unwrap();
            let guidance = guidance_embed.then_some(&strength);
            let expected = predict(&reference, &inputs, guidance);
            let predicted = predict(&ours, &inputs, guidance);
            assert_eq!(predicted.dims(), expected.dims());
            let scale = largest_difference(&expected, &expected.zeros_like().unwrap());
            let difference = largest_difference(&predicted, &expected);
            assert!(
                difference < 1e-4 * scale.max(1.0),
                "guidance {guidance_embed}: {difference} against values up to {scale}"
            );
        }
    }

    #[test]
    fn fp8_matrices_kept_and_upcast_per_layer_predict_as_upcast_at_load() {
        let device = Device::Cpu;
        let config = tiny_config(false);
        let variables = VarMap::new();
        Flux::new(
            &config,
            VarBuilder::from_varmap(&variables, DType::F32, &device),
        )
        .unwrap();
        // The checkpoint as ComfyUI's fp8 files are: the matrices in fp8, the rest in bf16.
        let tensors: std::collections::HashMap<String, Tensor> = variables
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, variable)| {
                let dtype = if variable.rank() == 2 {
                    DType::F8E4M3
                } else {
                    DType::BF16
                };
                (name.clone(), variable.as_tensor().to_dtype(dtype).unwrap())
            })
            .collect();
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("flux-fp8.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let matrices: BTreeSet<String> = tensors
            .iter()
            .filter(|(_, t)| t.dtype() == DType::F8E4M3)
            .map(|(name, _)| name.clone())
            .collect();
        assert!(matrices.len() > 20);
        // SAFETY: the test's own file, not changed while mapped.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &device) }.unwrap();
        let at_load = FluxTransformer::load(&config, &Weights::Plain(vb.clone())).unwrap();
        let weights = Weights::Fp8 {
            vb,
            matrices: Arc::new(matrices),
        };
        let per_layer = FluxTransformer::load(&config, &weights).unwrap();
        let kept_in_fp8 = |projection: &Projection| matches!(projection, Projection::Upcast { weight, .. } if weight.dtype() == DType::F8E4M3);
        for block in &per_layer.double_blocks {
            assert!(kept_in_fp8(&block.image.qkv) && kept_in_fp8(&block.text.mlp_out));
        }
        for block in &per_layer.single_blocks {
            assert!(kept_in_fp8(&block.linear1) && kept_in_fp8(&block.linear2));
        }
        let inputs = inputs();
        let difference = largest_difference(
            &predict(&per_layer, &inputs, None),
            &predict(&at_load, &inputs, None),
        );
        assert!(difference < 1e-6, "{difference}");
    }
}
