/*
 * test_prune.c — kiln_prune against references written here:
 *   - magnitude, per output row and per matrix: exactly the floor(s*n)
 *     lowest |W| of each group are zero (ranks counted pairwise, ties to
 *     the lower index), every other weight and every other tensor keeps
 *     its bits (gpt2's (in, out) and llama's (out, in) layouts);
 *   - Wanda: layer by layer, the test runs the forward of its own copy of
 *     the model over the same calibration windows, takes the inputs of
 *     each matrix from the activations (ln_1, attention output, ln_2, the
 *     MLP activation), computes |W| * ||X_j||_2 and prunes its copy; the
 *     library's result must equal it bit for bit (also for 2:4 by the
 *     Wanda score);
 *   - 2:4: every group of 4 consecutive inputs of every row holds exactly
 *     2 zeros, the two lowest-scored;
 *   - mlp: the channels removed are the lowest by ||a_c|| * ||W_out[:,c]||
 *     and the smaller model's logits equal (<= 1e-5, fp32) those of the
 *     full model with those channels' output columns zeroed;
 *   - errors name the field (sparsity outside [0, 1), 2:4 on a width not
 *     divisible by 4 or with sparsity != 0.5, unknown method, no calib);
 *   - kiln_train from a marked (sparsity.json) pruned model keeps every
 *     zero at zero over AdamW steps with weight decay in fp32 and bf16
 *     (and the same run without the mark does not: the check can fail),
 *     and its checkpoints carry the mark.
 */
#include "check.h"
#include "kiln.h"
#include "model/model.h"
#include "testdata.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static kiln_config gpt2_cfg(void)
{
    kiln_config c = kiln_config_default();
    c.n_layer = 2;
    c.n_embd = 32;
    c.n_head = 4;
    c.n_kv_head = 4;
    c.n_inner = 64;
    c.n_ctx = 32;
    c.vocab_size = 61;
    c.bos_token_id = c.eos_token_id = 60;
    return c;
}

static kiln_config llama_cfg(void)
{
    kiln_config c = gpt2_cfg();
    c.arch = KILN_ARCH_LLAMA;
    c.n_kv_head = 2;
    c.n_inner = 48;
    c.bias = false;
    c.tie_embeddings = false;
    c.rope_theta = 10000.0f;
    c.norm_eps = 1e-5f;
    return c;
}

static kiln_model *new_model(kiln_ctx *ctx, const kiln_config *c, uint64_t seed)
{
    kiln_model *m = NULL;
    if (kiln_model_new(ctx, c, &m)) {
        fprintf(stderr, "  kiln_model_new: %s\n", kiln_errmsg(ctx));
        return NULL;
    }
    kiln_model_init_random(m, seed);
    /* biases and norms off their init values, so that they matter */
    float *p = kiln_model_params_mut(m);
    kiln_rng r;
    kiln_rng_seed(&r, seed + 1);
    for (int i = 0; i < kiln_model_num_tensors(m); i++) {
        const kiln_tensor_info *t = kiln_model_tensor(m, i);
        if (t->ndim == 1)
            for (size_t k = 0; k < t->numel; k++)
                p[t->offset + k] += 0.1f * (kiln_rng_uniform(&r) - 0.5f);
    }
    return m;
}

/* The test's own view of a matrix as (out, in). */
typedef struct tmat {
    float *w;
    int out, in;
    bool in_out;
} tmat;

static float *tat(const tmat *t, int o, int j)
{
    return t->in_out ? t->w + (size_t)j * t->out + o : t->w + (size_t)o * t->in + j;
}

static void mats(kiln_model *m, int l, tmat t[4])
{
    model_layer *y = &m->w.layers[l];
    bool g = m->cfg.arch == KILN_ARCH_GPT2;
    t[0] = (tmat){y->qkv_w, m->QKV, m->C, g};
    t[1] = (tmat){y->proj_w, m->C, m->NH * m->HS, g};
    t[2] = (tmat){y->fc_w, g ? m->F : 2 * m->F, m->C, g};
    t[3] = (tmat){y->fcproj_w, m->C, m->F, g};
}

/* Rank of entry i among n scores: how many come before it (lower score,
 * or equal score and lower index). */
static size_t rank_of(const float *s, size_t n, size_t i)
{
    size_t r = 0;
    for (size_t j = 0; j < n; j++) r += s[j] < s[i] || (s[j] == s[i] && j < i);
    return r;
}

/* Prunes t by scores |W| * norm (norm NULL: 1), the reference way:
 * mode 0 per row, 1 per matrix, 2 the 2:4 pattern. */
static void ref_prune(tmat *t, const float *norm, double sp, int mode)
{
    size_t n = mode == 1 ? (size_t)t->out * t->in : (size_t)t->in;
    float *s = malloc(n * sizeof *s);
    bool *z = malloc(n * sizeof *z);
    int rows = mode == 1 ? 1 : t->out;
    for (int r = 0; r < rows; r++) {
        for (size_t i = 0; i < n; i++) {
            int o = mode == 1 ? (int)(i / t->in) : r, j = (int)(i % t->in);
            float a = fabsf(*tat(t, o, j));
            s[i] = norm ? a * norm[j] : a;
        }
        if (mode == 2) {
            for (size_t g = 0; g < n; g += 4)
                for (size_t i = g; i < g + 4; i++) z[i] = rank_of(s + g, 4, i - g) < 2;
        } else {
            size_t k = (size_t)floor(sp * (double)n);
            for (size_t i = 0; i < n; i++) z[i] = rank_of(s, n, i) < k;
        }
        for (size_t i = 0; i < n; i++)
            if (z[i]) *tat(t, mode == 1 ? (int)(i / t->in) : r, (int)(i % t->in)) = 0.0f;
    }
    free(s);
    free(z);
}

static bool same_params(const kiln_model *a, const kiln_model *b, size_t *diff)
{
    size_t n = kiln_model_num_params(a), d = 0;
    const float *x = kiln_model_params(a), *y = kiln_model_params(b);
    for (size_t i = 0; i < n; i++) d += memcmp(&x[i], &y[i], 4) != 0;
    *diff = d;
    return d == 0;
}

static kiln_model *clone(kiln_ctx *ctx, const kiln_model *m)
{
    kiln_model *c = NULL;
    if (kiln_model_new(ctx, kiln_model_config(m), &c)) return NULL;
    memcpy(kiln_model_params_mut(c), kiln_model_params(m), kiln_model_num_params(m) * 4);
    return c;
}

static void test_magnitude(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    for (int arch = 0; arch < 2; arch++)
        for (int mode = 0; mode < 3; mode++) {
            kiln_config c = arch ? llama_cfg() : gpt2_cfg();
            kiln_model *m = new_model(ctx, &c, 11), *r = clone(ctx, m);
            CHECK(m && r);
            if (!m || !r) break;
            kiln_prune_opts o = kiln_prune_opts_default();
            o.method = mode == 2 ? KILN_PRUNE_2_4 : KILN_PRUNE_MAGNITUDE;
            o.score = KILN_PRUNE_SCORE_MAGNITUDE;
            o.group = mode == 1 ? KILN_PRUNE_GROUP_MATRIX : KILN_PRUNE_GROUP_ROW;
            o.sparsity = mode == 2 ? 0.5 : 0.3;
            kiln_model *sm = NULL;
            CHECK_EQ(kiln_prune(ctx, m, &o, &sm), KILN_OK);
            CHECK(sm == NULL);
            size_t zeros = 0, want = 0;
            for (int l = 0; l < c.n_layer; l++) {
                tmat t[4];
                mats(r, l, t);
                for (int k = 0; k < 4; k++) {
                    ref_prune(&t[k], NULL, o.sparsity, mode);
                    size_t cells = (size_t)t[k].out * t[k].in;
                    want += mode == 1 ? (size_t)floor(o.sparsity * (double)cells)
                                      : (size_t)t[k].out * (size_t)floor(o.sparsity * t[k].in);
                    for (int oo = 0; oo < t[k].out; oo++)
                        for (int j = 0; j < t[k].in; j++) zeros += *tat(&t[k], oo, j) == 0.0f;
                }
            }
            size_t diff;
            CHECK_MSG(same_params(m, r, &diff), "arch %d mode %d: %zu weights differ from the "
                                                "reference", arch, mode, diff);
            /* exactly the count asked for: floor(s * n) of each group
             * (the random weights have no zeros of their own) */
            CHECK_EQ(zeros, want);
            kiln_model_free(m);
            kiln_model_free(r);
        }
    kiln_ctx_free(ctx);
}

/* Calibration windows and the reference's squares of layer l's inputs. */
static void ref_norms(kiln_ctx *ctx, kiln_model *r, const int32_t *ids, size_t nw, int B, int T,
                      int l, double *ss[4])
{
    int C = r->C, F = r->F, A = r->NH * r->HS;
    bool g = r->cfg.arch == KILN_ARCH_GPT2;
    int FH = g ? F : 2 * F;
    int w[4] = {C, A, C, F};
    for (int k = 0; k < 4; k++) memset(ss[k], 0, (size_t)w[k] * sizeof(double));
    float *x = malloc((size_t)B * T * FH * sizeof *x), *a = malloc((size_t)B * T * F * sizeof *a);
    for (size_t w0 = 0; w0 < nw; w0 += (size_t)B) {
        int b = (int)(nw - w0 < (size_t)B ? nw - w0 : (size_t)B), n = b * T;
        float *lg;
        CHECK_EQ(kiln_model_forward(ctx, r, ids + w0 * T, b, T, &lg), KILN_OK);
        kern_backend *be = model_pass_backend(r);
        size_t bc = be->mp.act_bytes(be, n, C), bf = be->mp.act_bytes(be, n, FH);
        const void *src[3] = {(char *)r->a.ln1p + l * bc, (char *)r->a.attyp + l * bc,
                              (char *)r->a.ln2p + l * bc};
        for (int k = 0; k < 3; k++) {
            be->mp.act_unpack(be, x, src[k], n, w[k]);
            for (int i = 0; i < n; i++)
                for (int j = 0; j < w[k]; j++) ss[k][j] += (double)x[(size_t)i * w[k] + j] * x[(size_t)i * w[k] + j];
        }
        be->mp.act_unpack(be, x, (const kern_act *)((char *)r->a.fchp + l * bf), n, FH);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < F; j++) {
                float v;
                if (g) v = 0; /* the model's own GELU (its tanh form), below */
                else {
                    float gt = x[(size_t)i * FH + j], up = x[(size_t)i * FH + F + j];
                    v = gt * (1.0f / (1.0f + expf(-gt))) * up;
                }
                a[(size_t)i * F + j] = v;
            }
        if (g) r->ops->gelu_fwd(a, x, (size_t)n * F);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < F; j++) ss[3][j] += (double)a[(size_t)i * F + j] * a[(size_t)i * F + j];
    }
    free(x);
    free(a);
}

static int32_t *calib_ids(size_t n, int V)
{
    int32_t *ids = malloc(n * sizeof *ids);
    kiln_rng g;
    kiln_rng_seed(&g, 77);
    for (size_t i = 0; i < n; i++) ids[i] = (int32_t)kiln_rng_below(&g, (uint32_t)V);
    return ids;
}

static void test_wanda(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    const int T = 16, B = 2;
    const size_t NW = 5; /* windows: two full batches and a half one */
    for (int arch = 0; arch < 2; arch++)
        for (int two4 = 0; two4 < 2; two4++) {
            kiln_config c = arch ? llama_cfg() : gpt2_cfg();
            kiln_model *m = new_model(ctx, &c, 21), *r = clone(ctx, m);
            int32_t *ids = calib_ids(NW * T + 3, c.vocab_size);
            CHECK(m && r);
            if (!m || !r) break;
            kiln_prune_opts o = kiln_prune_opts_default();
            o.method = two4 ? KILN_PRUNE_2_4 : KILN_PRUNE_WANDA;
            o.score = KILN_PRUNE_SCORE_WANDA;
            o.sparsity = 0.5;
            o.calib = ids;
            o.n_calib = NW * T + 3;
            o.batch = B;
            o.seq = T;
            kiln_model *sm = NULL;
            CHECK_EQ(kiln_prune(ctx, m, &o, &sm), KILN_OK);
            /* the reference, layer by layer on its own copy */
            CHECK_EQ(kiln_model_set_precision(ctx, r, KILN_PRECISION_FP32), KILN_OK);
            CHECK_EQ(kiln_model_prepare(ctx, r, B, T), KILN_OK);
            double *ss[4];
            float *norm = malloc((size_t)(c.n_inner > c.n_embd ? c.n_inner : c.n_embd) * 4);
            for (int k = 0; k < 4; k++) ss[k] = calloc(128, sizeof(double));
            for (int l = 0; l < c.n_layer; l++) {
                ref_norms(ctx, r, ids, NW, B, T, l, ss);
                model_params_touched(r);
                tmat t[4];
                mats(r, l, t);
                for (int k = 0; k < 4; k++) {
                    for (int j = 0; j < t[k].in; j++) norm[j] = (float)sqrt(ss[k][j]);
                    ref_prune(&t[k], norm, 0.5, two4 ? 2 : 0);
                }
            }
            size_t diff;
            CHECK_MSG(same_params(m, r, &diff), "arch %d 2:4 %d: %zu weights differ from the "
                                                "reference Wanda", arch, two4, diff);
            /* Wanda's mask is not magnitude's (the activations matter) */
            kiln_model *mg = new_model(ctx, &c, 21);
            o.method = two4 ? KILN_PRUNE_2_4 : KILN_PRUNE_MAGNITUDE;
            o.score = KILN_PRUNE_SCORE_MAGNITUDE;
            CHECK_EQ(kiln_prune(ctx, mg, &o, &sm), KILN_OK);
            CHECK(!same_params(m, mg, &diff) && diff > 100);
            kiln_model_free(mg);
            for (int k = 0; k < 4; k++) free(ss[k]);
            free(norm);
            free(ids);
            kiln_model_free(m);
            kiln_model_free(r);
        }
    kiln_ctx_free(ctx);
}

/* The 2:4 pattern itself, on a wider model: every group of 4 consecutive
 * inputs of every row has exactly 2 zeros. */
static void test_2_4_pattern(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    for (int arch = 0; arch < 2; arch++) {
        kiln_config c = arch ? llama_cfg() : gpt2_cfg();
        kiln_model *m = new_model(ctx, &c, 5);
        kiln_prune_opts o = kiln_prune_opts_default();
        o.method = KILN_PRUNE_2_4;
        o.score = KILN_PRUNE_SCORE_MAGNITUDE;
        kiln_model *sm = NULL;
        CHECK_EQ(kiln_prune(ctx, m, &o, &sm), KILN_OK);
        size_t bad = 0, groups = 0;
        for (int l = 0; l < c.n_layer; l++) {
            tmat t[4];
            mats(m, l, t);
            for (int k = 0; k < 4; k++)
                for (int oo = 0; oo < t[k].out; oo++)
                    for (int j = 0; j < t[k].in; j += 4, groups++) {
                        int z = 0;
                        for (int q = 0; q < 4; q++) z += *tat(&t[k], oo, j + q) == 0.0f;
                        bad += z != 2;
                    }
        }
        CHECK_EQ(bad, 0);
        CHECK(groups > 1000);
        kiln_model_free(m);
    }
    kiln_ctx_free(ctx);
}

static void test_mlp_equals_masked(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    const int T = 16, B = 2;
    for (int arch = 0; arch < 2; arch++)
        for (int score = 0; score < 2; score++) {
            kiln_config c = arch ? llama_cfg() : gpt2_cfg();
            kiln_model *m = new_model(ctx, &c, 31), *full = clone(ctx, m);
            int32_t *ids = calib_ids(4 * T, c.vocab_size);
            kiln_prune_opts o = kiln_prune_opts_default();
            o.method = KILN_PRUNE_MLP;
            o.score = score ? KILN_PRUNE_SCORE_MAGNITUDE : KILN_PRUNE_SCORE_WANDA;
            o.sparsity = 0.25;
            o.calib = ids;
            o.n_calib = 4 * T;
            o.batch = B;
            o.seq = T;
            kiln_model *d = NULL;
            CHECK_EQ(kiln_prune(ctx, m, &o, &d), KILN_OK);
            CHECK(d != NULL);
            if (!d) break;
            int F = c.n_inner, k = F / 4;
            CHECK_EQ(kiln_model_config(d)->n_inner, F - k);
            size_t diff;
            CHECK(same_params(m, full, &diff)); /* m itself untouched */
            /* the reference scores, on the unpruned model */
            CHECK_EQ(kiln_model_set_precision(ctx, full, KILN_PRECISION_FP32), KILN_OK);
            CHECK_EQ(kiln_model_prepare(ctx, full, B, T), KILN_OK);
            bool *removed = calloc((size_t)F, 1);
            float *sc = malloc((size_t)F * sizeof *sc);
            double *ss[4];
            for (int q = 0; q < 4; q++) ss[q] = calloc(128, sizeof(double));
            for (int l = 0; l < c.n_layer; l++) {
                if (!score) ref_norms(ctx, full, ids, 4, B, T, l, ss);
                tmat t[4];
                mats(full, l, t);
                for (int ch = 0; ch < F; ch++) {
                    double out = 0, in = 0;
                    for (int r = 0; r < c.n_embd; r++) out += (double)*tat(&t[3], r, ch) * *tat(&t[3], r, ch);
                    for (int h = 0; h < (arch ? 2 : 1); h++)
                        for (int j = 0; j < c.n_embd; j++)
                            in += (double)*tat(&t[2], ch + h * F, j) * *tat(&t[2], ch + h * F, j);
                    sc[ch] = score ? (float)sqrt(out + in) : (float)(sqrt(ss[3][ch]) * sqrt(out));
                }
                for (int ch = 0; ch < F; ch++) removed[ch] = rank_of(sc, (size_t)F, (size_t)ch) < (size_t)k;
                /* the small model holds the kept channels, in order */
                tmat u[4];
                mats(d, l, u);
                size_t wrong = 0;
                for (int ch = 0, c2 = 0; ch < F; ch++) {
                    if (removed[ch]) continue;
                    for (int r = 0; r < c.n_embd; r++) wrong += *tat(&u[3], r, c2) != *tat(&t[3], r, ch);
                    c2++;
                }
                CHECK_EQ(wrong, 0);
                /* the full model with those channels masked */
                for (int ch = 0; ch < F; ch++)
                    if (removed[ch])
                        for (int r = 0; r < c.n_embd; r++) *tat(&t[3], r, ch) = 0.0f;
            }
            model_params_touched(full);
            CHECK_EQ(kiln_model_set_precision(ctx, d, KILN_PRECISION_FP32), KILN_OK);
            CHECK_EQ(kiln_model_prepare(ctx, d, B, T), KILN_OK);
            float *la, *lb;
            CHECK_EQ(kiln_model_forward(ctx, full, ids, B, T, &la), KILN_OK);
            size_t nl = (size_t)B * T * c.vocab_size;
            float *keep = malloc(nl * sizeof *keep);
            memcpy(keep, la, nl * sizeof *keep);
            CHECK_EQ(kiln_model_forward(ctx, d, ids, B, T, &lb), KILN_OK);
            double worst = 0, spread = 0;
            for (size_t i = 0; i < nl; i++) {
                worst = fmax(worst, fabs((double)keep[i] - lb[i]));
                spread = fmax(spread, fabs((double)keep[i]));
            }
            CHECK_MSG(worst <= 1e-5, "arch %d score %d: logits differ by %g", arch, score, worst);
            CHECK(spread > 0.01); /* the logits are not all zero */
            /* and the channels mattered: the unmasked model differs */
            kiln_model *orig = clone(ctx, m);
            CHECK_EQ(kiln_model_prepare(ctx, orig, B, T), KILN_OK);
            CHECK_EQ(kiln_model_set_precision(ctx, orig, KILN_PRECISION_FP32), KILN_OK);
            CHECK_EQ(kiln_model_forward(ctx, orig, ids, B, T, &la), KILN_OK);
            double moved = 0;
            for (size_t i = 0; i < nl; i++) moved = fmax(moved, fabs((double)la[i] - lb[i]));
            CHECK(moved > 1e-3);
            kiln_model_free(orig);
            free(keep);
            for (int q = 0; q < 4; q++) free(ss[q]);
            free(sc);
            free(removed);
            free(ids);
            kiln_model_free(d);
            kiln_model_free(m);
            kiln_model_free(full);
        }
    kiln_ctx_free(ctx);
}

static void expect_error(kiln_ctx *ctx, kiln_model *m, const kiln_prune_opts *o, const char *field)
{
    kiln_model *sm = NULL;
    kiln_status s = kiln_prune(ctx, m, o, &sm);
    CHECK_MSG(s != KILN_OK, "no error for %s", field);
    CHECK_MSG(strstr(kiln_errmsg(ctx), field) != NULL, "'%s' does not name %s", kiln_errmsg(ctx),
              field);
    CHECK(sm == NULL);
}

static void test_errors(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = gpt2_cfg();
    kiln_model *m = new_model(ctx, &c, 3), *r = clone(ctx, m);
    kiln_prune_opts o = kiln_prune_opts_default();
    double bad[] = {-0.1, 1.0, 1.5, NAN};
    for (int i = 0; i < 4; i++) {
        o.sparsity = bad[i];
        expect_error(ctx, m, &o, "kiln_prune_opts.sparsity");
    }
    o = kiln_prune_opts_default();
    o.method = (kiln_prune_method)9;
    expect_error(ctx, m, &o, "kiln_prune_opts.method");
    o = kiln_prune_opts_default();
    o.method = KILN_PRUNE_2_4;
    o.sparsity = 0.6;
    expect_error(ctx, m, &o, "kiln_prune_opts.sparsity");
    o = kiln_prune_opts_default();
    o.method = KILN_PRUNE_WANDA; /* no calibration tokens */
    expect_error(ctx, m, &o, "kiln_prune_opts.n_calib");
    int32_t ids[64] = {0};
    ids[40] = 1000;
    o.calib = ids;
    o.n_calib = 64;
    o.seq = 16;
    expect_error(ctx, m, &o, "kiln_prune_opts.calib");
    size_t diff;
    CHECK(same_params(m, r, &diff)); /* errors leave the model as it was */
    kiln_model_free(m);
    kiln_model_free(r);
    /* 2:4 on a width not divisible by 4: n_embd 30 */
    c.n_embd = 30;
    c.n_head = 2;
    c.n_kv_head = 2;
    m = new_model(ctx, &c, 3);
    o = kiln_prune_opts_default();
    o.method = KILN_PRUNE_2_4;
    o.score = KILN_PRUNE_SCORE_MAGNITUDE;
    expect_error(ctx, m, &o, "divisible by 4");
    CHECK(strstr(kiln_errmsg(ctx), "kiln_prune_opts.method") != NULL);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* ---- training keeps the zeros ----------------------------------------- */

static void train_from(kiln_ctx *ctx, const char *init, const char *out, kiln_precision p)
{
    kiln_train_opts o = kiln_train_opts_default();
    o.init_from = init;
    o.data = P("data");
    o.out = out;
    o.batch = 2;
    o.seq = 16;
    o.lr = 3e-3;
    o.weight_decay = 0.1;
    o.warmup = 0;
    o.steps = 6;
    o.eval_every = 0;
    o.save_every = 0;
    o.threads = 1;
    o.progress = KILN_PROGRESS_NONE;
    o.precision = p;
    kiln_train_result res;
    CHECK_EQ(kiln_train(ctx, &o, &res), KILN_OK);
}

static void test_train_keeps_zeros(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = gpt2_cfg();
    c.vocab_size = 257;
    c.bos_token_id = c.eos_token_id = 256;
    kiln_model *m = new_model(ctx, &c, 9);
    kiln_prune_opts o = kiln_prune_opts_default();
    o.method = KILN_PRUNE_MAGNITUDE;
    kiln_model *sm = NULL;
    CHECK_EQ(kiln_prune(ctx, m, &o, &sm), KILN_OK);
    CHECK_EQ(kiln_model_save(ctx, m, P("pruned")), KILN_OK);
    CHECK_EQ(kiln_prune_mark_save(ctx, P("pruned"), &o), KILN_OK);
    CHECK_EQ(kiln_model_save(ctx, m, P("unmarked")), KILN_OK);
    bool marked = false;
    CHECK_EQ(kiln_prune_mark_load(ctx, P("pruned"), &marked), KILN_OK);
    CHECK(marked);
    const float *w0 = kiln_model_params(m);
    size_t n = kiln_model_num_params(m);
    for (int run = 0; run < 3; run++) {
        const char *out = run == 0 ? P("run_fp32") : run == 1 ? P("run_bf16") : P("run_nomark");
        train_from(ctx, run == 2 ? P("unmarked") : P("pruned"), out,
                   run == 1 ? KILN_PRECISION_BF16 : KILN_PRECISION_FP32);
        char ck[1200];
        CHECK_EQ(kiln_checkpoint_resolve(ctx, out, ck, sizeof ck), KILN_OK);
        kiln_model *t = NULL;
        CHECK_EQ(kiln_model_load(ctx, ck, &t), KILN_OK);
        if (!t) continue;
        const float *w = kiln_model_params(t);
        size_t zeros = 0, kept = 0, moved = 0, dense = 0;
        for (int i = 0; i < kiln_model_num_tensors(t); i++) {
            if (!kiln_prune_target(t, i)) continue;
            const kiln_tensor_info *ti = kiln_model_tensor(t, i);
            for (size_t k = ti->offset; k < ti->offset + ti->numel; k++) {
                if (w0[k] == 0.0f) {
                    zeros++;
                    kept += w[k] == 0.0f;
                } else {
                    dense++;
                    moved += w[k] != w0[k];
                }
            }
        }
        CHECK(zeros > n / 4);
        if (run < 2) CHECK_MSG(kept == zeros, "run %d: %zu of %zu zeros left zero", run, kept, zeros);
        else CHECK_MSG(kept < zeros / 2, "without the mark %zu of %zu zeros stayed", kept, zeros);
        CHECK_MSG(moved > dense * 9 / 10, "run %d: only %zu of %zu weights trained", run, moved, dense);
        CHECK_EQ(kiln_prune_mark_load(ctx, ck, &marked), KILN_OK);
        CHECK(marked == (run < 2)); /* the checkpoint carries the mark */
        kiln_model_free(t);
    }
    /* a resume from the marked checkpoint goes on keeping them */
    kiln_train_opts r = kiln_train_opts_default();
    r.resume = P("run_fp32");
    char data[1200];
    CHECK_EQ(kiln_train_opts_load(ctx, P("run_fp32/step_00000006"), &r, data, sizeof data),
             KILN_OK);
    r.resume = P("run_fp32/step_00000006");
    r.out = P("run_fp32");
    r.steps = 9;
    r.progress = KILN_PROGRESS_NONE;
    kiln_train_result res;
    CHECK_EQ(kiln_train(ctx, &r, &res), KILN_OK);
    kiln_model *t = NULL;
    CHECK_EQ(kiln_model_load(ctx, P("run_fp32/step_00000009"), &t), KILN_OK);
    if (t) {
        size_t lost = 0;
        for (int i = 0; i < kiln_model_num_tensors(t); i++) {
            if (!kiln_prune_target(t, i)) continue;
            const kiln_tensor_info *ti = kiln_model_tensor(t, i);
            for (size_t k = ti->offset; k < ti->offset + ti->numel; k++)
                lost += w0[k] == 0.0f && kiln_model_params(t)[k] != 0.0f;
        }
        CHECK_EQ(lost, 0);
        kiln_model_free(t);
    }
    /* a malformed mark is an error naming the file */
    FILE *f = fopen(P("unmarked/sparsity.json"), "w");
    fprintf(f, "{\"format\": \"other\"}\n");
    fclose(f);
    CHECK(kiln_prune_mark_load(ctx, P("unmarked"), &marked) == KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "sparsity.json") != NULL);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_prune.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    int32_t *ids = calib_ids(6000, 257);
    test_write_tokens(P("data"), ids, 5000, ids + 5000, 1000, 257, 256);
    free(ids);
    RUN_TEST(test_magnitude);
    RUN_TEST(test_wanda);
    RUN_TEST(test_2_4_pattern);
    RUN_TEST(test_mlp_equals_masked);
    RUN_TEST(test_errors);
    RUN_TEST(test_train_keeps_zeros);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
