"""The recipe: stored in the PNG, read back, and runnable as a plain diffusers script."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from conftest import ROOT, hub_snapshot
from PIL import Image

from pipelines.recipe import (
    RECIPE_KEY,
    RECIPE_VERSION,
    Recipe,
    RecipeError,
    png_bytes_with_recipe,
    python_snippet,
    read_recipe,
)
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


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_the_python_snippet_reproduces_the_image_with_plain_diffusers(engine, clip_skip):
    request = GenerationRequest(
        "a red fox",
        seed=31,
        steps=3,
        width=64,
        height=64,
        scheduler="DPM++ 2M",
        clip_skip=clip_skip,
        loras=(LoraChoice("tiny-ink", 0.7),),
    )
    result = engine.generate(request)
    snippet = python_snippet(result.recipe)
    assert "tiny = ensure_tiny_family(cache_dir())" in snippet  # the test cache's folder
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
    assert recipe.model["revision"] is None  # the tiny family is a local folder
    pinned = replace(
        recipe,
        model={**recipe.model, "revision": "a" * 40},
        controls=({**recipe.controls[0], "controlnet_revision": "b" * 40},),
    )
    snippet = python_snippet(pinned)
    compile(snippet, "recipe-snippet", "exec")
    assert f"revision={'a' * 40!r}" in snippet and f"revision={'b' * 40!r}" in snippet


def _png_with_raw_recipe(data: dict) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(RECIPE_KEY, json.dumps(data))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_a_recipe_from_a_newer_stencil_is_refused_with_the_versions(engine):
    recipe = engine.generate(GenerationRequest("a fox", seed=4, steps=1)).recipe
    newer = {**recipe.to_dict(), "stencil_recipe": RECIPE_VERSION + 1}
    with pytest.raises(RecipeError, match=f"newer Stencil .*version {RECIPE_VERSION + 1}"):
        read_recipe(_png_with_raw_recipe(newer))
    with pytest.raises(RecipeError, match="not a version number"):
        read_recipe(_png_with_raw_recipe({**newer, "stencil_recipe": "two"}))


def test_a_version_1_recipe_is_migrated_and_reproduces_its_image(engine):
    """Version 1 recipes had no architecture; a field added since (CLIP skip) is read with
    its default, which is what Stencil did before it existed."""
    result = engine.generate(GenerationRequest("a fox", seed=4, steps=2))
    old = result.recipe.to_dict()
    old["stencil_recipe"] = 1
    del old["clip_skip"], old["model"]["architecture"]
    migrated = read_recipe(_png_with_raw_recipe(old))
    assert migrated == result.recipe
    assert Recipe.from_json(migrated.to_json()) == migrated


def test_clip_skip_changes_the_image_and_is_refused_past_the_text_encoder(engine):
    from pipelines.errors import InvalidRequestError

    base = dict(prompt="a red fox", seed=8, steps=2, width=64, height=64)
    last = engine.generate(GenerationRequest(**base)).images[0]
    skipped = engine.generate(GenerationRequest(**base, clip_skip=2)).images[0]
    assert last.tobytes() != skipped.tobytes()
    assert engine.generate(GenerationRequest(**base)).images[0].tobytes() == last.tobytes()
    layers = engine.model_facts["text_encoder_layers"]
    with pytest.raises(InvalidRequestError, match=f"clip_skip={layers + 1} .* from 1 to {layers}"):
        engine.generate(GenerationRequest(**base, clip_skip=layers + 1))


def test_the_a1111_parameters_carry_the_control_units_and_lora_hashes(engine):
    import hashlib

    from pipelines.requests import ControlUnit

    house = Image.open(ROOT / "examples" / "house.png")
    request = GenerationRequest(
        "a cottage",
        seed=4,
        steps=2,
        width=64,
        height=64,
        controls=(ControlUnit(control_type="canny", image=house, conditioning_scale=0.8),),
        loras=(LoraChoice("tiny-ink", 0.7),),
    )
    result = engine.generate(request)
    data = png_bytes_with_recipe(result.images[0], result.recipe)
    parameters = Image.open(io.BytesIO(data)).info["parameters"]
    prompt, settings = parameters.split("\n")
    assert prompt == "a cottage <lora:tiny-ink:0.7>"  # where A1111 and Civitai look for LoRAs
    assert (
        'ControlNet 0: "Module: canny, Model: controlnet-canny, Weight: 0.8, Processor Res: 512,'
        ' Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1"'
    ) in settings
    digest = hashlib.sha256((ROOT / "loras" / "tiny-ink.safetensors").read_bytes()).hexdigest()
    assert f'Lora hashes: "tiny-ink: {digest[:12]}"' in settings
