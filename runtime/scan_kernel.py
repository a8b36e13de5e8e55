"""The weighted scan's compiled inner loop: expanded per-attribute distances of stored rows (docs/architecture.md §4).

For each gallery row ``g`` and one query ``q`` it computes ``Σ_j w_j √max(‖q_j‖² + ‖g_j‖² − 2 q_j·g_j, 0)`` over the
active attributes ``j``, reading each stored value once, float16 widened in registers (no float32 copy), with the
stored ``‖g_j‖²``. The loops run over blocks of rows and, inside a block, attribute by attribute: each attribute's
query row stays in registers while the same attribute of consecutive rows streams past (a fixed stride that the
hardware prefetcher follows).

Compiled with Numba (the ``scan`` extra; ``nogil``: concurrent searches run in parallel), once per embedding
width ``C`` so the inner product has a constant trip count, and cached on disk. Measured at 10^5
entries on the 2-core CPU (``benchmarks/results/search_costs_cpu.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["expanded_scores"]

# Rows per block: a block's rows of one attribute are read in one pass before the next attribute (64..512 rows
# measured within a few per cent of each other at C = 256, M = 26).
_BLOCK = 256


def expanded_scores(rows: np.ndarray, norms: np.ndarray | None, active: np.ndarray, q: np.ndarray,
                    q_sq: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expanded weighted scores of every row for every query, and the rows' largest squared norms.

    Args:
        rows: Stored attribute rows ``[n, M, C]``, float16 or float32, read in place (a memory map too). Any strides
            work, but only C-contiguous rows compile to vector code: a transposed view runs several times slower.
        norms: Their squared norms ``[n, M]`` float32, or None to compute them from ``rows``.
        active: The attributes to score ``[A]`` (indices into M).
        q: Queries' active attribute rows ``[Q, A, C]`` float32.
        q_sq: ``‖q_j‖²`` ``[Q, A]`` float32.
        w: Weights of the active attributes ``[A]`` float32.

    Returns:
        ``(scores [Q, n] float32, g_max [A] float32)``: ``g_max[j]`` is the largest ``‖g_j‖²`` of the rows, for the
        expansion's rounding bound.
    """
    if rows.dtype == np.float16:
        rows = rows.view(np.uint16)  # the kernel widens float16 bit patterns itself
    elif rows.dtype != np.float32:
        raise TypeError(f"rows must be float16 or float32, got {rows.dtype}")
    n = len(rows)
    active = np.ascontiguousarray(active, np.int64)
    have_norms = norms is not None
    norms = np.zeros((0, rows.shape[1]), np.float32) if norms is None else norms
    scores = np.empty((len(q), n), np.float32)
    g_max = np.zeros(len(active), np.float32)
    kernel = _kernel(rows.shape[2])
    for p in range(len(q)):  # one pass per query: requests carry one query, rarely more
        kernel(rows, norms, have_norms, active, np.ascontiguousarray(q[p], np.float32),
               np.ascontiguousarray(q_sq[p], np.float32), np.ascontiguousarray(w, np.float32), scores[p], g_max)
    return scores, g_max


@functools.cache
def _widen() -> Callable:
    """A Numba intrinsic: a float16 bit pattern (uint16) → float32 (LLVM ``fpext``), float32 unchanged."""
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def widen(typingctx, x):
        if x == types.uint16:
            def codegen(context, builder, signature, args):
                return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        elif x == types.float32:
            def codegen(context, builder, signature, args):
                return args[0]
        else:
            return None
        return types.float32(x), codegen

    return widen


@functools.cache
def _kernel(c: int) -> Callable:
    """The scan compiled for embedding width ``c`` (a constant of the inner loop)."""
    try:
        from numba import njit
    except ImportError:
        raise ImportError('attribute-weighted search needs Numba: pip install "attrimeter[scan]"') from None

    widen = _widen()
    block = _BLOCK

    # reassoc: the inner products may be summed in any order (vectorised); the rounding bound of weighted_scan holds
    # for every order. No other fast-math flag: NaN, inf and signed zeros keep their meaning.
    @njit(fastmath={"reassoc", "contract"}, boundscheck=False, nogil=True, cache=True)
    def scan(rows, norms, have_norms, active, q, q_sq, w, out, g_max):
        n = rows.shape[0]
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            for i in range(lo, hi):
                out[i] = 0.0
            for j in range(active.shape[0]):
                a = active[j]
                for i in range(lo, hi):
                    dot = np.float32(0.0)
                    if have_norms:
                        g_sq = norms[i, a]
                        for x in range(c):
                            dot += q[j, x] * widen(rows[i, a, x])
                    else:
                        g_sq = np.float32(0.0)
                        for x in range(c):
                            v = widen(rows[i, a, x])
                            dot += q[j, x] * v
                            g_sq += v * v
                    g_max[j] = max(g_max[j], g_sq)
                    sq = q_sq[j] + g_sq - np.float32(2.0) * dot
                    out[i] += w[j] * np.sqrt(max(sq, np.float32(0.0)))

    return scan
