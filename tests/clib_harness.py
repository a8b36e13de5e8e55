"""What the C launcher library's tests (tests/export/test_clib.py) feed it: the test case (random inputs and their
torch references, in the files the test program reads), the source of a mock libcuda.so.1, and a ctypes client."""

from pathlib import Path

import torch

SHAPE = {"B": 3, "C": 64, "HW": 32, "M": 5, "Q": 3, "K": 4, "N": 7}
H, W = 4, 8  # HW = 32
EPS = 1e-6


def write_case(out: Path, p: float, dtype: str, seed: int) -> None:
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
