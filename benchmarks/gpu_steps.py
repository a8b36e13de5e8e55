"""The steps of ``gpu_check.py`` that run inside the project's environment (torch, triton, the installed project).

Each step runs in its own process (``python gpu_steps.py STEP --work W --out O``), started by ``gpu_check.py`` with a
time limit, and writes ``W/results/STEP.json``: figures (name, value, unit, target, whether the target is met) and
notes; its result files go under ``--out``. The benchmarks reuse ``bench_kernels.py`` and ``bench_runtime.py``.

Steps: ``env`` (versions, device, the two measured ceilings), ``prep_runtime`` (synthetic data, a demo-size model
trained and exported, a 10^6-entry gallery), ``prep_training`` (synthetic 256x128 data), ``bench_kernels``,
``bench_runtime`` and ``bench_training``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import bench_kernels as bk
import bench_runtime as br
import torch
from resampling import fill_gallery

# The sizes the kernel issue (4) and the runtime issue (6) named, and their targets.
POOL_SHAPE = {"B": (256,), "C": (2048,), "HW": (192,), "M": (26,)}
SCAN_SHAPE = {"Q": (64,), "N": (100_000,), "C": (2048,), "M": (26,)}
EXPLAIN_SHAPE = {**SCAN_SHAPE, "k": (10,)}
GALLERY_ENTRIES = 10**6
EAGER = ("naive_eager", "factorised_eager", "triton")
# Versions of the Python packages worth stamping, by distribution name.
PACKAGES = ("torch", "triton", "numpy", "onnx", "onnxruntime", "onnxscript", "faiss-cpu", "cuda-bindings",
            "cupy-cuda13x", "setuptools", "pytest", "pytest-xdist", "attrimeter")


def figure(name: str, value: float, unit: str, target: str = "", ok: bool | None = None) -> dict[str, Any]:
    """One measured figure; ``ok`` says whether ``target`` is met (None: no target)."""
    return {"name": name, "value": value, "unit": unit, "target": target, "ok": ok}


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _command(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"({cmd[0]}: {err})"


# --------------------------------------------------------------------------------------------------------------------


def step_env(work: Path, out: Path) -> dict[str, Any]:
    """Device, driver, versions and the measured copy bandwidth and matmul rates (``env.json``, ``env_TAG.txt``)."""
    import triton

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    env = bk.measure_env(device, [torch.bfloat16, torch.float16, torch.float32])
    smi = _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,"
                    "power.draw,power.limit,temperature.gpu,pstate", "--format=csv"])
    info = {
        "tag": env.tag, "device": env.device_name, "cc": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "driver": smi.splitlines()[-1].split(", ")[1] if smi.count("\n") else smi,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "triton": triton.__version__,
        "python": platform.python_version(), "nvcc": _command(["nvcc", "--version"]).splitlines()[-1:],
        "cmake": _command(["cmake", "--version"]).splitlines()[:1],
        "packages": {name: _version(name) for name in PACKAGES},
        "ceilings": {"copy_gb_s": env.copy_gb_s, "matmul_tflop_s": env.matmul_tflop_s},
        "bench_env": {k: v for k, v in dataclasses.asdict(env).items() if k != "device"},
    }
    (work / "env.json").write_text(json.dumps(info, indent=1, default=str))
    text = [f"{k}: {v}" for k, v in info.items() if k != "bench_env"]
    text += ["", "$ nvidia-smi --query-gpu=...", smi, "", "$ nvidia-smi -q", _command(["nvidia-smi", "-q"])]
    name = f"env_{env.tag}.txt"
    (out / name).write_text("\n".join(text) + "\n")
    figures = [figure("device copy bandwidth (read + write)", env.copy_gb_s, "GB/s")]
    figures += [figure(f"{dtype} matmul 8192^3", rate, "TFLOP/s") for dtype, rate in env.matmul_tflop_s.items()]
    return {"figures": figures,
            "notes": [f"{info['device']} (cc {info['cc']}, {info['sms']} SMs, {info['memory_gib']} GiB, L2 "
                      f"{info['l2_mib']} MiB), driver {info['driver']}, torch {torch.__version__} (CUDA "
                      f"{info['cuda']}), triton {info['triton']}, Python {info['python']}"]}


def _bench_env(work: Path) -> bk.Env:
    saved = json.loads((work / "env.json").read_text())["bench_env"]
    return bk.Env(device=torch.device("cuda"), **saved)


def _compiled_kernels() -> list[str]:
    """Registers, spills, shared memory and SASS matrix/local-memory instruction counts of the compiled variants.

    Read from Triton's in-process kernel cache (an internal that moves between Triton versions) and
    ``cuobjdump --dump-sass`` of each cubin.
    """
    from attrimeter.kernels import attr_distance, masked_gem_pool

    lines, seen = [], set()
    for name, tuned in (("masked_gem_pool forward", masked_gem_pool._masked_gem_pool_fwd_kernel),
                        ("attr_distance scan", attr_distance._scan_full_tuned),
                        ("attr_distance scan top-k", attr_distance._scan_topk_tuned),
                        ("explain_topk", attr_distance._explain_kernel)):
        best = getattr(tuned, "best_config", None)
        if best is not None:
            lines.append(f"{name}: autotuned best {best}")
        fn = tuned
        while hasattr(fn, "fn"):
            fn = fn.fn
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        for cache in fn.device_caches.values():
            for kernel in cache[0].values():
                md = kernel.metadata
                sass = ""
                if shutil.which("cuobjdump"):
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(kernel.asm["cubin"])
                        f.flush()
                        sass = _command(["cuobjdump", "--dump-sass", f.name])
                counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "LDL", "STL")}
                lines.append(f"{md.name} warps={md.num_warps} stages={md.num_stages} regs={kernel.n_regs} "
                             f"spills={kernel.n_spills} shared={md.shared} B; SASS {counts}")
    return lines


def _label(op: str, dtype: str, shape: dict[str, tuple[Any, ...]]) -> str:
    return f"{op} {dtype} " + " ".join(f"{k}={v[0]:g}" for k, v in shape.items())


def step_bench_kernels(work: Path, out: Path) -> dict[str, Any]:
    """masked_gem_pool (bf16, every provider), attr_distance full scan and explain top-k (fp16 gallery)."""
    env = _bench_env(work)
    rows, notes = bk.sweep(["masked_gem_pool"], {"masked_gem_pool": POOL_SHAPE}, [torch.bfloat16], env, bk.PROVIDERS,
                           budget_s=1.0, progress=False)
    more, more_notes = bk.sweep(["attr_distance", "explain_topk"], {"attr_distance": SCAN_SHAPE,
                                "explain_topk": EXPLAIN_SHAPE}, [torch.float16], env, EAGER, 1.0, progress=False)
    rows, notes = rows + more, notes + more_notes
    stem = f"kernels_{env.tag}"
    bk.write_csv(rows, out / f"{stem}.csv")
    bk.write_markdown(rows, notes, env, out / f"{stem}.md")
    try:
        compiled = _compiled_kernels()
    except Exception as err:  # noqa: BLE001 - Triton internals differ between versions; the figures stand regardless
        compiled = [f"no compiled-kernel report with triton {env.triton_version}: {type(err).__name__}: {err}"]
    with (out / f"{stem}.md").open("a") as fh:
        fh.write("\n## Compiled kernels (Triton's cache, cuobjdump)\n\n" + "".join(f"- {x}\n" for x in compiled))
    by = {(r["op"], r["provider"]): r for r in rows}
    figures = []
    pool = by.get(("masked_gem_pool", "triton"), {})
    if pool.get("status") == "ok":
        best = min((r for r in rows if r["op"] == "masked_gem_pool" and r["provider"] != "triton"
                    and r["status"] == "ok"), key=lambda r: r["median_ms"])
        ratio = pool["peak_mem_mb"] / pool["ideal_mem_mb"]
        figures += [
            figure(_label("masked_gem_pool", "bf16", POOL_SHAPE) + ": Triton", pool["median_ms"], "ms"),
            figure("  share of the memory roofline", 100 * pool["roofline_frac"], "%", ">= 60 %",
                   pool["roofline_frac"] >= 0.6),
            figure(f"  speed-up over the best PyTorch provider ({best['provider']})", pool["speedup_vs_best_torch"],
                   "x", ">= 3x", pool["speedup_vs_best_torch"] >= 3.0),
            figure("  peak memory beyond the inputs / outputs", ratio, "x", "<= 1.1x", ratio <= 1.1),
        ]
    scan = by.get(("attr_distance", "triton"), {})
    if scan.get("status") == "ok":
        figures += [figure(_label("attr_distance full scan", "fp16", SCAN_SHAPE) + ": Triton", scan["median_ms"], "ms"),
                    figure("  share of the memory roofline", 100 * scan["roofline_frac"], "%", ">= 70 %",
                           scan["roofline_frac"] >= 0.7)]
    explain = by.get(("explain_topk", "triton"), {})
    if explain.get("status") == "ok":
        us = 1000 * explain["median_ms"]
        label = _label("explain top-k", "fp16", EXPLAIN_SHAPE) + ": Triton"
        figures.append(figure(label, us, "µs", "< 50 µs", us < 50))
    failed = [f"{r['op']}/{r['provider']}: {r['status']}" for r in rows if r["status"] != "ok"]
    return {"figures": figures, "notes": notes + failed,
            "failed": [f for f in failed if "/triton:" in f]}


# --------------------------------------------------------------------------------------------------------------------


def step_prep_runtime(work: Path, out: Path) -> dict[str, Any]:
    """A demo-size interpreter (resnet18 width 0.5, 128x64: C = 256) exported, and a gallery of 10^6 entries."""
    from attrimeter.data.synth import SynthConfig, generate
    from attrimeter.engine.interpreter_training import InterpreterTrainConfig, train_interpreter
    from attrimeter.engine.target import TargetTrainConfig, train_target
    from attrimeter.export.build import export
    from attrimeter.runtime.runtime import Runtime, RuntimeConfig

    root = work / "runtime"
    t0 = time.perf_counter()
    generate(root / "data", SynthConfig(ids=40, cams=4, images_per_id=6, counterfactual_per_attribute=0),
             progress=False)
    # The latency depends on the sizes (C, M, N), not on how well the model was trained: a few iterations suffice.
    train_target(root / "data", root / "target", TargetTrainConfig(width=0.5, epochs=2, p_ids=8, k_instances=4),
                 progress=False, evaluate=False)
    train_interpreter(root / "data", root / "target" / "target.pt", root / "interpreter",
                      InterpreterTrainConfig(shared="layer3", epochs=2, p_ids=8, k_instances=4), progress=False)
    export(root / "interpreter" / "interpreter.pt", root / "export", targets=(), progress=False)
    with Runtime(root / "export", root / "real", RuntimeConfig(create_gallery=True)) as rt:
        rt.index_folder(root / "data" / "bounding_box_test", progress=False)
        model_s = time.perf_counter() - t0
        fill_gallery(root / "large", rt.gallery, GALLERY_ENTRIES, workers=8)
    fill_s = time.perf_counter() - t0 - model_s
    return {"figures": [figure("data, model, export and real gallery", model_s, "s"),
                        figure(f"gallery of {GALLERY_ENTRIES} entries filled", fill_s, "s")], "notes": []}


def step_bench_runtime(work: Path, out: Path) -> dict[str, Any]:
    """Search + explain of one query against the 10^6-entry gallery: torch backend, fused Triton kernels."""
    root = work / "runtime"
    tag = json.loads((work / "env.json").read_text())["tag"]
    queries = sorted((root / "data" / "query").glob("*.jpg"))[:50]
    rows = br.search_rows(root / "export", root / "large", queries, "torch", threads=8, repeats=200,
                          baseline_repeats=20, fused=True)
    name = f"runtime_torch_{tag}"
    stamped = br.stamp(f"cuda ({torch.cuda.get_device_name()})", "torch", 8)
    br.write_report(rows, stamped, out, name, f"Demo-size model (resnet18 width 0.5, C = 256, M = 26), gallery of "
                    f"{GALLERY_ENTRIES} generated entries, fused Triton search on the GPU.",
                    "python benchmarks/gpu_check.py (step bench_runtime)")
    figures = []
    for r in rows:
        if "p99_ms" in r:
            target = "p99 < 10 ms" if r["setting"].startswith("runtime search + explain, from embeddings") else ""
            figures.append(figure(f"{r['setting']}: p50", r["value"], "ms"))
            figures.append(figure("  p99", r["p99_ms"], "ms", target, r["p99_ms"] < 10 if target else None))
    return {"figures": figures, "notes": []}


# --------------------------------------------------------------------------------------------------------------------


def step_prep_training(work: Path, out: Path) -> dict[str, Any]:
    """Synthetic data at 256x128, the full profile's input size."""
    from attrimeter.data.synth import SynthConfig, generate

    summary = generate(work / "train" / "data", SynthConfig(ids=64, cams=4, size=(256, 128), images_per_id=8,
                                                            counterfactual_per_attribute=0), progress=False)
    return {"figures": [], "notes": [str(summary)[:300]]}


def step_bench_training(work: Path, out: Path) -> dict[str, Any]:
    """Training throughput of the full profiles (resnet50 at 256x128, 16 x 4 batches) for 20 s each."""
    from attrimeter.engine import interpreter_training, target

    root = work / "train"
    seconds = 20.0
    t_cfg = target.TargetTrainConfig(**{**target.PROFILES["full"], "epochs": 10_000, "max_minutes": seconds / 60})
    t_log = target.train_target(root / "data", root / "target", t_cfg, progress=False, evaluate=False)
    i_cfg = interpreter_training.InterpreterTrainConfig(**{**interpreter_training.PROFILES["full"], "epochs": 10_000,
                                                           "max_minutes": seconds / 60})
    i_log = interpreter_training.train_interpreter(root / "data", root / "target" / "target.pt", root / "interpreter",
                                                   i_cfg, progress=False)
    figures = []
    for what, log in (("target resnet50 256x128", t_log), ("interpreter on it (shared layer2, no cache)", i_log)):
        figures.append(figure(f"training {what}", log["images_per_second"], "images/s"))
    return {"figures": figures, "notes": [
        f"{log['iterations']} iterations of 64 images in {log['train_seconds']:.1f} s (first iterations included)"
        for log in (t_log, i_log)]}


STEPS: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
    "env": step_env, "prep_runtime": step_prep_runtime, "prep_training": step_prep_training,
    "bench_kernels": step_bench_kernels, "bench_runtime": step_bench_runtime, "bench_training": step_bench_training,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--work", type=Path, required=True, help="gpu_check's scratch folder")
    parser.add_argument("--out", type=Path, required=True, help="where result files go")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_steps {args.step}: torch {torch.__version__} sees no CUDA GPU")
    result = STEPS[args.step](args.work, args.out)
    (args.work / "results").mkdir(parents=True, exist_ok=True)
    (args.work / "results" / f"{args.step}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
