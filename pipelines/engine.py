"""The engine: one base model in memory, shared by every request.

Per request it checks the request and makes its control maps in the caller's thread, then
hands the rest to the scheduler (pipelines.scheduler): one worker thread owns the model and
runs jobs in a fair order, several at once when they share a forward pass. For each run it
activates the LoRA set, composes a pipeline view over the shared components (`from_pipe`:
no weights are copied) with a fresh noise scheduler, and denoises. Adapter activation,
pipeline attributes and ControlNet residuals all live on shared modules, so two runs must
never interleave on the model; validation, preprocessing and PNG encoding stay outside.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .controlnets import WindowedMultiControlNet, WindowedMultiControlNetUnion
from .controls import empty_map_note
from .errors import GenerationCancelled, ImageError, InvalidRequestError, ModelLoadError
from .families import (
    ARCHITECTURES,
    DEFAULT_FAMILY,
    FAMILIES,
    ModelFamily,
    resolve_family,
    size_conditioning,
)
from .fields import REQUEST_FIELDS, unit_fields
from .hub import cached_locally, cached_revision, hub_reachable
from .lora_catalogue import SESSION_PREFIXES
from .map_cache import MapCache
from .model_check import describe_component_failure, describe_load_failure
from .recipe import Recipe
from .requests import (
    GenerationRequest,
    GenerationResult,
    PreviewCallback,
    ProgressCallback,
    random_seed,
)
from .scheduler import FairScheduler, Job, QueueRules
from .schedulers import get_scheduler_spec
from .settings import BUDGETS, cache_dir, env_choice, env_text

log = logging.getLogger(__name__)

AUTO_MODEL = "auto"
DTYPES = ("float32", "float16", "bfloat16")
OFFLINE_NOTICE = (
    "Offline: no network and no cached {label}; every feature works on the model that runs "
    "instead. {about}"
)


class CancelToken:
    """Set by the request's owner (the Stop button); checked before and at every step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class EngineStatus:
    family: str
    label: str
    architecture: str
    base: str
    device: str
    dtype: str
    offline: bool
    notice: str | None
    preprocessor_weights: dict[str, str]
    controlnets: str = "one per control"  # or the one ControlNet Union model every unit runs
    live_preview: str = "off"  # or how often and by what a run in progress is shown


def pick_device_and_dtype(
    family: ModelFamily, device: str | None, dtype: str | None, *, fp16_safe_vae: bool = False
):
    """CUDA: half precision (for SDXL bfloat16, or float16 with a VAE the user says is
    fp16-safe). CPU: float32 for the tiny models (bit-exact tests), bfloat16 for real
    sizes, where it measured about twice as fast as float32 on this CPU."""
    import torch

    device = (
        device or env_text("STENCIL_DEVICE", "") or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtype = dtype or env_choice("STENCIL_DTYPE", DTYPES)
    if dtype is None:
        if device.startswith("cuda"):
            # SDXL's VAE overflows in float16; bfloat16 has float32's range.
            sdxl_vae = family.architecture == "sdxl" and not fp16_safe_vae
            dtype = "bfloat16" if sdxl_vae else "float16"
        else:
            dtype = "float32" if family.is_local_build else "bfloat16"
    if dtype not in DTYPES:
        raise InvalidRequestError("dtype", dtype, "must be " + " or ".join(DTYPES))
    return device, getattr(torch, dtype)


def use_one_cpu_thread_for_tiny_models(family: ModelFamily, device: str) -> None:
    """The tiny families on a CPU run torch on one intra-op thread, unless OMP_NUM_THREADS
    says otherwise. Their operations are too small to share (one thread is the faster), and
    OpenMP gives each thread that runs torch its own helpers: once a control-map preview has
    run its detector in a page thread, two threads each make more helpers than cores, OpenMP
    stops spinning between operations, and every image took 3-4x as long (bench/cpu_threads.py).
    Real sizes keep torch's threads: their large operations are worth sharing."""
    import torch

    if device == "cpu" and family.is_local_build and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


# (run, seconds) -> run under a GPU slot of about seconds(works); see Engine.__init__.
GpuSlot = Callable[[Callable, Callable], Callable]


def map_gpu_seconds(*_) -> int:
    return 20  # a detector at 512-1024 px takes well under a second on a GPU


class Engine:
    def __init__(
        self,
        family: ModelFamily,
        *,
        cache_root: Path | None = None,
        device: str | None = None,
        dtype: str | None = None,
        notice: str | None = None,
        lora_folder: Path | str | None = None,
        lora_hotswap_rank: int | None = None,
        lora_max_loaded: int = 16,
        allow_hub_loras: bool = False,
        compile_unet: bool = False,
        map_cache_size: int = 64,
        map_cache_bytes: int | None = None,
        queue_rules: QueueRules | None = None,
        gpu_slot: GpuSlot | None = None,
        controlnet: str = "per-control",
        vae: str | None = None,
        live_preview_every: int | None = None,
    ):
        """`gpu_slot(run, seconds)`, where the GPU is lent per call (a ZeroGPU Space:
        `spaces.GPU(duration=seconds)(run)`), wraps each batch's model work: one slot per
        batch, for as long as `seconds(works)` estimates. Its arguments and result are
        plain values, since such a slot may run `run` in another process.

        `controlnet`: "per-control" (each control type its own ControlNet) or "union"
        (every unit on the family's one ControlNet Union model, each with its mode).
        `vae`: another VAE (Hub id or folder), such as an fp16-safe SDXL one.
        `live_preview_every`: steps between two images of a run in progress for callers
        that ask for them (0: none; None: `live_preview.default_every` for the device)."""
        from . import controls

        self.family = family
        if controlnet not in controls.CONTROLNET_CHOICES:
            raise InvalidRequestError("controlnet", controlnet, list(controls.CONTROLNET_CHOICES))
        self.union_ref = (
            controls.union_controlnet_ref(family.compat_tag) if controlnet == "union" else None
        )
        self.cache_root = Path(cache_root) if cache_root else cache_dir()
        # A folder is held by its absolute path, which the recipe reduces to its name.
        self.vae_source = str(Path(vae).resolve()) if vae and Path(vae).is_dir() else vae
        self.device, self.dtype = pick_device_and_dtype(
            family, device, dtype, fp16_safe_vae=vae is not None
        )
        use_one_cpu_thread_for_tiny_models(family, self.device)
        self.notice = notice
        self._lock = threading.RLock()
        self.scheduler = FairScheduler(self._run_batch, queue_rules)
        self._run_on_gpu = gpu_slot(self._run_works, self.gpu_seconds) if gpu_slot else None
        self._map_on_gpu = gpu_slot(self._make_map, map_gpu_seconds) if gpu_slot else None
        self._watch: _PassWatch | None = None
        self._counting_lock = threading.Lock()
        self._preprocess_lock = threading.Lock()
        # Ready pipeline views by ControlNet set (at most one per set of control types).
        self._views: dict[tuple[str, ...], Any] = {}
        self._counting_tokenizers: list | None = None
        self._controlnets: dict[str, Any] = {}
        self._controlnet_revisions: dict[str, str | None] = {}
        # Bounded by bytes as well as count (STENCIL_MAP_CACHE_MB): one large map can
        # hold as much memory as a hundred small ones.
        self._map_cache = MapCache(
            BUDGETS.map_cache_bytes if map_cache_bytes is None else map_cache_bytes,
            max_entries=map_cache_size,
        )
        self.base, self.base_revision = self._load_base()
        # Weights for every preprocessor are found (or stand-ins built) now, at start-up,
        # so that building the page or reporting status never downloads or writes.
        self.preprocessor_weights_by_control = self._resolve_preprocessors()
        self.loras = self._open_lora_library(
            lora_folder, lora_hotswap_rank, allow_hub_loras, lora_max_loaded
        )
        self.live_preview_every, self.latent_decoder = self._open_live_preview(live_preview_every)
        self._smoke_test()
        if compile_unet:
            self._compile_unet()

    # ---- loading ---------------------------------------------------------------------

    @classmethod
    def start(
        cls, model: str = AUTO_MODEL, *, model_config: str | None = None, **kwargs: Any
    ) -> Engine:
        """Load `model` (a family name, a local folder or a single-file checkpoint, whose
        configs come from `model_config`), or with "auto" the default family when it is
        cached or the Hub answers, else the tiny family with a notice."""
        if model != AUTO_MODEL:
            family = resolve_family(model, model_config)
            # A model that draws only some things says so, even when chosen on purpose.
            return cls(family, notice=family.about or None, **kwargs)
        default = FAMILIES[DEFAULT_FAMILY]
        notice = OFFLINE_NOTICE.format(label=default.label, about=FAMILIES["tiny"].about)
        if cached_locally(default.base_id) or hub_reachable(default.base_id):
            try:
                return cls(default, **kwargs)
            except ModelLoadError as exc:
                log.warning("falling back to the tiny model: %s", exc)
                notice = f"{exc}. " + notice
        return cls(FAMILIES["tiny"], notice=notice, **kwargs)

    def _load_base(self):
        """The base pipeline, and the Hub commit it was read at (None for a local folder)."""
        pipeline_class = self.family.pipeline_class("text2img")
        source = self.family.locate(self.cache_root)
        options: dict[str, Any] = {"torch_dtype": self.dtype, "use_safetensors": True}
        if self.family.fp16_variant and self.dtype != _torch().float32:
            options["variant"] = "fp16"
        if ARCHITECTURES[self.family.architecture].get("safety_checker"):
            options.update(safety_checker=None, requires_safety_checker=False)
        if self.vae_source is not None:
            options["vae"] = self._load_vae()
        try:
            if self.family.checkpoint is not None:
                pipe = self._load_checkpoint(pipeline_class, source, options)
            else:
                pipe = pipeline_class.from_pretrained(source, **options)
        except Exception as exc:  # SafetensorError, OSError, ValueError, KeyError ...
            # The operator's log gets the path and the whole error; the message, one line.
            log.error("could not load %s from %s: %s", self.family.label, source, exc)
            why = describe_load_failure(source, exc)
            raise ModelLoadError(f"{self.family.label} could not be loaded: {why}") from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe, cached_revision(source, "model_index.json")

    def _load_vae(self):
        source = self.vae_source
        try:
            return _diffusers().AutoencoderKL.from_pretrained(
                source, torch_dtype=self.dtype, use_safetensors=True
            )
        except Exception as exc:
            log.error("could not load the VAE %s: %s", source, exc)
            why = describe_component_failure(source, exc)
            named = Path(source).name
            raise ModelLoadError(f"the VAE {named!r} could not be loaded: {why}") from exc

    def _load_checkpoint(self, pipeline_class, config: str, options: dict[str, Any]):
        """One original-layout file through diffusers' own converter; the configs,
        tokenizers and scheduler from `config` (a folder, or a Hub id from the cache when
        offline), which the file does not hold."""
        options = {key: value for key, value in options.items() if key != "use_safetensors"}
        offline = not Path(config).is_dir() and not hub_reachable(config)
        return pipeline_class.from_single_file(
            self.family.checkpoint, config=config, local_files_only=offline, **options
        )

    def _open_live_preview(self, every: int | None):
        from .live_preview import LatentDecoder, default_every

        every = default_every(self.device) if every is None else every
        if not isinstance(every, int) or every < 0:
            raise InvalidRequestError("live_preview_every", every, "a whole number of steps >= 0")
        if not every:
            return 0, None
        repo = self.family.preview_decoder
        offline = repo is None or Path(repo).is_dir() or not hub_reachable(repo)
        decoder = LatentDecoder.for_pipe(self.base, repo, offline=offline)
        return (every, decoder) if decoder.usable else (0, None)

    def _open_lora_library(
        self, folder, hotswap_rank: int | None, allow_hub_loras: bool, max_loaded: int = 16
    ):
        if not folder:
            return None
        from .loras import LoraLibrary

        library = LoraLibrary(
            Path(folder),
            base_tag=self.family.compat_tag,
            max_loaded=max_loaded,
            hotswap_rank=hotswap_rank,
            allow_hub_loras=allow_hub_loras,
        )
        # Binding now sets up hotswap slots before any compilation sees the UNet.
        library.bind(self.base)
        return library

    def _compile_unet(self) -> None:
        """torch.compile the shared UNet. Pair it with LoRA hotswap (a fixed-rank slot set),
        or every new adapter triggers a recompilation."""
        import torch

        if self.loras is not None and not self.loras.keeps_compiled_graph:
            log.warning("compiling without LoRA hotswap: each new adapter will recompile")
        self.base.unet = torch.compile(self.base.unet, fullgraph=False)
        self._views.clear()  # views made before (the smoke test's) hold the plain UNet

    def controlnet_ref(self, unit) -> str:
        from . import controls

        if self.union_ref is not None:
            controls.union_mode(unit.control_type, unit.param_dict)  # it has one, or says so
            return self.union_ref
        return controls.controlnet_ref(unit.control_type, self.family.compat_tag, unit.param_dict)

    def controlnet(self, ref: str):
        """The ControlNet `ref` (from the control registry), loaded once, kept on the device."""
        with self._lock:
            if ref not in self._controlnets:
                source = self.family.locate_component(ref, self.cache_root)
                kind = "controlnet_union_model" if ref == self.union_ref else "controlnet_model"
                model_class = getattr(_diffusers(), ARCHITECTURES[self.family.architecture][kind])
                try:
                    net = model_class.from_pretrained(
                        source, torch_dtype=self.dtype, use_safetensors=True
                    )
                except Exception as exc:
                    log.error("could not load ControlNet %s from %s: %s", ref, source, exc)
                    why = describe_component_failure(source, exc)
                    raise ModelLoadError(f"ControlNet {ref!r} could not be loaded: {why}") from exc
                self._controlnets[ref] = net.to(self.device)
                self._controlnet_revisions[ref] = cached_revision(source, "config.json")
            return self._controlnets[ref]

    def _smoke_test(self) -> None:
        """One step at a small size through the whole path, at start: a component that
        loads but cannot run (a damaged tokenizer, a mismatched config) fails here, with a
        message, instead of at the first user's request."""
        request = GenerationRequest("smoke test", seed=0, steps=1, width=64, height=64)
        try:
            self.generate(request)
        except Exception as exc:
            log.exception("%s loaded but failed a one-step generation", self.family.label)
            why = describe_load_failure(self.family.locate(self.cache_root), exc)
            raise ModelLoadError(f"{self.family.label} loaded but cannot generate: {why}") from exc

    def _resolve_preprocessors(self) -> dict[str, str]:
        from . import controls

        return {
            name: controls.preprocessor_weights(name, device=self.device)
            for name in controls.CONTROLS
        }

    @property
    def status(self) -> EngineStatus:
        return EngineStatus(
            family=self.family.name,
            label=self.family.label,
            architecture=self.family.architecture,
            base=self.family.base_id,
            device=self.device,
            dtype=str(self.dtype).removeprefix("torch."),
            offline=self.notice is not None,
            notice=self.notice,
            preprocessor_weights=dict(self.preprocessor_weights_by_control),
            live_preview=self._live_preview_line(),
            controlnets=(
                f"one ControlNet Union for every control (`{self.union_ref}`)"
                if self.union_ref is not None
                else "one per control"
            ),
        )

    def _live_preview_line(self) -> str:
        if self.latent_decoder is None:
            return "off"
        how = "TAESD" if self.latent_decoder.source == "taesd" else "the VAE"
        return f"every {self.live_preview_every} steps, decoded by {how}"

    @property
    def model_facts(self) -> dict[str, int]:
        """What the loaded model can take and its own size, for fields bounded by it
        (`Field.model_limit`) or defaulting to it (`Field.model_default`)."""
        encoders = [getattr(self.base, name, None) for name in ("text_encoder", "text_encoder_2")]
        # CLIP skip applies to each of SDXL's two encoders: the shallower one bounds it.
        layers = min(e.config.num_hidden_layers for e in encoders if e is not None)
        return {"text_encoder_layers": layers, "native_size": self.family.default_size}

    def check_against_model(self, request: GenerationRequest) -> None:
        """Fields whose bounds depend on the loaded model (CLIP skip and its depth)."""
        facts = self.model_facts
        for spec in REQUEST_FIELDS:
            if spec.model_limit is not None:
                spec.narrowed(facts).validate(getattr(request, spec.attribute))

    # ---- control maps ----------------------------------------------------------------

    def control_map(self, unit) -> Any:
        """Run only the unit's preprocessor (cached by image hash, type and settings)."""
        from .images import image_sha256, to_rgb

        image = to_rgb(unit.image)
        key = (image_sha256(image), unit.control_type, unit.resolution, unit.params)
        cached = self._map_cache.get(key)
        if cached is not None:
            return cached
        # One map at a time, whoever asks (a preview, or any waiting request): a pose map
        # can take a second and most of a gigabyte, so this bounds the whole server's.
        make = self._make_map
        if self._map_on_gpu is not None and self.preprocessor_weights(unit) != "none":
            make = self._map_on_gpu  # a detector with weights runs on the GPU; canny does not
        with self._preprocess_lock:
            control_map = make(unit.control_type, image, unit.resolution, unit.param_dict)
        self._map_cache.put(key, control_map)
        return control_map

    def _make_map(self, control_type: str, image, resolution: int, params) -> Any:
        from . import controls

        return controls.make_map(control_type, image, resolution, params, device=self.device)

    # ---- generation ------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview: PreviewCallback | None = None,
    ) -> GenerationResult:
        """Run one request. Raises StencilError subclasses for anything the user can fix.
        `preview(images, step, steps)` gets the request's images as they are, every
        `live_preview_every` steps, when the engine makes previews."""
        started = time.perf_counter()
        cancel = cancel or CancelToken()
        self.check_against_model(request)
        seed = request.seed if request.seed is not None else random_seed()
        seeds = tuple(seed + index for index in range(request.num_images))
        prompt, loras = self._split_lora_tags(request)
        width, height = self._output_size(request)
        maps = self._control_maps(request.controls, cancel)
        warnings = self._prompt_warnings(prompt, request.negative_prompt)
        warnings += [
            note
            for position, (unit, control_map) in enumerate(zip(request.controls, maps), 1)
            if (note := empty_map_note(unit, control_map, position))
        ]
        work = _Work(request, prompt, loras, seeds, width, height, maps)
        job = Job(
            session=request.session_id,
            samples=len(seeds),
            adapter_key=work.adapter_key(self),
            batch_key=work.batch_key(self),
            payload=work,
            cancel=cancel,
            progress=progress,
            preview=preview,
        )
        images, applied_loras = self.scheduler.run(job)
        resolved = {"prompt": prompt, "seed": seed, "width": width, "height": height}
        recipe = self._recipe(request, resolved, applied_loras)
        return GenerationResult(
            images=tuple(images),
            seeds=seeds,
            control_maps=maps,
            recipe=recipe,
            warnings=tuple(warnings),
            seconds=time.perf_counter() - started,
        )

    def _control_maps(self, units, cancel: CancelToken) -> tuple:
        """Each unit's map, checking Stop before each: preprocessing can take seconds."""
        maps = []
        for position, unit in enumerate(units, 1):
            if cancel.cancelled:
                raise GenerationCancelled(f"stopped before making control map {position}")
            maps.append(self.control_map(unit))
        return tuple(maps)

    # ---- adapter sets, for a router that sends each set where it is loaded (Ray Serve)

    def prepare_adapters(
        self, loras, session_id: str | None = None, controlnet_refs=()
    ) -> tuple[str, ...]:
        """Load these ControlNets, and these LoRAs' files into the shared model, now;
        returns the files' hashes (for `release_adapters`)."""
        for ref in controlnet_refs:
            self.controlnet(ref)
        if self.loras is None or not loras:
            return ()
        with self._lock:
            return self.loras.preload(self.base, loras, session_id=session_id)

    def release_adapters(self, sha256s) -> None:
        """Free the adapters of these files (a set the router no longer sends here)."""
        if self.loras is not None:
            with self._lock:
                self.loras.release(self.base, sha256s)

    @property
    def adapter_loads(self) -> int:
        return self.loras.adapter_loads if self.loras is not None else 0

    def _split_lora_tags(self, request: GenerationRequest):
        if self.loras is None:
            return request.prompt, request.loras
        return self.loras.request_choices(
            request.prompt, request.loras, session_id=request.session_id
        )

    def _activate_loras(self, loras, session_id: str | None) -> list[dict]:
        if self.loras is None:
            if loras:
                raise InvalidRequestError("loras", [c.name for c in loras], "no LoRA library")
            return []
        return self.loras.activate(self.base, loras, session_id=session_id)

    def _output_size(self, request: GenerationRequest) -> tuple[int, int]:
        """The request's size if given, else the first control image's aspect at the
        family's size (checked before any preprocessing), else the family's square."""
        from .images import to_rgb

        default = self.family.default_size
        if request.width and request.height:
            return request.width, request.height
        if request.controls:
            upright = to_rgb(request.controls[0].image)
            width, height = size_like(*upright.size, long_side=default)
        else:
            width = height = default
        return request.width or width, request.height or height

    def _prompt_warnings(self, prompt: str, negative: str) -> list[str]:
        # Callers' threads count tokens while the worker encodes prompts. A tokenizer call
        # sets its truncation and padding state first, so sharing the pipeline's would let
        # this count switch off the worker's padding mid-call: the length check has its own.
        with self._counting_lock:
            if self._counting_tokenizers is None:
                self._counting_tokenizers = [
                    (label, copy.deepcopy(tokenizer))
                    for label, tokenizer in _text_tokenizers(self.base)
                ]
            return _too_long_warnings(self._counting_tokenizers, prompt, negative)

    # ---- the scheduler's worker ------------------------------------------------------

    def _compose(self, request: GenerationRequest, maps):
        """A pipeline view over the shared weights with this request's own scheduler.

        Views are kept per ControlNet set (a view holds no weights of its own, only
        references to the shared modules), so a request builds only its noise scheduler:
        building the view each time was most of the engine's per-request overhead."""
        refs = tuple(map(self.controlnet_ref, request.controls))
        pipe = self._views.get(refs)
        if pipe is None:
            pipe = self._view(refs)
            self._views[refs] = pipe
        pipe.scheduler = get_scheduler_spec(request.scheduler).build(self.base.scheduler.config)
        return pipe

    def _view(self, refs: tuple[str, ...]):
        # from_pipe casts every module to `torch_dtype`, float32 unless told: the modules
        # are the shared ones, so without this the first view would convert the whole model.
        shared = {"torch_dtype": self.dtype}
        with _quiet_diffusers():
            if not refs:
                pipe = type(self.base).from_pipe(self.base, **shared)
            elif self.union_ref is not None:
                # The one union model once per unit: one set of weights, a pass per unit.
                nets = WindowedMultiControlNetUnion([self.controlnet(self.union_ref)] * len(refs))
                pipe = self.family.pipeline_class("controlnet_union").from_pipe(
                    self.base, controlnet=nets, **shared
                )
            else:
                nets = [self.controlnet(ref) for ref in refs]
                pipe = self.family.pipeline_class("controlnet").from_pipe(
                    self.base, controlnet=WindowedMultiControlNet(nets), **shared
                )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _run_batch(self, jobs) -> list[tuple[list, list[dict]]]:
        """The scheduler's worker runs this: the jobs share everything but their prompts,
        seeds and control images (one `batch_key`), so one LoRA set and one view serve all."""
        works = [job.payload for job in jobs]
        if self._run_on_gpu is None:
            return self._run_works(works, self._pass_watch(jobs))
        # Stop and step progress stay here: a slot may run the pass in another process,
        # where this process's tokens and callbacks cannot follow.
        self._watch = self._pass_watch(jobs)
        try:
            return self._run_on_gpu(works)
        finally:
            self._watch = None

    def _pass_watch(self, jobs) -> _PassWatch:
        return _PassWatch(jobs, self.latent_decoder, self.live_preview_every)

    def _run_works(self, works, watch: _PassWatch | None = None) -> list[tuple[list, list]]:
        """Each work's images and the LoRAs applied, from plain values (see `gpu_slot`)."""
        watch = watch or self._watch
        if watch is not None and not watch.here():
            watch = None
        lead = works[0]
        with self._lock:
            applied_loras = self._activate_loras(lead.loras, lead.request.session_id)
            pipe = self._compose(lead.request, lead.maps)
            samples = [(work, index) for work in works for index in range(len(work.seeds))]
            images = iter(self._run(pipe, works, samples, watch))
        return [([next(images) for _ in work.seeds], applied_loras) for work in works]

    def _negative_prompts(self, members) -> list[str] | None:
        negatives = [work.request.negative_prompt for work in members]
        if self._zeroes_empty_negatives and not any(negatives):
            return None  # as a plain SDXL call without one: zeros (batch_key keeps them apart)
        return negatives

    @property
    def _zeroes_empty_negatives(self) -> bool:
        return self._architecture.get("empty_negative") == "zeros"

    @property
    def _architecture(self) -> dict[str, str]:
        return ARCHITECTURES[self.family.architecture]

    def _union_modes(self, request) -> list[int]:
        from .controls import union_mode

        return [union_mode(unit.control_type, unit.param_dict) for unit in request.controls]

    def gpu_seconds(self, works) -> int:
        """A generous bound on a batch's GPU time, for a slot that must say it up front:
        SD 1.5 at 512x512 runs ~20 steps/s on an A100-class GPU, a padded pass costs its
        whole `batch_size`, and each ControlNet adds about half a UNet pass."""
        lead = works[0]
        size = self.scheduler.rules.batch_size
        samples = sum(len(work.seeds) for work in works)
        passes = -(-samples // size)
        pixels = lead.width * lead.height / (512 * 512)
        work = lead.request.steps * passes * size * pixels * (1 + 0.5 * len(lead.maps))
        return int(min(300, max(20, 15 + work * 0.1)))

    def _run(self, pipe, works, samples, watch: _PassWatch | None) -> list:
        """Every forward pass has `batch_size` samples: places no work fills are padded with
        a copy of the pass's first sample, so that what a sample gets (kernels pick their
        reduction order by shape) never depends on who else is in the pass."""
        import torch

        size = self.scheduler.rules.batch_size
        chunks = [samples[start : start + size] for start in range(0, len(samples), size)]
        lead = works[0]
        steps = lead.request.steps
        shared = pipeline_arguments(lead.request, lead.maps)  # the same for every member
        images: list = []
        for number, chunk in enumerate(chunks):
            padded = chunk + [chunk[0]] * (size - len(chunk))
            members = [work for work, _ in padded]
            works_maps = [work.maps for work in members]

            def on_step_end(
                pipeline, step: int, timestep, callback_kwargs, number=number, chunk=chunk
            ):
                if watch is not None:
                    watch.after_step(number * steps + step + 1, steps * len(chunks), steps)
                    if watch.wants_preview(step + 1, steps):
                        watch.show(chunk, callback_kwargs["latents"], step + 1, steps)
                return callback_kwargs

            options = dict(shared)
            options.update(
                prompt=[work.prompt for work in members],
                negative_prompt=self._negative_prompts(members),
                width=lead.width,
                height=lead.height,
                num_images_per_prompt=1,
                # One CPU generator per sample: image i is reproducible alone with seed + i.
                generator=[
                    torch.Generator(device="cpu").manual_seed(work.seeds[index])
                    for work, index in padded
                ],
                callback_on_step_end=on_step_end,
                **size_conditioning(self.family.architecture, lead.width, lead.height),
            )
            per_unit = [list(unit_maps) for unit_maps in zip(*works_maps)]
            if lead.maps and self.union_ref is not None:
                # The union pipeline's form: per unit, its map for each sample, and its mode.
                del options["image"]
                options["control_image"] = per_unit
                options["control_mode"] = self._union_modes(lead.request)
            elif lead.maps and self._architecture["batched_maps"] == "tensor-per-unit":
                to_tensor = pipe.control_image_processor.preprocess
                options["image"] = [
                    to_tensor(maps, height=lead.height, width=lead.width) for maps in per_unit
                ]
            elif lead.maps:
                options["image"] = [list(work.maps) for work in members]
            with torch.inference_mode(), _clip_skip_reachable(pipe, options.get("clip_skip")):
                images += pipe(**options).images[: len(chunk)]
        return images

    def _recipe(self, request, resolved, applied_loras) -> Recipe:
        from .recipe import build_recipe

        return build_recipe(
            request=request,
            resolved=resolved,
            family=self.family,
            base_revision=self.base_revision,
            loras=applied_loras,
            controlnets=[
                (ref, self._controlnet_revisions.get(ref))
                for ref in map(self.controlnet_ref, request.controls)
            ],
            preprocessor_weights=[self.preprocessor_weights(unit) for unit in request.controls],
            samples_per_pass=self.scheduler.rules.batch_size,
            union_modes=self._union_modes(request) if self.union_ref is not None else None,
            vae=self.vae_source,
        )

    def preprocessor_weights(self, unit) -> str:
        return self.preprocessor_weights_by_control[unit.control_type]


class _PassWatch:
    """A running pass's Stop, progress and previews, for its jobs: the pass stops early
    only once every member has stopped, each member is told each step, and one that asked
    for previews sees its own samples every `every` steps."""

    def __init__(self, jobs, decoder=None, every: int = 0):
        self.jobs = jobs
        self.pid = os.getpid()
        self.decoder = decoder
        self.every = every

    def here(self) -> bool:
        """False in a process forked from this one, whose copies of the jobs hear nothing."""
        return os.getpid() == self.pid

    def after_step(self, done: int, total: int, steps: int) -> None:
        if all(job.stopped for job in self.jobs):
            step = (done - 1) % steps + 1
            raise GenerationCancelled(f"stopped after step {step} of {steps}")
        for job in self.jobs:
            job.report(done, total, "denoising")

    def wants_preview(self, step: int, steps: int) -> bool:
        """Every `every` steps but the last (the result itself follows at once)."""
        if self.decoder is None or not self.every or step % self.every or step >= steps:
            return False
        return any(job.preview is not None and not job.stopped for job in self.jobs)

    def show(self, chunk, latents, step: int, steps: int) -> None:
        """Decode the pass's real samples (not its padding) and hand each job its own."""
        images = self.decoder.decode(latents[: len(chunk)])
        for job in self.jobs:
            own = [image for (work, _), image in zip(chunk, images) if work is job.payload]
            if own:
                job.show_preview(own, step, steps)


@dataclass(frozen=True)
class _Work:
    """A request as the worker runs it: checked, its LoRA tags split off, its maps made."""

    request: GenerationRequest
    prompt: str
    loras: tuple
    seeds: tuple[int, ...]
    width: int
    height: int
    maps: tuple

    def adapter_key(self, engine: Engine) -> tuple:
        """What must be on the model for this request: its LoRA set and ControlNets."""
        chosen = tuple(sorted((choice.name, float(choice.weight)) for choice in self.loras))
        return chosen, tuple(map(engine.controlnet_ref, self.request.controls))

    def batch_key(self, engine: Engine) -> tuple | None:
        """Equal for requests one forward pass can serve: everything but prompts, seeds and
        control images. An uploaded or Hub LoRA is its session's, so its requests batch only
        with their own session's (the pass activates the set as the first job's session)."""
        if engine.scheduler.rules.batch_size <= 1:
            return None
        shared = pipeline_arguments(self.request, self.maps)
        for per_sample in ("prompt", "negative_prompt", "image"):
            shared.pop(per_sample, None)
        private = any(choice.name.startswith(SESSION_PREFIXES) for choice in self.loras)
        return (
            self.adapter_key(engine),
            self.request.session_id if private else None,
            self.request.scheduler,
            self.width,
            self.height,
            tuple(sorted((key, _hashable(value)) for key, value in shared.items())),
            # Where an empty negative prompt means zeros, it cannot share a pass with text.
            engine._zeroes_empty_negatives and not self.request.negative_prompt,
        )


def _text_tokenizers(pipe) -> list[tuple[str, Any]]:
    """Each text encoder's tokenizer, by what a warning calls that encoder."""
    second = getattr(pipe, "tokenizer_2", None)
    if second is None:
        return [("the model", pipe.tokenizer)]
    return [("the first text encoder", pipe.tokenizer), ("the second text encoder", second)]


def _too_long_warnings(tokenizers, prompt: str, negative: str) -> list[str]:
    """A warning per text longer than the text encoders read, naming what they ignore;
    per encoder only where SDXL's two would read it differently."""
    warnings = []
    for label, text in (("prompt", prompt), ("negative prompt", negative)):
        readings = {}
        for encoder, tokenizer in tokenizers:
            limit = tokenizer.model_max_length - 2  # start and end tokens take two places
            ids = tokenizer(text, truncation=False, add_special_tokens=False).input_ids
            if len(ids) > limit:
                dropped = tokenizer.decode(ids[limit:]).strip()
                readings[encoder] = (len(ids), limit, dropped)
        if len(set(readings.values())) == 1 and len(readings) == len(tokenizers):
            readings = {"the model": next(iter(readings.values()))}
        for reader, (count, limit, dropped) in readings.items():
            warnings.append(
                f"The {label} is {count} tokens; {reader} reads the first {limit}. "
                f"Ignored: “{dropped[:120]}”"
            )
    return warnings


def _hashable(value: Any) -> Any:
    return tuple(map(_hashable, value)) if isinstance(value, (list, tuple)) else value


def pipeline_arguments(request: GenerationRequest, maps) -> dict[str, Any]:
    """The pipeline keywords that come straight from declared fields (`Field.pipeline_arg`):
    steps, guidance, negative prompt, CLIP skip, and per unit its scale and window."""
    options = {
        spec.pipeline_arg: spec.pipeline_value(getattr(request, spec.attribute))
        for spec in REQUEST_FIELDS
        if spec.pipeline_arg
    }
    if maps:
        options["image"] = list(maps)
        for spec in unit_fields():
            if spec.pipeline_arg:
                options[spec.pipeline_arg] = [
                    spec.pipeline_value(getattr(unit, spec.attribute)) for unit in request.controls
                ]
    return options


MAX_ASPECT = 4.0


def size_like(width: int, height: int, *, long_side: int, multiple: int = 8) -> tuple[int, int]:
    """The control image's aspect at the family's size: the long side becomes `long_side`
    (up or down), each side a multiple of `multiple`."""
    long, short = max(width, height), min(width, height)
    if short < 1 or long > short * MAX_ASPECT:
        raise ImageError(
            f"the control image is {width}x{height} pixels (aspect ratio "
            f"{long / max(short, 1):.1f}:1); Stencil generates shapes up to "
            f"{MAX_ASPECT:g}:1, so crop it or set width and height"
        )
    scale = long_side / long
    return tuple(
        max(multiple, round(side * scale / multiple) * multiple) for side in (width, height)
    )


@contextmanager
def _clip_skip_reachable(pipe, clip_skip: int | None):
    """diffusers' `clip_skip` applies `text_encoder.text_model.final_layer_norm`, but
    transformers 5 flattened CLIPTextModel: its final norm sits on the model itself. For the
    call only (under the engine's lock), an unregistered alias (no submodule, no state-dict
    entry) lets that code path run; it is removed after, because LoRA key mapping asks
    whether `text_model` exists."""
    aliased = []
    if clip_skip is not None:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None and not hasattr(encoder, "text_model"):
                object.__setattr__(encoder, "text_model", encoder)
                aliased.append(encoder)
    try:
        yield
    finally:
        for encoder in aliased:
            object.__delattr__(encoder, "text_model")


@contextmanager
def _quiet_diffusers():
    """from_pipe re-casts shared modules and logs a float32 hint for each: noise, not news."""
    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(previous)


def _torch():
    import torch

    return torch


def _diffusers():
    import diffusers

    return diffusers
