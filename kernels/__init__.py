"""Fused Triton kernels with their pure-torch references (docs/architecture.md §4).

Sub-modules import torch and triton; this package file imports nothing heavy (the AOT compiler and the exporter read
:func:`integer_exponent` without them).
"""

from types import ModuleType

__all__ = ["MIN_TRITON", "check_triton", "integer_exponent"]

# The oldest Triton the kernels run with: ``triton.knobs`` arrived in 3.4 (the kernel tests pass under the interpreter
# with 3.4, 3.5, 3.6 and 3.9; the AOT tests with 3.5, 3.6 and 3.9, as they expect 3.5's extra scratch parameter).
MIN_TRITON = (3, 4)
# Triton's interpreter before 3.7 turns 1-element arrays into Python ints, which numpy refuses from 2.4 on.
_INTERPRETER_NUMPY = ((3, 7), (2, 4))


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def check_triton(triton: ModuleType) -> None:
    """Refuse a Triton older than :data:`MIN_TRITON`, or an interpreter that cannot run with this numpy, by name.

    Args:
        triton: The imported ``triton`` module.

    Raises:
        ImportError: ``triton`` is older than the kernels need, or ``TRITON_INTERPRET=1`` with a Triton older than 3.7
            and numpy 2.4 or newer.
    """
    found = _release(triton.__version__)
    if found < MIN_TRITON or not hasattr(triton, "knobs"):
        raise ImportError(f"attrimeter.kernels needs Triton >= {'.'.join(map(str, MIN_TRITON))} (triton.knobs); "
                          f"this is Triton {triton.__version__}: pip install 'triton>={MIN_TRITON[0]}.{MIN_TRITON[1]}'")
    if triton.knobs.runtime.interpret and found < _INTERPRETER_NUMPY[0]:
        import numpy as np

        if _release(np.__version__) >= _INTERPRETER_NUMPY[1]:
            raise ImportError(f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run with numpy "
                              f"{np.__version__} (it converts 1-element arrays to scalars, which numpy refuses from "
                              "2.4 on): use Triton >= 3.7 or numpy < 2.4 for the interpreted kernels")


def integer_exponent(p: float) -> int:
    """The integer GeM exponent the kernels specialise to multiplications, or 0 for the generic exp2/log2 path.

    Args:
        p: The GeM exponent.

    Returns:
        ``int(p)`` for p in {1, 2, 3, 4}, else 0.
    """
    return int(p) if p in (1.0, 2.0, 3.0, 4.0) else 0
