"""Backbone weights from torchvision / timm / fast-reid / torchreid / AttriMeter files, and the errors on mismatches.

The files are written here in each codebase's own layout (key names, heads, checkpoint wrappers) from a randomly
initialised model, then loaded into a fresh model: the feature maps must be identical.
"""

import json
import re
import struct

import numpy as np
import pytest
import torch
from reid_checkpoints import random_source

from attrimeter.models.registry import create_model
from attrimeter.models.weights import load_backbone_weights, read_state_dict

SMALL = {"width": 0.25}
# torchvision's MobileNetV2 ``features`` index where each of our stages starts (its architecture, written out here).
MOBILENET_STAGE_START = {"stem": 0, "layer1": 2, "layer2": 4, "layer3": 7, "layer4": 14}


def _random_model(name: str, **kwargs):
    return random_source(name, **{**SMALL, **kwargs})


def _save_safetensors(state: dict, path) -> None:
    """Minimal writer of the safetensors format (8-byte header size, JSON header, raw little-endian data)."""
    header, chunks, offset = {}, [], 0
    for key, tensor in state.items():
        data = tensor.detach().contiguous().numpy().astype("<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def _write(style: str, model, path) -> None:
    backbone = model.backbone.state_dict()
    c = model.num_features
    if style == "torchvision":
        torch.save({**backbone, "fc.weight": torch.randn(1000, c), "fc.bias": torch.randn(1000)}, path)
    elif style == "timm":
        _save_safetensors({**backbone, "fc.weight": torch.randn(10, c), "fc.bias": torch.randn(10)}, path)
    elif style == "fast-reid":
        state = {f"backbone.{k}": v for k, v in backbone.items()}
        state.update({"heads.pool_layer.p": torch.tensor([3.0]), "heads.bottleneck.0.weight": torch.ones(c),
                      "heads.bottleneck.0.running_mean": torch.zeros(c), "heads.weight": torch.randn(751, c),
                      "pixel_mean": torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)})
        torch.save({"model": state, "iteration": 1200, "optimizer": {}}, path)
    elif style == "torchreid":
        state = {f"module.{k}": v for k, v in backbone.items()}
        state.update({"module.fc.0.weight": torch.randn(512, c), "module.fc.0.bias": torch.randn(512),
                      "module.fc.1.running_var": torch.ones(512), "module.classifier.weight": torch.randn(751, 512),
                      "module.classifier.bias": torch.randn(751)})
        torch.save({"state_dict": state, "epoch": 60, "rank1": 0.93}, path)
    else:
        raise AssertionError(style)


def _assert_same_features(a, b, equal: bool = True) -> None:
    x = torch.rand(2, 3, 128, 64)
    with torch.no_grad():
        same = torch.equal(a.forward_features(x), b.forward_features(x))
    assert same == equal


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize(("style", "detected"), [
    ("torchvision", "torchvision"), ("timm", "torchvision"), ("fast-reid", "fast-reid"), ("torchreid", "torchreid"),
])
def test_round_trip_in_each_style(tmp_path, name, style, detected):
    source = _random_model(name)
    path = tmp_path / ("weights.safetensors" if style == "timm" else "weights.pth")
    _write(style, source, path)
    for requested, expected_style in (("auto", detected), (style, style)):
        target = create_model(name, num_classes=5, **SMALL).eval()
        _assert_same_features(source, target, equal=False)
        report = load_backbone_weights(target, path, style=requested)
        _assert_same_features(source, target)
        assert report.style == expected_style
        assert len(report.loaded) == len(source.backbone.state_dict())
        assert report.dropped and all(re.match(r"(module\.)?(fc|classifier|heads|pixel_)", k) for k in report.dropped)
        assert torch.all(target.neck.bias == 0) and target.classifier.out_features == 5  # the head is untouched


def test_torchvision_mobilenetv2_layout(tmp_path):
    source = _random_model("mobilenetv2")
    state = {}
    for key, value in source.backbone.state_dict().items():
        stage, index, rest = key.split(".", 2)
        state[f"features.{MOBILENET_STAGE_START[stage] + int(index)}.{rest}"] = value
    # Key names of torchvision's mobilenet_v2: the blocks are built the same way, so the renumbered keys are exactly
    # torchvision's (the t=1 block has no expansion conv; the last entry is the 1x1 conv to 1280 channels).
    for key in ("features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                "features.1.conv.2.running_var", "features.2.conv.0.0.weight", "features.2.conv.1.0.weight",
                "features.2.conv.3.running_mean", "features.17.conv.2.weight", "features.18.0.weight",
                "features.18.1.num_batches_tracked"):
        assert key in state, key
    assert not any(k.startswith("features.19.") for k in state)
    state.update({"classifier.1.weight": torch.randn(1000, 1280), "classifier.1.bias": torch.randn(1000)})
    torch.save(state, tmp_path / "mobilenet_v2.pth")
    target = create_model("mobilenetv2", pretrained=tmp_path / "mobilenet_v2.pth", **SMALL).eval()
    _assert_same_features(source, target)
    with pytest.raises(ValueError, match="no fast-reid-style layout for mobilenetv2"):
        load_backbone_weights(target, tmp_path / "mobilenet_v2.pth", style="fast-reid")


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_attrimeter_checkpoint_initialises_another_target(tmp_path, name):
    source = _random_model(name, num_classes=7)
    torch.save({"format": "attrimeter-target", "state_dict": source.state_dict()}, tmp_path / "target.pt")
    target = create_model(name, num_classes=3, **SMALL).eval()
    report = load_backbone_weights(target, tmp_path / "target.pt")
    assert report.style == "attrimeter"
    assert {k.split(".")[0] for k in report.dropped} == {"pixel_mean", "pixel_std", "pool", "neck", "classifier"}
    _assert_same_features(source, target)


def test_create_model_pretrained_and_old_files_without_bn_counters(tmp_path):
    source = _random_model("resnet34")
    state = {k: v for k, v in source.backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet34-old.pth")
    target = create_model("resnet34", pretrained=str(tmp_path / "resnet34-old.pth"), **SMALL).eval()
    _assert_same_features(source, target)


def test_half_precision_file_loads(tmp_path):
    source = _random_model("resnet18")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in source.backbone.state_dict().items()},
               tmp_path / "half.pth")
    target = create_model("resnet18", pretrained=tmp_path / "half.pth", **SMALL)
    assert target.backbone.conv1.weight.dtype == torch.float32
    torch.testing.assert_close(target.backbone.conv1.weight, source.backbone.conv1.weight.half().float())


def test_wrong_width_names_the_mismatched_shapes(tmp_path):
    _write("torchvision", _random_model("resnet18", width=0.5), tmp_path / "wide.pth")
    target = create_model("resnet18", **SMALL)
    before = target.backbone.conv1.weight.clone()
    with pytest.raises(ValueError, match=r"shape mismatches \(conv1\.weight: file \[32, 3, 7, 7\] vs model "
                                         r"\[16, 3, 7, 7\].*width") as info:
        load_backbone_weights(target, tmp_path / "wide.pth")
    assert "wide.pth" in str(info.value) and "resnet18" in str(info.value)
    assert torch.equal(target.backbone.conv1.weight, before)  # nothing was half-loaded


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _random_model("resnet18").backbone.state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"backbone keys missing from the file \(layer4\.0\.conv1\.weight"):
        load_backbone_weights(create_model("resnet18", **SMALL), tmp_path / "missing.pth")
    torch.save({**state, "layer5.0.conv1.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"1 unexpected keys \(layer5\.0\.conv1\.weight\)"):
        load_backbone_weights(create_model("resnet18", **SMALL), tmp_path / "extra.pth")
    # a different depth: ResNet-18 weights into a ResNet-34
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"missing.*layer1\.2\."):
        load_backbone_weights(create_model("resnet34", **SMALL), tmp_path / "r18.pth")


def test_wrong_explicit_style_reports_the_detected_one(tmp_path):
    _write("fast-reid", _random_model("resnet18"), tmp_path / "model_final.pth")
    with pytest.raises(ValueError, match="torchvision-style.*unexpected keys.*look like the fast-reid style"):
        load_backbone_weights(create_model("resnet18", **SMALL), tmp_path / "model_final.pth", style="torchvision")
    with pytest.raises(ValueError, match="unknown weights style 'caffe'"):
        load_backbone_weights(create_model("resnet18", **SMALL), tmp_path / "model_final.pth", style="caffe")


def test_bad_files_are_reported(tmp_path):
    model = create_model("resnet18", **SMALL)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_backbone_weights(model, tmp_path / "nowhere.pth")
    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng().bytes(256))
    with pytest.raises(ValueError, match="cannot read weights file .*garbage.pth"):
        read_state_dict(tmp_path / "garbage.pth")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="no state dict in .*no_weights.pth.*epoch"):
        read_state_dict(tmp_path / "no_weights.pth")
    (tmp_path / "broken.safetensors").write_bytes(struct.pack("<Q", 50) + b"{not json")
    with pytest.raises(ValueError, match="cannot read safetensors file .*broken.safetensors"):
        read_state_dict(tmp_path / "broken.safetensors")
    state = _random_model("resnet18").backbone.state_dict()
    state["layer2.1.bn2.weight"][3] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="'layer2.1.bn2.weight' holds NaN"):
        load_backbone_weights(model, tmp_path / "nan.pth")
    with pytest.raises(TypeError, match="ReIDModel or a Backbone"):
        load_backbone_weights(torch.nn.Linear(2, 2), tmp_path / "nan.pth")
