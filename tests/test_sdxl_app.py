"""`python app.py --model tiny-xl` end to end through gradio_client: SDXL text-to-image,
controls, two units at once, the ControlNet Union model, a kohya SDXL LoRA, the snippet."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, _free_port, served_app
from gradio_client import Client, handle_file
from PIL import Image, ImageDraw


def path_of(item) -> str:
    return item["image"] if isinstance(item, dict) else item


def picture(item) -> np.ndarray:
    return np.asarray(Image.open(path_of(item)).convert("RGB"), dtype=np.int16)


def served(controlnet: str, log_name: str):
    env = dict(
        os.environ,
        GRADIO_SERVER_PORT=str(_free_port()),
        STENCIL_MODEL="tiny-xl",
        STENCIL_CONTROLNET=controlnet,
    )
    return served_app(env, log_name)


@pytest.fixture(scope="module")
def xl_client():
    with served("per-control", "app-tiny-xl.log") as url:
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def union_client():
    with served("union", "app-tiny-xl-union.log") as url:
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    image = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 10, 36, 50), fill="white")
    draw.ellipse((40, 30, 58, 48), fill="grey")
    path = tmp_path_factory.mktemp("photo") / "shapes.png"
    image.save(path)
    return str(path)


def generate(client, **fields):
    fields = {"prompt": "a red circle", "seed": 7, "steps": 3, **fields}
    return client.predict(**fields, api_name="/generate")


def test_text_to_image_and_each_control_on_sdxl(xl_client, photo):
    plain, _maps, _seed, recipe, snippet, _ = generate(xl_client)
    assert Image.open(path_of(plain[0])).size == (64, 64)
    assert recipe["model"]["architecture"] == "sdxl"
    assert "StableDiffusionXLPipeline" in snippet
    canny, maps, *_ = generate(xl_client, control_type="canny", control_image=handle_file(photo))
    assert np.abs(picture(canny[0]) - picture(plain[0])).mean() > 1.0
    assert maps[0]["caption"].startswith("Control 1: canny")
    both, maps, _, recipe, _, _ = generate(
        xl_client,
        control_type="pose",
        control_image=handle_file(photo),
        control_type_2="depth",
        control_image_2=handle_file(photo),
    )
    assert [c["controlnet"] for c in recipe["controls"]] == ["controlnet-pose", "controlnet-depth"]
    assert len(maps) == 2


def test_a_kohya_sdxl_lora_changes_the_image_and_weight_0_is_the_base(xl_client):
    entries = xl_client.predict(api_name="/list_loras")
    assert [e["name"] for e in entries] == ["tiny-xl-sketch-kohya"]  # only this family's
    base, *_ = generate(xl_client, seed=9)
    styled, _, _, recipe, _, _ = generate(xl_client, seed=9, loras="tiny-xl-sketch-kohya:1")
    assert np.abs(picture(styled[0]) - picture(base[0])).mean() > 1.0
    assert recipe["loras"][0]["name"] == "tiny-xl-sketch-kohya"
    off, *_ = generate(xl_client, seed=9, loras="tiny-xl-sketch-kohya:0")
    assert np.array_equal(picture(off[0]), picture(base[0]))


def test_the_sdxl_snippet_runs_as_written_and_draws_the_same_pixels(xl_client, photo, tmp_path):
    gallery, maps, _, _, snippet, _ = generate(
        xl_client,
        seed=5,
        control_type="canny",
        control_image=handle_file(photo),
        loras="tiny-xl-sketch-kohya:0.8",
    )
    map_file = Path(path_of(maps[0]))
    shutil.copy(map_file, tmp_path / map_file.name)
    (tmp_path / "loras").symlink_to(ROOT / "loras")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, check=True, timeout=300)
    ran = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    assert np.array_equal(ran, picture(gallery[0]))


def test_a_union_request_with_two_modes_runs_on_one_controlnet(union_client, photo):
    plain, *_ = generate(union_client)
    gallery, maps, _, recipe, snippet, _ = generate(
        union_client,
        control_type="canny",
        control_image=handle_file(photo),
        control_type_2="depth",
        control_image_2=handle_file(photo),
    )
    assert np.abs(picture(gallery[0]) - picture(plain[0])).mean() > 1.0
    assert [(c["controlnet"], c["union_mode"]) for c in recipe["controls"]] == [
        ("controlnet-union", 3),
        ("controlnet-union", 1),
    ]
    assert "StableDiffusionXLControlNetUnionPipeline" in snippet and len(maps) == 2
