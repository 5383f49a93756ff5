"""Draw the small example images the page offers (no photos, no downloads).

Usage: python scripts/make_examples.py   (writes examples/*.png; deterministic)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "examples"
sys.path.insert(0, str(ROOT))


def house() -> Image.Image:
    image = Image.new("RGB", (384, 256), (236, 232, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((110, 120, 270, 230), fill=(180, 120, 90), outline=(60, 40, 30), width=4)
    draw.polygon([(95, 125), (190, 50), (285, 125)], fill=(120, 60, 50), outline=(50, 30, 20))
    draw.rectangle((170, 170, 210, 230), fill=(90, 60, 40))
    draw.rectangle((125, 140, 155, 165), fill=(170, 210, 230), outline=(60, 40, 30), width=3)
    draw.rectangle((225, 140, 255, 165), fill=(170, 210, 230), outline=(60, 40, 30), width=3)
    draw.ellipse((300, 30, 350, 80), fill=(250, 210, 90))
    return image


def figure() -> Image.Image:
    image = Image.new("RGB", (256, 384), (210, 220, 235))
    draw = ImageDraw.Draw(image)
    skin, cloth = (225, 185, 160), (60, 70, 140)
    draw.ellipse((103, 40, 153, 95), fill=skin)
    draw.rectangle((100, 100, 156, 220), fill=cloth)
    draw.line((100, 110, 50, 60), fill=cloth, width=18)
    draw.line((156, 110, 210, 170), fill=cloth, width=18)
    draw.line((110, 220, 85, 350), fill=(40, 40, 50), width=20)
    draw.line((146, 220, 180, 350), fill=(40, 40, 50), width=20)
    return image


def tunnel() -> Image.Image:
    y, x = np.mgrid[0:256, 0:384]
    distance = np.hypot((x - 192) / 192, (y - 128) / 128)
    shade = (255 * np.clip(1 - distance, 0, 1) ** 0.7).astype(np.uint8)
    return Image.fromarray(np.stack([shade, shade, (shade * 0.8).astype(np.uint8)], axis=2))


# The offline tiny model's examples: scenes it was trained on (see tiny_training/scenes.py),
# a picture for its canny unit and drawn maps for depth and pose ("use my image as the map").
TINY_SQUARE = dict(shape="square", colour="green", background="white", centre=(22.0, 40.0))
TINY_TRIANGLE = dict(shape="triangle", colour="yellow", background="black", centre=(40.0, 26.0))
TINY_FIGURE = dict(shape="figure", colour="red", background="blue", centre=(24.0, 32.0))


def tiny_examples() -> dict[str, Image.Image]:
    from tiny_training import scenes

    square = scenes.Scene(**TINY_SQUARE, size=14.0)
    triangle = scenes.Scene(**TINY_TRIANGLE, size=15.0, depth=0.9)
    figure = scenes.Scene(**TINY_FIGURE, size=20.0, pose=(0.6, -0.4, 0.3, 0.0))
    return {
        "tiny-square": scenes.render(square),
        "tiny-triangle-depth": scenes.depth_map(triangle),
        "tiny-figure-pose": scenes.pose_map(figure),
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    drawn = {"house": house(), "figure": figure(), "tunnel": tunnel(), **tiny_examples()}
    for name, image in drawn.items():
        image.save(OUT / f"{name}.png", optimize=True)
        print("wrote", OUT / f"{name}.png")


if __name__ == "__main__":
    main()
