"""Images → the exported model's outputs: a decode pool, a dynamic batcher and a backend, owned together.

The part of a :class:`~attrimeter.runtime.runtime.Runtime` that runs the model (docs/architecture.md §6): concurrent
callers' images are decoded off the inference thread, batched together and run on one inference thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from attrimeter.artefact.manifest import Manifest
from attrimeter.runtime.backends import Backend, open_backend
from attrimeter.runtime.batching import DynamicBatcher
from attrimeter.runtime.config import RuntimeConfig
from attrimeter.runtime.images import ImageSource, load_image, to_input

__all__ = ["Embedder"]

_T = TypeVar("_T")
_R = TypeVar("_R")


class Embedder:
    """The backend that runs an export, its dynamic batcher and the image decode pool.

    Args:
        export_dir: The export folder.
        manifest: Its (verified) manifest.
        config: ``backend``, ``device``, ``threads``, ``checkpoint``, ``max_batch``, ``max_wait_ms``, ``queue_size``,
            ``queue_timeout_s`` and ``decode_workers`` are read.

    Raises:
        BackendError: No backend can run the export.
    """

    def __init__(self, export_dir: Path, manifest: Manifest, config: RuntimeConfig) -> None:
        self.image_size = manifest.image_size
        self.backend: Backend = open_backend(export_dir, manifest, config.backend, device=config.device,
                                             threads=config.threads, checkpoint=config.checkpoint)
        self._queue_timeout = config.queue_timeout_s
        self._batcher: DynamicBatcher | None = None
        self._decoder: ThreadPoolExecutor | None = None
        try:
            self._batcher = DynamicBatcher(self.backend.run, max_batch=min(config.max_batch, self.backend.max_batch),
                                           max_wait_s=config.max_wait_ms / 1000.0, queue_size=config.queue_size)
            self._decoder = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="attrimeter-decode")
        except BaseException:
            self.close()
            raise

    @property
    def batcher(self) -> DynamicBatcher:
        """The dynamic batcher (its ``stats``, ``queue_depth`` and ``queued_rows`` are the engine's counters)."""
        if self._batcher is None:
            raise RuntimeError("the embedder is closed")
        return self._batcher

    @property
    def max_batch(self) -> int:
        """Most images per engine call."""
        return self.batcher.max_batch

    def pixels(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """Decode images at the model's size, several at once in the decode pool.

        Args:
            sources: The images (named ``images[i]`` in errors).

        Returns:
            uint8 ``[B, H, W, 3]``.

        Raises:
            InputError: An unusable image (named by its index).
        """
        if len(sources) == 1:
            return load_image(sources[0], self.image_size, "images[0]")[None]
        futures = [self._pool().submit(load_image, s, self.image_size, f"images[{i}]") for i, s in enumerate(sources)]
        return np.stack([f.result() for f in futures])

    def decode(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
        """``fn`` over ``items`` in the decode pool, results in order (for callers that decode their own way)."""
        return self._pool().map(fn, items)

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The model's outputs for decoded images, batched with other callers' (waits at most ``queue_timeout_s``).

        Raises:
            OverloadedError: The engine's queue would not drain in time.
        """
        return self.batcher(to_input(pixels), timeout=self._queue_timeout)

    def submit(self, pixels: np.ndarray) -> list[Future[dict[str, np.ndarray]]]:
        """Queue decoded images without a time limit (bulk indexing); the outputs arrive as futures, in chunks."""
        return self.batcher.submit(to_input(pixels), timeout=None)

    def stats(self) -> dict[str, Any]:
        """The backend and the engine's counters: requests, images, batches, failures, refusals, busy time, queue."""
        batcher = self.batcher
        b = batcher.stats
        return {"backend": self.backend.name, "device": self.backend.device, "queue_depth": batcher.queue_depth,
                "requests": b.requests, "images": b.rows, "batches": b.batches, "failed_batches": b.failed_batches,
                "rejected": b.rejected, "busy_seconds": b.busy_s, "batch_sizes": dict(b.batch_sizes),
                "queued_images": batcher.queued_rows}

    def _pool(self) -> ThreadPoolExecutor:
        if self._decoder is None:
            raise RuntimeError("the embedder is closed")
        return self._decoder

    def close(self) -> None:
        """Finish queued requests, then stop the decode pool and release the backend (idempotent)."""
        batcher, decoder = self._batcher, self._decoder
        self._batcher = self._decoder = None
        try:
            if batcher is not None:
                batcher.close()
            if decoder is not None:
                decoder.shutdown(wait=True)
        finally:
            self.backend.close()
