"""The grafted interpreter (docs/architecture.md §3): AttriMeter on top of a frozen target ReID model.

The target's early stages are shared and frozen; its late stages are deep-copied as the trainable interpreter branch,
followed by the attribute decomposition head (conv3×3 C→256, ReLU, conv1×1 256→M, no biases) whose logits Z become
attention maps ``A_k = qexp(Z_k)``. The maps mask the *target's own* feature map F: ``f_k = BN(GeM(F ⊙ A_k))`` with
the target's frozen GeM exponent and folded BN-neck, computed in the factorised form of
:func:`attrimeter.kernels.masked_gem_pool.masked_gem_pool_reference` (the same function the exporter uses), whose row
A ≡ 1 is the target's embedding f. So every d_k measures the target's features, and the interpreter only decides
where (and how strongly) each attribute looks.

Attribute classifier: ``"probe"`` (the original default) is a linear probe per attribute on f_k; ``"map"`` reads each
attribute from its own map, as the smooth maximum of its logits plus a bias, so the maps must switch on where and when
the attribute is present. Because a map's magnitude sets its d_k (a 1 % change moves d_k by ~1 % of ‖s ⊙ GeM(F)‖, which
is several times a typical distance), ``"map"`` gives sharper shares; the profiles use it
(``benchmarks/results/interpreter_quick_cpu.md``).

The last 1×1 convolution starts at zero, so every map starts at ``A_k = qexp(0) = 1`` and every ``f_k`` equals the
target's embedding: the decomposed distance starts equal to the target distance, and training moves away from that
point only as far as the losses ask.

No hooks are used: the stages are called directly, so nothing is left attached to the target.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from attrimeter.kernels.masked_gem_pool import masked_gem_pool_reference, qexp

__all__ = ["AttriMeter", "AttriMeterOutput", "target_stages"]

HEAD_CHANNELS = 256
# (F, Z, p, eps, scale, shift) -> (f, f_k): the masked GeM pooling's signature (reference or fused kernel).
PoolFn = Callable[[Tensor, Tensor, float, float, Tensor, Tensor], tuple[Tensor, Tensor]]
CLASSIFIERS = ("probe", "map")


class AttriMeterOutput(NamedTuple):
    """What the interpreter computes for a batch of images.

    Attributes:
        target: The target's own embedding f ``[B, C]`` (what the target distance d is measured on), pooled from
            the target's feature map as the mask-free row of the masked pooling.
        attributes: Per-attribute embeddings f_k ``[B, M, C]``.
        logits: Attention logits Z ``[B, M, h, w]`` (``qexp(Z)`` are the AAMs).
        attr_logits: Attribute classifier logits ``[B, M]`` (> 0 predicts label 1, i.e. code 2 of the schema).
    """

    target: Tensor
    attributes: Tensor
    logits: Tensor
    attr_logits: Tensor

    def stacked(self) -> Tensor:
        """``[B, M+1, C]``: row 0 the target embedding, rows 1..M the f_k (the layout of ``attr_distance``)."""
        return torch.cat([self.target.unsqueeze(1), self.attributes.to(self.target.dtype)], dim=1)

    def aam(self) -> Tensor:
        """The attribute-guided attention maps ``A = qexp(Z)`` ``[B, M, h, w]``."""
        return qexp(self.logits)


def target_stages(target: nn.Module) -> Mapping[str, nn.Module]:
    """The named stages of a target, in application order.

    Args:
        target: A registry model (``target.backbone.stages``) or any module with a ``stages`` mapping.

    Returns:
        The ordered mapping stage name -> module.

    Raises:
        TypeError: If the target names no stages.
    """
    for owner in (getattr(target, "backbone", None), target):
        stages = getattr(owner, "stages", None)
        if isinstance(stages, Mapping) and stages:
            return stages
    raise TypeError(
        f"{type(target).__name__} names no stages: a target must expose an ordered mapping `stages` (or "
        "`backbone.stages`) of name -> module, applied in sequence to produce the feature map"
    )


class _Stages(nn.Module):
    """Named stages applied in sequence (registered as children, so they own their parameters)."""

    def __init__(self, stages: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.body = nn.ModuleDict(stages)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.body.values():
            x = stage(x)
        return x


class AttriMeter(nn.Module):
    """An interpreter grafted onto a frozen target ReID model.

    Args:
        target: The trained target: a :class:`~attrimeter.models.reid.ReIDModel`, or any module with named stages
            (see :func:`target_stages`), ``normalize(images)`` and ``head_params() -> (p, scale, shift)``. It is
            frozen (``requires_grad=False``, eval mode) and kept by reference, not copied.
        num_attributes: M, the number of attribute maps.
        shared: The last stage shared with the target (default ``"layer2"``: the stages after it are copied).
        eps: GeM's clamp floor when the target does not say (a registry target's own ``pool.eps`` is used, so the
            mask-free row is exactly its embedding).
        classifier: ``"map"`` or ``"probe"`` (see the module docstring).

    Attributes:
        target: The frozen target.
        late: The interpreter's copy of the target's late stages (trainable).
        head: The attribute decomposition head (conv3×3 → ReLU → conv1×1).
        probe_weight, probe_bias: The attribute classifiers: biases ``[M]``, and for ``"probe"`` the weights
            ``[M, C]`` on f_k (``None`` for ``"map"``).
        shared_stages, late_stages: Stage names on each side of the split.

    Raises:
        ValueError: If ``num_attributes`` < 1 or ``shared`` is not a stage of the target (or is its last stage).
        TypeError: If the target lacks what grafting needs.
    """

    def __init__(self, target: nn.Module, num_attributes: int, shared: str = "layer2", eps: float = 1e-6,
                 classifier: str = "probe") -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        if isinstance(num_attributes, bool) or not isinstance(num_attributes, int) or num_attributes < 1:
            raise ValueError(f"num_attributes must be an int >= 1, got {num_attributes!r}")
        for name in ("normalize", "head_params"):
            if not callable(getattr(target, name, None)):
                raise TypeError(f"{type(target).__name__} has no {name}(): cannot graft an interpreter onto it")
        stages = target_stages(target)
        names = list(stages)
        if shared not in names[:-1]:
            raise ValueError(f"shared={shared!r} must name one of the target's stages before the last: {names[:-1]}")
        split = names.index(shared) + 1
        self.shared_stages: tuple[str, ...] = tuple(names[:split])
        self.late_stages: tuple[str, ...] = tuple(names[split:])
        target.eval()
        target.requires_grad_(False)
        # Kept out of the module tree: the target is a frozen reference, saved in its own checkpoint, not ours.
        self._target: tuple[nn.Module] = (target,)
        self._shared = [stages[n] for n in self.shared_stages]
        self.late = _Stages({n: copy.deepcopy(stages[n]) for n in self.late_stages})
        self.late.requires_grad_(True)
        p, scale, shift = target.head_params()
        channels = int(scale.numel())
        self.num_attributes = num_attributes
        self.num_features = channels
        self.head = nn.Sequential(
            nn.Conv2d(channels, HEAD_CHANNELS, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(HEAD_CHANNELS, num_attributes, 1, bias=False),
        )
        nn.init.kaiming_normal_(self.head[0].weight, nonlinearity="relu")
        nn.init.zeros_(self.head[2].weight)  # A_k = 1 at the start: d_hat = d (see the module docstring)
        self.classifier = classifier
        self.probe_bias = nn.Parameter(torch.zeros(num_attributes))
        self.probe_weight: nn.Parameter | None = None
        if classifier == "probe":
            self.probe_weight = nn.Parameter(torch.empty(num_attributes, channels))
            nn.init.normal_(self.probe_weight, std=0.01)
        self.p = float(p)
        self.eps = float(getattr(getattr(target, "pool", None), "eps", eps))
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("shift", shift.detach().clone().float())
        # Built on a target that already lives on a GPU: the new parts go there too.
        self.head.to(scale.device)
        self.probe_bias.data = self.probe_bias.data.to(scale.device)
        if self.probe_weight is not None:
            self.probe_weight.data = self.probe_weight.data.to(scale.device)

    @property
    def target(self) -> nn.Module:
        """The frozen target model."""
        return self._target[0]

    def train(self, mode: bool = True) -> AttriMeter:
        """Set training mode on the trainable parts; the target and every BatchNorm stay in eval mode.

        BatchNorm layers of the copied stages keep the target's running statistics: with PK batches of a few
        identities, batch statistics would move the copied features away from the target's from the first step.
        """
        super().train(mode)
        self.target.eval()
        for module in self.late.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> AttriMeter:
        # .to(device) / .half() must move the target too, since it is held outside the module tree.
        self.target._apply(fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def shared_features(self, images: Tensor) -> Tensor:
        """The frozen shared stages on images (cacheable: they never change during interpreter training).

        Args:
            images: Float RGB in [0, 1], ``[B, 3, H, W]``.

        Returns:
            The feature map after the last shared stage.
        """
        x = self.target.normalize(images)
        for stage in self._shared:
            x = stage(x)
        return x

    @torch.no_grad()
    def target_features(self, shared: Tensor) -> Tensor:
        """The target's own feature map F from the shared features (cacheable, like them).

        Args:
            shared: Output of :meth:`shared_features`.

        Returns:
            F ``[B, C, h, w]`` (post-activation, >= 0).
        """
        stages = target_stages(self.target)
        for name in self.late_stages:
            shared = stages[name](shared)
        return shared

    def from_shared(self, shared: Tensor, features: Tensor | None = None, pool: PoolFn | None = None
                    ) -> AttriMeterOutput:
        """The interpreter branch on shared features.

        Args:
            shared: Output of :meth:`shared_features` ``[B, C', h', w']``.
            features: The target's feature map of the same images if already known (e.g. cached), else computed.
            pool: The masked GeM pooling, called as ``pool(F, Z, p, eps, scale, shift)``: the pure-torch reference
                (default; differentiable everywhere) or the fused Triton kernel on a GPU.

        Returns:
            :class:`AttriMeterOutput`.
        """
        if features is None:
            features = self.target_features(shared)
        z = self.head(self.late(shared))
        # Row 0 (A = 1) of the masked pooling is the target's own embedding: GeM + folded BN-neck on F.
        f, f_k = (pool or masked_gem_pool_reference)(features, z, self.p, self.eps, self.scale, self.shift)
        return AttriMeterOutput(target=f, attributes=f_k, logits=z, attr_logits=self.classify(f_k, z))

    def classify(self, attributes: Tensor, logits: Tensor) -> Tensor:
        """The attribute classifier's logits (the exporter calls it after its own pooling).

        Args:
            attributes: f_k ``[B, M, C]``.
            logits: Attention logits Z ``[B, M, h, w]``.

        Returns:
            ``[B, M]`` logits (> 0 predicts label 1).
        """
        if self.probe_weight is not None:
            return (attributes * self.probe_weight.to(attributes.dtype)).sum(-1) + self.probe_bias.to(attributes.dtype)
        # "map": smooth maximum of the map's logits ("the attribute is somewhere"), in the map's own units.
        return (torch.logsumexp(logits.flatten(2), -1) - math.log(logits.shape[2] * logits.shape[3])
                + self.probe_bias.to(logits.dtype))

    def forward(self, images: Tensor, pool: PoolFn | None = None) -> AttriMeterOutput:
        """Explain-ready outputs for a batch of images.

        Args:
            images: Float RGB in [0, 1], ``[B, 3, H, W]``; the target's own checks apply (shape, NaN).
            pool: The masked pooling (see :meth:`from_shared`).

        Returns:
            :class:`AttriMeterOutput`.
        """
        return self.from_shared(self.shared_features(images), pool=pool)

    def config(self) -> dict[str, Any]:
        """What rebuilds this interpreter on the same target."""
        return {"num_attributes": self.num_attributes, "shared": self.shared_stages[-1], "eps": self.eps,
                "classifier": self.classifier}
