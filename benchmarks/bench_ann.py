"""Approximate search over 10^6 global embeddings resampled from the demo's: recall@10 and latency, flat / ivf / hnsw.

Data (the demo has ~7k real embeddings; a gallery of 10^6 is resampled from them with matched second moments):

* the real global embeddings of the demo's training, query and gallery images with an identity (distractors left
  out) give identity means mu_p, their overall mean mu, the within-identity covariance S_w (of x - mu_p) and the
  between-identity covariance S_b (of mu_p - mu);
* each synthetic identity j picks a real identity p and gets the centre mu + sqrt(1 - s^2) (mu_p - mu) + s L_b z
  (s = 0.5, L_b L_b^T = S_b, z standard normal): the real identities' structure kept, with new identities whose
  centres have the real covariance S_b; its images are centre + L_w z (covariance S_w), as many as a real gallery
  identity has (drawn from the demo gallery's counts), until ``--entries`` images;
* queries are further images of random synthetic identities (as in ReID, the query's identity is in the gallery).

The exact top-10 comes from the flat index with a wide exact re-ranking. Each index is built once (FAISS on
``--build-threads``), then searched with FAISS on ``--threads`` threads: recall@10 over ``--queries`` queries, and the
latency of one search call at batch 1 and 32 (p50 / p99 over ``--timed`` calls at batch 1, a fifth as many, at least
10, at batch 32; a call includes the exact re-ranking, which reads the candidates' float32 rows from memory). ``ivf`` is
IVF-PQ (IVF-Flat would hold a second float32 copy of the rows: left out at this size); ``hnsw`` stores 8-bit codes.
The size is that of the saved index files (flat saves none: it is a copy of the rows, 4·C bytes per entry).

    OMP_NUM_THREADS=1 python benchmarks/bench_ann.py --cache /tmp/emb.npz
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from bench_storage import embed_demo
from run_stamp import stamp, stamp_line, write_csv
from tqdm.auto import tqdm

from attrimeter.data.formats import DISTRACTOR_PID, load_dataset
from attrimeter.runtime.ann import make_index

TARGET_RECALL = 0.95
SPREAD = 0.5  # s: how far new identity centres move from the real one they start from


def real_embeddings(run: Path, cache: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(global embeddings [n, C] with an identity, their identities, images per identity of the demo gallery)."""
    e = embed_demo(run, cache)
    data = load_dataset(run / "data")
    x = np.concatenate([e["train"][:, 0], e["query"][:, 0], e["gallery"][:, 0]])
    pids = np.array([s.pid for s in (*data.train, *data.query, *data.gallery)])
    keep = pids > DISTRACTOR_PID
    counts = np.unique([s.pid for s in data.gallery if s.pid > DISTRACTOR_PID], return_counts=True)[1]
    return x[keep].astype(np.float64), pids[keep], counts


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return vectors * np.sqrt(np.maximum(values, 0.0))


def resample(x: np.ndarray, pids: np.ndarray, counts: np.ndarray, n: int, queries: int,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(gallery float32 [n, C], queries float32 [queries, C], statistics of real vs synthetic); see the docstring."""
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(pids, return_inverse=True)
    means = np.zeros((len(ids), x.shape[1]))
    np.add.at(means, inverse, x)
    means /= np.bincount(inverse)[:, None]
    mu = means.mean(0)
    l_w = _sqrt_psd(np.cov((x - means[inverse]).T))
    l_b = _sqrt_psd(np.cov((means - mu).T))
    sizes = rng.choice(counts, size=2 * n // int(counts.min()) + 2)
    sizes = sizes[:np.searchsorted(np.cumsum(sizes), n) + 1]
    centres = (mu + np.sqrt(1 - SPREAD ** 2) * (means[rng.integers(0, len(ids), len(sizes))] - mu)
               + SPREAD * rng.standard_normal((len(sizes), x.shape[1])) @ l_b.T)
    owner = np.repeat(np.arange(len(sizes)), sizes)[:n]
    gallery = np.empty((n, x.shape[1]), np.float32)
    step = 1 << 16
    for a in tqdm(range(0, n, step), desc="resample"):
        b = min(n, a + step)
        gallery[a:b] = centres[owner[a:b]] + rng.standard_normal((b - a, x.shape[1])) @ l_w.T
    q = (centres[rng.integers(0, len(sizes), queries)] + rng.standard_normal((queries, x.shape[1])) @ l_w.T)

    def stats(v: np.ndarray, who: np.ndarray) -> tuple[float, float, float]:
        pick = rng.choice(len(v), min(len(v), 4000), replace=False)
        v, who = v[pick].astype(np.float64), who[pick]
        d = np.sqrt(np.maximum((v * v).sum(1)[:, None] + (v * v).sum(1)[None] - 2 * v @ v.T, 0))
        same = (who[:, None] == who[None]) & ~np.eye(len(v), dtype=bool)
        return float(np.linalg.norm(v, axis=1).mean()), float(d[~same].mean()), float(d[same].mean())

    real, synth = stats(x, pids), stats(gallery, owner)
    return gallery, q.astype(np.float32), {"real_norm": real[0], "real_cross": real[1], "real_same": real[2],
                                           "synth_norm": synth[0], "synth_cross": synth[1], "synth_same": synth[2],
                                           "identities": float(len(sizes))}


def _timed(index, q: np.ndarray, batch: int, calls: int, rng: np.random.Generator) -> tuple[float, float]:
    times = []
    for _ in range(calls):
        pick = rng.choice(len(q), batch, replace=False)
        start = time.perf_counter()
        index.search(q[pick], 10)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def _size(index) -> int:
    folder = Path(tempfile.mkdtemp())
    try:
        index.save(folder)
        return sum(f.stat().st_size for f in folder.iterdir())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(gallery: np.ndarray, q: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Build flat / ivf / hnsw and measure each search setting."""
    rows_of = gallery.__getitem__
    dim = gallery.shape[1]
    rng = np.random.default_rng(1)
    out = []
    configs = [("flat", {"rerank": 2}, [{}]),
               ("ivf", {"nlist": args.nlist, "pq_m": args.pq_m, "rerank": 10},
                [{"nprobe": p, "rerank": r} for p in (8, 16, 32, 64) for r in (1, 10)]),
               ("hnsw", {"m": args.hnsw_m, "ef_construction": args.ef_construction, "rerank": 4},
                [{"ef_search": e, "rerank": r} for e in (16, 32, 64, 128) for r in (1, 4)])]
    truth = None
    flat_p50 = {}
    for kind, params, sweeps in configs:
        index = make_index(kind, dim, rows_of, **params)
        faiss.omp_set_num_threads(args.build_threads)
        start = time.perf_counter()
        index.build(gallery)
        build_s = time.perf_counter() - start
        size = 4 * gallery.size if kind == "flat" else _size(index)
        faiss.omp_set_num_threads(args.threads)
        for sweep in tqdm(sweeps, desc=kind):
            index.configure(**sweep)
            ids = index.search(q, 10)
            if truth is None:
                truth = ids
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)]))
            row = {"index": kind, "build_params": " ".join(f"{k}={v}" for k, v in params.items() if k != "rerank"),
                   "search_params": " ".join(f"{k}={v}" for k, v in index.params().items()
                                             if k in ("nprobe", "ef_search", "rerank")),
                   "recall_at_10": recall, "build_s": build_s, "index_bytes": size}
            for batch, calls in ((1, args.timed), (32, max(10, args.timed // 5))):
                p50, p99 = _timed(index, q, batch, calls, rng)
                row[f"p50_ms_b{batch}"], row[f"p99_ms_b{batch}"] = p50, p99
                if kind == "flat":
                    flat_p50[batch] = p50
                row[f"speedup_b{batch}"] = flat_p50[batch] / p50
            out.append(row)
        del index
    return out


def report(rows: list[dict], stats: dict[str, float], n: int, dim: int, args: argparse.Namespace,
           stamped: dict[str, str]) -> str:
    lines = ["# Approximate search over the global embeddings (CPU)", "", stamp_line(stamped), "",
             f"{n} entries of C = {dim} (float32, {4 * n * dim / 2**30:.2f} GiB), resampled from the demo's real "
             f"embeddings with matched within- and between-identity covariances ({int(stats['identities'])} synthetic "
             f"identities; see the benchmark's docstring); {args.queries} queries, k = 10. Real vs synthetic: mean "
             f"norm {stats['real_norm']:.1f} vs {stats['synth_norm']:.1f}, mean distance between identities "
             f"{stats['real_cross']:.1f} vs {stats['synth_cross']:.1f}, within an identity {stats['real_same']:.1f} vs "
             f"{stats['synth_same']:.1f}. FAISS builds on {args.build_threads} thread(s) and searches on "
             f"{args.threads}. Recall@10 against the exact top-10; latency of one `search` call including the exact "
             "re-ranking of k x rerank candidates from the float32 rows; speed-up = flat p50 / p50.", "",
             "| index | build | search | recall@10 | b=1 ms p50 / p99 | b=32 ms p50 / p99 | speed-up b=1 / b=32 | "
             "build s | index MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['index']} | {r['build_params']} | {r['search_params']} | {r['recall_at_10']:.4f} | "
                     f"{r['p50_ms_b1']:.2f} / {r['p99_ms_b1']:.2f} | {r['p50_ms_b32']:.1f} / {r['p99_ms_b32']:.1f} | "
                     f"{r['speedup_b1']:.1f}x / {r['speedup_b32']:.1f}x | {r['build_s']:.0f} | "
                     f"{r['index_bytes'] / 2**20:.0f} |")
    lines += ["", "## Verdict", ""]
    for kind in ("ivf", "hnsw"):
        ok = [r for r in rows if r["index"] == kind and r["recall_at_10"] >= TARGET_RECALL]
        if ok:
            best = max(ok, key=lambda r: r["speedup_b1"])
            lines.append(f"- {kind}: recall@10 >= {TARGET_RECALL} at `{best['build_params']} {best['search_params']}`"
                         f" ({best['recall_at_10']:.4f}), {best['speedup_b1']:.1f}x faster than flat at batch 1 "
                         f"({best['p50_ms_b1']:.2f} ms p50), {best['speedup_b32']:.1f}x at batch 32.")
        else:
            lines.append(f"- {kind}: no setting reached recall@10 >= {TARGET_RECALL}.")
        defaults = make_index(kind, dim, lambda ids: ids).params()
        setting = " ".join(f"{k}={defaults[k]}" for k in ("nprobe", "ef_search", "rerank") if k in defaults)
        at = [r for r in rows if r["index"] == kind and r["search_params"] == setting]
        if at:
            lines.append(f"  At the class's default search parameters (`{setting}`): recall@10 "
                         f"{at[0]['recall_at_10']:.4f}, {at[0]['p50_ms_b1']:.2f} ms p50 at batch 1 "
                         f"({at[0]['speedup_b1']:.1f}x faster than flat).")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a demo run folder (data/, export/)")
    parser.add_argument("--cache", type=Path, help="npz of the demo's embeddings (bench_storage.py's cache)")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall (default 1000)")
    parser.add_argument("--timed", type=int, default=100, help="timed search calls at batch 1 (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching (default 1)")
    parser.add_argument("--build-threads", type=int, default=2, help="FAISS threads while building (default 2)")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--pq-m", type=int, default=32)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    args = parser.parse_args()
    x, pids, counts = real_embeddings(args.run, args.cache)
    gallery, q, stats = resample(x, pids, counts, args.entries, args.queries)
    rows = measure(gallery, q, args)
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    stamped = {**stamp(args.threads), "command": env + " ".join(["python", "benchmarks/bench_ann.py", *sys.argv[1:]])}
    stamped["threads"] += f", FAISS build {args.build_threads}"
    write_csv(args.out / "ann_cpu.csv", rows, stamped)
    text = report(rows, stats, len(gallery), gallery.shape[1], args, stamped)
    (args.out / "ann_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
