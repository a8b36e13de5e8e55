"""The C launcher library (CMakeLists.txt, export/csrc/): build, run against the torch references, malformed exports.

What runs where:
- Everywhere (no GPU needed): cmake configure + build; the program's skip (exit 77) without a driver; CTest wiring;
  the library's validation of launch.txt before the driver is touched (parameter order, columns, paths, cubins);
  argument checks; and the launch marshalling against a *mock* libcuda.so.1 (compiled here from cuda.h's own
  prototypes, so it exports the driver's versioned symbol names): grid, block, shared memory, stream, every
  parameter value in order, context push/pop balance, module/allocation leaks, target selection; and the test
  program end to end with the mock replaying the expected outputs (case format, output routing, comparisons).
  Also: launch.txt's export line (dtype, C, HW, M, p, eps) and am_get_info for float32 and float16 exports, the test
  program's case/export mismatch check and its float16 path (conversions, tolerance) on the mock, and the target
  fallback (sm_80 cubins on an sm_86 device; none for sm_90) against mock devices of chosen compute capability.
- With a GPU (torch.cuda.is_available()): the real kernels against the references, for (p, dtype) in (3, float32),
  (2.9, float32), (2.9, float16): ‖out − ref‖/‖ref‖ ≤ 1e-4, 2e-3 for the float16 pooling outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SHAPE = {"B": 3, "C": 64, "HW": 32, "M": 5, "Q": 3, "K": 4, "N": 7}
H, W = 4, 8  # HW = 32
EPS = 1e-6
# The exports checked against the references: (p, dtype). Integer p takes the kernel's multiplication path.
VARIANTS = {"p3-fp32": (3.0, "float32"), "p2.9-fp32": (2.9, "float32"), "p2.9-fp16": (2.9, "float16")}
DEFAULT = "p3-fp32"
# The header's return codes.
AM_OK, AM_ERR_NO_DRIVER, AM_ERR_NO_DEVICE, AM_ERR_NO_TARGET = 0, 1, 2, 3
AM_ERR_IO, AM_ERR_FORMAT, AM_ERR_CUDA, AM_ERR_ARG = 4, 5, 6, 7
GPU = torch.cuda.is_available()


def _cuda_include() -> Path | None:
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH", "CUDAToolkit_ROOT")] + ["/usr/local/cuda"]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda.h").is_file():
            return Path(root) / "include"
    return None


def _c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: export (AOT kernels), test case (torch references), build (cmake), mock driver
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target() -> str:
    from attrimeter.export.aot import TARGETS

    if not GPU:
        return "sm_90"
    major, minor = torch.cuda.get_device_capability()
    name = f"sm_{major}{minor}"
    if name not in TARGETS:
        pytest.skip(f"attrimeter.export.aot cannot compile for this GPU's {name} (known: {', '.join(TARGETS)})")
    return name


def _export_line(p: float, dtype: str) -> str:
    return f"export dtype={dtype} C={SHAPE['C']} HW={SHAPE['HW']} M={SHAPE['M']} p={float(p)!r} eps={EPS!r}"


def _check_export_line(kernels: Path, line: str) -> None:
    """launch.txt's first data line says what the cubins were built for (written by aot.launch_table)."""
    lines = (kernels / "launch.txt").read_text().splitlines()
    first = next(x for x in lines if x.strip() and not x.lstrip().startswith("#"))
    assert first == line


@pytest.fixture(scope="module")
def exports(tmp_path_factory, target) -> dict[str, Path]:
    """One export per variant, for the device's target (sm_90 without a GPU), compiled side by side."""
    from attrimeter.export.aot import compile_kernels, kernel_specs

    folders = {name: tmp_path_factory.mktemp(f"export-{name}") for name in VARIANTS}

    def build(name: str) -> Path:
        p, dtype = VARIANTS[name]
        specs = kernel_specs(SHAPE["C"], SHAPE["HW"], SHAPE["M"], p, EPS, dtype)
        compile_kernels(folders[name] / "kernels", specs, (target,))
        _check_export_line(folders[name] / "kernels", _export_line(p, dtype))
        return folders[name]

    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        return dict(zip(VARIANTS, pool.map(build, VARIANTS), strict=True))


@pytest.fixture(scope="module")
def export_dir(exports) -> Path:
    return exports[DEFAULT]


def _write_case(out: Path, p: float, dtype: str, seed: int) -> None:
    """Random inputs (zeros in F, a whole zero channel, A ≈ 0) and float64 references of their values.

    The pooling inputs are rounded to `dtype` (the program uploads them in the export's dtype) but stored as fp32,
    like every reference; the explain inputs are the kernel's fixed fp32 queries and fp16 gallery.
    """
    from attrimeter.kernels.attr_distance import explain_topk_reference
    from attrimeter.kernels.masked_gem_pool import masked_gem_pool_reference

    gen = torch.Generator().manual_seed(seed)
    B, C, M, Q, K, N = (SHAPE[k] for k in "BCMQKN")
    F = torch.rand(B, C, H, W, generator=gen) * 2.0
    F[F < 0.3] = 0.0
    F[:, 1] = 0.0  # a channel entirely below eps
    Z = torch.randn(B, M, H, W, generator=gen) * 2.0
    Z[:, 0, :, :3] = -40.0  # attention ~ 0
    scale, shift = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen) * 0.1
    store = getattr(torch, dtype)
    F, Z, scale, shift = (t.to(store).float() for t in (F, Z, scale, shift))
    f, f_k = masked_gem_pool_reference(F.double(), Z.double(), p, EPS, scale.double(), shift.double())
    q = torch.randn(Q, M + 1, C, generator=gen)
    g = torch.randn(N, M + 1, C, generator=gen).half()
    ids = torch.randint(0, N, (Q, K), dtype=torch.int64, generator=gen)
    ids[0, 1] = ids[0, 0]  # repeats are allowed
    w = torch.rand(M, generator=gen) + 0.1
    ref = explain_topk_reference(q.double(), g.double(), ids)
    ref_w = explain_topk_reference(q.double(), g.double(), ids, weights=w.double())
    files = {"F": F, "Z": Z, "scale": scale, "shift": shift, "f": f, "f_k": f_k, "q": q, "d": ref.d, "d_k": ref.d_k,
             "shares": ref.shares, "d_hat": ref.d_hat, "w": w, "scores_w": ref_w.scores}  # fmt: skip
    for name, t in files.items():
        t.detach().numpy().astype("<f4").tofile(out / f"{name}.bin")
    g.numpy().astype("<f2").tofile(out / "g.bin")
    ids.numpy().astype("<i8").tofile(out / "ids.bin")
    (out / "case.txt").write_text(f"# attrimeter C test case\ndtype {dtype}\n" +
                                  "".join(f"{k} {v}\n" for k, v in SHAPE.items()) + f"p {p!r}\neps {EPS!r}\n")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Path]:
    """One test case per variant (fresh inputs each)."""
    out = {}
    for seed, (name, (p, dtype)) in enumerate(VARIANTS.items()):
        out[name] = tmp_path_factory.mktemp(f"case-{name}")
        _write_case(out[name], p, dtype, seed)
    return out


@pytest.fixture(scope="module")
def case_dir(cases) -> Path:
    return cases[DEFAULT]


@pytest.fixture(scope="module")
def clib(tmp_path_factory, export_dir, case_dir) -> dict[str, Path]:
    """Configure and build the C library and test program once (CTest is pointed at the export and the case)."""
    cmake, cc = shutil.which("cmake"), _c_compiler()
    if cmake is None:
        pytest.skip("cmake is not installed")
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang)")
    if _cuda_include() is None and shutil.which("nvcc") is None:
        pytest.skip("cuda.h not found (set CUDA_HOME): the C library needs the CUDA headers, not a GPU")
    build = tmp_path_factory.mktemp("build")
    configure = _run([cmake, "-S", REPO, "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_C_COMPILER={cc}",
                      f"-DATTRIMETER_EXPORT_DIR={export_dir}", f"-DATTRIMETER_CASE_DIR={case_dir}"])
    assert configure.returncode == 0, configure.stdout + configure.stderr
    built = _run([cmake, "--build", build, "-j", "2"])
    assert built.returncode == 0, built.stdout + built.stderr
    return {"build": build, "lib": build / "libattrimeter_kernels.so", "prog": build / "attrimeter_kernels_test"}


# A stand-in for libcuda.so.1 built from cuda.h's own prototypes (so its symbols carry the driver's versioned names:
# cuMemAlloc_v2, cuCtxPushCurrent_v2, ...). Device memory is host memory; a launch is logged, not run: the kernel is
# recognised by its cubin bytes (AM_MOCK_KERNELS/<kernel>.cubin) and its parameters decoded by the Triton signature.
MOCK_SOURCE = r"""
#define _GNU_SOURCE
#include <cuda.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct CUctx_st { int token; };
struct CUmod_st { char kernel[32]; unsigned char *image; size_t size; struct CUfunc_st *fn; };
struct CUfunc_st { struct CUmod_st *module; char name[128]; };
static struct CUctx_st primary;
static int retained, pushed, modules, allocs;
static FILE *out;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    if (!out) { const char *p = getenv("AM_MOCK_LOG"); out = p ? fopen(p, "a") : stderr; }
    va_list ap; va_start(ap, fmt); vfprintf(out, fmt, ap); va_end(ap); fputc('\n', out); fflush(out);
}
__attribute__((destructor)) static void final(void) {
    say("final retained=%d pushed=%d modules=%d allocs=%d", retained, pushed, modules, allocs);
}
#define NEED_CTX \
    if (pushed == 0) { say("error no current context in %s", __func__); return CUDA_ERROR_INVALID_CONTEXT; }

CUresult cuGetErrorName(CUresult e, const char **s) {
    *s = e == CUDA_ERROR_NO_DEVICE ? "CUDA_ERROR_NO_DEVICE" : "CUDA_ERROR_MOCK"; return CUDA_SUCCESS; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "mock driver"; return CUDA_SUCCESS; }
CUresult cuInit(unsigned int flags) {
    const char *e = getenv("AM_MOCK_INIT"); say("cuInit %u", flags); return e ? (CUresult)atoi(e) : CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int *v) { *v = CUDA_VERSION; return CUDA_SUCCESS; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return CUDA_SUCCESS; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) { if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE; *d = 0; return 0; }
CUresult cuDeviceGetAttribute(int *v, CUdevice_attribute a, CUdevice d) {
    int cc = getenv("AM_MOCK_CC") ? atoi(getenv("AM_MOCK_CC")) : 90; (void)d;
    int optin = getenv("AM_MOCK_OPTIN") ? atoi(getenv("AM_MOCK_OPTIN")) : 232448;
    *v = a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR ? cc / 10
       : a == CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR ? cc % 10
       : a == CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN ? optin : 0;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { (void)d; ++retained; *c = &primary; return 0; }
CUresult cuDevicePrimaryCtxRelease(CUdevice d) { (void)d; --retained; return CUDA_SUCCESS; }
CUresult cuCtxPushCurrent(CUcontext c) { if (c != &primary) return CUDA_ERROR_INVALID_CONTEXT; ++pushed; return 0; }
CUresult cuCtxPopCurrent(CUcontext *c) { NEED_CTX --pushed; if (c) *c = &primary; return CUDA_SUCCESS; }
CUresult cuCtxSynchronize(void) { NEED_CTX say("synchronize context"); return CUDA_SUCCESS; }
CUresult cuStreamSynchronize(CUstream s) { NEED_CTX say("synchronize stream=%p", (void *)s); return CUDA_SUCCESS; }

static size_t elf_size(const unsigned char *p) { /* the end of the section or program header table */
    uint64_t phoff, shoff; uint16_t phentsize, phnum, shentsize, shnum;
    memcpy(&phoff, p + 0x20, 8); memcpy(&shoff, p + 0x28, 8); memcpy(&phentsize, p + 0x36, 2);
    memcpy(&phnum, p + 0x38, 2); memcpy(&shentsize, p + 0x3A, 2); memcpy(&shnum, p + 0x3C, 2);
    uint64_t sh_end = shoff + (uint64_t)shentsize * shnum, ph_end = phoff + (uint64_t)phentsize * phnum;
    return (size_t)(sh_end > ph_end ? sh_end : ph_end);
}
CUresult cuModuleLoadData(CUmodule *m, const void *image) {
    NEED_CTX
    const unsigned char *p = image;
    if (memcmp(p, "\x7f" "ELF", 4) != 0) return CUDA_ERROR_INVALID_IMAGE;
    size_t size = elf_size(p);
    static const char *kernels[] = {"masked_gem_pool", "explain", "explain_weighted"};
    for (int i = 0; i < 3; ++i) {
        char path[4096]; snprintf(path, sizeof path, "%s/%s.cubin", getenv("AM_MOCK_KERNELS"), kernels[i]);
        FILE *f = fopen(path, "rb"); if (!f) continue;
        unsigned char *buf = malloc(size + 1); size_t n = fread(buf, 1, size + 1, f); fclose(f);
        if (n == size && memcmp(buf, p, size) == 0) {
            struct CUmod_st *mod = calloc(1, sizeof *mod);
            snprintf(mod->kernel, sizeof mod->kernel, "%s", kernels[i]); mod->image = buf; mod->size = size;
            *m = mod; ++modules; say("load %s", kernels[i]); return CUDA_SUCCESS;
        }
        free(buf);
    }
    return CUDA_ERROR_NO_BINARY_FOR_GPU;
}
CUresult cuModuleUnload(CUmodule m) { NEED_CTX free(m->fn); free(m->image); free(m); --modules; return 0; }
CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
    char needle[130]; size_t n = (size_t)snprintf(needle, sizeof needle, "%c%s%c", 0, name, 0);
    if (!memmem(m->image, m->size, needle, n)) return CUDA_ERROR_NOT_FOUND;
    if (!m->fn) m->fn = calloc(1, sizeof *m->fn);
    m->fn->module = m; snprintf(m->fn->name, sizeof m->fn->name, "%s", name); *f = m->fn; return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int *v, CUfunction_attribute a, CUfunction f) {
    (void)f; *v = a == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : 0; return CUDA_SUCCESS; }
CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute a, int v) {
    NEED_CTX say("set_attribute %s %d %d", f->module->kernel, (int)a, v); return CUDA_SUCCESS; }
/* AM_MOCK_REPLAY=CASE_DIR: a launch writes the case's expected outputs into its output parameters and, for explain,
 * flags ids outside [0, N) as the kernel does (err += 1, d = NaN): the test program then passes end to end. */
static void load(const char *name, void **params, int slot) {
    char path[4096]; snprintf(path, sizeof path, "%s/%s", getenv("AM_MOCK_REPLAY"), name);
    FILE *f = fopen(path, "rb"); if (!f) { say("error replay %s", path); return; }
    unsigned char *dst = (unsigned char *)(uintptr_t)*(CUdeviceptr *)params[slot]; int c; size_t i = 0;
    while ((c = fgetc(f)) != EOF) dst[i++] = (unsigned char)c;
    fclose(f);
}
static void replay(const char *k, unsigned gx, void **params) {
    if (strcmp(k, "masked_gem_pool") == 0) { load("f.bin", params, 4); load("f_k.bin", params, 5); return; }
    int w = strcmp(k, "explain_weighted") == 0;
    load("d.bin", params, 3 + w); load("d_k.bin", params, 4 + w); load("shares.bin", params, 5 + w);
    load("d_hat.bin", params, 6 + w); load(w ? "scores_w.bin" : "d.bin", params, 7 + w);
    const int64_t *ids = (const int64_t *)(uintptr_t)*(CUdeviceptr *)params[2];
    float *d = (float *)(uintptr_t)*(CUdeviceptr *)params[3 + w];
    int32_t *err = (int32_t *)(uintptr_t)*(CUdeviceptr *)params[8 + w], n = *(int32_t *)params[10 + w];
    const uint32_t nan_bits = 0x7fc00000u;
    for (unsigned i = 0; i < gx; ++i)
        if (ids[i] < 0 || ids[i] >= n) { ++*err; memcpy(&d[i], &nan_bits, 4); }
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, CUstream stream, void **params, void **extra) {
    NEED_CTX
    /* Triton signature: pointers 8 bytes, then (explain) K, N, stride_iq as int32, then two scratch pointers. */
    const char *k = f->module->kernel;
    int n_ptr = strcmp(k, "masked_gem_pool") == 0 ? 8 : strcmp(k, "explain") == 0 ? 9 : 10;
    int n_int = strcmp(k, "masked_gem_pool") == 0 ? 0 : 3, n_tail = n_int ? 2 : 0;
    char text[2048]; size_t used = 0;
    for (int i = 0; i < n_ptr + n_int + n_tail; ++i) {
        if (i >= n_ptr && i < n_ptr + n_int)
            used += (size_t)snprintf(text + used, sizeof text - used, "%s%d", i ? "," : "", *(int32_t *)params[i]);
        else
            used += (size_t)snprintf(text + used, sizeof text - used, "%s0x%llx", i ? "," : "",
                                     (unsigned long long)*(CUdeviceptr *)params[i]);
    }
    say("launch %s grid=%u,%u,%u block=%u,%u,%u shared=%u stream=%p extra=%p params=%s", k, gx, gy, gz, bx, by, bz,
        shared, (void *)stream, (void *)extra, text);
    if (getenv("AM_MOCK_REPLAY")) replay(k, gx, params);
    return CUDA_SUCCESS;
}
CUresult cuMemAlloc(CUdeviceptr *p, size_t n) {
    NEED_CTX void *h = aligned_alloc(256, (n + 255) / 256 * 256); *p = (CUdeviceptr)(uintptr_t)h; ++allocs; return 0; }
CUresult cuMemFree(CUdeviceptr p) { NEED_CTX free((void *)(uintptr_t)p); --allocs; return CUDA_SUCCESS; }
CUresult cuMemcpyHtoD(CUdeviceptr d, const void *s, size_t n) { NEED_CTX memcpy((void *)(uintptr_t)d, s, n); return 0; }
CUresult cuMemcpyDtoH(void *d, CUdeviceptr s, size_t n) { NEED_CTX memcpy(d, (void *)(uintptr_t)s, n); return 0; }
CUresult cuMemsetD32(CUdeviceptr d, unsigned int v, size_t n) {
    NEED_CTX for (size_t i = 0; i < n; ++i) ((uint32_t *)(uintptr_t)d)[i] = v; return CUDA_SUCCESS; }
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned int v, size_t n, CUstream s) {
    NEED_CTX for (size_t i = 0; i < n; ++i) ((uint32_t *)(uintptr_t)d)[i] = v;
    say("memset32 0x%llx %u %zu stream=%p", (unsigned long long)d, v, n, (void *)s); return CUDA_SUCCESS; }
"""

# Drives the library through ctypes in a child process (a crash or a mock driver stays out of pytest's process).
CLIENT_SOURCE = r"""
import ctypes as C, json, sys
lib, export, scenario = C.CDLL(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
U, P, I = C.c_uint64, C.c_void_p, C.c_int
lib.am_last_error.restype = C.c_char_p
lib.am_target.restype, lib.am_target.argtypes = C.c_char_p, [P]
lib.am_open.argtypes = [C.c_char_p, I, C.POINTER(P)]
lib.am_close.argtypes = [P]
lib.am_masked_gem_pool.argtypes = [P, P] + [U] * 6 + [I]
lib.am_explain.argtypes = [P, P] + [U] * 10 + [I] * 3
lib.am_alloc.argtypes = [P, C.c_size_t, C.POINTER(U)]
lib.am_free.argtypes = [P, U]
lib.am_upload.argtypes = [P, U, P, C.c_size_t]
lib.am_download.argtypes = [P, P, U, C.c_size_t]
lib.am_memset32.argtypes = [P, U, C.c_uint32, C.c_size_t]
lib.am_synchronize.argtypes = [P, P]
class Info(C.Structure):
    _fields_ = [("dtype_bytes", I), ("C", I), ("HW", I), ("M", I), ("p", C.c_double), ("eps", C.c_double),
                ("target", C.c_char * 16)]
lib.am_get_info.argtypes = [P, C.POINTER(Info)]
def info(h):
    i = Info()
    if rec("info", lib.am_get_info(h, C.byref(i))) == 0:
        res["info"] = [i.dtype_bytes, i.C, i.HW, i.M, i.p, i.eps, i.target.decode()]
res = {}
def rec(name, rc):
    res[name] = [rc, lib.am_last_error().decode() if rc else ""]
    return rc
if scenario == "open":
    h = P()
    if rec("open", lib.am_open(export, int(sys.argv[4]) if len(sys.argv) > 4 else 0, C.byref(h))) == 0:
        info(h)
    res["target"] = (lib.am_target(h) or b"").decode()
    lib.am_close(h)
elif scenario == "args":
    h = P()
    rec("open_null_out", lib.am_open(export, 0, None))
    rec("open_null_dir", lib.am_open(None, 0, C.byref(h)))
    rec("open_negative_device", lib.am_open(export, -1, C.byref(h)))
    rec("pool", lib.am_masked_gem_pool(None, None, *[256] * 6, 1))
    rec("explain", lib.am_explain(None, None, *[256] * 10, 1, 1, 1))
    p = U(1)
    rec("alloc", lib.am_alloc(None, 16, C.byref(p)))
    res["alloc_ptr"] = p.value
    rec("free", lib.am_free(None, 256))
    rec("upload", lib.am_upload(None, 256, C.c_char_p(b"x"), 1))
    rec("download", lib.am_download(None, C.create_string_buffer(1), 256, 1))
    rec("memset32", lib.am_memset32(None, 256, 0, 1))
    rec("synchronize", lib.am_synchronize(None, None))
    res["target_null"] = lib.am_target(None)
    rec("info_null", lib.am_get_info(None, C.byref(Info())))
    lib.am_close(None)
elif scenario == "launch":
    h = P()
    assert rec("open", lib.am_open(export, 0, C.byref(h))) == 0, res
    res["target"] = lib.am_target(h).decode()
    info(h)
    rec("info_null_out", lib.am_get_info(h, None))
    def alloc(n):
        p = U()
        assert rec("alloc", lib.am_alloc(h, n, C.byref(p))) == 0, res
        return p.value
    pool = [alloc(64) for _ in range(6)]
    ex = [alloc(64) for _ in range(10)]  # q g ids w d d_k shares d_hat scores err
    res["pool_ptrs"], res["explain_ptrs"] = pool, ex
    stream = 0x5000
    rec("pool", lib.am_masked_gem_pool(h, stream, *pool, 3))
    rec("explain", lib.am_explain(h, stream, *ex[:3], 0, *ex[4:], 3, 4, 7))
    rec("explain_weighted", lib.am_explain(h, stream, *ex, 3, 4, 7))
    rec("pool_batch0", lib.am_masked_gem_pool(h, None, *pool, 0))
    rec("pool_grid_overflow", lib.am_masked_gem_pool(h, None, *pool, 2**31 // 4))
    rec("pool_misaligned", lib.am_masked_gem_pool(h, None, pool[0] + 8, *pool[1:], 1))
    rec("pool_null", lib.am_masked_gem_pool(h, None, *pool[:5], 0, 1))
    rec("explain_overflow", lib.am_explain(h, None, *ex, 46341, 46341, 7))
    rec("explain_k0", lib.am_explain(h, None, *ex, 3, 0, 7))
    rec("explain_null_err", lib.am_explain(h, None, *ex[:9], 0, 3, 4, 7))
    buf = (C.c_uint32 * 4)(1, 2, 3, 4)
    rec("upload", lib.am_upload(h, ex[0], buf, 16))
    rec("memset32", lib.am_memset32(h, ex[0] + 4, 7, 2))
    back = (C.c_uint32 * 4)()
    rec("download", lib.am_download(h, back, ex[0], 16))
    res["roundtrip"] = list(back)
    rec("synchronize_ctx", lib.am_synchronize(h, None))
    rec("synchronize_stream", lib.am_synchronize(h, stream))
    for p in pool + ex:
        rec("free", lib.am_free(h, p))
    rec("free0", lib.am_free(h, 0))
    lib.am_close(h)
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def client(tmp_path_factory, clib):
    """Run a ctypes scenario against the built library in a child process; returns its JSON result."""
    script = tmp_path_factory.mktemp("client") / "client.py"
    script.write_text(CLIENT_SOURCE)

    def run(export: Path, scenario: str, *args: str, env: dict[str, str] | None = None) -> dict:
        proc = _run([sys.executable, script, clib["lib"], export, scenario, *args], env={**os.environ, **(env or {})})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)

    return run


@pytest.fixture(scope="module")
def mock_driver(tmp_path_factory, clib) -> Path:
    """Folder holding the mock libcuda.so.1 (put it on LD_LIBRARY_PATH)."""
    include = _cuda_include()
    if include is None:
        pytest.skip("cuda.h not found (set CUDA_HOME) for the mock driver")
    folder = tmp_path_factory.mktemp("mockcuda")
    (folder / "mock.c").write_text(MOCK_SOURCE)
    built = _run([_c_compiler(), "-std=c11", "-shared", "-fPIC", "-Wall", "-Werror", "-isystem", include,
                  folder / "mock.c", "-Wl,-soname,libcuda.so.1", "-o", folder / "libcuda.so.1"])
    assert built.returncode == 0, built.stderr
    return folder


def _mock_env(mock_driver: Path, export: Path, target: str, log: Path, **extra: str) -> dict[str, str]:
    ld = os.pathsep.join(filter(None, [str(mock_driver), os.environ.get("LD_LIBRARY_PATH")]))
    return {"LD_LIBRARY_PATH": ld, "AM_MOCK_KERNELS": str(export / "kernels" / target), "AM_MOCK_LOG": str(log),
            **extra}


def _copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_table(export: Path, fn) -> None:
    path = export / "kernels" / "launch.txt"
    path.write_text(fn(path.read_text()))


# ---------------------------------------------------------------------------------------------------------------------
# Build and the real run
# ---------------------------------------------------------------------------------------------------------------------


def test_build_outputs(clib, tmp_path):
    assert clib["lib"].is_file() and os.access(clib["prog"], os.X_OK)
    if shutil.which("readelf"):
        dyn = _run(["readelf", "-d", clib["lib"]]).stdout
        assert "libcuda" not in dyn and "libcudart" not in dyn, dyn  # the driver is dlopen'ed at run time
        syms = _run(["readelf", "--dyn-syms", "-W", clib["lib"]]).stdout
        exported = set(re.findall(r"GLOBAL\s+DEFAULT\s+\d+\s+(am_\w+)", syms))
        assert exported == {"am_open", "am_close", "am_last_error", "am_target", "am_get_info", "am_masked_gem_pool",
                            "am_explain", "am_alloc", "am_free", "am_upload", "am_download", "am_memset32",
                            "am_synchronize"}
    installed = _run(["cmake", "--install", clib["build"], "--prefix", tmp_path / "prefix"])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (tmp_path / "prefix/include/attrimeter_kernels.h").is_file()
    assert list((tmp_path / "prefix").glob("lib*/libattrimeter_kernels.so*")), installed.stdout
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:  # DeepStream plugins are C++: the header must compile there too
        proc = _run([cxx, "-std=c++11", "-Wall", "-Wextra", "-pedantic", "-Werror", "-fsyntax-only", "-x", "c++",
                     REPO / "export" / "csrc" / "attrimeter_kernels.h"])
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_program_against_reference(clib, exports, cases, variant):
    proc = _run([clib["prog"], exports[variant], cases[variant]])
    out = proc.stdout + proc.stderr
    if GPU:
        assert proc.returncode == 0, out
        assert "PASSED" in out and "FAIL " not in out, out
        assert f"export dtype {VARIANTS[variant][1]} C 64 HW 32 M 5" in out, out
        tol = "2e-03" if VARIANTS[variant][1] == "float16" else "1e-04"
        assert re.search(rf"ok   masked_gem_pool f_k: rel err \S+ \(tol {tol}\)", out), out
    else:
        assert proc.returncode == 77, out
        assert out.startswith("SKIP: AM_ERR_NO_DRIVER") and "libcuda.so.1" in out, out


def test_ctest(clib):
    proc = _run(["ctest", "--output-on-failure"], cwd=clib["build"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "attrimeter_kernels" in out
    assert ("Passed" if GPU else "Skipped") in out, out


def test_usage(clib):
    proc = _run([clib["prog"]])
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.skipif(GPU, reason="checks the message on a machine without the CUDA driver")
def test_open_without_driver(client, export_dir):
    res = client(export_dir, "open")
    rc, msg = res["open"]
    assert rc == AM_ERR_NO_DRIVER and 'dlopen("libcuda.so.1")' in msg, res


def test_null_handle_and_bad_arguments(client, export_dir):
    res = client(export_dir, "args")
    for name in ("open_null_out", "open_null_dir", "open_negative_device", "pool", "explain", "alloc", "free",
                 "upload", "download", "memset32", "synchronize", "info_null"):
        rc, msg = res[name]
        assert rc == AM_ERR_ARG and msg, (name, res[name])
    assert "NULL" in res["pool"][1] and "negative" in res["open_negative_device"][1]
    assert res["alloc_ptr"] == 0 and res["target_null"] is None


# ---------------------------------------------------------------------------------------------------------------------
# launch.txt validation (before the driver: identical with and without a GPU)
# ---------------------------------------------------------------------------------------------------------------------


def test_tampered_parameter_order(clib, client, export_dir, case_dir, tmp_path, target):
    bad = _copy_export(export_dir, tmp_path / "export")
    _edit_table(bad, lambda s: s.replace("ids_ptr,d_ptr,dk_ptr", "ids_ptr,dk_ptr,d_ptr", 1))  # explain, not _weighted
    lines = (bad / "kernels" / "launch.txt").read_text().splitlines()
    lineno = next(i for i, line in enumerate(lines, 1) if f"{target} explain " in line)
    rc, msg = client(bad, "open")["open"]
    assert rc == AM_ERR_FORMAT, msg
    assert f"launch.txt:{lineno}" in msg and "parameter 4 is 'dk_ptr'" in msg and "passes 'd_ptr'" in msg, msg
    proc = _run([clib["prog"], bad, case_dir])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "AM_ERR_FORMAT" in proc.stderr and "'dk_ptr'" in proc.stderr and "'d_ptr'" in proc.stderr


def _drop_params(s: str, n: int) -> str:
    return re.sub(rf"(masked_gem_pool .*?)(,[a-z_]+){{{n}}}\n", r"\1\n", s, count=1)


MALFORMED = {
    "missing_launch_txt": (AM_ERR_IO, "launch.txt: No such file", None),
    "param_missing": (AM_ERR_FORMAT, "parameter 8 is '(none)' but this library passes 'profile_scratch'",
                      lambda s: _drop_params(s, 1)),
    "param_extra": (AM_ERR_FORMAT, "parameter 9 is 'extra' but this library passes '(none)'",
                    lambda s: s.replace("profile_scratch\n", "profile_scratch,extra\n", 1)),
    "extra_column": (AM_ERR_FORMAT, "expected 8 columns", lambda s: s.replace(" 128 ", " 128 7 ", 1)),
    "bad_threads": (AM_ERR_FORMAT, "threads 'many'", lambda s: s.replace(" 128 ", " many ", 1)),
    "bad_shared": (AM_ERR_FORMAT, "shared_bytes '-5'", lambda s: re.sub(r"( 128 )\d+ ", r"\1-5 ", s, count=1)),
    "bad_target": (AM_ERR_FORMAT, "not of the form sm_XX", lambda s: re.sub(r"^sm_\d+", "gfx90a", s, flags=re.M)),
    "escaping_path": (AM_ERR_FORMAT, "must be relative", lambda s: re.sub(r" (sm_\d+/masked)", r" ../\1", s, count=1)),
    "absolute_path": (AM_ERR_FORMAT, "must be relative", lambda s: re.sub(r" (sm_\d+/masked)", r" /\1", s, count=1)),
    "duplicate_line": (AM_ERR_FORMAT, "listed twice",
                       lambda s: s + next(x for x in s.splitlines() if x.startswith("sm_")) + "\n"),
    "missing_kernel": (AM_ERR_FORMAT, "lacks the kernel explain_weighted",
                       lambda s: "\n".join(x for x in s.splitlines() if " explain_weighted " not in x) + "\n"),
    "no_kernels": (AM_ERR_FORMAT, "lists none of this library's kernels",
                   lambda s: "# empty\n\n" + _export_line(*VARIANTS[DEFAULT]) + "\n"),
    "comments_only": (AM_ERR_FORMAT, "lacks the export line `export dtype=<float32|float16> C=<int> HW=<int>",
                      lambda s: "# empty\n\n"),
    "no_export_line": (AM_ERR_FORMAT, "must be the export line `export dtype=<float32|float16> C=<int> HW=<int> "
                       "M=<int> p=<float> eps=<float>`", lambda s: re.sub(r"^export .*\n", "", s, flags=re.M)),
    "export_line_last": (AM_ERR_FORMAT, "must be the export line",
                         lambda s: re.sub(r"^(export .*\n)((?:.*\n)*)", r"\2\1", s, flags=re.M)),
    "export_twice": (AM_ERR_FORMAT, "a second export line (the first is line ",
                     lambda s: s + _export_line(*VARIANTS[DEFAULT]) + "\n"),
    "export_dtype": (AM_ERR_FORMAT, "export dtype 'bfloat16' is not one this library launches (float32, float16)",
                     lambda s: s.replace("dtype=float32", "dtype=bfloat16", 1)),
    "export_key_order": (AM_ERR_FORMAT, "export line field 3 is 'HW=32', expected C=",
                         lambda s: s.replace("C=64 HW=32", "HW=32 C=64", 1)),
    "export_fields": (AM_ERR_FORMAT, "the export line has 6 fields, expected 7",
                      lambda s: s.replace(" eps=1e-06", "", 1)),
    "export_bad_int": (AM_ERR_FORMAT, "export M '0' is not an integer in [1, ",
                       lambda s: s.replace(" M=5 ", " M=0 ", 1)),
    "export_bad_p": (AM_ERR_FORMAT, "export p '3.0x' is not a finite number > 0",
                     lambda s: s.replace(" p=3.0 ", " p=3.0x ", 1)),
    "export_nan_p": (AM_ERR_FORMAT, "export p 'nan' is not a finite number",
                     lambda s: s.replace(" p=3.0 ", " p=nan ", 1)),
    "export_bad_eps": (AM_ERR_FORMAT, "export eps '-1e-06' is not a finite number >= 0",
                       lambda s: s.replace(" eps=1e-06", " eps=-1e-06", 1)),
    "missing_cubin": (AM_ERR_IO, "cannot open the cubin of", "rm"),
    "not_a_cubin": (AM_ERR_FORMAT, "is not a cubin", "garbage"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_export(client, export_dir, tmp_path, target, case):
    code, needle, edit = MALFORMED[case]
    bad = _copy_export(export_dir, tmp_path / "export")
    table = bad / "kernels" / "launch.txt"
    if case == "missing_launch_txt":
        table.unlink()
    elif edit == "rm":
        (bad / "kernels" / target / "explain.cubin").unlink()
    elif edit == "garbage":
        (bad / "kernels" / target / "explain.cubin").write_bytes(b"not an ELF file")
    else:
        _edit_table(bad, edit)
        assert table.read_text() != (export_dir / "kernels" / "launch.txt").read_text()
    rc, msg = client(bad, "open")["open"]
    assert rc == code and needle in msg, (rc, msg)


def test_unknown_kernels_and_comments_are_ignored(client, export_dir, tmp_path, target):
    ok = _copy_export(export_dir, tmp_path / "export")
    extra = f"{target} future_kernel sym {target}/x.cubin 1 0 1 a,b\n"
    _edit_table(ok, lambda s: "  # leading comment\n\n" + s + extra)
    rc, msg = client(ok, "open")["open"]
    assert rc == (AM_OK if GPU else AM_ERR_NO_DRIVER), msg  # got past the table


# ---------------------------------------------------------------------------------------------------------------------
# The driver path against the mock libcuda.so.1
# ---------------------------------------------------------------------------------------------------------------------


def _info(variant: str, target: str) -> list:
    p, dtype = VARIANTS[variant]
    return [4 if dtype == "float32" else 2, SHAPE["C"], SHAPE["HW"], SHAPE["M"], p, EPS, target]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mock_info(client, mock_driver, exports, tmp_path, target, variant):
    """am_get_info reports launch.txt's export line (p parsed exactly) and the target in use."""
    env = _mock_env(mock_driver, exports[variant], target, tmp_path / "mock.log", AM_MOCK_CC=target[3:])
    res = client(exports[variant], "open", env=env)
    assert res["open"] == [AM_OK, ""] and res["info"] == _info(variant, target), res


@pytest.mark.parametrize("variant", ["p3-fp32", "p2.9-fp16"])
def test_mock_launch_marshalling(client, mock_driver, exports, tmp_path, target, variant):
    export = _copy_export(exports[variant], tmp_path / "export")
    # A larger grid constant and > 48 KiB of shared memory exercise the grid product and the opt-in attribute.
    _edit_table(export, lambda s: re.sub(rf"^({target} masked_gem_pool \S+ \S+ \d+) \d+ \d+ ", r"\1 65536 4 ", s,
                                         flags=re.M))
    log = tmp_path / "mock.log"
    res = client(export, "launch", env=_mock_env(mock_driver, export, target, log, AM_MOCK_CC=target[3:]))
    lines = log.read_text().splitlines()
    assert res["target"] == target and res["info"] == _info(variant, target), res
    assert res["info_null_out"][0] == AM_ERR_ARG and "out is NULL" in res["info_null_out"][1], res
    assert res["pool"] == res["explain"] == res["explain_weighted"] == [0, ""], res
    assert [ln for ln in lines if ln.startswith("load ")] == ["load masked_gem_pool", "load explain",
                                                              "load explain_weighted"]
    assert "set_attribute masked_gem_pool 8 65536" in lines  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    hexs = [f"0x{p:x}" for p in res["pool_ptrs"]]
    launches = [ln for ln in lines if ln.startswith("launch ")]
    assert launches[0] == ("launch masked_gem_pool grid=12,1,1 block=128,1,1 shared=65536 stream=0x5000 extra=(nil) "
                           f"params={','.join(hexs)},0x0,0x0")
    q, g, ids, w, d, dk, sh, dh, sc, err = (f"0x{p:x}" for p in res["explain_ptrs"])
    tail = "4,7,4,0x0,0x0"  # K, N, stride_iq = K, then the two scratch pointers
    assert launches[1] == ("launch explain grid=12,1,1 block=128,1,1 shared=32 stream=0x5000 extra=(nil) "
                           f"params={q},{g},{ids},{d},{dk},{sh},{dh},{sc},{err},{tail}")
    assert launches[2] == ("launch explain_weighted grid=12,1,1 block=128,1,1 shared=32 stream=0x5000 extra=(nil) "
                           f"params={q},{g},{ids},{w},{d},{dk},{sh},{dh},{sc},{err},{tail}")
    assert len(launches) == 3  # the invalid calls below never reached the driver
    # err is zeroed on the launch's stream right before each explain launch
    for launch in launches[1:]:
        assert lines[lines.index(launch) - 1] == f"memset32 {err} 0 1 stream=0x5000"
    for name, needle in (("pool_batch0", "batch = 0"), ("pool_grid_overflow", "more than CUDA's 2^31-1"),
                         ("pool_misaligned", "not 16-byte aligned"), ("pool_null", "f_k is a NULL device pointer"),
                         ("explain_overflow", f"Q*K = {46341**2} gives"), ("explain_k0", "K = 0"),
                         ("explain_null_err", "err is a NULL device pointer")):
        rc, msg = res[name]
        assert rc == AM_ERR_ARG and needle in msg, (name, res[name])
    assert res["roundtrip"] == [1, 7, 7, 4]
    assert res["synchronize_ctx"][0] == res["synchronize_stream"][0] == 0
    assert "synchronize context" in lines and "synchronize stream=0x5000" in lines
    assert not [ln for ln in lines if ln.startswith("error")], lines  # every call had the context current
    assert lines[-1] == "final retained=0 pushed=0 modules=0 allocs=0"  # balanced push/pop, nothing leaked


def _replay_dir(case: Path, out: Path, dtype: str, f_k_factor: float = 1.0) -> Path:
    """What the kernels would write for `case`: its references, the pooling outputs in the export's dtype."""
    shutil.copytree(case, out)
    for name in ("f", "f_k"):
        ref = np.fromfile(case / f"{name}.bin", dtype="<f4") * (f_k_factor if name == "f_k" else 1.0)
        ref.astype("<f2" if dtype == "float16" else "<f4").tofile(out / f"{name}.bin")
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mock_program_replay(clib, mock_driver, exports, cases, tmp_path, target, variant):
    """The test program end to end on the mock driver replaying the expected outputs; then a perturbed reference."""
    export, case, dtype = exports[variant], cases[variant], VARIANTS[variant][1]
    env = {**os.environ, **_mock_env(mock_driver, export, target, tmp_path / "mock.log"), "AM_MOCK_CC": target[3:]}
    replay = _replay_dir(case, tmp_path / "replay", dtype)
    proc = _run([clib["prog"], export, case], env={**env, "AM_MOCK_REPLAY": str(replay)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "PASSED: 0 check(s) failed" in out, out
    assert f"target {target}, export dtype {dtype} C 64 HW 32 M 5 p " in out, out
    assert "ok   bad id counted once, its d is NaN" in out and "ok   explain_weighted scores" in out, out
    assert "ok   float16 <-> float32 conversions" in out and "ok   pooling inputs are exact in the export dtype" in out
    tol = "2e-03" if dtype == "float16" else "1e-04"
    err = float(re.search(rf"ok   masked_gem_pool f_k: rel err (\S+) \(tol {tol}\)", out).group(1))
    assert (0 < err < 5e-4) if dtype == "float16" else err < 1e-7, out  # float16 rounding of the outputs, or none
    # A perturbed f_k is replayed but compared with the original: beyond the dtype's tolerance.
    factor = 1.01 if dtype == "float16" else 1.001
    perturbed = _replay_dir(case, tmp_path / "perturbed", dtype, f_k_factor=factor)
    proc = _run([clib["prog"], export, case], env={**env, "AM_MOCK_REPLAY": str(perturbed)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "FAILED: 1 check(s) failed" in out, out
    err = float(re.search(r"FAIL masked_gem_pool f_k: rel err (\S+)", out).group(1))
    assert err == pytest.approx(factor - 1.0, rel=0.1), out
    assert "ok   masked_gem_pool f:" in out, out


def test_mock_program_pooling_inputs_not_in_dtype(clib, mock_driver, exports, cases, tmp_path, target):
    """A float16 case whose inputs float16 cannot hold exactly is flagged (its references would not be the kernel's)."""
    variant = "p2.9-fp16"
    case = shutil.copytree(cases[variant], tmp_path / "case")
    np.full(SHAPE["C"], 1.0 + 2.0**-12, dtype="<f4").tofile(case / "scale.bin")  # between two float16 values
    env = {**os.environ, **_mock_env(mock_driver, exports[variant], target, tmp_path / "mock.log"),
           "AM_MOCK_CC": target[3:], "AM_MOCK_REPLAY": str(_replay_dir(case, tmp_path / "replay", "float16"))}
    proc = _run([clib["prog"], exports[variant], case], env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and f"FAIL pooling inputs are exact in the export dtype: {SHAPE['C']} value(s)" in out


def test_program_case_mismatch(clib, mock_driver, exports, cases, tmp_path, target):
    """The test program refuses a case of another dtype or shape than the export's (exit 2), naming each difference."""
    env = {**os.environ, **_mock_env(mock_driver, export_dir := exports[DEFAULT], target, tmp_path / "mock.log"),
           "AM_MOCK_CC": target[3:]}
    proc = _run([clib["prog"], export_dir, cases["p2.9-fp16"]], env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not match the export (am_get_info): dtype float16 (export float32); p 2.9 " \
           "(export 3);" in proc.stderr, proc.stderr
    other = shutil.copytree(cases[DEFAULT], tmp_path / "case")
    text = (other / "case.txt").read_text()
    (other / "case.txt").write_text(text.replace("\nC 64\n", "\nC 32\n").replace("\nM 5\n", "\nM 6\n"))
    proc = _run([clib["prog"], export_dir, other], env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "(am_get_info): C 32 (export 64); M 6 (export 5);" in proc.stderr, proc.stderr


def test_mock_no_target(client, mock_driver, export_dir, tmp_path, target):
    log = tmp_path / "mock.log"
    other = "90" if target.startswith("sm_8") else "86"  # another major: no fallback
    res = client(export_dir, "open", env=_mock_env(mock_driver, export_dir, target, log, AM_MOCK_CC=other))
    rc, msg = res["open"]
    assert rc == AM_ERR_NO_TARGET, msg
    assert f"compute capability {other[0]}.{other[1]} (sm_{other})" in msg and f"compiled for {target}" in msg
    assert f"--targets sm_{other}" in msg
    assert log.read_text().splitlines()[-1] == "final retained=0 pushed=0 modules=0 allocs=0"


def test_mock_no_device(clib, client, mock_driver, export_dir, case_dir, tmp_path, target):
    log = tmp_path / "mock.log"
    env = _mock_env(mock_driver, export_dir, target, log)
    rc, msg = client(export_dir, "open", "1", env=env)["open"]
    assert rc == AM_ERR_NO_DEVICE and "device 1 requested but 1 device(s)" in msg, msg
    proc = _run([clib["prog"], export_dir, case_dir], env={**os.environ, **env, "AM_MOCK_INIT": "100"})
    assert proc.returncode == 77, proc.stdout + proc.stderr
    assert proc.stdout.startswith("SKIP: AM_ERR_NO_DEVICE") and "CUDA_ERROR_NO_DEVICE" in proc.stdout


def _retarget(src: Path, dst: Path, src_target: str, targets: dict[str, int]) -> Path:
    """A copy of export `src` whose kernels are listed as `targets` (name -> the pooling's shared_bytes) instead of
    `src_target`. The cubins are copies: neither the library nor the mock reads the architecture from the ELF."""
    shutil.copytree(src, dst)
    table = dst / "kernels" / "launch.txt"
    lines = table.read_text().splitlines()
    head = [x for x in lines if not x.startswith(f"{src_target} ")]
    body = [x for x in lines if x.startswith(f"{src_target} ")]
    for name, shared in targets.items():
        if name != src_target:
            shutil.copytree(dst / "kernels" / src_target, dst / "kernels" / name)
        for line in body:
            cols = line.replace(f"{src_target}/", f"{name}/").split()
            cols[0] = name
            if cols[1] == "masked_gem_pool":
                cols[5] = str(shared)
            head.append(" ".join(cols))
    if src_target not in targets:
        shutil.rmtree(dst / "kernels" / src_target)
    table.write_text("\n".join(head) + "\n")
    return dst


# device compute capability, its opt-in shared memory (None: the mock's 232448), the export's targets with their
# pooling kernel's shared memory, and the target am_open must choose (or the NO_TARGET message's distinctive part).
FALLBACK = {
    "sm86_runs_sm80": ("86", None, {"sm_80": 65536, "sm_87": 70000}, "sm_80"),
    "sm89_runs_highest_lower": ("89", None, {"sm_80": 65536, "sm_87": 70000}, "sm_87"),
    "sm89_skips_too_big": ("89", 68000, {"sm_80": 65536, "sm_87": 70000}, "sm_80"),
    "exact_first": ("87", None, {"sm_80": 65536, "sm_87": 70000}, "sm_87"),
    "exact_sm80": ("80", None, {"sm_80": 65536, "sm_87": 70000}, "sm_80"),
    "sm86_sm80_too_big": ("86", 60000, {"sm_80": 65536},
                          "(sm_80 would run on it, but its masked_gem_pool kernel needs 65536 bytes of shared memory "
                          "per block and the device allows 60000)"),
    "sm86_only_sm90": ("86", None, {"sm_90": 65536}, "compiled for sm_90;"),
    "sm86_only_sm87": ("86", None, {"sm_87": 65536}, "compiled for sm_87;"),  # a later minor does not run
    "sm75_sm80": ("75", None, {"sm_80": 65536}, "compiled for sm_80;"),
    "sm91_sm90_arch_specific": ("91", None, {"sm_90": 65536},
                                "(sm_90 cubins are compiled for the arch-specific sm_90a, which runs on compute "
                                "capability 9.0 only)"),
}


@pytest.mark.parametrize("case", list(FALLBACK))
def test_mock_target_fallback(client, mock_driver, export_dir, tmp_path, target, case):
    cc, optin, targets, want = FALLBACK[case]
    export = _retarget(export_dir, tmp_path / "export", target, targets)
    log = tmp_path / "mock.log"
    env = _mock_env(mock_driver, export_dir, target, log, AM_MOCK_CC=cc,
                    **({"AM_MOCK_OPTIN": str(optin)} if optin else {}))
    res = client(export, "open", env=env)
    lines = log.read_text().splitlines()
    rc, msg = res["open"]
    if want.startswith("sm_"):
        assert rc == AM_OK and res["target"] == want and res["info"][-1] == want, res
        # the chosen target's cubins were loaded: its pooling kernel opted into its own shared memory size
        assert f"set_attribute masked_gem_pool 8 {targets[want]}" in lines, lines
    else:
        assert rc == AM_ERR_NO_TARGET and want in msg, msg
        assert f"compute capability {cc[0]}.{cc[1]} (sm_{cc})" in msg and f"--targets sm_{cc}" in msg, msg
        assert not [ln for ln in lines if ln.startswith("load ")], lines
    assert lines[-1] == "final retained=0 pushed=0 modules=0 allocs=0"
