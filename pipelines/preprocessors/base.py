"""The one shape every preprocessor has: image in, RGB control map out.

Each preprocessor declares its parameters (`ParamSpec`) next to its code; the UI builds its
controls from them and every call validates against them. Nothing is clamped silently.
"""

from __future__ import annotations

import math
import numbers
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError
from ..images import resize_short_side, to_rgb

ParamKind = Literal["int", "float", "bool", "choice"]
Weights = Literal["none", "real", "stand-in"]

# The long side of a map may reach this, whatever the resolution (a 16:1 image at 512).
MAX_MAP_SIDE = 8192


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: what the UI shows and what a call may pass.

    `step` is a hint for UI sliders; it is not enforced.
    """

    name: str
    label: str
    kind: ParamKind
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float", "bool", "choice"):
            raise ValueError(f"ParamSpec {self.name}: unknown kind {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"ParamSpec {self.name}: a choice needs choices")
        self.validate(self.default)  # a spec whose own default is invalid is a bug

    def validate(self, value: Any) -> Any:
        """The value in its canonical type, or InvalidRequestError naming field and bounds."""
        if self.kind == "bool":
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise self._error(value)
        if self.kind == "choice":
            if value in self.choices:
                return value
            raise self._error(value)
        number = self._as_number(value)
        if self.minimum is not None and number < self.minimum:
            raise self._error(value)
        if self.maximum is not None and number > self.maximum:
            raise self._error(value)
        return number

    def describe(self) -> str:
        """What is allowed, in words (used in error messages)."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        noun = "an integer" if self.kind == "int" else "a number"
        if self.minimum is not None and self.maximum is not None:
            return f"{noun} from {_fmt(self.minimum)} to {_fmt(self.maximum)}"
        if self.minimum is not None:
            return f"{noun} of at least {_fmt(self.minimum)}"
        if self.maximum is not None:
            return f"{noun} of at most {_fmt(self.maximum)}"
        return noun

    def _as_number(self, value: Any) -> int | float:
        # bool is an int in Python; True for a threshold is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self._error(value)
        if not math.isfinite(value):
            raise self._error(value)
        if self.kind == "float":
            return float(value)
        # Sliders send 100.0 for an integer slider: accept whole floats, refuse 100.5.
        if isinstance(value, numbers.Integral) or float(value).is_integer():
            return int(value)
        raise self._error(value)

    def _error(self, value: Any) -> InvalidRequestError:
        return InvalidRequestError(self.name, value, self.describe())


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def validate_params(
    specs: tuple[ParamSpec, ...], given: Mapping[str, Any], *, owner: str
) -> dict[str, Any]:
    """A new dict with every declared parameter: given values validated, the rest defaulted."""
    known = {spec.name: spec for spec in specs}
    unknown = sorted(set(given) - set(known))
    if unknown:
        allowed = ", ".join(known) if known else "none"
        raise InvalidRequestError(
            unknown[0], given[unknown[0]], f"not a parameter of {owner}; it takes: {allowed}"
        )
    return {
        name: spec.validate(given[name]) if name in given else spec.default
        for name, spec in known.items()
    }


RESOLUTION = ParamSpec(
    name="resolution",
    label="Detection resolution (short side)",
    kind="int",
    default=512,
    minimum=64,
    maximum=4096,
    step=64,
)


@dataclass(frozen=True)
class WeightsSource:
    """Where a preprocessor's weights come from, and whether they are the real ones.

    `location` is a local folder or a Hub id; `note` says why this source was chosen, for
    the UI ("offline and not in the local Hugging Face cache: using a stand-in").
    """

    location: str | None
    weights: Weights
    note: str = ""


NO_WEIGHTS = WeightsSource(location=None, weights="none", note="needs no weights")


class Preprocessor(ABC):
    """Image in, RGB control map out, with a short side of `resolution` pixels.

    Subclasses declare `name`, `label`, `params` and implement `_detect`. Weighted ones set
    `needs_weights` and implement `_load`; the base loads once, lazily, under a lock.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    needs_weights: ClassVar[bool] = False

    def __init__(self, weights_source: WeightsSource | None = None, *, device: str = "cpu") -> None:
        self.device = device
        if self.needs_weights and (weights_source is None or weights_source.location is None):
            raise ValueError(f"preprocessor {self.name!r} needs a WeightsSource with a location")
        self.weights_source = weights_source if self.needs_weights else NO_WEIGHTS
        self._model: Any = None
        self._load_lock = threading.Lock()

    @property
    def weights(self) -> Weights:
        """'none' (needs no weights), 'real' or 'stand-in' (offline tiny weights)."""
        return self.weights_source.weights

    @property
    def uses_real_weights(self) -> bool:
        return self.weights == "real"

    def __call__(self, image: Image.Image, *, resolution: int, **params: Any) -> Image.Image:
        values = validate_params(self.params, params, owner=f"the {self.name} preprocessor")
        self._check(values)
        resolution = RESOLUTION.validate(resolution)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        rgb = image if image.mode == "RGB" else to_rgb(image)
        sized = resize_short_side(rgb, resolution, max_long_side=MAX_MAP_SIDE)
        control_map = self._detect(sized, values)
        if control_map.mode != "RGB":
            control_map = control_map.convert("RGB")
        return control_map

    def load(self) -> None:
        """Load the weights now (the first call does it otherwise). Safe from any thread."""
        self._loaded()

    def _loaded(self) -> Any:
        if self.needs_weights and self._model is None:
            with self._load_lock:
                if self._model is None:  # another thread may have loaded while we waited
                    self._model = self._load()
        return self._model

    def _load(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} declares weights but cannot load them")

    def _check(self, values: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Checks across parameters (each one alone is already valid). None by default."""

    @abstractmethod
    def _detect(self, image: Image.Image, params: dict[str, Any]) -> Image.Image:
        """The map for an RGB `image` already at the output size."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} weights={self.weights}>"
