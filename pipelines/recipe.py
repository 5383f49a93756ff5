"""The recipe: everything needed to make an image again, carried inside the PNG itself.

A Stencil PNG has two text chunks: `stencil-recipe` (JSON, read back by Stencil to restore
every setting) and `parameters` (the A1111 line format other tools already show).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

from .errors import StencilError

RECIPE_KEY = "stencil-recipe"
# 2: model.architecture recorded. Version 1 recipes are migrated on read. (A new field
# needs no new version: a recipe without it is read with the field's default.)
RECIPE_VERSION = 2
_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "controlnet-aux")
_SECTIONS = ("stencil_recipe", "model", "controls", "loras", "versions")
# A real recipe is a few KB; anything far larger is not one (and would be slow to parse).
MAX_RECIPE_CHARS = 1_000_000


class RecipeError(StencilError, ValueError):
    """A recipe Stencil cannot read: malformed, or from a version it does not know."""


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True)
class Recipe:
    """Everything needed to make an image again.

    `settings` holds the request's recorded fields by their recipe keys (prompt, seed,
    steps, ...: see `pipelines.fields`), with the values the engine resolved (the seed and
    size it used, the prompt without its LoRA tags). `controls` has one mapping per unit
    (its recorded fields, `params`, and the ControlNet and preprocessor weights it ran);
    `loras` the applied set with file hashes. The JSON form is one flat object.
    """

    settings: Mapping[str, Any]
    model: Mapping[str, Any]
    controls: tuple[Mapping[str, Any], ...] = ()
    loras: tuple[Mapping[str, Any], ...] = ()
    versions: Mapping[str, str] = field(default_factory=dict)
    version: int = RECIPE_VERSION

    def for_image(self, seed: int) -> Recipe:
        """The recipe of one image of a batch: its own seed, made alone."""
        return replace(self, settings={**self.settings, "seed": seed, "num_images": 1})

    def lora_text(self) -> str:
        """The applied set as the LoRA field writes it: `name:weight, ...`."""
        return ", ".join(f"{x['name']}:{x['weight']:g}" for x in self.loras)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stencil_recipe": self.version,
            **self.settings,
            "model": dict(self.model),
            "controls": [dict(unit) for unit in self.controls],
            "loras": [dict(lora) for lora in self.loras],
            "versions": dict(self.versions),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Read a recipe of this version, or migrate an older one; refuse a newer one."""
        if not isinstance(data, Mapping) or "stencil_recipe" not in data:
            raise RecipeError("this is not a Stencil recipe")
        version = data["stencil_recipe"]
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RecipeError(f"recipe version {version!r} is not a version number")
        if version > RECIPE_VERSION:
            raise RecipeError(
                f"the recipe was written by a newer Stencil (recipe version {version}; this"
                f" one reads versions 1 to {RECIPE_VERSION}): update Stencil to restore it"
            )
        data = dict(data)
        try:
            for migrate in _MIGRATIONS[version - 1 :]:
                data = migrate(data)
            data = _with_declared_defaults(data)
            return cls(
                settings={k: v for k, v in data.items() if k not in _SECTIONS},
                model=dict(data["model"]),
                controls=tuple(dict(unit) for unit in data.get("controls") or ()),
                loras=tuple(dict(lora) for lora in data.get("loras") or ()),
                versions=dict(data.get("versions") or {}),
            )
        except KeyError as exc:
            raise RecipeError(f"the recipe is damaged: it has no {exc.args[0]!r} entry") from None
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"the recipe is damaged ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise RecipeError("the recipe is not valid JSON") from None
        return cls.from_dict(data)


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 did not record the model's architecture (it only ran SD-shaped ones)."""
    model = dict(data.get("model") or {})
    family = str(model.get("family", ""))
    model.setdefault("architecture", "sdxl" if family.startswith("sdxl") else "sd")
    return {**data, "model": model}


def _with_declared_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Fields added after a recipe was written take their defaults, which by the rule of
    `pipelines.fields` are what Stencil did before the field existed."""
    from .fields import REQUEST_FIELDS, unit_fields

    settings = {s.recipe: s.parse(s.default) for s in REQUEST_FIELDS if s.recipe}
    units = {s.recipe: s.parse(s.default) for s in unit_fields() if s.recipe}
    controls = [{**units, **unit} for unit in data.get("controls") or ()]
    return {**settings, **data, "controls": controls}


# _MIGRATIONS[i] turns a version i+1 recipe into version i+2.
_MIGRATIONS = (_from_version_1,)


def build_recipe(
    *,
    request,
    resolved: Mapping[str, Any],
    family,
    base_revision=None,
    loras,
    controlnets,
    preprocessor_weights,
    samples_per_pass: int = 1,
    union_modes: Sequence[int] | None = None,
    vae: str | None = None,
) -> Recipe:
    """The recipe of `request` as run. `resolved`: the values the engine chose (seed, width,
    height, the prompt without LoRA tags). `controlnets`: (reference, resolved Hub commit
    or None) per control unit; `union_modes`, each unit's mode where they all ran on one
    ControlNet Union model. Which fields are recorded, and under which key, is declared
    in `pipelines.fields`."""
    from .families import size_conditioning
    from .fields import REQUEST_FIELDS, unit_fields

    settings = {
        spec.recipe: resolved.get(spec.name, getattr(request, spec.attribute))
        for spec in REQUEST_FIELDS
        if spec.recipe is not None
    }
    controls = tuple(
        {
            **{s.recipe: getattr(unit, s.attribute) for s in unit_fields() if s.recipe},
            "controlnet": controlnet,
            "controlnet_revision": controlnet_revision,
            "preprocessor_weights": weights,
            "params": unit.param_dict,
        }
        for unit, (controlnet, controlnet_revision), weights in zip(
            request.controls, controlnets, preprocessor_weights
        )
    )
    if union_modes is not None:
        controls = tuple(
            {**control, "union_mode": mode} for control, mode in zip(controls, union_modes)
        )
    model = {
        "family": family.name,
        "architecture": family.architecture,
        "base": _public_ref(family.base_id),
        "revision": base_revision,
        # The forward pass's batch shape: kernels round by shape, so a re-run is bit for
        # bit only at the same one (STENCIL_BATCH_SIZE); the companions never matter.
        "samples_per_pass": samples_per_pass,
    }
    if vae is not None:
        model["vae"] = _public_ref(vae)
    if family.checkpoint is not None:  # its file name only: a path is the machine's
        model["checkpoint"] = family.checkpoint.replace("\\", "/").rsplit("/", 1)[-1]
    conditioning = size_conditioning(family.architecture, resolved["width"], resolved["height"])
    if conditioning:
        model["size_conditioning"] = {key: list(value) for key, value in conditioning.items()}
    return Recipe(
        settings=settings,
        model=model,
        controls=controls,
        loras=tuple(loras),
        versions=library_versions(),
    )


def _public_ref(ref: str) -> str:
    """A Hub id as it is; a local folder (held as an absolute path) by its name only:
    where it lives is the machine's."""
    from pathlib import Path

    return Path(ref).name if Path(ref).is_absolute() else ref


def a1111_parameters(recipe: Recipe) -> str:
    """The one-paragraph format A1111 writes, so other viewers show something useful."""
    from .fields import REQUEST_FIELDS

    settings = recipe.settings
    active = [lora for lora in recipe.loras if lora.get("active", True)]
    # A1111 keeps the LoRA tags in the prompt, and readers (Civitai) find the LoRAs there.
    tags = "".join(f" <lora:{lora['name']}:{lora['weight']:g}>" for lora in active)
    lines = [settings["prompt"] + tags]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = [
        f"{spec.a1111}: {settings[spec.recipe]}"
        for spec in REQUEST_FIELDS
        if spec.a1111 and spec.recipe in settings
    ]
    fields += [f"Size: {settings['width']}x{settings['height']}", f"Model: {recipe.model['base']}"]
    fields += [
        f"ControlNet {index}: {_quoted(_a1111_unit(unit))}"
        for index, unit in enumerate(recipe.controls)
    ]
    hashes = [f"{lora['name']}: {lora['sha256'][:12]}" for lora in active if lora.get("sha256")]
    if hashes:  # A1111's short hash: the first 12 hex digits of the file's sha256
        fields.append(f"Lora hashes: {_quoted(', '.join(hashes))}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


# sd-webui-controlnet's module names for Stencil's preprocessors ("none": the image is the map).
_A1111_MODULES = {"pose": "openpose", "canny": "canny", "depth": "depth_anything_v2"}


def _a1111_unit(unit: Mapping[str, Any]) -> str:
    """One ControlNet unit as sd-webui-controlnet writes it into `parameters`."""
    from .controls import get_control_spec

    # The recipe keeps the parameters a request set; the rest are the declared defaults.
    declared = {
        param.name: param.default for param in get_control_spec(unit["control_type"]).params
    }
    params = {**declared, **(unit.get("params") or {})}
    parts = [
        f"Module: {_A1111_MODULES.get(unit['control_type'], 'none')}",
        f"Model: {str(unit.get('controlnet') or '').rsplit('/', 1)[-1]}",
        f"Weight: {unit['conditioning_scale']:g}",
        f"Processor Res: {unit['resolution']}",
    ]
    if unit["control_type"] == "canny":
        parts += [
            f"Threshold A: {params['low_threshold']}",
            f"Threshold B: {params['high_threshold']}",
        ]
    parts += [
        f"Guidance Start: {unit['guidance_start']:g}",
        f"Guidance End: {unit['guidance_end']:g}",
    ]
    return ", ".join(parts)


def _quoted(text: str) -> str:
    """A1111 quotes a value holding commas, escaping quotes inside it (json.dumps does)."""
    return json.dumps(text, ensure_ascii=False)


def png_bytes_with_recipe(image, recipe: Recipe) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(RECIPE_KEY, recipe.to_json())
    info.add_itxt("parameters", a1111_parameters(recipe))
    return png_bytes(image, pnginfo=info)


def png_bytes(image, *, pnginfo=None) -> bytes:
    """The image as PNG file bytes (with `pnginfo`'s text chunks when given)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo)
    return buffer.getvalue()


def read_recipe(image) -> Recipe | None:
    """The recipe stored in a Stencil PNG (a PIL image or bytes), or None if it has none.

    A recipe of an unknown (newer) version, or a damaged one, raises RecipeError.
    """
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    text = getattr(image, "text", None) or image.info
    raw = text.get(RECIPE_KEY) if text else None
    if not raw:
        return None
    if len(raw) > MAX_RECIPE_CHARS:
        raise RecipeError(f"the recipe is {len(raw)} characters; the limit is {MAX_RECIPE_CHARS}")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise RecipeError("the recipe is nested too deeply to be a Stencil recipe") from None
    except ValueError:
        return None
    if not isinstance(data, dict) or "stencil_recipe" not in data:
        return None
    return Recipe.from_dict(data)


def python_snippet(recipe: Recipe, map_files: Sequence[str] = ()) -> str:
    """The same recipe as a runnable plain-diffusers script (LoRAs and controls included).

    The pipeline classes are the family's architecture's; the call's keyword arguments are
    the declared fields' `pipeline_arg`s, written the way the engine passes them. The
    control maps are read from `map_files` (file names: the page's "Control maps used",
    which download under these names), or from control_map_<i>.png when not given.
    """
    from .families import ARCHITECTURES

    classes = ARCHITECTURES[recipe.model.get("architecture", "sd")]
    lines = [
        *_snippet_preamble(recipe, classes),
        *_snippet_pipeline(recipe, classes),
        *_snippet_adapters(recipe),
        "image = pipe(",
        *_snippet_call(recipe, map_files),
        ").images[0]",
        'image.save("out.png")',
    ]
    return "\n".join(lines) + "\n"


def _local_builder(recipe: Recipe) -> tuple[str, str] | None:
    """(module, function) that makes the recipe's built-in model folder, or None."""
    from .families import FAMILIES

    # A folder or checkpoint family is named "<registry family>:<its name>".
    family = FAMILIES.get(str(recipe.model.get("family", "")).split(":")[0])
    if family is None or family.builder is None:
        return None
    module, function = family.builder.split(":")
    return module, function


def _runs_union(recipe: Recipe) -> bool:
    """Whether the recipe's units all ran on one ControlNet Union model."""
    return bool(recipe.controls) and all("union_mode" in c for c in recipe.controls)


def _pipeline_kind(recipe: Recipe) -> str:
    if not recipe.controls:
        return "text2img"
    return "controlnet_union" if _runs_union(recipe) else "controlnet"


def _snippet_preamble(recipe: Recipe, classes: Mapping[str, str]) -> list[str]:
    pipeline_class = classes[_pipeline_kind(recipe)]
    imports = sorted({pipeline_class, _scheduler_class(recipe.settings["scheduler"])})
    if recipe.controls:
        imports.insert(0, classes[_pipeline_kind(recipe) + "_model"])
    if recipe.model.get("vae"):
        imports.insert(0, "AutoencoderKL")
    lines = [
        "import torch",
        f"from diffusers import {', '.join(imports)}",
        "from diffusers.utils import load_image",
    ]
    builder = _local_builder(recipe)
    if builder is not None:
        # A built-in model is not on the Hub: Stencil's own code finds (or makes) its folder.
        module, function = builder
        lines += [
            "",
            "# Stencil's offline model: run this with Stencil's folder on the Python path.",
            "from pipelines.settings import cache_dir",
            f"from {module} import {function}",
            "",
            f"tiny = {function}(cache_dir())",
        ]
    # SDXL's VAE overflows in float16; bfloat16 has float32's range (as the engine picks).
    gpu_dtype = "bfloat16" if recipe.model.get("architecture") == "sdxl" else "float16"
    lines += [
        "",
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        f'dtype = torch.{gpu_dtype} if device == "cuda" else torch.float32',
    ]
    if builder is not None:
        # The engine runs the tiny models on one CPU thread; another count rounds differently.
        lines += ['if device == "cpu":', "    torch.set_num_threads(1)  # as Stencil runs it"]
    return lines


def _model_ref(recipe: Recipe, ref: str) -> str:
    """A base or ControlNet reference as code: a Hub id, or a part of the tiny folder."""
    if _local_builder(recipe) is None:
        return repr(ref)
    return "str(tiny)" if ref == recipe.model["base"] else f"str(tiny / {ref!r})"


def _snippet_pipeline(recipe: Recipe, classes: Mapping[str, str]) -> list[str]:
    """The base (with its ControlNets) at the recorded commits, and the scheduler."""
    model, controls = recipe.model, recipe.controls
    revision = _revision_arg(model.get("revision"))
    extra = " safety_checker=None," if classes.get("safety_checker") else ""
    pipeline_class = classes[_pipeline_kind(recipe)]
    lines = []
    if _runs_union(recipe):
        union = controls[0]
        lines.append(
            f"union = {classes['controlnet_union_model']}.from_pretrained("
            f"{_model_ref(recipe, union['controlnet'])},"
            f"{_revision_arg(union.get('controlnet_revision'))} torch_dtype=dtype)"
        )
        # One set of weights, once per unit (each with its own mode, scale and window).
        lines.append(f"controlnets = [union] * {len(controls)}")
        extra = " controlnet=controlnets," + extra
    elif controls:
        nets = ", ".join(
            f"{classes['controlnet_model']}.from_pretrained({_model_ref(recipe, c['controlnet'])},"
            f"{_revision_arg(c.get('controlnet_revision'))} torch_dtype=dtype)"
            for c in controls
        )
        lines.append(f"controlnets = [{nets}]")
        extra = " controlnet=controlnets," + extra
    scheduler = recipe.settings["scheduler"]
    if model.get("vae"):
        lines.append(f"vae = AutoencoderKL.from_pretrained({model['vae']!r}, torch_dtype=dtype)")
        extra = " vae=vae," + extra
    if model.get("checkpoint"):
        # The single file, with its configs and tokenizers from the base it names.
        loader = "from_single_file"
        source = f"{model['checkpoint']!r}, config={_model_ref(recipe, model['base'])},"
    else:
        loader = "from_pretrained"
        source = f"{_model_ref(recipe, model['base'])},{revision}"
    return lines + [
        f"pipe = {pipeline_class}.{loader}(",
        f"    {source}{extra} torch_dtype=dtype,",
        ").to(device)",
        f"pipe.scheduler = {_scheduler_class(scheduler)}.from_config("
        f"pipe.scheduler.config{_scheduler_overrides(scheduler)})",
    ]


def _snippet_adapters(recipe: Recipe) -> list[str]:
    """The applied LoRAs with their weights, then what declared fields need set up."""
    from .fields import REQUEST_FIELDS

    loras = [lora for lora in recipe.loras if lora.get("active", True)]
    lines = [_load_lora_line(lora) for lora in loras]
    # One that cannot be loaded here (said in a comment) is not set active either.
    loras = [lora for lora, line in zip(loras, lines) if not line.startswith("#")]
    if loras:
        names = [lora["name"] for lora in loras]
        weights = [lora["weight"] for lora in loras]
        lines.append(f"pipe.set_adapters({names!r}, adapter_weights={weights!r})")
    for spec in REQUEST_FIELDS:
        if spec.snippet_setup and recipe.settings.get(spec.recipe, spec.default) != spec.default:
            lines += spec.snippet_setup
    return lines


def _snippet_call(recipe: Recipe, map_files: Sequence[str] = ()) -> list[str]:
    """The pipeline call's arguments: each declared field's `pipeline_arg`, per unit too."""
    from .fields import REQUEST_FIELDS, unit_fields

    settings, controls = recipe.settings, recipe.controls
    call = [f"    prompt={settings['prompt']!r},"]
    for spec in REQUEST_FIELDS:
        if spec.pipeline_arg and spec.recipe in settings:
            call.append(f"    {spec.pipeline_arg}={spec.pipeline_value(settings[spec.recipe])!r},")
    call += [
        f"    width={settings['width']}, height={settings['height']},",
        *(
            f"    {key}={tuple(value)!r},"
            for key, value in recipe.model.get("size_conditioning", {}).items()
        ),
        f"    generator=torch.Generator('cpu').manual_seed({settings['seed']}),",
    ]
    image_arg = "control_image" if _runs_union(recipe) else "image"
    if controls and len(map_files) == len(controls):
        maps = ", ".join(f"load_image({name!r})" for name in map_files)
        call.append(f'    {image_arg}=[{maps}],  # the page\'s "Control maps used", as downloaded')
    elif controls:
        call.append(
            f"    {image_arg}=[load_image(f'control_map_{{i}}.png')"
            f" for i in range({len(controls)})],"
        )
    if _runs_union(recipe):
        call.append(f"    control_mode={[c['union_mode'] for c in controls]!r},")
    for spec in unit_fields() if controls else ():
        if spec.pipeline_arg:
            values = [spec.pipeline_value(c[spec.recipe]) for c in controls]
            call.append(f"    {spec.pipeline_arg}={values!r},")
    return call


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
    if lora.get("source") == "upload" and lora.get("sha256"):
        # Stencil stores an upload under its content hash; the user's copy, so named, loads.
        return (
            f"pipe.load_lora_weights('.', weight_name={lora['sha256'] + '.safetensors'!r}, "
            f"adapter_name={lora['name']!r})  # your uploaded file, named by its sha256"
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
