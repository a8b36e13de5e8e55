/*
 * attrimeter_kernels.c: loads an AttriMeter export's AOT cubins and launches the fused kernels (see the header).
 *
 * The CUDA driver is reached at run time through dlopen("libcuda.so.1"), so the library links no CUDA library and
 * builds on machines that have the CUDA headers but no driver (CI, build containers). cuda.h is used for the types,
 * the enum values and, through its own macros, the driver's exported symbol names: cuda.h maps e.g. cuMemAlloc to
 * cuMemAlloc_v2 and cuCtxPushCurrent to cuCtxPushCurrent_v2, the ABI versions a program linking -lcuda would bind.
 * Each table entry below is declared with __typeof__ of cuda.h's prototype and looked up by the stringised,
 * macro-expanded name, so neither a prototype nor a versioned symbol name is written by hand.
 *
 * The launch contract (parameter order, grid = run-time size x constant, threads, dynamic shared memory) comes
 * from EXPORT/kernels/launch.txt, generated from Triton's compile metadata by attrimeter.export.aot; the parameter
 * lists this code marshals are compared with it before anything is loaded. Its export line (dtype, C, HW, M, p, eps:
 * what the cubins bake in) is required and handed to callers through am_get_info().
 */
#define _POSIX_C_SOURCE 200809L

#include "attrimeter_kernels.h"

#include <cuda.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if CUDA_VERSION < 11000
#error "attrimeter_kernels needs cuda.h from CUDA 11.0 or newer (versioned driver entry points)"
#endif

#define AM_STR2(x) #x
#define AM_STR(x) AM_STR2(x)

/* ------------------------------------------------------------------------------------------------------------------
 * Errors: one thread-local message.
 * ---------------------------------------------------------------------------------------------------------------- */

static _Thread_local char tl_error[2048];

__attribute__((format(printf, 2, 3))) static int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tl_error, sizeof tl_error, fmt, ap);
    va_end(ap);
    return code;
}

const char *am_last_error(void) { return tl_error; }

/* ------------------------------------------------------------------------------------------------------------------
 * The driver table: filled once (pthread_once), read-only afterwards.
 * ---------------------------------------------------------------------------------------------------------------- */

#define AM_DRIVER_FUNCS(X)                                                                                           \
    X(cuGetErrorName)                                                                                                \
    X(cuGetErrorString)                                                                                              \
    X(cuInit)                                                                                                        \
    X(cuDriverGetVersion)                                                                                            \
    X(cuDeviceGetCount)                                                                                              \
    X(cuDeviceGet)                                                                                                   \
    X(cuDeviceGetAttribute)                                                                                          \
    X(cuDevicePrimaryCtxRetain)                                                                                      \
    X(cuDevicePrimaryCtxRelease)                                                                                     \
    X(cuCtxPushCurrent)                                                                                              \
    X(cuCtxPopCurrent)                                                                                               \
    X(cuCtxSynchronize)                                                                                              \
    X(cuModuleLoadData)                                                                                              \
    X(cuModuleUnload)                                                                                                \
    X(cuModuleGetFunction)                                                                                           \
    X(cuFuncGetAttribute)                                                                                            \
    X(cuFuncSetAttribute)                                                                                            \
    X(cuLaunchKernel)                                                                                                \
    X(cuMemAlloc)                                                                                                    \
    X(cuMemFree)                                                                                                     \
    X(cuMemcpyHtoD)                                                                                                  \
    X(cuMemcpyDtoH)                                                                                                  \
    X(cuMemsetD32)                                                                                                   \
    X(cuMemsetD32Async)                                                                                              \
    X(cuStreamSynchronize)

/* Field names go through cuda.h's macros like the symbol names (drv.cuMemAlloc is drv.cuMemAlloc_v2). */
#define AM_DECLARE_FIELD(name) __typeof__(name) *name;
#define AM_SYMBOL_NAME(name) AM_STR(name),

static struct {
    int status; /* AM_OK, AM_ERR_NO_DRIVER or AM_ERR_NO_DEVICE */
    char message[768];
    int version; /* cuDriverGetVersion, e.g. 12040 */
    AM_DRIVER_FUNCS(AM_DECLARE_FIELD)
} drv;

static pthread_once_t drv_once = PTHREAD_ONCE_INIT;

static const char *cu_name(CUresult r) {
    const char *s = NULL;
    if (drv.cuGetErrorName == NULL || drv.cuGetErrorName(r, &s) != CUDA_SUCCESS || s == NULL) return "CUDA_ERROR_?";
    return s;
}

static const char *cu_string(CUresult r) {
    const char *s = NULL;
    if (drv.cuGetErrorString == NULL || drv.cuGetErrorString(r, &s) != CUDA_SUCCESS || s == NULL)
        return "unrecognised error code";
    return s;
}

static void drv_init(void) {
    static const char *const names[] = {AM_DRIVER_FUNCS(AM_SYMBOL_NAME)};
    void *slots[sizeof names / sizeof names[0]];
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        const char *why = dlerror();
        drv.status = AM_ERR_NO_DRIVER;
        snprintf(drv.message, sizeof drv.message,
                 "the CUDA driver is not available: dlopen(\"libcuda.so.1\") failed (%s); this machine has no NVIDIA "
                 "driver, or libcuda.so.1 is not on the loader path",
                 why ? why : "unknown reason");
        return;
    }
    for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i) {
        slots[i] = dlsym(lib, names[i]);
        if (slots[i] == NULL) {
            drv.status = AM_ERR_NO_DRIVER;
            snprintf(drv.message, sizeof drv.message,
                     "the CUDA driver libcuda.so.1 lacks the entry point %s: the driver is older than the CUDA %d.%d "
                     "headers this library was built with; update the NVIDIA driver",
                     names[i], CUDA_VERSION / 1000, CUDA_VERSION % 1000 / 10);
            return; /* the library stays loaded: other components of the process may use it */
        }
    }
    /* dlsym gives object pointers; copy them into the typed function pointers (POSIX guarantees the sizes agree). */
    {
        size_t i = 0;
#define AM_ASSIGN_FIELD(name) memcpy(&drv.name, &slots[i++], sizeof drv.name);
        AM_DRIVER_FUNCS(AM_ASSIGN_FIELD)
#undef AM_ASSIGN_FIELD
    }
    CUresult r = drv.cuInit(0);
    if (r != CUDA_SUCCESS) {
        drv.status = r == CUDA_ERROR_NO_DEVICE ? AM_ERR_NO_DEVICE : AM_ERR_NO_DRIVER;
        snprintf(drv.message, sizeof drv.message, "cuInit failed: %s (%d): %s%s", cu_name(r), (int)r, cu_string(r),
                 r == CUDA_ERROR_NO_DEVICE ? " (the driver is installed but no CUDA device is visible)" : "");
        return;
    }
    if (drv.cuDriverGetVersion(&drv.version) != CUDA_SUCCESS) drv.version = 0;
    drv.status = AM_OK;
}

static int driver_load(void) {
    int rc = pthread_once(&drv_once, drv_init);
    if (rc != 0) return fail(AM_ERR_NO_DRIVER, "pthread_once failed: %s", strerror(rc));
    if (drv.status != AM_OK) return fail(drv.status, "%s", drv.message);
    return AM_OK;
}

static int cuda_fail(const char *op, const char *call, CUresult r) {
    return fail(AM_ERR_CUDA, "%s: %s failed: %s (%d): %s", op, call, cu_name(r), (int)r, cu_string(r));
}

/* ------------------------------------------------------------------------------------------------------------------
 * The kernels this library launches, with the parameter order its marshalling code below was written for.
 * ---------------------------------------------------------------------------------------------------------------- */

enum { K_POOL = 0, K_EXPLAIN = 1, K_EXPLAIN_W = 2, K_COUNT = 3 };

static const char *const kernel_names[K_COUNT] = {"masked_gem_pool", "explain", "explain_weighted"};
static const char *const kernel_params[K_COUNT] = {
    "f_ptr,z_ptr,scale_ptr,shift_ptr,out_g_ptr,out_k_ptr,global_scratch,profile_scratch",
    "q_ptr,g_ptr,ids_ptr,d_ptr,dk_ptr,sh_ptr,dhat_ptr,score_ptr,err_ptr,K,N,stride_iq,global_scratch,profile_scratch",
    "q_ptr,g_ptr,ids_ptr,w_ptr,d_ptr,dk_ptr,sh_ptr,dhat_ptr,score_ptr,err_ptr,K,N,stride_iq,global_scratch,"
    "profile_scratch",
};

#define AM_TARGET_LEN 16
_Static_assert(sizeof(((am_info *)0)->target) == AM_TARGET_LEN, "am_info.target holds a target name");
#define AM_SYMBOL_LEN 256
#define AM_RELPATH_LEN 512
#define AM_MAX_LINE 8192
#define AM_MAX_SHARED (1u << 20)
#define AM_MAX_GRID_CONST (1u << 20)
#define AM_MAX_DIM (1u << 24) /* bound on C, HW and M in the export line */

typedef struct {
    char target[AM_TARGET_LEN];
    int kernel; /* K_* */
    int line;
    char symbol[AM_SYMBOL_LEN];
    char cubin[AM_RELPATH_LEN];
    unsigned threads, shared, grid_const;
} entry;

typedef struct {
    entry *entries;
    size_t count, cap;
    char *path;    /* .../kernels/launch.txt, for messages */
    int info_line; /* the export line's number, 0 until it is read */
    am_info info;  /* from the export line (target still empty) */
} table;

struct am_kernels {
    CUdevice device;
    int ordinal;
    CUcontext ctx;
    char target[AM_TARGET_LEN];
    am_info info;
    struct {
        CUmodule module;
        CUfunction function;
        unsigned threads, shared, grid_const;
    } k[K_COUNT];
};

/* ------------------------------------------------------------------------------------------------------------------
 * launch.txt parsing and validation (no driver needed).
 * ---------------------------------------------------------------------------------------------------------------- */

static int valid_target(const char *s) {
    if (strncmp(s, "sm_", 3) != 0) return 0;
    size_t i = 3, digits = 0;
    while (s[i] >= '0' && s[i] <= '9') ++i, ++digits;
    if (digits < 2 || digits > 3) return 0;
    if (s[i] >= 'a' && s[i] <= 'z') ++i; /* e.g. sm_90a */
    return s[i] == '\0';
}

static int valid_identifier(const char *s) {
    if (!(*s == '_' || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z'))) return 0;
    for (; *s; ++s)
        if (!(*s == '_' || (*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9'))) return 0;
    return 1;
}

/* A relative path inside the kernels folder: not absolute, no '..' component, no backslash. */
static int valid_relpath(const char *s) {
    if (*s == '\0' || *s == '/' || strchr(s, '\\') != NULL) return 0;
    for (const char *c = s; *c;) {
        const char *end = strchr(c, '/');
        size_t n = end ? (size_t)(end - c) : strlen(c);
        if (n == 0 || (n == 2 && c[0] == '.' && c[1] == '.')) return 0;
        c += n + (end ? 1 : 0);
        if (end && *c == '\0') return 0;
    }
    return 1;
}

static int parse_uint(const char *s, unsigned lo, unsigned hi, unsigned *out) {
    if (*s < '0' || *s > '9') return 0;
    errno = 0;
    char *end = NULL;
    unsigned long v = strtoul(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi) return 0;
    *out = (unsigned)v;
    return 1;
}

/* Name the first parameter that differs from the expected list. */
static int param_mismatch(const table *t, const entry *e, const char *got) {
    const char *want = kernel_params[e->kernel];
    if (strcmp(want, got) == 0) return AM_OK;
    const char *a = want, *b = got;
    int index = 1;
    for (;;) {
        size_t na = strcspn(a, ","), nb = strcspn(b, ",");
        if (na != nb || strncmp(a, b, na) != 0) {
            char wa[64], wb[64];
            snprintf(wa, sizeof wa, "%.*s", (int)(na < 60 ? na : 60), a);
            snprintf(wb, sizeof wb, "%.*s", (int)(nb < 60 ? nb : 60), b);
            return fail(AM_ERR_FORMAT,
                        "%s:%d: kernel %s (%s) has a parameter list this library was not written for: parameter %d "
                        "is '%s' but this library passes '%s' there (launch.txt: %s; this library: %s); rebuild "
                        "libattrimeter_kernels from the same attrimeter version as the export, or re-export",
                        t->path, e->line, kernel_names[e->kernel], e->target, index, nb ? wb : "(none)",
                        na ? wa : "(none)", got, want);
        }
        if (a[na] == '\0' && b[nb] == '\0') break;
        a += na + (a[na] != '\0'); /* a list that ended stays at "" and shows as "(none)" */
        b += nb + (b[nb] != '\0');
        ++index;
    }
    return fail(AM_ERR_FORMAT, "%s:%d: kernel %s (%s): parameter list '%s' differs from this library's '%s'", t->path,
                e->line, kernel_names[e->kernel], e->target, got, want);
}

#define AM_EXPORT_LINE "export dtype=<float32|float16> C=<int> HW=<int> M=<int> p=<float> eps=<float>"

/* strtod in the "C" locale whatever the process's locale is (a host program may have called setlocale, which would
 * make strtod stop at the '.' of "2.9"); the whole string must be a finite number. */
static int parse_double(const char *s, double *out) {
    if (*s == '\0' || *s == ' ') return 0;
    locale_t c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0), previous = (locale_t)0;
    if (c != (locale_t)0) previous = uselocale(c);
    errno = 0;
    char *end = NULL;
    double v = strtod(s, &end);
    int ok = errno == 0 && end != s && *end == '\0' && isfinite(v);
    if (c != (locale_t)0) {
        uselocale(previous);
        freelocale(c);
    }
    if (ok) *out = v;
    return ok;
}

/* The export line, `export dtype=... C=... HW=... M=... p=... eps=...`, keys in this order. */
static int parse_export(table *t, char *const *cols, int n, int lineno) {
    static const char *const keys[6] = {"dtype", "C", "HW", "M", "p", "eps"};
    if (t->info_line != 0)
        return fail(AM_ERR_FORMAT, "%s:%d: a second export line (the first is line %d)", t->path, lineno,
                    t->info_line);
    if (n != 7)
        return fail(AM_ERR_FORMAT, "%s:%d: the export line has %d fields, expected 7: `%s`", t->path, lineno, n,
                    AM_EXPORT_LINE);
    const char *value[6];
    for (int i = 0; i < 6; ++i) {
        size_t len = strlen(keys[i]);
        if (strncmp(cols[i + 1], keys[i], len) != 0 || cols[i + 1][len] != '=')
            return fail(AM_ERR_FORMAT, "%s:%d: export line field %d is '%.60s', expected %s=...: `%s`", t->path,
                        lineno, i + 2, cols[i + 1], keys[i], AM_EXPORT_LINE);
        value[i] = cols[i + 1] + len + 1;
    }
    am_info info;
    memset(&info, 0, sizeof info);
    if (strcmp(value[0], "float32") == 0)
        info.dtype_bytes = 4;
    else if (strcmp(value[0], "float16") == 0)
        info.dtype_bytes = 2;
    else
        return fail(AM_ERR_FORMAT,
                    "%s:%d: export dtype '%.40s' is not one this library launches (float32, float16); rebuild "
                    "libattrimeter_kernels from the same attrimeter version as the export",
                    t->path, lineno, value[0]);
    int *dims[3] = {&info.C, &info.HW, &info.M};
    for (int i = 0; i < 3; ++i) {
        unsigned v = 0;
        if (!parse_uint(value[i + 1], 1, AM_MAX_DIM, &v))
            return fail(AM_ERR_FORMAT, "%s:%d: export %s '%.40s' is not an integer in [1, %u]", t->path, lineno,
                        keys[i + 1], value[i + 1], AM_MAX_DIM);
        *dims[i] = (int)v;
    }
    if (!parse_double(value[4], &info.p) || !(info.p > 0.0))
        return fail(AM_ERR_FORMAT, "%s:%d: export p '%.40s' is not a finite number > 0", t->path, lineno, value[4]);
    if (!parse_double(value[5], &info.eps) || !(info.eps >= 0.0))
        return fail(AM_ERR_FORMAT, "%s:%d: export eps '%.40s' is not a finite number >= 0", t->path, lineno,
                    value[5]);
    t->info = info;
    t->info_line = lineno;
    return AM_OK;
}

static int parse_line(table *t, char *line, int lineno) {
    char *save = NULL, *cols[9];
    int n = 0;
    for (char *tok = strtok_r(line, " \t\r\n", &save); tok != NULL; tok = strtok_r(NULL, " \t\r\n", &save)) {
        if (n < 9) cols[n] = tok;
        ++n;
    }
    if (n == 0) return AM_OK;
    if (strcmp(cols[0], "export") == 0) return parse_export(t, cols, n, lineno); /* reads cols only if n == 7 */
    if (t->info_line == 0)
        return fail(AM_ERR_FORMAT,
                    "%s:%d: the first line (after comments) must be the export line `%s`, which says the dtype and "
                    "shapes the kernels were compiled for; this launch.txt lacks it (written by an older attrimeter?): "
                    "re-export",
                    t->path, lineno, AM_EXPORT_LINE);
    if (n != 8)
        return fail(AM_ERR_FORMAT,
                    "%s:%d: expected 8 columns (target kernel symbol cubin threads shared_bytes grid_x_const "
                    "params), got %d",
                    t->path, lineno, n);
    int kernel = -1;
    for (int i = 0; i < K_COUNT; ++i)
        if (strcmp(cols[1], kernel_names[i]) == 0) kernel = i;
    if (!valid_target(cols[0]) || strlen(cols[0]) >= AM_TARGET_LEN)
        return fail(AM_ERR_FORMAT, "%s:%d: target '%s' is not of the form sm_XX", t->path, lineno, cols[0]);
    if (kernel < 0) return AM_OK; /* a kernel this library does not launch (a newer export): ignored */
    entry e;
    memset(&e, 0, sizeof e);
    e.kernel = kernel;
    e.line = lineno;
    strcpy(e.target, cols[0]);
    if (!valid_identifier(cols[2]) || strlen(cols[2]) >= AM_SYMBOL_LEN)
        return fail(AM_ERR_FORMAT, "%s:%d: entry symbol '%.80s' is not a C identifier", t->path, lineno, cols[2]);
    strcpy(e.symbol, cols[2]);
    if (!valid_relpath(cols[3]) || strlen(cols[3]) >= AM_RELPATH_LEN)
        return fail(AM_ERR_FORMAT, "%s:%d: cubin path '%.200s' must be relative to the kernels folder, without '..'",
                    t->path, lineno, cols[3]);
    strcpy(e.cubin, cols[3]);
    if (!parse_uint(cols[4], 1, 1024, &e.threads))
        return fail(AM_ERR_FORMAT, "%s:%d: threads '%.40s' is not an integer in [1, 1024]", t->path, lineno, cols[4]);
    if (!parse_uint(cols[5], 0, AM_MAX_SHARED, &e.shared))
        return fail(AM_ERR_FORMAT, "%s:%d: shared_bytes '%.40s' is not an integer in [0, %u]", t->path, lineno,
                    cols[5], AM_MAX_SHARED);
    if (!parse_uint(cols[6], 1, AM_MAX_GRID_CONST, &e.grid_const))
        return fail(AM_ERR_FORMAT, "%s:%d: grid_x_const '%.40s' is not an integer in [1, %u]", t->path, lineno,
                    cols[6], AM_MAX_GRID_CONST);
    int rc = param_mismatch(t, &e, cols[7]);
    if (rc != AM_OK) return rc;
    for (size_t i = 0; i < t->count; ++i)
        if (t->entries[i].kernel == kernel && strcmp(t->entries[i].target, e.target) == 0)
            return fail(AM_ERR_FORMAT, "%s:%d: %s %s is listed twice (first on line %d)", t->path, lineno, e.target,
                        kernel_names[kernel], t->entries[i].line);
    if (t->count == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 16;
        entry *grown = realloc(t->entries, cap * sizeof *grown);
        if (grown == NULL) return fail(AM_ERR_IO, "out of memory reading %s", t->path);
        t->entries = grown;
        t->cap = cap;
    }
    t->entries[t->count++] = e;
    return AM_OK;
}

static char *join_path(const char *dir, const char *rel) {
    size_t n = strlen(dir) + 1 + strlen(rel) + 1;
    char *p = malloc(n);
    if (p != NULL) snprintf(p, n, "%s/%s", dir, rel);
    return p;
}

/* Comma-separated distinct targets of the table, for messages. */
static void list_targets(const table *t, char *buf, size_t size) {
    size_t used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < t->count; ++i) {
        int seen = 0;
        for (size_t j = 0; j < i; ++j) seen |= strcmp(t->entries[j].target, t->entries[i].target) == 0;
        if (seen) continue;
        int w = snprintf(buf + used, size - used, "%s%s", used ? ", " : "", t->entries[i].target);
        if (w < 0 || (size_t)w >= size - used) break;
        used += (size_t)w;
    }
}

static int check_cubin_file(const table *t, const char *kernels_dir, const entry *e) {
    char *path = join_path(kernels_dir, e->cubin);
    if (path == NULL) return fail(AM_ERR_IO, "out of memory");
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        int rc = fail(AM_ERR_IO, "cannot open the cubin of %s %s (%s:%d): %s: %s", e->target,
                      kernel_names[e->kernel], t->path, e->line, path, strerror(errno));
        free(path);
        return rc;
    }
    unsigned char magic[4] = {0};
    size_t got = fread(magic, 1, 4, f);
    fclose(f);
    int rc = AM_OK;
    if (got != 4 || magic[0] != 0x7f || magic[1] != 'E' || magic[2] != 'L' || magic[3] != 'F')
        rc = fail(AM_ERR_FORMAT, "%s is not a cubin (no ELF header)", path);
    free(path);
    return rc;
}

/* Parse and validate EXPORT/kernels/launch.txt: columns, parameter lists, complete targets, cubin files. */
static int load_table(const char *kernels_dir, table *t) {
    memset(t, 0, sizeof *t);
    t->path = join_path(kernels_dir, "launch.txt");
    if (t->path == NULL) return fail(AM_ERR_IO, "out of memory");
    FILE *f = fopen(t->path, "r");
    if (f == NULL)
        return fail(AM_ERR_IO,
                    "cannot open %s: %s (not an attrimeter export folder, or it was exported without the AOT "
                    "kernels: run `attrimeter export` with kernel targets)",
                    t->path, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int lineno = 0, rc = AM_OK;
    while (rc == AM_OK && (len = getline(&line, &cap, f)) >= 0) {
        ++lineno;
        if ((size_t)len > AM_MAX_LINE)
            rc = fail(AM_ERR_FORMAT, "%s:%d: line longer than %d characters", t->path, lineno, AM_MAX_LINE);
        else if (memchr(line, '\0', (size_t)len) != NULL)
            rc = fail(AM_ERR_FORMAT, "%s:%d: NUL byte in a text file", t->path, lineno);
        else if (line[strspn(line, " \t")] != '#')
            rc = parse_line(t, line, lineno);
    }
    if (rc == AM_OK && ferror(f)) rc = fail(AM_ERR_IO, "error reading %s: %s", t->path, strerror(errno));
    free(line);
    fclose(f);
    if (rc != AM_OK) return rc;
    if (t->info_line == 0)
        return fail(AM_ERR_FORMAT,
                    "%s lacks the export line `%s`, which says the dtype and shapes the kernels were compiled for "
                    "(written by an older attrimeter?): re-export",
                    t->path, AM_EXPORT_LINE);
    if (t->count == 0) return fail(AM_ERR_FORMAT, "%s lists none of this library's kernels", t->path);
    for (size_t i = 0; i < t->count; ++i) {
        for (int kernel = 0; kernel < K_COUNT; ++kernel) {
            int found = 0;
            for (size_t j = 0; j < t->count; ++j)
                found |= t->entries[j].kernel == kernel && strcmp(t->entries[j].target, t->entries[i].target) == 0;
            if (!found)
                return fail(AM_ERR_FORMAT, "%s: target %s lacks the kernel %s", t->path, t->entries[i].target,
                            kernel_names[kernel]);
        }
        rc = check_cubin_file(t, kernels_dir, &t->entries[i]);
        if (rc != AM_OK) return rc;
    }
    return AM_OK;
}

static void free_table(table *t) {
    free(t->entries);
    free(t->path);
    memset(t, 0, sizeof *t);
}

/* ------------------------------------------------------------------------------------------------------------------
 * Open / close.
 * ---------------------------------------------------------------------------------------------------------------- */

static int read_file(const char *path, char **data) {
    *data = NULL;
    FILE *f = fopen(path, "rb");
    if (f == NULL) return fail(AM_ERR_IO, "cannot open %s: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        len += fread(buf + len, 1, cap - len, f);
        if (len < cap) break;
        char *grown = cap > ((size_t)1 << 30) ? NULL : realloc(buf, cap * 2);
        if (grown == NULL) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = grown;
        cap *= 2;
    }
    int bad = buf == NULL || ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return fail(AM_ERR_IO, "cannot read %s (I/O error or larger than 1 GiB)", path);
    }
    *data = buf;
    return AM_OK;
}

static void unload_modules(am_kernels *k) {
    for (int i = 0; i < K_COUNT; ++i) {
        if (k->k[i].module != NULL) drv.cuModuleUnload(k->k[i].module);
        k->k[i].module = NULL;
        k->k[i].function = NULL;
    }
}

static int load_kernel(am_kernels *k, const char *kernels_dir, const entry *e, int optin_shared) {
    char op[96];
    snprintf(op, sizeof op, "am_open(%s %s)", e->target, kernel_names[e->kernel]);
    char *path = join_path(kernels_dir, e->cubin), *image = NULL;
    if (path == NULL) return fail(AM_ERR_IO, "out of memory");
    int rc = read_file(path, &image);
    if (rc != AM_OK) {
        free(path);
        return rc;
    }
    CUmodule module = NULL;
    CUresult r = drv.cuModuleLoadData(&module, image);
    free(image);
    if (r != CUDA_SUCCESS) {
        rc = fail(r == CUDA_ERROR_NO_BINARY_FOR_GPU ? AM_ERR_NO_TARGET
                  : r == CUDA_ERROR_INVALID_IMAGE    ? AM_ERR_FORMAT
                                                     : AM_ERR_CUDA,
                  "%s: cuModuleLoadData(%s) failed: %s (%d): %s", op, path, cu_name(r), (int)r, cu_string(r));
        free(path);
        return rc;
    }
    free(path);
    k->k[e->kernel].module = module;
    CUfunction fn = NULL;
    r = drv.cuModuleGetFunction(&fn, module, e->symbol);
    if (r != CUDA_SUCCESS) return cuda_fail(op, e->symbol, r);
    int max_threads = 0, static_shared = 0;
    r = drv.cuFuncGetAttribute(&max_threads, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, fn);
    if (r != CUDA_SUCCESS) return cuda_fail(op, "cuFuncGetAttribute(MAX_THREADS_PER_BLOCK)", r);
    if ((unsigned)max_threads < e->threads)
        return fail(AM_ERR_CUDA, "%s: %s allows at most %d threads per block on this device, launch.txt asks %u", op,
                    e->symbol, max_threads, e->threads);
    r = drv.cuFuncGetAttribute(&static_shared, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn);
    if (r != CUDA_SUCCESS) return cuda_fail(op, "cuFuncGetAttribute(SHARED_SIZE_BYTES)", r);
    if (e->shared > 48u * 1024u) {
        /* Above 48 KiB dynamic shared memory must be opted into, up to the device's per-block limit. */
        if ((long)e->shared + static_shared > optin_shared)
            return fail(AM_ERR_NO_TARGET,
                        "%s: the kernel needs %u + %d bytes of shared memory but this device allows %d per block",
                        op, e->shared, static_shared, optin_shared);
        r = drv.cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, (int)e->shared);
        if (r != CUDA_SUCCESS) return cuda_fail(op, "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", r);
    }
    k->k[e->kernel].function = fn;
    k->k[e->kernel].threads = e->threads;
    k->k[e->kernel].shared = e->shared;
    k->k[e->kernel].grid_const = e->grid_const;
    return AM_OK;
}

/* sm_XY -> 10 * X + Y (sm_86 -> 86, sm_100 -> 100); -1 for a target with a suffix (sm_90a: arch-specific). */
static int target_number(const char *target) {
    int v = 0;
    const char *c = target + 3; /* valid_target checked the "sm_" and the 2 or 3 digits */
    for (; *c >= '0' && *c <= '9'; ++c) v = 10 * v + (*c - '0');
    return *c == '\0' ? v : -1;
}

/* Fill chosen[] with the entries of `target`; 0 if the export lacks it (load_table checked that targets are whole). */
static int select_target(const table *t, const char *target, const entry *chosen[K_COUNT]) {
    for (int i = 0; i < K_COUNT; ++i) chosen[i] = NULL;
    for (size_t i = 0; i < t->count; ++i)
        if (strcmp(t->entries[i].target, target) == 0) chosen[t->entries[i].kernel] = &t->entries[i];
    return chosen[K_POOL] != NULL;
}

/* The device's own sm_XY if the export has it. Otherwise, for major < 9, the highest sm_XZ of the same major with
 * Z < Y whose every kernel's dynamic shared memory fits the device's opt-in limit: a cubin runs on devices of its
 * major and a later minor (sm_80 on sm_86/sm_89). Not for major >= 9: Triton compiles those for the arch-specific
 * sm_90a / sm_100a, which run on that one compute capability only. */
static int choose_target(const table *t, int device, int major, int minor, int optin, char target[AM_TARGET_LEN],
                         const entry *chosen[K_COUNT]) {
    snprintf(target, AM_TARGET_LEN, "sm_%d%d", major, minor);
    if (select_target(t, target, chosen)) return AM_OK;
    const entry *best = NULL, *too_big = NULL, *specific = NULL;
    int best_cc = -1, big_cc = -1;
    for (size_t i = 0; i < t->count; ++i) {
        const entry *e = &t->entries[i];
        int cc = target_number(e->target);
        if (e->kernel != K_POOL || cc < 0 || cc / 10 != major || cc % 10 >= minor) continue; /* one per target */
        if (major >= 9) {
            specific = e;
            continue;
        }
        const entry *largest = e;
        for (size_t j = 0; j < t->count; ++j)
            if (strcmp(t->entries[j].target, e->target) == 0 && t->entries[j].shared > largest->shared)
                largest = &t->entries[j];
        if (largest->shared > (unsigned)optin) {
            if (cc > big_cc) {
                too_big = largest;
                big_cc = cc;
            }
        } else if (cc > best_cc) {
            best = e;
            best_cc = cc;
        }
    }
    if (best != NULL) {
        strcpy(target, best->target);
        select_target(t, target, chosen);
        return AM_OK;
    }
    char have[512], note[320] = "";
    list_targets(t, have, sizeof have);
    if (too_big != NULL)
        snprintf(note, sizeof note,
                 " (%s would run on it, but its %s kernel needs %u bytes of shared memory per block and the device "
                 "allows %d)",
                 too_big->target, kernel_names[too_big->kernel], too_big->shared, optin);
    else if (specific != NULL)
        snprintf(note, sizeof note,
                 " (%s cubins are compiled for the arch-specific %sa, which runs on compute capability %d.%d only)",
                 specific->target, specific->target, target_number(specific->target) / 10,
                 target_number(specific->target) % 10);
    return fail(AM_ERR_NO_TARGET,
                "%s: no kernels for this GPU: device %d has compute capability %d.%d (sm_%d%d) but the export was "
                "compiled for %s%s; re-export with the target added, e.g. `attrimeter export ... --targets sm_%d%d`",
                t->path, device, major, minor, major, minor, have, note, major, minor);
}

int am_open(const char *export_dir, int device, am_kernels **out) {
    if (out == NULL) return fail(AM_ERR_ARG, "am_open: out is NULL");
    *out = NULL;
    if (export_dir == NULL || *export_dir == '\0') return fail(AM_ERR_ARG, "am_open: export_dir is NULL or empty");
    if (device < 0) return fail(AM_ERR_ARG, "am_open: device %d is negative", device);

    /* 1. The export, before the driver: a broken export is reported as such on any machine. */
    char *kernels_dir = join_path(export_dir, "kernels");
    if (kernels_dir == NULL) return fail(AM_ERR_IO, "out of memory");
    table t;
    int rc = load_table(kernels_dir, &t);
    if (rc != AM_OK) goto done;

    /* 2. The driver and the device. */
    rc = driver_load();
    if (rc != AM_OK) goto done;
    int count = 0;
    CUresult r = drv.cuDeviceGetCount(&count);
    if (r != CUDA_SUCCESS) {
        rc = cuda_fail("am_open", "cuDeviceGetCount", r);
        goto done;
    }
    if (device >= count) {
        rc = fail(AM_ERR_NO_DEVICE, "am_open: CUDA device %d requested but %d device(s) are visible", device, count);
        goto done;
    }
    CUdevice dev;
    int major = 0, minor = 0, optin = 0;
    if ((r = drv.cuDeviceGet(&dev, device)) != CUDA_SUCCESS ||
        (r = drv.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)) != CUDA_SUCCESS ||
        (r = drv.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)) != CUDA_SUCCESS ||
        (r = drv.cuDeviceGetAttribute(&optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev)) !=
            CUDA_SUCCESS) {
        rc = cuda_fail("am_open", "cuDeviceGet/cuDeviceGetAttribute", r);
        goto done;
    }

    /* 3. The target: the device's own, else a compatible one (see choose_target). */
    char target[AM_TARGET_LEN];
    const entry *chosen[K_COUNT] = {NULL, NULL, NULL};
    if ((rc = choose_target(&t, device, major, minor, optin, target, chosen)) != AM_OK) goto done;

    /* 4. The primary context and the modules. */
    am_kernels *k = calloc(1, sizeof *k);
    if (k == NULL) {
        rc = fail(AM_ERR_IO, "out of memory");
        goto done;
    }
    k->device = dev;
    k->ordinal = device;
    strcpy(k->target, target);
    k->info = t.info;
    strcpy(k->info.target, target);
    if ((r = drv.cuDevicePrimaryCtxRetain(&k->ctx, dev)) != CUDA_SUCCESS) {
        rc = cuda_fail("am_open", "cuDevicePrimaryCtxRetain", r);
        free(k);
        goto done;
    }
    if ((r = drv.cuCtxPushCurrent(k->ctx)) != CUDA_SUCCESS) {
        rc = cuda_fail("am_open", "cuCtxPushCurrent", r);
        drv.cuDevicePrimaryCtxRelease(dev);
        free(k);
        goto done;
    }
    for (int i = 0; i < K_COUNT && rc == AM_OK; ++i) rc = load_kernel(k, kernels_dir, chosen[i], optin);
    if (rc != AM_OK) unload_modules(k);
    CUcontext popped;
    drv.cuCtxPopCurrent(&popped);
    if (rc != AM_OK) {
        drv.cuDevicePrimaryCtxRelease(dev);
        free(k);
        goto done;
    }
    *out = k;

done:
    free_table(&t);
    free(kernels_dir);
    return rc;
}

void am_close(am_kernels *k) {
    if (k == NULL) return;
    if (drv.cuCtxPushCurrent(k->ctx) == CUDA_SUCCESS) {
        unload_modules(k);
        CUcontext popped;
        drv.cuCtxPopCurrent(&popped);
    }
    drv.cuDevicePrimaryCtxRelease(k->device);
    free(k);
}

const char *am_target(const am_kernels *k) { return k ? k->target : NULL; }

int am_get_info(const am_kernels *k, am_info *out) {
    if (k == NULL || out == NULL) return fail(AM_ERR_ARG, "am_get_info: %s is NULL", k == NULL ? "the handle" : "out");
    *out = k->info;
    return AM_OK;
}

/* ------------------------------------------------------------------------------------------------------------------
 * Launches.
 * ---------------------------------------------------------------------------------------------------------------- */

static int enter(am_kernels *k, const char *op) {
    if (k == NULL) return fail(AM_ERR_ARG, "%s: the handle is NULL", op);
    CUresult r = drv.cuCtxPushCurrent(k->ctx);
    return r == CUDA_SUCCESS ? AM_OK : cuda_fail(op, "cuCtxPushCurrent", r);
}

static void leave(void) {
    CUcontext popped;
    drv.cuCtxPopCurrent(&popped);
}

static int check_pointers(const char *op, const char *const *names, const uint64_t *values, int n) {
    for (int i = 0; i < n; ++i) {
        if (values[i] == 0) return fail(AM_ERR_ARG, "%s: %s is a NULL device pointer", op, names[i]);
        if (values[i] % 16 != 0)
            return fail(AM_ERR_ARG,
                        "%s: %s = 0x%llx is not 16-byte aligned (the kernels were compiled for 16-byte aligned "
                        "buffers)",
                        op, names[i], (unsigned long long)values[i]);
    }
    return AM_OK;
}

static int launch(am_kernels *k, int kernel, void *stream, unsigned grid_x, void **params, const char *op) {
    CUresult r = drv.cuLaunchKernel(k->k[kernel].function, grid_x, 1, 1, k->k[kernel].threads, 1, 1,
                                    k->k[kernel].shared, (CUstream)stream, params, NULL);
    if (r != CUDA_SUCCESS)
        return fail(AM_ERR_CUDA, "%s: cuLaunchKernel(%s, grid %u, block %u, shared %u B) failed: %s (%d): %s", op,
                    kernel_names[kernel], grid_x, k->k[kernel].threads, k->k[kernel].shared, cu_name(r), (int)r,
                    cu_string(r));
    return AM_OK;
}

/* grid x = n * the kernel's constant factor, at most 2^31 - 1 (CUDA's limit). */
static int grid_x(const am_kernels *k, int kernel, uint64_t n, const char *what, const char *op, unsigned *out) {
    uint64_t total = n * (uint64_t)k->k[kernel].grid_const;
    if (total > (uint64_t)INT32_MAX)
        return fail(AM_ERR_ARG, "%s: %s = %llu gives %llu thread blocks, more than CUDA's 2^31-1; split the call", op,
                    what, (unsigned long long)n, (unsigned long long)total);
    *out = (unsigned)total;
    return AM_OK;
}

int am_masked_gem_pool(am_kernels *k, void *stream, uint64_t F, uint64_t Z, uint64_t scale, uint64_t shift,
                       uint64_t f, uint64_t f_k, int batch) {
    static const char *const op = "am_masked_gem_pool";
    static const char *const names[] = {"F", "Z", "scale", "shift", "f", "f_k"};
    if (k == NULL) return fail(AM_ERR_ARG, "%s: the handle is NULL", op);
    if (batch < 1) return fail(AM_ERR_ARG, "%s: batch = %d, must be >= 1", op, batch);
    CUdeviceptr ptr[6] = {F, Z, scale, shift, f, f_k};
    uint64_t check[6] = {F, Z, scale, shift, f, f_k};
    int rc = check_pointers(op, names, check, 6);
    unsigned gx = 0;
    if (rc == AM_OK) rc = grid_x(k, K_POOL, (uint64_t)batch, "batch", op, &gx);
    if (rc != AM_OK) return rc;
    CUdeviceptr scratch[2] = {0, 0}; /* Triton's global and profile scratch: size 0 in these kernels */
    void *params[8] = {&ptr[0], &ptr[1], &ptr[2], &ptr[3], &ptr[4], &ptr[5], &scratch[0], &scratch[1]};
    if ((rc = enter(k, op)) != AM_OK) return rc;
    rc = launch(k, K_POOL, stream, gx, params, op);
    leave();
    return rc;
}

int am_explain(am_kernels *k, void *stream, uint64_t q, uint64_t g, uint64_t ids, uint64_t weights, uint64_t d,
               uint64_t d_k, uint64_t shares, uint64_t d_hat, uint64_t scores, uint64_t err, int Q, int K, int N) {
    static const char *const op = "am_explain";
    static const char *const names[] = {"q", "g", "ids", "d", "d_k", "shares", "d_hat", "scores", "err", "weights"};
    if (k == NULL) return fail(AM_ERR_ARG, "%s: the handle is NULL", op);
    if (Q < 1 || K < 1 || N < 1) return fail(AM_ERR_ARG, "%s: Q = %d, K = %d, N = %d; each must be >= 1", op, Q, K, N);
    const int weighted = weights != 0;
    const int kernel = weighted ? K_EXPLAIN_W : K_EXPLAIN;
    uint64_t check[10] = {q, g, ids, d, d_k, shares, d_hat, scores, err, weights};
    int rc = check_pointers(op, names, check, weighted ? 10 : 9);
    unsigned gx = 0;
    if (rc == AM_OK) rc = grid_x(k, kernel, (uint64_t)Q * (uint64_t)K, "Q*K", op, &gx);
    if (rc != AM_OK) return rc;
    /* The order of launch.txt's explain / explain_weighted lines, checked in am_open. */
    CUdeviceptr pq = q, pg = g, pids = ids, pw = weights, pd = d, pdk = d_k, psh = shares, pdh = d_hat,
                psc = scores, perr = err, scratch0 = 0, scratch1 = 0;
    int32_t k32 = K, n32 = N, stride_iq = K; /* ids [Q, K] contiguous */
    void *params[15];
    int n = 0;
    params[n++] = &pq;
    params[n++] = &pg;
    params[n++] = &pids;
    if (weighted) params[n++] = &pw;
    params[n++] = &pd;
    params[n++] = &pdk;
    params[n++] = &psh;
    params[n++] = &pdh;
    params[n++] = &psc;
    params[n++] = &perr;
    params[n++] = &k32;
    params[n++] = &n32;
    params[n++] = &stride_iq;
    params[n++] = &scratch0;
    params[n++] = &scratch1;
    if ((rc = enter(k, op)) != AM_OK) return rc;
    CUresult r = drv.cuMemsetD32Async(perr, 0, 1, (CUstream)stream);
    rc = r == CUDA_SUCCESS ? launch(k, kernel, stream, gx, params, op) : cuda_fail(op, "cuMemsetD32Async(err)", r);
    leave();
    return rc;
}

/* ------------------------------------------------------------------------------------------------------------------
 * Helpers.
 * ---------------------------------------------------------------------------------------------------------------- */

int am_alloc(am_kernels *k, size_t bytes, uint64_t *ptr) {
    static const char *const op = "am_alloc";
    if (ptr == NULL) return fail(AM_ERR_ARG, "%s: ptr is NULL", op);
    *ptr = 0;
    if (bytes == 0) return fail(AM_ERR_ARG, "%s: bytes = 0", op);
    int rc = enter(k, op);
    if (rc != AM_OK) return rc;
    CUdeviceptr p = 0;
    CUresult r = drv.cuMemAlloc(&p, bytes);
    leave();
    if (r != CUDA_SUCCESS) return cuda_fail(op, "cuMemAlloc", r);
    *ptr = p;
    return AM_OK;
}

int am_free(am_kernels *k, uint64_t ptr) {
    static const char *const op = "am_free";
    if (k == NULL) return fail(AM_ERR_ARG, "%s: the handle is NULL", op);
    if (ptr == 0) return AM_OK;
    int rc = enter(k, op);
    if (rc != AM_OK) return rc;
    CUresult r = drv.cuMemFree(ptr);
    leave();
    return r == CUDA_SUCCESS ? AM_OK : cuda_fail(op, "cuMemFree", r);
}

int am_upload(am_kernels *k, uint64_t dst, const void *src, size_t bytes) {
    static const char *const op = "am_upload";
    if (k == NULL) return fail(AM_ERR_ARG, "%s: the handle is NULL", op);
    if (bytes == 0) return AM_OK;
    if (dst == 0 || src == NULL) return fail(AM_ERR_ARG, "%s: NULL %s", op, dst == 0 ? "dst" : "src");
    int rc = enter(k, op);
    if (rc != AM_OK) return rc;
    CUresult r = drv.cuMemcpyHtoD(dst, src, bytes);
    leave();
    return r == CUDA_SUCCESS ? AM_OK : cuda_fail(op, "cuMemcpyHtoD", r);
}

int am_download(am_kernels *k, void *dst, uint64_t src, size_t bytes) {
    static const char *const op = "am_download";
    if (k == NULL) return fail(AM_ERR_ARG, "%s: the handle is NULL", op);
    if (bytes == 0) return AM_OK;
    if (dst == NULL || src == 0) return fail(AM_ERR_ARG, "%s: NULL %s", op, dst == NULL ? "dst" : "src");
    int rc = enter(k, op);
    if (rc != AM_OK) return rc;
    CUresult r = drv.cuMemcpyDtoH(dst, src, bytes);
    leave();
    return r == CUDA_SUCCESS ? AM_OK : cuda_fail(op, "cuMemcpyDtoH", r);
}

int am_memset32(am_kernels *k, uint64_t dst, uint32_t value, size_t count) {
    static const char *const op = "am_memset32";
    if (k == NULL) return fail(AM_ERR_ARG, "%s: the handle is NULL", op);
    if (count == 0) return AM_OK;
    if (dst == 0 || dst % 4 != 0) return fail(AM_ERR_ARG, "%s: dst = 0x%llx is NULL or not 4-byte aligned", op,
                                              (unsigned long long)dst);
    int rc = enter(k, op);
    if (rc != AM_OK) return rc;
    CUresult r = drv.cuMemsetD32(dst, value, count);
    leave();
    return r == CUDA_SUCCESS ? AM_OK : cuda_fail(op, "cuMemsetD32", r);
}

int am_synchronize(am_kernels *k, void *stream) {
    static const char *const op = "am_synchronize";
    int rc = enter(k, op);
    if (rc != AM_OK) return rc;
    CUresult r = stream == NULL ? drv.cuCtxSynchronize() : drv.cuStreamSynchronize((CUstream)stream);
    leave();
    return r == CUDA_SUCCESS ? AM_OK : cuda_fail(op, stream == NULL ? "cuCtxSynchronize" : "cuStreamSynchronize", r);
}
