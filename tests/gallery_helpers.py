"""Gallery store test helpers, shared by tests/runtime/test_gallery.py, test_store_durability.py and
test_store_writers.py (and the ``filled`` fixture of tests/runtime/conftest.py): deterministic content that child
processes regenerate, child-process scripts that append, loop or crash, random batches and checks of what a store
holds."""

import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from attrimeter.runtime.gallery import MANIFEST_NAME, Gallery
from attrimeter.runtime.store_format import JOURNAL_NAME, parse_journal, parse_journal_header, parse_manifest

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


def run_child(code, *args, timeout=60):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def gen_gallery(path):
    return Gallery.create(path, dim=GEN["C"], attributes=ATTRS, aam_shape=GEN["AAM"], model="gen", metric="l2")


def prefix_sums(limit):
    sums, first = [0], 0
    while first <= limit:
        first += GEN["batch_size"](first)
        sums.append(first)
    return sums


def check_generated(g):
    """The gallery holds whole batches, each entry exactly what the generator gives for its id."""
    n = len(g)
    assert n in prefix_sums(n)
    if n == 0:
        return
    ids = np.arange(n)
    rows = [GEN["entry"](i) for i in ids]
    np.testing.assert_array_equal(g.embeddings(ids), np.stack([r[0] for r in rows]))
    np.testing.assert_array_equal(g.attr_embeddings(ids), np.stack([r[1] for r in rows]).astype(np.float16))
    np.testing.assert_array_equal(g.probs(ids), np.stack([r[2] for r in rows]))
    np.testing.assert_array_equal(g.aam(ids), np.stack([r[3] for r in rows]).astype(np.float16))
    assert g.meta(ids) == [{"id": int(i), **r[4]} for i, r in zip(ids, rows, strict=True)]


def is_mapped(a):
    while isinstance(a, (np.ndarray, memoryview)):
        a = a.base if isinstance(a, np.ndarray) else a.obj
    return isinstance(a, mmap.mmap)


def listed(path):
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


def on_disk(path):
    return set(os.listdir(Path(path) / "segments"))


def batch_of(rng, n, dim=24, aam=(8, 4)):
    return {
        "embedding": rng.standard_normal((n, dim)).astype(np.float32),
        "attr_embeddings": rng.standard_normal((n, M, dim)).astype(np.float32),
        "probs": rng.random((n, M)).astype(np.float32),
        "meta": [{"key": f"k{rng.integers(1 << 30)}", "camera": int(rng.integers(6)), "path": None} for _ in range(n)],
        "aam": None if aam is None else rng.random((n, M, *aam)).astype(np.float32),
    }


def concat_batches(batches):
    out = {k: np.concatenate([b[k] for b in batches]) for k in ("embedding", "attr_embeddings", "probs", "aam")}
    out["meta"] = [m for b in batches for m in b["meta"]]
    return out


def assert_holds(g, data):
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


V1_FIXTURE = Path(__file__).parent / "runtime" / "data" / "gallery_v1"  # written by the format-1 store (commit f4db7f6)

