"""The explanation API (captum-like): ``Interpreter(checkpoint).explain(query, gallery)``.

For a pair of person crops it returns why the target finds them as far apart as it does: the target distance d, the
decomposed distance d̂, per-attribute distances d_k, shares p_k = d_k / Σ_j d_j, contributions c_k = p_k · d (they
sum to d exactly), the attributes the interpreter predicts for both persons, and the attention maps (AAMs).

Inputs may be image files, numpy arrays (uint8 ``[H, W, 3]`` or float in [0, 1]) or torch tensors (``[3, H, W]`` or
``[B, 3, H, W]``, float in [0, 1]); images are resized to the checkpoint's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attrimeter.data.augment import to_float
from attrimeter.data.images import read_image
from attrimeter.data.schema import get_schema

__all__ = ["Explanation", "ImageInput", "Interpreter", "load_images"]

ImageInput = str | Path | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Explanation:
    """The decomposition of one query–gallery distance.

    Attributes:
        d: Target distance ``‖f(q) − f(g)‖``.
        d_hat: Decomposed distance ``(1/M) Σ_k d_k``.
        d_k: Per-attribute distances ``[M]``.
        shares: ``p_k = d_k / Σ_j d_j`` ``[M]`` (sum 1).
        contributions: ``c_k = p_k · d`` ``[M]`` (sum d).
        attributes: Attribute names ``[M]`` (schema keys, e.g. ``"upblack"``).
        titles: Human-readable attribute names ``[M]``.
        query_probs: Predicted probability of label 1 (the schema's code 2) for the query ``[M]``.
        gallery_probs: Likewise for the gallery image.
        query_aam: The query's attention maps ``[M, h, w]``.
        gallery_aam: The gallery image's attention maps ``[M, h, w]``.
        query_image: The query crop as the model saw it, uint8 ``[H, W, 3]``.
        gallery_image: Likewise for the gallery crop.
        meanings: The meaning of label 0 and 1 of each attribute.
    """

    d: float
    d_hat: float
    d_k: np.ndarray
    shares: np.ndarray
    contributions: np.ndarray
    attributes: tuple[str, ...]
    titles: tuple[str, ...]
    query_probs: np.ndarray
    gallery_probs: np.ndarray
    query_aam: np.ndarray
    gallery_aam: np.ndarray
    query_image: np.ndarray
    gallery_image: np.ndarray
    meanings: tuple[tuple[str, str], ...]

    def top(self, k: int = 5) -> list[tuple[str, float, float]]:
        """The attributes contributing most.

        Args:
            k: How many.

        Returns:
            ``(title, contribution, share)`` by decreasing contribution.
        """
        order = np.argsort(-self.contributions, kind="stable")[:k]
        return [(self.titles[i], float(self.contributions[i]), float(self.shares[i])) for i in order]

    def predicted(self, which: str = "query") -> dict[str, str]:
        """The predicted value of every attribute, in words.

        Args:
            which: ``"query"`` or ``"gallery"``.

        Returns:
            Attribute name -> meaning of the predicted value (e.g. ``{"up": "short sleeve", ...}``).

        Raises:
            ValueError: If ``which`` is neither.
        """
        if which not in ("query", "gallery"):
            raise ValueError(f"which must be 'query' or 'gallery', got {which!r}")
        probs = self.query_probs if which == "query" else self.gallery_probs
        return {a: m[int(p > 0.5)] for a, m, p in zip(self.attributes, self.meanings, probs, strict=True)}

    def differing(self) -> list[tuple[str, str, str]]:
        """Attributes predicted differently for the two persons, by decreasing contribution.

        Returns:
            ``(title, query value, gallery value)``.
        """
        q, g = self.query_probs > 0.5, self.gallery_probs > 0.5
        order = np.argsort(-self.contributions, kind="stable")
        return [(self.titles[i], self.meanings[i][int(q[i])], self.meanings[i][int(g[i])]) for i in order
                if q[i] != g[i]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no maps or images): distances and per-attribute numbers and predictions."""
        return {
            "d": self.d,
            "d_hat": self.d_hat,
            "attributes": [
                {"name": a, "title": t, "d_k": float(dk), "share": float(p), "contribution": float(c),
                 "query": self.meanings[i][int(self.query_probs[i] > 0.5)], "query_prob": float(self.query_probs[i]),
                 "gallery": self.meanings[i][int(self.gallery_probs[i] > 0.5)],
                 "gallery_prob": float(self.gallery_probs[i])}
                for i, (a, t, dk, p, c) in enumerate(zip(self.attributes, self.titles, self.d_k, self.shares,
                                                         self.contributions, strict=True))
            ],
        }

    def figure(self, out: str | Path | None = None, top: int = 3) -> Any:
        """The explanation as a picture (see :func:`attrimeter.viz.explain_figure`).

        Args:
            out: PNG file to write, or None.
            top: Attributes whose AAMs are drawn.

        Returns:
            The matplotlib ``Figure``.
        """
        from attrimeter.viz import explain_figure

        return explain_figure(self.query_image, self.gallery_image, self.query_aam, self.gallery_aam,
                              self.contributions, self.titles, self.d, self.d_hat, differing=self.differing(),
                              out=out, top=top, labels=("query", "gallery"))


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
            :class:`~attrimeter.engine.interpreter.InterpreterCheckpoint`).
        device: Where to run (``"cpu"``, ``"cuda"``...).

    Example:
        >>> explainer = Interpreter("runs/demo/interpreter/interpreter.pt")  # doctest: +SKIP
        >>> e = explainer.explain("a.jpg", "b.jpg")  # doctest: +SKIP
        >>> e.top(3)  # doctest: +SKIP
    """

    def __init__(self, checkpoint: str | Path | Any, device: str | torch.device = "cpu") -> None:
        from attrimeter.engine.interpreter import InterpreterCheckpoint, load_interpreter

        ck = checkpoint if isinstance(checkpoint, InterpreterCheckpoint) else load_interpreter(checkpoint, device)
        self.model = ck.model.to(device).eval()
        self.device = torch.device(device)
        self.image_size = ck.image_size
        self.attributes = tuple(ck.attribute_names)
        schema = get_schema(ck.meta["schema"])
        self.titles = tuple(schema[a].title for a in self.attributes)
        self.meanings = tuple(tuple(schema[a].meanings) for a in self.attributes)

    @torch.no_grad()
    def _run(self, images: np.ndarray) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        x = to_float(torch.from_numpy(images)).to(self.device)
        out = self.model(x)
        return (out.stacked().float().cpu(), torch.sigmoid(out.attr_logits).float().cpu().numpy(),
                out.aam().float().cpu().numpy())

    def explain(
        self, query: ImageInput, gallery: ImageInput | Sequence[ImageInput], batch_size: int = 128
    ) -> Explanation | list[Explanation]:
        """Decompose the target distance between a query and one or many gallery images.

        Args:
            query: One image.
            gallery: One image, or several (a sequence, or a batch array/tensor).
            batch_size: Gallery images per forward pass.

        Returns:
            One :class:`Explanation` for a single gallery image, else a list in the gallery's order.

        Raises:
            ValueError: On an unusable image (shape, dtype, NaN), naming it; more than one query image.
            attrimeter.data.images.ImageError: For a missing or corrupt image file.
        """
        from attrimeter.kernels.attr_distance import explain_topk_reference

        q_img = load_images(query, self.image_size)
        if len(q_img) != 1:
            raise ValueError(f"explain takes one query image, got {len(q_img)}")
        single = isinstance(gallery, (str, Path)) or (
            isinstance(gallery, (np.ndarray, torch.Tensor)) and gallery.ndim == 3)
        g_img = load_images(gallery, self.image_size)
        q_emb, q_probs, q_aam = self._run(q_img)
        results = []
        for s in range(0, len(g_img), batch_size):
            g_emb, g_probs, g_aam = self._run(g_img[s:s + batch_size])
            ids = torch.arange(len(g_emb))[None]
            res = explain_topk_reference(q_emb, g_emb, ids)
            for j in range(len(g_emb)):
                d = float(res.d[0, j])
                shares = res.shares[0, j].numpy()
                results.append(Explanation(
                    d=d, d_hat=float(res.d_hat[0, j]), d_k=res.d_k[0, j].numpy(), shares=shares,
                    contributions=shares * d, attributes=self.attributes, titles=self.titles,
                    query_probs=q_probs[0], gallery_probs=g_probs[j], query_aam=q_aam[0], gallery_aam=g_aam[j],
                    query_image=q_img[0], gallery_image=g_img[s + j], meanings=self.meanings))
        return results[0] if single else results
