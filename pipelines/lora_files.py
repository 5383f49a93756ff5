"""Checks a LoRA file before any of it reaches the model.

Three stages, all before `load_lora_weights` is called:

1. `read_safetensors` checks the bytes: a safetensors header whatever the file is called
   (pickles and zip archives are named as such and never unpickled), a bounded header that
   parses, known dtypes, and every tensor's bytes inside the file and of the size its shape
   and dtype say.
2. `check_lora_values` checks the numbers: floating point, rank 1 or more, every weight
   finite and of a size float16 can carry, every alpha finite and positive, and each layer's
   update bounded (NaN, inf or huge weights otherwise give a silent black image). It needs
   no model, so an upload is checked on arrival even before a model is bound.
3. `check_lora_keys` runs stage 2 on the tensors it decodes (each is read once), then
   converts the keys with diffusers' own machinery (the same functions its loader uses, so
   kohya/A1111 files are read the way they will be loaded) and checks that every target
   layer exists in the model and that the shapes fit. A LoRA for another base model, or one
   that matches no layer, is refused: diffusers would otherwise load it as a silent no-op,
   or fail half-way through with the adapter half-injected.

The model side of stage 3 is a `ModelSignature`: the LoRA-able layers' names and shapes,
taken once from the pipeline, so that uploads can be checked without touching the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LoraRejectedError, StencilError
from .lycoris_formats import (
    CONVERTIBLE_PARAMS,
    FORMAT_NAMES,
    LayerMisfitError,
    convert_to_exact_lora,
    group_by_module,
    has_varying_scales,
    lycoris_kind,
    module_names,
)
from .model_check import without_paths

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
# A LoRA header lists a few thousand tensors (~1 MB); 50 MB leaves room and bounds the parse.
MAX_HEADER_BYTES = 50 * MiB
# The largest SD 1.5 / SDXL LoRAs (LoCon, full-rank text encoders) stay well under this.
MAX_FILE_BYTES = 2048 * MiB

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8,
}  # fmt: skip
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# The largest finite float16: CUDA runs the model in float16, where anything above is inf.
FLOAT16_MAX = 65504.0
# No LoRA weight may be larger than this: 256 * 256 = 65536, so a weight of 256 times an
# activation of 256 is already beyond float16. Trained LoRA weights stay within a few units;
# the random LoRAs shipped for the tiny model, strong on purpose, reach 21.
MAX_LORA_WEIGHT = 256.0
# Nor may a layer's update, scale * B @ A, have entries above this. Each entry is bounded
# from the two matrices alone (see `_check_update`), times max(1, scale): peft computes
# B(A x) in the model's dtype and applies the scale after, so the unscaled product must fit
# too. 64 * 4 (the largest request weight) * 256 = 65536: at the bound, one term of the
# update stays within float16 for activations up to 256. The bound cannot promise more:
# whether the rest of the network overflows depends on the layer and the input (on the
# random tiny model in float16, tiny-watercolor's feed-forward update scaled to 61 gave a
# black image, tiny-faded's attention update scaled to 152 did not). The strongest shipped
# file is at 30 (tiny-faded), trained LoRAs far lower, a file with every weight x100 in the
# tens of thousands. Refused, never clamped: a clamped LoRA is not the file its author made.
# A file within the bounds that still overflows spoils only its own request: no adapter
# outside a request's set can reach its image (see pipelines.adapters).
MAX_LORA_UPDATE = 64.0

# What peft's LoraConfig takes for lora_alpha when adapter metadata names none.
_PEFT_DEFAULT_ALPHA = 8

# Keys of adapter kinds that diffusers' SD loaders cannot apply faithfully.
_UNSUPPORTED_KEY_MARKERS = {
    "dora_scale": "DoRA weights (dora_scale), which diffusers drops with only a warning",
    "lora_magnitude_vector": "DoRA weights (lora_magnitude_vector)",
    # kohya-named LoHa, LoKr, Tucker LoCon and .diff files are converted exactly
    # (pipelines.lycoris_formats); these are the layouts that are not.
    "hada_": "LoHa weights Stencil does not convert (Tucker cores hada_t1/hada_t2, or names"
    " that are not kohya's)",
    "lokr_": "LoKr weights Stencil does not convert (a Tucker core lokr_t2, or names that are"
    " not kohya's)",
    "lora_mid": "LoCon CP-decomposition weights (lora_mid) under names that are not kohya's",
    ".diff": "full weight differences (.diff) under names that are not kohya's",
}

# Cross-attention width -> the base it belongs to; used to name the base a LoRA was made for.
# Cross-attention widths of known bases, and the article their name takes ("an SDXL").
_KNOWN_CONTEXT_WIDTHS = {
    768: "an SD 1.x",
    1024: "an SD 2.x",
    2048: "an SDXL",
    32: "a Stencil tiny (SD-shaped)",
    80: "a Stencil tiny XL (SDXL-shaped)",
}
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# A kohya/LyCORIS file naming layers this model lacks is applied without them when more
# than this share of its layers exist here and fit (extracted, merged or pruned files name
# a few extra layers). Fewer means it was made for another network: SD 2.x files share SD
# 1.x's names but not its shapes (refused on shape), SDXL ones mostly name other blocks.
MIN_MATCHED_FRACTION = 0.5
# `converted_from` of a file loaded as the part of it this model has, in its own layout.
PARTIAL_SUFFIX = "-partial"
# What the verdict calls each layout diffusers loads as is.
LAYOUT_NAMES = {
    "peft": "diffusers/peft LoRA",
    "diffusers-old": "old diffusers LoRA",
    "kohya": "kohya LoRA",
}
_SGM_BLOCKS = ("_input_blocks_", "_output_blocks_", "_middle_block_")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsFile:
    """A checked safetensors file: its bytes, hash and header."""

    data: bytes
    sha256: str
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]

    @property
    def size_bytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class LayerShape:
    """What a LoRA on this layer must fit: a Linear (kernel None) or a Conv2d."""

    in_features: int
    out_features: int
    kernel: tuple[int, int] | None = None


@dataclass(frozen=True)
class ModelSignature:
    """The LoRA-able layers of a pipeline, by component, and what names the base model."""

    pipeline_class: type
    layers: Mapping[str, Mapping[str, LayerShape]]
    cross_attention_dim: int | None
    text_hidden_size: int | None
    # Text encoders that still wrap `text_model` (transformers 5 flattened CLIPTextModel, not
    # CLIPTextModelWithProjection, SDXL's second): their LoRA keys keep that level.
    text_encoders_with_text_model: frozenset[str]
    dtype_bytes: int = 4
    unet_config: Any = None

    @classmethod
    def from_pipeline(cls, pipe: Any) -> ModelSignature:
        import torch

        components = getattr(pipe, "_lora_loadable_modules", ["unet", "text_encoder"])
        layers: dict[str, dict[str, LayerShape]] = {}
        for component in components:
            model = getattr(pipe, component, None)
            if model is not None:
                layers[component] = _lora_able_layers(model)
        unet = pipe.unet
        text_encoder = getattr(pipe, "text_encoder", None)
        text_config = getattr(text_encoder, "config", None)
        dtype = getattr(unet, "dtype", torch.float32)
        return cls(
            pipeline_class=type(pipe),
            layers=layers,
            cross_attention_dim=_as_int(unet.config.get("cross_attention_dim")),
            text_hidden_size=_as_int(getattr(text_config, "hidden_size", None)),
            text_encoders_with_text_model=frozenset(
                name
                for name in layers
                if name.startswith("text_encoder") and hasattr(getattr(pipe, name), "text_model")
            ),
            dtype_bytes=torch.empty((), dtype=dtype).element_size(),
            unet_config=unet.config,
        )


@dataclass(frozen=True)
class LoraFileReport:
    """What a LoRA file holds, once it has passed every check."""

    sha256: str
    size_bytes: int
    layout: str  # "peft" (diffusers/peft lora_A/lora_B), "diffusers-old" or "kohya"
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    targets: tuple[str, ...]  # components with weights: "unet", "text_encoder", ...
    modules: Mapping[str, frozenset[str]] = field(default_factory=dict)
    param_count: int = 0
    has_adapter_metadata: bool = False
    # Whether peft builds this adapter's config without per-layer alpha overrides and with
    # default dropout/rslora/dora; hotswap can only swap such adapters into a slot.
    hotswap_compatible_config: bool = True
    # The file's format when it is not what diffusers loads as is: it is then converted to
    # an exact standard LoRA (pipelines.lycoris_formats) before loading.
    converted_from: str | None = None
    # kohya names of the layers the file has and this model lacks: left out, and said so.
    skipped_layers: tuple[str, ...] = ()
    # Layers whose change is carried whole (against an identity): exact, but as large as
    # the layer itself.
    full_size_layers: int = 0
    # The scale peft must give each layer (component -> module -> alpha / rank); checked
    # after every load (`verify_loaded_scales`).
    module_scales: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def keeps_layout_partially(self) -> bool:
        """A diffusers/peft/kohya file loaded as the layers that exist (`partial_exact_lora`),
        not converted from another format."""
        return self.converted_from == f"{self.layout}{PARTIAL_SUFFIX}"

    @property
    def format_name(self) -> str:
        if self.converted_from is None or self.keeps_layout_partially:
            return LAYOUT_NAMES.get(self.layout, self.layout)
        return FORMAT_NAMES.get(self.converted_from, self.converted_from)

    def describe(self) -> dict[str, Any]:
        scales = {s for per_module in self.module_scales.values() for s in per_module.values()}
        return {
            "layout": self.layout,
            "format": self.format_name,
            "ranks": list(self.ranks),
            "alphas": list(self.alphas),
            "alpha_handling": self._alpha_handling(scales),
            "targets": list(self.targets),
            "layers": sum(len(names) for names in self.modules.values()),
            "skipped_layers": list(self.skipped_layers),
            "verdict": self.verdict(),
            "exact": True,  # every accepted file is applied exactly (or refused)
            "full_size_layers": self.full_size_layers,
            # Hotswap (a compiled UNet) swaps UNet attention layers of one config; the rank
            # must also fit the slots' (see pipelines.adapters.HotswapSlots).
            "hotswap_compatible": self.hotswap_compatible_config
            and self.targets == ("unet",)
            and all(".attentions." in m for m in self.modules.get("unet", ())),
        }

    def verdict(self) -> str:
        """One line for users: what the file is and how it will be applied."""
        layers = sum(len(names) for names in self.modules.values())
        ranks = "-".join(str(r) for r in sorted({self.ranks[0], self.ranks[-1]}))
        text = f"{self.format_name}, rank {ranks}, {layers} layers on {', '.join(self.targets)}"
        text += "; applied exactly"
        if self.converted_from is not None:
            text += " (converted to a standard LoRA)"
        if self.full_size_layers:
            text += f"; {self.full_size_layers} layers carried at full size"
        if self.skipped_layers:
            text += f"; {len(self.skipped_layers)} layers this model lacks are skipped"
        return text

    def _alpha_handling(self, scales: set[float]) -> str:
        if self.converted_from is not None:
            return "alpha / rank folded into each layer's up matrix (exact, scale 1 loaded)"
        if len(scales) <= 1:
            return f"one scale for every layer ({next(iter(scales), 1.0):g})"
        return "per-layer scales from the adapter metadata"


# --------------------------------------------------------------------------------------
# Stage 1: the bytes


def read_lora_file(path: Path, *, name: str, max_bytes: int = MAX_FILE_BYTES) -> SafetensorsFile:
    """Read and check a file; the size is checked before a byte of it is read."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LoraRejectedError(name, f"its file cannot be read ({exc.strerror})") from exc
    _check_size(name, size, max_bytes)
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    return read_safetensors(data, name=name, max_bytes=max_bytes)


def read_safetensors(
    data: bytes,
    *,
    name: str,
    max_bytes: int = MAX_FILE_BYTES,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> SafetensorsFile:
    """Check that `data` is a well-formed safetensors file, judged by its bytes alone."""
    _check_size(name, len(data), max_bytes)
    _refuse_other_formats(name, data)
    if len(data) < 8:
        raise LoraRejectedError(name, f"the file is truncated ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > max_header_bytes:
        raise LoraRejectedError(
            name,
            f"its safetensors header claims {header_len} bytes, above the"
            f" {max_header_bytes // MiB} MB limit (corrupt or not a safetensors file)",
        )
    if 8 + header_len > len(data):
        raise LoraRejectedError(
            name,
            f"the file is truncated: the header needs {header_len} bytes but only"
            f" {len(data) - 8} follow",
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraRejectedError(name, f"its safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise LoraRejectedError(name, "its safetensors header is not a JSON object")
    metadata = _check_metadata(name, header.pop("__metadata__", {}))
    tensors = {key: _check_tensor_entry(name, key, entry) for key, entry in header.items()}
    _check_layout(name, tensors, len(data) - 8 - header_len)
    return SafetensorsFile(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        tensors=tensors,
        metadata=metadata,
    )


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise LoraRejectedError(
            name, f"the file is {size / MiB:.1f} MB, above the {max_bytes / MiB:.0f} MB limit"
        )
    if size == 0:
        raise LoraRejectedError(name, "the file is empty")


def _refuse_other_formats(name: str, data: bytes) -> None:
    # torch.save writes a zip archive (since 1.6) or, before that, a bare pickle; both can
    # run code when loaded, so they are named and refused rather than "tried".
    if data[:4] == b"PK\x03\x04":
        raise LoraRejectedError(
            name,
            "it is a zip archive (a PyTorch checkpoint saved with torch.save), not a"
            " safetensors file; only .safetensors LoRAs are accepted",
        )
    if data[:1] == b"\x80" and data[1:2] in {bytes([v]) for v in range(2, 6)}:
        raise LoraRejectedError(
            name,
            "it is a Python pickle, not a safetensors file; pickles can run code and are"
            " never loaded",
        )


def _check_metadata(name: str, metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise LoraRejectedError(name, "its __metadata__ must map text keys to text values")
    return metadata


def _check_tensor_entry(name: str, key: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise LoraRejectedError(name, f"tensor {key!r} has a malformed header entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise LoraRejectedError(name, f"tensor {key!r} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise LoraRejectedError(name, f"tensor {key!r} has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(v) for v in offsets)
        or offsets[0] > offsets[1]
    ):
        raise LoraRejectedError(name, f"tensor {key!r} has malformed data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise LoraRejectedError(
            name,
            f"tensor {key!r} ({dtype}, shape {tuple(shape)}) needs {expected} bytes but its"
            f" data_offsets span {offsets[1] - offsets[0]}",
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])


def _check_layout(name: str, tensors: Mapping[str, TensorInfo], data_len: int) -> None:
    # Like safetensors itself: the tensors must tile the data section exactly, so no
    # tensor points outside the file and no two tensors share bytes.
    position = 0
    for key, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.end > data_len:
            raise LoraRejectedError(
                name,
                f"the file is truncated: tensor {key!r} ends at byte {info.end} of the data"
                f" section, which holds only {data_len}",
            )
        if info.start != position:
            raise LoraRejectedError(
                name, f"tensor {key!r} overlaps another or leaves a gap (starts at {info.start})"
            )
        position = info.end
    if position != data_len:
        raise LoraRejectedError(
            name, f"the file has {data_len - position} bytes after its last tensor"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --------------------------------------------------------------------------------------
# Stage 2: the values, model-free

# How the two halves of a LoRA pair are named: (down suffix, up suffix), by layout.
_PAIR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),  # peft / diffusers
    (".lora_down.weight", ".lora_up.weight"),  # kohya / A1111
    (".down.weight", ".up.weight"),  # diffusers' older attention-processor names
)


@dataclass(frozen=True)
class _Half:
    """The size of one matrix of a pair: what bounding the pair's update needs."""

    key: str
    rank: int
    peak: float  # the largest |value|
    rank_sum: float  # the largest sum of |values| along the rank dimension


def check_lora_values(
    file: SafetensorsFile, *, name: str, tensors: Mapping[str, Any] | None = None
) -> None:
    """Refuse a file whose numbers would break the image: non-float tensors, rank 0, NaN or
    inf anywhere, weights or updates too large for float16, alphas that are not finite and
    positive. `tensors` are the file's tensors if the caller has decoded them already;
    otherwise they are read here, with safetensors (never unpickled)."""
    for key, info in file.tensors.items():
        _check_value_header(name, key, info)
    if tensors is None:
        from safetensors.torch import load as load_tensors

        tensors = load_tensors(file.data)
    kohya_alphas: dict[str, float] = {}
    pairs: dict[str, dict[str, _Half]] = {}
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):
            kohya_alphas[key.removesuffix(".alpha")] = _checked_alpha(name, key, tensor)
            continue
        magnitudes, peak = _checked_magnitudes(name, key, tensor)
        half = _split_half(key)
        if half is not None and tensor.ndim >= 2:
            prefix, side = half
            pairs.setdefault(prefix, {})[side] = _measure_half(key, side, magnitudes, peak)
    metadata = _parse_adapter_metadata(name, file.metadata) or {}
    _check_metadata_alphas(name, metadata)
    for prefix, halves in pairs.items():
        down, up = halves.get("down"), halves.get("up")
        if down is None or up is None or down.rank != up.rank:
            continue  # not a pair: stage 3 names what is wrong with it
        _check_update(name, down, up, _pair_scale(prefix, down.rank, kohya_alphas, metadata))


def _check_float_dtype(name: str, key: str, info: TensorInfo) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise LoraRejectedError(
            name, f"tensor {key!r} has dtype {info.dtype}; LoRA weights are floating point"
        )


def _check_single_number(name: str, key: str, info: TensorInfo) -> None:
    if info.shape not in {(), (1,)}:
        raise LoraRejectedError(name, f"alpha {key!r} is not a single number")


def _check_value_header(name: str, key: str, info: TensorInfo) -> None:
    """What the header alone says about the values: their dtype, and no empty dimension."""
    _check_float_dtype(name, key, info)
    if key.endswith(".alpha"):
        _check_single_number(name, key, info)
    elif 0 in info.shape:
        # A rank-0 pair has a zero dimension: it holds no weights, and diffusers only fails
        # on it at load time.
        raise LoraRejectedError(
            name,
            f"tensor {key!r} has shape {info.shape}, with a zero dimension: a LoRA needs"
            " rank 1 or more",
        )


def _checked_magnitudes(name: str, key: str, tensor: Any) -> tuple[Any, float]:
    """|tensor| and its largest value, once every value is finite and at most
    MAX_LORA_WEIGHT in size."""
    magnitudes = tensor.abs()
    peak = float(magnitudes.max())  # NaN propagates through max: one pass finds it too
    if math.isfinite(peak) and peak <= MAX_LORA_WEIGHT:
        return magnitudes, peak
    value = _extreme_value(tensor)
    if not math.isfinite(value):
        raise LoraRejectedError(
            name, f"tensor {key!r} holds {value:g}; every LoRA weight must be a finite number"
        )
    raise LoraRejectedError(
        name,
        f"tensor {key!r} holds {value:g}; LoRA weights must stay within"
        f" ±{MAX_LORA_WEIGHT:g}, beyond which float16 overflows",
    )


def _extreme_value(tensor: Any) -> float:
    """The tensor's NaN if it has one, else its value of largest magnitude, with its sign."""
    import torch

    flat = tensor.flatten().float()
    if bool(torch.isnan(flat).any()):
        return math.nan
    return float(flat[flat.abs().argmax()])


def _split_half(key: str) -> tuple[str, str] | None:
    """(pair prefix, "down" or "up") for a key that is one half of a LoRA pair."""
    for down, up in _PAIR_SUFFIXES:
        if key.endswith(down):
            return key.removesuffix(down), "down"
        if key.endswith(up):
            return key.removesuffix(up), "up"
    return None


def _measure_half(key: str, side: str, magnitudes: Any, peak: float) -> _Half:
    import torch

    # down is (rank, in, ...), up is (out, rank, ...); sums in float32 cannot overflow.
    rank_dim = 0 if side == "down" else 1
    rank_sums = magnitudes.sum(dim=rank_dim, dtype=torch.float32)
    return _Half(key, rank=magnitudes.shape[rank_dim], peak=peak, rank_sum=float(rank_sums.max()))


def _checked_alpha(name: str, key: str, tensor: Any) -> float:
    value = float(tensor.reshape(-1)[0])
    _check_alpha_value(name, f"alpha {key!r}", value)
    return value


def _check_alpha_value(name: str, what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        why = "it is not a number"
    elif not math.isfinite(value):
        why = "it is not a finite number"
    elif value == 0:
        # kohya reads alpha 0 as "alpha = rank"; diffusers as a scale of 0, a silent no-op.
        why = "diffusers would apply the LoRA at scale 0, i.e. not at all"
    elif value < 0:
        why = "a negative alpha turns the LoRA's effect around"
    elif value > FLOAT16_MAX:
        why = f"it is beyond float16's largest value, {FLOAT16_MAX:g}"
    else:
        return
    shown = f"{value:g}" if isinstance(value, (int, float)) else repr(value)
    raise LoraRejectedError(
        name, f"{what} is {shown}: {why}; alpha must be a finite number above 0"
    )


def _check_metadata_alphas(name: str, metadata: Mapping[str, Any]) -> None:
    for key, value in metadata.items():
        if key.endswith(".lora_alpha"):
            _check_alpha_value(name, f"adapter metadata {key!r}", value)
        elif key.endswith(".alpha_pattern") and isinstance(value, dict):
            for pattern, alpha in value.items():
                _check_alpha_value(name, f"adapter metadata {key!r} for {pattern!r}", alpha)


def _pair_scale(
    prefix: str, rank: int, kohya_alphas: Mapping[str, float], metadata: Mapping[str, Any]
) -> float:
    """The scale diffusers will give the pair: its kohya alpha, else its adapter metadata's
    alpha, else alpha = rank (what diffusers assumes without either), over the rank."""
    if prefix in kohya_alphas:
        return kohya_alphas[prefix] / rank
    component, _, module = prefix.partition(".")
    meta = {
        k.removeprefix(f"{component}."): v
        for k, v in metadata.items()
        if k.startswith(f"{component}.")
    }
    if not meta:
        return 1.0
    patterns = meta.get("alpha_pattern")
    patterns = patterns if isinstance(patterns, dict) else {}
    matched = [alpha for pattern, alpha in patterns.items() if _pattern_matches(pattern, module)]
    alpha = matched[0] if matched else meta.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
    divisor = math.sqrt(rank) if meta.get("use_rslora") else rank
    return float(alpha) / divisor


def _check_update(name: str, down: _Half, up: _Half, scale: float) -> None:
    # Every entry of B @ A is a sum over the rank: |sum_k B[i,k] A[k,j]| is at most
    # (sum_k |B[i,k]|) * max|A| and at most max|B| * (sum_k |A[k,j]|). Both bounds come from
    # one pass over each matrix; the full product would cost out x in x rank per layer.
    entry_bound = min(up.rank_sum * down.peak, up.peak * down.rank_sum)
    estimate = entry_bound * max(1.0, scale)
    if estimate > MAX_LORA_UPDATE:
        raise LoraRejectedError(
            name,
            f"the update of {up.key!r} and {down.key!r} (rank {down.rank}, scale"
            f" {scale:g}) can reach {estimate:.3g} per weight, above the"
            f" {MAX_LORA_UPDATE:g} that float16 carries safely",
        )


# --------------------------------------------------------------------------------------
# Stage 3: the keys, against the model


def check_lora_keys(
    file: SafetensorsFile, signature: ModelSignature, *, name: str
) -> LoraFileReport:
    """Check the values (stage 2), then convert the keys as diffusers will and check each
    target layer exists and fits. Whatever goes wrong is the file's refusal, with a reason."""
    try:
        return _check_lora_keys(file, signature, name=name)
    except StencilError:
        raise
    except Exception as exc:  # a file no check foresaw: still the file's fault, and said so
        raise _unforeseen(name, exc) from exc


def _unforeseen(name: str, exc: Exception) -> LoraRejectedError:
    logger.exception("unexpected failure while checking LoRA %r", name)
    reason = f"it cannot be read as a LoRA ({type(exc).__name__}: {without_paths(str(exc))})"
    return LoraRejectedError(name, reason)


def _check_lora_keys(
    file: SafetensorsFile, signature: ModelSignature, *, name: str
) -> LoraFileReport:
    from safetensors.torch import load as load_tensors

    _check_tensor_kinds(name, file)
    layout = _detect_layout(file.tensors)
    if layout == "kohya" and "text_encoder_2" not in signature.layers:
        if any(key.startswith("lora_te2_") for key in file.tensors):
            raise _other_base(name, "it has weights for a second text encoder, as SDXL has")
        if any(block in key for key in file.tensors for block in _SGM_BLOCKS):
            # kohya names SDXL's UNet blocks the SGM way; SD 1.x LoRAs use diffusers names.
            raise _other_base(name, "its UNet layers have SGM names (input_blocks...), as SDXL's")
    adapter_metadata = _parse_adapter_metadata(name, file.metadata)

    tensors = load_tensors(file.data)
    check_lora_values(file, name=name, tensors=tensors)
    if layout == "kohya" and _needs_exact_conversion(tensors, signature):
        return _check_converted(name, file, tensors, signature)
    state_dict, network_alphas = _convert_like_diffusers(name, tensors, signature)
    if adapter_metadata and network_alphas:
        raise LoraRejectedError(
            name, "it carries both kohya alpha tensors and diffusers adapter metadata"
        )

    by_component = _split_by_component(name, state_dict, signature)
    modules: dict[str, frozenset[str]] = {}
    ranks: set[int] = set()
    param_count = 0
    alphas: set[float] = set()
    hotswap_ok = True
    skipped: list[str] = []
    for component, component_dict in by_component.items():
        pairs = _pair_lora_weights(name, component, component_dict)
        missing = _check_targets(name, component, pairs, signature)
        skipped += [f"{component}.{module}" for module in missing]
        pairs = {module: pair for module, pair in pairs.items() if module not in missing}
        if not pairs:
            continue
        modules[component] = frozenset(pairs)
        component_ranks = {a.shape[0] for a, _ in pairs.values()}
        ranks |= component_ranks
        param_count += sum(a.numel() + b.numel() for a, b in pairs.values())
        meta = _component_metadata(name, adapter_metadata, component)
        component_alphas = _component_alphas(component, pairs, network_alphas, meta)
        alphas |= component_alphas
        if meta is not None:
            _check_metadata_matches(name, component, pairs, meta)
            hotswap_ok &= _metadata_is_plain(meta)
        else:
            # diffusers builds an alpha_pattern when alphas (or, without alphas, ranks) vary.
            hotswap_ok &= len(component_alphas) <= 1 and (
                bool(network_alphas) or len(component_ranks) <= 1
            )
    matched = sum(len(names) for names in modules.values())
    _check_matched_share(name, LAYOUT_NAMES[layout], matched, skipped)
    scales = _expected_scales(by_component, tensors, adapter_metadata, signature)
    partial = {}
    if skipped:
        # Loaded as the exact standard LoRA of the layers that exist (`partial_exact_lora`):
        # each layer's scale folded into its up matrix, so every layer loads at scale 1.
        hotswap_ok = not any(key.endswith(".lora_B.bias") for key in state_dict)
        scales = {c: dict.fromkeys(names, 1.0) for c, names in modules.items()}
        partial = {
            "converted_from": f"{layout}{PARTIAL_SUFFIX}",
            "skipped_layers": tuple(sorted(skipped)),
        }
    return LoraFileReport(
        sha256=file.sha256,
        size_bytes=file.size_bytes,
        layout=layout,
        ranks=tuple(sorted(ranks)),
        alphas=tuple(sorted(alphas)),
        targets=tuple(c for c in signature.layers if c in modules),
        modules=modules,
        param_count=param_count,
        has_adapter_metadata=adapter_metadata is not None,
        hotswap_compatible_config=hotswap_ok,
        module_scales=scales,
        **partial,
    )


def partial_exact_lora(file: SafetensorsFile, signature: ModelSignature, *, name: str) -> dict:
    """The standard LoRA diffusers is given for a diffusers/peft file naming layers this
    model lacks: the layers that exist, each with its own scale folded into `lora_B` (and
    its bias), so that every layer loads at scale 1 whatever metadata the file had."""
    from safetensors.torch import load as load_tensors

    tensors = load_tensors(file.data)
    adapter_metadata = _parse_adapter_metadata(name, file.metadata)
    state_dict, _ = _convert_like_diffusers(name, tensors, signature)
    by_component = _split_by_component(name, state_dict, signature)
    scales = _expected_scales(by_component, tensors, adapter_metadata, signature)
    exact: dict[str, Any] = {}
    for component, component_dict in by_component.items():
        layers = signature.layers[component]
        for key, value in component_dict.items():
            module, _, param = key.partition(".lora_")
            if module not in layers:
                continue
            if param.startswith("B."):
                value = value.float() * scales[component][module]
            exact[f"{component}.{key}"] = value
    return exact


def _expected_scales(
    by_component: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, Any],
    adapter_metadata: Mapping[str, Any] | None,
    signature: ModelSignature,
) -> dict[str, dict[str, float]]:
    """The scale each layer must load with: its kohya alpha / rank (found by the layer's
    own kohya name, not through diffusers' conversion), else what the metadata says."""
    kohya_alphas = {
        names[prefix]: float(params["alpha"].reshape(-1)[0])
        for names in [module_names(signature.layers)]
        for prefix, params in group_by_module(tensors).items()
        if "alpha" in params and prefix in names
    }
    scales: dict[str, dict[str, float]] = {}
    for component, component_dict in by_component.items():
        for key, value in component_dict.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module, rank = key.removesuffix(".lora_A.weight"), value.shape[0]
            alpha = kohya_alphas.get((component, module))
            scale = (
                alpha / rank
                if alpha is not None
                else _pair_scale(f"{component}.{module}", rank, {}, adapter_metadata or {})
            )
            scales.setdefault(component, {})[module] = scale
    return scales


def _needs_exact_conversion(tensors: Mapping[str, Any], signature: ModelSignature) -> bool:
    """LyCORIS formats, per-module alphas, and files naming layers this model lacks."""
    groups = group_by_module(tensors)
    names = module_names(signature.layers)
    return (
        lycoris_kind(tensors) is not None
        or has_varying_scales(groups)
        or any(prefix not in names for prefix in groups)
    )


def _check_converted(
    name: str, file: SafetensorsFile, tensors: Mapping[str, Any], signature: ModelSignature
) -> LoraFileReport:
    """Convert a kohya/LyCORIS file to its exact standard LoRA and check that, as diffusers
    will load it; layers the model lacks are skipped while most of the file matches."""
    kind = lycoris_kind(tensors) or (
        "kohya-per-module-alpha" if has_varying_scales(group_by_module(tensors)) else "kohya"
    )
    skipped: list[str] = []
    try:
        # DoRA needs the model's weights, which the check has not: zeros stand in (the
        # shapes and the bounds of the low-rank part are what is checked here).
        state, layers = convert_to_exact_lora(
            tensors,
            signature.layers,
            base_weight=_zeros_like_layer(signature),
            on_skip=skipped.append,
        )
    except LayerMisfitError as exc:
        raise _other_base(name, f"layer {exc} (its shapes do not fit)") from exc
    _check_matched_share(name, FORMAT_NAMES.get(kind, kind), len(layers), skipped)
    by_component = _split_by_component(name, state, signature)
    modules: dict[str, frozenset[str]] = {}
    param_count = 0
    for component, component_dict in by_component.items():
        pairs = _pair_lora_weights(name, component, component_dict)
        _check_targets(name, component, pairs, signature)
        _check_converted_updates(name, component, pairs)
        modules[component] = frozenset(pairs)
        param_count += sum(a.numel() + b.numel() for a, b in pairs.values())
    alphas = {
        float(params["alpha"].reshape(-1)[0])
        for params in group_by_module(tensors).values()
        if "alpha" in params
    }
    return LoraFileReport(
        sha256=file.sha256,
        size_bytes=file.size_bytes,
        layout="kohya",
        ranks=tuple(sorted({layer.rank for layer in layers})),
        alphas=tuple(sorted(alphas)),
        targets=tuple(c for c in signature.layers if c in modules),
        modules=modules,
        param_count=param_count,
        # Scale 1 on every layer; a bias change (full files) makes peft's config differ.
        hotswap_compatible_config=not any(k.endswith(".lora_B.bias") for k in state),
        converted_from=kind,
        skipped_layers=tuple(sorted(skipped)),
        full_size_layers=sum(not layer.exact_low_rank for layer in layers),
        module_scales={c: dict.fromkeys(names, 1.0) for c, names in modules.items()},
    )


def _check_matched_share(name: str, what: str, matched: int, skipped: Sequence[str]) -> None:
    """Layers the model lacks are skipped only while most of the file matches."""
    if not skipped:
        return
    if not matched:
        raise LoraRejectedError(
            name,
            f"it is a {what} file and matches no layer of this model (e.g. {skipped[0]!r});"
            " loading it would change nothing",
        )
    total = matched + len(skipped)
    if matched / total <= MIN_MATCHED_FRACTION:
        raise _other_base(
            name,
            f"only {matched} of its {total} layers exist in this model (more than"
            f" {MIN_MATCHED_FRACTION:.0%} must), e.g. it names {skipped[0]!r}",
        )


def _zeros_like_layer(signature: ModelSignature) -> Callable[[str, str], Any]:
    import torch

    def zeros(component: str, module: str) -> Any:
        layer = signature.layers[component][module]
        return torch.zeros(layer.out_features, layer.in_features, *(layer.kernel or ()))

    return zeros


def _check_converted_updates(
    name: str, component: str, pairs: Mapping[str, tuple[Any, Any]]
) -> None:
    """The float16 bound of stage 2, on the converted pairs (their scale is folded in)."""
    for module, (a, b) in pairs.items():
        down = _measure_half(f"{component}.{module}.lora_A", "down", a.abs(), float(a.abs().max()))
        up = _measure_half(f"{component}.{module}.lora_B", "up", b.abs(), float(b.abs().max()))
        _check_update(name, down, up, 1.0)


def validate_lora(
    source: Path | bytes,
    signature: ModelSignature,
    *,
    name: str,
    max_bytes: int = MAX_FILE_BYTES,
) -> LoraFileReport:
    """Every stage: the bytes, the values, then the keys against the model."""
    try:
        if isinstance(source, bytes):
            file = read_safetensors(source, name=name, max_bytes=max_bytes)
        else:
            file = read_lora_file(source, name=name, max_bytes=max_bytes)
        return check_lora_keys(file, signature, name=name)
    except StencilError:
        raise
    except Exception as exc:
        raise _unforeseen(name, exc) from exc


def _check_tensor_kinds(name: str, file: SafetensorsFile) -> None:
    if not file.tensors:
        raise LoraRejectedError(name, "the file holds no tensors")
    # kohya-named LyCORIS parameters are converted exactly (pipelines.lycoris_formats);
    # any other kind (LoHa with Tucker cores, OFT, peft DoRA) is refused by name.
    kohya_named = _detect_layout(file.tensors) == "kohya"
    for key, info in file.tensors.items():
        convertible = kohya_named and key.partition(".")[2] in CONVERTIBLE_PARAMS
        for marker, what in _UNSUPPORTED_KEY_MARKERS.items():
            if marker in key and not convertible:
                raise LoraRejectedError(name, f"it holds {what}, e.g. {key!r}")
        if key.endswith(".alpha"):
            _check_single_number(name, key, info)
        elif "lora" not in key:
            raise LoraRejectedError(name, f"it is not a LoRA: tensor {key!r} is not a LoRA weight")
        _check_float_dtype(name, key, info)


def _detect_layout(tensors: Mapping[str, TensorInfo]) -> str:
    if all(key.startswith(_KOHYA_PREFIXES) for key in tensors):
        return "kohya"
    if any(".lora_A." in key or ".lora_B." in key for key in tensors):
        return "peft"
    return "diffusers-old"


def _parse_adapter_metadata(name: str, metadata: Mapping[str, str]) -> dict[str, Any] | None:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraRejectedError(name, f"its adapter metadata is not valid JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise LoraRejectedError(name, "its adapter metadata is not a JSON object")
    for key, value in parsed.items():
        _check_metadata_field(name, key, value)
    return parsed


# The LoraConfig fields diffusers' adapter metadata may set, and what each must hold. peft
# would accept some wrong types and fail later, deep inside a load, with a TypeError.
_METADATA_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "r": ("a whole number of at least 1", lambda v: _is_whole(v) and v >= 1),
    "lora_alpha": ("a number", lambda v: _is_number(v)),
    "lora_dropout": ("a number from 0 to 1", lambda v: _is_number(v) and 0 <= v <= 1),
    "target_modules": ("a list of layer names", lambda v: _is_names(v)),
    "rank_pattern": ("an object of whole numbers", lambda v: _is_pattern(v, _is_whole)),
    "alpha_pattern": ("an object of numbers", lambda v: _is_pattern(v, _is_number)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
}


def _check_metadata_field(name: str, key: Any, value: Any) -> None:
    field = key.partition(".")[2] if isinstance(key, str) else None
    rule = _METADATA_FIELDS.get(field)
    if rule is not None and not rule[1](value):
        raise LoraRejectedError(
            name, f"its adapter metadata {key!r} is {value!r}: it must be {rule[0]}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_pattern(value: Any, number: Callable[[Any], bool]) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and number(v) for k, v in value.items()
    )


def _convert_like_diffusers(
    name: str, tensors: dict[str, Any], signature: ModelSignature
) -> tuple[dict[str, Any], dict[str, float]]:
    """Run the pipeline class's own `lora_state_dict` on a copy, as `load_lora_weights` does."""
    kwargs: dict[str, Any] = {}
    if "text_encoder_2" in signature.layers:
        # Only the SDXL loader passes the UNet config (to remap kohya's SGM block names).
        kwargs["unet_config"] = signature.unet_config
    try:
        state_dict, network_alphas = signature.pipeline_class.lora_state_dict(
            dict(tensors), **kwargs
        )
    except Exception as exc:  # any failure in diffusers' conversion means it cannot load it
        raise LoraRejectedError(name, f"its keys cannot be converted by diffusers ({exc})") from exc
    return state_dict, dict(network_alphas or {})


def _split_by_component(
    name: str, state_dict: Mapping[str, Any], signature: ModelSignature
) -> dict[str, dict[str, Any]]:
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in signature.layers:
            if component == "text_encoder_2":
                raise _other_base(name, "it has weights for a second text encoder, as SDXL has")
            raise LoraRejectedError(
                name,
                f"key {key!r} is not addressed to a part of this model"
                f" ({', '.join(signature.layers)}); nothing of it would load",
            )
        grouped.setdefault(component, {})[rest] = value

    converted: dict[str, dict[str, Any]] = {}
    for component, component_dict in grouped.items():
        try:
            converted[component] = _to_peft_names(component, component_dict, signature)
        except Exception as exc:  # diffusers raises ValueError for keys it cannot place
            raise LoraRejectedError(
                name, f"diffusers cannot convert its {component} keys ({exc})"
            ) from exc
    return converted


def _to_peft_names(
    component: str, component_dict: dict[str, Any], signature: ModelSignature
) -> dict[str, Any]:
    """Mirrors diffusers' loaders: the UNet one converts when the first key is not
    peft-style; the text-encoder one always goes through diffusers and then peft naming."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not component.startswith("text_encoder"):
        if "lora_A" in next(iter(component_dict)):
            return component_dict
        return convert_unet_state_dict_to_peft(component_dict)
    converted = convert_state_dict_to_peft(convert_state_dict_to_diffusers(component_dict))
    if component in signature.text_encoders_with_text_model:
        return converted
    # Recent transformers flatten CLIPTextModel; diffusers strips the old prefix likewise.
    return {key.removeprefix("text_model."): value for key, value in converted.items()}


def _pair_lora_weights(
    name: str, component: str, state_dict: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    halves: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        for half in ("lora_A", "lora_B"):
            marker = f".{half}."
            if marker in key:
                module, _, param = key.partition(marker)
                if param == "weight":
                    halves.setdefault(module, {})[half] = value
                elif not (half == "lora_B" and param == "bias"):
                    raise LoraRejectedError(name, f"unexpected LoRA parameter {key!r}")
                break
        else:
            # e.g. kohya text-encoder keys that diffusers' conversion does not rename when
            # the file has mlp weights but no out_proj: diffusers would drop them silently.
            raise LoraRejectedError(
                name,
                f"diffusers would not load some of its weights, e.g. {component}.{key}"
                " (its key conversion leaves them unrecognised)",
            )
    pairs: dict[str, tuple[Any, Any]] = {}
    for module, found in halves.items():
        if set(found) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(found)).pop()
            raise LoraRejectedError(name, f"layer {component}.{module} has no {missing} weight")
        a, b = found["lora_A"], found["lora_B"]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] != b.shape[1]:
            raise LoraRejectedError(
                name,
                f"layer {component}.{module}: down {tuple(a.shape)} and up {tuple(b.shape)}"
                " do not form a LoRA pair",
            )
        pairs[module] = (a, b)
    return pairs


def _check_targets(
    name: str,
    component: str,
    pairs: Mapping[str, tuple[Any, Any]],
    signature: ModelSignature,
) -> list[str]:
    """Refuse layers whose shapes do not fit; return the ones this model lacks."""
    layers = signature.layers[component]
    missing = sorted(module for module in pairs if module not in layers)
    misfits: list[str] = []
    for module, (a, b) in sorted(pairs.items()):
        layer = layers.get(module)
        if layer is not None and not _fits(layer, a.shape, b.shape):
            misfits.append(
                f"{component}.{module} is {_describe_layer(layer)} but the LoRA is"
                f" {a.shape[1]} -> {b.shape[0]}"
            )
    if misfits:
        guess = _guess_base(component, pairs, signature)
        raise _other_base(name, f"{guess}layer {misfits[0]} ({len(misfits)} layers differ)")
    return missing  # what share of the whole file may be missing is the caller's to judge


def _fits(layer: LayerShape, a_shape: Any, b_shape: Any) -> bool:
    if a_shape[1] != layer.in_features or b_shape[0] != layer.out_features:
        return False
    if layer.kernel is None:
        return len(a_shape) == 2
    # diffusers/peft LoRA on a Conv2d: down has the layer's kernel, up is 1x1.
    return len(a_shape) == 4 and tuple(a_shape[2:]) == layer.kernel and tuple(b_shape[2:]) == (1, 1)


def _describe_layer(layer: LayerShape) -> str:
    kind = "a Linear" if layer.kernel is None else f"a {layer.kernel[0]}x{layer.kernel[1]} Conv2d"
    return f"{kind} {layer.in_features} -> {layer.out_features}"


def _guess_base(
    component: str, pairs: Mapping[str, tuple[Any, Any]], signature: ModelSignature
) -> str:
    """Name the base the LoRA seems made for, from its cross-attention or text width."""
    if component == "unet":
        probes, ours, what = (
            ("attn2.to_k", "attn2.to_v"),
            signature.cross_attention_dim,
            "cross-attention",
        )
    else:
        probes, ours, what = ("self_attn.q_proj",), signature.text_hidden_size, "text-encoder"
    widths = {a.shape[1] for module, (a, _) in pairs.items() if module.endswith(probes)}
    if len(widths) != 1:
        return ""
    width = widths.pop()
    label = _KNOWN_CONTEXT_WIDTHS.get(width) if component == "unet" else None
    looks = f"it looks like {label} LoRA, " if label else ""
    return f"{looks}{what} width {width} where this model's is {ours}; "


def _other_base(name: str, detail: str) -> LoraRejectedError:
    return LoraRejectedError(name, f"it is for a different base model: {detail}")


def _component_metadata(
    name: str, adapter_metadata: Mapping[str, Any] | None, component: str
) -> dict[str, Any] | None:
    if adapter_metadata is None:
        return None
    prefix = f"{component}."
    meta = {k.removeprefix(prefix): v for k, v in adapter_metadata.items() if k.startswith(prefix)}
    if not meta:
        return None
    from peft import LoraConfig

    try:  # diffusers builds LoraConfig(**meta) at load time; fail here instead
        LoraConfig(**meta)
    except (TypeError, ValueError) as exc:
        raise LoraRejectedError(
            name, f"its {component} adapter metadata is not a valid LoRA config ({exc})"
        ) from exc
    return meta


def _component_alphas(
    component: str,
    pairs: Mapping[str, tuple[Any, Any]],
    network_alphas: Mapping[str, float],
    meta: Mapping[str, Any] | None,
) -> set[float]:
    """The alphas the layers will be loaded with (each layer's scale is alpha / rank)."""
    if meta is not None:
        default = float(meta.get("lora_alpha", meta.get("r", 8)))
        return {default, *(float(v) for v in (meta.get("alpha_pattern") or {}).values())}
    # kohya alphas, keyed by diffusers' intermediate names; values are all we report.
    values = {float(v) for k, v in network_alphas.items() if k.startswith(f"{component}.")}
    return values or {float(a.shape[0]) for a, _ in pairs.values()}


def _pattern_matches(pattern: str, module: str) -> bool:
    return module == pattern or module.endswith(f".{pattern}")


def _check_metadata_matches(
    name: str, component: str, pairs: Mapping[str, tuple[Any, Any]], meta: Mapping[str, Any]
) -> None:
    targets = meta.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if targets:
        # peft only creates layers its config names; weights for any other layer would be
        # dropped with a warning, which is the silent no-op we refuse.
        uncovered = [m for m in pairs if not any(_pattern_matches(t, m) for t in targets)]
        if uncovered:
            raise LoraRejectedError(
                name,
                f"its {component} metadata target_modules leave out layers that have weights,"
                f" e.g. {uncovered[0]!r}",
            )
    if not meta.get("rank_pattern") and "r" in meta:
        wrong = [m for m, (a, _) in pairs.items() if a.shape[0] != meta["r"]]
        if wrong:
            raise LoraRejectedError(
                name,
                f"its {component} metadata says rank {meta['r']} but layer {wrong[0]!r} has"
                f" rank {pairs[wrong[0]][0].shape[0]}",
            )


def _metadata_is_plain(meta: Mapping[str, Any]) -> bool:
    return not (
        meta.get("alpha_pattern")
        or meta.get("use_rslora")
        or meta.get("use_dora")
        or meta.get("lora_dropout")
    )


def _lora_able_layers(model: Any) -> dict[str, LayerShape]:
    """Linear and Conv2d layers by name, seen through any peft wrappers already injected."""
    import torch

    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a hard requirement of LoRA loading
        BaseTunerLayer = ()  # noqa: N806

    model = getattr(model, "_orig_mod", model)  # see through torch.compile's wrapper
    layers: dict[str, LayerShape] = {}
    for module_name, module in model.named_modules():
        if any(part in module_name for part in (".base_layer", ".lora_A", ".lora_B", "lora_")):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, torch.nn.Linear):
            layers[module_name] = LayerShape(base.in_features, base.out_features)
        elif isinstance(base, torch.nn.Conv2d):
            kernel = tuple(base.kernel_size)
            layers[module_name] = LayerShape(base.in_channels, base.out_channels, kernel)
    return layers


def _as_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):  # some UNets list a width per block
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def verify_loaded_scales(pipe: Any, adapter: str, report: LoraFileReport, *, name: str) -> None:
    """After a load: every layer the file targets carries the adapter at the scale the file
    asks for. peft only logs alphas it cannot place; here a mismatch is a refusal."""
    wrong: list[str] = []
    for component, expected in report.module_scales.items():
        model = getattr(pipe, component)
        model = getattr(model, "_orig_mod", model)
        for module, scale in sorted(expected.items()):
            loaded = _loaded_scale(model, module, adapter)
            if loaded is None or not _same_scale(loaded, scale):
                shown = "no adapter" if loaded is None else f"{loaded:g}"
                wrong.append(f"{component}.{module} ({shown}, the file asks for {scale:g})")
    if wrong:
        raise LoraRejectedError(
            name,
            f"{len(wrong)} of its layers would be applied at the wrong strength, e.g. {wrong[0]}",
        )


def _same_scale(loaded: float, asked: float) -> bool:
    # NaN only arrives here when the value checks were bypassed (tests do, on purpose):
    # then a NaN the file asks for, loaded as NaN, is the file applied as it is.
    if math.isnan(loaded) or math.isnan(asked):
        return math.isnan(loaded) and math.isnan(asked)
    return math.isclose(loaded, asked, rel_tol=1e-5, abs_tol=1e-7)


def _loaded_scale(model: Any, module: str, adapter: str) -> float | None:
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        return None
    scaling = getattr(layer, "scaling", None)
    if not isinstance(scaling, dict) or adapter not in scaling:
        return None
    return float(scaling[adapter])
