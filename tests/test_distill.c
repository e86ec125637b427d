/*
 * test_distill.c — knowledge distillation (kiln.h, "knowledge
 * distillation"): the three divergences, their temperature and the mixing
 * with the data's cross-entropy, against PyTorch (scripts/distill_ref.py:
 * F.kl_div on log-softmaxes as TRL's generalized_jsd_loss writes them,
 * float64 autograd) for the loss and its gradient with respect to the
 * student's logits; the objective the trainer runs (weigh, loss through a
 * teacher function); the teacher held in an inference engine against the
 * training forward; and the errors (vocabulary mismatch, options).
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PY "/usr/bin/python3"

enum { NN = 10, NV = 37 };

static const char *root(void)
{
    const char *r = getenv("KILN_ROOT");
    return r ? r : ".";
}

static bool have_torch(void)
{
    return access(PY, X_OK) == 0 && system(PY " -c 'import torch, numpy' >/dev/null 2>&1") == 0;
}

static void put(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(p, 1, n, f) == n);
    if (f) fclose(f);
}

static bool get(const char *path, void *p, size_t n)
{
    FILE *f = fopen(path, "rb");
    bool ok = f && fread(p, 1, n, f) == n;
    if (f) fclose(f);
    CHECK_MSG(ok, "could not read %s", path);
    return ok;
}

/* Peaked random logits (scale 3) for both models, targets with two rows
 * without a loss, real-valued weights (one 0). */
static void make_case(float *s, float *t, int32_t *y, float *w)
{
    kiln_rng r;
    kiln_rng_seed(&r, 21);
    for (int i = 0; i < NN * NV; i++) s[i] = 3.0f * kiln_rng_normal(&r);
    for (int i = 0; i < NN * NV; i++) t[i] = 3.0f * kiln_rng_normal(&r);
    for (int i = 0; i < NN; i++) {
        y[i] = (int32_t)kiln_rng_below(&r, NV);
        w[i] = 0.5f + 0.25f * (float)(i % 4);
    }
    y[3] = -100;
    y[7] = -1;
    w[5] = 0.0f;
}

typedef struct {
    kiln_kd_loss loss;
    double tau, alpha, beta;
} kd_case;

/* Every divergence (JSD at beta 0.5, 0.1 and its limits 0 and 1) at four
 * temperatures, each with three mixings. */
static int make_cases(kd_case *c)
{
    const double taus[] = {0.5, 1.0, 2.0, 4.0}, alphas[] = {0.0, 0.3, 1.0};
    const struct { kiln_kd_loss l; double beta; } kinds[] = {
        {KILN_KD_FORWARD, 0.5}, {KILN_KD_REVERSE, 0.5}, {KILN_KD_JSD, 0.5},
        {KILN_KD_JSD, 0.1},     {KILN_KD_JSD, 0.0},     {KILN_KD_JSD, 1.0}};
    int n = 0;
    for (int k = 0; k < 6; k++)
        for (int a = 0; a < 4; a++)
            for (int m = 0; m < 3; m++)
                c[n++] = (kd_case){kinds[k].l, taus[a], alphas[m], kinds[k].beta};
    return n;
}

static void test_against_torch(void)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    kiln_ctx *ctx = kiln_ctx_new();
    float s[NN * NV], t[NN * NV], w[NN], d[NN * NV], alias[NN * NV];
    int32_t y[NN];
    make_case(s, t, y, w);
    put(P("student.f32"), s, sizeof s);
    put(P("teacher.f32"), t, sizeof t);
    put(P("targets.i32"), y, sizeof y);
    put(P("weights.f32"), w, sizeof w);
    kd_case cases[72];
    int nc = make_cases(cases);
    FILE *f = fopen(P("cases.txt"), "w");
    CHECK(f != NULL);
    if (!f) return;
    for (int k = 0; k < nc; k++)
        fprintf(f, "%s %.17g %.17g %.17g\n", kiln_kd_loss_name(cases[k].loss), cases[k].tau,
                cases[k].alpha, cases[k].beta);
    fclose(f);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, PY " '%s/scripts/distill_ref.py' '%s' %d %d > '%s' 2>&1", root(),
             test_tmp, NN, NV, P("py.log"));
    int rc = system(cmd);
    CHECK_MSG(rc == 0, "distill_ref.py failed (rc %d), see %s", rc, P("py.log"));
    if (rc) return;
    double worst_l = 0, worst_g = 0, ref[1 + NN * NV];
    for (int k = 0; k < nc; k++) {
        if (!get(P("case_%d.f64", k), ref, sizeof ref)) break;
        kiln_kd_opts o = {cases[k].loss, cases[k].tau, cases[k].alpha, cases[k].beta};
        double ls = 0, ws = 0;
        /* the weight sum of the rows with a target, then the mean's gradient */
        CHECK_EQ(kiln_kd_loss_rows(ctx, &o, s, t, y, w, NN, NV, 0.0f, NULL, &ls, &ws), KILN_OK);
        double W = ws;
        ls = ws = 0;
        CHECK_EQ(kiln_kd_loss_rows(ctx, &o, s, t, y, w, NN, NV, (float)(1.0 / W), d, &ls, &ws),
                 KILN_OK);
        double el = fabs(ls / ws - ref[0]) / (fabs(ref[0]) > 1 ? fabs(ref[0]) : 1), eg = 0;
        for (int i = 0; i < NN * NV; i++) eg = check_max(eg, fabs((double)d[i] - ref[1 + i]));
        CHECK_MSG(el <= 1e-5 && eg <= 1e-5,
                  "%s tau %g alpha %g beta %g: loss %.9g vs PyTorch %.9g, gradient off by %g",
                  kiln_kd_loss_name(o.loss), o.temperature, o.alpha, o.beta, ls / ws, ref[0], eg);
        worst_l = check_max(worst_l, el);
        worst_g = check_max(worst_g, eg);
        /* written in place over the student's logits (the trainer's way):
         * the same values */
        memcpy(alias, s, sizeof alias);
        double la = 0, wa = 0;
        CHECK_EQ(kiln_kd_loss_rows(ctx, &o, alias, t, y, w, NN, NV, (float)(1.0 / W), alias, &la,
                                   &wa),
                 KILN_OK);
        CHECK(la == ls && memcmp(alias, d, sizeof d) == 0);
    }
    /* the gradient is not trivially zero: a real comparison took place */
    double gmax = 0;
    for (int i = 0; i < NN * NV; i++) gmax = check_max(gmax, fabs(ref[1 + i]));
    CHECK(gmax > 1e-3);
    printf("  %d cases: loss rel err %.2g, gradient abs err %.2g (PyTorch float64)\n", nc,
           worst_l, worst_g);
    kiln_ctx_free(ctx);
}

/* Identical teacher and student: every divergence is 0 and so is its
 * gradient; the temperature does not change that. */
static void test_same_distribution_is_zero(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    float s[NN * NV], t[NN * NV], w[NN], d[NN * NV];
    int32_t y[NN];
    make_case(s, t, y, w);
    for (int k = 0; k < 3; k++) {
        kiln_kd_opts o = {(kiln_kd_loss)k, 2.0, 0.0, 0.3};
        double ls = 0, ws = 0;
        CHECK_EQ(kiln_kd_loss_rows(ctx, &o, s, s, y, NULL, NN, NV, 1.0f, d, &ls, &ws), KILN_OK);
        double g = 0;
        for (int i = 0; i < NN * NV; i++) g = check_max(g, fabs((double)d[i]));
        CHECK_MSG(fabs(ls) < 1e-9 && g < 1e-7, "%s: loss %g, gradient %g",
                  kiln_kd_loss_name(o.loss), ls, g);
        CHECK(ws == NN - 2);
    }
    kiln_ctx_free(ctx);
}

/* A teacher function with fixed logits (the test's teacher array). */
typedef struct {
    const float *t;
    const int32_t *tokens; /* the batch's tokens (the rows' origin) */
    int calls;
    int B, T;
} fixed_teacher;

static kiln_status fixed_logits(void *user, kiln_ctx *ctx, const int32_t *tokens, int B, int T,
                                float *logits)
{
    (void)ctx;
    fixed_teacher *f = user;
    f->calls++;
    f->B = B;
    f->T = T;
    /* the rows of the sequence asked for (tokens points into the batch) */
    memcpy(logits, f->t + (tokens - f->tokens) * NV, (size_t)B * T * NV * sizeof *logits);
    return KILN_OK;
}

/* The objective: weigh counts the rows with a target; loss asks the
 * teacher once for the micro-batch and is kiln_kd_loss_rows. */
static void test_objective(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    float s[NN * NV], t[NN * NV], w[NN], d1[NN * NV], d2[NN * NV];
    int32_t y[NN], tokens[NN] = {0};
    make_case(s, t, y, w);
    fixed_teacher ft = {.t = t, .tokens = tokens};
    kiln_kd_opts o = {KILN_KD_JSD, 2.0, 0.25, 0.4};
    kiln_distill *dist = NULL;
    CHECK_EQ(kiln_distill_new(ctx, &o, NV, NV, fixed_logits, &ft, &dist), KILN_OK);
    if (!dist) return;
    const kiln_objective *obj = kiln_distill_objective(dist);
    CHECK_STREQ(obj->name, "distill");
    CHECK(!obj->fused_ce && obj->weigh && obj->loss);
    kiln_objective_batch b = {.B = 2, .T = 5, .V = NV, .tokens = tokens, .targets = y};
    double W = 0;
    CHECK_EQ(obj->weigh(obj->user, ctx, &b, &W), KILN_OK);
    CHECK(W == NN - 2);
    double l1 = 0, w1 = 0, l2 = 0, w2 = 0;
    CHECK_EQ(obj->loss(obj->user, ctx, &b, s, 0.125f, d1, &l1, &w1), KILN_OK);
    /* one sequence at a time */
    CHECK(ft.calls == 2 && ft.B == 1 && ft.T == 5);
    CHECK_EQ(kiln_kd_loss_rows(ctx, &o, s, t, y, NULL, NN, NV, 0.125f, d2, &l2, &w2), KILN_OK);
    /* the same rows (the sums only in another order) */
    CHECK(fabs(l1 - l2) <= 1e-12 * fabs(l2) && w1 == w2 && memcmp(d1, d2, sizeof d1) == 0);
    CHECK(l1 > 0);
    /* a micro-batch whose rows are not the teacher's vocabulary */
    kiln_objective_batch bad = b;
    bad.V = NV - 1;
    double x = 0, z = 0;
    CHECK(obj->loss(obj->user, ctx, &bad, s, 1.0f, d1, &x, &z) != KILN_OK);
    kiln_distill_free(dist);
    kiln_ctx_free(ctx);
}

/* Teacher and student on different vocabularies: refused, both sizes
 * named. Options out of range: refused, the field named. */
static void test_errors(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_kd_opts o = kiln_kd_opts_default();
    kiln_distill *d = NULL;
    fixed_teacher ft = {0};
    CHECK(kiln_distill_new(ctx, &o, 257, 32000, fixed_logits, &ft, &d) == KILN_ERR_INVALID_ARG);
    CHECK(d == NULL);
    CHECK_MSG(strstr(kiln_errmsg(ctx), "32000") && strstr(kiln_errmsg(ctx), "257") &&
                  strstr(kiln_errmsg(ctx), "vocab"),
              "%s", kiln_errmsg(ctx));
    struct { kiln_kd_opts o; const char *field; } bad[] = {
        {{KILN_KD_FORWARD, 0.0, 0.5, 0.5}, "kiln_kd_opts.temperature"},
        {{KILN_KD_FORWARD, NAN, 0.5, 0.5}, "kiln_kd_opts.temperature"},
        {{KILN_KD_FORWARD, 1.0, 1.5, 0.5}, "kiln_kd_opts.alpha"},
        {{KILN_KD_JSD, 1.0, 0.5, -0.1}, "kiln_kd_opts.beta"},
        {{(kiln_kd_loss)7, 1.0, 0.5, 0.5}, "kiln_kd_opts.loss"}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK(kiln_distill_new(ctx, &bad[i].o, 5, 5, fixed_logits, &ft, &d) != KILN_OK);
        CHECK_MSG(strstr(kiln_errmsg(ctx), bad[i].field), "%s", kiln_errmsg(ctx));
    }
    float s[NN * NV], t[NN * NV], w[NN];
    int32_t y[NN];
    make_case(s, t, y, w);
    y[4] = NV;
    double ls = 0, ws = 0;
    CHECK(kiln_kd_loss_rows(ctx, &o, s, t, y, NULL, NN, NV, 1.0f, NULL, &ls, &ws) ==
          KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "row 4") != NULL);
    CHECK(kiln_kd_loss_parse("forward") == KILN_KD_FORWARD &&
          kiln_kd_loss_parse("reverse") == KILN_KD_REVERSE &&
          kiln_kd_loss_parse("jsd") == KILN_KD_JSD && kiln_kd_loss_parse("kl") == -1);
    kiln_ctx_free(ctx);
}

/* The teacher in an inference engine gives the training forward's logits
 * (fp32), a quantized one close to them; a row longer than its context is
 * refused. */
static void test_teacher_engine(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = kiln_config_default();
    cfg.n_layer = 2;
    cfg.n_embd = 64;
    cfg.n_head = 2;
    cfg.n_kv_head = 2;
    cfg.n_inner = 256;
    cfg.n_ctx = 32;
    kiln_model *m = NULL;
    CHECK_EQ(kiln_model_new(ctx, &cfg, &m), KILN_OK);
    CHECK_MSG(m != NULL, "%s", kiln_errmsg(ctx));
    if (!m) return;
    kiln_model_init_random(m, 9);
    CHECK_EQ(kiln_model_set_precision(ctx, m, KILN_PRECISION_FP32), KILN_OK);
    CHECK_EQ(kiln_model_save(ctx, m, P("teacher")), KILN_OK);
    enum { B = 3, T = 16 };
    int32_t tok[B * T];
    kiln_rng r;
    kiln_rng_seed(&r, 4);
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)kiln_rng_below(&r, (uint64_t)cfg.vocab_size);
    CHECK_EQ(kiln_model_prepare(ctx, m, B, T), KILN_OK);
    float *ref = NULL;
    CHECK_EQ(kiln_model_forward(ctx, m, tok, B, T, &ref), KILN_OK);
    size_t n = (size_t)B * T * cfg.vocab_size;
    float *got = malloc(n * sizeof *got), *q = malloc(n * sizeof *q);
    kiln_teacher *t32 = NULL, *t8 = NULL;
    CHECK_EQ(kiln_teacher_new(ctx, P("teacher"), KILN_DTYPE_F32, T, &t32), KILN_OK);
    CHECK_EQ(kiln_teacher_new(ctx, P("teacher"), KILN_DTYPE_Q8_0, T, &t8), KILN_OK);
    if (got && q && t32 && t8 && ref) {
        CHECK(kiln_teacher_config(t32)->vocab_size == cfg.vocab_size);
        CHECK(kiln_teacher_weight_bytes(t8) < kiln_teacher_weight_bytes(t32));
        CHECK_EQ(kiln_teacher_logits(t32, ctx, tok, B, T, got), KILN_OK);
        CHECK_EQ(kiln_teacher_logits(t8, ctx, tok, B, T, q), KILN_OK);
        double e32 = 0, e8 = 0;
        for (size_t i = 0; i < n; i++) {
            e32 = check_max(e32, fabs((double)got[i] - ref[i]));
            e8 = check_max(e8, fabs((double)q[i] - ref[i]));
        }
        CHECK_MSG(e32 <= 1e-4, "fp32 teacher differs from the forward by %g", e32);
        CHECK_MSG(e8 > 0 && e8 <= 5e-2, "q8_0 teacher differs from the forward by %g", e8);
        int32_t long_tok[B * (T + 1)] = {0};
        CHECK(kiln_teacher_logits(t32, ctx, long_tok, B, T + 1, got) != KILN_OK);
    }
    kiln_teacher *tl = NULL;
    CHECK(kiln_teacher_new(ctx, P("teacher"), KILN_DTYPE_F32, 64, &tl) != KILN_OK);
    CHECK(strstr(kiln_errmsg(ctx), "n_ctx 32") != NULL);
    CHECK(kiln_teacher_new(ctx, P("missing"), KILN_DTYPE_F32, 8, &tl) != KILN_OK);
    CHECK(strstr(kiln_errmsg(ctx), "missing") != NULL);
    kiln_teacher_free(t32);
    kiln_teacher_free(t8);
    free(got);
    free(q);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_distill.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    RUN_TEST(test_against_torch);
    RUN_TEST(test_same_distribution_is_zero);
    RUN_TEST(test_objective);
    RUN_TEST(test_errors);
    RUN_TEST(test_teacher_engine);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
