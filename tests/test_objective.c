/*
 * test_objective.c — the trainer's objectives (kiln_objective, kiln.h).
 *
 * References: PyTorch (scripts/objective_ref.py, Debian's python3-torch:
 * F.cross_entropy with ignore_index=-100 and reduction 'sum' over the
 * count, weighted per token, log_softmax gathered) for masked CE and the
 * per-token log-probs; finite differences for every dlogits written here
 * (masked CE, the log-probs' backward, a label-smoothed CE defined in this
 * file); and the default CE run itself, bit for bit, for the paths that
 * must not change it: masked CE with every token learned, and CE through
 * the general path (objective's dlogits in, kiln_model_backward) instead of
 * the fused kiln_model_backward_ce, in fp32 and bf16. Normalization over
 * the global batch: a masked run of batch 2 x 2 micro-steps equals batch
 * 4 x 1, and the first step's loss is the masked mean computed outside the
 * trainer. A custom objective (label smoothing) trains through kiln_train.
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PY "/usr/bin/python3"



static const char *root(void)
{
    const char *r = getenv("KILN_ROOT");
    return r ? r : ".";
}

/* ---- single micro-batches: against PyTorch and finite differences ---- */

enum { NB = 3, NT = 4, NN = NB * NT, NV = 7 };

/* Random logits, targets with two ignored rows, 0/1 weights. */
static void make_case(float *logits, int32_t *targets, float *weights, float *dlogp)
{
    kiln_rng r;
    kiln_rng_seed(&r, 5);
    for (int i = 0; i < NN * NV; i++) logits[i] = 1.5f * kiln_rng_normal(&r);
    for (int i = 0; i < NN; i++) {
        targets[i] = (int32_t)kiln_rng_below(&r, NV);
        weights[i] = i % 3 == 1 ? 0.0f : 1.0f;
        dlogp[i] = kiln_rng_normal(&r);
    }
    targets[2] = targets[9] = -100;
}

/* The objective's loss over the batch as the trainer normalizes it:
 * weigh's denominator, loss's sum; dlogits (may be NULL) at 1/W. */
static double objective_mean(kiln_ctx *ctx, const kiln_objective *obj, kiln_objective_batch *b,
                             const float *logits, float *dlogits, double *W)
{
    double w = 0, ls = 0, ws = 0;
    if (obj->weigh) CHECK_EQ(obj->weigh(obj->user, ctx, b, &w), KILN_OK);
    else w = (double)b->B * b->T;
    float scratch[NN * NV];
    CHECK_EQ(obj->loss(obj->user, ctx, b, logits, (float)(1.0 / w), dlogits ? dlogits : scratch,
                       &ls, &ws),
             KILN_OK);
    if (W) *W = w;
    return ls / w;
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

/* Masked CE (0/1 mask and real weights), its dlogits, the per-token
 * log-probs and their backward against PyTorch in float64. */
static void test_against_torch(void)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    kiln_ctx *ctx = kiln_ctx_new();
    float logits[NN * NV], weights[NN], dlogp[NN], d[NN * NV];
    int32_t targets[NN];
    make_case(logits, targets, weights, dlogp);
    put(P("logits.f32"), logits, sizeof logits);
    put(P("targets.i32"), targets, sizeof targets);
    put(P("dlogp.f32"), dlogp, sizeof dlogp);
    for (int pass = 0; pass < 2; pass++) {
        /* pass 1: real-valued weights (0 kept where it was) */
        float w[NN];
        for (int i = 0; i < NN; i++) w[i] = pass ? weights[i] * (0.5f + 0.25f * (float)(i % 4)) : weights[i];
        put(P("weights.f32"), w, sizeof w);
        char cmd[1024];
        snprintf(cmd, sizeof cmd, PY " '%s/scripts/objective_ref.py' '%s' %d %d > '%s' 2>&1",
                 root(), test_tmp, NN, NV, P("py.log"));
        int rc = system(cmd);
        CHECK_MSG(rc == 0, "objective_ref.py failed (rc %d), see %s", rc, P("py.log"));
        if (rc) break;
        double ref[1 + NN * NV];
        if (!get(P(pass ? "weighted.f64" : "masked.f64"), ref, sizeof ref)) break;
        kiln_objective_batch b = {.B = NB, .T = NT, .V = NV, .targets = targets, .weights = w};
        double W;
        double loss = objective_mean(ctx, kiln_objective_masked_ce(), &b, logits, d, &W);
        CHECK_REL(loss, ref[0], 1e-6);
        double err = 0;
        for (int i = 0; i < NN * NV; i++) err = check_max(err, fabs((double)d[i] - ref[1 + i]));
        CHECK_MSG(err <= 2e-6, "pass %d: dlogits differ from PyTorch by %g", pass, err);
        if (pass == 0) {
            /* the count is that of the learned tokens, not of all rows */
            CHECK(W == 6.0);
            double lp_ref[NN], dl_ref[NN * NV];
            float lp[NN];
            if (!get(P("logp.f64"), lp_ref, sizeof lp_ref) ||
                !get(P("dlogp.f64"), dl_ref, sizeof dl_ref))
                break;
            CHECK_EQ(kiln_token_logprobs(ctx, logits, targets, NN, NV, lp), KILN_OK);
            CHECK_EQ(kiln_token_logprobs_backward(ctx, logits, targets, dlogp, NN, NV, 1.0f, d),
                     KILN_OK);
            double e1 = 0, e2 = 0;
            for (int i = 0; i < NN; i++) e1 = check_max(e1, fabs((double)lp[i] - lp_ref[i]));
            for (int i = 0; i < NN * NV; i++) e2 = check_max(e2, fabs((double)d[i] - dl_ref[i]));
            CHECK_MSG(e1 <= 2e-6, "log-probs differ from PyTorch by %g", e1);
            CHECK_MSG(e2 <= 2e-6, "log-prob backward differs from PyTorch by %g", e2);
        }
    }
    kiln_ctx_free(ctx);
}

/* Central differences of f over every logit against dlogits. */
typedef double (*loss_fn)(void *u, const float *logits);

static double fd_max_err(loss_fn f, void *u, const float *logits, const float *dlogits)
{
    float x[NN * NV];
    memcpy(x, logits, sizeof x);
    double err = 0;
    for (int i = 0; i < NN * NV; i++) {
        float x0 = x[i];
        x[i] = x0 + 1e-2f;
        double fp = f(u, x);
        float xp = x[i];
        x[i] = x0 - 1e-2f;
        double fm = f(u, x);
        float xm = x[i];
        x[i] = x0;
        double g = (fp - fm) / ((double)xp - (double)xm);
        err = check_max(err, fabs(g - (double)dlogits[i]));
    }
    return err;
}

typedef struct {
    kiln_ctx *ctx;
    const kiln_objective *obj;
    kiln_objective_batch *b;
} obj_case;

static double obj_loss(void *u, const float *logits)
{
    obj_case *c = u;
    return objective_mean(c->ctx, c->obj, c->b, logits, NULL, NULL);
}

typedef struct {
    const int32_t *targets;
    const float *dlogp;
    kiln_ctx *ctx;
} lp_case;

static double lp_loss(void *u, const float *logits)
{
    lp_case *c = u;
    float lp[NN];
    CHECK_EQ(kiln_token_logprobs(c->ctx, logits, c->targets, NN, NV, lp), KILN_OK);
    double s = 0;
    for (int i = 0; i < NN; i++) s += (double)c->dlogp[i] * lp[i];
    return s;
}

/* ---- a custom objective: label-smoothed cross-entropy ---------------- */

/* PyTorch's label_smoothing: (1 - eps) * -log p[target] + eps * mean_j
 * -log p[j] per row with a target; dlogits = p - (1 - eps) onehot - eps/V. */
typedef struct {
    float eps;
    int calls;
} smooth;

static kiln_status smooth_loss(void *user, kiln_ctx *ctx, const kiln_objective_batch *b,
                               const float *logits, float grad_scale, float *dlogits,
                               double *loss_sum, double *weight_sum)
{
    (void)ctx;
    smooth *sm = user;
    sm->calls++;
    int V = b->V;
    for (int64_t i = 0; i < (int64_t)b->B * b->T; i++) {
        const float *x = logits + i * V;
        float *d = dlogits + i * V;
        int tg = b->targets[i];
        if (tg < 0) {
            for (int j = 0; j < V; j++) d[j] = 0;
            continue;
        }
        double mx = x[0], s = 0, sx = 0;
        for (int j = 1; j < V; j++) mx = x[j] > mx ? x[j] : mx;
        for (int j = 0; j < V; j++) s += exp(x[j] - mx), sx += x[j];
        double lse = mx + log(s);
        *loss_sum += (1 - sm->eps) * (lse - x[tg]) + sm->eps * (lse - sx / V);
        *weight_sum += 1;
        double p_t = exp(x[tg] - lse);
        for (int j = 0; j < V; j++) {
            double g = exp(x[j] - lse) - sm->eps / V;
            d[j] = (float)(grad_scale * g);
        }
        d[tg] = (float)(grad_scale * (p_t - sm->eps / V - (1 - sm->eps)));
    }
    return KILN_OK;
}

static void test_finite_differences(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    float logits[NN * NV], weights[NN], dlogp[NN], d[NN * NV];
    int32_t targets[NN];
    make_case(logits, targets, weights, dlogp);
    for (int i = 0; i < NN; i++) weights[i] *= 0.5f + 0.25f * (float)(i % 4);
    targets[9] = -1;
    kiln_objective_batch b = {.B = NB, .T = NT, .V = NV, .targets = targets, .weights = weights};
    smooth sm = {.eps = 0.1f};
    kiln_objective ls = {.name = "label_smoothing", .loss = smooth_loss, .user = &sm};
    const kiln_objective *objs[3] = {kiln_objective_masked_ce(), kiln_objective_ce(), &ls};
    for (int k = 0; k < 3; k++) {
        obj_case c = {ctx, objs[k], &b};
        objective_mean(ctx, objs[k], &b, logits, d, NULL);
        double err = fd_max_err(obj_loss, &c, logits, d);
        CHECK_MSG(err <= 2e-4, "%s: dlogits differ from finite differences by %g",
                  objs[k]->name, err);
    }
    lp_case lc = {targets, dlogp, ctx};
    CHECK_EQ(kiln_token_logprobs_backward(ctx, logits, targets, dlogp, NN, NV, 1.0f, d), KILN_OK);
    double err = fd_max_err(lp_loss, &lc, logits, d);
    CHECK_MSG(err <= 2e-4, "log-prob backward differs from finite differences by %g", err);
    /* in place, as the trainer calls objectives */
    float x[NN * NV];
    memcpy(x, logits, sizeof x);
    CHECK_EQ(kiln_token_logprobs_backward(ctx, x, targets, dlogp, NN, NV, 1.0f, x), KILN_OK);
    CHECK(memcmp(x, d, sizeof x) == 0);
    targets[3] = NV;
    CHECK_EQ(kiln_token_logprobs(ctx, logits, targets, NN, NV, dlogp), KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "row 3") != NULL);
    kiln_ctx_free(ctx);
}

/* ---- through the trainer --------------------------------------------- */

static void make_data(const char *dir, size_t ntrain, int vocab)
{
    static const char *words[] = {"the ", "cat ", "sat ", "on ", "a ", "mat. ",
                                  "dog ", "ran ", "far ", "away. ", "\n"};
    kiln_rng r;
    kiln_rng_seed(&r, 99);
    int32_t *ids = malloc(ntrain * sizeof *ids);
    size_t k = 0;
    while (k < ntrain) {
        const char *w = words[kiln_rng_below(&r, 11)];
        for (; *w && k < ntrain; w++) ids[k++] = (unsigned char)*w;
    }
    test_write_tokens(dir, ids, ntrain, NULL, 0, vocab, 256);
    free(ids);
    char path[600];
    FILE *f;
    snprintf(path, sizeof path, "%s/../config.json", dir);
    f = fopen(path, "w");
    fprintf(f,
            "{\"model_type\":\"gpt2\",\"n_layer\":1,\"n_embd\":32,\"n_head\":2,"
            "\"n_positions\":32,\"vocab_size\":%d,\"layer_norm_epsilon\":1e-5,"
            "\"tie_word_embeddings\":true}\n",
            vocab);
    fclose(f);
}

enum { STEPS = 6 };

typedef struct {
    double loss[STEPS], gnorm[STEPS];
} run_vals;

static bool keep_vals(void *user, const kiln_step_info *si)
{
    run_vals *v = user;
    if (si->step >= 1 && si->step <= STEPS) {
        v->loss[si->step - 1] = si->loss;
        v->gnorm[si->step - 1] = si->grad_norm;
    }
    return true;
}

/* Trains STEPS steps of batch B x accum K with obj (NULL: the default);
 * *params (malloc'ed) gets the final weights. */
static bool train(const char *name, const kiln_objective *obj, kiln_precision prec, int B, int K,
                  run_vals *v, float **params, size_t *n)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_opts o = kiln_train_opts_default();
    o.config = P("config.json");
    o.data = P("data");
    o.out = P("%s", name);
    o.batch = B;
    o.seq = 16;
    o.grad_accum = K;
    o.lr = 3e-3;
    o.warmup = 2;
    o.steps = STEPS;
    o.eval_every = 0;
    o.save_every = 0;
    o.threads = 1;
    o.progress = KILN_PROGRESS_NONE;
    o.seed = 7;
    o.precision = prec;
    if (obj) o.objective = obj;
    memset(v, 0, sizeof *v);
    o.on_step = keep_vals;
    o.on_step_user = v;
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, &o, &res);
    CHECK_MSG(s == KILN_OK, "%s: %s", name, kiln_errmsg(ctx));
    bool ok = s == KILN_OK;
    if (ok && params) {
        kiln_model *m;
        ok = kiln_model_load(ctx, res.checkpoint, &m) == KILN_OK;
        CHECK(ok);
        if (ok) {
            *n = kiln_model_num_params(m);
            *params = malloc(*n * sizeof(float));
            memcpy(*params, kiln_model_params(m), *n * sizeof(float));
            kiln_model_free(m);
        }
    }
    kiln_ctx_free(ctx);
    return ok;
}

/* Runs obj and the default side by side: the same weights bit for bit,
 * the same losses to loss_tol (0: bit for bit). */
static void same_as_default(const char *name, const kiln_objective *obj, double loss_tol)
{
    for (int p = 0; p < 2; p++) {
        kiln_precision prec = p ? KILN_PRECISION_BF16 : KILN_PRECISION_FP32;
        run_vals a, b;
        float *pa = NULL, *pb = NULL;
        size_t na = 0, nb = 0;
        char ra[64], rb[64];
        snprintf(ra, sizeof ra, "%s_ce_%d", name, p);
        snprintf(rb, sizeof rb, "%s_%d", name, p);
        if (!train(ra, NULL, prec, 2, 2, &a, &pa, &na) || !train(rb, obj, prec, 2, 2, &b, &pb, &nb)) {
            free(pa);
            free(pb);
            continue;
        }
        CHECK_MSG(na == nb && memcmp(pa, pb, na * sizeof(float)) == 0,
                  "%s %s: the weights differ from the default CE run's", name,
                  kiln_precision_name(prec));
        for (int i = 0; i < STEPS; i++) {
            if (loss_tol == 0)
                CHECK_MSG(a.loss[i] == b.loss[i], "%s %s step %d: loss %.17g vs %.17g", name,
                          kiln_precision_name(prec), i + 1, b.loss[i], a.loss[i]);
            else
                CHECK_REL(b.loss[i], a.loss[i], loss_tol);
            CHECK_MSG(a.gnorm[i] == b.gnorm[i], "%s %s step %d: grad_norm %.17g vs %.17g", name,
                      kiln_precision_name(prec), i + 1, b.gnorm[i], a.gnorm[i]);
        }
        free(pa);
        free(pb);
    }
}

/* Masked CE with every token learned (weights 1) is CE, bit for bit. */
static void test_all_ones_mask_is_ce(void)
{
    same_as_default("masked", kiln_objective_masked_ce(), 0);
}

/* CE through the general path (loss writes dlogits, kiln_model_backward)
 * instead of the fused one: the same gradients, so the same weights bit
 * for bit (test_precision test_backward_ce compares the gradients of one
 * backward); the loss to double rounding (bf16's fused loss is summed per
 * 32 rows). */
static void test_general_path_is_fused(void)
{
    kiln_objective general = *kiln_objective_ce();
    general.fused_ce = false;
    general.name = "ce_general";
    same_as_default("general", &general, 1e-12);
}

/* A custom objective trains through kiln_train: with eps 0 label
 * smoothing is CE (the same steps to float rounding: it computes the
 * softmax its own way); with eps 0.1 it is called once per micro-batch
 * and the loss falls. */
static void test_custom_objective(void)
{
    smooth sm = {.eps = 0.0f};
    kiln_objective ls = {.name = "label_smoothing", .loss = smooth_loss, .user = &sm};
    run_vals a, b;
    if (!train("smooth0_ce", NULL, KILN_PRECISION_FP32, 2, 2, &a, NULL, NULL) ||
        !train("smooth0", &ls, KILN_PRECISION_FP32, 2, 2, &b, NULL, NULL))
        return;
    for (int i = 0; i < STEPS; i++) {
        CHECK_REL(b.loss[i], a.loss[i], 1e-6);
        CHECK_REL(b.gnorm[i], a.gnorm[i], 1e-4);
    }
    CHECK_EQ(sm.calls, STEPS * 2);
    sm.eps = 0.1f;
    sm.calls = 0;
    if (!train("smooth1", &ls, KILN_PRECISION_BF16, 2, 2, &b, NULL, NULL)) return;
    CHECK_EQ(sm.calls, STEPS * 2);
    CHECK(b.loss[STEPS - 1] < b.loss[0] - 0.1);
    for (int i = 0; i < STEPS; i++) CHECK(b.loss[i] > a.loss[i] - 0.5);
}

/* A weigh of one's own writing a mask (no loss on the rows whose target
 * is a space): the mean is over the global batch's learned tokens, not
 * per micro-batch, so batch 2 x 2 micro-steps == batch 4 x 1 (the same 4
 * windows per step) to float rounding. Both differ from plain CE. */
static kiln_status no_spaces(void *user, kiln_ctx *ctx, kiln_objective_batch *b, double *weight)
{
    (void)user;
    for (int i = 0; i < b->B * b->T; i++)
        if (b->targets[i] == ' ') b->weights[i] = 0.0f;
    return kiln_objective_masked_ce()->weigh(NULL, ctx, b, weight);
}

/* The first step's loss of a masked run, computed outside the trainer:
 * the initial model (config, seed 7) on the step's 4 windows (the
 * loader's order, seed 7), kiln_cross_entropy with the mask, divided by
 * the count of learned tokens. */
static double first_masked_loss(void)
{
    enum { B = 4, T = 16 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg;
    kiln_data *d = NULL;
    kiln_loader *l = NULL;
    kiln_model *m = NULL;
    double loss = NAN;
    if (kiln_config_load(ctx, P("config.json"), &cfg) || kiln_data_open(ctx, P("data"), &d) ||
        kiln_loader_new(ctx, d, KILN_SPLIT_TRAIN, T, true, 7, &l) ||
        kiln_model_new(ctx, &cfg, &m) ||
        kiln_model_set_precision(ctx, m, KILN_PRECISION_FP32)) {
        CHECK_MSG(0, "%s", kiln_errmsg(ctx));
        goto done;
    }
    kiln_model_init_random(m, 7);
    int32_t in[B * T], tg[B * T];
    float mask[B * T], *logits;
    int learned = 0;
    for (int b = 0; b < B; b++) kiln_loader_get(l, b, in + b * T, tg + b * T);
    for (int i = 0; i < B * T; i++) {
        mask[i] = tg[i] == ' ' ? 0.0f : 1.0f;
        learned += tg[i] != ' ';
    }
    double ls = 0, ws = 0;
    CHECK_EQ(kiln_model_forward(ctx, m, in, B, T, &logits), KILN_OK);
    CHECK_EQ(kiln_cross_entropy(ctx, logits, tg, mask, B * T, cfg.vocab_size, 1.0f, NULL, &ls,
                                &ws),
             KILN_OK);
    CHECK(learned > 0 && learned < B * T);
    loss = ls / learned;
done:
    kiln_model_free(m);
    kiln_loader_free(l);
    kiln_data_close(d);
    kiln_ctx_free(ctx);
    return loss;
}

static void test_mask_mean_over_global_batch(void)
{
    kiln_objective obj = *kiln_objective_masked_ce();
    obj.name = "no_spaces";
    obj.weigh = no_spaces;
    run_vals a, b, c;
    double first = first_masked_loss();
    for (int p = 0; p < 2; p++) {
        kiln_precision prec = p ? KILN_PRECISION_BF16 : KILN_PRECISION_FP32;
        if (!train(p ? "mask4x1_bf16" : "mask4x1", &obj, prec, 4, 1, &a, NULL, NULL) ||
            !train(p ? "mask2x2_bf16" : "mask2x2", &obj, prec, 2, 2, &b, NULL, NULL) ||
            !train(p ? "ce2x2_bf16" : "ce2x2", NULL, prec, 2, 2, &c, NULL, NULL))
            return;
        double tol = p ? 2e-3 : 1e-5;
        if (!p) CHECK_REL(a.loss[0], first, 1e-6);
        for (int i = 0; i < STEPS; i++) {
            CHECK_REL(b.loss[i], a.loss[i], tol);
            CHECK_REL(b.gnorm[i], a.gnorm[i], 20 * tol);
            CHECK(fabs(b.loss[i] - c.loss[i]) > 1e-3);
        }
    }
}

static kiln_status weigh_nothing(void *user, kiln_ctx *ctx, kiln_objective_batch *b,
                                 double *weight)
{
    (void)user;
    (void)ctx;
    for (int i = 0; i < b->B * b->T; i++) b->weights[i] = 0.0f;
    (void)weight;
    return KILN_OK;
}

/* An objective without a loss function, and a batch that weighs nothing,
 * are errors that say so. */
static void test_bad_objectives(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_objective none = {.name = "none"};
    kiln_objective zero = *kiln_objective_masked_ce();
    zero.name = "weighs_nothing";
    zero.weigh = weigh_nothing;
    const kiln_objective *objs[2] = {&none, &zero};
    const char *want[2] = {"kiln_train_opts.objective has no loss function",
                           "objective 'weighs_nothing': the batch of step 1 weighs 0"};
    for (int k = 0; k < 2; k++) {
        kiln_train_opts o = kiln_train_opts_default();
        o.config = P("config.json");
        o.data = P("data");
        o.out = P("bad%d", k);
        o.batch = 2;
        o.seq = 16;
        o.steps = 2;
        o.eval_every = 0;
        o.threads = 1;
        o.progress = KILN_PROGRESS_NONE;
        o.objective = objs[k];
        kiln_train_result res;
        CHECK(kiln_train(ctx, &o, &res) != KILN_OK);
        CHECK_MSG(strstr(kiln_errmsg(ctx), want[k]) != NULL, "message: %s", kiln_errmsg(ctx));
    }
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_objective.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    make_data(P("data"), 20000, 257);
    RUN_TEST(test_against_torch);
    RUN_TEST(test_finite_differences);
    RUN_TEST(test_all_ones_mask_is_ce);
    RUN_TEST(test_general_path_is_fused);
    RUN_TEST(test_custom_objective);
    RUN_TEST(test_mask_mean_over_global_batch);
    RUN_TEST(test_bad_objectives);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
