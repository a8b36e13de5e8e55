"""Evaluation of an interpreter: every metric of docs/architecture.md §8.

Target retrieval with d and interpreter retrieval with d̂ (Market protocol), X-mAP_e / X-mAP_c on cross-identity
query–gallery pairs, ADRE, attribute accuracy, the authors' all-pairs protocol, and on synthetic data the
counterfactual faithfulness and AAM localisation on the ``counterfactual/`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attrimeter.data.formats import DISTRACTOR_PID, ReIDDataset, Sample, load_dataset
from attrimeter.data.truth import read_counterfactual_pairs
from attrimeter.engine.evaluation import RankMetrics, evaluate_rank
from attrimeter.engine.explanation_metrics import (
    PaperAccumulator,
    aam_localisation,
    adre,
    attribute_accuracy,
    counterfactual_scores,
    counterfactual_shares,
    share_concentration,
    x_map_c,
    x_map_e,
)
from attrimeter.engine.feature_cache import FeatureCache, cache_features, interpreter_embeddings
from attrimeter.engine.interpreter_checkpoint import load_interpreter
from attrimeter.engine.runs import resolve_device
from attrimeter.kernels.attr_distance import attr_distance_reference, explain_topk_reference
from attrimeter.models.interpreter import AttriMeter

__all__ = ["EvaluationCache", "evaluate_checkpoint", "evaluate_interpreter", "evaluation_cache"]


def _d_hat_rows(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    return attr_distance_reference(torch.from_numpy(q), torch.from_numpy(g)).d_hat.numpy()


def _explain_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d [P], d_hat [P], shares [P, M]) of row-aligned pairs, by direct differences."""
    ids = torch.arange(len(b))[:, None]
    res = explain_topk_reference(torch.from_numpy(a), torch.from_numpy(b), ids)
    return res.d[:, 0].numpy(), res.d_hat[:, 0].numpy(), res.shares[:, 0].numpy()


def _pair_sample(q_pids: np.ndarray, g_pids: np.ndarray, per_query: int, seed: int) -> np.ndarray:
    """Up to ``per_query`` random gallery ids of another (non-distractor) identity per query, ``[Q, k]``."""
    rng = np.random.default_rng(seed)
    annotated = g_pids > DISTRACTOR_PID
    counts = [int((annotated & (g_pids != p)).sum()) for p in q_pids]
    k = min(per_query, min(counts))
    if k < 1:
        raise ValueError("no cross-identity query/gallery pair with attributes to evaluate explanations on")
    return np.stack([rng.choice(np.flatnonzero(annotated & (g_pids != p)), k, replace=False) for p in q_pids])


@dataclass
class EvaluationCache:
    """Frozen-stage features of the evaluation images, shared by every interpreter on the same target and split.

    Attributes:
        query: Query images.
        gallery: Gallery images.
        counterfactual: ``(images a, images b, changed [P, M] bool)`` of the synthetic counterfactual pairs, or
            ``None`` for a data set without them.
    """

    query: FeatureCache
    gallery: FeatureCache
    counterfactual: tuple[FeatureCache, FeatureCache, np.ndarray] | None


def evaluation_cache(
    model: AttriMeter, data: ReIDDataset, image_size: tuple[int, int], batch_size: int = 128, progress: bool = True
) -> EvaluationCache:
    """Cache the frozen part over a data set's query, gallery and (when present) counterfactual images.

    Args:
        model: Any interpreter grafted at the split the cache is for.
        data: The data set.
        image_size: ``(height, width)``.
        batch_size: Images per forward pass.
        progress: Show progress bars.

    Returns:
        The cache.
    """
    query = cache_features(model, data.query, image_size, batch_size, progress=progress, desc="cache query")
    gallery = cache_features(model, data.gallery, image_size, batch_size, progress=progress, desc="cache gallery")
    counterfactual = _counterfactual_images(data)
    if counterfactual is not None:
        a, b, changed = counterfactual
        counterfactual = (cache_features(model, a, image_size, batch_size, progress=progress, desc="cache cf a"),
                          cache_features(model, b, image_size, batch_size, progress=progress, desc="cache cf b"),
                          changed)
    return EvaluationCache(query, gallery, counterfactual)


def _counterfactual_images(data: ReIDDataset) -> tuple[list[Path], list[Path], np.ndarray] | None:
    """``(images a, images b, changed)`` of a synthetic data set's counterfactual pairs; None for other data."""
    if not (data.root / "counterfactual" / "pairs.csv").is_file():
        return None
    a, b, changed, _ = read_counterfactual_pairs(data.root, list(data.schema.names))
    return a, b, changed


def _rank_dict(metrics: RankMetrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.as_dict().items() if k in ("mAP", "rank1", "rank5", "rank10")}


def evaluate_interpreter(
    model: AttriMeter,
    data: ReIDDataset,
    image_size: tuple[int, int],
    cache: EvaluationCache | None = None,
    pairs_per_query: int = 64,
    batch_size: int = 128,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of docs/architecture.md §8 for one interpreter.

    X-mAP is measured on ``pairs_per_query`` random cross-identity gallery items per query (distractors have no
    attributes and are left out), which bounds the cost on large galleries; ADRE on the same pairs plus every
    same-identity query–gallery pair; attribute accuracy on every query and gallery image of an annotated identity;
    counterfactual top-1 counts a pair as explained when the
    attribute with the largest share is one whose label the change flipped (a colour change flips two), and MRR
    takes the best-ranked of them.

    Args:
        model: The interpreter.
        data: The data set (query, gallery, attributes; counterfactual pairs when it is synthetic).
        image_size: ``(height, width)``.
        cache: :func:`evaluation_cache` to reuse across interpreters on the same target and split; when ``None``
            the images are embedded batch by batch and only their embeddings are kept (real data sets).
        pairs_per_query: Cross-identity gallery items drawn per query for X-mAP and ADRE.
        batch_size: Images per forward pass.
        progress: Show progress bars.
        seed: Seed of the pair sample.

    Returns:
        ``{"target": {mAP, rank1, rank5, rank10}, "interpreter": {mAP, rank1, rank5, rank10 (retrieval with d̂),
        x_map_e, x_map_c, adre, attr_acc, max_share, share_entropy, cf_top1, cf_mrr, cf_share, cf_lift,
        prior_met}, "paper": {x_map_e, x_map_c, adre, pairs}, "localisation": {pointing, mass, tolerance_px},
        "pointing_by_attribute": {name: fraction}, "mass_by_attribute": {name: fraction}}``: fractions in [0, 1],
        ``adre`` in percent; the counterfactual and localisation metrics only when the data set has
        ``counterfactual/pairs.csv`` (synthetic data). ``paper`` is the authors' protocol over every query x
        gallery pair (see :func:`~attrimeter.engine.explanation_metrics.paper_average_precisions`).

    Raises:
        ValueError: If a query or gallery identity lacks attributes, or no cross-identity pair exists.
    """
    q_pids, g_pids = np.array([s.pid for s in data.query]), np.array([s.pid for s in data.gallery])
    q_cams, g_cams = np.array([s.camid for s in data.query]), np.array([s.camid for s in data.gallery])
    annotated = g_pids > DISTRACTOR_PID
    missing = sorted({int(p) for p in (*q_pids, *g_pids[annotated])} - set(data.attributes))
    if missing:  # checked before minutes of embedding, not after
        raise ValueError(f"{data.attribute_file or data.root}: no attributes for {len(missing)} query/gallery "
                         f"identities, e.g. {missing[:5]}")
    # Cached frozen features, or (no cache) the image files themselves, embedded batch by batch.
    if cache is None:
        query, gallery, counterfactual = data.query, data.gallery, _counterfactual_images(data)
    else:
        query, gallery, counterfactual = cache.query, cache.gallery, cache.counterfactual

    def embed(images: FeatureCache | list[Sample] | list[Path], desc: str) -> tuple[np.ndarray, np.ndarray]:
        return interpreter_embeddings(model, images, image_size, batch_size, progress, desc)

    q, q_logits = embed(query, "embed query")
    g, g_logits = embed(gallery, "embed gallery")
    target = evaluate_rank(q[:, 0], g[:, 0], q_pids, g_pids, q_cams, g_cams)
    interp = evaluate_rank(q, g, q_pids, g_pids, q_cams, g_cams, distance=_d_hat_rows, chunk_size=64)

    # Explanations on random cross-identity pairs; ADRE also on every same-identity pair (small d, where a
    # relative error shows first).
    ids = _pair_sample(q_pids, g_pids, pairs_per_query, seed)
    q_attrs = np.stack([data.attributes[p] for p in q_pids])
    d, d_hat, shares, differ, known = [], [], [], [], []
    for s in range(0, len(q), 64):
        chunk = ids[s:s + 64]
        k = chunk.shape[1]
        dd, dh, sh = _explain_pairs(np.repeat(q[s:s + 64], k, axis=0), g[chunk.reshape(-1)])
        d.append(dd)
        d_hat.append(dh)
        shares.append(sh)
        mine = np.repeat(q_attrs[s:s + 64], k, axis=0)
        other = np.stack([data.attributes[p] for p in g_pids[chunk.reshape(-1)]])
        differ.append(mine != other)
        known.append((mine >= 0) & (other >= 0))  # an unknown label (-1) neither differs nor agrees
    qi, gi = np.nonzero(q_pids[:, None] == g_pids[None, :])
    if len(qi):
        dd, dh, _ = _explain_pairs(q[qi], g[gi])
        d.append(dd)
        d_hat.append(dh)
    shares_all, differ_all, known_all = np.concatenate(shares), np.concatenate(differ), np.concatenate(known)
    max_share, entropy = share_concentration(shares_all)

    logits = np.concatenate([q_logits, g_logits[annotated]])
    labels = np.concatenate([q_attrs, np.stack([data.attributes[p] for p in g_pids[annotated]])])
    acc, _ = attribute_accuracy(logits, labels)
    result: dict[str, Any] = {
        "target": _rank_dict(target),
        "interpreter": {
            **_rank_dict(interp),
            "x_map_e": x_map_e(shares_all, differ_all, known_all),
            "x_map_c": x_map_c(shares_all, differ_all, known_all),
            "adre": adre(np.concatenate(d), np.concatenate(d_hat)),
            "attr_acc": acc,
            "max_share": max_share,
            "share_entropy": entropy,
        },
        "paper": _paper_protocol(q, g, q_attrs, g_pids, data.attributes),
    }
    if counterfactual is not None:
        a, b, changed = counterfactual
        emb_a, _, aam_a = interpreter_embeddings(model, a, image_size, batch_size, progress, "embed cf a", maps=True)
        emb_b, _, aam_b = interpreter_embeddings(model, b, image_size, batch_size, progress, "embed cf b", maps=True)
        cf_shares = _explain_pairs(emb_a, emb_b)[2]
        top1, mrr = counterfactual_scores(cf_shares, changed)
        result["interpreter"].update(cf_top1=top1, cf_mrr=mrr, **counterfactual_shares(cf_shares, changed))
        result.update(_localisation(data, np.stack([aam_a, aam_b], axis=1).reshape(-1, *aam_a.shape[1:]), image_size))
    return result


def _paper_protocol(q: np.ndarray, g: np.ndarray, q_attrs: np.ndarray, g_pids: np.ndarray,
                    attributes: dict[int, np.ndarray], chunk: int = 32) -> dict[str, float]:
    """The authors' X-mAP_e / X-mAP_c / ADRE over every query x annotated gallery pair (same identity included)."""
    annotated = np.flatnonzero(g_pids > DISTRACTOR_PID)
    g_attrs = np.stack([attributes[p] for p in g_pids[annotated]])
    gallery = torch.from_numpy(g[annotated])
    acc = PaperAccumulator()
    for s in range(0, len(q), chunk):
        res = attr_distance_reference(torch.from_numpy(q[s:s + chunk]), gallery)
        m = res.shares.shape[-1]
        qa, ga = q_attrs[s:s + chunk, None, :], g_attrs[None, :, :]
        differ, known = qa != ga, (qa >= 0) & (ga >= 0)
        acc.add(res.shares.reshape(-1, m).numpy(), differ.reshape(-1, m), res.d.reshape(-1).numpy(),
                res.d_hat.reshape(-1).numpy(), known.reshape(-1, m))
    return acc.result()


def _localisation(data: ReIDDataset, aam: np.ndarray, image_size: tuple[int, int]) -> dict[str, dict[str, float]]:
    """AAM pointing game and mass inside the ground-truth masks on the counterfactual images: means, per attribute."""
    from attrimeter.data.truth import counterfactual_masks

    names = list(data.schema.names)
    # Half a feature-map cell: the maps' own resolution.
    tolerance = 0.5 * image_size[0] / aam.shape[-2]
    pointing, mass = aam_localisation(aam, counterfactual_masks(data.root, names, image_size), tolerance)
    scored = [k for k in range(len(names)) if not np.isnan(pointing[:, k]).all()]
    per_pointing = {names[k]: float(np.nanmean(pointing[:, k])) for k in scored}
    per_mass = {names[k]: float(np.nanmean(mass[:, k])) for k in scored}
    return {"localisation": {"pointing": float(np.mean(list(per_pointing.values()))),
                             "mass": float(np.mean(list(per_mass.values()))), "tolerance_px": tolerance},
            "pointing_by_attribute": per_pointing, "mass_by_attribute": per_mass}


def evaluate_checkpoint(
    checkpoint: str | Path, data_root: str | Path, batch_size: int = 128, progress: bool = True, device: str = "auto",
    strict_attributes: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate_interpreter` of an ``interpreter.pt`` on a data folder.

    Args:
        checkpoint: The interpreter checkpoint.
        data_root: A data folder with attributes (synthetic folders add the counterfactual metrics).
        batch_size: Images per forward pass.
        progress: Show progress bars.
        device: ``auto`` (the first CUDA GPU if there is one), ``cpu`` or ``cuda[:N]``.
        strict_attributes: Refuse an attribute file with codes other than 1 and 2 (by default such entries are
            unknown and left out of the explanation metrics).

    Returns:
        The metrics (see :func:`evaluate_interpreter`).

    Raises:
        ValueError: If the data set's schema is not the one the interpreter was trained on.
    """
    ck = load_interpreter(checkpoint, resolve_device(device))
    data = load_dataset(data_root, strict_attributes=strict_attributes)
    if data.schema.name != ck.meta["schema"] or list(data.schema.names) != ck.attribute_names:
        raise ValueError(f"{data_root} uses schema {data.schema.name!r}, the interpreter explains "
                         f"{ck.meta['schema']!r}")
    return evaluate_interpreter(ck.model, data, ck.image_size, batch_size=batch_size, progress=progress)
