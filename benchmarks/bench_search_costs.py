"""Single-machine search costs at 10^5 entries (issue 17 item 8): plain FAISS, explained search, weighted search.

The gallery is ``--entries`` entries resampled with 5 % noise from a real demo gallery's embeddings (the demo model's
``--source`` gallery; see ``resampling.fill_gallery``). Every timed call gets a different query (resampled from
the source with noise of its own), and the contenders are alternated call by call in one process, so load on the
shared machine hits them alike:

* plain FAISS ``IndexFlatL2`` (1 thread, the runtime's default ``search_threads``) vs ``Runtime.search_embeddings``;
* the weighted search ranking by ``Σ_k w_k d_k``: the previous exact scan (every attribute, whole chunks converted
  to float32 by numpy; kept here as the reference) vs :func:`~attrimeter.runtime.decompose.weighted_scan`, for all
  26 weights non-zero and for 6 non-zero, against two floors of what it reads (the active attribute rows of the
  segments' copy attribute by attribute, and their stored norms): the *read floor*, a numpy sum over exactly those
  bytes of the store's mapped files, and the *bandwidth floor*, those bytes at the speed this machine streams the same
  mapped files contiguously (a sum over every byte of them, scaled by the share of bytes the scan needs): what a fused
  kernel reading only those bytes would take;
* resident memory (VmRSS, VmHWM) of a process serving the gallery through ``Runtime`` after 1,000 varied searches,
  against a process with only an ONNX Runtime session of the export and a FAISS index of the same embeddings.

    python benchmarks/bench_search_costs.py --export /work/exp/demo_run/export --source /work/exp/demo_run/gallery
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_runtime import _percentiles, stamp, write_report
from resampling import fill_gallery, queries

from attrimeter.runtime.decompose import check_weights, weighted_scan
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.gallery_index import IndexChoice
from attrimeter.runtime.runtime import Runtime, RuntimeConfig


def old_weighted_scan(q: np.ndarray, chunks, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The scan before commit 6632633: every attribute, whole chunks converted to float32 (here by numpy)."""
    q32 = np.ascontiguousarray(q, dtype=np.float32)
    q_sq = np.einsum("qac,qac->qa", q32, q32)[:, None, :]
    best_scores, best_ids = np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
    for first, rows in chunks:
        g = np.asarray(rows, dtype=np.float32)
        sq = q_sq + np.einsum("nac,nac->na", g, g)[None] - 2.0 * np.einsum("nac,qac->qna", g, q32)
        scores = np.sqrt(np.maximum(sq, 0.0)) @ weights
        ids = np.broadcast_to(np.arange(first, first + scores.shape[1], dtype=np.int64), scores.shape)
        best_scores = np.concatenate([best_scores, scores.astype(np.float32)], axis=1)
        best_ids = np.concatenate([best_ids, ids], axis=1)
        if best_scores.shape[1] > k:
            keep = np.lexsort((best_ids, best_scores), axis=1)[:, :k]
            best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    order = np.lexsort((best_ids, best_scores), axis=1)
    return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_ids, order, 1)


def floor_read(gallery: Gallery, active: np.ndarray) -> float:
    """Read exactly the bytes the new scan reads (active attribute rows, their norms) with a numpy sum."""
    total = 0
    for _, rows, norms in gallery.scan_chunks(4096):
        words = rows.view(np.uint64)  # [n, M, C/4], rows[:, a] contiguous: 64-bit words sum at memory speed
        for a in active:
            total += int(words[:, a].sum(dtype=np.uint64)) + int(norms[:, a].view(np.uint32).sum(dtype=np.uint64))
    return float(total)


def bandwidth_read(gallery: Gallery) -> float:
    """Sum every byte of the mapped attribute rows and norms contiguously (64-bit words): the streaming read speed."""
    total = 0
    for _, rows, norms in gallery.scan_chunks(1 << 30):
        total += int(np.ravel(rows, order="K").view(np.uint64).sum(dtype=np.uint64))  # in memory order: no copy
        total += int(norms.reshape(-1).view(np.uint32).sum(dtype=np.uint64))
    return float(total)


def timing_rows(export: Path, gallery_path: Path, source: Gallery, repeats: int, weighted: bool = True,
                index: IndexChoice | None = None) -> list[dict]:
    import faiss

    rows = []
    with Runtime(export, gallery_path, RuntimeConfig(verify=False, index=index)) as rt:
        g = rt.gallery
        n, m = len(g), len(rt.attributes)
        plain = faiss.IndexFlatL2(g.dim)
        plain.add(g.embeddings(np.arange(n)))
        qs = queries(source, 2 * repeats + 2, seed=1)
        all_w = check_weights(np.ones(m), m)
        few_w = check_weights(np.r_[np.ones(6), np.zeros(m - 6)], m) if m > 6 else all_w
        rt.search_embeddings(qs[-1], k=10)  # builds the index
        rt.search_embeddings(qs[-2], k=10, weights=all_w.tolist())
        searches = _count_index_searches(g)
        t = {key: [] for key in ("faiss", "explained", "old26", "new26", "old6", "new6", "floor26", "floor6",
                                 "bw26", "bw6", "rt_weighted6")}
        mismatches = 0

        def clock(key: str, fn, *args) -> object:
            t0 = time.perf_counter()
            out = fn(*args)
            t[key].append(time.perf_counter() - t0)
            return out

        hits = 0
        for i in range(repeats):  # alternated: one call of each per round, each with its own query
            qa, qb = qs[2 * i], qs[2 * i + 1]
            faiss.omp_set_num_threads(1)
            clock("faiss", plain.search, qa.embedding, 10)
            got = clock("explained", rt.search_embeddings, qb, 10)
            if index is not None:  # recall@10 against the exact top 10 of the same query
                hits += len({m.id for m in got[0].matches} & set(plain.search(qb.embedding, 10)[1][0].tolist()))
            if weighted and i < max(repeats // 10, 5):
                for w, tag, active in ((all_w, "26", np.arange(m)), (few_w, "6", np.flatnonzero(few_w))):
                    _, old = clock("old" + tag, old_weighted_scan, qa.attr_embeddings, g.attr_chunks(4096), w, 10)
                    _, new = clock("new" + tag, weighted_scan, qa.attr_embeddings, g.scan_chunks(4096), w, 10)
                    mismatches += int(not np.array_equal(old, new))
                    clock("floor" + tag, floor_read, g, active)
                t0 = time.perf_counter()
                bandwidth_read(g)
                whole = time.perf_counter() - t0
                t["bw26"].append(whole)
                t["bw6"].append(whole * 6 / m)  # rows and norms alike: each attribute is the same share of the bytes
                clock("rt_weighted6", rt.search_embeddings, qb, 10, few_w.tolist())
        p50_faiss = _percentiles(t["faiss"])[0]
        names = {"faiss": "plain FAISS IndexFlatL2, 1 thread (search only)",
                 "explained": "Runtime.search_embeddings (search + explain)",
                 "old26": "weighted scan, previous (all 26 weights non-zero)",
                 "new26": "weighted scan, new (all 26 weights non-zero)",
                 "floor26": "read floor of the new scan (numpy sum over its bytes, 26 attributes + norms)",
                 "bw26": "bandwidth floor of the new scan (its bytes at the contiguous read speed, 26 attributes)",
                 "old6": "weighted scan, previous (6 weights non-zero)",
                 "new6": "weighted scan, new (6 weights non-zero)",
                 "floor6": "read floor of the new scan (numpy sum over its bytes, 6 attributes + norms)",
                 "bw6": "bandwidth floor of the new scan (its bytes at the contiguous read speed, 6 attributes)",
                 "rt_weighted6": "Runtime.search_embeddings with 6 weights non-zero (scan + explain)"}
        for key, name in names.items():
            if not t[key]:
                continue
            p50, p99, mean = _percentiles(t[key])
            note = f"{len(t[key])} varied queries"
            if key == "explained":
                note += f"; {searches() / repeats:.3f} index searches per query ({type(g._index).__name__}"
                note += f" {dict(index.params)}, recall@10 {hits / (10 * repeats):.4f})" if index is not None else ")"
            if key.startswith("new"):
                note += (f"; ids differ from the previous scan in {mismatches} of {2 * len(t[key])} queries "
                         "(both weight sets)")
            rows.append({"benchmark": "search k=10", "setting": f"{name}; {n} entries", "value": p50,
                         "unit": "ms p50", "p99_ms": p99, "mean_ms": mean, "ratio_to_faiss_p50": p50 / p50_faiss,
                         "note": note})
    return rows


def _count_index_searches(gallery: Gallery):
    """Count the index searches the gallery's ranking makes from now on (a re-ranking that is not settled repeats one);
    returns a function giving the count."""
    index = gallery._index
    method, calls = index.search_floor, [0]  # what Gallery.rank calls, once per round

    def counted(*args: object) -> object:
        calls[0] += 1
        return method(*args)

    index.search_floor = counted
    return lambda: calls[0]


_SERVE = """
import sys, numpy as np
from pathlib import Path
sys.argv = sys.argv[:1]
from resampling import queries
from attrimeter.runtime.gallery import Gallery
source = Gallery.open({source!r}, progress=False)
qs = queries(source, 1000, seed=2)
if {kind!r} == "runtime":
    from attrimeter.runtime.runtime import Runtime, RuntimeConfig
    rt = Runtime({export!r}, {gallery!r}, RuntimeConfig(verify=False))
    for q in qs:
        rt.search_embeddings(q, k=10)
else:
    import faiss, onnxruntime as ort
    session = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
    g = Gallery.open({gallery!r}, progress=False)
    index = faiss.IndexFlatL2(g.dim)
    index.add(g.embeddings(np.arange(len(g))))
    g.close()
    faiss.omp_set_num_threads(1)
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    session.run(None, {{session.get_inputs()[0].name: np.zeros(shape, np.float32)}})
    for q in qs:
        index.search(q.embedding, 10)
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
print(status["VmRSS"].split()[0], status["VmHWM"].split()[0])
"""


def rss_rows(export: Path, gallery: Path, source: Path) -> list[dict]:
    """VmRSS / VmHWM (MiB) of a runtime process and of a plain ONNX Runtime + FAISS one, each after 1,000 searches."""
    out = {}
    for kind in ("runtime", "plain"):
        code = _SERVE.format(kind=kind, export=str(export), gallery=str(gallery), source=str(source),
                             model=str(export / "model.onnx"))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent)
        rss, hwm = (int(v) / 1024 for v in done.stdout.split()[-2:])
        out[kind] = (rss, hwm)
    ratio = out["runtime"][0] / out["plain"][0]
    return [{"benchmark": "serving memory", "setting": f"{name}, after 1,000 varied searches", "value": out[k][0],
             "unit": "MiB VmRSS", "note": f"VmHWM {out[k][1]:.0f} MiB" + (f"; {ratio:.2f}× plain" if k == "runtime"
                                                                          else "")}
            for k, name in (("runtime", "Runtime process (model loaded, gallery open)"),
                            ("plain", "ONNX Runtime session + FAISS IndexFlatL2 process"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True, help="a real gallery made by the export's model")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--plain-only", action="store_true",
                        help="only plain vs explained search (no weighted scans, no memory): for large galleries")
    parser.add_argument("--name", default="search_costs_cpu", help="results file stem (default search_costs_cpu)")
    parser.add_argument("--index", choices=["flat", "ivf", "hnsw"], help="the runtime's search index (default flat)")
    parser.add_argument("--index-param", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with Gallery.open(args.source, progress=False) as source, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gallery"
        fill_gallery(path, source, args.entries)
        index = None if args.index is None else IndexChoice.parse(args.index, args.index_param)
        rows = timing_rows(args.export, path, source, args.repeats, weighted=not args.plain_only, index=index)
        if not args.plain_only:
            rows += rss_rows(args.export, path, args.source)
    stamped = stamp("cpu", "onnxruntime", os.cpu_count() or 1)
    what = (f"{args.entries} entries resampled with 5 % noise from the demo gallery's real embeddings; every query "
            f"distinct (source rows with noise), contenders alternated call by call in one process. Load average "
            f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (machine shared).")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = write_report(rows, stamped, args.out, args.name, what, command)
    text = text.replace("# Runtime,", "# Single-machine search costs,", 1) + "\n" + targets(rows) + "\n"
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


def targets(rows: list[dict]) -> str:
    """The issue's targets, checked against the measured p50s."""
    value = {r["setting"].split(";")[0]: r["value"] for r in rows}
    explained = value["Runtime.search_embeddings (search + explain)"] / value[
        "plain FAISS IndexFlatL2, 1 thread (search only)"]
    met = {True: "met", False: "NOT met"}
    line = f"- explained / plain FAISS p50 {explained:.2f}× (target <= 1.10×): {met[explained <= 1.10]}"
    if "weighted scan, new (6 weights non-zero)" not in value:
        return "\n".join(["## Targets", "", line])
    new26 = value["weighted scan, new (all 26 weights non-zero)"]
    new6 = value["weighted scan, new (6 weights non-zero)"]
    read26 = new26 / value["read floor of the new scan (numpy sum over its bytes, 26 attributes + norms)"]
    read6 = new6 / value["read floor of the new scan (numpy sum over its bytes, 6 attributes + norms)"]
    bw26 = new26 / value["bandwidth floor of the new scan (its bytes at the contiguous read speed, 26 attributes)"]
    bw6 = new6 / value["bandwidth floor of the new scan (its bytes at the contiguous read speed, 6 attributes)"]
    speed26 = value["weighted scan, previous (all 26 weights non-zero)"] / value[
        "weighted scan, new (all 26 weights non-zero)"]
    speed6 = value["weighted scan, previous (6 weights non-zero)"] / value["weighted scan, new (6 weights non-zero)"]
    rss = rows[-2]["value"] / rows[-1]["value"]
    return "\n".join([
        "## Targets", "", line,
        f"- weighted scan: {speed26:.2f}× faster than the previous scan with 26 weights, {speed6:.2f}× with 6",
        f"- weighted scan vs its bandwidth floor (target <= 2×): {bw26:.2f}× with 26 weights "
        f"({met[bw26 <= 2]}), {bw6:.2f}× with 6 ({met[bw6 <= 2]}); vs its numpy read floor {read26:.2f}× and "
        f"{read6:.2f}×",
        f"- serving RSS {rss:.2f}× a plain ONNX Runtime + FAISS process (target <= 2×): {met[rss <= 2]}"])


if __name__ == "__main__":
    main()
