"""A gallery's search index, made when the gallery is first searched: loaded, built, or extended.

Which index (docs/architecture.md §10): the one an :class:`~attrimeter.runtime.gallery_index.IndexChoice` names, or
with no choice the approximate index a writer saved in the gallery folder (``index.json`` + ``index.faiss``, see
``Gallery.save_index``), else exact. Exact is :class:`~attrimeter.runtime.gallery_index.HalfExactIndex` (a float16
copy) where it can be, :class:`~attrimeter.runtime.gallery_index.ExactIndex` otherwise. A saved index is derived
data: one that does not load or does not fit the gallery is logged and not used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from attrimeter.runtime.ann import AnnIndex, deserialize_index
from attrimeter.runtime.errors import AnnIndexError
from attrimeter.runtime.gallery_index import (
    INDEX_FAISS,
    INDEX_JSON,
    ExactIndex,
    GalleryIndex,
    HalfExactIndex,
    HalfRangeError,
    IndexChoice,
)
from attrimeter.runtime.store import StoreState

__all__ = ["extend_index", "open_index"]

log = logging.getLogger(__name__)

_INDEX_ROWS = 1 << 16  # rows per index add: bounds the temporary float32 copies
_BAR_ROWS = 1 << 18  # adding this many rows shows progress (an HNSW index takes minutes per 10^6)


def open_index(choice: IndexChoice | None, dim: int, metric: str, state: StoreState,
               rows: Callable[[np.ndarray], np.ndarray], read_derived: Callable[[str], bytes | None],
               where: Path) -> GalleryIndex:
    """The search index of every entry of ``state``.

    Args:
        choice: The index asked for, or None (the saved one, else exact).
        dim: Embedding width C.
        metric: ``"l2"`` or ``"ip"``.
        state: The published entries.
        rows: Stored embeddings by id (an approximate index re-ranks from them and trains on a sample).
        read_derived: Reads a derived file of the gallery folder (None when absent).
        where: The gallery folder, for messages.

    Raises:
        AnnIndexError: A bad parameter of the index asked for (one the gallery is too small to train is logged, and
            the gallery searched exactly).
    """
    if choice is not None and choice.kind == "flat":
        return exact_index(dim, metric, state)
    index = _saved(choice, dim, metric, state.count, rows, read_derived, where)
    if index is None and choice is not None:
        index = choice.build(dim, metric, rows, state.count)
        if index is None:
            log.warning("%s: %d entries are too few to train the %s index asked for: searched exactly", where,
                        state.count, choice.kind)
    if index is None:
        return exact_index(dim, metric, state)
    add_entries(index, state, index.ntotal)
    return index


def extend_index(index: GalleryIndex, dim: int, metric: str, state: StoreState) -> GalleryIndex:
    """``index`` with the entries of ``state`` it lacks added (a float32 exact index when they have no float16 copy)."""
    try:
        add_entries(index, state, index.ntotal)
    except HalfRangeError:
        return exact_index(dim, metric, state, half=False)
    return index


def exact_index(dim: int, metric: str, state: StoreState, half: bool = True) -> GalleryIndex:
    """An exact index of every entry of ``state``: over a float16 copy where it can be (``"l2"`` on the CPU)."""
    if half and metric == "l2" and not ExactIndex.on_gpu():
        index: GalleryIndex = HalfExactIndex(dim)
        try:
            add_entries(index, state, 0)
            return index
        except HalfRangeError:
            pass
    index = ExactIndex(dim, metric)
    add_entries(index, state, 0)
    return index


def add_entries(index: GalleryIndex, state: StoreState, start: int) -> None:
    """Add the embeddings of ids [start, state.count) to ``index``, read in bounded blocks (a bar for many)."""
    with tqdm(total=state.count - start, desc="search index", unit="entry", disable=state.count - start < _BAR_ROWS,
              leave=False) as bar:
        for segment in state.segments:
            embedding = segment.arrays["embedding"]
            for a in range(max(start - segment.first_id, 0), segment.count, _INDEX_ROWS):
                block = embedding.block(a, min(a + _INDEX_ROWS, segment.count))
                index.add(block)
                bar.update(len(block))


def _saved(choice: IndexChoice | None, dim: int, metric: str, count: int, rows: Callable[[np.ndarray], np.ndarray],
           read_derived: Callable[[str], bytes | None], where: Path) -> AnnIndex | None:
    """The saved approximate index when it fits the gallery (and ``choice``'s build parameters), else None."""
    doc = read_derived(INDEX_JSON)
    if doc is None or (choice is not None and _kind(doc) != choice.kind):
        return None  # none saved, or another kind than asked for: its data (maybe gigabytes) is not read
    data = read_derived(INDEX_FAISS)
    if data is None:
        return None
    try:
        index = deserialize_index(doc, data, rows, where=str(where / INDEX_JSON))
        if index.dim != dim or index.metric != metric or index.ntotal > count:
            raise AnnIndexError(f"{where / INDEX_JSON}: built for another gallery (width {index.dim}, metric "
                                f"{index.metric}, {index.ntotal} entries)")
    except AnnIndexError as e:  # derived data: searched without it, and replaced by the next save_index
        log.warning("%s: the saved search index is not used: %s", where, e)
        return None
    if choice is not None:
        if not choice.matches(index):
            return None  # built with other parameters: the caller builds the one asked for
        choice.configure(index)
    return index


def _kind(doc: bytes) -> str | None:
    """The kind an ``index.json`` names, or None when it does not parse (then :func:`deserialize_index` says why)."""
    try:
        parsed = json.loads(doc)
    except (ValueError, RecursionError):
        return None
    return parsed.get("kind") if isinstance(parsed, dict) else None
