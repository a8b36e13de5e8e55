"""One shard of a sharded gallery answering fan-out calls (docs/architecture.md §11).

:class:`ShardServer` wraps one gallery store. A query's fan-out asks every shard for its top-k *with the rows that
explain it* (global and attribute embeddings, probabilities, metadata, and attention maps when overlays are drawn), so
the caller merges, explains and answers after a single round trip. It runs in-process (a local sharded gallery) or
as a Ray actor (one per shard, on any machine that sees the shard's folder); either way it returns plain numpy arrays
and dicts, which Ray ships without copies.

Ranking keys (ascending, so that the caller's merge is one sort): :meth:`Gallery.rank
<attrimeter.runtime.gallery.Gallery.rank>`'s (the exact distance for an ``"l2"`` store, ``−cos`` for an ``"ip"`` one),
and the scan's score ``Σ_k w_k d_k`` for a weighted search.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from attrimeter.runtime.errors import GalleryError
from attrimeter.runtime.gallery import Gallery
from attrimeter.runtime.gallery_index import IndexChoice

__all__ = ["ShardServer"]


class ShardServer:
    """One shard's store, opened read-only, answering top-k and row requests by shard-local id.

    Args:
        folder: The shard's gallery folder.
        name: The shard's name (in messages).
        identity: What its manifest must say: ``dim``, ``attributes``, ``aam_shape``, ``model``, ``metric``.
        count: Entries the sharded manifest records for it (the store must hold exactly these).
        verify: Check the sha256 of its files when opening.

    Raises:
        GalleryError: A missing or corrupt store, another identity, or another entry count (the message names the
            shard).
    """

    def __init__(self, folder: str, name: str, identity: Mapping[str, Any], count: int, verify: bool = True,
                 index: IndexChoice | None = None) -> None:
        self.name = name
        try:
            self.gallery = Gallery.open(folder, verify=verify, progress=False, index=index)
        except GalleryError as e:
            raise GalleryError(f"shard {name}: {e}") from e
        g = self.gallery
        found = {"dim": g.dim, "attributes": list(g.attributes),
                 "aam_shape": None if g.aam_shape is None else list(g.aam_shape), "model": g.model, "metric": g.metric}
        problem = None
        if found != dict(identity):
            wrong = sorted(k for k in identity if found.get(k) != identity[k])
            problem = f"shard {name} ({folder}): its {', '.join(wrong)} differ from the sharded manifest's"
        elif len(g) != count:
            problem = (f"shard {name} ({folder}) holds {len(g)} entries, the sharded manifest records {count}: an "
                       "indexing run is in progress or was interrupted; run `attrimeter index --ray` again to finish "
                       "and publish it")
        if problem:
            g.close()
            raise GalleryError(problem)
        g.load_index()

    def ping(self) -> int:
        """The number of entries (a cheap liveness check)."""
        return len(self.gallery)

    def index_kind(self) -> str | None:
        """The kind of the store's search index (``flat``, ``ivf``, ``hnsw``)."""
        return self.gallery.index_kind

    def top_k(self, queries: np.ndarray, k: int, aam: bool = False) -> dict[str, Any]:
        """Top-k by the store's metric (its index proposes candidates, re-ranked exactly), with the hits' rows.

        Args:
            queries: Global query embeddings, float32 ``[Q, C]``.
            k: Hits per query.
            aam: Also return the hits' attention maps.

        Returns:
            ``{"keys": ranking keys float64 [Q, k'] ascending, "d": exact distances float32 [Q, k'], "ids": shard-local
            ids int64 [Q, k'], "rows": see :meth:`rows`}`` with ``k' = min(k, entries)``, ties by the lower id.
        """
        keys, d, ids = self.gallery.rank(queries, k)
        rows = self.rows(np.unique(ids), aam)
        return {"keys": keys, "d": d, "ids": ids, "rows": rows}

    def weighted_top_k(self, attr_queries: np.ndarray, weights: np.ndarray, k: int,
                       aam: bool = False) -> dict[str, Any]:
        """Exact top-k by the attribute-weighted score ``Σ_k w_k d_k``, with the rows of the hits.

        Args:
            attr_queries: Per-attribute query embeddings ``[Q, M, C]``.
            weights: Checked attribute weights, float32 ``[M]``.
            k: Hits per query.
            aam: Also return the hits' attention maps.

        Returns:
            ``{"keys": scan scores [Q, k'] ascending, "d": None, "ids": shard-local ids [Q, k'], "rows": ...}``.
        """
        scores, ids = self.gallery.weighted_search(attr_queries, weights, k)
        return {"keys": scores, "d": None, "ids": ids, "rows": self.rows(np.unique(ids), aam)}

    def rows(self, ids: np.ndarray, aam: bool = False) -> dict[str, Any]:
        """The stored rows of entries.

        Args:
            ids: Shard-local ids, sorted and unique.
            aam: Also return their attention maps (None when the store keeps none: the runtime recomputes them).

        Returns:
            ``{"ids", "embedding" float32 [n, C], "attr" [n, M, C], "probs" float32 [n, M], "meta" (list of dicts,
            shard-local ``"id"``), "aam" [n, M, h, w] or None}``: attr and aam float16 with float16 storage (as stored:
            half the bytes to ship), else decoded float32 (float16 would round them: sharded results must equal one
            store's, docs/architecture.md §11).
        """
        g = self.gallery
        maps = g.aam(ids) if aam else None  # None where no maps are kept
        attr_dtype = np.float16 if g.storage.attr.kind == "float16" else np.float32
        aam_dtype = np.float16 if maps is not None and g.storage.aam.kind == "float16" else np.float32
        return {"ids": ids, "embedding": g.embeddings(ids), "attr": g.attr_embeddings(ids).astype(attr_dtype),
                "probs": g.probs(ids), "meta": g.meta(ids), "aam": None if maps is None else maps.astype(aam_dtype)}

    def close(self) -> None:
        """Release the store (idempotent)."""
        self.gallery.close()
