"""The seam between the service and whatever runs the model.

`StencilService` (the page's and the API's front door) needs five things of a backend, and
nothing else: the model's facts (to bound the form), its status line, the LoRA library's
catalogue side (names, uploads, thumbnails), a control map, and a generation with progress,
preview and Stop. Two backends have them:

- `pipelines.engine.Engine`, in this process: the default, what `python app.py` runs.
- `pipelines.ray_backend.RayBackend`, a Ray Serve deployment of engines, one per GPU.

Both take the same validated `GenerationRequest` and give the same `GenerationResult`, so
the page, the API, the recipe and the output files cannot tell which one ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .engine import CancelToken, EngineStatus
    from .loras import LoraLibrary
    from .requests import (
        ControlUnit,
        GenerationRequest,
        GenerationResult,
        PreviewCallback,
        ProgressCallback,
    )

BACKENDS = ("local", "ray")


@runtime_checkable
class Backend(Protocol):
    @property
    def model_facts(self) -> Mapping[str, int]:
        """What bounds or defaults the form's model-dependent fields."""

    @property
    def status(self) -> EngineStatus: ...

    # The catalogue side of the LoRA library (None: this server has none). With Ray it
    # lives on the front, which checks uploads before any replica sees them.
    loras: LoraLibrary | None

    def control_map(self, unit: ControlUnit) -> Any:
        """The unit's control map (a PIL image)."""

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview: PreviewCallback | None = None,
    ) -> GenerationResult: ...
