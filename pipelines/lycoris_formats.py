"""LyCORIS and kohya files turned into an exact standard LoRA, layer by layer.

diffusers/peft apply a kohya file's `.alpha` only where its converted name matches a
module; for attention and text-encoder layers the per-module alphas of a file whose alphas
vary arrive under names that match none, and peft merely logs that it ignored them (wrong
strength, silently). LoHa, LoKr, full differences, DoRA and Tucker LoCon it cannot load.

So such files are converted here, before diffusers sees them, into a diffusers/peft state
dict (`component.module.lora_A/lora_B`) whose product is each layer's exact weight change
with its scale already folded into `lora_B`. Every layer then loads at scale 1 (peft's
alpha = rank), in normal and hotswap mode, and the adapter store verifies that after the
load (`pipelines.lora_files.verify_loaded_scales`). The change of each layer is computed the
way LyCORIS's own merge computes it; it is represented exactly:

- LoRA/LoCon: the file's own pair (rank r), scale folded into `up`.
- LoCon with Tucker (`lora_mid`): the mid core folded into `down` (rank r, exact).
- LoHa: (A1 B1) * (A2 B2) is exactly the product of their Khatri-Rao factors (rank r1*r2).
- LoKr, full `.diff`, DoRA and any LoHa whose r1*r2 reaches the layer's size: the full
  change as one factor and an identity as the other (rank min(out, in*k*k): exact, but as
  large as the layer, the price of representing an arbitrary change).

Layers a file names but the model lacks are skipped (see `lora_files` for the threshold),
and reported; a file whose shapes do not fit is refused there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .original_layout import sgm_unet_names

# kohya name prefixes, by the pipeline component they address. Files from before
# transformers 5 call the CLIP text encoder's layers `text_model.encoder...`.
_COMPONENT_PREFIXES = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}
_TEXT_MODEL = "text_model_"

# The parameter names of each LyCORIS module kind, after the kohya prefix and a dot.
_FORMAT_MARKERS = (
    ("dora_scale", "dora"),
    ("hada_", "loha"),
    ("lokr_", "lokr"),
    ("diff", "full"),
    ("lora_mid", "locon-tucker"),
)
CONVERTIBLE_PARAMS = frozenset(
    {
        "alpha",
        "lora_down.weight",
        "lora_up.weight",
        "lora_mid.weight",
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "diff",
        "diff_b",
        "dora_scale",
    }
)
FORMAT_NAMES = {
    "kohya": "kohya LoRA",
    "kohya-per-module-alpha": "kohya LoRA with per-module alphas",
    "locon-tucker": "LoCon with Tucker decomposition",
    "loha": "LyCORIS LoHa",
    "lokr": "LyCORIS LoKr",
    "full": "full weight differences",
    "dora": "DoRA (weight-decomposed)",
}


class LayerMisfitError(ValueError):
    """A module of the file does not fit the model's layer of the same name."""

    def __init__(self, component: str, module: str, params: Mapping[str, Any], shape: Any):
        sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(params.items()) if v.ndim)
        super().__init__(f"{component}.{module} is {tuple(shape)} but the file has {sizes}")
        self.component, self.module = component, module


@dataclass(frozen=True)
class ConvertedLayer:
    """One layer of a converted file: where it goes and how its change is represented."""

    component: str
    module: str
    kind: str  # "lora", "locon-tucker", "loha", "lokr", "full", "dora"
    rank: int
    exact_low_rank: bool  # False: the full change with an identity factor


def lycoris_kind(keys: Iterable[str]) -> str | None:
    """The LyCORIS format a kohya-named file uses, or None for a plain LoRA/LoCon."""
    params = {key.partition(".")[2] for key in keys}
    for marker, kind in _FORMAT_MARKERS:
        if any(param.startswith(marker) or param == marker for param in params):
            return kind
    return None


def group_by_module(tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{kohya module prefix: {parameter name: tensor}}."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        prefix, _, param = key.partition(".")
        groups.setdefault(prefix, {})[param] = value
    return groups


def module_names(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """kohya prefix -> (component, module name), for every LoRA-able layer of the model."""
    names: dict[str, tuple[str, str]] = {}
    for component, component_layers in layers.items():
        for prefix in _COMPONENT_PREFIXES.get(component, ()):
            for module in component_layers:
                flat = module.replace(".", "_")
                names[prefix + flat] = (component, module)
                if component.startswith("text_encoder") and not module.startswith("text_model"):
                    names[prefix + _TEXT_MODEL + flat] = (component, module)
            if component == "unet":  # kohya's SDXL files use the original SGM block names
                for original, module in sgm_unet_names(component_layers).items():
                    names[prefix + original.replace(".", "_")] = (component, module)
    return names


def has_varying_scales(groups: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a plain kohya file's alpha / rank differs between modules (or some modules
    lack an alpha): the case diffusers applies at the wrong strength."""
    scales = set()
    for params in groups.values():
        down = params.get("lora_down.weight")
        if down is None:
            continue
        alpha = params.get("alpha")
        scales.add(None if alpha is None else float(alpha.reshape(-1)[0]) / down.shape[0])
    return len(scales) > 1


def weight_change(
    name: str, params: Mapping[str, Any], weight_shape: tuple[int, ...], base_weight: Any
) -> tuple[str, Any, Any]:
    """(kind, change of the weight, change of the bias or None), in float32, at weight 1,
    computed as LyCORIS merges it. `base_weight` is needed by DoRA only."""
    p = {key: value.float() for key, value in params.items()}
    out_features = weight_shape[0]
    if "diff" in p:
        return "full", p["diff"].reshape(weight_shape), p.get("diff_b")
    if "hada_w1_a" in p:
        rank = p["hada_w1_b"].shape[0]
        scale = _alpha(p, rank) / rank
        change = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * scale
        kind = "loha"
    elif any(key.startswith("lokr_") for key in p):
        change, kind = _lokr_change(p, weight_shape), "lokr"
    else:
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        rank = down.shape[0]
        down = _folded_down(p).reshape(rank, -1)
        change = (up.reshape(out_features, rank) * (_alpha(p, rank) / rank)) @ down
        kind = "locon-tucker" if "lora_mid.weight" in p else "lora"
    change = change.reshape(weight_shape)
    if "dora_scale" in p:
        return "dora", _dora_change(name, base_weight, change, p["dora_scale"]), None
    return kind, change, None


def _alpha(p: Mapping[str, Any], rank: int) -> float:
    # kohya and LyCORIS read a missing alpha as alpha = rank (scale 1).
    alpha = p.get("alpha")
    return float(rank) if alpha is None else float(alpha.reshape(-1)[0])


def _folded_down(p: Mapping[str, Any]) -> Any:
    """down, with a Tucker mid core (r, r, k, k) folded in: (r, in, k, k), rank unchanged."""
    import torch

    down = p["lora_down.weight"]
    mid = p.get("lora_mid.weight")
    if mid is None:
        return down
    return torch.einsum("ijkl,jc->ickl", mid, down.reshape(down.shape[0], -1))


def _lokr_change(p: Mapping[str, Any], weight_shape: tuple[int, ...]) -> Any:
    import torch

    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    else:
        w2a, w2b = p["lokr_w2_a"], p["lokr_w2_b"]
        w2 = (w2a @ w2b.reshape(w2b.shape[0], -1)).reshape(w2a.shape[0], *w2b.shape[1:])
    # LyCORIS scales by alpha / rank only when a side is factorised; full w1 and w2: 1.
    factored = next((p[k] for k in ("lokr_w1_b", "lokr_w2_b") if k in p), None)
    scale = 1.0 if factored is None else _alpha(p, factored.shape[0]) / factored.shape[0]
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return (torch.kron(w1, w2) * scale).reshape(weight_shape)


def _dora_change(name: str, base_weight: Any, change: Any, magnitude: Any) -> Any:
    """LyCORIS's weight decomposition: W' = m * (W + dW) / ||W + dW||, the norm over each
    output row (its default, wd_on_output); the change is W' - W."""
    import torch

    if base_weight is None:
        raise ValueError(f"DoRA layer {name} needs the model's weight to be converted")
    base = base_weight.float()
    merged = base + change
    flat = merged.reshape(merged.shape[0], -1)
    # LyCORIS adds float32's eps to the norm; so does this, to give the same weights.
    norm = flat.norm(dim=1) + torch.finfo(torch.float32).eps
    norm = norm.reshape(merged.shape[0], *([1] * (merged.dim() - 1)))
    scale = magnitude.reshape(merged.shape[0], *([1] * (merged.dim() - 1)))
    return merged * (scale / norm) - base


def exact_factors(kind: str, params: Mapping[str, Any], change: Any) -> tuple[Any, Any, bool]:
    """(down, up, exact_low_rank) with up @ down == change: the file's own low rank where
    it has one, else the change itself against an identity."""
    import torch

    out_features = change.shape[0]
    p = {key: value.float() for key, value in params.items()}
    if kind in {"lora", "locon-tucker"}:
        rank = p["lora_down.weight"].shape[0]
        up = p["lora_up.weight"].reshape(out_features, rank) * (_alpha(p, rank) / rank)
        down = _folded_down(p).reshape(rank, -1)
        return (*_shaped(down, up, change.shape), True)
    if kind == "loha":
        rank = p["hada_w1_b"].shape[0] * p["hada_w2_b"].shape[0]
        if rank < min(out_features, math.prod(change.shape[1:])):
            scale = _alpha(p, p["hada_w1_b"].shape[0]) / p["hada_w1_b"].shape[0]
            # (A1 B1) * (A2 B2) = sum over (i, j) of (A1[:, i] * A2[:, j]) (B1[i] * B2[j]).
            up = (p["hada_w1_a"][:, :, None] * p["hada_w2_a"][:, None, :]).reshape(
                out_features, rank
            ) * scale
            down = (p["hada_w1_b"][:, None, :] * p["hada_w2_b"][None, :, :]).reshape(rank, -1)
            return (*_shaped(down, up, change.shape), True)
    flat = change.reshape(out_features, -1)
    if out_features <= flat.shape[1]:
        return (*_shaped(flat, torch.eye(out_features), change.shape), False)
    # More outputs than inputs (a 1x1 conv widening, say): an identity on the inputs.
    return (*_shaped(torch.eye(flat.shape[1]), flat, change.shape), False)


def _shaped(down: Any, up: Any, weight_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """peft's shapes: a Linear's (r, in) and (out, r); a Conv2d's down keeps the kernel
    (r, in, k, k) and its up is 1x1 (out, r, 1, 1)."""
    if len(weight_shape) == 2:
        return down.contiguous(), up.contiguous()
    rank = down.shape[0]
    down = down.reshape(rank, *weight_shape[1:]).contiguous()
    return down, up.reshape(weight_shape[0], rank, 1, 1).contiguous()


def convert_to_exact_lora(
    tensors: Mapping[str, Any],
    layers: Mapping[str, Mapping[str, Any]],
    *,
    base_weight: Callable[[str, str], Any] | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], list[ConvertedLayer]]:
    """The diffusers/peft state dict (scale 1 everywhere) of a kohya/LyCORIS file, and
    what each layer became. `layers` is a `ModelSignature.layers`; a module prefix it has
    no layer for is passed to `on_skip` and left out."""
    names = module_names(layers)
    state: dict[str, Any] = {}
    converted: list[ConvertedLayer] = []
    biased: set[str] = set()
    for prefix, params in sorted(group_by_module(tensors).items()):
        target = names.get(prefix)
        if target is None:
            if on_skip is not None:
                on_skip(prefix)
            continue
        component, module = target
        shape = _weight_shape(layers[component][module])
        weight = base_weight(component, module) if base_weight and "dora_scale" in params else None
        try:
            kind, change, bias_change = weight_change(prefix, params, shape, weight)
            down, up, exact = exact_factors(kind, params, change)
        except (RuntimeError, KeyError) as exc:  # a reshape that cannot fit, a missing half
            raise LayerMisfitError(component, module, params, shape) from exc
        key = f"{component}.{module}"
        state[f"{key}.lora_A.weight"] = down
        state[f"{key}.lora_B.weight"] = up
        if bias_change is not None:
            state[f"{key}.lora_B.bias"] = bias_change.float().reshape(-1)
            biased.add(component)
        converted.append(ConvertedLayer(component, module, kind, down.shape[0], exact))
    _fill_missing_biases(state, converted, biased)
    return state, converted


def _fill_missing_biases(
    state: dict[str, Any], converted: list[ConvertedLayer], biased: set[str]
) -> None:
    # peft gives every lora_B of a component a bias once one layer has it (lora_bias);
    # the others must be zero, not whatever peft initialises them to.
    import torch

    for layer in converted:
        key = f"{layer.component}.{layer.module}.lora_B"
        if layer.component in biased and f"{key}.bias" not in state:
            state[f"{key}.bias"] = torch.zeros(state[f"{key}.weight"].shape[0])


def _weight_shape(layer: Any) -> tuple[int, ...]:
    if layer.kernel is None:
        return (layer.out_features, layer.in_features)
    return (layer.out_features, layer.in_features, *layer.kernel)
