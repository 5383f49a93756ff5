"""The one shape every preprocessor has: image in, RGB control map out.

Each preprocessor declares its parameters (`ParamSpec`, which is `pipelines.fields.Field`)
next to its code; the UI builds its controls from them and every call validates against
them. Nothing is clamped silently.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from PIL import Image

from ..errors import InvalidRequestError
from ..fields import DETECTION_RESOLUTION
from ..fields import Field as ParamSpec
from ..images import resize_short_side, to_rgb
from ..settings import BUDGETS

ParamKind = Literal["int", "float", "bool", "choice"]
Weights = Literal["none", "real", "stand-in"]

# The long side of a map may reach this, whatever the resolution (a 16:1 image at 512).
MAX_MAP_SIDE = 8192
# And it may hold this many pixels (STENCIL_MAX_MAP_PIXELS): what one detection may cost.
# A pose map's detection peaks at about 0.8 GB a megapixel (bench/results/soak.md).
MAX_MAP_PIXELS = BUDGETS.max_map_pixels


def map_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The map's size for a `width`x`height` image detected at short side `resolution`."""
    short, long = min(width, height), max(width, height)
    new_long = max(1, round(long * resolution / max(short, 1)))
    return (resolution, new_long) if width <= height else (new_long, resolution)


def check_map_budget(
    width: int, height: int, resolution: int, *, field: str = "control_resolution"
) -> None:
    """Refuse a detection resolution whose map would exceed the pixel budget.

    Refused rather than scaled down: the resolution changes what a detector finds (edges,
    keypoints), and the recipe records the resolution asked for, so a silently smaller map
    would make the recipe reproduce a different image.
    """
    map_width, map_height = map_size(width, height, resolution)
    if map_width * map_height <= MAX_MAP_PIXELS:
        return
    fits = largest_resolution_within_budget(width, height)
    advice = f"use at most {fits}" if fits >= RESOLUTION.minimum else "crop it"
    raise InvalidRequestError(
        field,
        resolution,
        f"this {width}x{height} image would make a {map_width}x{map_height} map"
        f" ({map_width * map_height / 1e6:.1f} megapixels), over the budget of"
        f" {MAX_MAP_PIXELS / 1e6:.1f} megapixels (STENCIL_MAX_MAP_PIXELS); {advice}",
    )


def largest_resolution_within_budget(width: int, height: int, step: int = 64) -> int:
    """The highest detection resolution, in steps of `step`, whose map fits the budget."""
    short, long = min(width, height), max(width, height)
    resolution = math.isqrt(MAX_MAP_PIXELS * short // max(long, 1)) // step * step
    while resolution > 0 and math.prod(map_size(width, height, resolution)) > MAX_MAP_PIXELS:
        resolution -= step  # rounding of the long side can tip it over
    return resolution


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


# The detection resolution is a control-unit field; preprocessors check the same bounds.
RESOLUTION = DETECTION_RESOLUTION


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
        check_map_budget(*image.size, resolution)
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
