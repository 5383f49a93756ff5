"""Model family registry: which base weights, which pipeline classes, which LoRAs fit.

Adding a family means adding one `ModelFamily` entry. A family may also be a local folder
holding a diffusers pipeline (`model_index.json`): its architecture is read from there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ModelLoadError, UnknownNameError

# The Hub questions live in .hub; tests still import cached_revision from here.
from .hub import cached_revision  # noqa: F401

# Diffusers classes per architecture; ControlNet pipelines are composed from the base one.
# "safety_checker" names the component Stencil switches off where the pipeline has one
# (the engine and the recipe's snippet both read it).
ARCHITECTURES: dict[str, dict[str, str]] = {
    "sd": {
        "text2img": "StableDiffusionPipeline",
        "controlnet": "StableDiffusionControlNetPipeline",
        "controlnet_model": "ControlNetModel",
        "safety_checker": "StableDiffusionSafetyChecker",
    },
    "sdxl": {
        "text2img": "StableDiffusionXLPipeline",
        "controlnet": "StableDiffusionXLControlNetPipeline",
        "controlnet_model": "ControlNetModel",
    },
}
_ARCHITECTURE_OF_PIPELINE_CLASS = {
    classes["text2img"]: arch for arch, classes in ARCHITECTURES.items()
}


@dataclass(frozen=True)
class ModelFamily:
    name: str
    label: str
    base_id: str  # a Hub repo id, or a local folder
    architecture: str  # key of ARCHITECTURES
    default_size: int
    # LoRA catalogue entries and ControlNet registry rows are keyed by this tag.
    compat_tag: str
    # Makes the base folder locally (the tiny family); None for Hub or user folders.
    builder: Callable[[Path], Path] | None = None
    fp16_variant: bool = False
    # What the model can draw, for a model that cannot draw everything (the tiny one):
    # shown at the top of the page whenever it runs.
    about: str = ""

    @property
    def is_local_build(self) -> bool:
        return self.builder is not None

    def locate(self, cache_root: Path) -> str:
        """The id or folder to pass to from_pretrained for the base pipeline."""
        if self.builder is not None:
            return str(self.builder(cache_root))
        return self.base_id

    def locate_component(self, ref: str, cache_root: Path) -> str:
        """Resolve a ControlNet reference: Hub ids pass through; tiny refs live in its folder."""
        if self.builder is not None:
            return str(Path(self.builder(cache_root)) / ref)
        return ref

    def pipeline_class(self, kind: str):
        import diffusers

        return getattr(diffusers, ARCHITECTURES[self.architecture][kind])


def _build_tiny(cache_root: Path) -> Path:
    from .tiny import ensure_tiny_family

    return ensure_tiny_family(cache_root)


def _tiny_about() -> str:
    from .tiny import TINY_COLOURS, TINY_SHAPES

    def listed(words, last):
        return ", ".join(words[:-1]) + f" {last} " + words[-1]

    return (
        f"The built-in tiny model draws one {listed(TINY_SHAPES[:-1] + ('stick figure',), 'or')}"
        f" in {listed(TINY_COLOURS, 'or')} on a plain background, at 64 px: try "
        '"a red circle on a blue background". Canny, depth and pose maps place it; the '
        "tiny-inverted and tiny-outlined LoRAs restyle it."
    )


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            name="sd15",
            label="Stable Diffusion 1.5",
            base_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
            architecture="sd",
            default_size=512,
            compat_tag="sd15",
            fp16_variant=True,
        ),
        ModelFamily(
            name="sdxl",
            label="Stable Diffusion XL",
            base_id="stabilityai/stable-diffusion-xl-base-1.0",
            architecture="sdxl",
            default_size=1024,
            compat_tag="sdxl",
            fp16_variant=True,
        ),
        ModelFamily(
            name="tiny",
            label="Stencil tiny (offline model trained on shapes)",
            base_id="stencil-tiny",
            architecture="sd",
            default_size=64,
            compat_tag="tiny",
            builder=_build_tiny,
            about=_tiny_about(),
        ),
    )
}
DEFAULT_FAMILY = "sd15"
# A local folder's LoRAs and ControlNets follow the registry family of its architecture.
_COMPAT_OF_ARCHITECTURE = {"sd": "sd15", "sdxl": "sdxl"}


def resolve_family(name_or_folder: str) -> ModelFamily:
    """A registry name, or a local folder with a diffusers `model_index.json`."""
    if not isinstance(name_or_folder, str) or not name_or_folder.strip():
        raise UnknownNameError("model", name_or_folder, [*FAMILIES, "a local model folder"])
    key = name_or_folder.strip()
    if key in FAMILIES:
        return FAMILIES[key]
    folder = Path(key).expanduser()
    if folder.is_dir():
        return family_from_folder(folder)
    raise UnknownNameError("model", key, [*FAMILIES, "a local model folder"])


def family_from_folder(folder: Path) -> ModelFamily:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers model folder: no model_index.json")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{index} could not be read: {exc}") from exc
    arch = _ARCHITECTURE_OF_PIPELINE_CLASS.get(class_name)
    if arch is None:
        raise ModelLoadError(
            f"{folder} holds a {class_name}; Stencil runs "
            + ", ".join(sorted(_ARCHITECTURE_OF_PIPELINE_CLASS))
        )
    template = FAMILIES[_COMPAT_OF_ARCHITECTURE[arch]]
    return replace(
        template,
        name=f"{template.name}:{folder.name}",
        label=f"{template.label} ({folder.name})",
        base_id=str(folder.resolve()),
        fp16_variant=False,
    )
