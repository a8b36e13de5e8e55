"""The torch-free runtime on this machine: embed throughput, search+explain latency on a large gallery against plain
FAISS, and the resident memory of a serving process.

* embed: JPEG files → embeddings through ``Runtime.embed`` (decode, dynamic batching, ONNX Runtime), from one caller
  with batches of 32 and from 8 concurrent single-image callers (with and without dynamic batching);
* search: a gallery of ``--entries`` generated entries (the demo gallery's real embeddings, resampled with noise, so
  distances look like real ones) searched one query at a time at k = 10: plain FAISS ``IndexFlatL2`` on the same
  vectors, the runtime's search + explanation of the hits from embeddings, the same from a JPEG (embedding included),
  and the attribute-weighted search (exact scan of the float16 attribute store);
* serve: ``attrimeter serve`` on that gallery in a child process; VmRSS/VmHWM after warm-up requests, and whether
  torch or triton is mapped into it.

Writes ``runtime_cpu.{csv,md}`` (``runtime_<backend>_<device>.*`` on a GPU), stamped with device, versions and date,
under ``--out``. On a GPU box: ``--backend torch --entries 1000000`` measures the fused Triton search.

    python benchmarks/bench_runtime.py --export runs/demo/export --data runs/demo/data
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import json
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import numpy as np
from resampling import fill_gallery

from attrimeter.runtime.runtime import Runtime, RuntimeConfig


def _percentiles(times: list[float]) -> tuple[float, float, float]:
    a = 1000 * np.asarray(times)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.mean())


def _embed_rows(export: Path, files: list[Path], backend: str, threads: int) -> list[dict]:
    rows = []
    with Runtime(export, config=RuntimeConfig(backend=backend, threads=threads, max_batch=32)) as rt:
        rt.embed(files[:32])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, len(files), 32):
            rt.embed(files[s:s + 32])
        rate = len(files) / (time.perf_counter() - t0)
        rows.append({"benchmark": "embed", "setting": "1 caller, 32 JPEGs per call", "value": rate,
                     "unit": "images/s"})
    for max_batch, label in ((32, "dynamic batching up to 32, 2 ms wait"), (1, "no batching (max batch 1)")):
        with Runtime(export, config=RuntimeConfig(backend=backend, threads=threads, max_batch=max_batch)) as rt:
            rt.embed(files[:8])
            chunks = [files[i::8] for i in range(8)]
            t0 = time.perf_counter()
            workers = [threading.Thread(target=lambda c: [rt.embed(f) for f in c], args=(c,)) for c in chunks]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rate = len(files) / (time.perf_counter() - t0)
            stats = rt.stats()
            mean_batch = stats["images"] / max(stats["batches"], 1)
        rows.append({"benchmark": "embed", "setting": f"8 concurrent callers, 1 JPEG per call, {label}",
                     "value": rate, "unit": "images/s", "note": f"mean batch {mean_batch:.1f}"})
    return rows


def search_rows(export: Path, gallery: Path, queries: list[Path], backend: str, threads: int, repeats: int,
                baseline_repeats: int | None = None, fused: bool | None = None) -> list[dict]:
    """p50 / p99 / mean latency of one query at k = 10: plain FAISS, the runtime from embeddings, from a JPEG, and
    the attribute-weighted search (``repeats`` timed calls each; ``baseline_repeats`` for FAISS, default the same).
    ``fused`` is passed to :class:`Runtime` (True: the fused Triton search, or an error).
    """
    import faiss

    rows = []
    with Runtime(export, gallery, RuntimeConfig(backend=backend, threads=threads, verify=False, fused=fused)) as rt:
        n = len(rt.gallery)
        emb = rt.embed(queries)
        vectors = rt.gallery.embeddings(np.arange(n))
        plain = faiss.IndexFlatL2(vectors.shape[1])
        plain.add(vectors)

        def timed(fn, repeats: int = repeats) -> list[float]:
            times = []
            for i in range(repeats):
                t0 = time.perf_counter()
                fn(i % len(queries))
                times.append(time.perf_counter() - t0)
            return times

        one = [type(emb)(emb.embedding[i:i + 1], emb.attr_embeddings[i:i + 1], emb.probs[i:i + 1], emb.aam[i:i + 1])
               for i in range(len(queries))]
        ignore = {a: 0.0 for a in rt.attributes if a.startswith(("up", "down")) and a not in ("up", "down")}
        # Warm-up of each timed path at its own batch size: builds the runtime's index, compiles and autotunes kernels.
        rt.search_embeddings(one[0], k=10)
        rt.search_embeddings(one[0], k=10, weights=ignore)
        rt.search(queries[0], k=10)
        faiss_t = timed(lambda i: plain.search(one[i].embedding, 10), baseline_repeats or repeats)
        explain_t = timed(lambda i: rt.search_embeddings(one[i], k=10))
        full_t = timed(lambda i: rt.search(queries[i], k=10))
        weighted_t = timed(lambda i: rt.search_embeddings(one[i], k=10, weights=ignore), max(repeats // 10, 5))
        p50_faiss = _percentiles(faiss_t)[0]
        for name, times in (("plain FAISS IndexFlatL2 (search only)", faiss_t),
                            ("runtime search + explain, from embeddings", explain_t),
                            ("runtime search + explain, from a JPEG (embedding included)", full_t),
                            (f"weighted search ignoring {len(ignore)} clothing colours + explain (exact scan)",
                             weighted_t)):
            p50, p99, mean = _percentiles(times)
            rows.append({"benchmark": "search k=10", "setting": f"{name}; {n} entries", "value": p50, "unit": "ms p50",
                         "p99_ms": p99, "mean_ms": mean, "ratio_to_faiss_p50": p50 / p50_faiss})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_rows(export: Path, gallery: Path, queries: list[Path], backend: str, threads: int) -> list[dict]:
    port = _free_port()
    cli = Path(sys.executable).with_name("attrimeter")
    proc = subprocess.Popen([str(cli), "serve", "--export", str(export), "--gallery", str(gallery), "--port",
                             str(port), "--threads", str(threads), "--backend", backend, "--no-verify", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stderr.read().decode()) from None
                time.sleep(0.5)
        body = json.dumps({"images": [base64.b64encode(queries[0].read_bytes()).decode()], "k": 10}).encode()
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            req = urllib.request.Request(f"{url}/search", data=body, headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=30).read()
            times.append(time.perf_counter() - t0)
        status = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if ":" in line)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        heavy = sorted({name for name in ("libtorch", "torch/lib", "triton") if name in maps})
    finally:
        proc.terminate()
        proc.wait(30)
    p50, p99, _ = _percentiles(times)
    return [
        {"benchmark": "serve", "setting": "resident memory after 50 searches (VmRSS)",
         "value": int(status["VmRSS"].split()[0]) / 1024, "unit": "MiB",
         "note": f"peak VmHWM {int(status['VmHWM'].split()[0]) / 1024:.0f} MiB; torch/triton mapped: {heavy or 'no'}"},
        {"benchmark": "serve", "setting": "HTTP POST /search, 1 JPEG, k=10 (loopback, JSON)", "value": p50,
         "unit": "ms p50", "p99_ms": p99},
    ]


def stamp(device: str, backend: str, threads: int) -> dict[str, str]:
    """Device, backend, versions and date for every row."""
    cpu = f"CPU {platform.processor() or platform.machine()}, {threads} threads"
    return {"device": cpu if device == "cpu" else f"{device}, {cpu}", "backend": backend,
            "onnxruntime": version("onnxruntime"), "faiss": version("faiss-cpu"), "numpy": np.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def write_report(rows: list[dict], stamped: dict[str, str], out: Path, name: str, what: str, command: str) -> str:
    """Write ``out/name.csv`` and ``out/name.md``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    keys = ["benchmark", "setting", "value", "unit", "p99_ms", "mean_ms", "ratio_to_faiss_p50", "note", *stamped]
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **stamped})
    lines = [f"# Runtime, {stamped['backend']} backend ({stamped['device']})", "",
             f"onnxruntime {stamped['onnxruntime']}, faiss-cpu {stamped['faiss']}, numpy {stamped['numpy']}, "
             f"Python {stamped['python']}; {stamped['date'][:10]}. {what} Command: `{command}`.", "",
             "| benchmark | setting | value | p99 | vs FAISS (p50) | note |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        p99 = f"{r['p99_ms']:.2f} ms" if "p99_ms" in r else ""
        ratio = f"{r['ratio_to_faiss_p50']:.2f}×" if "ratio_to_faiss_p50" in r else ""
        lines.append(f"| {r['benchmark']} | {r['setting']} | {r['value']:.2f} {r['unit']} | {p99} | {ratio} | "
                     f"{r.get('note', '')} |")
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=Path("runs/demo/export"), help="portable export folder")
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"), help="data folder (JPEGs)")
    parser.add_argument("--entries", type=int, default=100_000, help="gallery entries for search (default 1e5)")
    parser.add_argument("--repeats", type=int, default=200, help="timed searches per setting (default 200)")
    parser.add_argument("--threads", type=int, default=2, help="backend CPU threads (default 2)")
    parser.add_argument("--backend", default="auto", help="runtime backend (default auto; torch on a GPU runs the "
                                                          "fused Triton search)")
    parser.add_argument("--work", type=Path, help="scratch folder (default a temporary one; needs ~1.5 GB per 1e5)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"),
                        help="folder for the results (default benchmarks/results)")
    args = parser.parse_args()
    files = sorted((args.data / "bounding_box_test").glob("*.jpg"))
    queries = sorted((args.data / "query").glob("*.jpg"))[:50]
    rows = _embed_rows(args.export, files[:1024], args.backend, args.threads)
    work = Path(tempfile.mkdtemp(dir=args.work))
    try:
        with Runtime(args.export, work / "real", RuntimeConfig(create_gallery=True, threads=args.threads)) as rt:
            rt.index_folder(args.data / "bounding_box_test")
            real = rt.gallery
            fill_gallery(work / "large", real, args.entries, workers=args.threads)
        rows += search_rows(args.export, work / "large", queries, args.backend, args.threads, args.repeats)
        rows += _serve_rows(args.export, work / "large", queries, args.backend, args.threads)
        with Runtime(args.export, config=RuntimeConfig(backend=args.backend)) as rt:
            device = rt.backend.device
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = "runtime_cpu" if device == "cpu" else f"runtime_{args.backend}_{device.replace(':', '')}"
    command = (f"python benchmarks/bench_runtime.py --export {args.export} --data {args.data} --backend "
               f"{args.backend} --entries {args.entries}")
    print(write_report(rows, stamp(device, args.backend, args.threads), args.out, name,
                       f"Demo model ({args.export}).", command))


if __name__ == "__main__":
    main()
