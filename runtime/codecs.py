"""Compact codecs for a gallery entry's explanation rows, attribute embeddings and maps (docs/architecture.md §10).

An entry holds M rows of D values: its M attribute embeddings (D = C), or its M attention maps flattened (D = h·w).
A codec turns rows ``[N, M, D]`` into the arrays a store writes (each with N leading, one file per array) and decodes
the rows of any entries back to float32, which :func:`attrimeter.runtime.decompose.explain_rows` then explains::

    codec = make_codec("pcaq", (26, 256), bytes_per_row=128)
    codec.fit(sample)                 # trained kinds only (pq, pcaq): rows [n, M, D] that are not in the gallery
    stored = codec.encode(rows)       # {"codes": uint8 [N, 26, 116], "scales": float16 [N, 26, 6]}
    hits = codec.decode(stored, ids)  # float32 [len(ids), 26, 256]

Kinds (``CODEC_KINDS``; measured on the demo's model in ``benchmarks/results/storage_cpu.md``):

- ``float32``: the rows as they are (the reference).
- ``float16``: the rows at half precision (``attrimeter index --storage float16``; the default is ``compact``).
- ``int8``: symmetric 8-bit codes with one float16 scale per row (per entry and attribute).
- ``uint8``: 8-bit codes of non-negative rows (attention maps) with one float16 scale per row.
- ``pq``: FAISS product quantisation of the rows minus their attribute's mean; ``m`` bytes per row, one codebook
  shared by all attributes. Decoding is a numpy gather.
- ``pcaq``: the rows minus their attribute's mean, rotated onto the principal axes of training rows, cut into groups
  of consecutive axes, and each group quantised like ``int8`` but with its own bit width (0, 2..8) and scale. Widths
  are allocated greedily on the training rows, where they lower the squared error most per stored bit, within
  ``bytes_per_row``: a learned low-rank projection (groups at 0 bits are dropped) with variable precision.
- ``none``: nothing is stored (e.g. attention maps recomputed from the crop for the few hits drawn as overlays: the
  store must then keep a way to the crop, and the runtime a path that re-embeds it); decoding raises CodecError.

Every codec validates what it is given and raises :class:`~attrimeter.runtime.errors.CodecError` naming the problem.
(One module: the interface and its kinds are read together; each kind is a short class.) The weighted scan works in
:meth:`Codec.coordinates`' space, compiled for ``int8`` and ``pcaq`` (:meth:`Codec.compiled_scan`), and decodes only
its candidates. How codecs plug into the store (the manifest's storage field, ``codecs.npz``, one file per stored
array): :mod:`attrimeter.runtime.storage`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np

from attrimeter.runtime.ann import faiss_module
from attrimeter.runtime.errors import CodecError
from attrimeter.runtime.scan_kernel import coded_scores, scaled_scores

__all__ = ["CODEC_KINDS", "STORAGE_MODES", "BitTables", "Codec", "codec_from_json", "make_codec"]

_FP16_MAX = float(np.finfo(np.float16).max)
_ENCODE_ENTRIES = 4096  # entries per encoding step: bounds the float64 / bit temporaries
_FIT_ROWS = 1 << 17  # most training rows a fit uses (rows are sampled beyond)
_PQ_BITS = 8  # one byte per sub-quantiser: codes stay byte-addressable for the numpy gather

# ``--storage MODE``: (attribute codec, attention-map codec) as ``make_codec`` keywords. ``compact`` is the default
# rule's winner on the demo model (benchmarks/results/storage_cpu.md).
STORAGE_MODES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "float16": ({"kind": "float16"}, {"kind": "float16"}),
    "int8": ({"kind": "int8"}, {"kind": "uint8"}),
    "compact": ({"kind": "pcaq", "bytes_per_row": 128}, {"kind": "uint8"}),
    # maps recomputed from the entry's crop for the few hits drawn as overlays (docs/architecture.md §10)
    "compact-nomaps": ({"kind": "pcaq", "bytes_per_row": 128}, {"kind": "none"}),
}


class BitTables(NamedTuple):
    """Where each stored coordinate ``s`` of a row lies in its packed ``codes`` (``pcaq``), for compiled scans.

    ``y_s = (((codes[first_s] | codes[second_s] << 8) >> shift_s) & mask_s − offset_s) · scales[group_s]``, in
    float32 like :meth:`Codec.coordinates`.
    """

    first: np.ndarray  # int64 [S]
    second: np.ndarray  # int64 [S]
    shift: np.ndarray  # int64 [S]
    mask: np.ndarray  # int64 [S]
    offset: np.ndarray  # float32 [S]
    group: np.ndarray  # int64 [S]: index into the row's scales


class Codec(ABC):
    """Encodes and decodes an entry's M rows of D values.

    Args:
        shape: ``(M, D)``: rows per entry and values per row.
    """

    kind: ClassVar[str]
    trainable: ClassVar[bool] = False

    def __init__(self, shape: tuple[int, int]):
        if (not isinstance(shape, (tuple, list)) or len(shape) != 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise CodecError(f"shape must be (M, D) of positive integers, got {shape!r}")
        self.shape = (int(shape[0]), int(shape[1]))

    # ------------------------------------------------------------------ what a store needs

    @property
    def fitted(self) -> bool:
        """Whether the codec can encode and decode (untrained kinds always can)."""
        return True

    def fit(self, rows: np.ndarray) -> None:
        """Learn the codec's state from training rows ``[n, M, D]`` (nothing to learn for untrained kinds).

        Raises:
            CodecError: Rows of the wrong shape, or not finite.
        """
        self._check_rows(rows)

    @abstractmethod
    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Each stored array's dtype and per-entry shape, by name (an array is stored ``[N, *shape]``)."""

    def bytes_per_entry(self) -> int:
        """Bytes one entry's rows take in the stored arrays."""
        return sum(dtype.itemsize * math.prod(shape) for dtype, shape in self.layout().values())

    def encode(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Encode rows.

        Args:
            rows: Floating ``[N, M, D]``, finite.

        Returns:
            The stored arrays, by name, as :meth:`layout` describes them.

        Raises:
            CodecError: Rows of the wrong shape or dtype, not finite, or out of the codec's range; an untrained codec.
        """
        x = self._check_rows(rows)
        self._check_fitted()
        parts = [self._encode(x[a:a + _ENCODE_ENTRIES]) for a in range(0, len(x), _ENCODE_ENTRIES)]
        return {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros((0, *shape), dtype)
                for name, (dtype, shape) in self.layout().items()}

    def decode(self, stored: Mapping[str, np.ndarray], ids: np.ndarray | None = None,
               attributes: np.ndarray | None = None) -> np.ndarray:
        """Decode the rows of some entries.

        Args:
            stored: The stored arrays (as :meth:`encode` returned them, or memory-mapped files).
            ids: Entry positions in ``stored`` (any integer shape, flattened), or None for all entries.
            attributes: Decode only these rows of each entry (indices into M, in this order), or None for all.

        Returns:
            float32 ``[len(ids), M or len(attributes), D]``.

        Raises:
            CodecError: Stored arrays that do not match the codec, ids or attributes out of range, an untrained codec,
                or a codec that stores nothing.
        """
        picked, attrs = self._pick(stored, ids, attributes)
        return self._decode(picked, attrs)

    def coordinates(self, stored: Mapping[str, np.ndarray], attributes: np.ndarray) -> np.ndarray:
        """Some rows of every entry in the coordinates a scan compares them in (see :meth:`scan_space`).

        For most kinds the decoded rows themselves; ``pcaq`` gives its rotated coordinates, skipping the rotation
        back (a ``D × D`` product per row): ``‖q − decode(g)‖² = ‖q' − y‖² + rest`` for ``(q', rest)`` from
        :meth:`scan_space`, up to :meth:`coordinate_slack`.

        Args:
            stored: The stored arrays of the entries (all M rows each).
            attributes: Which rows (indices into M).

        Returns:
            float32 ``[N, len(attributes), S]``.
        """
        picked, attrs = self._pick(stored, None, attributes)
        return self._coordinates(picked, attrs)

    def scan_space(self, queries: np.ndarray, attributes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Query rows in :meth:`coordinates`' space.

        Args:
            queries: float32 ``[Q, len(attributes), D]``.
            attributes: The rows they are (indices into M).

        Returns:
            ``(q' float32 [Q, A, S], rest float32 [Q, A])``: the part of ``‖q − decode(g)‖²`` that does not depend
            on the entry (``‖q'‖² + rest = ‖q‖²`` in these coordinates' origin).
        """
        q = np.asarray(queries, dtype=np.float32)
        return q, np.zeros(q.shape[:2], np.float32)

    def compiled_scan(self, stored: Mapping[str, np.ndarray], attributes: np.ndarray, queries: np.ndarray,
                      query_sq: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The weighted scan's expanded scores of a chunk in :meth:`coordinates`' space, compiled; None: not covered.

        Args:
            stored: The chunk's stored arrays.
            attributes: The weighted attributes ``[A]``.
            queries: Queries in :meth:`scan_space` ``[Q, A, S]``.
            query_sq: Their ``‖q'‖² + rest`` ``[Q, A]``.
            weights: The attributes' weights ``[A]``.

        Returns:
            ``(scores [Q, n], largest ‖y‖² per attribute [A])`` like
            :func:`~attrimeter.runtime.scan_kernel.expanded_scores`, or None when the kind has no compiled scan (the
            caller decodes its coordinates in numpy).
        """
        return None

    def coordinate_slack(self, coordinate_norms: np.ndarray, attributes: np.ndarray) -> np.ndarray:
        """How far a distance from :meth:`coordinates` may lie from the one from :meth:`decode`'s float32 rows.

        Args:
            coordinate_norms: The largest ``‖y‖`` of the entries scanned, per attribute ``[A]``.
            attributes: The attributes (indices into M).

        Returns:
            float64 ``[A]``: a bound per attribute (0 where the coordinates are the decoded rows).
        """
        return np.zeros(len(coordinate_norms))

    def _pick(self, stored: Mapping[str, np.ndarray], ids: np.ndarray | None,
              attributes: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Checked stored arrays gathered at ``ids`` and ``attributes``, and the attribute indices (or None)."""
        self._check_fitted()
        n = self._check_stored(stored)
        picked = {name: np.asarray(stored[name]) for name in self.layout()}
        if ids is not None:
            idx = np.asarray(ids)
            if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
                raise CodecError(f"ids must be integers, got dtype {idx.dtype}")
            idx = idx.reshape(-1).astype(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise CodecError(f"ids must be in [0, {n}), got values from {idx.min()} to {idx.max()}")
            picked = {name: arr[idx] for name, arr in picked.items()}
        if attributes is None:
            return picked, None
        attrs = np.asarray(attributes)
        if attrs.ndim != 1 or attrs.dtype == bool or not np.issubdtype(attrs.dtype, np.integer) or (
                attrs.size and (attrs.min() < 0 or attrs.max() >= self.shape[0])):
            raise CodecError(f"attributes must be indices in [0, {self.shape[0]}), got {attrs!r}")
        attrs = attrs.astype(np.int64)
        return {name: arr[:, attrs] for name, arr in picked.items()}, attrs

    # ------------------------------------------------------------------ serialisation

    def params(self) -> dict[str, Any]:
        """The keyword parameters of :func:`make_codec` (JSON values)."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """The trained state (arrays; empty for untrained kinds), for :func:`codec_from_json`."""
        return {}

    def to_json(self) -> dict[str, Any]:
        """``{"kind", "shape", "params"}``: with :meth:`state`, everything :func:`codec_from_json` needs."""
        return {"kind": self.kind, "shape": list(self.shape), "params": self.params()}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise CodecError(f"a {self.kind} codec has no trained state, got arrays {sorted(state)}")

    # ------------------------------------------------------------------ per kind

    @abstractmethod
    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Encode checked float32 rows [n, M, D]."""

    @abstractmethod
    def _decode(self, stored: dict[str, np.ndarray], attributes: np.ndarray | None) -> np.ndarray:
        """Decode gathered stored arrays (of ``attributes`` only, when not None) to float32 [n, M or A, D]."""

    def _coordinates(self, stored: dict[str, np.ndarray], attributes: np.ndarray) -> np.ndarray:
        return self._decode(stored, attributes)

    # ------------------------------------------------------------------ checks

    def _check_rows(self, rows: np.ndarray) -> np.ndarray:
        x = np.asarray(rows)
        if not np.issubdtype(x.dtype, np.floating):
            raise CodecError(f"rows must be floating point, got dtype {x.dtype}")
        if x.ndim != 3 or x.shape[1:] != self.shape:
            raise CodecError(f"rows must have shape [N, {self.shape[0]}, {self.shape[1]}], got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise CodecError("rows contain NaN or infinite values")
        return x.astype(np.float32, copy=False)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise CodecError(f"the {self.kind} codec is not trained: call fit(rows) first")

    def _check_stored(self, stored: Mapping[str, np.ndarray]) -> int:
        layout = self.layout()
        missing = sorted(set(layout) - set(stored))
        if missing:
            raise CodecError(f"stored arrays lack {missing} (a {self.kind} codec stores {sorted(layout)})")
        counts = set()
        for name, (dtype, shape) in layout.items():
            arr = stored[name]
            if arr.dtype != dtype or tuple(arr.shape[1:]) != shape:
                raise CodecError(f"stored array {name!r} must be {dtype} [N, {', '.join(map(str, shape))}], "
                                 f"got {arr.dtype} {list(arr.shape)}")
            counts.add(arr.shape[0])
        if len(counts) > 1:
            raise CodecError(f"stored arrays hold different numbers of entries: {sorted(counts)}")
        return counts.pop() if counts else 0


def _row_scales(absmax: np.ndarray, lim: int) -> np.ndarray:
    """float16 scales s with ``s · lim >= absmax`` (so no code is clipped): rounded to float16, then one step up."""
    with np.errstate(over="ignore"):
        s = (absmax / np.float32(lim)).astype(np.float16)
    if not np.isfinite(s).all():
        raise CodecError(f"values up to {float(absmax.max()):.4g} exceed what a float16 scale codes "
                         f"(|value| <= {_FP16_MAX * lim:.4g})")
    low = s.astype(np.float32) * np.float32(lim) < absmax
    s[low] = np.nextafter(s[low], np.float16(np.inf))
    return s


def _quantise(x: np.ndarray, lim: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row codes in [-lim, lim] (int32) and float16 scales of rows ``x [..., w]``."""
    s = _row_scales(np.abs(x).max(-1), lim)
    s32 = s.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(x / s32), 0.0)
    return np.clip(q, -lim, lim).astype(np.int32), s


class _Float(Codec):
    """The rows in a float dtype."""

    dtype: ClassVar[np.dtype]

    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {"rows": (self.dtype, self.shape)}

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        limit = float(np.finfo(self.dtype).max)
        if x.size and np.abs(x).max() > limit:
            raise CodecError(f"values up to {float(np.abs(x).max()):.4g} overflow {self.dtype} (|value| <= {limit:g})")
        return {"rows": x.astype(self.dtype)}

    def _decode(self, stored: dict[str, np.ndarray], attributes: np.ndarray | None) -> np.ndarray:
        return stored["rows"].astype(np.float32)


class Float32Codec(_Float):
    """The rows as float32 (the reference)."""

    kind = "float32"
    dtype = np.dtype("<f4")


class Float16Codec(_Float):
    """The rows as float16 (today's store)."""

    kind = "float16"
    dtype = np.dtype("<f2")


class Int8Codec(Codec):
    """Symmetric int8 codes with one float16 scale per row: error at most half a step, ``max|row| / 254``."""

    kind = "int8"

    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {"codes": (np.dtype("i1"), self.shape), "scales": (np.dtype("<f2"), self.shape[:1])}

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        q, s = _quantise(x, 127)
        return {"codes": q.astype(np.int8), "scales": s}

    def _decode(self, stored: dict[str, np.ndarray], attributes: np.ndarray | None) -> np.ndarray:
        return stored["codes"].astype(np.float32) * stored["scales"].astype(np.float32)[..., None]

    def compiled_scan(self, stored: Mapping[str, np.ndarray], attributes: np.ndarray, queries: np.ndarray,
                      query_sq: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return scaled_scores(stored["codes"], stored["scales"], attributes, queries, query_sq, weights)


class UInt8Codec(Codec):
    """uint8 codes of non-negative rows (attention maps) with one float16 scale per row: error at most ``max / 510``."""

    kind = "uint8"

    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {"codes": (np.dtype("u1"), self.shape), "scales": (np.dtype("<f2"), self.shape[:1])}

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if x.size and x.min() < 0:
            raise CodecError(f"the uint8 codec stores non-negative rows, got a value of {float(x.min()):.4g}")
        s = _row_scales(x.max(-1), 255)
        s32 = s.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s32 > 0, np.rint(x / s32), 0.0)
        return {"codes": np.clip(q, 0, 255).astype(np.uint8), "scales": s}

    def _decode(self, stored: dict[str, np.ndarray], attributes: np.ndarray | None) -> np.ndarray:
        return stored["codes"].astype(np.float32) * stored["scales"].astype(np.float32)[..., None]


class NoneCodec(Codec):
    """Stores nothing: the rows must be recomputed from the image when needed."""

    kind = "none"

    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {}

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def decode(self, stored: Mapping[str, np.ndarray], ids: np.ndarray | None = None,
               attributes: np.ndarray | None = None) -> np.ndarray:
        """Refuse: nothing was stored.

        Raises:
            CodecError: Always, naming the recompute path.
        """
        return self._decode({}, None)

    def _decode(self, stored: dict[str, np.ndarray], attributes: np.ndarray | None) -> np.ndarray:
        raise CodecError("these rows are not stored (codec 'none'): recompute them from the entry's image")


class _Trained(Codec):
    """A codec with learned state: the per-attribute mean plus what the kind learns."""

    trainable = True

    def __init__(self, shape: tuple[int, int]):
        super().__init__(shape)
        self._mean: np.ndarray | None = None  # float32 [M, D]

    @property
    def fitted(self) -> bool:
        return self._mean is not None

    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        self._check_fitted()
        return self._layout()

    @abstractmethod
    def _layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The layout of a fitted codec."""

    def _training_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(checked rows minus their attribute's mean, pooled: float64 [n·M, D], sampled; the means float32 [M, D])."""
        x = self._check_rows(rows)
        if len(x) == 0:
            raise CodecError(f"the {self.kind} codec needs training rows, got none")
        mean = x.mean(0, dtype=np.float64)
        pick = np.arange(x.shape[0] * x.shape[1])
        if len(pick) > _FIT_ROWS:  # sampled before any float64 copy; a fixed seed: the same rows give the same codec
            pick = np.sort(np.random.default_rng(0).choice(len(pick), _FIT_ROWS, replace=False))
        entry, attribute = np.divmod(pick, x.shape[1])
        return x[entry, attribute] - mean[attribute], mean.astype(np.float32)

    def _arrays(self, state: Mapping[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The state arrays ``shapes`` names, checked (float32 unless the name is ``bits``)."""
        if set(state) != set(shapes):
            raise CodecError(f"a {self.kind} codec's state holds {sorted(shapes)}, got {sorted(state)}")
        out = {}
        for name, shape in shapes.items():
            arr = np.asarray(state[name])
            if arr.shape != shape or not np.issubdtype(arr.dtype, np.integer if name == "bits" else np.floating):
                raise CodecError(f"state array {name!r} must have shape {list(shape)}, got {arr.dtype} "
                                 f"{list(arr.shape)}")
            if not np.isfinite(arr).all():
                raise CodecError(f"state array {name!r} contains NaN or infinite values")
            out[name] = arr if name == "bits" else arr.astype(np.float32)
        return out


class PQCodec(_Trained):
    """FAISS product quantisation of the centred rows: ``m`` sub-quantisers of 256 centroids, one byte each.

    Args:
        shape: ``(M, D)``.
        m: Sub-quantisers (bytes per row); must divide D.
    """

    kind = "pq"

    def __init__(self, shape: tuple[int, int], m: int = 64):
        super().__init__(shape)
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m <= 0 or self.shape[1] % m:
            raise CodecError(f"pq: m must be a positive divisor of the row width {self.shape[1]}, got {m!r}")
        self.m = int(m)
        self._centroids: np.ndarray | None = None  # float32 [m, 256, D/m]
        self._pq: Any = None  # FAISS's quantiser on those centroids, made by the first encode

    def params(self) -> dict[str, Any]:
        return {"m": self.m}

    def state(self) -> dict[str, np.ndarray]:
        self._check_fitted()
        return {"mean": self._mean.copy(), "centroids": self._centroids.copy()}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        sub = (self.m, 1 << _PQ_BITS, self.shape[1] // self.m)
        arrays = self._arrays(state, {"mean": self.shape, "centroids": sub})
        self._centroids, self._mean, self._pq = arrays["centroids"], arrays["mean"], None

    def fit(self, rows: np.ndarray) -> None:
        """Learn the attribute means and the codebook (k-means per sub-space, FAISS's fixed seed).

        Raises:
            CodecError: Bad rows, or fewer than 256 rows in all (one per centroid).
        """
        pooled, mean = self._training_rows(rows)
        if len(pooled) < 1 << _PQ_BITS:
            raise CodecError(f"pq needs at least {1 << _PQ_BITS} training rows (entries x attributes), got "
                             f"{len(pooled)}")
        pq = faiss_module().ProductQuantizer(self.shape[1], self.m, _PQ_BITS)
        pq.train(np.ascontiguousarray(pooled, dtype=np.float32))
        self._centroids = faiss_module().vector_to_array(pq.centroids).reshape(self.m, 1 << _PQ_BITS, -1)
        self._mean, self._pq = mean, pq

    def _layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {"codes": (np.dtype("u1"), (self.shape[0], self.m))}

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self._pq is None:  # decoding needs no FAISS: only encoding builds its quantiser
            faiss = faiss_module()
            self._pq = faiss.ProductQuantizer(self.shape[1], self.m, _PQ_BITS)
            faiss.copy_array_to_vector(np.ascontiguousarray(self._centroids).ravel(), self._pq.centroids)
        codes = self._pq.compute_codes(np.ascontiguousarray((x - self._mean).reshape(-1, self.shape[1])))
        return {"codes": codes.reshape(len(x), self.shape[0], self.m)}

    def _decode(self, stored: dict[str, np.ndarray], attributes: np.ndarray | None) -> np.ndarray:
        codes = stored["codes"]  # [n, M or A, m]
        parts = self._centroids[np.arange(self.m), codes]  # [n, M or A, m, D/m]
        mean = self._mean if attributes is None else self._mean[attributes]
        return parts.reshape(*codes.shape[:2], self.shape[1]) + mean


class PCAQCodec(_Trained):
    """Centred rows rotated onto principal axes, quantised by groups of axes with learned bit widths.

    Args:
        shape: ``(M, D)``.
        bytes_per_row: Budget per row: the packed codes plus a float16 scale per stored group.
        group: Consecutive axes per group (the last group may be narrower).
    """

    kind = "pcaq"
    _WIDTHS = (0, 2, 3, 4, 5, 6, 7, 8)  # 1 bit cannot code a symmetric 0

    def __init__(self, shape: tuple[int, int], bytes_per_row: int = 128, group: int = 16):
        super().__init__(shape)
        for name, value in (("bytes_per_row", bytes_per_row), ("group", group)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise CodecError(f"pcaq: {name} must be a positive integer, got {value!r}")
        self.group = min(int(group), self.shape[1])
        self.bytes_per_row = int(bytes_per_row)
        self._edges = np.append(np.arange(0, self.shape[1], self.group), self.shape[1])
        smallest = math.ceil(2 * int(np.diff(self._edges).min()) / 8) + 2
        if self.bytes_per_row < smallest:
            raise CodecError(f"pcaq: bytes_per_row must be at least {smallest} (the narrowest group at 2 bits and its "
                             f"scale), got {bytes_per_row}")
        self._rotation: np.ndarray | None = None  # float32 [D, D], columns = axes by decreasing variance
        self._bits: np.ndarray | None = None  # int [G]

    def params(self) -> dict[str, Any]:
        return {"bytes_per_row": self.bytes_per_row, "group": self.group}

    def state(self) -> dict[str, np.ndarray]:
        self._check_fitted()
        return {"mean": self._mean.copy(), "rotation": self._rotation.copy(), "bits": self._bits.copy()}

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        d = self.shape[1]
        arrays = self._arrays(state, {"mean": self.shape, "rotation": (d, d), "bits": (len(self._edges) - 1,)})
        bits = arrays["bits"].astype(np.int64)
        if not np.isin(bits, self._WIDTHS).all():
            raise CodecError(f"state array 'bits' must hold widths in {list(self._WIDTHS)}, got {sorted(set(bits))}")
        if self._row_bytes(bits) > self.bytes_per_row:
            raise CodecError(f"state array 'bits' needs {self._row_bytes(bits)} bytes per row, over the budget of "
                             f"{self.bytes_per_row}")
        self._mean, self._rotation = arrays["mean"], arrays["rotation"]
        self._set_bits(bits)

    @property
    def bits(self) -> np.ndarray:
        """The learned bit width of each group of axes (a copy)."""
        self._check_fitted()
        return self._bits.copy()

    def fit(self, rows: np.ndarray) -> None:
        """Learn the attribute means, the rotation (PCA of the pooled centred rows) and the groups' bit widths.

        Raises:
            CodecError: Bad rows.
        """
        pooled, mean = self._training_rows(rows)
        cov = pooled.T @ pooled / len(pooled)
        values, vectors = np.linalg.eigh(cov)
        rotation = vectors[:, np.argsort(-values, kind="stable")]
        y = (pooled @ rotation).astype(np.float32)
        # errors[g, j]: mean squared error per row of group g at width _WIDTHS[j], measured on the training rows
        errors = np.empty((len(self._edges) - 1, len(self._WIDTHS)))
        for g, (a, b) in enumerate(zip(self._edges[:-1], self._edges[1:], strict=True)):
            part = y[:, a:b]
            for j, width in enumerate(self._WIDTHS):
                if width == 0:
                    errors[g, j] = float((part.astype(np.float64) ** 2).sum(1).mean())
                else:
                    lim = (1 << (width - 1)) - 1
                    q, s = _quantise(part, lim)
                    rec = q.astype(np.float32) * s.astype(np.float32)[:, None]
                    errors[g, j] = float(((rec - part).astype(np.float64) ** 2).sum(1).mean())
        self._rotation = rotation.astype(np.float32)
        self._set_bits(self._allocate(errors))
        self._mean = mean

    def _allocate(self, errors: np.ndarray) -> np.ndarray:
        """Greedy widths: repeatedly take the upgrade that lowers the error most per bit, while the budget allows."""
        level = np.zeros(len(errors), np.int64)  # index into _WIDTHS
        widths = np.diff(self._edges)
        budget, used = 8 * self.bytes_per_row, 0
        while True:
            best, best_gain = -1, 0.0
            for g in range(len(errors)):
                j = level[g]
                if j + 1 == len(self._WIDTHS):
                    continue
                cost = widths[g] * (self._WIDTHS[j + 1] - self._WIDTHS[j]) + (16 if j == 0 else 0)
                gain = (errors[g, j] - errors[g, j + 1]) / cost
                if used + cost <= budget and gain > best_gain:
                    best, best_gain = g, gain
            if best < 0:
                return np.array(self._WIDTHS)[level]
            used += widths[best] * (self._WIDTHS[level[best] + 1] - self._WIDTHS[level[best]])
            used += 16 if level[best] == 0 else 0
            level[best] += 1

    def _row_bytes(self, bits: np.ndarray) -> int:
        return math.ceil(int((np.diff(self._edges) * bits).sum()) / 8) + 2 * int((bits > 0).sum())

    def _set_bits(self, bits: np.ndarray) -> None:
        self._bits = bits.astype(np.int64)
        self._active = np.flatnonzero(self._bits)  # the stored groups
        sizes = np.diff(self._edges)[self._active]
        widths = self._bits[self._active]
        self._axes = np.concatenate([np.arange(self._edges[g], self._edges[g + 1]) for g in self._active] or [[]])
        self._axes = self._axes.astype(np.int64)
        self._basis_t = np.ascontiguousarray(self._rotation[:, self._axes].T)  # [stored axes, D]
        gram = self._basis_t.astype(np.float64) @ self._basis_t.T.astype(np.float64)
        self._orthogonality_error = float(np.abs(gram - np.eye(len(self._axes))).sum(1).max(initial=0.0))
        self._code_bits = int((sizes * widths).sum())
        # Each stored axis's code is ``width`` bits from bit ``start`` of its row's stream, inside the 16-bit window of
        # bytes (start // 8, start // 8 + 1) as widths are at most 8: decoding reads all axes at once with two gathers.
        width_of_axis = np.repeat(widths, sizes)
        start = np.concatenate([[0], np.cumsum(width_of_axis)[:-1]]).astype(np.int64)
        self._byte, self._shift = start >> 3, (start & 7).astype(np.uint16)
        self._mask = ((1 << width_of_axis) - 1).astype(np.uint16)
        self._group_of_axis = np.repeat(np.arange(len(self._active)), sizes)
        self._offset_of_axis = np.repeat((1 << (widths - 1)) - 1, sizes).astype(np.float32)
        # the window's second byte stays in the row: a code in the last byte ends there, and the mask drops the rest
        self._second = np.minimum(self._byte + 1, max(math.ceil(self._code_bits / 8) - 1, 0))
        self._tables = BitTables(self._byte.astype(np.int64), self._second.astype(np.int64),
                                 self._shift.astype(np.int64), self._mask.astype(np.int64), self._offset_of_axis,
                                 self._group_of_axis.astype(np.int64))

    def _layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        m = self.shape[0]
        return {"codes": (np.dtype("u1"), (m, math.ceil(self._code_bits / 8))),
                "scales": (np.dtype("<f2"), (m, len(self._active)))}

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # 2-D products: numpy's stacked matmul does not reach BLAS (10x slower)
        y = ((x - self._mean).reshape(-1, self.shape[1]) @ self._rotation).reshape(x.shape)
        bits, scales = [], []
        for g in self._active:
            width = int(self._bits[g])
            lim = (1 << (width - 1)) - 1
            q, s = _quantise(y[..., self._edges[g]:self._edges[g + 1]], lim)
            unsigned = (q + lim).astype(np.uint16)
            bits.append(((unsigned[..., None] >> np.arange(width, dtype=np.uint16)) & 1).reshape(*q.shape[:-1], -1))
            scales.append(s)
        n, m = x.shape[:2]
        if not bits:
            return {"codes": np.zeros((n, m, 0), np.uint8), "scales": np.zeros((n, m, 0), np.float16)}
        packed = np.packbits(np.concatenate(bits, axis=-1).astype(np.uint8), axis=-1, bitorder="little")
        return {"codes": packed, "scales": np.stack(scales, axis=-1)}

    def _decode(self, stored: dict[str, np.ndarray], attributes: np.ndarray | None) -> np.ndarray:
        mean = self._mean if attributes is None else self._mean[attributes]
        y = self._coordinates(stored, attributes)
        # 2-D product: numpy's stacked matmul does not reach BLAS
        return (y.reshape(-1, len(self._axes)) @ self._basis_t).reshape(*y.shape[:2], self.shape[1]) + mean

    def _coordinates(self, stored: dict[str, np.ndarray], attributes: np.ndarray | None) -> np.ndarray:
        """The stored axes' values ``y`` (float32 ``[n, M or A, S]``): the codes unpacked and scaled, not rotated."""
        codes = stored["codes"]
        if not len(self._axes):
            return np.zeros((*codes.shape[:2], 0), np.float32)
        window = codes[..., self._byte].astype(np.uint16) | (codes[..., self._second].astype(np.uint16) << 8)
        y = ((window >> self._shift) & self._mask).astype(np.float32)
        y -= self._offset_of_axis
        y *= stored["scales"].astype(np.float32)[..., self._group_of_axis]
        return y

    def compiled_scan(self, stored: Mapping[str, np.ndarray], attributes: np.ndarray, queries: np.ndarray,
                      query_sq: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return coded_scores(stored["codes"], stored["scales"], self.bit_tables(), attributes, queries, query_sq,
                            weights)

    def bit_tables(self) -> BitTables:
        """Where each stored coordinate's code lies in a row's packed codes (:func:`coded_scores` unpacks them)."""
        self._check_fitted()
        return self._tables  # built once with the widths (read-only use: the kernels do not write them)

    def scan_space(self, queries: np.ndarray, attributes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``q' = (q − mean) B`` on the stored axes ``B``, and ``rest = ‖q − mean‖² − ‖q'‖²`` (the axes not stored).

        ``rest`` is not clipped at 0: with ``‖q' − y‖²`` it adds up to the squared distance, whatever the basis'
        rounding.
        """
        self._check_fitted()
        centred = np.asarray(queries, np.float64) - self._mean[np.asarray(attributes, np.int64)]
        projected = centred @ self._basis_t.T.astype(np.float64)
        rest = (centred ** 2).sum(-1) - (projected ** 2).sum(-1)
        return projected.astype(np.float32), rest.astype(np.float32)

    def coordinate_slack(self, coordinate_norms: np.ndarray, attributes: np.ndarray) -> np.ndarray:
        """A bound from decoding's float32 rounding and the basis' departure from orthonormality.

        Decoding (``S`` products and the mean per value) moves a row by at most ``2(S + 1)u(√D‖y‖ + ‖mean‖)``, and a
        basis ``B`` with ``‖BᵀB − I‖ <= e`` moves a distance by at most ``√e‖y‖``.
        """
        self._check_fitted()
        u, d, s = float(np.finfo(np.float32).eps) / 2, self.shape[1], len(self._axes)
        mean = np.linalg.norm(self._mean[np.asarray(attributes, np.int64)].astype(np.float64), axis=-1)
        per_norm = 2 * (s + 1) * u * math.sqrt(d) + math.sqrt(self._orthogonality_error)
        return per_norm * np.asarray(coordinate_norms, np.float64) + 2 * (s + 1) * u * mean


CODEC_KINDS: dict[str, type[Codec]] = {cls.kind: cls for cls in (
    Float32Codec, Float16Codec, Int8Codec, UInt8Codec, PQCodec, PCAQCodec, NoneCodec)}


def make_codec(kind: str, shape: tuple[int, int], **params: Any) -> Codec:
    """A codec of one kind.

    Args:
        kind: One of :data:`CODEC_KINDS`.
        shape: ``(M, D)``: rows per entry and values per row.
        **params: The kind's parameters (``pq``: ``m``; ``pcaq``: ``bytes_per_row``, ``group``).

    Returns:
        The codec; trained kinds need :meth:`Codec.fit` before use.

    Raises:
        CodecError: An unknown kind or parameter, or a bad value.
    """
    cls = CODEC_KINDS.get(kind)
    if cls is None:
        raise CodecError(f"unknown codec kind {kind!r}; known: {sorted(CODEC_KINDS)}")
    try:
        return cls(shape, **params)
    except TypeError:
        raise CodecError(f"bad parameters for a {kind} codec: {sorted(params)}") from None


def codec_from_json(doc: Mapping[str, Any], state: Mapping[str, np.ndarray] | None = None) -> Codec:
    """Rebuild a codec from :meth:`Codec.to_json` and, for trained kinds, :meth:`Codec.state`.

    Raises:
        CodecError: A malformed document, or state that does not fit the codec.
    """
    if not isinstance(doc, Mapping) or set(doc) != {"kind", "shape", "params"} or not isinstance(doc["params"],
                                                                                                   Mapping):
        raise CodecError(f"a codec document holds exactly kind, shape and params (a mapping), got {doc!r}")
    codec = make_codec(doc["kind"], tuple(doc["shape"]) if isinstance(doc["shape"], list) else doc["shape"],
                       **doc["params"])
    if codec.trainable and state is None:
        raise CodecError(f"a {codec.kind} codec needs its trained state")
    codec._load_state(state or {})
    return codec
