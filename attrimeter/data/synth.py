"""Synthetic pedestrians with ground-truth Market-1501 attributes (DESIGN §7).

No ReID data set can be downloaded here, so this module renders one. A person is drawn with numpy and Pillow from two
parameter sets: a :class:`Person` (the 26 Market-1501 attributes plus identity nuisance: garment shade within the
colour class, texture, prints, proportions, skin tone, hair, shoe and bag colours) and a :class:`View` (camera nuisance:
viewpoint front / back / left / right, walking phase, scale, position, background, illumination, blur, noise,
occlusion). :func:`render_person` is a pure function of both; every attribute is drawn where a person would look for
it (hat on the head, colours on torso and legs, backpack on the back and its straps in front, bag at the hip, handbag
in the hand) and :func:`render_parts` / :data:`ATTRIBUTE_PARTS` say which pixels show what, so explanations can be
checked against the pixels.

:func:`generate` writes a data set in the exact Market-1501 layout (``bounding_box_train/``, ``query/``,
``bounding_box_test/`` with distractors ``0000`` and junk ``-1``, ``market_attribute.mat`` of the official structure)
so that :func:`attrimeter.data.formats.load_market1501` reads synthetic and real data alike, plus ``counterfactual/``
pairs (same identity, camera, pose, background and noise; exactly one attribute changed) and ``synth.json`` (config
and per-identity ground truth). Everything derives from the seed: each image's random numbers come from
``(seed, pid, camera, index)``, so the same seed gives byte-identical files whatever the order of generation.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from attrimeter.data.schema import MARKET1501

__all__ = [
    "ATTRIBUTE_PARTS",
    "FACINGS",
    "LOWER_COLOURS",
    "PARTS",
    "TEXTURES",
    "UPPER_COLOURS",
    "CameraStyle",
    "Person",
    "SynthConfig",
    "SynthSummary",
    "View",
    "attribute_mask",
    "body_regions",
    "change_attribute",
    "generate",
    "is_plausible_change",
    "parse_size",
    "render_parts",
    "render_person",
    "sample_camera",
    "sample_person",
    "sample_view",
]

RGB = tuple[int, int, int]

UPPER_COLOURS: dict[str, RGB] = {
    "black": (28, 28, 32),
    "blue": (35, 70, 165),
    "gray": (118, 118, 122),
    "green": (45, 125, 60),
    "purple": (105, 50, 135),
    "red": (185, 35, 40),
    "white": (232, 232, 228),
    "yellow": (222, 192, 45),
}
"""Prototype colour of each Market-1501 upper-body colour class (attribute ``up<colour>``)."""

LOWER_COLOURS: dict[str, RGB] = {
    "black": (28, 28, 32),
    "blue": (40, 62, 125),
    "brown": (115, 72, 38),
    "gray": (118, 118, 122),
    "green": (45, 125, 60),
    "pink": (228, 140, 170),
    "purple": (105, 50, 135),
    "white": (232, 232, 228),
    "yellow": (222, 192, 45),
}
"""Prototype colour of each Market-1501 lower-body colour class (attribute ``down<colour>``)."""

FACINGS: tuple[str, ...] = ("front", "back", "left", "right")
"""Viewpoints: towards the camera, away from it, walking to the image left, walking to the image right."""

TEXTURES: tuple[str, ...] = ("plain", "hstripes", "vstripes", "checks", "band")
"""Upper-garment patterns (identity nuisance); all stay inside the garment's colour class."""

PARTS: tuple[str, ...] = (
    "background", "face", "hair", "hat", "neck", "torso", "sleeve", "arm", "lower", "leg", "shoes", "backpack", "bag",
    "handbag", "emblem", "stripe", "occluder",
)
"""Names of the ids in a :func:`render_parts` map (id = position)."""

_ID = {name: i for i, name in enumerate(PARTS)}
(_FACE, _HAIR, _HAT, _NECK, _TORSO, _SLEEVE, _ARM, _LOWER, _LEG, _SHOES, _BACKPACK, _BAG, _HANDBAG, _EMBLEM, _STRIPE,
 _OCCLUDER) = (_ID[n] for n in PARTS[1:])

_BODY_PARTS = ("neck", "torso", "sleeve", "arm", "lower", "leg", "shoes", "backpack", "bag", "handbag", "emblem",
               "stripe")
ATTRIBUTE_PARTS: dict[str, tuple[str, ...]] = {
    "backpack": ("backpack",),
    "bag": ("bag",),
    "handbag": ("handbag",),
    "clothes": ("lower", "leg", "stripe"),
    "down": ("lower", "leg", "stripe"),
    "up": ("sleeve", "arm"),
    "gender": _BODY_PARTS,  # body shape: shoulders, waist and hips move everything attached to them
    "hair": ("hair",),
    "hat": ("hat",),
    **{f"up{c}": ("torso", "sleeve") for c in UPPER_COLOURS},
    **{f"down{c}": ("lower",) for c in LOWER_COLOURS},
}
"""Parts of :data:`PARTS` in which each Market-1501 attribute is drawn: changing the attribute changes only pixels
that show one of these parts before or after the change."""

# Binary attributes and the Person field that holds them (label 1 = field True).
_BINARY_FIELDS = {
    "backpack": "backpack", "bag": "bag", "handbag": "handbag", "hat": "hat", "hair": "long_hair",
    "gender": "female", "up": "short_sleeve", "down": "short_lower",
}
_UPPER_ATTRS = {f"up{c}": c for c in UPPER_COLOURS}
_LOWER_ATTRS = {f"down{c}": c for c in LOWER_COLOURS}

_SKIN_LIGHT, _SKIN_DARK = (238, 204, 178), (105, 72, 52)
_HAIR_COLOURS: tuple[RGB, ...] = ((22, 20, 20), (58, 40, 28), (98, 68, 44), (188, 158, 100), (140, 138, 136),
                                  (118, 54, 34))
_HAT_COLOURS: tuple[RGB, ...] = ((30, 40, 95), (175, 30, 35), (232, 230, 224), (205, 185, 140), (125, 125, 125),
                                 (40, 95, 55), (24, 24, 26), (225, 125, 40))
_SHOE_COLOURS: tuple[RGB, ...] = ((22, 22, 24), (235, 235, 235), (95, 60, 35), (120, 120, 125), (35, 45, 90),
                                  (170, 40, 40))
_BACKPACK_COLOURS: tuple[RGB, ...] = ((25, 25, 28), (30, 45, 100), (90, 90, 95), (160, 35, 35), (40, 90, 50),
                                      (215, 120, 35), (95, 45, 110), (150, 120, 80))
_BAG_COLOURS: tuple[RGB, ...] = ((25, 25, 28), (100, 62, 35), (180, 150, 105), (95, 95, 100), (140, 30, 40))
_WALLS: tuple[RGB, ...] = ((150, 82, 62), (165, 160, 150), (92, 110, 125), (200, 190, 160), (72, 72, 78),
                           (122, 135, 110))
_GROUNDS: tuple[RGB, ...] = ((96, 96, 100), (172, 166, 155), (86, 120, 66), (140, 120, 105), (120, 115, 110))
_ACCENTS: tuple[RGB, ...] = ((60, 60, 65), (200, 200, 195), (140, 60, 45), (70, 100, 60), (110, 110, 150),
                             (190, 170, 120), (45, 70, 95), (150, 150, 140))
_PRINT_COLOURS: tuple[RGB, ...] = ((240, 240, 240), (20, 20, 20), (220, 40, 40), (245, 210, 40), (40, 90, 200),
                                   (240, 130, 30), (40, 160, 80), (200, 80, 200))
_OCCLUDERS = ("none", "bottom", "left", "right")


def _rgb(values: Sequence[float]) -> RGB:
    r, g, b = (int(round(min(255.0, max(0.0, float(v))))) for v in values)
    return r, g, b


def _check_rgb(name: str, value: Any) -> None:
    if not (isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"{name} must be an (r, g, b) tuple of ints in 0..255, got {value!r}")


def _check_finite(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{owner}.{name} must lie in [{low}, {high}], got {value!r}")


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a frozen parameter dataclass from ``asdict`` / JSON output (lists become tuples)."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    missing = names - set(data)
    if unknown or missing:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")

    def tup(v: Any) -> Any:
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return cls(**{k: tup(v) for k, v in data.items()})


# ---------------------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class Person:
    """An identity: its Market-1501 attributes and the identity nuisance that tells it from look-alikes.

    Attributes:
        upper: Upper-body colour class (a key of :data:`UPPER_COLOURS`).
        lower: Lower-body colour class (a key of :data:`LOWER_COLOURS`); for a dress, the dress colour.
        short_sleeve: Attribute ``up`` (0 long sleeve, 1 short sleeve).
        short_lower: Attribute ``down`` (0 long, 1 short lower-body clothing: shorts or a short dress).
        dress: Attribute ``clothes`` is 0 (dress); ``False`` means pants.
        female: Attribute ``gender`` (drawn as body shape: shoulders, waist, hips).
        long_hair: Attribute ``hair``.
        hat: Attribute ``hat``.
        backpack: Attribute ``backpack``.
        bag: Attribute ``bag`` (a shoulder bag on a cross-body strap, at the hip).
        handbag: Attribute ``handbag`` (held in one hand).
        skin: Skin colour.
        hair_colour: Hair colour.
        upper_shade: ``(gain, dr, dg, db)``: the garment colour is ``prototype * gain + (dr, dg, db)``, a shade
            inside the class; kept when a counterfactual changes the class.
        lower_shade: The same for the lower garment.
        texture: Upper-garment pattern (one of :data:`TEXTURES`).
        texture_period: Pattern period, as a fraction of body height.
        texture_phase: Pattern phase in [0, 1).
        texture_contrast: Pattern contrast (darker, or lighter on black, cells).
        hat_colour: Colour of the hat (also set when ``hat`` is False, for counterfactuals).
        hat_style: 0 brimmed hat, 1 cap, 2 beanie.
        shoe_colour: Shoe colour.
        backpack_colour: Backpack colour.
        bag_colour: Shoulder-bag colour.
        handbag_colour: Handbag colour.
        emblem: A print on the chest (front view) and the back (back view) of the upper garment.
        emblem_colour: Colour of the print.
        leg_stripe: A stripe down the side of the pants (not drawn on a dress).
        leg_stripe_colour: Colour of the stripe.
        height: Body height relative to the tallest person.
        build: Width factor of the whole body.
        shoulder: Shoulder-width factor within the gender's range.
        hip: Hip line, as a fraction of body height from the top of the head (leg length).
        head: Head-size factor.
        bag_side: Side of the body the bag hangs on (+1 / -1).
        handbag_side: Hand that holds the handbag (+1 / -1).
    """

    upper: str
    lower: str
    short_sleeve: bool
    short_lower: bool
    dress: bool
    female: bool
    long_hair: bool
    hat: bool
    backpack: bool
    bag: bool
    handbag: bool
    skin: RGB
    hair_colour: RGB
    upper_shade: tuple[float, float, float, float]
    lower_shade: tuple[float, float, float, float]
    texture: str
    texture_period: float
    texture_phase: float
    texture_contrast: float
    hat_colour: RGB
    hat_style: int
    shoe_colour: RGB
    backpack_colour: RGB
    bag_colour: RGB
    handbag_colour: RGB
    emblem: bool
    emblem_colour: RGB
    leg_stripe: bool
    leg_stripe_colour: RGB
    height: float
    build: float
    shoulder: float
    hip: float
    head: float
    bag_side: int
    handbag_side: int

    def __post_init__(self) -> None:
        if self.upper not in UPPER_COLOURS:
            raise ValueError(f"Person.upper must be one of {', '.join(UPPER_COLOURS)}, got {self.upper!r}")
        if self.lower not in LOWER_COLOURS:
            raise ValueError(f"Person.lower must be one of {', '.join(LOWER_COLOURS)}, got {self.lower!r}")
        for name in ("short_sleeve", "short_lower", "dress", "female", "long_hair", "hat", "backpack", "bag",
                     "handbag", "emblem", "leg_stripe"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Person.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("skin", "hair_colour", "hat_colour", "shoe_colour", "backpack_colour", "bag_colour",
                     "handbag_colour", "emblem_colour", "leg_stripe_colour"):
            _check_rgb(f"Person.{name}", getattr(self, name))
        for name in ("upper_shade", "lower_shade"):
            shade = getattr(self, name)
            if not (isinstance(shade, tuple) and len(shade) == 4):
                raise ValueError(f"Person.{name} must be a (gain, dr, dg, db) tuple, got {shade!r}")
            for v in shade:
                _check_finite("Person", name, v)
        if self.texture not in TEXTURES:
            raise ValueError(f"Person.texture must be one of {', '.join(TEXTURES)}, got {self.texture!r}")
        _check_finite("Person", "texture_period", self.texture_period, 0.005, 1.0)
        _check_finite("Person", "texture_phase", self.texture_phase, 0.0, 1.0)
        _check_finite("Person", "texture_contrast", self.texture_contrast, 0.0, 0.5)
        if self.hat_style not in (0, 1, 2):
            raise ValueError(f"Person.hat_style must be 0, 1 or 2, got {self.hat_style!r}")
        _check_finite("Person", "height", self.height, 0.5, 1.2)
        _check_finite("Person", "build", self.build, 0.5, 1.5)
        _check_finite("Person", "shoulder", self.shoulder, 0.5, 1.5)
        _check_finite("Person", "hip", self.hip, 0.4, 0.6)
        _check_finite("Person", "head", self.head, 0.5, 1.5)
        for name in ("bag_side", "handbag_side"):
            if getattr(self, name) not in (-1, 1):
                raise ValueError(f"Person.{name} must be -1 or 1, got {getattr(self, name)!r}")

    def labels(self) -> np.ndarray:
        """Binary Market-1501 labels in :data:`attrimeter.data.schema.MARKET1501` order.

        Returns:
            ``uint8`` vector of length 26 (colour classes one-hot: exactly one upper and one lower colour).
        """
        values = {name: getattr(self, field_name) for name, field_name in _BINARY_FIELDS.items()}
        values["clothes"] = not self.dress
        values.update({a: self.upper == c for a, c in _UPPER_ATTRS.items()})
        values.update({a: self.lower == c for a, c in _LOWER_ATTRS.items()})
        return np.array([int(values[name]) for name in MARKET1501.names], dtype=np.uint8)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Person:
        """Rebuild a person from ``dataclasses.asdict`` output or its JSON form (as in ``synth.json``).

        Args:
            data: Field name to value.

        Returns:
            The person.

        Raises:
            ValueError: For unknown or missing fields or invalid values.
        """
        return _from_dict(cls, data)


@dataclass(frozen=True)
class CameraStyle:
    """What one camera makes of every image: scene colours, light, optics and typical viewpoints.

    Attributes:
        wall: Background colour above the horizon.
        ground: Ground colour.
        accents: Colours of background structures and occluders.
        horizon: Horizon line, as a fraction of image height.
        gain: Mean illumination gain.
        cast: Per-channel colour cast of the illumination.
        blur: Mean Gaussian blur radius in pixels at 128x64.
        noise: Mean sensor noise standard deviation (grey levels).
        facing: Probabilities of :data:`FACINGS` for people walking through this camera.
        scale: Mean person height as a fraction of image height.
        occlusion: Probability that an image is partly occluded.
    """

    wall: RGB
    ground: RGB
    accents: tuple[RGB, RGB]
    horizon: float
    gain: float
    cast: tuple[float, float, float]
    blur: float
    noise: float
    facing: tuple[float, float, float, float]
    scale: float
    occlusion: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CameraStyle:
        """Rebuild a camera style from ``dataclasses.asdict`` output or its JSON form.

        Args:
            data: Field name to value.

        Returns:
            The camera style.

        Raises:
            ValueError: For unknown or missing fields.
        """
        return _from_dict(cls, data)


@dataclass(frozen=True)
class View:
    """Camera nuisance of one image: everything about it except the person.

    Attributes:
        facing: One of :data:`FACINGS`.
        phase: Walking phase in radians (arm and leg swing).
        scale: Person height as a fraction of image height (before the person's own ``height``); above 1 crops.
        dx: Horizontal offset of the person's centre, as a fraction of image width.
        dy: Vertical position in the free space above and below the person (0 top, 1 bottom).
        wall: Background colour above the horizon.
        ground: Ground colour.
        accents: Colours of background structures.
        horizon: Horizon line, as a fraction of image height.
        bg_seed: Seed of the background layout.
        gain: Illumination gain.
        cast: Per-channel colour cast.
        shading: Top-to-bottom illumination gradient (relative gain change).
        blur: Gaussian blur radius in pixels (scaled with image height / 128).
        noise: Sensor noise standard deviation in grey levels.
        noise_seed: Seed of the noise.
        occluder: ``"none"``, ``"bottom"`` (a bar over the lower image), ``"left"`` or ``"right"`` (a pole).
        occluder_extent: Fraction of image height (bottom) or width (left / right) covered.
        occluder_colour: Occluder colour.
    """

    facing: str
    phase: float
    scale: float
    dx: float
    dy: float
    wall: RGB
    ground: RGB
    accents: tuple[RGB, RGB]
    horizon: float
    bg_seed: int
    gain: float
    cast: tuple[float, float, float]
    shading: float
    blur: float
    noise: float
    noise_seed: int
    occluder: str = "none"
    occluder_extent: float = 0.0
    occluder_colour: RGB = (0, 0, 0)

    def __post_init__(self) -> None:
        if self.facing not in FACINGS:
            raise ValueError(f"View.facing must be one of {', '.join(FACINGS)}, got {self.facing!r}")
        _check_finite("View", "phase", self.phase)
        _check_finite("View", "scale", self.scale, 0.05, 4.0)
        _check_finite("View", "dx", self.dx, -2.0, 2.0)
        _check_finite("View", "dy", self.dy, -2.0, 3.0)
        _check_finite("View", "horizon", self.horizon, 0.0, 1.0)
        _check_finite("View", "gain", self.gain, 0.05, 4.0)
        _check_finite("View", "shading", self.shading, -0.5, 0.5)
        _check_finite("View", "blur", self.blur, 0.0, 20.0)
        _check_finite("View", "noise", self.noise, 0.0, 100.0)
        _check_finite("View", "occluder_extent", self.occluder_extent, 0.0, 1.0)
        if not (isinstance(self.cast, tuple) and len(self.cast) == 3):
            raise ValueError(f"View.cast must be a tuple of 3 gains, got {self.cast!r}")
        for v in self.cast:
            _check_finite("View", "cast", v, 0.05, 4.0)
        for name in ("wall", "ground", "occluder_colour"):
            _check_rgb(f"View.{name}", getattr(self, name))
        if not (isinstance(self.accents, tuple) and len(self.accents) == 2):
            raise ValueError(f"View.accents must be a tuple of 2 colours, got {self.accents!r}")
        for c in self.accents:
            _check_rgb("View.accents", c)
        for name in ("bg_seed", "noise_seed"):
            seed = getattr(self, name)
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"View.{name} must be a non-negative int, got {seed!r}")
        if self.occluder not in _OCCLUDERS:
            raise ValueError(f"View.occluder must be one of {', '.join(_OCCLUDERS)}, got {self.occluder!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> View:
        """Rebuild a view from ``dataclasses.asdict`` output or its JSON form.

        Args:
            data: Field name to value.

        Returns:
            The view.

        Raises:
            ValueError: For unknown or missing fields or invalid values.
        """
        return _from_dict(cls, data)


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def _jitter(rng: np.random.Generator, colour: RGB, amount: float) -> RGB:
    return _rgb(np.asarray(colour, dtype=np.float64) + rng.uniform(-amount, amount, 3))


def _pick(rng: np.random.Generator, palette: Sequence[RGB]) -> RGB:
    return palette[int(rng.integers(len(palette)))]


def _distance(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def sample_person(
    rng: np.random.Generator, female: bool | None = None, upper: str | None = None, lower: str | None = None
) -> Person:
    """Draw an identity with plausible attribute correlations.

    Dresses are worn only by women; long hair and handbags are mostly female. Every binary attribute takes each value
    for at least ~15% of people; colour classes are uniform (1/8 upper, 1/9 lower) unless given.

    Args:
        rng: Random generator (the person is a function of its state).
        female: Gender, or ``None`` to draw it (45% female).
        upper: Upper colour class, or ``None`` to draw it uniformly.
        lower: Lower colour class, or ``None`` to draw it uniformly.

    Returns:
        The person.

    Raises:
        ValueError: For an unknown colour class.
    """
    if upper is not None and upper not in UPPER_COLOURS:
        raise ValueError(f"unknown upper colour {upper!r}; valid: {', '.join(UPPER_COLOURS)}")
    if lower is not None and lower not in LOWER_COLOURS:
        raise ValueError(f"unknown lower colour {lower!r}; valid: {', '.join(LOWER_COLOURS)}")
    is_female = bool(rng.random() < 0.45) if female is None else bool(female)
    upper = upper or tuple(UPPER_COLOURS)[int(rng.integers(len(UPPER_COLOURS)))]
    lower = lower or tuple(LOWER_COLOURS)[int(rng.integers(len(LOWER_COLOURS)))]
    dress = is_female and bool(rng.random() < 0.5)
    short_lower = bool(rng.random() < (0.4 if dress else 0.3))
    long_hair = bool(rng.random() < (0.75 if is_female else 0.12))
    skin = _rgb(np.add(np.multiply(_SKIN_LIGHT, 1 - (t := rng.uniform())), np.multiply(_SKIN_DARK, t))
                + rng.uniform(-6, 6, 3))
    hair = _jitter(rng, _pick(rng, _HAIR_COLOURS), 8)
    # A hat must read as a hat: its colour stays away from the hair and skin it covers.
    hats = [c for c in _HAT_COLOURS if _distance(c, hair) > 90 and _distance(c, skin) > 70]
    hat_colour = _jitter(rng, _pick(rng, hats), 6)

    def shade() -> tuple[float, float, float, float]:
        gain = float(rng.uniform(0.92, 1.08))
        dr, dg, db = (float(v) for v in rng.uniform(-6, 6, 3))
        return gain, dr, dg, db

    return Person(
        upper=upper,
        lower=lower,
        short_sleeve=bool(rng.random() < 0.45),
        short_lower=short_lower,
        dress=dress,
        female=is_female,
        long_hair=long_hair,
        hat=bool(rng.random() < 0.22),
        backpack=bool(rng.random() < 0.3),
        bag=bool(rng.random() < 0.25),
        handbag=bool(rng.random() < (0.25 if is_female else 0.08)),
        skin=skin,
        hair_colour=hair,
        upper_shade=shade(),
        lower_shade=shade(),
        texture=TEXTURES[int(rng.choice(len(TEXTURES), p=(0.4, 0.15, 0.15, 0.15, 0.15)))],
        texture_period=float(rng.uniform(0.03, 0.06)),
        texture_phase=float(rng.uniform(0.0, 1.0)),
        texture_contrast=float(rng.uniform(0.1, 0.22)),
        hat_colour=hat_colour,
        hat_style=int(rng.integers(3)),
        shoe_colour=_jitter(rng, _pick(rng, _SHOE_COLOURS), 8),
        backpack_colour=_jitter(rng, _pick(rng, _BACKPACK_COLOURS), 8),
        bag_colour=_jitter(rng, _pick(rng, _BAG_COLOURS), 8),
        handbag_colour=_jitter(rng, _pick(rng, _BAG_COLOURS + ((200, 60, 70), (230, 225, 215))), 8),
        emblem=bool(rng.random() < 0.35),
        emblem_colour=_jitter(rng, _pick(rng, _PRINT_COLOURS), 10),
        leg_stripe=bool(rng.random() < 0.25),
        leg_stripe_colour=_jitter(rng, _pick(rng, _PRINT_COLOURS), 10),
        height=float(rng.uniform(0.93, 1.0)),
        build=float(rng.uniform(0.9, 1.1)),
        shoulder=float(rng.uniform(0.95, 1.05)),
        hip=float(rng.uniform(0.47, 0.52)),
        head=float(rng.uniform(0.92, 1.08)),
        bag_side=int(rng.choice((-1, 1))),
        handbag_side=int(rng.choice((-1, 1))),
    )


def sample_camera(rng: np.random.Generator) -> CameraStyle:
    """Draw a camera: its scene colours, illumination, optics, typical viewpoints and occlusion rate.

    Args:
        rng: Random generator.

    Returns:
        The camera style.
    """
    front, back, side = rng.dirichlet((3.0, 3.0, 3.0))
    cast = rng.uniform(0.98, 1.02, 3)
    return CameraStyle(
        wall=_jitter(rng, _pick(rng, _WALLS), 12),
        ground=_jitter(rng, _pick(rng, _GROUNDS), 12),
        accents=(_jitter(rng, _pick(rng, _ACCENTS), 15), _jitter(rng, _pick(rng, _ACCENTS), 15)),
        horizon=float(rng.uniform(0.45, 0.8)),
        gain=float(rng.uniform(0.92, 1.08)),
        cast=(float(cast[0]), float(cast[1]), float(cast[2])),
        blur=float(rng.uniform(0.3, 0.9)),
        noise=float(rng.uniform(1.0, 4.0)),
        facing=(float(front), float(back), float(side / 2), float(side / 2)),
        scale=float(rng.uniform(0.82, 0.9)),
        occlusion=float(rng.uniform(0.05, 0.25)),
    )


def sample_view(rng: np.random.Generator, camera: CameraStyle, facing: str | None = None) -> View:
    """Draw the camera nuisance of one image taken by ``camera``.

    Args:
        rng: Random generator (the view is a function of its state).
        camera: The camera.
        facing: Viewpoint, or ``None`` to draw it from the camera's viewpoint probabilities.

    Returns:
        The view.

    Raises:
        ValueError: For an unknown ``facing``.
    """
    if facing is None:
        facing = FACINGS[int(rng.choice(len(FACINGS), p=np.asarray(camera.facing) / sum(camera.facing)))]
    elif facing not in FACINGS:
        raise ValueError(f"unknown facing {facing!r}; valid: {', '.join(FACINGS)}")
    occluder, extent, occluder_colour = "none", 0.0, (0, 0, 0)
    if rng.random() < camera.occlusion:
        occluder = _OCCLUDERS[int(rng.integers(1, len(_OCCLUDERS)))]
        extent = float(rng.uniform(0.06, 0.18) if occluder == "bottom" else rng.uniform(0.1, 0.25))
        occluder_colour = _jitter(rng, _pick(rng, camera.accents), 20)
    cast = np.asarray(camera.cast) * rng.uniform(0.99, 1.01, 3)
    return View(
        facing=facing,
        phase=float(rng.uniform(0.0, 2 * math.pi)),
        scale=float(np.clip(camera.scale * rng.uniform(0.96, 1.04), 0.75, 0.95)),
        dx=float(rng.uniform(-0.05, 0.05)),
        dy=float(rng.uniform(0.15, 0.85)),
        wall=camera.wall,
        ground=camera.ground,
        accents=camera.accents,
        horizon=float(np.clip(camera.horizon + rng.uniform(-0.04, 0.04), 0.0, 1.0)),
        bg_seed=int(rng.integers(2**62)),
        gain=float(np.clip(camera.gain * rng.uniform(0.96, 1.04), 0.87, 1.13)),
        cast=(float(cast[0]), float(cast[1]), float(cast[2])),
        shading=float(rng.uniform(-0.04, 0.04)),
        blur=float(camera.blur * rng.uniform(0.7, 1.3)),
        noise=float(camera.noise * rng.uniform(0.7, 1.3)),
        noise_seed=int(rng.integers(2**62)),
        occluder=occluder,
        occluder_extent=extent,
        occluder_colour=occluder_colour,
    )


# ---------------------------------------------------------------------------------------------------------------
# Counterfactuals


def _check_attribute(name: str) -> None:
    MARKET1501.index(name)  # raises KeyError naming the valid attributes


def is_plausible_change(person: Person, attribute: str) -> bool:
    """Whether :func:`change_attribute` gives a plausible person.

    Colour attributes can be turned on when they are off; a dress can turn into pants (and back) only for women;
    gender can change only for people in pants (no men in dresses, as in the sampled population).

    Args:
        person: The person.
        attribute: A Market-1501 attribute name.

    Returns:
        ``True`` if the change is plausible.

    Raises:
        KeyError: For an unknown attribute.
    """
    _check_attribute(attribute)
    if attribute in _UPPER_ATTRS:
        return person.upper != _UPPER_ATTRS[attribute]
    if attribute in _LOWER_ATTRS:
        return person.lower != _LOWER_ATTRS[attribute]
    if attribute == "clothes":
        return person.female
    if attribute == "gender":
        return not person.dress
    return True


def change_attribute(person: Person, attribute: str) -> Person:
    """The same person with exactly one attribute changed (everything else, shades included, kept).

    A binary attribute is flipped; a colour attribute is turned on (the previous colour of that garment turns off,
    so two labels differ: e.g. ``upblack`` -> ``upred``).

    Args:
        person: The person.
        attribute: A Market-1501 attribute name.

    Returns:
        The changed person.

    Raises:
        KeyError: For an unknown attribute.
        ValueError: If a colour attribute is already on (nothing to change).
    """
    _check_attribute(attribute)
    if attribute in _UPPER_ATTRS or attribute in _LOWER_ATTRS:
        upper = attribute in _UPPER_ATTRS
        colour = (_UPPER_ATTRS if upper else _LOWER_ATTRS)[attribute]
        if (person.upper if upper else person.lower) == colour:
            raise ValueError(f"{attribute!r} is already on for this person; a colour change turns a colour on")
        return replace(person, **{"upper" if upper else "lower": colour})
    if attribute == "clothes":
        return replace(person, dress=not person.dress)
    field_name = _BINARY_FIELDS[attribute]
    return replace(person, **{field_name: not getattr(person, field_name)})


# ---------------------------------------------------------------------------------------------------------------
# Geometry. Body units: x to the image right (forward in a side view), y down from the top of the head, 1 = body
# height. Side views are drawn facing right and mirrored for "left".


@dataclass(frozen=True)
class _Body:
    hh: float  # head height
    hw: float  # head half-width
    ys: float  # shoulder line
    yw: float  # waist line
    yh: float  # hip line
    ya: float  # ankles
    sh: float  # shoulder half-width (frontal)
    ww: float  # waist half-width
    hp: float  # hip half-width
    b: float  # build
    side: tuple[float, ...]  # side-view depths: shoulder f/b, chest f/b, waist f/b, hip f/b


def _body(p: Person) -> _Body:
    hh, hw = 0.125 * p.head, 0.047 * p.head
    ys = hh + 0.03
    yh = p.hip
    b = p.build
    # Gender is body shape: broad shoulders and narrow hips vs narrow shoulders, waist and wide hips; the nuisance
    # ranges keep the two shoulder/hip ratios apart (>= 1.32 vs <= 0.99).
    if p.female:
        sh, ww, hp = 0.102 * b * p.shoulder, 0.078 * b, 0.108 * b
        side = (0.045, 0.05, 0.08, 0.05, 0.05, 0.045, 0.056, 0.08)
    else:
        sh, ww, hp = 0.122 * b * p.shoulder, 0.094 * b, 0.09 * b
        side = (0.05, 0.055, 0.07, 0.062, 0.062, 0.055, 0.058, 0.065)
    return _Body(hh, hw, ys, ys + 0.62 * (yh - ys), yh, 0.955, sh, ww, hp, b, tuple(v * b for v in side))


def _frame(person: Person, view: View, size: tuple[int, int]) -> tuple[float, float, float]:
    """Body height in pixels, the centre column and the top row of the person in the final image."""
    h, w = size
    u = view.scale * person.height * h
    return u, w / 2 + view.dx * w, view.dy * (h - u)


class _Canvas:
    """Draws part ids into an ``L`` image, in body units."""

    def __init__(self, size: tuple[int, int], u: float, cx: float, top: float) -> None:
        self.image = Image.new("L", (size[1], size[0]), 0)
        self._draw = ImageDraw.Draw(self.image)
        self.u, self.cx, self.top = u, cx, top

    def _xy(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + x * self.u, self.top + y * self.u

    def _box(self, box: tuple[float, float, float, float]) -> list[float]:
        x0, y0, x1, y1 = box
        return [*self._xy(x0, y0), *self._xy(x1, y1)]

    def polygon(self, points: Sequence[tuple[float, float]], part: int) -> None:
        self._draw.polygon([self._xy(x, y) for x, y in points], fill=part)

    def ellipse(self, box: tuple[float, float, float, float], part: int) -> None:
        self._draw.ellipse(self._box(box), fill=part)

    def chord(self, box: tuple[float, float, float, float], start: float, end: float, part: int) -> None:
        self._draw.chord(self._box(box), start, end, fill=part)

    def rect(self, box: tuple[float, float, float, float], part: int, radius: float = 0.0) -> None:
        if radius > 0:
            self._draw.rounded_rectangle(self._box(box), radius=radius * self.u, fill=part)
        else:
            self._draw.rectangle(self._box(box), fill=part)

    def line(self, points: Sequence[tuple[float, float]], width: float, part: int) -> None:
        self._draw.line([self._xy(x, y) for x, y in points], fill=part, width=max(1, round(width * self.u)))

    def limb(self, p0: tuple[float, float], p1: tuple[float, float], w0: float, w1: float, part: int,
             upto: float = 1.0) -> None:
        """A tapered quad from ``p0`` (half-width ``w0``) towards ``p1`` (``w1``), cut at fraction ``upto``."""
        (x0, y0), (x1, y1) = p0, p1
        dx, dy = x1 - x0, y1 - y0
        n = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / n, dx / n
        xe, ye, we = x0 + upto * dx, y0 + upto * dy, w0 + upto * (w1 - w0)
        self.polygon([(x0 + nx * w0, y0 + ny * w0), (xe + nx * we, ye + ny * we), (xe - nx * we, ye - ny * we),
                      (x0 - nx * w0, y0 - ny * w0)], part)


def _sleeve_upto(p: Person) -> float:
    return 0.36 if p.short_sleeve else 0.93


def _arm(c: _Canvas, p: Person, joint: tuple[float, float], hand: tuple[float, float]) -> None:
    b = p.build
    c.limb(joint, hand, 0.026 * b, 0.018 * b, _ARM)
    c.ellipse((hand[0] - 0.02, hand[1] - 0.02, hand[0] + 0.02, hand[1] + 0.02), _ARM)
    c.limb(joint, hand, 0.03 * b, 0.022 * b, _SLEEVE, upto=_sleeve_upto(p))


def _handbag(c: _Canvas, hand: tuple[float, float]) -> None:
    hx, hy = hand
    c.line([(hx - 0.025, hy + 0.045), (hx, hy), (hx + 0.025, hy + 0.045)], 0.008, _HANDBAG)
    c.rect((hx - 0.042, hy + 0.045, hx + 0.042, hy + 0.125), _HANDBAG, radius=0.01)


def _hat(c: _Canvas, p: Person, body: _Body, side_view: bool) -> None:
    hh, hw = body.hh, body.hw
    crown = (-hw - 0.007, -0.04 if p.hat_style == 2 else -0.028, hw + 0.007, hh * (0.9 if p.hat_style == 2 else 0.78))
    c.chord(crown, 180, 360, _HAT)
    yc = (crown[1] + crown[3]) / 2  # the crown's flat lower edge
    if p.hat_style == 0:
        c.rect((-hw - 0.03, yc - 0.004, hw + 0.03, yc + 0.008), _HAT)
    elif p.hat_style == 1:
        visor = (-hw * 0.5, yc - 0.004, hw + 0.045, yc + 0.008) if side_view else (-hw - 0.01, yc - 0.004,
                                                                                    hw + 0.01, yc + 0.012)
        c.rect(visor, _HAT)


def _draw_frontal(c: _Canvas, p: Person, body: _Body, phase: float, back: bool) -> None:
    hh, hw, ys, yw, yh, ya, sh, ww, hp, b = (body.hh, body.hw, body.ys, body.yw, body.yh, body.ya, body.sh, body.ww,
                                             body.hp, body.b)
    mirror = -1 if back else 1  # the person's left and right swap sides between front and back views
    legs = [((s * hp / 2, yh), (s * 0.55 * hp, ya)) for s in (-1, 1)]
    for top, ankle in legs:
        c.limb(top, ankle, hp / 2, 0.028 * b, _LEG)
    if p.dress:
        hem = yh + (0.4 if p.short_lower else 0.85) * (ya - yh)
        half = hp * (1.25 if p.short_lower else 1.45)
        c.polygon([(-hp, yh - 0.02), (hp, yh - 0.02), (half, hem), (-half, hem)], _LOWER)
    else:
        upto = 0.4 if p.short_lower else 0.985
        for top, ankle in legs:
            c.limb(top, ankle, hp / 2 + 0.003, 0.032 * b, _LOWER, upto=upto)
        c.rect((-hp - 0.003, yh - 0.035, hp + 0.003, yh + 0.025), _LOWER)
        if p.leg_stripe:  # down the outer seam
            for (tx, _), (ax, _) in legs:
                s = 1 if tx > 0 else -1
                x0, x1 = s * (hp - 0.004), ax + s * (0.032 * b - 0.004)
                c.line([(x0, yh - 0.02), (x0 + upto * (x1 - x0), yh - 0.02 + upto * (ya - yh + 0.02))], 0.012, _STRIPE)
    for _, ankle in legs:
        c.ellipse((ankle[0] - 0.036 * b, ya - 0.01, ankle[0] + 0.036 * b, 1.0), _SHOES)

    c.rect((-0.02, hh - 0.01, 0.02, ys + 0.01), _NECK)
    c.polygon([(-sh + 0.03, ys - 0.008), (sh - 0.03, ys - 0.008), (sh, ys + 0.025), (ww, yw), (hp + 0.005, yh + 0.015),
               (-hp - 0.005, yh + 0.015), (-ww, yw), (-sh, ys + 0.025)], _TORSO)
    if p.emblem:  # a small chest print, a larger back print
        box = (-0.05 * b, ys + 0.05, 0.05 * b, ys + 0.14) if back else (-0.035 * b, ys + 0.04, 0.035 * b, ys + 0.1)
        c.rect(box, _EMBLEM)
    hands = {}
    for s in (-1, 1):
        hand = (s * (sh + 0.014) + 0.008 * math.sin(phase) * s, yh + 0.025)
        _arm(c, p, (s * (sh - 0.022), ys + 0.012), hand)
        hands[s] = hand

    if p.backpack:
        if back:
            c.rect((-0.052 * b, ys + 0.03, 0.052 * b, ys + 0.17), _BACKPACK, radius=0.015)
            for s in (-1, 1):
                c.rect((s * 0.045 * b - 0.01, ys - 0.006, s * 0.045 * b + 0.01, ys + 0.03), _BACKPACK)
        else:
            for s in (-1, 1):
                c.line([(s * 0.05 * b, ys - 0.006), (s * 0.062 * b, ys + 0.16)], 0.02, _BACKPACK)
    if p.bag:
        s = p.bag_side * mirror
        bx = s * (hp + 0.012)
        c.line([(-s * (sh - 0.035), ys - 0.004), (bx, yh - 0.05)], 0.014, _BAG)
        c.rect((bx - 0.052, yh - 0.065, bx + 0.052, yh + 0.045), _BAG, radius=0.012)
    if p.handbag:
        _handbag(c, hands[p.handbag_side * mirror])

    if p.long_hair:
        bottom = ys + (0.07 if back else 0.085)
        c.polygon([(-hw - 0.014, 0.3 * hh), (hw + 0.014, 0.3 * hh), (hw + 0.022, bottom), (-hw - 0.022, bottom)],
                  _HAIR)
        c.ellipse((-hw - 0.014, -0.008, hw + 0.014, hh * 0.9), _HAIR)
    if back:
        c.ellipse((-hw - 0.004, -0.006, hw + 0.004, hh + 0.002), _HAIR)
    else:
        c.ellipse((-hw, 0.0, hw, hh), _FACE)
        c.chord((-hw - 0.005, -0.007, hw + 0.005, hh * 0.7), 180, 360, _HAIR)
    if p.hat:
        _hat(c, p, body, side_view=False)


def _draw_side(c: _Canvas, p: Person, body: _Body, phase: float) -> None:
    """A person walking to the right."""
    hh, hw, ys, yw, yh, ya, b = body.hh, body.hw, body.ys, body.yw, body.yh, body.ya, body.b
    sf, sb, cf, cb, wf, wb, hf, hb = body.side
    theta, alpha = 0.45 * math.sin(phase), -0.32 * math.sin(phase)  # near arm and near leg swing in opposition
    joint = (0.005, ys + 0.015)
    arm_len, leg_len = yh + 0.025 - ys, ya - yh

    def hand_at(angle: float) -> tuple[float, float]:
        return joint[0] + arm_len * math.sin(angle), joint[1] + arm_len * math.cos(angle)

    _arm(c, p, joint, hand_at(-theta))  # far arm, mostly hidden by the body
    for angle in (-alpha, alpha):  # far leg first
        top = (0.0, yh - 0.01)
        ankle = (leg_len * math.sin(angle), yh + leg_len * math.cos(angle))
        c.limb(top, ankle, 0.052 * b, 0.026 * b, _LEG)
        if not p.dress:
            upto = 0.4 if p.short_lower else 0.985
            c.limb(top, ankle, 0.055 * b, 0.03 * b, _LOWER, upto=upto)
            if p.leg_stripe:
                c.line([top, (top[0] + upto * (ankle[0] - top[0]), top[1] + upto * (ankle[1] - top[1]))], 0.012,
                       _STRIPE)
        c.ellipse((ankle[0] - 0.025, ankle[1] - 0.012, ankle[0] + 0.065, ankle[1] + 0.033), _SHOES)
    if p.dress:
        hem = yh + (0.4 if p.short_lower else 0.85) * leg_len
        flare = 0.035 if p.short_lower else 0.06
        c.polygon([(-hb - 0.003, yh - 0.02), (hf + 0.003, yh - 0.02), (hf + flare, hem), (-hb - flare, hem)], _LOWER)
    else:
        c.rect((-hb, yh - 0.035, hf, yh + 0.03), _LOWER)

    c.rect((-0.018, hh - 0.01, 0.022, ys + 0.01), _NECK)
    c.polygon([(-sb, ys - 0.008), (sf, ys - 0.008), (cf, ys + 0.08), (wf, yw), (hf, yh + 0.015), (-hb, yh + 0.015),
               (-wb, yw), (-cb, ys + 0.08)], _TORSO)
    if p.backpack:
        c.rect((-cb - 0.075 * b, ys + 0.03, -cb + 0.012, ys + 0.19), _BACKPACK, radius=0.015)
        c.line([(-0.03, ys - 0.006), (cf - 0.012, ys + 0.11)], 0.018, _BACKPACK)
    if p.bag:
        # Slid to the back of the hip, where a cross-body bag rides when walking.
        c.line([(0.02, ys - 0.004), (-hb + 0.01, yh - 0.07)], 0.014, _BAG)
        c.rect((-hb - 0.05, yh - 0.08, -hb + 0.04, yh + 0.025), _BAG, radius=0.012)
    if p.long_hair:
        c.polygon([(-hw - 0.012, 0.35 * hh), (0.0, 0.35 * hh), (-0.004, ys + 0.085), (-hw - 0.024, ys + 0.085)], _HAIR)
    hand = hand_at(theta)
    _arm(c, p, joint, hand)
    if p.handbag:
        _handbag(c, hand)

    c.ellipse((-hw * 0.95 - 0.006, -0.006, hw * 1.05 + 0.002, hh), _HAIR)
    c.chord((-hw * 0.95, 0.0, hw * 1.05, hh), 300, 120, _FACE)  # face: the front of the head below the hairline
    if p.hat:
        _hat(c, p, body, side_view=True)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size):
        raise ValueError(f"size must be (height, width) ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h < 16 or w < 8:
        raise ValueError(f"size must be at least 16x8 (height x width), got {h}x{w}")
    return h, w


def render_parts(person: Person, view: View, size: tuple[int, int] = (128, 64)) -> np.ndarray:
    """Which part of the scene each pixel shows (ids index :data:`PARTS`), before blur and noise.

    Args:
        person: The identity.
        view: The camera nuisance.
        size: ``(height, width)`` in pixels.

    Returns:
        ``uint8`` array of shape ``size``.

    Raises:
        ValueError: For a size below 16x8.
    """
    h, w = _check_size(size)
    u, cx, top = _frame(person, view, (h, w))
    mirrored = view.facing == "left"
    canvas = _Canvas((h, w), u, (w - 1) - cx if mirrored else cx, top)
    body = _body(person)
    if view.facing in ("front", "back"):
        _draw_frontal(canvas, person, body, view.phase, back=view.facing == "back")
    else:
        _draw_side(canvas, person, body, view.phase)
    parts = np.asarray(canvas.image)
    parts = np.ascontiguousarray(parts[:, ::-1]) if mirrored else parts.copy()
    if view.occluder == "bottom":
        parts[h - int(round(view.occluder_extent * h)):, :] = _OCCLUDER
    elif view.occluder == "left":
        parts[:, : int(round(view.occluder_extent * w))] = _OCCLUDER
    elif view.occluder == "right":
        parts[:, w - int(round(view.occluder_extent * w)):] = _OCCLUDER
    return parts


def _garment(prototype: RGB, shade: tuple[float, float, float, float]) -> np.ndarray:
    gain, dr, dg, db = shade
    return np.clip(np.asarray(prototype, np.float32) * gain + np.array([dr, dg, db], np.float32), 0, 255)


def _background(view: View, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    rng = np.random.default_rng(view.bg_seed)
    img = Image.new("RGB", (w, h), view.wall)
    draw = ImageDraw.Draw(img)
    horizon = int(round(view.horizon * h))
    for _ in range(int(rng.integers(2, 6))):  # facades, windows, doors, trees
        x0, y0 = rng.uniform(-0.3, 1.0) * w, rng.uniform(-0.1, 0.8) * horizon
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.45) * h
        draw.rectangle([x0, y0, x1, min(y1, horizon)], fill=_jitter(rng, view.accents[int(rng.integers(2))], 25))
    draw.rectangle([0, horizon, w, h], fill=view.ground)
    for _ in range(int(rng.integers(0, 4))):  # pavement joints
        y = horizon + rng.uniform(0.05, 1.0) * (h - horizon)
        draw.line([(0, y), (w, y + rng.uniform(-0.3, 0.3) * h)], fill=_jitter(rng, view.ground, 30), width=1)
    return np.asarray(img, dtype=np.float32)


def _texture(person: Person, parts: np.ndarray, u: float, cx: float, top: float) -> np.ndarray:
    """Per-pixel brightness factor: garment pattern (inside the colour class) and rounded-body shading."""
    h, w = parts.shape
    yy = (np.arange(h, dtype=np.float32) - top) / u
    xx = (np.arange(w, dtype=np.float32) - cx) / u
    factor = np.ones((h, w), np.float32)
    if person.texture != "plain":
        period, phase = person.texture_period, person.texture_phase
        rows = ((yy / period + phase) % 1.0 < 0.35)[:, None]
        cols = ((xx / period + phase) % 1.0 < 0.35)[None, :]
        if person.texture == "hstripes":
            cells = np.broadcast_to(rows, (h, w))
        elif person.texture == "vstripes":
            cells = np.broadcast_to(cols, (h, w))
        elif person.texture == "checks":
            cells = rows & cols
        else:  # a chest band
            body = _body(person)
            band = (yy > body.ys + 0.06) & (yy < body.ys + 0.1)
            cells = np.broadcast_to(band[:, None], (h, w))
        prototype = np.asarray(UPPER_COLOURS[person.upper], np.float32)
        # Pattern cells stay inside the class: darker on colours, lighter on black, faint on white.
        contrast = person.texture_contrast * (0.4 if person.upper == "white" else 1.0)
        cell_gain = 1.0 + contrast if prototype.mean() < 60 else 1.0 - contrast
        upper = (parts == _TORSO) | (parts == _SLEEVE)
        factor[upper & cells] = cell_gain
    person_px = (parts != 0) & (parts != _OCCLUDER)
    shading = 1.0 - 0.1 * np.minimum(1.0, (xx / 0.13) ** 2)
    factor *= np.where(person_px, shading[None, :], np.float32(1.0))
    return factor


def render_person(person: Person, view: View, size: tuple[int, int] = (128, 64)) -> np.ndarray:
    """Render one image: a pure function of its parameters (same inputs, same bytes).

    Args:
        person: The identity (attributes and identity nuisance).
        view: The camera nuisance.
        size: ``(height, width)`` in pixels.

    Returns:
        ``uint8`` RGB image of shape ``(height, width, 3)``.

    Raises:
        ValueError: For a size below 16x8.
    """
    h, w = size = _check_size(size)
    parts = render_parts(person, view, size)
    lut = np.zeros((len(PARTS), 3), np.float32)
    for part in (_FACE, _NECK, _ARM, _LEG):
        lut[part] = person.skin
    lut[_HAIR], lut[_HAT], lut[_SHOES] = person.hair_colour, person.hat_colour, person.shoe_colour
    lut[_TORSO] = lut[_SLEEVE] = _garment(UPPER_COLOURS[person.upper], person.upper_shade)
    lut[_LOWER] = _garment(LOWER_COLOURS[person.lower], person.lower_shade)
    lut[_BACKPACK], lut[_BAG], lut[_HANDBAG] = person.backpack_colour, person.bag_colour, person.handbag_colour
    lut[_EMBLEM], lut[_STRIPE] = person.emblem_colour, person.leg_stripe_colour
    lut[_OCCLUDER] = view.occluder_colour

    u, cx, top = _frame(person, view, size)
    img = lut[parts] * _texture(person, parts, u, cx, top)[..., None]
    img = np.where((parts == 0)[..., None], _background(view, size), img)
    light = (1.0 + view.shading * np.linspace(-1.0, 1.0, h, dtype=np.float32))[:, None, None]
    img *= light * (view.gain * np.asarray(view.cast, np.float32))
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    radius = view.blur * h / 128
    if radius > 0:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius)))
    if view.noise > 0:
        noise = np.random.default_rng(view.noise_seed).standard_normal((h, w, 3), dtype=np.float32)
        out = np.clip(out + noise * np.float32(view.noise) + 0.5, 0, 255).astype(np.uint8)
    return out


def attribute_mask(person: Person, view: View, attribute: str, size: tuple[int, int] = (128, 64),
                   parts: np.ndarray | None = None) -> np.ndarray:
    """Pixels showing a part in which ``attribute`` is drawn (:data:`ATTRIBUTE_PARTS`), before blur.

    Args:
        person: The identity.
        view: The camera nuisance.
        attribute: A Market-1501 attribute name.
        size: ``(height, width)`` in pixels.
        parts: ``render_parts(person, view, size)`` when already known (masks of many attributes of one image).

    Returns:
        Boolean array of shape ``size``.

    Raises:
        KeyError: For an unknown attribute.
    """
    _check_attribute(attribute)
    ids = [_ID[name] for name in ATTRIBUTE_PARTS[attribute]]
    return np.isin(render_parts(person, view, size) if parts is None else parts, ids)


def body_regions(person: Person, view: View, size: tuple[int, int] = (128, 64)) -> dict[str, tuple[int, int, int, int]]:
    """Where to look for the head, the upper-garment colour and the lower-garment colour.

    ``"torso"`` and ``"thighs"`` are areas the garment covers in every view and that carried objects and hair cover
    only in part (the lower torso in front / back views, the chest under the near arm's sleeve in side views);
    ``"head"`` holds everything a hat can cover.

    Args:
        person: The identity.
        view: The camera nuisance.
        size: ``(height, width)`` in pixels.

    Returns:
        Name to ``(y0, y1, x0, x1)`` pixel box (half-open, clipped to the image; possibly empty when cropped).

    Raises:
        ValueError: For a size below 16x8.
    """
    h, w = _check_size(size)
    u, cx, top = _frame(person, view, (h, w))
    body = _body(person)
    ys, yw, yh = body.ys, body.yw, body.yh
    if view.facing in ("front", "back"):
        torso = (yw - 0.04, yh - 0.01, -0.8 * body.ww, 0.8 * body.ww)
        thighs = (yh + 0.02, yh + 0.13, -0.75 * body.hp, 0.75 * body.hp)
    else:
        _, _, cf, cb, _, _, hf, hb = body.side
        torso = (ys + 0.03, ys + 0.14, -0.6 * cb, 0.6 * cf)
        thighs = (yh + 0.05, yh + 0.14, -0.6 * hb, 0.6 * hf)
    head = (-0.045, body.hh + 0.005, -body.hw - 0.05, body.hw + 0.05)
    out = {}
    for name, (y0, y1, x0, x1) in (("head", head), ("torso", torso), ("thighs", thighs)):
        if view.facing == "left":
            x0, x1 = -x1, -x0
        r0, r1 = int(math.floor(top + y0 * u)), int(math.ceil(top + y1 * u))
        c0, c1 = int(math.floor(cx + x0 * u)), int(math.ceil(cx + x1 * u))
        out[name] = (max(0, r0), min(h, max(0, r1)), max(0, c0), min(w, max(0, c1)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data set generation

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
        object.__setattr__(self, "size", _check_size(tuple(self.size)))
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
    return _check_size((int(h), int(w)))


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
                       occluder_colour=_jitter(rng, view.accents[0], 20))
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
        colour = name in _UPPER_ATTRS or name in _LOWER_ATTRS
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
    ``market_attribute.mat`` (official structure, via :func:`attrimeter.data.formats.write_attribute_mat`),
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
    from attrimeter.data.formats import write_attribute_mat

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
