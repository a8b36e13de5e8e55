"""Storage modes through the real gallery store: bytes on disk per entry, share error, search + explain latency.

``bench_storage.py`` measures the codecs on in-memory arrays; this script stores a gallery of N resampled demo
entries in each storage mode (``Gallery.create(storage=fit_storage(mode, training rows))``, appended in segments of
4096) and measures what the runtime does for one query without the model:

* bytes per entry: every ``.npy`` file of the segments, headers included (``meta.jsonl`` left out);
* share error: max |p_k(stored) − p_k(float32)| over the queries' top-k hits;
* latency, p50 / p99 over the queries: plain search (``Gallery.search`` → read the hits' global and attribute rows,
  decoded → ``explain_rows``), the same with the hits' maps read (overlays; ``compact-nomaps`` recomputes them with
  the model, not measured here), and the attribute-weighted search (``Gallery.weighted_search``, the codec-aware
  scan → explain).

Entries are the demo gallery's rows resampled with small noise (so no two are equal); codecs are fitted on the demo's
training split.

    OMP_NUM_THREADS=1 python benchmarks/bench_storage_store.py --cache /work/exp/d_storage/bench_emb.npz
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from run_stamp import stamp, stamp_line, write_csv

from attrimeter.runtime.decompose import explain_rows
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.storage import fit_storage

MODES = ("float16", "int8", "compact", "compact-nomaps")
K = 10


def resample(e: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n entries: demo gallery rows plus noise of 5% of each value's spread (maps kept non-negative)."""
    pick = rng.integers(0, len(e["gallery"]), n)
    rows = e["gallery"][pick]
    rows = rows + rng.standard_normal(rows.shape, np.float32) * (0.05 * e["gallery"].std(0))
    maps = e["gallery_aam"][pick]
    maps = np.maximum(maps + rng.standard_normal(maps.shape, np.float32) * (0.05 * e["gallery_aam"].std(0)), 0)
    return {"rows": rows.astype(np.float32), "aam": maps.astype(np.float32)}


def build(path: Path, mode: str, e: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> tuple[Gallery, float]:
    """The gallery of ``data`` in ``mode`` (codecs fitted on the training split) and the seconds fitting took."""
    t0 = time.perf_counter()
    codecs = fit_storage(mode, e["train"][:, 1:], e["train_aam"])
    fit_s = time.perf_counter() - t0
    m = data["rows"].shape[1] - 1
    g = Gallery.create(path, dim=data["rows"].shape[2], attributes=[f"a{i}" for i in range(m)],
                       aam_shape=data["aam"].shape[2:], model="bench", storage=codecs, auto_compact=None)
    for a in range(0, len(data["rows"]), 4096):
        rows = data["rows"][a:a + 4096]
        g.append(rows[:, 0], rows[:, 1:], np.full((len(rows), m), 0.5, np.float32), [{}] * len(rows),
                 aam=data["aam"][a:a + 4096])
    return g, fit_s


def measure(g: Gallery, data: dict[str, np.ndarray], queries: np.ndarray, weights: np.ndarray,
            weighted_queries: int) -> dict:
    """Latencies (ms) and the share error against float32 rows for each query's top-K."""
    plain, maps, weighted, share_err = [], [], [], 0.0
    g.weighted_search(queries[-1:, 1:], weights, K)  # loads the compiled scan (Numba's cache) before timing
    for i, q in enumerate(queries):
        q1 = q[None]
        t0 = time.perf_counter()
        _, ids = g.search(q1[:, 0], K)
        flat = ids.ravel()
        rows = np.concatenate([g.embeddings(flat)[:, None], g.attr_embeddings(flat)], axis=1)
        dec = explain_rows(q1, rows[None])
        plain.append(time.perf_counter() - t0)
        if g.keeps_maps:
            t0 = time.perf_counter()
            g.aam(flat)
            maps.append(plain[-1] + time.perf_counter() - t0)
        ref = explain_rows(q1, data["rows"][flat][None])
        share_err = max(share_err, float(np.abs(dec.shares - ref.shares).max()))
        if i >= weighted_queries:
            continue
        t0 = time.perf_counter()
        _, ids = g.weighted_search(q1[:, 1:], weights, K)
        flat = ids.ravel()
        rows = np.concatenate([g.embeddings(flat)[:, None], g.attr_embeddings(flat)], axis=1)
        explain_rows(q1, rows[None], weights)
        weighted.append(time.perf_counter() - t0)

    def ms(xs: list[float]) -> str:
        return "–" if not xs else f"{1e3 * np.percentile(xs, 50):.2f} / {1e3 * np.percentile(xs, 99):.2f}"

    return {"plain_ms": ms(plain), "maps_ms": ms(maps), "weighted_ms": ms(weighted), "share_err": share_err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="bench_storage.py's npz of the demo's embeddings")
    parser.add_argument("--entries", type=int, default=20000, help="gallery entries (default 20000)")
    parser.add_argument("--queries", type=int, default=100, help="queries timed per mode (default 100)")
    parser.add_argument("--weighted-queries", type=int, default=10,
                        help="of those, weighted searches timed (default 10: a scan of the whole gallery each)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    with np.load(args.cache) as f:
        e = dict(f)
    rng = np.random.default_rng(0)
    data = resample(e, args.entries, rng)
    queries = e["query"][rng.choice(len(e["query"]), args.queries, replace=False)]
    weights = np.ones(queries.shape[1] - 1, np.float32)
    weights[: len(weights) // 2] = 0  # half the attributes ignored, as a user's weights would
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-storage-store-"))
    try:
        for mode in MODES:
            g, fit_s = build(work / mode, mode, e, data)
            with g:
                files = list((work / mode / "segments").rglob("*.npy"))
                size = sum(p.stat().st_size for p in files) / len(g)
                copy = sum(p.stat().st_size for p in files if p.name == "attr_by_attribute.npy") / len(g)
                rows.append({"mode": mode, "bytes_per_entry": round(size), "scan_copy_bytes": round(copy),
                             "fit_s": round(fit_s, 1),
                             **measure(g, data, queries, weights, args.weighted_queries)})
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0]["bytes_per_entry"]
    command = "OMP_NUM_THREADS=1 " + " ".join(["python", "benchmarks/bench_storage_store.py", *sys.argv[1:]])
    stamped = {**stamp(1), "command": command}
    lines = ["# Storage modes through the gallery store (CPU)", "", stamp_line(stamped), "",
             f"{args.entries} entries resampled from the demo gallery (C = 256, M = 26, maps 8x4), {args.queries} "
             f"queries ({args.weighted_queries} for the weighted search), k = {K}; codecs fitted on the demo's "
             "training split. Bytes: every segment array file "
             "(headers included, metadata left out); of which the scan copy: float16's attribute rows stored a "
             "second time attribute by attribute (`attr_by_attribute.npy`, gallery format 4), what its weighted "
             "scan streams. Latency p50 / p99 in ms: search → read the hits' rows "
             "(decoded) → `explain_rows`; + maps: also reading the hits' maps (overlays); weighted: "
             "`Gallery.weighted_search` (13 of 26 attributes weighted) → explain. Share error: max |Δp_k| against "
             "the float32 rows over the queries' hits.", "",
             "| mode | bytes / entry | of which scan copy | fewer than float16 | fewer than float16 without its copy | "
             "share err max | search + explain | + maps | weighted search + explain | fit s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows_only = base - rows[0]["scan_copy_bytes"]
    for r in rows:
        without = r["bytes_per_entry"] - r["scan_copy_bytes"]
        lines.append(f"| {r['mode']} | {r['bytes_per_entry']} | {r['scan_copy_bytes']} | "
                     f"{base / r['bytes_per_entry']:.2f}x | {rows_only / without:.2f}x | "
                     f"{r['share_err']:.2e} | {r['plain_ms']} | {r['maps_ms']} | {r['weighted_ms']} | {r['fit_s']} |")
    lines += ["", "`compact-nomaps` draws overlays by embedding each hit's crop again (one model call per drawn hit, "
              "not measured here)."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage_store_cpu.md").write_text("\n".join(lines) + "\n")
    write_csv(args.out / "storage_store_cpu.csv", rows, stamped)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
