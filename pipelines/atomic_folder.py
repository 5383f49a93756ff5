"""Write a folder so that readers only ever see it whole: built aside, then renamed into place.

Model folders (the tiny family, the stand-in detector weights, the benchmarks' random SD 1.5)
are built on demand by whichever process needs them first, possibly several at once. Each
builder writes into its own staging folder next to the target and renames it into place
with one `os.replace`, so a crash leaves no half-written model that a later run would load,
and a builder that loses the race simply drops its copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
STALE_PREFIX = ".stale-"
MANIFEST_NAME = "stencil-manifest.json"


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
        _set_aside(target)
    try:
        os.replace(staging, target)
    except OSError:
        # A concurrent builder renamed its folder in between our check and our rename.
        if not is_complete(target):
            raise


def _set_aside(target: Path) -> None:
    """Move a stale or damaged folder out of the way, then delete it.

    os.replace cannot overwrite a non-empty folder, and deleting in place can fail half way
    (a file held open, a concurrent builder): renaming first is one atomic step, so whatever
    is left of the old folder never blocks the new one.
    """
    aside = Path(tempfile.mkdtemp(prefix=f"{STALE_PREFIX}{target.name}-", dir=target.parent))
    with contextlib.suppress(FileNotFoundError):  # a concurrent builder moved it already
        os.replace(target, aside / target.name)
    shutil.rmtree(aside, ignore_errors=True)


def prune_superseded(current: Path, family_prefix: str) -> list[str]:
    """Remove the folders beside `current` that an earlier build of the same family left
    (`<family_prefix><other version>`): a retrained or rebuilt family lands in a new folder,
    and the old one would otherwise stay in the cache for good. Staging and set-aside
    folders (a concurrent builder's) are not touched; each removal is a set-aside first, so
    a process still reading an old folder never sees it half gone. Returns the names removed."""
    current = Path(current)
    removed = []
    for sibling in sorted(current.parent.glob(f"{family_prefix}*")):
        if sibling.name == current.name or not sibling.is_dir() or sibling.is_symlink():
            continue
        _set_aside(sibling)
        removed.append(sibling.name)
    if removed:
        log.info("removed superseded model folders: %s", ", ".join(removed))
    return removed


# ---- folders that verify themselves -------------------------------------------------------


def build_verified(target: Path, write: Callable[[Path], None]) -> Path:
    """`build_atomically`, with a manifest of every file's sha256 written last and checked
    on every call: a folder with a missing, truncated or altered file is rebuilt."""

    def write_with_manifest(staging: Path) -> None:
        write(staging)
        write_manifest(staging)

    def intact(folder: Path) -> bool:
        if not folder.exists():
            return False
        problem = manifest_problem(folder)
        if problem is not None:
            log.warning("%s is damaged (%s); rebuilding it", folder, problem)
        return problem is None

    return build_atomically(target, write_with_manifest, is_complete=intact)


def write_manifest(folder: Path) -> None:
    digests = {name: _sha256(folder / name) for name in _files(folder)}
    (folder / MANIFEST_NAME).write_text(json.dumps(digests, indent=1, sort_keys=True))


def manifest_problem(folder: Path) -> str | None:
    """What is wrong with `folder` against its manifest, in words, or None if intact."""
    try:
        recorded = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    if not isinstance(recorded, dict):
        return "no readable manifest"
    present = set(_files(folder))
    for name, digest in sorted(recorded.items()):
        if name not in present:
            return f"{name} is missing"
        if _sha256(folder / name) != digest:
            return f"{name} differs from what was built"
    extra = sorted(present - set(recorded))
    return f"{extra[0]} was not part of the build" if extra else None


def _files(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != MANIFEST_NAME
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
