import numpy as np
import pytest
import torch
from PIL import Image

from attrimeter.data.augment import augment_batch, to_float
from attrimeter.data.images import ImageError, read_image, read_images
from attrimeter.data.sampling import PKSampler


def test_pk_sampler_batches(rng):
    labels = np.repeat(np.arange(10), rng.integers(1, 6, 10))
    sampler = PKSampler(labels, p=4, k=3, seed=int(rng.integers(1 << 30)))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2
    seen = set()
    for b in batches:
        ids, counts = np.unique(labels[b], return_counts=True)
        assert len(ids) == 4 and (counts == 3).all()
        assert not seen & set(ids)  # an epoch visits each identity at most once
        seen |= set(ids)
    with pytest.raises(ValueError, match="at least p=20 identities"):
        PKSampler(labels, p=20, k=2)


def test_augment_keeps_shape_and_range():
    x = torch.rand(6, 3, 32, 16)
    y = augment_batch(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert not torch.equal(x, y)
    same = augment_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(y, same)  # reproducible for a seed
    flipped = augment_batch(x, torch.Generator(), flip=1.0, pad=0, erase=0.0)
    assert torch.equal(flipped, x.flip(-1))


def test_read_image_and_errors(tmp_path, rng):
    arr = rng.integers(0, 255, (40, 20, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr[..., 0]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", (40, 20)), arr)
    assert read_image(tmp_path / "gray.png", (16, 8)).shape == (16, 8, 3)
    batch = read_images([tmp_path / "a.png", tmp_path / "gray.png"], (16, 8), progress=False)
    assert batch.shape == (2, 16, 8, 3) and batch.dtype == np.uint8
    assert to_float(torch.from_numpy(batch)).shape == (2, 3, 16, 8)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageError, match="bad.jpg"):
        read_image(tmp_path / "bad.jpg", (16, 8))
    with pytest.raises(ImageError, match="missing.jpg"):
        read_images([tmp_path / "a.png", tmp_path / "missing.jpg"], (16, 8), progress=False)
