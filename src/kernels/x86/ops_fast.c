/*
 * ops_fast.c — the fast kernel table: OpenMP threading over rows (or over
 * columns for reductions across rows, so every output is summed by one
 * thread in a fixed order: deterministic for any thread count), AVX-512
 * inner loops with scalar tails; its flash attention is in attn_fast.c.
 * Compiled without AVX-512 the same code runs its scalar paths.
 */
#include "base/base.h"
#include "kernels/kernels.h"
#include "kernels/x86/simd.h"
#include "kernels/x86/bf16.h" /* mp_transpose16 */

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
            if (dwte) {
                float *e = dwte + (size_t)tok[n] * C;
                for (int i = c0; i < c1; i++) e[i] += d[i];
            }
            if (dwpe) {
                float *p = dwpe + (size_t)(n % T) * C;
                for (int i = c0; i < c1; i++) p[i] += d[i];
            }
        }
    }
}

/* ---- norms ------------------------------------------------------------ */

/* The statistics of one LayerNorm row (mean, 1 / sqrt(var + eps)) and
 * of one RMSNorm row (1 / sqrt(mean square + eps)), in one order of
 * operations shared by the fp32 outputs and the packed bf16 ones, which
 * must agree bit for bit. */
static inline void ln_stats(const float *x, int C, float eps, float *mean, float *rstd)
{
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < C; i++) s += x[i];
    float m = s / C;
    float v = 0.0f;
#pragma omp simd reduction(+ : v)
    for (int i = 0; i < C; i++) v += (x[i] - m) * (x[i] - m);
    *mean = m;
    *rstd = 1.0f / sqrtf(v / C + eps);
}

static inline float rms_rstd(const float *x, int C, float eps)
{
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < C; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / C + eps);
}

/* The output elements (the same expressions in both forms). */
static inline void ln_out(float *o, const float *x, const float *w, const float *b, float m,
                          float r, int C)
{
    if (b) {
#pragma omp simd
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * r * w[i] + b[i];
    } else {
#pragma omp simd
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * r * w[i];
    }
}

static inline void rms_out(float *o, const float *x, const float *w, float r, int C)
{
#pragma omp simd
    for (int i = 0; i < C; i++) o[i] = w[i] * (x[i] * r);
}

static void fast_layernorm_fwd(float *out, float *mean, float *rstd,
                               const float *inp, const float *w,
                               const float *b, int N, int C, float eps)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float m, r;
        ln_stats(x, C, eps, &m, &r);
        ln_out(out + (size_t)n * C, x, w, b, m, r, C);
        mean[n] = m;
        rstd[n] = r;
    }
}

/* The norms' backward in one pass over dout and inp: rows in blocks of
 * NORM_RB, each block's share of dw (and db) summed in row order into its
 * own slot of a per-call buffer while the block's rows are in cache, then
 * the slots added in block order, columns in parallel. Every sum has a
 * fixed order, so the result does not depend on the thread count. (A
 * second pass that re-read dout and inp column block by column block for
 * dw and db cost ~1% of a bf16 training step.) */
enum { NORM_RB = 32 };

/* dw[c] (+ db[c]) += the slots' sums, in block order. */
static void norm_sums(float *dw, float *db, const float *part, int nrb, int C)
{
    size_t stride = (size_t)(db ? 2 : 1) * (size_t)C;
#pragma omp parallel for schedule(static) if ((size_t)nrb * C > PAR_MIN)
    for (int c0 = 0; c0 < C; c0 += 64) {
        int w0 = C - c0 < 64 ? C - c0 : 64;
        float aw[64] = {0}, ab[64] = {0};
        for (int rb = 0; rb < nrb; rb++) {
            const float *pw = part + (size_t)rb * stride + c0, *pb = pw + C;
#pragma omp simd
            for (int i = 0; i < w0; i++) aw[i] += pw[i];
            if (db)
#pragma omp simd
                for (int i = 0; i < w0; i++) ab[i] += pb[i];
        }
        for (int i = 0; i < w0; i++) {
            if (dw) dw[c0 + i] += aw[i];
            if (db) db[c0 + i] += ab[i];
        }
    }
}

static void fast_layernorm_bwd(float *dinp, float *dw, float *db,
                               const float *dout, const float *inp,
                               const float *w, const float *mean,
                               const float *rstd, int N, int C)
{
    int nrb = (N + NORM_RB - 1) / NORM_RB;
    float *part = mp_thread_scratch(MP_SCRATCH_NORM, sizeof(float) * (size_t)nrb * 2 * (size_t)C);
    KILN_ASSERT(part); /* 2 floats per column per 32 rows */
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int rb = 0; rb < nrb; rb++) {
        float *pw = part + (size_t)rb * (db ? 2 : 1) * (size_t)C, *pb = pw + C;
        memset(pw, 0, sizeof(float) * (size_t)C * (db ? 2 : 1));
        int n1 = (rb + 1) * NORM_RB < N ? (rb + 1) * NORM_RB : N;
        for (int n = rb * NORM_RB; n < n1; n++) {
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
            for (int i = 0; i < C; i++) {
                di[i] += (w[i] * d[i] - ds - (x[i] - m) * r * dxs) * r;
                pw[i] += (x[i] - m) * r * d[i];
            }
            if (db)
#pragma omp simd
                for (int i = 0; i < C; i++) pb[i] += d[i];
        }
    }
    norm_sums(dw, db, part, nrb, C);
}

static void fast_rmsnorm_fwd(float *out, float *rstd, const float *inp,
                             const float *w, int N, int C, float eps)
{
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float r = rms_rstd(x, C, eps);
        rms_out(out + (size_t)n * C, x, w, r, C);
        rstd[n] = r;
    }
}

/* 32 floats -> 64 bytes of bf16 at dst, rounded as mp_pack_a does. */
static inline void put_bf16x32(uint16_t *dst, const float *o)
{
#ifdef __AVX512F__
    __m256i lo = mp_f32x16_to_bf16(_mm512_loadu_ps(o));
    __m256i hi = mp_f32x16_to_bf16(_mm512_loadu_ps(o + 16));
    _mm512_storeu_si512(dst, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
#else
    for (int i = 0; i < 32; i++) dst[i] = f32_to_bf16(o[i]);
#endif
}

void kern_fast_norm_fwd_packed(uint16_t *outp, float *mean, float *rstd, const float *inp,
                               const float *w, const float *b, int N, int C, float eps, bool rms)
{
    /* Row by row: the statistics, then the row 32 columns at a time into
     * a block of registers / L1 and from there to its 64-byte piece of
     * packed row; rows past N (up to a multiple of 32) are zeros. */
    int np = (N + 31) / 32 * 32, kk = (C + 31) / 32 * 32;
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int n = 0; n < np; n++) {
        if (n >= N) {
            for (int k0 = 0; k0 < kk; k0 += 32) memset(outp + mp_packa_off(kk, n, k0), 0, 64);
            continue;
        }
        const float *x = inp + (size_t)n * C;
        float m = 0.0f, r;
        if (rms) r = rms_rstd(x, C, eps);
        else ln_stats(x, C, eps, &m, &r);
        for (int k0 = 0; k0 < kk; k0 += 32) {
            float o[32] __attribute__((aligned(64)));
            const float *bk = b ? b + k0 : NULL;
            if (C - k0 >= 32) { /* a constant count: two vectors, no tail */
                if (rms) rms_out(o, x + k0, w + k0, r, 32);
                else ln_out(o, x + k0, w + k0, bk, m, r, 32);
            } else {
                int cnt = C - k0;
                if (rms) rms_out(o, x + k0, w + k0, r, cnt);
                else ln_out(o, x + k0, w + k0, bk, m, r, cnt);
                for (int i = cnt; i < 32; i++) o[i] = 0.0f;
            }
            put_bf16x32(outp + mp_packa_off(kk, n, k0), o);
        }
        if (!rms) mean[n] = m;
        rstd[n] = r;
    }
}

static void fast_rmsnorm_bwd(float *dinp, float *dw, const float *dout,
                             const float *inp, const float *w,
                             const float *rstd, int N, int C)
{
    int nrb = (N + NORM_RB - 1) / NORM_RB;
    float *part = mp_thread_scratch(MP_SCRATCH_NORM, sizeof(float) * (size_t)nrb * (size_t)C);
    KILN_ASSERT(part);
#pragma omp parallel for schedule(static) if ((size_t)N * C > PAR_MIN)
    for (int rb = 0; rb < nrb; rb++) {
        float *pw = part + (size_t)rb * (size_t)C;
        memset(pw, 0, sizeof(float) * (size_t)C);
        int n1 = (rb + 1) * NORM_RB < N ? (rb + 1) * NORM_RB : N;
        for (int n = rb * NORM_RB; n < n1; n++) {
            const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
            float r = rstd[n], dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < C; i++) dot += w[i] * d[i] * x[i];
            float k = dot / C * r * r * r;
            float *di = dinp + (size_t)n * C;
#pragma omp simd
            for (int i = 0; i < C; i++) {
                di[i] += w[i] * d[i] * r - x[i] * k;
                pw[i] += d[i] * x[i] * r;
            }
        }
    }
    norm_sums(dw, NULL, part, nrb, C);
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

void kern_fast_ce_packed(uint16_t *pa, uint16_t *pt, bool tok, const float *logits,
                         const int32_t *targets, const float *mask, int N, int V,
                         float grad_scale, double *loss_sum, double *weight_sum)
{
    /* Blocks of 32 rows: the gradient rows (ce_row, as fast_cross_entropy)
     * into a per-thread buffer that stays in L2, then packed from there
     * block by block (mp_pack_dy_block). The loss sums per block, added in
     * block order: the same for any thread count. */
    int np = (N + 31) / 32 * 32, vp = (V + 31) / 32 * 32, nb = np / 32;
    double *sums = mp_thread_scratch(MP_SCRATCH_CE_SUM, sizeof(double) * 2 * (size_t)(nb ? nb : 1));
    KILN_ASSERT(sums);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nb; b++) {
        float *buf = mp_thread_scratch(MP_SCRATCH_CE, sizeof(float) * 32 * (size_t)vp);
        KILN_ASSERT(buf); /* 32 rows of the vocabulary per thread */
        int rows = N - 32 * b < 32 ? N - 32 * b : 32;
        double ls = 0, ws = 0;
        for (int t = 0; t < rows; t++) {
            int n = 32 * b + t, tgt = targets[n];
            float *d = buf + (size_t)t * vp, wgt = mask ? mask[n] : 1.0f;
            if (tgt < 0) {
                memset(d, 0, (size_t)V * sizeof(float));
                continue;
            }
            ls += wgt * ce_row(logits + (size_t)n * V, d, V, tgt, grad_scale * wgt);
            ws += wgt;
        }
        for (int c0 = 0; c0 < vp; c0 += 32)
            mp_pack_dy_block(pa, pt, tok, NULL, buf + c0, (size_t)vp, rows, V - c0, 32 * b, c0, np,
                             vp);
        sums[2 * b] = ls;
        sums[2 * b + 1] = ws;
    }
    for (int b = 0; b < nb; b++) {
        *loss_sum += sums[2 * b];
        *weight_sum += sums[2 * b + 1];
    }
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
    .linear = kern_fast_linear,
    .rope_at = kern_fast_rope_at,
    .attention_kv = kern_fast_attention_kv,
    .attention_fwd = kern_fast_attention_fwd,
    .attention_bwd = kern_fast_attention_bwd,
    .add = fast_add,
    .cross_entropy = fast_cross_entropy,
};

const kern_ops *kern_ops_fast(void) { return &fast_ops; }
