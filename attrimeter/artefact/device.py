"""What this machine can run an export's GPU artefacts with: the CUDA device, TensorRT, and TensorRT's logger.

Shared by the export (engine builds, ``export/tensorrt_engine.py``) and the runtime (the TensorRT backend and the
AOT kernel launcher) so that neither reaches into the other (docs/architecture.md §5, §6). Nothing here needs a GPU
to import: the driver is probed with ctypes, TensorRT is imported inside the functions only. TensorRT names used here
are checked against the real API stubs by ``tests/export/test_tensorrt_api.py``.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["CudaDevice", "cuda_device", "tensorrt_available", "tensorrt_logger"]

_LOG = logging.getLogger("attrimeter.tensorrt")

_INSTALL_HINT = (
    "pip install 'attrimeter[trt]' on a machine with an NVIDIA GPU and driver; the TensorRT wheels come from "
    "NVIDIA's package index"
)


@dataclass(frozen=True)
class CudaDevice:
    """A CUDA device as the driver describes it (see :func:`cuda_device`).

    Attributes:
        name: E.g. ``"NVIDIA H100 80GB HBM3"``.
        cc: Compute capability as an int (90 for sm_90).
        max_shared_optin: Opt-in shared memory per block, bytes.
        driver_version: ``cuDriverGetVersion``, e.g. 12040.
    """

    name: str
    cc: int
    max_shared_optin: int
    driver_version: int


def cuda_device(index: int = 0) -> CudaDevice | None:
    """The CUDA device ``index``, read from the driver with ctypes (no torch or cuda-python needed).

    Args:
        index: Device ordinal.

    Returns:
        Its name, compute capability, opt-in shared memory per block and the driver's CUDA version, or None without
        a driver or such a device.
    """
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None or lib.cuInit(0) != 0:
        return None
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        return None
    device = ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    raw_name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(raw_name, 256, device)

    def attribute(code: int) -> int:
        value = ctypes.c_int(0)
        lib.cuDeviceGetAttribute(ctypes.byref(value), code, device)
        return value.value

    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR = 75/76, MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97 (cuda.h).
    driver = ctypes.c_int(0)
    lib.cuDriverGetVersion(ctypes.byref(driver))
    return CudaDevice(raw_name.value.decode(errors="replace"), 10 * attribute(75) + attribute(76), attribute(97),
                      driver.value)


def tensorrt_available() -> str | None:
    """Whether TensorRT engines can be built and run here.

    Returns:
        None when ``import tensorrt`` gives the real TensorRT and a CUDA GPU is visible; else one sentence naming
        what is missing.
    """
    try:
        import tensorrt as trt
    except ModuleNotFoundError:
        return f"TensorRT is not installed ({_INSTALL_HINT})."
    except (ImportError, OSError) as exc:  # e.g. the Python bindings without their libnvinfer
        return f"TensorRT is installed but cannot be loaded: {exc}."
    # The tensorrt-stubs package installs a bare `tensorrt/` folder of .pyi files, which imports as an empty namespace
    # package: `import tensorrt` then "works" without TensorRT.
    if not hasattr(trt, "Builder"):
        return (f"TensorRT is not installed: `import tensorrt` found only type stubs (tensorrt-stubs) at "
                f"{list(getattr(trt, '__path__', []))} ({_INSTALL_HINT}).")
    if cuda_device() is None:
        return f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible; TensorRT builds engines on a GPU."
    return None


def tensorrt_logger() -> Any:
    """A ``tensorrt.ILogger`` that forwards TensorRT's messages to :mod:`logging` and keeps its errors.

    Returns:
        The logger; its ``errors`` list holds every error message, for the exception that reports a failed call.
    """
    import tensorrt as trt

    class _Logger(trt.ILogger):
        """Forwards TensorRT messages to :mod:`logging` and keeps the errors for the exception message."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                _LOG.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                _LOG.warning("TensorRT: %s", msg)
            else:
                _LOG.debug("TensorRT: %s", msg)

    return _Logger()
