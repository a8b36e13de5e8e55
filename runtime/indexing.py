"""Bulk indexing of an image folder into a gallery: resumable, one crash-safe segment at a time.

Decoding runs in the embedder's pool while the engine runs the previous batch; images already in the gallery (same
resolved path) are skipped, so an interrupted run resumes; unreadable images and images the model turns into NaN are
skipped and reported, so one bad file never blocks the rest (docs/architecture.md §6).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from attrimeter.runtime.embedder import Embedder
from attrimeter.runtime.errors import InputError
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.images import load_image
from attrimeter.runtime.storage import StorageCodecs, fit_storage, storage_codecs

if TYPE_CHECKING:
    from attrimeter.runtime.runtime import Embeddings

__all__ = ["FIT_SAMPLE", "IMAGE_SUFFIXES", "IndexReport", "image_entry", "image_files", "index_folder", "new_storage",
           "read_crop"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Images a new gallery's trained codecs are fitted on: the first of those indexed (pcaq samples 2^17 rows anyway).
FIT_SAMPLE = 2048


class IndexReport(NamedTuple):
    """What :func:`index_folder` did.

    Attributes:
        added: Images added to the gallery.
        skipped: Unreadable images: ``(path, reason)``.
    """

    added: int
    skipped: list[tuple[str, str]]


def image_entry(path: Path, key: str, sha256: str | None = None) -> dict[str, Any]:
    """Gallery metadata of an indexed file: its key, resolved path, and identity and camera when its name says.

    Args:
        path: The image file.
        key: Its key (the path relative to the indexed folder; ``attrimeter index --ray``: also a list's line).
        sha256: The sha256 of the bytes embedded (:func:`read_crop`), or None when not known yet.

    Returns:
        ``{"key", "path", "camera"}``, ``"sha256"`` when given (a gallery that drops its maps recomputes them from the
        crop and refuses one that changed since) and ``"pid"`` when the name follows the Market-1501/DukeMTMC pattern.
    """
    from attrimeter.data.formats import DataFormatError, parse_image_name

    entry: dict[str, Any] = {"key": key, "path": str(path.resolve()), "camera": None}
    if sha256 is not None:
        entry["sha256"] = sha256
    for style in ("market1501", "dukemtmc"):
        try:
            pid, cam = parse_image_name(path, style)
        except DataFormatError:
            continue
        entry.update(pid=pid, camera=cam + 1)  # as the file name writes it: c1 → 1
        break
    return entry


def read_crop(path: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Decode an image file and hash its bytes, read once: the hash is of exactly what is embedded.

    Args:
        path: The image file.
        size: The export's input ``(height, width)``.

    Returns:
        ``(uint8 pixels [height, width, 3], sha256 of the file)``.

    Raises:
        InputError: The file cannot be read or decoded (the message names it).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the image ({e.strerror or e})") from e
    return load_image(raw, size, str(path)), hashlib.sha256(raw).hexdigest()


def image_files(folder: str | Path) -> list[Path]:
    """The images under a folder, recursively, sorted: what :func:`index_folder` indexes, in its order.

    Raises:
        InputError: No images in the folder.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


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
    files = image_files(folder)
    known = {m.get("path") for m in gallery.meta(np.arange(len(gallery)))} if len(gallery) else set()
    todo = [p for p in files if str(p.resolve()) not in known]
    bar = tqdm(total=len(todo), desc="index", unit="img", disable=not progress)
    size, step = embedder.image_size, embedder.max_batch
    added, skipped = 0, []
    hashes: dict[Path, str] = {}

    def decode(path: Path) -> np.ndarray | None:
        try:
            pixels, hashes[path] = read_crop(path, size)
            return pixels
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
        append(out, [image_entry(p, p.relative_to(folder).as_posix(), hashes.pop(p)) for p in paths])
        added += len(paths)
    bar.close()
    return IndexReport(added=added, skipped=skipped)


def new_storage(mode: str, images: list[Path], embed: Callable[[list[np.ndarray]], Embeddings],
                image_size: tuple[int, int], *, dim: int, attributes: int, aam_shape: tuple[int, int] | None,
                sample: int = FIT_SAMPLE, batch: int = 32) -> StorageCodecs:
    """The codecs of a new gallery: a mode's, trained kinds fitted on the first ``sample`` readable images.

    The codecs are fitted once, when the gallery is created, and never again: later appends use them as they are
    (docs/architecture.md §10).

    Args:
        mode: One of :data:`~attrimeter.runtime.codecs.STORAGE_MODES`.
        images: The images to be indexed, in indexing order (only the first readable ones are read).
        embed: Embeds decoded images (e.g. ``Runtime.embed``).
        image_size: The export's input ``(height, width)``.
        dim: Embedding width C.
        attributes: Number of attributes M.
        aam_shape: ``(h, w)`` of the maps, or None.
        sample: Most images fitted on.
        batch: Images per ``embed`` call.

    Returns:
        The (fitted) codecs.

    Raises:
        InputError: An unknown mode, or fewer readable images than a trained codec needs
            (:data:`~attrimeter.runtime.storage.FIT_MIN_ENTRIES`).
    """
    codecs = storage_codecs(mode, dim, attributes, aam_shape)
    if not any(c is not None and c.trainable for c in codecs[1:]):
        return codecs
    attr, maps = [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        try:
            emb = embed(pending)
        except InputError:  # the model gives NaN/inf for one of them: not fitted on (index_folder skips it too)
            return
        attr.append(emb.attr_embeddings)
        maps.append(emb.aam)

    for path in images:
        if sum(len(a) for a in attr) + len(pending) >= sample:
            break
        try:
            pending.append(load_image(path, image_size, str(path)))
        except Exception:  # unreadable files are index_folder's to report
            continue
        if len(pending) == batch:
            flush()
            pending = []
    if pending:
        flush()
    rows = np.concatenate(attr) if attr else np.zeros((0, attributes, dim), np.float32)
    return fit_storage(mode, rows, None if aam_shape is None else
                       (np.concatenate(maps) if maps else np.zeros((0, attributes, *aam_shape), np.float32)))
