"""The export artefact, torch-free: what ``attrimeter.export`` writes and ``attrimeter.runtime`` reads.

One place for both sides (docs/architecture.md §5, §6): the contract's fixed names (:mod:`.contract`), the typed
manifest with its file hashes (:mod:`.manifest`, :mod:`.verification`, :mod:`.compiled`), the AOT kernels' launch
metadata (:mod:`.kernels`) and the probing of the CUDA device and TensorRT (:mod:`.device`). numpy is not even
needed: json, hashlib, struct and ctypes only.
"""
