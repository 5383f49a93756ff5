"""LoRA switching benchmark: Stencil's LoraLibrary against the plain diffusers reload habit.

    .venv/bin/python bench/lora_switch.py [--sizes tiny,real] [--switches N] [--rounds N]
        [--only formats|switch] [--format-rounds N] [--format-warm N]

Writes bench/results/lora_switch.md (or `--output PATH`) and prints it; `--only formats`
runs part 4 alone and writes bench/results/lora_switch_formats.md; `--only switch` runs
part 1 alone (with the files' table) and writes .cache/bench/lora_switch_part1.md, to be
merged into the published file by hand (it says which command produced which part).
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
4. Every LoRA format Stencil supports (loras/README.md, "Formats"): diffusers/peft LoRA,
   kohya LoRA with one alpha and with per-module alphas, LoCon, LoCon with Tucker, LoHa,
   LoKr, full diff and DoRA. One UNet-only file each (rank 4 tiny, 16 real; every
   attention projection, the conv formats also three resnet convs; seeded random weights,
   the LyCORIS ones written by the `lycoris-lora` library, whose rows say so when it is
   missing) in .cache/bench/lora-formats-<size>/. Per format, interleaved: Stencil's cold
   switch (first activation in a fresh library: file check, conversion, load) and warm
   switch (back to it after an untimed switch to another adapter) against the habit's
   unload + `load_lora_weights(file)` + `set_adapters`, timed only where diffusers loads
   the file at all (it is tried once first; an exception is recorded as "cannot load
   it"). Then each loaded adapter's weight change per layer, and one image, against
   LyCORIS's own merge of the file: "loads it wrongly" when layers are off.
   `--format-rounds` (cold steps per format) and `--format-warm` (warm steps per format
   and round) set its length.

`--probe stencil|reload --size SIZE` runs one memory probe and prints JSON; the benchmark
starts those itself in fresh interpreters.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    percentile,
    pipeline_modules,
    ratio_text,
    seconds_text,
    touch_weights,
)

RESULTS_FILE = RESULTS / "lora_switch.md"
FORMATS_RESULTS_FILE = RESULTS / "lora_switch_formats.md"  # --only formats
SWITCH_RESULTS_FILE = BENCH_CACHE / "lora_switch_part1.md"  # --only switch
ONLY_OUTPUT = {"formats": FORMATS_RESULTS_FILE, "switch": SWITCH_RESULTS_FILE}
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
    # Part 4, every LoRA format: the files' rank, fresh libraries (cold steps per format)
    # and warm steps per round.
    format_rank: int = 4
    format_rounds: int = 3
    format_warm: int = 4


SIZES = {
    "tiny": Size("tiny", "tiny family", "float32", "float32", "tiny", 64, 3.0, 8),
    "real": Size(
        "real",
        "SD 1.5 shapes, random weights",
        "bfloat16",
        "float16",
        "sd15",
        128,
        1.0,
        None,
        format_rank=16,
        format_rounds=2,
        format_warm=2,
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
            catalogue_entry(
                lora.name,
                f"Bench rank {lora.rank}" + (" + text encoder" * lora.text_encoder),
                lora.filename,
                size.base_tag,
            )
        )
    write_catalogue(folder, catalogue)
    return info


def catalogue_entry(name: str, display_name: str, file: str, base: str) -> dict[str, Any]:
    return {
        "name": name,
        "display_name": display_name,
        "file": file,
        "base": base,
        "default_weight": 1.0,
        "licence": "CC0-1.0",
        "description": "Seeded random LoRA written by bench/lora_switch.py.",
    }


def write_catalogue(folder: Path, catalogue: list[dict[str, Any]]) -> None:
    text = json.dumps({"version": 1, "loras": catalogue}, indent=2) + "\n"
    (folder / "catalog.json").write_text(text, encoding="utf-8")


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


def generate(pipe, size: Size, output_type: str = "pil"):
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
            output_type=output_type,
        ).images[0]


def pixel_difference(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


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


# ---- 4. every LoRA format: switch latency, and what diffusers makes of each file -----------

FORMAT_SEED = 9_2026
FORMAT_SEQUENCE_SEED = SEQUENCE_SEED + 2
# Resnet convolutions the conv-capable formats also target (they exist at both sizes).
FORMAT_CONVS = (
    "down_blocks.1.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv2",
    "mid_block.resnets.0.conv1",
)
# Per LyCORIS module, the first of these present is a factor its weight change is linear in:
# scaling it sets the layer's strength.
_LINEAR_PARAMS = ("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a", "diff")
LYCORIS_MISSING = "not measured: needs lycoris-lora (pip install -r requirements-dev.txt)"
ONE_LEVEL = 1.0  # of 255: images closer than this count as the same image
# Each layer's change, as a share of the RMS of the layer's weight: visible, not overflowing.
FORMAT_STRENGTH = 0.5


@dataclass(frozen=True)
class BenchFormat:
    key: str
    label: str
    algo: str | None  # the LyCORIS algo that writes it; None: diffusers' save_lora_weights
    convs: bool  # whether it also targets FORMAT_CONVS
    alpha: float = 1.0  # alpha as a share of the rank (the same for every module)
    options: tuple[tuple[str, Any], ...] = ()  # further LyCORIS options
    vary_alphas: bool = False  # then each module's alpha differs (resize_lora, merges)
    rank: int | None = None  # None: the size's format_rank

    @property
    def name(self) -> str:
        return f"fmt-{self.key}"

    @property
    def filename(self) -> str:
        return f"{self.name}.safetensors"

    @property
    def adapter(self) -> str:
        """The adapter name the reload habit loads it under (none is part of another)."""
        return f"{self.key.replace('-', '_')}_habit"


FORMATS = (
    BenchFormat("peft", "diffusers / peft LoRA", None, False),
    BenchFormat("kohya", "kohya LoRA, one alpha", "lora", False, alpha=0.5),
    BenchFormat(
        "kohya-alphas", "kohya LoRA, per-module alphas", "lora", False, alpha=0.5, vary_alphas=True
    ),
    BenchFormat("locon", "LoCon (conv layers)", "locon", True, alpha=0.5),
    BenchFormat(
        "locon-tucker", "LoCon, Tucker (lora_mid)", "locon", True, 0.5, (("use_tucker", True),)
    ),
    # LoHa and LoKr at alpha = rank: LyCORIS 4.1.3's own merge (the truth below) applies
    # their alpha / rank twice (see loras/README.md).
    BenchFormat("loha", "LoHa (hada_*)", "loha", True),
    BenchFormat("lokr", "LoKr (lokr_*)", "lokr", True),
    BenchFormat("full", "full diff (diff, diff_b)", "full", True),
    BenchFormat("dora", "DoRA (dora_scale)", "lora", True, 0.5, (("dora_wd", True),)),
)
FORMAT_BY_KEY = {fmt.key: fmt for fmt in FORMATS}
# The adapter a warm step switches away from (untimed) before switching back to the format.
BETWEEN_FORMAT = BenchFormat("between", "between", None, False, rank=4)
# A small converted file on a throwaway library: the conversion path's first-call costs.
WARMUP_FORMAT = BenchFormat("warmup", "warm-up", "lora", True, 0.5, vary_alphas=True, rank=4)


@dataclass(frozen=True)
class FormatStep:
    key: str
    cold: bool  # the format's first use by this round's library
    round: int


def format_sequence(keys: Sequence[str], rounds: int, warm: int) -> list[FormatStep]:
    """Per round, every format in a seeded shuffled order: its cold step, then `warm` warm
    steps (each after an untimed switch to another adapter)."""
    rng = random.Random(FORMAT_SEQUENCE_SEED)
    steps = []
    for round_ in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        for key in order:
            steps.append(FormatStep(key, True, round_))
            steps += [FormatStep(key, False, round_)] * warm
    return steps


def format_folder(size: Size) -> Path:
    return BENCH_CACHE / f"lora-formats-{size.name}"


def lycoris_available() -> bool:
    try:
        import lycoris  # noqa: F401
    except ImportError:
        return False
    return True


def format_targets(unet, convs: bool) -> list[str]:
    """Every attention projection (to_q, to_k, to_v, to_out.0 of attn1 and attn2), plus
    FORMAT_CONVS for the formats with conv layers."""
    import torch

    names = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.endswith(UNET_TARGETS)
        and ".attentions." in name
    ]
    return names + list(FORMAT_CONVS) * convs


def write_format_files(size: Size, pipe) -> dict[str, dict[str, Any]]:
    """One UNet-only file per format (seeded), the between and warm-up files, a catalogue."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    folder = format_folder(size)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, size.file_dtype)
    has_lycoris = lycoris_available()
    if not has_lycoris:
        print(
            "  lycoris-lora is missing: part 4 measures the peft file only "
            "(pip install -r requirements-dev.txt for the others)",
            flush=True,
        )
    info: dict[str, dict[str, Any]] = {}
    catalogue = []
    for index, fmt in enumerate([*FORMATS, BETWEEN_FORMAT, WARMUP_FORMAT]):
        rank = fmt.rank or size.format_rank
        targets = format_targets(pipe.unet, fmt.convs)
        generator = torch.Generator().manual_seed(FORMAT_SEED + index)
        strength = FORMAT_STRENGTH
        if fmt.algo is None:
            state = _peft_format_state(pipe.unet, targets, rank, strength, generator)
            StableDiffusionPipeline.save_lora_weights(
                folder,
                unet_lora_layers={k: v.to(dtype).contiguous() for k, v in state.items()},
                weight_name=fmt.filename,
            )
        elif not has_lycoris:
            info[fmt.key] = {"missing": LYCORIS_MISSING}
            continue
        else:
            state = _lycoris_format_state(pipe.unet, fmt, targets, rank, strength, generator)
            tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
            save_file(tensors, str(folder / fmt.filename))
        info[fmt.key] = {
            "rank": rank,
            "targets": targets,
            "layers": len(targets),
            "conv_layers": len(FORMAT_CONVS) * fmt.convs,
            "file_bytes": (folder / fmt.filename).stat().st_size,
        }
        catalogue.append(
            catalogue_entry(fmt.name, f"Bench format {fmt.key}", fmt.filename, size.base_tag)
        )
    write_catalogue(folder, catalogue)
    return info


def _rms(tensor) -> float:
    return float(tensor.float().pow(2).mean().sqrt())


def _peft_format_state(unet, targets, rank: int, strength: float, generator) -> dict[str, Any]:
    """peft keys; each layer's change B @ A has `strength` times the RMS of its weight."""
    import torch

    state = {}
    for name in targets:
        weight = unet.get_submodule(name).weight.detach().float()
        down = torch.randn(rank, weight.shape[1], generator=generator)
        up = torch.randn(weight.shape[0], rank, generator=generator)
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up * (strength * _rms(weight) / _rms(up @ down))
    return state


def _lycoris_format_state(
    unet, fmt: BenchFormat, targets, rank: int, strength: float, generator
) -> dict[str, Any]:
    """The file LyCORIS writes for `fmt` on these layers, every tensor seeded random (the
    way tests/lycoris_corpus.py fills them), each layer's change then scaled to `strength`
    times the RMS of its weight; with vary_alphas, alphas then spread 0.25x to 2.25x."""
    import torch
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset(
        {"target_module": [], "target_name": list(targets), "lora_prefix": "lora_unet"}
    )
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    alpha = fmt.alpha * rank
    network = create_lycoris(
        unet,
        multiplier=1.0,
        algo=fmt.algo,
        linear_dim=rank,
        linear_alpha=alpha,
        conv_dim=rank,
        conv_alpha=alpha,
        **dict(fmt.options),
    )
    network.apply_to()
    try:
        raw = dict(sorted(network.state_dict().items()))
    finally:
        network.restore()
    state = {}
    for key, value in raw.items():
        if key.endswith(".alpha"):
            state[key] = value.detach().clone().float()
        elif key.endswith("dora_scale"):  # the weight's norms, moved by up to 20 %
            noise = 1 + 0.2 * torch.rand(value.shape, generator=generator)
            state[key] = value.detach().float() * noise
        else:
            state[key] = torch.randn(value.shape, generator=generator)
    _set_strength(state, unet, strength)
    if fmt.vary_alphas:
        alphas = [key for key in state if key.endswith(".alpha")]
        for index, key in enumerate(alphas):
            state[key] = state[key] * (0.25 + 0.5 * (index % 5))
    return state


def _set_strength(state: dict[str, Any], unet, strength: float) -> None:
    from pipelines.lycoris_formats import group_by_module, weight_change

    layers = {f"lora_unet_{name.replace('.', '_')}": m for name, m in unet.named_modules()}
    for prefix, params in group_by_module(state).items():
        weight = layers[prefix].weight.detach().float()
        plain = {k: v for k, v in params.items() if k not in ("dora_scale", "diff_b")}
        _, change, _ = weight_change(prefix, plain, tuple(weight.shape), None)
        factor = strength * _rms(weight) / _rms(change)
        linear = next(param for param in _LINEAR_PARAMS if param in params)
        for param in (linear, "diff_b"):
            if param in params:
                state[f"{prefix}.{param}"] = params[param] * factor


def time_format_checks(size: Size, signature, files: dict[str, dict[str, Any]]) -> None:
    """Stencil's file check of each format (`validate_lora`, median of FILE_CHECK_REPEATS)
    and what its report says: converted or not, full-size layers, parameters it will hold.
    A file Stencil refuses is kept out of the timings, with the reason."""
    from pipelines.errors import LoraRejectedError
    from pipelines.lora_files import validate_lora

    for fmt in [WARMUP_FORMAT, *FORMATS]:
        f = files.get(fmt.key, {})
        if "file_bytes" not in f:
            continue
        path = format_folder(size) / fmt.filename
        seconds = []
        try:
            for _ in range(FILE_CHECK_REPEATS):
                started = time.perf_counter()
                report = validate_lora(path, signature, name=fmt.name)
                seconds.append(time.perf_counter() - started)
        except LoraRejectedError as exc:
            f["refused"] = str(exc)
            continue
        f["check_seconds"] = percentile(seconds, 50)
        f["converted_from"] = report.converted_from
        f["full_size_layers"] = report.full_size_layers
        f["held_bytes"] = report.param_count * signature.dtype_bytes
        f["verdict"] = report.verdict()


def format_reload(size: Size, pipe, fmt: BenchFormat) -> None:
    """The plain diffusers habit for one file: drop every adapter, load it, weight it."""
    pipe.unload_lora_weights()
    pipe.load_lora_weights(
        str(format_folder(size)),
        weight_name=fmt.filename,
        adapter_name=fmt.adapter,
        use_safetensors=True,
    )
    pipe.set_adapters([fmt.adapter], adapter_weights=[1.0])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def try_habit(size: Size, pipe, fmt: BenchFormat, file_layers: int) -> dict[str, Any]:
    """One untimed try of the habit on `fmt`: does diffusers load it at all, how many of the
    file's layers get an adapter, and what diffusers and peft said while loading."""
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    saved = [(logger.level, logger.handlers[:]) for logger in loggers]
    for logger in loggers:  # caught, not printed
        logger.setLevel(logging.WARNING)
        logger.handlers = [records]
    result: dict[str, Any] = {"loads": True, "error": None, "file_layers": file_layers}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                format_reload(size, pipe, fmt)
            except Exception as exc:  # what diffusers says when it cannot load the format
                result["loads"] = False
                result["error"] = f"{type(exc).__name__}: {_first_line(str(exc))}"
        said = [*records.messages, *(str(w.message) for w in caught)]
        noise = ("peft_config", "multiple adapters", "No LoRA keys associated to CLIPTextModel")
        said = [m for m in said if not any(n in m for n in noise)]
        result["said"] = [_first_line(m) for m in said]
        result["layers"] = sum(
            1
            for module in pipe.unet.modules()
            if hasattr(module, "lora_A") and fmt.adapter in module.lora_A
        )
        result["magnitude_layers"] = sum(
            1
            for module in pipe.unet.modules()
            if fmt.adapter in getattr(module, "lora_magnitude_vector", {})
        )
    finally:
        for logger, (level, handlers) in zip(loggers, saved):
            logger.handlers = handlers
            logger.setLevel(level)
        # A half-loaded adapter may refuse to go; the next load starts with unload anyway.
        with contextlib.suppress(Exception):
            pipe.unload_lora_weights()
    return result


def _first_line(text: str, limit: int = 160) -> str:
    """A message on one line (its first words: key lists follow on later lines), shortened."""
    line = " ".join(text.split()).replace("|", "/").replace("`", "'")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def generate_array(pipe, size: Size):
    """`generate`'s image as floats in 0..1 (NaN stays visible)."""
    import numpy as np

    return np.asarray(generate(pipe, size, output_type="np"), dtype=np.float64)


def level_difference(a, b) -> float:
    """Largest difference of two images on 0..255 (inf where either has NaN)."""
    import numpy as np

    if a is None or b is None:
        return float("nan")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.abs(a - b).max() * 255)


def lycoris_truth(size: Size, folder: Path, pipe, fmt: BenchFormat, targets: Sequence[str]):
    """LyCORIS's own merge of the file into a fresh float32 UNet: each target layer's weight
    change, and the image of the merged UNet (cast to the model's dtype) through `pipe`'s
    other parts."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from lycoris import LycorisNetwork, create_lycoris_from_weights
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(
        folder, subfolder="unet", torch_dtype=torch.float32, use_safetensors=True
    )
    before = {name: unet.get_submodule(name).weight.detach().clone() for name in targets}
    weights = load_file(str(format_folder(size) / fmt.filename))
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    network, _ = create_lycoris_from_weights(
        1.0, None, unet, {key: value.float() for key, value in weights.items()}
    )
    with torch.no_grad():
        network.merge_to(1.0)
    changes = {name: unet.get_submodule(name).weight.detach() - before[name] for name in targets}
    del before, network
    unet.to(getattr(torch, size.dtype))
    components = {**pipe.components, "unet": unet}
    view = StableDiffusionPipeline(**components, requires_safety_checker=False)
    view.set_progress_bar_config(disable=True)
    return changes, generate_array(view, size)


def peft_truth(size: Size, fmt: BenchFormat, targets: Sequence[str]) -> dict[str, Any]:
    """A peft file's change per layer, B @ A (alpha = rank: scale 1), from the file."""
    from safetensors.torch import load_file

    tensors = load_file(str(format_folder(size) / fmt.filename))
    return {
        name: tensors[f"unet.{name}.lora_B.weight"].float()
        @ tensors[f"unet.{name}.lora_A.weight"].float()
        for name in targets
    }


def layer_errors(unet, adapter: str | None, truth: dict[str, Any]) -> list[float]:
    """Per target layer: how far the weight change `adapter` applies at weight 1 (peft's
    `get_delta_weight`, weights only) is from the truth, relative (0: exact, 1: missing)."""
    import torch

    errors = []
    for name, want in truth.items():
        module = unet.get_submodule(name)
        if adapter is not None and adapter in getattr(module, "lora_A", {}):
            with torch.no_grad():
                got = module.get_delta_weight(adapter).float().reshape(want.shape)
        else:
            got = torch.zeros_like(want)
        errors.append(float((got - want).norm() / want.norm()))
    return errors


def measure_formats(size: Size, folder: Path, files: dict[str, dict[str, Any]]) -> dict:
    """Per format: Stencil's cold and warm switch against the habit, interleaved; then one
    image per format and way, against LyCORIS's own merge of the same file."""
    from pipelines.requests import LoraChoice

    keys = [f.key for f in FORMATS if "check_seconds" in files.get(f.key, {})]
    pipe_stencil, pipe_reload = load_pipe(size, folder), load_pipe(size, folder)
    base_image = generate_array(pipe_reload, size)
    habit = {
        key: try_habit(size, pipe_reload, FORMAT_BY_KEY[key], files[key]["layers"]) for key in keys
    }
    # First-call costs of Stencil's paths (conversion included), on a throwaway library.
    throwaway = new_format_library(size)
    warmups = [f for f in (WARMUP_FORMAT, BETWEEN_FORMAT) if "check_seconds" in files[f.key]]
    warmups = warmups or [BETWEEN_FORMAT]
    for fmt in warmups:
        throwaway.activate(pipe_reload, [LoraChoice(fmt.name, 0.8)])
    throwaway.activate(pipe_reload, [])
    format_reload(size, pipe_reload, BETWEEN_FORMAT)
    pipe_reload.unload_lora_weights()
    del throwaway
    print(f"  formats: diffusers tried each file, {len(keys)} formats", flush=True)

    steps = format_sequence(keys, size.format_rounds, size.format_warm)
    libraries: dict[int, Any] = {}
    held: dict[str, Any] = {}
    evicted: list[int] = []
    resident: list[int] = []  # adapters in the library when the timed switch starts

    def prepare(step: FormatStep):
        """Each round starts with a fresh library (untimed); a warm step first switches to
        another adapter (untimed)."""
        if step.round not in libraries:
            pipe_stencil.unload_lora_weights()
            libraries[step.round] = new_format_library(size)
            libraries[step.round].bind(pipe_stencil)
        library = libraries[step.round]
        if not step.cold:
            library.activate(pipe_stencil, [LoraChoice(BETWEEN_FORMAT.name, 0.8)])
        held["before"] = set(library.loaded())
        return library, (LoraChoice(FORMAT_BY_KEY[step.key].name, 1.0),)

    def finish(step: FormatStep, _result) -> None:
        evicted.append(len(held["before"] - set(libraries[step.round].loaded())))
        resident.append(len(held["before"]))

    def reload(step: FormatStep) -> None:
        if habit[step.key]["loads"]:
            format_reload(size, pipe_reload, FORMAT_BY_KEY[step.key])

    seconds = interleave(
        {
            "reload": Case(run=reload),
            "stencil": Case(
                prepare=prepare,
                run=lambda prepared: prepared[0].activate(pipe_stencil, prepared[1]),
                finish=finish,
            ),
        },
        steps,
    )
    per_format: dict[str, dict[str, Any]] = {}
    for key in keys:
        row: dict[str, Any] = {"habit": habit[key]}
        for kind, cold in (("cold", True), ("warm", False)):
            chosen = [i for i, s in enumerate(steps) if s.key == key and s.cold == cold]
            row[kind] = Comparison(
                [seconds["reload"][i] for i in chosen], [seconds["stencil"][i] for i in chosen]
            )
            row[f"{kind}_evicted"] = sum(evicted[i] for i in chosen)
            row[f"{kind}_resident"] = [resident[i] for i in chosen]
        row["reload"] = row["cold"].baseline + row["warm"].baseline
        per_format[key] = row
    print(f"  formats: {len(steps)} switches timed", flush=True)
    library = libraries[steps[-1].round]
    has_lycoris = lycoris_available()
    for key in keys:  # the layer and image checks, at weight 1
        fmt, row = FORMAT_BY_KEY[key], per_format[key]
        targets = files[key]["targets"]
        truth, truth_image = None, None
        if fmt.algo is None:
            truth = peft_truth(size, fmt, targets)
        elif has_lycoris:
            try:
                truth, truth_image = lycoris_truth(size, folder, pipe_reload, fmt, targets)
            except Exception as exc:  # the truth is a check; say why it is missing
                row["truth_error"] = f"{type(exc).__name__}: {_first_line(str(exc))}"
        library.activate(pipe_stencil, [LoraChoice(fmt.name, 1.0)])
        (stencil_adapter,) = pipe_stencil.get_active_adapters()
        stencil_image = generate_array(pipe_stencil, size)
        habit_image = None
        if row["habit"]["loads"]:
            format_reload(size, pipe_reload, fmt)
            habit_image = generate_array(pipe_reload, size)
        if truth is not None:
            row["stencil_errors"] = layer_errors(pipe_stencil.unet, stencil_adapter, truth)
            if row["habit"]["loads"]:
                row["habit_errors"] = layer_errors(pipe_reload.unet, fmt.adapter, truth)
        del truth
        row["images"] = {
            "stencil_vs_base": level_difference(stencil_image, base_image),
            "stencil_vs_truth": level_difference(stencil_image, truth_image),
            "habit_vs_truth": level_difference(habit_image, truth_image),
            "habit_vs_stencil": level_difference(habit_image, stencil_image),
            "habit_vs_base": level_difference(habit_image, base_image),
        }
        row["habit_verdict"] = habit_verdict(row)
    pipe_reload.unload_lora_weights()
    return {"steps": steps, "formats": per_format, "keys": keys}


def new_format_library(size: Size):
    from pipelines.loras import LoraLibrary

    return LoraLibrary(format_folder(size), size.base_tag)


LAYER_TOLERANCE = 0.05  # a layer whose change is off by more than 5 % is applied wrongly


def habit_verdict(row: dict[str, Any]) -> str:
    """What the habit makes of the file: cannot load it, loads it wrongly, or loads it."""
    h = row["habit"]
    if not h["loads"]:
        return "cannot load it"
    errors = row.get("habit_errors")
    if errors is None:  # no truth: the image against Stencil's is all there is
        same = row["images"]["habit_vs_stencil"] <= ONE_LEVEL
        return "loads it (same image as Stencil)" if same else "loads it (not the same image)"
    wrong = sum(error > LAYER_TOLERANCE for error in errors)
    if h.get("magnitude_layers"):
        return f"loads it as peft DoRA on {h['magnitude_layers']} layers (not checked)"
    if wrong:
        return f"loads it wrongly: {wrong} of {len(errors)} layers off"
    return "loads it right"


def _error_text(errors: list[float] | None) -> str:
    if errors is None:
        return "-"
    wrong = sum(error > LAYER_TOLERANCE for error in errors)
    return f"max {max(errors):.2%}" + (f", {wrong} off" if wrong else "")


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


def bench_size(
    size: Size, count: int, rounds: int, memory_switches: int, only: str | None = None
) -> dict[str, Any]:
    """Parts 1 to 4 at one size (`only="formats"`: part 4 alone; `"switch"`: part 1)."""
    import gc

    import torch

    from pipelines.lora_files import ModelSignature

    torch.set_num_threads(size.threads)
    print(f"[{size.name}] {size.label}, {size.dtype}", flush=True)
    started = time.perf_counter()
    folder = model_folder(size)
    writer = load_pipe(size, folder)
    result: dict[str, Any] = {"size": size}
    if only != "formats":
        result["files"] = write_loras(size, writer)
        time_file_checks(size, writer, result["files"])
    if only == "switch":
        del writer
        result["switching"] = measure_switching(size, folder, count, rounds)
        for key in ("library", "pipe"):
            result["switching"].pop(key)
        print(f"  switching: {time.perf_counter() - started:.0f} s", flush=True)
        result["seconds"] = time.perf_counter() - started
        return result
    signature = ModelSignature.from_pipeline(writer)  # before LyCORIS has seen the UNet
    format_files = write_format_files(size, writer)
    time_format_checks(size, signature, format_files)
    del writer
    if only is None:
        switching = measure_switching(size, folder, count, rounds)
        print(f"  switching: {time.perf_counter() - started:.0f} s", flush=True)
        result["hotswap"] = measure_hotswap(size, folder, switching, count)
        print(f"  hotswap: {time.perf_counter() - started:.0f} s", flush=True)
        switching.pop("library")
        switching.pop("pipe")
        result["switching"] = switching
        result["probes"] = run_probes(size, memory_switches)
        gc.collect()
    result["format_files"] = format_files
    result["formats"] = measure_formats(size, folder, format_files)
    print(f"  formats: {time.perf_counter() - started:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - started
    return result


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
        "steps use only adapters seen before (Stencil sets the active set and the scales on "
        "the LoRA layers of the previous and the new set only, `LoraLayerIndex`). The "
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
        "(all adapters loaded, so a switch only sets the active set and scales); hotswap mode "
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


def _count_text(counts: list[int]) -> str:
    """Median, and the range when it varies."""
    middle = f"{percentile(counts, 50):g}"
    return middle if min(counts) == max(counts) else f"{middle} ({min(counts)}-{max(counts)})"


def _levels(value: float) -> str:
    if value != value:  # NaN: not measured
        return "-"
    return "NaN in image" if value == float("inf") else f"{value:.1f}"


def section_formats(results) -> list[str]:
    rows, image_rows, said, notes = [], [], [], []
    for r in results:
        s, files, measured = r["size"], r["format_files"], r["formats"]["formats"]
        for fmt in FORMATS:
            f = files.get(fmt.key, {})
            if fmt.key not in measured:
                why = f.get("missing") or f"Stencil refuses the file: {f.get('refused')}"
                rows.append([s.name, fmt.label, *["-"] * 8, why, "-", "-"])
                continue
            row, h = measured[fmt.key], measured[fmt.key]["habit"]
            layers = str(f["layers"])
            if f["conv_layers"]:
                layers += f" ({f['conv_layers']} conv)"
            if f["full_size_layers"]:
                layers += f", {f['full_size_layers']} full size"
            cold, warm = row["cold"], row["warm"]
            if h["loads"]:
                reload_text = seconds_text(percentile(row["reload"], 50))
                if row["habit_verdict"].startswith("loads it wrongly"):
                    reload_text += " (applies it wrongly)"
                ratios = [ratio_text(warm.ratio_of_medians), ratio_text(cold.ratio_of_medians)]
            else:
                reload_text, ratios = "n/a: diffusers cannot load it", ["-", "-"]
            rows.append(
                [
                    s.name,
                    fmt.label,
                    layers,
                    bytes_text(f["file_bytes"]),
                    bytes_text(f["held_bytes"]),
                    seconds_text(f["check_seconds"]),
                    seconds_text(percentile(cold.contender, 50)),
                    seconds_text(percentile(warm.contender, 50)),
                    seconds_text(percentile(warm.contender, 95)),
                    _count_text(row["warm_resident"]),
                    reload_text,
                    *ratios,
                ]
            )
            im = row["images"]
            loaded = f"{h['layers']} of {h['file_layers']}" if h["loads"] else "-"
            if h.get("magnitude_layers"):
                loaded += f" ({h['magnitude_layers']} with a peft DoRA magnitude)"
            image_rows.append(
                [
                    s.name,
                    fmt.label,
                    row["habit_verdict"],
                    loaded,
                    _error_text(row.get("stencil_errors")),
                    _error_text(row.get("habit_errors")),
                    _levels(im["habit_vs_stencil"]),
                    _levels(im["stencil_vs_truth"]),
                    _levels(im["habit_vs_truth"]),
                    _levels(im["stencil_vs_base"]),
                ]
            )
            words = [h["error"]] if h["error"] else list(dict.fromkeys(h["said"]))[:2]
            if words:
                said.append(f"- {s.name}, {fmt.label}: " + "; ".join(f"`{w}`" for w in words))
            if row.get("truth_error"):
                notes.append(
                    f"- {s.name}, {fmt.label}: no LyCORIS merge to compare ({row['truth_error']})"
                )
            if row["cold_evicted"] or row["warm_evicted"]:
                notes.append(
                    f"- {s.name}, {fmt.label}: its {cold.n} cold switches evicted "
                    f"{row['cold_evicted']} adapters, its {warm.n} warm switches "
                    f"{row['warm_evicted']} (least recently used first, to stay within the "
                    "library's default 512 MB budget)."
                )
    sizes_text = "; ".join(
        f"{r['size'].name}: rank {r['size'].format_rank}, {r['size'].file_dtype} files, "
        f"{r['size'].format_rounds} rounds x {r['size'].format_warm} warm steps, "
        f"{r['size'].side}x{r['size'].side} px images"
        for r in results
    )
    lines = [
        "## 4. Every LoRA format: switch latency, and what diffusers makes of each file",
        "",
        'One UNet-only file per format Stencil supports (loras/README.md, "Formats"), written',
        "with seeded random weights: the peft file by diffusers' `save_lora_weights`, the others",
        "by the LyCORIS library itself (`lycoris-lora`, as tests/lycoris_corpus.py writes them).",
        "Targets: every attention projection of the UNet (`to_q`, `to_k`, `to_v`, `to_out.0` of",
        "attn1 and attn2 in every transformer block); the conv formats also three resnet",
        f"convolutions ({', '.join(f'`{c}`' for c in FORMAT_CONVS)}).",
        f"Each layer's change is {FORMAT_STRENGTH:.0%} of the RMS of its weight (visible, not",
        "overflowing); the kohya, LoCon and DoRA files have alpha = rank / 2, LoHa and LoKr",
        "alpha = rank, the per-module-alpha file's alphas then spread 0.25x to 2.25x. LoKr, full",
        "diff and DoRA layers are full size once converted: Stencil carries their whole change",
        f"against an identity. {sizes_text}.",
        "",
        "Two pipelines from the same folder. First the habit tries each file once (untimed):",
        "can diffusers load it at all? Then, interleaved step by step, per round (Stencil: a",
        "fresh `LoraLibrary`, bound once, as after a restart) every format in a seeded shuffled",
        "order:",
        "",
        "- **Stencil cold**: the format's first activation in the round: name resolved, file",
        "  checked (`validate_lora`, the *file check* column alone), converted to an exact",
        "  standard LoRA where it is not one (`pipelines/lycoris_formats.py`), loaded, its",
        "  scales verified; with any LRU eviction that makes room.",
        "- **Stencil warm**: an untimed switch to a small other adapter (rank 4, peft), then the",
        "  timed switch back to the format, already loaded: active set and scales only.",
        "- **diffusers reload**: the habit on every step of the format (it keeps nothing):",
        "  `unload_lora_weights()` + `load_lora_weights(folder, weight_name=file)` +",
        "  `set_adapters([name], [1.0])`. Only where diffusers loads the file at all.",
        "",
        "Ratios: the habit's p50 over Stencil's warm p50, and over Stencil's cold p50 (the same",
        "steps, run back to back). *Stencil holds* is the adapter's parameter bytes in the model",
        "(full-size layers carry the layer's whole change against an identity). A warm switch",
        "sets the active set and the scales on the layers of the previous and the new adapters",
        "only (`LoraLayerIndex` in `pipelines/adapters.py`; before, `enable_lora` +",
        "`set_adapters` walked every module and every adapter in the model, so the cost",
        "followed the adapters loaded at that moment: median, and range, in *adapters loaded",
        "at warm steps*).",
        "",
        markdown_table(
            [
                "size",
                "format",
                "layers",
                "file",
                "Stencil holds",
                "file check",
                "Stencil cold p50",
                "Stencil warm p50",
                "warm p95",
                "adapters loaded at warm steps",
                "diffusers reload p50",
                "reload / warm",
                "reload / cold",
            ],
            rows,
        ),
        "",
        "### What diffusers makes of each file",
        "",
        "After the timings, each way activates the file at weight 1. The truth is LyCORIS's",
        "own `merge_to(1.0)` of the same file into a fresh float32 UNet (for the peft file: its",
        "B @ A). Layer changes: per target layer, the weight change the loaded adapter applies",
        "(peft's `get_delta_weight`; biases left out) against the merge's, as a relative error",
        f"(0 exact, 100 % missing); a layer off by more than {LAYER_TOLERANCE:.0%} is applied",
        "wrongly. Images: one per way (1 step, Euler, guidance 5, same seed; the truth's is the",
        "merged UNet cast to the model's dtype), max difference on 0..255. The habit *cannot",
        "load it* when `load_lora_weights` raises. In bfloat16 a merged UNet and an unmerged",
        "adapter differ by rounding alone (see the rows where both ways load the same file",
        "identically), so at real size the layer check decides, not the image.",
        "",
        markdown_table(
            [
                "size",
                "format",
                "diffusers",
                "layers with a diffusers adapter",
                "Stencil's layer changes vs truth",
                "diffusers' layer changes vs truth",
                "image: diffusers vs Stencil",
                "image: Stencil vs merge",
                "image: diffusers vs merge",
                "image: Stencil vs base",
            ],
            image_rows,
        ),
        "",
    ]
    if said:
        lines += ["What diffusers and peft said on their one untimed try (first lines):", ""]
        lines += [*said, ""]
    if notes:
        lines += [*notes, ""]
    return lines


def section_summary(results) -> list[str]:
    lines = ["## Summary of the measurements", ""]
    for r in results:
        s, p, h = r["size"], r["probes"], r["hotswap"]
        biggest = p["stencil"]["adapters"][-1]
        file_bytes = r["files"][biggest["name"]]["file_bytes"]
        lines.append(
            switch_summary(r) + f" The rank-64 adapter adds {bytes_text(biggest['param_bytes'])}"
            f" of parameters ({'/'.join(biggest['dtypes'])}) for a {bytes_text(file_bytes)} "
            f"{s.file_dtype} file; all five held cost "
            f"{bytes_text(p['stencil']['all_loaded']['Pss_Anon'])} of anonymous PSS. Hotswap "
            f"mode switches take {ratio_text(h['all'].ratio_of_medians)} as long as normal "
            f"mode's at p50 ({h['swapped'].n} of {h['all'].n} steps had to load a file into "
            "a slot)."
        )
    return lines + format_summary_lines(results)


def switch_summary(r) -> str:
    """Part 1 at one size, as one bullet line."""
    s, sw = r["size"], r["switching"]
    warm, cold = sw["split"]["warm"], sw["split"]["cold"]
    rows = sw["images"]["rows"]
    singles_same = all(row["same"] for row in rows if "+" not in row["set"])
    pair_diffs = [row["max_diff"] for row in rows if "+" in row["set"]]
    images = (
        "No LoRA and every single adapter gave the same image both ways, bit for bit; "
        if singles_same
        else "Some single-adapter images DIFFERED between the two ways (see the table); "
    )
    images += (
        f"the pair matched in one request order and differed by up to {max(pair_diffs)} "
        "of 255 in the other (summation order: see the order table of part 1)."
        if 0 in pair_diffs and max(pair_diffs) > 0
        else f"the pair's largest difference was {max(pair_diffs)} of 255."
    )
    return (
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
    )


def _spread(measured: dict[str, dict[str, Any]], kind: str) -> str:
    """Stencil's fastest and slowest format at p50 for one kind of step."""

    def p50(key: str) -> float:
        return percentile(measured[key][kind].contender, 50)

    keys = sorted(measured, key=p50)
    first, last = FORMAT_BY_KEY[keys[0]].label, FORMAT_BY_KEY[keys[-1]].label
    if len(keys) == 1:
        return f"{seconds_text(p50(keys[0]))} ({first})"
    return f"{seconds_text(p50(keys[0]))} ({first}) to {seconds_text(p50(keys[-1]))} ({last})"


def format_summary_lines(results) -> list[str]:
    lines = []
    for r in results:
        s, measured = r["size"], r["formats"]["formats"]
        if not measured:
            continue
        label = {key: FORMAT_BY_KEY[key].label for key in measured}
        by_verdict: dict[str, list[str]] = {}
        for key, row in measured.items():
            verdict = row["habit_verdict"]
            kind = "cannot" if verdict == "cannot load it" else "loads wrongly"
            kind = kind if verdict.startswith(("cannot", "loads it wrongly")) else "loads"
            by_verdict.setdefault(kind, []).append(label[key])
        loads = [k for k in measured if label[k] in by_verdict.get("loads", [])]
        text = (
            f"- **{s.name}** formats (rank {s.format_rank}): Stencil's warm switch takes "
            f"{_spread(measured, 'warm')} at p50, its cold switch {_spread(measured, 'cold')}. "
        )
        if by_verdict.get("cannot"):
            text += f"diffusers cannot load {', '.join(by_verdict['cannot'])}. "
        if by_verdict.get("loads wrongly"):
            text += (
                f"It loads {', '.join(by_verdict['loads wrongly'])} but applies it wrongly "
                "(see the layer check). "
            )
        if loads:
            ratios = sorted(measured[k]["warm"].ratio_of_medians for k in loads)
            spread = ratio_text(ratios[0])
            if len(ratios) > 1:
                spread += f" to {ratio_text(ratios[-1])}"
            text += (
                f"Where it applies the file right ({', '.join(label[k] for k in loads)}), its "
                f"reload takes {spread} as long as Stencil's warm switch."
            )
        if len(measured) < len(FORMATS):
            text += f" Only {len(measured)} of {len(FORMATS)} formats measured (see part 4)."
        lines.append(text)
    return lines


def report(results: list[dict[str, Any]], runtime: float) -> str:
    import peft

    formats_only = "switching" not in results[0]
    switch_only = "formats" not in results[0]
    dtypes = ", ".join(
        f"{r['size'].name}: model {r['size'].dtype}, LoRA files {r['size'].file_dtype}"
        for r in results
    )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = (
        "# LoRA switching per format: Stencil's LoraLibrary vs unload + load"
        if formats_only
        else "# LoRA switching: Stencil's LoraLibrary vs unload + load on every request"
    )
    parts = [
        title,
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
        f"- peft {peft.__version__}, {lycoris_version()}; {results[0]['size'].threads} torch "
        "thread(s)",
        "",
    ]
    if formats_only:
        parts += [
            "Part 4 of `bench/lora_switch.py` alone (`--only formats`); parts 1 to 3 (peft",
            "files of five ranks, memory, hotswap) are in `lora_switch.md`.",
            "",
        ]
    elif switch_only:
        parts += ["Part 1 of `bench/lora_switch.py` alone (`--only switch`).", ""]
        parts += [WHAT_IS_COMPARED, ""]
        parts += section_files(results)
        parts += section_switching(results)
        parts += ["## Summary of the measurements", ""]
        parts += [switch_summary(r) for r in results]
        return "\n".join(parts) + "\n"
    else:
        parts += [WHAT_IS_COMPARED, ""]
        parts += section_files(results)
        parts += section_switching(results)
        parts += section_memory(results)
        parts += section_hotswap(results)
    parts += section_formats(results)
    if formats_only:
        parts += ["## Summary of the measurements", "", *format_summary_lines(results)]
    else:
        parts += section_summary(results)
    return "\n".join(parts) + "\n"


def lycoris_version() -> str:
    try:
        from importlib.metadata import version

        return f"lycoris-lora {version('lycoris-lora')}"
    except Exception:  # not installed: part 4 says so in its rows
        return "lycoris-lora not installed"


WHAT_IS_COMPARED = """\
What is compared, on two pipelines loaded from the same folder with
`StableDiffusionPipeline.from_pretrained` (tiny: Stencil's tiny family; real: SD 1.5's exact
shapes with seeded random weights, `.cache/bench/sd15-random`):

- **Stencil**: `LoraLibrary(folder, base).activate(pipe, choices)` (`pipelines/loras.py`),
  bound once to the pipeline as the engine does. It resolves each name in the catalogue,
  checks the file once (`pipelines/lora_files.py`: header, keys and shapes against the
  model), loads it once under its own adapter name, and afterwards only sets, on the
  LoRA layers of the previous and the new set (listed once per load:
  `pipelines/adapters.py`, `LoraLayerIndex`), the active adapters and their scales, as
  `enable_lora()` + `set_adapters(...)` would for all components (or nothing, when the
  set is already active).
- **reload habit**: per request `pipe.unload_lora_weights()`, then
  `pipe.load_lora_weights(folder, weight_name=file, adapter_name=...)` for each adapter of
  the set, then `pipe.set_adapters(names, adapter_weights=weights)`.
- Before timing, both paths are run once on a throwaway adapter (lazy imports); the LoRA
  files are in the page cache (written just before), so "cold" means first use by the
  model, not a cold disk."""


def main(argv: list[str] | None = None) -> None:
    parser = common.bench_parser(__doc__.split("\n\n")[0], PROBES, SIZES, RESULTS_FILE)
    parser.set_defaults(output=None)  # chosen below: it depends on --only
    parser.add_argument("--switches", type=int, default=48, help="switches per sequence (>= 10)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="fresh Stencil libraries over the sequence"
    )
    parser.add_argument(
        "--only",
        choices=sorted(ONLY_OUTPUT),
        help="run part 4 alone (formats: every LoRA format) or part 1 alone (switch: switch "
        f"latency and the image check); the results go to "
        f"{FORMATS_RESULTS_FILE.relative_to(common.ROOT)} or "
        f"{SWITCH_RESULTS_FILE.relative_to(common.ROOT)} unless --output says otherwise",
    )
    parser.add_argument(
        "--format-rounds",
        type=int,
        help="part 4: fresh Stencil libraries, i.e. cold steps per format (default: tiny "
        f"{SIZES['tiny'].format_rounds}, real {SIZES['real'].format_rounds})",
    )
    parser.add_argument(
        "--format-warm",
        type=int,
        help="part 4: warm steps per format and round (default: tiny "
        f"{SIZES['tiny'].format_warm}, real {SIZES['real'].format_warm})",
    )
    args = parser.parse_args(argv)
    common.setup()
    warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
    # Part 4: peft's note on a full diff's bias change for a layer without a bias of its own.
    warnings.filterwarnings("ignore", message=".*lora_bias=True.*has no bias.*")
    # Part 4's habit on the per-module-alpha file (its one untimed try records it).
    warnings.filterwarnings("ignore", message=".*alpha_pattern keys did not match.*")
    sizes = common.with_threads(SIZES, args.threads)
    overrides = {
        field: value
        for field, value in (
            ("format_rounds", args.format_rounds),
            ("format_warm", args.format_warm),
        )
        if value is not None
    }
    sizes = {name: replace(size, **overrides) for name, size in sizes.items()}
    if args.probe:
        print(json.dumps(probe(args.probe, sizes[args.size or "tiny"], args.switches)))
        return
    names = common.parse_size_names(parser, args.sizes, SIZES)
    if args.switches < 10 or (args.threads or 1) < 1:
        parser.error("--switches at least 10, --threads at least 1")
    if not 1 <= args.rounds <= args.switches // 5:
        parser.error("--rounds from 1 to a fifth of --switches")
    if any(value < 1 for value in overrides.values()):
        parser.error("--format-rounds and --format-warm at least 1")
    output = args.output or ONLY_OUTPUT.get(args.only, RESULTS_FILE)
    started = time.perf_counter()
    memory_switches = min(args.switches, 24)
    results = [
        bench_size(sizes[name], args.switches, args.rounds, memory_switches, args.only)
        for name in names
    ]
    common.write_report(report(results, time.perf_counter() - started), output)


if __name__ == "__main__":
    main()
