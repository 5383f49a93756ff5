"""The engine's front door for the UI and the API: plain values in, plain values out.

The page and the HTTP API pass the same fields (named like the page's inputs); this
module turns them into a validated `GenerationRequest`, runs it, and returns PNG files
that carry their recipe. It knows no Gradio, so it is tested directly.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import CancelToken, Engine
from .errors import InvalidRequestError
from .recipe import png_bytes_with_recipe
from .requests import ControlUnit, GenerationRequest, ProgressCallback

NO_CONTROL = "none"
RANDOM_SEED = -1


@dataclass(frozen=True)
class UnitFields:
    """One control unit as the page and the API send it."""

    control_type: str = NO_CONTROL
    control_image: Any = None
    conditioning_scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    resolution: int = 512
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.control_type) and self.control_type != NO_CONTROL

    def to_unit(self, position: int) -> ControlUnit:
        from .controls import get_control_spec
        from .images import load_image

        spec = get_control_spec(self.control_type)
        if self.control_image is None:
            raise InvalidRequestError(
                _field("control_image", position),
                None,
                f"control {self.control_type!r} needs an image; upload one or set the"
                f" control to {NO_CONTROL!r}",
            )
        return ControlUnit(
            control_type=spec.name,
            image=load_image(self.control_image),
            conditioning_scale=self.conditioning_scale,
            guidance_start=self.guidance_start,
            guidance_end=self.guidance_end,
            resolution=self.resolution,
            params=spec.validate_params(self.params),
        )


@dataclass(frozen=True)
class GenerationOutcome:
    image_paths: tuple[str, ...]
    map_paths: tuple[str, ...]
    seeds: tuple[int, ...]
    recipe: dict[str, Any]
    warnings: tuple[str, ...]
    seconds: float


class StencilService:
    def __init__(self, engine: Engine, output_dir: Path | None = None):
        self.engine = engine
        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="stencil-out-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)

    # Each public method mirrors one named API endpoint.

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        seed: int = RANDOM_SEED,
        steps: int = 20,
        guidance_scale: float = 7.0,
        width: int = 0,
        height: int = 0,
        scheduler: str = "Euler a",
        num_images: int = 1,
        units: tuple[UnitFields, ...] = (),
        loras: str = "",
        session_id: str | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationOutcome:
        request = self.build_request(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            scheduler=scheduler,
            num_images=num_images,
            units=units,
            loras=loras,
            session_id=session_id,
        )
        result = self.engine.generate(request, progress=progress, cancel=cancel)
        image_paths = []
        for image, image_seed in zip(result.images, result.seeds):
            recipe = dict(result.recipe, seed=image_seed, num_images=1)
            image_paths.append(self._write_png(image, recipe, prefix=f"stencil-{image_seed}"))
        map_paths = [self._write_png(m, None, prefix="map") for m in result.control_maps]
        return GenerationOutcome(
            image_paths=tuple(image_paths),
            map_paths=tuple(map_paths),
            seeds=result.seeds,
            recipe=result.recipe,
            warnings=result.warnings,
            seconds=result.seconds,
        )

    def build_request(
        self,
        *,
        prompt: str,
        negative_prompt: str,
        seed: int,
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        scheduler: str,
        num_images: int,
        units: tuple[UnitFields, ...],
        loras: str,
        session_id: str | None,
    ) -> GenerationRequest:
        seed = _whole("seed", seed)
        lora_choices = ()
        if self.engine.loras is not None:
            lora_choices = self.engine.loras.parse_lora_string(loras or "", session_id=session_id)
        elif loras and loras.strip():
            raise InvalidRequestError("loras", loras, "this server has no LoRA library")
        return GenerationRequest(
            prompt=prompt if prompt is not None else "",
            negative_prompt=negative_prompt or "",
            seed=None if seed == RANDOM_SEED else seed,
            steps=_whole("steps", steps),
            guidance_scale=guidance_scale,
            width=_whole("width", width) or None,
            height=_whole("height", height) or None,
            scheduler=scheduler,
            num_images=_whole("num_images", num_images),
            controls=tuple(
                unit.to_unit(position) for position, unit in enumerate(units, 1) if unit.active
            ),
            loras=lora_choices,
            session_id=session_id,
        )

    def preview_control(self, unit: UnitFields) -> str:
        """Run only the preprocessor; return the map as a PNG path."""
        if not unit.active:
            raise InvalidRequestError("control_type", unit.control_type, "pick a control type")
        control_map = self.engine.control_map(unit.to_unit(1))
        return self._write_png(control_map, None, prefix=f"map-{unit.control_type}")

    def list_loras(self, session_id: str | None = None) -> list[dict[str, Any]]:
        if self.engine.loras is None:
            return []
        return [entry.to_public_dict() for entry in self.engine.loras.entries(session_id)]

    def add_lora_upload(self, path: str | Path, session_id: str) -> dict[str, Any]:
        """Validate an uploaded LoRA file and register it for this session only."""
        if self.engine.loras is None:
            raise InvalidRequestError("lora_file", str(path), "this server has no LoRA library")
        data = _read_capped(Path(path), self.engine.loras.max_upload_bytes)
        entry = self.engine.loras.add_upload(data, Path(path).name, session_id)
        return entry.to_public_dict()

    def status(self) -> dict[str, Any]:
        """What the page's status line shows: model, offline mode, preprocessor weights."""
        from .controls import CONTROLS, preprocessor_weights

        status = self.engine.status
        return {
            "family": status.family,
            "label": status.label,
            "base": status.base,
            "device": status.device,
            "dtype": status.dtype,
            "offline": status.offline,
            "notice": status.notice,
            "preprocessor_weights": {
                name: preprocessor_weights(name, device=status.device) for name in CONTROLS
            },
        }

    @staticmethod
    def read_recipe(path: str | Path) -> dict[str, Any]:
        from .images import load_image
        from .recipe import read_recipe

        recipe = read_recipe(load_image(Path(path)))
        if recipe is None:
            raise InvalidRequestError(
                "recipe_image", Path(path).name, "this PNG carries no Stencil recipe"
            )
        return recipe

    @staticmethod
    def python_snippet(recipe: dict[str, Any]) -> str:
        from .recipe import python_snippet

        return python_snippet(recipe)

    @staticmethod
    def estimate_gpu_seconds(
        *, steps: int, width: int, height: int, num_images: int, controls: int
    ) -> int:
        """A generous bound for a Space's GPU slot: SD 1.5 at 512x512 runs ~20 steps/s on
        an A100-class GPU; each ControlNet adds about half a UNet pass."""
        pixels = max(width or 512, 64) * max(height or 512, 64) / (512 * 512)
        work = steps * max(num_images, 1) * pixels * (1 + 0.5 * controls)
        return int(min(300, max(20, 15 + work * 0.1)))

    def _write_png(self, image, recipe: dict | None, *, prefix: str) -> str:
        if recipe is not None:
            data = png_bytes_with_recipe(image, recipe)
        else:
            import io

            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
        # Content-addressed names: no user text ever becomes part of a path.
        path = self.output_dir / f"{prefix}-{hashlib.sha256(data).hexdigest()[:16]}.png"
        path.write_bytes(data)
        return str(path)


def _read_capped(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise InvalidRequestError(
            "lora_file", path.name, f"is {size / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB"
        )
    return path.read_bytes()


def _field(name: str, position: int) -> str:
    return name if position == 1 else f"{name}_{position}"


def _whole(name: str, value: Any) -> int:
    """Accept 20 or 20.0 (JSON clients send floats) but never silently round 20.5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, value, "must be a whole number")
    return value
