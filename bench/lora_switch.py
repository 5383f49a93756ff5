"""LoRA switching benchmark: Stencil's LoraLibrary against the plain diffusers reload habit.

    .venv/bin/python bench/lora_switch.py [--sizes tiny,real] [--switches N] [--rounds N]

Writes bench/results/lora_switch.md (or `--output PATH`) and prints it.
At each size, side by side in one process:

- tiny: Stencil's tiny family (float32), loaded with `StableDiffusionPipeline.from_pretrained`.
- real: Stable Diffusion 1.5's exact shapes with seeded random weights (bfloat16, the folder
  `common.ensure_sd15_random` builds once into .cache/bench/sd15-random).

Five LoRA files of rank 4, 8, 16, 32 and 64 on the UNet's attention projections (at tiny
size the rank-8 one also carries text-encoder keys) are written with seeded random weights in
the peft/diffusers key layout (`save_lora_weights`) into .cache/bench/loras-<size>/, with a
`catalog.json` the library reads (base "tiny", or "sd15": the engine treats a local SD folder
as SD 1.5).

1. Switch latency over a seeded shuffled sequence of adapter sets (one or two adapters,
   with weights; never the same set twice in a row), only the switch timed:
   `LoraLibrary.activate(pipe, choices)` against `pipe.unload_lora_weights()` +
   `pipe.load_lora_weights(file)` per adapter + `pipe.set_adapters(names, weights)` on a
   second pipeline loaded from the same folder. The sequence runs in `--rounds` rounds,
   each with a fresh library (a restarted server); steps are cold (an adapter used for the
   first time in the round) or warm. Then both pipelines generate (1 step, small latent,
   same seed) for the same adapter sets, and the images are compared byte for byte.
2. Memory per adapter, in a fresh process per approach: parameter bytes peft adds (its
   lora_A / lora_B tensors), anonymous PSS and RSS growth, against the file size on disk;
   and what stays after a run of switches.
3. Hotswap mode (`hotswap_rank=64`, two slots) against normal mode, UNet-only adapters.

`--probe stencil|reload --size SIZE` runs one memory probe and prints JSON; the benchmark
starts those itself in fresh interpreters.
"""

from __future__ import annotations

import datetime
import json
import random
import time
import warnings
from collections.abc import Sequence
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
    memory_growth,
    memory_snapshot,
    pipeline_modules,
    ratio_text,
    seconds_text,
    touch_weights,
)

RESULTS_FILE = RESULTS / "lora_switch.md"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 1234
SEQUENCE_SEED = 2026
LORA_SEED = 7_2026
RANKS = (4, 8, 16, 32, 64)
HOTSWAP_RANK = 64
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
WEIGHTS = (0.5, 0.7, 0.8, 1.0)
PAIR_SHARE = 0.3  # share of steps that activate two adapters at once
PROBES = ("stencil", "reload")
FILE_CHECK_REPEATS = 3
WARMUP = "bench-warmup"


@dataclass(frozen=True)
class Size:
    name: str
    label: str
    dtype: str  # the model's dtype
    file_dtype: str  # the LoRA files' dtype on disk
    base_tag: str  # the catalogue's base family
    side: int  # generated image side in pixels (latent side / 8) for the image check
    strength: float  # spread of the LoRA up weights: visible, not overflowing
    text_encoder_rank: int | None  # the rank whose LoRA also has text-encoder keys
    threads: int = 1  # see bench/README.md: one torch thread keeps a busy 2-core box steady


SIZES = {
    "tiny": Size("tiny", "tiny family", "float32", "float32", "tiny", 64, 3.0, 8),
    "real": Size(
        "real", "SD 1.5 shapes, random weights", "bfloat16", "float16", "sd15", 128, 1.0, None
    ),
}


@dataclass(frozen=True)
class BenchLora:
    name: str  # catalogue name
    rank: int
    text_encoder: bool

    @property
    def filename(self) -> str:
        return f"{self.name}.safetensors"

    @property
    def adapter(self) -> str:
        """The adapter name the reload habit loads it under."""
        return self.name.replace("-", "_")


def bench_loras(size: Size) -> list[BenchLora]:
    """The five adapters of the sequence (fixed-width names: none is part of another)."""
    loras = []
    for rank in RANKS:
        text = rank == size.text_encoder_rank
        loras.append(BenchLora(f"bench-rank{rank:02d}{'-te' if text else ''}", rank, text))
    return loras


WARMUP_LORA = BenchLora(WARMUP, 4, False)


@dataclass(frozen=True)
class Step:
    """One request's adapter set, as (name, weight) pairs in request order."""

    pairs: tuple[tuple[str, float], ...]
    cold: bool = False  # whether one of its adapters is used for the first time this round
    round: int = 0  # Stencil starts each round with a fresh library (a restarted server)

    def choices(self) -> tuple[Any, ...]:
        from pipelines.requests import LoraChoice

        return tuple(LoraChoice(name, weight) for name, weight in self.pairs)

    def text(self) -> str:
        return " + ".join(
            f"{name.removeprefix('bench-')}:{weight:g}" for name, weight in self.pairs
        )


def switch_sequence(
    names: Sequence[str], count: int, *, rounds: int = 1, seed: int = SEQUENCE_SEED
) -> list[Step]:
    """A seeded shuffled sequence of adapter sets; never the same set twice in a row.

    Split into `rounds` equal rounds; a step is cold when it uses an adapter for the first
    time in its round.
    """
    rng = random.Random(seed)
    steps: list[Step] = []
    seen: set[str] = set()
    previous = None
    per_round = -(-count // rounds)
    while len(steps) < count:
        k = 2 if rng.random() < PAIR_SHARE else 1
        pairs = tuple((name, rng.choice(WEIGHTS)) for name in rng.sample(list(names), k))
        if pairs == previous:
            continue
        round_ = len(steps) // per_round
        if len(steps) % per_round == 0:
            seen = set()
        cold = any(name not in seen for name, _ in pairs)
        seen.update(name for name, _ in pairs)
        steps.append(Step(pairs, cold, round_))
        previous = pairs
    return steps


# ---- the model and the LoRA files ----------------------------------------------------------


def model_folder(size: Size) -> Path:
    if size.name == "tiny":
        from pipelines.tiny import ensure_tiny_family

        return ensure_tiny_family(BENCH_CACHE)
    return common.ensure_sd15_random(BENCH_CACHE)


def load_pipe(size: Size, folder: Path):
    """The base as any diffusers script loads it: from_pretrained of the local folder."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        torch_dtype=getattr(torch, size.dtype),
        use_safetensors=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_folder(size: Size) -> Path:
    return BENCH_CACHE / f"loras-{size.name}"


def write_loras(size: Size, pipe) -> dict[str, dict[str, Any]]:
    """Write the bench LoRAs (seeded, so every run writes the same tensors) and the catalogue.

    Returns per name: rank, layers per component, file size.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    folder = lora_folder(size)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, size.file_dtype)
    info: dict[str, dict[str, Any]] = {}
    catalogue = []
    for index, lora in enumerate([*bench_loras(size), WARMUP_LORA]):
        generator = torch.Generator().manual_seed(LORA_SEED + index)
        unet = _random_pairs(pipe.unet, UNET_TARGETS, lora.rank, size, generator, dtype)
        text = {}
        if lora.text_encoder:
            text = _random_pairs(pipe.text_encoder, TEXT_TARGETS, lora.rank, size, generator, dtype)
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=unet,
            text_encoder_lora_layers=text or None,
            weight_name=lora.filename,
        )
        info[lora.name] = {
            "rank": lora.rank,
            "unet_layers": len(unet) // 2,
            "text_layers": len(text) // 2,
            "file_bytes": (folder / lora.filename).stat().st_size,
            "numel": sum(t.numel() for t in (*unet.values(), *text.values())),
        }
        catalogue.append(
            {
                "name": lora.name,
                "display_name": f"Bench rank {lora.rank}" + (" + text encoder" * lora.text_encoder),
                "file": lora.filename,
                "base": size.base_tag,
                "default_weight": 1.0,
                "licence": "CC0-1.0",
                "description": "Seeded random LoRA written by bench/lora_switch.py.",
            }
        )
    text = json.dumps({"version": 1, "loras": catalogue}, indent=2) + "\n"
    (folder / "catalog.json").write_text(text, encoding="utf-8")
    return info


def _random_pairs(model, targets, rank: int, size: Size, generator, dtype) -> dict[str, Any]:
    """peft/diffusers keys `<module>.lora_A.weight` / `.lora_B.weight` for every Linear whose
    name ends with a target (UNet: inside attention blocks only)."""
    import torch

    tensors = {}
    for name, module in model.named_modules():
        if not name.endswith(targets) or not isinstance(module, torch.nn.Linear):
            continue
        if hasattr(model, "down_blocks") and ".attentions." not in name:
            continue
        fan_in, fan_out = module.in_features, module.out_features
        down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=generator) * size.strength / rank**0.5
        tensors[f"{name}.lora_A.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = up.to(dtype).contiguous()
    return tensors


def time_file_checks(
    size: Size, pipe, files: dict[str, dict[str, Any]], repeats: int = FILE_CHECK_REPEATS
) -> None:
    """What Stencil's first use of a file adds before loading it: `validate_lora` (read,
    sha256, header, keys converted and matched against the model's layer shapes)."""
    from pipelines.lora_files import ModelSignature, validate_lora

    signature = ModelSignature.from_pipeline(pipe)
    validate_lora(lora_folder(size) / WARMUP_LORA.filename, signature, name=WARMUP)
    for lora in bench_loras(size):
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            validate_lora(lora_folder(size) / lora.filename, signature, name=lora.name)
            seconds.append(time.perf_counter() - started)
        files[lora.name]["check_seconds"] = percentile(seconds, 50)


def new_library(size: Size, **options):
    from pipelines.loras import LoraLibrary

    return LoraLibrary(lora_folder(size), size.base_tag, **options)


# ---- the two ways of switching ---------------------------------------------------------------


def reload_switch(size: Size, pipe, step: Step) -> None:
    """The plain diffusers habit: drop every adapter, load the request's files, weight them."""
    folder = str(lora_folder(size))
    pipe.unload_lora_weights()
    adapters = []
    for name, _ in step.pairs:
        lora = BenchLora(name, 0, False)
        pipe.load_lora_weights(
            folder, weight_name=lora.filename, adapter_name=lora.adapter, use_safetensors=True
        )
        adapters.append(lora.adapter)
    pipe.set_adapters(adapters, adapter_weights=[weight for _, weight in step.pairs])


def reload_none(pipe) -> None:
    pipe.unload_lora_weights()


def generate(pipe, size: Size):
    """1 step, small latent, fixed seed, a fresh scheduler: what the image check compares."""
    import torch
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.inference_mode():
        return pipe(
            PROMPT,
            num_inference_steps=1,
            guidance_scale=5.0,
            height=size.side,
            width=size.side,
            generator=torch.Generator(device="cpu").manual_seed(SEED),
        ).images[0]


def pixel_difference(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def warm_up_imports(size: Size, pipe) -> None:
    """Import and JIT-free first-call costs of both paths, paid on a throwaway adapter.

    Uses `pipe` (the reload pipeline, which unloads everything on its first switch anyway),
    so the Stencil pipeline meets its first adapter in the timed sequence.
    """
    from pipelines.requests import LoraChoice

    throwaway = new_library(size)
    throwaway.activate(pipe, [LoraChoice(WARMUP, 0.8)])
    throwaway.activate(pipe, [])
    reload_switch(size, pipe, Step(((WARMUP, 0.8),)))
    pipe.unload_lora_weights()


# ---- 1. switch latency and the image check ---------------------------------------------------


def measure_switching(size: Size, folder: Path, count: int, rounds: int) -> dict[str, Any]:
    names = [lora.name for lora in bench_loras(size)]
    pipe_stencil, pipe_reload = load_pipe(size, folder), load_pipe(size, folder)
    base_image = generate(pipe_reload, size)  # before either pipeline has seen any LoRA
    warm_up_imports(size, pipe_reload)
    steps = switch_sequence(names, count, rounds=rounds)
    libraries: dict[int, Any] = {}

    def library_for(step: Step):
        """Each round starts from a fresh library on a pipeline without adapters (untimed)."""
        if step.round not in libraries:
            pipe_stencil.unload_lora_weights()
            libraries[step.round] = new_library(size)
            libraries[step.round].bind(pipe_stencil)  # the engine binds once, at start
        return libraries[step.round]

    seconds = interleave(
        {
            "reload": Case(run=lambda step: reload_switch(size, pipe_reload, step)),
            "stencil": Case(
                prepare=lambda step: (library_for(step), step.choices()),
                run=lambda prepared: prepared[0].activate(pipe_stencil, prepared[1]),
            ),
        },
        steps,
    )
    library = libraries[steps[-1].round]
    split = {}
    for kind, keep in (("cold", True), ("warm", False)):
        chosen = [i for i, step in enumerate(steps) if step.cold == keep]
        split[kind] = Comparison(
            [seconds["reload"][i] for i in chosen], [seconds["stencil"][i] for i in chosen]
        )
    split["all"] = Comparison(seconds["reload"], seconds["stencil"])
    by_adapter = {}
    for name in names:  # warm steps with this adapter alone: does the cost follow the rank?
        chosen = [i for i, st in enumerate(steps) if not st.cold and st.pairs[0][0] == name]
        chosen = [i for i in chosen if len(steps[i].pairs) == 1]
        if chosen:
            by_adapter[name] = Comparison(
                [seconds["reload"][i] for i in chosen], [seconds["stencil"][i] for i in chosen]
            )
    images = check_images(size, steps, library, pipe_stencil, pipe_reload, base_image)
    return {
        "steps": steps,
        "seconds": seconds,
        "split": split,
        "by_adapter": by_adapter,
        "images": images,
        "loaded": library.loaded(),
        "library": library,
        "pipe": pipe_stencil,
    }


def check_images(size, steps, library, pipe_stencil, pipe_reload, base_image) -> dict:
    """Same adapter set, same seed: Stencil's pipeline against the reload habit's.

    Singles, then one pair in both request orders, then the pair once more through a fresh
    library that loaded its two adapters in the opposite order to Stencil's pipeline.
    """
    from pipelines.requests import LoraChoice

    names = [lora.name for lora in bench_loras(size)]
    singles = [Step(((name, 0.8),)) for name in names]
    if size.name == "real":
        singles = singles[1::2]  # ranks 8 and 32 only: real-size images are slow on a CPU
    first, second = names[1], names[3]
    pair = Step(((first, 0.7), (second, 0.5)))
    swapped = Step(tuple(reversed(pair.pairs)))
    rows, stencil_images = [], {}
    generation: dict[str, list[float]] = {"stencil": [], "reload": []}
    for index, step in enumerate([Step(()), *singles, pair, swapped]):
        library.activate(pipe_stencil, step.choices())
        if step.pairs:
            reload_switch(size, pipe_reload, step)
        else:
            reload_none(pipe_reload)
        images = {}
        sides = {"stencil": pipe_stencil, "reload": pipe_reload}
        for side in sides if index % 2 == 0 else reversed(sides):
            started = time.perf_counter()
            images[side] = generate(sides[side], size)
            generation[side].append(time.perf_counter() - started)
        stencil_image, reload_image = images["stencil"], images["reload"]
        stencil_images[step] = stencil_image
        rows.append(
            {
                "set": step.text() or "no LoRA",
                "same": stencil_image.tobytes() == reload_image.tobytes(),
                "max_diff": pixel_difference(stencil_image, reload_image),
                "vs_base": pixel_difference(stencil_image, base_image),
            }
        )
    # Which of the pair Stencil's pipeline loaded first (in the sequence, then the singles).
    last = [step for step in steps if step.round == steps[-1].round]
    order = list(dict.fromkeys(n for s in [*last, *singles] for n, _ in s.pairs))
    opposite = sorted((first, second), key=order.index, reverse=True)
    reload_none(pipe_reload)
    fresh = new_library(size)
    for name in opposite:
        fresh.activate(pipe_reload, [LoraChoice(name, 1.0)])
    fresh.activate(pipe_reload, pair.choices())
    other_history = generate(pipe_reload, size)
    # Is it the load order or the set_adapters order that sets the sum's order? The habit,
    # loading the pair both ways round, then one and the same set_adapters list:
    load_order_images = [
        habit_image(size, pipe_reload, pair, loading) for loading in (pair, swapped)
    ]
    return {
        "rows": rows,
        "generation": Comparison(generation["reload"], generation["stencil"]),
        "orders_agree": stencil_images[pair].tobytes() == stencil_images[swapped].tobytes(),
        "pair": pair.text(),
        "load_order": [n.removeprefix("bench-") for n in sorted(opposite, key=order.index)],
        "history_same": other_history.tobytes() == stencil_images[pair].tobytes(),
        "history_diff": pixel_difference(other_history, stencil_images[pair]),
        "load_order_matters": load_order_images[0].tobytes() != load_order_images[1].tobytes(),
    }


def habit_image(size: Size, pipe, step: Step, loading: Step):
    """The reload habit's image for `step`, its files loaded in `loading`'s order."""
    reload_switch(size, pipe, loading)
    adapters = [BenchLora(name, 0, False).adapter for name, _ in step.pairs]
    pipe.set_adapters(adapters, adapter_weights=[weight for _, weight in step.pairs])
    return generate(pipe, size)


# ---- 3. hotswap mode against normal mode ----------------------------------------------------


def measure_hotswap(size: Size, folder: Path, normal: dict[str, Any], count: int) -> dict:
    """Normal mode (every adapter stays loaded) against hotswap slots, UNet-only adapters.

    Normal mode is the library and pipeline of part 1, which hold all five adapters by now;
    the hotswap library gets a pipeline of its own with two rank-64 slots.
    """
    from pipelines.requests import LoraChoice

    names = [lora.name for lora in bench_loras(size) if not lora.text_encoder]
    library, pipe = normal["library"], normal["pipe"]
    pipe_hot = load_pipe(size, folder)
    hot = new_library(size, hotswap_rank=HOTSWAP_RANK)
    started = time.perf_counter()
    hot.bind(pipe_hot)  # creates the slots
    slot_setup = time.perf_counter() - started
    for name in names:  # every adapter once: normal mode has them all loaded already
        hot.activate(pipe_hot, [LoraChoice(name, 1.0)])
    steps = switch_sequence(names, count, seed=SEQUENCE_SEED + 1)
    swapped: list[bool] = []
    before: dict[str, tuple[str, ...]] = {}

    def remember(step: Step) -> Step:
        before["slots"] = tuple(hot.loaded())
        return step

    seconds = interleave(
        {
            "normal": Case(run=lambda step: library.activate(pipe, step.choices())),
            "hotswap": Case(
                prepare=remember,
                run=lambda step: hot.activate(pipe_hot, step.choices()),
                finish=lambda _s, _r: swapped.append(tuple(hot.loaded()) != before["slots"]),
            ),
        },
        steps,
    )
    same = []
    for step in (Step(((names[0], 0.8),)), Step(((names[1], 0.7), (names[-1], 0.5)))):
        library.activate(pipe, step.choices())
        hot.activate(pipe_hot, step.choices())
        normal_image, hot_image = generate(pipe, size), generate(pipe_hot, size)
        same.append((step.text(), pixel_difference(normal_image, hot_image), tuple(hot.loaded())))
    swap_index = [i for i, s in enumerate(swapped) if s]
    no_swap_index = [i for i, s in enumerate(swapped) if not s]
    return {
        "adapters": names,
        "slot_setup": slot_setup,
        "all": Comparison(seconds["hotswap"], seconds["normal"]),
        "swapped": Comparison(
            [seconds["hotswap"][i] for i in swap_index], [seconds["normal"][i] for i in swap_index]
        ),
        "not_swapped": [seconds["hotswap"][i] for i in no_swap_index],
        "same": same,
    }


# ---- 2. memory: probes in fresh processes ----------------------------------------------------


def lora_parameters(pipe) -> dict[str, tuple[int, set[str]]]:
    """Per adapter name: bytes of peft's lora_A / lora_B tensors in the model, and dtypes."""
    found: dict[str, tuple[int, set[str]]] = {}
    for module in (pipe.unet, pipe.text_encoder):
        for name, tensor in module.named_parameters():
            parts = name.split(".")
            for marker in ("lora_A", "lora_B"):
                if marker in parts:
                    adapter = parts[parts.index(marker) + 1]
                    size, dtypes = found.get(adapter, (0, set()))
                    dtype = str(tensor.dtype).removeprefix("torch.")
                    found[adapter] = (
                        size + tensor.numel() * tensor.element_size(),
                        dtypes | {dtype},
                    )
    return found


def probe(name: str, size: Size, count: int) -> dict[str, Any]:
    """One approach's memory, in this (fresh) process."""
    import torch

    torch.set_num_threads(size.threads)
    pipe = load_pipe(size, model_folder(size))
    touch_weights(pipeline_modules(pipe))  # mapped pages resident before the first reading
    warm_up_imports(size, pipe)
    steps = switch_sequence([lora.name for lora in bench_loras(size)], count)
    start = memory_snapshot()
    result: dict[str, Any] = {"probe": name, "size": size.name}
    if name == "stencil":
        from pipelines.requests import LoraChoice

        library = new_library(size)
        library.bind(pipe)
        adapters = []
        previous = start
        for lora in bench_loras(size):
            known = set(lora_parameters(pipe))
            library.activate(pipe, [LoraChoice(lora.name, 1.0)])
            now = memory_snapshot()
            params = lora_parameters(pipe)
            (added,) = set(params) - known
            adapters.append(
                {
                    "name": lora.name,
                    "param_bytes": params[added][0],
                    "dtypes": sorted(params[added][1]),
                    "growth": memory_growth(now, previous),
                }
            )
            previous = now
        all_loaded = previous
        for step in steps:
            library.activate(pipe, step.choices())
        result["adapters"] = adapters
        result["all_loaded"] = memory_growth(all_loaded, start)
        result["after_switches"] = memory_growth(memory_snapshot(), start)
        result["param_bytes_held"] = sum(held for held, _ in lora_parameters(pipe).values())
    elif name == "reload":
        during = []
        for step in steps:
            reload_switch(size, pipe, step)
            during.append(memory_growth(memory_snapshot(trim=False), start)["Pss_Anon"])
        result["during_max"] = max(during)
        result["after_switches"] = memory_growth(memory_snapshot(), start)
        result["param_bytes_held"] = sum(held for held, _ in lora_parameters(pipe).values())
    else:
        raise SystemExit(f"unknown probe {name!r}; known: {', '.join(PROBES)}")
    result["switches"] = len(steps)
    result["peak_rss_growth"] = memory_snapshot()["VmHWM"] - start["Rss"]
    return result


def run_probes(size: Size, count: int) -> dict[str, dict[str, Any]]:
    return common.run_probes(Path(__file__).resolve(), PROBES, size, ["--switches", str(count)])


# ---- one size ---------------------------------------------------------------------------------


def bench_size(size: Size, count: int, rounds: int, memory_switches: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(size.threads)
    print(f"[{size.name}] {size.label}, {size.dtype}", flush=True)
    started = time.perf_counter()
    folder = model_folder(size)
    writer = load_pipe(size, folder)
    files = write_loras(size, writer)
    time_file_checks(size, writer, files)
    del writer
    switching = measure_switching(size, folder, count, rounds)
    print(f"  switching: {time.perf_counter() - started:.0f} s", flush=True)
    hotswap = measure_hotswap(size, folder, switching, count)
    print(f"  hotswap: {time.perf_counter() - started:.0f} s", flush=True)
    switching.pop("library")
    switching.pop("pipe")
    probes = run_probes(size, memory_switches)
    return {
        "size": size,
        "files": files,
        "switching": switching,
        "hotswap": hotswap,
        "probes": probes,
        "seconds": time.perf_counter() - started,
    }


# ---- the report -------------------------------------------------------------------------------


def latency_row(size: str, kind: str, c: Comparison) -> list[Any]:
    return [
        size,
        kind,
        c.n,
        seconds_text(percentile(c.contender, 50)),
        seconds_text(percentile(c.contender, 95)),
        seconds_text(percentile(c.baseline, 50)),
        seconds_text(percentile(c.baseline, 95)),
        ratio_text(c.ratio_of_medians),
        ratio_text(percentile(c.baseline, 95) / percentile(c.contender, 95)),
        ratio_text(c.median_paired_ratio),
    ]


def section_files(results) -> list[str]:
    rows = []
    for r in results:
        s = r["size"]
        for lora in bench_loras(s):
            f = r["files"][lora.name]
            layers = f"{f['unet_layers']} UNet" + (
                f" + {f['text_layers']} text encoder" if f["text_layers"] else ""
            )
            rows.append(
                [
                    s.name,
                    lora.name,
                    f["rank"],
                    layers,
                    s.file_dtype,
                    bytes_text(f["file_bytes"]),
                    seconds_text(f["check_seconds"]),
                ]
            )
    return [
        "## The LoRA files",
        "",
        "Seeded random weights, peft/diffusers keys, alpha = rank (no adapter metadata needed),",
        "UNet targets `to_q`, `to_k`, `to_v`, `to_out.0` in every attention block; the tiny",
        "rank-8 one also targets the text encoder's `q_proj`, `k_proj`, `v_proj`, `out_proj`.",
        "",
        "The last column is Stencil's file check (`validate_lora`: read, sha256, header, keys",
        "converted and matched against the model's layer shapes), median of "
        f"{FILE_CHECK_REPEATS}, part of every cold Stencil step below.",
        "",
        markdown_table(
            ["size", "name", "rank", "layers", "dtype", "file size", "file check"], rows
        ),
        "",
    ]


def section_switching(results) -> list[str]:
    rows, image_rows, order_rows, rank_rows = [], [], [], []
    for r in results:
        s, sw = r["size"], r["switching"]
        for kind in ("cold", "warm", "all"):
            rows.append(latency_row(s.name, kind, sw["split"][kind]))
        for name, c in sw["by_adapter"].items():
            rank_rows.append(
                [
                    s.name,
                    name.removeprefix("bench-"),
                    c.n,
                    seconds_text(percentile(c.contender, 50)),
                    seconds_text(percentile(c.baseline, 50)),
                    ratio_text(c.ratio_of_medians),
                ]
            )
        im = sw["images"]
        order_rows.append(
            [
                s.name,
                im["pair"],
                "yes" if im["orders_agree"] else "NO",
                " then ".join(im["load_order"]),
                "yes" if im["history_same"] else f"NO (max diff {im['history_diff']})",
                "yes" if im["load_order_matters"] else "no",
            ]
        )
        for row in im["rows"]:
            image_rows.append(
                [
                    s.name,
                    row["set"],
                    "yes" if row["same"] else "NO",
                    row["max_diff"],
                    row["vs_base"],
                ]
            )
    first = results[0]["switching"]["steps"]
    pairs = sum(len(step.pairs) == 2 for step in first)
    rounds = first[-1].round + 1
    sequence = ", ".join(step.text() for step in first[:8])
    image_sides = ", ".join(
        f"{r['size'].name} {r['size'].side}x{r['size'].side} px" for r in results
    )
    generation_lines = []
    for r in results:
        g = r["switching"]["images"]["generation"]
        generation_lines.append(
            f"- {r['size'].name}: Stencil {seconds_text(percentile(g.contender, 50))}, reload "
            f"{seconds_text(percentile(g.baseline, 50))} (ratio {ratio_text(g.ratio_of_medians)}"
            f", paired {ratio_text(g.median_paired_ratio)}, n = {g.n})"
        )
    return [
        "## 1. Switch latency",
        "",
        f"{len(first)} switches per size, seeded (`random.Random({SEQUENCE_SEED})`): each step "
        f"activates one adapter or, {pairs} times, two at once, weights from {list(WEIGHTS)}; "
        f"never the same set twice in a row. The sequence runs in {rounds} rounds; Stencil "
        "starts each round with a fresh library on a pipeline without adapters (a restarted "
        "server), so each round has its own cold steps. Cold steps use an adapter for the "
        "first time in the round (Stencil reads, checks and loads it, and only it); warm "
        "steps use only adapters seen before (Stencil: `enable_lora` + `set_adapters`). The "
        "reload habit unloads, reads and loads every adapter of the set on every step. The "
        f"sequence starts: {sequence}, ...",
        "",
        "Only the switch is timed (no generation). Ratios: how many times longer the reload",
        "habit takes (p50 over p50, p95 over p95, and the median of per-step paired ratios).",
        "",
        markdown_table(
            [
                "size",
                "steps",
                "n",
                "Stencil p50",
                "Stencil p95",
                "reload p50",
                "reload p95",
                "ratio p50",
                "ratio p95",
                "paired",
            ],
            rows,
        ),
        "",
        "Warm steps with a single adapter, by adapter (few samples each; p50):",
        "",
        markdown_table(["size", "adapter", "n", "Stencil", "reload", "ratio"], rank_rows),
        "",
        "### Same image",
        "",
        "After the timed sequence, each side activates the same set and generates one image",
        f"(1 step, Euler, guidance 5, same seed; {image_sides}). Max pixel difference on",
        "0..255; the last column compares Stencil's image with the base image made before any",
        "LoRA was loaded.",
        "",
        markdown_table(
            [
                "size",
                "adapter set (request order)",
                "Stencil == reload, bit for bit",
                "max pixel diff",
                "max diff from base",
            ],
            image_rows,
        ),
        "",
        "Generation time of those image checks (1 step, alternated; Stencil's pipeline holds",
        "all five adapters, the reload habit's only the active set):",
        "",
        *generation_lines,
        "",
        "With two adapters, peft adds their outputs in the order of the active-adapter list,",
        "and float addition is not associative. The reload habit's order is the request's;",
        "Stencil orders the set by the files' sha256. This table checks whether the request's",
        "order or the library's load history changes Stencil's image: both request orders,",
        "and the same pair through a fresh library that loaded the two adapters in the",
        "opposite order; and, as a control, the reload habit loading the pair both ways round",
        "with one and the same `set_adapters` list:",
        "",
        markdown_table(
            [
                "size",
                "pair",
                "Stencil: both request orders give one image",
                "Stencil's pipeline loaded",
                "fresh library, opposite load order: same image",
                "habit: load order alone changes the image",
            ],
            order_rows,
        ),
        "",
    ]


def section_memory(results) -> list[str]:
    rows, held_rows = [], []
    for r in results:
        s, p = r["size"], r["probes"]
        for adapter in p["stencil"]["adapters"]:
            f = r["files"][adapter["name"]]
            g = adapter["growth"]
            rows.append(
                [
                    s.name,
                    adapter["name"],
                    bytes_text(f["file_bytes"]),
                    bytes_text(adapter["param_bytes"]),
                    "/".join(adapter["dtypes"]),
                    f"{adapter['param_bytes'] / f['file_bytes']:.2f}",
                    bytes_text(g["Pss_Anon"]),
                    bytes_text(g["Rss"]),
                ]
            )
        stencil, reload = p["stencil"], p["reload"]
        held_rows.append(
            [
                s.name,
                "Stencil (all 5 kept)",
                bytes_text(stencil["all_loaded"]["Pss_Anon"]),
                bytes_text(stencil["after_switches"]["Pss_Anon"]),
                bytes_text(stencil["param_bytes_held"]),
                bytes_text(stencil["peak_rss_growth"]),
            ]
        )
        held_rows.append(
            [
                s.name,
                "reload habit (active set only)",
                f"max {bytes_text(reload['during_max'])}",
                bytes_text(reload["after_switches"]["Pss_Anon"]),
                bytes_text(reload["param_bytes_held"]),
                bytes_text(reload["peak_rss_growth"]),
            ]
        )
    switches = results[0]["probes"]["reload"]["switches"]
    return [
        "## 2. Memory per loaded adapter",
        "",
        "Fresh process per approach: the base loaded and every weight read, the import costs",
        "paid on a throwaway adapter, then the reading taken (`gc.collect()` + `malloc_trim`).",
        "Stencil loads the five adapters one by one (`activate`, weight 1); each row is the",
        "growth that one load caused. Parameter bytes are peft's `lora_A` / `lora_B` tensors",
        "for that adapter in the UNet and text encoder. Anonymous PSS is where adapter tensors",
        "live (the model's own weights are file-backed pages of the mapped safetensors).",
        "",
        markdown_table(
            [
                "size",
                "adapter",
                "file on disk",
                "parameters added",
                "in-model dtype",
                "params / file",
                "anonymous PSS growth",
                "RSS growth",
            ],
            rows,
        ),
        "",
        f"Held memory, growth over the same starting point; then {switches} switches of the "
        "part-1 sequence:",
        "",
        markdown_table(
            [
                "size",
                "approach",
                "anon PSS with all 5 loaded / during switches",
                f"anon PSS after {switches} switches",
                "LoRA parameter bytes held at the end",
                "peak RSS growth",
            ],
            held_rows,
        ),
        "",
    ]


def section_hotswap(results) -> list[str]:
    rows, same_rows = [], []
    for r in results:
        s, h = r["size"], r["hotswap"]
        swapped, rest = h["swapped"], h["not_swapped"]
        rows.append(
            [
                s.name,
                h["all"].n,
                seconds_text(percentile(h["all"].contender, 50)),
                seconds_text(percentile(h["all"].contender, 95)),
                seconds_text(percentile(h["all"].baseline, 50)),
                seconds_text(percentile(h["all"].baseline, 95)),
                ratio_text(h["all"].ratio_of_medians),
                f"{swapped.n} / {h['all'].n}",
                seconds_text(percentile(swapped.baseline, 50)) if swapped.n else "-",
                seconds_text(percentile(rest, 50)) if rest else "-",
                seconds_text(h["slot_setup"]),
            ]
        )
        for text, diff, slots in h["same"]:
            held = ", ".join(label.removeprefix("bench-") for label in slots)
            same_rows.append([s.name, text, "yes" if diff == 0 else "NO", diff, held])
    names = "; ".join(
        f"{r['size'].name}: "
        + ", ".join(n.removeprefix("bench-") for n in r["hotswap"]["adapters"])
        for r in results
    )
    return [
        "## 3. Hotswap mode against normal mode",
        "",
        f"UNet-only adapters ({names}), {results[0]['hotswap']['all'].n} "
        f"switches of another seeded sequence, interleaved. Normal mode is part 1's library "
        "(all adapters loaded, so a switch is `set_adapters`); hotswap mode "
        f"(`hotswap_rank={HOTSWAP_RANK}`, 2 slots, what a `torch.compile`d UNet needs) keeps"
        " two zero-padded rank-64 slots and loads a file into a slot whenever the set needs"
        " an adapter that is not in one; a weight-only change is an in-place fill. No",
        "compilation here: this is the eager cost of the mode. Ratio: hotswap over normal.",
        "",
        markdown_table(
            [
                "size",
                "n",
                "normal p50",
                "normal p95",
                "hotswap p50",
                "hotswap p95",
                "ratio p50",
                "steps that swapped a file in",
                "hotswap p50, swapping",
                "hotswap p50, no swap",
                "slot setup (bind)",
            ],
            rows,
        ),
        "",
        markdown_table(
            [
                "size",
                "adapter set",
                "hotswap image == normal image",
                "max pixel diff",
                "slots hold (slot a, slot b)",
            ],
            same_rows,
        ),
        "",
        "Hotswap sums the two slots in slot order (a, b). Adapters swapped in together go into",
        "their slots in sha256 order, as normal mode sums them; an adapter already in a slot",
        "stays where it is, so a pair's sum can run in another order than normal mode's.",
        "",
    ]


def section_summary(results) -> list[str]:
    lines = ["## Summary of the measurements", ""]
    for r in results:
        s, sw, p, h = r["size"], r["switching"], r["probes"], r["hotswap"]
        warm, cold = sw["split"]["warm"], sw["split"]["cold"]
        rows = sw["images"]["rows"]
        singles_same = all(row["same"] for row in rows if "+" not in row["set"])
        pair_diffs = [row["max_diff"] for row in rows if "+" in row["set"]]
        biggest = p["stencil"]["adapters"][-1]
        file_bytes = r["files"][biggest["name"]]["file_bytes"]
        images = (
            "No LoRA and every single adapter gave the same image both ways, bit for bit; "
            if singles_same
            else "Some single-adapter images DIFFERED between the two ways (see the table); "
        )
        images += (
            f"the pair matched in one request order and differed by up to {max(pair_diffs)} "
            "of 255 in the other (summation order: see the order table of part 1). "
            if 0 in pair_diffs and max(pair_diffs) > 0
            else f"the pair's largest difference was {max(pair_diffs)} of 255. "
        )
        lines.append(
            f"- **{s.name}** ({s.dtype}): a warm switch takes Stencil "
            f"{seconds_text(percentile(warm.contender, 50))} (p95 "
            f"{seconds_text(percentile(warm.contender, 95))}) against "
            f"{seconds_text(percentile(warm.baseline, 50))} (p95 "
            f"{seconds_text(percentile(warm.baseline, 95))}) for unload + load: "
            f"{ratio_text(warm.ratio_of_medians)} at p50. A cold switch (an adapter's first "
            f"use) takes Stencil {seconds_text(percentile(cold.contender, 50))} at p50 against "
            f"{seconds_text(percentile(cold.baseline, 50))} ({ratio_text(cold.ratio_of_medians)}"
            "): Stencil checks the new file, then loads only that adapter, where the habit "
            f"loads every adapter of the set. {images}"
            f"The rank-64 adapter adds {bytes_text(biggest['param_bytes'])} of parameters "
            f"({'/'.join(biggest['dtypes'])}) for a {bytes_text(file_bytes)} "
            f"{s.file_dtype} file; all five held cost "
            f"{bytes_text(p['stencil']['all_loaded']['Pss_Anon'])} of anonymous PSS. Hotswap "
            f"mode switches take {ratio_text(h['all'].ratio_of_medians)} as long as normal "
            f"mode's at p50 ({h['swapped'].n} of {h['all'].n} steps had to load a file into "
            "a slot)."
        )
    return lines


def report(results: list[dict[str, Any]], runtime: float) -> str:
    import peft

    dtypes = ", ".join(
        f"{r['size'].name}: model {r['size'].dtype}, LoRA files {r['size'].file_dtype}"
        for r in results
    )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# LoRA switching: Stencil's LoraLibrary vs unload + load on every request",
        "",
        f"Generated by `bench/lora_switch.py` on {now}. Command (from the repository root):",
        "",
        f"    {common.command_line()}",
        "",
        f"Total runtime {runtime / 60:.1f} min ("
        + ", ".join(f"{r['size'].name} {r['seconds']:.0f} s" for r in results)
        + ").",
        "",
        *common.machine_lines(dtypes),
        f"- peft {peft.__version__}; {results[0]['size'].threads} torch thread(s)",
        "",
        WHAT_IS_COMPARED,
        "",
    ]
    parts += section_files(results)
    parts += section_switching(results)
    parts += section_memory(results)
    parts += section_hotswap(results)
    parts += section_summary(results)
    return "\n".join(parts) + "\n"


WHAT_IS_COMPARED = """\
What is compared, on two pipelines loaded from the same folder with
`StableDiffusionPipeline.from_pretrained` (tiny: Stencil's tiny family; real: SD 1.5's exact
shapes with seeded random weights, `.cache/bench/sd15-random`):

- **Stencil**: `LoraLibrary(folder, base).activate(pipe, choices)` (`pipelines/loras.py`),
  bound once to the pipeline as the engine does. It resolves each name in the catalogue,
  checks the file once (`pipelines/lora_files.py`: header, keys and shapes against the
  model), loads it once under its own adapter name, and afterwards only calls
  `enable_lora()` + `set_adapters(...)` for all components (or nothing, when the set is
  already active).
- **reload habit**: per request `pipe.unload_lora_weights()`, then
  `pipe.load_lora_weights(folder, weight_name=file, adapter_name=...)` for each adapter of
  the set, then `pipe.set_adapters(names, adapter_weights=weights)`.
- Before timing, both paths are run once on a throwaway adapter (lazy imports); the LoRA
  files are in the page cache (written just before), so "cold" means first use by the
  model, not a cold disk."""


def main(argv: list[str] | None = None) -> None:
    parser = common.bench_parser(__doc__.split("\n\n")[0], PROBES, SIZES, RESULTS_FILE)
    parser.add_argument("--switches", type=int, default=48, help="switches per sequence (>= 10)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh Stencil libraries over the sequence"
    )
    args = parser.parse_args(argv)
    common.setup()
    warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
    sizes = common.with_threads(SIZES, args.threads)
    if args.probe:
        print(json.dumps(probe(args.probe, sizes[args.size or "tiny"], args.switches)))
        return
    names = common.parse_size_names(parser, args.sizes, SIZES)
    if args.switches < 10 or (args.threads or 1) < 1:
        parser.error("--switches at least 10, --threads at least 1")
    if not 1 <= args.rounds <= args.switches // 5:
        parser.error("--rounds from 1 to a fifth of --switches")
    started = time.perf_counter()
    memory_switches = min(args.switches, 24)
    results = [
        bench_size(sizes[name], args.switches, args.rounds, memory_switches) for name in names
    ]
    common.write_report(report(results, time.perf_counter() - started), args.output)


if __name__ == "__main__":
    main()
