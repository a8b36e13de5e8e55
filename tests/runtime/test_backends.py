"""Backends on one export: ONNX Runtime against the torch backend (and eager PyTorch), and backend selection."""

import shutil
from dataclasses import replace

import numpy as np
import pytest

from attrimeter.artefact.contract import OUTPUT_NAMES
from attrimeter.artefact.manifest import Source, load_manifest
from attrimeter.runtime.backends import BackendError, OnnxRuntimeBackend, TorchBackend, open_backend


def _rel(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_onnxruntime_and_torch_backends_agree(tiny_export, rng, device):
    """On a GPU the torch backend pools with the fused Triton kernel, its convolutions in TF32 (torch's default)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (benchmarks/gpu_check.py)")
    tol = 1e-4 if device == "cpu" else 2e-3
    manifest = load_manifest(tiny_export)
    h, w = manifest.image_size
    ort_backend = open_backend(tiny_export, manifest, "auto")
    assert ort_backend.name == "onnxruntime" and ort_backend.device == "cpu"
    torch_backend = open_backend(tiny_export, manifest, "torch", device=device)
    for batch in (1, 5):
        images = rng.uniform(0, 1, (batch, 3, h, w)).astype(np.float32)
        a, b = ort_backend.run(images), torch_backend.run(images)
        assert set(a) == set(b) == set(OUTPUT_NAMES)
        for name in OUTPUT_NAMES:
            assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype == np.float32
            assert _rel(a[name], b[name]) < tol, name
    ort_backend.close()
    torch_backend.close()


def test_backend_errors_say_why(tiny_export, tmp_path):
    manifest = load_manifest(tiny_export)
    with pytest.raises(BackendError, match="unknown backend"):
        open_backend(tiny_export, manifest, "tflite")
    with pytest.raises(BackendError, match="no TensorRT engine"):
        open_backend(tiny_export, manifest, "tensorrt")
    with pytest.raises(BackendError, match="needs TensorRT"):
        OnnxRuntimeBackend(tiny_export, replace(manifest, flavor="plugin"))
    with pytest.raises(BackendError, match="does not exist"):
        TorchBackend(replace(manifest, source=Source(str(tmp_path / "gone.pt"), manifest.source.sha256)))
    other = tmp_path / "other.pt"
    shutil.copy(manifest.source.checkpoint, other)
    with other.open("ab") as f:
        f.write(b"x")
    with pytest.raises(BackendError, match="not the checkpoint"):
        TorchBackend(manifest, checkpoint=other)
