/*
 * test_optim.c — AdamW against a double-precision transcription of
 * PyTorch's algorithm and against torch.optim.AdamW itself (two parameter
 * groups: decayed and not), the decay mask, save/load of the moments,
 * global-norm clipping, thread-count independence of the norm, and the
 * learning-rate schedules at their known points.
 */
#include "check.h"
#include "kiln.h"

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
    for (int i = 0; i < N; i++) maxerr = fmax(maxerr, fabs(p[i] - ref[i]));
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
    for (int i = 0; i < N; i++) maxerr = fmax(maxerr, fabs((double)p[i] - tp[i]) / fmax(1.0, fabs(tp[i])));
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

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(tmpdir, sizeof tmpdir, "%s/test_optim.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) return 1;
    RUN_TEST(test_adamw_reference);
    RUN_TEST(test_adamw_vs_pytorch);
    RUN_TEST(test_decay_mask_and_state_io);
    RUN_TEST(test_norm_and_clip);
    RUN_TEST(test_schedules);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) return 1;
    return TEST_EXIT();
}
