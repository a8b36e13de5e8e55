"""The weighted scan's compiled inner loop: expanded per-attribute distances of stored rows (docs/architecture.md §4).

For each gallery row ``g`` and one query ``q`` it computes ``Σ_j w_j √max(‖q_j‖² + ‖g_j‖² − 2 q_j·g_j, 0)`` over the
active attributes ``j``, reading each stored value once, float16 widened in registers (no float32 copy), with the
stored ``‖g_j‖²``. Rows stored attribute by attribute (a format 4 segment's scan copy: each attribute's rows of all
entries together) are scanned two attribute planes per pass, contiguous streams of only the weighted attributes'
bytes (on the kernel alone, in a prototype not kept: two streams ~1.05x a numpy sum over the same planes, one
~1.3x). Rows stored entry by entry (segments
without the copy) are scanned in blocks of rows and, inside a block, attribute by attribute: each attribute's query
row stays in registers while the same attribute of consecutive rows streams past. Packed ``pcaq`` codes are scanned
in the codec's coordinates, each code unpacked in registers (:func:`coded_scores`); ``int8`` codes with a scale per
row are widened and scaled in registers (:func:`scaled_scores`).

Compiled with Numba (the ``scan`` extra; ``nogil``: concurrent searches run in parallel), once per embedding
width ``C`` so the inner product has a constant trip count, and cached on disk. Measured at 10^5
entries on the 2-core CPU (``benchmarks/results/search_costs_cpu.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from attrimeter.runtime.codecs import BitTables

__all__ = ["coded_scores", "expanded_scores", "scaled_scores"]

# Rows per block of entry-major rows: a block's rows of one attribute are read in one pass before the next attribute
# (64..512 rows measured within a few per cent of each other at C = 256, M = 26, in a prototype not kept).
_BLOCK = 256


def expanded_scores(rows: np.ndarray, norms: np.ndarray | None, active: np.ndarray, q: np.ndarray,
                    q_sq: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expanded weighted scores of every row for every query, and the rows' largest squared norms.

    Args:
        rows: Stored attribute rows ``[n, M, C]``, float16 or float32, read in place (a memory map too). Any strides
            work, but only two layouts compile to vector code: C-contiguous rows (entry by entry), and rows whose
            attribute planes ``rows[:, a]`` are each C-contiguous (stored by attribute, as format 4 segments are);
            other views run several times slower.
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
    active = _checked(active, rows.shape[1], q)
    have_norms = norms is not None
    norms = np.zeros((n, rows.shape[1]), np.float32) if norms is None else norms
    scores = np.zeros((len(q), n), np.float32)
    g_max = np.zeros(len(active), np.float32)
    block_kernel, plane_kernel = _kernels(rows.shape[2])
    planes = rows.transpose(1, 0, 2)  # [M, n, C]: each attribute's rows, contiguous when stored by attribute
    by_attribute = rows.shape[1] > 1 and all(planes[a].flags.c_contiguous for a in active)
    if by_attribute:  # the norms' columns, read once: read in place, each plane's pass would stream all of them
        columns = np.ascontiguousarray(norms[:, active].T)  # [A, n]
    w32 = np.ascontiguousarray(w, np.float32)
    for p in range(len(q)):  # one pass per query: requests carry one query, rarely more
        qp = np.ascontiguousarray(q[p], np.float32)  # [A, C]
        q_sq_p = np.ascontiguousarray(q_sq[p], np.float32)
        if by_attribute:  # two planes per pass: more reads in flight (see the module docstring)
            for j in range(0, len(active), 2):
                pair = j + 1 < len(active)
                plane_kernel(planes[active[j]], planes[active[j + int(pair)]], pair, columns, have_norms, qp, q_sq_p,
                             w32, scores[p], g_max, j)
        else:
            block_kernel(rows, norms, have_norms, active, qp, q_sq_p, w32, scores[p], g_max)
    return scores, g_max


def coded_scores(codes: np.ndarray, scales: np.ndarray, tables: BitTables, active: np.ndarray, q: np.ndarray,
                 q_sq: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`expanded_scores` over packed codes (``pcaq``) in their coordinates, each code unpacked in registers.

    Args:
        codes: Packed codes ``[n, M, B]`` uint8 (a stored chunk, read in place).
        scales: Their groups' scales ``[n, M, G]`` float16.
        tables: Where each coordinate's bits lie (:meth:`Codec.bit_tables`).
        active: The attributes to score ``[A]``.
        q: Queries in the codec's coordinates ``[Q, A, S]`` float32 (:meth:`Codec.scan_space`).
        q_sq: Their ``‖q'‖² + rest`` ``[Q, A]`` float32.
        w: Weights of the active attributes ``[A]`` float32.

    Returns:
        ``(scores [Q, n] float32, g_max [A] float32)``: ``g_max[j]`` is the largest ``‖y_j‖²``.

    Raises:
        ValueError: Arrays that do not match the tables (a code or scale outside the row).
    """
    s = len(tables.first)
    if codes.dtype != np.uint8 or scales.dtype != np.float16 or codes.ndim != 3 or scales.shape[:2] != codes.shape[:2]:
        raise ValueError(f"codes must be uint8 [n, M, B] and scales float16 [n, M, G], got {codes.dtype} "
                         f"{list(codes.shape)} and {scales.dtype} {list(scales.shape)}")
    if s and (max(tables.first.max(), tables.second.max()) >= codes.shape[2] or tables.group.max() >= scales.shape[2]
              or q.shape[2] != s):
        raise ValueError("the bit tables do not match the stored codes, scales or queries")
    active = _checked(active, codes.shape[1], q)
    scores = np.zeros((len(q), len(codes)), np.float32)
    g_max = np.zeros(len(active), np.float32)
    kernel = _code_kernel()
    for p in range(len(q)):
        kernel(codes, scales.view(np.uint16), active, *tables,
               np.ascontiguousarray(q[p], np.float32), np.ascontiguousarray(q_sq[p], np.float32),
               np.ascontiguousarray(w, np.float32), scores[p], g_max)
    return scores, g_max


def scaled_scores(codes: np.ndarray, scales: np.ndarray, active: np.ndarray, q: np.ndarray, q_sq: np.ndarray,
                  w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`expanded_scores` over ``int8`` codes with one scale per row: ``y = code · scale`` in float32, as decoded.

    Args:
        codes: Codes ``[n, M, C]`` int8 (a stored chunk, read in place).
        scales: Each row's scale ``[n, M]`` float16.
        active: The attributes to score ``[A]``.
        q: Queries' active attribute rows ``[Q, A, C]`` float32.
        q_sq: ``‖q_j‖²`` ``[Q, A]`` float32.
        w: Weights of the active attributes ``[A]`` float32.

    Returns:
        ``(scores [Q, n] float32, g_max [A] float32)`` as :func:`expanded_scores`.

    Raises:
        ValueError: Arrays of other dtypes or shapes.
    """
    if codes.dtype != np.int8 or scales.dtype != np.float16 or codes.ndim != 3 or scales.shape != codes.shape[:2] \
            or q.ndim != 3 or q.shape[2] != codes.shape[2]:
        raise ValueError(f"codes must be int8 [n, M, C] with float16 scales [n, M] and queries [Q, A, C], got "
                         f"{codes.dtype} {list(codes.shape)}, {scales.dtype} {list(scales.shape)} and {list(q.shape)}")
    active = _checked(active, codes.shape[1], q)
    scores = np.zeros((len(q), len(codes)), np.float32)
    g_max = np.zeros(len(active), np.float32)
    kernel = _scaled_kernel(codes.shape[2])
    for p in range(len(q)):
        kernel(codes, scales.view(np.uint16), active, np.ascontiguousarray(q[p], np.float32),
               np.ascontiguousarray(q_sq[p], np.float32), np.ascontiguousarray(w, np.float32), scores[p], g_max)
    return scores, g_max


def _checked(active: np.ndarray, m: int, q: np.ndarray) -> np.ndarray:
    """``active`` as int64, each in ``[0, m)`` and one per query row: the kernels do not check their indices."""
    active = np.ascontiguousarray(active, np.int64)
    if active.ndim != 1 or (len(active) and (active.min() < 0 or active.max() >= m)) or q.shape[1] != len(active):
        raise ValueError(f"active must be attribute indices in [0, {m}), one per query row, got {active.tolist()} "
                         f"for queries of shape {list(q.shape)}")
    return active


@functools.cache
def _code_kernel() -> Callable:
    """The scan over packed codes (generic in the number of coordinates: it varies with the learned widths)."""
    jit = _jit()

    widen = _widen()

    @jit
    def scan_codes(codes, scales, active, first, second, shift, mask, offset, group, q, q_sq, w, out, g_max):
        scale = np.empty(scales.shape[2], np.float32)
        for i in range(codes.shape[0]):
            total = np.float32(0.0)
            for j in range(active.shape[0]):
                a = active[j]
                row = codes[i, a]
                for g in range(scale.shape[0]):
                    scale[g] = widen(scales[i, a, g])
                dot = np.float32(0.0)
                sq = np.float32(0.0)
                for s in range(first.shape[0]):
                    window = np.int64(row[first[s]]) | (np.int64(row[second[s]]) << 8)
                    y = (np.float32((window >> shift[s]) & mask[s]) - offset[s]) * scale[group[s]]
                    dot += q[j, s] * y
                    sq += y * y
                g_max[j] = max(g_max[j], sq)
                total += w[j] * np.sqrt(max(q_sq[j] + sq - np.float32(2.0) * dot, np.float32(0.0)))
            out[i] = total

    return scan_codes


@functools.cache
def _scaled_kernel(c: int) -> Callable:
    """The scan over int8 codes with row scales, compiled for width ``c``: blocks of rows, attribute by attribute."""
    jit = _jit()

    widen = _widen()
    block = _BLOCK

    @jit
    def scan_scaled(codes, scales, active, q, q_sq, w, out, g_max):
        n = codes.shape[0]
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            for j in range(active.shape[0]):
                a = active[j]
                qj = q[j]
                for i in range(lo, hi):
                    scale = widen(scales[i, a])
                    row = codes[i, a]
                    dot = np.float32(0.0)
                    sq = np.float32(0.0)
                    for x in range(c):
                        y = np.float32(row[x]) * scale  # the decoded value's float32 bits
                        dot += qj[x] * y
                        sq += y * y
                    g_max[j] = max(g_max[j], sq)
                    out[i] += w[j] * np.sqrt(max(q_sq[j] + sq - np.float32(2.0) * dot, np.float32(0.0)))

    return scan_scaled


def _jit() -> Callable:
    """Numba's ``njit`` as every scan compiles: cached on disk, ``nogil``, no bounds checks (indices checked before).

    Fast-math is limited to ``reassoc`` / ``contract``: the products may be summed in any order (vectorised), and the
    rounding bound of ``weighted_scan`` holds for every order; NaN, inf and signed zeros keep their meaning.
    """
    try:
        from numba import njit
    except ImportError:
        raise ImportError('attribute-weighted search needs Numba: pip install "attrimeter[scan]"') from None
    return njit(fastmath={"reassoc", "contract"}, boundscheck=False, nogil=True, cache=True)


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
def _kernels(c: int) -> tuple[Callable, Callable]:
    """The scans compiled for embedding width ``c`` (a constant of the inner loop): rows entry by entry, one plane."""
    jit = _jit()

    widen = _widen()
    block = _BLOCK

    @jit
    def dot(row, q):
        acc = np.float32(0.0)
        for x in range(c):
            acc += q[x] * widen(row[x])
        return acc

    @jit
    def squared(row):
        acc = np.float32(0.0)
        for x in range(c):
            v = widen(row[x])
            acc += v * v
        return acc

    @jit
    def scan_blocks(rows, norms, have_norms, active, q, q_sq, w, out, g_max):
        n = rows.shape[0]
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            for j in range(active.shape[0]):
                a = active[j]
                for i in range(lo, hi):
                    g_sq = norms[i, a] if have_norms else squared(rows[i, a])
                    g_max[j] = max(g_max[j], g_sq)
                    sq = q_sq[j] + g_sq - np.float32(2.0) * dot(rows[i, a], q[j])
                    out[i] += w[j] * np.sqrt(max(sq, np.float32(0.0)))

    @jit
    def scan_planes(first, second, pair, norms, have_norms, q, q_sq, w, out, g_max, j):
        """Active attributes ``j`` (plane ``first`` [n, C]) and, with ``pair``, ``j + 1`` (``second``)."""
        k = j + 1 if pair else j
        q0, q1, n0, n1 = q[j], q[k], norms[j], norms[k]
        s0, s1, w0, w1 = q_sq[j], q_sq[k], w[j], w[k]
        top0, top1 = g_max[j], g_max[k]
        for i in range(first.shape[0]):
            x0 = first[i]
            g0 = n0[i] if have_norms else squared(x0)
            top0 = max(top0, g0)
            term = w0 * np.sqrt(max(s0 + g0 - np.float32(2.0) * dot(x0, q0), np.float32(0.0)))
            if pair:
                x1 = second[i]
                g1 = n1[i] if have_norms else squared(x1)
                top1 = max(top1, g1)
                term += w1 * np.sqrt(max(s1 + g1 - np.float32(2.0) * dot(x1, q1), np.float32(0.0)))
            out[i] += term
        g_max[j] = top0
        if pair:
            g_max[k] = top1

    return scan_blocks, scan_planes
