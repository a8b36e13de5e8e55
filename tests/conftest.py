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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic data set (16 identities, 3 cameras, 64x32, counterfactual pairs)."""
    from attrimeter.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthConfig(ids=16, cams=3, size=(64, 32), seed=3, images_per_id=6, counterfactual_per_attribute=2),
             progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_target(tiny_data, tmp_path_factory):
    """A target trained for one epoch on ``tiny_data`` (resnet18 width 0.25): its ``target.pt``."""
    from attrimeter.engine.target import TargetTrainConfig, train_target

    out = tmp_path_factory.mktemp("target")
    config = TargetTrainConfig(width=0.25, image_size=(64, 32), p_ids=4, k_instances=2, epochs=1, threads=1)
    train_target(tiny_data, out, config, progress=False, evaluate=False)
    return out / "target.pt"


@pytest.fixture(scope="session")
def tiny_settings():
    """Interpreter training settings for the tiny data set: one epoch of 4 x 2 batches on one thread."""
    return {"p_ids": 4, "k_instances": 2, "epochs": 1, "threads": 1, "eval_batch_size": 32}


@pytest.fixture(scope="session")
def tiny_interpreter(tiny_data, tiny_target, tiny_settings, tmp_path_factory):
    """An interpreter trained for one epoch on ``tiny_target``: its ``interpreter.pt``."""
    from attrimeter.engine.interpreter_training import InterpreterTrainConfig, train_interpreter

    out = tmp_path_factory.mktemp("interpreter")
    train_interpreter(tiny_data, tiny_target, out, InterpreterTrainConfig(**tiny_settings), progress=False)
    return out / "interpreter.pt"


@pytest.fixture(scope="session")
def tiny_export(tiny_interpreter, tmp_path_factory):
    """A portable fp32 ONNX export of ``tiny_interpreter`` (no AOT kernels): its folder."""
    from attrimeter.export.build import export

    out = tmp_path_factory.mktemp("export") / "portable"
    export(tiny_interpreter, out, targets=(), progress=False)
    return out
