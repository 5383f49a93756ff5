"""The adapters on the shared model: one interface, two strategies.

One shared model serves every request, so adapter state is shared too. An `AdapterStore`
keeps track of what is loaded into the model and `activate` makes exactly the requested set
active with the requested weights on every component, or none at all, so that "no LoRA"
gives the base model's output bit for bit. If anything fails, the set active before is
restored. The caller (the engine) holds its lock around `bind` and `activate`.

- `NamedAdapters` loads each file once under its own adapter name and evicts the least
  recently used by count and by a byte budget. It lists the model's LoRA layers once per
  load or eviction (`LoraLayerIndex`), so a warm switch sets the active set and scales on
  the layers of the old and the new adapters only, as `set_adapters` would, without
  walking every module of every component.
- `HotswapSlots` keeps a fixed set of slots, padded to one rank on every attention layer, and
  swaps files into them (`hotswap=True`); weights are filled into tensor scalings in place.
  A `torch.compile`d UNet then keeps its one graph. Every slot is always computed, so a
  slot outside the request's set is emptied (its weights zeroed in place): it then adds
  exactly 0, whatever file it held.

`build_adapter_store` is the one place that chooses between them.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import InvalidRequestError, LoraRejectedError
from .lora_files import (
    MiB,
    ModelSignature,
    partial_exact_lora,
    read_safetensors,
    verify_loaded_scales,
)
from .lora_sources import PreparedLora

logger = logging.getLogger(__name__)

ActiveSet = tuple[tuple[str, float], ...]  # (adapter name, weight), in summing order
WeightedLora = tuple[PreparedLora, float]

# peft matches adapter names as substrings of parameter names; fixed-width names keep one
# adapter's name from ever being part of another's.
SLOT_NAMES = tuple(f"stencil_slot_{letter}" for letter in "abcdefghijklmnop")


def build_adapter_store(
    *,
    max_loaded: int = 16,
    memory_budget_bytes: int = 512 * MiB,
    hotswap_rank: int | None = None,
    hotswap_slots: int = 2,
) -> AdapterStore:
    """Hotswap slots when a rank is given (for a compiled UNet), else named adapters.

    Both strategies' settings are checked either way, so a bad setting fails at start-up
    even while the other strategy is in use.
    """
    NamedAdapters.check_settings(max_loaded)
    HotswapSlots.check_settings(hotswap_rank, hotswap_slots)
    if hotswap_rank is None:
        return NamedAdapters(max_loaded=max_loaded, memory_budget_bytes=memory_budget_bytes)
    return HotswapSlots(rank=hotswap_rank, slots=hotswap_slots)


def unwrapped_unet(pipe: Any) -> Any:
    """The pipeline's UNet; a torch.compile'd UNet wraps it and is still the same model."""
    return getattr(pipe.unet, "_orig_mod", pipe.unet)


def live_adapters(pipe: Any) -> set[str]:
    return {a for names in pipe.get_list_adapters().values() for a in names}


class AdapterStore(ABC):
    """The adapters loaded into one bound pipeline, and which of them are active."""

    # Whether adapters change without a torch.compile'd UNet recompiling.
    keeps_compiled_graph: ClassVar[bool] = False

    def __init__(self) -> None:
        self._bound_unet: Any = None
        self._signature: ModelSignature | None = None
        self._active: ActiveSet | None = ()  # None: unknown, re-apply
        # Files put into the model so far (loads or swaps): what routing by adapter set saves.
        self.loads = 0

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many adapters can be active at once."""

    @abstractmethod
    def loaded(self) -> list[str]:
        """Labels of the adapters in memory, least recently used first (for tests, benches)."""

    def is_bound_to(self, pipe: Any) -> bool:
        return self._bound_unet is unwrapped_unet(pipe)

    def bind(self, pipe: Any, signature: ModelSignature) -> None:
        """Start over on `pipe`, whose layers `signature` describes; forgets the old model's
        adapters. Call before compiling: a strategy may add layers."""
        self._signature = signature
        self._active = None  # unknown until the first activation applies a set
        self._bound_unet = unwrapped_unet(pipe)
        self._start_over(pipe)

    def activate(self, pipe: Any, weighted: Sequence[WeightedLora]) -> ActiveSet:
        """Make exactly these files active at these weights (none: LoRA off); returns the
        adapters applied. On failure the previously active set is restored."""
        prepared = [item for item, _ in weighted]
        previous, snapshot = self._active, self._snapshot()
        try:
            self._check_capacity(prepared)
            adapters = self._place(pipe, prepared)
            # peft sums adapters in list order and float sums depend on order, so the list
            # follows the files' hashes: neither the request's order nor the load history
            # (which decides the internal adapter names) can change the image.
            by_file = sorted(
                zip(prepared, adapters, (w for _, w in weighted)), key=lambda t: t[0].sha256
            )
            target = tuple((adapter, weight) for _, adapter, weight in by_file)
            self._apply(pipe, target)
        except BaseException:
            self._restore(pipe, previous, snapshot)
            raise
        return target

    # ---- what each strategy decides

    @abstractmethod
    def _start_over(self, pipe: Any) -> None:
        """Forget every adapter of the previously bound model and set up on `pipe`."""

    @abstractmethod
    def _check_can_hold(self, prepared: Sequence[PreparedLora]) -> None:
        """Refuse, before the model changes, a set this strategy cannot hold."""

    @abstractmethod
    def _place(self, pipe: Any, prepared: Sequence[PreparedLora]) -> list[str]:
        """Get every file into the model; returns each one's adapter name."""

    @abstractmethod
    def _apply_weights(self, pipe: Any, target: ActiveSet) -> None:
        """Make exactly `target` active (empty: the base model's output)."""

    def release(self, pipe: Any, sha256s: Collection[str]) -> None:
        """Free these files' adapters now, rather than when the LRU bounds would (a Ray
        replica's evicted adapter set). A strategy with fixed room has nothing to free."""
        return None

    def _snapshot(self) -> Any:
        """What `_restorable` needs to know of the state before an activation."""
        return None

    def _restorable(self, pipe: Any, snapshot: Any) -> set[str]:
        """Adapter names that may get back the weight they had before a failed activation."""
        return live_adapters(pipe)

    # ---- shared steps

    def _check_capacity(self, prepared: Sequence[PreparedLora]) -> None:
        if len(prepared) > self.capacity:
            raise InvalidRequestError(
                "loras",
                [p.entry.name for p in prepared],
                f"at most {self.capacity} LoRAs can be active at once",
            )
        self._check_can_hold(prepared)

    def _apply(self, pipe: Any, target: ActiveSet) -> None:
        # Already active with these weights: nothing to do (the cheap path a switch-heavy
        # workload takes).
        if target == self._active:
            return
        self._apply_weights(pipe, target)
        self._active = target

    def _restore(self, pipe: Any, previous: ActiveSet | None, snapshot: Any) -> None:
        """Re-apply the set active before a failed activation, minus what is gone since."""
        if previous is None or previous == self._active:
            return
        restorable = self._restorable(pipe, snapshot)
        self._active = None
        try:
            self._apply(pipe, tuple((a, w) for a, w in previous if a in restorable))
        except Exception:  # the original error is the one worth reporting
            logger.exception("could not restore the previous LoRA set")

    def _param_bytes(self, prepared: PreparedLora) -> int:
        dtype_bytes = self._signature.dtype_bytes if self._signature else 4
        return prepared.report.param_count * dtype_bytes


# --------------------------------------------------------------------------------------
# Named adapters: every file under its own name, least recently used evicted


@dataclass(frozen=True)
class LoadedAdapter:
    adapter: str
    label: str  # the name it was loaded as
    param_bytes: int


class NamedAdapters(AdapterStore):
    """Each file loaded once under its own adapter name, kept until the LRU bounds evict it
    (never one of the set being activated)."""

    def __init__(self, *, max_loaded: int = 16, memory_budget_bytes: int = 512 * MiB):
        super().__init__()
        self.check_settings(max_loaded)
        self.max_loaded = max_loaded
        self.memory_budget_bytes = memory_budget_bytes
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()  # by sha256, LRU first
        self._load_counter = 0
        # The model's LoRA layers, read again after every load or deletion (None: unread).
        self._layers: LoraLayerIndex | None = None

    @staticmethod
    def check_settings(max_loaded: int) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded} must be at least 1")

    @property
    def capacity(self) -> int:
        return self.max_loaded

    def loaded(self) -> list[str]:
        return [item.label for item in self._loaded.values()]

    def _start_over(self, pipe: Any) -> None:
        self._loaded.clear()
        self._layers = None

    def _check_can_hold(self, prepared: Sequence[PreparedLora]) -> None:
        needed = sum(self._param_bytes(p) for p in prepared)
        if needed > self.memory_budget_bytes:
            raise InvalidRequestError(
                "loras",
                [p.entry.name for p in prepared],
                f"together they need {needed / MiB:.1f} MB of adapter weights; the budget is"
                f" {self.memory_budget_bytes / MiB:.1f} MB",
            )

    def _place(self, pipe: Any, prepared: Sequence[PreparedLora]) -> list[str]:
        keep = {p.sha256 for p in prepared}
        adapters = []
        for item in prepared:
            if item.sha256 not in self._loaded:
                self._evict(pipe, self._param_bytes(item), keep)
                self._loaded[item.sha256] = self._load(pipe, item)
            self._loaded.move_to_end(item.sha256)
            adapters.append(self._loaded[item.sha256].adapter)
        return adapters

    def _apply_weights(self, pipe: Any, target: ActiveSet) -> None:
        if self._layers is None:
            self._layers = LoraLayerIndex.read(pipe)
        if not self._layers.covers(a for a, _ in target):
            _apply_through_diffusers(pipe, target)
            return
        try:
            # self._active is still the set before (None: unknown, every layer is set).
            self._layers.apply(self._active, target)
        except BaseException:
            self._active = None  # half applied: the next activation sets every layer
            raise

    def release(self, pipe: Any, sha256s: Collection[str]) -> None:
        for sha256 in [sha for sha in self._loaded if sha in sha256s]:
            _delete_adapter(pipe, self._loaded.pop(sha256).adapter)
            self._active = None
            self._layers = None

    def _load(self, pipe: Any, item: PreparedLora) -> LoadedAdapter:
        self._load_counter += 1
        self.loads += 1
        adapter = f"stencil_{self._load_counter:06d}_{item.sha256[:12]}"
        self._active = None  # loading makes the new adapter active on some components
        self._layers = None  # and wraps layers, or adds the adapter to wrapped ones
        try:
            source, options = loadable(pipe, item, self._signature)
            pipe.load_lora_weights(source, adapter_name=adapter, **options)
        except LoraRejectedError:
            _delete_adapter(pipe, adapter)
            raise
        except Exception as exc:
            _delete_adapter(pipe, adapter)
            raise LoraRejectedError(
                item.entry.name, f"it passed its checks but diffusers could not load it ({exc})"
            ) from exc
        try:
            verify_loaded_scales(pipe, adapter, item.report, name=item.entry.name)
        except LoraRejectedError:
            _delete_adapter(pipe, adapter)
            raise
        return LoadedAdapter(adapter, item.entry.name, self._param_bytes(item))

    def _evict(self, pipe: Any, incoming: int, keep: set[str]) -> None:
        while self._over_bounds(incoming):
            victim = next((sha for sha in self._loaded if sha not in keep), None)
            if victim is None:
                return
            _delete_adapter(pipe, self._loaded.pop(victim).adapter)
            self._active = None
            self._layers = None

    def _over_bounds(self, incoming: int) -> bool:
        used = sum(item.param_bytes for item in self._loaded.values())
        return len(self._loaded) + 1 > self.max_loaded or used + incoming > self.memory_budget_bytes


class LoraLayerIndex:
    """The peft LoRA layers of every LoRA-loadable component, read once, and per adapter the
    layers that carry it: a switch then touches those layers alone.

    What a layer computes depends on its active-adapter list, its disabled flag and each
    active adapter's scaling. `apply` leaves every layer as `enable_lora` + `set_adapters`
    (or, for no adapter, `disable_lora`) would, for the layers whose output can differ:

    - a layer carrying an adapter of the old or the new set gets the new set's list, in its
      order (peft sums in list order), and `set_scale(adapter, weight)`, peft's own
      computation (weight * alpha / rank), so the scalings are those set_adapters gives,
      bit for bit; with no adapter it is disabled, as `disable_lora` does;
    - any other layer carries none of the old set's adapters, so none of them was adding
      anything, and none of the new set's: it adds nothing either way and is left alone.

    The list and the flag are peft's `_active_adapter` and `_disable_adapters`, set
    directly: its `set_adapter` also sets `requires_grad` on every adapter's weights of the
    layer (training state, no part of the output: generation runs without gradients), and
    that loop is what made a switch grow with the adapters loaded. They are set with
    `object.__setattr__`: `nn.Module.__setattr__` would first look the names up among the
    layer's parameters, buffers and submodules, where they never are, then do the same,
    and that lookup was half of a switch's time. tests/test_adapter_switch.py checks that
    peft keeps its state in them and that every switch leaves every layer as set_adapters
    would.
    """

    def __init__(self, layers: Sequence[Any], usable: bool = True):
        self.usable = usable
        self.layers = tuple(layers)
        carrying: dict[str, list[Any]] = {}
        for layer in self.layers:
            for adapter in layer.scaling:
                carrying.setdefault(adapter, []).append(layer)
        self.by_adapter = {adapter: tuple(held) for adapter, held in carrying.items()}

    @classmethod
    def read(cls, pipe: Any) -> LoraLayerIndex:
        """Every LoRA layer of the pipeline's LoRA-loadable components; unusable where a
        component or a layer is not what `apply` knows how to set (diffusers then does)."""
        components = getattr(pipe, "_lora_loadable_modules", None)
        if components is None:
            return cls((), usable=False)
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers: dict[int, Any] = {}
        for component in components:
            model = getattr(pipe, component, None)
            if model is None:
                continue
            model = getattr(model, "_orig_mod", model)
            if not isinstance(model, torch.nn.Module):
                return cls((), usable=False)
            for module in model.modules():
                if not isinstance(module, BaseTunerLayer):
                    continue
                if not isinstance(module, LoraLayer) or module.merged:
                    return cls((), usable=False)  # another tuner, or fused into the weights
                layers.setdefault(id(module), module)
        return cls(list(layers.values()))

    def covers(self, adapters: Any) -> bool:
        """Whether `apply` can make these adapters active (each one's layers are known)."""
        return self.usable and all(adapter in self.by_adapter for adapter in adapters)

    def apply(self, previous: ActiveSet | None, target: ActiveSet) -> None:
        """From `previous` (None: unknown, so every layer) to exactly `target`."""
        if previous is None:
            touched: Any = self.layers
        else:
            touched = {}
            for adapter, _ in (*previous, *target):
                for layer in self.by_adapter.get(adapter, ()):
                    touched.setdefault(id(layer), layer)
            touched = touched.values()
        set_state = object.__setattr__
        if not target:
            for layer in touched:
                set_state(layer, "_disable_adapters", True)
            return
        names = [adapter for adapter, _ in target]  # one list for all, as set_adapters does
        for layer in touched:
            set_state(layer, "_active_adapter", names)
            set_state(layer, "_disable_adapters", False)
        for adapter, weight in target:
            for layer in self.by_adapter[adapter]:
                layer.set_scale(adapter, weight)


def _apply_through_diffusers(pipe: Any, target: ActiveSet) -> None:
    """`apply`'s effect by diffusers' own calls, which walk every module of every component."""
    if not target:
        pipe.disable_lora()
        return
    # Every component: set_adapters alone would leave a text encoder's earlier adapter
    # active after a UNet-only load, and disable_lora sticks until undone.
    pipe.enable_lora()
    pipe.set_adapters([a for a, _ in target], adapter_weights=[w for _, w in target])


def loadable(
    pipe: Any, item: PreparedLora, signature: ModelSignature | None
) -> tuple[Any, dict[str, Any]]:
    """What `load_lora_weights` is given: the file itself, or, for a file diffusers would
    apply wrongly or not at all (LyCORIS formats, per-module alphas, extra layers), its
    exact standard LoRA, made from the same bytes the check passed."""
    if item.report.converted_from is None:
        # use_safetensors: never fall back to unpickling
        return str(item.path.parent), {"weight_name": item.path.name, "use_safetensors": True}
    import hashlib

    from safetensors.torch import load as load_tensors

    from .lycoris_formats import convert_to_exact_lora

    data = item.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise LoraRejectedError(item.entry.name, "its file changed after it was checked")
    unet = unwrapped_unet(pipe)
    if item.report.keeps_layout_partially:
        file = read_safetensors(data, name=item.entry.name, max_bytes=len(data))
        state = partial_exact_lora(file, signature, name=item.entry.name)
    else:
        state, _ = convert_to_exact_lora(
            load_tensors(data), signature.layers, base_weight=lambda c, m: _base_weight(pipe, c, m)
        )
    like = {"device": unet.device, "dtype": unet.dtype}
    return {key: value.to(**like) for key, value in state.items()}, {}


def _base_weight(pipe: Any, component: str, module: str) -> Any:
    """A layer's own weight, under any peft wrapper (what DoRA's decomposition is of)."""
    model = getattr(pipe, component)
    layer = getattr(model, "_orig_mod", model).get_submodule(module)
    return getattr(layer, "base_layer", layer).weight.detach()


def _delete_adapter(pipe: Any, adapter: str) -> None:
    if adapter in live_adapters(pipe):
        pipe.delete_adapters([adapter])


# --------------------------------------------------------------------------------------
# Hotswap slots: a fixed set of slots, refilled in place


class HotswapSlots(AdapterStore):
    """A fixed set of `slots` adapters of rank `rank`; files are swapped into them.

    All slots are always active; a slot's weight is a tensor filled in place, so neither a
    swap nor a new weight changes what a compiled UNet traced.

    Being always active, a slot outside the request's set still runs, and a weight of 0 does
    not silence it: NaN * 0 is NaN, and in float16 a finite but large file overflows to inf
    before the weight applies (inf * 0 is NaN too). So such a slot is emptied: its LoRA
    weights and scaling are zeroed in place (shapes kept, so the compiled graph too). A zero
    down matrix makes the slot's term exactly 0 for any finite input, and x + 0 == x. The
    file is swapped in again when a request next wants it.
    """

    keeps_compiled_graph = True

    def __init__(self, *, rank: int, slots: int = 2):
        super().__init__()
        self.check_settings(rank, slots)
        self.rank = rank
        self.slot_count = slots
        self._slots: tuple[str, ...] = ()
        self._content: dict[str, str | None] = {}  # slot -> sha256 of the file in it
        self._lru: OrderedDict[str, None] = OrderedDict()  # slots, least recently used first
        self._scaling: dict[str, dict[int, float]] = {}  # slot -> id(layer) -> weight-1 scale
        self._lora_layers: list[Any] = []
        self._slot_modules: frozenset[str] = frozenset()
        self._labels: dict[str, str] = {}  # sha256 -> the name it was first loaded as

    @staticmethod
    def check_settings(rank: int | None, slots: int) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"hotswap_rank={rank} must be a positive rank")
        if not 1 <= slots <= len(SLOT_NAMES):
            raise ValueError(f"hotswap_slots={slots} must be from 1 to {len(SLOT_NAMES)}")

    @property
    def capacity(self) -> int:
        return self.slot_count

    def loaded(self) -> list[str]:
        return [self._labels.get(sha, sha[:12]) for sha in self._content.values() if sha]

    def _start_over(self, pipe: Any) -> None:
        self._slots = ()
        self._create_slots(pipe)

    def _check_can_hold(self, prepared: Sequence[PreparedLora]) -> None:
        for item in prepared:
            self._check_swappable(item)

    def _place(self, pipe: Any, prepared: Sequence[PreparedLora]) -> list[str]:
        holding = {sha: slot for slot, sha in self._content.items() if sha}
        wanted = {p.sha256 for p in prepared}
        free = [s for s in self._lru if self._content[s] not in wanted]
        missing = sorted((p for p in prepared if p.sha256 not in holding), key=lambda p: p.sha256)
        # The least recently used slots make room; within them, adapters go in hash order,
        # so adapters that arrive together sum in the same order whatever the request's order.
        # (All slots are always active and peft sums them in slot order; which slots an
        # adapter that is already loaded sits in still depends on history: ~1e-7 in float32.)
        victims = sorted(free[: len(missing)], key=self._slots.index)
        for slot, item in zip(victims, missing):
            holding[item.sha256] = slot
            self._swap_into(pipe, slot, item)
        slots = []
        for item in prepared:
            self._lru.move_to_end(holding[item.sha256])
            slots.append(holding[item.sha256])
        return slots

    def _apply_weights(self, pipe: Any, target: ActiveSet) -> None:
        weights = dict(target)
        for slot in self._slots:
            if slot not in weights:
                self._empty(slot)
        self._fill_weights(weights)

    def _snapshot(self) -> dict[str, str | None]:
        return dict(self._content)

    def _restorable(self, pipe: Any, snapshot: Mapping[str, str | None]) -> set[str]:
        # A slot refilled with another file must not get the old file's weight.
        refilled = {s for s in self._slots if self._content.get(s) != snapshot.get(s)}
        return live_adapters(pipe) - refilled

    def _check_swappable(self, item: PreparedLora) -> None:
        report, name = item.report, item.entry.name
        if set(report.targets) != {"unet"}:
            raise LoraRejectedError(
                name,
                "it has text-encoder weights, and hotswap mode (used for a compiled UNet) can"
                " only swap UNet LoRAs",
            )
        if max(report.ranks) > self.rank:
            raise LoraRejectedError(
                name, f"its rank {max(report.ranks)} is above the hotswap rank {self.rank}"
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

    def _swap_into(self, pipe: Any, slot: str, item: PreparedLora) -> None:
        self._active = None
        self.loads += 1
        # From zeros: peft leaves the scaling of a layer the new file does not target as it
        # was, and the old file's (a NaN alpha, say) must not survive under the new one.
        self._empty(slot)
        try:
            source, options = loadable(pipe, item, self._signature)
            pipe.load_lora_weights(source, adapter_name=slot, hotswap=True, **options)
            verify_loaded_scales(pipe, slot, item.report, name=item.entry.name)
        except LoraRejectedError:
            self._empty(slot)  # a swapped-in file that fails its check adds nothing
            raise
        except Exception as exc:
            # diffusers deletes the slot's adapter when a hotswap fails; the slots are
            # fixed, so start over with fresh ones rather than run with a hole.
            self._recreate_slots(pipe)
            raise LoraRejectedError(item.entry.name, f"hotswapping it failed ({exc})") from exc
        # The swap set each layer's scaling to the new adapter's alpha / rank; remember it
        # as the weight-1 scale. (peft's set_scale would use the slot's first config.)
        self._scaling[slot] = {
            id(layer): float(layer.scaling[slot])
            for layer in self._lora_layers
            if slot in layer.scaling
        }
        self._content[slot] = item.sha256
        self._labels.setdefault(item.sha256, item.entry.name)

    def _recreate_slots(self, pipe: Any) -> None:
        try:
            pipe.delete_adapters([s for s in self._slots if s in live_adapters(pipe)])
            self._slots = ()
            self._create_slots(pipe)
        except Exception:
            logger.exception("could not rebuild the hotswap slots")

    def _fill_weights(self, weights: Mapping[str, float]) -> None:
        for slot in self._slots:
            weight = weights.get(slot)
            scales = self._scaling.get(slot, {})
            for layer in self._lora_layers:
                if slot in layer.scaling:
                    # Not weight * scale for a slot outside the set: a stored scale may be NaN.
                    scale = 0.0 if weight is None else weight * scales.get(id(layer), 0.0)
                    layer.scaling[slot].fill_(scale)

    def _empty(self, slot: str) -> None:
        """Zero the slot's LoRA weights and scaling in place and forget its file.

        Done every time, not only when the slot is believed to hold a file: the guarantee
        must not rest on bookkeeping, and it costs one in-place fill per matrix."""
        _zero_adapter(self._lora_layers, slot)
        self._content[slot] = None
        self._scaling[slot] = {}

    def _create_slots(self, pipe: Any) -> None:
        """Fill every slot with an all-zero LoRA of the target rank on every attention layer.

        The slots then never change shape or target set, so a compiled UNet keeps its graph
        while adapters are swapped in (peft can only swap into layers a slot already has).
        """
        from peft.tuners.lora import LoraLayer
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        unet = unwrapped_unet(pipe)
        if getattr(unet, "peft_config", None):
            raise RuntimeError("hotswap mode needs a UNet without adapters; bind it first")
        layers = {
            name: shape
            for name, shape in self._signature.layers["unet"].items()
            if ".attentions." in name
        }
        template = _zero_lora(layers, self.rank, device=unet.device, dtype=unet.dtype)
        slots = SLOT_NAMES[: self.slot_count]
        pipe.enable_lora_hotswap(target_rank=self.rank)
        for slot in slots:
            # Fresh tensors per slot: diffusers adopts a state dict's tensors as the
            # adapter's parameters (no copy), so slots built from one dict would share
            # storage and a hotswap into one would write into all of them.
            fresh = {key: value.clone() for key, value in template.items()}
            pipe.load_lora_weights(fresh, adapter_name=slot)
        # Scalings become tensors, so changing a weight is an in-place fill, not a new
        # Python float that a compiled graph would have to guard on.
        prepare_model_for_compiled_hotswap(unet, target_rank=self.rank, check_compiled="error")
        unet.set_adapter(list(slots))
        self._slots = slots
        self._content = dict.fromkeys(slots)
        self._lru = OrderedDict.fromkeys(slots)
        self._slot_modules = frozenset(layers)
        self._lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        self._scaling = {slot: {} for slot in slots}
        self._active = None
        self._fill_weights({})


def _zero_adapter(lora_layers: Sequence[Any], adapter: str) -> None:
    """Zero every weight (and bias) of `adapter`'s LoRA matrices and its scaling, in place."""
    import torch

    with torch.no_grad():
        for layer in lora_layers:
            for matrices in (layer.lora_A, layer.lora_B):
                if adapter in matrices:
                    for parameter in matrices[adapter].parameters():
                        parameter.zero_()
            scaling = layer.scaling.get(adapter)
            if isinstance(scaling, torch.Tensor):
                scaling.zero_()


def _zero_lora(layers: Mapping[str, Any], rank: int, **like: Any) -> dict[str, Any]:
    """A UNet LoRA state dict of rank `rank` on `layers`, all zeros: it changes nothing."""
    import torch

    state: dict[str, Any] = {}
    for name, shape in layers.items():
        a_shape = (rank, shape.in_features, *(shape.kernel or ()))
        b_shape = (shape.out_features, rank, *(() if shape.kernel is None else (1, 1)))
        state[f"unet.{name}.lora_A.weight"] = torch.zeros(a_shape, **like)
        state[f"unet.{name}.lora_B.weight"] = torch.zeros(b_shape, **like)
    return state
