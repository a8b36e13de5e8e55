"""A synthetic ReID data set with ground-truth Market-1501 attributes, written to disk (docs/architecture.md §7).

No ReID data set can be downloaded here, so this module renders one from synthetic people
(:mod:`attrimeter.data.synth_params`, drawn by :mod:`attrimeter.data.synth_sampling`, rendered by
:mod:`attrimeter.data.synth_render`). :func:`generate` writes it in the exact Market-1501 layout
(``bounding_box_train/``, ``query/``, ``bounding_box_test/`` with distractors ``0000`` and junk ``-1``,
``market_attribute.mat`` of the official structure) so that :func:`attrimeter.data.formats.load_market1501` reads
synthetic and real data alike, plus ``counterfactual/`` pairs (same identity, camera, pose, background and noise;
exactly one attribute changed) and ``synth.json`` (config and per-identity ground truth). Everything derives from the
seed: each image's random numbers come from ``(seed, pid, camera, index)``, so the same seed gives byte-identical
files whatever the order of generation.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from attrimeter.data.schema import MARKET1501
from attrimeter.data.synth_params import (
    COLOUR_ATTRIBUTES,
    FACINGS,
    LOWER_COLOURS,
    UPPER_COLOURS,
    CameraStyle,
    Person,
    View,
    change_attribute,
    is_plausible_change,
)
from attrimeter.data.synth_render import check_size, render_person
from attrimeter.data.synth_sampling import jitter, sample_camera, sample_person, sample_view

__all__ = ["SynthConfig", "SynthSummary", "generate", "parse_size"]

_GENERATOR = "attrimeter.data.synth"
_FORMAT_VERSION = 1
_MARKER = "synth.json"
_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_CF_DIR = "counterfactual"
_MAT = "market_attribute.mat"
_OUTPUTS = (*_FOLDERS.values(), _CF_DIR, _MAT, _MARKER)
_MAX_MARKET_CAMERAS = 6  # Market-1501 names and loaders know cameras c1..c6
_CSV_COLUMNS = ("pair", "pid", "camid", "attribute", "attributes", "value_a", "value_b", "image_a", "image_b")
# Random streams: every random number derives from (seed, stream, ...), never from generation order.
_S_SPLIT, _S_BALANCE, _S_PERSON, _S_CAMERA, _S_PLAN, _S_VIEW, _S_EXTRA, _S_CF = range(1, 9)


@dataclass(frozen=True)
class SynthConfig:
    """Settings of a synthetic Market-1501-style data set.

    Attributes:
        ids: Identities, half for training (rounded up) and half for testing; pids start at 1. At least 4, so
            that every counterfactual has a plausible test identity.
        cams: Cameras (2..6, as Market-1501 names allow).
        size: ``(height, width)`` of the images.
        seed: Random seed; the same seed gives byte-identical files.
        images_per_id: Average images per identity (each identity gets 70-130% of it, at least 4).
        distractors: Distractor images (pid ``0000``: bad detections, body parts, far-away people) in the gallery.
        junk: Junk images (pid ``-1``: heavily blurred or occluded) in the gallery.
        counterfactual_per_attribute: Counterfactual pairs per attribute (26 attributes).
        quality: JPEG quality.
    """

    ids: int = 200
    cams: int = 6
    size: tuple[int, int] = (128, 64)
    seed: int = 0
    images_per_id: int = 10
    distractors: int = 100
    junk: int = 10
    counterfactual_per_attribute: int = 20
    quality: int = 90

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", check_size(tuple(self.size)))
        for name, low in (("ids", 4), ("cams", 2), ("seed", 0), ("images_per_id", 4), ("distractors", 0), ("junk", 0),
                          ("counterfactual_per_attribute", 0), ("quality", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SynthConfig.{name} must be an int >= {low}, got {value!r}")
        if self.cams > _MAX_MARKET_CAMERAS:
            raise ValueError(f"SynthConfig.cams must be at most {_MAX_MARKET_CAMERAS} (Market-1501 names c1..c6), "
                             f"got {self.cams}")
        if self.ids > 9999:
            raise ValueError(f"SynthConfig.ids must be at most 9999 (4-digit pids), got {self.ids}")
        if self.quality > 100:
            raise ValueError(f"SynthConfig.quality must be in 1..100, got {self.quality}")

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (``size`` as a list)."""
        data = asdict(self)
        data["size"] = list(self.size)
        return data


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote.

    Attributes:
        out: Data set root.
        train_images: Images in ``bounding_box_train/``.
        query_images: Images in ``query/``.
        gallery_images: Images in ``bounding_box_test/`` (distractors and junk included, as in Market-1501).
        counterfactual_pairs: Rows of ``counterfactual/pairs.csv`` (two images each).
        seconds: Wall time of the generation (for a reused data set, of its original generation).
        reused: ``True`` when an identical, complete data set was already there and nothing was rendered.
    """

    out: Path
    train_images: int
    query_images: int
    gallery_images: int
    counterfactual_pairs: int
    seconds: float
    reused: bool = False

    @property
    def total_images(self) -> int:
        """All images written, counterfactual pairs counted twice."""
        return self.train_images + self.query_images + self.gallery_images + 2 * self.counterfactual_pairs

    @property
    def images_per_second(self) -> float:
        """Rendering + JPEG encoding + writing throughput of the generation."""
        return self.total_images / self.seconds if self.seconds > 0 else float("inf")


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"128x64"`` (height x width).

    Args:
        text: The size.

    Returns:
        ``(height, width)``.

    Raises:
        ValueError: If it is not two integers joined by ``x`` or is below 16x8.
    """
    h, sep, w = text.strip().lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise ValueError(f"size must look like 128x64 (height x width), got {text!r}")
    return check_size((int(h), int(w)))


@dataclass(frozen=True)
class _Job:
    path: str  # relative to the root
    pid: int
    cam: int
    index: int  # image index within (pid, camera) for identities; running index for distractors and junk
    facing: str


def _market_name(pid: int, cam: int, seq: int, frame: int, box: int) -> str:
    tag = "-1" if pid == -1 else f"{pid:04d}"
    return f"{tag}_c{cam}s{seq}_{frame:06d}_{box:02d}.jpg"


def _facing(rng: np.random.Generator, camera: CameraStyle) -> str:
    return FACINGS[int(rng.choice(len(FACINGS), p=np.asarray(camera.facing) / sum(camera.facing)))]


def _plan_identity(cfg: SynthConfig, pid: int, test: bool, cameras: dict[int, CameraStyle]) -> list[_Job]:
    """Images of one identity: several cameras (>= 2); test ids: >= 2 images per camera, one per camera as query."""
    rng = np.random.default_rng((cfg.seed, _S_PLAN, pid))
    n = max(4, int(round(cfg.images_per_id * rng.uniform(0.7, 1.3))))
    per_cam_min = 2 if test else 1
    k = int(rng.integers(2, max(2, min(cfg.cams, n // per_cam_min)) + 1))
    cams = sorted(int(c) for c in rng.choice(np.arange(1, cfg.cams + 1), size=k, replace=False))
    counts = per_cam_min + rng.multinomial(max(0, n - k * per_cam_min), np.full(k, 1.0 / k))
    n_queries = max(1, int(round(0.6 * k))) if test else 0
    query_cams = {int(c) for c in rng.choice(cams, size=n_queries, replace=False)}
    jobs = []
    for cam, count in zip(cams, counts, strict=True):
        seq, start, step = int(rng.integers(1, 7)), int(rng.integers(0, 500000)), int(rng.integers(5, 40))
        facing = _facing(rng, cameras[cam])  # one walking direction per track
        query_index = int(rng.integers(count)) if cam in query_cams else -1
        for j in range(int(count)):
            folder = _FOLDERS["train"] if not test else _FOLDERS["query" if j == query_index else "gallery"]
            jobs.append(_Job(f"{folder}/{_market_name(pid, cam, seq, start + j * step, 1)}", pid, cam, j, facing))
    return jobs


def _plan_extras(cfg: SynthConfig, pid: int, count: int, cameras: dict[int, CameraStyle]) -> list[_Job]:
    """Distractor (pid 0) or junk (pid -1) images in the gallery, with unique names."""
    rng = np.random.default_rng((cfg.seed, _S_EXTRA, pid + 1))
    jobs, names = [], set()
    for i in range(count):
        cam = int(rng.integers(1, cfg.cams + 1))
        name = _market_name(pid, cam, int(rng.integers(1, 7)), int(rng.integers(0, 10**6)), 0)
        while name in names:
            name = _market_name(pid, cam, int(rng.integers(1, 7)), int(rng.integers(0, 10**6)), 0)
        names.add(name)
        jobs.append(_Job(f"{_FOLDERS['gallery']}/{name}", pid, cam, i, _facing(rng, cameras[cam])))
    return jobs


def _balanced(rng: np.random.Generator, pids: list[int], values: Sequence[Any]) -> dict[int, Any]:
    """Deal ``values`` round-robin over shuffled ``pids``: every value as often as possible, no value hoarding."""
    order = rng.permutation(len(pids))
    shuffled = [values[int(i)] for i in rng.permutation(len(values))]
    return {pids[int(j)]: shuffled[k % len(values)] for k, j in enumerate(order)}


def _identities(cfg: SynthConfig) -> tuple[list[int], list[int], dict[int, Person]]:
    pids = list(range(1, cfg.ids + 1))
    order = np.random.default_rng((cfg.seed, _S_SPLIT)).permutation(pids)
    n_train = (cfg.ids + 1) // 2
    train, test = sorted(int(p) for p in order[:n_train]), sorted(int(p) for p in order[n_train:])
    rng = np.random.default_rng((cfg.seed, _S_BALANCE))
    persons = {}
    for split in (train, test):
        # Gender and colour classes are dealt per split so that both genders (hence a plausible clothes and gender
        # change) and several colours exist among the test identities, and classes are balanced.
        n_female = min(len(split) - 1, max(1, int(round(0.45 * len(split)))))
        female = _balanced(rng, split, [True] * n_female + [False] * (len(split) - n_female))
        upper = _balanced(rng, split, tuple(UPPER_COLOURS))
        lower = _balanced(rng, split, tuple(LOWER_COLOURS))
        for pid in split:
            person_rng = np.random.default_rng((cfg.seed, _S_PERSON, pid))
            persons[pid] = sample_person(person_rng, female=female[pid], upper=upper[pid], lower=lower[pid])
    return train, test, persons


def _distractor_view(rng: np.random.Generator, view: View, junk: bool) -> View:
    if junk:  # unusable crops: heavy blur or heavy occlusion
        if rng.random() < 0.5:
            return replace(view, blur=float(rng.uniform(2.5, 4.0)))
        return replace(view, occluder="bottom", occluder_extent=float(rng.uniform(0.45, 0.65)),
                       occluder_colour=jitter(rng, view.accents[0], 20))
    if rng.random() < 0.6:  # a false detection on a body part
        return replace(view, scale=float(rng.uniform(1.4, 2.2)), dy=float(rng.uniform(-0.4, 1.2)),
                       dx=float(rng.uniform(-0.3, 0.3)))
    return replace(view, scale=float(rng.uniform(0.3, 0.5)), dx=float(rng.uniform(-0.3, 0.3)))  # far away


@dataclass(frozen=True)
class _Pair:
    index: int
    pid: int
    cam: int
    attribute: str
    person_a: Person
    person_b: Person
    view: View

    def paths(self) -> tuple[str, str]:
        name = _market_name(self.pid, self.cam, 1, self.index, 1)
        return f"{_CF_DIR}/a/{name}", f"{_CF_DIR}/b/{name}"


def _plan_counterfactuals(cfg: SynthConfig, train: list[int], test: list[int], persons: dict[int, Person],
                          cameras: dict[int, CameraStyle]) -> list[_Pair]:
    """Balanced pairs per attribute on test identities; binary attributes alternate the direction of the change."""
    pairs = []
    for ai, name in enumerate(MARKET1501.names):
        colour = name in COLOUR_ATTRIBUTES
        for i in range(cfg.counterfactual_per_attribute):
            rng = np.random.default_rng((cfg.seed, _S_CF, ai, i))
            want = i % 2
            candidates = [p for p in test if is_plausible_change(persons[p], name)]
            if not colour:
                preferred = [p for p in candidates if persons[p].labels()[ai] == want]
                candidates = preferred or candidates
            if not candidates:  # dealing gender and colours per split prevents this from ids >= 4 on
                raise ValueError(f"no test identity allows a plausible change of {name!r}; use more ids")
            pid = candidates[int(rng.integers(len(candidates)))]
            person_b = change_attribute(persons[pid], name)
            cam = int(rng.integers(1, cfg.cams + 1))
            # No occluder: the change must be visible, it is the ground truth of an explanation.
            view = replace(sample_view(rng, cameras[cam], facing=FACINGS[int(rng.integers(len(FACINGS)))]),
                           occluder="none", occluder_extent=0.0)
            pairs.append(_Pair(len(pairs), pid, cam, name, persons[pid], person_b, view))
    return pairs


def _is_synth_output(root: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == _GENERATOR else None


def _prepare(out: Path, cfg: SynthConfig, reuse: bool) -> SynthSummary | None:
    """Check the output folder; return the summary of an identical complete data set when reusing it."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return None
    meta = _is_synth_output(out)
    if meta is None:
        raise FileExistsError(f"{out}: folder is not empty and is not a synthetic data set (no valid {_MARKER}); "
                              "refusing to mix data sets, choose a new or empty folder")
    if (reuse and meta.get("complete") and meta.get("version") == _FORMAT_VERSION
            and meta.get("config") == cfg.to_json()):
        counts = meta["counts"]
        return SynthSummary(out, counts["train"], counts["query"], counts["gallery"], counts["counterfactual_pairs"],
                            float(meta["seconds"]), reused=True)
    for name in _OUTPUTS:  # a previous synthetic data set: replace it entirely, never mix old and new images
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return None


def generate(
    out: str | Path, config: SynthConfig | None = None, progress: bool = True, reuse: bool = True
) -> SynthSummary:
    """Render a synthetic data set in the Market-1501 layout, with attributes and counterfactual pairs.

    Writes ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (standard names
    ``{pid:04d}_c{cam}s{seq}_{frame:06d}_{box:02d}.jpg``; distractors ``0000`` and junk ``-1`` in the gallery),
    ``market_attribute.mat`` (official structure, via :func:`attrimeter.data.attribute_mat.write_attribute_mat`),
    ``counterfactual/a/``, ``counterfactual/b/`` and ``counterfactual/pairs.csv`` (columns ``pair, pid, camid,
    attribute, attributes, value_a, value_b, image_a, image_b``; ``camid`` 0-based like
    :attr:`attrimeter.data.formats.Sample.camid`; ``attribute`` is the attribute changed, for a colour change the
    colour turned on; ``attributes`` all labels that differ, ';'-joined; ``value_a`` / ``value_b`` the binary labels
    of ``attribute``; paths relative to ``out``; test identities, no occluder, binary changes in both directions), and
    ``synth.json`` (config, splits, cameras, every identity's attributes and :class:`Person` parameters, and the
    :class:`View` of every counterfactual pair, by pair index).

    Args:
        out: Output folder: new, empty, or a previous synthetic data set (replaced).
        config: Settings; ``None`` for the defaults.
        progress: Show a progress bar.
        reuse: Return at once when ``out`` already holds a complete data set made with the same config and renderer
            version.

    Returns:
        Counts and timing.

    Raises:
        FileExistsError: If ``out`` is a non-empty folder that is not a synthetic data set.
        NotADirectoryError: If ``out`` is a file.
        ImportError: If scipy (needed for the ``.mat`` file) is missing.
    """
    from attrimeter.data.attribute_mat import write_attribute_mat

    cfg = config if config is not None else SynthConfig()
    root = Path(out)
    reused = _prepare(root, cfg, reuse)
    if reused is not None:
        return reused
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"generator": _GENERATOR, "version": _FORMAT_VERSION, "complete": False,
                            "config": cfg.to_json()}
    (root / _MARKER).write_text(json.dumps(meta))  # marks the folder as ours even if generation is interrupted

    cameras = {cam: sample_camera(np.random.default_rng((cfg.seed, _S_CAMERA, cam))) for cam in range(1, cfg.cams + 1)}
    train, test, persons = _identities(cfg)
    jobs = [job for pid in train for job in _plan_identity(cfg, pid, False, cameras)]
    jobs += [job for pid in test for job in _plan_identity(cfg, pid, True, cameras)]
    jobs += _plan_extras(cfg, 0, cfg.distractors, cameras) + _plan_extras(cfg, -1, cfg.junk, cameras)
    pairs = _plan_counterfactuals(cfg, train, test, persons, cameras)
    for folder in (*_FOLDERS.values(), f"{_CF_DIR}/a", f"{_CF_DIR}/b"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    def save(image: np.ndarray, rel: str) -> None:
        Image.fromarray(image).save(root / rel, format="JPEG", quality=cfg.quality)

    with tqdm(total=len(jobs) + 2 * len(pairs), desc="synth", unit="img", disable=not progress) as bar:
        for job in jobs:
            rng = np.random.default_rng((cfg.seed, _S_VIEW, job.pid + 1, job.cam, job.index))
            view = sample_view(rng, cameras[job.cam], facing=job.facing)
            if job.pid > 0:
                person = persons[job.pid]
            else:
                person = sample_person(rng)
                view = _distractor_view(rng, view, junk=job.pid == -1)
            save(render_person(person, view, cfg.size), job.path)
            bar.update()
        rows = []
        for pair in pairs:
            path_a, path_b = pair.paths()
            image_a = render_person(pair.person_a, pair.view, cfg.size)
            image_b = render_person(pair.person_b, pair.view, cfg.size)
            save(image_a, path_a)
            save(image_b, path_b)
            bar.update(2)
            labels_a, labels_b = pair.person_a.labels(), pair.person_b.labels()
            ai = MARKET1501.index(pair.attribute)
            changed = [n for n, a, b in zip(MARKET1501.names, labels_a, labels_b, strict=True) if a != b]
            rows.append((pair.index, pair.pid, pair.cam - 1, pair.attribute, ";".join(changed), int(labels_a[ai]),
                         int(labels_b[ai]), path_a, path_b))

    with open(root / _CF_DIR / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_CSV_COLUMNS)
        writer.writerows(rows)
    write_attribute_mat(root / _MAT, MARKET1501, {p: persons[p].labels() for p in train},
                        {p: persons[p].labels() for p in test})

    counts = {split: sum(job.path.startswith(folder + "/") for job in jobs) for split, folder in _FOLDERS.items()}
    counts["counterfactual_pairs"] = len(pairs)
    train_set = set(train)
    seconds = time.perf_counter() - t0
    meta.update(
        complete=True,
        seconds=seconds,
        counts=counts,
        schema=MARKET1501.name,
        splits={"train": train, "test": test},
        cameras={str(cam): asdict(style) for cam, style in cameras.items()},
        identities={str(pid): {"split": "train" if pid in train_set else "test",
                               "labels": dict(zip(MARKET1501.names, map(int, persons[pid].labels()), strict=True)),
                               "person": asdict(persons[pid])} for pid in sorted(persons)},
        # With the identity's Person, change_attribute and this View, a pair re-renders exactly and
        # attribute_mask gives the ground-truth location of the change.
        counterfactual_views=[asdict(pair.view) for pair in pairs],
    )
    (root / _MARKER).write_text(json.dumps(meta, indent=1))
    return SynthSummary(root, counts["train"], counts["query"], counts["gallery"], len(pairs), seconds)
