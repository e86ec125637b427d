/*
 * bench_optim.c — the optimizer part of one training step for the
 * benchmark model's parameter block (configs/bench-gpt2-30m.json, 29.4M
 * floats, its decay ranges), against two references measured in the same
 * run:
 *   - "stream": the bytes the update must move at the least, with trivial
 *     arithmetic: one read of the gradients (a sum) plus one pass reading
 *     p, g, m, v and writing p, m, v. The bandwidth floor.
 *   - "old": the update as it ran before the fused step (kept here as the
 *     reference): scaler unscale pass (inf check; with fp16 it also
 *     rewrites g), L2 norm, clip pass (rewrites g), then the scalar AdamW
 *     loop with its divisions, one parallel region per decay range.
 * "fused" is what the trainer runs now: kiln_l2_norm (which is also the
 * inf check) and kiln_adamw_step_scaled with unscale x clip folded into
 * its read of the gradients. "norm" and "step" time those two alone;
 * "memset" is the cost of kiln_model_zero_grad (a memset of the gradient
 * block) for comparison.
 *
 * The gradients are scaled so that the clip applies (as early in
 * training), and restored from a copy before each old run (the old path
 * rewrites them; the copy is not timed). Each figure is the best of --reps
 * runs, with the worst in brackets; ratios use the best.
 *
 * Usage: bench_optim [--config F] [--reps R] [--threads N] [--fp16]
 *   --fp16: loss scale 65536 as a fp16 run has (default: bf16, scaler off)
 */
#include "kiln.h"
#include "train/scaler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- the references ---------------------------------------------------- */

static double stream_ref(float *p, const float *g, float *m, float *v, size_t n)
{
    float s = 0; /* omp simd: vectorized whatever the cost model says */
#pragma omp parallel for simd schedule(static) reduction(+ : s)
    for (ptrdiff_t i = 0; i < (ptrdiff_t)n; i++) s += g[i];
#pragma omp parallel for simd schedule(static)
    for (ptrdiff_t i = 0; i < (ptrdiff_t)n; i++) {
        float gi = g[i];
        p[i] += 1e-9f * gi;
        m[i] += gi;
        v[i] += gi * gi; /* stays >= 0 for the AdamW runs that follow */
    }
    return s;
}

typedef struct old_range {
    size_t offset, numel;
    bool decay;
} old_range;

typedef struct old_opt {
    float b1, b2, eps, wd;
    int64_t t;
    old_range *rg; /* the model's decay ranges, neighbours merged */
    int nr;
} old_opt;

/* The pre-fusion sequence, transcribed from adamw.c / scaler.c. */
static void old_update(old_opt *o, const kiln_scaler *sc, float *p, float *g, float *m,
                       float *v, size_t n, float lr)
{
    float inv = scaler_inv_scale(sc);
    int bad = 0;
    if (inv == 1.0f) {
#pragma omp parallel for reduction(| : bad) schedule(static)
        for (size_t i = 0; i < n; i++) bad |= !isfinite(g[i]);
    } else {
#pragma omp parallel for reduction(| : bad) schedule(static)
        for (size_t i = 0; i < n; i++) {
            float x = g[i] * inv;
            g[i] = x;
            bad |= !isfinite(x);
        }
    }
    if (bad) return;
    enum { BLK = 16384 };
    size_t nb = (n + BLK - 1) / BLK;
    double *part = malloc(nb * sizeof *part), total = 0;
#pragma omp parallel for schedule(static)
    for (ptrdiff_t b = 0; b < (ptrdiff_t)nb; b++) {
        double s = 0;
        size_t e = (size_t)b * BLK + BLK < n ? (size_t)b * BLK + BLK : n;
        for (size_t i = (size_t)b * BLK; i < e; i++) s += (double)g[i] * g[i];
        part[b] = s;
    }
    for (size_t b = 0; b < nb; b++) total += part[b];
    free(part);
    double norm = sqrt(total);
    if (norm > 1.0) {
        float f = (float)(1.0 / (norm + 1e-6));
#pragma omp parallel for schedule(static)
        for (ptrdiff_t i = 0; i < (ptrdiff_t)n; i++) g[i] *= f;
    }
    o->t++;
    const float b1 = o->b1, b2 = o->b2, eps = o->eps;
    const float bc1 = (float)(1.0 - pow((double)b1, (double)o->t));
    const float bc2 = (float)(1.0 - pow((double)b2, (double)o->t));
    for (int r = 0; r < o->nr; r++) {
        const float wd = o->rg[r].decay ? o->wd : 0.0f;
        const ptrdiff_t a = (ptrdiff_t)o->rg[r].offset;
        const ptrdiff_t b = a + (ptrdiff_t)o->rg[r].numel;
#pragma omp parallel for schedule(static)
        for (ptrdiff_t i = a; i < b; i++) {
            float gi = g[i];
            float mi = b1 * m[i] + (1.0f - b1) * gi;
            float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            float mhat = mi / bc1, vhat = vi / bc2;
            p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
        }
    }
}

/* ---- timing ------------------------------------------------------------ */

typedef struct span {
    double best, worst;
} span;

static void span_add(span *s, double t)
{
    if (t < s->best) s->best = t;
    if (t > s->worst) s->worst = t;
}

static void span_print(const char *name, span s, double stream, size_t bytes)
{
    printf("optim %-7s %7.1f ms [%6.1f]  %5.1f GB/s  x%.2f of stream\n", name,
           s.best * 1e3, s.worst * 1e3, (double)bytes / s.best * 1e-9, s.best / stream);
}

int main(int argc, char **argv)
{
    const char *cfgpath = "configs/bench-gpt2-30m.json";
    int reps = 5, threads = 1;
    bool fp16 = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc) cfgpath = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--fp16")) fp16 = true;
        else {
            fprintf(stderr,
                    "usage: bench_optim [--config F] [--reps R] [--threads N] [--fp16]\n");
            return 2;
        }
    }
    if (reps < 1 || threads < 1) {
        fprintf(stderr, "bench_optim: --reps and --threads must be >= 1\n");
        return 2;
    }
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg;
    kiln_model *model = NULL;
    kiln_adamw *opt = NULL;
    kiln_adamw_opts ao = kiln_adamw_opts_default();
    if (kiln_config_load(ctx, cfgpath, &cfg) || kiln_model_new(ctx, &cfg, &model) ||
        kiln_adamw_new_for_model(ctx, model, &ao, &opt)) {
        fprintf(stderr, "bench_optim: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    kiln_model_init_random(model, 42);
    size_t n = kiln_model_num_params(model);
    float *p = kiln_model_params_mut(model);
    float *m = kiln_adamw_m(opt), *v = kiln_adamw_v(opt);
    float *g = malloc(n * sizeof *g), *g0 = malloc(n * sizeof *g0);
    if (!g || !g0) {
        fprintf(stderr, "bench_optim: out of memory for 2 x %zu floats\n", n);
        return 1;
    }
    kiln_scaler sc = scaler_default(fp16);
    kiln_rng r;
    kiln_rng_seed(&r, 7);
    /* norm ~ 3 (clipped to 1), carrying the loss scale */
    float amp = 3.0f / sqrtf((float)n) * scaler_loss_scale(&sc);
    for (size_t i = 0; i < n; i++) g0[i] = kiln_rng_normal(&r) * amp;
    memcpy(g, g0, n * sizeof *g);
    memset(m, 0, n * sizeof *m);
    memset(v, 0, n * sizeof *v);
    old_opt oo = {ao.beta1, ao.beta2, ao.eps, ao.weight_decay, 0, NULL, 0};
    int nt = kiln_model_num_tensors(model);
    oo.rg = malloc((size_t)nt * sizeof *oo.rg);
    for (int i = 0; i < nt; i++) { /* tensors are laid out in order */
        const kiln_tensor_info *ti = kiln_model_tensor(model, i);
        if (oo.nr > 0 && oo.rg[oo.nr - 1].decay == ti->decay &&
            oo.rg[oo.nr - 1].offset + oo.rg[oo.nr - 1].numel == ti->offset)
            oo.rg[oo.nr - 1].numel += ti->numel;
        else
            oo.rg[oo.nr++] = (old_range){ti->offset, ti->numel, ti->decay};
    }

    span st = {1e30, 0}, old = {1e30, 0}, fused = {1e30, 0}, nrm = {1e30, 0},
         stp = {1e30, 0}, zero = {1e30, 0};
    volatile double sink = 0;
    const float lr = 1e-5f; /* keep p from drifting over the reps */
    for (int rep = 0; rep <= reps; rep++) { /* rep 0 warms up */
        double t0 = kiln_time_now();
        sink += stream_ref(p, g, m, v, n);
        double t1 = kiln_time_now();
        memset(g, 0, n * sizeof *g); /* what kiln_model_zero_grad does */
        double t1b = kiln_time_now();
        memcpy(g, g0, n * sizeof *g);
        double t2 = kiln_time_now();
        old_update(&oo, &sc, p, g, m, v, n, lr);
        double t3 = kiln_time_now();
        memcpy(g, g0, n * sizeof *g);
        double t4 = kiln_time_now();
        double gn = kiln_l2_norm(g, n);
        double t5 = kiln_time_now();
        float gmul = scaler_inv_scale(&sc);
        if (isfinite(gn))
            kiln_adamw_step_scaled(opt, p, g, lr, gmul * kiln_clip_grad_coef(gn * gmul, 1.0));
        double t6 = kiln_time_now();
        sink += gn;
        if (rep == 0) continue;
        span_add(&st, t1 - t0);
        span_add(&zero, t1b - t1);
        span_add(&old, t3 - t2);
        span_add(&fused, t6 - t4);
        span_add(&nrm, t5 - t4);
        span_add(&stp, t6 - t5);
    }
    size_t pass = 7 * n * sizeof(float), all = 8 * n * sizeof(float);
    printf("optimizer update of %zu params (%s, decay ranges of %s), %d thread%s, "
           "best of %d [worst]:\n",
           n, fp16 ? "fp16, loss scale 65536" : "bf16, no loss scale", cfgpath, threads,
           threads > 1 ? "s" : "", reps);
    span_print("stream", st, st.best, all);
    span_print("old", old, st.best, all);
    span_print("fused", fused, st.best, all);
    span_print("norm", nrm, st.best, n * sizeof(float));
    span_print("step", stp, st.best, pass);
    span_print("memset", zero, st.best, n * sizeof(float));
    printf("optim fused is x%.2f faster than old; x%.2f of the stream floor (%.0f MB)\n",
           old.best / fused.best, fused.best / st.best, (double)all * 1e-6);
    free(g);
    free(g0);
    free(oo.rg);
    kiln_adamw_free(opt);
    kiln_model_free(model);
    kiln_ctx_free(ctx);
    (void)sink; /* a volatile: keeps the reference sums alive */
    return 0;
}
