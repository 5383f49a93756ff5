"""The one shape every preprocessor has: image in, RGB control map out.

Each preprocessor declares its parameters (`ParamSpec`, which is `pipelines.fields.Field`)
next to its code; the UI builds its controls from them and every call validates against
them. Nothing is clamped silently.
"""

from __future__ import annotations

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

ParamKind = Literal["int", "float", "bool", "choice"]
Weights = Literal["none", "real", "stand-in"]

# The long side of a map may reach this, whatever the resolution (a 16:1 image at 512).
MAX_MAP_SIDE = 8192


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
