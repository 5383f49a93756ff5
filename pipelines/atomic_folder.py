"""Write a folder so that readers only ever see it whole: built aside, then renamed into place.

Model folders (the tiny family, the stand-in detector weights, the benchmarks' random SD 1.5)
are built on demand by whichever process needs them first, possibly several at once. Each
builder writes into its own staging folder next to the target and renames it into place
with one `os.replace`, so a crash leaves no half-written model that a later run would load,
and a builder that loses the race simply drops its copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

STAGING_PREFIX = ".staging-"


def build_atomically(
    target: Path,
    write: Callable[[Path], None],
    *,
    is_complete: Callable[[Path], bool] = Path.is_dir,
) -> Path:
    """Return `target`, first calling `write(staging)` and moving the result there if
    `is_complete(target)` says it is not built yet.

    A target that exists but is not complete (an older recipe, a folder left by hand) is
    replaced. If another builder completes the target meanwhile, its folder is kept and
    ours is dropped: builders of one recipe write the same bytes. If `write` raises, the
    staging folder is removed and the target is left as it was.
    """
    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent))
    try:
        write(staging)
        _move_into_place(staging, target, is_complete)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the move succeeded
    return target


def _move_into_place(staging: Path, target: Path, is_complete: Callable[[Path], bool]) -> None:
    if is_complete(target):
        return  # another builder finished first
    if target.exists():
        # Stale: os.replace cannot overwrite a non-empty folder. Errors are ignored because
        # a concurrent builder may be removing or replacing it at the same moment.
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        # A concurrent builder renamed its folder in between our check and our rename.
        if not is_complete(target):
            raise
