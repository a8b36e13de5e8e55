"""Torch-free launcher of the AOT-compiled explain kernels with cuda-python's driver API (docs/architecture.md §4-§6).

The export's ``kernels/`` folder holds, per GPU target, the Triton ``_explain_kernel`` compiled ahead of time (cubin,
PTX) with its launch metadata; :mod:`attrimeter.runtime.explain_kernels` reads it, checks that every parameter can be
bound and picks the device's target. This module loads the cubins of that target into the device's primary context
(the context the CUDA runtime and TensorRT use, so buffers are shared) and launches them with ``cuLaunchKernel``;
neither torch nor triton is imported.

cuda-python facts relied on (cuda-bindings 12.9, the same in 13.x): every call returns a tuple whose first item is the
``CUresult`` (``err, value = call(...)``); ``cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shared, stream, kernelParams,
extra)`` takes ``kernelParams`` as :meth:`~attrimeter.runtime.explain_kernels.ExplainKernel.arguments` packs them;
``cuFuncGetAttribute(attrib, func)`` and ``cuDeviceGetAttribute(attrib, dev)`` take the attribute first; without
``libcuda`` the driver calls raise ``RuntimeError``. Source:
https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/driver.html.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from attrimeter.artefact.device import cuda_device
from attrimeter.artefact.kernels import load_kernel_index
from attrimeter.runtime.decompose import Decomposition, check_weights
from attrimeter.runtime.errors import GalleryError, InputError, UnknownIdError
from attrimeter.runtime.explain_kernels import (
    EXPLAIN_KERNELS,
    INT32_MAX,
    ExplainKernel,
    choose_target,
    load_explain_kernel,
)

__all__ = ["CudaError", "CudaExplainer", "cuda_available", "cuda_check"]

# Above this much dynamic shared memory a function must opt in (cuFuncSetAttribute), up to the device's limit.
_DEFAULT_SHARED = 48 * 1024
_UPLOAD_CHUNK = 64 << 20  # bytes per host-to-device copy of the gallery (progress granularity)


class CudaError(RuntimeError):
    """A CUDA driver or runtime call failed; the message names the call and the CUDA error."""


def cuda_check(call: str, result: Any) -> Any:
    """Unpack a cuda-python result tuple, raising on an error code.

    Args:
        call: The call's name for the message, e.g. ``"cuMemAlloc"``.
        result: What the cuda-python function returned: ``(err,)``, ``(err, value)`` or ``(err, v1, v2, ...)``
            with ``err`` a ``CUresult`` or ``cudaError_t``.

    Returns:
        None, the single value, or the tuple of values.

    Raises:
        CudaError: ``err`` is not success (0); the message names ``call`` and the error, e.g.
            ``cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY (2)``.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"{call} failed: {getattr(err, 'name', err)} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_available(device: int = 0) -> str | None:
    """Whether the explain kernels can be launched here.

    Returns:
        None when cuda-python imports and the driver answers with device ``device``; else one sentence saying what
        is missing.
    """
    try:
        from cuda.bindings import driver as drv  # noqa: F401  (presence only)
    except ImportError:
        return "cuda-python is not installed (pip install 'attrimeter[trt]')."
    if cuda_device(device) is None:
        return f"no CUDA driver or no CUDA device {device} is visible."
    return None


# --------------------------------------------------------------------------------------------------- launcher


class CudaExplainer:
    """Explain query/gallery pairs on a CUDA GPU with the export's AOT explain kernels (no torch, no triton).

    The gallery's ``[N, M+1, C]`` embeddings (row 0 the target's global embedding f, rows 1..M the per-attribute
    f_k) live on the device in float16; each :meth:`explain` uploads the queries and ids, launches one program per
    (query, id) pair and reads back ``d``, ``d_k``, ``shares``, ``d_hat`` and ``scores`` (the semantics of
    ``kernels.attr_distance.explain_topk_reference``: direct differences in float32). Methods are thread-safe (one
    lock: the device scratch buffers are shared).

    It is a :class:`~attrimeter.runtime.device_index.DeviceIndex` that explains but does not rank (FAISS ranks).

    Args:
        index_path: The export's ``kernels/index.json`` (the manifest's ``kernels.index``).
        channels: C of the export's model (the kernels were compiled for it).
        num_attributes: M of the export's model.
        device: CUDA device ordinal.

    Raises:
        ValueError: The export has no explain kernels for this GPU, or they were compiled for other shapes.
        CudaError: A CUDA call failed, or there is no CUDA driver.
    """

    def __init__(self, index_path: str | Path, channels: int, num_attributes: int, device: int = 0) -> None:
        from cuda.bindings import driver as drv

        index_path = Path(index_path)
        self.device = device
        self.channels = channels
        self.num_attributes = num_attributes
        index = load_kernel_index(index_path)

        self._lock = threading.Lock()
        self._ctx: Any = None
        self._dev: Any = None
        self._stream: Any = None
        self._modules: list[Any] = []
        self._functions: dict[str, Any] = {}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device address, bytes)
        self._rows = 0  # gallery rows uploaded
        self._row_bytes = (self.num_attributes + 1) * self.channels * 2  # one fp16 [M+1, C] row
        try:
            result = drv.cuInit(0)
        except RuntimeError as e:  # cuda-python raises when libcuda cannot be loaded at all
            raise CudaError(f"cuInit failed: no CUDA driver ({e})") from None
        cuda_check("cuInit", result)
        self._dev = cuda_check("cuDeviceGet", drv.cuDeviceGet(device))
        attr = drv.CUdevice_attribute
        major = cuda_check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._dev))
        minor = cuda_check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._dev))
        optin = cuda_check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, self._dev))
        self.target = choose_target(index, 10 * int(major) + int(minor), int(optin))
        self.kernels = {name: load_explain_kernel(index_path.parent / index.targets[self.target][name].json)
                        for name in EXPLAIN_KERNELS}
        for kernel in self.kernels.values():
            baked = {"C": kernel.constants.get("C"), "M": kernel.constants.get("M")}
            if baked != {"C": self.channels, "M": self.num_attributes}:
                raise ValueError(f"{kernel.json_path} was compiled for {baked}, the export's model has "
                                 f"C={self.channels}, M={self.num_attributes}; re-export the kernels")

        self._ctx = cuda_check("cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(self._dev))
        try:
            with self._current():
                for name, kernel in self.kernels.items():
                    self._functions[name] = self._load(kernel, int(optin))
                self._stream = cuda_check("cuStreamCreate",
                                          drv.cuStreamCreate(drv.CUstream_flags.CU_STREAM_NON_BLOCKING.value))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ device helpers

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        """Make the device's primary context current on this thread for the block (any thread may call)."""
        from cuda.bindings import driver as drv

        cuda_check("cuCtxPushCurrent", drv.cuCtxPushCurrent(self._ctx))
        try:
            yield
        finally:
            cuda_check("cuCtxPopCurrent", drv.cuCtxPopCurrent())

    def _load(self, kernel: ExplainKernel, optin: int) -> Any:
        from cuda.bindings import driver as drv

        where = f"{kernel.target} {kernel.name}"
        module = cuda_check(f"cuModuleLoadData({where})", drv.cuModuleLoadData(kernel.cubin))
        self._modules.append(module)
        function = cuda_check(f"cuModuleGetFunction({kernel.symbol})",
                              drv.cuModuleGetFunction(module, kernel.symbol.encode()))
        fattr = drv.CUfunction_attribute
        max_threads = cuda_check("cuFuncGetAttribute(MAX_THREADS_PER_BLOCK)", drv.cuFuncGetAttribute(
            fattr.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, function))
        if int(max_threads) < kernel.threads:
            raise ValueError(f"{kernel.json_path}: the kernel allows {max_threads} threads per block on this device, "
                             f"the metadata asks {kernel.threads}")
        if kernel.shared_bytes > _DEFAULT_SHARED:
            static = cuda_check("cuFuncGetAttribute(SHARED_SIZE_BYTES)", drv.cuFuncGetAttribute(
                fattr.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, function))
            if kernel.shared_bytes + int(static) > optin:
                raise ValueError(f"{kernel.json_path}: the kernel needs {kernel.shared_bytes} + {static} B of shared "
                                 f"memory per block, this device allows {optin} B")
            cuda_check("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", drv.cuFuncSetAttribute(
                function, fattr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, kernel.shared_bytes))
        return function

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` (grown, never shrunk; contents not kept). Context must be current."""
        from cuda.bindings import driver as drv

        address, size = self._buffers.get(name, (0, 0))
        if size >= nbytes:
            return address
        if address:
            del self._buffers[name]
            cuda_check("cuMemFree", drv.cuMemFree(drv.CUdeviceptr(address)))
        size = max(nbytes, 2 * size, 256)
        address = int(cuda_check("cuMemAlloc", drv.cuMemAlloc(size)))
        self._buffers[name] = (address, size)
        return address

    def _upload(self, address: int, array: np.ndarray, progress: bool = False) -> None:
        from cuda.bindings import driver as drv

        data = memoryview(np.ascontiguousarray(array)).cast("B")
        with tqdm(total=len(data), unit="B", unit_scale=True, desc="gallery to GPU", disable=not progress) as bar:
            for start in range(0, len(data), _UPLOAD_CHUNK):
                chunk = np.frombuffer(data[start:start + _UPLOAD_CHUNK], dtype=np.uint8)
                cuda_check("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(drv.CUdeviceptr(address + start),
                                                                      chunk.ctypes.data, len(chunk), self._stream))
                bar.update(len(chunk))

    def _download(self, array: np.ndarray, address: int) -> None:
        from cuda.bindings import driver as drv

        cuda_check("cuMemcpyDtoHAsync", drv.cuMemcpyDtoHAsync(array.ctypes.data, drv.CUdeviceptr(address),
                                                              array.nbytes, self._stream))

    def _sync(self) -> None:
        from cuda.bindings import driver as drv

        cuda_check("cuStreamSynchronize", drv.cuStreamSynchronize(self._stream))

    def _check_open(self) -> None:
        if self._stream is None:
            raise RuntimeError("the CudaExplainer is closed")

    # ------------------------------------------------------------------------------------------ gallery

    def __len__(self) -> int:
        return self._rows

    def _rows_array(self, rows: np.ndarray) -> np.ndarray:
        shape = (self.num_attributes + 1, self.channels)
        if not isinstance(rows, np.ndarray) or rows.ndim != 3 or rows.shape[1:] != shape:
            got = list(rows.shape) if isinstance(rows, np.ndarray) else type(rows).__name__
            raise InputError(f"gallery rows must be an array [N, {shape[0]}, {shape[1]}] (row 0 the global "
                             f"embedding, rows 1..M the attribute embeddings), got {got}")
        if not np.issubdtype(rows.dtype, np.floating):
            raise InputError(f"gallery rows must be floating point, got {rows.dtype}")
        return np.ascontiguousarray(rows, dtype=np.float16)

    def set_gallery(self, rows: np.ndarray, progress: bool = False) -> None:
        """Replace the device gallery.

        Args:
            rows: ``[N, M+1, C]`` embeddings (converted to float16; e.g. a ``Gallery``'s rows).
            progress: Show the upload.

        Raises:
            InputError: Wrong shape or dtype.
            CudaError: A CUDA call failed.
        """
        rows = self._rows_array(rows)
        with self._lock:
            self._check_open()
            self._rows = 0
            self._append(rows, progress)

    def append_gallery(self, rows: np.ndarray, progress: bool = False) -> None:
        """Append rows to the device gallery (their ids continue from ``len(self)``).

        Args:
            rows: ``[n, M+1, C]`` embeddings (converted to float16).
            progress: Show the upload.

        Raises:
            InputError: Wrong shape or dtype, or a gallery larger than the kernel's int32 row count.
            CudaError: A CUDA call failed.
        """
        rows = self._rows_array(rows)
        with self._lock:
            self._check_open()
            self._append(rows, progress)

    def _append(self, rows: np.ndarray, progress: bool) -> None:
        from cuda.bindings import driver as drv

        total = self._rows + len(rows)
        if total > INT32_MAX:
            raise InputError(f"a gallery of {total} rows exceeds the explain kernel's int32 row count")
        if not len(rows):
            return
        needed = total * self._row_bytes
        with self._current():
            address, size = self._buffers.get("gallery", (0, 0))
            if size < needed:
                # Grow geometrically and keep what is there: appends of single entries stay amortised O(1).
                size = max(needed, 2 * size)
                new = int(cuda_check("cuMemAlloc", drv.cuMemAlloc(size)))
                try:
                    if self._rows:
                        cuda_check("cuMemcpyDtoDAsync", drv.cuMemcpyDtoDAsync(
                            drv.CUdeviceptr(new), drv.CUdeviceptr(address), self._rows * self._row_bytes,
                            self._stream))
                        self._sync()
                except BaseException:
                    drv.cuMemFree(drv.CUdeviceptr(new))
                    raise
                if address:
                    cuda_check("cuMemFree", drv.cuMemFree(drv.CUdeviceptr(address)))
                self._buffers["gallery"] = (new, size)
                address = new
            self._upload(address + self._rows * self._row_bytes, rows, progress)
            self._sync()
        self._rows = total

    # ------------------------------------------------------------------------------------------ explain

    def can_rank(self, weighted: bool, metric: str) -> bool:
        """False: FAISS ranks (the AOT kernels explain chosen ids only); see :class:`DeviceIndex`."""
        return False

    def search(self, q: np.ndarray, k: int, weights: np.ndarray | None) -> tuple[np.ndarray, Decomposition]:
        """Not supported (:meth:`can_rank` is False): the export's AOT kernels explain, they do not rank.

        Raises:
            NotImplementedError: Always.
        """
        raise NotImplementedError("the CUDA explainer does not rank; FAISS searches, then explain() explains")

    def explain(self, q: np.ndarray, ids: np.ndarray, weights: np.ndarray | None = None) -> Decomposition:
        """Decompose the distances of each query to its gallery ids.

        Args:
            q: Query embeddings ``[Q, M+1, C]`` (computed in float32).
            ids: Gallery ids ``[Q, K]`` (integers; repeats allowed).
            weights: Optional attribute weights ``[M]`` (non-negative, finite, not all zero) for ``scores``.

        Returns:
            The decomposition in float32: ``d`` ``[Q, K]``, ``d_k`` ``[Q, K, M]``, ``shares`` ``[Q, K, M]``,
            ``d_hat`` ``[Q, K]`` and ``scores`` ``[Q, K]`` (``d``, or ``Σ_k w_k d_k`` with weights).

        Raises:
            InputError: Wrong shapes or dtypes, non-finite queries, bad weights.
            UnknownIdError: An id outside the gallery.
            GalleryError: No gallery uploaded, or a distance to a gallery row is not finite.
            CudaError: A CUDA call failed.
        """
        m, c = self.num_attributes, self.channels
        if not isinstance(q, np.ndarray) or q.ndim != 3 or q.shape[1:] != (m + 1, c) or not len(q):
            got = list(q.shape) if isinstance(q, np.ndarray) else type(q).__name__
            raise InputError(f"queries must be an array [Q >= 1, {m + 1}, {c}], got {got}")
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or ids.shape[0] != len(q) or ids.shape[1] < 1:
            got = list(ids.shape) if isinstance(ids, np.ndarray) else type(ids).__name__
            raise InputError(f"ids must be an integer array [Q={len(q)}, K >= 1], got {got}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"ids must be integers, got {ids.dtype}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        bad_q = ~np.isfinite(q).all(axis=(1, 2))
        if bad_q.any():
            raise InputError(f"queries {np.flatnonzero(bad_q)[:5].tolist()} contain NaN or inf")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        w = check_weights(weights, m)
        kernel = self.kernels["explain" if w is None else "explain_weighted"]
        n_q, k = ids.shape
        with self._lock:
            self._check_open()
            n = self._rows
            if n == 0:
                raise GalleryError("the GPU gallery is empty: call set_gallery first")
            outside = (ids < 0) | (ids >= n)
            if outside.any():
                raise UnknownIdError(f"gallery id {int(ids[outside][0])} is not in the gallery (it holds {n} "
                                     f"entries, ids 0..{n - 1})")
            grid = kernel.grid({"Q": n_q, "K": k})
            out = {"d": np.empty((n_q, k), np.float32), "d_k": np.empty((n_q, k, m), np.float32),
                   "shares": np.empty((n_q, k, m), np.float32), "d_hat": np.empty((n_q, k), np.float32),
                   "scores": np.empty((n_q, k), np.float32)}
            errors = np.zeros(1, np.int32)
            with self._current():
                ptr = {"q_ptr": self._buffer("q", q.nbytes), "ids_ptr": self._buffer("ids", ids.nbytes),
                       "g_ptr": self._buffers["gallery"][0], "err_ptr": self._buffer("err", errors.nbytes)}
                for param, key in (("d_ptr", "d"), ("dk_ptr", "d_k"), ("sh_ptr", "shares"), ("dhat_ptr", "d_hat"),
                                   ("score_ptr", "scores")):
                    ptr[param] = self._buffer(key, out[key].nbytes)
                self._upload(ptr["q_ptr"], q)
                self._upload(ptr["ids_ptr"], ids)
                if w is not None:
                    ptr["w_ptr"] = self._buffer("w", w.nbytes)
                    self._upload(ptr["w_ptr"], w)
                self._launch(kernel, grid, ptr, {"K": k, "N": n, "stride_iq": k})
                for param, key in (("d_ptr", "d"), ("dk_ptr", "d_k"), ("sh_ptr", "shares"), ("dhat_ptr", "d_hat"),
                                   ("score_ptr", "scores")):
                    self._download(out[key], ptr[param])
                self._download(errors, ptr["err_ptr"])
                self._sync()
        if errors[0]:
            # Ids were checked and queries are finite: the culprit is a gallery row (NaN/inf) or an overflow.
            bad = ~(np.isfinite(out["d"]) & np.isfinite(out["d_k"]).all(-1) & np.isfinite(out["scores"]))
            raise GalleryError(f"distances to gallery ids {np.unique(ids[bad])[:5].tolist()} are not finite (NaN or "
                               "inf in the gallery rows, or float32 overflow)")
        return Decomposition(**out)

    def _launch(self, kernel: ExplainKernel, grid: int, pointers: Mapping[str, int], sizes: Mapping[str, int]) -> None:
        from cuda.bindings import driver as drv

        cuda_check("cuMemsetD32Async(err)", drv.cuMemsetD32Async(drv.CUdeviceptr(pointers["err_ptr"]), 0, 1,
                                                                 self._stream))
        params = kernel.arguments(pointers, sizes)
        cuda_check(f"cuLaunchKernel({kernel.name}, grid {grid}, block {kernel.threads}, shared "
                   f"{kernel.shared_bytes} B)",
                   drv.cuLaunchKernel(self._functions[kernel.name], grid, 1, 1, kernel.threads, 1, 1,
                                      kernel.shared_bytes, self._stream, params, 0))

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Free the device buffers, the stream and the modules and release the primary context (idempotent).

        Raises:
            CudaError: The first CUDA call that failed (every resource is still attempted).
        """
        from cuda.bindings import driver as drv

        with self._lock:
            failures: list[CudaError] = []

            def attempt(call: str, result: Any) -> None:
                try:
                    cuda_check(call, result)
                except CudaError as e:
                    failures.append(e)

            if self._ctx is not None:
                pushed = drv.cuCtxPushCurrent(self._ctx)
                attempt("cuCtxPushCurrent", pushed)
                for address, _ in self._buffers.values():
                    attempt("cuMemFree", drv.cuMemFree(drv.CUdeviceptr(address)))
                if self._stream is not None:
                    attempt("cuStreamDestroy", drv.cuStreamDestroy(self._stream))
                for module in self._modules:
                    attempt("cuModuleUnload", drv.cuModuleUnload(module))
                if int(pushed[0]) == 0:
                    attempt("cuCtxPopCurrent", drv.cuCtxPopCurrent())
                attempt("cuDevicePrimaryCtxRelease", drv.cuDevicePrimaryCtxRelease(self._dev))
            self._buffers, self._modules, self._functions = {}, [], {}
            self._stream = self._ctx = None
            self._rows = 0
            if failures:
                raise failures[0]

    def __enter__(self) -> CudaExplainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
