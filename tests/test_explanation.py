"""The one explanation result type: numbers, predictions, JSON (the HTTP contract), text, pictures; random data."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from attrimeter.explanation import Explanation, QueryResult, explanations, printable
from attrimeter.runtime.decompose import explain_rows

M, C = 5, 8
ATTRIBUTES = tuple(f"a{k}" for k in range(M))
TITLES = tuple(f"attribute {k}" for k in range(M))
MEANINGS = tuple((f"no {k}", f"yes {k}") for k in range(M))


def _names():
    return {"attributes": ATTRIBUTES, "titles": TITLES, "meanings": MEANINGS}


def _batch(rng, q, k, pictures=True, hits=True):
    """``[q][k]`` explanations of random embeddings through the shared builder."""
    dec = explain_rows(rng.standard_normal((q, M + 1, C)).astype(np.float32),
                       rng.standard_normal((q, k, M + 1, C)).astype(np.float32))
    extra = {}
    if pictures:
        extra = {"query_aam": rng.random((q, M, 4, 2)), "query_images": rng.integers(0, 256, (q, 16, 8, 3), np.uint8),
                 "gallery_aam": rng.random((q * k, M, 4, 2)),
                 "gallery_images": [rng.integers(0, 256, (16, 8, 3), np.uint8) for _ in range(q * k)]}
    meta = [{"id": 10 + n, "key": f"key-{n}", "path": None, "camera": n % 3} for n in range(q * k)] if hits else None
    probs = {"query_probs": rng.random((q, M)), "gallery_probs": rng.random((q * k, M))}
    return dec, explanations(dec, **_names(), **probs, hits=meta, **extra)


def test_builder_keeps_the_decomposition_and_the_hits(rng):
    dec, rows = _batch(rng, 2, 3)
    assert [len(r) for r in rows] == [3, 3]
    for i, row in enumerate(rows):
        for j, e in enumerate(row):
            assert (e.d, e.d_hat, e.score) == (float(dec.d[i, j]), float(dec.d_hat[i, j]), float(dec.scores[i, j]))
            assert (e.id, e.key, e.rank, e.camera) == (10 + i * 3 + j, f"key-{i * 3 + j}", j + 1, (i * 3 + j) % 3)
            np.testing.assert_array_equal(e.shares, dec.shares[i, j])
            assert e.contributions.sum() == pytest.approx(e.d, rel=1e-5)
        assert all(e.query_probs is row[0].query_probs for e in row)  # one query per row, shared, not copied
    assert not np.array_equal(rows[0][0].query_probs, rows[1][0].query_probs)
    assert not np.array_equal(rows[0][0].gallery_probs, rows[0][1].gallery_probs)


def test_top_and_differing_follow_the_contributions(rng):
    _, rows = _batch(rng, 1, 1)
    e = rows[0][0]
    order = np.argsort(-e.contributions, kind="stable")
    assert [s.name for s in e.top(M)] == [ATTRIBUTES[i] for i in order]
    assert [s.contribution for s in e.top(2)] == pytest.approx(e.contributions[order[:2]])
    q, g = e.query_probs > 0.5, e.gallery_probs > 0.5
    assert [x.name for x in e.differing()] == [ATTRIBUTES[i] for i in order if q[i] != g[i]]
    for x in e.differing():
        k = ATTRIBUTES.index(x.name)
        assert (x.title, x.query, x.gallery) == (TITLES[k], MEANINGS[k][int(q[k])], MEANINGS[k][int(g[k])])
    assert e.predicted("gallery") == {a: MEANINGS[k][int(g[k])] for k, a in enumerate(ATTRIBUTES)}


def test_json_is_the_http_contract(rng):
    pytest.importorskip("pydantic")
    from attrimeter.runtime import schemas

    _, rows = _batch(rng, 1, 2)
    result = QueryResult(matches=rows[0], query_probs=rows[0][0].query_probs, attributes=ATTRIBUTES,
                         meanings=MEANINGS)
    for overlays in (0, 2):
        doc = json.loads(json.dumps(result.to_dict(overlays=overlays)))
        body = schemas.QueryResultBody.model_validate(doc)  # the wire schema the server documents
        assert body.model_dump(exclude_unset=True) == doc  # every field known, none missing
        assert [m["rank"] for m in doc["matches"]] == [1, 2]
        assert set(doc["query"]) == set(ATTRIBUTES)
    for o in doc["matches"][0]["overlays"]:
        for side in ("query", "gallery"):
            with Image.open(io.BytesIO(base64.b64decode(o[side]))) as im:
                assert im.format == "PNG" and im.size == (8, 16)
    pair = rows[0][0].to_dict()
    assert pair["attributes"] == [s._asdict() for s in rows[0][0].top(M)]
    _, unranked = _batch(rng, 1, 1, hits=False)
    assert set(unranked[0][0].to_dict()) == {"d", "d_hat", "attributes", "differing"}  # a pair has no hit fields


def test_text_is_printable_whatever_the_key(rng):
    _, rows = _batch(rng, 1, 1)
    e = rows[0][0]
    hostile = Explanation(**{**e.__dict__, "key": "evil\ud800\x1b[2J\nkey"})
    text = hostile.to_text(top=2, differing=1, score=True)
    assert "evil\\ud800\\x1b[2J\\nkey" in text and "\x1b" not in text and "score = " in text
    text.encode("utf-8")  # no lone surrogate left
    lines = text.splitlines()
    assert lines[0].startswith("  1. ") and lines[1].count("%") == 2
    extra = len(e.differing()) - 1
    assert (f"(+{extra} more differ)" in text) == (extra > 0)
    assert printable("tab\there") == "tab\\there"


def test_pictures_say_what_is_missing(rng):
    _, rows = _batch(rng, 1, 1)
    e = rows[0][0]
    overlays = e.overlays(2)
    assert [o.attribute for o in overlays] == [s.name for s in e.top(2)]
    assert all(o.query.shape == o.gallery.shape == (16, 8, 3) for o in overlays)
    assert len(e.figure(top=1).axes) == 3
    bare = Explanation(**{**e.__dict__, "gallery_image": None, "query_aam": None})
    with pytest.raises(ValueError, match="without gallery_image, query_aam "):
        bare.figure()
    with pytest.raises(ValueError, match="no query crop"):
        bare.overlays(1)
    no_crop = Explanation(**{**e.__dict__, "gallery_image": None})
    assert [o.gallery for o in no_crop.overlays(2)] == [None, None]


def test_mismatched_sizes_are_named(rng):
    _, rows = _batch(rng, 1, 1, pictures=False)
    e = rows[0][0]
    with pytest.raises(ValueError, match="'titles': 4"):
        Explanation(**{**e.__dict__, "titles": TITLES[:4]})
    with pytest.raises(ValueError, match="'gallery_probs': \\(6,\\)"):
        Explanation(**{**e.__dict__, "gallery_probs": np.zeros(6)})
