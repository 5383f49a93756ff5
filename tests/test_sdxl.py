"""SDXL on the built-in tiny SDXL family: every feature through the same engine.

These tests assert the SDXL code paths: what changes and what is restored (a LoRA changes
the image, weight 0 gives the base back bit for bit, a control map changes it). What the
trained tiny SDXL model draws, and how its ControlNets and the Union model steer it, is
measured in tests/test_adherence.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT, pixels
from PIL import Image, ImageDraw

from pipelines.engine import Engine
from pipelines.errors import InvalidRequestError, LoraRejectedError
from pipelines.families import FAMILIES
from pipelines.recipe import python_snippet
from pipelines.requests import ControlUnit, GenerationRequest, LoraChoice
from pipelines.tiny_xl import TINY_XL_SIZE

SESSION = "xl-session"


@pytest.fixture(scope="module")
def xl(cache_root) -> Engine:
    return Engine(FAMILIES["tiny-xl"], cache_root=cache_root, lora_folder=ROOT / "loras")


def small(prompt="a red circle", seed=3, **fields) -> GenerationRequest:
    fields = {"steps": 2, "width": 64, "height": 64, **fields}
    return GenerationRequest(prompt, seed=seed, **fields)


def shapes(shift: int = 0) -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8 + shift, 10, 36 + shift, 50), fill="white")
    draw.ellipse((40, 30 - shift, 58, 48 - shift), fill="grey")
    return image


def differs(a: Image.Image, b: Image.Image) -> bool:
    return np.abs(pixels(a) - pixels(b)).mean() > 1.0


# ---- the family ------------------------------------------------------------------------


def test_the_tiny_xl_family_is_sdxl_shaped_and_loads_like_real_weights(xl):
    base = xl.base
    assert type(base).__name__ == "StableDiffusionXLPipeline"
    assert base.unet.config.addition_embed_type == "text_time"
    assert type(base.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    widths = TINY_XL_SIZE.sd.cross_attention_width + TINY_XL_SIZE.text_2_width
    assert base.unet.config.cross_attention_dim == widths
    assert base.vae.config.scaling_factor == pytest.approx(0.13025)
    assert xl.status.architecture == "sdxl"


def test_text_to_image_is_reproducible_and_follows_the_prompt(xl):
    first = xl.generate(small(seed=5)).images[0]
    assert first.size == (64, 64)
    assert xl.generate(small(seed=5)).images[0].tobytes() == first.tobytes()
    assert differs(xl.generate(small("a blue square", seed=5)).images[0], first)
    assert differs(xl.generate(small(seed=6)).images[0], first)


def test_each_control_and_two_at_once_change_the_image(xl):
    plain = xl.generate(small(seed=7)).images[0]
    for control_type in ("canny", "pose", "depth"):
        unit = ControlUnit(control_type, shapes(), resolution=64)
        result = xl.generate(small(seed=7, controls=(unit,)))
        assert differs(result.images[0], plain), control_type
    pose_and_depth = (
        ControlUnit("pose", shapes(), resolution=64),
        ControlUnit("depth", shapes(4), resolution=64),
    )
    both = xl.generate(small(seed=7, controls=pose_and_depth))
    only_depth = xl.generate(small(seed=7, controls=pose_and_depth[1:]))
    assert differs(both.images[0], only_depth.images[0])
    ran = [c["controlnet"] for c in both.recipe.controls]
    assert ran == ["controlnet-pose", "controlnet-depth"]


def test_the_guidance_window_skips_the_controlnet_outside_it(xl):
    """A unit whose window is the first half of the steps runs its ControlNet half as
    often (one forward per step, both guidance halves in one batch)."""
    forwards = []
    net = xl.controlnet("controlnet-canny")
    hook = net.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        for end in (1.0, 0.5):
            unit = ControlUnit("canny", shapes(), resolution=64, guidance_end=end)
            xl.generate(small(seed=8, steps=4, controls=(unit,)))
    finally:
        hook.remove()
    assert len(forwards) == 4 + 2


def test_size_conditioning_is_said_and_recorded(xl):
    result = xl.generate(small(seed=9, width=64, height=48))
    assert result.recipe.model["size_conditioning"] == {
        "original_size": [48, 64],
        "crops_coords_top_left": [0, 0],
        "target_size": [48, 64],
    }


def test_prompt_length_warnings_cover_both_encoders(xl):
    long = " ".join(["red circle"] * 60)
    result = xl.generate(small(long, seed=1))
    assert len(result.warnings) == 1  # both encoders read it alike: said once
    assert "the model reads the first 75" in result.warnings[0]


def test_the_recipe_snippet_names_the_sdxl_classes_and_redraws_the_image(xl, tmp_path):
    unit = ControlUnit("canny", shapes(), resolution=64)
    result = xl.generate(small(seed=11, controls=(unit,), scheduler="DPM++ 2M"))
    snippet = python_snippet(result.recipe)
    assert "StableDiffusionXLControlNetPipeline" in snippet
    assert "from pipelines.tiny_xl import ensure_tiny_xl_family" in snippet
    assert "original_size=(64, 64)" in snippet
    assert "torch.bfloat16 if device" in snippet  # SDXL's VAE overflows in float16
    result.control_maps[0].save(tmp_path / "control_map_0.png")
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        exec(compile(snippet, "recipe-snippet", "exec"), namespace)
    assert namespace["image"].tobytes() == result.images[0].tobytes()


# ---- one ControlNet Union model for every control ------------------------------------


@pytest.fixture(scope="module")
def union(cache_root) -> Engine:
    return Engine(
        FAMILIES["tiny-xl"], cache_root=cache_root, lora_folder=ROOT / "loras", controlnet="union"
    )


def test_every_control_runs_on_one_union_model_each_with_its_mode(union, xl):
    plain = union.generate(small(seed=14)).images[0]
    two = (
        ControlUnit("pose", shapes(), resolution=64),
        ControlUnit("depth", shapes(), resolution=64),
    )
    both = union.generate(small(seed=14, controls=two))
    assert differs(both.images[0], plain)
    assert list(union._controlnets) == ["controlnet-union"]  # one set of weights loaded
    assert type(union._controlnets["controlnet-union"]).__name__ == "ControlNetUnionModel"
    assert [(c["controlnet"], c["union_mode"]) for c in both.recipe.controls] == [
        ("controlnet-union", 0),
        ("controlnet-union", 1),
    ]
    # The mode matters: the same map read as pose or as depth steers differently.
    as_pose = union.generate(small(seed=14, controls=two[:1])).images[0]
    as_depth = union.generate(small(seed=14, controls=two[1:])).images[0]
    assert differs(as_pose, as_depth)
    # And it is not the per-control model's image.
    assert differs(as_pose, xl.generate(small(seed=14, controls=two[:1])).images[0])
    assert "ControlNet Union" in union.status.controlnets


def test_a_union_recipe_snippet_redraws_the_image(union, tmp_path):
    units = (
        ControlUnit("canny", shapes(), resolution=64),
        ControlUnit("pose", shapes(3), resolution=64, conditioning_scale=0.6),
    )
    result = union.generate(small(seed=15, controls=units))
    snippet = python_snippet(result.recipe)
    assert "StableDiffusionXLControlNetUnionPipeline" in snippet
    assert "control_mode=[3, 0]" in snippet
    for index, control_map in enumerate(result.control_maps):
        control_map.save(tmp_path / f"control_map_{index}.png")
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        exec(compile(snippet, "recipe-snippet", "exec"), namespace)
    assert namespace["image"].tobytes() == result.images[0].tobytes()


def test_union_on_a_family_without_one_is_refused_by_name(cache_root):
    with pytest.raises(InvalidRequestError, match="no ControlNet Union model for the tiny"):
        Engine(FAMILIES["tiny"], cache_root=cache_root, controlnet="union")


# ---- LoRAs -----------------------------------------------------------------------------


def sdxl_lora_modules(pipe) -> dict[str, list[tuple[str, tuple[int, int]]]]:
    """Per component, the attention projections a LoRA for this model targets, with their
    (out, in) shapes: UNet self- and cross-attention, both text encoders' q/k/v/out."""
    found: dict[str, list] = {"unet": [], "text_encoder": [], "text_encoder_2": []}
    for component in found:
        for name, module in getattr(pipe, component).named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj", "out_proj"):
                found[component].append((name, tuple(module.weight.shape)))
    return found


def sgm_name(module: str) -> str:
    """A diffusers UNet module name of the tiny SDXL UNet (two layers per block) in the
    original SGM layout kohya's SDXL LoRAs use: down_blocks.1.attentions.0 is
    input_blocks.4.1, mid_block.attentions.0 middle_block.1, up_blocks.0.attentions.2
    output_blocks.2.1."""
    parts = module.split(".")
    if parts[0] == "down_blocks":
        block, layer, rest = int(parts[1]), int(parts[3]), parts[4:]
        return ".".join(["input_blocks", str(1 + block * 3 + layer), "1", *rest])
    if parts[0] == "mid_block":
        return ".".join(["middle_block", "1", *parts[3:]])
    block, layer, rest = int(parts[1]), int(parts[3]), parts[4:]
    return ".".join(["output_blocks", str(block * 3 + layer), "1", *rest])


def text_model_name(module: str) -> str:
    """transformers 5 flattened CLIPTextModel; LoRA files still name `text_model.`."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def random_sdxl_lora(pipe, seed: int, rank: int = 4, alpha: float = 2.0, parts=None):
    """A seeded LoRA for the tiny SDXL model, in both layouts: peft/diffusers keys, and
    the same adapter in kohya keys (lora_te1_, lora_te2_, SGM UNet names, alpha < rank)."""
    import torch
    from safetensors.torch import save

    generator = torch.Generator().manual_seed(seed)
    peft, kohya = {}, {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for component, modules in sdxl_lora_modules(pipe).items():
        if parts is not None and component not in parts:
            continue
        for module, (out_features, in_features) in modules:
            down = torch.randn(rank, in_features, generator=generator) * 0.3
            up = torch.randn(out_features, rank, generator=generator) * 0.3
            named = sgm_name(module) if component == "unet" else text_model_name(module)
            key = prefixes[component] + named.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up * (rank / alpha)  # alpha/rank scales it back
            kohya[f"{key}.alpha"] = torch.tensor(alpha)
            diffusers_name = module if component == "unet" else text_model_name(module)
            peft[f"{component}.{diffusers_name}.lora_A.weight"] = down
            peft[f"{component}.{diffusers_name}.lora_B.weight"] = up
    return save(peft), save(kohya, metadata={"format": "pt"})


def test_sdxl_loras_in_both_layouts_change_the_image_alike_and_weight_0_restores(xl):
    peft_bytes, kohya_bytes = random_sdxl_lora(xl.base, seed=1)
    peft = xl.loras.add_upload(peft_bytes, "xl-style.safetensors", SESSION)
    kohya = xl.loras.add_upload(kohya_bytes, "xl-style-kohya.safetensors", SESSION)
    report = xl.loras.resolve(kohya.name, session_id=SESSION).report
    assert set(report.targets) == {"unet", "text_encoder", "text_encoder_2"}

    def draw(name: str, weight: float):
        request = small(seed=12, loras=(LoraChoice(name, weight),), session_id=SESSION)
        return xl.generate(request).images[0]

    base = xl.generate(small(seed=12)).images[0]
    styled = draw(kohya.name, 1.0)
    assert differs(styled, base)
    # The same adapter by the other road: equal up to float rounding.
    assert np.abs(pixels(styled) - pixels(draw(peft.name, 1.0))).mean() < 1.0
    assert draw(kohya.name, 0.0).tobytes() == base.tobytes()
    assert xl.generate(small(seed=12)).images[0].tobytes() == base.tobytes()


def test_an_sd_lora_on_sdxl_and_an_sdxl_lora_on_sd_are_refused_with_the_base(xl, engine):
    with pytest.raises(LoraRejectedError, match="Stencil tiny \\(SD-shaped\\) LoRA"):
        xl.loras.add_upload(
            (ROOT / "loras" / "tiny-inverted.safetensors").read_bytes(), "sd.safetensors", SESSION
        )
    peft_bytes, kohya_bytes = random_sdxl_lora(xl.base, seed=2)
    for data in (peft_bytes, kohya_bytes):
        with pytest.raises(LoraRejectedError, match="different base model"):
            engine.loras.add_upload(data, "xl.safetensors", SESSION)
    # Both engines go on serving.
    assert xl.generate(small(seed=1)).images[0].size == (64, 64)
    assert engine.generate(small(seed=1)).images[0].size == (64, 64)


def test_the_shipped_sdxl_lora_is_what_the_script_makes_and_loads_from_the_library(xl, tmp_path):
    import importlib.util
    import sys

    import torch
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location(
        "make_tiny_loras", ROOT / "scripts/make_tiny_loras.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look themselves up
    spec.loader.exec_module(module)
    (written,) = module.write_tiny_xl_loras(tmp_path)
    made, shipped = load_file(written), load_file(ROOT / "loras" / written.name)
    assert made.keys() == shipped.keys()
    assert all(torch.equal(made[key], shipped[key]) for key in made)
    assert any(key.startswith("lora_unet_input_blocks_") for key in made)  # SGM names

    assert xl.loras.names() == ["tiny-xl-sketch-kohya"]  # only this family's are listed
    base = xl.generate(small(seed=13)).images[0]
    tagged = xl.generate(small("a red circle <lora:tiny-xl-sketch-kohya:1>", seed=13))
    assert differs(tagged.images[0], base)
    assert tagged.recipe.loras[0]["name"] == "tiny-xl-sketch-kohya"
    assert tagged.recipe.settings["prompt"] == "a red circle"
    chosen = xl.generate(small(seed=13, loras=(LoraChoice("tiny-xl-sketch-kohya", 1.0),)))
    assert chosen.images[0].tobytes() == tagged.images[0].tobytes()


def test_eight_concurrent_mixed_sdxl_requests_each_equal_their_solo_run(cache_root):
    """With batching on (4 samples a pass): controls, LoRAs and seeds mixed."""
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.scheduler import QueueRules

    batching = Engine(
        FAMILIES["tiny-xl"],
        cache_root=cache_root,
        lora_folder=ROOT / "loras",
        queue_rules=QueueRules(batch_size=4, per_session=8, total=64),
    )
    sets = [(), *(((LoraChoice("tiny-xl-sketch-kohya", weight),)) for weight in (1.0, 0.5))]
    requests = [
        small(
            f"client {i}",
            seed=200 + i,
            loras=sets[i % 3],
            negative_prompt="blurry" if i % 4 == 3 else "",
            controls=(ControlUnit("canny", shapes(i % 3), resolution=64),) if i % 2 else (),
        )
        for i in range(8)
    ]
    alone = [batching.generate(r).images[0].tobytes() for r in requests]
    runs_before = batching.scheduler.stats.runs
    with ThreadPoolExecutor(max_workers=8) as pool:
        with batching.scheduler.holding():
            futures = [pool.submit(batching.generate, r) for r in requests]
            while batching.scheduler.waiting_count() < 8:
                pass
        results = [future.result() for future in futures]
    assert batching.scheduler.stats.runs - runs_before < 8  # some shared a pass
    assert [r.images[0].tobytes() for r in results] == alone
    assert len(set(alone)) == 8


def test_an_fp16_safe_vae_the_user_points_at_is_loaded_recorded_and_picks_float16(xl):
    import torch

    from pipelines.engine import pick_device_and_dtype

    folder = xl.family.locate(xl.cache_root)
    swapped = Engine(FAMILIES["tiny-xl"], cache_root=xl.cache_root, vae=f"{folder}/vae")
    result = swapped.generate(small(seed=16))
    assert result.images[0].tobytes() == xl.generate(small(seed=16)).images[0].tobytes()
    assert result.recipe.model["vae"] == "vae"  # its name, never the machine's path
    assert "vae = AutoencoderKL.from_pretrained('vae'" in python_snippet(result.recipe)
    family = FAMILIES["sdxl"]
    assert pick_device_and_dtype(family, "cuda", None) == ("cuda", torch.bfloat16)
    assert pick_device_and_dtype(family, "cuda", None, fp16_safe_vae=True)[1] == torch.float16


def test_hotswap_slots_on_sdxl_give_the_same_images(xl, cache_root):
    """UNet LoRAs swapped into fixed slots (what --compile needs) on the SDXL UNet: each
    image is the one the named-adapter store makes."""
    hotswap = Engine(
        FAMILIES["tiny-xl"], cache_root=cache_root, lora_folder=ROOT / "loras", lora_hotswap_rank=8
    )
    names = []
    for seed in (3, 4):
        unet_only, _ = random_sdxl_lora(xl.base, seed=seed, parts=("unet",))
        for engine in (xl, hotswap):
            engine.loras.add_upload(unet_only, f"swap-{seed}.safetensors", "swap-session")
        names.append(hotswap.loras.names("swap-session")[-1])
    sequence = [
        (LoraChoice(names[0], 1.0),),
        (LoraChoice(names[1], 0.7),),
        (),
        (LoraChoice(names[0], 0.5),),
    ]
    for index, loras in enumerate(sequence):
        request = small(seed=30 + index, loras=loras, session_id="swap-session")
        mine, theirs = hotswap.generate(request), xl.generate(request)
        assert np.abs(pixels(mine.images[0]) - pixels(theirs.images[0])).max() <= 1, index
    # Text-encoder LoRAs are not swappable in slots: said, and the engine goes on.
    with pytest.raises(LoraRejectedError, match="hotswap mode .* can only swap UNet LoRAs"):
        hotswap.generate(small(loras=(LoraChoice("tiny-xl-sketch-kohya", 1.0),)))
    assert hotswap.generate(small(seed=1)).images[0].size == (64, 64)
