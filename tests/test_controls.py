"""ControlNet on the shared model: maps, their effect, multi-control, windows, odd images."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from conftest import pixels
from PIL import Image

from pipelines.controlnets import WindowedMultiControlNet
from pipelines.errors import ImageError, InvalidRequestError, UnknownNameError
from pipelines.requests import ControlUnit, GenerationRequest
from pipelines.schedulers import get_scheduler_spec


def shapes_photo(width: int = 96, height: int = 64) -> Image.Image:
    canvas = np.zeros((height, width, 3), np.uint8)
    cv2.rectangle(canvas, (10, 10), (width // 2, height - 12), (255, 255, 255), -1)
    cv2.circle(canvas, (width * 3 // 4, height // 2), height // 4, (200, 80, 40), -1)
    return Image.fromarray(canvas)


def unit(control_type="canny", image=None, **fields) -> ControlUnit:
    fields.setdefault("resolution", 64)
    return ControlUnit(control_type, image if image is not None else shapes_photo(), **fields)


def request(*units, **fields) -> GenerationRequest:
    fields = {"prompt": "a robot", "seed": 3, "steps": 4, **fields}
    return GenerationRequest(controls=tuple(units), **fields)


def test_canny_map_follows_the_photos_edges(engine):
    photo = shapes_photo()
    control_map = engine.control_map(unit(image=photo))
    gray = cv2.cvtColor(np.asarray(photo), cv2.COLOR_RGB2GRAY)
    expected = cv2.Canny(gray, 100, 200)
    assert np.array_equal(np.asarray(control_map)[:, :, 0], expected)
    edges = np.asarray(control_map)[:, :, 0]
    assert (edges[20:40, 8:12] == 255).any(axis=1).all()  # the rectangle's left border
    assert edges[20:40, 20:40].max() == 0  # its flat inside has no edges


def test_a_control_changes_the_image_and_reproduces(engine):
    plain = engine.generate(request(width=96, height=64))
    controlled = engine.generate(request(unit(), width=96, height=64))
    again = engine.generate(request(unit(), width=96, height=64))
    assert np.abs(pixels(plain.images[0]) - pixels(controlled.images[0])).max() > 10
    assert controlled.images[0].tobytes() == again.images[0].tobytes()
    assert controlled.recipe.controls[0]["controlnet"] == "controlnet-canny"


def test_another_control_image_gives_another_result(engine):
    first = engine.generate(request(unit()))
    flipped = shapes_photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    second = engine.generate(request(unit(image=flipped)))
    assert np.abs(pixels(first.images[0]) - pixels(second.images[0])).max() > 0


def test_scale_zero_gives_the_no_control_image_exactly(engine):
    plain = engine.generate(request(width=96, height=64))
    zero = engine.generate(request(unit(conditioning_scale=0.0), width=96, height=64))
    assert plain.images[0].tobytes() == zero.images[0].tobytes()


@pytest.mark.parametrize(
    ("photo_size", "generated"), [((120, 60), (64, 32)), ((30, 40), (48, 64)), ((1, 1), (64, 64))]
)
def test_generated_size_follows_the_control_image(engine, photo_size, generated):
    photo = shapes_photo(*photo_size) if min(photo_size) > 20 else Image.new("RGB", photo_size)
    result = engine.generate(request(unit(image=photo)))
    assert result.images[0].size == generated  # tiny family: long side 64, aspect kept


def test_multi_control_and_a_unit_at_scale_zero_drops_out_exactly(engine):
    canny = unit()
    depth = unit("depth")
    both = engine.generate(request(canny, depth))
    canny_only = engine.generate(request(canny))
    depth_off = engine.generate(request(canny, unit("depth", conditioning_scale=0.0)))
    assert np.abs(pixels(both.images[0]) - pixels(canny_only.images[0])).max() > 0
    assert depth_off.images[0].tobytes() == canny_only.images[0].tobytes()
    assert [c["control_type"] for c in both.recipe.controls] == ["canny", "depth"]
    assert len(both.control_maps) == 2


def test_skipping_outside_the_window_leaves_the_image_unchanged(engine):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    control = unit(guidance_start=0.0, guidance_end=0.5)
    control_map = engine.control_map(control)
    net = engine.controlnet(engine.controlnet_ref(control))
    calls = []
    hook = net.register_forward_hook(lambda *args: calls.append(1))
    images = {}
    try:
        for wrapper in (MultiControlNetModel, WindowedMultiControlNet):
            calls.clear()
            pipe = engine.family.pipeline_class("controlnet").from_pipe(
                engine.base,
                controlnet=wrapper([net]),
                scheduler=get_scheduler_spec("Euler").build(engine.base.scheduler.config),
            )
            pipe.set_progress_bar_config(disable=True)
            import torch

            images[wrapper.__name__] = pipe(
                "a robot",
                image=[control_map],
                num_inference_steps=6,
                width=96,
                height=64,
                control_guidance_start=[0.0],
                control_guidance_end=[0.5],
                controlnet_conditioning_scale=[1.0],
                generator=torch.Generator().manual_seed(5),
            ).images[0]
            images[wrapper.__name__ + " calls"] = len(calls)
    finally:
        hook.remove()
    assert images["MultiControlNetModel"].tobytes() == images["WindowedMultiControlNet"].tobytes()
    assert images["MultiControlNetModel calls"] == 6
    assert images["WindowedMultiControlNet calls"] == 3


def test_map_cache_returns_the_same_map_for_the_same_input(engine):
    photo = shapes_photo()
    first = engine.control_map(unit(image=photo))
    second = engine.control_map(unit(image=photo.copy()))
    other = engine.control_map(unit(image=photo, params={"low_threshold": 20}))
    assert first is second
    assert other is not first


def test_controlnet_pipelines_share_the_base_weights(engine):
    canny = engine._compose(request(unit()), ())
    depth = engine._compose(request(unit("depth")), ())
    for pipe in (canny, depth):
        for name in ("unet", "vae", "text_encoder"):
            shared = getattr(engine.base, name)
            ours = getattr(pipe, name)
            first = next(shared.parameters())
            assert next(ours.parameters()).data_ptr() == first.data_ptr(), name
    assert canny.scheduler is not engine.base.scheduler
    assert canny.scheduler is not depth.scheduler


def test_image_control_uses_the_upload_as_the_map_for_the_chosen_controlnet(engine):
    edges = engine.control_map(unit())
    direct = engine.generate(request(unit("image", image=edges, params={"map_type": "canny"})))
    via_canny = engine.generate(request(unit()))
    assert direct.images[0].tobytes() == via_canny.images[0].tobytes()
    assert direct.recipe.controls[0]["controlnet"] == "controlnet-canny"


def test_pose_map_runs_on_stand_in_weights_offline(engine):
    result = engine.generate(request(unit("pose")))
    assert result.control_maps[0].size == (96, 64)
    assert result.recipe.controls[0]["preprocessor_weights"] == "stand-in"


def test_unknown_control_type_and_bad_params_are_clear(engine):
    from pipelines.controls import get_control_spec

    with pytest.raises(UnknownNameError, match="unknown control type 'scribble'"):
        get_control_spec("scribble")
    with pytest.raises(InvalidRequestError, match="low_threshold=0"):
        get_control_spec("canny").validate_params({"low_threshold": 0})
    with pytest.raises(InvalidRequestError, match="guidance_start=0.8 is not allowed"):
        unit(guidance_start=0.8, guidance_end=0.2)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _odd_images():
    # Both halves lie above 255: clipping would erase the step, rescaling keeps it.
    step = np.where(np.arange(96) < 48, 1000, 60000).astype(np.uint16)
    sixteen_bit = np.tile(step, (64, 1))
    rgba = shapes_photo().convert("RGBA")
    rgba.putalpha(
        Image.fromarray(
            np.where(np.arange(96) < 48, 0, 255).astype(np.uint8)[None, :].repeat(64, 0)
        )
    )
    cmyk = shapes_photo().convert("CMYK")
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    shapes_photo().save(rotated, format="JPEG", exif=exif)
    return {
        "16-bit": (Image.fromarray(sixteen_bit), (96, 64)),
        "RGBA": (rgba, (96, 64)),
        "CMYK": (cmyk, (96, 64)),
        "EXIF-rotated": (Image.open(io.BytesIO(rotated.getvalue())), (64, 96)),
        "7x13": (Image.new("RGB", (7, 13), "white"), (64, 119)),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
def test_odd_images_give_a_sensible_map(engine, name):
    image, size = _odd_images()[name]
    control_map = engine.control_map(unit(image=image))
    assert control_map.mode == "RGB"
    assert control_map.size == size
    if name in ("16-bit", "CMYK", "RGBA"):
        assert np.asarray(control_map).max() == 255  # edges were found, not a blank map
    assert engine.generate(request(unit(image=image))).images


def test_a_hopelessly_thin_image_gets_a_clear_error_and_the_engine_keeps_serving(engine):
    with pytest.raises(ImageError, match=r"4000x8 pixels \(aspect ratio 500.0:1\)"):
        engine.generate(request(unit(image=Image.new("RGB", (4000, 8)))))
    assert engine.generate(request(unit())).images


def test_composed_views_keep_the_shared_model_in_its_dtype(cache_root):
    import torch

    from pipelines.engine import Engine
    from pipelines.families import FAMILIES

    half = Engine(FAMILIES["tiny"], cache_root=cache_root, dtype="bfloat16")
    half.generate(request(unit(), steps=1))
    half.generate(request(steps=1))
    modules = [half.base.unet, half.base.vae, half.base.text_encoder]
    modules += list(half._controlnets.values())
    assert {next(m.parameters()).dtype for m in modules} == {torch.bfloat16}
