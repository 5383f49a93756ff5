"""The built-in tiny model family: a Stable Diffusion 1.5-shaped model small enough for CI,
trained on pictures made in code, so offline images are pictures rather than test patterns.

Its architecture is one size of the SD-family builder (`pipelines.sd_builder`, `TINY_SIZE`).
`tiny_training/` trains it from the builder's seeded weights on coloured shapes and stick
figures (UNet, text encoder, VAE, and canny, depth and pose ControlNets) and writes the
result to `models/stencil-tiny/` in this repository as safetensors. The engine loads a
verified copy of that folder from its cache with the same `from_pretrained` call that loads
real weights from the Hub. Nothing here is a mock: the tokenizer is a real byte-level BPE.
"""

from __future__ import annotations

import hashlib
import shutil
from functools import partial
from pathlib import Path
from typing import Any

from .atomic_folder import MANIFEST_NAME, build_verified, manifest_problem, prune_superseded
from .errors import ModelLoadError
from .sd_builder import (
    BPE_CORPUS,
    SDFamilySize,
    build_offline_tokenizer,
)

# The trained weights, as `python -m tiny_training.train` writes them.
TRAINED_TINY_DIR = Path(__file__).resolve().parents[1] / "models" / "stencil-tiny"
TINY_SEED = 20261122
CONTROL_TYPES_WITH_TINY_CONTROLNET = ("canny", "pose", "depth")

# What the trained tiny model draws: one shape or stick figure, in one colour, on a plain
# background ("a red circle on a blue background"). tiny_training/ renders the pictures.
TINY_COLOURS = ("red", "green", "blue", "yellow", "white", "black")
TINY_SHAPES = ("circle", "square", "triangle", "figure")
_CAPTION_WORDS = " ".join([*TINY_COLOURS, *TINY_SHAPES, "a", "on", "background"])

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
    # The shared offline corpus with the caption words weighted in, so each is one token.
    tokenizer=partial(build_offline_tokenizer, BPE_CORPUS + f" {_CAPTION_WORDS}" * 30, 140),
)


# The cache folder of each trained version is this plus its manifest's digest; one
# version is kept: the others are removed when the current one is made sure of.
TINY_FOLDER_PREFIX = "tiny-sd-"


def tiny_family_dir(cache_root: Path) -> Path:
    """The cache folder for the trained weights: named by their manifest's digest, so weights
    trained again land in a new folder and an old copy is never reused."""
    manifest = TRAINED_TINY_DIR / MANIFEST_NAME
    try:
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
    except OSError:
        raise ModelLoadError(_missing_weights("its manifest is missing")) from None
    return Path(cache_root) / f"{TINY_FOLDER_PREFIX}{digest}"


def ensure_tiny_family(cache_root: Path) -> Path:
    """Return the tiny family's folder, copying the trained weights there first if needed.

    Copied aside and renamed into place, so a crash or a concurrent copy never leaves a
    half-written model that later loads; checked against its manifest of file digests on
    every call, so a damaged copy (a file deleted, truncated or zeroed) is copied again.
    """
    folder = build_verified(tiny_family_dir(cache_root), write_tiny_family)
    prune_superseded(folder, TINY_FOLDER_PREFIX)
    return folder


def write_tiny_family(folder: Path) -> None:
    """Copy the trained family, file by file, after checking the repository's copy is whole."""
    problem = manifest_problem(TRAINED_TINY_DIR)
    if problem is not None:
        raise ModelLoadError(_missing_weights(problem))
    shutil.copytree(
        TRAINED_TINY_DIR, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST_NAME)
    )


def _missing_weights(problem: str) -> str:
    return (
        f"the tiny family's trained weights (models/stencil-tiny) are damaged: {problem}. "
        "Restore them from the repository, or run `python -m tiny_training.train`."
    )


def build_tiny_components() -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and scheduler of the trained family, float32, CPU."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TRAINED_TINY_DIR, safety_checker=None)
    return {
        name: getattr(pipe, name)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    }
