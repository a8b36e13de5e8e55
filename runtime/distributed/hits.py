"""What a sharded search brings back: the merged hits and the stored rows that explain them (docs/architecture.md §11).

The :class:`~attrimeter.runtime.runtime.Runtime` explains a sharded search's hits from a :class:`RowSet` instead of
reading the gallery again, which would cost another round trip to every shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from attrimeter.runtime.errors import UnknownIdError

__all__ = ["RowSet", "ShardedHits"]


@dataclass(frozen=True)
class RowSet:
    """Stored rows of some gallery entries, looked up by global id: what explaining hits reads.

    Offers the read methods of :class:`~attrimeter.runtime.gallery.Gallery` (``embeddings``, ``attr_embeddings``,
    ``probs``, ``aam``, ``meta``) for the entries it holds.

    Attributes:
        ids: Global ids, sorted, unique, int64 ``[n]``.
        embedding: float32 ``[n, C]``.
        attr: ``[n, M, C]``: float16 as stored, or decoded float32 (compact storage).
        probs_rows: float32 ``[n, M]``.
        meta_rows: Metadata, ``"id"`` the global id.
        maps: ``[n, M, h, w]``: float16 as stored, or decoded float32 (e.g. uint8 maps); None when not fetched or not
            stored.
        metric: The gallery's metric.
    """

    ids: np.ndarray
    embedding: np.ndarray
    attr: np.ndarray
    probs_rows: np.ndarray
    meta_rows: tuple[dict[str, Any], ...]
    maps: np.ndarray | None
    metric: str

    def _at(self, ids: Any) -> np.ndarray:
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        at = np.searchsorted(self.ids, idx)
        held = at < len(self.ids)
        held[held] = self.ids[at[held]] == idx[held]
        if not held.all():
            raise UnknownIdError(f"gallery id {int(idx[~held][0])} was not fetched with these rows")
        return at

    def embeddings(self, ids: Any) -> np.ndarray:
        """Global embeddings, float32 ``[len(ids), C]``."""
        return self.embedding[self._at(ids)]

    def attr_embeddings(self, ids: Any) -> np.ndarray:
        """Per-attribute embeddings, float32 ``[len(ids), M, C]``."""
        return self.attr[self._at(ids)].astype(np.float32)

    def probs(self, ids: Any) -> np.ndarray:
        """Predicted P(label 1), float32 ``[len(ids), M]``."""
        return self.probs_rows[self._at(ids)]

    def aam(self, ids: Any) -> np.ndarray | None:
        """Attention maps, float32 ``[len(ids), M, h, w]``, or None when the rows came without them."""
        at = self._at(ids)
        return None if self.maps is None else self.maps[at].astype(np.float32)

    def meta(self, ids: Any) -> list[dict[str, Any]]:
        """Metadata, one dict per id (``"id"`` the global id)."""
        return [dict(self.meta_rows[i]) for i in self._at(ids)]


@dataclass(frozen=True)
class ShardedHits:
    """The merged top-k of a fan-out.

    Attributes:
        ids: Global ids ``[Q, k']``, best first.
        keys: Ranking keys ``[Q, k']`` ascending (d; ``−cos`` for an ``"ip"`` gallery; the weighted scan's score).
        d: Exact target distances ``[Q, k']`` (None for a weighted search: the caller explains the hits).
        rows: The stored rows of every hit.
        missing: Names of the shards that did not answer (only with ``partial``; empty otherwise).
    """

    ids: np.ndarray
    keys: np.ndarray
    d: np.ndarray | None
    rows: RowSet
    missing: tuple[str, ...]
