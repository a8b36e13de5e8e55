"""Ahead-of-time compilation of the Triton kernels for named GPU targets, with their launch metadata (DESIGN §5).

For an export (its C, h·w, M, p, eps and dtype) each kernel is compiled with every shape, stride and scalar baked in
as a compile-time constant, so that a launch needs only pointers (and, for the explain kernel, the run-time sizes
K and N). Each target gets ``kernels/sm_XX/<kernel>.cubin``, ``.ptx`` and ``.json``; the JSON is what a launcher
needs without torch or triton: the entry symbol, threads per block, dynamic shared memory, the parameter list in
order (Triton's hidden trailing ``global_scratch`` and ``profile_scratch`` pointers included) and the grid as a
product of run-time sizes and a constant. ``kernels/index.json`` lists them all.

Cross-compiling needs no GPU and no driver: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` with
Triton's bundled ptxas (Triton's ``triton.tools.compile`` CLI, by contrast, asks the driver for the target). The
compilation runs in a child process, because a process that imported the kernels under ``TRITON_INTERPRET=1`` holds
interpreter functions, not compilable ones.

Block sizes: the first candidate (largest tiles first) whose shared memory fits the target's per-block limit is
kept; e.g. the fp32 pooling tile of 122,880 bytes fits sm_80/87/90 but not sm_89 (99 KB), which gets a smaller one.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from attrimeter.export.manifest import sha256_file

__all__ = [
    "DEFAULT_TARGETS", "KERNELS", "TARGETS", "AotError", "compile_kernels", "cubin_arch", "kernel_specs",
    "launch_table",
    "load_kernel",
]

# Maximum dynamic shared memory per block (opt-in), bytes, from the CUDA programming guide's per-architecture table.
TARGETS: dict[str, int] = {"sm_80": 166912, "sm_86": 101376, "sm_87": 166912, "sm_89": 101376, "sm_90": 232448}
DEFAULT_TARGETS = ("sm_80", "sm_87", "sm_89", "sm_90")
KERNELS = ("masked_gem_pool", "explain", "explain_weighted")
INDEX_NAME = "index.json"
LAUNCH_TABLE = "launch.txt"
_EM_CUDA = 190
_TRITON_DTYPES = {"float32": "fp32", "float16": "fp16"}


class AotError(RuntimeError):
    """Ahead-of-time compilation failed or its artefacts are unusable; the message names the kernel and target."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def kernel_specs(channels: int, hw: int, num_attributes: int, p: float, eps: float, dtype: str,
                 pool_max_shared: int | None = None) -> list[dict[str, Any]]:
    """What to compile for one export: kernel, constants, pointer dtypes, run-time sizes, grid and tile candidates.

    Args:
        channels: C of the feature map.
        hw: h·w of the feature map.
        num_attributes: M.
        p: GeM exponent.
        eps: GeM clamp floor.
        dtype: The export's float dtype, ``"float32"`` or ``"float16"`` (the pooling's inputs and outputs).
        pool_max_shared: Cap on the pooling kernel's shared memory below the target's own limit, e.g. 48 KiB for
            launchers that cannot opt a kernel into more (TensorRT's AOT plugins: no documented opt-in).

    Returns:
        JSON-serialisable specs, one per kernel of :data:`KERNELS`.
    """
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"dtype must be one of {list(_TRITON_DTYPES)}, got {dtype!r}")
    C, M = channels, num_attributes
    t = _TRITON_DTYPES[dtype]
    p_int = int(p) if p in (1.0, 2.0, 3.0, 4.0) else 0
    pool = {
        "kernel": "masked_gem_pool", "module": "attrimeter.kernels.masked_gem_pool",
        "function": "_masked_gem_pool_fwd_kernel",
        "pointers": {"f_ptr": t, "z_ptr": t, "scale_ptr": t, "shift_ptr": t, "out_g_ptr": t, "out_k_ptr": t},
        "roles": {"f_ptr": "input", "z_ptr": "input", "scale_ptr": "input", "shift_ptr": "input",
                  "out_g_ptr": "output", "out_k_ptr": "output"},
        "scalars": {},
        "constants": {
            "C": C, "HW": hw, "M": M, "stride_fb": C * hw, "stride_fc": hw, "stride_fhw": 1, "stride_zb": M * hw,
            "stride_zm": hw, "stride_zhw": 1, "stride_gb": C, "stride_gc": 1, "stride_kb": M * C, "stride_km": C,
            "stride_kc": 1, "p": float(p), "inv_p": 1.0 / float(p), "eps": float(eps), "eps_p": float(eps) ** float(p),
            "mean_ptr": None, "P_INT": p_int, "M_PAD": max(16, _next_pow2(M + 1)), "HAS_AFFINE": True,
            "SAVE_MEAN": False, "DOT_PRECISION": "ieee" if dtype == "float32" else "tf32",
        },
        # (BLOCK_C, BLOCK_HW, num_warps, num_stages), largest first; blocks past the problem only add masked work.
        "candidates": [c for c in ((128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
                                   (64, 32, 4, 2), (32, 32, 4, 2))
                       if c[0] <= max(16, _next_pow2(C)) and c[1] <= max(16, _next_pow2(hw))]
                      or [(32, 32, 4, 2)],
        "block_names": ["BLOCK_C", "BLOCK_HW"],
        "max_shared": pool_max_shared,
        "grid": {"x": ["B", "cdiv(C, BLOCK_C)"]},
    }  # fmt: skip
    specs = [pool]
    for name, weighted in (("explain", False), ("explain_weighted", True)):
        block_r = _next_pow2(M + 1)
        pointers = {"q_ptr": "fp32", "g_ptr": "fp16", "ids_ptr": "i64", "w_ptr": "fp32", "d_ptr": "fp32",
                    "dk_ptr": "fp32", "sh_ptr": "fp32", "dhat_ptr": "fp32", "score_ptr": "fp32", "err_ptr": "i32"}
        roles = {k: ("output" if k in ("d_ptr", "dk_ptr", "sh_ptr", "dhat_ptr", "score_ptr", "err_ptr") else "input")
                 for k in pointers}
        constants: dict[str, Any] = {
            "C": C, "M": M, "stride_qq": (M + 1) * C, "stride_qr": C, "stride_qc": 1, "stride_gn": (M + 1) * C,
            "stride_gr": C, "stride_gc": 1, "stride_ik": 1, "BLOCK_R": block_r, "HAS_W": weighted,
        }
        if not weighted:
            del pointers["w_ptr"], roles["w_ptr"]
            constants["w_ptr"] = None
        specs.append({
            "kernel": name, "module": "attrimeter.kernels.attr_distance", "function": "_explain_kernel",
            "pointers": pointers, "roles": roles,
            # K ids per query, N gallery rows, and the ids' row stride (= K for a contiguous [Q, K] array).
            "scalars": {"K": "i32", "N": "i32", "stride_iq": "i32"},
            "constants": constants,
            "candidates": [(min(128, max(16, _next_pow2(C))), 0, 4 if block_r <= 32 else 8, 1)],
            "block_names": ["BLOCK_C"],
            "max_shared": None,
            "grid": {"x": ["Q", "K"]},
        })
    return specs


def _compile_one(spec: dict[str, Any], target: str) -> tuple[dict[str, Any], bytes, str]:
    """Compile one spec for one target (in the child process): the first candidate that fits wins."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    cc = int(target.removeprefix("sm_"))
    module = importlib.import_module(spec["module"])
    fn = getattr(module, spec["function"])
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn  # the jitted function under an autotuner
    limit = min(TARGETS[target], spec["max_shared"] or TARGETS[target])
    tried = []
    for cand in spec["candidates"]:
        blocks = dict(zip(spec["block_names"], cand[:len(spec["block_names"])], strict=True))
        consts = {**spec["constants"], **blocks}
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts or fn.params[i].is_constexpr:
                signature[name] = "constexpr"
            elif name in spec["pointers"]:
                signature[name] = "*" + spec["pointers"][name]
                attrs[(i,)] = [["tt.divisibility", 16]]  # the runtime allocates 16-byte-aligned buffers
            elif name in spec["scalars"]:
                signature[name] = spec["scalars"][name]
            else:
                raise AotError(f"{spec['kernel']}: parameter {name!r} has no value in the spec")
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": cand[2], "num_stages": cand[3]})
        md = compiled.metadata
        tried.append(f"{blocks} warps={cand[2]} stages={cand[3]}: {md.shared} B")
        if md.shared > limit:
            continue
        if md.global_scratch_size or md.profile_scratch_size:
            raise AotError(f"{spec['kernel']} ({target}) needs Triton scratch memory, which the launchers do not "
                           "allocate")
        params = [{"name": name, "type": signature[name], "role": spec["roles"].get(name, "scalar")}
                  for name in fn.arg_names if signature[name] != "constexpr"]
        params += [{"name": "global_scratch", "type": "scratch", "size": md.global_scratch_size,
                    "align": md.global_scratch_align},
                   {"name": "profile_scratch", "type": "scratch", "size": md.profile_scratch_size,
                    "align": md.profile_scratch_align}]
        # The grid: run-time size names times the tile count, e.g. x = B * cdiv(C, BLOCK_C).
        grid = []
        for term in spec["grid"]["x"]:
            grid.append(_cdiv(spec["constants"]["C"], blocks["BLOCK_C"]) if term == "cdiv(C, BLOCK_C)" else term)
        ptx = compiled.asm["ptx"]
        meta = {
            "kernel": spec["kernel"], "symbol": md.name, "target": target, "cc": cc,
            "cubin": f"{spec['kernel']}.cubin", "ptx": f"{spec['kernel']}.ptx",
            "num_warps": md.num_warps, "num_stages": cand[3], "threads": md.num_warps * 32,
            "shared_bytes": md.shared, "params": params,
            "grid": {"x": grid, "y": [1], "z": [1]},
            "constants": {k: v for k, v in consts.items() if v is not None},
            "triton_version": triton.__version__,
            "ptx_version": ptx.split(".version", 1)[1].split()[0] if ".version" in ptx else None,
        }
        return meta, compiled.asm["cubin"], ptx
    raise AotError(f"{spec['kernel']}: no tile fits {limit} bytes of shared memory on {target} "
                   f"(tried {'; '.join(tried)})")


def _child(request_path: str) -> None:
    """Child-process entry: compile every (spec, target) of the request into its folder."""
    request = json.loads(Path(request_path).read_text())
    out = Path(request["out"])
    for target in request["targets"]:
        folder = out / target
        folder.mkdir(parents=True, exist_ok=True)
        for spec in request["specs"]:
            meta, cubin, ptx = _compile_one(spec, target)
            (folder / meta["cubin"]).write_bytes(cubin)
            (folder / meta["ptx"]).write_text(ptx)
            (folder / f"{spec['kernel']}.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(f"{target} {spec['kernel']}", flush=True)  # progress for the parent


def compile_kernels(out_dir: str | Path, specs: list[dict[str, Any]], targets: tuple[str, ...] = DEFAULT_TARGETS,
                    timeout: float = 1800.0, progress: bool = False) -> dict[str, Any]:
    """Cross-compile ``specs`` for ``targets`` into ``out_dir/<target>/`` and write ``out_dir/index.json``.

    Args:
        out_dir: The kernels folder (``EXPORT/kernels``).
        specs: From :func:`kernel_specs`.
        targets: GPU targets, names of :data:`TARGETS`.
        timeout: Seconds before the compile is abandoned.
        progress: Show a progress bar (one step per kernel and target).

    Returns:
        The index: Triton version, targets, and per target the kernels with their JSON path and sha256s.

    Raises:
        ValueError: On an unknown target.
        AotError: If Triton is missing or the compilation fails (its output is quoted).
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown GPU targets {unknown or list(targets)}; known: {', '.join(TARGETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    request = out / ".request.json"
    request.write_text(json.dumps({"out": str(out), "targets": list(targets), "specs": specs}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    bar = tqdm(total=len(targets) * len(specs), desc="AOT kernels", unit="kernel", disable=not progress)
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, "-m", "attrimeter.export.aot", str(request)], env=env,
                                stdout=subprocess.PIPE, stderr=errors, text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout or ():
                bar.set_postfix_str(line.strip())
                bar.update()
            returncode = proc.wait()
        finally:
            watchdog.cancel()
            bar.close()
            request.unlink(missing_ok=True)
        errors.seek(0)
        if returncode != 0:
            why = "timed out" if returncode == -9 else "failed"
            tail = errors.read().strip().splitlines()[-15:]
            raise AotError(f"AOT compilation of the Triton kernels {why}:\n" + "\n".join(tail))
    index: dict[str, Any] = {"targets": {}}
    for target in targets:
        entries = {}
        for spec in specs:
            meta = load_kernel(out / target / f"{spec['kernel']}.json")
            index["triton_version"] = meta["triton_version"]
            entries[spec["kernel"]] = {"json": f"{target}/{spec['kernel']}.json", "symbol": meta["symbol"],
                                       "shared_bytes": meta["shared_bytes"], "threads": meta["threads"]}
        index["targets"][target] = entries
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    (out / LAUNCH_TABLE).write_text(launch_table(out, targets, [s["kernel"] for s in specs]))
    return index


def launch_table(kernels_dir: Path, targets: tuple[str, ...], kernels: list[str]) -> str:
    """The C launcher's table, generated from the kernels' JSON metadata: one whitespace-separated line per kernel.

    Columns: target, kernel, entry symbol, cubin path (relative to the kernels folder), threads per block, dynamic
    shared memory bytes, the constant factor of grid x (the rest are run-time sizes), and the comma-separated
    parameter names in launch order (the C library checks them against the order it was written for).
    """
    lines = ["# target kernel symbol cubin threads shared_bytes grid_x_const params (generated by attrimeter export)"]
    for target in targets:
        for kernel in kernels:
            meta = load_kernel(kernels_dir / target / f"{kernel}.json")
            const = math.prod(int(t) for t in meta["grid"]["x"] if isinstance(t, int))
            params = ",".join(p["name"] for p in meta["params"])
            lines.append(f"{target} {kernel} {meta['symbol']} {target}/{meta['cubin']} {meta['threads']} "
                         f"{meta['shared_bytes']} {const} {params}")
    return "\n".join(lines) + "\n"


def cubin_arch(data: bytes) -> int:
    """The SM version a cubin was compiled for, read from its ELF header.

    Args:
        data: The cubin's bytes.

    Returns:
        E.g. 90 for sm_90.

    Raises:
        AotError: If the bytes are not a 64-bit little-endian CUDA ELF (machine EM_CUDA = 190).
    """
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise AotError("not a cubin: no 64-bit little-endian ELF header")
    machine, = struct.unpack_from("<H", data, 0x12)
    if machine != _EM_CUDA:
        raise AotError(f"not a cubin: ELF machine {machine}, expected EM_CUDA ({_EM_CUDA})")
    flags, = struct.unpack_from("<I", data, 0x30)
    # CUDA ELF ABI version (e_ident[8]) 7 keeps the SM in the low byte of e_flags, version 8 (sm_90+) in the next.
    return (flags >> 8) & 0xFF if data[8] >= 8 else flags & 0xFF


def load_kernel(json_path: str | Path) -> dict[str, Any]:
    """Read a kernel's launch metadata and check that its artefacts are present and well-formed.

    Args:
        json_path: ``EXPORT/kernels/sm_XX/<kernel>.json``.

    Returns:
        The metadata, with ``cubin_path`` and ``ptx_path`` resolved.

    Raises:
        AotError: If the JSON, cubin or PTX is missing or malformed (not an ELF cubin, no ``.entry`` of the symbol).
    """
    path = Path(json_path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AotError(f"kernel metadata {path} is unreadable: {e}") from None
    needed = ("kernel", "symbol", "target", "cubin", "ptx", "threads", "shared_bytes", "params", "grid")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise AotError(f"kernel metadata {path} lacks {missing}")
    cubin, ptx = path.parent / meta["cubin"], path.parent / meta["ptx"]
    if not cubin.is_file():
        raise AotError(f"{cubin} is missing")
    arch = cubin_arch(cubin.read_bytes())
    if arch != meta.get("cc"):
        raise AotError(f"{cubin} is compiled for sm_{arch}, its metadata says {meta['target']}")
    if not ptx.is_file() or f".entry {meta['symbol']}(" not in ptx.read_text():
        raise AotError(f"{ptx} is missing or has no entry {meta['symbol']}")
    if meta["params"][-2:] != [p for p in meta["params"] if p["type"] == "scratch"]:
        raise AotError(f"{path}: the scratch parameters must come last")
    meta["cubin_path"], meta["ptx_path"] = str(cubin), str(ptx)
    meta["sha256"] = sha256_file(cubin)
    return meta


if __name__ == "__main__":
    _child(sys.argv[1])
