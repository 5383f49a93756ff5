"""OpenPose skeletons through controlnet_aux (body, hands, face).

Weights: the three files of the Hub repo "lllyasviel/Annotators" (`body_pose_model.pth`,
`hand_pose_model.pth`, `facenet.pth`) or a local folder holding them, such as the seeded
stand-in from `tiny_weights.build_tiny_openpose`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..errors import ModelLoadError
from .base import ParamSpec, Preprocessor

REPO_ID = "lllyasviel/Annotators"
WEIGHT_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")

PARAMS = (
    ParamSpec("include_body", "Body", "bool", True),
    ParamSpec("include_hand", "Hands", "bool", False),
    ParamSpec("include_face", "Face", "bool", False),
)


class PosePreprocessor(Preprocessor):
    """Coloured OpenPose skeletons on black; black when nobody is found."""

    name = "pose"
    label = "OpenPose"
    params = PARAMS
    needs_weights = True

    def _load(self) -> Any:
        # Imported here: controlnet_aux imports every detector it has (~4 s).
        from controlnet_aux.open_pose import OpenposeDetector

        location = self.weights_source.location
        try:
            return OpenposeDetector.from_pretrained(location).to(self.device)
        except Exception as exc:
            raise ModelLoadError(
                f"could not load the OpenPose weights from {location}: {exc}"
            ) from exc

    def _detect(self, image: Image.Image, params: dict[str, Any]) -> Image.Image:
        from controlnet_aux.open_pose import draw_poses

        detector = self._loaded()
        pixels = np.asarray(image)
        # detect_poses + draw_poses instead of detector(...): its __call__ rounds both sides
        # to multiples of 64 and resamples the map back, which would blur our exact size.
        # Hands and face are found from the body, so the body is always detected.
        poses = detector.detect_poses(
            pixels, include_hand=params["include_hand"], include_face=params["include_face"]
        )
        height, width = pixels.shape[:2]
        canvas = draw_poses(
            poses,
            height,
            width,
            draw_body=params["include_body"],
            draw_hand=params["include_hand"],
            draw_face=params["include_face"],
        )
        return Image.fromarray(canvas, mode="RGB")
