"""How long the ``full`` profiles take per epoch here (resnet50 at 256x128, real data: docs/architecture.md §7).

Times the real training loops (``train_target`` and ``train_interpreter`` with ``--profile full``) for a short
wall-clock guard on a synthetic folder read at 256x128, and extrapolates to one epoch of Market-1501 (751 training
identities: 46 PK batches of 16 x 4 images) and to the profiles' epoch counts. The weights are untrained: time per
step does not depend on them. What the full profiles *reach* needs real data and days of CPU (or a GPU): not measured
here. Writes ``<out>.csv`` and ``<out>.md`` stamped with the machine, versions and date.

    python benchmarks/bench_full_profile.py --data runs/demo/data
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import tempfile
import warnings
from pathlib import Path

import torch

from attrimeter import __version__
from attrimeter.config import apply_overrides, resolve
from attrimeter.engine import interpreter_training as interp
from attrimeter.engine.target import PROFILES, TargetTrainConfig, train_target

MARKET_BATCHES_PER_EPOCH = 751 // 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="a synthetic folder (attrimeter synth)")
    parser.add_argument("--minutes", type=float, default=1.5, help="wall-clock guard of each timed loop")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile_full_cpu"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the guard ends both loops early on purpose
        tcfg = apply_overrides(resolve(TargetTrainConfig(), PROFILES, "full"), {"max_minutes": args.minutes}, "bench")
        tlog = train_target(args.data, Path(tmp) / "target", tcfg, evaluate=False)
        icfg = apply_overrides(resolve(interp.InterpreterTrainConfig(), interp.PROFILES, "full"),
                               {"max_minutes": args.minutes}, "bench")
        ilog = interp.train_interpreter(args.data, Path(tmp) / "target" / "target.pt", Path(tmp) / "interp", icfg)
    for name, log, cfg in (("target (resnet50, 256x128)", tlog, tcfg), ("interpreter (shared layer2)", ilog, icfg)):
        seconds_per_it = log["train_seconds"] / max(log["iterations"], 1)
        epoch = seconds_per_it * MARKET_BATCHES_PER_EPOCH
        rows.append({"loop": name, "iterations_timed": log["iterations"], "images_per_s": round(
            log["images_per_second"], 2), "s_per_iteration": round(seconds_per_it, 2),
            "market_epoch_min": round(epoch / 60, 1), "profile_epochs": cfg.epochs,
            "profile_hours": round(epoch * cfg.epochs / 3600, 1), "device": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "attrimeter": __version__,
            "date": datetime.date.today().isoformat()})
        print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = ["loop", "iterations_timed", "images_per_s", "s_per_iteration", "market_epoch_min", "profile_epochs",
            "profile_hours"]
    stamp = rows[0]
    lines = [f"`--profile full` on this machine ({stamp['device']}, {stamp['threads']} threads, "
             f"torch {stamp['torch']}, attrimeter {stamp['attrimeter']}, {stamp['date']}): time per step of the real "
             "training loops, "
             f"extrapolated to one Market-1501 epoch ({MARKET_BATCHES_PER_EPOCH} PK batches of 64 images) and to the "
             "profile's epochs. Command: `python benchmarks/bench_full_profile.py --data runs/demo/data`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
