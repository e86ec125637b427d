/*
 * ref.c — the reference kernels: plain single-threaded C written to be
 * obviously right, the oracle the fast kernels are tested against. Sums
 * that feed normalisations are carried in double.
 */
#include "base/base.h"
#include "kernels/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- gemm ------------------------------------------------------------ */

static void ref_gemm(kern_gemm *g, bool ta, bool tb, int M, int N, int K,
                     float alpha, const float *A, int lda, const float *B,
                     int ldb, float beta, float *C, int ldc)
{
    (void)g;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) {
                float a = ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                float b = tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                acc += a * b;
            }
            float *c = &C[(size_t)i * ldc + j];
            *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
        }
}

static kern_gemm ref_gemm_obj = {"ref", ref_gemm, NULL, NULL, NULL};

kern_gemm *kern_gemm_ref(void) { return &ref_gemm_obj; }

void kern_gemm_free(kern_gemm *g)
{
    if (g && g->destroy) g->destroy(g);
}

/* ---- linear layers on top of gemm ------------------------------------ */

void kern_matmul_fwd_gemm(kern_gemm *g, float *out, const float *inp,
                          const float *w, const float *b, int N, int C,
                          int OC, kern_wlayout lay)
{
    if (lay == KERN_W_OUT_IN)
        g->gemm(g, false, true, N, OC, C, 1.0f, inp, C, w, C, 0.0f, out, OC);
    else
        g->gemm(g, false, false, N, OC, C, 1.0f, inp, C, w, OC, 0.0f, out, OC);
    if (b) {
#pragma omp parallel for schedule(static) if (g != &ref_gemm_obj && (size_t)N * OC > 65536)
        for (int n = 0; n < N; n++) {
            float *o = out + (size_t)n * OC;
            for (int j = 0; j < OC; j++) o[j] += b[j];
        }
    }
}

void kern_matmul_bwd_gemm(kern_gemm *g, float *dinp, float *dw, float *db,
                          const float *dout, const float *inp,
                          const float *w, int N, int C, int OC,
                          kern_wlayout lay, bool dinp_acc)
{
    float beta = dinp_acc ? 1.0f : 0.0f;
    if (dinp) {
        if (lay == KERN_W_OUT_IN) /* dinp = dout(N,OC) @ W(OC,C) */
            g->gemm(g, false, false, N, C, OC, 1.0f, dout, OC, w, C, beta,
                    dinp, C);
        else /* W (C,OC): dinp = dout @ W^T */
            g->gemm(g, false, true, N, C, OC, 1.0f, dout, OC, w, OC, beta,
                    dinp, C);
    }
    if (dw) {
        if (lay == KERN_W_OUT_IN) /* dW(OC,C) += dout^T @ inp */
            g->gemm(g, true, false, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f,
                    dw, C);
        else /* dW(C,OC) += inp^T @ dout */
            g->gemm(g, true, false, C, OC, N, 1.0f, inp, C, dout, OC, 1.0f,
                    dw, OC);
    }
    if (db) {
        /* Column sums, split by column: each output summed in row order. */
        int nb = (OC + 63) / 64;
#pragma omp parallel for schedule(static) if (g != &ref_gemm_obj && (size_t)N * OC > 65536)
        for (int blk = 0; blk < nb; blk++) {
            int j0 = blk * 64, j1 = j0 + 64 < OC ? j0 + 64 : OC;
            float acc[64];
            for (int j = j0; j < j1; j++) acc[j - j0] = 0.0f;
            for (int n = 0; n < N; n++) {
                const float *d = dout + (size_t)n * OC;
                for (int j = j0; j < j1; j++) acc[j - j0] += d[j];
            }
            for (int j = j0; j < j1; j++) db[j] += acc[j - j0];
        }
    }
}

/* ---- embeddings ------------------------------------------------------ */

static void ref_embed_fwd(float *out, const int32_t *tok, const float *wte,
                          const float *wpe, int B, int T, int C)
{
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *e = wte + (size_t)tok[b * T + t] * C;
            for (int i = 0; i < C; i++)
                o[i] = e[i] + (wpe ? wpe[(size_t)t * C + i] : 0.0f);
        }
}

static void ref_embed_bwd(float *dwte, float *dwpe, const float *dout,
                          const int32_t *tok, int B, int T, int C, int V)
{
    (void)V;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *d = dout + ((size_t)b * T + t) * C;
            if (dwte) {
                float *e = dwte + (size_t)tok[b * T + t] * C;
                for (int i = 0; i < C; i++) e[i] += d[i];
            }
            if (dwpe)
                for (int i = 0; i < C; i++) dwpe[(size_t)t * C + i] += d[i];
        }
}

/* ---- norms ----------------------------------------------------------- */

static void ref_layernorm_fwd(float *out, float *mean, float *rstd,
                              const float *inp, const float *w,
                              const float *b, int N, int C, float eps)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        double m = 0, v = 0;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        v /= C;
        float s = (float)(1.0 / sqrt(v + eps));
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++)
            o[i] = ((x[i] - (float)m) * s) * w[i] + (b ? b[i] : 0.0f);
        mean[n] = (float)m;
        rstd[n] = s;
    }
}

static void ref_layernorm_bwd(float *dinp, float *dw, float *db,
                              const float *dout, const float *inp,
                              const float *w, const float *mean,
                              const float *rstd, int N, int C)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
        float m = mean[n], s = rstd[n];
        double dsum = 0, dxsum = 0;
        for (int i = 0; i < C; i++) {
            float xh = (x[i] - m) * s;
            float dn = w[i] * d[i];
            dsum += dn;
            dxsum += dn * xh;
        }
        float dm = (float)(dsum / C), dxm = (float)(dxsum / C);
        float *di = dinp + (size_t)n * C;
        for (int i = 0; i < C; i++) {
            float xh = (x[i] - m) * s;
            if (db) db[i] += d[i];
            if (dw) dw[i] += xh * d[i];
            di[i] += (w[i] * d[i] - dm - xh * dxm) * s;
        }
    }
}

static void ref_rmsnorm_fwd(float *out, float *rstd, const float *inp,
                            const float *w, int N, int C, float eps)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        double ss = 0;
        for (int i = 0; i < C; i++) ss += (double)x[i] * x[i];
        float s = (float)(1.0 / sqrt(ss / C + eps));
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = w[i] * (x[i] * s);
        rstd[n] = s;
    }
}

static void ref_rmsnorm_bwd(float *dinp, float *dw, const float *dout,
                            const float *inp, const float *w,
                            const float *rstd, int N, int C)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
        float s = rstd[n];
        double dot = 0;
        for (int i = 0; i < C; i++) dot += (double)w[i] * d[i] * x[i];
        /* d/dx_i of x_i*s: s*dn_i - x_i * s^3 * sum_j dn_j x_j / C */
        float k = (float)(dot / C) * s * s * s;
        float *di = dinp + (size_t)n * C;
        for (int i = 0; i < C; i++) {
            if (dw) dw[i] += d[i] * x[i] * s;
            di[i] += w[i] * d[i] * s - x[i] * k;
        }
    }
}

/* ---- activations ------------------------------------------------------ */

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */

static void ref_gelu_fwd(float *out, const float *inp, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float u = GELU_K * (x + 0.044715f * x * x * x);
        out[i] = 0.5f * x * (1.0f + tanhf(u));
    }
}

static void ref_gelu_bwd(float *dinp, const float *inp, const float *dout,
                         size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float u = GELU_K * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;
        float g = 0.5f * (1.0f + th) +
                  0.5f * x * sech2 * GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = g * dout[i];
    }
}

static void ref_swiglu_fwd(float *out, const float *inp, int N, int F)
{
    for (int n = 0; n < N; n++) {
        const float *g = inp + (size_t)n * 2 * F, *u = g + F;
        float *o = out + (size_t)n * F;
        for (int i = 0; i < F; i++) {
            float sg = 1.0f / (1.0f + expf(-g[i]));
            o[i] = g[i] * sg * u[i];
        }
    }
}

static void ref_swiglu_bwd(float *dinp, const float *inp, const float *dout,
                           int N, int F)
{
    for (int n = 0; n < N; n++) {
        const float *g = inp + (size_t)n * 2 * F, *u = g + F;
        const float *d = dout + (size_t)n * F;
        float *dg = dinp + (size_t)n * 2 * F, *du = dg + F;
        for (int i = 0; i < F; i++) {
            float sg = 1.0f / (1.0f + expf(-g[i]));
            float silu = g[i] * sg;
            du[i] = d[i] * silu;
            dg[i] = d[i] * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
        }
    }
}

/* ---- rope ------------------------------------------------------------ */

static void ref_rope(float *qkv, const float *cos_t, const float *sin_t,
                     int B, int T, int NH, int KVH, int HS, bool inverse)
{
    int S = (NH + 2 * KVH) * HS, half = HS / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *row = qkv + ((size_t)b * T + t) * S;
            const float *c = cos_t + (size_t)t * half, *s = sin_t + (size_t)t * half;
            for (int h = 0; h < NH + KVH; h++) {
                float *x = row + h * HS;
                for (int i = 0; i < half; i++) {
                    float x1 = x[i], x2 = x[i + half];
                    float sn = inverse ? -s[i] : s[i];
                    x[i] = x1 * c[i] - x2 * sn;
                    x[i + half] = x2 * c[i] + x1 * sn;
                }
            }
        }
}

/* ---- attention -------------------------------------------------------- */

/* Row by row, no buffers: each probability is recomputed from q, k and the
 * row's log-sum-exp, p(t, t2) = exp(scale q_t . k_t2 - lse_t). */

static float ref_score(const float *q, const float *k, int HS, float scale)
{
    float dot = 0.0f;
    for (int i = 0; i < HS; i++) dot += q[i] * k[i];
    return dot * scale;
}

static void ref_attention_fwd(kern_gemm *g, float *out, float *lse,
                              const float *qkv, int B, int T, int NH, int KVH,
                              int HS)
{
    (void)g;
    int S = (NH + 2 * KVH) * HS, grp = NH / KVH;
    float scale = 1.0f / sqrtf((float)HS);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int kh = h / grp;
            const float *kb = qkv + (size_t)b * T * S + (NH + kh) * HS;
            const float *vb = qkv + (size_t)b * T * S + (NH + KVH + kh) * HS;
            for (int t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * S + h * HS;
                float mx = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    float s = ref_score(q, kb + (size_t)t2 * S, HS, scale);
                    if (s > mx) mx = s;
                }
                double sum = 0;
                for (int t2 = 0; t2 <= t; t2++)
                    sum += exp((double)ref_score(q, kb + (size_t)t2 * S, HS, scale) - mx);
                float l = mx + (float)log(sum);
                lse[((size_t)b * NH + h) * T + t] = l;
                float *o = out + ((size_t)b * T + t) * NH * HS + h * HS;
                for (int i = 0; i < HS; i++) o[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    float p = expf(ref_score(q, kb + (size_t)t2 * S, HS, scale) - l);
                    const float *v = vb + (size_t)t2 * S;
                    for (int i = 0; i < HS; i++) o[i] += p * v[i];
                }
            }
        }
}

static void ref_attention_bwd(kern_gemm *g, float *dqkv, const float *dout,
                              const float *qkv, const float *out,
                              const float *lse, int B, int T, int NH, int KVH,
                              int HS)
{
    (void)g;
    int S = (NH + 2 * KVH) * HS, grp = NH / KVH;
    float scale = 1.0f / sqrtf((float)HS);
    memset(dqkv, 0, (size_t)B * T * S * sizeof(float));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int kh = h / grp;
            for (int t = 0; t < T; t++) {
                size_t row = (size_t)b * T + t;
                const float *d = dout + row * NH * HS + h * HS;
                const float *o = out + row * NH * HS + h * HS;
                const float *q = qkv + row * S + h * HS;
                float *dq = dqkv + row * S + h * HS;
                float l = lse[((size_t)b * NH + h) * T + t];
                /* D = rowsum(dO * O) = sum_t2 p dp */
                double D = 0;
                for (int i = 0; i < HS; i++) D += (double)d[i] * o[i];
                for (int t2 = 0; t2 <= t; t2++) {
                    size_t r2 = ((size_t)b * T + t2) * S;
                    const float *k = qkv + r2 + (NH + kh) * HS;
                    const float *v = qkv + r2 + (NH + KVH + kh) * HS;
                    float *dk = dqkv + r2 + (NH + kh) * HS;
                    float *dv = dqkv + r2 + (NH + KVH + kh) * HS;
                    float p = expf(ref_score(q, k, HS, scale) - l);
                    float dp = 0.0f;
                    for (int i = 0; i < HS; i++) {
                        dp += d[i] * v[i];
                        dv[i] += p * d[i];
                    }
                    float ds = p * (dp - (float)D) * scale;
                    for (int i = 0; i < HS; i++) {
                        dq[i] += ds * k[i];
                        dk[i] += ds * q[i];
                    }
                }
            }
        }
}

/* ---- misc ------------------------------------------------------------- */

static void ref_add(float *out, const float *a, const float *b, size_t n)
{
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

static void ref_cross_entropy(const float *logits, const int32_t *targets,
                              const float *mask, int64_t N, int V,
                              float grad_scale, float *dlogits,
                              double *loss_sum, double *weight_sum)
{
    double ls = 0, ws = 0;
    for (int64_t n = 0; n < N; n++) {
        const float *x = logits + n * V;
        float *d = dlogits ? dlogits + n * V : NULL;
        int tgt = targets[n];
        float wgt = mask ? mask[n] : 1.0f;
        if (tgt < 0) {
            if (d) memset(d, 0, (size_t)V * sizeof(float));
            continue;
        }
        float mx = -INFINITY;
        for (int i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
        double sum = 0;
        for (int i = 0; i < V; i++) sum += exp((double)x[i] - mx);
        double lse = mx + log(sum);
        ls += wgt * (lse - x[tgt]);
        ws += wgt;
        if (d) {
            float k = grad_scale * wgt;
            float xt = x[tgt];
            for (int i = 0; i < V; i++) d[i] = k * (float)exp((double)x[i] - lse);
            d[tgt] = k * ((float)exp((double)xt - lse) - 1.0f);
        }
    }
    *loss_sum += ls;
    *weight_sum += ws;
}

/* ---- inference ops ---------------------------------------------------- */

/* One output at a time, summed in double: the oracle of every backend's
 * linear. The weight may be stored either way round; with bf16 weights
 * the activations of a decode-sized step are rounded as the fast kernel
 * rounds them (KERN_BF16_DOT), a prefill-sized step's stay fp32 (the
 * widened weights go through the GEMM). g is unused. */
static void ref_linear_q(float *Y, const float *X, int T, const kern_wt *W, const float *b)
{
    const int R = W->rows, K = W->cols, nb = K / 32;
    const size_t rb = dtype_row_bytes(W->dtype, K);
    int8_t *q = malloc((size_t)K);
    float *d = malloc(sizeof(float) * (size_t)nb);
    int32_t *s16 = malloc(sizeof(int32_t) * 2 * (size_t)nb);
    float *wd = malloc(sizeof(float) * (size_t)K);
    KILN_ASSERT(q && d && s16 && wd);
    if (T >= KERN_GEMM_MIN_T) { /* prefill-sized: dequantized weights, fp32 activations */
        for (int r = 0; r < R; r++) {
            dtype_traits_of(W->dtype)->to_float((const uint8_t *)W->data + rb * (size_t)r, wd, K);
            for (int t = 0; t < T; t++) {
                double acc = b ? b[r] : 0.0;
                for (int k = 0; k < K; k++) acc += (double)wd[k] * X[(size_t)t * K + k];
                Y[(size_t)t * R + r] = (float)acc;
            }
        }
        free(q), free(d), free(s16), free(wd);
        return;
    }
    for (int t = 0; t < T; t++) {
        kern_quant_act(X + (size_t)t * K, K, q, d, s16);
        for (int r = 0; r < R; r++)
            Y[(size_t)t * R + r] =
                (float)((b ? b[r] : 0.0) +
                        kern_qdot_ref(W->dtype, (const uint8_t *)W->data + rb * (size_t)r, K, q, d,
                                      s16));
    }
    free(q), free(d), free(s16), free(wd);
}

static void ref_linear(kern_gemm *g, float *Y, const float *X, int T, const kern_wt *W,
                       const float *b)
{
    (void)g;
    if (dtype_traits_of(W->dtype)->quantized) {
        ref_linear_q(Y, X, T, W, b);
        return;
    }
    const int R = W->rows, K = W->cols;
    const bool f32 = W->dtype == KILN_DTYPE_F32, io = W->lay == KERN_W_IN_OUT;
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) {
            double s = b ? b[r] : 0.0;
            for (int k = 0; k < K; k++) {
                size_t i = io ? (size_t)k * R + r : (size_t)r * K + k;
                float w = f32 ? ((const float *)W->data)[i]
                              : bf16_to_f32(((const uint16_t *)W->data)[i]);
                float x = X[(size_t)t * K + k];
                if (!f32 && KERN_BF16_DOT && T < KERN_GEMM_MIN_T) x = bf16_to_f32(f32_to_bf16(x));
                s += (double)w * x;
            }
            Y[(size_t)t * R + r] = (float)s;
        }
}

static void ref_rope_at(float *x, int n, size_t stride, const int *pos, const float *cos_t,
                        const float *sin_t, int nheads, int HS)
{
    int half = HS / 2;
    for (int r = 0; r < n; r++) {
        const float *c = cos_t + (size_t)pos[r] * half, *s = sin_t + (size_t)pos[r] * half;
        for (int h = 0; h < nheads; h++) {
            float *v = x + (size_t)r * stride + (size_t)h * HS;
            for (int i = 0; i < half; i++) {
                float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * s[i];
                v[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/* Softmax in double over each row's scores, then the weighted sum of the
 * values; the scratch is unused. */
static void ref_attention_kv(float *out, const float *qkv, size_t qkv_stride, int T,
                             const int *slot, const int *pos, const float *kc, const float *vc,
                             size_t slot_stride, int NH, int KVH, int HS, int n_ctx,
                             float *scores)
{
    (void)n_ctx, (void)scores;
    const int grp = NH / KVH, KVD = KVH * HS;
    const double scale = 1.0 / sqrt((double)HS);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < NH; h++) {
            const float *q = qkv + (size_t)t * qkv_stride + (size_t)h * HS;
            const size_t base = (size_t)slot[t] * slot_stride + (size_t)(h / grp) * HS;
            float *o = out + (size_t)t * NH * HS + (size_t)h * HS;
            double mx = -INFINITY, sum = 0;
            for (int j = 0; j <= pos[t]; j++) {
                double s = 0;
                for (int i = 0; i < HS; i++) s += (double)q[i] * kc[base + (size_t)j * KVD + i];
                if (s * scale > mx) mx = s * scale;
            }
            for (int i = 0; i < HS; i++) o[i] = 0;
            for (int pass = 0; pass < 2; pass++) /* sum, then the weighted values */
                for (int j = 0; j <= pos[t]; j++) {
                    double s = 0;
                    for (int i = 0; i < HS; i++) s += (double)q[i] * kc[base + (size_t)j * KVD + i];
                    double p = exp(s * scale - mx);
                    if (pass == 0) sum += p;
                    else
                        for (int i = 0; i < HS; i++)
                            o[i] += (float)(p / sum * vc[base + (size_t)j * KVD + i]);
                }
        }
}

static const kern_ops ref_ops = {
    .name = "ref",
    .matmul_fwd = kern_matmul_fwd_gemm,
    .matmul_bwd = kern_matmul_bwd_gemm,
    .embed_fwd = ref_embed_fwd,
    .embed_bwd = ref_embed_bwd,
    .layernorm_fwd = ref_layernorm_fwd,
    .layernorm_bwd = ref_layernorm_bwd,
    .rmsnorm_fwd = ref_rmsnorm_fwd,
    .rmsnorm_bwd = ref_rmsnorm_bwd,
    .gelu_fwd = ref_gelu_fwd,
    .gelu_bwd = ref_gelu_bwd,
    .swiglu_fwd = ref_swiglu_fwd,
    .swiglu_bwd = ref_swiglu_bwd,
    .rope = ref_rope,
    .linear = ref_linear,
    .rope_at = ref_rope_at,
    .attention_kv = ref_attention_kv,
    .attention_fwd = ref_attention_fwd,
    .attention_bwd = ref_attention_bwd,
    .add = ref_add,
    .cross_entropy = ref_cross_entropy,
};

const kern_ops *kern_ops_ref(void) { return &ref_ops; }
