"""``attrimeter export``: one verified export folder with its manifest (DESIGN §5).

ONNX (portable or plugin flavour), the AOT kernels and, on request, a TensorRT engine.

Layout of an export folder::

    model.onnx              the graph (DESIGN §5 names, dynamic batch)
    kernels/index.json      AOT kernels: per GPU target, the kernels and their launch metadata
    kernels/launch.txt      the C launcher's table (CMakeLists.txt builds the library that reads it)
    kernels/sm_XX/*.cubin|ptx|json
    model.engine            TensorRT engine (--format tensorrt), with timing.cache
    manifest.json           names, shapes, attribute schema, normalisation, p/eps, versions, sha256 of every file

Everything is built in a staging folder and renamed into place after verification (``onnx_export.export_onnx``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrimeter.export.aot import DEFAULT_TARGETS, TARGETS, compile_kernels, kernel_specs
from attrimeter.export.onnx_export import MAX_BATCH, ExportError, export_onnx

__all__ = ["FORMATS", "export"]

FORMATS = ("onnx", "tensorrt")


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    format: str = "onnx",
    flavor: str | None = None,
    fp16: bool = False,
    opset: int = 18,
    targets: Sequence[str] = DEFAULT_TARGETS,
    data: str | Path | None = None,
    max_batch: int = 256,
    opt_batch: int = 32,
    timing_cache: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Export an interpreter checkpoint (see the module docstring for the folder it makes).

    Args:
        checkpoint: ``interpreter.pt``.
        out_dir: The export folder (an older export there is replaced once the new one is verified).
        format: ``"onnx"``, or ``"tensorrt"`` (ONNX, then an engine; needs TensorRT and an NVIDIA GPU).
        flavor: ``"portable"`` or ``"plugin"``; default portable for ONNX, plugin for TensorRT.
        fp16: Export an FP16 graph (and FP16 kernels and engine).
        opset: ONNX opset (≥ 17).
        targets: GPU targets of the AOT kernels (names of ``aot.TARGETS``); empty for none. A TensorRT build adds
            the local GPU's target.
        data: A data set root for the retrieval check (required for ``fp16``: FP16 is judged on retrieval).
        max_batch: Largest batch of the TensorRT optimisation profile.
        opt_batch: The batch size TensorRT tunes for.
        timing_cache: TensorRT timing cache to reuse and update (default: a fresh one saved in the export folder).
        progress: Show progress.

    Returns:
        The manifest.

    Raises:
        ValueError: On bad arguments (unknown format/flavour/target, fp16 without data, batch bounds).
        ExportError: If TensorRT or a GPU is needed but missing (said before any work), or a check fails.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    flavor = flavor or ("plugin" if format == "tensorrt" else "portable")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown GPU targets {unknown}; known: {', '.join(TARGETS)}")
    if fp16 and data is None:
        raise ValueError("an fp16 export is judged on retrieval metrics: pass data=... (--data DIR)")
    if not 1 <= opt_batch <= max_batch <= MAX_BATCH:
        raise ValueError(f"need 1 <= opt_batch <= max_batch <= {MAX_BATCH}, got {opt_batch} and {max_batch}")
    device_target = None
    if format == "tensorrt":
        from attrimeter.export.tensorrt_engine import tensorrt_available

        missing = tensorrt_available()
        if missing:
            raise ExportError(f"cannot build a TensorRT engine here: {missing}")
        device_target = _local_target()
        if flavor == "plugin" and device_target not in TARGETS:
            raise ExportError(f"this GPU is {device_target}, for which no AOT kernel target is defined; "
                              f"known: {', '.join(TARGETS)} (use --flavor portable)")
    wanted = tuple(dict.fromkeys([*targets, *([device_target] if device_target and flavor == "plugin" else [])]))

    def add_kernels_and_engine(staging: Path, manifest: dict[str, Any]) -> None:
        channels, h, w = manifest["feature_map"]
        pooling = manifest["pooling"]
        if wanted:
            # TensorRT documents no way to opt an AOT plugin kernel into more than 48 KiB of shared memory.
            cap = 48 * 1024 if format == "tensorrt" and flavor == "plugin" else None
            specs = kernel_specs(channels, h * w, len(manifest["attributes"]), pooling["p"], pooling["eps"],
                                 manifest["dtype"], pool_max_shared=cap)
            index = compile_kernels(staging / "kernels", specs, wanted, progress=progress)
            manifest["kernels"] = {"index": "kernels/index.json", "launch_table": "kernels/launch.txt",
                                   "targets": list(wanted), "triton_version": index["triton_version"]}
        if format == "tensorrt":
            manifest["tensorrt"] = _build_engine(staging, manifest, flavor, max_batch, opt_batch, timing_cache,
                                                 progress)

    return export_onnx(checkpoint, out_dir, flavor=flavor, fp16=fp16, opset=opset, data=data, progress=progress,
                       extra=add_kernels_and_engine)


def _local_target() -> str:
    """``sm_XY`` of the current CUDA device (the engine is built for it)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _build_engine(staging: Path, manifest: dict[str, Any], flavor: str, max_batch: int, opt_batch: int,
                  timing_cache: str | Path | None, progress: bool) -> dict[str, Any]:
    """Build ``model.engine`` from the staged ONNX (the plugin backed by the local GPU's AOT kernel)."""
    from attrimeter.export.tensorrt_engine import PluginSpec, build_engine

    plugin = None
    channels, h, w = manifest["feature_map"]
    if flavor == "plugin":
        kernel_json = staging / "kernels" / _local_target() / "masked_gem_pool.json"
        plugin = PluginSpec(kernel_json=kernel_json, num_attributes=len(manifest["attributes"]), channels=channels,
                            height=h, width=w)
    cache = Path(timing_cache) if timing_cache is not None else staging / "timing.cache"
    info = build_engine(staging / "model.onnx", staging / "model.engine", max_batch=max_batch, opt_batch=opt_batch,
                        image_size=tuple(manifest["image_size"]), plugin=plugin, timing_cache=cache,
                        progress=progress)
    return {"engine": "model.engine", "timing_cache": str(cache), **info}
