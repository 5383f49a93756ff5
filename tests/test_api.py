"""The page's API end to end through gradio_client, on the tiny family, offline."""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pipelines.recipe import read_recipe


def path_of(item) -> str:
    return item["image"] if isinstance(item, dict) else item


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def house() -> str:
    return str(ROOT / "examples" / "house.png")


def test_generate_with_a_canny_map_and_a_lora(client, house):
    gallery, maps, seed, recipe, snippet, _preview = client.predict(
        prompt="a cottage, ink",
        control_type="canny",
        control_image=handle_file(house),
        loras="tiny-ink:0.9",
        seed=5,
        steps=3,
        api_name="/generate",
    )
    image = Image.open(path_of(gallery[0]))
    assert image.size == (64, 40)  # the house photo's 3:2 aspect at the tiny size
    assert Image.open(path_of(maps[0])).mode == "RGB"
    # Each result says the seed and size it was made with; each map, its unit and type.
    assert gallery[0]["caption"] == "seed 5 · 64×40"
    width, height = Image.open(path_of(maps[0])).size  # the map keeps its own resolution
    assert maps[0]["caption"] == f"Control 1: canny · {width}×{height}"
    assert seed == 5
    assert recipe["loras"][0]["name"] == "tiny-ink" and recipe["loras"][0]["weight"] == 0.9
    assert "set_adapters(['tiny-ink']" in snippet

    plain, *_ = client.predict(
        prompt="a cottage, ink",
        control_type="canny",
        control_image=handle_file(house),
        seed=5,
        steps=3,
        api_name="/generate",
    )
    with_lora = np.asarray(image, dtype=np.int16)
    without = np.asarray(Image.open(path_of(plain[0])), dtype=np.int16)
    assert np.abs(with_lora - without).max() > 0


def test_the_recipe_read_back_from_the_png_equals_the_request(client, house):
    gallery, *_ = client.predict(
        prompt="a lighthouse",
        negative_prompt="blurry",
        seed=77,
        steps=4,
        guidance_scale=5.5,
        scheduler="DPM++ 2M",
        width=64,
        height=96,
        control_type="canny",
        control_image=handle_file(house),
        canny_low_threshold=50,
        conditioning_scale=0.7,
        guidance_end=0.6,
        loras="tiny-neon:0.5, tiny-ink:0.25",
        api_name="/generate",
    )
    recipe = read_recipe(Image.open(path_of(gallery[0]))).to_dict()
    expected = {
        "prompt": "a lighthouse",
        "negative_prompt": "blurry",
        "seed": 77,
        "steps": 4,
        "guidance_scale": 5.5,
        "scheduler": "DPM++ 2M",
        "width": 64,
        "height": 96,
    }
    assert {key: recipe[key] for key in expected} == expected
    control = recipe["controls"][0]
    assert control["control_type"] == "canny"
    assert control["params"]["low_threshold"] == 50
    assert (control["conditioning_scale"], control["guidance_end"]) == (0.7, 0.6)
    assert [(x["name"], x["weight"]) for x in recipe["loras"]] == [
        ("tiny-neon", 0.5),
        ("tiny-ink", 0.25),
    ]
    assert all(len(x["sha256"]) == 64 for x in recipe["loras"])
    assert recipe["model"]["family"] == "tiny"
    assert "diffusers" in recipe["versions"]


def test_preview_returns_the_map_before_any_generation(client, house):
    low = client.predict(
        control_type="canny",
        control_image=handle_file(house),
        canny_low_threshold=10,
        canny_high_threshold=40,
        api_name="/preview_control",
    )
    high = client.predict(
        control_type="canny", control_image=handle_file(house), api_name="/preview_control"
    )
    low_edges = np.asarray(Image.open(low))[:, :, 0]
    high_edges = np.asarray(Image.open(high))[:, :, 0]
    assert low_edges.shape == (64, 96)  # short side at the tiny family's own 64 px, its default
    assert (low_edges > 0).sum() >= (high_edges > 0).sum() > 0


def test_second_control_unit_is_reachable(client, house):
    gallery, maps, _seed, recipe, _snippet, _preview = client.predict(
        prompt="a house",
        control_type="canny",
        control_image=handle_file(house),
        control_type_2="depth",
        control_image_2=handle_file(house),
        conditioning_scale_2=0.5,
        guidance_start_2=0.25,
        steps=2,
        api_name="/generate",
    )
    assert len(maps) == 2 and gallery
    first, second = recipe["controls"]
    assert (first["control_type"], first["conditioning_scale"]) == ("canny", 1.0)
    assert (second["control_type"], second["conditioning_scale"]) == ("depth", 0.5)
    assert second["guidance_start"] == 0.25 and second["controlnet"] == "controlnet-depth"


def test_list_loras_returns_the_catalogue_for_this_base(client):
    entries = client.predict(api_name="/list_loras")
    names = {entry["name"] for entry in entries}
    assert {"tiny-ink", "tiny-neon", "tiny-sketch-kohya"} <= names
    assert all(entry["base"] == "tiny" for entry in entries)


def test_unknown_lora_gets_a_clear_message(client):
    with pytest.raises(AppError, match="unknown LoRA 'nope'"):
        client.predict(prompt="x", loras="nope:1", api_name="/generate")


def _huge_png(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header claims enormous dimensions (1-bit, all zero)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(64)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


BAD_UPLOADS = {
    "corrupt bytes": (lambda: b"\x89PNG\r\n\x1a\nthis is not an image", "could not read"),
    "huge dimensions": (lambda: _huge_png(100_000, 100_000), "megapixels"),
}
ODD_BUT_USABLE = {
    "16-bit": lambda: png(Image.fromarray(np.tile(np.arange(0, 65536, 1024, np.uint16), (40, 1)))),
    "RGBA": lambda: png(Image.new("RGBA", (80, 48), (200, 10, 10, 0))),
    "CMYK": lambda: png(Image.new("CMYK", (48, 80), (0, 128, 255, 0)), format="JPEG"),
    "1x1": lambda: png(Image.new("RGB", (1, 1), "white")),
}


@pytest.mark.parametrize("kind", list(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_message_and_the_next_request_succeeds(client, tmp_path, kind):
    make, message = BAD_UPLOADS[kind]
    path = write(tmp_path, "upload.png", make())
    with pytest.raises(AppError, match=message):
        client.predict(
            prompt="x", control_type="canny", control_image=handle_file(path), api_name="/generate"
        )
    gallery, *_ = client.predict(prompt="still serving", steps=2, api_name="/generate")
    assert gallery


@pytest.mark.parametrize("kind", list(ODD_BUT_USABLE))
def test_odd_uploads_are_normalised_and_used(client, tmp_path, kind):
    path = write(tmp_path, "upload.png", ODD_BUT_USABLE[kind]())
    gallery, maps, *_ = client.predict(
        prompt="x",
        control_type="canny",
        control_image=handle_file(path),
        steps=2,
        api_name="/generate",
    )
    assert gallery and maps


def test_eight_concurrent_clients_each_get_the_image_they_get_alone(running_app, house):
    jobs = [
        dict(prompt="a fox", seed=1, loras="tiny-ink:1"),
        dict(prompt="a fox", seed=1, loras="tiny-neon:0.8"),
        dict(prompt="a fox", seed=1, control_type="canny", control_image=handle_file(house)),
        dict(
            prompt="a fox",
            seed=1,
            control_type="depth",
            control_image=handle_file(house),
            loras="tiny-watercolor:0.6",
        ),
        dict(prompt="a fox", seed=2, loras="tiny-sketch-kohya:0.7, tiny-ink:0.3"),
        dict(prompt="a fox", seed=1),
        dict(prompt="a fox", seed=1, scheduler="UniPC", loras="tiny-faded:1"),
        dict(
            prompt="a fox",
            seed=3,
            control_type="canny",
            control_image=handle_file(house),
            loras="tiny-neon:0.4",
            scheduler="DDIM",
        ),
    ]

    def run(job):
        client = Client(running_app, verbose=False)
        gallery, *_ = client.predict(steps=3, api_name="/generate", **job)
        return Image.open(path_of(gallery[0])).tobytes()

    alone = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(run, jobs))
    for job, expected, got in zip(jobs, alone, together):
        assert got == expected, job
    assert len(set(alone)) == len(jobs)  # every job really asked for something different


def test_the_readme_api_snippet_runs_as_written(running_app, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    api_section = readme[readme.index("## API") :]
    snippet = api_section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(ROOT)
    exec(compile(snippet.replace("http://127.0.0.1:7860/", running_app), "README", "exec"), {})
    assert "tiny-ink" in capsys.readouterr().out


def test_the_snippet_runs_as_written_and_draws_the_same_pixels(client, tmp_path):
    """The page's "copy as Python", run as given, beside the files it names: the control
    map as downloaded from the page and Stencil's LoRA folder."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    square = ROOT / "examples" / "tiny-square.png"
    gallery, maps, _, _, snippet, _ = client.predict(
        prompt="a green square on a white background",
        control_type="canny",
        control_image=handle_file(str(square)),
        loras="tiny-outlined:1",
        seed=3,
        steps=6,
        api_name="/generate",
    )
    map_file = Path(path_of(maps[0]))
    assert f"load_image({map_file.name!r})" in snippet
    shutil.copy(map_file, tmp_path / map_file.name)
    (tmp_path / "loras").symlink_to(ROOT / "loras")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, check=True, timeout=300)
    ran = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    shown = np.asarray(Image.open(path_of(gallery[0])).convert("RGB"))
    assert np.array_equal(ran, shown)


def test_each_image_of_a_batch_of_three_re_runs_bit_exact_from_its_own_recipe(client):
    gallery, *_ = client.predict(
        prompt="a red circle on a blue background", seed=90, steps=4, num_images=3,
        api_name="/generate",
    )  # fmt: skip
    assert len(gallery) == 3
    for item in gallery:
        image = Image.open(path_of(item))
        recipe = read_recipe(image)
        assert recipe.settings["num_images"] == 1  # each image's recipe is its own
        again, *_ = client.predict(
            prompt=recipe.settings["prompt"],
            seed=recipe.settings["seed"],
            steps=recipe.settings["steps"],
            num_images=1,
            api_name="/generate",
        )
        rerun = Image.open(path_of(again[0]))
        assert rerun.convert("RGB").tobytes() == image.convert("RGB").tobytes()


def test_the_api_streams_live_previews_as_the_page_shows_them(running_app):
    """The app under test previews every 5 steps: a caller that submits sees the images of
    the run in progress among its outputs, then the result, with the preview cleared."""
    job = Client(running_app, verbose=False).submit(
        prompt="a red circle on a blue background", seed=3, steps=16, api_name="/generate"
    )
    gallery, *_, last_preview = job.result()
    # An output that leaves the preview as it was carries an update there (Gradio's skip).
    previews = [outputs[-1] for outputs in job.outputs() if isinstance(outputs[-1], str)]
    assert previews, "no live preview reached the caller"
    for preview in previews:
        with Image.open(preview) as image:
            assert image.size == (64, 64)
    assert last_preview is None and len(gallery) == 1  # the preview is cleared
