"""MobileNetV2 backbone, the light non-ResNet family, grouped into the stages ``stem, layer1..layer4``.

The blocks are built exactly as torchvision's ``mobilenet_v2`` (same widths, the same ``conv`` sub-module layout
inside each inverted residual), and torchvision's flat ``features.0 .. features.18`` are grouped by output stride:

=========  ==================  ======================  =========
stage      torchvision blocks  channels (width 1)      reduction
=========  ==================  ======================  =========
stem       features.0-1        16                      2
layer1     features.2-3        24                      4
layer2     features.4-6        32                      8
layer3     features.7-13       96                      16
layer4     features.14-18      1280 (1x1 conv, ReLU6)  16 or 32
=========  ==================  ======================  =========

so a torchvision state dict loads by renumbering (:data:`TORCHVISION_SPANS`). ``last_stride`` applies to
``features.14``, the last stride-2 block. The final feature map is post-ReLU6, hence >= 0.
"""

from torch import Tensor, nn

from attrimeter.models.backbone import Backbone, check_width_and_stride, make_divisible
from attrimeter.models.registry import register_model
from attrimeter.models.reid import ReIDModel

# (stage, first torchvision ``features`` index, end index): the stage holds features[start:end], renumbered from 0.
TORCHVISION_SPANS: tuple[tuple[str, int, int], ...] = (
    ("stem", 0, 2), ("layer1", 2, 4), ("layer2", 4, 7), ("layer3", 7, 14), ("layer4", 14, 19),
)

# t (expansion), c (output channels at width 1), n (blocks), s (stride of the first block): the paper's table.
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_LAST_STRIDE_BLOCK = 14  # features index of the first 160-channel block


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    # Sequential(conv, bn, act) gives torchvision's Conv2dNormActivation key names (.0 conv, .1 bn).
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), residual when the shape is kept.

    Args:
        inp: Input channels.
        oup: Output channels.
        stride: Stride of the depthwise convolution.
        expand_ratio: Hidden channels = ``round(inp * expand_ratio)``; 1 skips the expansion.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == oup
        layers: list[nn.Module] = [] if expand_ratio == 1 else [_conv_bn_relu6(inp, hidden, kernel=1)]
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(Backbone):
    """MobileNetV2 feature extractor (no pooling, no classifier) with stages ``stem, layer1..layer4``.

    Args:
        width: Width multiplier as in the paper and torchvision (channels rounded to multiples of 8; the final 1x1
            convolution keeps 1280 channels for widths <= 1).
        last_stride: Stride of the last down-sampling block (1: a 256x128 crop gives a 16x8 map).

    Raises:
        ValueError: If ``width`` or ``last_stride`` is out of range.
    """

    family = "mobilenetv2"

    def __init__(self, *, width: float = 1.0, last_stride: int = 1) -> None:
        check_width_and_stride(width, last_stride)
        super().__init__()
        channels = make_divisible(32 * width)
        last_channels = make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [_conv_bn_relu6(3, channels, stride=2)]
        feature_chs = [channels]  # output channels of each torchvision ``features`` entry
        for t, c, n, s in _SETTING:
            out = make_divisible(c * width)
            for i in range(n):
                stride = s if i == 0 else 1
                if len(features) == _LAST_STRIDE_BLOCK:
                    stride = last_stride
                features.append(InvertedResidual(channels, out, stride, t))
                feature_chs.append(out)
                channels = out
        features.append(_conv_bn_relu6(channels, last_channels, kernel=1))
        feature_chs.append(last_channels)
        for name, start, end in TORCHVISION_SPANS:
            setattr(self, name, nn.Sequential(*features[start:end]))
        self._init_weights()
        self._set_stages(
            {name: getattr(self, name) for name, _, _ in TORCHVISION_SPANS},
            channels={name: feature_chs[end - 1] for name, _, end in TORCHVISION_SPANS},
            reductions={"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16 * last_stride},
        )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


@register_model
def mobilenetv2(*, num_classes: int = 0, last_stride: int = 1, width: float = 1.0, gem_p: float = 3.0) -> ReIDModel:
    """MobileNetV2 target (C = 1280 for widths <= 1).

    Args:
        num_classes: Training identities (0: no classifier).
        last_stride: Stride of the last down-sampling block (1 or 2).
        width: Width multiplier (1.0 = standard widths, loadable from torchvision's state dict).
        gem_p: Initial GeM exponent.

    Returns:
        The model.
    """
    backbone = MobileNetV2(width=width, last_stride=last_stride)
    config = {"arch": "mobilenetv2", "num_classes": num_classes, "last_stride": last_stride, "width": float(width),
              "gem_p": float(gem_p)}
    return ReIDModel(backbone, num_classes=num_classes, gem_p=gem_p, config=config)
