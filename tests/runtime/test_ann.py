"""Approximate indexes (flat / ivf / hnsw): exact re-ranking, recall on small galleries, parameters, files."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss")

from attrimeter.runtime.ann import ANN_KINDS, load_index, make_index  # noqa: E402
from attrimeter.runtime.errors import AnnIndexError  # noqa: E402

DIM = 16
KINDS = {
    "flat": {},
    "ivf": {"nlist": 16, "nprobe": 4, "pq_m": 4},
    "ivf-flat": {"nlist": 16, "nprobe": 4, "pq_m": 0},
    "hnsw": {"m": 8},
    "hnsw-flat": {"m": 8, "storage": "flat"},
}


def _clustered(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    centres = rng.normal(0, 4, (max(1, n // 20), dim))
    return (centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _exact(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> np.ndarray:
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        keys = ((q64[:, None] - x64[None]) ** 2).sum(-1)
    else:
        keys = -(q64 @ x64.T) / np.outer(np.linalg.norm(q64, axis=1), np.linalg.norm(x64, axis=1))
    ids = np.broadcast_to(np.arange(len(x)), keys.shape)
    return np.lexsort((ids, keys), axis=1)[:, :k]


def _index(name: str, x: np.ndarray, metric: str = "l2", **extra: object):
    kind = name.split("-")[0]
    index = make_index(kind, x.shape[1], lambda ids: x[ids], metric, **{**KINDS[name], **extra})
    index.build(x)
    return index


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("name", sorted(KINDS))
def test_recall_and_exact_order(name, metric):
    rng = np.random.default_rng(1)
    x = _clustered(rng, 1200)
    q = x[rng.integers(0, len(x), 40)] + rng.normal(0, 0.3, (40, DIM)).astype(np.float32)
    index = _index(name, x, metric)
    assert index.ntotal == len(x)
    ids = index.search(q, 10)
    truth = _exact(x, q, 10, metric)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)])
    assert recall == 1.0 if name == "flat" else recall >= 0.9, recall
    if name == "flat":
        assert np.array_equal(ids, truth)
    # whatever was found is ordered by its exact key
    x64 = x.astype(np.float64)
    if metric == "l2":
        keys = ((x64[ids] - q[:, None]) ** 2).sum(-1)
    else:
        keys = -np.einsum("qkc,qc->qk", x64[ids], q) / np.linalg.norm(x64[ids], axis=-1)
    assert (np.diff(keys, axis=1) >= -1e-9).all()


def test_too_few_candidates_fall_back_to_an_exact_scan():
    rng = np.random.default_rng(2)
    x = _clustered(rng, 300)
    q = rng.normal(0, 4, (5, DIM)).astype(np.float32)
    index = _index("ivf-flat", x, nlist=60, nprobe=1, rerank=1)  # ~5 vectors per visited cell, 25 asked for
    ids = index.search(q, 25)
    assert (ids >= 0).all()
    assert np.array_equal(ids, _exact(x, q, 25, "l2"))


def test_rerank_and_nprobe_raise_recall():
    rng = np.random.default_rng(3)
    x = _clustered(rng, 3000, 32)
    q = rng.normal(0, 4, (50, 32)).astype(np.float32)  # far from the clusters: hard queries
    index = make_index("ivf", 32, lambda ids: x[ids], nlist=64, nprobe=1, pq_m=4, rerank=1)
    index.build(x)
    truth = _exact(x, q, 10, "l2")

    def recall() -> float:
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(index.search(q, 10), truth, strict=True)]))

    low = recall()
    index.configure(nprobe=64, rerank=20)
    assert index.params()["nprobe"] == 64 and index.params()["rerank"] == 20
    assert recall() == 1.0 > low


def test_add_extends_ids_in_order():
    rng = np.random.default_rng(4)
    x = _clustered(rng, 800)
    index = make_index("hnsw", DIM, lambda ids: x[ids], m=8)
    index.build(x[:500])
    index.add(x[500:])
    assert index.ntotal == 800
    assert np.array_equal(index.search(x[[650, 10, 799]], 1)[:, 0], [650, 10, 799])


@pytest.mark.parametrize("name", sorted(KINDS))
def test_save_load_round_trip(tmp_path, name):
    rng = np.random.default_rng(5)
    x = _clustered(rng, 600)
    q = rng.normal(0, 4, (10, DIM)).astype(np.float32)
    index = _index(name, x, "ip")
    index.save(tmp_path / "idx")
    again = load_index(tmp_path / "idx", lambda ids: x[ids])
    assert again.to_json() == index.to_json() and again.ntotal == index.ntotal
    assert np.array_equal(again.search(q, 7), index.search(q, 7))
    doc = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert doc["kind"] == name.split("-")[0] and doc["ntotal"] == 600


def test_damaged_or_mismatched_files_are_named(tmp_path):
    rng = np.random.default_rng(6)
    x = _clustered(rng, 400)
    rows = lambda ids: x[ids]  # noqa: E731
    index = _index("ivf-flat", x)
    index.save(tmp_path)
    (tmp_path / "index.faiss").write_bytes((tmp_path / "index.faiss").read_bytes()[:-10])
    with pytest.raises(AnnIndexError, match="sha256"):
        load_index(tmp_path, rows)
    index.save(tmp_path)
    doc = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**doc, "params": {**doc["params"], "nlist": 32}}))
    with pytest.raises(AnnIndexError, match="nlist 16"):
        load_index(tmp_path, rows)
    (tmp_path / "index.json").write_text(json.dumps({**doc, "ntotal": 5}))
    with pytest.raises(AnnIndexError, match="holds 400 vectors"):
        load_index(tmp_path, rows)
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(AnnIndexError, match="not JSON"):
        load_index(tmp_path, rows)
    with pytest.raises(AnnIndexError, match="cannot read"):
        load_index(tmp_path / "missing", rows)


def test_bad_parameters_are_named():
    rows = lambda ids: np.zeros((len(ids), DIM), np.float32)  # noqa: E731
    cases = [
        (dict(kind="annoy"), "unknown index kind"),
        (dict(kind="ivf", nlist=8, nprobe=9, pq_m=0), "nprobe must be at most nlist"),
        (dict(kind="ivf", pq_m=5), "pq_m must divide"),
        (dict(kind="ivf", nlist=0, pq_m=0), "nlist must be an integer >= 1"),
        (dict(kind="hnsw", storage="pq"), "storage must be"),
        (dict(kind="hnsw", m=1), "m must be an integer >= 2"),
        (dict(kind="hnsw", ef_search=True), "ef_search must be an integer"),
        (dict(kind="flat", metric="cosine"), "metric must be"),
        (dict(kind="flat", rerank=0), "rerank must be"),
        (dict(kind="flat", nprobe=3), "bad parameters for a flat index"),
    ]
    for params, message in cases:
        kind = params.pop("kind")
        with pytest.raises(AnnIndexError, match=message):
            make_index(kind, DIM, rows, **params)
    with pytest.raises(AnnIndexError, match="function"):
        make_index("flat", DIM, None)
    with pytest.raises(AnnIndexError, match="cannot change after building"):
        make_index("ivf", DIM, rows, pq_m=0).configure(nlist=4)


def test_misuse_is_named():
    rng = np.random.default_rng(7)
    x = _clustered(rng, 100)
    rows = lambda ids: x[ids]  # noqa: E731
    ivf = make_index("ivf", DIM, rows, nlist=8, pq_m=0)
    assert ivf.needs_training
    with pytest.raises(AnnIndexError, match="not trained"):
        ivf.add(x)
    with pytest.raises(AnnIndexError, match="at least 8 training vectors"):
        ivf.train(x[:5])
    ivf.build(x)
    with pytest.raises(AnnIndexError, match="already holds 100"):
        ivf.train(x)
    with pytest.raises(AnnIndexError, match="at most the number of vectors"):
        ivf.search(x[:1], 101)
    with pytest.raises(AnnIndexError, match=r"floating \[n, 16\]"):
        ivf.search(x[:1, :8], 1)
    with pytest.raises(AnnIndexError, match="NaN"):
        ivf.add(np.full((1, DIM), np.nan, np.float32))
    bad = make_index("flat", DIM, lambda ids: x[ids, :8])
    bad.build(x)
    with pytest.raises(AnnIndexError, match="row source returned"):
        bad.search(x[:1], 1)
    assert sorted(ANN_KINDS) == ["flat", "hnsw", "ivf"]


# ---------------------------------------------------------------------- wired into the gallery


def _gallery(tmp_path, rng, n=600, dim=DIM):
    from gallery_helpers import ATTRS, batch_of

    from attrimeter.runtime.gallery import Gallery

    data = batch_of(rng, n, dim=dim, aam=None)
    data["embedding"] = _clustered(rng, n, dim)
    with Gallery.create(tmp_path / "g", dim=dim, attributes=ATTRS, aam_shape=None, model="m") as g:
        g.append(**data)
    return tmp_path / "g", data["embedding"]


@pytest.mark.parametrize("kind, params", [("ivf", ["nlist=16", "pq_m=0", "nprobe=4", "rerank=4"]),
                                          ("hnsw", ["m=8", "ef_search=32"])])
def test_a_gallery_searched_through_an_approximate_index_returns_exact_distances(tmp_path, rng, kind, params):
    from attrimeter.runtime.gallery import Gallery
    from attrimeter.runtime.gallery_index import IndexChoice

    path, x = _gallery(tmp_path, rng)
    q = x[rng.choice(len(x), 20)] + rng.normal(0, 0.3, (20, DIM)).astype(np.float32)
    with Gallery.open(path, index=IndexChoice.parse(kind, params), progress=False) as g:
        dist, ids = g.search(q, 10)
        assert g.index_kind == kind
    want = _exact(x, q, 10, "l2")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want, strict=True)])
    assert recall >= 0.9
    np.testing.assert_allclose(dist, np.linalg.norm(x[ids] - q[:, None], axis=2), rtol=1e-6)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_a_saved_index_is_loaded_extended_and_replaced_or_ignored_when_damaged(tmp_path, rng, caplog):
    from gallery_helpers import batch_of

    from attrimeter.runtime.gallery import Gallery
    from attrimeter.runtime.gallery_index import INDEX_FAISS, INDEX_JSON, IndexChoice

    path, x = _gallery(tmp_path, rng)
    choice = IndexChoice.parse("ivf", ["nlist=16", "pq_m=0", "nprobe=16"])
    with Gallery.open(path, writable=True, index=choice, progress=False) as g:
        g.save_index()
        more = batch_of(rng, 7, dim=DIM, aam=None)
        g.append(**more)  # appended after the save: readers add them to the loaded index
    assert (path / INDEX_JSON).exists() and (path / INDEX_FAISS).exists()
    x = np.concatenate([x, more["embedding"]])
    with Gallery.open(path, progress=False) as g:  # no choice: the saved index
        dist, ids = g.search(more["embedding"][:3], 1)
        assert g.index_kind == "ivf" and g._index.ntotal == len(x) and g._index.nprobe == 16
        np.testing.assert_array_equal(ids[:, 0], np.arange(600, 603))
    with Gallery.open(path, index=IndexChoice.parse("ivf", ["nlist=16", "pq_m=0", "nprobe=2"]),
                      progress=False) as g:
        g.load_index()  # same build parameters: loaded, with the asked nprobe
        assert g._index.nprobe == 2 and g._index.ntotal == len(x)
    data = bytearray((path / INDEX_FAISS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / INDEX_FAISS).write_bytes(bytes(data))
    with Gallery.open(path, progress=False) as g, caplog.at_level("WARNING"):
        dist, ids = g.search(x[:2], 1)  # searched exactly instead, and said so
        assert g.index_kind == "flat" and "not used" in caplog.text
        np.testing.assert_array_equal(ids[:, 0], [0, 1])
    with Gallery.open(path, writable=True, index=IndexChoice("flat"), progress=False) as g:
        g.save_index()  # an exact index is rebuilt on open: saving it removes the approximate one
    assert not (path / INDEX_JSON).exists() and not (path / INDEX_FAISS).exists()


def test_a_tampered_saved_index_cannot_return_ids_outside_the_gallery(tmp_path, rng):
    from attrimeter.runtime.gallery import Gallery
    from attrimeter.runtime.gallery_index import INDEX_FAISS, INDEX_JSON, IndexChoice

    path, x = _gallery(tmp_path, rng, n=300)
    with Gallery.open(path, writable=True, index=IndexChoice.parse("ivf", ["nlist=8", "pq_m=0"]),
                      progress=False) as g:
        g.save_index()
    import faiss

    index = faiss.read_index(str(path / INDEX_FAISS))
    invlists = faiss.extract_index_ivf(index).invlists
    for cell in range(invlists.nlist):  # every stored id shifted out of the gallery
        size = invlists.list_size(cell)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(cell), size)
            ids += 10_000
    faiss.write_index(index, str(path / INDEX_FAISS))
    import hashlib
    import json

    doc = json.loads((path / INDEX_JSON).read_text())
    doc["sha256"] = hashlib.sha256((path / INDEX_FAISS).read_bytes()).hexdigest()
    (path / INDEX_JSON).write_text(json.dumps(doc))
    with Gallery.open(path, progress=False) as g:
        dist, ids = g.search(x[:5], 3)
    assert ((ids >= 0) & (ids < len(x))).all()
    np.testing.assert_allclose(dist, np.linalg.norm(x[ids] - x[:5, None], axis=2), rtol=1e-6)
    for cell in range(invlists.nlist):  # now every stored id is 7: a row of repeats
        size = invlists.list_size(cell)
        if size:
            faiss.rev_swig_ptr(invlists.get_ids(cell), size)[:] = 7
    faiss.write_index(index, str(path / INDEX_FAISS))
    doc["sha256"] = hashlib.sha256((path / INDEX_FAISS).read_bytes()).hexdigest()
    (path / INDEX_JSON).write_text(json.dumps(doc))
    with Gallery.open(path, progress=False) as g:
        dist, ids = g.search(x[:5], 3)
    assert all(len(set(row)) == 3 for row in ids.tolist())  # never one entry twice
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))  # the short rows are scanned exactly


def test_index_choices_are_checked():
    from attrimeter.runtime.errors import InputError
    from attrimeter.runtime.gallery_index import IndexChoice

    for kind, items, match in (("annoy", [], "kind must be one of"), ("ivf", ["nlst=3"], "unknown ivf"),
                               ("ivf", ["nlist"], "name=value"), ("flat", ["m=3"], "no parameters")):
        with pytest.raises(InputError, match=match):
            IndexChoice.parse(kind, items)
    assert IndexChoice.parse("hnsw", ["m=16", "storage=flat"]).params == (("m", 16), ("storage", "flat"))


def test_cli_index_saves_the_index_that_search_and_the_runtime_load(tiny_export, tiny_data, tmp_path, capsys):
    from attrimeter.cli import main
    from attrimeter.runtime.gallery_index import INDEX_JSON
    from attrimeter.runtime.runtime import Runtime, RuntimeConfig

    images = tiny_data / "bounding_box_test"
    out = tmp_path / "g"
    args = ["index", "--export", str(tiny_export), "-q", "--threads", "1", "--images", str(images), "--out", str(out),
            "--storage", "float16"]
    assert main([*args, "--index", "ivf", "--index-param", "nlist=4", "--index-param", "pq_m=0"]) == 0
    assert "saved its ivf search index" in capsys.readouterr().out and (out / INDEX_JSON).is_file()
    with Runtime(tiny_export, out, RuntimeConfig(threads=1)) as rt:
        assert rt.stats()["gallery_index"] == "ivf"
        query = sorted(images.glob("*.jpg"))[2]
        top = rt.search(str(query), k=1)[0].matches[0]
        assert top.d < 1e-3  # the query itself
    assert main(["search", "--export", str(tiny_export), "--threads", "1", "--gallery", str(out), "--json",
                 "--index", "flat", str(query)]) == 0
    assert '"d": 0' in capsys.readouterr().out.replace('"d": 0.0', '"d": 0')
    with pytest.raises(SystemExit) as e:
        main([*args, "--index-param", "nlist=4"])
    assert e.value.code == 2 and "--index-param needs --index" in capsys.readouterr().err


def test_every_shard_opens_the_index_asked_for(tiny_export, tmp_path, rng):
    from sharded_helpers import build, identity_of

    from attrimeter.runtime.distributed.sharded import ShardedGallery
    from attrimeter.runtime.gallery_index import IndexChoice

    identity = identity_of(tiny_export)
    sharded, _, parts = build(tmp_path, identity, rng, sizes=(300, 260))
    x = np.concatenate([p["embedding"] for p in parts])
    choice = IndexChoice.parse("hnsw", ["m=8", "ef_search=64", "rerank=4"])
    with ShardedGallery.open(sharded, index=choice) as g:
        q = x[[3, 400]]
        hits = g.search_rows(q, 3)
        assert g.index_kind == "hnsw"
    np.testing.assert_allclose(hits.d, np.linalg.norm(x[hits.ids] - q[:, None], axis=2), rtol=1e-6)
    assert (hits.d[:, 0] == 0).all()


def test_a_gallery_too_small_to_train_the_index_asked_for_is_searched_exactly(tmp_path, rng, caplog):
    from attrimeter.runtime.gallery import Gallery
    from attrimeter.runtime.gallery_index import IndexChoice

    path, x = _gallery(tmp_path, rng, n=100)
    with Gallery.open(path, index=IndexChoice.parse("ivf", ["nlist=256", "pq_m=0"]), progress=False) as g, \
            caplog.at_level("WARNING"):
        dist, ids = g.search(x[:3], 2)
        assert g.index_kind == "flat" and "too few to train the ivf index" in caplog.text
    np.testing.assert_array_equal(ids[:, 0], np.arange(3))
