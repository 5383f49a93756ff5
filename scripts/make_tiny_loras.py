"""Write the tiny family's LoRAs into `loras/` (or another folder), reproducibly.

    python scripts/make_tiny_loras.py            # rewrite loras/tiny-*.safetensors
    python scripts/make_tiny_loras.py --out DIR  # write them elsewhere (tests compare bytes)

The tiny model (`pipelines.tiny`) is built in memory to read its layer shapes; nothing is
downloaded. Each LoRA gets seeded random weights for both halves. (A trained LoRA's up
matrix starts at zero; a random one is what makes the effect visible on an untrained model.)
Every run writes the same tensors and metadata (the header's key order may differ: the
safetensors writer does not fix it), so tests can check the shipped files against it.

The set covers what the library must handle:

| file              | key layout       | rank | alpha | parts                       |
|-------------------|------------------|------|-------|-----------------------------|
| tiny-ink          | peft / diffusers | 4    | 4     | UNet attention              |
| tiny-neon         | peft / diffusers | 8    | 8     | UNet + text encoder         |
| tiny-watercolor   | peft / diffusers | 2    | 2     | UNet feed-forward           |
| tiny-sketch-kohya | kohya / A1111    | 16   | 8     | UNet + text encoder, fp16   |
| tiny-faded        | peft + metadata  | 8    | 2     | UNet attention              |

`tiny-faded` has alpha != rank, so it carries diffusers' `lora_adapter_metadata` (written by
diffusers' own `save_lora_weights`); without it the file would load at 4x its strength.

For the tiny SDXL family (`pipelines.tiny_xl`), `tiny-xl-sketch-kohya` is an SDXL LoRA as
kohya-ss writes one: rank 8, alpha 4, float16, UNet attention under the original SGM block
names (`lora_unet_input_blocks_4_1_...`) and both text encoders (`lora_te1_`, `lora_te2_`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 20261123


@dataclass(frozen=True)
class TinyLoraSpec:
    name: str
    rank: int
    unet_targets: tuple[str, ...]
    text_targets: tuple[str, ...] = ()
    layout: str = "peft"  # or "kohya"
    alpha: float | None = None  # None: alpha = rank (no metadata needed)
    strength: float = 1.0  # spread of the up weights; sized for a visible change
    half_precision: bool = False  # float16 on disk, as most shared LoRAs are

    @property
    def filename(self) -> str:
        return f"{self.name}.safetensors"


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
SPECS = (
    TinyLoraSpec("tiny-ink", rank=4, unet_targets=ATTENTION, strength=4.0),
    TinyLoraSpec(
        "tiny-neon",
        rank=8,
        unet_targets=("to_q", "to_v", "proj_in", "proj_out"),
        text_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
        strength=3.0,
    ),
    TinyLoraSpec(
        "tiny-watercolor", rank=2, unet_targets=("ff.net.0.proj", "ff.net.2"), strength=5.0
    ),
    TinyLoraSpec(
        "tiny-sketch-kohya",
        rank=16,
        unet_targets=(*ATTENTION, "proj_in"),
        # kohya trains all six text-encoder projections; with the mlp ones but without
        # out_proj, diffusers' key conversion drops the attention ones (lora_files refuses).
        text_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        layout="kohya",
        alpha=8.0,
        strength=4.0,
        half_precision=True,
    ),
    TinyLoraSpec(
        "tiny-faded", rank=8, unet_targets=("to_k", "to_v", "to_out.0"), alpha=2.0, strength=14.0
    ),
)


def write_tiny_loras(out: Path, specs: Iterable[TinyLoraSpec] = SPECS) -> list[Path]:
    """Write every spec's file into `out`; returns the paths written."""
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from pipelines.tiny import build_tiny_components

    components = build_tiny_components()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, spec in enumerate(specs):
        generator = torch.Generator().manual_seed(SEED + index)
        unet = _random_pairs(components["unet"], spec.unet_targets, spec, generator, attn_only=True)
        text = _random_pairs(
            components["text_encoder"], spec.text_targets, spec, generator, attn_only=False
        )
        path = out / spec.filename
        if spec.layout == "kohya":
            _save_kohya(path, unet, text, spec)
        else:
            _save_diffusers(out, unet, text, spec)
        written.append(path)
    return written


def _random_pairs(model, targets, spec, generator, *, attn_only: bool) -> dict:
    """{module name: (down, up)} for every Linear/Conv2d whose name ends with a target."""
    import torch

    pairs = {}
    for name, module in model.named_modules():
        if not targets or not name.endswith(targets):
            continue
        if attn_only and ".attentions." not in name:
            continue
        if isinstance(module, torch.nn.Linear):
            fan_in, fan_out, tail = module.in_features, module.out_features, ()
        elif isinstance(module, torch.nn.Conv2d):
            fan_in, fan_out, tail = module.in_channels, module.out_channels, (1, 1)
        else:
            continue
        down = torch.randn(spec.rank, fan_in, *tail, generator=generator) / fan_in**0.5
        up = torch.randn(fan_out, spec.rank, *tail, generator=generator) * spec.strength
        up = up / spec.rank**0.5
        if spec.half_precision:
            down, up = down.half(), up.half()
        pairs[name] = (down.contiguous(), up.contiguous())
    return pairs


def _save_diffusers(out: Path, unet: dict, text: dict, spec: TinyLoraSpec) -> None:
    from diffusers import StableDiffusionPipeline

    def layers(pairs: dict) -> dict:
        flat = {}
        for name, (down, up) in pairs.items():
            flat[f"{name}.lora_A.weight"] = down
            flat[f"{name}.lora_B.weight"] = up
        return flat

    def metadata(pairs: dict) -> dict | None:
        if spec.alpha is None or not pairs:
            return None
        # What peft's LoraConfig needs to rebuild the adapter at its trained scale.
        return {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(pairs)}

    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=layers(unet),
        text_encoder_lora_layers=layers(text) or None,
        weight_name=spec.filename,
        unet_lora_adapter_metadata=metadata(unet),
        text_encoder_lora_adapter_metadata=metadata(text),
    )


def _save_kohya(path: Path, unet: dict, text: dict, spec: TinyLoraSpec) -> None:
    """kohya-ss / A1111 keys: lora_unet_<name with _>.lora_down/.lora_up/.alpha."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for prefix, pairs in (("lora_unet_", unet), ("lora_te_text_model_", text)):
        for name, (down, up) in pairs.items():
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(float(spec.alpha or spec.rank))
    save_file(tensors, str(path), metadata={"format": "pt", "ss_network_dim": str(spec.rank)})


XL_SPEC = TinyLoraSpec(
    "tiny-xl-sketch-kohya",
    rank=8,
    unet_targets=ATTENTION,
    text_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    layout="kohya",
    alpha=4.0,
    strength=3.0,
    half_precision=True,
)


def write_tiny_xl_loras(out: Path) -> list[Path]:
    """The tiny SDXL family's kohya LoRA (its layer shapes from the family's builder)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO_ROOT))
    from pipelines.original_layout import sgm_unet_names
    from pipelines.sdxl_builder import build_sdxl_components
    from pipelines.tiny_xl import TINY_XL_SIZE

    components = build_sdxl_components(TINY_XL_SIZE)
    spec = XL_SPEC
    generator = torch.Generator().manual_seed(SEED + 100)
    unet = _random_pairs(components["unet"], spec.unet_targets, spec, generator, attn_only=True)
    modules = [name for name, _ in components["unet"].named_modules() if name]
    sgm = {module: original for original, module in sgm_unet_names(modules).items()}
    parts = [("lora_unet_", {sgm[name]: pair for name, pair in unet.items()})]
    for component, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        pairs = _random_pairs(components[component], spec.text_targets, spec, generator,
                              attn_only=False)  # fmt: skip
        named = {name if name.startswith("text_model.") else f"text_model.{name}": pair
                 for name, pair in pairs.items()}  # fmt: skip
        parts.append((prefix, named))
    tensors = {}
    for prefix, pairs in parts:
        for name, (down, up) in pairs.items():
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            tensors[f"{key}.alpha"] = torch.tensor(spec.alpha)
    out.mkdir(parents=True, exist_ok=True)
    path = out / spec.filename
    save_file(tensors, str(path), metadata={"format": "pt", "ss_network_dim": str(spec.rank)})
    return [path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "loras", help="target folder")
    args = parser.parse_args(argv)
    for path in write_tiny_loras(args.out) + write_tiny_xl_loras(args.out):
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
