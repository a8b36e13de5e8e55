"""A float16 copy of the gallery on a GPU that searches and explains it: one protocol, two implementations.

* :class:`~attrimeter.runtime.fused_search.FusedSearch` (torch backend on a GPU, or ``fused=True``): the Triton
  ``attr_distance`` top-k kernel ranks and explains.
* :class:`~attrimeter.runtime.cuda_kernels.CudaExplainer` (TensorRT backend with AOT kernels in the export): FAISS
  ranks, the export's AOT explain kernel explains through cuda-python (no torch at run time).

Both return :class:`~attrimeter.runtime.decompose.Decomposition`; the runtime asks :meth:`DeviceIndex.can_rank` which
requests the copy ranks, instead of telling the implementations apart. Device copies hold the global rows in float16
too, so d carries float16 rounding there (docs/architecture.md §6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from attrimeter.artefact.manifest import Manifest
from attrimeter.runtime.backends import Backend, BackendError
from attrimeter.runtime.decompose import Decomposition
from attrimeter.runtime.gallery import Gallery

__all__ = ["DeviceIndex", "open_device_index"]


class DeviceIndex(Protocol):
    """The gallery's ``[N, M+1, C]`` rows on a device, kept in step with the store by the runtime."""

    def __len__(self) -> int:
        """Rows held (ids ``0..len-1``)."""
        ...

    def can_rank(self, weighted: bool, metric: str) -> bool:
        """Whether :meth:`search` ranks a request: attribute-weighted or not, in a gallery of ``metric``."""
        ...

    def search(self, q: np.ndarray, k: int, weights: np.ndarray | None) -> tuple[np.ndarray, Decomposition]:
        """Top-k ids ``[Q, k']`` of each query ``[Q, M+1, C]`` (ascending score) with their decomposition."""
        ...

    def explain(self, q: np.ndarray, ids: np.ndarray, weights: np.ndarray | None) -> Decomposition:
        """Decompose each query's distances to gallery ids ``[Q, K]`` (all below ``len(self)``)."""
        ...

    def append_gallery(self, rows: np.ndarray) -> None:
        """Append ``[n, M+1, C]`` rows; their ids continue from ``len(self)``."""
        ...

    def close(self) -> None:
        """Free the device copy (idempotent)."""
        ...


def open_device_index(backend: Backend, gallery: Gallery, export_dir: Path, manifest: Manifest,
                      fused: bool | None) -> DeviceIndex | None:
    """The device copy for this backend and export, filled with the gallery; None: FAISS and numpy on the CPU.

    Args:
        backend: The runtime's backend (a torch backend on a GPU gets the fused kernels, TensorRT the AOT explainer).
        gallery: The open gallery to copy.
        export_dir: The export folder (holds the AOT kernels).
        manifest: Its manifest.
        fused: True: the fused Triton kernels (torch backend only); False: none of them; None: the fused kernels when
            the torch backend runs on a GPU.

    Returns:
        The filled device copy, or None.

    Raises:
        BackendError: ``fused=True`` with another backend than torch.
    """
    torch_device = getattr(backend, "torch_device", None)
    if fused is None:
        fused = torch_device is not None and torch_device.type == "cuda"
    if fused:
        if torch_device is None:
            raise BackendError("fused search runs the Triton kernels through torch: use backend='torch'")
        from attrimeter.runtime.fused_search import FusedSearch

        return FusedSearch(gallery, str(torch_device))
    if backend.name != "tensorrt" or manifest.kernels is None or manifest.kernels.index is None:
        return None
    from attrimeter.runtime.cuda_kernels import CudaExplainer

    explainer = CudaExplainer(export_dir / manifest.kernels.index, manifest.channels, len(manifest.attributes),
                              device=int(backend.device.split(":")[1]))
    try:
        for first, attr in gallery.attr_chunks(65536):
            ids = np.arange(first, first + len(attr))
            explainer.append_gallery(np.concatenate([gallery.embeddings(ids)[:, None].astype(np.float16), attr], 1))
    except BaseException:
        explainer.close()
        raise
    return explainer
