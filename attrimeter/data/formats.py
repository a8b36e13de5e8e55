"""Loaders for the real Market-1501 and DukeMTMC-reID folders and their attribute annotations (DESIGN §7).

Folder layout (both data sets)::

    root/
        bounding_box_train/   training images
        query/                query images
        bounding_box_test/    gallery images
        market_attribute.mat  (or duke_attribute.mat; also looked for in root/attribute/)

Image names carry the identity and the camera: ``0002_c1s1_000451_03.jpg`` (Market-1501: pid, camera 1-6, sequence,
frame, box) and ``0005_c2_f0046985.jpg`` (DukeMTMC-reID: pid, camera 1-8, frame). As in the standard protocol
(torchreid, fast-reid), junk images (pid -1) are dropped everywhere and distractors (pid 0000) are kept in the gallery
only; camera ids become 0-based.

The attribute files are MATLAB structs ``market_attribute`` / ``duke_attribute`` with fields ``test`` and ``train``
(Market-1501 in that order, DukeMTMC-reID ``train`` first); each split is a struct of per-attribute 1xN MATLAB
doubles coded 1/2 (one entry per identity, identities in ascending pid order; stored compactly, so ``loadmat``
returns them as ``uint8``), Market's ``age`` (1-4, ignored here) and ``image_index`` (a cell of 4-digit pid
strings). The field order of ``test`` differs from ``train``. :func:`write_attribute_mat` writes that exact
structure, so the synthetic data set and the test fixtures read like the official files, also for third-party
loaders that index the struct by position.

Codes other than 1 and 2 (the official DukeMTMC-reID file codes ``top`` 0 for two training identities) load as
*unknown*: label :data:`~attrimeter.data.schema.UNKNOWN` (-1), with one :class:`UnknownAttributeWarning` per file
that names the entries; ``strict_attributes=True`` refuses such a file instead. A file that is structurally broken
(unreadable, a missing field, vectors of different lengths, a bad ``image_index``) always raises
:class:`DataFormatError` naming the file. Nothing assumes one colour per body part: a few DukeMTMC-reID test
identities are annotated with two or three lower-body colours, and some identities with none.

Only :func:`read_attribute_mat` needs scipy (the ``train`` extra); writing, listing folders and parsing names need
numpy only.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.data.matfile import write_mat
from attrimeter.data.schema import (
    DUKEMTMC,
    MARKET1501,
    UNKNOWN,
    AttributeSchema,
    codes_from_labels,
    get_schema,
    labels_from_codes,
)

__all__ = [
    "DataFormatError",
    "UnknownAttributeWarning",
    "Sample",
    "ReIDDataset",
    "STYLES",
    "IMAGE_SUFFIXES",
    "SPLIT_FOLDERS",
    "attribute_file_name",
    "parse_image_name",
    "list_images",
    "attributes_from_mat",
    "read_attribute_mat",
    "write_attribute_mat",
    "load_market1501",
    "load_dukemtmc",
    "load_dataset",
]

STYLES: tuple[str, ...] = ("market1501", "dukemtmc")
"""Known data set / file-name styles."""

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".png"})
"""Image file suffixes that count (compared lower-case); anything else in a split folder (e.g. Thumbs.db) is skipped."""

SPLIT_FOLDERS: dict[str, str] = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
"""Split name to its folder under the data set root."""

JUNK_PID = -1
DISTRACTOR_PID = 0

# pid is "-1" (junk) or 4 digits; everything after the camera is format-specific but its shape is checked too, so
# that a stray file ("0002_c1.jpg", "img_0001.jpg") is reported instead of being half-parsed.
_NAME_PATTERNS: dict[str, re.Pattern[str]] = {
    "market1501": re.compile(r"(?P<pid>-1|\d{4})_c(?P<cam>\d)s(?P<seq>\d)_(?P<frame>\d+)_(?P<box>\d+)"),
    "dukemtmc": re.compile(r"(?P<pid>-1|\d{4})_c(?P<cam>\d)_f(?P<frame>\d+)"),
}
_NAME_EXAMPLES = {"market1501": "0002_c1s1_000451_03.jpg", "dukemtmc": "0005_c2_f0046985.jpg"}
_NUM_CAMERAS = {"market1501": 6, "dukemtmc": 8}

# Name of the top-level MATLAB struct and of the file, per schema.
_STRUCT_NAMES = {"market1501": "market_attribute", "dukemtmc": "duke_attribute"}
# Field orders of the official files: train and test differ, Market starts with `age`, `image_index` comes last.
# Third-party loaders index these structs by position, so the writer reproduces them exactly.
_OFFICIAL_FIELD_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "market1501": {
        "train": ("age", "backpack", "bag", "handbag", "downblack", "downblue", "downbrown", "downgray", "downgreen",
                  "downpink", "downpurple", "downwhite", "downyellow", "upblack", "upblue", "upgreen", "upgray",
                  "uppurple", "upred", "upwhite", "upyellow", "clothes", "down", "up", "hair", "hat", "gender"),
        "test": ("age", "backpack", "bag", "handbag", "clothes", "down", "up", "hair", "hat", "gender", "upblack",
                 "upwhite", "upred", "uppurple", "upyellow", "upgray", "upblue", "upgreen", "downblack", "downwhite",
                 "downpink", "downpurple", "downyellow", "downgray", "downblue", "downgreen", "downbrown"),
    },
    "dukemtmc": {
        "train": ("backpack", "bag", "handbag", "boots", "gender", "hat", "shoes", "top", "downblack", "downwhite",
                  "downred", "downgray", "downblue", "downgreen", "downbrown", "upblack", "upwhite", "upred",
                  "uppurple", "upgray", "upblue", "upgreen", "upbrown"),
        "test": ("boots", "shoes", "top", "gender", "hat", "backpack", "bag", "handbag", "downblack", "downwhite",
                 "downred", "downgray", "downblue", "downgreen", "downbrown", "upblack", "upwhite", "upred", "upgray",
                 "upblue", "upgreen", "uppurple", "upbrown"),
    },
}
# Order of the splits in the official top-level struct (loaders that take the first field as the test split exist).
_MAT_SPLITS = {"market1501": ("test", "train"), "dukemtmc": ("train", "test")}
_AGE_FIELD = "age"
_INDEX_FIELD = "image_index"
# "teenager": the most common of Market-1501's four age groups (1 young .. 4 old) in the official file, about three
# quarters of the training identities.
_DEFAULT_AGE = 2
_SHOWN_IDS = 20  # identities quoted per attribute in the unknown-code warning
# Folder names of the official archives: a root that holds one of these instead of the splits is followed into it.
_ARCHIVE_FOLDERS = {"market1501": "Market-1501-v15.09.15", "dukemtmc": "DukeMTMC-reID"}


class DataFormatError(ValueError):
    """A data set folder or annotation file does not follow the expected format; the message names the file."""


class UnknownAttributeWarning(UserWarning):
    """An attribute file holds codes other than 1 and 2; those entries were read as unknown (the message names them)."""


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    Attributes:
        path: Image file.
        pid: Identity as in the file name (0 = distractor).
        camid: 0-based camera index (``c1`` -> 0).
    """

    path: Path
    pid: int
    camid: int


@dataclass
class ReIDDataset:
    """A ReID data set in the standard train / query / gallery protocol, with identity attributes.

    Attributes:
        name: ``"market1501"`` or ``"dukemtmc"``.
        root: Data set root folder (the one holding the split folders).
        schema: Attribute schema of the data set.
        train: Training samples, sorted by path.
        query: Query samples, sorted by path.
        gallery: Gallery samples (distractors included, junk dropped), sorted by path.
        attributes: Identity to ``int8`` label vector of length ``len(schema)`` (0/1, or
            :data:`~attrimeter.data.schema.UNKNOWN` = -1 where the file's code was neither 1 nor 2), for the train
            and test identities (read-only arrays); empty when loaded without attributes.
        attribute_file: The annotation file the attributes came from, or ``None``.
        dropped: Split name to the number of images left out by the protocol (junk everywhere, distractors in
            train and query).
    """

    name: str
    root: Path
    schema: AttributeSchema
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    attributes: dict[int, np.ndarray]
    attribute_file: Path | None = None
    dropped: dict[str, int] = field(default_factory=dict)

    def attributes_of(self, pid: int) -> np.ndarray:
        """Attribute labels of one identity.

        Args:
            pid: Identity.

        Returns:
            A fresh ``int8`` vector of length ``len(self.schema)``: 0/1, -1 where unknown.

        Raises:
            KeyError: If the identity has no attributes (the message names it).
        """
        try:
            return self.attributes[int(pid)].copy()
        except KeyError:
            source = self.attribute_file if self.attribute_file is not None else "no attribute file loaded"
            raise KeyError(f"{self.name}: identity {pid} has no attributes ({source})") from None

    @property
    def train_pids(self) -> list[int]:
        """Sorted unique training identities."""
        return sorted({s.pid for s in self.train})

    def summary(self) -> str:
        """One human-readable line: identities and images per split."""
        parts = []
        for split in SPLIT_FOLDERS:
            samples: list[Sample] = getattr(self, split)
            pids = {s.pid for s in samples if s.pid != DISTRACTOR_PID}
            n_distractors = sum(s.pid == DISTRACTOR_PID for s in samples)
            part = f"{split} {len(pids)} ids / {len(samples)} images"
            if n_distractors:
                part += f" ({n_distractors} distractors)"
            parts.append(part)
        dropped = sum(self.dropped.values())
        tail = f", {dropped} junk/distractor images dropped" if dropped else ""
        attrs = (f"attributes ({len(self.schema)}) for {len(self.attributes)} ids" if self.attributes
                 else "no attributes")
        unknown = sum(int((v == UNKNOWN).sum()) for v in self.attributes.values())
        if unknown:
            attrs += f" ({unknown} unknown entries)"
        return f"{self.name} at {self.root}: {', '.join(parts)}{tail}; {attrs}"


def attribute_file_name(schema: AttributeSchema) -> str:
    """File name of a schema's official annotation file (``market_attribute.mat`` / ``duke_attribute.mat``).

    Args:
        schema: Attribute schema.

    Returns:
        The file name.

    Raises:
        ValueError: If the schema is not one of the known data sets.
    """
    return f"{_struct_name(schema)}.mat"


def _struct_name(schema: AttributeSchema) -> str:
    try:
        return _STRUCT_NAMES[schema.name]
    except KeyError:
        raise ValueError(f"no attribute file format for schema {schema.name!r}; known: {', '.join(STYLES)}") from None


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown data set style {style!r}; known: {', '.join(STYLES)}")


def parse_image_name(path: str | Path, style: str) -> tuple[int, int]:
    """Identity and camera of an image from its file name.

    Args:
        path: Image path or bare file name, e.g. ``0002_c1s1_000451_03.jpg`` (Market-1501) or
            ``0005_c2_f0046985.jpg`` (DukeMTMC-reID).
        style: ``"market1501"`` or ``"dukemtmc"``.

    Returns:
        ``(pid, camid)`` with pid -1 for junk, 0 for distractors, and ``camid`` 0-based.

    Raises:
        ValueError: For an unknown style.
        DataFormatError: If the name does not follow the style or the camera is out of range (the message names
            the file).
    """
    _check_style(style)
    path = Path(path)
    match = _NAME_PATTERNS[style].fullmatch(path.stem)
    if match is None:
        raise DataFormatError(
            f"{path}: malformed {style} image name {path.name!r} (expected a name like {_NAME_EXAMPLES[style]!r})"
        )
    cam = int(match["cam"])
    if not 1 <= cam <= _NUM_CAMERAS[style]:
        raise DataFormatError(f"{path}: camera c{cam} out of range c1..c{_NUM_CAMERAS[style]} for {style}")
    return int(match["pid"]), cam - 1


def list_images(folder: str | Path, style: str) -> list[Sample]:
    """All images of a split folder (junk included), parsed and sorted by path; files are not opened.

    Args:
        folder: Split folder.
        style: ``"market1501"`` or ``"dukemtmc"``.

    Returns:
        One :class:`Sample` per ``.jpg`` / ``.png`` file, sorted by path.

    Raises:
        ValueError: For an unknown style.
        DataFormatError: If the folder is missing or a file name is malformed.
    """
    _check_style(style)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: {style} split folder not found")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    samples = []
    for p in paths:
        pid, camid = parse_image_name(p, style)
        samples.append(Sample(p, pid, camid))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# MATLAB struct access. loadmat represents a struct as a (1, 1) record array, a 0-d record array (squeeze_me), a
# mat_struct object (struct_as_record=False) or any of those wrapped in size-1 object arrays; the helpers below
# accept all of them so that the reader does not depend on one set of loadmat options.


def _unwrap(value: Any) -> Any:
    """Drill through size-1 object / record arrays down to the single element."""
    while isinstance(value, np.ndarray) and value.size == 1 and (value.dtype == object or value.dtype.names):
        value = value.reshape(-1)[0]
    return value


def _struct_fields(value: Any) -> dict[str, Any] | None:
    """Fields of a MATLAB struct, in file order, or ``None`` when ``value`` is not a (1x1) struct."""
    value = _unwrap(value)
    if isinstance(value, np.void) and value.dtype.names:
        return {name: value[name] for name in value.dtype.names}
    names = getattr(value, "_fieldnames", None)
    if names is not None:
        return {name: getattr(value, name) for name in names}
    return None


def _is_char_array(value: Any) -> bool:
    """A MATLAB char array as ``loadmat(chars_as_strings=False)`` returns it: one character per element."""
    return isinstance(value, np.ndarray) and (value.dtype.kind, value.dtype.itemsize) in (("U", 4), ("S", 1))


def _cell_scalar(value: Any) -> Any:
    # Cells wrap each entry: array(['0002']) for a string, [[1]] for a number, [['0', '0', '0', '2']] for a string
    # read with chars_as_strings=False.
    value = _unwrap(value)
    if _is_char_array(value):
        return "".join(value.reshape(-1).tolist())
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.reshape(-1)[0]
    return value


def _row_vector(value: Any) -> np.ndarray:
    """A MATLAB row / column vector or cell vector as a flat 1-D array; raises ValueError if it is not a vector."""
    arr = np.asarray(value)
    if sum(d > 1 for d in arr.shape) > 1:
        raise ValueError(f"expected a vector, got an array of shape {arr.shape}")
    arr = arr.reshape(-1)
    if arr.dtype == object:
        arr = np.array([_cell_scalar(x) for x in arr], dtype=object)
    return arr


def _index_entries(value: Any) -> list[Any]:
    # A cell of strings or numbers; squeeze_me turns a one-entry cell into its string, or (chars_as_strings=False)
    # into the bare characters of that string.
    value = _unwrap(value)
    if _is_char_array(value):
        return [_cell_scalar(value)]
    return list(_row_vector(value))


def _parse_pid(value: Any) -> int:
    if isinstance(value, (str, np.str_)):
        text = str(value).strip()
        if not re.fullmatch(r"-?\d+", text):
            raise ValueError(f"identity {text!r} is not a number")
        return int(text)
    number = float(value)
    if not np.isfinite(number) or number != int(number):
        raise ValueError(f"identity {value!r} is not an integer")
    return int(number)


@dataclass(frozen=True)
class _Unknown:
    """The entries of one attribute of one split whose code is neither 1 nor 2."""

    split: str
    name: str
    pids: tuple[int, ...]
    codes: tuple[float, ...]

    def describe(self) -> str:
        shown = ", ".join(f"{p} (code {c:g})" for p, c in zip(self.pids[:_SHOWN_IDS], self.codes, strict=False))
        more = f", ... ({len(self.pids) - _SHOWN_IDS} more)" if len(self.pids) > _SHOWN_IDS else ""
        return f"{self.split!r} struct, attribute {self.name!r}: identities {shown}{more}"


def _parse_split(
    fields: dict[str, Any], schema: AttributeSchema, split: str, source: str, fallback_pids: Iterable[int] | None,
    strict: bool,
) -> tuple[dict[int, np.ndarray], list[_Unknown]]:
    where = f"{source}: {split!r} struct"
    missing = [n for n in schema.names if n not in fields]
    if missing:
        raise DataFormatError(f"{where} lacks attribute field(s) {', '.join(missing)} (has: {', '.join(fields)})")
    codes: dict[str, np.ndarray] = {}
    for name in schema.names:
        try:
            vec = _row_vector(fields[name]).astype(np.float64)
        except (ValueError, TypeError) as exc:
            raise DataFormatError(f"{where}, attribute {name!r}: not a numeric vector ({exc})") from None
        codes[name] = vec
    lengths = {len(v) for v in codes.values()}
    if len(lengths) != 1:
        detail = ", ".join(f"{n}={len(v)}" for n, v in codes.items())
        raise DataFormatError(f"{where}: attribute vectors differ in length ({detail})")
    n = lengths.pop()

    if _INDEX_FIELD in fields:
        try:
            pids = [_parse_pid(x) for x in _index_entries(fields[_INDEX_FIELD])]
        except (ValueError, TypeError) as exc:
            raise DataFormatError(f"{where}, field {_INDEX_FIELD!r}: {exc}") from None
    elif fallback_pids is not None:
        # Files without image_index list identities in ascending pid order (what every third-party loader assumes).
        pids = sorted(int(p) for p in fallback_pids)
    else:
        raise DataFormatError(f"{where} has no {_INDEX_FIELD!r} field and no identity list was given to map entries")
    if len(pids) != n:
        raise DataFormatError(f"{where}: {len(pids)} identities but attribute vectors of length {n}")
    if len(set(pids)) != len(pids):
        dup = sorted({p for p in pids if pids.count(p) > 1})
        raise DataFormatError(f"{where}: identities listed more than once: {dup[:10]}")

    matrix = np.stack([codes[name] for name in schema.names], axis=1) if n else np.zeros((0, len(schema)))
    labels = labels_from_codes(matrix)  # NaN and every code other than 1 / 2 become UNKNOWN
    unknown = []
    for j in np.flatnonzero((labels == UNKNOWN).any(axis=0)):
        rows = np.flatnonzero(labels[:, j] == UNKNOWN)
        entry = _Unknown(split, schema.names[j], tuple(pids[i] for i in rows), tuple(float(matrix[i, j]) for i in rows))
        if strict:
            raise DataFormatError(f"{source}: {entry.describe()}: expected code 1 or 2 ({len(rows)} bad entries; "
                                  "without strict_attributes such codes load as unknown)")
        unknown.append(entry)
    labels.flags.writeable = False
    return {pid: labels[i] for i, pid in enumerate(pids)}, unknown


def attributes_from_mat(
    contents: Mapping[str, Any],
    schema: AttributeSchema,
    source: str = "<attribute mat>",
    pids: Mapping[str, Iterable[int]] | None = None,
    strict: bool = False,
) -> dict[str, dict[int, np.ndarray]]:
    """Decode the contents of an attribute ``.mat`` file, whatever ``loadmat`` options produced them.

    Args:
        contents: What ``scipy.io.loadmat`` returned (any ``squeeze_me`` / ``struct_as_record`` /
            ``chars_as_strings`` / ``mat_dtype`` setting).
        schema: Schema of the data set; selects the struct name (``market_attribute`` / ``duke_attribute``).
        source: File name used in messages.
        pids: Identities per split (``"train"`` / ``"test"``) for files without ``image_index``; entries are then
            matched to identities in ascending pid order.
        strict: Refuse codes other than 1 and 2 instead of reading them as unknown.

    Returns:
        ``{"train": {pid: labels}, "test": {pid: labels}}`` with read-only ``int8`` label vectors (0/1, and
        :data:`~attrimeter.data.schema.UNKNOWN` where the code is neither 1 nor 2).

    Raises:
        DataFormatError: If the struct, a split, an attribute field or ``image_index`` is missing or malformed, or
            (``strict``) a code is not 1 or 2 (the message names ``source``, the split, the attribute and the
            identities).

    Warns:
        UnknownAttributeWarning: Once, naming every entry read as unknown, when not ``strict``.
    """
    struct_name = _struct_name(schema)
    if struct_name not in contents:
        found = ", ".join(k for k in contents if not k.startswith("__")) or "nothing"
        raise DataFormatError(f"{source}: no struct {struct_name!r} (found: {found}); is this a {schema.name} file?")
    top = _struct_fields(contents[struct_name])
    if top is None:
        raise DataFormatError(f"{source}: {struct_name!r} is not a 1x1 struct")
    absent = [split for split in ("train", "test") if split not in top]
    if absent:
        raise DataFormatError(f"{source}: struct {struct_name!r} has no {absent[0]!r} field (has: {', '.join(top)})")
    out: dict[str, dict[int, np.ndarray]] = {}
    unknown: list[_Unknown] = []
    for split in ("train", "test"):
        fields = _struct_fields(top[split])
        if fields is None:
            raise DataFormatError(f"{source}: {struct_name}.{split} is not a 1x1 struct")
        out[split], found = _parse_split(fields, schema, split, source,
                                         None if pids is None else pids.get(split), strict)
        unknown += found
    if unknown:
        count = sum(len(u.pids) for u in unknown)
        warnings.warn(f"{source}: {count} attribute code(s) other than 1 or 2 read as unknown (left out of the "
                      f"attribute losses and metrics): {'; '.join(u.describe() for u in unknown)}. Pass "
                      "strict_attributes=True (--strict-attributes) to refuse the file instead.",
                      UnknownAttributeWarning, stacklevel=2)
    return out


def read_attribute_mat(
    path: str | Path, schema: AttributeSchema, pids: Mapping[str, Iterable[int]] | None = None, strict: bool = False
) -> dict[str, dict[int, np.ndarray]]:
    """Read an official (or :func:`write_attribute_mat`) attribute file.

    Args:
        path: ``market_attribute.mat`` or ``duke_attribute.mat``.
        schema: Schema of the data set.
        pids: Identities per split, used only when the file has no ``image_index`` (see :func:`attributes_from_mat`).
        strict: Refuse codes other than 1 and 2 instead of reading them as unknown.

    Returns:
        ``{"train": {pid: labels}, "test": {pid: labels}}`` with read-only ``int8`` label vectors (0/1, -1 for
        unknown); ``age`` is ignored.

    Raises:
        DataFormatError: If the file is missing, not a readable MATLAB v5 file, not in the expected structure, or
            (``strict``) holds a code other than 1 or 2.
        ImportError: If scipy is not installed.

    Warns:
        UnknownAttributeWarning: Once, naming every entry read as unknown, when not ``strict``.
    """
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: attribute file not found")
    try:
        contents = loadmat(str(path), squeeze_me=False, struct_as_record=True)
    except NotImplementedError as exc:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise DataFormatError(f"{path}: unsupported MATLAB file version ({exc}); save it with -v7") from exc
    except Exception as exc:  # loadmat raises many types on a damaged file; all mean the same to the caller
        raise DataFormatError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from exc
    return attributes_from_mat(contents, schema, str(path), pids, strict)


def _label_rows(labels: Mapping[int, np.ndarray], schema: AttributeSchema, split: str) -> tuple[list[int], np.ndarray]:
    pids = sorted(int(p) for p in labels)
    for pid in pids:
        if not 0 <= pid <= 9999:
            raise ValueError(f"{split}: identity {pid} cannot be written as a 4-digit image_index")
    rows = np.zeros((len(pids), len(schema)), dtype=np.int8)
    for i, pid in enumerate(pids):
        vec = np.asarray(labels[pid]).reshape(-1)
        if vec.shape[0] != len(schema):
            raise ValueError(f"{split}: identity {pid} has {vec.shape[0]} labels, schema {schema.name!r} has "
                             f"{len(schema)}")
        if not np.isin(vec, (0, 1, UNKNOWN)).all():
            raise ValueError(f"{split}: identity {pid} has labels other than 0/1 (or -1 for unknown): "
                             f"{vec.tolist()}")
        rows[i] = vec
    return pids, rows


def write_attribute_mat(
    path: str | Path,
    schema: AttributeSchema,
    train: Mapping[int, np.ndarray],
    test: Mapping[int, np.ndarray],
    age: Mapping[int, int] | None = None,
    shuffle_test_fields: bool = True,
) -> None:
    """Write an attribute file in the official structure.

    The file holds a struct ``market_attribute`` (fields ``test``, ``train``) or ``duke_attribute`` (``train``,
    ``test``); each split is a struct of 1xN MATLAB doubles coded 1/2 (identities in ascending pid order; unknown
    labels are written as code 0, like the official DukeMTMC-reID file), Market's ``age`` first and
    ``image_index`` (a 1xN cell of 4-digit pid strings) last, in the field order of the official files. The file
    is compressed and laid out as MATLAB writes it (:mod:`attrimeter.data.matfile`): for the same content it
    decompresses to the same bytes as the official file.

    Args:
        path: Output ``.mat`` file (parent folders are created).
        schema: ``MARKET1501`` or ``DUKEMTMC``.
        train: Training identity to label vector (length ``len(schema)``; 0/1, -1 for unknown).
        test: Test identity to label vector.
        age: Market-1501 only: identity to age group 1-4 (1 young, 2 teenager, 3 adult, 4 old); identities not in
            it get 2 (teenager, the most common group in the official file). Ignored by the readers.
        shuffle_test_fields: Give ``test`` the official test field order, which differs from the train order (as in
            the real files); ``False`` writes both in the train order.

    Raises:
        ValueError: For an unknown schema, a label vector of the wrong length or with values other than 0/1/-1, an
            identity outside 0..9999, an age outside 1..4, or ``age`` given for DukeMTMC-reID (which has none).
    """
    struct_name = _struct_name(schema)
    orders = _OFFICIAL_FIELD_ORDER[schema.name]
    has_age = _AGE_FIELD in orders["train"]
    if age is not None and not has_age:
        raise ValueError(f"schema {schema.name!r} has no age field; pass age=None")
    age = age or {}
    for pid, group in age.items():
        if int(group) not in (1, 2, 3, 4):
            raise ValueError(f"identity {pid}: age group {group!r} is not one of 1, 2, 3, 4")

    structs: dict[str, dict[str, Any]] = {}
    for split in _MAT_SPLITS[schema.name]:
        pids, rows = _label_rows(train if split == "train" else test, schema, split)
        codes = codes_from_labels(rows).astype(np.float64)
        columns: dict[str, Any] = {name: codes[:, j] for j, name in enumerate(schema.names)}
        if has_age:
            columns[_AGE_FIELD] = np.array([int(age.get(p, _DEFAULT_AGE)) for p in pids], dtype=np.float64)
        order = orders[split] if shuffle_test_fields else orders["train"]
        structs[split] = {**{name: columns[name] for name in order}, _INDEX_FIELD: [f"{p:04d}" for p in pids]}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mat(path, struct_name, structs)


# ----------------------------------------------------------------------------------------------------------------
# Folder loaders


def _resolve_root(root: Path, style: str) -> Path:
    if not root.is_dir():
        raise DataFormatError(f"{root}: {style} data set folder not found")
    if not (root / SPLIT_FOLDERS["train"]).is_dir() and (root / _ARCHIVE_FOLDERS[style]).is_dir():
        return root / _ARCHIVE_FOLDERS[style]
    return root


def _find_attribute_file(root: Path, schema: AttributeSchema) -> Path:
    name = attribute_file_name(schema)
    candidates = [root / name, root / "attribute" / name]
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise DataFormatError(f"{root}: attribute file {name} not found (looked at {looked}); "
                          "pass attributes=False to load the images without attributes")


def _load(root: str | Path, schema: AttributeSchema, attributes: bool, strict: bool) -> ReIDDataset:
    style = schema.name
    root = _resolve_root(Path(root), style)
    splits: dict[str, list[Sample]] = {}
    dropped: dict[str, int] = {}
    for split, folder in SPLIT_FOLDERS.items():
        samples = list_images(root / folder, style)
        if not samples:
            raise DataFormatError(f"{root / folder}: no .jpg/.png images in the {split} split")
        # Standard protocol: junk never counts; distractors only populate the gallery.
        kept = [s for s in samples if s.pid != JUNK_PID and (split == "gallery" or s.pid != DISTRACTOR_PID)]
        dropped[split] = len(samples) - len(kept)
        if not kept:
            raise DataFormatError(f"{root / folder}: the {split} split holds only junk/distractor images")
        splits[split] = kept

    labels: dict[int, np.ndarray] = {}
    attribute_file = None
    if attributes:
        attribute_file = _find_attribute_file(root, schema)
        split_pids = {
            "train": {s.pid for s in splits["train"]},
            "test": {s.pid for s in splits["query"] + splits["gallery"] if s.pid != DISTRACTOR_PID},
        }
        per_split = read_attribute_mat(attribute_file, schema, pids=split_pids, strict=strict)
        for mat_split, pids in split_pids.items():
            known = per_split[mat_split]
            missing = sorted(pids - known.keys())
            if missing:
                image_splits = ["train"] if mat_split == "train" else ["query", "gallery"]
                example = next(s.path for sp in image_splits for s in splits[sp] if s.pid == missing[0])
                raise DataFormatError(
                    f"{attribute_file}: identity {missing[0]} (e.g. {example}) has no attributes in the "
                    f"{mat_split!r} struct ({len(missing)} such identities: {missing[:10]})"
                )
        for mat_split in ("train", "test"):
            for pid, vec in per_split[mat_split].items():
                if pid in (JUNK_PID, DISTRACTOR_PID):
                    continue  # the official test struct may list '0000'; distractors have no identity to describe
                if pid in labels and not np.array_equal(labels[pid], vec):
                    raise DataFormatError(f"{attribute_file}: identity {pid} has different attributes in train "
                                          "and test")
                labels[pid] = vec
    return ReIDDataset(
        name=style,
        root=root,
        schema=schema,
        train=splits["train"],
        query=splits["query"],
        gallery=splits["gallery"],
        attributes=labels,
        attribute_file=attribute_file,
        dropped=dropped,
    )


def load_market1501(root: str | Path, attributes: bool = True, strict_attributes: bool = False) -> ReIDDataset:
    """Load a Market-1501 folder (and its ``market_attribute.mat``).

    Args:
        root: Folder with ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (or a folder holding
            ``Market-1501-v15.09.15/``); ``gt_bbox/`` and other files are ignored.
        attributes: Read ``market_attribute.mat`` from ``root`` or ``root/attribute/``; ``False`` loads a folder
            without one (``attributes`` is then empty).
        strict_attributes: Refuse an attribute file with codes other than 1 and 2 instead of reading those
            entries as unknown (-1).

    Returns:
        The data set.

    Raises:
        DataFormatError: For a missing folder or file, a malformed image name, an empty split, a malformed
            attribute file (with ``strict_attributes``, also one with a code other than 1 or 2), or an identity in
            the images without attributes (the message names the file).

    Warns:
        UnknownAttributeWarning: When entries of the attribute file were read as unknown.
    """
    return _load(root, MARKET1501, attributes, strict_attributes)


def load_dukemtmc(root: str | Path, attributes: bool = True, strict_attributes: bool = False) -> ReIDDataset:
    """Load a DukeMTMC-reID folder (and its ``duke_attribute.mat``).

    Args:
        root: Folder with ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (or a folder holding
            ``DukeMTMC-reID/``).
        attributes: Read ``duke_attribute.mat`` from ``root`` or ``root/attribute/``; ``False`` loads a folder
            without one.
        strict_attributes: Refuse an attribute file with codes other than 1 and 2 (the official file codes ``top``
            0 for two training identities) instead of reading those entries as unknown (-1).

    Returns:
        The data set.

    Raises:
        DataFormatError: As :func:`load_market1501`.

    Warns:
        UnknownAttributeWarning: When entries of the attribute file were read as unknown.
    """
    return _load(root, DUKEMTMC, attributes, strict_attributes)


def _detect(root: Path) -> str:
    bases = {style: _resolve_root(root, style) for style in STYLES}
    for style, base in bases.items():
        name = attribute_file_name(get_schema(style))
        if (base / name).is_file() or (base / "attribute" / name).is_file():
            return style
    for base in dict.fromkeys(bases.values()):
        train = base / SPLIT_FOLDERS["train"]
        if not train.is_dir():
            continue
        stems = [p.stem for p in sorted(train.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES][:20]
        for style in STYLES:
            if stems and all(_NAME_PATTERNS[style].fullmatch(stem) for stem in stems):
                return style
    raise DataFormatError(
        f"{root}: cannot tell the data set: no market_attribute.mat / duke_attribute.mat and no "
        f"{SPLIT_FOLDERS['train']}/ with Market-1501 or DukeMTMC-reID image names; pass name=..."
    )


def load_dataset(
    root: str | Path, name: str | None = None, attributes: bool = True, strict_attributes: bool = False
) -> ReIDDataset:
    """Load a Market-1501 or DukeMTMC-reID folder, detecting which when ``name`` is not given.

    Detection looks for the attribute file first (``market_attribute.mat`` / ``duke_attribute.mat``), then at the
    image names in ``bounding_box_train/``.

    Args:
        root: Data set folder.
        name: ``"market1501"`` or ``"dukemtmc"``, or ``None`` to detect.
        attributes: Load the attribute file (see :func:`load_market1501`).
        strict_attributes: Refuse an attribute file with codes other than 1 and 2 instead of reading those
            entries as unknown.

    Returns:
        The data set.

    Raises:
        ValueError: For an unknown ``name``.
        DataFormatError: If the folder is missing, the data set cannot be detected, or loading fails.
    """
    root = Path(root)
    if name is None:
        if not root.is_dir():
            raise DataFormatError(f"{root}: data set folder not found")
        name = _detect(root)
    _check_style(name)
    loader = load_market1501 if name == "market1501" else load_dukemtmc
    return loader(root, attributes, strict_attributes)
