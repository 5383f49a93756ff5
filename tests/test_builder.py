"""The SD-family builder, the atomic folder build and the Hub questions."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from pipelines import hub
from pipelines.atomic_folder import STAGING_PREFIX, build_atomically
from pipelines.sd_builder import SDFamilySize, write_sd_family
from pipelines.tiny import ensure_tiny_family, tiny_family_dir

# Another size than the tiny family's on every axis: three UNet levels, one layer per
# block, a wider text encoder with three layers, narrower VAE levels.
OTHER_SIZE = SDFamilySize(
    seed=7,
    unet_widths=(32, 32, 64),
    unet_cross_attention=(False, True, True),
    unet_layers=1,
    unet_sample_size=8,
    attention_head_dim=8,
    cross_attention_width=48,
    text_layers=3,
    text_heads=4,
    text_intermediate=96,
    vae_widths=(8, 8, 16, 16),
    vae_layers=1,
    vae_norm_groups=8,
    vae_sample_size=64,
    controlnet_embedding_widths=(8, 16, 16, 16),
    controlnet_output_scale=0.05,
)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def generate(pipe, **extra) -> Image.Image:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(5)
    return pipe(
        "a fox in the snow",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
        **extra,
    ).images[0]


# --------------------------------------------------------------------------- the builder


def test_the_tiny_family_built_twice_is_byte_identical(tmp_path):
    first = ensure_tiny_family(tmp_path / "a")
    second = ensure_tiny_family(tmp_path / "b")
    assert first == tiny_family_dir(tmp_path / "a")
    assert digests(first) == digests(second)
    assert any(name.endswith(".safetensors") for name in digests(first))


def test_another_size_loads_with_from_pretrained_and_generates(tmp_path):
    folder = tmp_path / "other"
    write_sd_family(folder, OTHER_SIZE, ["canny"])
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    assert tuple(pipe.unet.config.block_out_channels) == OTHER_SIZE.unet_widths
    assert pipe.text_encoder.config.num_hidden_layers == OTHER_SIZE.text_layers
    assert pipe.vae_scale_factor == 8
    image = generate(pipe)
    assert image.size == (64, 64)

    # Its ControlNet has seeded non-zero output convolutions: it changes the image.
    controlnet = ControlNetModel.from_pretrained(folder / "controlnet-canny")
    with_control = StableDiffusionControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    edges = Image.new("RGB", (64, 64))
    edges.paste((255, 255, 255), (16, 16, 48, 48))
    controlled = generate(with_control, image=edges)
    assert controlled.size == (64, 64)
    assert controlled.tobytes() != image.tobytes()


# --------------------------------------------------------------------------- atomic folders


def write_one_file(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"built")


def test_an_atomic_build_leaves_no_staging_folder_behind(tmp_path):
    target = build_atomically(tmp_path / "model", write_one_file)
    assert (target / "weights.bin").read_bytes() == b"built"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    calls = []
    build_atomically(target, calls.append)  # complete already: not written again
    assert calls == []


def test_a_crashed_build_leaves_no_target_and_no_staging(tmp_path):
    def crash(folder: Path) -> None:
        write_one_file(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_atomically(tmp_path / "model", crash)
    assert list(tmp_path.iterdir()) == []


def test_a_builder_that_loses_the_race_keeps_the_winners_folder(tmp_path):
    target = tmp_path / "model"

    def race(folder: Path) -> None:
        write_one_file(folder)
        target.mkdir()  # another process finishes its copy while this one writes
        (target / "weights.bin").write_bytes(b"winner")

    assert build_atomically(target, race) == target
    assert (target / "weights.bin").read_bytes() == b"winner"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_an_incomplete_target_is_rebuilt(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "leftover.txt").write_text("from an older recipe")

    def has_weights(folder: Path) -> bool:
        return (folder / "weights.bin").is_file()

    build_atomically(target, write_one_file, is_complete=has_weights)
    assert sorted(p.name for p in target.iterdir()) == ["weights.bin"]


# --------------------------------------------------------------------------- the Hub


@pytest.fixture
def hub_calls(monkeypatch) -> list:
    """Records any metadata request to the Hub instead of making it."""
    from huggingface_hub import HfApi

    calls: list = []
    monkeypatch.setattr(HfApi, "model_info", lambda self, *args, **kwargs: calls.append(args))
    return calls


@pytest.mark.parametrize("variable", hub.OFFLINE_VARIABLES)
def test_hub_reachable_is_false_at_once_when_offline(monkeypatch, hub_calls, variable):
    from huggingface_hub import constants

    # Only this variable says "offline": not the others, nor huggingface_hub's import-time flag.
    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(variable, "1")
    started = time.perf_counter()
    assert hub.hub_offline()
    assert not hub.hub_reachable("stable-diffusion-v1-5/stable-diffusion-v1-5", timeout=30)
    assert time.perf_counter() - started < 0.5
    assert hub_calls == []  # decided without asking the Hub


def test_hub_reachable_asks_the_hub_about_that_repo_when_online(monkeypatch, hub_calls):
    from huggingface_hub import constants

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.hub_reachable("stencil-tests/some-repo")
    assert hub_calls == [("stencil-tests/some-repo",)]


def test_the_cache_layout_is_what_the_hub_cache_readers_find(tmp_path):
    commit = "3" * 40
    snapshot = hub.hub_snapshot(tmp_path, "stencil-tests/tiny", commit)
    assert snapshot.parent.parent == hub.hub_repo_folder(tmp_path, "stencil-tests/tiny")
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    assert hub.cached_locally("stencil-tests/tiny", cache_dir=tmp_path)
    assert hub.cached_revision("stencil-tests/tiny", "model_index.json", tmp_path) == commit
    assert not hub.cached_locally("stencil-tests/absent", cache_dir=tmp_path)
    assert hub.cached_revision("stencil-tests/absent", "model_index.json", tmp_path) is None
