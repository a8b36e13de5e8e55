"""Random sharded galleries (with duplicated entries, so that ties occur) and the one store that holds the same entries
in global-id order: what a sharded search must reproduce exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attrimeter.artefact.manifest import load_manifest
from attrimeter.runtime.distributed.manifest import manifest_for, write_manifest
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.runtime import Embeddings

SHARD_SIZES = (37, 0, 52, 29)  # an empty shard too: many shards over a small gallery


def identity_of(export_dir, metric="l2"):
    manifest = load_manifest(export_dir)
    return {"dim": manifest.channels, "attributes": list(manifest.attribute_names),
            "aam_shape": list(manifest.aam_shape), "model": manifest.model_id, "metric": metric}


def random_rows(rng, n, identity):
    m, c = len(identity["attributes"]), identity["dim"]
    h, w = identity["aam_shape"]
    return {"embedding": rng.standard_normal((n, c)).astype(np.float32),
            "attr": rng.standard_normal((n, m, c)).astype(np.float16).astype(np.float32),
            "probs": rng.uniform(0, 1, (n, m)).astype(np.float32),
            "aam": rng.uniform(0, 2, (n, m, h, w)).astype(np.float16).astype(np.float32)}


def build(root: Path, identity, rng, sizes=SHARD_SIZES, storage="float16"):
    """``root/sharded`` (shards of ``sizes`` entries, some rows copied across shards) and ``root/single``, all stored
    with ``storage`` (a mode or fitted codecs: the same state everywhere)."""
    parts = [random_rows(rng, n, identity) for n in sizes]
    donors = [i for i, n in enumerate(sizes) if n]
    for dst in donors[1:]:  # exact duplicates of shard 0's first rows in every other shard: ties across shards
        for key in parts[dst]:
            parts[dst][key][:5] = parts[donors[0]][key][:5]
    parts[donors[0]]["embedding"][10] = parts[donors[0]]["embedding"][11]  # and a tie within a shard
    parts[donors[0]]["attr"][10] = parts[donors[0]]["attr"][11]
    sharded, single = root / "sharded", root / "single"
    sharded.mkdir(parents=True)
    store = Gallery.create(single, dim=identity["dim"], attributes=identity["attributes"],
                           aam_shape=tuple(identity["aam_shape"]), model=identity["model"], metric=identity["metric"],
                           storage=storage)
    names = []
    for s, rows in enumerate(parts):
        names.append(f"shard-{s:03d}")
        n = len(rows["embedding"])
        meta = [{"key": f"s{s}/img{i:03d}.jpg", "path": None, "camera": s} for i in range(n)]
        with Gallery.create(sharded / names[-1], dim=identity["dim"], attributes=identity["attributes"],
                            aam_shape=tuple(identity["aam_shape"]), model=identity["model"],
                            metric=identity["metric"], storage=storage) as g:
            if n:
                g.append(rows["embedding"], rows["attr"], rows["probs"], meta, aam=rows["aam"])
        if n:
            store.append(rows["embedding"], rows["attr"], rows["probs"], meta, aam=rows["aam"])
    store.close()
    write_manifest(sharded, manifest_for(identity, names, [len(p["embedding"]) for p in parts]))
    return sharded, single, parts


def queries(rng, parts, identity, n=6):
    """Query embeddings: random ones, and copies of duplicated entries (distance-0 ties across shards)."""
    rows = random_rows(rng, n, identity)
    rows["embedding"][:2] = parts[0]["embedding"][[0, 11]]
    rows["attr"][:2] = parts[0]["attr"][[0, 11]]
    return Embeddings(embedding=rows["embedding"], attr_embeddings=rows["attr"], probs=rows["probs"],
                      aam=rows["aam"])


def assert_same_results(got, want):
    """Explained results equal exactly: ids, keys, d, shares, contributions, scores."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [m.id for m in g.matches] == [m.id for m in w.matches], (
            [(m.id, m.score) for m in g.matches], [(m.id, m.score) for m in w.matches])
        assert [m.key for m in g.matches] == [m.key for m in w.matches]
        for a, b in zip(g.matches, w.matches, strict=True):
            assert a.d == b.d and a.score == b.score and a.d_hat == b.d_hat
            assert np.array_equal(a.shares, b.shares) and np.array_equal(a.contributions, b.contributions)


def rest_store(path: Path, parts, identity, skip):
    """The one store of every shard's entries but shard ``skip``'s, and the global id of each of its ids."""
    rest = Gallery.create(path, dim=identity["dim"], attributes=identity["attributes"],
                          aam_shape=tuple(identity["aam_shape"]), model=identity["model"], metric=identity["metric"])
    first = np.cumsum([0, *(len(p["embedding"]) for p in parts)])
    kept = [s for s in range(len(parts)) if s != skip]
    for s in kept:
        n = len(parts[s]["embedding"])
        if n:
            rest.append(parts[s]["embedding"], parts[s]["attr"], parts[s]["probs"], [{}] * n, aam=parts[s]["aam"])
    return rest, np.concatenate([np.arange(first[s], first[s + 1]) for s in kept])
