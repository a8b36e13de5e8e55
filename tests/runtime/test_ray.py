"""On a local Ray cluster started here (2 CPUs): shard actors answer like one store; a dead shard actor gives an error
or a partial answer naming it, and a killed one comes back; ``index --ray`` stores what ``index`` stores, resumes an
interrupted run and survives a killed writer, with no duplicate and no loss; ``serve --ray`` serves the result."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from http_helpers import b64, start_serve
from sharded_helpers import assert_same_results, build, identity_of, queries, random_rows, rest_store

from attrimeter.runtime.distributed.indexing import index_sharded, writer_actor_name
from attrimeter.runtime.distributed.manifest import read_manifest, shard_of
from attrimeter.runtime.distributed.sharded import ShardedGallery
from attrimeter.runtime.errors import GalleryError, ShardUnavailableError
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.runtime import Runtime, RuntimeConfig

ray = pytest.importorskip("ray")

ACTORS = {"num_cpus": 0.25}  # four shard actors on a 2-CPU cluster
ONE_THREAD = RuntimeConfig(threads=1)
CLI = Path(sys.executable).with_name("attrimeter")


@pytest.fixture(scope="module")
def cluster():
    """A fresh local cluster ("local": never one another session started); its address, for child processes."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def stores(tiny_export, cluster, tmp_path_factory):
    identity = identity_of(tiny_export)
    sharded, single, parts = build(tmp_path_factory.mktemp("ray-sharded"), identity, np.random.default_rng())
    return sharded, single, parts, identity


# ------------------------------------------------------------------------------------------------- search ---------


def test_shard_actors_answer_like_one_store(stores, tiny_export, tiny_data, rng):
    sharded, single, parts, identity = stores
    emb = queries(rng, parts, identity)
    with (Runtime(tiny_export, ShardedGallery.open(sharded, mode="ray", actor_options=ACTORS), ONE_THREAD) as rt,
          Runtime(tiny_export, single, ONE_THREAD) as one):
        assert len(rt.gallery.actors) == 4
        assert rt.stats()["gallery_index"] == "flat"  # asked of every shard actor
        weights = {name: float(rng.uniform(0, 3)) for name in rt.attributes[::2]}
        for k in (1, 7, 500):
            for w in (None, weights):
                got, want = rt.search_embeddings(emb, k=k, weights=w), one.search_embeddings(emb, k=k, weights=w)
                assert_same_results(got, want)
        query = sorted((tiny_data / "query").glob("*.jpg"))[0]
        assert_same_results([rt.explain(query, [117, 3, 50])], [one.explain(query, [117, 3, 50])])
        got, want = rt.search(query, k=4, overlays=2)[0].matches, one.search(query, k=4, overlays=2)[0].matches
        for a, b in zip(got, want, strict=True):  # the maps came back with the rows
            assert a.gallery_aam is not None and np.array_equal(a.gallery_aam, b.gallery_aam)


def test_a_shard_that_cannot_open_is_named(stores, tmp_path, rng):
    sharded, _, _, identity = stores
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    with Gallery.open(copy / "shard-002", writable=True) as g:  # more entries than shards.json records
        rows = random_rows(rng, 1, identity)
        g.append(rows["embedding"], rows["attr"], rows["probs"], [{}], aam=rows["aam"])
    with pytest.raises(GalleryError, match="shard shard-002 did not open: .*holds 53 entries, .* records 52"):
        ShardedGallery.open(copy, mode="ray", actor_options=ACTORS)


def test_a_dead_shard_actor_is_named_or_left_out(stores, tiny_export, tmp_path, rng):
    sharded, _, parts, identity = stores
    emb = queries(rng, parts, identity)
    rest, global_ids = rest_store(tmp_path / "rest", parts, identity, skip=2)
    want = global_ids[rest.search(emb.embedding, 5)[1]]
    sg = ShardedGallery.open(sharded, mode="ray", actor_options=ACTORS)
    with Runtime(tiny_export, sg, ONE_THREAD) as rt:
        ray.kill(sg.actors[2], no_restart=True)
        with pytest.raises(ShardUnavailableError, match="shard-002: ActorDiedError") as e:
            rt.search_embeddings(emb, k=5)
        assert e.value.missing == ("shard-002",)
        hits = sg.search_rows(emb.embedding, 5, partial=True)
        assert hits.missing == ("shard-002",) and np.array_equal(hits.ids, want)
        sg.partial = True
        for r, row in zip(rt.search_embeddings(emb, k=5), want, strict=True):
            assert r.missing_shards == ("shard-002",) and [m.id for m in r.matches] == row.tolist()
        with pytest.raises(ShardUnavailableError):  # rows by id from that shard: never partial
            sg.meta([60])
        assert sg.meta([0])[0]["id"] == 0
    rest.close()


def test_a_shard_actor_killed_during_queries_comes_back(stores, rng):
    sharded, single, parts, identity = stores
    emb = queries(rng, parts, identity)
    with Gallery.open(single) as one:
        want = one.search(emb.embedding, 5)[1]
    outcomes, stop = [], threading.Event()
    with ShardedGallery.open(sharded, mode="ray", actor_options=ACTORS, timeout_s=10) as sg:

        def ask():
            while not stop.is_set():
                try:
                    outcomes.append(sg.search_rows(emb.embedding, 5).ids)
                except ShardUnavailableError as e:
                    outcomes.append(e.missing)
                except Exception as e:  # anything else fails the test below
                    outcomes.append(repr(e))

        asker = threading.Thread(target=ask)
        asker.start()
        try:
            _wait(lambda: len(outcomes) >= 3, "the first answers")
            before = len(outcomes)
            ray.kill(sg.actors[0], no_restart=False)  # a crash: Ray restarts it, it reopens its shard
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until a complete answer comes after the kill
                time.sleep(0.05)
                if any(isinstance(o, np.ndarray) for o in outcomes[before + 1:]):
                    break
        finally:
            stop.set()
            asker.join(timeout=60)
    assert len(outcomes) > before + 1
    for outcome in outcomes:  # every answer complete and right, or an error naming the shard: never incomplete
        assert (isinstance(outcome, np.ndarray) and np.array_equal(outcome, want)) or outcome == ("shard-000",)
    assert isinstance(outcomes[-1], np.ndarray)


# ------------------------------------------------------------------------------------------------- indexing -------


def _rows_by_key(folder):
    """A gallery store's entries by key: (embedding, probs, metadata without the id)."""
    with Gallery.open(folder, verify=False) as g:
        ids = np.arange(len(g))
        return {m["key"]: (g.embeddings(i)[0], g.probs(i)[0], {k: v for k, v in m.items() if k != "id"})
                for i, m in zip(ids, g.meta(ids) if len(g) else [], strict=True)}


def _keys(out):
    """Every shard's keys, read from the shard stores themselves (whatever shards.json says)."""
    return {folder.name: list(_rows_by_key(folder)) for folder in sorted(Path(out).glob("shard-*"))}


def _assert_each_once(out, expected_keys, shards):
    keys = _keys(out)
    found = Counter(k for ks in keys.values() for k in ks)
    assert set(found) == set(expected_keys) and set(found.values()) == {1}  # no loss, no duplicate
    for name, ks in keys.items():
        assert all(shard_of(k, shards) == int(name.split("-")[1]) for k in ks)  # each in its own shard
    manifest, _ = read_manifest(Path(out))
    assert [s.count for s in manifest.shards] == [len(keys[s.name]) for s in manifest.shards]


def test_index_ray_stores_what_index_stores_and_serve_ray_serves_it(cluster, tiny_export, tiny_data, tmp_path):
    images = tiny_data / "bounding_box_test"
    n = len(list(images.glob("*.jpg")))
    out = tmp_path / "sharded"
    report = index_sharded(tiny_export, images, out, shards=3, batch_size=16, segment=20, progress=False)
    assert (report.added, report.already, report.skipped, report.passes, sum(report.counts)) == (n, 0, [], 1, n)
    with Runtime(tiny_export, tmp_path / "one", RuntimeConfig(create_gallery=True, threads=1)) as rt:
        rt.index_folder(images, progress=False)
    sharded_rows = {k: v for folder in sorted(out.glob("shard-*")) for k, v in _rows_by_key(folder).items()}
    one_rows = _rows_by_key(tmp_path / "one")
    assert sharded_rows.keys() == one_rows.keys()
    for key, (emb, probs, meta) in sharded_rows.items():
        emb1, probs1, meta1 = one_rows[key]
        np.testing.assert_allclose(emb, emb1, rtol=1e-4, atol=1e-4)  # ONNX Runtime, other batch compositions
        np.testing.assert_allclose(probs, probs1, rtol=1e-4, atol=1e-4)
        assert meta == meta1  # key, path, identity and camera from the file name
    _assert_each_once(out, sharded_rows.keys(), 3)
    # the default storage (n >= 64 images): fitted once on the driver, the same state in every shard
    states = [dict(np.load(folder / "codecs.npz")) for folder in sorted(out.glob("shard-*"))]
    assert len(states) == 3 and all(s.keys() == states[0].keys() for s in states)
    assert all(np.array_equal(s[k], states[0][k]) for s in states for k in s)
    again = index_sharded(tiny_export, images, out, shards=3, progress=False)  # nothing left to embed
    assert (again.added, again.already, again.passes) == (0, n, 0)
    with pytest.raises(GalleryError, match="into 3 shards"):
        index_sharded(tiny_export, images, out, shards=4, progress=False)

    server, url, _ = start_serve(["--ray", cluster, "--export", str(tiny_export), "--gallery", str(out), "--port", "0",
                                  "--threads", "1", "--shard-cpus", "0.25"])
    try:
        body = json.dumps({"images": [b64(sorted(images.glob("*.jpg"))[5].read_bytes())], "k": 3}).encode()
        request = urllib.request.Request(f"{url}/search", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            result = json.loads(answer.read())["results"][0]
        assert len(result["matches"]) == 3 and "missing_shards" not in result
        assert result["matches"][0]["key"] == sorted(images.glob("*.jpg"))[5].name  # the query itself
        assert result["matches"][0]["d"] < 1e-3
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)


class Gate:
    """An image list whose last image is a FIFO: reading it blocks (holding the run open) until :meth:`open`."""

    def __init__(self, folder: Path, images: list[Path]):
        self.list = folder / "images.txt"
        self.fifo = folder / "zz-gate.jpg"
        self.image = images[0].read_bytes()
        os.mkfifo(self.fifo)
        self.list.write_text("".join(f"{p}\n" for p in images) + f"{self.fifo}\n")
        self.keys = [str(p) for p in images] + [str(self.fifo)]

    def open(self, wait=120.0):
        """Hand the reader (waiting up to ``wait`` s for one) a real image; leave a regular file for later passes."""
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                if time.monotonic() > deadline:  # ENXIO: nobody reads it
                    break
                time.sleep(0.05)
                continue
            with os.fdopen(fd, "wb") as fh:
                os.set_blocking(fd, True)
                fh.write(self.image)
            break
        tmp = self.fifo.with_suffix(".tmp")
        tmp.write_bytes(self.image)
        os.replace(tmp, self.fifo)


def _wait(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_killed_writer_loses_nothing(cluster, tiny_export, tiny_data, tmp_path):
    images = sorted((tiny_data / "bounding_box_test").glob("*.jpg"))[:40]
    gate = Gate(tmp_path, images)
    out = tmp_path / "sharded"
    result = {}

    def run():
        try:  # one segment at the end: until then every row waits in its writer's buffer
            result["report"] = index_sharded(tiny_export, gate.list, out, shards=2, batch_size=4, segment=10**6,
                                             progress=False)
        except BaseException as e:
            result["error"] = e

    runner = threading.Thread(target=run)
    runner.start()
    try:
        writers = []

        def buffering():
            if not writers:
                try:
                    writers.extend(ray.get_actor(writer_actor_name(out, f"shard-00{i}")) for i in range(2))
                except ValueError:  # not started yet
                    return False
            return sum(ray.get([w.buffered.remote() for w in writers])) >= 8

        _wait(buffering, "rows in the writers' buffers")
        victim = max(writers, key=lambda w: ray.get(w.buffered.remote()))
        ray.kill(victim, no_restart=False)  # its buffered rows die with it; Ray restarts it
    finally:
        gate.open()
        runner.join(timeout=300)
    assert not runner.is_alive()
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert report.passes == 2 and report.added == len(gate.keys) and report.already == 0  # the lost rows again
    _assert_each_once(out, gate.keys, 2)


def test_an_interrupted_run_resumes_without_duplicates_or_losses(cluster, tiny_export, tiny_data, tmp_path):
    images = sorted((tiny_data / "bounding_box_test").glob("*.jpg"))[:40]
    gate = Gate(tmp_path, images)
    out = tmp_path / "sharded"
    args = ["--export", str(tiny_export), "--images", str(gate.list), "--out", str(out), "--shards", "2",
            "--segment", "1", "--batch-size", "4", "--threads", "1", "-q"]
    run = subprocess.Popen([str(CLI), "index", "--ray", cluster, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: run.poll() is not None or sum(len(k) for k in _keys(out).values()) >= 8, "the first segments")
        assert run.poll() is None, run.stderr.read()  # the gate holds it open
        run.kill()  # the driver dies: its actors and tasks go with it
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
        gate.open(wait=1.0)  # a reader the dead run left, if any, gets an image
    _wait(lambda: all(_lock_free(f) for f in out.glob("shard-*")), "the dead run's writers to release the stores")
    before = Counter(k for ks in _keys(out).values() for k in ks)
    assert 8 <= len(before) < len(gate.keys) and set(before.values()) == {1}
    with pytest.raises(GalleryError, match="in progress or was interrupted"):  # counts beyond shards.json
        ShardedGallery.open(out)
    code = subprocess.run([str(CLI), "index", "--ray", cluster, *args], capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr
    assert f"added {len(gate.keys) - len(before)} images, {len(before)} were already there" in code.stdout
    _assert_each_once(out, gate.keys, 2)
    with ShardedGallery.open(out) as sg:
        assert len(sg) == len(gate.keys)
    shutil.rmtree(out)


def _lock_free(folder):
    try:
        Gallery.open(folder, writable=True, verify=False).close()
        return True
    except GalleryError:
        return False
