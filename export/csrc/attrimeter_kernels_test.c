/*
 * attrimeter_kernels_test EXPORT_DIR CASE_DIR
 *
 * Runs the export's AOT kernels through libattrimeter_kernels on a test case and compares them with the expected
 * outputs (written by tests/export/test_clib.py from the torch references), by ||out - ref|| / ||ref|| <= 1e-4
 * (2e-3 for float16 pooling outputs).
 * Exit status: 0 pass, 1 a check failed, 2 usage / I/O / open error or a case that does not match the export's
 * dtype and shapes (am_get_info), 77 skipped (no CUDA driver or device).
 *
 * CASE_DIR/case.txt holds "key value" lines (# comments): dtype (float32 or float16, the export's pooling dtype),
 * B C HW M (pooling), Q K N (explain), and optionally p and eps (checked against the export too).
 * Binary files, little-endian, C order:
 *   pooling: F.bin [B,C,HW], Z.bin [B,M,HW], scale.bin [C], shift.bin [C] -> f.bin [B,C], f_k.bin [B,M,C], all fp32
 *            files: for a float16 export the inputs must be float16 values (the program converts them and checks
 *            that the conversion is exact) and the float16 outputs are converted to fp32 for the comparison
 *   explain: q.bin fp32 [Q,M+1,C], g.bin fp16 [N,M+1,C], ids.bin int64 [Q,K]
 *            -> d.bin, d_hat.bin [Q,K], d_k.bin, shares.bin [Q,K,M] (fp32; the unweighted score is d)
 *   optional weighted explain: w.bin fp32 [M] -> scores_w.bin fp32 [Q,K] (= sum_k w_k d_k)
 */
#define _POSIX_C_SOURCE 200809L

#include "attrimeter_kernels.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL 1e-4
#define TOL_FP16 2e-3
#define NAN_BITS 0x7fc00000u
#define NAN_BITS_FP16 0x7e007e00u /* two float16 NaNs */

static int failures = 0;

static const char *code_name(int rc) {
    static const char *const names[] = {"AM_OK",         "AM_ERR_NO_DRIVER", "AM_ERR_NO_DEVICE", "AM_ERR_NO_TARGET",
                                        "AM_ERR_IO",     "AM_ERR_FORMAT",    "AM_ERR_CUDA",      "AM_ERR_ARG"};
    return rc >= 0 && rc < 8 ? names[rc] : "AM_ERR_?";
}

typedef struct {
    long B, C, HW, M, Q, K, N;
    int dtype_bytes;     /* 4 float32, 2 float16 */
    int has_p, has_eps;  /* optional keys */
    double p, eps;
} shape;

/* ------------------------------------------------------------------------------------------------------------------
 * IEEE float16 <-> float32, portable (no _Float16 / F16C needed), round to nearest even.
 * ---------------------------------------------------------------------------------------------------------------- */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13); /* inf, NaN (payload kept) */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13); /* rebias 15 -> 127 */
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal mant * 2^-24: normalise */
        uint32_t shift = 0;
        while (!(mant & 0x400u)) mant <<= 1, ++shift;
        bits = sign | ((113u - shift) << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu)); /* NaN stays a (quiet) NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 (and inf) rounds to inf */
    uint32_t h, rest, half;
    if (ax >= 0x38800000u) { /* normal: >= 2^-14 */
        h = ((ax >> 23) - 112u) << 10 | ((ax >> 13) & 0x3ffu);
        rest = ax & 0x1fffu;
        half = 0x1000u;
    } else if (ax >= 0x33000000u) { /* subnormal half (or rounds up to the smallest normal): >= 2^-25 */
        uint32_t mant = (ax & 0x7fffffu) | 0x800000u, shift = 126u - (ax >> 23); /* 14..24 */
        h = mant >> shift;
        rest = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
    } else {
        return sign; /* < 2^-25 rounds to zero */
    }
    if (rest > half || (rest == half && (h & 1u))) ++h; /* a carry into the exponent is right, up to inf */
    return (uint16_t)(sign | h);
}

/* Every float16 survives float16 -> float32 -> float16; ties, subnormals, overflow round as IEEE says. */
static int half_self_test(char *detail, size_t size) {
    for (uint32_t h = 0; h <= 0xffffu; ++h) {
        float f = half_to_float((uint16_t)h);
        uint16_t back = float_to_half(f);
        unsigned exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
        int nan = exp == 0x1fu && mant != 0;
        double want = exp == 0x1fu ? (double)INFINITY
                      : exp == 0   ? ldexp((double)mant, -24)
                                   : ldexp((double)(mant | 0x400u), (int)exp - 25); /* the value, independently */
        if (h & 0x8000u) want = -want;
        if (nan ? !(isnan(f) && (back & 0x7c00u) == 0x7c00u && (back & 0x3ffu)) : back != h || (double)f != want) {
            snprintf(detail, size, "0x%04x -> %.9g -> 0x%04x", (unsigned)h, (double)f, (unsigned)back);
            return 0;
        }
    }
    static const struct {
        float f;
        uint16_t h;
    } cases[] = {{1.0f, 0x3c00u},         {1.00048828125f, 0x3c00u} /* 1 + 2^-11: tie to even */,
                 {1.00146484375f, 0x3c02u} /* 1 + 3 * 2^-11: tie to even */,
                 {-2.0f, 0xc000u},        {65504.0f, 0x7bffu},     {65519.0f, 0x7bffu},
                 {65520.0f, 0x7c00u},     {1e10f, 0x7c00u},        {6.103515625e-05f, 0x0400u} /* 2^-14 */,
                 {2.98023223876953125e-08f, 0x0000u} /* 2^-25: tie to even */,
                 {4.470348358154296875e-08f, 0x0001u} /* 1.5 * 2^-25 */,
                 {6.1005353927612305e-05f, 0x0400u} /* 2^-14 - 2^-25: tie, to even 2^-14 */,
                 {1e-6f, 0x0011u},        {-0.0f, 0x8000u},        {1e-9f, 0x0000u}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
        if (float_to_half(cases[i].f) != cases[i].h) {
            snprintf(detail, size, "%.9g -> 0x%04x, expected 0x%04x", (double)cases[i].f,
                     (unsigned)float_to_half(cases[i].f), (unsigned)cases[i].h);
            return 0;
        }
    return 1;
}

static int read_case(const char *dir, shape *s) {
    char path[4096];
    snprintf(path, sizeof path, "%s/case.txt", dir);
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "error: cannot open %s\n", path);
        return 0;
    }
    long *slots[] = {&s->B, &s->C, &s->HW, &s->M, &s->Q, &s->K, &s->N};
    const char *keys[] = {"B", "C", "HW", "M", "Q", "K", "N"};
    for (int i = 0; i < 7; ++i) *slots[i] = 0;
    s->dtype_bytes = s->has_p = s->has_eps = 0;
    char line[256], key[32], value[64];
    int ok = 1;
    while (ok && fgets(line, sizeof line, f) != NULL) {
        if (line[0] == '#' || sscanf(line, "%31s %63s", key, value) != 2) continue;
        if (strcmp(key, "dtype") == 0) {
            s->dtype_bytes = strcmp(value, "float32") == 0 ? 4 : strcmp(value, "float16") == 0 ? 2 : 0;
            if (s->dtype_bytes == 0) {
                fprintf(stderr, "error: %s: dtype %s is neither float32 nor float16\n", path, value);
                ok = 0;
            }
            continue;
        }
        if (strcmp(key, "p") == 0 || strcmp(key, "eps") == 0) {
            char *end = NULL;
            double v = strtod(value, &end);
            if (*end != '\0' || !isfinite(v)) {
                fprintf(stderr, "error: %s: %s = %s is not a number\n", path, key, value);
                ok = 0;
            }
            *(key[0] == 'p' ? &s->p : &s->eps) = v;
            *(key[0] == 'p' ? &s->has_p : &s->has_eps) = 1;
            continue;
        }
        int known = 0;
        for (int i = 0; i < 7; ++i) {
            if (strcmp(key, keys[i]) != 0) continue;
            char *end = NULL;
            *slots[i] = strtol(value, &end, 10);
            known = 1;
            if (*end != '\0' || *slots[i] < 1 || *slots[i] > 65536) {
                fprintf(stderr, "error: %s: %s = %s is not an integer in [1, 65536]\n", path, key, value);
                ok = 0;
            }
        }
        if (!known) {
            fprintf(stderr, "error: %s: unknown key %s\n", path, key);
            ok = 0;
        }
    }
    fclose(f);
    if (ok && s->dtype_bytes == 0) {
        fprintf(stderr, "error: %s lacks dtype\n", path);
        ok = 0;
    }
    for (int i = 0; ok && i < 7; ++i)
        if (*slots[i] == 0) {
            fprintf(stderr, "error: %s lacks %s\n", path, keys[i]);
            ok = 0;
        }
    return ok;
}

/* Read CASE_DIR/name, which must hold exactly `bytes` bytes; NULL (and a message) otherwise. */
static void *read_bin(const char *dir, const char *name, size_t bytes, int optional) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        if (!optional) fprintf(stderr, "error: cannot open %s\n", path);
        return NULL;
    }
    char *data = malloc(bytes + 1);
    size_t got = data ? fread(data, 1, bytes + 1, f) : 0;
    fclose(f);
    if (data == NULL || got != bytes) {
        fprintf(stderr, "error: %s holds %zu bytes, expected %zu\n", path, got, bytes);
        free(data);
        return NULL;
    }
    return data;
}

static double rel_error(const float *out, const float *ref, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; ++i) {
        double diff = (double)out[i] - (double)ref[i];
        num += diff * diff;
        den += (double)ref[i] * (double)ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

static void check(int condition, const char *what, const char *detail) {
    printf("%s %s%s%s\n", condition ? "ok  " : "FAIL", what, detail ? ": " : "", detail ? detail : "");
    failures += !condition;
}

static void check_rc(int rc, int want, const char *what) {
    char detail[600];
    snprintf(detail, sizeof detail, "%s (want %s): %s", code_name(rc), code_name(want), rc ? am_last_error() : "");
    check(rc == want, what, detail);
}

/* Compare n device values of `bytes` (4 float32, 2 float16) each with the fp32 reference. */
static void check_close(am_kernels *k, uint64_t dev, int bytes, const float *ref, size_t n, const char *what) {
    const double tol = bytes == 2 ? TOL_FP16 : TOL;
    float *out = malloc(n * sizeof *out);
    uint16_t *raw = bytes == 2 ? malloc(n * sizeof *raw) : NULL;
    int rc = out == NULL || (bytes == 2 && raw == NULL) ? AM_ERR_IO
             : bytes == 2                                ? am_download(k, raw, dev, n * 2)
                                                         : am_download(k, out, dev, n * 4);
    if (rc != AM_OK) {
        check(0, what, rc == AM_ERR_IO ? "out of memory" : am_last_error());
        free(out);
        free(raw);
        return;
    }
    if (bytes == 2)
        for (size_t i = 0; i < n; ++i) out[i] = half_to_float(raw[i]);
    double e = rel_error(out, ref, n);
    char detail[64];
    snprintf(detail, sizeof detail, "rel err %.3g (tol %.0e)", e, tol);
    check(e <= tol, what, detail); /* NaN fails */
    free(out);
    free(raw);
}

/* Device copies of the case; every call checked, the first failure is fatal (exit 2). */
static uint64_t upload(am_kernels *k, const void *host, size_t bytes) {
    uint64_t p = 0;
    if (am_alloc(k, bytes, &p) != AM_OK || am_upload(k, p, host, bytes) != AM_OK) {
        fprintf(stderr, "error: %s\n", am_last_error());
        exit(2);
    }
    return p;
}

/* `count` elements of `bytes` (4 or 2) each, filled with NaN. */
static uint64_t poisoned(am_kernels *k, size_t count, int bytes) {
    uint64_t p = 0;
    size_t words = bytes == 2 ? (count + 1) / 2 : count;
    uint32_t nan = bytes == 2 ? NAN_BITS_FP16 : NAN_BITS;
    if (am_alloc(k, words * 4, &p) != AM_OK || am_memset32(k, p, nan, words) != AM_OK) {
        fprintf(stderr, "error: %s\n", am_last_error());
        exit(2);
    }
    return p;
}

/* The case's fp32 values in the export's dtype: a copy for float32; for float16, converted, and `inexact` counts
 * the values that float16 does not hold exactly (the references were computed from the float16 values). */
static void *to_dtype(const float *x, size_t n, int bytes, size_t *inexact) {
    void *out = malloc(n * (size_t)bytes);
    if (out == NULL) {
        fprintf(stderr, "error: out of memory\n");
        exit(2);
    }
    if (bytes == 4) {
        memcpy(out, x, n * 4);
        return out;
    }
    uint16_t *h = out;
    for (size_t i = 0; i < n; ++i) {
        h[i] = float_to_half(x[i]);
        *inexact += half_to_float(h[i]) != x[i];
    }
    return out;
}

static const char *dtype_name(int bytes) { return bytes == 4 ? "float32" : bytes == 2 ? "float16" : "?"; }

/* The case must be of the export's dtype and shapes (and p, eps where case.txt gives them); lists each difference. */
static int matches_export(const shape *s, const am_info *info, const char *case_dir) {
    char diff[1024] = "";
    size_t used = 0;
#define AM_DIFF(...) used += (size_t)snprintf(diff + used, used < sizeof diff ? sizeof diff - used : 0, __VA_ARGS__)
    if (s->dtype_bytes != info->dtype_bytes)
        AM_DIFF(" dtype %s (export %s);", dtype_name(s->dtype_bytes), dtype_name(info->dtype_bytes));
    if (s->C != info->C) AM_DIFF(" C %ld (export %d);", s->C, info->C);
    if (s->HW != info->HW) AM_DIFF(" HW %ld (export %d);", s->HW, info->HW);
    if (s->M != info->M) AM_DIFF(" M %ld (export %d);", s->M, info->M);
    if (s->has_p && fabs(s->p - info->p) > 1e-12 * fabs(info->p)) AM_DIFF(" p %.15g (export %.15g);", s->p, info->p);
    if (s->has_eps && fabs(s->eps - info->eps) > 1e-12 * fabs(info->eps))
        AM_DIFF(" eps %.15g (export %.15g);", s->eps, info->eps);
#undef AM_DIFF
    if (used == 0) return 1;
    fprintf(stderr, "error: the case %s does not match the export (am_get_info):%s the kernels were compiled for "
            "the export's dtype and shapes\n", case_dir, diff);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s EXPORT_DIR CASE_DIR\n", argv[0]);
        return 2;
    }
    const char *export_dir = argv[1], *case_dir = argv[2];
    am_kernels *k = NULL;
    int rc = am_open(export_dir, 0, &k);
    if (rc == AM_ERR_NO_DRIVER || rc == AM_ERR_NO_DEVICE) {
        printf("SKIP: %s: %s\n", code_name(rc), am_last_error());
        return 77;
    }
    if (rc != AM_OK) {
        fprintf(stderr, "error: am_open(%s) failed: %s (%d): %s\n", export_dir, code_name(rc), rc, am_last_error());
        return 2;
    }
    am_info info;
    if (am_get_info(k, &info) != AM_OK) {
        fprintf(stderr, "error: am_get_info failed: %s\n", am_last_error());
        return 2;
    }
    printf("target %s, export dtype %s C %d HW %d M %d p %.15g eps %.15g\n", am_target(k),
           dtype_name(info.dtype_bytes), info.C, info.HW, info.M, info.p, info.eps);
    check(strcmp(info.target, am_target(k)) == 0, "am_get_info target = am_target", info.target);

    shape s;
    if (!read_case(case_dir, &s)) return 2;
    if (!matches_export(&s, &info, case_dir)) return 2;
    char detail[128] = "";
    check(half_self_test(detail, sizeof detail), "float16 <-> float32 conversions", detail[0] ? detail : NULL);
    const int E = s.dtype_bytes; /* the pooling's element size */
    const size_t B = (size_t)s.B, C = (size_t)s.C, HW = (size_t)s.HW, M = (size_t)s.M, Q = (size_t)s.Q,
                 K = (size_t)s.K, N = (size_t)s.N, R = M + 1;
    float *F = read_bin(case_dir, "F.bin", B * C * HW * 4, 0), *Z = read_bin(case_dir, "Z.bin", B * M * HW * 4, 0),
          *scale = read_bin(case_dir, "scale.bin", C * 4, 0), *shift = read_bin(case_dir, "shift.bin", C * 4, 0),
          *f_ref = read_bin(case_dir, "f.bin", B * C * 4, 0), *fk_ref = read_bin(case_dir, "f_k.bin", B * M * C * 4, 0),
          *q = read_bin(case_dir, "q.bin", Q * R * C * 4, 0), *d_ref = read_bin(case_dir, "d.bin", Q * K * 4, 0),
          *dk_ref = read_bin(case_dir, "d_k.bin", Q * K * M * 4, 0),
          *sh_ref = read_bin(case_dir, "shares.bin", Q * K * M * 4, 0),
          *dh_ref = read_bin(case_dir, "d_hat.bin", Q * K * 4, 0), *w = read_bin(case_dir, "w.bin", M * 4, 1),
          *sw_ref = w ? read_bin(case_dir, "scores_w.bin", Q * K * 4, 0) : NULL;
    void *g = read_bin(case_dir, "g.bin", N * R * C * 2, 0);
    int64_t *ids = read_bin(case_dir, "ids.bin", Q * K * 8, 0);
    if (!F || !Z || !scale || !shift || !f_ref || !fk_ref || !q || !d_ref || !dk_ref || !sh_ref || !dh_ref || !g ||
        !ids || (w && !sw_ref))
        return 2;

    /* The pooling inputs in the export's dtype. */
    size_t inexact = 0;
    void *F_x = to_dtype(F, B * C * HW, E, &inexact), *Z_x = to_dtype(Z, B * M * HW, E, &inexact),
         *scale_x = to_dtype(scale, C, E, &inexact), *shift_x = to_dtype(shift, C, E, &inexact);
    char count[64];
    snprintf(count, sizeof count, "%zu value(s) rounded", inexact);
    check(inexact == 0, "pooling inputs are exact in the export dtype", inexact ? count : NULL);

    /* Argument validation (fails before any launch). */
    uint64_t dF = upload(k, F_x, B * C * HW * E), dZ = upload(k, Z_x, B * M * HW * E),
             dscale = upload(k, scale_x, C * E), dshift = upload(k, shift_x, C * E), df = poisoned(k, B * C, E),
             dfk = poisoned(k, B * M * C, E);
    check_rc(am_masked_gem_pool(NULL, NULL, dF, dZ, dscale, dshift, df, dfk, 1), AM_ERR_ARG, "NULL handle rejected");
    check_rc(am_masked_gem_pool(k, NULL, dF, dZ, dscale, dshift, df, dfk, 0), AM_ERR_ARG, "batch 0 rejected");
    check_rc(am_masked_gem_pool(k, NULL, dF + 4, dZ, dscale, dshift, df, dfk, 1), AM_ERR_ARG,
             "misaligned pointer rejected");
    check_rc(am_masked_gem_pool(k, NULL, dF, 0, dscale, dshift, df, dfk, 1), AM_ERR_ARG, "NULL pointer rejected");

    /* Masked GeM pooling. */
    check_rc(am_masked_gem_pool(k, NULL, dF, dZ, dscale, dshift, df, dfk, (int)B), AM_OK, "masked_gem_pool launch");
    check_rc(am_synchronize(k, NULL), AM_OK, "masked_gem_pool synchronize");
    check_close(k, df, E, f_ref, B * C, "masked_gem_pool f");
    check_close(k, dfk, E, fk_ref, B * M * C, "masked_gem_pool f_k");

    /* Explain, unweighted: scores are d. The err counter starts poisoned: am_explain must zero it. */
    uint64_t dq = upload(k, q, Q * R * C * 4), dg = upload(k, g, N * R * C * 2), dids = upload(k, ids, Q * K * 8),
             dd = poisoned(k, Q * K, 4), ddk = poisoned(k, Q * K * M, 4), dsh = poisoned(k, Q * K * M, 4),
             ddh = poisoned(k, Q * K, 4), dsc = poisoned(k, Q * K, 4), derr = poisoned(k, 1, 4);
    check_rc(am_explain(k, NULL, dq, dg, dids, 0, dd, ddk, dsh, ddh, dsc, derr, 46341, 46341, (int)N), AM_ERR_ARG,
             "Q*K > 2^31-1 rejected");
    check_rc(am_explain(k, NULL, dq, dg, dids, 0, dd, ddk, dsh, ddh, dsc, derr, (int)Q, (int)K, 0), AM_ERR_ARG,
             "N 0 rejected");
    check_rc(am_explain(k, NULL, dq, dg, dids, 0, dd, ddk, dsh, ddh, dsc, derr, (int)Q, (int)K, (int)N), AM_OK,
             "explain launch");
    check_rc(am_synchronize(k, NULL), AM_OK, "explain synchronize");
    int32_t err = -1;
    check_rc(am_download(k, &err, derr, 4), AM_OK, "explain err download");
    check(err == 0, "explain err counter is 0", NULL);
    check_close(k, dd, 4, d_ref, Q * K, "explain d");
    check_close(k, ddk, 4, dk_ref, Q * K * M, "explain d_k");
    check_close(k, dsh, 4, sh_ref, Q * K * M, "explain shares");
    check_close(k, ddh, 4, dh_ref, Q * K, "explain d_hat");
    check_close(k, dsc, 4, d_ref, Q * K, "explain scores (= d)");

    /* Explain, weighted. */
    uint64_t dw = 0;
    if (w) {
        dw = upload(k, w, M * 4);
        check_rc(am_memset32(k, dsc, NAN_BITS, Q * K), AM_OK, "poison scores");
        check_rc(am_explain(k, NULL, dq, dg, dids, dw, dd, ddk, dsh, ddh, dsc, derr, (int)Q, (int)K, (int)N), AM_OK,
                 "explain_weighted launch");
        check_rc(am_synchronize(k, NULL), AM_OK, "explain_weighted synchronize");
        check_close(k, dsc, 4, sw_ref, Q * K, "explain_weighted scores");
        check_close(k, ddk, 4, dk_ref, Q * K * M, "explain_weighted d_k");
    }

    /* An id outside [0, N): counted in err, its outputs NaN. */
    ids[0] = (int64_t)N;
    check_rc(am_upload(k, dids, ids, Q * K * 8), AM_OK, "upload a bad id");
    check_rc(am_explain(k, NULL, dq, dg, dids, 0, dd, ddk, dsh, ddh, dsc, derr, (int)Q, (int)K, (int)N), AM_OK,
             "explain launch (bad id)");
    check_rc(am_synchronize(k, NULL), AM_OK, "explain synchronize (bad id)");
    float d0 = 0.0f;
    check_rc(am_download(k, &err, derr, 4), AM_OK, "explain err download (bad id)");
    check_rc(am_download(k, &d0, dd, 4), AM_OK, "explain d download (bad id)");
    check(err == 1 && isnan(d0), "bad id counted once, its d is NaN", NULL);

    uint64_t all[] = {dF, dZ, dscale, dshift, df, dfk, dq, dg, dids, dd, ddk, dsh, ddh, dsc, derr, dw};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; ++i)
        if (am_free(k, all[i]) != AM_OK) check(0, "free", am_last_error());
    am_close(k);
    free(F), free(Z), free(scale), free(shift), free(f_ref), free(fk_ref), free(q), free(d_ref), free(dk_ref);
    free(sh_ref), free(dh_ref), free(w), free(sw_ref), free(g), free(ids);
    free(F_x), free(Z_x), free(scale_x), free(shift_x);
    printf("%s: %d check(s) failed\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
