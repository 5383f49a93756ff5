"""What Stencil asks of the Hugging Face Hub and of its local cache, each question answered once.

- `hub_offline()`: has the user told huggingface_hub to stay off the network?
- `hub_reachable(repo_id)`: does the Hub answer for this repo right now? (False at once
  when offline.)
- `cached_locally` / `cached_revision`: what the local cache already holds, no network used.
- `hub_snapshot`: the cache's folder layout, for building a cache that the real Hub loading
  code then reads offline (tests, benchmarks).

huggingface_hub is imported inside the functions: it reads its settings from the environment
at import time, and importing this module must not fix them early.
"""

from __future__ import annotations

import os
from pathlib import Path

# huggingface_hub's own offline switches and the values it takes for "on".
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
REACHABLE_TIMEOUT_S = 4.0


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network use.

    The environment is read on every call, because huggingface_hub reads it only once, at
    import; its own flag counts too, for a caller that set it in code.
    """
    if any(os.environ.get(name, "").strip().upper() in _TRUE_VALUES for name in OFFLINE_VARIABLES):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(repo_id: str, timeout: float = REACHABLE_TIMEOUT_S) -> bool:
    """Whether the Hub answers for `repo_id` now: one metadata request of at most `timeout`
    seconds; False at once when offline.

    Asked before a download so that a machine without network falls back in seconds, not
    after huggingface_hub's ~20 s of retries per missing file.
    """
    if hub_offline():
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo_id, timeout=timeout)
        return True
    except Exception:  # no network, no such repo, no access: all mean "not now"
        return False


def cached_locally(
    repo_id: str, filename: str = "model_index.json", cache_dir: str | Path | None = None
) -> bool:
    """Whether the Hub cache holds `filename` of `repo_id` at the revision `main` points to."""
    return _cached_file(repo_id, filename, cache_dir) is not None


def cached_revision(source: str, filename: str, cache_dir: str | Path | None = None) -> str | None:
    """The commit of the Hub snapshot that `from_pretrained(source)` read, or None for a
    local folder or an uncached repo. A recipe that names it can fetch the same weights
    after the branch has moved on."""
    if Path(source).exists():
        return None
    found = _cached_file(source, filename, cache_dir)
    if found is None:
        return None
    parts = Path(found).parts
    if "snapshots" not in parts:
        return None
    return parts[parts.index("snapshots") + 1]


def hub_repo_folder(cache: Path, repo_id: str) -> Path:
    """Where a Hugging Face cache keeps the model repo `repo_id`."""
    return Path(cache) / f"models--{repo_id.replace('/', '--')}"


def hub_snapshot(cache: Path, repo_id: str, revision: str) -> Path:
    """The snapshot folder of `repo_id` at `revision` in the cache `cache`, with `main`
    pointing at it, as huggingface_hub leaves a download. Fill the returned folder (it is
    not created) and the real Hub loading code reads those files offline."""
    repo = hub_repo_folder(cache, repo_id)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def _cached_file(repo_id: str, filename: str, cache_dir: str | Path | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except Exception:  # a malformed id is not a Hub repo: nothing cached under it
        return None
    return found if isinstance(found, str) else None
