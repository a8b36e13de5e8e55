"""An open gallery kept current: appends reach the store and its device copy; other processes' appends are picked up.

A device copy behind the store would explain the wrong rows, so appends go to the store first, then to the copy, under
one lock; a copy that fails is dropped and the CPU path takes over. A read-only handle looks for segments another
process published (``attrimeter index``) at most every ``refresh_s`` seconds; a corrupt new segment leaves it serving
what it had, with the reason kept for ``/health`` (docs/architecture.md §6, §10).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attrimeter.runtime.device_index import DeviceIndex
from attrimeter.runtime.errors import GalleryError
from attrimeter.runtime.gallery import Gallery

__all__ = ["LiveGallery"]

log = logging.getLogger(__name__)


class LiveGallery:
    """A gallery store with its optional device copy, kept in step.

    Args:
        store: The open gallery.
        device: Its device copy (filled), or None.
        refresh_s: How often a read-only store looks for other processes' appends (None: only on :meth:`refresh`).
    """

    def __init__(self, store: Gallery, device: DeviceIndex | None, refresh_s: float | None) -> None:
        self.store = store
        self._device = device
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._refreshed = time.monotonic()
        self.refresh_error: str | None = None  # why the last refresh failed; None after a good one

    @property
    def device(self) -> DeviceIndex | None:
        """The device copy; None without one, or once it failed (read it once per request: it may be dropped)."""
        return self._device

    def append(self, embedding: np.ndarray, attr_embeddings: np.ndarray, probs: np.ndarray,
               meta: Sequence[Mapping[str, Any]], aam: np.ndarray | None) -> np.ndarray:
        """Append entries to the store as one crash-safe segment, then to the device copy.

        Args:
            embedding: ``[n, C]``.
            attr_embeddings: ``[n, M, C]``.
            probs: ``[n, M]``.
            meta: One JSON-able dict per entry.
            aam: ``[n, M, h, w]`` or None.

        Returns:
            The new ids.
        """
        with self._lock:
            ids = self.store.append(embedding, attr_embeddings, probs, list(meta), aam=aam)
            self._mirror(np.concatenate([embedding[:, None], attr_embeddings], axis=1))
        return ids

    def _mirror(self, rows: np.ndarray) -> None:
        """Append rows to the device copy (the caller holds the lock); drop the copy when that fails."""
        device = self._device
        if device is None:
            return
        try:
            device.append_gallery(rows)
        except Exception:
            log.exception("the device copy of the gallery failed; searching on the CPU")
            self._device = None
            device.close()

    def refresh(self) -> int:
        """Pick up entries another process appended (and copy them to the device copy, if any).

        Returns:
            The number of entries now.

        Raises:
            GalleryError: A corrupt new segment (the entries already held stay in use).
        """
        with self._lock:
            self._refreshed = time.monotonic()  # also after a failure: retried after refresh_s, not on every call
            n = self.store.refresh()
            device = self._device
            if device is not None and len(device) < n:
                ids = np.arange(len(device), n)
                self._mirror(np.concatenate([self.store.embeddings(ids)[:, None], self.store.attr_embeddings(ids)],
                                            axis=1))
        return n

    def maybe_refresh(self) -> None:
        """:meth:`refresh` a read-only store when ``refresh_s`` has passed; a failure is logged and kept, not raised."""
        if (self._refresh_s is None or self.store.writable
                or time.monotonic() - self._refreshed < self._refresh_s):
            return
        try:
            self.refresh()
        except GalleryError as e:  # keep serving what was published before; /health shows the problem
            log.error("gallery refresh failed: %s", e)
            self.refresh_error = str(e)
        else:
            self.refresh_error = None

    def close(self) -> None:
        """Free the device copy, then close the store (idempotent)."""
        device, self._device = self._device, None
        try:
            if device is not None:
                device.close()
        finally:
            self.store.close()
