"""Explanation metrics (docs/architecture.md §8): X-mAP_e, X-mAP_c, ADRE, counterfactual faithfulness.

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

from attrimeter.viz import resize_bilinear

__all__ = [
    "PaperAccumulator",
    "aam_localisation",
    "adre",
    "attribute_accuracy",
    "average_precision",
    "counterfactual_scores",
    "counterfactual_shares",
    "paper_average_precisions",
    "share_concentration",
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


def counterfactual_shares(shares: ArrayLike, changed: ArrayLike) -> dict[str, float]:
    """How much of a counterfactual pair's distance its changed attributes take (flat explanations show here).

    Args:
        shares: Shares [P, M] of counterfactual pairs (rows sum to 1).
        changed: [P, M], bool or 0/1, the attributes that truly differ within each pair (at least one per row).

    Returns:
        ``cf_share``: mean over pairs of the summed share of the changed attributes; ``cf_lift``: the same over the
        uniform share N_e / M (1 = no better than flat shares); ``prior_met``: the fraction of pairs that reach the
        attribute prior's own target, summed changed share >= sqrt(N_e / M) (docs/architecture.md §3).

    Raises:
        ValueError: As :func:`counterfactual_scores`.
    """
    shares, changed = _pair(shares, changed, "shares", "changed")
    changed = _binary(changed, "changed")
    if shares.shape[0] == 0:
        raise ValueError("counterfactual_shares needs at least one pair")
    n_e = changed.sum(axis=1)
    if (n_e == 0).any():
        raise ValueError(f"changed has no changed attribute in {int((n_e == 0).sum())} rows")
    m = shares.shape[1]
    total = np.where(changed, shares, 0.0).sum(axis=1, dtype=np.float64)
    return {"cf_share": float(total.mean()), "cf_lift": float((total / (n_e / m)).mean()),
            "prior_met": float(np.mean(total >= np.sqrt(n_e / m) - 1e-9))}


def share_concentration(shares: ArrayLike) -> tuple[float, float]:
    """How peaked explanations are: the mean largest share and the mean normalised entropy of the shares.

    Args:
        shares: Shares [P, M] (rows sum to 1, entries >= 0), M >= 2.

    Returns:
        ``(mean largest share, mean entropy / ln M)``: uniform shares give ``(1 / M, 1.0)``, one attribute taking
        the whole distance ``(1.0, 0.0)``.

    Raises:
        ValueError: If ``shares`` is not a finite [P, M] array with P >= 1 and M >= 2, or has negative entries.
    """
    shares = np.asarray(shares, dtype=np.float64)
    if shares.ndim != 2 or shares.shape[0] == 0 or shares.shape[1] < 2:
        raise ValueError(f"shares must have shape [P, M] with P >= 1 and M >= 2, got {shares.shape}")
    if not np.isfinite(shares).all() or (shares < 0).any():
        raise ValueError("shares must be finite and >= 0")
    p = shares / np.maximum(shares.sum(axis=1, keepdims=True), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(p.max(axis=1).mean()), float((entropy / np.log(p.shape[1])).mean())


def paper_average_precisions(shares: ArrayLike, differ: ArrayLike, known: ArrayLike | None = None,
                             lamda: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair APs of the authors' X-mAP protocol (``explain_eval`` of the AttriMeter paper's code).

    X-mAP_e: AP of the differing attributes, ranked by share, largest first (as :func:`x_map_e`). X-mAP_c: AP of the
    common attributes ranked smallest first, except on a pair whose attributes all agree: there the attributes are
    ranked largest first, a share above ``lamda / M`` counts as not relevant, and the AP is divided by the number of
    attributes (so every share above ``lamda / M`` costs precision).

    Args:
        shares: Shares [P, M].
        differ: [P, M], 1 where the two persons differ on the attribute.
        known: Optional [P, M], 1 where the attribute is known for both persons (unknown ones are ranked last and
            never relevant). ``None``: all known.
        lamda: The all-agree rule's bound, in units of the uniform share 1 / M (the authors' 2).

    Returns:
        ``(ap_e, ap_c)`` float64 [P]: NaN where the pair has no differing (for ``ap_e``) or no common attribute.

    Raises:
        ValueError: If the shapes differ or are not 2-D, or ``differ`` / ``known`` hold values other than 0/1.
    """
    shares, differ = _pair(shares, differ, "shares", "differ")
    shares = shares.astype(np.float64, copy=False)
    descending, known = _known_last(shares, known)
    ascending, _ = _known_last(-shares, known)
    differ = _binary(differ, "differ") & known
    common = ~differ & known
    m = shares.shape[1]
    ap_e = np.full(shares.shape[0], np.nan)
    ap_c = np.full(shares.shape[0], np.nan)
    has_e = differ.any(axis=1)
    if has_e.any():
        ap_e[has_e] = average_precision(descending[has_e], differ[has_e])
    mixed = has_e & common.any(axis=1)
    if mixed.any():
        ap_c[mixed] = average_precision(ascending[mixed], common[mixed])
    agree = ~has_e & common.any(axis=1)
    if agree.any():
        relevant = common[agree] & (shares[agree] <= lamda / m)
        hits = np.take_along_axis(relevant, _rank_descending(descending[agree]), axis=1)
        found = np.cumsum(hits, axis=1)
        ap_c[agree] = np.where(hits, found / np.arange(1, m + 1), 0.0).sum(axis=1) / common[agree].sum(axis=1)
    return ap_e, ap_c


class PaperAccumulator:
    """The paper's protocol over every query × gallery pair, accumulated chunk by chunk (X-mAP_e, X-mAP_c, ADRE).

    Args:
        lamda: See :func:`paper_average_precisions`.
    """

    def __init__(self, lamda: float = 2.0) -> None:
        self.lamda = lamda
        self._sums = np.zeros(3)  # AP_e, AP_c, relative error
        self._counts = np.zeros(3, dtype=np.int64)

    def add(self, shares: np.ndarray, differ: np.ndarray, d: np.ndarray, d_hat: np.ndarray,
            known: np.ndarray | None = None) -> None:
        """Add a chunk of pairs: shares, differ, known [P, M] (see :func:`paper_average_precisions`), d, d_hat [P]."""
        ap_e, ap_c = paper_average_precisions(shares, differ, known, self.lamda)
        d = np.asarray(d, dtype=np.float64)
        keep = d > 0
        rel = np.abs(d[keep] - np.asarray(d_hat, dtype=np.float64)[keep]) / d[keep]
        for i, values in enumerate((ap_e[~np.isnan(ap_e)], ap_c[~np.isnan(ap_c)], rel)):
            self._sums[i] += values.sum()
            self._counts[i] += values.size

    def result(self) -> dict[str, float]:
        """``{"x_map_e", "x_map_c", "adre" (percent), "pairs"}`` of everything added."""
        means = self._sums / np.maximum(self._counts, 1)
        return {"x_map_e": float(means[0]), "x_map_c": float(means[1]), "adre": float(means[2] * 100.0),
                "pairs": int(self._counts[2])}


def aam_localisation(aam: ArrayLike, masks: ArrayLike, tolerance: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Do the attention maps look where each attribute is? A pointing game and the mass inside the mask.

    Each map is upsampled bilinearly to the masks' size. Pointing: the map's peak pixel lies within ``tolerance``
    pixels (Chebyshev distance) of the mask. Mass: of the map's excess over its own mean, max(A − mean A, 0), the
    fraction that falls inside the mask (0 for a flat map, which points nowhere).

    Args:
        aam: Attention maps ``[N, M, h, w]`` (>= 0).
        masks: Where each attribute is visible, bool ``[N, M, H, W]``; an empty mask is not scored.
        tolerance: Pixels a peak may miss the mask by (e.g. half a feature-map cell).

    Returns:
        ``(pointing, mass)`` float64 ``[N, M]``: 1/0 hits and fractions, NaN where the mask is empty.

    Raises:
        ValueError: If the shapes do not agree or the maps are not finite.
    """
    aam, masks = np.asarray(aam), np.asarray(masks, dtype=bool)
    if aam.ndim != 4 or masks.ndim != 4 or aam.shape[:2] != masks.shape[:2]:
        raise ValueError(f"aam [N, M, h, w] and masks [N, M, H, W] must agree on N and M, got {aam.shape} and "
                         f"{masks.shape}")
    if not np.isfinite(aam).all():
        raise ValueError("aam contains NaN or infinite values")
    n, m, height, width = masks.shape
    pointing = np.full((n, m), np.nan)
    mass = np.full((n, m), np.nan)
    for i in range(n):
        up = np.stack([resize_bilinear(a, height, width) for a in aam[i]])  # [M, H, W]
        for k in np.flatnonzero(masks[i].any(axis=(1, 2))):
            peak = np.unravel_index(np.argmax(up[k]), (height, width))
            ys, xs = np.nonzero(masks[i, k])
            pointing[i, k] = float(np.min(np.maximum(np.abs(ys - peak[0]), np.abs(xs - peak[1]))) <= tolerance)
            excess = np.maximum(up[k] - up[k].mean(), 0.0)
            total = excess.sum()
            mass[i, k] = float(excess[masks[i, k]].sum() / total) if total > 0 else 0.0
    return pointing, mass
