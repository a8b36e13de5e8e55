"""Fixtures of the kernel tests."""

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture
def aot_sm90() -> Callable[[str], dict[str, int]]:
    """Run ``aot_sm90.py <module>`` (sm_90 compilation without a GPU) in a clean subprocess; return its JSON report.

    Skips on a GPU machine, where the other tests run the compiled kernels themselves.
    """
    if torch.cuda.is_available():
        pytest.skip("on a GPU every kernel test runs the compiled kernels")
    pytest.importorskip("triton.backends.nvidia")
    # Triton chooses interpreted kernels at decoration time: the child must not inherit TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    script = Path(__file__).with_name("aot_sm90.py")

    def run(module: str) -> dict[str, int]:
        proc = subprocess.run([sys.executable, str(script), module], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
