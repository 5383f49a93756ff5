"""Many users on one model: Stencil's fair scheduler against a one-at-a-time FIFO.

    .venv/bin/python bench/many_users.py [--sizes tiny,real] [--users 16]

Writes bench/results/many_users.md (or `--output PATH`) and prints it.

16 simulated users arrive at once; each sends 1 to 4 requests drawn from a seeded mix
(a LoRA set shared by many users, one of a few distinct sets, or none; with a canny control
or without). The same workload is served, one approach after the other, by one engine
(the real `Engine`; only its scheduler is swapped between approaches):

- fifo: what Stencil did before its scheduler, one request at a time in arrival order
  (the scheduler with turns and reordering switched off, batches of one).
- fair: round-robin turns between users and adapter-aware order (the default).
- fair + batch N: the same, with compatible requests sharing forward passes padded to N.

Reported per approach: throughput (images/s over the whole burst), wait until the first
denoising step and total latency (p50/p95 over requests), each user's mean latency, Jain's
fairness index over each user's time per image asked for (1 = all served alike), LoRA
switches, forward-pass groups run, and whether every image is the same bytes as under fifo.
Then the padding cost: a lone request run at batch N (N - 1 places padded) against batch 1.

Sizes: tiny (Stencil's tiny family, float32, 64 px, 2 steps) and real (SD 1.5 shapes with
random weights, `common.ensure_sd15_random`, 128 px, 1 step). Torch runs on one thread by
default (see bench/README.md): ratios need steady timings more than fast ones.
"""

from __future__ import annotations

import datetime
import json
import random
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
from common import BENCH_CACHE, RESULTS, markdown_table, seconds_text

RESULTS_FILE = RESULTS / "many_users.md"


@dataclass(frozen=True)
class Size:
    name: str
    label: str
    dtype: str
    side: int
    steps: int
    max_requests: int  # per user: 1 to this many
    threads: int = 1


SIZES = {
    "tiny": Size("tiny", "tiny family", "float32", 64, 2, 4),
    "real": Size("real", "SD 1.5 shapes, random weights", "bfloat16", 128, 1, 2),
}


# ---- the engine, the LoRAs, the workload ----------------------------------------------------


def start_engine(size: Size):
    from pipelines.engine import Engine
    from pipelines.families import FAMILIES

    if size.name == "tiny":
        return Engine(FAMILIES["tiny"], cache_root=BENCH_CACHE, lora_folder=common.ROOT / "loras")
    from pipelines.controls import CONTROLS

    base = common.ensure_sd15_random(BENCH_CACHE, ("canny",))
    common.link_into_hub_cache(base / "controlnet-canny", CONTROLS["canny"].controlnets["sd15"])
    return Engine.start(
        str(base), cache_root=BENCH_CACHE, dtype=size.dtype, lora_folder=real_loras(base)
    )


def real_loras(base: Path) -> Path:
    """Four rank-16 LoRAs on the UNet's attention at SD 1.5 shapes, seeded, in a catalogue."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = BENCH_CACHE / "many-users-loras"
    names = [f"real-{i}" for i in range(4)]
    if (folder / "catalog.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    for index, name in enumerate(names):
        unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=targets), name)
        generator = torch.Generator().manual_seed(index)
        state = {
            f"unet.{key.replace(f'.{name}', '')}": torch.randn(v.shape, generator=generator) * 0.01
            for key, v in get_peft_model_state_dict(unet, adapter_name=name).items()
        }
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(folder / f"{name}.safetensors")
        )
        unet.delete_adapters(name)
    entries = [
        {"name": name, "file": f"{name}.safetensors", "base": "sd15", "licence": "bench"}
        for name in names
    ]
    (folder / "catalog.json").write_text(json.dumps({"version": 1, "loras": entries}))
    return folder


def photo(side: int, shift: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), "black")
    ImageDraw.Draw(image).ellipse(
        (side // 8 + shift, side // 6, side // 2 + shift, side - 8), "white"
    )
    return image


def workload(size: Size, users: int, lora_names: list[str]) -> list[tuple[str, Any]]:
    """(user, request) pairs, the same for every approach: a seeded mix."""
    from pipelines.requests import ControlUnit, GenerationRequest, LoraChoice

    shared = ((lora_names[0], 0.8),)
    distinct = [((name, 0.6),) for name in lora_names[1:]]
    rng = random.Random(20261201)
    pairs = []
    for user in range(users):
        for index in range(rng.randint(1, size.max_requests)):
            kind = rng.random()
            loras = shared if kind < 0.5 else rng.choice(distinct) if kind < 0.75 else ()
            controls = (
                (ControlUnit("canny", photo(size.side, user % 5)),) if rng.random() < 0.5 else ()
            )
            request = GenerationRequest(
                prompt=f"user {user} picture {index}",
                seed=user * 100 + index,
                steps=size.steps,
                width=size.side,
                height=size.side,
                loras=tuple(LoraChoice(n, w) for n, w in loras),
                controls=controls,
                session_id=f"user-{user}",
            )
            pairs.append((f"user-{user}", request))
    return pairs


# ---- the approaches ------------------------------------------------------------------------


def fifo_scheduler(engine):
    from pipelines.scheduler import FairScheduler, QueueRules

    class Fifo(FairScheduler):
        """The old way: the oldest request next, whoever sent it, alone."""

        def _next_in_turn(self):
            return min(self._waiting.in_turn_order(), key=lambda job: job.number)

    return Fifo(engine._run_batch, QueueRules(per_session=1000, total=1000))


def fair_scheduler(engine, batch_size: int):
    from pipelines.scheduler import FairScheduler, QueueRules

    rules = QueueRules(per_session=1000, total=1000, batch_size=batch_size)
    return FairScheduler(engine._run_batch, rules)


def serve(engine, scheduler, pairs) -> dict[str, Any]:
    """Every request submitted while the scheduler is held, then let go at once."""
    engine.scheduler = scheduler
    started: dict[int, float] = {}
    finished: dict[int, float] = {}
    images: dict[int, bytes] = {}

    def one(index, request):
        def progress(done, total, stage, index=index):
            if stage == "denoising":
                started.setdefault(index, time.perf_counter())

        result = engine.generate(request, progress=progress)
        finished[index] = time.perf_counter()
        images[index] = result.images[0].tobytes()

    threads = [threading.Thread(target=one, args=(i, r)) for i, (_, r) in enumerate(pairs)]
    with scheduler.holding():
        for thread in threads:
            thread.start()
        while scheduler.waiting_count() < len(pairs):
            time.sleep(0.005)
        opened = time.perf_counter()
    for thread in threads:
        thread.join()
    makespan = max(finished.values()) - opened
    waits = [started[i] - opened for i in range(len(pairs))]
    latencies = [finished[i] - opened for i in range(len(pairs))]
    per_user: dict[str, list[float]] = {}
    for (user, _), latency in zip(pairs, latencies):
        per_user.setdefault(user, []).append(latency)
    means = [statistics.mean(v) for v in per_user.values()]
    # What a user feels, per image asked for: the wait for all of them over how many. Plain
    # latencies would call it unfair that one image comes before four.
    per_image = [max(v) / len(v) for v in per_user.values()]
    return {
        "images_per_s": len(pairs) / makespan,
        "makespan": makespan,
        "wait_p50": percentile(waits, 50),
        "wait_p95": percentile(waits, 95),
        "latency_p50": percentile(latencies, 50),
        "latency_p95": percentile(latencies, 95),
        "jain": sum(per_image) ** 2 / (len(per_image) * sum(m * m for m in per_image)),
        "worst_user_mean": max(means),
        "switches": scheduler.stats.adapter_switches,
        "switches_saved": scheduler.stats.switches_saved,
        "runs": scheduler.stats.runs,
        "images": images,
    }


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def padding_cost(engine, pairs, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """A lone request at batch 1 and at batch N (N - 1 padded places), alternated."""
    request = pairs[0][1]
    times = {1: [], batch_size: []}
    for _ in range(repeats):
        for size in times:
            engine.scheduler = fair_scheduler(engine, size)
            begin = time.perf_counter()
            engine.generate(request)
            times[size].append(time.perf_counter() - begin)
    alone, padded = (statistics.median(times[s]) for s in (1, batch_size))
    return {"alone": alone, "padded": padded, "ratio": padded / alone}


def bench_size(size: Size, users: int, batch_sizes: list[int]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(size.threads)
    engine = start_engine(size)
    names = [entry.name for entry in engine.loras.catalogue.entries()][:4]
    pairs = workload(size, users, names)
    # Warm: every LoRA set loaded once, every ControlNet built, so approaches start alike.
    engine.scheduler = fair_scheduler(engine, 1)
    for _, request in {tuple(r.loras): (u, r) for u, r in pairs}.values():
        engine.generate(request)
    approaches = {"fifo": fifo_scheduler(engine), "fair": fair_scheduler(engine, 1)}
    for n in batch_sizes:
        approaches[f"fair + batch {n}"] = fair_scheduler(engine, n)
    results = {}
    for name, scheduler in approaches.items():
        print(f"[{size.name}] {name} ...", flush=True)
        results[name] = serve(engine, scheduler, pairs)
    baseline = results["fifo"]["images"]
    for outcome in results.values():
        outcome["same_bytes_as_fifo"] = outcome.pop("images") == baseline
    padding = {n: padding_cost(engine, pairs, n) for n in batch_sizes}
    return {"size": size, "requests": len(pairs), "results": results, "padding": padding}


# ---- the report ------------------------------------------------------------------------------


def report(measured: list[dict[str, Any]], users: int, runtime: float) -> str:
    lines = [
        "# Many users on one model",
        "",
        f"Measured {datetime.date.today().isoformat()} in {runtime:.0f} s with",
        f"`{common.command_line()}`.",
        "",
        *common.machine_lines("float32 at tiny size, bfloat16 at SD 1.5 shapes"),
        "",
        f"{users} users arrive at once, each with 1 to N requests from a seeded mix (LoRA set"
        " shared / distinct / none, canny control or not); every approach serves the same"
        " workload on the same engine. Wait: until the request's first denoising step."
        " Jain: fairness over the users' time per image asked for (the wait until all of a"
        " user's images, over their number; 1 = every user served alike).",
        "",
    ]
    for item in measured:
        size = item["size"]
        lines += [
            f"## {size.label} ({size.side} px, {size.steps} steps, {item['requests']} requests)",
            "",
        ]
        fifo = item["results"]["fifo"]
        rows = []
        for name, r in item["results"].items():
            rows.append(
                [
                    name,
                    f"{r['images_per_s']:.2f} ({r['images_per_s'] / fifo['images_per_s']:.2f}x)",
                    seconds_text(r["wait_p50"]),
                    seconds_text(r["wait_p95"]),
                    seconds_text(r["latency_p50"]),
                    seconds_text(r["latency_p95"]),
                    seconds_text(r["worst_user_mean"]),
                    f"{r['jain']:.3f}",
                    str(r["switches"]),
                    str(r["runs"]),
                    "yes" if r["same_bytes_as_fifo"] else "no (padded batch shape)",
                ]
            )
        headers = [
            "approach", "images/s (vs fifo)", "wait p50", "wait p95", "latency p50",
            "latency p95", "worst user's mean", "Jain", "LoRA switches", "runs",
            "same bytes as fifo",
        ]  # fmt: skip
        lines += [markdown_table(headers, rows), ""]
        pad_rows = [
            [
                f"batch {n}",
                seconds_text(p["alone"]),
                seconds_text(p["padded"]),
                f"{p['ratio']:.2f}x",
            ]
            for n, p in item["padding"].items()
        ]
        lines += [
            "Padding cost: one request alone, at batch 1 and padded to batch N.",
            "",
            markdown_table(["shape", "batch 1", "padded", "cost"], pad_rows),
            "",
        ]
    lines += [verdict(measured), ""]
    return "\n".join(lines)


def verdict(measured: list[dict[str, Any]]) -> str:
    """The default batch size these numbers support, said with the numbers."""
    parts = []
    for item in measured:
        fair = item["results"]["fair"]["images_per_s"]
        for n, pad in item["padding"].items():
            gain = item["results"][f"fair + batch {n}"]["images_per_s"] / fair
            parts.append(
                f"{item['size'].name}: batch {n} gives {gain:.2f}x the throughput of batches of"
                f" one under load, and a lone request padded to {n} costs {pad['ratio']:.2f}x"
            )
    gains = [
        item["results"][f"fair + batch {n}"]["images_per_s"]
        / item["results"]["fair"]["images_per_s"]
        for item in measured
        for n in item["padding"]
    ]
    choice = (
        "Batching pays at every size measured: on this hardware set STENCIL_BATCH_SIZE"
        if min(gains) > 1.2
        else "Batching does not pay for its padding at every size here, so the default stays"
        " STENCIL_BATCH_SIZE=1 (on a GPU, where a batch costs little more than one image,"
        " rerun this benchmark and set it from the numbers)"
    )
    return "Default: " + "; ".join(parts) + f". {choice}."


def main(argv: list[str] | None = None) -> None:
    parser = common.bench_parser(__doc__.splitlines()[0], (), SIZES, RESULTS_FILE)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--batch-sizes", default="4", help="comma list, e.g. 2,4")
    args = parser.parse_args(argv)
    common.setup()
    sizes = common.with_threads(SIZES, args.threads)
    names = common.parse_size_names(parser, args.sizes, sizes)
    batch_sizes = [int(n) for n in args.batch_sizes.split(",")]
    begin = time.perf_counter()
    measured = [bench_size(sizes[name], args.users, batch_sizes) for name in names]
    common.write_report(report(measured, args.users, time.perf_counter() - begin), args.output)


if __name__ == "__main__":
    main()
