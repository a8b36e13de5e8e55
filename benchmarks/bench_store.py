"""The gallery store on this machine: append latency against the number of segments, and the resident memory of a
process that searches and reads hit rows.

* append: a gallery that a server fills one image at a time (one entry, so one segment, per append; 256-wide
  embeddings, 26 attributes, 16×8 activation maps), timed at ``--segments`` published segments (``--timed`` appends
  each, after filling up to that count untimed; merging small segments off), and how long opening it takes at the
  largest count; where the store merges small segments as it appends (``auto_compact``), also the mean cost of as many
  one-entry appends with the default merging, and the segments left;
* rss: a gallery of ``--entries`` entries in four segments, opened read-only in a child process, which runs
  ``--searches`` varied searches (k = 10) and reads every hit's embedding, attribute rows, probabilities, activation
  maps and metadata (what an explained search reads); VmRSS after the index is built and after 100 and all searches.
  The note holds a digest of everything read, so runs of two versions show whether they return the same results.

Rows are merged into ``store_cpu.{csv,md}`` under ``--out`` by ``--label`` (e.g. ``before`` / ``after`` a change), so
one file compares versions measured on the same machine.

    python benchmarks/bench_store.py --label after
    git checkout f4db7f6 -- runtime/ && python benchmarks/bench_store.py --label before --runtime-from f4db7f6 \
        ; git checkout HEAD -- runtime/
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from run_stamp import ROOT, cpu_name, git_commit, utc_now

from attrimeter.runtime.gallery import Gallery

DIM, ATTRS, AAM = 256, tuple(f"a{i}" for i in range(26)), (16, 8)
KEYS = ["label", "benchmark", "setting", "value", "unit", "p90_ms", "note", "commit", "machine", "numpy", "faiss",
        "python", "date", "command"]


def _batch(rng: np.random.Generator, n: int, first: int) -> dict:
    m = len(ATTRS)
    return {"embedding": rng.standard_normal((n, DIM)).astype(np.float32),
            "attr_embeddings": rng.standard_normal((n, m, DIM)).astype(np.float32),
            "probs": rng.random((n, m)).astype(np.float32),
            "meta": [{"key": f"k{first + i}", "camera": (first + i) % 6} for i in range(n)],
            "aam": rng.random((n, m, *AAM)).astype(np.float32)}


def _options() -> dict:
    """Merging small segments (auto_compact, a store with a journal) would stop the count this measures from
    growing; older stores do not have the option."""
    return {"auto_compact": None} if "auto_compact" in inspect.signature(Gallery.create).parameters else {}


def append_rows(work: Path, targets: list[int], timed: int) -> list[dict]:
    """Append latency (one-entry segments) at each number of segments in ``targets``."""
    rng = np.random.default_rng(0)
    rows = []
    with Gallery.create(work / "appends", dim=DIM, attributes=ATTRS, aam_shape=AAM, model="bench", **_options()) as g:
        for target in targets:
            while g.segments < target:
                g.append(**_batch(rng, 1, len(g)))
            times, written = [], []
            for _ in range(timed):
                batch = _batch(rng, 1, len(g))
                before = _listing_files(g.path)
                t0 = time.perf_counter()
                g.append(**batch)
                times.append(time.perf_counter() - t0)
                written.append(_written(before, _listing_files(g.path)))
            ms = 1000 * np.asarray(times)
            rows.append({"benchmark": "append", "setting": f"1 entry at {target} segments", "value": np.median(ms),
                         "unit": "ms p50", "p90_ms": np.percentile(ms, 90),
                         "note": f"{timed} appends; {np.mean(written):.0f} bytes of gallery.json/journal written each"})
        segments = g.segments
    for writable in (False, True):
        t0 = time.perf_counter()
        Gallery.open(work / "appends", verify=False, writable=writable, progress=False).close()
        rows.append({"benchmark": "open", "setting": f"{'writable' if writable else 'read-only'}, {segments} "
                     "segments, no sha256", "value": 1000 * (time.perf_counter() - t0), "unit": "ms"})
    if _options():
        rows.append(_merging_row(work, max(targets)))
    return rows


def _listing_files(path: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime) of the files that list the segments: gallery.json, and the journal where there is one."""
    out = {}
    for name in ("gallery.json", "gallery.journal"):
        try:
            st = (path / name).stat()
        except FileNotFoundError:
            continue
        out[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _written(before: dict, after: dict) -> int:
    """Bytes an append wrote to those files: a replaced file's whole size, a grown one's growth."""
    total = 0
    for name, (ino, size, mtime) in after.items():
        old = before.get(name)
        if old is None or old[0] != ino:
            total += size
        elif (size, mtime) != old[1:]:
            total += max(size - old[1], 0)
    return total


def _merging_row(work: Path, appends: int) -> dict:
    """One-entry appends with the default auto_compact: mean cost including the merges, and the segments left."""
    rng = np.random.default_rng(3)
    times = []
    with Gallery.create(work / "merging", dim=DIM, attributes=ATTRS, aam_shape=AAM, model="bench") as g:
        for _ in range(appends):
            batch = _batch(rng, 1, len(g))
            t0 = time.perf_counter()
            g.append(**batch)
            times.append(time.perf_counter() - t0)
        segments = g.segments
    ms = 1000 * np.asarray(times)
    return {"benchmark": "append", "setting": f"1 entry, {appends} appends, default auto_compact (merges included)",
            "value": ms.mean(), "unit": "ms mean", "p90_ms": np.percentile(ms, 90),
            "note": f"max {ms.max():.0f} ms; {segments} segments at the end"}


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    return int(status["VmRSS"].split()[0]) / 1024


def rss_child(path: Path, searches: int) -> dict:
    """In a fresh process: RSS while searching and reading hit rows (printed as JSON by ``--rss-child``)."""
    rng = np.random.default_rng(1)
    out = {}
    with Gallery.open(path, verify=False, progress=False) as g:
        g.load_index()
        out["indexed"] = _rss_mib()
        digest, times = hashlib.sha256(), []
        for i in range(searches):
            q = (g.embeddings(rng.integers(len(g), size=1)) + rng.standard_normal((1, DIM)).astype(np.float32))
            t0 = time.perf_counter()
            d, ids = g.search(q, 10)
            flat = ids.ravel()
            rows = [g.embeddings(flat), g.attr_embeddings(flat), g.probs(flat), g.aam(flat)]
            meta = g.meta(flat)
            times.append(time.perf_counter() - t0)
            for a in (d, ids, *rows):
                digest.update(np.ascontiguousarray(a).tobytes())
            digest.update(json.dumps(meta, sort_keys=True).encode())
            if i + 1 == 100:
                out["100"] = _rss_mib()
        out["all"] = _rss_mib()
        out["ms"] = float(np.median(1000 * np.asarray(times)))
        out["p90"] = float(np.percentile(1000 * np.asarray(times), 90))
        out["digest"] = digest.hexdigest()[:16]
    return out


def rss_rows(work: Path, entries: int, searches: int) -> list[dict]:
    rng = np.random.default_rng(2)
    path = work / "rss"
    with Gallery.create(path, dim=DIM, attributes=ATTRS, aam_shape=AAM, model="bench", **_options()) as g:
        for part in np.array_split(np.arange(entries), 4):
            g.append(**_batch(rng, len(part), int(part[0])))
    result = subprocess.run([sys.executable, __file__, "--rss-child", str(path), "--searches", str(searches)],
                            capture_output=True, text=True, check=True)
    r = json.loads(result.stdout)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    what = f"{entries} entries ({size:.0f} MiB on disk)"
    note = f"results digest {r['digest']}"
    return [
        {"benchmark": "rss", "setting": f"read-only open + index, {what}", "value": r["indexed"], "unit": "MiB"},
        {"benchmark": "rss", "setting": f"after 100 searches reading hit rows (k=10), {what}", "value": r["100"],
         "unit": "MiB", "note": note},
        {"benchmark": "rss", "setting": f"after {searches} searches reading hit rows (k=10), {what}",
         "value": r["all"], "unit": "MiB", "note": note},
        {"benchmark": "search", "setting": f"search k=10 + read hit rows, {what}", "value": r["ms"],
         "unit": "ms p50", "p90_ms": r["p90"], "note": note},
    ]


def stamp(runtime_from: str | None) -> dict[str, str]:
    """Commit, machine, versions and date for every row."""
    cpu, commit, root = cpu_name(), git_commit(), ROOT
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "runtime"], capture_output=True,
                           text=True).stdout.strip()
    if runtime_from:
        commit = f"{commit}, runtime/ of {runtime_from}"
    elif dirty:
        commit += "+changes"
    load = os.getloadavg()[0]
    return {"commit": commit, "machine": f"{cpu}, {os.cpu_count()} CPUs shared (load average {load:.1f} at the end)",
            "numpy": np.__version__, "faiss": version("faiss-cpu"), "python": platform.python_version(),
            "date": utc_now()}


def write_report(rows: list[dict], out: Path) -> str:
    """Merge ``rows`` into ``out/store_cpu.csv`` (replacing rows of the same label) and rewrite ``store_cpu.md``."""
    out.mkdir(parents=True, exist_ok=True)
    file = out / "store_cpu.csv"
    labels = {r["label"] for r in rows}
    old = []
    if file.exists():
        with file.open(newline="") as fh:
            old = [r for r in csv.DictReader(fh) if r["label"] not in labels]
    merged = old + rows
    with file.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=KEYS)
        writer.writeheader()
        writer.writerows(merged)
    lines = ["# Gallery store (CPU)", "", "One section per label (run), each with its commit, machine, versions, "
             "date and command; the rows are in `store_cpu.csv`.", ""]
    for label in dict.fromkeys(r["label"] for r in merged):
        first = next(r for r in merged if r["label"] == label)
        lines += [f"## {label}", "", f"Commit {first['commit']}; {first['machine']}; numpy {first['numpy']}, "
                  f"faiss-cpu {first['faiss']}, Python {first['python']}; {first['date']}. Command: "
                  f"`{first.get('command') or ''}`.", "",
                  "| benchmark | setting | value | p90 | note |", "|---|---|---:|---:|---|"]
        for r in merged:
            if r["label"] == label:
                p90 = f"{float(r['p90_ms']):.2f} ms" if r.get("p90_ms") not in (None, "") else ""
                lines.append(f"| {r['benchmark']} | {r['setting']} | {float(r['value']):.2f} {r['unit']} | {p90} | "
                             f"{r.get('note') or ''} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "store_cpu.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="current", help="name of this run's rows (e.g. before / after)")
    parser.add_argument("--segments", default="100,500,1500", help="segment counts to time appends at")
    parser.add_argument("--timed", type=int, default=30, help="timed appends per segment count (default 30)")
    parser.add_argument("--entries", type=int, default=20_000, help="entries of the RSS gallery (default 20000)")
    parser.add_argument("--searches", type=int, default=1000, help="searches of the RSS run (default 1000)")
    parser.add_argument("--work", type=Path, help="scratch folder (default a temporary one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"),
                        help="folder for the results (default benchmarks/results)")
    parser.add_argument("--runtime-from", help="the commit runtime/ was checked out from, when not HEAD's (e.g. to "
                                               "measure the store before a change with this script)")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        print(json.dumps(rss_child(args.rss_child, args.searches)))
        return
    work = Path(tempfile.mkdtemp(dir=args.work))
    try:
        rows = append_rows(work, [int(s) for s in args.segments.split(",")], args.timed)
        rows += rss_rows(work, args.entries, args.searches)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = (f"python benchmarks/bench_store.py --label {args.label} --segments {args.segments} --timed "
               f"{args.timed} --entries {args.entries} --searches {args.searches}"
               + (f" --runtime-from {args.runtime_from}" if args.runtime_from else ""))
    stamped = {**stamp(args.runtime_from), "command": command}
    print(write_report([{"label": args.label, **r, **stamped} for r in rows], args.out))


if __name__ == "__main__":
    main()
