"""The recipe: stored in the PNG, read back, and runnable as a plain diffusers script."""

from __future__ import annotations

import io

from conftest import hub_snapshot
from PIL import Image

from pipelines.recipe import png_bytes_with_recipe, python_snippet, read_recipe
from pipelines.requests import GenerationRequest, LoraChoice


def test_png_round_trips_the_recipe_and_keeps_the_pixels(engine):
    result = engine.generate(GenerationRequest("a fox", seed=4, steps=2, width=64, height=64))
    data = png_bytes_with_recipe(result.images[0], result.recipe)
    reopened = Image.open(io.BytesIO(data))
    assert read_recipe(reopened) == result.recipe
    assert reopened.convert("RGB").tobytes() == result.images[0].tobytes()
    assert "Steps: 2, Sampler: Euler a" in reopened.info["parameters"]  # A1111 viewers


def test_a_png_without_a_recipe_reads_as_none():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    assert read_recipe(buffer.getvalue()) is None


def test_the_python_snippet_reproduces_the_image_with_plain_diffusers(engine, cache_root):
    from pipelines.tiny import tiny_family_dir

    request = GenerationRequest(
        "a red fox",
        seed=31,
        steps=3,
        width=64,
        height=64,
        scheduler="DPM++ 2M",
        loras=(LoraChoice("tiny-ink", 0.7),),
    )
    result = engine.generate(request)
    snippet = python_snippet(result.recipe).replace(
        "'stencil-tiny'", repr(str(tiny_family_dir(cache_root)))
    )
    snippet = snippet.replace("'loras'", repr(str(engine.loras.folder)))
    snippet = snippet.replace('image.save("out.png")', "")
    namespace: dict = {}
    exec(compile(snippet, "recipe-snippet", "exec"), namespace)
    assert namespace["image"].tobytes() == result.images[0].tobytes()


def test_hub_weights_are_recorded_at_the_commit_that_was_read(tmp_path, cache_root):
    import shutil

    from diffusers import StableDiffusionPipeline

    from pipelines.families import cached_revision
    from pipelines.tiny import tiny_family_dir

    # The tiny family laid out as huggingface_hub caches a download of "main".
    commit, cache = "5" * 40, tmp_path / "hub"
    shutil.copytree(tiny_family_dir(cache_root), hub_snapshot(cache, "stencil-tests/tiny", commit))
    assert cached_revision("stencil-tests/tiny", "model_index.json", cache_dir=cache) == commit
    pipe = StableDiffusionPipeline.from_pretrained(
        "stencil-tests/tiny", cache_dir=cache, local_files_only=True, revision=commit
    )
    assert pipe.unet is not None  # that commit is what from_pretrained loads
    assert cached_revision("stencil-tests/absent", "model_index.json", cache_dir=cache) is None
    assert cached_revision(str(tiny_family_dir(cache_root)), "model_index.json") is None


def test_the_snippet_pins_the_recorded_commits(engine):
    from PIL import Image as PILImage

    from pipelines.requests import ControlUnit

    request = GenerationRequest(
        "a fox",
        seed=1,
        steps=2,
        width=64,
        height=64,
        controls=(ControlUnit("image", PILImage.new("RGB", (64, 64))),),
    )
    recipe = engine.generate(request).recipe
    assert recipe["model"]["revision"] is None  # the tiny family is a local folder
    recipe["model"]["revision"] = "a" * 40
    recipe["controls"][0]["controlnet_revision"] = "b" * 40
    snippet = python_snippet(recipe)
    compile(snippet, "recipe-snippet", "exec")
    assert f"revision={'a' * 40!r}" in snippet and f"revision={'b' * 40!r}" in snippet
