"""Interpreter settings side by side on one data set and one frozen target (the evidence behind the quick profile).

Every run trains an interpreter with the quick profile plus its overrides, on the same cached frozen features, then
evaluates it on the same cached evaluation images. Writes ``<out>.csv`` and ``<out>.md`` stamped with the device,
versions and date.

    python benchmarks/interpreter_sweep.py --data runs/demo/data --target runs/demo/target/target.pt \
        --run "quick:" --run "probe:classifier=probe" --run "no ramp:distill_ramp=0"
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch

from attrimeter import __version__
from attrimeter.config import apply_overrides, parse_assignments, resolve
from attrimeter.data.formats import load_dataset
from attrimeter.engine.feature_cache import cache_features
from attrimeter.engine.interpreter_checkpoint import load_interpreter
from attrimeter.engine.interpreter_evaluation import evaluate_interpreter, evaluation_cache
from attrimeter.engine.interpreter_training import PROFILES, InterpreterTrainConfig, train_interpreter
from attrimeter.engine.target import load_target
from attrimeter.models.interpreter import AttriMeter

COLUMNS = ("mAP", "rank1", "adre", "x_map_e", "x_map_c", "cf_top1", "cf_mrr", "cf_share", "cf_lift", "prior_met",
           "max_share", "share_entropy", "attr_acc")
# (group, key) of the nested metrics, as column names.
NESTED = {"pointing": ("localisation", "pointing"), "mass": ("localisation", "mass"),
          "paper_x_map_e": ("paper", "x_map_e"), "paper_x_map_c": ("paper", "x_map_c"), "paper_adre": ("paper", "adre")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--target", required=True, type=Path)
    parser.add_argument("--run", action="append", required=True, metavar="NAME:K=V,K=V",
                        help="a named run and its overrides of the quick profile (comma-separated)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/interpreter_quick_cpu"))
    args = parser.parse_args()

    data = load_dataset(args.data)
    target = load_target(args.target)
    base = resolve(InterpreterTrainConfig(), PROFILES, "quick")
    runs = []
    for spec in args.run:
        name, _, assignments = spec.partition(":")
        overrides = parse_assignments([a for a in assignments.split(",") if a])
        runs.append((name, overrides, apply_overrides(base, overrides, source=name)))
    caches = {}
    for shared, flip in sorted({(cfg.shared, cfg.flip > 0) for _, _, cfg in runs}):
        grafted = AttriMeter(target.model, len(data.schema), shared=shared)
        caches[shared, flip] = (
            cache_features(grafted, data.train, target.image_size, flip=flip, desc="cache train"),
            evaluation_cache(grafted, data, target.image_size))
    stamp = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "attrimeter": __version__,
             "date": datetime.date.today().isoformat()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, cfg in runs:
            t0 = time.perf_counter()
            train_cache, eval_cache = caches[cfg.shared, cfg.flip > 0]
            log = train_interpreter(args.data, args.target, Path(tmp) / name, cfg, cache=train_cache)
            trained = load_interpreter(Path(tmp) / name / "interpreter.pt")
            metrics = evaluate_interpreter(trained.model, data, target.image_size, cache=eval_cache)
            rows.append({"run": name, "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()) or "–",
                         "iterations": log["iterations"], "train_s": round(log["train_seconds"], 1),
                         "target_mAP": round(metrics["target"]["mAP"], 4),
                         **{k: round(metrics["interpreter"][k], 4) for k in COLUMNS},
                         **{k: round(metrics[g][m], 4) for k, (g, m) in NESTED.items()}, **stamp})
            print(rows[-1], f"({time.perf_counter() - t0:.0f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = ["run", "overrides", "iterations", "target_mAP", *COLUMNS, *NESTED]
    lines = [f"Interpreter settings on `{args.data}` with the frozen target `{args.target}` "
             f"({stamp['device']}, {stamp['threads']} threads, torch {stamp['torch']}, attrimeter "
             f"{stamp['attrimeter']}, {stamp['date']}). mAP / rank1: retrieval with d̂; adre in percent.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
