"""The explanation API (captum-like): ``Interpreter(checkpoint).explain(query, gallery)``.

For a pair of person crops it returns why the target finds them as far apart as it does, as an
:class:`~attrimeter.explanation.Explanation` (the type the runtime's search returns too): the target distance d, the
decomposed distance d̂, per-attribute distances d_k, shares p_k = d_k / Σ_j d_j, contributions c_k = p_k · d (they
sum to d exactly), the attributes the interpreter predicts for both persons, and the attention maps (AAMs).

Inputs may be image files, numpy arrays (uint8 ``[H, W, 3]`` or float in [0, 1]) or torch tensors (``[3, H, W]`` or
``[B, 3, H, W]``, float in [0, 1]); images are resized to the checkpoint's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attrimeter.data.augment import to_float
from attrimeter.data.images import read_image
from attrimeter.data.schema import get_schema
from attrimeter.explanation import Explanation, explanations
from attrimeter.runtime.decompose import explain_rows

__all__ = ["Explanation", "ImageInput", "Interpreter", "load_images"]

ImageInput = str | Path | np.ndarray | torch.Tensor


def _to_uint8(image: np.ndarray, name: str) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float pixels, got {image.dtype}")
    if not np.isfinite(image).all():
        raise ValueError(f"{name}: image contains NaN or infinite values")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"{name}: float images must lie in [0, 1], got range [{image.min():.3g}, {image.max():.3g}]")
    return np.round(image * 255).astype(np.uint8)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == size:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def load_images(items: ImageInput | Sequence[ImageInput], size: tuple[int, int]) -> np.ndarray:
    """Turn any supported image input into a uint8 batch ``[B, H, W, 3]`` at ``size``.

    Args:
        items: One image (path, array, tensor ``[3, H, W]``), a batch tensor/array ``[B, ...]``, or a sequence.
        size: ``(height, width)``.

    Returns:
        uint8 ``[B, height, width, 3]``.

    Raises:
        ValueError: On a wrong shape, dtype, range or NaN (naming the item).
        attrimeter.data.images.ImageError: For a missing or corrupt file.
    """
    if isinstance(items, torch.Tensor):
        t = items.detach().cpu()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[1] != 3:
            raise ValueError(f"image tensors must be [3, H, W] or [B, 3, H, W], got shape {tuple(items.shape)}")
        items = list(t.permute(0, 2, 3, 1).float().numpy())
    elif isinstance(items, np.ndarray) and items.ndim == 4:
        items = list(items)
    elif isinstance(items, (str, Path, np.ndarray)):
        items = [items]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            out.append(read_image(item, size))
            continue
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"image {i}: tensors must be [3, H, W], got shape {tuple(item.shape)}")
            item = item.detach().cpu().permute(1, 2, 0).float().numpy()
        if not isinstance(item, np.ndarray):
            raise ValueError(f"image {i}: expected a path, numpy array or torch tensor, got {type(item).__name__}")
        out.append(_resize(_to_uint8(item, f"image {i}"), size))
    if not out:
        raise ValueError("no images given")
    return np.stack(out)


class Interpreter:
    """Explains a target's distances with a trained interpreter.

    Args:
        checkpoint: An ``interpreter.pt`` (or an already loaded
            :class:`~attrimeter.engine.interpreter_checkpoint.InterpreterCheckpoint`).
        device: Where to run (``"cpu"``, ``"cuda"``...).

    Example:
        >>> explainer = Interpreter("runs/demo/interpreter/interpreter.pt")  # doctest: +SKIP
        >>> e = explainer.explain("a.jpg", "b.jpg")  # doctest: +SKIP
        >>> e.top(3)  # doctest: +SKIP
        >>> ranked = sorted(explainer.explain_many("a.jpg", ["b.jpg", "c.jpg"]), key=lambda x: x.d)  # doctest: +SKIP
    """

    def __init__(self, checkpoint: str | Path | Any, device: str | torch.device = "cpu") -> None:
        from attrimeter.engine.interpreter_checkpoint import InterpreterCheckpoint, load_interpreter

        ck = checkpoint if isinstance(checkpoint, InterpreterCheckpoint) else load_interpreter(checkpoint, device)
        self.model = ck.model.to(device).eval()
        self.device = torch.device(device)
        self.image_size = ck.image_size
        self.attributes = tuple(ck.attribute_names)
        schema = get_schema(ck.meta["schema"])
        self.titles = tuple(schema[a].title for a in self.attributes)
        self.meanings = tuple(tuple(schema[a].meanings) for a in self.attributes)

    @torch.no_grad()
    def _run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(stacked embeddings [B, M+1, C], probabilities [B, M], AAMs [B, M, h, w])``, float32 numpy."""
        x = to_float(torch.from_numpy(images)).to(self.device)
        out = self.model(x)
        return (out.stacked().float().cpu().numpy(), torch.sigmoid(out.attr_logits).float().cpu().numpy(),
                out.aam().float().cpu().numpy())

    def explain(self, query: ImageInput, gallery: ImageInput) -> Explanation:
        """Decompose the target distance between a query and ONE gallery image.

        Args:
            query: One image.
            gallery: One image: a path, an array ``[H, W, 3]`` or a tensor ``[3, H, W]``
                (for several, :meth:`explain_many`).

        Returns:
            The pair's :class:`~attrimeter.explanation.Explanation`.

        Raises:
            ValueError: On an unusable image (shape, dtype, NaN), naming it; more than one query image; a sequence or
                batch as ``gallery``.
            attrimeter.data.images.ImageError: For a missing or corrupt image file.
        """
        if not (isinstance(gallery, (str, Path)) or (isinstance(gallery, (np.ndarray, torch.Tensor))
                                                     and gallery.ndim == 3)):
            kind = (f"an array of shape {tuple(gallery.shape)}" if isinstance(gallery, (np.ndarray, torch.Tensor))
                    else f"a {type(gallery).__name__}")
            raise ValueError(f"explain takes one gallery image (a path, [H, W, 3] array or [3, H, W] tensor), got "
                             f"{kind}: use explain_many for several")
        return self.explain_many(query, gallery)[0]

    def explain_many(self, query: ImageInput, gallery: ImageInput | Sequence[ImageInput],
                     batch_size: int = 128) -> list[Explanation]:
        """Decompose the target distance between a query and every image of a gallery.

        Args:
            query: One image.
            gallery: A sequence of images, a batch (array ``[B, H, W, 3]``, tensor ``[B, 3, H, W]``) or one image.
            batch_size: Gallery images per forward pass.

        Returns:
            One :class:`~attrimeter.explanation.Explanation` per gallery image, in the gallery's order (always a
            list, even of one).

        Raises:
            ValueError: On an unusable image (shape, dtype, NaN), naming it; more than one query image.
            attrimeter.data.images.ImageError: For a missing or corrupt image file.
        """
        q_img = load_images(query, self.image_size)
        if len(q_img) != 1:
            raise ValueError(f"explain takes one query image, got {len(q_img)}")
        g_img = load_images(gallery, self.image_size)
        q_emb, q_probs, q_aam = self._run(q_img)
        results = []
        for s in range(0, len(g_img), batch_size):
            crops = g_img[s:s + batch_size]
            g_emb, g_probs, g_aam = self._run(crops)
            results += explanations(explain_rows(q_emb, g_emb[None]), attributes=self.attributes, titles=self.titles,
                                    meanings=self.meanings, query_probs=q_probs, gallery_probs=g_probs,
                                    query_aam=q_aam, query_images=q_img, gallery_aam=g_aam, gallery_images=crops)[0]
        return results
