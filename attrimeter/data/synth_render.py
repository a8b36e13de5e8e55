"""Rendering of synthetic pedestrians, and where each attribute shows in the pixels (docs/architecture.md §7).

A person is drawn with numpy and Pillow: :func:`render_parts` paints part ids (:data:`PARTS`) in body units,
:func:`render_person` colours them and adds background, texture, illumination, blur and noise. Both are pure
functions of a :class:`~attrimeter.data.synth_params.Person` and a :class:`~attrimeter.data.synth_params.View`.
Every attribute is drawn where a person would look for it (hat on the head, colours on torso and legs, backpack on
the back and its straps in front, bag at the hip, handbag in the hand), and :data:`ATTRIBUTE_PARTS` says which parts
show which attribute, so :func:`attribute_mask` gives the ground truth an explanation can be checked against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from attrimeter.data.schema import MARKET1501
from attrimeter.data.synth_params import LOWER_COLOURS, RGB, UPPER_COLOURS, Person, View
from attrimeter.data.synth_sampling import jitter

__all__ = ["ATTRIBUTE_PARTS", "PARTS", "attribute_mask", "body_regions", "check_size", "render_parts",
           "render_person"]

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


def check_size(size: Sequence[int]) -> tuple[int, int]:
    """Validate an image size.

    Args:
        size: ``(height, width)``.

    Returns:
        ``(height, width)`` as ints.

    Raises:
        ValueError: If it is not two ints or is below 16x8.
    """
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
    h, w = check_size(size)
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
        draw.rectangle([x0, y0, x1, min(y1, horizon)], fill=jitter(rng, view.accents[int(rng.integers(2))], 25))
    draw.rectangle([0, horizon, w, h], fill=view.ground)
    for _ in range(int(rng.integers(0, 4))):  # pavement joints
        y = horizon + rng.uniform(0.05, 1.0) * (h - horizon)
        draw.line([(0, y), (w, y + rng.uniform(-0.3, 0.3) * h)], fill=jitter(rng, view.ground, 30), width=1)
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
    h, w = size = check_size(size)
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
    MARKET1501.index(attribute)  # raises KeyError naming the valid attributes
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
    h, w = check_size(size)
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
