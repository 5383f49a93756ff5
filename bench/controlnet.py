"""ControlNet benchmark: Stencil's one shared model against the plain diffusers habit.

    .venv/bin/python bench/controlnet.py [--sizes tiny,real] [--repeats N]

Writes bench/results/controlnet.md (or `--output PATH`) and prints it.
Two sizes, each compared side by side:

- tiny: Stencil's built-in tiny family (float32), served by the real `Engine`.
- real: Stable Diffusion 1.5's exact shapes with seeded random weights (bfloat16, built once
  into .cache/bench/sd15-random by `common.ensure_sd15_random`), also served by the real
  `Engine`: `Engine.start(folder)` loads the base as a local-folder family, and the
  registry's sd15 ControlNet ids (lllyasviel/control_v11p_sd15_canny, ...) resolve, offline,
  through a Hugging Face cache private to the benchmark whose snapshots are symlinks to
  the random ControlNets. Nothing in the engine is patched or re-implemented.

The "Stencil way" is always the engine's own code: `engine.generate(request)` end to end,
and `engine._compose(request, maps)` for "a pipeline ready to run" (the ControlNet comes
from the engine's cache; `from_pipe` shares UNet, VAE and text encoder; a fresh scheduler).
The "diffusers habit" loads `ControlNetModel.from_pretrained(cn_folder)` and
`StableDiffusionControlNetPipeline.from_pretrained(base_folder, controlnet=...)` for every
request (same files, same dtype, Euler a scheduler like the engine's default), then calls it
as a plain script does (one map, one generator). Whenever the benchmark runs a pipeline the
Stencil way it goes through the engine's own call, `Engine._run`, never a copy of its
arguments. Control maps are made once, before timing, for both sides.

1. Switching control type per request (shuffled canny/pose/depth): time to a ready
   pipeline, time end to end, and memory (PSS, in a fresh process per approach).
2. Memory of base + 3 ControlNets: shared views vs three separate pipelines, by unique
   weight storage (data_ptr) and by PSS after touching every weight (fresh processes).
3. Denoising with control_guidance_end=0.5: `WindowedMultiControlNet` (skips the ControlNet
   outside the window) vs diffusers' `MultiControlNetModel` (runs it, multiplies by 0),
   with the latents and images asserted bit-identical.

`--probe NAME --size SIZE` runs one memory probe and prints JSON; the benchmark starts
those itself in fresh interpreters.
"""

from __future__ import annotations

import datetime
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
from common import (
    BENCH_CACHE,
    RESULTS,
    Case,
    Comparison,
    bytes_text,
    interleave,
    markdown_table,
    median,
    memory_growth,
    memory_snapshot,
    pipeline_modules,
    ratio_text,
    seconds_text,
    touch_weights,
    unique_tensor_bytes,
)

CONTROL_TYPES = ("canny", "pose", "depth")
PROMPT = "a robot standing in a garden, detailed"
SEED = 1234
RESULTS_FILE = RESULTS / "controlnet.md"
PROBES = ("switch-stencil", "switch-diffusers", "hold-shared", "hold-separate")


@dataclass(frozen=True)
class Size:
    name: str
    label: str
    dtype: str
    side: int  # output width and height in pixels (the latent is side / 8)
    request_steps: int  # denoising steps of the end-to-end switching requests
    window_steps: int  # denoising steps of the control-window measurement
    ready_per_type: int  # requests of each type per shuffled block, time to a ready pipeline
    request_per_type: int  # the same, end to end (and in the memory probes)
    window_runs: int  # runs per side per repeat in the window measurement
    # torch threads: 1 by default, because ratios need steady timings more than fast ones,
    # and several OpenMP threads stall whenever another process takes a core of a shared
    # machine (see bench/README.md). --threads overrides it.
    threads: int = 1


SIZES = {
    "tiny": Size("tiny", "tiny family", "float32", 64, 2, 8, 4, 4, 5),
    "real": Size("real", "SD 1.5 shapes, random weights", "bfloat16", 256, 1, 2, 2, 1, 1),
}


# ---- the model, the requests, the two ways -------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    base: Path
    controlnets: dict[str, Path]


def model_files(size: Size) -> ModelFiles:
    """The folders both approaches load from (the engine reads the very same files)."""
    if size.name == "tiny":
        from pipelines.tiny import ensure_tiny_family

        base = ensure_tiny_family(BENCH_CACHE)
    else:
        from pipelines.controls import CONTROLS

        base = common.ensure_sd15_random(BENCH_CACHE, CONTROL_TYPES)
        for kind in CONTROL_TYPES:
            repo_id = CONTROLS[kind].controlnets["sd15"]
            common.link_into_hub_cache(base / f"controlnet-{kind}", repo_id)
    return ModelFiles(base, {kind: base / f"controlnet-{kind}" for kind in CONTROL_TYPES})


def base_dtype(engine) -> str:
    """The dtype the engine's shared UNet holds right now."""
    return str(engine.base.unet.dtype).removeprefix("torch.")


def start_engine(size: Size, files: ModelFiles):
    from pipelines.engine import Engine
    from pipelines.families import FAMILIES

    if size.name == "tiny":
        return Engine(FAMILIES["tiny"], cache_root=BENCH_CACHE, dtype=size.dtype)
    return Engine.start(str(files.base), cache_root=BENCH_CACHE, dtype=size.dtype)


def photo(side: int):
    """A synthetic photo with edges and depth cues: a figure, a box and a ball."""
    import cv2
    import numpy as np
    from PIL import Image

    canvas = np.full((side, side, 3), 40, np.uint8)
    s = side / 64
    cv2.rectangle(canvas, (int(6 * s), int(30 * s)), (int(26 * s), int(58 * s)), (230,) * 3, -1)
    cv2.circle(canvas, (int(44 * s), int(18 * s)), int(7 * s), (200, 120, 60), -1)
    cv2.line(canvas, (int(44 * s), int(25 * s)), (int(44 * s), int(45 * s)), (250,) * 3, 2)
    for dx in (-8, 8):
        cv2.line(canvas, (int(44 * s), int(45 * s)), (int((44 + dx) * s), int(60 * s)), (250,) * 3)
        cv2.line(canvas, (int(44 * s), int(30 * s)), (int((44 + dx) * s), int(38 * s)), (250,) * 3)
    return Image.fromarray(canvas)


def make_request(size: Size, kind: str, *, steps: int, guidance_end: float = 1.0):
    from pipelines.requests import ControlUnit, GenerationRequest

    unit = ControlUnit(kind, photo(size.side), guidance_end=guidance_end, resolution=size.side)
    return GenerationRequest(
        prompt=PROMPT,
        seed=SEED,
        steps=steps,
        width=size.side,
        height=size.side,
        controls=(unit,),
    )


def control_map(request):
    """The map exactly as `Engine.control_map` makes it, without needing an engine."""
    from pipelines import controls
    from pipelines.images import to_rgb

    unit = request.controls[0]
    return controls.make_map(
        unit.control_type, to_rgb(unit.image), unit.resolution, unit.param_dict
    )


def diffusers_pipeline(size: Size, files: ModelFiles, kind: str):
    """The plain diffusers habit: load base and ControlNet from disk for this request."""
    import torch
    from diffusers import (
        ControlNetModel,
        EulerAncestralDiscreteScheduler,
        StableDiffusionControlNetPipeline,
    )

    dtype = getattr(torch, size.dtype)
    controlnet = ControlNetModel.from_pretrained(
        files.controlnets[kind], torch_dtype=dtype, use_safetensors=True
    )
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        files.base,
        controlnet=controlnet,
        torch_dtype=dtype,
        use_safetensors=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def engine_call(engine, pipe, request, maps, *, latents: bool = False):
    """Run `pipe` through the engine's own call (`Engine._run`: the arguments it derives from
    the request, its generators, its step callback), so no argument is restated here.

    `latents=True` stops before the VAE decode, so a timing covers only the denoising loop.
    """
    import torch

    from pipelines.engine import _Work

    runnable = _LatentOutput(pipe) if latents else pipe
    work = _Work(request, request.prompt, (), (request.seed,), request.width, request.height, maps)
    outputs = engine._run(runnable, [work], [(work, 0)], None)
    return torch.stack(outputs) if latents else outputs


class _LatentOutput:
    """`pipe`, called with output_type="latent": the engine's call then returns latents."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __call__(self, **options):
        return self._pipe(**options, output_type="latent")


def habit_call(pipe, request, control_image):
    """What a plain single-ControlNet diffusers script passes: one image, one generator."""
    import torch

    with torch.inference_mode():
        return pipe(
            request.prompt,
            image=control_image,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=request.width,
            height=request.height,
            generator=torch.Generator(device="cpu").manual_seed(request.seed),
        ).images


def shuffled_sequence(per_type: int, repeats: int) -> list[str]:
    rng = random.Random(2026)
    sequence: list[str] = []
    for _ in range(repeats):
        block = list(CONTROL_TYPES) * per_type
        rng.shuffle(block)
        sequence += block
    return sequence


# ---- 1. switching control type per request -----------------------------------------------


def measure_switching(size: Size, files: ModelFiles, engine, repeats: int) -> dict[str, Any]:
    ready_requests = {k: make_request(size, k, steps=size.request_steps) for k in CONTROL_TYPES}
    maps = {kind: control_map(request) for kind, request in ready_requests.items()}

    # First use of each control type: the engine loads that ControlNet once, then keeps it.
    first_use = []
    for request in ready_requests.values():
        started = time.perf_counter()
        engine.controlnet(engine.controlnet_ref(request.controls[0]))
        first_use.append(time.perf_counter() - started)
    # Warm both paths (page cache, lazy imports, the engine's map cache) before timing.
    for request in ready_requests.values():
        engine.generate(request)
    warm = diffusers_pipeline(size, files, "canny")
    habit_call(warm, ready_requests["canny"], maps["canny"])
    del warm

    ready = interleave(
        {
            "diffusers": Case(run=lambda kind: diffusers_pipeline(size, files, kind)),
            "stencil": Case(run=lambda kind: engine._compose(ready_requests[kind], [maps[kind]])),
        },
        shuffled_sequence(size.ready_per_type, repeats),
    )

    images: dict[tuple[str, str], bytes] = {}

    def keep(name):
        def finish(kind, image):
            images.setdefault((name, kind), image.tobytes())

        return finish

    def diffusers_request(kind):
        pipe = diffusers_pipeline(size, files, kind)
        return habit_call(pipe, ready_requests[kind], maps[kind])[0]

    end_to_end = interleave(
        {
            "diffusers": Case(run=diffusers_request, finish=keep("diffusers")),
            "stencil": Case(
                run=lambda kind: engine.generate(ready_requests[kind]).images[0],
                finish=keep("stencil"),
            ),
        },
        shuffled_sequence(size.request_per_type, repeats),
    )
    same = all(images[("stencil", k)] == images[("diffusers", k)] for k in CONTROL_TYPES)
    return {
        "first_use": first_use,
        "ready": Comparison(ready["diffusers"], ready["stencil"]),
        "end_to_end": Comparison(end_to_end["diffusers"], end_to_end["stencil"]),
        "same_image": same,
    }


# ---- 3. a half-length control window --------------------------------------------------------


class CallCounter:
    """Counts forward passes of a module while attached."""

    def __init__(self, module):
        self.calls = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def detach(self) -> int:
        self._handle.remove()
        return self.calls


def measure_window(size: Size, engine, repeats: int) -> list[dict[str, Any]]:
    import torch
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from pipelines.schedulers import get_scheduler_spec

    rows = []
    for guidance_end in (0.5, 1.0):
        request = make_request(size, "canny", steps=size.window_steps, guidance_end=guidance_end)
        maps = [control_map(request)]
        net = engine.controlnet(engine.controlnet_ref(request.controls[0]))

        def plain_view(_item, request=request, net=net):
            """The engine's composition with diffusers' MultiControlNetModel instead.

            from_pipe casts the shared modules to `torch_dtype` (float32 if not given): pass
            the dtype they hold now, so this view changes nothing of the engine's state.
            """
            scheduler = get_scheduler_spec(request.scheduler).build(engine.base.scheduler.config)
            pipe = engine.family.pipeline_class("controlnet").from_pipe(
                engine.base,
                controlnet=MultiControlNetModel([net]),
                scheduler=scheduler,
                torch_dtype=engine.base.unet.dtype,
            )
            pipe.set_progress_bar_config(disable=True)
            return pipe

        latents: dict[str, list[Any]] = {"plain": [], "windowed": []}

        def case(name, prepare, request=request, maps=maps, latents=latents):
            return Case(
                prepare=prepare,
                run=lambda pipe: engine_call(engine, pipe, request, maps, latents=True),
                finish=lambda _item, out: latents[name].append(out.clone()),
            )

        def windowed_view(_item, request=request, maps=maps):
            return engine._compose(request, maps)

        engine_call(engine, windowed_view(None), request, maps, latents=True)  # warm-up
        seconds = interleave(
            {"plain": case("plain", plain_view), "windowed": case("windowed", windowed_view)},
            range(repeats * size.window_runs),
        )
        reference = latents["plain"][0]
        latents_equal = all(torch.equal(x, reference) for xs in latents.values() for x in xs)

        # Images: the engine's own generate (windowed) against the plain view's, decoded.
        counter = CallCounter(net)
        engine_image = engine.generate(request).images[0]
        windowed_calls = counter.detach()
        counter = CallCounter(net)
        plain_image = engine_call(engine, plain_view(None), request, maps)[0]
        plain_calls = counter.detach()
        images_equal = engine_image.tobytes() == plain_image.tobytes()
        assert latents_equal, f"window {guidance_end}: latents differ between the two ways"
        assert images_equal, f"window {guidance_end}: images differ between the two ways"
        rows.append(
            {
                "guidance_end": guidance_end,
                "steps": request.steps,
                "times": Comparison(seconds["plain"], seconds["windowed"]),
                "calls": (windowed_calls, plain_calls),
                "latents_equal": latents_equal,
                "images_equal": images_equal,
            }
        )
    return rows


# ---- 1 and 2, memory: probes in fresh processes ---------------------------------------------


def probe(name: str, size: Size) -> dict[str, Any]:
    """One memory measurement in this (fresh) process; returns numbers for the report."""
    import torch

    torch.set_num_threads(size.threads)
    files = model_files(size)
    # Import what either side will use before the first reading, so that code counts on
    # neither side (diffusers imports pipeline modules lazily).
    import diffusers

    import pipelines.engine
    import pipelines.recipe  # noqa: F401

    for name_ in ("StableDiffusionPipeline", "StableDiffusionControlNetPipeline"):
        getattr(diffusers, name_)
    diffusers.EulerAncestralDiscreteScheduler, diffusers.ControlNetModel  # noqa: B018

    requests = {k: make_request(size, k, steps=size.request_steps) for k in CONTROL_TYPES}
    # Preprocessors are the same on both sides: build them and the maps before measuring.
    maps = {kind: control_map(request) for kind, request in requests.items()}
    before = memory_snapshot()
    result: dict[str, Any] = {"probe": name, "size": size.name}
    if name == "switch-stencil":
        engine = start_engine(size, files)
        result["after_load"] = memory_growth(memory_snapshot(), before)
        during = []
        for kind in shuffled_sequence(size.request_per_type, 1):
            engine.generate(requests[kind])
            during.append(memory_growth(memory_snapshot(), before)["Pss_Model"])
        nets = [engine.controlnet(engine.controlnet_ref(r.controls[0])) for r in requests.values()]
        result["weights_held"] = unique_tensor_bytes(pipeline_modules(engine.base) + nets)
        result["weights_during"] = result["weights_held"]
    elif name == "switch-diffusers":
        during, weights = [], []
        for kind in shuffled_sequence(size.request_per_type, 1):
            pipe = diffusers_pipeline(size, files, kind)
            habit_call(pipe, requests[kind], maps[kind])
            during.append(memory_growth(memory_snapshot(), before)["Pss_Model"])
            weights.append(unique_tensor_bytes(pipeline_modules(pipe)))
            del pipe
        result["weights_held"] = 0
        result["weights_during"] = max(weights)
    elif name == "hold-shared":
        engine = start_engine(size, files)
        views = [engine._compose(requests[kind], [maps[kind]]) for kind in CONTROL_TYPES]
        modules = [m for view in views for m in pipeline_modules(view)]
        touch_weights(modules)
        result["weights"] = unique_tensor_bytes(modules)
        result["views"] = len(views)
        result["base_dtype"] = base_dtype(engine)
    elif name == "hold-separate":
        pipes = [diffusers_pipeline(size, files, kind) for kind in CONTROL_TYPES]
        modules = [m for pipe in pipes for m in pipeline_modules(pipe)]
        touch_weights(modules)
        result["weights"] = unique_tensor_bytes(modules)
        result["views"] = len(pipes)
    else:
        raise SystemExit(f"unknown probe {name!r}; known: {', '.join(PROBES)}")
    after = memory_snapshot()
    result["held"] = memory_growth(after, before)
    result["peak_rss_growth"] = after["VmHWM"] - before["Rss"]
    result["start"] = before
    if name.startswith("switch"):
        result["during_pss_max"] = max(during)
    return result


def run_probes(size: Size) -> dict[str, dict[str, Any]]:
    return common.run_probes(Path(__file__).resolve(), PROBES, size)


# ---- the report -----------------------------------------------------------------------------


def bench_size(size: Size, repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(size.threads)
    print(f"[{size.name}] {size.label}, {size.dtype}, {size.side}x{size.side} px", flush=True)
    started = time.perf_counter()
    files = model_files(size)
    load_started = time.perf_counter()
    engine = start_engine(size, files)
    engine_load = time.perf_counter() - load_started
    dtypes = {"asked": size.dtype, "loaded": base_dtype(engine)}
    switching = measure_switching(size, files, engine, repeats)
    dtypes["after_requests"] = base_dtype(engine)
    print(f"  switching: {time.perf_counter() - started:.0f} s", flush=True)
    window = measure_window(size, engine, repeats)
    print(f"  window: {time.perf_counter() - started:.0f} s", flush=True)
    del engine
    probes = run_probes(size)
    return {
        "size": size,
        "engine_load": engine_load,
        "dtypes": dtypes,
        "switching": switching,
        "window": window,
        "probes": probes,
        "seconds": time.perf_counter() - started,
    }


def report(results: list[dict[str, Any]], repeats: int, runtime: float) -> str:
    dtypes = ", ".join(f"{r['size'].name}: {r['size'].dtype}" for r in results)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# ControlNet benchmark: one shared model vs the plain diffusers habit",
        "",
        f"Generated by `bench/controlnet.py` on {now}. Command (from the repository root):",
        "",
        f"    {common.command_line()}",
        "",
        f"Total runtime {runtime / 60:.1f} min ("
        + ", ".join(f"{r['size'].name} {r['seconds']:.0f} s" for r in results)
        + "; building a model folder that was not there yet is not included).",
        "",
        *common.machine_lines(dtypes),
        "",
        "Timings are interleaved (A, B, B, A ...) in one process, so the noise of the shared",
        "machine falls on both sides; the tables give medians and ratios, the ratio being how",
        "many times longer the diffusers habit (or the non-skipping ControlNet) takes. "
        '"Paired" is the median of per-pair ratios.',
        "",
        "Sizes:",
        "",
    ]
    for r in results:
        s = r["size"]
        parts.append(
            f"- **{s.name}**: {s.label}, {s.dtype}, {s.side}x{s.side} px "
            f"({s.side // 8}x{s.side // 8} latent), guidance scale 7 (batch 2), "
            f"{s.threads} torch thread{'s' if s.threads > 1 else ''}, "
            f"engine start {seconds_text(r['engine_load'])}"
        )
    parts += ["", WHAT_IS_COMPARED, ""]
    parts += dtype_warning(results)
    parts += section_switching(results, repeats)
    parts += section_memory(results)
    parts += section_window(results)
    parts += section_summary(results)
    return "\n".join(parts) + "\n"


WHAT_IS_COMPARED = """\
What is compared:

- **Stencil**: the real `Engine` (`pipelines/engine.py`). At real size it loads the random
  SD 1.5 folder as a local-folder family (`Engine.start(folder, dtype="bfloat16")`), and its
  registry's sd15 ControlNet ids resolve offline through a Hugging Face cache private to the
  benchmark (`.cache/bench/hub`, snapshots symlinked to the random ControlNets). "Ready
  pipeline" is `engine._compose(request, maps)`: ControlNet from the engine's cache,
  `from_pipe` view sharing UNet/VAE/text encoder, `WindowedMultiControlNet`, fresh
  scheduler. "End to end" is `engine.generate(request)`; other Stencil-side runs go through
  the engine's own call, `Engine._run`.
- **diffusers habit**: per request `ControlNetModel.from_pretrained(cn_folder)` +
  `StableDiffusionControlNetPipeline.from_pretrained(base_folder, controlnet=...)` (same
  files and dtype: no dtype conversion, and the page cache is warm after the warm-up), Euler
  a scheduler like the engine's default, then one call as a plain script makes it (one map,
  one generator, the request's prompt, steps, guidance, size and seed).
- Control maps are computed once before timing and handed to both (the engine's map cache
  hits); preprocessing is not part of any number below."""


def dtype_warning(results) -> list[str]:
    """Say loudly when the engine's shared weights changed dtype under the benchmark."""
    drifted = [r for r in results if len(set(r["dtypes"].values())) > 1]
    if not drifted:
        return [
            "The engine's shared UNet kept the asked dtype through every request ("
            + ", ".join(f"{r['size'].name}: {r['dtypes']['asked']}" for r in results)
            + ").",
            "",
        ]
    lines = ["**Warning: the engine's shared weights changed dtype during the benchmark.**", ""]
    for r in drifted:
        d = r["dtypes"]
        lines.append(
            f"- {r['size'].name}: asked {d['asked']}, loaded {d['loaded']}, "
            f"after the first composed request {d['after_requests']}."
        )
    lines += [
        "",
        "The Stencil numbers of those sizes were then measured at another dtype than the",
        "baseline's. (`from_pipe` casts the modules it shares to its `torch_dtype`, float32",
        "unless told; `Engine._compose` passes the engine's dtype to prevent exactly this.)",
        "",
    ]
    return lines


def section_switching(results, repeats) -> list[str]:
    ready_rows, e2e_rows = [], []
    for r in results:
        s, sw = r["size"], r["switching"]
        ready, e2e = sw["ready"], sw["end_to_end"]
        ready_rows.append(
            [
                s.name,
                seconds_text(median(ready.contender)),
                seconds_text(median(ready.baseline)),
                ratio_text(ready.ratio_of_medians),
                ratio_text(ready.median_paired_ratio),
                ready.n,
                seconds_text(median(sw["first_use"])),
            ]
        )
        e2e_rows.append(
            [
                s.name,
                s.request_steps,
                seconds_text(median(e2e.contender)),
                seconds_text(median(e2e.baseline)),
                ratio_text(e2e.ratio_of_medians),
                ratio_text(e2e.median_paired_ratio),
                e2e.n,
                "yes" if sw["same_image"] else "NO",
            ]
        )
    sequence_note = "; ".join(
        f"{r['size'].name}: {r['size'].ready_per_type} of each type per shuffled block for the "
        f"ready-pipeline timing, {r['size'].request_per_type} end to end, {repeats} blocks"
        for r in results
    )
    return [
        "## 1. Switching control type per request",
        "",
        f"A shuffled sequence of canny / pose / depth requests ({sequence_note}).",
        "",
        "### Time to a ready pipeline",
        "",
        markdown_table(
            [
                "size",
                "Stencil (from_pipe view)",
                "diffusers (from_pretrained)",
                "ratio",
                "paired",
                "n",
                "Stencil first use of a type (loads its ControlNet once)",
            ],
            ready_rows,
        ),
        "",
        "### End to end (ready pipeline + generation + decode)",
        "",
        markdown_table(
            [
                "size",
                "steps",
                "Stencil `generate`",
                "diffusers load + call",
                "ratio",
                "paired",
                "n",
                "same image, bit for bit",
            ],
            e2e_rows,
        ),
        "",
    ]


def section_memory(results) -> list[str]:
    switch_rows, hold_rows, ratio_rows = [], [], []
    for r in results:
        s, p = r["size"], r["probes"]
        for label, key in (("Stencil", "switch-stencil"), ("diffusers habit", "switch-diffusers")):
            q = p[key]
            switch_rows.append(
                [
                    s.name,
                    label,
                    bytes_text(q["weights_held"]),
                    bytes_text(q["held"]["Pss_Model"]),
                    bytes_text(q["weights_during"]),
                    bytes_text(q["during_pss_max"]),
                    bytes_text(q["peak_rss_growth"]),
                ]
            )
        for label, key in (
            ("shared: 1 base + 3 ControlNets, 3 views", "hold-shared"),
            ("separate: 3 pipelines, each its own base", "hold-separate"),
        ):
            q = p[key]
            hold_rows.append(
                [
                    s.name,
                    label,
                    bytes_text(q["weights"]),
                    bytes_text(q["held"]["Pss_Model"]),
                    bytes_text(q["held"]["Pss_Anon"]),
                    bytes_text(q["held"]["Pss_Weights"]),
                    bytes_text(q["held"]["Pss"]),
                    bytes_text(q["held"]["Rss"]),
                ]
            )
        shared, separate = p["hold-shared"], p["hold-separate"]
        ratio_rows.append(
            [
                s.name,
                ratio_text(separate["weights"] / shared["weights"]),
                ratio_text(separate["held"]["Pss_Model"] / max(shared["held"]["Pss_Model"], 1)),
                ratio_text(separate["held"]["Rss"] / max(shared["held"]["Rss"], 1)),
            ]
        )
    return [
        "### Memory while switching (fresh process per approach, one shuffled sequence)",
        "",
        "Growth over the same starting point (imports done, preprocessors and maps made).",
        '"Weights" count unique tensor storage by data_ptr. PSS is read after `gc.collect()`',
        "and `malloc_trim`, as anonymous memory plus the mapped `.safetensors` files (shared",
        "libraries' code pages are left out: their PSS share moves with what other processes",
        'on the machine map). "During" is the largest reading taken right after a',
        "generation, before the diffusers pipeline is dropped; peak RSS is VmHWM minus the",
        "starting RSS.",
        "",
        markdown_table(
            [
                "size",
                "approach",
                "weights held between requests",
                "PSS held after the sequence",
                "weights during a request",
                "PSS during a request (max)",
                "peak RSS growth",
            ],
            switch_rows,
        ),
        "",
        "## 2. Memory of base + 3 ControlNets: shared vs separate pipelines",
        "",
        "Fresh process per layout; every weight read once (so memory-mapped pages are",
        "resident) before measuring. Growth over imports.",
        "",
        markdown_table(
            [
                "size",
                "layout",
                "unique weight bytes (data_ptr)",
                "PSS growth (anon + weight files)",
                "anonymous",
                "mapped .safetensors",
                "all PSS",
                "RSS growth",
            ],
            hold_rows,
        ),
        "",
        markdown_table(
            ["size", "separate / shared: weight bytes", "PSS (anon + weight files)", "RSS"],
            ratio_rows,
        ),
        "",
    ]


def section_window(results) -> list[str]:
    rows = []
    for r in results:
        s = r["size"]
        for row in r["window"]:
            t = row["times"]
            windowed_calls, plain_calls = row["calls"]
            rows.append(
                [
                    s.name,
                    f"{row['guidance_end']:.1f}",
                    row["steps"],
                    seconds_text(median(t.contender)),
                    seconds_text(median(t.baseline)),
                    ratio_text(t.ratio_of_medians),
                    ratio_text(t.median_paired_ratio),
                    t.n,
                    f"{windowed_calls} / {plain_calls}",
                    "yes" if row["latents_equal"] else "NO",
                    "yes" if row["images_equal"] else "NO",
                ]
            )
    return [
        "## 3. A half-length control window: skip the ControlNet vs multiply it by 0",
        "",
        "One canny unit, `control_guidance_end` 0.5, and 1.0 as a control (no step to skip).",
        "Both sides are `from_pipe` views of the engine's base with the",
        "same ControlNet, scheduler and seed; they differ only in the multi-ControlNet class.",
        'Timed: the denoising loop (`output_type="latent"`, text encoding included, no VAE',
        "decode). Bit-exactness is asserted by the benchmark: every timed run's latents equal",
        "each other, and the engine's own `generate` image equals the MultiControlNetModel",
        "image decoded, byte for byte.",
        "",
        markdown_table(
            [
                "size",
                "guidance end",
                "steps",
                "WindowedMultiControlNet",
                "MultiControlNetModel",
                "ratio",
                "paired",
                "n",
                "ControlNet forwards (windowed / plain)",
                "latents identical",
                "images identical",
            ],
            rows,
        ),
        "",
    ]


def difference_text(saved: float) -> str:
    if saved >= 0:
        return f"Stencil saves {seconds_text(saved)} per request"
    return f"Stencil takes {seconds_text(-saved)} longer per request"


def section_summary(results) -> list[str]:
    lines = ["## Summary of the measurements", ""]
    for r in results:
        s, sw, p = r["size"], r["switching"], r["probes"]
        shared, separate = p["hold-shared"], p["hold-separate"]
        half = next(row for row in r["window"] if row["guidance_end"] == 0.5)
        ready, e2e, window = sw["ready"], sw["end_to_end"], half["times"]
        lines.append(
            f"- **{s.name}**: a ready pipeline takes {seconds_text(median(ready.contender))} "
            f"in Stencil and {seconds_text(median(ready.baseline))} loaded from disk the "
            f"diffusers way ({ratio_text(ready.ratio_of_medians)} as long). A whole "
            f"{s.request_steps}-step request takes the diffusers way "
            f"{ratio_text(e2e.ratio_of_medians)} as long "
            f"({difference_text(median(e2e.baseline) - median(e2e.contender))}), "
            f"with {'the same image, bit for bit' if sw['same_image'] else 'A DIFFERENT IMAGE'}. "
            f"Stencil held {bytes_text(p['switch-stencil']['held']['Pss_Model'])} (PSS) "
            "between requests, every ControlNet it used kept loaded; the diffusers habit "
            f"peaked at {bytes_text(p['switch-diffusers']['during_pss_max'])} with one "
            f"pipeline alive and held "
            f"{bytes_text(p['switch-diffusers']['held']['Pss_Model'])} after the sequence. "
            f"Three separate pipelines hold {ratio_text(separate['weights'] / shared['weights'])} "
            f"the weight bytes of the shared layout ({bytes_text(separate['weights'])} vs "
            f"{bytes_text(shared['weights'])}) and "
            f"{ratio_text(separate['held']['Pss_Model'] / max(shared['held']['Pss_Model'], 1))} "
            "its memory (PSS). "
            f"With a half-length window, MultiControlNetModel's denoising takes "
            f"{ratio_text(window.ratio_of_medians)} as long as WindowedMultiControlNet's "
            f"({half['calls'][1]} vs {half['calls'][0]} ControlNet forwards), same latents."
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = common.bench_parser(__doc__.split("\n\n")[0], PROBES, SIZES, RESULTS_FILE)
    parser.add_argument("--repeats", type=int, default=3, help="shuffled blocks / window runs")
    args = parser.parse_args(argv)
    common.setup()
    sizes = common.with_threads(SIZES, args.threads)
    if args.probe:
        print(json.dumps(probe(args.probe, sizes[args.size or "tiny"])))
        return
    names = common.parse_size_names(parser, args.sizes, SIZES)
    if args.repeats < 1 or (args.threads or 1) < 1:
        parser.error("--repeats and --threads at least 1")
    started = time.perf_counter()
    results = [bench_size(sizes[name], args.repeats) for name in names]
    common.write_report(report(results, args.repeats, time.perf_counter() - started), args.output)


if __name__ == "__main__":
    main()
