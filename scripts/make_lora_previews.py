"""Draw the picker's thumbnail of each tiny-family LoRA in the library, with that LoRA.

    python scripts/make_lora_previews.py            # rewrite loras/previews/*.png
    python scripts/make_lora_previews.py --out DIR  # write them elsewhere

Each picture is one generation on the LoRA's own tiny family (offline, nothing downloaded):
the same prompt and seed for every LoRA, plus the LoRA's trigger words, at its catalogue
default weight, so that thumbnails side by side show what each LoRA does. A catalogue entry
names its picture with `"preview": "previews/<name>.png"`; this script writes the pictures,
and says which entries do not name theirs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"
SEED = 7
STEPS = 20
FAMILIES_DRAWN = ("tiny", "tiny-xl")


def preview_path(folder: Path, name: str) -> Path:
    return folder / "previews" / f"{name}.png"


def write_previews(library: Path, out: Path) -> list[Path]:
    from pipelines.engine import Engine
    from pipelines.families import FAMILIES
    from pipelines.requests import GenerationRequest, LoraChoice

    written = []
    for family in FAMILIES_DRAWN:
        engine = Engine(FAMILIES[family], lora_folder=library, dtype="float32")
        for entry in engine.loras.entries():
            if entry.base != family or entry.file is None:
                continue
            request = GenerationRequest(
                prompt=", ".join([*entry.trigger_words, PROMPT]),
                seed=SEED,
                steps=STEPS,
                loras=(LoraChoice(entry.name, entry.default_weight),),
            )
            image = engine.generate(request).images[0]
            path = preview_path(out, entry.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format="PNG", optimize=True)
            written.append(path)
            if entry.preview != f"previews/{entry.name}.png":
                print(f"note: catalogue entry {entry.name!r} does not name {path.name}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=ROOT / "loras")
    parser.add_argument("--out", type=Path, default=None, help="default: the library folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    for path in write_previews(args.library, args.out or args.library):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
