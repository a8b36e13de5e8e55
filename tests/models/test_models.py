"""Registry-parametrised tests of every target model (timm style): shapes, stages, determinism, config round-trip."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from attrimeter.models import registry
from attrimeter.models.registry import create_model, list_models, register_model
from attrimeter.models.reid import ReIDModel, build_model

MODELS = list_models()
SMALL = {"width": 0.25}  # thin but structurally complete networks keep the suite fast on 2 CPU cores
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def _perturb_bn(model: ReIDModel) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, so eval outputs depend on them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                if m.bias.requires_grad:
                    m.bias.normal_(0, 0.1)


def test_registry_lists_the_required_architectures():
    assert {"resnet18", "resnet34", "resnet50", "mobilenetv2"} <= set(MODELS)
    assert list_models("resnet*") == ["resnet18", "resnet34", "resnet50"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [(128, 64), (256, 128)])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(name, size, batch):
    model = create_model(name, num_classes=7, **SMALL)
    c = model.num_features
    reduction = model.backbone.feature_info[-1]["reduction"]
    assert reduction == 16  # last stride 1 by default
    x = torch.rand(batch, 3, *size)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        f = model(x)
    assert feats.shape == (batch, c, size[0] // reduction, size[1] // reduction)
    assert f.shape == (batch, c)
    if batch > 1:  # BatchNorm in training mode needs more than one sample
        model.train()
        g, logits = model.forward_train(x)
        assert g.shape == (batch, c) and logits.shape == (batch, 7)
        assert model(x).shape == (batch, c)


@pytest.mark.parametrize("name", MODELS)
def test_stages_compose_to_forward_features(name):
    model = create_model(name, **SMALL).eval()
    _perturb_bn(model)
    backbone = model.backbone
    assert backbone.stage_names == STAGES
    assert [i["name"] for i in backbone.feature_info] == list(STAGES)
    x = torch.rand(2, 3, 128, 64)
    with torch.no_grad():
        h = model.normalize(x)
        for info, (stage_name, stage) in zip(backbone.feature_info, backbone.stages.items(), strict=True):
            h = stage(h)
            assert h.shape == (2, info["num_chs"], 128 // info["reduction"], 64 // info["reduction"]), stage_name
        feats = model.forward_features(x)
    assert torch.equal(h, feats)
    assert backbone.feature_info[-1]["num_chs"] == model.num_features == feats.shape[1]
    assert feats.min() >= 0 and feats.max() > 0  # post-ReLU feature map, not all zero


@pytest.mark.parametrize("name", MODELS)
def test_eval_forward_is_deterministic(name):
    model = create_model(name, **SMALL).eval()
    _perturb_bn(model)
    x = torch.rand(3, 3, 128, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trip(name):
    model = create_model(name, num_classes=4, width=0.25, last_stride=2, gem_p=4.0)
    _perturb_bn(model)
    with torch.no_grad():
        model.pool.p.add_(torch.rand(()))
    config = json.loads(json.dumps(model.config))  # plain values: survives JSON / YAML / torch.load(weights_only)
    expected = {"arch": name, "num_classes": 4, "width": 0.25, "last_stride": 2, "gem_p": 4.0}
    if name.startswith("resnet"):
        expected["stem_pool"] = "torchvision"
    assert config == expected
    rebuilt = build_model(config)
    x = torch.rand(2, 3, 128, 64)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert not torch.allclose(rebuilt(x), model(x))  # a fresh model differs: the comparison below can fail
        rebuilt.load_state_dict(model.state_dict())
        assert torch.equal(rebuilt(x), model(x))
        assert torch.equal(rebuilt.forward_train(x)[1], model.forward_train(x)[1])
    assert rebuilt.config == model.config
    assert rebuilt.backbone.feature_info[-1]["reduction"] == 32


@pytest.mark.parametrize("name", MODELS)
def test_deep_copied_late_stages_are_independent(name):
    """The interpreter deep-copies the late stages of a frozen target: a copy computes the same and owns its weights."""
    model = create_model(name, **SMALL).eval()
    stage = model.backbone.stages["layer3"]
    clone = copy.deepcopy(stage)
    x = torch.rand(2, model.backbone.feature_info[2]["num_chs"], 16, 8)
    with torch.no_grad():
        assert torch.equal(clone(x), stage(x))
        for p in clone.parameters():
            p.add_(1.0)
        assert not torch.equal(clone(x), stage(x))
    # A deep copy of the whole model keeps its stage views pointing at its own (copied) modules.
    whole = copy.deepcopy(model)
    owned = {id(p) for p in whole.backbone.parameters()}
    for stage in whole.backbone.stages.values():
        assert all(id(p) in owned for p in stage.parameters())


# Parameter counts of torchvision's ImageNet models minus their 1000-way classifier (C * 1000 + 1000): the standard
# widths reproduce the standard architectures, so standard state dicts fit.
REFERENCE_BACKBONE_PARAMS = {
    "resnet18": 11_689_512 - 513_000,
    "resnet34": 21_797_672 - 513_000,
    "resnet50": 25_557_032 - 2_049_000,
    "mobilenetv2": 3_504_872 - 1_281_000,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_BACKBONE_PARAMS))
def test_standard_width_matches_reference_parameter_count(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.backbone.parameters()) == REFERENCE_BACKBONE_PARAMS[name]


def test_width_scales_the_network():
    full, half = create_model("resnet18"), create_model("resnet18", width=0.5)
    assert (full.num_features, half.num_features) == (512, 256)
    assert sum(p.numel() for p in half.parameters()) < 0.3 * sum(p.numel() for p in full.parameters())


def test_normalization_buffers_are_in_the_state_dict():
    model = create_model("resnet18", **SMALL)
    state = model.state_dict()
    assert state["pixel_mean"].flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert state["pixel_std"].flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    assert state["pixel_mean"].shape == state["pixel_std"].shape == (1, 3, 1, 1)
    with torch.no_grad():
        model.pixel_mean.fill_(0.5)
    assert build_model(model.config).pixel_mean[0, 0, 0, 0] != 0.5
    other = build_model(model.config)
    other.load_state_dict(model.state_dict())
    assert torch.all(other.pixel_mean == 0.5)


def test_classifier_is_optional():
    model = create_model("resnet18", **SMALL)
    assert model.classifier is None
    with pytest.raises(RuntimeError, match="no classifier"):
        model.forward_train(torch.rand(2, 3, 64, 32))
    model = create_model("resnet18", num_classes=11, **SMALL)
    assert model.classifier.bias is None and model.classifier.weight.shape == (11, model.num_features)


def test_duplicate_registration_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))

    def resnet18(**kwargs):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        register_model(resnet18)

    def tiny_test_net(*, num_classes=0, **kwargs):
        return create_model("resnet18", num_classes=num_classes, width=0.25)

    assert register_model(tiny_test_net) is tiny_test_net
    assert "tiny_test_net" in list_models()
    assert create_model("tiny_test_net", num_classes=3).classifier.out_features == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model(tiny_test_net)


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown model 'resnet99'.*mobilenetv2.*resnet18"):
        create_model("resnet99")
    with pytest.raises(KeyError, match="resnet99"):
        build_model({"arch": "resnet99"})


@pytest.mark.parametrize("bad", [{"width": 0}, {"width": float("nan")}, {"last_stride": 3}, {"gem_p": 0.5},
                                 {"num_classes": -1}])
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_invalid_options_are_rejected(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_model(name, **bad)


def test_stem_pool_is_checked_and_kept_in_the_config():
    with pytest.raises(ValueError, match="stem_pool must be one of"):
        create_model("resnet18", stem_pool="caffe")
    model = create_model("resnet18", width=0.25, stem_pool="fast-reid")
    assert build_model(model.config).backbone.maxpool.ceil_mode and model.config["stem_pool"] == "fast-reid"


def test_unknown_option_and_download_request_are_rejected():
    with pytest.raises(TypeError, match="dilation"):
        create_model("resnet18", dilation=2)
    with pytest.raises(TypeError, match="local weights file"):
        create_model("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="arch"):
        build_model({"num_classes": 3})


def test_importing_the_registry_does_not_import_torch():
    code = ("import sys, attrimeter, attrimeter.models, attrimeter.models.registry; "
            "from attrimeter.models import register_model; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
