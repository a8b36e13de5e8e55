"""Interpreter training losses: metric distillation, attribute prior, weighted BCE (docs/architecture.md §3).

Each loss takes torch tensors and returns a differentiable 0-d tensor. Only shapes and dtypes are validated: checks
on the values (NaN, ranges) would synchronise the GPU at every step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf

__all__ = [
    "DIFFER_WEIGHT",
    "SIMILAR_WEIGHT",
    "attribute_prior",
    "attribute_prior_terms",
    "colour_prior",
    "metric_distillation",
    "positive_ratio",
    "weighted_bce",
]

# Weights of the per-attribute terms L_d and L_s relative to the sum terms L_dsum and L_ssum (authors' values).
DIFFER_WEIGHT = 10.0
SIMILAR_WEIGHT = 10.0

# Offsets inside lambda = 0.5 ln(a / b) (authors' values); they keep a and b positive when N_e = 0 or N_e = M.
_A_OFFSET = 0.004
_B_OFFSET = 0.001


def _check_float(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def metric_distillation(d: torch.Tensor, d_hat: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean absolute difference between the target distance and the decomposed distance, beyond a relative margin.

    Args:
        d: Target distances, e.g. [P] over the pairs i != j of a batch (detached here: the target is frozen).
        d_hat: Decomposed distances of the same pairs, same shape as ``d``.
        margin: Relative error left free, e.g. 0.01: a pair within 1 % of d adds nothing (0: plain L1).

    Returns:
        Scalar loss mean max(|d - d_hat| - margin d, 0).

    Raises:
        ValueError: If the shapes differ, there is no pair, or ``d_hat`` is not floating-point.
    """
    if d.shape != d_hat.shape:
        raise ValueError(f"d and d_hat must have the same shape, got d {tuple(d.shape)} and d_hat {tuple(d_hat.shape)}")
    if d_hat.numel() == 0:
        raise ValueError("metric_distillation needs at least one pair, got empty d and d_hat")
    _check_float(d_hat, "d_hat")
    d = d.detach()
    error = (d - d_hat).abs()
    return (nnf.relu(error - margin * d) if margin > 0 else error).mean()


def attribute_prior_terms(
    shares: torch.Tensor, differ: torch.Tensor, known: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The four attribute-prior terms of each pair (docs/architecture.md §3).

    With N_e = sum_k e_k and r = sqrt(N_e / M): the differing attributes should take at least a share r of the
    distance (``dsum``) and each at least lambda_d r / N_e (``d``); the common attributes at most 1 - r together
    (``ssum``) and each at most lambda_s (1 - r) / (M - N_e) (``s``).

    Args:
        shares: Distance shares p [P, M] (rows sum to 1, entries >= 0).
        differ: Identity-attribute differences e [P, M], 1 where the two persons differ on attribute k (bool or
            0/1 of any numeric dtype).
        known: Optional [P, M] mask (bool or 0/1), 1 where both persons' attribute k is known. An unknown attribute
            neither differs nor agrees: it is left out of e and 1 - e, and M becomes the pair's number of known
            attributes. ``None``: all known.

    Returns:
        Per-pair tensors [P] under the keys ``"dsum"``, ``"d"``, ``"ssum"`` and ``"s"``. ``d`` is 0 for a pair
        without differing attribute and ``s`` is 0 for a pair without common attribute (all four are 0 for a pair
        without known attribute).

    Raises:
        ValueError: If ``shares`` is not a floating-point [P, M] tensor or ``differ`` / ``known`` do not have its
            shape.
    """
    if shares.ndim != 2 or shares.shape[1] == 0:
        raise ValueError(f"shares must have shape [P, M] with M >= 1, got {tuple(shares.shape)}")
    if differ.shape != shares.shape:
        raise ValueError(f"differ must have the shape of shares {tuple(shares.shape)}, got {tuple(differ.shape)}")
    if known is not None and known.shape != shares.shape:
        raise ValueError(f"known must have the shape of shares {tuple(shares.shape)}, got {tuple(known.shape)}")
    _check_float(shares, "shares")
    e = differ.to(shares.dtype)
    if known is None:
        m: float | torch.Tensor = shares.shape[1]
        c = 1.0 - e
    else:
        mask = known.to(shares.dtype)
        e, c = e * mask, (1.0 - e) * mask
        m = mask.sum(1).clamp_min(1.0)  # a pair without known attribute has N_e = 0 and all terms 0
    n_e = e.sum(1)
    r = torch.sqrt(n_e / m)
    dsum = nnf.relu(r - (e * shares).sum(1))
    ssum = nnf.relu((c * shares).sum(1) - (1.0 - r))
    # lambda with N_e clamped below M as the authors do: at N_e = M it would be set by the offsets alone.
    n_lam = n_e.clamp(max=m - 0.1)
    r_lam = torch.sqrt(n_lam / m)
    a = (m - n_lam) * r_lam + _A_OFFSET
    b = n_lam * (1.0 - r_lam) + _B_OFFSET
    lam = 0.5 * torch.log(a / b)
    # A pair with N_e = 0 (or N_e = M) has no entry where the mask e (or 1 - e) is set, so its term is 0 whatever
    # the denominator; a safe one of 1 keeps the value and the gradient finite.
    n_c = m - n_e
    per_differ = torch.exp(-lam) * r / torch.where(n_e > 0, n_e, torch.ones_like(n_e))
    per_common = torch.exp(lam) * (1.0 - r) / torch.where(n_c > 0, n_c, torch.ones_like(n_c))
    d = (e * nnf.relu(per_differ[:, None] - shares)).sum(1)
    s = (c * nnf.relu(shares - per_common[:, None])).sum(1)
    return {"dsum": dsum, "d": d, "ssum": ssum, "s": s}


def attribute_prior(shares: torch.Tensor, differ: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Attribute-prior loss: mean over pairs of L_dsum + 10 L_d + L_ssum + 10 L_s (docs/architecture.md §3).

    Args:
        shares: Distance shares p [P, M] (rows sum to 1, entries >= 0).
        differ: Identity-attribute differences e [P, M] (1 = the two persons differ on attribute k).
        known: Optional [P, M] mask of the attributes known for both persons (see :func:`attribute_prior_terms`).

    Returns:
        Scalar loss.

    Raises:
        ValueError: On the shape and dtype errors of :func:`attribute_prior_terms`, or if there is no pair.
    """
    if shares.ndim == 2 and shares.shape[0] == 0:
        raise ValueError("attribute_prior needs at least one pair, got shares of shape (0, M)")
    t = attribute_prior_terms(shares, differ, known)
    return (t["dsum"] + DIFFER_WEIGHT * t["d"] + t["ssum"] + SIMILAR_WEIGHT * t["s"]).mean()


def colour_prior(shares: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor,
                 groups: list[torch.Tensor], threshold: float = 0.3) -> torch.Tensor:
    """The authors' colour-group term: a colour that neither person wears takes little of the distance.

    Within each group of mutually exclusive colours (e.g. the upper-body colours), the share of a colour that both
    persons lack should stay below ``threshold`` times the mean share of the group's other colours (those that one
    of them wears): of "black shirt vs blue shirt", the black and blue maps should explain, not the red one.

    Args:
        shares: Distance shares p [P, M].
        labels_a: Attribute labels of each pair's first image [P, M] (0/1).
        labels_b: Of the second image [P, M].
        groups: Column indices of each colour group.
        threshold: The authors' bound (0.3).

    Returns:
        Scalar loss, summed over groups and colours, averaged over pairs (0 without groups).

    Raises:
        ValueError: If the shapes differ.
    """
    if labels_a.shape != shares.shape or labels_b.shape != shares.shape:
        raise ValueError(f"labels must have the shape of shares {tuple(shares.shape)}, got "
                         f"{tuple(labels_a.shape)} and {tuple(labels_b.shape)}")
    loss = shares.new_zeros(())
    for cols in groups:
        p = shares[:, cols]
        neither = ((labels_a[:, cols] == 0) & (labels_b[:, cols] == 0)).to(p.dtype)
        worn_mean = ((1.0 - neither) * p).sum(1) / (1.0 - neither).sum(1).clamp(min=1.0)
        loss = loss + nnf.relu(neither * p - threshold * worn_mean[:, None]).sum(1).mean()
    return loss


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, positive_ratio: torch.Tensor) -> torch.Tensor:
    """Attribute classification loss: sigmoid BCE weighted against the class imbalance of each attribute.

    Positives of attribute k are weighted exp(1 - ratio_k), negatives exp(ratio_k), so the rarer value of an
    attribute weighs more. Unknown labels (-1) are left out.

    Args:
        logits: Attribute logits [B, M].
        labels: Attribute labels [B, M] in {0, 1}, or -1 where unknown (bool or any numeric dtype).
        positive_ratio: Positive rate ratio_k of each attribute over the training identities [M], in [0, 1]
            (see :func:`positive_ratio`).

    Returns:
        Scalar loss, the mean of the weighted BCE over the known entries (0 when there is none).

    Raises:
        ValueError: If the shapes do not agree, are empty, or ``logits`` is not floating-point.
    """
    if logits.ndim != 2 or logits.numel() == 0:
        raise ValueError(f"logits must have shape [B, M] with B, M >= 1, got {tuple(logits.shape)}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels must have the shape of logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if positive_ratio.shape != logits.shape[1:]:
        raise ValueError(f"positive_ratio must have shape [M] = {tuple(logits.shape[1:])}, "
                         f"got {tuple(positive_ratio.shape)}")
    _check_float(logits, "logits")
    y = labels.to(logits.dtype)
    mask = (y >= 0).to(logits.dtype)
    y = y.clamp_min(0.0)
    ratio = positive_ratio.to(device=logits.device, dtype=logits.dtype)
    weight = mask * (y * torch.exp(1.0 - ratio) + (1.0 - y) * torch.exp(ratio))
    loss = weight * nnf.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return loss.sum() / mask.sum().clamp_min(1.0)


def positive_ratio(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Positive rate of each attribute, the ``ratio`` of :func:`weighted_bce`.

    Args:
        labels: Attribute labels [N_ids, M] in {0, 1}, or -1 where unknown, one row per training identity.

    Returns:
        float32 tensor [M] (on the device of ``labels`` if it is a tensor): positives over known labels.

    Raises:
        ValueError: If ``labels`` is not 2-D, is empty, holds a value other than 0, 1 and -1 (e.g. Market's raw
            1/2 coding), or an attribute has no known label.
    """
    t = torch.as_tensor(labels)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"labels must have shape [N_ids, M] with N_ids, M >= 1, got {tuple(t.shape)}")
    t = t.to(torch.float32)
    if not ((t == 0) | (t == 1) | (t == -1)).all():
        raise ValueError("labels must hold only 0, 1 and -1 for unknown (convert 1/2-coded attributes first)")
    count = (t >= 0).sum(0)
    if not bool(count.all()):
        raise ValueError(f"attribute(s) {torch.nonzero(count == 0).flatten().tolist()} have no known label")
    return (t == 1).sum(0) / count
