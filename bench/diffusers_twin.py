"""The diffusers side of `bench/diffusers-twin.sh`, and the files both programs read.

Subcommands:
  snapshot DIR        write a FLUX.1-schnell folder as the release has it: every network at
                      its real width, with few blocks, random weights (bf16, as the real files)
  reference DIR       write the committed FLUX.1-schnell reference: a tiny snapshot's files
                      Flowline reads, a noise, and FluxPipeline's picture from them
  reference-sd35 DIR  the same for SD3.5 Large: Stability's single file, T5 and its tokenizer,
                      a noise, and StableDiffusion3Pipeline's picture from them
  run SNAPSHOT ...    generate with diffusers' FluxPipeline, timing each phase into a JSON file
  measure ...         run Flowline and diffusers in turn on the same snapshot and noise, and
                      print the table

The snapshot is written by diffusers' and transformers' own classes, so its layout is by
definition the one real downloads have; both programs then load the same files and start from
the same noise.
"""

import argparse
import json
import math
import sys
import shutil
import tempfile
from dataclasses import dataclass
import time
from pathlib import Path

PROMPT = "a lighthouse on a rocky coast at sunset, warm light, detailed photograph"


def byte_letters() -> list:
    """The printable stand-ins byte-level BPE (GPT-2's, CLIP's) writes the 256 bytes as."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    letters, extra = [], 0
    for byte in range(256):
        if byte in printable:
            letters.append(chr(byte))
        else:
            letters.append(chr(256 + extra))
            extra += 1
    return letters


@dataclass
class Sizes:
    """The widths and depths of a snapshot's networks."""
    hidden: int
    head: int
    double_blocks: int
    single_blocks: int
    t5_width: int
    t5_heads: int
    t5_head_width: int
    t5_feed_forward: int
    t5_vocabulary: int
    clip_width: int
    clip_heads: int
    clip_feed_forward: int
    autoencoder_channels: list
    autoencoder_blocks: int


# FLUX.1-schnell's real widths, with one block of each kind and one text encoder layer.
REAL = Sizes(hidden=3072, head=128, double_blocks=1, single_blocks=1, t5_width=4096,
             t5_heads=64, t5_head_width=64, t5_feed_forward=10240, t5_vocabulary=32128,
             clip_width=768, clip_heads=12, clip_feed_forward=3072,
             autoencoder_channels=[128, 256, 512, 512], autoencoder_blocks=2)
# Tiny widths for the committed reference (tests/data/diffusers-flux-schnell): a few MB.
TINY = Sizes(hidden=64, head=32, double_blocks=1, single_blocks=1, t5_width=32, t5_heads=4,
             t5_head_width=8, t5_feed_forward=64, t5_vocabulary=64, clip_width=64,
             clip_heads=2, clip_feed_forward=128, autoencoder_channels=[32, 64, 64, 64],
             autoencoder_blocks=1)


def write_snapshot(folder: Path, sizes: Sizes) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="twin-tokenizers-"))

    # CLIP's tokenizer: every byte as a token, alone and ending a word, and no merges.
    letters = byte_letters()
    vocab = {}
    for token in ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]:
        vocab.setdefault(token, len(vocab))
    (work / "vocab.json").write_text(json.dumps(vocab))
    (work / "merges.txt").write_text("#version: 0.2\n")
    clip_tokenizer = CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"),
                                   model_max_length=77)

    t5_tokenizer = tiny_t5_tokenizer(work, PROMPT.replace(",", "").split())

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=max(49408 if sizes is REAL else 0, len(vocab)),
        hidden_size=sizes.clip_width, intermediate_size=sizes.clip_feed_forward,
        num_hidden_layers=1, num_attention_heads=sizes.clip_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=sizes.clip_width, bos_token_id=0,
        eos_token_id=1, pad_token_id=1))
    t5_encoder = t5_encoder_of(sizes)
    # The rotary embedding splits a head as FLUX.1's 16/56/56 of 128 does (Flowline derives
    # the split from the head width the same way).
    first = sizes.head // 8
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=sizes.double_blocks,
        num_single_layers=sizes.single_blocks, attention_head_dim=sizes.head,
        num_attention_heads=sizes.hidden // sizes.head, joint_attention_dim=sizes.t5_width,
        pooled_projection_dim=sizes.clip_width, guidance_embeds=False,
        axes_dims_rope=(first, (sizes.head - first) // 2, (sizes.head - first) // 2))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=sizes.autoencoder_channels,
        layers_per_block=sizes.autoencoder_blocks, norm_num_groups=32,
        sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=True)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5_encoder, tokenizer_2=t5_tokenizer,
                        transformer=transformer)
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(str(folder), safe_serialization=True)

    # Released CLIP files name their tensors `text_model.…`, as transformers wrote them
    # before version 5; the file is written that way, as users have it.
    clip_file = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(str(clip_file))
    save_file({name if name.startswith("text_model.") else "text_model." + name: value
               for name, value in tensors.items()}, str(clip_file), metadata={"format": "pt"})

    # The release also ships the transformer and autoencoder in Black Forest Labs' own layout
    # at the top of the folder, which Flowline (and ComfyUI) read. Those files are written
    # first and diffusers converts them into its folders, so both programs run one set of
    # weights.
    save_file(bfl_transformer(sizes), str(folder / "flux1-schnell.safetensors"))
    save_file(bfl_autoencoder(sizes), str(folder / "ae.safetensors"))
    converted = transformer_from_bfl(folder / "flux1-schnell.safetensors", folder, sizes.hidden)
    converted.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    converted = AutoencoderKL.from_single_file(
        str(folder / "ae.safetensors"), config=str(folder), subfolder="vae",
        dtype=torch.bfloat16)
    converted.save_pretrained(str(folder / "vae"), safe_serialization=True)


def tiny_t5_tokenizer(work: Path, words: list):
    """T5's tokenizer: a unigram model over letters and `words`, written into `work`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz,.'"]
    pieces += [("▁" + w, -1.0) for w in words]
    t5 = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    t5.pre_tokenizer = pre_tokenizers.Metaspace()
    t5.save(str(work / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(work / "tokenizer.json"), extra_ids=0,
                           eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           model_max_length=512)


def t5_encoder_of(sizes: Sizes):
    """A T5 v1.1 encoder (gated GELU) of one layer at `sizes`' T5 widths, random weights."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=sizes.t5_vocabulary, d_model=sizes.t5_width, d_kv=sizes.t5_head_width,
        d_ff=sizes.t5_feed_forward, num_layers=1, num_heads=sizes.t5_heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
        layer_norm_epsilon=1e-6, tie_word_embeddings=False))


def transformer_from_bfl(path: Path, folder: Path, hidden: int):
    """The diffusers transformer holding the Black Forest Labs-layout file's weights, through
    diffusers' own converter. That converter is written for FLUX.1's width alone (its
    `inner_dim = 3072`), so for other widths it runs with that one constant changed."""
    import inspect

    import diffusers.loaders.single_file_utils as utils
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    convert = utils.convert_flux_transformer_checkpoint_to_diffusers
    if hidden != 3072:
        source = inspect.getsource(convert)
        assert "inner_dim = 3072" in source, "diffusers' FLUX converter changed"
        namespace = dict(vars(utils))
        exec(source.replace("inner_dim = 3072", f"inner_dim = {hidden}"), namespace)
        convert = namespace[convert.__name__]
    model = FluxTransformer2DModel.from_config(
        FluxTransformer2DModel.load_config(str(folder), subfolder="transformer"))
    model.load_state_dict(convert(load_file(str(path))), strict=True)
    return model.to(torch.bfloat16)


class Weights(dict):
    """Named random tensors at scales that keep activations near unit size, in bf16 (or
    `dtype`, a torch dtype's name)."""

    def __init__(self, seed: int, dtype: str = "bfloat16"):
        import torch

        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = getattr(torch, dtype)

    def random(self, name: str, shape: tuple, scale: float) -> None:
        import torch

        value = torch.randn(shape, generator=self.generator) * scale
        self[name] = value.to(self.dtype)

    def linear(self, name: str, out: int, inp: int, gain: float = 1.0) -> None:
        self.random(f"{name}.weight", (out, inp), gain / math.sqrt(inp))
        self.random(f"{name}.bias", (out,), 0.02)

    def conv(self, name: str, out: int, inp: int, kernel: int) -> None:
        self.random(f"{name}.weight", (out, inp, kernel, kernel), 1 / math.sqrt(inp * kernel ** 2))
        self.random(f"{name}.bias", (out,), 0.02)

    def positive(self, name: str, width: int, spread: float) -> None:
        """Scales around 1: e to the power of normal values of deviation `spread`."""
        import torch

        value = torch.exp(torch.randn((width,), generator=self.generator) * spread)
        self[name] = value.to(self.dtype)

    def ones(self, name: str, width: int) -> None:
        import torch

        self[name] = torch.ones(width, dtype=self.dtype)

    def norm(self, name: str, width: int) -> None:
        import torch

        self.ones(f"{name}.weight", width)
        self[f"{name}.bias"] = torch.zeros(width, dtype=self.dtype)


def bfl_transformer(sizes: Sizes) -> dict:
    """FLUX.1-schnell's transformer as `flux1-schnell.safetensors` names it."""
    hidden, mlp, head = sizes.hidden, 4 * sizes.hidden, sizes.head
    t = Weights(1)
    t.linear("img_in", hidden, 64)
    t.linear("txt_in", hidden, sizes.t5_width)
    t.linear("time_in.in_layer", hidden, 256)
    t.linear("time_in.out_layer", hidden, hidden)
    t.linear("vector_in.in_layer", hidden, sizes.clip_width)
    t.linear("vector_in.out_layer", hidden, hidden)
    for block in range(sizes.double_blocks):
        for stream in ["img", "txt"]:
            b = f"double_blocks.{block}.{stream}"
            t.linear(f"{b}_mod.lin", 6 * hidden, hidden, 0.1)
            t.linear(f"{b}_attn.qkv", 3 * hidden, hidden)
            t.ones(f"{b}_attn.norm.query_norm.scale", head)
            t.ones(f"{b}_attn.norm.key_norm.scale", head)
            t.linear(f"{b}_attn.proj", hidden, hidden)
            t.linear(f"{b}_mlp.0", mlp, hidden)
            t.linear(f"{b}_mlp.2", hidden, mlp)
    for block in range(sizes.single_blocks):
        b = f"single_blocks.{block}"
        t.linear(f"{b}.linear1", 3 * hidden + mlp, hidden)
        t.linear(f"{b}.linear2", hidden, hidden + mlp)
        t.ones(f"{b}.norm.query_norm.scale", head)
        t.ones(f"{b}.norm.key_norm.scale", head)
        t.linear(f"{b}.modulation.lin", 3 * hidden, hidden, 0.1)
    t.linear("final_layer.linear", 64, hidden, 0.5)
    t.linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden, 0.1)
    return dict(t)


def bfl_autoencoder(sizes: Sizes) -> dict:
    """FLUX.1's autoencoder as `ae.safetensors` names it: four levels (the real one has
    channels 128, 256, 512, 512, two residual blocks per level going down and three going
    up), 16 latent channels."""
    channels = sizes.autoencoder_channels
    blocks = sizes.autoencoder_blocks
    t = Weights(2)

    def resnet(name: str, inp: int, out: int) -> None:
        t.norm(f"{name}.norm1", inp)
        t.conv(f"{name}.conv1", out, inp, 3)
        t.norm(f"{name}.norm2", out)
        t.conv(f"{name}.conv2", out, out, 3)
        if inp != out:
            t.conv(f"{name}.nin_shortcut", out, inp, 1)

    def middle(side: str, width: int) -> None:
        resnet(f"{side}.mid.block_1", width, width)
        t.norm(f"{side}.mid.attn_1.norm", width)
        for conv in ["q", "k", "v", "proj_out"]:
            t.conv(f"{side}.mid.attn_1.{conv}", width, width, 1)
        resnet(f"{side}.mid.block_2", width, width)

    t.conv("encoder.conv_in", channels[0], 3, 3)
    width = channels[0]
    for level, out in enumerate(channels):
        for block in range(blocks):
            resnet(f"encoder.down.{level}.block.{block}", width, out)
            width = out
        if level + 1 < len(channels):
            t.conv(f"encoder.down.{level}.downsample.conv", out, out, 3)
    middle("encoder", width)
    t.norm("encoder.norm_out", width)
    t.conv("encoder.conv_out", 32, width, 3)

    t.conv("decoder.conv_in", width, 16, 3)
    middle("decoder", width)
    for level in reversed(range(len(channels))):
        out = channels[level]
        for block in range(blocks + 1):
            resnet(f"decoder.up.{level}.block.{block}", width, out)
            width = out
        if level > 0:
            t.conv(f"decoder.up.{level}.upsample.conv", out, out, 3)
    t.norm("decoder.norm_out", width)
    t.conv("decoder.conv_out", 3, width, 3)
    return dict(t)


# The committed reference: image side and steps.
REFERENCE_SIZE = 64
REFERENCE_STEPS = 2
# What Flowline reads of a snapshot (the diffusers folders of the transformer and autoencoder
# hold the same weights as the top-level files, so they stay out of the repository).
FLOWLINE_FILES = ["flux1-schnell.safetensors", "ae.safetensors", "text_encoder/model.safetensors",
                  "text_encoder_2/model.safetensors", "tokenizer/tokenizer.json",
                  "tokenizer_2/tokenizer.json"]


def write_reference(folder: Path) -> None:
    """A tiny snapshot's files Flowline reads, a starting noise, and diffusers' picture from
    them (`reference.png`): `tests/diffusers_reference.rs` checks Flowline draws the same."""
    snapshot = Path(tempfile.mkdtemp(prefix="tiny-flux-"))
    write_snapshot(snapshot, TINY)
    folder.mkdir(parents=True, exist_ok=True)
    for name in FLOWLINE_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(snapshot / name, folder / name)
    write_noise(folder / "noise.latent", REFERENCE_SIZE, seed=42)
    times = snapshot / "times.json"
    run(snapshot, folder / "noise.latent", REFERENCE_SIZE, REFERENCE_STEPS, 1,
        folder / "reference.png", times)
    shutil.rmtree(snapshot)


# SD3.5 Large's layout at tiny widths for the committed SD3.5 reference
# (tests/data/diffusers-sd35): two joint blocks (the last one's context stream ends at its
# q, k, v, as every SD3 model's does), one head per block as Stability's MMDiT has, heads of 32.
SD35_DEPTH = 2
SD35_HEAD = 32
SD35_POSITIONS = 8
# The joint blocks' modulation at full gain (FLUX's helper damps it to 0.1): with it the
# prompt, negative prompt and CFG scale move the tiny model's picture by many levels (CFG 1
# instead of 4.5 moves it by up to 17/255), so a fault in them cannot hide under rounding.
SD35_MODULATION_GAIN = 1.0
# CLIP-L and CLIP-G side by side: the pooled vector's width, fixed by the released encoders.
SD35_POOLED = 768 + 1280
# What Flowline reads of the SD3.5 reference: Stability's single file (MMDiT and
# autoencoder), T5 where Stability's repository keeps it, and T5's tokenizer.
SD35_FILES = ["sd3.5_large.safetensors", "text_encoders/t5xxl_fp16.safetensors",
              "tokenizer_3/tokenizer.json"]


def stability_mmdit(t5_width: int) -> dict:
    """SD3.5 Large's MMDiT as `sd3.5_large.safetensors` names it (without its
    `model.diffusion_model.` prefix), in f16: patch 2, q/k RMS norms, no MMDiT-X attention."""
    hidden, head = SD35_DEPTH * SD35_HEAD, SD35_HEAD
    t = Weights(3, "float16")
    t.random("x_embedder.proj.weight", (hidden, 16, 2, 2), 1 / math.sqrt(16 * 4))
    t.random("x_embedder.proj.bias", (hidden,), 0.02)
    t.random("pos_embed", (1, SD35_POSITIONS ** 2, hidden), 0.5)
    t.linear("t_embedder.mlp.0", hidden, 256)
    t.linear("t_embedder.mlp.2", hidden, hidden)
    t.linear("y_embedder.mlp.0", hidden, SD35_POOLED)
    t.linear("y_embedder.mlp.2", hidden, hidden)
    t.linear("context_embedder", hidden, t5_width)
    for block in range(SD35_DEPTH):
        for stream in ["x_block", "context_block"]:
            b = f"joint_blocks.{block}.{stream}"
            last = block == SD35_DEPTH - 1 and stream == "context_block"
            t.linear(f"{b}.attn.qkv", 3 * hidden, hidden)
            # q/k RMS norm scales spread as trained ones are (about 0.5 to 2), so that a
            # program skipping a norm draws another picture.
            for norm in ["ln_q", "ln_k"]:
                t.positive(f"{b}.attn.{norm}.weight", head, 0.35)
            if not last:
                t.linear(f"{b}.attn.proj", hidden, hidden)
                t.linear(f"{b}.mlp.fc1", 4 * hidden, hidden)
                t.linear(f"{b}.mlp.fc2", hidden, 4 * hidden)
            t.linear(f"{b}.adaLN_modulation.1", (2 if last else 6) * hidden, hidden,
                     SD35_MODULATION_GAIN)
    t.linear("final_layer.linear", 2 * 2 * 16, hidden, 0.5)
    t.linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden, 0.1)
    return dict(t)


def sd35_settings(repository: Path) -> dict:
    """The prompt, negative prompt, CFG scale and shift of Flowline's SD3.5 workflow."""
    workflow = json.loads((repository / "assets/workflows/sd3.5.json").read_text())
    params = {node["id"]: node["params"] for node in workflow["nodes"]}
    assert params["cfg"]["method"] == "cfg" and params["sampler"]["sampler"] == "euler"
    assert params["sampler"]["scheduler"] == "shifted"
    return {"prompt": params["prompt"]["text"], "negative": params["negative"]["text"],
            "scale": params["cfg"]["scale"], "shift": params["sampler"]["shift"]}


def write_sd35_reference(folder: Path) -> None:
    """A tiny SD3.5 Large in Stability's single-file layout with T5 and its tokenizer, a
    starting noise, and the picture diffusers' StableDiffusion3Pipeline draws from them
    (`reference.png`, 64², 2 steps, f32, with the prompt, negative prompt, CFG scale and shift
    of Flowline's SD3.5 workflow); `tests/real_families.rs` checks Flowline draws the same.

    diffusers reads the single file through its own converters. CLIP-L and CLIP-G are left out
    (Flowline, through candle, takes only their released sizes: 250 MB and more), so the CLIP
    part of the conditioning is zeros, as ComfyUI and Flowline make it for a left-out CLIP: 77
    zero tokens before T5's 77 and a zero pooled vector. Flowline walks
    σ = shift·t / (1 + (shift−1)·t) down t = 1, 1 − 1/N, …, 0; diffusers is given those t (its
    own default for SD3 ends its grid at t = 0.001 instead, which at 2 steps is another
    picture)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel

    settings = sd35_settings(Path(__file__).resolve().parent.parent)
    work = Path(tempfile.mkdtemp(prefix="tiny-sd35-"))
    folder.mkdir(parents=True, exist_ok=True)
    words = []
    for word in (settings["prompt"] + " " + settings["negative"]).replace(",", "").split():
        if word not in words:
            words.append(word)
    # The tokenizer file as transformers writes it (with the `</s>` it appends), as
    # Stability's `tokenizer_3/` holds it.
    tokenizer = tiny_t5_tokenizer(work, words)
    tokenizer.save_pretrained(str(work / "tokenizer_3"))
    (folder / "tokenizer_3").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "tokenizer_3/tokenizer.json", folder / "tokenizer_3/tokenizer.json")

    torch.manual_seed(0)
    t5 = t5_encoder_of(TINY).to(torch.float16)
    t5.save_pretrained(str(work / "t5"), safe_serialization=True)
    (folder / "text_encoders").mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "t5/model.safetensors", folder / "text_encoders/t5xxl_fp16.safetensors")

    # SD3's autoencoder is FLUX.1's architecture with its own latent scale and shift.
    vae_config = dict(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=TINY.autoencoder_channels, layers_per_block=TINY.autoencoder_blocks,
        norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
    AutoencoderKL(**vae_config).save_config(str(work / "config/vae"))
    single = {f"model.diffusion_model.{k}": v for k, v in stability_mmdit(TINY.t5_width).items()}
    single.update({f"first_stage_model.{k}": v.to(torch.float16)
                   for k, v in bfl_autoencoder(TINY).items()})
    save_file(single, str(folder / SD35_FILES[0]))

    # diffusers' side, all from the written files, at f32.
    transformer = SD3Transformer2DModel(
        sample_size=REFERENCE_SIZE // 8, patch_size=2, in_channels=16, num_layers=SD35_DEPTH,
        attention_head_dim=SD35_HEAD, num_attention_heads=SD35_DEPTH,
        joint_attention_dim=TINY.t5_width, caption_projection_dim=SD35_DEPTH * SD35_HEAD,
        pooled_projection_dim=SD35_POOLED, out_channels=16, pos_embed_max_size=SD35_POSITIONS,
        dual_attention_layers=(), qk_norm="rms_norm")
    transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(
        load_file(str(folder / SD35_FILES[0]))), strict=True)
    vae = AutoencoderKL.from_single_file(str(folder / SD35_FILES[0]), config=str(work / "config"),
                                         subfolder="vae", dtype=torch.float32)
    t5 = T5EncoderModel.from_pretrained(str(work / "t5"), dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=settings["shift"])
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.to(torch.float32), scheduler=scheduler, vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=t5, tokenizer_3=tokenizer)

    write_noise(folder / "noise.latent", REFERENCE_SIZE, seed=42)
    noise = load_file(str(folder / "noise.latent"))["latent_tensor"]
    with torch.inference_mode():
        def conditioning(text: str) -> tuple:
            t5_part = pipe._get_t5_prompt_embeds(text, max_sequence_length=77,
                                                 dtype=torch.float32)
            clip_part = torch.zeros((1, 77, TINY.t5_width))
            return torch.cat([clip_part, t5_part], dim=1), torch.zeros((1, SD35_POOLED))

        positive, pooled = conditioning(settings["prompt"])
        negative, negative_pooled = conditioning(settings["negative"])
        steps = REFERENCE_STEPS
        image = pipe(prompt_embeds=positive, pooled_prompt_embeds=pooled,
                     negative_prompt_embeds=negative,
                     negative_pooled_prompt_embeds=negative_pooled,
                     latents=noise, height=REFERENCE_SIZE, width=REFERENCE_SIZE,
                     sigmas=[1 - i / steps for i in range(steps)],
                     guidance_scale=settings["scale"], output_type="pil").images[0]
    image.save(str(folder / "reference.png"))
    shutil.rmtree(work)


def write_noise(path: Path, size: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 16, size // 8, size // 8), generator=generator, dtype=torch.float32)
    save_file({"latent_tensor": noise}, str(path))


def run(snapshot: Path, noise_file: Path, size: int, steps: int, threads: int, image: Path,
        times_file: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    times = {}
    began = time.perf_counter()
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    pipe = FluxPipeline.from_pretrained(str(snapshot), dtype=torch.float32)
    times["load"] = time.perf_counter() - began

    with torch.inference_mode():
        mark = time.perf_counter()
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            prompt=PROMPT, prompt_2=PROMPT, max_sequence_length=256)
        times["encode"] = time.perf_counter() - mark

        noise = load_file(str(noise_file))["latent_tensor"]
        packed = pipe._pack_latents(noise, 1, 16, size // 8, size // 8)
        mark = time.perf_counter()
        latents = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, latents=packed,
                       height=size, width=size, num_inference_steps=steps, guidance_scale=0.0,
                       max_sequence_length=256, output_type="latent").images
        times["sample"] = time.perf_counter() - mark

        mark = time.perf_counter()
        latents = pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        pixels = pipe.vae.decode(latents, return_dict=False)[0]
        times["decode"] = time.perf_counter() - mark
    pipe.image_processor.postprocess(pixels, output_type="pil")[0].save(str(image))
    times["end_to_end"] = time.perf_counter() - began
    times_file.write_text(json.dumps(times))


def flowline_workflow(repository: Path, noise_file: Path, steps: int, path: Path) -> None:
    """The repository's FLUX.1-schnell workflow, starting from `noise_file`, at f32."""
    workflow = json.loads((repository / "assets/workflows/flux-schnell.json").read_text())
    for node in workflow["nodes"]:
        if node["id"] == "start":
            node["type"] = "load_latent"
            node["params"] = {"path": str(noise_file)}
        elif node["id"] == "sampler":
            node["params"]["steps"] = steps
        elif node["id"] == "model":
            node["params"]["precision"] = "f32"
    path.write_text(json.dumps(workflow, indent=1))


def timed_child(command: list) -> tuple:
    """Runs `command`; returns its wall time and peak resident memory in bytes."""
    import os
    import subprocess

    began = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - began
    errors = child.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{errors[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def median(values: list) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def measure(args) -> None:
    """Runs both programs `args.repeats` times at each size, alternating, and prints the
    medians; the last line is the end-to-end ratio at the first size."""
    import os

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count()
    phases = ["load", "encode", "sample", "decode", "end_to_end"]
    flowline_nodes = {"load": "model", "encode": "prompt", "sample": "sampler",
                      "decode": "decode"}
    rows = []
    headline = None
    for size in args.sizes:
        noise = work / f"noise-{size}.latent"
        write_noise(noise, size, seed=42)
        workflow = work / f"flowline-{size}.json"
        flowline_workflow(args.repository, noise, args.steps, workflow)
        times = {"flowline": {p: [] for p in phases}, "diffusers": {p: [] for p in phases}}
        peaks = {"flowline": [], "diffusers": []}
        images = {}
        for repeat in range(args.repeats):
            out = work / f"flowline-{size}-{repeat}"
            trace = work / f"flowline-{size}-{repeat}.trace.json"
            seconds, peak = timed_child([
                str(args.flowline), "run", str(workflow), "--set",
                f"model.path={args.snapshot}", "--out", str(out), "--trace", str(trace)])
            record = json.loads(trace.read_text())
            node_seconds = {n["node"]: n["seconds"] for n in record["nodes"]}
            for phase, node in flowline_nodes.items():
                times["flowline"][phase].append(node_seconds[node])
            times["flowline"]["end_to_end"].append(seconds)
            peaks["flowline"].append(peak)
            images["flowline"] = Path(record["images"][0])

            image = work / f"diffusers-{size}-{repeat}.png"
            phase_file = work / f"diffusers-{size}-{repeat}.json"
            seconds, peak = timed_child([
                sys.executable, __file__, "run", str(args.snapshot), "--noise", str(noise),
                "--size", str(size), "--steps", str(args.steps), "--threads", str(threads),
                "--image", str(image), "--times", str(phase_file)])
            phase_times = json.loads(phase_file.read_text())
            for phase in phases[:-1]:
                times["diffusers"][phase].append(phase_times[phase])
            times["diffusers"]["end_to_end"].append(seconds)
            peaks["diffusers"].append(peak)
            images["diffusers"] = image
            print(f"{size}² run {repeat + 1}/{args.repeats}: flowline "
                  f"{times['flowline']['end_to_end'][-1]:.1f} s, diffusers "
                  f"{times['diffusers']['end_to_end'][-1]:.1f} s", flush=True)
        for phase in phases:
            ours, theirs = median(times["flowline"][phase]), median(times["diffusers"][phase])
            rows.append((f"{size}²", phase, f"{ours:.2f} s", f"{theirs:.2f} s",
                         f"{ours / theirs:.2f}"))
        ours, theirs = max(peaks["flowline"]), max(peaks["diffusers"])
        rows.append((f"{size}²", "peak RSS", f"{ours / 2**30:.2f} GiB",
                     f"{theirs / 2**30:.2f} GiB", f"{ours / theirs:.2f}"))
        agreement = psnr(images["flowline"], images["diffusers"])
        rows.append((f"{size}²", "image PSNR", "", "", f"{agreement:.1f} dB"))
        if headline is None:
            headline = median(times["flowline"]["end_to_end"]) / median(
                times["diffusers"]["end_to_end"])

    print(f"\nFLUX.1-schnell snapshot {args.snapshot}, {args.steps} steps, f32, {threads} "
          f"threads, median of {args.repeats} alternating runs (load: the transformer, "
          "autoencoder and, for diffusers, the text encoders; Flowline loads its text "
          "encoders while encoding)\n")
    header = ("size", "phase", "flowline", "diffusers", "flowline/diffusers")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    print(f"end-to-end ratio flowline/diffusers: {headline:.2f}")


def psnr(first: Path, second: Path) -> float:
    import numpy
    from PIL import Image

    a = numpy.asarray(Image.open(first).convert("RGB"), dtype=numpy.float64)
    b = numpy.asarray(Image.open(second).convert("RGB"), dtype=numpy.float64)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    snapshot = commands.add_parser("snapshot")
    snapshot.add_argument("folder", type=Path)
    reference = commands.add_parser("reference")
    reference.add_argument("folder", type=Path)
    reference_sd35 = commands.add_parser("reference-sd35")
    reference_sd35.add_argument("folder", type=Path)
    generate = commands.add_parser("run")
    generate.add_argument("snapshot", type=Path)
    generate.add_argument("--noise", type=Path, required=True)
    generate.add_argument("--size", type=int, required=True)
    generate.add_argument("--steps", type=int, default=4)
    generate.add_argument("--threads", type=int, required=True)
    generate.add_argument("--image", type=Path, required=True)
    generate.add_argument("--times", type=Path, required=True)
    both = commands.add_parser("measure")
    both.add_argument("--flowline", type=Path, required=True)
    both.add_argument("--repository", type=Path, required=True)
    both.add_argument("--snapshot", type=Path, required=True)
    both.add_argument("--work", type=Path, required=True)
    both.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    both.add_argument("--steps", type=int, default=4)
    both.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.command == "snapshot":
        write_snapshot(args.folder, REAL)
    elif args.command == "reference":
        write_reference(args.folder)
    elif args.command == "reference-sd35":
        write_sd35_reference(args.folder)
    elif args.command == "run":
        run(args.snapshot, args.noise, args.size, args.steps, args.threads, args.image, args.times)
    else:
        measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
