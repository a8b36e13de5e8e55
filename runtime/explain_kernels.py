"""The AOT explain kernels as the cuda-python launcher binds them: metadata checked, arguments packed, target chosen.

Pure Python (cuda-python is imported only to pack arguments): :func:`load_explain_kernel` reads a kernel's launch
metadata (:mod:`attrimeter.artefact.kernels`) and checks that :class:`~attrimeter.runtime.cuda_kernels.CudaExplainer`
can bind every parameter; :func:`choose_target` picks the export's GPU target for a device (docs/architecture.md §4).

Target choice (the same policy as the C launcher in ``export/csrc/``): the device's own ``sm_XY``; otherwise, for
compute capability major < 9, the highest ``sm_XZ`` with Z < Y whose kernels' shared memory fits the device (a cubin
runs on later minor versions of its major, e.g. sm_80 on an sm_86 A10). Triton compiles sm_90 and later for the
arch-specific ``sm_90a`` / ``sm_100a``, which run on that one compute capability only.

``cuLaunchKernel`` takes ``kernelParams`` as ``(values, types)``, where a ``None`` type passes an object with
``getPtr()`` (a ``CUdeviceptr``) and a ctypes type passes a scalar of that type (cuda-bindings 12.9 and 13.x: the
kernel-parameter packing of ``cuda/bindings/_lib/utils.pxi``, ``_HelperKernelParams``).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrimeter.artefact.kernels import KernelIndex, load_kernel
from attrimeter.runtime.errors import InputError

__all__ = ["EXPLAIN_KERNELS", "INT32_MAX", "ExplainKernel", "choose_target", "load_explain_kernel"]

# The unweighted and the attribute-weighted variant of attr_distance's _explain_kernel (export/aot.py KERNELS).
EXPLAIN_KERNELS = ("explain", "explain_weighted")
# CUDA's largest grid x, and the largest gallery the kernels' int32 row count addresses.
INT32_MAX = 2**31 - 1
# Kernel JSON scalar types -> ctypes (Triton's signature names).
_SCALARS: dict[str, Any] = {
    "i1": ctypes.c_bool, "i8": ctypes.c_int8, "u8": ctypes.c_uint8, "i16": ctypes.c_int16, "u16": ctypes.c_uint16,
    "i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64, "u64": ctypes.c_uint64,
    "fp32": ctypes.c_float, "fp64": ctypes.c_double,
}  # fmt: skip
# What the explain kernel's parameters are bound to: device buffers and run-time scalars (export/aot.py kernel_specs).
_POINTERS = ("q_ptr", "g_ptr", "ids_ptr", "w_ptr", "d_ptr", "dk_ptr", "sh_ptr", "dhat_ptr", "score_ptr", "err_ptr")
_SIZES = ("K", "N", "stride_iq")
# Element types the launcher passes: fp32 queries, the fp16 gallery, int64 ids, fp32 weights and outputs, int32 count.
_POINTER_TYPES = {"q_ptr": "*fp32", "g_ptr": "*fp16", "ids_ptr": "*i64", "w_ptr": "*fp32", "d_ptr": "*fp32",
                  "dk_ptr": "*fp32", "sh_ptr": "*fp32", "dhat_ptr": "*fp32", "score_ptr": "*fp32", "err_ptr": "*i32"}


@dataclass(frozen=True)
class ExplainKernel:
    """One AOT explain kernel as the launcher needs it.

    Attributes:
        name: ``"explain"`` or ``"explain_weighted"``.
        symbol: Entry name in the cubin.
        target: GPU target of the cubin, e.g. ``"sm_80"``.
        cubin: The cubin's bytes.
        threads: Threads per block.
        shared_bytes: Dynamic shared memory per block.
        params: The parameters in launch order: ``(name, type)`` with type ``"*fp32"`` etc. for pointers, a Triton
            scalar type (``"i32"``) or ``"scratch"`` for Triton's hidden scratch pointers (passed as null).
        grid_x: Grid x as factors: run-time size names (``"Q"``, ``"K"``) and integers.
        constants: Compile-time constants (``C``, ``M``, strides, ``HAS_W``).
        json_path: Where the metadata came from.
    """

    name: str
    symbol: str
    target: str
    cubin: bytes
    threads: int
    shared_bytes: int
    params: tuple[tuple[str, str], ...]
    grid_x: tuple[str | int, ...]
    constants: dict[str, Any]
    json_path: Path

    def grid(self, sizes: Mapping[str, int]) -> int:
        """Grid x for run-time ``sizes`` (e.g. ``{"Q": 4, "K": 10}``).

        Raises:
            InputError: The grid exceeds CUDA's 2^31 - 1 blocks.
        """
        blocks = math.prod(int(f) if isinstance(f, int) else int(sizes[f]) for f in self.grid_x)
        if blocks > INT32_MAX:
            raise InputError(f"{self.name}: {dict(sizes)} gives {blocks} thread blocks, more than CUDA's 2^31-1; "
                             "split the request")
        return blocks

    def arguments(self, pointers: Mapping[str, int], scalars: Mapping[str, int]) -> tuple[tuple[Any, ...],
                                                                                        tuple[Any, ...]]:
        """``kernelParams`` for ``cuLaunchKernel`` in the metadata's parameter order.

        Args:
            pointers: Device address of each pointer parameter by name.
            scalars: Value of each scalar parameter by name.

        Returns:
            ``(values, types)``: pointers as ``CUdeviceptr`` with type None, scalars as instances of their ctypes
            type, Triton's scratch pointers as a null ``CUdeviceptr``.
        """
        from cuda.bindings import driver as drv

        values: list[Any] = []
        types: list[Any] = []
        for name, kind in self.params:
            if kind.startswith("*"):
                values.append(drv.CUdeviceptr(int(pointers[name])))
                types.append(None)
            elif kind == "scratch":
                values.append(drv.CUdeviceptr(0))  # size 0 in these kernels (checked when loaded): never read
                types.append(None)
            else:
                ctype = _SCALARS[kind]
                values.append(ctype(int(scalars[name])))
                types.append(ctype)
        return tuple(values), tuple(types)


def load_explain_kernel(json_path: str | Path) -> ExplainKernel:
    """Read an explain kernel's metadata and cubin and check that this launcher can bind every parameter.

    Args:
        json_path: ``EXPORT/kernels/sm_XX/explain[_weighted].json``.

    Returns:
        The kernel.

    Raises:
        ValueError: Missing or malformed artefacts, a parameter this launcher does not know, a pointer of another
            element type than it passes, Triton scratch memory of non-zero size, or a grid factor it cannot size.
    """
    path = Path(json_path)
    meta = load_kernel(path)  # files present, cubin arch, PTX entry and its parameter count
    params = []
    for p in meta.params:
        if p.type == "scratch":
            if p.size != 0:
                raise ValueError(f"{path}: {p.name} needs {p.size} B of Triton scratch memory per program, which "
                                 "this launcher does not allocate")
        elif p.type.startswith("*"):
            if p.name not in _POINTERS:
                raise ValueError(f"{path}: unknown pointer parameter {p.name!r} (known: {', '.join(_POINTERS)})")
            if p.type != _POINTER_TYPES[p.name]:
                raise ValueError(f"{path}: {p.name} is {p.type}, the launcher passes {_POINTER_TYPES[p.name]}")
        elif p.name not in _SIZES or p.type not in _SCALARS:
            raise ValueError(f"{path}: unknown scalar parameter {p.name!r} of type {p.type!r} (known: "
                             f"{', '.join(_SIZES)})")
        params.append((p.name, p.type))
    if any(v != 1 for v in (*meta.grid_y, *meta.grid_z)):
        raise ValueError(f"{path}: grid y/z must be 1, got {list(meta.grid_y)} / {list(meta.grid_z)}")
    if not {f for f in meta.grid_x if isinstance(f, str)} <= {"Q", "K"}:
        raise ValueError(f"{path}: grid x {list(meta.grid_x)} names sizes other than Q and K")
    return ExplainKernel(name=meta.kernel, symbol=meta.symbol, target=meta.target, cubin=meta.cubin_path.read_bytes(),
                         threads=meta.threads, shared_bytes=meta.shared_bytes, params=tuple(params),
                         grid_x=meta.grid_x, constants=dict(meta.constants), json_path=path)


def choose_target(index: KernelIndex, cc: int, max_shared_optin: int,
                  kernels: tuple[str, ...] = EXPLAIN_KERNELS) -> str:
    """The export target whose cubins run on a GPU of compute capability ``cc``.

    Args:
        index: The export's ``kernels/index.json``.
        cc: Compute capability as an int (86 for sm_86).
        max_shared_optin: The device's opt-in shared memory per block.
        kernels: The kernels that must be present (and fit) in the target.

    Returns:
        E.g. ``"sm_80"``.

    Raises:
        ValueError: No target fits; names the export's targets, why each is unusable and how to add one.
    """
    targets = {t: k for t, k in index.targets.items() if all(name in k for name in kernels)}
    own = f"sm_{cc}"
    if own in targets:
        return own
    major, minor = divmod(cc, 10)
    rejected = []
    candidates = []
    for target in targets:
        digits = target.removeprefix("sm_")
        if not digits.isdigit() or int(digits) // 10 != major or int(digits) % 10 >= minor:
            continue
        if major >= 9:
            rejected.append(f"{target} (compiled for the arch-specific {target}a, which runs on compute capability "
                            f"{major}.{int(digits) % 10} only)")
            continue
        largest = max(targets[target][name].shared_bytes for name in kernels)
        if largest > max_shared_optin:
            rejected.append(f"{target} (needs {largest} B shared memory per block, the device allows "
                            f"{max_shared_optin} B)")
        else:
            candidates.append(int(digits))
    if candidates:
        return f"sm_{max(candidates)}"
    have = ", ".join(sorted(targets)) or "none"
    why = f"; not usable: {'; '.join(rejected)}" if rejected else ""
    raise ValueError(f"no explain kernels for {own} in this export (compiled for: {have}{why}); re-export with the "
                     f"target added: `attrimeter export ... --targets {own}` (the AOT step needs no GPU)")
