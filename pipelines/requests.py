"""What a caller asks for and what it gets back: frozen, validated, free of torch.

Validation happens when a request is built, so a bad field fails before it waits in the
queue, and the error names the field, the value and what is allowed. Nothing is clamped or
rounded on the caller's behalf.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError
from .fields import LORA_WEIGHT, NO_CONTROL, REQUEST_FIELDS, Field, unit_fields


def declared(fields: Callable[[], tuple[Field, ...]]):
    """Give a frozen dataclass one attribute per declared field, before its own ones.

    The attributes take the fields' defaults (as request values), and `check_declared`
    validates them, so a field declared in `pipelines.fields` needs no edit here.
    """

    def add_fields(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        annotations: dict[str, Any] = {}
        for spec in fields():
            if not spec.stored:
                continue
            annotations[spec.attribute] = Any
            setattr(cls, spec.attribute, _request_default(spec))
        annotations.update(own)
        cls.__annotations__ = annotations
        cls.declared_fields = staticmethod(fields)
        return cls

    return add_fields


def _request_default(spec: Field) -> Any:
    return None if spec.kind == "image" else spec.parse(spec.default)


def check_declared(request: Any) -> None:
    """Validate every declared field in place: canonical types, page values accepted."""
    for spec in request.declared_fields():
        if spec.kind == "image" or not spec.stored:
            continue
        value = spec.parse(getattr(request, spec.attribute))
        object.__setattr__(request, spec.attribute, value)


@dataclass(frozen=True)
class LoraChoice:
    """One adapter of a request's set: a catalogue name and the weight it is applied with."""

    name: str
    weight: float = LORA_WEIGHT.default

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidRequestError("lora name", self.name, "must be a non-empty name")
        try:
            weight = LORA_WEIGHT.validate(self.weight)
        except InvalidRequestError as exc:
            raise InvalidRequestError(
                f"weight of LoRA {self.name!r}", self.weight, exc.allowed
            ) from None
        object.__setattr__(self, "weight", weight)


@dataclass(frozen=True)
@declared(unit_fields)
class ControlUnit:
    """One ControlNet unit: which control, its source image and its settings.

    Its fields (control_type, image, conditioning_scale, guidance_start, guidance_end,
    resolution) are declared in `pipelines.fields`. `image` is the uploaded picture (any
    PIL image; the engine normalises it). `params` are the preprocessor's own parameters,
    checked against its declared bounds.
    """

    params: tuple[tuple[str, Any], ...] = ()
    # The unit's number where its caller shows it (the page's "Control 2" when Control 1 is
    # off), for messages and captions; None: its place in the request. Not in the recipe.
    shown_as: int | None = field(default=None, compare=False)

    def number(self, position: int) -> int:
        """The unit's number as the user knows it, given its place in the request."""
        return self.shown_as or position

    def __post_init__(self) -> None:
        check_declared(self)
        if self.control_type is None:
            raise InvalidRequestError("control_type", NO_CONTROL, "must be a control name")
        if self.image is None:
            raise InvalidRequestError(
                "control_image", None, f"an image is needed for control {self.control_type!r}"
            )
        if self.guidance_start >= self.guidance_end:
            raise InvalidRequestError(
                "guidance_start",
                self.guidance_start,
                f"must be below guidance_end ({self.guidance_end})",
            )
        if isinstance(self.params, dict):  # accept a dict, keep the object hashable
            object.__setattr__(self, "params", tuple(sorted(self.params.items())))

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
@declared(lambda: REQUEST_FIELDS)
class GenerationRequest:
    """What one generation asks for. Its settings (prompt, seed, steps, ...) are the
    fields declared in `pipelines.fields.REQUEST_FIELDS`; `seed`, `width` and `height`
    are None when Stencil should choose. The LoRA set arrives parsed, as `loras`."""

    controls: tuple[ControlUnit, ...] = ()
    loras: tuple[LoraChoice, ...] = ()
    # Whose uploaded LoRAs are visible to this request; not part of the recipe.
    session_id: str | None = None

    def __post_init__(self) -> None:
        check_declared(self)
        if isinstance(self.loras, str):  # the text form is parsed by the LoRA catalogue
            raise InvalidRequestError("loras", self.loras, "pass LoraChoice objects")
        object.__setattr__(self, "loras", tuple(self.loras))
        if self.prompt is None:
            raise InvalidRequestError("prompt", None, "must be text")
        object.__setattr__(self, "controls", tuple(self.controls))
        for unit in self.controls:
            if not isinstance(unit, ControlUnit):
                raise InvalidRequestError("controls", unit, "must be ControlUnit objects")
        names = [choice.name for choice in self.loras]
        if len(set(names)) != len(names):
            raise InvalidRequestError("loras", names, "each LoRA may appear once")


def random_seed() -> int:
    """A seed for a request that names none (chosen before the run, so the recipe and a
    retry elsewhere use it too)."""
    return int.from_bytes(os.urandom(4), "little")


ProgressCallback = Callable[[int, int, str], None]
"""progress(done, total, stage): called after each unit of work, e.g. one denoising step."""

PreviewCallback = Callable[[list, int, int], None]
"""preview(images, step, steps): a run's images as they are (PIL, one per sample)."""


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[Any, ...]
    seeds: tuple[int, ...]
    control_maps: tuple[Any, ...] = ()
    recipe: Any = None  # pipelines.recipe.Recipe
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def seed(self) -> int:
        return self.seeds[0]
