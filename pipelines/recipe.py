"""The recipe: everything needed to make an image again, carried inside the PNG itself.

A Stencil PNG has two text chunks: `stencil-recipe` (JSON, read back by Stencil to restore
every setting) and `parameters` (the A1111 line format other tools already show).
"""

from __future__ import annotations

import io
import json
from importlib import metadata
from typing import Any

RECIPE_KEY = "stencil-recipe"
RECIPE_VERSION = 1
_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "controlnet-aux")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_recipe(
    *,
    request,
    prompt,
    seed,
    width,
    height,
    family,
    base_revision=None,
    loras,
    controlnets,
    preprocessor_weights,
) -> dict:
    """`controlnets`: (reference, resolved Hub commit or None) per control unit."""
    return {
        "stencil_recipe": RECIPE_VERSION,
        "prompt": prompt,
        "negative_prompt": request.negative_prompt,
        "seed": seed,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "scheduler": request.scheduler,
        "width": width,
        "height": height,
        "num_images": request.num_images,
        "model": {"family": family.name, "base": family.base_id, "revision": base_revision},
        "controls": [
            {
                "control_type": unit.control_type,
                "controlnet": controlnet,
                "controlnet_revision": controlnet_revision,
                "preprocessor_weights": weights,
                "conditioning_scale": unit.conditioning_scale,
                "guidance_start": unit.guidance_start,
                "guidance_end": unit.guidance_end,
                "resolution": unit.resolution,
                "params": unit.param_dict,
            }
            for unit, (controlnet, controlnet_revision), weights in zip(
                request.controls, controlnets, preprocessor_weights
            )
        ],
        "loras": list(loras),
        "versions": library_versions(),
    }


def a1111_parameters(recipe: dict) -> str:
    """The one-paragraph format A1111 writes, so other viewers show something useful."""
    lines = [recipe["prompt"]]
    if recipe.get("negative_prompt"):
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    fields = [
        f"Steps: {recipe['steps']}",
        f"Sampler: {recipe['scheduler']}",
        f"CFG scale: {recipe['guidance_scale']}",
        f"Seed: {recipe['seed']}",
        f"Size: {recipe['width']}x{recipe['height']}",
        f"Model: {recipe['model']['base']}",
    ]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_bytes_with_recipe(image, recipe: dict) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
    info.add_itxt("parameters", a1111_parameters(recipe))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_recipe(image) -> dict[str, Any] | None:
    """The recipe stored in a Stencil PNG (a PIL image or bytes), or None if it has none."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    text = getattr(image, "text", None) or image.info
    raw = text.get(RECIPE_KEY) if text else None
    if not raw:
        return None
    try:
        recipe = json.loads(raw)
    except ValueError:
        return None
    return recipe if isinstance(recipe, dict) and "stencil_recipe" in recipe else None


def python_snippet(recipe: dict) -> str:
    """The same recipe as a runnable plain-diffusers script (LoRAs and controls included)."""
    base = recipe["model"]["base"]
    lines = []
    if recipe["model"].get("family") == "tiny":
        lines += [
            "# 'stencil-tiny' is Stencil's offline test model: make it with",
            "# pipelines.tiny.ensure_tiny_family(folder) and use that folder here.",
        ]
    lines += [
        "import torch",
        "from diffusers import (",
        "    ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline,",
        f"    {_scheduler_class(recipe['scheduler'])},",
        ")",
        "from diffusers.utils import load_image",
        "",
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        'dtype = torch.float16 if device == "cuda" else torch.float32',
    ]
    revision = _revision_arg(recipe["model"].get("revision"))
    controls = recipe.get("controls") or []
    if controls:
        nets = ", ".join(
            f"ControlNetModel.from_pretrained({c['controlnet']!r},"
            f"{_revision_arg(c.get('controlnet_revision'))} torch_dtype=dtype)"
            for c in controls
        )
        lines += [
            f"controlnets = [{nets}]",
            "pipe = StableDiffusionControlNetPipeline.from_pretrained(",
            f"    {base!r},{revision} controlnet=controlnets, torch_dtype=dtype,"
            " safety_checker=None",
            ").to(device)",
        ]
    else:
        lines += [
            "pipe = StableDiffusionPipeline.from_pretrained(",
            f"    {base!r},{revision} torch_dtype=dtype, safety_checker=None",
            ").to(device)",
        ]
    scheduler_class = _scheduler_class(recipe["scheduler"])
    overrides = _scheduler_overrides(recipe["scheduler"])
    lines.append(
        f"pipe.scheduler = {scheduler_class}.from_config(pipe.scheduler.config{overrides})"
    )
    loras = [lora for lora in recipe.get("loras") or [] if lora.get("active", True)]
    for lora in loras:
        lines.append(_load_lora_line(lora))
    if loras:
        names = [lora["name"] for lora in loras]
        weights = [lora["weight"] for lora in loras]
        lines.append(f"pipe.set_adapters({names!r}, adapter_weights={weights!r})")
    call = [
        f"    prompt={recipe['prompt']!r},",
        f"    negative_prompt={recipe.get('negative_prompt') or None!r},",
        f"    num_inference_steps={recipe['steps']},",
        f"    guidance_scale={recipe['guidance_scale']},",
        f"    width={recipe['width']}, height={recipe['height']},",
        f"    generator=torch.Generator('cpu').manual_seed({recipe['seed']}),",
    ]
    if controls:
        call += [
            f"    image=[load_image(f'control_map_{{i}}.png') for i in range({len(controls)})],",
            f"    controlnet_conditioning_scale={[c['conditioning_scale'] for c in controls]!r},",
            f"    control_guidance_start={[c['guidance_start'] for c in controls]!r},",
            f"    control_guidance_end={[c['guidance_end'] for c in controls]!r},",
        ]
    lines += ["image = pipe(", *call, ").images[0]", 'image.save("out.png")']
    return "\n".join(lines) + "\n"


def _load_lora_line(lora: dict) -> str:
    digest = f"  # sha256 {(lora.get('sha256') or '?')[:16]}"
    if lora.get("repo_id"):
        return (
            f"pipe.load_lora_weights({lora['repo_id']!r}, weight_name={lora['weight_name']!r}, "
            f"revision={lora['revision']!r}, adapter_name={lora['name']!r}){digest}"
        )
    if lora.get("file"):
        return (
            f"pipe.load_lora_weights('loras', weight_name={lora['file']!r}, "
            f"adapter_name={lora['name']!r}){digest}"
        )
    return f"# {lora['name']!r} was uploaded in the page; load your copy of it here{digest}"


def _scheduler_class(name: str) -> str:
    from .schedulers import get_scheduler_spec

    return get_scheduler_spec(name).class_name


def _scheduler_overrides(name: str) -> str:
    from .schedulers import get_scheduler_spec

    overrides = get_scheduler_spec(name).overrides
    return "".join(f", {key}={value!r}" for key, value in overrides.items())


def _revision_arg(revision: str | None) -> str:
    """` revision='<commit>',` for weights that came from the Hub, else nothing."""
    return f" revision={revision!r}," if revision else ""
