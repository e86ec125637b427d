/*
 * kernels.c — the matrix kernels of the inference engine.
 *
 * Decoding is bound by memory bandwidth: every weight byte is read once per
 * step, whatever the batch. ik_linear therefore streams each block of rows
 * of W once and dots it with all T input rows while it is in registers (a
 * 4 rows x 4 tokens register tile of AVX-512 accumulators); bf16 rows are
 * widened to fp32 in registers, so they cost half the bytes. For prefill
 * (large T) the rows are tiled in blocks that stay in L2 while all token
 * groups pass over them. A portable scalar reference (ik_linear_ref) is
 * the oracle the tests compare against, and the fallback without AVX-512.
 */
#include "infer/infer.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define IK_AVX512 1
#endif
#include <stdlib.h>

void ik_linear_ref(float *Y, const float *X, int T, const imat *W,
                   const float *b, bool acc)
{
    const int R = W->rows, K = W->cols;
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) {
            double s = b ? b[r] : 0.0;
            for (int k = 0; k < K; k++) {
                float w = W->f32 ? W->f32[(size_t)r * K + k]
                                 : bf16_to_f32(W->bf16[(size_t)r * K + k]);
                float x = X[(size_t)t * K + k];
                if (!W->f32 && IK_BF16_DOT) x = bf16_to_f32(f32_to_bf16(x));
                s += (double)w * x;
            }
            float *y = &Y[(size_t)t * R + r];
            *y = acc ? *y + (float)s : (float)s;
        }
}

#ifdef IK_AVX512
static inline __m512 load_w(const imat *W, size_t off, __mmask16 m)
{
    if (W->f32) return _mm512_maskz_loadu_ps(m, W->f32 + off);
    __m256i h = _mm256_maskz_loadu_epi16(m, W->bf16 + off);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load_w_full(const imat *W, size_t off)
{
    if (W->f32) return _mm512_loadu_ps(W->f32 + off);
    __m256i h = _mm256_loadu_si256((const __m256i *)(W->bf16 + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* out[r][t] = dot(W row r0+r, X row t0+t) for r < nr <= 4, t < nt <= 4.
 * Rows / tokens past nr / nt are computed on duplicates and dropped. */
static inline void micro(const imat *W, int r0, int nr, const float *X,
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

#if IK_BF16_DOT
/* The bf16 x bf16 -> fp32 form of micro(): W rows and the activations Xb
 * (already rounded to bf16) are dotted 32 pairs per instruction
 * (vdpbf16ps), so a bf16 row costs one load and one instruction per 32
 * weights and the step is bound by the bytes, not by widening them. */
static inline void micro_bf16(const imat *W, int r0, int nr, const uint16_t *Xb, int t0,
                              int nt, float out[4][4])
{
    const int K = W->cols;
    __m512 a[4][4];
    const uint16_t *wp[4], *xp[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) wp[r] = W->bf16 + (size_t)(r0 + (r < nr ? r : nr - 1)) * K;
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

void ik_linear(float *Y, const float *X, int T, const imat *W,
               const float *b, bool acc, int nth)
{
#ifndef IK_AVX512
    (void)nth;
    ik_linear_ref(Y, X, T, W, b, acc);
#else
    const int R = W->rows, K = W->cols;
    const size_t row_bytes = (size_t)K * (W->f32 ? 4 : 2);
#ifdef _OPENMP
    if (nth <= 0) nth = omp_get_max_threads();
#else
    nth = 1;
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
#if IK_BF16_DOT
    if (W->bf16) {
        Xb = malloc((size_t)T * K * sizeof(uint16_t));
        if (!Xb) {
            ik_linear_ref(Y, X, T, W, b, acc);
            return;
        }
        for (size_t i = 0; i < (size_t)T * K; i++) Xb[i] = f32_to_bf16(X[i]);
    }
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth) if (nth > 1 && nblk > 1 && (size_t)R * K * T > 131072)
    for (int blk = 0; blk < nblk; blk++) {
        int r_lo = blk * rb, r_hi = KILN_MIN(R, r_lo + rb);
        for (int t0 = 0; t0 < T; t0 += 4) {
            int nt = KILN_MIN(4, T - t0);
            for (int r0 = r_lo; r0 < r_hi; r0 += 4) {
                int nr = KILN_MIN(4, r_hi - r0);
                float o[4][4];
#if IK_BF16_DOT
                if (Xb) micro_bf16(W, r0, nr, Xb, t0, nt, o);
                else
#endif
                    micro(W, r0, nr, X, t0, nt, o);
                for (int t = 0; t < nt; t++)
                    for (int r = 0; r < nr; r++) {
                        float v = o[r][t] + (b ? b[r0 + r] : 0.0f);
                        float *y = &Y[(size_t)(t0 + t) * R + r0 + r];
                        *y = acc ? *y + v : v;
                    }
            }
        }
    }
    free(Xb);
#endif
}

double ik_stream_read(const void *p, size_t n, int nth)
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
#ifdef IK_AVX512
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
