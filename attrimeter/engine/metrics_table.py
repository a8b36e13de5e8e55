"""Markdown tables of interpreter evaluations (the demo's ``metrics.md``, ``attrimeter evaluate --markdown``)."""

from __future__ import annotations

from typing import Any

__all__ = ["metrics_markdown"]

_TABLE_ROWS = (
    ("target", "mAP", "target mAP (d)"), ("target", "rank1", "target rank-1 (d)"),
    ("interpreter", "mAP", "interpreter mAP (d̂)"), ("interpreter", "rank1", "interpreter rank-1 (d̂)"),
    ("interpreter", "adre", "ADRE (%)"), ("interpreter", "x_map_e", "X-mAP_e"), ("interpreter", "x_map_c", "X-mAP_c"),
    ("interpreter", "cf_top1", "counterfactual top-1"), ("interpreter", "cf_mrr", "counterfactual MRR"),
    ("interpreter", "cf_share", "counterfactual: changed attributes' share"),
    ("interpreter", "cf_lift", "counterfactual: share over uniform"),
    ("interpreter", "prior_met", "counterfactual: prior target met"),
    ("interpreter", "max_share", "cross-identity: largest share"),
    ("interpreter", "share_entropy", "cross-identity: share entropy / ln M"),
    ("localisation", "pointing", "AAM pointing game"), ("localisation", "mass", "AAM mass inside the mask"),
    ("paper", "x_map_e", "X-mAP_e (paper protocol)"), ("paper", "x_map_c", "X-mAP_c (paper protocol)"),
    ("paper", "adre", "ADRE (%) (paper protocol)"),
    ("interpreter", "attr_acc", "attribute accuracy"),
)


def metrics_markdown(runs: dict[str, dict[str, Any]]) -> str:
    """A markdown table of one or more evaluations side by side (e.g. the full model and its ablations).

    Args:
        runs: Column title -> :func:`~attrimeter.engine.interpreter_evaluation.evaluate_interpreter`
            result.

    Returns:
        The table (one row per metric present in the first run).
    """
    names = list(runs)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    first = runs[names[0]]
    for group, key, title in _TABLE_ROWS:
        if key not in first.get(group, {}):
            continue
        cells = []
        for name in names:
            v = runs[name].get(group, {}).get(key)
            cells.append("–" if v is None else f"{v:.2f}" if key in ("adre", "cf_lift") else f"{v:.4f}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
