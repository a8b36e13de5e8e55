"""Large galleries and varied queries resampled from a real gallery's embeddings; imported by the benchmark scripts.

Distances between resampled rows look like real ones (every row is a real entry plus 5 % Gaussian noise), so search
costs measured on them are those of a real gallery of that size.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.runtime import Embeddings

NOISE = 0.05  # of the source's standard deviation


class Chunk(NamedTuple):
    """Resampled rows ``first .. first + len(embedding) - 1``."""

    first: int
    embedding: np.ndarray  # [n, C] float32
    attr_embeddings: np.ndarray  # [n, M, C] float32
    probs: np.ndarray  # [n, M]
    aam: np.ndarray | None  # [n, M, h, w]: the source rows' maps, copied (None: not asked for, or none stored)


def resampled_chunks(source: Gallery, entries: int, chunk: int = 8192, workers: int = 4,
                     maps: bool = False) -> Iterator[Chunk]:
    """``entries`` rows resampled from ``source`` with noise, in order, ``chunk`` at a time.

    The source rows are read once; chunks are drawn by ``workers`` threads (numpy's generators release the GIL), at
    most ``workers + 1`` chunks in memory. Chunk ``s`` uses its own seeded generator, so the rows are the same for
    any ``workers``, with or without ``maps`` (maps are copied, not noised: they cost bytes, not search time).

    Args:
        source: A real gallery.
        entries: Rows to draw.
        chunk: Rows per chunk.
        workers: Drawing threads.
        maps: Also return each row's source attention maps (the source must store them).

    Yields:
        :class:`Chunk` objects covering ``0 .. entries - 1``.

    Raises:
        ValueError: ``maps`` asked of a source without maps, or ``entries`` < 1.
    """
    if entries < 1:
        raise ValueError(f"entries must be positive, got {entries}")
    if maps and source.aam_shape is None:
        raise ValueError(f"{source!r} stores no attention maps to resample")
    real = np.arange(len(source))
    f_src, fk_src, p_src = source.embeddings(real), source.attr_embeddings(real), source.probs(real)
    a_src = source.aam(real) if maps else None
    f_std, fk_std = NOISE * f_src.std(), NOISE * fk_src.std()

    def draw(s: int) -> Chunk:
        rng = np.random.default_rng((0, s))
        pick = rng.choice(real, min(chunk, entries - s))
        f = f_src[pick] + f_std * rng.standard_normal((len(pick), f_src.shape[1]), dtype=np.float32)
        fk = fk_src[pick] + fk_std * rng.standard_normal((len(pick), *fk_src.shape[1:]), dtype=np.float32)
        return Chunk(s, f, fk, p_src[pick], None if a_src is None else a_src[pick])

    starts = iter(range(0, entries, chunk))
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(draw, s) for s in itertools.islice(starts, workers + 1))
        while pending:
            done = pending.popleft().result()
            pending.extend(pool.submit(draw, t) for t in itertools.islice(starts, 1))
            yield done


def fill_gallery(path: Path, source: Gallery, entries: int, chunk: int = 8192, workers: int = 4) -> None:
    """A new gallery store at ``path`` of ``entries`` rows resampled from ``source`` (keys ``synthetic-<i>``, no maps).

    Args:
        path: The new store's folder.
        source: A real gallery.
        entries: Rows.
        chunk: Rows per appended segment.
        workers: Drawing threads (see :func:`resampled_chunks`).
    """
    g = Gallery.create(path, dim=source.dim, attributes=source.attributes, aam_shape=None, model=source.model)
    with g:
        for c in tqdm(resampled_chunks(source, entries, chunk, workers), total=-(-entries // chunk),
                      desc="fill gallery", unit="chunk"):
            g.append(c.embedding, c.attr_embeddings, c.probs,
                     [{"key": f"synthetic-{c.first + i}"} for i in range(len(c.embedding))])


def queries(source: Gallery, n: int, seed: int) -> list[Embeddings]:
    """``n`` distinct one-image queries: source rows with noise of their own (no maps).

    Args:
        source: A real gallery.
        n: Queries.
        seed: Their generator's seed.

    Returns:
        One :class:`~attrimeter.runtime.runtime.Embeddings` of one row per query.
    """
    rng = np.random.default_rng(seed)
    real = np.arange(len(source))
    f, fk, p = source.embeddings(real), source.attr_embeddings(real), source.probs(real)
    out = []
    for i in rng.choice(real, n):
        e = f[i:i + 1] + NOISE * f.std() * rng.standard_normal((1, f.shape[1]), dtype=np.float32)
        ek = fk[i:i + 1] + NOISE * fk.std() * rng.standard_normal((1, *fk.shape[1:]), dtype=np.float32)
        out.append(Embeddings(e, ek, p[i:i + 1], np.zeros((1, fk.shape[1], 1, 1), np.float32)))
    return out
