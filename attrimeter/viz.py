"""Pictures that make a match understandable at a glance: AAM overlays and the decomposition of a distance.

A match between person A and person B is shown as one figure (docs/architecture.md §1, §3): the two crops, the
attribute-guided attention maps (AAMs) of the attributes that contribute most to the distance drawn over both crops, and
a bar chart of every attribute's contribution ``c_k = p_k · d`` with the predicted attributes on which A and B differ.

:func:`overlay` and :func:`overlay_pair` need numpy only (the ``jet`` colour map is built in), so the torch-free
runtime uses them; :func:`to_png` needs Pillow and :func:`explain_figure` matplotlib, each imported when called (the
figure is drawn with the Agg canvas, so no backend is switched).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["explain_figure", "overlay", "overlay_pair", "resize_bilinear", "to_png"]

FIGSIZE = (11.0, 4.5)  # inches; written at DPI, i.e. 1100 x 450 pixels
DPI = 100
MAX_DIFFERING_LINES = 8
_TOP_COLOUR = "#d1495b"
_WARM_COLOUR = "#edae9f"
_REST_COLOUR = "#9aa5b1"
_PAIR_GAP = 4  # white pixels between the A and B crop of a pair

# matplotlib's 'jet' segment data: (position, value) of red, green and blue.
_JET = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _jet(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB in [0, 1] with the 'jet' colour map (shape ``x.shape + (3,)``)."""
    channels = [np.interp(x, [p for p, _ in _JET[c]], [v for _, v in _JET[c]]) for c in ("red", "green", "blue")]
    return np.stack(channels, axis=-1)


def resize_bilinear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D map with half-pixel centres (as PIL and ``align_corners=False`` do).

    Args:
        a: The map ``[h, w]``.
        height: Output rows.
        width: Output columns.

    Returns:
        float64 ``[height, width]``.
    """
    h, w = a.shape
    if (h, w) == (height, width):
        return a.astype(np.float64, copy=True)

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
        lo = np.floor(src).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = axis(h, height)
    c0, c1, fc = axis(w, width)
    a = a.astype(np.float64)
    rows = a[r0] * (1.0 - fr)[:, None] + a[r1] * fr[:, None]
    return rows[:, c0] * (1.0 - fc)[None, :] + rows[:, c1] * fc[None, :]


def _check_image(name: str, image: object) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{name} must be a uint8 array of shape [H, W, 3], got {image.dtype} {image.shape}")
    return image


def _check_values(name: str, values: object, ndim: int) -> np.ndarray:
    """Check a real, finite, non-negative array of ``ndim`` dimensions and return it as float64."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu" or arr.ndim != ndim or 0 in arr.shape:
        raise ValueError(f"{name} must be a non-empty real array with {ndim} dimension(s), got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains inf")
    if (arr < 0).any():
        raise ValueError(f"{name} must be >= 0, its minimum is {arr.min():.4g}")
    return arr


def overlay(image: np.ndarray, aam: np.ndarray, vmax: float | None = None, alpha: float = 0.45) -> np.ndarray:
    """Blend an attention map, upsampled to the crop, over the crop as a 'jet' heat map.

    Args:
        image: uint8 crop ``[H, W, 3]``.
        aam: Attention map ``[h, w]`` (>= 0, any scale), upsampled bilinearly to ``[H, W]``.
        vmax: Value shown at full heat; the map is divided by it and clipped to [0, 1]. ``None`` uses the map's own
            maximum (an all-zero map stays zero). Pass a shared maximum to make the maps of two crops comparable.
        alpha: Opacity of the heat map.

    Returns:
        uint8 ``[H, W, 3]``: ``(1 - alpha) * image + alpha * jet(aam / vmax)``.

    Raises:
        ValueError: On a bad image, a map that is not 2-D, NaN, inf or negative values, or ``vmax <= 0``.
    """
    image = _check_image("image", image)
    a = _check_values("aam", aam, 2)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if vmax is None:
        vmax = float(a.max())
        scale = 1.0 / vmax if vmax > 0 else 0.0
    else:
        if not (np.isfinite(vmax) and vmax > 0):
            raise ValueError(f"vmax must be a finite number > 0, got {vmax}")
        scale = 1.0 / vmax
    heat = np.clip(resize_bilinear(a, image.shape[0], image.shape[1]) * scale, 0.0, 1.0)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * 255.0 * _jet(heat)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def overlay_pair(image_a: np.ndarray, aam_a: np.ndarray, image_b: np.ndarray | None = None,
                 aam_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One attribute's attention maps over two crops, both scaled by their common maximum so that they compare.

    Args:
        image_a: uint8 crop ``[H, W, 3]`` of person A.
        aam_a: A's map ``[h, w]``.
        image_b: B's crop, or None.
        aam_b: B's map ``[h, w]``, or None (given without ``image_b``, it still counts for the common scale).

    Returns:
        ``(overlay of A, overlay of B or None without B's crop or map)``.

    Raises:
        ValueError: As :func:`overlay`.
    """
    maps = [_check_values("aam_a", aam_a, 2)] + ([] if aam_b is None else [_check_values("aam_b", aam_b, 2)])
    top = max(float(a.max()) for a in maps)
    vmax = top if top > 0 else None  # all-zero maps stay zero
    b = None if image_b is None or aam_b is None else overlay(image_b, maps[1], vmax)
    return overlay(image_a, maps[0], vmax), b


def to_png(image: np.ndarray) -> bytes:
    """Encode a uint8 RGB picture ``[H, W, 3]`` as PNG bytes (Pillow).

    Args:
        image: The picture.

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: On a picture that is not uint8 ``[H, W, 3]``.
    """
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_check_image("image", image)).save(buf, format="PNG")
    return buf.getvalue()


def _side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Put two crops next to each other on white, top-aligned, ``_PAIR_GAP`` pixels apart."""
    height = max(left.shape[0], right.shape[0])
    canvas = np.full((height, left.shape[1] + _PAIR_GAP + right.shape[1], 3), 255, np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + _PAIR_GAP :] = right
    return canvas


def _show_pair(ax: Axes, left: np.ndarray, right: np.ndarray, labels: tuple[str, str], labels_on_top: bool) -> None:
    ax.imshow(_side_by_side(left, right), interpolation="bilinear")
    ax.set_xticks([left.shape[1] / 2 - 0.5, left.shape[1] + _PAIR_GAP + right.shape[1] / 2 - 0.5], list(labels))
    ax.set_yticks([])
    ax.tick_params(length=0, labelsize=8, pad=2)
    if labels_on_top:
        ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def explain_figure(
    image_a: np.ndarray,
    image_b: np.ndarray,
    aam_a: np.ndarray,
    aam_b: np.ndarray,
    contributions: np.ndarray,
    titles: Sequence[str],
    d: float,
    d_hat: float,
    differing: Sequence[tuple[str, str, str]] = (),
    out: str | Path | None = None,
    top: int = 3,
    labels: tuple[str, str] = ("A", "B"),
) -> Figure:
    """Draw why A and B are ``d`` apart: crops, AAM overlays of the top attributes and all contributions.

    Left: the two crops, then one pair per top attribute (largest contribution first) with that attribute's AAM
    over both crops, both maps scaled by their common maximum so that they are comparable, titled with the attribute
    and its share of the distance. Right: the contributions of all M attributes as horizontal bars sorted from the
    largest, titled with ``d``, ``d̂`` and the largest share; a dashed line marks the uniform contribution d / M, and
    bars beyond it are highlighted (strongly past 1.5 d / M). Below the crops, the predicted attributes whose values
    differ between A and B.

    Args:
        image_a: uint8 crop ``[H, W, 3]`` of person A.
        image_b: uint8 crop ``[H', W', 3]`` of person B.
        aam_a: Attention maps ``[M, h, w]`` of A (>= 0, any scale).
        aam_b: Attention maps ``[M, h, w]`` of B.
        contributions: ``[M]`` contributions ``c_k = p_k · d`` (>= 0; they sum to ``d``).
        titles: M human-readable attribute names (e.g. ``Attribute.title``).
        d: Target distance.
        d_hat: Decomposed distance.
        differing: Predicted attributes whose values differ, as ``(title, value of A, value of B)``; at most
            8 lines are listed, the rest is counted.
        out: PNG file to write (at 100 dpi, i.e. 1100 x 450 pixels), or ``None``.
        top: Number of attributes with AAM overlays (clipped to M).
        labels: Names of the two crops.

    Returns:
        The matplotlib figure (attached to an Agg canvas).

    Raises:
        ValueError: On a bad image, mismatched or non-3-D maps, NaN, inf or negative maps or contributions,
            ``contributions`` or ``titles`` not of length M, non-finite ``d``/``d_hat``, ``top < 0``, or malformed
            ``labels``/``differing``.
    """
    image_a = _check_image("image_a", image_a)
    image_b = _check_image("image_b", image_b)
    maps_a = _check_values("aam_a", aam_a, 3)
    maps_b = _check_values("aam_b", aam_b, 3)
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"aam_a and aam_b must have the same shape [M, h, w], got {maps_a.shape} and {maps_b.shape}")
    m = maps_a.shape[0]
    contrib = np.asarray(contributions)
    if contrib.ndim != 1 or contrib.shape[0] != m:
        raise ValueError(f"contributions must have shape [M] = [{m}], got {contrib.shape}")
    contrib = _check_values("contributions", contrib, 1)
    titles = [str(t) for t in titles]
    if len(titles) != m:
        raise ValueError(f"titles must hold M = {m} names, got {len(titles)}")
    for name, value in (("d", d), ("d_hat", d_hat)):
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 0:
        raise ValueError(f"top must be an integer >= 0, got {top!r}")
    top = min(int(top), m)
    if len(labels) != 2:
        raise ValueError(f"labels must be two names, got {labels!r}")
    labels = (str(labels[0]), str(labels[1]))
    differing = list(differing)
    for entry in differing:
        if len(entry) != 3:
            raise ValueError(f"each differing entry must be (title, value of A, value of B), got {entry!r}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    fig_w, fig_h = FIGSIZE

    def box(x: float, y: float, w: float, h: float) -> list[float]:
        """Axes rectangle from inches to figure fractions."""
        return [x / fig_w, y / fig_h, w / fig_w, h / fig_h]

    total = float(contrib.sum())
    shares = contrib / total * 100.0 if total > 0 else np.zeros(m)
    order = np.argsort(-contrib, kind="stable")

    # Left block (0.1 .. 6.3 in): the crops, then one pair per top attribute, and under them the differing
    # predicted attributes (there is room there: the crops are tall and narrow, so the pairs are width-bound).
    lines: list[str] = []
    if differing:
        shown = differing if len(differing) <= MAX_DIFFERING_LINES else differing[: MAX_DIFFERING_LINES - 1]
        lines = [_shorten(f"{t}: {va} → {vb}", 90) for t, va, vb in shown]
        if len(shown) < len(differing):
            lines.append(f"+{len(differing) - len(shown)} more")
        lines.insert(0, f"Predicted attributes that differ ({labels[0]} → {labels[1]}):")
    line_h = 0.155  # inches per text line at 8 pt
    text_h = line_h * len(lines)
    left, right, gap = 0.1, 6.3, 0.15
    title_h, label_h = 0.55, 0.3
    slot_w = (right - left - gap * top) / (top + 1)
    pair_h_px = max(image_a.shape[0], image_b.shape[0])
    pair_w_px = image_a.shape[1] + _PAIR_GAP + image_b.shape[1]
    avail_h = fig_h - title_h - label_h - 0.15 - (text_h + 0.1 if lines else 0.0)
    inch_per_px = min(slot_w / pair_w_px, avail_h / pair_h_px)
    img_w, img_h = pair_w_px * inch_per_px, pair_h_px * inch_per_px
    block_h = title_h + img_h + label_h + (text_h + 0.1 if lines else 0.0)
    top_y = fig_h - title_h if lines else fig_h - (fig_h - block_h) / 2 - title_h
    img_y = top_y - img_h
    title_size = 9.0 if slot_w >= 1.4 else 8.0
    title_chars = max(8, int(slot_w * 72 / (title_size * 0.55)))
    for i in range(top + 1):
        x = left + i * (slot_w + gap) + (slot_w - img_w) / 2
        ax = fig.add_axes(box(x, img_y, img_w, img_h))
        if i == 0:
            _show_pair(ax, image_a, image_b, labels, labels_on_top=True)
            continue
        k = order[i - 1]
        over_a, over_b = overlay_pair(image_a, maps_a[k], image_b, maps_b[k])
        _show_pair(ax, over_a, cast(np.ndarray, over_b), labels, False)  # B's crop and map given: not None
        ax.set_title(f"{_shorten(titles[k], title_chars)}\n{shares[k]:.0f}% of d", fontsize=title_size,
                     color=_TOP_COLOUR, pad=4)
    if lines:
        fig.text(left / fig_w, (img_y - label_h - 0.1) / fig_h, "\n".join(lines), ha="left", va="top", fontsize=8,
                 linespacing=1.35)

    # Right block: contributions of all M attributes, largest at the top, top ones highlighted.
    bars_bottom, bars_top = 0.5, fig_h - 0.4
    bars_h = bars_top - bars_bottom
    ax = fig.add_axes(box(7.75, bars_bottom, 2.95, bars_h))
    fontsize = float(np.clip(bars_h * 72 / m * 0.72, 5.0, 9.0))
    ypos = np.arange(m)
    # What stands out is what takes more than a uniform share d / M (the dashed line): a flat explanation shows as
    # bars hugging the line, a sharp one as a few long bars far past it.
    uniform = total / m
    colours = [_TOP_COLOUR if contrib[k] > uniform * 1.5 else _WARM_COLOUR if contrib[k] > uniform else _REST_COLOUR
               for k in order]
    ax.barh(ypos, contrib[order], height=0.75, color=colours)
    if total > 0:
        ax.axvline(uniform, color="#333333", linestyle="--", linewidth=0.8)
    ax.set_yticks(ypos, [_shorten(titles[k], 24) for k in order], fontsize=fontsize)
    ax.set_ylim(m - 0.5, -0.5)
    xmax = float(contrib.max()) if contrib.max() > 0 else 1.0
    ax.set_xlim(0.0, xmax * 1.22)
    for y, k in zip(ypos, order, strict=True):
        ax.text(contrib[k] + xmax * 0.015, y, f"{shares[k]:.0f}%", va="center", ha="left", fontsize=fontsize * 0.9,
                color="#333333")
    ax.tick_params(axis="x", labelsize=7)
    ax.tick_params(axis="y", length=0, pad=2)
    ax.set_xlabel("contribution to d (dashed: uniform d / M)", fontsize=8, labelpad=2)
    ax.set_title(f"$d$ = {d:.2f},  $\\hat{{d}}$ = {d_hat:.2f}; largest share {shares.max():.0f}%", fontsize=10,
                 pad=4)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)

    if out is not None:
        fig.savefig(Path(out), dpi=DPI, format="png")
    return fig
