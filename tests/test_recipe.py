"""The recipe: stored in the PNG, read back, and runnable as a plain diffusers script."""

from __future__ import annotations

import io

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
