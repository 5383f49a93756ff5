"""Model family registry: which base weights, which pipeline classes, which LoRAs fit.

Adding a family means adding one `ModelFamily` entry. A family may also be a local folder
holding a diffusers pipeline (`model_index.json`): its architecture is read from there.
"""

from __future__ import annotations

import importlib
import json
import struct
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
        # How a batch's control maps are passed with several ControlNets: one list per
        # sample (SD's pipeline transposes it), or per unit one tensor of every sample's
        # map (SDXL's takes no nested lists; a tensor made by its own image processor
        # is exactly what it makes of the images).
        "batched_maps": "per-sample",
    },
    "sdxl": {
        "text2img": "StableDiffusionXLPipeline",
        "controlnet": "StableDiffusionXLControlNetPipeline",
        "controlnet_model": "ControlNetModel",
        "controlnet_union": "StableDiffusionXLControlNetUnionPipeline",
        "controlnet_union_model": "ControlNetUnionModel",
        "batched_maps": "tensor-per-unit",
        # SDXL's pipelines use zeros, not the encoded "", for a missing negative prompt
        # (`force_zeros_for_empty_prompt`), so an empty one is passed as none at all.
        "empty_negative": "zeros",
    },
}


def size_conditioning(architecture: str, width: int, height: int) -> dict[str, tuple[int, int]]:
    """SDXL is told each image's original size, crop corner and target size (it was
    trained on crops of photos of every size). Stencil says: an uncropped image made at its
    own size, (height, width) / (0, 0) / (height, width), which is what SDXL draws best and
    what diffusers assumes unasked; said explicitly so the recipe records it. SD takes none."""
    if architecture != "sdxl":
        return {}
    return {
        "original_size": (height, width),
        "crops_coords_top_left": (0, 0),
        "target_size": (height, width),
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
    # "module:function" that makes the base folder locally from the cache root and returns
    # it (the tiny families); None for Hub or user folders. A recipe's snippet calls it too.
    builder: str | None = None
    fp16_variant: bool = False
    # What the model can draw, for a model that cannot draw everything (the tiny one):
    # shown at the top of the page whenever it runs.
    about: str = ""
    # A single-file checkpoint (original layout) to load with `from_single_file`; the
    # family's own base (a Hub id or folder, or `config_source`) then gives the configs,
    # tokenizers and scheduler, which such a file does not hold.
    checkpoint: str | None = None
    config_source: str | None = None
    # A small decoder of this family's latents (TAESD) for images of a run in progress;
    # without one (or offline without its weights) the VAE itself decodes them.
    preview_decoder: str | None = None

    @property
    def is_local_build(self) -> bool:
        return self.builder is not None

    def locate(self, cache_root: Path) -> str:
        """The id or folder to pass to from_pretrained for the base pipeline (for a
        checkpoint, where its configs come from)."""
        if self.config_source is not None:
            return self.config_source
        if self.builder is not None:
            return str(self.build_locally(cache_root))
        return self.base_id

    def build_locally(self, cache_root: Path) -> Path:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(cache_root)

    def locate_component(self, ref: str, cache_root: Path) -> str:
        """Resolve a ControlNet reference: Hub ids pass through; tiny refs live in its folder."""
        if self.builder is not None:
            return str(self.build_locally(cache_root) / ref)
        return ref

    def pipeline_class(self, kind: str):
        import diffusers

        return getattr(diffusers, ARCHITECTURES[self.architecture][kind])


def _what_tiny_draws(model: str) -> str:
    from .tiny import TINY_COLOURS, TINY_SHAPES

    def listed(words, last):
        return ", ".join(words[:-1]) + f" {last} " + words[-1]

    return (
        f"The built-in {model} draws one {listed(TINY_SHAPES[:-1] + ('stick figure',), 'or')}"
        f" in {listed(TINY_COLOURS, 'or')} on a plain background, at 64 px: try "
        '"a red circle on a blue background".'
    )


def _tiny_about() -> str:
    return (
        _what_tiny_draws("tiny model")
        + " Canny, depth and pose maps place it; the tiny-inverted and tiny-outlined LoRAs"
        " restyle it."
    )


def _tiny_xl_about() -> str:
    return (
        _what_tiny_draws("tiny SDXL model")
        + " Canny, depth and pose maps place it, through their own SDXL ControlNets or the"
        " one ControlNet Union model; its LoRA (tiny-xl-sketch-kohya) is untrained and only"
        " changes the picture."
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
            preview_decoder="madebyollin/taesd",
        ),
        ModelFamily(
            name="sdxl",
            label="Stable Diffusion XL",
            base_id="stabilityai/stable-diffusion-xl-base-1.0",
            architecture="sdxl",
            default_size=1024,
            compat_tag="sdxl",
            fp16_variant=True,
            preview_decoder="madebyollin/taesdxl",
        ),
        ModelFamily(
            name="tiny",
            label="Stencil tiny (offline model trained on shapes)",
            base_id="stencil-tiny",
            architecture="sd",
            default_size=64,
            compat_tag="tiny",
            builder="pipelines.tiny:ensure_tiny_family",
            about=_tiny_about(),
        ),
        ModelFamily(
            name="tiny-xl",
            label="Stencil tiny XL (offline SDXL-shaped model trained on shapes)",
            base_id="stencil-tiny-xl",
            architecture="sdxl",
            default_size=64,
            compat_tag="tiny-xl",
            builder="pipelines.tiny_xl:ensure_tiny_xl_family",
            about=_tiny_xl_about(),
        ),
    )
}
DEFAULT_FAMILY = "sd15"
# A local folder's LoRAs and ControlNets follow the registry family of its architecture.
_COMPAT_OF_ARCHITECTURE = {"sd": "sd15", "sdxl": "sdxl"}


MODEL_CHOICES = [*FAMILIES, "a local model folder", "a .safetensors checkpoint file"]
# Checkpoint formats that are Python pickles: loading one can run any code it holds.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def resolve_family(name_or_folder: str, config: str | None = None) -> ModelFamily:
    """A registry name, a local folder with a diffusers `model_index.json`, or a single
    `.safetensors` checkpoint in the original layout (configs from `config`, see
    `family_from_checkpoint`)."""
    if not isinstance(name_or_folder, str) or not name_or_folder.strip():
        raise UnknownNameError("model", name_or_folder, MODEL_CHOICES)
    key = name_or_folder.strip()
    if key in FAMILIES:
        return FAMILIES[key]
    path = Path(key).expanduser()
    if path.is_dir():
        return family_from_folder(path)
    if path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        return family_from_checkpoint(path, config)
    raise UnknownNameError("model", key, MODEL_CHOICES)


def family_from_checkpoint(path: Path, config: str | None = None) -> ModelFamily:
    """A family for one A1111 / Civitai style checkpoint file, SD 1.x or SDXL (told apart
    by its keys). `config` gives the configs, tokenizers and scheduler: a family name
    (whose base is used, a built-in tiny one included), a diffusers folder or a Hub id;
    by default the registry's SD 1.5 or SDXL base, read from the Hub cache when offline."""
    name = path.name
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{name} is a pickle checkpoint, which can run code when loaded; Stencil loads"
            " only .safetensors (convert it, or get the .safetensors release)"
        )
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise ModelLoadError(f"{name} is not a .safetensors checkpoint file")
    keys = _safetensors_keys(path)
    if not any(key.startswith("model.diffusion_model.") for key in keys):
        raise ModelLoadError(
            f"{name} is not a Stable Diffusion checkpoint in the original layout (it has no"
            " model.diffusion_model. weights); a diffusers folder loads as a folder"
        )
    architecture = "sdxl" if any(key.startswith("conditioner.") for key in keys) else "sd"
    template = FAMILIES[_COMPAT_OF_ARCHITECTURE[architecture]]
    # A folder is held by its absolute path, which the recipe reduces to its name.
    config_source = str(Path(config).resolve()) if config and Path(config).is_dir() else config
    if config in FAMILIES:
        template, config_source = FAMILIES[config], None
        if template.architecture != architecture:
            raise ModelLoadError(
                f"{name} is an {'SDXL' if architecture == 'sdxl' else 'SD 1.x'} checkpoint;"
                f" the {config} family's configs are for another architecture"
            )
    return replace(
        template,
        name=f"{template.name}:{path.stem}",
        label=f"{template.label} ({name})",
        base_id=config_source or template.base_id,
        checkpoint=str(path.resolve()),
        config_source=config_source,
        fp16_variant=False,
    )


# A checkpoint's header lists a few thousand tensors: far below this, whatever its size.
MAX_CHECKPOINT_HEADER_BYTES = 64 * 1024 * 1024


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header, read without loading a weight."""
    with open(path, "rb") as file:
        head = file.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
        if length is None or length > MAX_CHECKPOINT_HEADER_BYTES:
            raise ModelLoadError(f"{path.name} is not a safetensors file (or is corrupt)")
        try:
            header = json.loads(file.read(length))
        except ValueError:
            raise ModelLoadError(
                f"{path.name}: its safetensors header is not valid JSON (the file is corrupt)"
            ) from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path.name}: its safetensors header is not a JSON object")
    return [key for key in header if key != "__metadata__"]


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
