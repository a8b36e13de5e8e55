"""Common base of the target backbones: named stages applied in sequence, timm-style ``feature_info``.

Every registered backbone exposes the same five stage names, ``stem, layer1, layer2, layer3, layer4`` (output strides
4 or 2, 4, 8, 16, and 16 or 32 depending on ``last_stride``), so grafting code can split ANY target with the same
names: e.g. share ``stem..layer2`` and deep-copy ``layer3, layer4``.
"""

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

STAGE_NAMES: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (never below it, never more than 10% under ``value``).

    This is the rounding of the MobileNet papers and torchvision, so width multipliers give the standard widths.

    Args:
        value: The unrounded channel count.
        divisor: The multiple to round to.

    Returns:
        The rounded channel count.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def check_width_and_stride(width: float, last_stride: int) -> None:
    """Validate the two architecture options every backbone takes.

    Args:
        width: Channel multiplier (> 0, finite).
        last_stride: Stride of the last down-sampling stage (1 or 2).

    Raises:
        ValueError: If either is out of range.
    """
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a finite number > 0, got {width!r}")
    if isinstance(last_stride, bool) or last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")


class Backbone(nn.Module):
    """A feature extractor made of named stages applied in sequence.

    Subclasses call :meth:`_set_stages` at the end of ``__init__``. The stage mapping is kept outside the module
    tree on purpose: a stage may be a view over modules registered under other names (the ResNet stem is
    ``conv1, bn1, relu, maxpool``, registered at the top level so that torchvision key names hold), and registering
    it twice would duplicate its tensors in the state dict.

    Attributes:
        family: Weight-layout family (``"resnet"`` or ``"mobilenetv2"``), used by the state-dict loaders.
        feature_info: One dict per stage: ``name``, ``num_chs`` (output channels) and ``reduction`` (output stride).
        num_features: Channels C of the final feature map.
    """

    family: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._stage_map: dict[str, nn.Module] = {}
        self.feature_info: list[dict[str, Any]] = []
        self.num_features = 0

    def _set_stages(self, stages: Mapping[str, nn.Module], channels: Mapping[str, int],
                    reductions: Mapping[str, int]) -> None:
        if tuple(stages) != STAGE_NAMES:
            raise ValueError(f"a backbone must define the stages {STAGE_NAMES}, got {tuple(stages)}")
        self._stage_map = dict(stages)
        self.feature_info = [{"name": n, "num_chs": int(channels[n]), "reduction": int(reductions[n])}
                             for n in STAGE_NAMES]
        self.num_features = int(channels[STAGE_NAMES[-1]])

    @property
    def stages(self) -> Mapping[str, nn.Module]:
        """Read-only ordered mapping stage name -> module; the feature map is ``stage_n(...stage_1(x))``."""
        return MappingProxyType(self._stage_map)

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stage names in application order."""
        return tuple(self._stage_map)

    def forward(self, x: Tensor) -> Tensor:
        """Apply all stages in order.

        Args:
            x: Normalised images ``[B, 3, H, W]``.

        Returns:
            The final feature map ``[B, C, h, w]`` (post-activation, >= 0).
        """
        for stage in self._stage_map.values():
            x = stage(x)
        return x
