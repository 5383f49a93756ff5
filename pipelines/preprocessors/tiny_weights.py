"""Offline stand-ins for the pose and depth weights: seeded, random, small on disk.

They load through exactly the code that loads the real weights
(`OpenposeDetector.from_pretrained(folder)`, `pipeline("depth-estimation", model=folder)`),
so tests and offline runs exercise the real path. They detect nothing meaningful.

Folders are versioned (bump the version when the recipe changes), written aside and renamed
into place (`build_verified`), and reused while their manifest of digests still matches.
Same seed, same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..atomic_folder import build_verified

OPENPOSE_VERSION = 1
DEPTH_VERSION = 1
DEFAULT_SEED = 0

# Each openpose tensor is a strided view into a pool of this many random values (see below).
_POOL_SIZE = 1 << 16


def openpose_folder(cache_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    return Path(cache_dir) / f"openpose-standin-v{OPENPOSE_VERSION}-seed{seed}"


def depth_folder(cache_dir: Path, seed: int = DEFAULT_SEED) -> Path:
    return Path(cache_dir) / f"depth-standin-v{DEPTH_VERSION}-seed{seed}"


def build_tiny_openpose(folder: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Write body_pose_model.pth, hand_pose_model.pth and facenet.pth into `folder`.

    controlnet_aux builds its three networks at fixed, full size (209, 147 and 154 MB of
    float32) and loads with strict key and shape checks, so the stand-in cannot be smaller
    networks. Instead each tensor is a view into one pool of seeded values per fan-in:
    torch.save stores a storage once however many views share it, so each file is ~2.4 MB,
    and load_state_dict copies the views into ordinary dense parameters.
    """
    return build_verified(Path(folder), lambda staging: _write_openpose(staging, seed))


def build_tiny_depth(folder: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """Write a tiny Depth Anything model (~0.6 MB) and its image processor into `folder`."""
    return build_verified(Path(folder), lambda staging: _write_depth(staging, seed))


# --------------------------------------------------------------------------- openpose


def _write_openpose(folder: Path, seed: int) -> None:
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    def file_key(name: str) -> str:
        # The body and hand files use the original Caffe layer names; controlnet_aux's
        # util.transfer maps "model0.conv1_1.weight" to "conv1_1.weight" when loading.
        return name.split(".", 1)[1]

    networks = (
        ("body_pose_model.pth", bodypose_model, file_key),
        ("hand_pose_model.pth", handpose_model, file_key),
        ("facenet.pth", FaceNet, lambda name: name),
    )
    for offset, (filename, network, rename) in enumerate(networks):
        with torch.device("meta"):  # shapes only: skips allocating and initialising ~130M floats
            shapes = {name: t.shape for name, t in network().state_dict().items()}
        state = _pooled_random_state(shapes, seed=seed * 1000 + offset)
        torch.save({rename(name): t for name, t in state.items()}, folder / filename)


def _pooled_random_state(shapes: dict[str, torch.Size], *, seed: int) -> dict[str, torch.Tensor]:
    """Tensors of the given shapes, drawn like PyTorch's default init, sharing small storage.

    Values are uniform in +-1/sqrt(fan_in), PyTorch's default for conv weights and biases,
    which keeps activations finite through these deep networks. A weight's rows are
    overlapping windows of its pool, each shifted a fixed stride from the last, from a
    seeded start: correlated but never equal, which is enough for weights that only have to
    load and run.
    """
    generator = torch.Generator().manual_seed(seed)  # local: never reseeds the global RNG
    fan_in = {
        name.rsplit(".", 1)[0]: shape[1:].numel()
        for name, shape in shapes.items()
        if len(shape) > 1
    }
    pools: dict[int, torch.Tensor] = {}
    state = {}
    for name, shape in shapes.items():
        fan = fan_in[name.rsplit(".", 1)[0]]
        if fan not in pools:
            bound = 1.0 / math.sqrt(fan)
            pools[fan] = (torch.rand(_POOL_SIZE, generator=generator) * 2 - 1) * bound
        state[name] = _strided_view(pools[fan], shape, generator)
    return state


def _strided_view(
    pool: torch.Tensor, shape: torch.Size, generator: torch.Generator
) -> torch.Tensor:
    rows, row_size = shape[0], shape[1:].numel()
    row_stride = min(row_size, (_POOL_SIZE - row_size) // max(rows - 1, 1))
    if row_stride < 1:
        raise ValueError(f"a tensor of shape {tuple(shape)} does not fit a pool of {_POOL_SIZE}")
    span = (rows - 1) * row_stride + row_size
    start = int(torch.randint(0, _POOL_SIZE - span + 1, (1,), generator=generator))
    strides = [row_stride] + [shape[i + 1 :].numel() for i in range(1, len(shape))]
    return pool.as_strided(shape, strides, start)


# --------------------------------------------------------------------------- depth


def _write_depth(folder: Path, seed: int) -> None:
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    # initializer_range 0.2, not the usual 0.02: at 0.02 the random head outputs ~1e-7
    # everywhere and the map is flat; at 0.2 it varies with the input.
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=70,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
        initializer_range=0.2,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    # The real model's processor settings, at a 70 px input instead of 518.
    DPTImageProcessor(
        do_resize=True,
        size={"height": 70, "width": 70},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        do_pad=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
