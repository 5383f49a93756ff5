"""Every limit and start-up setting, read from the environment once (one source of truth).

The page's sliders, the API's checks and the engine read the same numbers from here, in the
spirit of hysts' `settings.py`. A malformed or out-of-range value is an operator's mistake
that must stop start-up with a message naming the variable, never silently clamped and
never a traceback: `SettingsError` carries that message and `app.py` prints it and exits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import SettingsError

__all__ = [
    "BUDGETS",
    "LIMITS",
    "Budgets",
    "Limits",
    "SettingsError",
    "WholeSetting",
    "load_budgets",
    "load_limits",
]


@dataclass(frozen=True)
class WholeSetting:
    """A whole-number setting: its environment variable, default and allowed range."""

    variable: str
    default: int
    lowest: int
    highest: int

    def read(self, environ: Mapping[str, str]) -> int:
        raw = environ.get(self.variable, "").strip()
        return self.default if not raw else self.parse(raw, self.variable)

    def parse(self, raw: str, where: str) -> int:
        """`raw` as a number in range, or SettingsError naming `where` (variable or option)."""
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{where}={raw!r} is not a whole number") from None
        if not self.lowest <= value <= self.highest:
            raise SettingsError(
                f"{where}={value} is out of range: it must be from {self.lowest} to {self.highest}"
            )
        return value


# One row per limit. `highest` is a hard ceiling, so a typo cannot make one request hold
# the GPU for an hour; past it Stencil refuses to start rather than clamp.
MAX_STEPS = WholeSetting("STENCIL_MAX_STEPS", 100, 1, 500)
MAX_SIDE = WholeSetting("STENCIL_MAX_SIDE", 1536, 64, 4096)
MAX_IMAGES = WholeSetting("STENCIL_MAX_IMAGES", 4, 1, 16)
MAX_PROMPT_CHARS = WholeSetting("STENCIL_MAX_PROMPT_CHARS", 2000, 100, 20000)
MAX_IMAGE_PIXELS = WholeSetting("STENCIL_MAX_IMAGE_PIXELS", 40_000_000, 1, 400_000_000)
MAX_UPLOAD_BYTES = WholeSetting("STENCIL_MAX_UPLOAD_BYTES", 20 * 2**20, 1, 2**31)
QUEUE_SIZE = WholeSetting("STENCIL_QUEUE_SIZE", 32, 1, 10_000)
# The scheduler's rules (pipelines/scheduler.py). A small per-session cap keeps one person
# from filling the queue; batches of one are the CPU default, chosen by
# bench/results/many_users.md (on a CPU a padded batch costs more than it gains).
QUEUE_PER_SESSION = WholeSetting("STENCIL_QUEUE_PER_SESSION", 4, 1, 1000)
BATCH_SIZE = WholeSetting("STENCIL_BATCH_SIZE", 1, 1, 16)
MAX_OVERTAKES = WholeSetting("STENCIL_MAX_OVERTAKES", 2, 0, 100)
PORT = WholeSetting("GRADIO_SERVER_PORT", 7860, 1, 65535)
# Steps between two images of a run in progress; 0: none; -1: by device (every few steps on
# a GPU, none on the CPU, where each costs about a VAE decode: bench/results/live_preview.md).
LIVE_PREVIEW_EVERY = WholeSetting("STENCIL_LIVE_PREVIEW_EVERY", -1, -1, 500)
# 0: hotswap off (adapters loaded by name); otherwise the rank every slot is padded to.
# Engines of a Ray Serve deployment that `--backend ray` starts (one GPU each).
REPLICAS = WholeSetting("STENCIL_REPLICAS", 1, 1, 1024)
LORA_HOTSWAP_RANK = WholeSetting("STENCIL_LORA_HOTSWAP_RANK", 0, 0, 1024)
# A yes/no setting (`env_flag`), off unless the operator turns it on: users may add LoRAs
# from the Hub by id (`--allow-hub-loras`). Each is a download this server makes on a
# stranger's request, so a public Space must choose it.
ALLOW_HUB_LORAS = "STENCIL_ALLOW_HUB_LORAS"


@dataclass(frozen=True)
class Limits:
    max_steps: int
    max_side: int
    min_side: int
    max_images: int
    max_guidance: float
    max_prompt_chars: int
    max_seed: int
    max_image_pixels: int
    max_upload_bytes: int


def load_limits(environ: Mapping[str, str] | None = None) -> Limits:
    environ = os.environ if environ is None else environ
    return Limits(
        max_steps=MAX_STEPS.read(environ),
        max_side=MAX_SIDE.read(environ),
        # Any multiple of the VAE's factor (8) is a size the models can make, so the page's
        # size sliders (0 = auto, then steps of 8) offer nothing the server refuses.
        min_side=8,
        max_images=MAX_IMAGES.read(environ),
        max_guidance=30.0,
        max_prompt_chars=MAX_PROMPT_CHARS.read(environ),
        max_seed=2**32 - 1,
        max_image_pixels=MAX_IMAGE_PIXELS.read(environ),
        max_upload_bytes=MAX_UPLOAD_BYTES.read(environ),
    )


# Read once, at first import: a bad value raises SettingsError from here, which app.py
# catches before anything else is built.
LIMITS = load_limits()


# ---- budgets: what Stencil and Gradio may keep on disk and in memory, and for how long.
# The defaults suit a public Space (tens of GB of disk, one model queue); README section
# "Running a public Space safely" explains each one.
MiB = 2**20
OUTPUT_MAX_MB = WholeSetting("STENCIL_OUTPUT_MAX_MB", 512, 1, 1_000_000)
OUTPUT_MAX_AGE_S = WholeSetting("STENCIL_OUTPUT_MAX_AGE_S", 3600, 10, 30 * 86400)
# Gradio's cache (uploads and its copies of results): swept every SWEEP seconds of files
# older than MAX_AGE, and no new upload is taken while it holds more than MAX_MB.
GRADIO_CACHE_MAX_AGE_S = WholeSetting("STENCIL_GRADIO_CACHE_MAX_AGE_S", 3600, 10, 30 * 86400)
GRADIO_CACHE_SWEEP_S = WholeSetting("STENCIL_GRADIO_CACHE_SWEEP_S", 300, 1, 86400)
GRADIO_CACHE_MAX_MB = WholeSetting("STENCIL_GRADIO_CACHE_MAX_MB", 4096, 16, 1_000_000)
# One LoRA file (160: an SD 1.5 LoRA of rank 128 with text-encoder layers, half precision,
# is 151 MB), and all the sessions' uploaded LoRAs together. Gradio has one upload cap for
# every component, so the first is also the cap on any upload (app.py).
MAX_LORA_UPLOAD_MB = WholeSetting("STENCIL_MAX_LORA_UPLOAD_MB", 160, 1, 2048)
LORA_UPLOADS_MAX_MB = WholeSetting("STENCIL_LORA_UPLOADS_MAX_MB", 2048, 1, 1_000_000)
MAP_CACHE_MB = WholeSetting("STENCIL_MAP_CACHE_MB", 128, 0, 65536)
# 1024x1024, or a 4:1 image at the default 512. Pose detection's peak memory grows with
# the map, about 0.8 GB a megapixel (bench/results/soak.md), so this is its bound too.
MAX_MAP_PIXELS = WholeSetting("STENCIL_MAX_MAP_PIXELS", 1024 * 1024, 512 * 512, 16 * 2**20)


@dataclass(frozen=True)
class Budgets:
    output_max_bytes: int
    output_max_age_s: int
    # A result is never pruned younger than this (or than its max age, if shorter), so
    # the request that wrote it can hand it to Gradio, whatever the byte budget says.
    output_min_age_s: int
    gradio_cache_max_age_s: int
    gradio_cache_sweep_s: int
    gradio_cache_max_bytes: int
    max_lora_upload_bytes: int
    lora_uploads_max_bytes: int
    map_cache_bytes: int
    max_map_pixels: int

    @property
    def gradio_delete_cache(self) -> tuple[int, int]:
        """`gr.Blocks(delete_cache=...)`: (how often to sweep, the age that expires)."""
        return self.gradio_cache_sweep_s, self.gradio_cache_max_age_s


def load_budgets(environ: Mapping[str, str] | None = None) -> Budgets:
    environ = os.environ if environ is None else environ
    output_max_age_s = OUTPUT_MAX_AGE_S.read(environ)
    return Budgets(
        output_max_bytes=OUTPUT_MAX_MB.read(environ) * MiB,
        output_max_age_s=output_max_age_s,
        output_min_age_s=min(60, output_max_age_s),
        gradio_cache_max_age_s=GRADIO_CACHE_MAX_AGE_S.read(environ),
        gradio_cache_sweep_s=GRADIO_CACHE_SWEEP_S.read(environ),
        gradio_cache_max_bytes=GRADIO_CACHE_MAX_MB.read(environ) * MiB,
        max_lora_upload_bytes=MAX_LORA_UPLOAD_MB.read(environ) * MiB,
        lora_uploads_max_bytes=LORA_UPLOADS_MAX_MB.read(environ) * MiB,
        map_cache_bytes=MAP_CACHE_MB.read(environ) * MiB,
        max_map_pixels=MAX_MAP_PIXELS.read(environ),
    )


BUDGETS = load_budgets()


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """A yes/no variable: 1/true/yes/on or 0/false/no/off (empty is no); anything else stops."""
    raw = (os.environ if environ is None else environ).get(name, "").strip().lower()
    if raw in {"", "0", "false", "no", "off"}:
        return False
    if raw in {"1", "true", "yes", "on"}:
        return True
    raise SettingsError(f"{name}={raw!r} is not a yes/no value (use 1 or 0)")


def env_text(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    return raw or default


def env_choice(
    name: str, choices: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> str | None:
    """An optional variable that must be one of `choices` when set."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return None
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r} is not one of: {', '.join(choices)}")
    return raw


def cache_dir() -> Path:
    """Where Stencil writes what it builds (the tiny family, stand-in weights)."""
    override = os.environ.get("STENCIL_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stencil"
