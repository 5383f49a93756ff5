"""Per-request overhead: `Engine.generate` against a plain, already loaded diffusers pipeline.

    .venv/bin/python bench/overhead.py [--steps 4,20] [--repeats 15]

Writes bench/results/overhead.md (or `--output PATH`) and prints it.

Both sides load the same tiny-family folder and run the same request (64 px, one image,
Euler a, the same seed), alternated so that both see the same machine: the plain side is
`pipe(prompt, generator=..., num_inference_steps=...)` on a `StableDiffusionPipeline`
loaded once; the engine side is everything a user's request costs in the engine (checks,
LoRA tags, the scheduler's turn on the model, the ready view, the recipe). The two images
must be the same bytes, or the comparison would be of different work. Few-step requests
(LCM, TCD, Hyper LoRAs) are where the overhead shows, so 4 steps is the case that counts.
"""

from __future__ import annotations

import statistics
import time

import common
from common import BENCH_CACHE, RESULTS, markdown_table, seconds_text

RESULTS_FILE = RESULTS / "overhead.md"


def measure(steps: int, repeats: int, engine, plain) -> dict[str, float]:
    import numpy as np

    from pipelines.requests import GenerationRequest

    request = GenerationRequest(prompt="a red fox", seed=3, steps=steps, width=64, height=64)
    plain_run = common.plain_run_of(plain, request)

    def engine_run():
        return engine.generate(request).images[0]

    same = np.array_equal(np.asarray(plain_run()), np.asarray(engine_run()))
    times: dict[str, list[float]] = {"plain": [], "engine": []}
    for _ in range(repeats):
        for name, run in (("plain", plain_run), ("engine", engine_run)):
            begin = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - begin)
    plain_s, engine_s = (statistics.median(times[k]) for k in ("plain", "engine"))
    return {"steps": steps, "plain": plain_s, "engine": engine_s, "same": same}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="4,20")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", default=RESULTS_FILE)
    args = parser.parse_args(argv)
    common.setup()
    import torch
    from diffusers import StableDiffusionPipeline

    from pipelines.engine import Engine
    from pipelines.families import FAMILIES
    from pipelines.tiny import ensure_tiny_family

    torch.set_num_threads(1)  # steady timings (bench/README.md)
    folder = ensure_tiny_family(BENCH_CACHE)
    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    engine = Engine(FAMILIES["tiny"], cache_root=BENCH_CACHE, dtype="float32")
    began = time.perf_counter()
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        r = measure(steps, args.repeats, engine, plain)
        rows.append(
            [
                str(r["steps"]),
                seconds_text(r["plain"]),
                seconds_text(r["engine"]),
                f"{r['engine'] / r['plain']:.3f}x",
                seconds_text(r["engine"] - r["plain"]),
                "yes" if r["same"] else "NO",
            ]
        )
    headers = ["steps", "plain pipeline", "Engine.generate", "ratio", "overhead", "same bytes"]
    common.write_table_report(
        args.output,
        "Per-request overhead",
        began,
        "float32, tiny family, 64 px, one torch thread",
        "Medians of alternated runs; both sides make the same image (checked).",
        markdown_table(headers, rows),
    )


if __name__ == "__main__":
    main()
