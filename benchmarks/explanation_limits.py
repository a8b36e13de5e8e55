"""What a target lets an interpreter explain: the evidence behind the explanation targets it misses.

Three measurements on one data set and frozen target (no interpreter involved):

1. *Which attributes the target encodes*: a logistic-regression probe per attribute on the target's embedding f
   (train identities -> query images). An attribute at the probe's chance level is one the target barely sees, and
   an interpreter, which may only re-weight the target's own feature map, cannot make it carry the distance.
2. *How local the target's features are*: on the counterfactual pairs (one attribute changed), the fraction of
   ``‖s ⊙ (F_a − F_b)‖²`` (BN-scaled feature-map difference) that falls in the feature-map cells covering the changed
   attribute's pixels, against those cells' share of the map. Attention maps can only separate attributes as far as
   this is above 1x.
3. *How sensitive d_k is to a mask's magnitude*: the norm of the BN-scaled pooled features ``‖s ⊙ GeM(F)‖``
   against typical distances: a mask scaled by (1 + e) on one image moves d_k by about e times that norm.

Writes ``<out>.md`` (and prints it).

    python benchmarks/explanation_limits.py --data runs/demo/data --target runs/demo/target/target.pt
"""

from __future__ import annotations

import argparse
import csv
import datetime
from pathlib import Path

import numpy as np
import torch

from attrimeter.data.formats import load_dataset
from attrimeter.data.truth import counterfactual_masks, read_counterfactual_pairs
from attrimeter.engine.feature_cache import cache_features
from attrimeter.engine.target import load_target
from attrimeter.models.interpreter import AttriMeter


def probe_accuracy(x: torch.Tensor, y: np.ndarray, xq: torch.Tensor, yq: np.ndarray) -> np.ndarray:
    """Per-attribute accuracy of an L2-regularised logistic regression (LBFGS) on standardised features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xq = (x - mu) / sd, (xq - mu) / sd
    target = torch.from_numpy(y).float()
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    optim = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, target) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    optim.step(closure)
    with torch.no_grad():
        return ((xq @ w + b > 0).numpy() == (yq == 1)).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--target", required=True, type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/explanation_limits_cpu"))
    args = parser.parse_args()
    data, ck = load_dataset(args.data), load_target(args.target)
    names = list(data.schema.names)
    model = ck.model.eval()
    grafted = AttriMeter(model, len(names), shared="layer3")
    size = ck.image_size
    with torch.no_grad():
        f_train = model.embed(cache_features(grafted, data.train, size).features)
        f_query = model.embed(cache_features(grafted, data.query, size).features)
    y_train = np.stack([data.attributes[s.pid] for s in data.train])
    y_query = np.stack([data.attributes[s.pid] for s in data.query])
    acc = probe_accuracy(f_train, y_train, f_query, y_query)
    majority = np.maximum((y_query == 1).mean(0), (y_query == 0).mean(0))

    a, b, changed, named = read_counterfactual_pairs(data.root, names)
    feats_a, feats_b = cache_features(grafted, a, size).features, cache_features(grafted, b, size).features
    _, scale, shift = model.head_params()
    energy = ((scale.view(1, -1, 1, 1) * (feats_a - feats_b)) ** 2).sum(1).numpy()  # [P, h, w]
    masks = counterfactual_masks(data.root, names, size)
    h, w = energy.shape[1:]
    cell_h, cell_w = size[0] // h, size[1] // w
    groups: dict[str, list[tuple[float, float]]] = {}
    for i, attr in enumerate(named):
        pixels = (masks[2 * i][changed[i]] | masks[2 * i + 1][changed[i]]).any(0)
        cells = pixels.reshape(h, cell_h, w, cell_w).mean((1, 3)) > 0.1
        group = data.schema.attributes[names.index(attr)].group
        groups.setdefault(group if group.endswith("colour") else attr, []).append(
            (float(energy[i][cells].sum() / energy[i].sum()), float(cells.mean())))
    with torch.no_grad():
        pooled = (f_query - shift).norm(dim=1).median().item()
        cross = torch.cdist(f_query[:300], f_query[300:600]).median().item()
        cf = (model.embed(feats_a) - model.embed(feats_b)).norm(dim=1).median().item()

    lines = [f"Explanation limits of the target `{args.target}` on `{args.data}` ({datetime.date.today().isoformat()}, "
             f"torch {torch.__version__}). Command: `python benchmarks/explanation_limits.py --data {args.data} "
             f"--target {args.target}`.", "",
             "**1. Attributes the target encodes** (logistic probe on the target embedding f, train identities → "
             "query images; majority = always guessing the more frequent value):", "",
             "| attribute | probe accuracy | majority |", "|---|---:|---:|"]
    lines += [f"| {n} | {a_:.2f} | {m_:.2f} |" for n, a_, m_ in zip(names, acc, majority, strict=True)]
    lines += ["", "**2. Locality of the target's feature map** (counterfactual pairs: share of the BN-scaled "
              f"feature-map difference in the {h}x{w} cells covering the changed attribute, against those cells' "
              "share of the map):", "", "| change | pairs | difference energy in its cells | cells' area | lift |",
              "|---|---:|---:|---:|---:|"]
    for name, values in groups.items():
        v = np.array(values)
        lines.append(f"| {name} | {len(v)} | {v[:, 0].mean():.3f} | {v[:, 1].mean():.3f} | "
                     f"{v[:, 0].mean() / v[:, 1].mean():.1f}x |")
    lines += ["", f"**3. Magnitude sensitivity**: median ‖s ⊙ GeM(F)‖ = {pooled:.0f}; median target distance "
              f"between two query images {cross:.1f}, within a counterfactual pair {cf:.1f}: a 1 % change of one "
              f"image's mask magnitude moves d_k by about {pooled / 100:.1f}.", ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["attribute", "probe_accuracy", "majority"])
        writer.writerows([n, round(float(a_), 4), round(float(m_), 4)] for n, a_, m_ in zip(names, acc, majority,
                                                                                            strict=True))
    print(text)


if __name__ == "__main__":
    main()
