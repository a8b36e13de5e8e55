"""Real-format loaders: fixtures are written in the exact Market-1501 / DukeMTMC-reID layouts (file names, folders);
the attribute .mat files themselves are tested in test_attribute_mat.py."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reid_datasets import CAMERAS, FOLDERS, Fixture, image_name, make_dataset, random_labels, tamper

from attrimeter.data.attribute_mat import write_attribute_mat
from attrimeter.data.errors import DataFormatError, UnknownAttributeWarning
from attrimeter.data.formats import load_dataset, load_dukemtmc, load_market1501, parse_image_name
from attrimeter.data.schema import DUKEMTMC, MARKET1501, UNKNOWN

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
