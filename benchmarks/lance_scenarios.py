"""The gallery store's crash, concurrency, tampering and link scenarios, run on the own store and on Lance.

The scenarios are those of ``tests/runtime/test_store_durability.py`` and ``test_store_writers.py`` (the lock and
link tests), driven through one small adapter per contender so that both run the same code:

* crash: a writer process appends until it is SIGKILLed at a random moment (5 rounds); the store must hold exactly a
  prefix of the appends, every acknowledged one included, each entry exactly what was appended;
* crash points (Lance): a writer that dies right after writing its fragments, or right after Lance's commit;
* concurrency: two writer processes and a reader process at once; every acknowledged append present exactly once,
  or the second writer refused with a clear error; the reader never sees a partial append or a shrinking store;
* lock removed (own store): the outside attack: the lock file is deleted while a writer runs, a second one starts;
* cleanup race (Lance): a clean-up run while a writer holds written but uncommitted fragments;
* symbolic links: the data folder is a link to a folder holding other files; a writer compacts and cleans up;
* tampering: single-byte flips at random positions of data files and of the manifest, a truncated, deleted or
  swapped data file, a deleted newest manifest; each outcome classed from "refused at open" to "wrong data, verify
  passes".

Entries are generated from their ``(writer, seq, j)`` tag (kept in their metadata), so any store content can be
checked entry by entry. Child processes run this file (``python lance_scenarios.py writer|reader …``).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lance
import numpy as np
from lance.fragment import write_fragments
from lance_store import LanceStore

from attrimeter.runtime.errors import GalleryError
from attrimeter.runtime.gallery import MANIFEST_NAME, Gallery

C, ATTRS, AAM = 24, ("gender", "hat", "backpack", "upper_red"), (8, 4)
M = len(ATTRS)
OWN, LANCE = "own store (main)", "Lance (LanceStore prototype)"


def batch_size(seq: int) -> int:
    return 1 + (seq * 7 + 3) % 6


def entry(w: int, seq: int, j: int) -> tuple[np.ndarray, ...]:
    r = np.random.default_rng([w, seq, j])
    return (r.standard_normal(C).astype(np.float32), r.standard_normal((M, C)).astype(np.float32),
            r.random(M).astype(np.float32), r.random((M, *AAM)).astype(np.float32))


def batch(w: int, seq: int) -> tuple[list[np.ndarray], list[dict[str, int]]]:
    rows = [entry(w, seq, j) for j in range(batch_size(seq))]
    return [np.stack([r[k] for r in rows]) for k in range(4)], [{"w": w, "seq": seq, "j": j} for j in range(len(rows))]


# ---------------------------------------------------------------------- one adapter per contender


class _Own:
    name = OWN

    @staticmethod
    def create(path: Path) -> None:
        Gallery.create(path, dim=C, attributes=ATTRS, aam_shape=AAM, model="scenario").close()

    @staticmethod
    def writer(path: Path) -> Gallery:
        return Gallery.open(path, writable=True, verify=False, progress=False)

    @staticmethod
    def reader(path: Path) -> Gallery:
        return Gallery.open(path, verify=False, progress=False)

    @staticmethod
    def append(store: Gallery, arrays: list[np.ndarray], meta: list[dict]) -> None:
        store.append(arrays[0], arrays[1], arrays[2], meta, aam=arrays[3])

    @staticmethod
    def read_all(store: Gallery) -> tuple[Any, ...]:
        ids = np.arange(len(store))
        identity = (store.dim, store.attributes, store.aam_shape, store.model)
        return (store.embeddings(ids), store.attr_embeddings(ids), store.probs(ids), store.aam(ids),
                store.meta(ids), identity)

    @staticmethod
    def verify(path: Path) -> None:
        Gallery.open(path, verify=True, progress=False).close()

    @staticmethod
    def data_files(path: Path) -> list[Path]:
        return sorted(p for p in (path / "segments").rglob("*") if p.is_file())

    @staticmethod
    def manifest(path: Path) -> Path:
        return path / MANIFEST_NAME

    @staticmethod
    def equal_files(path: Path) -> tuple[Path, Path]:
        """The attribute files of the first two segments of equal entry counts (relative to ``path``)."""
        segments = json.loads((path / MANIFEST_NAME).read_text())["segments"]
        a, b = next((a, b) for i, a in enumerate(segments) for b in segments[i + 1:] if a["count"] == b["count"])
        return Path("segments", a["name"], "attr.npy"), Path("segments", b["name"], "attr.npy")


class _Lance:
    name = LANCE

    @staticmethod
    def create(path: Path) -> None:
        LanceStore.create(path, dim=C, attributes=ATTRS, aam_shape=AAM, model="scenario")

    @staticmethod
    def writer(path: Path) -> LanceStore:
        return LanceStore.open(path)

    reader = writer

    @staticmethod
    def append(store: LanceStore, arrays: list[np.ndarray], meta: list[dict]) -> None:
        store.append(arrays[0], arrays[1], arrays[2], meta, aam=arrays[3])

    @staticmethod
    def read_all(store: LanceStore) -> tuple[Any, ...]:
        rows = store.rows(np.arange(len(store)))
        identity = (store.dim, store.attributes, store.aam_shape, store.header["model"])
        return rows["embedding"], rows["attr"], rows["probs"], rows["aam"], rows["meta"], identity

    @staticmethod
    def verify(path: Path) -> None:
        LanceStore.open(path).verify()

    @staticmethod
    def data_files(path: Path) -> list[Path]:
        return sorted((path / "data").glob("*.lance"))

    @staticmethod
    def manifest(path: Path) -> Path:
        return min((path / "_versions").glob("*.manifest"))  # v2 names: the newest version has the smallest name

    @staticmethod
    def equal_files(path: Path) -> tuple[Path, Path]:
        """The data files of the first two fragments of equal row counts (relative to ``path``)."""
        fragments = [f.metadata for f in lance.dataset(str(path)).get_fragments()]
        a, b = next((a, b) for i, a in enumerate(fragments) for b in fragments[i + 1:]
                    if a.physical_rows == b.physical_rows)
        return Path("data", a.files[0].path), Path("data", b.files[0].path)


KINDS = {"own": _Own, "lance": _Lance}


# ---------------------------------------------------------------------- checking a store's content


def check(rows: tuple[Any, ...], expected: dict[int, list[int]] | None = None) -> dict[str, Any]:
    """Check every entry against its tag: the seqs of each writer in store order, and what is wrong (with
    ``expected``, also any difference from those seqs)."""
    emb, attr, probs, aam, meta, identity = rows
    seqs: dict[int, list[int]] = collections.defaultdict(list)
    problems = []
    if identity != (C, ATTRS, AAM, "scenario"):
        problems.append(f"identity changed to {identity}")
    i = 0
    while i < len(meta):
        w, seq = meta[i]["w"], meta[i]["seq"]
        n = batch_size(seq)
        tags = [(m["w"], m["seq"], m["j"]) for m in meta[i:i + n]]
        if tags != [(w, seq, j) for j in range(n)]:
            problems.append(f"entry {i}: batch ({w}, {seq}) is not whole")
            break
        (e, a, p, m), _ = batch(w, seq)
        same = (np.array_equal(emb[i:i + n], e) and np.array_equal(attr[i:i + n], a.astype(np.float16))
                and np.array_equal(probs[i:i + n], p) and np.array_equal(aam[i:i + n], m.astype(np.float16))
                and all(meta[i + j]["id"] == i + j for j in range(n)))
        if not same:
            problems.append(f"entries {i}..{i + n - 1}: values differ from what was appended")
        seqs[w].append(seq)
        i += n
    for w, s in seqs.items():
        if s != list(range(len(s))):
            problems.append(f"writer {w}: appends {s[:8]}… are not its first ones in order, once each")
    if expected is not None and dict(seqs) != expected:
        problems.append(f"holds appends {dict(seqs)}, expected {expected}")
    return {"seqs": dict(seqs), "count": len(meta), "problems": problems}


# ---------------------------------------------------------------------- child processes


def _child(args: list[str]) -> None:
    role, kind, path = args[0], KINDS[args[1]], Path(args[2])
    if role == "writer":
        w, seconds = int(args[3]), float(args[4])
        try:
            store = kind.writer(path)
        except GalleryError as e:
            print(f"refused {e}", flush=True)
            return
        print("ready", flush=True)
        end = time.monotonic() + seconds if seconds > 0 else float("inf")
        seq = 0
        while time.monotonic() < end:
            arrays, meta = batch(w, seq)
            kind.append(store, arrays, meta)
            print(f"ok {w} {seq}", flush=True)
            seq += 1
    elif role == "reader":
        end, store = time.monotonic() + float(args[3]), None
        reads, last, bad, errors = 0, 0, [], collections.Counter()
        print("ready", flush=True)
        while time.monotonic() < end:
            try:
                if store is None:
                    store = kind.reader(path)
                else:
                    store.refresh()
                result = check(kind.read_all(store))
            except Exception as e:  # reported, and counted as a failed read
                errors[f"{type(e).__name__}: {str(e)[:80]}"] += 1
                continue
            reads += 1
            if result["count"] < last:
                bad.append(f"count went from {last} down to {result['count']}")
            last = result["count"]
            bad += result["problems"]
        print(json.dumps({"reads": reads, "last_count": last, "bad": bad[:5], "errors": dict(errors)}), flush=True)
    elif role == "crashpoint":  # Lance only: die right before or right after Lance's commit
        point = args[3]
        store = LanceStore.open(path)
        real = lance.LanceDataset.commit

        def commit(*a: Any, **k: Any) -> Any:
            if point == "after-commit":
                real(*a, **k)
            os._exit(3)

        lance.LanceDataset.commit = commit  # type: ignore[method-assign]
        arrays, meta = batch(9, 0)
        _Lance.append(store, arrays, meta)


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _acks(out: str) -> dict[int, int]:
    """The last acknowledged seq of each writer in a writer's output."""
    acked: dict[int, int] = {}
    for line in out.splitlines():
        if line.startswith("ok "):
            _, w, seq = line.split()
            acked[int(w)] = int(seq)
    return acked


# ---------------------------------------------------------------------- scenarios


def crash(kind: Any, work: Path, rng: np.random.Generator, rounds: int = 5) -> dict[str, Any]:
    path = work / "crash"
    kind.create(path)
    acked: dict[int, int] = {}
    issues: list[str] = []
    unverifiable = 0
    for r in range(rounds):
        proc = _spawn("writer", _key(kind), str(path), str(r + 1), "0")
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            return {"result": f"writer did not start: {line} {proc.stderr.read()[-300:]}"}
        time.sleep(float(rng.uniform(0.2, 1.0)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        acked.update(_acks(out))
        result = check(kind.read_all(kind.reader(path)))
        issues += result["problems"]
        for w, last in acked.items():
            got = result["seqs"].get(w, [])
            if len(got) < last + 1 or len(got) > last + 2:
                issues.append(f"round {r}: writer {w} acknowledged {last + 1} appends, the store holds {len(got)}")
        try:
            kind.verify(path)
        except GalleryError:
            unverifiable += 1  # the data may be whole while the checks cannot tell (counted, not a loss)
        store = kind.writer(path)  # writable again once the writer is dead; appends go on
        arrays, meta = batch(100 + r, 0)
        kind.append(store, arrays, meta)
        if hasattr(store, "close"):
            store.close()
    final = check(kind.read_all(kind.reader(path)))
    total = sum(v + 1 for v in acked.values())
    issues += final["problems"]
    alarms = f"; verify fails after {unverifiable} of {rounds} kills" if unverifiable else "; verify passes after each"
    return {"result": ("exact prefix, nothing acknowledged lost" if not issues else "; ".join(issues[:3])) + alarms,
            "ok": not issues, "detail": f"{rounds} kills, {total} acknowledged appends, {final['count']} entries"}


def crash_points(work: Path) -> list[dict[str, Any]]:
    rows = []
    for point in ("before-commit", "after-commit"):
        path = work / f"point-{point}"
        _Lance.create(path)
        store = LanceStore.open(path)
        arrays, meta = batch(1, 0)
        _Lance.append(store, arrays, meta)
        proc = _spawn("crashpoint", "lance", str(path), point)
        proc.communicate()
        result = check(_Lance.read_all(LanceStore.open(path)))
        visible = 9 in result["seqs"]
        orphans = len(_Lance.data_files(path)) - len(lance.dataset(str(path)).get_fragments())
        try:
            _Lance.verify(path)
            verified = "verify passes"
        except GalleryError as e:
            verified = f"verify fails: {str(e).split(': ', 1)[-1][:70]}"
        rows.append({"scenario": f"crash {point.replace('-', ' ')}", "kind": LANCE, "ok": not result["problems"],
                     "result": f"append {'visible' if visible else 'invisible'}, {verified}",
                     "detail": f"exit {proc.returncode}; {orphans} uncommitted data file(s) left (removed by "
                               f"cleanup_old_versions only after 7 days); problems: {result['problems'] or 'none'}"})
    return rows


def concurrency(kind: Any, work: Path, seconds: float = 4.0) -> dict[str, Any]:
    path = work / "concurrent"
    kind.create(path)
    reader = _spawn("reader", _key(kind), str(path), str(seconds + 3))
    reader.stdout.readline()
    writers = [_spawn("writer", _key(kind), str(path), str(w), str(seconds)) for w in (1, 2)]
    outs = [p.communicate()[0] for p in writers]
    reader_out = json.loads(reader.communicate()[0].strip().splitlines()[-1])
    refused = [o.split(" ", 1)[1].strip() for o in outs if o.startswith("refused")]
    acked: dict[int, int] = {}
    for o in outs:
        acked.update(_acks(o))
    result = check(kind.read_all(kind.reader(path)))
    lost = {w: (last + 1) - len(result["seqs"].get(w, [])) for w, last in acked.items()}
    issues = result["problems"] + [f"writer {w}: {n} acknowledged appends missing" for w, n in lost.items() if n]
    issues += reader_out["bad"]
    how = (f"second writer refused ({refused[0].rsplit(': ', 1)[-1][:60]})" if refused else
           f"both writers landed ({', '.join(f'w{w}: {v + 1}' for w, v in sorted(acked.items()))} appends)")
    errors = "; ".join(f"{n}× {e}" for e, n in reader_out["errors"].items()) or "none"
    return {"result": how + (", nothing lost" if not issues else "; " + "; ".join(issues[:3])), "ok": not issues,
            "detail": f"reader: {reader_out['reads']} consistent full reads, read errors: {errors}"}


def lock_removed(work: Path, seconds: float = 3.0) -> dict[str, Any]:
    path = work / "lock-removed"
    _Own.create(path)
    first = _spawn("writer", "own", str(path), "1", str(seconds + 1))
    first.stdout.readline()
    (path / ".lock").unlink()
    second = _spawn("writer", "own", str(path), "2", str(seconds))
    outs = [first.communicate(), second.communicate()]
    acked: dict[int, int] = {}
    for out, _ in outs:
        acked.update(_acks(out))
    try:
        result = check(_Own.read_all(_Own.reader(path)))
        lost = {w: (last + 1) - len(result["seqs"].get(w, [])) for w, last in acked.items()}
        ok = not result["problems"] and not any(lost.values())
        text = "second writer refused" if outs[1][0].startswith("refused") else (
            "second writer got in; " + ("nothing lost" if ok else
                                        f"acknowledged appends lost: {lost}; {result['problems'][:2]}"))
    except GalleryError as e:
        ok, text = False, f"second writer got in; store unreadable: {str(e)[:100]}"
    crashed = [err.strip().splitlines()[-1][:100] for _, err in outs if "Traceback" in err]
    return {"scenario": "lock file removed, second writer", "kind": OWN, "ok": ok, "result": text,
            "detail": f"writer errors: {crashed or 'none'}"}


def cleanup_race(work: Path) -> list[dict[str, Any]]:
    rows = []
    for unverified in (False, True):
        path = work / f"cleanup-{unverified}"
        _Lance.create(path)
        store = LanceStore.open(path)
        for seq in range(3):
            _Lance.append(store, *batch(1, seq))
        ds = lance.dataset(str(path))
        arrays, meta = batch(2, 0)
        fragments = write_fragments(store.to_table(arrays[0], arrays[1], arrays[2], meta, arrays[3]), str(path),
                                    schema=ds.schema)  # a writer between writing and committing
        other = lance.dataset(str(path))
        other.optimize.compact_files()
        lance.dataset(str(path)).cleanup_old_versions(retain_versions=20, delete_unverified=unverified)
        try:
            lance.LanceDataset.commit(str(path), lance.LanceOperation.Append(fragments), read_version=ds.version)
            result = check(_Lance.read_all(LanceStore.open(path)))
            text = "commit accepted, all rows readable" if not result["problems"] else str(result["problems"][:2])
            ok = not result["problems"]
        except Exception as e:  # the outcome being measured
            text, ok = f"commit accepted, then reads fail: {type(e).__name__}: {str(e)[:90]}", False
        rows.append({"scenario": f"cleanup during an append ({'delete_unverified=True' if unverified else 'default'})",
                     "kind": LANCE, "ok": ok, "result": text,
                     "detail": "cleanup_old_versions by another process while a writer holds written, uncommitted "
                               "fragments"})
    return rows


def symlinked_data(kind: Any, work: Path) -> dict[str, Any]:
    path, outside = work / f"link-{_key(kind)}", work / f"outside-{_key(kind)}"
    kind.create(path)
    store = kind.writer(path)
    for seq in range(3):
        kind.append(store, *batch(1, seq))
    if hasattr(store, "close"):
        store.close()
    folder = path / ("segments" if kind is _Own else "data")
    shutil.copytree(folder, outside)
    shutil.rmtree(folder)
    os.symlink(outside, folder)
    planted = ["precious.txt", "000000000099-00000000/embedding.npy", "notes/old.lance", "old.lance"]
    old = time.time() - 30 * 86400  # older than Lance's 7-day guard for unreferenced files
    for name in planted:
        (outside / name).parent.mkdir(exist_ok=True)
        (outside / name).write_text("keep")
        os.utime(outside / name, (old, old))
    try:
        store = kind.writer(path)
        kind.append(store, *batch(1, 3))
        if kind is _Own:
            store.compact(progress=False)
            store.close()
        else:
            store.compact()
        opened = "writer opened and compacted through the link"
    except GalleryError as e:
        opened = f"writer refused: {str(e)[:80]}"
    gone = [name for name in planted if not (outside / name).exists()]
    return {"scenario": "data folder is a symbolic link", "kind": kind.name, "ok": not gone,
            "result": f"{opened}; " + (f"deleted outside: {', '.join(gone)}" if gone else "nothing outside deleted"),
            "detail": "planted: " + ", ".join(planted) + " (mtime 30 days ago)"}


# ---------------------------------------------------------------------- tampering

TAMPER_APPENDS = 7
OUTCOMES = ("refused at open", "refused at read", "wrong data, verify catches", "wrong data, verify passes",
            "same data, verify catches", "same data, verify passes")


def _outcome(open_fn: Callable[[], Any], read_fn: Callable[[Any], tuple], verify_fn: Callable[[], None],
             expected: dict[int, list[int]]) -> tuple[str, bool]:
    """The outcome class of one damaged store (wrong data: other values, or not the ``expected`` appends), and whether
    Lance panicked on the way."""
    panicked = False

    def fails(fn: Callable[[], Any]) -> bool:
        nonlocal panicked
        try:
            fn()
        except BaseException as e:  # any refusal counts: GalleryError, Lance's OSError/ValueError, Arrow errors
            if type(e).__name__ == "PanicException":
                panicked = True
            elif not isinstance(e, Exception):
                raise
            return True
        return False

    opened: list[Any] = []
    if fails(lambda: opened.append(open_fn())):
        return OUTCOMES[0], panicked
    result: list[Any] = []
    if fails(lambda: result.append(check(read_fn(opened[0]), expected)["problems"])):
        return OUTCOMES[1], panicked
    wrong, caught = bool(result[0]), fails(verify_fn)
    return OUTCOMES[2 + 2 * (not wrong) + (not caught)], panicked


def _lance_alone(path: Path) -> tuple[Callable, Callable, Callable]:
    """Lance without the prototype's records: its own open, take and ``validate()``."""
    def read(ds: Any) -> tuple:
        rows = LanceStore(path, ds, json.loads(ds.schema.metadata[b"attrimeter"])).rows(np.arange(ds.count_rows()))
        header = json.loads(ds.schema.metadata[b"attrimeter"])
        identity = (header["dim"], tuple(header["attributes"]), tuple(header["aam_shape"]), header["model"])
        return rows["embedding"], rows["attr"], rows["probs"], rows["aam"], rows["meta"], identity
    return (lambda: lance.dataset(str(path))), read, (lambda: lance.dataset(str(path)).validate())


def tampering(work: Path, rng: np.random.Generator, flips: int = 150) -> list[dict[str, Any]]:
    pristine = {}
    for key, kind in KINDS.items():
        path = work / f"tamper-{key}"
        kind.create(path)
        store = kind.writer(path)
        for seq in range(TAMPER_APPENDS):  # appends 0 and 6 have the same size: their files can be swapped
            kind.append(store, *batch(1, seq))
        if hasattr(store, "close"):
            store.close()
        pristine[key] = path
    expected = {1: list(range(TAMPER_APPENDS))}

    def damages(kind: Any, path: Path) -> dict[str, list[Callable[[Path], None]]]:
        data = kind.data_files(path)

        def flip(rel: Path, pos: int, bit: int) -> Callable[[Path], None]:
            def do(p: Path) -> None:
                raw = bytearray((p / rel).read_bytes())
                raw[pos % len(raw)] ^= 1 << bit
                (p / rel).write_bytes(bytes(raw))
            return do

        first, other = kind.equal_files(path)
        manifest = kind.manifest(path).relative_to(path)
        return {
            f"flip 1 bit of a data file ({flips} random)": [
                flip(f.relative_to(path), int(rng.integers(1 << 30)), int(rng.integers(8)))
                for f in (data[int(i)] for i in rng.integers(len(data), size=flips))],
            f"flip 1 bit of the manifest ({flips} random)": [
                flip(manifest, int(rng.integers(1 << 30)), int(rng.integers(8))) for _ in range(flips)],
            "truncate a data file by 3 bytes": [lambda p: (p / first).write_bytes((p / first).read_bytes()[:-3])],
            "delete a data file": [lambda p: (p / first).unlink()],
            "replace a data file by another one's copy": [lambda p: (p / first).write_bytes((p / other).read_bytes())],
            "delete the newest manifest": [lambda p: (p / manifest).unlink()],
        }

    rows = []
    for key, kind in KINDS.items():
        for case, fns in damages(kind, pristine[key]).items():
            views = {kind.name: collections.Counter()}
            if kind is _Lance:
                views["Lance alone (open, take, validate())"] = collections.Counter()
            panics = collections.Counter()
            for fn in fns:
                path = work / "case"
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(pristine[key], path, symlinks=True)
                fn(path)
                outcomes = {kind.name: _outcome(lambda p=path, k=kind: k.reader(p), kind.read_all,
                                                lambda p=path, k=kind: k.verify(p), expected)}
                if kind is _Lance:
                    outcomes["Lance alone (open, take, validate())"] = _outcome(*_lance_alone(path), expected)
                for name, (outcome, panicked) in outcomes.items():
                    views[name][outcome] += 1
                    panics[name] += panicked
            for name, tally in views.items():
                silent = tally["wrong data, verify passes"]
                rows.append({"scenario": f"tamper: {case}", "kind": name, "ok": silent == 0,
                             "result": ", ".join(f"{n} {o}" for o in OUTCOMES if (n := tally[o])),
                             "detail": f"{silent} of {len(fns)} silently wrong; {panics[name]} Rust panics"})
    return rows


def _key(kind: Any) -> str:
    return next(k for k, v in KINDS.items() if v is kind)


def run_all(work: Path, seed: int = 0) -> list[dict[str, Any]]:
    """Every scenario on both contenders: rows of scenario, kind, ok (None: does not apply), result, detail."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in (_Own, _Lance):
        rows.append({"scenario": "SIGKILL during appends", "kind": kind.name, **crash(kind, work / kind.__name__, rng)})
    rows += crash_points(work)
    for kind in (_Own, _Lance):
        rows.append({"scenario": "two writers + a reader", "kind": kind.name,
                     **concurrency(kind, work / kind.__name__)})
    rows.append(lock_removed(work))
    rows.append({"scenario": "lock file removed, second writer", "kind": LANCE, "ok": None,
                 "result": "no lock file: writers commit optimistically (see two writers + a reader)", "detail": ""})
    rows += cleanup_race(work)
    rows += [symlinked_data(kind, work) for kind in (_Own, _Lance)]
    rows += tampering(work, rng)
    for r in rows:  # the scratch folder's name says nothing
        r["result"], r["detail"] = (str(r[k]).replace(f"{work}/", "") for k in ("result", "detail"))
    return rows


if __name__ == "__main__":
    _child(sys.argv[1:])
