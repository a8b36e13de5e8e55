"""The gallery store on disk: reading the published state, the writer lock, publishing, compaction, clean-up.

docs/architecture.md §10 describes the store; :mod:`attrimeter.runtime.store_format` its files.

Writer lock: a writer ``flock``-s the gallery folder's own descriptor (which nobody can delete or replace under it)
and also ``.lock``, the lock of writers of format 1. It then does every write and delete relative to descriptors of
the folder and of ``segments/`` opened at that moment, never following a symbolic link (:class:`UnsafeGalleryPathError`
where one is in the way), so nothing outside the gallery is ever written or deleted.

Publishing an append: a ``begin`` record names the new folder in the journal, the segment is written into a hidden
``segments/.tmp-<name>``, every file and the folder fsynced, renamed to ``<name>``, then an ``add`` record is
appended to the journal and fsynced. That is O(1) in the number of segments. A writer killed at any point leaves the
published gallery intact; what it left is garbage by the journal (a ``begin`` without its ``add``), and the next
writer deletes it. A writer deletes only folders it created itself or that the state it holds the lock for names as
garbage; anything else under ``segments/`` it leaves in place with a warning.

Folding: a writer folds the journal into ``gallery.json`` when it opens and closes the gallery (a new base of the
next generation, then an empty journal of that generation). Compaction merges runs of consecutive segments into new
ones and publishes the same way, listing the merged-away folders as garbage, which it then deletes. Readers that
opened those folders before keep answering from what they hold (open descriptors, in-memory copies) and pick the
new state up on refresh.

Readers take no lock: they read ``gallery.json`` and the journal (each state they see is one a writer published)
and, on refresh, only the journal records appended since, unless the files were replaced.

A store is not thread-safe: :class:`~attrimeter.runtime.gallery.Gallery` serialises the calls that change it. (The
module runs a little over 600 lines: reading and writing share the descriptors and the journal position, so they stay
one class; the file operations live in :mod:`attrimeter.runtime.store_files`.)
"""

from __future__ import annotations

import logging
import os
import secrets
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from attrimeter.runtime.errors import CorruptGalleryError, GalleryError, StorageError
from attrimeter.runtime.segment import (
    MissingSegmentFile,
    Segment,
    open_segment,
    remove_folder,
    segment_chunks,
    write_segment,
)
from attrimeter.runtime.storage import STATE_NAME, StorageCodecs, load_codecs
from attrimeter.runtime.store_files import (
    LOCK_NAME,
    close_fds,
    exists,
    open_root,
    open_segments,
    pread,
    read_all,
    read_file,
    read_manifest,
    same_file,
    take_writer_lock,
    unsafe_or,
    write_new_file,
)
from attrimeter.runtime.store_format import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    SEGMENTS,
    VERSION,
    GallerySpec,
    Journal,
    Manifest,
    SegmentRecord,
    encode_journal_header,
    encode_manifest,
    encode_record,
    parse_journal,
    parse_journal_header,
)

__all__ = ["SegmentStore", "StoreState"]

log = logging.getLogger(__name__)

_TMP = ".tmp-"
_MANIFEST_TMP = MANIFEST_NAME + ".tmp"
_JOURNAL_TMP = JOURNAL_NAME + ".tmp"
_PROGRESS_MIN_BYTES = 64 << 20  # progress bars only for work large enough to take a while


@dataclass(frozen=True)
class StoreState:
    """An immutable view of the published gallery: swapped as a whole, so readers never see half an append."""

    segments: tuple[Segment, ...]
    first_ids: np.ndarray  # first id of each segment, int64
    count: int

    @property
    def bytes(self) -> int:
        """Total size of the segments' files."""
        return sum(s.record.bytes for s in self.segments)


_EMPTY = StoreState((), np.zeros(0, np.int64), 0)


@dataclass
class _Position:
    """Where this handle is in the journal: what it has read or written up to ``end``."""

    generation: int
    seq: int
    end: int


class SegmentStore:
    """One gallery folder on disk: its published state, and with the writer lock, appends and compactions."""

    def __init__(self, root: Path, spec: GallerySpec, codecs: StorageCodecs, fds: dict[str, int], *, writable: bool,
                 verify: bool, progress: bool):
        """Use :meth:`create` or :meth:`open`."""
        self.path = root
        self.spec = spec
        self.codecs = codecs  # rebuilt from spec.storage and codecs.npz; never changes (codes are never re-encoded)
        self.writable = writable
        self.state = _EMPTY
        self._fds = fds  # root, segments, lock (writers), base and journal (what the state was read from)
        self._verify = verify
        self._progress = progress
        self._base_stat: tuple[int, ...] = ()
        self._base_raw = b""  # kept for format 1 only, whose writers rewrite gallery.json in place of a journal
        self._position: _Position | None = None  # None: no journal of the base's generation (format 1, or stale)
        self._closed = False
        weakref.finalize(self, close_fds, fds)

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: Path, spec: GallerySpec, codecs: StorageCodecs, state: bytes | None) -> SegmentStore:
        """Create an empty store in a new or empty folder and open it writable.

        Args:
            path: The folder.
            spec: The gallery's identity (its storage describes ``codecs`` and ``state``).
            codecs: The fitted codecs.
            state: The bytes of ``codecs.npz`` (written once, before the manifest), or None.

        Raises:
            GalleryError: The folder holds something already, or cannot be created.
            LockedGalleryError: Another writer holds its lock.
            UnsafeGalleryPathError: ``segments`` (or ``.lock``) is a symbolic link.
        """
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GalleryError(f"{path}: cannot create a gallery here ({e})") from e
        fds = open_root(path)
        try:
            take_writer_lock(path, fds)
            if exists(fds["root"], MANIFEST_NAME):
                raise GalleryError(f"{path / MANIFEST_NAME}: the folder already holds a gallery")
            # a codecs.npz without a manifest: a creation cut short (it is written again)
            others = sorted(set(os.listdir(fds["root"])) - {LOCK_NAME, SEGMENTS, _MANIFEST_TMP, _JOURNAL_TMP,
                                                            STATE_NAME})
            if SEGMENTS in os.listdir(fds["root"]) and not os.path.islink(path / SEGMENTS):
                others += [f"{SEGMENTS}/{name}" for name in os.listdir(path / SEGMENTS)]
            if others:
                raise GalleryError(f"{path}: not empty ({', '.join(others[:3])}); a gallery is created in a new folder")
            try:
                os.mkdir(SEGMENTS, 0o755, dir_fd=fds["root"])
            except FileExistsError:
                pass
            fds["segments"] = open_segments(path, fds["root"], writable=True)
            store = cls(path, spec, codecs, fds, writable=True, verify=True, progress=True)
        except BaseException:
            close_fds(fds)
            raise
        try:
            if state is not None:  # before the manifest that lists it (whose publication fsyncs the folder)
                write_new_file(fds["root"], STATE_NAME, state)
            store._publish_base(Manifest(spec, VERSION, 1, 0, (), ()))
            store._new_journal(1)
        except BaseException as e:
            store.close()
            if isinstance(e, OSError):
                raise StorageError(f"{path}: cannot create a gallery here ({e})") from e
            raise
        return store

    @classmethod
    def open(cls, path: Path, *, writable: bool, verify: bool, progress: bool) -> SegmentStore:
        """Open a store, checking every segment file's size, dtype and shape (and with ``verify`` its sha256).

        Raises:
            GalleryError: No gallery here (message names the manifest), or one of a format version not read here.
            CorruptGalleryError: A malformed manifest or journal, or a missing, truncated or corrupt segment file.
            LockedGalleryError: ``writable`` while another writer holds the lock.
            UnsafeGalleryPathError: ``writable`` and a path the writer would use is a symbolic link.
            StorageError: ``writable`` and folding the journal failed (disk full, I/O error).
        """
        if not (path / MANIFEST_NAME).is_file():
            raise GalleryError(f"{path / MANIFEST_NAME}: no gallery here (the manifest is missing)")
        fds = open_root(path)
        try:
            if writable:
                take_writer_lock(path, fds)
            fds["segments"] = open_segments(path, fds["root"], writable=writable)
            spec = read_manifest(path, fds["root"], keep=False)[1].spec
            store = cls(path, spec, _load_codecs(path, fds["root"], spec), fds, writable=writable, verify=verify,
                        progress=progress)
        except BaseException:
            close_fds(fds)
            raise
        try:
            store.state = store._read(None)
            if writable:
                store._prepare()
        except BaseException:
            store.close()
            raise
        return store

    # ------------------------------------------------------------------ reading

    def refresh(self) -> StoreState:
        """The state published now (this handle's state extended by new journal records when only those changed).

        Raises:
            CorruptGalleryError: A malformed manifest or journal, or a corrupt new segment.
            GalleryError: The folder now holds another gallery, or fewer entries.
        """
        self._check_open()
        self.state = self._read(self.state)
        return self.state

    def verify(self, state: StoreState) -> None:
        """Check the sha256 of every file of every segment of ``state`` and the line count of the metadata.

        Raises:
            CorruptGalleryError: A mismatch, naming the file.
        """
        total = state.bytes
        with self._bar(total, "verify") as bar:
            for segment in state.segments:
                segment.verify(bar)

    def _read(self, previous: StoreState | None) -> StoreState:
        """Read the published state; only the new journal records when nothing else changed since ``previous``."""
        if previous is not None:
            extended = self._read_tail(previous)
            if extended is not None:
                return extended
        newer_than: bytes | None = None
        while True:
            base_fd, manifest, raw = read_manifest(self.path, self._fds["root"])
            try:
                if manifest.spec != self.spec:
                    raise GalleryError(f"{self.path / MANIFEST_NAME}: now describes another gallery (dim, attributes, "
                                       "model or metric changed); open it again")
                journal_fd, position, journal = self._read_journal(manifest)
            except BaseException:
                os.close(base_fd)
                raise
            if journal_fd == -1:  # the journal is newer than the base read: a compaction replaced both meanwhile
                os.close(base_fd)
                if raw == newer_than:
                    raise CorruptGalleryError(f"{self.path / JOURNAL_NAME}: continues a newer generation than "
                                              f"{MANIFEST_NAME} holds, which stays the same when read again")
                newer_than = raw
                continue
            try:
                records = manifest.segments + (journal.added if journal is not None else ())
                state = self._load(records, previous)
            except MissingSegmentFile:
                # a compaction deleted segments between reading the manifest and opening them: read again, unless
                # nothing changed (then the file really is missing)
                changed = not same_file(self._stat_of(base_fd), self._fds["root"], MANIFEST_NAME)
                for fd in (base_fd, journal_fd):
                    if fd is not None:
                        os.close(fd)
                if changed:
                    continue
                raise
            self._swap_fd("base", base_fd)
            self._swap_fd("journal", journal_fd)
            self._base_stat = self._stat_of(base_fd)
            self._base_raw = raw if manifest.version == 1 else b""
            self._position = position
            return self._successor(previous, state)

    def _read_journal(self, manifest: Manifest) -> tuple[int | None, _Position | None, Journal | None]:
        """(descriptor, position, records) of the journal continuing ``manifest``; (-1, …) when it is newer."""
        if manifest.version == 1:
            return None, None, None  # format 1 has no journal (its writers publish by rewriting gallery.json)
        where = self.path / JOURNAL_NAME
        flags = (os.O_RDWR | os.O_NOFOLLOW if self.writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(JOURNAL_NAME, flags, dir_fd=self._fds["root"])
        except FileNotFoundError:
            return None, None, None  # a writer stopped between a new base and its journal: the base holds it all
        except OSError as e:
            raise unsafe_or(e, where, CorruptGalleryError(f"{where}: unreadable ({e})")) from e
        try:
            raw = read_all(fd, where)
            generation, start = parse_journal_header(raw, str(where))
            if generation != manifest.generation:
                os.close(fd)
                return (-1 if generation > manifest.generation else None), None, None
            names = {s.name for s in manifest.segments}
            journal = parse_journal(raw[start:], str(where), spec=self.spec, start=start, seq=0,
                                    first_id=manifest.count, names=names)
        except BaseException:
            os.close(fd)
            raise
        return fd, _Position(generation, journal.seq, journal.end), journal

    def _read_tail(self, previous: StoreState) -> StoreState | None:
        """``previous`` extended by journal records appended since; None when the base or journal was replaced."""
        root = self._fds["root"]
        if "base" not in self._fds or not same_file(self._base_stat, root, MANIFEST_NAME):
            return None
        if self._position is None:  # format 1: its writers rewrite gallery.json in place, possibly within a tick
            try:
                same = read_file(root, MANIFEST_NAME) == self._base_raw
            except OSError:
                return None
            return previous if same and not exists(root, JOURNAL_NAME) else None
        journal_fd = self._fds.get("journal")
        if journal_fd is None or not same_file(self._stat_of(journal_fd)[:2], root, JOURNAL_NAME):
            return None
        where = self.path / JOURNAL_NAME
        position = self._position
        size = os.fstat(journal_fd).st_size
        if size <= position.end:
            return previous
        raw = pread(journal_fd, size - position.end, position.end, where)
        names = {s.name for s in previous.segments}
        journal = parse_journal(raw, str(where), spec=self.spec, start=position.end, seq=position.seq,
                                first_id=previous.count, names=names)
        if not journal.added:
            return previous
        self._position = _Position(position.generation, journal.seq, journal.end)
        return self._successor(previous, self._load([s.record for s in previous.segments] + list(journal.added),
                                                    previous))

    def _load(self, records: Sequence[SegmentRecord], previous: StoreState | None) -> StoreState:
        """Open the segments of ``records``, reusing those already open in ``previous``."""
        known = {s.name: s for s in previous.segments} if previous is not None else {}
        fresh = [r for r in records if r.name not in known or known[r.name].record != r]
        segments = []
        with self._bar(sum(r.bytes for r in fresh), "verify" if self._verify else "open") as bar:
            for record in records:
                segment = known.get(record.name)
                if segment is None or segment.record != record:
                    segment = open_segment(self._fds["segments"], self.path / SEGMENTS / record.name, record,
                                           self.spec)
                    if self._verify:
                        segment.verify(bar)
                segments.append(segment)
        first_ids = np.array([r.first_id for r in records], np.int64)
        return StoreState(tuple(segments), first_ids, sum(r.count for r in records))

    def _successor(self, previous: StoreState | None, new: StoreState) -> StoreState:
        if previous is not None and new.count < previous.count:
            raise GalleryError(f"{self.path / MANIFEST_NAME}: the gallery shrank from {previous.count} to "
                               f"{new.count} entries (replaced by another gallery?); open it again")
        return new

    # ------------------------------------------------------------------ writing

    def writable_state(self) -> StoreState:
        """The published state, checked before a write (adopting what an interrupted write of this handle published).

        Raises:
            GalleryError: Read-only or closed handle.
        """
        self._check_for_write()
        return self.state

    def append(self, n: int, chunks: Iterable[tuple[str, Any]], *, progress: bool) -> StoreState:
        """Publish ids ``[count, count + n)`` as one new segment written from ``chunks``; on any error nothing is.

        Raises:
            StorageError: The disk failed (nothing was published).
            GalleryError: Read-only or closed handle.
        """
        self._check_for_write()
        state = self.state
        first = state.count
        record = self._write_segment(first, n, chunks, "append", progress)
        segment = open_segment(self._fds["segments"], self.path / SEGMENTS / record.name, record, self.spec)
        self.state = StoreState((*state.segments, segment), np.append(state.first_ids, first), first + n)
        return self.state

    def compact(self, runs: Sequence[tuple[int, int]], *, progress: bool) -> StoreState:
        """Merge each run ``[a, b)`` of consecutive segments into one; ids and contents stay the same.

        A run of one segment is rewritten only when it lacks a file the current format writes (``norms.npy``, the
        float16 scan copy): that is how older segments gain them. The merged-away folders are deleted after the new
        state is published; readers that opened them keep answering from what they hold.

        Raises:
            StorageError: The disk failed (the old segments stay published).
            GalleryError: Read-only or closed handle.
        """
        self._check_for_write()
        state = self.state
        runs = [(a, b) for a, b in runs if b - a > 1 or not self.spec.files() <= set(state.segments[a].record.files)]
        if not runs:
            return state
        merged: dict[int, Segment] = {}
        garbage: list[str] = []
        manifest: Manifest | None = None
        start = replace(self._position)
        try:
            for a, b in runs:
                segments = state.segments[a:b]
                large = progress and sum(s.record.bytes for s in segments) >= _PROGRESS_MIN_BYTES
                record = self._write_segment(segments[0].first_id, sum(s.count for s in segments),
                                             segment_chunks(segments), "compact", large, durable=False)
                merged[a] = open_segment(self._fds["segments"], self.path / SEGMENTS / record.name, record, self.spec)
                garbage += [s.name for s in segments]
            starts = {a: b for a, b in runs}
            new, i = [], 0
            while i < len(state.segments):
                new.append(merged.get(i, state.segments[i]))
                i = starts.get(i, i + 1)
            generation = self._position.generation + 1
            manifest = Manifest(self.spec, VERSION, generation, state.count, tuple(s.record for s in new),
                                tuple(garbage))
            self._publish_base(manifest)
            self._new_journal(generation)
        except BaseException as e:
            # An interrupt can land after gallery.json was replaced: never delete what it lists.
            if manifest is None or not self._base_is(encode_manifest(manifest)):
                self._undo(start, [s.name for s in merged.values()])
                if isinstance(e, OSError):
                    raise StorageError(f"{self.path}: compaction failed, nothing was published ({e})") from e
            elif isinstance(e, OSError):
                raise StorageError(f"{self.path}: compaction published, then starting a new journal failed ({e}); "
                                   "the next write or open retries it") from e
            raise
        self.state = StoreState(tuple(new), np.array([s.first_id for s in new], np.int64), state.count)
        self._delete(garbage)
        return self.state

    def write_derived(self, name: str, data: bytes) -> None:
        """Replace a file derived from the entries (a saved search index) in the gallery folder, durably.

        Written through a temporary file and renamed (never through a link); readers check what they read.

        Raises:
            GalleryError: The handle is not a writer.
            StorageError: Writing failed (the previous file, if any, stays).
        """
        self._check_open()
        if not self.writable:
            raise GalleryError(f"{self.path}: read-only handle; open it writable to save {name}")
        try:
            write_new_file(self._fds["root"], name + ".tmp", data)
            os.replace(name + ".tmp", name, src_dir_fd=self._fds["root"], dst_dir_fd=self._fds["root"])
            os.fsync(self._fds["root"])
        except OSError as e:
            raise StorageError(f"{self.path / name}: cannot be written ({e})") from e

    def delete_derived(self, name: str) -> None:
        """Remove a derived file (writers; nothing when there is none; a link is removed, never followed)."""
        self._check_open()
        if not self.writable:
            raise GalleryError(f"{self.path}: read-only handle; open it writable to remove {name}")
        try:
            os.unlink(name, dir_fd=self._fds["root"])
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"{self.path / name}: cannot be removed ({e})") from e

    def read_derived(self, name: str) -> bytes | None:
        """A derived file's bytes (never through a link), or None when there is none or it cannot be read."""
        self._check_open()
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._fds["root"])
        except OSError:
            return None
        try:
            return read_all(fd, self.path / name)
        except (OSError, GalleryError):
            return None
        finally:
            os.close(fd)

    def close(self) -> None:
        """Fold the journal into ``gallery.json`` (writers; best effort), then release the lock and descriptors."""
        if self._closed:
            return
        try:
            if self.writable:
                try:
                    self._check_for_write()  # adopts what an interrupted write of this handle published
                    if self._position.seq > 0:
                        self._fold(self.state, (), self._position.generation + 1)
                except (OSError, GalleryError) as e:  # the journal stays valid: the next writer folds it
                    log.warning("%s: could not fold the journal into %s on close: %s", self.path, MANIFEST_NAME, e)
        finally:
            self._closed = True
            self.state = _EMPTY
            close_fds(self._fds)

    # ------------------------------------------------------------------ writing: steps

    def _write_segment(self, first: int, n: int, chunks: Iterable[tuple[str, Any]], desc: str, progress: bool,
                       durable: bool = True) -> SegmentRecord:
        """Write a segment of ids ``[first, first + n)`` and publish it (``durable``: an ``add`` record)."""
        name = f"{first:012d}-{secrets.token_hex(4)}"
        tmp = _TMP + name
        segments_fd = self._fds["segments"]
        start = replace(self._position)
        renamed = committed = False
        line = b""
        try:
            self._append_journal(encode_record(self._position.seq + 1, begin=name), sync=False)
            layout = self.spec.layout(n)
            total = sum(int(np.prod(s)) * d.itemsize * (1 + (key in self.spec.by_attribute))  # + the scan copies
                        for key, (d, s) in layout.items())
            with self._bar(total if progress else 0, f"{desc} {self.path.name}") as bar:
                files, sizes = write_segment(segments_fd, tmp, self.spec, n, chunks, bar)
            os.rename(tmp, name, src_dir_fd=segments_fd, dst_dir_fd=segments_fd)
            renamed = True
            os.fsync(segments_fd)
            record = SegmentRecord(name, n, first, files, sizes)
            if durable:
                line = encode_record(self._position.seq + 1, add=record)
                self._append_journal(line, sync=True)
                committed = True
        except BaseException as e:
            # An interrupt (Ctrl-C) can land after the add record is written: never delete a published folder.
            if not committed and not (line and self._holds(line)):
                self._undo(start, [tmp, name] if renamed else [tmp])
                if isinstance(e, OSError):
                    raise StorageError(f"{self.path}: {desc} failed, nothing was published ({e})") from e
            raise
        return record

    def _append_journal(self, line: bytes, *, sync: bool) -> None:
        """Write one record at this handle's journal end (over any torn tail); advance the end once it is whole."""
        position = self._position
        fd = self._fds["journal"]
        done = 0
        while done < len(line):
            done += os.pwrite(fd, line[done:], position.end + done)
        if sync:
            os.fsync(fd)
        position.seq += 1
        position.end += len(line)

    def _holds(self, line: bytes) -> bool:
        """Whether the journal holds ``line`` whole at this handle's end (a write interrupted after it finished)."""
        try:
            return os.pread(self._fds["journal"], len(line), self._position.end) == line
        except OSError:
            return False

    def _undo(self, start: _Position, folders: Sequence[str]) -> None:
        """Delete this handle's unpublished ``folders``, then cut the journal back to ``start``.

        If a folder stays, the journal keeps the ``begin`` records that name it as garbage for the next writer.
        """
        removed = [_suppress(remove_folder, self._fds["segments"], f, self.path / SEGMENTS / f) for f in folders]
        end = start.end if all(removed) else self._position.end
        try:
            os.ftruncate(self._fds["journal"], end)
        except OSError as e:  # torn bytes are ignored by readers and overwritten by the next record
            log.warning("%s: could not cut a failed write off the journal: %s", self.path, e)
            return
        if all(removed):
            self._position = start

    def _publish_base(self, manifest: Manifest) -> bytes:
        """Write ``gallery.json`` atomically and durably; return its bytes."""
        raw = encode_manifest(manifest)
        fd = self._replace(_MANIFEST_TMP, MANIFEST_NAME, raw, "base", os.O_RDONLY)
        self._base_stat = self._stat_of(fd)
        self._base_raw = b""
        return raw

    def _new_journal(self, generation: int) -> None:
        """Start an empty journal continuing base ``generation``, atomically and durably."""
        header = encode_journal_header(generation)
        self._replace(_JOURNAL_TMP, JOURNAL_NAME, header, "journal", os.O_RDWR)
        self._position = _Position(generation, 0, len(header))

    def _replace(self, tmp: str, name: str, data: bytes, key: str, mode: int) -> int:
        """Put ``data`` at ``name`` through ``tmp`` (written, renamed, folder fsynced); hold it open as ``key``."""
        root = self._fds["root"]
        write_new_file(root, tmp, data)
        os.replace(tmp, name, src_dir_fd=root, dst_dir_fd=root)
        os.fsync(root)
        fd = os.open(name, mode | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        self._swap_fd(key, fd)
        return fd

    def _base_is(self, raw: bytes | None) -> bool:
        try:
            return raw is not None and read_file(self._fds["root"], MANIFEST_NAME) == raw
        except OSError:
            return False

    def _fold(self, state: StoreState, garbage: Sequence[str], generation: int) -> None:
        """Publish ``state`` as base ``generation`` (listing ``garbage``), then an empty journal continuing it."""
        self._publish_base(Manifest(self.spec, VERSION, generation, state.count,
                                    tuple(s.record for s in state.segments), tuple(garbage)))
        self._new_journal(generation)

    # ------------------------------------------------------------------ writer upkeep

    def _check_for_write(self) -> None:
        """Before a write: make sure this handle's state is what is published, adopting and tidying if it is not.

        Nothing changes the files but this handle while it holds the lock, so this costs a few ``fstat`` calls; a
        change (a write of this handle interrupted after publishing, a torn record) is adopted or cut off.
        """
        self._check_open()
        if not self.writable:
            raise GalleryError(f"{self.path}: opened read-only; open it with writable=True to change it")
        position = self._position
        journal_fd = self._fds.get("journal")
        if (position is not None and journal_fd is not None
                and os.fstat(journal_fd).st_size == position.end
                and same_file(self._stat_of(journal_fd)[:2], self._fds["root"], JOURNAL_NAME)
                and same_file(self._base_stat, self._fds["root"], MANIFEST_NAME)):
            return
        self.state = self._read(self.state)
        self._prepare()

    def _prepare(self) -> None:
        """With the lock: delete the garbage the published state names, then fold unless the journal is empty."""
        root, segments_fd = self._fds["root"], self._fds["segments"]
        manifest = read_manifest(self.path, root, keep=False)[1]
        journal_fd, _, journal = self._read_journal(manifest)
        if journal_fd is not None and journal_fd >= 0:
            os.close(journal_fd)
        listed = {s.name for s in self.state.segments}
        begun = set(journal.begun) - listed if journal is not None else set()
        doomed = set(manifest.garbage) | begun
        kept = self._delete([*doomed, *(_TMP + name for name in begun)])
        for name in (_MANIFEST_TMP, _JOURNAL_TMP):
            try:
                os.unlink(name, dir_fd=root)  # unlink removes a link itself, never what it points to
            except FileNotFoundError:
                pass
        strays = sorted(set(os.listdir(segments_fd)) - listed - doomed - {_TMP + name for name in begun})
        if strays:
            log.warning("%s: %s not part of the gallery and left in place (the store deletes only what it wrote; "
                        "delete them by hand if nothing else writes there)", self.path / SEGMENTS, ", ".join(strays))
        position = self._position
        clean = (manifest.version == VERSION and position is not None and journal is not None and not journal.begun
                 and not journal.added and not journal.torn and set(manifest.garbage) == set(kept))
        if not clean:
            self._fold(self.state, [k for k in kept if not k.startswith(_TMP)], manifest.generation + 1)

    def _delete(self, names: Iterable[str]) -> list[str]:
        """Delete segment folders the published state names as garbage; return those that could not be deleted."""
        kept = []
        for name in names:
            try:
                remove_folder(self._fds["segments"], name, self.path / SEGMENTS / name)
            except OSError as e:
                log.warning("%s: could not delete %s (%s); the next writer tries again", self.path, name, e)
                kept.append(name)
        return kept

    # ------------------------------------------------------------------ helpers

    def _swap_fd(self, key: str, fd: int | None) -> None:
        old = self._fds.pop(key, None)
        if fd is not None:
            self._fds[key] = fd
        if old is not None and old != fd:
            os.close(old)

    @staticmethod
    def _stat_of(fd: int) -> tuple[int, ...]:
        st = os.fstat(fd)
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def _bar(self, total: int, desc: str) -> Any:
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                    disable=not self._progress or total < _PROGRESS_MIN_BYTES)

    def _check_open(self) -> None:
        if self._closed:
            raise GalleryError(f"{self.path}: the gallery is closed")


def _load_codecs(path: Path, root_fd: int, spec: GallerySpec) -> StorageCodecs:
    """The codecs ``spec`` describes, with ``codecs.npz`` read (never through a link) when it lists one."""
    state = None
    if spec.storage.state is not None:
        try:
            fd = os.open(STATE_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
        except FileNotFoundError:
            fd = None
        except OSError as e:
            raise CorruptGalleryError(f"{path / STATE_NAME}: unreadable ({e})") from e
        if fd is not None:
            try:
                state = pread(fd, spec.storage.state[1] + 1, 0, path / STATE_NAME)  # one byte more: a longer file
            finally:
                os.close(fd)
    return load_codecs(spec.storage, state, aam_shape=spec.aam_shape, manifest=str(path / MANIFEST_NAME),
                       state_where=str(path / STATE_NAME))


def _suppress(fn: Any, *args: Any) -> bool:
    """Best-effort clean-up of this handle's own failed write; whether it succeeded."""
    try:
        fn(*args)
    except OSError as e:
        log.warning("clean-up failed: %s", e)
        return False
    return True
