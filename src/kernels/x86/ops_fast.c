/*
 * ops_fast.c — the fast kernel table: OpenMP threading over rows (or over
 * columns for reductions across rows, so every output is summed by one
 * thread in a fixed order: deterministic for any thread count), AVX-512
 * inner loops with scalar tails, and a tiled flash attention (forward and
 * backward) with its own register-blocked micro-kernel. Compiled without
 * AVX-512 the same code runs its scalar paths.
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
            dw[c0 + i] += aw[i];
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

/* ---- attention --------------------------------------------------------- */

/* Flash attention (FlashAttention-2 schedule) on per-thread tiles: query
 * blocks of AB rows against key blocks of AB columns, blocks above the
 * diagonal skipped and the diagonal block computed in 16-wide strips (only
 * the causal triangle, to a vector's granularity), an online softmax in the
 * forward and the probabilities recomputed from q, k and the saved
 * log-sum-exp in the backward. No (T, T) matrix exists anywhere. Every
 * small product runs on att_mm, a register-blocked FMA kernel (4 rows x 64
 * columns) whose A operand has arbitrary row and column strides, so the
 * transposed products (P^T dO, dS^T Q, the scores as K Q^T) need no
 * transposed copies; K and V are transposed once per key block (backward)
 * and Q once per query block (forward), and the other operand rows (S
 * floats apart in qkv, each on its own page) are copied into contiguous
 * tiles. The tiles live on each thread's stack (~145 KB forward, ~270 KB
 * backward at AHS_MAX). Head sizes above AHS_MAX fall back to the
 * reference kernels. */

#ifndef AB
#define AB 64 /* rows of a query block = columns of a key block */
#endif
#define AHS_MAX 128 /* largest head size with stack tiles */
#define ANEG -1e30f /* "no score yet": finite, so exp(ANEG - ANEG) = 1 */

#ifdef __AVX512F__
/* C (RB, 16*NV) (+)= A (RB, k) B (k, 16*NV), A(r, p) = A[r*ars + p*aks];
 * the last vector of each row uses mask lm. */
static inline __attribute__((always_inline)) void
att_mk(int RB, int NV, __mmask16 lm, int k, const float *A, size_t ars,
       size_t aks, const float *B, int ldb, float *C, int ldc, bool acc)
{
    __m512 c[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            c[r][v] = !acc ? _mm512_setzero_ps()
                      : v == NV - 1 ? _mm512_maskz_loadu_ps(lm, C + (size_t)r * ldc + 16 * v)
                                    : _mm512_loadu_ps(C + (size_t)r * ldc + 16 * v);
    for (int p = 0; p < k; p++) {
        __m512 b[4];
        const float *bp = B + (size_t)p * ldb, *ap = A + (size_t)p * aks;
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(lm, bp + 16 * v) : _mm512_loadu_ps(bp + 16 * v);
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            __m512 a = _mm512_set1_ps(ap[r * ars]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            if (v == NV - 1) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16 * v, lm, c[r][v]);
            else _mm512_storeu_ps(C + (size_t)r * ldc + 16 * v, c[r][v]);
        }
}

#define ATT_MK_NV(RB)                                                            \
    switch (nv) {                                                                \
    case 4: att_mk(RB, 4, lm, k, Ai, ars, aks, Bj, ldb, Ci, ldc, acc); break;    \
    case 3: att_mk(RB, 3, lm, k, Ai, ars, aks, Bj, ldb, Ci, ldc, acc); break;    \
    case 2: att_mk(RB, 2, lm, k, Ai, ars, aks, Bj, ldb, Ci, ldc, acc); break;    \
    default: att_mk(RB, 1, lm, k, Ai, ars, aks, Bj, ldb, Ci, ldc, acc); break;   \
    }
#endif

/* C (m, n) (+)= A (m, k) B (k, n) with A(i, p) = A[i*ars + p*aks], B and C
 * row-major with row strides ldb, ldc (acc: add to C, else overwrite).
 * m, n or k <= 0: nothing (k <= 0 with !acc zeroes C). */
static void att_mm(int m, int n, int k, const float *A, size_t ars, size_t aks,
                   const float *B, int ldb, float *C, int ldc, bool acc)
{
    if (k < 0) k = 0;
#ifdef __AVX512F__
    for (int j = 0; j < n; j += 64) {
        int w = n - j < 64 ? n - j : 64, nv = (w + 15) / 16;
        __mmask16 lm = w % 16 ? vtail(w % 16) : (__mmask16)0xFFFF;
        const float *Bj = B + j;
        int i = 0;
        for (; i + 4 <= m; i += 4) {
            const float *Ai = A + i * ars;
            float *Ci = C + (size_t)i * ldc + j;
            ATT_MK_NV(4)
        }
        const float *Ai = A + i * ars;
        float *Ci = C + (size_t)i * ldc + j;
        switch (m - i) {
        case 3: ATT_MK_NV(3) break;
        case 2: ATT_MK_NV(2) break;
        case 1: ATT_MK_NV(1) break;
        default: break;
        }
    }
#else
    for (int i = 0; i < m; i++) {
        float *c = C + (size_t)i * ldc;
        if (!acc)
            for (int j = 0; j < n; j++) c[j] = 0.0f;
        for (int p = 0; p < k; p++) {
            float a = A[i * ars + p * aks];
            const float *b = B + (size_t)p * ldb;
#pragma omp simd
            for (int j = 0; j < n; j++) c[j] += a * b[j];
        }
    }
#endif
}

#ifdef __AVX512F__
/* dst (16 x 16, row stride ld) = the transpose of src (row stride ls). */
static inline void tr16(float *dst, size_t ld, const float *src, size_t ls)
{
    __m512 r[16], c[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ls);
    mp_transpose16(r, c);
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * ld, c[i]);
}
#endif

/* dst[d * AB + c] = src[c * ld + d] for rows c < nc, d < HS; columns
 * nc..AB-1 zeroed. */
static void att_load_t(float *dst, const float *src, int ld, int nc, int HS)
{
    for (int d = 0; d < HS; d++)
        for (int c = nc; c < AB; c++) dst[d * AB + c] = 0.0f;
    int c0 = 0;
#ifdef __AVX512F__
    int h16 = HS & ~15;
    for (; c0 + 16 <= nc; c0 += 16) {
        for (int d0 = 0; d0 < h16; d0 += 16)
            tr16(dst + d0 * AB + c0, AB, src + (size_t)c0 * ld + d0, (size_t)ld);
        for (int c = c0; c < c0 + 16; c++)
            for (int d = h16; d < HS; d++) dst[d * AB + c] = src[(size_t)c * ld + d];
    }
#endif
    for (int c = c0; c < nc; c++) {
        const float *s = src + (size_t)c * ld;
        for (int d = 0; d < HS; d++) dst[d * AB + c] = s[d];
    }
}

/* dst (n, HS) contiguous = rows of src (row stride ld): the B operands of
 * att_mm stay in L1 instead of striding through qkv. */
static void att_copy_rows(float *dst, const float *src, int ld, int n, int HS)
{
#ifdef __AVX512F__
    __mmask16 lm = HS % 16 ? vtail(HS % 16) : (__mmask16)0xFFFF;
    int h16 = (HS - 1) & ~15; /* start of the last (maybe partial) vector */
    for (int r = 0; r < n; r++) {
        const float *s = src + (size_t)r * ld;
        float *d = dst + (size_t)r * HS;
        for (int e = 0; e < h16; e += 16) _mm512_storeu_ps(d + e, _mm512_loadu_ps(s + e));
        _mm512_mask_storeu_ps(d + h16, lm, _mm512_maskz_loadu_ps(lm, s + h16));
    }
#else
    for (int r = 0; r < n; r++)
        memcpy(dst + (size_t)r * HS, src + (size_t)r * ld, (size_t)HS * sizeof(float));
#endif
}

/* Prefetches rows [0, n) (row stride ld, HS floats each) of src into L2:
 * the next block's operands load while this block computes. */
static void att_prefetch_rows(const float *src, int ld, int n, int HS)
{
    for (int r = 0; r < n; r++)
        for (int e = 0; e < HS; e += 16) __builtin_prefetch(src + (size_t)r * ld + e, 0, 2);
}


/* One query block [i0, i0 + nr) of head (b, h). Scores are kept
 * transposed, st[c * AB + r] (key c, query r), so the softmax statistics
 * of 16 queries sit in one vector. */
static void flash_fwd_block(float *out, float *lse, const float *qkv, int T,
                            int NH, int KVH, int HS, int b, int h, int i0)
{
    _Alignas(64) float qt[AHS_MAX * AB], st[AB * AB], ot[AB * AHS_MAX], vt[AB * AHS_MAX];
    _Alignas(64) float kc[AB * AHS_MAX];
    _Alignas(64) float mrow[AB], lrow[AB], alpha[AB];
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, kh = h / (NH / KVH);
    int nr = T - i0 < AB ? T - i0 : AB, jend = i0 + nr;
    float scale = 1.0f / sqrtf((float)HS);
    const float *q = qkv + ((size_t)b * T + i0) * S + h * HS;
    const float *kb = qkv + (size_t)b * T * S + (NH + kh) * HS;
    const float *vb = qkv + (size_t)b * T * S + (NH + KVH + kh) * HS;
    att_load_t(qt, q, S, nr, HS);
    for (int r = 0; r < AB; r++) {
        mrow[r] = ANEG;
        lrow[r] = 0.0f;
    }
    memset(ot, 0, (size_t)nr * HS * sizeof(float));
    for (int j0 = 0; j0 < jend; j0 += AB) {
        int nc = jend - j0 < AB ? jend - j0 : AB;
        const float *kj = kc, *vj = vb + (size_t)j0 * S;
        att_copy_rows(kc, kb + (size_t)j0 * S, S, nc, HS);
        if (j0 + AB < jend) { /* the next key block */
            int nn = jend - j0 - AB < AB ? jend - j0 - AB : AB;
            att_prefetch_rows(kb + (size_t)(j0 + AB) * S, S, nn, HS);
            att_prefetch_rows(vb + (size_t)(j0 + AB) * S, S, nn, HS);
        } else if (i0 >= AB) { /* the next task's queries (head-major order) */
            att_prefetch_rows(q - (size_t)AB * S, S, AB, HS);
        }
        bool diag = j0 + nc - 1 > i0; /* some key is after some query */
        /* st = K_j Q_i^T (keys x queries); on the diagonal per strip of 16
         * keys, from the first vector of queries that can see them */
        if (!diag) {
            att_mm(nc, AB, HS, kj, (size_t)HS, 1, qt, AB, st, AB, false);
        } else {
            for (int c0 = 0; c0 < nc; c0 += 16) {
                int mc = nc - c0 < 16 ? nc - c0 : 16, rs = j0 + c0 - i0;
                rs = rs < 0 ? 0 : rs & ~15;
                att_mm(mc, AB - rs, HS, kj + (size_t)c0 * HS, (size_t)HS, 1, qt + rs, AB,
                       st + c0 * AB + rs, AB, false);
            }
        }
        /* online softmax over the keys (down the columns of st) */
#ifdef __AVX512F__
        __m512 vs = _mm512_set1_ps(scale);
        for (int v = 0; v < AB / 16; v++) {
            if (16 * v >= nr) break;
            int hi = nr - 16 * v > 16 ? 16 : nr - 16 * v;
            __m512 mo = _mm512_load_ps(mrow + 16 * v), mx = mo, sum = _mm512_setzero_ps();
            for (int c = 0; c < nc; c++) {
                int lo = j0 + c - i0 - 16 * v;
                if (lo >= hi) break;
                __mmask16 mk = vtail(hi) & (__mmask16)~vtail(lo < 0 ? 0 : lo);
                mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_mul_ps(_mm512_loadu_ps(st + c * AB + 16 * v), vs));
            }
            for (int c = 0; c < nc; c++) {
                int lo = j0 + c - i0 - 16 * v;
                float *sp = st + c * AB + 16 * v;
                if (lo >= hi) {
                    _mm512_storeu_ps(sp, _mm512_setzero_ps());
                    continue;
                }
                __mmask16 mk = vtail(hi) & (__mmask16)~vtail(lo < 0 ? 0 : lo);
                __m512 e = _mm512_maskz_mov_ps(mk, vexp(_mm512_fmsub_ps(_mm512_loadu_ps(sp), vs, mx)));
                _mm512_storeu_ps(sp, e);
                sum = _mm512_add_ps(sum, e);
            }
            __m512 al = vexp(_mm512_sub_ps(mo, mx));
            _mm512_store_ps(alpha + 16 * v, al);
            _mm512_store_ps(mrow + 16 * v, mx);
            _mm512_store_ps(lrow + 16 * v, _mm512_fmadd_ps(_mm512_load_ps(lrow + 16 * v), al, sum));
        }
#else
        for (int r = 0; r < nr; r++) {
            float mx = mrow[r], sum = 0.0f;
            int lim = i0 + r - j0 + 1;
            lim = lim > nc ? nc : lim;
            for (int c = 0; c < lim; c++) mx = fmaxf(mx, st[c * AB + r] * scale);
            for (int c = 0; c < nc; c++) {
                float e = c < lim ? expf(st[c * AB + r] * scale - mx) : 0.0f;
                st[c * AB + r] = e;
                sum += e;
            }
            alpha[r] = expf(mrow[r] - mx);
            mrow[r] = mx;
            lrow[r] = lrow[r] * alpha[r] + sum;
        }
#endif
        for (int r = 0; r < nr; r++) {
            float a = alpha[r], *o = ot + r * HS;
            if (a != 1.0f) {
#pragma omp simd
                for (int d = 0; d < HS; d++) o[d] *= a;
            }
        }
        /* ot += P V_j, P(r, c) = st[c * AB + r]; on the diagonal per strip
         * of 16 queries, up to the last key they see */
        if (!diag) {
            att_copy_rows(vt, vj, S, nc, HS);
            att_mm(nr, HS, nc, st, 1, AB, vt, HS, ot, HS, true);
        } else {
            att_copy_rows(vt, vj, S, nc, HS);
            for (int r0 = 0; r0 < nr; r0 += 16) {
                int mr = nr - r0 < 16 ? nr - r0 : 16, nk = i0 + r0 + mr - j0;
                nk = nk > nc ? nc : nk;
                att_mm(mr, HS, nk, st + r0, 1, AB, vt, HS, ot + r0 * HS, HS, true);
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        float inv = 1.0f / lrow[r], *o = out + ((size_t)b * T + i0 + r) * OC + h * HS;
#pragma omp simd
        for (int d = 0; d < HS; d++) o[d] = ot[r * HS + d] * inv;
        lse[((size_t)b * NH + h) * T + i0 + r] = mrow[r] + logf(lrow[r]);
    }
}

static void fast_attention_fwd(kern_gemm *g, float *out, float *lse,
                               const float *qkv, int B, int T, int NH, int KVH,
                               int HS)
{
    if (HS > AHS_MAX) {
        kern_ops_ref()->attention_fwd(g, out, lse, qkv, B, T, NH, KVH, HS);
        return;
    }
    int nb = (T + AB - 1) / AB;
    /* tasks (b, h, query block), the blocks of one head consecutive (its
     * k and v stay in L2), the longest (last) block first */
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < B * NH * nb; task++) {
        int i = nb - 1 - task % nb, bh = task / nb;
        flash_fwd_block(out, lse, qkv, T, NH, KVH, HS, bh / NH, bh % NH, i * AB);
    }
}

#define ATT_DMAX 4096 /* rows of D = rowsum(dO * O) cached per backward task */

/* D[r] = dot(d row r, o row r) for r < n (row strides ldd, ldo). */
static void att_rowdot(float *D, const float *d, int ldd, const float *o, int ldo, int n,
                       int HS)
{
    for (int r = 0; r < n; r++) {
        const float *dr = d + (size_t)r * ldd, *orow = o + (size_t)r * ldo;
        float s = 0.0f;
        int e = 0;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (; e + 16 <= HS; e += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(dr + e), _mm512_loadu_ps(orow + e), acc);
        s = _mm512_reduce_add_ps(acc);
#endif
        for (; e < HS; e++) s += dr[e] * orow[e];
        D[r] = s;
    }
}

typedef struct att_bwd_tiles {
    _Alignas(64) float kt[AHS_MAX * AB], vt[AHS_MAX * AB];
    _Alignas(64) float dk[AB * AHS_MAX], dv[AB * AHS_MAX];
    _Alignas(64) float p[AB * AB], ds[AB * AB];
    _Alignas(64) float kc[AB * AHS_MAX], qc[AB * AHS_MAX], dc[AB * AHS_MAX];
    float D[AB];
    float Dc[ATT_DMAX]; /* D of every row of the group's heads, when it fits */
} att_bwd_tiles;

/* All of kv head kh of batch row b: key blocks outer, then the query heads
 * of the group and the query blocks at or below the diagonal, in order.
 * Tiles p and ds are (queries x keys). */
static void flash_bwd_kv(att_bwd_tiles *w, float *dqkv, const float *dout,
                         const float *qkv, const float *out, const float *lse,
                         int T, int NH, int KVH, int HS, int b, int kh)
{
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, grp = NH / KVH;
    float scale = 1.0f / sqrtf((float)HS);
    const float *base = qkv + (size_t)b * T * S;
    float *dbase = dqkv + (size_t)b * T * S;
    const float *kb = base + (NH + kh) * HS, *vb = base + (NH + KVH + kh) * HS;
    /* D of all the task's rows once (else per block pair) */
    bool dcache = (size_t)grp * T <= ATT_DMAX;
    if (dcache)
        for (int g = 0; g < grp; g++)
            att_rowdot(w->Dc + (size_t)g * T, dout + (size_t)b * T * OC + (kh * grp + g) * HS, OC,
                       out + (size_t)b * T * OC + (kh * grp + g) * HS, OC, T, HS);
    /* dq needs no zeroing: the first key block (j0 = 0) reaches every
     * query row and overwrites it (every product there has k >= 1) */
    for (int j0 = 0; j0 < T; j0 += AB) {
        bool dq_acc = j0 > 0;
        int nc = T - j0 < AB ? T - j0 : AB;
        const float *kj = w->kc;
        att_copy_rows(w->kc, kb + (size_t)j0 * S, S, nc, HS);
        att_load_t(w->kt, kj, HS, nc, HS);
        att_load_t(w->vt, vb + (size_t)j0 * S, S, nc, HS);
        memset(w->dk, 0, (size_t)nc * HS * sizeof(float));
        memset(w->dv, 0, (size_t)nc * HS * sizeof(float));
        for (int h = kh * grp; h < (kh + 1) * grp; h++) {
            const float *lh = lse + ((size_t)b * NH + h) * T;
            for (int i0 = j0 / AB * AB; i0 < T; i0 += AB) {
                int nr = T - i0 < AB ? T - i0 : AB;
                bool diag = j0 + nc - 1 > i0;
                float *dq = dbase + (size_t)i0 * S + h * HS;
                const float *o = out + ((size_t)b * T + i0) * OC + h * HS;
                const float *q = w->qc, *d = w->dc;
                att_copy_rows(w->qc, base + (size_t)i0 * S + h * HS, S, nr, HS);
                if (i0 + AB < T) { /* the next query block of this head */
                    int nn = T - i0 - AB < AB ? T - i0 - AB : AB;
                    att_prefetch_rows(base + (size_t)(i0 + AB) * S + h * HS, S, nn, HS);
                    att_prefetch_rows(dout + ((size_t)b * T + i0 + AB) * OC + h * HS, OC, nn, HS);
                    att_prefetch_rows(o + (size_t)AB * OC, OC, nn, HS);
                }
                att_copy_rows(w->dc, dout + ((size_t)b * T + i0) * OC + h * HS, OC, nr, HS);
                const float *Dv = w->Dc + (size_t)(h - kh * grp) * T + i0;
                if (!dcache) {
                    att_rowdot(w->D, d, HS, o, OC, nr, HS);
                    Dv = w->D;
                }
                /* S = Q K^T, dP = dO V^T (the diagonal per strip of 16
                 * queries, up to the last key they see) */
                if (!diag) {
                    att_mm(nr, AB, HS, q, (size_t)HS, 1, w->kt, AB, w->p, AB, false);
                    att_mm(nr, AB, HS, d, (size_t)HS, 1, w->vt, AB, w->ds, AB, false);
                } else {
                    for (int r0 = 0; r0 < nr; r0 += 16) {
                        int mr = nr - r0 < 16 ? nr - r0 : 16, kc = i0 + r0 + mr - j0;
                        kc = kc > nc ? nc : kc;
                        att_mm(mr, kc, HS, q + (size_t)r0 * HS, (size_t)HS, 1, w->kt, AB,
                               w->p + r0 * AB, AB, false);
                        att_mm(mr, kc, HS, d + (size_t)r0 * HS, (size_t)HS, 1, w->vt, AB,
                               w->ds + r0 * AB, AB, false);
                    }
                }
                /* P = exp(scale S - lse), dS = P (dP - D) scale; zero past
                 * the causal limit (entries there were not computed) */
                for (int r = 0; r < nr; r++) {
                    float *p = w->p + r * AB, *ds = w->ds + r * AB;
                    int lim = i0 + r - j0 + 1;
                    lim = lim > nc ? nc : lim < 0 ? 0 : lim;
                    float Dr = Dv[r], l = lh[i0 + r];
#ifdef __AVX512F__
                    __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(l), vD = _mm512_set1_ps(Dr);
                    for (int v = 0; v < AB / 16; v++) {
                        int n = lim - 16 * v;
                        __mmask16 mk = n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : vtail(n);
                        __m512 e = _mm512_maskz_mov_ps(
                            mk, vexp(_mm512_fmsub_ps(_mm512_loadu_ps(p + 16 * v), vs, vl)));
                        __m512 g = _mm512_mul_ps(_mm512_mul_ps(e, vs),
                                                 _mm512_sub_ps(_mm512_loadu_ps(ds + 16 * v), vD));
                        _mm512_storeu_ps(p + 16 * v, e);
                        _mm512_storeu_ps(ds + 16 * v, _mm512_maskz_mov_ps(mk, g));
                    }
#else
                    for (int c = 0; c < AB; c++) {
                        float e = c < lim ? expf(p[c] * scale - l) : 0.0f;
                        ds[c] = c < lim ? e * (ds[c] - Dr) * scale : 0.0f;
                        p[c] = e;
                    }
#endif
                }
                /* dV += P^T dO, dK += dS^T Q (the diagonal per strip of 16
                 * keys, from the first query that sees them); dQ += dS K */
                if (!diag) {
                    att_mm(nc, HS, nr, w->p, 1, AB, d, HS, w->dv, HS, true);
                    att_mm(nc, HS, nr, w->ds, 1, AB, q, HS, w->dk, HS, true);
                    att_mm(nr, HS, nc, w->ds, AB, 1, kj, HS, dq, S, dq_acc);
                } else {
                    for (int c0 = 0; c0 < nc; c0 += 16) {
                        int mc = nc - c0 < 16 ? nc - c0 : 16, rs = j0 + c0 - i0;
                        rs = rs < 0 ? 0 : rs;
                        att_mm(mc, HS, nr - rs, w->p + rs * AB + c0, 1, AB, d + (size_t)rs * HS, HS,
                               w->dv + c0 * HS, HS, true);
                        att_mm(mc, HS, nr - rs, w->ds + rs * AB + c0, 1, AB, q + (size_t)rs * HS, HS,
                               w->dk + c0 * HS, HS, true);
                    }
                    for (int r0 = 0; r0 < nr; r0 += 16) {
                        int mr = nr - r0 < 16 ? nr - r0 : 16, kc = i0 + r0 + mr - j0;
                        kc = kc > nc ? nc : kc;
                        att_mm(mr, HS, kc, w->ds + r0 * AB, AB, 1, kj, HS, dq + (size_t)r0 * S, S,
                               dq_acc);
                    }
                }
            }
        }
        for (int c = 0; c < nc; c++) {
            memcpy(dbase + (size_t)(j0 + c) * S + (NH + kh) * HS, w->dk + c * HS,
                   (size_t)HS * sizeof(float));
            memcpy(dbase + (size_t)(j0 + c) * S + (NH + KVH + kh) * HS, w->dv + c * HS,
                   (size_t)HS * sizeof(float));
        }
    }
}

static void fast_attention_bwd(kern_gemm *g, float *dqkv, const float *dout,
                               const float *qkv, const float *out,
                               const float *lse, int B, int T, int NH, int KVH,
                               int HS)
{
    if (HS > AHS_MAX) {
        kern_ops_ref()->attention_bwd(g, dqkv, dout, qkv, out, lse, B, T, NH, KVH, HS);
        return;
    }
    /* One task per (batch, kv head): the query heads sharing a kv head
     * accumulate into its dk/dv in a fixed order. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int bk = 0; bk < B * KVH; bk++) {
        att_bwd_tiles w;
        flash_bwd_kv(&w, dqkv, dout, qkv, out, lse, T, NH, KVH, HS, bk / KVH, bk % KVH);
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
    .attention_fwd = fast_attention_fwd,
    .attention_bwd = fast_attention_bwd,
    .add = fast_add,
    .cross_entropy = fast_cross_entropy,
};

const kern_ops *kern_ops_fast(void) { return &fast_ops; }
