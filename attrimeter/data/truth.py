"""Ground truth that only a synthetic data set has: its counterfactual pairs and where each attribute is drawn.

``attrimeter synth`` records, for every counterfactual pair, the identity's
:class:`~attrimeter.data.synth_params.Person` and the pair's :class:`~attrimeter.data.synth_params.View` in
``synth.json``; with :func:`~attrimeter.data.synth_params.change_attribute` both images re-render exactly, and
:func:`~attrimeter.data.synth_render.attribute_mask` gives each attribute's pixels. The AAM localisation metrics
(:func:`attrimeter.engine.explanation_metrics.aam_localisation`) compare the attention maps with these masks;
:func:`read_counterfactual_pairs` reads the pairs themselves for the counterfactual faithfulness metrics.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

__all__ = ["counterfactual_masks", "read_counterfactual_pairs"]


def counterfactual_masks(root: str | Path, names: list[str], size: tuple[int, int]) -> np.ndarray:
    """Where each attribute is visible in the counterfactual images, in ``pairs.csv`` order (a then b per pair).

    An attribute is visible where the parts it is drawn in are (:data:`~attrimeter.data.synth_render.ATTRIBUTE_PARTS`),
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
    from attrimeter.data.synth_params import COLOUR_ATTRIBUTES, Person, View, change_attribute
    from attrimeter.data.synth_render import attribute_mask, render_parts

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
    label_index = [MARKET1501.index(n) for n in names]
    masks = np.zeros((2 * len(rows), len(names), *size), dtype=bool)
    for i, (row, view_dict) in enumerate(zip(rows, views, strict=True)):
        person = Person.from_dict(meta["identities"][str(int(row["pid"]))]["person"])
        view = View.from_dict(view_dict)
        for j, who in enumerate((person, change_attribute(person, row["attribute"]))):
            labels = who.labels()
            parts = render_parts(who, view, size)
            for k, name in enumerate(names):
                if name in COLOUR_ATTRIBUTES and not labels[label_index[k]]:
                    continue
                masks[2 * i + j, k] = attribute_mask(who, view, name, size, parts=parts)
    return masks


def read_counterfactual_pairs(data_root: str | Path, schema_names: list[str]) -> tuple[list[Path], list[Path],
                                                                                     np.ndarray, list[str]]:
    """The synthetic ``counterfactual/pairs.csv``.

    Args:
        data_root: Data folder written by ``attrimeter synth``.
        schema_names: The attribute order of the interpreter.

    Returns:
        ``(images a, images b, changed [P, M] bool (every label that differs), the attribute each pair changes)``.

    Raises:
        FileNotFoundError: If the folder has no ``counterfactual/pairs.csv``.
        ValueError: If a row names an unknown attribute or changes nothing.
    """
    root = Path(data_root)
    path = root / "counterfactual" / "pairs.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no counterfactual pairs: {path} does not exist (made by `attrimeter synth`)")
    index = {n: i for i, n in enumerate(schema_names)}
    a, b, changed, named = [], [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"pair", "attribute", "attributes", "image_a", "image_b"}
        if not needed <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: missing columns {sorted(needed - set(reader.fieldnames or ()))}")
        for row in reader:
            names = [n for n in row["attributes"].split(";") if n]
            unknown = [n for n in names if n not in index]
            if unknown or not names or row["attribute"] not in names:
                raise ValueError(f"{path}: pair {row['pair']} changes {names or 'nothing'} "
                                 f"(named {row['attribute']!r}; unknown: {unknown})")
            mask = np.zeros(len(schema_names), dtype=bool)
            mask[[index[n] for n in names]] = True
            a.append(root / row["image_a"])
            b.append(root / row["image_b"])
            changed.append(mask)
            named.append(row["attribute"])
    if not a:
        raise ValueError(f"{path}: no counterfactual pairs listed")
    return a, b, np.stack(changed), named
