"""Attribute schemas of Market-1501 (26 attributes) and DukeMTMC-reID (23), as the AttriMeter authors use them.

The annotation files code every attribute as 1 or 2 (docs/architecture.md §7). Throughout the project a label is the
binary ``code - 1`` (0 or 1), or :data:`UNKNOWN` (-1) where the file holds any other code (the official DukeMTMC-reID
file has a few 0s): an unknown attribute of a person neither differs from nor agrees with anyone else's, and every
consumer of labels (losses, positive ratios, explanation metrics) leaves it out (:func:`known`). Each attribute keeps
the human meaning of both codes so that explanations can be read out ("short sleeve" rather than "up = 2").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "UNKNOWN",
    "Attribute",
    "AttributeSchema",
    "MARKET1501",
    "DUKEMTMC",
    "codes_from_labels",
    "get_schema",
    "known",
    "labels_from_codes",
    "list_schemas",
]

UNKNOWN = -1
"""Label of an attribute whose annotation code is neither 1 nor 2."""


def labels_from_codes(codes: np.ndarray) -> np.ndarray:
    """Annotation codes to labels: 1 -> 0, 2 -> 1, anything else (0, NaN, 3, ...) -> :data:`UNKNOWN`.

    Args:
        codes: Codes of any shape and numeric dtype.

    Returns:
        ``int8`` labels of the same shape.
    """
    codes = np.asarray(codes)
    return np.where(codes == 1, 0, np.where(codes == 2, 1, UNKNOWN)).astype(np.int8)


def codes_from_labels(labels: np.ndarray) -> np.ndarray:
    """Labels back to annotation codes: 0 -> 1, 1 -> 2, :data:`UNKNOWN` -> 0 (as the official files code it).

    Args:
        labels: Labels 0 / 1 / -1 of any shape.

    Returns:
        ``uint8`` codes of the same shape.

    Raises:
        ValueError: If a label is not 0, 1 or -1.
    """
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1, UNKNOWN)).all():
        raise ValueError("labels must be 0, 1 or -1 (unknown)")
    return np.where(labels == UNKNOWN, 0, labels + 1).astype(np.uint8)


def known(labels: np.ndarray) -> np.ndarray:
    """Where labels are known (0 or 1), as a bool array of their shape.

    Args:
        labels: Labels 0 / 1 / :data:`UNKNOWN` (numpy; a torch tensor works too and gives a bool tensor).

    Returns:
        ``labels >= 0``.
    """
    return labels >= 0


@dataclass(frozen=True)
class Attribute:
    """One binary attribute.

    Attributes:
        name: Key in the annotation file (e.g. ``"upblack"``).
        title: Short human-readable name (e.g. ``"upper-body black"``).
        meanings: Meaning of code 1 and code 2, i.e. of binary label 0 and 1.
        group: Display group (e.g. ``"upper-body colour"``).
    """

    name: str
    title: str
    meanings: tuple[str, str]
    group: str

    def describe(self, label: int) -> str:
        """Human meaning of a label.

        Args:
            label: 0 (code 1), 1 (code 2) or :data:`UNKNOWN`.

        Returns:
            The meaning, e.g. ``"short sleeve"``, or ``"unknown"``.

        Raises:
            ValueError: If ``label`` is not one of -1, 0, 1.
        """
        if label not in (UNKNOWN, 0, 1):
            raise ValueError(f"attribute {self.name!r}: label must be 0, 1 or -1 (unknown), got {label!r}")
        return "unknown" if label == UNKNOWN else self.meanings[label]


@dataclass(frozen=True)
class AttributeSchema:
    """An ordered set of attributes (the order of the interpreter's M maps).

    Attributes:
        name: Schema name (``"market1501"`` or ``"dukemtmc"``).
        attributes: The attributes in canonical (alphabetical) order.
    """

    name: str
    attributes: tuple[Attribute, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {a.name: i for i, a in enumerate(self.attributes)}
        if len(index) != len(self.attributes):
            raise ValueError(f"schema {self.name!r} has duplicate attribute names")
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.attributes)

    def __iter__(self) -> Iterator[Attribute]:
        return iter(self.attributes)

    def __getitem__(self, key: int | str) -> Attribute:
        return self.attributes[self.index(key) if isinstance(key, str) else key]

    @property
    def names(self) -> tuple[str, ...]:
        """Attribute names in canonical order."""
        return tuple(a.name for a in self.attributes)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """Display groups mapped to their attribute names, in order of first appearance."""
        out: dict[str, list[str]] = {}
        for a in self.attributes:
            out.setdefault(a.group, []).append(a.name)
        return {g: tuple(v) for g, v in out.items()}

    def index(self, name: str) -> int:
        """Position of an attribute.

        Args:
            name: Attribute name.

        Returns:
            Its index in ``attributes``.

        Raises:
            KeyError: If the schema has no such attribute (the message lists the valid names).
        """
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"schema {self.name!r} has no attribute {name!r}; valid: {', '.join(self.names)}") from None

    def encode(self, codes: dict[str, int]) -> np.ndarray:
        """Turn annotation codes (1/2 per attribute) into a binary label vector.

        Args:
            codes: Attribute name to code 1 or 2; every attribute of the schema must be present (extra keys such as
                ``age`` are ignored).

        Returns:
            ``int8`` vector of length ``len(self)`` with values 0/1.

        Raises:
            KeyError: If an attribute is missing.
            ValueError: If a code is not 1 or 2.
        """
        out = np.empty(len(self), dtype=np.int8)
        for i, name in enumerate(self.names):
            if name not in codes:
                raise KeyError(f"schema {self.name!r}: attribute {name!r} missing from the annotation")
            code = int(codes[name])
            if code not in (1, 2):
                raise ValueError(f"schema {self.name!r}: attribute {name!r} has code {code}, expected 1 or 2")
            out[i] = code - 1
        return out

    def describe(self, labels: np.ndarray) -> dict[str, str]:
        """Read out a label vector (0/1, -1 for unknown).

        Args:
            labels: Vector of length ``len(self)``.

        Returns:
            Attribute name to the human meaning of its value.

        Raises:
            ValueError: If the length does not match the schema.
        """
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != len(self):
            raise ValueError(f"schema {self.name!r} has {len(self)} attributes, got a vector of {labels.shape[0]}")
        return {a.name: a.describe(int(v)) for a, v in zip(self.attributes, labels, strict=True)}


_NO_YES = ("no", "yes")
_UPPER_COLOUR = "upper-body colour"
_LOWER_COLOUR = "lower-body colour"
_CARRIED = "carried objects"
_GARMENT = "garment shape"
_PERSON = "person"
_HEAD = "head"
_FEET = "footwear"


def _colour(prefix: str, colour: str) -> Attribute:
    part, group = ("upper-body", _UPPER_COLOUR) if prefix == "up" else ("lower-body", _LOWER_COLOUR)
    return Attribute(f"{prefix}{colour}", f"{part} {colour}", (f"{part} not {colour}", f"{part} {colour}"), group)


def _carried(name: str) -> Attribute:
    return Attribute(name, name, (f"no {name}", f"carries a {name}"), _CARRIED)


MARKET1501 = AttributeSchema(
    "market1501",
    tuple(
        sorted(
            [
                _carried("backpack"),
                _carried("bag"),
                _carried("handbag"),
                Attribute("clothes", "lower-body garment", ("dress", "pants"), _GARMENT),
                Attribute("down", "lower-body length", ("long lower-body clothing", "short lower-body clothing"),
                          _GARMENT),
                Attribute("up", "sleeve length", ("long sleeve", "short sleeve"), _GARMENT),
                Attribute("gender", "gender", ("male", "female"), _PERSON),
                Attribute("hair", "hair length", ("short hair", "long hair"), _HEAD),
                Attribute("hat", "hat", ("no hat", "wears a hat"), _HEAD),
                *(_colour("up", c) for c in ("black", "blue", "gray", "green", "purple", "red", "white", "yellow")),
                *(_colour("down", c) for c in ("black", "blue", "brown", "gray", "green", "pink", "purple", "white",
                                               "yellow")),
            ],
            key=lambda a: a.name,
        )
    ),
)
"""Market-1501: 26 attributes (docs/architecture.md §7), 8 upper and 9 lower colours."""

DUKEMTMC = AttributeSchema(
    "dukemtmc",
    tuple(
        sorted(
            [
                _carried("backpack"),
                _carried("bag"),
                _carried("handbag"),
                Attribute("boots", "boots", ("no boots", "wears boots"), _FEET),
                Attribute("shoes", "shoe colour", ("dark shoes", "light shoes"), _FEET),
                Attribute("top", "upper-body length", ("short upper-body clothing", "long upper-body clothing"),
                          _GARMENT),
                Attribute("gender", "gender", ("male", "female"), _PERSON),
                Attribute("hat", "hat", ("no hat", "wears a hat"), _HEAD),
                *(_colour("up", c) for c in ("black", "blue", "brown", "gray", "green", "purple", "red", "white")),
                *(_colour("down", c) for c in ("black", "blue", "brown", "gray", "green", "red", "white")),
            ],
            key=lambda a: a.name,
        )
    ),
)
"""DukeMTMC-reID: 23 attributes (docs/architecture.md §7)."""

_SCHEMAS = {s.name: s for s in (MARKET1501, DUKEMTMC)}


def list_schemas() -> list[str]:
    """Names of the known schemas."""
    return sorted(_SCHEMAS)


def get_schema(name: str) -> AttributeSchema:
    """Look a schema up by name.

    Args:
        name: ``"market1501"`` or ``"dukemtmc"``.

    Returns:
        The schema.

    Raises:
        KeyError: For an unknown name (the message lists the known ones).
    """
    try:
        return _SCHEMAS[name]
    except KeyError:
        raise KeyError(f"unknown attribute schema {name!r}; known: {', '.join(list_schemas())}") from None
