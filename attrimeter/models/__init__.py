"""Target ReID models: a timm-style registry of backbones with a GeM + BN-neck head.

The public names are re-exported lazily (importing this package does not import torch)::

    from attrimeter.models import create_model, list_models
    model = create_model("resnet50", num_classes=751, pretrained="resnet50-0676ba61.pth")

Modules: :mod:`~attrimeter.models.registry` (``register_model``, ``create_model``, ``list_models``; torch-free),
:mod:`~attrimeter.models.reid` (``ReIDModel``, ``GeM``, ``BNNeck``, ``build_model``),
:mod:`~attrimeter.models.weights` (``load_backbone_weights``), and the backbones
:mod:`~attrimeter.models.resnet` (``resnet18/34/50``) and :mod:`~attrimeter.models.mobilenetv2` (``mobilenetv2``).
"""

import importlib
from typing import Any

_EXPORTS = {
    "register_model": "registry", "create_model": "registry", "list_models": "registry",
    "ReIDModel": "reid", "GeM": "reid", "BNNeck": "reid", "build_model": "reid",
    "Backbone": "backbone",
    "LoadReport": "weights", "load_backbone_weights": "weights", "read_state_dict": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
