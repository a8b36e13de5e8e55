"""Fused masked GeM pooling kernel vs float64 references (docs/architecture.md §3, factorised pooling, §4).

Compiled on a CUDA GPU when one is present; otherwise conftest.py has set TRITON_INTERPRET=1 before this module
imports the kernels, and the same kernels run in Triton's interpreter (hence the small shapes).

Tolerances (‖out − ref‖ / ‖ref‖ against the direct definition in float64 on the same, already rounded, inputs):
fp32 1e-5 (the contract); fp16 2e-3 and bf16 1e-2 (output rounding, 2^-11 and 2^-8 relative at most, plus TF32
products on a GPU). Gradients (fp32 kernel vs float64 reference autograd): 1e-4.
Entries whose every direct term is below eps ("channel entirely below eps") are excluded from the norms and checked
on their own, as the contract prescribes.
"""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attrimeter.kernels import masked_gem_pool as mgp

# The interpreter evaluates log2(0) = -inf with numpy (A = 0 where exp underflows; exp2(-inf) = 0 as on a GPU).
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOL = 1e-4


def _inputs(rng, B, C, H, W, M, dtype=torch.float32, affine=True):
    """Post-ReLU F (about half exact zeros, one all-zero channel), logits Z with A near 0 and exactly 0 spots."""
    F = np.maximum(rng.standard_normal((B, C, H, W)), 0.0)
    zero_c = int(rng.integers(C))
    F[:, zero_c] = 0.0
    F[:, (zero_c + 1) % C, 0, 0] = 1.0 + rng.random(B)  # at least one entry above eps per image
    Z = 2.0 * rng.standard_normal((B, M, H, W))
    near_zero = rng.random((B, H, W)) < 0.5
    near_zero[:, 0, 0] &= M > 1  # keep position 0 of a single map usable
    Z[:, 0][near_zero] = -40.0  # A = e^-40 ≈ 4e-18
    if H * W > 1:
        Z[:, M - 1, H - 1, W - 1] = -200.0  # exp underflows to exactly 0 in fp32
    elif M > 1:
        Z[:, M - 1] = -200.0
    F_t = torch.from_numpy(F).to(DEVICE, dtype)
    Z_t = torch.from_numpy(Z).to(DEVICE, dtype)
    if not affine:
        return F_t, Z_t, None, None
    scale = torch.from_numpy(rng.uniform(0.5, 1.5, C)).to(DEVICE, torch.float32)
    shift = torch.from_numpy(0.1 * rng.standard_normal(C)).to(DEVICE, torch.float32)
    return F_t, Z_t, scale, shift


def _direct64(F, Z, p, scale=None, shift=None):
    """Naive direct definition in float64, and the mask of f_k entries whose every term is below eps."""
    Fd, Zd = F.double(), Z.double()
    sd = None if scale is None else scale.double()
    td = None if shift is None else shift.double()
    f, f_k = mgp.masked_gem_pool_naive(Fd, Zd, p, EPS, sd, td)
    below = (Fd[:, None] * mgp.qexp(Zd)[:, :, None] < EPS).flatten(3).all(-1)
    return f, f_k, below


def _rel(out, ref, keep=None):
    diff = out.double() - ref
    if keep is not None:
        diff, ref = diff[keep], ref[keep]
    return (diff.norm() / ref.norm()).item()


HW_SHAPES = [(1, 1), (7, 1), (3, 43)]  # HW = 1, 7, 129


@pytest.mark.parametrize("H,W", HW_SHAPES)
@pytest.mark.parametrize("C", [3, 37, 64])
@pytest.mark.parametrize("M", [1, 23, 26])
def test_forward_matches_direct_definition(rng, H, W, C, M):
    B = 2 if M == 23 else 1
    F, Z, scale, shift = _inputs(rng, B, C, H, W, M)
    f, f_k = mgp.masked_gem_pool(F, Z, 3.0, EPS, scale, shift)
    assert f.shape == (B, C) and f_k.shape == (B, M, C)
    assert f.dtype == f_k.dtype == torch.float32
    assert torch.isfinite(f).all() and torch.isfinite(f_k).all()
    ref_f, ref_k, below = _direct64(F, Z, 3.0, scale, shift)
    assert _rel(f, ref_f) < TOL[torch.float32]
    assert _rel(f_k, ref_k, ~below) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [1.0, 3.0, 2.5])
def test_dtypes(rng, dtype, p):
    F, Z, scale, shift = _inputs(rng, 2, 37, 3, 43, 26, dtype)
    f, f_k = mgp.masked_gem_pool(F, Z, p, EPS, scale, shift)
    assert f.dtype == f_k.dtype == dtype
    ref_f, ref_k, below = _direct64(F, Z, p, scale, shift)
    assert _rel(f, ref_f) < TOL[dtype]
    assert _rel(f_k, ref_k, ~below) < TOL[dtype]


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0, 1.5, 3.7])
def test_exponents(rng, p):
    # 1, 2, 4 take the multiplication/sqrt specialisations, 1.5 and 3.7 the exp2/log2 path (3 is covered above).
    F, Z, scale, shift = _inputs(rng, 1, 37, 7, 1, 23)
    f, f_k = mgp.masked_gem_pool(F, Z, p, EPS, scale, shift)
    ref_f, ref_k, below = _direct64(F, Z, p, scale, shift)
    assert _rel(f, ref_f) < TOL[torch.float32]
    assert _rel(f_k, ref_k, ~below) < TOL[torch.float32]


def test_mixed_input_dtypes_promote(rng):
    F, _, scale, shift = _inputs(rng, 2, 37, 7, 1, 23, torch.bfloat16)
    _, Z, _, _ = _inputs(rng, 2, 37, 7, 1, 23, torch.float32)
    f, f_k = mgp.masked_gem_pool(F, Z, 3.0, EPS, scale, shift)
    assert f.dtype == f_k.dtype == torch.float32
    ref_f, ref_k, below = _direct64(F, Z, 3.0, scale, shift)
    assert _rel(f, ref_f) < TOL[torch.float32]
    assert _rel(f_k, ref_k, ~below) < TOL[torch.float32]


def test_channels_below_eps_and_maps_near_zero(rng):
    B, C, H, W, M = 2, 37, 7, 1, 3
    F, Z, _, _ = _inputs(rng, B, C, H, W, M, affine=False)
    F[:, 5] = 0.0
    F[:, 6] = 0.5 * EPS  # positive but below eps everywhere
    Z[:, 1] = -60.0  # A ≈ 9e-27 everywhere: every product is below eps
    f, f_k = mgp.masked_gem_pool(F, Z, 3.0, EPS)
    ref_f, ref_k, below = _direct64(F, Z, 3.0)
    # The global row uses A ≡ 1: identical to the direct GeM, eps exactly for the all-below channels.
    torch.testing.assert_close(f[:, 5:7].double().cpu(), torch.full((B, 2), EPS, dtype=torch.float64), rtol=1e-5,
                               atol=0)
    assert below[:, :, 5].all() and below[:, 1].all()  # (channel 6 is not: A·F ≥ eps where A > 2)
    torch.testing.assert_close(ref_k[below], torch.full_like(ref_k[below], EPS), rtol=1e-12, atol=0)  # direct: eps
    # Factorised: eps · max(1, (mean_hw A^p)^(1/p)) ∈ [eps, eps · max(1, max A)]: the documented eps-level gap.
    a_max = mgp.qexp(Z.double()).flatten(2).amax(-1).clamp(min=1.0)  # [B, M]
    got = f_k.double()
    upper = (EPS * a_max)[:, :, None].expand_as(got)
    assert (got[below] >= EPS * (1 - 1e-5)).all()
    assert (got[below] <= upper[below] * (1 + 1e-5)).all()
    # A ≈ 0 pools to eps exactly in both forms (the final clamp at eps^p).
    torch.testing.assert_close(got[:, 1].cpu(), torch.full((B, C), EPS, dtype=torch.float64), rtol=1e-5, atol=0)


def test_poisoned_out_buffers(rng):
    B, C, H, W, M = 2, 37, 3, 43, 23
    F, Z, scale, shift = _inputs(rng, B, C, H, W, M)
    # f and f_k as views of one [B, M+1, C] buffer (the layout attr_distance consumes), with a NaN guard band.
    buf = torch.full((B, M + 1, C + 5), float("nan"), device=DEVICE)
    out = (buf[:, 0, :C], buf[:, 1:, :C])
    f, f_k = mgp.masked_gem_pool_forward(F, Z, 3.0, EPS, scale, shift, out=out)
    assert f.data_ptr() == out[0].data_ptr() and f_k.data_ptr() == out[1].data_ptr()
    assert torch.isfinite(buf[:, :, :C]).all(), "kernel left poisoned output entries unwritten"
    assert torch.isnan(buf[:, :, C:]).all(), "kernel wrote outside its outputs"
    ref_f, ref_k, below = _direct64(F, Z, 3.0, scale, shift)
    assert _rel(f, ref_f) < TOL[torch.float32]
    assert _rel(f_k, ref_k, ~below) < TOL[torch.float32]


def test_out_buffers_are_validated(rng):
    F, Z, _, _ = _inputs(rng, 1, 3, 7, 1, 2)
    good = (torch.empty(1, 3, device=DEVICE), torch.empty(1, 2, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"out\[1\]"):
        mgp.masked_gem_pool_forward(F, Z, 3.0, out=(good[0], torch.empty(1, 3, 3, device=DEVICE)))
    with pytest.raises(ValueError, match=r"out\[0\]"):
        mgp.masked_gem_pool_forward(F, Z, 3.0, out=(good[0].half(), good[1]))
    with pytest.raises(TypeError, match="pair"):
        mgp.masked_gem_pool_forward(F, Z, 3.0, out=good[0])


def test_strided_layouts(rng):
    F, Z, scale, shift = _inputs(rng, 2, 37, 7, 3, 23)
    f, f_k = mgp.masked_gem_pool(F, Z, 3.0, EPS, scale, shift)
    wide_z = torch.zeros(2, 46, 7, 3, device=DEVICE)
    wide_z[:, ::2] = Z
    wide_f = torch.zeros(2, 37, 7, 6, device=DEVICE)
    wide_f[..., ::2] = F
    for F2, Z2 in (
        (F.to(memory_format=torch.channels_last), Z.to(memory_format=torch.channels_last)),
        (wide_f[..., ::2], wide_z[:, ::2]),  # H and W do not merge: copied first
    ):
        f2, f_k2 = mgp.masked_gem_pool(F2, Z2, 3.0, EPS, scale, shift)
        torch.testing.assert_close(f2, f, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(f_k2, f_k, rtol=1e-6, atol=1e-7)


def test_nan_propagates(rng):
    F, Z, scale, shift = _inputs(rng, 2, 37, 7, 1, 5)
    c, k = int(rng.integers(37)), int(rng.integers(5))
    F_nan = F.clone()
    F_nan[0, c, 3, 0] = float("nan")
    f, f_k = mgp.masked_gem_pool(F_nan, Z, 3.0, EPS, scale, shift)
    assert torch.isnan(f[0, c]) and torch.isnan(f_k[0, :, c]).all()
    keep = torch.ones_like(f, dtype=torch.bool)
    keep[0, c] = False
    assert torch.isfinite(f[keep]).all() and torch.isfinite(f_k[1]).all()
    Z_nan = Z.clone()
    Z_nan[1, k, 2, 0] = float("nan")
    f, f_k = mgp.masked_gem_pool(F, Z_nan, 3.0, EPS, scale, shift)
    assert torch.isnan(f_k[1, k]).all()
    assert torch.isfinite(f).all() and torch.isfinite(f_k[0]).all()


def _reference_grads(F, Z, p, scale, shift, grad_f, grad_k, wrt):
    leaves = {
        name: t.detach().double().requires_grad_(name in wrt)
        for name, t in (("F", F), ("Z", Z), ("scale", scale), ("shift", shift))
    }
    f, f_k = mgp.masked_gem_pool_reference(leaves["F"], leaves["Z"], p, EPS, leaves["scale"], leaves["shift"])
    loss = (f_k * grad_k.double()).sum() + (0 if grad_f is None else (f * grad_f.double()).sum())
    return dict(zip(wrt, torch.autograd.grad(loss, [leaves[n] for n in wrt]), strict=True))


@pytest.mark.parametrize(
    "shape,p,wrt,use_f",
    [
        ((1, 37, 7, 1, 23), 3.0, ("F", "Z", "scale", "shift"), True),
        ((2, 3, 3, 43, 1), 2.5, ("F", "Z", "scale", "shift"), True),
        ((1, 64, 1, 1, 26), 1.0, ("Z",), False),  # frozen target: F needs no grad, only f_k is used
        ((2, 37, 7, 1, 5), 4.0, ("F",), True),
    ],
)
def test_gradients_match_float64_reference(rng, shape, p, wrt, use_f):
    B, C, H, W, M = shape
    F, Z, scale, shift = _inputs(rng, B, C, H, W, M)
    inputs = (("F", F), ("Z", Z), ("scale", scale), ("shift", shift))
    leaves = {name: t.clone().requires_grad_(name in wrt) for name, t in inputs}
    f, f_k = mgp.masked_gem_pool(leaves["F"], leaves["Z"], p, EPS, leaves["scale"], leaves["shift"])
    assert f_k.grad_fn is not None
    grad_k = torch.from_numpy(rng.standard_normal((B, M, C))).to(DEVICE, torch.float32)
    grad_f = torch.from_numpy(rng.standard_normal((B, C))).to(DEVICE, torch.float32) if use_f else None
    loss = (f_k * grad_k).sum() + (0 if grad_f is None else (f * grad_f).sum())
    got = dict(zip(wrt, torch.autograd.grad(loss, [leaves[n] for n in wrt]), strict=True))
    ref = _reference_grads(F, Z, p, scale, shift, grad_f, grad_k, wrt)
    for name in wrt:
        assert got[name].dtype == leaves[name].dtype and torch.isfinite(got[name]).all(), name
        assert _rel(got[name], ref[name]) < GRAD_TOL, name


def test_no_autograd_graph_without_grad(rng):
    F, Z, scale, shift = _inputs(rng, 1, 3, 7, 1, 2)
    f, f_k = mgp.masked_gem_pool(F, Z, 3.0, EPS, scale, shift)
    assert f.grad_fn is None and f_k.grad_fn is None


@pytest.mark.parametrize("p", [1.0, 3.0, 2.5])
def test_reference_matches_direct_definition(rng, p):
    F, Z, scale, shift = _inputs(rng, 2, 37, 3, 43, 26)
    ref_f, ref_k, below = _direct64(F, Z, p, scale, shift)
    f64, f_k64 = mgp.masked_gem_pool_reference(F.double(), Z.double(), p, EPS, scale.double(), shift.double())
    assert f64.dtype == torch.float64
    assert _rel(f64, ref_f) < 1e-12  # the global row is the direct GeM
    # The key identity holds up to terms of order eps^p · max(1, A)^p: eps-level for p = 1, far below for p > 1.
    assert _rel(f_k64, ref_k, ~below) < (1e-5 if p == 1.0 else 1e-10)
    f32, f_k32 = mgp.masked_gem_pool_reference(F, Z, p, EPS, scale, shift)
    assert f32.dtype == torch.float32
    assert _rel(f32, ref_f) < TOL[torch.float32] and _rel(f_k32, ref_k, ~below) < TOL[torch.float32]


def test_reference_gradcheck(rng):
    F = torch.from_numpy(0.1 + np.abs(rng.standard_normal((1, 3, 2, 2))))  # away from the eps kink
    z = rng.standard_normal((1, 2, 2, 2))
    Z = torch.from_numpy(np.where(np.abs(z) < 0.1, 0.5, z))  # away from the qexp kink at 0
    scale = torch.from_numpy(rng.uniform(0.5, 1.5, 3))
    shift = torch.from_numpy(rng.standard_normal(3))
    args = tuple(t.requires_grad_() for t in (F, Z, scale, shift))
    assert torch.autograd.gradcheck(lambda a, b, s, t: mgp.masked_gem_pool_reference(a, b, 2.5, EPS, s, t), args)


def test_qexp(rng):
    z = torch.from_numpy(np.concatenate([rng.standard_normal(64) * 5, [0.0, -1e3, 1e3, -1e-8, 1e-8]]))
    z.requires_grad_()
    a = mgp.qexp(z)
    zd = z.detach()
    expected = torch.where(zd < 0, torch.exp(zd.clamp(max=0)), torch.sqrt(1 + zd.clamp(min=0)))
    torch.testing.assert_close(a, expected, rtol=1e-15, atol=0)
    assert (a >= 0).all() and a[-4] == 0 and a[-5] == 1
    (grad,) = torch.autograd.grad(a.sum(), z)
    assert torch.isfinite(grad).all()  # no NaN leaking from the unselected branch
    torch.testing.assert_close(grad, torch.where(zd < 0, torch.exp(zd), 0.5 / torch.sqrt(1 + zd.clamp(min=0))))
    assert torch.isnan(mgp.qexp(torch.tensor([float("nan")]))).all()


FNS = [mgp.masked_gem_pool_naive, mgp.masked_gem_pool_reference, mgp.masked_gem_pool]


def _bad_calls(dev):
    F = torch.rand(2, 5, 3, 4, device=dev)
    Z = torch.randn(2, 6, 3, 4, device=dev)
    return [
        ((F[0], Z, 3.0), ValueError, "F must be 4-D"),
        ((F, Z[:, :, :2], 3.0), ValueError, "does not match"),
        ((F, Z[:1], 3.0), ValueError, "does not match"),
        ((F, Z[:, :0], 3.0), ValueError, "empty dimension"),
        ((F, Z, 3.0, EPS, torch.ones(6, device=dev)), ValueError, "scale must have shape"),
        ((F, Z, 3.0, EPS, None, torch.ones(5, 1, device=dev)), ValueError, "shift must have shape"),
        ((F, Z, 0.5), ValueError, "p must be finite and >= 1"),
        ((F, Z, float("nan")), ValueError, "p must be finite"),
        ((F, Z, torch.tensor(3.0)), TypeError, "python number"),
        ((F, Z, 3.0, 0.0), ValueError, "eps must be"),
        ((F, Z, 10.0), ValueError, "underflows float32"),
        ((F.to(torch.int32), Z, 3.0), TypeError, "floating point"),
    ]


@pytest.mark.parametrize("fn", FNS, ids=lambda fn: fn.__name__)
def test_bad_input_raises(fn):
    for args, exc, message in _bad_calls(DEVICE):
        with pytest.raises(exc, match=message):
            fn(*args)


def test_kernel_rejects_float64():
    with pytest.raises(TypeError, match="float64"):
        mgp.masked_gem_pool(torch.rand(1, 3, 2, 2, device=DEVICE, dtype=torch.float64),
                            torch.rand(1, 2, 2, 2, device=DEVICE, dtype=torch.float64), 3.0)


def test_cpu_tensors_refused_without_interpreter(monkeypatch):
    monkeypatch.setattr(mgp, "_INTERPRET", False)  # as if imported without TRITON_INTERPRET=1
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mgp.masked_gem_pool(torch.rand(1, 3, 2, 2), torch.rand(1, 2, 2, 2), 3.0)


@pytest.mark.parametrize("version", ["3.3.1", "3.2.0+git1a2b3c"])
def test_older_triton_is_refused_naming_the_versions(version):
    import triton

    from attrimeter.kernels import check_triton

    with pytest.raises(ImportError, match=rf"needs Triton >= 3\.4 .*this is Triton {re.escape(version)}"):
        check_triton(SimpleNamespace(__version__=version))
    check_triton(triton)  # the installed one is new enough


@pytest.mark.parametrize(("triton_version", "numpy_version", "interpret", "refused"), [
    ("3.6.0", "2.4.0", True, True), ("3.6.0", "2.3.5", True, False), ("3.6.0", "2.5.2", False, False),
    ("3.7.0", "2.5.2", True, False),
])
def test_interpreter_that_cannot_run_with_this_numpy_is_refused(monkeypatch, triton_version, numpy_version,
                                                                interpret, refused):
    from attrimeter.kernels import check_triton

    monkeypatch.setattr(np, "__version__", numpy_version)
    fake = SimpleNamespace(__version__=triton_version, knobs=SimpleNamespace(runtime=SimpleNamespace(
        interpret=interpret)))
    if refused:
        with pytest.raises(ImportError, match=rf"Triton 3\.6\.0's interpreter .* numpy {numpy_version}"):
            check_triton(fake)
    else:
        check_triton(fake)


def test_kernels_compile_for_sm90_without_a_gpu(aot_sm90):
    """The interpreter never lowers the kernels: compile forward and backward for an H100 (bundled ptxas)."""
    tensor_core_ops = aot_sm90("masked_gem_pool")
    # The (M+1)×HW×C products run on the tensor cores in both directions, for integer and generic p.
    for name in ("fwd_p3", "fwd_p0", "bwd_p3", "bwd_p0"):
        assert tensor_core_ops[name] > 0, (name, tensor_core_ops)
