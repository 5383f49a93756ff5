"""The built-in tiny SDXL family: every SDXL code path, offline, at a size CI can run.

Its architecture is `pipelines.sdxl_builder`'s at `TINY_XL_SIZE`; its weights are trained on
the tiny family's shapes by `tiny_training/train_xl.py` and kept in `models/stencil-tiny-xl/`,
copied to the cache and loaded back with the same `from_pretrained` call as SDXL's real
weights. It has the SDXL parts that matter for code: two text towers and tokenizers, the size
conditioning, an SDXL VAE scale, per-control SDXL ControlNets and one ControlNet Union model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .sdxl_builder import SDXLFamilySize
from .tiny import TINY_SIZE, TrainedWeights

# The trained weights, as `python -m tiny_training.train_xl` writes them.
TRAINED_TINY_XL_DIR = Path(__file__).resolve().parents[1] / "models" / "stencil-tiny-xl"
# The prefix also matches the folders of the untrained builds before it ("tiny-xl-v1"),
# which are removed as superseded.
TINY_XL_WEIGHTS = TrainedWeights(TRAINED_TINY_XL_DIR, "tiny-xl-", "tiny_training.train_xl")

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
    return TINY_XL_WEIGHTS.cache_dir(cache_root)


def ensure_tiny_xl_family(cache_root: Path) -> Path:
    """The tiny SDXL family's verified cache folder (`TrainedWeights.ensure`)."""
    return TINY_XL_WEIGHTS.ensure(cache_root)
