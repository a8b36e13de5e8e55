"""GeM, BN-neck, input normalisation and the folded eval-mode head (docs/architecture.md §3)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from attrimeter.models.registry import create_model
from attrimeter.models.reid import BNNeck, GeM


def _gem_reference(x: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    return np.mean(np.maximum(x, eps) ** p, axis=(2, 3)) ** (1.0 / p)


def test_gem_matches_the_formula(rng):
    x = rng.uniform(0.0, 3.0, size=(3, 5, 7, 4))
    x[x < 0.6] = 0.0  # post-ReLU maps have exact zeros
    x[0, 1] = 0.0  # and whole channels of zeros
    p = float(rng.uniform(1.0, 6.0))
    gem = GeM(p)
    out = gem(torch.from_numpy(x).float()).detach().double().numpy()
    ref = _gem_reference(x, p)
    assert out.shape == (3, 5)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5
    assert abs(out[0, 1] - 1e-6) < 1e-9  # an all-zero channel pools to eps


def test_gem_p1_is_average_pooling(rng):
    x = torch.from_numpy(rng.uniform(0.01, 2.0, size=(2, 6, 5, 3))).float()
    expected = nnf.adaptive_avg_pool2d(x, 1).flatten(1)
    torch.testing.assert_close(GeM(1.0)(x), expected)
    below = GeM(1.0)
    with torch.no_grad():
        below.p.fill_(0.3)  # an optimiser step may push p under 1: the forward clamps it
    torch.testing.assert_close(below(x), expected)
    assert below.effective_p().item() == 1.0


def test_gem_p_is_learnable(rng):
    gem = GeM(3.0)
    assert isinstance(gem.p, torch.nn.Parameter) and gem.p.ndim == 0 and gem.p.item() == 3.0
    x = torch.from_numpy(rng.uniform(0.0, 2.0, size=(2, 4, 3, 3))).float()
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0
    model = create_model("resnet18", width=0.25, gem_p=2.5)
    assert "pool.p" in dict(model.named_parameters()) and model.pool.p.item() == 2.5


def test_gem_rejects_bad_input():
    with pytest.raises(ValueError, match="1"):
        GeM(0.9)
    with pytest.raises(ValueError, match="feature map"):
        GeM()(torch.rand(2, 3, 4))


def test_bnneck_bias_is_frozen_at_zero():
    neck = BNNeck(8)
    assert not neck.bias.requires_grad and torch.all(neck.bias == 0)
    model = create_model("resnet18", num_classes=3, width=0.25)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not model.neck.bias for p in params)
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(2):
        g, logits = model.forward_train(torch.rand(4, 3, 64, 32))
        (g.sum() + nnf.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))).backward()
        opt.step()
        opt.zero_grad()
    assert torch.all(model.neck.bias == 0)
    assert not torch.all(model.neck.weight == 1)  # the neck's scale did train


def test_bnneck_folded_affine_reproduces_eval_output():
    neck = BNNeck(6)
    with torch.no_grad():
        neck.running_mean.normal_()
        neck.running_var.uniform_(0.2, 3.0)
        neck.weight.uniform_(0.5, 2.0)
    neck.eval()
    g = torch.rand(5, 6) * 4
    scale, shift = neck.folded()
    assert scale.shape == shift.shape == (6,)
    torch.testing.assert_close(g * scale + shift, neck(g))


def test_head_params_reproduce_the_embedding():
    model = create_model("resnet18", width=0.25).eval()
    with torch.no_grad():
        model.pool.p.fill_(float(torch.empty(()).uniform_(1.5, 5.0)))
        model.neck.running_mean.normal_()
        model.neck.running_var.uniform_(0.2, 3.0)
        model.neck.weight.uniform_(0.5, 2.0)
    p, scale, shift = model.head_params()
    assert isinstance(p, float) and p == pytest.approx(model.pool.p.item())
    assert not scale.requires_grad and not shift.requires_grad
    x = torch.rand(3, 3, 128, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        f = model(x)
    gem = feats.double().clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
    torch.testing.assert_close(gem * scale.double() + shift.double(), f.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.embed(feats), f)


def test_normalize_matches_imagenet_statistics():
    model = create_model("resnet18", width=0.25)
    x = torch.rand(2, 3, 8, 4)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - mean) / std)


@pytest.mark.parametrize(("images", "message"), [
    (torch.rand(3, 64, 32), "shape"),
    (torch.rand(2, 1, 64, 32), "shape"),
    (torch.randint(0, 255, (2, 3, 64, 32), dtype=torch.uint8), "uint8"),
    (torch.full((2, 3, 64, 32), float("nan")), "NaN"),
    (torch.full((1, 3, 64, 32), float("inf")), "infinite"),
])
def test_bad_images_are_rejected(images, message):
    model = create_model("resnet18", width=0.25).eval()
    with pytest.raises(ValueError, match=message):
        model(images)
