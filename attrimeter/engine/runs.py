"""What every training run shares: the common config fields and checks, the learning-rate schedule, checkpoint I/O."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attrimeter.config import ConfigError

__all__ = ["RunConfig", "Schedule", "lr_factor", "read_checkpoint", "resolve_device", "write_checkpoint"]


@dataclass(frozen=True)
class RunConfig:
    """Fields and checks common to the training configs (PK batches, schedule, budget, device)."""

    p_ids: int = 16
    k_instances: int = 4
    epochs: int = 120
    max_minutes: float | None = None
    lr: float = 3.5e-4
    min_lr_factor: float = 0.01
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    flip: float = 0.5
    seed: int = 0
    threads: int = 0
    eval_batch_size: int = 128
    device: str = "auto"

    def _problems(self) -> list[str]:
        """What is wrong with the common fields (subclasses add their own and raise :class:`ConfigError`)."""
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            problems.append(f"max_minutes must be > 0 or null (no limit), got {self.max_minutes}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lr <= 0 or self.eval_batch_size < 1:
            problems.append("lr and eval_batch_size must be positive")
        if not 0.0 <= self.flip <= 1.0:
            problems.append(f"flip must be a probability, got {self.flip}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            problems.append(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        return problems

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def torch_device(self) -> torch.device:
        """The device to train on (``auto``: the first CUDA GPU if there is one, else the CPU)."""
        return resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """``auto`` (the first CUDA GPU if there is one, else the CPU), ``cpu`` or ``cuda[:N]`` as a torch device.

    Raises:
        ValueError: For another name, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not name.startswith(("cpu", "cuda")):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return torch.device(name)


def lr_factor(progress: float, warmup: float, min_factor: float) -> float:
    """The learning-rate multiplier at a point of training: linear warmup from 0.01, then cosine decay.

    Args:
        progress: Fraction of the run's iterations done, in [0, 1].
        warmup: Fraction of the run spent warming up.
        min_factor: The multiplier at the end of the run.

    Returns:
        The multiplier.
    """
    if progress < warmup:
        return 0.01 + 0.99 * progress / warmup
    t = min(1.0, (progress - warmup) / max(1e-8, 1.0 - warmup))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


class Schedule:
    """The batches of a run until its iteration budget is spent, each with its learning rate set.

    The run's length is ``epochs · batches per epoch`` iterations, so the same config trains the same number of steps
    on any machine (same seed, same result). ``max_minutes`` is only a guard: a run that reaches it stops early,
    un-annealed, with a warning, and says so in ``stopped_early``. Every optimiser group gets
    ``group["base_lr"] * lr_factor(progress)``.

    Args:
        config: The run's config (epochs, max_minutes, warmup_fraction, min_lr_factor).
        batches_per_epoch: Batches the sampler yields per pass.
        iteration: Iterations already done (a resumed run).
        elapsed: Seconds already spent (a resumed run).

    Attributes:
        iteration: Iterations done so far; the caller counts each one (``schedule.iteration += 1`` after its step).
        elapsed: Training seconds so far.
        progress: Fraction of the iterations done, in [0, 1].
        stopped_early: Why the run ended before its iterations (the time guard), else ``None``.
    """

    def __init__(self, config: RunConfig, batches_per_epoch: int, iteration: int = 0, elapsed: float = 0.0) -> None:
        self._config = config
        self.total = config.epochs * batches_per_epoch
        self._budget = config.max_minutes * 60.0 if config.max_minutes is not None else math.inf
        self.iteration = iteration
        self.elapsed = elapsed
        self.progress = iteration / self.total
        self.stopped_early: str | None = None

    def batches(self, sampler: Iterable[Any], optim: torch.optim.Optimizer) -> Iterator[Any]:
        """Yield the sampler's batches, pass after pass, until the run is done.

        Args:
            sampler: Re-iterable batch source (one pass = one epoch).
            optim: Its groups hold ``base_lr``.

        Yields:
            One batch per iteration.
        """
        start = time.perf_counter() - self.elapsed
        while True:
            for batch in sampler:
                self.elapsed = time.perf_counter() - start
                self.progress = self.iteration / self.total
                if self.progress >= 1.0:
                    return
                if self.elapsed >= self._budget:
                    self.stopped_early = (f"stopped by the max_minutes={self._config.max_minutes} guard after "
                                          f"{self.iteration} of {self.total} iterations: the model is not the "
                                          "configured one (raise max_minutes, or lower epochs)")
                    warnings.warn(self.stopped_early, RuntimeWarning, stacklevel=2)
                    return
                factor = lr_factor(self.progress, self._config.warmup_fraction, self._config.min_lr_factor)
                for group in optim.param_groups:
                    group["lr"] = group["base_lr"] * factor
                yield batch


def write_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` atomically: a crash mid-write never leaves a truncated file under ``path``.

    Args:
        payload: Tensors and plain Python values (loadable with ``weights_only=True``).
        path: Destination.
    """
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` and errors that name the file.

    Args:
        path: The file.
        what: What the file should be, for messages (e.g. ``"target checkpoint"``).
        map_location: Device to load onto.

    Returns:
        The stored object.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be read (corrupt, not a torch file, unsafe content).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a corrupt file
        raise ValueError(f"cannot read {what} {path}: {e}") from None
