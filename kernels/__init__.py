"""Fused Triton kernels with their pure-torch references (DESIGN §4).

Sub-modules import torch and triton; this package file imports nothing heavy (the AOT compiler and the exporter read
:func:`integer_exponent` without them).
"""

__all__ = ["integer_exponent"]


def integer_exponent(p: float) -> int:
    """The integer GeM exponent the kernels specialise to multiplications, or 0 for the generic exp2/log2 path.

    Args:
        p: The GeM exponent.

    Returns:
        ``int(p)`` for p in {1, 2, 3, 4}, else 0.
    """
    return int(p) if p in (1.0, 2.0, 3.0, 4.0) else 0
