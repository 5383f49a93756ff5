"""Pictures made in code, and the control maps that belong to them.

A scene is one coloured shape (circle, square, triangle) or stick figure on a plain
background, with a caption that names both colours and the shape ("a red circle on a blue
background"). The shape's place and size are random and never in the caption: a model can
only learn them from a control map, which is what makes the ControlNets learn to steer.

Each scene also draws its own maps: canny edges through the app's own preprocessor (what a
user's canny map looks like), a depth map (the shape at a known nearness in front of a far
floor), and for figures the OpenPose skeleton through controlnet-aux's own drawing code.
The same functions give the adherence tests their control maps, so what is measured is
what was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image

from pipelines.tiny import TINY_COLOURS, TINY_SHAPES

SIDE = 64  # the tiny family's default image size

# Saturated, far apart in RGB, each one word: the offline model can tell them by name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
FIGURE = "figure"
STYLES = ("plain", "inverted", "outlined")
# The family declares the words it knows; these pictures are what they mean.
assert tuple(COLOURS) == TINY_COLOURS and (*SHAPES, FIGURE) == TINY_SHAPES


@dataclass(frozen=True)
class Scene:
    shape: str  # one of SHAPES, or FIGURE
    colour: str
    background: str
    centre: tuple[float, float]  # pixels, x then y
    size: float  # radius in pixels (half the figure's height)
    depth: float = 0.8  # nearness in (0, 1]: 1 is nearest, drawn brightest on the depth map
    pose: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # arm and leg angles, radians
    style: str = "plain"

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: np.random.Generator, *, figure: bool | None = None) -> Scene:
    """A scene with a random shape, colours, place, size and nearness."""
    if figure is None:
        figure = rng.random() < 0.25
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    if figure:
        size = float(rng.uniform(16, 24))
        margin = size * 0.6
        centre = (float(rng.uniform(margin, SIDE - margin)), float(rng.uniform(size, SIDE - size)))
        pose = tuple(float(a) for a in rng.uniform(-0.9, 0.9, size=4))
        return Scene(FIGURE, str(colour), str(background), centre, size, _depth(rng), pose)
    size = float(rng.uniform(9, 18))
    centre = tuple(float(c) for c in rng.uniform(size + 2, SIDE - size - 2, size=2))
    return Scene(str(rng.choice(SHAPES)), str(colour), str(background), centre, size, _depth(rng))


def random_scenes(count: int, seed: int, *, figure: bool | None = None) -> list[Scene]:
    """`count` scenes from one seed (figures only, none, or a quarter at random)."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, figure=figure) for _ in range(count)]


def _depth(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.55, 1.0))


def with_style(scene: Scene, style: str) -> Scene:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; one of {STYLES}")
    return replace(scene, style=style)


# --------------------------------------------------------------------------- drawing


def shape_mask(scene: Scene) -> np.ndarray:
    """The pixels the shape covers, as a bool array (SIDE x SIDE)."""
    canvas = np.zeros((SIDE, SIDE), np.uint8)
    _draw(canvas, scene, 255)
    return canvas > 127


def _draw(canvas: np.ndarray, scene: Scene, value) -> None:
    # Drawn at 4x with anti-aliasing off, then the caller downsamples if it wants soft edges;
    # at 1x the shapes are exact, which the masks and the maps both need.
    x, y = scene.centre
    r = scene.size
    if scene.shape == "circle":
        cv2.circle(canvas, (round(x), round(y)), round(r), value, thickness=-1)
    elif scene.shape == "square":
        half = r * 0.85
        cv2.rectangle(
            canvas,
            (round(x - half), round(y - half)),
            (round(x + half), round(y + half)),
            value,
            -1,
        )
    elif scene.shape == "triangle":
        points = [
            (x + r * math.cos(angle), y - r * math.sin(angle))
            for angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
        ]
        cv2.fillPoly(canvas, [np.round(np.array(points)).astype(np.int32)], value)
    elif scene.shape == FIGURE:
        joints = figure_joints(scene)
        thickness = max(2, round(r / 7))
        for a, b in _FIGURE_BONES:
            cv2.line(canvas, _pt(joints[a]), _pt(joints[b]), value, thickness)
        cv2.circle(canvas, _pt(joints["head"]), max(3, round(r / 4.5)), value, -1)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")


def render(scene: Scene) -> Image.Image:
    """The picture: the shape in its colour on the background, in the scene's style."""
    canvas = np.empty((SIDE, SIDE, 3), np.uint8)
    canvas[:] = COLOURS[scene.background]
    _draw(canvas, scene, COLOURS[scene.colour])
    if scene.style == "outlined":
        ring = _outline_ring(shape_mask(scene))
        canvas[ring] = COLOURS[outline_colour(scene)]
    elif scene.style == "inverted":
        canvas = 255 - canvas
    return Image.fromarray(canvas, mode="RGB")


def _outline_ring(mask: np.ndarray, width: int = 3) -> np.ndarray:
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    grown = cv2.dilate(mask.astype(np.uint8), kernel) > 0
    return grown & ~mask


def outline_ring(scene: Scene) -> np.ndarray:
    """Where the "outlined" style draws its outline: a 3-pixel ring around the shape."""
    return _outline_ring(shape_mask(scene))


def outline_colour(scene: Scene) -> str:
    """Black, or the first of white and yellow that the picture does not already hold, so the
    outline always shows against both the shape and the background."""
    held = (scene.colour, scene.background)
    return next(name for name in ("black", "white", "yellow") if name not in held)


def canny_of_image(image: Image.Image) -> Image.Image:
    """Canny edges by the app's own canny preprocessor at its default thresholds."""
    from pipelines.preprocessors.canny import CannyPreprocessor

    return CannyPreprocessor()(image, resolution=max(image.size))


def canny_map(scene: Scene) -> Image.Image:
    """The scene's canny map: what a user's canny unit makes of the plain picture."""
    return canny_of_image(render(replace(scene, style="plain")))


def depth_map(scene: Scene) -> Image.Image:
    """Near is bright, as Depth Anything and MiDaS draw it: a floor that comes nearer towards
    the bottom of the picture, and the shape at its own nearness in front of it."""
    rows = np.linspace(0.0, 0.35, SIDE, dtype=np.float32)[:, None].repeat(SIDE, axis=1)
    depth = rows.copy()
    depth[shape_mask(scene)] = scene.depth
    grey = np.round(depth * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")


# --------------------------------------------------------------------------- figures

# OpenPose's 18 body keypoints, in its order (controlnet-aux draws limbs between them).
_OPENPOSE_ORDER = (
    "nose",
    "neck",
    "r_shoulder",
    "r_elbow",
    "r_wrist",
    "l_shoulder",
    "l_elbow",
    "l_wrist",
    "r_hip",
    "r_knee",
    "r_ankle",
    "l_hip",
    "l_knee",
    "l_ankle",
    "r_eye",
    "l_eye",
    "r_ear",
    "l_ear",
)
_FIGURE_BONES = (
    ("neck", "hip"),
    ("neck", "r_elbow"),
    ("r_elbow", "r_wrist"),
    ("neck", "l_elbow"),
    ("l_elbow", "l_wrist"),
    ("hip", "r_knee"),
    ("r_knee", "r_ankle"),
    ("hip", "l_knee"),
    ("l_knee", "l_ankle"),
)


def _pt(point: tuple[float, float]) -> tuple[int, int]:
    return round(point[0]), round(point[1])


def figure_joints(scene: Scene) -> dict[str, tuple[float, float]]:
    """Joint positions of the stick figure: head at the top, feet at the bottom, the arms and
    legs turned by the scene's pose angles."""
    x, y = scene.centre
    h = scene.size  # half the height
    arm_right, arm_left, leg_right, leg_left = scene.pose
    neck = (x, y - 0.55 * h)
    hip = (x, y + 0.15 * h)
    head = (x, y - 0.8 * h)

    def limb(start, angle, length, side):
        # angle 0 points straight down; positive swings it outwards on its own side.
        return (start[0] + side * length * math.sin(angle), start[1] + length * math.cos(angle))

    arm = 0.42 * h
    leg = 0.45 * h
    r_elbow = limb(neck, 0.6 + arm_right, arm, -1)
    l_elbow = limb(neck, 0.6 + arm_left, arm, 1)
    r_knee = limb(hip, 0.25 + leg_right * 0.4, leg, -1)
    l_knee = limb(hip, 0.25 + leg_left * 0.4, leg, 1)
    return {
        "head": head,
        "neck": neck,
        "hip": hip,
        "r_elbow": r_elbow,
        "l_elbow": l_elbow,
        "r_wrist": limb(r_elbow, 0.3 + arm_right, arm, -1),
        "l_wrist": limb(l_elbow, 0.3 + arm_left, arm, 1),
        "r_knee": r_knee,
        "l_knee": l_knee,
        "r_ankle": limb(r_knee, 0.1, leg, -1),
        "l_ankle": limb(l_knee, 0.1, leg, 1),
    }


def _openpose_keypoints(scene: Scene) -> list[tuple[float, float]]:
    j = figure_joints(scene)
    x, _ = j["neck"]
    h = scene.size
    shoulder = 0.18 * h
    head_x, head_y = j["head"]
    hip_x, hip_y = j["hip"]
    points = {
        "nose": (head_x, head_y + 0.02 * h),
        "neck": j["neck"],
        "r_shoulder": (x - shoulder, j["neck"][1]),
        "l_shoulder": (x + shoulder, j["neck"][1]),
        "r_elbow": j["r_elbow"],
        "l_elbow": j["l_elbow"],
        "r_wrist": j["r_wrist"],
        "l_wrist": j["l_wrist"],
        "r_hip": (hip_x - 0.1 * h, hip_y),
        "l_hip": (hip_x + 0.1 * h, hip_y),
        "r_knee": j["r_knee"],
        "l_knee": j["l_knee"],
        "r_ankle": j["r_ankle"],
        "l_ankle": j["l_ankle"],
        "r_eye": (head_x - 0.06 * h, head_y - 0.05 * h),
        "l_eye": (head_x + 0.06 * h, head_y - 0.05 * h),
        "r_ear": (head_x - 0.12 * h, head_y),
        "l_ear": (head_x + 0.12 * h, head_y),
    }
    return [points[name] for name in _OPENPOSE_ORDER]


def pose_map(scene: Scene) -> Image.Image:
    """The figure's OpenPose skeleton, drawn by controlnet-aux exactly as its detector's
    results are drawn on the app's pose maps."""
    from controlnet_aux.open_pose import PoseResult, draw_poses
    from controlnet_aux.open_pose.body import BodyResult, Keypoint

    if scene.shape != FIGURE:
        raise ValueError("only a figure has a pose")
    keypoints = [Keypoint(px / SIDE, py / SIDE) for px, py in _openpose_keypoints(scene)]
    body = BodyResult(keypoints=keypoints, total_score=1.0, total_parts=len(keypoints))
    canvas = draw_poses(
        [PoseResult(body, None, None, None)],
        SIDE,
        SIDE,
        draw_body=True,
        draw_hand=False,
        draw_face=False,
    )
    return Image.fromarray(canvas, mode="RGB")


def control_map(scene: Scene, control_type: str) -> Image.Image:
    maps = {"canny": canny_map, "depth": depth_map, "pose": pose_map}
    return maps[control_type](scene)
