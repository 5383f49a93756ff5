"""The LoRA library: a catalogue on disk, per-session uploads, and the adapters on the model.

One shared model serves every request, so adapter state is shared too. The library keeps
track of what is loaded into it (each file once, under a safe internal adapter name), and
`activate` makes exactly the requested set active with the requested weights on every
component, or disables LoRA entirely, so that "no LoRA" gives the base model's output bit for
bit. The caller (the engine) holds its lock around `bind` and `activate`; the catalogue and
upload tables have their own lock because the UI lists and uploads from other threads.

Users only ever pass names. A name is looked up in the catalogue (or in the caller's own
session uploads); it never becomes a path. Catalogue files are resolved inside the library
folder, uploads are stored under their content hash, and every file passes
`pipelines.lora_files` before diffusers sees it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, LoraRejectedError, ModelLoadError, UnknownNameError
from .lora_files import (
    MAX_FILE_BYTES,
    LoraFileReport,
    MiB,
    ModelSignature,
    check_lora_keys,
    read_safetensors,
    validate_lora,
)
from .requests import LoraChoice

logger = logging.getLogger(__name__)

CATALOGUE_FILE = "catalog.json"
FAMILY_LABELS = {"sd15": "SD 1.5", "sdxl": "SDXL", "tiny": "the tiny test model"}
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,79}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
LORA_STRING_HINT = "write name:weight pairs separated by commas, e.g. 'tiny-ink:0.8, tiny-neon'"
PROMPT_TAG_RE = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
UPLOAD_PREFIX = "upload-"
# peft matches adapter names as substrings of parameter names; fixed-width names keep one
# adapter's name from ever being part of another's.
_SLOT_NAMES = tuple(f"stencil_slot_{letter}" for letter in "abcdefghijklmnop")


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
    session_id: str | None = field(default=None, repr=False)
    report: LoraFileReport | None = field(default=None, compare=False)

    @property
    def source_kind(self) -> str:
        if self.upload_sha256 is not None:
            return "upload"
        return "hub" if self.hub is not None else "file"

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
                repo_id=self.hub.repo_id, revision=self.hub.revision, pinned=self.hub.pinned
            )
        if self.report is not None:
            public.update(self.report.describe())
        return public


@dataclass(frozen=True)
class _Prepared:
    entry: LoraEntry
    path: Path
    report: LoraFileReport


@dataclass
class _Loaded:
    adapter: str
    label: str
    param_bytes: int


class LoraLibrary:
    """Catalogue, uploads and the adapters loaded into one shared pipeline.

    `max_loaded` and `memory_budget_mb` bound the adapters kept in memory (least recently
    used go first, never one of the set being activated). With `hotswap_rank`, adapters are
    swapped into a fixed set of `hotswap_slots` slots instead (for a `torch.compile`d UNet:
    no recompilation); call `bind(pipe)` before compiling.
    """

    def __init__(
        self,
        folder: Path,
        base_tag: str,
        *,
        max_loaded: int = 16,
        memory_budget_mb: float = 512,
        hotswap_rank: int | None = None,
        hotswap_slots: int = 2,
        max_upload_mb: float = 200,
        max_file_mb: float = MAX_FILE_BYTES / MiB,
        max_uploads_per_session: int = 8,
        uploads_dir: Path | None = None,
        hub_cache_dir: Path | None = None,
        allow_downloads: bool = True,
    ):
        if max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded} must be at least 1")
        if hotswap_rank is not None and hotswap_rank < 1:
            raise ValueError(f"hotswap_rank={hotswap_rank} must be a positive rank")
        if not 1 <= hotswap_slots <= len(_SLOT_NAMES):
            raise ValueError(f"hotswap_slots={hotswap_slots} must be from 1 to {len(_SLOT_NAMES)}")
        self.folder = Path(folder).resolve()
        self.base_tag = base_tag
        self.max_loaded = max_loaded
        self.memory_budget_bytes = int(memory_budget_mb * MiB)
        self.hotswap_rank = hotswap_rank
        self.hotswap_slots = hotswap_slots
        self.max_upload_bytes = int(max_upload_mb * MiB)
        self.max_file_bytes = int(max_file_mb * MiB)
        self.max_uploads_per_session = max_uploads_per_session
        self.hub_cache_dir = hub_cache_dir
        self.allow_downloads = allow_downloads
        self._uploads_dir = Path(uploads_dir) if uploads_dir is not None else None

        # Guarded by _lock: touched from UI threads as well as the engine's.
        self._lock = threading.Lock()
        self._catalogue = load_catalogue(self.folder)
        self._uploads: dict[str, dict[str, LoraEntry]] = {}
        self._file_reports: dict[Path, tuple[int, int, LoraFileReport]] = {}
        self._hub_paths: dict[str, Path] = {}
        self._signature: ModelSignature | None = None

        # Model state: only touched by bind/activate, which run under the engine's lock.
        self._bound_unet: Any = None
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # by sha256, LRU first
        self._active: tuple[tuple[str, float], ...] | None = ()  # None: unknown, re-apply
        self._load_counter = 0
        self._labels: dict[str, str] = {}  # sha256 -> the name it was first loaded as
        self._slots: tuple[str, ...] = ()
        self._slot_content: dict[str, str | None] = {}
        self._slot_lru: OrderedDict[str, None] = OrderedDict()
        self._slot_scaling: dict[str, dict[int, float]] = {}
        self._lora_layers: list[Any] = []
        self._slot_modules: frozenset[str] = frozenset()

    # ----------------------------------------------------------------------------------
    # Lookups

    def entries(self, session_id: str | None = None) -> list[LoraEntry]:
        """Catalogue entries usable with this model, then the session's own uploads."""
        with self._lock:
            listed = sorted(
                (e for e in self._catalogue.values() if e.base == self.base_tag),
                key=lambda e: e.name,
            )
            if session_id is not None:
                listed += sorted(self._uploads.get(session_id, {}).values(), key=lambda e: e.name)
            return [self._with_report(entry) for entry in listed]

    def names(self, session_id: str | None = None) -> list[str]:
        return [entry.name for entry in self.entries(session_id)]

    def resolve(self, name: str, *, session_id: str | None = None) -> LoraEntry:
        """The entry called `name`; unknown names list the known ones, other bases refuse."""
        with self._lock:
            entry = self._catalogue.get(name) if isinstance(name, str) else None
            if entry is None and isinstance(name, str) and session_id is not None:
                entry = self._uploads.get(session_id, {}).get(name)
        if entry is None:
            raise UnknownNameError("LoRA", name, self.names(session_id))
        if entry.base != self.base_tag:
            raise LoraRejectedError(
                name,
                f"it is made for {_family(entry.base)}; the loaded model is"
                f" {_family(self.base_tag)}",
            )
        with self._lock:
            return self._with_report(entry)

    def preview_path(self, name: str) -> Path | None:
        entry = self.resolve(name)
        return None if entry.preview is None else _inside(self.folder, entry.preview, name)

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
        self, pairs: Sequence[tuple[str, float | None]], *, session_id: str | None
    ) -> tuple[LoraChoice, ...]:
        choices = []
        for name, weight in pairs:
            if weight is None:
                weight = self.resolve(name, session_id=session_id).default_weight
            else:
                self.resolve(name, session_id=session_id)
            choices.append(LoraChoice(name, weight))
        _check_unique(choices)
        return tuple(choices)

    # ----------------------------------------------------------------------------------
    # Uploads

    def add_upload(self, data: bytes, filename: str, session_id: str) -> LoraEntry:
        """Check an uploaded file and make it choosable by this session only.

        The file is stored under its content hash; the user's file name only shapes the
        entry's name and display name. Its keys are checked against the model once `bind`
        has seen it (otherwise at first activation).
        """
        if not isinstance(session_id, str) or not session_id:
            raise InvalidRequestError("session_id", session_id, "an upload needs a session")
        display = _display_name(filename)
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidRequestError("lora upload", type(data).__name__, "must be file bytes")
        if len(data) > self.max_upload_bytes:
            raise LoraRejectedError(
                display,
                f"the upload is {len(data) / MiB:.1f} MB, above the"
                f" {self.max_upload_bytes / MiB:.0f} MB limit",
            )
        file = read_safetensors(bytes(data), name=display, max_bytes=self.max_upload_bytes)
        with self._lock:
            signature = self._signature
        report = check_lora_keys(file, signature, name=display) if signature else None

        name = f"{UPLOAD_PREFIX}{_session_tag(session_id)}-{_name_stem(filename)}"
        path = self._store_upload(file.data, file.sha256)
        entry = LoraEntry(
            name=name,
            display_name=display,
            base=self.base_tag,
            licence="uploaded by the user",
            upload_sha256=file.sha256,
            session_id=session_id,
        )
        with self._lock:
            session = self._uploads.setdefault(session_id, {})
            if name not in session and len(session) >= self.max_uploads_per_session:
                raise InvalidRequestError(
                    "lora upload",
                    display,
                    f"a session may hold {self.max_uploads_per_session} uploaded LoRAs",
                )
            session[name] = entry
            if report is not None:
                stat = path.stat()
                self._file_reports[path] = (stat.st_mtime_ns, stat.st_size, report)
            return self._with_report(entry)

    def forget_session(self, session_id: str) -> None:
        """Drop a session's uploads from lookups (loaded adapters age out by LRU)."""
        with self._lock:
            self._uploads.pop(session_id, None)

    def _store_upload(self, data: bytes, sha256: str) -> Path:
        folder = self._uploads_folder()
        path = folder / f"{sha256}.safetensors"
        if not path.is_file():
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        return path

    def _uploads_folder(self) -> Path:
        with self._lock:
            if self._uploads_dir is None:
                self._uploads_dir = Path(tempfile.mkdtemp(prefix="stencil-lora-uploads-"))
            self._uploads_dir.mkdir(parents=True, exist_ok=True)
            return self._uploads_dir

    # ----------------------------------------------------------------------------------
    # The model

    def bind(self, pipe: Any) -> None:
        """Read the model's layer shapes (and set up hotswap slots); call before compiling.

        Binding a different UNet forgets every adapter the library loaded into the old one.
        """
        # A torch.compile'd UNet wraps the bound one; it is still the same model.
        unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
        if self._bound_unet is unet:
            return
        signature = ModelSignature.from_pipeline(pipe)
        self._loaded.clear()
        self._active = None  # unknown until the first activation applies a set
        self._slots = ()
        with self._lock:
            self._signature = signature
            self._file_reports.clear()
        self._bound_unet = unet
        if self.hotswap_rank is not None:
            self._create_slots(pipe)

    def activate(
        self, pipe: Any, choices: Sequence[LoraChoice], session_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Make exactly `choices` active on `pipe`; returns what was applied, for the recipe.

        Every name is resolved and every file checked before the model changes; if anything
        fails, the previous active set is restored. Weight 0 means the adapter has no
        effect, so it is not even loaded. An empty set disables LoRA entirely.
        """
        choices = tuple(choices)
        _check_unique(choices)
        entries = [self.resolve(choice.name, session_id=session_id) for choice in choices]
        self.bind(pipe)
        wanted = [(e, c.weight) for e, c in zip(entries, choices) if c.weight != 0]
        previous, previous_slots = self._active, dict(self._slot_content)
        try:
            prepared = [self._prepare(entry) for entry, _ in wanted]
            _check_distinct_files(prepared)
            self._check_capacity(prepared)
            if self.hotswap_rank is not None:
                adapters = self._fill_slots(pipe, prepared)
            else:
                adapters = self._load_missing(pipe, prepared)
            # peft sums adapters in list order and float sums depend on order, so the list
            # follows the files' hashes: neither the request's order nor the load history
            # (which decides the internal adapter names) can change the image.
            by_file = sorted(
                zip(prepared, adapters, (w for _, w in wanted)), key=lambda t: t[0].report.sha256
            )
            target = tuple((adapter, weight) for _, adapter, weight in by_file)
            self._apply(pipe, target)
        except BaseException:
            self._restore(pipe, previous, previous_slots)
            raise
        reports = {p.entry.name: p.report for p in prepared}
        return [
            self._applied(entry, choice.weight, reports) for entry, choice in zip(entries, choices)
        ]

    def loaded(self) -> list[str]:
        """Labels of the adapters in memory, least recently used first (for tests, benches)."""
        if self.hotswap_rank is not None:
            return [self._label_of(sha) for sha in self._slot_content.values() if sha]
        return [item.label for item in self._loaded.values()]

    # ---- preparing: resolve the file and check it, without touching the model

    def _prepare(self, entry: LoraEntry) -> _Prepared:
        path = self._path_for(entry)
        try:
            stat = path.stat()
        except OSError as exc:
            raise LoraRejectedError(entry.name, f"its file is missing ({exc.strerror})") from exc
        with self._lock:
            cached = self._file_reports.get(path)
            signature = self._signature
        if cached is not None and cached[:2] == (stat.st_mtime_ns, stat.st_size):
            report = cached[2]
        else:
            limit = self.max_upload_bytes if entry.upload_sha256 else self.max_file_bytes
            report = validate_lora(path, signature, name=entry.name, max_bytes=limit)
            if entry.upload_sha256 is not None and report.sha256 != entry.upload_sha256:
                raise LoraRejectedError(entry.name, "the stored upload no longer matches its hash")
            expected = entry.hub.sha256 if entry.hub is not None else None
            if expected is not None and report.sha256 != expected:
                raise LoraRejectedError(
                    entry.name,
                    f"the downloaded file's sha256 {report.sha256[:12]}... is not the"
                    f" catalogue's {expected[:12]}...",
                )
            with self._lock:
                self._file_reports[path] = (stat.st_mtime_ns, stat.st_size, report)
        return _Prepared(entry, path, report)

    def _path_for(self, entry: LoraEntry) -> Path:
        if entry.upload_sha256 is not None:
            return self._uploads_folder() / f"{entry.upload_sha256}.safetensors"
        if entry.hub is not None:
            return self._download(entry)
        return _inside(self.folder, entry.file, entry.name)

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

    def _check_capacity(self, prepared: Sequence[_Prepared]) -> None:
        names = [p.entry.name for p in prepared]
        limit = self.hotswap_slots if self.hotswap_rank is not None else self.max_loaded
        if len(prepared) > limit:
            raise InvalidRequestError(
                "loras", names, f"at most {limit} LoRAs can be active at once"
            )
        needed = sum(self._param_bytes(p.report) for p in prepared)
        if self.hotswap_rank is None and needed > self.memory_budget_bytes:
            raise InvalidRequestError(
                "loras",
                names,
                f"together they need {needed / MiB:.1f} MB of adapter weights; the budget is"
                f" {self.memory_budget_bytes / MiB:.1f} MB",
            )

    def _param_bytes(self, report: LoraFileReport) -> int:
        dtype_bytes = self._signature.dtype_bytes if self._signature else 4
        return report.param_count * dtype_bytes

    # ---- normal mode: every adapter under its own name, LRU-evicted

    def _load_missing(self, pipe: Any, prepared: Sequence[_Prepared]) -> list[str]:
        keep = {p.report.sha256 for p in prepared}
        adapters = []
        for item in prepared:
            sha = item.report.sha256
            if sha not in self._loaded:
                self._evict(pipe, self._param_bytes(item.report), keep)
                self._loaded[sha] = self._load(pipe, item)
            self._loaded.move_to_end(sha)
            adapters.append(self._loaded[sha].adapter)
        return adapters

    def _load(self, pipe: Any, item: _Prepared) -> _Loaded:
        self._load_counter += 1
        adapter = f"stencil_{self._load_counter:06d}_{item.report.sha256[:12]}"
        self._active = None  # loading makes the new adapter active on some components
        try:
            pipe.load_lora_weights(
                str(item.path.parent),
                weight_name=item.path.name,
                adapter_name=adapter,
                use_safetensors=True,  # never fall back to unpickling
            )
        except Exception as exc:
            self._delete_adapter(pipe, adapter)
            raise LoraRejectedError(
                item.entry.name, f"it passed its checks but diffusers could not load it ({exc})"
            ) from exc
        self._labels.setdefault(item.report.sha256, item.entry.name)
        return _Loaded(adapter, item.entry.name, self._param_bytes(item.report))

    def _evict(self, pipe: Any, incoming: int, keep: set[str]) -> None:
        def over() -> bool:
            used = sum(item.param_bytes for item in self._loaded.values())
            return (
                len(self._loaded) + 1 > self.max_loaded
                or used + incoming > self.memory_budget_bytes
            )

        while over():
            victim = next((sha for sha in self._loaded if sha not in keep), None)
            if victim is None:
                return
            self._delete_adapter(pipe, self._loaded.pop(victim).adapter)
            self._active = None

    @staticmethod
    def _delete_adapter(pipe: Any, adapter: str) -> None:
        present = any(adapter in names for names in pipe.get_list_adapters().values())
        if present:
            pipe.delete_adapters([adapter])

    def _apply(self, pipe: Any, target: tuple[tuple[str, float], ...]) -> None:
        # Already active with these weights: nothing to do (the cheap path a switch-heavy
        # workload takes).
        if target == self._active:
            return
        if self.hotswap_rank is not None:
            self._apply_slot_weights(dict(target))
        elif not target:
            pipe.disable_lora()
        else:
            # Every component: set_adapters alone would leave a text encoder's earlier
            # adapter active after a UNet-only load, and disable_lora sticks until undone.
            pipe.enable_lora()
            pipe.set_adapters([a for a, _ in target], adapter_weights=[w for _, w in target])
        self._active = target

    def _restore(
        self,
        pipe: Any,
        previous: tuple[tuple[str, float], ...] | None,
        previous_slots: Mapping[str, str | None],
    ) -> None:
        """Re-apply the set active before a failed activation, minus what is gone since."""
        if previous is None or previous == self._active:
            return
        live = self._live_adapters(pipe)
        # A slot refilled with another adapter must not get the old adapter's weight.
        live -= {s for s in self._slots if self._slot_content.get(s) != previous_slots.get(s)}
        restorable = tuple((a, w) for a, w in previous if a in live)
        self._active = None
        try:
            self._apply(pipe, restorable)
        except Exception:  # the original error is the one worth reporting
            logger.exception("could not restore the previous LoRA set")

    # ---- hotswap mode: a fixed set of slots, refilled in place

    def _create_slots(self, pipe: Any) -> None:
        """Fill every slot with an all-zero LoRA of the target rank on every attention layer.

        The slots then never change shape or target set, so a compiled UNet keeps its graph
        while adapters are swapped in (peft can only swap into layers a slot already has).
        """
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
        if getattr(unet, "peft_config", None):
            raise RuntimeError("hotswap mode needs a UNet without adapters; bind it first")
        rank = self.hotswap_rank
        layers = {
            name: shape
            for name, shape in self._signature.layers["unet"].items()
            if ".attentions." in name
        }
        like = {"device": unet.device, "dtype": unet.dtype}
        template: dict[str, Any] = {}
        for name, shape in layers.items():
            a_tail = () if shape.kernel is None else shape.kernel
            b_tail = () if shape.kernel is None else (1, 1)
            a_shape = (rank, shape.in_features, *a_tail)
            b_shape = (shape.out_features, rank, *b_tail)
            template[f"unet.{name}.lora_A.weight"] = torch.zeros(a_shape, **like)
            template[f"unet.{name}.lora_B.weight"] = torch.zeros(b_shape, **like)
        slots = _SLOT_NAMES[: self.hotswap_slots]
        pipe.enable_lora_hotswap(target_rank=rank)
        for slot in slots:
            # Fresh tensors per slot: diffusers adopts a state dict's tensors as the
            # adapter's parameters (no copy), so slots built from one dict would share
            # storage and a hotswap into one would write into all of them.
            fresh = {key: value.clone() for key, value in template.items()}
            pipe.load_lora_weights(fresh, adapter_name=slot)
        # Scalings become tensors, so changing a weight is an in-place fill, not a new
        # Python float that a compiled graph would have to guard on.
        prepare_model_for_compiled_hotswap(unet, target_rank=rank, check_compiled="error")
        unet.set_adapter(list(slots))
        self._slots = slots
        self._slot_content = dict.fromkeys(slots)
        self._slot_lru = OrderedDict.fromkeys(slots)
        self._slot_modules = frozenset(layers)
        self._lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        self._slot_scaling = {slot: {} for slot in slots}
        self._active = None
        self._apply_slot_weights({})

    def _fill_slots(self, pipe: Any, prepared: Sequence[_Prepared]) -> list[str]:
        for item in prepared:
            self._check_swappable(item)
        holding = {sha: slot for slot, sha in self._slot_content.items() if sha}
        wanted = {p.report.sha256 for p in prepared}
        free = [s for s in self._slot_lru if self._slot_content[s] not in wanted]
        missing = sorted(
            (p for p in prepared if p.report.sha256 not in holding), key=lambda p: p.report.sha256
        )
        # The least recently used slots make room; within them, adapters go in hash order,
        # so adapters that arrive together sum in the same order whatever the request's order.
        # (All slots are always active and peft sums them in slot order; which slots an
        # adapter that is already loaded sits in still depends on history: ~1e-7 in float32.)
        victims = sorted(free[: len(missing)], key=self._slots.index)
        for slot, item in zip(victims, missing):
            holding[item.report.sha256] = slot
            self._swap_into(pipe, slot, item)
        slots = []
        for item in prepared:
            self._slot_lru.move_to_end(holding[item.report.sha256])
            slots.append(holding[item.report.sha256])
        return slots

    def _check_swappable(self, item: _Prepared) -> None:
        report, name = item.report, item.entry.name
        if set(report.targets) != {"unet"}:
            raise LoraRejectedError(
                name,
                "it has text-encoder weights, and hotswap mode (used for a compiled UNet) can"
                " only swap UNet LoRAs",
            )
        if max(report.ranks) > self.hotswap_rank:
            raise LoraRejectedError(
                name, f"its rank {max(report.ranks)} is above the hotswap rank {self.hotswap_rank}"
            )
        outside = sorted(report.modules["unet"] - self._slot_modules)
        if outside:
            raise LoraRejectedError(
                name,
                f"it targets layers outside the attention blocks (e.g. {outside[0]!r}), which"
                " hotswap slots do not cover",
            )
        if not report.hotswap_compatible_config:
            raise LoraRejectedError(
                name,
                "its layers use different alphas (or dropout/rslora/DoRA settings), which peft"
                " cannot hotswap",
            )

    def _swap_into(self, pipe: Any, slot: str, item: _Prepared) -> None:
        self._active = None
        self._slot_content[slot] = None
        try:
            pipe.load_lora_weights(
                str(item.path.parent),
                weight_name=item.path.name,
                adapter_name=slot,
                hotswap=True,
                use_safetensors=True,
            )
        except Exception as exc:
            # diffusers deletes the slot's adapter when a hotswap fails; the library's
            # slots are fixed, so start over with fresh ones rather than run with a hole.
            self._recreate_slots(pipe)
            raise LoraRejectedError(item.entry.name, f"hotswapping it failed ({exc})") from exc
        # The swap set each layer's scaling to the new adapter's alpha / rank; remember it
        # as the weight-1 scale. (peft's set_scale would use the slot's first config.)
        self._slot_scaling[slot] = {
            id(layer): float(layer.scaling[slot])
            for layer in self._lora_layers
            if slot in layer.scaling
        }
        self._slot_content[slot] = item.report.sha256
        self._labels.setdefault(item.report.sha256, item.entry.name)

    def _recreate_slots(self, pipe: Any) -> None:
        try:
            pipe.delete_adapters([s for s in self._slots if s in self._live_adapters(pipe)])
            self._slots = ()
            self._create_slots(pipe)
        except Exception:
            logger.exception("could not rebuild the hotswap slots")

    @staticmethod
    def _live_adapters(pipe: Any) -> set[str]:
        return {a for names in pipe.get_list_adapters().values() for a in names}

    def _apply_slot_weights(self, weights: Mapping[str, float]) -> None:
        for slot in self._slots:
            weight = weights.get(slot, 0.0)
            scales = self._slot_scaling.get(slot, {})
            for layer in self._lora_layers:
                if slot in layer.scaling:
                    layer.scaling[slot].fill_(weight * scales.get(id(layer), 0.0))

    # ---- bookkeeping

    def _label_of(self, sha: str) -> str:
        return self._labels.get(sha, sha[:12])

    def _applied(
        self, entry: LoraEntry, weight: float, reports: Mapping[str, LoraFileReport]
    ) -> dict[str, Any]:
        if entry.name not in reports:
            with self._lock:
                entry = self._with_report(entry)
        report = reports.get(entry.name) or entry.report
        applied: dict[str, Any] = {
            "name": entry.name,
            "display_name": entry.display_name,
            "weight": weight,
            "active": weight != 0,
            "source": entry.source_kind,
            "sha256": report.sha256 if report is not None else None,
        }
        if entry.hub is not None:
            applied.update(
                repo_id=entry.hub.repo_id,
                weight_name=entry.hub.weight_name,
                revision=entry.hub.revision,
            )
        elif entry.file is not None and entry.source_kind == "file":
            applied["file"] = entry.file  # relative to the library folder, never absolute
        return applied

    def _with_report(self, entry: LoraEntry) -> LoraEntry:
        """The entry with its file report, once a check has produced one (lock held)."""
        path: Path | None = None
        if entry.upload_sha256 is not None and self._uploads_dir is not None:
            path = self._uploads_dir / f"{entry.upload_sha256}.safetensors"
        elif entry.hub is not None:
            path = self._hub_paths.get(entry.name)
        elif entry.file is not None:
            path = (self.folder / entry.file).resolve()
        cached = self._file_reports.get(path) if path is not None else None
        return entry if cached is None else replace(entry, report=cached[2])


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
    name = item.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise CatalogueError(
            f"{where}: name {name!r} must be lowercase letters, digits, '-', '_' or '.'"
        )
    where = f"{where} ({name})"
    if name.startswith(UPLOAD_PREFIX):
        raise CatalogueError(f"{where}: names starting with {UPLOAD_PREFIX!r} are for uploads")
    if ("file" in item) == ("hub" in item):
        raise CatalogueError(f"{where}: give exactly one of 'file' or 'hub'")
    file = item.get("file")
    if file is not None:
        _check_relative(folder, file, f"{where}: file")
    preview = item.get("preview")
    if preview is not None:
        _check_relative(folder, preview, f"{where}: preview")
    weight = item.get("default_weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
    ):
        raise CatalogueError(f"{where}: default_weight must be a number")
    triggers = item.get("trigger_words", [])
    if not isinstance(triggers, list) or not all(isinstance(t, str) for t in triggers):
        raise CatalogueError(f"{where}: trigger_words must be a list of text")
    base = item.get("base")
    if not isinstance(base, str) or not base:
        raise CatalogueError(f"{where}: base must name a model family, e.g. 'sd15'")
    return LoraEntry(
        name=name,
        display_name=str(item.get("display_name") or name),
        base=base,
        file=file,
        hub=_parse_hub(item.get("hub"), where),
        trigger_words=tuple(triggers),
        default_weight=float(weight),
        licence=str(item.get("licence", "unknown")),
        description=str(item.get("description", "")),
        preview=preview,
    )


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
        _inside(folder, relative, where)
    except LoraRejectedError as exc:
        raise CatalogueError(f"{where}: {exc.reason}") from exc


def _inside(folder: Path, relative: str | None, name: str) -> Path:
    """`folder/relative`, refusing anything that resolves outside the folder."""
    root = Path(folder).resolve()
    if relative is None or Path(relative).is_absolute():
        raise LoraRejectedError(name, "its file must be given relative to the library folder")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise LoraRejectedError(name, "its file lies outside the library folder")
    return path


# --------------------------------------------------------------------------------------
# Text forms of a LoRA set


def split_lora_string(text: str | None) -> tuple[tuple[str, float | None], ...]:
    """`"a:0.8, b"` -> (("a", 0.8), ("b", None)); empty or blank text -> ()."""
    if text is None or not text.strip():
        return ()
    if not isinstance(text, str):
        raise InvalidRequestError("loras", text, LORA_STRING_HINT)
    return tuple(_split_pair(part.strip(), text) for part in text.split(","))


def split_prompt_lora_tags(prompt: str) -> tuple[str, tuple[tuple[str, float | None], ...]]:
    """Remove `<lora:name>` / `<lora:name:weight>` tags; returns the prompt and the pairs."""
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt", prompt, "must be text")
    pairs = []
    for match in PROMPT_TAG_RE.finditer(prompt):
        body = match.group(1)
        if body.count(":") > 1:
            raise InvalidRequestError(
                "prompt", match.group(0), "use <lora:name> or <lora:name:weight>"
            )
        pairs.append(_split_pair(body.strip(), match.group(0)))
    cleaned = PROMPT_TAG_RE.sub(" ", prompt)
    cleaned = re.sub(r"[ \t]{2,}", " ", cleaned)
    cleaned = re.sub(r"\s+,", ",", cleaned)
    cleaned = re.sub(r",(\s*,)+", ",", cleaned).strip(" \t\n,")
    return cleaned, tuple(pairs)


def _split_pair(part: str, whole: str) -> tuple[str, float | None]:
    name, colon, weight_text = part.partition(":")
    name = name.strip()
    if not name or ":" in weight_text:
        raise InvalidRequestError("loras", whole, LORA_STRING_HINT)
    if not colon:
        return name, None
    try:
        weight = float(weight_text.strip())
    except ValueError:
        raise InvalidRequestError("loras", whole, LORA_STRING_HINT) from None
    if not math.isfinite(weight):
        raise InvalidRequestError("loras", whole, "weights must be finite numbers")
    return name, weight


def _check_distinct_files(prepared: Sequence[_Prepared]) -> None:
    seen: dict[str, str] = {}
    for item in prepared:
        other = seen.setdefault(item.report.sha256, item.entry.name)
        if other != item.entry.name:
            raise InvalidRequestError(
                "loras", [other, item.entry.name], "these names are the same file; choose one"
            )


def _check_unique(choices: Sequence[LoraChoice]) -> None:
    names = [choice.name for choice in choices]
    if len(set(names)) != len(names):
        raise InvalidRequestError("loras", names, "each LoRA may appear once")


# --------------------------------------------------------------------------------------
# Small helpers


def _family(tag: str) -> str:
    return FAMILY_LABELS.get(tag, tag)


def _session_tag(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()[:8]


def _name_stem(filename: Any) -> str:
    stem = Path(str(filename or "")).name.rsplit(".", 1)[0].lower()
    return re.sub(r"[^a-z0-9]+", "-", stem).strip("-")[:32].strip("-") or "lora"


def _display_name(filename: Any) -> str:
    text = Path(str(filename or "upload")).name
    text = "".join(ch for ch in text if ch.isprintable())[:80]
    return text or "upload"
