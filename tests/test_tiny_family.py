"""The tiny family is real: trained weights in the repository, copied to the cache whole, and
loaded back by from_pretrained exactly as Hub weights are."""

from __future__ import annotations

import hashlib

import torch
from diffusers import StableDiffusionPipeline

from pipelines.atomic_folder import MANIFEST_NAME
from pipelines.sd_builder import build_unet
from pipelines.tiny import (
    TINY_COLOURS,
    TINY_SHAPES,
    TINY_SIZE,
    TRAINED_TINY_DIR,
    build_tiny_components,
    ensure_tiny_family,
)


def _image(pipe):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(3)
    return pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=generator,
    ).images[0]


def _digests(folder):
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def test_the_cache_holds_the_repository_weights_file_for_file(tmp_path):
    folder = ensure_tiny_family(tmp_path)
    assert _digests(folder) == _digests(TRAINED_TINY_DIR)
    names = list(_digests(folder))
    assert any(name.endswith(".safetensors") for name in names)
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in names)
    for control_type in ("canny", "depth", "pose"):
        assert f"controlnet-{control_type}/diffusion_pytorch_model.safetensors" in names


def test_the_cached_copy_loads_with_from_pretrained_and_gives_the_same_image(tmp_path):
    in_memory = StableDiffusionPipeline(
        **build_tiny_components(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    loaded = StableDiffusionPipeline.from_pretrained(ensure_tiny_family(tmp_path))
    assert _image(in_memory).tobytes() == _image(loaded).tobytes()


def test_the_trained_weights_keep_the_family_architecture():
    untrained = build_unet(TINY_SIZE)
    trained = build_tiny_components()["unet"]
    shapes = {name: tuple(p.shape) for name, p in untrained.state_dict().items()}
    assert shapes == {name: tuple(p.shape) for name, p in trained.state_dict().items()}
    # ...and they are trained: not the builder's seeded starting point.
    conv_in = "conv_in.weight"
    assert not torch.equal(untrained.state_dict()[conv_in], trained.state_dict()[conv_in])


def test_tokenizer_is_a_real_bpe_that_knows_the_caption_words(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_family(tmp_path))
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a photo of a cat").input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert "photo</w>" in tokens  # learned merges, not single bytes
    for word in (*TINY_COLOURS, *TINY_SHAPES, "background"):
        assert pipe.tokenizer.tokenize(word) == [f"{word}</w>"], word


def test_folders_of_superseded_tiny_builds_are_removed(tmp_path, tiny_family):
    """A retrained tiny family lands in a new folder; the old one must not stay for good."""
    import shutil

    from pipelines.tiny import ensure_tiny_family

    cache = tmp_path / "cache"
    shutil.copytree(tiny_family, cache / tiny_family.name)
    for old in ("tiny-sd-000000000000", "tiny-xl-v0"):
        (cache / old / "unet").mkdir(parents=True)
        (cache / old / "unet" / "weights.safetensors").write_bytes(b"\0" * 1000)
    (cache / "outputs").mkdir()  # anything else in the cache is not the family's
    (cache / ".staging-tiny-sd-abc").mkdir()  # nor a concurrent builder's work
    assert ensure_tiny_family(cache) == cache / tiny_family.name
    left = sorted(p.name for p in cache.iterdir())
    assert left == sorted([".staging-tiny-sd-abc", "outputs", "tiny-xl-v0", tiny_family.name])


# ---- the tiny SDXL family, trained by tiny_training/train_xl.py -------------------------


def test_the_tiny_xl_cache_holds_its_repository_weights_file_for_file(tmp_path):
    from pipelines.tiny_xl import TRAINED_TINY_XL_DIR, ensure_tiny_xl_family

    folder = ensure_tiny_xl_family(tmp_path)
    assert _digests(folder) == _digests(TRAINED_TINY_XL_DIR)
    names = list(_digests(folder))
    assert not any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in names)
    for controlnet in (
        "controlnet-canny",
        "controlnet-depth",
        "controlnet-pose",
        "controlnet-union",
    ):
        assert f"{controlnet}/diffusion_pytorch_model.safetensors" in names


def test_the_tiny_xl_weights_are_trained_and_keep_the_sdxl_architecture():
    from diffusers import UNet2DConditionModel

    from pipelines.sdxl_builder import build_sdxl_unet
    from pipelines.tiny_xl import TINY_XL_SIZE, TRAINED_TINY_XL_DIR

    untrained = build_sdxl_unet(TINY_XL_SIZE).state_dict()
    trained = UNet2DConditionModel.from_pretrained(TRAINED_TINY_XL_DIR / "unet").state_dict()
    assert {k: tuple(v.shape) for k, v in untrained.items()} == {
        k: tuple(v.shape) for k, v in trained.items()
    }
    # The size embedding is SDXL's own: not in the SD run it starts from, and trained here.
    key = "add_embedding.linear_1.weight"
    assert not torch.equal(untrained[key], trained[key])


def test_the_tiny_xl_vae_is_the_tiny_vae_at_sdxl_scale():
    """The same pictures from the same scaled latents: only the latent scale differs, so
    the UNet sees unit-variance latents at SDXL's 0.13025 as the tiny UNet does at its own."""
    from diffusers import AutoencoderKL

    from pipelines.tiny_xl import TRAINED_TINY_XL_DIR
    from tiny_training import scenes, train

    sd = AutoencoderKL.from_pretrained(TRAINED_TINY_DIR / "vae").eval()
    xl = AutoencoderKL.from_pretrained(TRAINED_TINY_XL_DIR / "vae").eval()
    assert xl.config.scaling_factor == 0.13025 != sd.config.scaling_factor
    x = train.to_tensor(scenes.render(s) for s in scenes.random_scenes(4, 9)) * 2 - 1
    with torch.no_grad():
        sd_latents = sd.encode(x).latent_dist.mean * sd.config.scaling_factor
        xl_latents = xl.encode(x).latent_dist.mean * xl.config.scaling_factor
        assert torch.allclose(sd_latents, xl_latents, atol=1e-4)
        pictures = [
            vae.decode(z / vae.config.scaling_factor).sample
            for vae, z in ((sd, sd_latents), (xl, xl_latents))
        ]
    assert (pictures[0] - pictures[1]).abs().max() < 1e-3
