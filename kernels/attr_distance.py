"""Per-attribute distances: fused epilogue, fused top-k and a gather-and-explain path (docs/architecture.md §3, §4).

Embeddings come as ``[Q, M+1, C]`` (queries) and ``[N, M+1, C]`` (gallery): row 0 is the target's global embedding f,
rows 1..M the per-attribute embeddings f_k. For every query/gallery pair the ops return

* ``d = ‖q_0 − g_0‖`` (the target distance), ``d_k = ‖q_k − g_k‖`` for k = 1..M,
* ``shares p_k = d_k / Σ_j d_j``; when ``Σ_j d_j = 0`` (all attribute embeddings equal) every share is ``1/M``, so
  shares always sum to 1,
* ``d_hat = (1/M) Σ_k d_k`` (the decomposed distance),
* ``scores``: the ranking score, ``d`` or, with attribute weights w, ``Σ_k w_k d_k`` (attribute-weighted search, e.g.
  zero weights for the clothing colours to "ignore clothing colours").

Layers (Liger-Kernel style): two ``@triton.jit`` kernels (the gallery scan, the explain gather), their launchers
:func:`attr_distance` and :func:`explain_topk`, and the pure-torch :func:`attr_distance_reference`,
:func:`explain_topk_reference` and :func:`attr_distance_naive` (per-attribute ``torch.cdist``, the authors' way) that
tests and benchmarks compare against. The Triton launchers are inference-only (no autograd); training uses the
differentiable references.

The scan computes ``‖a‖² + ‖b‖² − 2ab`` with ``tl.dot`` (fp32 accumulation), clamps at 0 before the square root (so
near-duplicates never give NaN) and reads every gallery tile once: one program owns a block of N gallery items and a
block of up to 64 queries and streams over the M+1 rows and over C. Queries are rounded to the gallery dtype for the
tensor-core product (their squared norms are taken from the rounded values, so ``q = g`` still cancels); fp32 galleries
use 3xTF32 on GPUs. With ``topk`` the scan reads only the rows the score needs (row 0 for ``d``, rows 1..M for
weighted scores), keeps ``d_k`` in registers, writes a per-block partial top-k and a small merge picks the global k;
the chosen ids are then explained by :func:`explain_topk`, which uses direct differences in fp32 (exact up to fp32
rounding, no cancellation).

Accuracy against a float64 reference on the same gallery values (``‖out − ref‖ / ‖ref‖``), as the tests check:
scan with an fp32 gallery < 1e-5, fp16 < 5e-4, bf16 < 4e-3 (the rounding of the queries dominates); explain paths
< 1e-5 for every gallery dtype. Near-duplicate pairs (distance ≈ 0) carry an absolute error of about
``sqrt(ε · (‖a‖² + ‖b‖²))`` in the scan (ε the relative error of the dot: fp32 accumulation, 3xTF32 for fp32
galleries), never NaN.

Performance: make C a multiple of 8 (16-bit galleries) or 4 (fp32) so that rows are 16-byte aligned; the gallery
loads are then vectorised and software-pipelined into shared memory. The GPU launchers autotune the tile shape per
(C, M, ⌊log2 N⌋, query block, mode, dtype); the first call of each such key pays for the tuning.

Why one module of ~800 lines: the kernels, their launchers and the references are one contract (docs/architecture.md
§4) and change together; the launchers and the references share the input validation (shapes, dtypes, weights, ids,
finiteness), so each rule is written once; the export's AOT step compiles ``_explain_kernel`` by this module's
import path (``export/aot.py``), and the tests and benchmarks compare kernel and reference side by side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from attrimeter.kernels import check_triton

check_triton(triton)

__all__ = [
    "AttrDistances",
    "attr_distance",
    "attr_distance_naive",
    "attr_distance_reference",
    "explain_topk",
    "explain_topk_reference",
]

# Triton picks compiled vs interpreted kernels when they are decorated, i.e. at import of this module.
_INTERPRET: bool = bool(triton.knobs.runtime.interpret)
_GALLERY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUERY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_QUERY_BLOCK = 64
# Elements per chunk of the optional gallery finiteness scan (bounds the temporary boolean tensor).
_FINITE_CHUNK = 1 << 26

Weights = torch.Tensor | Sequence[float]


class AttrDistances(NamedTuple):
    """Distances and their attribute decomposition.

    Full matrix (``attr_distance(q, g)``): shapes ``[Q, N]`` and ``[Q, N, M]``. Top-k or explain: ``[Q, k]`` and
    ``[Q, k, M]``, one entry per (query, selected gallery item).

    Attributes:
        d: Target distance ``‖q_0 − g_0‖``.
        d_k: Per-attribute distances ``‖q_k − g_k‖``.
        shares: ``d_k / Σ_j d_j`` (``1/M`` each where the sum is 0); sums to 1 over the last axis.
        d_hat: Decomposed distance ``(1/M) Σ_k d_k``.
        scores: Ranking score: ``d``, or ``Σ_k w_k d_k`` when weights are given. For top-k results these are the
            scan's values (ascending), which the ranking used.
        indices: Gallery ids ``[Q, k]`` of top-k or explain results; ``None`` for the full matrix.
    """

    d: torch.Tensor
    d_k: torch.Tensor
    shares: torch.Tensor
    d_hat: torch.Tensor
    scores: torch.Tensor
    indices: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_distance(
    q_ptr, g_ptr, qsq_ptr, gsq_ptr, r, offs_q, offs_n, mask_q, mask_n, C,
    stride_qq, stride_qr, stride_qc, stride_gn, stride_gr, stride_gc, stride_qsq, stride_gsq,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_GSQ: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Euclidean distances [BLOCK_Q, BLOCK_N] between row ``r`` of a query block and of a gallery block."""
    # int64 offsets: N * (M+1) * C exceeds 2^31 for real galleries.
    q_rows = q_ptr + offs_q.to(tl.int64)[:, None] * stride_qq + r * stride_qr
    g_rows = g_ptr + offs_n.to(tl.int64)[:, None] * stride_gn + r * stride_gr
    acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    gsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        mask_c = offs_c < C
        qt = tl.load(q_rows + offs_c[None, :] * stride_qc, mask=mask_q[:, None] & mask_c[None, :], other=0.0)
        gt = tl.load(g_rows + offs_c[None, :] * stride_gc, mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        if DOT_F32:
            # Interpreter only: Triton 3.9's interpreter multiplies bf16 tiles as raw uint16 in tl.dot. Same math:
            # products of 16-bit values are exact in fp32.
            qt = qt.to(tl.float32)
            gt = gt.to(tl.float32)
        acc = tl.dot(qt, tl.trans(gt), acc, input_precision=PRECISION)
        if not HAS_GSQ:
            # The tile is on chip already: the gallery norms cost no extra read of g.
            gf = gt.to(tl.float32)
            gsq += tl.sum(gf * gf, axis=1)
    if HAS_GSQ:
        gsq = tl.load(gsq_ptr + offs_n.to(tl.int64) * stride_gsq + r, mask=mask_n, other=0.0)
    qsq = tl.load(qsq_ptr + offs_q * stride_qsq + r, mask=mask_q, other=0.0)
    d2 = qsq[:, None] + gsq[None, :] - 2.0 * acc
    # Rounding can make d2 slightly negative for near-duplicates; the clamp keeps sqrt real. NaN (from an unchecked
    # non-finite gallery item) must survive it rather than become a distance of 0.
    return tl.sqrt(tl.maximum(d2, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _scan_kernel(
    q_ptr, g_ptr, qsq_ptr, gsq_ptr, w_ptr,
    d_ptr, dk_ptr, sh_ptr, dhat_ptr, score_ptr, key_ptr,
    Q, N, C, M, n_qblocks, N_BUCKET,
    stride_qq, stride_qr, stride_qc, stride_gn, stride_gr, stride_gc, stride_qsq, stride_gsq,
    stride_dkq, stride_dkn, stride_dkm, stride_shq, stride_shn, stride_shm,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_GSQ: tl.constexpr,
    TOPK_W: tl.constexpr, TOPK_P: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Gallery scan. MODE 0: full outputs; 1: partial top-k by d; 2: partial top-k by Σ w_k d_k.

    ``N_BUCKET`` (⌊log2 N⌋) is only an autotuning key. Partial top-k keys are int64: the order-preserving integer
    image of the fp32 score in the high word, the gallery id in the low word, so one integer sort orders by score and
    breaks ties by id.
    """
    # Query blocks of one gallery block are adjacent programs: a gallery tile read for one is an L2 hit for the next.
    pid = tl.program_id(0)
    pid_q = pid % n_qblocks
    pid_n = pid // n_qblocks
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_q = offs_q < Q
    mask_n = offs_n < N
    offs_q64 = offs_q.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    # Output pointer tiles are rebuilt from 1-D offsets at every store (base pointer first, then the broadcast):
    # a [BLOCK_Q, BLOCK_N] int64 tile kept live across the row loop costs 64 registers per thread.
    row_qn = offs_q64 * N

    if MODE != 2:
        d = _row_distance(
            q_ptr, g_ptr, qsq_ptr, gsq_ptr, 0, offs_q, offs_n, mask_q, mask_n, C,
            stride_qq, stride_qr, stride_qc, stride_gn, stride_gr, stride_gc, stride_qsq, stride_gsq,
            BLOCK_Q, BLOCK_N, BLOCK_K, HAS_GSQ, DOT_F32, PRECISION,
        )  # fmt: skip
        if MODE == 0:
            tl.store((d_ptr + row_qn[:, None]) + offs_n64[None, :], d, mask=mask_q[:, None] & mask_n[None, :])
        score = d
    if MODE != 1:
        total = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        wsum = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        col_dk = offs_n64 * stride_dkn
        for r in range(1, M + 1):
            dist = _row_distance(
                q_ptr, g_ptr, qsq_ptr, gsq_ptr, r, offs_q, offs_n, mask_q, mask_n, C,
                stride_qq, stride_qr, stride_qc, stride_gn, stride_gr, stride_gc, stride_qsq, stride_gsq,
                BLOCK_Q, BLOCK_N, BLOCK_K, HAS_GSQ, DOT_F32, PRECISION,
            )  # fmt: skip
            total += dist
            if HAS_W:
                wsum += tl.load(w_ptr + r - 1) * dist
            if MODE == 0:
                row_dk = offs_q64 * stride_dkq + (r - 1) * stride_dkm
                tl.store((dk_ptr + row_dk[:, None]) + col_dk[None, :], dist, mask=mask_q[:, None] & mask_n[None, :])
        if HAS_W:
            score = wsum
        if MODE == 0:
            mask = mask_q[:, None] & mask_n[None, :]
            tl.store((dhat_ptr + row_qn[:, None]) + offs_n64[None, :], total / M, mask=mask)
            if HAS_W:
                tl.store((score_ptr + row_qn[:, None]) + offs_n64[None, :], wsum, mask=mask)
            # Shares need Σ_j d_j, known only now: re-read this program's own d_k (L2-hot) after a block barrier.
            tl.debug_barrier()
            positive = total > 0.0
            denom = tl.where(positive, total, 1.0)
            col_sh = offs_n64 * stride_shn
            for r in range(1, M + 1):
                row_dk = offs_q64 * stride_dkq + (r - 1) * stride_dkm
                dist = tl.load((dk_ptr + row_dk[:, None]) + col_dk[None, :], mask=mask, other=0.0)
                row_sh = offs_q64 * stride_shq + (r - 1) * stride_shm
                share = tl.where(positive, dist / denom, 1.0 / M)
                tl.store((sh_ptr + row_sh[:, None]) + col_sh[None, :], share, mask=mask)

    if MODE != 0:
        # NaN scores (unchecked non-finite gallery items) rank first so that explaining the top-k reports them.
        score = tl.where(score != score, float("-inf"), score)
        score = tl.where(mask_n[None, :], score, float("inf"))
        bits = score.to(tl.int32, bitcast=True)
        # Flipping the magnitude bits of negative floats makes signed-integer order equal float order.
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (ordered.to(tl.int64) << 32) | offs_n.to(tl.int64)[None, :]
        if TOPK_P < BLOCK_N:
            # tl.topk keeps the largest (Triton 3.6 has no descending=): ~ reverses the int64 order exactly.
            key = ~tl.topk(~key, TOPK_P, dim=1)
        else:
            key = tl.sort(key, dim=1)
        cols = tl.arange(0, TOPK_P)
        n_nblocks = tl.cdiv(N, BLOCK_N)
        key_off = offs_q.to(tl.int64)[:, None] * (n_nblocks * TOPK_W) + pid_n * TOPK_W + cols[None, :]
        tl.store(key_ptr + key_off, key, mask=mask_q[:, None] & (cols[None, :] < TOPK_W))


def _scan_configs(block_ns: tuple[int, ...] | None) -> list[triton.Config]:
    """Autotuning space; ``block_ns`` None leaves BLOCK_N to the launcher (top-k: the partial buffer depends on it)."""
    return [
        triton.Config({"BLOCK_K": bk} | ({} if block_ns is None else {"BLOCK_N": bn}), num_warps=w, num_stages=s)
        for bn in block_ns or (0,)
        for bk in (32, 64, 128)
        for w in (4, 8)
        for s in (3, 4)
    ]


_SCAN_KEY = ["C", "M", "N_BUCKET", "BLOCK_Q", "MODE", "HAS_W", "HAS_GSQ"]
# Full matrix: BLOCK_N is tuned too (128 amortises query reads better, 64 keeps the epilogue's tiles in registers).
_scan_full_tuned = triton.autotune(configs=_scan_configs((64, 128)), key=_SCAN_KEY)(_scan_kernel)
_scan_topk_tuned = triton.autotune(configs=_scan_configs(None), key=[*_SCAN_KEY, "BLOCK_N", "TOPK_W"])(_scan_kernel)


@triton.jit
def _explain_kernel(
    q_ptr, g_ptr, ids_ptr, w_ptr, d_ptr, dk_ptr, sh_ptr, dhat_ptr, score_ptr, err_ptr,
    K, N, C, M,
    stride_qq, stride_qr, stride_qc, stride_gn, stride_gr, stride_gc, stride_iq, stride_ik,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr,
):  # fmt: skip
    """One program per (query, gallery id) pair: all M+1 rows at once, direct differences, fused epilogue.

    Outputs are contiguous ``[Q, K]`` / ``[Q, K, M]``. An id outside [0, N) is not read (its outputs are NaN); it and
    any non-finite result increment the ``err_ptr`` counter, so the launcher validates with a single 4-byte read.
    """
    pid = tl.program_id(0)
    qi = pid // K
    j = pid % K
    gid = tl.load(ids_ptr + qi * stride_iq + j * stride_ik).to(tl.int64)
    valid = (gid >= 0) & (gid < N)
    gid = tl.where(valid, gid, 0)
    rows = tl.arange(0, BLOCK_R)
    mask_r = rows < M + 1
    q_rows = q_ptr + qi.to(tl.int64) * stride_qq + rows[:, None] * stride_qr
    g_rows = g_ptr + gid * stride_gn + rows[:, None] * stride_gr
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = mask_r[:, None] & (offs_c < C)[None, :]
        qv = tl.load(q_rows + offs_c[None, :] * stride_qc, mask=m, other=0.0).to(tl.float32)
        gv = tl.load(g_rows + offs_c[None, :] * stride_gc, mask=m, other=0.0).to(tl.float32)
        diff = qv - gv
        acc += diff * diff
    dist = tl.sqrt(tl.sum(acc, axis=1))
    is_attr = (rows >= 1) & mask_r
    dk = tl.where(is_attr, dist, 0.0)
    total = tl.sum(dk, axis=0)
    d = tl.sum(tl.where(rows == 0, dist, 0.0), axis=0)
    positive = total > 0.0
    shares = tl.where(positive, dk / tl.where(positive, total, 1.0), 1.0 / M)
    if HAS_W:
        w = tl.load(w_ptr + rows - 1, mask=is_attr, other=0.0)
        score = tl.sum(w * dk, axis=0)
    else:
        score = d
    inf = float("inf")
    bad = ~valid | ~(tl.abs(d) < inf) | ~(tl.abs(total) < inf) | ~(tl.abs(score) < inf)
    tl.atomic_add(err_ptr, 1, mask=bad)
    nan = float("nan")
    out = pid.to(tl.int64)
    tl.store(d_ptr + out, tl.where(valid, d, nan))
    tl.store(dhat_ptr + out, tl.where(valid, total / M, nan))
    tl.store(score_ptr + out, tl.where(valid, score, nan))
    tl.store(dk_ptr + out * M + rows - 1, tl.where(valid, dk, nan), mask=is_attr)
    tl.store(sh_ptr + out * M + rows - 1, tl.where(valid, shares, nan), mask=is_attr)


# ---------------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------------


def _check_pair(q: torch.Tensor, g: torch.Tensor, op: str) -> tuple[int, int, int, int]:
    """Check the [Q, M+1, C] / [N, M+1, C] contract and return (Q, N, M, C)."""
    for name, t in (("q", q), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            want = "[Q, M+1, C]" if name == "q" else "[N, M+1, C]"
            raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if q.shape[1:] != g.shape[1:]:
        raise ValueError(
            f"{op}: q {tuple(q.shape)} and g {tuple(g.shape)} disagree on (M+1, C); both must be [*, M+1, C]"
        )
    if q.shape[1] < 2:
        raise ValueError(f"{op}: need the global row and at least one attribute row (M+1 >= 2), got {q.shape[1]}")
    if q.shape[0] == 0 or g.shape[0] == 0 or q.shape[2] == 0:
        raise ValueError(f"{op}: empty input: q {tuple(q.shape)}, g {tuple(g.shape)}")
    if q.device != g.device:
        raise ValueError(f"{op}: q is on {q.device} but g is on {g.device}")
    return q.shape[0], g.shape[0], q.shape[1] - 1, q.shape[2]


def _check_triton_inputs(q: torch.Tensor, g: torch.Tensor, op: str) -> None:
    if g.dtype not in _GALLERY_DTYPES:
        raise TypeError(f"{op}: gallery dtype must be float32, float16 or bfloat16, got {g.dtype}")
    if q.dtype not in _QUERY_DTYPES:
        raise TypeError(f"{op}: query dtype must be float32, float16 or bfloat16, got {q.dtype}")
    if g.device.type != "cuda" and not (_INTERPRET and g.device.type == "cpu"):
        raise RuntimeError(
            f"{op}: the Triton kernel needs CUDA tensors, got {g.device}; set TRITON_INTERPRET=1 before importing "
            "attrimeter.kernels to run it on the CPU for debugging, or use the pure-torch reference"
        )


def _weights(
    weights: Weights | None, m: int, dtype: torch.dtype, device: torch.device, op: str
) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, str]]]:
    """Optional weights as a contiguous [M] tensor (shape checked here) and the device-side checks of their values.

    The checks (finite, >= 0, not all 0) are raised by :func:`_raise_failed` with the caller's others: one transfer.
    """
    if weights is None:
        return None, []
    w = torch.as_tensor(weights, dtype=dtype, device=device).contiguous()
    if w.shape != (m,):
        raise ValueError(f"{op}: weights must have shape [M] = [{m}], got {tuple(w.shape)}")
    return w, [
        (torch.isfinite(w).all(), f"{op}: weights contain NaN or inf"),
        ((w >= 0).all(), f"{op}: weights must be >= 0 (an attribute-weighted distance), got a negative weight"),
        ((w > 0).any(), f"{op}: weights are all zero; give at least one attribute a positive weight"),
    ]


def _raise_failed(checks: list[tuple[torch.Tensor, str]]) -> None:
    """Raise ValueError with the message of the first failing check; one device-to-host transfer for all of them."""
    if not checks:
        return
    if len(checks) == 1:
        passed = [bool(checks[0][0])]
    else:
        passed = torch.stack([c.reshape(()) for c, _ in checks]).tolist()
    for ok, (_, message) in zip(passed, checks, strict=True):
        if not ok:
            raise ValueError(message)


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-item finiteness [len(t)] of a [n, ...] tensor, chunked so the temporary stays small."""
    step = max(1, _FINITE_CHUNK // max(1, t[0].numel()))
    return torch.cat([torch.isfinite(t[i : i + step]).flatten(1).all(1) for i in range(0, t.shape[0], step)])


def _first_bad(mask: torch.Tensor, limit: int = 5) -> list[int]:
    return torch.nonzero(mask).flatten()[:limit].tolist()


def _launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_out_tensor(t: object, name: str, shape: tuple[int, ...], device: torch.device, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: out.{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != device:
        raise ValueError(
            f"{op}: out.{name} must be float32 {list(shape)} on {device}, got {t.dtype} {list(t.shape)} on {t.device}"
        )
    return t


# ---------------------------------------------------------------------------------------------------------------------
# Pure-torch references
# ---------------------------------------------------------------------------------------------------------------------


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(max(x, 0)) with a zero (not NaN) gradient where x <= 0."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _decompose(dist: torch.Tensor, w: torch.Tensor | None, indices: torch.Tensor | None = None) -> AttrDistances:
    """Epilogue shared by the references: ``dist [..., M+1]`` (row 0 global) to :class:`AttrDistances`."""
    m = dist.shape[-1] - 1
    d = dist[..., 0]
    d_k = dist[..., 1:]
    total = d_k.sum(-1, keepdim=True)
    positive = total > 0
    shares = torch.where(positive, d_k / torch.where(positive, total, torch.ones_like(total)), 1.0 / m)
    d_hat = total.squeeze(-1) / m
    scores = d if w is None else d_k @ w
    return AttrDistances(d=d, d_k=d_k, shares=shares, d_hat=d_hat, scores=scores, indices=indices)


def _reference_setup(
    q: torch.Tensor, g: torch.Tensor, weights: Weights | None, op: str
) -> tuple[int, torch.dtype, torch.Tensor | None]:
    """Validate a reference call; return (N, compute dtype ``promote(q, g, float32)``, weights or None)."""
    _, n, m, _ = _check_pair(q, g, op)
    dtype = torch.promote_types(torch.promote_types(q.dtype, g.dtype), torch.float32)
    w, checks = _weights(weights, m, dtype, q.device, op)
    _raise_failed(checks)
    return n, dtype, w


def attr_distance_reference(q: torch.Tensor, g: torch.Tensor, weights: Weights | None = None) -> AttrDistances:
    """Full distance matrix and decomposition in pure torch (differentiable, any device).

    Batched GEMMs ``‖a‖² + ‖b‖² − 2ab`` over the M+1 rows, computed in ``promote(q, g, float32)`` (pass float64 inputs
    for a float64 reference), clamped at 0; the square root has a zero gradient at 0. Non-finite inputs propagate.

    Args:
        q: Query embeddings ``[Q, M+1, C]`` (row 0 global, rows 1..M per attribute).
        g: Gallery embeddings ``[N, M+1, C]``.
        weights: Optional non-negative attribute weights ``[M]`` for ``scores = Σ_k w_k d_k``.

    Returns:
        :class:`AttrDistances` with ``[Q, N]`` and ``[Q, N, M]`` fields; ``indices`` is None.

    Raises:
        TypeError: If an input is not a floating-point tensor.
        ValueError: On inconsistent shapes or devices, or invalid weights.
    """
    _, dtype, w = _reference_setup(q, g, weights, "attr_distance_reference")
    qf, gf = q.to(dtype), g.to(dtype)
    # Norms on the stored layout (contiguous reductions), the cross terms as one GEMM per row of the M+1 axis.
    norms = qf.square().sum(-1).T[:, :, None] + gf.square().sum(-1).T[:, None, :]  # [M+1, Q, N]
    cross = torch.bmm(qf.transpose(0, 1), gf.permute(1, 2, 0))  # [M+1, Q, C] x [M+1, C, N]
    return _decompose(_safe_sqrt(norms - 2.0 * cross).permute(1, 2, 0), w)


def attr_distance_naive(q: torch.Tensor, g: torch.Tensor, weights: Weights | None = None) -> AttrDistances:
    """The authors' way: one ``torch.cdist`` per row of the M+1 axis, each on an fp32 copy of that gallery slice.

    A benchmark baseline; same contract and result as :func:`attr_distance_reference` (up to fp32 rounding).

    Args:
        q: Query embeddings ``[Q, M+1, C]``.
        g: Gallery embeddings ``[N, M+1, C]``.
        weights: Optional non-negative attribute weights ``[M]``.

    Returns:
        :class:`AttrDistances` with ``[Q, N]`` and ``[Q, N, M]`` fields.

    Raises:
        TypeError: If an input is not a floating-point tensor.
        ValueError: On inconsistent shapes or devices, or invalid weights.
    """
    _, dtype, w = _reference_setup(q, g, weights, "attr_distance_naive")
    dist = torch.stack([torch.cdist(q[:, r].to(dtype), g[:, r].to(dtype)) for r in range(q.shape[1])], dim=-1)
    return _decompose(dist, w)


def _check_ids(ids: object, q_rows: int, device: torch.device, op: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[0] != q_rows or ids.shape[1] == 0:
        raise ValueError(f"{op}: ids must be [Q, k] = [{q_rows}, k >= 1], got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: ids must be int32 or int64, got {ids.dtype}")
    if ids.device != device:
        raise ValueError(f"{op}: ids are on {ids.device} but the embeddings are on {device}")
    return ids


def _raise_bad_ids(ids: torch.Tensor, n: int, op: str) -> None:
    bad = (ids < 0) | (ids >= n)
    if bool(bad.any()):
        pos = torch.nonzero(bad)[0].tolist()
        raise ValueError(f"{op}: ids[{pos[0]}, {pos[1]}] = {int(ids[pos[0], pos[1]])} is not a gallery id (N = {n})")


def explain_topk_reference(
    q: torch.Tensor, g: torch.Tensor, ids: torch.Tensor, weights: Weights | None = None
) -> AttrDistances:
    """Decomposition for each query and its gallery ids, by gathering and direct differences (pure torch).

    Args:
        q: Query embeddings ``[Q, M+1, C]``.
        g: Gallery embeddings ``[N, M+1, C]``.
        ids: Gallery ids ``[Q, k]`` (int32/int64), e.g. a top-k result; repeats are allowed.
        weights: Optional non-negative attribute weights ``[M]`` for ``scores``.

    Returns:
        :class:`AttrDistances` with ``[Q, k]`` / ``[Q, k, M]`` fields and ``indices = ids``.

    Raises:
        TypeError: On wrong input types or dtypes.
        ValueError: On inconsistent shapes or devices, an id outside [0, N), or invalid weights.
    """
    op = "explain_topk_reference"
    n, dtype, w = _reference_setup(q, g, weights, op)
    _check_ids(ids, q.shape[0], q.device, op)
    _raise_bad_ids(ids, n, op)
    diff = q.to(dtype)[:, None] - g[ids.long()].to(dtype)  # [Q, k, M+1, C]
    return _decompose(_safe_sqrt(diff.square().sum(-1)), w, indices=ids)


# ---------------------------------------------------------------------------------------------------------------------
# Triton launchers
# ---------------------------------------------------------------------------------------------------------------------


def _scan_blocks(q_rows: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_Q, query blocks, BLOCK_N of the top-k scan)."""
    block_q = max(16, min(_MAX_QUERY_BLOCK, triton.next_power_of_2(q_rows)))
    n_qblocks = triton.cdiv(q_rows, block_q)
    if _INTERPRET:
        return block_q, n_qblocks, 32
    # Wide gallery blocks amortise the per-program query reads (fp32's 3xTF32 operands need the registers of a
    # narrower one); narrow them only when the grid would not fill the GPU.
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    block_n = 64 if dtype == torch.float32 else 128
    while block_n > 32 and n_qblocks * triton.cdiv(n, block_n) < 2 * n_sm:
        block_n //= 2
    return block_q, n_qblocks, block_n


def _check_out(out: object, q_rows: int, n: int, m: int, device: torch.device, weighted: bool) -> AttrDistances:
    op = "attr_distance"
    if not isinstance(out, AttrDistances):
        raise TypeError(f"{op}: out must be an AttrDistances, got {type(out).__name__}")
    if out.indices is not None:
        raise ValueError(f"{op}: out.indices must be None (out is for the full matrix)")
    for name in ("d", "d_hat") + (("scores",) if weighted else ()):
        t = _check_out_tensor(getattr(out, name), name, (q_rows, n), device, op)
        if not t.is_contiguous():
            raise ValueError(f"{op}: out.{name} must be contiguous")
    for name in ("d_k", "shares"):
        _check_out_tensor(getattr(out, name), name, (q_rows, n, m), device, op)
    return out


def attr_distance(
    q: torch.Tensor,
    g: torch.Tensor,
    *,
    g_sqnorm: torch.Tensor | None = None,
    topk: int | None = None,
    weights: Weights | None = None,
    out: AttrDistances | None = None,
    check_finite: bool = True,
) -> AttrDistances:
    """Per-attribute distances of every query to every gallery item (Triton), or the explained top-k.

    Without ``topk``: the full decomposition, ``d, d_hat, scores [Q, N]`` and ``d_k, shares [Q, N, M]``. The kernel
    writes ``d_k``/``shares`` in ``[Q, M, N]`` storage (coalesced stores) and returns ``[Q, N, M]`` views of it; when
    no weights are given ``scores`` is ``d`` itself.

    With ``topk=k``: the k gallery items with the smallest ``scores`` per query, ascending (ties broken by the lower
    id), as ``indices`` and ``scores [Q, k]``, and their decomposition ``[Q, k(, M)]`` recomputed exactly by
    :func:`explain_topk`. The scan then reads only the rows the score needs and never materialises ``[Q, N, M]``.

    Args:
        q: Query embeddings ``[Q, M+1, C]`` (float32/16, bfloat16); rounded to the gallery dtype for the scan's GEMM.
        g: Gallery embeddings ``[N, M+1, C]``, float16/bfloat16 (fast) or float32, on the GPU. Any strides.
        g_sqnorm: Optional precomputed ``‖g_r‖²`` ``[N, M+1]`` float32 (a gallery store keeps them); otherwise the
            scan computes them from the tiles it reads anyway.
        topk: Number of nearest gallery items per query (1 <= topk <= N), or None for the full matrix.
        weights: Optional non-negative attribute weights ``[M]`` (not all zero): rank by ``Σ_k w_k d_k``.
        out: Optional preallocated float32 outputs for the full matrix (``d``, ``d_hat`` and, with weights,
            ``scores`` contiguous ``[Q, N]``; ``d_k``, ``shares`` ``[Q, N, M]`` of any strides; ``indices`` None).
        check_finite: Check the gallery rows the scan reads for NaN/inf first (one extra read of them). Queries,
            weights and ``g_sqnorm`` are always checked, and top-k results are validated by their explain step. A
            gallery store that validates on insert passes False; unchecked non-finite items then give NaN
            distances (never 0) and rank first in a top-k, whose explain step reports them.

    Returns:
        :class:`AttrDistances`.

    Raises:
        TypeError: On wrong types or dtypes.
        ValueError: On inconsistent shapes or devices, non-finite inputs (naming the rows), invalid weights or k.
        RuntimeError: On CPU tensors unless ``TRITON_INTERPRET=1`` was set when this module was imported.
    """
    op = "attr_distance"
    q_rows, n, m, c = _check_pair(q, g, op)
    _check_triton_inputs(q, g, op)
    device = g.device
    qc = q if q.dtype == g.dtype else q.to(g.dtype)  # what the scan's GEMM sees
    overflow = "" if qc.dtype == torch.float32 or q.dtype == qc.dtype else f" (or values beyond {qc.dtype}'s range)"
    w, checks = _weights(weights, m, torch.float32, device, op)
    checks.insert(0, (torch.isfinite(qc).all(), f"{op}: q contains NaN or inf{overflow}"))
    if g_sqnorm is not None:
        if not isinstance(g_sqnorm, torch.Tensor) or g_sqnorm.shape != (n, m + 1) or g_sqnorm.dtype != torch.float32:
            got = f"{g_sqnorm.dtype} {list(g_sqnorm.shape)}" if isinstance(g_sqnorm, torch.Tensor) else type(g_sqnorm)
            raise ValueError(f"{op}: g_sqnorm must be float32 [N, M+1] = [{n}, {m + 1}], got {got}")
        if g_sqnorm.device != device:
            raise ValueError(f"{op}: g_sqnorm is on {g_sqnorm.device} but g is on {device}")
        checks.append((torch.isfinite(g_sqnorm).all(), f"{op}: g_sqnorm contains NaN or inf"))
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= n:
            raise ValueError(f"{op}: topk must be an int in [1, N = {n}], got {topk!r}")
        if out is not None:
            raise ValueError(f"{op}: out is only for the full matrix (topk=None)")
    elif out is not None:
        out = _check_out(out, q_rows, n, m, device, w is not None)
    mode = 0 if topk is None else (1 if w is None else 2)
    # Only the rows the scan reads matter: the explain step validates the chosen items in full.
    g_finite = _finite_rows(g[:, (slice(None), slice(0, 1), slice(1, None))[mode]]) if check_finite else None
    gallery_message = f"{op}: gallery items contain NaN or inf"
    if g_finite is not None:
        checks.append((g_finite.all(), gallery_message))
    try:
        _raise_failed(checks)
    except ValueError as err:
        if g_finite is not None and str(err) == gallery_message:
            raise ValueError(f"{op}: gallery items {_first_bad(~g_finite)} (first ones) contain NaN or inf") from None
        raise

    qsq = qc.float().square().sum(-1).contiguous()  # [Q, M+1], from the rounded queries: q = g cancels exactly
    block_q, n_qblocks, block_n = _scan_blocks(q_rows, n, g.dtype, device)
    topk_w = 0 if topk is None else min(topk, block_n)
    f32 = {"dtype": torch.float32, "device": device}
    if mode == 0:
        if out is None:
            out = AttrDistances(
                d=torch.empty(q_rows, n, **f32),
                d_k=torch.empty(q_rows, m, n, **f32).transpose(1, 2),
                shares=torch.empty(q_rows, m, n, **f32).transpose(1, 2),
                d_hat=torch.empty(q_rows, n, **f32),
                scores=torch.empty(q_rows, n, **f32) if w is not None else torch.empty(0, **f32),
            )
        keys = torch.empty(1, dtype=torch.int64, device=device)
        outputs = (out.d, out.d_k, out.shares, out.d_hat, out.scores)
        out_strides = (*out.d_k.stride(), *out.shares.stride())
    else:
        keys = torch.empty(q_rows, triton.cdiv(n, block_n) * topk_w, dtype=torch.int64, device=device)
        outputs = (qsq,) * 5  # unused by the top-k modes
        out_strides = (0,) * 6
    # The kernel indexes the norms as [n * stride + r]: a transposed view would be read wrongly.
    gsq_t = g_sqnorm.contiguous() if g_sqnorm is not None else qsq
    args = (
        qc, g, qsq, gsq_t, w if w is not None else qsq, *outputs, keys,
        q_rows, n, c, m, n_qblocks, n.bit_length(),
        *qc.stride(), *g.stride(), qsq.stride(0), gsq_t.stride(0), *out_strides,
    )  # fmt: skip
    meta = {
        "BLOCK_Q": block_q,
        "MODE": mode,
        "HAS_W": w is not None,
        "HAS_GSQ": g_sqnorm is not None,
        "TOPK_W": topk_w,
        "TOPK_P": 1 if topk is None else min(triton.next_power_of_2(topk_w), block_n),
        "DOT_F32": _INTERPRET and g.dtype == torch.bfloat16,
        "PRECISION": "tf32x3" if g.dtype == torch.float32 and not _INTERPRET else "ieee",
    }
    with _launch_device(g):
        if _INTERPRET:
            grid = (n_qblocks * triton.cdiv(n, block_n),)
            _scan_kernel[grid](*args, BLOCK_N=block_n, BLOCK_K=32, **meta)
        elif mode == 0:
            _scan_full_tuned[lambda cfg: (n_qblocks * triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **meta)
        else:
            _scan_topk_tuned[(n_qblocks * triton.cdiv(n, block_n),)](*args, BLOCK_N=block_n, **meta)

    if out is not None:
        return out._replace(scores=out.scores if w is not None else out.d)
    best = torch.topk(keys, topk, dim=1, largest=False, sorted=True).values
    indices = best & 0xFFFFFFFF
    ordered = (best >> 32).to(torch.int32)
    scores = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    explained = explain_topk(q, g, indices, weights=w)
    return explained._replace(scores=scores)


def explain_topk(
    q: torch.Tensor,
    g: torch.Tensor,
    ids: torch.Tensor,
    weights: Weights | None = None,
    *,
    out: AttrDistances | None = None,
) -> AttrDistances:
    """Decomposition for each query and its gallery ids (Triton gather-and-explain).

    One program per (query, id) pair reads the M+1 rows of both embeddings once and computes direct differences in
    fp32 (no cancellation), then the epilogue. Validation costs one device-to-host transfer, after the launch: ids
    outside [0, N) are never read, and a non-finite output is traced back to its query or gallery item.

    Args:
        q: Query embeddings ``[Q, M+1, C]`` (float32/16, bfloat16; used at full precision).
        g: Gallery embeddings ``[N, M+1, C]`` (float32/16, bfloat16), any strides.
        ids: Gallery ids ``[Q, k]`` (int32/int64), e.g. from a search; repeats are allowed.
        weights: Optional non-negative attribute weights ``[M]`` (not all zero) for ``scores``.
        out: Optional preallocated contiguous float32 outputs (``d``, ``d_hat``, ``scores`` ``[Q, k]``; ``d_k``,
            ``shares`` ``[Q, k, M]``); ``out.indices`` is ignored.

    Returns:
        :class:`AttrDistances` with ``[Q, k]`` / ``[Q, k, M]`` fields and ``indices = ids``.

    Raises:
        TypeError: On wrong types or dtypes.
        ValueError: On inconsistent shapes or devices, an id outside [0, N), non-finite embeddings, invalid weights.
        RuntimeError: On CPU tensors unless ``TRITON_INTERPRET=1`` was set when this module was imported.
    """
    op = "explain_topk"
    q_rows, n, m, c = _check_pair(q, g, op)
    _check_triton_inputs(q, g, op)
    _check_ids(ids, q_rows, g.device, op)
    device = g.device
    k = ids.shape[1]
    w, checks = _weights(weights, m, torch.float32, device, op)
    if out is None:
        f32 = {"dtype": torch.float32, "device": device}
        res = AttrDistances(
            d=torch.empty(q_rows, k, **f32),
            d_k=torch.empty(q_rows, k, m, **f32),
            shares=torch.empty(q_rows, k, m, **f32),
            d_hat=torch.empty(q_rows, k, **f32),
            scores=torch.empty(q_rows, k, **f32),
            indices=ids,
        )
    else:
        if not isinstance(out, AttrDistances):
            raise TypeError(f"{op}: out must be an AttrDistances, got {type(out).__name__}")
        pair, per_attr = (q_rows, k), (q_rows, k, m)
        shapes = {"d": pair, "d_k": per_attr, "shares": per_attr, "d_hat": pair, "scores": pair}
        for name, shape in shapes.items():
            if not _check_out_tensor(getattr(out, name), name, shape, device, op).is_contiguous():
                raise ValueError(f"{op}: out.{name} must be contiguous")
        res = out._replace(indices=ids)
    w_t = w if w is not None else res.d
    errors = torch.zeros(1, dtype=torch.int32, device=device)
    block_r = triton.next_power_of_2(m + 1)
    with _launch_device(g):
        _explain_kernel[(q_rows * k,)](
            q, g, ids, w_t, res.d, res.d_k, res.shares, res.d_hat, res.scores, errors,
            k, n, c, m, *q.stride(), *g.stride(), *ids.stride(),
            BLOCK_R=block_r, BLOCK_C=64 if _INTERPRET else 128, HAS_W=w is not None,
            num_warps=4 if block_r <= 32 else 8,
        )  # fmt: skip
    result_message = f"{op}: non-finite result"
    checks.append((errors == 0, result_message))
    try:
        _raise_failed(checks)
    except ValueError as err:
        if str(err) != result_message:
            raise
        # Slow path, only on failure: name the culprit.
        _raise_bad_ids(ids, n, op)
        q_ok = _finite_rows(q)
        if not bool(q_ok.all()):
            raise ValueError(f"{op}: queries {_first_bad(~q_ok)} contain NaN or inf") from None
        bad = ~(torch.isfinite(res.d) & torch.isfinite(res.d_k).all(-1) & torch.isfinite(res.scores))
        items = torch.unique(ids[bad].long())
        nonfinite = items[~_finite_rows(g[items])]
        if len(nonfinite):
            raise ValueError(f"{op}: gallery items {nonfinite[:5].tolist()} contain NaN or inf") from None
        raise ValueError(f"{op}: distances to gallery items {items[:5].tolist()} overflow float32") from None
    return res
