"""Compile the Triton kernels for an H100 (sm_90) without a GPU and print what the tests check, as JSON.

The interpreter never lowers the kernels, so the CPU tests run this in a subprocess without ``TRITON_INTERPRET``
(Triton's bundled ptxas does the compiling): ``python tests/kernels/aot_sm90.py attr_distance|masked_gem_pool``.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

_FLOAT_ARGS = ("p", "inv_p", "eps", "eps_p")


def compile_sm90(kernel, dtypes: dict[str, str], consts: dict, warps: int, stages: int = 3) -> dict[str, str]:
    """Assembly (``ttgir``, ``ptx``, …) of ``kernel`` as the JIT builds it for C = 2048.

    Pointers and strides are divisible by 16 and the unit C strides specialised, as the JIT sees real embeddings.
    """
    sig, hints = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params, strict=True)):
        if param.is_constexpr or name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtypes.get(name, "fp32")
            hints[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name == "C" or (name.startswith("stride") and name not in ("stride_qsq", "stride_gsq")):
                hints[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=hints)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return compiled.asm


def _async_copies(kernel, dtypes: dict[str, str], consts: dict, warps: int) -> int:
    return compile_sm90(kernel, dtypes, consts, warps)["ttgir"].count("async_copy_global_to_local")


def attr_distance_report() -> dict[str, int]:
    """Software-pipelined gallery loads (cp.async into shared memory) per scan mode and in the explain kernel."""
    from attrimeter.kernels import attr_distance as ad

    unit = dict(stride_qc=1, stride_gc=1, stride_dkn=1, stride_shn=1)
    base = dict(BLOCK_Q=64, BLOCK_K=64, HAS_GSQ=False, DOT_F32=False, PRECISION="ieee", **unit)
    half = {"q_ptr": "fp16", "g_ptr": "fp16", "key_ptr": "i64"}
    out = {}
    for mode, w, bn, topk in ((0, True, 64, (0, 1)), (1, False, 128, (10, 16)), (2, True, 128, (1, 1))):
        consts = dict(base, MODE=mode, HAS_W=w, BLOCK_N=bn, TOPK_W=topk[0], TOPK_P=topk[1])
        out[f"scan{mode}"] = _async_copies(ad._scan_kernel, half, consts, 8)
    consts = dict(base, MODE=0, HAS_W=False, BLOCK_N=64, TOPK_W=0, TOPK_P=1, PRECISION="tf32x3")
    single = {"q_ptr": "fp32", "g_ptr": "fp32", "key_ptr": "i64"}
    out["scan_fp32"] = _async_copies(ad._scan_kernel, single, consts, 8)
    explain = dict(BLOCK_R=32, BLOCK_C=128, HAS_W=True, stride_qc=1, stride_gc=1)
    out["explain"] = _async_copies(ad._explain_kernel, {"g_ptr": "bf16", "ids_ptr": "i64"}, explain, 4)
    return out


def masked_gem_pool_report() -> dict[str, int]:
    """Tensor-core instructions of the bf16 forward and backward kernels, integer and generic ``p``."""
    from attrimeter.kernels import masked_gem_pool as mgp

    bf16 = {name: "bf16" for name in ("f_ptr", "z_ptr", "out_g_ptr", "out_k_ptr", "gf_ptr", "gz_ptr")}
    out = {}
    for p_int in (3, 0):
        fwd = dict(P_INT=p_int, M_PAD=32, HAS_AFFINE=True, SAVE_MEAN=True, DOT_PRECISION="tf32", BLOCK_C=128,
                   BLOCK_HW=64)
        bwd = dict(P_INT=p_int, M_PAD=32, NEED_GF=True, DOT_PRECISION="tf32", BLOCK_C=64, BLOCK_HW=64)
        for name, kernel, consts in (("fwd", mgp._masked_gem_pool_fwd_kernel, fwd),
                                     ("bwd", mgp._masked_gem_pool_bwd_kernel, bwd)):
            ptx = compile_sm90(kernel.fn, bf16, consts, 8)["ptx"]  # .fn: the jitted kernel under the autotuner
            out[f"{name}_p{p_int}"] = ptx.count("mma.sync") + ptx.count("wgmma.mma_async")
    return out


def masked_gem_pool_spills() -> dict[str, list[int]]:
    """Register spill stores (bytes, from ptxas -v) of every autotuning config, fp32 outputs, IEEE vs 3xTF32 products.

    The evidence behind ``masked_gem_pool._dot_precision``; needs the ptxas Triton bundles for its PTX version.
    """
    from attrimeter.kernels import masked_gem_pool as mgp

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    out = {}
    for name, kernel, configs, extra in (
        ("fwd", mgp._masked_gem_pool_fwd_kernel, mgp._FWD_CONFIGS, dict(HAS_AFFINE=True, SAVE_MEAN=True)),
        ("bwd", mgp._masked_gem_pool_bwd_kernel, mgp._BWD_CONFIGS, dict(NEED_GF=True)),
    ):
        for precision in ("ieee", "tf32x3"):
            spills = []
            for cfg in configs:
                consts = dict(extra, P_INT=3, M_PAD=32, DOT_PRECISION=precision, **cfg.kwargs)
                ptx = compile_sm90(kernel.fn, {}, consts, cfg.num_warps, cfg.num_stages)["ptx"]
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as fh:
                    fh.write(ptx)
                    fh.flush()
                    log = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", fh.name, "-o", "/dev/null"],
                                         capture_output=True, text=True, check=True).stderr
                spills.append(int(re.search(r"(\d+) bytes spill stores", log).group(1)))
            out[f"{name}_{precision}"] = spills
    return out


if __name__ == "__main__":
    reports = {"attr_distance": attr_distance_report, "masked_gem_pool": masked_gem_pool_report,
               "masked_gem_pool_spills": masked_gem_pool_spills}
    print(json.dumps(reports[sys.argv[1]]()))
