"""The LoRA library: what the engine and the service use, composed of three parts.

- `pipelines.lora_catalogue`: the names a user can choose (catalogue file, session uploads).
- `pipelines.lora_hub`: a LoRA a user names by Hub id, listed and fetched for their session.
- `pipelines.lora_sources`: each name's file, found, downloaded and checked against the model.
- `pipelines.adapters`: the adapters on the shared model, behind one `AdapterStore` interface.

`LoraLibrary` only wires them together: names in, checked files to the store, a recipe out.
The caller (the engine) holds its lock around `bind` and `activate`; the catalogue and the
sources lock their own tables, because the UI lists and uploads from other threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .adapters import AdapterStore, build_adapter_store
from .errors import HubUnavailableError
from .lora_catalogue import (
    CatalogueError,
    CheckedUpload,
    HubSource,
    LoraCatalogue,
    LoraEntry,
    load_catalogue,
)
from .lora_files import MAX_FILE_BYTES, LoraFileReport, MiB, ModelSignature
from .lora_hub import HUB_LORAS_OFF, download_hub_lora, find_hub_lora, parse_hub_lora
from .lora_sources import LoraSources
from .lora_text import check_unique
from .requests import LoraChoice
from .settings import BUDGETS

__all__ = ["CatalogueError", "HubSource", "LoraEntry", "LoraLibrary", "load_catalogue"]


class LoraLibrary:
    """Catalogue, uploads and the adapters loaded into one shared pipeline.

    `max_loaded` and `memory_budget_mb` bound the adapters kept in memory (least recently
    used go first, never one of the set being activated). With `hotswap_rank`, adapters are
    swapped into a fixed set of `hotswap_slots` slots instead (for a `torch.compile`d UNet:
    no recompilation); call `bind(pipe)` before compiling. With `allow_hub_loras`, a user may
    add a LoRA from a public Hub repository to their session (`add_hub_lora`).
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
        max_upload_mb: float = BUDGETS.max_lora_upload_bytes / MiB,
        max_file_mb: float = MAX_FILE_BYTES / MiB,
        max_uploads_per_session: int = 8,
        max_stored_upload_mb: float = BUDGETS.lora_uploads_max_bytes / MiB,
        uploads_dir: Path | None = None,
        hub_cache_dir: Path | None = None,
        allow_downloads: bool = True,
        allow_hub_loras: bool = False,
    ):
        self.hotswap_rank = hotswap_rank
        # Users' Hub ids (`--allow-hub-loras`); `allow_downloads` is about the catalogue's.
        self.allow_hub_loras = allow_hub_loras
        self.store: AdapterStore = build_adapter_store(
            max_loaded=max_loaded,
            memory_budget_bytes=int(memory_budget_mb * MiB),
            hotswap_rank=hotswap_rank,
            hotswap_slots=hotswap_slots,
        )
        self.catalogue = LoraCatalogue(
            folder,
            base_tag,
            max_upload_bytes=int(max_upload_mb * MiB),
            max_uploads_per_session=max_uploads_per_session,
            max_stored_bytes=int(max_stored_upload_mb * MiB),
            uploads_dir=uploads_dir,
        )
        self.sources = LoraSources(
            self.catalogue,
            max_file_bytes=int(max_file_mb * MiB),
            hub_cache_dir=hub_cache_dir,
            allow_downloads=allow_downloads,
        )

    @property
    def folder(self) -> Path:
        return self.catalogue.folder

    @property
    def base_tag(self) -> str:
        return self.catalogue.base_tag

    @property
    def max_upload_bytes(self) -> int:
        return self.catalogue.max_upload_bytes

    @property
    def keeps_compiled_graph(self) -> bool:
        """Whether adapter changes leave a torch.compile'd UNet's graph alone."""
        return self.store.keeps_compiled_graph

    # ---- names

    def entries(self, session_id: str | None = None) -> list[LoraEntry]:
        """Catalogue entries usable with this model, then the session's own uploads."""
        return [self.sources.with_report(e) for e in self.catalogue.entries(session_id)]

    def names(self, session_id: str | None = None) -> list[str]:
        return self.catalogue.names(session_id)

    def resolve(self, name: str, *, session_id: str | None = None) -> LoraEntry:
        """The entry called `name`; unknown names list the known ones, other bases refuse."""
        return self.sources.with_report(self.catalogue.resolve(name, session_id=session_id))

    def preview_path(self, name: str) -> Path | None:
        return self.catalogue.preview_path(name)

    def parse_lora_string(
        self, text: str | None, *, session_id: str | None = None
    ) -> tuple[LoraChoice, ...]:
        """`"name:0.8, other"` -> choices; a name without weight takes its default weight."""
        return self.catalogue.parse_lora_string(text, session_id=session_id)

    def extract_prompt_lora_tags(
        self, prompt: str, *, session_id: str | None = None
    ) -> tuple[str, tuple[LoraChoice, ...]]:
        """A1111-style `<lora:name:0.8>` tags -> (prompt without them, choices)."""
        return self.catalogue.extract_prompt_lora_tags(prompt, session_id=session_id)

    def request_choices(
        self, prompt: str, fields: Sequence[LoraChoice], *, session_id: str | None = None
    ) -> tuple[str, tuple[LoraChoice, ...]]:
        """The LoRAs a request uses: its prompt's `<lora:...>` tags and its fields, a field
        winning over a tag of the same name; with the prompt the tags are taken out of."""
        prompt, tagged = self.extract_prompt_lora_tags(prompt, session_id=session_id)
        chosen = {choice.name: choice for choice in tagged}
        chosen.update({choice.name: choice for choice in fields})
        return prompt, tuple(chosen.values())

    # ---- uploads

    def add_upload(self, data: bytes, filename: str, session_id: str) -> LoraEntry:
        """Check an uploaded file and make it choosable by this session only.

        Its bytes and values are checked now; its keys against the model once `bind` has
        seen it (otherwise at first activation).
        """
        return self._admit(self.catalogue.check_upload(data, filename, session_id))

    def add_hub_lora(self, repo: Any, file: Any, session_id: str) -> LoraEntry:
        """Fetch one `.safetensors` LoRA from a public Hub repository for this session only.

        Refused unless the operator allowed it. The file is picked from the repository's
        listing and its size checked there, before any download; it is fetched at the
        commit that listing named (so the recipe says exactly what was used), then checked
        and stored exactly as an upload: same owner, lifetime and byte budget.
        """
        if not self.allow_hub_loras:
            raise HubUnavailableError(HUB_LORAS_OFF)
        limit = self.max_upload_bytes
        found = find_hub_lora(parse_hub_lora(repo, file), max_bytes=limit)
        self.catalogue.check_room_for(session_id, found.source, found.size)
        data = download_hub_lora(found, max_bytes=limit, scratch=self.catalogue.scratch_folder())
        return self._admit(
            self.catalogue.check_upload(data, found.filename, session_id, hub=found.source)
        )

    def adopt_upload(
        self, data: bytes, filename: str, session_id: str, *, hub: HubSource | None = None
    ) -> LoraEntry:
        """Make an upload that another server of this deployment took (the Ray front)
        choosable here too, under the same name. Its bytes are checked again: this server
        trusts no file it did not check itself."""
        return self._admit(self.catalogue.check_upload(data, filename, session_id, hub=hub))

    def _admit(self, upload: CheckedUpload) -> LoraEntry:
        """Check the upload against the model (when bound), then make it choosable."""
        report = self.sources.check_upload(upload.file, upload.display_name)
        entry = self.catalogue.add_upload(upload)
        if report is not None:
            self.sources.remember(entry, report)
        return self.sources.with_report(entry)

    def forget_session(self, session_id: str) -> None:
        """Drop a session's uploads (and Hub LoRAs) from lookups and their files no other
        session holds (loaded adapters age out by LRU)."""
        self.sources.forget_files(self.catalogue.forget_session(session_id))

    # ---- the model

    def bind(self, pipe: Any) -> None:
        """Read the model's layer shapes and set the store up on it; call before compiling.

        Binding a different UNet forgets every adapter the library loaded into the old one.
        """
        if self.store.is_bound_to(pipe):
            return
        signature = ModelSignature.from_pipeline(pipe)
        self.sources.use_signature(signature)
        self.store.bind(pipe, signature)

    def check_against(self, signature: ModelSignature) -> None:
        """Check files against a model that lives elsewhere (a Ray replica's), described by
        its `signature`: uploads for another model are refused here, and the listing shows
        each file's verdict, as on a server that holds the model."""
        self.sources.use_signature(signature)

    def activate(
        self, pipe: Any, choices: Sequence[LoraChoice], session_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Make exactly `choices` active on `pipe`; returns what was applied, for the recipe.

        Every name is resolved and every file checked before the model changes; if anything
        fails, the previous active set is restored. Weight 0 means the adapter has no
        effect, so it is not even loaded. An empty set disables LoRA entirely.
        """
        entries, prepared = self._activate(pipe, tuple(choices), session_id)
        reports = {p.entry.name: p.report for p in prepared}
        return [
            entry.to_recipe(choice.weight, reports.get(entry.name) or self._report_of(entry))
            for entry, choice in zip(entries, choices)
        ]

    def preload(
        self, pipe: Any, choices: Sequence[LoraChoice], session_id: str | None = None
    ) -> tuple[str, ...]:
        """Get `choices`' files into the model (by activating them), so that the requests
        for this set that follow find them loaded; returns their content hashes, which
        `release` takes."""
        _, prepared = self._activate(pipe, tuple(choices), session_id)
        return tuple(p.sha256 for p in prepared)

    def release(self, pipe: Any, sha256s: Sequence[str]) -> None:
        """Free the adapters of these files now (the store would evict them by LRU)."""
        self.store.release(pipe, set(sha256s))

    @property
    def adapter_loads(self) -> int:
        """Files put into the model so far."""
        return self.store.loads

    def _activate(self, pipe: Any, choices: tuple[LoraChoice, ...], session_id: str | None):
        check_unique(choices)
        entries = [self.catalogue.resolve(c.name, session_id=session_id) for c in choices]
        self.bind(pipe)
        wanted = [(e, c.weight) for e, c in zip(entries, choices) if c.weight != 0]
        prepared = self.sources.prepare_set([entry for entry, _ in wanted])
        self.store.activate(pipe, [(p, w) for p, (_, w) in zip(prepared, wanted)])
        return entries, prepared

    def loaded(self) -> list[str]:
        """Labels of the adapters in memory, least recently used first (for tests, benches)."""
        return self.store.loaded()

    def _report_of(self, entry: LoraEntry) -> LoraFileReport | None:
        return self.sources.with_report(entry).report
