/*
 * test_scaler.c — the dynamic loss scaler against torch.amp.GradScaler's
 * documented behaviour: defaults, skip + backoff on inf/NaN, growth after
 * exactly growth_interval clean steps, unscale before clipping, state that
 * survives a save/load (resume continues the same trajectory), bad state
 * rejected with the field named, and an fp16 product whose scaled gradient
 * overflows being caught and retried at half the scale.
 */
#include "check.h"
#include "kernels/x86/bf16.h"
#include "train/scaler.h"

#include <stdlib.h>
#include <string.h>

static void test_defaults(void)
{
    kiln_scaler s = scaler_default(true);
    CHECK(s.scale == 65536.0);
    CHECK(s.growth_factor == 2.0);
    CHECK(s.backoff_factor == 0.5);
    CHECK_EQ(s.growth_interval, 2000);
    CHECK_EQ(s.growth_tracker, 0);
    CHECK(scaler_loss_scale(&s) == 65536.0f);
    kiln_scaler d = scaler_default(false);
    CHECK(scaler_loss_scale(&d) == 1.0f);
}

static void test_inf_skips_and_halves(void)
{
    kiln_scaler s = scaler_default(true);
    float g[5] = {65536.f, -131072.f, 0.f, 3.f, 1.f};
    g[4] = __builtin_inff();
    bool inf = scaler_unscale(&s, g, 5);
    CHECK(inf);
    CHECK(!scaler_update(&s, inf)); /* step skipped */
    CHECK(s.scale == 32768.0);
    CHECK_EQ(s.skipped_steps, 1);
    CHECK(s.last_found_inf);
    float h[3] = {1.f, __builtin_nanf(""), 2.f};
    inf = scaler_unscale(&s, h, 3);
    CHECK(inf);
    CHECK(!scaler_update(&s, inf));
    CHECK(s.scale == 16384.0);
    CHECK_EQ(s.skipped_steps, 2);
    /* A clean step after skips applies and does not change the scale. */
    float k[2] = {16384.f, -8192.f};
    inf = scaler_unscale(&s, k, 2);
    CHECK(!inf);
    CHECK(scaler_update(&s, inf));
    CHECK(s.scale == 16384.0);
    CHECK_EQ(s.growth_tracker, 1);
    CHECK(k[0] == 1.f && k[1] == -0.5f);
}

static void test_growth_after_2000_clean_steps(void)
{
    kiln_scaler s = scaler_default(true);
    for (int i = 0; i < 1999; i++) CHECK(scaler_update(&s, false));
    CHECK(s.scale == 65536.0);
    CHECK_EQ(s.growth_tracker, 1999);
    CHECK(scaler_update(&s, false));
    CHECK(s.scale == 131072.0);
    CHECK_EQ(s.growth_tracker, 0);
    /* An inf in the middle of a streak resets the counter. */
    for (int i = 0; i < 1500; i++) scaler_update(&s, false);
    CHECK(!scaler_update(&s, true));
    CHECK(s.scale == 65536.0);
    for (int i = 0; i < 1999; i++) scaler_update(&s, false);
    CHECK(s.scale == 65536.0);
    scaler_update(&s, false);
    CHECK(s.scale == 131072.0);
}

/* Clipping sees true gradients: unscale first, then the norm. */
static void test_unscale_before_clip(void)
{
    enum { N = 1000 };
    float g[N], ref[N];
    kiln_rng r;
    kiln_rng_seed(&r, 5);
    kiln_scaler s = scaler_default(true);
    double norm2 = 0;
    for (int i = 0; i < N; i++) {
        ref[i] = kiln_rng_normal(&r) * 0.01f;
        g[i] = ref[i] * (float)s.scale; /* what backward of a scaled loss gives */
        norm2 += (double)ref[i] * ref[i];
    }
    CHECK(!scaler_unscale(&s, g, N));
    double n2 = 0;
    for (int i = 0; i < N; i++) {
        CHECK(g[i] == ref[i]); /* power-of-two scale: exact */
        n2 += (double)g[i] * g[i];
    }
    CHECK_NEAR(sqrt(n2), sqrt(norm2), 1e-12);
    /* kiln's clip on the unscaled norm is torch.nn.utils.clip_grad_norm_'s
     * coefficient, max_norm / (norm + 1e-6) (the norm here is ~0.32, so
     * max_norm 0.1 clips) */
    double norm = kiln_l2_norm(ref, N);
    CHECK_NEAR(norm, sqrt(norm2), 1e-12);
    float coef = kiln_clip_grad_coef(norm, 0.1);
    CHECK_REL(coef, 0.1 / (sqrt(norm2) + 1e-6), 1e-6);
    CHECK(coef < 0.5f);
    CHECK(kiln_clip_grad_coef(norm, 10.0) == 1.0f); /* under the limit: untouched */
    /* The trainer's fp16 update: the scaled gradient read once, unscale x
     * clip folded into grad_mul (inv_scale x the clip coefficient of the
     * unscaled norm) == unscale, clip, then a plain AdamW step. */
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_adamw_opts ao = kiln_adamw_opts_default();
    kiln_adamw *oa = NULL, *ob = NULL;
    CHECK_EQ(kiln_adamw_new(ctx, N, &ao, &oa), KILN_OK);
    CHECK_EQ(kiln_adamw_new(ctx, N, &ao, &ob), KILN_OK);
    float pa[N], pb[N], gc[N], gs[N];
    for (int i = 0; i < N; i++) {
        pa[i] = pb[i] = 0.5f - 0.001f * (float)i;
        gs[i] = ref[i] * (float)s.scale;
    }
    memcpy(gc, ref, sizeof gc);
    float c2 = kiln_clip_grad_norm(gc, N, kiln_l2_norm(gc, N), 0.1);
    CHECK(c2 == coef);
    kiln_adamw_step(oa, pa, gc, 1e-2f);
    double scaled_norm = kiln_l2_norm(gs, N) * scaler_inv_scale(&s); /* unscaled: exact */
    CHECK(scaled_norm == norm);
    kiln_adamw_step_scaled(ob, pb, gs, 1e-2f,
                           scaler_inv_scale(&s) * kiln_clip_grad_coef(scaled_norm, 0.1));
    double worst = 0;
    for (int i = 0; i < N; i++) worst = check_max(worst, fabs((double)pa[i] - pb[i]));
    CHECK_MSG(worst <= 1e-7, "scaled update differs from unscale+clip+step by %g", worst);
    /* the update did move the weights, by about lr each (AdamW's first step) */
    CHECK_NEAR(fabs((double)pb[3] - (0.5 - 0.003)), 1e-2, 1e-3);
    kiln_adamw_free(oa);
    kiln_adamw_free(ob);
    kiln_ctx_free(ctx);
    /* disabled (bf16/fp32): unscale leaves values alone but reports NaN */
    kiln_scaler d = scaler_default(false);
    float h[2] = {3.f, __builtin_nanf("")};
    CHECK(scaler_unscale(&d, h, 2));
    CHECK(h[0] == 3.f);
    CHECK(scaler_update(&d, true));
    CHECK(d.scale == 1.0);
}

/* Save mid-run, load, continue: the same trajectory as an uninterrupted run. */
static void test_state_survives_resume(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    const char *tmp = getenv("KILN_TMP");
    char path[512];
    snprintf(path, sizeof path, "%s/scaler_state.json", tmp ? tmp : "/tmp");
    kiln_rng r;
    kiln_rng_seed(&r, 9);
    bool pattern[6000];
    for (int i = 0; i < 6000; i++) pattern[i] = kiln_rng_uniform(&r) < 0.0004f;
    pattern[10] = pattern[11] = true;
    kiln_scaler a = scaler_default(true), b = scaler_default(true);
    for (int i = 0; i < 6000; i++) scaler_update(&a, pattern[i]);
    for (int i = 0; i < 3333; i++) scaler_update(&b, pattern[i]);
    json_t *st = json_object();
    json_object_set_new(st, "step", json_integer(3333));
    json_object_set_new(st, "scaler", scaler_to_json(&b));
    CHECK_EQ(js_save_file(ctx, path, st), KILN_OK);
    json_decref(st);
    json_t *back = NULL;
    CHECK_EQ(js_load_file(ctx, path, &back), KILN_OK);
    kiln_scaler c;
    memset(&c, 0, sizeof c);
    CHECK_EQ(scaler_from_json(ctx, json_object_get(back, "scaler"), path, &c), KILN_OK);
    json_decref(back);
    CHECK(c.scale == b.scale);
    CHECK_EQ(c.growth_tracker, b.growth_tracker);
    CHECK_EQ(c.skipped_steps, b.skipped_steps);
    CHECK(c.enabled);
    for (int i = 3333; i < 6000; i++) scaler_update(&c, pattern[i]);
    CHECK(c.scale == a.scale);
    CHECK_EQ(c.growth_tracker, a.growth_tracker);
    CHECK_EQ(c.skipped_steps, a.skipped_steps);
    CHECK(a.skipped_steps >= 2);
    CHECK(a.scale != 65536.0 || a.skipped_steps != 0);
    kiln_ctx_free(ctx);
}

static void test_bad_state_rejected(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_scaler s = scaler_default(true);
    json_t *o = json_pack("{s:f}", "scale", -1.0);
    CHECK_EQ(scaler_from_json(ctx, o, "run/trainer_state.json: scaler", &s), KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "scale") && strstr(kiln_errmsg(ctx), "trainer_state.json"));
    json_decref(o);
    o = json_pack("{s:s}", "scale", "big");
    CHECK_EQ(scaler_from_json(ctx, o, "x", &s), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "\"scale\""));
    json_decref(o);
    o = json_pack("{s:f, s:i, s:i}", "scale", 8.0, "growth_interval", 10, "growth_tracker", 11);
    CHECK_EQ(scaler_from_json(ctx, o, "x", &s), KILN_ERR_RANGE);
    json_decref(o);
    o = json_object();
    CHECK_EQ(scaler_from_json(ctx, o, "x", &s), KILN_ERR_FORMAT); /* scale required */
    json_decref(o);
    CHECK_EQ(scaler_from_json(ctx, NULL, "x", &s), KILN_ERR_FORMAT);
    CHECK(s.scale == 65536.0); /* untouched on failure */
    kiln_ctx_free(ctx);
}

/* The real failure the scaler exists for: fp16 gradients that overflow
 * once scaled. dy of ~1.5 times 65536 exceeds fp16's 65504, the weight
 * gradient product turns non-finite, the step is skipped, and at the
 * halved scale the same gradient goes through and unscales to the truth. */
static void test_fp16_overflow_end_to_end(void)
{
    enum { N = 64, C = 32, OC = 32 };
    float *x = malloc(sizeof(float) * N * C), *dy = malloc(sizeof(float) * N * OC);
    float *dyS = malloc(sizeof(float) * N * OC), *dW = malloc(sizeof(float) * OC * C);
    float *ref = malloc(sizeof(float) * OC * C);
    kiln_rng r;
    kiln_rng_seed(&r, 11);
    for (int i = 0; i < N * C; i++) x[i] = kiln_rng_normal(&r) * 0.1f;
    for (int i = 0; i < N * OC; i++) dy[i] = kiln_rng_normal(&r) * 0.2f;
    dy[7] = 1.5f;
    mp_scratch sc = {0};
    memset(ref, 0, sizeof(float) * OC * C);
    CHECK(mp_linear_backward_w(MP_BACKEND_AUTO, &sc, KILN_DTYPE_F16, false, dy, x, N, OC, C, ref));
    kiln_scaler s = scaler_default(true);
    int attempts = 0;
    bool applied = false;
    while (!applied && attempts < 4) {
        attempts++;
        float f = scaler_loss_scale(&s);
        for (int i = 0; i < N * OC; i++) dyS[i] = dy[i] * f;
        memset(dW, 0, sizeof(float) * OC * C);
        CHECK(mp_linear_backward_w(MP_BACKEND_AUTO, &sc, KILN_DTYPE_F16, false, dyS, x, N, OC, C, dW));
        bool inf = scaler_unscale(&s, dW, OC * C);
        applied = scaler_update(&s, inf);
    }
    CHECK_EQ(attempts, 2);
    CHECK(s.scale == 32768.0);
    CHECK_EQ(s.skipped_steps, 1);
    double e = 0;
    for (int i = 0; i < OC * C; i++) e = check_max(e, fabs(dW[i] - ref[i]));
    CHECK_MSG(e < 1e-3, "unscaled fp16 gradient off by %g", e);
    mp_scratch_free(&sc);
    free(x), free(dy), free(dyS), free(dW), free(ref);
}

/* The warning that the scale fell below 1: the first time, then once per
 * factor of 10 further down, never at 1 or above or when disabled. */
static void test_warn_below_one(void)
{
    kiln_scaler s = scaler_default(true);
    s.scale = 4.0;
    double warned = 0;
    int warnings = 0, skips = 0;
    while (s.scale > 1e-6) {
        scaler_update(&s, true);
        skips++;
        bool w = scaler_warn_low(&s, &warned);
        if (w) {
            warnings++;
            CHECK(s.scale < 1.0);
            CHECK_EQ(warned, s.scale);
        }
        if (s.scale == 0.5) CHECK(w);   /* the first scale below 1 */
        if (s.scale == 0.25) CHECK(!w); /* not yet 10x below 0.5 */
        if (s.scale == 0.03125) CHECK(w); /* 0.5 / 16: warned again */
    }
    /* 4 -> 2^-20 is 22 halvings; warnings at 2^-1, 2^-5, 2^-9, 2^-13, 2^-17 */
    CHECK(skips > 20);
    CHECK_EQ(warnings, 5);
    /* not below 1, or not scaling: no warning */
    kiln_scaler t = scaler_default(true);
    double w2 = 0;
    t.scale = 1.0;
    CHECK(!scaler_warn_low(&t, &w2));
    CHECK_EQ(w2, 0.0);
    kiln_scaler off = scaler_default(false);
    off.scale = 0.25;
    CHECK(!scaler_warn_low(&off, &w2));
}

int main(void)
{
    RUN_TEST(test_warn_below_one);
    RUN_TEST(test_defaults);
    RUN_TEST(test_inf_skips_and_halves);
    RUN_TEST(test_growth_after_2000_clean_steps);
    RUN_TEST(test_unscale_before_clip);
    RUN_TEST(test_state_survives_resume);
    RUN_TEST(test_bad_state_rejected);
    RUN_TEST(test_fp16_overflow_end_to_end);
    return TEST_EXIT();
}
