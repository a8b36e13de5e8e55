"""The gallery store's on-disk format: identity, manifest and journal records, parsed strictly.

docs/architecture.md §10 describes the store as a whole.

A gallery folder holds::

    gallery.json       base manifest: identity (dim, attributes, aam_shape, model, metric, storage), count, the
                       segments folded into it (name, count, first id, sha256 and size of every file), its
                       generation, and the names of segment folders that are garbage (merged away by a compaction,
                       not yet deleted)
    gallery.journal    one header line naming the generation it continues, then one checksummed line per record:
                       ``begin`` (a writer starts a segment folder of that name) and ``add`` (a segment is published)
    codecs.npz         the trained state of the storage codecs (format 3, trained modes only; written once at creation)
    segments/<name>/   embedding.npy, the attribute rows (attr.npy in float16, else one attr.<array>.npy per stored
                       codec array), probs.npy, the maps likewise (aam.npy..., only with ``aam_shape``), norms.npy
                       (each float16 attribute row's squared norm, for weighted scans; segments written before it
                       lack it; not stored with decoded rows, whose norms come with the decoding),
                       attr_by_attribute.npy (float16 only, format 4: the same rows attribute by attribute, [M, n, C],
                       which weighted scans stream; segments written before lack it), meta.jsonl
    .lock              locked as well by writers, for writers of format 1 (which lock only this file)

The published gallery is the base's segments followed by the ``add`` records of a journal of the same generation. A
journal of an older generation is stale (its records are already in the base); one of a newer generation means the
base was read before a compaction replaced both, so the reader reads again. A journal line is the
crc32 of its JSON (8 hex digits), a space, the JSON and a newline. Lines after the last intact one whose checksum fails
(or an unfinished last line) are a torn tail, a write cut short: ignored. A line whose checksum holds but whose record
is malformed or out of sequence, or an intact line after a damaged one, is corruption.

Format 1 (runtimes before the journal) had no journal, generation or garbage; format 2 no storage field (its rows
and maps are float16, :mod:`attrimeter.runtime.storage`); format 3 no ``attr_by_attribute.npy`` (the scan copy of
float16 rows, docs/architecture.md §10: a weighted scan then reads ``attr.npy``). All are still read, a writer
upgrades the manifest to format 4 when it opens it, and a compaction writes the scan copy of the segments it merges.
Everything read here is checked field by field: what does not parse into exactly this
shape is a :class:`CorruptGalleryError` naming the file, never another exception.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from attrimeter.runtime.errors import CorruptGalleryError, GalleryError, InputError
from attrimeter.runtime.storage import Storage, float16_storage, parse_storage

__all__ = [
    "DTYPES", "FORMAT", "JOURNAL_FORMAT", "JOURNAL_NAME", "JOURNAL_VERSION", "MANIFEST_NAME", "META", "METRICS",
    "OPTIONAL", "SEGMENTS", "VERSION",
    "GallerySpec", "Journal", "Manifest", "SegmentRecord", "encode_journal_header", "encode_manifest", "encode_record",
    "is_segment_name", "make_spec", "parse_journal", "parse_journal_header", "parse_manifest",
]

FORMAT = "attrimeter-gallery"
JOURNAL_FORMAT = "attrimeter-gallery-journal"
VERSION = 4  # written; 1, 2 (float16 storage, no "storage" field) and 3 (no scan copy) are still read
JOURNAL_VERSION = 2  # the journal's own format: unchanged by formats 3 and 4
MANIFEST_NAME = "gallery.json"
JOURNAL_NAME = "gallery.journal"
SEGMENTS = "segments"
META = "meta.jsonl"
METRICS = ("l2", "ip")
# The arrays every segment holds whatever its storage (attribute rows and maps: :class:`Storage`'s arrays).
DTYPES = {"embedding": np.dtype("<f4"), "probs": np.dtype("<f4"), "norms": np.dtype("<f4")}
# Files a segment may lack: written since a later runtime, derived from the others (readers recompute them, or
# read the others instead).
OPTIONAL = frozenset({"norms.npy", "attr_by_attribute.npy"})

_MAX = 1 << 62  # bound on counts, ids, sizes and dims: keeps all arithmetic on them inside int64
_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,99}")  # what writers name segments: no dots, separators, controls
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEYS = {1: {"format", "version", "dim", "attributes", "aam_shape", "model", "metric", "count", "segments"}}
_MANIFEST_KEYS[2] = _MANIFEST_KEYS[1] | {"generation", "garbage"}
_MANIFEST_KEYS[3] = _MANIFEST_KEYS[2] | {"storage"}
_MANIFEST_KEYS[4] = _MANIFEST_KEYS[3]  # same fields; float16 segments gain the scan copy of their attribute rows
_SEGMENT_KEYS = {"name", "count", "first_id", "files", "sizes", "bytes"}


@dataclass(frozen=True)
class GallerySpec:
    """A gallery's identity: what every segment's arrays must look like."""

    dim: int
    attributes: tuple[str, ...]
    aam_shape: tuple[int, int] | None
    model: str
    metric: str
    storage: Storage  # how attribute rows and maps are stored (format 3; float16 before)

    def shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """The shape of each array of ``n`` entries as the gallery reads and appends them (decoded), by name."""
        m = len(self.attributes)
        out = {"embedding": (n, self.dim), "attr": (n, m, self.dim), "probs": (n, m)}
        if self.aam_shape is not None:
            out["aam"] = (n, m, *self.aam_shape)
        out["norms"] = (n, m)  # ‖attr row‖² in float32 (of the decoded stored values)
        return out

    def layout(self, n: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The dtype and shape of each array file of a segment of ``n`` entries, keyed by file stem."""
        m = len(self.attributes)
        out = {"embedding": (DTYPES["embedding"], (n, self.dim))}
        stored = {stem: (dtype, (n, *shape)) for stem, dtype, shape in self.storage.arrays}
        out.update({stem: stored[stem] for stem in self.storage.stems("attr")})
        out["probs"] = (DTYPES["probs"], (n, m))
        out.update({stem: stored[stem] for stem in self.storage.stems("aam")})
        if self.storage.stores_norms:
            out["norms"] = (DTYPES["norms"], (n, m))
        return out

    @property
    def by_attribute(self) -> frozenset[str]:
        """The arrays that segments also hold attribute by attribute (format 4): float16 attribute rows.

        The copy, ``<key>_by_attribute.npy`` holding ``[M, n, C]``, is what weighted scans stream (only the attributes
        they weigh, contiguously); hits are read from ``<key>.npy``, one read per entry.
        """
        return frozenset({"attr"}) if self.storage.stores_norms else frozenset()

    @staticmethod
    def scan_file(key: str) -> str:
        """The file name of array ``key``'s copy attribute by attribute."""
        return f"{key}_by_attribute.npy"

    def files(self) -> set[str]:
        """The names of a segment's files (as written now; see :data:`OPTIONAL`)."""
        return ({f"{key}.npy" for key in self.layout(0)} | {self.scan_file(key) for key in self.by_attribute}
                | {META})

    def accepts(self, names: Set[str]) -> bool:
        """Whether ``names`` are the files of a segment: :meth:`files`, less any of the :data:`OPTIONAL` ones."""
        return self.files() - OPTIONAL <= names <= self.files()

    def header(self) -> dict[str, Any]:
        """The identity fields of the manifest."""
        return {"dim": self.dim, "attributes": list(self.attributes),
                "aam_shape": None if self.aam_shape is None else list(self.aam_shape), "model": self.model,
                "metric": self.metric, "storage": self.storage.to_json()}


@dataclass(frozen=True)
class SegmentRecord:
    """One published segment: its folder name, ids ``[first_id, first_id + count)`` and its files' sha256 and sizes."""

    name: str
    count: int
    first_id: int
    files: Mapping[str, str]
    sizes: Mapping[str, int]

    @property
    def bytes(self) -> int:
        """Total size of its files."""
        return sum(self.sizes.values())

    def to_json(self) -> dict[str, Any]:
        """The record as stored in the manifest and the journal."""
        return {"name": self.name, "count": self.count, "first_id": self.first_id, "files": dict(self.files),
                "sizes": dict(self.sizes), "bytes": self.bytes}


@dataclass(frozen=True)
class Manifest:
    """A parsed ``gallery.json``."""

    spec: GallerySpec
    version: int
    generation: int  # 0 for format 1, which has no journal
    count: int
    segments: tuple[SegmentRecord, ...]
    garbage: tuple[str, ...]


@dataclass(frozen=True)
class Journal:
    """Journal records read from some byte offset.

    Readers resume after the last ``add`` record: a writer may cut the ``begin`` records after it off again (when
    the write they announce fails), never an ``add``.

    Attributes:
        begun: Names of ``begin`` records read (segment folders a writer started).
        added: ``add`` records read, in order.
        seq: Sequence number of the last ``add`` record read (or the one given to start from).
        end: Byte offset just past it (or the offset started from).
        torn: Whether the bytes after the last intact record hold an unfinished write.
    """

    begun: tuple[str, ...]
    added: tuple[SegmentRecord, ...]
    seq: int
    end: int
    torn: bool


def make_spec(dim: Any, attributes: Any, aam_shape: Any, model: Any, metric: Any,
              storage: Storage | None = None) -> GallerySpec:
    """Check a gallery's identity.

    Args:
        dim: Embedding width C (a positive integer).
        attributes: Distinct non-empty attribute names.
        aam_shape: ``(h, w)`` of positive integers, or ``None``.
        model: Identity of the embedding model.
        metric: One of :data:`METRICS`.
        storage: How rows and maps are stored (checked by its maker); None: float16 (formats 1 and 2).

    Returns:
        The spec.

    Raises:
        InputError: Naming the bad argument.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 < dim < _MAX:
        raise InputError(f"dim must be a positive integer, got {dim!r}")
    if isinstance(attributes, str) or not isinstance(attributes, Sequence) or not attributes:
        raise InputError("attributes must be a non-empty sequence of names")
    if not all(isinstance(a, str) and a for a in attributes) or len(set(attributes)) != len(attributes):
        raise InputError(f"attributes must be distinct non-empty strings, got {list(attributes)!r}")
    if aam_shape is not None:
        if (isinstance(aam_shape, str) or not isinstance(aam_shape, Sequence) or len(aam_shape) != 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 < s < _MAX
                           for s in aam_shape)):
            raise InputError(f"aam_shape must be (h, w) of positive integers or None, got {aam_shape!r}")
        aam_shape = (int(aam_shape[0]), int(aam_shape[1]))
    if not isinstance(model, str):
        raise InputError(f"model must be a string (the export's source sha256), got {type(model).__name__}")
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if storage is None:
        storage = float16_storage(int(dim), len(attributes), aam_shape)
    return GallerySpec(int(dim), tuple(attributes), aam_shape, model, metric, storage)


def is_segment_name(name: Any) -> bool:
    """Whether ``name`` is a plain segment folder name (no dot, separator or control character; ≤ 100 chars)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


# ---------------------------------------------------------------------- manifest


def encode_manifest(manifest: Manifest) -> bytes:
    """``gallery.json`` bytes for ``manifest`` (always the current format version)."""
    doc = {"format": FORMAT, "version": VERSION, **manifest.spec.header(), "count": manifest.count,
           "generation": manifest.generation, "garbage": list(manifest.garbage),
           "segments": [s.to_json() for s in manifest.segments]}
    return (json.dumps(doc, indent=1) + "\n").encode()


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and check ``gallery.json``.

    Args:
        raw: The file's bytes.
        where: The file's path, for messages.

    Returns:
        The manifest.

    Raises:
        CorruptGalleryError: Not a gallery manifest, or malformed (the message says what).
        GalleryError: A gallery format version this runtime does not read.
    """
    doc = _loads(raw, where, "not a gallery manifest")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CorruptGalleryError(f"{where}: not an AttriMeter gallery manifest (format {_short(found)}, expected "
                                  f"{FORMAT!r})")
    version = doc.get("version")
    if not _is_int(version) or version not in _MANIFEST_KEYS:
        raise GalleryError(f"{where}: gallery format version {_short(version)} is not supported (this runtime reads "
                           f"versions {', '.join(map(str, _MANIFEST_KEYS))})")
    if set(doc) != _MANIFEST_KEYS[version]:
        odd = sorted(map(_short, set(doc) ^ _MANIFEST_KEYS[version]))
        raise CorruptGalleryError(f"{where}: malformed (missing or unknown fields: {', '.join(odd[:5])})")
    aam_shape = doc["aam_shape"]
    if aam_shape is not None and not isinstance(aam_shape, list):
        raise CorruptGalleryError(f"{where}: bad gallery identity (aam_shape must be a list or null)")
    try:
        spec = make_spec(doc["dim"], doc["attributes"], None if aam_shape is None else tuple(aam_shape),
                         doc["model"], doc["metric"])
    except InputError as e:
        raise CorruptGalleryError(f"{where}: bad gallery identity ({e})") from e
    if version >= 3:
        spec = replace(spec, storage=parse_storage(doc["storage"], where, dim=spec.dim,
                                                   attributes=len(spec.attributes), aam_shape=spec.aam_shape))
    if not isinstance(doc["attributes"], list):
        raise CorruptGalleryError(f"{where}: bad gallery identity (attributes must be a list)")
    if not _is_int(doc["count"]) or not isinstance(doc["segments"], list):
        raise CorruptGalleryError(f"{where}: malformed (count must be an integer and segments a list)")
    generation, garbage = (0, []) if version == 1 else (doc["generation"], doc["garbage"])
    if version > 1 and (not _is_int(generation, 1) or not isinstance(garbage, list)
                        or not all(is_segment_name(g) for g in garbage)):
        raise CorruptGalleryError(f"{where}: malformed (generation must be a positive integer, garbage a list of "
                                  "segment names)")
    segments, first, names = [], 0, set()
    for i, entry in enumerate(doc["segments"]):
        record = _segment_record(entry, spec, first)
        if record is None or record.name in names:
            raise CorruptGalleryError(f"{where}: segment {i} is malformed or out of order")
        segments.append(record)
        names.add(record.name)
        first += record.count
    if first != doc["count"]:
        raise CorruptGalleryError(f"{where}: count {doc['count']} does not match its segments ({first} entries)")
    if names & set(garbage):
        raise CorruptGalleryError(f"{where}: malformed (a published segment is also listed as garbage)")
    return Manifest(spec, version, generation, first, tuple(segments), tuple(garbage))


# ---------------------------------------------------------------------- journal


def encode_journal_header(generation: int) -> bytes:
    """The first line of a journal that continues base generation ``generation``."""
    return _line({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "generation": generation})


def encode_record(seq: int, *, begin: str | None = None, add: SegmentRecord | None = None) -> bytes:
    """One journal line: a ``begin`` (folder ``begin`` started) or an ``add`` (segment ``add`` published) record."""
    if (begin is None) == (add is None):
        raise ValueError("a journal record is a begin or an add")
    body = {"seq": seq, "op": "begin", "name": begin} if add is None else {"seq": seq, "op": "add",
                                                                           "segment": add.to_json()}
    return _line(body)


def parse_journal_header(raw: bytes, where: str) -> tuple[int, int]:
    """The generation a journal continues and the byte offset of its first record.

    Raises:
        CorruptGalleryError: No complete, intact, well-formed header line.
    """
    nl = raw.find(b"\n")
    header = _record(raw[:nl], where, 0) if nl >= 0 else None
    if (not isinstance(header, dict) or set(header) != {"format", "version", "generation"}
            or header["format"] != JOURNAL_FORMAT or header["version"] != JOURNAL_VERSION
            or not _is_int(header["generation"], 1)):
        raise CorruptGalleryError(f"{where}: malformed journal header")
    return header["generation"], nl + 1


def parse_journal(raw: bytes, where: str, *, spec: GallerySpec, start: int, seq: int, first_id: int,
                  names: Set[str]) -> Journal:
    """Parse journal records from byte offset ``start`` (past the header or past records already read).

    Args:
        raw: The file's bytes from ``start`` to its end.
        where: The file's path, for messages.
        spec: The gallery's identity (``add`` records must match it).
        start: Byte offset of ``raw`` in the file.
        seq: Sequence number of the last record before ``start`` (0 after the header).
        first_id: The first id the next ``add`` must start at.
        names: Segment names already published (an ``add`` may not reuse one).

    Returns:
        The records read (offsets in file coordinates).

    Raises:
        CorruptGalleryError: An intact record that is malformed or out of sequence, or an intact record after a
            damaged line.
    """
    begun, added, names = [], [], set(names)
    i = end = 0
    resume_seq, bad = seq, None
    while (nl := raw.find(b"\n", i)) >= 0:
        body = _record(raw[i:nl], where, start + i)
        if body is None:  # checksum broken: a torn write, unless an intact record follows
            bad = start + i if bad is None else bad
        elif bad is not None:
            raise CorruptGalleryError(f"{where}: the record at byte {bad} is damaged although later records are intact")
        elif (record := _journal_record(body, spec, seq + 1, first_id, names)) is None:
            raise CorruptGalleryError(f"{where}: the record at byte {start + i} is malformed or out of sequence")
        else:
            seq += 1
            if isinstance(record, SegmentRecord):
                added.append(record)
                names.add(record.name)
                first_id += record.count
                resume_seq, end = seq, nl + 1
            else:
                begun.append(record)
        i = nl + 1
    return Journal(tuple(begun), tuple(added), resume_seq, start + end, bad is not None or i < len(raw))


def _journal_record(body: Any, spec: GallerySpec, seq: int, first_id: int,
                    names: set[str]) -> SegmentRecord | str | None:
    """A checked record body: the published segment (add), the started folder name (begin), or None if malformed."""
    if not isinstance(body, dict) or body.get("seq") != seq or not _is_int(body.get("seq"), 1):
        return None
    if body.get("op") == "begin" and set(body) == {"seq", "op", "name"} and is_segment_name(body["name"]):
        return str(body["name"])
    if body.get("op") == "add" and set(body) == {"seq", "op", "segment"}:
        record = _segment_record(body["segment"], spec, first_id)
        return record if record is not None and record.name not in names else None
    return None


# ---------------------------------------------------------------------- helpers


def _segment_record(entry: Any, spec: GallerySpec, first_id: int) -> SegmentRecord | None:
    """A checked segment entry starting at ``first_id``, or None if it is malformed in any way."""
    ok = (isinstance(entry, dict) and set(entry) == _SEGMENT_KEYS and is_segment_name(entry["name"])
          and _is_int(entry["count"], 1) and entry["first_id"] == first_id and _is_int(entry["first_id"])
          and isinstance(entry["files"], dict) and spec.accepts(set(entry["files"]))
          and all(isinstance(h, str) and _SHA256.fullmatch(h) for h in entry["files"].values())
          and isinstance(entry["sizes"], dict) and set(entry["sizes"]) == set(entry["files"])
          and all(_is_int(s) for s in entry["sizes"].values()) and _is_int(entry["bytes"])
          and entry["bytes"] == sum(entry["sizes"].values())
          and first_id + entry["count"] < _MAX)
    if not ok:
        return None
    return SegmentRecord(entry["name"], entry["count"], entry["first_id"], dict(entry["files"]), dict(entry["sizes"]))


def _line(body: Mapping[str, Any]) -> bytes:
    text = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return b"%08x %s\n" % (zlib.crc32(text), text)


def _record(line: bytes, where: str, offset: int) -> Any:
    """The JSON of a journal line; None when its checksum fails (a torn write).

    Raises:
        CorruptGalleryError: The checksum holds but the JSON does not parse (deep nesting included).
    """
    if len(line) < 10 or line[8:9] != b" ":
        return None
    text = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(text):
            return None
    except ValueError:
        return None
    return _loads(text, where, f"the record at byte {offset} is not JSON")


def _loads(raw: bytes, where: str, what: str) -> Any:
    """Strict JSON (no NaN or Infinity); any parse failure, too deep nesting included, is named."""
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw, parse_constant=constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # RecursionError: deeper than the parser goes
        raise CorruptGalleryError(f"{where}: {what} ({type(e).__name__}: {_short(str(e))})") from e


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and low <= x < _MAX


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
