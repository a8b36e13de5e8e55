"""Ground truth that only a synthetic data set has: where each attribute is drawn in the counterfactual images.

``attrimeter synth`` records, for every counterfactual pair, the identity's :class:`~attrimeter.data.synth.Person`
and the pair's :class:`~attrimeter.data.synth.View` in ``synth.json``; with
:func:`~attrimeter.data.synth.change_attribute` both images re-render exactly, and
:func:`~attrimeter.data.synth.attribute_mask` gives each attribute's pixels. The AAM localisation metrics
(:func:`attrimeter.engine.explanation_metrics.aam_localisation`) compare the attention maps with these masks.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

__all__ = ["counterfactual_masks"]


def counterfactual_masks(root: str | Path, names: list[str], size: tuple[int, int]) -> np.ndarray:
    """Where each attribute is visible in the counterfactual images, in ``pairs.csv`` order (a then b per pair).

    An attribute is visible where the parts it is drawn in are (:data:`~attrimeter.data.synth.ATTRIBUTE_PARTS`),
    and only when it shows: a carried object, hat or hair when drawn, the clothing colour the garment actually has
    (the other colours of the group have nothing to point at).

    Args:
        root: A folder written by ``attrimeter synth``.
        names: The attribute order (the interpreter's schema).
        size: ``(height, width)`` of the masks (the images' size).

    Returns:
        bool ``[2P, M, height, width]``: rows ``2i`` and ``2i + 1`` are pair i's images a and b.

    Raises:
        FileNotFoundError: If ``synth.json`` or ``counterfactual/pairs.csv`` is missing.
        ValueError: If they do not describe the same pairs.
    """
    from attrimeter.data.schema import MARKET1501
    from attrimeter.data.synth import (
        LOWER_COLOURS,
        UPPER_COLOURS,
        Person,
        View,
        attribute_mask,
        change_attribute,
        render_parts,
    )

    root = Path(root)
    meta_path, pairs_path = root / "synth.json", root / "counterfactual" / "pairs.csv"
    for path in (meta_path, pairs_path):
        if not path.is_file():
            raise FileNotFoundError(f"no ground truth: {path} does not exist (made by `attrimeter synth`)")
    meta = json.loads(meta_path.read_text())
    with open(pairs_path, newline="") as f:
        rows = list(csv.DictReader(f))
    views = meta.get("counterfactual_views", [])
    if len(views) != len(rows):
        raise ValueError(f"{meta_path} records {len(views)} counterfactual views, {pairs_path} lists {len(rows)} pairs")
    colours = {f"up{c}" for c in UPPER_COLOURS} | {f"down{c}" for c in LOWER_COLOURS}
    label_index = [MARKET1501.index(n) for n in names]
    masks = np.zeros((2 * len(rows), len(names), *size), dtype=bool)
    for i, (row, view_dict) in enumerate(zip(rows, views, strict=True)):
        person = Person.from_dict(meta["identities"][str(int(row["pid"]))]["person"])
        view = View.from_dict(view_dict)
        for j, who in enumerate((person, change_attribute(person, row["attribute"]))):
            labels = who.labels()
            parts = render_parts(who, view, size)
            for k, name in enumerate(names):
                if name in colours and not labels[label_index[k]]:
                    continue
                masks[2 * i + j, k] = attribute_mask(who, view, name, size, parts=parts)
    return masks
