"""Retrieval metrics under the Market-1501 protocol: mAP and CMC, vectorised and chunked over queries.

The protocol (as in Market-1501's official code, torchreid and fast-reid): for each query, gallery entries with the
same identity *and* the same camera are removed; junk (pid -1) never counts; a query without any remaining true match
is skipped. Distances are computed one chunk of queries at a time, so a 20k x 20k evaluation never holds the full
matrix (let alone in float64).

numpy only, so the torch-free runtime can reuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "RankMetrics",
    "ReIDEvaluator",
    "euclidean_distances",
    "evaluate_rank",
    "rank_chunk",
]

# Elements of a query chunk's [chunk, N] working arrays; bounds peak memory to a few hundred MB whatever N is.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class RankMetrics:
    """Retrieval accuracy of one evaluation.

    Attributes:
        mAP: Mean average precision over the valid queries, in [0, 1].
        cmc: Cumulative matching characteristic, ``cmc[r-1]`` = rank-r accuracy, in [0, 1].
        num_queries: Number of valid queries (those with at least one true match left in the gallery).
        num_skipped: Number of queries skipped for having no true match.
    """

    mAP: float
    cmc: np.ndarray = field(repr=False)
    num_queries: int
    num_skipped: int

    def rank(self, r: int) -> float:
        """Rank-r accuracy (1-based)."""
        if not 1 <= r <= len(self.cmc):
            raise ValueError(f"rank must be in 1..{len(self.cmc)}, got {r}")
        return float(self.cmc[r - 1])

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for JSON: mAP, rank1/5/10 (as far as computed), counts."""
        out: dict[str, float | int] = {"mAP": float(self.mAP)}
        for r in (1, 5, 10):
            if r <= len(self.cmc):
                out[f"rank{r}"] = float(self.cmc[r - 1])
        out["num_queries"] = self.num_queries
        out["num_skipped"] = self.num_skipped
        return out


def euclidean_distances(q: np.ndarray, g: np.ndarray, g_sqnorm: np.ndarray | None = None) -> np.ndarray:
    """Pairwise Euclidean distances as one GEMM: sqrt(|q|^2 + |g|^2 - 2 q.g), clamped at 0.

    Args:
        q: Query embeddings [Q, C].
        g: Gallery embeddings [N, C].
        g_sqnorm: Optional precomputed squared norms of ``g`` [N].

    Returns:
        float32 distances [Q, N].
    """
    q = np.asarray(q, dtype=np.float32)
    g = np.asarray(g, dtype=np.float32)
    gn = np.einsum("nc,nc->n", g, g) if g_sqnorm is None else np.asarray(g_sqnorm, dtype=np.float32)
    d2 = np.einsum("qc,qc->q", q, q)[:, None] + gn[None, :] - 2.0 * (q @ g.T)
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2, out=d2)


def rank_chunk(
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Average precision and first-hit rank of a chunk of queries.

    Args:
        dist: Distances [q, N] of these queries to the whole gallery (smaller = more similar).
        q_pids: Query identities [q].
        g_pids: Gallery identities [N].
        q_camids: Query cameras [q].
        g_camids: Gallery cameras [N].

    Returns:
        ``(ap [q], first_hit [q])``: AP per query (NaN for a query without a valid match) and the 1-based rank of the
        first true match among the kept gallery entries (0 for no match).
    """
    # Stable sort so that ties are broken by gallery order, as the reference implementations do.
    order = np.argsort(dist, axis=1, kind="stable")
    gp = g_pids[order]
    gc = g_camids[order]
    same_pid = gp == q_pids[:, None]
    keep = ~(same_pid & (gc == q_camids[:, None])) & (gp != -1)
    hits = same_pid & keep
    kept_rank = np.cumsum(keep, axis=1)  # rank among kept entries, 1-based where keep is true
    hit_count = np.cumsum(hits, axis=1)
    num_pos = hit_count[:, -1] if hits.shape[1] else np.zeros(hits.shape[0], dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(hits, hit_count / np.maximum(kept_rank, 1), 0.0)
        ap = precision.sum(axis=1) / num_pos
    ap = np.where(num_pos > 0, ap, np.nan)
    first_idx = np.argmax(hits, axis=1)
    first_hit = np.where(num_pos > 0, kept_rank[np.arange(len(first_idx)), first_idx], 0)
    return ap, first_hit


def evaluate_rank(
    query: np.ndarray,
    gallery: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 10,
    distance: Callable[[np.ndarray, np.ndarray], np.ndarray] = euclidean_distances,
    chunk_size: int | None = None,
) -> RankMetrics:
    """Mean average precision and CMC of a query set against a gallery under the Market-1501 protocol.

    Args:
        query: Query embeddings [Q, C] (or any per-query representation ``distance`` accepts).
        gallery: Gallery embeddings [N, C] (likewise).
        q_pids: Query identities [Q].
        g_pids: Gallery identities [N] (-1 = junk, never counted).
        q_camids: Query cameras [Q].
        g_camids: Gallery cameras [N].
        max_rank: Length of the CMC curve.
        distance: ``distance(query_chunk, gallery) -> [q, N]``; Euclidean by default.
        chunk_size: Queries per chunk; chosen from N by default to bound memory.

    Returns:
        The metrics.

    Raises:
        ValueError: On mismatched lengths, an empty split, non-finite distances or no valid query.
    """
    q_pids, g_pids = np.asarray(q_pids).reshape(-1), np.asarray(g_pids).reshape(-1)
    q_camids, g_camids = np.asarray(q_camids).reshape(-1), np.asarray(g_camids).reshape(-1)
    nq, ng = len(query), len(gallery)
    if nq == 0 or ng == 0:
        raise ValueError(f"evaluation needs a non-empty query and gallery (got {nq} queries, {ng} gallery entries)")
    for name, arr, n in (("q_pids", q_pids, nq), ("q_camids", q_camids, nq), ("g_pids", g_pids, ng),
                         ("g_camids", g_camids, ng)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} entries, expected {n}")
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // ng)
    aps: list[np.ndarray] = []
    firsts: list[np.ndarray] = []
    for start in range(0, nq, chunk_size):
        sl = slice(start, min(start + chunk_size, nq))
        dist = np.asarray(distance(query[sl], gallery))
        if dist.shape != (sl.stop - sl.start, ng):
            raise ValueError(f"distance returned shape {dist.shape}, expected {(sl.stop - sl.start, ng)}")
        if not np.isfinite(dist).all():
            raise ValueError(f"non-finite distances for queries {sl.start}..{sl.stop - 1} (NaN or inf embeddings?)")
        ap, first = rank_chunk(dist, q_pids[sl], g_pids, q_camids[sl], g_camids)
        aps.append(ap)
        firsts.append(first)
    ap_all = np.concatenate(aps)
    first_all = np.concatenate(firsts)
    valid = first_all > 0
    if not valid.any():
        raise ValueError("no query has a true match in the gallery from another camera: check the split")
    ranks = np.arange(1, max_rank + 1)
    cmc = (first_all[valid, None] <= ranks[None, :]).mean(axis=0)
    return RankMetrics(
        mAP=float(np.mean(ap_all[valid])),
        cmc=cmc.astype(np.float64),
        num_queries=int(valid.sum()),
        num_skipped=int((~valid).sum()),
    )


class ReIDEvaluator:
    """Accumulates embeddings batch by batch, then evaluates (fast-reid's reset / process / evaluate)."""

    def __init__(self, max_rank: int = 10) -> None:
        self.max_rank = max_rank
        self.reset()

    def reset(self) -> None:
        """Forget everything processed so far."""
        self._feats: dict[bool, list[np.ndarray]] = {True: [], False: []}
        self._pids: dict[bool, list[np.ndarray]] = {True: [], False: []}
        self._camids: dict[bool, list[np.ndarray]] = {True: [], False: []}

    def process(self, embeddings: np.ndarray, pids: np.ndarray, camids: np.ndarray, is_query: bool) -> None:
        """Add a batch.

        Args:
            embeddings: [b, C] embeddings (numpy, or anything ``np.asarray`` accepts).
            pids: [b] identities.
            camids: [b] cameras.
            is_query: Whether the batch belongs to the query set (else the gallery).
        """
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or len(emb) != len(pids) or len(pids) != len(camids):
            raise ValueError(f"batch shapes disagree: embeddings {emb.shape}, pids {len(pids)}, camids {len(camids)}")
        self._feats[is_query].append(emb)
        self._pids[is_query].append(np.asarray(pids))
        self._camids[is_query].append(np.asarray(camids))

    def evaluate(self) -> RankMetrics:
        """Evaluate everything processed since the last reset."""
        if not self._feats[True] or not self._feats[False]:
            raise ValueError("evaluate() needs both query and gallery batches")
        cat = np.concatenate
        return evaluate_rank(
            cat(self._feats[True]), cat(self._feats[False]),
            cat(self._pids[True]), cat(self._pids[False]),
            cat(self._camids[True]), cat(self._camids[False]),
            max_rank=self.max_rank,
        )
