"""Loaders for Market-1501 and DukeMTMC-reID folders with their attribute annotations (docs/architecture.md §7).

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

Each folder's attribute annotations are read by :mod:`attrimeter.data.attribute_mat` (codes other than 1 and 2
load as unknown unless ``strict_attributes=True``); every problem with a folder, an image name or an annotation file
raises :class:`~attrimeter.data.errors.DataFormatError` naming the file. Listing folders and parsing names need numpy
only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attrimeter.data.attribute_mat import attribute_file_name, read_attribute_mat
from attrimeter.data.errors import DataFormatError
from attrimeter.data.schema import DUKEMTMC, MARKET1501, UNKNOWN, AttributeSchema, get_schema

__all__ = [
    "Sample",
    "ReIDDataset",
    "STYLES",
    "IMAGE_SUFFIXES",
    "SPLIT_FOLDERS",
    "parse_image_name",
    "list_images",
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

# Folder names of the official archives: a root that holds one of these instead of the splits is followed into it.
_ARCHIVE_FOLDERS = {"market1501": "Market-1501-v15.09.15", "dukemtmc": "DukeMTMC-reID"}


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
