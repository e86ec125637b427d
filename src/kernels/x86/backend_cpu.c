/*
 * backend_cpu.c — the cpu backend (kernels.h's kern_backend): today's
 * oneDNN / AVX-512 / AVX512_BF16 / AMX kernels behind the backend vtable.
 *
 * The backend lives in the state of its mixed-precision GEMM (bf16_ops.c:
 * the weight cache keyed by weight, the product kernel chosen by CPUID or
 * by kiln_bf16_kernel, the scratch): a kern_weight is a cache entry, a
 * kern_act is a packed-A bf16 operand (bf16.h: rows and columns padded to
 * 32, so act_bytes(rows, cols) = 2 * rup32(rows) * rup32(cols)), and every
 * op below is the call the bf16 model made directly before the seam, with
 * the same arguments: the numbers are the same to the bit and nothing is
 * copied or repacked more than before.
 */
#include "kernels/kernels.h"

#include "base/base.h"
#include "kernels/x86/bf16.h"
#include "kernels/x86/bf16_ops.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static size_t rup32(size_t x)
{
    return (x + 31) / 32 * 32;
}

static mp_backend kern_of(const kern_backend *b)
{
    return mp_kern_backend(b->gemm);
}
static mp_scratch *scratch_of(const kern_backend *b)
{
    return mp_kern_scratch(b->gemm);
}
static const mp_weight *cur(kern_backend *b, kern_weight *w, bool bwd)
{
    return mp_kern_weight_current(b, w, bwd);
}

/* ---- the mixed-precision ops ------------------------------------------- */

static size_t cpu_act_bytes(const kern_backend *b, int rows, int cols)
{
    (void)b;
    return 2 * rup32((size_t)rows) * rup32((size_t)cols);
}

static void cpu_act_pack(const kern_backend *b, kern_act *dst, const float *x, int rows, int cols)
{
    (void)b;
    mp_pack_a(KILN_DTYPE_BF16, false, rows, cols, x, cols, (uint16_t *)dst);
}

static void cpu_act_unpack(const kern_backend *b, float *x, const kern_act *src, int rows, int cols)
{
    (void)b;
    mp_unpack_a(x, cols, (const uint16_t *)src, rows, cols);
}

static void cpu_to_rows(const kern_backend *b, void *dst, const float *x, size_t n)
{
    (void)b;
    mp_f32_to_bf16(x, dst, n);
}

static void cpu_from_rows(const kern_backend *b, float *dst, const void *x, size_t n)
{
    (void)b;
    mp_bf16_to_f32(x, dst, n);
}

static void cpu_norm_fwd(const kern_backend *b, kern_act *outp, float *mean, float *rstd,
                         const float *inp, const float *w, const float *bias, int N, int C,
                         float eps, bool rms)
{
    (void)b;
    kern_fast_norm_fwd_packed((uint16_t *)outp, mean, rstd, inp, w, bias, N, C, eps, rms);
}

static bool cpu_linear_fwd(kern_backend *b, const kern_out *o, const kern_act *x, kern_weight *w,
                           const float *bias, int N)
{
    const mp_weight *pw = cur(b, w, false);
    const uint16_t *xa = (const uint16_t *)x;
    int OC = pw->OC, C = pw->C;
    mp_epi e = {.M = N, .N = OC};
    switch (o->kind) {
    case KERN_OUT_F32:
        mp_gemm_packed(kern_of(b), KILN_DTYPE_BF16, N, OC, C, xa, pw->fwd, o->y, OC, false, bias);
        return true;
    case KERN_OUT_RES:
        e.kind = MP_EPI_RES;
        e.out = o->y;
        e.res = o->res;
        break;
    case KERN_OUT_ROWS:
        e.kind = MP_EPI_ROWS;
        e.xp = o->rows;
        break;
    case KERN_OUT_GELU:
        e.kind = MP_EPI_ACT;
        e.act = MP_ACT_GELU;
        e.xp = (uint16_t *)o->hp;
        e.ap = (uint16_t *)o->ap;
        break;
    }
    return mp_gemm_packed_epi(kern_of(b), scratch_of(b), N, OC, C, xa, pw->fwd, bias, &e);
}

static void cpu_act_fwd(const kern_backend *b, kern_act *hp, kern_act *ap, const float *h, int N,
                        int F, int act)
{
    (void)b;
    mp_act_pack((uint16_t *)hp, (uint16_t *)ap, h, N, F, act);
}

static void cpu_act_bwd(const kern_backend *b, float *dh, const kern_act *hp, const float *dout,
                        int N, int F, int act)
{
    (void)b;
    mp_act_bwd(dh, (const uint16_t *)hp, dout, N, F, act);
}

static bool cpu_linear_bwd(kern_backend *b, kern_weight *w, const float *dy, const kern_act *x,
                           int act, int N, float *dW, bool dw_acc, float *db, float *dx)
{
    return mp_linear_backward_packed(kern_of(b), scratch_of(b), cur(b, w, true), dy,
                                     (const uint16_t *)x, act, N, dW, dw_acc, db, dx);
}

static bool cpu_mlp_bwd(kern_backend *b, kern_weight *w1, kern_weight *w2, const float *dy,
                        const kern_act *x, const kern_act *h, int act, int N, float *dW1,
                        float *db1, float *dW2, float *db2, float *dx, bool dw_acc)
{
    const mp_weight *p1 = cur(b, w1, true), *p2 = cur(b, w2, true);
    return mp_mlp_backward_packed(kern_of(b), scratch_of(b), p1, p2, dy, (const uint16_t *)x,
                                  (const uint16_t *)h, act, N, dW1, db1, dW2, db2, dx, dw_acc);
}

static bool cpu_ce_linear_bwd(kern_backend *b, kern_weight *w, float *logits,
                              const int32_t *targets, const float *mask, int N, int V,
                              float grad_scale, double *loss_sum, double *weight_sum,
                              const kern_act *x, float *dW, bool dw_acc, float *dx)
{
    const mp_weight *pw = cur(b, w, true);
    uint16_t *pa, *pt;
    float *part;
    if (!mp_scratch_dy(scratch_of(b), N, V, false, &pa, &pt, &part)) return false;
    kern_fast_ce_packed(pa, pt, mp_dy_tok(pw, MP_ACT_NONE), logits, targets, mask, N, V, grad_scale,
                        loss_sum, weight_sum);
    return mp_linear_backward_prepacked(kern_of(b), scratch_of(b), pw, pa, pt, (const uint16_t *)x,
                                        MP_ACT_NONE, N, dW, dw_acc, dx);
}

static bool cpu_attention_ok(const kern_backend *b, int HS, int T)
{
    return kern_of(b) == MP_BACKEND_AMX && mp_attention_amx_ok(HS, T);
}

static void cpu_attention_fwd(const kern_backend *b, kern_act *outp, float *lse,
                              const void *qkvh, int B, int T, int NH, int KVH, int HS)
{
    (void)b;
    mp_attention_fwd_amx_packed((uint16_t *)outp, lse, qkvh, B, T, NH, KVH, HS);
}

static void cpu_attention_bwd(const kern_backend *b, float *dqkv, const float *dout,
                              const void *qkvh, const kern_act *outp, const float *lse, int B,
                              int T, int NH, int KVH, int HS)
{
    (void)b;
    mp_attention_bwd_amx_packed(dqkv, NULL, dout, qkvh, (const uint16_t *)outp, lse, B, T, NH, KVH,
                                HS);
}

/* Packed rows: the AMX attention by document (kern_attention_doc_fwd_by)
 * on the bf16 rows, out as fp32 rows (the model packs them). */
static void amx_doc_fwd(const void *ud, float *out, float *lse, const void *qkv, int T, int NH,
                        int KVH, int HS)
{
    (void)ud;
    mp_attention_fwd_amx(out, lse, qkv, 1, T, NH, KVH, HS);
}

static void amx_doc_bwd(const void *ud, float *dqkv, const float *dout, const void *qkv,
                        const float *out, const float *lse, int T, int NH, int KVH, int HS)
{
    (void)ud;
    mp_attention_bwd_amx(dqkv, dout, qkv, out, lse, 1, T, NH, KVH, HS);
}

static void cpu_attention_doc_fwd(const kern_backend *b, float *out, float *lse, const void *qkvh,
                                  const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                                  float *scratch)
{
    (void)b;
    kern_attention_doc_fwd_by(amx_doc_fwd, NULL, out, lse, qkvh,
                              (size_t)(NH + 2 * KVH) * HS * sizeof(uint16_t), pos, B, T, NH, KVH,
                              HS, scratch);
}

static void cpu_attention_doc_bwd(const kern_backend *b, float *dqkv, const float *dout,
                                  const void *qkvh, const float *out, const float *lse,
                                  const int32_t *pos, int B, int T, int NH, int KVH, int HS,
                                  float *scratch)
{
    (void)b;
    kern_attention_doc_bwd_by(amx_doc_bwd, NULL, dqkv, dout, qkvh,
                              (size_t)(NH + 2 * KVH) * HS * sizeof(uint16_t), out, lse, pos, B, T,
                              NH, KVH, HS, scratch);
}

/* With T a multiple of 32 the gradient of qkv goes from the attention's
 * accumulators straight into the packed forms (and bias sums) the qkv
 * layer's backward reads, never as fp32 rows; else through dqkv. */
static bool cpu_attention_linear_bwd(kern_backend *b, kern_weight *w, float *dqkv,
                                     const float *dout, const void *qkvh, const kern_act *outp,
                                     const float *lse, int B, int T, int NH, int KVH, int HS,
                                     const kern_act *x, float *dW, bool dw_acc, float *db,
                                     float *dx)
{
    int n = B * T, QKV = (NH + 2 * KVH) * HS;
    if (T % 32) {
        cpu_attention_bwd(b, dqkv, dout, qkvh, outp, lse, B, T, NH, KVH, HS);
        return cpu_linear_bwd(b, w, dqkv, x, KERN_ACT_NONE, n, dW, dw_acc, db, dx);
    }
    const mp_weight *pw = cur(b, w, true);
    mp_dy_out o = {.tok = mp_dy_tok(pw, MP_ACT_NONE), .np = n, .op = QKV};
    if (!mp_scratch_dy(scratch_of(b), n, QKV, db != NULL, &o.pa, &o.pt, &o.part)) return false;
    mp_attention_bwd_amx_packed(NULL, &o, dout, qkvh, (const uint16_t *)outp, lse, B, T, NH, KVH,
                                HS);
    if (db) mp_pack_dy_bias(db, o.part, n, QKV);
    return mp_linear_backward_prepacked(kern_of(b), scratch_of(b), pw, o.pa, o.pt,
                                        (const uint16_t *)x, MP_ACT_NONE, n, dW, dw_acc, dx);
}

/* ---- the backend ------------------------------------------------------- */

static void cpu_destroy(kern_backend *b)
{
    kern_gemm_free(b->gemm); /* b lives in the GEMM's state */
}

static mp_backend to_mp(kiln_bf16_kernel k)
{
    switch (k) {
    case KILN_BF16_KERNEL_REF:
        return MP_BACKEND_REF;
    case KILN_BF16_KERNEL_AVX512:
        return MP_BACKEND_AVX512;
    case KILN_BF16_KERNEL_AMX:
        return MP_BACKEND_AMX;
    case KILN_BF16_KERNEL_AUTO:
        break;
    }
    return MP_BACKEND_AUTO;
}

kern_backend *kern_backend_cpu_new(kiln_dtype dt, kiln_bf16_kernel k)
{
    if (dt != KILN_DTYPE_BF16 && dt != KILN_DTYPE_F16) return NULL;
    kern_gemm *g = mp_kern_gemm_new(dt, to_mp(k));
    if (!g) return NULL;
    kern_backend *b = mp_kern_backend_of(g);
    *b = (kern_backend){
        .name = "cpu",
        .kernel = mp_backend_name(mp_kern_backend(g)),
        .dtype = dt,
        .state = g,
        .ops = mp_kern_ops(g),
        .gemm = g,
        .buf_alloc = kern_host_buf_alloc,
        .buf_free = kern_host_buf_free,
        .buf_set = kern_host_buf_set,
        .buf_get = kern_host_buf_get,
        .destroy = cpu_destroy,
    };
    mp_kern_backend_weights(b);
    if (dt == KILN_DTYPE_BF16)
        b->mp = (kern_mp_ops){
            .row_size = 2,
            .act_bytes = cpu_act_bytes,
            .act_pack = cpu_act_pack,
            .act_unpack = cpu_act_unpack,
            .to_rows = cpu_to_rows,
            .from_rows = cpu_from_rows,
            .norm_fwd = cpu_norm_fwd,
            .linear_fwd = cpu_linear_fwd,
            .act_fwd = cpu_act_fwd,
            .act_bwd = cpu_act_bwd,
            .linear_bwd = cpu_linear_bwd,
            .mlp_bwd = cpu_mlp_bwd,
            .ce_linear_bwd = cpu_ce_linear_bwd,
            .attention_ok = cpu_attention_ok,
            .attention_fwd = cpu_attention_fwd,
            .attention_bwd = cpu_attention_bwd,
            .attention_linear_bwd = cpu_attention_linear_bwd,
            .attention_doc_fwd = cpu_attention_doc_fwd,
            .attention_doc_bwd = cpu_attention_doc_bwd,
        };
    return b;
}

kiln_bf16_kernel kern_backend_kernel(const kern_backend *b)
{
    if (!b || strcmp(b->name, "cpu") != 0) return KILN_BF16_KERNEL_AUTO;
    switch (mp_kern_backend(b->gemm)) {
    case MP_BACKEND_REF:
        return KILN_BF16_KERNEL_REF;
    case MP_BACKEND_AVX512:
        return KILN_BF16_KERNEL_AVX512;
    case MP_BACKEND_AMX:
        return KILN_BF16_KERNEL_AMX;
    case MP_BACKEND_AUTO:
        break;
    }
    return KILN_BF16_KERNEL_AUTO;
}

/* ---- the CPU ------------------------------------------------------------ */

bool kern_cpu_bf16(void)
{
    const mp_caps *c = mp_cpu_caps();
    return c->amx_usable || c->avx512_bf16;
}

void kern_cpu_describe(char *buf, size_t cap)
{
    const mp_caps *c = mp_cpu_caps();
    snprintf(buf, cap, "cpu: amx_bf16=%s avx512_bf16=%s f16c=%s; bf16/fp16 products on %s",
             c->amx_bf16 ? (c->amx_usable ? "yes" : "yes (kernel refused tile state)") : "no",
             c->avx512_bf16 ? "yes" : "no", c->f16c ? "yes" : "no",
             mp_backend_name(mp_backend_best()));
}
