"""What a caller asks for and what it gets back: frozen, validated, free of torch.

Validation happens when a request is built, so a bad field fails before it waits in the
queue, and the error names the field, the value and what is allowed. Nothing is clamped or
rounded on the caller's behalf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError
from .schedulers import DEFAULT_SCHEDULER, get_scheduler_spec
from .settings import LIMITS

SIZE_MULTIPLE = 8


def _check_int(name: str, value: Any, lowest: int, highest: int, *, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, value, f"must be a whole number from {lowest} to {highest}")
    if not lowest <= value <= highest:
        raise InvalidRequestError(name, value, f"must be from {lowest} to {highest}{hint}")


def _check_float(name: str, value: Any, lowest: float, highest: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(name, value, f"must be a number from {lowest} to {highest}")
    if not math.isfinite(value) or not lowest <= value <= highest:
        raise InvalidRequestError(
            name, value, f"must be a finite number from {lowest} to {highest}"
        )


def _check_text(name: str, value: Any, limit: int) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError(name, value, "must be text")
    if len(value) > limit:
        raise InvalidRequestError(
            name, value, f"is {len(value)} characters long; the limit is {limit}"
        )
    if "\x00" in value:
        raise InvalidRequestError(name, value, "must not contain NUL characters")


def check_side(name: str, value: Any) -> None:
    """Width or height: a multiple of 8 (the VAE's scale factor) within the size limits."""
    _check_int(name, value, LIMITS.min_side, LIMITS.max_side)
    if value % SIZE_MULTIPLE:
        lower = value - value % SIZE_MULTIPLE
        raise InvalidRequestError(
            name,
            value,
            f"must be a multiple of {SIZE_MULTIPLE} (try {max(lower, LIMITS.min_side)}"
            f" or {lower + SIZE_MULTIPLE})",
        )


@dataclass(frozen=True)
class LoraChoice:
    """One adapter of a request's set: a catalogue name and the weight it is applied with."""

    name: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidRequestError("lora name", self.name, "must be a non-empty name")
        _check_float(f"weight of LoRA {self.name!r}", self.weight, -4.0, 4.0)


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit: which control, its source image and its settings.

    `image` is the uploaded picture (any PIL image; it is normalised by the engine).
    `params` are the preprocessor's own parameters, checked against its declared bounds.
    """

    control_type: str
    image: Any
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    resolution: int = 512
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.control_type, str) or not self.control_type:
            raise InvalidRequestError("control_type", self.control_type, "must be a control name")
        if self.image is None:
            raise InvalidRequestError(
                "control_image", None, f"an image is needed for control {self.control_type!r}"
            )
        _check_float("conditioning_scale", self.conditioning_scale, 0.0, 2.0)
        _check_float("guidance_start", self.guidance_start, 0.0, 1.0)
        _check_float("guidance_end", self.guidance_end, 0.0, 1.0)
        if self.guidance_start >= self.guidance_end:
            raise InvalidRequestError(
                "guidance_start",
                self.guidance_start,
                f"must be below guidance_end ({self.guidance_end})",
            )
        _check_int("resolution", self.resolution, 64, 2048)
        if isinstance(self.params, dict):  # accept a dict, keep the object hashable
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    steps: int = 20
    guidance_scale: float = 7.0
    width: int | None = None
    height: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    num_images: int = 1
    controls: tuple[ControlUnit, ...] = ()
    loras: tuple[LoraChoice, ...] = ()
    # Whose uploaded LoRAs are visible to this request; not part of the recipe.
    session_id: str | None = None

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt, LIMITS.max_prompt_chars)
        _check_text("negative_prompt", self.negative_prompt, LIMITS.max_prompt_chars)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, LIMITS.max_seed, hint=" (leave it empty for random)")
        _check_int("steps", self.steps, 1, LIMITS.max_steps)
        _check_float("guidance_scale", self.guidance_scale, 0.0, LIMITS.max_guidance)
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                check_side(name, getattr(self, name))
        get_scheduler_spec(self.scheduler)
        _check_int("num_images", self.num_images, 1, LIMITS.max_images)
        object.__setattr__(self, "controls", tuple(self.controls))
        object.__setattr__(self, "loras", tuple(self.loras))
        for unit in self.controls:
            if not isinstance(unit, ControlUnit):
                raise InvalidRequestError("controls", unit, "must be ControlUnit objects")
        names = [choice.name for choice in self.loras]
        if len(set(names)) != len(names):
            raise InvalidRequestError("loras", names, "each LoRA may appear once")


ProgressCallback = Callable[[int, int, str], None]
"""progress(done, total, stage): called after each unit of work, e.g. one denoising step."""


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[Any, ...]
    seeds: tuple[int, ...]
    control_maps: tuple[Any, ...] = ()
    recipe: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def seed(self) -> int:
        return self.seeds[0]
