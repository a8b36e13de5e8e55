"""The runtime's errors: each says what was wrong with which input, so a server can answer 4xx and stay up."""

from __future__ import annotations

__all__ = [
    "AnnIndexError", "CodecError", "CorruptGalleryError", "GalleryError", "InputError", "LockedGalleryError",
    "OverloadedError", "ShardUnavailableError", "StorageError", "UnknownIdError", "UnsafeGalleryPathError",
]


class InputError(ValueError):
    """A request's input is unusable: corrupt or missing image, wrong shape or dtype, NaN, bad ``k`` or weights."""


class UnknownIdError(LookupError):
    """A gallery id that the gallery does not hold."""

    def __str__(self) -> str:  # LookupError quotes its argument like a dict key; the message is a sentence
        return str(self.args[0]) if self.args else ""


class GalleryError(ValueError):
    """A gallery store that is missing, corrupt, locked by another writer, or made by another model."""


class StorageError(GalleryError):
    """The gallery's disk failed (full, I/O error) during a write: a fault of the server, not of the request."""


class CorruptGalleryError(GalleryError):
    """The gallery's stored data is not what its store wrote.

    A manifest or journal that does not parse or holds malformed records, a segment file that is missing, truncated or
    fails its checksum, or stored rows with values no model gives (NaN, inf) although their files match their checksums.
    """


class LockedGalleryError(GalleryError):
    """Another writer (a server, an index job, another handle) holds the gallery's writer lock."""


class UnsafeGalleryPathError(GalleryError):
    """A path the gallery store would write or delete through is a symbolic link or names something outside the gallery.

    The store never follows a link where it writes or deletes, so nothing outside the gallery folder is ever touched.
    """


class ShardUnavailableError(GalleryError):
    """Shards of a sharded gallery did not answer (actor dead, node lost, no answer in time); names them.

    Attributes:
        missing: The names of the shards that did not answer.
    """

    def __init__(self, message: str, missing: tuple[str, ...]) -> None:
        super().__init__(message)
        self.missing = missing

    def __reduce__(self) -> tuple[type, tuple[str, tuple[str, ...]]]:  # picklable (Ray ships errors between processes)
        return type(self), (str(self), self.missing)


class CodecError(ValueError):
    """A storage codec cannot do what it was asked (:mod:`attrimeter.runtime.codecs`).

    Bad parameters or trained state, rows of the wrong shape or with values the codec cannot hold (NaN, inf, out of
    range), stored arrays that do not match the codec, an untrained codec, or rows that the codec does not store.
    """


class AnnIndexError(ValueError):
    """An approximate search index cannot do what it was asked (:mod:`attrimeter.runtime.ann`).

    Bad parameters, too few vectors to train on, use before training, or saved files that do not match.
    """


class OverloadedError(RuntimeError):
    """The engine's queue is full or would not drain in time (backpressure): retry later."""
