"""Throughput of the synthetic pedestrian renderer on one CPU core.

Measures two figures, each over several repeats (other processes share the machine, so the best and the median are
printed): ``render`` (``render_person`` alone, arrays in memory) and ``generate`` (the whole data set writer:
rendering, JPEG encoding, writing files, the .mat and the CSV), in images per second. Writes
``synth_cpu.csv`` and ``synth_cpu.md`` (stamped with CPU, versions and date) under ``--out``.

    python benchmarks/bench_synth.py                    # 128x64, pinned to one core
    python benchmarks/bench_synth.py --size 256x128 --repeats 5 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL

from attrimeter.data.synth import SynthConfig, generate, parse_size
from attrimeter.data.synth_render import render_person
from attrimeter.data.synth_sampling import sample_camera, sample_person, sample_view


def bench_render(size: tuple[int, int], n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    cameras = [sample_camera(rng) for _ in range(6)]
    jobs = [(sample_person(rng), sample_view(rng, cameras[i % 6])) for i in range(n)]
    t0 = time.perf_counter()
    for person, view in jobs:
        render_person(person, view, size)
    return n / (time.perf_counter() - t0)


def bench_generate(config: SynthConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return generate(tmp, config, progress=False).images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=(128, 64), help="image size HxW (default 128x64)")
    parser.add_argument("--ids", type=int, default=100, help="identities of the generated data set (default 100)")
    parser.add_argument("--renders", type=int, default=500, help="images per render repeat (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each measurement (default 3)")
    parser.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"),
                        help="folder for synth_cpu.{csv,md} (default benchmarks/results)")
    args = parser.parse_args()

    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    config = SynthConfig(ids=args.ids, size=args.size)
    print(f"synthetic renderer, {args.size[0]}x{args.size[1]}, {cores} core(s), {args.repeats} repeats")
    render = [bench_render(args.size, args.renders, seed) for seed in range(args.repeats)]
    print(f"render_person : best {max(render):7.1f} images/s, median {statistics.median(render):7.1f}")
    gen = [bench_generate(config) for _ in range(args.repeats)]
    print(f"generate      : best {max(gen):7.1f} images/s, median {statistics.median(gen):7.1f} "
          f"(ids={config.ids}, images_per_id={config.images_per_id}, JPEG q{config.quality}, files written)")

    stamp = {
        "cpu": platform.processor() or platform.machine(),
        "cores": cores,
        "size": f"{args.size[0]}x{args.size[1]}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    rows = [{"measure": name, "median_img_s": round(statistics.median(v), 1), "best_img_s": round(max(v), 1),
             "repeats": len(v), **stamp} for name, v in (("render_person", render), ("generate", gen))]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "synth_cpu.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "# Synthetic renderer throughput",
        "",
        f"{stamp['cpu']}, {cores} core(s), {stamp['size']}; Python {stamp['python']}, numpy {stamp['numpy']}, "
        f"Pillow {stamp['pillow']}; {stamp['date']}. `generate` writes the whole data set (JPEG files, .mat, CSV; "
        f"ids={config.ids}). Command: `python benchmarks/bench_synth.py`.",
        "",
        "| measure | median images/s | best images/s | repeats |",
        "|---|---|---|---|",
        *(f"| {r['measure']} | {r['median_img_s']} | {r['best_img_s']} | {r['repeats']} |" for r in rows),
    ]
    (args.out / "synth_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'synth_cpu.csv'} and {args.out / 'synth_cpu.md'}")


if __name__ == "__main__":
    main()
