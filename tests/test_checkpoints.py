"""Checkpoints as people have them: one `.safetensors` file in the original (A1111 /
Civitai) layout, SD 1.x or SDXL, loaded with diffusers' `from_single_file` offline.

The files are the built-in families written back in that layout
(`pipelines.original_layout`); loaded again they must draw what the folders draw.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pipelines.engine import Engine
from pipelines.errors import ModelLoadError
from pipelines.families import FAMILIES, resolve_family
from pipelines.original_layout import original_state_dict
from pipelines.recipe import python_snippet
from pipelines.requests import GenerationRequest


@pytest.fixture(scope="module")
def xl(cache_root) -> Engine:
    return Engine(FAMILIES["tiny-xl"], cache_root=cache_root)


def request(seed: int = 4) -> GenerationRequest:
    return GenerationRequest("a red circle on a blue background", seed=seed, steps=3)


@pytest.mark.parametrize("name", ["tiny", "tiny-xl"])
def test_a_single_file_checkpoint_draws_what_its_folder_draws(
    name, engine, xl, cache_root, tmp_path
):
    folder_engine = engine if name == "tiny" else xl
    checkpoint = tmp_path / f"{name}-checkpoint.safetensors"
    # Written from a fresh load: the shared engines carry other tests' LoRA layers.
    fresh = (
        FAMILIES[name].pipeline_class("text2img").from_pretrained(FAMILIES[name].locate(cache_root))
    )
    save_file(original_state_dict(fresh), str(checkpoint))
    family = resolve_family(str(checkpoint), name)
    assert family.architecture == FAMILIES[name].architecture
    loaded = Engine(family, cache_root=cache_root)
    assert type(loaded.base) is type(folder_engine.base)
    mine = loaded.generate(request())
    assert mine.images[0].tobytes() == folder_engine.generate(request()).images[0].tobytes()
    # The recipe names the file, never its folder, and its snippet loads it the same way.
    assert mine.recipe.model["checkpoint"] == checkpoint.name
    assert str(tmp_path) not in str(mine.recipe.to_dict())
    assert f"from_single_file(\n    {checkpoint.name!r}, config=str(tiny)" in python_snippet(
        mine.recipe
    )


def test_the_architecture_is_read_from_the_file(engine, xl, tmp_path):
    for name, family in (("sd", "tiny"), ("xl", "tiny-xl")):
        folder = FAMILIES[family].locate(engine.cache_root)
        base = FAMILIES[family].pipeline_class("text2img").from_pretrained(folder)
        save_file(original_state_dict(base), str(tmp_path / f"{name}.safetensors"))
    # Without a config, the registry's SD 1.5 or SDXL base gives it (from the Hub cache).
    assert resolve_family(str(tmp_path / "sd.safetensors")).config_source is None
    assert resolve_family(str(tmp_path / "sd.safetensors")).compat_tag == "sd15"
    assert resolve_family(str(tmp_path / "xl.safetensors")).compat_tag == "sdxl"
    with pytest.raises(ModelLoadError, match="SDXL checkpoint; the tiny family's configs"):
        resolve_family(str(tmp_path / "xl.safetensors"), "tiny")


def test_pickles_and_other_files_are_refused_by_name(tmp_path):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ModelLoadError, match="model.ckpt is a pickle checkpoint"):
        resolve_family(str(pickle))
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ModelLoadError, match="style.safetensors is not a Stable Diffusion"):
        resolve_family(str(lora))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="broken.safetensors is not a safetensors file"):
        resolve_family(str(broken))
    for error in (pickle, lora, broken):
        with pytest.raises(ModelLoadError) as raised:
            resolve_family(str(error))
        assert str(tmp_path) not in str(raised.value)  # the file's name, never its folder
