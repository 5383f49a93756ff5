"""The LoRA catalogue: the names a user can choose, from `catalog.json` and session uploads.

Users only ever pass names. A name is looked up in the catalogue (or in the caller's own
session uploads); it never becomes a path. Catalogue files are resolved inside the library
folder and uploads are stored under their content hash. A LoRA a user fetched from the Hub
by id (`pipelines.lora_hub`) is stored as an upload of that session, remembering its source.

The catalogue knows no model: it imports neither torch nor diffusers, and whether a file
fits the loaded model is `pipelines.lora_sources`' question. The UI lists and uploads from
its own threads, so the upload tables have a lock of their own.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import InvalidRequestError, LoraRejectedError, UnknownNameError
from .lora_files import LoraFileReport, MiB, SafetensorsFile, read_safetensors
from .lora_text import NameAndWeight, check_unique, split_lora_string, split_prompt_lora_tags
from .requests import LoraChoice
from .settings import cache_dir
from .storage import prune_older_than

CATALOGUE_FILE = "catalog.json"
HUB_LICENCE = "fetched from the Hub by the user: see the repository's licence"
FAMILY_LABELS = {
    "sd15": "SD 1.5",
    "sdxl": "SDXL",
    "tiny": "the tiny test model",
    "tiny-xl": "the tiny SDXL test model",
}
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,79}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UPLOAD_PREFIX = "upload-"
HUB_PREFIX = "hub-"  # a session's LoRA fetched from the Hub by id
# Names that only their session can use; no catalogue entry may take one.
SESSION_PREFIXES = (UPLOAD_PREFIX, HUB_PREFIX)
# A stored upload belongs to the sessions that uploaded it and goes when the last one
# closes. A file this old was left by a run that ended without closing its sessions.
STALE_UPLOAD_S = 86400


class CatalogueError(ValueError):
    """The catalogue file is malformed: an operator error, reported at start-up."""


@dataclass(frozen=True)
class HubSource:
    """A LoRA fetched from the Hugging Face Hub at first use."""

    repo_id: str
    weight_name: str
    revision: str
    sha256: str | None = None  # the file's published digest, checked after download

    @property
    def pinned(self) -> bool:
        return COMMIT_RE.fullmatch(self.revision) is not None


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA a user can choose by `name`."""

    name: str
    display_name: str
    base: str
    file: str | None = None  # relative to the library folder
    hub: HubSource | None = None
    trigger_words: tuple[str, ...] = ()
    default_weight: float = 1.0
    licence: str = "unknown"
    description: str = ""
    preview: str | None = None  # relative to the library folder
    upload_sha256: str | None = field(default=None, repr=False)
    # The file name it was uploaded as, which shapes `name`: another server (a Ray
    # replica) given the same bytes, file name and session makes the same entry.
    upload_filename: str | None = field(default=None, repr=False)
    session_id: str | None = field(default=None, repr=False)
    report: LoraFileReport | None = field(default=None, compare=False)

    @property
    def source_kind(self) -> str:
        if self.hub is not None:  # a catalogue Hub entry, or a session's fetched by id
            return "hub"
        return "upload" if self.upload_sha256 is not None else "file"

    def to_public_dict(self) -> dict[str, Any]:
        """What the API and UI may show: never a path or a session id."""
        public: dict[str, Any] = {
            "name": self.name,
            "display_name": self.display_name,
            "base": self.base,
            "source": self.source_kind,
            "trigger_words": list(self.trigger_words),
            "default_weight": self.default_weight,
            "licence": self.licence,
            "description": self.description,
            "has_preview": self.preview is not None,
        }
        if self.hub is not None:
            public.update(
                repo_id=self.hub.repo_id,
                weight_name=self.hub.weight_name,
                revision=self.hub.revision,
                pinned=self.hub.pinned,
            )
        if self.report is not None:
            public.update(self.report.describe())
        return public

    def to_recipe(self, weight: float, report: LoraFileReport | None) -> dict[str, Any]:
        """What a recipe records of this entry applied at `weight` (never an absolute path)."""
        applied: dict[str, Any] = {
            "name": self.name,
            "display_name": self.display_name,
            "weight": weight,
            "active": weight != 0,
            "source": self.source_kind,
            "sha256": report.sha256 if report is not None else None,
        }
        if report is not None and report.skipped_layers:  # layers this model lacks
            applied["skipped_layers"] = list(report.skipped_layers)
        if self.hub is not None:
            applied.update(
                repo_id=self.hub.repo_id,
                weight_name=self.hub.weight_name,
                revision=self.hub.revision,
            )
        elif self.file is not None and self.source_kind == "file":
            applied["file"] = self.file  # relative to the library folder
        return applied


@dataclass(frozen=True)
class CheckedUpload:
    """Uploaded bytes that passed the file checks, not yet choosable by anyone."""

    session_id: str
    filename: str
    display_name: str
    file: SafetensorsFile = field(repr=False)
    hub: HubSource | None = None  # where bytes fetched from the Hub by id came from

    @property
    def entry_name(self) -> str:
        """The name its session chooses it by; the file name only shapes it."""
        if self.hub is not None:
            return hub_upload_name(self.session_id, self.hub.repo_id, self.hub.weight_name)
        return f"{UPLOAD_PREFIX}{_session_tag(self.session_id)}-{_name_stem(self.filename)}"


class LoraCatalogue:
    """The entries of `catalog.json` for one base family, and each session's uploads."""

    def __init__(
        self,
        folder: Path,
        base_tag: str,
        *,
        max_upload_bytes: int,
        max_uploads_per_session: int = 8,
        max_stored_bytes: int | None = None,
        uploads_dir: Path | None = None,
    ):
        self.folder = Path(folder).resolve()
        self.base_tag = base_tag
        self.max_upload_bytes = max_upload_bytes
        self.max_uploads_per_session = max_uploads_per_session
        # All sessions' stored uploads together (STENCIL_LORA_UPLOADS_MAX_MB); None: no cap.
        self.max_stored_bytes = max_stored_bytes
        self._listed = MappingProxyType(load_catalogue(self.folder))  # read-only after start
        # Guarded by _lock: the UI lists and uploads from its own threads.
        self._lock = threading.Lock()
        self._uploads: dict[str, dict[str, LoraEntry]] = {}
        self._stored_sizes: dict[str, int] = {}  # sha256 -> bytes, of files sessions hold
        # One folder under Stencil's cache, reused by every start.
        self._uploads_dir = Path(uploads_dir) if uploads_dir else cache_dir() / "lora-uploads"
        prune_older_than(self._uploads_dir, STALE_UPLOAD_S)

    # ---- lookups

    def all_entries(self) -> tuple[LoraEntry, ...]:
        """Every entry of the catalogue file, in file order, whatever its base."""
        return tuple(self._listed.values())

    def entries(self, session_id: str | None = None) -> list[LoraEntry]:
        """Catalogue entries usable with this base, then the session's own uploads."""
        listed = sorted(
            (e for e in self._listed.values() if e.base == self.base_tag), key=lambda e: e.name
        )
        if session_id is not None:
            with self._lock:
                uploads = list(self._uploads.get(session_id, {}).values())
            listed += sorted(uploads, key=lambda e: e.name)
        return listed

    def names(self, session_id: str | None = None) -> list[str]:
        return [entry.name for entry in self.entries(session_id)]

    def resolve(self, name: str, *, session_id: str | None = None) -> LoraEntry:
        """The entry called `name`; unknown names list the known ones, other bases refuse."""
        entry = self._listed.get(name) if isinstance(name, str) else None
        if entry is None and isinstance(name, str) and session_id is not None:
            with self._lock:
                entry = self._uploads.get(session_id, {}).get(name)
        if entry is None:
            raise UnknownNameError("LoRA", name, self.names(session_id))
        if entry.base != self.base_tag:
            raise LoraRejectedError(
                name,
                f"it is made for {_family(entry.base)}; the loaded model is"
                f" {_family(self.base_tag)}",
            )
        return entry

    def preview_path(self, name: str) -> Path | None:
        entry = self.resolve(name)
        return None if entry.preview is None else path_inside(self.folder, entry.preview, name)

    def parse_lora_string(
        self, text: str | None, *, session_id: str | None = None
    ) -> tuple[LoraChoice, ...]:
        """`"name:0.8, other"` -> choices; a name without weight takes its default weight."""
        return self._choices(split_lora_string(text), session_id=session_id)

    def extract_prompt_lora_tags(
        self, prompt: str, *, session_id: str | None = None
    ) -> tuple[str, tuple[LoraChoice, ...]]:
        """A1111-style `<lora:name:0.8>` tags -> (prompt without them, choices)."""
        cleaned, pairs = split_prompt_lora_tags(prompt)
        return cleaned, self._choices(pairs, session_id=session_id)

    def _choices(
        self, pairs: Sequence[NameAndWeight], *, session_id: str | None
    ) -> tuple[LoraChoice, ...]:
        choices = []
        for name, weight in pairs:
            entry = self.resolve(name, session_id=session_id)  # unknown names fail here
            choices.append(LoraChoice(name, entry.default_weight if weight is None else weight))
        check_unique(choices)
        return tuple(choices)

    # ---- uploads

    def check_upload(
        self, data: bytes, filename: str, session_id: str, *, hub: HubSource | None = None
    ) -> CheckedUpload:
        """Check the upload's bytes (size, safetensors layout); the model is not consulted.
        `hub`: the bytes were fetched from there (`pipelines.lora_hub`), not uploaded."""
        _check_session(session_id)
        display = _display_name(filename) if hub is None else _hub_display_name(hub)
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidRequestError("lora upload", type(data).__name__, "must be file bytes")
        if len(data) > self.max_upload_bytes:
            raise LoraRejectedError(
                display,
                f"the upload is {len(data) / MiB:.1f} MB, above the"
                f" {self.max_upload_bytes / MiB:.0f} MB limit",
            )
        file = read_safetensors(bytes(data), name=display, max_bytes=self.max_upload_bytes)
        return CheckedUpload(session_id, filename, display, file, hub=hub)

    def check_room_for(self, session_id: str, hub: HubSource, size: int) -> None:
        """Refuse now what `add_upload` would refuse later (the session's count, the stored
        bytes' budget): asked before a Hub download, so a refused file is never fetched."""
        _check_session(session_id)
        name = hub_upload_name(session_id, hub.repo_id, hub.weight_name)
        display_name = _hub_display_name(hub)
        with self._lock:
            self._check_session_room(session_id, name, display_name)
            self._check_room(hub.sha256, size, display_name)  # the Hub's digest is the hash

    def add_upload(self, upload: CheckedUpload) -> LoraEntry:
        """Store a checked upload under its content hash and make it choosable by its session.

        The user's file name only shapes the entry's name and display name.
        """
        session_id, name = upload.session_id, upload.entry_name
        sha256 = upload.file.sha256
        entry = LoraEntry(
            name=name,
            display_name=upload.display_name,
            base=self.base_tag,
            hub=upload.hub,
            licence="uploaded by the user" if upload.hub is None else HUB_LICENCE,
            upload_sha256=sha256,
            upload_filename=upload.filename,
            session_id=session_id,
        )
        # Stored under the lock, so a closing session cannot delete the file between our
        # write and our claim on it (writing a LoRA takes a fraction of a second).
        with self._lock:
            self._check_session_room(session_id, name, upload.display_name)
            self._check_room(sha256, len(upload.file.data), upload.display_name)
            self._store_upload(upload.file.data, sha256)
            self._stored_sizes[sha256] = len(upload.file.data)
            self._uploads.setdefault(session_id, {})[name] = entry
        return entry

    def forget_session(self, session_id: str) -> list[Path]:
        """Drop a session's uploads from lookups, and delete the stored files no other
        session holds. Returns the deleted files."""
        with self._lock:
            self._uploads.pop(session_id, None)
            held = {e.upload_sha256 for s in self._uploads.values() for e in s.values()}
            deleted = []
            for sha256 in [h for h in self._stored_sizes if h not in held]:
                del self._stored_sizes[sha256]
                path = self.upload_path(sha256)
                path.unlink(missing_ok=True)
                deleted.append(path)
        return deleted

    def stored_bytes(self) -> int:
        """Bytes of the uploaded files that sessions hold now."""
        with self._lock:
            return sum(self._stored_sizes.values())

    def _check_session_room(self, session_id: str, name: str, display_name: str) -> None:
        """Refuse a new name past the session's count (the same name replaces its entry);
        the caller holds the lock."""
        session = self._uploads.get(session_id, {})
        if name not in session and len(session) >= self.max_uploads_per_session:
            raise InvalidRequestError(
                "lora upload",
                display_name,
                f"a session may hold {self.max_uploads_per_session} uploaded LoRAs",
            )

    def _check_room(self, sha256: str | None, size: int, display_name: str) -> None:
        """Refuse an upload that would take the stored uploads past their budget."""
        if self.max_stored_bytes is None or sha256 in self._stored_sizes:
            return  # already stored for another session: it costs nothing more
        if sum(self._stored_sizes.values()) + size > self.max_stored_bytes:
            raise LoraRejectedError(
                display_name,
                f"the server holds {self.max_stored_bytes / MiB:.0f} MB of uploaded LoRAs,"
                " its limit; try again when other sessions have closed",
            )

    def upload_path(self, sha256: str) -> Path:
        """Where the upload with this content hash is stored."""
        return self._uploads_folder() / f"{sha256}.safetensors"

    def _store_upload(self, data: bytes, sha256: str) -> None:
        """Write the file under its hash unless it is there; the caller holds the lock."""
        path = self.upload_path(sha256)
        if not path.is_file():
            # Written aside, then renamed: a reader never sees half a file under the hash.
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)

    def scratch_folder(self) -> Path:
        """Where a file on its way in (a Hub download) waits to be read: on the uploads'
        disk, and pruned with them at start when a killed run left it behind."""
        return self._uploads_folder()

    def _uploads_folder(self) -> Path:
        self._uploads_dir.mkdir(parents=True, exist_ok=True)
        return self._uploads_dir


# --------------------------------------------------------------------------------------
# The catalogue file


def load_catalogue(folder: Path) -> dict[str, LoraEntry]:
    """Read `catalog.json` in `folder`; a missing file is an empty catalogue."""
    path = Path(folder) / CATALOGUE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CatalogueError(f"{path}: cannot be read as JSON ({exc})") from exc
    items = raw.get("loras") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise CatalogueError(f"{path}: expected an object with a 'loras' list")
    catalogue: dict[str, LoraEntry] = {}
    for index, item in enumerate(items):
        entry = _parse_entry(Path(folder), item, f"{path.name} entry {index}")
        if entry.name in catalogue:
            raise CatalogueError(f"{path.name}: the name {entry.name!r} appears twice")
        catalogue[entry.name] = entry
    return catalogue


def path_inside(folder: Path, relative: str | None, name: str) -> Path:
    """`folder/relative`, refusing anything that resolves outside the folder."""
    root = Path(folder).resolve()
    if relative is None or Path(relative).is_absolute():
        raise LoraRejectedError(name, "its file must be given relative to the library folder")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise LoraRejectedError(name, "its file lies outside the library folder")
    return path


# A LoRA's thumbnail in the picker: a still picture, decoded with the image limits.
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_ENTRY_FIELDS = {
    "name", "display_name", "file", "hub", "base", "trigger_words", "default_weight",
    "licence", "description", "preview",
}  # fmt: skip
_HUB_FIELDS = {"repo_id", "weight_name", "revision", "unpinned", "sha256"}


def _parse_entry(folder: Path, item: Any, where: str) -> LoraEntry:
    if not isinstance(item, dict):
        raise CatalogueError(f"{where}: must be an object")
    unknown = set(item) - _ENTRY_FIELDS
    if unknown:
        raise CatalogueError(f"{where}: unknown fields {sorted(unknown)}")
    name = _parse_name(item.get("name"), where)
    where = f"{where} ({name})"
    if ("file" in item) == ("hub" in item):
        raise CatalogueError(f"{where}: give exactly one of 'file' or 'hub'")
    file, preview = item.get("file"), item.get("preview")
    if file is not None:
        _check_relative(folder, file, f"{where}: file")
    if preview is not None:
        _check_relative(folder, preview, f"{where}: preview")
        if Path(str(preview)).suffix.lower() not in PREVIEW_SUFFIXES:
            raise CatalogueError(f"{where}: preview must be one of {list(PREVIEW_SUFFIXES)}")
    weight = _parse_weight(item.get("default_weight", 1.0), where)
    triggers = _parse_trigger_words(item.get("trigger_words", []), where)
    base = _parse_base(item.get("base"), where)
    return LoraEntry(
        name=name,
        display_name=str(item.get("display_name") or name),
        base=base,
        file=file,
        hub=_parse_hub(item.get("hub"), where),
        trigger_words=triggers,
        default_weight=weight,
        licence=str(item.get("licence", "unknown")),
        description=str(item.get("description", "")),
        preview=preview,
    )


def _parse_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise CatalogueError(
            f"{where}: name {name!r} must be lowercase letters, digits, '-', '_' or '.'"
        )
    for prefix in SESSION_PREFIXES:
        if name.startswith(prefix):
            raise CatalogueError(
                f"{where} ({name}): names starting with {prefix!r} are for a session's"
                " uploads and Hub LoRAs"
            )
    return name


def _parse_weight(weight: Any, where: str) -> float:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
    ):
        raise CatalogueError(f"{where}: default_weight must be a number")
    return float(weight)


def _parse_trigger_words(triggers: Any, where: str) -> tuple[str, ...]:
    if not isinstance(triggers, list) or not all(isinstance(t, str) for t in triggers):
        raise CatalogueError(f"{where}: trigger_words must be a list of text")
    return tuple(triggers)


def _parse_base(base: Any, where: str) -> str:
    if not isinstance(base, str) or not base:
        raise CatalogueError(f"{where}: base must name a model family, e.g. 'sd15'")
    return base


def _parse_hub(hub: Any, where: str) -> HubSource | None:
    if hub is None:
        return None
    if not isinstance(hub, dict) or set(hub) - _HUB_FIELDS:
        raise CatalogueError(f"{where}: hub must be an object with {sorted(_HUB_FIELDS)}")
    values = [hub.get(key) for key in ("repo_id", "weight_name", "revision")]
    if not all(isinstance(v, str) and v for v in values):
        raise CatalogueError(f"{where}: hub needs repo_id, weight_name and revision")
    digest = hub.get("sha256")
    if digest is not None and (not isinstance(digest, str) or not SHA256_RE.fullmatch(digest)):
        raise CatalogueError(f"{where}: hub sha256 must be 64 lowercase hex digits")
    source = HubSource(*values, sha256=digest)
    if ".." in source.weight_name or source.weight_name.startswith("/"):
        raise CatalogueError(f"{where}: hub weight_name must be a path inside the repository")
    if not source.pinned and hub.get("unpinned") is not True:
        raise CatalogueError(
            f"{where}: revision {source.revision!r} is not a commit sha; pin it, or set"
            ' "unpinned": true to accept whatever the branch holds'
        )
    return source


def _check_relative(folder: Path, relative: Any, where: str) -> None:
    if not isinstance(relative, str) or not relative:
        raise CatalogueError(f"{where} must be a path relative to the library folder")
    try:
        path_inside(folder, relative, where)
    except LoraRejectedError as exc:
        raise CatalogueError(f"{where}: {exc.reason}") from exc


# --------------------------------------------------------------------------------------
# Small helpers


def _family(tag: str) -> str:
    return FAMILY_LABELS.get(tag, tag)


def _check_session(session_id: Any) -> None:
    if not isinstance(session_id, str) or not session_id:
        raise InvalidRequestError("session_id", session_id, "an upload needs a session")


def _session_tag(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:8]


def hub_upload_name(session_id: str, repo_id: str, weight_name: str) -> str:
    """`hub-<8 hex>-<repo name>`: the hex differs per session and per file, so two repos
    of one name, or two files of one repo, never replace each other in a session."""
    source = "\n".join((session_id, repo_id, weight_name)).encode("utf-8")
    tag = hashlib.sha256(source).hexdigest()[:8]
    return f"{HUB_PREFIX}{tag}-{_slug(repo_id.rsplit('/', 1)[-1])}"


def _hub_display_name(hub: HubSource) -> str:
    # Both parts passed lora_hub's strict patterns: plain ASCII, nothing to clean.
    return f"{Path(hub.weight_name).name} from {hub.repo_id}"


def _name_stem(filename: Any) -> str:
    return _slug(Path(str(filename or "")).name.rsplit(".", 1)[0])


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:32].strip("-") or "lora"


def _display_name(filename: Any) -> str:
    text = Path(str(filename or "upload")).name
    text = "".join(ch for ch in text if ch.isprintable())[:80]
    return text or "upload"
