import math

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from attrimeter.engine.losses import (
    DIFFER_WEIGHT,
    SIMILAR_WEIGHT,
    attribute_prior,
    attribute_prior_terms,
    colour_prior,
    metric_distillation,
    positive_ratio,
    weighted_bce,
)


def random_shares(rng, p, m):
    return torch.softmax(torch.from_numpy(rng.normal(scale=2.0, size=(p, m))), dim=1)


def test_metric_distillation_by_hand_and_detached():
    d = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    d_hat = torch.tensor([1.5, 2.0, 1.0], requires_grad=True)
    loss = metric_distillation(d, d_hat)
    # (|1 - 1.5| + |2 - 2| + |3 - 1|) / 3 = (0.5 + 0 + 2) / 3
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(2.5 / 3)
    loss.backward()
    # d/d d_hat of |d - d_hat| / 3 = sign(d_hat - d) / 3; the target distance gets no gradient.
    assert d_hat.grad.tolist() == pytest.approx([1 / 3, 0.0, -1 / 3])
    assert d.grad is None


def test_attribute_prior_one_differing_attribute_by_hand():
    # M = 4, e = [1,0,0,0], p = [0.1,0.3,0.3,0.3]: N_e = 1, r = sqrt(1/4) = 0.5.
    # L_dsum = ReLU(0.5 - 0.1) = 0.4;  L_ssum = ReLU(0.9 - (1 - 0.5)) = 0.4.
    # a = 3 * 0.5 + 0.004 = 1.504, b = 1 * 0.5 + 0.001 = 0.501, lambda = 0.5 ln(1.504 / 0.501) = 0.549639,
    # lambda_d = sqrt(0.501 / 1.504) = 0.577158, lambda_s = sqrt(1.504 / 0.501) = 1.732627.
    # L_d = ReLU(0.577158 * 0.5 / 1 - 0.1) = 0.188579 (only k = 0 differs).
    # L_s = 3 * ReLU(0.3 - 1.732627 * 0.5 / 3) = 3 * (0.3 - 0.288771) = 3 * 0.011229 = 0.033687.
    # L_ap = 0.4 + 10 * 0.188579 + 0.4 + 10 * 0.033687 = 3.022657.
    p = torch.tensor([[0.1, 0.3, 0.3, 0.3]], dtype=torch.float64)
    e = torch.tensor([[1, 0, 0, 0]])
    terms = attribute_prior_terms(p, e)
    assert terms["dsum"].item() == pytest.approx(0.4)
    assert terms["ssum"].item() == pytest.approx(0.4)
    assert terms["d"].item() == pytest.approx(0.188579, abs=1e-6)
    assert terms["s"].item() == pytest.approx(0.033687, abs=1e-6)
    assert attribute_prior(p, e).item() == pytest.approx(3.022657, abs=1e-6)
    assert attribute_prior(p, e.bool()).item() == pytest.approx(3.022657, abs=1e-6)


def test_attribute_prior_leaves_unknown_attributes_out_by_hand():
    # M = 5, attribute 4 unknown (share 0.2 among p = [0.1, 0.3, 0.3, 0.2, 0.1]): it neither differs nor agrees, so
    # the prior sees M = 4 known attributes, e = [1,0,0,0] on them: N_e = 1, r = 0.5 (as in the case above).
    # L_dsum = ReLU(0.5 - 0.1) = 0.4;  L_ssum = ReLU((0.3 + 0.3 + 0.2) - 0.5) = 0.3.
    # lambda_d = 0.577158, lambda_s = 1.732627 (a, b as above); L_d = 0.577158 * 0.5 - 0.1 = 0.188579.
    # L_s = ReLU(0.3 - 0.288771) * 2 + ReLU(0.2 - 0.288771) = 0.022458.
    # L_ap = 0.4 + 10 * 0.188579 + 0.3 + 10 * 0.022458 = 2.810368.
    p = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.1]], dtype=torch.float64)
    known = torch.tensor([[True, True, True, True, False]])
    for unknown_differs in (0, 1):  # what differ says where the attribute is unknown does not matter
        e = torch.tensor([[1, 0, 0, 0, unknown_differs]])
        terms = attribute_prior_terms(p, e, known)
        assert terms["dsum"].item() == pytest.approx(0.4)
        assert terms["ssum"].item() == pytest.approx(0.3)
        assert terms["d"].item() == pytest.approx(0.188579, abs=1e-6)
        assert terms["s"].item() == pytest.approx(0.022458, abs=1e-6)
        assert attribute_prior(p, e, known).item() == pytest.approx(2.810368, abs=1e-6)
    assert attribute_prior(p, torch.tensor([[1, 0, 0, 0, 0]])).item() != pytest.approx(2.810368, abs=1e-3)
    # No known attribute: nothing to ask of the shares.
    terms = attribute_prior_terms(p, torch.ones(1, 5), torch.zeros(1, 5, dtype=torch.bool))
    assert all(v.item() == 0.0 for v in terms.values())


def test_attribute_prior_with_all_known_equals_no_mask(rng):
    p = random_shares(rng, 7, 6)
    e = torch.from_numpy(rng.integers(0, 2, (7, 6)))
    assert attribute_prior(p, e, torch.ones(7, 6)).item() == pytest.approx(attribute_prior(p, e).item(), rel=1e-12)


def test_attribute_prior_is_the_mean_over_pairs():
    # Pair 1: the case above, L_ap = 3.022657.
    # Pair 2: M = 4, e = [1,1,0,0], p = [0.25]*4: N_e = 2, r = sqrt(0.5) = 0.707107.
    # L_dsum = 0.707107 - 0.5 = 0.207107;  L_ssum = 0.5 - (1 - 0.707107) = 0.207107.
    # a = 2 * 0.707107 + 0.004 = 1.418214, b = 2 * 0.292893 + 0.001 = 0.586786,
    # lambda_d = sqrt(b / a) = 0.643234, lambda_s = 1 / 0.643234 = 1.554643.
    # L_d = 2 * ReLU(0.643234 * 0.707107 / 2 - 0.25) = 2 * ReLU(0.227418 - 0.25) = 0 (clipped).
    # L_s = 2 * ReLU(0.25 - 1.554643 * 0.292893 / 2) = 2 * (0.25 - 0.227672) = 0.044655.
    # L_ap = 0.207107 + 0 + 0.207107 + 10 * 0.044655 = 0.860769; mean = (3.022657 + 0.860769) / 2 = 1.941713.
    p = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    e = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.float64)
    terms = attribute_prior_terms(p, e)
    assert terms["d"][1].item() == 0.0
    assert terms["s"][1].item() == pytest.approx(0.044655, abs=1e-6)
    assert terms["dsum"][1].item() == pytest.approx(0.207107, abs=1e-6)
    assert attribute_prior(p, e).item() == pytest.approx(1.941713, abs=1e-6)


def test_attribute_prior_guards_give_finite_values_and_gradients():
    # Dyadic shares sum to exactly 1, so L_dsum and L_ssum are exactly 0 and the gradients are exact.
    # Pair 1, N_e = M = 4, p = [1/16, 3/16, 4/16, 8/16]: r = 1; lambda from N_e clamped at M - 0.1 = 3.9 (the
    #   authors'): r' = sqrt(3.9 / 4), a = 0.1 r' + 0.004, b = 3.9 (1 - r') + 0.001, lambda = 0.5 ln(a / b) = 0.35951,
    #   lambda_d = 0.69802; L_d = sum_k ReLU(lambda_d * 1 / 4 - p_k) = 0.174504 - 0.0625 = 0.112004 (3/16 > 0.1745);
    #   L_s = 0 (no common attribute). L_ap = 10 * 0.112004 = 1.12004.
    # Pair 2, N_e = 0, p = [0.625, 0.125, 0.125, 0.125]: r = 0; a = 4 * 0 + 0.004, b = 0.001, lambda_s = 2;
    #   L_s = sum_k ReLU(p_k - 2 * 1 / 4) = 0.625 - 0.5 = 0.125; L_d = 0 (no differing attribute). L_ap = 1.25.
    # Mean = (1.12004 + 1.25) / 2 = 1.18502; d/dp_0 is -10/2 for pair 1 and +10/2 for pair 2, 0 elsewhere.
    p = torch.tensor([[0.0625, 0.1875, 0.25, 0.5], [0.625, 0.125, 0.125, 0.125]], requires_grad=True)
    e = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    terms = attribute_prior_terms(p, e)
    for t in terms.values():
        assert torch.isfinite(t).all()
    assert terms["d"].tolist() == pytest.approx([0.112004, 0.0], abs=1e-6)
    assert terms["s"].tolist() == pytest.approx([0.0, 0.125])
    loss = attribute_prior(p, e)
    assert loss.item() == pytest.approx(1.185019, abs=1e-6)
    loss.backward()
    assert torch.isfinite(p.grad).all()
    expected = torch.tensor([[-5.0, 0, 0, 0], [5.0, 0, 0, 0]])
    assert torch.allclose(p.grad, expected, atol=1e-6)


def test_ideal_shares_satisfy_the_sum_terms(rng):
    # p = e / N_e puts the whole distance on the differing attributes: sum_k e_k p_k = 1 >= r and the common
    # attributes carry 0 <= 1 - r, so L_dsum = L_ssum = 0, and no common share exceeds its bound (L_s = 0).
    m = int(rng.integers(1, 30))
    e = rng.random((64, m)) < rng.random()
    e[np.arange(64), rng.integers(0, m, 64)] = True  # at least one differing attribute per pair
    e_t = torch.from_numpy(e)
    p = e_t.float() / e_t.sum(1, keepdim=True)
    terms = attribute_prior_terms(p, e_t)
    assert terms["dsum"].abs().max().item() < 1e-6
    assert terms["ssum"].abs().max().item() < 1e-6
    assert terms["s"].abs().max().item() == 0.0


def test_prior_terms_are_nonnegative_and_masked(rng):
    n, m = 50, int(rng.integers(2, 30))
    p = random_shares(rng, n, m).requires_grad_(True)
    e = torch.from_numpy(rng.random((n, m)) < 0.4)
    terms = attribute_prior_terms(p, e)
    for t in terms.values():
        assert t.shape == (n,) and (t >= 0).all()
    expected = (terms["dsum"] + DIFFER_WEIGHT * terms["d"] + terms["ssum"] + SIMILAR_WEIGHT * terms["s"]).mean()
    assert attribute_prior(p, e).item() == pytest.approx(expected.item())
    assert attribute_prior(p, e.double()).item() == pytest.approx(expected.item())
    # L_d only looks at the shares of the differing attributes, L_s only at those of the common ones.
    (grad_d,) = torch.autograd.grad(terms["d"].sum(), p, retain_graph=True)
    (grad_s,) = torch.autograd.grad(terms["s"].sum(), p)
    assert (grad_d[~e] == 0).all() and (grad_s[e] == 0).all()
    assert torch.isfinite(grad_d).all() and torch.isfinite(grad_s).all()


def test_weighted_bce_by_hand():
    # ratio = [0.25, 0.5]: positives weigh exp(1 - ratio) = [e^0.75, e^0.5], negatives exp(ratio) = [e^0.25, e^0.5].
    # BCE(z, 1) = ln(1 + e^-z), BCE(z, 0) = ln(1 + e^z).
    # [0,0]: z = 0,   y = 1: e^0.75 * ln 2            = 2.117000 * 0.693147 = 1.467393
    # [0,1]: z = 2,   y = 0: e^0.5  * ln(1 + e^2)     = 1.648721 * 2.126928 = 3.506715
    # [1,0]: z = -1,  y = 0: e^0.25 * ln(1 + e^-1)    = 1.284025 * 0.313262 = 0.402236
    # [1,1]: z = 0.5, y = 1: e^0.5  * ln(1 + e^-0.5)  = 1.648721 * 0.474077 = 0.781620
    # mean = (1.467393 + 3.506715 + 0.402236 + 0.781620) / 4 = 1.539491
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([[1, 0], [0, 1]])
    manual = (math.exp(0.75) * math.log(2) + math.exp(0.5) * math.log(1 + math.exp(2))
              + math.exp(0.25) * math.log(1 + math.exp(-1)) + math.exp(0.5) * math.log(1 + math.exp(-0.5))) / 4
    loss = weighted_bce(logits, labels, torch.tensor([0.25, 0.5]))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(manual)
    assert loss.item() == pytest.approx(1.539491, abs=1e-6)


def test_weighted_bce_matches_formula_and_is_stable(rng):
    b, m = 16, int(rng.integers(1, 30))
    z = rng.normal(scale=5.0, size=(b, m))
    z[0, 0] = 200.0  # a naive log(sigmoid) would overflow to inf here
    y = (rng.random((b, m)) < 0.3).astype(np.float64)
    ratio = rng.random(m)
    w = y * np.exp(1 - ratio) + (1 - y) * np.exp(ratio)
    bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    logits = torch.from_numpy(z).requires_grad_(True)
    loss = weighted_bce(logits, torch.from_numpy(y).bool(), torch.from_numpy(ratio))
    assert loss.item() == pytest.approx(float(np.mean(w * bce)), rel=1e-10)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_weighted_bce_leaves_unknown_labels_out_by_hand():
    # Known entries: (0, 0) y = 1, z = 0: w = e^(1 - 0.5), BCE = ln 2; (1, 0) y = 0, z = -1: w = e^0.5,
    # BCE = ln(1 + e^-1) = 0.313262. Mean over the two known entries: e^0.5 (0.693147 + 0.313262) / 2 = 0.829644.
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, -1], [0, -1]])
    loss = weighted_bce(logits, labels, torch.tensor([0.5, 0.2]))
    assert loss.item() == pytest.approx(0.829644, abs=1e-6)
    loss.backward()
    assert logits.grad[:, 1].tolist() == [0.0, 0.0]  # unknown labels pull on nothing
    assert weighted_bce(logits, torch.full((2, 2), -1), torch.tensor([0.5, 0.2])).item() == 0.0


def test_positive_ratio():
    # Column means of [[1,0,1],[1,0,0]]: [2/2, 0/2, 1/2].
    r = positive_ratio(np.array([[1, 0, 1], [1, 0, 0]], dtype=np.uint8))
    assert r.dtype == torch.float32 and r.tolist() == [1.0, 0.0, 0.5]
    assert positive_ratio(torch.tensor([[True, False], [False, False]])).tolist() == [0.5, 0.0]
    # Unknown labels (-1) are left out: [[1,-1,0],[0,-1,-1],[1,1,0]] -> [2/3, 1/1, 0/2].
    r = positive_ratio(np.array([[1, -1, 0], [0, -1, -1], [1, 1, 0]], dtype=np.int8))
    assert r.tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"attribute\(s\) \[1\] have no known label"):
        positive_ratio(np.array([[1, -1], [0, -1]]))
    with pytest.raises(ValueError, match="only 0, 1 and -1"):
        positive_ratio(np.array([[1, 2], [2, 2]]))  # Market's raw 1/2 coding
    with pytest.raises(ValueError, match="only 0, 1 and -1"):
        positive_ratio(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\[N_ids, M\]"):
        positive_ratio(np.zeros((0, 26)))
    with pytest.raises(ValueError, match=r"\[N_ids, M\]"):
        positive_ratio(np.zeros(26))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metric_distillation(torch.zeros(3), torch.zeros(4)), r"d and d_hat .* d \(3,\) and d_hat \(4,\)"),
        (lambda: metric_distillation(torch.zeros(0), torch.zeros(0)), "at least one pair"),
        (lambda: metric_distillation(torch.zeros(2), torch.zeros(2, dtype=torch.long)), "d_hat must be a float"),
        (lambda: attribute_prior(torch.zeros(4), torch.zeros(4)), r"shares must have shape \[P, M\]"),
        (lambda: attribute_prior(torch.zeros(2, 4), torch.zeros(2, 5)), r"differ must have the shape .* \(2, 5\)"),
        (lambda: attribute_prior(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 3)),
         r"known must have the shape .* \(2, 3\)"),
        (lambda: attribute_prior(torch.zeros(0, 4), torch.zeros(0, 4)), "at least one pair"),
        (lambda: attribute_prior(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)), "shares must be a float"),
        (lambda: weighted_bce(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(3)), r"labels must have .* \(2, 4\)"),
        (lambda: weighted_bce(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4)), r"positive_ratio .* \(4,\)"),
        (lambda: weighted_bce(torch.zeros(3), torch.zeros(3), torch.zeros(3)), r"logits must have shape \[B, M\]"),
        (lambda: weighted_bce(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(3)), "B, M >= 1"),
    ],
)
def test_shape_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_losses_match_torch_reference_on_random_batch(rng):
    # metric_distillation is nnf.l1_loss with the target detached.
    d = torch.from_numpy(rng.random(30))
    d_hat = torch.from_numpy(rng.random(30))
    assert metric_distillation(d, d_hat).item() == pytest.approx(nnf.l1_loss(d_hat, d).item())


def test_metric_distillation_margin_by_hand():
    d = torch.tensor([10.0, 10.0, 10.0])
    d_hat = torch.tensor([10.05, 10.3, 8.0], requires_grad=True)
    # margin 1 % of d = 0.1: errors 0.05 (free), 0.3 -> 0.2, 2.0 -> 1.9
    loss = metric_distillation(d, d_hat, margin=0.01)
    assert loss.item() == pytest.approx((0.0 + 0.2 + 1.9) / 3)
    loss.backward()
    assert d_hat.grad.tolist() == pytest.approx([0.0, 1 / 3, -1 / 3])


def test_prior_lambda_clamps_all_differing_pairs_like_the_authors():
    m = 4
    shares = torch.full((1, m), 1 / m)
    t = attribute_prior_terms(shares, torch.ones(1, m))
    # N_e = M: lambda from N_e clamped at M - 0.1 (not from the offsets alone); r stays sqrt(M / M) = 1.
    n = m - 0.1
    r = math.sqrt(n / m)
    lam = 0.5 * math.log(((m - n) * r + 0.004) / (n * (1 - r) + 0.001))
    per_differ = math.exp(-lam) * 1.0 / m
    assert t["d"].item() == pytest.approx(m * max(per_differ - 1 / m, 0.0))
    assert t["dsum"].item() == pytest.approx(0.0)


def test_colour_prior_by_hand():
    # One group of three colours; pair: person a wears colour 0, person b colour 1, neither wears colour 2.
    shares = torch.tensor([[0.3, 0.3, 0.2, 0.2]], requires_grad=True)
    a = torch.tensor([[1, 0, 0, 1]])
    b = torch.tensor([[0, 1, 0, 0]])
    loss = colour_prior(shares, a, b, [torch.tensor([0, 1, 2])], threshold=0.3)
    # worn mean = (0.3 + 0.3) / 2 = 0.3; colour 2 may take 0.3 * 0.3 = 0.09, takes 0.2 -> 0.11
    assert loss.item() == pytest.approx(0.11)
    loss.backward()
    assert shares.grad.tolist()[0] == pytest.approx([-0.15, -0.15, 1.0, 0.0])
    assert colour_prior(shares, a, b, []).item() == 0.0
    with pytest.raises(ValueError, match="shape of shares"):
        colour_prior(shares, a[:, :3], b, [torch.tensor([0])])
