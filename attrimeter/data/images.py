"""Image decoding for training, evaluation and the runtime (numpy + Pillow, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

__all__ = ["ImageError", "decode_image", "read_image", "read_images"]


class ImageError(ValueError):
    """An image file is missing, corrupt or unusable; the message names the file."""


def decode_image(data: bytes, size: tuple[int, int], name: str = "image",
                 formats: tuple[str, ...] | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to RGB and resize them (bilinear).

    Args:
        data: JPEG/PNG/… bytes.
        size: Output ``(height, width)``.
        name: How error messages call the image (a path, ``"images[3]"``).
        formats: Pillow formats to try (None: every format Pillow reads).
        max_pixels: Refuse larger images before decoding them (None: Pillow's own decompression-bomb limit).

    Returns:
        uint8 array [height, width, 3].

    Raises:
        ImageError: Undecodable or too large; the message names the image.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    h, w = size
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageError(f"{name}: {im.width}x{im.height} pixels is more than {max_pixels} (not a person crop)")
            im = im.convert("RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        expected = f"{'/'.join(formats)} image" if formats else "format Pillow reads"
        raise ImageError(f"{name}: not a {expected}") from None
    except Exception as e:  # a corrupt file can make a decoder raise anything
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None


def read_image(path: str | Path, size: tuple[int, int], formats: tuple[str, ...] | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to RGB and resize it.

    Args:
        path: JPEG/PNG (anything Pillow reads).
        size: Output ``(height, width)``.
        formats: See :func:`decode_image`.
        max_pixels: See :func:`decode_image`.

    Returns:
        uint8 array [height, width, 3].

    Raises:
        ImageError: If the file is missing or cannot be decoded.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    return decode_image(data, size, str(path), formats, max_pixels)


def read_images(
    paths: Sequence[str | Path], size: tuple[int, int], progress: bool = True, desc: str = "decode"
) -> np.ndarray:
    """Decode many images into one array (small ReID crops: a whole split fits in memory).

    Args:
        paths: Image files.
        size: Output ``(height, width)`` of every image.
        progress: Show a progress bar.
        desc: Progress bar label.

    Returns:
        uint8 array [N, height, width, 3].

    Raises:
        ImageError: For the first file that cannot be read (naming it).
    """
    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False)):
        out[i] = read_image(p, size)
    return out
