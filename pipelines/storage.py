"""Folders Stencil owns on disk, each with a lifetime and a byte budget.

Stencil writes results (PNGs) and keeps uploaded LoRAs; nothing it writes may outlive its
use without bound. A `BoundedFolder` owns one folder, reused across starts: every write
prunes it, oldest first, of files past their age and of files past the byte budget. A file
younger than `min_age_s` is never pruned, because the request that wrote it may not have
handed it over yet (Gradio copies a result into its own cache after the handler returns);
so a burst can exceed the byte budget by what it wrote in the last `min_age_s` seconds.

The folder is listed from disk at each prune (a few thousand entries take milliseconds),
not tracked in memory, so two processes sharing a cache folder see each other's files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size: int
    modified: float


class BoundedFolder:
    """One folder of files, pruned by age and by total size; safe to use from any thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        min_age_s: float = 60,
        clock: Callable[[], float] = time.time,
    ):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.min_age_s = min(min_age_s, max_age_s)
        self._clock = clock
        self._lock = threading.Lock()
        self.path.mkdir(parents=True, exist_ok=True)
        self.prune()  # what an earlier run left past its lifetime goes now

    def write(self, name: str, data: bytes) -> Path:
        """Write `data` as `name` (whole or not at all), then prune. Rewriting the same
        name (content-addressed results) refreshes its age."""
        target = self.path / name
        if target.parent != self.path:
            raise ValueError(f"{name!r} is not a plain file name")
        fd, staging = tempfile.mkstemp(dir=self.path, suffix=PART_SUFFIX)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(staging, target)
        self.prune()
        return target

    def files(self) -> list[StoredFile]:
        """The folder's files, oldest first."""
        found = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        stat = entry.stat(follow_symlinks=False)
                        found.append(StoredFile(Path(entry.path), stat.st_size, stat.st_mtime))
                except FileNotFoundError:  # pruned by another process meanwhile
                    continue
        return sorted(found, key=lambda f: f.modified)

    def total_bytes(self) -> int:
        return sum(f.size for f in self.files())

    def prune(self) -> list[Path]:
        """Delete files past `max_age_s`, then the oldest while the folder holds more than
        `max_bytes`, never one younger than `min_age_s`. Returns what was deleted."""
        with self._lock:
            now = self._clock()
            files = self.files()
            total = sum(f.size for f in files)
            deleted = []
            for stored in files:  # oldest first
                age = now - stored.modified
                if age < self.min_age_s:
                    break  # every later file is younger still
                if age > self.max_age_s or total > self.max_bytes:
                    if _remove(stored.path):
                        deleted.append(stored.path)
                    total -= stored.size
        if deleted:
            log.debug("pruned %d files from %s", len(deleted), self.path)
        return deleted


def prune_older_than(
    folder: Path,
    max_age_s: float,
    *,
    keep: Collection[str] = (),
    now: float | None = None,
) -> int:
    """Delete files under `folder` older than `max_age_s` (but none in `keep`, absolute
    paths), then the folders left empty that are as old. Returns the files deleted.

    For a folder whose files no one tracks fully: Gradio's cache, where Gradio expires only
    the files it tracks (not those of a killed run, nor its copies of a session's results,
    see `GradioCacheSweeper`), and the stored uploads of a run that ended.
    """
    folder = Path(folder).absolute()
    if not folder.is_dir():
        return 0
    now = time.time() if now is None else now
    keep = {os.path.abspath(path) for path in keep}
    deleted = 0
    # Old as well as empty: a folder just made is about to receive its file. Its age is
    # read before its files go (deleting one refreshes the folder's time).
    old_folders = set()
    for root, dirs, names in os.walk(folder, topdown=False):
        if _older_than(root, max_age_s, now):
            old_folders.add(root)
        for name in names:
            path = os.path.join(root, name)
            if path not in keep and _older_than(path, max_age_s, now) and _remove(Path(path)):
                deleted += 1
        for name in dirs:
            path = os.path.join(root, name)
            if path in old_folders:
                with contextlib.suppress(OSError):  # only an empty folder goes
                    os.rmdir(path)
    return deleted


class GradioCacheSweeper:
    """Sweeps Gradio's cache folder, when Stencil owns it, of files past their age.

    Gradio's `delete_cache` deletes only the files its components track. A component that
    an event updates (`gr.update`, `gr.skip()` from a generator) is re-created for that
    session, and the files the copy puts in the cache (the results, for the galleries) are
    tracked by nothing that `delete_cache` sweeps (Gradio 6.31; measured by bench/soak.py).
    `keep()` names the files Gradio must keep (the page's examples).
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_age_s: float,
        every_s: float,
        keep: Callable[[], Collection[str]] = tuple,
    ):
        self.folder = Path(folder)
        self.max_age_s = max_age_s
        self.every_s = every_s
        self.keep = keep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradio-cache-sweeper", daemon=True)

    def start(self) -> GradioCacheSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def sweep(self) -> int:
        return prune_older_than(self.folder, self.max_age_s, keep=self.keep())

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
            except Exception:  # a failed sweep must not end the sweeping
                log.exception("sweeping %s failed", self.folder)


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (0 if it does not exist)."""
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                total += (Path(root) / name).lstat().st_size
            except FileNotFoundError:
                continue
    return total


def _older_than(path: str, max_age_s: float, now: float) -> bool:
    try:
        return now - os.lstat(path).st_mtime > max_age_s
    except FileNotFoundError:
        return False


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True
