"""Where a LoRA's file is, fetched and checked: the step between a catalogue entry and the model.

A catalogue file lies inside the library folder, an upload under its content hash, a Hub
entry in the Hugging Face cache (downloaded at first use). Every file passes
`pipelines.lora_files` against the bound model's `ModelSignature` before diffusers sees it,
and the resulting `LoraFileReport` is cached by path and the file's identity on disk (inode,
size, modification and change times), so an unchanged file is checked once per model and a
replaced or rewritten one is checked again before it is loaded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InvalidRequestError, LoraRejectedError, ModelLoadError
from .lora_catalogue import LoraCatalogue, LoraEntry, path_inside
from .lora_files import (
    LoraFileReport,
    ModelSignature,
    SafetensorsFile,
    check_lora_keys,
    check_lora_values,
    validate_lora,
)


@dataclass(frozen=True)
class PreparedLora:
    """An entry whose file was found and passed every check: ready for the adapter store."""

    entry: LoraEntry
    path: Path
    report: LoraFileReport

    @property
    def sha256(self) -> str:
        return self.report.sha256


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    # Size and mtime alone miss a same-size file written in place with its mtime set back
    # (os.utime); the change time cannot be set back, and a replaced file has a new inode.
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass(frozen=True)
class _CachedReport:
    identity: tuple[int, ...]
    report: LoraFileReport

    def still_holds_for(self, stat: os.stat_result) -> bool:
        return self.identity == _identity(stat)


class LoraSources:
    """Finds, downloads and checks the files behind catalogue entries; caches the reports."""

    def __init__(
        self,
        catalogue: LoraCatalogue,
        *,
        max_file_bytes: int,
        hub_cache_dir: Path | None = None,
        allow_downloads: bool = True,
    ):
        self.catalogue = catalogue
        self.max_file_bytes = max_file_bytes
        self.hub_cache_dir = hub_cache_dir
        self.allow_downloads = allow_downloads
        # Guarded by _lock: uploads and listings come from UI threads, checks from the engine's.
        self._lock = threading.Lock()
        self._signature: ModelSignature | None = None
        self._reports: dict[Path, _CachedReport] = {}
        self._hub_paths: dict[str, Path] = {}

    def use_signature(self, signature: ModelSignature) -> None:
        """Check against this model from now on; reports made for another model no longer hold."""
        with self._lock:
            self._signature = signature
            self._reports.clear()

    def check_upload(self, file: SafetensorsFile, name: str) -> LoraFileReport | None:
        """Check an upload's values, and its keys against the bound model. Before any model
        is bound only the values can be checked: None (the keys are checked at first
        activation)."""
        with self._lock:
            signature = self._signature
        if signature is None:
            check_lora_values(file, name=name)
            return None
        return check_lora_keys(file, signature, name=name)  # the values first

    def remember(self, entry: LoraEntry, report: LoraFileReport) -> None:
        """Cache a report made elsewhere (an upload checked on arrival) for the entry's file."""
        path = self.locate(entry)
        stat = path.stat()
        with self._lock:
            self._reports[path] = _CachedReport(_identity(stat), report)

    def forget_files(self, paths: Sequence[Path]) -> None:
        """Drop the reports of files that were deleted (a closed session's uploads)."""
        with self._lock:
            for path in paths:
                self._reports.pop(path, None)

    def with_report(self, entry: LoraEntry) -> LoraEntry:
        """The entry with its file report (its pre-flight verdict); fetches nothing. A
        library file not yet checked against the bound model is checked now, so every
        listed entry shows its verdict before anyone uses it."""
        path = self._known_path(entry)
        with self._lock:
            cached = self._reports.get(path) if path is not None else None
            bound = self._signature is not None
        if cached is None and bound and entry.file is not None and entry.hub is None:
            try:
                return replace(entry, report=self.prepare(entry).report)
            except LoraRejectedError:
                return entry  # refused with its reason when chosen, before any GPU time
        return entry if cached is None else replace(entry, report=cached.report)

    def prepare_set(self, entries: Sequence[LoraEntry]) -> list[PreparedLora]:
        """Find and check every entry's file; one file may not appear under two names."""
        prepared = [self.prepare(entry) for entry in entries]
        seen: dict[str, str] = {}
        for item in prepared:
            other = seen.setdefault(item.sha256, item.entry.name)
            if other != item.entry.name:
                raise InvalidRequestError(
                    "loras", [other, item.entry.name], "these names are the same file; choose one"
                )
        return prepared

    def prepare(self, entry: LoraEntry) -> PreparedLora:
        """Find the entry's file and check it (or reuse the check of the unchanged file):
        every file is checked, values included, before the store may load it."""
        path = self.locate(entry)
        try:
            stat = path.stat()
        except OSError as exc:
            raise LoraRejectedError(entry.name, f"its file is missing ({exc.strerror})") from exc
        with self._lock:
            cached = self._reports.get(path)
            signature = self._signature
        if cached is not None and cached.still_holds_for(stat):
            return PreparedLora(entry, path, cached.report)
        report = self._validate(entry, path, signature)
        with self._lock:
            self._reports[path] = _CachedReport(_identity(stat), report)
        return PreparedLora(entry, path, report)

    def locate(self, entry: LoraEntry) -> Path:
        """The entry's file on disk; a Hub entry is downloaded at first use."""
        if entry.upload_sha256 is not None:
            return self.catalogue.upload_path(entry.upload_sha256)
        if entry.hub is not None:
            return self._download(entry)
        return path_inside(self.catalogue.folder, entry.file, entry.name)

    def _known_path(self, entry: LoraEntry) -> Path | None:
        if entry.upload_sha256 is not None:
            return self.catalogue.upload_path(entry.upload_sha256)
        if entry.hub is not None:
            with self._lock:
                return self._hub_paths.get(entry.name)
        if entry.file is not None:
            return (self.catalogue.folder / entry.file).resolve()
        return None

    def _validate(
        self, entry: LoraEntry, path: Path, signature: ModelSignature | None
    ) -> LoraFileReport:
        is_upload = entry.upload_sha256 is not None
        limit = self.catalogue.max_upload_bytes if is_upload else self.max_file_bytes
        report = validate_lora(path, signature, name=entry.name, max_bytes=limit)
        if is_upload and report.sha256 != entry.upload_sha256:
            raise LoraRejectedError(entry.name, "the stored upload no longer matches its hash")
        expected = entry.hub.sha256 if entry.hub is not None else None
        if expected is not None and report.sha256 != expected:
            raise LoraRejectedError(
                entry.name,
                f"the downloaded file's sha256 {report.sha256[:12]}... is not the"
                f" catalogue's {expected[:12]}...",
            )
        return report

    def _download(self, entry: LoraEntry) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        with self._lock:
            known = self._hub_paths.get(entry.name)
        if known is not None and known.is_file():
            return known
        hub = entry.hub
        try:
            path = Path(
                hf_hub_download(
                    hub.repo_id,
                    filename=hub.weight_name,
                    revision=hub.revision,
                    cache_dir=self.hub_cache_dir,
                    local_files_only=not self.allow_downloads,
                )
            )
        except (OSError, ValueError, EntryNotFoundError) as exc:
            where = f"{hub.repo_id}/{hub.weight_name} at {hub.revision[:12]}"
            why = "downloads are disabled and it is not cached" if not self.allow_downloads else exc
            raise ModelLoadError(
                f"LoRA {entry.name!r} could not be fetched ({where}): {why}"
            ) from exc
        with self._lock:
            self._hub_paths[entry.name] = path
        return path
