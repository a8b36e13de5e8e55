"""Bulk indexing of an image folder into a gallery: resumable, one crash-safe segment at a time.

Decoding runs in the embedder's pool while the engine runs the previous batch; images already in the gallery (same
resolved path) are skipped, so an interrupted run resumes; unreadable images and images the model turns into NaN are
skipped and reported, so one bad file never blocks the rest (docs/architecture.md §6).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from attrimeter.runtime.embedder import Embedder
from attrimeter.runtime.errors import InputError
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.images import load_image

__all__ = ["IMAGE_SUFFIXES", "IndexReport", "image_entry", "index_folder"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class IndexReport(NamedTuple):
    """What :func:`index_folder` did.

    Attributes:
        added: Images added to the gallery.
        skipped: Unreadable images: ``(path, reason)``.
    """

    added: int
    skipped: list[tuple[str, str]]


def image_entry(path: Path, key: str) -> dict[str, Any]:
    """Gallery metadata of an indexed file: its key, resolved path, and identity and camera when its name says.

    Args:
        path: The image file.
        key: Its key (the path relative to the indexed folder; ``attrimeter index --ray``: also a list's line).

    Returns:
        ``{"key", "path", "camera"}``, and ``"pid"`` when the name follows the Market-1501/DukeMTMC pattern.
    """
    from attrimeter.data.formats import DataFormatError, parse_image_name

    entry: dict[str, Any] = {"key": key, "path": str(path.resolve()), "camera": None}
    for style in ("market1501", "dukemtmc"):
        try:
            pid, cam = parse_image_name(path, style)
        except DataFormatError:
            continue
        entry.update(pid=pid, camera=cam + 1)  # as the file name writes it: c1 → 1
        break
    return entry


def index_folder(folder: str | Path, gallery: Gallery, embedder: Embedder,
                 append: Callable[[Mapping[str, np.ndarray], list[dict[str, Any]]], None], segment: int = 4096,
                 progress: bool = True) -> IndexReport:
    """Add every image under a folder (sorted, recursive) to the gallery.

    Identity and camera (``c1`` → 1) come from Market-1501/DukeMTMC file names that follow the pattern; the key is
    the path relative to ``folder``.

    Args:
        folder: Image folder.
        gallery: The gallery (for the paths it already holds).
        embedder: Decodes and runs the images.
        append: Stores one segment: the model's outputs (finite) and one metadata dict per image.
        segment: Images per appended segment.
        progress: Show a progress bar.

    Returns:
        How many images were added, and the unreadable ones with the reason.

    Raises:
        InputError: No images in the folder.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    known = {m.get("path") for m in gallery.meta(np.arange(len(gallery)))} if len(gallery) else set()
    todo = [p for p in files if str(p.resolve()) not in known]
    bar = tqdm(total=len(todo), desc="index", unit="img", disable=not progress)
    size, step = embedder.image_size, embedder.max_batch
    added, skipped = 0, []

    def decode(path: Path) -> np.ndarray | None:
        try:
            return load_image(path, size, str(path))
        except Exception as e:  # whatever is wrong with one file, the others still get indexed
            skipped.append((str(path), str(e) or type(e).__name__))
            return None

    for s in range(0, len(todo), segment):
        pending: list[tuple[list[Path], list[Future[dict[str, np.ndarray]]]]] = []
        done: list[tuple[list[Path], dict[str, np.ndarray]]] = []
        chunk = todo[s:s + segment]
        for b in range(0, len(chunk), step):  # decode the next batch while the engine runs this one
            decoded = list(embedder.decode(decode, chunk[b:b + step]))
            good = [(p, x) for p, x in zip(chunk[b:b + step], decoded, strict=True) if x is not None]
            bar.update(len(decoded))
            if good:
                pending.append(([p for p, _ in good], embedder.submit(np.stack([x for _, x in good]))))
            while len(pending) > 2:  # bounded: at most three batches of pixels in flight
                paths, futures = pending.pop(0)
                done.append((paths, futures[0].result()))
        done += [(paths, futures[0].result()) for paths, futures in pending]
        if not done:
            continue
        paths = [p for ps, _ in done for p in ps]
        out = {k: np.concatenate([o[k] for _, o in done]) for k in done[0][1]}
        finite = np.isfinite(out["embedding"]).all(1) & np.isfinite(out["attr_embeddings"]).all((1, 2))
        skipped += [(str(p), "the model gives NaN/inf embeddings") for p, ok in zip(paths, finite, strict=True)
                    if not ok]
        if not finite.all():
            paths = [p for p, ok in zip(paths, finite, strict=True) if ok]
            out = {k: v[finite] for k, v in out.items()}
        if not paths:
            continue
        append(out, [image_entry(p, p.relative_to(folder).as_posix()) for p in paths])
        added += len(paths)
    bar.close()
    return IndexReport(added=added, skipped=skipped)
