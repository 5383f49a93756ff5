"""Every field a request or a control unit carries, declared once.

A `Field` says what a field is called, how the page shows it (label, help, widget, group),
what it accepts (kind, bounds, choices), how it reaches the pipeline and how the recipe
records it. Everything else is derived from these tables: the page's components, the API's
signature, request validation, the recipe and its restore, the Python snippet and the
README's parameter table. Adding a field means adding one `Field` here (and, if the
pipeline needs more than a keyword argument, its one use in the engine). A new field's
default must be what Stencil did before it existed: recipes written before it are read
with that default.

Preprocessor parameters are `Field`s too (`ParamSpec` is the same class), declared next to
the preprocessor that reads them.

This module imports neither torch nor gradio.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from .errors import InvalidRequestError, UnknownNameError
from .settings import BUDGETS, LIMITS

Kind = Literal["int", "float", "bool", "choice", "text", "image"]
_KINDS = ("int", "float", "bool", "choice", "text", "image")
# The widget a kind gets on the page unless its field names another.
_DEFAULT_WIDGETS = {
    "int": "slider",
    "float": "slider",
    "bool": "checkbox",
    "choice": "dropdown",
    "text": "textbox",
    "image": "image",
}

RANDOM_SEED = -1  # the page's and the API's word for "pick a seed for me"
AUTO_SIZE = 0  # ... and for "follow the control image, or the model's default size"
SIZE_MULTIPLE = 8  # the VAE's scale factor: latents are 1/8 of the image on each side


@dataclass(frozen=True)
class Field:
    """One declared field.

    Values come in two forms. The *page value* is what a component shows and the API
    takes (seed -1, width 0). The *request value* is what `GenerationRequest` holds: the
    page value validated, with `unset` turned into None ("Stencil chooses").
    """

    name: str
    label: str
    kind: Kind
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    help: str = ""
    # Where the page shows it: "prompt", "advanced", "unit", "unit-settings" (or a
    # preprocessor's parameter group, "params").
    group: str = "params"
    widget: str | None = None
    lines: int = 1
    # The page value that means "not set" (seed -1, width 0); None in the request.
    unset: Any = None
    multiple_of: int | None = None
    max_length: int | None = None
    # An unknown choice is "unknown <noun>" (with the known ones listed), as for names.
    choice_noun: str | None = None
    # The request attribute, when it differs from the page name (control_resolution).
    attr: str | None = None
    # The recipe's key for it; None: the recipe does not record it.
    recipe: str | None = "same"
    # The diffusers pipeline's keyword for it, and how the value is written there.
    pipeline_arg: str | None = None
    to_pipeline: Callable[[Any], Any] | None = None
    # The name A1111's "parameters" text gives it, for viewers of other tools.
    a1111: str | None = None
    # Lines the Python snippet needs before the call when the value is not the default.
    snippet_setup: tuple[str, ...] = ()
    # A fact of the loaded model that lowers `maximum` (e.g. the text encoder's depth).
    model_limit: str | None = None
    # A fact of the loaded model that sets `default`, within the bounds and on the step
    # (e.g. maps made at the family's own size: its ControlNets learnt from such maps).
    model_default: str | None = None
    # False: the page and API send it, the service turns it into something else (the LoRA
    # text becomes parsed choices), so the request has no attribute of that name.
    stored: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Field {self.name}: unknown kind {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"Field {self.name}: a choice needs choices")
        if self.recipe == "same":
            object.__setattr__(self, "recipe", self.name)
        if self.kind != "image":
            self.parse(self.default)  # a field whose own default is refused is a bug

    # ---- names

    @property
    def attribute(self) -> str:
        return self.attr or self.name

    @property
    def page_widget(self) -> str:
        return self.widget or _DEFAULT_WIDGETS[self.kind]

    # ---- values

    def parse(self, value: Any) -> Any:
        """A page value -> the request value (None for `unset`), or InvalidRequestError."""
        if self.unset is not None and (value is None or _same(value, self.unset)):
            return None
        return self.validate(value)

    def validate(self, value: Any) -> Any:
        """The value in its canonical type, or an error naming the field and what it takes."""
        if value is None and self.unset is not None:
            return None
        if self.kind == "bool":
            if isinstance(value, (bool, np.bool_)):  # a checkbox's value, or a numpy flag
                return bool(value)
            raise self.error(value)
        if self.kind == "choice":
            if isinstance(value, (str, int, float, bool)) and value in self.choices:
                return value
            if self.choice_noun:
                raise UnknownNameError(self.choice_noun, value, list(self.choices))
            raise self.error(value)
        if self.kind == "text":
            return self._text(value)
        if self.kind == "image":
            return value
        return self._number(value)

    def to_page(self, value: Any) -> Any:
        """A request or recipe value -> what the page's component shows."""
        return self.unset if value is None and self.unset is not None else value

    def pipeline_value(self, value: Any) -> Any:
        return self.to_pipeline(value) if self.to_pipeline else value

    def narrowed(self, facts: Mapping[str, Any]) -> Field:
        """This field with its bound lowered to what the loaded model can take, and its
        default the model's own where it has one."""
        field = self
        if self.model_limit is not None and self.model_limit in facts:
            field = replace(field, maximum=min(field.maximum, facts[self.model_limit]))
        if self.model_default is not None and self.model_default in facts:
            wanted = min(max(facts[self.model_default], field.minimum), field.maximum)
            on_step = field.minimum + (wanted - field.minimum) // field.step * field.step
            field = replace(field, default=type(field.default)(on_step))
        return field

    def page_values(self) -> tuple[Any, ...]:
        """Every value the page's slider can produce (for tests: each must be accepted)."""
        if self.page_widget != "slider":
            return ()
        count = round((self.maximum - self.minimum) / self.step)
        values = [self.minimum + index * self.step for index in range(count + 1)]
        return tuple(round(v) if self.kind == "int" else round(v, 6) for v in values)

    # ---- words

    def describe(self) -> str:
        """What is allowed, in words (error messages, the API docs, the README table)."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "text":
            return f"text of at most {self.max_length} characters"
        if self.kind == "image":
            return "an image file"
        noun = "an integer" if self.kind == "int" else "a number"
        if self.minimum is not None and self.maximum is not None:
            words = f"{noun} from {_fmt(self.minimum)} to {_fmt(self.maximum)}"
        elif self.minimum is not None:
            words = f"{noun} of at least {_fmt(self.minimum)}"
        elif self.maximum is not None:
            words = f"{noun} of at most {_fmt(self.maximum)}"
        else:
            words = noun
        if self.multiple_of:
            words += f", a multiple of {self.multiple_of}"
        if self.unset is not None:
            words += f" ({self.unset!r}: {self.unset_meaning()})"
        return words

    def unset_meaning(self) -> str:
        return "random" if self.name == "seed" else "automatic"

    def error(self, value: Any, allowed: str | None = None) -> InvalidRequestError:
        return InvalidRequestError(self.name, value, allowed or self.describe())

    # ---- checks by kind

    def _text(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(value, "must be text")
        if self.max_length is not None and len(value) > self.max_length:
            raise self.error(
                value, f"is {len(value)} characters long; the limit is {self.max_length}"
            )
        if "\x00" in value:
            raise self.error(value, "must not contain NUL characters")
        return value

    def _number(self, value: Any) -> int | float:
        # bool is an int in Python; True for a threshold is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.error(value)
        if not math.isfinite(value):
            raise self.error(value)  # NaN and infinities are outside every range
        if self.kind == "int":
            # JSON clients and sliders send 20.0 for 20: accept whole floats, refuse 20.5.
            if not (isinstance(value, numbers.Integral) or float(value).is_integer()):
                raise self.error(value)
            value = int(value)
        else:
            value = float(value)
        if self.minimum is not None and value < self.minimum:
            raise self.error(value)
        if self.maximum is not None and value > self.maximum:
            raise self.error(value)
        if self.multiple_of and value % self.multiple_of:
            lower = value - value % self.multiple_of
            raise self.error(
                value,
                f"must be a multiple of {self.multiple_of} (try "
                f"{max(lower, int(self.minimum or 0))} or {lower + self.multiple_of})",
            )
        return value


def _same(value: Any, unset: Any) -> bool:
    if isinstance(value, bool) or isinstance(unset, bool):
        return value is unset
    return value == unset


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _diffusers_clip_skip(a1111_value: int) -> int | None:
    # A1111 counts the last layer as 1 ("no skip"); diffusers counts layers skipped.
    return None if a1111_value <= 1 else a1111_value - 1


def _image_side(name: str) -> Field:
    """Width or height: 0 (follow the control image), or a multiple of the VAE's factor."""
    return Field(
        name,
        f"{name.capitalize()} (0 = auto)",
        "int",
        AUTO_SIZE,
        minimum=AUTO_SIZE,
        maximum=LIMITS.max_side,
        step=SIZE_MULTIPLE,
        multiple_of=SIZE_MULTIPLE,
        unset=AUTO_SIZE,
        group="advanced",
        help="0 follows the control image's aspect at the model's size.",
    )


def _scheduler_names() -> tuple[str, ...]:
    from .schedulers import SCHEDULERS

    return tuple(SCHEDULERS)


# --------------------------------------------------------------------------------------
# The request's fields, in the order the page and the API list them.

REQUEST_FIELDS: tuple[Field, ...] = (
    Field(
        "prompt",
        "Prompt",
        "text",
        "",
        max_length=LIMITS.max_prompt_chars,
        lines=2,
        group="prompt",
        help="What to draw. <lora:name:0.8> tags pick LoRAs too.",
    ),
    Field(
        "negative_prompt",
        "Negative prompt",
        "text",
        "",
        max_length=LIMITS.max_prompt_chars,
        group="prompt",
        help="What to steer away from.",
        pipeline_arg="negative_prompt",
        to_pipeline=lambda text: text or None,
    ),
    Field(
        "steps",
        "Steps",
        "int",
        20,
        minimum=1,
        maximum=LIMITS.max_steps,
        step=1,
        group="advanced",
        help="Denoising steps: more is slower and usually cleaner.",
        pipeline_arg="num_inference_steps",
        a1111="Steps",
    ),
    Field(
        "scheduler",
        "Scheduler",
        "choice",
        "Euler a",
        choices=_scheduler_names(),
        choice_noun="scheduler",
        a1111="Sampler",
        group="advanced",
        help="The sampler that walks from noise to the image.",
    ),
    Field(
        "guidance_scale",
        "Guidance scale",
        "float",
        7.0,
        minimum=0.0,
        maximum=LIMITS.max_guidance,
        step=0.5,
        group="advanced",
        help="How strongly the prompt steers the image (CFG).",
        pipeline_arg="guidance_scale",
        a1111="CFG scale",
    ),
    Field(
        "clip_skip",
        "CLIP skip",
        "int",
        1,
        minimum=1,
        maximum=12,
        step=1,
        group="advanced",
        help="Read the prompt from an earlier text-encoder layer (A1111's setting: 1 = the"
        " last layer, 2 = the one before, as many anime models expect).",
        pipeline_arg="clip_skip",
        to_pipeline=_diffusers_clip_skip,
        snippet_setup=(
            "# diffusers' clip_skip reads text_encoder.text_model, which transformers 5 folded",
            "# into the model itself: point the old name at it (as Stencil does).",
            "if not hasattr(pipe.text_encoder, 'text_model'):",
            "    object.__setattr__(pipe.text_encoder, 'text_model', pipe.text_encoder)",
        ),
        model_limit="text_encoder_layers",
        a1111="Clip skip",
    ),
    _image_side("width"),
    _image_side("height"),
    Field(
        "seed",
        "Seed (-1 = random)",
        "int",
        RANDOM_SEED,
        minimum=0,
        maximum=LIMITS.max_seed,
        step=1,
        unset=RANDOM_SEED,
        widget="number",
        a1111="Seed",
        group="advanced",
        help="The same seed and settings give the same image.",
    ),
    Field(
        "num_images",
        "Images",
        "int",
        1,
        minimum=1,
        maximum=LIMITS.max_images,
        step=1,
        group="advanced",
        help="Images made in one go, with seeds seed, seed+1, ...",
    ),
    Field(
        "loras",
        "LoRAs as text (name:weight, ...); <lora:name:0.8> tags in the prompt work too",
        "text",
        "",
        max_length=LIMITS.max_prompt_chars,
        group="loras",
        stored=False,
        recipe=None,  # the recipe records the applied set, with file hashes
        help="Names from the library or your uploads, each with a weight.",
    ),
)

# --------------------------------------------------------------------------------------
# A control unit's own fields (its preprocessor's parameters come from the control
# registry). The second unit's page names end in "_2".

NO_CONTROL = "none"

# The highest detection resolution at which a square image's map fits the map budget
# (STENCIL_MAX_MAP_PIXELS: 1024 by default), in the slider's steps of 64, at most 2048.
# An elongated image can still exceed the budget below this; the preprocessor then refuses
# and names the highest resolution that fits it.
MAX_DETECTION_RESOLUTION = min(2048, math.isqrt(BUDGETS.max_map_pixels) // 64 * 64)

DETECTION_RESOLUTION = Field(
    "control_resolution",
    "Detection resolution (short side)",
    "int",
    512,
    minimum=64,
    maximum=MAX_DETECTION_RESOLUTION,
    step=64,
    group="unit-settings",
    attr="resolution",
    recipe="resolution",
    help=f"The preprocessor works at this short side (a map holds at most"
    f" {BUDGETS.max_map_pixels / 1e6:.1f} megapixels); the map is then fitted to the image.",
    # On the page and in the API: the family's own size (64 tiny, 512 SD 1.5, 1024 SDXL).
    # A canny map made at 512 and shrunk to the tiny family's 64 px loses its thin edges.
    model_default="native_size",
)


def _control_names() -> tuple[str, ...]:
    from .controls import CONTROLS

    return (NO_CONTROL, *CONTROLS)


def unit_fields() -> tuple[Field, ...]:
    """The control unit's fields (built on first use: the choices come from the registry)."""
    global _UNIT_FIELDS
    if _UNIT_FIELDS is None:
        _UNIT_FIELDS = _declare_unit_fields()
    return _UNIT_FIELDS


_UNIT_FIELDS: tuple[Field, ...] | None = None


def _declare_unit_fields() -> tuple[Field, ...]:
    return (
        Field(
            "control_type",
            "Control type",
            "choice",
            NO_CONTROL,
            choices=_control_names(),
            choice_noun="control type",
            group="unit",
            unset=NO_CONTROL,
            help="Which map steers the image; 'none' switches the unit off.",
        ),
        Field(
            "control_image",
            "Control image",
            "image",
            None,
            group="unit",
            recipe=None,  # images are not stored; the recipe says where to put your own
            attr="image",
            help="A photo to make the map from, or the map itself.",
        ),
        Field(
            "conditioning_scale",
            "Conditioning scale",
            "float",
            1.0,
            minimum=0.0,
            maximum=2.0,
            step=0.05,
            group="unit-settings",
            help="How strongly this map steers the image.",
            pipeline_arg="controlnet_conditioning_scale",
        ),
        Field(
            "guidance_start",
            "Guidance start",
            "float",
            0.0,
            minimum=0.0,
            maximum=1.0,
            step=0.05,
            group="unit-settings",
            help="The fraction of the steps after which the map starts steering.",
            pipeline_arg="control_guidance_start",
        ),
        Field(
            "guidance_end",
            "Guidance end",
            "float",
            1.0,
            minimum=0.0,
            maximum=1.0,
            step=0.05,
            group="unit-settings",
            help="The fraction of the steps after which the map stops steering.",
            pipeline_arg="control_guidance_end",
        ),
        DETECTION_RESOLUTION,
    )


LORA_WEIGHT = Field(
    "lora_weight",
    "Weight",
    "float",
    1.0,
    minimum=-4.0,
    maximum=4.0,
    step=0.05,
    help="Negative weights push away from the LoRA's style.",
)


def by_name(fields: tuple[Field, ...]) -> dict[str, Field]:
    return {spec.name: spec for spec in fields}
