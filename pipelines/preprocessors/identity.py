"""For uploads that already are a control map (a pose skeleton, an edge drawing)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from .base import Preprocessor


class IdentityPreprocessor(Preprocessor):
    """Returns the image itself, as RGB, at the requested short side."""

    name = "identity"
    label = "None (the upload is the map)"

    def _detect(self, image: Image.Image, params: dict[str, Any]) -> Image.Image:
        return image.copy()  # the caller's image may be cached elsewhere: never hand it out
