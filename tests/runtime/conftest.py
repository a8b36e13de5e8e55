"""Fixtures shared by the runtime tests."""

import pytest
from cuda_fakes import FakeCuda, cudart, drv


@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA driver and runtime calls replaced by a ``FakeCuda`` (skips without cuda-python)."""
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

