"""Fixtures shared by the runtime tests."""

import pytest
from cuda_fakes import FakeCuda, cudart, drv
from gallery_helpers import ATTRS, batch_of, concat_batches

from attrimeter.runtime.gallery import Gallery


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


@pytest.fixture
def filled(tmp_path, rng):
    """A writable l2 gallery of four segments of random sizes, and what was appended."""
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=(8, 4), model="m")
    batches = [batch_of(rng, int(n)) for n in rng.integers(1, 9, size=4)]
    for b in batches:
        g.append(**b)
    yield g, concat_batches(batches)
    g.close()

