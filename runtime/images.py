"""Request images → model input: decode (JPEG/PNG file or bytes), check, resize, stack (numpy + Pillow, no torch).

The export's graph normalises inside, so the runtime only delivers float32 RGB in [0, 1], ``[B, 3, H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from attrimeter.data.images import ImageError, decode_image, read_image
from attrimeter.runtime.errors import InputError

__all__ = ["DECODE_FORMATS", "MAX_PIXELS", "ImageSource", "as_sources", "load_image", "to_input"]

ImageSource = str | Path | bytes | np.ndarray
# Larger encoded images are refused before decoding (a 20-MP person crop is a mistake or a decompression bomb).
MAX_PIXELS = 20_000_000
# The formats decoded; other Pillow plugins (TIFF, DDS, …) are not tried on request bytes.
DECODE_FORMATS = ("JPEG", "PNG", "BMP")


def _from_array(image: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"{name}: expected an RGB image [H, W, 3], got shape {list(image.shape)}")
    if image.dtype == np.uint8:
        pixels = image
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise InputError(f"{name}: the image holds NaN or inf values")
        if image.min() < 0.0 or image.max() > 1.0:
            raise InputError(f"{name}: float images must lie in [0, 1], got [{image.min():.4g}, {image.max():.4g}]")
        pixels = np.rint(image * 255.0).astype(np.uint8)
    else:
        raise InputError(f"{name}: expected uint8 or float pixels, got {image.dtype}")
    if pixels.shape[:2] == tuple(size):
        return np.ascontiguousarray(pixels)
    from PIL import Image

    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)


def load_image(source: ImageSource, size: tuple[int, int], name: str = "image") -> np.ndarray:
    """Decode and resize one request image.

    Args:
        source: An image file path, the encoded bytes of a JPEG/PNG, or pixels ``[H, W, 3]`` (uint8, or float in
            [0, 1]).
        size: The export's input ``(height, width)``; other sizes are resized bilinearly.
        name: How error messages call this image (e.g. ``"images[3]"``).

    Returns:
        uint8 RGB ``[height, width, 3]``.

    Raises:
        InputError: Missing or corrupt file, undecodable bytes, wrong shape or dtype, NaN/inf, values outside
            [0, 1], or an absurdly large image; the message names the image.
    """
    try:
        if isinstance(source, (str, Path)):
            return read_image(source, size, DECODE_FORMATS, MAX_PIXELS)
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise InputError(f"{name}: empty image data")
            return decode_image(bytes(source), size, name, DECODE_FORMATS, MAX_PIXELS)
    except ImageError as e:
        raise InputError(str(e) if isinstance(source, (bytes, bytearray, memoryview)) else f"{name}: {e}") from None
    if isinstance(source, np.ndarray):
        return _from_array(source, size, name)
    raise InputError(f"{name}: expected a path, encoded bytes or an array, got {type(source).__name__}")


def as_sources(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """One image or a sequence (a ``[B, H, W, 3]`` array counts as B images) → a list of single images.

    Args:
        images: What the caller passed.

    Returns:
        The images, one per list entry.

    Raises:
        InputError: If there are no images.
    """
    if isinstance(images, (str, Path, bytes, bytearray, memoryview)):
        out: list[ImageSource] = [images]  # type: ignore[list-item]
    elif isinstance(images, np.ndarray):
        out = list(images) if images.ndim == 4 else [images]
    else:
        out = list(images)
    if not out:
        raise InputError("no images given")
    return out


def to_input(pixels: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Stack uint8 crops into the engine's input.

    Args:
        pixels: uint8 ``[H, W, 3]`` crops of one size (or one ``[B, H, W, 3]`` array).

    Returns:
        float32 ``[B, 3, H, W]`` in [0, 1].
    """
    batch = np.stack(list(pixels)) if not isinstance(pixels, np.ndarray) else pixels
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32) * np.float32(1.0 / 255.0)
