"""The search index over a gallery's global embeddings: the seam where other index kinds plug in.

:class:`~attrimeter.runtime.gallery.Gallery` keeps one index per open gallery, adds every entry's embedding to it in
id order (so index row i is gallery id i) and asks it for candidate ids; it then recomputes the exact distances from
the stored vectors itself. Any class with the :class:`GalleryIndex` shape serves (an approximate IVF or HNSW index,
say); :class:`ExactIndex` is FAISS's exact flat index and :class:`HalfExactIndex` an exact search over a float16
copy (the CPU default for ``"l2"`` galleries: half the bytes scanned per query, exact after re-ranking).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from attrimeter.runtime.ann import ANN_KINDS, AnnIndex, faiss_module, make_index
from attrimeter.runtime.errors import AnnIndexError, InputError

__all__ = ["INDEX_FAISS", "INDEX_JSON", "ExactIndex", "GalleryIndex", "HalfExactIndex", "HalfRangeError", "IndexChoice",
           "exact_keys", "set_search_threads", "settled"]

# A saved approximate index in the gallery folder (derived data, written by a writer: Gallery.save_index).
INDEX_JSON = "index.json"
INDEX_FAISS = "index.faiss"
INDEX_KINDS = tuple(ANN_KINDS)  # "flat" (exact), "ivf", "hnsw"

_GPU_MAX_K = 2048  # faiss-gpu's largest k
_FP16_MAX = float(np.finfo(np.float16).max)
_EPS32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32
# FAISS's OpenMP threads per CPU search (None: OpenMP's default, one per core). Set per process by
# :func:`set_search_threads` and applied by every search in the thread that runs it: OpenMP keeps the setting per
# calling thread, and a server searches from several.
_threads: int | None = None


def set_search_threads(threads: int | None) -> None:
    """How many threads FAISS uses per CPU search, for every index of this process.

    One thread serves single queries best: a flat search of one query is a few milliseconds of memory reads, and
    waking a team of OpenMP threads on a loaded machine costs more (measured on the 2-core CPU at 10,000 entries:
    ~30 ms with the default threads, 0.16 ms with one). More threads pay off for large batches of queries.

    Args:
        threads: Threads (>= 1), or None for OpenMP's default.

    Raises:
        ValueError: ``threads`` is not None or an integer >= 1.
    """
    global _threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"search threads must be an integer >= 1 or None, got {threads!r}")
    _threads = threads


class GalleryIndex(Protocol):
    """What a gallery needs of its search index."""

    @property
    def ntotal(self) -> int:
        """Number of vectors added."""

    def add(self, vectors: np.ndarray) -> None:
        """Add the next gallery entries' embeddings (float32 [n, C], raw, in id order)."""

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ids (int64 [Q, k], best first) of the ``k`` nearest of ``queries`` (float32 [Q, C]); ``k <= ntotal``."""

    def search_floor(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`search`'s ids and a lower bound float64 [Q] on the distance of every entry left out, or None.

        None when the index gives no such bound: :meth:`Gallery.rank` then fetches more until the k-th is settled.
        """

    def vectors(self, ids: np.ndarray) -> np.ndarray | None:
        """The embeddings at ``ids`` (int64 [n]) exactly as added (float32 [n, C]), or None.

        None when the index does not hold them so: the gallery then reads them from its store.
        """


class ExactIndex:
    """Exact search with FAISS (``IndexFlatL2``, or ``IndexFlatIP`` over unit vectors), on all GPUs FAISS sees.

    Args:
        dim: Embedding width C.
        metric: ``"l2"`` ranks by Euclidean distance, ``"ip"`` by cosine similarity.
    """

    def __init__(self, dim: int, metric: str):
        faiss = self._faiss = faiss_module()
        self._metric = metric
        index = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        self._gpu = self.on_gpu()
        self._index = faiss.index_cpu_to_all_gpus(index) if self._gpu else index

    @staticmethod
    def on_gpu() -> bool:
        """Whether FAISS sees a GPU (an exact index then lives there)."""
        return faiss_module().get_num_gpus() > 0

    @property
    def ntotal(self) -> int:
        """Number of vectors added."""
        return int(self._index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        """Add embeddings float32 [n, C] (normalised here for ``"ip"``)."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index.add(x if self._metric == "l2" else _unit(x))

    def search_floor(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, None]:
        """:meth:`search`, with no bound on what it left out."""
        return self.search(queries, k), None

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ids int64 [Q, k] of the nearest entries, best first.

        Raises:
            InputError: ``k`` above what a GPU index answers.
        """
        if k > _GPU_MAX_K and self._gpu:
            raise InputError(f"k must be at most {_GPU_MAX_K} on a GPU index, got {k}")
        if _threads is not None and not self._gpu:
            self._faiss.omp_set_num_threads(_threads)  # per calling thread: see set_search_threads
        _, ids = self._index.search(queries, k)  # for "ip", q·(x/|x|) ranks like the cosine: q needs no normalising
        return ids.astype(np.int64)

    def vectors(self, ids: np.ndarray) -> np.ndarray | None:
        """The raw embeddings at ``ids`` from the flat index's memory ("l2" on the CPU; "ip" holds unit vectors).

        A copy of a few rows in memory: re-ranking a search's candidates this way costs microseconds, where reading
        them from the store costs a positioned read each.
        """
        if self._gpu or self._metric != "l2":
            return None
        return self._index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


@dataclass(frozen=True)
class IndexChoice:
    """Which search index a gallery is searched with: ``flat`` (exact) or an approximate kind and its parameters.

    ``ivf`` and ``hnsw`` are :mod:`attrimeter.runtime.ann`'s (FAISS IVF-PQ and HNSW; their candidates re-ranked
    exactly); parameters are those of its classes (build-time ones, e.g. ``nlist``, and search-time ones, e.g.
    ``nprobe``, which a saved index takes on without being rebuilt).

    Attributes:
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        params: ``(name, value)`` pairs.
    """

    kind: str = "flat"
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise InputError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")
        names = [name for name, _ in self.params]
        if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise InputError(f"index parameters must have distinct names, got {names}")
        if self.kind == "flat" and self.params:
            raise InputError("the flat (exact) index has no parameters")
        if self.kind != "flat":
            known = set(inspect.signature(ANN_KINDS[self.kind]).parameters) - {"dim", "rows", "metric"}
            unknown = sorted(set(names) - known)
            if unknown:
                raise InputError(f"unknown {self.kind} index parameters {unknown}; known: {sorted(known)}")

    @classmethod
    def parse(cls, kind: str, items: Sequence[str] = ()) -> IndexChoice:
        """A choice from the command line: ``kind`` and ``name=value`` items (integers, numbers, or words).

        Raises:
            InputError: An unknown kind, a malformed item or a bad parameter.
        """
        params = []
        for item in items:
            name, sep, text = item.partition("=")
            if not sep or not name:
                raise InputError(f"an index parameter is name=value, got {item!r}")
            value: Any = text
            for convert in (int, float):
                try:
                    value = convert(text)
                    break
                except ValueError:
                    continue
            params.append((name, value))
        return cls(kind, tuple(params))

    def build(self, dim: int, metric: str, rows: Callable[[np.ndarray], np.ndarray], count: int) -> AnnIndex | None:
        """A new approximate index, trained on a sample of the gallery's ``count`` entries (read through ``rows``).

        Returns:
            The index, or None when the gallery holds too few entries to train it (a new or small gallery: it is
            searched exactly until it is opened again with enough).

        Raises:
            AnnIndexError: A bad parameter.
        """
        index = make_index(self.kind, dim, rows, metric, **dict(self.params))
        if count < index.min_training:
            return None
        if index.needs_training:
            n = min(count, index.train_size)
            pick = np.sort(np.random.default_rng(index.seed).choice(count, n, replace=False))
            index.train(np.asarray(rows(pick), np.float32))
        return index

    def matches(self, index: AnnIndex) -> bool:
        """Whether a saved index was built as this choice builds (search-time parameters aside)."""
        if index.kind != self.kind:
            return False
        fresh = make_index(self.kind, index.dim, _no_rows, index.metric, **dict(self.params))
        search = set(type(index)._SEARCH_PARAMS)
        return ({k: v for k, v in fresh.params().items() if k not in search}
                == {k: v for k, v in index.params().items() if k not in search})

    def configure(self, index: AnnIndex) -> None:
        """Set this choice's search-time parameters on a loaded index."""
        params = self._search_params(type(index))
        if params:
            index.configure(**params)

    def _search_params(self, cls: type[AnnIndex]) -> dict[str, Any]:
        return {k: v for k, v in self.params if k in cls._SEARCH_PARAMS}


def _no_rows(ids: np.ndarray) -> np.ndarray:
    raise AnnIndexError("no rows: a throwaway index")


class HalfRangeError(ValueError):
    """Embeddings a float16 copy cannot hold (beyond ±65504): the gallery searches them with :class:`ExactIndex`."""


class HalfExactIndex:
    """Exact ``"l2"`` search over a float16 copy of the embeddings (FAISS ``IndexScalarQuantizer``, ``QT_fp16``).

    A flat search reads every stored vector once per query, so its time is the bytes it reads: a float16 copy halves
    them, and the index's memory with them (an explained search at 10^6 entries costs 0.57× a plain ``IndexFlatL2``
    search, ``benchmarks/results/search_costs_1e6_cpu.md``). The search is still exact: :meth:`search_floor` returns,
    with the candidates, a lower bound on the exact distance of every entry it did not return, from FAISS's float32
    sum of ``(q_i − x̃_i)²`` over the rounded copy ``x̃`` and the largest rounding ``Δ = max ‖x − x̃‖`` of any entry
    added; :meth:`~attrimeter.runtime.gallery.Gallery.rank` re-ranks the candidates from the stored float32 rows and
    fetches more until the k-th exact distance lies below that bound.

    Args:
        dim: Embedding width C.
    """

    def __init__(self, dim: int):
        faiss = self._faiss = faiss_module()
        self._index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        self._delta = 0.0  # Δ: the largest ‖x − x̃‖ added
        # FAISS's float32 sum of C squared differences (each rounded once): relative error at most (C + 3)·u; doubled
        self._gamma = 2.0 * (dim + 3) * _EPS32

    @property
    def ntotal(self) -> int:
        """Number of vectors added."""
        return int(self._index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        """Add embeddings float32 [n, C].

        Raises:
            HalfRangeError: A value beyond float16's range (nothing is added).
        """
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(x) and float(np.abs(x).max()) > _FP16_MAX:
            raise HalfRangeError(f"an embedding value beyond ±{_FP16_MAX:g} has no float16 copy")
        rounded = x.astype(np.float16).astype(np.float64)
        if len(x):
            self._delta = max(self._delta, float(np.sqrt(((x - rounded) ** 2).sum(1)).max()))
        self._index.add(x)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ids int64 [Q, k] of the nearest entries by the float16 copy (see :meth:`search_floor`)."""
        return self.search_floor(queries, k)[0]

    def search_floor(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates and a lower bound on the distance of every entry not among them.

        Returns:
            ``(ids int64 [Q, k], floor float64 [Q])``: no entry outside a query's ids is nearer than its floor, as
            :func:`exact_keys` computes the distance (its own float32 rounding included).
        """
        if _threads is not None:
            self._faiss.omp_set_num_threads(_threads)  # per calling thread: see set_search_threads
        approx, ids = self._index.search(queries, k)
        # every entry not returned has a float32 sum >= the last one returned; back to ‖q − x̃‖, then to ‖q − x‖
        # (at most Δ further), then to its float32 distance (relative (C + 2)·u below at most; doubled)
        last = np.sqrt(np.maximum(approx[:, -1].astype(np.float64), 0.0) / (1.0 + self._gamma))
        floor = (last - self._delta) * (1.0 - self._gamma)
        return ids.astype(np.int64), np.where(np.isfinite(floor), floor, -np.inf)

    def vectors(self, ids: np.ndarray) -> np.ndarray | None:
        """None: the index holds rounded copies; the gallery reads the exact rows from its store."""
        return None


def exact_keys(q: np.ndarray, x: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact ranking keys of gathered candidates.

    Reductions along each row only: an entry's key does not depend on the batch it is computed in, nor on where it is
    stored, so shards of a gallery rank like the whole (docs/architecture.md §11).

    Args:
        q: Queries float32 [Q, C].
        x: Their candidates' stored embeddings float32 [Q, n, C].
        metric: ``"l2"`` or ``"ip"``.

    Returns:
        ``(keys float64 [Q, n] ascending: the distance for "l2", −cosine for "ip"; distances float32 [Q, n])``.
    """
    dist = np.linalg.norm(x - q[:, None], axis=2)
    if metric == "l2":
        return dist.astype(np.float64), dist
    x64, q64 = x.astype(np.float64), q[:, None].astype(np.float64)
    norms = np.sqrt((x64 * x64).sum(-1)) * np.sqrt((q64 * q64).sum(-1))
    return -(x64 * q64).sum(-1) / np.maximum(norms, 1e-300), dist


def settled(q: np.ndarray, kth: np.ndarray, last: np.ndarray, metric: str) -> bool:
    """Whether no candidate an exact index did not return can rank before or tie with each query's k-th exact key.

    The index ranked every unreturned entry at or after the last returned one by its float32 score, whose error is at
    most ``γ = 4·C·ε`` relative (of ``|q|² + |x|²`` for a squared distance, of ``|q|`` for an inner product with a
    unit vector).

    Args:
        q: Queries float32 [Q, C].
        kth: Each query's k-th exact key [Q].
        last: The exact key of each query's last returned candidate [Q].
        metric: ``"l2"`` or ``"ip"``.

    Returns:
        True when the k best (and every entry tied with the k-th) are among the returned candidates.
    """
    gamma = 4 * q.shape[1] * float(np.finfo(np.float32).eps)
    if metric == "l2":  # with |x|² ≤ 2|q|² + 2d²: an unreturned d'² ≥ (last²(1 − 2γ) − 6γ|q|²) / (1 + 2γ)
        q_sq = (q.astype(np.float64) ** 2).sum(1)
        bound = (last * last * (1 - 2 * gamma) - 6 * gamma * q_sq) / (1 + 2 * gamma)
        return bool((kth * kth * (1 + gamma) < bound).all())
    return bool((kth < last - 4 * gamma).all())  # −cos: an unreturned cos' ≤ cos(last) + 4γ


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)
