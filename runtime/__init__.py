"""Torch-free batch runtime: backends, dynamic batching, gallery store, explained search, HTTP server.

``from attrimeter.runtime import Runtime`` needs numpy, Pillow and one backend (onnxruntime by default); the gallery
search needs faiss-cpu. torch and triton are imported only by the optional torch backend (docs/architecture.md §6).
"""

from attrimeter.runtime.errors import GalleryError, InputError, OverloadedError, UnknownIdError

__all__ = ["Gallery", "GalleryError", "InputError", "OverloadedError", "Runtime", "RuntimeConfig", "UnknownIdError"]


def __getattr__(name: str) -> object:
    # Lazy: `attrimeter.runtime.errors` etc. stay importable without the backends' packages.
    if name == "Runtime":
        from attrimeter.runtime.runtime import Runtime

        return Runtime
    if name == "RuntimeConfig":
        from attrimeter.runtime.config import RuntimeConfig

        return RuntimeConfig
    if name == "Gallery":
        from attrimeter.runtime.gallery import Gallery

        return Gallery
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
