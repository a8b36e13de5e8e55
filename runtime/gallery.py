"""Crash-safe gallery store: memory-mapped segments, an atomically published manifest, exact FAISS search (DESIGN §6).

Layout of a gallery folder::

    GALLERY/gallery.json                  manifest: identity (dim, attributes, aam_shape, model, metric), count and
                                          the published segments with the sha256 and size of every file
    GALLERY/segments/<name>/embedding.npy float32 [n, C]      global embeddings (searched)
                           /attr.npy      float16 [n, M, C]   per-attribute embeddings (explained)
                           /probs.npy     float32 [n, M]      predicted P(label 1)
                           /aam.npy       float16 [n, M, h, w] attribute activation maps (only with ``aam_shape``)
                           /meta.jsonl    one JSON object per entry, with its ``"id"``
    GALLERY/.lock                         ``flock``-ed by the one writer

Publishing: an append validates its whole input first, writes the new segment into a hidden temporary folder
(``segments/.tmp-*``), fsyncs every file and the folder, renames it to its final name, then replaces ``gallery.json``
atomically (temporary file, fsync, ``os.replace``, fsync of the folder). Only segments listed in ``gallery.json``
exist for readers, so a writer killed at any point leaves the previous gallery intact; the next writer removes what
the dead one left. Published segments are never rewritten; :meth:`Gallery.compact` merges them into a new one and
deletes the old folders only after the manifest that no longer lists them is published.

Readers take no lock: they read ``gallery.json`` (old or new, never a mix) and memory-map the files it lists.
Within a process, searches may run while another thread appends: the entry list and the search index are swapped
together under a lock, so a search sees either the old or the new gallery.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import secrets
import shutil
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from attrimeter.runtime.errors import GalleryError, InputError, StorageError, UnknownIdError

__all__ = ["GALLERY_FORMAT", "GALLERY_VERSION", "MANIFEST_NAME", "METRICS", "Gallery"]

GALLERY_FORMAT = "attrimeter-gallery"
GALLERY_VERSION = 1
MANIFEST_NAME = "gallery.json"
METRICS = ("l2", "ip")

_SEGMENTS = "segments"
_LOCK = ".lock"
_TMP_PREFIX = ".tmp-"
_META = "meta.jsonl"
_MANIFEST_TMP = MANIFEST_NAME + ".tmp"
_DTYPES = {"embedding": np.dtype("<f4"), "attr": np.dtype("<f2"), "probs": np.dtype("<f4"), "aam": np.dtype("<f2")}
_FP16_MAX = float(np.finfo(np.float16).max)
_CHUNK = 1 << 20
# A memory map keeps a file descriptor open; many small segments (one per served "add") would exhaust them, so files
# below this size are read into memory instead.
_MMAP_MIN_BYTES = 1 << 20
_PROGRESS_MIN_BYTES = 64 << 20  # progress bars only for galleries large enough to take a while
_INDEX_ROWS = 1 << 16  # rows per FAISS add: bounds the temporary float32 copies
_COPY_BYTES = 64 << 20  # bytes per chunk when compacting
_GPU_MAX_K = 2048  # faiss-gpu's largest k
# Candidates beyond k that a search fetches first: usually enough for the exact re-ranking to settle the k-th place.
_RANK_MARGIN = 8


@dataclass(frozen=True)
class _Spec:
    """A gallery's identity: what every segment's arrays must look like."""

    dim: int
    attributes: tuple[str, ...]
    aam_shape: tuple[int, int] | None
    model: str
    metric: str

    def shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """The shape of each array file of a segment of ``n`` entries, keyed by file stem."""
        m = len(self.attributes)
        out = {"embedding": (n, self.dim), "attr": (n, m, self.dim), "probs": (n, m)}
        if self.aam_shape is not None:
            out["aam"] = (n, m, *self.aam_shape)
        return out

    def files(self) -> set[str]:
        """The names of a segment's files."""
        return {f"{key}.npy" for key in self.shapes(0)} | {_META}

    def header(self) -> dict[str, Any]:
        """The identity fields of the manifest."""
        return {"dim": self.dim, "attributes": list(self.attributes),
                "aam_shape": None if self.aam_shape is None else list(self.aam_shape), "model": self.model,
                "metric": self.metric}


class _MissingFile(GalleryError):
    """A segment file listed by the manifest is not there (possibly removed by a compaction since it was read)."""


class _SegmentGone(Exception):
    """A segment's metadata file disappeared after it was opened (a compaction published a new manifest)."""


class _Segment:
    """One published segment: its arrays (memory-mapped, or in memory when small) and its metadata lines."""

    def __init__(self, folder: Path, entry: Mapping[str, Any], arrays: dict[str, np.ndarray], meta: bytes | None):
        self.folder = folder
        self.entry = dict(entry)
        self.name: str = entry["name"]
        self.first_id: int = entry["first_id"]
        self.count: int = entry["count"]
        self.arrays = arrays
        self._meta = meta  # the whole meta.jsonl of a small segment; large ones are read line by line
        self._offsets: np.ndarray | None = None
        self._lock = threading.Lock()

    def offsets(self) -> np.ndarray:
        """Byte offset of every line of ``meta.jsonl`` plus its end ([count + 1]); checks the line count."""
        with self._lock:
            if self._offsets is None:
                file = self.folder / _META
                if self._meta is not None:
                    ends = _newlines([self._meta])
                else:
                    try:
                        with open(file, "rb") as fh:
                            ends = _newlines(iter(lambda: fh.read(_CHUNK), b""))
                    except FileNotFoundError as e:
                        raise _SegmentGone(str(file)) from e
                size = self.entry["sizes"][_META]
                if len(ends) != self.count or (self.count and ends[-1] != size - 1):
                    raise GalleryError(f"{file}: holds {len(ends)} complete lines, the manifest records {self.count}")
                self._offsets = np.concatenate([[0], ends + 1]).astype(np.int64)
            return self._offsets

    def meta(self, local: np.ndarray) -> list[dict[str, Any]]:
        """The metadata of the entries at the segment-local positions ``local``."""
        offsets = self.offsets()
        file = self.folder / _META
        if self._meta is not None:
            lines = [self._meta[offsets[i]:offsets[i + 1]] for i in local]
        else:
            try:
                with open(file, "rb") as fh:
                    lines = []
                    for i in local:
                        fh.seek(offsets[i])
                        lines.append(fh.read(offsets[i + 1] - offsets[i]))
            except FileNotFoundError as e:
                raise _SegmentGone(str(file)) from e
        out = []
        for i, line in zip(local, lines, strict=True):
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise GalleryError(f"{file}: line {i + 1} is not JSON ({e})") from e
            if not isinstance(obj, dict) or obj.get("id") != self.first_id + int(i):
                raise GalleryError(f"{file}: line {i + 1} is not the metadata of gallery id {self.first_id + int(i)}")
            out.append(obj)
        return out


@dataclass(frozen=True)
class _State:
    """An immutable view of the published gallery: swapped as a whole, so readers never see half an append."""

    raw: bytes  # the manifest bytes it was read from
    entries: tuple[dict[str, Any], ...]
    segments: tuple[_Segment, ...]
    first_ids: np.ndarray
    count: int


_EMPTY = _State(b"", (), (), np.zeros(0, np.int64), 0)


class _HashingFile:
    """A new file that hashes and counts what is written to it; ``finish`` flushes and fsyncs it."""

    def __init__(self, path: Path, bar: Any):
        self.path = path
        self._fh = open(path, "xb")
        self._sha = hashlib.sha256()
        self._bar = bar
        self.size = 0
        self.rows = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self._fh.write(view)
        self.size += len(view)
        self._bar.update(len(view))
        return len(view)

    def finish(self) -> str:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._fh.close()


class Gallery:
    """A gallery of embedded person crops: append-only, crash-safe, memory-mapped, searched exactly with FAISS.

    Create one with :meth:`create`, open one with :meth:`open`. Ids are consecutive int64 from 0 in append order and
    never change (not even by :meth:`compact`). A gallery opened ``writable`` holds the folder's writer lock until
    :meth:`close`; readers take no lock and see another process's appends after :meth:`refresh`.
    """

    def __init__(self, path: Path, spec: _Spec, state: _State, *, lock_fd: int | None, verify: bool, progress: bool):
        """Use :meth:`create` or :meth:`open`."""
        self.path = path
        self._spec = spec
        self._state = state
        self._verify_new = verify
        self._progress = progress
        self._lock = threading.Lock()  # appends, refreshes, compaction
        self._index_lock = threading.Lock()  # the FAISS index and the state swap
        self._index: Any = None
        self._closed = False
        self._release = weakref.finalize(self, os.close, lock_fd) if lock_fd is not None else None

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: str | Path, *, dim: int, attributes: Sequence[str], aam_shape: tuple[int, int] | None,
               model: str, metric: str = "l2") -> Gallery:
        """Create an empty gallery in a new or empty folder and open it writable.

        Args:
            path: The gallery folder (created if missing; must not hold anything but an old lock file).
            dim: Embedding width C.
            attributes: Attribute names (M of them), in the model's order.
            aam_shape: ``(h, w)`` of the stored attribute activation maps, or ``None`` to store none.
            model: Identity of the model that embeds the gallery (the export's source sha256).
            metric: ``"l2"`` (Euclidean) or ``"ip"`` (cosine ranking).

        Returns:
            The writable, empty gallery.

        Raises:
            InputError: A bad argument.
            GalleryError: The folder already holds something, or another writer holds its lock.
        """
        spec = _make_spec(dim, attributes, aam_shape, model, metric)
        root = Path(path)
        try:
            (root / _SEGMENTS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GalleryError(f"{root}: cannot create a gallery here ({e})") from e
        fd = _lock(root)
        try:
            if (root / MANIFEST_NAME).exists():
                raise GalleryError(f"{root / MANIFEST_NAME}: the folder already holds a gallery")
            others = sorted(p.name for p in root.iterdir() if p.name not in (_LOCK, _SEGMENTS, _MANIFEST_TMP))
            others += [f"{_SEGMENTS}/{p.name}" for p in (root / _SEGMENTS).iterdir()]
            if others:
                raise GalleryError(f"{root}: not empty ({', '.join(others[:3])}); a gallery is created in a new folder")
            raw = _publish(root, _manifest(spec, [], 0))
        except BaseException:
            os.close(fd)
            raise
        state = _State(raw, (), (), np.zeros(0, np.int64), 0)
        return cls(root, spec, state, lock_fd=fd, verify=True, progress=True)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, writable: bool = False, progress: bool = True) -> Gallery:
        """Open a gallery, checking every segment file's size, dtype and shape (and with ``verify`` its sha256).

        Args:
            path: The gallery folder.
            verify: Also check the sha256 of every file (reads the whole gallery once).
            writable: Take the writer lock, so that :meth:`append` and :meth:`compact` may be called; also removes
                what crashed appends left behind.
            progress: Show progress bars for large galleries.

        Returns:
            The gallery.

        Raises:
            GalleryError: Missing, foreign, corrupt or truncated store (the message names the file), or ``writable``
                while another writer holds the lock.
        """
        root = Path(path)
        if not (root / MANIFEST_NAME).is_file():
            raise GalleryError(f"{root / MANIFEST_NAME}: no gallery here (the manifest is missing)")
        fd = _lock(root) if writable else None
        try:
            spec = _spec_of(_read_manifest(root)[0])
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        gallery = cls(root, spec, _EMPTY, lock_fd=fd, verify=verify, progress=progress)
        try:
            gallery._state = gallery._read_state(None)
            if writable:
                gallery._remove_leftovers()
        except BaseException:
            gallery.close()
            raise
        return gallery

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Embedding width C."""
        return self._spec.dim

    @property
    def attributes(self) -> tuple[str, ...]:
        """Attribute names, in the model's order."""
        return self._spec.attributes

    @property
    def aam_shape(self) -> tuple[int, int] | None:
        """``(h, w)`` of the stored activation maps, or ``None``."""
        return self._spec.aam_shape

    @property
    def model(self) -> str:
        """Identity of the model that embedded the gallery."""
        return self._spec.model

    @property
    def metric(self) -> str:
        """``"l2"`` or ``"ip"``."""
        return self._spec.metric

    @property
    def writable(self) -> bool:
        """Whether this handle holds the writer lock."""
        return self._release is not None and self._release.alive

    @property
    def segments(self) -> int:
        """Number of published segments (each append adds one; :meth:`compact` merges them)."""
        return len(self._state.segments)

    def __len__(self) -> int:
        return self._state.count

    def __repr__(self) -> str:
        return (f"Gallery({str(self.path)!r}, {len(self)} entries, {self.segments} segments, dim={self.dim}, "
                f"metric={self.metric!r})")

    # ------------------------------------------------------------------ writing

    def append(self, embedding: np.ndarray, attr_embeddings: np.ndarray, probs: np.ndarray,
               meta: Sequence[Mapping[str, Any]], aam: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
        """Append entries as one new segment, published atomically; on any error nothing is written.

        Args:
            embedding: Global embeddings, floating [n, C] (stored float32).
            attr_embeddings: Per-attribute embeddings, floating [n, M, C] (stored float16).
            probs: Predicted P(label 1), floating [n, M] in [0, 1] (stored float32).
            meta: One JSON-able mapping per entry (e.g. key, path, camera); ``"id"`` is added by the store.
            aam: Attribute activation maps, floating [n, M, h, w] (stored float16); required exactly when the gallery
                has an ``aam_shape``.
            progress: Show a progress bar while writing.

        Returns:
            The new entries' ids, int64 [n], consecutive from the previous length.

        Raises:
            InputError: Bad shapes, dtypes, non-finite or out-of-range values, or metadata that is not JSON-able.
            GalleryError: The gallery is read-only or closed, or writing failed (nothing was published).
        """
        self._check_writable()
        arrays, bodies = self._validate(embedding, attr_embeddings, probs, meta, aam)
        n = len(bodies)
        with self._lock:
            self._sync_for_write()
            first = self._state.count
            if n == 0:
                return np.zeros(0, np.int64)
            lines = "".join(f'{{"id":{first + i}' + ("," + body[1:] if body != "{}" else "}") + "\n"
                            for i, body in enumerate(bodies)).encode()
            chunks = [*arrays.items(), (_META, lines)]
            self._publish_segment(first, n, chunks, list(self._state.entries), progress=progress, desc="append")
        return np.arange(first, first + n, dtype=np.int64)

    def compact(self, progress: bool = True) -> None:
        """Merge all segments into one (ids and contents unchanged), then delete the old segment folders.

        Readers that opened the gallery before keep working on what they have memory-mapped and pick the merged
        segment up on :meth:`refresh` (metadata reads refresh by themselves).

        Args:
            progress: Show a progress bar for large galleries.

        Raises:
            GalleryError: The gallery is read-only or closed, or writing failed (the old segments stay published).
        """
        self._check_writable()
        with self._lock:
            self._sync_for_write()
            state = self._state
            if len(state.segments) <= 1:
                return
            old = [s.folder for s in state.segments]
            large = sum(e["bytes"] for e in state.entries) >= _PROGRESS_MIN_BYTES
            self._publish_segment(0, state.count, _segment_chunks(state.segments), [], progress=progress and large,
                                  desc="compact")
            for folder in old:
                shutil.rmtree(folder, ignore_errors=True)  # anything left is removed by the next writer's open

    def _publish_segment(self, first: int, n: int, chunks: Iterable[tuple[str, Any]], entries: list[dict[str, Any]],
                         *, progress: bool, desc: str) -> None:
        """Write a segment of ids [first, first + n), publish ``entries`` + it, and install the new state."""
        segments_dir = self.path / _SEGMENTS
        name = f"{first:012d}-{secrets.token_hex(4)}"
        tmp, final = segments_dir / f"{_TMP_PREFIX}{name}", segments_dir / name
        manifest_tmp = self.path / _MANIFEST_TMP
        total = sum(int(np.prod(s)) * _DTYPES[k].itemsize for k, s in self._spec.shapes(n).items())
        renamed = False
        try:
            with tqdm(total=total, desc=f"{desc} {self.path.name}", unit="B", unit_scale=True, leave=False,
                      disable=not progress) as bar:
                files, sizes = _write_segment(tmp, self._spec.shapes(n), chunks, bar)
            os.rename(tmp, final)
            renamed = True
            _fsync_dir(segments_dir)
            entry = {"name": name, "count": n, "first_id": first, "files": files, "sizes": sizes,
                     "bytes": sum(sizes.values())}
            raw = _write_manifest_tmp(manifest_tmp, _manifest(self._spec, [*entries, entry], first + n))
            os.replace(manifest_tmp, self.path / MANIFEST_NAME)
        except BaseException as e:
            # An interrupt (Ctrl-C) can land after os.replace published the manifest: never delete a listed folder.
            published = renamed and f'"{name}"' in _manifest_text(self.path)
            for leftover in (tmp, final if renamed and not published else None, manifest_tmp):
                if leftover is not None:
                    _remove(leftover)
            if isinstance(e, OSError) and not published:
                raise StorageError(f"{self.path}: {desc} failed, nothing was published ({e})") from e
            raise
        _fsync_dir(self.path)
        self._install(self._load_state(json.loads(raw), raw, self._state, verify=False))

    def _validate(self, embedding: Any, attr_embeddings: Any, probs: Any, meta: Any,
                  aam: Any) -> tuple[dict[str, np.ndarray], list[str]]:
        """Check and convert an append's input: (arrays in storage dtype by file stem, JSON body of each meta)."""
        if not isinstance(embedding, np.ndarray) or embedding.ndim != 2:
            raise InputError(f"embedding must be a 2-D numpy array [n, {self.dim}], got {_describe(embedding)}")
        n = embedding.shape[0]
        shapes = self._spec.shapes(n)
        given = {"embedding": embedding, "attr": attr_embeddings, "probs": probs}
        names = {"embedding": "embedding", "attr": "attr_embeddings", "probs": "probs", "aam": "aam"}
        if self.aam_shape is not None:
            if aam is None:
                raise InputError(f"this gallery stores activation maps: aam [n, M, {self.aam_shape[0]}, "
                                 f"{self.aam_shape[1]}] is required")
            given["aam"] = aam
        elif aam is not None:
            raise InputError("this gallery stores no activation maps (created with aam_shape=None): pass aam=None")
        arrays = {}
        for key, value in given.items():
            name, shape = names[key], shapes[key]
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                raise InputError(f"{name} must be a floating-point numpy array, got {_describe(value)}")
            if value.shape != shape:
                raise InputError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
            if not np.isfinite(value).all():
                raise InputError(f"{name} holds NaN or infinite values")
            with np.errstate(over="ignore"):  # overflow is reported just below, by name
                out = np.ascontiguousarray(value, dtype=_DTYPES[key])
            if not np.isfinite(out).all():
                raise InputError(f"{name} overflows {out.dtype.name} (largest magnitude {_FP16_MAX:g})")
            arrays[key] = out
        if ((arrays["probs"] < 0) | (arrays["probs"] > 1)).any():
            raise InputError("probs must lie in [0, 1]")
        if isinstance(meta, (str, bytes)) or not isinstance(meta, Sequence):
            raise InputError(f"meta must be a sequence of mappings, got {type(meta).__name__}")
        if len(meta) != n:
            raise InputError(f"meta has {len(meta)} entries for {n} embeddings")
        bodies = []
        for i, m in enumerate(meta):
            if not isinstance(m, Mapping) or not all(isinstance(k, str) for k in m):
                raise InputError(f"meta[{i}] must be a mapping with string keys, got {type(m).__name__}")
            if "id" in m:
                raise InputError(f"meta[{i}] has an 'id': the gallery assigns ids")
            try:
                bodies.append(json.dumps(dict(m), allow_nan=False, separators=(",", ":"), default=_json_default))
            except (TypeError, ValueError) as e:
                raise InputError(f"meta[{i}] is not JSON-serialisable: {e}") from e
        return arrays, bodies

    def _sync_for_write(self) -> None:
        """Under the writer lock: adopt the manifest on disk if it changed, then drop what crashed writers left."""
        if _read_manifest(self.path)[1] != self._state.raw:
            self._install(self._checked_successor(self._read_state(self._state)))
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete unpublished segment folders and manifest temporaries (only the lock holder may)."""
        listed = {s.name for s in self._state.segments}
        for child in (self.path / _SEGMENTS).iterdir():
            if child.name not in listed:
                _remove(child)
        _remove(self.path / _MANIFEST_TMP)

    # ------------------------------------------------------------------ reading

    def refresh(self) -> int:
        """Pick up segments another process published since this handle read the manifest.

        New segments are checked like at :meth:`open` (sha256 too when the gallery was opened with ``verify``).

        Returns:
            The number of entries now.

        Raises:
            GalleryError: The manifest or a new segment is corrupt, or the folder now holds another gallery.
        """
        self._check_open()
        with self._lock:
            self._install(self._checked_successor(self._read_state(self._state)))
            return self._state.count

    def verify(self) -> None:
        """Check the sha256 of every file of every published segment and the line count of the metadata.

        Raises:
            GalleryError: A mismatch, naming the file.
        """
        self._check_open()
        segments = self._state.segments
        total = sum(s.entry["bytes"] for s in segments)
        with tqdm(total=total, desc=f"verify {self.path.name}", unit="B", unit_scale=True, leave=False,
                  disable=not self._progress or total < _PROGRESS_MIN_BYTES) as bar:
            for segment in segments:
                _verify_segment(segment, bar)

    def embeddings(self, ids: Any) -> np.ndarray:
        """Global embeddings of gallery entries.

        Args:
            ids: Gallery ids (an int or a 1-D sequence of ints).

        Returns:
            float32 [len(ids), C].

        Raises:
            UnknownIdError: An id the gallery does not hold.
            InputError: Ids that are not integers.
        """
        return self._gather(ids, "embedding", np.float32)

    def attr_embeddings(self, ids: Any) -> np.ndarray:
        """Per-attribute embeddings of gallery entries (stored float16): float32 [len(ids), M, C].

        Args:
            ids: Gallery ids.

        Returns:
            float32 [len(ids), M, C].
        """
        return self._gather(ids, "attr", np.float32)

    def probs(self, ids: Any) -> np.ndarray:
        """Predicted P(label 1) per attribute of gallery entries: float32 [len(ids), M].

        Args:
            ids: Gallery ids.

        Returns:
            float32 [len(ids), M].
        """
        return self._gather(ids, "probs", np.float32)

    def aam(self, ids: Any) -> np.ndarray | None:
        """Attribute activation maps of gallery entries (stored float16), or ``None`` when the gallery has none.

        Args:
            ids: Gallery ids.

        Returns:
            float32 [len(ids), M, h, w], or ``None``.
        """
        if self.aam_shape is None:
            self._locate(ids)  # still refuse unknown ids
            return None
        return self._gather(ids, "aam", np.float32)

    def meta(self, ids: Any) -> list[dict[str, Any]]:
        """Metadata of gallery entries, each with its ``"id"``.

        Args:
            ids: Gallery ids.

        Returns:
            One dict per id, in the order of ``ids``.
        """
        try:
            return self._meta(ids)
        except _SegmentGone:
            self.refresh()  # a compaction replaced the segments this handle had opened
            return self._meta(ids)

    def _meta(self, ids: Any) -> list[dict[str, Any]]:
        state, idx, seg, local = self._locate(ids)
        out: list[Any] = [None] * len(idx)
        for s in np.unique(seg):
            where = np.flatnonzero(seg == s)
            for j, obj in zip(where, state.segments[s].meta(local[where]), strict=True):
                out[j] = obj
        return out

    def attr_chunks(self, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """Walk all entries' per-attribute embeddings in order, for exact scans.

        Args:
            chunk: Most entries per chunk (chunks do not cross segments).

        Returns:
            An iterator of ``(first id, float16 view [n, M, C])`` over consecutive entries (read-only views,
            memory-mapped when large).

        Raises:
            InputError: ``chunk`` is not a positive integer.
        """
        self._check_open()
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise InputError(f"chunk must be a positive integer, got {chunk!r}")
        return _chunks(self._state.segments, int(chunk))  # checked now, walked lazily over this snapshot

    def _gather(self, ids: Any, key: str, dtype: type) -> np.ndarray:
        state, idx, seg, local = self._locate(ids)
        out = np.empty((len(idx), *self._spec.shapes(0)[key][1:]), dtype)
        for s in np.unique(seg):
            where = seg == s
            out[where] = state.segments[s].arrays[key][local[where]]
        return out

    def _locate(self, ids: Any) -> tuple[_State, np.ndarray, np.ndarray, np.ndarray]:
        """(state snapshot, ids int64, segment index of each, position within its segment)."""
        self._check_open()
        state = self._state
        idx = _as_ids(ids, state.count)
        seg = np.searchsorted(state.first_ids, idx, side="right") - 1
        return state, idx, seg, idx - state.first_ids[seg]

    # ------------------------------------------------------------------ search

    def load_index(self) -> None:
        """Build the FAISS index now (it is otherwise built by the first :meth:`search`)."""
        self._check_open()
        faiss = _faiss()
        with self._index_lock:
            self._ensure_index(faiss)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-nearest-neighbour search over the global embeddings.

        Metric ``"l2"`` ranks by Euclidean distance; ``"ip"`` ranks by cosine similarity. Either way the distances
        returned are the Euclidean distances between the raw query and gallery vectors, recomputed from the stored
        vectors: FAISS's ``|q|² + |x|² - 2 q·x`` loses the small distances of near-duplicates to cancellation.
        See :meth:`rank` for how ties are broken.

        Args:
            queries: float32 [Q, C], finite.
            k: Neighbours per query (> 0); fewer are returned when the gallery is smaller.

        Returns:
            ``(distances float32 [Q, k'], ids int64 [Q, k'])`` with ``k' = min(k, len(self))``, best first.

        Raises:
            InputError: Bad queries or ``k``.
        """
        _, dist, ids = self.rank(queries, k)
        return dist, ids

    def rank(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search` with its ranking keys: the exact top-k by key, ties by the lower id.

        FAISS proposes candidates by its float32 scores; they are re-ranked by exact keys recomputed row by row from
        the stored vectors (the same value for an entry wherever it is stored, so that shards of a gallery rank like
        the whole), and more are fetched until FAISS's rounding cannot have left out an entry that belongs to the k
        best or ties with the k-th (FAISS's own choice among tied entries is arbitrary for inner products).

        Args:
            queries: float32 [Q, C], finite.
            k: Neighbours per query (> 0).

        Returns:
            ``(keys float64 [Q, k'] ascending: the distance for "l2", −cosine for "ip"; distances float32 [Q, k'];
            ids int64 [Q, k'])``.

        Raises:
            InputError: Bad queries or ``k``.
        """
        self._check_open()
        q = _check_queries(queries, self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InputError(f"k must be a positive integer, got {k!r}")
        faiss = _faiss()
        with self._index_lock:
            total, gpu = self._ensure_index(faiss).ntotal, faiss.get_num_gpus() > 0
        kk = min(int(k), total)
        if kk == 0 or len(q) == 0:
            return np.zeros((len(q), kk)), np.zeros((len(q), kk), np.float32), np.zeros((len(q), kk), np.int64)
        if kk > _GPU_MAX_K and gpu:
            raise InputError(f"k must be at most {_GPU_MAX_K} on a GPU index, got {k}")
        fetch = min(total, kk + _RANK_MARGIN, _GPU_MAX_K if gpu else total)
        while True:
            with self._index_lock:  # for "ip", q·(x/|x|) ranks like the cosine: q needs no normalising
                scores, ids = self._ensure_index(faiss).search(q, fetch)
            ids = ids.astype(np.int64)  # ids only ever grow (compaction keeps them): the gathers need no lock
            keys, dist = self._exact_keys(q, ids)
            order = np.lexsort((ids, keys), axis=1)
            keys, dist, ids = (np.take_along_axis(a, order, 1) for a in (keys, dist, ids))
            grown = min(total, 2 * fetch, _GPU_MAX_K if gpu else total)
            if fetch == total or grown == fetch or self._settled(q, keys[:, kk - 1], scores[:, -1]):
                return keys[:, :kk], dist[:, :kk], ids[:, :kk]
            fetch = grown

    def _exact_keys(self, q: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ranking keys float64, Euclidean distances float32) of candidates ``ids`` [Q, n], row by row."""
        keys, dist = np.empty(ids.shape), np.empty(ids.shape, np.float32)
        n = ids.shape[1]
        rows = max(1, _COPY_BYTES // (n * self.dim * 4))
        for a in range(0, len(q), rows):
            x = self.embeddings(ids[a:a + rows].ravel()).reshape(-1, n, self.dim)
            dist[a:a + rows] = np.linalg.norm(x - q[a:a + rows, None], axis=2)
            if self.metric == "ip":  # reductions along each row only: an entry's key does not depend on its batch
                x64, q64 = x.astype(np.float64), q[a:a + rows, None].astype(np.float64)
                norms = np.sqrt((x64 * x64).sum(-1)) * np.sqrt((q64 * q64).sum(-1))
                keys[a:a + rows] = -(x64 * q64).sum(-1) / np.maximum(norms, 1e-300)
        return (dist.astype(np.float64) if self.metric == "l2" else keys), dist

    def _settled(self, q: np.ndarray, kth: np.ndarray, last: np.ndarray) -> bool:
        """Whether no entry FAISS did not return can rank before or tie with the k-th exact key of each query.

        Bounds of FAISS's float32 error (``γ = 4·C·ε``): an unreturned entry scored at least ``last`` (its squared
        distance) or at most ``last`` (its inner product with the query).
        """
        gamma = 4 * self.dim * float(np.finfo(np.float32).eps)
        q_sq = (q.astype(np.float64) ** 2).sum(1)
        if self.metric == "l2":  # d'² ≥ last − γ(|q|² + |x'|²), |x'|² ≤ 2|q|² + 2d'²
            bound = (last - 3 * gamma * q_sq) / (1 + 2 * gamma)
            return bool((kth * kth * (1 + gamma) < bound).all())
        q_norm = np.sqrt(q_sq)  # cos' ≤ (last + γ|q|) / |q| + γ (the stored unit vectors' rounding)
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = np.where(q_norm > 0, last / q_norm + 2 * gamma, np.inf)
        return bool((-kth > bound).all())

    def _ensure_index(self, faiss: Any) -> Any:
        """The FAISS index, built from all entries on first use (call under ``_index_lock``)."""
        if self._index is None:
            index = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
            if faiss.get_num_gpus() > 0:
                index = faiss.index_cpu_to_all_gpus(index)
            self._add_to_index(index, self._state, 0)
            self._index = index
        return self._index

    def _add_to_index(self, index: Any, state: _State, start: int) -> None:
        """Add the embeddings of ids [start, state.count) to ``index`` (unit vectors for ``"ip"``)."""
        rows = state.count - start
        with tqdm(total=rows, desc=f"index {self.path.name}", unit="entry", leave=False,
                  disable=not self._progress or rows * self.dim * 4 < _PROGRESS_MIN_BYTES) as bar:
            for segment in state.segments:
                lo = max(start - segment.first_id, 0)
                for a in range(lo, segment.count, _INDEX_ROWS):
                    x = np.ascontiguousarray(segment.arrays["embedding"][a:a + _INDEX_ROWS], dtype=np.float32)
                    index.add(x if self.metric == "l2" else _unit(x))
                    bar.update(len(x))

    # ------------------------------------------------------------------ state

    def _read_state(self, previous: _State | None) -> _State:
        """Read the manifest and open its segments, retrying if a compaction replaced them meanwhile."""
        while True:
            doc, raw = _read_manifest(self.path)
            if previous is not None and raw == previous.raw:
                return previous
            if _spec_of(doc) != self._spec:
                raise GalleryError(f"{self.path / MANIFEST_NAME}: now describes another gallery (dim, attributes, "
                                   "model or metric changed); open it again")
            try:
                return self._load_state(doc, raw, previous, verify=self._verify_new)
            except _MissingFile:
                if _read_manifest(self.path)[1] == raw:
                    raise

    def _load_state(self, doc: dict[str, Any], raw: bytes, previous: _State | None, *, verify: bool) -> _State:
        """Open the segments of a checked manifest, reusing those already open in ``previous``."""
        known = {s.name: s for s in previous.segments} if previous is not None else {}
        entries = tuple(doc["segments"])
        fresh = [e for e in entries if e["name"] not in known or known[e["name"]].entry != e]
        total = sum(e["bytes"] for e in fresh)
        segments = []
        with tqdm(total=total, desc=f"{'verify' if verify else 'open'} {self.path.name}", unit="B", unit_scale=True,
                  leave=False, disable=not self._progress or total < _PROGRESS_MIN_BYTES) as bar:
            for entry in entries:
                segment = known.get(entry["name"])
                if segment is None or segment.entry != entry:
                    segment = _open_segment(self.path, entry, self._spec)
                    if verify:
                        _verify_segment(segment, bar)
                segments.append(segment)
        first_ids = np.array([e["first_id"] for e in entries], np.int64)
        return _State(raw, entries, tuple(segments), first_ids, doc["count"])

    def _checked_successor(self, new: _State) -> _State:
        if new.count < self._state.count:
            raise GalleryError(f"{self.path / MANIFEST_NAME}: the gallery shrank from {self._state.count} to "
                               f"{new.count} entries (replaced by another gallery?); open it again")
        return new

    def _install(self, new: _State) -> None:
        """Swap in a new state and extend the search index to it, atomically for searches."""
        with self._index_lock:
            if self._index is not None and new.count > self._index.ntotal:
                self._add_to_index(self._index, new, self._index.ntotal)
            self._state = new

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryError(f"{self.path}: the gallery is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise GalleryError(f"{self.path}: opened read-only; open it with writable=True to change it")

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Release the writer lock, the index and the memory maps (idempotent)."""
        with self._lock, self._index_lock:
            self._closed = True
            self._index = None
            self._state = _EMPTY
            if self._release is not None:
                self._release()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError("gallery search needs FAISS: pip install faiss-cpu (or faiss-gpu on a CUDA box)") from e
    return faiss


def _make_spec(dim: Any, attributes: Any, aam_shape: Any, model: Any, metric: Any) -> _Spec:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise InputError(f"dim must be a positive integer, got {dim!r}")
    if isinstance(attributes, str) or not isinstance(attributes, Sequence) or not attributes:
        raise InputError("attributes must be a non-empty sequence of names")
    if not all(isinstance(a, str) and a for a in attributes) or len(set(attributes)) != len(attributes):
        raise InputError(f"attributes must be distinct non-empty strings, got {list(attributes)!r}")
    if aam_shape is not None:
        if (not isinstance(aam_shape, Sequence) or len(aam_shape) != 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in aam_shape)):
            raise InputError(f"aam_shape must be (h, w) of positive integers or None, got {aam_shape!r}")
        aam_shape = (int(aam_shape[0]), int(aam_shape[1]))
    if not isinstance(model, str):
        raise InputError(f"model must be a string (the export's source sha256), got {type(model).__name__}")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return _Spec(int(dim), tuple(attributes), aam_shape, model, metric)


def _manifest(spec: _Spec, entries: list[dict[str, Any]], count: int) -> dict[str, Any]:
    return {"format": GALLERY_FORMAT, "version": GALLERY_VERSION, **spec.header(), "count": count,
            "segments": entries}


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _read_manifest(root: Path) -> tuple[dict[str, Any], bytes]:
    """Read and check ``gallery.json``: (document, raw bytes)."""
    file = root / MANIFEST_NAME
    try:
        raw = file.read_bytes()
    except FileNotFoundError as e:
        raise GalleryError(f"{file}: no gallery here (the manifest is missing)") from e
    except OSError as e:
        raise GalleryError(f"{file}: unreadable ({e})") from e
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise GalleryError(f"{file}: not a gallery manifest ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != GALLERY_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise GalleryError(f"{file}: not an AttriMeter gallery manifest (format {found!r}, expected "
                           f"{GALLERY_FORMAT!r})")
    if doc.get("version") != GALLERY_VERSION:
        raise GalleryError(f"{file}: gallery format version {doc.get('version')!r} is not supported (this runtime "
                           f"reads version {GALLERY_VERSION})")
    try:
        spec = _spec_of(doc)
    except (InputError, KeyError, TypeError) as e:
        raise GalleryError(f"{file}: bad gallery identity ({e})") from e
    segments = doc.get("segments")
    if not isinstance(segments, list) or not _is_int(doc.get("count")):
        raise GalleryError(f"{file}: malformed (count and segments are required)")
    expected, first, names = spec.files(), 0, set()
    for i, e in enumerate(segments):
        ok = (isinstance(e, dict) and isinstance(e.get("name"), str) and _safe_name(e["name"])
              and e["name"] not in names and _is_int(e.get("count"), 1) and e.get("first_id") == first
              and isinstance(e.get("files"), dict) and set(e["files"]) == expected
              and all(isinstance(h, str) and len(h) == 64 for h in e["files"].values())
              and isinstance(e.get("sizes"), dict) and set(e["sizes"]) == expected
              and all(_is_int(s) for s in e["sizes"].values()) and e.get("bytes") == sum(e["sizes"].values()))
        if not ok:
            raise GalleryError(f"{file}: segment {i} is malformed or out of order")
        names.add(e["name"])
        first += e["count"]
    if first != doc["count"]:
        raise GalleryError(f"{file}: count {doc['count']} does not match its segments ({first} entries)")
    return doc, raw


def _spec_of(doc: Mapping[str, Any]) -> _Spec:
    aam_shape = doc["aam_shape"]
    return _make_spec(doc["dim"], doc["attributes"], None if aam_shape is None else tuple(aam_shape), doc["model"],
                      doc["metric"])


def _safe_name(name: str) -> bool:
    """A plain folder name: no path separators, no hidden name, nothing a file system refuses (NUL, controls)."""
    return (bool(name) and len(name) <= 255 and name.isprintable() and not name.startswith(".")
            and "/" not in name and "\\" not in name)


def _open_segment(root: Path, entry: Mapping[str, Any], spec: _Spec) -> _Segment:
    """Open a listed segment: every file present with its recorded size, every array with the right dtype/shape."""
    folder = root / _SEGMENTS / entry["name"]
    for name, size in entry["sizes"].items():
        file = folder / name
        try:
            actual = file.stat().st_size
        except FileNotFoundError as e:
            raise _MissingFile(f"{file}: missing (listed in {MANIFEST_NAME})") from e
        except OSError as e:
            raise GalleryError(f"{file}: unreadable ({e})") from e
        if actual != size:
            raise GalleryError(f"{file}: {actual} bytes, the manifest records {size} (truncated or replaced)")
    arrays = {}
    for key, shape in spec.shapes(entry["count"]).items():
        file = folder / f"{key}.npy"
        try:
            if entry["sizes"][file.name] >= _MMAP_MIN_BYTES:
                arr = np.load(file, mmap_mode="r", allow_pickle=False)
            else:
                arr = np.load(file, allow_pickle=False)
                arr.flags.writeable = False
        except FileNotFoundError as e:
            raise _MissingFile(f"{file}: missing (listed in {MANIFEST_NAME})") from e
        except (OSError, ValueError) as e:
            raise GalleryError(f"{file}: unreadable ({e})") from e
        if arr.dtype != _DTYPES[key] or arr.shape != shape or not arr.flags.c_contiguous:
            raise GalleryError(f"{file}: holds {arr.dtype} {list(arr.shape)}, expected {_DTYPES[key]} {list(shape)}")
        arrays[key] = arr
    meta = None
    if entry["sizes"][_META] < _MMAP_MIN_BYTES:
        try:
            meta = (folder / _META).read_bytes()
        except FileNotFoundError as e:
            raise _MissingFile(f"{folder / _META}: missing (listed in {MANIFEST_NAME})") from e
        except OSError as e:
            raise GalleryError(f"{folder / _META}: unreadable ({e})") from e
    segment = _Segment(folder, entry, arrays, meta)
    if meta is not None:
        segment.offsets()  # cheap for small files: check the line count now
    return segment


def _verify_segment(segment: _Segment, bar: Any) -> None:
    for name, expected in segment.entry["files"].items():
        file = segment.folder / name
        digest = hashlib.sha256()
        try:
            with open(file, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
                    bar.update(len(chunk))
        except OSError as e:
            raise GalleryError(f"{file}: unreadable ({e})") from e
        if digest.hexdigest() != expected:
            raise GalleryError(f"{file}: sha256 {digest.hexdigest()[:16]}… does not match the manifest's "
                               f"{expected[:16]}… (corrupt or modified)")
    try:
        segment.offsets()
    except _SegmentGone as e:
        raise _MissingFile(f"{e}: missing (listed in {MANIFEST_NAME})") from e


def _chunks(segments: Sequence[_Segment], chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    for segment in segments:
        attr = segment.arrays["attr"]
        for a in range(0, segment.count, chunk):
            yield segment.first_id + a, attr[a:a + chunk]


def _manifest_text(root: Path) -> str:
    """The manifest as text, or "" when it cannot be read (used only to decide what a failed write may delete)."""
    try:
        return (root / MANIFEST_NAME).read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _newlines(chunks: Iterable[bytes]) -> np.ndarray:
    """Positions of every newline byte in the concatenation of ``chunks``."""
    out, base = [], 0
    for chunk in chunks:
        out.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A) + base)
        base += len(chunk)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _write_segment(folder: Path, shapes: Mapping[str, tuple[int, ...]], chunks: Iterable[tuple[str, Any]],
                   bar: Any) -> tuple[dict[str, str], dict[str, int]]:
    """Write a segment's files, fsynced, from ``(file stem or meta name, array rows or bytes)`` chunks.

    Returns:
        ``({file: sha256}, {file: size})``.
    """
    folder.mkdir()
    writers: dict[str, _HashingFile] = {}
    try:
        for key, shape in shapes.items():
            writers[key] = _HashingFile(folder / f"{key}.npy", bar)
            header = {"descr": np.lib.format.dtype_to_descr(_DTYPES[key]), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(writers[key], header)
        writers[_META] = _HashingFile(folder / _META, bar)
        for key, data in chunks:
            writer = writers[key]
            if key == _META:
                writer.rows += data.count(b"\n")
                writer.write(data)
            else:
                writer.rows += len(data)
                writer.write(np.ascontiguousarray(data, dtype=_DTYPES[key]))
        n = next(iter(shapes.values()))[0]
        short = [w.path.name for w in writers.values() if w.rows != n]
        if short:
            raise RuntimeError(f"segment writer got the wrong number of rows for {', '.join(short)}")
        files, sizes = {}, {}
        for writer in writers.values():
            files[writer.path.name] = writer.finish()
            sizes[writer.path.name] = writer.size
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    _fsync_dir(folder)
    return files, sizes


def _segment_chunks(segments: Sequence[_Segment]) -> Iterator[tuple[str, Any]]:
    """The contents of ``segments``, in order, as bounded chunks for :func:`_write_segment`."""
    for segment in segments:
        for key, arr in segment.arrays.items():
            rows = max(1, _COPY_BYTES // max(1, arr[:1].nbytes))
            for a in range(0, len(arr), rows):
                yield key, arr[a:a + rows]
        if segment._meta is not None:
            yield _META, segment._meta
        else:
            with open(segment.folder / _META, "rb") as fh:
                while data := fh.read(_COPY_BYTES):
                    yield _META, data


def _write_manifest_tmp(file: Path, doc: Mapping[str, Any]) -> bytes:
    raw = (json.dumps(doc, indent=1) + "\n").encode()
    with open(file, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    return raw


def _publish(root: Path, doc: Mapping[str, Any]) -> bytes:
    """Write ``gallery.json`` atomically and durably; return its bytes."""
    tmp = root / _MANIFEST_TMP
    raw = _write_manifest_tmp(tmp, doc)
    os.replace(tmp, root / MANIFEST_NAME)
    _fsync_dir(root)
    return raw


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _lock(root: Path) -> int:
    """Take the folder's writer lock (non-blocking): the open descriptor that holds it."""
    import fcntl  # POSIX only; readers never need it

    try:
        fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise GalleryError(f"{root / _LOCK}: cannot take the writer lock ({e})") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise GalleryError(f"{root}: locked by another writer ({e.strerror})") from e
    return fd


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {list(x.shape)}"
    return type(x).__name__


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous."""
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _check_queries(queries: Any, dim: int) -> np.ndarray:
    if not isinstance(queries, np.ndarray) or queries.dtype != np.float32:
        raise InputError(f"queries must be a float32 numpy array [Q, {dim}], got {_describe(queries)}")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InputError(f"queries must have shape [Q, {dim}], got {list(queries.shape)}")
    if not np.isfinite(queries).all():
        raise InputError("queries hold NaN or infinite values")
    return np.ascontiguousarray(queries)


def _as_ids(ids: Any, count: int) -> np.ndarray:
    """Gallery ids as int64 [n]: integers (or integral floats) in [0, count)."""
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError) as e:
        raise InputError(f"gallery ids must be integers ({e})") from e
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InputError(f"gallery ids must be one integer or a 1-D sequence of them, got shape {list(arr.shape)}")
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind == "O":
        try:
            values = [operator.index(v) for v in arr]
        except TypeError as e:
            raise InputError(f"gallery ids must be integers ({e})") from e
        bad = [v for v in values if not 0 <= v < count]
        if bad:
            raise UnknownIdError(_unknown(bad[0], count))
        return np.array(values, np.int64)
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise InputError("gallery ids must be integers")
    elif arr.dtype.kind not in "iu":
        raise InputError(f"gallery ids must be integers, got {arr.dtype}")
    bad = (arr < 0) | (arr >= count)
    if bad.any():
        raise UnknownIdError(_unknown(int(arr[bad][0]), count))
    return arr.astype(np.int64)


def _unknown(idx: int, count: int) -> str:
    return f"gallery id {idx} is not in the gallery (it holds {count} entries)"
