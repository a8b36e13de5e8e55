/*
 * attrimeter_kernels_test EXPORT_DIR CASE_DIR
 *
 * Runs the export's AOT kernels through libattrimeter_kernels on a test case and compares them with the expected
 * outputs (written by tests/export/test_clib.py from the torch references), by ||out - ref|| / ||ref|| <= 1e-4.
 * Exit status: 0 pass, 1 a check failed, 2 usage / I/O / open error, 77 skipped (no CUDA driver or device).
 *
 * CASE_DIR/case.txt holds "key value" lines (# comments): dtype float32, B C HW M (pooling) and Q K N (explain).
 * Binary files, little-endian, C order:
 *   pooling: F.bin [B,C,HW], Z.bin [B,M,HW], scale.bin [C], shift.bin [C] (fp32) -> f.bin [B,C], f_k.bin [B,M,C]
 *   explain: q.bin fp32 [Q,M+1,C], g.bin fp16 [N,M+1,C], ids.bin int64 [Q,K]
 *            -> d.bin, d_hat.bin [Q,K], d_k.bin, shares.bin [Q,K,M] (fp32; the unweighted score is d)
 *   optional weighted explain: w.bin fp32 [M] -> scores_w.bin fp32 [Q,K] (= sum_k w_k d_k)
 */
#define _POSIX_C_SOURCE 200809L

#include "attrimeter_kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL 1e-4
#define NAN_BITS 0x7fc00000u

static int failures = 0;

static const char *code_name(int rc) {
    static const char *const names[] = {"AM_OK",         "AM_ERR_NO_DRIVER", "AM_ERR_NO_DEVICE", "AM_ERR_NO_TARGET",
                                        "AM_ERR_IO",     "AM_ERR_FORMAT",    "AM_ERR_CUDA",      "AM_ERR_ARG"};
    return rc >= 0 && rc < 8 ? names[rc] : "AM_ERR_?";
}

typedef struct {
    long B, C, HW, M, Q, K, N;
} shape;

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
    char line[256], key[32], value[64];
    int ok = 1;
    while (ok && fgets(line, sizeof line, f) != NULL) {
        if (line[0] == '#' || sscanf(line, "%31s %63s", key, value) != 2) continue;
        if (strcmp(key, "dtype") == 0) {
            if (strcmp(value, "float32") != 0) {
                fprintf(stderr, "error: %s: dtype %s; this program checks float32 exports only\n", path, value);
                ok = 0;
            }
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

static void check_close(am_kernels *k, uint64_t dev, const float *ref, size_t n, const char *what) {
    float *out = malloc(n * sizeof *out);
    int rc = out ? am_download(k, out, dev, n * sizeof *out) : AM_ERR_IO;
    if (rc != AM_OK) {
        check(0, what, am_last_error());
        free(out);
        return;
    }
    double e = rel_error(out, ref, n);
    char detail[64];
    snprintf(detail, sizeof detail, "rel err %.3g (tol %.0e)", e, TOL);
    check(e <= TOL, what, detail); /* NaN fails */
    free(out);
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

static uint64_t poisoned(am_kernels *k, size_t count) {
    uint64_t p = 0;
    if (am_alloc(k, count * 4, &p) != AM_OK || am_memset32(k, p, NAN_BITS, count) != AM_OK) {
        fprintf(stderr, "error: %s\n", am_last_error());
        exit(2);
    }
    return p;
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
    printf("target %s\n", am_target(k));

    shape s;
    if (!read_case(case_dir, &s)) return 2;
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

    /* Argument validation (fails before any launch). */
    uint64_t dF = upload(k, F, B * C * HW * 4), dZ = upload(k, Z, B * M * HW * 4), dscale = upload(k, scale, C * 4),
             dshift = upload(k, shift, C * 4), df = poisoned(k, B * C), dfk = poisoned(k, B * M * C);
    check_rc(am_masked_gem_pool(NULL, NULL, dF, dZ, dscale, dshift, df, dfk, 1), AM_ERR_ARG, "NULL handle rejected");
    check_rc(am_masked_gem_pool(k, NULL, dF, dZ, dscale, dshift, df, dfk, 0), AM_ERR_ARG, "batch 0 rejected");
    check_rc(am_masked_gem_pool(k, NULL, dF + 4, dZ, dscale, dshift, df, dfk, 1), AM_ERR_ARG,
             "misaligned pointer rejected");
    check_rc(am_masked_gem_pool(k, NULL, dF, 0, dscale, dshift, df, dfk, 1), AM_ERR_ARG, "NULL pointer rejected");

    /* Masked GeM pooling. */
    check_rc(am_masked_gem_pool(k, NULL, dF, dZ, dscale, dshift, df, dfk, (int)B), AM_OK, "masked_gem_pool launch");
    check_rc(am_synchronize(k, NULL), AM_OK, "masked_gem_pool synchronize");
    check_close(k, df, f_ref, B * C, "masked_gem_pool f");
    check_close(k, dfk, fk_ref, B * M * C, "masked_gem_pool f_k");

    /* Explain, unweighted: scores are d. The err counter starts poisoned: am_explain must zero it. */
    uint64_t dq = upload(k, q, Q * R * C * 4), dg = upload(k, g, N * R * C * 2), dids = upload(k, ids, Q * K * 8),
             dd = poisoned(k, Q * K), ddk = poisoned(k, Q * K * M), dsh = poisoned(k, Q * K * M),
             ddh = poisoned(k, Q * K), dsc = poisoned(k, Q * K), derr = poisoned(k, 1);
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
    check_close(k, dd, d_ref, Q * K, "explain d");
    check_close(k, ddk, dk_ref, Q * K * M, "explain d_k");
    check_close(k, dsh, sh_ref, Q * K * M, "explain shares");
    check_close(k, ddh, dh_ref, Q * K, "explain d_hat");
    check_close(k, dsc, d_ref, Q * K, "explain scores (= d)");

    /* Explain, weighted. */
    uint64_t dw = 0;
    if (w) {
        dw = upload(k, w, M * 4);
        check_rc(am_memset32(k, dsc, NAN_BITS, Q * K), AM_OK, "poison scores");
        check_rc(am_explain(k, NULL, dq, dg, dids, dw, dd, ddk, dsh, ddh, dsc, derr, (int)Q, (int)K, (int)N), AM_OK,
                 "explain_weighted launch");
        check_rc(am_synchronize(k, NULL), AM_OK, "explain_weighted synchronize");
        check_close(k, dsc, sw_ref, Q * K, "explain_weighted scores");
        check_close(k, ddk, dk_ref, Q * K * M, "explain_weighted d_k");
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
    printf("%s: %d check(s) failed\n", failures ? "FAILED" : "PASSED", failures);
    return failures ? 1 : 0;
}
