"""TensorRT backend and the cuda-python launcher of the AOT explain kernels (runtime/tensorrt_backend.py,
runtime/cuda_kernels.py, runtime/explain_kernels.py).

The CPU machines have neither a GPU nor TensorRT, so:

* every TensorRT name the backend uses is checked against ``tensorrt-stubs`` (with the scanner of
  tests/export/test_tensorrt_api.py), and every cuda-python name both modules use against the installed
  ``cuda.bindings``;
* both modules run against an in-process stand-in of the CUDA driver and runtime (device memory as byte arrays at
  fake addresses, pinned host memory real, the explain kernel replaced by numpy reading and writing that memory
  through the launch's parameters) and of TensorRT, which checks parameter packing, launch geometry, buffer sizes,
  copies, batch splitting and clean-up;
* the real thing (parity with ONNX Runtime and with the numpy twin) runs only where TensorRT / a CUDA driver is.
"""

import ast
import ctypes
import importlib.metadata
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from api_names import Stubs, attribute_chains, load_stubs, name_problems, tensorrt_chains

from attrimeter.artefact.device import cuda_device, tensorrt_available
from attrimeter.artefact.kernels import KernelIndex, KernelIndexEntry
from attrimeter.runtime import cuda_kernels as ck
from attrimeter.runtime import explain_kernels as ek
from attrimeter.runtime import tensorrt_backend as tb
from attrimeter.runtime.backends import BackendError
from attrimeter.runtime.decompose import Decomposition, explain_rows
from attrimeter.runtime.errors import GalleryError, InputError, UnknownIdError

try:
    from cuda.bindings import driver as drv
    from cuda.bindings import runtime as cudart
except ImportError:
    drv = cudart = None
needs_cuda_python = pytest.mark.skipif(drv is None, reason="cuda-python is not installed (pip install "
                                       "'cuda-python==12.9.10'): the launcher's calls are checked against it")


@pytest.fixture(scope="module")
def stubs() -> Stubs:
    return load_stubs()


BACKEND = Path(tb.__file__)
LAUNCHER = Path(ck.__file__)
KERNEL_ARGUMENTS = Path(ek.__file__)  # packs cuLaunchKernel's parameters
# Variables of runtime/tensorrt_backend.py whose TensorRT class is known: every attribute read on them is checked.
TYPED_NAMES = {"runtime": "Runtime", "engine": "ICudaEngine", "context": "IExecutionContext"}


# --------------------------------------------------------------------------------------------------- static checks


def _typed_problems(stubs: Stubs, source: str) -> list[str]:
    return name_problems(stubs, source, TYPED_NAMES)


def test_every_tensorrt_name_exists_in_the_stubs(stubs):
    source = BACKEND.read_text()
    chains = {".".join([root, *chain]) for root, chain, _ in tensorrt_chains(ast.parse(source))}
    assert {"tensorrt.Runtime", "tensorrt.TensorIOMode.INPUT", "tensorrt.nptype"} <= chains, sorted(chains)
    assert _typed_problems(stubs, source) == [], f"names missing from tensorrt-stubs {stubs.version}"
    used = {(node.value.id, node.attr) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in TYPED_NAMES}
    # The calls the backend is built on are among the checked ones, or the check above proves nothing.
    assert {("runtime", "deserialize_cuda_engine"), ("engine", "num_io_tensors"), ("engine", "get_tensor_name"),
            ("engine", "get_tensor_mode"), ("engine", "get_tensor_dtype"), ("engine", "get_tensor_profile_shape"),
            ("engine", "create_execution_context"), ("context", "set_input_shape"), ("context", "get_tensor_shape"),
            ("context", "set_tensor_address"), ("context", "execute_async_v3")} <= used, sorted(used)


def test_a_misspelt_tensorrt_member_is_caught(stubs):
    source = "import tensorrt as trt\nruntime = trt.Runtime(None)\nengine = runtime.deserialise_cuda_engine(b'')\n" \
             "context = engine.create_execution_context()\ncontext.execute_async_v4(0)\nmode = trt.TensorIOMode.IN\n"
    assert sorted(p.split(": ", 1)[1] for p in _typed_problems(stubs, source)) == [
        "IExecutionContext.execute_async_v4 (context.execute_async_v4)",
        "Runtime.deserialise_cuda_engine (runtime.deserialise_cuda_engine)", "tensorrt.TensorIOMode.IN"]


def _cuda_chains(source: str) -> list[tuple[str, list[str], int]]:
    """Attribute chains rooted at a name bound to cuda.bindings.driver / cuda.bindings.runtime."""
    tree = ast.parse(source)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "cuda.bindings":
            aliases.update({a.asname or a.name: f"cuda.bindings.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.name.startswith("cuda.bindings.") and a.asname})
    return attribute_chains(tree, aliases)


def _cuda_problems(source: str) -> list[str]:
    modules = {"cuda.bindings.driver": drv, "cuda.bindings.runtime": cudart}
    problems = []
    for root, chain, line in _cuda_chains(source):
        obj = modules[root]
        for depth, part in enumerate(chain):
            if not hasattr(obj, part):
                problems.append(f"line {line}: {'.'.join([root, *chain[:depth + 1]])}")
                break
            obj = getattr(obj, part)
            if not isinstance(obj, type):  # a function or an enum member: what follows is the value's own API
                break
    return problems


@needs_cuda_python
def test_every_cuda_python_name_exists():
    version = importlib.metadata.version("cuda-bindings")
    used = set()
    for path in (BACKEND, LAUNCHER, KERNEL_ARGUMENTS):
        source = path.read_text()
        assert _cuda_problems(source) == [], f"{path.name}: names missing from cuda-bindings {version}"
        used |= {chain[0] for _, chain, _ in _cuda_chains(source)}
    assert {"cudaMalloc", "cudaMallocHost", "cudaMemcpyAsync", "cudaStreamCreateWithFlags", "cudaStreamSynchronize",
            "cudaFree", "cudaFreeHost", "cuModuleLoadData", "cuModuleGetFunction", "cuFuncSetAttribute",
            "cuLaunchKernel", "CUdevice_attribute", "CUfunction_attribute"} <= used, sorted(used)


@needs_cuda_python
def test_a_misspelt_cuda_name_is_caught():
    source = ("from cuda.bindings import driver as drv\nimport cuda.bindings.runtime as rt\n"
              "drv.cuLaunchKernal(0)\nrt.cudaMallocHost(8)\ndrv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC\n")
    assert sorted(p.split(": ", 1)[1] for p in _cuda_problems(source)) == [
        "cuda.bindings.driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC",
        "cuda.bindings.driver.cuLaunchKernal"]


# --------------------------------------------------------------------------------------------------- fake CUDA

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


@pytest.fixture
def fake_cuda(monkeypatch):
    if drv is None:
        pytest.skip("cuda-python is not installed (pip install 'cuda-python==12.9.10'): the fakes stand in for its "
                    "functions")
    fake = FakeCuda()
    for module in (drv, cudart):
        for name in dir(FakeCuda):
            if name.startswith(("cu", "cuda")) and callable(getattr(FakeCuda, name)):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, getattr(fake, name))  # raising: the real API has the name
    return fake


# --------------------------------------------------------------------------------------------------- launcher (CPU)

C, M = 24, 5


@pytest.fixture(scope="module")
def aot_export(tmp_path_factory):
    """An export folder with the explain kernels cross-compiled for sm_80 (the launcher needs nothing else)."""
    pytest.importorskip("triton", reason="the AOT kernels are compiled with Triton")
    from attrimeter.export import aot

    out = tmp_path_factory.mktemp("aot_export")
    aot.compile_kernels(out / "kernels", aot.kernel_specs(C, 8, M, 3.0, 1e-6, "float32")[1:], ("sm_80",))
    return out


@pytest.fixture
def explainer(aot_export, fake_cuda):
    out = aot_export
    fake_cuda.shape = (M, C)
    for name in ek.EXPLAIN_KERNELS:
        meta = ek.load_explain_kernel(out / "kernels" / "sm_80" / f"{name}.json")
        fake_cuda.module_params[meta.cubin] = [p for p, _ in meta.params]
    explainer = ck.CudaExplainer(out / "kernels" / "index.json", C, M)
    yield explainer
    explainer.close()


def _gallery(rng, n: int) -> np.ndarray:
    return rng.normal(size=(n, M + 1, C)).astype(np.float16)


def test_launch_geometry_and_parameters(explainer, fake_cuda, aot_export, rng):
    out = aot_export
    assert explainer.target == "sm_80"  # an sm_86 device runs the sm_80 cubins
    assert sorted(fake_cuda.modules.values()) == sorted(
        (out / "kernels" / "sm_80" / f"{name}.cubin").read_bytes() for name in ek.EXPLAIN_KERNELS)
    assert fake_cuda.attributes == []  # 32 B of shared memory: no opt-in
    gallery = _gallery(rng, 37)
    explainer.set_gallery(gallery)
    q = rng.normal(size=(3, M + 1, C)).astype(np.float32)
    ids = rng.integers(0, 37, size=(3, 4))
    result = explainer.explain(q, ids)

    launch = fake_cuda.launches[-1]
    meta = explainer.kernels["explain"]
    assert launch["grid"] == (12, 1, 1) and launch["block"] == (meta.threads, 1, 1) == (128, 1, 1)
    assert launch["shared"] == meta.shared_bytes and launch["stream"] == 0x5
    names = [name for name, _, _ in launch["params"]]
    assert names == ["q_ptr", "g_ptr", "ids_ptr", "d_ptr", "dk_ptr", "sh_ptr", "dhat_ptr", "score_ptr", "err_ptr",
                     "K", "N", "stride_iq", "global_scratch", "profile_scratch"]
    pointers = {}
    for name, value, ctype in launch["params"]:
        if name in ("K", "N", "stride_iq"):
            assert ctype is ctypes.c_int32 and isinstance(value, ctypes.c_int32)
        else:
            assert ctype is None and isinstance(value, drv.CUdeviceptr)
            pointers[name] = int(value)
    assert {n: v.value for n, v, _ in launch["params"] if n in ("K", "N", "stride_iq")} == \
        {"K": 4, "N": 37, "stride_iq": 4}
    assert pointers["global_scratch"] == pointers["profile_scratch"] == 0
    assert pointers["g_ptr"] == explainer._buffers["gallery"][0]
    assert all(p % 16 == 0 for p in pointers.values())  # the kernels were compiled for 16-byte aligned buffers
    assert len({p for n, p in pointers.items() if "scratch" not in n}) == 9  # distinct buffers

    ref = explain_rows(q, gallery[ids])
    assert isinstance(result, Decomposition)  # the device-index protocol's one result type
    for key in Decomposition._fields:
        assert getattr(result, key).dtype == np.float32
        np.testing.assert_allclose(getattr(result, key), getattr(ref, key), rtol=1e-5, atol=1e-6, err_msg=key)
    assert not explainer.can_rank(False, "l2") and not explainer.can_rank(True, "l2")  # FAISS ranks
    with pytest.raises(NotImplementedError, match="does not rank"):
        explainer.search(q, 4, None)
    assert fake_cuda.ctx_depth == 0  # every push popped


def test_weighted_explain_passes_the_weights(explainer, fake_cuda, rng):
    gallery = _gallery(rng, 20)
    explainer.set_gallery(gallery)
    q = rng.normal(size=(2, M + 1, C)).astype(np.float32)
    ids = rng.integers(0, 20, size=(2, 6))
    weights = rng.uniform(0.0, 2.0, size=M)
    weights[0] = 0.0  # e.g. "ignore clothing colours"
    result = explainer.explain(q, ids, weights=weights)
    names = [name for name, _, _ in fake_cuda.launches[-1]["params"]]
    assert names[3] == "w_ptr" and len(names) == 15
    ref = explain_rows(q, gallery[ids], weights.astype(np.float32))
    np.testing.assert_allclose(result.scores, ref.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.d, ref.d, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="all zero"):
        explainer.explain(q, ids, weights=np.zeros(M))


def test_append_keeps_earlier_rows(explainer, rng):
    first, second = _gallery(rng, 3), _gallery(rng, 300)  # the second append outgrows the buffer: copied over
    explainer.set_gallery(first)
    explainer.append_gallery(second)
    assert len(explainer) == 303
    gallery = np.concatenate([first, second])
    q = rng.normal(size=(2, M + 1, C)).astype(np.float32)
    ids = np.array([[0, 2, 3, 302], [1, 150, 0, 0]])
    np.testing.assert_allclose(explainer.explain(q, ids).d_k, explain_rows(q, gallery[ids]).d_k, rtol=1e-5)
    explainer.set_gallery(second[:5])  # replaces
    assert len(explainer) == 5


def test_bad_requests_are_refused_before_any_launch(explainer, fake_cuda, rng):
    q = rng.normal(size=(1, M + 1, C)).astype(np.float32)
    with pytest.raises(GalleryError, match="empty"):
        explainer.explain(q, np.zeros((1, 1), np.int64))
    explainer.set_gallery(_gallery(rng, 10))
    with pytest.raises(UnknownIdError, match="gallery id 10 .* holds 10 entries"):
        explainer.explain(q, np.array([[3, 10]]))
    with pytest.raises(UnknownIdError, match="gallery id -1"):
        explainer.explain(q, np.array([[-1]]))
    with pytest.raises(InputError, match="queries"):
        explainer.explain(q[:, :M], np.array([[0]]))
    bad = q.copy()
    bad[0, 2, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        explainer.explain(bad, np.array([[0]]))
    with pytest.raises(InputError, match="ids"):
        explainer.explain(q, np.array([[0.5]]))
    with pytest.raises(InputError, match="gallery rows"):
        explainer.append_gallery(np.zeros((2, M, C), np.float16))
    assert fake_cuda.launches == []


def test_non_finite_gallery_row_is_named_and_the_counter_resets(explainer, rng):
    gallery = _gallery(rng, 8)
    gallery[5, 3, 1] = np.inf
    explainer.set_gallery(gallery)
    q = rng.normal(size=(1, M + 1, C)).astype(np.float32)
    with pytest.raises(GalleryError, match=r"gallery ids \[5\]"):
        explainer.explain(q, np.array([[1, 5, 2]]))
    # The error counter is zeroed before every launch: a clean request afterwards passes.
    result = explainer.explain(q, np.array([[1, 2]]))
    np.testing.assert_allclose(result.d, explain_rows(q, gallery[[[1, 2]]]).d, rtol=1e-5)


def test_close_releases_everything_once(explainer, fake_cuda, rng):
    explainer.set_gallery(_gallery(rng, 4))
    explainer.explain(rng.normal(size=(1, M + 1, C)).astype(np.float32), np.array([[0, 1]]))
    assert fake_cuda.device and fake_cuda.modules and fake_cuda.retained == 1
    explainer.close()
    assert fake_cuda.device == {} and fake_cuda.modules == {} and fake_cuda.streams == set()
    assert fake_cuda.retained == 0 and fake_cuda.ctx_depth == 0
    explainer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        explainer.set_gallery(_gallery(rng, 1))


def test_cuda_errors_name_the_call_and_leak_nothing(aot_export, fake_cuda):
    fake_cuda.fail["cuStreamCreate"] = drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY
    with pytest.raises(RuntimeError, match=r"cuStreamCreate failed: CUDA_ERROR_OUT_OF_MEMORY \(2\)"):
        ck.CudaExplainer(aot_export / "kernels" / "index.json", C, M)
    assert fake_cuda.modules == {} and fake_cuda.retained == 0 and fake_cuda.ctx_depth == 0


def test_large_shared_memory_is_opted_into(aot_export, fake_cuda, tmp_path):
    import json
    import shutil

    shutil.copytree(aot_export / "kernels", tmp_path / "kernels")
    path = tmp_path / "kernels" / "sm_80" / "explain.json"
    meta = json.loads(path.read_text())
    meta["shared_bytes"] = 64 * 1024
    path.write_text(json.dumps(meta))
    explainer = ck.CudaExplainer(tmp_path / "kernels" / "index.json", C, M)
    try:
        (function, attrib, value), = fake_cuda.attributes
        assert attrib == drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES and value == 65536
    finally:
        explainer.close()
    fake_cuda.optin = 48 * 1024 + 512  # e.g. a smaller GPU: the kernel cannot run there
    with pytest.raises(ValueError, match=r"needs 65536 \+ 0 B of shared memory per block, this device allows"):
        ck.CudaExplainer(tmp_path / "kernels" / "index.json", C, M)
    assert fake_cuda.modules == {} and fake_cuda.retained == 0


def test_kernels_for_other_shapes_are_refused(aot_export, fake_cuda):
    with pytest.raises(ValueError, match="compiled for .*'C': 24.*C=32"):
        ck.CudaExplainer(aot_export / "kernels" / "index.json", 32, M)
    with pytest.raises(ValueError, match=r"kernel index .*nowhere\.json is unreadable"):
        ck.CudaExplainer(aot_export / "kernels" / "nowhere.json", C, M)


def _index(**shared: int) -> KernelIndex:
    return KernelIndex({t: {k: KernelIndexEntry(f"{t}/{k}.json", "_explain_kernel", s, 128) for k in ek.EXPLAIN_KERNELS}
                        for t, s in shared.items()})


def test_target_choice_follows_the_c_launcher():
    index = _index(sm_80=32, sm_86=32, sm_90=32)
    assert ek.choose_target(index, 90, 232448) == "sm_90"
    assert ek.choose_target(index, 86, 101376) == "sm_86"
    assert ek.choose_target(index, 89, 101376) == "sm_86"  # the highest lower minor of the same major
    assert ek.choose_target(_index(sm_80=120_000, sm_86=32), 87, 166912) == "sm_86"
    with pytest.raises(ValueError, match=r"sm_80 \(needs 120000 B shared memory.*--targets sm_86"):
        ek.choose_target(_index(sm_80=120_000), 86, 101376)
    with pytest.raises(ValueError, match="arch-specific sm_90a"):
        ek.choose_target(_index(sm_90=32), 91, 232448)  # hypothetical 9.1: sm_90a cubins run on 9.0 only
    with pytest.raises(ValueError, match="compiled for: sm_80, sm_86, sm_90.*--targets sm_75"):
        ek.choose_target(index, 75, 65536)
    incomplete = KernelIndex({"sm_80": {"explain": KernelIndexEntry("x", "_explain_kernel", 32, 128)}})
    with pytest.raises(ValueError, match="compiled for: none"):
        ek.choose_target(incomplete, 80, 166912)


# --------------------------------------------------------------------------------------------------- backend (CPU)

H, W, CH, MH, MW, PROFILE_MAX = 8, 4, 6, 4, 2, 4


def fake_model(images: np.ndarray) -> dict[str, np.ndarray]:
    """What the fake engine computes: simple functions of each image, so that rows cannot be mixed up unseen."""
    mean = images.mean(axis=(1, 2, 3))
    channel = images.mean(axis=(2, 3))  # [B, 3]
    return {
        "embedding": mean[:, None] * np.arange(1, CH + 1, dtype=np.float32),
        "attr_embeddings": channel[:, np.arange(M) % 3, None] + np.arange(CH, dtype=np.float32),
        "aam": images[:, np.arange(M) % 3, ::H // MH, ::W // MW],
        "attr_logits": images.std(axis=(1, 2, 3))[:, None] - np.arange(M, dtype=np.float32),
    }


def _fake_tensorrt(cuda: FakeCuda, record: dict) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0"
    trt.float32 = "DataType.FLOAT"
    trt.nptype = lambda dtype: {"DataType.FLOAT": np.float32}[dtype]
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            pass

    shapes = {"images": (3, H, W), "embedding": (CH,), "attr_embeddings": (M, CH), "aam": (M, MH, MW),
              "attr_logits": (M,)}

    class Context:
        def __init__(self):
            self.batch = -1
            self.addresses = {}

        def set_input_shape(self, name, shape):
            assert name == "images" and tuple(shape[1:]) == shapes["images"]
            record["shapes"].append(shape[0])
            if not 1 <= shape[0] <= PROFILE_MAX:
                return False
            self.batch = shape[0]
            return True

        def get_tensor_shape(self, name):
            return (self.batch, *shapes[name])

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream):
            assert stream == 0x77
            record["executions"] += 1
            images = cuda.array(self.addresses["images"], np.float32, (self.batch, *shapes["images"]))
            for name, value in fake_model(images).items():
                cuda.write(self.addresses[name], value.astype(np.float32).tobytes())
            return True

    class Engine:
        num_io_tensors = len(shapes)

        def get_tensor_name(self, i):
            return list(shapes)[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "images" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.float32

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 3, H, W), (2, 3, H, W), (PROFILE_MAX, 3, H, W)]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            if data != b"engine":
                self.logger.log(ILogger.Severity.ERROR, "Serialization assertion failed: magic tag mismatch")
                return None
            return Engine()

    trt.ILogger, trt.Runtime = ILogger, Runtime
    return trt


@pytest.fixture
def trt_export(tmp_path, fake_cuda, monkeypatch):
    record = {"shapes": [], "executions": 0}
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(fake_cuda, record))
    monkeypatch.setattr(tb, "tensorrt_available", lambda: None)
    (tmp_path / "model.engine").write_bytes(b"engine")
    return tmp_path / "model.engine", record


def test_backend_splits_batches_and_routes_rows(trt_export, fake_cuda, rng):
    engine, record = trt_export
    backend = tb.TensorRTBackend(engine, (H, W), 16)
    try:
        assert (backend.name, backend.device, backend.max_batch) == ("tensorrt", "cuda:0", PROFILE_MAX)
        # Buffers come once, for the largest batch: one device and one pinned buffer per I/O tensor.
        assert len(fake_cuda.device) == len(fake_cuda.pinned) == 5
        sizes = [4 * math.prod(shape) for shape in ((3, H, W), (CH,), (M, CH), (M, MH, MW), (M,))]
        assert sorted(len(b) for b in fake_cuda.device.values()) == sorted(PROFILE_MAX * s for s in sizes)
        allocations = len(fake_cuda.device)
        for batch in (1, 10, 3):  # 10 > max_batch: 4 + 4 + 2
            images = rng.random((batch, 3, H, W), dtype=np.float32)
            record["shapes"].clear()
            out = backend.run(images)
            assert record["shapes"] == [min(PROFILE_MAX, batch - s) for s in range(0, batch, PROFILE_MAX)]
            expected = fake_model(images)
            assert list(out) == list(expected)
            for name, value in expected.items():
                assert out[name].dtype == np.float32 and out[name].shape == value.shape
                np.testing.assert_allclose(out[name], value, rtol=1e-6, err_msg=name)
        assert len(fake_cuda.device) == allocations  # nothing allocated per call
        with pytest.raises(InputError, match=r"\[B >= 1, 3, 8, 4\]"):
            backend.run(np.zeros((2, 3, W, H), np.float32))
        with pytest.raises(InputError, match="float32"):
            backend.run(np.zeros((2, 3, H, W), np.uint8))
    finally:
        backend.close()
    assert fake_cuda.device == {} and fake_cuda.pinned == {} and fake_cuda.streams == set()
    backend.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        backend.run(np.zeros((1, 3, H, W), np.float32))


def test_backend_reports_a_bad_engine(trt_export, fake_cuda):
    engine, _ = trt_export
    engine.write_bytes(b"not an engine")
    with pytest.raises(BackendError, match="(?s)cannot deserialize.*magic tag mismatch"):
        tb.TensorRTBackend(engine, (H, W), 16)
    with pytest.raises(BackendError, match="absent.engine is missing"):
        tb.TensorRTBackend(engine.with_name("absent.engine"), (H, W), 16)
    engine.write_bytes(b"engine")
    with pytest.raises(BackendError, match=r"takes images \[3, 8, 4\], the manifest says \[3, 4, 8\]"):
        tb.TensorRTBackend(engine, (W, H), 16)


def test_backend_cuda_failure_names_the_call_and_frees_the_rest(trt_export, fake_cuda):
    engine, _ = trt_export
    fake_cuda.fail["cudaMalloc"] = cudart.cudaError_t.cudaErrorMemoryAllocation
    with pytest.raises(RuntimeError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        tb.TensorRTBackend(engine, (H, W), 16)
    assert fake_cuda.device == {} and fake_cuda.pinned == {} and fake_cuda.streams == set()


# --------------------------------------------------------------------------------------------------- GPU machine


@pytest.fixture(scope="session")  # session scope: decided before the session fixtures that train a model
def real_tensorrt():
    missing = tensorrt_available()
    if missing is not None:
        pytest.skip(missing)
    missing = ck.cuda_available()
    if missing is not None:
        pytest.skip(missing)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-12))


@pytest.mark.parametrize("flavor", ["portable", "plugin"])
def test_backend_matches_onnxruntime(real_tensorrt, tiny_interpreter, tiny_export, tmp_path, flavor, rng):
    import onnxruntime as ort

    from attrimeter.artefact.manifest import load_manifest
    from attrimeter.export.build import ENGINE_FP32_TOLERANCE, export

    out = tmp_path / flavor
    export(tiny_interpreter, out, output_format="tensorrt", flavor=flavor, targets=(), max_batch=4, opt_batch=2,
           progress=False)
    manifest = load_manifest(out)
    session = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    assert manifest.tensorrt is not None
    backend = tb.TensorRTBackend(out / manifest.tensorrt.engine, manifest.image_size, manifest.tensorrt.max_batch)
    try:
        assert backend.max_batch == 4
        for batch in (1, 9):  # 9: split into 4 + 4 + 1
            images = rng.random((batch, 3, *manifest.image_size), dtype=np.float32)
            got = backend.run(images)
            want = dict(zip(("embedding", "attr_embeddings", "aam", "attr_logits"),
                            session.run(["embedding", "attr_embeddings", "aam", "attr_logits"], {"images": images}),
                            strict=True))
            for name, value in want.items():
                assert got[name].shape == value.shape
                assert _relative(got[name], value) <= ENGINE_FP32_TOLERANCE, name
    finally:
        backend.close()


def test_explainer_matches_numpy(tmp_path, rng):
    missing = ck.cuda_available()
    if missing is not None:
        pytest.skip(missing)
    pytest.importorskip("triton", reason="the AOT kernels are compiled with Triton")
    from attrimeter.export import aot

    device = cuda_device()
    assert device is not None
    target = f"sm_{device.cc}"
    if target not in aot.TARGETS:
        pytest.skip(f"no AOT target is defined for this {target} GPU")
    aot.compile_kernels(tmp_path / "kernels", aot.kernel_specs(C, 8, M, 3.0, 1e-6, "float32")[1:], (target,))
    with ck.CudaExplainer(tmp_path / "kernels" / "index.json", C, M) as explainer:
        gallery = _gallery(rng, 1000)
        gallery[7] = gallery[3]  # a zero distance: shares fall back to 1/M
        explainer.set_gallery(gallery[:600])
        explainer.append_gallery(gallery[600:])
        q = rng.normal(size=(5, M + 1, C)).astype(np.float32)
        q[0] = gallery[3]
        ids = rng.integers(0, 1000, size=(5, 10))
        ids[0, :2] = [3, 7]
        weights = rng.uniform(0.0, 1.0, size=M).astype(np.float32)
        for w in (None, weights):
            got = explainer.explain(q, ids, weights=w)
            ref = explain_rows(q, gallery[ids], w)
            for key in Decomposition._fields:
                np.testing.assert_allclose(getattr(got, key), getattr(ref, key), rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(got.shares[0, :2], 1.0 / M)
        with pytest.raises(UnknownIdError):
            explainer.explain(q, np.full((5, 1), 1000))
