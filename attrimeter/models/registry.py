"""timm-style model registry: ``@register_model`` factories, ``create_model(name, **kwargs)``, ``list_models()``.

This module does not import torch; the built-in architectures are imported on first use of :func:`create_model` or
:func:`list_models`.
"""

import fnmatch
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from attrimeter.models.reid import ReIDModel

F = TypeVar("F", bound=Callable[..., Any])

_MODELS: dict[str, Callable[..., "ReIDModel"]] = {}
_BUILTIN_MODULES = ("attrimeter.models.resnet", "attrimeter.models.mobilenetv2")


def register_model(fn: F) -> F:
    """Register a model factory under its function name (decorator).

    The factory takes keyword-only options (at least ``num_classes``) and returns a
    :class:`~attrimeter.models.reid.ReIDModel` whose ``config`` rebuilds it.

    Args:
        fn: The factory.

    Returns:
        ``fn`` unchanged.

    Raises:
        ValueError: If a model of that name is already registered.
    """
    name = fn.__name__
    if name in _MODELS:
        owner = _MODELS[name].__module__
        raise ValueError(f"model {name!r} is already registered (by {owner}); choose another function name")
    _MODELS[name] = fn
    return fn


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a glob pattern, sorted.

    Args:
        pattern: ``fnmatch`` pattern (case-sensitive), e.g. ``"resnet*"``.

    Returns:
        The matching names.
    """
    _import_builtins()
    return sorted(name for name in _MODELS if fnmatch.fnmatchcase(name, pattern))


def create_model(name: str, *, num_classes: int = 0, pretrained: str | Path | None = None,
                 **kwargs: Any) -> "ReIDModel":
    """Build a registered model, optionally initialising its backbone from a local state-dict file.

    Args:
        name: A name from :func:`list_models`.
        num_classes: Training identities for the classifier (0: no classifier).
        pretrained: Local weights file for the backbone (torchvision / timm / fast-reid / torchreid / AttriMeter
            layout, detected automatically); nothing is ever downloaded.
        **kwargs: Architecture options of the factory, e.g. ``last_stride``, ``width``, ``gem_p``.

    Returns:
        The model, in training mode.

    Raises:
        KeyError: If ``name`` is not registered (the message lists the registered names).
        TypeError: If ``pretrained`` is ``True`` (a download) or an option is unknown to the factory.
        ValueError: If an option is out of range or the weights do not fit (see
            :func:`~attrimeter.models.weights.load_backbone_weights`).
        FileNotFoundError: If the weights file does not exist.
    """
    _import_builtins()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_MODELS))}")
    if isinstance(pretrained, bool):
        if pretrained:
            raise TypeError("pretrained must be a local weights file (AttriMeter never downloads weights), got True")
        pretrained = None
    model = _MODELS[name](num_classes=num_classes, **kwargs)
    if pretrained is not None:
        from attrimeter.models.weights import load_backbone_weights

        load_backbone_weights(model, pretrained)
    return model
