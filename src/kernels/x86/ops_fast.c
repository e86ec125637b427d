/*
 * ops_fast.c — the fast kernel table: OpenMP threading over rows (or over
 * columns for reductions across rows, so every output is summed by one
 * thread in a fixed order: deterministic for any thread count), AVX-512
 * inner loops with scalar tails, and a tiled flash attention (forward and
 * backward) with its own register-blocked micro-kernel. Compiled without
 * AVX-512 the same code runs its scalar paths.
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

/* Flash attention (FlashAttention-2 schedule) on per-thread tiles: query
 * blocks of ABR rows against key blocks of ABC columns, causal blocks above
 * the diagonal skipped, an online softmax in the forward and the
 * probabilities recomputed from q, k and the saved log-sum-exp in the
 * backward. No (T, T) matrix exists anywhere. The small products run on
 * att_mm, a register-blocked FMA kernel (4 rows x 64 columns). Head sizes
 * above AHS_MAX fall back to the reference kernels. */

#define ABR 64      /* query rows per block */
#define ABC 64      /* key columns per block */
#define AHS_MAX 128 /* largest head size with stack tiles */

#ifdef __AVX512F__
/* C (RB, 16*NV) (+)= A (RB, k) B (k, 16*NV); the last vector uses mask lm. */
static inline __attribute__((always_inline)) void
att_mk(int RB, int NV, __mmask16 lm, int k, const float *A, int lda,
       const float *B, int ldb, float *C, int ldc, bool acc)
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
        const float *bp = B + (size_t)p * ldb;
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(lm, bp + 16 * v) : _mm512_loadu_ps(bp + 16 * v);
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            __m512 a = _mm512_set1_ps(A[(size_t)r * lda + p]);
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

#define ATT_MK_NV(RB)                                                          \
    switch (nv) {                                                              \
    case 4: att_mk(RB, 4, lm, k, Ai, lda, Bj, ldb, Ci, ldc, acc); break;       \
    case 3: att_mk(RB, 3, lm, k, Ai, lda, Bj, ldb, Ci, ldc, acc); break;       \
    case 2: att_mk(RB, 2, lm, k, Ai, lda, Bj, ldb, Ci, ldc, acc); break;       \
    default: att_mk(RB, 1, lm, k, Ai, lda, Bj, ldb, Ci, ldc, acc); break;      \
    }
#endif

/* C (m, n) (+)= A (m, k) B (k, n), row-major with row strides (acc: add to
 * C, else overwrite). */
static void att_mm(int m, int n, int k, const float *A, int lda, const float *B,
                   int ldb, float *C, int ldc, bool acc)
{
#ifdef __AVX512F__
    for (int j = 0; j < n; j += 64) {
        int w = n - j < 64 ? n - j : 64, nv = (w + 15) / 16;
        __mmask16 lm = w % 16 ? vtail(w % 16) : (__mmask16)0xFFFF;
        const float *Bj = B + j;
        int i = 0;
        for (; i + 4 <= m; i += 4) {
            const float *Ai = A + (size_t)i * lda;
            float *Ci = C + (size_t)i * ldc + j;
            ATT_MK_NV(4)
        }
        const float *Ai = A + (size_t)i * lda;
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
            float a = A[(size_t)i * lda + p];
            const float *b = B + (size_t)p * ldb;
#pragma omp simd
            for (int j = 0; j < n; j++) c[j] += a * b[j];
        }
    }
#endif
}

/* dst (ABC-wide rows: dst[d * ABC + c]) = src rows c < nc (stride ld), HS
 * columns, transposed; columns nc..ABC-1 zeroed. */
static void att_load_t(float *dst, const float *src, int ld, int nc, int HS)
{
    for (int d = 0; d < HS; d++)
        for (int c = nc; c < ABC; c++) dst[d * ABC + c] = 0.0f;
    for (int c = 0; c < nc; c++) {
        const float *s = src + (size_t)c * ld;
        for (int d = 0; d < HS; d++) dst[d * ABC + c] = s[d];
    }
}

/* dst (n, m) = src (m, n) (row stride of src ABC, of dst ABR). */
static void att_transpose(float *dst, const float *src, int m, int n)
{
    for (int c = 0; c < n; c++)
        for (int r = 0; r < m; r++) dst[c * ABR + r] = src[r * ABC + c];
}

/* Row of scores s[0..ABC) (unscaled): p = exp(scale s - sub) for columns
 * < lim, 0 after; returns the sum of p. With mx != NULL, sub is first
 * raised to the max of the row's scaled scores (online softmax). */
static float att_exp_row(float *s, int lim, float scale, float sub, float *mx)
{
    float sum = 0.0f;
#ifdef __AVX512F__
    __m512 vs = _mm512_set1_ps(scale);
    __mmask16 mk[ABC / 16];
    for (int v = 0; v < ABC / 16; v++) {
        int n = lim - 16 * v;
        mk[v] = n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : vtail(n);
    }
    if (mx) {
        __m512 vm = _mm512_set1_ps(-INFINITY);
        for (int v = 0; v < ABC / 16; v++)
            vm = _mm512_mask_max_ps(vm, mk[v], vm, _mm512_loadu_ps(s + 16 * v));
        float m = _mm512_reduce_max_ps(vm) * scale;
        sub = m > *mx ? m : *mx;
        *mx = sub;
    }
    __m512 vsub = _mm512_set1_ps(sub), acc = _mm512_setzero_ps();
    for (int v = 0; v < ABC / 16; v++) {
        __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + 16 * v), vs, vsub);
        __m512 e = _mm512_maskz_mov_ps(mk[v], vexp(x));
        _mm512_storeu_ps(s + 16 * v, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#else
    if (mx) {
        float m = -INFINITY;
        for (int c = 0; c < lim; c++) m = s[c] > m ? s[c] : m;
        m *= scale;
        sub = m > *mx ? m : *mx;
        *mx = sub;
    }
    for (int c = 0; c < ABC; c++) {
        float e = c < lim ? expf(s[c] * scale - sub) : 0.0f;
        s[c] = e;
        sum += e;
    }
#endif
    return sum;
}

/* One query block [i0, i0 + nr) of head (b, h). */
static void flash_fwd_block(float *out, float *lse, const float *qkv, int T,
                            int NH, int KVH, int HS, int b, int h, int i0)
{
    _Alignas(64) float kt[AHS_MAX * ABC], sc[ABR * ABC], ot[ABR * AHS_MAX];
    float mrow[ABR], lrow[ABR];
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, kh = h / (NH / KVH);
    int nr = T - i0 < ABR ? T - i0 : ABR, jend = i0 + nr;
    float scale = 1.0f / sqrtf((float)HS);
    const float *q = qkv + ((size_t)b * T + i0) * S + h * HS;
    const float *kb = qkv + (size_t)b * T * S + (NH + kh) * HS;
    const float *vb = qkv + (size_t)b * T * S + (NH + KVH + kh) * HS;
    for (int r = 0; r < nr; r++) {
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
    }
    memset(ot, 0, (size_t)nr * HS * sizeof(float));
    for (int j0 = 0; j0 < jend; j0 += ABC) {
        int nc = jend - j0 < ABC ? jend - j0 : ABC;
        att_load_t(kt, kb + (size_t)j0 * S, S, nc, HS);
        att_mm(nr, ABC, HS, q, S, kt, ABC, sc, ABC, false);
        for (int r = 0; r < nr; r++) {
            float *s = sc + r * ABC;
            int lim = i0 + r - j0 + 1;
            lim = lim > nc ? nc : lim;
            if (lim <= 0) {
                memset(s, 0, ABC * sizeof(float));
                continue;
            }
            float mold = mrow[r];
            float sum = att_exp_row(s, lim, scale, 0.0f, &mrow[r]);
            float alpha = expf(mold - mrow[r]); /* 0 on the first block */
            lrow[r] = lrow[r] * alpha + sum;
            if (alpha != 1.0f) {
                float *o = ot + r * HS;
#pragma omp simd
                for (int d = 0; d < HS; d++) o[d] *= alpha;
            }
        }
        att_mm(nr, HS, nc, sc, ABC, vb + (size_t)j0 * S, S, ot, HS, true);
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
    int nb = (T + ABR - 1) / ABR;
    /* tasks (b, h, query block), the longest (last) blocks first */
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < B * NH * nb; task++) {
        int i = nb - 1 - task / (B * NH), bh = task % (B * NH);
        flash_fwd_block(out, lse, qkv, T, NH, KVH, HS, bh / NH, bh % NH, i * ABR);
    }
}

typedef struct att_bwd_tiles {
    _Alignas(64) float kt[AHS_MAX * ABC], vt[AHS_MAX * ABC];
    _Alignas(64) float dk[ABC * AHS_MAX], dv[ABC * AHS_MAX];
    _Alignas(64) float p[ABR * ABC], ds[ABR * ABC], pt[ABC * ABR], dst[ABC * ABR];
    float D[ABR];
} att_bwd_tiles;

/* All of kv head kh of batch row b: key blocks outer, then the query heads
 * of the group and the query blocks at or below the diagonal, in order. */
static void flash_bwd_kv(att_bwd_tiles *w, float *dqkv, const float *dout,
                         const float *qkv, const float *out, const float *lse,
                         int T, int NH, int KVH, int HS, int b, int kh)
{
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, grp = NH / KVH;
    float scale = 1.0f / sqrtf((float)HS);
    const float *base = qkv + (size_t)b * T * S;
    float *dbase = dqkv + (size_t)b * T * S;
    const float *kb = base + (NH + kh) * HS, *vb = base + (NH + KVH + kh) * HS;
    for (int t = 0; t < T; t++)
        memset(dbase + (size_t)t * S + kh * grp * HS, 0, (size_t)grp * HS * sizeof(float));
    for (int j0 = 0; j0 < T; j0 += ABC) {
        int nc = T - j0 < ABC ? T - j0 : ABC;
        att_load_t(w->kt, kb + (size_t)j0 * S, S, nc, HS);
        att_load_t(w->vt, vb + (size_t)j0 * S, S, nc, HS);
        memset(w->dk, 0, (size_t)nc * HS * sizeof(float));
        memset(w->dv, 0, (size_t)nc * HS * sizeof(float));
        for (int h = kh * grp; h < (kh + 1) * grp; h++) {
            const float *lh = lse + ((size_t)b * NH + h) * T;
            for (int i0 = j0 / ABR * ABR; i0 < T; i0 += ABR) {
                int nr = T - i0 < ABR ? T - i0 : ABR;
                const float *q = base + (size_t)i0 * S + h * HS;
                float *dq = dbase + (size_t)i0 * S + h * HS;
                const float *d = dout + ((size_t)b * T + i0) * OC + h * HS;
                const float *o = out + ((size_t)b * T + i0) * OC + h * HS;
                for (int r = 0; r < nr; r++) {
                    float s = 0.0f;
#pragma omp simd reduction(+ : s)
                    for (int e = 0; e < HS; e++) s += d[(size_t)r * OC + e] * o[(size_t)r * OC + e];
                    w->D[r] = s;
                }
                /* P = exp(scale Q K^T - lse), dP = dO V^T */
                att_mm(nr, ABC, HS, q, S, w->kt, ABC, w->p, ABC, false);
                att_mm(nr, ABC, HS, d, OC, w->vt, ABC, w->ds, ABC, false);
                for (int r = 0; r < nr; r++) {
                    float *p = w->p + r * ABC, *ds = w->ds + r * ABC;
                    int lim = i0 + r - j0 + 1;
                    lim = lim > nc ? nc : lim;
                    if (lim <= 0) {
                        memset(p, 0, ABC * sizeof(float));
                        memset(ds, 0, ABC * sizeof(float));
                        continue;
                    }
                    att_exp_row(p, lim, scale, lh[i0 + r], NULL);
                    /* dS = P (dP - D) scale */
                    float Dr = w->D[r];
#pragma omp simd
                    for (int c = 0; c < ABC; c++) ds[c] = p[c] * (ds[c] - Dr) * scale;
                }
                /* dV += P^T dO, dK += dS^T Q, dQ += dS K */
                att_transpose(w->pt, w->p, nr, nc);
                att_transpose(w->dst, w->ds, nr, nc);
                att_mm(nc, HS, nr, w->pt, ABR, d, OC, w->dv, HS, true);
                att_mm(nc, HS, nr, w->dst, ABR, q, S, w->dk, HS, true);
                att_mm(nr, HS, nc, w->ds, ABC, kb + (size_t)j0 * S, S, dq, S, true);
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
