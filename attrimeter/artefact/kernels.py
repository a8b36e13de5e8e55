"""The AOT kernels' launch metadata, as the launchers read it: typed, checked against the cubin and PTX it describes.

An export's ``kernels/`` folder holds, per GPU target, each Triton kernel compiled ahead of time (``<kernel>.cubin``,
``.ptx``) with a JSON of what a launcher needs without torch or triton (docs/architecture.md §4, §5): the entry
symbol, threads per block, dynamic shared memory, the parameters in launch order (Triton's hidden trailing scratch
pointers included) and the grid as a product of run-time sizes and constants; ``kernels/index.json`` lists them per
target. ``export/aot.py`` writes these files; the C launcher, the TensorRT plugin (``export/tensorrt_engine.py``) and
the cuda-python launcher (``runtime/cuda_kernels.py``) read them through :func:`load_kernel` and
:func:`load_kernel_index`. Torch-free (json, re and struct only).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrimeter.artefact.jsonfields import JsonField

__all__ = [
    "KernelError",
    "KernelIndex",
    "KernelIndexEntry",
    "KernelMeta",
    "KernelParam",
    "cubin_arch",
    "load_kernel",
    "load_kernel_index",
    "ptx_entry",
    "ptx_header",
]

_EM_CUDA = 190


class KernelError(ValueError):
    """AOT kernel artefacts that are missing or unusable; the message names the file and what is wrong."""


@dataclass(frozen=True)
class KernelParam:
    """One kernel parameter, in launch order.

    Attributes:
        name: Its name in the Triton kernel (``q_ptr``, ``K``, ``global_scratch``).
        type: ``"*fp32"`` etc. for a pointer, a Triton scalar type (``"i32"``), or ``"scratch"`` for Triton's hidden
            scratch pointers.
        role: ``"input"``, ``"output"`` or ``"scalar"`` (None for scratch pointers and older metadata).
        size: Scratch bytes per program (scratch pointers only; the launchers support 0).
        align: Scratch alignment.
    """

    name: str
    type: str
    role: str | None = None
    size: int = 0
    align: int = 1

    @classmethod
    def from_json(cls, f: JsonField) -> KernelParam:
        """Read and check one entry of ``params``."""
        role, size, align = f.optional("role"), f.optional("size"), f.optional("align")
        return cls(f.key("name").as_str(), f.key("type").as_str(), None if role is None else role.as_str(),
                   0 if size is None else size.as_int(0), 1 if align is None else align.as_int(1))


@dataclass(frozen=True)
class KernelMeta:
    """One compiled kernel for one GPU target, with its artefacts checked to exist and agree.

    Attributes:
        kernel: The kernel's name in the export (``"masked_gem_pool"``, ``"explain"``, ``"explain_weighted"``).
        symbol: The entry name in cubin and PTX.
        target: The GPU target, e.g. ``"sm_90"``.
        cc: Its compute capability as an int (90), equal to the cubin's.
        cubin_path: The cubin.
        ptx_path: The PTX.
        ptx_text: The PTX's text.
        ptx_target: The PTX ``.target`` (``sm_90a`` is arch-specific, ``sm_80`` forward compatible).
        ptx_version: The PTX ISA (``.version``), e.g. ``"8.7"``.
        num_warps: Warps per block.
        num_stages: Software pipelining stages it was compiled with.
        threads: Threads per block (``32 * num_warps``).
        shared_bytes: Dynamic shared memory per block.
        params: Parameters in launch order; as many as the PTX entry declares, scratch pointers last.
        grid_x: Grid x as factors: run-time size names (``"B"``, ``"Q"``, ``"K"``) and integers.
        grid_y: Grid y as integer factors.
        grid_z: Grid z as integer factors.
        constants: The compile-time constants baked in (shapes, strides, p, eps, tile sizes).
        triton_version: The Triton that compiled it.
        json_path: The metadata file.
    """

    kernel: str
    symbol: str
    target: str
    cc: int
    cubin_path: Path
    ptx_path: Path
    ptx_text: str
    ptx_target: str
    ptx_version: str
    num_warps: int
    num_stages: int
    threads: int
    shared_bytes: int
    params: tuple[KernelParam, ...]
    grid_x: tuple[str | int, ...]
    grid_y: tuple[int, ...]
    grid_z: tuple[int, ...]
    constants: Mapping[str, Any]
    triton_version: str
    json_path: Path


def cubin_arch(data: bytes) -> int:
    """The SM version a cubin was compiled for, read from its ELF header.

    Args:
        data: The cubin's bytes.

    Returns:
        E.g. 90 for sm_90.

    Raises:
        KernelError: If the bytes are not a 64-bit little-endian CUDA ELF (machine EM_CUDA = 190).
    """
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise KernelError("not a cubin: no 64-bit little-endian ELF header")
    machine, = struct.unpack_from("<H", data, 0x12)
    if machine != _EM_CUDA:
        raise KernelError(f"not a cubin: ELF machine {machine}, expected EM_CUDA ({_EM_CUDA})")
    flags, = struct.unpack_from("<I", data, 0x30)
    # CUDA ELF ABI version (e_ident[8]) 7 keeps the SM in the low byte of e_flags, version 8 (sm_90+) in the next.
    return (flags >> 8) & 0xFF if data[8] >= 8 else flags & 0xFF


def ptx_header(ptx: str) -> tuple[str, str]:
    """The ``.target`` and ``.version`` directives of a PTX module.

    Args:
        ptx: PTX text.

    Returns:
        E.g. ``("sm_90a", "9.4")``.

    Raises:
        KernelError: If either directive is missing.
    """
    target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE)
    version = re.search(r"^\s*\.version\s+([\d.]+)", ptx, re.MULTILINE)
    if target is None or version is None:
        raise KernelError("not PTX: no .target/.version directive")
    return target.group(1), version.group(1)


def ptx_entry(ptx: str, symbol: str) -> tuple[int, int, list[str]]:
    """Where a PTX entry's parameter list lies and what it declares.

    Args:
        ptx: PTX text.
        symbol: The entry's name.

    Returns:
        ``(start, end, declarations)``: the span of the text between the entry's parentheses and its ``.param``
        declarations in order.

    Raises:
        KernelError: If the PTX has no such entry.
    """
    entry = re.search(rf"\.entry\s+{re.escape(symbol)}\s*\((?P<params>[^)]*)\)", ptx)
    if entry is None:
        raise KernelError(f"the PTX has no entry {symbol}")
    declarations = [p.strip() for p in entry.group("params").split(",") if p.strip()]
    return entry.start("params"), entry.end("params"), declarations


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KernelError(f"{what} {path} is unreadable: {e}") from None


def load_kernel(json_path: str | Path) -> KernelMeta:
    """Read a kernel's launch metadata and check that its artefacts are present and well-formed.

    Args:
        json_path: ``EXPORT/kernels/sm_XX/<kernel>.json``.

    Returns:
        The metadata, with the PTX's target and ISA read from the PTX itself.

    Raises:
        KernelError: If the JSON, cubin or PTX is missing or malformed (a missing or mistyped field, a cubin for
            another SM, no ``.entry`` of the symbol, parameters the PTX entry does not declare).
    """
    path = Path(json_path)
    f = JsonField.root(_read_json(path, "kernel metadata"), str(path), KernelError)
    target, symbol = f.key("target").as_str(), f.key("symbol").as_str()
    cubin, ptx = path.parent / f.key("cubin").as_str(), path.parent / f.key("ptx").as_str()
    cc = f.key("cc").as_int(1)
    if not cubin.is_file():
        raise KernelError(f"{cubin} is missing")
    arch = cubin_arch(cubin.read_bytes())
    if arch != cc:
        raise KernelError(f"{cubin} is compiled for sm_{arch}, its metadata says {target}")
    if not ptx.is_file():
        raise KernelError(f"{ptx} is missing")
    text = ptx.read_text()
    try:
        declared = len(ptx_entry(text, symbol)[2])
        ptx_target, ptx_version = ptx_header(text)
    except KernelError as e:
        raise KernelError(f"{ptx}: {e}") from None
    params = tuple(KernelParam.from_json(p) for p in f.key("params").items())
    scratch = [p for p in params if p.type == "scratch"]
    if scratch and list(params[-len(scratch):]) != scratch:
        raise KernelError(f"{path}: the scratch parameters must come last")
    if declared != len(params):
        raise KernelError(f"{path} lists {len(params)} parameters, the PTX entry declares {declared}")
    grid = f.key("grid")
    grid_x = tuple(g.as_str() if isinstance(g.value, str) else g.as_int(1) for g in grid.key("x").items())
    grid_y, grid_z = (() if grid.optional(axis) is None else tuple(g.as_int(1) for g in grid.key(axis).items())
                      for axis in ("y", "z"))
    stages, triton = f.optional("num_stages"), f.optional("triton_version")
    constants = f.optional("constants")
    return KernelMeta(kernel=f.key("kernel").as_str(), symbol=symbol, target=target, cc=cc, cubin_path=cubin,
                      ptx_path=ptx, ptx_text=text, ptx_target=ptx_target, ptx_version=ptx_version,
                      num_warps=f.key("num_warps").as_int(1), num_stages=1 if stages is None else stages.as_int(1),
                      threads=f.key("threads").as_int(1), shared_bytes=f.key("shared_bytes").as_int(0),
                      params=params, grid_x=grid_x, grid_y=grid_y, grid_z=grid_z,
                      constants={} if constants is None else constants.as_dict(),
                      triton_version="" if triton is None else triton.as_str(), json_path=path)


# --------------------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class KernelIndexEntry:
    """One kernel of one target in ``kernels/index.json``.

    Attributes:
        json: Its metadata file, relative to the kernels folder (``sm_90/explain.json``).
        symbol: Entry name.
        shared_bytes: Dynamic shared memory per block.
        threads: Threads per block.
    """

    json: str
    symbol: str
    shared_bytes: int
    threads: int

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        return {"json": self.json, "symbol": self.symbol, "shared_bytes": self.shared_bytes, "threads": self.threads}


@dataclass(frozen=True)
class KernelIndex:
    """``kernels/index.json``: every compiled kernel, per GPU target.

    Attributes:
        targets: ``{target: {kernel: entry}}``, e.g. ``{"sm_80": {"explain": ...}}``.
        triton_version: The Triton that compiled them.
    """

    targets: Mapping[str, Mapping[str, KernelIndexEntry]]
    triton_version: str | None = None

    @classmethod
    def from_json(cls, doc: Any, where: str) -> KernelIndex:
        """Read and check a parsed index.

        Raises:
            KernelError: A missing or mistyped field (named).
        """
        f = JsonField.root(doc, where, KernelError)
        targets = {
            target: {kernel: KernelIndexEntry(e.key("json").as_str(), e.key("symbol").as_str(),
                                              e.key("shared_bytes").as_int(0), e.key("threads").as_int(1))
                     for kernel, e in kernels.members()}
            for target, kernels in f.key("targets").members()}
        triton = f.optional("triton_version")
        return cls(targets, None if triton is None else triton.as_str())

    def to_json(self) -> dict[str, Any]:
        """The JSON object."""
        targets = {t: {k: e.to_json() for k, e in kernels.items()} for t, kernels in self.targets.items()}
        out: dict[str, Any] = {"targets": targets}
        if self.triton_version is not None:
            out["triton_version"] = self.triton_version
        return out


def load_kernel_index(path: str | Path) -> KernelIndex:
    """Read ``kernels/index.json``.

    Args:
        path: The index file.

    Returns:
        The index.

    Raises:
        KernelError: The file is missing, not JSON, or lacks a field.
    """
    path = Path(path)
    return KernelIndex.from_json(_read_json(path, "the kernel index"), str(path))
