"""TensorRT backend (runtime/tensorrt_backend.py) and the cuda-python names it and the AOT kernel launcher use.

The CPU machines have neither a GPU nor TensorRT, so:

* every TensorRT name the backend uses is checked against ``tensorrt-stubs`` (with the scanner of
  tests/export/test_tensorrt_api.py), and every cuda-python name of runtime/tensorrt_backend.py,
  runtime/cuda_kernels.py and runtime/explain_kernels.py against the installed ``cuda.bindings``;
* the backend runs against an in-process stand-in of the CUDA driver and runtime (tests/cuda_fakes.py) and of
  TensorRT, which checks buffer sizes, copies, batch splitting and clean-up;
* the real thing (parity with ONNX Runtime) runs only where TensorRT / a CUDA driver is.

The launcher of the AOT explain kernels is tested in test_cuda_kernels.py.
"""

import ast
import importlib.metadata
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from api_names import Stubs, attribute_chains, load_stubs, name_problems, tensorrt_chains
from cuda_fakes import FakeCuda, cudart, drv

from attrimeter.artefact.device import tensorrt_available
from attrimeter.runtime import cuda_kernels as ck
from attrimeter.runtime import explain_kernels as ek
from attrimeter.runtime import tensorrt_backend as tb
from attrimeter.runtime.backends import BackendError
from attrimeter.runtime.errors import InputError

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


# --------------------------------------------------------------------------------------------------- backend (CPU)

H, W, CH, MH, MW, PROFILE_MAX = 8, 4, 6, 4, 2, 4
M = 5  # attributes of the fake engine



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
