"""Synthetic pedestrians: Market-1501 layout, loader round-trip, determinism, and attributes visible in the pixels."""

import csv
import io
import json
import math
import re
from dataclasses import asdict, replace

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from attrimeter.data.attribute_mat import read_attribute_mat
from attrimeter.data.formats import list_images, load_market1501
from attrimeter.data.schema import MARKET1501
from attrimeter.data.synth import SynthConfig, generate, parse_size
from attrimeter.data.synth_params import (
    FACINGS,
    LOWER_COLOURS,
    UPPER_COLOURS,
    Person,
    View,
    change_attribute,
    is_plausible_change,
)
from attrimeter.data.synth_render import PARTS, attribute_mask, body_regions, render_parts, render_person
from attrimeter.data.synth_sampling import sample_camera, sample_person, sample_view

TINY = {"ids": 8, "cams": 3, "images_per_id": 5, "distractors": 4, "junk": 2, "counterfactual_per_attribute": 2}
MINI = {"ids": 4, "cams": 2, "images_per_id": 4, "distractors": 1, "junk": 1, "counterfactual_per_attribute": 0}
FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MARKET_NAME = re.compile(r"(?P<pid>-1|\d{4})_c(?P<cam>\d)s[1-6]_\d{6}_\d{2}\.jpg")
COLOUR_ATTRIBUTES = {f"up{c}" for c in UPPER_COLOURS} | {f"down{c}" for c in LOWER_COLOURS}
CSV_COLUMNS = ["pair", "pid", "camid", "attribute", "attributes", "value_a", "value_b", "image_a", "image_b"]


def random_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One tiny data set per module, from a fresh seed each run."""
    cfg = SynthConfig(seed=random_seed(np.random.default_rng()), **TINY)
    root = tmp_path_factory.mktemp("synth")
    summary = generate(root, cfg, progress=False)
    meta = json.loads((root / "synth.json").read_text())
    return root, cfg, summary, meta


def cameras(rng: np.random.Generator, n: int = 6):
    return [sample_camera(rng) for _ in range(n)]


def blur_margin(view: View, height: int = 128) -> int:
    """Pillow's Gaussian blur is three box blurs, each widening the support by up to ceil(radius) pixels."""
    return 3 * math.ceil(view.blur * height / 128) + 1


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=-1)


def jpeg_round_trip(image: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return np.asarray(Image.open(buf).convert("RGB"))


def nearest_class(image: np.ndarray, box: tuple[int, int, int, int], classes: dict) -> str:
    """Median colour of a box, then the nearest class prototype."""
    y0, y1, x0, x1 = box
    assert y1 > y0 and x1 > x0, f"empty probe box {box}"
    median = np.median(image[y0:y1, x0:x1].reshape(-1, 3).astype(np.float64), axis=0)
    names = list(classes)
    protos = np.array([classes[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((protos - median) ** 2).sum(axis=1)))]


# ---------------------------------------------------------------------------------------------------------------
# Layout and loader round-trip


def test_layout_follows_market_names_and_protocol(dataset):
    root, cfg, summary, meta = dataset
    assert meta["complete"] and meta["config"] == cfg.to_json() and not summary.reused
    names = {split: sorted(p.name for p in (root / folder).iterdir()) for split, folder in FOLDERS.items()}
    for split, files in names.items():
        for name in files:
            match = MARKET_NAME.fullmatch(name)
            assert match, f"{split}: {name} is not a Market-1501 name"
            assert 1 <= int(match["cam"]) <= cfg.cams
    assert (summary.train_images, summary.query_images, summary.gallery_images) == tuple(
        len(names[s]) for s in FOLDERS)
    assert set(names["query"]).isdisjoint(names["gallery"])

    train, test = set(meta["splits"]["train"]), set(meta["splits"]["test"])
    assert train.isdisjoint(test) and train | test == set(range(1, cfg.ids + 1))
    assert len(train) == (cfg.ids + 1) // 2

    data = load_market1501(root)
    assert {s.pid for s in data.train} == train
    assert {s.pid for s in data.query} == test and {s.pid for s in data.gallery} - {0} == test
    for pid in train:
        assert len({s.camid for s in data.train if s.pid == pid}) >= 2
    seen = set()
    for q in data.query:
        assert (q.pid, q.camid) not in seen, "one query per identity and camera"
        seen.add((q.pid, q.camid))
        assert any(g.pid == q.pid and g.camid != q.camid for g in data.gallery), f"{q.path}: no cross-camera match"
    gallery_all = list_images(root / FOLDERS["gallery"], "market1501")
    assert sum(s.pid == 0 for s in gallery_all) == cfg.distractors
    assert sum(s.pid == -1 for s in gallery_all) == cfg.junk
    assert data.dropped["gallery"] == cfg.junk


def test_loader_reads_the_attributes_the_renderer_chose(dataset):
    root, cfg, _, meta = dataset
    data = load_market1501(root)
    assert set(data.attributes) == set(range(1, cfg.ids + 1))
    upper = [MARKET1501.index(f"up{c}") for c in UPPER_COLOURS]
    lower = [MARKET1501.index(f"down{c}") for c in LOWER_COLOURS]
    for pid, identity in meta["identities"].items():
        person = Person.from_dict(identity["person"])
        labels = data.attributes_of(int(pid))
        np.testing.assert_array_equal(labels, person.labels())
        assert identity["labels"] == dict(zip(MARKET1501.names, labels.tolist(), strict=True))
        assert labels[upper].sum() == 1 and labels[lower].sum() == 1


# ---------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_is_byte_identical_and_independent_of_generation_order(dataset, tmp_path):
    root, cfg, _, _ = dataset
    images = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    again = tmp_path / "again"
    generate(again, cfg, progress=False)
    assert images == sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    for rel in images:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (root / "counterfactual/pairs.csv").read_bytes() == (again / "counterfactual/pairs.csv").read_bytes()
    # savemat stamps the creation time into the .mat header, so compare the contents.
    mat_a, mat_b = (read_attribute_mat(r / "market_attribute.mat", MARKET1501) for r in (root, again))
    for split in ("train", "test"):
        assert mat_a[split].keys() == mat_b[split].keys()
        for pid in mat_a[split]:
            np.testing.assert_array_equal(mat_a[split][pid], mat_b[split][pid])

    # More distractors and junk shift the generation order; identity images must not change.
    more = tmp_path / "more"
    generate(more, replace(cfg, distractors=cfg.distractors + 3, junk=cfg.junk + 1), progress=False)
    identity_images = [rel for rel in images if not rel.name.startswith(("0000_", "-1_"))]
    assert identity_images
    for rel in identity_images:
        assert (root / rel).read_bytes() == (more / rel).read_bytes(), rel

    other = tmp_path / "other"
    generate(other, replace(cfg, seed=cfg.seed + 1), progress=False)
    digests = {(root / rel).read_bytes() for rel in images}
    assert not digests & {p.read_bytes() for p in other.rglob("*.jpg")}


def test_render_person_is_a_pure_function(rng):
    person, view = sample_person(rng), sample_view(rng, sample_camera(rng))
    first = render_person(person, view)
    assert first.shape == (128, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, render_person(person, view))
    assert (render_person(person, replace(view, noise_seed=view.noise_seed + 1)) != first).any()
    # Parameters survive JSON (synth.json stores them).
    assert Person.from_dict(json.loads(json.dumps(asdict(person)))) == person
    assert View.from_dict(json.loads(json.dumps(asdict(view)))) == view
    wide = render_person(person, view, (96, 96))
    assert wide.shape == (96, 96, 3)


# ---------------------------------------------------------------------------------------------------------------
# Output folder handling and validation


def test_refuses_foreign_folders_and_replaces_or_reuses_its_own(tmp_path, rng):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("somebody else's data")
    with pytest.raises(FileExistsError, match="not a synthetic data set"):
        generate(foreign, SynthConfig(**MINI), progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        generate(tmp_path / "file", SynthConfig(**MINI), progress=False)

    cfg = SynthConfig(seed=random_seed(rng), **MINI)
    out = tmp_path / "out"
    first = generate(out, cfg, progress=False)
    reused = generate(out, cfg, progress=False)
    assert reused.reused and (reused.train_images, reused.gallery_images) == (first.train_images,
                                                                             first.gallery_images)

    # A different config replaces the previous data set entirely: no stale image survives.
    cfg2 = replace(cfg, seed=cfg.seed + 1, ids=5)
    assert not generate(out, cfg2, progress=False).reused
    fresh = tmp_path / "fresh"
    generate(fresh, cfg2, progress=False)
    listing = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert listing == sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())

    # An interrupted run leaves an incomplete marker: the folder is still recognised and regenerated.
    meta = json.loads((out / "synth.json").read_text())
    (out / "synth.json").write_text(json.dumps({**meta, "complete": False}))
    assert not generate(out, cfg2, progress=False).reused


@pytest.mark.parametrize(
    "bad",
    [{"ids": 3}, {"cams": 1}, {"cams": 7}, {"size": (8, 8)}, {"images_per_id": 3}, {"quality": 0},
     {"distractors": -1}, {"seed": -1}, {"ids": True}],
)
def test_config_rejects_bad_values(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        SynthConfig(**bad)


def test_parse_size():
    assert parse_size("128x64") == (128, 64) and parse_size(" 256X128 ") == (256, 128)
    for bad in ("128", "128x", "ax64", "8x8", "128x64x3"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_bad_parameters_are_reported(rng):
    person, view = sample_person(rng), sample_view(rng, sample_camera(rng))
    with pytest.raises(ValueError, match="upper"):
        replace(person, upper="orange")
    with pytest.raises(ValueError, match="skin"):
        replace(person, skin=(0, 0, 300))
    with pytest.raises(ValueError, match="facing"):
        replace(view, facing="up")
    with pytest.raises(ValueError, match="blur"):
        replace(view, blur=float("nan"))
    with pytest.raises(ValueError, match="size"):
        render_person(person, view, (8, 8))
    with pytest.raises(KeyError, match="sleeves"):
        change_attribute(person, "sleeves")
    with pytest.raises(ValueError, match="already on"):
        change_attribute(person, f"up{person.upper}")
    with pytest.raises(ValueError, match="missing"):
        Person.from_dict({k: v for k, v in asdict(person).items() if k != "hat"})


# ---------------------------------------------------------------------------------------------------------------
# Attribute sampling


def test_sampled_attributes_are_plausible_and_balanced(rng):
    people = [sample_person(rng) for _ in range(3000)]
    labels = np.stack([p.labels() for p in people])
    col = {n: labels[:, i] for i, n in enumerate(MARKET1501.names)}
    up = np.stack([col[f"up{c}"] for c in UPPER_COLOURS], axis=1)
    down = np.stack([col[f"down{c}"] for c in LOWER_COLOURS], axis=1)
    assert (up.sum(axis=1) == 1).all() and (down.sum(axis=1) == 1).all()
    female = col["gender"] == 1
    assert not (col["clothes"][~female] == 0).any(), "no men in dresses"
    assert col["hair"][female].mean() > 0.5 > col["hair"][~female].mean()
    rates = labels.mean(axis=0)
    assert ((rates >= 0.08) & (rates <= 0.92)).all(), dict(zip(MARKET1501.names, rates.round(3), strict=True))
    for p in people[:200]:
        assert not is_plausible_change(p, f"up{p.upper}")
        assert is_plausible_change(p, "clothes") == p.female
        assert is_plausible_change(p, "gender") == (not p.dress)


# ---------------------------------------------------------------------------------------------------------------
# Attributes are visible where a person would look


def test_colour_probe_recovers_garment_classes_on_torso_and_legs(rng):
    cams = cameras(rng)
    n = 200
    upper_hits = lower_hits = upper_on_legs = 0
    for i in range(n):
        person = sample_person(rng)
        view = sample_view(rng, cams[i % len(cams)], facing=FACINGS[i % len(FACINGS)])
        image = jpeg_round_trip(render_person(person, view))
        regions = body_regions(person, view)
        upper_hits += nearest_class(image, regions["torso"], UPPER_COLOURS) == person.upper
        lower_hits += nearest_class(image, regions["thighs"], LOWER_COLOURS) == person.lower
        upper_on_legs += nearest_class(image, regions["thighs"], UPPER_COLOURS) == person.upper
    assert upper_hits >= 0.95 * n, f"upper colour recovered for {upper_hits}/{n}"
    assert lower_hits >= 0.95 * n, f"lower colour recovered for {lower_hits}/{n}"
    # Control: the upper colour is on the torso, not everywhere (independent classes agree ~1/8 of the time).
    assert upper_on_legs < 0.5 * n


def test_hat_changes_only_the_head(rng):
    cams = cameras(rng)
    for i in range(40):
        person = replace(sample_person(rng), hat=False)
        view = sample_view(rng, cams[i % len(cams)], facing=FACINGS[i % len(FACINGS)])
        diff = changed(render_person(person, view), render_person(change_attribute(person, "hat"), view))
        assert diff.any()
        y0, y1, x0, x1 = body_regions(person, view)["head"]
        m = blur_margin(view)
        head = np.zeros_like(diff)
        head[max(0, y0 - m): y1 + m, max(0, x0 - m): x1 + m] = True
        assert not (diff & ~head).any(), f"hat changed pixels outside the head ({view.facing})"


def test_sleeve_length_turns_sleeve_into_bare_arm(rng):
    cams = cameras(rng)
    sleeve, arm = PARTS.index("sleeve"), PARTS.index("arm")
    for i in range(24):
        person = replace(sample_person(rng), short_sleeve=False)
        view = replace(sample_view(rng, cams[i % len(cams)], facing=FACINGS[i % len(FACINGS)]), blur=0.0)
        short = change_attribute(person, "up")
        diff = changed(render_person(person, view), render_person(short, view))
        parts_long, parts_short = render_parts(person, view), render_parts(short, view)
        assert diff.any()
        # Without blur, only pixels whose part changes can change: sleeve that became bare arm (mostly; the
        # sleeve's outline is a little wider than the arm, and polygon edges round to pixels a little differently).
        assert not (diff & (parts_long == parts_short)).any()
        assert (parts_long[diff] == sleeve).mean() > 0.9 and (parts_short[diff] == arm).mean() > 0.5


@pytest.mark.parametrize("attribute", MARKET1501.names)
def test_each_attribute_change_is_visible_and_local(attribute, rng):
    cams = cameras(rng, 3)
    done = 0
    while done < 6:
        person = sample_person(rng)
        if not is_plausible_change(person, attribute):
            continue
        view = sample_view(rng, cams[done % len(cams)], facing=FACINGS[done % len(FACINGS)])
        other = change_attribute(person, attribute)
        differing = [n for n, a, b in zip(MARKET1501.names, person.labels(), other.labels(), strict=True) if a != b]
        assert attribute in differing and len(differing) == (2 if attribute in COLOUR_ATTRIBUTES else 1)
        diff = changed(render_person(person, view), render_person(other, view))
        assert diff.sum() >= 10, f"{attribute}: only {diff.sum()} pixels change ({view.facing})"
        where = attribute_mask(person, view, attribute) | attribute_mask(other, view, attribute)
        near = binary_dilation(where, np.ones((3, 3), bool), iterations=blur_margin(view))
        assert not (diff & ~near).any(), f"{attribute}: pixels change away from where it is drawn ({view.facing})"
        done += 1


# ---------------------------------------------------------------------------------------------------------------
# Counterfactual pairs on disk


def test_counterfactual_csv_matches_rendered_parameters(dataset):
    root, cfg, summary, meta = dataset
    with open(root / "counterfactual" / "pairs.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == summary.counterfactual_pairs == len(MARKET1501) * cfg.counterfactual_per_attribute
    per_attribute = {name: 0 for name in MARKET1501.names}
    test_ids = set(meta["splits"]["test"])
    for row in rows:
        pid, attribute = int(row["pid"]), row["attribute"]
        per_attribute[attribute] += 1
        assert pid in test_ids
        person_a = Person.from_dict(meta["identities"][str(pid)]["person"])
        assert is_plausible_change(person_a, attribute)
        person_b = change_attribute(person_a, attribute)
        labels_a, labels_b = person_a.labels(), person_b.labels()
        differing = [n for n, a, b in zip(MARKET1501.names, labels_a, labels_b, strict=True) if a != b]
        assert row["attributes"].split(";") == differing
        i = MARKET1501.index(attribute)
        assert (int(row["value_a"]), int(row["value_b"])) == (labels_a[i], labels_b[i]) and labels_a[i] != labels_b[i]
        for key in ("image_a", "image_b"):
            match = MARKET_NAME.fullmatch((root / row[key]).name)
            assert match and int(match["pid"]) == pid and int(match["cam"]) - 1 == int(row["camid"])
        image_a, image_b = (np.asarray(Image.open(root / row[k])) for k in ("image_a", "image_b"))
        assert image_a.shape == image_b.shape == (*cfg.size, 3)
        assert (image_a != image_b).any(), f"pair {row['pair']} ({attribute}) shows no change"
        # synth.json holds everything needed to re-render the pair exactly.
        view = View.from_dict(meta["counterfactual_views"][int(row["pair"])])
        for person, key in ((person_a, "image_a"), (person_b, "image_b")):
            buf = io.BytesIO()
            Image.fromarray(render_person(person, view, cfg.size)).save(buf, format="JPEG", quality=cfg.quality)
            assert buf.getvalue() == (root / row[key]).read_bytes()
    assert set(per_attribute.values()) == {cfg.counterfactual_per_attribute}
