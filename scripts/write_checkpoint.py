"""Write a model family as one single-file checkpoint in the original (A1111 / Civitai)
layout, the file `--model FILE.safetensors` loads.

    python scripts/write_checkpoint.py tiny-xl tiny-xl.safetensors
    python app.py --model tiny-xl.safetensors --model-config tiny-xl

FAMILY is a registry name (the built-in tiny families are made or copied into Stencil's
cache first) or a diffusers folder. Only weights are written: the configs, tokenizers and
scheduler stay with the family, which is why `--model-config` names it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", help="registry family (tiny, tiny-xl, ...) or diffusers folder")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error("the checkpoint is written as .safetensors")
    sys.path.insert(0, str(REPO_ROOT))
    from safetensors.torch import save_file

    from pipelines.families import resolve_family
    from pipelines.original_layout import original_state_dict
    from pipelines.settings import cache_dir

    family = resolve_family(args.family)
    pipe = family.pipeline_class("text2img").from_pretrained(family.locate(cache_dir()))
    tensors = {key: value.contiguous() for key, value in original_state_dict(pipe).items()}
    save_file(tensors, str(args.out), metadata={"format": "pt"})
    print(f"wrote {args.out} ({len(tensors)} tensors, {args.out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
