"""Ahead-of-time compilation of the Triton kernels for named GPU targets, with their launch metadata.

docs/architecture.md §5; the metadata's reader is :mod:`attrimeter.artefact.kernels`.

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
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from attrimeter.artefact.contract import KERNEL_INDEX, LAUNCH_TABLE, POOL_KERNEL, TRITON_DTYPES
from attrimeter.artefact.kernels import KernelIndex, KernelIndexEntry, load_kernel, ptx_entry, ptx_header
from attrimeter.kernels import integer_exponent

__all__ = ["DEFAULT_TARGETS", "KERNELS", "TARGETS", "AotError", "compile_kernels", "kernel_specs", "launch_table"]

# Maximum dynamic shared memory per block (opt-in), bytes, from the CUDA programming guide's per-architecture table.
TARGETS: dict[str, int] = {"sm_80": 166912, "sm_86": 101376, "sm_87": 166912, "sm_89": 101376, "sm_90": 232448}
# sm_80 (A100), sm_86 (A10, A40, RTX 30xx), sm_87 (Jetson Orin), sm_89 (L4, L40, RTX 40xx), sm_90 (H100).
DEFAULT_TARGETS = ("sm_80", "sm_86", "sm_87", "sm_89", "sm_90")
KERNELS = ("masked_gem_pool", "explain", "explain_weighted")
_HIDDEN = ("global_scratch", "profile_scratch")


class AotError(RuntimeError):
    """Ahead-of-time compilation failed; the message names the kernel and target (or quotes the compiler)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def kernel_specs(channels: int, hw: int, num_attributes: int, p: float, eps: float, dtype: str,
                 pool_max_shared: int | None = None, ptx_version: str | None = None) -> list[dict[str, Any]]:
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
        ptx_version: PTX ISA to emit, e.g. ``"8.4"`` (default: Triton's newest, e.g. 9.4 for sm_90 with Triton 3.9);
            drivers JIT-compile PTX only up to the ISA of their CUDA version (TensorRT's plugins take PTX).

    Returns:
        JSON-serialisable specs, one per kernel of :data:`KERNELS`.
    """
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype must be one of {list(TRITON_DTYPES)}, got {dtype!r}")
    ptx = None
    if ptx_version is not None:
        major, _, minor = ptx_version.partition(".")
        if not (major.isdigit() and minor.isdigit() and len(minor) == 1):
            raise ValueError(f"ptx_version must look like 8.4, got {ptx_version!r}")
        ptx = 10 * int(major) + int(minor)
    C, M = channels, num_attributes
    t = TRITON_DTYPES[dtype]
    p_int = integer_exponent(p)
    pool = {
        "kernel": POOL_KERNEL, "module": "attrimeter.kernels.masked_gem_pool", "dtype": dtype,
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
        "ptx_version": ptx,
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
            "ptx_version": ptx,
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
        options = {"num_warps": cand[2], "num_stages": cand[3]}
        if spec["ptx_version"]:
            options["ptx_version"] = spec["ptx_version"]
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        md = compiled.metadata
        tried.append(f"{blocks} warps={cand[2]} stages={cand[3]}: {md.shared} B")
        if md.shared > limit:
            continue
        ptx = compiled.asm["ptx"]
        params = [{"name": name, "type": signature[name], "role": spec["roles"].get(name, "scalar")}
                  for name in fn.arg_names if signature[name] != "constexpr"]
        # Triton appends hidden pointer parameters to every kernel (global_scratch from 3.3, profile_scratch from
        # 3.5): take their number from the PTX entry itself rather than from the Triton version.
        hidden = len(ptx_entry(ptx, md.name)[2]) - len(params)
        if not 0 <= hidden <= len(_HIDDEN):
            raise AotError(f"{spec['kernel']} ({target}): the PTX entry has {hidden} parameters beyond the kernel's "
                           f"own {len(params)}; this Triton version's calling convention is not supported")
        for name in _HIDDEN[:hidden]:
            size = getattr(md, f"{name}_size", 0)
            if size:
                raise AotError(f"{spec['kernel']} ({target}) needs Triton {name} memory ({size} B per program), "
                               "which the launchers do not allocate")
            params.append({"name": name, "type": "scratch", "size": 0, "align": getattr(md, f"{name}_align", 1)})
        # The grid: run-time size names times the tile count, e.g. x = B * cdiv(C, BLOCK_C).
        grid = []
        for term in spec["grid"]["x"]:
            grid.append(_cdiv(spec["constants"]["C"], blocks["BLOCK_C"]) if term == "cdiv(C, BLOCK_C)" else term)
        meta = {
            "kernel": spec["kernel"], "symbol": md.name, "target": target, "cc": cc,
            "cubin": f"{spec['kernel']}.cubin", "ptx": f"{spec['kernel']}.ptx",
            "num_warps": md.num_warps, "num_stages": cand[3], "threads": md.num_warps * 32,
            "shared_bytes": md.shared, "params": params,
            "grid": {"x": grid, "y": [1], "z": [1]},
            "constants": {k: v for k, v in consts.items() if v is not None},
            "triton_version": triton.__version__,
            "ptx_version": ptx_header(ptx)[1],
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
                    timeout: float = 1800.0, progress: bool = False) -> KernelIndex:
    """Cross-compile ``specs`` for ``targets`` into ``out_dir/<target>/``, with ``index.json`` and ``launch.txt``.

    ``launch.txt`` (the C launcher's table) is written when the pooling kernel is among the specs.

    Args:
        out_dir: The kernels folder (``EXPORT/kernels``).
        specs: From :func:`kernel_specs`.
        targets: GPU targets, names of :data:`TARGETS`.
        timeout: Seconds before the compile is abandoned.
        progress: Show a progress bar (one step per kernel and target).

    Returns:
        The index (as written): Triton version and, per target, each kernel's JSON path, symbol, shared memory and
        threads.

    Raises:
        ValueError: On an unknown target.
        AotError: If Triton is missing or the compilation fails (its output is quoted).
        KernelError: If what it compiled is unusable (e.g. a PTX entry its metadata does not match).
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
    entries: dict[str, dict[str, KernelIndexEntry]] = {}
    triton_version = None
    for target in targets:
        entries[target] = {}
        for spec in specs:
            meta = load_kernel(out / target / f"{spec['kernel']}.json")
            triton_version = meta.triton_version
            entries[target][spec["kernel"]] = KernelIndexEntry(f"{target}/{spec['kernel']}.json", meta.symbol,
                                                               meta.shared_bytes, meta.threads)
    index = KernelIndex(entries, triton_version)
    (out / KERNEL_INDEX).write_text(json.dumps(index.to_json(), indent=1) + "\n")
    if any(spec["kernel"] == POOL_KERNEL for spec in specs):  # the table's export line comes from the pooling
        (out / LAUNCH_TABLE).write_text(launch_table(out, targets, specs))
    return index


def launch_table(kernels_dir: Path, targets: tuple[str, ...], specs: list[dict[str, Any]]) -> str:
    """The C launcher's table (``launch.txt``), generated from the compiled kernels' JSON metadata.

    The first data line says what the export was built for, which the C library checks its callers against::

        export dtype=float32 C=256 HW=32 M=26 p=2.9 eps=1e-06

    then one whitespace-separated line per (target, kernel): target, kernel, entry symbol, cubin path (relative to
    the kernels folder), threads per block, dynamic shared memory bytes, the constant factor of grid x (the rest are
    run-time sizes), and the comma-separated parameter names in launch order (the C library checks them against the
    order it was written for). ``#`` lines are comments.

    Args:
        kernels_dir: The kernels folder holding ``<target>/<kernel>.json``.
        targets: The compiled targets.
        specs: The specs compiled (from :func:`kernel_specs`; the pooling spec gives the export line).

    Returns:
        The table's text.
    """
    pool = next(spec for spec in specs if spec["kernel"] == POOL_KERNEL)
    c = pool["constants"]
    lines = ["# generated by attrimeter export from the kernels' JSON metadata",
             f"export dtype={pool['dtype']} C={c['C']} HW={c['HW']} M={c['M']} p={c['p']!r} eps={c['eps']!r}",
             "# target kernel symbol cubin threads shared_bytes grid_x_const params"]
    for target in targets:
        for spec in specs:
            meta = load_kernel(kernels_dir / target / f"{spec['kernel']}.json")
            const = math.prod(t for t in meta.grid_x if isinstance(t, int))
            params = ",".join(p.name for p in meta.params)
            lines.append(f"{target} {spec['kernel']} {meta.symbol} {target}/{meta.cubin_path.name} {meta.threads} "
                         f"{meta.shared_bytes} {const} {params}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _child(sys.argv[1])
