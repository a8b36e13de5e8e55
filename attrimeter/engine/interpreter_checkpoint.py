"""The interpreter checkpoint: one self-contained ``interpreter.pt`` holding the target and the grafted interpreter.

The file carries the target's own checkpoint payload, so export and the explainer need nothing else
(docs/architecture.md §5, §8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attrimeter import __version__
from attrimeter.engine.runs import read_checkpoint, write_checkpoint
from attrimeter.engine.target import TargetCheckpoint, target_from_payload, target_payload
from attrimeter.models.interpreter import AttriMeter

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "InterpreterCheckpoint", "load_interpreter", "save_interpreter"]

CHECKPOINT_FORMAT = "attrimeter-interpreter"
CHECKPOINT_VERSION = 1


@dataclass
class InterpreterCheckpoint:
    """A loaded interpreter: the grafted model (eval mode, target included) and its self-description."""

    model: AttriMeter
    meta: dict[str, Any]

    @property
    def image_size(self) -> tuple[int, int]:
        """Input ``(height, width)``."""
        h, w = self.meta["image_size"]
        return int(h), int(w)

    @property
    def attribute_names(self) -> list[str]:
        """The attribute of each map, in order."""
        return list(self.meta["attributes"])


def save_interpreter(model: AttriMeter, target: TargetCheckpoint, path: str | Path, meta: dict[str, Any]) -> None:
    """Write a self-contained interpreter checkpoint: the target's checkpoint payload plus the interpreter.

    Args:
        model: The trained interpreter.
        target: The target it is grafted on.
        path: Output ``.pt`` (written atomically).
        meta: Extra description (must hold ``image_size``, ``schema`` and ``attributes``).
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "attrimeter": __version__,
        "interpreter_config": model.config(),
        **meta,
        "target": target_payload(target.model, target.meta),
        "state_dict": model.state_dict(),
    }
    write_checkpoint(payload, path)


def load_interpreter(path: str | Path, map_location: str | torch.device = "cpu") -> InterpreterCheckpoint:
    """Load an interpreter checkpoint written by :func:`save_interpreter` (target included).

    Args:
        path: The ``.pt`` file.
        map_location: Device to load onto.

    Returns:
        The grafted model in eval mode with its metadata.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not an interpreter checkpoint of a known version or its weights do not fit.
    """
    payload = read_checkpoint(path, "interpreter checkpoint", map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = " (this is a target checkpoint; train an interpreter on it first)" if isinstance(payload, dict) and \
            payload.get("format") == "attrimeter-target" else ""
        raise ValueError(f"{path} is not an AttriMeter interpreter checkpoint{hint}")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported interpreter checkpoint version {payload.get('version')!r}")
    try:
        target = target_from_payload(payload["target"], f"{path} (its target)")
        model = AttriMeter(target.model, **payload["interpreter_config"])
        model.load_state_dict(payload["state_dict"])
        if len(payload["attributes"]) != model.num_attributes or len(payload["image_size"]) != 2:
            raise ValueError(f"{len(payload['attributes'])} attribute names for {model.num_attributes} maps")
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: incomplete or inconsistent interpreter checkpoint: {e}") from None
    model.to(map_location).eval()  # load_state_dict copies into the freshly built (CPU) model
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "target")}
    meta["target_meta"] = target.meta
    return InterpreterCheckpoint(model=model, meta=meta)
