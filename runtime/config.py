"""How a :class:`~attrimeter.runtime.runtime.Runtime` runs: backend, batching, gallery opening, device search.

One frozen record instead of a constructor with a keyword per knob; checked when built, so a bad value is refused
with its field's name before any engine is loaded (docs/architecture.md §6)::

    Runtime("export/", "gallery/", RuntimeConfig(threads=2, create_gallery=True))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from attrimeter.runtime.backends import BACKENDS
from attrimeter.runtime.gallery import METRICS
from attrimeter.runtime.gallery_index import IndexChoice

__all__ = ["RuntimeConfig"]


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything about a runtime but the export and the gallery it serves.

    Attributes:
        backend: ``"auto"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"torch"`` (see :mod:`attrimeter.runtime.backends`).
        device: Backend device (None: the backend's choice).
        threads: CPU threads of the backend (None: its choice).
        search_threads: FAISS threads per CPU search (None: one per core). One by default: a single query's flat
            search is memory-bound and short, and waking OpenMP's team on a loaded machine dominated it (30 ms
            against 0.16 ms at 10,000 entries on 2 cores); raise it for large query batches. FAISS's setting is
            process-wide: the last runtime created in a process sets it for all.
        checkpoint: The source checkpoint, for the torch backend when it has moved.
        max_batch: Most images per engine call.
        max_wait_ms: How long a request waits for others to share its batch.
        queue_size: Most requests waiting for the engine (then :class:`~attrimeter.runtime.errors.OverloadedError`).
        queue_timeout_s: The longest a call may wait for the engine: refused at once when the queued images would take
            longer at the engine's measured rate, or when its time runs out in the queue (see
            :mod:`attrimeter.runtime.batching`).
        decode_workers: Threads decoding images of multi-image calls (off the inference thread).
        verify: Check the sha256 of the export's and the gallery's files when opening.
        writable: Open the gallery for adding (takes its writer lock).
        create_gallery: Create the gallery folder when it does not exist (implies writable).
        metric: A new gallery's search metric: ``"l2"`` ranks by the target distance d, ``"ip"`` by the cosine of the
            global embeddings (for models trained with a cosine loss); hits are explained the same way either way.
        fused: Search and explain with the fused Triton kernels on a float16 device copy of the gallery (torch backend
            only); None: when the torch backend runs on a GPU.
        refresh_s: A read-only gallery looks for entries another process appended (``attrimeter index``) before a
            search or explain at most this often, in seconds (None: only on ``Runtime.refresh``).
        index: The gallery's search index (every shard's for a sharded gallery): None, the one saved with it
            (``attrimeter index --index``), else exact; or an
            :class:`~attrimeter.runtime.gallery_index.IndexChoice` (``flat``, ``ivf``, ``hnsw`` and parameters).
    """

    backend: str = "auto"
    device: str | None = None
    threads: int | None = None
    search_threads: int | None = 1
    checkpoint: str | Path | None = None
    max_batch: int = 32
    max_wait_ms: float = 2.0
    queue_size: int = 1024
    queue_timeout_s: float = 1.0
    decode_workers: int = 2
    verify: bool = True
    writable: bool = False
    create_gallery: bool = False
    metric: str = "l2"
    fused: bool | None = None
    refresh_s: float | None = 1.0
    index: IndexChoice | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"RuntimeConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.index is not None and not isinstance(self.index, IndexChoice):
            raise ValueError(f"RuntimeConfig.index must be an IndexChoice or None, got {type(self.index).__name__}")
        if self.metric not in METRICS:
            raise ValueError(f"RuntimeConfig.metric must be one of {METRICS}, got {self.metric!r}")
        for name in ("max_batch", "queue_size", "decode_workers", *(["threads"] if self.threads is not None else []),
                     *(["search_threads"] if self.search_threads is not None else [])):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RuntimeConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("max_wait_ms", "queue_timeout_s", *(["refresh_s"] if self.refresh_s is not None else [])):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RuntimeConfig.{name} must be a finite number >= 0, got {value!r}")

    @property
    def opens_writable(self) -> bool:
        """Whether the gallery is opened for writing (``writable``, or ``create_gallery``)."""
        return self.writable or self.create_gallery
