"""A capacity and latency model for 10^8 gallery entries, derived from measured figures (issue 17 item 7;
docs/architecture.md §11).

Inputs, all measured on this machine: ``scale_cpu.csv`` (10^6 entries in 1, 2, 4 shards: write and embedding rates,
search + explain latency, Ray fan-out overhead, shard actor memory, disk per entry; ``bench_scale.py``), ``ann_cpu.csv``
(flat and IVF-PQ search at 10^6 entries; ``bench_ann.py``) and ``storage_cpu.csv`` (bytes per entry per storage mode;
``bench_storage.py``). The assumptions (node size, network, shard layout) are the constants below; every figure in
the output says whether it is measured or extrapolated. No GPU figure: none was measured.

Writes ``capacity_model.md`` under ``--out``.

    python benchmarks/capacity_model.py
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np

ENTRIES = 10**8
K = 10
# Assumed node: a dedicated CPU server (not this shared 2-core VM): cores, RAM that shard actors may use (the rest for
# the OS, the page cache and the driver), local NVMe.
NODE_CORES = 16
NODE_RAM_GIB = 128
NODE_RAM_USABLE = 0.75
NODE_DISK_TB = 3.84
# Assumed network between nodes (nothing here crosses one): one round trip per fan-out, and the hit rows each shard
# returns cross it at this rate.
RTT_MS = 0.5
NETWORK_GBIT_S = 10.0
SHARD_COUNTS = (16, 32, 64, 100, 128)
# Payload bytes per entry of the two storage modes (storage_cpu.csv rows): today's, and the compact mode that passes.
TODAY = ("float16", "float16")
# A float16 store's segments also hold their attribute rows attribute by attribute (gallery format 4, for the weighted
# scan): M x C x 2 bytes per entry more than scale_cpu.csv's stores (format 3) held. Computed, not measured.
SCAN_COPY_B = 26 * 256 * 2
COMPACT = ("pcaq-128", "uint8")
IVF = ("ivf", "nprobe=16 rerank=10")


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def fit(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``."""
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


def measured(results: Path) -> dict[str, float]:
    """The figures the model uses, from the three CSVs."""
    scale, ann, storage = (read(results / f"{n}.csv") for n in ("scale_cpu", "ann_cpu", "storage_cpu"))
    m: dict[str, float] = {}
    search = {(int(r["shards"]), r["setting"], r["search"]): r for r in scale if r["section"] == "search"}
    entries = next(int(r["entries"]) for r in scale if r["section"] == "write")
    m["entries"] = entries
    # Today's runtime on one in-process store of 10^6 entries (search with its exact re-ranking, explain the hits).
    local = search[(1, "1 shard, local", "plain")]
    m["runtime_p50_ms"], m["runtime_p99_ms"] = float(local["p50_ms"]), float(local["p99_ms"])
    anchor = search[(1, "plain FAISS IndexFlatL2 (anchor)", "plain")]
    m["faiss_p50_ms"] = float(anchor["p50_ms"])
    # The explanation's own cost: runtime minus plain FAISS where one index search settles the ranking (10^5). The
    # runtime's float16 index is faster than plain FAISS, so this is a lower bound, floored at 0.
    costs = {r["setting"].split(";")[0]: r for r in read(results / "search_costs_cpu.csv")}
    m["explain_p50_ms"] = max(0.0, float(costs["Runtime.search_embeddings (search + explain)"]["value"])
                              - float(costs["plain FAISS IndexFlatL2, 1 thread (search only)"]["value"]))
    m["explain_p99_ms"] = max(float(costs["Runtime.search_embeddings (search + explain)"]["p99_ms"])
                              - float(costs["plain FAISS IndexFlatL2, 1 thread (search only)"]["p99_ms"]),
                              m["explain_p50_ms"])
    # Ray's fan-out cost: Ray actors minus in-process shards, same layout, at 10^5 entries (sharded_cpu.csv), where it
    # is not lost in the search's own spread as it is at 10^6.
    sharded = {(r["setting"], r["search"]): r for r in read(results / "sharded_cpu.csv")}
    shards, over50, over99 = [], [], []
    for n in (1, 2, 4):
        label = f"{n} shard{'s' if n > 1 else ''}"
        ray, loc = sharded[(f"{label}, ray", "plain")], sharded[(f"{label}, local", "plain")]
        shards.append(n)
        over50.append(float(ray["p50_ms"]) - float(loc["p50_ms"]))
        over99.append(float(ray["p99_ms"]) - float(loc["p99_ms"]))
    m["fanout_p50_a"], m["fanout_p50_b"] = fit(shards, over50)
    m["fanout_p99_a"], m["fanout_p99_b"] = fit(shards, over99)
    m["fanout_max_shards"] = max(shards)
    weighted = search[(1, "one store", "weighted")]
    m["weighted_p50_ms"], m["weighted_n"] = float(weighted["p50_ms"]), int(weighted["n"])
    # Shard actor memory: RssAnon = base + bytes per entry x entries held.
    held, anon = [], []
    for r in scale:
        if r["section"] == "memory" and "actor" in r["setting"]:
            held.append(entries / int(r["shards"]))
            anon.append(float(r["RssAnon"]) * 2**20)
    m["actor_base_b"], m["actor_per_entry_b"] = fit(held, anon)
    # the exact index (gallery_index.HalfExactIndex) holds a float16 copy: half the float32 flat index's bytes
    exact_index_b = float(next(r for r in ann if r["index"] == "flat")["index_bytes"]) / 1e6 / 2
    if m["actor_per_entry_b"] < exact_index_b:
        raise ValueError(f"shard actor memory grows by {m['actor_per_entry_b']:.0f} B per entry, less than its exact "
                         "index alone: the memory rows of scale_cpu.csv do not fit the model")
    writes = [r for r in scale if r["section"] == "write"]
    m["disk_per_entry_b"] = float(np.mean([int(r["disk_bytes"]) / int(r["entries"]) for r in writes]))
    m["writer_rate"] = float(next(r["value"] for r in writes if r["shards"] == "1"))
    embed = [float(r["value"]) for r in scale if r["section"] == "embed"]
    m["embed_rate_2cores"] = min(embed)
    flat = next(r for r in ann if r["index"] == "flat")
    ivf = next(r for r in ann if r["index"] == IVF[0] and r["search_params"] == IVF[1])
    m["ann_entries"] = 1_000_000  # bench_ann.py's gallery (ann_cpu.md)
    m["flat_p50_ms"], m["flat_p99_ms"] = float(flat["p50_ms_b1"]), float(flat["p99_ms_b1"])
    m["ivf_p50_ms"], m["ivf_p99_ms"] = float(ivf["p50_ms_b1"]), float(ivf["p99_ms_b1"])
    m["ivf_recall"] = float(ivf["recall_at_10"])
    m["ivf_index_b"] = float(ivf["index_bytes"]) / m["ann_entries"]
    m["flat_index_b"] = float(flat["index_bytes"]) / m["ann_entries"]
    m["exact_index_b"] = m["flat_index_b"] / 2  # the float16 copy of the exact index
    payload = {(r["attr_codec"], r["map_codec"]): float(r["entry_bytes"]) for r in storage}
    m["payload_today_b"], m["payload_compact_b"] = payload[TODAY], payload[COMPACT]
    return m


def design(m: dict[str, float], shards: int, index: str, storage: str) -> dict[str, float]:
    """Nodes, memory, disk and one-query latency of ``ENTRIES`` in ``shards`` shards (one core each)."""
    per_shard = ENTRIES / shards
    if index == "flat":  # today's runtime measured on a store of m["entries"]: search, exact re-ranking, explanation
        scale = per_shard / m["entries"]  # taken as linear in a shard's entries
        search50, search99, index_b = m["runtime_p50_ms"] * scale, m["runtime_p99_ms"] * scale, m["exact_index_b"]
    else:
        scale = per_shard / m["ann_entries"]  # linear: conservative for IVF-PQ, whose lists grow slower with nlist
        search50 = m["ivf_p50_ms"] * scale + m["explain_p50_ms"]
        search99, index_b = m["ivf_p99_ms"] * scale + m["explain_p99_ms"], m["ivf_index_b"]
    # The actor's memory without its exact index (what the store itself keeps per entry), plus the chosen index.
    ram_b = shards * m["actor_base_b"] + ENTRIES * (m["actor_per_entry_b"] - m["exact_index_b"] + index_b)
    overhead = m["disk_per_entry_b"] - m["payload_today_b"]  # metadata, norms, file headers: kept in compact mode
    payload_b = m["payload_today_b"] + SCAN_COPY_B if storage == "today" else m["payload_compact_b"]
    disk_b = ENTRIES * (payload_b + overhead)
    row_b = m["payload_today_b"] if storage == "today" else m["payload_compact_b"]
    nodes = max(math.ceil(shards / NODE_CORES), math.ceil(ram_b / (NODE_RAM_GIB * 2**30 * NODE_RAM_USABLE)),
                math.ceil(disk_b / (NODE_DISK_TB * 1e12)))
    # Each shard returns its k hits' rows; those of shards on other nodes cross the network.
    remote = shards * (nodes - 1) / nodes
    transfer_ms = remote * K * row_b * 8 / (NETWORK_GBIT_S * 1e9) * 1e3
    fan50 = m["fanout_p50_a"] + m["fanout_p50_b"] * shards
    fan99 = max(m["fanout_p99_a"] + m["fanout_p99_b"] * shards, fan50)  # two fits: keep the tail above the median
    net = (RTT_MS if nodes > 1 else 0.0) + transfer_ms
    # The exact weighted scan reads every entry's attribute rows; at the measured per-entry cost when they are in the
    # page cache, one core per shard.
    weighted = m["weighted_p50_ms"] / m["entries"] * per_shard + fan50 + net
    return {"shards": shards, "per_shard": per_shard, "weighted_p50": weighted, "nodes": nodes,
            "ram_gib": ram_b / 2**30,
            "disk_tb": disk_b / 1e12, "search_p50": search50, "search_p99": search99, "fan_p50": fan50,
            "fan_p99": fan99, "net": net, "p50": search50 + fan50 + net, "p99": search99 + fan99 + net,
            "qps": 1000 / search50}


def table(m: dict[str, float], index: str, storage: str) -> tuple[list[str], dict[str, float]]:
    """Markdown rows of one design over ``SHARD_COUNTS``, and the row with the lowest p99 (then fewest nodes)."""
    rows = [design(m, s, index, storage) for s in SHARD_COUNTS]
    lines = ["| shards | entries / shard | nodes | RAM (all nodes) | disk (all nodes) | shard search p50 / p99 | "
             "fan-out p50 / p99 | network | **p50 / p99** | queries/s ceiling | weighted p50 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in rows:
        weighted = f"{d['weighted_p50'] / 1000:.1f} s" if storage == "today" else "not measured"
        lines.append(f"| {d['shards']} | {d['per_shard']:,.0f} | {d['nodes']} | {d['ram_gib']:.0f} GiB | "
                     f"{d['disk_tb']:.2f} TB | {d['search_p50']:.1f} / {d['search_p99']:.1f} ms | "
                     f"{d['fan_p50']:.0f} / {d['fan_p99']:.0f} ms | {d['net']:.1f} ms | "
                     f"**{d['p50']:.0f} / {d['p99']:.0f} ms** | {d['qps']:.0f} | {weighted} |")
    best = min(rows, key=lambda d: (round(d["p99"]), d["nodes"]))
    return lines, best


def report(m: dict[str, float]) -> str:
    """The markdown of ``capacity_model.md``."""
    today, best_today = table(m, "flat", "today")
    future, best_future = table(m, "ivf", "compact")
    embed_core = m["embed_rate_2cores"] / 2
    core_hours = ENTRIES / embed_core / 3600
    attr_tb = ENTRIES * m["payload_today_b"] * 13312 / 16104 / 1e12
    return "\n".join([
        "# Capacity and latency model: 10^8 entries", "",
        "Derived by `python benchmarks/capacity_model.py` from figures measured on this machine (2 shared CPU "
        "cores, no GPU): [scale_cpu.md](scale_cpu.md) (10^6 entries in 1, 2, 4 shards), [ann_cpu.md](ann_cpu.md) "
        "(flat and IVF-PQ at 10^6) and [storage_cpu.md](storage_cpu.md) (bytes per entry). Demo model shapes "
        "(C = 256, M = 26 attributes, 8×4 maps); a larger model scales the bytes with C. One query at a time, k = 10, "
        "search + explain of the 10 hits. No GPU figure: none was measured.", "",
        "## Headline", "",
        f"- **Exact search, float16 store** (`attrimeter index --storage float16`): {best_today['shards']} shards of "
        f"{best_today['per_shard']:,.0f} entries on **{best_today['nodes']} nodes** of {NODE_CORES} cores / "
        f"{NODE_RAM_GIB} GiB: **{best_today['ram_gib']:.0f} GiB RAM, {best_today['disk_tb']:.2f} TB disk, p99 ≈ "
        f"{best_today['p99']:.0f} ms** (p50 ≈ {best_today['p50']:.0f} ms).",
        f"- **With the approximate index and compact storage** (`--index ivf --storage compact`: IVF-PQ nprobe 16 + "
        f"exact re-ranking, recall@10 {m['ivf_recall']:.3f} at 10^6; pcaq-128 + uint8 maps): {best_future['shards']} "
        f"shards on **{best_future['nodes']} node{'s' if best_future['nodes'] > 1 else ''}**: "
        f"**{best_future['ram_gib']:.0f} GiB RAM, "
        f"{best_future['disk_tb']:.2f} TB disk, p99 ≈ {best_future['p99']:.0f} ms**, dominated by the Ray fan-out "
        "(extrapolated).",
        f"- **Indexing** is bounded by embedding: {embed_core:.0f} images/s per CPU core measured "
        f"(the store writes {m['writer_rate']:.0f} entries/s per writer) → {core_hours:,.0f} core-hours for 10^8 "
        "images on CPUs.",
        f"- **Weighted (exact scan) search does not scale to 10^8 interactively**: seconds per query even with all "
        f"{attr_tb:.2f} TB of attribute rows in RAM (table column \"weighted p50\").", "",
        "## Measured inputs", "",
        "| figure | value | source |", "|---|---:|---|",
        f"| disk per entry, today's float16 store (metadata, norms, headers included) | {m['disk_per_entry_b']:.0f} B "
        "| scale_cpu (measured) |",
        f"| payload per entry: today / compact (pcaq-128 + uint8) | {m['payload_today_b']:.0f} / "
        f"{m['payload_compact_b']:.0f} B | storage_cpu (measured) |",
        f"| float16 store's scan copy per entry (gallery format 4, after scale_cpu was measured) | {SCAN_COPY_B} B | "
        "computed: M × C × 2 |",
        f"| search + explain, today's runtime, one in-process store of 10^6 entries, p50 / p99 | "
        f"{m['runtime_p50_ms']:.0f} / {m['runtime_p99_ms']:.0f} ms (plain FAISS alongside: {m['faiss_p50_ms']:.0f} "
        "ms p50) | scale_cpu (measured) |",
        f"| flat FAISS, 1 thread, 10^6 entries (another gallery), p50 / p99 | {m['flat_p50_ms']:.1f} / "
        f"{m['flat_p99_ms']:.1f} ms | ann_cpu (measured) |",
        f"| IVF-PQ nprobe 16 + re-rank, 1 thread, 10^6 entries, p50 / p99 | {m['ivf_p50_ms']:.2f} / "
        f"{m['ivf_p99_ms']:.2f} ms | ann_cpu (measured) |",
        f"| index bytes per entry: float32 flat / exact float16 copy / IVF-PQ | {m['flat_index_b']:.0f} / "
        f"{m['exact_index_b']:.0f} / {m['ivf_index_b']:.0f} B | ann_cpu (measured; the float16 copy is half the "
        "flat index) |",
        f"| explaining the 10 hits (runtime − plain FAISS at 10^5 entries, floored at 0), p50 / p99 | "
        f"{m['explain_p50_ms']:.1f} / "
        f"{m['explain_p99_ms']:.1f} ms | search_costs_cpu (measured) |",
        f"| Ray fan-out (Ray actors − in-process shards, 10^5 entries), p50 | {m['fanout_p50_a']:.1f} + "
        f"{m['fanout_p50_b']:.2f} ms × shards | sharded_cpu (fit over 1–{m['fanout_max_shards']:.0f} shards) |",
        f"| the same, p99 | {m['fanout_p99_a']:.1f} + {m['fanout_p99_b']:.2f} ms × shards | sharded_cpu (fit) |",
        f"| shard actor memory (RssAnon) | {m['actor_base_b'] / 2**20:.0f} MiB + {m['actor_per_entry_b']:.0f} B × "
        "entries | scale_cpu (fit) |",
        f"| weighted search, one store, 10^6 entries, p50 ({m['weighted_n']} queries) | {m['weighted_p50_ms']:.0f} ms "
        "| scale_cpu (measured) |",
        f"| embedding, real crops, this CPU (slowest way) | {m['embed_rate_2cores']:.0f} images/s on 2 cores | "
        "scale_cpu (measured) |", "",
        "## Assumptions", "",
        f"1. Nodes: dedicated CPU servers of {NODE_CORES} cores, {NODE_RAM_GIB} GiB RAM of which "
        f"{NODE_RAM_USABLE:.0%} for shard actors, {NODE_DISK_TB} TB NVMe; one core per shard actor, so a query's "
        "shard searches run in parallel. Nodes = the most of: shards / cores, RAM / usable RAM, disk / NVMe.",
        f"2. Network (not measured: one machine here): {RTT_MS} ms round trip once per query when there is more than "
        f"one node, and the k hit rows every remote shard returns cross it at {NETWORK_GBIT_S:.0f} Gbit/s (today a "
        "shard returns its k rows with their attribute embeddings, the merge keeps k of shards × k).",
        "3. A shard's cost is linear in its entries, from the 10^6-entry figures: today's runtime as measured on "
        "one store of 10^6 (the 100-shard row needs no scaling); IVF-PQ from ann_cpu (conservative: its lists grow "
        "more slowly when nlist grows with the shard) plus the explanation's cost. **Extrapolated** elsewhere. "
        "The exact runtime searches a float16 copy of the embeddings and re-ranks exactly, one index search per "
        "query (benchmarks/results/search_costs_1e6_cpu.md), so at 10^6 it answers faster than plain float32 FAISS.",
        f"4. The Ray fan-out cost grows linearly with the shard count, fitted on 1–{m['fanout_max_shards']:.0f} "
        "shards (Ray actors minus in-process shards) whose actors shared 2 cores with the driver: **extrapolated "
        "far beyond the measured range**; with a core per actor the per-shard slope should be smaller, with the "
        "driver serialising 100+ calls and merging their rows it may not be. It is the largest uncertainty here.",
        "5. p99 = shard p99 + fan-out p99 + network: a sum of tails (pessimistic for one query), measured on a "
        "shared VM whose load (see the stamps) widens every tail; the maximum over many shards' latencies is not "
        "modelled beyond that.",
        "6. RAM: per shard actor the measured base, plus per entry the measured actor bytes with the exact index "
        "replaced by the chosen index (hit rows are read from disk with positioned reads, so the store's files "
        "need no RAM beyond the page cache). Disk: the chosen payload plus the measured per-entry overhead "
        "(metadata, norms, file headers); no replicas.",
        "7. Weighted search: the exact scan at its measured per-entry cost with the attribute rows in the page "
        "cache, one core per shard; from NVMe it reads every entry's attribute rows (page-granular) and is slower "
        "still. scale_cpu measured it before the compiled scans and float16's scan copy (gallery format 4), which "
        "made it several times faster (search_costs_cpu.md: 77 ms for 26 weights at 10^5 entries), so the column "
        "is pessimistic. Compact rows scan about 9× slower than float16 ones (storage_store_cpu.md, 10^4 "
        "entries), not modelled here.",
        "8. Indexing: embedding rate proportional to cores (measured on 2 shared cores); writers are not the "
        "bottleneck (measured ≥ 10× faster than embedding per process).", "",
        "## Exact search, float16 store", "",
        *today, "",
        "## With IVF-PQ and compact storage (`--index ivf --storage compact`)", "",
        *future, "",
        "## Reading the tables", "",
        f"- The exact runtime costs {m['runtime_p50_ms'] / m['faiss_p50_ms']:.2f}× plain float32 FAISS per "
        "10^6-entry store (assumption 3): its float16 copy halves the bytes a query reads.",
        "- At 10^6 on this machine the sharded layouts answered faster than one store (scale_cpu.md): their shards "
        "search in parallel on its 2 cores, one store on one FAISS thread. The few milliseconds of Ray fan-out are "
        "lost in that, so they are taken from sharded_cpu.md at 10^5.",
        "- With exact search the shard search dominates until shards hold ~10^6 entries; beyond that the "
        "fan-out overhead grows with every shard, so p99 has a minimum near the headline's shard count.",
        "- With IVF-PQ the per-shard search is under a millisecond per 10^6 entries, so fewer, larger shards are "
        "better: the fan-out overhead is the whole latency. A fan-out that sends only ids and scores first and "
        "fetches the final k rows afterwards (not built) would cut the rows crossing the network from shards × k "
        "to k.",
        "- Queries/s ceiling: every shard works on every query, so the cluster answers at most 1000 / (shard "
        "search p50 in ms) queries per second, whatever its size; more throughput needs replicas of the shards.",
        "- Weighted search with compact rows scans about 9× slower than float16 rows (storage_store_cpu.md at "
        "10^4 entries); it is not modelled here.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("results"),
                        help="folder with scale_cpu.csv, ann_cpu.csv, storage_cpu.csv; capacity_model.md goes there")
    args = parser.parse_args()
    text = report(measured(args.results))
    (args.results / "capacity_model.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
