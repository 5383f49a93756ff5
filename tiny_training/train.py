"""Train the tiny family on pictures made in code, from a seed, on the CPU.

    python -m tiny_training.train            # every stage, into models/stencil-tiny and loras/
    python -m tiny_training.train --quick    # a tenth of the steps, to try a change

Stages, each starting from the previous one's output:
1. `vae`: the autoencoder learns to reconstruct scenes in every style; its latent scale is
   then measured and written to its config, as Stable Diffusion's 0.18215 was.
2. `base`: the UNet, the text encoder and the three ControlNets, trained together. Each step
   runs one control type (or none) for the whole batch; a tenth of the captions are dropped
   for classifier-free guidance. Shapes sit at random places that captions never mention, so
   the place can only come from a map: that is what makes the ControlNets steer. Training
   them with the UNet, rather than on a frozen one as ControlNet's paper does, lets this
   small model learn control in minutes instead of the thousands of steps a frozen-base
   ControlNet needs before its "sudden convergence".
3. `loras`: with everything else frozen, one LoRA per style ("inverted", "outlined") on the
   UNet's attention, feed-forward, projection and resnet convolution layers, saved in
   diffusers' LoRA layout.

The architecture and its initial weights are the family's own (`pipelines.tiny.TINY_SIZE`,
built by `pipelines.sd_builder`), so the trained folder loads through the same
`from_pretrained` code as before.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines import sd_builder
from pipelines.atomic_folder import write_manifest
from pipelines.tiny import CONTROL_TYPES_WITH_TINY_CONTROLNET, TINY_SEED, TINY_SIZE

from . import scenes

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = ROOT / "models" / "stencil-tiny"
LORA_DIR = ROOT / "loras"
WORK_DIR = ROOT / ".cache" / "tiny-training"
CAPTION_DROPOUT = 0.1
LORA_RANK = 8
LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
]


@dataclass(frozen=True)
class Plan:
    vae_steps: int = 2000
    vae_batch: int = 32
    base_steps: int = 7000
    lora_steps: int = 600
    scenes: int = 16000
    batch: int = 48

    def scaled(self, factor: float) -> Plan:
        return Plan(
            vae_steps=max(1, int(self.vae_steps * factor)),
            base_steps=max(1, int(self.base_steps * factor)),
            lora_steps=max(1, int(self.lora_steps * factor)),
            scenes=max(self.batch * 4, int(self.scenes * factor)),
            vae_batch=self.vae_batch,
            batch=self.batch,
        )


# --------------------------------------------------------------------------- data


@dataclass
class SceneSet:
    scenes: list[scenes.Scene]
    figures: np.ndarray  # indices of the figure scenes

    @classmethod
    def make(cls, count: int, seed: int) -> SceneSet:
        made = scenes.random_scenes(count, seed)
        figures = np.array([i for i, s in enumerate(made) if s.shape == scenes.FIGURE])
        return cls(made, figures)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> float NCHW in [0, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- stages


def train_vae(plan: Plan, seed: int, log) -> torch.nn.Module:
    vae = sd_builder.build_vae(TINY_SIZE)
    vae.train()
    data = SceneSet.make(plan.scenes // 2, seed + 11)
    rng = np.random.default_rng(seed + 12)
    generator = torch.Generator().manual_seed(seed + 13)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = _cosine(optimizer, plan.vae_steps)
    for step in range(plan.vae_steps):
        picked = rng.integers(0, len(data.scenes), plan.vae_batch)
        styles = rng.choice(scenes.STYLES, size=plan.vae_batch, p=(0.6, 0.2, 0.2))
        batch = to_tensor(
            scenes.render(scenes.with_style(data.scenes[i], str(style)))
            for i, style in zip(picked, styles)
        )
        x = batch * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()
        # L1 beside MSE keeps edges sharper: a blurred corner turns a square into a circle.
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
        _optimise(loss, optimizer, schedule)
        if step % 100 == 0 or step == plan.vae_steps - 1:
            log(f"vae {step:5d}/{plan.vae_steps} mse {F.mse_loss(recon, x).item():.4f}")
    vae.eval()
    with torch.no_grad():
        sample = to_tensor(scenes.render(s) for s in data.scenes[:512]) * 2 - 1
        std = vae.encode(sample).latent_dist.mean.std().item()
    # Stable Diffusion scales its latents to unit variance; so does this VAE.
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    log(f"vae latent std {std:.4f} -> scaling_factor {vae.config.scaling_factor}")
    return vae


def train_base(plan: Plan, seed: int, vae, log) -> dict:
    from diffusers import DDPMScheduler

    components = sd_builder.build_components(TINY_SIZE)
    unet, text_encoder, tokenizer = (
        components["unet"],
        components["text_encoder"],
        components["tokenizer"],
    )
    controlnets = {
        kind: sd_builder.build_controlnet(unet, TINY_SIZE, index)
        for index, kind in enumerate(CONTROL_TYPES_WITH_TINY_CONTROLNET)
    }
    # Training starts ControlNets from zero output convolutions, as ControlNet's recipe does:
    # the builder's random ones are for the untrained model, where they must change images.
    with torch.no_grad():
        for controlnet in controlnets.values():
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                conv.weight.zero_()
                conv.bias.zero_()
    noise_schedule = DDPMScheduler.from_config(components["scheduler"].config)

    data = SceneSet.make(plan.scenes, seed + 21)
    log(f"base: {len(data.scenes)} scenes, {len(data.figures)} figures; encoding")
    latents, maps = _encode_scenes(data, vae)
    captions = sorted({s.caption for s in data.scenes} | {""})
    ids = _token_ids(tokenizer, captions)
    caption_index = {caption: i for i, caption in enumerate(captions)}
    scene_caption = torch.tensor([caption_index[s.caption] for s in data.scenes])
    empty = caption_index[""]

    modules = [unet, text_encoder, *controlnets.values()]
    parameters, optimizer, schedule, average = joint_training(modules, plan.base_steps)
    rng = np.random.default_rng(seed + 22)
    generator = torch.Generator().manual_seed(seed + 23)
    modes = ("none", "canny", "depth", "pose")
    # Colours come only from the caption in every mode; the shape too when no map is given.
    mode_odds = (0.34, 0.24, 0.24, 0.18)
    running = {mode: [] for mode in modes}
    for step in range(plan.base_steps):
        mode = str(rng.choice(modes, p=mode_odds))
        pool = data.figures if mode == "pose" else np.arange(len(data.scenes))
        picked = torch.from_numpy(rng.choice(pool, plan.batch))
        zt, noise, t = _noised(noise_schedule, latents[picked], generator)
        chosen = scene_caption[picked].clone()
        chosen[torch.from_numpy(rng.random(plan.batch) < CAPTION_DROPOUT)] = empty
        text = text_encoder(ids[chosen])[0]
        residuals = {}
        if mode != "none":
            cond = maps[mode][picked].float().div(255).permute(0, 3, 1, 2)
            down, mid = controlnets[mode](
                zt, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False
            )
            residuals = {
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": mid,
            }
        prediction = unet(zt, t, encoder_hidden_states=text, **residuals).sample
        loss = _optimise(F.mse_loss(prediction, noise), optimizer, schedule, clip=parameters)
        average.update(parameters, step)
        running[mode].append(loss)
        if step % 250 == 0 or step == plan.base_steps - 1:
            means = " ".join(f"{m} {np.mean(v[-50:]):.4f}" for m, v in running.items() if v)
            log(f"base {step:5d}/{plan.base_steps} {means}")
    average.copy_to(parameters)
    for module in modules:
        module.eval()
    return {**components, "controlnets": controlnets}


def joint_training(modules, steps: int):
    """The base stage's optimiser over every weight of `modules` (put in training mode): the
    weights, AdamW, its warm-up and cosine schedule, and the weight average that is saved."""
    for module in modules:
        module.train()
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-4)
    schedule = _cosine(optimizer, steps, warmup=200)
    return parameters, optimizer, schedule, WeightAverage(parameters)


class WeightAverage:
    """An exponential moving average of the weights, which are what gets saved: a diffusion
    model sampled from averaged weights draws cleaner pictures than from the last step's."""

    def __init__(self, parameters, decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, parameters, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, p in zip(self.shadow, parameters):
            average.mul_(decay).add_(p.detach(), alpha=1 - decay)

    @torch.no_grad()
    def copy_to(self, parameters) -> None:
        for average, p in zip(self.shadow, parameters):
            p.copy_(average)


def _latents(vae, images) -> torch.Tensor:
    """Scaled latent means of PIL images, 256 at a time (what the UNet learns to denoise)."""
    images = list(images)
    with torch.no_grad():
        return torch.cat(
            [
                vae.encode(to_tensor(images[i : i + 256]) * 2 - 1).latent_dist.mean
                * vae.config.scaling_factor
                for i in range(0, len(images), 256)
            ]
        )


def _token_ids(tokenizer, captions) -> torch.Tensor:
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def _noised(noise_schedule, z0: torch.Tensor, generator):
    """`z0` noised at uniformly drawn timesteps: (noisy latents, the noise, the timesteps)."""
    noise = torch.randn(z0.shape, generator=generator)
    t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(z0),), generator=generator)
    return noise_schedule.add_noise(z0, noise, t), noise, t


def _encode_scenes(data: SceneSet, vae) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pose = torch.zeros(len(data.scenes), scenes.SIDE, scenes.SIDE, 3, dtype=torch.uint8)
    for i in data.figures:
        pose[i] = torch.from_numpy(np.array(scenes.pose_map(data.scenes[i])))
    maps = {
        "canny": torch.from_numpy(np.stack([np.asarray(scenes.canny_map(s)) for s in data.scenes])),
        "depth": torch.from_numpy(np.stack([np.asarray(scenes.depth_map(s)) for s in data.scenes])),
        "pose": pose,
    }
    return _latents(vae, (scenes.render(s) for s in data.scenes)), maps


def train_lora(style: str, plan: Plan, seed: int, pipe_parts: dict, log) -> dict:
    """One style LoRA on the frozen UNet; returns its diffusers-layout state dict."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig, get_peft_model_state_dict

    unet, text_encoder, tokenizer, vae = (
        pipe_parts["unet"],
        pipe_parts["text_encoder"],
        pipe_parts["tokenizer"],
        pipe_parts["vae"],
    )
    torch.manual_seed(seed)
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    adapter = f"style-{style}"
    unet.add_adapter(
        LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_RANK,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGETS,
        ),
        adapter_name=adapter,
    )
    unet.set_adapter(adapter)
    noise_schedule = DDPMScheduler.from_config(pipe_parts["scheduler"].config)
    data = SceneSet.make(plan.scenes // 4, seed + 1)
    latents = _latents(vae, (scenes.render(scenes.with_style(s, style)) for s in data.scenes))
    captions = [s.caption for s in data.scenes]
    with torch.no_grad():
        text = torch.cat(
            [
                text_encoder(_token_ids(tokenizer, captions[i : i + 256]))[0]
                for i in range(0, len(captions), 256)
            ]
        )
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3)
    schedule = _cosine(optimizer, plan.lora_steps, warmup=50)
    rng = np.random.default_rng(seed + 2)
    generator = torch.Generator().manual_seed(seed + 3)
    unet.train()
    for step in range(plan.lora_steps):
        picked = torch.from_numpy(rng.integers(0, len(data.scenes), plan.batch))
        zt, noise, t = _noised(noise_schedule, latents[picked], generator)
        prediction = unet(zt, t, encoder_hidden_states=text[picked]).sample
        loss = _optimise(F.mse_loss(prediction, noise), optimizer, schedule)
        if step % 200 == 0 or step == plan.lora_steps - 1:
            log(f"lora {style} {step:5d}/{plan.lora_steps} loss {loss:.4f}")
    unet.eval()
    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    unet.delete_adapters(adapter)
    # diffusers' LoRA layout: "unet." before each peft key (what save_lora_weights writes).
    return {f"unet.{key}": value.detach().contiguous() for key, value in state.items()}


def _optimise(loss, optimizer, schedule, *, clip=None) -> float:
    """One optimiser step on `loss` (gradients clipped to norm 1 over `clip`, if given)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    schedule.step()
    return loss.item()


def _cosine(optimizer, steps: int, warmup: int = 100):
    warmup = min(warmup, max(1, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- saving


def save_family(parts: dict, vae, folder: Path) -> None:
    """Write the trained family as a diffusers folder, as `sd_builder.write_sd_family` does."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe = sd_builder._pipeline(
        {
            "unet": parts["unet"],
            "vae": vae,
            "text_encoder": parts["text_encoder"],
            "tokenizer": parts["tokenizer"],
            "scheduler": parts["scheduler"],
        }
    )
    pipe.save_pretrained(staging, safe_serialization=True)
    for kind, controlnet in parts["controlnets"].items():
        controlnet.save_pretrained(staging / f"controlnet-{kind}", safe_serialization=True)
    _forget_where_loaded_from(staging)
    # The family's cache copy is checked against this manifest, and named by its digest.
    write_manifest(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def _forget_where_loaded_from(folder: Path) -> None:
    """diffusers records the folder a model was loaded from (the VAE's, here a training work
    folder) as `_name_or_path`; a machine's path has no place in shipped weights."""
    for config in folder.rglob("config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_lora(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        state,
        str(path),
        metadata={"format": "pt", "stencil": json.dumps({"trained_on": "tiny", "rank": LORA_RANK})},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--stages", default="vae,base,loras")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--lora-out", type=Path, default=LORA_DIR)
    parser.add_argument("--seed", type=int, default=TINY_SEED)
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="where stages hand over")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    plan = Plan().scaled(args.scale * (0.1 if args.quick else 1.0))
    stages = args.stages.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", flush=True)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if "vae" in stages:
        vae = train_vae(plan, args.seed, log)
        vae.save_pretrained(args.work / "vae", safe_serialization=True)
    vae = AutoencoderKL.from_pretrained(args.work / "vae").eval()
    if "base" in stages:
        parts = train_base(plan, args.seed, vae, log)
        save_family(parts, vae, args.out)
        log(f"saved {args.out}")
    folder = args.out
    if "loras" in stages:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder"),
            "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            "vae": AutoencoderKL.from_pretrained(folder / "vae"),
            "scheduler": sd_builder.sd15_scheduler(),
        }
        for offset, style in enumerate(("inverted", "outlined")):
            state = train_lora(style, plan, args.seed + 1000 * (offset + 1), parts, log)
            save_lora(state, args.lora_out / f"tiny-{style}.safetensors")
            log(f"saved tiny-{style}")
    log("done")


if __name__ == "__main__":
    main()
