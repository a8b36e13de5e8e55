"""Kernel benchmarks: fused Triton kernels against PyTorch baselines (docs/architecture.md §4).

Layout after Liger-Kernel's benchmarks: one setup factory per op builds the inputs and the providers (zero-argument
callables) for one shape; a generic runner times every provider, measures its peak memory on a GPU and turns the
result into rows stamped with device, versions and date.

Ops and providers:

* ``masked_gem_pool``: naive eager (materialises F ⊙ A_k, as the authors' code), factorised eager (the key identity,
  unfused), ``torch.compile`` of both, Triton.
* ``attr_distance``: the full per-attribute distance matrix; naive eager (one ``torch.cdist`` per row), factorised
  eager (batched GEMMs), ``torch.compile`` of both, Triton.
* ``attr_topk``: explained top-k search by ``d`` or by ``Σ w_k d_k``; the torch providers compute the scores (naive:
  the full decomposition; factorised: only what the score needs), then ``torch.topk``, then explain the ids; Triton
  fuses the top-k into the scan.
* ``explain_topk``: the decomposition for Q queries × their k ids; naive = full matrix then gather, factorised =
  gather then direct differences, Triton = the gather-and-explain kernel.

Roofline: the ideal bytes (inputs read once + outputs) over the measured device copy bandwidth and the useful FLOPs
over the measured matmul rate of the dtype; ``roofline_frac`` = roofline time / measured time. Peak memory (GPU only)
is ``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (the inputs), against the
ideal (the outputs). Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed, median and p20/p80 of many runs)
on a GPU, ``time.perf_counter`` on the CPU. On a CPU only the torch providers run (Triton needs a GPU) and
``torch.compile`` providers are skipped unless ``--compile`` is given (compiling on a 2-core CPU takes minutes).

Usage::

    python benchmarks/bench_kernels.py [--op OP ...] [--quick] [--out benchmarks/results] [--dtype float16]
                                       [--filter Q=64 --filter N=100000] [--compile | --no-compile]

Writes ``kernels_<device>.csv``, ``kernels_<device>.md`` and ``kernels_<device>.png`` under ``--out`` (``<device>`` is
``cpu`` or the GPU's name), so runs on different machines sit side by side.

One script of ~630 lines on purpose: the four ops' setups share the runner, the roofline and the row format, and the
GPU check runs it by path; split, one benchmark would be scattered over files that make no sense alone.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

OPS = ("masked_gem_pool", "attr_distance", "attr_topk", "explain_topk")
TORCH_PROVIDERS = ("naive_eager", "factorised_eager", "naive_compile", "factorised_compile")
PROVIDERS = (*TORCH_PROVIDERS, "triton")
SHAPE_KEYS = ("B", "Q", "N", "C", "HW", "M", "k", "order")
COLUMNS = (
    "op", "provider", "dtype", *SHAPE_KEYS, "median_ms", "p20_ms", "p80_ms", "gb_s", "tflop_s", "roofline_frac",
    "speedup_vs_best_torch", "peak_mem_mb", "ideal_mem_mb", "status", "device", "torch", "triton", "date",
)  # fmt: skip
P_GEM = 3.0  # the GeM default exponent (integer p: the kernels' multiplication path)
TOPK = 10

FULL_SHAPES: dict[str, dict[str, Sequence[Any]]] = {
    "masked_gem_pool": {"B": (1, 8, 64, 256), "C": (512, 2048), "HW": (128, 192), "M": (23, 26)},
    "attr_distance": {"Q": (1, 8, 64, 256), "N": (10**3, 10**5, 10**6), "C": (512, 2048), "M": (23, 26)},
    "attr_topk": {"Q": (1, 8, 64, 256), "N": (10**3, 10**5, 10**6), "C": (512, 2048), "M": (26,), "k": (TOPK,),
                  "order": ("d", "weighted")},
    "explain_topk": {"Q": (1, 8, 64, 256), "N": (10**5,), "C": (512, 2048), "M": (26,), "k": (TOPK,)},
}  # fmt: skip
QUICK_SHAPES: dict[str, dict[str, Sequence[Any]]] = {
    "masked_gem_pool": {"B": (1, 8), "C": (512,), "HW": (128,), "M": (26,)},
    "attr_distance": {"Q": (1, 8), "N": (1000,), "C": (512,), "M": (26,)},
    "attr_topk": {"Q": (8,), "N": (1000,), "C": (512,), "M": (26,), "k": (TOPK,), "order": ("d", "weighted")},
    "explain_topk": {"Q": (1, 8), "N": (1000,), "C": (512,), "M": (26,), "k": (TOPK,)},
}


@dataclass
class Case:
    """One op at one shape: its providers and the work an ideal implementation does."""

    op: str
    dtype: torch.dtype
    shape: dict[str, Any]
    providers: dict[str, Callable[[], object]]
    ideal_bytes: int
    flops: int
    output_bytes: int


@dataclass
class Env:
    """Where and with what the benchmark ran, plus the measured roofline."""

    device: torch.device
    device_name: str
    tag: str
    torch_version: str
    triton_version: str
    date: str
    copy_gb_s: float
    matmul_tflop_s: dict[str, float]


# ---------------------------------------------------------------------------------------------------------------------
# Setup factories
# ---------------------------------------------------------------------------------------------------------------------


def _elt(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _attr_weights(m: int, device: torch.device) -> torch.Tensor:
    """Every third attribute ignored (weight 0), the rest weighted 1: an attribute-weighted search."""
    w = torch.ones(m, device=device)
    w[::3] = 0.0
    return w


def _embeddings(rows: int, m: int, c: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(rows, m + 1, c, device=device).to(dtype)


def setup_masked_gem_pool(shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> Case:
    from attrimeter.kernels import masked_gem_pool as mgp

    b, c, hw, m = shape["B"], shape["C"], shape["HW"], shape["M"]
    h, w = hw // 8, 8  # ReID maps are tall: 256x128 crops give 16x8, 384x128 give 24x8
    feats = torch.relu(torch.randn(b, c, h, w, device=device)).to(dtype)
    logits = torch.randn(b, m, h, w, device=device).to(dtype)
    scale = torch.rand(c, device=device) + 0.5
    shift = torch.randn(c, device=device) * 0.1
    args = (feats, logits, P_GEM, 1e-6, scale, shift)
    out_bytes = b * (m + 1) * c * _elt(dtype)
    return Case(
        op="masked_gem_pool",
        dtype=dtype,
        shape=shape,
        providers={
            "naive_eager": lambda: mgp.masked_gem_pool_naive(*args),
            "factorised_eager": lambda: mgp.masked_gem_pool_reference(*args),
            "naive_compile": _compiled(mgp.masked_gem_pool_naive, args),
            "factorised_compile": _compiled(mgp.masked_gem_pool_reference, args),
            "triton": lambda: mgp.masked_gem_pool(*args),
        },
        ideal_bytes=feats.nbytes + logits.nbytes + scale.nbytes + shift.nbytes + out_bytes,
        flops=2 * b * (m + 1) * hw * c,
        output_bytes=out_bytes,
    )


def setup_attr_distance(shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> Case:
    from attrimeter.kernels import attr_distance as ad

    q_rows, n, c, m = shape["Q"], shape["N"], shape["C"], shape["M"]
    q = _embeddings(q_rows, m, c, torch.float32, device)
    g = _embeddings(n, m, c, dtype, device)
    out_bytes = q_rows * n * (2 * m + 2) * 4  # d, d_hat [Q, N] and d_k, shares [Q, N, M], fp32
    return Case(
        op="attr_distance",
        dtype=dtype,
        shape=shape,
        providers={
            "naive_eager": lambda: ad.attr_distance_naive(q, g),
            "factorised_eager": lambda: ad.attr_distance_reference(q, g),
            "naive_compile": _compiled(ad.attr_distance_naive, (q, g)),
            "factorised_compile": _compiled(ad.attr_distance_reference, (q, g)),
            # A gallery store validates on insert: the benchmark measures the scan, not the NaN check.
            "triton": lambda: ad.attr_distance(q, g, check_finite=False),
        },
        ideal_bytes=q.nbytes + g.nbytes + out_bytes,
        flops=2 * q_rows * n * (m + 1) * c,
        output_bytes=out_bytes,
    )


def _torch_topk(naive: bool) -> Callable[..., Any]:
    """Scores, then torch.topk, then explain the ids: what a torch user writes.

    The naive provider computes the full decomposition (the authors' way); the factorised one only what the score
    needs: ``torch.cdist`` of the global rows for ``d``, the batched-GEMM matrix for weighted scores.
    """
    from attrimeter.kernels import attr_distance as ad

    def run(q: torch.Tensor, g: torch.Tensor, k: int, w: torch.Tensor | None) -> Any:
        if naive:
            scores = ad.attr_distance_naive(q, g, w).scores
        elif w is None:
            scores = torch.cdist(q[:, 0].float(), g[:, 0].float())
        else:
            scores = ad.attr_distance_reference(q, g, w).scores
        best, ids = torch.topk(scores, k, dim=1, largest=False)
        return ad.explain_topk_reference(q, g, ids, w)._replace(scores=best)

    return run


def setup_attr_topk(shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> Case:
    from attrimeter.kernels import attr_distance as ad

    q_rows, n, c, m, k = shape["Q"], shape["N"], shape["C"], shape["M"], shape["k"]
    q = _embeddings(q_rows, m, c, torch.float32, device)
    g = _embeddings(n, m, c, dtype, device)
    w = _attr_weights(m, device) if shape["order"] == "weighted" else None
    naive, factorised = _torch_topk(naive=True), _torch_topk(naive=False)
    scanned_rows = 1 if w is None else m
    out_bytes = q_rows * k * ((2 * m + 3) * 4 + 8)  # d, d_hat, scores, d_k, shares (fp32) and int64 ids
    gathered = q_rows * k * (m + 1) * c * _elt(dtype)
    return Case(
        op="attr_topk",
        dtype=dtype,
        shape=shape,
        providers={
            "naive_eager": lambda: naive(q, g, k, w),
            "factorised_eager": lambda: factorised(q, g, k, w),
            "naive_compile": _compiled(naive, (q, g, k, w)),
            "factorised_compile": _compiled(factorised, (q, g, k, w)),
            "triton": lambda: ad.attr_distance(q, g, topk=k, weights=w, check_finite=False),
        },
        ideal_bytes=q.nbytes + n * scanned_rows * c * _elt(dtype) + gathered + out_bytes,
        flops=2 * q_rows * n * scanned_rows * c + 3 * q_rows * k * (m + 1) * c,
        output_bytes=out_bytes,
    )


def setup_explain_topk(shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> Case:
    from attrimeter.kernels import attr_distance as ad

    q_rows, n, c, m, k = shape["Q"], shape["N"], shape["C"], shape["M"], shape["k"]
    q = _embeddings(q_rows, m, c, torch.float32, device)
    g = _embeddings(n, m, c, dtype, device)
    ids = torch.randint(0, n, (q_rows, k), device=device)

    def naive(q: torch.Tensor, g: torch.Tensor, ids: torch.Tensor) -> Any:
        full = ad.attr_distance_naive(q, g)
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        return [t[rows, ids] for t in (full.d, full.d_k, full.shares, full.d_hat)]

    out_bytes = q_rows * k * (2 * m + 3) * 4
    return Case(
        op="explain_topk",
        dtype=dtype,
        shape=shape,
        providers={
            "naive_eager": lambda: naive(q, g, ids),
            "factorised_eager": lambda: ad.explain_topk_reference(q, g, ids),
            "naive_compile": _compiled(naive, (q, g, ids)),
            "factorised_compile": _compiled(ad.explain_topk_reference, (q, g, ids)),
            "triton": lambda: ad.explain_topk(q, g, ids),
        },
        ideal_bytes=q.nbytes + ids.nbytes + q_rows * k * (m + 1) * c * _elt(dtype) + out_bytes,
        flops=3 * q_rows * k * (m + 1) * c,
        output_bytes=out_bytes,
    )


SETUPS: dict[str, Callable[[dict[str, Any], torch.dtype, torch.device], Case]] = {
    "masked_gem_pool": setup_masked_gem_pool,
    "attr_distance": setup_attr_distance,
    "attr_topk": setup_attr_topk,
    "explain_topk": setup_explain_topk,
}


def _compiled(fn: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], object]:
    """A provider calling ``torch.compile(fn)``, built at its first (warm-up) call so unused ones cost nothing."""
    cache: dict[str, Callable[..., Any]] = {}

    def run() -> object:
        if "fn" not in cache:
            cache["fn"] = torch.compile(fn, dynamic=False)
        return cache["fn"](*args)

    return run


def estimate_bytes(op: str, shape: dict[str, Any], dtype: torch.dtype) -> int:
    """Inputs + outputs of a case, to skip shapes that cannot fit before allocating them."""
    e = _elt(dtype)
    if op == "masked_gem_pool":
        return shape["B"] * (shape["C"] + shape["M"]) * shape["HW"] * e + shape["B"] * (shape["M"] + 1) * shape["C"] * e
    m1 = shape["M"] + 1
    gallery = shape["N"] * m1 * shape["C"] * e + shape["Q"] * m1 * shape["C"] * 4
    outputs = shape["Q"] * shape["N"] * (2 * shape["M"] + 2) * 4 if op == "attr_distance" else 0
    return gallery + outputs


# ---------------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_provider(fn: Callable[[], object], device: torch.device, budget_s: float) -> tuple[float, float, float]:
    """(median, p20, p80) in ms over many runs, after a warm-up call (which also compiles/autotunes)."""
    fn()
    _sync(device)
    if device.type == "cuda":
        import triton.testing

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        _sync(device)
        estimate = start.elapsed_time(end)
        # At least ~20 timed runs; fast cases run for min(budget, 100 ms).
        rep = max(20 * estimate, min(100.0, budget_s * 1000.0))
        med, p20, p80 = triton.testing.do_bench(fn, warmup=max(25.0, 2 * estimate), rep=rep, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(times), q[1], q[7]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak allocation during one call beyond what existed before it (inputs, caches), in MiB; NaN on CPU."""
    if device.type != "cuda":
        return math.nan
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / 2**20


def _copy_bandwidth(device: torch.device, elems: int, budget_s: float) -> float:
    """Device copy bandwidth in GB/s (read + write) of a float32 buffer of ``elems`` elements."""
    src = torch.empty(elems, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / time_provider(lambda: dst.copy_(src), device, budget_s)[0] / 1e6


def measure_env(device: torch.device, dtypes: Iterable[torch.dtype]) -> Env:
    """Device, versions, date and the measured roofline (copy bandwidth, matmul rate per dtype)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        copy_elems, mm_n, budget = 2**28, 8192, 0.5
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        tag, copy_elems, mm_n, budget = "cpu", 2**24, 1024, 0.5
    rates = {}
    for dtype in dict.fromkeys(dtypes):
        # The CPU torch providers compute in fp32 whatever the storage dtype: fp32 is their ceiling.
        mm_dtype = dtype if device.type == "cuda" else torch.float32
        a = torch.randn(mm_n, mm_n, device=device).to(mm_dtype)
        b = torch.randn(mm_n, mm_n, device=device).to(mm_dtype)
        mm_ms = time_provider(lambda a=a, b=b: a @ b, device, budget)[0]
        rates[str(dtype).removeprefix("torch.")] = 2 * mm_n**3 / mm_ms / 1e9
    return Env(
        device=device,
        device_name=name,
        tag=tag,
        torch_version=torch.__version__,
        triton_version=triton_version,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        copy_gb_s=_copy_bandwidth(device, copy_elems, budget),
        matmul_tflop_s=rates,
    )


def run_case(case: Case, env: Env, providers: Sequence[str], budget_s: float) -> list[dict[str, Any]]:
    """Time every requested provider of a case; a failing provider gives a row with its error, not a crash."""
    dtype_name = str(case.dtype).removeprefix("torch.")
    roof_ms = max(case.ideal_bytes / (env.copy_gb_s * 1e6), case.flops / (env.matmul_tflop_s[dtype_name] * 1e9))
    rows = []
    for name in providers:
        row: dict[str, Any] = {"op": case.op, "provider": name, "dtype": dtype_name}
        row.update({key: case.shape.get(key, "") for key in SHAPE_KEYS})
        row.update(device=env.device_name, torch=env.torch_version, triton=env.triton_version, date=env.date)
        row["ideal_mem_mb"] = case.output_bytes / 2**20
        try:
            with torch.inference_mode():
                med, p20, p80 = time_provider(case.providers[name], env.device, budget_s)
                peak = peak_memory_mb(case.providers[name], env.device)
        except torch.OutOfMemoryError:
            row["status"] = "out of memory"
            torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - one broken provider must not stop the sweep; the row says why
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        else:
            row.update(
                median_ms=med,
                p20_ms=p20,
                p80_ms=p80,
                gb_s=case.ideal_bytes / med / 1e6,
                tflop_s=case.flops / med / 1e9,
                roofline_frac=roof_ms / med,
                peak_mem_mb=peak,
                status="ok",
            )
        rows.append(row)
    times = [r["median_ms"] for r in rows if r["provider"] in TORCH_PROVIDERS and r["status"] == "ok"]
    for r in rows:
        if times and r["status"] == "ok":
            r["speedup_vs_best_torch"] = min(times) / r["median_ms"]
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Sweep and reports
# ---------------------------------------------------------------------------------------------------------------------


def iter_shapes(grid: dict[str, Sequence[Any]], filters: dict[str, set[str]]) -> Iterator[dict[str, Any]]:
    """The cartesian product of a shape grid, keeping only shapes whose filtered keys match."""
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        shape = dict(zip(keys, values, strict=True))
        if all(str(shape[k]) in allowed for k, allowed in filters.items() if k in shape):
            yield shape


def sweep(
    ops: Sequence[str],
    shapes: dict[str, dict[str, Sequence[Any]]],
    dtypes: Sequence[torch.dtype],
    env: Env,
    providers: Sequence[str],
    budget_s: float,
    filters: dict[str, set[str]] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run every (op, dtype, shape) case; returns the rows and notes on what was skipped."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    work = [(op, dtype, shape) for op in ops for dtype in dtypes for shape in iter_shapes(shapes[op], filters or {})]
    free = torch.cuda.mem_get_info(env.device)[0] if env.device.type == "cuda" else None
    for op, dtype, shape in tqdm(work, desc="benchmark cases", disable=not progress):
        label = f"{op} {str(dtype).removeprefix('torch.')} {shape}"
        if free is not None and estimate_bytes(op, shape, dtype) > 0.8 * free:
            notes.append(f"skipped {label}: inputs + outputs exceed 80% of free GPU memory")
            continue
        try:
            case = SETUPS[op](shape, dtype, env.device)
        except ImportError as err:
            notes.append(f"skipped {label}: {err}")
            continue
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            notes.append(f"skipped {label}: out of memory allocating the inputs")
            continue
        rows += run_case(case, env, providers, budget_s)
        del case
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, notes


def _fmt(value: Any, digits: int = 3) -> str:
    if value == "" or value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c, ""), 6) for c in COLUMNS})


def _shape_label(row: dict[str, Any]) -> str:
    return " ".join(f"{k}={row[k]}" for k in SHAPE_KEYS if row.get(k, "") != "")


def write_markdown(rows: Sequence[dict[str, Any]], notes: Sequence[str], env: Env, path: Path) -> None:
    rates = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in env.matmul_tflop_s.items())
    lines = [
        f"# Kernel benchmarks: {env.device_name}",
        "",
        f"torch {env.torch_version}, triton {env.triton_version}, {env.date}. Roofline: copy bandwidth "
        f"{env.copy_gb_s:.4g} GB/s, matmul {rates} (measured). Times are medians (p20-p80); `roof` is the "
        "roofline time over the measured one; `speed-up` is against the best torch provider of the same case.",
        "",
        *[f"- {note}" for note in notes],
    ]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines += [
            "",
            f"## {op}",
            "",
            "| shape | dtype | provider | ms (p20-p80) | GB/s | TFLOP/s | roof | speed-up | peak / ideal MiB "
            "| status |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["op"] == op):
            span = f"{_fmt(r.get('median_ms'))} ({_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))})"
            if r["status"] != "ok":
                span = ""
            roof = r.get("roofline_frac")
            mem = f"{_fmt(r.get('peak_mem_mb')) or 'n/a'} / {_fmt(r.get('ideal_mem_mb'))}"
            lines.append(
                f"| {_shape_label(r)} | {r['dtype']} | {r['provider']} | {span} | {_fmt(r.get('gb_s'))} | "
                f"{_fmt(r.get('tflop_s'))} | {'' if roof is None else f'{100 * roof:.1f}%'} | "
                f"{_fmt(r.get('speedup_vs_best_torch'))} | {mem} | {r['status']} |"
            )
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: Sequence[dict[str, Any]], env: Env, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    ops = list(dict.fromkeys(r["op"] for r in ok))
    if not ops:
        return
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, 3.6 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        cases = list(dict.fromkeys(f"{r['dtype']} {_shape_label(r)}" for r in ok if r["op"] == op))
        for provider in PROVIDERS:
            pts = [(cases.index(f"{r['dtype']} {_shape_label(r)}"), r["median_ms"]) for r in ok
                   if r["op"] == op and r["provider"] == provider]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", linestyle="-", label=provider)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title(op)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{env.device_name} | torch {env.torch_version} | triton {env.triton_version} | {env.date}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


def _parse_filters(items: Sequence[str]) -> dict[str, set[str]]:
    filters: dict[str, set[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in SHAPE_KEYS or not values:
            raise argparse.ArgumentTypeError(f"--filter wants KEY=V1,V2 with KEY in {SHAPE_KEYS}, got {item!r}")
        filters.setdefault(key, set()).update(values.split(","))
    return filters


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", nargs="+", choices=OPS, default=list(OPS), help="ops to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small shapes only (minutes on a CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16"), default=None,
                        help="storage dtypes (default: float16 on a GPU, float32 on a CPU)")  # fmt: skip
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=V1,V2",
                        help=f"keep shapes with these values (keys: {', '.join(SHAPE_KEYS)}); repeatable")  # fmt: skip
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile providers (default: on for a GPU, off for a CPU)")  # fmt: skip
    parser.add_argument("--budget", type=float, default=None, help="timing budget per provider in seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        filters = _parse_filters(args.filter)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtypes = [getattr(torch, d) for d in (args.dtype or (["float16"] if on_gpu else ["float32"]))]
    use_compile = on_gpu if args.compile is None else args.compile
    providers = [p for p in TORCH_PROVIDERS if use_compile or "compile" not in p] + (["triton"] if on_gpu else [])
    notes = []
    if not on_gpu:
        notes.append("no CUDA GPU: Triton providers skipped (the interpreter's timings would mean nothing)")
    if not use_compile:
        notes.append("torch.compile providers skipped" + ("" if on_gpu else " on the CPU (pass --compile to run them)"))
    for note in notes:
        print(f"note: {note}")
    budget = args.budget if args.budget is not None else (0.3 if args.quick or not on_gpu else 1.0)

    env = measure_env(device, dtypes)
    print(f"{env.device_name}: copy {env.copy_gb_s:.4g} GB/s, matmul {env.matmul_tflop_s} TFLOP/s")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rows, skipped = sweep(args.op, shapes, dtypes, env, providers, budget, filters, progress=not args.no_progress)
    notes += skipped
    for note in skipped:
        print(f"note: {note}")

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernels_{env.tag}"
    write_csv(rows, stem.with_suffix(".csv"))
    write_markdown(rows, notes, env, stem.with_suffix(".md"))
    write_plot(rows, env, stem.with_suffix(".png"))
    print(f"wrote {stem}.csv, .md, .png ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
