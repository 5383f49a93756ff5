"""The engine on the tiny family: reproducibility, schedulers, isolation, errors, cancel."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import pixels

from pipelines.engine import CancelToken, Engine
from pipelines.errors import (
    GenerationCancelled,
    InvalidRequestError,
    ModelLoadError,
    UnknownNameError,
)
from pipelines.families import FAMILIES, resolve_family
from pipelines.requests import GenerationRequest
from pipelines.schedulers import SCHEDULERS


def small(**fields) -> GenerationRequest:
    fields.setdefault("prompt", "a red fox in the snow")
    fields.setdefault("seed", 7)
    fields.setdefault("steps", 2)
    fields.setdefault("width", 64)
    fields.setdefault("height", 64)
    return GenerationRequest(**fields)


def test_same_request_and_seed_give_identical_images(engine):
    first = engine.generate(small())
    second = engine.generate(small())
    assert first.images[0].tobytes() == second.images[0].tobytes()


def test_another_seed_or_prompt_gives_another_image(engine):
    base = pixels(engine.generate(small()).images[0])
    other_seed = pixels(engine.generate(small(seed=8)).images[0])
    other_prompt = pixels(engine.generate(small(prompt="a blue house")).images[0])
    assert np.abs(base - other_seed).max() > 10
    assert np.abs(base - other_prompt).max() > 0


def test_random_seed_is_reported_and_reproduces_the_image(engine):
    result = engine.generate(small(seed=None))
    again = engine.generate(small(seed=result.seed))
    assert result.recipe["seed"] == result.seed
    assert result.images[0].tobytes() == again.images[0].tobytes()


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_each_scheduler_runs_and_is_reproducible(engine, scheduler):
    first = engine.generate(small(scheduler=scheduler, steps=3))
    second = engine.generate(small(scheduler=scheduler, steps=3))
    assert first.images[0].size == (64, 64)
    assert first.images[0].tobytes() == second.images[0].tobytes()
    assert first.recipe["scheduler"] == scheduler


def test_schedulers_differ_from_each_other(engine):
    euler_a = pixels(engine.generate(small(scheduler="Euler a", steps=3)).images[0])
    ddim = pixels(engine.generate(small(scheduler="DDIM", steps=3)).images[0])
    assert np.abs(euler_a - ddim).max() > 0


def test_size_and_image_count_follow_the_request(engine):
    result = engine.generate(small(width=96, height=64, num_images=2))
    assert [image.size for image in result.images] == [(96, 64), (96, 64)]
    assert result.seeds == (7, 8)


def test_progress_reports_every_step(engine):
    seen = []
    engine.generate(small(steps=4), progress=lambda done, total, stage: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_stops_within_one_step_and_engine_keeps_serving(engine):
    token = CancelToken()
    seen = []

    def progress(done, total, stage):
        seen.append(done)
        if done == 2:
            token.cancel()

    with pytest.raises(GenerationCancelled, match="after step 3 of 10"):
        engine.generate(small(steps=10), progress=progress, cancel=token)
    assert seen == [1, 2]
    assert engine.generate(small()).images


def test_a_request_cancelled_while_queued_never_runs(engine):
    token = CancelToken()
    token.cancel()
    with pytest.raises(GenerationCancelled, match="before it started"):
        engine.generate(small(), cancel=token)


def test_overlong_prompt_is_reported_not_silently_cut(engine):
    result = engine.generate(small(prompt="a red fox " * 40))
    assert result.images
    assert any("the model reads the first 75" in warning for warning in result.warnings)


def test_eight_concurrent_requests_each_equal_the_request_run_alone(engine):
    requests = [
        small(seed=11, scheduler="Euler a", steps=2),
        small(seed=12, scheduler="DPM++ 2M", steps=3),
        small(seed=13, scheduler="UniPC", steps=2, width=96),
        small(seed=14, scheduler="DDIM", steps=4, height=80),
        small(seed=15, scheduler="Euler", steps=2, prompt="a blue house"),
        small(seed=16, scheduler="DPM++ 2M Karras", steps=3, guidance_scale=3.0),
        small(seed=17, scheduler="Euler a", steps=5, negative_prompt="blurry"),
        small(seed=18, scheduler="UniPC", steps=2, num_images=2),
    ]
    alone = [[img.tobytes() for img in engine.generate(r).images] for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(engine.generate, requests))
    for request, expected, result in zip(requests, alone, together):
        assert [img.tobytes() for img in result.images] == expected, request


BAD_FIELDS = [
    ("steps", 0, "steps=0"),
    ("steps", 10000, "steps=10000"),
    ("steps", 2.5, "whole number"),
    ("guidance_scale", math.nan, "guidance_scale=nan"),
    ("guidance_scale", -1.0, "from 0.0 to 30.0"),
    ("width", 100, "multiple of 8 (try 96 or 104)"),
    ("height", 7, "height=7"),
    ("width", 100000, "width=100000"),
    ("seed", -5, "seed=-5"),
    ("seed", 2**40, "seed="),
    ("num_images", 0, "num_images=0"),
    ("scheduler", "Heun++ 9M", "unknown scheduler 'Heun++ 9M'; choose one of: Euler a"),
    ("prompt", None, "prompt=None"),
    ("prompt", "x" * 50000, "50000 characters long"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS)
def test_bad_fields_raise_clear_errors_and_engine_keeps_serving(engine, field, value, message):
    fields = {"prompt": "a fox", "seed": 1, "steps": 2, "width": 64, "height": 64, field: value}
    with pytest.raises((InvalidRequestError, UnknownNameError)) as caught:
        engine.generate(GenerationRequest(**fields))
    assert message in str(caught.value)
    assert engine.generate(small()).images


def test_unknown_model_names_are_refused_with_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown model 'sd99'; choose one of: sd15"):
        resolve_family("sd99")
    with pytest.raises(UnknownNameError, match="unknown model ''"):
        resolve_family("")


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        resolve_family(str(tmp_path))


def test_auto_without_network_or_cache_starts_the_tiny_family_with_a_notice(cache_root):
    engine = Engine.start("auto", cache_root=cache_root)
    assert engine.family.name == "tiny"
    assert engine.status.offline
    assert "Offline" in engine.status.notice


def test_a_local_model_folder_loads_through_from_pretrained(cache_root, engine):
    from pipelines.tiny import tiny_family_dir

    folder = str(tiny_family_dir(cache_root))
    # A user folder counts as real-size: float32 is asked for to compare bit for bit.
    folder_engine = Engine.start(folder, cache_root=cache_root, dtype="float32")
    assert Engine.start(folder, cache_root=cache_root).dtype != folder_engine.dtype
    assert folder_engine.family.compat_tag == "sd15"
    ours = folder_engine.generate(small()).images[0].tobytes()
    assert ours == engine.generate(small()).images[0].tobytes()


def test_families_registry_has_room_for_sdxl():
    assert FAMILIES["sdxl"].pipeline_class("text2img").__name__ == "StableDiffusionXLPipeline"
    assert FAMILIES["sd15"].base_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
