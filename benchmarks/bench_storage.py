"""Compact storage of explanation rows, measured on the demo's model: bytes per entry, errors, explanation metrics.

For each attribute-row codec of :mod:`attrimeter.runtime.codecs` the gallery side of every explanation is encoded and
decoded (queries stay float32, as the model gives them), then measured against the float32 rows:

* bytes per entry of the attribute rows; with each attention-map codec, the whole entry (attribute rows + maps +
  the float32 global embedding + the float32 attribute probabilities; metadata, ~140 bytes of JSON in the demo, left
  out), and how many times fewer than today's store (float16 rows and maps);
* max / mean absolute error of d_k and of the shares p_k over every query x annotated gallery pair of the demo;
* the demo's explanation metrics from the decoded rows: X-mAP_e and X-mAP_c by the paper protocol (every query x
  annotated gallery pair, ``PaperAccumulator``, as ``interpreter_evaluation._paper_protocol``), counterfactual top-1
  and MRR (image a as the query, image b decoded from storage);
* decode + explain latency of one query's top-k (k = 10, 100): gather the stored arrays of k random ids, decode, then
  ``explain_rows`` (in-memory arrays: the store's reads are measured in store_cpu.md).

Distances for the errors and metrics are computed in float64 from the (float32 or decoded) rows, so the errors are the
storage's alone. Trained codecs (pq, pcaq) are fitted on the demo's *training* split, never on the gallery they code.
The default rule: the smallest entry whose shares stay within 1e-2 (max absolute error), whose explanation metrics
stay within 0.005 of float32, and which is at least 3x smaller than today's; maps must be stored (``none`` needs a
recompute path the runtime does not have yet).

    OMP_NUM_THREADS=1 python benchmarks/bench_storage.py --run /work/exp/demo_run --cache /tmp/emb.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from run_stamp import stamp, stamp_line, write_csv
from tqdm.auto import tqdm

from attrimeter.data.formats import DISTRACTOR_PID, load_dataset
from attrimeter.data.truth import read_counterfactual_pairs
from attrimeter.engine.explanation_metrics import PaperAccumulator, counterfactual_scores
from attrimeter.runtime.codecs import STORAGE_MODES, make_codec
from attrimeter.runtime.config import RuntimeConfig
from attrimeter.runtime.decompose import explain_rows
from attrimeter.runtime.runtime import Runtime

ATTR_CODECS = [("float32", {}), ("float16", {}), ("int8", {}), ("pq", {"m": 32}), ("pq", {"m": 64}),
               ("pq", {"m": 128}), ("pcaq", {"bytes_per_row": 64}), ("pcaq", {"bytes_per_row": 96}),
               ("pcaq", {"bytes_per_row": 112}), ("pcaq", {"bytes_per_row": 128}),
               ("pcaq", {"bytes_per_row": 144}), ("pcaq", {"bytes_per_row": 160})]
MAP_CODECS = ["float16", "uint8", "none"]
SHARE_TOL, METRIC_TOL, MIN_RATIO = 1e-2, 0.005, 3.0
METRICS = ("x_map_e", "x_map_c", "cf_top1", "cf_mrr")


def _name(kind: str, params: dict) -> str:
    return kind + "".join(f"-{v}" for v in params.values())


def embed_demo(run: Path, cache: Path | None) -> dict[str, np.ndarray]:
    """Stacked float32 embeddings [n, M+1, C] (and maps) of the demo's train / query / gallery / counterfactual images,
    with identities, attributes and the counterfactual labels."""
    if cache is not None and cache.is_file():
        with np.load(cache) as f:
            return dict(f)
    data = load_dataset(run / "data")
    a, b, changed, _ = read_counterfactual_pairs(data.root, list(data.schema.names))
    sets = {"train": [s.path for s in data.train], "query": [s.path for s in data.query],
            "gallery": [s.path for s in data.gallery], "cf_a": a, "cf_b": b}
    out: dict[str, np.ndarray] = {"changed": changed}
    with Runtime(run / "export", config=RuntimeConfig(queue_timeout_s=600.0)) as rt:
        for name, paths in sets.items():
            parts = [rt.embed([str(p) for p in paths[i:i + 32]]) for i in tqdm(range(0, len(paths), 32),
                                                                              desc=f"embed {name}")]
            out[name] = np.concatenate([p.stacked() for p in parts])
            out[f"{name}_aam"] = np.concatenate([p.aam for p in parts])
    out["q_attrs"] = np.stack([data.attributes[s.pid] for s in data.query])
    annotated = [s for s in data.gallery if s.pid > DISTRACTOR_PID]
    out["g_annotated"] = np.array([s.pid > DISTRACTOR_PID for s in data.gallery])
    out["g_attrs"] = np.stack([data.attributes[s.pid] for s in annotated])
    if cache is not None:
        np.savez(cache, **out)
    return out


def _attr_distances(q: np.ndarray, g: np.ndarray, g_sq: np.ndarray) -> np.ndarray:
    """float64 d_k [Q, G, M] of float64 rows q [Q, M, C], g [G, M, C] (g_sq = |g_k|² [G, M]), one GEMM per k."""
    out = np.empty((len(q), len(g), q.shape[1]))
    q_sq = (q * q).sum(-1)
    for k in range(q.shape[1]):
        out[:, :, k] = q_sq[:, None, k] + g_sq[None, :, k] - 2.0 * (q[:, k] @ g[:, k].T)
    return np.sqrt(np.maximum(out, 0.0))


def measure_attr(e: dict[str, np.ndarray], decoded_g: np.ndarray, decoded_b: np.ndarray, chunk: int = 64) -> dict:
    """Errors against float32 and the explanation metrics of decoded gallery rows (see the module docstring)."""
    annotated = e["g_annotated"]
    q, g = e["query"].astype(np.float64), e["gallery"][annotated].astype(np.float64)
    ref_g, dec_g = g[:, 1:], decoded_g[annotated].astype(np.float64)
    ref_sq, dec_sq = (ref_g * ref_g).sum(-1), (dec_g * dec_g).sum(-1)
    d_all = np.sqrt(np.maximum((q[:, 0] ** 2).sum(1)[:, None] + (g[:, 0] ** 2).sum(1)[None] - 2 * q[:, 0] @ g[:, 0].T,
                               0.0))
    acc = PaperAccumulator()
    err = {"dk_max": 0.0, "dk_sum": 0.0, "share_max": 0.0, "share_sum": 0.0, "n": 0}
    m = ref_g.shape[1]
    for s in range(0, len(q), chunk):
        qq = q[s:s + chunk, 1:]
        ref, dec = _attr_distances(qq, ref_g, ref_sq), _attr_distances(qq, dec_g, dec_sq)
        ref_sh, dec_sh = ref / ref.sum(-1, keepdims=True), dec / dec.sum(-1, keepdims=True)
        for key, a, b in (("dk", ref, dec), ("share", ref_sh, dec_sh)):
            diff = np.abs(a - b)
            err[f"{key}_max"] = max(err[f"{key}_max"], float(diff.max()))
            err[f"{key}_sum"] += float(diff.sum())
        err["n"] += ref.size
        qa, ga = e["q_attrs"][s:s + chunk, None], e["g_attrs"][None]
        acc.add(dec_sh.reshape(-1, m), (qa != ga).reshape(-1, m), d_all[s:s + chunk].reshape(-1),
                dec.mean(-1).reshape(-1), ((qa >= 0) & (ga >= 0)).reshape(-1, m))
    paper = acc.result()
    a_rows = e["cf_a"][:, 1:].astype(np.float64)
    d_cf = np.sqrt(((a_rows - decoded_b.astype(np.float64)) ** 2).sum(-1))
    top1, mrr = counterfactual_scores(d_cf / d_cf.sum(-1, keepdims=True), e["changed"])
    return {"dk_max_abs": err["dk_max"], "dk_mean_abs": err["dk_sum"] / err["n"], "share_max_abs": err["share_max"],
            "share_mean_abs": err["share_sum"] / err["n"], "x_map_e": paper["x_map_e"], "x_map_c": paper["x_map_c"],
            "cf_top1": top1, "cf_mrr": mrr, "pairs": paper["pairs"]}


def latency(codec, stored: dict[str, np.ndarray], global_rows: np.ndarray, query: np.ndarray, k: int,
            repeats: int, rng: np.random.Generator) -> tuple[float, float]:
    """p50 / p99 ms of decode + explain_rows for one query's top-k of random ids."""
    times = []
    for _ in range(repeats):
        ids = np.sort(rng.choice(len(global_rows), k, replace=False))
        start = time.perf_counter()
        rows = codec.decode(stored, ids)
        g = np.concatenate([global_rows[ids, None], rows], axis=1)
        explain_rows(query[None], g[None])
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def map_errors(codec, aam: np.ndarray) -> tuple[int, float]:
    """(bytes per entry, max absolute error relative to each map's maximum) of a map codec (NaN: not stored)."""
    flat = aam.reshape(len(aam), aam.shape[1], -1)
    if codec.kind == "none":
        return 0, float("nan")
    dec = codec.decode(codec.encode(flat))
    rel = np.abs(dec - flat).max(-1) / np.maximum(flat.max(-1), 1e-30)
    return codec.bytes_per_entry(), float(rel.max())


def run(e: dict[str, np.ndarray], repeats: int) -> tuple[list[dict], dict[str, dict]]:
    """One row per attribute codec, and the map codecs' (bytes, error)."""
    m, c = e["gallery"].shape[1] - 1, e["gallery"].shape[2]
    train = e["train"][:, 1:]
    reference: dict | None = None
    rows = []
    rng = np.random.default_rng(0)
    for kind, params in tqdm(ATTR_CODECS, desc="attribute codecs"):
        codec = make_codec(kind, (m, c), **params)
        start = time.perf_counter()
        codec.fit(train)
        fit_s = time.perf_counter() - start
        stored = codec.encode(e["gallery"][:, 1:])
        decoded_g = codec.decode(stored)
        decoded_b = codec.decode(codec.encode(e["cf_b"][:, 1:]))
        result = measure_attr(e, decoded_g, decoded_b)
        if reference is None:  # float32 comes first: the reference
            reference = result
        lat = {}
        for k in (10, 100):
            lat[f"p50_ms_k{k}"], lat[f"p99_ms_k{k}"] = latency(codec, stored, e["gallery"][:, 0], e["query"][0], k,
                                                               repeats, rng)
        note = f"bits per group of 16 axes: {''.join(map(str, codec.bits))}" if kind == "pcaq" else ""
        rows.append({"attr_codec": _name(kind, params), "attr_bytes_per_entry": codec.bytes_per_entry(),
                     "fit_s": fit_s, **result, **{f"delta_{k}": result[k] - reference[k] for k in METRICS}, **lat,
                     "note": note})
    maps = {}
    for kind in MAP_CODECS:
        shape = (m, int(np.prod(e["gallery_aam"].shape[2:])))
        maps[kind] = dict(zip(("bytes", "max_rel_err"), map_errors(make_codec(kind, shape), e["gallery_aam"]),
                              strict=True))
    return rows, maps


def entries(rows: list[dict], maps: dict[str, dict], m: int, c: int) -> list[dict]:
    """Every attribute codec x map codec: bytes per entry, ratio to today's, and the default rule's verdict."""
    fixed = 4 * c + 4 * m  # float32 global embedding and probabilities
    today = next(r for r in rows if r["attr_codec"] == "float16")["attr_bytes_per_entry"] + maps["float16"]["bytes"]
    out = []
    for r in rows:
        accurate = r["share_max_abs"] <= SHARE_TOL and all(abs(r[f"delta_{k}"]) <= METRIC_TOL for k in METRICS)
        for kind, mp in maps.items():
            total = r["attr_bytes_per_entry"] + mp["bytes"] + fixed
            ratio = (today + fixed) / total
            out.append({**r, "map_codec": kind, "map_bytes_per_entry": mp["bytes"],
                        "map_max_rel_err": mp["max_rel_err"], "entry_bytes": total, "ratio_to_today": ratio,
                        "accurate": accurate,
                        "passes": accurate and ratio >= MIN_RATIO and kind != "none"})
    return out


def report(combos: list[dict], maps: dict[str, dict], e: dict[str, np.ndarray], stamped: dict[str, str]) -> str:
    m, c = e["gallery"].shape[1] - 1, e["gallery"].shape[2]
    h, w = e["gallery_aam"].shape[2:]
    attr_rows = [r for r in combos if r["map_codec"] == "float16"]
    ref = attr_rows[0]
    lines = ["# Compact explanation storage (CPU)", "", stamp_line(stamped), "",
             f"Demo model: C = {c}, M = {m}, maps {h}x{w}; {len(e['query'])} queries x {int(e['g_annotated'].sum())} "
             f"annotated gallery entries ({ref['pairs']} pairs) for the errors and X-mAP (paper protocol), "
             f"{len(e['cf_a'])} counterfactual pairs; trained codecs fitted on the {len(e['train'])} training "
             "images. Errors are absolute, against float32 rows; distances computed in float64. Latency: one query's "
             "top-k, decode + `explain_rows`, p50 / p99 over the repeats.", "",
             "## Attribute rows", "",
             "| codec | bytes / entry | d_k err max / mean | share err max / mean | X-mAP_e | X-mAP_c | cf top-1 | "
             "cf MRR | k=10 ms p50 / p99 | k=100 ms p50 / p99 | fit s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in attr_rows:
        lines.append(
            f"| {r['attr_codec']} | {r['attr_bytes_per_entry']} | {r['dk_max_abs']:.2e} / {r['dk_mean_abs']:.1e} | "
            f"{r['share_max_abs']:.2e} / {r['share_mean_abs']:.1e} | {r['x_map_e']:.4f} | {r['x_map_c']:.4f} | "
            f"{r['cf_top1']:.4f} | {r['cf_mrr']:.4f} | {r['p50_ms_k10']:.2f} / {r['p99_ms_k10']:.2f} | "
            f"{r['p50_ms_k100']:.2f} / {r['p99_ms_k100']:.2f} | {r['fit_s']:.1f} |")
    notes = [f"{r['attr_codec']}: {r['note']}" for r in attr_rows if r["note"]]
    lines += ["", *[f"- {n}" for n in notes], "", "## Attention maps", "",
              "| codec | bytes / entry | max error / map max |", "|---|---:|---:|"]
    for kind, mp in maps.items():
        err = "not stored: recomputed from the crop (path not built)" if kind == "none" else f"{mp['max_rel_err']:.2e}"
        lines.append(f"| {kind} | {mp['bytes']} | {err} |")
    today = next(r for r in combos if r["attr_codec"] == "float16" and r["map_codec"] == "float16")
    lines += ["", "## Whole entry", "",
              f"Attribute rows + maps + float32 global embedding ({4 * c} B) + float32 probabilities ({4 * m} B). "
              f"Today (float16 rows and maps): {today['entry_bytes']} B per entry.", "",
              "| attribute rows | maps | bytes / entry | fewer than today | shares and metrics within tolerance | "
              "rule |", "|---|---|---:|---:|---|---|"]
    for r in sorted(combos, key=lambda r: r["entry_bytes"]):
        lines.append(f"| {r['attr_codec']} | {r['map_codec']} | {r['entry_bytes']} | {r['ratio_to_today']:.2f}x | "
                     f"{'yes' if r['accurate'] else 'no'} | {'passes' if r['passes'] else ''} |")
    passing = sorted((r for r in combos if r["passes"]), key=lambda r: r["entry_bytes"])
    lines += ["", "## Default rule", "",
              f"The smallest entry whose shares stay within {SHARE_TOL:g} (max absolute error over every pair), whose "
              f"X-mAP_e, X-mAP_c, counterfactual top-1 and MRR stay within {METRIC_TOL} of float32, and which takes at "
              f"least {MIN_RATIO:g}x fewer bytes than today's; maps stored (`none` needs the recompute path).", ""]
    if passing:
        win = passing[0]
        lines.append(f"**Winner: attribute rows `{win['attr_codec']}`, maps `{win['map_codec']}`: "
                     f"{win['entry_bytes']} B per entry, {win['ratio_to_today']:.2f}x fewer than today; share error "
                     f"max {win['share_max_abs']:.2e}, X-mAP_e {win['delta_x_map_e']:+.4f}, cf top-1 "
                     f"{win['delta_cf_top1']:+.4f} against float32.** `STORAGE_MODES` in runtime/codecs.py: "
                     f"{', '.join(f'`{k}`' for k in STORAGE_MODES)}.")
    else:
        lines.append("**No mode meets the rule on this model.**")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a demo run folder (data/, export/)")
    parser.add_argument("--cache", type=Path, help="npz of the embeddings: read when present, else written")
    parser.add_argument("--repeats", type=int, default=200, help="latency repeats per k (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    e = embed_demo(args.run, args.cache)
    rows, maps = run(e, args.repeats)
    m, c = e["gallery"].shape[1] - 1, e["gallery"].shape[2]
    combos = entries(rows, maps, m, c)
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = env + " ".join(["python", "benchmarks/bench_storage.py", *sys.argv[1:]])
    stamped = {**stamp(args.threads), "command": command}
    write_csv(args.out / "storage_cpu.csv", combos, stamped)
    text = report(combos, maps, e, stamped)
    (args.out / "storage_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
