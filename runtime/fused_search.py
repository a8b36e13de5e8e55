"""The torch backend's gallery search on a GPU: the fused Triton kernels ``attr_distance`` (top-k) and ``explain_topk``.

The gallery's ``[N, M+1, C]`` rows (row 0 the global embedding, rows 1..M the attribute embeddings) are mirrored on
the device in float16 with their squared norms in float32; one kernel scans them once per query block, keeps the top-k
by d (or by ``Σ_k w_k d_k``) and explains the winners. The global rows are float16 here, so d carries float16
rounding (2^-11 relative per stored value; the tests allow 3e-3 on d), unlike the CPU path's float32 rows. torch
and triton are imported only when this class is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attrimeter.runtime.decompose import Decomposition

__all__ = ["FusedSearch"]


class FusedSearch:
    """The gallery on a torch device, searched and explained by the Triton kernels.

    A :class:`~attrimeter.runtime.device_index.DeviceIndex` that ranks by L2 (the target distance d) or by the
    attribute-weighted score.

    Args:
        gallery: An open :class:`~attrimeter.runtime.gallery.Gallery`.
        device: A torch device (``"cuda:0"``; ``"cpu"`` runs the kernels under ``TRITON_INTERPRET=1``, for tests).
        chunk: Entries copied per step while mirroring.
    """

    def __init__(self, gallery: Any, device: str, chunk: int = 65536) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        # Storage (grown by append_gallery, one writer at a time) and the published view of its first n rows: searches
        # read the view tuple once, so a concurrent append never mixes old and new buffers.
        self._rows = torch.empty((0, len(gallery.attributes) + 1, gallery.dim), dtype=torch.float16,
                                 device=self.device)
        self._sqnorm = torch.empty((0, len(gallery.attributes) + 1), dtype=torch.float32, device=self.device)
        self._view: tuple[Any, Any] = (self._rows, self._sqnorm)
        for first, attr in gallery.attr_chunks(chunk):
            ids = np.arange(first, first + len(attr))
            self.append_gallery(np.concatenate([gallery.embeddings(ids)[:, None], np.asarray(attr)], axis=1))

    def __len__(self) -> int:
        return len(self._view[0])

    def append_gallery(self, rows: np.ndarray) -> None:
        """Append ``[n, M+1, C]`` rows (ids continue from ``len(self)``); storage grows geometrically.

        Args:
            rows: Embeddings of the new entries, any float dtype (stored float16).
        """
        torch = self._torch
        new = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float16)).to(self.device)
        n = len(self)
        total = n + len(new)
        if total > len(self._rows):
            size = max(total, 2 * len(self._rows))
            grown = torch.empty((size, *self._rows.shape[1:]), dtype=torch.float16, device=self.device)
            grown_sq = torch.empty((size, self._sqnorm.shape[1]), dtype=torch.float32, device=self.device)
            grown[:n] = self._rows[:n]
            grown_sq[:n] = self._sqnorm[:n]
            self._rows, self._sqnorm = grown, grown_sq
        self._rows[n:total] = new
        self._sqnorm[n:total] = new.float().square().sum(-1)  # of the stored (rounded) values
        self._view = (self._rows[:total], self._sqnorm[:total])

    def can_rank(self, weighted: bool, metric: str) -> bool:
        """Whether :meth:`search` ranks the request: the kernel ranks by L2 or the weighted score, not by cosine."""
        return weighted or metric == "l2"

    def _decomposition(self, res: Any) -> Decomposition:
        return Decomposition(*(getattr(res, f).float().cpu().numpy() for f in Decomposition._fields))

    def search(self, q: np.ndarray, k: int, weights: np.ndarray | None) -> tuple[np.ndarray, Decomposition]:
        """Top-k of each query by d (or the weighted score), explained.

        Args:
            q: Queries ``[Q, M+1, C]``.
            k: Hits per query (clipped to the gallery size).
            weights: Checked attribute weights ``[M]``, or None.

        Returns:
            ``(ids [Q, k'] int64, decomposition)`` ascending by score.
        """
        from attrimeter.kernels.attr_distance import attr_distance

        rows, sqnorm = self._view
        kk = min(k, len(rows))
        if kk == 0:
            empty = np.empty((len(q), 0), np.float32)
            m = q.shape[1] - 1
            return np.empty((len(q), 0), np.int64), Decomposition(empty, np.empty((len(q), 0, m), np.float32),
                                                                  np.empty((len(q), 0, m), np.float32), empty, empty)
        qt = self._torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device)
        # Rows were checked finite when the gallery stored them.
        res = attr_distance(qt, rows, g_sqnorm=sqnorm, topk=kk,
                            weights=None if weights is None else weights.tolist(), check_finite=False)
        return res.indices.long().cpu().numpy(), self._decomposition(res)

    def explain(self, q: np.ndarray, ids: np.ndarray, weights: np.ndarray | None) -> Decomposition:
        """Decompose each query's distances to chosen ids (``explain_topk``).

        Args:
            q: Queries ``[Q, M+1, C]``.
            ids: ``[Q, K]`` gallery ids (checked by the caller).
            weights: Checked attribute weights ``[M]``, or None.

        Returns:
            The decomposition ``[Q, K(, M)]``.
        """
        from attrimeter.kernels.attr_distance import explain_topk

        torch = self._torch
        qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).to(self.device)
        idt = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)
        res = explain_topk(qt, self._view[0], idt, None if weights is None else weights.tolist())
        return self._decomposition(res)

    def close(self) -> None:
        """Free the device copy."""
        rows, sqnorm = self._view
        self._view = (rows.new_empty((0, *rows.shape[1:])), sqnorm.new_empty((0, *sqnorm.shape[1:])))
        self._rows, self._sqnorm = self._view
