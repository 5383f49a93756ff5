"""Diffusers pipelines written in the original single-file layout (LDM for SD 1.x, SGM for
SDXL): the `.safetensors` checkpoints A1111, ComfyUI and Civitai pass around.

diffusers reads that layout (`from_single_file`, `diffusers.loaders.single_file_utils`);
this is the other direction, so a built-in family can be handed to Stencil as a
checkpoint file exactly as people have them (tests, `scripts/write_checkpoint.py`). The
names follow the original code: a UNet level of `layers_per_block` resnets is
`input_blocks` 1 + (layers + 1) * level + layer, its downsampler the block after; VAE
attention projections are 1x1 convolutions there; SDXL's second text tower is OpenCLIP's,
with q, k and v in one `in_proj` matrix and a transposed text projection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

UNET_PREFIX = "model.diffusion_model."
_DOWN_LEVEL = re.compile(r"down_blocks\.(\d+)\.")
_FIRST_LEVEL_RESNET = re.compile(r"down_blocks\.0\.resnets\.(\d+)(\.|$)")
VAE_PREFIX = "first_stage_model."
SD_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's size and pooled-text embedding
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def original_state_dict(pipe) -> dict[str, Any]:
    """Every weight of an SD or SDXL pipeline under its original single-file name."""
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is not None and any(".base_layer." in key for key in model.state_dict()):
            raise ValueError(f"the pipeline's {component} carries LoRA layers; write a fresh one")
    tensors = _prefixed(UNET_PREFIX, unet_to_original(pipe.unet))
    tensors.update(_prefixed(VAE_PREFIX, vae_to_original(pipe.vae)))
    if getattr(pipe, "text_encoder_2", None) is None:
        tensors.update(_prefixed(SD_TEXT_PREFIX, clip_to_original(pipe.text_encoder)))
    else:
        first, second = SDXL_TEXT_PREFIXES
        tensors.update(_prefixed(first, clip_to_original(pipe.text_encoder)))
        tensors.update(_prefixed(second, open_clip_to_original(pipe.text_encoder_2)))
    return tensors


def unet_to_original(unet) -> dict[str, Any]:
    return _renamed(unet.state_dict(), _unet_prefixes(unet.config), inner=_UNET_RESNET)


def _unet_prefixes(config) -> dict[str, str]:
    levels, layers = len(config.block_out_channels), config.layers_per_block
    attends_down = [kind.startswith("CrossAttn") for kind in config.down_block_types]
    attends_up = [kind.startswith("CrossAttn") for kind in config.up_block_types]
    names = dict(_UNET_TOP)
    for level in range(levels):
        for layer in range(layers):
            block = 1 + (layers + 1) * level + layer
            names[f"down_blocks.{level}.resnets.{layer}."] = f"input_blocks.{block}.0."
            if attends_down[level]:
                names[f"down_blocks.{level}.attentions.{layer}."] = f"input_blocks.{block}.1."
        for layer in range(layers + 1):
            block = (layers + 1) * level + layer
            names[f"up_blocks.{level}.resnets.{layer}."] = f"output_blocks.{block}.0."
            if attends_up[level]:
                names[f"up_blocks.{level}.attentions.{layer}."] = f"output_blocks.{block}.1."
        if level < levels - 1:
            downsampler = f"input_blocks.{(layers + 1) * (level + 1)}.0.op."
            names[f"down_blocks.{level}.downsamplers.0.conv."] = downsampler
            # After the level's last resnet, and its attention where it has one.
            place = 2 if attends_up[level] else 1
            upsampler = f"output_blocks.{(layers + 1) * level + layers}.{place}."
            names[f"up_blocks.{level}.upsamplers.0."] = upsampler
    names["mid_block.resnets.0."] = "middle_block.0."
    names["mid_block.attentions.0."] = "middle_block.1."
    names["mid_block.resnets.1."] = "middle_block.2."
    return names


def sgm_unet_names(modules: Iterable[str]) -> dict[str, str]:
    """{original (SGM / LDM) name: diffusers name} for UNet modules, the layout read off the
    names themselves (levels, resnets per level, which levels attend): kohya's SDXL LoRAs
    name layers this way (`lora_unet_input_blocks_4_1_...`)."""
    modules = list(modules)
    levels = len({found[1] for m in modules if (found := _DOWN_LEVEL.match(m))})
    layers = len({found[1] for m in modules if (found := _FIRST_LEVEL_RESNET.match(m))})
    if not levels or not layers:
        return {}

    def attends(side: str, level: int) -> bool:
        return any(m.startswith(f"{side}.{level}.attentions.") for m in modules)

    kind = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
    config = SimpleNamespace(
        block_out_channels=range(levels),
        layers_per_block=layers,
        down_block_types=[kind[attends("down_blocks", level)] for level in range(levels)],
        up_block_types=[kind[attends("up_blocks", level)] for level in range(levels)],
    )
    prefixes = _unet_prefixes(config)
    ordered = sorted(prefixes, key=len, reverse=True)
    names = {}
    for module in modules:
        dotted = module + "."
        prefix = next((p for p in ordered if dotted.startswith(p)), None)
        if prefix is None:
            continue
        rest = dotted.removeprefix(prefix)
        for ours, theirs in _UNET_RESNET.items():
            if rest.startswith(ours):
                rest = theirs + rest.removeprefix(ours)
                break
        names[(prefixes[prefix] + rest).rstrip(".")] = module
    return names


def vae_to_original(vae) -> dict[str, Any]:
    config = vae.config
    levels, layers = len(config.block_out_channels), config.layers_per_block
    names = {
        "encoder.conv_norm_out.": "encoder.norm_out.",
        "decoder.conv_norm_out.": "decoder.norm_out.",
    }
    for side in ("encoder", "decoder"):
        names[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        for index in range(2):
            names[f"{side}.mid_block.resnets.{index}."] = f"{side}.mid.block_{index + 1}."
    for level in range(levels):
        for layer in range(layers):
            names[f"encoder.down_blocks.{level}.resnets.{layer}."] = (
                f"encoder.down.{level}.block.{layer}."
            )
        # The decoder's levels count up from the smallest in the original.
        for layer in range(layers + 1):
            names[f"decoder.up_blocks.{level}.resnets.{layer}."] = (
                f"decoder.up.{levels - 1 - level}.block.{layer}."
            )
        if level < levels - 1:
            names[f"encoder.down_blocks.{level}.downsamplers.0."] = (
                f"encoder.down.{level}.downsample."
            )
            names[f"decoder.up_blocks.{level}.upsamplers.0."] = (
                f"decoder.up.{levels - 1 - level}.upsample."
            )
    inner = {"conv_shortcut.": "nin_shortcut.", **_VAE_ATTENTION}
    tensors = _renamed(vae.state_dict(), names, inner=inner)
    # The original's attention projections are 1x1 convolutions.
    for key, value in tensors.items():
        projection = ".attn_1." in key and key.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out")
        if projection and key.endswith(".weight") and value.dim() == 2:
            tensors[key] = value[:, :, None, None]
    return tensors


def clip_to_original(text_encoder) -> dict[str, Any]:
    """A CLIPTextModel as the original stores it: under `text_model.` (transformers 5
    flattened the class, so its own names may lack that level)."""
    return {
        key if key.startswith("text_model.") else f"text_model.{key}": value
        for key, value in text_encoder.state_dict().items()
        if not key.endswith("position_ids")
    }


def open_clip_to_original(text_encoder) -> dict[str, Any]:
    """A CLIPTextModelWithProjection as OpenCLIP stores it (SDXL's second text tower)."""
    import torch

    state = {
        key.removeprefix("text_model."): value for key, value in text_encoder.state_dict().items()
    }
    tensors = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    for index in range(text_encoder.config.num_hidden_layers):
        layer = f"encoder.layers.{index}."
        block = f"transformer.resblocks.{index}."
        for part in ("weight", "bias"):
            tensors[f"{block}attn.in_proj_{part}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{part}") for p in ("q", "k", "v")]
            )
        for key in [k for k in state if k.startswith(layer)]:
            rest = key.removeprefix(layer)
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                if rest.startswith(ours):
                    rest = theirs + rest.removeprefix(ours)
                    break
            tensors[block + rest] = state.pop(key)
    leftover = [key for key in state if not key.endswith("position_ids")]
    if leftover:
        raise ValueError(f"no OpenCLIP name for {leftover[:3]}")
    return tensors


def _renamed(
    state: dict[str, Any], prefixes: dict[str, str], *, inner: dict[str, str]
) -> dict[str, Any]:
    """Each key under the longest matching prefix's original name, its inner part renamed."""
    ordered = sorted(prefixes, key=len, reverse=True)
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in ordered if key.startswith(p)), None)
        rest = key if prefix is None else key.removeprefix(prefix)
        for ours, theirs in inner.items():
            if rest.startswith(ours):
                rest = theirs + rest.removeprefix(ours)
                break
        renamed[rest if prefix is None else prefixes[prefix] + rest] = value
    return renamed


def _prefixed(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: value for key, value in tensors.items()}
