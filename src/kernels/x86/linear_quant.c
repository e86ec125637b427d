/*
 * linear_quant.c — the fast table's linear on block-quantized weights
 * (Q8_0, Q4_0, Q4_K, Q6_K; ggml's block layouts, tensor/quant.c).
 *
 * As llama.cpp does on CPUs, the activations are quantized to 8 bits in
 * blocks of 32 (kern_quant_act, shared with the reference), and each block
 * of 32 weights is dotted with them in integers: the weights unpacked to
 * 32 unsigned bytes (|w| for Q8_0, with the activations' signs flipped to
 * match), one vpdpbusd (AVX512-VNNI on 256-bit lanes) into eight int32
 * partial sums, converted and scaled by the block's factors (weight scale,
 * sub-block scale, activation scale) into an fp32 accumulator. The
 * unsigned 4/6-bit codes carry an offset (8, 32, or the Q4_K minimum),
 * which is taken out with the activation block sums. Up to four tokens
 * share each unpacked block, so a decode step of a few slots reads every
 * weight byte once. Rows are split over the threads; each row's result is
 * computed by one thread in a fixed order (deterministic).
 *
 * Without AVX512-VNNI in the build's target the reference (ref.c) runs.
 */
#include "base/base.h"
#include "kernels/kernels.h"

#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__)
#include <immintrin.h>
#define LQ_VNNI 1
#endif

#ifdef LQ_VNNI
/* The blocks' fp16 scales, widened by the F16C instruction (exact, as
 * f16_to_f32 is). */
static inline float ld16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

enum { NT = 4 }; /* tokens sharing one unpacked block */

typedef struct qacts {
    const int8_t *q;    /* (T, K) */
    const float *d;     /* (T, nb) */
    const int32_t *s16; /* (T, 2 nb) */
    int K, nb;
} qacts;

/* One row r of W against tokens t0 .. t0 + nt - 1: out[t]. Inlined into
 * a copy per nt (row_dot_n), so the accumulators live in registers. */
static inline __attribute__((always_inline)) void row_dot(const kern_wt *W, const uint8_t *w, const qacts *a, int t0, int nt, float *out)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3);
    __m256 acc[NT];
    float off[NT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps(), off[t] = 0;
    const int nb = a->nb;
    const int8_t *xq[NT];
    const float *xd[NT];
    const int32_t *xs[NT];
    for (int t = 0; t < nt; t++) {
        xq[t] = a->q + (size_t)(t0 + t) * a->K;
        xd[t] = a->d + (size_t)(t0 + t) * nb;
        xs[t] = a->s16 + (size_t)(t0 + t) * 2 * nb;
    }
#define DOT(u, xv) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (xv))
#define XQ(t, b) _mm256_loadu_si256((const __m256i *)(xq[t] + (size_t)(b) * 32))
    switch (W->dtype) {
    case KILN_DTYPE_Q8_0:
        for (int b = 0; b < nb; b++, w += 34) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 2));
            __m256i u = _mm256_sign_epi8(wv, wv);
            float dw = ld16(w);
            for (int t = 0; t < nt; t++) {
                __m256i is = DOT(u, _mm256_sign_epi8(XQ(t, b), wv));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_set1_ps(dw * xd[t][b]), acc[t]);
            }
        }
        break;
    case KILN_DTYPE_Q4_0:
        for (int b = 0; b < nb; b++, w += 18) {
            __m128i qs = _mm_loadu_si128((const __m128i *)(w + 2));
            __m256i u = _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), m4);
            float dw = ld16(w);
            for (int t = 0; t < nt; t++) {
                float f = dw * xd[t][b];
                __m256i is = DOT(u, XQ(t, b));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), _mm256_set1_ps(f), acc[t]);
                off[t] -= 8 * f * (float)(xs[t][2 * b] + xs[t][2 * b + 1]);
            }
        }
        break;
    case KILN_DTYPE_Q4_K:
        for (int sb = 0; sb < nb / 8; sb++, w += 144) {
            float dw = ld16(w), dmin = ld16(w + 2);
            const uint8_t *scl = w + 4;
            int sc[8], mn[8];
            for (int j = 0; j < 4; j++) {
                sc[j] = scl[j] & 63, mn[j] = scl[j + 4] & 63;
                sc[j + 4] = (scl[j + 8] & 0x0f) | ((scl[j] >> 6) << 4);
                mn[j + 4] = (scl[j + 8] >> 4) | ((scl[j + 4] >> 6) << 4);
            }
            for (int c = 0; c < 4; c++) {
                __m256i qs = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * c));
                __m256i u0 = _mm256_and_si256(qs, m4);
                __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(qs, 4), m4);
                int b0 = 8 * sb + 2 * c;
                for (int t = 0; t < nt; t++) {
                    __m256i i0 = DOT(u0, XQ(t, b0)), i1 = DOT(u1, XQ(t, b0 + 1));
                    float d0 = xd[t][b0], d1 = xd[t][b0 + 1];
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0),
                                             _mm256_set1_ps(dw * sc[2 * c] * d0), acc[t]);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1),
                                             _mm256_set1_ps(dw * sc[2 * c + 1] * d1), acc[t]);
                    off[t] -= dmin * (mn[2 * c] * d0 * (float)(xs[t][2 * b0] + xs[t][2 * b0 + 1]) +
                                      mn[2 * c + 1] * d1 *
                                          (float)(xs[t][2 * b0 + 2] + xs[t][2 * b0 + 3]));
                }
            }
        }
        break;
    case KILN_DTYPE_Q6_K:
        for (int sb = 0; sb < nb / 8; sb++, w += 210) {
            float dw = ld16(w + 208);
            const int8_t *sc = (const int8_t *)(w + 192);
            for (int jb = 0; jb < 8; jb++) { /* x block 8 sb + jb: elements 32 jb .. */
                int h = jb / 4, k = jb % 4, b = 8 * sb + jb;
                __m256i ql = _mm256_loadu_si256((const __m256i *)(w + 64 * h + (k % 2) * 32));
                __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h));
                __m256i lo = k < 2 ? _mm256_and_si256(ql, m4)
                                   : _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), m2);
                __m256i u = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                float fa = dw * sc[2 * jb], fb = dw * sc[2 * jb + 1];
                __m256 fv = _mm256_set_m128(_mm_set1_ps(fb), _mm_set1_ps(fa));
                for (int t = 0; t < nt; t++) {
                    float dx = xd[t][b];
                    __m256i is = DOT(u, XQ(t, b));
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is),
                                             _mm256_mul_ps(fv, _mm256_set1_ps(dx)), acc[t]);
                    off[t] -= 32 * dx * (fa * (float)xs[t][2 * b] + fb * (float)xs[t][2 * b + 1]);
                }
            }
        }
        break;
    default:
        KILN_ASSERT(!"linear_quant: not a Q type");
    }
#undef DOT
#undef XQ
    for (int t = 0; t < nt; t++) out[t] = hsum8(acc[t]) + off[t];
}

static void row_dot_n(const kern_wt *W, const uint8_t *w, const qacts *a, int t0, int nt,
                      float *out)
{
    switch (nt) {
    case 1: row_dot(W, w, a, t0, 1, out); break;
    case 2: row_dot(W, w, a, t0, 2, out); break;
    case 3: row_dot(W, w, a, t0, 3, out); break;
    default: row_dot(W, w, a, t0, 4, out); break;
    }
}
#endif

bool kern_fast_linear_q(float *Y, const float *X, int T, const kern_wt *W, const float *b)
{
#ifndef LQ_VNNI
    (void)Y, (void)X, (void)T, (void)W, (void)b;
    return false;
#else
    const int R = W->rows, K = W->cols, nb = K / 32;
    const size_t rb = dtype_row_bytes(W->dtype, K);
    int8_t *q = malloc((size_t)T * K);
    float *d = malloc(sizeof(float) * (size_t)T * nb);
    int32_t *s16 = malloc(sizeof(int32_t) * 2 * (size_t)T * nb);
    if (!q || !d || !s16) {
        free(q), free(d), free(s16);
        return false;
    }
    for (int t = 0; t < T; t++)
        kern_quant_act(X + (size_t)t * K, K, q + (size_t)t * K, d + (size_t)t * nb,
                       s16 + (size_t)t * 2 * nb);
    qacts a = {q, d, s16, K, nb};
#pragma omp parallel for schedule(static) if ((size_t)R * K * T > 65536)
    for (int r = 0; r < R; r++) {
        const uint8_t *w = (const uint8_t *)W->data + rb * (size_t)r;
        for (int t0 = 0; t0 < T; t0 += NT) {
            int nt = KILN_MIN(NT, T - t0);
            float o[NT];
            row_dot_n(W, w, &a, t0, nt, o);
            for (int t = 0; t < nt; t++) Y[(size_t)(t0 + t) * R + r] = o[t] + (b ? b[r] : 0.0f);
        }
    }
    free(q), free(d), free(s16);
    return true;
#endif
}
