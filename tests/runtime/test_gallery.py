"""Gallery store: round trips, exact search, id gathers, bad input, refresh, format 1 and reading rows by position.

Crash safety and corruption are tested in test_store_durability.py; compaction, the writer lock and links in
test_store_writers.py.
"""

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from gallery_helpers import (
    ATTRS,
    CHILD_APPEND,
    GEN,
    V1_FIXTURE,
    M,
    assert_holds,
    batch_of,
    check_generated,
    concat_batches,
    gen_gallery,
    is_mapped,
    on_disk,
    run_child,
)

from attrimeter.runtime.errors import GalleryError, InputError, StorageError, UnknownIdError
from attrimeter.runtime.gallery import MANIFEST_NAME, Gallery
from attrimeter.runtime.gallery_index import ExactIndex, HalfExactIndex
from attrimeter.runtime.store_format import JOURNAL_NAME

pytest.importorskip("faiss")


# ---------------------------------------------------------------------- round trip


def test_roundtrip_and_reopen(tmp_path, rng):
    path = tmp_path / "g"
    g = Gallery.create(path, dim=24, attributes=ATTRS, aam_shape=(8, 4), model="sha-x")
    assert len(g) == 0 and g.segments == 0 and g.writable
    batches, start = [], 0
    for n in rng.integers(1, 12, size=5):
        b = batch_of(rng, int(n))
        b["attr_embeddings"] = b["attr_embeddings"].astype(np.float64)  # any float dtype; stored float16
        ids = g.append(**b)
        assert ids.dtype == np.int64
        np.testing.assert_array_equal(ids, np.arange(start, start + n))
        start += int(n)
        batches.append(b)
    data = concat_batches(batches)
    assert_holds(g, data)
    assert g.segments == 5
    g.close()
    with pytest.raises(GalleryError, match="closed"):
        len(g.embeddings([0]))
    with Gallery.open(path, verify=True) as r:
        assert (r.dim, r.attributes, r.aam_shape, r.model, r.metric) == (24, ATTRS, (8, 4), "sha-x", "l2")
        assert not r.writable
        assert_holds(r, data)
        with pytest.raises(GalleryError, match="read-only"):
            r.append(**batch_of(rng, 1))
    doc = json.loads((path / MANIFEST_NAME).read_text())
    assert doc["format"] == "attrimeter-gallery" and doc["count"] == len(data["meta"])
    seg = path / "segments" / doc["segments"][0]["name"]
    count = doc["segments"][0]["count"]
    rows, planes = np.load(seg / "attr.npy"), np.load(seg / "attr_by_attribute.npy")  # format 4: a scan copy too
    assert rows.dtype == planes.dtype == np.float16 and planes.shape == (M, count, 24)
    np.testing.assert_array_equal(rows, data["attr_embeddings"][:count].astype(np.float16))
    np.testing.assert_array_equal(planes.transpose(1, 0, 2), rows)
    assert len((seg / "meta.jsonl").read_text().splitlines()) == doc["segments"][0]["count"]


def test_large_segment_is_memory_mapped_and_gallery_without_aam(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=256, attributes=ATTRS, aam_shape=None, model="m", metric="ip")
    small, big = batch_of(rng, 3, dim=256, aam=None), batch_of(rng, 600, dim=256, aam=None)  # big attr.npy: 1.2 MB
    big["meta"] = [dict(m, path="x" * 2000) for m in big["meta"]]  # meta.jsonl > 1 MiB: read line by line
    with pytest.raises(InputError, match="no activation maps"):
        g.append(**dict(small, aam=np.zeros((3, M, 2, 2), np.float32)))
    del small["aam"], big["aam"]
    g.append(**small)
    g.append(**big)
    g.close()
    with Gallery.open(tmp_path / "g") as r:
        chunks = dict(r.attr_chunks(1000))
        assert not is_mapped(chunks[0]) and is_mapped(chunks[3])  # scans map large files, small ones are in memory
        assert len(chunks[3]) == 600 and not chunks[3].flags.writeable
        assert r.aam([0, 602]) is None
        ids = rng.permutation(603)
        np.testing.assert_array_equal(r.embeddings(ids), np.concatenate([small["embedding"], big["embedding"]])[ids])
        metas = small["meta"] + big["meta"]
        assert r.meta(ids) == [{"id": int(i), **metas[i]} for i in ids]


# ---------------------------------------------------------------------- search


def _unit_rows(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _brute(gallery_x, q, metric, k):
    """(Euclidean distances, ranking score (lower is better), top-k order) in float64."""
    x, q = gallery_x.astype(np.float64), q.astype(np.float64)
    d = np.linalg.norm(q[:, None] - x[None], axis=2)
    score = d if metric == "l2" else -_unit_rows(q) @ _unit_rows(x).T
    order = np.argsort(score, axis=1, kind="stable")[:, :k]
    return d, score, order


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_search_matches_brute_force_across_segments(tmp_path, rng, metric):
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=None, model="m", metric=metric)
    q = rng.standard_normal((25, 24)).astype(np.float32)  # >= 20 queries: FAISS's BLAS path
    d, ids = g.search(q, 3)  # empty gallery
    assert d.shape == ids.shape == (25, 0) and ids.dtype == np.int64
    xs = []
    for n in (7, 1, 30, 12):
        b = batch_of(rng, n, aam=None)
        b["embedding"] *= rng.uniform(0.5, 3.0, size=(n, 1)).astype(np.float32)  # norms differ: ip is not l2
        del b["aam"]
        g.append(**b)
        xs.append(b["embedding"])
        x = np.concatenate(xs)
        q[0] = x[-1]  # an exact duplicate of a gallery entry
        for k in (1, 10, 500):
            d, ids = g.search(q, k)
            kk = min(k, len(x))
            assert d.shape == ids.shape == (25, kk) and d.dtype == np.float32 and ids.dtype == np.int64
            true_d, score, order = _brute(x, q, metric, kk)
            rows = np.arange(25)[:, None]
            # same ranking scores (ties aside), and the reported distances are the raw vectors' Euclidean ones
            np.testing.assert_allclose(score[rows, ids], score[rows, order], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(d, true_d[rows, ids], rtol=1e-5, atol=1e-5)
            assert ids[0, 0] == len(x) - 1 and d[0, 0] == 0
            if metric == "l2":
                assert (np.diff(d, axis=1) >= 0).all()
    expected = g.search(q, 10)
    g.close()
    with Gallery.open(tmp_path / "g") as r:  # a fresh index, built from the files
        d, ids = r.search(q, 10)
        np.testing.assert_array_equal(ids, expected[1])
        np.testing.assert_allclose(d, expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ties_go_to_the_lower_id_whatever_k(tmp_path, rng, metric):
    # FAISS's own pick among equal inner products at the k-th place is arbitrary: rank re-ranks exactly and fetches
    # past the tie, so a search's hits are the first k of a longer one's.
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=None, model="m", metric=metric)
    b = batch_of(rng, 60, aam=None)
    del b["aam"]
    for key in ("embedding", "attr_embeddings", "probs"):
        b[key][[5, 17, 33, 34, 59]] = b[key][2]  # six copies of entry 2
    g.append(**b)
    q = rng.standard_normal((25, 24)).astype(np.float32)  # >= 20 queries: FAISS's BLAS path
    q[0] = b["embedding"][2]
    keys, dist, ids = g.rank(q, 60)
    assert ids[0, :6].tolist() == [2, 5, 17, 33, 34, 59] and (dist[0, :6] == 0).all()
    assert ((np.diff(keys, axis=1) > 0) | ((np.diff(keys, axis=1) == 0) & (np.diff(ids, axis=1) > 0))).all()
    for k in (1, 3, 6, 7, 20):
        k_keys, k_dist, k_ids = g.rank(q, k)
        np.testing.assert_array_equal(k_ids, ids[:, :k])
        np.testing.assert_array_equal(k_keys, keys[:, :k])
        np.testing.assert_array_equal(g.search(q, k)[1], k_ids)
    g.close()


def test_search_rejects_bad_queries_and_k(filled):
    g, _ = filled
    good = np.zeros((2, 24), np.float32)
    for bad in (np.zeros((2, 24)), np.zeros(24, np.float32), np.zeros((2, 23), np.float32), [[0.0] * 24],
                np.array([[np.nan] + [0.0] * 23], np.float32)):
        with pytest.raises(InputError):
            g.search(bad, 3)
    for k in (0, -1, 2.0, True, "3"):
        with pytest.raises(InputError, match="k must be"):
            g.search(good, k)
    for chunk in (0, 1.5, None):
        with pytest.raises(InputError, match="chunk must be"):
            g.attr_chunks(chunk)
    d, ids = g.search(np.zeros((0, 24), np.float32), 3)
    assert d.shape == ids.shape == (0, 3)


def test_concurrent_search_while_appending(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=None, model="m")
    first = batch_of(rng, 5, aam=None)
    del first["aam"]
    g.append(**first)
    batches = []
    for n in rng.integers(1, 6, size=20):
        b = batch_of(rng, int(n), aam=None)
        del b["aam"]
        batches.append(b)
    errors, stop = [], threading.Event()
    queries = [rng.standard_normal((3, 24)).astype(np.float32) for _ in range(3)]

    def reader(q):
        try:
            while not stop.is_set():
                d, ids = g.search(q, 8)
                assert ids.max() < len(g)
                exact = np.linalg.norm(g.embeddings(ids.ravel()).reshape(*ids.shape, 24) - q[:, None], axis=2)
                np.testing.assert_allclose(d, exact, rtol=1e-5, atol=1e-5)
                assert len(g.meta(ids[0])) == ids.shape[1]
        except Exception as e:  # reported below: an assertion in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(q,)) for q in queries]
    for t in threads:
        t.start()
    for b in batches:
        g.append(**b)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(g) == 5 + sum(len(b["meta"]) for b in batches)
    g.close()


# ---------------------------------------------------------------------- ids and bad input


def test_unknown_and_malformed_ids(filled):
    g, data = filled
    n = len(g)
    np.testing.assert_array_equal(g.embeddings(n - 1), data["embedding"][-1:])  # a scalar id
    np.testing.assert_array_equal(g.probs(np.array([1, 1, 0], np.uint8)), data["probs"][[1, 1, 0]])
    assert g.meta([]) == [] and g.attr_embeddings([]).shape == (0, M, 24)
    assert g.embeddings([2.0]).shape == (1, 24)
    for method in (g.embeddings, g.attr_embeddings, g.probs, g.aam, g.meta):
        with pytest.raises(UnknownIdError) as info:
            method([0, n])
        assert str(info.value) == f"gallery id {n} is not in the gallery (it holds {n} entries)"
    for bad in (-1, 123456, 2**70, np.uint64(2**63)):
        with pytest.raises(UnknownIdError, match=f"gallery id {bad} is not in the gallery"):
            g.meta([bad])
    for bad in ([1.5], ["a"], [[0, 1]], [True], [None]):
        with pytest.raises(InputError):
            g.embeddings(bad)


def _bad_inputs(rng):
    b = batch_of(rng, 3)
    yield "nan", dict(b, embedding=np.where(np.eye(3, 24, dtype=bool), np.nan, b["embedding"]).astype(np.float32))
    yield "inf attr", dict(b, attr_embeddings=np.full((3, M, 24), np.inf, np.float32))
    yield "fp16 overflow", dict(b, attr_embeddings=np.full((3, M, 24), 1e5, np.float32))
    yield "int dtype", dict(b, embedding=np.ones((3, 24), np.int32))
    yield "list", dict(b, probs=b["probs"].tolist())
    yield "wrong dim", dict(b, embedding=np.ones((3, 23), np.float32))
    yield "1-D", dict(b, embedding=np.ones(24, np.float32))
    yield "attr rows", dict(b, attr_embeddings=b["attr_embeddings"][:2])
    yield "attr M", dict(b, attr_embeddings=b["attr_embeddings"][:, :2])
    yield "probs range", dict(b, probs=b["probs"] + 1)
    yield "aam shape", dict(b, aam=b["aam"][..., :2])
    yield "aam missing", dict(b, aam=None)
    yield "meta length", dict(b, meta=b["meta"][:2])
    yield "meta str", dict(b, meta="abc")
    yield "meta not mapping", dict(b, meta=[1, 2, 3])
    yield "meta object", dict(b, meta=[{"x": object()}, {}, {}])
    yield "meta nan", dict(b, meta=[{"x": float("nan")}, {}, {}])
    yield "meta int key", dict(b, meta=[{1: 2}, {}, {}])
    yield "meta id", dict(b, meta=[{"id": 5}, {}, {}])


def test_bad_input_leaves_the_store_untouched(filled, rng):
    g, data = filled
    manifest = g.path / MANIFEST_NAME
    before, folders = manifest.read_bytes(), on_disk(g.path)
    for label, kwargs in _bad_inputs(rng):
        with pytest.raises(InputError):
            g.append(**kwargs)
            pytest.fail(label)
        assert manifest.read_bytes() == before, label
        assert on_disk(g.path) == folders, label
    assert len(g) == len(data["meta"])
    assert_holds(g, data)
    ok = batch_of(rng, 2)
    ok["meta"] = [{"camera": np.int64(3), "score": np.float32(0.5)}, {}]  # numpy scalars are fine
    np.testing.assert_array_equal(g.append(**ok), [len(data["meta"]), len(data["meta"]) + 1])
    assert g.meta([len(g) - 2])[0] == {"id": len(g) - 2, "camera": 3, "score": 0.5}


def test_create_and_open_refuse_bad_arguments(tmp_path):
    kw = {"dim": 8, "attributes": ATTRS, "aam_shape": None, "model": "m"}
    for bad in ({"dim": 0}, {"attributes": []}, {"attributes": ["a", "a"]}, {"aam_shape": (0, 2)},
                {"metric": "cosine"}, {"model": None}):
        with pytest.raises(InputError):
            Gallery.create(tmp_path / "x", **{**kw, **bad})
    Gallery.create(tmp_path / "g", **kw).close()
    with pytest.raises(GalleryError, match="already holds a gallery"):
        Gallery.create(tmp_path / "g", **kw)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(GalleryError, match="not empty"):
        Gallery.create(tmp_path / "other", **kw)
    with pytest.raises(GalleryError, match="no gallery here"):
        Gallery.open(tmp_path / "missing")


# ---------------------------------------------------------------------- refresh


def test_refresh_sees_another_process_append(tmp_path, rng):
    path = tmp_path / "g"
    with gen_gallery(path) as g:
        (e, a, p, m), meta = GEN["batch"](0)
        g.append(e, a, p, meta, aam=m)
    with Gallery.open(path) as r:
        n0 = len(r)
        r.search(rng.standard_normal((1, GEN["C"])).astype(np.float32), 2)  # index built before the append
        result = run_child(CHILD_APPEND, path)
        assert result.returncode == 0, result.stderr
        assert len(r) == n0
        n1 = r.refresh()
        assert n1 == len(r) == n0 + GEN["batch_size"](n0)
        check_generated(r)
        d, ids = r.search(r.embeddings(np.arange(n0, n1)), 1)
        np.testing.assert_array_equal(ids[:, 0], np.arange(n0, n1))
        assert r.refresh() == n1


# ---------------------------------------------------------------------- format 1 and reading rows by position


def _v1_rows(first, n):
    i = np.arange(first, first + n, dtype=np.float32)
    return (i[:, None] + np.linspace(0, 1, 4, dtype=np.float32),
            (i[:, None, None] + np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4)) / 8,
            np.stack([i / 10, 1 - i / 10], 1).astype(np.float32),
            np.broadcast_to((i / 10)[:, None, None, None], (n, 2, 2, 2)).astype(np.float32),
            [{"key": f"e{int(j)}", "camera": int(j) % 2} for j in i])


def _check_v1(g, n):
    emb, attr, probs, aam, meta = _v1_rows(0, n)
    ids = np.arange(n)
    np.testing.assert_array_equal(g.embeddings(ids), emb)
    np.testing.assert_array_equal(g.attr_embeddings(ids), attr.astype(np.float16))
    np.testing.assert_array_equal(g.probs(ids), probs)
    np.testing.assert_array_equal(g.aam(ids), aam.astype(np.float16))
    assert g.meta(ids) == [{"id": int(i), **m} for i, m in zip(ids, meta, strict=True)]


def test_a_format_1_gallery_opens_and_a_writer_upgrades_it(tmp_path):
    path = tmp_path / "g"
    shutil.copytree(V1_FIXTURE, path)
    manifest = path / MANIFEST_NAME
    v1 = manifest.read_bytes()
    assert json.loads(v1)["version"] == 1
    with Gallery.open(path, verify=True) as r:
        assert (len(r), r.segments, r.model) == (5, 2, "v1-fixture")
        _check_v1(r, 5)
        assert r.search(r.embeddings([3]), 1)[1][0, 0] == 3
    assert manifest.read_bytes() == v1 and not (path / JOURNAL_NAME).exists()  # reading changes nothing
    with Gallery.open(path, writable=True) as w:
        # upgraded to the format written now (4: float16 storage recorded, rows written attribute by attribute)
        assert json.loads(manifest.read_text())["version"] == 4 and (path / JOURNAL_NAME).exists()
        emb, attr, probs, aam, meta = _v1_rows(5, 2)
        w.append(emb, attr, probs, meta, aam=aam)
    with Gallery.open(path, verify=True) as r:
        _check_v1(r, 7)


def test_hit_rows_are_read_without_mapping_the_store(tmp_path, rng):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    g = Gallery.create(tmp_path / "g", dim=256, attributes=ATTRS, aam_shape=(8, 4), model="m")
    b = batch_of(rng, 700, dim=256)  # every array file of the segment but probs.npy is over 1 MiB
    g.append(**b)
    g.close()
    segments = str(g.path / "segments")
    with Gallery.open(g.path) as r:
        for _ in range(20):
            d, ids = r.search(rng.standard_normal((2, 256)).astype(np.float32), 10)
            flat = ids.ravel()
            np.testing.assert_array_equal(r.attr_embeddings(flat), b["attr_embeddings"][flat].astype(np.float16))
            np.testing.assert_array_equal(r.aam(flat), b["aam"][flat].astype(np.float16))
            np.testing.assert_array_equal(r.embeddings(flat[::-1]), b["embedding"][flat[::-1]])
            assert [m["key"] for m in r.meta(flat)] == [b["meta"][i]["key"] for i in flat]
        assert segments not in maps.read_text()  # positioned reads: no page of the store is mapped
        chunks = list(r.attr_chunks(256))  # a scan maps the file while it holds the views ...
        assert segments in maps.read_text()
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), b["attr_embeddings"].astype(np.float16))
        del chunks
        assert segments not in maps.read_text()  # ... and not after


def test_a_reader_that_saw_a_failed_appends_begin_record_reads_on(filled, rng, monkeypatch):
    """A failed append's begin record is cut off the journal again; a reader that read it must not lose its place."""
    g, data = filled
    reader = Gallery.open(g.path)
    real_fsync = os.fsync
    calls = []

    def read_then_fail(fd):
        calls.append(fd)
        if len(calls) == 1:  # the first file of the new segment: its begin record is in the journal now
            assert reader.refresh() == len(data["meta"])
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", read_then_fail)
    with pytest.raises(StorageError, match="nothing was published"):
        g.append(**batch_of(rng, 2))
    monkeypatch.undo()
    extra = [batch_of(rng, 3), batch_of(rng, 1)]  # records now where the cut one was
    for b in extra:
        g.append(**b)
    assert reader.refresh() == len(data["meta"]) + 4
    assert_holds(reader, concat_batches([data, *extra]))
    reader.close()


def test_segments_without_stored_norms_still_open_scan_and_gain_them_when_compacted(tmp_path, rng):
    from attrimeter.runtime.decompose import weighted_scan

    path = tmp_path / "g"
    data = [batch_of(rng, 5, aam=None), batch_of(rng, 6, aam=None)]
    with Gallery.create(path, dim=24, attributes=ATTRS, aam_shape=None, model="m", auto_compact=None) as g:
        for b in data:
            g.append(**b)
        stored = [norms.copy() for _, _, norms in g.scan_chunks(100)]
    attr = np.concatenate([b["attr_embeddings"] for b in data]).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(np.concatenate(stored), (attr ** 2).sum(-1), rtol=1e-5)
    doc = json.loads((path / MANIFEST_NAME).read_text())  # make it a gallery written before norms.npy existed
    for seg in doc["segments"]:
        (path / "segments" / seg["name"] / "norms.npy").unlink()
        seg["bytes"] -= seg["sizes"].pop("norms.npy")
        del seg["files"]["norms.npy"]
    (path / MANIFEST_NAME).write_text(json.dumps(doc))
    q, w = rng.standard_normal((2, M, 24)).astype(np.float32), np.array([1, 0, 2, 1], np.float32)
    with Gallery.open(path, progress=False) as old:
        assert [norms for _, _, norms in old.scan_chunks(100)] == [None, None]
        want = weighted_scan(q, old.scan_chunks(100), w, 4)
    with Gallery.open(path, writable=True, progress=False) as g:
        g.compact(progress=False)
        (_, _, norms), = g.scan_chunks(100)
        np.testing.assert_array_equal(norms, np.concatenate(stored))
        got = weighted_scan(q, g.scan_chunks(100), w, 4)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)


def test_l2_search_over_the_float16_copy_is_exact_where_rounding_would_misorder(tmp_path, rng):
    # 200 entries within float16's resolution of one point: their rounded copies tie or swap, their float32 rows not
    base = rng.standard_normal(24).astype(np.float32) * 3
    data = batch_of(rng, 200, aam=None)
    data["embedding"] = base + rng.standard_normal((200, 24)).astype(np.float32) * np.float32(2e-4)
    with Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=None, model="m") as g:
        g.append(**data)
        g.load_index()
        assert isinstance(g._index, HalfExactIndex)
        q = base + rng.standard_normal((4, 24)).astype(np.float32) * np.float32(1e-4)
        want = np.linalg.norm(data["embedding"][None] - q[:, None], axis=2)
        dist, ids = g.search(q, 5)
        np.testing.assert_array_equal(ids, np.argsort(want, axis=1, kind="stable")[:, :5])
        np.testing.assert_allclose(dist, np.take_along_axis(want, ids, 1), rtol=1e-6)


def test_embeddings_beyond_float16_are_searched_in_float32(tmp_path, rng):
    data = [batch_of(rng, 20, aam=None) for _ in range(2)]
    data[1]["embedding"][3, 5] = 1e6  # no float16 copy: the index turns float32 when this batch arrives
    with Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=None, model="m") as g:
        g.append(**data[0])
        g.load_index()
        assert isinstance(g._index, HalfExactIndex)
        g.append(**data[1])
        q = rng.standard_normal((3, 24)).astype(np.float32)
        dist, ids = g.search(q, 40)
        assert isinstance(g._index, ExactIndex)
        x = np.concatenate([d["embedding"] for d in data])
        want = np.linalg.norm(x[None] - q[:, None], axis=2)
        np.testing.assert_array_equal(ids, np.argsort(want, axis=1, kind="stable"))
    with Gallery.open(tmp_path / "g", progress=False) as g:  # and so from the start when reopened
        g.load_index()
        assert isinstance(g._index, ExactIndex)
