"""Stable Diffusion-shaped model families at any size, with seeded random weights.

One `SDFamilySize` describes a family (UNet, VAE, CLIP text encoder, tokenizer, seed);
`write_sd_family` builds every component from configs and writes a diffusers folder with
`save_pretrained(safe_serialization=True)`, plus `controlnet-<type>/` ControlNets made from
the UNet. The tiny family (pipelines/tiny.py) and the benchmarks' random SD 1.5
(bench/common.py) are two sizes of this one builder, and both load through the same
`from_pretrained` code as real weights.

Each component is seeded just before it is built, so one size always writes the same bytes
whatever else was built before it in the process.
"""

from __future__ import annotations

import gc
import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A few sentences from which the offline tokenizer learns its merges: enough for common
# prompt words to be single tokens, as in CLIP's real vocabulary.
BPE_CORPUS = """
a photo of a cat sitting on a red chair in the sun, portrait of a woman with long hair,
a dog running on the beach at sunset, oil painting of a mountain landscape with a lake,
a man standing in a city street at night, neon lights, highly detailed, sharp focus,
anime style character dancing, watercolor flowers in a blue vase, a fox in the snow,
cinematic lighting, studio photo, the best quality, masterpiece, a house in the forest
"""
_BPE_MERGES = 96
MAX_PROMPT_TOKENS = 77  # CLIP's context length, start and end tokens included
LATENT_CHANNELS = 4


def build_offline_tokenizer(corpus: str = BPE_CORPUS, num_merges: int = _BPE_MERGES):
    """A real CLIP byte-level BPE tokenizer, written as vocab.json + merges.txt and loaded
    back through `from_pretrained`, exactly as a Hub tokenizer folder is read."""
    from transformers import CLIPTokenizer

    vocab, merges = _learn_clip_bpe(corpus, num_merges)
    with tempfile.TemporaryDirectory(prefix="stencil-tok-") as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        merges_file = Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text(
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
        )
        return CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=MAX_PROMPT_TOKENS,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )


@dataclass(frozen=True)
class SDFamilySize:
    """Every size of an SD-shaped family, and the seed of its random weights.

    Widths must divide by their norm groups, and the UNet widths by `attention_head_dim`.
    """

    seed: int
    # UNet: one entry per resolution level, from the input down.
    unet_widths: tuple[int, ...]
    unet_cross_attention: tuple[bool, ...]  # which levels attend to the prompt
    unet_layers: int  # ResNet layers per block
    unet_sample_size: int  # the latent side the UNet is configured for
    attention_head_dim: int
    # The text encoder's hidden size, which is also the UNet's cross-attention width.
    cross_attention_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    # VAE: four levels downsample by 8, as Stable Diffusion's VAE does.
    vae_widths: tuple[int, ...]
    vae_layers: int
    vae_norm_groups: int
    vae_sample_size: int
    unet_norm_groups: int = 32
    vae_scaling_factor: float = 0.18215  # SD 1.5's latent scale (SDXL's is 0.13025)
    # None: the tokenizer's own size. A larger table (SD 1.5's 49408) still reads its ids.
    text_vocab_size: int | None = None
    tokenizer: Callable[[], Any] = build_offline_tokenizer
    controlnet_embedding_widths: tuple[int, ...] = (16, 32, 96, 256)
    # ControlNetModel.from_unet zero-initialises its output convolutions, which makes a
    # fresh ControlNet a no-op; drawing them at this scale makes it change the image.
    controlnet_output_scale: float = 0.02

    def __post_init__(self) -> None:
        if len(self.unet_cross_attention) != len(self.unet_widths):
            raise ValueError(
                f"unet_cross_attention has {len(self.unet_cross_attention)} entries for "
                f"{len(self.unet_widths)} UNet levels {self.unet_widths}"
            )


# Stable Diffusion 1.5's own sizes (seed 0): give it another seed with dataclasses.replace.
SD15_SIZE = SDFamilySize(
    seed=0,
    unet_widths=(320, 640, 1280, 1280),
    unet_cross_attention=(True, True, True, False),
    unet_layers=2,
    unet_sample_size=64,
    attention_head_dim=8,
    cross_attention_width=768,
    text_layers=12,
    text_heads=12,
    text_intermediate=3072,
    text_vocab_size=49408,
    vae_widths=(128, 256, 512, 512),
    vae_layers=2,
    vae_norm_groups=32,
    vae_sample_size=512,
)


def write_sd_family(
    folder: Path,
    size: SDFamilySize,
    control_types: Sequence[str] = (),
    *,
    dtype: str = "float32",
) -> None:
    """Build the family at `size` and save it into `folder` as a diffusers pipeline, with a
    `controlnet-<type>` ControlNet per control type, every weight stored in `dtype`."""
    import torch

    torch_dtype = getattr(torch, dtype)
    folder = Path(folder)
    unet = build_unet(size)
    # ControlNets copy the UNet while it is float32, and go to disk one at a time: at SD 1.5
    # size each is over a gigabyte.
    for index, control_type in enumerate(control_types):
        controlnet = build_controlnet(unet, size, index).to(torch_dtype)
        controlnet.save_pretrained(folder / f"controlnet-{control_type}", safe_serialization=True)
        del controlnet
        gc.collect()
    components = build_components(size, unet=unet)
    pipe = _pipeline(
        {
            name: part.to(torch_dtype) if hasattr(part, "parameters") else part
            for name, part in components.items()
        }
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_components(size: SDFamilySize, *, unet=None) -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and scheduler, seeded, float32, on the CPU."""
    tokenizer = size.tokenizer()
    return {
        "unet": unet if unet is not None else build_unet(size),
        "vae": build_vae(size),
        "text_encoder": build_text_encoder(size, tokenizer),
        "tokenizer": tokenizer,
        # SD 1.5's own scheduler settings, so per-request schedulers behave alike.
        "scheduler": sd15_scheduler(),
    }


def build_unet(size: SDFamilySize):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(size.seed)
    return UNet2DConditionModel(**unet_arguments(size))


def unet_arguments(size: SDFamilySize) -> dict[str, Any]:
    """The UNet's levels and widths at `size` (the SDXL builder adds its conditioning)."""
    attends = size.unet_cross_attention
    return {
        "sample_size": size.unet_sample_size,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "block_out_channels": size.unet_widths,
        "layers_per_block": size.unet_layers,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        "up_block_types": tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)
        ),
        "cross_attention_dim": size.cross_attention_width,
        "attention_head_dim": size.attention_head_dim,
        "norm_num_groups": size.unet_norm_groups,
    }


def build_vae(size: SDFamilySize):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(size.seed + 1)
    levels = len(size.vae_widths)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=size.vae_widths,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=size.vae_layers,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=size.vae_norm_groups,
        sample_size=size.vae_sample_size,
        scaling_factor=size.vae_scaling_factor,
    )


def build_text_encoder(size: SDFamilySize, tokenizer):
    """A CLIP text tower (SD 1.5's is ViT-L/14's: 12 layers, width 768)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(size.seed + 2)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=size.text_vocab_size or len(tokenizer),
            hidden_size=size.cross_attention_width,
            intermediate_size=size.text_intermediate,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.text_heads,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            hidden_act="quick_gelu",
            projection_dim=size.cross_attention_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_controlnet(unet, size: SDFamilySize, index: int):
    """A ControlNet shaped after `unet`, with seeded non-zero output convolutions.

    `index` (the control type's place in the family's list) gives each its own seed.
    """
    import torch
    from diffusers import ControlNetModel

    seed = size.seed + 100 + index
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=size.controlnet_embedding_widths
    )
    randomise_output_convs(controlnet, seed, size.controlnet_output_scale)
    return controlnet


def randomise_output_convs(controlnet, seed: int, scale: float) -> None:
    """Draw a ControlNet's zero-initialised convolutions (its outputs and the end of its
    image embedding) at `scale`: zeros would make a fresh ControlNet change nothing."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convs.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * scale)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * scale)


def sd15_scheduler():
    """The scheduler Stable Diffusion 1.5 ships with (PNDM, its noise schedule)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def _pipeline(components: dict[str, Any]):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def _learn_clip_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn BPE merges the way CLIP's vocab is laid out: bytes, bytes+</w>, merges, specials."""
    byte_encoder = _bytes_to_unicode()
    words = Counter(re.findall(r"[a-z]+", corpus.lower()))
    sequences = {
        word: [byte_encoder[b] for b in word.encode()][:-1]
        + [byte_encoder[word.encode()[-1]] + "</w>"]
        for word in words
    }
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, symbols in sequences.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        # Ties break on the pair's text so the vocabulary is identical on every machine.
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in sequences.items():
            sequences[word] = _merge_pair(symbols, best)
    base = list(byte_encoder.values())
    tokens = base + [symbol + "</w>" for symbol in base] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged
