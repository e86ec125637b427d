/*
 * backend_ref.c — the ref backend (kernels.h's kern_backend): portable C,
 * one thread, written to be obviously right rather than fast: the oracle
 * tests/test_backend_ops.c compares every other backend with.
 *
 * Its layouts are the plainest there are: a kern_act of (rows, cols) is
 * bf16 row-major, 2 * rows * cols bytes, no padding; a kern_weight is the
 * fp32 weight itself (the handle remembers where it lies and its layout),
 * rounded to bf16 each time a product reads it, so it is current by
 * construction and weight_refresh has nothing to convert. The products
 * take bf16-rounded operands (f32_to_bf16, the library's one rounding)
 * and accumulate in double: the exact sum of the rounded operands up to
 * one final rounding, which every fp32-accumulating backend approximates.
 * fp32 parts (norms, softmax, cross-entropy, activations) are
 * kern_ops_ref's.
 */
#include "kernels/kernels.h"

#include "base/base.h"

#include <stdlib.h>
#include <string.h>

typedef struct ref_weight {
    const float *w;
    int OC, C;
    bool io; /* stored (C, OC) */
} ref_weight;

typedef struct ref_state {
    kern_backend b;
    ref_weight **w; /* one allocation each: handles stay put */
    int n, cap;
} ref_state;

static float rb(float x)
{
    return bf16_to_f32(f32_to_bf16(x));
}

/* W'(k, o) of y = x W': the weight as the product's right operand. */
static float wt(const ref_weight *w, int k, int o)
{
    return w->io ? w->w[(size_t)k * w->OC + o] : w->w[(size_t)o * w->C + k];
}

/* ---- weights ------------------------------------------------------------ */

static kern_weight *ref_weight_prepare(kern_backend *b, const float *w, int OC, int C,
                                       kern_wlayout lay)
{
    ref_state *st = b->state;
    bool io = lay == KERN_W_IN_OUT;
    for (int i = 0; i < st->n; i++)
        if (st->w[i]->w == w && st->w[i]->OC == OC && st->w[i]->C == C && st->w[i]->io == io)
            return (kern_weight *)st->w[i];
    if (st->n == st->cap) {
        int cap = st->cap ? 2 * st->cap : 16;
        ref_weight **n = realloc(st->w, sizeof *n * (size_t)cap);
        if (!n) return NULL;
        st->w = n;
        st->cap = cap;
    }
    ref_weight *e = malloc(sizeof *e);
    if (!e) return NULL;
    *e = (ref_weight){w, OC, C, io};
    st->w[st->n++] = e;
    return (kern_weight *)e;
}

/* No copies to refresh: the products read the fp32 weight itself. */
static int ref_weight_refresh_rows(const kern_backend *b, const kern_weight *w)
{
    (void)b, (void)w;
    return 0;
}

static void ref_weight_refresh(kern_backend *b, kern_weight *w, int r0)
{
    (void)b, (void)w, (void)r0;
    KILN_ASSERT(!"ref has no strip refresh (weight_refresh_rows is 0)");
}

/* The ref backend reads the fp32 weight itself: nothing to keep. */
static void ref_weight_keep(kern_backend *b, kern_weight *w)
{
    (void)b, (void)w;
}

static void ref_weight_fresh(kern_backend *b, kern_weight *w)
{
    (void)b, (void)w;
}

/* ---- the mixed-precision ops -------------------------------------------- */

static size_t ref_act_bytes(const kern_backend *b, int rows, int cols)
{
    (void)b;
    return 2 * (size_t)rows * (size_t)cols;
}

static void ref_to_rows(const kern_backend *b, void *dst_, const float *x, size_t n)
{
    uint16_t *dst = dst_;
    (void)b;
    for (size_t i = 0; i < n; i++)
        dst[i] = f32_to_bf16(x[i]);
}

static void ref_from_rows(const kern_backend *b, float *dst, const void *x_, size_t n)
{
    const uint16_t *x = x_;
    (void)b;
    for (size_t i = 0; i < n; i++)
        dst[i] = bf16_to_f32(x[i]);
}

static void ref_act_pack(const kern_backend *b, kern_act *dst, const float *x, int rows, int cols)
{
    ref_to_rows(b, (uint16_t *)dst, x, (size_t)rows * cols);
}

static void ref_act_unpack(const kern_backend *b, float *x, const kern_act *src, int rows, int cols)
{
    ref_from_rows(b, x, (const uint16_t *)src, (size_t)rows * cols);
}

static void ref_norm_fwd(const kern_backend *b, kern_act *outp, float *mean, float *rstd,
                         const float *inp, const float *w, const float *bias, int N, int C,
                         float eps, bool rms)
{
    const kern_ops *k = kern_ops_ref();
    float *out = malloc((size_t)N * C * sizeof *out);
    KILN_ASSERT(out); /* void op: the oracle runs on test sizes */
    if (rms)
        k->rmsnorm_fwd(out, rstd, inp, w, N, C, eps);
    else
        k->layernorm_fwd(out, mean, rstd, inp, w, bias, N, C, eps);
    ref_act_pack(b, outp, out, N, C);
    free(out);
}

/* a (N, F) = bf16(act(x)) from x (N, F) (N, 2F for SwiGLU), fp32. */
static void apply_act(float *a, const float *x, int N, int F, int act)
{
    const kern_ops *k = kern_ops_ref();
    size_t n = (size_t)N * F;
    if (act == KERN_ACT_NONE)
        memcpy(a, x, n * sizeof *a);
    else if (act == KERN_ACT_GELU)
        k->gelu_fwd(a, x, n);
    else
        k->swiglu_fwd(a, x, N, F);
    if (act != KERN_ACT_NONE)
        for (size_t i = 0; i < n; i++)
            a[i] = rb(a[i]);
}

static bool ref_linear_fwd(kern_backend *b, const kern_out *o, const kern_act *x, kern_weight *w,
                           const float *bias, int N)
{
    (void)b;
    const ref_weight *rw = (const ref_weight *)w;
    const uint16_t *xa = (const uint16_t *)x;
    int OC = rw->OC, C = rw->C;
    for (int n = 0; n < N; n++)
        for (int j = 0; j < OC; j++) {
            double acc = 0;
            for (int k = 0; k < C; k++)
                acc += (double)bf16_to_f32(xa[(size_t)n * C + k]) * rb(wt(rw, k, j));
            float v = (float)acc + (bias ? bias[j] : 0.0f);
            size_t i = (size_t)n * OC + j;
            switch (o->kind) {
            case KERN_OUT_F32:
                o->y[i] = v;
                break;
            case KERN_OUT_RES:
                o->y[i] = o->res[i] + v;
                break;
            case KERN_OUT_ROWS:
                ((uint16_t *)o->rows)[i] = f32_to_bf16(v);
                break;
            case KERN_OUT_GELU: {
                float h = rb(v), a;
                kern_ops_ref()->gelu_fwd(&a, &h, 1);
                ((uint16_t *)o->hp)[i] = f32_to_bf16(h);
                ((uint16_t *)o->ap)[i] = f32_to_bf16(a);
                break;
            }
            }
        }
    return true;
}

static void ref_act_fwd(const kern_backend *b, kern_act *hp, kern_act *ap, const float *h, int N,
                        int F, int act)
{
    int FH = act == KERN_ACT_SWIGLU ? 2 * F : F;
    float *x = malloc((size_t)N * FH * sizeof *x), *a = malloc((size_t)N * F * sizeof *a);
    KILN_ASSERT(x && a);
    ref_act_pack(b, hp, h, N, FH);
    ref_act_unpack(b, x, hp, N, FH);
    apply_act(a, x, N, F, act);
    ref_act_pack(b, ap, a, N, F);
    free(x);
    free(a);
}

static void ref_act_bwd(const kern_backend *b, float *dh, const kern_act *hp, const float *dout,
                        int N, int F, int act)
{
    const kern_ops *k = kern_ops_ref();
    int FH = act == KERN_ACT_SWIGLU ? 2 * F : F;
    float *x = malloc((size_t)N * FH * sizeof *x);
    KILN_ASSERT(x);
    ref_act_unpack(b, x, hp, N, FH);
    if (act == KERN_ACT_GELU)
        k->gelu_bwd(dh, x, dout, (size_t)N * F);
    else if (act == KERN_ACT_SWIGLU)
        k->swiglu_bwd(dh, x, dout, N, F);
    else
        memcpy(dh, dout, (size_t)N * F * sizeof *dh);
    free(x);
}

static bool ref_linear_bwd(kern_backend *b, kern_weight *w, const float *dy, const kern_act *x,
                           int act, int N, float *dW, bool dw_acc, float *db, float *dx)
{
    const ref_weight *rw = (const ref_weight *)w;
    int OC = rw->OC, C = rw->C, CX = act == KERN_ACT_SWIGLU ? 2 * C : C;
    float *xf = malloc((size_t)N * CX * sizeof *xf), *a = malloc((size_t)N * C * sizeof *a);
    if (!xf || !a) {
        free(xf), free(a);
        return false;
    }
    ref_act_unpack(b, xf, x, N, CX);
    apply_act(a, xf, N, C, act);
    for (int j = 0; j < OC; j++) {
        for (int c = 0; c < C; c++) { /* dW' (c, j) = sum_n a(n, c) dy(n, j) */
            double acc = 0;
            for (int n = 0; n < N; n++)
                acc += (double)a[(size_t)n * C + c] * rb(dy[(size_t)n * OC + j]);
            float *d = rw->io ? &dW[(size_t)c * OC + j] : &dW[(size_t)j * C + c];
            *d = (dw_acc ? *d : 0.0f) + (float)acc;
        }
        if (db) {
            double s = 0;
            for (int n = 0; n < N; n++)
                s += dy[(size_t)n * OC + j];
            db[j] += (float)s;
        }
    }
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) { /* dx (n, c) = sum_j dy(n, j) W'(c, j) */
            double acc = 0;
            for (int j = 0; j < OC; j++)
                acc += (double)rb(dy[(size_t)n * OC + j]) * rb(wt(rw, c, j));
            dx[(size_t)n * C + c] = (float)acc;
        }
    free(xf);
    free(a);
    return true;
}

static bool ref_mlp_bwd(kern_backend *b, kern_weight *w1, kern_weight *w2, const float *dy,
                        const kern_act *x, const kern_act *h, int act, int N, float *dW1,
                        float *db1, float *dW2, float *db2, float *dx, bool dw_acc)
{
    int F = ((const ref_weight *)w2)->C;
    float *da = malloc((size_t)N * F * sizeof *da), *dh = malloc((size_t)N * F * sizeof *dh);
    bool ok = da && dh && ref_linear_bwd(b, w2, dy, h, act, N, dW2, dw_acc, db2, da);
    if (ok) {
        ref_act_bwd(b, dh, h, da, N, F, act);
        ok = ref_linear_bwd(b, w1, dh, x, KERN_ACT_NONE, N, dW1, dw_acc, db1, dx);
    }
    free(da);
    free(dh);
    return ok;
}

static bool ref_ce_linear_bwd(kern_backend *b, kern_weight *w, float *logits,
                              const int32_t *targets, const float *mask, int N, int V,
                              float grad_scale, double *loss_sum, double *weight_sum,
                              const kern_act *x, float *dW, bool dw_acc, float *dx)
{
    float *dl = malloc((size_t)N * V * sizeof *dl);
    if (!dl) return false;
    kern_ops_ref()->cross_entropy(logits, targets, mask, N, V, grad_scale, dl, loss_sum,
                                  weight_sum);
    bool ok = ref_linear_bwd(b, w, dl, x, KERN_ACT_NONE, N, dW, dw_acc, NULL, dx);
    free(dl);
    return ok;
}

static bool ref_attention_ok(const kern_backend *b, int HS, int T)
{
    (void)b;
    return HS > 0 && T > 0;
}

static void ref_attention_fwd(const kern_backend *b, kern_act *outp, float *lse,
                              const void *qkvh, int B, int T, int NH, int KVH, int HS)
{
    size_t n = (size_t)B * T, QKV = (size_t)(NH + 2 * KVH) * HS;
    float *qkv = malloc(n * QKV * sizeof *qkv), *out = malloc(n * NH * HS * sizeof *out);
    KILN_ASSERT(qkv && out);
    ref_from_rows(b, qkv, qkvh, n * QKV);
    kern_ops_ref()->attention_fwd(kern_gemm_ref(), out, lse, qkv, B, T, NH, KVH, HS);
    ref_act_pack(b, outp, out, (int)n, NH * HS);
    free(qkv);
    free(out);
}

static void ref_attention_bwd(const kern_backend *b, float *dqkv, const float *dout,
                              const void *qkvh, const kern_act *outp, const float *lse, int B,
                              int T, int NH, int KVH, int HS)
{
    size_t n = (size_t)B * T, QKV = (size_t)(NH + 2 * KVH) * HS;
    float *qkv = malloc(n * QKV * sizeof *qkv), *out = malloc(n * NH * HS * sizeof *out);
    KILN_ASSERT(qkv && out);
    ref_from_rows(b, qkv, qkvh, n * QKV);
    ref_act_unpack(b, out, outp, (int)n, NH * HS);
    kern_ops_ref()->attention_bwd(kern_gemm_ref(), dqkv, dout, qkv, out, lse, B, T, NH, KVH, HS);
    free(qkv);
    free(out);
}

static bool ref_attention_linear_bwd(kern_backend *b, kern_weight *w, float *dqkv,
                                     const float *dout, const void *qkvh, const kern_act *outp,
                                     const float *lse, int B, int T, int NH, int KVH, int HS,
                                     const kern_act *x, float *dW, bool dw_acc, float *db,
                                     float *dx)
{
    ref_attention_bwd(b, dqkv, dout, qkvh, outp, lse, B, T, NH, KVH, HS);
    return ref_linear_bwd(b, w, dqkv, x, KERN_ACT_NONE, B * T, dW, dw_acc, db, dx);
}

/* ---- the backend --------------------------------------------------------- */

static void ref_destroy(kern_backend *b)
{
    ref_state *st = b->state;
    for (int i = 0; i < st->n; i++)
        free(st->w[i]);
    free(st->w);
    free(st);
}

kern_backend *kern_backend_ref_new(kiln_dtype dt)
{
    if (dt != KILN_DTYPE_BF16) return NULL;
    ref_state *st = calloc(1, sizeof *st);
    if (!st) return NULL;
    st->b = (kern_backend){
        .name = "ref",
        .kernel = "ref",
        .dtype = dt,
        .state = st,
        .ops = kern_ops_ref(),
        .gemm = kern_gemm_ref(),
        .buf_alloc = kern_host_buf_alloc,
        .buf_free = kern_host_buf_free,
        .buf_set = kern_host_buf_set,
        .buf_get = kern_host_buf_get,
        .weight_prepare = ref_weight_prepare,
        .weight_refresh_rows = ref_weight_refresh_rows,
        .weight_refresh = ref_weight_refresh,
        .weight_fresh = ref_weight_fresh,
        .weight_keep = ref_weight_keep,
        .mp =
            {
                .row_size = 2,
                .act_bytes = ref_act_bytes,
                .act_pack = ref_act_pack,
                .act_unpack = ref_act_unpack,
                .to_rows = ref_to_rows,
                .from_rows = ref_from_rows,
                .norm_fwd = ref_norm_fwd,
                .linear_fwd = ref_linear_fwd,
                .act_fwd = ref_act_fwd,
                .act_bwd = ref_act_bwd,
                .linear_bwd = ref_linear_bwd,
                .mlp_bwd = ref_mlp_bwd,
                .ce_linear_bwd = ref_ce_linear_bwd,
                .attention_ok = ref_attention_ok,
                .attention_fwd = ref_attention_fwd,
                .attention_bwd = ref_attention_bwd,
                .attention_linear_bwd = ref_attention_linear_bwd,
            },
        .destroy = ref_destroy,
    };
    return &st->b;
}
