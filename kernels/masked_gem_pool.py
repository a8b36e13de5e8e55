r"""Fused masked GeM pooling (docs/architecture.md §3, factorised pooling, §4).

Given a post-ReLU feature map ``F`` [B, C, H, W], attention logits ``Z`` [B, M, H, W] and the target's frozen GeM
exponent ``p`` and folded BN-neck affine (``scale``, ``shift``), computes the global embedding ``f`` [B, C] and the
per-attribute embeddings ``f_k`` [B, M, C].

**Direct definition** (the authors' code, :func:`masked_gem_pool_naive`), with ``A_k = qexp(Z_k)``::

    f_k[c] = scale[c] * (mean_hw max(A_k[hw] * F[c, hw], eps)^p)^(1/p) + shift[c]
    f[c]   = scale[c] * (mean_hw max(F[c, hw], eps)^p)^(1/p) + shift[c]

It materialises ``F ⊙ A_k`` ([B, M, C, H, W]) and takes M·C·HW powers.

**What the kernel and :func:`masked_gem_pool_reference` compute** (the factorised form)::

    S[b, k, c] = (1/HW) · Σ_hw P[b, k, hw] · G[b, c, hw]      (one (M+1)×HW×C matrix product per image)
    P[b, 0, hw] = 1,  P[b, k, hw] = qexp(Z[b, k-1, hw])^p      (row 0 is the global embedding: A ≡ 1)
    G[b, c, hw] = max(F[b, c, hw], eps)^p
    out[b, k, c] = scale[c] · max(S[b, k, c], eps^p)^(1/p) + shift[c]

Row 0 equals the direct global GeM exactly. For the attribute rows, a term of the direct sum equals the factorised
term ``A^p · max(F, eps)^p`` whenever ``F ≥ eps`` and ``A·F ≥ eps``; otherwise both lie below
``eps^p · max(1, A)^p``. So the two means differ by at most ``eps^p · max(1, max_hw A)^p``: agreement to fp32
rounding in norm (``‖out − ref‖ / ‖ref‖``), except a channel that is entirely below ``eps``, which the direct form
pools to exactly ``eps`` and the factorised form to ``eps · max(1, (mean_hw A^p)^(1/p))`` (e.g. 1.0e-6 vs 1.4e-6).
The final ``max(·, eps^p)`` keeps the factorised result ≥ eps like the direct one (it matters when A ≈ 0).
Negative ``F`` is clamped to ``eps`` in both forms, so it is treated consistently; NaN in ``F`` or ``Z`` propagates
to the outputs it touches (the clamps are written so as not to swallow it).

Layers (Liger-Kernel layout): ``@triton.jit`` kernels → launchers (:func:`masked_gem_pool_forward`) →
``torch.autograd.Function`` (:func:`masked_gem_pool`), plus the torch references. Precision: the kernel reads
fp32/fp16/bf16, computes powers and accumulates in fp32, and writes the outputs in
``torch.promote_types(F.dtype, Z.dtype)``. For fp16/bf16 outputs the products run in TF32 on the tensor cores (the
outputs' own rounding dominates); for fp32 outputs in IEEE fp32 (forward) and 3xTF32 (backward), see
``_dot_precision``. Integer ``p`` in {1, 2, 3, 4} is specialised to multiplications (and the 1/p root to sqrt where it
can); other ``p`` use ``exp2(p·log2(x))`` on clamped ``x``. Autotuned over block sizes, warps and stages, keyed on
(C, HW, M, p); under ``TRITON_INTERPRET=1`` a single config is used (no tuning).

Backward (Triton, :class:`MaskedGemPoolFunction`): with ``gS = dL/dS`` (elementwise, in torch, [B, M+1, C]), one
kernel per (image, HW-block) loops over C, rebuilding ``G`` from ``F`` in registers, and computes
``dL/dP = gS · G`` (a tensor-core product) → ``dL/dZ = dL/dP · p · P · dlog(qexp)/dz``, and, only when ``F`` requires
grad, ``dL/dF = (gSᵀ · P) · p · F^(p-1) · [F ≥ eps]``. No [B, M, C, HW] intermediate exists in either direction.

Why one module of ~800 lines: kernel, launcher, autograd function and references are one contract
(docs/architecture.md §4) and change together (the backward kernel mirrors the forward's factorisation, the
references define what both must compute); the references and the launcher share one input validation; and the
export's AOT step compiles the forward kernel by this module's import path (``export/aot.py``), so the module path is
part of the export contract.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from attrimeter.kernels import check_triton, integer_exponent

check_triton(triton)

__all__ = [
    "MaskedGemPoolFunction",
    "masked_gem_pool",
    "masked_gem_pool_forward",
    "masked_gem_pool_naive",
    "masked_gem_pool_reference",
    "qexp",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FP32_TINY = torch.finfo(torch.float32).tiny


# Triton picks compiled vs interpreted kernels when they are decorated, i.e. at import of this module; the device
# check must agree with that choice, not with the environment variable as it is later.
_INTERPRET: bool = bool(triton.knobs.runtime.interpret)


# --------------------------------------------------------------------------------------------------------------------
# Input validation (shared by the references and the kernel launcher)
# --------------------------------------------------------------------------------------------------------------------


def _check_inputs(
    F: Tensor, Z: Tensor, p: float, eps: float, scale: Tensor | None, shift: Tensor | None
) -> tuple[float, float]:
    """Validate shapes, dtypes and scalars; return ``(p, eps)`` as python floats."""
    if not isinstance(F, Tensor) or not isinstance(Z, Tensor):
        raise TypeError(f"F and Z must be torch tensors, got {type(F).__name__} and {type(Z).__name__}")
    if F.dim() != 4:
        raise ValueError(f"F must be 4-D [B, C, H, W], got shape {tuple(F.shape)}")
    if Z.dim() != 4:
        raise ValueError(f"Z must be 4-D [B, M, H, W], got shape {tuple(Z.shape)}")
    B, C, H, W = F.shape
    if Z.shape[0] != B or Z.shape[2:] != F.shape[2:]:
        raise ValueError(
            f"Z {tuple(Z.shape)} does not match F {tuple(F.shape)}: expected [B={B}, M, H={H}, W={W}]"
        )
    if min(B, C, H, W, Z.shape[1]) == 0:
        raise ValueError(f"empty dimension: F {tuple(F.shape)}, Z {tuple(Z.shape)} (need B, C, M, H, W ≥ 1)")
    if not F.is_floating_point() or not Z.is_floating_point():
        raise TypeError(f"F and Z must be floating point, got {F.dtype} and {Z.dtype}")
    if F.device != Z.device:
        raise ValueError(f"F and Z are on different devices: {F.device} and {Z.device}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor or None")
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name} must have shape [C={C}], got {tuple(t.shape)}")
        if t.device != F.device:
            raise ValueError(f"{name} is on {t.device} but F is on {F.device}")
    if isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(f"p must be a python number (use float(p) for a tensor), got {type(p).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"eps must be a python number, got {type(eps).__name__}")
    p, eps = float(p), float(eps)
    if not math.isfinite(p) or p < 1.0:
        raise ValueError(f"p must be finite and >= 1, got {p}")
    if not math.isfinite(eps) or eps <= 0.0:
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    if eps**p < _FP32_TINY:
        raise ValueError(
            f"eps**p = {eps**p:.3g} underflows float32 (eps={eps}, p={p}): use a larger eps or a smaller p"
        )
    return p, eps


# --------------------------------------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------------------------------------


def qexp(z: Tensor) -> Tensor:
    """Attention activation of the attribute maps: ``exp(z)`` for ``z < 0``, ``sqrt(1 + z)`` otherwise.

    Both branches are evaluated (``torch.where``), so each one's argument is clamped to its own half-line: otherwise
    ``exp`` overflows or ``sqrt`` sees a negative in the unselected branch and its zero gradient becomes NaN.

    Args:
        z: Logits of any shape and floating dtype.

    Returns:
        ``qexp(z)``, same shape and dtype, ≥ 0 (NaN where ``z`` is NaN).
    """
    negative = torch.exp(torch.clamp(z, max=0.0))
    positive = torch.sqrt(1.0 + torch.clamp(z, min=0.0))
    return torch.where(z < 0, negative, positive)


def _affine(x: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    if scale is not None:
        x = x * scale.to(x.dtype)
    if shift is not None:
        x = x + shift.to(x.dtype)
    return x


def masked_gem_pool_naive(
    F: Tensor,
    Z: Tensor,
    p: float,
    eps: float = 1e-6,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Direct definition, as in the authors' code: materialises ``F ⊙ A_k`` ([B, M, C, H, W]).

    Computes in ``torch.promote_types(F.dtype, Z.dtype)`` (pass float64 inputs for a float64 ground truth).

    Args:
        F: Feature map [B, C, H, W] (post-ReLU).
        Z: Attribute logits [B, M, H, W].
        p: GeM exponent, ≥ 1.
        eps: Clamp floor of GeM.
        scale: Per-channel BN scale [C], or None for 1.
        shift: Per-channel BN shift [C], or None for 0.

    Returns:
        ``(f, f_k)``: the global embedding [B, C] and the attribute embeddings [B, M, C].
    """
    p, eps = _check_inputs(F, Z, p, eps, scale, shift)
    dtype = torch.promote_types(F.dtype, Z.dtype)
    F, A = F.to(dtype), qexp(Z.to(dtype))
    masked = F.unsqueeze(1) * A.unsqueeze(2)  # [B, M, C, H, W]: the blow-up the kernel avoids
    f_k = masked.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    f = F.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
    return _affine(f, scale, shift), _affine(f_k, scale, shift)


def masked_gem_pool_reference(
    F: Tensor,
    Z: Tensor,
    p: float,
    eps: float = 1e-6,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Factorised masked GeM pooling in pure torch: the same math as the kernel (see the module docstring).

    Differentiable, device-agnostic and export-friendly (clamp, pow, where/exp/sqrt, one batched matmul; no python
    loop over attributes). Computes in ``promote_types(F.dtype, Z.dtype, float32)`` and returns
    ``promote_types(F.dtype, Z.dtype)``. This is the torch implementation the interpreter and the ONNX exporter use.

    Args:
        F: Feature map [B, C, H, W] (post-ReLU).
        Z: Attribute logits [B, M, H, W].
        p: GeM exponent, ≥ 1.
        eps: Clamp floor of GeM.
        scale: Per-channel BN scale [C], or None for 1.
        shift: Per-channel BN shift [C], or None for 0.

    Returns:
        ``(f, f_k)``: the global embedding [B, C] and the attribute embeddings [B, M, C].
    """
    p, eps = _check_inputs(F, Z, p, eps, scale, shift)
    out_dtype = torch.promote_types(F.dtype, Z.dtype)
    compute = torch.promote_types(out_dtype, torch.float32)
    hw = F.shape[2] * F.shape[3]
    g = F.to(compute).clamp(min=eps).pow(p).flatten(2)  # [B, C, HW]
    a = qexp(Z.to(compute)).pow(p).flatten(2)  # [B, M, HW]
    mean_global = g.mean(dim=-1)  # [B, C]
    mean_attr = torch.matmul(a, g.transpose(1, 2)) / hw  # [B, M, C]
    floor = eps**p
    f = mean_global.clamp(min=floor).pow(1.0 / p)
    f_k = mean_attr.clamp(min=floor).pow(1.0 / p)
    return _affine(f, scale, shift).to(out_dtype), _affine(f_k, scale, shift).to(out_dtype)


# --------------------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------------------


@triton.jit
def _qexp(z):
    # tl.where rather than minimum/maximum: NaN must propagate, and each branch's argument stays in its half-line.
    zneg = tl.where(z < 0.0, z, 0.0)
    zpos = tl.where(z < 0.0, 0.0, z)
    return tl.where(z < 0.0, tl.exp(zneg), tl.sqrt(1.0 + zpos))


@triton.jit
def _pow(x, p, P_INT: tl.constexpr):
    # x^p for x ≥ 0; integer exponents become multiplications, the rest exp2/log2 (log2(0) = -inf → 0).
    if P_INT == 1:
        y = x
    elif P_INT == 2:
        y = x * x
    elif P_INT == 3:
        y = x * x * x
    elif P_INT == 4:
        y = x * x
        y = y * y
    else:
        y = tl.exp2(p * tl.log2(x))
    return y


@triton.jit
def _attention_tile(z_base, rows, offs_hw, hw_mask, M, stride_zm, stride_zhw, p, P_INT: tl.constexpr):
    # The logits z [M_PAD, BLOCK_HW] and P = qexp(z)^p with row 0 ≡ 1 (the global embedding). Padding rows and
    # columns past HW are zeroed: they must not add eps^p terms to the sums.
    z_rows = (rows >= 1) & (rows <= M)
    z = tl.load(
        z_base + (rows[:, None] - 1) * stride_zm + offs_hw[None, :] * stride_zhw,
        mask=z_rows[:, None] & hw_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    a = _pow(_qexp(z), p, P_INT)
    a = tl.where((rows == 0)[:, None], 1.0, a)
    a = tl.where((rows <= M)[:, None] & hw_mask[None, :], a, 0.0)
    return z, a


@triton.jit
def _dpow(x, p, P_INT: tl.constexpr):
    # d(x^p)/dx = p·x^(p-1).
    if P_INT == 1:
        y = tl.full(x.shape, 1.0, tl.float32)
    elif P_INT == 2:
        y = 2.0 * x
    elif P_INT == 3:
        y = 3.0 * x * x
    elif P_INT == 4:
        y = 4.0 * x * x * x
    else:
        y = p * tl.exp2((p - 1.0) * tl.log2(x))
    return y


@triton.jit
def _root(x, inv_p, P_INT: tl.constexpr):
    # x^(1/p) for x ≥ 0.
    if P_INT == 1:
        y = x
    elif P_INT == 2:
        y = tl.sqrt(x)
    elif P_INT == 4:
        y = tl.sqrt(tl.sqrt(x))
    else:
        y = tl.exp2(inv_p * tl.log2(x))
    return y


def _configs(table: tuple[tuple[int, int, int, int], ...]) -> list[triton.Config]:
    """Autotuning space from ``(BLOCK_C, BLOCK_HW, num_warps, num_stages)`` rows."""
    if _INTERPRET:
        # The interpreter runs blocks as numpy arrays: one config, no autotuning, few large blocks.
        return [triton.Config({"BLOCK_C": 64, "BLOCK_HW": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_C": bc, "BLOCK_HW": bhw}, num_warps=nw, num_stages=ns) for bc, bhw, nw, ns in table]


_FWD_CONFIGS = _configs(
    ((64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (256, 32, 8, 3),
     (256, 64, 8, 2))
)
_BWD_CONFIGS = _configs(((32, 32, 4, 3), (32, 64, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2)))


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop configs whose blocks overshoot the problem (they only add masked work); keep at least the smallest."""
    cap_c = max(16, triton.next_power_of_2(named_args["C"]))
    cap_hw = max(16, triton.next_power_of_2(named_args["HW"]))
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_C"] <= cap_c and cfg.kwargs["BLOCK_HW"] <= cap_hw]
    return kept or [min(configs, key=lambda cfg: cfg.kwargs["BLOCK_C"] * cfg.kwargs["BLOCK_HW"])]


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=["C", "HW", "M", "P_INT", "HAS_AFFINE", "SAVE_MEAN"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _masked_gem_pool_fwd_kernel(
    f_ptr,
    z_ptr,
    scale_ptr,
    shift_ptr,
    out_g_ptr,
    out_k_ptr,
    mean_ptr,
    C,
    HW,
    M,
    stride_fb,
    stride_fc,
    stride_fhw,
    stride_zb,
    stride_zm,
    stride_zhw,
    stride_gb,
    stride_gc,
    stride_kb,
    stride_km,
    stride_kc,
    p,
    inv_p,
    eps,
    eps_p,
    P_INT: tl.constexpr,
    M_PAD: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    SAVE_MEAN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    # One program per (image, C-block); C-blocks of one image are adjacent so its Z tiles are re-read from L2.
    pid = tl.program_id(0)
    num_cb = tl.cdiv(C, BLOCK_C)
    b = (pid // num_cb).to(tl.int64)
    offs_c = (pid % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    rows = tl.arange(0, M_PAD)  # row 0: global embedding (A ≡ 1); rows 1..M: attribute k-1; rest: padding
    z_rows = (rows >= 1) & (rows <= M)
    valid_rows = rows <= M
    f_base = f_ptr + b * stride_fb
    z_base = z_ptr + b * stride_zb

    acc = tl.zeros((M_PAD, BLOCK_C), dtype=tl.float32)
    for hw0 in range(0, HW, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        hw_mask = offs_hw < HW
        x = tl.load(
            f_base + offs_hw[:, None] * stride_fhw + offs_c[None, :] * stride_fc,
            mask=hw_mask[:, None] & c_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        g = _pow(tl.where(x < eps, eps, x), p, P_INT)  # [BLOCK_HW, BLOCK_C]
        _, a = _attention_tile(z_base, rows, offs_hw, hw_mask, M, stride_zm, stride_zhw, p, P_INT)
        acc = tl.dot(a, g, acc, input_precision=DOT_PRECISION)

    mean = acc / HW
    out_mask = valid_rows[:, None] & c_mask[None, :]
    if SAVE_MEAN:
        tl.store(mean_ptr + b * (M + 1) * C + rows[:, None] * C + offs_c[None, :], mean, mask=out_mask)
    y = _root(tl.where(mean < eps_p, eps_p, mean), inv_p, P_INT)
    if HAS_AFFINE:
        s = tl.load(scale_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32)
        t = tl.load(shift_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        y = y * s[None, :] + t[None, :]
    y = y.to(out_g_ptr.dtype.element_ty)
    # Row 0 goes to f, rows 1..M to f_k: two masked stores of the same tile.
    g_ptrs = out_g_ptr + b * stride_gb + rows[:, None] * 0 + offs_c[None, :] * stride_gc
    tl.store(g_ptrs, y, mask=(rows == 0)[:, None] & c_mask[None, :])
    k_ptrs = out_k_ptr + b * stride_kb + (rows[:, None] - 1) * stride_km + offs_c[None, :] * stride_kc
    tl.store(k_ptrs, y, mask=z_rows[:, None] & c_mask[None, :])


@triton.autotune(
    configs=_BWD_CONFIGS,
    key=["C", "HW", "M", "P_INT", "NEED_GF"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _masked_gem_pool_bwd_kernel(
    f_ptr,
    z_ptr,
    gs_ptr,
    gf_ptr,
    gz_ptr,
    C,
    HW,
    M,
    stride_fb,
    stride_fc,
    stride_fhw,
    stride_zb,
    stride_zm,
    stride_zhw,
    p,
    eps,
    P_INT: tl.constexpr,
    M_PAD: tl.constexpr,
    NEED_GF: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    # One program per (image, HW-block), looping over C: dL/dP[k, hw] = Σ_c gS[k, c] · G[c, hw] needs every channel.
    pid = tl.program_id(0)
    num_hb = tl.cdiv(HW, BLOCK_HW)
    b = (pid // num_hb).to(tl.int64)
    offs_hw = (pid % num_hb) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    hw_mask = offs_hw < HW
    rows = tl.arange(0, M_PAD)
    z_rows = (rows >= 1) & (rows <= M)
    valid_rows = rows <= M

    z, a = _attention_tile(z_ptr + b * stride_zb, rows, offs_hw, hw_mask, M, stride_zm, stride_zhw, p, P_INT)

    f_base = f_ptr + b * stride_fb
    gs_base = gs_ptr + b * (M + 1) * C
    acc = tl.zeros((M_PAD, BLOCK_HW), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        tile_mask = c_mask[:, None] & hw_mask[None, :]
        f_offs = offs_c[:, None] * stride_fc + offs_hw[None, :] * stride_fhw
        x = tl.load(f_base + f_offs, mask=tile_mask, other=0.0).to(tl.float32)  # [BLOCK_C, BLOCK_HW]
        xc = tl.where(x < eps, eps, x)
        gs = tl.load(
            gs_base + rows[:, None] * C + offs_c[None, :], mask=valid_rows[:, None] & c_mask[None, :], other=0.0
        )  # [M_PAD, BLOCK_C]
        acc = tl.dot(gs, _pow(xc, p, P_INT), acc, input_precision=DOT_PRECISION)
        if NEED_GF:
            dg = tl.dot(tl.trans(gs), a, input_precision=DOT_PRECISION)  # dL/dG: [BLOCK_C, BLOCK_HW]
            # clamp(F, eps) passes the gradient where F ≥ eps (torch's convention at the boundary).
            gf = tl.where(x >= eps, dg * _dpow(xc, p, P_INT), 0.0)
            gf_offs = offs_c[:, None] * HW + offs_hw[None, :]
            tl.store(gf_ptr + b * C * HW + gf_offs, gf.to(gf_ptr.dtype.element_ty), mask=tile_mask)

    # dP/dz = p · P · dlog(qexp)/dz, with dlog(qexp)/dz = 1 for z < 0 and 1 / (2(1 + z)) otherwise.
    dlog = tl.where(z < 0.0, 1.0, 0.5 / (1.0 + tl.where(z < 0.0, 0.0, z)))
    gz = acc * a * p * dlog
    gz_ptrs = gz_ptr + b * M * HW + (rows[:, None] - 1) * HW + offs_hw[None, :]
    tl.store(gz_ptrs, gz.to(gz_ptr.dtype.element_ty), mask=z_rows[:, None] & hw_mask[None, :])


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------


def _check_kernel_device(*tensors: Tensor) -> None:
    device = tensors[0].device
    if device.type == "cpu":
        if not _INTERPRET:
            raise RuntimeError(
                "masked_gem_pool (Triton) got CPU tensors: move them to a GPU, set TRITON_INTERPRET=1 before "
                "importing the kernel module (slow, for tests), or use masked_gem_pool_reference"
            )
    elif device.type != "cuda":
        raise RuntimeError(f"masked_gem_pool (Triton) supports CUDA tensors only, got device {device}")
    for t in tensors:
        if t.dtype not in _KERNEL_DTYPES:
            raise TypeError(
                f"masked_gem_pool (Triton) takes float32/float16/bfloat16 inputs, got {t.dtype} "
                "(use masked_gem_pool_reference for float64)"
            )


def _flat_hw(x: Tensor) -> tuple[Tensor, int, int, int]:
    """View [B, K, H, W] as [B, K, HW] without copying when H and W merge (contiguous or channels-last)."""
    _, _, H, W = x.shape
    sb, sk, sh, sw = x.stride()
    if W == 1:
        return x, sb, sk, sh
    if H == 1 or sh == W * sw:
        return x, sb, sk, sw
    x = x.contiguous()
    return x, x.stride(0), x.stride(1), x.stride(3)


def _dot_precision(dtype: torch.dtype, backward: bool) -> str:
    """Tensor-core precision of the products for a given output dtype.

    fp16/bf16 outputs: plain TF32, their own rounding dominates. fp32 outputs promise fp32 accuracy
    (‖err‖/‖ref‖ < 1e-5): the forward uses IEEE products (FMA), the backward 3xTF32 ("tf32x3", split operands on the
    tensor cores), whichever spills fewer registers on sm_90. ptxas (Triton 3.9, p = 3, M = 26): forward configs
    spill nothing with IEEE and 3 of 7 spill with 3xTF32 (44-248 B); backward, 2 of 4 spill with 3xTF32 (120-344 B),
    all 4 with IEEE (32-860 B). Measured with ``python tests/kernels/aot_sm90.py masked_gem_pool_spills``. ROCm has
    no tf32x3.
    """
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if backward and not torch.version.hip else "ieee"


def _m_pad(M: int) -> int:
    return max(16, triton.next_power_of_2(M + 1))  # tl.dot needs every block dimension ≥ 16


def _launch_forward(
    F: Tensor,
    Z: Tensor,
    p: float,
    eps: float,
    scale: Tensor | None,
    shift: Tensor | None,
    out: tuple[Tensor, Tensor] | None,
    save_mean: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    B, C, H, W = F.shape
    M, HW = Z.shape[1], H * W
    out_dtype = torch.promote_types(F.dtype, Z.dtype)
    if out is None:
        f = torch.empty((B, C), device=F.device, dtype=out_dtype)
        f_k = torch.empty((B, M, C), device=F.device, dtype=out_dtype)
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError("out must be a pair (f [B, C], f_k [B, M, C]) of tensors")
        f, f_k = out
        for name, t, shape in (("out[0]", f, (B, C)), ("out[1]", f_k, (B, M, C))):
            if tuple(t.shape) != shape or t.dtype != out_dtype or t.device != F.device:
                raise ValueError(
                    f"{name} must be {list(shape)} {out_dtype} on {F.device}, got {list(t.shape)} {t.dtype} on "
                    f"{t.device}"
                )
    mean = torch.empty((B, M + 1, C), device=F.device, dtype=torch.float32) if save_mean else None
    F, sfb, sfc, sfhw = _flat_hw(F)
    Z, szb, szm, szhw = _flat_hw(Z)
    has_affine = scale is not None or shift is not None
    if has_affine:
        scale = torch.ones(C, device=F.device) if scale is None else scale.contiguous()
        shift = torch.zeros(C, device=F.device) if shift is None else shift.contiguous()
    p_int = integer_exponent(p)

    def grid(meta: dict) -> tuple[int]:
        return (B * triton.cdiv(C, meta["BLOCK_C"]),)

    _masked_gem_pool_fwd_kernel[grid](
        F,
        Z,
        scale if has_affine else F,
        shift if has_affine else F,
        f,
        f_k,
        mean if save_mean else f,
        C,
        HW,
        M,
        sfb,
        sfc,
        sfhw,
        szb,
        szm,
        szhw,
        f.stride(0),
        f.stride(1),
        f_k.stride(0),
        f_k.stride(1),
        f_k.stride(2),
        p,
        1.0 / p,
        eps,
        eps**p,
        P_INT=p_int,
        M_PAD=_m_pad(M),
        HAS_AFFINE=has_affine,
        SAVE_MEAN=save_mean,
        DOT_PRECISION=_dot_precision(out_dtype, backward=False),
    )
    return f, f_k, mean


def masked_gem_pool_forward(
    F: Tensor,
    Z: Tensor,
    p: float,
    eps: float = 1e-6,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the fused forward kernel (no autograd): the inference path, e.g. for the runtime's torch backend.

    Reads ``F`` once. ``F`` and ``Z`` may be contiguous or channels-last (any layout whose H, W merge); other
    layouts are copied first.

    Args:
        F: Feature map [B, C, H, W], fp32/fp16/bf16, on a CUDA device (or CPU under ``TRITON_INTERPRET=1``).
        Z: Attribute logits [B, M, H, W], fp32/fp16/bf16, same device.
        p: GeM exponent, ≥ 1 (1, 2, 3, 4 are specialised).
        eps: Clamp floor of GeM.
        scale: Per-channel BN scale [C], or None for 1.
        shift: Per-channel BN shift [C], or None for 0.
        out: Optional preallocated ``(f [B, C], f_k [B, M, C])`` of dtype ``promote_types(F.dtype, Z.dtype)``;
            any strides (e.g. views of one [B, M+1, C] buffer). Fully overwritten.

    Returns:
        ``(f, f_k)``: the global embedding [B, C] and the attribute embeddings [B, M, C].

    Raises:
        ValueError: On inconsistent shapes, ``p < 1``, non-finite ``p``/``eps``, or a mismatched ``out``.
        TypeError: On unsupported dtypes.
        RuntimeError: On CPU tensors without ``TRITON_INTERPRET=1``.
    """
    p, eps = _check_inputs(F, Z, p, eps, scale, shift)
    _check_kernel_device(F, Z)
    f, f_k, _ = _launch_forward(F, Z, p, eps, scale, shift, out, save_mean=False)
    return f, f_k


def _launch_backward(
    F: Tensor, Z: Tensor, grad_s: Tensor, p: float, eps: float, need_gf: bool
) -> tuple[Tensor | None, Tensor]:
    B, C, H, W = F.shape
    M, HW = Z.shape[1], H * W
    grad_z = torch.empty((B, M, H, W), device=Z.device, dtype=Z.dtype)
    grad_f = torch.empty((B, C, H, W), device=F.device, dtype=F.dtype) if need_gf else None
    F, sfb, sfc, sfhw = _flat_hw(F)
    Z, szb, szm, szhw = _flat_hw(Z)

    def grid(meta: dict) -> tuple[int]:
        return (B * triton.cdiv(HW, meta["BLOCK_HW"]),)

    _masked_gem_pool_bwd_kernel[grid](
        F,
        Z,
        grad_s,
        grad_f if need_gf else grad_z,
        grad_z,
        C,
        HW,
        M,
        sfb,
        sfc,
        sfhw,
        szb,
        szm,
        szhw,
        p,
        eps,
        P_INT=integer_exponent(p),
        M_PAD=_m_pad(M),
        NEED_GF=need_gf,
        DOT_PRECISION=_dot_precision(torch.promote_types(F.dtype, Z.dtype), backward=True),
    )
    return grad_f, grad_z


# --------------------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------------------


class MaskedGemPoolFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernel: gradients to ``Z``, ``F`` (when it requires grad), ``scale``, ``shift``.

    Forward saves the fp32 pre-root means S [B, M+1, C] (small next to F). Backward forms ``gS = dL/dS``
    elementwise in torch and runs one Triton kernel for ``dL/dZ`` (and ``dL/dF``); see the module docstring.
    Not twice differentiable.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        F: Tensor,
        Z: Tensor,
        p: float,
        eps: float,
        scale: Tensor | None,
        shift: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Run the fused kernel and save what backward needs; inputs are validated by :func:`masked_gem_pool`."""
        f, f_k, mean = _launch_forward(F, Z, p, eps, scale, shift, None, save_mean=True)
        ctx.save_for_backward(F, Z, scale, mean)
        ctx.p, ctx.eps = p, eps
        ctx.shift_dtype = None if shift is None else shift.dtype
        return f, f_k

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_f: Tensor | None, grad_f_k: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None, None, Tensor | None, Tensor | None]:
        """Gradients w.r.t. ``F``, ``Z``, ``scale`` and ``shift`` (none for the python scalars ``p``, ``eps``)."""
        F, Z, scale, mean = ctx.saved_tensors
        p, eps = ctx.p, ctx.eps
        B, C, H, W = F.shape
        grad_y = torch.zeros_like(mean)  # [B, M+1, C], row 0 = global
        if grad_f is not None:
            grad_y[:, 0] = grad_f
        if grad_f_k is not None:
            grad_y[:, 1:] = grad_f_k
        eps_p = eps**p
        clamped = mean.clamp(min=eps_p)
        root = clamped.pow(1.0 / p)
        grad_root = grad_y * scale.float() if scale is not None else grad_y
        # d(max(S, eps^p)^(1/p))/dS = root / (p · max(S, eps^p)) where S ≥ eps^p (torch's clamp convention), else 0.
        grad_s = torch.where(mean >= eps_p, grad_root * root / (p * clamped), 0.0) / (H * W)
        need_f, need_z, _, _, need_scale, need_shift = ctx.needs_input_grad
        grad_F = grad_Z = grad_scale = grad_shift = None
        if need_f or need_z:
            grad_F, grad_Z = _launch_backward(F, Z, grad_s.contiguous(), p, eps, need_gf=need_f)
        if need_scale:
            grad_scale = (grad_y * root).sum(dim=(0, 1)).to(scale.dtype)
        if need_shift:
            grad_shift = grad_y.sum(dim=(0, 1)).to(ctx.shift_dtype)
        return grad_F, grad_Z if need_z else None, None, None, grad_scale, grad_shift


def masked_gem_pool(
    F: Tensor,
    Z: Tensor,
    p: float,
    eps: float = 1e-6,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused masked GeM pooling (Triton), autograd-aware.

    Computes the factorised form documented in the module docstring: one pass over ``F`` per image and C-block,
    qexp and the powers in registers, the (M+1)×HW×C product on tensor cores with fp32 accumulation, then mean,
    clamp, 1/p root and the BN affine. Differentiable w.r.t. ``Z`` and ``F`` (Triton backward) and ``scale``/``shift``.

    Args:
        F: Feature map [B, C, H, W] (post-ReLU), fp32/fp16/bf16, on a CUDA device (or CPU under
            ``TRITON_INTERPRET=1``).
        Z: Attribute logits [B, M, H, W], fp32/fp16/bf16, same device.
        p: The target's frozen GeM exponent, ≥ 1 (python number; 1, 2, 3, 4 are specialised).
        eps: Clamp floor of GeM.
        scale: Per-channel BN scale [C] (BN-neck folded), or None for 1.
        shift: Per-channel BN shift [C], or None for 0.

    Returns:
        ``(f, f_k)``: the global embedding [B, C] and the attribute embeddings [B, M, C], in
        ``promote_types(F.dtype, Z.dtype)``.

    Raises:
        ValueError: On inconsistent shapes, ``p < 1`` or non-finite ``p``/``eps``.
        TypeError: On unsupported dtypes.
        RuntimeError: On CPU tensors without ``TRITON_INTERPRET=1``.
    """
    p, eps = _check_inputs(F, Z, p, eps, scale, shift)
    _check_kernel_device(F, Z)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (F, Z, scale, shift)
    )
    if not needs_grad:
        f, f_k, _ = _launch_forward(F, Z, p, eps, scale, shift, None, save_mean=False)
        return f, f_k
    return MaskedGemPoolFunction.apply(F, Z, p, eps, scale, shift)
