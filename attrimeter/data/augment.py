"""Batched training augmentation on uint8 image tensors (flip, pad-crop, random erasing), torchvision-free."""

from __future__ import annotations

import torch

__all__ = ["augment_batch", "to_float"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1] (the models normalise themselves)."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    flip: float = 0.5,
    pad: int = 10,
    erase: float = 0.5,
    erase_area: tuple[float, float] = (0.02, 0.4),
    erase_ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """ReID's standard augmentation (as in "Bag of Tricks") on a float batch.

    Args:
        x: float [B, 3, H, W] in [0, 1]; not modified.
        generator: Random generator (reproducible training).
        flip: Probability of a horizontal flip.
        pad: Zero padding before a random crop back to H x W (0 disables).
        erase: Probability of random erasing.
        erase_area: Range of the erased fraction of the image.
        erase_ratio: Range of the erased rectangle's aspect ratio (sampled log-uniformly).

    Returns:
        The augmented batch, same shape.
    """
    b, _, h, w = x.shape
    out = x.clone()
    flips = torch.rand(b, generator=generator) < flip
    out[flips] = out[flips].flip(-1)
    if pad > 0:
        padded = torch.nn.functional.pad(out, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).tolist()
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    do_erase = (torch.rand(b, generator=generator) < erase).tolist()
    area = torch.empty(b).uniform_(*erase_area, generator=generator) * h * w
    log_r = torch.empty(b).uniform_(*torch.tensor(erase_ratio).log().tolist(), generator=generator)
    eh = (area * log_r.exp()).sqrt().round().long().clamp(1, h).tolist()
    ew = (area / log_r.exp()).sqrt().round().long().clamp(1, w).tolist()
    for i in range(b):
        if do_erase[i]:
            y0 = int(torch.randint(0, h - eh[i] + 1, (1,), generator=generator))
            x0 = int(torch.randint(0, w - ew[i] + 1, (1,), generator=generator))
            out[i, :, y0:y0 + eh[i], x0:x0 + ew[i]] = torch.rand(3, 1, 1, generator=generator)
    return out
