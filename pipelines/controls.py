"""Control registry: each control type names its preprocessor and its ControlNet per family.

Adding a control type means adding one `ControlSpec`. The page and the API are generated
from this table; the engine asks it which ControlNet to load and how to make the map.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .errors import InvalidRequestError, UnknownNameError
from .preprocessors import PREPROCESSORS, ParamSpec, get_preprocessor, validate_params

# The ControlNet that reads a map a person drew or edited ("image" control).
MAP_TYPE = ParamSpec(
    "map_type",
    "This map is a",
    "choice",
    "canny",
    choices=("canny", "pose", "depth"),
)


@dataclass(frozen=True)
class ControlSpec:
    name: str
    label: str
    preprocessor: str
    # Compatibility tag of a model family -> ControlNet (Hub id, or a folder inside the
    # tiny family). None: the ControlNet is chosen by the `map_type` parameter.
    controlnets: Mapping[str, str] | None
    own_params: tuple[ParamSpec, ...] = field(default_factory=tuple)
    # This type's mode in a ControlNet Union model (xinsir's numbering: 0 openpose, 1 depth,
    # 2 scribble / soft edge, 3 canny / lineart / MLSD, 4 normal, 5 segmentation).
    union_mode: int | None = None

    @property
    def params(self) -> tuple[ParamSpec, ...]:
        """Every parameter a unit of this type takes (preprocessor's and the control's)."""
        return PREPROCESSORS[self.preprocessor].params + self.own_params

    def validate_params(self, given: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
        checked = validate_params(self.params, dict(given or {}), owner=f"control {self.name!r}")
        return tuple(sorted(checked.items()))

    def controlnet_ref(self, compat_tag: str, params: Mapping[str, Any]) -> str:
        if self.controlnets is None:
            return get_control_spec(map_type_of(self.name, params)).controlnet_ref(
                compat_tag, params
            )
        try:
            return self.controlnets[compat_tag]
        except KeyError:
            raise InvalidRequestError(
                "control_type",
                self.name,
                f"has no ControlNet for the {compat_tag} model yet; available for "
                + ", ".join(self.controlnets),
            ) from None


CONTROLS: dict[str, ControlSpec] = {
    spec.name: spec
    for spec in (
        ControlSpec(
            name="pose",
            label="Pose (OpenPose skeleton)",
            preprocessor="pose",
            controlnets={
                "sd15": "lllyasviel/control_v11p_sd15_openpose",
                "sdxl": "thibaud/controlnet-openpose-sdxl-1.0",
                "tiny": "controlnet-pose",
                "tiny-xl": "controlnet-pose",
            },
            union_mode=0,
        ),
        ControlSpec(
            name="canny",
            label="Canny edges",
            preprocessor="canny",
            controlnets={
                "sd15": "lllyasviel/control_v11p_sd15_canny",
                "sdxl": "diffusers/controlnet-canny-sdxl-1.0",
                "tiny": "controlnet-canny",
                "tiny-xl": "controlnet-canny",
            },
            union_mode=3,
        ),
        ControlSpec(
            name="depth",
            label="Depth",
            preprocessor="depth",
            controlnets={
                "sd15": "lllyasviel/control_v11f1p_sd15_depth",
                "sdxl": "diffusers/controlnet-depth-sdxl-1.0",
                "tiny": "controlnet-depth",
                "tiny-xl": "controlnet-depth",
            },
            union_mode=1,
        ),
        ControlSpec(
            name="image",
            label="Use my image as the map",
            preprocessor="identity",
            controlnets=None,
            own_params=(MAP_TYPE,),
        ),
    )
}


# One ControlNet for every control type, per family that has one: xinsir's ControlNet Union
# for SDXL (its ProMax weights are the same architecture), the tiny SDXL family's own.
# Chosen with `--controlnet union`; per-control ControlNets stay the default.
UNION_CONTROLNETS: dict[str, str] = {
    "sdxl": "xinsir/controlnet-union-sdxl-1.0",
    "tiny-xl": "controlnet-union",
}
CONTROLNET_CHOICES = ("per-control", "union")


def union_controlnet_ref(compat_tag: str) -> str:
    try:
        return UNION_CONTROLNETS[compat_tag]
    except KeyError:
        raise InvalidRequestError(
            "controlnet",
            "union",
            f"there is no ControlNet Union model for the {compat_tag} family; families with"
            " one: " + ", ".join(UNION_CONTROLNETS),
        ) from None


def union_mode(control_type: str, params: Mapping[str, Any] | None) -> int:
    """The union model's mode for a unit (for "use my image", its map's type's)."""
    spec = get_control_spec(map_type_of(control_type, params))
    if spec.union_mode is None:
        raise InvalidRequestError(
            "control_type", control_type, "has no mode in the ControlNet Union model"
        )
    return spec.union_mode


def map_type_of(control_type: str, params: Mapping[str, Any] | None) -> str:
    """Which kind of map a unit steers with: its own type, or for "use my image as the map"
    the type the user gave that image."""
    if CONTROLS[control_type].controlnets is not None:
        return control_type
    return (params or {}).get("map_type", MAP_TYPE.default)


def get_control_spec(name: str) -> ControlSpec:
    try:
        return CONTROLS[name]
    except (KeyError, TypeError):
        raise UnknownNameError("control type", name, list(CONTROLS)) from None


def controlnet_ref(control_type: str, compat_tag: str, params: Mapping[str, Any]) -> str:
    return get_control_spec(control_type).controlnet_ref(compat_tag, params)


def make_map(
    control_type: str,
    image: Image.Image,
    resolution: int,
    params: Mapping[str, Any],
    *,
    device: str = "cpu",
) -> Image.Image:
    """Run the control's preprocessor with the parameters that belong to it."""
    spec = get_control_spec(control_type)
    preprocessor = get_preprocessor(spec.preprocessor, device=device)
    own = {p.name for p in spec.own_params}
    return preprocessor(
        image, resolution=resolution, **{k: v for k, v in params.items() if k not in own}
    )


def preprocessor_weights(control_type: str, *, device: str = "cpu") -> str:
    """'real', 'stand-in' or 'none' for the weights this control's preprocessor runs."""
    return get_preprocessor(get_control_spec(control_type).preprocessor, device=device).weights


# A map whose every pixel is below this (of 255) gives its ControlNet nothing to follow.
EMPTY_MAP_LEVEL = 8


def empty_map_note(unit, control_map, position: int) -> str | None:
    """What to tell the user when a unit's map came out empty (a pose detector that found
    nobody, canny thresholds above every edge): the unit will not steer the image, and an
    all-black map would otherwise look like a success."""
    import numpy as np

    if unit.control_type == "image" or np.asarray(control_map).max() >= EMPTY_MAP_LEVEL:
        return None
    found = {
        "pose": "the pose detector found no person",
        "canny": "no edges passed the thresholds (try lower ones)",
        "depth": "the depth map is flat",
    }.get(unit.control_type, "the map is empty")
    number = unit.number(position)
    return (
        f"Control {number} ({unit.control_type}): {found} in its image, so the map is"
        " empty and this unit will not steer the image."
    )
