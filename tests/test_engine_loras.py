"""LoRAs through the engine: per-request sets on the one shared model, never leaking."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT, pixels

from pipelines.engine import Engine
from pipelines.errors import LoraRejectedError, UnknownNameError
from pipelines.families import FAMILIES
from pipelines.requests import GenerationRequest, LoraChoice


def small(*loras, **fields) -> GenerationRequest:
    fields = {"prompt": "a red fox", "seed": 9, "steps": 3, "width": 64, "height": 64, **fields}
    return GenerationRequest(loras=tuple(LoraChoice(n, w) for n, w in loras), **fields)


def test_lora_changes_the_image_and_a_request_without_it_gets_the_base_back(engine):
    base = engine.generate(small()).images[0].tobytes()
    styled = engine.generate(small(("tiny-ink", 1.0))).images[0]
    after = engine.generate(small()).images[0].tobytes()
    assert styled.tobytes() != base
    assert after == base


def test_prompt_tags_equal_the_loras_field(engine):
    tagged = engine.generate(small(prompt="a red fox <lora:tiny-neon:0.6>"))
    fielded = engine.generate(small(("tiny-neon", 0.6)))
    assert tagged.images[0].tobytes() == fielded.images[0].tobytes()
    assert tagged.recipe.settings["prompt"] == "a red fox"
    assert tagged.recipe.loras[0]["weight"] == 0.6


def test_weights_scale_the_effect(engine):
    base = pixels(engine.generate(small()).images[0])
    light = pixels(engine.generate(small(("tiny-ink", 0.3))).images[0])
    strong = pixels(engine.generate(small(("tiny-ink", 1.5))).images[0])
    assert np.abs(light - base).mean() < np.abs(strong - base).mean()


def test_unknown_or_foreign_loras_are_refused_and_the_engine_keeps_serving(
    engine, cache_root, tmp_path
):
    base = engine.generate(small()).images[0].tobytes()
    with pytest.raises(UnknownNameError, match="unknown LoRA '../loras/tiny-ink'"):
        engine.generate(small(("../loras/tiny-ink", 1.0)))
    assert engine.generate(small()).images[0].tobytes() == base

    # The foreign LoRAs are made here: one file that fits the tiny model, catalogued for it
    # and for two other families. Only the declared base tells the three apart, so only
    # the base check can refuse the foreign two.
    shutil.copy(ROOT / "loras" / "tiny-ink.safetensors", tmp_path / "ink.safetensors")
    families = {"tiny": "the tiny test model", "sd15": "SD 1.5", "sdxl": "SDXL"}
    entries = [{"name": f"ink-{tag}", "file": "ink.safetensors", "base": tag} for tag in families]
    (tmp_path / "catalog.json").write_text(json.dumps({"version": 1, "loras": entries}))
    own = Engine(FAMILIES["tiny"], cache_root=cache_root, lora_folder=tmp_path)
    assert own.loras.names() == ["ink-tiny"]
    plain = own.generate(small()).images[0].tobytes()
    inked = own.generate(small(("ink-tiny", 1.0))).images[0].tobytes()
    assert inked != plain  # the file loads, and changes the image, where its base fits
    for tag in ("sd15", "sdxl"):
        refused = re.escape(
            f"LoRA 'ink-{tag}' refused: it is made for {families[tag]};"
            f" the loaded model is {families['tiny']}"
        )
        with pytest.raises(LoraRejectedError, match=refused):
            own.generate(small((f"ink-{tag}", 1.0)))
        with pytest.raises(LoraRejectedError, match=refused):  # as a prompt tag too
            own.generate(small(prompt=f"a red fox <lora:ink-{tag}:1.0>"))
        assert own.generate(small()).images[0].tobytes() == plain
    assert own.generate(small(("ink-tiny", 1.0))).images[0].tobytes() == inked


SETS = [
    (),
    (("tiny-ink", 1.0),),
    (("tiny-ink", 0.4),),
    (("tiny-neon", 0.8),),
    (("tiny-watercolor", 1.0), ("tiny-ink", 0.5)),
    (("tiny-sketch-kohya", 0.7),),
    (("tiny-faded", 1.0), ("tiny-neon", -0.5)),
    (("tiny-neon", 0.3), ("tiny-sketch-kohya", 0.3), ("tiny-ink", 0.3)),
    (("tiny-watercolor", 0.9),),
    (),
]


def test_concurrent_requests_with_different_adapter_sets_each_equal_the_request_alone(engine):
    requests = [small(*loras, seed=20 + i % 3) for i, loras in enumerate(SETS)]
    alone = [engine.generate(r).images[0].tobytes() for r in requests]
    # Shuffle the order too, so each request follows a different neighbour than alone.
    order = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]
    with ThreadPoolExecutor(max_workers=10) as pool:
        together = dict(zip(order, pool.map(engine.generate, [requests[i] for i in order])))
    for index, expected in enumerate(alone):
        assert together[index].images[0].tobytes() == expected, SETS[index]
    assert len(set(alone)) == len(SETS) - 1  # only the two empty sets agree
