"""What sharding a gallery costs per query on one machine: explained search on one store against the same entries in
1, 2 and 4 shards, opened in-process and held by Ray actors (docs/architecture.md §11).

The gallery: ``--entries`` entries resampled with noise from a real gallery (``resampling.fill_gallery``), split by
the indexing rule (``shard_of(key, N)``) into N gallery stores and a ``shards.json``. Each setting answers the same
queries (real gallery rows with noise) through ``Runtime.search_embeddings`` at k = 10: plain (FAISS on every shard,
merge, explain the final 10) and attribute-weighted (exact scan on every shard). Every sharded answer is checked
against the one store's (same keys, same d). All shards live on this machine, so the figures are the fan-out's
overhead (threads, Ray scheduling and serialisation, the merge), not the speed-up of spreading shards over machines.

Writes ``sharded_cpu.{csv,md}`` under ``--out``.

    python benchmarks/bench_sharded.py --export runs/demo/export --gallery runs/demo/gallery
"""

from __future__ import annotations

import os

# One FAISS (OpenMP) thread in every thread and process, before FAISS loads: Ray gives actors with a fraction of a CPU
# OMP_NUM_THREADS=1, and OpenMP threads that spin on a 2-core machine shared with other work distort the figures.
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from resampling import fill_gallery  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from attrimeter.runtime.distributed.manifest import manifest_for, shard_of, write_manifest  # noqa: E402
from attrimeter.runtime.distributed.sharded import ShardedGallery  # noqa: E402
from attrimeter.runtime.gallery import Gallery  # noqa: E402
from attrimeter.runtime.runtime import Embeddings, Runtime, RuntimeConfig  # noqa: E402

CHUNK = 8192


def split(single: Path, out: Path, shards: int) -> None:
    """The single store's entries, by ``shard_of(key, shards)``, as a sharded gallery in ``out``."""
    names = [f"shard-{i:03d}" for i in range(shards)]
    with Gallery.open(single, verify=False, progress=False) as g:
        stores = [Gallery.create(out / n, dim=g.dim, attributes=g.attributes, aam_shape=None, model=g.model)
                  for n in names]
        for s in tqdm(range(0, len(g), CHUNK), desc=f"split into {shards}", unit="chunk", leave=False):
            ids = np.arange(s, min(s + CHUNK, len(g)))
            meta = [{k: v for k, v in m.items() if k != "id"} for m in g.meta(ids)]
            where = np.array([shard_of(m["key"], shards) for m in meta])
            emb, attr, probs = g.embeddings(ids), g.attr_embeddings(ids), g.probs(ids)
            for i, store in enumerate(stores):
                sel = np.flatnonzero(where == i)
                store.append(emb[sel], attr[sel], probs[sel], [meta[j] for j in sel])
        counts = [len(store) for store in stores]
        identity = {"dim": g.dim, "attributes": list(g.attributes), "aam_shape": None, "model": g.model,
                    "metric": g.metric}
        for store in stores:
            store.close()
    write_manifest(out, manifest_for(identity, names, counts))


def answers(rt: Runtime, queries: list[Embeddings], weights: dict[str, float]) -> list:
    """Keys and d of the hits of a few plain and weighted searches (the exactness check; also warms up)."""
    return [[(m.key, m.d) for m in rt.search_embeddings(q, k=10, weights=w)[0].matches]
            for w in (None, weights) for q in queries[:3]]


def interleaved(runtimes: dict[str, Runtime], queries: list[Embeddings], weights: dict[str, float] | None,
                repeats: int) -> dict[str, np.ndarray]:
    """Latencies (ms) per setting; the settings take turns query by query, so that load from other work on the
    machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for i in tqdm(range(repeats), desc="weighted" if weights else "plain", leave=False):
        for name, rt in runtimes.items():
            t0 = time.perf_counter()
            rt.search_embeddings(queries[i % len(queries)], k=10, weights=weights)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * np.asarray(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=Path("runs/demo/export"), help="portable export folder")
    parser.add_argument("--gallery", type=Path, default=Path("runs/demo/gallery"),
                        help="a real gallery of that export, to resample")
    parser.add_argument("--entries", type=int, default=100_000, help="gallery entries (default 1e5)")
    parser.add_argument("--shards", default="1,2,4", help="shard counts (default 1,2,4)")
    parser.add_argument("--repeats", type=int, default=100, help="timed plain searches per setting (default 100)")
    parser.add_argument("--weighted-repeats", type=int, default=10, help="timed weighted searches (default 10)")
    parser.add_argument("--work", type=Path, help="scratch folder (default a temporary one; ~1.4 GB per 1e5 entries "
                                                  "and layout)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"),
                        help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-sharded-", dir=args.work))
    rows = []
    try:
        single = work / "single"
        with Gallery.open(args.gallery, verify=False) as source:
            fill_gallery(single, source, args.entries)
            attrs = source.attributes
        rng = np.random.default_rng(1)
        with Gallery.open(single, verify=False) as g:
            picks = rng.choice(len(g), 8, replace=False)
            f, fk = g.embeddings(picks), g.attr_embeddings(picks)
            queries = [Embeddings(f[i:i + 1] + 0.01 * rng.standard_normal((1, f.shape[1]), dtype=np.float32),
                                  fk[i:i + 1], g.probs(picks[i:i + 1]), np.zeros((1, len(attrs), 1, 1), np.float32))
                       for i in range(len(picks))]
        weights = {a: 0.0 for a in attrs if a.startswith(("up", "down")) and a not in ("up", "down")}
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        config = RuntimeConfig(threads=2, verify=False)
        runtimes = {"one store": Runtime(args.export, single, config)}
        for shards in (int(s) for s in args.shards.split(",")):
            split(single, work / f"sharded-{shards}", shards)
            for mode in ("local", "ray"):
                sg = ShardedGallery.open(work / f"sharded-{shards}", mode=mode, verify=False,
                                         actor_options={"num_cpus": 0.25})
                runtimes[f"{shards} shard{'s' if shards > 1 else ''}, {mode}"] = Runtime(args.export, sg, config)
        want = answers(runtimes["one store"], queries, weights)
        for name, rt in runtimes.items():
            if answers(rt, queries, weights) != want:
                raise SystemExit(f"{name}: answers differ from the one store's")
        plain = interleaved(runtimes, queries, None, args.repeats)
        weighted = interleaved(runtimes, queries, weights, args.weighted_repeats)
        rows += [(name, kind, t[name]) for name in runtimes for kind, t in (("plain", plain), ("weighted", weighted))]
        for rt in runtimes.values():
            rt.close()
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python benchmarks/bench_sharded.py " + " ".join(sys.argv[1:])
    print(write(rows, args.out, args.entries, command))


def write(rows: list[tuple[str, str, np.ndarray]], out: Path, entries: int, command: str) -> str:
    """``out/sharded_cpu.{csv,md}``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    base = {kind: float(np.median(t)) for setting, kind, t in rows if setting == "one store"}
    stamp = {"device": f"CPU {platform.processor() or platform.machine()}", "ray": version("ray"),
             "faiss": version("faiss-cpu"), "numpy": np.__version__, "python": platform.python_version(),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    table = [{"setting": s, "search": kind, "p50_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
              "mean_ms": float(t.mean()), "overhead_p50_ms": float(np.median(t)) - base[kind],
              "ratio_p50": float(np.median(t)) / base[kind], "repeats": len(t), "entries": entries, **stamp}
             for s, kind, t in rows]
    with (out / "sharded_cpu.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = ["# Sharded explained search on one machine (fan-out overhead)", "",
             f"{stamp['device']}, 2 cores shared with other work; Ray {stamp['ray']}, faiss-cpu {stamp['faiss']}, "
             f"numpy {stamp['numpy']}, Python {stamp['python']}; {stamp['date'][:10]}. {entries} entries resampled "
             "from the demo gallery, one query at k = 10 through `Runtime.search_embeddings` (search, merge, explain "
             "the 10 hits); weighted: the clothing colours ignored (exact scan). FAISS on one thread in every setting; "
             "the settings take turns query by query (load from other work falls on all alike). "
             "Every sharded answer equals the "
             "one store's (keys and d). Ray actors share this machine's 2 cores, so this is the fan-out's cost, not "
             f"a scale-out figure. Command: `{command}`.", "",
             "| setting | search | p50 | p99 | overhead vs one store (p50) |", "|---|---|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['setting']} | {r['search']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
                     f"{r['overhead_p50_ms']:+.2f} ms ({r['ratio_p50']:.2f}×) |")
    text = "\n".join(lines) + "\n"
    (out / "sharded_cpu.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
