"""Gallery store durability: crash safety under SIGKILL and at each publishing step, interrupted and failed writes,
corruption, malformed manifest and journal."""

import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from gallery_helpers import (
    ATTRS,
    CHILD_CRASH,
    CHILD_LOOP,
    GEN,
    assert_holds,
    batch_of,
    check_generated,
    concat_batches,
    gen_gallery,
    listed,
    on_disk,
    run_child,
)

from attrimeter.runtime.errors import CorruptGalleryError, GalleryError, StorageError
from attrimeter.runtime.gallery import MANIFEST_NAME, Gallery
from attrimeter.runtime.store_format import JOURNAL_NAME

pytest.importorskip("faiss")


# ---------------------------------------------------------------------- crash safety


def test_sigkill_during_appends_loses_nothing_published(tmp_path, rng):
    path = tmp_path / "g"
    gen_gallery(path).close()
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
            check_generated(g)
        with Gallery.open(path, writable=True, progress=False) as w:  # the dead writer's lock is gone
            assert on_disk(path) == listed(path)  # and what it left half-written is removed
            (e, a, p, m), meta = GEN["batch"](len(w))
            w.append(e, a, p, meta, aam=m)
            counts.append(len(w))
    with Gallery.open(path, verify=True, progress=False) as g:
        check_generated(g)
        assert len(g) == counts[-1] and len(g) > 5
        d, ids = g.search(g.embeddings([len(g) - 1]), 1)
        assert ids[0, 0] == len(g) - 1


@pytest.mark.parametrize("point", ["rename-before", "rename-after", "pwrite-before", "pwrite-torn", "pwrite-after"])
def test_crash_at_each_publishing_step(tmp_path, point):
    path = tmp_path / "g"
    with gen_gallery(path) as g:
        (e, a, p, m), meta = GEN["batch"](0)
        g.append(e, a, p, meta, aam=m)
        before = len(g)
    manifest_before = (path / MANIFEST_NAME).read_bytes()
    result = run_child(CHILD_CRASH, path, point, "append")
    assert result.returncode == 3, result.stderr
    published = point == "pwrite-after"
    assert (path / MANIFEST_NAME).read_bytes() == manifest_before  # an append only appends to the journal
    leftovers = on_disk(path) - listed(path)
    if published:
        assert not leftovers
    else:  # a half-written or unpublished segment folder is on disk, yet invisible
        assert len(leftovers) == 1 and (next(iter(leftovers)).startswith(".") == (point == "rename-before"))
    with Gallery.open(path, verify=True, progress=False) as r:  # a torn journal record is ignored
        assert len(r) == before + (GEN["batch_size"](before) if published else 0)
        check_generated(r)
    with Gallery.open(path, writable=True, progress=False) as w:
        assert on_disk(path) == listed(path) and not (path / (MANIFEST_NAME + ".tmp")).exists()
        (e, a, p, m), meta = GEN["batch"](len(w))
        w.append(e, a, p, meta, aam=m)
        check_generated(w)
    with Gallery.open(path, verify=True, progress=False) as r:
        check_generated(r)


@pytest.mark.parametrize("point", ["rename-after", "replace-before", "replace-after", "replace2-after"])
def test_crash_during_compaction(tmp_path, point):
    path = tmp_path / "g"
    with gen_gallery(path) as g:
        for _ in range(4):
            (e, a, p, m), meta = GEN["batch"](len(g))
            g.append(e, a, p, meta, aam=m)
    before = listed(path)
    result = run_child(CHILD_CRASH, path, point, "compact")
    assert result.returncode == 3, result.stderr
    after = listed(path)
    published = point in ("replace-after", "replace2-after")  # gallery.json names the merged segment
    assert len(after) == (1 if published else 4) and (after == before) != published
    assert on_disk(path) > after  # the old or the merged folders are still there
    with Gallery.open(path, verify=True, progress=False) as r:  # old or merged segments, all entries either way
        check_generated(r)
    with Gallery.open(path, writable=True, progress=False) as w:
        assert on_disk(path) == listed(path)
        w.compact(progress=False)
        assert w.segments == 1
        check_generated(w)


def test_failed_publish_in_process_rolls_back(filled, rng, monkeypatch):
    g, data = filled
    manifest = g.path / MANIFEST_NAME
    before, folders = manifest.read_bytes(), on_disk(g.path)

    real_pwrite = os.pwrite

    def fail(fd, data, offset):
        if b'"op":"add"' in data:  # the disk fills up just as the add record is written: half of it lands
            real_pwrite(fd, data[:len(data) // 2], offset)
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fail)
    with pytest.raises(StorageError, match="nothing was published"):
        g.append(**batch_of(rng, 4))
    monkeypatch.undo()
    assert manifest.read_bytes() == before and on_disk(g.path) == folders
    assert not (g.path / (MANIFEST_NAME + ".tmp")).exists()
    assert_holds(g, data)
    b = batch_of(rng, 2)
    np.testing.assert_array_equal(g.append(**b), [len(data["meta"]), len(data["meta"]) + 1])
    with Gallery.open(g.path, verify=True) as r:
        assert_holds(r, concat_batches([data, b]))


# ---------------------------------------------------------------------- corruption


def _segment_file(path, name, index=0):
    doc = json.loads((Path(path) / MANIFEST_NAME).read_text())
    return Path(path) / "segments" / doc["segments"][index]["name"] / name


@pytest.mark.parametrize("name", ["embedding.npy", "attr.npy", "attr_by_attribute.npy", "probs.npy",
                                  "aam.npy", "meta.jsonl"])
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


@pytest.mark.parametrize("name", ["embedding.npy", "attr.npy", "attr_by_attribute.npy", "aam.npy",
                                  "meta.jsonl"])
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


# ---------------------------------------------------------------------- interrupted and failed writes


@pytest.mark.parametrize("op", ["append", "compact"])
def test_interrupt_right_after_publishing_keeps_the_published_segment(filled, rng, monkeypatch, op):
    """Ctrl-C landing just after the journal record or gallery.json was written must not delete what they list."""
    g, data = filled
    extra = batch_of(rng, 3)
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
        one = batch_of(rng, 1)
        np.testing.assert_array_equal(g.append(**one), [len(data["meta"]) + 3])
        extra = concat_batches([extra, one])
    path = g.path
    g.close()
    assert listed(path) <= on_disk(path)
    with Gallery.open(path, verify=True) as reopened:
        assert_holds(reopened, concat_batches([data, extra]) if op == "append" else data)


def test_a_failed_write_is_a_storage_error(filled, rng, monkeypatch):
    g, data = filled
    folders = on_disk(g.path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match="nothing was published"):
        g.append(**batch_of(rng, 2))
    with pytest.raises(StorageError, match="nothing was published"):
        g.compact(progress=False)
    monkeypatch.undo()
    assert_holds(g, data)
    assert on_disk(g.path) == folders


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
    batches = [batch_of(rng, 2) for _ in range(3)]
    for b in batches:
        g.append(**b)
    data = concat_batches(batches)
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
            assert_holds(r, data)
        with Gallery.open(snapshot, writable=True) as w:  # the writer folds it away
            assert_holds(w, data)
        assert (snapshot / JOURNAL_NAME).read_bytes().count(b"\n") == 1, label
