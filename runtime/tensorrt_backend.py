"""TensorRT backend: the export's serialized engine with cuda-python buffers and one stream (docs/architecture.md §6).

Torch-free: device memory comes from ``cudaMalloc``, pinned host staging from ``cudaMallocHost`` (both sized once for
the engine's largest batch), copies are ``cudaMemcpyAsync`` on the backend's stream and the engine runs with
``execute_async_v3`` on the same stream. Facts relied on, with their sources:

* TensorRT 10.x / 11.x name-based I/O: ``ICudaEngine.num_io_tensors`` / ``get_tensor_name(i)`` /
  ``get_tensor_mode(name)`` / ``get_tensor_dtype(name)`` / ``get_tensor_profile_shape(name, profile)``;
  ``IExecutionContext.set_input_shape(name, shape)`` (False outside the profile), ``get_tensor_shape(name)`` (the
  output shapes once the input shape is set), ``set_tensor_address(name, ptr)`` and ``execute_async_v3(stream)``.
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
  and NVIDIA's ``samples/python/common_runtime.py`` (the same calls with ``cudaMallocHost`` / ``cudaMemcpyAsync``).
* An engine built with an AOT plugin (the ``plugin`` flavour's MaskedGemPool) carries the plugin's kernel: "it does
  not require any Python modules or definitions to be present at runtime", so nothing is registered before
  deserializing. https://github.com/NVIDIA/TensorRT/tree/main/samples/python/quickly_deployable_plugins ("Loading and
  running a TRT engine containing an AOT plugin").
* cuda-python's runtime calls return ``(cudaError_t, value...)``; the runtime API's current device is per thread, so
  every call path sets it first (the batcher runs inference on its own thread).
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.artefact.contract import INPUT_NAME, OUTPUT_NAMES
from attrimeter.artefact.device import tensorrt_available, tensorrt_logger
from attrimeter.runtime.backends import BackendError
from attrimeter.runtime.cuda_kernels import cuda_check
from attrimeter.runtime.errors import InputError

__all__ = ["TensorRTBackend"]


@dataclass
class _Binding:
    """One engine I/O tensor: its largest shape and its device and pinned host buffers."""

    name: str
    is_input: bool
    dtype: np.dtype
    max_shape: tuple[int, ...]
    device: int = 0
    host: int = 0
    staging: np.ndarray | None = None  # flat numpy view of the pinned host buffer

    @property
    def nbytes(self) -> int:
        return math.prod(self.max_shape) * self.dtype.itemsize


class TensorRTBackend:
    """Run the export's TensorRT engine (see :class:`attrimeter.runtime.backends.Backend`).

    Batches larger than the engine's ``max_batch`` are split. ``run`` and ``close`` may be called from different
    threads (a lock orders them); ``run`` itself is meant for one inference thread.

    Args:
        engine_path: The serialized engine (the manifest's ``tensorrt.engine`` in the export folder).
        image_size: ``(H, W)`` of the export's input; the engine's profile must take it.
        max_batch: The largest batch to run at once (the manifest's ``tensorrt.max_batch``; capped by the profile).
        device: CUDA device ordinal.

    Raises:
        BackendError: TensorRT, cuda-python, the engine file or a GPU is missing, or the engine does not match the
            export's interface.
        CudaError: A CUDA call failed (the message names it).
    """

    name = "tensorrt"

    def __init__(self, engine_path: Path, image_size: tuple[int, int], max_batch: int, device: int = 0) -> None:
        missing = tensorrt_available()
        if missing is not None:
            raise BackendError(missing)
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            raise BackendError("the tensorrt backend needs cuda-python (pip install 'attrimeter[trt]')") from None
        import tensorrt as trt

        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise BackendError(f"the TensorRT engine {engine_path} is missing")
        self.device = f"cuda:{device}"
        self._ordinal = device
        self._lock = threading.Lock()
        self._bindings: dict[str, _Binding] = {}
        self._stream: Any = None
        self._context: Any = None
        self._engine: Any = None
        self._runtime: Any = None
        self._logger = tensorrt_logger()
        self._image_shape = (3, int(image_size[0]), int(image_size[1]))

        cuda_check("cudaSetDevice", cudart.cudaSetDevice(device))
        runtime = trt.Runtime(self._logger)
        self._runtime = runtime
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT {trt.__version__} cannot deserialize {engine_path} (an engine runs only "
                               "with the TensorRT version and GPU model it was built with; rebuild it here):\n  "
                               + "\n  ".join(self._logger.errors or ["(no error logged)"]))
        self._engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= set(names):
            raise BackendError(f"{engine_path} has inputs {inputs} and outputs {sorted(set(names) - set(inputs))}; "
                               f"the export's interface is {INPUT_NAME!r} -> {list(OUTPUT_NAMES)}")
        profile_max = tuple(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2])
        if tuple(profile_max[1:]) != self._image_shape:
            raise BackendError(f"{engine_path} takes images {list(profile_max[1:])}, the manifest says "
                               f"{list(self._image_shape)}")
        self.max_batch = min(int(max_batch), int(profile_max[0]))

        try:
            context = engine.create_execution_context()
            if context is None:
                raise BackendError(f"TensorRT cannot create an execution context for {engine_path}:\n  "
                                   + "\n  ".join(self._logger.errors[-5:] or ["(no error logged)"]))
            self._context = context
            if not context.set_input_shape(INPUT_NAME, (self.max_batch, *self._image_shape)):
                raise BackendError(f"batch {self.max_batch} is outside {engine_path}'s optimisation profile")
            for name in names:
                shape = tuple(int(v) for v in context.get_tensor_shape(name))
                if any(v < 0 for v in shape):
                    raise BackendError(f"{engine_path}: tensor {name!r} has no static shape at batch "
                                       f"{self.max_batch} ({list(shape)})")
                self._bindings[name] = _Binding(name, name == INPUT_NAME, np.dtype(trt.nptype(
                    engine.get_tensor_dtype(name))), shape)
            # Pinned host staging and device buffers, allocated once for the largest batch.
            self._stream = cuda_check("cudaStreamCreateWithFlags",
                                      cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
            for binding in self._bindings.values():
                binding.device = int(cuda_check("cudaMalloc", cudart.cudaMalloc(binding.nbytes)))
                binding.host = int(cuda_check("cudaMallocHost", cudart.cudaMallocHost(binding.nbytes)))
                pointer = ctypes.cast(binding.host, ctypes.POINTER(ctypes.c_uint8))
                binding.staging = np.ctypeslib.as_array(pointer, (binding.nbytes,)).view(binding.dtype)
        except BaseException:
            self.close()
            raise

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch (split into engine-sized chunks).

        Args:
            images: float32 RGB in [0, 1], ``[B, 3, H, W]``.

        Returns:
            ``embedding``, ``attr_embeddings``, ``aam`` and ``attr_logits`` as float32 arrays with first axis B.

        Raises:
            InputError: Not an array of the export's image shape, or B = 0.
            CudaError: A CUDA call failed.
            RuntimeError: The backend is closed, or TensorRT failed to execute.
        """
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != self._image_shape \
                or not len(images):
            got = list(images.shape) if isinstance(images, np.ndarray) else type(images).__name__
            raise InputError(f"images must be an array [B >= 1, {', '.join(map(str, self._image_shape))}], got {got}")
        if not np.issubdtype(images.dtype, np.floating):
            raise InputError(f"images must be float32 in [0, 1], got {images.dtype}")
        with self._lock:
            if self._context is None:
                raise RuntimeError("the TensorRT backend is closed")
            parts = [self._run_chunk(images[start:start + self.max_batch])
                     for start in range(0, len(images), self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts]) for name in OUTPUT_NAMES}

    def _run_chunk(self, images: np.ndarray) -> dict[str, np.ndarray]:
        from cuda.bindings import runtime as cudart

        context = self._context
        stream = self._stream
        batch = len(images)
        cuda_check("cudaSetDevice", cudart.cudaSetDevice(self._ordinal))
        source = self._bindings[INPUT_NAME]
        assert source.staging is not None
        flat = images.astype(source.dtype, copy=False).reshape(-1)
        source.staging[:flat.size] = flat
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check("cudaMemcpyAsync(images)",
                   cudart.cudaMemcpyAsync(source.device, source.host, flat.nbytes, h2d, stream))
        if not context.set_input_shape(INPUT_NAME, (batch, *self._image_shape)):
            raise RuntimeError(f"TensorRT refused input shape {[batch, *self._image_shape]}:\n  "
                               + "\n  ".join(self._logger.errors[-5:] or ["(no error logged)"]))
        for binding in self._bindings.values():
            if not context.set_tensor_address(binding.name, binding.device):
                raise RuntimeError(f"TensorRT refused the address of {binding.name!r}")
        if not context.execute_async_v3(int(stream)):
            raise RuntimeError("TensorRT execution failed:\n  "
                               + "\n  ".join(self._logger.errors[-5:] or ["(no error logged)"]))
        shapes = {}
        for name in OUTPUT_NAMES:
            binding = self._bindings[name]
            shapes[name] = tuple(int(v) for v in context.get_tensor_shape(name))
            if shapes[name][0] != batch:
                raise RuntimeError(f"TensorRT output {name!r} has shape {list(shapes[name])} for batch {batch}")
            # Outputs are packed [B, ...]: their first B rows are the first bytes of the buffer.
            nbytes = math.prod(shapes[name]) * binding.dtype.itemsize
            cuda_check(f"cudaMemcpyAsync({name})", cudart.cudaMemcpyAsync(binding.host, binding.device, nbytes, d2h,
                                                                          stream))
        cuda_check("cudaStreamSynchronize", cudart.cudaStreamSynchronize(stream))
        out = {}
        for name in OUTPUT_NAMES:
            staging = self._bindings[name].staging
            assert staging is not None
            # A copy: the pinned buffer is reused by the next batch.
            out[name] = staging[:math.prod(shapes[name])].reshape(shapes[name]).astype(np.float32, copy=True)
        return out

    def close(self) -> None:
        """Free the buffers and the stream and release the engine (idempotent).

        Raises:
            CudaError: The first CUDA call that failed (every resource is still attempted).
        """
        from cuda.bindings import runtime as cudart

        with self._lock:
            failures = []
            for call, result in self._release(cudart):
                try:
                    cuda_check(call, result)
                except RuntimeError as e:
                    failures.append(e)
            # The context before the engine before the runtime: TensorRT's documented destruction order.
            self._context = self._engine = self._runtime = None
            if failures:
                raise failures[0]

    def _release(self, cudart: Any) -> list[tuple[str, Any]]:
        results = []
        if self._bindings or self._stream is not None:
            results.append(("cudaSetDevice", cudart.cudaSetDevice(self._ordinal)))
        for binding in self._bindings.values():
            binding.staging = None
            if binding.host:
                results.append(("cudaFreeHost", cudart.cudaFreeHost(binding.host)))
            if binding.device:
                results.append(("cudaFree", cudart.cudaFree(binding.device)))
        self._bindings = {}
        if self._stream is not None:
            results.append(("cudaStreamDestroy", cudart.cudaStreamDestroy(self._stream)))
            self._stream = None
        return results
