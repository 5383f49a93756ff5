"""Every refusal names the field (or file) and what is allowed; nothing is rounded silently;
a bad recipe restores nothing. Through the service, as the page and the API call it."""

from __future__ import annotations

import io
import json
import math

import pytest
from conftest import ROOT
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.errors import StencilError
from pipelines.fields import DETECTION_RESOLUTION
from pipelines.recipe import RECIPE_KEY
from pipelines.service import StencilService

HOUSE = str(ROOT / "examples" / "house.png")
RESOLUTION_MAX = DETECTION_RESOLUTION.maximum


@pytest.fixture(scope="module")
def service(engine, tmp_path_factory):
    return StencilService(engine, output_dir=tmp_path_factory.mktemp("out"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"control_type": "canny", "control_resolution": math.nan},
            f"control_resolution=nan is not allowed: an integer from 64 to {RESOLUTION_MAX}",
        ),
        ({"control_type": "canny", "control_resolution": 100.5}, "control_resolution=100.5"),
        ({"seed": 1.5}, "seed=1.5 is not allowed: an integer"),
        ({"steps": "twenty"}, "steps='twenty' is not allowed: an integer from 1 to"),
        ({"control_type": "sketch"}, "unknown control type 'sketch'; choose one of: none, pose"),
        ({"control_type_2": "depth"}, "control_image_2=None is not allowed"),
        ({"conditioning_scale_2": 5, "control_type_2": "canny"}, "conditioning_scale_2=5.0"),
        ({"loras": "tiny-ink:lots"}, "loras='tiny-ink:lots' is not allowed: write name:weight"),
        ({"clip_skip": 9}, "clip_skip=9 is not allowed: an integer from 1 to 2"),
    ],
)
def test_bad_values_are_refused_naming_the_field(service, values, message):
    fields = {"prompt": "a fox", "control_image": HOUSE, **values}
    with pytest.raises(StencilError) as caught:
        service.build_request(fields)
    assert message in str(caught.value)


def _png_with(recipe_text: str) -> bytes:
    info = PngInfo()
    info.add_itxt(RECIPE_KEY, recipe_text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_recipe(service) -> dict:
    outcome = service.generate({"prompt": "a fox", "seed": 5, "steps": 1})
    return outcome.recipe.to_dict()


def _restore(service, tmp_path, data) -> dict:
    path = tmp_path / "dropped.png"
    text = data if isinstance(data, str) else json.dumps(data)
    path.write_bytes(_png_with(text))
    return service.restore(path)


def test_a_recipe_without_loras_restores_with_none(service, tmp_path, good_recipe):
    del good_recipe["loras"]
    assert _restore(service, tmp_path, good_recipe)["loras"] == ""


def test_a_deeply_nested_recipe_is_refused_clearly(service, tmp_path):
    nested = '{"stencil_recipe": 2, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(StencilError, match="recipe_image='dropped.png' .*nested too deeply"):
        _restore(service, tmp_path, nested)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 10_000}, "steps=10000 is not allowed"),
        ({"scheduler": "Turbo 9000"}, "unknown scheduler 'Turbo 9000'"),
        ({"loras": [{"name": "tiny-ink", "weight": "heavy"}]}, "weight"),
        ({"controls": ["canny"]}, "the recipe is damaged"),
        ({"model": None}, "the recipe is damaged"),
    ],
)
def test_a_recipe_with_a_bad_value_restores_nothing_and_says_which(
    service, tmp_path, good_recipe, change, message
):
    with pytest.raises(StencilError) as caught:
        _restore(service, tmp_path, {**good_recipe, **change})
    assert message in str(caught.value) and "recipe_image='dropped.png'" in str(caught.value)


def test_size_limits_read_as_people_write_them(service, tmp_path):
    from pipelines.settings import LIMITS

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(LIMITS.max_upload_bytes))
    with pytest.raises(StencilError) as caught:
        service.build_request({"prompt": "x", "control_type": "canny", "control_image": str(big)})
    assert "the limit is 20 MB" in str(caught.value)
    assert str(tmp_path) not in str(caught.value)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"unet.r": "four"}, "its adapter metadata 'unet.r' is 'four': it must be a whole number"),
        ({"unet.lora_alpha": [1]}, "'unet.lora_alpha' is [1]: it must be a number"),
        ({"unet.use_dora": "yes"}, "'unet.use_dora' is 'yes': it must be true or false"),
    ],
)
def test_adapter_metadata_of_the_wrong_type_is_refused_with_its_field(
    service, tmp_path, metadata, message
):
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ROOT / "loras" / "tiny-ink.safetensors"))
    path = tmp_path / "odd-metadata.safetensors"
    save_file(tensors, str(path), metadata={LORA_ADAPTER_METADATA_KEY: json.dumps(metadata)})
    with pytest.raises(StencilError) as caught:
        service.add_lora_upload(path, "messages-session")
    assert message in str(caught.value) and "odd-metadata" in str(caught.value)
