"""SDXL: the engine's end-to-end request against a plain diffusers SDXL pipeline, and the
memory of one ControlNet Union model against three per-control SDXL ControlNets.

    .venv/bin/python bench/sdxl.py [--sizes tiny,real] [--repeats N]

Writes bench/results/sdxl.md (or `--output PATH`) and prints it.

- tiny: Stencil's built-in tiny SDXL family (float32), served by the real `Engine`.
- real: SDXL base's own shapes (UNet 320/640/1280 with 1/2/10 transformer layers, CLIP
  ViT-L and OpenCLIP bigG text towers, the SDXL VAE), three SDXL ControlNets and a
  ControlNet Union model, all with seeded random weights, built in code once into
  `.cache/bench/sdxl-random` (bfloat16, about 17 GB) and loaded by the engine as a local
  folder; its registry's SDXL ControlNet ids resolve to the random ones through the
  benchmark's private Hugging Face cache. On this CPU one step at 128 px is the size that
  fits: the ratio, not the seconds, is the result.

End to end: `Engine.generate(request)` (checks, the scheduler's turn, the ready view, the
recipe) against `StableDiffusionXL[ControlNet]Pipeline` built from the same loaded
modules and called as a script would (same prompt, steps, guidance, size, seed, map),
alternated; both images must be the same bytes. Memory: each set of ControlNets loaded in
a fresh interpreter, its weights read once, the process's PSS growth (see bench/README.md).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import common
from common import BENCH_CACHE, RESULTS, bytes_text, markdown_table, ratio_text, seconds_text

RESULTS_FILE = RESULTS / "sdxl.md"
PROBES = ("three", "union")
CONTROL_TYPES = ("canny", "pose", "depth")
REAL_VERSION = "v1"


@dataclass(frozen=True)
class Size:
    name: str
    side: int  # pixels
    steps: int
    repeats: int
    threads: int = 2


# One torch thread at tiny size for steady timings (bench/README.md); both cores at real size.
SIZES = {"tiny": Size("tiny", 64, 2, 15, threads=1), "real": Size("real", 128, 1, 3)}


def real_size():
    from pipelines.sd_builder import SDFamilySize
    from pipelines.sdxl_builder import SDXLFamilySize

    return SDXLFamilySize(
        sd=SDFamilySize(
            seed=2026_1202,
            unet_widths=(320, 640, 1280),
            unet_cross_attention=(False, True, True),
            unet_layers=2,
            unet_sample_size=128,
            attention_head_dim=(5, 10, 20),
            cross_attention_width=768,
            text_layers=12,
            text_heads=12,
            text_intermediate=3072,
            text_vocab_size=49408,
            vae_widths=(128, 256, 512, 512),
            vae_layers=2,
            vae_norm_groups=32,
            vae_sample_size=1024,
            vae_scaling_factor=0.13025,
        ),
        text_2_width=1280,
        text_2_layers=32,
        text_2_heads=20,
        text_2_intermediate=5120,
        size_embedding_width=256,
        transformer_layers=(1, 2, 10),
    )


def family_folder(size: Size) -> Path:
    """The family's folder (built once), and for `real` its ControlNets linked in the
    benchmark's Hub cache under the registry's SDXL ids."""
    from pipelines.atomic_folder import build_verified

    if size.name == "tiny":
        from pipelines.tiny_xl import ensure_tiny_xl_family

        return ensure_tiny_xl_family(BENCH_CACHE)
    from pipelines.controls import CONTROLS, UNION_CONTROLNETS
    from pipelines.sdxl_builder import write_sdxl_family

    def write(folder: Path) -> None:
        print("building the random-weight SDXL folder (once; several minutes) ...", flush=True)
        write_sdxl_family(folder, real_size(), CONTROL_TYPES, dtype="bfloat16")

    folder = build_verified(BENCH_CACHE / f"sdxl-random-{REAL_VERSION}", write)
    for kind in CONTROL_TYPES:
        common.link_into_hub_cache(
            folder / f"controlnet-{kind}", CONTROLS[kind].controlnets["sdxl"]
        )
    common.link_into_hub_cache(folder / "controlnet-union", UNION_CONTROLNETS["sdxl"])
    return folder


def controlnet_folders(size: Size, which: str) -> list[Path]:
    folder = family_folder(size)
    names = (
        [f"controlnet-{kind}" for kind in CONTROL_TYPES]
        if which == "three"
        else ["controlnet-union"]
    )
    return [folder / name for name in names]


# ---- end to end --------------------------------------------------------------------------


def control_photo():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (256, 256), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 50, 150, 220), fill="white")
    draw.ellipse((150, 90, 230, 170), fill="grey")
    return image


def end_to_end(size: Size) -> list[dict]:
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline

    from pipelines.engine import Engine
    from pipelines.families import FAMILIES
    from pipelines.requests import ControlUnit, GenerationRequest

    torch.set_num_threads(size.threads)
    folder = family_folder(size)
    started = time.perf_counter()
    if size.name == "tiny":
        engine = Engine(FAMILIES["tiny-xl"], cache_root=BENCH_CACHE)
    else:
        engine = Engine.start(str(folder), cache_root=BENCH_CACHE)
    start_s = time.perf_counter() - started
    shared = {k: v for k, v in engine.base.components.items() if v is not None}
    rows = []
    for case in ("text-to-image", "canny"):
        units = (
            (ControlUnit("canny", control_photo(), resolution=size.side),)
            if case == "canny"
            else ()
        )
        request = GenerationRequest(
            "a red circle on a blue background",
            seed=5,
            steps=size.steps,
            width=size.side,
            height=size.side,
            controls=units,
        )
        maps = [engine.control_map(unit) for unit in units]
        if units:
            net = engine.controlnet(engine.controlnet_ref(units[0]))
            plain = StableDiffusionXLControlNetPipeline(
                **shared, controlnet=net, add_watermarker=False
            )
        else:
            plain = StableDiffusionXLPipeline(**shared, add_watermarker=False)
        plain.set_progress_bar_config(disable=True)
        plain_run = common.plain_run_of(
            plain,
            request,
            scheduler_config=engine.base.scheduler.config,
            **({"image": maps[0]} if maps else {}),
        )

        def engine_run(request=request):
            return engine.generate(request).images[0]

        same = np.array_equal(np.asarray(plain_run()), np.asarray(engine_run()))
        times: dict[str, list[float]] = {"plain": [], "engine": []}
        for index in range(size.repeats):
            order = (("plain", plain_run), ("engine", engine_run))
            for name, run in order if index % 2 == 0 else order[::-1]:
                begin = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - begin)
        plain_s, engine_s = (statistics.median(times[k]) for k in ("plain", "engine"))
        rows.append({"case": case, "plain": plain_s, "engine": engine_s, "same": same})
    return [{"start_s": start_s}, *rows]


# ---- memory --------------------------------------------------------------------------------


def probe(which: str, size: Size) -> dict:
    """In a fresh interpreter: load one set of ControlNets, read every weight once, and
    report what the process grew by."""
    import torch
    from diffusers import ControlNetModel, ControlNetUnionModel

    torch.set_num_threads(size.threads)
    dtype = torch.float32 if size.name == "tiny" else torch.bfloat16
    folders = controlnet_folders(size, which)
    model_class = ControlNetModel if which == "three" else ControlNetUnionModel
    before = common.memory_snapshot()
    nets = [
        model_class.from_pretrained(f, torch_dtype=dtype, use_safetensors=True) for f in folders
    ]
    common.touch_weights(nets)
    after = common.memory_snapshot()
    files = sum(p.stat().st_size for f in folders for p in f.glob("*.safetensors"))
    return {
        "weights": common.unique_tensor_bytes(nets),
        "files": files,
        "pss": common.memory_growth(after, before)["Pss_Model"],
        "serves": len(CONTROL_TYPES),
    }


# ---- report --------------------------------------------------------------------------------


def bench_size(size: Size, repeats: int | None) -> dict:
    size = replace(size, repeats=repeats or size.repeats)
    print(f"{size.name}: end to end ...", flush=True)
    start, *rows = end_to_end(size)
    memory = common.run_probes(Path(__file__), PROBES, size)
    return {"size": size, "start": start["start_s"], "rows": rows, "memory": memory}


def report(results: list[dict], seconds: float) -> str:
    lines = [
        "# SDXL: the engine against plain diffusers, and one ControlNet Union model",
        "",
        f"Generated by `bench/sdxl.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
        " Command (from the repository root):",
        "",
        f"    {common.command_line()}",
        "",
        f"Total runtime {seconds / 60:.1f} min (building a model folder not included).",
        "",
        *common.machine_lines("tiny: float32; real: bfloat16"),
        "",
        "End to end: medians of alternated runs (plain, engine, engine, plain ...); the plain"
        " side is a `StableDiffusionXLPipeline` (or `...ControlNetPipeline` with the one"
        " ControlNet) built from the engine's loaded modules and called as a script would; both"
        " images must be the same bytes.",
        "",
    ]
    rows = []
    for result in results:
        size = result["size"]
        for row in result["rows"]:
            rows.append(
                [
                    size.name,
                    f"{size.side} px, {size.steps} step(s)",
                    row["case"],
                    seconds_text(row["plain"]),
                    seconds_text(row["engine"]),
                    f"{row['engine'] / row['plain']:.3f}x",
                    seconds_text(row["engine"] - row["plain"]),
                    "yes" if row["same"] else "NO",
                ]
            )
    headers = [
        "size",
        "shape",
        "request",
        "plain",
        "Engine.generate",
        "ratio",
        "overhead",
        "same bytes",
    ]
    lines += [markdown_table(headers, rows), ""]
    lines += [
        "ControlNet memory for pose, canny and depth: three per-control SDXL ControlNets against"
        " one ControlNet Union model serving all three (each set loaded in a fresh process,"
        " every weight read once; PSS of anonymous memory and mapped weight files).",
        "",
    ]
    rows = []
    for result in results:
        memory = result["memory"]
        three, union = memory["three"], memory["union"]
        for label, m in (("3 ControlNets", three), ("1 Union", union)):
            rows.append(
                [
                    result["size"].name,
                    label,
                    bytes_text(m["files"]),
                    bytes_text(m["weights"]),
                    bytes_text(m["pss"]),
                ]
            )
        rows.append(
            [
                result["size"].name,
                "ratio (3 / union)",
                ratio_text(three["files"] / union["files"]),
                ratio_text(three["weights"] / union["weights"]),
                ratio_text(three["pss"] / max(union["pss"], 1)),
            ]
        )
    lines += [markdown_table(["size", "ControlNets", "files", "weights", "PSS growth"], rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = common.bench_parser(__doc__.split("\n\n")[0], PROBES, SIZES, RESULTS_FILE)
    parser.add_argument("--repeats", type=int, help="alternated runs per side (default per size)")
    args = parser.parse_args(argv)
    common.setup()
    sizes = common.with_threads(SIZES, args.threads)
    if args.probe:
        print(json.dumps(probe(args.probe, sizes[args.size or "tiny"])))
        return
    names = common.parse_size_names(parser, args.sizes, SIZES)
    started = time.perf_counter()
    results = [bench_size(sizes[name], args.repeats) for name in names]
    common.write_report(report(results, time.perf_counter() - started), args.output)


if __name__ == "__main__":
    main()
