"""The top-level manifest of a sharded gallery: which gallery stores make it up (docs/architecture.md §11).

Layout of a sharded gallery folder::

    GALLERY/shards.json     this manifest: the identity every shard shares (dim, attributes, aam_shape, model,
                            metric), the assignment rule, and per shard its name, folder and entry count
    GALLERY/shard-000/      a complete gallery store (gallery.json, segments/): see attrimeter.runtime.gallery
    GALLERY/shard-001/ ...

An entry goes to shard ``blake2b-64(key) mod N`` (:func:`shard_of`): the same key always lands in the same shard, so
an interrupted indexing run resumes by skipping the keys its shard already holds. Global ids are positions in shard
order: shard 0's entries (its own ids 0..n0-1), then shard 1's, and so on. The counts recorded here are the published
snapshot: a shard holding more entries than its count is being indexed (or an indexing run was interrupted), and a
reader refuses it rather than serve ids that would move when the run finishes.

Shard folders are written relative to this manifest, so the folder can be moved or mounted elsewhere (every machine
of a Ray cluster reads the shards through the same shared file system).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.runtime.errors import GalleryError, InputError
from attrimeter.runtime.gallery import METRICS

__all__ = ["ASSIGNMENT", "SHARDS_FORMAT", "SHARDS_NAME", "SHARDS_VERSION", "ShardEntry", "ShardedManifest",
           "manifest_for", "read_manifest", "shard_of", "sharded_root", "write_manifest"]

SHARDS_NAME = "shards.json"
SHARDS_FORMAT = "attrimeter-sharded-gallery"
SHARDS_VERSION = 1
# Recorded in the manifest: a future rule must not silently resume a gallery laid out by this one.
ASSIGNMENT = "blake2b64-mod"


def shard_of(key: str, shards: int) -> int:
    """The shard an entry's key belongs to: stable across processes, machines and Python versions.

    Args:
        key: The entry's key (its image path relative to the indexed folder, or its line in an image list).
        shards: Number of shards N.

    Returns:
        An index in [0, N).
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it.

    Attributes:
        name: Its name in messages (``shard-000``).
        path: Its gallery folder, relative to the manifest's folder (or absolute).
        count: Entries it holds in the published snapshot.
    """

    name: str
    path: str
    count: int


@dataclass(frozen=True)
class ShardedManifest:
    """The identity every shard shares and the shards, in global-id order.

    Attributes:
        dim: Embedding width C.
        attributes: Attribute names, in the model's order.
        aam_shape: ``(h, w)`` of the stored attention maps, or None.
        model: The export's source sha256.
        metric: ``"l2"`` or ``"ip"``.
        shards: The shards; global ids run through them in this order.
    """

    dim: int
    attributes: tuple[str, ...]
    aam_shape: tuple[int, int] | None
    model: str
    metric: str
    shards: tuple[ShardEntry, ...]

    @property
    def count(self) -> int:
        """Entries in all shards."""
        return sum(s.count for s in self.shards)

    def first_ids(self) -> np.ndarray:
        """The global id of each shard's first entry, int64 [N]."""
        return np.concatenate([[0], np.cumsum([s.count for s in self.shards])[:-1]]).astype(np.int64)

    def folder(self, root: Path, index: int) -> Path:
        """Shard ``index``'s gallery folder, for a manifest read from ``root``."""
        return root / self.shards[index].path

    def identity(self) -> dict[str, Any]:
        """The fields a shard's own manifest must agree with."""
        return {"dim": self.dim, "attributes": list(self.attributes),
                "aam_shape": None if self.aam_shape is None else list(self.aam_shape), "model": self.model,
                "metric": self.metric}

    def to_json(self) -> dict[str, Any]:
        """The manifest document."""
        return {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, **self.identity(), "assignment": ASSIGNMENT,
                "count": self.count, "shards": [{"name": s.name, "path": s.path, "count": s.count}
                                                for s in self.shards]}


def sharded_root(path: str | Path) -> Path | None:
    """The folder of a sharded gallery named by ``path`` (the folder or its ``shards.json``), or None if it is not one.

    Args:
        path: A gallery folder, a sharded gallery folder or its manifest file.

    Returns:
        The sharded gallery's folder, or None.
    """
    p = Path(path)
    if p.name == SHARDS_NAME and p.is_file():
        return p.parent
    return p if (p / SHARDS_NAME).is_file() else None


def read_manifest(root: Path) -> tuple[ShardedManifest, bytes]:
    """Read and check a sharded gallery's manifest.

    Args:
        root: The sharded gallery's folder.

    Returns:
        ``(manifest, raw bytes)``.

    Raises:
        GalleryError: Missing, unreadable, foreign or malformed manifest (the message names the file and the field).
    """
    file = root / SHARDS_NAME
    try:
        raw = file.read_bytes()
    except FileNotFoundError as e:
        raise GalleryError(f"{file}: no sharded gallery here (the manifest is missing)") from e
    except OSError as e:
        raise GalleryError(f"{file}: unreadable ({e})") from e
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise GalleryError(f"{file}: not a sharded gallery manifest ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != SHARDS_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise GalleryError(f"{file}: not an AttriMeter sharded gallery manifest (format {found!r}, expected "
                           f"{SHARDS_FORMAT!r})")
    if doc.get("version") != SHARDS_VERSION:
        raise GalleryError(f"{file}: sharded gallery version {doc.get('version')!r} is not supported (this runtime "
                           f"reads version {SHARDS_VERSION})")
    if doc.get("assignment") != ASSIGNMENT:
        raise GalleryError(f"{file}: shard assignment {doc.get('assignment')!r} is not supported (this runtime "
                           f"assigns keys with {ASSIGNMENT!r})")
    try:
        manifest = _parse(doc)
    except (InputError, KeyError, TypeError, ValueError) as e:
        raise GalleryError(f"{file}: malformed ({e})") from e
    if doc.get("count") != manifest.count:
        raise GalleryError(f"{file}: count {doc.get('count')!r} does not match its shards ({manifest.count} entries)")
    return manifest, raw


def write_manifest(root: Path, manifest: ShardedManifest) -> bytes:
    """Publish a sharded gallery's manifest atomically and durably (temporary file, fsync, rename, fsync folder).

    Args:
        root: The sharded gallery's folder (exists).
        manifest: What to write.

    Returns:
        The bytes written.
    """
    raw = (json.dumps(manifest.to_json(), indent=1) + "\n").encode()
    tmp = root / (SHARDS_NAME + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / SHARDS_NAME)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return raw


def _parse(doc: dict[str, Any]) -> ShardedManifest:
    dim, attributes, aam_shape = doc["dim"], doc["attributes"], doc["aam_shape"]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise InputError(f"dim must be a positive integer, got {dim!r}")
    if (not isinstance(attributes, list) or not attributes or not all(isinstance(a, str) and a for a in attributes)
            or len(set(attributes)) != len(attributes)):
        raise InputError("attributes must be a non-empty list of distinct names")
    if aam_shape is not None and not (isinstance(aam_shape, list) and len(aam_shape) == 2
                                      and all(_is_int(s, 1) for s in aam_shape)):
        raise InputError(f"aam_shape must be [h, w] or null, got {aam_shape!r}")
    if not isinstance(doc["model"], str) or doc["metric"] not in METRICS:
        raise InputError("model must be a string and metric one of " + ", ".join(METRICS))
    shards = doc["shards"]
    if not isinstance(shards, list) or not shards:
        raise InputError("shards must be a non-empty list")
    entries = []
    for i, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("path"), str)
                and s["path"] and _is_int(s.get("count"), 0)):
            raise InputError(f"shard {i} must have a name, a path and a count")
        entries.append(ShardEntry(s["name"], s["path"], s["count"]))
    if len({e.name for e in entries}) != len(entries) or len({e.path for e in entries}) != len(entries):
        raise InputError("shard names and paths must be distinct")
    return ShardedManifest(dim, tuple(attributes), None if aam_shape is None else (aam_shape[0], aam_shape[1]),
                           doc["model"], doc["metric"], tuple(entries))


def _is_int(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def manifest_for(identity: dict[str, Any], names: Sequence[str], counts: Sequence[int]) -> ShardedManifest:
    """A manifest for shards ``names`` (folders of the same names) with an identity as :meth:`identity` writes it.

    Args:
        identity: ``dim``, ``attributes``, ``aam_shape``, ``model``, ``metric``.
        names: Shard names, in global-id order.
        counts: Their entry counts.

    Returns:
        The manifest.
    """
    aam = identity["aam_shape"]
    return ShardedManifest(int(identity["dim"]), tuple(identity["attributes"]),
                           None if aam is None else (int(aam[0]), int(aam[1])), identity["model"], identity["metric"],
                           tuple(ShardEntry(n, n, int(c)) for n, c in zip(names, counts, strict=True)))
