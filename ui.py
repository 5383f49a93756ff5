"""The Stencil page: Gradio Blocks only.

It talks to the engine through `StencilService` (plain values in and out) and never
imports torch. The control sections are generated from the control registry, so a new
control type appears on the page, and in the API, without touching this file.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from pipelines.controls import CONTROLS
from pipelines.errors import GenerationCancelled, StencilError
from pipelines.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from pipelines.service import NO_CONTROL, RANDOM_SEED, StencilService, UnitFields
from pipelines.settings import LIMITS

log = logging.getLogger(__name__)

# Every event that touches the model shares this id, so they run one at a time.
MODEL_QUEUE = "stencil-model"
CONTROL_UNITS = 2
LORA_SLOTS = 3
EXAMPLES_DIR = Path(__file__).with_name("examples")

try:  # On a ZeroGPU Space, work that needs the GPU runs inside @spaces.GPU.
    import spaces
except ImportError:
    spaces = None


def on_gpu(function, estimate):
    """`function` under `spaces.GPU` with a per-call duration estimate, or unchanged."""
    if spaces is None:
        return function
    return spaces.GPU(duration=estimate)(function)


class UploadedImage(gr.Image):
    """An image upload that Gradio stores but does not decode.

    Stencil's own loader reads it: it checks the byte size, the declared pixel count and
    the format before decoding, and its errors say what is wrong with the file.
    """

    is_template = True  # rendered by the ordinary Image component in the browser

    def preprocess(self, payload):
        if payload is None:
            return None
        if getattr(payload, "path", None):
            return payload.path
        return super().preprocess(payload)  # pasted data URLs


class StopTokens:
    """Stop tokens by browser session: the Stop button reaches that session's request."""

    def __init__(self) -> None:
        self._tokens: dict[str, Any] = {}
        self._lock = threading.Lock()

    def start(self, session: str):
        from pipelines.engine import CancelToken

        token = CancelToken()
        with self._lock:
            self._tokens[session] = token
        return token

    def stop(self, session: str) -> None:
        with self._lock:
            token = self._tokens.get(session)
        if token is not None:
            token.cancel()

    def finish(self, session: str, token) -> None:
        with self._lock:
            if self._tokens.get(session) is token:
                del self._tokens[session]


def accepts_fields(function, names):
    """Declare `names` as keyword parameters defaulting to None on a `**fields` function.

    Gradio reads the signature to name API parameters and to learn which may be left
    out; the page's fields are generated from the registries, so the signature is too.
    """
    import inspect

    head = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    tail = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    function.__signature__ = inspect.Signature(head + tail)
    return function


def suffix(position: int) -> str:
    return "" if position == 1 else f"_{position}"


def param_field(control: str, param: str, position: int) -> str:
    return f"{control}_{param}{suffix(position)}"


def unit_from_fields(fields: dict[str, Any], position: int) -> UnitFields:
    """Collect one unit's values from the flat field names the page and API use."""
    s = suffix(position)
    control_type = fields.get(f"control_type{s}") or NO_CONTROL
    params = {}
    if control_type in CONTROLS:
        for spec in CONTROLS[control_type].params:
            name = param_field(control_type, spec.name, position)
            if fields.get(name) is not None:
                params[spec.name] = fields[name]
    return UnitFields(
        control_type=control_type,
        control_image=fields.get(f"control_image{s}"),
        conditioning_scale=fields.get(f"conditioning_scale{s}", 1.0),
        guidance_start=fields.get(f"guidance_start{s}", 0.0),
        guidance_end=fields.get(f"guidance_end{s}", 1.0),
        resolution=int(fields.get(f"control_resolution{s}", 512)),
        params=params,
    )


def user_error(exc: Exception) -> gr.Error:
    """StencilErrors carry their own message; anything else is logged, not shown raw."""
    if isinstance(exc, StencilError):
        return gr.Error(str(exc), print_exception=False)
    log.exception("unexpected error while serving a request")
    return gr.Error(
        f"Stencil hit an internal error ({type(exc).__name__}); the request was not "
        "completed and nothing else was affected. It has been logged.",
        print_exception=False,
    )


def status_markdown(status: dict[str, Any]) -> str:
    weights = ", ".join(f"{name}: {kind}" for name, kind in status["preprocessor_weights"].items())
    line = (
        f"**Model:** {status['label']} · `{status['base']}` · {status['device']} / "
        f"{status['dtype']}  \n**Preprocessor weights:** {weights}"
    )
    if status["notice"]:
        line = f"⚠️ **{status['notice']}**\n\n" + line
    return line


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _param_component(spec, label_prefix: str, visible: bool):
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default, label=spec.label, visible=visible)
    if spec.kind == "choice":
        return gr.Dropdown(
            list(spec.choices), value=spec.default, label=spec.label, visible=visible
        )
    return gr.Slider(
        spec.minimum,
        spec.maximum,
        value=spec.default,
        step=spec.step or (1 if spec.kind == "int" else 0.01),
        label=spec.label,
        visible=visible,
    )


class ControlUnitView:
    """One control unit's components, generated from the control registry."""

    def __init__(self, position: int):
        self.position = position
        s = suffix(position)
        choices = [("None", NO_CONTROL)] + [(spec.label, name) for name, spec in CONTROLS.items()]
        with gr.Row():
            self.image = UploadedImage(
                label="Control image",
                type="filepath",
                sources=["upload", "clipboard"],
                height=260,
                elem_id=f"control_image{s}",
            )
            self.map = gr.Image(
                label="Control map",
                type="filepath",
                interactive=False,
                height=260,
                elem_id=f"control_map{s}",
            )
        self.control_type = gr.Dropdown(
            choices, value=NO_CONTROL, label="Control type", elem_id=f"control_type{s}"
        )
        self.preview = gr.Button("Preview map", elem_id=f"preview{s}", size="sm")
        self.params: dict[str, Any] = {}
        self.params_of: dict[str, list[Any]] = {}
        with gr.Group():
            for name, spec in CONTROLS.items():
                self.params_of[name] = []
                for param in spec.params:
                    component = _param_component(param, spec.label, visible=False)
                    self.params[param_field(name, param.name, position)] = component
                    self.params_of[name].append(component)
        with gr.Accordion("Unit settings", open=False):
            self.scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Conditioning scale")
            self.start = gr.Slider(0, 1, value=0.0, step=0.05, label="Guidance start")
            self.end = gr.Slider(0, 1, value=1.0, step=0.05, label="Guidance end")
            self.resolution = gr.Slider(
                64, 2048, value=512, step=64, label="Detection resolution (short side)"
            )
        self.control_type.change(
            self.show_params_for,
            self.control_type,
            [c for group in self.params_of.values() for c in group],
            queue=False,
            api_visibility="private",
        )

    def show_params_for(self, control_type: str):
        return [
            gr.update(visible=name == control_type)
            for name, group in self.params_of.items()
            for _ in group
        ]

    def fields(self) -> dict[str, Any]:
        s = suffix(self.position)
        return {
            f"control_type{s}": self.control_type,
            f"control_image{s}": self.image,
            f"conditioning_scale{s}": self.scale,
            f"guidance_start{s}": self.start,
            f"guidance_end{s}": self.end,
            f"control_resolution{s}": self.resolution,
            **self.params,
        }


def create_demo(service: StencilService, *, queue_size: int = 32) -> gr.Blocks:
    stops = StopTokens()
    status = service.status()

    def generate(request: gr.Request, progress=gr.Progress(), **fields):
        session = session_of(request)
        token = stops.start(session)
        progress(0, desc="waiting for the model")
        units = tuple(unit_from_fields(fields, p) for p in range(1, CONTROL_UNITS + 1))
        try:
            outcome = service.generate(
                fields.get("prompt"),
                negative_prompt=fields.get("negative_prompt") or "",
                seed=fields.get("seed", RANDOM_SEED),
                steps=fields.get("steps", 20),
                guidance_scale=fields.get("guidance_scale", 7.0),
                width=fields.get("width", 0),
                height=fields.get("height", 0),
                scheduler=fields.get("scheduler", DEFAULT_SCHEDULER),
                num_images=fields.get("num_images", 1),
                units=units,
                loras=fields.get("loras") or "",
                session_id=session,
                progress=lambda done, total, stage: progress((done, total), desc=stage),
                cancel=token,
            )
        except GenerationCancelled as exc:
            gr.Warning(f"Stopped: {exc}")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        except Exception as exc:
            raise user_error(exc) from None
        finally:
            stops.finish(session, token)
        for warning in outcome.warnings:
            gr.Warning(warning)
        return (
            list(outcome.image_paths),
            list(outcome.map_paths),
            outcome.seeds[0],
            outcome.recipe,
            service.python_snippet(outcome.recipe),
        )

    def estimate(request: gr.Request = None, progress=None, **fields) -> int:
        return service.estimate_gpu_seconds(
            steps=int(fields.get("steps") or 20),
            width=int(fields.get("width") or 0),
            height=int(fields.get("height") or 0),
            num_images=int(fields.get("num_images") or 1),
            controls=sum(unit_from_fields(fields, p).active for p in range(1, CONTROL_UNITS + 1)),
        )

    def preview_control(**fields):
        try:
            return service.preview_control(unit_from_fields(fields, 1))
        except Exception as exc:
            raise user_error(exc) from None

    def list_loras(request: gr.Request):
        return service.list_loras(session_of(request))

    def stop(request: gr.Request):
        stops.stop(session_of(request))

    lora_choices = [("None", "")] + [
        (entry["display_name"], entry["name"]) for entry in service.list_loras()
    ]

    with gr.Blocks(title="Stencil", analytics_enabled=False) as demo:
        gr.Markdown("# Stencil\nPrompt, control maps and LoRAs on one shared model.")
        gr.Markdown(status_markdown(status), elem_id="status")
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox(
                    value="",
                    label="Prompt",
                    lines=2,
                    max_length=LIMITS.max_prompt_chars,
                    elem_id="prompt",
                )
                negative = gr.Textbox(value="", label="Negative prompt", lines=1)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    halt = gr.Button("Stop", variant="stop", elem_id="stop")
                units = []
                with gr.Tabs():
                    for position in range(1, CONTROL_UNITS + 1):
                        with gr.Tab(f"Control {position}"):
                            units.append(ControlUnitView(position))
                    with gr.Tab("LoRAs"):
                        slots = []
                        for index in range(LORA_SLOTS):
                            with gr.Row():
                                name = gr.Dropdown(
                                    lora_choices,
                                    value="",
                                    label=f"LoRA {index + 1}",
                                    elem_id=f"lora_{index + 1}",
                                )
                                weight = gr.Slider(-2, 2, value=0.8, step=0.05, label="Weight")
                            slots.append((name, weight))
                        triggers = gr.Markdown()
                        add_triggers = gr.Button("Add trigger words to the prompt", size="sm")
                        loras = gr.Textbox(
                            value="",
                            label="LoRAs as text (name:weight, ...); <lora:name:0.8> tags in "
                            "the prompt work too",
                            elem_id="loras",
                        )
                        lora_file = gr.File(
                            label="Upload a LoRA (.safetensors)",
                            file_types=[".safetensors"],
                            type="filepath",
                        )
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        steps = gr.Slider(1, LIMITS.max_steps, value=20, step=1, label="Steps")
                        guidance = gr.Slider(
                            0, LIMITS.max_guidance, value=7.0, step=0.5, label="Guidance scale"
                        )
                    scheduler = gr.Dropdown(
                        list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler"
                    )
                    with gr.Row():
                        width = gr.Slider(
                            0, LIMITS.max_side, value=0, step=8, label="Width (0 = auto)"
                        )
                        height = gr.Slider(
                            0, LIMITS.max_side, value=0, step=8, label="Height (0 = auto)"
                        )
                    with gr.Row():
                        seed = gr.Number(
                            value=RANDOM_SEED,
                            precision=0,
                            label="Seed (-1 = random)",
                            elem_id="seed",
                        )
                        randomize = gr.Button("🎲 Random", size="sm")
                        reuse = gr.Button("♻️ Reuse last", size="sm")
                    count = gr.Slider(1, LIMITS.max_images, value=1, step=1, label="Images")
                recipe_drop = gr.File(
                    label="Drop a Stencil PNG here to restore its settings",
                    file_types=[".png"],
                    type="filepath",
                    elem_id="recipe_drop",
                )
            with gr.Column(scale=6):
                gallery = gr.Gallery(
                    label="Results",
                    format="png",
                    elem_id="results",
                    columns=2,
                    height=520,
                    object_fit="contain",
                )
                maps = gr.Gallery(
                    label="Control maps used",
                    format="png",
                    columns=2,
                    height=200,
                    object_fit="contain",
                )
                used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                with gr.Accordion("Recipe", open=False):
                    recipe = gr.JSON(label="Recipe (also stored inside every PNG)")
                    snippet = gr.Code(label="Copy as Python (plain diffusers)", language="python")

        inputs = {
            "prompt": prompt,
            "negative_prompt": negative,
            "seed": seed,
            "steps": steps,
            "guidance_scale": guidance,
            "width": width,
            "height": height,
            "scheduler": scheduler,
            "num_images": count,
            "loras": loras,
        }
        for unit in units:
            inputs.update(unit.fields())

        accepts_fields(generate, inputs)
        run.click(
            on_gpu(generate, estimate),
            inputs_kwargs=inputs,
            outputs=[gallery, maps, used_seed, recipe, snippet],
            api_name="generate",
            concurrency_id=MODEL_QUEUE,
            concurrency_limit=1,
        )
        halt.click(stop, None, None, queue=False, api_visibility="private")
        randomize.click(lambda: RANDOM_SEED, None, seed, queue=False, api_visibility="private")
        reuse.click(lambda last: last, used_seed, seed, queue=False, api_visibility="private")

        first = units[0]
        preview_inputs = {
            k: v
            for k, v in first.fields().items()
            if not k.startswith(("conditioning_scale", "guidance_"))
        }
        accepts_fields(preview_control, preview_inputs)
        first.preview.click(
            preview_control,
            inputs_kwargs=preview_inputs,
            outputs=first.map,
            api_name="preview_control",
            concurrency_id=MODEL_QUEUE,
        )
        for unit in units[1:]:
            unit_inputs = {
                k.removesuffix(suffix(unit.position)): v
                for k, v in unit.fields().items()
                if not k.startswith(("conditioning_scale", "guidance_"))
            }
            unit.preview.click(
                preview_control,
                inputs_kwargs=unit_inputs,
                outputs=unit.map,
                concurrency_id=MODEL_QUEUE,
                api_visibility="private",
            )

        hidden = gr.JSON(visible=False)
        gr.Button(visible=False).click(list_loras, None, hidden, api_name="list_loras", queue=True)

        _wire_loras(service, slots, loras, triggers, add_triggers, prompt, lora_file)
        _wire_recipe_drop(service, recipe_drop, inputs)
        _examples(prompt, units[0])

    # api_open=False: direct HTTP calls must go through the queue like the page does.
    demo.queue(max_size=queue_size, api_open=False, default_concurrency_limit=1)
    return demo


def _wire_loras(service, slots, loras, triggers, add_triggers, prompt, lora_file):
    def compose(*values):
        pairs = zip(values[0::2], values[1::2])
        return ", ".join(f"{name}:{weight:g}" for name, weight in pairs if name)

    def trigger_words(request: gr.Request, *values):
        by_name = {e["name"]: e for e in service.list_loras(session_of(request))}
        words = [
            w
            for name in values[0::2]
            if name
            for w in by_name.get(name, {}).get("trigger_words", [])
        ]
        return ("**Trigger words:** " + ", ".join(words)) if words else ""

    def add_words(request: gr.Request, text: str, *values):
        by_name = {e["name"]: e for e in service.list_loras(session_of(request))}
        words = [
            w
            for name in values[0::2]
            if name
            for w in by_name.get(name, {}).get("trigger_words", [])
        ]
        missing = [w for w in words if w.lower() not in (text or "").lower()]
        return ", ".join(filter(None, [text.strip(), *missing]))

    def upload(path, request: gr.Request):
        if not path:
            return [gr.skip()] * len(slots)
        try:
            entry = service.add_lora_upload(path, session_of(request))
        except Exception as exc:
            raise user_error(exc) from None
        gr.Info(f"LoRA {entry['display_name']!r} added for this session as {entry['name']!r}")
        choices = [("None", "")] + [
            (e["display_name"], e["name"]) for e in service.list_loras(session_of(request))
        ]
        return [gr.update(choices=choices) for _ in slots]

    flat = [component for slot in slots for component in slot]
    for component in flat:
        component.change(compose, flat, loras, queue=False, api_visibility="private")
        component.change(trigger_words, flat, triggers, queue=False, api_visibility="private")
    add_triggers.click(add_words, [prompt, *flat], prompt, queue=False, api_visibility="private")
    lora_file.upload(upload, lora_file, [slot[0] for slot in slots], api_visibility="private")


def _wire_recipe_drop(service, recipe_drop, inputs):
    """Restore every setting a Stencil PNG carries (the control images are not stored)."""
    restorable = [
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "guidance_scale",
        "width",
        "height",
        "scheduler",
        "num_images",
        "loras",
    ]
    unit_keys = ["control_type", "conditioning_scale", "guidance_start", "guidance_end"]

    def restore(path):
        if not path:
            return [gr.skip()] * (len(restorable) + 2 * len(unit_keys))
        try:
            recipe = service.read_recipe(path)
        except Exception as exc:
            raise user_error(exc) from None
        values = {key: recipe.get(key) for key in restorable}
        values["loras"] = ", ".join(f"{x['name']}:{x['weight']:g}" for x in recipe["loras"])
        updates = [gr.update(value=values[key]) for key in restorable]
        controls = recipe.get("controls") or []
        for position in range(1, CONTROL_UNITS + 1):
            unit = controls[position - 1] if position <= len(controls) else None
            for key in unit_keys:
                if unit is None:
                    updates.append(
                        gr.update(value=NO_CONTROL) if key == "control_type" else gr.skip()
                    )
                else:
                    updates.append(gr.update(value=unit[key]))
        gr.Info("Settings restored from the image's recipe; upload the control image again.")
        return updates

    outputs = [inputs[key] for key in restorable]
    for position in range(1, CONTROL_UNITS + 1):
        outputs += [inputs[f"{key}{suffix(position)}"] for key in unit_keys]
    recipe_drop.upload(restore, recipe_drop, outputs, api_visibility="private")


def _examples(prompt, unit: ControlUnitView):
    rows = [
        ["a stone cottage in a misty forest, watercolor", "house.png", "canny"],
        ["a dancer on a stage, dramatic light", "figure.png", "pose"],
        ["a tunnel of light, photo", "tunnel.png", "depth"],
    ]
    present = [
        [text, str(EXAMPLES_DIR / image), control]
        for text, image, control in rows
        if (EXAMPLES_DIR / image).is_file()
    ]
    if present:
        gr.Examples(present, [prompt, unit.image, unit.control_type], cache_examples=False)
