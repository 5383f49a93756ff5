"""Stencil past one GPU: a Ray Serve deployment of engines, routed by adapter set.

    front (python app.py --backend ray): page, API, LoRA catalogue, uploads; no model
        |  DeploymentHandle.options(multiplexed_model_id=<adapter-set id>, stream=True)
        v
    StencilReplica x N: one `Engine` each, on one GPU each (a CPU share in tests)

Routing. Ray's router sends a request that names a multiplexed model id to a replica that
already holds that id, else to the replica holding the fewest ids, and each replica keeps at
most `max_num_models_per_replica` ids, evicting the least recently used. The id we give it is
the request's *adapter set*: the LoRA files a replica must load before it can run the
request (an upload by content hash; a catalogue LoRA by name, since every replica serves the
same catalogue). Left out on purpose: the weights (set per request at no load cost; an id
per weight would scatter one set's users over replicas that each load the same files) and,
by default, the ControlNets. There are only as many ControlNets as control types, every
replica keeps each one it has loaded, and naming them made "LoRA X" and "LoRA X with a canny
map" two sets that evict each other (bench/results/scale_out.md measures both ways). A
request without LoRAs names no id, so Ray balances it by load alone. A replica holds as
many sets as its adapter store holds files (`sets_per_replica`).

Control maps are made where the request lands. The detectors (pose, depth) are models that
belong on the GPU beside the engine, the replica's map cache then serves that replica's
repeat requests, and the front stays free of torch. The control image travels in the
request (a PIL image pickles as its pixels).

Uploads. The front checks an upload and keeps its file by content hash, as it does alone.
A request that uses it carries a Ray object reference to its bytes, put into the object
store once per file and bounded by the uploads' byte budget, so whichever replica serves
the session's next request can read it on any node. That replica checks the bytes again
(hash, file checks, the model's layers) and makes the LoRA choosable for that session only.

Faults. Each call streams events (start, progress, previews, result). A replica that dies
mid-request ends its stream with an actor error; Ray starts a replacement, and the front
runs the request again once (the seed was fixed on the front, so the retry gives the same
image) and otherwise says so in a clear error. A stream that goes quiet for
`idle_timeout_s` ends in an error as well, never a hang.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GenerationCancelled, StencilError
from .recipe import png_bytes
from .settings import BUDGETS

if TYPE_CHECKING:
    from .engine import CancelToken, Engine, EngineStatus
    from .lora_catalogue import HubSource, LoraEntry
    from .loras import LoraLibrary
    from .requests import (
        ControlUnit,
        GenerationRequest,
        GenerationResult,
        LoraChoice,
        PreviewCallback,
        ProgressCallback,
    )

log = logging.getLogger(__name__)

ENGINE_APP = "stencil-engine"  # the Serve application that holds the replicas
STENCIL_ROOT = Path(__file__).resolve().parent.parent
# Engine options that may name a file or folder (sent to replicas as absolute paths).
PATH_OPTIONS = ("model", "model_config", "vae", "lora_folder")
# A set of this many LoRAs is what a replica's store is sized for; larger sets still run
# (the store's own LRU then makes room), they just count as several.
LORAS_PER_SET = 4
# Requests per replica (running or in its engine's queue) past which autoscaling adds one:
# a GPU runs one batch at a time, so two means one running and one ready to go.
TARGET_ONGOING_REQUESTS = 2
# Sessions whose uploads a replica keeps registered; older ones are forgotten (their
# files adopted again from the object store if they come back).
SESSIONS_PER_REPLICA = 64
# The environment a replica needs from the process that deploys it (cache, offline, hub).
FORWARDED_ENV_PREFIXES = ("STENCIL_", "HF_", "HUGGINGFACE_", "TORCH", "OMP_NUM_THREADS")

REPLICA_LOST = (
    "the GPU worker running this request stopped, and running it again failed too;"
    " try again in a minute"
)


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError as exc:  # an optional dependency: say how to get it
        raise StencilError(
            "the Ray backend needs Ray Serve: pip install -r requirements-ray.txt"
        ) from exc
    return ray, serve


# --------------------------------------------------------------------------------------
# What crosses between the front and a replica: plain, picklable values


@dataclass(frozen=True)
class AdapterSet:
    """What a replica loads before running a request: the id Ray routes by, and the
    LoRAs (at weight 1: weights are per request) and ControlNets behind it."""

    set_id: str
    loras: tuple[LoraChoice, ...] = ()
    controlnet_refs: tuple[str, ...] = ()
    session_id: str | None = None  # whose uploads the LoRA names may be


@dataclass(frozen=True)
class SharedUpload:
    """A session's uploaded LoRA, for the replica to check and register again."""

    sha256: str
    filename: str
    session_id: str
    data: Any  # a Ray object reference to the file's bytes
    hub: HubSource | None = None


@dataclass(frozen=True)
class RemoteCall:
    request: GenerationRequest
    adapter_set: AdapterSet
    uploads: tuple[SharedUpload, ...] = ()


@dataclass(frozen=True)
class ReplicaFacts:
    """What the front asks of the deployment once, at start."""

    model_facts: dict[str, int]
    status: EngineStatus
    compat_tag: str
    union_ref: str | None
    sets_per_replica: int
    # The model's LoRA-able layers, so the front checks uploads as a local server does.
    lora_signature: Any = None


@dataclass(frozen=True)
class ReplicaResult:
    images: tuple[bytes, ...]  # PNG
    control_maps: tuple[bytes, ...]  # PNG
    seeds: tuple[int, ...]
    recipe: Any
    warnings: tuple[str, ...]
    seconds: float
    replica: str  # which replica ran it, and what it loaded (tests, benchmarks)
    # Loaded while this request ran there (LoRA files; adapter sets, 0 or 1): exact when
    # requests come one at a time, and shared with its neighbours' when they overlap.
    adapter_loads: int
    set_loads: int
    # The replica's own totals since it started, when this request ended.
    adapter_loads_total: int = 0
    set_loads_total: int = 0


def adapter_set_id(lora_files: Sequence[str], controlnet_refs: Sequence[str]) -> str:
    """The multiplexed model id of a set: a hash of its files and ControlNets, orderless
    (the same set picked in another order is the same set to load)."""
    key = json.dumps(
        {"loras": sorted(set(lora_files)), "controlnets": sorted(set(controlnet_refs))}
    )
    return "set-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]


def png_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --------------------------------------------------------------------------------------
# The replica: one engine, its adapter sets multiplexed


class StencilReplica:
    """One Ray Serve replica: an `Engine` and the adapter sets Ray routes to it.

    `engine_options` are `Engine.start`'s arguments. The sets it holds, what its adapter
    store holds at `loras_per_set` files a set, are the deployment's
    `max_num_models_per_replica`: Ray evicts a set when a new one would pass it, and the
    eviction frees the set's adapters here."""

    def __init__(self, engine_options: Mapping[str, Any], loras_per_set: int = LORAS_PER_SET):
        from .engine import Engine

        _, serve = _ray()
        self.engine: Engine = Engine.start(**dict(engine_options))
        self.name = _replica_name(serve)
        self.sets_per_replica = self._sets_the_store_holds(loras_per_set)
        self.set_loads = 0
        self._plans: dict[str, AdapterSet] = {}
        self._held: dict[str, tuple[str, ...]] = {}  # set id -> its files' hashes
        # Sessions whose uploads are registered here, least recently used first.
        self._sessions: OrderedDict[str, set[tuple[str, str]]] = OrderedDict()
        self._sessions_lock = threading.Lock()

        # Wired here rather than on the class, because the bound comes from the store.
        async def load_adapter_set(set_id: str) -> _HeldSet:
            return await self._load_adapter_set(set_id)

        self._adapter_set = serve.multiplexed(max_num_models_per_replica=self.sets_per_replica)(
            load_adapter_set
        )

    def _sets_the_store_holds(self, loras_per_set: int) -> int:
        library = self.engine.loras
        if library is None:
            return 8  # ControlNet sets only: each is small beside the base model
        return max(1, library.store.capacity // max(1, loras_per_set))

    # ---- endpoints (each a handle method)

    def describe(self) -> ReplicaFacts:
        from .lora_files import ModelSignature

        engine = self.engine
        signature = ModelSignature.from_pipeline(engine.base) if engine.loras else None
        return ReplicaFacts(
            model_facts=dict(engine.model_facts),
            status=engine.status,
            compat_tag=engine.family.compat_tag,
            union_ref=engine.union_ref,
            sets_per_replica=self.sets_per_replica,
            lora_signature=signature,
        )

    async def control_map(self, unit: ControlUnit) -> bytes:
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(None, self.engine.control_map, unit)
        return png_bytes(image)

    async def generate(self, call: RemoteCall):
        """Stream ("started", name, pid), ("progress", done, total, stage), ("preview",
        pngs, step, steps), then ("result", ReplicaResult) or ("error", StencilError)."""
        from .engine import CancelToken

        _, serve = _ray()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = CancelToken()

        def send(*event) -> None:  # from the engine's threads
            loop.call_soon_threadsafe(events.put_nowait, event)

        yield ("started", self.name, os.getpid())
        loads_before, sets_before = self.engine.adapter_loads, self.set_loads
        try:
            await loop.run_in_executor(None, self._adopt_uploads, call.uploads)
            set_id = serve.get_multiplexed_model_id()
            if set_id:
                self._plans[set_id] = call.adapter_set
                await self._adapter_set(set_id)
            work = loop.run_in_executor(
                None, self._run, call.request, send, cancel, (loads_before, sets_before)
            )
            while not work.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            yield ("result", work.result())
        except StencilError as exc:
            yield ("error", exc)
        finally:
            cancel.cancel()  # the front went away (Stop, a timeout): the engine stops too

    # ---- inside

    def _run(self, request: GenerationRequest, send: Callable, cancel: CancelToken, before):
        def progress(done: int, total: int, stage: str) -> None:
            send("progress", done, total, stage)

        def preview(images, step: int, steps: int) -> None:
            send("preview", tuple(png_bytes(image) for image in images), step, steps)

        result = self.engine.generate(request, progress=progress, cancel=cancel, preview=preview)
        return ReplicaResult(
            images=tuple(png_bytes(image) for image in result.images),
            control_maps=tuple(png_bytes(image) for image in result.control_maps),
            seeds=result.seeds,
            recipe=result.recipe,
            warnings=result.warnings,
            seconds=result.seconds,
            replica=self.name,
            adapter_loads=self.engine.adapter_loads - before[0],
            set_loads=self.set_loads - before[1],
            adapter_loads_total=self.engine.adapter_loads,
            set_loads_total=self.set_loads,
        )

    async def _load_adapter_set(self, set_id: str) -> _HeldSet:
        # Read, not taken: a second request for a set still loading may ask again.
        plan = self._plans[set_id]
        loop = asyncio.get_running_loop()
        hashes = await loop.run_in_executor(
            None, self.engine.prepare_adapters, plan.loras, plan.session_id, plan.controlnet_refs
        )
        self.set_loads += 1
        self._held[set_id] = hashes
        return _HeldSet(self, set_id)

    def _release(self, set_id: str) -> None:
        """Ray evicted `set_id`: free its files, except those another held set uses."""
        hashes = self._held.pop(set_id, ())
        self._plans.pop(set_id, None)
        still_held = {sha for other in self._held.values() for sha in other}
        self.engine.release_adapters([sha for sha in hashes if sha not in still_held])

    def _adopt_uploads(self, uploads: Sequence[SharedUpload]) -> None:
        """Register the request's uploads for its session here, once per session and file:
        read from the object store, checked against their hash, then checked again as an
        upload. Sessions not seen for longest make room, by count and by stored bytes."""
        if not uploads:
            return
        ray, _ = _ray()
        library = self.engine.loras
        if library is None:
            raise StencilError("this deployment's engines have no LoRA library")
        for upload in uploads:
            key = (upload.sha256, upload.filename)
            if key in self._adopted(upload.session_id):
                continue
            data = ray.get(upload.data)
            if hashlib.sha256(data).hexdigest() != upload.sha256:
                raise StencilError(f"the uploaded LoRA {upload.filename!r} arrived damaged")
            self._make_room(len(data), keep=upload.session_id)
            library.adopt_upload(data, upload.filename, upload.session_id, hub=upload.hub)
            with self._sessions_lock:
                self._sessions[upload.session_id].add(key)

    def _adopted(self, session_id: str) -> set[tuple[str, str]]:
        """The (hash, file name) pairs adopted for this session; marks it used now."""
        with self._sessions_lock:
            adopted = self._sessions.setdefault(session_id, set())
            self._sessions.move_to_end(session_id)
            return set(adopted)

    def _make_room(self, incoming: int, *, keep: str) -> None:
        catalogue = self.engine.loras.catalogue
        limit = catalogue.max_stored_bytes
        while True:
            with self._sessions_lock:
                others = [s for s in self._sessions if s != keep]
                too_many = len(self._sessions) > SESSIONS_PER_REPLICA
                too_big = limit is not None and catalogue.stored_bytes() + incoming > limit
                if not others or not (too_many or too_big):
                    return
                oldest = others[0]
                del self._sessions[oldest]
            self.engine.loras.forget_session(oldest)


class _HeldSet:
    """What the multiplexer holds per set; Ray calls `__del__` when it evicts it."""

    def __init__(self, replica: StencilReplica, set_id: str):
        self.replica = replica
        self.set_id = set_id
        self._released = False

    def __del__(self) -> None:
        # Ray calls it on eviction, and Python may again when collecting the object.
        if not self._released:
            self._released = True
            self.replica._release(self.set_id)


def _replica_name(serve) -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (a direct test of the class)
        return f"pid-{os.getpid()}"


# --------------------------------------------------------------------------------------
# Deploying


def replica_deployment(
    *,
    replicas: int,
    num_gpus: float = 0,
    num_cpus: float = 1,
    max_ongoing_requests: int = 8,
    max_replicas: int = 0,
    env: Mapping[str, str] | None = None,
):
    """The replica class as a Serve deployment. Several requests may be ongoing at one
    replica: its engine's scheduler batches the ones that share a set and a size. With
    `max_replicas` above `replicas`, Ray autoscales between the two, adding a replica
    while each has more than `TARGET_ONGOING_REQUESTS` requests."""
    _, serve = _ray()
    actor_options: dict[str, Any] = {"num_gpus": num_gpus, "num_cpus": num_cpus}
    if env:
        actor_options["runtime_env"] = {"env_vars": dict(env)}
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas > replicas:
        scaling = {
            "num_replicas": None,
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                "target_ongoing_requests": TARGET_ONGOING_REQUESTS,
            },
        }
    return serve.deployment(
        StencilReplica,
        name="StencilReplica",
        **scaling,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options=actor_options,
        # A replica loads a model at start: give it time, then watch it.
        health_check_period_s=5,
        graceful_shutdown_timeout_s=30,
    )


def forwarded_env() -> dict[str, str]:
    """This process's settings that replicas on the same machine must share, and the
    code's own folder on their import path (a local cluster runs this checkout)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    paths = (str(STENCIL_ROOT), os.environ.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def deploy(
    engine_options: Mapping[str, Any],
    *,
    replicas: int,
    num_gpus: float = 0,
    num_cpus: float = 1,
    loras_per_set: int = LORAS_PER_SET,
    max_ongoing_requests: int = 8,
    name: str = ENGINE_APP,
):
    """Start the replicas on the connected Ray cluster; returns the deployment's handle."""
    _, serve = _ray()
    deployment = replica_deployment(
        replicas=replicas,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        max_ongoing_requests=max_ongoing_requests,
        env=forwarded_env(),
    )
    app = deployment.bind(dict(engine_options), loras_per_set)
    return serve.run(app, name=name, route_prefix=None)


# The builder's own keys, with their types (`serve run ... key=value` gives text).
DEPLOYMENT_ARGS = {
    "replicas": int,
    "num_gpus": float,
    "num_cpus": float,
    "loras_per_set": int,
    "max_ongoing_requests": int,
    "max_replicas": int,
}
ENGINE_ARG_TYPES = {"lora_hotswap_rank": int, "lora_max_loaded": int, "live_preview_every": int}
ENGINE_FLAGS = ("allow_hub_loras", "compile_unet")


def engine_app(args: Mapping[str, Any]):
    """The builder `serve run` and `serve deploy` call with the config's `args`
    (deploy/serve_config.yaml), or with `key=value` words on `serve run`'s command line:
    `replicas`, `max_replicas` (above `replicas`: autoscale between them), `num_gpus`,
    `num_cpus`, `loras_per_set`, `max_ongoing_requests`; every other key is an
    `Engine.start` option (model, lora_folder, controlnet, vae, ...)."""
    args = dict(args or {})
    defaults = {
        "replicas": 1,
        "num_gpus": 1,
        "num_cpus": 1,
        "loras_per_set": LORAS_PER_SET,
        "max_ongoing_requests": 8,
        "max_replicas": 0,
    }
    chosen = {key: kind(args.pop(key, defaults[key])) for key, kind in DEPLOYMENT_ARGS.items()}
    engine = {key: ENGINE_ARG_TYPES.get(key, _same)(value) for key, value in args.items()}
    for key in PATH_OPTIONS:  # a config names Stencil's own folders relative to its root
        if isinstance(engine.get(key), str) and (STENCIL_ROOT / engine[key]).exists():
            engine[key] = str(STENCIL_ROOT / engine[key])
    for flag in ENGINE_FLAGS:
        if isinstance(engine.get(flag), str):
            engine[flag] = engine[flag].lower() in ("1", "true", "yes")
    deployment = replica_deployment(
        replicas=chosen["replicas"],
        num_gpus=chosen["num_gpus"],
        num_cpus=chosen["num_cpus"],
        max_ongoing_requests=chosen["max_ongoing_requests"],
        max_replicas=chosen["max_replicas"],
    )
    return deployment.bind(engine, chosen["loras_per_set"])


def _same(value: Any) -> Any:
    return value


# --------------------------------------------------------------------------------------
# The front


class UploadShelf:
    """Object-store references to uploaded files, by content hash: put once, read by any
    replica. Bounded by bytes (least recently used dropped; put again when asked); a file
    the front has deleted (every session holding it closed) goes at the next upload's use."""

    def __init__(self, max_bytes: int = BUDGETS.lora_uploads_max_bytes):
        self.max_bytes = max_bytes
        self._refs: OrderedDict[str, tuple[Any, int, Path]] = OrderedDict()
        self._lock = threading.Lock()

    def ref(self, sha256: str, path: Path) -> Any:
        ray, _ = _ray()
        with self._lock:
            for gone in [sha for sha, (_, _, held) in self._refs.items() if not held.exists()]:
                del self._refs[gone]
            if sha256 in self._refs:
                self._refs.move_to_end(sha256)
                return self._refs[sha256][0]
            data = path.read_bytes()
            ref = ray.put(data)
            self._refs[sha256] = (ref, len(data), path)
            while len(self._refs) > 1 and self.held_bytes() > self.max_bytes:
                self._refs.popitem(last=False)
            return ref

    def held_bytes(self) -> int:
        return sum(size for _, size, _ in self._refs.values())

    def held(self) -> list[str]:
        """The content hashes on the shelf, least recently used first."""
        with self._lock:
            return list(self._refs)


class RayBackend:
    """The service's backend on a Ray Serve deployment (`pipelines.backends.Backend`).

    The LoRA catalogue lives here (names, uploads, Hub LoRAs, thumbnails), with no model:
    uploads are checked against the replicas' model from its signature, then again by
    each replica that uses them."""

    def __init__(
        self,
        handle: Any,
        *,
        lora_folder: Path | str | None = None,
        allow_hub_loras: bool = False,
        uploads_dir: Path | None = None,
        idle_timeout_s: float = 300.0,
        attempts: int = 2,
        route_by_adapter_set: bool = True,
        set_id_names_controlnets: bool = False,
    ):
        """`route_by_adapter_set=False`: Ray routes by load alone. With
        `set_id_names_controlnets`, a set's id names its ControlNets too. Both are there
        for the scale-out benchmark, which measures why the defaults are what they are."""
        self.handle = handle
        self.route_by_adapter_set = route_by_adapter_set
        self.set_id_names_controlnets = set_id_names_controlnets
        self.idle_timeout_s = idle_timeout_s
        self.attempts = attempts
        self.facts: ReplicaFacts = handle.describe.remote().result(timeout_s=idle_timeout_s)
        self.loras: LoraLibrary | None = None
        if lora_folder:
            from .loras import LoraLibrary

            self.loras = LoraLibrary(
                Path(lora_folder),
                base_tag=self.facts.compat_tag,
                allow_hub_loras=allow_hub_loras,
                uploads_dir=uploads_dir,
            )
            if self.facts.lora_signature is not None:
                self.loras.check_against(self.facts.lora_signature)
        self.shelf = UploadShelf()

    @property
    def model_facts(self) -> dict[str, int]:
        return self.facts.model_facts

    @property
    def status(self) -> EngineStatus:
        device = f"{self.facts.status.device}, on Ray Serve replicas"
        return replace(self.facts.status, device=device)

    def control_map(self, unit: ControlUnit):
        def ask():
            return self.handle.control_map.remote(unit).result(timeout_s=self.idle_timeout_s)

        return png_image(self._call(ask))

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview: PreviewCallback | None = None,
    ) -> GenerationResult:
        return self.generate_traced(request, progress=progress, cancel=cancel, preview=preview)[0]

    def generate_traced(
        self,
        request: GenerationRequest | RemoteCall,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview: PreviewCallback | None = None,
        started: Callable[[str, int], None] | None = None,
    ) -> tuple[GenerationResult, ReplicaResult]:
        """`generate`, and the replica's own account of it (which one ran it, its loads),
        sent once more if its replica dies under it. A `RemoteCall` goes as it is (tests
        send one the front would not make); `started(replica, pid)`: a replica took it."""
        call = request if isinstance(request, RemoteCall) else self.remote_call(request)
        return self._call(lambda: self._generate_once(call, progress, cancel, preview, started))

    def remote_call(self, request: GenerationRequest) -> RemoteCall:
        """The request with its seed fixed (a retry then makes the same image), its
        adapter set, and the session's uploads it uses."""
        from .requests import LoraChoice, random_seed

        if request.seed is None:
            request = replace(request, seed=random_seed())
        entries = self._chosen_entries(request)
        refs = ()
        if self.set_id_names_controlnets:
            refs = tuple(self.controlnet_ref(unit) for unit in request.controls)
        files = [entry.upload_sha256 or entry.name for entry, _ in entries]
        set_id = adapter_set_id(files, refs) if files or refs else ""
        adapter_set = AdapterSet(
            set_id=set_id,
            loras=tuple(LoraChoice(entry.name, 1.0) for entry, _ in entries),
            controlnet_refs=refs,
            session_id=request.session_id,
        )
        uploads = tuple(self._shared(entry) for entry, _ in entries if entry.upload_sha256)
        return RemoteCall(request, adapter_set, uploads)

    def controlnet_ref(self, unit: ControlUnit) -> str:
        from . import controls

        if self.facts.union_ref is not None:
            return self.facts.union_ref
        return controls.controlnet_ref(unit.control_type, self.facts.compat_tag, unit.param_dict)

    # ---- inside

    def _chosen_entries(self, request: GenerationRequest) -> list[tuple[LoraEntry, float]]:
        """The LoRAs the request uses at a weight other than 0: its fields and its prompt's
        `<lora:...>` tags, as the engine will read them (the fields win)."""
        if self.loras is None:
            return []
        session = request.session_id
        _, chosen = self.loras.request_choices(request.prompt, request.loras, session_id=session)
        return [
            (self.loras.catalogue.resolve(choice.name, session_id=session), choice.weight)
            for choice in chosen
            if choice.weight != 0
        ]

    def _shared(self, entry: LoraEntry) -> SharedUpload:
        path = self.loras.catalogue.upload_path(entry.upload_sha256)
        return SharedUpload(
            sha256=entry.upload_sha256,
            filename=entry.upload_filename or entry.display_name,
            session_id=entry.session_id,
            data=self.shelf.ref(entry.upload_sha256, path),
            hub=entry.hub,
        )

    def _generate_once(self, call, progress, cancel, preview, started):
        from .requests import GenerationResult

        options: dict[str, Any] = {"stream": True}
        if call.adapter_set.set_id and self.route_by_adapter_set:
            options["multiplexed_model_id"] = call.adapter_set.set_id
        stream = self.handle.options(**options).generate.remote(call)
        for event in self._events(stream, cancel):
            kind = event[0]
            if kind == "started" and started is not None:
                started(event[1], event[2])
            elif kind == "progress" and progress is not None:
                progress(*event[1:])
            elif kind == "preview" and preview is not None:
                preview([png_image(data) for data in event[1]], event[2], event[3])
            elif kind == "error":
                raise event[1]
            elif kind == "result":
                result: ReplicaResult = event[1]
                return GenerationResult(
                    images=tuple(png_image(data) for data in result.images),
                    seeds=result.seeds,
                    control_maps=tuple(png_image(data) for data in result.control_maps),
                    recipe=result.recipe,
                    warnings=result.warnings,
                    seconds=result.seconds,
                ), result
        raise StencilError(REPLICA_LOST)  # the stream ended without a result

    def _events(self, stream, cancel: CancelToken | None) -> Iterator[tuple]:
        """The stream's events, read by a helper thread so that a quiet replica or a
        Stop ends the wait (Ray's stream has no timeout of its own)."""
        inbox: queue.Queue = queue.Queue()

        def read() -> None:
            try:
                for event in stream:
                    inbox.put(("event", event))
            except BaseException as exc:  # handed to the caller's thread
                inbox.put(("raised", exc))
            inbox.put(("end", None))

        threading.Thread(target=read, daemon=True, name="stencil-ray-stream").start()
        waited = 0.0
        tick = 0.25
        while True:
            if cancel is not None and cancel.cancelled:
                stream.cancel()
                raise GenerationCancelled("stopped")
            try:
                what, value = inbox.get(timeout=tick)
            except queue.Empty:
                waited += tick
                if waited >= self.idle_timeout_s:
                    stream.cancel()
                    raise StencilError(
                        f"the GPU worker sent nothing for {self.idle_timeout_s:.0f} s;"
                        " the request was stopped"
                    ) from None
                continue
            waited = 0.0
            if what == "raised":
                raise value
            if what == "end":
                return
            yield value

    def _call(self, fn: Callable[[], Any]) -> Any:
        """`fn()`, run again when the replica running it dies (Ray has routed around it by
        then); a clear error when it dies again."""
        ray, _ = _ray()
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                log.warning("replica lost during a request (attempt %d): %s", attempt, exc)
        raise StencilError(REPLICA_LOST)


def _shut_down_on_sigterm() -> None:
    """SIGTERM (a container or Space stopping, a supervisor) exits through Python's
    shutdown, where Ray stops the local cluster it started; Python's default would skip it
    and leave the cluster's processes running."""
    import signal
    import sys

    def exit_once(*_) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut it short
        sys.exit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, exit_once)


def start_ray_backend(
    engine_options: Mapping[str, Any],
    *,
    replicas: int,
    lora_folder: Path | str | None = None,
    allow_hub_loras: bool = False,
) -> RayBackend:
    """`python app.py --backend ray`: join the cluster at RAY_ADDRESS (else start one on
    this machine), use the engine application already deployed there (`serve deploy
    deploy/serve_config.yaml`), or deploy `replicas` of it: one GPU each where the cluster
    has GPUs, else one CPU each."""
    ray, serve = _ray()
    address = os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        # Ray Client cannot stream from a deployment, and progress, previews and Stop ride
        # on the stream: the page must be a driver on a node of the cluster.
        raise StencilError(
            f"RAY_ADDRESS={address} is a Ray Client address, which cannot stream progress;"
            " run the page on a node of the cluster (`ray start --address=<head>:6379`,"
            " then RAY_ADDRESS=auto)"
        )
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": forwarded_env()})
        _shut_down_on_sigterm()
    options = dict(engine_options)
    for key in PATH_OPTIONS:  # replicas do not run in this folder: paths go absolute
        if isinstance(options.get(key), str) and Path(options[key]).exists():
            options[key] = str(Path(options[key]).resolve())
    try:
        handle = serve.get_app_handle(ENGINE_APP)
        log.info("using the running Serve application %r", ENGINE_APP)
    except Exception:  # not deployed yet (Ray raises a plain error for an unknown app)
        gpus = ray.cluster_resources().get("GPU", 0)
        handle = deploy(
            options,
            replicas=replicas,
            num_gpus=1 if gpus else 0,
            num_cpus=1 if gpus else max(0.5, ray.cluster_resources().get("CPU", 1) / replicas / 2),
        )
    return RayBackend(handle, lora_folder=lora_folder, allow_hub_loras=allow_hub_loras)
