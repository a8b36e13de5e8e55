"""Numpy twins of the attr_distance kernels: explain gathered rows; exact weighted scan (docs/architecture.md §3, §4).

Embeddings use the kernels' layout ``[.., M+1, C]``: row 0 the target's global embedding f, rows 1..M the f_k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from attrimeter.runtime.codecs import Codec
from attrimeter.runtime.errors import InputError
from attrimeter.runtime.scan_kernel import expanded_scores

__all__ = ["MAX_WEIGHT", "Decomposition", "check_weights", "explain_rows", "weighted_scan"]

# Largest attribute weight: float32 scores Σ w_k d_k stay finite for any realistic distance.
MAX_WEIGHT = 1e6


class Decomposition(NamedTuple):
    """Distances and their attribute decomposition for ``[Q, K]`` query/gallery pairs (float32).

    Attributes:
        d: Target distance ``‖q_0 − g_0‖`` ``[Q, K]``.
        d_k: Per-attribute distances ``[Q, K, M]``.
        shares: ``d_k / Σ_j d_j`` (``1/M`` each where the sum is 0) ``[Q, K, M]``.
        d_hat: ``(1/M) Σ_k d_k`` ``[Q, K]``.
        scores: The ranking score: ``d``, or ``Σ_k w_k d_k`` with weights ``[Q, K]``.
    """

    d: np.ndarray
    d_k: np.ndarray
    shares: np.ndarray
    d_hat: np.ndarray
    scores: np.ndarray


def check_weights(weights: Sequence[float] | np.ndarray | None, m: int) -> np.ndarray | None:
    """Validate attribute weights.

    Args:
        weights: ``[M]`` numbers in [0, :data:`MAX_WEIGHT`], not all zero, or None.
        m: The number of attributes M.

    Returns:
        float32 ``[M]`` or None.

    Raises:
        InputError: On a wrong length, negative, NaN/inf, too large or all-zero weights.
    """
    if weights is None:
        return None
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise InputError("weights must be numbers") from None
    if w.shape != (m,):
        raise InputError(f"weights must have one value per attribute ({m}), got shape {list(w.shape)}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise InputError("weights must be finite and >= 0")
    if not (w > 0).any():
        raise InputError("weights are all zero: at least one attribute must count")
    if w.max() > MAX_WEIGHT:
        raise InputError(f"weights must be <= {MAX_WEIGHT:g} (only their ratios matter), got {w.max():g}")
    w32 = w.astype(np.float32)
    if not (w32 > 0).any():  # e.g. 1e-46 everywhere: zero in float32
        raise InputError("weights are all zero in float32: at least one attribute must count")
    return w32


def explain_rows(q: np.ndarray, g: np.ndarray, weights: np.ndarray | None = None) -> Decomposition:
    """Decompose query/gallery distances by direct differences in float32 (the twin of ``explain_topk``).

    Args:
        q: Queries ``[Q, M+1, C]``.
        g: The gathered gallery rows of each query ``[Q, K, M+1, C]`` (any float dtype; computed in float32).
        weights: Checked attribute weights ``[M]`` (see :func:`check_weights`) for ``scores``, or None.

    Returns:
        :class:`Decomposition`.
    """
    diff = q.astype(np.float32, copy=False)[:, None] - g.astype(np.float32, copy=False)
    dist = np.sqrt(np.einsum("qkrc,qkrc->qkr", diff, diff))
    return _decompose(dist, weights)


def _decompose(dist: np.ndarray, weights: np.ndarray | None) -> Decomposition:
    d, d_k = dist[..., 0], dist[..., 1:]
    m = d_k.shape[-1]
    total = d_k.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(total > 0, d_k / total, np.float32(1.0 / m)).astype(np.float32)
    scores = d if weights is None else _weighted_sum(d_k, weights)
    return Decomposition(d=d, d_k=d_k, shares=shares, d_hat=d_k.mean(-1), scores=scores.astype(np.float32))


# Bytes per block of the weighted scan over a codec's coordinates: a block's decoded rows stay in the CPU's cache.
_SCAN_BLOCK_BYTES = 1 << 20
# Rounding bound of the norm expansion: |fl(‖q‖² + ‖g‖² − 2 q·g) − ‖q − g‖²| <= (C + 2)·u·(‖q‖ + ‖g‖)² in float32
# (u = 2^-24, each dot product of C terms within C·u·‖q‖‖g‖); doubled for margin, which also covers the float32
# rounding of the weighted sums (A·u relative, orders of magnitude below the bound's square root).
_ROUNDING = 2.0 * 2.0 ** -24


def weighted_scan(q: np.ndarray, chunks: Iterable[tuple[int, Any, np.ndarray | None]], weights: np.ndarray,
                  k: int, codec: Codec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by the attribute-weighted score ``Σ_k w_k d_k`` over a whole gallery, chunk by chunk.

    Only the attributes with a non-zero weight are read. Candidates are found with the norm expansion
    ``d_k² = ‖q_k‖² + ‖g_k‖² − 2 q_k·g_k`` (float rows: the compiled
    :func:`~attrimeter.runtime.scan_kernel.expanded_scores` over the stored float16 and ``‖g_k‖²``), then scored
    exactly by direct differences like :func:`explain_rows`. A candidate is rescored when its expanded score is within
    the expansion's rounding bound B of the k-th exact score so far, so no entry of the exact top k (or tied with its
    k-th) is missed: the result equals an exact scan by direct differences of the decoded rows, ties to the lower id
    (a sharded gallery's merge keeps the same ones).

    With a ``codec`` the chunks hold its stored arrays: candidates are found in :meth:`Codec.coordinates`' space
    (``pcaq``: the rotated coordinates, never rotated back) with B widened by :meth:`Codec.coordinate_slack`, and
    only the candidates are decoded and scored.

    Args:
        q: Query attribute embeddings ``[Q, M, C]``.
        chunks: ``(first id, rows, ‖rows‖² [n, M] float32 or None)`` covering the gallery in id order
            (``Gallery.scan_chunks``): rows float16/32 ``[n, M, C]`` (None norms are computed), or with ``codec``
            the stored arrays of ``n`` entries by name (norms None).
        weights: Checked weights ``[M]``.
        k: How many (>= 1).
        codec: The codec of the stored arrays, or None for float rows.

    Returns:
        ``(scores [Q, k'], ids [Q, k'] int64)`` ascending by score, ``k' = min(k, N)``.
    """
    active = np.flatnonzero(weights)
    w = np.ascontiguousarray(weights[active], dtype=np.float32)
    q32 = np.ascontiguousarray(np.asarray(q, dtype=np.float32)[:, active])  # [Q, A, C]
    qc, rest = (q32, np.zeros(q32.shape[:2], np.float32)) if codec is None else codec.scan_space(q32, active)
    q_sq = np.einsum("qac,qac->qa", qc, qc) + rest  # [Q, A]: ‖q‖² in the scan's coordinates
    q_norm = np.sqrt(np.maximum(q_sq, 0.0))
    root_gamma = np.float32(np.sqrt(_ROUNDING * (qc.shape[2] + 2)))
    nq = len(q32)
    best_scores = np.full((nq, 0), np.inf, np.float32)
    best_ids = np.empty((nq, 0), np.int64)
    for first, rows, norms in chunks:
        if codec is None:  # compiled: float16 read in place, never copied to float32 (scan_kernel)
            approx, g_max = expanded_scores(rows, norms, active, qc, q_sq, w)
        else:
            approx, g_max = _coordinate_scores(rows, codec, active, qc, q_sq, w)
        bound = root_gamma * ((q_norm + np.sqrt(g_max)[None]) @ w)  # [Q]: B for this chunk's largest norms
        if codec is not None:
            bound = bound + np.float32(codec.coordinate_slack(np.sqrt(g_max), active) @ w)
        kth = best_scores[:, k - 1] if best_scores.shape[1] >= k else np.full(nq, np.inf, np.float32)
        if approx.shape[1] >= k:  # k entries of this chunk score at most their k-th expanded score + B
            kth = np.minimum(kth, np.partition(approx, k - 1, axis=1)[:, k - 1] + bound)
        cand_q, cand_n = np.nonzero(approx <= (kth + bound)[:, None])
        if len(cand_q) == 0:
            continue
        # a codec decodes the candidates' every row, as the gallery's reads do: the same products, the same bits
        g = (np.asarray(rows[cand_n[:, None], active], dtype=np.float32) if codec is None  # only the rows needed
             else codec.decode(rows, cand_n)[:, active])
        exact = _direct_scores(q32[cand_q], g, w)
        best_scores, best_ids = _merge(best_scores, best_ids, cand_q, exact, first + cand_n, k)
    finite = np.isfinite(best_scores).all(0)  # columns some queries did not fill (fewer than k entries seen)
    return best_scores[:, finite], best_ids[:, finite]


def _coordinate_scores(stored: dict[str, np.ndarray], codec: Codec, active: np.ndarray, qc: np.ndarray,
                       q_sq: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expanded weighted scores ``[Q, n]`` of a chunk of codec arrays in the codec's coordinates, and its ``g_max``.

    Kinds with a compiled scan (:meth:`Codec.compiled_scan`: ``int8``, ``pcaq``) decode each value in registers;
    others' coordinates are decoded by blocks in numpy.
    """
    compiled = codec.compiled_scan(stored, active, qc, q_sq, w)
    if compiled is not None:
        return compiled
    n = len(next(iter(stored.values())))
    q_t = np.ascontiguousarray(qc.transpose(1, 2, 0))  # [A, S, Q]: one matrix product per attribute
    block = max(16, _SCAN_BLOCK_BYTES // (4 * max(1, qc.shape[1] * qc.shape[2])))
    approx = np.empty((len(qc), n), np.float32)
    g_max = np.zeros(len(active), np.float32)
    for a in range(0, n, block):
        g = codec.coordinates({name: arr[a:a + block] for name, arr in stored.items()}, active)  # [b, A, S]
        g_sq = np.einsum("nac,nac->na", g, g)
        np.maximum(g_max, g_sq.max(0, initial=0.0), out=g_max)
        sq = q_sq[:, None, :] + g_sq[None] - 2.0 * np.matmul(g.transpose(1, 0, 2), q_t).transpose(2, 1, 0)
        approx[:, a:a + block] = np.sqrt(np.maximum(sq, 0.0)) @ w  # [Q, b]
    return approx, g_max


def _direct_scores(q: np.ndarray, g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Σ_k w_k ‖q_k − g_k‖`` by direct differences in float32 for pairs ``q [P, A, C]``, ``g [P, A, C]``."""
    diff = q - g
    return _weighted_sum(np.sqrt(np.einsum("pac,pac->pa", diff, diff)), w)


def _weighted_sum(d_k: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Σ_k w_k d_k`` over the last axis, each row's bits independent of the batch around it.

    A BLAS product (``d_k @ w``) sums some rows in another order than others depending on the batch's size, and equal
    entries scored in different batches (another chunk, another shard) must tie exactly.
    """
    return (d_k * w).sum(-1, dtype=np.float32)


def _merge(best_scores: np.ndarray, best_ids: np.ndarray, cand_q: np.ndarray, scores: np.ndarray,
           ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each query's running best and its new ``(score, id)`` candidates, ascending, ties by lower id."""
    nq = len(best_scores)
    counts = np.bincount(cand_q, minlength=nq)
    width = best_scores.shape[1] + int(counts.max())
    all_scores = np.full((nq, width), np.inf, np.float32)
    all_ids = np.full((nq, width), np.iinfo(np.int64).max, np.int64)
    all_scores[:, :best_scores.shape[1]] = best_scores
    all_ids[:, :best_ids.shape[1]] = best_ids
    order = np.argsort(cand_q, kind="stable")
    col = best_scores.shape[1] + np.arange(len(cand_q)) - np.repeat(np.cumsum(counts) - counts, counts)
    all_scores[cand_q[order], col] = scores[order]
    all_ids[cand_q[order], col] = ids[order]
    keep = np.lexsort((all_ids, all_scores), axis=1)[:, :k]
    return np.take_along_axis(all_scores, keep, 1), np.take_along_axis(all_ids, keep, 1)
