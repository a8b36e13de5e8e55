"""Beyond one machine (docs/architecture.md §11): sharded galleries indexed on Ray Data and searched by fan-out.

``attrimeter index --ray`` writes N gallery stores and a top-level ``shards.json`` (:mod:`.manifest`);
:class:`ShardedGallery` (:mod:`.sharded`) serves them, in-process or with one Ray actor per shard, to the
:class:`~attrimeter.runtime.runtime.Runtime` like one store; :func:`index_sharded` (:mod:`.indexing`) builds them.
Ray is imported only where a Ray mode is used (``pip install "attrimeter[distributed]"``).
"""

from attrimeter.runtime.distributed.manifest import SHARDS_NAME, sharded_root

__all__ = ["SHARDS_NAME", "ShardedGallery", "ShardedIndexReport", "index_sharded", "sharded_root"]


def __getattr__(name: str) -> object:
    # Lazy: the manifest helpers stay importable without FAISS or Ray.
    if name == "ShardedGallery":
        from attrimeter.runtime.distributed.sharded import ShardedGallery

        return ShardedGallery
    if name in ("ShardedIndexReport", "index_sharded"):
        from attrimeter.runtime.distributed import indexing

        return getattr(indexing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
