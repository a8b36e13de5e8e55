"""An in-process stand-in of the CUDA driver and runtime calls of runtime/tensorrt_backend.py and
runtime/cuda_kernels.py, for the CPU machines (no GPU, no driver): shared by tests/runtime/test_tensorrt_backend.py and
tests/runtime/test_cuda_kernels.py through the ``fake_cuda`` fixture of tests/runtime/conftest.py."""

import ctypes
import math

import numpy as np

try:
    from cuda.bindings import driver as drv
    from cuda.bindings import runtime as cudart
except ImportError:
    drv = cudart = None


class FakeCuda:
    """The CUDA driver and runtime calls of both modules, in process: device memory is a byte array per allocation
    at a fake address, pinned host memory is real (the backend views it with numpy), and the explain kernel is numpy
    reading and writing that memory through the launch's parameters."""

    def __init__(self, cc: tuple[int, int] = (8, 6), optin: int = 101376) -> None:
        self.cc, self.optin = cc, optin
        self.device: dict[int, bytearray] = {}
        self.pinned: dict[int, ctypes.Array] = {}
        self.next_address = 0x7F00_0000_0000
        self.modules: dict[int, bytes] = {}
        self.module_params: dict[bytes, list[str]] = {}  # cubin -> the kernel's parameter names (set by the test)
        self.functions: dict[int, int] = {}  # function handle -> module handle
        self.attributes: list[tuple[int, object, int]] = []
        self.launches: list[dict] = []
        self.ctx_depth = 0
        self.retained = 0
        self.streams: set[int] = set()
        self.fail: dict[str, object] = {}  # call name -> error to return
        self.shape: tuple[int, int] = (0, 0)  # (M, C) for the kernel emulation

    # memory
    def _alloc(self, size: int) -> int:
        address = self.next_address
        self.next_address += (size + 0xFFFF) // 0x10000 * 0x10000 + 0x10000  # 64 KiB apart: overruns do not alias
        self.device[address] = bytearray(size)
        return address

    def _locate(self, address: int, nbytes: int) -> tuple[bytearray, int]:
        for base, buf in self.device.items():
            if base <= address and address + nbytes <= base + len(buf):
                return buf, address - base
        raise AssertionError(f"access of {nbytes} B at {address:#x} is outside every device allocation")

    def read(self, address: int, nbytes: int) -> bytes:
        buf, offset = self._locate(int(address), nbytes)
        return bytes(buf[offset:offset + nbytes])

    def write(self, address: int, data: bytes) -> None:
        buf, offset = self._locate(int(address), len(data))
        buf[offset:offset + len(data)] = data

    def array(self, address: int, dtype, shape) -> np.ndarray:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        return np.frombuffer(self.read(address, n), dtype=dtype).reshape(shape)

    # driver API
    def _drv(self, name: str, *values):
        return (self.fail.get(name, drv.CUresult.CUDA_SUCCESS), *values)

    def cuInit(self, flags):
        return self._drv("cuInit")

    def cuDeviceGet(self, ordinal):
        return self._drv("cuDeviceGet", drv.CUdevice(ordinal))

    def cuDeviceGetAttribute(self, attrib, dev):
        a = drv.CUdevice_attribute
        value = {a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: self.cc[0],
                 a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: self.cc[1],
                 a.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: self.optin}[attrib]
        return self._drv("cuDeviceGetAttribute", value)

    def cuDevicePrimaryCtxRetain(self, dev):
        self.retained += 1
        return self._drv("cuDevicePrimaryCtxRetain", drv.CUcontext(0xC0))

    def cuDevicePrimaryCtxRelease(self, dev):
        self.retained -= 1
        return self._drv("cuDevicePrimaryCtxRelease")

    def cuCtxPushCurrent(self, ctx):
        assert int(ctx) == 0xC0
        self.ctx_depth += 1
        return self._drv("cuCtxPushCurrent")

    def cuCtxPopCurrent(self):
        self.ctx_depth -= 1
        return self._drv("cuCtxPopCurrent", drv.CUcontext(0xC0))

    def _need_context(self) -> None:
        assert self.ctx_depth > 0, "a driver call without a current context"

    def cuModuleLoadData(self, image):
        self._need_context()
        handle = 0x100 + len(self.modules)
        self.modules[handle] = bytes(image)
        return self._drv("cuModuleLoadData", drv.CUmodule(handle))

    def cuModuleUnload(self, module):
        del self.modules[int(module)]
        return self._drv("cuModuleUnload")

    def cuModuleGetFunction(self, module, name):
        assert name == b"_explain_kernel"
        handle = 0x200 + len(self.functions)
        self.functions[handle] = int(module)
        return self._drv("cuModuleGetFunction", drv.CUfunction(handle))

    def cuFuncGetAttribute(self, attrib, function):
        a = drv.CUfunction_attribute
        value = {a.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: 1024, a.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: 0}[attrib]
        return self._drv("cuFuncGetAttribute", value)

    def cuFuncSetAttribute(self, function, attrib, value):
        self.attributes.append((int(function), attrib, value))
        return self._drv("cuFuncSetAttribute")

    def cuStreamCreate(self, flags):
        self._need_context()
        self.streams.add(0x5)
        return self._drv("cuStreamCreate", drv.CUstream(0x5))

    def cuStreamDestroy(self, stream):
        self.streams.remove(int(stream))
        return self._drv("cuStreamDestroy")

    def cuStreamSynchronize(self, stream):
        assert int(stream) in self.streams
        return self._drv("cuStreamSynchronize")

    def cuMemAlloc(self, size):
        self._need_context()
        if "cuMemAlloc" in self.fail:
            return self._drv("cuMemAlloc", drv.CUdeviceptr(0))
        return self._drv("cuMemAlloc", drv.CUdeviceptr(self._alloc(size)))

    def cuMemFree(self, pointer):
        assert int(pointer) in self.device, f"cuMemFree of {int(pointer):#x}, which is not allocated"
        del self.device[int(pointer)]
        return self._drv("cuMemFree")

    def cuMemcpyHtoDAsync(self, dst, src, nbytes, stream):
        self.write(int(dst), ctypes.string_at(src, nbytes))
        return self._drv("cuMemcpyHtoDAsync")

    def cuMemcpyDtoHAsync(self, dst, src, nbytes, stream):
        ctypes.memmove(dst, self.read(int(src), nbytes), nbytes)
        return self._drv("cuMemcpyDtoHAsync")

    def cuMemcpyDtoDAsync(self, dst, src, nbytes, stream):
        self.write(int(dst), self.read(int(src), nbytes))
        return self._drv("cuMemcpyDtoDAsync")

    def cuMemsetD32Async(self, dst, value, count, stream):
        self.write(int(dst), np.full(count, value, np.uint32).tobytes())
        return self._drv("cuMemsetD32Async")

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        self._need_context()
        values, ctypes_ = params
        names = self.module_params[self.modules[self.functions[int(f)]]]
        assert len(values) == len(ctypes_) == len(names)
        launch = {"grid": (gx, gy, gz), "block": (bx, by, bz), "shared": shared, "stream": int(stream),
                  "params": list(zip(names, values, ctypes_, strict=True))}
        self.launches.append(launch)
        self._explain({name: value for name, value, _ in launch["params"]}, gx)
        return self._drv("cuLaunchKernel")

    def _explain(self, args: dict, grid: int) -> None:
        """The explain kernel's contract in numpy, on the launch's pointers (the fake's "GPU")."""
        m, c = self.shape
        k, n = args["K"].value, args["N"].value
        assert args["stride_iq"].value == k and grid % k == 0
        q_rows = grid // k
        q = self.array(int(args["q_ptr"]), np.float32, (q_rows, m + 1, c))
        ids = self.array(int(args["ids_ptr"]), np.int64, (q_rows, k))
        g = self.array(int(args["g_ptr"]), np.float16, (n, m + 1, c)).astype(np.float32)
        valid = (ids >= 0) & (ids < n)
        dist = np.sqrt(((q[:, None] - g[np.where(valid, ids, 0)]) ** 2).sum(-1))  # [Q, K, M+1]
        d, d_k = dist[..., 0], dist[..., 1:]
        total = d_k.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = np.where(total[..., None] > 0, d_k / total[..., None], 1.0 / m)
        score = d if "w_ptr" not in args else d_k @ self.array(int(args["w_ptr"]), np.float32, (m,))
        bad = ~valid | ~np.isfinite(d) | ~np.isfinite(total) | ~np.isfinite(score)
        nan = np.float32(np.nan)
        for key, value in (("d_ptr", d), ("dk_ptr", d_k), ("sh_ptr", shares), ("dhat_ptr", total / m),
                           ("score_ptr", score)):
            mask = valid if value.ndim == 2 else valid[..., None]
            self.write(int(args[key]), np.where(mask, value, nan).astype(np.float32).tobytes())
        count = self.array(int(args["err_ptr"]), np.int32, (1,))
        self.write(int(args["err_ptr"]), (count + int(bad.sum())).astype(np.int32).tobytes())  # atomic_add

    # runtime API
    def _rt(self, name: str, *values):
        return (self.fail.get(name, cudart.cudaError_t.cudaSuccess), *values)

    def cudaSetDevice(self, device):
        return self._rt("cudaSetDevice")

    def cudaMalloc(self, size):
        if "cudaMalloc" in self.fail:
            return self._rt("cudaMalloc", 0)
        return self._rt("cudaMalloc", self._alloc(size))

    def cudaFree(self, pointer):
        del self.device[int(pointer)]
        return self._rt("cudaFree")

    def cudaMallocHost(self, size):
        buf = (ctypes.c_uint8 * size)()
        self.pinned[ctypes.addressof(buf)] = buf
        return self._rt("cudaMallocHost", ctypes.addressof(buf))

    def cudaFreeHost(self, pointer):
        del self.pinned[int(pointer)]
        return self._rt("cudaFreeHost")

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert int(stream) in self.streams
        if kind == cudart.cudaMemcpyKind.cudaMemcpyHostToDevice:
            assert int(src) in self.pinned, "host-to-device copies come from the pinned staging buffer"
            self.write(int(dst), ctypes.string_at(src, nbytes))
        else:
            assert kind == cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost and int(dst) in self.pinned
            ctypes.memmove(dst, self.read(int(src), nbytes), nbytes)
        return self._rt("cudaMemcpyAsync")

    def cudaStreamCreateWithFlags(self, flags):
        assert flags == cudart.cudaStreamNonBlocking
        self.streams.add(0x77)
        return self._rt("cudaStreamCreateWithFlags", cudart.cudaStream_t(0x77))

    def cudaStreamSynchronize(self, stream):
        assert int(stream) in self.streams
        return self._rt("cudaStreamSynchronize")

    def cudaStreamDestroy(self, stream):
        self.streams.remove(int(stream))
        return self._rt("cudaStreamDestroy")
