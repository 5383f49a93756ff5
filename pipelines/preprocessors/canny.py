"""Canny edges (OpenCV): needs no weights."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from PIL import Image

from ..errors import InvalidRequestError
from .base import ParamSpec, Preprocessor

PARAMS = (
    ParamSpec("low_threshold", "Low threshold", "int", 100, minimum=1, maximum=255, step=1),
    ParamSpec("high_threshold", "High threshold", "int", 200, minimum=1, maximum=255, step=1),
)


class CannyPreprocessor(Preprocessor):
    """White edges on black, found on the grayscale image (as ControlNet's canny models saw)."""

    name = "canny"
    label = "Canny edges"
    params = PARAMS

    def _check(self, values: dict[str, Any]) -> None:
        low, high = values["low_threshold"], values["high_threshold"]
        if high < low:
            raise InvalidRequestError(
                "high_threshold", high, f"must be at least low_threshold ({low})"
            )

    def _detect(self, image: Image.Image, params: dict[str, Any]) -> Image.Image:
        gray = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(gray, params["low_threshold"], params["high_threshold"])
        return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2), mode="RGB")
