"""Load backbone weights from local state-dict files written by other ReID / vision codebases.

Supported layouts (``style``):

- ``torchvision``: ResNet keys ``conv1.weight``, ``layer1.0.conv1.weight``, ..., head ``fc.*``; MobileNetV2 keys
  ``features.<i>.*`` (renumbered into our stages), head ``classifier.*``.
- ``timm``: ResNet keys are torchvision's (head ``fc.*``); ``.safetensors`` files are read too.
- ``torchreid`` (deep-person-reid): torchvision's ResNet keys, heads ``fc.<i>.*`` (embedding MLP) and
  ``classifier.*``; checkpoints wrap them as ``{"state_dict": ..., "epoch": ...}``, often with ``module.`` prefixes.
- ``fast-reid``: ResNet keys under ``backbone.``, heads under ``heads.``; checkpoints wrap them as
  ``{"model": ...}``.
- ``attrimeter``: our own :class:`~attrimeter.models.reid.ReIDModel` state dicts (``backbone.``, ``pool.``,
  ``neck.``, ``classifier.``), e.g. a trained target re-used for another identity set.

``auto`` detects the style from the keys (torchvision and timm ResNets are indistinguishable and load the same way;
auto reports ``torchvision``). Heads and normalisation buffers in the file are dropped: only the backbone is loaded.
Missing ``num_batches_tracked`` counters (old torchvision files) are tolerated; any other missing, unexpected or
mis-shaped key is an error that lists them.
"""

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attrimeter.models.backbone import Backbone
from attrimeter.models.mobilenetv2 import TORCHVISION_SPANS
from attrimeter.models.reid import ReIDModel

STYLES: tuple[str, ...] = ("torchvision", "timm", "fast-reid", "torchreid", "attrimeter")

_log = logging.getLogger(__name__)

# (backbone family, style) -> key prefixes of heads to drop; a missing pair is a layout that family does not have.
_HEAD_PREFIXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("resnet", "torchvision"): ("fc.",),
    ("resnet", "timm"): ("fc.",),
    ("resnet", "torchreid"): ("fc.", "classifier."),
    ("resnet", "fast-reid"): ("heads.",),
    ("resnet", "attrimeter"): ("pool.", "neck.", "classifier."),
    ("mobilenetv2", "torchvision"): ("classifier.",),
    ("mobilenetv2", "attrimeter"): ("pool.", "neck.", "classifier."),
}
# Normalisation buffers (fast-reid's are on a 0-255 scale): never applied to the backbone.
_NORMALISATION_KEYS = ("pixel_mean", "pixel_std")
_WRAPPER_KEYS = ("state_dict", "model")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_SHOWN = 5  # keys quoted per kind of problem in error messages


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_backbone_weights` did.

    Attributes:
        path: The weights file.
        style: The layout used (the detected one when ``style="auto"``).
        loaded: Backbone keys set from the file.
        dropped: File keys ignored (classifier / embedding heads, normalisation buffers).
    """

    path: Path
    style: str
    loaded: tuple[str, ...]
    dropped: tuple[str, ...]

    def __str__(self) -> str:
        return (f"{self.path}: loaded {len(self.loaded)} backbone tensors ({self.style} layout), "
                f"dropped {len(self.dropped)} head/normalisation tensors")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    # The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} and
    # the raw little-endian data; reading it needs no extra package.
    data = path.read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        base = 8 + size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            shape = [int(s) for s in info["shape"]]
            flat = torch.frombuffer(bytearray(data[base + start:base + end]), dtype=dtype) if end > start else (
                torch.empty(0, dtype=dtype))
            tensors[name] = flat.reshape(shape)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"cannot read safetensors file {path}: {e}") from None
    return tensors


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a ``.pt``/``.pth``/``.bin``/``.safetensors`` file, unwrapping training checkpoints.

    Checkpoints that hold the state dict under ``"state_dict"`` (torchreid, timm, AttriMeter) or ``"model"``
    (fast-reid) are unwrapped. Files are read with ``torch.load(weights_only=True)``: no code is unpickled.

    Args:
        path: The file.

    Returns:
        Key -> tensor, on the CPU.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be read or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many unrelated types for corrupt or pickled-object files
        raise ValueError(f"cannot read weights file {path} (a state dict saved with torch.save is expected; a "
                         f"checkpoint holding pickled objects must be re-saved as a plain state dict): {e}") from None
    for _ in range(len(_WRAPPER_KEYS) + 1):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        wrapped = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)),
                       None)
        if wrapped is None:
            break
        obj = wrapped
    found = f"keys {sorted(map(str, obj))[:10]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise ValueError(f"no state dict in {path}: expected a mapping of tensors, possibly under "
                     f"{' or '.join(map(repr, _WRAPPER_KEYS))}; found {found}")


def detect_style(state_dict: Mapping[str, Tensor], family: str = "resnet") -> str:
    """Guess the layout of a state dict from its keys.

    Args:
        state_dict: Key -> tensor.
        family: Backbone family the weights are for (``"resnet"`` or ``"mobilenetv2"``).

    Returns:
        One of :data:`STYLES` (never ``"timm"``: its ResNet keys are torchvision's).
    """
    keys = [k.removeprefix("module.") for k in state_dict]

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("backbone."):
        return "attrimeter" if has("neck.") or "pool.p" in keys else "fast-reid"
    if has("heads."):
        return "fast-reid"
    if family == "mobilenetv2":
        return "torchvision" if has("features.") else "attrimeter"
    if has("classifier.") or any(re.match(r"fc\.\d+\.", k) for k in keys):
        return "torchreid"
    return "torchvision"


def _rename_torchvision_mobilenet(key: str) -> str:
    match = re.fullmatch(r"features\.(\d+)\.(.+)", key)
    if match is None:
        return key
    index = int(match.group(1))
    for stage, start, end in TORCHVISION_SPANS:
        if start <= index < end:
            return f"{stage}.{index - start}.{match.group(2)}"
    return key


def _convert(state_dict: Mapping[str, Tensor], family: str, style: str) -> tuple[dict[str, Tensor], list[str]]:
    heads = _HEAD_PREFIXES.get((family, style))
    if heads is None:
        supported = [s for f, s in _HEAD_PREFIXES if f == family]
        raise ValueError(f"there is no {style}-style layout for {family} backbones; supported styles: {supported}")
    mapped: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        k = key.removeprefix("module.")
        if style in ("fast-reid", "attrimeter"):
            k = k.removeprefix("backbone.")
        if k in _NORMALISATION_KEYS or k.startswith(heads):
            dropped.append(key)
            continue
        if family == "mobilenetv2" and style == "torchvision":
            k = _rename_torchvision_mobilenet(k)
        if k in mapped:
            raise ValueError(f"two keys of the file map to the backbone key {k!r} (one of them is {key!r})")
        mapped[k] = value
    return mapped, dropped


def _some(items: list[str]) -> str:
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def load_backbone_weights(model: ReIDModel | Backbone, path: str | Path, style: str = "auto") -> LoadReport:
    """Load a local state-dict file into the backbone of a model (heads in the file are dropped).

    Args:
        model: A :class:`~attrimeter.models.reid.ReIDModel` (its backbone is loaded) or a bare backbone.
        path: The weights file (see :func:`read_state_dict` for the accepted containers).
        style: ``"auto"`` or one of :data:`STYLES`.

    Returns:
        What was loaded and dropped.

    Raises:
        FileNotFoundError: If the file does not exist.
        TypeError: If ``model`` is neither a ReIDModel nor a Backbone.
        ValueError: On an unknown style, an unreadable file, non-finite values, or keys that do not fit the
            backbone (the message lists some missing / unexpected / mis-shaped keys and the detected style).
    """
    if style != "auto" and style not in STYLES:
        raise ValueError(f"unknown weights style {style!r}; choose 'auto' or one of {STYLES}")
    if isinstance(model, ReIDModel):
        backbone, described = model.backbone, f"{model.config['arch']} {model.config}"
    elif isinstance(model, Backbone):
        backbone, described = model, type(model).__name__
    else:
        raise TypeError(f"expected a ReIDModel or a Backbone, got {type(model).__name__}")
    path = Path(path)
    state_dict = read_state_dict(path)
    detected = detect_style(state_dict, backbone.family)
    used = detected if style == "auto" else style
    mapped, dropped = _convert(state_dict, backbone.family, used)

    expected = backbone.state_dict()
    missing = [k for k in expected if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in mapped if k not in expected]
    mis_shaped = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
                  for k, v in mapped.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} backbone keys missing from the file ({_some(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
        if mis_shaped:
            problems.append(f"{len(mis_shaped)} shape mismatches ({_some(mis_shaped)}; a different depth or width?)")
        raise ValueError(f"{path}: cannot load {used}-style weights into {described}: {'; '.join(problems)}. "
                         f"The file's keys look like the {detected} style.")
    for k, v in mapped.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{path}: tensor {k!r} holds NaN or infinite values")
    backbone.load_state_dict(mapped, strict=False)  # strict would refuse the tolerated num_batches_tracked gaps
    report = LoadReport(path=path, style=used, loaded=tuple(mapped), dropped=tuple(dropped))
    _log.info("%s", report)
    return report
