//! The prompt encoders FLUX and SD3.5 share: CLIP text transformers and the T5 encoder, run
//! through candle-transformers, with their tokenizers read from `tokenizer.json` files.
//!
//! Sizes come from the weight files (embedding widths, layer counts, head counts where a shape
//! carries them), so the full-size encoders, pruned ones and the tests' tiny ones all load
//! through the same code.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::stable_diffusion::clip::{
    ClipTextTransformer as PenultimateClipTransformer, Config as PenultimateClipConfig,
};
use candle_transformers::models::t5::{
    ActivationWithOptionalGating, Config as T5Config, T5EncoderModel,
};

use crate::checkpoint::Piece;
use crate::locate::WeightSpec;
use flowline_engine::error::InputError;

/// CLIP-L as FLUX and SD3.5 use it: on its own, inside a diffusers folder, a ComfyUI models
/// folder, or a single-file checkpoint.
pub const CLIP_L: WeightSpec = WeightSpec {
    role: "the CLIP-L text encoder",
    param: "clip_l",
    probe: "text_model.embeddings.token_embedding.weight",
    prefixes: &["", "text_encoders.clip_l.transformer."],
    optional: false,
    main: false,
    names: &[
        "clip_l.safetensors",
        "text_encoder/model.safetensors",
        "text_encoders/clip_l.safetensors",
        "clip/clip_l.safetensors",
        "../text_encoders/clip_l.safetensors",
        "../clip/clip_l.safetensors",
    ],
};

/// T5-XXL (v1.1 encoder), in any precision its file was saved at.
pub const T5_XXL: WeightSpec = WeightSpec {
    role: "the T5-XXL text encoder",
    param: "t5",
    probe: "encoder.block.0.layer.0.SelfAttention.q.weight",
    prefixes: &["", "text_encoders.t5xxl.transformer."],
    optional: false,
    main: false,
    names: &[
        "t5xxl*.safetensors",
        "text_encoder_2/model.safetensors",
        "text_encoder_2/model-*-of-*.safetensors",
        "text_encoders/t5xxl*.safetensors",
        "clip/t5xxl*.safetensors",
        "../text_encoders/t5xxl*.safetensors",
        "../clip/t5xxl*.safetensors",
    ],
};

/// Usual places of CLIP's tokenizer: a `tokenizer.json`, or diffusers' `vocab.json` (with
/// `merges.txt` beside it).
pub const CLIP_TOKENIZER_NAMES: &[&str] = &[
    "tokenizer/tokenizer.json",
    "clip_l.tokenizer.json",
    "tokenizer/vocab.json",
];
/// The file names of CLIP's tokenizer as diffusers saves it.
const CLIP_VOCABULARY: &str = "vocab.json";
const CLIP_MERGES: &str = "merges.txt";
/// How CLIP splits text into words before byte-pair encoding (from CLIP's `tokenizer.json`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Usual places of T5's `tokenizer.json`.
pub const T5_TOKENIZER_NAMES: &[&str] = &["tokenizer_2/tokenizer.json", "t5xxl.tokenizer.json"];

/// CLIP heads are 64 channels wide in CLIP-L and CLIP-G; the head count is not in any shape.
const CLIP_HEAD_DIM: usize = 64;
/// T5's relative-position buckets reach this far (every T5 v1.1 size uses 128).
const T5_MAX_DISTANCE: usize = 128;

/// A `tokenizer.json` with the special tokens a prompt is framed by.
#[derive(Clone)]
pub struct PromptTokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
    /// Prepended when the tokenizer's own post-processor does not (CLIP's start token).
    start: Option<u32>,
    end: u32,
    pad: u32,
}

/// A prompt as fixed-length token ids.
pub struct Tokens {
    pub ids: Vec<u32>,
    /// The position of the end token (CLIP's pooled output is read there).
    pub end_position: usize,
    /// How many tokens were cut to fit.
    pub truncated: usize,
}

impl PromptTokenizer {
    /// CLIP's tokenizer: `<|startoftext|>` prompt `<|endoftext|>`, padded with end tokens.
    /// `path` is its `tokenizer.json`, or the `vocab.json` of a `vocab.json` + `merges.txt`
    /// pair (the form diffusers saves CLIP's tokenizer in).
    pub fn clip(path: &Path) -> Result<PromptTokenizer, InputError> {
        let tokenizer = if path.file_name().is_some_and(|n| n == CLIP_VOCABULARY) {
            clip_from_vocabulary(path, &path.with_file_name(CLIP_MERGES))?
        } else {
            read_tokenizer(path)?
        };
        let start = special(&tokenizer, path, "<|startoftext|>")?;
        let end = special(&tokenizer, path, "<|endoftext|>")?;
        Ok(PromptTokenizer {
            tokenizer,
            path: path.to_path_buf(),
            start: Some(start),
            end,
            pad: end,
        })
    }

    /// The same tokenizer padding with `token` instead (CLIP-G pads with `!`).
    pub fn padded_with(mut self, token: &str) -> Result<PromptTokenizer, InputError> {
        self.pad = special(&self.tokenizer, &self.path, token)?;
        Ok(self)
    }

    /// T5's tokenizer: prompt `</s>`, padded with `<pad>`.
    pub fn t5(path: &Path) -> Result<PromptTokenizer, InputError> {
        let tokenizer = read_tokenizer(path)?;
        let end = special(&tokenizer, path, "</s>")?;
        let pad = special(&tokenizer, path, "<pad>")?;
        Ok(PromptTokenizer {
            tokenizer,
            path: path.to_path_buf(),
            start: None,
            end,
            pad,
        })
    }

    /// `text` as exactly `length` ids: framed by the special tokens, cut to fit, padded.
    pub fn tokens(&self, text: &str, length: usize) -> anyhow::Result<Tokens> {
        let encoding = self.tokenizer.encode(text, true).map_err(|e| {
            InputError(format!(
                "{} cannot tokenize the prompt: {e}",
                self.path.display()
            ))
        })?;
        let mut body: Vec<u32> = encoding.get_ids().to_vec();
        if let Some(start) = self.start
            && body.first() == Some(&start)
        {
            body.remove(0);
        }
        if body.last() == Some(&self.end) {
            body.pop();
        }
        let frame = 1 + usize::from(self.start.is_some());
        let room = length.saturating_sub(frame);
        let truncated = body.len().saturating_sub(room);
        body.truncate(room);
        let mut ids: Vec<u32> = self.start.into_iter().collect();
        ids.extend(body);
        let end_position = ids.len();
        ids.push(self.end);
        ids.resize(length, self.pad);
        Ok(Tokens {
            ids,
            end_position,
            truncated,
        })
    }
}

/// A warning for each encoder whose tokens were cut, by encoder name.
pub fn truncation_warnings(encoded: &[(&str, &Tokens)]) -> Vec<String> {
    encoded
        .iter()
        .filter(|(_, tokens)| tokens.truncated > 0)
        .map(|(encoder, tokens)| {
            format!(
                "the prompt is too long for {encoder}: its last {} tokens were cut",
                tokens.truncated
            )
        })
        .collect()
}

/// CLIP's tokenizer assembled from `vocab.json` and `merges.txt` the way its `tokenizer.json`
/// is: NFC, whitespace runs to one space and lower case; CLIP's word split and byte-level
/// mapping; byte-pair encoding with `</w>` word ends; start and end tokens around the prompt.
fn clip_from_vocabulary(
    vocab: &Path,
    merges_path: &Path,
) -> Result<tokenizers::Tokenizer, InputError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| {
            InputError(format!(
                "cannot read tokenizer file {}: {e}",
                path.display()
            ))
        })
    };
    let vocabulary: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&read(vocab)?)
            .map_err(|e| InputError(format!("{} is not a vocabulary: {e}", vocab.display())))?;
    let merges_text = read(merges_path)?;
    let merges: Vec<&str> = merges_text
        .lines()
        .filter(|line| !line.starts_with("#version") && !line.trim().is_empty())
        .collect();
    let id = |token: &str| {
        vocabulary
            .get(token)
            .and_then(|id| id.as_u64())
            .ok_or_else(|| InputError(format!("{} has no {token} token", vocab.display())))
    };
    let (start, end) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
    let special = |id: u64, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": true, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(start, "<|startoftext|>"), special(end, "<|endoftext|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", end],
            "cls": ["<|startoftext|>", start], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocabulary, "merges": merges}
    });
    json.to_string().parse().map_err(|e| {
        InputError(format!(
            "cannot build CLIP's tokenizer from {} and {}: {e}",
            vocab.display(),
            merges_path.display()
        ))
    })
}

fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer, InputError> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| InputError(format!("cannot read tokenizer {}: {e}", path.display())))
}

fn special(tokenizer: &tokenizers::Tokenizer, path: &Path, token: &str) -> Result<u32, InputError> {
    tokenizer.token_to_id(token).ok_or_else(|| {
        InputError(format!(
            "tokenizer {} has no {token} token: is it the right tokenizer for this encoder?",
            path.display()
        ))
    })
}

/// A CLIP text transformer (CLIP-L's quick-GELU variant).
pub struct ClipEncoder {
    model: ClipTextTransformer,
}

impl ClipEncoder {
    /// Derives the configuration from the tensor shapes in `piece` and loads it.
    pub fn load(piece: &Piece, dtype: DType, device: &Device) -> anyhow::Result<ClipEncoder> {
        let embeddings = "text_model.embeddings";
        let token = format!("{embeddings}.token_embedding.weight");
        let (vocab_size, embed_dim) = (piece.dim(&token, 2, 0)?, piece.dim(&token, 2, 1)?);
        let max_tokens = piece.dim(&format!("{embeddings}.position_embedding.weight"), 2, 0)?;
        let intermediate_size = piece.dim("text_model.encoder.layers.0.mlp.fc1.weight", 2, 0)?;
        if embed_dim % CLIP_HEAD_DIM != 0 {
            return Err(piece
                .shape_error(
                    &token,
                    &format!("a width that is a multiple of {CLIP_HEAD_DIM} (CLIP's head width)"),
                    piece.shape(&token)?,
                )
                .into());
        }
        let config = ClipTextConfig {
            vocab_size,
            embed_dim,
            activation: Activation::QuickGelu,
            intermediate_size,
            max_position_embeddings: max_tokens,
            pad_with: None,
            num_hidden_layers: piece.count_blocks("text_model.encoder.layers"),
            num_attention_heads: embed_dim / CLIP_HEAD_DIM,
            projection_dim: embed_dim,
        };
        let vb = piece.var_builder(dtype, device)?;
        let model = ClipTextTransformer::new(vb.pp("text_model"), &config)
            .map_err(|e| piece.load_error(e))?;
        Ok(ClipEncoder { model })
    }

    /// The final hidden states `[1, L, D]` and the pooled vector `[1, D]` at the end token.
    pub fn encode(&self, tokens: &Tokens, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
        let ids = Tensor::new(tokens.ids.as_slice(), device)?.unsqueeze(0)?;
        let hidden = self.model.forward_with_mask(&ids, usize::MAX)?;
        let pooled = hidden.i((.., tokens.end_position))?;
        Ok((hidden, pooled))
    }
}

/// The T5 v1.1 encoder.
pub struct T5Encoder {
    model: T5EncoderModel,
}

impl T5Encoder {
    /// Derives the configuration from the tensor shapes in `piece` and loads it.
    pub fn load(piece: &Piece, dtype: DType, device: &Device) -> anyhow::Result<T5Encoder> {
        let embedding = t5_embedding(piece);
        let (vocab_size, d_model) = (piece.dim(embedding, 2, 0)?, piece.dim(embedding, 2, 1)?);
        let attention = "encoder.block.0.layer.0.SelfAttention";
        let bias = format!("{attention}.relative_attention_bias.weight");
        let (buckets, num_heads) = (piece.dim(&bias, 2, 0)?, piece.dim(&bias, 2, 1)?);
        let inner = piece.dim(&format!("{attention}.q.weight"), 2, 0)?;
        let feed_forward = "encoder.block.0.layer.1.DenseReluDense";
        let gated = piece.has(&format!("{feed_forward}.wi_0.weight"));
        let d_ff = if gated {
            piece.dim(&format!("{feed_forward}.wi_0.weight"), 2, 0)?
        } else {
            piece.dim(&format!("{feed_forward}.wi.weight"), 2, 0)?
        };
        let config = T5Config {
            vocab_size,
            d_model,
            d_kv: inner / num_heads,
            d_ff,
            num_layers: piece.count_blocks("encoder.block"),
            num_decoder_layers: None,
            num_heads,
            relative_attention_num_buckets: buckets,
            relative_attention_max_distance: T5_MAX_DISTANCE,
            dropout_rate: 0.0,
            layer_norm_epsilon: 1e-6,
            initializer_factor: 1.0,
            feed_forward_proj: ActivationWithOptionalGating {
                gated,
                activation: if gated {
                    candle_nn::Activation::NewGelu
                } else {
                    candle_nn::Activation::Relu
                },
            },
            tie_word_embeddings: false,
            is_decoder: false,
            is_encoder_decoder: false,
            use_cache: false,
            pad_token_id: 0,
            eos_token_id: 1,
            decoder_start_token_id: None,
        };
        let vb = piece.var_builder(dtype, device)?;
        let model = T5EncoderModel::load(vb, &config).map_err(|e| piece.load_error(e))?;
        Ok(T5Encoder { model })
    }

    /// The hidden states `[1, L, d_model]`.
    pub fn encode(&mut self, tokens: &Tokens, device: &Device) -> anyhow::Result<Tensor> {
        let ids = Tensor::new(tokens.ids.as_slice(), device)?.unsqueeze(0)?;
        Ok(self.model.forward(&ids)?)
    }
}

/// A CLIP text encoder as SD3 uses it: the hidden states of its penultimate layer (context)
/// and the projected final state at the end token (pooled).
///
/// candle-transformers' only CLIP that yields penultimate hidden states has fixed, private
/// configurations, so only the released sizes load: CLIP-L (ViT-L/14) and CLIP-G (bigG).
pub struct PenultimateClip {
    model: PenultimateClipTransformer,
    projection: Tensor,
}

/// Which of the two released CLIP text encoders.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClipSize {
    L,
    G,
}

impl ClipSize {
    /// candle's configuration and the released (vocabulary, width, layers).
    fn config(self) -> (PenultimateClipConfig, [usize; 3]) {
        match self {
            ClipSize::L => (PenultimateClipConfig::v1_5(), [49408, 768, 12]),
            ClipSize::G => (PenultimateClipConfig::sdxl2(), [49408, 1280, 32]),
        }
    }

    /// The width of the hidden states and of the pooled vector.
    pub fn width(self) -> usize {
        self.config().1[1]
    }

    /// Checks from its header that `piece` has this released size.
    pub fn check(self, piece: &Piece) -> Result<(), InputError> {
        let [vocab, width, layers] = self.config().1;
        let token = "text_model.embeddings.token_embedding.weight";
        let found = piece.shape(token)?;
        let found_layers = piece.count_blocks("text_model.encoder.layers");
        if found != [vocab, width] || found_layers != layers {
            return Err(InputError(format!(
                "{} has {found_layers} layers and {token} of shape {found:?}; expected the \
                 released {layers} layers and [{vocab}, {width}] (candle's CLIP for SD3 has \
                 fixed sizes)",
                piece.location()
            )));
        }
        Ok(())
    }
}

impl PenultimateClip {
    /// Loads `piece`, which must have the released size of `size`.
    pub fn load(
        piece: &Piece,
        size: ClipSize,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<PenultimateClip> {
        size.check(piece)?;
        let (config, [_, width, _]) = size.config();
        let vb = piece.var_builder(dtype, device)?;
        let model = PenultimateClipTransformer::new(vb.clone(), &config)
            .map_err(|e| piece.load_error(e))?;
        let projection = vb
            .get((width, width), "text_projection.weight")
            .map_err(|e| piece.load_error(e))?;
        Ok(PenultimateClip { model, projection })
    }

    /// The penultimate hidden states `[1, L, D]` and the projected pooled vector `[1, D]`.
    pub fn encode(&self, tokens: &Tokens, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
        let ids = Tensor::new(tokens.ids.as_slice(), device)?.unsqueeze(0)?;
        let (last, penultimate) = self
            .model
            .forward_until_encoder_layer(&ids, usize::MAX, -2)?;
        let pooled = last
            .i((.., tokens.end_position))?
            .matmul(&self.projection.t()?)?;
        Ok((penultimate, pooled))
    }
}

/// Text encoders loaded when a prompt needs them: kept between prompts, or loaded for each
/// prompt and freed after it so their memory goes back to the transformer.
pub struct OnDemand<T> {
    keep: bool,
    loaded: Mutex<Option<T>>,
}

impl<T> OnDemand<T> {
    pub fn new(keep: bool) -> OnDemand<T> {
        OnDemand {
            keep,
            loaded: Mutex::new(None),
        }
    }

    /// Runs `work` on the encoders, loading them with `load` unless they are kept loaded.
    pub fn with<R>(
        &self,
        load: impl FnOnce() -> anyhow::Result<T>,
        work: impl FnOnce(&mut T) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut loaded = self
            .loaded
            .lock()
            .map_err(|_| anyhow::anyhow!("a previous prompt encoding failed midway"))?;
        let mut encoders = match loaded.take() {
            Some(encoders) => encoders,
            None => load()?,
        };
        let result = work(&mut encoders);
        if self.keep {
            *loaded = Some(encoders);
        }
        result
    }
}

/// The name of T5's token embedding in `piece` (`shared.weight` in most files).
fn t5_embedding(piece: &Piece) -> &'static str {
    ["shared.weight", "encoder.embed_tokens.weight"]
        .into_iter()
        .find(|name| piece.has(name))
        .unwrap_or("shared.weight")
}

/// The width of the embeddings the T5 in `piece` makes.
pub fn t5_width(piece: &Piece) -> Result<usize, InputError> {
    piece.dim(t5_embedding(piece), 2, 1)
}

/// The precision T5 runs at: f16 overflows inside T5's feed-forward layers, so a model asked
/// for f16 runs its T5 at bf16 (f32's range at the same size).
pub fn t5_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 => DType::BF16,
        other => other,
    }
}
