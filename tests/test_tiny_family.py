"""The tiny family is real: built in memory, saved, and loaded back by from_pretrained."""

from __future__ import annotations

import hashlib

import torch
from diffusers import StableDiffusionPipeline

from pipelines.tiny import build_tiny_components, ensure_tiny_family, write_tiny_family


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    return pipe(
        "a cat on a chair", num_inference_steps=2, height=64, width=64, generator=generator
    ).images[0]


def test_saved_family_loads_with_from_pretrained_and_gives_the_same_image(tmp_path):
    in_memory = StableDiffusionPipeline(
        **build_tiny_components(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = ensure_tiny_family(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    assert _image(in_memory).tobytes() == _image(loaded).tobytes()


def test_same_seed_writes_the_same_bytes(tmp_path):
    write_tiny_family(tmp_path / "a")
    write_tiny_family(tmp_path / "b")
    built = tmp_path / "a"
    files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert any(str(f).endswith(".safetensors") for f in files)
    assert not any(str(f).endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    for relative in files:
        digest_a = hashlib.sha256((tmp_path / "a" / relative).read_bytes()).hexdigest()
        digest_b = hashlib.sha256((tmp_path / "b" / relative).read_bytes()).hexdigest()
        assert digest_a == digest_b, relative


def test_tokenizer_is_a_real_bpe(tmp_path):
    folder = ensure_tiny_family(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a photo of a cat").input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "photo</w>" in tokens  # learned merges, not single bytes
