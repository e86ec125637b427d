/*
 * test_precision_auto.c — precision AUTO decides by speed (docs/precision.md):
 * kiln_precision_decide as a pure function of the two speeds and the
 * hardware; kiln_precision_auto's probe, its cache (written, reused without
 * measuring, a corrupt file ignored and rewritten, an unwritable folder
 * harmless), the per-ctx memo (logged once) and the probe switched off.
 * No wall-clock time is asserted: the probe's speeds are only checked to be
 * positive and consistent with the decision.
 */
#include "check.h"
#include "kernels/kernels.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void test_decide(void)
{
    /* no bf16 hardware: fp32, whatever was measured */
    CHECK_EQ(kiln_precision_decide(false, 100, 1000), KILN_PRECISION_FP32);
    CHECK_EQ(kiln_precision_decide(false, 0, 0), KILN_PRECISION_FP32);
    /* bf16 slower (Zen 4's AVX512_BF16: 0.4x): fp32 */
    CHECK_EQ(kiln_precision_decide(true, 285, 114), KILN_PRECISION_FP32);
    /* bf16 faster (AMX: 4.6x): bf16 */
    CHECK_EQ(kiln_precision_decide(true, 100, 460), KILN_PRECISION_BF16);
    /* the margin: just below it fp32, at it bf16 */
    CHECK_EQ(kiln_precision_decide(true, 100, 119), KILN_PRECISION_FP32);
    CHECK_EQ(kiln_precision_decide(true, 100, 100 * KILN_PRECISION_AUTO_MARGIN),
             KILN_PRECISION_BF16);
    CHECK_EQ(kiln_precision_decide(true, 100, 100), KILN_PRECISION_FP32);
    /* a speed that was not measured: fp32 */
    CHECK_EQ(kiln_precision_decide(true, 0, 500), KILN_PRECISION_FP32);
    CHECK_EQ(kiln_precision_decide(true, 100, 0), KILN_PRECISION_FP32);
}

typedef struct logs {
    int precision_lines;
    char last[512];
} logs;

static void count_log(void *user, kiln_log_level level, const char *msg)
{
    logs *l = user;
    if (level == KILN_LOG_INFO && !strncmp(msg, "precision: ", 11)) {
        l->precision_lines++;
        snprintf(l->last, sizeof l->last, "%s", msg);
    }
}

/* The one cache file in dir (its path into out); false when there is not
 * exactly one. */
static bool only_file(const char *dir, char *out, size_t cap)
{
    DIR *d = opendir(dir);
    if (!d) return false;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        n++;
        snprintf(out, cap, "%s/%s", dir, e->d_name);
    }
    closedir(d);
    return n == 1;
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = calloc(1, 4096);
    if (buf) {
        size_t n = fread(buf, 1, 4095, f);
        buf[n] = 0;
    }
    fclose(f);
    return buf;
}

static void spit(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

/* kiln_precision_auto on a fresh ctx with cache folder dir (NULL: none) */
static kiln_precision fresh_auto(const char *dir, bool probe, kiln_precision_auto_info *in,
                                 logs *l)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, 1);
    if (dir) kiln_set_cache_dir(ctx, dir);
    kiln_set_precision_probe(ctx, probe);
    if (l) kiln_set_log_fn(ctx, count_log, l);
    kiln_precision p = kiln_precision_auto(ctx, KILN_BF16_KERNEL_AUTO, in);
    kiln_ctx_free(ctx);
    return p;
}

static void test_probe_and_cache(void)
{
    const char *tmp = getenv("KILN_TMP");
    char dir[512], path[1024];
    snprintf(dir, sizeof dir, "%s/precision_auto_cache/kiln", tmp ? tmp : "/tmp");
    char rm[600];
    snprintf(rm, sizeof rm, "rm -rf '%s'", dir);
    CHECK(system(rm) == 0);
    bool hw = kern_cpu_bf16();
    kiln_precision_auto_info a, b, c, d;
    logs l = {0};

    kiln_precision p = fresh_auto(dir, true, &a, &l);
    CHECK_EQ(p, a.choice);
    CHECK_EQ(l.precision_lines, 1);
    if (!hw) {
        /* fp32 without probing, and nothing cached */
        CHECK_EQ(p, KILN_PRECISION_FP32);
        CHECK(a.fp32_gflops == 0 && a.bf16_gflops == 0);
        CHECK(strstr(a.reason, "no bf16 hardware") != NULL);
        struct stat st;
        CHECK(stat(dir, &st) != 0);
        return;
    }
    /* measured, decided by decide, written */
    CHECK(!a.cached);
    CHECK(a.fp32_gflops > 0 && a.bf16_gflops > 0);
    CHECK_EQ(p, kiln_precision_decide(true, a.fp32_gflops, a.bf16_gflops));
    CHECK(strstr(a.reason, "bf16 products measured ") != NULL);
    CHECK(strstr(l.last, a.reason) != NULL);
    printf("  probe: fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s -> %s (%s)\n", a.fp32_gflops,
           a.bf16_gflops, kiln_precision_name(p), a.reason);
    CHECK(only_file(dir, path, sizeof path));
    char *text = slurp(path);
    CHECK(text && !strncmp(text, "kiln-precision-probe 1\nkey ", 27));

    /* reused: not measured again, the same speeds and choice */
    CHECK_EQ(fresh_auto(dir, true, &b, NULL), p);
    CHECK(b.cached);
    CHECK_NEAR(b.fp32_gflops, a.fp32_gflops, 1e-3);
    CHECK_NEAR(b.bf16_gflops, a.bf16_gflops, 1e-3);

    /* the decision follows the cached speeds: the same key with bf16
     * at 0.4x fp32 (what Zen 4 measures) gives fp32, at 4x bf16 */
    if (text) {
        char *nums = strstr(text, "\nfp32_gflops ");
        CHECK(nums != NULL);
        if (nums) {
            strcpy(nums, "\nfp32_gflops 250.000\nbf16_gflops 100.000\n");
            spit(path, text);
            CHECK_EQ(fresh_auto(dir, true, &c, NULL), KILN_PRECISION_FP32);
            CHECK(c.cached);
            CHECK(strstr(c.reason, "measured 0.4x fp32") != NULL);
            strcpy(nums, "\nfp32_gflops 100.000\nbf16_gflops 400.000\n");
            spit(path, text);
            CHECK_EQ(fresh_auto(dir, true, &c, NULL), KILN_PRECISION_BF16);
            CHECK(c.cached);
            /* a trailing extra line: corrupt */
            strcpy(nums, "\nfp32_gflops 100.000\nbf16_gflops 400.000\nextra\n");
            spit(path, text);
            fresh_auto(dir, true, &c, NULL);
            CHECK(!c.cached);
        }
    }
    free(text);

    /* corrupt: ignored, measured again, rewritten */
    spit(path, "kiln-precision-probe 1\nkey nonsense\nfp32_gflops x\n");
    fresh_auto(dir, true, &c, NULL);
    CHECK(!c.cached);
    CHECK(c.fp32_gflops > 0 && c.bf16_gflops > 0);
    text = slurp(path);
    CHECK(text && strstr(text, "\nfp32_gflops ") && !strstr(text, "nonsense"));
    free(text);
    fresh_auto(dir, true, &d, NULL);
    CHECK(d.cached);
    CHECK_EQ(d.choice, c.choice);
    spit(path, "");
    fresh_auto(dir, true, &d, NULL);
    CHECK(!d.cached);

    /* an unwritable folder (below a regular file): measured, no error */
    char bad[1100];
    snprintf(bad, sizeof bad, "%s/sub", path);
    kiln_precision q = fresh_auto(bad, true, &d, NULL);
    CHECK(!d.cached);
    CHECK_EQ(q, kiln_precision_decide(true, d.fp32_gflops, d.bf16_gflops));
    fresh_auto(bad, true, &d, NULL);
    CHECK(!d.cached);

    /* no cache folder: measured every time */
    fresh_auto(NULL, true, &d, NULL);
    CHECK(!d.cached && d.fp32_gflops > 0);
}

static void test_memo_and_probe_off(void)
{
    bool hw = kern_cpu_bf16();
    logs l = {0};
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, 1);
    kiln_set_log_fn(ctx, count_log, &l);
    CHECK(kiln_get_precision_probe(ctx));
    CHECK(kiln_get_cache_dir(ctx) == NULL);
    kiln_precision_auto_info a, b;
    kiln_precision p = kiln_precision_auto(ctx, KILN_BF16_KERNEL_AUTO, &a);
    /* the same ctx: decided and logged once */
    CHECK_EQ(kiln_precision_auto(ctx, KILN_BF16_KERNEL_AUTO, &b), p);
    CHECK_EQ(l.precision_lines, 1);
    CHECK(a.fp32_gflops == b.fp32_gflops && a.bf16_gflops == b.bf16_gflops);
    CHECK_STREQ(a.reason, b.reason);
    /* a model set to AUTO on it takes the same answer without a new line */
    kiln_config cfg = kiln_config_default();
    kiln_model *m = NULL;
    CHECK_EQ(kiln_model_new(ctx, &cfg, &m), KILN_OK);
    if (m) {
        CHECK_EQ(kiln_model_set_precision(ctx, m, KILN_PRECISION_AUTO), KILN_OK);
        CHECK_EQ(kiln_model_precision(m), p);
        kiln_model_free(m);
    }
    CHECK_EQ(l.precision_lines, 1);
    /* probe off: the table, nothing measured, logged again */
    kiln_set_precision_probe(ctx, false);
    CHECK(!kiln_get_precision_probe(ctx));
    p = kiln_precision_auto(ctx, KILN_BF16_KERNEL_AUTO, &a);
    CHECK_EQ(p, kiln_precision_resolve(KILN_PRECISION_AUTO));
    CHECK_EQ(p, hw ? KILN_PRECISION_BF16 : KILN_PRECISION_FP32);
    CHECK(a.fp32_gflops == 0 && a.bf16_gflops == 0 && !a.cached);
    CHECK_EQ(l.precision_lines, 2);
    /* the cache folder is copied; "" means none */
    char dir[64] = "/nonexistent/kiln-cache";
    CHECK_EQ(kiln_set_cache_dir(ctx, dir), KILN_OK);
    dir[0] = 'X';
    CHECK_STREQ(kiln_get_cache_dir(ctx), "/nonexistent/kiln-cache");
    CHECK_EQ(kiln_set_cache_dir(ctx, ""), KILN_OK);
    CHECK(kiln_get_cache_dir(ctx) == NULL);
    kiln_ctx_free(ctx);
    if (hw) {
        /* the forced AVX512_BF16 kernel: what a CPU without AMX measures */
        kiln_ctx *c2 = kiln_ctx_new();
        kiln_set_log_fn(c2, count_log, &l);
        kiln_precision_auto(c2, KILN_BF16_KERNEL_AVX512, &a);
        printf("  avx512_bf16 kernel: fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s -> %s (%s)\n",
               a.fp32_gflops, a.bf16_gflops, kiln_precision_name(a.choice), a.reason);
        CHECK_EQ(a.choice, kiln_precision_decide(true, a.fp32_gflops, a.bf16_gflops));
        kiln_ctx_free(c2);
    }
}

int main(void)
{
    RUN_TEST(test_decide);
    RUN_TEST(test_probe_and_cache);
    RUN_TEST(test_memo_and_probe_off);
    return TEST_EXIT();
}
