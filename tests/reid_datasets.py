"""Tiny data sets in the exact Market-1501 / DukeMTMC-reID folder layouts and attribute .mat structures, shared by
the loader tests (tests/data/test_formats.py) and the .mat reader/writer tests (tests/data/test_attribute_mat.py)."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.io import loadmat, savemat

from attrimeter.data.attribute_mat import write_attribute_mat
from attrimeter.data.schema import UNKNOWN, AttributeSchema

STRUCT = {"market1501": "market_attribute", "dukemtmc": "duke_attribute"}
CAMERAS = {"market1501": 6, "dukemtmc": 8}
FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def image_name(style: str, pid: int, cam: int, rng: np.random.Generator) -> str:
    """A file name in the real format; pid -1 is written as '-1', others with 4 digits."""
    tag = "-1" if pid == -1 else f"{pid:04d}"
    frame = int(rng.integers(0, 10**6))
    if style == "market1501":
        return f"{tag}_c{cam}s{int(rng.integers(1, 7))}_{frame:06d}_{int(rng.integers(0, 10)):02d}.jpg"
    return f"{tag}_c{cam}_f{frame:07d}.jpg"


def random_labels(schema: AttributeSchema, pids, rng: np.random.Generator, unknown: float = 0.0
                  ) -> dict[int, np.ndarray]:
    """Random 0/1 labels; a fraction ``unknown`` of the entries is UNKNOWN."""
    out = {}
    for p in pids:
        labels = rng.integers(0, 2, len(schema)).astype(np.int8)
        labels[rng.random(len(schema)) < unknown] = UNKNOWN
        out[int(p)] = labels
    return out


@dataclass
class Fixture:
    root: Path
    schema: AttributeSchema
    images: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # split -> (name, pid, camid0)
    train_labels: dict[int, np.ndarray] = field(default_factory=dict)
    test_labels: dict[int, np.ndarray] = field(default_factory=dict)
    mat_path: Path | None = None


def make_dataset(root: Path, schema: AttributeSchema, rng: np.random.Generator, mat_in_subfolder: bool = False,
                 write_mat: bool = True) -> Fixture:
    """A tiny data set in the real layout: junk and distractors in the gallery, stray non-image files, gt_bbox/."""
    style = schema.name
    pids = rng.choice(np.arange(1, 10000), size=9, replace=False)
    train_pids, test_pids = sorted(int(p) for p in pids[:4]), sorted(int(p) for p in pids[4:])
    fx = Fixture(root, schema)
    for split in FOLDERS:
        entries = []
        split_pids = train_pids if split == "train" else test_pids
        for pid in split_pids:
            for _ in range(int(rng.integers(1, 4))):
                entries.append((pid, int(rng.integers(1, CAMERAS[style] + 1))))
        if split == "gallery":
            entries += [(0, int(rng.integers(1, CAMERAS[style] + 1))) for _ in range(3)]  # distractors
            entries += [(-1, int(rng.integers(1, CAMERAS[style] + 1))) for _ in range(2)]  # junk
        folder = root / FOLDERS[split]
        folder.mkdir(parents=True)
        written: dict[str, tuple[int, int]] = {}
        for pid, cam in entries:
            name = image_name(style, pid, cam, rng)
            while name in written:
                name = image_name(style, pid, cam, rng)
            written[name] = (pid, cam - 1)
            (folder / name).write_bytes(b"")  # files are listed, never decoded
        fx.images[split] = sorted((n, p, c) for n, (p, c) in written.items())
        (folder / "Thumbs.db").write_bytes(b"\0")  # real Market archives ship these
        (folder / "readme.txt").write_text("not an image")
    (root / "gt_bbox").mkdir()
    (root / "gt_bbox" / "not_a_reid_name.jpg").write_bytes(b"")
    fx.train_labels = random_labels(schema, train_pids, rng)
    fx.test_labels = random_labels(schema, test_pids, rng)
    if write_mat:
        fx.mat_path = root / ("attribute" if mat_in_subfolder else "") / f"{STRUCT[style]}.mat"
        age = {p: int(rng.integers(1, 5)) for p in train_pids + test_pids} if style == "market1501" else None
        write_attribute_mat(fx.mat_path, schema, fx.train_labels, fx.test_labels, age=age)
    return fx


def tamper(path: Path, struct: str, split: str, edit) -> None:
    """Re-save an attribute file after `edit(fields)` changed one split's fields (a dict, in file order)."""
    m = loadmat(str(path), squeeze_me=False, struct_as_record=True)
    top = m[struct][0, 0]
    splits = {}
    for name in top.dtype.names:
        rec = top[name][0, 0]
        fields = {f: rec[f] for f in rec.dtype.names}
        if name == split:
            edit(fields)
        splits[name] = fields
    savemat(str(path), {struct: splits})
