"""Per-attribute distance kernel: scan, fused top-k and explain against a float64 reference.

Runs compiled on a CUDA GPU, under TRITON_INTERPRET=1 on the CPU (set by tests/conftest.py); shapes stay small so the
interpreter finishes in seconds. Block sizes under the interpreter are BLOCK_N = 32, BLOCK_Q >= 16, so N = 33..77
gives several gallery blocks with a ragged tail.
"""

import math

import numpy as np
import pytest
import torch

from attrimeter.kernels import attr_distance as ad

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# ‖out − ref‖/‖ref‖ of the scan vs a float64 reference on the same gallery values (queries are rounded to the
# gallery dtype for the GEMM); explain uses direct fp32 differences whatever the gallery dtype.
SCAN_TOL = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
EXPLAIN_TOL = 1e-5
FIELDS = ("d", "d_k", "shares", "d_hat", "scores")


def _embeddings(rng: np.random.Generator, rows: int, m: int, c: int, mean: np.ndarray | None = None) -> torch.Tensor:
    # A shared mean per (row, channel), as BN-neck embeddings have: ‖a‖² well above d², so cancellation is exercised.
    x = rng.standard_normal((rows, m + 1, c))
    if mean is not None:
        x = x + mean
    return torch.from_numpy(x).float().to(DEVICE)


def _pair(rng, q_rows, n, m, c, dtype):
    mean = rng.normal(scale=0.7, size=(m + 1, c))
    return _embeddings(rng, q_rows, m, c, mean), _embeddings(rng, n, m, c, mean).to(dtype)


def _weights(rng, m: int) -> torch.Tensor:
    w = torch.from_numpy(rng.uniform(0.1, 2.0, size=m)).float()
    w[torch.from_numpy(rng.permutation(m)[: m // 2])] = 0.0  # "ignore" half of the attributes
    return w.to(DEVICE)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


def _poisoned(q_rows: int, n: int, m: int, contiguous_dk: bool) -> ad.AttrDistances:
    def full(*shape):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)

    def per_attr():
        return full(q_rows, n, m) if contiguous_dk else full(q_rows, m, n).transpose(1, 2)

    return ad.AttrDistances(full(q_rows, n), per_attr(), per_attr(), full(q_rows, n), full(q_rows, n))


def _gather(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return t[torch.arange(ids.shape[0], device=ids.device)[:, None], ids.long()]


@pytest.mark.parametrize(
    ("q_rows", "n", "m", "c", "dtype", "weighted", "poison"),
    [
        (1, 37, 1, 40, torch.float32, False, "contiguous"),
        (3, 45, 23, 24, torch.float16, True, "default"),
        (5, 33, 26, 72, torch.bfloat16, True, "contiguous"),
        (2, 70, 26, 50, torch.float32, True, None),
        (65, 35, 23, 20, torch.float16, False, "default"),  # two query blocks
        (2, 41, 1, 33, torch.bfloat16, False, None),
    ],
)
def test_full_matrix_matches_float64_reference(rng, q_rows, n, m, c, dtype, weighted, poison):
    q, g = _pair(rng, q_rows, n, m, c, dtype)
    w = _weights(rng, m) if weighted and m > 1 else (torch.ones(m, device=DEVICE) if weighted else None)
    out = None if poison is None else _poisoned(q_rows, n, m, contiguous_dk=poison == "contiguous")
    res = ad.attr_distance(q, g, weights=w, out=out)
    ref = ad.attr_distance_reference(q.double(), g.double(), weights=w)

    assert res.indices is None
    for name in FIELDS:
        got, want = getattr(res, name), getattr(ref, name)
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name}: unwritten (NaN-poisoned) or non-finite entries"
        assert _rel(got, want) < SCAN_TOL[dtype], f"{name}: rel err {_rel(got, want):.2e}"
    if out is not None:
        assert res.d_k.data_ptr() == out.d_k.data_ptr() and res.d.data_ptr() == out.d.data_ptr()
    if not weighted:
        assert res.scores is res.d
    torch.testing.assert_close(res.shares.sum(-1), torch.ones_like(res.d), atol=1e-5, rtol=0)
    assert (res.d >= 0).all() and (res.d_k >= 0).all()


def test_precomputed_gallery_norms_match_in_kernel_norms(rng):
    q, g = _pair(rng, 4, 39, 23, 36, torch.float16)
    g_sqnorm = g.float().square().sum(-1)
    with_norms = ad.attr_distance(q, g, g_sqnorm=g_sqnorm)
    without = ad.attr_distance(q, g)
    for name in FIELDS:
        assert _rel(getattr(with_norms, name), getattr(without, name)) < 1e-6, name


@pytest.mark.parametrize(
    ("order", "dtype", "k", "m", "q_rows"),
    [
        ("d", torch.float32, 1, 26, 65),  # two query blocks
        ("d", torch.float16, 7, 23, 1),
        ("d", torch.bfloat16, 40, 1, 3),  # k > BLOCK_N: every block keeps all of its items
        ("weighted", torch.float32, 7, 23, 3),
        ("weighted", torch.float16, 40, 1, 2),
        ("weighted", torch.bfloat16, 1, 23, 3),
    ],
)
def test_topk_matches_torch_topk_of_reference(rng, order, dtype, k, m, q_rows):
    n, c = 77, 24
    q, g = _pair(rng, q_rows, n, m, c, dtype)
    w = (_weights(rng, m) if m > 1 else torch.full((1,), 0.5, device=DEVICE)) if order == "weighted" else None
    res = ad.attr_distance(q, g, topk=k, weights=w)
    ref = ad.attr_distance_reference(q.double(), g.double(), weights=w)
    ref_values, ref_ids = torch.topk(ref.scores, k, dim=1, largest=False)

    assert res.indices.shape == (q_rows, k) and res.scores.shape == (q_rows, k)
    assert ((res.indices >= 0) & (res.indices < n)).all()
    assert all(len(set(row)) == k for row in res.indices.tolist()), "an id was selected twice"
    assert (res.scores[:, 1:] >= res.scores[:, :-1]).all(), "scores are not ascending"
    # Ties aside, the chosen ids score what torch.topk's do: near-equal scores may swap at the dtype's precision.
    chosen = _gather(ref.scores, res.indices)
    tol = SCAN_TOL[dtype] * 4
    torch.testing.assert_close(chosen, ref_values, rtol=tol, atol=tol * float(ref_values.abs().mean()))
    torch.testing.assert_close(res.scores.double(), chosen, rtol=tol, atol=tol * float(ref_values.abs().mean()))
    if dtype == torch.float32:
        gaps = (ref_values[:, 1:] - ref_values[:, :-1]).abs().min() if k > 1 else torch.tensor(1.0)
        if gaps > 1e-4:
            assert torch.equal(res.indices.cpu(), ref_ids.cpu())
    # The decomposition at the chosen ids is the explain path's (exact) one.
    for name in ("d", "d_k", "shares", "d_hat"):
        assert _rel(getattr(res, name), _gather(getattr(ref, name), res.indices)) < EXPLAIN_TOL, name


def test_zero_weights_ignore_those_attributes(rng):
    q_rows, n, m, c = 2, 45, 23, 16
    q, g = _pair(rng, q_rows, n, m, c, torch.float16)
    w = _weights(rng, m)
    ignored = torch.nonzero(w == 0).flatten() + 1
    before = ad.attr_distance(q, g, topk=5, weights=w)
    g2 = g.clone()
    g2[:, ignored] = (g2[:, ignored].float() * 30.0 + 5.0).half()  # repaint the ignored attributes
    after = ad.attr_distance(q, g2, topk=5, weights=w)
    assert torch.equal(before.indices, after.indices)
    torch.testing.assert_close(before.scores, after.scores, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(before.d_hat, after.d_hat), "the ignored rows did change the unweighted decomposition"


@pytest.mark.parametrize("dtype", DTYPES)
def test_near_duplicates_give_small_distances_not_nan(rng, dtype):
    q_rows, m, c = 2, 23, 48
    q = _embeddings(rng, q_rows, m, c) * 4.0
    q = q.to(dtype).float()  # queries representable in the gallery dtype: exact duplicates exist
    dup = q.to(dtype)
    near = (q + 0.05 * _embeddings(rng, q_rows, m, c)).to(dtype)
    g = torch.cat([dup, near, _embeddings(rng, 31, m, c).to(dtype) * 4.0])
    res = ad.attr_distance(q, g)
    for name in FIELDS:
        assert torch.isfinite(getattr(res, name)).all(), name
    assert (res.d >= 0).all() and (res.d_k >= 0).all()
    # Cancellation in ‖a‖² + ‖b‖² − 2ab leaves ~sqrt(eps · 2‖a‖²): a small absolute error, never NaN.
    # eps = 2^-16 covers fp32 accumulation of C = 48 exact 16-bit products and 3xTF32 (fp32 galleries on a GPU).
    bound = 4 * float(q.norm(dim=-1).max()) * math.sqrt(2 * 2.0**-16)
    for i in range(q_rows):
        assert float(res.d[i, i]) <= bound and float(res.d_k[i, i].max()) <= bound
    torch.testing.assert_close(res.shares.sum(-1), torch.ones_like(res.d), atol=1e-5, rtol=0)

    # Explain subtracts directly: an exact duplicate is exactly 0 and its shares are the documented 1/M.
    ids = torch.arange(q_rows, device=DEVICE)[:, None].repeat(1, 2)
    ids[:, 1] += q_rows
    exp = ad.explain_topk(q, g, ids)
    assert (exp.d[:, 0] == 0).all() and (exp.d_k[:, 0] == 0).all() and (exp.d_hat[:, 0] == 0).all()
    assert torch.equal(exp.shares[:, 0], torch.full_like(exp.shares[:, 0], 1.0 / m))
    assert (exp.d[:, 1] > 0).all()
    top1 = ad.attr_distance(q, g, topk=1)
    assert (top1.d[:, 0] <= float(exp.d[:, 1].min()) + bound).all()


@pytest.mark.parametrize(
    ("dtype", "weighted", "ids_dtype"),
    [(torch.float16, True, torch.int64), (torch.bfloat16, False, torch.int32), (torch.float32, True, torch.int32)],
)
def test_explain_equals_full_matrix_at_ids(rng, dtype, weighted, ids_dtype):
    q_rows, n, m, c, k = 4, 50, 26, 40, 6
    mean = rng.normal(scale=0.7, size=(m + 1, c))
    q = _embeddings(rng, q_rows, m, c, mean)
    # A non-contiguous gallery ([M+1, N, C] storage), as a store laid out by attribute would hand over.
    g = _embeddings(rng, n, m, c, mean).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
    assert not g.is_contiguous()
    ids = torch.from_numpy(rng.integers(0, n, size=(q_rows, k))).to(device=DEVICE, dtype=ids_dtype)
    ids[0, 1] = ids[0, 0]  # repeats are allowed
    w = _weights(rng, m) if weighted else None
    pair, per_attr = torch.full((q_rows, k), float("nan"), device=DEVICE), torch.full((q_rows, k, m), -1.0)
    per_attr = per_attr.to(DEVICE)
    out = ad.AttrDistances(pair, per_attr, per_attr.clone(), pair.clone(), pair.clone())
    res = ad.explain_topk(q, g, ids, weights=w, out=out)
    full = ad.attr_distance_reference(q.double(), g.double(), weights=w)
    gathered = ad.explain_topk_reference(q.double(), g.double(), ids, weights=w)
    assert res.indices is ids
    for name in FIELDS:
        got = getattr(res, name)
        assert got.data_ptr() == getattr(out, name).data_ptr()
        assert torch.isfinite(got).all() and (got >= 0).all(), f"{name}: unwritten entries"
        assert _rel(got, _gather(getattr(full, name), ids)) < EXPLAIN_TOL, name
        assert _rel(got, getattr(gathered, name)) < EXPLAIN_TOL, name
    # The scan at those ids agrees to the scan's own tolerance.
    scan = ad.attr_distance(q, g, weights=w)
    assert _rel(_gather(scan.d_k, ids), res.d_k) < SCAN_TOL[dtype]


def test_reference_matches_naive_and_has_safe_gradients(rng):
    q = _embeddings(rng, 3, 4, 6).double()
    g = torch.cat([q[:1], _embeddings(rng, 5, 4, 6).double()])  # g[0] duplicates q[0]: distance exactly 0
    w = torch.tensor([0.0, 1.0, 2.0, 0.5], dtype=torch.float64, device=DEVICE)
    ref = ad.attr_distance_reference(q, g, weights=w)
    naive = ad.attr_distance_naive(q, g, weights=w)
    # The GEMM form cancels at the duplicate: d² is off by ~eps64·‖a‖², so d by ~sqrt of that (a few 1e-8).
    bound = 4 * float(q.norm(dim=-1).max()) * math.sqrt(2 * 2.0**-52)
    torch.testing.assert_close(naive.d.square(), ref.d.square(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(naive.d_k.square(), ref.d_k.square(), rtol=1e-9, atol=1e-12)
    far = torch.ones_like(ref.d, dtype=torch.bool)
    far[0, 0] = False
    for name in FIELDS:
        torch.testing.assert_close(getattr(naive, name)[far], getattr(ref, name)[far], rtol=1e-9, atol=1e-9)
    assert float(ref.d[0, 0]) <= bound and float(ref.d_k[0, 0].max()) <= bound
    # cdist subtracts directly: the duplicate is exactly 0, and zero total distance gives the documented 1/M shares.
    assert float(naive.d[0, 0]) == 0 and torch.equal(naive.shares[0, 0], torch.full((4,), 0.25, dtype=torch.float64))

    qg = q.clone().requires_grad_(True)
    out = ad.attr_distance_reference(qg, g, weights=w)
    (
        out.d.sum() + out.d_hat.sum() + out.scores.sum() + (out.shares * torch.arange(4.0, device=DEVICE)).sum()
    ).backward()
    assert torch.isfinite(qg.grad).all(), "sqrt at distance 0 must not give NaN gradients"

    def fn(qq, gg):
        r = ad.attr_distance_reference(qq, gg, weights=w)
        return r.d, r.d_k, r.shares, r.d_hat, r.scores

    assert torch.autograd.gradcheck(fn, (q[1:].clone().requires_grad_(True), g[1:].clone().requires_grad_(True)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings under the interpreter
def test_unchecked_non_finite_gallery_is_not_silent(rng):
    q, g = _pair(rng, 2, 40, 23, 16, torch.float16)
    g[7, 0, 3] = float("nan")
    g[9, 5, 1] = float("inf")
    with pytest.raises(ValueError, match=r"gallery items \[7, 9\]"):
        ad.attr_distance(q, g)
    res = ad.attr_distance(q, g, check_finite=False)
    assert torch.isnan(res.d[:, 7]).all() and not torch.isfinite(res.d_k[:, 9, 4]).any()
    assert torch.isfinite(res.d[:, :7]).all()
    with pytest.raises(ValueError, match=r"gallery items \[7\] contain NaN"):
        ad.attr_distance(q, g, topk=1, check_finite=False)  # NaN ranks first, the explain step reports it
    with pytest.raises(ValueError, match=r"gallery items \[9\] contain NaN or inf"):
        ad.explain_topk(q, g, torch.tensor([[1, 9], [2, 3]], device=DEVICE))


def _good(rng):
    return _pair(rng, 2, 20, 3, 8, torch.float16)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("q_2d", ValueError, r"q must be \[Q, M\+1, C\]"),
        ("c_mismatch", ValueError, r"disagree on \(M\+1, C\)"),
        ("no_attr_rows", ValueError, r"M\+1 >= 2"),
        ("empty", ValueError, "empty input"),
        ("float64_gallery", TypeError, "gallery dtype"),
        ("int_query", TypeError, "floating-point"),
        ("nan_query", ValueError, "q contains NaN"),
        ("weights_shape", ValueError, r"weights must have shape \[M\] = \[3\]"),
        ("weights_negative", ValueError, "must be >= 0"),
        ("weights_zero", ValueError, "all zero"),
        ("weights_nan", ValueError, "weights contain NaN"),
        ("topk_zero", ValueError, r"topk must be an int in \[1, N = 20\]"),
        ("topk_too_big", ValueError, r"topk must be an int in \[1, N = 20\]"),
        ("topk_bool", ValueError, "topk must be an int"),
        ("sqnorm_shape", ValueError, r"g_sqnorm must be float32 \[N, M\+1\]"),
        ("sqnorm_nan", ValueError, "g_sqnorm contains NaN"),
        ("out_shape", ValueError, r"out.d_k must be float32 \[2, 20, 3\]"),
        ("out_with_topk", ValueError, "out is only for the full matrix"),
        ("ids_float", TypeError, "ids must be int32 or int64"),
        ("ids_rows", ValueError, r"ids must be \[Q, k\] = \[2, k >= 1\]"),
        ("ids_negative", ValueError, r"ids\[1, 0\] = -1 is not a gallery id \(N = 20\)"),
        ("ids_too_big", ValueError, r"ids\[0, 1\] = 20 is not a gallery id"),
        ("explain_nan_query", ValueError, r"queries \[1\] contain NaN"),
    ],
)
def test_bad_input_raises_clear_error(rng, case, error, match):
    q, g = _good(rng)
    ids = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    kwargs: dict = {}
    explain = case.startswith(("ids_", "explain_"))
    if case == "q_2d":
        q = q[:, 0]
    elif case == "c_mismatch":
        q = q[:, :, :5]
    elif case == "no_attr_rows":
        q, g = q[:, :1], g[:, :1]
    elif case == "empty":
        g = g[:0]
    elif case == "float64_gallery":
        g = g.double()
    elif case == "int_query":
        q = q.int()
    elif case in ("nan_query", "explain_nan_query"):
        q[1, 2, 3] = float("nan")
    elif case.startswith("weights_"):
        kwargs["weights"] = {
            "weights_shape": [1.0, 2.0],
            "weights_negative": [1.0, -0.5, 0.0],
            "weights_zero": [0.0, 0.0, 0.0],
            "weights_nan": [1.0, float("nan"), 0.0],
        }[case]
    elif case.startswith("topk_"):
        kwargs["topk"] = {"topk_zero": 0, "topk_too_big": 21, "topk_bool": True}[case]
    elif case.startswith("sqnorm_"):
        sq = g.float().square().sum(-1)
        kwargs["g_sqnorm"] = sq[:, :2] if case == "sqnorm_shape" else sq.index_fill(0, torch.tensor([4]), math.inf)
    elif case == "out_shape":
        good = ad.attr_distance(q, g)
        kwargs["out"] = good._replace(d_k=good.d_k[:, :, :2])
    elif case == "out_with_topk":
        kwargs.update(out=ad.attr_distance(q, g), topk=2)
    elif case == "ids_float":
        ids = ids.float()
    elif case == "ids_rows":
        ids = ids[:1]
    elif case == "ids_negative":
        ids[1, 0] = -1
    elif case == "ids_too_big":
        ids[0, 1] = 20
    with pytest.raises(error, match=match):
        if explain:
            ad.explain_topk(q, g, ids, **kwargs)
        else:
            ad.attr_distance(q, g, **kwargs)


def test_cpu_tensors_are_refused_without_the_interpreter(rng, monkeypatch):
    monkeypatch.setattr(ad, "_INTERPRET", False)
    q = torch.randn(2, 3, 8)
    g = torch.randn(5, 3, 8).half()
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ad.attr_distance(q, g)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ad.explain_topk(q, g, torch.zeros(2, 1, dtype=torch.int64))


def test_kernels_compile_for_sm90_without_a_gpu(aot_sm90):
    """The interpreter never lowers the kernels: compile them for an H100 (ahead of time, bundled ptxas)."""
    async_copies = aot_sm90("attr_distance")
    # The gallery loop is software-pipelined (cp.async into shared memory), which the memory roofline needs.
    for name in ("scan0", "scan1", "scan2", "scan_fp32"):
        assert async_copies[name] > 0, (name, async_copies)
