"""Limits shared by the UI sliders and the server-side checks (one source of truth).

Each limit can be tightened or widened by an environment variable, clamped to a hard
ceiling so a typo cannot make one request hold the GPU for an hour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _env_int(name: str, default: int, lowest: int, highest: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from exc
    return max(lowest, min(highest, value))


@dataclass(frozen=True)
class Limits:
    max_steps: int
    max_side: int
    min_side: int
    max_images: int
    max_guidance: float
    max_prompt_chars: int
    max_seed: int


def load_limits() -> Limits:
    return Limits(
        max_steps=_env_int("STENCIL_MAX_STEPS", 100, 1, 500),
        max_side=_env_int("STENCIL_MAX_SIDE", 1536, 64, 4096),
        min_side=64,
        max_images=_env_int("STENCIL_MAX_IMAGES", 4, 1, 16),
        max_guidance=30.0,
        max_prompt_chars=_env_int("STENCIL_MAX_PROMPT_CHARS", 2000, 100, 20000),
        max_seed=2**32 - 1,
    )


LIMITS = load_limits()


def cache_dir() -> Path:
    """Where Stencil writes what it builds (the tiny family, stand-in weights)."""
    override = os.environ.get("STENCIL_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stencil"
