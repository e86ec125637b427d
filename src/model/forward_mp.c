/*
 * forward_mp.c — the forward and backward passes of bf16 training with
 * bf16 activations.
 *
 * Every input of a matrix product is stored once, in bf16, in the packed-A
 * layout the AMX kernel reads (kernels/x86/bf16.h), so no product converts
 * or packs its left operand from fp32 again, and the stored activations
 * take half the memory:
 *   ln1p, ln2p   the normalized inputs of the qkv and fc products (L, N, C)
 *   attyp        the attention output, input of the projection    (L, N, C)
 *                (the AMX attention writes it directly, and its
 *                backward reads it as it is)
 *   fchp         the fc product's output, pre-activation          (L, N, FH)
 *   lnfp         the final norm's output, input of the LM head    (N, C)
 * The activation function's output (the input of the MLP's second
 * product) is not stored: the forward writes it for one layer at a time
 * (actp) in the fc product's fused epilogue, and the backward recomputes it
 * from fchp while packing the weight-gradient operand. For GELU the
 * epilogue runs on the product's finished tiles (no fp32 fc output), and
 * the backward's gradient of the pre-activation goes from the tiles of its
 * product, through GELU', straight into both packed forms the fc layer's
 * backward reads (mp_mlp_backward_packed). qkv is stored in
 * bf16 too (qkvh, plain rows): with the AMX backend and a head size it
 * supports at this T (mp_attention_amx_ok) attention reads it directly and runs its
 * products in bf16 (attn_amx.c); otherwise the fp32 attention kernels run
 * on its values, widened into one layer's scratch, in the forward and again
 * in the backward, so both see the same numbers. What stays fp32: the residual
 * stream (encoded, res2, res3), norm statistics, the softmax (and the
 * attention log-sum-exp), the logits (cross-entropy in fp32), and all
 * gradients.
 * The residual adds are fused into the products: the tiles start from the
 * bias, and the residual is added as each finished block is stored
 * (MP_EPI_RES), so no pass writes residual + bias first. The norms write
 * their packed bf16 output directly (kern_fast_norm_fwd_packed: the same
 * bytes as the fp32 norm then mp_pack_a, without the fp32 output).
 *
 * Weight gradients of (out, in) weights run as dW = dY^T X, of (in, out)
 * weights (gpt2) as dW = X^T dY, both stored as they are: dY packed from
 * fp32 (in the same pass as dY itself for the input gradient and the bias
 * gradient: dY is read once), X packed over tokens from its stored bf16
 * copy (mp_pack_b_tokens, mp_pack_a_tokens).
 *
 * Used when the model's precision is bf16 (fp16 keeps fp32 activations:
 * its exact hi/lo split needs the fp32 value) and
 * kiln_precision_opts.bf16_acts is true (the default); false switches it
 * off (bf16 products on fp32 activations, for comparison).
 */
#include "kernels/x86/bf16_ops.h"
#include "model/model.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static size_t rup32(size_t x) { return (x + 31) / 32 * 32; }

/* Elements of a packed bf16 (M, K) activation. */
static size_t pk(size_t M, size_t K) { return rup32(M) * rup32(K); }

bool model_mp_wanted(const kiln_model *m)
{
    return kiln_model_precision(m) == KILN_PRECISION_BF16 && !m->bf16_f32_acts;
}

/* The buffers, in carve order: {bytes per element, count}. */
static void sizes(const kiln_model *m, int B, int T, size_t out[][2], int *n)
{
    size_t N = (size_t)B * T, L = (size_t)m->L, C = (size_t)m->C;
    size_t F = (size_t)m->F, V = (size_t)m->V, NH = (size_t)m->NH, QKV = (size_t)m->QKV;
    size_t FH = m->cfg.arch == KILN_ARCH_LLAMA ? 2 * F : F;
    size_t wide = KILN_MAX(KILN_MAX(C, FH), QKV);
    size_t s[][2] = {
        {4, N},                    /* tokens */
        {4, N * C},                /* encoded */
        {2, L * pk(N, C)},         /* ln1p */
        {4, L * N}, {4, L * N},    /* ln1 mean, rstd */
        {2, L * N * QKV},          /* qkvh */
        {4, L * B * NH * T},       /* lse */
        {2, L * pk(N, C)},         /* attyp */
        {4, L * N * C},            /* res2 */
        {2, L * pk(N, C)},         /* ln2p */
        {4, L * N}, {4, L * N},    /* ln2 mean, rstd */
        {2, L * pk(N, FH)},        /* fchp */
        {4, L * N * C},            /* res3 */
        {2, pk(N, C)},             /* lnfp */
        {4, N}, {4, N},            /* lnf mean, rstd */
        {4, N * V},                /* logits */
        {2, pk(N, F)},             /* actp (one layer) */
        {4, N * wide},             /* tmp (one layer) */
        {4, N * C},                /* atty (one layer) */
        {4, N * C}, {4, N * C},    /* dres, dc */
        {4, N * F}, {4, N * KILN_MAX(QKV, FH)}, /* df, dbig */
    };
    *n = (int)(sizeof s / sizeof s[0]);
    memcpy(out, s, sizeof s);
}

size_t model_mp_act_bytes(const kiln_model *m, int B, int T)
{
    size_t s[32][2], total = 0;
    int n;
    sizes(m, B, T, s, &n);
    for (int i = 0; i < n; i++) total += (s[i][0] * s[i][1] + 63) & ~(size_t)63;
    return total;
}

void model_mp_carve(kiln_model *m, int B, int T)
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
    KILN_ASSERT(i == n);
}

#define P MODEL_P

#define NOMEM(ctx) kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory in the bf16 products")

/* A forward product (M, N, K) through its epilogue e, timed as MATMUL_FWD. */
static kiln_status fwd_epi(kiln_ctx *ctx, kiln_model *m, kern_gemm *g, mp_backend be, int M,
                           int N, int K, const uint16_t *pa, const uint16_t *pb, const float *bias,
                           const mp_epi *e)
{
    bool ok;
    P(MATMUL_FWD, ok = mp_gemm_packed_epi(be, mp_kern_scratch(g), M, N, K, pa, pb, bias, e));
    return ok ? KILN_OK : NOMEM(ctx);
}

/* out (n, C) = res + (a W' + bias): a residual product, the add done as
 * each block of the product is stored (MP_EPI_RES). */
static kiln_status fwd_res(kiln_ctx *ctx, kiln_model *m, mp_backend be, float *out, const float *res,
                           int n, int K, const uint16_t *pa, const mp_weight *w, const float *bias)
{
    mp_epi e = {.kind = MP_EPI_RES, .M = n, .N = m->C, .out = out, .res = res};
    return fwd_epi(ctx, m, m->gemm, be, n, m->C, K, pa, w->fwd, bias, &e);
}

/* The norm of one layer (n rows): fp32 statistics (mean, rstd; no mean
 * for RMSNorm), outp = the output packed bf16 (pk(n, C), padding zero).
 * The mixed-precision kernel table has the fast table's norms, whose
 * fused form (kern_fast_norm_fwd_packed) writes the packed output
 * directly, bit for bit mp_pack_a of their fp32 output, which is never
 * stored. Any other table: its fp32 output in m->a.tmp, then packed. */
static void norm_packed(kiln_model *m, uint16_t *outp, float *mean, float *rstd, const float *inp,
                        const float *w, const float *b, int n)
{
    const kern_ops *k = m->ops, *fast = kern_ops_fast();
    int C = m->C;
    float eps = m->cfg.norm_eps;
    bool ln = m->cfg.arch == KILN_ARCH_GPT2;
    if (ln ? k->layernorm_fwd == fast->layernorm_fwd : k->rmsnorm_fwd == fast->rmsnorm_fwd) {
        kern_fast_norm_fwd_packed(outp, mean, rstd, inp, w, b, n, C, eps, !ln);
        return;
    }
    if (ln) k->layernorm_fwd(m->a.tmp, mean, rstd, inp, w, b, n, C, eps);
    else k->rmsnorm_fwd(m->a.tmp, rstd, inp, w, n, C, eps);
    mp_pack_a(KILN_DTYPE_BF16, false, n, C, m->a.tmp, C, outp);
}

kiln_status model_mp_forward(kiln_ctx *ctx, kiln_model *m, float **logits)
{
    const kern_ops *k = m->ops;
    kern_gemm *g = m->gemm;
    mp_backend be = mp_kern_backend(g);
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2, io = gpt2;
    int B = m->B, T = m->T, C = m->C, F = m->F, QKV = m->QKV, V = m->V;
    size_t N = (size_t)B * T;
    int n = (int)N, FH = gpt2 ? F : 2 * F, act = gpt2 ? MP_ACT_GELU : MP_ACT_SWIGLU;
    size_t lse_sz = (size_t)B * m->NH * T;
    model_acts *a = &m->a;

    P(OTHER, k->embed_fwd(a->encoded, a->tokens, m->w.wte, m->w.wpe, B, T, C));
    for (int l = 0; l < m->L; l++) {
        const model_layer *w = &m->w.layers[l];
        const float *inp = l == 0 ? a->encoded : a->res3 + (size_t)(l - 1) * N * C;
        uint16_t *ln1p = a->ln1p + (size_t)l * pk(N, C), *attyp = a->attyp + (size_t)l * pk(N, C);
        uint16_t *ln2p = a->ln2p + (size_t)l * pk(N, C), *fchp = a->fchp + (size_t)l * pk(N, FH);
        uint16_t *qkvh = a->qkvh + (size_t)l * N * QKV;
        float *qkv = a->tmp, *lse = a->lse + (size_t)l * lse_sz;
        float *res2 = a->res2 + (size_t)l * N * C, *res3 = a->res3 + (size_t)l * N * C;
        const mp_weight *wq = mp_kern_weight(g, w->qkv_w, QKV, C, io, false);
        const mp_weight *wp = mp_kern_weight(g, w->proj_w, C, C, io, false);
        const mp_weight *wf = mp_kern_weight(g, w->fc_w, FH, C, io, false);
        const mp_weight *wo = mp_kern_weight(g, w->fcproj_w, C, F, io, false);
        if (!wq || !wp || !wf || !wo) return NOMEM(ctx);

        P(NORM, norm_packed(m, ln1p, a->ln1_mean + (size_t)l * N, a->ln1_rstd + (size_t)l * N, inp,
                            w->ln1_w, w->ln1_b, n));
        bool amx_att = be == MP_BACKEND_AMX && mp_attention_amx_ok(m->HS, T);
        if (gpt2 && amx_att) { /* no rope: qkv goes from the tiles to qkvh */
            mp_epi e = {.kind = MP_EPI_ROWS, .M = n, .N = QKV, .xp = qkvh};
            kiln_status s = fwd_epi(ctx, m, g, be, n, QKV, C, ln1p, wq->fwd, w->qkv_b, &e);
            if (s) return s;
        } else {
            P(MATMUL_FWD,
              mp_gemm_packed(be, KILN_DTYPE_BF16, n, QKV, C, ln1p, wq->fwd, qkv, QKV, false, w->qkv_b));
        }
        if (!gpt2)
            P(OTHER, k->rope(qkv, m->rope_cos, m->rope_sin, B, T, m->NH, m->KVH, m->HS, false));
        if (amx_att) { /* bf16 on AMX, from qkvh, straight to attyp */
            if (!gpt2) P(OTHER, mp_f32_to_bf16(qkv, qkvh, N * QKV));
            P(ATTN_FWD, mp_attention_fwd_amx_packed(attyp, lse, qkvh, B, T, m->NH, m->KVH, m->HS));
        } else { /* fp32 on the bf16 values */
            P(OTHER, mp_f32_to_bf16(qkv, qkvh, N * QKV); mp_bf16_to_f32(qkvh, qkv, N * QKV));
            P(ATTN_FWD, k->attention_fwd(g, a->atty, lse, qkv, B, T, m->NH, m->KVH, m->HS));
            P(OTHER, mp_pack_a(KILN_DTYPE_BF16, false, n, C, a->atty, C, attyp));
        }
        kiln_status s = fwd_res(ctx, m, be, res2, inp, n, C, attyp, wp, w->proj_b);
        if (s) return s;
        P(NORM, norm_packed(m, ln2p, a->ln2_mean + (size_t)l * N, a->ln2_rstd + (size_t)l * N, res2,
                            w->ln2_w, w->ln2_b, n));
        if (act == MP_ACT_GELU) { /* the fc output goes from the tiles to fchp and actp */
            mp_epi e = {.kind = MP_EPI_ACT, .act = act, .M = n, .N = F, .xp = fchp, .ap = a->actp};
            s = fwd_epi(ctx, m, g, be, n, F, C, ln2p, wf->fwd, w->fc_b, &e);
            if (s) return s;
        } else {
            P(MATMUL_FWD,
              mp_gemm_packed(be, KILN_DTYPE_BF16, n, FH, C, ln2p, wf->fwd, a->tmp, FH, false, w->fc_b));
            P(ACT, mp_act_pack(fchp, a->actp, a->tmp, n, F, act));
        }
        s = fwd_res(ctx, m, be, res3, res2, n, F, a->actp, wo, w->fcproj_b);
        if (s) return s;
    }
    const float *last = a->res3 + (size_t)(m->L - 1) * N * C;
    P(NORM, norm_packed(m, a->lnfp, a->lnf_mean, a->lnf_rstd, last, m->w.lnf_w, m->w.lnf_b, n));
    const mp_weight *wh = mp_kern_weight(g, m->w.lm_head, V, C, false, false);
    if (!wh) return NOMEM(ctx);
    P(MATMUL_FWD, mp_gemm_packed(be, KILN_DTYPE_BF16, n, V, C, a->lnfp, wh->fwd, a->logits, V, false, NULL));
    *logits = a->logits;
    return KILN_OK;
}

/* The backward of one linear layer y = x W' + b: bias and weight gradient
 * (accumulated), input gradient dx (overwritten). */
static kiln_status linear_bwd(kiln_ctx *ctx, kiln_model *m, float *dx, float *dw, float *db,
                              const float *dy, const uint16_t *xp, int act, const float *w,
                              int n, int Cin, int OC, bool io)
{
    kern_gemm *g = m->gemm;
    const mp_weight *pw = mp_kern_weight(g, w, OC, Cin, io, true);
    if (!pw || !mp_linear_backward_packed(mp_kern_backend(g), mp_kern_scratch(g), pw, dy, xp, act, n,
                                          dw, !m->grads_lazy, db, dx))
        return NOMEM(ctx);
    return KILN_OK;
}

static void hook(kiln_model *m, size_t begin, size_t end)
{
    model_grad_fixup(m, begin, end); /* frozen parts of fused matrices */
    if (m->hook && end > begin) m->hook(m->hook_ud, begin, end - begin);
}

kiln_status model_mp_backward(kiln_ctx *ctx, kiln_model *m, const float *dlogits,
                              const model_ce *ce)
{
    const kern_ops *k = m->ops;
    kern_gemm *g = m->gemm;
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2, io = gpt2;
    int B = m->B, T = m->T, C = m->C, F = m->F, QKV = m->QKV, V = m->V;
    size_t N = (size_t)B * T;
    int n = (int)N, FH = gpt2 ? F : 2 * F, act = gpt2 ? MP_ACT_GELU : MP_ACT_SWIGLU;
    size_t lse_sz = (size_t)B * m->NH * T;
    model_acts *a = &m->a;
    model_weights *dw = model_grad_views(m); /* NULL where frozen */
    kiln_status s = KILN_OK;

    /* LM head and final norm. */
    if (ce) { /* the loss's gradient straight into the head's packed operands */
        const mp_weight *pw = mp_kern_weight(g, m->w.lm_head, V, C, false, true);
        uint16_t *pa, *pt;
        float *part;
        if (!pw || !mp_scratch_dy(mp_kern_scratch(g), n, V, false, &pa, &pt, &part))
            return NOMEM(ctx);
        P(OTHER, kern_fast_ce_packed(pa, pt, mp_dy_tok(pw, MP_ACT_NONE), a->logits, ce->targets,
                                     ce->mask, n, V, ce->grad_scale, ce->loss_sum, ce->weight_sum));
        bool ok;
        P(MATMUL_BWD, ok = mp_linear_backward_prepacked(mp_kern_backend(g), mp_kern_scratch(g), pw,
                                                        pa, pt, a->lnfp, MP_ACT_NONE, n,
                                                        dw->lm_head, !m->grads_lazy, a->dc));
        if (!ok) return NOMEM(ctx);
    } else {
        P(MATMUL_BWD, s = linear_bwd(ctx, m, a->dc, dw->lm_head, NULL, dlogits, a->lnfp,
                                     MP_ACT_NONE, m->w.lm_head, n, C, V, false));
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
        const uint16_t *ln1p = a->ln1p + (size_t)l * pk(N, C);
        const uint16_t *attyp = a->attyp + (size_t)l * pk(N, C);
        const uint16_t *ln2p = a->ln2p + (size_t)l * pk(N, C);
        const uint16_t *fchp = a->fchp + (size_t)l * pk(N, FH);
        const uint16_t *qkvh = a->qkvh + (size_t)l * N * QKV;
        const float *lse = a->lse + (size_t)l * lse_sz;
        const float *res2 = a->res2 + (size_t)l * N * C;

        /* MLP: res3 = res2 + fcproj(act(fc(ln2(res2)))) */
        if (act == MP_ACT_GELU) { /* the gradient of the pre-activation stays packed bf16 */
            const mp_weight *w1 = mp_kern_weight(g, w->fc_w, F, C, io, true);
            const mp_weight *w2 = mp_kern_weight(g, w->fcproj_w, C, F, io, true);
            bool ok = w1 && w2;
            P(MATMUL_BWD, ok = ok && mp_mlp_backward_packed(mp_kern_backend(g), mp_kern_scratch(g), w1,
                                                            w2, a->dres, ln2p, fchp, act, n, d->fc_w,
                                                            d->fc_b, d->fcproj_w, d->fcproj_b, a->dc,
                                                            !m->grads_lazy));
            if (!ok) return NOMEM(ctx);
        } else {
            P(MATMUL_BWD, s = linear_bwd(ctx, m, a->df, d->fcproj_w, d->fcproj_b, a->dres, fchp,
                                         act, w->fcproj_w, n, F, C, io));
            if (s) return s;
            P(ACT, mp_act_bwd(a->dbig, fchp, a->df, n, F, act));
            P(MATMUL_BWD, s = linear_bwd(ctx, m, a->dc, d->fc_w, d->fc_b, a->dbig, ln2p,
                                         MP_ACT_NONE, w->fc_w, n, C, FH, io));
            if (s) return s;
        }
        P(NORM, model_norm_bwd(m, a->dres, d->ln2_w, d->ln2_b, a->dc, res2, w->ln2_w,
                               a->ln2_mean + (size_t)l * N, a->ln2_rstd + (size_t)l * N, n));
        /* Attention: res2 = inp + proj(attn(qkv(ln1(inp)))) */
        P(MATMUL_BWD, s = linear_bwd(ctx, m, a->dc, d->proj_w, d->proj_b, a->dres, attyp,
                                     MP_ACT_NONE, w->proj_w, n, C, C, io));
        if (s) return s;
        bool amx_att = mp_kern_backend(g) == MP_BACKEND_AMX && mp_attention_amx_ok(m->HS, T);
        if (amx_att && gpt2 && T % 32 == 0) {
            /* no rope: the gradient of qkv goes from the attention's
             * accumulators straight into the packed forms (and bias sums)
             * the qkv layer's backward reads, never as fp32 rows */
            const mp_weight *pw = mp_kern_weight(g, w->qkv_w, QKV, C, io, true);
            mp_dy_out o = {.tok = pw && mp_dy_tok(pw, MP_ACT_NONE), .np = n, .op = QKV};
            if (!pw || !mp_scratch_dy(mp_kern_scratch(g), n, QKV, d->qkv_b != NULL, &o.pa, &o.pt,
                                      &o.part))
                return NOMEM(ctx);
            P(ATTN_BWD, mp_attention_bwd_amx_packed(NULL, &o, a->dc, qkvh, attyp, lse, B, T, m->NH,
                                                    m->KVH, m->HS));
            if (d->qkv_b) P(MATMUL_BWD, mp_pack_dy_bias(d->qkv_b, o.part, n, QKV));
            bool ok;
            P(MATMUL_BWD, ok = mp_linear_backward_prepacked(mp_kern_backend(g), mp_kern_scratch(g), pw,
                                                            o.pa, o.pt, ln1p, MP_ACT_NONE, n,
                                                            d->qkv_w, !m->grads_lazy, a->dc));
            if (!ok) return NOMEM(ctx);
        } else {
            if (amx_att) { /* as the forward */
                P(ATTN_BWD, mp_attention_bwd_amx_packed(a->dbig, NULL, a->dc, qkvh, attyp, lse, B, T,
                                                        m->NH, m->KVH, m->HS));
            } else {
                P(OTHER, mp_unpack_a(a->atty, C, attyp, n, C));
                P(OTHER, mp_bf16_to_f32(qkvh, a->tmp, N * QKV));
                P(ATTN_BWD, k->attention_bwd(g, a->dbig, a->dc, a->tmp, a->atty, lse, B, T, m->NH,
                                             m->KVH, m->HS));
            }
            if (!gpt2)
                P(OTHER, k->rope(a->dbig, m->rope_cos, m->rope_sin, B, T, m->NH, m->KVH, m->HS, true));
            P(MATMUL_BWD, s = linear_bwd(ctx, m, a->dc, d->qkv_w, d->qkv_b, a->dbig, ln1p,
                                         MP_ACT_NONE, w->qkv_w, n, C, QKV, io));
            if (s) return s;
        }
        P(NORM, model_norm_bwd(m, a->dres, d->ln1_w, d->ln1_b, a->dc, inp, w->ln1_w,
                               a->ln1_mean + (size_t)l * N, a->ln1_rstd + (size_t)l * N, n));
        hook(m, m->layer_off[l], m->layer_off[l + 1]);
    }
    P(OTHER, k->embed_bwd(dw->wte, dw->wpe, a->dres, a->tokens, B, T, C, V));
    hook(m, 0, m->layer_off[0]);
    return KILN_OK;
}
