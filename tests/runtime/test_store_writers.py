"""Gallery store writers: one writer at a time (the lock), compaction (on the writer's handle, while readers search,
automatic merging), what a writer deletes, symbolic links, the cost of an append."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from gallery_helpers import (
    ATTRS,
    CHILD_LOOP,
    V1_FIXTURE,
    assert_holds,
    batch_of,
    check_generated,
    concat_batches,
    gen_gallery,
    listed,
    on_disk,
    run_child,
)

from attrimeter.runtime.errors import GalleryError, InputError, LockedGalleryError, UnsafeGalleryPathError
from attrimeter.runtime.gallery import MANIFEST_NAME, Gallery
from attrimeter.runtime.store_format import JOURNAL_NAME

pytest.importorskip("faiss")


# ---------------------------------------------------------------------- the writer lock (a second writer never gets in)


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


def test_removing_the_lock_file_lets_no_second_writer_in(tmp_path):
    path = tmp_path / "g"
    gen_gallery(path).close()
    proc = subprocess.Popen([sys.executable, "-c", CHILD_LOOP, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        (path / ".lock").unlink()  # what an outside attack did: the old lock was only this file's flock
        with pytest.raises(LockedGalleryError, match="locked by another writer"):
            Gallery.open(path, writable=True)
        other = run_child("import sys\nfrom attrimeter.runtime.gallery import Gallery\n"
                           "Gallery.open(sys.argv[1], writable=True)", path)
        assert other.returncode != 0 and "LockedGalleryError" in other.stderr
        time.sleep(0.3)  # the writer keeps appending meanwhile
    finally:
        proc.kill()
        proc.wait()
    with Gallery.open(path, writable=True, progress=False) as w:  # nothing of the first writer's was deleted
        assert on_disk(path) == listed(path) and len(w) > 1
        check_generated(w)


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
            w.append(**batch_of(rng, 2))
            w.compact(progress=False)
            assert w.segments == 1
    assert on_disk(path) == listed(path) | strays
    assert all((path / "segments" / name / "embedding.npy").read_bytes() == b"not ours" for name in strays)
    assert any("left in place" in r.getMessage() and "0badc0de" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- compaction


def test_compact_keeps_ids_and_readers_working(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=(8, 4), model="m", metric="ip")
    batches = [batch_of(rng, int(n)) for n in (5, 300, 1, 9)]
    batches[1]["meta"] = [dict(m, path="p" * 4000) for m in batches[1]["meta"]]  # a large, lazily read meta file
    for b in batches:
        g.append(**b)
    data = concat_batches(batches)
    q = rng.standard_normal((4, 24)).astype(np.float32)
    expected = g.search(q, 6)
    reader = Gallery.open(g.path)
    old = on_disk(g.path)
    g.compact(progress=False)
    assert g.segments == 1 and on_disk(g.path) == listed(g.path) and not (on_disk(g.path) & old)
    assert_holds(g, data)
    np.testing.assert_array_equal(g.search(q, 6)[1], expected[1])
    # the reader still has the old segments open: arrays are memory-mapped or in memory, meta refreshes itself
    assert reader.segments == 4
    ids = rng.permutation(len(data["meta"]))[:50]
    np.testing.assert_array_equal(reader.embeddings(ids), data["embedding"][ids])
    assert reader.meta(ids) == [{"id": int(i), **data["meta"][i]} for i in ids]
    assert reader.refresh() == len(data["meta"]) and reader.segments == 1
    assert_holds(reader, data)
    reader.close()
    b = batch_of(rng, 3)
    g.append(**b)
    g.compact(progress=False)
    g.close()
    with Gallery.open(g.path, verify=True) as r:
        assert r.segments == 1
        assert_holds(r, concat_batches([data, b]))


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
        assert_holds(r, data)
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
        g.append(**batch_of(rng, 1))
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
    batches = [batch_of(rng, 600, dim=256)] + [batch_of(rng, int(n), dim=256) for n in rng.integers(1, 5, size=8)]
    for b in batches:  # one large segment (files kept open, read by position) and small ones (in memory)
        writer.append(**b)
    data = concat_batches(batches)
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
    old = on_disk(path)
    writer.compact(progress=False)
    extra = batch_of(rng, 3, dim=256)
    writer.append(**extra)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert writer.segments == 2 and not (old & on_disk(path))  # the old folders are gone from disk
    assert reader.segments == len(batches)  # ... yet the reader still answers from what it opened
    assert_holds(reader, data)
    assert reader.refresh() == n + 3 and reader.segments == 2
    assert_holds(reader, concat_batches([data, extra]))
    reader.close()
    writer.close()


def test_a_writer_merges_its_small_segments_as_it_appends(tmp_path, rng):
    g = Gallery.create(tmp_path / "g", dim=24, attributes=ATTRS, aam_shape=(8, 4), model="m", auto_compact=4)
    reader = Gallery.open(g.path)
    batches = []
    for _ in range(40):
        batches.append(batch_of(rng, 1))
        g.append(**batches[-1])
        assert g.segments < 4  # one-entry appends are merged by fours, then the merged ones by fours
    data = concat_batches(batches)
    assert_holds(g, data)
    assert on_disk(g.path) == listed(g.path)
    assert reader.refresh() == 40
    assert_holds(reader, data)
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
