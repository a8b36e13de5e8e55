"""Random synthetic people, cameras and views with plausible correlations (docs/architecture.md §7).

Every function here is a pure function of the generator state it is given, which is what makes a synthetic data set
a function of its seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from attrimeter.data.synth_params import (
    FACINGS,
    LOWER_COLOURS,
    OCCLUDERS,
    RGB,
    TEXTURES,
    UPPER_COLOURS,
    CameraStyle,
    Person,
    View,
)

__all__ = ["jitter", "sample_camera", "sample_person", "sample_view"]

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


def _rgb(values: Sequence[float]) -> RGB:
    r, g, b = (int(round(min(255.0, max(0.0, float(v))))) for v in values)
    return r, g, b


def jitter(rng: np.random.Generator, colour: RGB, amount: float) -> RGB:
    """A colour moved by up to ``amount`` grey levels per channel (uniform), clipped to 0..255.

    Args:
        rng: Random generator.
        colour: The colour.
        amount: Largest change per channel.

    Returns:
        The jittered colour.
    """
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
    hair = jitter(rng, _pick(rng, _HAIR_COLOURS), 8)
    # A hat must read as a hat: its colour stays away from the hair and skin it covers.
    hats = [c for c in _HAT_COLOURS if _distance(c, hair) > 90 and _distance(c, skin) > 70]
    hat_colour = jitter(rng, _pick(rng, hats), 6)

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
        shoe_colour=jitter(rng, _pick(rng, _SHOE_COLOURS), 8),
        backpack_colour=jitter(rng, _pick(rng, _BACKPACK_COLOURS), 8),
        bag_colour=jitter(rng, _pick(rng, _BAG_COLOURS), 8),
        handbag_colour=jitter(rng, _pick(rng, _BAG_COLOURS + ((200, 60, 70), (230, 225, 215))), 8),
        emblem=bool(rng.random() < 0.35),
        emblem_colour=jitter(rng, _pick(rng, _PRINT_COLOURS), 10),
        leg_stripe=bool(rng.random() < 0.25),
        leg_stripe_colour=jitter(rng, _pick(rng, _PRINT_COLOURS), 10),
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
        wall=jitter(rng, _pick(rng, _WALLS), 12),
        ground=jitter(rng, _pick(rng, _GROUNDS), 12),
        accents=(jitter(rng, _pick(rng, _ACCENTS), 15), jitter(rng, _pick(rng, _ACCENTS), 15)),
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
        occluder = OCCLUDERS[int(rng.integers(1, len(OCCLUDERS)))]
        extent = float(rng.uniform(0.06, 0.18) if occluder == "bottom" else rng.uniform(0.1, 0.25))
        occluder_colour = jitter(rng, _pick(rng, camera.accents), 20)
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
