"""A warm LoRA switch touches only the LoRA layers of the old and the new set.

`NamedAdapters` lists the model's LoRA layers once per load (`LoraLayerIndex`) and a switch
sets the active list, the disabled flag and the scalings on the layers that carry an
adapter of either set. These tests count that work instead of timing it, check every
layer against what diffusers' own `set_adapters` / `disable_lora` would leave, and compare
images after a run of switches with fresh solo results, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tiny_pipe, render_np
from peft.tuners.lora import LoraLayer

from pipelines.adapters import LoraLayerIndex, _apply_through_diffusers
from pipelines.loras import LoraLibrary
from pipelines.requests import LoraChoice

SHIPPED = Path(__file__).resolve().parent.parent / "loras"

# neon and sketch also carry text-encoder weights; watercolor targets the feed-forward
# layers only, ink and faded the attention projections.
SEQUENCE = [
    (("tiny-neon", 1.0),),
    (("tiny-ink", 0.8),),
    (("tiny-neon", 0.6), ("tiny-ink", 0.8)),
    (("tiny-watercolor", 0.7),),
    (),
    (("tiny-sketch-kohya", 0.9), ("tiny-faded", 0.5)),
    (("tiny-ink", 0.3),),
    (("tiny-neon", 1.0), ("tiny-watercolor", 1.0)),
    (),
    (("tiny-neon", 1.0),),
]


def activate(library, pipe, pairs) -> None:
    library.activate(pipe, [LoraChoice(name, weight) for name, weight in pairs])


def lora_layers(pipe) -> list[LoraLayer]:
    return [
        module
        for model in (pipe.unet, pipe.text_encoder)
        for module in model.modules()
        if isinstance(module, LoraLayer)
    ]


def effective_state(pipe) -> list[tuple]:
    """What each LoRA layer adds: its adapters that run, in summing order, with their
    scalings (read through peft's own properties)."""
    state = []
    for layer in lora_layers(pipe):
        if layer.disable_adapters:
            state.append(())
            continue
        running = [a for a in layer.active_adapters if a in layer.lora_A]
        state.append(tuple((a, layer.scaling[a]) for a in running))
    return state


@pytest.fixture
def pipe(tiny_family):
    return load_tiny_pipe(tiny_family)


def test_peft_keeps_the_layer_state_where_the_index_sets_it(pipe):
    library = LoraLibrary(SHIPPED, "tiny")
    activate(library, pipe, [("tiny-ink", 1.0)])
    layer = lora_layers(pipe)[0]
    layer.set_adapter(["other", "names"])
    assert layer._active_adapter == ["other", "names"]
    layer.enable_adapters(False)
    assert layer._disable_adapters is True and layer.disable_adapters
    layer.enable_adapters(True)
    assert layer._disable_adapters is False and layer.active_adapters == ["other", "names"]


def test_every_switch_leaves_every_layer_as_set_adapters_would(pipe):
    # max_loaded=3: evictions (and with them fresh layer lists) happen along the way.
    library = LoraLibrary(SHIPPED, "tiny", max_loaded=3)
    for pairs in SEQUENCE:
        activate(library, pipe, pairs)
        ours = effective_state(pipe)
        _apply_through_diffusers(pipe, library.store._active)
        assert ours == effective_state(pipe), pairs


def test_a_warm_switch_walks_no_module_and_sets_only_the_sets_layers(pipe, monkeypatch):
    library = LoraLibrary(SHIPPED, "tiny")
    names = ["tiny-neon", "tiny-ink", "tiny-watercolor"]
    for name in names:  # all loaded: every switch below is warm
        activate(library, pipe, [(name, 1.0)])
    index: LoraLayerIndex = library.store._layers
    adapter = {item.label: item.adapter for item in library.store._loaded.values()}

    walks, scales = [], []
    original_named_modules, original_set_scale = torch.nn.Module.named_modules, LoraLayer.set_scale

    def counted_named_modules(self, *args, **kwargs):
        walks.append(type(self).__name__)
        return original_named_modules(self, *args, **kwargs)

    def counted_set_scale(self, name, scale):
        scales.append((id(self), name))
        return original_set_scale(self, name, scale)

    def refused(*args, **kwargs):
        raise AssertionError("a warm switch went through diffusers' walk over every module")

    monkeypatch.setattr(torch.nn.Module, "named_modules", counted_named_modules)
    monkeypatch.setattr(LoraLayer, "set_scale", counted_set_scale)
    for method in ("set_adapters", "enable_lora", "disable_lora"):
        monkeypatch.setattr(pipe, method, refused)

    for pairs in [
        [("tiny-ink", 0.8)],
        [("tiny-neon", 0.6), ("tiny-ink", 0.8)],
        [("tiny-watercolor", 0.5)],
        [],
        [("tiny-neon", 1.0)],
    ]:
        scales.clear()
        activate(library, pipe, pairs)
        expected = [
            (id(layer), adapter[name])
            for name, _ in pairs
            for layer in index.by_adapter[adapter[name]]
        ]
        assert sorted(scales) == sorted(expected), pairs
    assert walks == []
    assert library.store._layers is index  # nothing loaded: the layer lists still hold
    # The layers of one adapter are a few of the model's LoRA layers, not all of them.
    assert len(index.by_adapter[adapter["tiny-watercolor"]]) < len(index.layers)


@pytest.fixture(scope="module")
def solo_images(tiny_family) -> dict:
    """Each set through a fresh model and library: the image nothing before it touched."""
    images = {}
    neon, ink = ("tiny-neon", 0.7), ("tiny-ink", 0.9)
    for pairs in [(), (neon,), (ink,), (neon, ink)]:
        fresh = load_tiny_pipe(tiny_family)
        activate(LoraLibrary(SHIPPED, "tiny"), fresh, pairs)
        images[pairs] = render_np(fresh)
    return images


def test_switching_back_and_forth_gives_the_fresh_images_bit_for_bit(pipe, solo_images):
    library = LoraLibrary(SHIPPED, "tiny")
    a, b = (("tiny-neon", 0.7),), (("tiny-ink", 0.9),)
    for pairs in [a, b, a, (), b, a + b, a, ()]:
        activate(library, pipe, pairs)
        assert np.array_equal(render_np(pipe), solo_images[pairs]), pairs
