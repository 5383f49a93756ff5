"""Image intake: decode uploads safely, normalise them to RGB, size them for the models.

Everything here takes untrusted input. Failures become `ImageError` with a message a person
can act on; a raw PIL traceback never reaches the user.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, megabytes
from .settings import LIMITS

# Checked against the header, before any pixel is decoded: a few KB of PNG can declare
# 30000x30000 pixels and would take gigabytes to decode.
MAX_IMAGE_PIXELS: int = LIMITS.max_image_pixels
MAX_UPLOAD_BYTES: int = LIMITS.max_upload_bytes

# Formats we hand to PIL. Everything else is refused by name; PIL's long tail of decoders
# (PSD, EPS via Ghostscript, FITS, ...) is attack surface we do not need.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Phones save JPEGs as MPO (JPEG plus a depth/preview frame); PIL opens them through the JPEG
# plugin and reports "MPO".
_ALLOWED_RESULT_FORMATS = frozenset(ALLOWED_FORMATS) | {"MPO"}

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image | np.ndarray


# --------------------------------------------------------------------------- decoding


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Image.Image:
    """Decode bytes, a file path, a PIL image or a numpy array into a PIL image.

    The result keeps its original mode (pass it through `to_rgb` next). Multi-frame files
    (GIF, TIFF, WEBP) give their first frame.
    """
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    max_bytes = MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), max_pixels, max_bytes)
    if isinstance(source, (str, os.PathLike)):
        return _decode(_read_file(Path(source), max_bytes), max_pixels, max_bytes)
    raise ImageError(
        f"cannot read an image from a {type(source).__name__}; "
        "give bytes, a file path, a PIL image or a numpy array"
    )


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"could not read the image file {str(path)!r}: {exc.strerror}") from exc
    _check_bytes(size, max_bytes)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"could not read the image file {str(path)!r}: {exc.strerror}") from exc


def _decode(data: bytes, max_pixels: int, max_bytes: int) -> Image.Image:
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    _check_bytes(len(data), max_bytes)
    try:
        # Image.open parses only the header; pixels are decoded by load() below.
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own guard fired first (it errors above 2 x Image.MAX_IMAGE_PIXELS, ~179 MP,
        # and warns above ~89 MP; the warning is an error under `-W error`). Report our
        # limit with the declared size. A STENCIL_MAX_IMAGE_PIXELS above PIL's guard is
        # therefore capped by it: we do not widen PIL's process-wide setting.
        size = _declared_size(data)
        if size is None:
            raise ImageError(
                f"image is too large to decode; the limit is {_megapixels(max_pixels)}"
            ) from None
        _check_pixels(size, max_pixels)
        raise ImageError(f"image is too large to decode ({size[0]}x{size[1]} pixels)") from None
    except UnidentifiedImageError:
        raise ImageError(_unidentified_message(data)) from None
    except Exception as exc:  # any failure of a decoder on untrusted bytes is the user's file
        raise ImageError(f"could not read the image: {exc}") from exc

    if image.format not in _ALLOWED_RESULT_FORMATS:
        raise ImageError(_format_refused(image.format))
    _check_pixels(image.size, max_pixels)
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt pixel data
        raise ImageError(f"could not read the image: {exc}") from exc
    return image


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """The size a file's header declares, read without PIL's bomb check (header only)."""
    prefix = data[:16]
    for fmt in ALLOWED_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if _accepts(accept, prefix):
            try:
                return factory(io.BytesIO(data), None).size
            except Exception:  # the header itself is unreadable; caller reports without size
                return None
    return None


def _sniff_format(prefix: bytes) -> str | None:
    Image.init()  # registers every plugin so the name of a refused format can be given
    for fmt, (_factory, accept) in Image.OPEN.items():
        if _accepts(accept, prefix):
            return fmt
    return None


def _accepts(accept, prefix: bytes) -> bool:
    # PIL's accept() returns True, False, or a string explaining a near miss.
    if accept is None:
        return False
    result = accept(prefix)
    return bool(result) and not isinstance(result, str)


def _unidentified_message(data: bytes) -> str:
    fmt = _sniff_format(data[:16])
    if fmt is None:
        return (
            "could not read the image: not a recognised image format "
            f"(it starts with {data[:8]!r}); use {_allowed_list()}"
        )
    if fmt in ALLOWED_FORMATS:
        return f"could not read the image: it looks like {fmt} but its header is damaged"
    return _format_refused(fmt)


def _format_refused(fmt: str | None) -> str:
    return f"image format {fmt} is not supported; use {_allowed_list()}"


def _allowed_list() -> str:
    return ", ".join(ALLOWED_FORMATS[:-1]) + " or " + ALLOWED_FORMATS[-1]


def _check_bytes(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageError(f"image file is {megabytes(size)}; the limit is {megabytes(max_bytes)}")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"image is {width}x{height} pixels; it has no pixels")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} pixels; the limit is {_megapixels(max_pixels)}"
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:g} megapixels"


def _from_array(array: np.ndarray, max_pixels: int) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(
            f"image array has shape {array.shape}; expected HxW, HxWx1, HxWx3 or HxWx4"
        )
    _check_pixels((array.shape[1], array.shape[0]), max_pixels)
    channels = 1 if array.ndim == 2 else array.shape[2]
    if not array.dtype.isnative:  # big-endian data from some TIFF/FITS readers
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = _unit_floats_to_uint8(array)
    elif array.dtype == np.uint16:
        if channels == 1:
            return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint16))  # "I;16"
        # PIL has no 16-bit colour mode: rescale now, by the same rule as to_rgb uses.
        array = _rescale_to_uint8(array, nominal_max=65535)
    elif array.dtype != np.uint8:
        raise ImageError(
            f"image array has dtype {array.dtype}; use uint8, uint16 or float in [0, 1]"
        )
    return Image.fromarray(np.ascontiguousarray(array))  # uint8: L, RGB or RGBA by channels


def _unit_floats_to_uint8(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float32)
    if not np.isfinite(values).all():
        raise ImageError("image array contains NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0.0 or hi > 1.0:
        raise ImageError(
            f"float image array has values from {lo:g} to {hi:g}; expected values in [0, 1]"
        )
    return np.round(values * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- normalising

_HIGH_DEPTH_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None}


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`, upright, with transparency flattened onto white.

    16-bit and float images are stretched from their darkest to their brightest pixel onto
    0..255 (a 12-bit scan in a 16-bit file would otherwise look black); a constant image
    keeps its nominal level.
    """
    image = _upright(image)  # a new image: never the caller's object
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_DEPTH_MODES or mode == "F":
        gray = _rescale_to_uint8(np.asarray(image), nominal_max=_HIGH_DEPTH_MODES.get(mode))
        return Image.fromarray(gray).convert("RGB")
    if _has_transparency(image):
        return _flatten_on_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"images in colour mode {mode} are not supported: {exc}") from exc


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF must not block an otherwise good image: use as stored
        return image.copy()


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _flatten_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _rescale_to_uint8(values: np.ndarray, *, nominal_max: float | None) -> np.ndarray:
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.uint8)
    lo, hi = float(data[finite].min()), float(data[finite].max())
    data = np.nan_to_num(data, nan=lo, posinf=hi, neginf=lo)
    if hi > lo:
        scaled = (data - lo) * (255.0 / (hi - lo))
    elif nominal_max is not None:
        scaled = data * (255.0 / nominal_max)
    else:
        scaled = data
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- sizing


def fit_to_multiple(
    image: Image.Image,
    *,
    multiple: int = 8,
    max_side: int = 1024,
    min_side: int = 64,
) -> Image.Image:
    """Resize keeping the aspect ratio, then round each side to the nearest `multiple`.

    Rule: shrink so the long side is at most `max_side`; never enlarge, except just enough
    that the short side reaches `min_side` (so 7x13 becomes 64x120, 1x1 becomes 64x64).
    An image too elongated to meet both limits (4000x8 at the defaults: its short side would
    be under 1 pixel) raises ImageError rather than being cropped or squashed: either would
    change the picture behind the user's back.
    """
    if multiple < 1 or min_side < multiple or max_side < min_side:
        raise ValueError(
            f"need 1 <= multiple <= min_side <= max_side, got multiple={multiple}, "
            f"min_side={min_side}, max_side={max_side}"
        )
    lowest = -(-min_side // multiple) * multiple
    highest = max_side // multiple * multiple
    if lowest > highest:
        raise ValueError(f"no multiple of {multiple} lies between {min_side} and {max_side}")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short < 1:
        raise ImageError(f"image is {width}x{height} pixels; it has no pixels")
    if long * min_side > short * max_side:
        raise ImageError(
            f"image is {width}x{height} pixels (aspect ratio {long / short:.1f}:1); the most "
            f"elongated shape supported is {max_side / min_side:g}:1 "
            f"({max_side}x{min_side}); crop it first"
        )
    scale = min(1.0, max_side / long)
    if short * scale < min_side:
        scale = min_side / short
    size = tuple(
        min(highest, max(lowest, round(side * scale / multiple) * multiple))
        for side in (width, height)
    )
    return _resize(image, size)


def resize_short_side(image: Image.Image, short_side: int, *, max_long_side: int) -> Image.Image:
    """Scale so the short side is exactly `short_side`; the same image if it already is."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short < 1:
        raise ImageError(f"image is {width}x{height} pixels; it has no pixels")
    new_long = max(1, round(long * short_side / short))
    if new_long > max_long_side:
        raise ImageError(
            f"image is {width}x{height} pixels; at a short side of {short_side} its long side "
            f"would be {new_long}, over the limit of {max_long_side}; crop it first"
        )
    size = (short_side, new_long) if width <= height else (new_long, short_side)
    return _resize(image, size)


def _resize(image: Image.Image, size: Iterable[int]) -> Image.Image:
    size = tuple(size)
    if size == image.size:
        return image
    # LANCZOS anti-aliases when shrinking; when enlarging it rings, BICUBIC is calmer.
    shrinking = size[0] * size[1] < image.size[0] * image.size[1]
    resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    return image.resize(size, resample=resample)


# --------------------------------------------------------------------------- identity


def image_sha256(image: Image.Image) -> str:
    """Hex digest of mode, size, palette and pixels: equal images give equal keys."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    if image.mode in ("P", "PA"):
        digest.update(bytes(image.getpalette() or []))
    digest.update(image.tobytes())
    return digest.hexdigest()
