"""Frozen-stage feature caches and interpreter embeddings (docs/architecture.md §3, §8).

The frozen shared stages' outputs and the target's feature maps never change while an interpreter trains, so they
are computed once per image set (:func:`cache_features`) and shared by every interpreter grafted at the same split:
training and evaluation then run only the interpreter branch. :func:`interpreter_embeddings` runs the branch over
either such a cache or image files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attrimeter.data.augment import to_float
from attrimeter.data.formats import Sample
from attrimeter.data.images import read_images
from attrimeter.models.interpreter import AttriMeter

__all__ = ["FeatureCache", "cache_features", "interpreter_embeddings"]


@dataclass
class FeatureCache:
    """Frozen-stage outputs of a list of images: what every interpreter grafted at the same split shares.

    Attributes:
        shared: Output of the shared stages ``[N, C', h', w']``.
        features: The target's feature maps F ``[N, C, h, w]``.
    """

    shared: torch.Tensor
    features: torch.Tensor

    def __len__(self) -> int:
        return int(self.shared.shape[0])


@torch.no_grad()
def cache_features(
    model: AttriMeter,
    samples: list[Sample] | list[Path],
    image_size: tuple[int, int],
    batch_size: int = 128,
    flip: bool = False,
    progress: bool = True,
    desc: str = "cache",
) -> FeatureCache:
    """Run the frozen part (shared stages and target) once over image files.

    Args:
        model: The interpreter (its target and shared stages are used).
        samples: Images (samples or paths).
        image_size: ``(height, width)``.
        batch_size: Images per forward pass.
        flip: Also cache the horizontally flipped images, as rows ``N..2N-1``.
        progress: Show a progress bar.
        desc: Progress bar label.

    Returns:
        The cache, on the model's device.
    """
    device = model.scale.device
    paths = [s.path if isinstance(s, Sample) else Path(s) for s in samples]
    shared, features = [], []
    for flipped in (False, True) if flip else (False,):
        for s in tqdm(range(0, len(paths), batch_size), desc=desc + (" (flipped)" if flipped else ""),
                      unit="batch", disable=not progress, leave=False):
            x = to_float(torch.from_numpy(read_images(paths[s:s + batch_size], image_size, progress=False)))
            if flipped:
                x = x.flip(-1)
            sh = model.shared_features(x.to(device))
            shared.append(sh)
            features.append(model.target_features(sh))
    return FeatureCache(shared=torch.cat(shared), features=torch.cat(features))


@torch.no_grad()
def interpreter_embeddings(
    model: AttriMeter,
    images: FeatureCache | list[Sample] | list[Path],
    image_size: tuple[int, int] | None = None,
    batch_size: int = 128,
    progress: bool = False,
    desc: str = "embed",
    maps: bool = False,
) -> tuple[np.ndarray, ...]:
    """Embeddings of images through the interpreter.

    Args:
        model: The interpreter (eval mode is set).
        images: A :func:`cache_features` of the images (only the branch runs), or image files (decoded and run
            batch by batch: nothing but the embeddings is kept, for data sets too large to cache).
        image_size: ``(height, width)`` for image files.
        batch_size: Images per pass.
        progress: Show a progress bar (image files).
        desc: Progress bar label.
        maps: Also return the attention maps.

    Returns:
        ``(stacked [N, M+1, C] float32 with row 0 the target embedding, attribute logits [N, M] float32)``, and
        with ``maps`` the AAMs ``[N, M, h, w]`` float32 third.

    Raises:
        ValueError: If image files come without ``image_size``.
    """
    model.eval()
    stacked, logits, aams = [], [], []
    if isinstance(images, FeatureCache):
        batches = ((images.shared[s:s + batch_size], images.features[s:s + batch_size])
                   for s in range(0, len(images), batch_size))
        outputs = (model.from_shared(shared, feats) for shared, feats in batches)
    else:
        if image_size is None:
            raise ValueError("interpreter_embeddings: image files need image_size")
        paths = [i.path if isinstance(i, Sample) else Path(i) for i in images]
        device = model.scale.device
        outputs = (model(to_float(torch.from_numpy(read_images(paths[s:s + batch_size], image_size, False))).to(device))
                   for s in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress,
                                 leave=False))
    for out in outputs:
        stacked.append(out.stacked().float().cpu())
        logits.append(out.attr_logits.float().cpu())
        if maps:
            aams.append(out.aam().float().cpu())
    result = (torch.cat(stacked).numpy(), torch.cat(logits).numpy())
    return (*result, torch.cat(aams).numpy()) if maps else result
