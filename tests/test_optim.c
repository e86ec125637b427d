/*
 * test_optim.c — AdamW against a double-precision transcription of
 * PyTorch's algorithm and against torch.optim.AdamW itself (two parameter
 * groups: decayed and not), the decay mask, save/load of the moments,
 * global-norm clipping, thread-count independence of the norm, the fused
 * step (unscale and clip folded into the gradient read) against the
 * unfused sequence, and the
 * learning-rate schedules at their known points.
 */
#include "check.h"
#include "kiln.h"
#include "train/adamw.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N 1000
#define STEPS 6
#define DECAY_LO 300 /* [300, 700) decayed */
#define DECAY_HI 700

static char tmpdir[256];

/* Deterministic inputs: params (N) and per-step grads (STEPS, N). */
static void make_inputs(float *p, float *g)
{
    kiln_rng r;
    kiln_rng_seed(&r, 42);
    for (int i = 0; i < N; i++) p[i] = kiln_rng_normal(&r);
    for (int i = 0; i < STEPS * N; i++) g[i] = kiln_rng_normal(&r) * (i % 7 == 0 ? 10.0f : 0.1f);
}

static void run_kiln(float *p, const float *g, const kiln_adamw_opts *ao,
                     const float *lrs)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_adamw *o;
    CHECK_EQ(kiln_adamw_new(ctx, N, ao, &o), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, o, DECAY_LO, DECAY_HI - DECAY_LO, true), KILN_OK);
    for (int s = 0; s < STEPS; s++) kiln_adamw_step(o, p, g + (size_t)s * N, lrs[s]);
    CHECK_EQ(kiln_adamw_t(o), STEPS);
    kiln_adamw_free(o);
    kiln_ctx_free(ctx);
}

static void test_adamw_reference(void)
{
    static float p[N], g[STEPS * N];
    make_inputs(p, g);
    double ref[N], m[N] = {0}, v[N] = {0};
    for (int i = 0; i < N; i++) ref[i] = p[i];
    kiln_adamw_opts ao = {.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
    float lrs[STEPS] = {1e-3f, 2e-3f, 3e-3f, 3e-3f, 1e-3f, 5e-4f};
    /* torch.optim.AdamW (non-amsgrad), in double */
    for (int s = 0; s < STEPS; s++) {
        int t = s + 1;
        double bc1 = 1 - pow(0.9, t), bc2 = 1 - pow(0.95, t);
        for (int i = 0; i < N; i++) {
            double gi = g[s * N + i];
            double wd = (i >= DECAY_LO && i < DECAY_HI) ? 0.1 : 0.0;
            ref[i] *= 1 - (double)lrs[s] * wd;
            m[i] = 0.9 * m[i] + 0.1 * gi;
            v[i] = 0.95 * v[i] + 0.05 * gi * gi;
            ref[i] -= (lrs[s] / bc1) * m[i] / (sqrt(v[i]) / sqrt(bc2) + 1e-8);
        }
    }
    run_kiln(p, g, &ao, lrs);
    double maxerr = 0;
    for (int i = 0; i < N; i++) maxerr = check_max(maxerr, fabs(p[i] - ref[i]));
    CHECK_MSG(maxerr < 2e-6, "max abs error vs double reference %g", maxerr);
}

static void test_adamw_vs_pytorch(void)
{
    if (access("/usr/bin/python3", X_OK) != 0 ||
        system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0)
        SKIP("PyTorch (Debian python3-torch) is not installed");
    static float p[N], g[STEPS * N], p0[N];
    make_inputs(p, g);
    memcpy(p0, p, sizeof p);
    float lrs[STEPS] = {1e-3f, 2e-3f, 3e-3f, 3e-3f, 1e-3f, 5e-4f};
    kiln_adamw_opts ao = {.beta1 = 0.8f, .beta2 = 0.99f, .eps = 1e-6f, .weight_decay = 0.5f};
    run_kiln(p, g, &ao, lrs);
    char in[512], out[512], script[512], cmd[2048];
    snprintf(in, sizeof in, "%s/in.f32", tmpdir);
    snprintf(out, sizeof out, "%s/out.f32", tmpdir);
    snprintf(script, sizeof script, "%s/adamw.py", tmpdir);
    FILE *f = fopen(in, "wb");
    fwrite(p0, sizeof(float), N, f);
    fwrite(g, sizeof(float), (size_t)STEPS * N, f);
    fclose(f);
    f = fopen(script, "w");
    fprintf(f,
            "import sys, numpy as np, torch\n"
            "N, S, lo, hi = %d, %d, %d, %d\n"
            "a = np.fromfile(sys.argv[1], dtype=np.float32)\n"
            "p = torch.tensor(a[:N].copy()); g = a[N:].reshape(S, N)\n"
            "parts = [p[:lo].clone(), p[lo:hi].clone(), p[hi:].clone()]\n"
            "for t in parts: t.requires_grad_(True)\n"
            "opt = torch.optim.AdamW([{'params': [parts[0], parts[2]], 'weight_decay': 0.0},\n"
            "                         {'params': [parts[1]], 'weight_decay': 0.5}],\n"
            "                        lr=1e-3, betas=(0.8, 0.99), eps=1e-6)\n"
            "lrs = [1e-3, 2e-3, 3e-3, 3e-3, 1e-3, 5e-4]\n"
            "for s in range(S):\n"
            "    gs = torch.tensor(g[s].copy())\n"
            "    parts[0].grad = gs[:lo].clone(); parts[1].grad = gs[lo:hi].clone(); parts[2].grad = gs[hi:].clone()\n"
            "    for grp in opt.param_groups: grp['lr'] = float(np.float32(lrs[s]))\n"
            "    opt.step()\n"
            "torch.cat([t.detach() for t in parts]).numpy().astype(np.float32).tofile(sys.argv[2])\n",
            N, STEPS, DECAY_LO, DECAY_HI);
    fclose(f);
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s %s %s", script, in, out);
    CHECK_EQ(system(cmd), 0);
    float tp[N];
    f = fopen(out, "rb");
    CHECK(f != NULL);
    if (!f) return;
    CHECK_EQ(fread(tp, sizeof(float), N, f), N);
    fclose(f);
    double maxerr = 0;
    for (int i = 0; i < N; i++) maxerr = check_max(maxerr, fabs((double)p[i] - tp[i]) / fmax(1.0, fabs(tp[i])));
    CHECK_MSG(maxerr < 1e-6, "max error vs torch.optim.AdamW %g", maxerr);
}

static void test_decay_mask_and_state_io(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_adamw_opts ao = kiln_adamw_opts_default();
    ao.weight_decay = 0.5f;
    kiln_adamw *o, *o2;
    CHECK_EQ(kiln_adamw_new(ctx, 10, &ao, &o), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, o, 2, 5, true), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, o, 4, 1, false), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, o, 8, 5, true), KILN_ERR_RANGE);
    /* zero gradients: only decayed entries move, by exactly lr*wd*p */
    float p[10], g[10] = {0};
    for (int i = 0; i < 10; i++) p[i] = 1.0f;
    kiln_adamw_step(o, p, g, 0.1f);
    for (int i = 0; i < 10; i++) {
        bool dec = i >= 2 && i < 7 && i != 4;
        CHECK_NEAR(p[i], dec ? 0.95f : 1.0f, 1e-7);
    }
    g[3] = 1.0f;
    kiln_adamw_step(o, p, g, 0.1f);
    char path[512];
    snprintf(path, sizeof path, "%s/opt.safetensors", tmpdir);
    CHECK_EQ(kiln_adamw_save(ctx, o, path), KILN_OK);
    CHECK_EQ(kiln_adamw_new(ctx, 10, &ao, &o2), KILN_OK);
    CHECK_EQ(kiln_adamw_load(ctx, o2, path), KILN_OK);
    CHECK_EQ(kiln_adamw_t(o2), 2);
    CHECK(memcmp(kiln_adamw_m(o), kiln_adamw_m(o2), 10 * sizeof(float)) == 0);
    CHECK(memcmp(kiln_adamw_v(o), kiln_adamw_v(o2), 10 * sizeof(float)) == 0);
    kiln_adamw_free(o2);
    /* another model size is refused, naming the file */
    CHECK_EQ(kiln_adamw_new(ctx, 11, &ao, &o2), KILN_OK);
    CHECK_EQ(kiln_adamw_load(ctx, o2, path), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "opt.safetensors") != NULL);
    kiln_adamw_free(o2);
    kiln_adamw_free(o);
    kiln_ctx_free(ctx);
}

static void test_norm_and_clip(void)
{
    size_t n = 100003;
    float *x = malloc(n * sizeof *x);
    kiln_rng r;
    kiln_rng_seed(&r, 3);
    double ref = 0;
    for (size_t i = 0; i < n; i++) {
        x[i] = kiln_rng_normal(&r);
        ref += (double)x[i] * x[i];
    }
    ref = sqrt(ref);
    omp_set_num_threads(1);
    double n1 = kiln_l2_norm(x, n);
    omp_set_num_threads(2);
    double n2 = kiln_l2_norm(x, n);
    omp_set_num_threads(3);
    double n3 = kiln_l2_norm(x, n);
    CHECK_NEAR(n1, ref, 1e-12);
    CHECK(n1 == n2 && n2 == n3); /* bit-identical across thread counts */
    CHECK_EQ(kiln_clip_grad_norm(x, n, n1, 2 * n1), 1.0f);
    float f = kiln_clip_grad_norm(x, n, n1, 1.0);
    CHECK(f < 1.0f);
    CHECK_NEAR(kiln_l2_norm(x, n), 1.0, 1e-5);
    free(x);
    /* more than 64 blocks of 16384 (summed 64 at a time): a model's
     * gradient; still the reference and the same bits on any thread count */
    n = (size_t)130 * 16384 + 77;
    x = malloc(n * sizeof *x);
    ref = 0;
    for (size_t i = 0; i < n; i++) {
        x[i] = kiln_rng_normal(&r) * (i % 7 == 0 ? 3.f : 1.f);
        ref += (double)x[i] * x[i];
    }
    ref = sqrt(ref);
    omp_set_num_threads(1);
    n1 = kiln_l2_norm(x, n);
    omp_set_num_threads(2);
    n2 = kiln_l2_norm(x, n);
    omp_set_num_threads(3);
    n3 = kiln_l2_norm(x, n);
    CHECK_REL(n1, ref, 1e-9);
    CHECK(n1 == n2 && n2 == n3);
    free(x);
}

/* The pre-fusion update, transcribed: loss-scaler unscale and clip as
 * passes that rewrite g, then the element loop kiln_adamw_step had. */
static void old_update(float *p, float *g, float *m, float *v, size_t n, int64_t t,
                       const kiln_adamw_opts *ao, float lr, float inv_scale, double max_norm,
                       size_t dlo, size_t dhi)
{
    for (size_t i = 0; i < n; i++) g[i] *= inv_scale;
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)g[i] * g[i];
    double norm = sqrt(ss);
    if (norm > max_norm) {
        float f = (float)(max_norm / (norm + 1e-6));
        for (size_t i = 0; i < n; i++) g[i] *= f;
    }
    const float b1 = ao->beta1, b2 = ao->beta2, eps = ao->eps;
    const float bc1 = (float)(1.0 - pow((double)b1, (double)t));
    const float bc2 = (float)(1.0 - pow((double)b2, (double)t));
    for (size_t i = 0; i < n; i++) {
        float wd = i >= dlo && i < dhi ? ao->weight_decay : 0.0f;
        float mi = b1 * m[i] + (1.0f - b1) * g[i];
        float vi = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1, vhat = vi / bc2;
        p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
    }
}

/* kiln_adamw_step_scaled with grad_mul = unscale x clip coefficient equals
 * scaler unscale + kiln_clip_grad_norm + kiln_adamw_step (bit for bit:
 * the scale is a power of two) and the old three-pass update within float
 * rounding; it leaves the gradients alone and is thread-count independent.
 * n and the decay range are not multiples of the 16-float vector. */
static void test_fused_step_matches_unfused(void)
{
    const size_t n = 100003, dlo = 20001, dhi = 77777;
    const float scale = 65536.0f, inv = 1.0f / scale, lr = 3e-3f;
    const double max_norm = 1.0;
    kiln_adamw_opts ao = {.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_adamw *a, *b, *c;
    CHECK_EQ(kiln_adamw_new(ctx, n, &ao, &a), KILN_OK);
    CHECK_EQ(kiln_adamw_new(ctx, n, &ao, &b), KILN_OK);
    CHECK_EQ(kiln_adamw_new(ctx, n, &ao, &c), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, a, dlo, dhi - dlo, true), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, b, dlo, dhi - dlo, true), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, c, dlo, dhi - dlo, true), KILN_OK);
    float *pa = malloc(n * sizeof *pa), *pb = malloc(n * sizeof *pb);
    float *pc = malloc(n * sizeof *pc), *po = malloc(n * sizeof *po);
    float *g = malloc(n * sizeof *g), *g2 = malloc(n * sizeof *g2);
    float *mo = calloc(n, sizeof *mo), *vo = calloc(n, sizeof *vo);
    kiln_rng r;
    kiln_rng_seed(&r, 11);
    for (size_t i = 0; i < n; i++) pa[i] = pb[i] = pc[i] = po[i] = kiln_rng_normal(&r);
    double worst_old = 0;
    bool same = true, same_threads = true, g_kept = true;
    for (int step = 1; step <= 4; step++) {
        /* scaled gradients; step 1 and 3 are clipped (norm >> 1), 2 and 4
         * not (norm < 1) */
        float amp = step % 2 ? 0.05f : 1e-4f;
        for (size_t i = 0; i < n; i++)
            g[i] = kiln_rng_normal(&r) * amp * (i % 5 == 0 ? 20.0f : 1.0f) * scale;
        /* fused (2 threads), as the trainer runs it */
        omp_set_num_threads(2);
        double norm = kiln_l2_norm(g, n);
        CHECK(isfinite(norm));
        float gm = inv * kiln_clip_grad_coef(norm * inv, max_norm);
        if (step == 1) CHECK(gm < inv);
        if (step == 2) CHECK(gm == inv);
        memcpy(g2, g, n * sizeof *g);
        kiln_adamw_step_scaled(a, pa, g, lr, gm);
        g_kept &= memcmp(g, g2, n * sizeof *g) == 0;
        /* the same with 1 thread */
        omp_set_num_threads(1);
        kiln_adamw_step_scaled(c, pc, g, lr, gm);
        omp_set_num_threads(2);
        /* public unfused sequence */
        for (size_t i = 0; i < n; i++) g2[i] *= inv;
        kiln_clip_grad_norm(g2, n, kiln_l2_norm(g2, n), max_norm);
        kiln_adamw_step(b, pb, g2, lr);
        /* old code */
        memcpy(g2, g, n * sizeof *g);
        old_update(po, g2, mo, vo, n, step, &ao, lr, inv, max_norm, dlo, dhi);
        same &= memcmp(pa, pb, n * sizeof *pa) == 0 &&
                memcmp(kiln_adamw_m(a), kiln_adamw_m(b), n * sizeof(float)) == 0 &&
                memcmp(kiln_adamw_v(a), kiln_adamw_v(b), n * sizeof(float)) == 0;
        same_threads &= memcmp(pa, pc, n * sizeof *pa) == 0;
        for (size_t i = 0; i < n; i++)
            worst_old = check_max(worst_old, fabs((double)pa[i] - po[i]) / fmax(1.0, fabs(po[i])));
    }
    CHECK_MSG(same, "fused step differs from unscale + clip + kiln_adamw_step");
    CHECK_MSG(same_threads, "fused step differs between 1 and 2 threads");
    CHECK_MSG(g_kept, "kiln_adamw_step_scaled wrote the gradients");
    /* 4 steps of lr 3e-3: float rounding of the reordered arithmetic only
     * (measured 2.2e-7: up to 2 ulp of p after 4 steps) */
    CHECK_MSG(worst_old < 5e-7, "fused vs old three-pass update: max rel. diff %g", worst_old);
    printf("  fused vs old unfused update over 4 steps: max rel. diff %.3g\n", worst_old);
    /* the norm is the inf/NaN check: non-finite exactly when a value is */
    g[n - 1] = INFINITY;
    CHECK(isinf(kiln_l2_norm(g, n)));
    g[n - 1] = 0;
    g[12345] = NAN;
    CHECK(isnan(kiln_l2_norm(g, n)));
    g[12345] = 3.0e38f; /* FLT_MAX-sized values square finitely in double */
    CHECK(isfinite(kiln_l2_norm(g, n)));
    free(pa), free(pb), free(pc), free(po), free(g), free(g2), free(mo), free(vo);
    kiln_adamw_free(a);
    kiln_adamw_free(b);
    kiln_adamw_free(c);
    kiln_ctx_free(ctx);
}

/* The AVX-512 and portable paths (kiln_adamw_opts.kernel) of the step
 * and of the norm give the same bits, including the masked tails. */
static void test_portable_path_same_bits(void)
{
    const size_t n = 4099; /* odd: exercises the tails */
    kiln_adamw_opts ao = {.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_adamw *a, *b;
    kiln_adamw_opts po = ao;
    po.kernel = KILN_OPTIM_KERNEL_PORTABLE;
    CHECK_EQ(kiln_adamw_new(ctx, n, &ao, &a), KILN_OK);
    CHECK_EQ(kiln_adamw_new(ctx, n, &po, &b), KILN_OK);
    CHECK(!strcmp(kiln_adamw_kernel_name(b), "portable"));
    CHECK_EQ(kiln_adamw_set_decay(ctx, a, 17, 3001, true), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, b, 17, 3001, true), KILN_OK);
    float *pa = malloc(n * sizeof *pa), *pb = malloc(n * sizeof *pb), *g = malloc(n * sizeof *g);
    kiln_rng r;
    kiln_rng_seed(&r, 21);
    for (size_t i = 0; i < n; i++) pa[i] = pb[i] = kiln_rng_normal(&r);
    bool same = true;
    double na = 0, nb = 0;
    for (int step = 0; step < 3; step++) {
        for (size_t i = 0; i < n; i++) g[i] = kiln_rng_normal(&r) * 3.0f;
        na = kiln_l2_norm(g, n);
        kiln_adamw_step_scaled(a, pa, g, 1e-2f, 0.37f);
        nb = adamw_l2_norm_with(g, n, KILN_OPTIM_KERNEL_PORTABLE);
        kiln_adamw_step_scaled(b, pb, g, 1e-2f, 0.37f);
        same &= na == nb && memcmp(pa, pb, n * sizeof *pa) == 0 &&
                memcmp(kiln_adamw_m(a), kiln_adamw_m(b), n * sizeof(float)) == 0 &&
                memcmp(kiln_adamw_v(a), kiln_adamw_v(b), n * sizeof(float)) == 0;
    }
    CHECK_MSG(same, "AVX-512 and portable paths differ (norm %.17g vs %.17g)", na, nb);
    free(pa), free(pb), free(g);
    kiln_adamw_free(a);
    kiln_adamw_free(b);
    kiln_ctx_free(ctx);
}

static void test_schedules(void)
{
    /* warmup: lr*(s+1)/W */
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_COSINE, 1.0, 0.1, 10, 110, 0), 0.1, 1e-12);
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_COSINE, 1.0, 0.1, 10, 110, 9), 1.0, 1e-12);
    /* cosine: peak right after warmup, midpoint, min at the last step */
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_COSINE, 1.0, 0.1, 10, 111, 10), 1.0, 1e-12);
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_COSINE, 1.0, 0.1, 10, 111, 60), 0.55, 1e-12);
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_COSINE, 1.0, 0.1, 10, 111, 110), 0.1, 1e-12);
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_LINEAR, 1.0, 0.0, 0, 101, 25), 0.75, 1e-12);
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_LINEAR, 1.0, 0.0, 0, 101, 100), 0.0, 1e-12);
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_CONSTANT, 0.5, 0.0, 4, 100, 1), 0.25, 1e-12);
    CHECK_NEAR(kiln_lr_at(KILN_SCHEDULE_CONSTANT, 0.5, 0.0, 4, 100, 99), 0.5, 1e-12);
    /* cosine is monotone after warmup */
    double prev = 2;
    int mono = 1;
    for (int s = 10; s < 111; s++) {
        double l = kiln_lr_at(KILN_SCHEDULE_COSINE, 1.0, 0.1, 10, 111, s);
        mono &= l <= prev;
        prev = l;
    }
    CHECK(mono);
    CHECK_EQ(kiln_schedule_parse("linear"), KILN_SCHEDULE_LINEAR);
    CHECK_EQ(kiln_schedule_parse("cosine"), KILN_SCHEDULE_COSINE);
    CHECK_EQ(kiln_schedule_parse("exp"), -1);
    CHECK_STREQ(kiln_schedule_name(KILN_SCHEDULE_CONSTANT), "constant");
}

/* adamw_step_matrices: the same bits as the plain step for every
 * parameter, matrices or not; after() once per strip of each matrix it
 * takes, with the strip already updated; the matrices it cannot take
 * whole (across a decay boundary, rows not a whole number of strips,
 * overlapping an earlier one) are left to the plain pass. */
typedef struct strip_log {
    const float *ref; /* the plain step's parameters */
    size_t offset;
    int cols, strip;
    int calls[8];
    bool updated;
} strip_log;

static void log_strip(void *ud, const float *W, int r0)
{
    strip_log *l = ud;
    size_t off = (size_t)r0 * (size_t)l->cols, len = (size_t)l->strip * (size_t)l->cols;
    l->calls[r0 / l->strip]++;
    if (memcmp(W + off, l->ref + l->offset + off, len * sizeof(float)) != 0) l->updated = false;
}

static void test_step_matrices(void)
{
    enum { NM = 7 };
    const size_t n = 60000, dlo = 20000, dhi = 45000;
    kiln_adamw_opts ao = {.beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_adamw *a, *b;
    CHECK_EQ(kiln_adamw_new(ctx, n, &ao, &a), KILN_OK);
    CHECK_EQ(kiln_adamw_new(ctx, n, &ao, &b), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, a, dlo, dhi - dlo, true), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, b, dlo, dhi - dlo, true), KILN_OK);
    float *pa = malloc(n * sizeof *pa), *pb = malloc(n * sizeof *pb), *g = malloc(n * sizeof *g);
    kiln_rng r;
    kiln_rng_seed(&r, 5);
    for (size_t i = 0; i < n; i++) pa[i] = pb[i] = kiln_rng_normal(&r);
    /* offset, rows, cols, strip; whether it is taken */
    const struct { size_t off; int rows, cols, strip; bool taken; } mk[NM] = {
        {100, 64, 48, 32, true},           /* no decay */
        {dlo, 96, 40, 32, true},           /* starts the decay range */
        {dlo + 96 * 40, 32, 64, 16, true}, /* right after it */
        {dlo + 96 * 40 + 10, 32, 32, 32, false}, /* overlaps the one before */
        {dhi - 1000, 64, 32, 32, false},   /* across the decay boundary */
        {dhi + 100, 50, 32, 32, false},    /* 50 rows: not whole strips */
        {dhi + 5000, 64, 64, 32, true},
    };
    adamw_matrix mats[NM];
    strip_log logs[NM];
    int omp_before = omp_get_max_threads();
    omp_set_num_threads(2);
    for (int step = 1; step <= 3; step++) {
        for (size_t i = 0; i < n; i++) g[i] = kiln_rng_normal(&r) * 0.01f;
        kiln_adamw_step_scaled(b, pb, g, 1e-2f, 0.5f);
        for (int i = 0; i < NM; i++) {
            logs[i] = (strip_log){.ref = pb, .offset = mk[i].off, .cols = mk[i].cols,
                                  .strip = mk[i].strip, .updated = true};
            mats[i] = (adamw_matrix){.offset = mk[i].off, .rows = mk[i].rows, .cols = mk[i].cols,
                                     .strip = mk[i].strip, .after = log_strip, .ud = &logs[i]};
        }
        adamw_step_matrices(a, pa, g, 1e-2f, 0.5f, mats, NM);
        CHECK(memcmp(pa, pb, n * sizeof *pa) == 0);
        CHECK(memcmp(kiln_adamw_m(a), kiln_adamw_m(b), n * sizeof(float)) == 0);
        CHECK(memcmp(kiln_adamw_v(a), kiln_adamw_v(b), n * sizeof(float)) == 0);
        CHECK_EQ(kiln_adamw_t(a), kiln_adamw_t(b));
        for (int i = 0; i < NM; i++) {
            CHECK_MSG(mats[i].done == mk[i].taken, "matrix %d done %d", i, mats[i].done);
            for (int s = 0; s < 8; s++) {
                int want = mk[i].taken && s < mk[i].rows / mk[i].strip ? 1 : 0;
                CHECK_MSG(logs[i].calls[s] == want, "matrix %d strip %d: %d calls", i, s,
                          logs[i].calls[s]);
            }
            CHECK_MSG(logs[i].updated, "matrix %d: after() saw rows not yet updated", i);
        }
    }
    omp_set_num_threads(omp_before);
    free(pa), free(pb), free(g);
    kiln_adamw_free(a);
    kiln_adamw_free(b);
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(tmpdir, sizeof tmpdir, "%s/test_optim.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) return 1;
    RUN_TEST(test_adamw_reference);
    RUN_TEST(test_adamw_vs_pytorch);
    RUN_TEST(test_decay_mask_and_state_io);
    RUN_TEST(test_norm_and_clip);
    RUN_TEST(test_fused_step_matches_unfused);
    RUN_TEST(test_portable_path_same_bits);
    RUN_TEST(test_step_matrices);
    RUN_TEST(test_schedules);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) return 1;
    return TEST_EXIT();
}
