"""Choosing where pose and depth weights come from: real ones when we can, stand-ins when not.

Order: an explicit folder from the environment; the real files already in the local
Hugging Face cache; a download, when online and the Hub answers; else the seeded stand-in,
built on demand. Real weights always come back as a local folder, so loading them never
touches the network (and never waits on huggingface_hub's ~23 s of retries).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import UnknownNameError
from ..hub import hub_reachable
from . import depth, pose
from .base import WeightsSource

logger = logging.getLogger(__name__)

WEIGHTED_KINDS = ("pose", "depth")

# A folder with the real files, for machines that keep weights outside the HF cache.
ENV_OVERRIDES = {"pose": "STENCIL_POSE_WEIGHTS", "depth": "STENCIL_DEPTH_WEIGHTS"}

_REPOS = {"pose": pose.REPO_ID, "depth": depth.REPO_ID}
# What must be present for a cached depth snapshot to be usable.
_DEPTH_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def resolve_weights(
    kind: str,
    *,
    offline: bool,
    cache_dir: Path,
    hub_cache: Path | None = None,
) -> WeightsSource:
    """Real weights for `kind` ("pose" or "depth") if available, else the stand-in.

    `cache_dir` is where stand-ins are built; `hub_cache` the Hugging Face cache to look in
    (huggingface_hub's default when None).
    """
    if kind not in WEIGHTED_KINDS:
        raise UnknownNameError("weighted preprocessor", kind, WEIGHTED_KINDS)
    override = os.environ.get(ENV_OVERRIDES[kind], "").strip()
    if override:
        return WeightsSource(override, "real", f"from {ENV_OVERRIDES[kind]}")
    repo = _REPOS[kind]
    cached = _cached_folder(kind, hub_cache)
    if cached is not None:
        return WeightsSource(str(cached), "real", f"{repo} from the local Hugging Face cache")
    if offline:
        reason = "offline and not in the local Hugging Face cache"
    elif not hub_reachable(repo):
        reason = "the Hugging Face Hub cannot be reached"
    else:
        try:
            folder = _download(kind, hub_cache)
            return WeightsSource(str(folder), "real", f"{repo} downloaded")
        except Exception as exc:  # any failed download leaves us where offline would
            reason = f"download failed ({type(exc).__name__}: {exc})"
    folder = _build_standin(kind, Path(cache_dir))
    note = f"stand-in weights: {repo} unavailable ({reason})"
    logger.warning("%s preprocessor uses %s", kind, note)
    return WeightsSource(str(folder), "stand-in", note)


def _cached_folder(kind: str, hub_cache: Path | None) -> Path | None:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    repo = _REPOS[kind]
    if kind == "pose":
        paths = [
            try_to_load_from_cache(repo, name, cache_dir=hub_cache) for name in pose.WEIGHT_FILES
        ]
        if not all(isinstance(p, str) for p in paths):
            return None
        folders = {Path(p).parent for p in paths}
        # from_pretrained takes one folder: files cached at different revisions do not do.
        return folders.pop() if len(folders) == 1 else None
    try:
        folder = Path(snapshot_download(repo, cache_dir=hub_cache, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and kin: simply not cached
        return None
    return folder if all((folder / name).is_file() for name in _DEPTH_FILES) else None


def _download(kind: str, hub_cache: Path | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    repo = _REPOS[kind]
    if kind == "pose":
        paths = [hf_hub_download(repo, name, cache_dir=hub_cache) for name in pose.WEIGHT_FILES]
        return Path(paths[0]).parent
    return Path(snapshot_download(repo, cache_dir=hub_cache, allow_patterns=list(_DEPTH_FILES)))


def _build_standin(kind: str, cache_dir: Path) -> Path:
    from . import tiny_weights  # imports torch: only when a stand-in is really built

    if kind == "pose":
        return tiny_weights.build_tiny_openpose(tiny_weights.openpose_folder(cache_dir))
    return tiny_weights.build_tiny_depth(tiny_weights.depth_folder(cache_dir))
