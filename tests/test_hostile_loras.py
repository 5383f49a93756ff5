"""Hostile LoRA files: refused with their reason, and unable to reach anyone else's image.

Two guarantees, each proved on its own:

1. The values (`pipelines.lora_files.check_lora_values`): NaN, inf, huge or float16-
   overflowing weights, rank 0, non-float tensors, and alphas that are NaN, huge, zero or
   negative are refused at upload (with or without a bound model) and before load, with the
   file's display name, the tensor and the value.
2. Isolation (`pipelines.adapters`): a hostile file that gets past the checks anyway (here
   with the checks switched off on purpose) spoils at most its own request. The next request
   of another session is byte-identical to what it was before: without LoRA the base image,
   with another LoRA that LoRA's image; in normal and hotswap mode, float32 and float16.

float16 runs on this CPU for the tiny model (diffusers warns that it may not, but every op
the tiny pipeline uses has a CPU half kernel), so the half type tested is float16 itself,
the CUDA default where the issue was seen.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_tiny_pipe, render_np
from safetensors.torch import load_file, save

from pipelines import lora_files, lora_sources
from pipelines.engine import Engine
from pipelines.errors import LoraRejectedError
from pipelines.families import FAMILIES
from pipelines.lora_files import check_lora_values, read_lora_file, read_safetensors
from pipelines.loras import LoraLibrary
from pipelines.requests import GenerationRequest, LoraChoice

SHIPPED = Path(__file__).resolve().parent.parent / "loras"
INK_PATH = SHIPPED / "tiny-ink.safetensors"
# peft keys, rank 4 (alpha = rank), UNet attention only: a file hotswap slots can take too.
INK = load_file(INK_PATH)
FIRST = sorted(INK)[0]  # a lora_A (down) weight, shape (4, 64)
FIRST_SHOWN = re.escape(repr(FIRST))
NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------------------------
# Hostile files, built in code from tiny-ink


def with_first_value(value: float) -> bytes:
    """tiny-ink with one number of its first tensor replaced."""
    first = INK[FIRST].clone()
    first.view(-1)[0] = value
    return save({**INK, FIRST: first})


def scaled(factor: float) -> bytes:
    """tiny-ink with every weight multiplied: still finite, and too big for float16."""
    return save({key: tensor * factor for key, tensor in INK.items()})


def retyped(dtype: torch.dtype) -> bytes:
    return save({**INK, FIRST: INK[FIRST].to(dtype)})


def rank_zero() -> bytes:
    """tiny-ink with its first layer's pair at rank 0: (0, 64) down, (64, 0) up."""
    layer = FIRST.removesuffix(".lora_A.weight")
    return save(
        {
            **INK,
            f"{layer}.lora_A.weight": torch.zeros(0, 64),
            f"{layer}.lora_B.weight": torch.zeros(64, 0),
        }
    )


def as_kohya(alpha: float) -> bytes:
    """tiny-ink under kohya names, every layer with this `.alpha` (4 is tiny-ink's scale)."""
    tensors = {}
    for key, tensor in INK.items():
        module, half = key.removeprefix("unet.").rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.lora_{'down' if half.startswith('A') else 'up'}.weight"] = tensor
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    return save(tensors)


def with_metadata_alpha(alpha: float) -> bytes:
    """tiny-ink with diffusers adapter metadata naming this lora_alpha."""
    modules = sorted({key.removeprefix("unet.").rsplit(".lora_", 1)[0] for key in INK})
    config = {"unet.r": 4, "unet.lora_alpha": alpha, "unet.target_modules": modules}
    return save(INK, metadata={"lora_adapter_metadata": json.dumps(config)})


ALPHA_KEY = r"'lora_unet_\w+\.alpha'"
VALUE_RULE = "; alpha must be a finite number above 0"

# kind -> (the file, what its refusal says after "LoRA '<name>' refused: ")
REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "nan-weights": (
        lambda: with_first_value(NAN),
        f"tensor {FIRST_SHOWN} holds nan; every LoRA weight must be a finite number",
    ),
    "inf-weights": (
        lambda: with_first_value(-INF),
        f"tensor {FIRST_SHOWN} holds -inf; every LoRA weight must be a finite number",
    ),
    "huge-weights": (
        lambda: with_first_value(1e30),
        f"tensor {FIRST_SHOWN} holds 1e\\+30; LoRA weights must stay within ±256, beyond"
        " which float16 overflows",
    ),
    "x100-weights": (
        lambda: scaled(100),
        r"tensor 'unet\.\S+\.lora_[AB]\.weight' holds -?\d+(\.\d+)?; LoRA weights must stay"
        r" within ±256, beyond which float16 overflows",
    ),
    # Every weight x10 stays below 256 (tiny-ink's largest is 9.2), but the update grows
    # x100: the tiny model's float16 image is black with it.
    "x10-weights": (
        lambda: scaled(10),
        r"the update of 'unet\.\S+\.lora_B\.weight' and 'unet\.\S+\.lora_A\.weight' \(rank 4,"
        r" scale 1\) can reach \d+(\.\d+)? per weight, above the 64 that float16 carries"
        r" safely",
    ),
    "rank-0": (
        rank_zero,
        r"tensor 'unet\.\S+\.lora_A\.weight' has shape \(0, 64\), with a zero dimension: a"
        r" LoRA needs rank 1 or more",
    ),
    "integer-weights": (
        lambda: retyped(torch.int32),
        f"tensor {FIRST_SHOWN} has dtype I32; LoRA weights are floating point",
    ),
    "nan-alpha": (
        lambda: as_kohya(NAN),
        f"alpha {ALPHA_KEY} is nan: it is not a finite number{VALUE_RULE}",
    ),
    "huge-alpha": (
        lambda: as_kohya(1e30),
        f"alpha {ALPHA_KEY} is 1e\\+30: it is beyond float16's largest value, 65504{VALUE_RULE}",
    ),
    "zero-alpha": (
        lambda: as_kohya(0.0),
        f"alpha {ALPHA_KEY} is 0: diffusers would apply the LoRA at scale 0, i.e. not at"
        f" all{VALUE_RULE}",
    ),
    "negative-alpha": (
        lambda: as_kohya(-4.0),
        f"alpha {ALPHA_KEY} is -4: a negative alpha turns the LoRA's effect around{VALUE_RULE}",
    ),
    "nan-metadata-alpha": (
        lambda: with_metadata_alpha(NAN),
        f"adapter metadata 'unet.lora_alpha' is nan: it is not a finite number{VALUE_RULE}",
    ),
}


def refused(name: str, reason: str):
    return pytest.raises(
        LoraRejectedError, match=f"^LoRA {re.escape(repr(name))} refused: {reason}$"
    )


def never_a_path(error: pytest.ExceptionInfo, *folders: Path) -> None:
    message = str(error.value)
    assert not any(str(folder) in message for folder in folders), message


# --------------------------------------------------------------------------------------
# 1. The values are checked: at upload, before a model is bound and after, and before load


@pytest.fixture(scope="module")
def tiny_pipe(tiny_family):
    return load_tiny_pipe(tiny_family)


def test_the_builders_make_valid_files_so_only_the_hostile_value_is_refused():
    for control in (scaled(1.0), as_kohya(4.0), with_metadata_alpha(4.0), with_first_value(0.5)):
        check_lora_values(read_safetensors(control, name="control"), name="control")
    for path in sorted(SHIPPED.glob("*.safetensors")):
        check_lora_values(read_lora_file(path, name=path.stem), name=path.stem)


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_hostile_upload_is_refused_with_its_reason_before_any_model_is_bound(kind, tmp_path):
    library = LoraLibrary(SHIPPED, "tiny", uploads_dir=tmp_path)
    make, reason = REFUSED[kind]
    with refused(f"{kind}.safetensors", reason) as error:
        library.add_upload(make(), f"{kind}.safetensors", "session-b")
    never_a_path(error, tmp_path, SHIPPED)
    assert library.names("session-b") == library.names()  # nothing added for the session
    assert list(tmp_path.rglob("*.safetensors")) == []  # nor stored


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_hostile_upload_is_refused_with_its_reason_once_a_model_is_bound(
    kind, tmp_path, tiny_pipe
):
    library = LoraLibrary(SHIPPED, "tiny", uploads_dir=tmp_path)
    library.bind(tiny_pipe)
    make, reason = REFUSED[kind]
    with refused(f"{kind}.safetensors", reason) as error:
        library.add_upload(make(), f"../../uploads/{kind}.safetensors", "session-b")
    never_a_path(error, tmp_path, SHIPPED)
    assert list(tmp_path.rglob("*.safetensors")) == []


def test_hostile_library_files_are_refused_before_load_and_change_nothing(tmp_path, tiny_pipe):
    entries = []
    for kind, (make, _) in REFUSED.items():
        (tmp_path / f"{kind}.safetensors").write_bytes(make())
        entries.append({"name": kind, "file": f"{kind}.safetensors", "base": "tiny"})
    (tmp_path / "catalog.json").write_text(json.dumps({"version": 1, "loras": entries}))
    library = LoraLibrary(tmp_path, "tiny")
    for kind, (_, reason) in REFUSED.items():
        with refused(kind, reason) as error:
            library.activate(tiny_pipe, [LoraChoice(kind, 1.0)])
        never_a_path(error, tmp_path)
    assert tiny_pipe.get_list_adapters() == {}  # not one of them reached the model


def test_a_file_rewritten_on_disk_is_checked_again_before_it_is_used(tmp_path, tiny_family):
    # A library file that was checked and loaded, then rewritten in place with one NaN:
    # same size, and its modification time set back. Only a fresh check can tell.
    pipe = load_tiny_pipe(tiny_family)
    path = tmp_path / "ink.safetensors"
    shutil.copy(INK_PATH, path)
    entry = {"name": "ink", "file": "ink.safetensors", "base": "tiny"}
    (tmp_path / "catalog.json").write_text(json.dumps({"version": 1, "loras": [entry]}))
    library = LoraLibrary(tmp_path, "tiny")
    library.activate(pipe, [LoraChoice("ink", 1.0)])

    before = path.stat()
    with path.open("r+b") as handle:
        handle.seek(_data_offset(path, FIRST))
        handle.write(struct.pack("<f", NAN))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    with refused("ink", REFUSED["nan-weights"][1]):  # the NaN written at FIRST's start
        library.activate(pipe, [LoraChoice("ink", 1.0)])


def _data_offset(path: Path, key: str) -> int:
    """Where `key`'s first number lies in the file."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    return 8 + header_len + read_safetensors(data, name="ink").tensors[key].start


# --------------------------------------------------------------------------------------
# 2. Isolation: a hostile file that got past the checks reaches no other request

# Hostile in every mode and dtype: each turns its own request's image black or to noise.
GETS_PAST_THE_CHECKS: dict[str, Callable[[], bytes]] = {
    "nan-weights": lambda: with_first_value(NAN),
    "inf-weights": lambda: with_first_value(INF),
    "huge-weights": lambda: with_first_value(1e30),
    "x100-weights": lambda: scaled(100),  # finite; overflows in float16
    # As metadata: kohya files with NaN alphas look like "layers with different alphas"
    # (NaN != NaN), which hotswap slots refuse before any swap.
    "nan-alpha": lambda: with_metadata_alpha(NAN),
    "huge-alpha": lambda: as_kohya(1e30),
}
HOTSWAP_RANKS = {"normal": None, "hotswap": 8}


def switch_off_value_checks(patch: pytest.MonkeyPatch) -> None:
    """Let a hostile file past the value checks on purpose: what is tested is the second,
    independent guarantee, that it cannot reach another request even then."""

    def unchecked(*args, **kwargs) -> None:
        return None

    patch.setattr(lora_files, "check_lora_values", unchecked)
    patch.setattr(lora_sources, "check_lora_values", unchecked)


def generation_request(*loras: tuple[str, float], session: str) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red fox",
        seed=9,
        steps=3,
        width=64,
        height=64,
        loras=tuple(LoraChoice(name, weight) for name, weight in loras),
        session_id=session,
    )


def image_bytes(engine: Engine, *loras: tuple[str, float], session: str) -> bytes:
    return engine.generate(generation_request(*loras, session=session)).images[0].tobytes()


@pytest.fixture(
    scope="module",
    params=[(mode, dtype) for mode in HOTSWAP_RANKS for dtype in ("float32", "float16")],
    ids=lambda param: "-".join(param),
)
def served(request, cache_root):
    """An engine in one mode and dtype, and session A's images made before anything hostile
    was uploaded: without LoRA, and with tiny-ink."""
    mode, dtype = request.param
    engine = Engine(
        FAMILIES["tiny"],
        cache_root=cache_root,
        lora_folder=SHIPPED,
        lora_hotswap_rank=HOTSWAP_RANKS[mode],
        dtype=dtype,
    )
    base = image_bytes(engine, session="session-a")
    inked = image_bytes(engine, ("tiny-ink", 1.0), session="session-a")
    assert inked != base
    return engine, base, inked


@pytest.mark.parametrize("kind", list(GETS_PAST_THE_CHECKS))
def test_a_hostile_lora_never_reaches_another_sessions_image(served, kind, monkeypatch):
    engine, base, inked = served
    session = f"session-b-{kind}"
    with monkeypatch.context() as patch:
        switch_off_value_checks(patch)
        entry = engine.loras.add_upload(
            GETS_PAST_THE_CHECKS[kind](), f"{kind}.safetensors", session
        )
        hostile = image_bytes(engine, (entry.name, 1.0), session=session)
    assert hostile != base  # it did load, and act on session B's own image

    assert image_bytes(engine, session="session-a") == base
    assert image_bytes(engine, ("tiny-ink", 1.0), session="session-a") == inked
    engine.loras.forget_session(session)


def test_a_hotswap_slot_outside_the_set_adds_exactly_nothing_whatever_it_holds(tiny_family):
    # Slots hold NaN weights and NaN scalings: contents no file could even leave behind.
    pipe = load_tiny_pipe(tiny_family)
    library = LoraLibrary(SHIPPED, "tiny", hotswap_rank=8, hotswap_slots=2)
    library.bind(pipe)
    base = render(pipe)
    inked = render_with(library, pipe, ("tiny-ink", 1.0))
    render_with(library, pipe, ("tiny-watercolor", 1.0), ("tiny-faded", 0.5))  # both slots
    poison_every_slot(pipe)
    assert np.isnan(render(pipe)).any()  # the poison acts while its slots are in the set

    assert np.array_equal(render_with(library, pipe), base)
    assert np.array_equal(render_with(library, pipe, ("tiny-ink", 1.0)), inked)


def render(pipe) -> np.ndarray:
    return render_np(pipe)


def render_with(library: LoraLibrary, pipe, *pairs: tuple[str, float]) -> np.ndarray:
    library.activate(pipe, [LoraChoice(name, weight) for name, weight in pairs])
    return render(pipe)


def poison_every_slot(pipe) -> None:
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for layer in pipe.unet.modules():
            if isinstance(layer, LoraLayer):
                for slot in layer.lora_A:
                    layer.lora_A[slot].weight.fill_(math.nan)
                    layer.lora_B[slot].weight.fill_(math.nan)
                    layer.scaling[slot].fill_(math.nan)
