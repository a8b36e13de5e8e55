"""The official Market-1501 / DukeMTMC-reID attribute files: reading and writing their MATLAB structs.

The files are MATLAB structs ``market_attribute`` / ``duke_attribute`` with fields ``test`` and ``train``
(Market-1501 in that order, DukeMTMC-reID ``train`` first); each split is a struct of per-attribute 1xN MATLAB
doubles coded 1/2 (one entry per identity, identities in ascending pid order; stored compactly, so ``loadmat``
returns them as ``uint8``), Market's ``age`` (1-4, ignored here) and ``image_index`` (a cell of 4-digit pid
strings). The field order of ``test`` differs from ``train``. :func:`write_attribute_mat` writes that exact
structure, so the synthetic data set and the test fixtures read like the official files, also for third-party
loaders that index the struct by position.

Codes other than 1 and 2 (the official DukeMTMC-reID file codes ``top`` 0 for two training identities) load as
*unknown*: label :data:`~attrimeter.data.schema.UNKNOWN` (-1), with one
:class:`~attrimeter.data.errors.UnknownAttributeWarning` per file that names the entries; ``strict=True`` refuses
such a file instead. A file that is structurally broken (unreadable, a missing field, vectors of different lengths, a
bad ``image_index``) always raises :class:`~attrimeter.data.errors.DataFormatError` naming the file. Nothing assumes
one colour per body part: a few DukeMTMC-reID test identities are annotated with two or three lower-body colours, and
some identities with none.

Only :func:`read_attribute_mat` needs scipy (the ``train`` extra); writing needs numpy only
(docs/architecture.md §7).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attrimeter.data.errors import DataFormatError, UnknownAttributeWarning
from attrimeter.data.matfile import write_mat
from attrimeter.data.schema import UNKNOWN, AttributeSchema, codes_from_labels, labels_from_codes

__all__ = ["attribute_file_name", "attributes_from_mat", "read_attribute_mat", "write_attribute_mat"]

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
        raise ValueError(f"no attribute file format for schema {schema.name!r}; "
                         f"known: {', '.join(_STRUCT_NAMES)}") from None


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
