"""A damaged model cache heals (the built-in families) or fails at start with one clear line
that names the broken file and no machine path (a model folder Stencil did not build)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from pipelines.engine import Engine
from pipelines.errors import ModelLoadError
from pipelines.families import FAMILIES
from pipelines.requests import ControlUnit, GenerationRequest
from pipelines.tiny import ensure_tiny_family, tiny_family_dir

REQUEST = dict(prompt="a red fox", seed=3, steps=2, width=64, height=64)


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_fill(path) -> None:
    """Same size and a valid header, every weight byte zero: loads silently."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes(len(data) - header)
    path.write_bytes(bytes(data))


DAMAGES = {
    "missing index": lambda folder: (folder / "model_index.json").unlink(),
    "truncated text encoder": lambda folder: truncate(
        folder / "text_encoder" / "model.safetensors"
    ),
    "missing tokenizer": lambda folder: shutil.rmtree(folder / "tokenizer"),
    "zeroed unet": lambda folder: zero_fill(
        folder / "unet" / "diffusion_pytorch_model.safetensors"
    ),
}


@pytest.fixture(scope="module")
def base_image(engine):
    return engine.generate(GenerationRequest(**REQUEST)).images[0].tobytes()


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_tiny_family_is_rebuilt_at_start_and_gives_the_same_image(
    tmp_path, cache_root, base_image, damage
):
    shutil.copytree(tiny_family_dir(cache_root), tiny_family_dir(tmp_path))
    DAMAGES[damage](tiny_family_dir(tmp_path))
    engine = Engine(FAMILIES["tiny"], cache_root=tmp_path)
    assert engine.generate(GenerationRequest(**REQUEST)).images[0].tobytes() == base_image
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no staging or stale folder is left behind


def test_a_partly_deleted_folder_never_blocks_the_rebuild(tmp_path, cache_root):
    shutil.copytree(tiny_family_dir(cache_root), tiny_family_dir(tmp_path))
    folder = tiny_family_dir(tmp_path)
    (folder / "model_index.json").unlink()  # the rest stays: a rename onto it would fail
    (folder / "stray.txt").write_text("left by hand")
    rebuilt = ensure_tiny_family(tmp_path)
    assert (rebuilt / "model_index.json").is_file() and not (rebuilt / "stray.txt").exists()


@pytest.fixture
def user_model(tmp_path, cache_root):
    """A copy of the tiny family as a user's own model folder: Stencil never rebuilds it."""
    folder = tmp_path / "my-model"
    shutil.copytree(ensure_tiny_family(cache_root), folder)
    return folder


def _start_error(folder) -> str:
    with pytest.raises(ModelLoadError) as caught:
        Engine.start(str(folder), cache_root=folder.parent)
    return str(caught.value)


def test_a_truncated_user_model_fails_at_start_naming_the_file(user_model):
    truncate(user_model / "text_encoder" / "model.safetensors")
    message = _start_error(user_model)
    assert "text_encoder: model.safetensors is truncated" in message
    assert str(user_model) not in message and "\n" not in message


def test_a_user_model_without_its_tokenizer_fails_at_start_not_at_the_first_request(
    user_model,
):
    for path in (user_model / "tokenizer").iterdir():
        path.unlink()
    message = _start_error(user_model)
    assert "tokenizer" in message and str(user_model) not in message


def test_a_controlnet_damaged_after_start_heals_at_its_next_use(tmp_path, cache_root, engine):
    from PIL import Image

    unit = ControlUnit("canny", Image.new("RGB", (64, 64), "white"))
    expected = engine.generate(GenerationRequest(**REQUEST, controls=(unit,))).images[0]
    shutil.copytree(tiny_family_dir(cache_root), tiny_family_dir(tmp_path))
    fresh = Engine(FAMILIES["tiny"], cache_root=tmp_path)
    # ControlNets load at first use, so this damage is only seen then.
    truncate(tiny_family_dir(tmp_path) / "controlnet-canny" / "diffusion_pytorch_model.safetensors")
    healed = fresh.generate(GenerationRequest(**REQUEST, controls=(unit,))).images[0]
    assert healed.tobytes() == expected.tobytes()


def test_a_controlnet_that_cannot_load_is_named_without_its_path(tmp_path):
    from pipelines.model_check import describe_component_failure

    folder = tmp_path / "hub" / "snapshots" / ("c" * 40)
    folder.mkdir(parents=True)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a":{"dtype":"F32",')
    message = describe_component_failure(str(folder), OSError(f"Error no file named {weights}"))
    assert message == "diffusion_pytorch_model.safetensors has a damaged header"
    unreadable = OSError(f"cannot read {weights}")
    generic = describe_component_failure(str(tmp_path / "nowhere"), unreadable)
    assert str(tmp_path) not in generic and "diffusion_pytorch_model.safetensors" in generic


def test_the_app_refuses_to_start_on_a_broken_model_with_one_line(user_model):
    truncate(user_model / "unet" / "diffusion_pytorch_model.safetensors")
    done = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "--model", str(user_model)],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Stencil cannot start: ") and "unet: " in last
    assert "Traceback" not in done.stderr
