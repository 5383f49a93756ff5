"""The Stencil page: Gradio Blocks only.

It talks to the engine through `StencilService` (plain values in and out). Every component
that carries a request or control-unit field is generated from the field declarations
(`service.fields`, see `pipelines/fields.py` and `pipelines/form.py`), and so is the API's
signature: a field added there appears here, in the API and in the recipe's restore.

Importing this module imports no torch: the engine (built by app.py) brings it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from pipelines.errors import GenerationCancelled, StencilError
from pipelines.families import FAMILIES
from pipelines.fields import LORA_WEIGHT, NO_CONTROL, RANDOM_SEED, SIZE_MULTIPLE
from pipelines.form import FormField, suffix
from pipelines.lora_text import split_lora_string
from pipelines.model_check import without_paths
from pipelines.settings import BUDGETS

if TYPE_CHECKING:
    from pipelines.service import StencilService

log = logging.getLogger(__name__)

# Every event that touches the model shares this id, so they run one at a time.
MODEL_QUEUE = "stencil-model"
PREVIEW_QUEUE = "stencil-preview"
# Hub LoRA fetches (page and API) run one at a time too, beside the model: each is bounded
# by the size cap, but many at once would take the server's bandwidth.
HUB_QUEUE = "stencil-hub-loras"
LORA_SLOTS = 3
EXAMPLES_DIR = Path(__file__).with_name("examples")
RESULT_OUTPUTS = 6  # images, control maps, seed used, recipe, snippet, live preview

RUN_LABEL = "Generate"
BUSY_LABEL = "Generating…"
# Ctrl+Enter (Cmd+Enter on a Mac) in the prompt or the negative prompt clicks Generate: the
# boxes are multi-line, so a plain Enter stays a new line. On a phone the columns stack and
# the results sit far below Generate, so tapping it brings the results (where the progress
# shows) into view.
PAGE_JS = """() => {
  if (window.stencilPage) return;
  window.stencilPage = true;
  document.addEventListener("click", (event) => {
    if (!event.target.closest || !event.target.closest("#generate")) return;
    if (window.innerWidth > PHONE_WIDTH) return;
    const results = document.querySelector("#results_column");
    if (results) results.scrollIntoView({block: "start"});
  }, true);
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    if (!event.target.closest || !event.target.closest("#prompt, #negative_prompt")) return;
    const button = document.querySelector("#generate");
    if (!button || button.disabled) return;
    event.preventDefault();
    button.click();
  }, true);
}""".replace("PHONE_WIDTH", "768")
# Size presets at the family's size: SD's at 512, SDXL's aspect buckets at 1024.
PRESETS_AT_512 = ((512, 512), (512, 768), (768, 512), (640, 448), (448, 640))
PRESETS_AT_1024 = ((1024, 1024), (832, 1216), (1216, 832), (1152, 896), (896, 1152))
AUTO_PRESET = "0x0"


def run_ready():
    """Generate as it is between runs (a fresh update each time: Gradio may consume it)."""
    return gr.update(value=RUN_LABEL, interactive=True)


def preview_hidden():
    return gr.update(value=None, visible=False)


def preview_box(preview):
    """The API's live-preview output as the page's box shows it: a picture opens the box
    (its caption says the step), None closes it, an update (a skip) passes through."""
    if isinstance(preview, dict):
        return preview
    if preview is None:
        return preview_hidden()
    return gr.update(value=preview, label=preview.info.get("caption", "Live preview"), visible=True)


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


@dataclass(frozen=True)
class LivePreview:
    """A run's images as they are at `step` of `steps` (one per sample of the request)."""

    images: list
    step: int
    steps: int

    @property
    def caption(self) -> str:
        return f"Live preview · step {self.step} of {self.steps}"

    def strip(self):
        """The samples side by side, as one picture for the page's preview box."""
        from PIL import Image

        width = sum(image.width for image in self.images)
        height = max(image.height for image in self.images)
        strip = Image.new("RGB", (width, height))
        left = 0
        for image in self.images:
            strip.paste(image, (left, 0))
            left += image.width
        strip.info["caption"] = self.caption  # the page's box label; not written to the PNG
        return strip


class BackgroundRun:
    """Runs `work(report)` in a thread of its own while the event handler yields.

    Gradio can only cancel a running event between two yields of a generator handler (it
    then closes the generator); a plain function would keep the model until it returns. So
    the handler yields at every progress report and at least every `HEARTBEAT_S`, and when
    it is closed early it cancels the work, which stops within one denoising step.
    """

    HEARTBEAT_S = 0.2

    def __init__(self, work) -> None:
        self._reports: queue.Queue = queue.Queue()
        self._outcome: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        try:
            self._outcome = work(
                lambda done, total, stage: self._reports.put((done, total, stage)),
                lambda images, step, steps: self._reports.put(LivePreview(images, step, steps)),
            )
        except BaseException as exc:  # handed to the handler's thread by result()
            self._error = exc
        finally:
            self._reports.put(None)

    def reports(self):
        """(done, total, stage) or a LivePreview as they come, or None at each heartbeat;
        ends with the work."""
        while True:
            try:
                report = self._reports.get(timeout=self.HEARTBEAT_S)
            except queue.Empty:
                yield None
                continue
            if report is None:
                return
            yield report

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._outcome


# ---- the one edge ------------------------------------------------------------------------


def user_error(exc: Exception) -> gr.Error:
    """StencilErrors carry their own message; anything else is logged, not shown raw."""
    if isinstance(exc, StencilError):
        # Messages name files by their names; a machine path never reaches a browser.
        return gr.Error(without_paths(str(exc)), print_exception=False)
    log.exception("unexpected error while serving a request")
    return gr.Error(
        f"Stencil hit an internal error ({type(exc).__name__}); the request was not "
        "completed and nothing else was affected. It has been logged.",
        print_exception=False,
    )


def at_the_edge(function):
    """Every event handler goes through here: a StencilError becomes the message the user
    sees, anything else is logged and reported without internals. Handlers parse their
    fields inside, so no parse error can slip past this."""

    if inspect.isgeneratorfunction(function):

        @functools.wraps(function)
        def generator_handler(*args, **kwargs):
            try:
                yield from function(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise user_error(exc) from None

        return generator_handler

    @functools.wraps(function)
    def handler(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise user_error(exc) from None

    return handler


def accepts_fields(function, fields: dict[str, FormField]):
    """Declare the fields as keyword parameters (with their defaults) of a `**fields` function.

    Gradio reads the signature to name API parameters and to learn which may be left out.
    """
    head = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    tail = [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=item.spec.default)
        for key, item in fields.items()
    ]
    function.__signature__ = inspect.Signature(head + tail)
    return function


def discard_gradio_copy(path: str | Path) -> None:
    """Delete Gradio's copy of an upload that Stencil stored itself (an upload is kept
    once). Only a file inside Gradio's cache folder is ever touched."""
    cache = Path(gr.utils.get_upload_folder()).resolve()
    file = Path(path).resolve()
    if not file.parent.is_relative_to(cache):
        return
    file.unlink(missing_ok=True)
    if file.parent != cache:
        with contextlib.suppress(OSError):  # Gradio keeps each upload in a folder of its own
            file.parent.rmdir()


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def lora_slot_choices(service: StencilService, session: str | None) -> list[tuple[str, str]]:
    """The LoRA slots' choices: none, the library, then the session's own LoRAs."""
    return [("None", "")] + [(e["display_name"], e["name"]) for e in service.list_loras(session)]


def added_message(entry: dict[str, Any]) -> str:
    verdict = f": {entry['verdict']}" if "verdict" in entry else ""
    return f"LoRA {entry['display_name']!r} added for this session as {entry['name']!r}{verdict}"


def status_markdown(status: dict[str, Any]) -> str:
    # "none" would read like "missing": say what each kind means.
    words = {"none": "needs no weights", "real": "real weights", "stand-in": "offline stand-in"}
    weights = ", ".join(
        f"{name}: {words.get(kind, kind)}" for name, kind in status["preprocessor_weights"].items()
    )
    line = (
        f"**Model:** {status['label']} · `{status['base']}` · {status['device']} / "
        f"{status['dtype']}  \n**ControlNets:** {status.get('controlnets', 'one per control')}"
        f"  \n**Preprocessor weights:** {weights}"
        f"  \n**Live preview:** {status.get('live_preview', 'off')}"
    )
    if status["notice"]:
        line = f"⚠️ **{status['notice']}**\n\n" + line
    return line


def family_shape(status: dict[str, Any]) -> tuple[int, str]:
    """The loaded family's native side (512 for SD 1.5, 1024 for SDXL) and architecture."""
    family = FAMILIES.get(status.get("family", ""))
    if family is not None:
        return family.default_size, family.architecture
    architecture = status.get("architecture") or (
        "sdxl" if "xl" in f"{status.get('family', '')} {status.get('label', '')}".lower() else "sd"
    )
    return (1024 if architecture == "sdxl" else 512), architecture


def size_presets(default_size: int, architecture: str = "sd") -> list[tuple[str, str]]:
    """The size dropdown's choices: auto, then the family's sizes (label, "WxH"): SD's,
    or SDXL's aspect buckets (the shapes it was trained at), scaled to the family's size."""
    if architecture == "sdxl":
        sizes = [(w * default_size // 1024, h * default_size // 1024) for w, h in PRESETS_AT_1024]
    else:
        sizes = [(w * default_size // 512, h * default_size // 512) for w, h in PRESETS_AT_512]

    def shape(width: int, height: int) -> str:
        return "square" if width == height else "portrait" if height > width else "landscape"

    choices = [("Auto (follow the control image)", AUTO_PRESET)]
    for width, height in sizes:
        width, height = (
            max(SIZE_MULTIPLE, v // SIZE_MULTIPLE * SIZE_MULTIPLE) for v in (width, height)
        )
        choices.append((f"{width} × {height} ({shape(width, height)})", f"{width}x{height}"))
    return choices


def apply_size_preset(preset: str | None):
    """A preset's "WxH" as the width and height sliders' values (nothing for no preset)."""
    if not preset:
        return gr.skip(), gr.skip()
    width, height = (int(side) for side in preset.split("x"))
    return width, height


def _entry_named(entries: list[dict[str, Any]], name: str | None) -> dict[str, Any] | None:
    return next((e for e in entries if e["name"] == name), None) if name else None


def lora_default_weight(entries: list[dict[str, Any]], name: str | None):
    """The weight a slot takes when `name` is picked in it: the catalogue's default weight."""
    entry = _entry_named(entries, name)
    if entry is None:
        return gr.skip()
    weight = float(entry.get("default_weight", LORA_WEIGHT.default))
    return min(max(weight, LORA_WEIGHT.minimum), LORA_WEIGHT.maximum)


def lora_slot_markdown(entries: list[dict[str, Any]], name: str | None, weight) -> str:
    """What a slot shows of its LoRA: description, licence, trigger words, the prompt tag."""
    entry = _entry_named(entries, name)
    if entry is None:
        return ""
    lines = []
    if entry.get("description"):
        lines.append(entry["description"])
    lines.append(f"**Licence:** {entry.get('licence') or 'not stated'}")
    words = entry.get("trigger_words") or []
    lines.append("**Trigger words:** " + (", ".join(f"`{w}`" for w in words) or "none"))
    shown = LORA_WEIGHT.default if weight is None else weight
    lines.append(f"**In a prompt:** `<lora:{entry['name']}:{float(shown):g}>`")
    return "  \n".join(lines)


# ---- components from declarations ----------------------------------------------------------


def component_for(item: FormField, *, choices=None, visible: bool = True):
    """The Gradio component a declared field gets: its label, help, bounds and default."""
    spec = item.spec
    common = {"label": spec.label, "visible": visible, "elem_id": item.key}
    if spec.help and spec.kind != "image":  # gr.Image has no help line
        common["info"] = spec.help
    widget = spec.page_widget
    if widget == "slider":
        return gr.Slider(
            spec.minimum,
            spec.maximum,
            value=spec.default,
            step=spec.step,
            precision=0 if spec.kind == "int" else None,
            **common,
        )
    if widget == "number":
        lowest = spec.minimum if spec.unset is None else min(spec.minimum, spec.unset)
        return gr.Number(
            value=spec.default,
            precision=0 if spec.kind == "int" else None,
            minimum=lowest,
            maximum=spec.maximum,
            **common,
        )
    if widget == "checkbox":
        return gr.Checkbox(value=spec.default, **common)
    if widget == "dropdown":
        return gr.Dropdown(choices or list(spec.choices), value=spec.default, **common)
    if widget == "textbox":
        return gr.Textbox(
            value=spec.default, lines=spec.lines, max_length=spec.max_length, **common
        )
    if widget == "image":
        return UploadedImage(type="filepath", sources=["upload", "clipboard"], height=260, **common)
    raise ValueError(f"field {item.key}: no component for widget {widget!r}")


class ControlUnitView:
    """One control unit's components, generated from its declared fields and the registry."""

    def __init__(self, position: int, fields: list[FormField], control_labels):
        self.position = position
        self.components: dict[str, Any] = {}
        self.params_of: dict[str, list[Any]] = {}
        by_group = _by_group(fields)
        s = suffix(position)
        with gr.Row():
            for item in by_group.get("unit", []):
                if item.spec.kind == "image":
                    self.components[item.key] = component_for(item)
            self.map = gr.Image(
                label="Control map",
                type="filepath",
                interactive=False,
                height=260,
                elem_id=f"control_map{s}",
            )
        for item in by_group.get("unit", []):
            if item.spec.kind != "image":
                self.components[item.key] = component_for(item, choices=control_labels)
        self.control_type = self.components[f"control_type{s}"]
        self.image = self.components[f"control_image{s}"]
        self.preview = gr.Button("Preview map", elem_id=f"preview{s}", size="sm")
        with gr.Group():
            for item in by_group.get("params", []):
                component = component_for(item, visible=False)
                self.components[item.key] = component
                self.params_of.setdefault(item.control, []).append(component)
        self.map_type = self.components[f"image_{_map_type_param()}{s}"]  # image as the map
        with gr.Accordion("Unit settings", open=False):
            for item in by_group.get("unit-settings", []):
                self.components[item.key] = component_for(item)
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


def _by_group(fields: list[FormField]) -> dict[str, list[FormField]]:
    groups: dict[str, list[FormField]] = {}
    for item in fields:
        groups.setdefault(item.spec.group, []).append(item)
    return groups


def _rows_of_two(fields: list[FormField], components: dict[str, Any]) -> None:
    for start in range(0, len(fields), 2):
        with gr.Row():
            for item in fields[start : start + 2]:
                components[item.key] = component_for(item)


# ---- the page --------------------------------------------------------------------------


def create_demo(service: StencilService, *, queue_size: int = 32) -> gr.Blocks:
    stops = StopTokens()
    status = service.status()
    fields = {item.key: item for item in service.fields}
    control_labels = [("None", NO_CONTROL)] + [
        (spec.label, name) for name, spec in _control_specs().items()
    ]

    @at_the_edge
    def generate(request: gr.Request, progress=gr.Progress(), **values):
        # Gradio registers a generator for /cancel only once its first step has returned;
        # a cancel during that step would leave the run going unseen. So the first step
        # starts nothing: the work begins on the second, when a cancel can close us.
        progress(0, desc="waiting for the model")
        yield (gr.skip(),) * RESULT_OUTPUTS
        session = session_of(request)
        token = stops.start(session)
        run = BackgroundRun(
            lambda report, show: service.generate(
                values, session_id=session, progress=report, cancel=token, preview=show
            )
        )
        try:
            for report in run.reports():
                if isinstance(report, LivePreview):
                    # The API gets the picture itself; the page shows it in its box.
                    yield (gr.skip(),) * (RESULT_OUTPUTS - 1) + (report.strip(),)
                    continue
                if report is not None:
                    done, total, stage = report
                    progress((done, total), desc=stage)
                yield (gr.skip(),) * RESULT_OUTPUTS  # where Gradio's cancel can stop us
            outcome = run.result()
        except GenerationCancelled as exc:
            gr.Warning(f"Stopped: {exc}")
            yield (gr.skip(),) * (RESULT_OUTPUTS - 1) + (None,)
            return
        finally:
            if not run.finished:  # closed by Gradio's cancel (or the Stop button)
                token.cancel()
            stops.finish(session, token)
        for warning in outcome.warnings:
            gr.Warning(warning)
        yield (
            list(zip(outcome.image_paths, outcome.image_captions)),
            list(zip(outcome.map_paths, outcome.map_captions)),
            outcome.seeds[0],
            outcome.recipe.to_dict(),
            service.python_snippet(outcome.recipe, outcome.map_paths),
            None,  # no preview once the result is here
        )

    def generate_on_page(request: gr.Request, progress=gr.Progress(), **values):
        """The API's run, plus a box beside the results: an error stays there, naming the
        unit or field, until the next run, and the previous results stay on the page
        (an error raised to Gradio would mark them and fade in 10 s)."""
        run = generate(request, progress, **values)
        # Generate says it is running until the run ends; every end restores it (a Stop
        # too, which closes this generator before it could: see `stop`). It stays
        # clickable: a Stop that lands before this first yield would otherwise leave it
        # disabled for good, where a stale label is put right by the next run's end.
        busy = gr.update(value=BUSY_LABEL)
        try:
            first = True
            for *outputs, preview in run:
                page = (gr.update(value="", visible=False), busy) if first else (gr.skip(),) * 2
                yield (*outputs, preview_box(preview), *page)
                first = False
            yield (gr.skip(),) * (RESULT_OUTPUTS + 1) + (run_ready(),)
        except gr.Error as exc:
            yield (gr.skip(),) * (RESULT_OUTPUTS - 1) + (
                preview_hidden(),
                gr.update(value=error_box_text(exc.message, fields.values()), visible=True),
                run_ready(),
            )
        finally:
            run.close()  # a Stop closes us; the run's own cleanup must follow at once

    def preview_for(position: int):
        """Unit `position`'s preview (its fields under the first unit's names): the map,
        and a warning that stays in view when the map came out empty."""

        @at_the_edge
        def preview_control(**values):
            preview = service.preview_control(values, position=position)
            if preview.note:
                gr.Warning(preview.note, duration=None)
            return preview.path

        return preview_control

    @at_the_edge
    def restore_recipe(path):
        if not path:
            raise StencilError("drop a Stencil PNG to restore its settings")
        return service.restore(path)

    def list_loras(request: gr.Request):
        return service.list_loras(session_of(request))

    def forget_session(request: gr.Request):
        """Run by `demo.unload` when a browser session closes."""
        service.forget_session(session_of(request))

    def stop(request: gr.Request):
        """The Stop button: the run's token, and the page as it is between runs."""
        stops.stop(session_of(request))
        return run_ready(), preview_hidden()

    lora_choices = lora_slot_choices(service, None)
    request_fields = [item for item in service.fields if item.unit is None]
    groups = _by_group(request_fields)
    components: dict[str, Any] = {}

    # Gradio's cache (uploads, its copies of results) expires by age (STENCIL_GRADIO_CACHE_*).
    delete_cache = BUDGETS.gradio_delete_cache
    with gr.Blocks(title="Stencil", analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown("# Stencil\nPrompt, control maps and LoRAs on one shared model.")
        gr.Markdown(status_markdown(status), elem_id="status")
        with gr.Row():
            with gr.Column(scale=5):
                for item in groups["prompt"]:
                    components[item.key] = component_for(item)
                with gr.Row():
                    run = gr.Button(RUN_LABEL, variant="primary", elem_id="generate")
                    halt = gr.Button("Stop", variant="stop", elem_id="stop")
                units = []
                with gr.Tabs():
                    for position in sorted({f.unit for f in service.fields if f.unit}):
                        with gr.Tab(f"Control {position}"):
                            unit_fields = [f for f in service.fields if f.unit == position]
                            unit = ControlUnitView(position, unit_fields, control_labels)
                            components.update(unit.components)
                            units.append(unit)
                    with gr.Tab("LoRAs"):
                        slots, slot_infos = [], []
                        for index in range(LORA_SLOTS):
                            with gr.Row():
                                name = gr.Dropdown(
                                    lora_choices,
                                    value="",
                                    label=f"LoRA {index + 1}",
                                    elem_id=f"lora_{index + 1}",
                                )
                                weight = gr.Slider(
                                    LORA_WEIGHT.minimum,
                                    LORA_WEIGHT.maximum,
                                    value=LORA_WEIGHT.default,
                                    step=LORA_WEIGHT.step,
                                    label=LORA_WEIGHT.label,
                                    info=LORA_WEIGHT.help,
                                    elem_id=f"lora_{index + 1}_weight",
                                )
                                info = gr.Markdown(elem_id=f"lora_{index + 1}_info")
                                thumbnail = gr.Image(
                                    show_label=False,
                                    interactive=False,
                                    visible=False,
                                    height=96,
                                    width=96,
                                    container=False,
                                    elem_id=f"lora_{index + 1}_preview",
                                )
                            slots.append((name, weight))
                            slot_infos.append((info, thumbnail))
                        triggers = gr.Markdown()
                        add_triggers = gr.Button("Add trigger words to the prompt", size="sm")
                        for item in groups["loras"]:
                            components[item.key] = component_for(item)
                        lora_file = gr.File(
                            label="Upload a LoRA (.safetensors)",
                            file_types=[".safetensors"],
                            type="filepath",
                        )
                        # Made only when the operator allows it (`--allow-hub-loras`).
                        hub_row = hub_lora_row() if service.hub_loras_allowed else None
                with gr.Accordion("Advanced", open=False):
                    advanced = groups["advanced"]
                    # The size row (presets, swap) sits under the width and height sliders.
                    cut = next(
                        (i + 1 for i, item in enumerate(advanced) if item.key == "height"),
                        len(advanced),
                    )
                    _rows_of_two(advanced[:cut], components)
                    with gr.Row():
                        size_preset = gr.Dropdown(
                            size_presets(*family_shape(status)),
                            value=None,
                            label="Size preset",
                            elem_id="size_preset",
                        )
                        swap_size = gr.Button("⇄ Swap width and height", elem_id="swap_size")
                    _rows_of_two(advanced[cut:], components)
                    with gr.Row():
                        randomize = gr.Button("🎲 Random seed", size="sm")
                        reuse = gr.Button("♻️ Reuse last seed", size="sm")
                recipe_drop = gr.File(
                    label="Drop a Stencil PNG here to restore its settings",
                    file_types=[".png"],
                    type="filepath",
                    elem_id="recipe_drop",
                )
            with gr.Column(scale=6, elem_id="results_column"):
                run_error = gr.Markdown(visible=False, elem_id="run_error")
                live_preview = gr.Image(
                    label="Live preview",
                    type="pil",
                    format="png",
                    interactive=False,
                    visible=False,
                    height=260,
                    elem_id="live_preview",
                )
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
                    elem_id="maps",
                    columns=2,
                    height=200,
                    object_fit="contain",
                )
                # Send a result, or a map, to a control unit without downloading it.
                picked_result, picked_map = gr.State(0), gr.State(0)
                positions = [unit.position for unit in units]
                with gr.Row():
                    send_result = {
                        p: gr.Button(f"Result → Control {p}", size="sm", elem_id=f"result_to_{p}")
                        for p in positions
                    }
                    send_map = {
                        p: gr.Button(f"Map → Control {p}", size="sm", elem_id=f"map_to_{p}")
                        for p in positions
                    }
                used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                with gr.Accordion("This session's results", open=False):
                    history_items = gr.State([])
                    history = gr.Gallery(
                        label="Click one to restore its settings",
                        elem_id="history",
                        columns=6,
                        height=180,
                        object_fit="contain",
                        allow_preview=False,
                    )
                with gr.Accordion("Recipe", open=False):
                    recipe = gr.JSON(label="Recipe (also stored inside every PNG)")
                    snippet = gr.Code(label="Copy as Python (plain diffusers)", language="python")

        inputs = {key: components[key] for key in fields}
        accepts_fields(generate, fields)
        accepts_fields(generate_on_page, fields)
        results = [gallery, maps, used_seed, recipe, snippet, live_preview]
        # Gradio only holds the connections: the engine's scheduler decides what runs on
        # the model and in which order (fair turns, caps, batches), so every waiting
        # request must reach it, with its place in line shown as progress.
        model_queue = {"concurrency_id": MODEL_QUEUE, "concurrency_limit": queue_size + 1}
        generating = run.click(
            generate_on_page,
            inputs_kwargs=inputs,
            outputs=[*results, run_error, run],
            api_visibility="private",
            **model_queue,
        )
        # The API's /generate: the same run, its errors raised to the caller.
        gr.Button(visible=False).click(
            generate,
            inputs_kwargs=inputs,
            outputs=results,
            api_name="generate",
            **model_queue,
        )
        # Gradio's cancel takes a queued run out of the queue and closes a running one; the
        # token reaches the engine at once (the page's Stop and the API's Job.cancel() meet).
        halt.click(
            stop, None, [run, live_preview], queue=False, api_visibility="private",
            cancels=[generating],
        )  # fmt: skip
        demo.load(None, None, None, js=PAGE_JS, api_visibility="private")
        _wire_send_to_units(units, gallery, maps, recipe, picked_result, picked_map,
                            send_result, send_map)  # fmt: skip
        width, height = components["width"], components["height"]
        size_preset.input(
            apply_size_preset, size_preset, [width, height], queue=False, api_visibility="private"
        )
        swap_size.click(
            lambda w, h: (h, w), [width, height], [width, height], queue=False,
            api_visibility="private",
        )  # fmt: skip
        seed = components["seed"]
        randomize.click(lambda: RANDOM_SEED, None, seed, queue=False, api_visibility="private")
        reuse.click(lambda last: last, used_seed, seed, queue=False, api_visibility="private")

        _wire_previews(units, fields, components, preview_for)

        hidden = gr.JSON(visible=False)
        gr.Button(visible=False).click(list_loras, None, hidden, api_name="list_loras", queue=True)
        recipe_file = gr.File(visible=False, file_types=[".png"], type="filepath")
        gr.Button(visible=False).click(
            restore_recipe, recipe_file, gr.JSON(visible=False), api_name="restore_recipe"
        )

        extra_loras = gr.State("")
        _wire_loras(service, slots, extra_loras, components["loras"], triggers, add_triggers,
                    components["prompt"], lora_file, slot_infos)  # fmt: skip
        _wire_hub_loras(service, slots, hub_row)
        restore, restore_outputs = _wire_recipe_drop(
            restore_recipe, recipe_drop, inputs, slots, extra_loras, lora_choices
        )
        _wire_history(generating, gallery, history, history_items, restore, restore_outputs)
        _examples(components["prompt"], units[0], status["family"])
        demo.unload(forget_session)

    # api_open=False: direct HTTP calls must go through the queue like the page does.
    demo.queue(max_size=queue_size, api_open=False, default_concurrency_limit=1)
    return demo


def _map_type_param() -> str:
    from pipelines.controls import MAP_TYPE

    return MAP_TYPE.name


def _control_specs():
    from pipelines.controls import CONTROLS

    return CONTROLS


def _preview_keys(fields: dict[str, FormField], position: int) -> list[str]:
    """A unit's fields that shape its map: the type, the image, the detection resolution
    and the preprocessor's parameters (not its strength or window)."""
    shaping = {"control_type", "control_image", "control_resolution"}
    return [
        key
        for key, item in fields.items()
        if item.unit == position and (item.is_param or item.declared.name in shaping)
    ]


def _wire_previews(units, fields, components, preview_for) -> None:
    for unit in units:
        keys = _preview_keys(fields, unit.position)
        # The API's /preview_control takes the first unit's names; unit 2 maps onto them.
        as_first = {key.removesuffix(suffix(unit.position)): components[key] for key in keys}
        preview_control = preview_for(unit.position)
        if unit.position == 1:
            accepts_fields(preview_control, {key: fields[key] for key in keys})
        unit.preview.click(
            preview_control,
            inputs_kwargs=as_first,
            outputs=unit.map,
            api_name="preview_control" if unit.position == 1 else None,
            api_visibility="public" if unit.position == 1 else "private",
            concurrency_id=PREVIEW_QUEUE,  # preprocessors, one at a time, beside generation
        )
        # The map follows its inputs, so the page never shows a map other than the one a
        # run would use. "always_last" is the debounce: while a preview runs, only the
        # newest of the changes made meanwhile runs next.
        follow = {
            "fn": quiet_preview(preview_control),
            "inputs_kwargs": as_first,
            "outputs": unit.map,
            "api_visibility": "private",
            "concurrency_id": PREVIEW_QUEUE,
            "trigger_mode": "always_last",
            "show_progress": "minimal",
        }
        for key in keys:
            component = components[key]
            # The image also when set by the page (a result or map sent to this unit).
            (component.change if isinstance(component, gr.Image) else component.input)(**follow)


def quiet_preview(preview_control):
    """The preview, run on its own only when there is a map to make: a unit that is off or
    has no image yet keeps its map box as it is, without a message."""

    def refresh(**values):
        if values.get("control_type") in (None, NO_CONTROL) or not values.get("control_image"):
            return gr.skip()
        return preview_control(**values)

    return refresh


def _wire_loras(
    service, slots, extra_loras, loras, triggers, add_triggers, prompt, lora_file, infos
):
    """The slots compose the LoRA text; LoRAs a restored recipe had beyond the slots (kept in
    `extra_loras`) stay in it when a slot changes. Picking a LoRA sets its slot's weight to
    the catalogue's default weight; each slot shows what its LoRA is and its prompt tag."""

    def compose(extras: str, *values):
        pairs = zip(values[0::2], values[1::2])
        chosen = [f"{name}:{weight:g}" for name, weight in pairs if name]
        return ", ".join(filter(None, [*chosen, extras]))

    def words_for(request: gr.Request, values) -> list[str]:
        by_name = {e["name"]: e for e in service.list_loras(session_of(request))}
        names = [name for name in values[0::2] if name]
        return [w for name in names for w in by_name.get(name, {}).get("trigger_words", [])]

    def trigger_words(request: gr.Request, *values):
        words = words_for(request, values)
        lines = ["**Trigger words:** " + ", ".join(words)] if words else []
        # Each chosen LoRA's pre-flight verdict (format, ranks, how it is applied).
        by_name = {e["name"]: e for e in service.list_loras(session_of(request))}
        lines += [
            f"**{by_name[n]['display_name']}:** {by_name[n]['verdict']}"
            for n in values[0::2]
            if n and "verdict" in by_name.get(n, {})
        ]
        return "\n\n".join(lines)

    def add_words(request: gr.Request, text: str, *values):
        missing = [w for w in words_for(request, values) if w.lower() not in (text or "").lower()]
        return ", ".join(filter(None, [text.strip(), *missing]))

    @at_the_edge
    def upload(path, request: gr.Request):
        if not path:
            return [gr.skip()] * len(slots)
        try:
            entry = service.add_lora_upload(path, session_of(request))
        finally:
            discard_gradio_copy(path)  # Stencil keeps its own copy, for the session's life
        gr.Info(added_message(entry))
        choices = lora_slot_choices(service, session_of(request))
        return [gr.update(choices=choices) for _ in slots]

    def default_weight(request: gr.Request, name: str):
        return lora_default_weight(service.list_loras(session_of(request)), name)

    def slot_markdown(request: gr.Request, name: str, weight):
        return lora_slot_markdown(service.list_loras(session_of(request)), name, weight)

    flat = [component for slot in slots for component in slot]

    def slot_thumbnail(name: str):
        image = service.lora_preview(name)
        return gr.update(value=image, visible=image is not None)

    for (name, weight), (info, thumbnail) in zip(slots, infos, strict=True):
        name.change(slot_thumbnail, name, thumbnail, queue=False, api_visibility="private")
        # The weight is set first, so the composed text carries the default weight.
        name.input(default_weight, name, weight, queue=False, api_visibility="private").then(
            compose, [extra_loras, *flat], loras, queue=False, api_visibility="private"
        )
        weight.input(compose, [extra_loras, *flat], loras, queue=False, api_visibility="private")
        for component in (name, weight):
            component.change(
                slot_markdown, [name, weight], info, queue=False, api_visibility="private"
            )
    for component in flat:
        component.change(trigger_words, flat, triggers, queue=False, api_visibility="private")
    add_triggers.click(add_words, [prompt, *flat], prompt, queue=False, api_visibility="private")
    lora_file.upload(upload, lora_file, [slot[0] for slot in slots], api_visibility="private")


def hub_lora_row():
    """The page's "LoRA from the Hub" controls: the repository, the file, the button."""
    with gr.Row(elem_id="hub_lora"):
        repo = gr.Textbox(
            label="LoRA from the Hub: owner/name",
            info="A public repository; only its .safetensors file is fetched, for you only.",
            placeholder="owner/name",
            max_lines=1,
            max_length=200,
            elem_id="hub_repo",
            scale=3,
        )
        file = gr.Textbox(
            label="File in it",
            info="Only when it holds several .safetensors files.",
            placeholder="path/in/repo.safetensors",
            max_lines=1,
            max_length=256,
            elem_id="hub_file",
            scale=3,
        )
        add = gr.Button("Add from the Hub", elem_id="hub_add", scale=1)
    return repo, file, add


def _wire_hub_loras(service, slots, hub_row) -> None:
    """`/add_hub_lora` exists whatever the setting, so an API client learns why it is
    refused; the page's row (`hub_row`) exists only when Hub LoRAs are allowed."""

    @at_the_edge
    def add_hub_lora(hub_repo: str, hub_file: str = "", request: gr.Request = None):
        return service.add_hub_lora(hub_repo, hub_file, session_of(request))

    @at_the_edge
    def add_from_page(hub_repo: str, hub_file: str, request: gr.Request):
        entry = service.add_hub_lora(hub_repo, hub_file, session_of(request))
        gr.Info(added_message(entry))
        choices = lora_slot_choices(service, session_of(request))
        return [gr.update(choices=choices) for _ in slots]

    gr.Button(visible=False).click(
        add_hub_lora,
        [gr.Textbox(visible=False), gr.Textbox("", visible=False)],  # hub_file optional
        gr.JSON(visible=False),
        api_name="add_hub_lora",
        concurrency_id=HUB_QUEUE,
    )
    if hub_row is not None:
        repo, file, add = hub_row
        add.click(
            add_from_page,
            [repo, file],
            [slot[0] for slot in slots],
            api_visibility="private",
            concurrency_id=HUB_QUEUE,
        )


def _wire_recipe_drop(restore_recipe, recipe_drop, inputs, slots, extra_loras, lora_choices):
    """Restore every recorded setting of a Stencil PNG (control images are not stored)."""
    restorable = [key for key, component in inputs.items() if not isinstance(component, gr.Image)]
    slot_names = {value for _, value in lora_choices if value}

    def restore(path):
        if not path:
            return [gr.skip()] * (len(restorable) + 2 * len(slots) + 1)
        values = restore_recipe(path)
        updates = [gr.update(value=values[k]) if k in values else gr.skip() for k in restorable]
        pairs = split_lora_string(values.get("loras", ""))  # restored: always with weights
        in_slots = [pair for pair in pairs if pair[0] in slot_names][: len(slots)]
        extras = [f"{name}:{weight:g}" for name, weight in pairs if (name, weight) not in in_slots]
        for index in range(len(slots)):
            name, weight = in_slots[index] if index < len(in_slots) else ("", LORA_WEIGHT.default)
            updates += [gr.update(value=name), gr.update(value=weight)]
        updates.append(", ".join(extras))
        gr.Info("Settings restored from the image's recipe; upload the control images again.")
        return updates

    outputs = [inputs[key] for key in restorable]
    outputs += [component for slot in slots for component in slot] + [extra_loras]
    recipe_drop.upload(restore, recipe_drop, outputs, api_visibility="private")
    return restore, outputs


HISTORY_SIZE = 24  # results kept in a session's history, newest first


def add_to_history(results, history):
    """The run's results put in front of the session's history (each once), at most
    HISTORY_SIZE; returned twice: for the history gallery and the state behind it."""
    known = {path for path, _ in history or []}
    new = [item for item in _gallery_items(results) if item[0] not in known]
    kept = (new + list(history or []))[:HISTORY_SIZE]
    return kept, kept


def _gallery_items(gallery) -> list[tuple[str, str]]:
    items = []
    for index, item in enumerate(gallery or []):
        path = _gallery_path(gallery, index)
        caption = (
            item.get("caption")
            if isinstance(item, dict)
            else (item[1] if isinstance(item, (list, tuple)) and len(item) > 1 else None)
        )
        if path:
            items.append((path, caption or ""))
    return items


def _wire_history(generating, gallery, history, history_items, restore, restore_outputs):
    private = {"queue": False, "api_visibility": "private"}
    generating.success(
        add_to_history, [gallery, history_items], [history, history_items], **private
    )

    def restore_picked(items, event: gr.SelectData):
        index = event.index if isinstance(event.index, int) else -1
        if not items or not 0 <= index < len(items):
            return restore(None)
        return restore(items[index][0])

    history.select(restore_picked, history_items, restore_outputs, api_visibility="private")


# prompt, control image, control type, and the map's type when the image is the map.
EXAMPLES = [
    ["a stone cottage in a misty forest, watercolor", "house.png", "canny", "canny"],
    ["a dancer on a stage, dramatic light", "figure.png", "pose", "canny"],
    ["a tunnel of light, photo", "tunnel.png", "depth", "canny"],
]
# The offline tiny models draw only what they were trained on: prompts and maps they know.
TINY_FAMILIES = ("tiny", "tiny-xl")
TINY_EXAMPLES = [
    ["a green square on a white background", "tiny-square.png", "canny", "canny"],
    ["a yellow triangle on a black background", "tiny-triangle-depth.png", "image", "depth"],
    ["a red figure on a blue background", "tiny-figure-pose.png", "image", "pose"],
]


def error_box_text(message: str, fields) -> str:
    """The error as the box beside the results shows it, the field it names put as the page
    labels it ("Control 2 · Control image" for control_image_2)."""
    place = ""
    for item in sorted(fields, key=lambda item: -len(item.key)):  # longest key first
        if message.startswith((f"{item.key}:", f"{item.key}=")):
            unit = f"Control {item.unit} · " if item.unit else ""
            place = f"**{unit}{item.spec.label}**: "
            break
    return f"⚠️ Not generated. {place}{message}\n\nYour previous results are kept."


def picked_index(event: gr.SelectData) -> int:
    return event.index if isinstance(event.index, int) else 0


def result_for_unit(gallery, index):
    """The picked result (or the first) as a unit's photo; nothing changes without one."""
    path = _gallery_path(gallery, index)
    return gr.skip() if path is None else path


def map_for_unit(maps, index, recipe):
    """The picked control map as a unit's own map: its image, "use my image as the map",
    and the map type the recipe says it was (a drawn map keeps the type it was given)."""
    path = _gallery_path(maps, index)
    if path is None:
        return gr.skip(), gr.skip(), gr.skip()
    from pipelines.controls import MAP_TYPE, map_type_of

    units = (recipe or {}).get("controls") or []
    unit = units[index] if isinstance(index, int) and index < len(units) else {}
    map_type = map_type_of(unit.get("control_type", MAP_TYPE.default), unit.get("params"))
    return path, "image", map_type


def _gallery_path(gallery, index) -> str | None:
    items = list(gallery or [])
    if not items:
        return None
    item = items[index if isinstance(index, int) and 0 <= index < len(items) else 0]
    if isinstance(item, dict):
        item = item.get("image", item)
    if isinstance(item, (list, tuple)):
        item = item[0]
    if isinstance(item, dict):
        item = item.get("path")
    return str(item) if item else None


def _wire_send_to_units(units, gallery, maps, recipe, picked_result, picked_map, to_result, to_map):
    private = {"queue": False, "api_visibility": "private"}
    gallery.select(picked_index, None, picked_result, **private)
    maps.select(picked_index, None, picked_map, **private)
    # A new run shows its first image and map as picked, as the galleries do.
    gallery.change(lambda: 0, None, picked_result, **private)
    maps.change(lambda: 0, None, picked_map, **private)
    for unit in units:
        to_result[unit.position].click(
            result_for_unit, [gallery, picked_result], unit.image, **private
        )
        to_map[unit.position].click(
            map_for_unit,
            [maps, picked_map, recipe],
            [unit.image, unit.control_type, unit.map_type],
            **private,
        )


def _examples(prompt, unit: ControlUnitView, family: str):
    rows = TINY_EXAMPLES if family in TINY_FAMILIES else EXAMPLES
    present = [
        [text, str(EXAMPLES_DIR / image), control, map_type]
        for text, image, control, map_type in rows
        if (EXAMPLES_DIR / image).is_file()
    ]
    if present:
        gr.Examples(
            present, [prompt, unit.image, unit.control_type, unit.map_type], cache_examples=False
        )
