"""The LoRA picker's thumbnails: each shipped tiny LoRA has one drawn with it, and a
catalogue's picture is read inside its folder, within limits, or not shown at all."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, pixels

from pipelines.lora_catalogue import CatalogueError
from pipelines.loras import LoraLibrary
from pipelines.service import LORA_PREVIEW_MAX_BYTES, StencilService

SHIPPED = ROOT / "loras"
INK = SHIPPED / "tiny-ink.safetensors"


def service_for(library: LoraLibrary) -> StencilService:
    """The service's LoRA methods need the library only; no model is loaded."""
    return StencilService(SimpleNamespace(loras=library, model_facts={"text_encoder_layers": 2}))


def test_every_shipped_tiny_lora_shows_a_thumbnail_drawn_with_it(engine):
    from PIL import Image

    service = StencilService(engine)
    entries = [e for e in service.list_loras() if e["name"].startswith("tiny")]
    assert entries and all(entry["has_preview"] for entry in entries)
    thumbnails = {e["name"]: service.lora_preview(e["name"]) for e in entries}
    for name, image in thumbnails.items():
        assert image is not None and image.size == (64, 64), name
        on_disk = pixels(Image.open(SHIPPED / "previews" / f"{name}.png"))
        assert np.array_equal(pixels(image), on_disk), name
        assert on_disk.std() > 0, name  # a picture, not a blank tile
    # Each LoRA restyles the same prompt and seed its own way: no two thumbnails agree.
    drawn = [pixels(image) for image in thumbnails.values()]
    for index, first in enumerate(drawn):
        for second in drawn[index + 1 :]:
            assert np.abs(first - second).mean() > 2


def test_a_lora_without_a_picture_or_an_unknown_name_has_none(engine):
    service = StencilService(engine)
    assert service.lora_preview(None) is None
    assert service.lora_preview("") is None
    assert service.lora_preview("no-such-lora") is None
    # Hub catalogue entries carry no picture.
    assert service.lora_preview("lcm-sd15") is None


def _library_with_preview(tmp_path, preview: str) -> LoraLibrary:
    shutil.copy(INK, tmp_path / "ink.safetensors")
    entry = {"name": "ink", "file": "ink.safetensors", "base": "tiny", "preview": preview}
    (tmp_path / "catalog.json").write_text(json.dumps({"version": 1, "loras": [entry]}))
    return LoraLibrary(tmp_path, "tiny")


@pytest.mark.parametrize(
    "preview, message",
    [
        ("../outside.png", "outside the library folder"),
        ("/etc/passwd.png", "relative to the library folder"),
        ("previews/notes.txt", "preview must be one of"),
    ],
)
def test_a_catalogue_picture_outside_its_folder_or_not_an_image_is_refused(
    tmp_path, preview, message
):
    with pytest.raises(CatalogueError, match=message):
        _library_with_preview(tmp_path, preview)


@pytest.mark.parametrize("damage", ["corrupt", "huge", "missing"])
def test_a_bad_picture_is_not_shown_and_the_lora_still_works(tmp_path, damage, caplog):
    library = _library_with_preview(tmp_path, "ink.png")
    if damage == "corrupt":
        (tmp_path / "ink.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 50)
    elif damage == "huge":
        (tmp_path / "ink.png").write_bytes(b"\0" * (LORA_PREVIEW_MAX_BYTES + 1))
    service = service_for(library)
    with caplog.at_level(logging.WARNING, logger="pipelines.service"):
        assert service.lora_preview("ink") is None
    assert "preview of LoRA 'ink'" in caplog.text
    assert str(tmp_path) not in json.dumps(service.list_loras())
    assert [choice.name for choice in library.parse_lora_string("ink:0.5")] == ["ink"]


def test_a_large_picture_is_shown_as_a_thumbnail(tmp_path):
    from PIL import Image

    library = _library_with_preview(tmp_path, "ink.png")
    Image.new("RGB", (1200, 600), "orange").save(tmp_path / "ink.png")
    image = service_for(library).lora_preview("ink")
    assert image.size == (256, 128)
