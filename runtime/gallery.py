"""A gallery of embedded person crops: validated appends, exact search, reads by id (docs/architecture.md §10).

:class:`Gallery` is the public face of a gallery folder. It checks what is appended, keeps the search index
(:mod:`attrimeter.runtime.gallery_index`) in step with the published entries, and reads rows by gallery id. The files,
the writer lock, publishing and compaction are :mod:`attrimeter.runtime.store`'s; the on-disk format is
:mod:`attrimeter.runtime.store_format`'s; one segment's files are :mod:`attrimeter.runtime.segment`'s.

Within a process, searches and reads may run while another thread appends, refreshes or compacts: the published
state and the search index are swapped together under a lock, so a search sees either the old or the new gallery,
and a state a reader still holds keeps answering after a compaction deleted its folders. (The module runs to ~750
lines: appends, reads and searches share the state snapshot and its locks, so they stay one class; how rows are
encoded lives in :mod:`attrimeter.runtime.storage`, how the search index is made in
:mod:`attrimeter.runtime.index_open`.)
"""

from __future__ import annotations

import json
import logging
import operator
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.runtime.ann import AnnIndex
from attrimeter.runtime.decompose import weighted_scan
from attrimeter.runtime.errors import CodecError, GalleryError, InputError, UnknownIdError
from attrimeter.runtime.gallery_index import INDEX_FAISS, INDEX_JSON, GalleryIndex, IndexChoice, exact_keys, settled
from attrimeter.runtime.index_open import extend_index, open_index
from attrimeter.runtime.segment import squared_norms
from attrimeter.runtime.storage import StorageCodecs, check_codecs, decode_rows, describe, encode_state
from attrimeter.runtime.store import SegmentStore, StoreState
from attrimeter.runtime.store_format import DTYPES, FORMAT, MANIFEST_NAME, META, METRICS, VERSION, make_spec

__all__ = ["DEFAULT_AUTO_COMPACT", "GALLERY_FORMAT", "GALLERY_VERSION", "MANIFEST_NAME", "METRICS", "Gallery"]

log = logging.getLogger(__name__)

GALLERY_FORMAT = FORMAT
GALLERY_VERSION = VERSION
# A writable handle merges its newest segments once this many of them are of the same small size class (below
# 1 MiB, or below 16 MiB): a server that appends one image at a time keeps a bounded number of segments, and no merge
# rewrites more than 16 × 16 MiB.
DEFAULT_AUTO_COMPACT = 16
_SIZE_CLASSES = (1 << 20, 16 << 20)
_GATHER_BYTES = 64 << 20  # bytes of gathered embeddings per step when recomputing search distances
# Candidates beyond k a search asks the index for first: usually enough for the exact re-ranking to settle the k-th
# place; and the most it asks for (faiss-gpu's largest k) unless k itself is larger. Each unsettled round is another
# full index search: at 10^5 entries of resampled demo embeddings, a margin of 8 needed 2.1 searches per query, 32
# needed 1.005 (re-ranking 32 more rows costs far less than a search).
_RANK_MARGIN = 32
_FETCH_CAP = 2048
_SCAN_CHUNK = 16384  # entries per chunk of a weighted scan


class Gallery:
    """A gallery of embedded person crops: append-only, crash-safe, searched exactly with FAISS.

    Create one with :meth:`create`, open one with :meth:`open`. Ids are consecutive int64 from 0 in append order and
    never change (not even by :meth:`compact`). A gallery opened ``writable`` holds the folder's writer lock until
    :meth:`close`; readers take no lock and see another process's appends and compactions after :meth:`refresh`.
    """

    def __init__(self, store: SegmentStore, *, auto_compact: int | None, index: IndexChoice | None = None):
        """Use :meth:`create` or :meth:`open`."""
        self.path = store.path
        self._store = store
        self._state = store.state
        self._auto_compact = auto_compact
        self._lock = threading.Lock()  # appends, refreshes, compaction
        self._index_lock = threading.Lock()  # the search index and the state swap
        self._index: GalleryIndex | None = None
        self._index_choice = index
        self._closed = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: str | Path, *, dim: int, attributes: Sequence[str], aam_shape: tuple[int, int] | None,
               model: str, metric: str = "l2", auto_compact: int | None = DEFAULT_AUTO_COMPACT,
               storage: str | StorageCodecs = "float16") -> Gallery:
        """Create an empty gallery in a new or empty folder and open it writable.

        Args:
            path: The gallery folder (created if missing; must not hold anything but an old lock file).
            dim: Embedding width C.
            attributes: Attribute names (M of them), in the model's order.
            aam_shape: ``(h, w)`` of the stored attribute activation maps, or ``None`` to store none.
            model: Identity of the model that embeds the gallery (the export's source sha256).
            metric: ``"l2"`` (Euclidean) or ``"ip"`` (cosine ranking).
            auto_compact: Merge the newest segments after an append once this many are of one small size class
                (see :data:`DEFAULT_AUTO_COMPACT`); ``None``: only :meth:`compact` merges.
            storage: How attribute rows and maps are stored: a mode of untrained codecs (``"float16"``, ``"int8"``)
                or fitted codecs (:func:`~attrimeter.runtime.storage.fit_storage`, e.g. for ``"compact"``), fixed
                for the gallery's life (docs/architecture.md §10).

        Returns:
            The writable, empty gallery.

        Raises:
            InputError: A bad argument (codecs of other shapes, an unfitted trained codec).
            GalleryError: The folder already holds something.
            LockedGalleryError: Another writer holds its lock.
            UnsafeGalleryPathError: ``segments`` or ``.lock`` in the folder is a symbolic link.
        """
        spec = make_spec(dim, attributes, aam_shape, model, metric)
        codecs = check_codecs(storage, spec.dim, len(spec.attributes), spec.aam_shape)
        state = encode_state(codecs)
        spec = replace(spec, storage=describe(codecs, spec.aam_shape, state))
        return cls(SegmentStore.create(Path(path), spec, codecs, state), auto_compact=_check_auto_compact(auto_compact))

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, writable: bool = False, progress: bool = True,
             auto_compact: int | None = DEFAULT_AUTO_COMPACT, index: IndexChoice | None = None) -> Gallery:
        """Open a gallery, checking every segment file's size, dtype and shape (and with ``verify`` its sha256).

        Args:
            path: The gallery folder.
            verify: Also check the sha256 of every file (reads the whole gallery once).
            writable: Take the writer lock, so that :meth:`append` and :meth:`compact` may be called; also deletes
                what crashed writers left and folds the journal into ``gallery.json`` (upgrading a format-1 gallery).
            progress: Show progress bars for large galleries.
            auto_compact: For a writable gallery, as in :meth:`create`.
            index: The search index: None, the one saved in the folder (:meth:`save_index`) if any, else exact;
                ``IndexChoice("flat")`` exact; ``IndexChoice("ivf" | "hnsw", params)`` approximate (the saved one
                when it was built with these parameters, else built now; docs/architecture.md §10).

        Returns:
            The gallery.

        Raises:
            GalleryError: No gallery there, or of a format version this runtime does not read.
            CorruptGalleryError: A malformed manifest or journal, or a missing, truncated or corrupt file (the message
                names it).
            LockedGalleryError: ``writable`` while another writer holds the lock (compact through that writer).
            UnsafeGalleryPathError: ``writable`` and a path the writer would use is a symbolic link.
        """
        auto_compact = _check_auto_compact(auto_compact)
        if index is not None and not isinstance(index, IndexChoice):
            raise InputError(f"index must be an IndexChoice or None, got {type(index).__name__}")
        return cls(SegmentStore.open(Path(path), writable=writable, verify=verify, progress=progress),
                   auto_compact=auto_compact, index=index)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Embedding width C."""
        return self._store.spec.dim

    @property
    def attributes(self) -> tuple[str, ...]:
        """Attribute names, in the model's order."""
        return self._store.spec.attributes

    @property
    def aam_shape(self) -> tuple[int, int] | None:
        """``(h, w)`` of the stored activation maps, or ``None``."""
        return self._store.spec.aam_shape

    @property
    def model(self) -> str:
        """Identity of the model that embedded the gallery."""
        return self._store.spec.model

    @property
    def metric(self) -> str:
        """``"l2"`` or ``"ip"``."""
        return self._store.spec.metric

    @property
    def storage(self) -> StorageCodecs:
        """The codecs attribute rows and maps are stored with (its ``mode`` names them)."""
        return self._store.codecs

    @property
    def keeps_maps(self) -> bool:
        """Whether activation maps are stored (False: none, or, with an ``aam_shape``, recomputed from the crop)."""
        return self._store.codecs.keeps_maps

    @property
    def writable(self) -> bool:
        """Whether this handle holds the writer lock."""
        return self._store.writable and not self._closed

    @property
    def segments(self) -> int:
        """Number of published segments (each append adds one; :meth:`compact` and ``auto_compact`` merge them)."""
        return len(self._state.segments)

    def __len__(self) -> int:
        return self._state.count

    def __repr__(self) -> str:
        return (f"Gallery({str(self.path)!r}, {len(self)} entries, {self.segments} segments, dim={self.dim}, "
                f"metric={self.metric!r})")

    # ------------------------------------------------------------------ writing

    def append(self, embedding: np.ndarray, attr_embeddings: np.ndarray, probs: np.ndarray,
               meta: Sequence[Mapping[str, Any]], aam: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
        """Append entries as one new segment, published atomically; on any error nothing is written.

        The cost of an append does not grow with the number of segments (one journal record, see
        :mod:`attrimeter.runtime.store`). With ``auto_compact``, an append may then merge the newest small segments.

        Args:
            embedding: Global embeddings, floating [n, C] (stored float32).
            attr_embeddings: Per-attribute embeddings, floating [n, M, C] (stored by the gallery's attribute codec).
            probs: Predicted P(label 1), floating [n, M] in [0, 1] (stored float32).
            meta: One JSON-able mapping per entry (e.g. key, path, camera); ``"id"`` is added by the store.
            aam: Attribute activation maps, floating [n, M, h, w] (stored by its map codec, or dropped with ``none``:
                recomputed from the crop); required exactly when the gallery has an ``aam_shape``.
            progress: Show a progress bar while writing.

        Returns:
            The new entries' ids, int64 [n], consecutive from the previous length.

        Raises:
            InputError: Bad shapes, dtypes, non-finite or out-of-range values, or metadata that is not JSON-able.
            GalleryError: The gallery is read-only or closed.
            StorageError: Writing failed (nothing was published).
        """
        self._check_open()
        arrays, bodies = self._validate(embedding, attr_embeddings, probs, meta, aam)
        n = len(bodies)
        with self._lock:
            self._check_open()
            self._install(self._store.writable_state())
            first = self._state.count
            if n == 0:
                return np.zeros(0, np.int64)
            lines = "".join(f'{{"id":{first + i}' + ("," + body[1:] if body != "{}" else "}") + "\n"
                            for i, body in enumerate(bodies)).encode()
            self._install(self._store.append(n, [*arrays.items(), (META, lines)], progress=progress))
            self._auto_merge()
        return np.arange(first, first + n, dtype=np.int64)

    def compact(self, progress: bool = True) -> None:
        """Merge all segments into one (ids and contents unchanged), then delete the old segment folders.

        Safe on the handle of a running writer (a server's gallery): searches and reads go on meanwhile, and readers
        in other processes keep answering from the segments they opened and pick the merged one up on
        :meth:`refresh`.

        Args:
            progress: Show a progress bar for large galleries.

        Raises:
            GalleryError: The gallery is read-only or closed.
            StorageError: Writing failed (the old segments stay published).
        """
        self._check_open()
        with self._lock:
            self._check_open()
            self._install(self._store.writable_state())
            self._install(self._store.compact([(0, self.segments)], progress=progress))

    def _auto_merge(self) -> None:
        """Merge the newest segments while ``auto_compact`` of them share a small size class (after an append)."""
        while self._auto_compact is not None and len(self._state.segments) >= self._auto_compact:
            tail = self._state.segments[-self._auto_compact:]
            classes = {next((i for i, top in enumerate(_SIZE_CLASSES) if s.record.bytes < top), None) for s in tail}
            if len(classes) != 1 or None in classes:
                return
            try:
                n = len(self._state.segments)
                self._install(self._store.compact([(n - self._auto_compact, n)], progress=False))
            except GalleryError as e:  # the append is published; the segments stay as they were
                log.warning("%s: merging small segments failed: %s", self.path, e)
                return

    def _validate(self, embedding: Any, attr_embeddings: Any, probs: Any, meta: Any,
                  aam: Any) -> tuple[dict[str, np.ndarray], list[str]]:
        """Check and convert an append's input: (arrays in storage dtype by file stem, JSON body of each meta)."""
        if not isinstance(embedding, np.ndarray) or embedding.ndim != 2:
            raise InputError(f"embedding must be a 2-D numpy array [n, {self.dim}], got {_describe(embedding)}")
        n = embedding.shape[0]
        shapes = self._store.spec.shapes(n)
        given = {"embedding": embedding, "attr": attr_embeddings, "probs": probs}
        names = {"embedding": "embedding", "attr": "attr_embeddings", "probs": "probs", "aam": "aam"}
        if self.aam_shape is not None:
            if aam is None:
                raise InputError(f"this gallery stores activation maps: aam [n, M, {self.aam_shape[0]}, "
                                 f"{self.aam_shape[1]}] is required")
            given["aam"] = aam
        elif aam is not None:
            raise InputError("this gallery stores no activation maps (created with aam_shape=None): pass aam=None")
        arrays, decoded_attr = {}, None
        for key, value in given.items():
            name, shape = names[key], shapes[key]
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise InputError(f"{name} must be a floating-point numpy array, got {_describe(value)}")
            if value.shape != shape:
                raise InputError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
            if not np.isfinite(value).all():
                raise InputError(f"{name} holds NaN or infinite values")
            codec = self.storage.get(key)
            if codec is None:
                arrays[key] = np.ascontiguousarray(value, dtype=DTYPES[key])
                continue
            try:
                stored = codec.encode(value.reshape(n, *codec.shape))
            except CodecError as e:
                raise InputError(f"{name}: {e}") from e
            if key == "attr" and self._store.spec.storage.stores_norms:  # the norms of the values read back
                decoded_attr = codec.decode(stored)
            layout = self._store.spec.layout(n)
            for stem, array in zip(self._store.spec.storage.stems(key), stored.values(), strict=True):
                arrays[stem] = array.reshape(layout[stem][1])
        if self._store.spec.storage.stores_norms:
            arrays["norms"] = squared_norms(decoded_attr)
        if ((arrays["probs"] < 0) | (arrays["probs"] > 1)).any():
            raise InputError("probs must lie in [0, 1]")
        if isinstance(meta, (str, bytes)) or not isinstance(meta, Sequence):
            raise InputError(f"meta must be a sequence of mappings, got {type(meta).__name__}")
        if len(meta) != n:
            raise InputError(f"meta has {len(meta)} entries for {n} embeddings")
        bodies = []
        for i, m in enumerate(meta):
            if not isinstance(m, Mapping) or not all(isinstance(k, str) for k in m):
                raise InputError(f"meta[{i}] must be a mapping with string keys, got {type(m).__name__}")
            if "id" in m:
                raise InputError(f"meta[{i}] has an 'id': the gallery assigns ids")
            try:
                bodies.append(json.dumps(dict(m), allow_nan=False, separators=(",", ":"), default=_json_default))
            except (TypeError, ValueError) as e:
                raise InputError(f"meta[{i}] is not JSON-serialisable: {e}") from e
        return arrays, bodies

    # ------------------------------------------------------------------ reading

    def refresh(self) -> int:
        """Pick up what another process published since this handle last looked (appends, compactions).

        New segments are checked like at :meth:`open` (sha256 too when the gallery was opened with ``verify``).

        Returns:
            The number of entries now.

        Raises:
            CorruptGalleryError: The manifest, the journal or a new segment is corrupt (this handle keeps its state).
            GalleryError: The folder now holds another gallery, or fewer entries.
        """
        self._check_open()
        with self._lock:
            self._check_open()
            self._install(self._store.refresh())
            return self._state.count

    def verify(self) -> None:
        """Check the sha256 of every file of every published segment and the line count of the metadata.

        Raises:
            CorruptGalleryError: A mismatch, naming the file.
        """
        self._check_open()
        self._store.verify(self._state)

    def embeddings(self, ids: Any) -> np.ndarray:
        """Global embeddings of gallery entries.

        Args:
            ids: Gallery ids (an int or a 1-D sequence of ints).

        Returns:
            float32 [len(ids), C].

        Raises:
            UnknownIdError: An id the gallery does not hold.
            InputError: Ids that are not integers.
        """
        return self._gather(ids, "embedding")

    def attr_embeddings(self, ids: Any) -> np.ndarray:
        """Per-attribute embeddings of gallery entries, decoded: float32 [len(ids), M, C].

        Args:
            ids: Gallery ids.

        Returns:
            float32 [len(ids), M, C].
        """
        return self._decoded(ids, "attr")

    def probs(self, ids: Any) -> np.ndarray:
        """Predicted P(label 1) per attribute of gallery entries: float32 [len(ids), M].

        Args:
            ids: Gallery ids.

        Returns:
            float32 [len(ids), M].
        """
        return self._gather(ids, "probs")

    def aam(self, ids: Any) -> np.ndarray | None:
        """Attribute activation maps of gallery entries, or ``None`` when the gallery stores none.

        None also when its storage drops them (map codec ``none``): they are recomputed from the entries' crops.

        Args:
            ids: Gallery ids.

        Returns:
            float32 [len(ids), M, h, w], or ``None``.
        """
        if self.aam_shape is None:
            self._locate(ids)  # still refuse unknown ids
            return None
        if not self.keeps_maps:  # dropped: the Runtime recomputes them from the crops (docs/architecture.md §10)
            self._locate(ids)
            return None
        return self._decoded(ids, "aam")

    def meta(self, ids: Any) -> list[dict[str, Any]]:
        """Metadata of gallery entries, each with its ``"id"``.

        Args:
            ids: Gallery ids.

        Returns:
            One dict per id, in the order of ``ids``.
        """
        state, idx, seg, local = self._locate(ids)
        out: list[Any] = [None] * len(idx)
        for s in np.unique(seg):
            where = np.flatnonzero(seg == s)
            for j, obj in zip(where, state.segments[s].meta(local[where]), strict=True):
                out[j] = obj
        return out

    def attr_chunks(self, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """Walk all entries' per-attribute embeddings in order, for exact scans.

        Args:
            chunk: Most entries per chunk (chunks do not cross segments).

        Returns:
            An iterator of ``(first id, rows [n, M, C])`` over consecutive entries: float16 read-only views with
            float16 storage (a large segment is memory-mapped while its views are held), else the decoded float32.

        Raises:
            InputError: ``chunk`` is not a positive integer.
        """
        self._check_open()
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk!r}")
        return _chunks(self._state, self._store, int(chunk))  # checked now, walked lazily over this snapshot

    def scan_chunks(self, chunk: int) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """:meth:`attr_chunks` with each row's squared attribute norms, the input of ``weighted_scan``.

        Args:
            chunk: Most entries per chunk (chunks do not cross segments).

        Returns:
            An iterator of ``(first id, rows [n, M, C], float32 [n, M] of ‖g_k‖² or None)``. Rows as
            :meth:`attr_chunks` gives them, except that float16 segments with a scan copy (format 4) give a view of
            it: the same values, each attribute's rows ``rows[:, a]`` contiguous. Norms: the stored view with float16
            storage (None for segments written before ``norms.npy`` existed: the scan computes them), else computed
            from the decoded rows.

        Raises:
            InputError: ``chunk`` is not a positive integer.
        """
        self._check_open()
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk!r}")
        return _chunks(self._state, self._store, int(chunk), norms=True)

    def weighted_search(self, attr_queries: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by the attribute-weighted score ``Σ_k w_k d_k`` (a scan of the weighted attributes' rows).

        Float16 storage is scanned as stored; other storage in its codec's coordinates, decoding only the candidates
        (``pcaq``: no rotation per row), see :func:`~attrimeter.runtime.decompose.weighted_scan`.

        Args:
            attr_queries: Per-attribute query embeddings float32 ``[Q, M, C]``.
            weights: Checked attribute weights ``[M]`` (:func:`~attrimeter.runtime.decompose.check_weights`).
            k: Hits per query (>= 1).

        Returns:
            ``(scores [Q, k'], ids int64 [Q, k'])`` ascending, ``k' = min(k, len(self))``.
        """
        self._check_open()
        codec = self._store.codecs.attr
        if codec.kind == "float16":
            return weighted_scan(attr_queries, self.scan_chunks(_SCAN_CHUNK), weights, k)
        return weighted_scan(attr_queries, _stored_chunks(self._state, self._store, _SCAN_CHUNK), weights, k,
                             codec=codec)

    def _gather(self, ids: Any, key: str) -> np.ndarray:
        """Rows of ``key`` at ``ids`` as float32, read by position (only those rows are read)."""
        state, idx, seg, local = self._locate(ids)
        out = np.empty((len(idx), *self._store.spec.shapes(0)[key][1:]), np.float32)
        for s in np.unique(seg):
            where = seg == s
            out[where] = state.segments[s].arrays[key].rows(local[where])
        return out

    def _decoded(self, ids: Any, key: str) -> np.ndarray:
        """Rows of ``key`` (``attr`` or ``aam``) at ``ids``, decoded to float32 (only those rows are read)."""
        state, idx, seg, local = self._locate(ids)
        out = np.empty((len(idx), *self._store.spec.shapes(0)[key][1:]), np.float32)
        for s in np.unique(seg):
            where = seg == s
            rows = decode_rows(self._store.codecs.get(key), self._store.spec.storage.stems(key),
                               state.segments[s].arrays, local[where])
            out[where] = rows.reshape(-1, *out.shape[1:])
        return out

    def _locate(self, ids: Any) -> tuple[StoreState, np.ndarray, np.ndarray, np.ndarray]:
        """(state snapshot, ids int64, segment index of each, position within its segment)."""
        self._check_open()
        state = self._state
        idx = _as_ids(ids, state.count)
        seg = np.searchsorted(state.first_ids, idx, side="right") - 1
        return state, idx, seg, idx - state.first_ids[seg]

    # ------------------------------------------------------------------ search

    def load_index(self) -> None:
        """Build the search index now (it is otherwise built by the first :meth:`search`)."""
        self._check_open()
        with self._index_lock:
            self._ensure_index()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-nearest-neighbour search over the global embeddings.

        Metric ``"l2"`` ranks by Euclidean distance; ``"ip"`` ranks by cosine similarity. Either way the distances
        returned are the Euclidean distances between the raw query and gallery vectors, recomputed from the stored
        vectors: FAISS's ``|q|² + |x|² - 2 q·x`` loses the small distances of near-duplicates to cancellation.
        See :meth:`rank` for the order and its ties.

        Args:
            queries: float32 [Q, C], finite.
            k: Neighbours per query (> 0); fewer are returned when the gallery is smaller.

        Returns:
            ``(distances float32 [Q, k'], ids int64 [Q, k'])`` with ``k' = min(k, len(self))``, best first.

        Raises:
            InputError: Bad queries or ``k``.
        """
        _, dist, ids = self.rank(queries, k)
        return dist, ids

    def rank(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search` with its ranking keys: the top k by exact key, ties to the lower id.

        The index proposes candidates; they are re-ranked by keys recomputed from the stored vectors
        (:func:`~attrimeter.runtime.gallery_index.exact_keys`: the same for an entry wherever it is stored, so shards
        rank like the whole, docs/architecture.md §11), and more are fetched until the index's float32 rounding cannot
        have left out one of the k best or an entry tied with the k-th (FAISS's own pick among equal inner products is
        arbitrary). Exact with the exact indexes; with an approximate one (``ivf``, ``hnsw``) the k best of its
        candidates, their distances exact (recall in ``benchmarks/results/ann_cpu.md``).

        Returns:
            ``(keys float64 [Q, k'] ascending: the distance for "l2", −cosine for "ip"; distances float32 [Q, k'];
            ids int64 [Q, k'])``; arguments and errors as :meth:`search`'s.
        """
        self._check_open()
        q = _check_queries(queries, self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        with self._index_lock:
            index = self._ensure_index()
            total, approximate = index.ntotal, isinstance(index, AnnIndex)  # approximate: re-ranks its own, one round
        kk = min(int(k), total)
        if kk == 0 or len(q) == 0:
            return np.zeros((len(q), kk)), np.zeros((len(q), kk), np.float32), np.zeros((len(q), kk), np.int64)
        cap = total if kk > _FETCH_CAP else min(total, _FETCH_CAP)
        fetch = kk if approximate else min(cap, kk + _RANK_MARGIN)
        while True:
            with self._index_lock:
                index = self._ensure_index()
                ids, floor = index.search_floor(q, fetch)  # floor: a bound on what it left out, or None
                # under the lock: an add may move the index's memory; only when the copy stays small
                held = index.vectors(ids.reshape(-1)) if ids.size * self.dim * 4 <= _GATHER_BYTES else None
            # ids only ever grow (compaction keeps them), so the gathers may run outside the index lock
            keys, dist = np.empty(ids.shape), np.empty(ids.shape, np.float32)
            rows = max(1, _GATHER_BYTES // (fetch * self.dim * 4))
            for a in range(0, len(q), rows):
                x = (self.embeddings(ids[a:a + rows].ravel()) if held is None
                     else held[a * fetch:(a + rows) * fetch]).reshape(-1, fetch, self.dim)
                keys[a:a + rows], dist[a:a + rows] = exact_keys(q[a:a + rows], x, self.metric)
            order = np.lexsort((ids, keys), axis=1)
            keys, dist, ids = (np.take_along_axis(a, order, 1) for a in (keys, dist, ids))
            done = (keys[:, kk - 1] < floor).all() if floor is not None else settled(q, keys[:, kk - 1], keys[:, -1],
                                                                                       self.metric)
            if approximate or fetch == cap or done:
                return keys[:, :kk], dist[:, :kk], ids[:, :kk]
            fetch = min(cap, 2 * fetch)

    def _ensure_index(self) -> GalleryIndex:
        """The search index, loaded or built from all entries on first use (call under ``_index_lock``)."""
        if self._index is None:
            self._index = open_index(self._index_choice, self.dim, self.metric, self._state, self.embeddings,
                                     self._store.read_derived, self.path)
        return self._index

    def save_index(self) -> None:
        """Save the search index in the gallery folder (writers), so that readers load it instead of building it.

        An approximate index is saved as ``index.json`` and ``index.faiss`` (derived data: readers check its sha256,
        and add the entries appended since); an exact one is rebuilt on open, so saving it removes a saved index.

        Raises:
            GalleryError: A read-only or closed gallery.
            StorageError: Writing failed.
        """
        self._check_open()
        with self._lock, self._index_lock:
            index = self._ensure_index()
            if isinstance(index, AnnIndex):
                doc, data = index.serialize()
                self._store.write_derived(INDEX_FAISS, data)
                self._store.write_derived(INDEX_JSON, doc)
            else:
                self._store.delete_derived(INDEX_JSON)
                self._store.delete_derived(INDEX_FAISS)

    @property
    def index_kind(self) -> str | None:
        """The search index's kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``; None before it is loaded."""
        with self._index_lock:
            index = self._index
        return None if index is None else index.kind if isinstance(index, AnnIndex) else "flat"

    # ------------------------------------------------------------------ state

    def _install(self, new: StoreState) -> None:
        """Swap in a published state and extend the search index to it, atomically for searches."""
        with self._index_lock:
            if self._index is not None and new.count > self._index.ntotal:
                self._index = extend_index(self._index, self.dim, self.metric, new)
            self._state = new

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryError(f"{self.path}: the gallery is closed")

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Fold the journal (writers), release the writer lock, the index and the open files (idempotent)."""
        with self._lock, self._index_lock:
            if self._closed:
                return
            self._closed = True
            self._index = None
            self._store.close()
            self._state = self._store.state  # empty: the segments' files are released once no reader holds them

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


def _check_auto_compact(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise InputError(f"auto_compact must be an integer >= 2 or None, got {value!r}")
    return value


def _chunks(state: StoreState, store: SegmentStore, chunk: int, norms: bool = False) -> Iterator[tuple[Any, ...]]:
    """Attribute rows by chunks of a segment: float16 views for float16 storage, else decoded chunk by chunk.

    Scans (``norms``) read a segment's copy attribute by attribute where it has one: only the weighted attributes'
    bytes are streamed (``scan_kernel``).
    """
    float16 = store.codecs.attr.kind == "float16"
    stems = store.spec.storage.stems("attr")
    for segment in state.segments:
        attr = None
        if float16:
            attr = (segment.planes.get("attr", segment.arrays["attr"]) if norms else segment.arrays["attr"]).view()
        sq = segment.arrays["norms"].view() if norms and "norms" in segment.arrays else None
        for a in range(0, segment.count, chunk):
            b = min(a + chunk, segment.count)
            rows = attr[a:b] if float16 else decode_rows(store.codecs.attr, stems, segment.arrays, None, (a, b))
            if norms:
                yield segment.first_id + a, rows, (squared_norms(rows) if not float16 else
                                                   None if sq is None else sq[a:b])
            else:
                yield segment.first_id + a, rows


def _stored_chunks(state: StoreState, store: SegmentStore, chunk: int) -> Iterator[tuple[int, dict, None]]:
    """The attribute codec's stored arrays by chunks of a segment, as read-only views (mapped while held)."""
    names = list(store.codecs.attr.layout())
    stems = store.spec.storage.stems("attr")
    for segment in state.segments:
        views = {name: segment.arrays[stem].view() for name, stem in zip(names, stems, strict=True)}
        for a in range(0, segment.count, chunk):
            yield segment.first_id + a, {name: v[a:a + chunk] for name, v in views.items()}, None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {list(x.shape)}"
    return type(x).__name__


def _check_queries(queries: Any, dim: int) -> np.ndarray:
    if not isinstance(queries, np.ndarray) or queries.dtype != np.float32:
        raise InputError(f"queries must be a float32 numpy array [Q, {dim}], got {_describe(queries)}")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InputError(f"queries must have shape [Q, {dim}], got {list(queries.shape)}")
    if not np.isfinite(queries).all():
        raise InputError("queries hold NaN or infinite values")
    return np.ascontiguousarray(queries)


def _as_ids(ids: Any, count: int) -> np.ndarray:
    """Gallery ids as int64 [n]: integers (or integral floats) in [0, count)."""
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as e:
        raise InputError(f"gallery ids must be integers ({e})") from e
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InputError(f"gallery ids must be one integer or a 1-D sequence of them, got shape {list(arr.shape)}")
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind == "O":
        try:
            values = [operator.index(v) for v in arr]
        except TypeError as e:
            raise InputError(f"gallery ids must be integers ({e})") from e
        bad = [v for v in values if not 0 <= v < count]
        if bad:
            raise UnknownIdError(_unknown(bad[0], count))
        return np.array(values, np.int64)
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise InputError("gallery ids must be integers")
    elif arr.dtype.kind not in "iu":
        raise InputError(f"gallery ids must be integers, got {arr.dtype}")
    bad = (arr < 0) | (arr >= count)
    if bad.any():
        raise UnknownIdError(_unknown(int(arr[bad][0]), count))
    return arr.astype(np.int64)


def _unknown(idx: int, count: int) -> str:
    return f"gallery id {idx} is not in the gallery (it holds {count} entries)"
