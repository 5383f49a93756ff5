"""LyCORIS files for the tiny model, written by the LyCORIS library itself, and the truth.

Test-only: `lycoris-lora` (requirements-dev.txt) writes each format for the tiny UNet and
text encoder, and its own `merge_to` of the same file into a fresh copy of the model gives
the image Stencil must reproduce.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

# Attention, feed-forward and convolution layers: what LoRA trainers target on SD 1.x.
UNET_TARGETS = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_k",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
    "up_blocks.0.attentions.1.proj_out",
    "down_blocks.1.resnets.0.conv1",
    "up_blocks.1.resnets.0.conv2",
    "mid_block.resnets.0.conv1",
)
TE_TARGETS = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.0.self_attn.v_proj",
    "encoder.layers.0.mlp.fc1",
    "encoder.layers.1.self_attn.out_proj",
    "encoder.layers.1.mlp.fc2",
)
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
# Files in the wild name the text encoder the pre-transformers-5 way (text_model.encoder...).
_TE_OLD = "lora_te_text_model_"
_TE_NEW = "lora_te_"


def _network(module, prefix: str, targets, **kwargs):
    from lycoris import LycorisNetwork, create_lycoris

    # Presets as dicts (TOML in the lab notes): the built-in ones abort on a diffusers UNet.
    LycorisNetwork.apply_preset(
        {"target_module": [], "target_name": list(targets), "lora_prefix": prefix}
    )
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    return create_lycoris(module, multiplier=1.0, **kwargs)


def write_lycoris_file(
    pipe,
    path: Path,
    *,
    algo: str,
    components=("unet",),
    dtype=torch.float16,
    seed: int = 0,
    std: float = 0.15,
    vary_alphas: bool = False,
    targets=None,
    **kwargs,
) -> Path:
    """Create a LyCORIS network on copies of the components, give it seeded random weights
    (every tensor, so that none is the zero LyCORIS initialises `up` with), and save it."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for component in components:
        module = copy.deepcopy(getattr(pipe, component))
        names = targets or (UNET_TARGETS if component == "unet" else TE_TARGETS)
        network = _network(module, PREFIXES[component], names, algo=algo, **kwargs)
        network.apply_to()  # registers the modules, so that state_dict() holds them
        for index, (key, value) in enumerate(sorted(network.state_dict().items())):
            if key.endswith(".alpha"):
                value = value.clone().float()
                if vary_alphas:  # what resize_lora's dynamic methods and merges write
                    value = value * (0.25 + 0.5 * (index % 5))
            elif key.endswith("dora_scale"):
                value = value * (1 + 0.2 * torch.rand(value.shape, generator=generator))
            else:
                value = torch.randn(value.shape, generator=generator) * std
            key = key.replace(_TE_NEW, _TE_OLD, 1) if component == "text_encoder" else key
            state[key] = value.to(dtype).contiguous()
    save_file(state, str(path))
    return path


def lycoris_merge(pipe, path: Path, weight: float):
    """A copy of `pipe` with LyCORIS's own merge of the file at `weight`: the truth."""
    from lycoris import LycorisNetwork, create_lycoris_from_weights
    from safetensors.torch import load_file

    merged = copy.deepcopy(pipe)
    weights = load_file(str(path))
    for component, prefix in PREFIXES.items():
        part = {
            key.replace(_TE_OLD, _TE_NEW, 1): value.float()
            for key, value in weights.items()
            if key.startswith(f"{prefix}_")
        }
        if not part:
            continue
        LycorisNetwork.LORA_PREFIX = prefix
        network, _ = create_lycoris_from_weights(1.0, None, getattr(merged, component), part)
        with torch.no_grad():
            network.merge_to(weight)
    return merged
