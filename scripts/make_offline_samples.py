"""Draw docs/offline-samples.png (and -xl.png): what the app makes offline, on the trained
tiny model and the trained tiny SDXL model.

Usage: python scripts/make_offline_samples.py [tiny|tiny-xl]

Every picture is made by the app's own engine (`Engine.generate`, the app's defaults: Euler a,
20 steps, guidance 7, seed 1): prompts alone, then each control with its map, then each
trained LoRA (tiny) or each control again through the one ControlNet Union model (tiny-xl).
Each cell is drawn at 2x with its prompt and what steered it underneath.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from pipelines.engine import Engine  # noqa: E402
from pipelines.families import FAMILIES  # noqa: E402
from pipelines.requests import ControlUnit, GenerationRequest, LoraChoice  # noqa: E402
from tiny_training import scenes  # noqa: E402

OUT = {
    "tiny": ROOT / "docs" / "offline-samples.png",
    "tiny-xl": ROOT / "docs" / "offline-samples-xl.png",
}
CELL = 128
LABEL = 34


def samples(family: str):
    """(prompt, what steered it, the map or None, request extras, ControlNet kind) per cell."""
    square = scenes.Scene("square", "green", "white", (22.0, 40.0), 14.0)
    triangle = scenes.Scene("triangle", "yellow", "black", (42.0, 24.0), 15.0, depth=0.9)
    figure = scenes.Scene("figure", "red", "blue", (24.0, 32.0), 20.0, pose=(0.6, -0.4, 0.3, 0.0))
    circle = scenes.Scene("circle", "red", "yellow", (40.0, 38.0), 14.0)
    rows = [
        ("a red circle on a blue background", "prompt only", None, {}, "per-control"),
        ("a yellow triangle on a black background", "prompt only", None, {}, "per-control"),
        ("a white square on a green background", "prompt only", None, {}, "per-control"),
        ("a black figure on a yellow background", "prompt only", None, {}, "per-control"),
    ]
    controls = [
        (square, "canny", _canny(square)),
        (triangle, "depth map", _drawn(scenes.depth_map(triangle), "depth")),
        (figure, "pose map", _drawn(scenes.pose_map(figure), "pose")),
        (circle, "canny", _canny(circle)),
    ]
    for scene, label, unit in controls:
        rows.append((scene.caption, label, unit, {"controls": (unit,)}, "per-control"))
    if family == "tiny-xl":
        for scene, label, unit in controls:
            rows.append((scene.caption, f"{label}, union", unit, {"controls": (unit,)}, "union"))
        return rows
    for name in ("tiny-inverted", "tiny-outlined"):
        for prompt in (
            "a red circle on a blue background",
            "a white triangle on a green background",
        ):
            extra = {"loras": (LoraChoice(name, 1.0),)}
            rows.append((prompt, name, None, extra, "per-control"))
    return rows


def _canny(scene):
    # Edges found at the model's own 64 px, as it was trained on them; a map found at the
    # default 512 px is thinned when the pipeline shrinks it to 64.
    return ControlUnit(control_type="canny", image=scenes.render(scene), resolution=64)


def _drawn(image, map_type):
    return ControlUnit(control_type="image", image=image, params={"map_type": map_type})


def main() -> None:
    family = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    engines = {
        kind: Engine(FAMILIES[family], lora_folder=ROOT / "loras", controlnet=kind)
        for kind in ("per-control", "union")
        if kind == "per-control" or family == "tiny-xl"
    }
    rows = samples(family)
    columns = 4
    sheet = Image.new("RGB", (columns * CELL, (len(rows) // columns) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (prompt, steer, unit, extra, kind) in enumerate(rows):
        request = GenerationRequest(prompt=prompt, seed=1, width=64, height=64, **extra)
        result = engines[kind].generate(request)
        x, y = (index % columns) * CELL, (index // columns) * (CELL + LABEL)
        sheet.paste(result.images[0].resize((CELL, CELL), Image.NEAREST), (x, y))
        if unit is not None:
            # Thickened first, so one-pixel edges survive the shrinking.
            inset = result.control_maps[0].filter(ImageFilter.MaxFilter(3))
            inset = inset.resize((CELL // 3, CELL // 3), Image.BOX)
            sheet.paste(inset, (x + CELL - CELL // 3, y))
        words = prompt.removeprefix("a ").replace(" background", "")
        draw.text((x + 3, y + CELL + 2), words, fill="black")
        draw.text((x + 3, y + CELL + 16), steer, fill=(90, 90, 90))
    OUT[family].parent.mkdir(exist_ok=True)
    sheet.save(OUT[family], optimize=True)
    print("wrote", OUT[family].relative_to(ROOT))


if __name__ == "__main__":
    main()
