"""One segment of a gallery store: written durably, opened and checked, read row by row (docs/architecture.md §10).

A segment is a folder of array files (``embedding.npy``, the attribute rows, ``probs.npy``, the maps, ``norms.npy``; see
:meth:`GallerySpec.layout`) and ``meta.jsonl``.
Small files are read into memory when the segment is opened; large ones stay open and are read with positioned reads
(``preadv``), so a process holds in memory only the rows it asked for, not the pages a memory map would fault in
around them. Either way an opened segment keeps answering after a compaction deleted its folder: the descriptors and
copies it holds keep the data. Whole-array scans (:meth:`_Array.view`) map a large file only for as long as the
caller holds the view; float16 attribute rows also have a copy attribute by attribute for them (format 4,
:class:`_Planes`).

Everything here works relative to directory descriptors and never follows a symbolic link where it writes or deletes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import mmap
import os
import stat
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.runtime.errors import CorruptGalleryError, UnsafeGalleryPathError
from attrimeter.runtime.store_format import META, GallerySpec, SegmentRecord

__all__ = ["MissingSegmentFile", "Segment", "open_segment", "remove_folder", "segment_chunks", "squared_norms",
           "write_segment"]

# Files below this size are read into memory: a large file keeps one descriptor open, and a served gallery of many
# one-image segments would otherwise exhaust them.
_IN_MEMORY_MAX = 1 << 20
_CHUNK = 1 << 20  # bytes per read when hashing or scanning
_COPY_BYTES = 64 << 20  # bytes per chunk when compacting
_FEW_ROWS = 64  # gathers up to this many rows read row by row, larger ones in runs of consecutive rows
_MAX_HEADER = 1 << 20  # a .npy header longer than this is not one the store wrote
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REWRITE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # written, then read to hash
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class MissingSegmentFile(CorruptGalleryError):
    """A file the manifest lists is not there (possibly deleted by a compaction since the manifest was read)."""


class _File:
    """One file of a segment: its bytes in memory (small files) or an open descriptor (large ones)."""

    def __init__(self, path: Path, size: int, raw: bytes | None, fd: int | None):
        self.path, self.size, self.raw, self.fd = path, size, raw, fd

    def read(self, offset: int, n: int) -> bytes:
        if self.raw is not None:
            return self.raw[offset:offset + n]
        buf = bytearray(n)
        _pread_into(self.fd, memoryview(buf), offset, self.path)
        return bytes(buf)

    def chunks(self, size: int = _CHUNK) -> Iterator[bytes]:
        for offset in range(0, self.size, size):
            yield self.read(offset, min(size, self.size - offset))


class _Array:
    """One ``.npy`` file of a segment, read by rows."""

    def __init__(self, file: _File, shape: tuple[int, ...], dtype: np.dtype, offset: int):
        self.file, self.shape, self.dtype, self.offset = file, shape, dtype, offset
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.data = None
        if file.raw is not None:
            self.data = np.frombuffer(file.raw, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)

    def rows(self, local: np.ndarray) -> np.ndarray:
        """Rows at positions ``local`` (any order, repeats allowed), as a new array."""
        if self.data is not None:
            return self.data[local]
        if len(local) <= _FEW_ROWS:  # a search's hits: one read per row costs less than finding runs
            out = np.empty((len(local), *self.shape[1:]), self.dtype)
            raw = out.reshape(len(local), -1).view(np.uint8)
            for j, i in enumerate(local.tolist()):
                _pread_into(self.file.fd, memoryview(raw[j]), self.offset + i * self.row_bytes, self.file.path)
            return out
        uniq, inverse = np.unique(local, return_inverse=True)
        out = np.empty((len(uniq), *self.shape[1:]), self.dtype)
        raw = out.reshape(len(uniq), -1).view(np.uint8)
        starts = np.flatnonzero(np.diff(uniq, prepend=-2) != 1)  # runs of consecutive rows: one read each
        for a, b in zip(starts, [*starts[1:], len(uniq)], strict=True):
            _pread_into(self.file.fd, memoryview(raw[a:b]).cast("B"), self.offset + int(uniq[a]) * self.row_bytes,
                        self.file.path)
        return out if len(uniq) == len(local) and (np.diff(local) > 0).all() else out[inverse]

    def block(self, a: int, b: int) -> np.ndarray:
        """Rows ``[a, b)`` as a new array (or a read-only view when the file is in memory)."""
        if self.data is not None:
            return self.data[a:b]
        out = np.empty((b - a, *self.shape[1:]), self.dtype)
        _pread_into(self.file.fd, memoryview(out.reshape(b - a, -1).view(np.uint8)).cast("B"),
                    self.offset + a * self.row_bytes, self.file.path)
        return out

    def view(self) -> np.ndarray:
        """The whole array, read-only: in memory, or mapped for as long as the caller holds the view."""
        if self.data is not None:
            return self.data
        mapped = mmap.mmap(self.file.fd, 0, access=mmap.ACCESS_READ)  # keeps its own descriptor
        return np.frombuffer(mapped, self.dtype, count=int(np.prod(self.shape)), offset=self.offset).reshape(self.shape)


class _Planes:
    """A ``.npy`` file of rows ``[n, M, ...]`` stored attribute by attribute, ``[M, n, ...]`` (a scan copy)."""

    def __init__(self, stored: _Array):
        self._stored = stored  # the file's own array, [M, n, ...]

    def view(self) -> np.ndarray:
        """The rows ``[n, M, ...]``, read-only: a transposed view of the planes, each ``view()[:, a]`` contiguous.

        In memory, or mapped for as long as the caller holds the view.
        """
        return self._stored.view().swapaxes(0, 1)


class Segment:
    """One published segment: its arrays and metadata lines, read by position within the segment.

    Attributes:
        arrays: Its arrays by layout key (:meth:`GallerySpec.layout`).
        planes: The scan copies attribute by attribute by layout key (float16 ``attr`` from format 4; absent before).
    """

    def __init__(self, record: SegmentRecord, folder: Path, files: dict[str, _File], arrays: dict[str, _Array],
                 planes: dict[str, _Planes]):
        """Use :func:`open_segment`."""
        self.record = record
        self.folder = folder
        self.arrays = arrays
        self.planes = planes
        self._files = files
        self._meta = files[META]
        self._offsets: np.ndarray | None = None
        self._lock = threading.Lock()
        weakref.finalize(self, _close, [f.fd for f in files.values() if f.fd is not None])

    @property
    def name(self) -> str:
        """The segment's folder name."""
        return self.record.name

    @property
    def first_id(self) -> int:
        """Gallery id of its first entry."""
        return self.record.first_id

    @property
    def count(self) -> int:
        """Number of entries."""
        return self.record.count

    def offsets(self) -> np.ndarray:
        """Byte offset of every line of ``meta.jsonl`` plus its end ([count + 1]); checks the line count."""
        with self._lock:
            if self._offsets is None:
                ends = _newlines(self._meta.chunks())
                if len(ends) != self.count or ends[-1] != self._meta.size - 1:
                    raise CorruptGalleryError(f"{self._meta.path}: holds {len(ends)} complete lines, the manifest "
                                              f"records {self.count}")
                self._offsets = np.concatenate([[0], ends + 1]).astype(np.int64)
            return self._offsets

    def meta(self, local: np.ndarray) -> list[dict[str, Any]]:
        """The metadata of the entries at the segment-local positions ``local``."""
        offsets = self.offsets()
        out = []
        for i in local:
            line = self._meta.read(int(offsets[i]), int(offsets[i + 1] - offsets[i]))
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise CorruptGalleryError(f"{self._meta.path}: line {i + 1} is not JSON ({type(e).__name__})") from e
            if not isinstance(obj, dict) or obj.get("id") != self.first_id + int(i):
                raise CorruptGalleryError(f"{self._meta.path}: line {i + 1} is not the metadata of gallery id "
                                          f"{self.first_id + int(i)}")
            out.append(obj)
        return out

    def verify(self, bar: Any) -> None:
        """Check every file's sha256 and the metadata's line count.

        Raises:
            CorruptGalleryError: A mismatch, naming the file.
        """
        for name, expected in self.record.files.items():
            file, digest = self._files[name], hashlib.sha256()
            for chunk in file.chunks():
                digest.update(chunk)
                bar.update(len(chunk))
            if digest.hexdigest() != expected:
                raise CorruptGalleryError(f"{file.path}: sha256 {digest.hexdigest()[:16]}… does not match the "
                                          f"manifest's {expected[:16]}… (corrupt or modified)")
        self.offsets()

    def meta_chunks(self) -> Iterator[bytes]:
        """The whole ``meta.jsonl`` in bounded chunks."""
        return self._meta.chunks(_COPY_BYTES)


def open_segment(segments_fd: int, folder: Path, record: SegmentRecord, spec: GallerySpec) -> Segment:
    """Open a listed segment: every file present with its recorded size, every array with the right dtype and shape.

    Args:
        segments_fd: Descriptor of the gallery's ``segments`` folder.
        folder: The segment folder's path, for messages.
        record: Its manifest record.
        spec: The gallery's identity.

    Returns:
        The open segment.

    Raises:
        MissingSegmentFile: The folder or a file is missing.
        CorruptGalleryError: A file of another size, or an array of another dtype or shape.
    """
    files: dict[str, _File] = {}
    try:
        try:
            dir_fd = os.open(record.name, _DIR_FLAGS, dir_fd=segments_fd)
        except FileNotFoundError as e:
            raise MissingSegmentFile(f"{folder}: missing (listed in the manifest)") from e
        except OSError as e:
            raise CorruptGalleryError(f"{folder}: unreadable ({e})") from e
        try:
            for name, size in record.sizes.items():
                files[name] = _open_file(dir_fd, folder / name, size)
        finally:
            os.close(dir_fd)
        # an OPTIONAL file a segment lacks is recomputed by its readers (norms), or they read another (planes)
        layout = spec.layout(record.count)
        arrays = {key: _Array(files[f"{key}.npy"], shape, dtype, _header(files[f"{key}.npy"], dtype, shape))
                  for key, (dtype, shape) in layout.items() if f"{key}.npy" in files}
        planes = {}
        for key in spec.by_attribute:
            dtype, shape = layout[key]
            file = files.get(spec.scan_file(key))
            if file is not None:
                stored = (shape[1], shape[0], *shape[2:])
                planes[key] = _Planes(_Array(file, stored, dtype, _header(file, dtype, stored)))
    except BaseException:
        _close([f.fd for f in files.values() if f.fd is not None])
        raise
    segment = Segment(record, folder, files, arrays, planes)
    if files[META].raw is not None:
        segment.offsets()  # cheap for small files: check the line count now
    return segment


def write_segment(segments_fd: int, name: str, spec: GallerySpec, n: int, chunks: Iterable[tuple[str, Any]],
                  bar: Any) -> tuple[dict[str, str], dict[str, int]]:
    """Create folder ``name`` and write a segment's files into it, fsynced, from ``(file stem or META, data)`` chunks.

    The arrays of :attr:`GallerySpec.by_attribute` are written twice: entry by entry and attribute by attribute.

    Args:
        segments_fd: Descriptor of the gallery's ``segments`` folder.
        name: The new folder (must not exist).
        spec: The gallery's identity (its :meth:`GallerySpec.layout` of ``n`` entries is what is written).
        n: Entries in the segment.
        chunks: Rows of arrays (by stem) or bytes of ``meta.jsonl`` (by :data:`META`), in order per file.
        bar: A progress bar (``update(bytes)``).

    Returns:
        ``({file: sha256}, {file: size})``.

    Raises:
        OSError: Writing failed (the caller removes the folder).
    """
    layout = spec.layout(n)
    os.mkdir(name, 0o755, dir_fd=segments_fd)
    folder_fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=segments_fd)
    writers: dict[str, _HashingFile] = {}
    copies: dict[str, _PlanesFile] = {}
    try:
        for key, (dtype, shape) in layout.items():
            writers[key] = _HashingFile(folder_fd, f"{key}.npy", bar)
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(writers[key], header)
            if key in spec.by_attribute:
                copies[key] = _PlanesFile(folder_fd, spec.scan_file(key), dtype, shape, bar)
        writers[META] = _HashingFile(folder_fd, META, bar)
        for key, data in chunks:
            writer = writers[key]
            if key == META:
                writer.rows += data.count(b"\n")
                writer.write(data)
                continue
            rows = np.ascontiguousarray(data, dtype=layout[key][0])
            writer.rows += len(rows)
            writer.write(rows)
            if key in copies:
                copies[key].append(rows)
        short = [w.name for w in [*writers.values(), *copies.values()] if w.rows != n]
        if short:
            raise RuntimeError(f"segment writer got the wrong number of rows for {', '.join(short)}")
        files, sizes = {}, {}
        for writer in [*writers.values(), *copies.values()]:
            files[writer.name] = writer.finish()
            sizes[writer.name] = writer.size
        os.fsync(folder_fd)
    finally:
        for writer in [*writers.values(), *copies.values()]:
            writer.close()
        os.close(folder_fd)
    return files, sizes


def segment_chunks(segments: Sequence[Segment]) -> Iterator[tuple[str, Any]]:
    """The contents of ``segments``, in order, as bounded chunks for :func:`write_segment` (norms added if missing)."""
    for segment in segments:
        for key, array in segment.arrays.items():
            rows = max(1, _COPY_BYTES // array.row_bytes)
            for a in range(0, segment.count, rows):
                yield key, array.block(a, min(a + rows, segment.count))
        if "norms" not in segment.arrays and "attr" in segment.arrays:  # float16, written before norms.npy existed
            attr = segment.arrays["attr"]
            rows = max(1, _COPY_BYTES // attr.row_bytes)
            for a in range(0, segment.count, rows):
                yield "norms", squared_norms(attr.block(a, min(a + rows, segment.count)))
        for data in segment.meta_chunks():
            yield META, data


def squared_norms(attr: np.ndarray) -> np.ndarray:
    """Each attribute row's squared norm ``‖g_k‖²`` in float32, the content of ``norms.npy``.

    Args:
        attr: Attribute embeddings ``[n, M, C]`` (float16 as stored, or float32).

    Returns:
        float32 ``[n, M]``.
    """
    g = np.asarray(attr, dtype=np.float32)
    return np.einsum("nac,nac->na", g, g)


def remove_folder(segments_fd: int, name: str, where: Path) -> None:
    """Delete segment folder ``name`` and the files in it, never following a symbolic link.

    Args:
        segments_fd: Descriptor of the gallery's ``segments`` folder.
        name: A segment folder name (already checked to be a plain name).
        where: Its path, for messages.

    Raises:
        UnsafeGalleryPathError: ``name`` is a symbolic link (or not a folder): not something the store wrote.
        OSError: The folder could not be deleted (e.g. it holds a sub-folder the store did not write).
    """
    try:
        fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=segments_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symbolic link" if stat.S_ISLNK(os.lstat(where).st_mode) else "not a folder"
            raise UnsafeGalleryPathError(f"{where}: {kind}, not a segment folder the store wrote; the store never "
                                         "deletes through it (remove it by hand)") from e
        raise
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):  # unlink removes a link itself, never its target
                    os.unlink(entry.name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=segments_fd)


# ---------------------------------------------------------------------- helpers


class _HashingFile:
    """A new file that hashes and counts what is written to it; ``finish`` flushes and fsyncs it."""

    def __init__(self, dir_fd: int, name: str, bar: Any):
        self.name = name
        self._fh = open(os.open(name, _WRITE_FLAGS, 0o644, dir_fd=dir_fd), "wb")
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
        return self._sha.hexdigest()

    def close(self) -> None:
        self._fh.close()


class _PlanesFile:
    """A new ``.npy`` file of rows ``[n, M, ...]`` stored as ``[M, n, ...]``.

    Each chunk of rows is written at M places (the file is sized first), and the file is hashed in a second pass once
    complete (from the page cache); ``finish`` fsyncs it.
    """

    def __init__(self, dir_fd: int, name: str, dtype: np.dtype, shape: tuple[int, ...], bar: Any):
        self.name = name
        self._fd = os.open(name, _REWRITE_FLAGS, 0o644, dir_fd=dir_fd)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False,
                                                      "shape": (shape[1], shape[0], *shape[2:])})
        self._head = len(header.getvalue())
        self._n, self._part = shape[0], int(np.prod(shape[2:], dtype=np.int64)) * dtype.itemsize
        self.size = self._head + shape[1] * self._n * self._part
        self._bar = bar
        self.rows = 0
        os.ftruncate(self._fd, self.size)
        _pwrite_all(self._fd, header.getvalue(), 0)

    def append(self, rows: np.ndarray) -> None:
        """Write rows ``[b, M, ...]`` after those written, one attribute plane at a time."""
        if self.rows + len(rows) > self._n:
            raise RuntimeError(f"segment writer got more than {self._n} rows for {self.name}")
        for m in range(rows.shape[1]):
            offset = self._head + (m * self._n + self.rows) * self._part
            _pwrite_all(self._fd, np.ascontiguousarray(rows[:, m]), offset)
        self.rows += len(rows)
        self._bar.update(rows.nbytes)

    def finish(self) -> str:
        digest = hashlib.sha256()
        buf = bytearray(min(_CHUNK, self.size))
        for offset in range(0, self.size, _CHUNK):
            view = memoryview(buf)[:min(_CHUNK, self.size - offset)]
            _pread_into(self._fd, view, offset, Path(self.name))
            digest.update(view)
        os.fsync(self._fd)
        return digest.hexdigest()

    def close(self) -> None:
        os.close(self._fd)


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _open_file(dir_fd: int, path: Path, size: int) -> _File:
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError as e:
        raise MissingSegmentFile(f"{path}: missing (listed in the manifest)") from e
    except OSError as e:
        raise CorruptGalleryError(f"{path}: unreadable ({e})") from e
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise CorruptGalleryError(f"{path}: {actual} bytes, the manifest records {size} (truncated or replaced)")
        if size >= _IN_MEMORY_MAX:
            return _File(path, size, None, fd)
        raw = bytearray(size)
        _pread_into(fd, memoryview(raw), 0, path)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return _File(path, size, bytes(raw), None)


def _header(file: _File, expected: np.dtype, shape: tuple[int, ...]) -> int:
    """Check a ``.npy`` file's header against the expected dtype and shape; returns where its data starts."""
    head = file.read(0, min(file.size, 4096))
    try:
        if len(head) >= 12 and head[:6] == b"\x93NUMPY" and head[6] in (2, 3):
            need = 12 + int.from_bytes(head[8:12], "little")
        else:
            need = 10 + int.from_bytes(head[8:10], "little")
        if len(head) < need <= min(file.size, _MAX_HEADER):
            head = file.read(0, need)
        stream = io.BytesIO(head)
        version = np.lib.format.read_magic(stream)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        found, fortran, dtype = read(stream)
    except (ValueError, KeyError, EOFError, SyntaxError, TypeError) as e:
        raise CorruptGalleryError(f"{file.path}: not a .npy array the store wrote ({type(e).__name__})") from e
    if dtype != expected or tuple(found) != shape or fortran:
        raise CorruptGalleryError(f"{file.path}: holds {dtype} {list(found)}, expected {expected} {list(shape)}")
    offset = stream.tell()
    if offset + int(np.prod(shape, dtype=np.int64)) * expected.itemsize != file.size:
        raise CorruptGalleryError(f"{file.path}: its size does not match its header")
    return offset


def _pread_into(fd: int | None, buf: memoryview, offset: int, path: Path) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``; a file shorter than that is corrupt (cut after it was checked)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CorruptGalleryError(f"{path}: shorter than the manifest records (truncated while open)")
        done += n


def _newlines(chunks: Iterable[bytes]) -> np.ndarray:
    """Positions of every newline byte in the concatenation of ``chunks``."""
    out, base = [], 0
    for chunk in chunks:
        out.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A) + base)
        base += len(chunk)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
