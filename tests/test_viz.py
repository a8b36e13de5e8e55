import numpy as np
import pytest
from PIL import Image

from attrimeter.viz import explain_figure, overlay

H, W, h, w = 128, 64, 8, 4


def _inputs(rng, m):
    image_a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    image_b = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    aam_a = rng.random((m, h, w)) * rng.uniform(0.1, 10.0)
    aam_b = rng.random((m, h, w)) * rng.uniform(0.1, 10.0)
    d = float(rng.uniform(0.2, 2.0))
    contributions = rng.dirichlet(np.ones(m)) * d
    titles = [f"attribute {k}" for k in range(m)]
    return image_a, image_b, aam_a, aam_b, contributions, titles, d


@pytest.mark.parametrize(("m", "top", "n_differing"), [(5, 10, 0), (26, 3, 12)])
def test_figure_is_written_with_fixed_size(tmp_path, rng, m, top, n_differing):
    image_a, image_b, aam_a, aam_b, contributions, titles, d = _inputs(rng, m)
    differing = [(f"attribute {k}", "no", "yes") for k in range(n_differing)]
    out = tmp_path / "match.png"
    fig = explain_figure(image_a, image_b, aam_a, aam_b, contributions, titles, d, 0.9 * d, differing, out=out,
                         top=top)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1100, 450)
    shown = min(top, m)
    assert len([ax for ax in fig.axes if ax.images]) == shown + 1  # the crops and one pair per top attribute
    bars = next(ax for ax in fig.axes if ax.patches)
    assert len(bars.patches) == m
    widths = [p.get_width() for p in bars.patches]
    assert widths == sorted(widths, reverse=True)
    assert [t.get_text() for t in bars.get_yticklabels()][0] == titles[int(np.argmax(contributions))]
    # Bars past the uniform contribution d / M stand out (strongly past 1.5 d / M), the rest are grey.
    uniform = contributions.sum() / m
    kinds = [(w > 1.5 * uniform, w > uniform) for w in widths]
    colour_of = {}
    for patch, kind in zip(bars.patches, kinds, strict=True):
        assert colour_of.setdefault(kind, patch.get_facecolor()) == patch.get_facecolor()
    assert len(set(colour_of.values())) == len(colour_of)
    assert any(line.get_xdata()[0] == pytest.approx(uniform) for line in bars.lines)
    text = "\n".join(t.get_text() for t in fig.texts)
    if n_differing:
        assert "attribute 0: no → yes" in text and f"+{n_differing - 7} more" in text
        assert len(text.splitlines()) == 1 + 8  # a header and at most 8 lines
    else:
        assert text == ""


def test_figure_without_out_returns_figure(rng):
    fig = explain_figure(*_inputs(rng, 3), d_hat=1.0, top=0)
    assert len([ax for ax in fig.axes if ax.images]) == 1


def test_overlay_changes_only_near_the_peak(rng):
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    flat = overlay(image, np.zeros((h, w)))
    assert flat.shape == (H, W, 3) and flat.dtype == np.uint8
    # Cells whose bilinear footprint stays inside one 64 x 32 quadrant of the 128 x 64 crop.
    row = int(rng.choice([0, 1, 2, 5, 6, 7]))
    col = int(rng.choice([0, 3]))
    peaked = np.zeros((h, w))
    peaked[row, col] = rng.uniform(0.5, 5.0)
    hot = overlay(image, peaked)
    changed = np.any(hot != flat, axis=-1)
    quadrant = (row // 4, col // 2)
    for qr in range(2):
        for qc in range(2):
            block = changed[qr * 64 : (qr + 1) * 64, qc * 32 : (qc + 1) * 32]
            assert block.any() == ((qr, qc) == quadrant)
    # Next to the peak's centre the heat is near full scale, where jet is red: no green or blue is added.
    y, x = int((row + 0.5) * H / h), int((col + 0.5) * W / w)
    base = 0.55 * image[y, x].astype(float)
    np.testing.assert_allclose(hot[y, x, 1:], base[1:], atol=1)
    assert hot[y, x, 0] >= base[0] + 0.45 * 255 * 0.5 - 1


def test_overlay_vmax_and_colormap_match_matplotlib(rng):
    from matplotlib import colormaps

    image = np.zeros((H, W, 3), np.uint8)
    aam = rng.random((h, w))
    out = overlay(image, aam, vmax=2.0 * aam.max(), alpha=1.0)
    assert out.max() <= 255 and out[..., 0].max() < 200  # at most half scale: no saturated red
    grey = np.linspace(0.0, 1.0, 11).reshape(1, 11)
    got = overlay(np.zeros((1, 11, 3), np.uint8), grey, vmax=1.0, alpha=1.0)
    np.testing.assert_allclose(got[0] / 255.0, colormaps["jet"](grey[0])[:, :3], atol=0.02)  # jet there has 256 levels


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(aam_b=a["aam_b"][:, :, :3]), "same shape"),
        (lambda a: a.update(aam_a=a["aam_a"][0]), "aam_a must be"),
        (lambda a: a.update(contributions=a["contributions"][:-1]), "contributions must have shape"),
        (lambda a: a.update(titles=a["titles"][:-1]), "titles must hold"),
        (lambda a: a["aam_a"].__setitem__((1, 2, 3), np.nan), "aam_a contains NaN"),
        (lambda a: a["aam_b"].__setitem__((0, 0, 0), np.nan), "aam_b contains NaN"),
        (lambda a: a["contributions"].__setitem__(2, np.nan), "contributions contains NaN"),
        (lambda a: a["contributions"].__setitem__(2, -1.0), "contributions must be >= 0"),
        (lambda a: a.update(image_a=a["image_a"].astype(np.float32)), "image_a must be a uint8"),
        (lambda a: a.update(image_b=a["image_b"][..., :2]), "image_b must be a uint8"),
        (lambda a: a.update(top=-1), "top must be"),
        (lambda a: a.update(d=float("nan")), "d must be finite"),
        (lambda a: a.update(differing=[("hat", "no")]), "differing entry"),
    ],
)
def test_figure_rejects_bad_inputs(rng, change, match):
    image_a, image_b, aam_a, aam_b, contributions, titles, d = _inputs(rng, 5)
    args = dict(image_a=image_a, image_b=image_b, aam_a=aam_a, aam_b=aam_b, contributions=contributions,
                titles=titles, d=d, d_hat=d)
    change(args)
    with pytest.raises(ValueError, match=match):
        explain_figure(**args)


def test_overlay_rejects_bad_inputs(rng):
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="aam contains NaN"):
        overlay(image, np.full((h, w), np.nan))
    with pytest.raises(ValueError, match="aam must be"):
        overlay(image, np.zeros((1, h, w)))
    with pytest.raises(ValueError, match="image must be a uint8"):
        overlay(image[..., 0], np.zeros((h, w)))
    with pytest.raises(ValueError, match="vmax"):
        overlay(image, np.ones((h, w)), vmax=0.0)
