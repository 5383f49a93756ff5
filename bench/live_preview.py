"""What live preview costs: generation with previews every N steps against none, and what
one preview costs in UNet steps at SD 1.5's real size.

    .venv/bin/python bench/live_preview.py [--steps 20] [--repeats 7] [--real-size 512]

Writes bench/results/live_preview.md (or `--output PATH`) and prints it.

1. Tiny family, 64 px, one image: a plain diffusers pipeline, the engine with no preview, and
   the engine previewing every 5 and every 2 steps (decoded by the VAE: the tiny family has no
   TAESD), alternated; the images must be the same bytes in every case.
2. SD 1.5 shapes with random weights (no download; `pipelines.sd_builder.SD15_SIZE`), on the
   CPU in bfloat16: one UNet step (a batch of 2, as classifier-free guidance runs it) against
   one VAE decode, at `--real-size` px. A preview every N steps costs about decode / (N *
   step) of the run; that fraction is what decides the CPU default (off past 10%).
"""

from __future__ import annotations

import datetime
import statistics
import time

import common
from common import BENCH_CACHE, RESULTS, markdown_table, seconds_text

RESULTS_FILE = RESULTS / "live_preview.md"
INTERVALS = (0, 5, 2)  # steps between previews; 0: none


def tiny_rows(steps: int, repeats: int) -> list[list[str]]:
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from pipelines.engine import Engine
    from pipelines.families import FAMILIES
    from pipelines.requests import GenerationRequest
    from pipelines.tiny import ensure_tiny_family

    folder = ensure_tiny_family(BENCH_CACHE)
    plain = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    plain.set_progress_bar_config(disable=True)
    engine = Engine(FAMILIES["tiny"], cache_root=BENCH_CACHE, dtype="float32", live_preview_every=1)
    request = GenerationRequest(prompt="a red fox", seed=3, steps=steps, width=64, height=64)
    plain_run = common.plain_run_of(plain, request)

    def engine_run(every: int):
        engine.live_preview_every = every
        shown = []
        image = engine.generate(
            request, preview=(lambda *args: shown.append(args)) if every else None
        ).images[0]
        return image, len(shown)

    reference = np.asarray(plain_run())
    same = {
        every: np.array_equal(np.asarray(engine_run(every)[0]), reference) for every in INTERVALS
    }
    previews = {every: engine_run(every)[1] for every in INTERVALS}
    times: dict[str, list[float]] = {"plain": [], **{str(every): [] for every in INTERVALS}}
    for _ in range(repeats):
        for every in ("plain", *INTERVALS):
            begin = time.perf_counter()
            plain_run() if every == "plain" else engine_run(every)
            times[str(every)].append(time.perf_counter() - begin)
    plain_s = statistics.median(times["plain"])
    rows = [["plain pipeline", "-", seconds_text(plain_s), "1.000x", "-"]]
    for every in INTERVALS:
        engine_s = statistics.median(times[str(every)])
        rows.append(
            [
                f"engine, preview every {every} steps" if every else "engine, no preview",
                str(previews[every]),
                seconds_text(engine_s),
                f"{engine_s / plain_s:.3f}x",
                "yes" if same[every] else "NO",
            ]
        )
    return rows


def real_size_rows(side: int, repeats: int) -> tuple[list[list[str]], float]:
    import torch

    from pipelines.sd_builder import SD15_SIZE, build_unet, build_vae

    torch.manual_seed(0)
    unet = build_unet(SD15_SIZE).to(torch.bfloat16).eval()
    vae = build_vae(SD15_SIZE).to(torch.bfloat16).eval()
    latent = side // 8
    latents = torch.randn(2, 4, latent, latent, dtype=torch.bfloat16)
    context = torch.randn(2, 77, SD15_SIZE.cross_attention_width, dtype=torch.bfloat16)

    def step():
        unet(latents, 500, encoder_hidden_states=context)

    def decode():
        vae.decode(latents[:1] / vae.config.scaling_factor)

    times: dict[str, list[float]] = {"step": [], "decode": []}
    with torch.inference_mode():
        step(), decode()  # warm-up
        for _ in range(repeats):
            for name, run in (("step", step), ("decode", decode)):
                begin = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - begin)
    step_s, decode_s = (statistics.median(times[k]) for k in ("step", "decode"))
    ratio = decode_s / step_s
    rows = [
        ["one UNet step (batch 2)", seconds_text(step_s), "1.00"],
        ["one VAE decode (1 image)", seconds_text(decode_s), f"{ratio:.2f}"],
    ]
    return rows, ratio


def verdict(ratio: float) -> str:
    """What the CPU default should be, by the 10% rule, from one preview's cost in steps."""
    every = 5  # what a GPU defaults to (`live_preview.DEFAULT_EVERY_ON_GPU`)
    if ratio / every > 0.10:
        return (
            f"Every {every} steps is past the 10% a preview may cost on the CPU, so it is off"
            " there unless the operator sets `--live-preview-every`; on a GPU with TAESD (a"
            " few percent of a VAE decode) it is on, every 5 steps."
        )
    return f"Every {every} steps stays under 10% here: the CPU default could be on."


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--real-size", type=int, default=512)
    parser.add_argument("--output", default=RESULTS_FILE)
    args = parser.parse_args(argv)
    common.setup()
    import torch

    torch.set_num_threads(1)  # steady timings (bench/README.md)
    began = time.perf_counter()
    tiny = tiny_rows(args.steps, args.repeats)
    torch.set_num_threads(2)  # real-size shapes: both cores, as a CPU server would run
    real, ratio = real_size_rows(args.real_size, max(3, args.repeats // 2))
    overhead = ", ".join(f"every {n} steps ~{ratio / n:.0%}" for n in (5, 10, 20))
    text = "\n".join(
        [
            "# Live preview",
            "",
            f"Measured {datetime.date.today().isoformat()} in {time.perf_counter() - began:.0f} s"
            f" with `{common.command_line()}`.",
            "",
            *common.machine_lines("float32 tiny family (one thread); bfloat16 SD 1.5 shapes"),
            "",
            f"## Tiny family, 64 px, {args.steps} steps",
            "",
            "Medians of alternated runs; every case makes the plain pipeline's image (checked).",
            "",
            markdown_table(["run", "previews", "time", "ratio to plain", "same bytes"], tiny),
            "",
            f"## SD 1.5 shapes, {args.real_size} px, CPU",
            "",
            markdown_table(["work", "time", "in UNet steps"], real),
            "",
            f"A VAE-decoded preview therefore costs, of a run: {overhead}.",
            verdict(ratio),
            "",
        ]
    )
    common.write_report(text, args.output)


if __name__ == "__main__":
    main()
