"""The AOT pooling kernel as TensorRT's AOT Python plugin takes it (docs/architecture.md §4, §5).

Pure Python, no TensorRT: reading and checking the per-kernel JSON the AOT step wrote
(:func:`load_plugin_kernel`), picking the kernel for a GPU (:func:`kernel_json_for_device`), and matching the PTX
ISA to the CUDA driver that will JIT-compile it (:func:`plugin_ptx_version`). The engine build that hands the kernel
to TensorRT is :mod:`attrimeter.export.tensorrt_engine`.

Triton >= 3.3 appends ``global_scratch`` and (>= 3.5) ``profile_scratch`` pointer parameters to every kernel.
TensorRT only passes inputs, extra args and outputs; per Torch-TensorRT's Triton AOT path it pads the missing
trailing slots with null, but that is not in TensorRT's own documentation, so this module removes the two unused
trailing ``.param`` declarations from the PTX entry (after checking the body never reads them): the launch ABI is
then exactly what TensorRT passes, whichever TensorRT version builds it.
https://github.com/pytorch/TensorRT/blob/main/py/torch_tensorrt/kernels/_triton.py
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrimeter.artefact.contract import KERNELS_DIR, POOL_KERNEL, TRITON_DTYPES
from attrimeter.artefact.kernels import KernelError, load_kernel, ptx_entry

__all__ = [
    "KERNEL_JSON_NAME",
    "PLUGIN_PTX_CAP",
    "PluginKernel",
    "driver_ptx",
    "kernel_json_for_device",
    "load_plugin_kernel",
    "plugin_ptx_version",
    "ptx_driver",
    "ptx_portable_to",
    "sm_name",
]

_LOG = logging.getLogger(__name__)

KERNEL_JSON_NAME = f"{POOL_KERNEL}.json"
"""File name of the pooling kernel's metadata in ``EXPORT/kernels/sm_XX/``."""

_N_INPUTS, _N_OUTPUTS = 4, 2  # F, Z, scale, shift -> f, f_k
# Oldest CUDA driver (cuDriverGetVersion) that JIT-compiles each PTX ISA where the rule "8.x -> CUDA 12.x, 9.x ->
# 13.x" does not hold: the PTX ISA release history
# (https://docs.nvidia.com/cuda/parallel-thread-execution/#release-notes-ptx-release-history; the same table as
# cuda-python's get_minimal_required_cuda_ver_from_ptx_ver).
_PTX_ISA_DRIVER = {"8.6": 12070, "8.7": 12080, "8.8": 12090}
# Highest PTX ISA given to TensorRT by default: every target here (<= sm_90) needs no more, and Triton 3.9's bundled
# ptxas assembles it.
PLUGIN_PTX_CAP = "9.0"


@dataclass(frozen=True)
class PluginKernel:
    """The AOT kernel as TensorRT gets it: validated metadata plus the PTX with Triton's hidden parameters removed.

    Attributes:
        symbol: PTX entry name.
        target: GPU target the JSON was written for, e.g. ``"sm_90"``.
        cc: Its compute capability as an int (90).
        ptx: PTX text handed to TensorRT.
        ptx_target: The PTX ``.target`` (``sm_90a`` is arch-specific, ``sm_80`` is forward compatible).
        ptx_version: The PTX ISA version (``.version``); the driver must support it.
        dtype: Element type of every tensor parameter (``"fp32"`` or ``"fp16"``).
        num_warps: Warps per block (block x = 32 * num_warps).
        shared_bytes: Dynamic shared memory per block.
        grid_x: Grid x as factors: run-time size names (only ``"B"``) and integers.
        grid_y: Grid y as an integer.
        grid_z: Grid z as an integer.
        constants: Compile-time constants baked into the kernel.
        json_path: Where the metadata came from.
    """

    symbol: str
    target: str
    cc: int
    ptx: str
    ptx_target: str
    ptx_version: str
    dtype: str
    num_warps: int
    shared_bytes: int
    grid_x: tuple[str | int, ...]
    grid_y: int
    grid_z: int
    constants: dict[str, Any]
    json_path: Path


def sm_name(cc: int) -> str:
    """The target name of a compute capability.

    Args:
        cc: Compute capability as an int, e.g. 90.

    Returns:
        E.g. ``"sm_90"``.
    """
    return f"sm_{cc}"


def ptx_portable_to(ptx_target: str, cc: int) -> bool:
    """Whether the driver may JIT PTX of ``ptx_target`` for a ``cc`` GPU.

    PTX for a plain ``sm_XY`` target is forward compatible (any GPU with cc >= XY); an arch-specific ``sm_XYa`` target
    (what Triton emits for cc >= 90) runs only on exactly that cc.

    Args:
        ptx_target: The PTX ``.target``, e.g. ``"sm_80"`` or ``"sm_90a"``.
        cc: The GPU's compute capability as an int.

    Returns:
        True when the PTX may run on that GPU.
    """
    match = re.fullmatch(r"sm_(\d+)([a-z]?)", ptx_target)
    if match is None:
        return False
    ptx_cc, suffix = int(match.group(1)), match.group(2)
    return ptx_cc == cc if suffix else ptx_cc <= cc


def _strip_hidden_params(ptx: str, symbol: str, n_visible: int) -> str:
    """Remove the parameters after the first ``n_visible`` (Triton's scratch pointers) from the PTX entry.

    TensorRT launches the AOT kernel with (inputs, extra args, outputs) only. The scratch parameters are never read
    when their size is 0; this is checked on the PTX text, so the rewrite cannot change what the kernel computes.
    """
    start, end, declared = ptx_entry(ptx, symbol)
    body = ptx[:start] + ptx[end:]
    for decl in declared[n_visible:]:
        name = decl.split()[-1]
        if re.search(rf"\b{re.escape(name)}\b", body):
            raise ValueError(f"PTX entry {symbol!r} reads its hidden parameter {name}; TensorRT passes no such "
                             "argument (recompile so that it needs no Triton scratch memory)")
    return ptx[:start] + "\n\t" + ",\n\t".join(declared[:n_visible]) + "\n" + ptx[end:]


def load_plugin_kernel(kernel_json: Path) -> PluginKernel:
    """Read and check the per-kernel JSON and its PTX.

    Args:
        kernel_json: ``EXPORT/kernels/sm_XX/masked_gem_pool.json``.

    Returns:
        The kernel as TensorRT's AOT plugin takes it.

    Raises:
        ValueError: The metadata does not describe a kernel TensorRT can launch (scalar parameters, non-zero Triton
            scratch memory, mixed dtypes, PTX that disagrees with the JSON).
    """
    kernel_json = Path(kernel_json)
    meta = load_kernel(kernel_json)  # files present, cubin arch, PTX entry and its parameter count
    where = str(kernel_json)
    params = meta.params
    tensors = [p for p in params if p.type.startswith("*")]
    hidden = params[len(tensors):]
    roles = [p.role for p in tensors]
    if any(roles) and roles != ["input"] * _N_INPUTS + ["output"] * _N_OUTPUTS:
        raise ValueError(f"{where}: TensorRT passes {_N_INPUTS} inputs then {_N_OUTPUTS} outputs; the kernel's pointer "
                         f"roles are {roles}")
    if list(params[:len(tensors)]) != tensors or len(tensors) != _N_INPUTS + _N_OUTPUTS:
        raise ValueError(f"{where}: expected {_N_INPUTS} input and {_N_OUTPUTS} output pointers first, then only "
                         f"Triton's scratch pointers; got {[p.name + ':' + p.type for p in params]} (TensorRT "
                         "passes inputs, SymInt32 extra args, outputs; this kernel must take no scalars)")
    for p in hidden:
        if p.type != "scratch" or p.size != 0:
            raise ValueError(f"{where}: parameter {p.name} ({p.type}, size {p.size}) needs memory that "
                             "TensorRT's AOT launch cannot provide; only zero-sized Triton scratch is supported")
    dtypes = {p.type[1:] for p in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in TRITON_DTYPES.values():
        raise ValueError(f"{where}: tensor parameters must all be one of {sorted(TRITON_DTYPES.values())}, got "
                         f"{dtypes}")
    if meta.threads != 32 * meta.num_warps:
        raise ValueError(f"{where}: threads {meta.threads} != 32 * num_warps ({meta.num_warps})")
    constants = dict(meta.constants)
    grid_x: list[str | int] = []
    for factor in meta.grid_x:
        if isinstance(factor, int):
            grid_x.append(factor)
        elif factor == "B":
            grid_x.append("B")
        elif isinstance(constants.get(factor), int):
            grid_x.append(int(constants[factor]))
        else:
            raise ValueError(f"{where}: grid factor {factor!r} is neither an int, 'B' nor an int constant")
    if grid_x.count("B") > 1:
        raise ValueError(f"{where}: grid x names the batch more than once: {list(meta.grid_x)}")

    ptx = _strip_hidden_params(meta.ptx_text, meta.symbol, len(tensors))
    return PluginKernel(symbol=meta.symbol, target=meta.target, cc=meta.cc, ptx=ptx, ptx_target=meta.ptx_target,
                        ptx_version=meta.ptx_version, dtype=next(iter(dtypes)), num_warps=meta.num_warps,
                        shared_bytes=meta.shared_bytes, grid_x=tuple(grid_x), grid_y=math.prod(meta.grid_y),
                        grid_z=math.prod(meta.grid_z), constants=constants, json_path=kernel_json)


def kernel_json_for_device(export_dir: Path, cc: int, *, max_shared_bytes: int | None = None) -> Path:
    """The kernel JSON to use on a GPU of compute capability ``cc``.

    ``EXPORT/kernels/sm_{cc}/masked_gem_pool.json`` when it exists. Otherwise the highest lower target of the same
    major version, but only where PTX JIT makes that legal: its PTX ``.target`` must be a plain ``sm_XY`` (forward
    compatible) and not an arch-specific ``sm_XYa`` (Triton emits those for cc >= 90, so Hopper/Blackwell kernels
    never fall back), and its shared memory must fit ``max_shared_bytes`` when given (e.g. an sm_80 kernel tuned for
    A100's 163 KB does not fit an sm_86/sm_89 GPU's 99 KB).

    Args:
        export_dir: The export folder (holds ``kernels/sm_XX/``).
        cc: Compute capability as an int, e.g. 90 for sm_90.
        max_shared_bytes: The GPU's opt-in shared memory per block, if known.

    Returns:
        Path of the kernel JSON.

    Raises:
        ValueError: No usable kernel; names the available targets and how to add one.
    """
    kernels = Path(export_dir) / KERNELS_DIR
    exact = kernels / sm_name(cc) / KERNEL_JSON_NAME
    if exact.is_file():
        return exact
    available = sorted((int(m.group(1)) for d in kernels.glob("sm_*")
                        if (m := re.fullmatch(r"sm_(\d+)", d.name)) and (d / KERNEL_JSON_NAME).is_file()),
                       reverse=True)
    rejected: list[str] = []
    for candidate in available:
        if candidate > cc or candidate // 10 != cc // 10:
            continue
        path = kernels / sm_name(candidate) / KERNEL_JSON_NAME
        try:
            meta = load_kernel(path)
        except KernelError as e:
            rejected.append(f"{sm_name(candidate)} ({e})")
            continue
        ptx_target = meta.ptx_target
        if not ptx_portable_to(ptx_target, cc):
            rejected.append(f"{sm_name(candidate)} (PTX .target {ptx_target} is arch-specific)")
        elif max_shared_bytes is not None and meta.shared_bytes > max_shared_bytes:
            rejected.append(f"{sm_name(candidate)} (needs {meta.shared_bytes} B shared memory, GPU has "
                            f"{max_shared_bytes} B)")
        else:
            _LOG.warning("no kernel for %s; using the %s PTX through driver JIT", sm_name(cc), sm_name(candidate))
            return path
    names = ", ".join(sm_name(c) for c in sorted(available)) or "none"
    why = f"; not usable: {', '.join(rejected)}" if rejected else ""
    raise ValueError(f"no masked_gem_pool kernel for {sm_name(cc)} in {kernels} (available: {names}{why}); "
                     f"add one with `attrimeter export ... --targets {sm_name(cc)}` on any machine (the AOT step needs "
                     "no GPU)")


def ptx_driver(isa: str) -> int:
    """The oldest CUDA driver (``cuDriverGetVersion`` units) that JIT-compiles PTX ISA ``isa``.

    Args:
        isa: PTX ISA version as the ``.version`` directive writes it, e.g. ``"8.8"``.

    Returns:
        E.g. 12090 for "8.8" (CUDA 12.9), 13040 for "9.4".
    """
    if isa in _PTX_ISA_DRIVER:
        return _PTX_ISA_DRIVER[isa]
    major, minor = (int(v) for v in isa.split(".")[:2])
    return (major + 4) * 1000 + 10 * minor  # ISA 8.x shipped with CUDA 12.x, 9.x with 13.x


def _isa_key(isa: str) -> tuple[int, ...]:
    return tuple(int(v) for v in isa.split("."))


def plugin_ptx_version(requested: str | None, driver: int) -> str:
    """The PTX ISA for a plugin engine's kernels on this driver.

    Args:
        requested: The ISA asked for (``--ptx-version``), or None for the default: the newest this driver
            JIT-compiles, capped at :data:`PLUGIN_PTX_CAP`.
        driver: ``cuDriverGetVersion`` of the GPU the engine is built on.

    Returns:
        The ISA, e.g. ``"8.4"``.

    Raises:
        ValueError: If the driver predates CUDA 12.0, or ``requested`` is newer than the driver JIT-compiles.
    """
    newest = driver_ptx(driver)
    if newest is None:
        raise ValueError(f"this CUDA driver ({driver // 1000}.{driver % 1000 // 10}) is older than CUDA 12.0, "
                         "which the AOT kernels need: update the driver or use --flavor portable")
    if requested is None:
        return min(newest, PLUGIN_PTX_CAP, key=_isa_key)
    if _isa_key(requested) > _isa_key(newest):
        raise ValueError(f"--ptx-version {requested} is newer than this driver JIT-compiles ({newest})")
    return requested


def driver_ptx(driver: int) -> str | None:
    """The newest PTX ISA a driver JIT-compiles, as ``--ptx-version`` takes it.

    Args:
        driver: ``cuDriverGetVersion``, e.g. 12040.

    Returns:
        E.g. "8.4" for 12040; None for drivers older than CUDA 12.0 (ISA 8.0), which these kernels do not support.
    """
    isas = [f"8.{n}" for n in range(9)] + [f"9.{n}" for n in range(10)]  # 8.8 was the last 8.x ISA
    usable = [isa for isa in isas if ptx_driver(isa) <= driver]
    return max(usable, key=_isa_key) if usable else None
