"""Search indexes over the global embeddings: exact, IVF and HNSW, re-ranked exactly (docs/architecture.md §10).

Three kinds (``ANN_KINDS``), one class each, all with the shape of
:class:`~attrimeter.runtime.gallery_index.GalleryIndex` (``ntotal``, ``add``, ``search`` returning ids):

- ``flat``: FAISS's exact flat index (the baseline; it holds a float32 copy of every vector).
- ``ivf``: FAISS IVF: ``nlist`` k-means cells, ``nprobe`` of them visited per query; the vectors are stored as
  ``pq_m``-byte product-quantisation codes (IVF-PQ), or as float32 with ``pq_m=0`` (IVF-Flat).
- ``hnsw``: FAISS HNSW graph with ``m`` links per node, ``ef_construction`` / ``ef_search`` beam widths; vectors
  stored as 8-bit scalar codes (``storage="sq8"``) or float32 (``"flat"``).

``search(q, k)`` asks FAISS for ``k · rerank`` candidates, recomputes their exact key (squared L2 distance, or minus
the cosine for the ``ip`` metric) from the float32 rows, and returns the ``k`` best, ties to the lower id. The rows come
from a *row source*, a function from ids to float32 ``[n, C]`` (``Gallery.embeddings``: the store's own copy), so an
approximate index keeps only its codes. A query that got fewer than ``k`` candidates (an IVF whose visited cells hold
fewer) is answered by an exact scan of the rows.

How the gallery uses it (:class:`~attrimeter.runtime.gallery_index.IndexChoice`, docs/architecture.md §10):
``Gallery.open(..., index=IndexChoice("ivf", ...))`` builds one (trained on a sample of the stored embeddings, the
entries added in id order) or loads the one a writer saved (``Gallery.save_index``: :meth:`AnnIndex.serialize` as
``index.json`` and ``index.faiss`` in the gallery folder, written through its descriptor; readers check the sha256
and add the entries appended since). ``flat`` in the gallery is its own exact index (``gallery_index``);
:class:`FlatIndex` here is the benchmarks' baseline. CLI: ``attrimeter index|search|serve --index ivf
--index-param nlist=1024``. Measured in ``benchmarks/results/ann_cpu.md``.

FAISS's thread count is the process's (``faiss.omp_set_num_threads``); nothing here changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from attrimeter.runtime.errors import AnnIndexError

__all__ = ["ANN_KINDS", "AnnIndex", "FlatIndex", "HnswIndex", "IvfIndex", "RowSource", "deserialize_index",
           "faiss_module", "load_index", "make_index"]

ANN_FORMAT = "attrimeter-ann"
ANN_VERSION = 1
RowSource = Callable[[np.ndarray], np.ndarray]  # ids int64 [n] -> float32 [n, C]

_JSON = "index.json"
_FAISS = "index.faiss"
_BLOCK = 1 << 16  # rows per add / exact-scan step
_GATHER_BYTES = 64 << 20  # float64 candidate rows per re-ranking step


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise AnnIndexError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class AnnIndex(ABC):
    """A FAISS index over the global embeddings plus exact re-ranking of its candidates from the row source.

    Args:
        dim: Embedding width C.
        rows: The row source: ids → float32 ``[n, C]`` embeddings as added.
        metric: ``"l2"`` (Euclidean) or ``"ip"`` (cosine: FAISS holds unit vectors).
        rerank: Candidates per result asked of FAISS (``k · rerank``), re-ranked exactly.
        train_size: Most vectors :meth:`build` trains on (a random sample).
        seed: Seed of that sample.
    """

    kind: ClassVar[str]
    _SEARCH_PARAMS: ClassVar[tuple[str, ...]] = ("rerank",)

    def __init__(self, dim: int, rows: RowSource, metric: str = "l2", rerank: int = 1, train_size: int = 65536,
                 seed: int = 0):
        self.dim = _int("dim", dim, 1)
        if metric not in ("l2", "ip"):
            raise AnnIndexError(f"metric must be 'l2' or 'ip', got {metric!r}")
        if not callable(rows):
            raise AnnIndexError("rows must be a function from ids to float32 [n, C] embeddings")
        self.metric = metric
        self.rerank = _int("rerank", rerank, 1)
        self.train_size = _int("train_size", train_size, 1)
        self.seed = _int("seed", seed, 0)
        self._rows = rows
        self._index: Any = None  # made by each kind

    # ------------------------------------------------------------------ the GalleryIndex shape

    @property
    def ntotal(self) -> int:
        """Number of vectors added."""
        return int(self._index.ntotal)

    @property
    def needs_training(self) -> bool:
        """Whether :meth:`train` must run before :meth:`add`."""
        return not self._index.is_trained

    @property
    def min_training(self) -> int:
        """Fewest training vectors :meth:`train` accepts (0 when the kind needs none)."""
        return self._min_training() if self.needs_training else 0

    def train(self, sample: np.ndarray) -> None:
        """Train the index (cells, codebooks) on a sample of embeddings float32 ``[n, C]``.

        Raises:
            AnnIndexError: Bad vectors, too few of them, or an index that already holds vectors.
        """
        x = self._check_vectors(sample, "training vectors")
        if self.ntotal:
            raise AnnIndexError(f"the {self.kind} index already holds {self.ntotal} vectors: train a new one")
        need = self._min_training()
        if len(x) < need:
            raise AnnIndexError(f"the {self.kind} index needs at least {need} training vectors, got {len(x)} "
                                "(use fewer cells, or the flat index for a small gallery)")
        self._index.train(self._for_faiss(x))

    def add(self, vectors: np.ndarray) -> None:
        """Add the next entries' embeddings float32 ``[n, C]`` (index row i is id i).

        Raises:
            AnnIndexError: Bad vectors, or an untrained index.
        """
        x = self._check_vectors(vectors, "vectors")
        if self.needs_training:
            raise AnnIndexError(f"the {self.kind} index is not trained: call train(sample) or build(vectors) first")
        for a in range(0, len(x), _BLOCK):
            self._index.add(self._for_faiss(x[a:a + _BLOCK]))

    def build(self, vectors: np.ndarray) -> None:
        """Train on a random sample of ``vectors`` (at most ``train_size``) where needed, then add them all."""
        x = self._check_vectors(vectors, "vectors")
        if self.needs_training:
            n = min(len(x), self.train_size)
            pick = np.sort(np.random.default_rng(self.seed).choice(len(x), n, replace=False))
            self.train(x[pick])
        self.add(x)

    def search_floor(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, None]:
        """:meth:`search`, with no bound on what it left out (approximate: nothing is settled by a bound)."""
        return self.search(queries, k), None

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ids int64 ``[Q, k]`` of the nearest entries by exact key, best first, ties to the lower id.

        Raises:
            AnnIndexError: Bad queries, or ``k`` not in ``[1, ntotal]``.
        """
        q = self._check_vectors(queries, "queries")
        k = _int("k", k, 1)
        if k > self.ntotal:
            raise AnnIndexError(f"k must be at most the number of vectors ({self.ntotal}), got {k}")
        n = min(self.ntotal, k * self.rerank)
        _, found = self._index.search(self._for_faiss(q), n, params=self._faiss_params(n))
        cand = _proposals(found, self.ntotal)
        keys = np.full(cand.shape, np.inf)
        rows = max(1, _GATHER_BYTES // (8 * n * self.dim))
        for a in range(0, len(q), rows):
            keys[a:a + rows] = self._keys(q[a:a + rows], cand[a:a + rows])
        order = np.lexsort((np.where(cand < 0, np.iinfo(np.int64).max, cand), keys), axis=1)[:, :k]
        ids = np.take_along_axis(cand, order, 1).astype(np.int64)
        short = np.flatnonzero((ids < 0).any(axis=1))
        if short.size:  # too few candidates: those queries scan every row
            ids[short] = self._exact(q[short], k)
        return ids

    def vectors(self, ids: np.ndarray) -> np.ndarray | None:
        """None: the index keeps codes, not the rows (the gallery reads those from its store)."""
        return None

    # ------------------------------------------------------------------ parameters and files

    def configure(self, **params: Any) -> None:
        """Change search-time parameters (``rerank``; ``nprobe`` for ivf; ``ef_search`` for hnsw).

        Raises:
            AnnIndexError: A parameter that is not a search-time one of this kind, or a bad value.
        """
        unknown = sorted(set(params) - set(self._SEARCH_PARAMS))
        if unknown:
            raise AnnIndexError(f"{unknown} cannot change after building a {self.kind} index; search-time "
                                f"parameters: {list(self._SEARCH_PARAMS)}")
        for name, value in params.items():
            self._set_search_param(name, value)

    def params(self) -> dict[str, Any]:
        """The keyword parameters of :func:`make_index` (JSON values)."""
        return {"rerank": self.rerank, "train_size": self.train_size, "seed": self.seed}

    def to_json(self) -> dict[str, Any]:
        """``{"kind", "dim", "metric", "params"}``."""
        return {"kind": self.kind, "dim": self.dim, "metric": self.metric, "params": self.params()}

    def serialize(self) -> tuple[bytes, bytes]:
        """``(index.json, index.faiss)`` bytes.

        The description (with the FAISS file's sha256) and the FAISS index (empty for ``flat``: rebuilt from the rows).
        """
        doc: dict[str, Any] = {"format": ANN_FORMAT, "version": ANN_VERSION, **self.to_json(), "ntotal": self.ntotal}
        data = faiss_module().serialize_index(self._index).tobytes() if self._persists else b""
        doc["sha256"] = hashlib.sha256(data).hexdigest()
        return (json.dumps(doc, indent=1) + "\n").encode(), data

    def save(self, folder: str | Path) -> None:
        """Write ``index.json`` and ``index.faiss`` (:meth:`serialize`) into ``folder``."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        doc, data = self.serialize()
        for name, raw in ((_FAISS, data), (_JSON, doc)):
            tmp = path / (name + ".tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, path / name)

    # ------------------------------------------------------------------ per kind

    _persists: ClassVar[bool] = True

    @abstractmethod
    def _min_training(self) -> int:
        """Fewest training vectors the kind accepts."""

    @abstractmethod
    def _faiss_params(self, n: int) -> Any:
        """FAISS search parameters for ``n`` candidates (None: the index's own)."""

    def _set_search_param(self, name: str, value: Any) -> None:
        self.rerank = _int("rerank", value, 1)

    def _check_loaded(self, index: Any, ntotal: int) -> None:
        """Refuse a loaded FAISS index that is not what ``index.json`` describes (AnnIndexError)."""
        if index.d != self.dim or index.ntotal != ntotal or index.metric_type != self._index.metric_type:
            raise AnnIndexError(f"the saved index holds {index.ntotal} vectors of width {index.d}, its index.json "
                                f"says {ntotal} of width {self.dim} (or another metric)")

    # ------------------------------------------------------------------ helpers

    def _check_vectors(self, vectors: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[1] != self.dim or not np.issubdtype(x.dtype, np.floating):
            raise AnnIndexError(f"{what} must be floating [n, {self.dim}], got {x.dtype} {list(x.shape)}")
        if not np.isfinite(x).all():
            raise AnnIndexError(f"{what} contain NaN or infinite values")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _for_faiss(self, x: np.ndarray) -> np.ndarray:
        """What FAISS holds and is asked: the vectors, or for ``ip`` unit vectors (q·x/|x| ranks like the cosine)."""
        if self.metric == "l2":
            return x
        norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)

    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        x = np.asarray(self._rows(ids))
        if x.shape != (len(ids), self.dim):
            raise AnnIndexError(f"the row source returned shape {list(x.shape)} for {len(ids)} ids, "
                                f"expected [{len(ids)}, {self.dim}]")
        return x.astype(np.float64)

    def _keys(self, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Exact float64 keys ``[Q, n]`` of candidates (``inf`` where FAISS returned none)."""
        valid = cand >= 0  # -1: no candidate
        x = np.zeros((*cand.shape, self.dim))
        x[valid] = self._fetch(cand[valid])
        q64 = q.astype(np.float64)[:, None]
        if self.metric == "l2":
            keys = ((x - q64) ** 2).sum(-1)
        else:
            norms = np.sqrt((x * x).sum(-1) * (q64 * q64).sum(-1))
            keys = -(x * q64).sum(-1) / np.maximum(norms, 1e-300)
        return np.where(valid, keys, np.inf)

    def _exact(self, q: np.ndarray, k: int) -> np.ndarray:
        """The exact top-k ids of ``q`` over every row, block by block (float64 ``|x|² + |q|² − 2 q·x``)."""
        q64 = q.astype(np.float64)
        q_sq = (q64 * q64).sum(1, keepdims=True)
        best_keys, best_ids = np.empty((len(q), 0)), np.empty((len(q), 0), np.int64)
        step = max(1, _GATHER_BYTES // (8 * self.dim))
        for a in range(0, self.ntotal, step):
            block = np.arange(a, min(a + step, self.ntotal))
            x = self._fetch(block)
            x_sq, dots = (x * x).sum(1)[None], q64 @ x.T
            if self.metric == "l2":
                keys = np.maximum(q_sq + x_sq - 2 * dots, 0.0)
            else:
                keys = -dots / np.maximum(np.sqrt(q_sq * x_sq), 1e-300)
            best_keys = np.concatenate([best_keys, keys], axis=1)
            best_ids = np.concatenate([best_ids, np.broadcast_to(block, keys.shape)], axis=1)
            order = np.lexsort((best_ids, best_keys), axis=1)[:, :k]
            best_keys, best_ids = np.take_along_axis(best_keys, order, 1), np.take_along_axis(best_ids, order, 1)
        return best_ids


class FlatIndex(AnnIndex):
    """Exact search (FAISS flat): the baseline the approximate kinds are measured against."""

    kind = "flat"
    _persists = False  # a copy of the rows: rebuilt from them on load

    def __init__(self, dim: int, rows: RowSource, metric: str = "l2", rerank: int = 1, train_size: int = 65536,
                 seed: int = 0):
        super().__init__(dim, rows, metric, rerank, train_size, seed)
        faiss = faiss_module()
        self._index = faiss.IndexFlatL2(self.dim) if metric == "l2" else faiss.IndexFlatIP(self.dim)

    def _min_training(self) -> int:
        return 0

    def _faiss_params(self, n: int) -> Any:
        return None


class IvfIndex(AnnIndex):
    """FAISS IVF: k-means cells, ``nprobe`` visited per query; IVF-PQ codes of ``pq_m`` bytes, or IVF-Flat.

    Args:
        nlist: Cells (k-means centroids).
        nprobe: Cells visited per query (at most ``nlist``; None: 16, or ``nlist`` when fewer).
        pq_m: Bytes per vector (product-quantisation sub-quantisers, a divisor of C), or 0 for float32 vectors.
        Others: as :class:`AnnIndex`.
    """

    kind = "ivf"
    _SEARCH_PARAMS = ("rerank", "nprobe")

    def __init__(self, dim: int, rows: RowSource, metric: str = "l2", nlist: int = 1024, nprobe: int | None = None,
                 pq_m: int = 32, rerank: int = 10, train_size: int = 65536, seed: int = 0):
        super().__init__(dim, rows, metric, rerank, train_size, seed)
        self.nlist = _int("nlist", nlist, 1)
        self.pq_m = _int("pq_m", pq_m, 0)
        if self.pq_m and self.dim % self.pq_m:
            raise AnnIndexError(f"pq_m must divide the embedding width {self.dim} (or be 0), got {pq_m}")
        self._set_search_param("nprobe", min(16, self.nlist) if nprobe is None else nprobe)
        faiss = faiss_module()
        metric_type = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        quantizer = faiss.IndexFlatL2(self.dim) if metric == "l2" else faiss.IndexFlatIP(self.dim)
        if self.pq_m:
            self._index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.pq_m, 8, metric_type)
        else:
            self._index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, metric_type)
        self._quantizer = quantizer  # the IVF index does not own it: keep it alive

    def params(self) -> dict[str, Any]:
        """The keyword parameters of :func:`make_index` (JSON values)."""
        return {"nlist": self.nlist, "nprobe": self.nprobe, "pq_m": self.pq_m, **super().params()}

    def _set_search_param(self, name: str, value: Any) -> None:
        if name != "nprobe":
            return super()._set_search_param(name, value)
        nprobe = _int("nprobe", value, 1)
        if nprobe > self.nlist:
            raise AnnIndexError(f"nprobe must be at most nlist ({self.nlist}), got {nprobe}")
        self.nprobe = nprobe

    def _min_training(self) -> int:
        return max(self.nlist, 256 if self.pq_m else 0)  # k-means: one vector per cell; PQ: one per centroid

    def _faiss_params(self, n: int) -> Any:
        params = faiss_module().SearchParametersIVF()
        params.nprobe = self.nprobe
        return params

    def _check_loaded(self, index: Any, ntotal: int) -> None:
        super()._check_loaded(index, ntotal)
        ivf = faiss_module().extract_index_ivf(index)
        pq_m = int(index.pq.M) if hasattr(index, "pq") else 0
        if ivf.nlist != self.nlist or pq_m != self.pq_m:
            raise AnnIndexError(f"the saved IVF index has nlist {ivf.nlist} and pq_m {pq_m}, its index.json says "
                                f"{self.nlist} and {self.pq_m}")


class HnswIndex(AnnIndex):
    """FAISS HNSW graph over 8-bit scalar codes (``storage="sq8"``) or float32 vectors (``"flat"``).

    Args:
        m: Links per node.
        ef_construction: Beam width while adding.
        ef_search: Beam width while searching (raised to ``k · rerank`` when that is larger).
        storage: ``"sq8"`` or ``"flat"``.
        Others: as :class:`AnnIndex`.
    """

    kind = "hnsw"
    _SEARCH_PARAMS = ("rerank", "ef_search")

    def __init__(self, dim: int, rows: RowSource, metric: str = "l2", m: int = 32, ef_construction: int = 64,
                 ef_search: int = 64, storage: str = "sq8", rerank: int = 4, train_size: int = 65536, seed: int = 0):
        super().__init__(dim, rows, metric, rerank, train_size, seed)
        self.m = _int("m", m, 2)
        self.ef_construction = _int("ef_construction", ef_construction, 1)
        self._set_search_param("ef_search", ef_search)
        if storage not in ("sq8", "flat"):
            raise AnnIndexError(f"storage must be 'sq8' or 'flat', got {storage!r}")
        self.storage = storage
        faiss = faiss_module()
        metric_type = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if storage == "sq8":
            self._index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_8bit, self.m, metric_type)
        else:
            self._index = faiss.IndexHNSWFlat(self.dim, self.m, metric_type)
        self._index.hnsw.efConstruction = self.ef_construction

    def params(self) -> dict[str, Any]:
        """The keyword parameters of :func:`make_index` (JSON values)."""
        return {"m": self.m, "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                "storage": self.storage, **super().params()}

    def _set_search_param(self, name: str, value: Any) -> None:
        if name != "ef_search":
            return super()._set_search_param(name, value)
        self.ef_search = _int("ef_search", value, 1)

    def _min_training(self) -> int:
        return 1  # the scalar quantiser's per-dimension range

    def _faiss_params(self, n: int) -> Any:
        params = faiss_module().SearchParametersHNSW()
        params.efSearch = max(self.ef_search, n)  # HNSW returns at most efSearch results
        return params

    def _check_loaded(self, index: Any, ntotal: int) -> None:
        super()._check_loaded(index, ntotal)
        storage = "sq8" if "SQ" in type(index).__name__ else "flat"
        links = int(index.hnsw.nb_neighbors(1))  # layers above 0 hold m links per node
        if storage != self.storage or links != self.m:
            raise AnnIndexError(f"the saved HNSW index has storage {storage!r} and m {links}, its index.json says "
                                f"{self.storage!r} and {self.m}")
        index.hnsw.efConstruction = self.ef_construction


def _proposals(found: np.ndarray, ntotal: int) -> np.ndarray:
    """FAISS's candidate ids, those a sound index never gives turned into -1 ("no candidate").

    That is ids outside ``[0, ntotal)`` and the repeats of an id in a query's row (the first is kept): what a damaged
    or hostile saved index could propose.
    """
    cand = np.where((found >= 0) & (found < ntotal), found, -1).astype(np.int64)
    order = np.argsort(cand, axis=1, kind="stable")
    ranked = np.take_along_axis(cand, order, 1)
    repeat = np.zeros(cand.shape, bool)
    repeat[:, 1:] = (ranked[:, 1:] == ranked[:, :-1]) & (ranked[:, 1:] >= 0)
    np.put_along_axis(cand, order, np.where(repeat, -1, ranked), 1)
    return cand


ANN_KINDS: dict[str, type[AnnIndex]] = {cls.kind: cls for cls in (FlatIndex, IvfIndex, HnswIndex)}


def make_index(kind: str, dim: int, rows: RowSource, metric: str = "l2", **params: Any) -> AnnIndex:
    """An empty index of one kind.

    Args:
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        dim: Embedding width C.
        rows: The row source (ids → float32 ``[n, C]``) for exact re-ranking.
        metric: ``"l2"`` or ``"ip"``.
        **params: The kind's parameters (see each class).

    Raises:
        AnnIndexError: An unknown kind or parameter, or a bad value.
    """
    cls = ANN_KINDS.get(kind)
    if cls is None:
        raise AnnIndexError(f"unknown index kind {kind!r}; known: {sorted(ANN_KINDS)}")
    try:
        return cls(dim, rows, metric, **params)
    except TypeError:
        raise AnnIndexError(f"bad parameters for a {kind} index: {sorted(params)}") from None


def load_index(folder: str | Path, rows: RowSource) -> AnnIndex:
    """An index saved by :meth:`AnnIndex.save` (a flat index is rebuilt from the rows).

    Args:
        folder: The folder holding ``index.json`` and ``index.faiss``.
        rows: The row source; for ``flat`` it must serve ids ``0..ntotal-1``.

    Raises:
        AnnIndexError: Missing or malformed files, or a FAISS file that does not match its ``index.json``.
    """
    path = Path(folder)
    try:
        doc, data = (path / _JSON).read_bytes(), (path / _FAISS).read_bytes()
    except OSError as e:
        raise AnnIndexError(f"{path}: cannot read the saved index ({e})") from e
    return deserialize_index(doc, data, rows, where=str(path))


def deserialize_index(doc_bytes: bytes, data: bytes, rows: RowSource, where: str = "saved index") -> AnnIndex:
    """The index :meth:`AnnIndex.serialize` gave these bytes of.

    Args:
        doc_bytes: ``index.json``.
        data: ``index.faiss``.
        rows: The row source; for ``flat`` it must serve ids ``0..ntotal-1``.
        where: Names the files in errors.

    Raises:
        AnnIndexError: Malformed bytes, or a FAISS index that does not match its description.
    """
    try:
        doc = json.loads(doc_bytes)
    except (ValueError, RecursionError) as e:
        raise AnnIndexError(f"{where}: the index description is not JSON ({type(e).__name__})") from e
    if (not isinstance(doc, dict) or doc.get("format") != ANN_FORMAT or doc.get("version") != ANN_VERSION
            or not isinstance(doc.get("params"), dict) or not isinstance(doc.get("ntotal"), int)
            or isinstance(doc.get("ntotal"), bool) or doc["ntotal"] < 0):
        raise AnnIndexError(f"{where}: not an {ANN_FORMAT} version {ANN_VERSION} description")
    if hashlib.sha256(data).hexdigest() != doc.get("sha256"):
        raise AnnIndexError(f"{where}: the FAISS file is not the one its description names (sha256 differs)")
    index = make_index(doc.get("kind"), doc.get("dim"), rows, doc.get("metric"), **doc["params"])
    if not index._persists:
        for a in range(0, doc["ntotal"], _BLOCK):
            index.add(np.asarray(rows(np.arange(a, min(a + _BLOCK, doc["ntotal"]))), dtype=np.float32))
        return index
    try:
        loaded = faiss_module().deserialize_index(np.frombuffer(data, np.uint8))
    except RuntimeError as e:  # FAISS's own reader refused the bytes
        raise AnnIndexError(f"{where}: not a FAISS index ({str(e).splitlines()[0][:200]})") from e
    try:
        index._check_loaded(loaded, doc["ntotal"])
    except AnnIndexError as e:
        raise AnnIndexError(f"{where}: {e}") from None
    index._index = loaded
    return index


def faiss_module() -> Any:
    """The ``faiss`` module, imported on first use (gallery search, approximate indexes, the pq codec need it).

    Raises:
        ImportError: FAISS is not installed, saying what to install.
    """
    try:
        import faiss
    except ImportError as e:
        raise ImportError("FAISS is needed (gallery search, approximate indexes, the pq codec): pip install faiss-cpu "
                          "(or faiss-gpu on a CUDA box)") from e
    return faiss
