"""Gallery storage modes (format 3): round trips through the store, old formats, strict parsing of the storage field
and codecs.npz."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gallery_helpers import ATTRS, batch_of, concat_batches

from attrimeter.cli import main
from attrimeter.runtime.decompose import check_weights
from attrimeter.runtime.errors import CorruptGalleryError, GalleryError, InputError
from attrimeter.runtime.gallery import MANIFEST_NAME, Gallery
from attrimeter.runtime.images import load_image
from attrimeter.runtime.runtime import Runtime, RuntimeConfig
from attrimeter.runtime.segment import squared_norms
from attrimeter.runtime.storage import FIT_MIN_ENTRIES, STATE_NAME, fit_storage, storage_codecs
from attrimeter.runtime.store_format import GallerySpec

pytest.importorskip("faiss")

DIM, AAM = 40, (6, 4)
MODES = ("float16", "int8", "compact", "compact-nomaps")


def _codecs(mode, rng):
    """A mode's codecs, trained kinds fitted on rows the gallery does not store."""
    sample = batch_of(rng, FIT_MIN_ENTRIES + 16, dim=DIM, aam=AAM)
    return fit_storage(mode, sample["attr_embeddings"], sample["aam"])


def _expected(codecs, data):
    """What the store must read back: each row encoded and decoded by the gallery's codecs."""
    attr = codecs.attr.decode(codecs.attr.encode(data["attr_embeddings"]))
    aam = None
    if codecs.keeps_maps:
        flat = data["aam"].reshape(len(attr), len(ATTRS), -1)
        aam = codecs.aam.decode(codecs.aam.encode(flat)).reshape(data["aam"].shape)
    return attr, aam


def _check(g, codecs, data):
    ids = np.arange(len(data["meta"]))
    attr, aam = _expected(codecs, data)
    assert len(g) == len(ids) and g.storage.mode == codecs.mode
    np.testing.assert_array_equal(g.embeddings(ids), data["embedding"])
    np.testing.assert_array_equal(g.probs(ids), data["probs"])
    np.testing.assert_array_equal(g.attr_embeddings(ids), attr)
    np.testing.assert_array_equal(g.attr_embeddings(ids[::-3]), attr[::-3])  # gathers decode like whole reads
    if aam is None:
        assert g.aam(ids) is None and not g.keeps_maps
    else:
        np.testing.assert_array_equal(g.aam(ids), aam)
    chunks = list(g.scan_chunks(7))
    assert [c[0] for c in chunks] == list(range(0, len(ids), 7)) or len({c[0] for c in chunks}) == len(chunks)
    rows = np.concatenate([np.asarray(c[1], np.float32) for c in chunks])
    np.testing.assert_array_equal(rows, attr)
    assert all(c[1].dtype == (np.float16 if codecs.mode == "float16" else np.float32) for c in chunks)
    # norms of the decoded rows: the weighted scan and the explanations see the same values
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), squared_norms(attr))


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_round_trips_through_append_compact_reopen_refresh(mode, tmp_path, rng):
    codecs = _codecs(mode, rng)
    path = tmp_path / "g"
    batches = [batch_of(rng, n, dim=DIM, aam=AAM) for n in (9, 1, 23)]
    with Gallery.create(path, dim=DIM, attributes=ATTRS, aam_shape=AAM, model="m", storage=codecs,
                        auto_compact=None) as g:
        g.append(**batches[0])
        state = (path / STATE_NAME).read_bytes() if (path / STATE_NAME).exists() else None
        assert (state is not None) == (mode.startswith("compact"))  # trained codecs only
        with Gallery.open(path) as reader:
            _check(reader, codecs, batches[0])
            for b in batches[1:]:
                g.append(**b)
            reader.refresh()
            _check(reader, codecs, concat_batches(batches))
        files = {p.name for p in (path / "segments").rglob("*.npy")}
        float16 = mode == "float16"  # rows, their scan copy and maps
        assert ("attr.npy" in files) == ("attr_by_attribute.npy" in files) == ("aam.npy" in files) == float16
        assert not any(f.startswith("aam") for f in files) or mode != "compact-nomaps"
        g.compact()  # copies the codes: reads are bit-identical, codecs.npz untouched
        _check(g, codecs, concat_batches(batches))
    assert ((path / STATE_NAME).read_bytes() if state is not None else None) == state
    doc = json.loads((path / MANIFEST_NAME).read_text())
    assert doc["version"] == 4 and doc["storage"]["mode"] == mode
    with Gallery.open(path, verify=True) as g:
        assert g.segments == 1
        _check(g, codecs, concat_batches(batches))
        with pytest.raises(InputError, match="attr_embeddings"):
            bad = batch_of(rng, 2, dim=DIM, aam=AAM)
            bad["attr_embeddings"][0, 0, 0] = 1e30  # beyond what any codec's float16 scale codes
            g.append(**bad)


def test_the_default_mode_stores_at_least_three_times_fewer_bytes_per_entry(tmp_path, rng):
    """The acceptance figure, on the demo model's shapes (M = 26, C = 256, maps 8x4): all of a segment's arrays."""
    n, names = 300, [f"a{i}" for i in range(26)]
    data = {"embedding": rng.standard_normal((n, 256)).astype(np.float32),
            "attr_embeddings": rng.standard_normal((n, 26, 256)).astype(np.float32),
            "probs": rng.random((n, 26)).astype(np.float32), "aam": rng.random((n, 26, 8, 4)).astype(np.float32),
            "meta": [{}] * n}
    sizes = {}
    for mode in ("float16", "compact"):
        codecs = fit_storage(mode, data["attr_embeddings"], data["aam"])
        with Gallery.create(tmp_path / mode, dim=256, attributes=names, aam_shape=(8, 4), model="m",
                            storage=codecs) as g:
            g.append(**data)
        files = list((tmp_path / mode / "segments").rglob("*.npy"))
        sizes[mode] = (sum(p.stat().st_size for p in files) - 128 * len(files)) / n  # less the .npy headers
    assert sizes["float16"] / sizes["compact"] >= 3, sizes


def test_trained_modes_need_fitting_and_enough_rows(tmp_path, rng):
    with pytest.raises(InputError, match="fit it first"):
        Gallery.create(tmp_path / "g", dim=DIM, attributes=ATTRS, aam_shape=AAM, model="m", storage="compact")
    few = batch_of(rng, FIT_MIN_ENTRIES - 1, dim=DIM, aam=AAM)
    with pytest.raises(InputError, match=f"at least {FIT_MIN_ENTRIES}"):
        fit_storage("compact", few["attr_embeddings"], few["aam"])
    with pytest.raises(InputError, match="unknown storage mode"):
        storage_codecs("zip", DIM, len(ATTRS), AAM)
    with pytest.raises(InputError, match="shape"):
        Gallery.create(tmp_path / "h", dim=DIM + 1, attributes=ATTRS, aam_shape=AAM, model="m",
                       storage=_codecs("int8", rng))


def test_a_format_2_gallery_opens_as_float16_and_a_writer_upgrades_it(tmp_path, rng):
    path = tmp_path / "g"
    data = batch_of(rng, 12, dim=DIM, aam=AAM)
    with Gallery.create(path, dim=DIM, attributes=ATTRS, aam_shape=AAM, model="m") as g:
        g.append(**data)
    doc = json.loads((path / MANIFEST_NAME).read_text())
    del doc["storage"]
    doc["version"] = 2
    (path / MANIFEST_NAME).write_text(json.dumps(doc))
    codecs = storage_codecs("float16", DIM, len(ATTRS), AAM)
    with Gallery.open(path) as g:
        _check(g, codecs, data)
    with Gallery.open(path, writable=True) as g:
        assert json.loads((path / MANIFEST_NAME).read_text())["version"] == 4
        more = batch_of(rng, 3, dim=DIM, aam=AAM)
        g.append(**more)
    with Gallery.open(path, verify=True) as g:
        _check(g, codecs, concat_batches([data, more]))


@pytest.fixture
def compact_gallery(tmp_path, rng):
    path = tmp_path / "compact"
    with Gallery.create(path, dim=DIM, attributes=ATTRS, aam_shape=AAM, model="m",
                        storage=_codecs("compact", rng)) as g:
        g.append(**batch_of(rng, 5, dim=DIM, aam=AAM))
    return path


@pytest.mark.parametrize("change", ["delete", "flip a bit", "append a byte", "a link"])
def test_a_missing_or_tampered_codecs_file_is_named(change, compact_gallery, tmp_path):
    state = compact_gallery / STATE_NAME
    raw = state.read_bytes()
    state.unlink()
    if change == "flip a bit":
        state.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif change == "append a byte":
        state.write_bytes(raw + b"x")
    elif change == "a link":  # the same bytes behind a symbolic link: never read through one
        (tmp_path / "elsewhere.npz").write_bytes(raw)
        state.symlink_to(tmp_path / "elsewhere.npz")
    match = {"delete": "missing", "a link": "unreadable"}.get(change, "sha256")
    with pytest.raises(CorruptGalleryError, match=f"{STATE_NAME}: .*{match}"):
        Gallery.open(compact_gallery)


def _storage_edits():
    def edit(fn):
        return fn

    return {
        "not a mapping": edit(lambda s: "compact"),
        "an unknown field": edit(lambda s: {**s, "extra": 1}),
        "a bad mode": edit(lambda s: {**s, "mode": "../x"}),
        "a codec of another shape": edit(lambda s: {**s, "attr": {**s["attr"], "shape": [1, 1]}}),
        "an unknown codec kind": edit(lambda s: {**s, "attr": {**s["attr"], "kind": "zip"}}),
        "a bad codec parameter": edit(lambda s: {**s, "attr": {**s["attr"], "params": {"bytes_per_row": -1}}}),
        "arrays of another layout": edit(lambda s: {**s, "arrays": {**s["arrays"], "attr.codes": ["|u1", [4, 1]]}}),
        "an array of no codec": edit(lambda s: {**s, "arrays": {**s["arrays"], "attr2": ["<f2", [4, 1]]}}),
        "a bad dtype": edit(lambda s: {**s, "arrays": {**s["arrays"], "attr.codes": ["object", [4, 1]]}}),
        "no codecs file for a trained codec": edit(lambda s: {**s, "codecs": None}),
        "a malformed codecs entry": edit(lambda s: {**s, "codecs": {"sha256": "x", "size": 1}}),
    }


@pytest.mark.parametrize("what", list(_storage_edits()))
def test_a_malformed_storage_field_is_named(what, compact_gallery):
    manifest = compact_gallery / MANIFEST_NAME
    doc = json.loads(manifest.read_text())
    doc["storage"] = _storage_edits()[what](doc["storage"])
    manifest.write_text(json.dumps(doc))
    with pytest.raises(CorruptGalleryError, match=MANIFEST_NAME):
        Gallery.open(compact_gallery)


# ---------------------------------------------------------------------- attrimeter index --storage, dropped maps


def _index(tiny_export, images, out, *extra):
    return main(["index", "--export", str(tiny_export), "-q", "--threads", "1", "--images", str(images),
                 "--out", str(out), *extra])


def test_cli_index_storage_modes_and_dropped_maps_recomputed(tiny_export, tiny_data, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny_data / "bounding_box_test", images)  # a copy: one crop is changed below
    files = sorted(images.glob("*.jpg"))
    assert len(files) >= FIT_MIN_ENTRIES  # the default mode fits its codecs on these
    for mode, extra in (("compact", ()), ("compact-nomaps", ("--storage", "compact-nomaps"))):
        assert _index(tiny_export, images, tmp_path / mode, *extra) == 0
        with Gallery.open(tmp_path / mode) as g:
            assert g.storage.mode == mode and len(g) == len(files) and (tmp_path / mode / STATE_NAME).is_file()
            assert all(len(m["sha256"]) == 64 for m in g.meta(np.arange(len(g))))
    with pytest.raises(SystemExit) as e:  # an existing gallery keeps its storage
        _index(tiny_export, images, tmp_path / "compact", "--storage", "int8")
    assert e.value.code == 2 and "stores 'compact'" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    for f in files[:5]:
        shutil.copy(f, few)
    assert _index(tiny_export, few, tmp_path / "small") == 0  # too few to fit: the documented fallback
    assert "storing 'int8'" in capsys.readouterr().err
    with Gallery.open(tmp_path / "small") as g:
        assert g.storage.mode == "int8" and len(g) == 5

    query = files[3].read_bytes()  # in memory: the top hit is this file, which is changed and deleted below
    with Runtime(tiny_export, tmp_path / "compact", RuntimeConfig(threads=1)) as kept, \
            Runtime(tiny_export, tmp_path / "compact-nomaps", RuntimeConfig(threads=1)) as dropped:
        want = kept.search(query, k=3, overlays=2)[0].matches
        got = dropped.search(query, k=3, overlays=2)[0].matches
        assert [m.id for m in got] == [m.id for m in want]
        for a, b in zip(got, want, strict=True):  # maps recomputed from the crop; stored ones are uint8-coded
            assert a.gallery_aam is not None and a.gallery_aam.shape == b.gallery_aam.shape
            np.testing.assert_allclose(a.gallery_aam, b.gallery_aam, atol=2e-3 * float(b.gallery_aam.max()) + 1e-6)
        assert dropped.search(query, k=3)[0].matches[0].gallery_aam is None  # no overlays: nothing recomputed
        hit = Path(got[0].path)
        hit.write_bytes(hit.read_bytes() + b"\0")  # the crop changed since it was indexed
        with pytest.raises(GalleryError, match="changed since it was indexed"):
            dropped.search(query, k=3, overlays=1)
        hit.unlink()
        with pytest.raises(GalleryError, match="unreadable"):
            dropped.search(query, k=3, overlays=1)
        assert [m.id for m in dropped.search(query, k=3)[0].matches] == [m.id for m in want]  # shares need no maps
    added = tmp_path / "added.jpg"  # images added at run time keep the hash of the bytes embedded
    shutil.copy(files[5], added)
    raw = added.read_bytes()
    with Runtime(tiny_export, tmp_path / "compact-nomaps", RuntimeConfig(threads=1, writable=True)) as rt:
        pixels = load_image(raw, rt.image_size, "pixels")
        ids = rt.add([added, raw], paths=[str(added)] * 2, extra=[{}, {"sha256": "0" * 64}])
        later = rt.add(pixels, paths=[str(added)], extra=[{"sha256": "0" * 64}])  # pixels: no bytes to vouch for
        digest = hashlib.sha256(raw).hexdigest()
        assert [m.get("sha256") for m in rt.gallery.meta([*ids, *later])] == [digest, digest, None]
        hits = rt.search(raw, k=3, overlays=2)[0].matches  # files[5] itself, then the two added (equal, lower ids)
        assert [h.id for h in hits] == [5, *ids] and all(h.gallery_aam is not None for h in hits)
        added.write_bytes(raw + b"\0")
        with pytest.raises(GalleryError, match="changed since it was indexed"):
            rt.search(raw, k=3, overlays=1)


@pytest.mark.parametrize("mode", MODES)
def test_weighted_search_equals_a_scan_of_the_decoded_rows(mode, tmp_path, rng):
    codecs = _codecs(mode, rng)
    batches = [batch_of(rng, n, dim=DIM, aam=AAM) for n in (300, 57)]
    batches[1]["attr_embeddings"][:5] = batches[0]["attr_embeddings"][:5]  # duplicates: ties to the lower id
    with Gallery.create(tmp_path / "g", dim=DIM, attributes=ATTRS, aam_shape=AAM, model="m", storage=codecs,
                        auto_compact=None) as g:
        for batch in batches:
            g.append(**batch)
        attr = g.attr_embeddings(np.arange(len(g)))
        q = rng.standard_normal((3, len(ATTRS), DIM)).astype(np.float32)
        q[0] = attr[3] + np.float32(1e-3) * rng.standard_normal((len(ATTRS), DIM)).astype(np.float32)
        q[1] = attr[301]  # exactly an entry that has a duplicate
        for weights in (np.r_[1.0, 0.0, 2.0, np.zeros(len(ATTRS) - 3)], np.ones(len(ATTRS))):
            w = check_weights(weights, len(ATTRS))
            _assert_weighted_search(g, q, w, attr, 7)


def _assert_weighted_search(g, q, w, attr, k):
    """``g.weighted_search`` equals a float64 scan of the decoded rows ``attr``, ties to the lower id."""
    scores, ids = g.weighted_search(q, w, k)
    act = np.flatnonzero(w)
    diff = q[:, None, act].astype(np.float64) - attr[None, :, act]  # float64: duplicates tie exactly
    want = np.sqrt((diff ** 2).sum(-1)) @ w[act].astype(np.float64)
    order = np.lexsort((np.broadcast_to(np.arange(len(attr)), want.shape), want), axis=1)[:, :k]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(want, order, 1), rtol=1e-6)


def test_format_3_segments_are_read_and_scanned_and_a_compaction_adds_the_scan_copy(tmp_path, rng, monkeypatch):
    """Float16 segments without the copy attribute by attribute (format 3) beside ones with it (format 4): reads and
    weighted scans agree across both, and a compaction writes the copy."""
    path, m = tmp_path / "g", len(ATTRS)
    batches = [batch_of(rng, n, dim=256, aam=None) for n in (600, 40, 700)]  # 600 rows: > 1 MiB, read from disk
    attr = np.concatenate([b["attr_embeddings"] for b in batches]).astype(np.float16).astype(np.float32)

    def files():
        return sorted(p.name for p in (path / "segments").rglob("attr*.npy"))

    with monkeypatch.context() as patch:  # a format 3 writer
        patch.setattr(GallerySpec, "by_attribute", property(lambda self: frozenset()))
        with Gallery.create(path, dim=256, attributes=ATTRS, aam_shape=None, model="m", auto_compact=None) as g:
            for batch in batches[:2]:
                g.append(**{k: v for k, v in batch.items() if k != "aam"})
    assert files() == ["attr.npy"] * 2
    q = rng.standard_normal((2, m, 256)).astype(np.float32)
    q[0] = attr[620]
    weights = [check_weights(np.r_[1.0, 0.0, 2.0, np.zeros(m - 3)], m), check_weights(np.ones(m), m)]
    with Gallery.open(path, writable=True, auto_compact=None) as g:
        g.append(**{k: v for k, v in batches[2].items() if k != "aam"})
        assert files() == ["attr.npy"] * 3 + ["attr_by_attribute.npy"]
        for compacted in (False, True):
            if compacted:
                g.compact()
            ids = rng.permutation(len(attr))
            np.testing.assert_array_equal(g.attr_embeddings(ids), attr[ids])
            np.testing.assert_array_equal(np.concatenate([c for _, c in g.attr_chunks(512)]), attr.astype(np.float16))
            for w in weights:
                _assert_weighted_search(g, q, w, attr, 5)
        assert files() == ["attr.npy", "attr_by_attribute.npy"] and g.segments == 1
    with Gallery.open(path, verify=True) as g:
        np.testing.assert_array_equal(g.attr_embeddings([0, 1339, 700]), attr[[0, 1339, 700]])
        _assert_weighted_search(g, q, weights[0], attr, 5)
    lone = tmp_path / "lone"  # one format 3 segment: nothing to merge, but compacting it writes the copy
    with monkeypatch.context() as patch:
        patch.setattr(GallerySpec, "by_attribute", property(lambda self: frozenset()))
        with Gallery.create(lone, dim=256, attributes=ATTRS, aam_shape=None, model="m") as g:
            g.append(**{k: v for k, v in batches[1].items() if k != "aam"})
    with Gallery.open(lone, writable=True) as g:
        before = g._state.segments[0].name
        g.compact()
        after = g._state.segments[0].name
        assert g.segments == 1 and after != before
        g.compact()  # up to date: not rewritten again
        assert g._state.segments[0].name == after
        _assert_weighted_search(g, q, weights[1], attr[600:640], 5)
    assert sorted(p.name for p in (lone / "segments").rglob("attr*.npy")) == ["attr.npy", "attr_by_attribute.npy"]


def test_rows_in_the_wrong_order_for_their_file_name_are_refused(tmp_path, rng):
    path = tmp_path / "g"
    with Gallery.create(path, dim=DIM, attributes=ATTRS, aam_shape=None, model="m") as g:
        g.append(**{k: v for k, v in batch_of(rng, 30, dim=DIM, aam=None).items() if k != "aam"})
    file = next((path / "segments").rglob("attr_by_attribute.npy"))
    np.save(file, np.load(file).transpose(1, 0, 2))  # same bytes per row, entry by entry: not what the name says
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    m = len(ATTRS)
    with pytest.raises(CorruptGalleryError, match=rf"attr_by_attribute.npy: holds float16 \[30, {m}, {DIM}\], "
                                                  rf"expected float16 \[{m}, 30, {DIM}\]"):
        Gallery.open(path, verify=False)
    assert json.loads((path / MANIFEST_NAME).read_text()) == manifest
