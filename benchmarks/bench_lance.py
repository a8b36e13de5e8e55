"""The Lance columnar format against the own gallery store: the store's scenarios and the storage side of search +
explain, on this machine (issue 17 item 5).

* scenarios (``lance_scenarios.py``): SIGKILLed writers, two writers and a reader at once, a removed lock file, a
  clean-up during an append, a symlinked data folder, tampered data files and manifests, on both stores;
* speed, at each ``--entries`` N, with the demo model's shapes (``--export``'s manifest: feature map C×h×w and the
  attributes; 256×8×4 and 26 by default): both stores are filled with the same data in appends of ``--batch``
  entries (alternately, each batch timed), then measured as appended and after compaction:
  - take: the rows explaining a top-k reads (embedding, attribute embeddings, probabilities, maps, metadata) for k
    random ids, ``--queries`` varied queries per k, contenders alternated query by query (first one, then the other,
    then the other way round), p50/p99;
  - search + take: the same after an exact FAISS search of a perturbed stored embedding (same index type for both:
    the own store's ``Gallery.search``, a FAISS ``IndexFlatL2`` over the Lance store's scanned embeddings; FAISS on
    ``--faiss-threads`` threads); and, for reference, Lance's own exact nearest-neighbour scan against
    ``Gallery.search``;
  - open (read-only, no checksums) and the full sha256 check, the embedding scan that feeds the search index,
    one-entry appends on the full store (what a server's "add" costs), disk bytes per entry;
  - resident memory of a fresh process after 1,000 varied takes (k = 10), twice per contender, alternated.

Results: ``--out``/lance_vs_store_cpu.{csv,md}. The md is rewritten from the measurements below its ``## Measured``
heading; what is above that heading (the verdict, written by a person from these numbers) is kept.

    pip install -e ".[lance]"   # pylance (and pyarrow); nothing else in the project needs them
    python benchmarks/bench_lance.py --entries 10000,100000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import faiss
import lance_scenarios
import numpy as np
from lance_store import LanceStore
from run_stamp import cpu_name, git_commit, utc_now

from attrimeter.runtime.gallery import Gallery

OWN, LANCE = lance_scenarios.OWN, lance_scenarios.LANCE
KEYS = ["section", "entries", "benchmark", "setting", "contender", "value", "unit", "p50_ms", "p99_ms", "reps", "note"]
MARK = "## Measured"


def shapes_of(export: Path | None) -> tuple[int, tuple[str, ...], tuple[int, int]]:
    """C, attribute names and (h, w) of the export's manifest, or the demo's defaults."""
    if export is not None and (export / "manifest.json").exists():
        doc = json.loads((export / "manifest.json").read_text())
        c, h, w = doc["feature_map"]
        names = doc.get("attributes")
        names = [a["name"] if isinstance(a, dict) else a for a in names] if names else [f"a{i}" for i in range(26)]
        return int(c), tuple(names), (int(h), int(w))
    return 256, tuple(f"a{i}" for i in range(26)), (8, 4)


def _batch(rng: np.random.Generator, n: int, first: int, dim: int, m: int, aam: tuple[int, int]) -> dict[str, Any]:
    return {"embedding": rng.standard_normal((n, dim)).astype(np.float32),
            "attr_embeddings": rng.standard_normal((n, m, dim)).astype(np.float32),
            "probs": rng.random((n, m)).astype(np.float32),
            "meta": [{"key": f"k{first + i}", "path": f"/data/img/{first + i:07d}.jpg", "camera": (first + i) % 6}
                     for i in range(n)],
            "aam": rng.random((n, m, *aam)).astype(np.float32)}


def _ms(times: list[float]) -> tuple[float, float]:
    ms = 1000 * np.asarray(times)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _alternate(fns: dict[str, Callable[[int], Any]], reps: int, warmup: int = 10) -> dict[str, list[float]]:
    """Time each contender's ``fn(i)`` for i in range(reps), alternating which runs first every rep."""
    names = list(fns)
    for i in range(warmup):
        for name in names:
            fns[name](reps + i)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name](i)
            times[name].append(time.perf_counter() - t0)
    return times


def _own_rows(g: Gallery, ids: np.ndarray) -> dict[str, Any]:
    return {"embedding": g.embeddings(ids), "attr": g.attr_embeddings(ids), "probs": g.probs(ids), "aam": g.aam(ids),
            "meta": g.meta(ids)}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in ("embedding", "attr", "probs", "aam")) and a["meta"] == b["meta"]


def reads(own: Gallery, lan: LanceStore, index: Any, full: np.ndarray, k: int, queries: int,
          rng: np.random.Generator) -> list[dict[str, Any]]:
    """Top-k row takes and search + takes, contenders alternated: p50/p99 rows (without the store state)."""
    n, dim = full.shape
    ids = [rng.choice(n, size=k, replace=False) for _ in range(queries + 10)]
    probes = full[rng.integers(n, size=queries + 10)] + 0.1 * rng.standard_normal((queries + 10, dim)).astype(
        np.float32)

    def own_search(i: int) -> Any:
        _, hits = own.search(probes[i:i + 1], k)
        return _own_rows(own, hits[0])

    def lance_search(i: int) -> Any:
        _, hits = index.search(probes[i:i + 1], k)
        rows = lan.rows(hits[0])
        np.linalg.norm(rows["embedding"] - probes[i], axis=1)  # exact distances, as Gallery.search computes them
        return rows

    _, a = own.search(probes[:1], k)
    if not np.array_equal(np.sort(a[0]), np.sort(lan.nearest(probes[0], k)[1])):
        raise RuntimeError("Lance's nearest and the own store's search disagree")
    out = []
    for benchmark, setting, fns in (
            ("take", f"top-{k} rows, random ids", {OWN: lambda i: _own_rows(own, ids[i]),
                                                   LANCE: lambda i: lan.rows(ids[i])}),
            ("search + take", f"exact search k={k} (FAISS flat) + hit rows", {OWN: own_search, LANCE: lance_search}),
            ("search", f"exact search k={k}: Gallery.search vs Lance's own flat nearest (no index)",
             {OWN: lambda i: own.search(probes[i:i + 1], k), LANCE: lambda i: lan.nearest(probes[i], k)})):
        reps = queries if benchmark != "search" else max(20, queries // 10)  # a flat Lance scan is slow
        for name, t in _alternate(fns, reps).items():
            p50, p99 = _ms(t)
            out.append({"benchmark": benchmark, "setting": setting, "contender": name, "p50_ms": p50, "p99_ms": p99,
                        "reps": len(t)})
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _alternating_appends(own: Gallery, lan: LanceStore, batches: list[dict[str, Any]],
                         start: int = 0) -> dict[str, list[float]]:
    """Append each batch to both stores, the first store alternating (batch ``start`` + i); seconds per append."""
    times: dict[str, list[float]] = {OWN: [], LANCE: []}
    for i, b in enumerate(batches, start):
        for name, store in ((OWN, own), (LANCE, lan))[:: 1 if i % 2 == 0 else -1]:
            t0 = time.perf_counter()
            store.append(**b)
            times[name].append(time.perf_counter() - t0)
    return times


def speed(work: Path, n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every speed, memory and size measurement at ``n`` entries."""
    dim, attrs, aam = shapes_of(args.export)
    m = len(attrs)
    own = Gallery.create(work / f"own-{n}", dim=dim, attributes=attrs, aam_shape=aam, model="bench")
    lan = LanceStore.create(work / f"lance-{n}", dim=dim, attributes=attrs, aam_shape=aam, model="bench")
    rng = np.random.default_rng(n)
    rows: list[dict[str, Any]] = []

    def row(benchmark: str, setting: str, contender: str, value: float, unit: str, **extra: Any) -> None:
        rows.append({"section": "speed", "entries": n, "benchmark": benchmark, "setting": setting,
                     "contender": contender, "value": value, "unit": unit, **extra})

    def timed(benchmark: str, setting: str, times: dict[str, list[float]]) -> None:
        for name, t in times.items():
            p50, p99 = _ms(t)
            row(benchmark, setting, name, p50, "ms p50", p50_ms=p50, p99_ms=p99, reps=len(t))

    parts = n // args.batch
    fill = {OWN: [], LANCE: []}
    for first in range(0, n, args.batch):  # generated batch by batch: the whole gallery never sits in memory
        batch = [_batch(rng, args.batch, first, dim, m, aam)]
        for name, t in _alternating_appends(own, lan, batch, first // args.batch).items():
            fill[name] += t
    for name, t in fill.items():
        row("append", f"batches of {args.batch} (fsync, sha256)", name, args.batch / float(np.median(t)),
            "entries/s", reps=len(t), note=f"p50 {1000 * float(np.median(t)):.0f} ms per batch")

    index = faiss.IndexFlatL2(dim)
    for state in ("as appended", "compacted"):
        if state == "compacted":
            for name, fn in ((OWN, lambda: own.compact(progress=False)), (LANCE, lan.compact)):
                t0 = time.perf_counter()
                fn()
                row("compact", f"{parts + args.singles} parts into one", name, time.perf_counter() - t0, "s", reps=1)
        reader_own = Gallery.open(own.path, verify=False, progress=False)
        reader_lan = LanceStore.open(lan.path)
        segments = reader_own.segments
        where = f"{state} ({segments} segments / {reader_lan.fragments} fragments)"
        sample = rng.choice(n, size=64, replace=False)  # both stores hold the same rows
        if not _same(_own_rows(reader_own, sample), reader_lan.rows(sample)):
            raise RuntimeError("the two stores do not return the same rows")
        scans = {}
        for name, fn in ((OWN, lambda g=reader_own: g.embeddings(np.arange(n))), (LANCE, reader_lan.scan_embeddings)):
            t0 = time.perf_counter()
            scans[name] = fn()[:n]
            row("scan", f"all embeddings (feeds the search index), {where}", name, 1000 * (time.perf_counter() - t0),
                "ms", reps=1)
        if not np.array_equal(scans[OWN], scans[LANCE]):
            raise RuntimeError("the two stores' embeddings differ")
        if index.ntotal == 0:
            index.add(scans[LANCE])
        for k in args.k:
            for r in reads(reader_own, reader_lan, index, scans[OWN], k, args.queries, rng):
                row(r["benchmark"], f"{r['setting']}, {where}", r["contender"], r["p50_ms"], "ms p50",
                    p50_ms=r["p50_ms"], p99_ms=r["p99_ms"], reps=r["reps"])
        reader_own.close()
        if state == "compacted":
            timed("open", "read-only, no checksums (compacted)",
                  _alternate({OWN: lambda i: Gallery.open(own.path, verify=False, progress=False).close(),
                              LANCE: lambda i: LanceStore.open(lan.path)}, args.opens))
            for name, fn in ((OWN, lambda: Gallery.open(own.path, verify=True, progress=False).close()),
                             (LANCE, lambda: LanceStore.open(lan.path).verify())):
                t0 = time.perf_counter()
                fn()
                row("verify", "open + sha256 of every file (compacted)", name, 1000 * (time.perf_counter() - t0),
                    "ms", reps=1)
        singles = [_batch(rng, 1, len(lan) + i, dim, m, aam) for i in range(args.singles)]
        timed("append", f"1 entry, {args.singles} in a row from {segments} parts ({state})",
              _alternating_appends(own, lan, singles))
    own.close()
    for name, path in ((OWN, own.path), (LANCE, lan.path)):
        if name == OWN:
            with Gallery.open(path, writable=True, progress=False) as g:
                g.compact(progress=False)
        else:
            LanceStore.open(path).compact()
        row("disk", "bytes per entry (compacted, old versions cleaned up)", name, _size(path) / len(lan), "B",
            note=f"{_size(path) / 2**20:.0f} MiB for {len(lan)} entries")
    for rep in range(2):
        for name in (OWN, LANCE) if rep == 0 else (LANCE, OWN):
            path = own.path if name == OWN else lan.path
            out = subprocess.run([sys.executable, __file__, "--rss-child", name, str(path)], capture_output=True,
                                 text=True, check=True)
            r = json.loads(out.stdout)
            row("rss", f"fresh process, run {rep + 1}: after open", name, r["open"], "MiB", reps=1)
            row("rss", f"fresh process, run {rep + 1}: after 1,000 varied takes (k=10)", name, r["takes"], "MiB",
                reps=1, note=f"peak VmHWM {r['peak']:.0f} MiB")
    return rows


def _status() -> dict[str, float]:
    with open("/proc/self/status") as fh:
        status = dict(line.split(":", 1) for line in fh)
    return {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def rss_child(name: str, path: Path) -> dict[str, float]:
    rng = np.random.default_rng(7)
    store: Any = Gallery.open(path, verify=False, progress=False) if name == OWN else LanceStore.open(path)
    read = (lambda ids: _own_rows(store, ids)) if name == OWN else store.rows
    out = {"open": _status()["VmRSS"]}
    n = len(store)
    for _ in range(1000):
        read(rng.choice(n, size=10, replace=False))
    status = _status()
    return {**out, "takes": status["VmRSS"], "peak": status["VmHWM"]}


def scenarios(work: Path, seed: int) -> list[dict[str, Any]]:
    return [{"section": "scenarios", "benchmark": r["scenario"], "contender": r["kind"],
             "value": {True: "pass", False: "FAIL", None: "n/a"}[r["ok"]], "setting": r["result"], "note": r["detail"]}
            for r in lance_scenarios.run_all(work, seed)]


def stamp(command: str) -> str:
    cpu, commit = cpu_name(), git_commit()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{utc_now()}; commit {commit}; {cpu}, "
            f"{os.cpu_count()} CPUs shared with other sessions (load average at the end {load}); Python "
            f"{platform.python_version()}, numpy {np.__version__}, pylance {version('pylance')}, pyarrow "
            f"{version('pyarrow')}, faiss-cpu {version('faiss-cpu')}. Command: `{command}`.")


def write_report(rows: list[dict[str, Any]], out: Path, stamped: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "lance_vs_store_cpu.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=KEYS)
        writer.writeheader()
        writer.writerows([{k: r.get(k, "") for k in KEYS} for r in rows])
    md = out / "lance_vs_store_cpu.md"
    head = md.read_text().split(MARK)[0].rstrip() + "\n\n" if md.exists() else "# Lance vs the own gallery store\n\n"
    lines = [MARK, "", stamped, ""]
    scen = [r for r in rows if r["section"] == "scenarios"]
    if scen:
        lines += ["### Scenarios", "", "| scenario | store | verdict | what happened | detail |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['benchmark']} | {r['contender']} | {r['value']} | {r['setting']} | {r['note']} |"
                  for r in scen]
        lines.append("")
    for n in dict.fromkeys(r["entries"] for r in rows if r["section"] == "speed"):
        lines += [f"### {n:,} entries", "", f"| benchmark | setting | {OWN} | {LANCE} | Lance / own |",
                  "|---|---|---:|---:|---:|"]
        block = [r for r in rows if r["section"] == "speed" and r["entries"] == n]
        for key in dict.fromkeys((r["benchmark"], r["setting"]) for r in block):
            pair = {r["contender"]: r for r in block if (r["benchmark"], r["setting"]) == key}

            def cell(r: dict[str, Any] | None) -> str:
                if r is None:
                    return ""
                value = r["value"]
                text = f"{value:,.0f} {r['unit']}" if abs(value) >= 1000 else f"{value:.3g} {r['unit']}"
                if r.get("p99_ms") not in (None, ""):
                    text += f" (p99 {r['p99_ms']:.3g})"
                return text + (f"; {r['note']}" if r.get("note") else "")
            o, la = pair.get(OWN), pair.get(LANCE)
            ratio = f"{la['value'] / o['value']:.2f}×" if o and la and o["value"] else ""
            lines.append(f"| {key[0]} | {key[1]} | {cell(o)} | {cell(la)} | {ratio} |")
        lines.append("")
    md.write_text(head + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="10000,100000", help="gallery sizes (default 10000,100000)")
    parser.add_argument("--export", type=Path, default=Path("/work/exp/demo_run/export"),
                        help="an export folder whose manifest gives the shapes (default: the demo's)")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100], help="top-k sizes (default 10 100)")
    parser.add_argument("--queries", type=int, default=1000, help="timed queries per k and state (default 1000)")
    parser.add_argument("--batch", type=int, default=1000, help="entries per filling append (default 1000)")
    parser.add_argument("--singles", type=int, default=30, help="timed one-entry appends (default 30)")
    parser.add_argument("--opens", type=int, default=30, help="timed opens per contender (default 30)")
    parser.add_argument("--no-scenarios", action="store_true", help="skip the crash/concurrency/tamper scenarios")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenarios' random choices")
    parser.add_argument("--work", type=Path, help="scratch folder (default a temporary one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"), help="results folder")
    parser.add_argument("--faiss-threads", type=int, default=1,
                        help="FAISS OpenMP threads (default 1: on a CPU shared with other work, OpenMP's spinning "
                             "threads make one-query searches tens of times slower and noisier)")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.faiss_threads)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child[0], Path(args.rss_child[1]))))
        return
    work = Path(tempfile.mkdtemp(dir=args.work))
    rows: list[dict[str, Any]] = []
    try:
        if not args.no_scenarios:
            rows += scenarios(work / "scenarios", args.seed)
        for n in (int(x) for x in args.entries.split(",")):
            rows += speed(work, n, args)
            for p in work.glob(f"*-{n}"):
                shutil.rmtree(p)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/bench_lance.py " + " ".join(sys.argv[1:])
    write_report(rows, args.out, stamp(command.strip()))
    print((args.out / "lance_vs_store_cpu.md").read_text())


if __name__ == "__main__":
    main()
