/*
 * acts_f32.c — the f32 backend (kernels.h's kern_backend_f32_new): the
 * activation ops of the model's one forward and backward pass
 * (kern_mp_ops) with fp32 activations, over any fp32 op table and GEMM.
 *
 * The model runs one pass for every precision (model/pass.c); what
 * differs is the backend under it. bf16 with bf16 activations runs the
 * cpu or ref backend's ops; fp32 — and fp16 and bf16 with fp32
 * activations, whose mixed-precision products sit in their backend's
 * GEMM — run these: a kern_act here is plain fp32 rows (rows * cols
 * floats), "rows" are fp32, and every op is the kern_ops call the fp32
 * pass made before it was one pass, in the same order with the same
 * arguments, so the bits are those of the op table:
 *   linear_fwd     matmul_fwd (training) or linear (inference: streamed
 *                  for decode-sized steps, typed weights), then the
 *                  output form: the residual add (kern_ops.add), GELU
 *   act_fwd/bwd    the table's GELU / SwiGLU, the pre-activation kept
 *   linear_bwd     the activation recomputed from the pre-activation
 *                  (the forward kept no copy of it), then matmul_bwd
 *   attention      the table's flash attention on fp32 rows
 * A weight handle is a kern_wt (kiln_dtype F32, the model's tensor read
 * in place; the engine passes quantized ones too: kern_f32_weight). The
 * backend owns scratch for the recomputed activation and the MLP
 * backward, grown when a larger step asks (never inside a step of the
 * same shape).
 */
#include "kernels/kernels.h"

#include "base/base.h"

#include <stdlib.h>
#include <string.h>

typedef struct f32_state {
    kern_backend b;
    kern_wt **w; /* one allocation each: handles stay put */
    int n, cap;
    float *scratch; /* the activation / MLP-backward scratch */
    size_t scratch_cap;
    bool stream;   /* inference: kern_ops.linear */
    bool own_gemm; /* made by kern_backend_new: freed with the backend */
} f32_state;

static float *scratch(kern_backend *b, size_t floats)
{
    f32_state *st = b->state;
    if (floats > st->scratch_cap) {
        void *p = NULL;
        if (posix_memalign(&p, 64, floats * sizeof(float))) return NULL;
        free(st->scratch);
        st->scratch = p;
        st->scratch_cap = floats;
    }
    return st->scratch;
}

/* ---- weights: the fp32 tensor itself ------------------------------------ */

static kern_weight *f32_weight_prepare(kern_backend *b, const float *w, int OC, int C,
                                       kern_wlayout lay)
{
    f32_state *st = b->state;
    for (int i = 0; i < st->n; i++)
        if (st->w[i]->data == w && st->w[i]->rows == OC && st->w[i]->cols == C &&
            st->w[i]->lay == lay)
            return (kern_weight *)st->w[i];
    if (st->n == st->cap) {
        int cap = st->cap ? 2 * st->cap : 16;
        kern_wt **n = realloc(st->w, sizeof *n * (size_t)cap);
        if (!n) return NULL;
        st->w = n;
        st->cap = cap;
    }
    kern_wt *e = malloc(sizeof *e);
    if (!e) return NULL;
    *e = (kern_wt){KILN_DTYPE_F32, lay, OC, C, w};
    st->w[st->n++] = e;
    return (kern_weight *)e;
}

kern_weight *kern_f32_weight(const kern_wt *w)
{
    return (kern_weight *)w;
}

static const kern_wt *W_of(const kern_weight *w)
{
    return (const kern_wt *)w;
}

/* Read in place: nothing to convert, keep or refresh. */
static int f32_weight_refresh_rows(const kern_backend *b, const kern_weight *w)
{
    (void)b, (void)w;
    return 0;
}

static void f32_weight_refresh(kern_backend *b, kern_weight *w, int r0)
{
    (void)b, (void)w, (void)r0;
    KILN_ASSERT(!"f32 has no strip refresh (weight_refresh_rows is 0)");
}

static void f32_weight_nop(kern_backend *b, kern_weight *w)
{
    (void)b, (void)w;
}

/* ---- the activation ops -------------------------------------------------- */

static size_t f32_act_bytes(const kern_backend *b, int rows, int cols)
{
    (void)b;
    return sizeof(float) * (size_t)rows * (size_t)cols;
}

static void f32_rows_copy(const kern_backend *b, void *dst, const float *x, size_t n)
{
    (void)b;
    if (dst != x) memcpy(dst, x, n * sizeof(float));
}

static void f32_rows_read(const kern_backend *b, float *dst, const void *x, size_t n)
{
    (void)b;
    if (dst != x) memcpy(dst, x, n * sizeof(float));
}

static void f32_act_pack(const kern_backend *b, kern_act *dst, const float *x, int rows, int cols)
{
    f32_rows_copy(b, dst, x, (size_t)rows * cols);
}

static void f32_act_unpack(const kern_backend *b, float *x, const kern_act *src, int rows,
                           int cols)
{
    f32_rows_read(b, x, src, (size_t)rows * cols);
}

static void f32_norm_fwd(const kern_backend *b, kern_act *outp, float *mean, float *rstd,
                         const float *inp, const float *w, const float *bias, int N, int C,
                         float eps, bool rms)
{
    float *o = (float *)outp;
    if (rms) b->ops->rmsnorm_fwd(o, rstd, inp, w, N, C, eps);
    else b->ops->layernorm_fwd(o, mean, rstd, inp, w, bias, N, C, eps);
}

static bool f32_linear_fwd(kern_backend *b, const kern_out *o, const kern_act *x, kern_weight *w,
                           const float *bias, int N)
{
    f32_state *st = b->state;
    const kern_wt *W = W_of(w);
    float *y = o->kind == KERN_OUT_ROWS ? (float *)o->rows
             : o->kind == KERN_OUT_GELU ? (float *)o->hp
                                        : o->y;
    if (st->stream) {
        b->ops->linear(b->gemm, y, (const float *)x, N, W, bias);
    } else {
        KILN_ASSERT(W->dtype == KILN_DTYPE_F32);
        b->ops->matmul_fwd(b->gemm, y, (const float *)x, W->data, bias, N, W->cols, W->rows,
                           W->lay);
    }
    size_t n = (size_t)N * W->rows;
    if (o->kind == KERN_OUT_RES) b->ops->add(y, y, o->res, n);
    else if (o->kind == KERN_OUT_GELU) b->ops->gelu_fwd((float *)o->ap, y, n);
    return true;
}

/* The activation's output a (N, F) from the pre-activation h. */
static void act_out(const kern_backend *b, float *a, const float *h, int N, int F, int act)
{
    if (act == KERN_ACT_GELU) b->ops->gelu_fwd(a, h, (size_t)N * F);
    else b->ops->swiglu_fwd(a, h, N, F);
}

static void f32_act_fwd(const kern_backend *b, kern_act *hp, kern_act *ap, const float *h, int N,
                        int F, int act)
{
    int FH = act == KERN_ACT_SWIGLU ? 2 * F : F;
    f32_rows_copy(b, hp, h, (size_t)N * FH);
    act_out(b, (float *)ap, h, N, F, act);
}

static void f32_act_bwd(const kern_backend *b, float *dh, const kern_act *hp, const float *dout,
                        int N, int F, int act)
{
    const float *h = (const float *)hp;
    if (act == KERN_ACT_GELU) b->ops->gelu_bwd(dh, h, dout, (size_t)N * F);
    else b->ops->swiglu_bwd(dh, h, dout, N, F);
}

/* linear_bwd with the activation's output in a (scratch) when act is not
 * NONE. */
static bool bwd_with(kern_backend *b, kern_weight *w, const float *dy, const kern_act *x, int act,
                     int N, float *dW, bool dw_acc, float *db, float *dx, float *a)
{
    const kern_wt *W = W_of(w);
    KILN_ASSERT(W->dtype == KILN_DTYPE_F32);
    const float *in = (const float *)x;
    if (act != KERN_ACT_NONE) {
        act_out(b, a, in, N, W->cols, act);
        in = a;
    }
    if (dW && !dw_acc) memset(dW, 0, sizeof(float) * (size_t)W->rows * W->cols);
    b->ops->matmul_bwd(b->gemm, dx, dW, db, dy, in, W->data, N, W->cols, W->rows, W->lay, false);
    return true;
}

static bool f32_linear_bwd(kern_backend *b, kern_weight *w, const float *dy, const kern_act *x,
                           int act, int N, float *dW, bool dw_acc, float *db, float *dx)
{
    float *a = NULL;
    if (act != KERN_ACT_NONE && !(a = scratch(b, (size_t)N * W_of(w)->cols))) return false;
    return bwd_with(b, w, dy, x, act, N, dW, dw_acc, db, dx, a);
}

static bool f32_mlp_bwd(kern_backend *b, kern_weight *w1, kern_weight *w2, const float *dy,
                        const kern_act *x, const kern_act *h, int act, int N, float *dW1,
                        float *db1, float *dW2, float *db2, float *dx, bool dw_acc)
{
    int F = W_of(w2)->cols, FH = W_of(w1)->rows;
    size_t nf = (size_t)N * F;
    float *s = scratch(b, 2 * nf + (size_t)N * FH);
    if (!s) return false;
    float *a = s, *df = s + nf, *dh = s + 2 * nf;
    bwd_with(b, w2, dy, h, act, N, dW2, dw_acc, db2, df, a);
    if (act != KERN_ACT_NONE) f32_act_bwd(b, dh, h, df, N, F, act);
    else memcpy(dh, df, nf * sizeof(float));
    return bwd_with(b, w1, dh, x, KERN_ACT_NONE, N, dW1, dw_acc, db1, dx, NULL);
}

/* The gradient of the logits is written over the logits (no second
 * (N, V) buffer). */
static bool f32_ce_linear_bwd(kern_backend *b, kern_weight *w, float *logits,
                              const int32_t *targets, const float *mask, int N, int V,
                              float grad_scale, double *loss_sum, double *weight_sum,
                              const kern_act *x, float *dW, bool dw_acc, float *dx)
{
    b->ops->cross_entropy(logits, targets, mask, N, V, grad_scale, logits, loss_sum, weight_sum);
    return bwd_with(b, w, logits, x, KERN_ACT_NONE, N, dW, dw_acc, NULL, dx, NULL);
}

static bool f32_attention_ok(const kern_backend *b, int HS, int T)
{
    (void)b, (void)HS, (void)T;
    return true;
}

static void f32_attention_fwd(const kern_backend *b, kern_act *outp, float *lse, const void *qkvh,
                              int B, int T, int NH, int KVH, int HS)
{
    b->ops->attention_fwd(b->gemm, (float *)outp, lse, (const float *)qkvh, B, T, NH, KVH, HS);
}

static void f32_attention_bwd(const kern_backend *b, float *dqkv, const float *dout,
                              const void *qkvh, const kern_act *outp, const float *lse, int B,
                              int T, int NH, int KVH, int HS)
{
    b->ops->attention_bwd(b->gemm, dqkv, dout, (const float *)qkvh, (const float *)outp, lse, B,
                          T, NH, KVH, HS);
}

/* Packed rows: the table's attention by document (attn_doc.c). */
static void f32_attention_doc_fwd(const kern_backend *b, float *out, float *lse, const void *qkvh,
                                  const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                                  float *scratch)
{
    kern_attention_doc_fwd(b->ops, b->gemm, out, lse, (const float *)qkvh, pos, B, T, NH, KVH, HS,
                           scratch);
}

static void f32_attention_doc_bwd(const kern_backend *b, float *dqkv, const float *dout,
                                  const void *qkvh, const float *out, const float *lse,
                                  const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                                  float *scratch)
{
    kern_attention_doc_bwd(b->ops, b->gemm, dqkv, dout, (const float *)qkvh, out, lse, pos, B, T,
                           NH, KVH, HS, scratch);
}

static bool f32_attention_linear_bwd(kern_backend *b, kern_weight *w, float *dqkv,
                                     const float *dout, const void *qkvh, const kern_act *outp,
                                     const float *lse, int B, int T, int NH, int KVH, int HS,
                                     const kern_act *x, float *dW, bool dw_acc, float *db,
                                     float *dx)
{
    f32_attention_bwd(b, dqkv, dout, qkvh, outp, lse, B, T, NH, KVH, HS);
    return bwd_with(b, w, dqkv, x, KERN_ACT_NONE, B * T, dW, dw_acc, db, dx, NULL);
}

/* ---- the backend --------------------------------------------------------- */

static void f32_destroy(kern_backend *b)
{
    f32_state *st = b->state;
    for (int i = 0; i < st->n; i++)
        free(st->w[i]);
    free(st->w);
    free(st->scratch);
    if (st->own_gemm) kern_gemm_free(b->gemm);
    free(st);
}

kern_backend *kern_backend_f32_new(const kern_ops *ops, kern_gemm *gemm, bool own_gemm,
                                   bool stream)
{
    f32_state *st = calloc(1, sizeof *st);
    if (!st) {
        if (own_gemm) kern_gemm_free(gemm);
        return NULL;
    }
    st->stream = stream;
    st->own_gemm = own_gemm;
    st->b = (kern_backend){
        .name = ops == kern_ops_ref() ? "ref" : "cpu",
        .kernel = ops->name,
        .dtype = KILN_DTYPE_F32,
        .state = st,
        .ops = ops,
        .gemm = gemm,
        .buf_alloc = kern_host_buf_alloc,
        .buf_free = kern_host_buf_free,
        .buf_set = kern_host_buf_set,
        .buf_get = kern_host_buf_get,
        .weight_prepare = f32_weight_prepare,
        .weight_refresh_rows = f32_weight_refresh_rows,
        .weight_refresh = f32_weight_refresh,
        .weight_fresh = f32_weight_nop,
        .weight_keep = f32_weight_nop,
        .mp =
            {
                .row_size = sizeof(float),
                .act_bytes = f32_act_bytes,
                .act_pack = f32_act_pack,
                .act_unpack = f32_act_unpack,
                .to_rows = f32_rows_copy,
                .from_rows = f32_rows_read,
                .norm_fwd = f32_norm_fwd,
                .linear_fwd = f32_linear_fwd,
                .act_fwd = f32_act_fwd,
                .act_bwd = f32_act_bwd,
                .linear_bwd = f32_linear_bwd,
                .mlp_bwd = f32_mlp_bwd,
                .ce_linear_bwd = f32_ce_linear_bwd,
                .attention_ok = f32_attention_ok,
                .attention_fwd = f32_attention_fwd,
                .attention_bwd = f32_attention_bwd,
                .attention_linear_bwd = f32_attention_linear_bwd,
                .attention_doc_fwd = f32_attention_doc_fwd,
                .attention_doc_bwd = f32_attention_doc_bwd,
            },
        .destroy = f32_destroy,
    };
    return &st->b;
}
