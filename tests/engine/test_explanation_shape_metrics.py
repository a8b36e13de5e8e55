"""The metrics that expose flat explanations (issue: sharp, localised, faithful explanations), by hand."""

import math

import numpy as np
import pytest

from attrimeter.engine.explanation_metrics import (
    PaperAccumulator,
    aam_localisation,
    counterfactual_shares,
    paper_average_precisions,
    share_concentration,
)
from attrimeter.viz import resize_bilinear


def test_counterfactual_shares_by_hand():
    shares = np.array([[0.5, 0.3, 0.1, 0.1],   # one change (col 0): 0.5 >= sqrt(1/4) = 0.5 -> met; lift 0.5/0.25
                       [0.1, 0.2, 0.3, 0.4]])  # two changes (cols 2, 3): 0.7 < sqrt(2/4) = 0.707 -> not met
    changed = np.array([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=bool)
    out = counterfactual_shares(shares, changed)
    assert out["cf_share"] == pytest.approx((0.5 + 0.7) / 2)
    assert out["cf_lift"] == pytest.approx((0.5 / 0.25 + 0.7 / 0.5) / 2)
    assert out["prior_met"] == pytest.approx(0.5)


def test_counterfactual_shares_refuses_rows_without_change():
    with pytest.raises(ValueError, match="no changed attribute"):
        counterfactual_shares(np.full((2, 2), 0.5), [[1, 0], [0, 0]])


def test_share_concentration_extremes_and_by_hand():
    assert share_concentration(np.full((3, 4), 0.25)) == pytest.approx((0.25, 1.0))
    assert share_concentration(np.array([[1.0, 0.0, 0.0]])) == pytest.approx((1.0, 0.0))
    p = np.array([0.5, 0.25, 0.25])
    entropy = -(p * np.log(p)).sum() / math.log(3)
    assert share_concentration(p[None]) == pytest.approx((0.5, entropy))
    with pytest.raises(ValueError, match=">= 0"):
        share_concentration(np.array([[1.5, -0.5]]))


def test_paper_protocol_all_agree_rule_by_hand():
    # M = 4, lamda = 2: shares above 2/4 = 0.5 are not relevant on a pair whose attributes all agree, the ranking is
    # largest first and the AP is divided by M.
    shares = np.array([[0.7, 0.1, 0.1, 0.1],     # ranking 0,1,2,3: relevant 1,2,3 at ranks 2,3,4 -> (1/2+2/3+3/4)/4
                       [0.25, 0.25, 0.25, 0.25],  # nothing above 0.5: AP = 1
                       [0.4, 0.3, 0.2, 0.1]])     # differs on col 0 only: ap_e 1; common 1,2,3 ranked 3,2,1 -> 1
    differ = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
    ap_e, ap_c = paper_average_precisions(shares, differ)
    assert np.isnan(ap_e[:2]).all() and ap_e[2] == pytest.approx(1.0)
    assert ap_c == pytest.approx([(1 / 2 + 2 / 3 + 3 / 4) / 4, 1.0, 1.0])


def test_paper_accumulator_matches_one_shot(rng):
    shares = rng.dirichlet(np.ones(5), size=40)
    differ = rng.random((40, 5)) < 0.3
    d = rng.uniform(1, 2, 40)
    d_hat = d * rng.uniform(0.9, 1.1, 40)
    whole, parts = PaperAccumulator(), PaperAccumulator()
    whole.add(shares, differ, d, d_hat)
    for s in (slice(0, 13), slice(13, 40)):
        parts.add(shares[s], differ[s], d[s], d_hat[s])
    ap_e, ap_c = paper_average_precisions(shares, differ)
    expected = {"x_map_e": np.nanmean(ap_e), "x_map_c": np.nanmean(ap_c),
                "adre": np.mean(np.abs(d - d_hat) / d) * 100, "pairs": 40}
    assert whole.result() == pytest.approx(expected)
    assert parts.result() == pytest.approx(expected)


def test_paper_protocol_leaves_unknown_attributes_out():
    shares = np.array([[0.1, 0.2, 0.3, 0.4]])
    differ = np.array([[0, 0, 0, 1]], dtype=bool)
    known = np.array([[1, 1, 0, 1]], dtype=bool)
    ap_e, ap_c = paper_average_precisions(shares, differ, known)
    # Known: cols 0, 1, 3. Differing col 3 ranks first; common cols 0, 1 rank first ascending: both APs 1.
    assert ap_e[0] == pytest.approx(1.0) and ap_c[0] == pytest.approx(1.0)


def test_aam_localisation_by_hand():
    # One image, three attributes, 2x2 maps on a 4x4 image.
    aam = np.zeros((1, 3, 2, 2))
    aam[0, 0, 0, 0] = 1.0  # peaks in the top-left quarter
    aam[0, 1, 1, 1] = 1.0  # peaks in the bottom-right quarter
    aam[0, 2] = 1.0        # flat: points nowhere
    masks = np.zeros((1, 3, 4, 4), dtype=bool)
    masks[0, 0, :2, :2] = True   # attribute 0 is top-left: hit
    masks[0, 1, :2, :2] = True   # attribute 1 is top-left too: miss
    pointing, mass = aam_localisation(aam, masks)
    assert pointing[0, 0] == 1.0 and pointing[0, 1] == 0.0 and np.isnan(pointing[0, 2])
    assert np.isnan(mass[0, 2])
    up = resize_bilinear(aam[0, 0], 4, 4)
    excess = np.maximum(up - up.mean(), 0)
    assert mass[0, 0] == pytest.approx(excess[:2, :2].sum() / excess.sum())
    assert mass[0, 0] > 0.9 and mass[0, 1] < 0.1
    # A tolerance of 2 pixels reaches the top-left mask from the bottom-right peak's neighbourhood? The peak of map 1
    # is pixel (2, 2) or further; the mask ends at (1, 1): Chebyshev distance 1 at (2, 2).
    pointing, _ = aam_localisation(aam, masks, tolerance=3)
    assert pointing[0, 1] == 1.0


def test_aam_localisation_flat_map_has_no_mass_inside():
    masks = np.zeros((1, 1, 4, 4), dtype=bool)
    masks[0, 0, 0, 0] = True
    _, mass = aam_localisation(np.ones((1, 1, 2, 2)), masks)
    assert mass[0, 0] == 0.0
    with pytest.raises(ValueError, match="agree on N and M"):
        aam_localisation(np.ones((1, 2, 2, 2)), masks)
