/*
 * precision_auto.c — what precision AUTO means on this CPU: bf16 only
 * where its products are measured faster than fp32's (docs/precision.md).
 *
 * Having bf16 hardware is not enough: on AVX512_BF16 without AMX (AMD Zen
 * 4) kiln's bf16 products ran at 0.4x its fp32 oneDNN GEMM. So AUTO times
 * one linear layer forward and backward (the training step's three
 * products, weight conversion included) through the cpu backend's bf16 ops
 * and through the f32 backend over the fast fp32 GEMM, on the same shape,
 * best of a few repetitions, and picks bf16 only when it is at least
 * KILN_PRECISION_AUTO_MARGIN times faster (kiln_precision_decide, a pure
 * function of the two speeds). The result is kept on the ctx (decided and
 * logged once per bf16 kernel and thread count) and, when the ctx has a
 * cache folder, in a small text file keyed by the CPU's model name, its
 * mixed-precision features, the kernel, the thread count and kiln's
 * version, so later processes skip the probe.
 */
#include "model/model.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The probe's layer: a 4x MLP projection of a small GPT-2 block on 256
 * tokens (6 N C OC = 0.8 GFLOP per repetition: a few milliseconds in
 * fp32 on two cores). */
enum { PROBE_N = 256, PROBE_C = 512, PROBE_OC = 1024, PROBE_WARM = 2, PROBE_REPS = 5 };

#define CACHE_MAGIC "kiln-precision-probe 1"

kiln_precision kiln_precision_decide(bool bf16_hw, double fp32_gflops, double bf16_gflops)
{
    if (!bf16_hw) return KILN_PRECISION_FP32;
    if (!(fp32_gflops > 0) || !(bf16_gflops > 0)) return KILN_PRECISION_FP32;
    return bf16_gflops >= KILN_PRECISION_AUTO_MARGIN * fp32_gflops ? KILN_PRECISION_BF16
                                                                 : KILN_PRECISION_FP32;
}

/* One backend's copy of the probe's layer. */
typedef struct probe_layer {
    kern_backend *b;
    float *w, *x, *y, *dW, *dx; /* w (OC, C), x (N, C), y (N, OC) */
    kern_act *xa;
    kern_weight *pw;
    double best; /* seconds of the fastest repetition; < 0: none yet */
} probe_layer;

static void layer_free(probe_layer *l)
{
    free(l->w), free(l->x), free(l->y), free(l->dW), free(l->dx), free(l->xa);
}

/* Sets up the layer on b (the same values for every backend); false when
 * out of memory. */
static bool layer_init(probe_layer *l, kern_backend *b)
{
    const int N = PROBE_N, C = PROBE_C, OC = PROBE_OC;
    *l = (probe_layer){.b = b, .best = -1};
    l->w = malloc(sizeof(float) * (size_t)OC * C);
    l->x = malloc(sizeof(float) * (size_t)N * C);
    l->y = malloc(sizeof(float) * (size_t)N * OC);
    l->dW = malloc(sizeof(float) * (size_t)OC * C);
    l->dx = malloc(sizeof(float) * (size_t)N * C);
    l->xa = malloc(b->mp.act_bytes(b, N, C));
    if (!l->w || !l->x || !l->y || !l->dW || !l->dx || !l->xa) return false;
    uint32_t r = 12345u;
    for (size_t i = 0; i < (size_t)OC * C; i++) {
        r = r * 1664525u + 1013904223u;
        l->w[i] = ((float)(r >> 8) / 16777216.0f - 0.5f) * 0.08f;
    }
    for (size_t i = 0; i < (size_t)N * C; i++) {
        r = r * 1664525u + 1013904223u;
        l->x[i] = (float)(r >> 8) / 16777216.0f - 0.5f;
    }
    b->mp.act_pack(b, l->xa, l->x, N, C);
    l->pw = b->weight_prepare(b, l->w, OC, C, KERN_W_OUT_IN);
    return l->pw != NULL;
}

/* One forward + backward pass of the layer, timed into l->best when
 * timed; false when out of memory. Each pass starts a new weight epoch,
 * so bf16 weights are converted once per pass, as in a training step. */
static bool layer_run(probe_layer *l, bool timed)
{
    kern_backend *b = l->b;
    kern_out o = {.kind = KERN_OUT_F32, .y = l->y};
    double t0 = kiln_time_now();
    if (b->gemm && b->gemm->invalidate) b->gemm->invalidate(b->gemm);
    if (!b->mp.linear_fwd(b, &o, l->xa, l->pw, NULL, PROBE_N)) return false;
    /* the output as its own gradient: values of the right scale */
    if (!b->mp.linear_bwd(b, l->pw, l->y, l->xa, KERN_ACT_NONE, PROBE_N, l->dW, false, NULL,
                          l->dx))
        return false;
    double dt = kiln_time_now() - t0;
    if (timed && (l->best < 0 || dt < l->best)) l->best = dt;
    return true;
}

static double gflops(double secs)
{
    return secs > 0 ? 6.0 * PROBE_N * PROBE_C * PROBE_OC / secs / 1e9 : 0;
}

/* The probe: *f32 and *bf16 the GFLOP/s of the layer in each (0 when a
 * backend could not be built or ran out of memory). The two alternate,
 * after PROBE_WARM untimed passes each, so that a burst of load from
 * another process hits both alike; each keeps its fastest pass. */
static void probe(kern_backend *bf, double *f32, double *bf16)
{
    *f32 = *bf16 = 0;
    kern_gemm *g = kern_gemm_fast_new();
    kern_backend *fb = g ? kern_backend_f32_new(kern_ops_fast(), g, true, false) : NULL;
    if (!fb) kern_gemm_free(g);
    probe_layer a = {0}, b = {0};
    if (fb && layer_init(&a, fb) && layer_init(&b, bf)) {
        bool ok = true;
        for (int rep = 0; ok && rep < PROBE_WARM + PROBE_REPS; rep++)
            ok = layer_run(&a, rep >= PROBE_WARM) && layer_run(&b, rep >= PROBE_WARM);
        if (ok) {
            *f32 = gflops(a.best);
            *bf16 = gflops(b.best);
        }
    }
    layer_free(&a);
    layer_free(&b);
    if (fb) kern_backend_free(fb);
}

/* The CPU's model name from /proc/cpuinfo ("unknown CPU" without one). */
static void cpu_model_name(char *buf, size_t cap)
{
    snprintf(buf, cap, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10)) continue;
        const char *v = strchr(line, ':');
        if (!v) break;
        v++;
        while (*v == ' ' || *v == '\t') v++;
        snprintf(buf, cap, "%s", v);
        buf[strcspn(buf, "\r\n")] = 0;
        break;
    }
    fclose(f);
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* The cache file of key in dir (malloc'ed). */
static char *cache_path(const char *dir, const char *key)
{
    char name[64];
    snprintf(name, sizeof name, "precision-auto-%016llx.txt", (unsigned long long)fnv1a(key));
    return file_join(dir, name);
}

/* Reads a cached probe for key: false when there is none, or it is not
 * exactly what cache_write writes for this key (then it is re-probed and
 * rewritten). */
static bool cache_read(kiln_ctx *ctx, const char *path, const char *key, double *f32,
                       double *bf16)
{
    if (!file_exists(path)) return false;
    char *buf = NULL;
    size_t len = 0;
    kiln_status s = file_read_all(ctx, path, &buf, &len);
    kiln_clear_error(ctx);
    if (s) return false;
    bool ok = false;
    char *nl = strchr(buf, '\n');
    if (nl && (size_t)(nl - buf) == strlen(CACHE_MAGIC) && !strncmp(buf, CACHE_MAGIC, (size_t)(nl - buf))) {
        char *k = nl + 1, *kend = strchr(k, '\n');
        if (kend && !strncmp(k, "key ", 4) && (size_t)(kend - k - 4) == strlen(key) &&
            !strncmp(k + 4, key, strlen(key))) {
            int n = 0;
            if (sscanf(kend + 1, "fp32_gflops %lf\nbf16_gflops %lf\n%n", f32, bf16, &n) == 2 &&
                kend[1 + n] == 0 && isfinite(*f32) && isfinite(*bf16) && *f32 > 0 && *bf16 > 0)
                ok = true;
        }
    }
    free(buf);
    return ok;
}

/* Writes the probe's result atomically; a failure is logged at debug
 * level and otherwise ignored (the next process probes again). */
static void cache_write(kiln_ctx *ctx, const char *dir, const char *path, const char *key,
                        double f32, double bf16)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "%s\nkey %s\nfp32_gflops %.3f\nbf16_gflops %.3f\n",
                     CACHE_MAGIC, key, f32, bf16);
    if (n < 0 || (size_t)n >= sizeof buf) return;
    kiln_status s = file_mkdirs(ctx, dir);
    if (!s) s = file_write_atomic(ctx, path, buf, (size_t)n);
    if (s) kiln_log(ctx, KILN_LOG_DEBUG, "precision AUTO: not cached: %s", kiln_errmsg(ctx));
    kiln_clear_error(ctx);
}

/* The reason of a decision from measured speeds. */
static void measured_why(char *why, size_t cap, kiln_precision p, double f32, double bf16,
                         const char *kernel)
{
    double ratio = bf16 / f32;
    if (p == KILN_PRECISION_BF16)
        snprintf(why, cap, "bf16 products measured %.1fx fp32 on this CPU, %s", ratio, kernel);
    else if (f32 > 0 && bf16 > 0)
        snprintf(why, cap, "bf16 products measured %.1fx fp32 on this CPU, %s; bf16 needs %.1fx",
                 ratio, kernel, KILN_PRECISION_AUTO_MARGIN);
    else
        snprintf(why, cap, "the bf16 probe could not run (out of memory)");
}

kiln_precision kiln_precision_auto(kiln_ctx *ctx, kiln_bf16_kernel k, kiln_precision_auto_info *info)
{
    kiln_precision_auto_info in = {0};
    int key = (int)k * 4096 + (kiln_get_threads(ctx) & 4095);
    int v;
    const char *memo;
    if (ctx_auto_get(ctx, key, &v, &memo, &in.fp32_gflops, &in.bf16_gflops)) {
        in.choice = (kiln_precision)(v & 15);
        in.cached = (v & 16) != 0;
        snprintf(in.reason, sizeof in.reason, "%s", memo);
        if (info) *info = in;
        return in.choice;
    }
    bool hw = kern_cpu_bf16();
    kern_backend *bf = NULL;
    if (!hw) {
        in.choice = KILN_PRECISION_FP32;
        snprintf(in.reason, sizeof in.reason,
                 "this CPU has no bf16 hardware (AMX-BF16 or AVX512_BF16)");
    } else if (!kiln_get_precision_probe(ctx)) {
        in.choice = KILN_PRECISION_BF16;
        snprintf(in.reason, sizeof in.reason,
                 "the CPU has bf16 hardware, not measured: the probe is off");
    } else if (!(bf = kern_backend_new("cpu", KILN_DTYPE_BF16, k))) {
        in.choice = KILN_PRECISION_FP32;
        snprintf(in.reason, sizeof in.reason, "the bf16 probe could not run (out of memory)");
    } else {
        char cpu[256], caps[256], ckey[768];
        cpu_model_name(cpu, sizeof cpu);
        kern_cpu_describe(caps, sizeof caps);
        int saved = omp_get_max_threads();
        int nth = kiln_get_threads(ctx);
        if (nth > 0) omp_set_num_threads(nth);
        snprintf(ckey, sizeof ckey, "%s | %s | kernel %s | threads %d | kiln %s", cpu, caps,
                 bf->kernel, omp_get_max_threads(), KILN_VERSION);
        const char *dir = kiln_get_cache_dir(ctx);
        char *path = dir ? cache_path(dir, ckey) : NULL;
        if (path && cache_read(ctx, path, ckey, &in.fp32_gflops, &in.bf16_gflops)) {
            in.cached = true;
        } else {
            probe(bf, &in.fp32_gflops, &in.bf16_gflops);
            if (path && in.fp32_gflops > 0 && in.bf16_gflops > 0)
                cache_write(ctx, dir, path, ckey, in.fp32_gflops, in.bf16_gflops);
        }
        if (nth > 0) omp_set_num_threads(saved);
        in.choice = kiln_precision_decide(hw, in.fp32_gflops, in.bf16_gflops);
        measured_why(in.reason, sizeof in.reason, in.choice, in.fp32_gflops, in.bf16_gflops,
                     bf->kernel);
        kiln_log(ctx, KILN_LOG_DEBUG, "precision AUTO: probe %s: fp32 %.1f GFLOP/s, bf16 %.1f "
                 "GFLOP/s [%s]", in.cached ? "cached" : "measured", in.fp32_gflops,
                 in.bf16_gflops, path ? path : "no cache folder");
        free(path);
        kern_backend_free(bf);
    }
    kiln_log(ctx, KILN_LOG_INFO, "precision: %s (%s)", kiln_precision_name(in.choice), in.reason);
    ctx_auto_set(ctx, key, (int)in.choice | (in.cached ? 16 : 0), in.reason, in.fp32_gflops,
                 in.bf16_gflops);
    if (info) *info = in;
    return in.choice;
}
