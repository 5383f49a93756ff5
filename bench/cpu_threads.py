"""Torch's intra-op threads for the tiny families on a CPU: two (torch's default here) or one.

    .venv/bin/python bench/cpu_threads.py [--repeats 8]

Writes bench/results/cpu_threads.md (or `--output PATH`) and prints it.

OpenMP gives every thread that runs torch a team of helper threads of its own. The engine
runs the model on its worker thread, but a control-map preview runs its detector in the
caller's thread (a Gradio worker): from then on there are more OpenMP threads than cores,
OpenMP stops spinning between operations, and the tiny model's many small operations each
wait for a sleeping helper to wake. Each case runs in a fresh process, so no case inherits
another's threads:

- `plain`: a plain diffusers pipeline in that process's only torch thread (the baseline);
- `engine`: `Engine.generate` on the same request, then again after one depth-map preview
  made from another thread, which stays alive as the page's worker threads do (a thread's
  OpenMP team ends with it).

Two threads are forced with OMP_NUM_THREADS=2 (what torch picks on this 2-core machine);
"engine's choice" leaves OMP_NUM_THREADS unset, so the engine picks (one, for the tiny
families on a CPU). Every run makes the same request; images are compared within a case.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import common
from common import BENCH_CACHE, RESULTS, markdown_table, seconds_text

RESULTS_FILE = RESULTS / "cpu_threads.md"
CASES = {"two threads": "2", "engine's choice": None}


def _timed(run, repeats: int) -> float:
    run()  # warm
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def child(kind: str, repeats: int) -> dict:
    common.setup()
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from PIL import Image, ImageDraw

    from pipelines.families import FAMILIES
    from pipelines.requests import ControlUnit, GenerationRequest
    from pipelines.tiny import ensure_tiny_family

    request = GenerationRequest(
        prompt="a red circle on a blue background", seed=3, width=64, height=64
    )
    if kind == "plain":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            ensure_tiny_family(BENCH_CACHE), safety_checker=None
        )
        pipe.set_progress_bar_config(disable=True)
        seconds = _timed(common.plain_run_of(pipe, request), repeats)
        return {"plain": seconds, "threads": torch.get_num_threads()}
    from pipelines.engine import Engine

    engine = Engine(FAMILIES["tiny"], cache_root=BENCH_CACHE)
    before = _timed(lambda: engine.generate(request), repeats)
    photo = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(photo).ellipse((16, 16, 48, 48), fill="white")
    # The page's worker threads live on after a preview, and so does the OpenMP team each
    # made: the preview's thread must stay alive while the engine is timed again.
    with ThreadPoolExecutor(max_workers=1) as page_threads:
        page_threads.submit(engine.control_map, ControlUnit("depth", photo, resolution=64)).result()
        after = _timed(lambda: engine.generate(request), repeats)
    return {"before": before, "after": after, "threads": torch.get_num_threads()}


def run_case(kind: str, threads: str | None, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--repeats", str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--output", default=RESULTS_FILE)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.repeats)))
        return
    common.setup()
    began = time.perf_counter()
    rows = []
    for label, threads in CASES.items():
        plain = run_case("plain", threads, args.repeats)
        engine = run_case("engine", threads, args.repeats)
        rows.append(
            [
                label,
                str(engine["threads"]),
                seconds_text(plain["plain"]),
                f"{engine['before'] / plain['plain']:.2f}x",
                f"{engine['after'] / plain['plain']:.2f}x",
            ]
        )
    headers = [
        "case",
        "engine's threads",
        "plain pipeline",
        "engine / plain",
        "engine / plain after a preview",
    ]
    common.write_table_report(
        args.output,
        "CPU threads for the tiny families",
        began,
        "float32, tiny family, 64 px, 20 steps",
        "Medians; each case in fresh processes; the plain pipeline at the case's threads.",
        markdown_table(headers, rows),
    )


if __name__ == "__main__":
    main()
