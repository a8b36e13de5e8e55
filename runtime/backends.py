"""Inference backends behind one small interface (docs/architecture.md §6): ONNX Runtime, TensorRT, PyTorch.

Every backend takes float32 RGB in [0, 1] ``[B, 3, H, W]`` and returns the export's four outputs as float32 numpy
arrays by name. :func:`open_backend` picks one from the export folder and what is installed:

* ``tensorrt``: the export holds an engine, TensorRT and cuda-python import, and a CUDA device answers;
* ``onnxruntime`` (the default): a portable graph; the CUDA execution provider where installed, else the CPU;
* ``torch``: the source checkpoint (its sha256 checked against the manifest), eager or ``torch.compile``d, with the
  fused Triton pooling kernel on a GPU. For GPU boxes without TensorRT; torch is imported only here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from attrimeter.artefact.contract import INPUT_NAME, OUTPUT_NAMES
from attrimeter.artefact.device import tensorrt_available
from attrimeter.artefact.manifest import Manifest, sha256_file

__all__ = ["BACKENDS", "Backend", "BackendError", "OnnxRuntimeBackend", "TorchBackend", "open_backend"]

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


class BackendError(RuntimeError):
    """A backend cannot run this export here (missing package, device, engine or checkpoint); says which."""


class Backend(Protocol):
    """What the runtime needs from an inference engine. ``run`` is called from one thread only (the batcher's)."""

    name: str
    device: str
    max_batch: int

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run a batch: float32 ``[B, 3, H, W]`` in [0, 1] → the four outputs by name (float32, first axis B)."""
        ...

    def close(self) -> None:
        """Release the engine and its buffers (idempotent)."""
        ...


class OnnxRuntimeBackend:
    """A portable ONNX graph in ONNX Runtime.

    Args:
        export_dir: The export folder.
        manifest: Its manifest.
        device: ``"cpu"``, ``"cuda"`` / ``"cuda:N"`` (CUDA execution provider), or None for CUDA where its provider
            is installed, else the CPU.
        threads: Intra-op threads (default: ONNX Runtime's choice, all cores).

    Raises:
        BackendError: For a plugin graph (ONNX Runtime has no MaskedGemPool), missing onnxruntime, or a CUDA device
            asked for without the CUDA provider.
    """

    name = "onnxruntime"

    def __init__(self, export_dir: Path, manifest: Manifest, device: str | None = None,
                 threads: int | None = None) -> None:
        if manifest.flavor != "portable":
            raise BackendError(f"{export_dir}: a {manifest.flavor!r} graph needs TensorRT (its MaskedGemPool node "
                               "is a TensorRT plugin); export the portable flavour for ONNX Runtime")
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed (pip install onnxruntime)") from None
        available = ort.get_available_providers()
        cuda = "CUDAExecutionProvider" in available
        if device is not None and device.startswith("cuda") and not cuda:
            raise BackendError(f"device {device!r} needs onnxruntime's CUDAExecutionProvider (pip install "
                               f"onnxruntime-gpu); this onnxruntime has {available}")
        use_cuda = cuda if device is None else device.startswith("cuda")
        if use_cuda:
            index = int(device.split(":")[1]) if device and ":" in device else 0
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            self.device = f"cuda:{index}"
        else:
            providers = ["CPUExecutionProvider"]
            self.device = "cpu"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        # Idle intra-op threads spin by default, taking the cores from FAISS and the decoders between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(export_dir / manifest.model), options, providers=providers)
        self.max_batch = manifest.max_batch

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """See :class:`Backend`."""
        outputs = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return dict(zip(OUTPUT_NAMES, outputs, strict=True))

    def close(self) -> None:
        """See :class:`Backend`."""
        self._session = None


class TorchBackend:
    """The source checkpoint in PyTorch: eager or compiled, with the fused Triton pooling kernel on a GPU.

    Args:
        manifest: The export's manifest (the checkpoint must be the one it was exported from).
        checkpoint: The ``interpreter.pt``; default the manifest's source path.
        device: ``"cpu"``, ``"cuda"``/``"cuda:N"``, or None for the GPU where there is one.
        compile: Wrap the model in ``torch.compile`` (the pooling kernel stays a Triton launch).
        threads: CPU threads for torch (default: torch's choice).

    Raises:
        BackendError: Missing torch, checkpoint or CUDA device, or a checkpoint whose sha256 is not the export's.
    """

    name = "torch"

    def __init__(self, manifest: Manifest, checkpoint: str | Path | None = None, device: str | None = None,
                 compile: bool = False, threads: int | None = None) -> None:
        try:
            import torch
        except ImportError:
            raise BackendError("the torch backend needs PyTorch (pip install torch)") from None
        path = Path(checkpoint or manifest.source.checkpoint)
        if not path.is_file():
            raise BackendError(f"the torch backend needs the export's source checkpoint; {path} does not exist "
                               "(pass checkpoint=...)")
        if sha256_file(path) != manifest.model_id:
            raise BackendError(f"{path} is not the checkpoint this export was made from (sha256 differs)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r}: torch sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        from attrimeter.engine.interpreter_checkpoint import load_interpreter

        self.torch_device = torch.device(device)
        self.device = str(self.torch_device)
        self.model = load_interpreter(path, map_location=self.torch_device).model.eval()
        pool = None
        if self.torch_device.type == "cuda":
            from attrimeter.kernels.masked_gem_pool import masked_gem_pool

            pool = masked_gem_pool
        forward = self.model
        if compile:
            forward = torch.compile(self.model, dynamic=True)
        self._forward = forward
        self._pool = pool
        self.max_batch = manifest.max_batch

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """See :class:`Backend`."""
        import torch

        with torch.inference_mode():
            out = self._forward(torch.from_numpy(images).to(self.torch_device), pool=self._pool)
            tensors = (out.target, out.attributes, out.aam(), out.attr_logits)
            return {name: t.float().cpu().numpy() for name, t in zip(OUTPUT_NAMES, tensors, strict=True)}

    def close(self) -> None:
        """See :class:`Backend`."""
        self.model = self._forward = None


def _tensorrt_ready(manifest: Manifest) -> str | None:
    """Why the TensorRT backend cannot run here, or None when it can."""
    if manifest.tensorrt is None:
        return "the export has no TensorRT engine (attrimeter export --format tensorrt)"
    missing = tensorrt_available()  # None, or what is missing (TensorRT itself, or a CUDA GPU)
    if missing:
        return missing
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed (pip install cuda-python)"
    return None


def open_backend(export_dir: str | Path, manifest: Manifest, backend: str = "auto", *,
                 device: str | None = None, threads: int | None = None, checkpoint: str | Path | None = None,
                 compile: bool = False) -> Backend:
    """Open the backend that runs this export.

    Args:
        export_dir: The export folder.
        manifest: Its (verified) manifest.
        backend: One of :data:`BACKENDS`; ``"auto"`` takes TensorRT where the export has an engine that can run
            here, else ONNX Runtime for a portable graph, else PyTorch.
        device: Device for the backend (see each class); None lets it choose.
        threads: CPU threads (ONNX Runtime / torch).
        checkpoint: The source checkpoint for the torch backend.
        compile: ``torch.compile`` the torch backend.

    Returns:
        The backend.

    Raises:
        BackendError: An unknown name, or a backend that cannot run here (the message says why).
    """
    export_dir = Path(export_dir)
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    reasons = []
    if backend == "tensorrt" or (backend == "auto" and not (device or "").startswith("cpu")):
        why = _tensorrt_ready(manifest)
        if why is None and manifest.tensorrt is not None:
            from attrimeter.runtime.tensorrt_backend import TensorRTBackend

            index = int(device.split(":")[1]) if device and ":" in device else 0
            return TensorRTBackend(export_dir / manifest.tensorrt.engine, manifest.image_size,
                                   manifest.tensorrt.max_batch, device=index)
        if backend == "tensorrt":
            raise BackendError(f"tensorrt backend: {why}")
        reasons.append(f"tensorrt: {why}")
    if backend in ("auto", "onnxruntime"):
        try:
            return OnnxRuntimeBackend(export_dir, manifest, device=device, threads=threads)
        except BackendError as e:
            if backend == "onnxruntime":
                raise
            reasons.append(f"onnxruntime: {e}")
    try:
        return TorchBackend(manifest, checkpoint=checkpoint, device=device, compile=compile, threads=threads)
    except BackendError as e:
        if backend == "torch":
            raise
        reasons.append(f"torch: {e}")
    raise BackendError(f"no backend can run {export_dir} here; " + "; ".join(reasons))

