"""The built-in tiny SDXL family: every SDXL code path, offline, at a size CI can run.

Random seeded weights (it draws patterns, not pictures: the trained tiny family,
`pipelines.tiny`, is the one that draws), built by `pipelines.sdxl_builder` into the cache
and loaded back with the same `from_pretrained` call as SDXL's real weights. It has the
SDXL parts that matter for code: two text towers and tokenizers, the size conditioning, an
SDXL VAE scale, per-control SDXL ControlNets and one ControlNet Union model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .atomic_folder import build_verified, prune_superseded
from .sdxl_builder import SDXLFamilySize, write_sdxl_family
from .tiny import CONTROL_TYPES_WITH_TINY_CONTROLNET, TINY_SIZE

# Bump when the builder or the sizes change: the cache folder is named by it, so an old
# build is never reused for a new one.
TINY_XL_VERSION = 1
TINY_XL_FOLDER_PREFIX = "tiny-xl-v"  # + the version; older versions' folders are removed

TINY_XL_SIZE = SDXLFamilySize(
    sd=replace(TINY_SIZE, seed=20261202, vae_scaling_factor=0.13025),
    # Wider than the first tower, as SDXL's (1280 vs 768): single-file loading tells the two
    # towers' weights apart by width.
    text_2_width=48,
    text_2_layers=2,
    size_embedding_width=8,
    transformer_layers=(1, 2),
)


def tiny_xl_family_dir(cache_root: Path) -> Path:
    return Path(cache_root) / f"{TINY_XL_FOLDER_PREFIX}{TINY_XL_VERSION}"


def ensure_tiny_xl_family(cache_root: Path) -> Path:
    """The family's folder, built first if missing or damaged (checked by its manifest)."""
    folder = build_verified(tiny_xl_family_dir(cache_root), write_tiny_xl_family)
    prune_superseded(folder, TINY_XL_FOLDER_PREFIX)
    return folder


def write_tiny_xl_family(folder: Path) -> None:
    write_sdxl_family(folder, TINY_XL_SIZE, CONTROL_TYPES_WITH_TINY_CONTROLNET)
