"""Explanation metrics of the interpreter (DESIGN §8): X-mAP_e, X-mAP_c, ADRE, counterfactual faithfulness.

All take per-pair arrays with one row per pair of images and one column per attribute: ``shares`` [P, M] (the
share p_k of each attribute in the pair's distance), ``differ`` / ``changed`` [P, M] (which attributes truly differ),
optionally ``known`` [P, M] (which attributes are annotated for both persons: an unknown one neither differs nor
agrees and is left out of the ranking). Rankings sort shares descending with ties broken by column order (a stable
sort), so results are reproducible.

numpy only, so the torch-free runtime can reuse it.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "adre",
    "attribute_accuracy",
    "average_precision",
    "counterfactual_scores",
    "x_map_c",
    "x_map_e",
]

# Elements of one chunk of rows in average_precision; bounds the sort's temporaries whatever P is (1e6 pairs x 26).
_CHUNK_ELEMENTS = 1 << 20


def _pair(a: ArrayLike, b: ArrayLike, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Two array-likes as numpy arrays of the same 2-D shape."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must be 2-D arrays of the same shape [P, M], "
                         f"got {name_a} {a.shape} and {name_b} {b.shape}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ValueError(f"{name_a} contains NaN or infinite values")
    return a, b


def _binary(x: np.ndarray, name: str) -> np.ndarray:
    """A 0/1 (or bool) array as bool; anything else is refused (1/2-coded attributes would silently mean all-true)."""
    if x.dtype == bool:
        return x
    if not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (or bool)")
    return x == 1


def _rank_descending(scores: np.ndarray) -> np.ndarray:
    """Column indices of each row by decreasing score, ties in column order (float64: negating unsigned wraps)."""
    return np.argsort(-scores.astype(np.float64, copy=False), axis=1, kind="stable")


def average_precision(scores: ArrayLike, relevant: ArrayLike) -> np.ndarray:
    """Average precision of each row's relevant items when the row is ranked by score, highest first.

    AP = mean over the relevant items of (relevant items ranked at or above it) / (its 1-based rank). Ties are
    broken by column order.

    Args:
        scores: Scores [P, M].
        relevant: Relevance [P, M], bool or 0/1.

    Returns:
        float64 AP [P]; NaN for a row without relevant item.

    Raises:
        ValueError: If the shapes differ or are not 2-D, or ``relevant`` holds values other than 0/1.
    """
    scores, relevant = _pair(scores, relevant, "scores", "relevant")
    relevant = _binary(relevant, "relevant")
    p, m = scores.shape
    if m == 0:
        return np.full(p, np.nan)
    ranks = np.arange(1, m + 1, dtype=np.float64)
    ap = np.empty(p, dtype=np.float64)
    rows = max(1, _CHUNK_ELEMENTS // m)
    for start in range(0, p, rows):
        sl = slice(start, start + rows)
        hits = np.take_along_axis(relevant[sl], _rank_descending(scores[sl]), axis=1)
        found = np.cumsum(hits, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[sl] = np.where(hits, found / ranks, 0.0).sum(axis=1) / found[:, -1]
    return ap


def _known_last(scores: np.ndarray, known: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """Scores with the unknown entries below every known one, and the known mask (all True for ``None``)."""
    # Ranked last and never relevant, an entry changes no AP: the same as leaving it out of the ranking.
    if known is None:
        return scores, np.ones(scores.shape, dtype=bool)
    known = _binary(np.asarray(known), "known")
    if known.shape != scores.shape:
        raise ValueError(f"known must have the shape of shares {scores.shape}, got {known.shape}")
    scores = scores.astype(np.float64, copy=False)
    return np.where(known, scores, scores.min(initial=0.0) - 1.0), known


def _mean_ap(scores: np.ndarray, relevant: np.ndarray) -> float:
    has = relevant.any(axis=1)
    if not has.any():
        return float("nan")
    return float(average_precision(scores[has], relevant[has]).mean())


def x_map_e(shares: ArrayLike, differ: ArrayLike, known: ArrayLike | None = None) -> float:
    """X-mAP_e: mean AP of the truly differing attributes when attributes are ranked by share, largest first.

    Args:
        shares: Shares [P, M].
        differ: [P, M], 1 where the two persons differ on the attribute.
        known: Optional [P, M], 1 where the attribute is known for both persons; unknown ones are left out of the
            ranking. ``None``: all known.

    Returns:
        Mean AP over the pairs with at least one (known) differing attribute, in [0, 1]; NaN if there is none.

    Raises:
        ValueError: If the shapes differ or are not 2-D, or ``differ`` / ``known`` hold values other than 0/1.
    """
    shares, differ = _pair(shares, differ, "shares", "differ")
    scores, known = _known_last(shares, known)
    return _mean_ap(scores, _binary(differ, "differ") & known)


def x_map_c(shares: ArrayLike, differ: ArrayLike, known: ArrayLike | None = None) -> float:
    """X-mAP_c: mean AP of the common attributes when attributes are ranked by share, smallest first.

    Args:
        shares: Shares [P, M].
        differ: [P, M], 1 where the two persons differ on the attribute.
        known: Optional [P, M], 1 where the attribute is known for both persons; unknown ones are left out of the
            ranking (they are not common either). ``None``: all known.

    Returns:
        Mean AP over the pairs with at least one (known) common attribute, in [0, 1]; NaN if there is none.

    Raises:
        ValueError: If the shapes differ or are not 2-D, or ``differ`` / ``known`` hold values other than 0/1.
    """
    shares, differ = _pair(shares, differ, "shares", "differ")
    scores, known = _known_last(-shares.astype(np.float64, copy=False), known)
    return _mean_ap(scores, ~_binary(differ, "differ") & known)


def adre(d: ArrayLike, d_hat: ArrayLike) -> float:
    """Average distance reconstruction error, mean |d - d_hat| / d in percent over the pairs with d > 0.

    Args:
        d: Target distances (any shape).
        d_hat: Decomposed distances, same shape.

    Returns:
        ADRE in percent.

    Raises:
        ValueError: If the shapes differ, a value is negative or not finite, or no pair has d > 0.
    """
    d = np.asarray(d, dtype=np.float64)
    d_hat = np.asarray(d_hat, dtype=np.float64)
    if d.shape != d_hat.shape:
        raise ValueError(f"d and d_hat must have the same shape, got d {d.shape} and d_hat {d_hat.shape}")
    if not (np.isfinite(d).all() and np.isfinite(d_hat).all()) or (d < 0).any() or (d_hat < 0).any():
        raise ValueError("d and d_hat must be finite distances >= 0")
    keep = d > 0
    if not keep.any():
        raise ValueError("adre needs at least one pair with d > 0")
    return float(np.mean(np.abs(d[keep] - d_hat[keep]) / d[keep]) * 100.0)


def counterfactual_scores(shares: ArrayLike, changed: ArrayLike) -> tuple[float, float]:
    """Counterfactual faithfulness: does the largest share fall on the attribute that was changed?

    Args:
        shares: Shares [P, M] of counterfactual pairs.
        changed: [P, M], bool or 0/1, the attributes that truly differ within each pair (at least one per row).

    Returns:
        ``(top1, mrr)``: the fraction of pairs whose largest share (ties: first column) is a changed attribute, and
        the mean over pairs of 1 / (1-based rank of the best-ranked changed attribute).

    Raises:
        ValueError: If the shapes differ or are not 2-D, there is no pair, ``changed`` holds values other than 0/1,
            or a row has no changed attribute.
    """
    shares, changed = _pair(shares, changed, "shares", "changed")
    changed = _binary(changed, "changed")
    if shares.shape[0] == 0:
        raise ValueError("counterfactual_scores needs at least one pair")
    empty = np.flatnonzero(~changed.any(axis=1))
    if empty.size:
        raise ValueError(f"changed has no changed attribute in row {int(empty[0])} ({empty.size} such rows)")
    hits = np.take_along_axis(changed, _rank_descending(shares), axis=1)
    first = np.argmax(hits, axis=1)  # 0-based position of the first changed attribute in the ranking
    return float(np.mean(first == 0)), float(np.mean(1.0 / (first + 1)))


def attribute_accuracy(logits: ArrayLike, labels: ArrayLike) -> tuple[float, np.ndarray]:
    """Accuracy of attribute predictions (logit > 0 predicts 1) on the known labels.

    Args:
        logits: Attribute logits [N, M].
        labels: Labels [N, M], bool or 0/1, or -1 where unknown (left out).

    Returns:
        ``(mean accuracy over the known entries, float64 per-attribute accuracy [M])``; an attribute without known
        label has accuracy NaN.

    Raises:
        ValueError: If the shapes differ, are not 2-D or are empty, ``labels`` holds values other than 0/1/-1, or
            no label is known.
    """
    logits, labels = _pair(logits, labels, "logits", "labels")
    if logits.size == 0:
        raise ValueError(f"attribute_accuracy needs at least one entry, got shape {logits.shape}")
    if labels.dtype != bool and not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError("labels must hold only 0 and 1, or -1 for unknown (or bool)")
    known = labels >= 0
    if not known.any():
        raise ValueError("attribute_accuracy needs at least one known label, all are -1 (unknown)")
    correct = ((logits > 0) == (labels == 1)) & known
    with np.errstate(invalid="ignore", divide="ignore"):
        per_attribute = correct.sum(axis=0) / known.sum(axis=0, dtype=np.float64)
    return float(correct.sum() / known.sum()), per_attribute
