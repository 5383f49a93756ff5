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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TrainedWeights:
    """A family trained by `tiny_training/`, kept in this repository, and its cache copy.

    The cache folder of each trained version is `cache_prefix` plus its manifest's digest,
    so weights trained again land in a new folder and an old copy is never reused; one
    version is kept: the others are removed when the current one is made sure of.
    """

    folder: Path  # in the repository, as the trainer writes it
    cache_prefix: str
    trainer: str  # the module that writes `folder`

    def cache_dir(self, cache_root: Path) -> Path:
        try:
            digest = hashlib.sha256((self.folder / MANIFEST_NAME).read_bytes()).hexdigest()[:12]
        except OSError:
            raise ModelLoadError(self._damaged("its manifest is missing")) from None
        return Path(cache_root) / f"{self.cache_prefix}{digest}"

    def ensure(self, cache_root: Path) -> Path:
        """The family's cache folder, copying the trained weights there first if needed.

        Copied aside and renamed into place, so a crash or a concurrent copy never leaves a
        half-written model that later loads; checked against its manifest of file digests on
        every call, so a damaged copy (a file deleted, truncated or zeroed) is copied again.
        """
        folder = build_verified(self.cache_dir(cache_root), self.write_copy)
        prune_superseded(folder, self.cache_prefix)
        return folder

    def write_copy(self, folder: Path) -> None:
        """Copy the trained family, file by file, after checking the repository's is whole."""
        problem = manifest_problem(self.folder)
        if problem is not None:
            raise ModelLoadError(self._damaged(problem))
        shutil.copytree(
            self.folder, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST_NAME)
        )

    def _damaged(self, problem: str) -> str:
        return (
            f"the trained weights in models/{self.folder.name} are damaged: {problem}. "
            f"Restore them from the repository, or run `python -m {self.trainer}`."
        )


TINY_WEIGHTS = TrainedWeights(TRAINED_TINY_DIR, "tiny-sd-", "tiny_training.train")


def tiny_family_dir(cache_root: Path) -> Path:
    return TINY_WEIGHTS.cache_dir(cache_root)


def ensure_tiny_family(cache_root: Path) -> Path:
    """The tiny family's verified cache folder (`TrainedWeights.ensure`)."""
    return TINY_WEIGHTS.ensure(cache_root)


def build_tiny_components() -> dict[str, Any]:
    """UNet, VAE, text encoder, tokenizer and scheduler of the trained family, float32, CPU."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TRAINED_TINY_DIR, safety_checker=None)
    return {
        name: getattr(pipe, name)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    }
