"""Importing fast-reid / torchreid checkpoints as targets: the embedding must be the one their codebase computes.

Checkpoints are written in the layouts the two codebases save and the imported target is compared with a reference
forward written from their model code (``reid_checkpoints``).
"""

import pytest
import torch
from reid_checkpoints import (
    fastreid_checkpoint,
    fastreid_embedding,
    random_neck,
    random_source,
    torchreid_checkpoint,
    torchreid_embedding,
)

from attrimeter.engine.target import import_target, load_target
from attrimeter.models.convert import import_reid_model
from attrimeter.models.registry import create_model


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("pool", "with_neck", "module_prefix", "pixel_buffers"), [
    ("gem_p", True, False, False),  # POOL_LAYER GeneralizedMeanPoolingP + BN-neck
    ("avg", True, True, True),  # Bagtricks: GlobalAvgPool + BN-neck; a wrapped model; old pixel buffers
    ("avg", False, False, False),  # WITH_BNNECK False (fast-reid's default config)
])
def test_fastreid_resnet50_imports_with_its_embedding(tmp_path, pool, with_neck, module_prefix, pixel_buffers):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    source = random_source("resnet50", last_stride=1)
    neck = random_neck(source.num_features, gen) if with_neck else None
    path = tmp_path / "model_final.pth"
    fastreid_checkpoint(path, source, pool, neck, module_prefix, pixel_buffers)
    model, info = import_reid_model(path)
    assert info["style"] == "fast-reid" and info["bn_neck"] == with_neck and info["last_stride"] == 1
    assert info["pooling"] == ("gem" if pool == "gem_p" else "avg") and info["stem_pool"] == "fast-reid"
    x = torch.rand(3, 3, 64, 32)
    with torch.no_grad():
        got, expected = model(x), fastreid_embedding(source, x, pool, neck)
        # The same network with torchvision's padded stem pooling is measurably another model.
        other = create_model("resnet50", last_stride=1, gem_p=info["gem_p"])
        other.load_state_dict(model.state_dict())
        other.eval()
        assert _relative_error(other(x), expected) > 1e-3
    assert _relative_error(got, expected) < 1e-5


def test_fastreid_fixed_gem_needs_the_pooling_named(tmp_path):
    source = random_source("resnet18", last_stride=1)
    path = tmp_path / "model_final.pth"
    fastreid_checkpoint(path, source, "gem", None)  # GeneralizedMeanPooling: p = 3, no tensor in the file
    x = torch.rand(2, 3, 64, 32)
    model, info = import_reid_model(path, arch="resnet18", pooling="gem", gem_p=3.0)
    assert info["gem_p"] == 3.0
    with torch.no_grad():
        assert _relative_error(model(x), fastreid_embedding(source, x, "gem", None, p=3.0)) < 1e-5
        avg, _ = import_reid_model(path, arch="resnet18")  # without it: average pooling, another embedding
        assert _relative_error(avg(x), fastreid_embedding(source, x, "avg", None)) < 1e-5


@pytest.mark.parametrize("data_parallel", [True, False])
def test_torchreid_resnet50_imports_with_its_embedding(tmp_path, data_parallel):
    source = random_source("resnet50", last_stride=2)  # torchreid's resnet50 keeps the ImageNet stride
    path = tmp_path / "model.pth.tar-60"
    torchreid_checkpoint(path, source, data_parallel)
    model, info = import_reid_model(path)
    assert info["style"] == "torchreid" and not info["bn_neck"] and info["last_stride"] == 2
    assert info["pooling"] == "avg" and info["gem_p"] == 1.0
    x = torch.rand(3, 3, 64, 32)
    with torch.no_grad():
        assert _relative_error(model(x), torchreid_embedding(source, x)) < 1e-5
        wrong_stride, _ = import_reid_model(path, last_stride=1)  # a wrong stride is another model
        assert wrong_stride.forward_features(x).shape[-2:] != model.forward_features(x).shape[-2:]
    scale, shift = model.neck.folded()  # the identity neck: the interpreter pools with the same affine map
    assert torch.allclose(scale, torch.ones_like(scale), atol=1e-6) and torch.equal(shift, torch.zeros_like(shift))


def test_import_target_writes_a_loadable_target(tmp_path):
    source = random_source("resnet18", last_stride=1)
    gen = torch.Generator().manual_seed(1)
    neck = random_neck(source.num_features, gen)
    fastreid_checkpoint(tmp_path / "m.pth", source, "gem_p", neck, module_prefix=True)
    out = import_target(tmp_path / "m.pth", tmp_path / "run", (64, 32), arch="resnet18")
    ck = load_target(out)
    assert ck.image_size == (64, 32) and "schema" not in ck.meta and ck.meta["imported"]["style"] == "fast-reid"
    p, _, _ = ck.model.head_params()
    assert p == pytest.approx(2.7)
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        assert _relative_error(ck.model(x), fastreid_embedding(source, x, "gem_p", neck)) < 1e-5


def _edit(path, key, fn):
    ck = torch.load(path, weights_only=True)
    fn(ck[key])
    torch.save(ck, path)


@pytest.mark.parametrize(("write", "kwargs", "match"), [
    (lambda p, s: torchreid_checkpoint(p, s, fc=True), {}, r"fc layers \(fc\.0\.weight"),
    (lambda p, s: (fastreid_checkpoint(p, s, "avg", None), _edit(p, "model", lambda m: m.update(
        {"heads.bottleneck.0.weight": torch.randn(256, s.num_features, 1, 1)}))), {}, "EMBEDDING_DIM"),
    (lambda p, s: (fastreid_checkpoint(p, s, "avg", None), _edit(p, "model", lambda m: m.update(
        {"heads.attention.weight": torch.ones(3)}))), {}, r"heads\.attention\.weight"),
    (lambda p, s: fastreid_checkpoint(p, s, "gem_p", None), {"pooling": "avg"}, "learnable GeM"),
    (lambda p, s: (fastreid_checkpoint(p, s, "gem_p", None), _edit(p, "model", lambda m: m.update(
        {"backbone.NL_2.0.g.weight": torch.ones(1)}))), {}, "non-local blocks"),
    (lambda p, s: (torchreid_checkpoint(p, s), _edit(p, "state_dict", lambda m: m.update(
        {"module.layer1.0.bn1.IN.weight": torch.ones(1)}))), {}, "IBN layers"),
    (lambda p, s: fastreid_checkpoint(p, s, "gem_p", None, p=0.5), {}, "below 1"),
    (lambda p, s: torch.save(s.backbone.state_dict(), p), {}, "torchvision state dict"),
    (lambda p, s: torchreid_checkpoint(p, s), {"arch": "resnet34"}, r"cannot load torchreid-style weights"),
    (lambda p, s: torchreid_checkpoint(p, s), {"pooling": "max"}, "unknown pooling 'max'"),
    (lambda p, s: torchreid_checkpoint(p, s), {"style": "timm"}, "unknown checkpoint style 'timm'"),
])
def test_what_the_target_contract_cannot_express_is_refused(tmp_path, write, kwargs, match):
    path = tmp_path / "ck.pth"
    write(path, random_source("resnet18", last_stride=1))
    with pytest.raises(ValueError, match=match):
        import_reid_model(path, **{"arch": "resnet18", **kwargs})

