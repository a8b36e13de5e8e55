"""Storage codecs: error bounds per kind, odd shapes, named errors, serialisation round-trips."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from attrimeter.runtime.codecs import CODEC_KINDS, STORAGE_MODES, codec_from_json, make_codec
from attrimeter.runtime.errors import CodecError

SHAPES = [(1, 1), (3, 7), (5, 33), (26, 64)]


def _rows(rng: np.random.Generator, n: int, shape: tuple[int, int], scale: float = 3.0) -> np.ndarray:
    """Embedding-like rows: a per-attribute offset plus noise with a decaying spectrum."""
    m, d = shape
    offset = rng.normal(0, 2 * scale, (m, d))
    spectrum = scale / np.sqrt(1 + np.arange(d))
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return (offset + (rng.normal(size=(n, m, d)) * spectrum) @ basis.T).astype(np.float32)


def _fitted(kind: str, shape: tuple[int, int], train: np.ndarray, **params: object):
    codec = make_codec(kind, shape, **params)
    codec.fit(train)
    return codec


@pytest.mark.parametrize("shape", SHAPES)
def test_float_codecs_bounds(shape):
    rng = np.random.default_rng(1)
    x = _rows(rng, 9, shape)
    assert np.array_equal(make_codec("float32", shape).decode(make_codec("float32", shape).encode(x)), x)
    codec = make_codec("float16", shape)
    out = codec.decode(codec.encode(x))
    assert out.dtype == np.float32 and out.shape == x.shape
    assert (np.abs(out - x) <= np.abs(x) * 2.0 ** -11 + 1e-7).all()
    assert codec.bytes_per_entry() == 2 * shape[0] * shape[1]


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_is_half_a_step(shape):
    rng = np.random.default_rng(2)
    x = _rows(rng, 11, shape)
    x[0, 0] = 0.0  # an all-zero row decodes to zeros
    codec = make_codec("int8", shape)
    stored = codec.encode(x)
    out = codec.decode(stored)
    absmax = np.abs(x).max(-1, keepdims=True)
    assert (np.abs(out - x) <= absmax / 254 * (1 + 2.0 ** -9) + 1e-12).all()
    assert np.array_equal(out[0, 0], np.zeros(shape[1], np.float32))
    assert codec.bytes_per_entry() == shape[0] * shape[1] + 2 * shape[0]
    assert stored["codes"].dtype == np.int8 and stored["scales"].dtype == np.float16


@pytest.mark.parametrize("shape", SHAPES)
def test_uint8_error_on_maps(shape):
    rng = np.random.default_rng(3)
    x = rng.exponential(2.0, (7, *shape)).astype(np.float32)
    codec = make_codec("uint8", shape)
    out = codec.decode(codec.encode(x))
    assert (np.abs(out - x) <= x.max(-1, keepdims=True) / 510 * (1 + 2.0 ** -9) + 1e-12).all()
    with pytest.raises(CodecError, match="non-negative"):
        codec.encode(-x)


def test_none_stores_nothing_and_names_the_recompute_path():
    codec = make_codec("none", (4, 6))
    x = np.ones((3, 4, 6), np.float32)
    assert codec.encode(x) == {} and codec.bytes_per_entry() == 0
    with pytest.raises(CodecError, match="recompute"):
        codec.decode({}, [0])
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(np.full((1, 4, 6), np.nan, np.float32))


def test_pq_reconstructs_rows_made_of_few_sub_vectors():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(4)
    shape = (3, 16)
    protos = rng.normal(0, 5, (40, shape[1])).astype(np.float32)  # fewer prototypes than centroids per sub-space
    train = protos[rng.integers(0, 40, (400, shape[0]))]
    codec = _fitted("pq", shape, train, m=4)
    x = protos[rng.integers(0, 40, (50, shape[0]))]
    out = codec.decode(codec.encode(x))
    assert np.abs(out - x).max() <= 1e-3 * np.abs(x).max()
    assert codec.bytes_per_entry() == shape[0] * 4


def test_pq_error_falls_with_more_bytes():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    shape = (2, 32)
    train, x = _rows(rng, 600, shape), _rows(rng, 100, shape)
    errors = []
    for m in (4, 8, 16):
        codec = _fitted("pq", shape, train, m=m)
        errors.append(float(np.square(codec.decode(codec.encode(x)) - x).mean()))
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("shape,group", [((1, 1), 16), ((3, 7), 4), ((5, 33), 8), ((26, 64), 16)])
def test_pcaq_is_exact_on_low_rank_rows_with_a_full_budget(shape, group):
    rng = np.random.default_rng(6)
    m, d = shape
    rank = max(1, min(3, d - 1))
    mean = rng.normal(0, 4, (m, d))
    basis = rng.normal(size=(rank, d))
    make = lambda n: (mean + rng.normal(size=(n, m, rank)) @ basis).astype(np.float32)  # noqa: E731
    codec = _fitted("pcaq", shape, make(200), bytes_per_row=4 * d + 64, group=group)
    x = make(40)
    out = codec.decode(codec.encode(x))
    # Every axis of the rank-3 subspace is coded at 8 bits: half a step of the largest coefficient at most.
    centred = np.linalg.norm(x - mean, axis=-1).max()
    assert np.abs(out - x).max() <= centred / 254 * 3 + 1e-3
    assert codec.bytes_per_entry() <= m * (4 * d + 64)


def test_pcaq_budget_bounds_bytes_and_error_falls_with_it():
    rng = np.random.default_rng(7)
    shape = (4, 48)
    train, x = _rows(rng, 500, shape), _rows(rng, 60, shape)
    errors = []
    for budget in (8, 16, 32, 64):
        codec = _fitted("pcaq", shape, train, bytes_per_row=budget, group=8)
        assert codec.bytes_per_entry() <= shape[0] * budget
        bits = codec.bits
        assert len(bits) == 6 and set(bits.tolist()) <= {0, 2, 3, 4, 5, 6, 7, 8}
        assert bits[0] >= bits[-1]  # the leading axes carry the most variance
        errors.append(float(np.square(codec.decode(codec.encode(x)) - x).mean()))
    assert errors == sorted(errors, reverse=True) and errors[0] > 2 * errors[-1]


def test_fits_are_deterministic():
    rng = np.random.default_rng(8)
    train = _rows(rng, 300, (3, 16))
    for kind, params in (("pcaq", {"bytes_per_row": 12, "group": 4}), ("pq", {"m": 4})):
        if kind == "pq":
            pytest.importorskip("faiss")
        a, b = _fitted(kind, (3, 16), train, **params), _fitted(kind, (3, 16), train, **params)
        for name, arr in a.state().items():
            assert np.array_equal(arr, b.state()[name]), (kind, name)


def _round_trip(codec):
    doc = json.loads(json.dumps(codec.to_json()))
    buf = io.BytesIO()
    np.savez(buf, **codec.state())
    buf.seek(0)
    with np.load(buf) as state:
        return codec_from_json(doc, dict(state) if codec.trainable else None)


@pytest.mark.parametrize("kind", sorted(CODEC_KINDS))
def test_serialisation_round_trip(kind):
    if kind == "pq":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(9)
    shape = (3, 16)
    train, x = _rows(rng, 300, shape), _rows(rng, 20, shape)
    if kind == "uint8":
        train, x = np.abs(train), np.abs(x)
    params = {"pq": {"m": 4}, "pcaq": {"bytes_per_row": 10, "group": 4}}.get(kind, {})
    codec = _fitted(kind, shape, train, **params)
    again = _round_trip(codec)
    assert again.to_json() == codec.to_json() and again.bytes_per_entry() == codec.bytes_per_entry()
    stored = codec.encode(x)
    for name, arr in again.encode(x).items():
        assert np.array_equal(arr, stored[name])
    if kind != "none":
        assert np.array_equal(again.decode(stored, [4, 0, 4]), codec.decode(stored, [4, 0, 4]))


@pytest.mark.parametrize("kind", ["float16", "int8", "pcaq"])
def test_empty_inputs(kind):
    codec = make_codec(kind, (2, 5), **({"bytes_per_row": 4, "group": 2} if kind == "pcaq" else {}))
    codec.fit(_rows(np.random.default_rng(10), 50, (2, 5)))
    stored = codec.encode(np.zeros((0, 2, 5), np.float32))
    for name, (dtype, shape) in codec.layout().items():
        assert stored[name].dtype == dtype and stored[name].shape == (0, *shape)
    assert codec.decode(stored, np.zeros(0, np.int64)).shape == (0, 2, 5)


def test_bad_rows_are_named():
    codec = make_codec("int8", (2, 4))
    with pytest.raises(CodecError, match=r"shape \[N, 2, 4\]"):
        codec.encode(np.zeros((3, 4, 2), np.float32))
    with pytest.raises(CodecError, match="floating"):
        codec.encode(np.zeros((3, 2, 4), np.int32))
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(np.array([[[0, 1, np.inf, 0]] * 2], np.float32))
    with pytest.raises(CodecError, match="float16 scale"):
        codec.encode(np.full((1, 2, 4), 1e10, np.float32))
    with pytest.raises(CodecError, match="overflow"):
        make_codec("float16", (2, 4)).encode(np.full((1, 2, 4), 1e5, np.float32))


def test_bad_stored_arrays_and_ids_are_named():
    codec = make_codec("int8", (2, 4))
    stored = codec.encode(np.ones((3, 2, 4), np.float32))
    with pytest.raises(CodecError, match=r"in \[0, 3\)"):
        codec.decode(stored, [0, 3])
    with pytest.raises(CodecError, match=r"in \[0, 3\)"):
        codec.decode(stored, [-1])
    with pytest.raises(CodecError, match="integers"):
        codec.decode(stored, [0.5])
    with pytest.raises(CodecError, match="lack"):
        codec.decode({"codes": stored["codes"]}, [0])
    with pytest.raises(CodecError, match="'scales' must be float16"):
        codec.decode({**stored, "scales": stored["scales"].astype(np.float32)}, [0])
    with pytest.raises(CodecError, match="different numbers"):
        codec.decode({**stored, "scales": stored["scales"][:2]}, [0])


def test_bad_parameters_and_untrained_use_are_named():
    with pytest.raises(CodecError, match="unknown codec kind"):
        make_codec("zip", (2, 4))
    with pytest.raises(CodecError, match="bad parameters"):
        make_codec("int8", (2, 4), bits=4)
    with pytest.raises(CodecError, match=r"shape must be \(M, D\)"):
        make_codec("int8", (2, 0))
    with pytest.raises(CodecError, match="divisor"):
        make_codec("pq", (2, 10), m=3)
    with pytest.raises(CodecError, match="at least"):
        make_codec("pcaq", (2, 64), bytes_per_row=3, group=16)
    with pytest.raises(CodecError, match="positive integer"):
        make_codec("pcaq", (2, 64), group=True)
    codec = make_codec("pcaq", (2, 8), bytes_per_row=4, group=4)
    with pytest.raises(CodecError, match="not trained"):
        codec.encode(np.ones((1, 2, 8), np.float32))
    with pytest.raises(CodecError, match="not trained"):
        codec.bytes_per_entry()
    with pytest.raises(CodecError, match="training rows"):
        codec.fit(np.zeros((0, 2, 8), np.float32))
    pytest.importorskip("faiss")
    with pytest.raises(CodecError, match="at least 256"):
        make_codec("pq", (2, 8), m=2).fit(np.ones((10, 2, 8), np.float32))


def test_bad_documents_and_state_are_named():
    with pytest.raises(CodecError, match="exactly kind, shape and params"):
        codec_from_json({"kind": "int8", "shape": [2, 4]})
    with pytest.raises(CodecError, match="no trained state"):
        codec_from_json({"kind": "int8", "shape": [2, 4], "params": {}}, {"mean": np.zeros((2, 4))})
    doc = {"kind": "pcaq", "shape": [2, 8], "params": {"bytes_per_row": 4, "group": 4}}
    with pytest.raises(CodecError, match="needs its trained state"):
        codec_from_json(doc)
    codec = _fitted("pcaq", (2, 8), _rows(np.random.default_rng(11), 100, (2, 8)), bytes_per_row=4, group=4)
    state = codec.state()
    with pytest.raises(CodecError, match="'rotation' must have shape"):
        codec_from_json(doc, {**state, "rotation": np.eye(7)})
    with pytest.raises(CodecError, match="holds"):
        codec_from_json(doc, {"mean": state["mean"]})
    with pytest.raises(CodecError, match="widths"):
        codec_from_json(doc, {**state, "bits": np.array([1, 0])})
    with pytest.raises(CodecError, match="over the budget"):
        codec_from_json(doc, {**state, "bits": np.array([8, 8])})
    with pytest.raises(CodecError, match="NaN"):
        codec_from_json(doc, {**state, "mean": np.full((2, 8), np.nan)})


def test_storage_modes_name_real_codecs():
    assert "float16" in STORAGE_MODES
    for attr, aam in STORAGE_MODES.values():
        for spec in (attr, aam):
            params = {k: v for k, v in spec.items() if k != "kind"}
            assert make_codec(spec["kind"], (26, 256), **params).kind == spec["kind"]


@pytest.mark.parametrize("kind", ["float16", "int8", "pq", "pcaq"])
def test_scan_coordinates_give_the_decoded_rows_distances_within_the_slack(kind):
    rng = np.random.default_rng(5)
    shape = (5, 32)
    params = {"pq": {"m": 8}, "pcaq": {"bytes_per_row": 20, "group": 8}}.get(kind, {})
    codec = _fitted(kind, shape, _rows(rng, 300, shape), **params) if kind in ("pq", "pcaq") else make_codec(
        kind, shape)
    stored = codec.encode(_rows(rng, 40, shape))
    active = np.array([4, 1, 2])
    decoded = codec.decode(stored)
    np.testing.assert_allclose(codec.decode(stored, attributes=active), decoded[:, active], rtol=1e-5, atol=1e-5)
    q = _rows(rng, 3, shape)[:, active]
    y = codec.coordinates(stored, active)  # [40, 3, S]
    qc, rest = codec.scan_space(q, active)
    got = np.sqrt(((qc[:, None].astype(np.float64) - y[None]) ** 2).sum(-1) + rest[:, None])
    want = np.sqrt(((q[:, None].astype(np.float64) - decoded[None][:, :, active]) ** 2).sum(-1))
    slack = codec.coordinate_slack(np.linalg.norm(y, axis=-1).max(0), active)
    assert (np.abs(got - want) <= slack + 1e-5 * want).all()
    assert (slack == 0).all() == (kind != "pcaq")
    with pytest.raises(CodecError, match="attributes"):
        codec.coordinates(stored, np.array([5]))


@pytest.mark.parametrize("bytes_per_row,group", [(20, 8), (37, 5), (64, 16)])
def test_compiled_scan_of_packed_codes_matches_their_coordinates(bytes_per_row, group):
    """``coded_scores`` unpacks pcaq codes in registers: the expansion of ``codec.coordinates`` in float64, on odd
    group sizes and budgets (codes crossing bytes), and its checks refuse arrays the tables do not fit."""
    from attrimeter.runtime.scan_kernel import coded_scores

    rng = np.random.default_rng(bytes_per_row)
    shape = (5, 40)
    codec = _fitted("pcaq", shape, _rows(rng, 400, shape), bytes_per_row=bytes_per_row, group=group)
    crossing = len(set(codec.bits.tolist()) - {0, 2, 4, 8}) > 0  # widths whose codes cross bytes
    assert crossing == (bytes_per_row < 64)  # the full budget stores every axis at 8 bits
    stored = codec.encode(_rows(rng, 70, shape))
    active = np.array([4, 0, 2])
    w = np.array([1.0, 0.5, 2.0], np.float32)
    qc, rest = codec.scan_space(_rows(rng, 2, shape)[:, active], active)
    q_sq = np.einsum("qas,qas->qa", qc, qc) + rest
    tables = codec.bit_tables()
    scores, g_max = codec.compiled_scan(stored, active, qc, q_sq, w)
    y = codec.coordinates(stored, active).astype(np.float64)  # [70, 3, S]
    g_sq = (y ** 2).sum(-1)
    sq = q_sq[:, None].astype(np.float64) + g_sq[None] - 2 * np.einsum("nas,qas->qna", y, qc.astype(np.float64))
    np.testing.assert_allclose(scores, np.sqrt(np.maximum(sq, 0)) @ w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(g_max, g_sq.max(0), rtol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        coded_scores(stored["codes"][..., :1], stored["scales"], tables, active, qc, q_sq, w)
    with pytest.raises(ValueError, match="uint8"):
        coded_scores(stored["codes"].astype(np.int16), stored["scales"], tables, active, qc, q_sq, w)
    with pytest.raises(ValueError, match=r"active must be attribute indices in \[0, 5\)"):
        coded_scores(stored["codes"], stored["scales"], tables, np.array([4, 0, 5]), qc, q_sq, w)


def test_compiled_scan_of_int8_codes_matches_their_decoded_rows():
    """``scaled_scores`` (int8 codes widened and scaled in registers) against the expansion of the decoded rows in
    float64, through :meth:`Codec.compiled_scan` as the weighted scan calls it; other shapes are refused."""
    from attrimeter.runtime.scan_kernel import scaled_scores

    rng = np.random.default_rng(8)
    shape = (5, 33)
    codec = make_codec("int8", shape)
    stored = codec.encode(_rows(rng, 300, shape))
    active = np.array([3, 1])
    w = np.array([0.5, 2.0], np.float32)
    q = _rows(rng, 2, shape)[:, active]
    q_sq = np.einsum("qac,qac->qa", q, q)
    scores, g_max = codec.compiled_scan(stored, active, q, q_sq, w)
    y = codec.coordinates(stored, active).astype(np.float64)
    g_sq = (y ** 2).sum(-1)
    sq = q_sq[:, None].astype(np.float64) + g_sq[None] - 2 * np.einsum("nac,qac->qna", y, q.astype(np.float64))
    np.testing.assert_allclose(scores, np.sqrt(np.maximum(sq, 0)) @ w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(g_max, g_sq.max(0), rtol=1e-5)
    assert make_codec("float16", shape).compiled_scan(codec.encode(_rows(rng, 3, shape)), active, q, q_sq, w) is None
    with pytest.raises(ValueError, match="int8"):
        scaled_scores(stored["codes"].astype(np.uint8), stored["scales"], active, q, q_sq, w)
    with pytest.raises(ValueError, match="active must be attribute indices"):
        scaled_scores(stored["codes"], stored["scales"], np.array([3, 9]), q, q_sq, w)
