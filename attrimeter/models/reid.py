"""The target ReID model (docs/architecture.md §3): backbone -> F >= 0 -> GeM (learnable p) -> BN-neck -> embedding f.

Images enter as float RGB in [0, 1]; the ImageNet normalisation is done inside the model with ``pixel_mean`` and
``pixel_std`` buffers (fast-reid style), so exported graphs and checkpoints carry it.
"""

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from attrimeter.models.backbone import Backbone
from attrimeter.models.registry import create_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GeM(nn.Module):
    """Generalised-mean pooling ``GeM(X)_c = (mean_hw clamp(X_c,hw, eps)^p)^(1/p)`` with a learnable scalar p.

    p is clamped to >= 1 in the forward pass (p = 1 is average pooling; larger p moves towards max pooling).

    Args:
        p: Initial exponent (>= 1).
        eps: Lower clamp of the activations, keeps the root differentiable at zero.

    Raises:
        ValueError: If ``p`` is not a finite number >= 1 or ``eps`` is not > 0.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 1:
            raise ValueError(f"GeM p (option gem_p) must be a finite number >= 1, got {p!r}")
        if not eps > 0:
            raise ValueError(f"GeM eps must be > 0, got {eps!r}")
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = float(eps)

    def effective_p(self) -> Tensor:
        """The exponent used in the forward pass, ``max(p, 1)`` (0-d tensor, differentiable)."""
        return self.p.clamp(min=1.0)

    def forward(self, x: Tensor) -> Tensor:
        """Pool a feature map.

        Args:
            x: ``[B, C, H, W]``.

        Returns:
            ``[B, C]``.

        Raises:
            ValueError: If ``x`` is not 4-D.
        """
        if x.dim() != 4:
            raise ValueError(f"GeM expects a feature map [B, C, H, W], got shape {tuple(x.shape)}")
        p = self.effective_p()
        return x.clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    def extra_repr(self) -> str:
        """Show the current exponent in ``repr(model)``."""
        return f"p={self.p.item():.4f}, eps={self.eps}"


class BNNeck(nn.BatchNorm1d):
    """BN-neck of "Bag of Tricks": a ``BatchNorm1d`` whose bias is frozen at zero.

    In eval mode it is the per-channel affine map ``f = g * scale + shift`` (:meth:`folded`).

    Args:
        num_features: Channels C.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        nn.init.zeros_(self.bias)
        self.bias.requires_grad_(False)

    def folded(self) -> tuple[Tensor, Tensor]:
        """The eval-mode affine map, detached.

        Returns:
            ``(scale [C], shift [C])`` with ``scale = weight / sqrt(running_var + eps)`` and
            ``shift = bias - running_mean * scale``.
        """
        with torch.no_grad():
            scale = self.weight / torch.sqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
        return scale.detach().clone(), shift.detach().clone()


class ReIDModel(nn.Module):
    """A target ReID model: normalisation, backbone, GeM, BN-neck and an optional identity classifier.

    Build it with :func:`~attrimeter.models.registry.create_model` (or :func:`build_model` from a ``config``).

    Args:
        backbone: The feature extractor (stages ``stem, layer1..layer4``; post-activation output >= 0).
        num_classes: Training identities; 0 builds no classifier.
        gem_p: Initial GeM exponent.
        config: What rebuilds this model through the registry: ``{"arch": name, "num_classes": ..., **options}``.

    Attributes:
        backbone: The :class:`~attrimeter.models.backbone.Backbone` (``.stages``, ``.stage_names``,
            ``.feature_info``).
        pool: :class:`GeM`.
        neck: :class:`BNNeck`.
        classifier: ``nn.Linear(C, num_classes, bias=False)`` on the BN-neck output, or ``None``.
        num_features: Embedding size C.
        config: See above (plain Python values, JSON/YAML friendly).

    Raises:
        ValueError: If ``num_classes`` is negative, ``gem_p`` is out of range or ``config`` lacks ``arch``.
    """

    def __init__(self, backbone: Backbone, *, num_classes: int = 0, gem_p: float = 3.0,
                 config: Mapping[str, Any]) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if not isinstance(config.get("arch"), str):
            raise ValueError(f"config must name its architecture under 'arch', got {dict(config)!r}")
        self.backbone = backbone
        self.num_features = backbone.num_features
        self.pool = GeM(gem_p)
        self.neck = BNNeck(self.num_features)
        self.classifier: nn.Linear | None = None
        if num_classes > 0:
            self.classifier = nn.Linear(self.num_features, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.config: dict[str, Any] = dict(config)

    def normalize(self, x: Tensor) -> Tensor:
        """Check and normalise a batch of images: ``(x - pixel_mean) / pixel_std``.

        Args:
            x: Float RGB images in [0, 1], ``[B, 3, H, W]``.

        Returns:
            The normalised batch.

        Raises:
            ValueError: If ``x`` is not a 4-D float tensor with 3 channels or holds NaN/inf. Under
                ``torch.jit.trace`` no check runs (it would be frozen into the trace as a constant); under
                ``torch.compile``/``torch.export`` the finiteness check is skipped (a data-dependent branch).
        """
        tracing = torch.jit.is_tracing()
        if not tracing:
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype} (convert and divide by 255)")
        if not (tracing or torch.compiler.is_compiling()) and not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or infinite values")
        return (x - self.pixel_mean) / self.pixel_std

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalise and run the backbone.

        Args:
            x: Float RGB images in [0, 1], ``[B, 3, H, W]``.

        Returns:
            The feature map F ``[B, C, h, w]``, >= 0.
        """
        return self.backbone(self.normalize(x))

    def embed(self, feats: Tensor) -> Tensor:
        """GeM + BN-neck on a feature map.

        Args:
            feats: F ``[B, C, h, w]``.

        Returns:
            The embedding f ``[B, C]``.
        """
        return self.neck(self.pool(feats))

    def forward(self, x: Tensor) -> Tensor:
        """Embed images (the BN-neck output, in any mode; in training mode the BN-neck uses batch statistics).

        Args:
            x: Float RGB images in [0, 1], ``[B, 3, H, W]``.

        Returns:
            The embedding f ``[B, C]``.
        """
        return self.embed(self.forward_features(x))

    def forward_train(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two training outputs of "Bag of Tricks".

        Args:
            x: Float RGB images in [0, 1], ``[B, 3, H, W]``.

        Returns:
            ``(g, logits)``: the GeM feature before the BN-neck ``[B, C]`` (for the triplet loss) and the classifier
            logits on the BN-neck output ``[B, num_classes]`` (for the identity loss).

        Raises:
            RuntimeError: If the model was built with ``num_classes=0``.
        """
        if self.classifier is None:
            raise RuntimeError("this model has no classifier (built with num_classes=0); it cannot be trained")
        g = self.pool(self.forward_features(x))
        return g, self.classifier(self.neck(g))

    def head_params(self) -> tuple[float, Tensor, Tensor]:
        """The eval-mode head as numbers: ``f = GeM_p(F) * scale + shift``.

        Returns:
            ``(p, scale [C], shift [C])``: the effective GeM exponent (>= 1) and the folded BN-neck, detached.
        """
        scale, shift = self.neck.folded()
        return float(self.pool.effective_p().detach()), scale, shift


def build_model(config: Mapping[str, Any]) -> ReIDModel:
    """Rebuild a model from its ``config`` (the inverse of ``ReIDModel.config``; weights are not loaded).

    Args:
        config: ``{"arch": name, "num_classes": ..., **options}`` as stored in ``ReIDModel.config``.

    Returns:
        A freshly initialised model of the same architecture.

    Raises:
        ValueError: If ``config`` is not a mapping with a string ``arch``.
        KeyError: If the architecture is not registered.
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("arch"), str):
        raise ValueError(f"a model config must be a mapping with a string 'arch', got {config!r}")
    options = {k: v for k, v in config.items() if k != "arch"}
    return create_model(config["arch"], **options)
