"""Scale-out on Ray Serve: throughput and latency on 1 vs 2 replicas, and adapter loads
with routing by adapter set vs Ray's load-only routing (tiny model, CPU).

One seeded workload of mixed requests (LoRA sets drawn from a pool, a third with a canny
map) is served, `--concurrency` requests at a time, by: a plain diffusers pipeline (the
baseline every throughput is a ratio of: the same images' work, without LoRAs or maps), the
in-process engine, and Ray deployments of 1 and 2 replicas, each replica holding
`--sets-per-replica` one-LoRA sets. Each deployment starts fresh. On a 2-core machine two
replicas share the cores with the front, Ray's own processes and each other: the scaling
efficiency printed is what this machine gives, not what separate GPUs would.
"""

from __future__ import annotations

import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

RESULTS_FILE = common.RESULTS / "scale_out.md"
LORA_POOL = (
    "tiny-ink",
    "tiny-neon",
    "tiny-watercolor",
    "tiny-faded",
    "tiny-inverted",
    "tiny-outlined",
)
PROMPTS = ("a red circle", "a blue square on a yellow background", "a green triangle")


@dataclass(frozen=True)
class Served:
    label: str
    seconds: float
    latencies: list[float]
    adapter_loads: int | None = None  # LoRA files put into a model, all replicas
    set_loads: int | None = None

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds


def workload(count: int, seed: int, steps: int) -> list[dict]:
    """`count` requests' fields: a LoRA from the pool (a few with none), a third with canny."""
    rng = random.Random(seed)
    house = str(common.ROOT / "examples" / "house.png")
    requests = []
    for index in range(count):
        fields = {
            "prompt": rng.choice(PROMPTS),
            "seed": index,
            "steps": steps,
            "width": 64,
            "height": 64,
            "loras": f"{rng.choice(LORA_POOL)}:1" if rng.random() < 0.9 else "",
        }
        if rng.random() < 1 / 3:
            fields.update(control_type="canny", control_image=house)
        requests.append(fields)
    return requests


def serve_all(label: str, run, requests: list, concurrency: int) -> Served:
    """Every request through `run`, `concurrency` at a time; wall time and latencies."""

    def timed(item):
        began = time.perf_counter()
        outcome = run(item)
        return time.perf_counter() - began, outcome

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(timed, requests))
    seconds = time.perf_counter() - began
    latencies = [latency for latency, _ in outcomes]
    runs = [outcome for _, outcome in outcomes if outcome is not None]
    if not runs:
        return Served(label, seconds, latencies)
    # Each replica's totals (it started fresh): the largest it reported, summed.
    files: dict[str, int] = {}
    sets: dict[str, int] = {}
    for run in runs:
        files[run.replica] = max(files.get(run.replica, 0), run.adapter_loads_total)
        sets[run.replica] = max(sets.get(run.replica, 0), run.set_loads_total)
    return Served(label, seconds, latencies, sum(files.values()), sum(sets.values()))


def plain_diffusers(requests: list, concurrency: int) -> Served:
    """The baseline: the tiny family's own pipeline, one lock (one model), no LoRA or map."""
    import threading

    from diffusers import StableDiffusionPipeline

    from pipelines.requests import GenerationRequest
    from pipelines.tiny import ensure_tiny_family

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_family(common.BENCH_CACHE))
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()

    def run(fields):
        request = GenerationRequest(
            prompt=fields["prompt"], seed=fields["seed"], steps=fields["steps"], width=64, height=64
        )
        with lock:
            common.plain_run_of(pipe, request)()

    return serve_all("plain diffusers (1 process)", run, requests, concurrency)


def in_process(requests: list, concurrency: int, store_files: int) -> Served:
    from pipelines.engine import Engine
    from pipelines.families import FAMILIES
    from pipelines.service import StencilService

    engine = Engine(
        FAMILIES["tiny"],
        cache_root=common.BENCH_CACHE,
        lora_folder=common.ROOT / "loras",
        lora_max_loaded=store_files,
    )
    service = StencilService(engine, common.BENCH_CACHE / "scale-out-outputs")

    def run(fields):
        service.generate(fields)

    served = serve_all(f"in-process engine, {store_files} LoRA files", run, requests, concurrency)
    return replace(served, adapter_loads=engine.adapter_loads)


def on_ray(
    replicas: int,
    requests: list,
    concurrency: int,
    sets_per_replica: int,
    by_set: bool,
    with_controlnets: bool = False,
) -> Served:
    from ray import serve

    from pipelines.ray_backend import ENGINE_APP, RayBackend, deploy
    from pipelines.service import StencilService

    handle = deploy(
        {
            "model": "tiny",
            "cache_root": str(common.BENCH_CACHE),
            "lora_folder": str(common.ROOT / "loras"),
            "lora_max_loaded": sets_per_replica,
        },
        replicas=replicas,
        num_cpus=2 / replicas,
        loras_per_set=1,
    )
    backend = RayBackend(
        handle,
        lora_folder=common.ROOT / "loras",
        route_by_adapter_set=by_set,
        set_id_names_controlnets=with_controlnets,
    )
    service = StencilService(backend, common.BENCH_CACHE / "scale-out-outputs")
    try:
        routing = "by adapter set" if by_set else "by load only"
        if with_controlnets:
            routing += ", ControlNets in the set id"
        plural = "s" if replicas > 1 else ""
        label = f"Ray, {replicas} replica{plural} of {sets_per_replica} sets, {routing}"

        def run(fields):
            return backend.generate_traced(service.build_request(fields))[1]

        return serve_all(label, run, requests, concurrency)
    finally:
        serve.delete(ENGINE_APP)


def report(rows: list[Served], args, seconds: float) -> str:
    baseline = rows[0].throughput
    fits = args.sets_per_replica
    one = next(r for r in rows if r.label.startswith(f"Ray, 1 replica of {fits} sets, by adapter"))
    two = next(r for r in rows if r.label.startswith(f"Ray, 2 replicas of {fits} sets, by adapter"))
    table = common.markdown_table(
        [
            "served by",
            "images/s (vs plain)",
            "latency p50",
            "latency p95",
            "LoRA file loads per 100 requests",
            "set loads per 100",
        ],
        [
            (
                r.label,
                f"{r.throughput:.2f} ({common.ratio_text(r.throughput / baseline)})",
                common.seconds_text(common.percentile(r.latencies, 50)),
                common.seconds_text(common.percentile(r.latencies, 95)),
                "-" if r.adapter_loads is None else f"{100 * r.adapter_loads / args.requests:.1f}",
                "-" if r.set_loads is None else f"{100 * r.set_loads / args.requests:.1f}",
            )
            for r in rows
        ],
    )
    efficiency = two.throughput / (2 * one.throughput)
    lines = [
        "# Scale-out on Ray Serve",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} in {seconds:.0f} s with `{common.command_line()}`.",
        "",
        *common.machine_lines("float32, tiny family, 64 px"),
        "",
        f"{args.requests} seeded requests ({args.steps} steps; one LoRA of a pool of"
        f" {len(LORA_POOL)} in 90%, a canny map in a third), {args.concurrency} in flight at"
        " a time, the same for every row. A replica's adapter store holds N LoRA files, so N"
        f" one-LoRA sets (`max_num_models_per_replica`): two replicas of {fits} hold the"
        f" whole pool, two of {args.small_store} do not. Every engine runs one torch thread."
        " Latency: from sending a request to its images. Loads: LoRA files put into a"
        " model, and adapter sets Ray's multiplexer loaded, summed over the replicas. A"
        " set's id names its LoRA files; the row with ControlNets in the id shows why it"
        " does not name them too: a LoRA with and without a canny map become two sets.",
        "",
        table,
        "",
        f"Scaling, 2 replicas vs 1 (both routed by adapter set, {fits} sets each):"
        f" {common.ratio_text(two.throughput / one.throughput)} the throughput, efficiency"
        f" {efficiency:.2f}.",
        "",
        "Read with care: one engine runs one torch thread, so one replica leaves the second"
        " core to the front and Ray, and two replicas use both; on GPUs each replica has its"
        " own device and the efficiency to expect is set by the front and the router, not by"
        " shared cores. The plain diffusers baseline draws the same images' prompts without"
        " LoRAs or maps.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS_FILE)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sets-per-replica", type=int, default=3)
    parser.add_argument("--small-store", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    common.setup()
    os.environ["OMP_NUM_THREADS"] = "1"  # every engine here, replicas included, one thread
    import ray
    import torch

    torch.set_num_threads(1)
    began = time.perf_counter()
    requests = workload(args.requests, args.seed, args.steps)
    fits, small = args.sets_per_replica, args.small_store
    rows = [
        plain_diffusers(requests, args.concurrency),
        in_process(requests, args.concurrency, fits),
    ]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for replicas, held, by_set, with_controlnets in (
            (1, fits, True, False),
            (2, fits, True, False),
            (2, fits, False, False),
            (2, fits, True, True),
            (2, small, True, False),
            (2, small, False, False),
        ):
            served = on_ray(replicas, requests, args.concurrency, held, by_set, with_controlnets)
            rows.append(served)
            print(f"  {rows[-1].label}: {rows[-1].throughput:.2f} images/s", flush=True)
    finally:
        ray.shutdown()
    common.write_report(report(rows, args, time.perf_counter() - began), args.output)


if __name__ == "__main__":
    main()
