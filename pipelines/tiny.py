"""The built-in tiny model family: a Stable Diffusion 1.5-shaped model small enough for CI.

Every component is built from a config with seeded random weights, written to a cache
folder with `save_pretrained` (safetensors), and then loaded by the engine with the same
`from_pretrained` call that loads real weights from the Hub. Nothing here is a mock: the
tokenizer is a real byte-level BPE learned on a small in-code corpus, and the ControlNets
have non-zero output convolutions so that they really change the image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

# Bump when anything below changes what is written: old folders are then rebuilt, never reused.
TINY_FAMILY_VERSION = "v1"
TINY_SEED = 20261122
CONTROL_TYPES_WITH_TINY_CONTROLNET = ("canny", "pose", "depth")

# Cross-attention width shared by the text encoder and the UNet; LoRA shapes follow from it.
TEXT_WIDTH = 32

_BPE_CORPUS = """
a photo of a cat sitting on a red chair in the sun, portrait of a woman with long hair,
a dog running on the beach at sunset, oil painting of a mountain landscape with a lake,
a man standing in a city street at night, neon lights, highly detailed, sharp focus,
anime style character dancing, watercolor flowers in a blue vase, a fox in the snow,
cinematic lighting, studio photo, the best quality, masterpiece, a house in the forest
"""
_BPE_MERGES = 96


def tiny_family_dir(cache_root: Path) -> Path:
    return Path(cache_root) / f"tiny-sd-{TINY_FAMILY_VERSION}"


def ensure_tiny_family(cache_root: Path) -> Path:
    """Return the tiny family's folder, building it first if it is not there yet.

    The folder is written under a temporary name and renamed into place, so a crash or a
    concurrent builder never leaves a half-written model that later loads.
    """
    target = tiny_family_dir(cache_root)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        write_tiny_family(staging)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process won the race; its copy is byte-identical to ours.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_tiny_family(folder: Path) -> None:
    """Build every component with seeded weights and save it as a diffusers pipeline folder."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    components = build_tiny_components()
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for control_type in CONTROL_TYPES_WITH_TINY_CONTROLNET:
        controlnet = build_tiny_controlnet(components["unet"], control_type)
        controlnet.save_pretrained(folder / f"controlnet-{control_type}", safe_serialization=True)


def build_tiny_components() -> dict:
    """UNet, VAE, text encoder, tokenizer and scheduler, seeded, in float32 on the CPU."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(TINY_SEED + 1)
    # Four levels, so the VAE downsamples by 8 exactly like Stable Diffusion's.
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(TINY_SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=TEXT_WIDTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Stable Diffusion 1.5's own scheduler settings, so per-request schedulers behave alike.
    scheduler = sd15_scheduler()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


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


def build_tiny_controlnet(unet, control_type: str):
    """A ControlNet shaped after `unet`, with seeded non-zero output convolutions.

    `ControlNetModel.from_unet` zero-initialises every output convolution, which makes a
    fresh ControlNet a no-op; randomising them is what lets tests see its effect.
    """
    import torch
    from diffusers import ControlNetModel

    seed = TINY_SEED + 100 + CONTROL_TYPES_WITH_TINY_CONTROLNET.index(control_type)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32, 32, 32)
    )
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convs.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.05)
    return controlnet


def build_tiny_tokenizer():
    """A real CLIP byte-level BPE tokenizer, written as vocab.json + merges.txt and loaded back."""
    from transformers import CLIPTokenizer

    vocab, merges = _learn_clip_bpe(_BPE_CORPUS, _BPE_MERGES)
    with tempfile.TemporaryDirectory(prefix="stencil-tok-") as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        merges_file = Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text(
            "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
        )
        # Loaded back through from_pretrained, exactly as a Hub tokenizer folder is read.
        return CLIPTokenizer.from_pretrained(
            tmp,
            model_max_length=77,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        )


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
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            sequences[word] = merged
    base = list(byte_encoder.values())
    tokens = base + [symbol + "</w>" for symbol in base] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges
