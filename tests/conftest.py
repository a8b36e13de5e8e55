"""Session-wide test set-up.

Triton decides between compiling and interpreting when a kernel is decorated, so the switch must be set before any
kernel module is imported: on a machine without a CUDA GPU the kernels run under ``TRITON_INTERPRET=1``.
"""

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng() -> "object":
    """A fresh, unseeded numpy generator: tests draw new random inputs on every run."""
    import numpy as np

    return np.random.default_rng()
