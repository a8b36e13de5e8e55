import math

import numpy as np
import pytest

from attrimeter.engine import explanation_metrics
from attrimeter.engine.explanation_metrics import (
    adre,
    attribute_accuracy,
    average_precision,
    counterfactual_scores,
    x_map_c,
    x_map_e,
)


def slow_average_precision(scores, relevant):
    """One row at a time with plain Python: sort by (-score, column), walk the ranking."""
    out = []
    for s, rel in zip(scores.tolist(), relevant.tolist(), strict=True):
        order = sorted(range(len(s)), key=lambda k: (-s[k], k))
        found, precisions = 0, []
        for rank, k in enumerate(order, start=1):
            if rel[k]:
                found += 1
                precisions.append(found / rank)
        out.append(sum(precisions) / found if found else math.nan)
    return np.array(out)


def test_average_precision_by_hand():
    scores = np.array([
        [0.9, 0.8, 0.7, 0.6],  # relevant at ranks 1 and 3: (1/1 + 2/3) / 2 = 5/6
        [0.7, 0.9, 0.6, 0.8],  # ranking cols 1, 3, 0, 2; relevant cols 0, 1 at ranks 3, 1: 5/6 again
        [0.1, 0.9, 0.2, 0.3],  # relevant col 3 at rank 2: 1/2
        [0.4, 0.3, 0.2, 0.1],  # all relevant: (1/1 + 2/2 + 3/3 + 4/4) / 4 = 1
        [0.4, 0.3, 0.2, 0.1],  # nothing relevant: NaN
    ])
    relevant = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    ap = average_precision(scores, relevant)
    assert ap.dtype == np.float64
    np.testing.assert_allclose(ap[:4], [5 / 6, 5 / 6, 1 / 2, 1.0])
    assert np.isnan(ap[4])


def test_average_precision_ties_follow_column_order():
    # All scores equal: the ranking is the column order, so relevant col 2 sits at rank 3 (AP 1/3), col 0 at rank 1.
    scores = np.full((3, 3), 0.5)
    relevant = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 1]])  # 0/1 ints are accepted
    # Row 3: cols 1, 2 at ranks 2, 3: (1/2 + 2/3) / 2 = 7/12.
    np.testing.assert_allclose(average_precision(scores, relevant), [1 / 3, 1.0, 7 / 12])


@pytest.mark.parametrize("chunk_elements", [None, 5])
def test_average_precision_matches_slow_loop(rng, monkeypatch, chunk_elements):
    if chunk_elements is not None:  # several chunks, the last one partial
        monkeypatch.setattr(explanation_metrics, "_CHUNK_ELEMENTS", chunk_elements)
    p, m = 200, int(rng.integers(1, 30))
    scores = rng.integers(0, 4, size=(p, m)) / 4.0  # few distinct values: many ties
    relevant = rng.random((p, m)) < rng.random()
    ap = average_precision(scores, relevant)
    ref = slow_average_precision(scores, relevant)
    np.testing.assert_array_equal(np.isnan(ap), np.isnan(ref))
    np.testing.assert_allclose(ap[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-12)


def test_x_map_e_and_x_map_c_by_hand():
    shares = np.array([
        [0.5, 0.3, 0.2, 0.0],
        [0.1, 0.6, 0.1, 0.2],
        [0.25, 0.25, 0.25, 0.25],
        [0.4, 0.3, 0.2, 0.1],
    ])
    differ = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    # X-mAP_e (descending, relevant = differ), row 2 has no differing attribute and is left out:
    #   row 0: ranking cols 0,1,2,3, differing cols 1,2 at ranks 2,3: (1/2 + 2/3) / 2 = 7/12
    #   row 1: col 1 at rank 1: 1;  row 3: all differ: 1.   mean = (7/12 + 1 + 1) / 3 = 31/36
    assert x_map_e(shares, differ) == pytest.approx(31 / 36)
    # X-mAP_c (ascending, relevant = common), row 3 has no common attribute and is left out:
    #   row 0: ascending cols 3,2,1,0, common cols 3,0 at ranks 1,4: (1/1 + 2/4) / 2 = 3/4
    #   row 1: ascending cols 0,2,3,1 (tie 0.1 kept in column order), common cols 0,2,3 at ranks 1,2,3: 1
    #   row 2: all common: 1.   mean = (3/4 + 1 + 1) / 3 = 11/12
    assert x_map_c(shares, differ) == pytest.approx(11 / 12)
    assert x_map_c(shares, differ.astype(bool)) == pytest.approx(11 / 12)


def test_x_map_leaves_unknown_attributes_out_by_hand():
    shares = np.array([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    differ = np.array([[0, 1, 1, 0], [1, 0, 0, 0]])
    known = np.array([[0, 1, 1, 1], [0, 1, 1, 1]])  # col 0 (the largest share) unknown in both pairs
    # Without the mask, row 0: differing cols 1,2 at ranks 2,3 -> (1/2 + 2/3) / 2 = 7/12; row 1: col 0 at rank 1 -> 1.
    assert x_map_e(shares, differ) == pytest.approx((7 / 12 + 1) / 2)
    # With it, row 0 ranks cols 1,2,3: differing cols 1,2 at ranks 1,2 -> 1; row 1's only differing attribute is
    # unknown, so the row has none and is left out.
    assert x_map_e(shares, differ, known) == pytest.approx(1.0)
    # X-mAP_c without the mask, row 0: ascending cols 3,2,1,0, common cols 3,0 at ranks 1,4 -> 3/4;
    # row 1: common cols 1,2,3 at ranks 3,2,1 -> 1.  With it, col 0 is not common: row 0 -> col 3 at rank 1 -> 1.
    assert x_map_c(shares, differ) == pytest.approx((3 / 4 + 1) / 2)
    assert x_map_c(shares, differ, known) == pytest.approx(1.0)
    assert x_map_c(shares, differ, known.astype(bool)) == pytest.approx(1.0)
    assert x_map_e(shares, differ, np.ones_like(known)) == pytest.approx(x_map_e(shares, differ))


def test_x_map_without_qualifying_rows_is_nan():
    shares = np.full((2, 3), 1 / 3)
    assert math.isnan(x_map_e(shares, np.zeros((2, 3))))
    assert math.isnan(x_map_c(shares, np.ones((2, 3))))


def test_x_map_is_one_for_perfectly_separated_shares(rng):
    # Every differing attribute gets a larger share than every common one: both rankings are perfect.
    p, m = 100, int(rng.integers(2, 30))
    differ = rng.random((p, m)) < 0.3
    raw = np.where(differ, 1.0 + rng.random((p, m)), rng.random((p, m)))
    shares = raw / raw.sum(1, keepdims=True)
    assert x_map_e(shares, differ) == pytest.approx(1.0)
    assert x_map_c(shares, differ) == pytest.approx(1.0)
    # Reversed shares put the relevant attributes last, so both must drop (unless every row is all one kind).
    mixed = differ.any(1) & ~differ.all(1)
    if mixed.any():
        assert x_map_e(-shares[mixed], differ[mixed]) < 1.0
        assert x_map_c(-shares[mixed], differ[mixed]) < 1.0


def test_adre_by_hand():
    # Pairs with d > 0: |2 - 1.9| / 2 = 0.05, |4 - 4.4| / 4 = 0.1, |1 - 1| / 1 = 0; the d = 0 pair is left out.
    # mean = 0.15 / 3 = 0.05 -> 5 %.
    assert adre([2.0, 4.0, 0.0, 1.0], [1.9, 4.4, 0.3, 1.0]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match=r"d \(3,\) and d_hat \(2,\)"):
        adre([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="d > 0"):
        adre([0.0, 0.0], [0.1, 0.2])


def test_counterfactual_scores_by_hand():
    shares = np.array([
        [0.6, 0.2, 0.2],  # changed col 0 ranked 1st: top-1 hit, RR 1
        [0.2, 0.5, 0.3],  # ranking cols 1,2,0: changed col 0 at rank 3, RR 1/3
        [0.4, 0.4, 0.2],  # tie broken by column: cols 0,1,2, changed col 1 at rank 2, RR 1/2
        [0.1, 0.3, 0.6],  # changed cols 1,2: col 2 ranked 1st, RR 1
    ])
    changed = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1]], dtype=bool)
    top1, mrr = counterfactual_scores(shares, changed)
    # top-1 = 2 / 4; MRR = (1 + 1/3 + 1/2 + 1) / 4 = 17/24
    assert top1 == pytest.approx(0.5)
    assert mrr == pytest.approx(17 / 24)


def test_counterfactual_scores_rejects_rows_without_change():
    with pytest.raises(ValueError, match="row 1"):
        counterfactual_scores(np.full((3, 2), 0.5), [[1, 0], [0, 0], [0, 0]])
    with pytest.raises(ValueError, match="at least one pair"):
        counterfactual_scores(np.zeros((0, 2)), np.zeros((0, 2), dtype=bool))


def test_attribute_accuracy_by_hand():
    logits = np.array([[1.0, -1.0, 0.0], [-2.0, 3.0, 0.5]])
    labels = np.array([[1, 0, 1], [0, 0, 1]])
    # predictions (logit > 0; 0 predicts negative) [[1,0,0],[0,1,1]] -> correct [[T,T,F],[T,F,T]]
    mean, per_attr = attribute_accuracy(logits, labels)
    assert mean == pytest.approx(4 / 6)
    np.testing.assert_allclose(per_attr, [1.0, 0.5, 0.5])


def test_attribute_accuracy_leaves_unknown_labels_out_by_hand():
    logits = np.array([[1.0, -1.0, 2.0], [1.0, 1.0, -1.0]])
    labels = np.array([[1, -1, -1], [0, 1, -1]])
    # Known entries: (0,0) 1 vs 1 right, (1,0) 1 vs 0 wrong, (1,1) 1 vs 1 right: 2/3; column 2 has no known label.
    mean, per_attr = attribute_accuracy(logits, labels)
    assert mean == pytest.approx(2 / 3)
    np.testing.assert_allclose(per_attr[:2], [0.5, 1.0])
    assert math.isnan(per_attr[2])
    with pytest.raises(ValueError, match="at least one known label"):
        attribute_accuracy(logits, np.full((2, 3), -1))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: average_precision(np.zeros((2, 3)), np.zeros((2, 4), dtype=bool)), r"scores \(2, 3\) and relevant"),
        (lambda: average_precision(np.zeros(3), np.zeros(3, dtype=bool)), "must be 2-D"),
        (lambda: average_precision(np.zeros((1, 2)), [[1, 2]]), "relevant must hold only 0 and 1"),
        (lambda: x_map_e(np.zeros((2, 3)), np.zeros((3, 2))), r"shares \(2, 3\) and differ \(3, 2\)"),
        (lambda: x_map_c(np.zeros((1, 2)), [[0.5, 1.0]]), "differ must hold only 0 and 1"),
        (lambda: counterfactual_scores(np.zeros((2, 3)), np.ones((2, 2))), r"shares and changed"),
        (lambda: attribute_accuracy(np.zeros((2, 3)), np.ones((2, 3, 1))), r"logits and labels"),
        (lambda: attribute_accuracy(np.zeros((1, 2)), [[1, 2]]), "labels must hold only 0 and 1, or -1"),
        (lambda: x_map_e(np.zeros((1, 2)), [[0, 1]], [[1, 1, 1]]), r"known must have the shape .* \(1, 3\)"),
        (lambda: x_map_c(np.zeros((1, 2)), [[0, 1]], [[1, -1]]), "known must hold only 0 and 1"),
        (lambda: attribute_accuracy(np.zeros((0, 2)), np.zeros((0, 2))), "at least one entry"),
    ],
)
def test_errors_name_the_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_finite_or_negative_values_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        x_map_e([[np.nan, 0.1, 0.9]], [[1, 0, 0]])
    with pytest.raises(ValueError, match="NaN"):
        counterfactual_scores([[np.nan, 0.1, 0.9]], [[True, False, False]])
    with pytest.raises(ValueError, match="finite distances"):
        adre([1.0, np.nan], [1.0, 5.0])
    with pytest.raises(ValueError, match="finite distances"):
        adre([1.0, -3.0], [1.0, 5.0])
