/*
 * prune.c — `kiln prune`: unstructured magnitude and Wanda pruning, 2:4
 * semi-structured sparsity, and structured removal of MLP channels.
 *
 * The matrices pruned are the four linear layers of every block (qkv,
 * attention output, MLP in, MLP out); embeddings, norms, biases and the
 * LM head stay dense, as in Wanda (Sun et al. 2023, github
 * locuslab/wanda, lib/prune.py) and SparseGPT. Each matrix is seen as
 * (out, in) whatever its stored layout (gpt2's Conv1D is (in, out)):
 *
 *   magnitude  score |W_oj|
 *   wanda      score |W_oj| * ||X_j||_2, X the (tokens, in) inputs of the
 *              matrix over the calibration tokens: ln_1's output for qkv,
 *              the attention output for the projection, ln_2's output for
 *              the MLP's first matrix, the activation's output for its
 *              second
 *   group ROW  every output row o loses its floor(s * in) lowest-scored
 *              inputs (the paper's per-output comparison group, used for
 *              magnitude too, so the two differ only in the score);
 *              MATRIX: the floor(s * out * in) lowest of the matrix
 *   2:4        in each row, of every 4 consecutive inputs the 2
 *              lowest-scored are zeroed (by the wanda or magnitude score)
 * Ties go to the lower input index (a stable order), so the mask is a
 * function of the scores alone.
 *
 * Activations are gathered layer by layer, as Wanda's code does: layer l's
 * four input norms come from a forward of the model whose layers 0..l-1
 * are already pruned (the four of one layer from the same forward, before
 * the layer itself is pruned). That is L forwards over the calibration
 * set, in fp32.
 *
 * Structured (mlp): channel c of layer l scores ||a_c||_2 * ||W_out[:, c]||_2
 * (activation-weighted, a_c the activation's output over the calibration
 * tokens; magnitude: the norm of all the channel's weights in and out);
 * the floor(s * F) lowest of each layer go, leaving the same F' in every
 * layer (kiln_config has one n_inner). The new model holds the remaining
 * rows and columns, so it runs through the normal kernels at its size.
 */
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

kiln_prune_opts kiln_prune_opts_default(void)
{
    return (kiln_prune_opts){.method = KILN_PRUNE_MAGNITUDE,
                             .sparsity = 0.5,
                             .score = KILN_PRUNE_SCORE_WANDA,
                             .group = KILN_PRUNE_GROUP_ROW,
                             .batch = 4};
}

/* ---- the matrices of a layer, as (out, in) ---------------------------- */

enum { PL_QKV, PL_PROJ, PL_FC, PL_FCPROJ, PL_N };

typedef struct plin {
    float *w;
    int out, in;
    bool in_out; /* stored (in, out): gpt2's Conv1D */
} plin;

static float *pl_at(const plin *p, int o, int j)
{
    return p->in_out ? p->w + (size_t)j * p->out + o : p->w + (size_t)o * p->in + j;
}

static void layer_lins(const kiln_model *m, const model_weights *w, int l, plin out[PL_N])
{
    const model_layer *y = &w->layers[l];
    bool g = m->cfg.arch == KILN_ARCH_GPT2;
    int FH = g ? m->F : 2 * m->F;
    out[PL_QKV] = (plin){y->qkv_w, m->QKV, m->C, g};
    out[PL_PROJ] = (plin){y->proj_w, m->C, m->NH * m->HS, g};
    out[PL_FC] = (plin){y->fc_w, FH, m->C, g};
    out[PL_FCPROJ] = (plin){y->fcproj_w, m->C, m->F, g};
}

/* ---- calibration: the input norms of one layer's matrices ------------- */

typedef struct calib_norms {
    double *ss[PL_N]; /* sums of squares per input column */
    int width[PL_N];
} calib_norms;

/* Adds the squares of the (n, cols) rows of a kern_act to ss. */
static void add_squares(kern_backend *be, const void *act, int n, int cols, float *tmp, double *ss)
{
    be->mp.act_unpack(be, tmp, act, n, cols);
    for (int r = 0; r < n; r++) {
        const float *x = tmp + (size_t)r * cols;
        for (int j = 0; j < cols; j++) ss[j] += (double)x[j] * x[j];
    }
}

/* One forward of every calibration window, adding the squares of the
 * four input columns of layers l0..l1-1 to cn[l - l0]. */
static kiln_status calib_pass(kiln_ctx *ctx, kiln_model *m, const kiln_prune_opts *o, int T,
                              int l0, int l1, calib_norms *cns)
{
    size_t nw = o->n_calib / (size_t)T;
    int C = m->C, F = m->F, A = m->NH * m->HS;
    bool g = m->cfg.arch == KILN_ARCH_GPT2;
    int FH = g ? F : 2 * F;
    size_t N = (size_t)o->batch * T, wide = (size_t)KILN_MAX(KILN_MAX(C, FH), A);
    float *tmp = malloc(N * wide * sizeof *tmp), *act = malloc(N * (size_t)F * sizeof *act);
    if (!tmp || !act) {
        free(tmp);
        free(act);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory (calibration scratch)");
    }
    kiln_status s = KILN_OK;
    for (size_t w0 = 0; w0 < nw && !s; w0 += (size_t)o->batch) {
        int B = (int)KILN_MIN((size_t)o->batch, nw - w0);
        float *logits;
        if ((s = kiln_model_forward(ctx, m, o->calib + w0 * T, B, T, &logits))) break;
        kern_backend *be = model_pass_backend(m);
        int n = B * T;
        size_t bc = be->mp.act_bytes(be, n, C), bf = be->mp.act_bytes(be, n, FH);
        for (int l = l0; l < l1; l++) {
        calib_norms *cn = &cns[l - l0];
        const char *ln1 = (const char *)m->a.ln1p + (size_t)l * bc;
        const char *att = (const char *)m->a.attyp + (size_t)l * bc;
        const char *ln2 = (const char *)m->a.ln2p + (size_t)l * bc;
        const char *fch = (const char *)m->a.fchp + (size_t)l * bf;
        add_squares(be, ln1, n, C, tmp, cn->ss[PL_QKV]);
        add_squares(be, att, n, A, tmp, cn->ss[PL_PROJ]);
        add_squares(be, ln2, n, C, tmp, cn->ss[PL_FC]);
        /* the MLP's second input: the activation of the kept pre-activation */
        be->mp.act_unpack(be, tmp, (const kern_act *)fch, n, FH);
        if (g) m->ops->gelu_fwd(act, tmp, (size_t)n * F);
        else m->ops->swiglu_fwd(act, tmp, n, F);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < F; j++) {
                double v = act[(size_t)r * F + j];
                cn->ss[PL_FCPROJ][j] += v * v;
            }
        }
    }
    free(tmp);
    free(act);
    return s;
}

/* ---- unstructured and 2:4 masks --------------------------------------- */

typedef struct scored {
    float s;
    int i;
} scored;

static int by_score(const void *a, const void *b)
{
    const scored *x = a, *y = b;
    if (x->s != y->s) return x->s < y->s ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* The score of (o, j): |W| times the input's norm (norm NULL: 1). */
static float score_of(const plin *p, const float *norm, int o, int j)
{
    float a = fabsf(*pl_at(p, o, j));
    return norm ? a * norm[j] : a;
}

/* Zeroes p's weights by o's method and group; buf holds max(in, out*in)
 * entries (MATRIX) or in (ROW). */
static void prune_matrix(const plin *p, const float *norm, const kiln_prune_opts *o, scored *buf)
{
    if (o->method == KILN_PRUNE_2_4) {
        for (int r = 0; r < p->out; r++)
            for (int j0 = 0; j0 < p->in; j0 += 4) {
                scored q[4];
                for (int k = 0; k < 4; k++) q[k] = (scored){score_of(p, norm, r, j0 + k), j0 + k};
                qsort(q, 4, sizeof *q, by_score);
                *pl_at(p, r, q[0].i) = 0.0f;
                *pl_at(p, r, q[1].i) = 0.0f;
            }
        return;
    }
    if (o->group == KILN_PRUNE_GROUP_MATRIX) {
        size_t n = (size_t)p->out * p->in, k = (size_t)floor(o->sparsity * (double)n);
        for (int r = 0; r < p->out; r++)
            for (int j = 0; j < p->in; j++)
                buf[(size_t)r * p->in + j] = (scored){score_of(p, norm, r, j), r * p->in + j};
        qsort(buf, n, sizeof *buf, by_score);
        for (size_t i = 0; i < k; i++) *pl_at(p, buf[i].i / p->in, buf[i].i % p->in) = 0.0f;
        return;
    }
    int k = (int)floor(o->sparsity * (double)p->in);
    for (int r = 0; r < p->out; r++) {
        for (int j = 0; j < p->in; j++) buf[j] = (scored){score_of(p, norm, r, j), j};
        qsort(buf, (size_t)p->in, sizeof *buf, by_score);
        for (int i = 0; i < k; i++) *pl_at(p, r, buf[i].i) = 0.0f;
    }
}

static kiln_status norms_new(kiln_ctx *ctx, const kiln_model *m, calib_norms *cn)
{
    int w[PL_N] = {m->C, m->NH * m->HS, m->C, m->F};
    for (int k = 0; k < PL_N; k++) {
        cn->width[k] = w[k];
        cn->ss[k] = calloc((size_t)w[k], sizeof(double));
        if (!cn->ss[k]) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    return KILN_OK;
}

static void norms_free(calib_norms *cn)
{
    for (int k = 0; k < PL_N; k++) free(cn->ss[k]);
}

static kiln_status prune_unstructured(kiln_ctx *ctx, kiln_model *m, const kiln_prune_opts *o,
                                      int T, bool act)
{
    size_t maxn = 0;
    plin p[PL_N];
    layer_lins(m, &m->w, 0, p);
    for (int k = 0; k < PL_N; k++)
        maxn = KILN_MAX(maxn, o->group == KILN_PRUNE_GROUP_MATRIX && o->method != KILN_PRUNE_2_4
                                  ? (size_t)p[k].out * p[k].in
                                  : (size_t)p[k].in);
    scored *buf = malloc(maxn * sizeof *buf);
    float *norm = malloc((size_t)KILN_MAX(KILN_MAX(m->C, m->F), m->NH * m->HS) * sizeof *norm);
    calib_norms cn = {0};
    kiln_status s = !buf || !norm ? kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory") : KILN_OK;
    if (!s && act) s = norms_new(ctx, m, &cn);
    for (int l = 0; l < m->L && !s; l++) {
        if (act) {
            for (int k = 0; k < PL_N; k++) memset(cn.ss[k], 0, (size_t)cn.width[k] * sizeof(double));
            if ((s = calib_pass(ctx, m, o, T, l, l + 1, &cn))) break;
        }
        model_params_touched(m); /* the next forward re-derives its copies */
        layer_lins(m, &m->w, l, p);
        for (int k = 0; k < PL_N; k++) {
            if (act)
                for (int j = 0; j < p[k].in; j++) norm[j] = (float)sqrt(cn.ss[k][j]);
            prune_matrix(&p[k], act ? norm : NULL, o, buf);
        }
    }
    norms_free(&cn);
    free(buf);
    free(norm);
    return s;
}

/* ---- structured: MLP channels ----------------------------------------- */

/* The channels layer l keeps (keep[c]), F - k of them. */
static void mlp_keep(const kiln_model *m, int l, const double *ss, int k, bool *keep, scored *buf)
{
    plin p[PL_N];
    layer_lins(m, &m->w, l, p);
    int F = m->F;
    bool g = m->cfg.arch == KILN_ARCH_GPT2;
    for (int c = 0; c < F; c++) {
        double out = 0, in = 0;
        for (int r = 0; r < p[PL_FCPROJ].out; r++) {
            double v = *pl_at(&p[PL_FCPROJ], r, c);
            out += v * v;
        }
        for (int h = 0; h < (g ? 1 : 2); h++)
            for (int j = 0; j < m->C; j++) {
                double v = *pl_at(&p[PL_FC], c + h * F, j);
                in += v * v;
            }
        double sc = ss ? sqrt(ss[c]) * sqrt(out) : sqrt(out + in);
        buf[c] = (scored){(float)sc, c};
    }
    qsort(buf, (size_t)F, sizeof *buf, by_score);
    for (int c = 0; c < F; c++) keep[c] = true;
    for (int i = 0; i < k; i++) keep[buf[i].i] = false;
}

/* Copies layer l of m into layer l of d (n_inner F' = F - removed),
 * taking the kept MLP channels. */
static void mlp_copy_layer(const kiln_model *m, kiln_model *d, int l, const bool *keep)
{
    const model_layer *a = &m->w.layers[l];
    model_layer *b = &d->w.layers[l];
    bool g = m->cfg.arch == KILN_ARCH_GPT2;
    size_t C = (size_t)m->C;
#define CP(f, n) \
    if (a->f) memcpy(b->f, a->f, (n) * sizeof(float))
    CP(ln1_w, C);
    CP(ln1_b, C);
    CP(ln2_w, C);
    CP(ln2_b, C);
    CP(qkv_w, (size_t)m->QKV * C);
    CP(qkv_b, (size_t)m->QKV);
    CP(proj_w, C * (size_t)(m->NH * m->HS));
    CP(proj_b, C);
    CP(fcproj_b, C);
#undef CP
    plin sp[PL_N], dp[PL_N];
    layer_lins(m, &m->w, l, sp);
    layer_lins(d, &d->w, l, dp);
    int F = m->F, c2 = 0;
    for (int c = 0; c < F; c++) {
        if (!keep[c]) continue;
        for (int h = 0; h < (g ? 1 : 2); h++)
            for (int j = 0; j < m->C; j++)
                *pl_at(&dp[PL_FC], c2 + h * d->F, j) = *pl_at(&sp[PL_FC], c + h * F, j);
        for (int r = 0; r < m->C; r++) *pl_at(&dp[PL_FCPROJ], r, c2) = *pl_at(&sp[PL_FCPROJ], r, c);
        if (a->fc_b) b->fc_b[c2] = a->fc_b[c];
        c2++;
    }
}

static kiln_status prune_mlp(kiln_ctx *ctx, kiln_model *m, const kiln_prune_opts *o, int T,
                             kiln_model **out)
{
    int F = m->F, k = (int)floor(o->sparsity * (double)F);
    if (k >= F)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_prune_opts.sparsity = %g removes all %d MLP channels; use a "
                         "smaller kiln_prune_opts.sparsity",
                         o->sparsity, F);
    bool act = o->score == KILN_PRUNE_SCORE_WANDA;
    kiln_config cfg = m->cfg;
    cfg.n_inner = F - k;
    kiln_model *d = NULL;
    bool *keep = malloc((size_t)m->L * F * sizeof *keep);
    scored *buf = malloc((size_t)F * sizeof *buf);
    calib_norms *cn = calloc((size_t)m->L, sizeof *cn);
    kiln_status s = !keep || !buf || !cn ? kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory") : KILN_OK;
    for (int l = 0; l < m->L && !s && act; l++) s = norms_new(ctx, m, &cn[l]);
    if (!s) s = kiln_model_new(ctx, &cfg, &d);
    /* every layer's channels scored on the unpruned model, in one pass
     * (structured pruning scores the whole model at once, as FLAP) */
    if (!s && act) s = calib_pass(ctx, m, o, T, 0, m->L, cn);
    for (int l = 0; l < m->L && !s; l++) {
        mlp_keep(m, l, act ? cn[l].ss[PL_FCPROJ] : NULL, k, keep + (size_t)l * F, buf);
        mlp_copy_layer(m, d, l, keep + (size_t)l * F);
    }
    if (!s) {
        const model_weights *a = &m->w;
        model_weights *b = &d->w;
        size_t C = (size_t)m->C, V = (size_t)m->V;
        memcpy(b->wte, a->wte, V * C * sizeof(float));
        if (a->wpe) memcpy(b->wpe, a->wpe, (size_t)m->cfg.n_ctx * C * sizeof(float));
        memcpy(b->lnf_w, a->lnf_w, C * sizeof(float));
        if (a->lnf_b) memcpy(b->lnf_b, a->lnf_b, C * sizeof(float));
        if (!m->cfg.tie_embeddings) memcpy(b->lm_head, a->lm_head, V * C * sizeof(float));
        model_params_touched(d);
        *out = d;
        d = NULL;
    }
    kiln_model_free(d);
    for (int l = 0; l < m->L && cn; l++) norms_free(&cn[l]);
    free(cn);
    free(keep);
    free(buf);
    return s;
}

/* ---- entry ------------------------------------------------------------ */

static kiln_status check(kiln_ctx *ctx, const kiln_model *m, const kiln_prune_opts *o, int T,
                         bool act)
{
    if ((unsigned)o->method > KILN_PRUNE_MLP)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_prune_opts.method = %d is not a method (magnitude, wanda, 2:4, "
                         "mlp)",
                         (int)o->method);
    if (!(o->sparsity >= 0.0 && o->sparsity < 1.0))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_prune_opts.sparsity = %g is outside [0, 1): give the share of "
                         "weights to remove, e.g. 0.5",
                         o->sparsity);
    if (o->method == KILN_PRUNE_2_4) {
        if (o->sparsity != 0.5)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_prune_opts.sparsity = %g with kiln_prune_opts.method = 2:4, "
                             "which removes exactly 2 of every 4 weights: use 0.5",
                             o->sparsity);
        plin p[PL_N];
        layer_lins(m, &m->w, 0, p);
        static const char *const what[PL_N] = {"the qkv matrix (n_embd)",
                                               "the attention output (n_head * head size)",
                                               "the MLP's first matrix (n_embd)",
                                               "the MLP's second matrix (n_inner)"};
        for (int k = 0; k < PL_N; k++)
            if (p[k].in % 4)
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "kiln_prune_opts.method = 2:4 needs input widths divisible "
                                 "by 4, but %s has %d inputs; use magnitude or wanda",
                                 what[k], p[k].in);
    }
    if (o->group != KILN_PRUNE_GROUP_ROW && o->group != KILN_PRUNE_GROUP_MATRIX)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_prune_opts.group = %d is not row or matrix",
                         (int)o->group);
    if (o->score != KILN_PRUNE_SCORE_WANDA && o->score != KILN_PRUNE_SCORE_MAGNITUDE)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_prune_opts.score = %d is not wanda or magnitude", (int)o->score);
    if (!act) return KILN_OK;
    if (o->batch <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_prune_opts.batch = %d must be positive",
                         o->batch);
    if (T <= 0 || T > m->cfg.n_ctx)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_prune_opts.seq = %d is outside [1, n_ctx = %d]", T, m->cfg.n_ctx);
    if (!o->calib || o->n_calib < (size_t)T)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_prune_opts.n_calib = %zu calibration tokens: an activation-"
                         "weighted score needs at least one window of kiln_prune_opts.seq = %d",
                         o->calib ? o->n_calib : 0, T);
    for (size_t i = 0; i < o->n_calib; i++)
        if (o->calib[i] < 0 || o->calib[i] >= m->V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "kiln_prune_opts.calib holds the token id %d (at %zu), outside "
                             "the model's vocabulary [0, %d)",
                             o->calib[i], i, m->V);
    return KILN_OK;
}

/* Whether o's method reads activations. */
static bool uses_acts(const kiln_prune_opts *o)
{
    return o->method == KILN_PRUNE_WANDA ||
           ((o->method == KILN_PRUNE_2_4 || o->method == KILN_PRUNE_MLP) &&
            o->score == KILN_PRUNE_SCORE_WANDA);
}

kiln_status kiln_prune_validate(kiln_ctx *ctx, const kiln_model *m, const kiln_prune_opts *o)
{
    return check(ctx, m, o, o->seq > 0 ? o->seq : m->cfg.n_ctx, uses_acts(o));
}

kiln_status kiln_prune(kiln_ctx *ctx, kiln_model *m, const kiln_prune_opts *o,
                       kiln_model **smaller)
{
    *smaller = NULL;
    int T = o->seq > 0 ? o->seq : m->cfg.n_ctx;
    bool act = uses_acts(o);
    kiln_status s = check(ctx, m, o, T, act);
    if (s) return s;
    if (act) {
        /* calibration in fp32: the norms of the activations as computed */
        if ((s = kiln_model_set_precision(ctx, m, KILN_PRECISION_FP32))) return s;
        if ((s = kiln_model_prepare(ctx, m, KILN_MIN(o->batch, (int)(o->n_calib / T)), T)))
            return s;
    }
    if (o->method == KILN_PRUNE_MLP) return prune_mlp(ctx, m, o, T, smaller);
    return prune_unstructured(ctx, m, o, T, act);
}
