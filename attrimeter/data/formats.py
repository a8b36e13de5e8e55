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
(in that order); each split is a struct of per-attribute row vectors coded 1/2 (one entry per identity, identities
in ascending pid order), Market's ``age`` (1-4, ignored here) and ``image_index`` (a cell of 4-digit pid strings).
The field order of ``test`` differs from ``train``. :func:`write_attribute_mat` writes that exact structure, so the
synthetic data set and the test fixtures read like the official files, also for third-party loaders that index the
struct by position.

Only :func:`read_attribute_mat` and :func:`write_attribute_mat` need scipy (the ``train`` extra); listing folders and
parsing names needs numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.data.schema import DUKEMTMC, MARKET1501, AttributeSchema, get_schema

__all__ = [
    "DataFormatError",
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
_MAT_SPLITS = ("test", "train")  # order of the official top-level struct
_AGE_FIELD = "age"
_INDEX_FIELD = "image_index"
_DEFAULT_AGE = 3  # "adult": by far the most common of Market-1501's four age groups (1 young .. 4 old)
# Folder names of the official archives: a root that holds one of these instead of the splits is followed into it.
_ARCHIVE_FOLDERS = {"market1501": "Market-1501-v15.09.15", "dukemtmc": "DukeMTMC-reID"}


class DataFormatError(ValueError):
    """A data set folder or annotation file does not follow the expected format; the message names the file."""


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
        attributes: Identity to ``uint8`` 0/1 label vector of length ``len(schema)``, for the train and test
            identities (read-only arrays); empty when loaded without attributes.
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

    def attributes_of(self, pid: int, signed: bool = False) -> np.ndarray:
        """Attribute labels of one identity.

        Args:
            pid: Identity.
            signed: Return -1/+1 (``int8``) instead of 0/1 (``uint8``).

        Returns:
            A fresh vector of length ``len(self.schema)``.

        Raises:
            KeyError: If the identity has no attributes (the message names it).
        """
        try:
            labels = self.attributes[int(pid)]
        except KeyError:
            source = self.attribute_file if self.attribute_file is not None else "no attribute file loaded"
            raise KeyError(f"{self.name}: identity {pid} has no attributes ({source})") from None
        if signed:
            return 2 * labels.astype(np.int8) - 1
        return labels.copy()

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


def _cell_scalar(value: Any) -> Any:
    """One cell element as a scalar: cells wrap each entry (``array(['0002'])`` for a string, ``[[1]]`` a number)."""
    value = _unwrap(value)
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


def _parse_split(
    fields: dict[str, Any], schema: AttributeSchema, split: str, source: str, fallback_pids: Iterable[int] | None
) -> dict[int, np.ndarray]:
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
            pids = [_parse_pid(x) for x in _row_vector(fields[_INDEX_FIELD])]
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

    for name, vec in codes.items():
        bad = np.flatnonzero(~np.isin(vec, (1.0, 2.0)))  # NaN is never in the set, so it is caught here too
        if bad.size:
            i = int(bad[0])
            raise DataFormatError(
                f"{where}, attribute {name!r}: identity {pids[i]} has code {float(vec[i]):g}, expected 1 or 2 "
                f"({bad.size} bad entries)"
            )
    out: dict[int, np.ndarray] = {}
    for i, pid in enumerate(pids):
        labels = schema.encode({name: int(vec[i]) for name, vec in codes.items()})
        labels.flags.writeable = False
        out[pid] = labels
    return out


def attributes_from_mat(
    contents: Mapping[str, Any],
    schema: AttributeSchema,
    source: str = "<attribute mat>",
    pids: Mapping[str, Iterable[int]] | None = None,
) -> dict[str, dict[int, np.ndarray]]:
    """Decode the contents of an attribute ``.mat`` file, whatever ``loadmat`` options produced them.

    Args:
        contents: What ``scipy.io.loadmat`` returned (any ``squeeze_me`` / ``struct_as_record`` setting).
        schema: Schema of the data set; selects the struct name (``market_attribute`` / ``duke_attribute``).
        source: File name used in error messages.
        pids: Identities per split (``"train"`` / ``"test"``) for files without ``image_index``; entries are then
            matched to identities in ascending pid order.

    Returns:
        ``{"train": {pid: labels}, "test": {pid: labels}}`` with read-only ``uint8`` 0/1 label vectors.

    Raises:
        DataFormatError: If the struct, a split, an attribute field or ``image_index`` is missing or malformed,
            or a code is not 1 or 2 (the message names ``source``, the split, the attribute and the identity).
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
    for split in ("train", "test"):
        fields = _struct_fields(top[split])
        if fields is None:
            raise DataFormatError(f"{source}: {struct_name}.{split} is not a 1x1 struct")
        out[split] = _parse_split(fields, schema, split, source, None if pids is None else pids.get(split))
    return out


def read_attribute_mat(
    path: str | Path, schema: AttributeSchema, pids: Mapping[str, Iterable[int]] | None = None
) -> dict[str, dict[int, np.ndarray]]:
    """Read an official (or :func:`write_attribute_mat`) attribute file.

    Args:
        path: ``market_attribute.mat`` or ``duke_attribute.mat``.
        schema: Schema of the data set.
        pids: Identities per split, used only when the file has no ``image_index`` (see :func:`attributes_from_mat`).

    Returns:
        ``{"train": {pid: labels}, "test": {pid: labels}}`` with read-only ``uint8`` 0/1 label vectors; ``age``
        is ignored.

    Raises:
        DataFormatError: If the file is missing, not a readable MATLAB v5 file, or not in the expected structure.
        ImportError: If scipy is not installed.
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
    return attributes_from_mat(contents, schema, str(path), pids)


def _label_rows(labels: Mapping[int, np.ndarray], schema: AttributeSchema, split: str) -> tuple[list[int], np.ndarray]:
    pids = sorted(int(p) for p in labels)
    for pid in pids:
        if not 0 <= pid <= 9999:
            raise ValueError(f"{split}: identity {pid} cannot be written as a 4-digit image_index")
    rows = np.zeros((len(pids), len(schema)), dtype=np.uint8)
    for i, pid in enumerate(pids):
        vec = np.asarray(labels[pid]).reshape(-1)
        if vec.shape[0] != len(schema):
            raise ValueError(f"{split}: identity {pid} has {vec.shape[0]} labels, schema {schema.name!r} has "
                             f"{len(schema)}")
        if not np.isin(vec, (0, 1)).all():
            raise ValueError(f"{split}: identity {pid} has labels other than 0/1: {vec.tolist()}")
        rows[i] = vec
    return pids, rows


def write_attribute_mat(
    path: str | Path,
    schema: AttributeSchema,
    train: dict[int, np.ndarray],
    test: dict[int, np.ndarray],
    age: dict[int, int] | None = None,
    shuffle_test_fields: bool = True,
) -> None:
    """Write an attribute file in the official structure.

    The file holds a struct ``market_attribute`` (or ``duke_attribute``) with fields ``test`` and ``train``; each is
    a struct of ``uint8`` 1xN row vectors coded 1/2 (identities in ascending pid order), Market's ``age`` first
    and ``image_index`` (a 1xN cell of 4-digit pid strings) last, in the field order of the official files.

    Args:
        path: Output ``.mat`` file (parent folders are created).
        schema: ``MARKET1501`` or ``DUKEMTMC``.
        train: Training identity to 0/1 label vector (length ``len(schema)``).
        test: Test identity to 0/1 label vector.
        age: Market-1501 only: identity to age group 1-4 (1 young, 2 teenager, 3 adult, 4 old); identities not in
            it get 3 (adult, the most common group). Ignored by the readers.
        shuffle_test_fields: Give ``test`` the official test field order, which differs from the train order (as in
            the real files); ``False`` writes both in the train order.

    Raises:
        ValueError: For an unknown schema, a label vector of the wrong length or with values other than 0/1, an
            identity outside 0..9999, an age outside 1..4, or ``age`` given for DukeMTMC-reID (which has none).
        ImportError: If scipy is not installed.
    """
    from scipy.io import savemat

    struct_name = _struct_name(schema)
    orders = _OFFICIAL_FIELD_ORDER[schema.name]
    has_age = _AGE_FIELD in orders["train"]
    if age is not None and not has_age:
        raise ValueError(f"schema {schema.name!r} has no age field; pass age=None")
    age = age or {}
    for pid, group in age.items():
        if int(group) not in (1, 2, 3, 4):
            raise ValueError(f"identity {pid}: age group {group!r} is not one of 1, 2, 3, 4")

    structs: dict[str, dict[str, np.ndarray]] = {}
    for split in _MAT_SPLITS:
        pids, rows = _label_rows(train if split == "train" else test, schema, split)
        columns: dict[str, np.ndarray] = {}
        for j, name in enumerate(schema.names):
            columns[name] = (rows[:, j] + 1).astype(np.uint8).reshape(1, -1)
        if has_age:
            columns[_AGE_FIELD] = np.array([[int(age.get(p, _DEFAULT_AGE)) for p in pids]], dtype=np.uint8)
        order = orders[split] if shuffle_test_fields else orders["train"]
        struct = {name: columns[name] for name in order}
        index = np.empty((1, len(pids)), dtype=object)  # an object array is saved as a MATLAB cell
        index[0, :] = [f"{p:04d}" for p in pids]
        struct[_INDEX_FIELD] = index
        structs[split] = struct

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {struct_name: structs}, format="5", oned_as="row")


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


def _load(root: str | Path, schema: AttributeSchema, attributes: bool) -> ReIDDataset:
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
        per_split = read_attribute_mat(attribute_file, schema, pids=split_pids)
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


def load_market1501(root: str | Path, attributes: bool = True) -> ReIDDataset:
    """Load a Market-1501 folder (and its ``market_attribute.mat``).

    Args:
        root: Folder with ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (or a folder holding
            ``Market-1501-v15.09.15/``); ``gt_bbox/`` and other files are ignored.
        attributes: Read ``market_attribute.mat`` from ``root`` or ``root/attribute/``; ``False`` loads a folder
            without one (``attributes`` is then empty).

    Returns:
        The data set.

    Raises:
        DataFormatError: For a missing folder or file, a malformed image name, an empty split, a malformed
            attribute file, or an identity in the images without attributes (the message names the file).
    """
    return _load(root, MARKET1501, attributes)


def load_dukemtmc(root: str | Path, attributes: bool = True) -> ReIDDataset:
    """Load a DukeMTMC-reID folder (and its ``duke_attribute.mat``).

    Args:
        root: Folder with ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (or a folder holding
            ``DukeMTMC-reID/``).
        attributes: Read ``duke_attribute.mat`` from ``root`` or ``root/attribute/``; ``False`` loads a folder
            without one.

    Returns:
        The data set.

    Raises:
        DataFormatError: As :func:`load_market1501`.
    """
    return _load(root, DUKEMTMC, attributes)


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


def load_dataset(root: str | Path, name: str | None = None, attributes: bool = True) -> ReIDDataset:
    """Load a Market-1501 or DukeMTMC-reID folder, detecting which when ``name`` is not given.

    Detection looks for the attribute file first (``market_attribute.mat`` / ``duke_attribute.mat``), then at the
    image names in ``bounding_box_train/``.

    Args:
        root: Data set folder.
        name: ``"market1501"`` or ``"dukemtmc"``, or ``None`` to detect.
        attributes: Load the attribute file (see :func:`load_market1501`).

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
    return load_market1501(root, attributes) if name == "market1501" else load_dukemtmc(root, attributes)
