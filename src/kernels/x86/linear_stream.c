/*
 * linear_stream.c — the fast table's inference ops (kernels.h: linear,
 * rope_at, attention_kv) and the bandwidth probe.
 *
 * Decoding is bound by memory bandwidth: every weight byte is read once per
 * step, whatever the batch. linear therefore streams each block of rows of
 * W once and dots it with all T input rows while it is in registers (a 4
 * rows x 4 tokens register tile of AVX-512 accumulators); bf16 rows are
 * widened to fp32 in registers (or dotted as bf16 pairs with
 * AVX512_BF16), so they cost half the bytes. fp32 weights stored (in, out)
 * (GPT-2's) stream their rows in order into 64-column x 6-token register
 * tiles instead (linear_stream_io). For prefill-sized T the
 * product is a GEMM: fp32 weights as the training forward computes it
 * (kern_matmul_fwd_gemm); bf16 and block-quantized rows widened to fp32
 * a tile at a time (linear_tiles_gemm), the activations unrounded. The
 * reference versions are in kernels/ref/ref.c; tests/test_kernels.c and
 * test_backend_ops.c compare the two.
 */
#include "base/base.h"
#include "kernels/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define LS_AVX512 1
#endif

#define GEMM_MIN_T KERN_GEMM_MIN_T

#ifdef LS_AVX512
static inline __m512 load_w(const kern_wt *W, size_t off, __mmask16 m)
{
    if (W->dtype == KILN_DTYPE_F32) return _mm512_maskz_loadu_ps(m, (const float *)W->data + off);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)W->data + off);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load_w_full(const kern_wt *W, size_t off)
{
    if (W->dtype == KILN_DTYPE_F32) return _mm512_loadu_ps((const float *)W->data + off);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)W->data + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* out[r][t] = dot(W row r0+r, X row t0+t) for r < nr <= 4, t < nt <= 4.
 * Rows / tokens past nr / nt are computed on duplicates and dropped. */
static inline void micro(const kern_wt *W, int r0, int nr, const float *X,
                         int t0, int nt, float out[4][4])
{
    const int K = W->cols;
    __m512 a[4][4];
    size_t ro[4];
    const float *xp[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) ro[r] = (size_t)(r0 + (r < nr ? r : nr - 1)) * K;
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) xp[t] = X + (size_t)(t0 + (t < nt ? t : nt - 1)) * K;
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) a[r][t] = _mm512_setzero_ps();
    int k = 0;
    if (nt == 1) {
        for (; k + 16 <= K; k += 16) {
            __m512 x0 = _mm512_loadu_ps(xp[0] + k);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                a[r][0] = _mm512_fmadd_ps(load_w_full(W, ro[r] + k), x0, a[r][0]);
        }
    } else {
        for (; k + 16 <= K; k += 16) {
            __m512 w[4];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) w[r] = load_w_full(W, ro[r] + k);
#pragma GCC unroll 4
            for (int t = 0; t < 4; t++) {
                __m512 x = _mm512_loadu_ps(xp[t] + k);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) a[r][t] = _mm512_fmadd_ps(w[r], x, a[r][t]);
            }
        }
    }
    if (k < K) {
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        __m512 w[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) w[r] = load_w(W, ro[r] + k, m);
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
            __m512 x = _mm512_maskz_loadu_ps(m, xp[t] + k);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) a[r][t] = _mm512_fmadd_ps(w[r], x, a[r][t]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) out[r][t] = _mm512_reduce_add_ps(a[r][t]);
}
#endif

#if KERN_BF16_DOT
/* The bf16 x bf16 -> fp32 form of micro(): W rows and the activations Xb
 * (already rounded to bf16) are dotted 32 pairs per instruction
 * (vdpbf16ps), so a bf16 row costs one load and one instruction per 32
 * weights and the step is bound by the bytes, not by widening them. */
static inline void micro_bf16(const kern_wt *W, int r0, int nr, const uint16_t *Xb, int t0,
                              int nt, float out[4][4])
{
    const int K = W->cols;
    __m512 a[4][4];
    const uint16_t *wp[4], *xp[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) wp[r] = (const uint16_t *)W->data + (size_t)(r0 + (r < nr ? r : nr - 1)) * K;
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) xp[t] = Xb + (size_t)(t0 + (t < nt ? t : nt - 1)) * K;
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++)
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) a[r][t] = _mm512_setzero_ps();
    int k = 0;
    if (nt == 1) {
        for (; k + 32 <= K; k += 32) {
            __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp[0] + k);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                a[r][0] = _mm512_dpbf16_ps(a[r][0], (__m512bh)_mm512_loadu_si512(wp[r] + k), x0);
        }
    } else {
        for (; k + 32 <= K; k += 32) {
            __m512bh w[4];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) w[r] = (__m512bh)_mm512_loadu_si512(wp[r] + k);
#pragma GCC unroll 4
            for (int t = 0; t < 4; t++) {
                __m512bh x = (__m512bh)_mm512_loadu_si512(xp[t] + k);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) a[r][t] = _mm512_dpbf16_ps(a[r][t], w[r], x);
            }
        }
    }
    if (k < K) {
        __mmask32 m = (__mmask32)((K - k) >= 32 ? 0xffffffffu : ((1u << (K - k)) - 1u));
        __m512bh w[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) w[r] = (__m512bh)_mm512_maskz_loadu_epi16(m, wp[r] + k);
#pragma GCC unroll 4
        for (int t = 0; t < 4; t++) {
            __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(m, xp[t] + k);
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) a[r][t] = _mm512_dpbf16_ps(a[r][t], w[r], x);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) out[r][t] = _mm512_reduce_add_ps(a[r][t]);
}
#endif


static void linear_stream(float *Y, const float *X, int T, const kern_wt *W, const float *b)
{
#ifndef LS_AVX512
    kern_ops_ref()->linear(NULL, Y, X, T, W, b);
#else
    const int R = W->rows, K = W->cols;
    const bool f32 = W->dtype == KILN_DTYPE_F32;
    const size_t row_bytes = (size_t)K * (f32 ? 4 : 2);
#ifdef _OPENMP
    const int nth = omp_get_max_threads();
#else
    const int nth = 1;
#endif
    /* Rows per block: what fits in ~256 KiB of L2, but enough blocks to
     * keep every thread busy. Multiple of 4. */
    int rb = (int)((256 * 1024) / (row_bytes ? row_bytes : 1));
    int fair = (R + 4 * nth - 1) / (4 * nth);
    if (rb > fair) rb = fair;
    rb = (rb + 3) & ~3;
    if (rb < 4) rb = 4;
    const int nblk = (R + rb - 1) / rb;
    uint16_t *Xb = NULL;
#if KERN_BF16_DOT
    if (!f32) {
        Xb = malloc((size_t)T * K * sizeof(uint16_t));
        if (!Xb) { /* the reference needs no memory */
            kern_ops_ref()->linear(NULL, Y, X, T, W, b);
            return;
        }
        for (size_t i = 0; i < (size_t)T * K; i++) Xb[i] = f32_to_bf16(X[i]);
    }
#endif
#pragma omp parallel for schedule(dynamic, 1) if (nth > 1 && nblk > 1 && (size_t)R * K * T > 131072)
    for (int blk = 0; blk < nblk; blk++) {
        int r_lo = blk * rb, r_hi = KILN_MIN(R, r_lo + rb);
        for (int t0 = 0; t0 < T; t0 += 4) {
            int nt = KILN_MIN(4, T - t0);
            for (int r0 = r_lo; r0 < r_hi; r0 += 4) {
                int nr = KILN_MIN(4, r_hi - r0);
                float o[4][4];
#if KERN_BF16_DOT
                if (Xb) micro_bf16(W, r0, nr, Xb, t0, nt, o);
                else
#endif
                    micro(W, r0, nr, X, t0, nt, o);
                for (int t = 0; t < nt; t++)
                    for (int r = 0; r < nr; r++)
                        Y[(size_t)(t0 + t) * R + r0 + r] = o[r][t] + (b ? b[r0 + r] : 0.0f);
            }
        }
    }
    free(Xb);
#endif
}

#ifdef LS_AVX512
/* Y[t0..t0+NT) columns c..c+64 (below c_hi) += X[t][k0..k0+nk) W rows
 * k0..k0+nk: the 4 x NT accumulators stay in registers over the nk rows. */
static inline __attribute__((always_inline)) void io_tile(const float *W, int R, int c_hi,
                                                          const float *X, int K, int k0, int nk,
                                                          int c, int t0, const int NT, float *Y)
{
    __mmask16 m[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; v++) {
        int left = c_hi - c - 16 * v;
        m[v] = left >= 16 ? (__mmask16)0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
    }
    __m512 acc[6][4];
#pragma GCC unroll 6
    for (int t = 0; t < NT; t++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
            acc[t][v] = _mm512_maskz_loadu_ps(m[v], Y + (size_t)(t0 + t) * R + c + 16 * v);
    for (int k = k0; k < k0 + nk; k++) {
        const float *wr = W + (size_t)k * R + c;
        __m512 w[4];
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) w[v] = _mm512_maskz_loadu_ps(m[v], wr + 16 * v);
#pragma GCC unroll 6
        for (int t = 0; t < NT; t++) {
            __m512 xb = _mm512_set1_ps(X[(size_t)(t0 + t) * K + k]);
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) acc[t][v] = _mm512_fmadd_ps(w[v], xb, acc[t][v]);
        }
    }
#pragma GCC unroll 6
    for (int t = 0; t < NT; t++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++)
            _mm512_mask_storeu_ps(Y + (size_t)(t0 + t) * R + c + 16 * v, m[v], acc[t][v]);
}
#endif

/* A decode-sized product (T < KERN_GEMM_MIN_T) with fp32 weights stored
 * (in, out), as GPT-2's are: Y[t] = b + sum_k X[t][k] W[k]. The weights
 * are streamed once, 8 rows k at a time; each 64-column piece of those
 * rows is multiplied into up to 6 tokens' accumulators held in registers
 * (io_tile), the outputs (T x R floats) staying in L1 between blocks. The
 * 8 rows are read in order, so the prefetcher keeps up (a strip of columns
 * down all K rows would jump a page per row). Before this the product went
 * to the GEMM library for every T, which on the 30M benchmark model made
 * an 8-token step 2.3x a 1-token one (now 1.7x; docs/performance.md).
 * Each output sums over k in order whatever T is, so a token's result is
 * the same bits whether it shares the step or not. */
static void linear_stream_io(float *Y, const float *X, int T, const kern_wt *W, const float *b)
{
#ifndef LS_AVX512
    kern_ops_ref()->linear(NULL, Y, X, T, W, b);
#else
    const int R = W->rows, K = W->cols;
    const float *Wd = W->data;
#ifdef _OPENMP
    const int nth = omp_get_max_threads();
#else
    const int nth = 1;
#endif
    /* Column ranges per thread, whole 16-column pieces. */
    const int npiece = (R + 15) / 16;
    const int nchunk = nth > 1 && (size_t)R * K * T > 131072 ? KILN_MIN(nth, npiece) : 1;
#pragma omp parallel for schedule(static) if (nchunk > 1)
    for (int ch = 0; ch < nchunk; ch++) {
        const int c_lo = (int)((long)npiece * ch / nchunk) * 16;
        const int c_hi = KILN_MIN(R, (int)((long)npiece * (ch + 1) / nchunk) * 16);
        for (int t = 0; t < T; t++)
            for (int c = c_lo; c < c_hi; c++) Y[(size_t)t * R + c] = b ? b[c] : 0.0f;
        for (int k0 = 0; k0 < K; k0 += 8) {
            const int nk = KILN_MIN(8, K - k0);
            for (int c = c_lo; c < c_hi; c += 64)
                for (int t0 = 0; t0 < T; t0 += 6) switch (KILN_MIN(6, T - t0)) {
                    case 1: io_tile(Wd, R, c_hi, X, K, k0, nk, c, t0, 1, Y); break;
                    case 2: io_tile(Wd, R, c_hi, X, K, k0, nk, c, t0, 2, Y); break;
                    case 3: io_tile(Wd, R, c_hi, X, K, k0, nk, c, t0, 3, Y); break;
                    case 4: io_tile(Wd, R, c_hi, X, K, k0, nk, c, t0, 4, Y); break;
                    case 5: io_tile(Wd, R, c_hi, X, K, k0, nk, c, t0, 5, Y); break;
                    default: io_tile(Wd, R, c_hi, X, K, k0, nk, c, t0, 6, Y); break;
                    }
        }
    }
#endif
}

/* A prefill-sized product with bf16 or block-quantized weights (rows (out,
 * in)): tiles of rows are widened / dequantized to fp32 (exactly: the
 * dtype's to_float) and multiplied through the GEMM, the activations
 * unrounded, so the conversion costs 1/T of the products. false when out
 * of memory (the caller falls back). */
static bool linear_tiles_gemm(kern_gemm *g, float *Y, const float *X, int T, const kern_wt *W,
                          const float *b)
{
    enum { TILE = 256 };
    const int R = W->rows, K = W->cols;
    const dtype_traits *tr = dtype_traits_of(W->dtype);
    const size_t rb = dtype_row_bytes(W->dtype, K);
    const int rows = KILN_MIN(R, TILE);
    float *wt = kiln_aligned_alloc(NULL, (size_t)rows * K * sizeof(float));
    if (!wt) return false;
    for (int r0 = 0; r0 < R; r0 += TILE) {
        int nr = KILN_MIN(TILE, R - r0);
#pragma omp parallel for schedule(static) if ((size_t)nr * K > 65536)
        for (int r = 0; r < nr; r++)
            tr->to_float((const uint8_t *)W->data + rb * (size_t)(r0 + r), wt + (size_t)r * K, K);
        g->gemm(g, false, true, T, nr, K, 1.0f, X, K, wt, K, 0.0f, Y + r0, R);
    }
    free(wt);
    if (b)
#pragma omp parallel for schedule(static) if ((size_t)T * R > 65536)
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++) Y[(size_t)t * R + r] += b[r];
    return true;
}

void kern_fast_linear(kern_gemm *g, float *Y, const float *X, int T, const kern_wt *W,
                      const float *b)
{
    if (W->dtype == KILN_DTYPE_F32 && T >= GEMM_MIN_T && g) {
        kern_matmul_fwd_gemm(g, Y, X, W->data, b, T, W->cols, W->rows, W->lay);
        return;
    }
    if (W->dtype == KILN_DTYPE_F32 && W->lay == KERN_W_IN_OUT) {
        linear_stream_io(Y, X, T, W, b);
        return;
    }
    if (W->dtype != KILN_DTYPE_F32 && W->lay == KERN_W_OUT_IN && T >= GEMM_MIN_T && g &&
        linear_tiles_gemm(g, Y, X, T, W, b))
        return;
    if (dtype_traits_of(W->dtype)->quantized) {
        if (!kern_fast_linear_q(Y, X, T, W, b)) kern_ops_ref()->linear(g, Y, X, T, W, b);
        return;
    }
    if (W->lay != KERN_W_OUT_IN) { /* bf16 rows are stored (out, in) only */
        kern_ops_ref()->linear(g, Y, X, T, W, b);
        return;
    }
    linear_stream(Y, X, T, W, b);
}

void kern_fast_rope_at(float *x, int n, size_t stride, const int *pos, const float *cos_t,
                       const float *sin_t, int nheads, int HS)
{
    int half = HS / 2;
#pragma omp parallel for schedule(static) if ((size_t)n * nheads * HS > 16384)
    for (int r = 0; r < n; r++) {
        float *row = x + (size_t)r * stride;
        const float *c = cos_t + (size_t)pos[r] * half, *s = sin_t + (size_t)pos[r] * half;
        for (int h = 0; h < nheads; h++) {
            float *v = row + (size_t)h * HS;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                float x1 = v[i], x2 = v[i + half], sn = s[i];
                v[i] = x1 * c[i] - x2 * sn;
                v[i + half] = x2 * c[i] + x1 * sn;
            }
        }
    }
}

/* One (query row, head) pair per task; the scores of a row live in its
 * slice of the scratch, so tasks are independent and the result does not
 * depend on the thread count. */
void kern_fast_attention_kv(float *out, const float *qkv, size_t qkv_stride, int T,
                            const int *slot, const int *pos, const float *kc, const float *vc,
                            size_t slot_stride, int NH, int KVH, int HS, int n_ctx,
                            float *scores)
{
    const int grp = NH / KVH, KVD = KVH * HS;
    const float scale = 1.0f / sqrtf((float)HS);
    long work = 0; /* multiply-adds of this call */
    for (int t = 0; t < T; t++) work += (long)(pos[t] + 1) * 2 * NH * HS;
#pragma omp parallel for schedule(dynamic, 1) if (T * NH > 1 && work > 200000)
    for (int th = 0; th < T * NH; th++) {
        int t = th / NH, h = th % NH, kh = h / grp, n = pos[t] + 1;
        const float *q = qkv + (size_t)t * qkv_stride + (size_t)h * HS;
        const size_t base = (size_t)slot[t] * slot_stride + (size_t)kh * HS;
        float *sc = scores + (size_t)th * n_ctx;
        float mx = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float *k = kc + base + (size_t)j * KVD;
            float s = 0;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < HS; i++) s += q[i] * k[i];
            sc[j] = s * scale;
            if (sc[j] > mx) mx = sc[j];
        }
        float sum = 0;
        for (int j = 0; j < n; j++) {
            sc[j] = expf(sc[j] - mx);
            sum += sc[j];
        }
        float inv = 1.0f / sum;
        float *o = out + (size_t)t * NH * HS + (size_t)h * HS;
        for (int i = 0; i < HS; i++) o[i] = 0;
        for (int j = 0; j < n; j++) {
            const float *v = vc + base + (size_t)j * KVD;
            float a = sc[j] * inv;
#pragma omp simd
            for (int i = 0; i < HS; i++) o[i] += a * v[i];
        }
    }
}

double kern_stream_read(const void *p, size_t n, int nth)
{
#ifdef _OPENMP
    if (nth <= 0) nth = omp_get_max_threads();
#else
    nth = 1;
#endif
    const unsigned char *c = p;
    size_t nl = n / 64;
    uint64_t total = 0;
#pragma omp parallel for schedule(static) reduction(^ : total) num_threads(nth)
    for (size_t chunk = 0; chunk < (nl + 1023) / 1024; chunk++) {
        size_t lo = chunk * 1024, hi = KILN_MIN(nl, lo + 1024);
#ifdef LS_AVX512
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        size_t i = lo;
        for (; i + 2 <= hi; i += 2) {
            a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(c + i * 64));
            a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(c + i * 64 + 64));
        }
        if (i < hi) a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(c + i * 64));
        a0 = _mm512_xor_si512(a0, a1);
        uint64_t v[8];
        _mm512_storeu_si512(v, a0);
        total ^= v[0] ^ v[1] ^ v[2] ^ v[3] ^ v[4] ^ v[5] ^ v[6] ^ v[7];
#else
        for (size_t i = lo; i < hi; i++) {
            uint64_t v[8];
            memcpy(v, c + i * 64, 64);
            total ^= v[0] ^ v[1] ^ v[2] ^ v[3] ^ v[4] ^ v[5] ^ v[6] ^ v[7];
        }
#endif
    }
    return (double)(total & 0xffff);
}
