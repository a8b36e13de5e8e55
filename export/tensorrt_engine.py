"""TensorRT engine build for the AttriMeter ONNX export, with the masked GeM pooling as an AOT Python plugin.

Written against the real TensorRT Python API (10.x and 11.x); ``tensorrt`` is imported inside the functions only, so
this module imports (and its pure-Python parts run) on a machine without TensorRT. Facts this code relies on, with
where they are documented:

* Builder / network: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` makes the graph's dtypes decide the precision
  (10.x); in 11.0 it is deprecated and ignored because every network is strongly typed, and ``EXPLICIT_BATCH`` is gone.
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/_static/python-api/infer/Core/Builder.html
* ``BuilderFlag.FP16`` (and every other weak-typing flag) is removed in 11.x: FP16 comes from an FP16 graph.
  https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html
* The ONNX parser imports a node it has no importer for as a plugin: ``op_type`` must equal the plugin *name*, the
  namespace comes from a string attribute ``plugin_namespace``, and an AOT implementation is requested with the
  attribute ``aot`` = true. No parser flag is needed (``OnnxParserFlag`` has only NATIVE_INSTANCENORM and a DLA flag).
  https://github.com/NVIDIA/TensorRT/tree/main/samples/python/quickly_deployable_plugins (README, "ONNX model with a
  plugin" / "ONNX model with an AOT plugin")
* ``tensorrt.plugin.aot_impl`` returns (kernel name, PTX, ``KernelLaunchParams``, ``SymIntExprs``); "Presently, only
  PTX is supported"; the extra (scalar, SymInt32-only) arguments sit *after the tensor inputs and before the tensor
  outputs*; its signature must be exactly (inputs..., attrs in register order..., outputs, tactic) with a return
  annotation. ``KernelLaunchParams`` has grid_x/y/z, block_x/y/z, shared_mem (int or symbolic).
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/index.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/%5Fstatic/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/KernelLaunchParams.html
  https://github.com/NVIDIA/TensorRT/blob/main/python/packaging/bindings_wheel/tensorrt/plugin/_validate.py
* The plugin's kernel is the Triton pooling kernel compiled ahead of time; its metadata, the PTX rewrite that makes
  its parameters exactly what TensorRT passes, and the choice of kernel and PTX ISA for a GPU and driver are
  :mod:`attrimeter.export.plugin_kernel`.
* Timing cache: ``IBuilderConfig.create_timing_cache(bytes)`` / ``set_timing_cache(cache, ignore_mismatch)`` /
  ``get_timing_cache().serialize()``; progress: ``IBuilderConfig.progress_monitor`` takes an ``IProgressMonitor``.
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html

No ``from __future__ import annotations`` here on purpose: ``tensorrt.plugin`` inspects the annotations of the
register/aot_impl functions as live objects (``issubclass(annotation, TensorDesc)``), and strings would break it.
"""

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.artefact.contract import (
    INPUT_NAME,
    OUTPUT_NAMES,
    PLUGIN_ID,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    PLUGIN_SHARED_LIMIT,
)
from attrimeter.artefact.device import cuda_device, tensorrt_available, tensorrt_logger
from attrimeter.export.plugin_kernel import (
    PluginKernel,
    driver_ptx,
    load_plugin_kernel,
    ptx_driver,
    ptx_portable_to,
    sm_name,
)

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class PluginSpec:
    """What the MaskedGemPool plugin was exported for.

    Attributes:
        kernel_json: Per-kernel launch metadata written by the AOT step, for the GPU's target (see
            :func:`~attrimeter.export.plugin_kernel.kernel_json_for_device`). PTX/cubin paths inside it are
            relative to its folder.
        num_attributes: M, the number of attribute masks.
        channels: C, the feature channels.
        height: h of the feature map.
        width: w of the feature map.
    """

    kernel_json: Path
    num_attributes: int
    channels: int
    height: int
    width: int


# --------------------------------------------------------------------------------------------------- plugin


class _PluginState:
    """The kernel the registered plugin launches.

    TensorRT's registry refuses a second definition of a plugin id, so the decorated functions read the kernel from
    here and re-registering with another spec swaps it.
    """

    lock = threading.Lock()
    registered = False
    kernel: PluginKernel | None = None


def register_masked_gem_pool_plugin(spec: PluginSpec) -> None:
    """Register ``attrimeter::MaskedGemPool`` with TensorRT's Python plugin API (idempotent).

    The ONNX node must have ``op_type`` "MaskedGemPool" and the string attribute ``plugin_namespace`` =
    "attrimeter" (TensorRT matches op_type + plugin_namespace, not the ONNX domain), plus the int attribute ``aot`` =
    1 so the parser takes the AOT implementation. Its other attributes must be exactly channels, eps,
    num_attributes, p, p_int (any order): TensorRT rejects attributes the register function does not declare.

    Args:
        spec: Which kernel to launch and the shapes it was compiled for.

    Raises:
        ValueError: The kernel metadata is unusable or disagrees with ``spec``.
        RuntimeError: This TensorRT has no AOT Python plugins.
    """
    kernel = load_plugin_kernel(spec.kernel_json)
    _check_spec(kernel, spec)
    if kernel.shared_bytes > PLUGIN_SHARED_LIMIT:
        # Above 48 KiB a CUDA function needs an opt-in attribute, and TensorRT documents no way to set it for an AOT
        # plugin kernel: the launch would fail on the GPU.
        raise ValueError(f"{kernel.json_path} uses {kernel.shared_bytes} B of shared memory per block, more than the "
                         f"{PLUGIN_SHARED_LIMIT} B a TensorRT AOT plugin kernel may use; export with --format tensorrt "
                         "(it caps the pooling tile at 48 KiB)")
    with _PluginState.lock:
        _PluginState.kernel = kernel
        if _PluginState.registered:
            return
        _define_plugin()
        _PluginState.registered = True


def _define_plugin() -> None:
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if not hasattr(trtp, "aot_impl"):
        raise RuntimeError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl (AOT Python plugins); "
                           "use a newer TensorRT 10.x or 11.x")

    # The register function gets the attributes by keyword; aot_impl declares all of them too, because some releases
    # pass every attribute to it positionally in the ONNX node's order. So the values are checked here, not there.
    @trtp.register(PLUGIN_ID)
    def _masked_gem_pool_desc(
        f: trtp.TensorDesc, z: trtp.TensorDesc, scale: trtp.TensorDesc, shift: trtp.TensorDesc,
        channels: int, eps: float, num_attributes: int, p: float, p_int: int,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        kernel = _PluginState.kernel
        assert kernel is not None  # set before the plugin is defined
        _check_attributes(kernel, channels=channels, eps=eps, num_attributes=num_attributes, p=p, p_int=p_int)
        batch, c, m = f.shape_expr[0], f.shape_expr[1], z.shape_expr[1]
        return (trtp.from_shape_expr((batch, c), dtype=f.dtype),
                trtp.from_shape_expr((batch, m, c), dtype=f.dtype))

    @trtp.aot_impl(PLUGIN_ID)
    def _masked_gem_pool_aot(
        f: trtp.TensorDesc, z: trtp.TensorDesc, scale: trtp.TensorDesc, shift: trtp.TensorDesc,
        channels: int, eps: float, num_attributes: int, p: float, p_int: int,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        kernel = _PluginState.kernel
        assert kernel is not None  # set before the plugin is defined
        graph_dtype = {trt.float32: "fp32", trt.float16: "fp16"}.get(f.dtype, str(f.dtype))
        if graph_dtype != kernel.dtype:
            raise ValueError(f"{PLUGIN_ID}: the graph is {graph_dtype} but {kernel.json_path} was compiled for "
                             f"{kernel.dtype}; compile the kernel for the graph's dtype")
        # ShapeExpr * int is defined, int * ShapeExpr is not: keep the symbolic factor on the left.
        per_item = math.prod(factor for factor in kernel.grid_x if isinstance(factor, int))
        launch = trtp.KernelLaunchParams()
        launch.grid_x = f.shape_expr[0] * per_item if "B" in kernel.grid_x else per_item
        launch.grid_y = kernel.grid_y
        launch.grid_z = kernel.grid_z
        launch.block_x = 32 * kernel.num_warps
        launch.shared_mem = kernel.shared_bytes
        # No scalar arguments: C, HW, M, p, eps and the strides are compile-time constants of the kernel.
        return kernel.symbol.encode(), kernel.ptx.encode(), launch, trtp.SymIntExprs(0)


def _check_attributes(kernel: PluginKernel, **attributes: float) -> None:
    """The ONNX node's attributes must match the constants baked into the kernel (the plugin cannot pass them)."""
    baked = {"channels": kernel.constants.get("C"), "num_attributes": kernel.constants.get("M"),
             "p": kernel.constants.get("p"), "eps": kernel.constants.get("eps"),
             "p_int": kernel.constants.get("P_INT")}
    wrong = {k: (attributes[k], v) for k, v in baked.items()
             if v is not None and not math.isclose(float(attributes[k]), float(v), rel_tol=1e-6, abs_tol=0.0)}
    if wrong:
        raise ValueError(f"{PLUGIN_ID}: ONNX attributes differ from the constants of {kernel.json_path} "
                         f"(attribute: (onnx, kernel)): {wrong}")


def _check_spec(kernel: PluginKernel, spec: PluginSpec) -> None:
    expected = {"C": spec.channels, "M": spec.num_attributes, "HW": spec.height * spec.width}
    wrong = {k: (kernel.constants[k], v) for k, v in expected.items() if k in kernel.constants
             and int(kernel.constants[k]) != v}
    if wrong:
        raise ValueError(f"{kernel.json_path} was compiled for other shapes than the plugin spec "
                         f"(constant: (kernel, spec)): {wrong}; re-run the AOT step for this model")


# --------------------------------------------------------------------------------------------------- engine build


def _make_progress_monitor() -> Any:
    import tensorrt as trt
    from tqdm import tqdm

    class _Progress(trt.IProgressMonitor):
        """One tqdm bar per top-level build phase (TensorRT calls this from several threads)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                with self._lock:
                    self._bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT: {phase_name}", leave=False)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return _Progress()


def _parse_errors(parser: Any, onnx_path: Path) -> ValueError:
    lines = []
    for i in range(parser.num_errors):
        parser_error = parser.get_error(i)
        lines.append(f"node {parser_error.node()} {parser_error.node_name()!r} ({parser_error.node_operator()}): "
                     f"{parser_error.desc()} [{parser_error.code()}]")
    hint = ""
    if any(PLUGIN_NAME in line for line in lines):
        hint = (f"\n(the {PLUGIN_NAME} node needs plugin_namespace={PLUGIN_NAMESPACE!r} and aot=1, and the plugin "
                "must be registered before parsing: pass plugin=PluginSpec(...))")
    return ValueError(f"TensorRT cannot parse {onnx_path}:\n  " + "\n  ".join(lines or ["(no parser error reported)"])
                      + hint)


def _write_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    tmp.replace(path)


def build_engine(onnx_path: Path, engine_path: Path, *, max_batch: int, opt_batch: int, image_size: tuple[int, int],
                 plugin: PluginSpec | None, timing_cache: Path | None, workspace_gib: float = 4.0,
                 progress: bool = True) -> dict[str, Any]:
    """Build a strongly typed TensorRT engine from the exported ONNX.

    The graph's dtypes decide the precision (an FP16 engine comes from the FP16 graph; ``BuilderFlag.FP16`` is never
    set, it is gone in TensorRT 11). One optimisation profile covers input ``images`` from (1, 3, H, W) over
    (opt_batch, 3, H, W) to (max_batch, 3, H, W).

    Args:
        onnx_path: The ONNX graph (portable or plugin flavour).
        engine_path: Where the serialized engine goes.
        max_batch: Largest batch of the profile.
        opt_batch: Batch TensorRT tunes for.
        image_size: (H, W) of ``images``.
        plugin: The MaskedGemPool plugin, registered before parsing; None for the portable graph.
        timing_cache: Loaded when it exists and saved after the build; None for no cache.
        workspace_gib: Workspace memory pool limit.
        progress: Show the build phases.

    Returns:
        Build facts for the manifest: ``tensorrt_version``, ``device_name``, ``compute_capability`` (int, 90 for
        sm_90), ``cuda_driver_version``, ``build_seconds``, ``profile`` (input name and min/opt/max shapes),
        ``engine_bytes``, ``plugin_kernel_target`` (e.g. "sm_90", None without plugin), ``plugin`` (details or None),
        ``timing_cache`` (path or None), ``workspace_gib``.

    Raises:
        RuntimeError: TensorRT or a GPU is missing, or the build failed.
        ValueError: Bad arguments, unparsable ONNX (each parser error with its node), or a plugin kernel that does
            not fit this GPU.
    """
    missing = tensorrt_available()
    if missing is not None:
        raise RuntimeError(missing)
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch ({opt_batch}) <= max_batch ({max_batch})")
    import tensorrt as trt

    device = cuda_device()
    assert device is not None  # tensorrt_available() checked it
    plugin_info: dict[str, Any] | None = None
    if plugin is not None:
        register_masked_gem_pool_plugin(plugin)
        kernel = _PluginState.kernel
        assert kernel is not None
        if not ptx_portable_to(kernel.ptx_target, device.cc):
            raise ValueError(f"{kernel.json_path} holds PTX for {kernel.ptx_target}, which cannot run on this "
                             f"{device.name} ({sm_name(device.cc)}); use kernel_json_for_device(export_dir, "
                             f"{device.cc})")
        needed = ptx_driver(kernel.ptx_version)
        if device.driver_version and device.driver_version < needed:
            raise ValueError(
                f"{kernel.json_path} is PTX ISA {kernel.ptx_version}, which needs a CUDA {needed // 1000}."
                f"{needed % 1000 // 10} driver; this one is CUDA {device.driver_version // 1000}."
                f"{device.driver_version % 1000 // 10}: update the driver, or re-export with --ptx-version "
                f"{driver_ptx(device.driver_version) or '(none: CUDA 12 or newer is needed)'}")
        if device.max_shared_optin and kernel.shared_bytes > device.max_shared_optin:
            raise ValueError(f"{kernel.json_path} needs {kernel.shared_bytes} B shared memory per block; "
                             f"{device.name} allows {device.max_shared_optin} B")
        plugin_info = {"id": PLUGIN_ID, "target": kernel.target, "symbol": kernel.symbol, "dtype": kernel.dtype,
                       "ptx_target": kernel.ptx_target, "ptx_version": kernel.ptx_version,
                       "kernel_json": str(kernel.json_path)}

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 11:
        # 10.x: opt in to strong typing. 11.x: always strongly typed, the flag is deprecated and ignored.
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if plugin is not None:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise _parse_errors(parser, Path(onnx_path))

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if INPUT_NAME not in inputs:
        raise ValueError(f"{onnx_path} has no input {INPUT_NAME!r} (inputs: {sorted(inputs)})")
    tensor = inputs[INPUT_NAME]
    if len(tensor.shape) != 4:
        raise ValueError(f"input {INPUT_NAME!r} has shape {tuple(tensor.shape)}, expected [B, 3, H, W]")
    h, w = image_size
    shapes = {"min": (1, 3, h, w), "opt": (opt_batch, 3, h, w), "max": (max_batch, 3, h, w)}

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    if timing_cache is not None:
        cached = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        timing = config.create_timing_cache(cached)
        if not config.set_timing_cache(timing, False):
            # A cache from another GPU/TensorRT is rejected: start a fresh one rather than fail the build.
            _LOG.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", timing_cache)
            timing = config.create_timing_cache(b"")
            config.set_timing_cache(timing, False)
    monitor = None
    if progress:
        if hasattr(trt, "IProgressMonitor"):
            monitor = _make_progress_monitor()  # kept referenced until the build is done
            config.progress_monitor = monitor
        else:
            _LOG.info("building %s (TensorRT %s)", engine_path, trt.__version__)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"TensorRT {trt.__version__} failed to build {onnx_path}:\n  "
                           + "\n  ".join(logger.errors or ["(no error logged)"]))
    _write_atomic(Path(engine_path), serialized)
    if timing_cache is not None:
        _write_atomic(Path(timing_cache), config.get_timing_cache().serialize())

    return {
        "tensorrt_version": trt.__version__,
        "device_name": device.name,
        "compute_capability": device.cc,
        "cuda_driver_version": device.driver_version,
        "build_seconds": round(build_seconds, 3),
        "profile": {"input": INPUT_NAME, **{k: list(v) for k, v in shapes.items()}},
        "engine_bytes": int(serialized.nbytes),
        "plugin_kernel_target": None if plugin_info is None else plugin_info["target"],
        "plugin": plugin_info,
        "timing_cache": None if timing_cache is None else str(timing_cache),
        "workspace_gib": workspace_gib,
    }


# --------------------------------------------------------------------------------------------------- engine run


class EngineRunner:
    """Runs a built engine on batches of images, for the export's checks (device buffers are torch CUDA tensors).

    The runtime's TensorRT backend (torch-free, cuda-python buffers) is the deployment path; this runner exists so
    that ``attrimeter export --format tensorrt`` can check the engine it just built, where torch is present anyway.
    ``run`` has ONNX Runtime's signature, so the same parity and retrieval checks take either.

    Args:
        engine_path: The serialized engine.

    Raises:
        RuntimeError: If TensorRT or a GPU is missing, or the engine cannot be deserialized.
    """

    def __init__(self, engine_path: Path) -> None:
        missing = tensorrt_available()
        if missing is not None:
            raise RuntimeError(missing)
        import tensorrt as trt

        self._logger = tensorrt_logger()
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT cannot deserialize {engine_path}:\n  "
                               + "\n  ".join(self._logger.errors or ["(no error logged)"]))
        self._engine = engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        """Run one batch.

        Args:
            output_names: Outputs to return, in order (None: all, in the engine's order).
            feeds: ``{"images": float32 array [B, 3, H, W]}``.

        Returns:
            The outputs as numpy arrays.
        """
        import tensorrt as trt
        import torch

        images = torch.from_numpy(feeds[INPUT_NAME]).cuda().contiguous()
        context = self._context
        if not context.set_input_shape(INPUT_NAME, tuple(images.shape)):
            raise ValueError(f"batch shape {tuple(images.shape)} is outside the engine's optimisation profile")
        context.set_tensor_address(INPUT_NAME, images.data_ptr())
        buffers = {}
        for name in self.outputs:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self._engine.get_tensor_dtype(name)))).dtype
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=images.device)
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed:\n  " + "\n  ".join(self._logger.errors[-5:]))
        stream.synchronize()
        # By name, not by the engine's I/O order: callers compare with the graph's outputs in OUTPUT_NAMES order.
        names = output_names or [n for n in OUTPUT_NAMES if n in buffers] or self.outputs
        return [buffers[name].cpu().numpy() for name in names]
