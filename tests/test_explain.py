import json

import numpy as np
import pytest
import torch
from PIL import Image

from attrimeter.data.images import ImageError, read_image
from attrimeter.engine.target import load_target
from attrimeter.explain import Explanation, Interpreter


@pytest.fixture(scope="module")
def explainer(tiny_interpreter):
    return Interpreter(tiny_interpreter)


@pytest.fixture(scope="module")
def images(tiny_data):
    return sorted((tiny_data / "bounding_box_test").glob("0*.jpg"))[:4]


def test_single_pair_decomposes_the_target_distance(explainer, images, tiny_target):
    e = explainer.explain(images[0], images[1])
    assert isinstance(e, Explanation)
    m = len(e.attributes)
    assert e.d_k.shape == e.shares.shape == e.contributions.shape == (m,)
    assert e.query_aam.shape[0] == m and e.query_aam.shape == e.gallery_aam.shape
    assert e.contributions.sum() == pytest.approx(e.d, rel=1e-5)
    assert e.shares.sum() == pytest.approx(1.0, rel=1e-6)
    assert e.d_hat == pytest.approx(e.d_k.mean(), rel=1e-5)
    # d is the target's own distance on the same crops.
    target = load_target(tiny_target).model
    x = torch.from_numpy(np.stack([read_image(p, (64, 32)) for p in images[:2]])).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        f = target(x)
    assert e.d == pytest.approx(float((f[0] - f[1]).norm()), rel=1e-4)


def test_input_kinds_agree(explainer, images):
    by_path = explainer.explain_many(images[0], images[1:4])
    arrays = [read_image(p, (64, 32)) for p in images]
    by_array = explainer.explain_many(arrays[0], np.stack(arrays[1:4]))
    batch = torch.from_numpy(np.stack(arrays[1:4])).permute(0, 3, 1, 2).float() / 255.0
    by_tensor = explainer.explain_many(torch.tensor(arrays[0]).permute(2, 0, 1).float() / 255.0, batch, batch_size=2)
    assert len(by_path) == len(by_array) == len(by_tensor) == 3
    for a, b, c in zip(by_path, by_array, by_tensor, strict=True):
        assert a.d == pytest.approx(b.d, rel=1e-5) and a.d == pytest.approx(c.d, rel=1e-4)
        assert np.allclose(a.shares, c.shares, atol=1e-5)
    # batches of 2 split the gallery: every explanation still carries its own crop
    assert [np.array_equal(e.gallery_image, a) for e, a in zip(by_tensor, arrays[1:4], strict=True)] == [True] * 3


def test_one_image_gives_one_explanation_many_give_a_list(explainer, images):
    one = explainer.explain(images[0], images[1])
    listed = explainer.explain_many(images[0], [images[1]])
    assert isinstance(one, Explanation) and isinstance(listed, list) and len(listed) == 1
    assert listed[0].d == pytest.approx(one.d, rel=1e-6)
    assert len(explainer.explain_many(images[0], images[1])) == 1  # a gallery of one image is still a list
    arrays = np.stack([read_image(p, (64, 32)) for p in images[:2]])
    for many in ([images[1]], (images[1], images[2]), arrays, torch.from_numpy(arrays).permute(0, 3, 1, 2) / 255.0):
        with pytest.raises(ValueError, match="explain_many"):
            explainer.explain(images[0], many)


def test_explanations_describe_predictions_and_serialise(explainer, images):
    e = explainer.explain(images[0], images[2])
    summary = json.loads(json.dumps(e.to_dict()))
    assert len(summary["attributes"]) == len(e.attributes)
    assert summary["d"] == pytest.approx(e.d) and "id" not in summary  # no hit fields for a pair
    top = e.top(3)
    assert [s.title for s in top] == [e.titles[i] for i in np.argsort(-e.contributions, kind="stable")[:3]]
    assert set(e.predicted("query")) == set(e.attributes)
    query, gallery = e.predicted("query"), e.predicted("gallery")
    assert {x.name for x in e.differing()} == {a for a in e.attributes if query[a] != gallery[a]}
    for x in e.differing():
        assert (x.query, x.gallery) == (query[x.name], gallery[x.name]) and x.title in e.titles
    with pytest.raises(ValueError, match="which"):
        e.predicted("both")


def test_figure_is_written(explainer, images, tmp_path):
    explainer.explain(images[0], images[1]).figure(tmp_path / "fig.png")
    with Image.open(tmp_path / "fig.png") as im:
        assert im.format == "PNG" and im.size == (1100, 450)


def test_bad_inputs_are_named(explainer, images, tmp_path):
    bad = np.zeros((64, 32, 3), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        explainer.explain(images[0], bad)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        explainer.explain(np.zeros((64, 32), np.uint8), images[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        explainer.explain(np.full((64, 32, 3), 7.0, np.float32), images[0])
    with pytest.raises(ImageError, match="nope.jpg"):
        explainer.explain(images[0], tmp_path / "nope.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ImageError, match="corrupt.jpg"):
        explainer.explain(corrupt, images[0])
    with pytest.raises(ValueError, match="one query"):
        explainer.explain(images[:2], images[0])
