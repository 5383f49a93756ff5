"""The built-in tiny model family: a Stable Diffusion 1.5-shaped model small enough for CI.

It is one size of the SD-family builder (`pipelines.sd_builder`): every component is built
from a config with seeded random weights, written to a cache folder with `save_pretrained`
(safetensors), and then loaded by the engine with the same `from_pretrained` call that loads
real weights from the Hub. Nothing here is a mock: the tokenizer is a real byte-level BPE
learned on a small in-code corpus, and the ControlNets have non-zero output convolutions so
that they really change the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic_folder import build_verified
from .sd_builder import SDFamilySize, build_components, write_sd_family

# Bump when anything below changes what is written: old folders are then rebuilt, never reused.
TINY_FAMILY_VERSION = "v1"
TINY_SEED = 20261122
CONTROL_TYPES_WITH_TINY_CONTROLNET = ("canny", "pose", "depth")

# Cross-attention width shared by the text encoder and the UNet; LoRA shapes follow from it.
TEXT_WIDTH = 32

TINY_SIZE = SDFamilySize(
    seed=TINY_SEED,
    unet_widths=(32, 64),
    unet_cross_attention=(False, True),
    unet_layers=2,
    unet_sample_size=8,
    attention_head_dim=8,
    cross_attention_width=TEXT_WIDTH,
    text_layers=2,
    text_heads=4,
    text_intermediate=64,
    # Four levels, so the VAE downsamples by 8 exactly like Stable Diffusion's.
    vae_widths=(16, 16, 32, 32),
    vae_layers=1,
    vae_norm_groups=8,
    vae_sample_size=64,
    controlnet_embedding_widths=(16, 32, 32, 32),
    controlnet_output_scale=0.05,
)


def tiny_family_dir(cache_root: Path) -> Path:
    return Path(cache_root) / f"tiny-sd-{TINY_FAMILY_VERSION}"


def ensure_tiny_family(cache_root: Path) -> Path:
    """Return the tiny family's folder, building it first if it is not there yet.

    Built aside and renamed into place, so a crash or a concurrent builder never leaves a
    half-written model that later loads; checked against its manifest of file digests on
    every call, so a damaged copy (a file deleted, truncated or zeroed) is rebuilt.
    """
    return build_verified(tiny_family_dir(cache_root), write_tiny_family)


def write_tiny_family(folder: Path) -> None:
    """Build every component with seeded weights and save it as a diffusers pipeline folder."""
    write_sd_family(folder, TINY_SIZE, CONTROL_TYPES_WITH_TINY_CONTROLNET)


def build_tiny_components() -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and scheduler, seeded, in float32 on the CPU."""
    return build_components(TINY_SIZE)
