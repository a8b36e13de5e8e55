"""Sharded galleries opened in-process (no Ray): exact equality with one store, the read API by global id, named
failures and partial answers, refusals, the HTTP server and the CLI on a sharded gallery."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from http_helpers import b64, call
from sharded_helpers import assert_same_results, build, identity_of, queries, random_rows, rest_store

from attrimeter.cli import main
from attrimeter.runtime.distributed.indexing import ShardWriter, _prepare, list_images
from attrimeter.runtime.distributed.manifest import (
    SHARDS_NAME,
    manifest_for,
    read_manifest,
    shard_of,
    sharded_root,
    write_manifest,
)
from attrimeter.runtime.distributed.shard import ShardServer
from attrimeter.runtime.distributed.sharded import ShardedGallery
from attrimeter.runtime.errors import GalleryError, InputError, ShardUnavailableError, UnknownIdError
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.runtime import Runtime, RuntimeConfig
from attrimeter.runtime.server import RuntimeServer
from attrimeter.runtime.storage import STATE_NAME, encode_state, fit_storage

ONE_THREAD = RuntimeConfig(threads=1)


@pytest.fixture(scope="module", params=["l2", "ip"])
def stores(request, tiny_export, tmp_path_factory):
    """(sharded folder, single store folder, shard rows, identity) of random entries, for each metric."""
    identity = identity_of(tiny_export, request.param)
    rng = np.random.default_rng()
    sharded, single, parts = build(tmp_path_factory.mktemp(f"sharded-{request.param}"), identity, rng)
    return sharded, single, parts, identity


@pytest.fixture(scope="module")
def runtimes(tiny_export, stores):
    sharded, single = stores[:2]
    with Runtime(tiny_export, sharded, ONE_THREAD) as a, Runtime(tiny_export, single, ONE_THREAD) as b:
        yield a, b


def _weights(rt, rng):
    return {name: float(rng.uniform(0, 3)) for name in rt.attributes[: len(rt.attributes) // 2]} | {
        rt.attributes[-1]: 0.0}


@pytest.mark.parametrize("k", [1, 7, 500])
def test_search_equals_one_store_exactly(runtimes, stores, k, rng):
    sharded_rt, single_rt = runtimes
    parts, identity = stores[2], stores[3]
    assert isinstance(sharded_rt.gallery, ShardedGallery) and len(sharded_rt.gallery) == len(single_rt.gallery)
    emb = queries(rng, parts, identity)
    for weights in (None, _weights(sharded_rt, rng)):
        got = sharded_rt.search_embeddings(emb, k=k, weights=weights)
        want = single_rt.search_embeddings(emb, k=k, weights=weights)
        assert_same_results(got, want)
        assert all(r.missing_shards == () and "missing_shards" not in r.to_dict() for r in got)
        assert len(got[0].matches) == min(k, len(single_rt.gallery))
    if k >= 3:  # query 0 is an entry copied into three shards: a three-way tie at d = 0, to the lower ids
        top = sharded_rt.search_embeddings(emb, k=k)[0].matches[:3]
        assert [m.d for m in top] == [0.0, 0.0, 0.0]
        ids = [m.id for m in top]
        assert ids == sorted(ids)


def test_a_shard_made_again_stores_like_the_shards_a_stopped_run_left(tiny_export, tmp_path, rng):
    """A run stopped before publishing shards.json left shard-000; the next run fits its codecs again (on other rows
    here), but the shard it creates stores with shard-000's state: one codec state per sharded gallery."""
    identity = identity_of(tiny_export)
    left, refit = (fit_storage("compact", r["attr"], r["aam"]) for r in (random_rows(rng, 100, identity),
                                                                          random_rows(rng, 100, identity)))
    root = tmp_path / "sharded"
    Gallery.create(root / "shard-000", dim=identity["dim"], attributes=identity["attributes"],
                   aam_shape=tuple(identity["aam_shape"]), model=identity["model"], storage=left).close()
    names, counts = _prepare(root, 2, identity, refit, "compact")
    assert names == ["shard-000", "shard-001"] and counts == [0, 0]
    states = [(root / name / STATE_NAME).read_bytes() for name in names]
    assert states[0] == states[1] != encode_state(refit)


def test_compact_storage_sharded_equals_one_store_with_the_same_codecs(tiny_export, tmp_path, rng):
    """Shards and the single store share one fitted codec state: decoded rows, and so results, are identical."""
    identity = identity_of(tiny_export)
    sample = random_rows(rng, 200, identity)
    codecs = fit_storage("compact", sample["attr"], sample["aam"])
    sharded, single, parts = build(tmp_path, identity, rng, storage=codecs)
    with Runtime(tiny_export, sharded, ONE_THREAD) as a, Runtime(tiny_export, single, ONE_THREAD) as b:
        assert b.gallery.storage.mode == "compact"
        emb = queries(rng, parts, identity)
        for weights in (None, _weights(a, rng)):
            assert_same_results(a.search_embeddings(emb, k=9, weights=weights),
                                b.search_embeddings(emb, k=9, weights=weights))
        ids = np.arange(len(b.gallery))
        np.testing.assert_array_equal(a.gallery.attr_embeddings(ids), b.gallery.attr_embeddings(ids))
        np.testing.assert_array_equal(a.gallery.aam(ids), b.gallery.aam(ids))


def test_gallery_read_api_by_global_id(stores, tiny_data, runtimes):
    sharded, single = stores[:2]
    with ShardedGallery.open(sharded) as sg, Gallery.open(single) as g:
        assert sg.shard_names == ("shard-000", "shard-001", "shard-002", "shard-003") and not sg.writable
        ids = np.array([len(g) - 1, 0, 40, 36, 37, 40])  # across shards, unordered, repeated
        assert np.array_equal(sg.embeddings(ids), g.embeddings(ids))
        assert np.array_equal(sg.attr_embeddings(ids), g.attr_embeddings(ids))
        assert np.array_equal(sg.probs(ids), g.probs(ids))
        assert np.array_equal(sg.aam(ids), g.aam(ids))
        assert sg.meta(ids) == g.meta(ids)  # "id" is the global id
        d1, i1 = sg.search(g.embeddings([3, 60]), 5)
        d2, i2 = g.search(g.embeddings([3, 60]), 5)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
        for bad in (len(g), -1, [0, 10**9]):
            with pytest.raises(UnknownIdError):
                sg.meta(bad)
        with pytest.raises(InputError):
            sg.meta([0.5])
        with pytest.raises(InputError):
            sg.search(np.zeros((1, sg.dim + 1), np.float32), 3)
        with pytest.raises(InputError):
            sg.search(np.zeros((1, sg.dim), np.float32), 0)
    query = sorted((tiny_data / "query").glob("*.jpg"))[0]
    sharded_rt, single_rt = runtimes
    chosen = [int(ids[0]), 2, 45]
    assert_same_results([sharded_rt.explain(query, chosen)], [single_rt.explain(query, chosen)])


def _failing(name):
    original = ShardServer.top_k

    def top_k(self, *args, **kwargs):
        if self.name == name:
            raise OSError("disk gone")
        return original(self, *args, **kwargs)

    return top_k


def test_a_failing_shard_is_named_or_left_out_with_partial(stores, tiny_export, monkeypatch, rng, tmp_path):
    sharded, _, parts, identity = stores
    rest, global_ids = rest_store(tmp_path / "rest", parts, identity, skip=2)
    monkeypatch.setattr(ShardServer, "top_k", _failing("shard-002"))
    emb = queries(rng, parts, identity)
    with Runtime(tiny_export, ShardedGallery.open(sharded), ONE_THREAD) as rt:
        with pytest.raises(ShardUnavailableError, match="shard-002: OSError: disk gone") as e:
            rt.search_embeddings(emb, k=5)
        assert e.value.missing == ("shard-002",)
    with ShardedGallery.open(sharded, partial=True) as sg:
        with pytest.raises(ShardUnavailableError):  # (d, ids) cannot say what is missing: never partial
            sg.search(emb.embedding, 5)
        with Runtime(tiny_export, sg, ONE_THREAD) as rt:
            results = rt.search_embeddings(emb, k=5)
    d, ids = rest.search(emb.embedding, 5)
    for r, row in zip(results, ids, strict=True):
        assert r.missing_shards == ("shard-002",) and r.to_dict()["missing_shards"] == ["shard-002"]
        assert [m.id for m in r.matches] == global_ids[row].tolist()
    rest.close()


def test_http_answers_503_or_names_the_missing_shards(stores, tiny_export, tiny_data, monkeypatch):
    sharded = stores[0]
    monkeypatch.setattr(ShardServer, "top_k", _failing("shard-000"))
    image = b64(sorted((tiny_data / "query").glob("*.jpg"))[0].read_bytes())
    for partial in (False, True):
        with (Runtime(tiny_export, ShardedGallery.open(sharded, partial=partial), ONE_THREAD) as rt,
              RuntimeServer(rt, port=0) as srv):
            status, resp, body = call(srv, "POST", "/search", {"images": [image], "k": 3})
            if partial:
                assert status == 200 and body["results"][0]["missing_shards"] == ["shard-000"]
                assert len(body["results"][0]["matches"]) == 3
                status, _, health = call(srv, "GET", "/health")  # degraded until the shard answers again
                assert status == 200 and health["status"] == "degraded" and "shard-000" in health["problem"]
            else:
                assert status == 503 and "shard-000" in body["error"] and resp.getheader("Retry-After") == "1"


def test_open_refuses_inconsistent_shards(stores, tiny_export, tmp_path, rng):
    sharded, _, _, identity = stores
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    assert sharded_root(copy / SHARDS_NAME) == copy and sharded_root(copy / "shard-000") is None
    with Gallery.open(copy / "shard-003", writable=True) as g:  # an indexing run appended after publishing
        rows = random_rows(rng, 2, identity)
        g.append(rows["embedding"], rows["attr"], rows["probs"], [{}, {}], aam=rows["aam"])
    with pytest.raises(GalleryError, match="shard-003 .* holds 31 entries, the sharded manifest records 29"):
        ShardedGallery.open(copy)
    shutil.rmtree(copy / "shard-001")
    with pytest.raises(GalleryError, match="shard shard-001"):
        ShardedGallery.open(copy)
    manifest, _ = read_manifest(sharded)
    other = manifest_for({**manifest.identity(), "model": "0" * 64}, [s.name for s in manifest.shards],
                         [s.count for s in manifest.shards])
    shutil.rmtree(copy)
    shutil.copytree(sharded, copy)
    write_manifest(copy, other)
    with pytest.raises(GalleryError, match="shard-000 .*: its model differ"):
        ShardedGallery.open(copy)
    doc = json.loads((copy / SHARDS_NAME).read_text())
    for broken in ({**doc, "count": 3}, {**doc, "assignment": "crc32"}, {**doc, "shards": []}, [1]):
        (copy / SHARDS_NAME).write_text(json.dumps(broken))
        with pytest.raises(GalleryError, match=SHARDS_NAME):
            ShardedGallery.open(copy)
    with pytest.raises(GalleryError, match="not a sharded gallery"):
        ShardedGallery.open(tmp_path)
    with pytest.raises(InputError, match="mode"):
        ShardedGallery.open(sharded, mode="spark")


def test_read_only_refresh_and_model_check(stores, tiny_export, tmp_path, rng):
    sharded, _, _, identity = stores
    with pytest.raises(GalleryError, match="read-only"):
        Runtime(tiny_export, sharded, RuntimeConfig(writable=True, threads=1))
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    with Runtime(tiny_export, copy, RuntimeConfig(threads=1, refresh_s=None)) as rt:
        assert rt.refresh() == len(rt.gallery)
        with pytest.raises(GalleryError, match="read-only"):
            rt.add(rng.uniform(0, 1, (64, 32, 3)))
        manifest, _ = read_manifest(copy)
        with Gallery.open(copy / "shard-003", writable=True) as g:  # a later indexing run, published
            rows = random_rows(rng, 1, identity)
            g.append(rows["embedding"], rows["attr"], rows["probs"], [{}], aam=rows["aam"])
        write_manifest(copy, manifest_for(manifest.identity(), [s.name for s in manifest.shards],
                                          [s.count + (s.name == "shard-003") for s in manifest.shards]))
        with pytest.raises(GalleryError, match="restart the server"):
            rt.refresh()
    manifest, _ = read_manifest(sharded)
    write_manifest(copy, manifest_for({**manifest.identity(), "model": "f" * 64}, [s.name for s in manifest.shards],
                                      [s.count + (s.name == "shard-003") for s in manifest.shards]))
    for name in ("shard-000", "shard-001", "shard-002", "shard-003"):
        doc = json.loads((copy / name / "gallery.json").read_text())
        (copy / name / "gallery.json").write_text(json.dumps({**doc, "model": "f" * 64}))
    with pytest.raises(GalleryError, match="another model"):
        Runtime(tiny_export, copy, RuntimeConfig(threads=1, verify=False))


def test_shard_assignment_is_stable_across_processes_and_balanced():
    # A resumed run (another process, another machine) must send every key to the shard it went to before.
    keys = ["a.jpg", "0001_c1s1_000151_00.jpg", "dir/é.png", "", *(f"img{i}.jpg" for i in range(50))]
    script = ("import json, sys; from attrimeter.runtime.distributed.manifest import shard_of; "
              "print(json.dumps([shard_of(k, 7) for k in json.loads(sys.argv[1])]))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, json.dumps(keys)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(out.stdout) == [shard_of(k, 7) for k in keys]
    counts = np.bincount([shard_of(f"img{i}.jpg", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900


def test_cli_search_a_sharded_gallery_and_flags_need_ray(stores, tiny_export, tiny_data, capsys, tmp_path):
    sharded = stores[0]
    query = sorted((tiny_data / "query").glob("*.jpg"))[0]
    assert main(["search", str(query), "--export", str(tiny_export), "--gallery", str(sharded / SHARDS_NAME),
                 "--k", "4", "--json", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out[0]["matches"]) == 4 and "missing_shards" not in out[0]
    with pytest.raises(SystemExit) as e:
        main(["index", "--export", str(tiny_export), "--images", str(tiny_data / "query"), "--out",
              str(tmp_path / "g"), "--shards", "2"])
    assert e.value.code == 2 and "--shards and --workers need --ray" in capsys.readouterr().err


def test_image_lists_and_folders(tmp_path, tiny_data):
    folder = tiny_data / "query"
    found = list_images(folder)
    assert [k for k, _ in found] == sorted(p.name for p in folder.glob("*.jpg"))
    names = [k for k, _ in found][:3]
    (tmp_path / "list.txt").write_text(f"# a comment\n{folder / names[1]}\n\n  ../q/{names[0]}  \n")
    (tmp_path / "q").symlink_to(folder)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "list.txt").write_text((tmp_path / "list.txt").read_text())
    got = list_images(tmp_path / "lists" / "list.txt")  # relative lines: relative to the list's folder
    assert got == sorted([(str(folder / names[1]), folder / names[1]),
                          (f"../q/{names[0]}", tmp_path / "lists" / ".." / "q" / names[0])])
    (tmp_path / "twice.txt").write_text(f"{folder / names[0]}\n{folder / names[0]}\n")
    for bad, message in ((tmp_path / "twice.txt", "listed twice"), (tmp_path / "none", "no such image folder"),
                         (tmp_path / "lists", "no images")):
        with pytest.raises(InputError, match=message):
            list_images(bad)


def test_a_shard_writer_stores_each_key_once(tiny_export, tmp_path, rng):
    identity = identity_of(tiny_export)
    folder = tmp_path / "shard"
    Gallery.create(folder, dim=identity["dim"], attributes=identity["attributes"],
                   aam_shape=tuple(identity["aam_shape"]), model=identity["model"], metric=identity["metric"]).close()
    rows = random_rows(rng, 6, identity)
    keys = [f"k{i}" for i in range(6)]
    meta = [json.dumps({"key": k}) for k in keys]

    def add(writer, sel):
        return writer.add([keys[i] for i in sel], *(rows[f][sel] for f in ("embedding", "attr", "probs", "aam")),
                          [meta[i] for i in sel])

    writer = ShardWriter(str(folder), segment=4)
    assert add(writer, [0, 1, 1, 2]) == 3 and writer.buffered() == 3  # a key twice in one batch: once
    assert add(writer, [2, 3]) == 1 and writer.buffered() == 0  # 4 buffered: one segment written
    assert writer.missing(keys) == ["k4", "k5"]
    assert add(writer, [0, 3, 4]) == 1 and writer.flush() == 5  # a retried batch: only the new key
    writer.close()
    again = ShardWriter(str(folder), segment=4)  # a restarted writer knows what its shard holds
    assert again.missing(keys) == ["k5"] and add(again, [4, 5]) == 1 and again.flush() == 6
    again.close()
    with Gallery.open(folder) as g:
        assert [m["key"] for m in g.meta(np.arange(len(g)))] == keys
        np.testing.assert_array_equal(g.embeddings(np.arange(6)), rows["embedding"])
