"""The gallery a runtime serves: opened or created for an export, and refused when another model indexed it.

A gallery records the sha256 of the checkpoint whose export embedded it (the manifest's model id), its attribute
names and its embedding size; searching it with another model's embeddings would rank garbage without any error, so
:func:`open_gallery` refuses it (docs/architecture.md §6, §10).
"""

from __future__ import annotations

from pathlib import Path

from attrimeter.artefact.manifest import Manifest
from attrimeter.runtime.config import RuntimeConfig
from attrimeter.runtime.distributed.manifest import sharded_root
from attrimeter.runtime.distributed.sharded import ShardedGallery
from attrimeter.runtime.errors import GalleryError
from attrimeter.runtime.gallery import MANIFEST_NAME as GALLERY_MANIFEST
from attrimeter.runtime.gallery import Gallery

__all__ = ["check_model", "open_gallery"]


def check_model(store: Gallery | ShardedGallery, manifest: Manifest) -> None:
    """Refuse a gallery indexed by another model than the export's, or with other attributes or embedding size.

    Args:
        store: The open gallery.
        manifest: The export's manifest.

    Raises:
        GalleryError: Naming both model ids, or the mismatch.
    """
    if store.model != manifest.model_id:
        raise GalleryError(f"{store.path} was indexed with another model (sha256 {store.model[:12]}…), this export is "
                           f"{manifest.model_id[:12]}…; index the images again with this export")
    if tuple(store.attributes) != manifest.attribute_names or store.dim != manifest.channels:
        raise GalleryError(f"{store.path}: its attributes/embedding size do not match the export's")


def open_gallery(source: str | Path | Gallery | ShardedGallery, manifest: Manifest,
                 config: RuntimeConfig) -> Gallery | ShardedGallery:
    """The gallery for an export: an open one checked, a folder opened (or created, with ``create_gallery``).

    Args:
        source: A gallery folder (``attrimeter index``), a sharded gallery's folder or ``shards.json`` (``attrimeter
            index --ray``; its shards opened in this process), or an open :class:`Gallery` or
            :class:`~attrimeter.runtime.distributed.sharded.ShardedGallery` (the caller keeps owning it).
        manifest: The export's manifest (model id, attributes, feature map of a new gallery).
        config: ``verify``, ``writable``, ``create_gallery``, ``metric`` and ``index`` are read.

    Returns:
        The gallery, its search index loaded (steady latency from the first request).

    Raises:
        GalleryError: A missing, corrupt or locked gallery, or one indexed with another model (a gallery opened here
            is closed again first).
    """
    store: Gallery | ShardedGallery
    if isinstance(source, (Gallery, ShardedGallery)):
        store = source
    elif sharded_root(source) is not None:
        if config.opens_writable:
            raise GalleryError(f"{source}: a sharded gallery is read-only here; grow it with `attrimeter index --ray`")
        store = ShardedGallery.open(source, verify=config.verify, index=config.index)
    else:
        path = Path(source)
        if config.create_gallery and not (path / GALLERY_MANIFEST).exists():
            store = Gallery.create(path, dim=manifest.channels, attributes=manifest.attribute_names,
                                   aam_shape=manifest.aam_shape, model=manifest.model_id, metric=config.metric)
            return store  # empty, of this model by construction
        store = Gallery.open(path, verify=config.verify, writable=config.opens_writable, index=config.index)
    try:
        check_model(store, manifest)
    except GalleryError:
        if store is not source:  # opened here: release its lock and maps now
            store.close()
        raise
    if not config.create_gallery:
        store.load_index()
    return store
