"""Gallery store: round trips, exact search, id gathers, bad input, crash safety under SIGKILL, corruption, refresh."""

import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from attrimeter.runtime.errors import (
    CorruptGalleryError,
    GalleryError,
    InputError,
    LockedGalleryError,
    StorageError,
    UnknownIdError,
    UnsafeGalleryPathError,
)
from attrimeter.runtime.gallery import MANIFEST_NAME, Gallery
from attrimeter.runtime.store_format import JOURNAL_NAME, parse_journal, parse_journal_header, parse_manifest

pytest.importorskip("faiss")

ATTRS = ("gender", "hat", "backpack", "upper_red")
M = len(ATTRS)

# Deterministic content, shared with the child processes: entry i is drawn from a generator seeded by i, and the batch
# that starts at id `first` has batch_size(first) entries, so any published prefix can be checked entry by entry.
GENERATOR = """
import numpy as np

C, M, AAM = 24, 4, (8, 4)


def batch_size(first):
    return 1 + (first * 7 + 3) % 6


def entry(i):
    r = np.random.default_rng(i)
    return (r.standard_normal(C).astype(np.float32), r.standard_normal((M, C)).astype(np.float32),
            r.random(M).astype(np.float32), r.random((M, *AAM)).astype(np.float32), {"key": f"e{i}", "camera": i % 3})


def batch(first):
    rows = [entry(i) for i in range(first, first + batch_size(first))]
    return [np.stack([row[k] for row in rows]) for k in range(4)], [row[4] for row in rows]
"""
GEN: dict = {}
exec(GENERATOR, GEN)

CHILD_LOOP = GENERATOR + """
import sys
from attrimeter.runtime.gallery import Gallery

g = Gallery.open(sys.argv[1], writable=True, verify=False, progress=False)
print("ready", flush=True)
while True:
    (e, a, p, m), meta = batch(len(g))
    g.append(e, a, p, meta, aam=m)
"""

# One append or compaction that stops the process (os._exit, like a kill) at a chosen point of the publishing protocol:
# before/after the segment folder's rename, the journal's add record (pwrite; "torn": half of it written) or the
# first/second os.replace of a compaction (gallery.json, then the new journal).
CHILD_CRASH = GENERATOR + """
import os, sys
from attrimeter.runtime.gallery import Gallery

point, action = sys.argv[2:]
g = Gallery.open(sys.argv[1], writable=True, verify=False, progress=False, auto_compact=None)
op, when = point.split("-")
name = op.rstrip("2")
real = getattr(os, name)
calls = []


def crash(*args, **kwargs):
    if name == "pwrite" and b'"op":"add"' not in args[1]:
        return real(*args, **kwargs)
    calls.append(1)
    if op.endswith("2") and len(calls) < 2:
        return real(*args, **kwargs)
    if when == "after":
        real(*args, **kwargs)
    elif when == "torn":
        real(args[0], args[1][:len(args[1]) // 2], args[2])
    os._exit(3)


setattr(os, name, crash)
if action == "compact":
    g.compact(progress=False)
else:
    (e, a, p, m), meta = batch(len(g))
    g.append(e, a, p, meta, aam=m)
"""

CHILD_APPEND = GENERATOR + """
import sys
from attrimeter.runtime.gallery import Gallery

with Gallery.open(sys.argv[1], writable=True, progress=False) as g:
    (e, a, p, m), meta = batch(len(g))
    g.append(e, a, p, meta, aam=m)
"""


def _run_child(code, *args, timeout=60):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _gen_gallery(path):
    return Gallery.create(path, dim=GEN["C"], attributes=ATTRS, aam_shape=GEN["AAM"], model="gen", metric="l2")


def _prefix_sums(limit):
    sums, first = [0], 0
    while first <= limit:
        first += GEN["batch_size"](first)
        sums.append(first)
    return sums


def _check_generated(g):
    """The gallery holds whole batches, each entry exactly what the generator gives for its id."""
    n = len(g)
    assert n in _prefix_sums(n)
    if n == 0:
        return
    ids = np.arange(n)
    rows = [GEN["entry"](i) for i in ids]
    np.testing.assert_array_equal(g.embeddings(ids), np.stack([r[0] for r in rows]))
    np.testing.assert_array_equal(g.attr_embeddings(ids), np.stack([r[1] for r in rows]).astype(np.float16))
    np.testing.assert_array_equal(g.probs(ids), np.stack([r[2] for r in rows]))
    np.testing.assert_array_equal(g.aam(ids), np.stack([r[3] for r in rows]).astype(np.float16))
    assert g.meta(ids) == [{"id": int(i), **r[4]} for i, r in zip(ids, rows, strict=True)]


def _is_mapped(a):
    while isinstance(a, (np.ndarray, memoryview)):
        a = a.base if isinstance(a, np.ndarray) else a.obj
    return isinstance(a, mmap.mmap)


def _listed(path):
    """Names of the published segments: gallery.json's, then the add records of a journal of its generation."""
    manifest = parse_manifest((Path(path) / MANIFEST_NAME).read_bytes(), "")
    names = {s.name for s in manifest.segments}
    journal = Path(path) / JOURNAL_NAME
    if journal.exists():
        raw = journal.read_bytes()
        generation, start = parse_journal_header(raw, "")
        if generation == manifest.generation:
            names |= {s.name for s in parse_journal(raw[start:], "", spec=manifest.spec, start=start, seq=0,
                                                    first_id=manifest.count, names=names).added}
    return names


def _on_disk(path):
    return set(os.listdir(Path(path) / "segments"))


def _batch(rng, n, dim=24, aam=(8, 4)):
    return {
        "embedding": rng.standard_normal((n, dim)).astype(np.float32),
        "attr_embeddings": rng.standard_normal((n, M, dim)).astype(np.float32),
        "probs": rng.random((n, M)).astype(np.float32),
        "meta": [{"key": f"k{rng.integers(1 << 30)}", "camera": int(rng.integers(6)), "path": None} for _ in range(n)],
        "aam": None if aam is None else rng.random((n, M, *aam)).astype(np.float32),
    }


def _concat(batches):
    out = {k: np.concatenate([b[k] for b in batches]) for k in ("embedding", "attr_embeddings", "probs", "aam")}
    out["meta"] = [m for b in batches for m in b["meta"]]
    return out


def _assert_holds(g, data):
    ids = np.arange(len(data["meta"]))
    assert len(g) == len(ids)
    np.testing.assert_array_equal(g.embeddings(ids), data["embedding"])
    np.testing.assert_array_equal(g.attr_embeddings(ids), data["attr_embeddings"].astype(np.float16))
    np.testing.assert_array_equal(g.probs(ids), data["probs"])
    np.testing.assert_array_equal(g.aam(ids), data["aam"].astype(np.float16))
    assert g.meta(ids) == [{"id": int(i), **m} for i, m in zip(ids, data["meta"], strict=True)]
    chunks = list(g.attr_chunks(7))
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks) and chunks[0][0] == 0
    assert all(c.dtype == np.float16 and len(c) <= 7 for _, c in chunks)
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), data["attr_embeddings"].astype(np.float16))


@pytest.fixture
def filled(tmp_path, rng):
    """A writable l2 gallery of four segments of random sizes, and what was appended."""
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=(8, 4), model="m")
    batches = [_batch(rng, int(n)) for n in rng.integers(1, 9, size=4)]
    for b in batches:
        g.append(**b)
    yield g, _concat(batches)
    g.close()


# ---------------------------------------------------------------------- round trip


def test_roundtrip_and_reopen(tmp_path, rng):
    path = tmp_path / "g"
    g = Gallery.create(path, dim=24, attributes=ATTRS, aam_shape=(8, 4), model="sha-x")
    assert len(g) == 0 and g.segments == 0 and g.writable
    batches, start = [], 0
    for n in rng.integers(1, 12, size=5):
        b = _batch(rng, int(n))
        b["attr_embeddings"] = b["attr_embeddings"].astype(np.float64)  # any float dtype; stored float16
        ids = g.append(**b)
        assert ids.dtype == np.int64
        np.testing.assert_array_equal(ids, np.arange(start, start + n))
        start += int(n)
        batches.append(b)
    data = _concat(batches)
    _assert_holds(g, data)
    assert g.segments == 5
    g.close()
    with pytest.raises(GalleryError, match="closed"):
        len(g.embeddings([0]))
    with Gallery.open(path, verify=True) as r:
        assert (r.dim, r.attributes, r.aam_shape, r.model, r.metric) == (24, ATTRS, (8, 4), "sha-x", "l2")
        assert not r.writable
        _assert_holds(r, data)
        with pytest.raises(GalleryError, match="read-only"):
            r.append(**_batch(rng, 1))
    doc = json.loads((path / MANIFEST_NAME).read_text())
    assert doc["format"] == "attrimeter-gallery" and doc["count"] == len(data["meta"])
    seg = path / "segments" / doc["segments"][0]["name"]
    assert np.load(seg / "attr.npy", mmap_mode="r").dtype == np.float16
    assert len((seg / "meta.jsonl").read_text().splitlines()) == doc["segments"][0]["count"]


def test_large_segment_is_memory_mapped_and_gallery_without_aam(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=256, attributes=ATTRS, aam_shape=None, model="m", metric="ip")
    small, big = _batch(rng, 3, dim=256, aam=None), _batch(rng, 600, dim=256, aam=None)  # big attr.npy: 1.2 MB
    big["meta"] = [dict(m, path="x" * 2000) for m in big["meta"]]  # meta.jsonl > 1 MiB: read line by line
    with pytest.raises(InputError, match="no activation maps"):
        g.append(**dict(small, aam=np.zeros((3, M, 2, 2), np.float32)))
    del small["aam"], big["aam"]
    g.append(**small)
    g.append(**big)
    g.close()
    with Gallery.open(tmp_path / "g") as r:
        chunks = dict(r.attr_chunks(1000))
        assert not _is_mapped(chunks[0]) and _is_mapped(chunks[3])  # scans map large files, small ones are in memory
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
        b = _batch(rng, n, aam=None)
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
    b = _batch(rng, 60, aam=None)
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
    first = _batch(rng, 5, aam=None)
    del first["aam"]
    g.append(**first)
    batches = []
    for n in rng.integers(1, 6, size=20):
        b = _batch(rng, int(n), aam=None)
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
    b = _batch(rng, 3)
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
    before, folders = manifest.read_bytes(), _on_disk(g.path)
    for label, kwargs in _bad_inputs(rng):
        with pytest.raises(InputError):
            g.append(**kwargs)
            pytest.fail(label)
        assert manifest.read_bytes() == before, label
        assert _on_disk(g.path) == folders, label
    assert len(g) == len(data["meta"])
    _assert_holds(g, data)
    ok = _batch(rng, 2)
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


# ---------------------------------------------------------------------- crash safety


def test_sigkill_during_appends_loses_nothing_published(tmp_path, rng):
    path = tmp_path / "g"
    _gen_gallery(path).close()
    counts = []
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", CHILD_LOOP, str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read() if proc.poll() is not None else line
            with pytest.raises(GalleryError, match="locked by another writer"):
                Gallery.open(path, writable=True)
            time.sleep(float(rng.uniform(0.05, 0.5)))
        finally:
            proc.kill()
            proc.wait()
        with Gallery.open(path, verify=True, progress=False) as g:
            _check_generated(g)
        with Gallery.open(path, writable=True, progress=False) as w:  # the dead writer's lock is gone
            assert _on_disk(path) == _listed(path)  # and what it left half-written is removed
            (e, a, p, m), meta = GEN["batch"](len(w))
            w.append(e, a, p, meta, aam=m)
            counts.append(len(w))
    with Gallery.open(path, verify=True, progress=False) as g:
        _check_generated(g)
        assert len(g) == counts[-1] and len(g) > 5
        d, ids = g.search(g.embeddings([len(g) - 1]), 1)
        assert ids[0, 0] == len(g) - 1


@pytest.mark.parametrize("point", ["rename-before", "rename-after", "pwrite-before", "pwrite-torn", "pwrite-after"])
def test_crash_at_each_publishing_step(tmp_path, point):
    path = tmp_path / "g"
    with _gen_gallery(path) as g:
        (e, a, p, m), meta = GEN["batch"](0)
        g.append(e, a, p, meta, aam=m)
        before = len(g)
    manifest_before = (path / MANIFEST_NAME).read_bytes()
    result = _run_child(CHILD_CRASH, path, point, "append")
    assert result.returncode == 3, result.stderr
    published = point == "pwrite-after"
    assert (path / MANIFEST_NAME).read_bytes() == manifest_before  # an append only appends to the journal
    leftovers = _on_disk(path) - _listed(path)
    if published:
        assert not leftovers
    else:  # a half-written or unpublished segment folder is on disk, yet invisible
        assert len(leftovers) == 1 and (next(iter(leftovers)).startswith(".") == (point == "rename-before"))
    with Gallery.open(path, verify=True, progress=False) as r:  # a torn journal record is ignored
        assert len(r) == before + (GEN["batch_size"](before) if published else 0)
        _check_generated(r)
    with Gallery.open(path, writable=True, progress=False) as w:
        assert _on_disk(path) == _listed(path) and not (path / (MANIFEST_NAME + ".tmp")).exists()
        (e, a, p, m), meta = GEN["batch"](len(w))
        w.append(e, a, p, meta, aam=m)
        _check_generated(w)
    with Gallery.open(path, verify=True, progress=False) as r:
        _check_generated(r)


@pytest.mark.parametrize("point", ["rename-after", "replace-before", "replace-after", "replace2-after"])
def test_crash_during_compaction(tmp_path, point):
    path = tmp_path / "g"
    with _gen_gallery(path) as g:
        for _ in range(4):
            (e, a, p, m), meta = GEN["batch"](len(g))
            g.append(e, a, p, meta, aam=m)
    before = _listed(path)
    result = _run_child(CHILD_CRASH, path, point, "compact")
    assert result.returncode == 3, result.stderr
    after = _listed(path)
    published = point in ("replace-after", "replace2-after")  # gallery.json names the merged segment
    assert len(after) == (1 if published else 4) and (after == before) != published
    assert _on_disk(path) > after  # the old or the merged folders are still there
    with Gallery.open(path, verify=True, progress=False) as r:  # old or merged segments, all entries either way
        _check_generated(r)
    with Gallery.open(path, writable=True, progress=False) as w:
        assert _on_disk(path) == _listed(path)
        w.compact(progress=False)
        assert w.segments == 1
        _check_generated(w)


def test_failed_publish_in_process_rolls_back(filled, rng, monkeypatch):
    g, data = filled
    manifest = g.path / MANIFEST_NAME
    before, folders = manifest.read_bytes(), _on_disk(g.path)

    real_pwrite = os.pwrite

    def fail(fd, data, offset):
        if b'"op":"add"' in data:  # the disk fills up just as the add record is written: half of it lands
            real_pwrite(fd, data[:len(data) // 2], offset)
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fail)
    with pytest.raises(StorageError, match="nothing was published"):
        g.append(**_batch(rng, 4))
    monkeypatch.undo()
    assert manifest.read_bytes() == before and _on_disk(g.path) == folders
    assert not (g.path / (MANIFEST_NAME + ".tmp")).exists()
    _assert_holds(g, data)
    b = _batch(rng, 2)
    np.testing.assert_array_equal(g.append(**b), [len(data["meta"]), len(data["meta"]) + 1])
    with Gallery.open(g.path, verify=True) as r:
        _assert_holds(r, _concat([data, b]))


# ---------------------------------------------------------------------- corruption and locking


def _segment_file(path, name, index=0):
    doc = json.loads((Path(path) / MANIFEST_NAME).read_text())
    return Path(path) / "segments" / doc["segments"][index]["name"] / name


@pytest.mark.parametrize("name", ["embedding.npy", "attr.npy", "probs.npy", "aam.npy", "meta.jsonl"])
def test_flipped_byte_is_caught_by_verify(filled, rng, name):
    g, _ = filled
    g.close()
    file = _segment_file(g.path, name, int(rng.integers(4)))
    raw = bytearray(file.read_bytes())
    raw[-2] ^= 0x10  # a data byte (the last byte of meta.jsonl is its newline)
    file.write_bytes(bytes(raw))
    with pytest.raises(GalleryError, match=name):
        Gallery.open(g.path, verify=True)
    with Gallery.open(g.path, verify=False) as r:  # sizes and headers are intact
        with pytest.raises(GalleryError, match=name):
            r.verify()


@pytest.mark.parametrize("name", ["embedding.npy", "attr.npy", "aam.npy", "meta.jsonl"])
def test_truncated_or_missing_file_is_caught_without_verify(filled, name):
    g, _ = filled
    g.close()
    file = _segment_file(g.path, name, 1)
    raw = file.read_bytes()
    file.write_bytes(raw[:-3])
    with pytest.raises(GalleryError, match=f"{name}.*truncated"):
        Gallery.open(g.path, verify=False)
    file.unlink()
    with pytest.raises(GalleryError, match=f"{name}: missing"):
        Gallery.open(g.path, verify=False)


def test_wrong_array_header_is_caught_without_verify(filled):
    g, _ = filled
    g.close()
    file = _segment_file(g.path, "embedding.npy")
    arr = np.load(file)
    np.save(file, np.ascontiguousarray(arr.T))  # same size, transposed shape
    with pytest.raises(GalleryError, match=r"embedding.npy: holds float32 \[24, "):
        Gallery.open(g.path, verify=False)


def test_foreign_or_malformed_manifest(filled):
    g, _ = filled
    g.close()
    manifest = g.path / MANIFEST_NAME
    good = json.loads(manifest.read_text())
    cases = {
        "not an AttriMeter gallery": json.dumps({"format": "attrimeter-export", "version": 1}),
        "not a gallery manifest": "\x00garbage{",
        "version 7": json.dumps({**good, "version": 7}),
        "count": json.dumps({**good, "count": good["count"] + 1}),
        "segment 1 is malformed": json.dumps({**good, "segments": [good["segments"][0], good["segments"][2]]}),
        "bad gallery identity": json.dumps({**good, "metric": "hamming"}),
    }
    for message, text in cases.items():
        manifest.write_text(text)
        with pytest.raises(GalleryError, match=message) as info:
            Gallery.open(g.path, verify=False)
        assert MANIFEST_NAME in str(info.value)


def test_one_writer_at_a_time(filled):
    g, data = filled
    with pytest.raises(GalleryError, match="locked by another writer"):
        Gallery.open(g.path, writable=True)
    with Gallery.open(g.path) as reader:  # readers take no lock
        assert len(reader) == len(data["meta"])
    g.close()
    with Gallery.open(g.path, writable=True) as w:
        assert w.writable
        with pytest.raises(GalleryError, match="locked by another writer"):
            Gallery.open(g.path, writable=True)
    assert not w.writable


# ---------------------------------------------------------------------- refresh and compaction


def test_refresh_sees_another_process_append(tmp_path, rng):
    path = tmp_path / "g"
    with _gen_gallery(path) as g:
        (e, a, p, m), meta = GEN["batch"](0)
        g.append(e, a, p, meta, aam=m)
    with Gallery.open(path) as r:
        n0 = len(r)
        r.search(rng.standard_normal((1, GEN["C"])).astype(np.float32), 2)  # index built before the append
        result = _run_child(CHILD_APPEND, path)
        assert result.returncode == 0, result.stderr
        assert len(r) == n0
        n1 = r.refresh()
        assert n1 == len(r) == n0 + GEN["batch_size"](n0)
        _check_generated(r)
        d, ids = r.search(r.embeddings(np.arange(n0, n1)), 1)
        np.testing.assert_array_equal(ids[:, 0], np.arange(n0, n1))
        assert r.refresh() == n1


def test_compact_keeps_ids_and_readers_working(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=(8, 4), model="m", metric="ip")
    batches = [_batch(rng, int(n)) for n in (5, 300, 1, 9)]
    batches[1]["meta"] = [dict(m, path="p" * 4000) for m in batches[1]["meta"]]  # a large, lazily read meta file
    for b in batches:
        g.append(**b)
    data = _concat(batches)
    q = rng.standard_normal((4, 24)).astype(np.float32)
    expected = g.search(q, 6)
    reader = Gallery.open(g.path)
    old = _on_disk(g.path)
    g.compact(progress=False)
    assert g.segments == 1 and _on_disk(g.path) == _listed(g.path) and not (_on_disk(g.path) & old)
    _assert_holds(g, data)
    np.testing.assert_array_equal(g.search(q, 6)[1], expected[1])
    # the reader still has the old segments open: arrays are memory-mapped or in memory, meta refreshes itself
    assert reader.segments == 4
    ids = rng.permutation(len(data["meta"]))[:50]
    np.testing.assert_array_equal(reader.embeddings(ids), data["embedding"][ids])
    assert reader.meta(ids) == [{"id": int(i), **data["meta"][i]} for i in ids]
    assert reader.refresh() == len(data["meta"]) and reader.segments == 1
    _assert_holds(reader, data)
    reader.close()
    b = _batch(rng, 3)
    g.append(**b)
    g.compact(progress=False)
    g.close()
    with Gallery.open(g.path, verify=True) as r:
        assert r.segments == 1
        _assert_holds(r, _concat([data, b]))


@pytest.mark.parametrize("op", ["append", "compact"])
def test_interrupt_right_after_publishing_keeps_the_published_segment(filled, rng, monkeypatch, op):
    """Ctrl-C landing just after the journal record or gallery.json was written must not delete what they list."""
    g, data = filled
    extra = _batch(rng, 3)
    real_pwrite, real_replace = os.pwrite, os.replace

    def pwrite_then_interrupt(fd, line, offset):
        done = real_pwrite(fd, line, offset)
        if b'"op":"add"' in line:
            raise KeyboardInterrupt
        return done

    def replace_then_interrupt(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        if str(dst).endswith(MANIFEST_NAME):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "pwrite", pwrite_then_interrupt)
    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        g.append(**extra) if op == "append" else g.compact(progress=False)
    monkeypatch.undo()
    if op == "append":  # the same handle goes on from what was published
        one = _batch(rng, 1)
        np.testing.assert_array_equal(g.append(**one), [len(data["meta"]) + 3])
        extra = _concat([extra, one])
    path = g.path
    g.close()
    assert _listed(path) <= _on_disk(path)
    with Gallery.open(path, verify=True) as reopened:
        _assert_holds(reopened, _concat([data, extra]) if op == "append" else data)


def test_a_failed_write_is_a_storage_error(filled, rng, monkeypatch):
    g, data = filled
    folders = _on_disk(g.path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match="nothing was published"):
        g.append(**_batch(rng, 2))
    with pytest.raises(StorageError, match="nothing was published"):
        g.compact(progress=False)
    monkeypatch.undo()
    _assert_holds(g, data)
    assert _on_disk(g.path) == folders


# ---------------------------------------------------------------------- the writer lock (a second writer never gets in)


def test_removing_the_lock_file_lets_no_second_writer_in(tmp_path):
    path = tmp_path / "g"
    _gen_gallery(path).close()
    proc = subprocess.Popen([sys.executable, "-c", CHILD_LOOP, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        (path / ".lock").unlink()  # what an outside attack did: the old lock was only this file's flock
        with pytest.raises(LockedGalleryError, match="locked by another writer"):
            Gallery.open(path, writable=True)
        other = _run_child("import sys\nfrom attrimeter.runtime.gallery import Gallery\n"
                           "Gallery.open(sys.argv[1], writable=True)", path)
        assert other.returncode != 0 and "LockedGalleryError" in other.stderr
        time.sleep(0.3)  # the writer keeps appending meanwhile
    finally:
        proc.kill()
        proc.wait()
    with Gallery.open(path, writable=True, progress=False) as w:  # nothing of the first writer's was deleted
        assert _on_disk(path) == _listed(path) and len(w) > 1
        _check_generated(w)


def test_a_format_1_writer_holding_dot_lock_keeps_new_writers_out(tmp_path):
    import fcntl

    path = tmp_path / "g"
    shutil.copytree(V1_FIXTURE, path)
    fd = os.open(path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as an older runtime's writer does
        with pytest.raises(LockedGalleryError, match="older runtime"):
            Gallery.open(path, writable=True)
    finally:
        os.close(fd)
    Gallery.open(path, writable=True).close()


def test_a_writer_deletes_only_what_the_published_state_names_as_garbage(filled, rng, caplog):
    g, data = filled
    path = g.path
    g.close()
    strays = {"000000000007-0badc0de", ".tmp-000000000007-feedf00d", "notes"}  # e.g. another writer's folders
    for name in strays:
        (path / "segments" / name).mkdir()
        (path / "segments" / name / "embedding.npy").write_bytes(b"not ours")
    with caplog.at_level("WARNING", logger="attrimeter.runtime.store"):
        with Gallery.open(path, writable=True, auto_compact=None) as w:
            w.append(**_batch(rng, 2))
            w.compact(progress=False)
            assert w.segments == 1
    assert _on_disk(path) == _listed(path) | strays
    assert all((path / "segments" / name / "embedding.npy").read_bytes() == b"not ours" for name in strays)
    assert any("left in place" in r.getMessage() and "0badc0de" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- symbolic links (nothing outside is touched)


def _outside(tmp_path):
    outside = tmp_path / "outside"
    (outside / "000000000099-00000000").mkdir(parents=True)
    for f in ("precious.txt", "000000000099-00000000/embedding.npy"):
        (outside / f).write_text("keep")
    return outside


def _untouched(outside):
    return sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == [
        "000000000099-00000000", "000000000099-00000000/embedding.npy", "precious.txt"] and all(
        p.read_text() == "keep" for p in outside.rglob("*") if p.is_file())


def test_a_symlinked_segments_folder_is_refused_by_writers(filled, tmp_path):
    g, data = filled
    g.close()
    outside = _outside(tmp_path)
    for name in os.listdir(g.path / "segments"):
        shutil.move(g.path / "segments" / name, outside / name)
    (g.path / "segments").rmdir()
    os.symlink(outside, g.path / "segments")
    with Gallery.open(g.path, verify=True) as r:  # reading through it harms nothing
        _assert_holds(r, data)
    with pytest.raises(UnsafeGalleryPathError, match="segments: a symbolic link"):
        Gallery.open(g.path, writable=True)
    new = tmp_path / "new"
    new.mkdir()
    os.symlink(outside, new / "segments")
    with pytest.raises(UnsafeGalleryPathError, match="segments: a symbolic link"):
        Gallery.create(new, dim=24, attributes=ATTRS, aam_shape=None, model="m")
    for name in os.listdir(g.path / "segments"):  # remove what the gallery moved there: the rest stays as it was
        if name not in ("precious.txt", "000000000099-00000000"):
            shutil.rmtree(outside / name)
    assert _untouched(outside)


@pytest.mark.parametrize("where", ["garbage", "journal", "lock"])
def test_links_where_a_writer_deletes_or_writes_are_refused(filled, tmp_path, where):
    g, data = filled
    g.close()
    outside = _outside(tmp_path)
    manifest = g.path / MANIFEST_NAME
    if where == "garbage":  # a manifest naming a link as garbage: deleting it must not delete what it points to
        doc = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**doc, "garbage": ["000000000099-00000000"]}))
        os.symlink(outside / "000000000099-00000000", g.path / "segments" / "000000000099-00000000")
    elif where == "journal":
        (g.path / JOURNAL_NAME).unlink()
        os.symlink(outside / "precious.txt", g.path / JOURNAL_NAME)
    else:
        (g.path / ".lock").unlink()
        os.symlink(outside / "precious.txt", g.path / ".lock")
    with pytest.raises(UnsafeGalleryPathError, match="symbolic link"):
        Gallery.open(g.path, writable=True)
    assert _untouched(outside)


# ---------------------------------------------------------------------- append cost and compaction while serving


def test_an_append_writes_one_journal_record_whatever_the_number_of_segments(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=(8, 4), model="m", auto_compact=None)
    manifest, journal = g.path / MANIFEST_NAME, g.path / JOURNAL_NAME
    before = (manifest.stat().st_ino, manifest.read_bytes())
    growth = []
    for _ in range(60):
        size = journal.stat().st_size
        g.append(**_batch(rng, 1))
        growth.append(journal.stat().st_size - size)
    # gallery.json is never rewritten by an append, and each append adds two records of the same size (ids and
    # sequence numbers aside), at 10 segments as at 60
    assert (manifest.stat().st_ino, manifest.read_bytes()) == before
    assert abs(growth[-1] - growth[10]) <= 4 and growth[-1] < 1500
    g.close()
    assert json.loads(manifest.read_text())["count"] == 60  # folded on close


def test_compaction_on_the_writers_handle_while_readers_search(tmp_path, rng):
    path = tmp_path / "g"
    writer = Gallery.create(path, dim=256, attributes=ATTRS, aam_shape=(8, 4), model="m", auto_compact=None)
    batches = [_batch(rng, 600, dim=256)] + [_batch(rng, int(n), dim=256) for n in rng.integers(1, 5, size=8)]
    for b in batches:  # one large segment (files kept open, read by position) and small ones (in memory)
        writer.append(**b)
    data = _concat(batches)
    reader = Gallery.open(path)  # another handle, as another process would hold
    n = len(data["meta"])
    errors, stop = [], threading.Event()

    def search(g, seed):
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                ids = r.integers(n, size=5)
                d, hits = g.search(data["embedding"][ids], 1)
                assert (hits[:, 0] == ids).all() and (d[:, 0] == 0).all()
                np.testing.assert_array_equal(g.attr_embeddings(ids), data["attr_embeddings"][ids].astype(np.float16))
                assert [m["key"] for m in g.meta(ids)] == [data["meta"][i]["key"] for i in ids]
        except Exception as e:  # reported below: an assertion in a thread would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=search, args=(g, i)) for i, g in enumerate((writer, reader, reader))]
    for t in threads:
        t.start()
    old = _on_disk(path)
    writer.compact(progress=False)
    extra = _batch(rng, 3, dim=256)
    writer.append(**extra)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert writer.segments == 2 and not (old & _on_disk(path))  # the old folders are gone from disk
    assert reader.segments == len(batches)  # ... yet the reader still answers from what it opened
    _assert_holds(reader, data)
    assert reader.refresh() == n + 3 and reader.segments == 2
    _assert_holds(reader, _concat([data, extra]))
    reader.close()
    writer.close()


def test_a_writer_merges_its_small_segments_as_it_appends(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=(8, 4), model="m", auto_compact=4)
    reader = Gallery.open(g.path)
    batches = []
    for _ in range(40):
        batches.append(_batch(rng, 1))
        g.append(**batches[-1])
        assert g.segments < 4  # one-entry appends are merged by fours, then the merged ones by fours
    data = _concat(batches)
    _assert_holds(g, data)
    assert _on_disk(g.path) == _listed(g.path)
    assert reader.refresh() == 40
    _assert_holds(reader, data)
    reader.close()
    g.close()
    with pytest.raises(InputError, match="auto_compact"):
        Gallery.open(g.path, writable=True, auto_compact=1)
    Gallery.open(g.path, writable=True).close()  # the refused handle released its lock


def test_cli_compact_on_a_gallery_a_server_writes_says_what_to_do(filled, capsys):
    from attrimeter.cli import main

    g, _ = filled
    with pytest.raises(SystemExit) as info:
        main(["compact", "--gallery", str(g.path), "-q"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "locked by another writer" in err and "Only the gallery's writer can compact it" in err
    g.compact(progress=False)  # what it says: the writer's own handle compacts
    assert g.segments == 1


# ---------------------------------------------------------------------- malformed manifest and journal


def _journal_line(body):
    text = json.dumps(body, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(text), text)


def _bad_manifests(good):
    seg = good["segments"][0]
    yield "deep", b"[" * 100_000 + b"]" * 100_000
    yield "deep field", json.dumps({**good, "dim": {"a": [[[]]]}})
    yield "NUL name", json.dumps({**good, "segments": [{**seg, "name": "seg\x00ment"}] + good["segments"][1:]})
    yield "escaping name", json.dumps({**good, "segments": [{**seg, "name": "../../outside"}] + good["segments"][1:]})
    yield "count string", json.dumps({**good, "count": str(good["count"])})
    yield "dim bool", json.dumps({**good, "dim": True})
    yield "attributes string", json.dumps({**good, "attributes": "abcd"})
    yield "aam_shape dict", json.dumps({**good, "aam_shape": {"h": 8}})
    yield "segments dict", json.dumps({**good, "segments": {"a": 1}})
    yield "files list", json.dumps({**good, "segments": [{**seg, "files": []}] + good["segments"][1:]})
    yield "negative size", json.dumps({**good, "segments": [{**seg, "sizes": {**seg["sizes"], "meta.jsonl": -1}}]
                                       + good["segments"][1:]})
    yield "huge count", json.dumps({**good, "count": 10**30})
    yield "NaN", json.dumps({**good, "generation": float("nan")})
    yield "garbage path", json.dumps({**good, "garbage": ["a/b"]})
    yield "extra field", json.dumps({**good, "extra": 1})
    yield "not UTF-8", b"\xff\xfe{}"
    yield "a list", b"[]"


def test_a_malformed_manifest_is_a_corrupt_gallery_error(filled):
    g, _ = filled
    g.close()
    manifest = g.path / MANIFEST_NAME
    good = json.loads(manifest.read_text())
    for label, text in _bad_manifests(good):
        manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(CorruptGalleryError) as info:
            Gallery.open(g.path, verify=False)
            pytest.fail(label)
        assert MANIFEST_NAME in str(info.value), label


def test_a_malformed_journal_is_a_corrupt_gallery_error_and_a_torn_tail_is_ignored(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=(8, 4), model="m", auto_compact=None)
    batches = [_batch(rng, 2) for _ in range(3)]
    for b in batches:
        g.append(**b)
    data = _concat(batches)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(g.path, snapshot, ignore=shutil.ignore_patterns(".lock"))  # a journal with six records
    g.close()
    good = (snapshot / JOURNAL_NAME).read_bytes()
    header, *records = good.splitlines(keepends=True)
    last = json.loads(records[-1][9:])
    cases = {
        "deep JSON": header + b"".join(records) + b"%08x %s\n" % (zlib.crc32(b"[" * 50_000 + b"]" * 50_000),
                                                                   b"[" * 50_000 + b"]" * 50_000),
        "NUL name": header + b"".join(records) + _journal_line({"seq": 7, "op": "begin", "name": "a\x00b"}),
        "escaping name": header + b"".join(records) + _journal_line({"seq": 7, "op": "begin", "name": "../../x"}),
        "count string": header + b"".join(records[:-1]) + _journal_line(
            {**last, "segment": {**last["segment"], "count": "2"}}),
        "out of sequence": header + b"".join(records) + records[-1],
        "reused name": header + b"".join(records) + _journal_line(
            {**last, "seq": 7, "segment": {**last["segment"], "first_id": 6}}),
        "unknown op": header + b"".join(records) + _journal_line({"seq": 7, "op": "drop", "name": "x"}),
        "damaged middle": header + records[0][:20] + b"X" + records[0][21:] + b"".join(records[1:]),
        "bad header": b"0000000 " + header[8:] + b"".join(records),
        "header only garbage": b"{}\n",
    }
    for label, raw in cases.items():
        (snapshot / JOURNAL_NAME).write_bytes(raw)
        with pytest.raises(CorruptGalleryError) as info:
            Gallery.open(snapshot, verify=False)
            pytest.fail(label)
        assert JOURNAL_NAME in str(info.value), label
    torn = {"half a record": good + _journal_line({"seq": 7, "op": "begin", "name": "x"})[:30],
            "bad checksum at the end": good + b"deadbeef " + _journal_line({"seq": 7, "op": "begin", "name": "x"})[9:],
            "two torn lines": good + b"0\n1\n"}
    for label, raw in torn.items():
        (snapshot / JOURNAL_NAME).write_bytes(raw)
        with Gallery.open(snapshot, verify=True) as r:
            _assert_holds(r, data)
        with Gallery.open(snapshot, writable=True) as w:  # the writer folds it away
            _assert_holds(w, data)
        assert (snapshot / JOURNAL_NAME).read_bytes().count(b"\n") == 1, label


# ---------------------------------------------------------------------- format 1 and reading rows by position


V1_FIXTURE = Path(__file__).parent / "data" / "gallery_v1"  # written by the format-1 store (commit f4db7f6)


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
        assert json.loads(manifest.read_text())["version"] == 2 and (path / JOURNAL_NAME).exists()
        emb, attr, probs, aam, meta = _v1_rows(5, 2)
        w.append(emb, attr, probs, meta, aam=aam)
    with Gallery.open(path, verify=True) as r:
        _check_v1(r, 7)


def test_hit_rows_are_read_without_mapping_the_store(tmp_path, rng):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    g = Gallery.create(tmp_path / "g", dim=256, attributes=ATTRS, aam_shape=(8, 4), model="m")
    b = _batch(rng, 700, dim=256)  # every array file of the segment but probs.npy is over 1 MiB
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
        g.append(**_batch(rng, 2))
    monkeypatch.undo()
    extra = [_batch(rng, 3), _batch(rng, 1)]  # records now where the cut one was
    for b in extra:
        g.append(**b)
    assert reader.refresh() == len(data["meta"]) + 4
    _assert_holds(reader, _concat([data, *extra]))
    reader.close()


def test_segments_without_stored_norms_still_open_scan_and_gain_them_when_compacted(tmp_path, rng):
    from attrimeter.runtime.decompose import weighted_scan

    path = tmp_path / "g"
    data = [_batch(rng, 5, aam=None), _batch(rng, 6, aam=None)]
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


def test_l2_search_re_ranks_from_the_index_memory_without_reading_the_store(tmp_path, rng, monkeypatch):
    data = _batch(rng, 50, aam=None)
    with Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=None, model="m") as g:
        g.append(**data)
        q = rng.standard_normal((3, 24)).astype(np.float32)
        want = np.linalg.norm(data["embedding"][None] - q[:, None], axis=2)
        g.load_index()
        monkeypatch.setattr(g, "embeddings", lambda ids: pytest.fail("read the store to re-rank"))
        dist, ids = g.search(q, 5)
        np.testing.assert_array_equal(ids, np.argsort(want, axis=1, kind="stable")[:, :5])
        np.testing.assert_allclose(dist, np.take_along_axis(want, ids, 1), rtol=1e-6)
