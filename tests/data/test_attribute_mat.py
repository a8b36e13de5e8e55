"""Attribute .mat files: fixtures are written in the exact .mat structures of the official Market-1501 / DukeMTMC-reID
attribute files, and read back through every shape scipy's loadmat can give."""

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from mat_layout import mat_layout, mat_payload
from reid_datasets import STRUCT, random_labels, tamper
from scipy.io import loadmat, savemat

from attrimeter.data.attribute_mat import attributes_from_mat, read_attribute_mat, write_attribute_mat
from attrimeter.data.errors import DataFormatError, UnknownAttributeWarning
from attrimeter.data.schema import DUKEMTMC, MARKET1501, UNKNOWN


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
