"""SDXL-shaped model families at any size, with seeded random weights.

An SDXL model differs from an SD 1.5 one in what the UNet is told: two CLIP text towers
whose last-but-one hidden states are joined (so the UNet's cross-attention is as wide as
both), the second tower's pooled, projected output, and six size numbers (original size,
crop corner, target size) embedded with the timestep (`addition_embed_type="text_time"`).
`write_sdxl_family` builds all of that from configs, with per-control ControlNets and one
ControlNet Union model (every control type on one set of weights, as xinsir's), and writes
a diffusers folder that loads through the same `from_pretrained` code as real weights.

The VAE, the first text tower and the tokenizer are `pipelines.sd_builder`'s, at the sizes
of the `SDFamilySize` inside; each component is seeded just before it is built.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sd_builder import (
    MAX_PROMPT_TOKENS,
    SDFamilySize,
    build_text_encoder,
    build_vae,
    randomise_output_convs,
    unet_arguments,
)

# SDXL embeds each of its six size numbers (original h, w; crop top, left; target h, w).
SIZE_CONDITIONS = 6
# Where the ControlNet Union model is written inside a family folder.
UNION_FOLDER = "controlnet-union"


@dataclass(frozen=True)
class SDXLFamilySize:
    """An SDXL family: `sd` gives the UNet levels, the VAE and the first text tower (its
    `cross_attention_width` is that tower's width); the rest is what SDXL adds."""

    sd: SDFamilySize
    text_2_width: int  # the second tower's width and its projection's
    text_2_layers: int
    size_embedding_width: int  # `addition_time_embed_dim`, per size number
    transformer_layers: tuple[int, ...]  # per UNet level, as SDXL's (1, 2, 10)
    text_2_heads: int = 4
    text_2_intermediate: int = 96

    @property
    def cross_attention_width(self) -> int:
        return self.sd.cross_attention_width + self.text_2_width


def write_sdxl_family(
    folder: Path,
    size: SDXLFamilySize,
    control_types: Sequence[str] = (),
    *,
    union: bool = True,
    dtype: str = "float32",
) -> None:
    """Build the family at `size` into `folder`: the pipeline, a `controlnet-<type>` per
    control type and, with `union`, one `controlnet-union` serving every type."""
    import torch

    torch_dtype = getattr(torch, dtype)
    folder = Path(folder)
    # In the stored dtype before the ControlNets copy it: at SDXL's size the UNet alone is
    # 10 GB in float32, and each ControlNet half of that again.
    unet = build_sdxl_unet(size).to(torch_dtype)
    for index, control_type in enumerate(control_types):
        controlnet = build_sdxl_controlnet(unet, size, index).to(torch_dtype)
        controlnet.save_pretrained(folder / f"controlnet-{control_type}", safe_serialization=True)
        del controlnet
        gc.collect()
    if union:
        build_union_controlnet(unet, size).to(torch_dtype).save_pretrained(
            folder / UNION_FOLDER, safe_serialization=True
        )
    components = build_sdxl_components(size, unet=unet)
    pipe = _sdxl_pipeline(
        {
            name: part.to(torch_dtype) if hasattr(part, "parameters") else part
            for name, part in components.items()
        }
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def build_sdxl_components(size: SDXLFamilySize, *, unet=None) -> dict[str, Any]:
    """UNet, VAE, both text towers, both tokenizers and the scheduler, seeded, float32."""
    tokenizer = size.sd.tokenizer()
    # SDXL's second tokenizer is CLIP's too (it pads with "!" where the first pads with the
    # end token; the offline vocabulary has one padding token, used by both).
    tokenizer_2 = size.sd.tokenizer()
    return {
        "unet": unet if unet is not None else build_sdxl_unet(size),
        "vae": build_vae(size.sd),
        "text_encoder": build_text_encoder(size.sd, tokenizer),
        "text_encoder_2": build_text_encoder_2(size, tokenizer_2),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": sdxl_scheduler(),
    }


def build_sdxl_unet(size: SDXLFamilySize):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(size.sd.seed)
    return UNet2DConditionModel(
        **{**unet_arguments(size.sd), "cross_attention_dim": size.cross_attention_width},
        use_linear_projection=True,
        transformer_layers_per_block=size.transformer_layers,
        addition_embed_type="text_time",
        addition_time_embed_dim=size.size_embedding_width,
        # The six embedded size numbers, then the second tower's pooled projection.
        projection_class_embeddings_input_dim=SIZE_CONDITIONS * size.size_embedding_width
        + size.text_2_width,
    )


def build_text_encoder_2(size: SDXLFamilySize, tokenizer):
    """SDXL's second tower (OpenCLIP ViT-bigG's: 32 layers, width 1280), with projection."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = size.sd
    torch.manual_seed(sd.seed + 3)
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=sd.text_vocab_size or len(tokenizer),
            hidden_size=size.text_2_width,
            intermediate_size=size.text_2_intermediate,
            num_hidden_layers=size.text_2_layers,
            num_attention_heads=size.text_2_heads,
            max_position_embeddings=MAX_PROMPT_TOKENS,
            hidden_act="gelu",
            projection_dim=size.text_2_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_sdxl_controlnet(unet, size: SDXLFamilySize, index: int):
    """A ControlNet shaped after the SDXL `unet` (it takes the same size conditioning),
    with seeded non-zero output convolutions; `index` gives each control type its seed."""
    import torch
    from diffusers import ControlNetModel

    seed = size.sd.seed + 100 + index
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=size.sd.controlnet_embedding_widths
    )
    randomise_output_convs(controlnet, seed, size.sd.controlnet_output_scale)
    return controlnet


def build_union_controlnet(unet, size: SDXLFamilySize):
    """One ControlNet Union model for every control type (diffusers' ControlNetUnionModel,
    xinsir's layout): the control images' features pass a small transformer that mixes
    them with a learnt embedding per control mode, then one ControlNet trunk.

    `from_unet` keeps the real model's 320-wide mixing transformer, which must be as wide
    as the UNet's first level: here it is sized to the tiny UNet's."""
    import torch
    from diffusers import ControlNetUnionModel

    seed = size.sd.seed + 200
    torch.manual_seed(seed)
    width = size.sd.unet_widths[0]
    shaped = ControlNetUnionModel.from_unet(
        unet, conditioning_embedding_out_channels=size.sd.controlnet_embedding_widths
    )
    # Without `_use_default_values`, which would put back the defaults for what from_unet
    # did not say (the 320s among them).
    config = {key: value for key, value in shaped.config.items() if key != "_use_default_values"}
    config = {
        **config,
        "num_trans_channel": width,
        "num_trans_head": max(1, min(8, width // 16)),  # xinsir's has 8 at width 320
        "num_proj_channel": width,
    }
    torch.manual_seed(seed)
    union = ControlNetUnionModel.from_config(config)
    union.load_state_dict(
        {
            key: value
            for key, value in shaped.state_dict().items()
            if key.startswith(("conv_in.", "time_", "add_", "down_blocks.", "mid_block."))
        },
        strict=False,
    )
    randomise_output_convs(union, seed, size.sd.controlnet_output_scale)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # zero-initialised too: a fresh union model would ignore its modes
        for parameter in union.spatial_ch_projs.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return union


def sdxl_scheduler():
    """The scheduler SDXL base ships with (Euler, its noise schedule, leading spacing)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _sdxl_pipeline(components: dict[str, Any]):
    from diffusers import StableDiffusionXLPipeline

    # No invisible watermark: diffusers adds one only where the package is installed, and
    # an image must be the same bytes wherever it is made.
    return StableDiffusionXLPipeline(**components, add_watermarker=False)
