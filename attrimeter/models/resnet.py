"""ResNet-18/34/50 backbones with last-stride 1, under torchvision's parameter names.

The modules are named exactly as in torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
...), which are also the names timm, torchreid and fast-reid (under ``backbone.``) use, so their ResNet state dicts
load by a plain key mapping (:mod:`attrimeter.models.weights`). The stride of a Bottleneck sits on its 3x3 conv
("ResNet v1.5"), as in all four codebases. ``last_stride`` applies to the first block of ``layer4`` ("Bag of
Tricks": a 256x128 crop gives a 16x8 feature map instead of 8x4). The stem's max pooling differs between them:
torchvision pads by one pixel, fast-reid's ResNet pools unpadded with ``ceil_mode`` (same output size, windows one
pixel apart), so a fast-reid model is reproduced only with ``stem_pool="fast-reid"``.
"""

from torch import Tensor, nn

from attrimeter.models.backbone import Backbone, check_width_and_stride, make_divisible
from attrimeter.models.registry import register_model
from attrimeter.models.reid import ReIDModel

STEM_POOLS = ("torchvision", "fast-reid")
"""Max pooling of the stem: torchvision's ``MaxPool2d(3, 2, padding=1)`` or fast-reid's ``MaxPool2d(3, 2,
ceil_mode=True)``."""


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution.
        downsample: Projection of the shortcut when the shape changes.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), with an identity (or projection) shortcut.

    Args:
        inplanes: Input channels.
        planes: Bottleneck channels (the output has ``4 * planes``).
        stride: Stride of the 3x3 convolution.
        downsample: Projection of the shortcut when the shape changes.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class _Stem(nn.Module):
    """The ``stem`` stage: a view over the ResNet's top-level ``conv1, bn1, relu, maxpool`` (not registered there)."""

    def __init__(self, conv1: nn.Module, bn1: nn.Module, relu: nn.Module, maxpool: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = relu
        self.maxpool = maxpool

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class ResNet(Backbone):
    """ResNet feature extractor (no pooling, no classifier) with stages ``stem, layer1..layer4``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: Number of blocks in each of the four layers.
        width: Channel multiplier; 1.0 gives the standard widths (64, 128, 256, 512 per layer, times the block
            expansion), smaller values give proportionally thinner networks (rounded to multiples of 8).
        last_stride: Stride of ``layer4`` (1 keeps the 16x8 map of a 256x128 crop; 2 is the ImageNet network).
        stem_pool: One of :data:`STEM_POOLS`.

    Raises:
        ValueError: If ``width``, ``last_stride`` or ``stem_pool`` is out of range.
    """

    family = "resnet"

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int], *,
                 width: float = 1.0, last_stride: int = 1, stem_pool: str = "torchvision") -> None:
        check_width_and_stride(width, last_stride)
        if stem_pool not in STEM_POOLS:
            raise ValueError(f"stem_pool must be one of {STEM_POOLS}, got {stem_pool!r}")
        super().__init__()
        planes = [make_divisible(c * width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool == "torchvision" else nn.MaxPool2d(3, 2, ceil_mode=True)
        inplanes = planes[0]
        strides = (1, 2, 2, last_stride)
        for i, (p, n, s) in enumerate(zip(planes, layers, strides, strict=True)):
            downsample = None
            if s != 1 or inplanes != p * block.expansion:
                downsample = nn.Sequential(nn.Conv2d(inplanes, p * block.expansion, 1, s, bias=False),
                                           nn.BatchNorm2d(p * block.expansion))
            blocks = [block(inplanes, p, s, downsample)]
            inplanes = p * block.expansion
            blocks += [block(inplanes, p) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self._init_weights()
        self._set_stages(
            {"stem": _Stem(self.conv1, self.bn1, self.relu, self.maxpool), "layer1": self.layer1,
             "layer2": self.layer2, "layer3": self.layer3, "layer4": self.layer4},
            channels={"stem": planes[0], **{f"layer{i + 1}": p * block.expansion for i, p in enumerate(planes)}},
            reductions={"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16 * last_stride},
        )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def _resnet_model(arch: str, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int],
                  num_classes: int, last_stride: int, width: float, gem_p: float, stem_pool: str) -> ReIDModel:
    backbone = ResNet(block, layers, width=width, last_stride=last_stride, stem_pool=stem_pool)
    config = {"arch": arch, "num_classes": num_classes, "last_stride": last_stride, "width": float(width),
              "gem_p": float(gem_p), "stem_pool": stem_pool}
    return ReIDModel(backbone, num_classes=num_classes, gem_p=gem_p, config=config)


@register_model
def resnet18(*, num_classes: int = 0, last_stride: int = 1, width: float = 1.0, gem_p: float = 3.0,
             stem_pool: str = "torchvision") -> ReIDModel:
    """ResNet-18 target (BasicBlock, 2-2-2-2; C = 512 at width 1).

    Args:
        num_classes: Training identities (0: no classifier).
        last_stride: Stride of ``layer4`` (1 or 2).
        width: Channel multiplier (1.0 = standard widths, loadable from standard state dicts).
        gem_p: Initial GeM exponent.
        stem_pool: ``"torchvision"`` or ``"fast-reid"`` (see :data:`STEM_POOLS`).

    Returns:
        The model.
    """
    return _resnet_model("resnet18", BasicBlock, (2, 2, 2, 2), num_classes, last_stride, width, gem_p, stem_pool)


@register_model
def resnet34(*, num_classes: int = 0, last_stride: int = 1, width: float = 1.0, gem_p: float = 3.0,
             stem_pool: str = "torchvision") -> ReIDModel:
    """ResNet-34 target (BasicBlock, 3-4-6-3; C = 512 at width 1).

    Args:
        num_classes: Training identities (0: no classifier).
        last_stride: Stride of ``layer4`` (1 or 2).
        width: Channel multiplier (1.0 = standard widths, loadable from standard state dicts).
        gem_p: Initial GeM exponent.
        stem_pool: ``"torchvision"`` or ``"fast-reid"`` (see :data:`STEM_POOLS`).

    Returns:
        The model.
    """
    return _resnet_model("resnet34", BasicBlock, (3, 4, 6, 3), num_classes, last_stride, width, gem_p, stem_pool)


@register_model
def resnet50(*, num_classes: int = 0, last_stride: int = 1, width: float = 1.0, gem_p: float = 3.0,
             stem_pool: str = "torchvision") -> ReIDModel:
    """ResNet-50 target (Bottleneck, 3-4-6-3; C = 2048 at width 1), the authors' target.

    Args:
        num_classes: Training identities (0: no classifier).
        last_stride: Stride of ``layer4`` (1 or 2).
        width: Channel multiplier (1.0 = standard widths, loadable from standard state dicts).
        gem_p: Initial GeM exponent.
        stem_pool: ``"torchvision"`` or ``"fast-reid"`` (see :data:`STEM_POOLS`).

    Returns:
        The model.
    """
    return _resnet_model("resnet50", Bottleneck, (3, 4, 6, 3), num_classes, last_stride, width, gem_p, stem_pool)
