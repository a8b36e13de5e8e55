"""Parameters of a synthetic pedestrian and of the camera that sees it (docs/architecture.md §7).

A :class:`Person` is an identity: the 26 Market-1501 attributes plus identity nuisance (garment shade within the
colour class, texture, prints, proportions, skin tone, hair, shoe and bag colours). A :class:`CameraStyle` is what one
camera makes of every image; a :class:`View` is the camera nuisance of one image (viewpoint, walking phase, scale,
position, background, illumination, blur, noise, occlusion). All three are frozen, validated dataclasses that survive
a JSON round trip (``synth.json`` stores them). :func:`change_attribute` gives the counterfactual of a person with
exactly one attribute changed. Drawing them at random is :mod:`attrimeter.data.synth_sampling`; rendering them is
:mod:`attrimeter.data.synth_render`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from attrimeter.data.schema import MARKET1501

__all__ = [
    "COLOUR_ATTRIBUTES",
    "FACINGS",
    "LOWER_COLOURS",
    "OCCLUDERS",
    "RGB",
    "TEXTURES",
    "UPPER_COLOURS",
    "CameraStyle",
    "Person",
    "View",
    "change_attribute",
    "is_plausible_change",
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

# Binary attributes and the Person field that holds them (label 1 = field True).
_BINARY_FIELDS = {
    "backpack": "backpack", "bag": "bag", "handbag": "handbag", "hat": "hat", "hair": "long_hair",
    "gender": "female", "up": "short_sleeve", "down": "short_lower",
}
_UPPER_ATTRS = {f"up{c}": c for c in UPPER_COLOURS}
_LOWER_ATTRS = {f"down{c}": c for c in LOWER_COLOURS}

COLOUR_ATTRIBUTES: frozenset[str] = frozenset(_UPPER_ATTRS) | frozenset(_LOWER_ATTRS)
"""The Market-1501 colour attributes (``up<colour>``, ``down<colour>``): one of each group is on per person."""

OCCLUDERS: tuple[str, ...] = ("none", "bottom", "left", "right")
"""Values of :attr:`View.occluder`."""


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
        if self.occluder not in OCCLUDERS:
            raise ValueError(f"View.occluder must be one of {', '.join(OCCLUDERS)}, got {self.occluder!r}")

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
