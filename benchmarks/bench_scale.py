"""10^6 entries in 1, 2 and 4 shards on this machine: indexing throughput, explained search p50/p99, fan-out overhead,
memory and disk per entry (issue 17 item 7; docs/architecture.md §11). The 10^8 model built on these figures is
``results/capacity_model.md``.

For each shard count N, one after the other (only one layout on disk at a time, deleted after it is measured):

* write: ``--entries`` entries resampled from a real gallery (``resampling.resampled_chunks``: global and attribute
  embeddings with noise, probabilities, the source rows' maps; metadata the size of the source's) through the writer
  that ``attrimeter index --ray`` runs (``ShardWriter`` per shard, here in this process, segments of ``--segment``),
  routed by ``shard_of(key, N)``, with the ``shards.json`` published before and after; throughput = entries / wall
  time of the writers' calls, and disk bytes per entry;
* search: varied queries (``resampling.queries``) at k = 10 through ``Runtime.search_embeddings``, plain (FAISS on
  every shard, merge, explain the 10 hits) and weighted (clothing colours ignored: exact scan), the settings taking
  turns query by query: for N = 1 the one store and the 1-shard gallery opened in-process and in a Ray actor; for
  N = 2, 4 the sharded gallery in-process and in Ray actors. Every answer is checked against the one store's (keys
  and d). A plain FAISS ``IndexFlatL2`` on the same global embeddings is timed alongside in every layout, so that the
  overhead against the one store (measured with N = 1) can be corrected for load changing between layouts;
* memory: VmRSS (anonymous and file-backed) of a serving process (one store, or the sharded gallery in-process) after
  plain and weighted searches, and of each Ray shard actor.

Separately, the embedding rate of the indexing pipeline on ``--images`` real demo crops, ONNX Runtime on this CPU,
``Runtime.index_folder`` against ``index_sharded`` (``index --ray``): the end-to-end indexing rate is the slower of
embedding and writing.

Writes ``scale_cpu.{csv,md}`` under ``--out``.

    python benchmarks/bench_scale.py --export /work/exp/demo_run/export --source /work/exp/demo_run/gallery \
        --data /work/exp/demo_run/data --work /work/exp/scale
"""

from __future__ import annotations

import os

# One FAISS (OpenMP) thread in every process, before FAISS loads (see bench_sharded.py).
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from bench_sharded import answers, interleaved  # noqa: E402
from resampling import queries, resampled_chunks  # noqa: E402
from run_stamp import stamp, stamp_line, write_csv  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from attrimeter.runtime.distributed.indexing import ShardWriter, index_sharded  # noqa: E402
from attrimeter.runtime.distributed.manifest import manifest_for, shard_of, write_manifest  # noqa: E402
from attrimeter.runtime.distributed.sharded import ShardedGallery  # noqa: E402
from attrimeter.runtime.gallery import Gallery  # noqa: E402
from attrimeter.runtime.runtime import Embeddings, Runtime, RuntimeConfig  # noqa: E402

ONE = "one store"
ANCHOR = "plain FAISS IndexFlatL2 (anchor)"


def write_shards(root: Path, source: Gallery, entries: int, shards: int, segment: int) -> dict[str, Any]:
    """``entries`` resampled entries as an N-shard gallery in ``root``, written as ``index --ray`` writes them.

    Returns:
        Entries, the writers' seconds, wall seconds (drawing included) and disk bytes.
    """
    identity = {"dim": source.dim, "attributes": list(source.attributes), "aam_shape": list(source.aam_shape),
                "model": source.model, "metric": source.metric}
    names = [f"shard-{i:03d}" for i in range(shards)]
    root.mkdir(parents=True)
    for name in names:
        Gallery.create(root / name, dim=source.dim, attributes=source.attributes, aam_shape=source.aam_shape,
                       model=source.model, metric=source.metric).close()
    write_manifest(root, manifest_for(identity, names, [0] * shards))
    # Real metadata sizes: each entry carries its source row's metadata under a key of its own.
    source_meta = source.meta(np.arange(len(source)))
    writers = [ShardWriter(str(root / name), segment) for name in names]
    writing = 0.0
    t0 = time.perf_counter()
    for c in tqdm(resampled_chunks(source, entries, workers=2, maps=True), total=-(-entries // 8192),
                  desc=f"write {shards} shard(s)", unit="chunk", leave=False):
        keys = [f"synthetic-{c.first + i:09d}" for i in range(len(c.embedding))]
        meta = [json.dumps({**{k: v for k, v in source_meta[(c.first + i) % len(source)].items() if k != "id"},
                            "key": key}) for i, key in enumerate(keys)]
        where = np.array([shard_of(k, shards) for k in keys])
        t1 = time.perf_counter()
        for i, w in enumerate(writers):
            sel = np.flatnonzero(where == i)
            w.add([keys[j] for j in sel], c.embedding[sel], c.attr_embeddings[sel], c.probs[sel], c.aam[sel],
                  [meta[j] for j in sel])
        writing += time.perf_counter() - t1
    t1 = time.perf_counter()
    counts = [w.flush() for w in writers]
    for w in writers:
        w.close()
    write_manifest(root, manifest_for(identity, names, counts))
    writing += time.perf_counter() - t1
    wall = time.perf_counter() - t0
    if sum(counts) != entries:
        raise RuntimeError(f"{root}: {sum(counts)} entries written, {entries} drawn")
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"entries": entries, "write_s": writing, "wall_s": wall, "disk_bytes": disk, "counts": counts}


class Anchor:
    """Plain FAISS ``IndexFlatL2`` (1 thread) on the layout's global embeddings, timed like a runtime."""

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        import faiss

        parts = []
        for name in names:
            with Gallery.open(root / name, verify=False, progress=False) as g:
                parts.append(g.embeddings(np.arange(len(g))))
        self.index = faiss.IndexFlatL2(parts[0].shape[1])
        for p in parts:
            self.index.add(p)

    def search_embeddings(self, q: Embeddings, k: int = 10, weights: object = None) -> None:
        self.index.search(q.embedding, k)


def status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in MiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


_SERVE = """
import json, os, sys
os.environ["OMP_NUM_THREADS"] = "1"
sys.argv = sys.argv[:1]
from bench_scale import status
from resampling import queries
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.runtime import Runtime, RuntimeConfig
with Gallery.open({source!r}, progress=False) as source:
    qs = queries(source, {plain}, seed=3)
rt = Runtime({export!r}, {gallery!r}, RuntimeConfig(threads=2, verify=False))
for q in qs:
    rt.search_embeddings(q, k=10)
for q in qs[:{weighted}]:
    rt.search_embeddings(q, k=10, weights={weights!r})
print(json.dumps(status()))
"""


def serving_memory(export: Path, gallery: Path, source: Path, weights: dict[str, float], plain: int,
                   weighted: int) -> dict[str, float]:
    """Memory of a fresh process serving ``gallery`` (in-process shards) after ``plain`` + ``weighted`` searches."""
    code = _SERVE.format(source=str(source), export=str(export), gallery=str(gallery), plain=plain,
                         weighted=weighted, weights=weights)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def embed_rows(export: Path, data: Path, work: Path, images: int) -> list[dict[str, Any]]:
    """Images/s of indexing real crops into a store, without and with ``--ray`` (ONNX Runtime, this CPU).

    Each way runs on 16 crops (warm-up: first-use costs such as Ray Data's), then ``images // 4`` and ``images``
    crops (fresh stores each time): the steady rate is the difference in images over the difference in seconds, so
    the start-up of a run (model load; for Ray, the pipeline and its actors) is reported apart.
    """
    files = sorted((data / "bounding_box_test").glob("*.jpg"))[:images]
    sizes = (16, len(files) // 4, len(files))

    def plain(crops: Path, out: Path) -> int:
        with Runtime(export, out, RuntimeConfig(create_gallery=True, threads=2, verify=False)) as rt:
            return rt.index_folder(crops, progress=False).added

    def ray(crops: Path, out: Path) -> int:
        return index_sharded(export, crops, out, shards=2, verify=False, progress=False).added

    rows = []
    for name, run in (("attrimeter index (Runtime.index_folder, 2 threads)", plain),
                      ("attrimeter index --ray --shards 2 (index_sharded; default pool on 2 CPUs: 1 worker of "
                       "1 thread)", ray)):
        seconds = []
        for n in sizes:
            crops = work / f"crops-{n}"
            crops.mkdir()
            for f in files[:n]:
                (crops / f.name).symlink_to(f.resolve())
            t0 = time.perf_counter()
            if run(crops, work / f"embed-{run.__name__}-{n}") != n:
                raise RuntimeError(f"{name}: not every one of {n} crops was indexed")
            seconds.append(time.perf_counter() - t0)
            shutil.rmtree(crops)
        rate = (sizes[2] - sizes[1]) / (seconds[2] - seconds[1])
        rows.append({"section": "embed", "setting": name, "value": rate, "unit": "images/s", "n": sizes[2],
                     "note": f"start-up {seconds[2] - sizes[2] / rate:.1f} s; {sizes[2]} crops in "
                             f"{seconds[2]:.1f} s, {sizes[1]} in {seconds[1]:.1f} s"})
    return rows


def measure_layout(args: argparse.Namespace, root: Path, shards: int, qs: list[Embeddings],
                   weights: dict[str, float], want: list | None) -> tuple[list[dict[str, Any]], list]:
    """Search and memory rows of one layout; returns them with the one store's answers (N = 1) or ``want``."""
    import ray

    config = RuntimeConfig(threads=2, verify=False)
    names = [f"shard-{i:03d}" for i in range(shards)]
    runtimes: dict[str, Any] = {}
    if shards == 1:
        runtimes[ONE] = Runtime(args.export, root / names[0], config)
    label = f"{shards} shard{'s' if shards > 1 else ''}"
    galleries = {}
    for mode in ("local", "ray"):
        galleries[mode] = ShardedGallery.open(root, mode=mode, verify=False, actor_options={"num_cpus": 0.25})
        runtimes[f"{label}, {mode}"] = Runtime(args.export, galleries[mode], config)
    if want is None:
        want = answers(runtimes[ONE], qs, weights)
    for name, rt in runtimes.items():
        if answers(rt, qs, weights) != want:
            raise RuntimeError(f"{name}: answers differ from the one store's")
    anchor = Anchor(root, names)
    load = os.getloadavg()[0]
    plain = interleaved({ANCHOR: anchor, **runtimes}, qs, None, args.repeats)
    weighted = interleaved(runtimes, qs, weights, args.weighted_repeats)
    rows = []
    for kind, times in (("plain", plain), ("weighted", weighted)):
        for name, t in times.items():
            rows.append({"section": "search", "shards": shards, "setting": name, "search": kind,
                         "p50_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
                         "mean_ms": float(t.mean()), "n": len(t), "load": load})
    for actor in galleries["ray"].actors:
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
        rows.append({"section": "memory", "shards": shards, "setting": f"{label}: one Ray shard actor, after the "
                                                                         "searches above", **status(pid)})
    for rt in runtimes.values():
        rt.close()
    del anchor
    serving = root / names[0] if shards == 1 else root
    mem = serving_memory(args.export, serving, args.source, weights, args.repeats, 2)
    rows.append({"section": "memory", "shards": shards,
                 "setting": f"{ONE if shards == 1 else label + ', local'}: serving process after {args.repeats} plain "
                            "+ 2 weighted searches", **mem})
    return rows, want


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="portable export folder")
    parser.add_argument("--source", type=Path, required=True, help="a real gallery of that export, with maps")
    parser.add_argument("--data", type=Path, required=True, help="the demo data (bounding_box_test crops)")
    parser.add_argument("--entries", type=int, default=1_000_000, help="entries (default 1e6)")
    parser.add_argument("--shards", default="1,2,4", help="shard counts; 1 first (the one store) (default 1,2,4)")
    parser.add_argument("--segment", type=int, default=4096, help="entries per written segment (default 4096)")
    parser.add_argument("--repeats", type=int, default=200, help="plain searches per setting (default 200)")
    parser.add_argument("--weighted-repeats", type=int, default=5, help="weighted searches per setting (default 5)")
    parser.add_argument("--images", type=int, default=2000, help="real crops for the embedding rate (default 2000)")
    parser.add_argument("--work", type=Path, required=True,
                        help="scratch folder (~16 KB per entry; emptied at the end)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"),
                        help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    counts = [int(s) for s in args.shards.split(",")]
    if counts[0] != 1:
        raise SystemExit("--shards must start with 1: the one store every layout is checked against")
    import ray

    load_start = os.getloadavg()[0]
    args.work.mkdir(parents=True, exist_ok=True)
    if any(args.work.iterdir()):
        raise SystemExit(f"{args.work} is not empty")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    rows: list[dict[str, Any]] = []
    try:
        rows += embed_rows(args.export, args.data, args.work, args.images)
        want = None
        with Gallery.open(args.source, verify=False, progress=False) as source:
            qs = queries(source, args.repeats, seed=1)
            weights = {a: 0.0 for a in source.attributes if a.startswith(("up", "down")) and a not in ("up", "down")}
            for shards in counts:
                root = args.work / f"shards-{shards}"
                w = write_shards(root, source, args.entries, shards, args.segment)
                rows.append({"section": "write", "shards": shards, "setting": f"{shards} shard(s), writer path of "
                             "index --ray", **{k: v for k, v in w.items() if k != "counts"},
                             "value": w["entries"] / w["write_s"], "unit": "entries/s",
                             "note": "entries per shard " + ", ".join(map(str, w["counts"]))})
                layout, want = measure_layout(args, root, shards, qs, weights, want)
                rows += layout
                shutil.rmtree(root)
    finally:
        ray.shutdown()
        for p in list(args.work.iterdir()):
            shutil.rmtree(p)
    stamped = stamp(faiss_threads=1)
    stamped["machine"] += f"; load average {load_start:.1f} at the start"
    stamped["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_csv(args.out / "scale_cpu.csv", [{k: r.get(k, "") for k in COLUMNS} for r in rows], stamped)
    text = report(rows, stamped, args)
    (args.out / "scale_cpu.md").write_text(text)
    print(text)


COLUMNS = ("section", "shards", "setting", "search", "value", "unit", "p50_ms", "p99_ms", "mean_ms", "n", "load",
           "entries", "write_s", "wall_s", "disk_bytes", "VmRSS", "RssAnon", "RssFile", "VmHWM", "note")


def report(rows: list[dict[str, Any]], stamped: dict[str, str], args: argparse.Namespace) -> str:
    """The markdown of ``scale_cpu.md``."""
    search = [r for r in rows if r["section"] == "search"]
    p50 = {(r["shards"], r["setting"], r["search"]): r["p50_ms"] for r in search}
    one = {kind: p50[(1, ONE, kind)] for kind in ("plain", "weighted")}
    lines = ["# 10^6 entries in 1, 2 and 4 shards on one machine (CPU)", "", stamp_line(stamped), "",
             f"{args.entries} entries resampled from the demo gallery (global and attribute embeddings with 5 % noise, "
             "probabilities, maps; today's float16 store), written through the `index --ray` writer path "
             "(`ShardWriter` per shard, in one process). One layout at a time on disk. Search: k = 10 through "
             "`Runtime.search_embeddings`, varied queries, the settings taking turns query by query within a layout; "
             "weighted = the 17 clothing-colour weights 0 (exact scan of 9 attributes). FAISS on 1 thread "
             "everywhere; Ray actors (0.25 CPU each) share the same 2 cores, so sharding here measures the fan-out's "
             "cost, not a scale-out. Every sharded answer equals the one store's (keys and d).", "",
             "## Indexing", "", "| step | setting | rate | n | note |", "|---|---|---:|---:|---|"]
    for r in rows:
        if r["section"] == "embed":
            lines.append(f"| embed (real crops) | {r['setting']} | {r['value']:.0f} images/s (steady) | {r['n']} | "
                         f"{r['note']} |")
    for r in rows:
        if r["section"] == "write":
            lines.append(f"| store write | {r['setting']} | {r['value']:.0f} entries/s | {r['entries']} | writers "
                         f"{r['write_s']:.0f} s of {r['wall_s']:.0f} s wall (the rest: drawing the rows); "
                         f"{r['disk_bytes'] / r['entries']:.0f} B on disk per entry; {r['note']} |")
    embed = min(r["value"] for r in rows if r["section"] == "embed")
    write = min(r["value"] for r in rows if r["section"] == "write")
    lines += ["", f"End-to-end indexing runs at the slower of the two: embedding ({embed:.0f} images/s at worst "
                  f"here) against writing ({write:.0f} entries/s at worst), so **embedding bounds indexing** "
                  f"({write / embed:.0f}× slower than the writers on this CPU).", "",
              "## Search + explain, k = 10", "",
              "Overhead vs one store: p50 minus the one store's; in layouts without the one store (2, 4 shards) the "
              "difference is corrected for load changing between layouts by the FAISS anchor timed alongside "
              "(setting − anchor of its layout, minus one store − anchor of the 1-shard layout). Load: the 1-minute "
              "load average as the layout's timing started.", "",
              "| shards | setting | search | queries | p50 | p99 | overhead vs one store (p50) | load |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in search:
        s, kind = r["shards"], r["search"]
        if r["setting"] == ANCHOR:
            over = ""
        elif s == 1 or kind == "weighted":
            over = f"{r['p50_ms'] - one[kind]:+.1f} ms ({r['p50_ms'] / one[kind]:.2f}×)"
        else:
            d = (r["p50_ms"] - p50[(s, ANCHOR, kind)]) - (one[kind] - p50[(1, ANCHOR, kind)])
            over = f"{d:+.1f} ms (anchor-corrected)"
        lines.append(f"| {s} | {r['setting']} | {kind} | {r['n']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
                     f"{over} | {r['load']:.1f} |")
    lines += ["", "Weighted rows in the 2- and 4-shard layouts are compared with the one store's raw (no anchor for "
                  "the scan); with this few weighted queries their p99 is their maximum.", "",
              "## Memory and disk", "",
              "RssAnon: the process's own memory (model, FAISS index, metadata); RssFile: store pages mapped from "
              "the page cache (the weighted scan maps the attribute rows it reads).", "",
              "| shards | process | VmRSS | RssAnon | RssFile | VmHWM | RssAnon per entry |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["section"] == "memory":
            share = args.entries / int(r["shards"]) if "actor" in r["setting"] else args.entries
            lines.append(f"| {r['shards']} | {r['setting']} | {r['VmRSS']:.0f} MiB | {r['RssAnon']:.0f} MiB | "
                         f"{r['RssFile']:.0f} MiB | {r['VmHWM']:.0f} MiB | "
                         f"{r['RssAnon'] * 2**20 / share:.0f} B |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
