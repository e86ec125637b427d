/*
 * pass.c — the model's one forward and backward pass, for every precision.
 *
 * The forward is the layer block (block.c) over the batch; the backward
 * mirrors it. Both run on the pass backend (model_pass_backend): the
 * activation ops of kernels.h's kern_mp_ops, in the backend's compute
 * dtype and layout:
 *   bf16 with bf16 activations (the default bf16): the model's cpu (or
 *        ref) backend: the inputs of products stored once in bf16, in the
 *        layout its kernel reads (the AMX kernel's packed-A layout), half
 *        the memory, no product converting its left operand again;
 *   fp32, fp16, and bf16 with fp32 activations: the f32 backend
 *        (kernels/acts_f32.c) over the model's op table and GEMM (fp16's
 *        and bf16's mixed-precision GEMM convert the operands themselves).
 * Stored per layer (kern_act of that backend unless said otherwise):
 *   ln1p, ln2p   the normalized inputs of the qkv and fc products (L, N, C)
 *   qkvh         qkv after RoPE as rows of the compute dtype    (L, N, QKV)
 *   attyp        the attention output, input of the projection    (L, N, C)
 *   fchp         the fc product's output, pre-activation          (L, N, FH)
 *   lnfp         the final norm's output, input of the LM head    (N, C)
 * The activation function's output (the input of the MLP's second
 * product) is not stored: the forward writes it for one layer at a time
 * (actp) with the fc product (for GELU as the product's output form
 * KERN_OUT_GELU), and the backward recomputes it from fchp (linear_bwd /
 * mlp_bwd take the pre-activation). When the backend has no attention
 * in its compute dtype for this head size and T (mp.attention_ok), the
 * fp32 attention kernels run on the rounded values, widened into one
 * layer's scratch, in the forward and again in the backward, so both see
 * the same numbers. What stays fp32 everywhere: the residual stream
 * (encoded, res2, res3), norm statistics, the softmax (and the attention
 * log-sum-exp), the logits (cross-entropy in fp32), and all gradients.
 * The residual adds are the products' output form (KERN_OUT_RES).
 *
 * Packed rows (kiln_model_forward_pos: m->packed, a.pos the position of
 * each token inside its document): the embedding adds wpe[pos], RoPE
 * rotates by pos (rope_at; the backward by -sin, rope_nsin), and the
 * attention runs by document (kernels/attn_doc.c): on the backend's own
 * attention where it has a document form (mp.attention_doc_fwd: the bf16
 * backend's AMX kernel, out as fp32 rows packed after), else on kern_ops'
 * fp32 kernels through the same path as a backend without attention in
 * its compute dtype (the values rounded to it first), so every precision
 * keeps documents apart.
 *
 * Weights are the backend's prepared handles (weight_prepare),
 * activations kern_act buffers carved here with the backend's act_bytes.
 * The weight-matrix gradients are written, not added, by the first
 * backward after kiln_model_zero_grad (grads_lazy; matrices.c).
 *
 * With LoRA adapters (lora.c) the backward adds each adapter's part to the
 * input gradient of its product and accumulates dA, dB, from the product's
 * fp32 output gradient and its input re-read from the stored activations
 * (the MLP's second input recomputed from fchp as the forward made it);
 * the fused paths that never hold those gradients in fp32 (gpt2's
 * mlp_bwd and attention_linear_bwd) give way to the unfused ones then.
 */
#include "model/model.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Bytes of an (M, K) activation in the pass backend's dtype and layout. */
static size_t pk(kern_backend *be, size_t M, size_t K)
{
    return be->mp.act_bytes(be, (int)M, (int)K);
}

/* Layer l's kern_act in a block of them, each of bytes. */
static kern_act *at(void *base, size_t bytes, int l)
{
    return (kern_act *)((char *)base + (size_t)l * bytes);
}

bool model_bf16_acts(const kiln_model *m)
{
    return kiln_model_precision(m) == KILN_PRECISION_BF16 && !m->bf16_f32_acts && m->be &&
           m->be->mp.linear_fwd;
}

kern_backend *model_pass_backend(const kiln_model *m)
{
    if (model_bf16_acts(m)) return m->be;
    m->fb->ops = m->ops; /* fp32 products: the table's; fp16 and bf16 with */
    m->fb->gemm = m->gemm; /* fp32 activations: their backend's GEMM */
    return m->fb;
}

/* The buffers, in carve order: {bytes per element, count}. */
static void sizes(const kiln_model *m, int B, int T, size_t out[][2], int *n)
{
    kern_backend *be = model_pass_backend(m);
    size_t N = (size_t)B * T, L = (size_t)m->L, C = (size_t)m->C;
    size_t F = (size_t)m->F, V = (size_t)m->V, NH = (size_t)m->NH, QKV = (size_t)m->QKV;
    size_t FH = m->cfg.arch == KILN_ARCH_LLAMA ? 2 * F : F;
    size_t wide = KILN_MAX(KILN_MAX(C, FH), QKV);
    size_t lr = m->cfg.lora_rank > 0 ? (size_t)m->cfg.lora_rank : 0;
    size_t lw = lr ? KILN_MAX(C, F) : 0;
    size_t s[][2] = {
        {4, N},                    /* tokens */
        {4, N * C},                /* encoded */
        {1, L * pk(be, N, C)},      /* ln1p */
        {4, L * N}, {4, L * N},    /* ln1 mean, rstd */
        {be->mp.row_size, L * N * QKV}, /* qkvh */
        {4, L * B * NH * T},       /* lse */
        {1, L * pk(be, N, C)},      /* attyp */
        {4, L * N * C},            /* res2 */
        {1, L * pk(be, N, C)},      /* ln2p */
        {4, L * N}, {4, L * N},    /* ln2 mean, rstd */
        {1, L * pk(be, N, FH)},     /* fchp */
        {4, L * N * C},            /* res3 */
        {1, pk(be, N, C)},          /* lnfp */
        {4, N}, {4, N},            /* lnf mean, rstd */
        {4, N * V},                /* logits */
        {1, pk(be, N, F)},          /* actp (one layer) */
        {4, N * wide},             /* tmp (one layer) */
        {4, N * C},                /* atty (one layer) */
        {4, N * C}, {4, N * C},    /* dres, dc */
        {4, N * F}, {4, N * KILN_MAX(QKV, FH)}, /* df, dbig */
        {4, N}, {4, NH * (size_t)T}, /* pos, lse_doc */
        {4, 2 * N * lw},           /* LoRA xu, xs (lora.c) */
        {4, 2 * N * lr + 2 * lr * wide}, /* LoRA hs, bt */
        {1, lr ? pk(be, N, FH) : 0}, /* LoRA: the backward's recomputed fchp */
    };
    *n = (int)(sizeof s / sizeof s[0]);
    memcpy(out, s, sizeof s);
}

size_t model_pass_act_bytes(const kiln_model *m, int B, int T)
{
    size_t s[32][2], total = 0;
    int n;
    sizes(m, B, T, s, &n);
    for (int i = 0; i < n; i++) total += (s[i][0] * s[i][1] + 63) & ~(size_t)63;
    return total;
}

void model_pass_carve(kiln_model *m, int B, int T)
{
    size_t s[32][2];
    int n;
    sizes(m, B, T, s, &n);
    void *p[32];
    arena_reset(&m->act);
    for (int i = 0; i < n; i++) {
        p[i] = arena_alloc(&m->act, s[i][0] * s[i][1]);
        KILN_ASSERT(p[i]);
    }
    model_acts *a = &m->a;
    memset(a, 0, sizeof *a);
    int i = 0;
    a->tokens = p[i++];
    a->encoded = p[i++];
    a->ln1p = p[i++];
    a->ln1_mean = p[i++];
    a->ln1_rstd = p[i++];
    a->qkvh = p[i++];
    a->lse = p[i++];
    a->attyp = p[i++];
    a->res2 = p[i++];
    a->ln2p = p[i++];
    a->ln2_mean = p[i++];
    a->ln2_rstd = p[i++];
    a->fchp = p[i++];
    a->res3 = p[i++];
    a->lnfp = p[i++];
    a->lnf_mean = p[i++];
    a->lnf_rstd = p[i++];
    a->logits = p[i++];
    a->actp = p[i++];
    a->tmp = p[i++];
    a->atty = p[i++];
    a->dres = p[i++];
    a->dc = p[i++];
    a->df = p[i++];
    a->dbig = p[i++];
    a->pos = p[i++];
    a->lse_doc = p[i++];
    a->lora_x = p[i++];
    a->lora_h = p[i++];
    a->lora_hp = p[i++];
    KILN_ASSERT(i == n);
}

#define P MODEL_P

#define NOMEM(ctx) kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory in the bf16 products")

/* The handle of weight w (OC, C) of the model's backend. */
static kern_weight *wh(kern_backend *be, const float *w, int OC, int C, bool io)
{
    return be->weight_prepare(be, w, OC, C, io ? KERN_W_IN_OUT : KERN_W_OUT_IN);
}

/* A forward product x W' + bias into o, timed as MATMUL_FWD. */
static kiln_status fwd(kiln_ctx *ctx, kiln_model *m, kern_backend *be, const kern_out *o,
                       const kern_act *x, kern_weight *w, const float *bias, int n)
{
    bool ok;
    P(MATMUL_FWD, ok = be->mp.linear_fwd(be, o, x, w, bias, n));
    return ok ? KILN_OK : NOMEM(ctx);
}

/* The training pass's attention of layer l (model_run.attend): rope
 * (llama) on the fp32 qkv, then the attention in the compute dtype from
 * the rows qkvh (kept for the backward) into attyp, or, where the backend
 * has none for this head size and T, the fp32 attention on the rounded
 * values (a->atty: one layer's fp32 scratch). */
typedef struct pass_attend {
    kiln_model *m;
    kern_backend *be;
    bool att, rows; /* attention in the compute dtype; qkv came as rows */
    bool doc;       /* packed rows on the backend's own document attention */
    size_t lse_sz;
} pass_attend;

static void train_attend(void *ud, int l, const model_blk *io)
{
    pass_attend *u = ud;
    kiln_model *m = u->m;
    kern_backend *be = u->be;
    const kern_mp_ops *mp = &be->mp;
    const kern_ops *k = m->ops;
    int B = m->B, T = m->T, n = B * T;
    size_t nq = (size_t)n * m->QKV;
    float *lse = m->a.lse + (size_t)l * u->lse_sz;
    if (m->cfg.arch != KILN_ARCH_GPT2 && m->packed) /* positions restart per document */
        P(OTHER, k->rope_at(io->qkv, n, (size_t)m->QKV, m->a.pos, m->rope_cos, m->rope_sin,
                            m->NH + m->KVH, m->HS));
    else if (m->cfg.arch != KILN_ARCH_GPT2)
        P(OTHER, k->rope(io->qkv, m->rope_cos, m->rope_sin, B, T, m->NH, m->KVH, m->HS, false));
    if (u->doc) { /* out as fp32 rows, packed for the projection */
        P(OTHER, mp->to_rows(be, io->qkvh, io->qkv, nq));
        P(ATTN_FWD, mp->attention_doc_fwd(be, m->a.atty, lse, io->qkvh, m->a.pos, B, T, m->NH,
                                          m->KVH, m->HS, m->a.lse_doc));
        P(OTHER, mp->act_pack(be, io->attyp, m->a.atty, n, m->C));
    } else if (u->att) {
        if (!u->rows) P(OTHER, mp->to_rows(be, io->qkvh, io->qkv, nq));
        P(ATTN_FWD, mp->attention_fwd(be, io->attyp, lse, io->qkvh, B, T, m->NH, m->KVH, m->HS));
    } else {
        P(OTHER, mp->to_rows(be, io->qkvh, io->qkv, nq); mp->from_rows(be, io->qkv, io->qkvh, nq));
        if (m->packed)
            P(ATTN_FWD, kern_attention_doc_fwd(k, m->gemm, m->a.atty, lse, io->qkv, m->a.pos, B, T,
                                               m->NH, m->KVH, m->HS, m->a.lse_doc));
        else
            P(ATTN_FWD, k->attention_fwd(m->gemm, m->a.atty, lse, io->qkv, B, T, m->NH, m->KVH,
                                         m->HS));
        P(OTHER, mp->act_pack(be, io->attyp, m->a.atty, n, m->C));
    }
}

/* The pass's adapters (NULL without): dropout while m->lora_train, its
 * masks drawn anew for each forward (seed) and reused by its backward. */
static const model_lora *pass_lora(kiln_model *m, model_lora *lr, bool forward)
{
    const kiln_config *c = &m->cfg;
    if (c->lora_rank <= 0) return NULL;
    size_t N = (size_t)m->B * m->T;
    if (forward)
        m->lora_mask = m->lora_train ? m->lora_seed * 0x9e3779b97f4a7c15ull + ++m->lora_step : 0;
    *lr = (model_lora){.cfg = c, .rank = c->lora_rank, .scale = c->lora_alpha / c->lora_rank,
                       .p = m->lora_train ? c->lora_dropout : 0, .seed = m->lora_mask,
                       .xu = m->a.lora_x, .xs = m->a.lora_x + N * KILN_MAX(m->C, m->F),
                       .hs = m->a.lora_h, .bt = m->a.lora_h + 2 * N * (size_t)c->lora_rank};
    return lr;
}

/* Whether packed rows run on the backend's own document attention (the
 * bf16 backend's AMX kernel by document) rather than kern_ops' fp32 one. */
static bool model_pass_doc_native(const kiln_model *m, kern_backend *be)
{
    return m->packed && be->mp.attention_doc_fwd && be->mp.attention_doc_bwd &&
           be->mp.attention_ok(be, m->HS, m->T);
}

/* Layer l's weights as handles of the pass backend (NULL entries on OOM). */
static model_blk_w pass_weights(kiln_model *m, kern_backend *be, int l)
{
    model_blk_src s = model_blk_weights(m, l);
    bool io = s.qkv.lay == KERN_W_IN_OUT;
    const model_layer *ly = &m->w.layers[l];
    return (model_blk_w){.lora_a = {ly->lora_a[0], ly->lora_a[1], ly->lora_a[2], ly->lora_a[3],
                                    ly->lora_a[4], ly->lora_a[5], ly->lora_a[6]},
                         .lora_b = {ly->lora_b[0], ly->lora_b[1], ly->lora_b[2], ly->lora_b[3],
                                    ly->lora_b[4], ly->lora_b[5], ly->lora_b[6]},.ln1_w = s.ln1_w, .ln1_b = s.ln1_b, .ln2_w = s.ln2_w, .ln2_b = s.ln2_b,
                         .qkv = wh(be, s.qkv.data, s.qkv.rows, s.qkv.cols, io),
                         .proj = wh(be, s.proj.data, s.proj.rows, s.proj.cols, io),
                         .fc = wh(be, s.fc.data, s.fc.rows, s.fc.cols, io),
                         .fcproj = wh(be, s.fcproj.data, s.fcproj.rows, s.fcproj.cols, io),
                         .qkv_b = s.qkv_b, .proj_b = s.proj_b, .fc_b = s.fc_b,
                         .fcproj_b = s.fcproj_b};
}

/* The embedding of packed rows: wte[tok] + wpe[pos] (gpt2's learned
 * positions restart at 0 in every document). */
static void embed_packed_fwd(kiln_model *m, const kern_ops *k, int B, int T)
{
    model_acts *a = &m->a;
    size_t C = (size_t)m->C;
    k->embed_fwd(a->encoded, a->tokens, m->w.wte, NULL, B, T, m->C);
    if (!m->w.wpe) return;
    for (size_t i = 0; i < (size_t)B * T; i++) {
        float *o = a->encoded + i * C;
        const float *e = m->w.wpe + (size_t)a->pos[i] * C;
        for (size_t c = 0; c < C; c++) o[c] += e[c];
    }
}

/* Its backward: dwte[tok] += dres, dwpe[pos] += dres (NULL: frozen). */
static void embed_packed_bwd(kiln_model *m, const kern_ops *k, float *dwte, float *dwpe, int B,
                             int T)
{
    model_acts *a = &m->a;
    size_t C = (size_t)m->C;
    k->embed_bwd(dwte, NULL, a->dres, a->tokens, B, T, m->C, m->V);
    if (!dwpe) return;
    for (size_t i = 0; i < (size_t)B * T; i++) {
        float *d = dwpe + (size_t)a->pos[i] * C;
        const float *g = a->dres + i * C;
        for (size_t c = 0; c < C; c++) d[c] += g[c];
    }
}

kiln_status model_pass_forward(kiln_ctx *ctx, kiln_model *m, float **logits)
{
    const kern_ops *k = m->ops;
    kern_backend *be = model_pass_backend(m);
    const kern_mp_ops *mp = &be->mp;
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2;
    int B = m->B, T = m->T, C = m->C, F = m->F, QKV = m->QKV, V = m->V;
    size_t N = (size_t)B * T;
    int n = (int)N, FH = gpt2 ? F : 2 * F;
    size_t pkc = pk(be, N, C), pkf = pk(be, N, FH);
    model_acts *a = &m->a;
    /* attention in the compute dtype; packed rows take kern_ops' fp32
     * attention by document (on the compute dtype's values, as below) */
    bool att = mp->attention_ok(be, m->HS, T) && !m->packed;

    if (m->packed) P(OTHER, embed_packed_fwd(m, k, B, T));
    else P(OTHER, k->embed_fwd(a->encoded, a->tokens, m->w.wte, m->w.wpe, B, T, C));
    model_shape sh = model_shape_of(m);
    pass_attend u = {m, be, att, gpt2 && att, model_pass_doc_native(m, be), (size_t)B * m->NH * T};
    model_lora lr;
    const model_lora *pl = pass_lora(m, &lr, true);
    if (pl && model_lora_has(&m->cfg, 0))
        u.rows = false; /* the adapters add to the fp32 qkv: the attention makes the rows */
    model_run r = {.lora = pl, .be = be, .s = &sh, .qkv_rows = u.rows, .attend = train_attend,
                   .ud = &u, .prof = m};
    for (int l = 0; l < m->L; l++) {
        model_blk_w w = pass_weights(m, be, l);
        if (!w.qkv || !w.proj || !w.fc || !w.fcproj) return NOMEM(ctx);
        size_t nc = (size_t)l * N * C, ns = (size_t)l * N;
        model_blk io = {.inp = l == 0 ? a->encoded : a->res3 + nc - N * C,
                        .ln1p = at(a->ln1p, pkc, l), .attyp = at(a->attyp, pkc, l),
                        .ln2p = at(a->ln2p, pkc, l), .fchp = at(a->fchp, pkf, l),
                        .actp = a->actp, .ln1_mean = a->ln1_mean + ns,
                        .ln1_rstd = a->ln1_rstd + ns, .ln2_mean = a->ln2_mean + ns,
                        .ln2_rstd = a->ln2_rstd + ns, .qkv = a->tmp, .tmp = a->tmp,
                        .res2 = a->res2 + nc, .res3 = a->res3 + nc,
                        .qkvh = (char *)a->qkvh + (size_t)l * N * QKV * mp->row_size};
        if (!model_block_fwd(&r, l, &w, n, &io)) return NOMEM(ctx);
    }
    const float *last = a->res3 + (size_t)(m->L - 1) * N * C;
    model_final_norm(&r, a->lnfp, a->lnf_mean, a->lnf_rstd, last, m->w.lnf_w, m->w.lnf_b, n);
    kern_weight *whd = wh(be, m->w.lm_head, V, C, false);
    if (!whd) return NOMEM(ctx);
    kern_out o = {.kind = KERN_OUT_F32, .y = a->logits};
    kiln_status s = fwd(ctx, m, be, &o, a->lnfp, whd, NULL, n);
    if (s) return s;
    *logits = a->logits;
    return KILN_OK;
}

/* The backward of one linear layer y = act(x) W' + b: bias and weight
 * gradient (accumulated), input gradient dx (overwritten). */
static kiln_status linear_bwd(kiln_ctx *ctx, kiln_model *m, kern_backend *be, float *dx,
                              float *dw, float *db, const float *dy, const kern_act *xp, int act,
                              const float *w, int n, int Cin, int OC, bool io)
{
    kern_weight *pw = wh(be, w, OC, Cin, io);
    if (!pw || !be->mp.linear_bwd(be, pw, dy, xp, act, n, dw, !m->grads_lazy, db, dx))
        return NOMEM(ctx);
    return KILN_OK;
}

static void hook(kiln_model *m, size_t begin, size_t end)
{
    model_grad_fixup(m, begin, end); /* frozen parts of fused matrices */
    if (m->hook && end > begin) m->hook(m->hook_ud, begin, end - begin);
}

kiln_status model_pass_backward(kiln_ctx *ctx, kiln_model *m, const float *dlogits,
                              const model_ce *ce)
{
    const kern_ops *k = m->ops;
    kern_backend *be = model_pass_backend(m);
    const kern_mp_ops *mp = &be->mp;
    kern_gemm *g = m->gemm;
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2, io = gpt2;
    int B = m->B, T = m->T, C = m->C, F = m->F, QKV = m->QKV, V = m->V;
    size_t N = (size_t)B * T;
    int n = (int)N, FH = gpt2 ? F : 2 * F, act = gpt2 ? KERN_ACT_GELU : KERN_ACT_SWIGLU;
    size_t lse_sz = (size_t)B * m->NH * T, pkc = pk(be, N, C), pkf = pk(be, N, FH);
    model_acts *a = &m->a;
    model_weights *dw = model_grad_views(m); /* NULL where frozen */
    kiln_status s = KILN_OK;
    bool att = mp->attention_ok(be, m->HS, T) && !m->packed; /* as the forward */
    model_lora lrs;
    const model_lora *lr = pass_lora(m, &lrs, false);
    bool lq = lr && model_lora_has(&m->cfg, 0), lo = lr && model_lora_has(&m->cfg, 1);
    bool lf = lr && model_lora_has(&m->cfg, 2), ld = lr && model_lora_has(&m->cfg, 3);
    bool doc = model_pass_doc_native(m, be);

    /* LM head and final norm. */
    if (ce) { /* the loss's gradient straight into the head's backward */
        kern_weight *pw = wh(be, m->w.lm_head, V, C, false);
        bool ok = pw != NULL;
        P(MATMUL_BWD, ok = ok && mp->ce_linear_bwd(be, pw, a->logits, ce->targets, ce->mask, n, V,
                                                   ce->grad_scale, ce->loss_sum, ce->weight_sum,
                                                   a->lnfp, dw->lm_head, !m->grads_lazy, a->dc));
        if (!ok) return NOMEM(ctx);
    } else {
        P(MATMUL_BWD, s = linear_bwd(ctx, m, be, a->dc, dw->lm_head, NULL, dlogits, a->lnfp,
                                     KERN_ACT_NONE, m->w.lm_head, n, C, V, false));
        if (s) return s;
    }
    memset(a->dres, 0, N * C * sizeof(float));
    const float *last = a->res3 + (size_t)(m->L - 1) * N * C;
    P(NORM, model_norm_bwd(m, a->dres, dw->lnf_w, dw->lnf_b, a->dc, last, m->w.lnf_w,
                           a->lnf_mean, a->lnf_rstd, n));
    hook(m, m->layer_off[m->L], m->layer_off[m->L + 1]);

    for (int l = m->L - 1; l >= 0; l--) {
        const model_layer *w = &m->w.layers[l];
        model_layer *d = &dw->layers[l];
        const float *inp = l == 0 ? a->encoded : a->res3 + (size_t)(l - 1) * N * C;
        const kern_act *ln1p = at(a->ln1p, pkc, l), *attyp = at(a->attyp, pkc, l);
        const kern_act *ln2p = at(a->ln2p, pkc, l), *fchp = at(a->fchp, pkf, l);
        const char *qkvh = (char *)a->qkvh + (size_t)l * N * QKV * mp->row_size;
        const float *lse = a->lse + (size_t)l * lse_sz;
        const float *res2 = a->res2 + (size_t)l * N * C;

        const float *const *la = (const float *const *)w->lora_a;
        const float *const *lb = (const float *const *)w->lora_b;
        /* MLP: res3 = res2 + fcproj(act(fc(ln2(res2)))) */
        if (act == KERN_ACT_GELU && !lf && !ld) { /* the gradient of the pre-activation stays bf16 */
            kern_weight *w1 = wh(be, w->fc_w, F, C, io), *w2 = wh(be, w->fcproj_w, C, F, io);
            bool ok = w1 && w2;
            P(MATMUL_BWD, ok = ok && mp->mlp_bwd(be, w1, w2, a->dres, ln2p, fchp, act, n, d->fc_w,
                                                 d->fc_b, d->fcproj_w, d->fcproj_b, a->dc,
                                                 !m->grads_lazy));
            if (!ok) return NOMEM(ctx);
        } else {
            P(MATMUL_BWD, s = linear_bwd(ctx, m, be, a->df, d->fcproj_w, d->fcproj_b, a->dres, fchp,
                                         act, w->fcproj_w, n, F, C, io));
            if (s) return s;
            if (ld) { /* the adapters' input act(fc), recomputed as the forward made it */
                P(MATMUL_BWD, mp->act_unpack(be, a->tmp, fchp, n, FH);
                  mp->act_fwd(be, a->lora_hp, a->actp, a->tmp, n, F, act);
                  mp->act_unpack(be, lr->xu, a->actp, n, F);
                  model_lora_bwd(lr, l, 3, la, lb, d->lora_a, d->lora_b, lr->xu, a->dres, C,
                                 a->df, n));
            }
            P(ACT, mp->act_bwd(be, a->dbig, fchp, a->df, n, F, act));
            P(MATMUL_BWD, s = linear_bwd(ctx, m, be, a->dc, d->fc_w, d->fc_b, a->dbig, ln2p,
                                         KERN_ACT_NONE, w->fc_w, n, C, FH, io));
            if (s) return s;
            if (lf)
                P(MATMUL_BWD, mp->act_unpack(be, lr->xu, ln2p, n, C);
                  model_lora_bwd(lr, l, 2, la, lb, d->lora_a, d->lora_b, lr->xu, a->dbig, FH,
                                 a->dc, n));
        }
        P(NORM, model_norm_bwd(m, a->dres, d->ln2_w, d->ln2_b, a->dc, res2, w->ln2_w,
                               a->ln2_mean + (size_t)l * N, a->ln2_rstd + (size_t)l * N, n));
        /* Attention: res2 = inp + proj(attn(qkv(ln1(inp)))) */
        P(MATMUL_BWD, s = linear_bwd(ctx, m, be, a->dc, d->proj_w, d->proj_b, a->dres, attyp,
                                     KERN_ACT_NONE, w->proj_w, n, C, C, io));
        if (s) return s;
        if (lo)
            P(MATMUL_BWD, mp->act_unpack(be, lr->xu, attyp, n, C);
              model_lora_bwd(lr, l, 1, la, lb, d->lora_a, d->lora_b, lr->xu, a->dres, C, a->dc,
                             n));
        if (att && gpt2 && !lq) {
            /* no rope: the backend may take the gradient of qkv from the
             * attention straight into the qkv layer's backward */
            kern_weight *pw = wh(be, w->qkv_w, QKV, C, io);
            bool ok = pw != NULL;
            P(ATTN_BWD, ok = ok && mp->attention_linear_bwd(be, pw, a->dbig, a->dc, qkvh, attyp,
                                                            lse, B, T, m->NH, m->KVH, m->HS, ln1p,
                                                            d->qkv_w, !m->grads_lazy, d->qkv_b,
                                                            a->dc));
            if (!ok) return NOMEM(ctx);
        } else {
            if (att) { /* as the forward */
                P(ATTN_BWD, mp->attention_bwd(be, a->dbig, a->dc, qkvh, attyp, lse, B, T, m->NH,
                                              m->KVH, m->HS));
            } else if (doc) { /* the forward's out as the projection read it */
                P(OTHER, mp->act_unpack(be, a->atty, attyp, n, C));
                P(ATTN_BWD, mp->attention_doc_bwd(be, a->dbig, a->dc, qkvh, a->atty, lse, a->pos, B,
                                                  T, m->NH, m->KVH, m->HS, a->lse_doc));
            } else {
                P(OTHER, mp->act_unpack(be, a->atty, attyp, n, C));
                P(OTHER, mp->from_rows(be, a->tmp, qkvh, N * QKV));
                if (m->packed)
                    P(ATTN_BWD, kern_attention_doc_bwd(k, g, a->dbig, a->dc, a->tmp, a->atty, lse,
                                                       a->pos, B, T, m->NH, m->KVH, m->HS,
                                                       a->lse_doc));
                else
                    P(ATTN_BWD, k->attention_bwd(g, a->dbig, a->dc, a->tmp, a->atty, lse, B, T,
                                                 m->NH, m->KVH, m->HS));
            }
            if (!gpt2 && m->packed) /* the inverse rotation: rope_at by -sin */
                P(OTHER, k->rope_at(a->dbig, n, (size_t)QKV, a->pos, m->rope_cos, m->rope_nsin,
                                    m->NH + m->KVH, m->HS));
            else if (!gpt2)
                P(OTHER, k->rope(a->dbig, m->rope_cos, m->rope_sin, B, T, m->NH, m->KVH, m->HS, true));
            P(MATMUL_BWD, s = linear_bwd(ctx, m, be, a->dc, d->qkv_w, d->qkv_b, a->dbig, ln1p,
                                         KERN_ACT_NONE, w->qkv_w, n, C, QKV, io));
            if (s) return s;
            if (lq)
                P(MATMUL_BWD, mp->act_unpack(be, lr->xu, ln1p, n, C);
                  model_lora_bwd(lr, l, 0, la, lb, d->lora_a, d->lora_b, lr->xu, a->dbig, QKV,
                                 a->dc, n));
        }
        P(NORM, model_norm_bwd(m, a->dres, d->ln1_w, d->ln1_b, a->dc, inp, w->ln1_w,
                               a->ln1_mean + (size_t)l * N, a->ln1_rstd + (size_t)l * N, n));
        hook(m, m->layer_off[l], m->layer_off[l + 1]);
    }
    if (m->packed) P(OTHER, embed_packed_bwd(m, k, dw->wte, dw->wpe, B, T));
    else P(OTHER, k->embed_bwd(dw->wte, dw->wpe, a->dres, a->tokens, B, T, C, V));
    hook(m, 0, m->layer_off[0]);
    return KILN_OK;
}
