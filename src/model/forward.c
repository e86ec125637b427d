/*
 * forward.c — the forward and backward passes of the transformer family
 * and the fused cross-entropy loss. Activations are carved from the arena
 * sized by kiln_model_prepare (no allocation inside a step); every matrix
 * product goes through m->ops->matmul_* on m->gemm (kernels.h).
 */
#include "model/model.h"

#include <math.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define FWD_ALLOC(field, count)                                             \
    do {                                                                    \
        m->a.field = arena_alloc(&m->act, (size_t)(count) * sizeof(float)); \
        KILN_ASSERT(m->a.field);                                            \
    } while (0)

/* Carves the activation buffers for (B, T) (arena already large enough). */
static void carve(kiln_model *m, int B, int T)
{
    size_t N = (size_t)B * T, L = (size_t)m->L, C = (size_t)m->C;
    size_t F = (size_t)m->F, NH = (size_t)m->NH;
    size_t FH = m->cfg.arch == KILN_ARCH_LLAMA ? 2 * F : F;
    size_t big = KILN_MAX((size_t)m->QKV, FH);
    size_t lse = (size_t)B * NH * T;
    arena_reset(&m->act);
    m->a.tokens = arena_alloc(&m->act, N * sizeof(int32_t));
    KILN_ASSERT(m->a.tokens);
    FWD_ALLOC(encoded, N * C);
    FWD_ALLOC(ln1, L * N * C);
    FWD_ALLOC(ln1_mean, L * N);
    FWD_ALLOC(ln1_rstd, L * N);
    FWD_ALLOC(qkv, L * N * (size_t)m->QKV);
    FWD_ALLOC(lse, L * lse);
    FWD_ALLOC(atty, L * N * C);
    FWD_ALLOC(res2, L * N * C);
    FWD_ALLOC(ln2, L * N * C);
    FWD_ALLOC(ln2_mean, L * N);
    FWD_ALLOC(ln2_rstd, L * N);
    FWD_ALLOC(fch, L * N * FH);
    FWD_ALLOC(fch_act, L * N * F);
    FWD_ALLOC(res3, L * N * C);
    FWD_ALLOC(lnf, N * C);
    FWD_ALLOC(lnf_mean, N);
    FWD_ALLOC(lnf_rstd, N);
    FWD_ALLOC(logits, N * (size_t)m->V);
    FWD_ALLOC(dres, N * C);
    FWD_ALLOC(dc, N * C);
    FWD_ALLOC(df, N * F);
    FWD_ALLOC(dbig, N * big);
}

const char *const model_prof_names[MODEL_PROF_N] = {
    "matmul fwd", "matmul bwd", "attention fwd", "attention bwd", "norms",
    "activations", "other"};

#define P MODEL_P

static void set_threads(const kiln_model *m)
{
#ifdef _OPENMP
    if (m->threads > 0) omp_set_num_threads(m->threads);
#else
    (void)m;
#endif
}

/* The training forward's attention of layer l: rope (llama) and the flash
 * kernel over the batch, its log-sum-exp kept for the backward. */
typedef struct train_attend_ud {
    kiln_model *m;
    size_t lse_sz;
} train_attend_ud;

static void train_attend(void *p, int l, float *qkv, float *atty)
{
    train_attend_ud *u = p;
    kiln_model *m = u->m;
    const kern_ops *k = m->ops;
    float *lse = m->a.lse + (size_t)l * u->lse_sz;
    if (m->cfg.arch != KILN_ARCH_GPT2)
        P(OTHER, k->rope(qkv, m->rope_cos, m->rope_sin, m->B, m->T, m->NH, m->KVH, m->HS, false));
    P(ATTN_FWD, k->attention_fwd(m->gemm, atty, lse, qkv, m->B, m->T, m->NH, m->KVH, m->HS));
}

kiln_status kiln_model_forward(kiln_ctx *ctx, kiln_model *m,
                               const int32_t *tokens, int B, int T,
                               float **logits)
{
    if (B > m->B_cap || T > m->T_cap || !m->grads || model_mp_wanted(m) != m->act_mp) {
        kiln_status s = kiln_model_prepare(ctx, m, B, T);
        if (s) return s;
    }
    if (B < 1 || T < 1)
        return kiln_fail(ctx, KILN_ERR_RANGE, "forward: empty batch (%d x %d)", B, T);
    size_t N = (size_t)B * T;
    for (size_t i = 0; i < N; i++)
        if (tokens[i] < 0 || tokens[i] >= m->V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "token id %d at batch row %zu, position %zu is outside the "
                             "model's vocabulary [0, %d) (tokenizer and model do not match?)",
                             tokens[i], i / (size_t)T, i % (size_t)T, m->V);
    set_threads(m);
    m->threads = kiln_get_threads(ctx);
    set_threads(m);
    if (m->act_mp) model_mp_carve(m, B, T);
    else carve(m, B, T);
    m->B = B;
    m->T = T;
    memcpy(m->a.tokens, tokens, N * sizeof(int32_t));

    const kern_ops *k = m->ops;
    kern_gemm *g = m->gemm;
    /* re-derive the packed weight copies when the parameters were written
     * since the last forward (or may have been: kiln_model_params_mut) */
    if (g->invalidate && (m->weights_changed || m->params_shared)) g->invalidate(g);
    m->weights_changed = false;
    if (m->act_mp) return model_mp_forward(ctx, m, logits);
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2;
    int C = m->C, F = m->F, QKV = m->QKV, V = m->V, n = (int)N;
    int FH = gpt2 ? F : 2 * F;
    size_t lse_sz = (size_t)B * m->NH * T;
    model_acts *a = &m->a;

    P(OTHER, k->embed_fwd(a->encoded, tokens, m->w.wte, m->w.wpe, B, T, C));
    model_shape sh = model_shape_of(m);
    train_attend_ud ud = {m, lse_sz};
    model_run r = {.k = k, .g = g, .s = &sh, .attend = train_attend, .ud = &ud, .prof = m};
    for (int l = 0; l < m->L; l++) {
        model_blk_w w = model_blk_weights(m, l);
        size_t nc = (size_t)l * N * C, ns = (size_t)l * N;
        model_blk io = {.inp = l == 0 ? a->encoded : a->res3 + nc - N * C,
                        .ln1 = a->ln1 + nc, .ln1_mean = a->ln1_mean + ns,
                        .ln1_rstd = a->ln1_rstd + ns, .qkv = a->qkv + (size_t)l * N * QKV,
                        .atty = a->atty + nc, .res2 = a->res2 + nc, .ln2 = a->ln2 + nc,
                        .ln2_mean = a->ln2_mean + ns, .ln2_rstd = a->ln2_rstd + ns,
                        .fch = a->fch + (size_t)l * N * FH, .fca = a->fch_act + (size_t)l * N * F,
                        .res3 = a->res3 + nc};
        model_block_fwd(&r, l, &w, n, &io);
    }
    const float *last = a->res3 + (size_t)(m->L - 1) * N * C;
    model_final_norm(&r, a->lnf, a->lnf_mean, a->lnf_rstd, last, m->w.lnf_w, m->w.lnf_b, n);
    P(MATMUL_FWD, k->matmul_fwd(g, a->logits, a->lnf, m->w.lm_head, NULL, n, C, V, KERN_W_OUT_IN));
    *logits = a->logits;
    return KILN_OK;
}

static void hook(kiln_model *m, size_t begin, size_t end)
{
    model_grad_fixup(m, begin, end); /* frozen parts of fused matrices */
    if (m->hook && end > begin) m->hook(m->hook_ud, begin, end - begin);
}

static kiln_status backward(kiln_ctx *ctx, kiln_model *m, const float *dlogits,
                            const model_ce *ce);
static kiln_status ce_check(kiln_ctx *ctx, const int32_t *targets, const float *mask, int64_t N,
                            int V);

kiln_status kiln_model_backward(kiln_ctx *ctx, kiln_model *m,
                                const float *dlogits)
{
    return backward(ctx, m, dlogits, NULL);
}

kiln_status kiln_model_backward_ce(kiln_ctx *ctx, kiln_model *m, const int32_t *targets,
                                   const float *mask, float grad_scale, double *loss_sum,
                                   double *weight_sum)
{
    if (!m->B || !m->grads)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "backward called without a forward pass");
    int64_t N = (int64_t)m->B * m->T;
    kiln_status s = ce_check(ctx, targets, mask, N, m->V);
    if (s) return s;
    if (!m->act_mp) {
        kern_ops_fast()->cross_entropy(m->a.logits, targets, mask, N, m->V, grad_scale,
                                       m->a.logits, loss_sum, weight_sum);
        return backward(ctx, m, m->a.logits, NULL);
    }
    model_ce ce = {targets, mask, grad_scale, loss_sum, weight_sum};
    return backward(ctx, m, NULL, &ce);
}

static kiln_status backward(kiln_ctx *ctx, kiln_model *m, const float *dlogits,
                            const model_ce *ce)
{
    if (!m->B || !m->grads)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "backward called without a forward pass");
    set_threads(m);
    if (m->act_mp) {
        kiln_status s = model_mp_backward(ctx, m, dlogits, ce);
        if (s) model_grads_materialize(m); /* a failure leaves no stale matrices */
        m->grads_lazy = false;             /* else every matrix is written */
        return s;
    }
    model_grads_materialize(m); /* this backward adds onto them */
    const kern_ops *k = m->ops;
    kern_gemm *g = m->gemm;
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2;
    kern_wlayout lay = gpt2 ? KERN_W_IN_OUT : KERN_W_OUT_IN;
    int B = m->B, T = m->T, C = m->C, F = m->F, QKV = m->QKV, V = m->V;
    size_t N = (size_t)B * T;
    int n = (int)N, FH = gpt2 ? F : 2 * F;
    size_t lse_sz = (size_t)B * m->NH * T;
    model_acts *a = &m->a;
    model_weights *dw = model_grad_views(m); /* NULL where frozen */

    /* LM head and final norm. */
    P(MATMUL_BWD, k->matmul_bwd(g, a->dc, dw->lm_head, NULL, dlogits, a->lnf, m->w.lm_head, n, C, V,
                  KERN_W_OUT_IN, false));
    memset(a->dres, 0, N * C * sizeof(float));
    const float *last = a->res3 + (size_t)(m->L - 1) * N * C;
    P(NORM, model_norm_bwd(m, a->dres, dw->lnf_w, dw->lnf_b, a->dc, last,
                           m->w.lnf_w, a->lnf_mean, a->lnf_rstd, n));
    hook(m, m->layer_off[m->L], m->layer_off[m->L + 1]);

    for (int l = m->L - 1; l >= 0; l--) {
        const model_layer *w = &m->w.layers[l];
        model_layer *d = &dw->layers[l];
        const float *inp = l == 0 ? a->encoded : a->res3 + (size_t)(l - 1) * N * C;
        const float *ln1 = a->ln1 + (size_t)l * N * C;
        const float *qkv = a->qkv + (size_t)l * N * QKV;
        const float *lse = a->lse + (size_t)l * lse_sz;
        const float *atty = a->atty + (size_t)l * N * C;
        const float *res2 = a->res2 + (size_t)l * N * C;
        const float *ln2 = a->ln2 + (size_t)l * N * C;
        const float *fch = a->fch + (size_t)l * N * FH;
        const float *fca = a->fch_act + (size_t)l * N * F;

        /* MLP: res3 = res2 + fcproj(act(fc(ln2(res2)))) */
        P(MATMUL_BWD, k->matmul_bwd(g, a->df, d->fcproj_w, d->fcproj_b, a->dres, fca, w->fcproj_w, n, F,
                      C, lay, false));
        if (gpt2) P(ACT, k->gelu_bwd(a->dbig, fch, a->df, N * F));
        else P(ACT, k->swiglu_bwd(a->dbig, fch, a->df, n, F));
        P(MATMUL_BWD, k->matmul_bwd(g, a->dc, d->fc_w, d->fc_b, a->dbig, ln2, w->fc_w, n, C, FH, lay,
                      false));
        P(NORM, model_norm_bwd(m, a->dres, d->ln2_w, d->ln2_b, a->dc, res2,
                               w->ln2_w, a->ln2_mean + (size_t)l * N, a->ln2_rstd + (size_t)l * N, n));
        /* Attention: res2 = inp + proj(attn(qkv(ln1(inp)))) */
        P(MATMUL_BWD, k->matmul_bwd(g, a->dc, d->proj_w, d->proj_b, a->dres, atty, w->proj_w, n, C, C,
                      lay, false));
        P(ATTN_BWD, k->attention_bwd(g, a->dbig, a->dc, qkv, atty, lse, B, T, m->NH, m->KVH, m->HS));
        if (!gpt2)
            P(OTHER, k->rope(a->dbig, m->rope_cos, m->rope_sin, B, T, m->NH, m->KVH, m->HS, true));
        P(MATMUL_BWD, k->matmul_bwd(g, a->dc, d->qkv_w, d->qkv_b, a->dbig, ln1, w->qkv_w, n, C, QKV, lay,
                      false));
        P(NORM, model_norm_bwd(m, a->dres, d->ln1_w, d->ln1_b, a->dc, inp,
                               w->ln1_w, a->ln1_mean + (size_t)l * N, a->ln1_rstd + (size_t)l * N, n));
        hook(m, m->layer_off[l], m->layer_off[l + 1]);
    }
    P(OTHER, k->embed_bwd(dw->wte, dw->wpe, a->dres, a->tokens, B, T, C, V));
    hook(m, 0, m->layer_off[0]);
    return KILN_OK;
}

kiln_status kiln_cross_entropy(kiln_ctx *ctx, const float *logits,
                               const int32_t *targets, const float *mask,
                               int64_t N, int V, float grad_scale,
                               float *dlogits, double *loss_sum,
                               double *weight_sum)
{
    kiln_status s = ce_check(ctx, targets, mask, N, V);
    if (s) return s;
    kern_ops_fast()->cross_entropy(logits, targets, mask, N, V, grad_scale, dlogits,
                                   loss_sum, weight_sum);
    return KILN_OK;
}

static kiln_status ce_check(kiln_ctx *ctx, const int32_t *targets, const float *mask, int64_t N,
                            int V)
{
    if (N < 0 || V < 1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "cross_entropy: bad sizes N=%lld V=%d", (long long)N, V);
    for (int64_t i = 0; i < N; i++) {
        if (targets[i] >= V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "target token id %d at row %lld is outside the vocabulary "
                             "[0, %d)", targets[i], (long long)i, V);
        if (mask && !(mask[i] >= 0.0f && isfinite(mask[i])))
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "loss mask at row %lld is %g; weights must be finite and >= 0",
                             (long long)i, (double)mask[i]);
    }
    return KILN_OK;
}
