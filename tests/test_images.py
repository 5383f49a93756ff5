"""Image intake: decoding untrusted uploads, normalising to RGB, fitting sizes."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipelines.errors import ImageError
from pipelines.images import (
    MAX_IMAGE_PIXELS,
    fit_to_multiple,
    image_sha256,
    load_image,
    resize_short_side,
    to_rgb,
)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height, with a few bytes of pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test with a recognisable message."""

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --------------------------------------------------------------------------- bit depth


def test_16_bit_ramp_is_stretched_to_full_range_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    for source in (ramp, _encode(Image.fromarray(ramp), "PNG")):
        image = load_image(source)
        assert image.mode.startswith("I")
        rgb = np.asarray(to_rgb(image))
        assert rgb.shape == (4, 256, 3)
        row = rgb[0, :, 0].astype(int)
        assert row.min() == 0 and row.max() == 255
        assert np.all(np.diff(row) >= 0)
        assert len(np.unique(row)) > 200  # a ramp, not a few steps
        assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_12_bit_data_in_16_bit_file_uses_its_actual_range():
    data = np.tile(np.linspace(1000, 4095, 64).astype(np.uint16), (2, 1))
    row = np.asarray(to_rgb(load_image(data)))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255


def test_constant_16_bit_image_keeps_its_level():
    white = np.full((4, 4), 65535, dtype=np.uint16)
    assert np.asarray(to_rgb(load_image(white))).min() == 255


def test_float_images():
    ramp = np.tile(np.linspace(0.0, 1.0, 11, dtype=np.float32), (2, 1))
    assert np.asarray(load_image(ramp))[0].tolist() == [round(v * 255) for v in ramp[0]]
    mode_f = Image.fromarray(ramp * 7 - 3)  # PIL "F" with any range: stretched
    row = np.asarray(to_rgb(mode_f))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    with pytest.raises(ImageError, match=r"values from -1 to 2; expected values in \[0, 1\]"):
        load_image(np.array([[-1.0, 2.0]]))


def test_array_shapes_and_dtypes():
    assert load_image(np.zeros((5, 7), np.uint8)).mode == "L"
    assert load_image(np.zeros((5, 7, 1), np.uint8)).mode == "L"
    assert load_image(np.zeros((5, 7, 3), np.uint8)).size == (7, 5)
    assert load_image(np.zeros((5, 7, 4), np.uint8)).mode == "RGBA"
    assert load_image(np.zeros((5, 7, 3), np.uint16)).mode == "RGB"
    with pytest.raises(ImageError, match="dtype int64"):
        load_image(np.zeros((5, 7), np.int64))
    with pytest.raises(ImageError, match=r"shape \(5, 7, 2\)"):
        load_image(np.zeros((5, 7, 2), np.uint8))


# --------------------------------------------------------------------------- colour


def test_transparent_pixels_become_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest fully transparent
    rgb = np.asarray(to_rgb(load_image(_encode(Image.fromarray(rgba), "PNG"))))
    assert rgb[0, 0].tolist() == [200, 0, 0]
    assert (rgb[1:] == 255).all()

    gray_alpha = Image.new("LA", (2, 2), (0, 0))
    assert (np.asarray(to_rgb(gray_alpha)) == 255).all()


def test_gif_palette_transparency_becomes_white():
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_image.putpixel((0, 0), 1)
    image = load_image(_encode(palette_image, "GIF", transparency=0))
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[3, 3].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_becomes_rgb(fmt):
    cyan = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    image = load_image(_encode(cyan, fmt))
    assert image.mode == "CMYK"
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb)[8, 8].astype(int) - [0, 255, 255]).max() <= 8


def test_grayscale_becomes_rgb():
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    rgb = np.asarray(to_rgb(load_image(_encode(gray, "PNG"))))
    assert rgb.shape == (3, 4, 3)
    assert np.array_equal(rgb[..., 0], np.arange(12).reshape(3, 4))
    assert np.array_equal(rgb[..., 0], rgb[..., 1])


def test_exif_orientation_6_is_applied():
    stored = Image.new("RGB", (40, 20), "white")
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright = to_rgb(load_image(_encode(stored, "JPEG", quality=95, exif=exif.tobytes())))
    assert upright.size == (20, 40)
    r, g, b = upright.getpixel((15, 5))  # now the top-right corner
    assert r > 200 and g < 60 and b < 60


def test_to_rgb_never_returns_the_callers_image():
    image = Image.new("RGB", (3, 3))
    assert to_rgb(image) is not image


# --------------------------------------------------------------------------- bad input


def test_corrupt_bytes_give_a_clear_error():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    png = _encode(Image.fromarray(noise), "PNG")
    with pytest.raises(ImageError, match="could not read the image: .*truncated"):
        load_image(png[: len(png) // 2])
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(b"certainly not an image")
    with pytest.raises(ImageError, match="looks like PNG but its header is damaged"):
        load_image(png[:8] + b"\x00" * 40)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_format_outside_the_allowlist_is_named():
    ico = _encode(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(ImageError, match="image format ICO is not supported; use PNG, JPEG"):
        load_image(ico)


def test_huge_declared_png_is_refused_before_decoding(no_pixel_decoding):
    bomb = _png_declaring(30000, 30000)
    assert len(bomb) < 200
    with pytest.raises(ImageError) as caught:
        load_image(bomb)
    message = str(caught.value)
    assert "30000x30000" in message
    assert f"the limit is {MAX_IMAGE_PIXELS / 1e6:g} megapixels" in message


@pytest.mark.parametrize("side", [8000, 10000])  # under and over PIL's own warning (~89 MP)
def test_our_pixel_limit_applies_below_pils_guard(no_pixel_decoding, side):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning as an exception
        with pytest.raises(ImageError, match=f"{side}x{side} pixels; the limit is 40 megapixels"):
            load_image(_png_declaring(side, side), max_pixels=40_000_000)


def test_upload_byte_limit():
    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(ImageError, match="the limit is 10 bytes"):
        load_image(png, max_bytes=10)


def test_paths(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_encode(Image.new("RGB", (5, 3), (1, 2, 3)), "PNG"))
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(str(path)).size == (5, 3)
    with pytest.raises(ImageError, match="could not read the image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(3)


# --------------------------------------------------------------------------- sizing


@pytest.mark.parametrize(
    ("size", "fitted"),
    [
        ((7, 13), (64, 120)),  # enlarged until the short side reaches 64
        ((13, 7), (120, 64)),
        ((1, 1), (64, 64)),
        ((3000, 2000), (1024, 680)),  # shrunk so the long side is 1024
        ((1000, 600), (1000, 600)),  # within limits: left alone
        ((1021, 603), (1024, 600)),  # only rounded to multiples of 8
        ((1024, 64), (1024, 64)),  # the most elongated shape allowed (16:1)
    ],
)
def test_fit_to_multiple(size, fitted):
    result = fit_to_multiple(Image.new("RGB", size))
    assert result.size == fitted
    assert all(side % 8 == 0 for side in result.size)


def test_fit_to_multiple_refuses_extreme_aspect_ratio():
    with pytest.raises(ImageError, match=r"4000x8 pixels \(aspect ratio 500.0:1\).*16:1"):
        fit_to_multiple(Image.new("RGB", (4000, 8)))


def test_fit_to_multiple_checks_its_arguments():
    with pytest.raises(ValueError, match="multiple"):
        fit_to_multiple(Image.new("RGB", (8, 8)), min_side=128, max_side=64)


def test_resize_short_side():
    image = Image.new("RGB", (128, 200))
    assert resize_short_side(image, 128, max_long_side=4096) is image  # nothing to resample
    assert resize_short_side(Image.new("RGB", (7, 13)), 512, max_long_side=4096).size == (512, 951)
    with pytest.raises(ImageError, match="long side would be 256000"):
        resize_short_side(Image.new("RGB", (4000, 8)), 512, max_long_side=8192)


def test_image_sha256():
    a = Image.new("RGB", (4, 4), (1, 2, 3))
    assert image_sha256(a) == image_sha256(a.copy())
    assert image_sha256(a) != image_sha256(Image.new("RGB", (4, 4), (1, 2, 4)))
    assert image_sha256(a) != image_sha256(Image.new("RGB", (2, 8), (1, 2, 3)))
    p1, p2 = Image.new("P", (2, 2), 0), Image.new("P", (2, 2), 0)
    p1.putpalette([0, 0, 0] * 256)
    p2.putpalette([255, 255, 255] * 256)
    assert image_sha256(p1) != image_sha256(p2)  # same indices, different colours
