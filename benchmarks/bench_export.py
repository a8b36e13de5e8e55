"""The export stage on the CPU: export time per flavour, AOT compile time per GPU target, parity, and the portable
graph's latency in ONNX Runtime against eager PyTorch on the same model and threads.

Writes ``export_cpu.csv`` and ``export_cpu.md`` (stamped with CPU, versions and date) under ``--out``.

    python benchmarks/bench_export.py --checkpoint runs/demo/interpreter/interpreter.pt
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import triton

from attrimeter.artefact.contract import INPUT_NAME
from attrimeter.export.aot import DEFAULT_TARGETS, compile_kernels, kernel_specs
from attrimeter.export.build import export
from attrimeter.export.onnx_graph import ExportGraph


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/interpreter/interpreter.pt"))
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"),
                        help="data folder for the fp16 retrieval check (default runs/demo/data)")
    parser.add_argument("--repeats", type=int, default=20, help="latency repeats (default 20)")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and ONNX Runtime (default 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"),
                        help="folder for export_cpu.{csv,md} (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # First call pays for imports and the exporter's one-time setup; the timed exports below do not.
        export(args.checkpoint, root / "warm-up", targets=(), progress=False)
        for flavor, fp16 in (("portable", False), ("plugin", False), ("portable", True)):
            t0 = time.perf_counter()
            m = export(args.checkpoint, root / f"{flavor}{16 if fp16 else 32}", flavor=flavor, fp16=fp16, targets=(),
                       data=args.data if fp16 else None, progress=False)
            seconds = time.perf_counter() - t0
            worst = m.verification.worst_error
            retrieval = m.verification.retrieval
            note = (f"mAP(d) eager fp32 {retrieval.eager_fp32['d_mAP']:.4f} vs export "
                    f"{retrieval.export['d_mAP']:.4f}; mAP(d̂) {retrieval.eager_fp32['d_hat_mAP']:.4f} vs "
                    f"{retrieval.export['d_hat_mAP']:.4f} (includes the retrieval check)" if retrieval else "")
            rows.append({"measure": f"export {flavor} {m.dtype}", "value": round(seconds, 1), "unit": "s",
                         "detail": f"worst relative error vs eager fp32 {worst:.1e} at batch 1 and 7; {note}"})
            print(rows[-1])
        manifest = m
        channels, h, w = manifest.feature_map
        specs = kernel_specs(channels, h * w, len(manifest.attributes), manifest.pooling.p, manifest.pooling.eps,
                             "float32")
        for target in DEFAULT_TARGETS:
            os.environ["TRITON_CACHE_DIR"] = str(root / f"cache-{target}")  # cold: no kernel cached
            t0 = time.perf_counter()
            index = compile_kernels(root / "kernels", specs, (target,))
            sizes = {k: v.shared_bytes for k, v in index.targets[target].items()}
            rows.append({"measure": f"AOT compile {target} (3 kernels, cold cache)",
                         "value": round(time.perf_counter() - t0, 1), "unit": "s",
                         "detail": f"shared bytes {sizes}"})
            print(rows[-1])

        model_path = root / "portable32" / "model.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        from attrimeter.engine.interpreter_checkpoint import load_interpreter

        ck = load_interpreter(args.checkpoint)
        eager = ExportGraph(ck.model).eval()
        for batch in (1, 32):
            x = torch.rand(batch, 3, *ck.image_size)
            xn = x.numpy()
            with torch.no_grad():
                t_eager = _median_ms(lambda x=x: eager(x), args.repeats)
            t_ort = _median_ms(lambda xn=xn: session.run(None, {INPUT_NAME: xn}), args.repeats)
            for name, ms in (("eager PyTorch", t_eager), ("ONNX Runtime (portable fp32)", t_ort)):
                rows.append({"measure": f"{name} batch {batch}", "value": round(ms, 2), "unit": "ms",
                             "detail": f"{1000 * batch / ms:.0f} images/s; median of {args.repeats}"})
                print(rows[-1])
    stamp = {
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": ort.__version__, "triton": triton.__version__, "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "export_cpu.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], *stamp])
        writer.writeheader()
        writer.writerows({**r, **stamp} for r in rows)
    lines = [
        "# Export stage on the CPU",
        "",
        f"{stamp['cpu']}, {args.threads} threads; Python {stamp['python']}, torch {stamp['torch']}, onnx "
        f"{stamp['onnx']}, onnxruntime {stamp['onnxruntime']}, triton {stamp['triton']}; {stamp['date']}. Model: "
        f"`{args.checkpoint}` ({channels} channels, {h}x{w} feature map, {len(manifest.attributes)} attributes, "
        f"input {ck.image_size[0]}x{ck.image_size[1]}). Command: `python benchmarks/bench_export.py`.",
        "",
        "| measure | value | detail |",
        "|---|---|---|",
        *(f"| {r['measure']} | {r['value']} {r['unit']} | {r['detail']} |" for r in rows),
    ]
    (args.out / "export_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'export_cpu.csv'} and {args.out / 'export_cpu.md'}")


if __name__ == "__main__":
    main()
