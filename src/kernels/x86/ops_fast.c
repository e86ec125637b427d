/*
 * ops_fast.c — the fast kernel table: OpenMP threading over rows (or over
 * columns for reductions across rows, so every output is summed by one
 * thread in a fixed order: deterministic for any thread count), AVX-512
 * inner loops with scalar tails, and attention built from per-head GEMMs
 * on causal row blocks. Compiled without AVX-512 the same code runs its
 * scalar paths.
 */
#include "kernels/kernels.h"
#include "kernels/x86/simd.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PAR_MIN 16384 /* below this many elements, stay single-threaded */

/* ---- embeddings ------------------------------------------------------- */

static void fast_embed_fwd(float *out, const int32_t *tok, const float *wte,
                           const float *wpe, int B, int T, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)B * T * C > PAR_MIN)
    for (int n = 0; n < B * T; n++) {
        float *o = out + (size_t)n * C;
        const float *e = wte + (size_t)tok[n] * C;
        if (wpe) {
            const float *p = wpe + (size_t)(n % T) * C;
#pragma omp simd
            for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
        } else {
            memcpy(o, e, (size_t)C * sizeof(float));
        }
    }
}

/* Parallel over column blocks: each thread owns channels [c0, c1) of every
 * row of dwte/dwpe and walks the tokens in order. */
static void fast_embed_bwd(float *dwte, float *dwpe, const float *dout,
                           const int32_t *tok, int B, int T, int C, int V)
{
    (void)V;
    int nb = (C + 31) / 32;
#pragma omp parallel for schedule(static) if ((size_t)B * T * C > PAR_MIN)
    for (int blk = 0; blk < nb; blk++) {
        int c0 = blk * 32, c1 = c0 + 32 < C ? c0 + 32 : C;
        for (int n = 0; n < B * T; n++) {
            const float *d = dout + (size_t)n * C;
            float *e = dwte + (size_t)tok[n] * C;
            for (int i = c0; i < c1; i++) e[i] += d[i];
            if (dwpe) {
                float *p = dwpe + (size_t)(n % T) * C;
                for (int i = c0; i < c1; i++) p[i] += d[i];
            }
        }
    }
}

/* ---- norms ------------------------------------------------------------ */

static void fast_layernorm_fwd(float *out, float *mean, float *rstd,
                               const float *inp, const float *w,
                               const float *b, int N, int C, float eps)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < C; i++) s += x[i];
        float m = s / C;
        float v = 0.0f;
#pragma omp simd reduction(+ : v)
        for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
        float r = 1.0f / sqrtf(v / C + eps);
        float *o = out + (size_t)n * C;
        if (b) {
#pragma omp simd
            for (int i = 0; i < C; i++) o[i] = (x[i] - m) * r * w[i] + b[i];
        } else {
#pragma omp simd
            for (int i = 0; i < C; i++) o[i] = (x[i] - m) * r * w[i];
        }
        mean[n] = m;
        rstd[n] = r;
    }
}

static void fast_layernorm_bwd(float *dinp, float *dw, float *db,
                               const float *dout, const float *inp,
                               const float *w, const float *mean,
                               const float *rstd, int N, int C)
{
    /* pass 1: dinp, rows in parallel */
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
        float m = mean[n], r = rstd[n];
        float ds = 0.0f, dxs = 0.0f;
#pragma omp simd reduction(+ : ds, dxs)
        for (int i = 0; i < C; i++) {
            float dn = w[i] * d[i];
            ds += dn;
            dxs += dn * (x[i] - m) * r;
        }
        ds /= C;
        dxs /= C;
        float *di = dinp + (size_t)n * C;
#pragma omp simd
        for (int i = 0; i < C; i++)
            di[i] += (w[i] * d[i] - ds - (x[i] - m) * r * dxs) * r;
    }
    /* pass 2: dw, db, columns in parallel, rows in order */
    int nb = (C + 63) / 64;
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int blk = 0; blk < nb; blk++) {
        int c0 = blk * 64, c1 = c0 + 64 < C ? c0 + 64 : C, w0 = c1 - c0;
        float aw[64], ab[64];
        for (int i = 0; i < w0; i++) aw[i] = ab[i] = 0.0f;
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C + c0, *d = dout + (size_t)n * C + c0;
            float m = mean[n], r = rstd[n];
#pragma omp simd
            for (int i = 0; i < w0; i++) {
                aw[i] += (x[i] - m) * r * d[i];
                ab[i] += d[i];
            }
        }
        for (int i = 0; i < w0; i++) {
            dw[c0 + i] += aw[i];
            if (db) db[c0 + i] += ab[i];
        }
    }
}

static void fast_rmsnorm_fwd(float *out, float *rstd, const float *inp,
                             const float *w, int N, int C, float eps)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < C; i++) ss += x[i] * x[i];
        float r = 1.0f / sqrtf(ss / C + eps);
        float *o = out + (size_t)n * C;
#pragma omp simd
        for (int i = 0; i < C; i++) o[i] = w[i] * (x[i] * r);
        rstd[n] = r;
    }
}

static void fast_rmsnorm_bwd(float *dinp, float *dw, const float *dout,
                             const float *inp, const float *w,
                             const float *rstd, int N, int C)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
        float r = rstd[n], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int i = 0; i < C; i++) dot += w[i] * d[i] * x[i];
        float k = dot / C * r * r * r;
        float *di = dinp + (size_t)n * C;
#pragma omp simd
        for (int i = 0; i < C; i++) di[i] += w[i] * d[i] * r - x[i] * k;
    }
    int nb = (C + 63) / 64;
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int blk = 0; blk < nb; blk++) {
        int c0 = blk * 64, c1 = c0 + 64 < C ? c0 + 64 : C, w0 = c1 - c0;
        float aw[64];
        for (int i = 0; i < w0; i++) aw[i] = 0.0f;
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C + c0, *d = dout + (size_t)n * C + c0;
            float r = rstd[n];
#pragma omp simd
            for (int i = 0; i < w0; i++) aw[i] += d[i] * x[i] * r;
        }
        for (int i = 0; i < w0; i++) dw[c0 + i] += aw[i];
    }
}

/* ---- activations ------------------------------------------------------ */

#define GELU_K 0.7978845608028654f
#define GELU_A 0.044715f
#define CHUNK 4096

static void fast_gelu_fwd(float *out, const float *inp, size_t n)
{
    long nc = (long)((n + CHUNK - 1) / CHUNK);
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (long c = 0; c < nc; c++) {
        size_t i = (size_t)c * CHUNK, e = i + CHUNK < n ? i + CHUNK : n;
#ifdef __AVX512F__
        for (; i + 16 <= e; i += 16) {
            __m512 x = _mm512_loadu_ps(inp + i);
            __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            __m512 u = _mm512_mul_ps(_mm512_set1_ps(GELU_K),
                                     _mm512_fmadd_ps(_mm512_set1_ps(GELU_A), x3, x));
            __m512 t = vtanh(u);
            __m512 hx = _mm512_mul_ps(_mm512_set1_ps(0.5f), x);
            _mm512_storeu_ps(out + i, _mm512_fmadd_ps(hx, t, hx));
        }
#endif
        for (; i < e; i++) {
            float x = inp[i];
            out[i] = 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x)));
        }
    }
}

static void fast_gelu_bwd(float *dinp, const float *inp, const float *dout, size_t n)
{
    long nc = (long)((n + CHUNK - 1) / CHUNK);
#pragma omp parallel for schedule(static) if (n > PAR_MIN)
    for (long c = 0; c < nc; c++) {
        size_t i = (size_t)c * CHUNK, e = i + CHUNK < n ? i + CHUNK : n;
#ifdef __AVX512F__
        const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
        const __m512 k = _mm512_set1_ps(GELU_K), a3 = _mm512_set1_ps(3.0f * GELU_A);
        for (; i + 16 <= e; i += 16) {
            __m512 x = _mm512_loadu_ps(inp + i);
            __m512 x2 = _mm512_mul_ps(x, x);
            __m512 u = _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(GELU_A), x2), x, x));
            __m512 t = vtanh(u);
            __m512 sech2 = _mm512_fnmadd_ps(t, t, one);
            __m512 du = _mm512_mul_ps(k, _mm512_fmadd_ps(a3, x2, one));
            /* g = 0.5 (1 + t) + 0.5 x sech2 du */
            __m512 g = _mm512_fmadd_ps(_mm512_mul_ps(half, x), _mm512_mul_ps(sech2, du),
                                       _mm512_mul_ps(half, _mm512_add_ps(one, t)));
            _mm512_storeu_ps(dinp + i, _mm512_mul_ps(g, _mm512_loadu_ps(dout + i)));
        }
#endif
        for (; i < e; i++) {
            float x = inp[i];
            float th = tanhf(GELU_K * (x + GELU_A * x * x * x));
            float g = 0.5f * (1.0f + th) +
                      0.5f * x * (1.0f - th * th) * GELU_K * (1.0f + 3.0f * GELU_A * x * x);
            dinp[i] = g * dout[i];
        }
    }
}

static void fast_swiglu_fwd(float *out, const float *inp, int N, int F)
{
#pragma omp parallel for schedule(static) if ((size_t)N * F > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *g = inp + (size_t)n * 2 * F, *u = g + F;
        float *o = out + (size_t)n * F;
        int i = 0;
#ifdef __AVX512F__
        for (; i + 16 <= F; i += 16) {
            __m512 gv = _mm512_loadu_ps(g + i);
            __m512 s = vsigmoid(gv);
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_mul_ps(gv, s), _mm512_loadu_ps(u + i)));
        }
#endif
        for (; i < F; i++) {
            float sg = 1.0f / (1.0f + expf(-g[i]));
            o[i] = g[i] * sg * u[i];
        }
    }
}

static void fast_swiglu_bwd(float *dinp, const float *inp, const float *dout, int N, int F)
{
#pragma omp parallel for schedule(static) if ((size_t)N * F > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *g = inp + (size_t)n * 2 * F, *u = g + F, *d = dout + (size_t)n * F;
        float *dg = dinp + (size_t)n * 2 * F, *du = dg + F;
        int i = 0;
#ifdef __AVX512F__
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= F; i += 16) {
            __m512 gv = _mm512_loadu_ps(g + i), dv = _mm512_loadu_ps(d + i);
            __m512 s = vsigmoid(gv);
            __m512 silu = _mm512_mul_ps(gv, s);
            _mm512_storeu_ps(du + i, _mm512_mul_ps(dv, silu));
            /* dg = d u s (1 + g (1 - s)) */
            __m512 t = _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one);
            _mm512_storeu_ps(dg + i, _mm512_mul_ps(_mm512_mul_ps(dv, _mm512_loadu_ps(u + i)),
                                                   _mm512_mul_ps(s, t)));
        }
#endif
        for (; i < F; i++) {
            float sg = 1.0f / (1.0f + expf(-g[i]));
            du[i] = d[i] * g[i] * sg;
            dg[i] = d[i] * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
        }
    }
}

static void fast_rope(float *qkv, const float *cos_t, const float *sin_t, int B,
                      int T, int NH, int KVH, int HS, bool inverse)
{
    int S = (NH + 2 * KVH) * HS, half = HS / 2;
    float sg = inverse ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static) if ((size_t)B * T * S > PAR_MIN)
    for (int n = 0; n < B * T; n++) {
        int t = n % T;
        float *row = qkv + (size_t)n * S;
        const float *c = cos_t + (size_t)t * half, *s = sin_t + (size_t)t * half;
        for (int h = 0; h < NH + KVH; h++) {
            float *x = row + h * HS;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                float x1 = x[i], x2 = x[i + half], sn = sg * s[i];
                x[i] = x1 * c[i] - x2 * sn;
                x[i + half] = x2 * c[i] + x1 * sn;
            }
        }
    }
}

/* ---- attention --------------------------------------------------------- */

#define TB 64 /* causal row block */

/* Softmax of row a[0..len) in place (len >= 1), zeroing a[len..zero_to). */
static void softmax_row(float *a, int len, int zero_to)
{
    float mx = -INFINITY;
    int i = 0;
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= len; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(a + i));
    mx = _mm512_reduce_max_ps(vm);
#endif
    for (; i < len; i++) mx = a[i] > mx ? a[i] : mx;
    float sum = 0.0f;
    i = 0;
#ifdef __AVX512F__
    __m512 vs = _mm512_setzero_ps(), vmx = _mm512_set1_ps(mx);
    for (; i + 16 <= len; i += 16) {
        __m512 e = vexp(_mm512_sub_ps(_mm512_loadu_ps(a + i), vmx));
        _mm512_storeu_ps(a + i, e);
        vs = _mm512_add_ps(vs, e);
    }
    sum = _mm512_reduce_add_ps(vs);
#endif
    for (; i < len; i++) {
        a[i] = expf(a[i] - mx);
        sum += a[i];
    }
    float inv = 1.0f / sum;
#pragma omp simd
    for (int j = 0; j < len; j++) a[j] *= inv;
    for (int j = len; j < zero_to; j++) a[j] = 0.0f;
}

static void fast_attention_fwd(kern_gemm *model_gemm, float *out, float *att,
                               const float *qkv, int B, int T, int NH, int KVH,
                               int HS)
{
    (void)model_gemm;
    kern_gemm *g = kern_gemm_threadsafe();
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, grp = NH / KVH;
    float scale = 1.0f / sqrtf((float)HS);
#pragma omp parallel for schedule(dynamic, 1)
    for (int bh = 0; bh < B * NH; bh++) {
        int b = bh / NH, h = bh % NH, kh = h / grp;
        const float *q = qkv + (size_t)b * T * S + h * HS;
        const float *k = qkv + (size_t)b * T * S + (NH + kh) * HS;
        const float *v = qkv + (size_t)b * T * S + (NH + KVH + kh) * HS;
        float *a = att + (size_t)bh * T * T;
        float *o = out + (size_t)b * T * OC + h * HS;
        for (int r0 = 0; r0 < T; r0 += TB) {
            int r1 = r0 + TB < T ? r0 + TB : T;
            /* scores (r1-r0, r1) = scale * q[r0:r1] k[0:r1]^T */
            g->gemm(g, false, true, r1 - r0, r1, HS, scale, q + (size_t)r0 * S, S, k, S, 0.0f,
                    a + (size_t)r0 * T, T);
            for (int t = r0; t < r1; t++) softmax_row(a + (size_t)t * T, t + 1, T);
            g->gemm(g, false, false, r1 - r0, HS, r1, 1.0f, a + (size_t)r0 * T, T, v, S, 0.0f,
                    o + (size_t)r0 * OC, OC);
        }
    }
}

static void fast_attention_bwd(kern_gemm *model_gemm, float *dqkv, float *datt,
                               const float *dout, const float *qkv,
                               const float *att, int B, int T, int NH, int KVH,
                               int HS)
{
    (void)model_gemm;
    kern_gemm *g = kern_gemm_threadsafe();
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, grp = NH / KVH;
    float scale = 1.0f / sqrtf((float)HS);
    /* One task per (batch, kv head): the query heads sharing a kv head
     * accumulate into its dk/dv in a fixed order. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int bk = 0; bk < B * KVH; bk++) {
        int b = bk / KVH, kh = bk % KVH;
        const float *base = qkv + (size_t)b * T * S;
        float *dbase = dqkv + (size_t)b * T * S;
        const float *k = base + (NH + kh) * HS, *v = base + (NH + KVH + kh) * HS;
        float *dk = dbase + (NH + kh) * HS, *dv = dbase + (NH + KVH + kh) * HS;
        for (int t = 0; t < T; t++) {
            memset(dk + (size_t)t * S, 0, (size_t)HS * sizeof(float));
            memset(dv + (size_t)t * S, 0, (size_t)HS * sizeof(float));
        }
        for (int h = kh * grp; h < (kh + 1) * grp; h++) {
            size_t bh = (size_t)b * NH + h;
            const float *a = att + bh * T * T;
            float *da = datt + bh * T * T;
            const float *q = base + h * HS;
            float *dq = dbase + h * HS;
            const float *d = dout + (size_t)b * T * OC + h * HS;
            for (int r0 = 0; r0 < T; r0 += TB) {
                int r1 = r0 + TB < T ? r0 + TB : T, nr = r1 - r0;
                float *dar = da + (size_t)r0 * T;
                const float *ar = a + (size_t)r0 * T;
                /* dP = dO V^T */
                g->gemm(g, false, true, nr, r1, HS, 1.0f, d + (size_t)r0 * OC, OC, v, S, 0.0f,
                        dar, T);
                /* dS = P (dP - rowsum(P dP)) * scale, in place in datt */
                for (int t = r0; t < r1; t++) {
                    float *dp = da + (size_t)t * T;
                    const float *p = a + (size_t)t * T;
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int j = 0; j <= t; j++) s += p[j] * dp[j];
#pragma omp simd
                    for (int j = 0; j < r1; j++) dp[j] = p[j] * (dp[j] - s) * scale;
                }
                /* dQ = dS K ; dK += dS^T Q ; dV += P^T dO */
                g->gemm(g, false, false, nr, HS, r1, 1.0f, dar, T, k, S, 0.0f,
                        dq + (size_t)r0 * S, S);
                g->gemm(g, true, false, r1, HS, nr, 1.0f, dar, T, q + (size_t)r0 * S, S, 1.0f,
                        dk, S);
                g->gemm(g, true, false, r1, HS, nr, 1.0f, ar, T, d + (size_t)r0 * OC, OC, 1.0f,
                        dv, S);
            }
        }
    }
}

/* ---- misc ------------------------------------------------------------- */

static void fast_add(float *out, const float *a, const float *b, size_t n)
{
#pragma omp parallel for simd schedule(static) if (n > PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* One row: returns -log softmax(x)[tgt] and (when d) writes k * (softmax -
 * onehot). d may alias x: exp(x - max) is stored in d on the way and
 * scaled by k / sum afterwards, so each logit is exponentiated once. */
static double ce_row(const float *x, float *d, int V, int tgt, float k)
{
    float mx = -INFINITY, xt = x[tgt];
    int i = 0;
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= V; i += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(x + i));
    mx = _mm512_reduce_max_ps(vm);
#endif
    for (; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    float sum = 0.0f;
    i = 0;
#ifdef __AVX512F__
    __m512 vs = _mm512_setzero_ps(), vmx = _mm512_set1_ps(mx);
    for (; i + 16 <= V; i += 16) {
        __m512 e = vexp(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmx));
        if (d) _mm512_storeu_ps(d + i, e);
        vs = _mm512_add_ps(vs, e);
    }
    sum = _mm512_reduce_add_ps(vs);
#endif
    for (; i < V; i++) {
        float e = expf(x[i] - mx);
        if (d) d[i] = e;
        sum += e;
    }
    float lse = mx + logf(sum);
    if (d) {
        float s = k / sum;
        i = 0;
#ifdef __AVX512F__
        __m512 vsc = _mm512_set1_ps(s);
        for (; i + 16 <= V; i += 16) _mm512_storeu_ps(d + i, _mm512_mul_ps(vsc, _mm512_loadu_ps(d + i)));
#endif
        for (; i < V; i++) d[i] *= s;
        d[tgt] -= k;
    }
    return (double)lse - xt;
}

static void fast_cross_entropy(const float *logits, const int32_t *targets,
                               const float *mask, int64_t N, int V,
                               float grad_scale, float *dlogits,
                               double *loss_sum, double *weight_sum)
{
    enum { MAXT = 256 };
    double part_l[MAXT], part_w[MAXT];
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
    if (nt > MAXT) nt = MAXT;
    if (N * (int64_t)V < PAR_MIN) nt = 1;
#endif
    /* Rows split into nt contiguous ranges; partial sums combined in range
     * order: the same result for the same thread count. */
#pragma omp parallel num_threads(nt)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        int cnt = omp_get_num_threads();
#else
        int cnt = 1;
#endif
        int64_t r0 = N * tid / cnt, r1 = N * (tid + 1) / cnt;
        double ls = 0, ws = 0;
        for (int64_t n = r0; n < r1; n++) {
            const float *x = logits + n * V;
            float *d = dlogits ? dlogits + n * V : NULL;
            int tgt = targets[n];
            float wgt = mask ? mask[n] : 1.0f;
            if (tgt < 0) {
                if (d) memset(d, 0, (size_t)V * sizeof(float));
                continue;
            }
            ls += wgt * ce_row(x, d, V, tgt, grad_scale * wgt);
            ws += wgt;
        }
        part_l[tid] = ls;
        part_w[tid] = ws;
        if (tid == 0)
            for (int j = cnt; j < nt; j++) part_l[j] = part_w[j] = 0;
    }
    for (int j = 0; j < nt; j++) {
        *loss_sum += part_l[j];
        *weight_sum += part_w[j];
    }
}

static const kern_ops fast_ops = {
    .name = "fast",
    .matmul_fwd = kern_matmul_fwd_gemm,
    .matmul_bwd = kern_matmul_bwd_gemm,
    .embed_fwd = fast_embed_fwd,
    .embed_bwd = fast_embed_bwd,
    .layernorm_fwd = fast_layernorm_fwd,
    .layernorm_bwd = fast_layernorm_bwd,
    .rmsnorm_fwd = fast_rmsnorm_fwd,
    .rmsnorm_bwd = fast_rmsnorm_bwd,
    .gelu_fwd = fast_gelu_fwd,
    .gelu_bwd = fast_gelu_bwd,
    .swiglu_fwd = fast_swiglu_fwd,
    .swiglu_bwd = fast_swiglu_bwd,
    .rope = fast_rope,
    .attention_fwd = fast_attention_fwd,
    .attention_bwd = fast_attention_bwd,
    .add = fast_add,
    .cross_entropy = fast_cross_entropy,
};

const kern_ops *kern_ops_fast(void) { return &fast_ops; }
