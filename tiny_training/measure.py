"""What a person would check by looking at a tiny-model picture, as numbers.

- `read_picture`: the background colour (the border's median), the shape's pixels (those far
  from it) and their colour, each named by the nearest palette colour; and the shape, named
  by which ideal shape of the same area and centre overlaps it best.
- `edge_f1`: how well a picture's canny edges follow a canny map, with a tolerance of a few
  pixels (a 64 px image decoded from an 8x8 latent cannot place an edge to the pixel).
- `mask_iou` and `centroid_distance`: whether the shape sits where a map put it.
- `outline_strength`: whether the "outlined" style's ring is drawn.

The adherence tests and `python -m tiny_training.evaluate` both use these, so the numbers
written down are the ones the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from . import scenes

# A pixel belongs to the shape when it is this far (RGB distance) from the background.
FOREGROUND_DISTANCE = 90.0
_BORDER = 3
# A ring pixel is in the outline's colour when this close to it.
OUTLINE_DISTANCE = 80.0


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no shape found
    shape: str | None
    mask: np.ndarray
    background_rgb: tuple[float, float, float]
    colour_rgb: tuple[float, float, float] | None


def nearest_colour(rgb, palette: dict[str, tuple[int, int, int]] | None = None) -> str:
    palette = palette or scenes.COLOURS
    return min(palette, key=lambda name: colour_distance(rgb, palette[name]))


def inverted_palette() -> dict[str, tuple[int, int, int]]:
    """Each palette colour as the "inverted" style draws it, under its own name."""
    return {name: tuple(255 - c for c in rgb) for name, rgb in scenes.COLOURS.items()}


def colour_distance(a, b) -> float:
    """RGB distance: 0 for the same colour, 441 from black to white."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def read_picture(image: Image.Image, palette=None) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate(
        [
            pixels[:_BORDER].reshape(-1, 3),
            pixels[-_BORDER:].reshape(-1, 3),
            pixels[:, :_BORDER].reshape(-1, 3),
            pixels[:, -_BORDER:].reshape(-1, 3),
        ]
    )
    background_rgb = tuple(np.median(border, axis=0))
    far = np.linalg.norm(pixels - np.asarray(background_rgb), axis=2) > FOREGROUND_DISTANCE
    mask = _largest_component(far)
    background = nearest_colour(background_rgb, palette)
    if mask.sum() < 12:
        return Reading(background, None, None, mask, background_rgb, None)
    colour_rgb = tuple(np.median(pixels[mask], axis=0))
    return Reading(
        background,
        nearest_colour(colour_rgb, palette),
        name_shape(mask),
        mask,
        background_rgb,
        colour_rgb,
    )


def prompt_accuracy(pictures) -> dict[str, float]:
    """For (picture, scene) pairs: the share whose shape colour, background colour and
    shape are each read as the scene's caption says, and all three at once."""
    hits = {"colour": 0, "background": 0, "shape": 0, "all": 0}
    count = 0
    for image, scene in pictures:
        reading = read_picture(image)
        right = {
            "colour": reading.colour == scene.colour,
            "background": reading.background == scene.background,
            "shape": reading.shape == scene.shape,
        }
        right["all"] = all(right.values())
        for key, value in right.items():
            hits[key] += value
        count += 1
    return {key: value / count for key, value in hits.items()}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    if count <= 1:
        return np.zeros_like(mask)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def name_shape(mask: np.ndarray) -> str:
    """The shape among circle, square and triangle whose ideal outline, of the same area at
    the same centre, overlaps `mask` best; "figure" when none covers half of it (a stick
    figure is thin: no compact shape of its area fits it)."""
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    centre = (float(xs.mean()), float(ys.mean()))
    # Radius giving each ideal shape the mask's area (see scenes._draw for the geometry).
    radius = {
        "circle": math.sqrt(area / math.pi),
        "square": math.sqrt(area) / 1.7,
        "triangle": math.sqrt(area / (3 * math.sqrt(3) / 4)),
    }
    best, best_iou = None, -1.0
    for shape, r in radius.items():
        # A triangle's centre of mass is its drawing centre, so centres line up for all three.
        ideal = scenes.shape_mask(scenes.Scene(shape, "white", "black", centre, r))
        iou = mask_iou(mask, ideal)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best if best_iou >= 0.5 else scenes.FIGURE


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return float(xs.mean()), float(ys.mean())


def centroid_distance(mask: np.ndarray, target: np.ndarray) -> float:
    """Pixels between the centres of two masks; the image's diagonal when one is empty."""
    a, b = centroid(mask), centroid(target)
    if a is None or b is None:
        return math.hypot(*mask.shape)
    return math.hypot(a[0] - b[0], a[1] - b[1])


def edges_of(image: Image.Image) -> np.ndarray:
    return np.asarray(scenes.canny_of_image(image))[:, :, 0] > 127


def edge_f1(image: Image.Image, control: Image.Image, tolerance: int = 2) -> float:
    """F1 of the picture's canny edges against the map's, an edge counting as matched when the
    other has one within `tolerance` pixels."""
    found = edges_of(image)
    wanted = np.asarray(control.convert("L")) > 127
    if not found.any() or not wanted.any():
        return 0.0
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_wanted = cv2.dilate(wanted.astype(np.uint8), kernel) > 0
    near_found = cv2.dilate(found.astype(np.uint8), kernel) > 0
    precision = float((found & near_wanted).sum() / found.sum())
    recall = float((wanted & near_found).sum() / wanted.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def outline_strength(image: Image.Image, scene: scenes.Scene) -> float:
    """The share of the ring where the "outlined" style paints its outline that is in the
    outline's colour (within OUTLINE_DISTANCE): near 0 for a plain picture, whose ring is
    background, and near 1 for an outlined one."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    ring = scenes.outline_ring(scene)
    colour = np.asarray(scenes.COLOURS[scenes.outline_colour(scene)], dtype=np.float64)
    return float((np.linalg.norm(pixels[ring] - colour, axis=1) < OUTLINE_DISTANCE).mean())
