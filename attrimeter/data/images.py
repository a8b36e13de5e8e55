"""Image decoding for training, evaluation and the runtime (numpy + Pillow, no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

__all__ = ["ImageError", "read_image", "read_images"]


class ImageError(ValueError):
    """An image file is missing, corrupt or unusable; the message names the file."""


def read_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Decode an image file to RGB and resize it.

    Args:
        path: JPEG/PNG (anything Pillow reads).
        size: Output ``(height, width)``.

    Returns:
        uint8 array [height, width, 3].

    Raises:
        ImageError: If the file is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode image {path}: {e}") from None


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
