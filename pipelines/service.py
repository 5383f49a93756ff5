"""The engine's front door for the UI and the API: plain values in, plain values out.

The page and the HTTP API send the same flat fields (`pipelines.form`); this module parses
them into a validated `GenerationRequest`, runs it, and returns PNG files that carry their
recipe. It knows no Gradio, so it is tested directly. It reaches the model through a
`pipelines.backends.Backend`: the engine in this process, or a Ray Serve deployment.
Every parse happens inside its methods, so any bad value surfaces as a `StencilError` at
the one edge the UI has.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .controls import empty_map_note
from .errors import ImageError, InvalidRequestError, StencilError, megabytes
from .form import FormField, ParsedUnit, form_fields, parse_form, suffix, values_from_recipe
from .recipe import Recipe, RecipeError, png_bytes, png_bytes_with_recipe
from .settings import BUDGETS, Budgets, cache_dir
from .storage import BoundedFolder

if TYPE_CHECKING:  # the engine brings torch; the service's importers need not
    from .backends import Backend
    from .engine import CancelToken
    from .requests import GenerationRequest, PreviewCallback, ProgressCallback


log = logging.getLogger(__name__)

# A LoRA's catalogue picture is a thumbnail: past these it is not decoded at all.
LORA_PREVIEW_MAX_BYTES = 4 * 2**20
LORA_PREVIEW_MAX_PIXELS = 2048 * 2048
LORA_THUMBNAIL_SIDE = 256


@dataclass(frozen=True)
class GenerationOutcome:
    image_paths: tuple[str, ...]
    map_paths: tuple[str, ...]
    seeds: tuple[int, ...]
    recipe: Recipe
    warnings: tuple[str, ...]
    seconds: float
    # Shown under each result and map: the seed and size it was made with, which unit.
    image_captions: tuple[str, ...] = ()
    map_captions: tuple[str, ...] = ()


@dataclass(frozen=True)
class MapPreview:
    path: str
    note: str | None = None  # said to the user when the map is empty


class StencilService:
    def __init__(
        self, backend: Backend, output_dir: Path | None = None, *, budgets: Budgets = BUDGETS
    ):
        # The engine in this process, or a Ray Serve deployment of them (`backends`).
        self.backend = backend
        # One folder, reused by every start, pruned by age and size (STENCIL_OUTPUT_*):
        # the page and the API serve Gradio's copy of a result, so this is its staging.
        self.outputs = BoundedFolder(
            Path(output_dir) if output_dir else cache_dir() / "outputs",
            max_bytes=budgets.output_max_bytes,
            max_age_s=budgets.output_max_age_s,
            min_age_s=budgets.output_min_age_s,
        )
        self.output_dir = self.outputs.path
        # The page's components and the API's parameters, bounded by this model.
        self.fields: tuple[FormField, ...] = form_fields(backend.model_facts)

    # Each public method mirrors one named API endpoint.

    def generate(
        self,
        fields: Mapping[str, Any],
        *,
        session_id: str | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview: PreviewCallback | None = None,
    ) -> GenerationOutcome:
        """`preview(images, step, steps)`: the run's images as they are, every few steps,
        where the engine makes previews (`live_preview_every`)."""
        request = self.build_request(fields, session_id=session_id)
        result = self.backend.generate(request, progress=progress, cancel=cancel, preview=preview)
        image_paths = [
            self._write_png(image, result.recipe.for_image(seed), prefix=f"stencil-{seed}")
            for image, seed in zip(result.images, result.seeds)
        ]
        map_paths = [self._write_png(m, None, prefix="map") for m in result.control_maps]
        return GenerationOutcome(
            image_paths=tuple(image_paths),
            map_paths=tuple(map_paths),
            seeds=result.seeds,
            recipe=result.recipe,
            warnings=result.warnings,
            seconds=result.seconds,
            image_captions=tuple(
                f"seed {seed} · {image.width}×{image.height}"
                for image, seed in zip(result.images, result.seeds)
            ),
            map_captions=tuple(
                f"Control {unit.number(position)}: {unit.control_type}"
                f" · {image.width}×{image.height}"
                for position, (unit, image) in enumerate(
                    zip(request.controls, result.control_maps), start=1
                )
            ),
        )

    def build_request(
        self, fields: Mapping[str, Any], *, session_id: str | None = None
    ) -> GenerationRequest:
        from .requests import GenerationRequest

        parsed = parse_form(self.fields, fields)
        return GenerationRequest(
            **parsed.request,
            controls=tuple(self._control_unit(unit) for unit in parsed.units),
            loras=self._lora_choices(parsed.texts.get("loras", ""), session_id),
            session_id=session_id,
        )

    def preview_control(self, fields: Mapping[str, Any], *, position: int = 1) -> MapPreview:
        """Run only the first unit's preprocessor (the page's unit `position` maps its
        fields onto the first's names): the map as a PNG path, and a note when it is empty."""
        parsed = parse_form(tuple(f for f in self.fields if f.unit == 1), fields)
        if not parsed.units:
            value = fields.get("control_type")
            raise InvalidRequestError("control_type", value, "pick a control type")
        unit = replace(self._control_unit(parsed.units[0]), shown_as=position)
        control_map = self.backend.control_map(unit)
        path = self._write_png(control_map, None, prefix=f"map-{unit.control_type}")
        return MapPreview(path, empty_map_note(unit, control_map, position))

    def list_loras(self, session_id: str | None = None) -> list[dict[str, Any]]:
        if self.backend.loras is None:
            return []
        return [entry.to_public_dict() for entry in self.backend.loras.entries(session_id)]

    def lora_preview(self, name: str | None):
        """The picker's thumbnail of a LoRA: its catalogue picture (a PIL image, at most
        `LORA_THUMBNAIL_SIDE` px), or None for a LoRA without one (uploads have none, and
        a name not in this model's catalogue has none). A picture that cannot be read is
        logged, not shown: it is decoration, not a setting, and must never stand in the
        way of the LoRA itself."""
        from .images import load_image

        library = self.backend.loras
        if library is None or not name:
            return None
        try:
            path = library.preview_path(name)
        except StencilError:  # an upload, another base's entry, an unknown name
            return None
        if path is None:
            return None
        try:
            image = load_image(
                path, max_bytes=LORA_PREVIEW_MAX_BYTES, max_pixels=LORA_PREVIEW_MAX_PIXELS
            ).convert("RGB")
        except (StencilError, OSError) as exc:
            log.warning("the preview of LoRA %r could not be read: %s", name, exc)
            return None
        image.thumbnail((LORA_THUMBNAIL_SIDE, LORA_THUMBNAIL_SIDE))
        return image

    def add_lora_upload(self, path: str | Path, session_id: str) -> dict[str, Any]:
        """Validate an uploaded LoRA file and register it for this session only."""
        if self.backend.loras is None:
            raise InvalidRequestError(
                "lora_file", Path(path).name, "this server has no LoRA library"
            )
        data = _read_capped(Path(path), self.backend.loras.max_upload_bytes)
        entry = self.backend.loras.add_upload(data, Path(path).name, session_id)
        return entry.to_public_dict()

    @property
    def hub_loras_allowed(self) -> bool:
        """Whether the operator lets users add LoRAs from the Hub by id (`--allow-hub-loras`)."""
        return self.backend.loras is not None and self.backend.loras.allow_hub_loras

    def add_hub_lora(self, hub_repo: Any, hub_file: Any, session_id: str) -> dict[str, Any]:
        """Fetch one LoRA from a public Hub repository (`owner/name`, and the file's path in
        it when it holds several) and register it for this session only, as an upload."""
        if self.backend.loras is None:
            raise InvalidRequestError("hub_repo", hub_repo, "this server has no LoRA library")
        return self.backend.loras.add_hub_lora(hub_repo, hub_file, session_id).to_public_dict()

    def forget_session(self, session_id: str) -> None:
        """A closed session's state goes: its uploaded LoRAs (and Hub LoRAs), and their
        files when no other session holds the same bytes."""
        if self.backend.loras is not None:
            self.backend.loras.forget_session(session_id)

    def status(self) -> dict[str, Any]:
        """What the page's status line shows. It only reports: nothing is built here."""
        status = self.backend.status
        return {
            "family": status.family,
            "label": status.label,
            "base": status.base,
            "device": status.device,
            "dtype": status.dtype,
            "offline": status.offline,
            "notice": status.notice,
            "preprocessor_weights": dict(status.preprocessor_weights),
            "live_preview": status.live_preview,
        }

    def read_recipe(self, path: str | Path) -> Recipe:
        from .images import load_image
        from .recipe import read_recipe

        name = Path(path).name
        try:
            recipe = read_recipe(load_image(Path(path)))
        except RecipeError as exc:
            raise InvalidRequestError("recipe_image", name, str(exc)) from None
        if recipe is None:
            raise InvalidRequestError("recipe_image", name, "this PNG carries no Stencil recipe")
        return recipe

    def restore(self, path: str | Path) -> dict[str, Any]:
        """The page values that reproduce a Stencil PNG, by field name (every recorded one)."""
        recipe = self.read_recipe(path)
        try:
            return values_from_recipe(self.fields, recipe)
        except RecipeError as exc:
            raise InvalidRequestError("recipe_image", Path(path).name, str(exc)) from None

    @staticmethod
    def python_snippet(recipe: Recipe, map_paths: Sequence[str] = ()) -> str:
        """The recipe as a script; its control maps named as the page's files of them."""
        from .recipe import python_snippet

        return python_snippet(recipe, [Path(path).name for path in map_paths])

    # ---- parsing helpers

    def _control_unit(self, parsed: ParsedUnit):
        from .controls import get_control_spec
        from .images import load_image
        from .preprocessors.base import check_map_budget
        from .requests import ControlUnit

        spec = get_control_spec(parsed.control_type)
        values = dict(parsed.values)
        image_field = "control_image" + suffix(parsed.position)
        if values.get("image") is None:
            raise InvalidRequestError(
                image_field,
                None,
                f"control {parsed.control_type!r} needs an image; upload one or set the"
                " control to 'none'",
            )
        try:
            values["image"] = load_image(values["image"])
        except ImageError as exc:
            # Name the unit: with two units, "the image" alone does not say which.
            raise ImageError(f"{image_field}: {exc}") from None
        # Checked here too, before any work, where the unit's own field name is known.
        resolution_field = "control_resolution" + suffix(parsed.position)
        check_map_budget(*values["image"].size, values["resolution"], field=resolution_field)
        return ControlUnit(
            **values, params=spec.validate_params(parsed.params), shown_as=parsed.position
        )

    def _lora_choices(self, text: str, session_id: str | None):
        if self.backend.loras is not None:
            return self.backend.loras.parse_lora_string(text or "", session_id=session_id)
        if text and text.strip():
            raise InvalidRequestError("loras", text, "this server has no LoRA library")
        return ()

    def _write_png(self, image, recipe: Recipe | None, *, prefix: str) -> str:
        data = png_bytes(image) if recipe is None else png_bytes_with_recipe(image, recipe)
        # Content-addressed names: no user text ever becomes part of a path.
        name = f"{prefix}-{hashlib.sha256(data).hexdigest()[:16]}.png"
        return str(self.outputs.write(name, data))


def _read_capped(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise InvalidRequestError(
            "lora_file", path.name, f"is {megabytes(size)}; the limit is {megabytes(limit)}"
        )
    return path.read_bytes()
