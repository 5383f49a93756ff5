"""Measure the trained tiny family's adherence: prompts, guidance, controls and LoRA styles.

    python -m tiny_training.evaluate [--samples 48] [--folder models/stencil-tiny]
    python -m tiny_training.evaluate --family tiny-xl   # the SDXL-shaped one, both ControlNet kinds

Generates with plain diffusers pipelines loaded from the folder (the app's defaults: Euler a,
20 steps, guidance 7), on seeded random scenes, and prints one line per measure: with and
without the thing measured. tests/test_adherence.py checks the same measures through the
app's engine, with thresholds chosen from these distributions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from . import measure, scenes

ROOT = Path(__file__).resolve().parents[1]
SCENE_SEED = 7
STEPS = 20
GUIDANCE = 7.0


def load(folder: Path):
    import torch
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    torch.set_num_threads(2)
    base = _as_the_app_runs(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
    controlled = {}
    for kind in ("canny", "depth", "pose"):
        controlnet = ControlNetModel.from_pretrained(folder / f"controlnet-{kind}")
        pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        controlled[kind] = pipe
    return base, controlled


def _as_the_app_runs(pipe):
    """The app's default sampler (Euler a) on `pipe`, and no progress bars."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_xl(folder: Path):
    """The tiny SDXL family: its base, a pipeline per control type with that type's
    ControlNet, and the same with the one ControlNet Union model in that type's mode."""
    import torch
    from diffusers import (
        ControlNetModel,
        ControlNetUnionModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLControlNetUnionPipeline,
        StableDiffusionXLPipeline,
    )

    from pipelines.controls import union_mode
    from pipelines.sdxl_builder import UNION_FOLDER

    torch.set_num_threads(2)
    base = _as_the_app_runs(
        StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    )
    union = ControlNetUnionModel.from_pretrained(folder / UNION_FOLDER)
    by_union = StableDiffusionXLControlNetUnionPipeline.from_pipe(base, controlnet=union)
    by_union.set_progress_bar_config(disable=True)
    controlled, unioned = {}, {}
    for kind in ("canny", "depth", "pose"):
        controlnet = ControlNetModel.from_pretrained(folder / f"controlnet-{kind}")
        pipe = StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        controlled[kind] = pipe
        unioned[kind] = _UnionAs(by_union, union_mode(kind, {}))
    return base, controlled, unioned


class _UnionAs:
    """The union pipeline called as a one-control pipeline is: `image` is its one map, in
    the mode of one control type."""

    def __init__(self, pipe, mode: int) -> None:
        self.pipe, self.mode = pipe, mode

    def __call__(self, prompt, *, image, **options):
        return self.pipe(prompt, control_image=[image], control_mode=[self.mode], **options)


def generate(pipe, prompt: str, seed: int, *, guidance=GUIDANCE, image=None, steps=STEPS):
    import torch

    extra = {"image": image} if image is not None else {}
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=scenes.SIDE,
        width=scenes.SIDE,
        generator=torch.Generator().manual_seed(seed),
        **extra,
    ).images[0]


def prompt_accuracy(pipe, made: list[scenes.Scene], *, guidance=GUIDANCE, empty=False) -> dict:
    return measure.prompt_accuracy(
        (generate(pipe, "" if empty else scene.caption, i, guidance=guidance), scene)
        for i, scene in enumerate(made)
    )


def control_adherence(base, pipe, kind: str, made: list[scenes.Scene]) -> dict:
    rows = {"with": [], "without": []}
    for i, scene in enumerate(made):
        control = scenes.control_map(scene, kind)
        target = scenes.shape_mask(scene)
        for label, image in (
            ("with", generate(pipe, scene.caption, i, image=control)),
            ("without", generate(base, scene.caption, i)),
        ):
            mask = measure.read_picture(image).mask
            rows[label].append(
                (
                    measure.edge_f1(image, scenes.canny_map(scene)),
                    measure.mask_iou(mask, target),
                    measure.centroid_distance(mask, target),
                )
            )
    return {
        label: {
            "edge_f1": float(np.mean([r[0] for r in values])),
            "mask_iou": float(np.mean([r[1] for r in values])),
            "centroid_px": float(np.median([r[2] for r in values])),
        }
        for label, values in rows.items()
    }


def lora_effects(base, canny_pipe, made: list[scenes.Scene], lora_folder: Path) -> dict:
    results = {}
    for style in ("inverted", "outlined"):
        base.load_lora_weights(str(lora_folder / f"tiny-{style}.safetensors"), adapter_name=style)
        scores = {}
        for weight in (0.0, 1.0):
            base.set_adapters([style], adapter_weights=[weight])
            values = []
            for i, scene in enumerate(made):
                if style == "inverted":
                    image = generate(base, scene.caption, i)
                    reading = measure.read_picture(image, measure.inverted_palette())
                    values.append(
                        reading.colour == scene.colour and reading.background == scene.background
                    )
                else:
                    image = generate(canny_pipe, scene.caption, i, image=scenes.canny_map(scene))
                    values.append(measure.outline_strength(image, scene))
            scores[weight] = float(np.mean(values))
        base.delete_adapters(style)
        results[style] = scores
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("tiny", "tiny-xl"), default="tiny")
    parser.add_argument("--folder", type=Path, help="default: the family's models/ folder")
    parser.add_argument("--loras", type=Path, default=ROOT / "loras")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--only", default="prompt,guidance,canny,depth,pose,loras")
    args = parser.parse_args(argv)
    only = args.only.split(",")
    unioned = {}
    if args.family == "tiny-xl":
        base, controlled, unioned = load_xl(args.folder or ROOT / "models" / "stencil-tiny-xl")
        only = [name for name in only if name != "loras"]  # no LoRA trained for it
    else:
        base, controlled = load(args.folder or ROOT / "models" / "stencil-tiny")
    n = args.samples
    report = {}
    if "prompt" in only:
        report["prompt"] = prompt_accuracy(base, scenes.random_scenes(n, SCENE_SEED, figure=False))
        report["empty prompt"] = prompt_accuracy(
            base, scenes.random_scenes(n, SCENE_SEED, figure=False), empty=True
        )
        print(json.dumps({k: report[k] for k in ("prompt", "empty prompt")}), flush=True)
    if "guidance" in only:
        report["guidance 1"] = prompt_accuracy(
            base, scenes.random_scenes(n, SCENE_SEED, figure=False), guidance=1.0
        )
        print(json.dumps({"guidance 1": report["guidance 1"]}), flush=True)
    for kind in ("canny", "depth", "pose"):
        if kind in only:
            made = scenes.random_scenes(n, SCENE_SEED, figure=True if kind == "pose" else None)
            report[kind] = control_adherence(base, controlled[kind], kind, made)
            print(json.dumps({kind: report[kind]}), flush=True)
            if kind in unioned:
                report[f"{kind} by union"] = control_adherence(base, unioned[kind], kind, made)
                print(json.dumps({f"{kind} by union": report[f"{kind} by union"]}), flush=True)
    if "loras" in only:
        report["loras"] = lora_effects(
            base, controlled["canny"], scenes.random_scenes(n, SCENE_SEED, figure=False), args.loras
        )
        print(json.dumps({"loras": report["loras"]}), flush=True)


if __name__ == "__main__":
    main()
