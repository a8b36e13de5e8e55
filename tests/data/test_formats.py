"""Real-format loaders: fixtures are written in the exact Market-1501 / DukeMTMC-reID layouts and .mat structures."""

import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from mat_layout import mat_layout, mat_payload
from scipy.io import loadmat, savemat

from attrimeter.data.attribute_mat import attributes_from_mat, read_attribute_mat, write_attribute_mat
from attrimeter.data.errors import DataFormatError, UnknownAttributeWarning
from attrimeter.data.formats import load_dataset, load_dukemtmc, load_market1501, parse_image_name
from attrimeter.data.schema import DUKEMTMC, MARKET1501, UNKNOWN, AttributeSchema

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


# ------------------------------------------------------------------------------------------------ file names


@pytest.mark.parametrize("style", ["market1501", "dukemtmc"])
def test_parse_image_name_reads_pid_and_zero_based_camera(style, rng):
    for _ in range(20):
        pid = int(rng.choice([-1, 0, int(rng.integers(1, 10000))]))
        cam = int(rng.integers(1, CAMERAS[style] + 1))
        name = image_name(style, pid, cam, rng)
        assert parse_image_name(name, style) == (pid, cam - 1)
        assert parse_image_name(Path("/some/folder") / name, style) == (pid, cam - 1)


def test_parse_image_name_known_examples():
    assert parse_image_name("0002_c1s1_000451_03.jpg", "market1501") == (2, 0)
    assert parse_image_name("-1_c1s1_000401_03.jpg", "market1501") == (-1, 0)
    assert parse_image_name("0000_c6s4_002427_02.jpg", "market1501") == (0, 5)
    assert parse_image_name("0005_c2_f0046985.jpg", "dukemtmc") == (5, 1)
    assert parse_image_name("7140_c8_f0000001.png", "dukemtmc") == (7140, 7)


@pytest.mark.parametrize(
    ("name", "style"),
    [
        ("0005_c2_f0046985.jpg", "market1501"),  # Duke name read as Market
        ("0002_c1s1_000451_03.jpg", "dukemtmc"),
        ("0002_c7s1_000451_03.jpg", "market1501"),  # Market has 6 cameras
        ("0002_c9_f0046985.jpg", "dukemtmc"),  # Duke has 8
        ("0002_c0s1_000451_03.jpg", "market1501"),
        ("2_c1s1_000451_03.jpg", "market1501"),  # pid not 4 digits
        ("-2_c1s1_000451_03.jpg", "market1501"),
        ("abcd_c1s1_000451_03.jpg", "market1501"),
        ("0002_c1s1_000451.jpg", "market1501"),
        ("0002_c1.jpg", "dukemtmc"),
    ],
)
def test_parse_image_name_rejects_malformed_names(name, style):
    with pytest.raises(DataFormatError, match=re.escape(name)):
        parse_image_name(Path("/data") / name, style)


def test_parse_image_name_rejects_unknown_style():
    with pytest.raises(ValueError, match="cuhk03"):
        parse_image_name("0002_c1s1_000451_03.jpg", "cuhk03")


# ------------------------------------------------------------------------------------------------ .mat files


@pytest.mark.parametrize("schema", [MARKET1501, DUKEMTMC], ids=lambda s: s.name)
@pytest.mark.parametrize("shuffle", [True, False])
def test_attribute_mat_round_trip(tmp_path, rng, schema, shuffle):
    pids = rng.choice(np.arange(0, 10000), size=30, replace=False)
    train = random_labels(schema, pids[:17], rng, unknown=0.05)
    test = random_labels(schema, pids[17:], rng, unknown=0.05)
    train[int(pids[0])][0] = UNKNOWN  # at least one unknown entry
    path = tmp_path / "a.mat"
    write_attribute_mat(path, schema, train, test, shuffle_test_fields=shuffle)
    with pytest.warns(UnknownAttributeWarning, match=re.escape(str(path))):
        back = read_attribute_mat(path, schema)
    assert set(back) == {"train", "test"}
    for split, truth in (("train", train), ("test", test)):
        assert set(back[split]) == set(truth)
        for pid, labels in truth.items():
            got = back[split][pid]
            assert got.dtype == np.int8 and got.shape == (len(schema),)
            np.testing.assert_array_equal(got, labels)
    again = tmp_path / "again.mat"
    write_attribute_mat(again, schema, back["train"], back["test"], shuffle_test_fields=shuffle)
    assert again.read_bytes() == path.read_bytes()  # deterministic: no date in the header


@pytest.mark.parametrize("schema", [MARKET1501, DUKEMTMC], ids=lambda s: s.name)
def test_written_mat_has_the_official_structure(tmp_path, rng, schema):
    pids = sorted(int(p) for p in rng.choice(np.arange(1, 10000), size=12, replace=False))
    train = random_labels(schema, pids[:7][::-1], rng)  # insertion order must not matter: the file is pid-sorted
    test = random_labels(schema, pids[7:], rng)
    test[pids[8]][-1] = UNKNOWN
    age = {p: int(rng.integers(1, 5)) for p in pids} if schema is MARKET1501 else None
    path = tmp_path / "a.mat"
    write_attribute_mat(path, schema, train, test, age=age)

    splits = ("test", "train") if schema is MARKET1501 else ("train", "test")  # as in the official files
    for mat_dtype, vector_dtype in ((False, np.uint8), (True, np.float64)):  # MATLAB doubles, stored compactly
        m = loadmat(str(path), mat_dtype=mat_dtype)
        assert [k for k in m if not k.startswith("__")] == [STRUCT[schema.name]]
        top = m[STRUCT[schema.name]]
        assert top.shape == (1, 1) and top.dtype.names == splits  # loaders that take [0][0][0] as a split exist
        orders = {}
        for split, truth in (("train", train), ("test", test)):
            rec = top[0, 0][split][0, 0]
            names = rec.dtype.names
            orders[split] = names
            expected_fields = set(schema.names) | ({"age"} if schema is MARKET1501 else set()) | {"image_index"}
            assert set(names) == expected_fields
            assert names[-1] == "image_index"
            index = [str(x[0]) for x in rec["image_index"][0]]
            assert index == [f"{p:04d}" for p in sorted(truth)]
            assert all(len(s) == 4 for s in index)
            for j, name in enumerate(schema.names):
                vec = rec[name]
                assert vec.dtype == vector_dtype and vec.shape == (1, len(truth))
                codes = [truth[p][j] + 1 if truth[p][j] >= 0 else 0 for p in sorted(truth)]  # 1/2, unknown as 0
                np.testing.assert_array_equal(vec[0], codes)
            if schema is MARKET1501:
                assert names[0] == "age" and rec["age"].dtype == vector_dtype
                np.testing.assert_array_equal(rec["age"][0], [age[p] for p in sorted(truth)])
        assert orders["train"] != orders["test"]  # the real files' quirk
        assert set(orders["train"]) == set(orders["test"])
    assert mat_layout(path)["elements"] == ["miCOMPRESSED"]


def _official_layouts() -> dict:
    return json.loads((Path(__file__).parent / "official_attribute_layouts.json").read_text())


def _split_sizes(layout: dict) -> dict[str, int]:
    return {split["name"]: split["fields"][0]["dims"][1] for split in layout["variables"][0]["fields"]}


@pytest.mark.parametrize("schema", [MARKET1501, DUKEMTMC], ids=lambda s: s.name)
def test_written_layout_equals_the_official_one(tmp_path, rng, schema):
    """The whole value-free layout (split order, field order, MATLAB classes, storage types, dimensions, the cell of
    1x4 char pid strings, compression) of a written file equals the official file's, recorded in the fixture."""
    official = _official_layouts()[schema.name]
    sizes = _split_sizes(official)  # Market 751 train / 750 test identities, Duke 702 / 1110
    pids = rng.choice(np.arange(1, 10000), size=sizes["train"] + sizes["test"], replace=False)
    train = random_labels(schema, pids[:sizes["train"]], rng, unknown=0.002)
    test = random_labels(schema, pids[sizes["train"]:], rng)
    age = {int(p): int(rng.integers(1, 5)) for p in pids} if schema is MARKET1501 else None
    path = tmp_path / f"{STRUCT[schema.name]}.mat"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # writing never warns
        write_attribute_mat(path, schema, train, test, age=age)
    written = mat_layout(path)
    assert written == {k: v for k, v in official.items() if k != "source"}


@pytest.mark.skipif("ATTRIMETER_OFFICIAL_ATTRIBUTES" not in os.environ,
                    reason="set ATTRIMETER_OFFICIAL_ATTRIBUTES to a folder with the official market_attribute.mat "
                           "and duke_attribute.mat (not redistributed here) to compare bytes with them")
@pytest.mark.parametrize("schema", [MARKET1501, DUKEMTMC], ids=lambda s: s.name)
def test_rewriting_an_official_file_gives_its_bytes(tmp_path, schema):
    source = Path(os.environ["ATTRIMETER_OFFICIAL_ATTRIBUTES"]) / f"{STRUCT[schema.name]}.mat"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownAttributeWarning)  # the official Duke file has two 0 codes
        labels = read_attribute_mat(source, schema)
    age = None
    if schema is MARKET1501:
        top = loadmat(str(source))["market_attribute"][0, 0]
        age = {int(str(i[0])): int(a) for split in ("train", "test")
               for i, a in zip(top[split][0, 0]["image_index"][0], top[split][0, 0]["age"][0], strict=True)}
    out = tmp_path / source.name
    write_attribute_mat(out, schema, labels["train"], labels["test"], age=age)
    assert mat_payload(out) == mat_payload(source)  # the compressed streams and header texts differ, nothing else


def test_market_age_defaults_and_duke_has_no_age(tmp_path, rng):
    labels = random_labels(MARKET1501, [3, 9], rng)
    write_attribute_mat(tmp_path / "m.mat", MARKET1501, labels, {}, age={3: 1})
    rec = loadmat(str(tmp_path / "m.mat"))["market_attribute"][0, 0]["train"][0, 0]
    assert list(rec["age"][0]) == [1, 2]  # 2 (teenager): the most common age group of the official file
    write_attribute_mat(tmp_path / "d.mat", DUKEMTMC, random_labels(DUKEMTMC, [3], rng), {})
    rec = loadmat(str(tmp_path / "d.mat"))["duke_attribute"][0, 0]["train"][0, 0]
    assert "age" not in rec.dtype.names
    with pytest.raises(ValueError, match="age"):
        write_attribute_mat(tmp_path / "d.mat", DUKEMTMC, random_labels(DUKEMTMC, [3], rng), {}, age={3: 2})


@pytest.mark.parametrize(
    ("train", "age", "match"),
    [
        ({5: np.zeros(25, np.uint8)}, None, "25 labels"),
        ({5: np.full(26, 2, np.uint8)}, None, "other than 0/1"),
        ({12345: np.zeros(26, np.uint8)}, None, "12345"),
        ({5: np.zeros(26, np.uint8)}, {5: 7}, "age group 7"),
    ],
)
def test_write_attribute_mat_rejects_bad_input(tmp_path, train, age, match):
    with pytest.raises(ValueError, match=match):
        write_attribute_mat(tmp_path / "a.mat", MARKET1501, train, {}, age=age)
    assert not (tmp_path / "a.mat").exists()


@pytest.mark.parametrize("schema", [MARKET1501, DUKEMTMC], ids=lambda s: s.name)
@pytest.mark.parametrize("squeeze_me", [False, True])
@pytest.mark.parametrize("struct_as_record", [True, False])
@pytest.mark.parametrize("chars_as_strings", [True, False])
@pytest.mark.parametrize("mat_dtype", [False, True])
def test_reader_accepts_every_loadmat_shape(tmp_path, rng, schema, squeeze_me, struct_as_record, chars_as_strings,
                                            mat_dtype):
    # A one-identity split is the edge case of squeeze_me: its vectors collapse to scalars and its cell to a string
    # (or, with chars_as_strings=False, to the string's bare characters).
    train = random_labels(schema, rng.choice(np.arange(1, 10000), size=1), rng)
    test = random_labels(schema, rng.choice(np.arange(1, 10000), size=5, replace=False), rng)
    next(iter(test.values()))[int(rng.integers(len(schema)))] = UNKNOWN
    path = tmp_path / "a.mat"
    write_attribute_mat(path, schema, train, test)
    contents = loadmat(str(path), squeeze_me=squeeze_me, struct_as_record=struct_as_record,
                       chars_as_strings=chars_as_strings, mat_dtype=mat_dtype)
    with pytest.warns(UnknownAttributeWarning, match=f"{path}: 1 attribute code"):
        back = attributes_from_mat(contents, schema, str(path))
    for split, truth in (("train", train), ("test", test)):
        assert set(back[split]) == set(truth)
        for pid, labels in truth.items():
            np.testing.assert_array_equal(back[split][pid], labels)


def test_reader_without_image_index_maps_sorted_identities(tmp_path, rng):
    train = random_labels(DUKEMTMC, rng.choice(np.arange(1, 10000), size=4, replace=False), rng)
    test = random_labels(DUKEMTMC, rng.choice(np.arange(1, 10000), size=3, replace=False), rng)
    path = tmp_path / "duke_attribute.mat"
    write_attribute_mat(path, DUKEMTMC, train, test)
    for split in ("train", "test"):
        tamper(path, "duke_attribute", split, lambda f: f.pop("image_index"))
    with pytest.raises(DataFormatError, match="image_index"):
        read_attribute_mat(path, DUKEMTMC)
    back = read_attribute_mat(path, DUKEMTMC, pids={"train": list(train)[::-1], "test": list(test)})
    for split, truth in (("train", train), ("test", test)):
        for pid, labels in truth.items():
            np.testing.assert_array_equal(back[split][pid], labels)
    with pytest.raises(DataFormatError, match="3 identities but attribute vectors of length 4"):
        read_attribute_mat(path, DUKEMTMC, pids={"train": list(train)[:3], "test": list(test)})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda f: f.pop("backpack"), r"lacks attribute field\(s\) backpack"),
        (lambda f: f.update(image_index=f["image_index"][:, :-1]), "identities but attribute vectors of length"),
        (lambda f: f.update(down=f["down"][:, :-1]), "differ in length"),
        (lambda f: f["image_index"][0].__setitem__(0, np.array(["x1"])), "'x1' is not a number"),
        (lambda f: f["image_index"][0].__setitem__(1, f["image_index"][0][0]), "more than once"),
        (lambda f: f.update(up=np.ones((2, 3), np.uint8)), "shape"),
        (lambda f: f.update(hat=np.array([["a", "b", "c"]])), "'hat': not a numeric vector"),
    ],
)
@pytest.mark.parametrize("strict", [False, True])
def test_reader_reports_malformed_content_with_the_file_name(tmp_path, rng, edit, match, strict):
    path = tmp_path / "market_attribute.mat"
    pids = rng.choice(np.arange(1, 10000), size=6, replace=False)
    write_attribute_mat(path, MARKET1501, random_labels(MARKET1501, pids[:3], rng),
                        random_labels(MARKET1501, pids[3:], rng))
    split = str(rng.choice(["train", "test"]))
    tamper(path, "market_attribute", split, edit)
    with pytest.raises(DataFormatError, match=match) as info:  # broken structure fails whatever the code policy
        read_attribute_mat(path, MARKET1501, strict=strict)
    assert str(path) in str(info.value) and repr(split) in str(info.value)


@pytest.mark.parametrize(("name", "code"), [("hat", 3), ("upred", np.nan), ("gender", 0), ("top", 0), ("boots", -1)])
def test_codes_other_than_1_and_2_load_as_unknown_or_are_refused_when_strict(tmp_path, rng, name, code):
    schema = DUKEMTMC if name in DUKEMTMC.names and name not in MARKET1501.names else MARKET1501
    struct = STRUCT[schema.name]
    path = tmp_path / f"{struct}.mat"
    pids = sorted(int(p) for p in rng.choice(np.arange(1, 10000), size=8, replace=False))
    train, test = random_labels(schema, pids[:4], rng), random_labels(schema, pids[4:], rng)
    write_attribute_mat(path, schema, train, test)
    split = str(rng.choice(["train", "test"]))
    truth = train if split == "train" else test
    victims = sorted(truth)[-2:]  # the last two identities of the split get the bad code

    def edit(fields):
        vec = fields[name].astype(np.float64)
        vec[0, -2:] = code
        fields[name] = vec

    tamper(path, struct, split, edit)
    with pytest.warns(UnknownAttributeWarning) as record:
        back = read_attribute_mat(path, schema)
    assert len(record) == 1  # one warning for the file, naming the split, the attribute and the identities
    message = str(record[0].message)
    assert str(path) in message and f"{split!r} struct, attribute {name!r}" in message
    assert all(f"{p} (code {code:g})" in message for p in victims) and "2 attribute code(s)" in message
    j = schema.index(name)
    for pid, labels in truth.items():
        expected = labels.copy()
        if pid in victims:
            expected[j] = UNKNOWN
        np.testing.assert_array_equal(back[split][pid], expected)

    with pytest.raises(DataFormatError, match=rf"{re.escape(str(path))}: {split!r} struct, attribute {name!r}: "
                                              rf"identities {victims[0]} \(code {code:g}\).*expected code 1 or 2"):
        read_attribute_mat(path, schema, strict=True)


def test_reader_reports_a_corrupt_or_foreign_file(tmp_path, rng):
    path = tmp_path / "market_attribute.mat"
    path.write_bytes(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    # Random bytes sometimes carry v7.3 version bytes (scipy then asks for an HDF reader): either clear message.
    with pytest.raises(DataFormatError, match="not a readable MATLAB|unsupported MATLAB file version") as info:
        read_attribute_mat(path, MARKET1501)
    assert str(path) in str(info.value)

    write_attribute_mat(path, MARKET1501, random_labels(MARKET1501, [1, 2, 3], rng), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(DataFormatError, match=re.escape(str(path))):
        read_attribute_mat(path, MARKET1501)

    write_attribute_mat(path, MARKET1501, random_labels(MARKET1501, [1], rng), {})
    with pytest.raises(DataFormatError, match="no struct 'duke_attribute'.*market_attribute"):
        read_attribute_mat(path, DUKEMTMC)

    savemat(str(path), {"market_attribute": {"train": {"hat": np.ones((1, 2), np.uint8)}}})
    with pytest.raises(DataFormatError, match="no 'test' field"):
        read_attribute_mat(path, MARKET1501)

    with pytest.raises(DataFormatError, match="not found"):
        read_attribute_mat(tmp_path / "missing.mat", MARKET1501)


# ------------------------------------------------------------------------------------------------ folders


def _expected_split(fx: Fixture, split: str, drop_distractors: bool) -> list[tuple[str, int, int]]:
    folder = fx.root / FOLDERS[split]
    return [(str(folder / n), p, c) for n, p, c in fx.images[split]
            if p != -1 and not (drop_distractors and p == 0)]


def _check_dataset(ds, fx: Fixture) -> None:
    assert ds.root == fx.root and ds.schema is fx.schema and ds.name == fx.schema.name
    for split in FOLDERS:
        got = [(str(s.path), s.pid, s.camid) for s in getattr(ds, split)]
        assert got == _expected_split(fx, split, drop_distractors=split != "gallery")
        assert got == sorted(got)
    assert all(s.pid > 0 for s in ds.train + ds.query)
    assert any(s.pid == 0 for s in ds.gallery) and all(s.pid != -1 for s in ds.gallery)
    assert ds.dropped == {"train": 0, "query": 0, "gallery": 2}
    assert ds.train_pids == sorted(fx.train_labels)
    truth = {**fx.train_labels, **fx.test_labels}
    assert set(ds.attributes) == set(truth)
    for pid, labels in truth.items():
        got = ds.attributes_of(pid)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(got, labels)
    with pytest.raises(KeyError, match="identity 0 "):
        ds.attributes_of(0)
    summary = ds.summary()
    assert f"train {len(fx.train_labels)} ids / {len(ds.train)} images" in summary
    assert f"gallery {len(fx.test_labels)} ids / {len(ds.gallery)} images" in summary


def test_load_market1501(tmp_path, rng):
    fx = make_dataset(tmp_path / "market", MARKET1501, rng)
    ds = load_market1501(fx.root)
    _check_dataset(ds, fx)
    assert ds.attribute_file == fx.mat_path
    # Returned labels are copies: editing one must not change the data set.
    pid = ds.train_pids[0]
    before = ds.attributes_of(pid)
    changed = ds.attributes_of(pid)
    changed[:] = UNKNOWN
    np.testing.assert_array_equal(ds.attributes_of(pid), before)


def test_load_dukemtmc_with_mat_in_attribute_subfolder(tmp_path, rng):
    fx = make_dataset(tmp_path / "duke", DUKEMTMC, rng, mat_in_subfolder=True)
    ds = load_dukemtmc(fx.root)
    _check_dataset(ds, fx)
    assert ds.attribute_file == fx.mat_path and fx.mat_path.parent.name == "attribute"


def test_test_struct_listing_distractor_0000_is_accepted(tmp_path, rng):
    fx = make_dataset(tmp_path / "market", MARKET1501, rng, write_mat=False)
    test = {**fx.test_labels, 0: np.zeros(len(MARKET1501), np.int8)}
    write_attribute_mat(fx.root / "market_attribute.mat", MARKET1501, fx.train_labels, test)
    ds = load_market1501(fx.root)
    assert 0 not in ds.attributes and set(ds.attributes) == set(fx.train_labels) | set(fx.test_labels)


@pytest.mark.parametrize("schema", [MARKET1501, DUKEMTMC], ids=lambda s: s.name)
def test_load_dataset_detects_the_format(tmp_path, rng, schema):
    fx = make_dataset(tmp_path / "d", schema, rng)
    ds = load_dataset(fx.root)
    assert ds.name == schema.name and len(ds.attributes) == 9
    fx.mat_path.unlink()  # without the .mat the image names decide
    ds = load_dataset(fx.root, attributes=False)
    assert ds.name == schema.name and ds.attributes == {} and ds.attribute_file is None
    assert "no attributes" in ds.summary()
    with pytest.raises(KeyError, match=f"identity {ds.train_pids[0]}"):
        ds.attributes_of(ds.train_pids[0])


def test_official_archive_folder_is_followed(tmp_path, rng):
    fx = make_dataset(tmp_path / "market1501" / "Market-1501-v15.09.15", MARKET1501, rng)
    ds = load_dataset(tmp_path / "market1501")
    assert ds.root == fx.root and ds.name == "market1501"


def test_load_dataset_rejects_unknown_or_undetectable(tmp_path, rng):
    fx = make_dataset(tmp_path / "d", MARKET1501, rng)
    with pytest.raises(ValueError, match="viper"):
        load_dataset(fx.root, name="viper")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError, match="cannot tell"):
        load_dataset(empty)
    with pytest.raises(DataFormatError, match="not found"):
        load_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("loader", [load_market1501, load_dukemtmc])
def test_missing_folders_are_named(tmp_path, rng, loader):
    with pytest.raises(DataFormatError, match=re.escape(str(tmp_path / "absent"))):
        loader(tmp_path / "absent")
    schema = MARKET1501 if loader is load_market1501 else DUKEMTMC
    fx = make_dataset(tmp_path / "d", schema, rng)
    split = str(rng.choice(list(FOLDERS.values())))
    for f in (fx.root / split).iterdir():
        f.unlink()
    (fx.root / split).rmdir()
    with pytest.raises(DataFormatError, match=re.escape(f"{fx.root / split}: ") + ".*not found"):
        loader(fx.root)


def test_malformed_image_name_is_reported_with_its_path(tmp_path, rng):
    fx = make_dataset(tmp_path / "d", MARKET1501, rng)
    bad = fx.root / str(rng.choice(list(FOLDERS.values()))) / "0042_c1_f0046985.jpg"  # a Duke name in Market
    bad.write_bytes(b"")
    with pytest.raises(DataFormatError, match=re.escape(str(bad))):
        load_market1501(fx.root)


def test_split_with_only_junk_or_no_images_is_rejected(tmp_path, rng):
    fx = make_dataset(tmp_path / "d", MARKET1501, rng)
    query = fx.root / "query"
    for f in query.iterdir():
        f.unlink()
    with pytest.raises(DataFormatError, match=re.escape(f"{query}: no .jpg/.png images")):
        load_market1501(fx.root)
    (query / image_name("market1501", -1, 2, rng)).write_bytes(b"")
    with pytest.raises(DataFormatError, match="only junk"):
        load_market1501(fx.root)


@pytest.mark.parametrize("split", ["train", "test"])
def test_identity_without_attributes_is_named(tmp_path, rng, split):
    fx = make_dataset(tmp_path / "d", MARKET1501, rng, write_mat=False)
    labels = {"train": dict(fx.train_labels), "test": dict(fx.test_labels)}
    victim = int(rng.choice(list(labels[split])))
    del labels[split][victim]
    path = fx.root / "market_attribute.mat"
    write_attribute_mat(path, MARKET1501, labels["train"], labels["test"])
    with pytest.raises(DataFormatError, match=f"identity {victim} .*no attributes") as info:
        load_market1501(fx.root)
    assert str(path) in str(info.value) and f"{victim:04d}_c" in str(info.value)  # also names an image of it


def test_missing_attribute_file_is_named_and_optional(tmp_path, rng):
    fx = make_dataset(tmp_path / "d", DUKEMTMC, rng, write_mat=False)
    with pytest.raises(DataFormatError, match="duke_attribute.mat not found.*attributes=False"):
        load_dukemtmc(fx.root)
    ds = load_dukemtmc(fx.root, attributes=False)
    assert ds.attributes == {} and len(ds.train) == len(fx.images["train"])


def test_malformed_attribute_file_fails_the_loader_with_its_name(tmp_path, rng):
    fx = make_dataset(tmp_path / "d", MARKET1501, rng)
    tamper(fx.mat_path, "market_attribute", "test", lambda f: f.update(hat=f["hat"][:, :-1]))
    with pytest.raises(DataFormatError, match=re.escape(str(fx.mat_path)) + ".*differ in length"):
        load_market1501(fx.root)


def test_duke_folder_with_zero_codes_and_several_lower_colours_loads(tmp_path, rng):
    """The official duke_attribute.mat codes `top` 0 for two training identities, and a few test identities have two
    or three lower-body colours: the folder loads (with one warning naming the entries) and nothing is lost."""
    fx = make_dataset(tmp_path / "duke", DUKEMTMC, rng, write_mat=False)
    train, test = dict(fx.train_labels), dict(fx.test_labels)
    absent = max(set(range(1, 10000)) - set(train) - set(test))  # annotated but not in the image folders
    train[absent] = random_labels(DUKEMTMC, [absent], rng)[absent]
    in_folder = sorted(fx.train_labels)[1]
    top = DUKEMTMC.index("top")
    for pid in (in_folder, absent):
        train[pid][top] = UNKNOWN  # written as code 0, as in the official file
    colours = [DUKEMTMC.index(n) for n in DUKEMTMC.groups["lower-body colour"]]
    several = sorted(test)[0]
    test[several][colours] = 0
    test[several][colours[:3]] = 1
    path = fx.root / "duke_attribute.mat"
    write_attribute_mat(path, DUKEMTMC, train, test)

    with pytest.warns(UnknownAttributeWarning) as record:
        ds = load_dukemtmc(fx.root)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(path) in message and "'train' struct, attribute 'top'" in message
    assert f"identities {min(in_folder, absent)} (code 0), {max(in_folder, absent)} (code 0)" in message
    assert "--strict-attributes" in message
    assert ds.attributes_of(in_folder)[top] == UNKNOWN and ds.attributes_of(absent)[top] == UNKNOWN
    np.testing.assert_array_equal(ds.attributes_of(several), test[several])
    assert ds.attributes_of(several)[colours].sum() == 3
    assert "2 unknown entries" in ds.summary()

    with pytest.raises(DataFormatError, match=re.escape(str(path)) + ".*'top'.*expected code 1 or 2"):
        load_dukemtmc(fx.root, strict_attributes=True)
    with pytest.raises(DataFormatError, match="'top'"):
        load_dataset(fx.root, strict_attributes=True)


def test_conflicting_train_and_test_attributes_are_rejected(tmp_path, rng):
    fx = make_dataset(tmp_path / "d", MARKET1501, rng, write_mat=False)
    pid = next(iter(fx.train_labels))
    test = {**fx.test_labels, pid: 1 - fx.train_labels[pid]}
    write_attribute_mat(fx.root / "market_attribute.mat", MARKET1501, fx.train_labels, test)
    with pytest.raises(DataFormatError, match=f"identity {pid} has different attributes"):
        load_market1501(fx.root)


def test_import_needs_neither_torch_nor_scipy():
    code = ("import sys, attrimeter.data.formats; "
            "bad = [m for m in ('torch', 'scipy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_distractors_and_junk_outside_the_gallery_are_dropped(tmp_path, rng):
    fx = make_dataset(tmp_path / "d", DUKEMTMC, rng)
    extra = {split: [image_name("dukemtmc", pid, 1, rng) for pid in (0, -1, 0)] for split in ("train", "query")}
    for split, names in extra.items():
        for name in names:
            (fx.root / FOLDERS[split] / name).write_bytes(b"")
    ds = load_dukemtmc(fx.root)
    assert all(s.pid > 0 for s in ds.train + ds.query)
    assert len(ds.train) == len(fx.images["train"]) and len(ds.query) == len(fx.images["query"])
    assert ds.dropped == {"train": 3, "query": 3, "gallery": 2}
    assert "8 junk/distractor images dropped" in ds.summary()
