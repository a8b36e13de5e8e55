"""Fused Triton kernels with their pure-torch references (DESIGN §4).

Sub-modules import torch and triton; this package file imports nothing heavy (the AOT compiler and the exporter read
:func:`integer_exponent` without them).
"""

from types import ModuleType

__all__ = ["MIN_TRITON", "check_triton", "integer_exponent"]

# The oldest Triton the kernels run with: ``triton.knobs`` arrived in 3.4 (the kernel tests pass under the interpreter
# with 3.4, 3.5, 3.6 and 3.9; the AOT tests with 3.5, 3.6 and 3.9, as they expect 3.5's extra scratch parameter).
MIN_TRITON = (3, 4)


def check_triton(triton: ModuleType) -> None:
    """Refuse a Triton older than :data:`MIN_TRITON`, naming both versions.

    Args:
        triton: The imported ``triton`` module.

    Raises:
        ImportError: ``triton`` is older than the kernels need.
    """
    found = tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TRITON or not hasattr(triton, "knobs"):
        raise ImportError(f"attrimeter.kernels needs Triton >= {'.'.join(map(str, MIN_TRITON))} (triton.knobs); "
                          f"this is Triton {triton.__version__}: pip install 'triton>={MIN_TRITON[0]}.{MIN_TRITON[1]}'")


def integer_exponent(p: float) -> int:
    """The integer GeM exponent the kernels specialise to multiplications, or 0 for the generic exp2/log2 path.

    Args:
        p: The GeM exponent.

    Returns:
        ``int(p)`` for p in {1, 2, 3, 4}, else 0.
    """
    return int(p) if p in (1.0, 2.0, 3.0, 4.0) else 0
