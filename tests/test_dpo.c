/*
 * test_dpo.c — the DPO objective (src/tune/dpo.c) and its place in the
 * trainer.
 *
 * References: an independent PyTorch implementation of TRL's DPOTrainer
 * losses and metrics (scripts/dpo_ref.py, float64 autograd) for the loss,
 * the six metrics and d(loss)/d(logits) of sigmoid, ipo and hinge on one
 * micro-batch of pairs (<= 1e-4); and end to end, the parameter gradients
 * of a tiny gpt2 and llama under the DPO loss (dpo_ref.py rebuilds the
 * model with torch_ref.py's forward; <= 1e-4 relative). Known answers: with
 * the reference equal to the policy (kiln_rows_logprobs of the same model)
 * the loss is ln 2 and every reward 0, also as the first step's loss of a
 * kiln_train run with row_group 2 (pairs kept together, rows named by
 * b->rows); the row order of a run keeps every pair in order. Bad batches
 * (odd, rows not a pair) are errors naming what is wrong.
 */
#include "check.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "testdata.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PY "/usr/bin/python3"

static const char *root(void)
{
    const char *r = getenv("KILN_ROOT");
    return r ? r : ".";
}

static bool have_torch(void)
{
    return access(PY, X_OK) == 0 &&
           system(PY " -c 'import torch, numpy' >/dev/null 2>&1") == 0;
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

static const char *loss_names[] = {"sigmoid", "ipo", "hinge"};
static const double betas[] = {0.1, 0.5, 0.5};

/* ---- one micro-batch of pairs against PyTorch ------------------------ */

enum { NB = 6, NT = 5, NV = 9, NN = NB * NT };

/* Logits, targets (the first two positions a prompt, one row padded at
 * the end) and reference sums at a spread of distances from the policy's,
 * so the hinge is active on some pairs and not on others. */
static void make_pairs(kiln_ctx *ctx, float *logits, int32_t *targets, double *ref)
{
    kiln_rng r;
    kiln_rng_seed(&r, 11);
    for (int i = 0; i < NN * NV; i++) logits[i] = 1.5f * kiln_rng_normal(&r);
    for (int i = 0; i < NN; i++)
        targets[i] = i % NT < 2 ? -1 : (int32_t)kiln_rng_below(&r, NV);
    targets[3 * NT + NT - 1] = -1;
    float lp[NN];
    CHECK_EQ(kiln_token_logprobs(ctx, logits, targets, NN, NV, lp), KILN_OK);
    for (int b = 0; b < NB; b++) {
        double s = 0;
        for (int t = 0; t < NT; t++) s += lp[b * NT + t];
        ref[b] = s + 4.0 * kiln_rng_normal(&r);
    }
}

static void test_loss_against_torch(void)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    kiln_ctx *ctx = kiln_ctx_new();
    float logits[NN * NV], d[NN * NV];
    int32_t targets[NN];
    double ref[NB];
    int64_t rows[NB];
    for (int i = 0; i < NB; i++) rows[i] = i;
    make_pairs(ctx, logits, targets, ref);
    put(P("logits.f32"), logits, sizeof logits);
    put(P("targets.i32"), targets, sizeof targets);
    put(P("ref.f64"), ref, sizeof ref);
    for (int k = 0; k < 3; k++) {
        char cmd[1024];
        snprintf(cmd, sizeof cmd,
                 PY " '%s/scripts/dpo_ref.py' logits '%s' %d %d %d %g %s > '%s' 2>&1", root(),
                 test_tmp, NB, NT, NV, betas[k], loss_names[k], P("py.log"));
        int rc = system(cmd);
        CHECK_MSG(rc == 0, "dpo_ref.py failed (rc %d), see %s", rc, P("py.log"));
        if (rc) break;
        static double want[1 + 6 + NN * NV];
        if (!get(P("out.f64"), want, sizeof want)) break;
        kiln_dpo_opts o = kiln_dpo_opts_default();
        o.beta = betas[k];
        o.loss = (kiln_dpo_loss)k;
        kiln_dpo *dpo;
        CHECK_EQ(kiln_dpo_new(ctx, &o, ref, NB, NULL, 0, &dpo), KILN_OK);
        const kiln_objective *obj = kiln_dpo_objective(dpo);
        kiln_objective_batch b = {.B = NB, .T = NT, .V = NV, .targets = targets, .rows = rows};
        double w = 0, ls = 0, ws = 0;
        CHECK_EQ(obj->weigh(obj->user, ctx, &b, &w), KILN_OK);
        CHECK(w == NB / 2);
        CHECK_EQ(obj->loss(obj->user, ctx, &b, logits, (float)(1.0 / w), d, &ls, &ws), KILN_OK);
        CHECK(ws == NB / 2);
        double err = fabs(ls / w - want[0]);
        CHECK_MSG(err <= 1e-6, "%s: loss %.9g vs torch %.9g", loss_names[k], ls / w, want[0]);
        double sums[16], vals[6];
        obj->stats_take(obj->user, false, sums);
        obj->metrics(obj->user, sums, vals);
        for (int i = 0; i < 6; i++)
            CHECK_MSG(fabs(vals[i] - want[1 + i]) <= 1e-5 * fmax(1.0, fabs(want[1 + i])),
                      "%s: %s %.9g vs torch %.9g", loss_names[k], obj->metric_names[i], vals[i],
                      want[1 + i]);
        double ge = 0, gmax = 0;
        for (int i = 0; i < NN * NV; i++) {
            ge = check_max(ge, fabs((double)d[i] - want[7 + i]));
            gmax = check_max(gmax, fabs(want[7 + i]));
        }
        CHECK_MSG(ge <= 1e-4 * gmax && gmax > 0, "%s: dlogits differ from PyTorch by %g (max %g)",
                  loss_names[k], ge, gmax);
        if (k == 2) {
            /* the spread makes the hinge active on some pairs only */
            CHECK(vals[2] > 0 && vals[2] < 1);
        }
        kiln_dpo_free(dpo);
    }
    kiln_ctx_free(ctx);
}

/* ---- end to end: parameter gradients of a tiny model ------------------ */

static kiln_config tiny(kiln_arch a)
{
    kiln_config c = kiln_config_default();
    c.arch = a;
    c.n_layer = 2;
    c.n_embd = 32;
    c.n_head = 4;
    c.n_kv_head = a == KILN_ARCH_GPT2 ? 4 : 2;
    c.n_inner = a == KILN_ARCH_GPT2 ? 128 : 48;
    c.vocab_size = 53;
    c.n_ctx = 16;
    c.rope_theta = 10000.0f;
    c.tie_embeddings = a == KILN_ARCH_GPT2;
    c.bias = a == KILN_ARCH_GPT2;
    c.bos_token_id = c.eos_token_id = 0;
    return c;
}

static void params_case(kiln_arch arch, int k)
{
    enum { B = 4, T = 10 };
    kiln_ctx *ctx = kiln_ctx_new();
    char dir[300];
    snprintf(dir, sizeof dir, "%s", P("model_%d_%d", (int)arch, k));
    kiln_config cfg = tiny(arch);
    kiln_model *m;
    CHECK_EQ(kiln_model_new(ctx, &cfg, &m), KILN_OK);
    kiln_model_init_random(m, 1234);
    kiln_rng r;
    kiln_rng_seed(&r, 98);
    for (size_t i = 0; i < m->num_params; i++)
        m->params[i] = m->params[i] * 5.0f + 0.05f * kiln_rng_normal(&r);
    CHECK_EQ(kiln_model_save(ctx, m, dir), KILN_OK);
    /* pairs sharing a prompt of 4 tokens, completions of different lengths */
    int32_t tok[B * T], tgt[B * T];
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            tok[b * T + t] = b % 2 && t < 4 ? tok[(b - 1) * T + t]
                                              : (int32_t)kiln_rng_below(&r, 53);
        }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int end = T - (b == 1 ? 3 : 0); /* row 1: a shorter completion */
            tgt[b * T + t] = t >= 3 && t < end - 1 ? tok[b * T + t + 1] : -1;
            if (t == end - 1 && end == T) tgt[b * T + t] = (int32_t)kiln_rng_below(&r, 53);
        }
    double ref[B];
    int64_t rows[B] = {0, 1, 2, 3};
    kiln_packed pk = {.rows = B, .T = T, .tokens = tok, .targets = tgt};
    CHECK_EQ(kiln_model_prepare(ctx, m, B, T), KILN_OK);
    CHECK_EQ(kiln_rows_logprobs(ctx, m, &pk, B, ref), KILN_OK);
    for (int b = 0; b < B; b++) ref[b] += 3.0 * kiln_rng_normal(&r);
    kiln_dpo_opts o = kiln_dpo_opts_default();
    o.beta = betas[k];
    o.loss = (kiln_dpo_loss)k;
    kiln_dpo *dpo;
    CHECK_EQ(kiln_dpo_new(ctx, &o, ref, B, NULL, 0, &dpo), KILN_OK);
    const kiln_objective *obj = kiln_dpo_objective(dpo);
    float *logits;
    CHECK_EQ(kiln_model_forward(ctx, m, tok, B, T, &logits), KILN_OK);
    kiln_model_zero_grad(m);
    kiln_objective_batch b = {.B = B, .T = T, .V = cfg.vocab_size, .tokens = tok, .targets = tgt,
                              .rows = rows};
    double ls = 0, ws = 0;
    CHECK_EQ(obj->loss(obj->user, ctx, &b, logits, 1.0f / (B / 2), logits, &ls, &ws), KILN_OK);
    CHECK_EQ(kiln_model_backward(ctx, m, logits), KILN_OK);
    float loss = (float)(ls / ws);
    int n = 4 + m->n_tensors;
    st_entry *e = calloc((size_t)n, sizeof *e);
    char **names = calloc((size_t)n, sizeof(char *));
    e[0] = (st_entry){.name = "tokens", .dtype = KILN_DTYPE_I32, .ndim = 2, .shape = {B, T}, .data = tok};
    e[1] = (st_entry){.name = "targets", .dtype = KILN_DTYPE_I32, .ndim = 2, .shape = {B, T}, .data = tgt};
    e[2] = (st_entry){.name = "ref", .dtype = KILN_DTYPE_F64, .ndim = 1, .shape = {B}, .data = ref};
    e[3] = (st_entry){.name = "loss", .dtype = KILN_DTYPE_F32, .ndim = 1, .shape = {1}, .data = &loss};
    for (int i = 0; i < m->n_tensors; i++) {
        const kiln_tensor_info *t = &m->tensors[i];
        names[i] = malloc(strlen(t->name) + 6);
        sprintf(names[i], "grad.%s", t->name);
        e[4 + i] = (st_entry){.name = names[i], .dtype = KILN_DTYPE_F32, .ndim = t->ndim,
                              .shape = {t->shape[0], t->shape[1]}, .data = m->grads + t->offset};
    }
    char path[400], cmd[1400];
    snprintf(path, sizeof path, "%s/kiln_out.safetensors", dir);
    CHECK_EQ(st_save(ctx, path, e, n, NULL, 0), KILN_OK);
    snprintf(cmd, sizeof cmd, PY " '%s/scripts/dpo_ref.py' model '%s' %g %s > '%s/log' 2>&1",
             root(), dir, betas[k], loss_names[k], dir);
    int rc = system(cmd);
    snprintf(path, sizeof path, "%s/log", dir);
    FILE *f = fopen(path, "r");
    char line[512];
    while (f && fgets(line, sizeof line, f))
        if (rc != 0 || strncmp(line, "ok", 2) != 0) fprintf(stderr, "  [%s] %s", loss_names[k], line);
    if (f) fclose(f);
    CHECK_MSG(rc == 0, "%s: the PyTorch reference disagrees (lines above)", loss_names[k]);
    for (int i = 0; i < m->n_tensors; i++) free(names[i]);
    free(names);
    free(e);
    kiln_dpo_free(dpo);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

static void test_param_grads_against_torch(void)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    for (int k = 0; k < 3; k++) params_case(KILN_ARCH_GPT2, k);
    params_case(KILN_ARCH_LLAMA, 0);
}

/* ---- reference = policy: ln 2 ------------------------------------------ */

enum { RB = 8, RT = 12, RV = 257 };

/* RB/2 pairs of byte rows: a shared prompt, differing completions. */
static void make_rows(kiln_packed *pk, int32_t *tok, int32_t *tgt)
{
    kiln_rng r;
    kiln_rng_seed(&r, 5);
    for (int b = 0; b < RB; b++)
        for (int t = 0; t < RT; t++)
            tok[b * RT + t] = b % 2 && t < 5 ? tok[(b - 1) * RT + t]
                                               : (int32_t)(97 + kiln_rng_below(&r, 26));
    for (int b = 0; b < RB; b++)
        for (int t = 0; t < RT; t++)
            tgt[b * RT + t] = t >= 4 && t + 1 < RT ? tok[b * RT + t + 1] : -1;
    *pk = (kiln_packed){.rows = RB, .T = RT, .tokens = tok, .targets = tgt};
}

static void write_config(const char *path)
{
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fprintf(f, "{\"model_type\":\"gpt2\",\"n_layer\":1,\"n_embd\":32,\"n_head\":2,"
               "\"n_positions\":32,\"vocab_size\":%d,\"tie_word_embeddings\":true}\n", RV);
    fclose(f);
}

static void test_ln2_when_ref_is_policy(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    int32_t tok[RB * RT], tgt[RB * RT];
    kiln_packed pk;
    make_rows(&pk, tok, tgt);
    write_config(P("ln2.json"));
    kiln_config cfg;
    CHECK_EQ(kiln_config_load(ctx, P("ln2.json"), &cfg), KILN_OK);
    kiln_model *m;
    CHECK_EQ(kiln_model_new(ctx, &cfg, &m), KILN_OK);
    kiln_model_init_random(m, 3);
    CHECK_EQ(kiln_model_save(ctx, m, P("ln2_model")), KILN_OK);
    /* the reference pass as kiln dpo runs it: load, run, free */
    double ref[RB];
    kiln_dpo_ref_opts ro = {.model_dir = P("ln2_model"), .batch = RB, .threads = 1,
                            .po = kiln_precision_opts_default(), .cache_path = P("ref.bin")};
    ro.po.precision = KILN_PRECISION_FP32;
    bool cached = true;
    CHECK_EQ(kiln_dpo_reference(ctx, &ro, &pk, NULL, ref, NULL, &cached), KILN_OK);
    CHECK(!cached);
    double again[RB] = {0};
    CHECK_EQ(kiln_dpo_reference(ctx, &ro, &pk, NULL, again, NULL, &cached), KILN_OK);
    CHECK(cached && !memcmp(ref, again, sizeof ref));
    /* other rows: the cache does not apply (and is required on resume) */
    tgt[RT + 6] = -1;
    ro.require_cache = true;
    CHECK(kiln_dpo_reference(ctx, &ro, &pk, NULL, again, NULL, &cached) != KILN_OK);
    CHECK(strstr(kiln_errmsg(ctx), "ref.bin") != NULL);
    tgt[RT + 6] = tok[RT + 7];
    for (int k = 0; k < 3; k++) {
        kiln_dpo_opts o = kiln_dpo_opts_default();
        o.loss = (kiln_dpo_loss)k;
        kiln_dpo *dpo;
        CHECK_EQ(kiln_dpo_new(ctx, &o, ref, RB, NULL, 0, &dpo), KILN_OK);
        const kiln_objective *obj = kiln_dpo_objective(dpo);
        float *logits;
        CHECK_EQ(kiln_model_forward(ctx, m, tok, RB, RT, &logits), KILN_OK);
        int64_t rows[RB];
        for (int i = 0; i < RB; i++) rows[i] = i;
        kiln_objective_batch b = {.B = RB, .T = RT, .V = RV, .tokens = tok, .targets = tgt,
                                  .rows = rows};
        double ls = 0, ws = 0;
        CHECK_EQ(obj->loss(obj->user, ctx, &b, logits, 0.0f, logits, &ls, &ws), KILN_OK);
        /* h = 0: sigmoid ln 2, ipo 1/(2 beta)^2 = 25, hinge 1 */
        double want = k == 0 ? log(2.0) : k == 1 ? 25.0 : 1.0;
        CHECK_MSG(fabs(ls / ws - want) <= 1e-6 * want, "%s: %.9g, want %.9g", loss_names[k],
                  ls / ws, want);
        double sums[16], vals[6];
        obj->stats_take(obj->user, false, sums);
        obj->metrics(obj->user, sums, vals);
        CHECK(vals[0] == 0 && vals[1] == 0 && vals[2] == 0 && vals[3] == 0);
        kiln_dpo_free(dpo);
    }
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* kiln_train with the DPO objective: step 1's loss is ln 2 (the reference
 * is the initial policy), the loss falls, and each micro-batch holds whole
 * pairs in order (the objective checks b->rows, and an error would stop
 * the run). */
typedef struct {
    double loss[8];
} losses;

static bool keep_loss(void *user, const kiln_step_info *si)
{
    losses *l = user;
    if (si->step >= 1 && si->step <= 8) l->loss[si->step - 1] = si->loss;
    return true;
}

static void test_trainer_pairs(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    int32_t tok[RB * RT], tgt[RB * RT];
    kiln_packed pk;
    make_rows(&pk, tok, tgt);
    double ref[RB];
    kiln_dpo_ref_opts ro = {.model_dir = P("ln2_model"), .batch = 4, .threads = 1,
                            .po = kiln_precision_opts_default()};
    ro.po.precision = KILN_PRECISION_FP32;
    bool cached;
    CHECK_EQ(kiln_dpo_reference(ctx, &ro, &pk, NULL, ref, NULL, &cached), KILN_OK);
    kiln_dpo_opts dop = kiln_dpo_opts_default();
    dop.beta = 0.5;
    kiln_dpo *dpo;
    CHECK_EQ(kiln_dpo_new(ctx, &dop, ref, RB, NULL, 0, &dpo), KILN_OK);
    kiln_train_opts o = kiln_train_opts_default();
    o.init_from = P("ln2_model");
    o.out = P("ln2_run");
    o.rows = &pk;
    o.row_group = 2;
    o.objective = kiln_dpo_objective(dpo);
    o.batch = 4;
    o.seq = RT;
    o.grad_accum = 2;
    o.lr = 1e-2;
    o.warmup = 0;
    o.steps = 8;
    o.eval_every = 0;
    o.save_every = 0;
    o.threads = 1;
    o.progress = KILN_PROGRESS_NONE;
    o.precision = KILN_PRECISION_FP32;
    losses l = {{0}};
    o.on_step = keep_loss;
    o.on_step_user = &l;
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, &o, &res);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    CHECK_MSG(fabs(l.loss[0] - log(2.0)) <= 1e-6, "step 1 loss %.9g, want ln 2", l.loss[0]);
    CHECK_MSG(l.loss[7] < 0.5 * log(2.0), "loss %.4g -> %.4g", l.loss[0], l.loss[7]);
    /* batch not a multiple of the group: refused naming the fields */
    o.out = P("ln2_run_bad");
    o.batch = 3;
    o.on_step = NULL;
    s = kiln_train(ctx, &o, &res);
    CHECK(s != KILN_OK && strstr(kiln_errmsg(ctx), "kiln_train_opts.row_group") != NULL);
    kiln_dpo_free(dpo);
    kiln_ctx_free(ctx);
}

static void test_bad_batches(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    float logits[NN * NV];
    int32_t targets[NN];
    double ref[NB];
    make_pairs(ctx, logits, targets, ref);
    kiln_dpo *dpo;
    kiln_dpo_opts o = kiln_dpo_opts_default();
    o.beta = 0;
    CHECK(kiln_dpo_new(ctx, &o, ref, NB, NULL, 0, &dpo) != KILN_OK);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_dpo_opts.beta") != NULL);
    o = kiln_dpo_opts_default();
    CHECK_EQ(kiln_dpo_new(ctx, &o, ref, NB, NULL, 0, &dpo), KILN_OK);
    const kiln_objective *obj = kiln_dpo_objective(dpo);
    int64_t swapped[NB] = {1, 0, 2, 3, 4, 5}, rows[NB] = {0, 1, 2, 3, 4, 5};
    double ls = 0, ws = 0;
    kiln_objective_batch b = {.B = NB, .T = NT, .V = NV, .targets = targets, .rows = swapped};
    CHECK(obj->loss(obj->user, ctx, &b, logits, 1.0f, logits, &ls, &ws) != KILN_OK);
    CHECK(strstr(kiln_errmsg(ctx), "row_group") != NULL);
    b.rows = NULL;
    CHECK(obj->loss(obj->user, ctx, &b, logits, 1.0f, logits, &ls, &ws) != KILN_OK);
    b.rows = rows;
    b.B = 5;
    CHECK(obj->loss(obj->user, ctx, &b, logits, 1.0f, logits, &ls, &ws) != KILN_OK);
    b.B = NB;
    b.eval = true; /* no held-out reference given */
    CHECK(obj->loss(obj->user, ctx, &b, logits, 1.0f, logits, &ls, &ws) != KILN_OK);
    CHECK(strstr(kiln_errmsg(ctx), "validation") != NULL);
    CHECK_EQ(kiln_dpo_loss_parse("ipo"), KILN_DPO_IPO);
    CHECK_EQ(kiln_dpo_loss_parse("kto"), -1);
    kiln_dpo_free(dpo);
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_dpo.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    RUN_TEST(test_loss_against_torch);
    RUN_TEST(test_param_grads_against_torch);
    RUN_TEST(test_ln2_when_ref_is_policy);
    RUN_TEST(test_trainer_pairs);
    RUN_TEST(test_bad_batches);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
