"""Robust image loading: every path that reads a user's image goes through ``load_image``.

It returns a fully decoded RGB image (the file is closed) or raises ``ImageError`` naming the file
and the cause. Pixel count is checked from the header, before any pixel is decoded, so a small file
that expands to gigabytes (a "decompression bomb") is refused cheaply.
"""

from __future__ import annotations

import errno
import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2.errors import InputError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default (about 9459 x 9459)
MAX_PIXELS_VARIABLE = "BLIP2_MAX_PIXELS"  # raises the limit for every command (and the server) at once
URL_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://")
WHITE = (255, 255, 255)

# modes that carry transparency: composited over white so transparent areas read as white paper
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(InputError):
    """An image cannot be used: missing, unreadable, truncated, empty, too large or a URL."""

    def __init__(self, source: str, cause: str):
        self.source = source
        self.cause = cause
        super().__init__(f"{source}: {cause}")


def is_url(text: str) -> bool:
    return text.strip().lower().startswith(URL_PREFIXES)


def load_image(
    source: str | Path | Image.Image | bytes,
    max_pixels: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Load ``source`` (a local path, raw file bytes or a PIL image) as a decoded RGB image.

    ``name`` labels the image in error messages when ``source`` is bytes (e.g. "shard-0.tar:000012.jpg").
    Transparency is composited over white, 16-bit images are scaled to 8 bits, EXIF orientation is
    applied, and an animated image yields its first frame. Remote URLs are always refused. ``max_pixels`` (default:
    $BLIP2_MAX_PIXELS, else PIL's 89.5 million) refuses larger images before decoding them.
    """
    max_pixels = max_pixels or pixel_limit()
    if isinstance(source, Image.Image):
        return to_rgb(_apply_exif_orientation(source), name or "<PIL image>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or f"<{len(source)} bytes>"
        if len(source) == 0:
            raise ImageError(label, "empty (0 bytes)")
        return _decode(io.BytesIO(bytes(source)), label, max_pixels)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"load_image expects a path, bytes or a PIL image, got {type(source).__name__}")
    label = name or str(source)
    if isinstance(source, str) and is_url(source):
        raise ImageError(
            label, "remote fetching is disabled in blip2; download the image and pass its local path"
        )
    path = Path(source)
    if not path.exists():
        raise ImageError(label, _missing(path))
    if path.is_dir():
        raise ImageError(label, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(label, "empty file (0 bytes)")
    with path.open("rb") as handle:
        return _decode(handle, label, max_pixels)


def pixel_limit() -> int:
    """The largest image, in pixels, this process decodes: $BLIP2_MAX_PIXELS, else PIL's default."""
    value = os.environ.get(MAX_PIXELS_VARIABLE, "")
    if not value:
        return DEFAULT_MAX_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"{MAX_PIXELS_VARIABLE}={value!r} is not a positive whole number of pixels")
    return int(value)


def _missing(path: Path) -> str:
    """Why ``path`` does not exist: not there, a broken symbolic link, or a symbolic link loop."""
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symbolic link loop (the link points back to itself)"
        if path.is_symlink():
            return f"a broken symbolic link (to {os.readlink(path)})"
    return "file not found"


def _decode(handle, label: str, max_pixels: int) -> Image.Image:
    """Open from a binary file object, check the header's size, then decode the first frame."""
    try:
        with Image.open(handle) as image:
            width, height = image.size
            if width == 0 or height == 0:
                raise ImageError(label, f"zero-size image ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(
                    label,
                    f"{width}x{height} = {width * height} pixels is above the limit of {max_pixels} (possible "
                    f"decompression bomb); if you trust this file, raise the limit: {MAX_PIXELS_VARIABLE}="
                    f"{width * height} blip2 ...",
                )
            image.load()  # first frame only: Image.open leaves multi-frame files at frame 0
            return to_rgb(_apply_exif_orientation(image), label)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(label, f"refused as a possible decompression bomb: {error}") from error
    except UnidentifiedImageError as error:
        raise ImageError(label, "not a readable image (unknown or corrupt format)") from error
    except OSError as error:  # PIL reports truncated and damaged pixel data as OSError
        raise ImageError(label, f"corrupt or truncated image data ({error})") from error
    except (SyntaxError, ValueError, EOFError, IndexError, struct.error) as error:  # damaged headers in some plugins
        raise ImageError(label, f"corrupt image data ({type(error).__name__}: {error})") from error


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; an unparseable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error):
        return image


def to_rgb(image: Image.Image, label: str = "<image>") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16/32-bit greys rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _wide_grey_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(label, f"unsupported pixel mode {mode!r} ({error})") from error


def _wide_grey_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit ('I;16*') and 32-bit ('I') greyscale: scale 0..65535 to 0..255 instead of clipping."""
    values = np.asarray(image, dtype=np.float64)  # [H, W]
    if image.mode == "I" and values.max(initial=0) <= 255:
        scale = 1.0  # an 'I' image that only holds 8-bit values
    else:
        scale = 1.0 / 257.0  # 65535 / 257 == 255
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))  # [H, W, 3]
