"""Turn a ReID model trained with fast-reid or torchreid into an AttriMeter target, unchanged (same embedding).

An interpreter explains a target's own distance, so an imported model must embed exactly as in its codebase: the
backbone, the pooling, the BN-neck (or its absence) and the input normalisation all come from the checkpoint, and
anything the target contract (backbone -> GeM -> BN-neck, docs/architecture.md §3) cannot express is refused, never
approximated.

Layouts, as the two codebases save them:

- **fast-reid** (plain ResNet configs such as ``bagtricks_R50``; ``Checkpointer.save`` writes ``{"model":
  state_dict, "optimizer": ..., "scheduler": ..., "iteration": ...}``; ``module.`` prefixes when a wrapped model was
  saved): backbone under ``backbone.`` (torchvision names; the stem max-pools unpadded with ``ceil_mode``), head under
  ``heads.``: ``heads.pool_layer.p`` for the learnable GeM (``GeneralizedMeanPoolingP``; the fixed-p
  ``GeneralizedMeanPooling`` and the average poolings have no tensor, so ``pooling`` says which was used),
  ``heads.bottleneck.0.*`` for the BN-neck (``WITH_BNNECK``; at evaluation fast-reid embeds with the BN-neck output),
  ``heads.weight`` for the classifier (dropped). ``pixel_mean`` / ``pixel_std`` (0-255 scale) are non-persistent in
  current fast-reid and read when present. Non-local, IBN and SE variants (AGW, SBS, ``*-ibn`` configs) are refused.
- **torchreid** (``save_checkpoint``: ``{"state_dict": ..., "epoch": ..., "rank1": ..., "optimizer": ...}``, keys
  ``module.``-prefixed when trained under ``nn.DataParallel``): torchvision ResNet names, global average pooling, no
  BN-neck (``resnet50`` embeds with the pooled feature), ``classifier.*`` (dropped). ``fc.*`` layers
  (``resnet50_fc512``) are refused: they map the pooled feature to another space.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attrimeter.models.registry import create_model
from attrimeter.models.reid import IMAGENET_MEAN, IMAGENET_STD, ReIDModel
from attrimeter.models.weights import detect_style, load_backbone_weights, read_state_dict

__all__ = ["IMPORT_STYLES", "POOLINGS", "import_reid_model"]

IMPORT_STYLES: tuple[str, ...] = ("fast-reid", "torchreid")
POOLINGS: tuple[str, ...] = ("auto", "avg", "gem")
# Defaults of the two codebases where the checkpoint does not tell: layer4 stride (fast-reid LAST_STRIDE: 1;
# torchreid resnet50: 2) and the stem's max pooling.
_LAST_STRIDE = {"fast-reid": 1, "torchreid": 2}
_STEM_POOL = {"fast-reid": "fast-reid", "torchreid": "torchvision"}
_FASTREID_NECK = "heads.bottleneck.0."
_FASTREID_GEM_P = "heads.pool_layer.p"
# Backbone variants of fast-reid / torchreid that the plain ResNet targets do not have: (key pattern, what it is).
_UNSUPPORTED_BLOCKS = (
    (r"(^|\.)NL_\d", "non-local blocks (fast-reid WITH_NL, e.g. the AGW and SBS configs)"),
    (r"\.IN\.", "IBN layers (fast-reid WITH_IBN, torchreid resnet50_ibn_a/b)"),
    (r"\.se\.", "squeeze-excitation blocks (fast-reid WITH_SE)"),
)
# Head keys that do not change the evaluation embedding (classifiers).
_IGNORED_HEADS = {"fast-reid": ("heads.weight", "heads.classifier."), "torchreid": ("classifier.",)}


def _neck_from(state: dict[str, Tensor], channels: int) -> dict[str, Tensor] | None:
    """fast-reid's BN-neck as our BNNeck's state, or ``None`` when the model has none."""
    neck = {k.removeprefix(_FASTREID_NECK): v for k, v in state.items() if k.startswith(_FASTREID_NECK)}
    if not neck:
        return None
    if neck.get("weight") is not None and neck["weight"].ndim != 1:
        raise ValueError("the fast-reid head has an embedding layer (EMBEDDING_DIM > 0: a 1x1 conv before the "
                         "BN-neck); AttriMeter decomposes distances in the backbone's own channels and cannot "
                         "import it")
    needed = ("weight", "bias", "running_mean", "running_var")
    missing = [k for k in needed if k not in neck]
    if missing:
        raise ValueError(f"the fast-reid BN-neck lacks {', '.join(_FASTREID_NECK + k for k in missing)}")
    if any(neck[k].shape != (channels,) for k in needed):
        raise ValueError(f"the fast-reid BN-neck has {neck['weight'].shape[0]} channels, the backbone {channels}")
    return {k: neck[k].float() for k in needed}


def _identity_neck(model: ReIDModel) -> None:
    # weight / sqrt(running_var + eps) = 1 and shift 0: the BN-neck passes the pooled feature through unchanged.
    neck = model.neck
    with torch.no_grad():
        neck.running_mean.zero_()
        neck.running_var.fill_(1.0)
        neck.weight.fill_(math.sqrt(1.0 + neck.eps))
        neck.bias.zero_()


def _normalisation(state: dict[str, Tensor]) -> tuple[list[float], list[float]]:
    if "pixel_mean" not in state or "pixel_std" not in state:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    mean, std = state["pixel_mean"].flatten().double(), state["pixel_std"].flatten().double()
    if mean.numel() != 3 or std.numel() != 3 or not bool((std > 0).all()):
        raise ValueError(f"pixel_mean / pixel_std must hold 3 values (std > 0), got {mean.tolist()} / {std.tolist()}")
    scale = 255.0 if float(mean.max()) > 1.0 else 1.0  # fast-reid normalises 0-255 pixels; ours are in [0, 1]
    return (mean / scale).tolist(), (std / scale).tolist()


def import_reid_model(
    path: str | Path,
    arch: str = "resnet50",
    style: str = "auto",
    last_stride: int | None = None,
    pooling: str = "auto",
    gem_p: float = 3.0,
) -> tuple[ReIDModel, dict[str, Any]]:
    """Build a target from a fast-reid or torchreid checkpoint, with the embedding its codebase computes.

    Args:
        path: The checkpoint (``.pth`` / ``.pt``; a training checkpoint or a bare state dict).
        arch: The registered ResNet it holds (``resnet50``, ``resnet34`` or ``resnet18``).
        style: ``"auto"`` (from the keys) or one of :data:`IMPORT_STYLES`.
        last_stride: Stride of ``layer4``; ``None``: the codebase's default (fast-reid 1, torchreid ``resnet50`` 2).
            The checkpoint cannot tell, and a wrong value changes the feature map.
        pooling: ``"auto"``: fast-reid's learnable GeM when ``heads.pool_layer.p`` is present, else average
            pooling; ``"avg"``; ``"gem"`` with the fixed ``gem_p`` (fast-reid's ``GeneralizedMeanPooling``).
        gem_p: Exponent of ``pooling="gem"``.

    Returns:
        ``(model, description)``: the model in eval mode, and what was imported (source path, style, pooling, p,
        BN-neck, last stride, stem, normalisation) for the target checkpoint's metadata.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: On an unknown style / pooling, a head the target contract cannot express (embedding layers,
            torchreid ``fc`` layers, unknown head keys), or weights that do not fit ``arch`` (the message lists the
            keys).
    """
    if style != "auto" and style not in IMPORT_STYLES:
        raise ValueError(f"unknown checkpoint style {style!r}; choose 'auto' or one of {IMPORT_STYLES}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    if not arch.startswith("resnet"):
        raise ValueError(f"only ResNet checkpoints can be imported, got arch {arch!r}")
    path = Path(path)
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    detected = detect_style(state)
    used = detected if style == "auto" else style
    if used not in IMPORT_STYLES:
        raise ValueError(f"{path}: the keys look like a {detected} state dict, not a fast-reid or torchreid ReID "
                         f"model (pass style= to override); a plain backbone is loaded with create_model(pretrained=)")

    for pattern, what in _UNSUPPORTED_BLOCKS:
        found = [k for k in state if re.search(pattern, k)]
        if found:
            raise ValueError(f"{path}: {what} ({found[0]}, ...) cannot be imported: the target backbones are plain "
                             "ResNets")
    heads = [k for k in state if k.startswith("heads." if used == "fast-reid" else ("fc.", "classifier."))]
    if used == "torchreid" and any(k.startswith("fc.") for k in heads):
        raise ValueError(f"{path}: torchreid fc layers ({', '.join(k for k in heads if k.startswith('fc.'))[:200]}, "
                         "e.g. resnet50_fc512) map the pooled feature to another space; only models that embed with "
                         "the pooled backbone feature (resnet50, resnet18, ...) can be imported")
    understood = (_FASTREID_GEM_P, _FASTREID_NECK, *_IGNORED_HEADS[used])
    unknown = [k for k in heads if not k.startswith(understood)]
    if unknown:
        raise ValueError(f"{path}: head keys AttriMeter does not know how to reproduce: {unknown[:8]}")

    if pooling == "auto":
        pooling = "gem" if _FASTREID_GEM_P in state else "avg"
    elif pooling == "avg" and _FASTREID_GEM_P in state:
        raise ValueError(f"{path}: the checkpoint pools with a learnable GeM ({_FASTREID_GEM_P}), not the average")
    p = 1.0
    if pooling == "gem":
        p = float(state[_FASTREID_GEM_P].flatten()[0]) if _FASTREID_GEM_P in state else float(gem_p)
        if not (math.isfinite(p) and p >= 1.0):
            raise ValueError(f"{path}: GeM exponent {p} is below 1 or not finite (AttriMeter's GeM needs p >= 1)")

    stride = _LAST_STRIDE[used] if last_stride is None else last_stride
    model = create_model(arch, num_classes=0, last_stride=stride, gem_p=p, stem_pool=_STEM_POOL[used])
    load_backbone_weights(model, path, used)
    neck = _neck_from(state, model.num_features) if used == "fast-reid" else None
    if neck is None:
        _identity_neck(model)
    else:
        with torch.no_grad():
            for k, v in neck.items():
                getattr(model.neck, k).copy_(v)
    mean, std = _normalisation(state)
    with torch.no_grad():
        model.pixel_mean.copy_(torch.tensor(mean).view(1, 3, 1, 1))
        model.pixel_std.copy_(torch.tensor(std).view(1, 3, 1, 1))
    model.eval()
    description = {"path": str(path.resolve()), "style": used, "arch": arch, "last_stride": stride,
                   "stem_pool": _STEM_POOL[used], "pooling": pooling, "gem_p": p,
                   "bn_neck": neck is not None, "pixel_mean": mean, "pixel_std": std}
    return model, description
