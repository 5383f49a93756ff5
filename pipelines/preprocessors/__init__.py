"""Control-map preprocessors, registered by name; each is built once and cached.

Adding one: write a `Preprocessor` subclass (with its `params`) in its own module and add
it to `PREPROCESSORS`. The control registry and the UI read names, labels and parameters
from here without building anything.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from ..errors import UnknownNameError
from ..hub import hub_offline, hub_reachable
from .base import (
    MAX_MAP_SIDE,
    NO_WEIGHTS,
    RESOLUTION,
    ParamSpec,
    Preprocessor,
    WeightsSource,
    validate_params,
)
from .canny import CannyPreprocessor
from .depth import DepthPreprocessor
from .identity import IdentityPreprocessor
from .pose import PosePreprocessor
from .weights import WEIGHTED_KINDS, resolve_weights

PREPROCESSORS: Mapping[str, type[Preprocessor]] = MappingProxyType(
    {
        "canny": CannyPreprocessor,
        "pose": PosePreprocessor,
        "depth": DepthPreprocessor,
        "identity": IdentityPreprocessor,
    }
)

_built: dict[tuple, Preprocessor] = {}
# One lock per name: resolving pose weights (maybe a download) must not hold up canny.
_build_locks = {name: threading.Lock() for name in PREPROCESSORS}


def get_preprocessor(
    name: str,
    *,
    weights_source: WeightsSource | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> Preprocessor:
    """The preprocessor `name`, built on first request and shared afterwards.

    For pose and depth, `weights_source=None` resolves weights once: real ones if they are
    available (see `resolve_weights`), else stand-ins built under `cache_dir` (default:
    `settings.cache_dir() / "standins"`). Ask `.weights` which it got.
    """
    if name not in PREPROCESSORS:
        raise UnknownNameError("preprocessor", name, tuple(PREPROCESSORS))
    cls = PREPROCESSORS[name]
    key = (name, weights_source, cache_dir, device) if cls.needs_weights else (name,)
    with _build_locks[name]:  # resolving may build stand-ins: once, not once per thread
        if key not in _built:
            _built[key] = _build(cls, weights_source, cache_dir, device)
        return _built[key]


def _build(
    cls: type[Preprocessor],
    weights_source: WeightsSource | None,
    cache_dir: Path | None,
    device: str,
) -> Preprocessor:
    if not cls.needs_weights:
        return cls()
    if weights_source is None:
        if cache_dir is None:
            from ..settings import cache_dir as stencil_cache_dir

            cache_dir = stencil_cache_dir() / "standins"
        weights_source = resolve_weights(cls.name, offline=hub_offline(), cache_dir=cache_dir)
    return cls(weights_source, device=device)


def clear_preprocessor_cache() -> None:
    """Forget every built preprocessor (tests; switching weights at runtime)."""
    _built.clear()


__all__ = [
    "MAX_MAP_SIDE",
    "NO_WEIGHTS",
    "PREPROCESSORS",
    "RESOLUTION",
    "WEIGHTED_KINDS",
    "ParamSpec",
    "Preprocessor",
    "WeightsSource",
    "clear_preprocessor_cache",
    "get_preprocessor",
    "hub_offline",
    "hub_reachable",
    "resolve_weights",
    "validate_params",
]
