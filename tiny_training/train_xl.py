"""Train the tiny SDXL family (`tiny-xl`) on the same pictures, from a seed, on the CPU.

    python -m tiny_training.train_xl           # writes models/stencil-tiny-xl/
    python -m tiny_training.train_xl --quick   # a tenth of the steps, to try a change

Run after `python -m tiny_training.train`: the family starts from that run's VAE. What
differs from the SD 1.5-shaped run is what SDXL's UNet is told, and so what is trained:

- two text towers, whose last-but-one hidden states are joined, and the second tower's
  pooled projection, all through the pipeline's own `encode_prompt`, so the UNet learns
  from exactly the embeddings it will be given;
- a dropped caption is all zeros (embeddings and pooled), because SDXL pipelines give
  zeros, not the empty prompt's embeddings, as the unconditional half of guidance
  (`force_zeros_for_empty_prompt`), and so does the engine;
- the six size numbers, for the family's 64 px pictures: (64, 64, 0, 0, 64, 64);
- two kinds of ControlNet: one per control type, and one ControlNet Union model serving
  every type by its mode number (`pipelines.controls`: pose 0, depth 1, canny 3). Each
  controlled step trains one of them, half the time each.

The VAE is the SD run's, with its latent space rescaled (exactly: the encoder's last
convolution times k, the decoder's first divided by k) so that SDXL's scale, 0.13025,
gives latents of unit variance, as the real SDXL VAE differs from SD's in scale: code that
hard-codes SD's scale draws wrong pictures on this family too.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import sdxl_builder
from pipelines.atomic_folder import write_manifest
from pipelines.controls import union_mode
from pipelines.tiny import CONTROL_TYPES_WITH_TINY_CONTROLNET, TRAINED_TINY_DIR
from pipelines.tiny_xl import TINY_XL_SIZE, TRAINED_TINY_XL_DIR

from . import scenes
from .train import (
    CAPTION_DROPOUT,
    SceneSet,
    _encode_scenes,
    _forget_where_loaded_from,
    _noised,
    _optimise,
    joint_training,
)

# What the pipeline embeds for a 64 px picture: original size, crop corner, target size.
SIZE_NUMBERS = (scenes.SIDE, scenes.SIDE, 0, 0, scenes.SIDE, scenes.SIDE)


@dataclass(frozen=True)
class XLPlan:
    steps: int = 2500
    scenes: int = 16000
    batch: int = 48

    def scaled(self, factor: float) -> XLPlan:
        return XLPlan(
            steps=max(1, int(self.steps * factor)),
            scenes=max(self.batch * 4, int(self.scenes * factor)),
            batch=self.batch,
        )


def rescaled_vae(vae, scaling_factor: float):
    """`vae` with its latents multiplied by k so that `scaling_factor` makes them unit
    variance where its own measured factor did: the same pictures, another latent scale."""
    k = vae.config.scaling_factor / scaling_factor
    with torch.no_grad():
        channels = vae.config.latent_channels
        # quant_conv gives the posterior's mean, then its log variance, per latent channel.
        vae.quant_conv.weight[:channels] *= k
        vae.quant_conv.bias[:channels] *= k
        vae.quant_conv.bias[channels:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


def warm_start(module, trained, log, name: str) -> None:
    """Copy into `module` every weight of the trained SD-shaped `trained` that has a place
    of the same name and size (a 1x1 convolution's weights go into the linear layer SDXL
    uses instead). A cross-attention input widened by the second tower starts as the trained
    one on the first tower's columns and zero on the new ones, so it first reads what the SD
    model read. What SDXL adds (the second transformer at a level, the size embedding)
    keeps its seeded initial values."""
    own = module.state_dict()
    copied = 0
    with torch.no_grad():
        for key, value in trained.state_dict().items():
            target = own.get(key)
            if target is None:
                continue
            if target.numel() == value.numel():
                target.copy_(value.reshape(target.shape))
            elif key.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                target.zero_()
                target[:, : value.shape[1]] = value
            else:
                continue
            copied += value.numel()
    total = sum(v.numel() for v in own.values())
    log(f"{name}: {copied / total:.0%} of {total} weights from the SD run")


def train_xl(plan: XLPlan, seed: int, vae, trained_sd: Path, log) -> dict:
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    components = sdxl_builder.build_sdxl_components(TINY_XL_SIZE)
    components["vae"] = vae
    unet = components["unet"]
    # The SD run's UNet already draws the shapes; SDXL's learns its new conditioning on top,
    # which on this CPU is the difference between half an hour and two.
    warm_start(unet, UNet2DConditionModel.from_pretrained(trained_sd / "unet"), log, "unet")
    trained_text = CLIPTextModel.from_pretrained(trained_sd / "text_encoder")
    warm_start(components["text_encoder"], trained_text, log, "text_encoder")
    per_type = {
        kind: sdxl_builder.build_sdxl_controlnet(unet, TINY_XL_SIZE, index)
        for index, kind in enumerate(CONTROL_TYPES_WITH_TINY_CONTROLNET)
    }
    for kind, controlnet in per_type.items():
        trained = ControlNetModel.from_pretrained(trained_sd / f"controlnet-{kind}")
        warm_start(controlnet, trained, log, f"controlnet-{kind}")
    union = sdxl_builder.build_union_controlnet(unet, TINY_XL_SIZE)
    # From zero output convolutions (and zero mode projections), as ControlNet's recipe and
    # diffusers' own initialisation do; the builder's random ones are for an untrained model.
    with torch.no_grad():
        for controlnet in [*per_type.values(), union]:
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                conv.weight.zero_()
                conv.bias.zero_()
        for parameter in union.spatial_ch_projs.parameters():
            parameter.zero_()
    pipe = sdxl_builder._sdxl_pipeline(components)
    noise_schedule = DDPMScheduler.from_config(components["scheduler"].config)

    data = SceneSet.make(plan.scenes, seed + 21)
    log(f"xl: {len(data.scenes)} scenes, {len(data.figures)} figures; encoding")
    latents, maps = _encode_scenes(data, vae)
    captions = [s.caption for s in data.scenes]

    towers = [unet, components["text_encoder"], components["text_encoder_2"]]
    modules = [*towers, *per_type.values(), union]
    parameters, optimizer, schedule, average = joint_training(modules, plan.steps)
    rng = np.random.default_rng(seed + 32)
    generator = torch.Generator().manual_seed(seed + 33)
    modes = ("none", "canny", "depth", "pose")
    mode_odds = (0.3, 0.26, 0.26, 0.18)
    num_control_type = union.config.num_control_type
    time_ids = torch.tensor([SIZE_NUMBERS], dtype=torch.float32).repeat(plan.batch, 1)
    running: dict[str, list[float]] = {}
    for step in range(plan.steps):
        mode = str(rng.choice(modes, p=mode_odds))
        by_union = mode != "none" and bool(rng.random() < 0.5)
        pool = data.figures if mode == "pose" else np.arange(len(data.scenes))
        picked = rng.choice(pool, plan.batch)
        zt, noise, t = _noised(noise_schedule, latents[torch.from_numpy(picked)], generator)
        text, _, pooled, _ = pipe.encode_prompt(
            [captions[i] for i in picked], device="cpu", do_classifier_free_guidance=False
        )
        kept = torch.from_numpy(rng.random(plan.batch) >= CAPTION_DROPOUT).float()
        text = text * kept[:, None, None]
        pooled = pooled * kept[:, None]
        added = {"text_embeds": pooled, "time_ids": time_ids}
        residuals = {}
        if mode != "none":
            cond = maps[mode][torch.from_numpy(picked)].float().div(255).permute(0, 3, 1, 2)
            if by_union:
                index = union_mode(mode, {})
                control_type = torch.zeros(plan.batch, num_control_type)
                control_type[:, index] = 1
                down, mid = union(
                    zt,
                    t,
                    encoder_hidden_states=text,
                    controlnet_cond=[cond],
                    control_type=control_type,
                    control_type_idx=[index],
                    added_cond_kwargs=added,
                    return_dict=False,
                )
            else:
                down, mid = per_type[mode](
                    zt,
                    t,
                    encoder_hidden_states=text,
                    controlnet_cond=cond,
                    added_cond_kwargs=added,
                    return_dict=False,
                )
            residuals = {
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": mid,
            }
        prediction = unet(
            zt, t, encoder_hidden_states=text, added_cond_kwargs=added, **residuals
        ).sample
        loss = _optimise(F.mse_loss(prediction, noise), optimizer, schedule, clip=parameters)
        average.update(parameters, step)
        running.setdefault(f"{mode}{'/union' if by_union else ''}", []).append(loss)
        if step % 250 == 0 or step == plan.steps - 1:
            means = " ".join(f"{m} {np.mean(v[-50:]):.4f}" for m, v in sorted(running.items()))
            log(f"xl {step:5d}/{plan.steps} {means}")
    average.copy_to(parameters)
    for module in modules:
        module.eval()
    return {"pipe": pipe, "controlnets": per_type, "union": union}


def save_xl_family(parts: dict, folder: Path) -> None:
    """Write the trained family as `sdxl_builder.write_sdxl_family` lays one out."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    parts["pipe"].save_pretrained(staging, safe_serialization=True)
    for kind, controlnet in parts["controlnets"].items():
        controlnet.save_pretrained(staging / f"controlnet-{kind}", safe_serialization=True)
    parts["union"].save_pretrained(staging / sdxl_builder.UNION_FOLDER, safe_serialization=True)
    _forget_where_loaded_from(staging)
    write_manifest(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--out", type=Path, default=TRAINED_TINY_XL_DIR)
    parser.add_argument(
        "--vae-from", type=Path, default=TRAINED_TINY_DIR / "vae", help="the SD run's VAE"
    )
    parser.add_argument("--seed", type=int, default=TINY_XL_SIZE.sd.seed)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    plan = XLPlan().scaled(args.scale * (0.1 if args.quick else 1.0))
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    vae = AutoencoderKL.from_pretrained(args.vae_from).eval()
    vae = rescaled_vae(vae, TINY_XL_SIZE.sd.vae_scaling_factor)
    parts = train_xl(plan, args.seed, vae, args.vae_from.parent, log)
    save_xl_family(parts, args.out)
    log(f"saved {args.out}")


if __name__ == "__main__":
    main()
