"""The gallery store's file operations: relative to directory descriptors, never through a link where they write.

The writer lock, opening the gallery's folders, reading the manifest, atomic new files, and telling whether a name
still is the file a descriptor holds (docs/architecture.md §10).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from attrimeter.runtime.errors import CorruptGalleryError, GalleryError, LockedGalleryError, UnsafeGalleryPathError
from attrimeter.runtime.store_format import MANIFEST_NAME, SEGMENTS, Manifest, parse_manifest

__all__ = [
    "LOCK_NAME", "close_fds", "exists", "open_root", "open_segments", "pread", "read_all", "read_file", "read_manifest",
    "same_file", "take_writer_lock", "unsafe_or", "write_new_file",
]

LOCK_NAME = ".lock"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

def open_root(path: Path) -> dict[str, int]:
    """``{"root": descriptor}`` of the gallery folder (the descriptors a store holds are gathered in this dict).

    Raises:
        GalleryError: The folder is missing or cannot be opened.
    """
    try:
        return {"root": os.open(path, _DIR)}
    except FileNotFoundError as e:
        raise GalleryError(f"{path / MANIFEST_NAME}: no gallery here (the folder is missing)") from e
    except OSError as e:
        raise GalleryError(f"{path}: cannot open the gallery folder ({e})") from e


def take_writer_lock(path: Path, fds: dict[str, int]) -> None:
    """Take the writer lock, non-blocking: ``flock`` the folder itself, then ``.lock`` (what format-1 writers lock).

    The folder's own lock cannot be removed from under its holder, as a lock file can; the folder's path must still
    name the folder locked.

    Raises:
        LockedGalleryError: Another writer holds either lock.
        GalleryError: The folder was replaced while it was opened, or ``.lock`` cannot be opened.
        UnsafeGalleryPathError: ``.lock`` is a symbolic link.
    """
    import fcntl  # POSIX only; readers never need it

    try:
        fcntl.flock(fds["root"], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raise LockedGalleryError(f"{path}: locked by another writer ({e.strerror})") from e
    try:
        same = os.path.samestat(os.stat(path), os.fstat(fds["root"]))
    except OSError:
        same = False
    if not same:
        raise GalleryError(f"{path}: the folder was moved or replaced while it was being opened; open it again")
    try:
        fds["lock"] = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                              dir_fd=fds["root"])
    except OSError as e:
        problem = GalleryError(f"{path / LOCK_NAME}: cannot take the writer lock ({e})")
        raise unsafe_or(e, path / LOCK_NAME, problem) from e
    try:
        fcntl.flock(fds["lock"], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        raise LockedGalleryError(f"{path}: locked by another writer (an older runtime holds {LOCK_NAME}; "
                                 f"{e.strerror})") from e


def open_segments(path: Path, root_fd: int, *, writable: bool) -> int:
    """Descriptor of ``segments/``; a writer refuses a symbolic link there (it would delete through it)."""
    try:
        return os.open(SEGMENTS, _DIR | (os.O_NOFOLLOW if writable else 0), dir_fd=root_fd)
    except OSError as e:
        raise unsafe_or(e, path / SEGMENTS, CorruptGalleryError(f"{path / SEGMENTS}: unreadable ({e})")) from e


def unsafe_or(e: OSError, where: Path, other: GalleryError) -> GalleryError:
    """:class:`UnsafeGalleryPathError` when ``e`` comes from refusing to follow a symbolic link, else ``other``."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(where):
        return UnsafeGalleryPathError(f"{where}: a symbolic link; a gallery writer never writes or deletes through "
                                      "one (replace it with the folder or file itself)")
    return other


def read_manifest(path: Path, root_fd: int, keep: bool = True) -> tuple[int, Manifest, bytes]:
    """(open descriptor, parsed manifest, bytes) of ``gallery.json`` (descriptor closed and -1 unless ``keep``)."""
    where = path / MANIFEST_NAME
    try:
        fd = os.open(MANIFEST_NAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError as e:
        raise GalleryError(f"{where}: no gallery here (the manifest is missing)") from e
    except OSError as e:
        raise CorruptGalleryError(f"{where}: unreadable ({e})") from e
    try:
        raw = read_all(fd, where)
        manifest = parse_manifest(raw, str(where))
    except BaseException:
        os.close(fd)
        raise
    if not keep:
        os.close(fd)
        fd = -1
    return fd, manifest, raw


def read_all(fd: int, where: Path) -> bytes:
    """The whole file behind ``fd`` (``where`` names it in errors)."""
    return pread(fd, os.fstat(fd).st_size, 0, where)


def pread(fd: int, n: int, offset: int, where: Path) -> bytes:
    """Up to ``n`` bytes of ``fd`` at ``offset`` (fewer at its end).

    Raises:
        CorruptGalleryError: The read failed.
    """
    out = bytearray()
    try:
        while len(out) < n and (chunk := os.pread(fd, n - len(out), offset + len(out))):
            out += chunk
    except OSError as e:
        raise CorruptGalleryError(f"{where}: unreadable ({e})") from e
    return bytes(out)


def read_file(root_fd: int, name: str) -> bytes:
    """The whole file ``name`` of the folder ``root_fd`` (``OSError`` if it cannot be read)."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        return read_all(fd, Path(name))
    finally:
        os.close(fd)


def write_new_file(root_fd: int, name: str, data: bytes) -> None:
    """Write and fsync a new file ``name`` (replacing a stale one; never through a link)."""
    try:
        os.unlink(name, dir_fd=root_fd)
    except FileNotFoundError:
        pass
    fd = os.open(name, _NEW, 0o644, dir_fd=root_fd)
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def same_file(known: tuple[int, ...], root_fd: int, name: str) -> bool:
    """Whether ``name`` is still the file ``known`` describes (device, inode and, when given, size and mtime)."""
    try:
        st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except OSError:
        return False
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)[:len(known)] == tuple(known)


def exists(root_fd: int, name: str) -> bool:
    """Whether ``name`` exists in the folder ``root_fd`` (a link counts, whatever it points to)."""
    try:
        os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def close_fds(fds: dict[str, int]) -> None:
    """Close and forget every descriptor in ``fds`` (which releases the writer lock with the root's)."""
    for key in list(fds):
        fd = fds.pop(key)
        if fd >= 0:
            os.close(fd)
