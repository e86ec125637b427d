/*
 * test_backend_ops.c — every op of every backend against the ref backend,
 * in one loop (ggml's test-backend-ops): backends {ref, cpu with the AMX,
 * AVX512_BF16 and portable product kernels, in bf16 and in fp16; the f32
 * backend over the fast table, against the f32 backend over the ref
 * table: the oracle of each backend is ref in its compute dtype} x ops
 * {buffers, the fp32 op table's linear layers, the inference ops (the
 * typed linear on fp32, bf16 and the Q types at decode and prefill sizes,
 * rope_at, attention_kv), the weight refresh, and every kern_mp_ops entry
 * (bf16 and f32 backends: fp16 has none, which the op table's case
 * checks)}. The bf16 bounds below hold for the f32 backend a fortiori
 * (its operands are not rounded; its outputs are fp32).
 * Each (backend, op) pair prints one PASS / FAIL / SKIP line; a kernel
 * this CPU lacks is a SKIP. Inputs live in the backend's buffers
 * (buf_alloc / buf_set / buf_get), as a device backend needs.
 *
 * Tolerances are derived element by element, never picked. With
 * u = 2^-24 (fp32 unit roundoff) and ub = 2^-8 (bf16's), both backends
 * round the same operands to bf16 with the same function, so a product
 * differs only by fp32 accumulation (the ref accumulates in double):
 *   |got - ref| <= (K + 2) u * M,  M = sum_k |a_k| |b_k| (+ |bias|)
 * (gamma_K for any summation order, one rounding for the bias add, one
 * for the reference's final rounding). M is computed by the ref backend
 * itself on |inputs|. An output rounded to bf16 after an error e may land
 * one bf16 step away: |got - ref| <= 1.01 e + ub (|got| + |ref|). Errors
 * that feed a later product (a bf16 activation, the gradient of the
 * pre-activation, of the logits, of qkv) are propagated the same way: the
 * ref backend's product on |error| and |operand| (times 1 + 2^-7 for its
 * bf16 rounding of the error). Function evaluations differ between the
 * backends' implementations (vector exp / tanh / reciprocal, ~2 ulp each)
 * by at most 8 u |x| for GELU and SiLU * up (8 u |g u|), 32 u (1 + |x| +
 * |x|^3) |dout| for GELU', and 16 u |dout| (1 + |g|) (1 + |up|) for the
 * SwiGLU backward (the terms of each formula times their rounding steps).
 * Attention: the bound of test_attn_amx.c (2 ub M + 1e-5 max |ref|, M the
 * magnitude sums of attn_naive.h; the AMX kernels round P, dS and dout to
 * bf16 where the ref does not). Layout-only ops (pack, rows, buffers, the
 * weight refresh) must match bit for bit. The largest error / bound seen
 * is printed per backend.
 *
 * Over 800 lines on purpose: one table of op cases and one loop, as in
 * ggml's test-backend-ops; the cases share the bound helpers above them,
 * and a new op adds its case here, next to the others.
 */
#include "attn_naive.h"
#include "base/base.h"
#include "check.h"
#include "kernels/kernels.h"
#include "kiln.h"

#include <stdlib.h>
#include <string.h>

#define U32 (1.0 / 16777216.0)
#define UB (1.0 / 256.0)

static kiln_rng rng;
static double worst; /* max error / bound of the current backend */

static float *rnd(size_t n, float scale)
{
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = scale * kiln_rng_normal(&rng);
    return p;
}

static float *absv(const float *x, size_t n)
{
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = fabsf(x[i]);
    return p;
}

static double maxabs(const float *x, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++)
        m = fmax(m, fabs(x[i]));
    return m;
}

static float *zeros(size_t n)
{
    return calloc(n, sizeof(float));
}
static double *dzeros(size_t n)
{
    return calloc(n, sizeof(double));
}
static float rbf(float x)
{
    return bf16_to_f32(f32_to_bf16(x));
}

/* ---- buffers of a backend ---------------------------------------------- */

static void *up(kern_backend *b, const void *x, size_t bytes)
{
    void *p = b->buf_alloc(b, bytes);
    KILN_ASSERT(p);
    b->buf_set(b, p, 0, x, bytes);
    return p;
}

static float *down(kern_backend *b, const void *buf, size_t n)
{
    float *h = malloc(n * sizeof *h);
    b->buf_get(b, buf, 0, h, n * sizeof *h);
    return h;
}

/* A kern_act of b holding bf16(x) (rows, cols). */
static kern_act *act_of(kern_backend *b, const float *x, int rows, int cols)
{
    kern_act *a = b->buf_alloc(b, b->mp.act_bytes(b, rows, cols));
    float *xd = up(b, x, (size_t)rows * cols * sizeof *x);
    KILN_ASSERT(a);
    b->mp.act_pack(b, a, xd, rows, cols);
    b->buf_free(b, xd);
    return a;
}

/* The values of kern_act a of b, on the host. */
static float *act_host(kern_backend *b, const kern_act *a, int rows, int cols)
{
    size_t n = (size_t)rows * cols;
    float *xd = b->buf_alloc(b, n * sizeof(float));
    b->mp.act_unpack(b, xd, a, rows, cols);
    float *h = down(b, xd, n);
    b->buf_free(b, xd);
    return h;
}

/* A new weight epoch (what the model does at every forward). */
static void new_epoch(kern_backend *b)
{
    if (b->gemm->invalidate) b->gemm->invalidate(b->gemm);
}

/* The handle of weight W on b, in a new epoch: a weight's values may only
 * change between epochs (the test reuses addresses of freed weights). */
static kern_weight *prep(kern_backend *b, const float *W, int OC, int C, kern_wlayout lay)
{
    new_epoch(b);
    return b->weight_prepare(b, W, OC, C, lay);
}

/* ---- comparison ----------------------------------------------------------- */

/* |got - ref| <= tol element by element (tol NULL: bit for bit). */
static void within(const char *what, const float *got, const float *ref, const double *tol,
                   size_t n)
{
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]), t = tol ? tol[i] : 0;
        bool ok = tol ? e <= t : memcmp(&got[i], &ref[i], sizeof(float)) == 0;
        if (t > 0) worst = check_max(worst, e / t);
        if (!ok && !bad++) first = i;
    }
    CHECK_MSG(!bad, "%s: %zu of %zu outside the bound, first at %zu: got %.9g ref %.9g bound %g",
              what, bad, n, first, n ? (double)got[first] : 0, n ? (double)ref[first] : 0,
              n && tol ? tol[first] : 0);
}

/* tol[i] = 1.01 e[i] + ub (|got| + |ref|): after a bf16 rounding. */
static void after_bf16(double *tol, const double *e, const float *got, const float *ref, size_t n)
{
    for (size_t i = 0; i < n; i++)
        tol[i] = 1.01 * e[i] + UB * (fabs((double)got[i]) + fabs((double)ref[i]));
}

/* ---- the ref backend on magnitudes -------------------------------------------- */

static kern_backend *R; /* the oracle */

/* The ref backend's backward of a linear layer (OC, C) from |W| on dy
 * (N, OC) >= 0 and x (N, C) >= 0 (no activation): dx = dy |W|, dW =
 * dy^T x in W's layout, db = column sums of dy. The magnitude sums of
 * the products; scaled by 1 + 2^-7 for its bf16 rounding of dy and x. */
static void mag_bwd(const float *Wabs, int OC, int C, kern_wlayout lay, const float *dy,
                    const float *x, int N, float *dx, float *dW, float *db)
{
    kern_weight *w = prep(R, Wabs, OC, C, lay);
    kern_act *xa = act_of(R, x, N, C);
    float *dbz = db ? db : zeros((size_t)OC);
    if (db) memset(db, 0, (size_t)OC * sizeof *db);
    KILN_ASSERT(R->mp.linear_bwd(R, w, dy, xa, KERN_ACT_NONE, N, dW, false, dbz, dx));
    for (size_t i = 0; i < (size_t)N * C; i++)
        dx[i] *= 1 + 1.0f / 128;
    for (size_t i = 0; i < (size_t)OC * C; i++)
        dW[i] *= 1 + 1.0f / 128;
    if (!db) free(dbz);
    R->buf_free(R, xa);
}

/* ---- the ops ---------------------------------------------------------------- */

static void op_buffers(kern_backend *b)
{
    unsigned char src[1000], back[1000], part[50];
    for (int i = 0; i < 1000; i++)
        src[i] = (unsigned char)(i * 7 + 3);
    void *p = b->buf_alloc(b, sizeof src);
    CHECK(p != NULL);
    b->buf_set(b, p, 0, src, sizeof src);
    b->buf_set(b, p, 100, src, 50);
    b->buf_get(b, p, 0, back, sizeof back);
    b->buf_get(b, p, 100, part, sizeof part);
    CHECK(memcmp(back, src, 100) == 0 && memcmp(back + 100, src, 50) == 0 &&
          memcmp(back + 150, src + 150, 850) == 0 && memcmp(part, src, 50) == 0);
    b->buf_free(b, p);
    b->buf_free(b, NULL);
}

/* The fp32 op table: the backend's linear layers (bf16 products on the
 * cpu backend) against kern_ops_ref with the bound of rounding both
 * operands (2 ub + ub^2) plus the accumulation; the other entries must be
 * kern_ops_fast's or kern_ops_ref's (test_kernels.c compares those). */
static void op_table(kern_backend *b)
{
    const kern_ops *k = b->ops, *F = kern_ops_fast(), *Rf = kern_ops_ref();
#define SAME_AS(e) CHECK_MSG(k->e == F->e || k->e == Rf->e, "ops.%s is neither fast nor ref", #e)
    SAME_AS(embed_fwd);
    SAME_AS(embed_bwd);
    SAME_AS(layernorm_fwd);
    SAME_AS(layernorm_bwd);
    SAME_AS(rmsnorm_fwd);
    SAME_AS(rmsnorm_bwd);
    SAME_AS(gelu_fwd);
    SAME_AS(gelu_bwd);
    SAME_AS(swiglu_fwd);
    SAME_AS(swiglu_bwd);
    SAME_AS(rope);
    SAME_AS(linear);
    SAME_AS(rope_at);
    SAME_AS(attention_kv);
    SAME_AS(attention_fwd);
    SAME_AS(attention_bwd);
    SAME_AS(add);
    SAME_AS(cross_entropy);
#undef SAME_AS
    /* the activation ops: all offered with a bf16 or f32 compute dtype,
     * none with fp16 (its activations stay fp32: the model runs the f32
     * backend over its GEMM) */
    const void *const mp[] = {
        (const void *)b->mp.act_bytes,     (const void *)b->mp.act_pack,
        (const void *)b->mp.act_unpack,    (const void *)b->mp.to_rows,
        (const void *)b->mp.from_rows,     (const void *)b->mp.norm_fwd,
        (const void *)b->mp.linear_fwd,    (const void *)b->mp.act_fwd,
        (const void *)b->mp.act_bwd,       (const void *)b->mp.linear_bwd,
        (const void *)b->mp.mlp_bwd,       (const void *)b->mp.ce_linear_bwd,
        (const void *)b->mp.attention_ok,  (const void *)b->mp.attention_fwd,
        (const void *)b->mp.attention_bwd, (const void *)b->mp.attention_linear_bwd};
    for (size_t i = 0; i < sizeof mp / sizeof mp[0]; i++)
        CHECK_MSG((mp[i] != NULL) == (b->dtype != KILN_DTYPE_F16), "mp op %zu of a %s backend", i,
                  kiln_dtype_name(b->dtype));
    int N = 37, C = 48, OC = 80;
    /* both operands rounded: bf16 2 ub + ub^2; fp16 (uh = 2^-11) the
     * same with uh, plus the hi/lo split's dropped lo*lo term (2^-16
     * relative, bf16.h) over 3 K products, plus fp16's subnormal spacing
     * (2^-24, half of it per operand) times the other operand */
    bool f16 = b->dtype == KILN_DTYPE_F16 && k != Rf;
    double uh = 1.0 / 2048, rel = f16 ? 2 * uh + uh * uh + 1.0 / 65536 : 2 * UB + UB * UB;
    int kk = f16 ? 3 : 1;
    for (int lay = 0; lay < 2; lay++) {
        size_t nw = (size_t)C * OC, no = (size_t)N * OC, ni = (size_t)N * C;
        float *x = rnd(ni, 1), *w = rnd(nw, 0.2f), *bias = rnd((size_t)OC, 1);
        float *dout = rnd(no, 1), *y = zeros(no), *yr = zeros(no);
        k->matmul_fwd(b->gemm, y, x, w, bias, N, C, OC, (kern_wlayout)lay);
        Rf->matmul_fwd(kern_gemm_ref(), yr, x, w, bias, N, C, OC, (kern_wlayout)lay);
        float *xa = absv(x, ni), *wa = absv(w, nw), *ba = absv(bias, (size_t)OC), *m = zeros(no);
        Rf->matmul_fwd(kern_gemm_ref(), m, xa, wa, ba, N, C, OC, (kern_wlayout)lay);
        double *tol = dzeros(no);
        /* fp16 rounds an operand a to within uh |a| + 2^-25 (half the
         * subnormal spacing): the products then to within rel |a||b| +
         * 2^-25 (1 + uh) (|a| + |b|), summed over K */
        double mxx = maxabs(x, ni), mxw = maxabs(w, nw), mxd = maxabs(dout, no);
        double sub = f16 ? 0x1p-25 * (1 + uh) * C * (mxx + mxw) : 0;
        for (size_t i = 0; i < no; i++)
            tol[i] = (rel + (kk * C + 2) * U32) * m[i] + sub;
        within(lay ? "matmul_fwd in_out" : "matmul_fwd out_in", y, yr, tol, no);
        /* backward: dinp overwritten, dw and db accumulated */
        float *dx = zeros(ni), *dxr = zeros(ni), *dw = rnd(nw, 1), *dwr = malloc(nw * 4);
        float *db = rnd((size_t)OC, 1), *dbr = malloc((size_t)OC * 4);
        memcpy(dwr, dw, nw * 4);
        memcpy(dbr, db, (size_t)OC * 4);
        float *dw0 = absv(dw, nw);
        k->matmul_bwd(b->gemm, dx, dw, db, dout, x, w, N, C, OC, (kern_wlayout)lay, false);
        Rf->matmul_bwd(kern_gemm_ref(), dxr, dwr, dbr, dout, x, w, N, C, OC, (kern_wlayout)lay,
                       false);
        float *da = absv(dout, no), *mx = zeros(ni), *mw = zeros(nw), *mb = zeros((size_t)OC);
        Rf->matmul_bwd(kern_gemm_ref(), mx, mw, mb, da, xa, wa, N, C, OC, (kern_wlayout)lay, false);
        double *tx = dzeros(ni), *tw = dzeros(nw), *tb = dzeros((size_t)OC);
        double subx = f16 ? 0x1p-25 * (1 + uh) * OC * (mxd + mxw) : 0;
        double subw = f16 ? 0x1p-25 * (1 + uh) * N * (mxd + mxx) : 0;
        for (size_t i = 0; i < ni; i++)
            tx[i] = (rel + (kk * OC + 2) * U32) * mx[i] + subx;
        for (size_t i = 0; i < nw; i++)
            tw[i] = (rel + (kk * N + 2) * U32) * mw[i] + subw + U32 * (dw0[i] + mw[i] + subw);
        for (int i = 0; i < OC; i++)
            tb[i] = (N + 2) * U32 * (mb[i] + fabsf(dbr[i]));
        within("matmul_bwd dinp", dx, dxr, tx, ni);
        within("matmul_bwd dw", dw, dwr, tw, nw);
        within("matmul_bwd db", db, dbr, tb, (size_t)OC);
        free(x), free(w), free(bias), free(dout), free(y), free(yr), free(xa), free(wa), free(ba);
        free(m), free(tol), free(dx), free(dxr), free(dw), free(dwr), free(db), free(dbr);
        free(dw0), free(da), free(mx), free(mw), free(mb), free(tx), free(tw), free(tb);
    }
}

static void op_act_pack(kern_backend *b)
{
    const int shapes[][2] = {{37, 48}, {1, 5}, {64, 96}, {33, 70}};
    for (int s = 0; s < 4; s++) {
        int rows = shapes[s][0], cols = shapes[s][1];
        size_t n = (size_t)rows * cols;
        CHECK(b->mp.act_bytes(b, rows, cols) >= b->mp.row_size * n);
        float *x = rnd(n, 3);
        x[0] = 1.0f + 1.0f / 256; /* a tie: to even in bf16; exact in f32 */
        kern_act *a = act_of(b, x, rows, cols), *ar = act_of(R, x, rows, cols);
        float *got = act_host(b, a, rows, cols), *ref = act_host(R, ar, rows, cols);
        within("act_pack/unpack", got, ref, NULL, n);
        CHECK(ref[0] == (b->dtype == KILN_DTYPE_F32 ? x[0] : 1.0f));
        free(x), free(got), free(ref);
        b->buf_free(b, a);
        R->buf_free(R, ar);
    }
}

static void op_rows(kern_backend *b)
{
    size_t n = 1001;
    float *x = rnd(n, 10);
    x[1] = NAN;
    x[2] = 3.4e38f; /* rounds to inf */
    size_t rs = b->mp.row_size;
    CHECK(rs == R->mp.row_size && rs == (b->dtype == KILN_DTYPE_F32 ? 4u : 2u));
    void *h = malloc(n * rs), *hr = malloc(n * rs);
    float *xd = up(b, x, n * 4), *yd = b->buf_alloc(b, n * 4);
    void *hd = b->buf_alloc(b, n * rs);
    b->mp.to_rows(b, hd, xd, n);
    b->buf_get(b, hd, 0, h, n * rs);
    R->mp.to_rows(R, hr, x, n);
    CHECK(memcmp(h, hr, n * rs) == 0);
    b->mp.from_rows(b, yd, hd, n);
    float *y = down(b, yd, n), *yr = malloc(n * 4);
    R->mp.from_rows(R, yr, hr, n);
    within("from_rows", y, yr, NULL, n);
    free(x), free(h), free(hr), free(y), free(yr);
    b->buf_free(b, xd), b->buf_free(b, yd), b->buf_free(b, hd);
}

/* The norm: mean within (C + 2) u of the mean of |x|; rstd within the
 * variance's rounding, (C + 4) u relative times its conditioning
 * sum x^2 / sum (x - mean)^2, halved by the square root, plus 3 u; the
 * output (x - mean) rstd w + b from those, then rounded to bf16. */
static void op_norm_fwd(kern_backend *b)
{
    int N = 37, C = 80;
    for (int rms = 0; rms < 2; rms++) {
        size_t n = (size_t)N * C;
        float *x = rnd(n, 2), *w = rnd((size_t)C, 1), *bias = rms ? NULL : rnd((size_t)C, 1);
        for (size_t i = 0; i < n; i++)
            x[i] += 0.5f;
        float *mean = zeros((size_t)N), *rstd = zeros((size_t)N);
        float *meanr = zeros((size_t)N), *rstdr = zeros((size_t)N);
        kern_act *o = b->buf_alloc(b, b->mp.act_bytes(b, N, C));
        kern_act *orr = R->buf_alloc(R, R->mp.act_bytes(R, N, C));
        b->mp.norm_fwd(b, o, mean, rstd, x, w, bias, N, C, 1e-5f, rms);
        R->mp.norm_fwd(R, orr, meanr, rstdr, x, w, bias, N, C, 1e-5f, rms);
        float *got = act_host(b, o, N, C), *ref = act_host(R, orr, N, C);
        double *tm = dzeros((size_t)N), *tr = dzeros((size_t)N), *to = dzeros(n);
        for (int r = 0; r < N; r++) {
            const float *xr = x + (size_t)r * C;
            double sa = 0, s2 = 0, d2 = 0, m = rms ? 0 : meanr[r];
            for (int c = 0; c < C; c++) {
                sa += fabs(xr[c]);
                s2 += (double)xr[c] * xr[c];
                d2 += (xr[c] - m) * (xr[c] - m);
            }
            tm[r] = (C + 2) * U32 * sa / C;
            tr[r] = ((C + 4) * U32 * s2 / (d2 + C * 1e-5) / 2 + 3 * U32) * rstdr[r];
            for (int c = 0; c < C; c++) {
                double e =
                    tm[r] * rstdr[r] * fabs(w[c]) + fabs(xr[c] - m) * tr[r] * fabs(w[c]) +
                    4 * U32 *
                        (fabs(xr[c] - m) * rstdr[r] * fabs(w[c]) + (bias ? fabs(bias[c]) : 0));
                size_t i = (size_t)r * C + c;
                to[i] = e;
            }
        }
        after_bf16(to, to, got, ref, n);
        if (!rms) within("norm_fwd mean", mean, meanr, tm, (size_t)N);
        within(rms ? "rmsnorm rstd" : "layernorm rstd", rstd, rstdr, tr, (size_t)N);
        within(rms ? "rmsnorm out" : "layernorm out", got, ref, to, n);
        free(x), free(w), free(bias), free(mean), free(rstd), free(meanr), free(rstdr);
        free(got), free(ref), free(tm), free(tr), free(to);
        b->buf_free(b, o);
        R->buf_free(R, orr);
    }
}

static void op_linear_fwd(kern_backend *b)
{
    int N = 37, C = 48, OC = 80;
    size_t ni = (size_t)N * C, no = (size_t)N * OC, nw = (size_t)OC * C;
    const char *kinds[] = {"F32", "RES", "ROWS", "GELU"};
    for (int lay = 0; lay < 2; lay++)
        for (int kind = 0; kind < 4; kind++)
            for (int hb = 0; hb < 2; hb++) {
                float *x = rnd(ni, 1), *W = rnd(nw, 0.2f), *bias = hb ? rnd((size_t)OC, 1) : NULL;
                float *res = rnd(no, 1);
                kern_weight *w = prep(b, W, OC, C, (kern_wlayout)lay);
                kern_weight *wr = prep(R, W, OC, C, (kern_wlayout)lay);
                CHECK(w && w == prep(b, W, OC, C, (kern_wlayout)lay));
                kern_act *xa = act_of(b, x, N, C), *xr = act_of(R, x, N, C);
                float *y = zeros(no), *yr = zeros(no);
                void *rows = calloc(no, 4), *rowsr = calloc(no, 4);
                kern_act *hp = b->buf_alloc(b, b->mp.act_bytes(b, N, OC));
                kern_act *ap = b->buf_alloc(b, b->mp.act_bytes(b, N, OC));
                kern_act *hpr = R->buf_alloc(R, R->mp.act_bytes(R, N, OC));
                kern_act *apr = R->buf_alloc(R, R->mp.act_bytes(R, N, OC));
                kern_out o = {.kind = (kern_out_kind)kind,
                              .y = y,
                              .res = res,
                              .rows = rows,
                              .hp = hp,
                              .ap = ap};
                kern_out orf = {.kind = (kern_out_kind)kind,
                                .y = yr,
                                .res = res,
                                .rows = rowsr,
                                .hp = hpr,
                                .ap = apr};
                if (kind == KERN_OUT_RES && hb) { /* in place (y is res), and not */
                    memcpy(y, res, no * 4), memcpy(yr, res, no * 4);
                    o.res = y, orf.res = yr;
                }
                CHECK(b->mp.linear_fwd(b, &o, xa, w, bias, N));
                CHECK(R->mp.linear_fwd(R, &orf, xr, wr, bias, N));
                /* magnitudes: the ref product on |x|, |W|, |bias| */
                float *xabs = absv(x, ni), *Wabs = absv(W, nw);
                float *babs = bias ? absv(bias, (size_t)OC) : NULL, *m = zeros(no);
                kern_act *xm = act_of(R, xabs, N, C);
                kern_out om = {.kind = KERN_OUT_F32, .y = m};
                CHECK(
                    R->mp.linear_fwd(R, &om, xm, prep(R, Wabs, OC, C, (kern_wlayout)lay), babs, N));
                double *e = dzeros(no), *tol = dzeros(no);
                for (size_t i = 0; i < no; i++)
                    e[i] = (C + 2) * U32 * m[i];
                char what[80];
                snprintf(what, sizeof what, "linear_fwd %s %s%s", kinds[kind],
                         lay ? "in_out" : "out_in", hb ? " bias" : "");
                if (kind == KERN_OUT_F32) {
                    within(what, y, yr, e, no);
                } else if (kind == KERN_OUT_RES) {
                    for (size_t i = 0; i < no; i++)
                        tol[i] = (C + 3) * U32 * (m[i] + fabs(res[i]));
                    within(what, y, yr, tol, no);
                } else if (kind == KERN_OUT_ROWS) {
                    float *g = zeros(no), *r = zeros(no);
                    b->mp.from_rows(b, g, rows, no); /* host rows: ref and cpu alike */
                    R->mp.from_rows(R, r, rowsr, no);
                    after_bf16(tol, e, g, r, no);
                    within(what, g, r, tol, no);
                    free(g), free(r);
                } else {
                    float *g = act_host(b, hp, N, OC), *r = act_host(R, hpr, N, OC);
                    after_bf16(tol, e, g, r, no);
                    within(what, g, r, tol, no);
                    float *ga = act_host(b, ap, N, OC), *ra = act_host(R, apr, N, OC);
                    /* gelu' <= 1.13 times hp's error, gelu's own evaluation */
                    for (size_t i = 0; i < no; i++)
                        e[i] = 1.13 * tol[i] + 8 * U32 * (fabs(r[i]) + tol[i]);
                    after_bf16(tol, e, ga, ra, no);
                    within("linear_fwd GELU ap", ga, ra, tol, no);
                    free(g), free(r), free(ga), free(ra);
                }
                free(x), free(W), free(bias), free(res), free(y), free(yr), free(rows), free(rowsr);
                free(xabs), free(Wabs), free(babs), free(m), free(e), free(tol);
                b->buf_free(b, xa), b->buf_free(b, hp), b->buf_free(b, ap);
                R->buf_free(R, xr), R->buf_free(R, hpr), R->buf_free(R, apr), R->buf_free(R, xm);
            }
}

/* The activation's error bound at pre-activation x (row of FH; SwiGLU:
 * gate c, up F + c) per output (N, F). */
static double act_eval_err(const float *x, int F, int c, int act)
{
    if (act == KERN_ACT_GELU) return 8 * U32 * fabs(x[c]);
    if (act == KERN_ACT_SWIGLU) return 8 * U32 * fabs((double)x[c] * x[F + c]);
    return 0;
}

static void op_act_fwd(kern_backend *b)
{
    int N = 37, F = 48;
    for (int act = KERN_ACT_GELU; act <= KERN_ACT_SWIGLU; act++) {
        int FH = act == KERN_ACT_SWIGLU ? 2 * F : F;
        size_t nh = (size_t)N * FH, na = (size_t)N * F;
        float *h = rnd(nh, 2);
        kern_act *hp = b->buf_alloc(b, b->mp.act_bytes(b, N, FH)),
                 *ap = b->buf_alloc(b, b->mp.act_bytes(b, N, F));
        kern_act *hpr = R->buf_alloc(R, R->mp.act_bytes(R, N, FH)),
                 *apr = R->buf_alloc(R, R->mp.act_bytes(R, N, F));
        float *hd = up(b, h, nh * 4);
        b->mp.act_fwd(b, hp, ap, hd, N, F, act);
        R->mp.act_fwd(R, hpr, apr, h, N, F, act);
        float *g = act_host(b, hp, N, FH), *r = act_host(R, hpr, N, FH);
        within(act == KERN_ACT_GELU ? "act_fwd gelu hp" : "act_fwd swiglu hp", g, r, NULL, nh);
        float *ga = act_host(b, ap, N, F), *ra = act_host(R, apr, N, F);
        double *tol = dzeros(na);
        for (int t = 0; t < N; t++)
            for (int c = 0; c < F; c++)
                tol[(size_t)t * F + c] = act_eval_err(r + (size_t)t * FH, F, c, act);
        after_bf16(tol, tol, ga, ra, na);
        within(act == KERN_ACT_GELU ? "act_fwd gelu ap" : "act_fwd swiglu ap", ga, ra, tol, na);
        free(h), free(g), free(r), free(ga), free(ra), free(tol);
        b->buf_free(b, hd), b->buf_free(b, hp), b->buf_free(b, ap);
        R->buf_free(R, hpr), R->buf_free(R, apr);
    }
}

static void op_act_bwd(kern_backend *b)
{
    int N = 37, F = 48;
    for (int act = KERN_ACT_GELU; act <= KERN_ACT_SWIGLU; act++) {
        int FH = act == KERN_ACT_SWIGLU ? 2 * F : F;
        size_t nh = (size_t)N * FH, na = (size_t)N * F;
        float *h = rnd(nh, 2), *dout = rnd(na, 1);
        kern_act *hp = act_of(b, h, N, FH), *hpr = act_of(R, h, N, FH);
        float *dh = zeros(nh), *dhr = zeros(nh);
        b->mp.act_bwd(b, dh, hp, dout, N, F, act);
        R->mp.act_bwd(R, dhr, hpr, dout, N, F, act);
        double *tol = dzeros(nh);
        for (int t = 0; t < N; t++)
            for (int c = 0; c < F; c++) {
                const float *x = h + (size_t)t * FH;
                double d = fabs(dout[(size_t)t * F + c]);
                if (act == KERN_ACT_GELU) {
                    double a = fabs(rbf(x[c]));
                    tol[(size_t)t * FH + c] = 32 * U32 * (1 + a + a * a * a) * d;
                } else {
                    double e = 16 * U32 * d * (1 + fabs(rbf(x[c]))) * (1 + fabs(rbf(x[F + c])));
                    tol[(size_t)t * FH + c] = tol[(size_t)t * FH + F + c] = e;
                }
            }
        within(act == KERN_ACT_GELU ? "act_bwd gelu" : "act_bwd swiglu", dh, dhr, tol, nh);
        free(h), free(dout), free(dh), free(dhr), free(tol);
        b->buf_free(b, hp);
        R->buf_free(R, hpr);
    }
}

/* a (N, C) = bf16(act(bf16(x))) as the backends compute it (the ref's
 * functions) and its evaluation error bound ea (+ its bf16 step). */
static void act_ref(const float *x, int N, int C, int act, float *a, float *ea)
{
    int CX = act == KERN_ACT_SWIGLU ? 2 * C : C;
    size_t nx = (size_t)N * CX, n = (size_t)N * C;
    float *xr = malloc(nx * 4);
    for (size_t i = 0; i < nx; i++)
        xr[i] = rbf(x[i]);
    if (act == KERN_ACT_NONE)
        memcpy(a, xr, n * 4);
    else if (act == KERN_ACT_GELU)
        kern_ops_ref()->gelu_fwd(a, xr, n);
    else
        kern_ops_ref()->swiglu_fwd(a, xr, N, C);
    for (int t = 0; t < N; t++)
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)t * C + c;
            if (act != KERN_ACT_NONE) a[i] = rbf(a[i]);
            ea[i] = act == KERN_ACT_NONE
                        ? 0
                        : (float)(1.01 * act_eval_err(xr + (size_t)t * CX, C, c, act) +
                                  2.02 * UB * fabs(a[i]));
        }
    free(xr);
}

/* One linear backward on b and ref with bounds: dy errors edy (N, OC) of
 * the incoming gradient already in bf16-step form (NULL: none), the
 * activation's ea. */
static void check_lin_bwd(const char *what, kern_backend *b, const float *W, int OC, int C,
                          kern_wlayout lay, const float *x, int act, int N, const float *dy,
                          bool dw_acc, bool has_db)
{
    int CX = act == KERN_ACT_SWIGLU ? 2 * C : C;
    size_t nw = (size_t)OC * C, ndy = (size_t)N * OC, nx = (size_t)N * C;
    kern_weight *w = prep(b, W, OC, C, lay), *wr = prep(R, W, OC, C, lay);
    kern_act *xa = act_of(b, x, N, CX), *xr = act_of(R, x, N, CX);
    float *dW = rnd(nw, 1), *dWr = malloc(nw * 4), *db = rnd((size_t)OC, 1),
          *dbr = malloc((size_t)OC * 4);
    memcpy(dWr, dW, nw * 4), memcpy(dbr, db, (size_t)OC * 4);
    float *dW0 = absv(dW, nw), *db0 = absv(db, (size_t)OC);
    float *dx = rnd(nx, 1), *dxr = zeros(nx);
    float *dyd = up(b, dy, ndy * 4);
    CHECK(b->mp.linear_bwd(b, w, dyd, xa, act, N, dW, dw_acc, has_db ? db : NULL, dx));
    CHECK(R->mp.linear_bwd(R, wr, dy, xr, act, N, dWr, dw_acc, has_db ? dbr : NULL, dxr));
    /* magnitudes on |a|, |dy|, |W|; the activation's error ea through dW */
    float *a = zeros(nx), *ea = zeros(nx), *Wabs = absv(W, nw), *dya = absv(dy, ndy);
    act_ref(x, N, C, act, a, ea);
    float *aa = absv(a, nx), *mx = zeros(nx), *mw = zeros(nw), *mb = zeros((size_t)OC);
    float *ex = zeros(nx), *ew = zeros(nw);
    mag_bwd(Wabs, OC, C, lay, dya, aa, N, mx, mw, mb);
    mag_bwd(Wabs, OC, C, lay, dya, ea, N, ex, ew, NULL);
    double *tx = dzeros(nx), *tw = dzeros(nw), *tb = dzeros((size_t)OC);
    for (size_t i = 0; i < nx; i++)
        tx[i] = (OC + 2) * U32 * mx[i];
    for (size_t i = 0; i < nw; i++)
        tw[i] = (N + 2) * U32 * mw[i] + ew[i] + (dw_acc ? U32 * (dW0[i] + mw[i] + ew[i]) : 0);
    for (int i = 0; i < OC; i++)
        tb[i] = (N + 2) * U32 * (mb[i] + db0[i]);
    char s[120];
    snprintf(s, sizeof s, "%s dx", what);
    within(s, dx, dxr, tx, nx);
    snprintf(s, sizeof s, "%s dW%s", what, dw_acc ? " acc" : "");
    within(s, dW, dWr, tw, nw);
    snprintf(s, sizeof s, "%s db", what);
    if (has_db) within(s, db, dbr, tb, (size_t)OC);
    free(dW), free(dWr), free(db), free(dbr), free(dW0), free(db0), free(dx), free(dxr);
    free(a), free(ea), free(Wabs), free(dya), free(aa), free(mx), free(mw), free(mb), free(ex),
        free(ew);
    free(tx), free(tw), free(tb);
    b->buf_free(b, dyd), b->buf_free(b, xa);
    R->buf_free(R, xr);
}

static void op_linear_bwd(kern_backend *b)
{
    int N = 37, C = 48, OC = 80;
    const int cases[][2] = {{KERN_ACT_NONE, KERN_W_OUT_IN},
                            {KERN_ACT_NONE, KERN_W_IN_OUT},
                            {KERN_ACT_GELU, KERN_W_OUT_IN},
                            {KERN_ACT_GELU, KERN_W_IN_OUT},
                            {KERN_ACT_SWIGLU, KERN_W_OUT_IN}};
    const char *names[] = {"none", "gelu", "swiglu"};
    for (int c = 0; c < 5; c++)
        for (int v = 0; v < 2; v++) {
            int act = cases[c][0], CX = act == KERN_ACT_SWIGLU ? 2 * C : C;
            float *W = rnd((size_t)OC * C, 0.2f), *x = rnd((size_t)N * CX, 1.5f);
            float *dy = rnd((size_t)N * OC, 1);
            char what[80];
            snprintf(what, sizeof what, "linear_bwd %s %s", names[act],
                     cases[c][1] ? "in_out" : "out_in");
            check_lin_bwd(what, b, W, OC, C, (kern_wlayout)cases[c][1], x, act, N, dy, v == 1,
                          v == 1);
            free(W), free(x), free(dy);
        }
}

/* The MLP backward: the gradient of the pre-activation D = (bf16(dy) W2)
 * gelu'(h) is off by |gelu'| (<= 1.13) times its product's error, plus
 * gelu''s evaluation, then rounded to bf16 by both; that error goes
 * through the fc layer's products like an input gradient. */
static void op_mlp_bwd(kern_backend *b)
{
    int N = 37, C = 48, F = 80;
    size_t nx = (size_t)N * C, nh = (size_t)N * F, nw = (size_t)F * C;
    for (int lay = 0; lay < 2; lay++)
        for (int act = KERN_ACT_NONE; act <= KERN_ACT_GELU; act++) {
            float *W1 = rnd(nw, 0.2f), *W2 = rnd(nw, 0.2f), *x = rnd(nx, 1), *h = rnd(nh, 1.5f);
            float *dy = rnd(nx, 1);
            kern_wlayout L = (kern_wlayout)lay;
            kern_weight *w1 = prep(b, W1, F, C, L), *w2 = prep(b, W2, C, F, L);
            kern_weight *r1 = prep(R, W1, F, C, L), *r2 = prep(R, W2, C, F, L);
            kern_act *xa = act_of(b, x, N, C), *ha = act_of(b, h, N, F);
            kern_act *xr = act_of(R, x, N, C), *hr = act_of(R, h, N, F);
            float *g[5], *r[5]; /* dW1 db1 dW2 db2 dx */
            size_t sz[5] = {nw, (size_t)F, nw, (size_t)C, nx};
            for (int i = 0; i < 5; i++)
                g[i] = zeros(sz[i]), r[i] = zeros(sz[i]);
            CHECK(
                b->mp.mlp_bwd(b, w1, w2, dy, xa, ha, act, N, g[0], g[1], g[2], g[3], g[4], false));
            CHECK(
                R->mp.mlp_bwd(R, r1, r2, dy, xr, hr, act, N, r[0], r[1], r[2], r[3], r[4], false));
            /* the second layer as a linear backward on act(h) */
            float *a = zeros(nh), *ea = zeros(nh), *dya = absv(dy, nx), *W2a = absv(W2, nw);
            act_ref(h, N, F, act, a, ea);
            float *aa = absv(a, nh), *mA = zeros(nh), *mw2 = zeros(nw), *mb2 = zeros((size_t)C);
            float *eA = zeros(nh), *ew2 = zeros(nw);
            mag_bwd(W2a, C, F, L, dya, aa, N, mA, mw2, mb2);
            mag_bwd(W2a, C, F, L, dya, ea, N, eA, ew2, NULL);
            double *t2 = dzeros(nw), *tb2 = dzeros((size_t)C);
            for (size_t i = 0; i < nw; i++)
                t2[i] = (N + 2) * U32 * mw2[i] + ew2[i];
            for (int i = 0; i < C; i++)
                tb2[i] = (N + 2) * U32 * mb2[i];
            within("mlp_bwd dW2", g[2], r[2], t2, nw);
            within("mlp_bwd db2", g[3], r[3], tb2, (size_t)C);
            /* D and its error */
            float *dA = zeros(nh), *D = zeros(nh), *hb = zeros(nh), *scratch = zeros(nw);
            kern_act *har = act_of(R, h, N, F);
            CHECK(R->mp.linear_bwd(R, r2, dy, har, act, N, scratch, false, NULL, dA));
            for (size_t i = 0; i < nh; i++)
                hb[i] = rbf(h[i]);
            if (act == KERN_ACT_GELU)
                kern_ops_ref()->gelu_bwd(D, hb, dA, nh);
            else
                memcpy(D, dA, nh * 4);
            float *eD = zeros(nh), *Da = zeros(nh);
            for (size_t i = 0; i < nh; i++) {
                double hx = fabs(hb[i]), dAe = (F + 2) * U32 * mA[i];
                double dD = act == KERN_ACT_GELU
                                ? 1.13 * dAe + 32 * U32 * (1 + hx + hx * hx * hx) * fabs(dA[i]) +
                                      U32 * fabs(D[i])
                                : dAe;
                eD[i] = (float)(1.01 * dD + 2.02 * UB * fabs(D[i]));
                Da[i] = fabsf(D[i]);
                mA[i] = (float)dD; /* now the error of D before rounding, for db1 */
            }
            float *W1a = absv(W1, nw), *xa_ = absv(x, nx), *mx = zeros(nx), *mw1 = zeros(nw);
            float *mb1 = zeros((size_t)F), *ex = zeros(nx), *ew1 = zeros(nw),
                  *eb1 = zeros((size_t)F);
            mag_bwd(W1a, F, C, L, Da, xa_, N, mx, mw1, mb1);
            mag_bwd(W1a, F, C, L, eD, xa_, N, ex, ew1, NULL);
            mag_bwd(W1a, F, C, L, mA, xa_, N, scratch + 0, scratch, eb1); /* sums of D's error */
            double *tx = dzeros(nx), *t1 = dzeros(nw), *tb1 = dzeros((size_t)F);
            for (size_t i = 0; i < nx; i++)
                tx[i] = (F + 2) * U32 * mx[i] + ex[i];
            for (size_t i = 0; i < nw; i++)
                t1[i] = (N + 2) * U32 * mw1[i] + ew1[i];
            for (int i = 0; i < F; i++)
                tb1[i] = (N + 2) * U32 * mb1[i] + eb1[i];
            within("mlp_bwd dx", g[4], r[4], tx, nx);
            within("mlp_bwd dW1", g[0], r[0], t1, nw);
            within("mlp_bwd db1", g[1], r[1], tb1, (size_t)F);
            for (int i = 0; i < 5; i++)
                free(g[i]), free(r[i]);
            free(W1), free(W2), free(x), free(h), free(dy), free(a), free(ea), free(dya), free(W2a);
            free(aa), free(mA), free(mw2), free(mb2), free(eA), free(ew2), free(t2), free(tb2);
            free(dA), free(D), free(hb), free(scratch), free(eD), free(Da), free(W1a), free(xa_);
            free(mx), free(mw1), free(mb1), free(ex), free(ew1), free(eb1), free(tx), free(t1),
                free(tb1);
            b->buf_free(b, xa), b->buf_free(b, ha);
            R->buf_free(R, xr), R->buf_free(R, hr), R->buf_free(R, har);
        }
}

/* Cross-entropy into the head's backward: the gradient p - onehot of the
 * logits is off by the softmax's rounding, (V + 8) u p (V terms summed,
 * ~2 ulp exp, the division), then by its scale and mask (2 u), then
 * rounded to bf16; the loss by (V + 8) u (|lse| + |z_t|) per row and the
 * sums' rounding. */
static void op_ce_linear_bwd(kern_backend *b)
{
    int N = 37, C = 48, V = 300;
    size_t nl = (size_t)N * V, nx = (size_t)N * C, nw = (size_t)V * C;
    for (int lay = 0; lay < 2; lay++)
        for (int masked = 0; masked < 2; masked++) {
            float *z = rnd(nl, 2), *W = rnd(nw, 0.2f), *x = rnd(nx, 1), *mask = NULL;
            int32_t *tg = malloc((size_t)N * 4);
            for (int i = 0; i < N; i++)
                tg[i] = i % 7 == 3 ? -1 : (int32_t)(kiln_rng_uniform(&rng) * V) % V;
            if (masked) {
                mask = malloc((size_t)N * 4);
                for (int i = 0; i < N; i++)
                    mask[i] = kiln_rng_uniform(&rng);
            }
            kern_wlayout L = (kern_wlayout)lay;
            kern_weight *w = prep(b, W, V, C, L), *wr = prep(R, W, V, C, L);
            kern_act *xa = act_of(b, x, N, C), *xr = act_of(R, x, N, C);
            float *dW = zeros(nw), *dWr = zeros(nw), *dx = zeros(nx), *dxr = zeros(nx);
            double ls = 0.5, ws = 0.25, lsr = 0.5, wsr = 0.25;
            float scale = 1.0f / 29;
            float *zb = malloc(nl * 4), *zR = malloc(nl * 4); /* each backend may overwrite */
            memcpy(zb, z, nl * 4), memcpy(zR, z, nl * 4);
            CHECK(b->mp.ce_linear_bwd(b, w, zb, tg, mask, N, V, scale, &ls, &ws, xa, dW, false, dx));
            CHECK(R->mp.ce_linear_bwd(R, wr, zR, tg, mask, N, V, scale, &lsr, &wsr, xr, dWr, false,
                                      dxr));
            free(zb), free(zR);
            /* dlogits as the ref has them, and their error after bf16 */
            float *dl = zeros(nl), *dla = zeros(nl), *edl = zeros(nl);
            double l0 = 0, w0 = 0, tl = 0, sw = 0;
            kern_ops_ref()->cross_entropy(z, tg, mask, N, V, scale, dl, &l0, &w0);
            for (int r = 0; r < N; r++) {
                const float *zr = z + (size_t)r * V;
                double mx = -INFINITY, s = 0;
                for (int j = 0; j < V; j++)
                    mx = fmax(mx, zr[j]);
                for (int j = 0; j < V; j++)
                    s += exp(zr[j] - mx);
                double lse = mx + log(s), mk = mask ? mask[r] : 1;
                if (tg[r] >= 0) {
                    tl += mk * ((V + 8) * U32 * (fabs(lse) + fabs(zr[tg[r]])) +
                                (N + 2) * U32 * fabs(lse - zr[tg[r]]));
                    sw += mk;
                }
                for (int j = 0; j < V; j++) {
                    size_t i = (size_t)r * V + j;
                    double p = tg[r] < 0 ? 0 : exp(zr[j] - lse) * scale * mk;
                    double e = (V + 8) * U32 * p + 2 * U32 * fabs(dl[i]);
                    edl[i] = (float)(1.01 * e + 2.02 * UB * fabs(dl[i]));
                    dla[i] = fabsf(dl[i]);
                }
            }
            float *Wa = absv(W, nw), *xab = absv(x, nx), *mx_ = zeros(nx), *mw = zeros(nw);
            float *ex = zeros(nx), *ew = zeros(nw);
            mag_bwd(Wa, V, C, L, dla, xab, N, mx_, mw, NULL);
            mag_bwd(Wa, V, C, L, edl, xab, N, ex, ew, NULL);
            double *tx = dzeros(nx), *tw = dzeros(nw);
            for (size_t i = 0; i < nx; i++)
                tx[i] = (V + 2) * U32 * mx_[i] + ex[i];
            for (size_t i = 0; i < nw; i++)
                tw[i] = (N + 2) * U32 * mw[i] + ew[i];
            within(masked ? "ce_linear_bwd dx (mask)" : "ce_linear_bwd dx", dx, dxr, tx, nx);
            within(masked ? "ce_linear_bwd dW (mask)" : "ce_linear_bwd dW", dW, dWr, tw, nw);
            CHECK_MSG(fabs(ls - lsr) <= tl, "ce loss sum %.12g vs %.12g (bound %g)", ls, lsr, tl);
            CHECK_MSG(fabs(ws - wsr) <= (N + 2) * U32 * sw, "ce weight sum %.12g vs %.12g", ws,
                      wsr);
            CHECK(fabs(lsr - 0.5 - l0) <= 1e-9 * fabs(l0) && wsr - 0.25 == w0); /* ref adds */
            free(z), free(W), free(x), free(mask), free(tg), free(dW), free(dWr), free(dx),
                free(dxr);
            free(dl), free(dla), free(edl), free(Wa), free(xab), free(mx_), free(mw), free(ex),
                free(ew);
            free(tx), free(tw);
            b->buf_free(b, xa);
            R->buf_free(R, xr);
        }
}

/* ---- attention ------------------------------------------------------------------ */

typedef struct att_case {
    int B, T, NH, KVH, HS;
} att_case;
static const att_case ATT[] = {{2, 32, 4, 2, 32}, {1, 24, 2, 2, 64}, {2, 64, 2, 1, 32}};
#define N_ATT ((int)(sizeof ATT / sizeof ATT[0]))

/* qkv (bf16 values), dout, and the naive attention's out, lse and bound
 * sums for it (attn_naive.h): the same inputs for both backends. */
typedef struct att_in {
    int n, S, OC;
    float *qkv, *dout, *out, *lse;
    double *Mo, *M, *dq;
} att_in;

static att_in att_make(const att_case *c)
{
    att_in a;
    a.n = c->B * c->T;
    a.S = (c->NH + 2 * c->KVH) * c->HS;
    a.OC = c->NH * c->HS;
    size_t nq = (size_t)a.n * a.S, no = (size_t)a.n * a.OC, nl = (size_t)c->B * c->NH * c->T;
    a.qkv = rnd(nq, 1);
    for (size_t i = 0; i < nq; i++)
        a.qkv[i] = rbf(a.qkv[i]);
    a.dout = rnd(no, 1);
    a.out = zeros(no);
    a.lse = zeros(nl);
    a.Mo = dzeros(no);
    a.M = dzeros(nq);
    a.dq = dzeros(nq);
    double *o = dzeros(no), *l = dzeros(nl);
    attn_naive(a.qkv, NULL, NULL, NULL, c->B, c->T, c->NH, c->KVH, c->HS, o, l, a.Mo, NULL, NULL);
    for (size_t i = 0; i < no; i++)
        a.out[i] = rbf((float)o[i]); /* what outp holds */
    for (size_t i = 0; i < nl; i++)
        a.lse[i] = (float)l[i];
    attn_naive(a.qkv, a.dout, a.out, a.lse, c->B, c->T, c->NH, c->KVH, c->HS, o, l, NULL, a.dq,
               a.M);
    free(o), free(l);
    return a;
}

static void att_free(att_in *a)
{
    free(a->qkv), free(a->dout), free(a->out), free(a->lse), free(a->Mo), free(a->M), free(a->dq);
}

/* 2 ub M + 1e-5 max |ref| (test_attn_amx.c's derivation). */
static void att_bound(double *tol, const double *M, const float *ref, size_t n)
{
    double mx = 0;
    for (size_t i = 0; i < n; i++)
        mx = fmax(mx, fabs(ref[i]));
    for (size_t i = 0; i < n; i++)
        tol[i] = 2 * UB * M[i] + 1e-5 * mx;
}

static void *rows_of(kern_backend *b, const float *x, size_t n)
{
    void *h = b->buf_alloc(b, n * b->mp.row_size);
    float *xd = up(b, x, n * 4);
    b->mp.to_rows(b, h, xd, n);
    b->buf_free(b, xd);
    return h;
}

static void op_attention_fwd(kern_backend *b)
{
    bool any = false;
    for (int k = 0; k < N_ATT; k++) {
        const att_case *c = &ATT[k];
        if (!b->mp.attention_ok(b, c->HS, c->T)) continue;
        any = true;
        att_in a = att_make(c);
        size_t no = (size_t)a.n * a.OC, nl = (size_t)c->B * c->NH * c->T;
        void *q = rows_of(b, a.qkv, (size_t)a.n * a.S), *qr = rows_of(R, a.qkv, (size_t)a.n * a.S);
        kern_act *o = b->buf_alloc(b, b->mp.act_bytes(b, a.n, a.OC));
        kern_act *orr = R->buf_alloc(R, R->mp.act_bytes(R, a.n, a.OC));
        float *lse = zeros(nl), *lser = zeros(nl);
        b->mp.attention_fwd(b, o, lse, q, c->B, c->T, c->NH, c->KVH, c->HS);
        R->mp.attention_fwd(R, orr, lser, qr, c->B, c->T, c->NH, c->KVH, c->HS);
        float *g = act_host(b, o, a.n, a.OC), *r = act_host(R, orr, a.n, a.OC);
        double *tol = dzeros(no), *tl = dzeros(nl);
        att_bound(tol, a.Mo, r, no);
        after_bf16(tol, tol, g, r, no);
        for (size_t i = 0; i < nl; i++)
            tl[i] = 1e-5 * fmax(1, fabs(lser[i]));
        char what[64];
        snprintf(what, sizeof what, "attention_fwd out T%d HS%d", c->T, c->HS);
        within(what, g, r, tol, no);
        within("attention_fwd lse", lse, lser, tl, nl);
        free(lse), free(lser), free(g), free(r), free(tol), free(tl);
        b->buf_free(b, q), b->buf_free(b, o);
        R->buf_free(R, qr), R->buf_free(R, orr);
        att_free(&a);
    }
    if (!any) SKIP("attention in bf16 not offered (mp.attention_ok false)");
}

static void op_attention_bwd(kern_backend *b)
{
    bool any = false;
    for (int k = 0; k < N_ATT; k++) {
        const att_case *c = &ATT[k];
        if (!b->mp.attention_ok(b, c->HS, c->T)) continue;
        any = true;
        att_in a = att_make(c);
        size_t nq = (size_t)a.n * a.S;
        void *q = rows_of(b, a.qkv, nq), *qr = rows_of(R, a.qkv, nq);
        kern_act *o = act_of(b, a.out, a.n, a.OC), *orr = act_of(R, a.out, a.n, a.OC);
        float *dq = zeros(nq), *dqr = zeros(nq);
        b->mp.attention_bwd(b, dq, a.dout, q, o, a.lse, c->B, c->T, c->NH, c->KVH, c->HS);
        R->mp.attention_bwd(R, dqr, a.dout, qr, orr, a.lse, c->B, c->T, c->NH, c->KVH, c->HS);
        double *tol = dzeros(nq);
        att_bound(tol, a.M, dqr, nq);
        char what[64];
        snprintf(what, sizeof what, "attention_bwd dqkv T%d HS%d", c->T, c->HS);
        within(what, dq, dqr, tol, nq);
        free(dq), free(dqr), free(tol);
        b->buf_free(b, q), b->buf_free(b, o);
        R->buf_free(R, qr), R->buf_free(R, orr);
        att_free(&a);
    }
    if (!any) SKIP("attention in bf16 not offered (mp.attention_ok false)");
}

/* The attention backward into the qkv layer's: dqkv's error (the bound
 * above), rounded to bf16 by both, goes through the layer's products. */
static void op_attention_linear_bwd(kern_backend *b)
{
    bool any = false;
    for (int k = 0; k < N_ATT; k++) {
        const att_case *c = &ATT[k];
        if (!b->mp.attention_ok(b, c->HS, c->T)) continue;
        any = true;
        att_in a = att_make(c);
        int C = 48, QKV = a.S, n = a.n;
        size_t nq = (size_t)n * QKV, nw = (size_t)QKV * C, nx = (size_t)n * C;
        for (int lay = 0; lay < 2; lay++) {
            kern_wlayout L = (kern_wlayout)lay;
            float *W = rnd(nw, 0.2f), *x = rnd(nx, 1);
            void *q = rows_of(b, a.qkv, nq), *qr = rows_of(R, a.qkv, nq);
            kern_act *o = act_of(b, a.out, n, a.OC), *orr = act_of(R, a.out, n, a.OC);
            kern_act *xa = act_of(b, x, n, C), *xr = act_of(R, x, n, C);
            kern_weight *w = prep(b, W, QKV, C, L), *wr = prep(R, W, QKV, C, L);
            float *dW = zeros(nw), *dWr = zeros(nw), *db = zeros((size_t)QKV),
                  *dbr = zeros((size_t)QKV);
            float *dx = zeros(nx), *dxr = zeros(nx), *s1 = zeros(nq), *s2 = zeros(nq);
            float *dout = b->buf_alloc(b, (size_t)n * a.OC * 4);
            b->buf_set(b, dout, 0, a.dout, (size_t)n * a.OC * 4);
            CHECK(b->mp.attention_linear_bwd(b, w, s1, dout, q, o, a.lse, c->B, c->T, c->NH, c->KVH,
                                             c->HS, xa, dW, false, db, dx));
            CHECK(R->mp.attention_linear_bwd(R, wr, s2, a.dout, qr, orr, a.lse, c->B, c->T, c->NH,
                                             c->KVH, c->HS, xr, dWr, false, dbr, dxr));
            /* s2 = the ref's dqkv; its bound, and after bf16 */
            double *tq = dzeros(nq);
            att_bound(tq, a.M, s2, nq);
            float *eq = zeros(nq), *dqa = absv(s2, nq), *tqf = zeros(nq);
            for (size_t i = 0; i < nq; i++) {
                eq[i] = (float)(1.01 * tq[i] + 2.02 * UB * fabs(s2[i]));
                tqf[i] = (float)tq[i];
            }
            float *Wa = absv(W, nw), *xab = absv(x, nx), *mx = zeros(nx), *mw = zeros(nw);
            float *mb = zeros((size_t)QKV), *ex = zeros(nx), *ew = zeros(nw),
                  *eb = zeros((size_t)QKV);
            mag_bwd(Wa, QKV, C, L, dqa, xab, n, mx, mw, mb);
            mag_bwd(Wa, QKV, C, L, eq, xab, n, ex, ew, NULL);
            float *junk = zeros(nw > nx ? nw : nx), *junk2 = zeros(nw);
            mag_bwd(Wa, QKV, C, L, tqf, xab, n, junk, junk2, eb);
            double *tx = dzeros(nx), *tw = dzeros(nw), *tb = dzeros((size_t)QKV);
            for (size_t i = 0; i < nx; i++)
                tx[i] = (QKV + 2) * U32 * mx[i] + ex[i];
            for (size_t i = 0; i < nw; i++)
                tw[i] = (n + 2) * U32 * mw[i] + ew[i];
            for (int i = 0; i < QKV; i++)
                tb[i] = (n + 2) * U32 * mb[i] + 1.01 * eb[i];
            char what[80];
            snprintf(what, sizeof what, "attention_linear_bwd T%d HS%d %s", c->T, c->HS,
                     lay ? "in_out" : "out_in");
            within(what, dx, dxr, tx, nx);
            within("attention_linear_bwd dW", dW, dWr, tw, nw);
            within("attention_linear_bwd db", db, dbr, tb, (size_t)QKV);
            free(W), free(x), free(dW), free(dWr), free(db), free(dbr), free(dx), free(dxr);
            free(s1), free(s2), free(tq), free(eq), free(dqa), free(tqf), free(Wa), free(xab);
            free(mx), free(mw), free(mb), free(ex), free(ew), free(eb), free(junk), free(junk2);
            free(tx), free(tw), free(tb);
            b->buf_free(b, q), b->buf_free(b, o), b->buf_free(b, xa), b->buf_free(b, dout);
            R->buf_free(R, qr), R->buf_free(R, orr), R->buf_free(R, xr);
        }
        att_free(&a);
    }
    if (!any) SKIP("attention in bf16 not offered (mp.attention_ok false)");
}

/* ---- weights -------------------------------------------------------------------- */

/* A prepared weight follows its fp32 values: after an optimizer-style
 * update (strip by strip through weight_refresh and weight_fresh where
 * the backend offers strips, else nothing) and a new epoch, a product
 * gives the bits of a new backend's on the updated weight, in both
 * layouts (the forward and, through dx, the input-gradient copy). */
static void op_weight_refresh(kern_backend *b, const char *name, kiln_bf16_kernel kern)
{
    int N = 40, C = 64, OC = 96;
    size_t nw = (size_t)OC * C, no = (size_t)N * OC, nx = (size_t)N * C;
    bool mp = b->mp.linear_fwd != NULL; /* else through the op table's linear layers */
    for (int lay = 0; lay < 2; lay++) {
        kern_wlayout L = (kern_wlayout)lay;
        float *W = rnd(nw, 0.2f), *x = rnd(nx, 1), *dy = rnd(no, 1);
        float *y[2] = {zeros(no), zeros(no)}, *dx[2] = {zeros(nx), zeros(nx)}, *dW = zeros(nw);
        kern_backend *f = NULL;
        for (int pass = 0; pass < 3; pass++) {
            /* 0: b before the update, 1: b after it, 2: a new backend after it */
            kern_backend *e = pass < 2 ? b : (f = kern_backend_new(name, b->dtype, kern));
            int o = pass == 0 ? 0 : pass - 1; /* pass 0's results are overwritten */
            if (pass == 1) {
                kern_weight *w = b->weight_prepare(b, W, OC, C, L);
                int rows = lay == KERN_W_IN_OUT ? C : OC, strip = b->weight_refresh_rows(b, w);
                for (size_t i = 0; i < nw; i++)
                    W[i] += 0.5f * kiln_rng_normal(&rng);
                if (strip > 0) { /* as the optimizer: strip by strip, then fresh */
                    CHECK(rows % strip == 0);
                    for (int r0 = 0; r0 < rows; r0 += strip)
                        e->weight_refresh(e, w, r0);
                    e->weight_fresh(e, w);
                }
            }
            new_epoch(e); /* the forward's */
            if (mp) {
                kern_weight *w = e->weight_prepare(e, W, OC, C, L);
                kern_act *xa = act_of(e, x, N, C);
                kern_out ko = {.kind = KERN_OUT_F32, .y = y[o]};
                CHECK(e->mp.linear_fwd(e, &ko, xa, w, NULL, N));
                CHECK(e->mp.linear_bwd(e, w, dy, xa, KERN_ACT_NONE, N, dW, false, NULL, dx[o]));
                e->buf_free(e, xa);
            } else {
                e->ops->matmul_fwd(e->gemm, y[o], x, W, NULL, N, C, OC, L);
                e->ops->matmul_bwd(e->gemm, dx[o], NULL, NULL, dy, x, W, N, C, OC, L, false);
            }
        }
        bool strips = b->weight_refresh_rows(b, b->weight_prepare(b, W, OC, C, L)) > 0;
        within(strips ? "weight_refresh (strips) forward copy" : "weight epoch forward copy", y[0],
               y[1], NULL, no);
        within(strips ? "weight_refresh (strips) input-gradient copy"
                      : "weight epoch input-gradient copy",
               dx[0], dx[1], NULL, nx);
        kern_backend_free(f);
        free(W), free(x), free(dy), free(y[0]), free(y[1]), free(dx[0]), free(dx[1]), free(dW);
    }
}

/* ---- the inference ops (kern_ops: linear, rope_at, attention_kv) ---------------- */

/* The typed linear on every weight storage the engine prepares, at a
 * decode-sized and a prefill-sized T. Both backends dot the same operands
 * (bf16 activations rounded alike under KERN_BF16_DOT; Q types' 8-bit
 * activations from kern_quant_act below KERN_GEMM_MIN_T rows, fp32 from
 * it on), so they differ by accumulation only: |got - ref| <= (K + 8) u M,
 * M = sum_k |w_k| |x_k| over those operands (+ |bias|), the 8 covering the
 * per-block scale products and the final roundings. The products run on an
 * fp32 GEMM (the engine's; a backend's own GEMM may be its bf16 one). */
static void op_infer_linear(kern_backend *b)
{
    const kern_ops *k = b->ops, *Rf = R->ops;
    kern_gemm *g32 = kern_gemm_fast_new();
    const kiln_dtype types[] = {KILN_DTYPE_F32, KILN_DTYPE_F32, KILN_DTYPE_BF16, KILN_DTYPE_Q8_0,
                                KILN_DTYPE_Q4_0, KILN_DTYPE_Q4_K, KILN_DTYPE_Q6_K};
    const int Ts[] = {3, KERN_GEMM_MIN_T + 5};
    const int OC = 40, C = 512;
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++)
        for (int ts = 0; ts < 2; ts++) {
            int N = Ts[ts];
            kern_wlayout lay = ti == 1 ? KERN_W_IN_OUT : KERN_W_OUT_IN;
            size_t nw = (size_t)OC * C, no = (size_t)N * OC;
            float *w = rnd(nw, 0.2f), *x = rnd((size_t)N * C, 1), *bias = rnd((size_t)OC, 1);
            float *y = zeros(no), *yr = zeros(no), *wd = zeros((size_t)C), *xe = zeros((size_t)C);
            kern_wt src = {KILN_DTYPE_F32, lay, OC, C, w}, W;
            CHECK(kern_weight_prepare(types[ti], &src, &W));
            k->linear(g32, y, x, N, &W, bias);
            Rf->linear(kern_gemm_ref(), yr, x, N, &W, bias);
            const dtype_traits *tr = dtype_traits_of(W.dtype);
            size_t rb = dtype_row_bytes(W.dtype, C);
            int8_t q[512];
            float d[16];
            int32_t s16[32];
            double *tol = dzeros(no);
            for (int t = 0; t < N; t++) {
                const float *xt = x + (size_t)t * C;
                for (int c = 0; c < C; c++) xe[c] = xt[c]; /* the operand the products see */
                if (tr->quantized && N < KERN_GEMM_MIN_T) {
                    kern_quant_act(xt, C, q, d, s16);
                    for (int c = 0; c < C; c++) xe[c] = (float)q[c] * d[c / 32];
                } else if (W.dtype == KILN_DTYPE_BF16 && KERN_BF16_DOT) {
                    for (int c = 0; c < C; c++) xe[c] = bf16_to_f32(f32_to_bf16(xt[c]));
                }
                for (int o = 0; o < OC; o++) {
                    if (W.dtype == KILN_DTYPE_F32)
                        for (int c = 0; c < C; c++)
                            wd[c] = lay == KERN_W_IN_OUT ? w[(size_t)c * OC + o] : w[(size_t)o * C + c];
                    else
                        tr->to_float((const uint8_t *)W.data + rb * (size_t)o, wd, C);
                    double m = fabs(bias[o]);
                    for (int c = 0; c < C; c++) m += fabs((double)wd[c] * xe[c]);
                    tol[(size_t)t * OC + o] = (C + 8) * U32 * m;
                }
            }
            char what[64];
            snprintf(what, sizeof what, "linear %s%s T=%d", tr->name,
                     lay == KERN_W_IN_OUT ? " in_out" : "", N);
            within(what, y, yr, tol, no);
            kern_weight_free(&W);
            free(w), free(x), free(bias), free(y), free(yr), free(wd), free(xe), free(tol);
        }
    kern_gemm_free(g32);
}

/* rope_at: the same formula as ref's, one rounding per product and sum
 * (|x1 c| + |x2 s|) u * 2 per output. */
static void op_rope_at(kern_backend *b)
{
    enum { NCTX = 50, HS = 16, NHEADS = 6, STRIDE = 8 * 16, N = 9 };
    float cs[NCTX * HS / 2], sn[NCTX * HS / 2];
    for (int p = 0; p < NCTX; p++)
        for (int i = 0; i < HS / 2; i++) {
            cs[p * HS / 2 + i] = cosf(p * powf(10000.0f, -2.0f * i / HS));
            sn[p * HS / 2 + i] = sinf(p * powf(10000.0f, -2.0f * i / HS));
        }
    int pos[N] = {0, 49, 3, 3, 17, 1, 48, 25, 9};
    float *x = rnd((size_t)N * STRIDE, 1), *xr = malloc(sizeof(float) * N * STRIDE);
    memcpy(xr, x, sizeof(float) * N * STRIDE);
    double *tol = dzeros((size_t)N * STRIDE);
    for (int r = 0; r < N; r++)
        for (int h = 0; h < NHEADS; h++)
            for (int i = 0; i < HS / 2; i++) {
                size_t o = (size_t)r * STRIDE + (size_t)h * HS + i;
                double m = fabs(x[o]) + fabs(x[o + HS / 2]);
                tol[o] = tol[o + HS / 2] = 3 * U32 * m;
            }
    b->ops->rope_at(x, N, STRIDE, pos, cs, sn, NHEADS, HS);
    R->ops->rope_at(xr, N, STRIDE, pos, cs, sn, NHEADS, HS);
    within("rope_at", x, xr, tol, (size_t)N * STRIDE); /* untouched columns: bit for bit */
    free(x), free(xr), free(tol);
}

/* attention_kv against ref's double-precision softmax: each output is a
 * convex combination of value rows, so its error is bounded by the
 * probabilities' error times max |v| plus the sum's rounding; the fp32
 * softmax of n scores is within (n + HS + 8) u relative per probability
 * (exp's few ulp and the scale product included). */
static void op_attention_kv(kern_backend *b)
{
    enum { NH = 4, KVH = 2, HS = 16, NCTX = 40, S = 3, T = 6, QKV = (NH + 2 * KVH) * HS };
    const int KVD = KVH * HS;
    float *kc = rnd((size_t)S * NCTX * KVD, 1), *vc = rnd((size_t)S * NCTX * KVD, 1);
    float *q = rnd((size_t)T * QKV, 1), *o = zeros((size_t)T * NH * HS);
    float *orf = zeros((size_t)T * NH * HS), *sc = zeros((size_t)T * NH * NCTX);
    int slot[T] = {0, 2, 1, 2, 0, 1}, pos[T] = {0, 7, 39, 8, 3, 20};
    b->ops->attention_kv(o, q, QKV, T, slot, pos, kc, vc, (size_t)NCTX * KVD, NH, KVH, HS, NCTX, sc);
    R->ops->attention_kv(orf, q, QKV, T, slot, pos, kc, vc, (size_t)NCTX * KVD, NH, KVH, HS, NCTX,
                         sc);
    double mv = maxabs(vc, (size_t)S * NCTX * KVD);
    double *tol = dzeros((size_t)T * NH * HS);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NH * HS; i++)
            tol[(size_t)t * NH * HS + i] = (pos[t] + 1 + HS + 8) * 4 * U32 * mv * (pos[t] + 1);
    within("attention_kv", o, orf, tol, (size_t)T * NH * HS);
    free(kc), free(vc), free(q), free(o), free(orf), free(sc), free(tol);
}

/* ---- the loop ------------------------------------------------------------------- */

typedef struct backend_spec {
    const char *name;
    kiln_dtype dtype;
    kiln_bf16_kernel kernel;
} backend_spec;

static const backend_spec BACKENDS[] = {
    {"ref", KILN_DTYPE_BF16, KILN_BF16_KERNEL_AUTO}, {"cpu", KILN_DTYPE_BF16, KILN_BF16_KERNEL_AMX},
    {"cpu", KILN_DTYPE_BF16, KILN_BF16_KERNEL_AVX512}, {"cpu", KILN_DTYPE_BF16, KILN_BF16_KERNEL_REF},
    {"cpu", KILN_DTYPE_F16, KILN_BF16_KERNEL_AMX},  {"cpu", KILN_DTYPE_F16, KILN_BF16_KERNEL_AVX512},
    {"cpu", KILN_DTYPE_F16, KILN_BF16_KERNEL_REF},
    /* the f32 backend over the fast table, against it over the ref table */
    {"cpu", KILN_DTYPE_F32, KILN_BF16_KERNEL_AUTO}};

typedef struct op_spec {
    const char *name;
    void (*run)(kern_backend *b);
    bool mp; /* a kern_mp_ops entry (bf16 backends) */
} op_spec;

static const op_spec OPS[] = {
    {"buffers", op_buffers, false},
    {"ops_table", op_table, false},
    {"linear", op_infer_linear, false},
    {"rope_at", op_rope_at, false},
    {"attention_kv", op_attention_kv, false},
    {"act_pack", op_act_pack, true},
    {"rows", op_rows, true},
    {"norm_fwd", op_norm_fwd, true},
    {"linear_fwd", op_linear_fwd, true},
    {"act_fwd", op_act_fwd, true},
    {"act_bwd", op_act_bwd, true},
    {"linear_bwd", op_linear_bwd, true},
    {"mlp_bwd", op_mlp_bwd, true},
    {"ce_linear_bwd", op_ce_linear_bwd, true},
    {"attention_fwd", op_attention_fwd, true},
    {"attention_bwd", op_attention_bwd, true},
    {"attention_linear_bwd", op_attention_linear_bwd, true},
};

static void report(const char *label, const char *op)
{
    if (check_fails_) {
        printf("FAIL backend_ops %s %s\n", label, op);
        check_total_fails_++;
    } else if (check_skip_) {
        printf("SKIP backend_ops %s %s: %s\n", label, op, check_skip_);
    } else {
        printf("PASS backend_ops %s %s\n", label, op);
    }
    fflush(stdout);
}

int main(void)
{
    kiln_rng_seed(&rng, 16);
    kern_backend *Rb = kern_backend_new("ref", KILN_DTYPE_BF16, KILN_BF16_KERNEL_AUTO);
    kern_backend *Rf = kern_backend_new("ref", KILN_DTYPE_F32, KILN_BF16_KERNEL_AUTO);
    KILN_ASSERT(Rb && Rf);
    CHECK(kern_backend_new("no-such-backend", KILN_DTYPE_BF16, KILN_BF16_KERNEL_AUTO) == NULL);
    CHECK(kern_backend_new("no-such-backend", KILN_DTYPE_F32, KILN_BF16_KERNEL_AUTO) == NULL);
    CHECK(kern_backend_new("ref", KILN_DTYPE_F16, KILN_BF16_KERNEL_AUTO) == NULL);
    for (size_t i = 0; i < sizeof BACKENDS / sizeof BACKENDS[0]; i++) {
        const backend_spec *s = &BACKENDS[i];
        R = s->dtype == KILN_DTYPE_F32 ? Rf : Rb; /* the oracle of its dtype */
        kern_backend *b = kern_backend_new(s->name, s->dtype, s->kernel);
        char label[64];
        snprintf(label, sizeof label, "%s/%s/%s", s->name, kiln_dtype_name(s->dtype),
                 s->kernel == KILN_BF16_KERNEL_AUTO ? "auto" : kiln_bf16_kernel_name(s->kernel));
        check_fails_ = 0;
        check_skip_ = NULL;
        if (!b) {
            CHECK_MSG(b, "%s: backend not made", label);
            report(label, "new");
            continue;
        }
        if (s->kernel != KILN_BF16_KERNEL_AUTO && kern_backend_kernel(b) != s->kernel) {
            printf("SKIP backend_ops %s: this CPU lacks the kernel (runs %s)\n", label, b->kernel);
            kern_backend_free(b);
            continue;
        }
        worst = 0;
        for (size_t k = 0; k < sizeof OPS / sizeof OPS[0]; k++) {
            if (OPS[k].mp && !b->mp.linear_fwd) continue; /* checked NULL by ops_table */
            check_fails_ = 0;
            check_skip_ = NULL;
            OPS[k].run(b);
            report(label, OPS[k].name);
        }
        check_fails_ = 0;
        check_skip_ = NULL;
        op_weight_refresh(b, s->name, s->kernel);
        report(label, "weight_refresh");
        printf("  %s: largest error / bound %.3f\n", label, worst);
        kern_backend_free(b);
    }
    kern_backend_free(Rb);
    kern_backend_free(Rf);
    return TEST_EXIT();
}
