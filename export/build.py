"""``attrimeter export``: one verified export folder with its manifest (docs/architecture.md §5).

ONNX (portable or plugin flavour), the AOT kernels and, on request, a TensorRT engine. Layout::

    model.onnx              the graph (docs/architecture.md §5 names, dynamic batch)
    kernels/index.json      AOT kernels: per GPU target, the kernels and their launch metadata
    kernels/launch.txt      the C launcher's table (CMakeLists.txt builds the library that reads it)
    kernels/sm_XX/*.cubin|ptx|json
    model.engine            TensorRT engine (--format tensorrt), with timing.cache
    manifest.json           names, shapes, attribute schema, normalisation, p/eps, versions, sha256 of every file

Everything is built in a staging folder and renamed into place after verification (``onnx_export.export_onnx``); a
TensorRT engine is run and checked against eager PyTorch (and on retrieval, given data) before it is published.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from attrimeter.artefact.contract import (
    ENGINE_FILE,
    KERNEL_INDEX,
    KERNELS_DIR,
    LAUNCH_TABLE,
    MODEL_FILE,
    PLUGIN_SHARED_LIMIT,
    TIMING_CACHE_FILE,
)
from attrimeter.artefact.device import cuda_device, tensorrt_available
from attrimeter.artefact.jsonfields import JsonField
from attrimeter.artefact.manifest import KernelsInfo, Manifest, ManifestError, TensorRTInfo, Verification
from attrimeter.export.aot import DEFAULT_TARGETS, TARGETS, compile_kernels, kernel_specs
from attrimeter.export.onnx_export import (
    FP16_TOLERANCE,
    MAX_BATCH,
    ExportError,
    check_parity,
    check_retrieval,
    export_onnx,
)
from attrimeter.export.onnx_graph import ExportGraph

__all__ = ["ENGINE_FP32_TOLERANCE", "FORMATS", "export"]

FORMATS = ("onnx", "tensorrt")
# TensorRT runs fp32 convolutions in TF32 by default (10-bit mantissa): engines are held to a looser bound than the
# ONNX graph and, given data, to the retrieval check.
ENGINE_FP32_TOLERANCE = 1e-2


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    output_format: str = "onnx",
    flavor: str | None = None,
    fp16: bool = False,
    opset: int = 18,
    targets: Sequence[str] | None = None,
    ptx_version: str | None = None,
    data: str | Path | None = None,
    max_batch: int = 256,
    opt_batch: int = 32,
    timing_cache: str | Path | None = None,
    progress: bool = True,
) -> Manifest:
    """Export an interpreter checkpoint (see the module docstring for the folder it makes).

    Args:
        checkpoint: ``interpreter.pt``.
        out_dir: The export folder (an older export there is replaced once the new one is verified).
        output_format: ``"onnx"``, or ``"tensorrt"`` (ONNX, then an engine; needs TensorRT and an NVIDIA GPU).
        flavor: ``"portable"`` or ``"plugin"``; default portable for ONNX, plugin for TensorRT.
        fp16: Export an FP16 graph (and FP16 kernels and engine).
        opset: ONNX opset (≥ 18).
        targets: GPU targets of the AOT kernels (names of ``aot.TARGETS``); empty for none. Default: all of
            ``aot.DEFAULT_TARGETS`` where Triton is installed (none, with a note in the manifest, where it is not). A
            TensorRT build adds the local GPU's target.
        ptx_version: PTX ISA of the AOT kernels (e.g. ``"8.4"`` for a CUDA 12.4 driver); default Triton's newest.
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
        AotError: If the AOT compilation fails.
    """
    if output_format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {output_format!r}")
    flavor = flavor or ("plugin" if output_format == "tensorrt" else "portable")
    no_triton = importlib.util.find_spec("triton") is None
    if targets is None:
        targets = () if no_triton else DEFAULT_TARGETS
    kernels_note = "Triton is not installed: no AOT kernels (pip install triton, then re-export)" if no_triton \
        and not targets else None
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown GPU targets {unknown}; known: {', '.join(TARGETS)}")
    if fp16 and data is None:
        raise ValueError("an fp16 export is judged on retrieval metrics: pass data=... (--data DIR)")
    if not 1 <= opt_batch <= max_batch <= MAX_BATCH:
        raise ValueError(f"need 1 <= opt_batch <= max_batch <= {MAX_BATCH}, got {opt_batch} and {max_batch}")
    device_target = None
    if output_format == "tensorrt":
        from attrimeter.export.plugin_kernel import plugin_ptx_version

        missing = tensorrt_available()
        if missing:
            raise ExportError(f"cannot build a TensorRT engine here: {missing}")
        device = cuda_device()
        assert device is not None  # tensorrt_available() checked it
        device_target = f"sm_{device.cc}"
        if flavor == "plugin":
            if device_target not in TARGETS:
                raise ExportError(f"this GPU is {device_target}, for which no AOT kernel target is defined; "
                                  f"known: {', '.join(TARGETS)} (use --flavor portable)")
            if no_triton:
                raise ExportError("the plugin engine needs Triton for its AOT kernel: pip install triton, or use "
                                  "--flavor portable")
            try:
                ptx_version = plugin_ptx_version(ptx_version, device.driver_version)
            except ValueError as e:
                raise ExportError(str(e)) from None
    plugin_engine = output_format == "tensorrt" and flavor == "plugin"
    wanted = tuple(dict.fromkeys([*targets, *([device_target] if plugin_engine and device_target else [])]))

    def add_kernels_and_engine(staging: Path, manifest: Manifest, eager: ExportGraph) -> Manifest:
        channels, h, w = manifest.feature_map
        kernels = KernelsInfo(note=kernels_note) if kernels_note else None
        if wanted:
            specs = kernel_specs(channels, h * w, len(manifest.attributes), manifest.pooling.p, manifest.pooling.eps,
                                 manifest.dtype, pool_max_shared=PLUGIN_SHARED_LIMIT if plugin_engine else None,
                                 ptx_version=ptx_version)
            index = compile_kernels(staging / KERNELS_DIR, specs, wanted, progress=progress)
            kernels = KernelsInfo(index=f"{KERNELS_DIR}/{KERNEL_INDEX}", launch_table=f"{KERNELS_DIR}/{LAUNCH_TABLE}",
                                  targets=wanted, triton_version=index.triton_version, ptx_version=ptx_version,
                                  pool_max_shared=PLUGIN_SHARED_LIMIT if plugin_engine else None)
        engine = None
        if output_format == "tensorrt":
            engine = _build_engine(eager, staging, manifest, flavor, max_batch, opt_batch, timing_cache, data, fp16,
                                   progress)
        return replace(manifest, kernels=kernels, tensorrt=engine)

    manifest = export_onnx(checkpoint, out_dir, flavor=flavor, fp16=fp16, opset=opset, data=data, progress=progress,
                           extra=add_kernels_and_engine)
    if timing_cache is not None and output_format == "tensorrt":
        # The engine was built against a copy in the staging folder (the given cache may lie in the export being
        # replaced); hand the updated cache back now that the new export is in place.
        published = Path(out_dir) / TIMING_CACHE_FILE
        if Path(timing_cache).resolve() != published.resolve():
            shutil.copyfile(published, timing_cache)
    return manifest


def _build_engine(eager: ExportGraph, staging: Path, manifest: Manifest, flavor: str, max_batch: int,
                  opt_batch: int, timing_cache: str | Path | None, data: str | Path | None, fp16: bool,
                  progress: bool) -> TensorRTInfo:
    """Build ``model.engine`` from the staged ONNX, then run it against eager PyTorch (and on retrieval)."""
    from attrimeter.export.plugin_kernel import kernel_json_for_device
    from attrimeter.export.tensorrt_engine import EngineRunner, PluginSpec, build_engine

    device = cuda_device()
    assert device is not None  # checked before the export began
    channels, h, w = manifest.feature_map
    plugin = None
    if flavor == "plugin":
        try:
            kernel_json = kernel_json_for_device(staging, device.cc, max_shared_bytes=device.max_shared_optin)
        except ValueError as e:
            raise ExportError(str(e)) from None
        plugin = PluginSpec(kernel_json=kernel_json, num_attributes=len(manifest.attributes), channels=channels,
                            height=h, width=w)
    cache = staging / TIMING_CACHE_FILE
    if timing_cache is not None and Path(timing_cache).is_file():
        shutil.copyfile(timing_cache, cache)
    try:
        info = build_engine(staging / MODEL_FILE, staging / ENGINE_FILE, max_batch=max_batch, opt_batch=opt_batch,
                            image_size=manifest.image_size, plugin=plugin, timing_cache=cache,
                            progress=progress)
        runner = EngineRunner(staging / ENGINE_FILE)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"TensorRT engine build failed: {e}") from e
    size = manifest.image_size
    tolerance = FP16_TOLERANCE if fp16 else ENGINE_FP32_TOLERANCE
    batches = sorted({1, min(7, max_batch)})  # within the engine's optimisation profile
    try:
        parity = check_parity(runner, eager, size, batches, tolerance)
        retrieval = None
        if data is not None:
            # Eager fp32's metrics were measured by the ONNX stage: only the engine's are new.
            measured = manifest.verification.retrieval
            retrieval = check_retrieval(runner, eager, data, size, True, progress, batch=min(64, max_batch),
                                        eager_metrics=None if measured is None else measured.eager_fp32)
    except (RuntimeError, ValueError) as e:
        raise ExportError(f"the TensorRT engine cannot be checked: {e}") from e
    # Paths in the manifest are relative to the export folder (the staging folder disappears on publishing).
    if info.get("plugin"):
        info["plugin"]["kernel_json"] = Path(info["plugin"]["kernel_json"]).relative_to(staging).as_posix()
    info["timing_cache"] = TIMING_CACHE_FILE
    facts = {"engine": ENGINE_FILE, "max_batch": max_batch, **info,
             "verification": Verification(tolerance, parity, retrieval).to_json()}
    try:  # read as the manifest's tensorrt record: what is written is what the runtime will read
        return TensorRTInfo.from_json(JsonField.root(facts, "the TensorRT build's facts", ManifestError))
    except ManifestError as e:
        raise ExportError(str(e)) from e
