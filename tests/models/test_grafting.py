import pytest
import torch
from torch import nn

from attrimeter.kernels.masked_gem_pool import masked_gem_pool_naive
from attrimeter.models import create_model
from attrimeter.models.interpreter import AttriMeter, target_stages


def _target(arch, **kw):
    model = create_model(arch, num_classes=5, width=0.25, **kw)
    with torch.no_grad():  # a trained-looking BN-neck and GeM, so the affine and p matter
        model.neck.running_mean.uniform_(-0.5, 0.5)
        model.neck.running_var.uniform_(0.5, 2.0)
        model.neck.weight.uniform_(0.5, 1.5)
        model.pool.p.fill_(2.5)
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenetv2"])
def test_graft_starts_equal_to_the_target(arch):
    target = _target(arch)
    model = AttriMeter(target, 7).eval()
    x = torch.rand(3, 3, 64, 32)
    out = model(x)
    with torch.no_grad():
        f = target(x)
    assert out.target.shape == f.shape and out.attributes.shape == (3, 7, f.shape[1])
    assert torch.allclose(out.target, f, atol=1e-5)
    # The last conv starts at zero: every map is qexp(0) = 1, so every f_k equals the target's embedding.
    assert torch.all(out.aam() == 1)
    assert torch.allclose(out.attributes, f[:, None].expand_as(out.attributes), rtol=1e-4, atol=1e-4)
    assert out.attr_logits.shape == (3, 7) and out.stacked().shape == (3, 8, f.shape[1])


def test_attribute_embeddings_follow_the_direct_definition():
    target = _target("resnet18")
    model = AttriMeter(target, 5, shared="layer3").eval()
    nn.init.normal_(model.head[2].weight, std=0.5)
    with torch.no_grad():  # the branch drifts from the target in training; the maps still mask the target's F
        for param in model.late.parameters():
            param.mul_(1.5)
    x = torch.rand(2, 3, 64, 32)
    out = model(x)
    feats = model.target_features(model.shared_features(x))
    p, scale, shift = target.head_params()
    _, ref = masked_gem_pool_naive(feats.double(), out.logits.double(), p, 1e-6, scale.double(), shift.double())
    err = (out.attributes.double() - ref).norm() / ref.norm()
    assert err < 1e-5


def test_target_is_frozen_and_only_the_branch_trains():
    target = _target("resnet18")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    model = AttriMeter(target, 4)
    model.train()
    assert not target.training and all(not p.requires_grad for p in target.parameters())
    assert all(not m.training for m in model.late.modules() if isinstance(m, nn.BatchNorm2d))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(torch.rand(4, 3, 64, 32))
    (out.attributes.square().mean() + out.attr_logits.square().mean()).backward()
    opt.step()
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert model.head[2].weight.abs().sum() > 0
    # The branch is a copy: training it never touches the target's late stages.
    assert model.late.body["layer4"] is not target_stages(target)["layer4"]


def test_any_module_that_names_its_stages_can_be_grafted():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.stages = {"a": self.a, "b": self.b}

        def normalize(self, x):
            return x - 0.5

        def embed(self, f):
            return f.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)

        def head_params(self):
            return 3.0, torch.ones(16), torch.zeros(16)

    model = AttriMeter(Tiny(), 3, shared="a")
    out = model(torch.rand(2, 3, 32, 16))
    assert out.attributes.shape == (2, 3, 16)
    assert torch.allclose(out.attributes[:, 0], out.target, rtol=1e-4)


def test_graft_errors_name_the_problem():
    target = _target("resnet18")
    with pytest.raises(ValueError, match="shared='layer4'"):
        AttriMeter(target, 3, shared="layer4")
    with pytest.raises(ValueError, match="num_attributes"):
        AttriMeter(target, 0)
    with pytest.raises(ValueError, match="classifier"):
        AttriMeter(target, 3, classifier="svm")
    with pytest.raises(TypeError, match="no normalize"):
        AttriMeter(nn.Linear(3, 3), 3)
    with pytest.raises(TypeError, match="names no stages"):
        target_stages(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="NaN"):
        AttriMeter(target, 3)(torch.full((1, 3, 64, 32), float("nan")))


def test_no_hook_is_left_on_the_target():
    target = _target("resnet18")
    model = AttriMeter(target, 3)
    model(torch.rand(1, 3, 64, 32))
    for m in target.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
