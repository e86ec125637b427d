/*
 * linear_quant.c — the fast table's linear on block-quantized weights
 * (Q8_0, Q4_0, Q4_K, Q6_K; ggml's block layouts, tensor/quant.c).
 *
 * As llama.cpp does on CPUs, the activations are quantized to 8 bits in
 * blocks of 32 (kern_quant_act, shared with the reference), and each block
 * of 32 weights is dotted with them in integers: the weights unpacked to
 * 32 unsigned bytes (Q8_0's signed codes + 128), one vpdpbusd (AVX512-VNNI)
 * into eight int32 partial sums, converted and scaled by the block's
 * factors (weight scale, sub-block scale, activation scale) into an fp32
 * accumulator. The codes' offset (128, 8, 32, or the Q4_K minimum) is taken
 * out with the activation block sums, in the dpbusd's start value. Q8_0
 * and Q4_0 go 16 blocks a group: the 16 weight scales widened at once,
 * then two blocks per 512-bit dpbusd / conversion / FMA. Up to four tokens
 * share each unpacked block, so a decode step of a few slots reads every
 * weight byte once. Rows are split over the threads; each row's result is
 * computed by one thread in a fixed order (deterministic, and the same for
 * a token whatever the others in its step).
 *
 * Batch-1 decode streams the weights once per token, so the loop must keep
 * the memory busy: the weight stream is prefetched LQ_PF bytes ahead (the
 * hardware prefetcher alone left the loop waiting on loads at about half
 * the read bandwidth), and every accumulator is a named register (an
 * accumulator indexed by the block's parity lived on the stack, a chain
 * through store forwarding).
 *
 * Without AVX512-VNNI in the build's target the reference (ref.c) runs.
 */
#include "base/base.h"
#include "kernels/kernels.h"

#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__) && defined(__F16C__)
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

#ifndef LQ_PF
#define LQ_PF 2048
#endif
enum { NT = 4 }; /* tokens sharing one unpacked block */

/* The fp16 scales of 16 blocks `stride` bytes apart, widened at once:
 * gathered by scalar loads and stores (no vector port), one F16C
 * conversion. */
static inline __m512 scales16(const uint8_t *p, size_t stride)
{
    uint16_t h[16];
    for (int i = 0; i < 16; i++) memcpy(&h[i], p + stride * (size_t)i, 2);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
}

/* Lanes [f[2p] x 8, f[2p + 1] x 8] of 16 block factors f: the factors of
 * the pair of blocks in one 512-bit product. */
static inline __m512 pair_scale(__m512 f, int p)
{
    const __m512i i0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(_mm512_add_epi32(i0, _mm512_set1_epi32(2 * p)), f);
}

typedef struct qacts {
    const int8_t *q;    /* (T, K) */
    const float *d;     /* (T, nb) */
    const int32_t *s16; /* (T, 2 nb) */
    const float *ds;    /* (T, nb): d * (sum of the block's q), Q4_K's minimum term */
    const __m256i *init; /* (T, nb): each block's dpbusd start (init_q4_0 / init_q6_k) */
    int K, nb;
} qacts;

/* The int32 lanes that start a block's dpbusd: the code offset taken out
 * in integers (Q4_0: -8 sum q in lane 0; Q6_K: -32 sum q of each half in
 * lanes 0 and 4, which its two sub-block scales multiply). */
static inline __m256i init_q4_0(const int32_t *s16)
{
    return _mm256_castsi128_si256(_mm_cvtsi32_si128(-8 * (s16[0] + s16[1])));
}

static inline __m256i init_q8_0(const int32_t *s16)
{
    return _mm256_castsi128_si256(_mm_cvtsi32_si128(-128 * (s16[0] + s16[1])));
}

static inline __m256i init_q6_k(const int32_t *s16)
{
    return _mm256_set_m128i(_mm_cvtsi32_si128(-32 * s16[1]), _mm_cvtsi32_si128(-32 * s16[0]));
}

/* One row of W against tokens t0 .. t0 + nt - 1: out[t]. Inlined into a
 * copy per nt (row_dot_n), so the accumulators live in registers; two
 * accumulators per token (even and odd blocks) halve the chain of
 * dependent FMAs. */
static inline __attribute__((always_inline)) void row_dot(const kern_wt *W, const uint8_t *w,
                                                          const qacts *a, int t0, int nt,
                                                          float *out)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3),
                  m80 = _mm256_set1_epi8((char)0x80);
    int b;
    __m256 acc[2][NT];
    #pragma GCC unroll 4
    for (int t = 0; t < NT; t++) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
    const int nb = a->nb;
    const int8_t *xq[NT];
    const float *xd[NT], *xds[NT];
    const __m256i *xi[NT];
    #pragma GCC unroll 4
    for (int t = 0; t < nt; t++) {
        xi[t] = a->init + (size_t)(t0 + t) * nb;
        xq[t] = a->q + (size_t)(t0 + t) * a->K;
        xd[t] = a->d + (size_t)(t0 + t) * nb;
        xds[t] = a->ds + (size_t)(t0 + t) * nb;
    }
#define XQ(t, b) _mm256_loadu_si256((const __m256i *)(xq[t] + (size_t)(b) * 32))
#define ACC(k, t, is, f) acc[k][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), (f), acc[k][t])
    /* pairs of blocks: activations, dpbusd starts, accumulators 512 bits wide */
#define XQ2(t, b) _mm512_loadu_si512((const void *)(xq[t] + (size_t)(b) * 32))
#define XI2(t, b) _mm512_loadu_si512((const void *)(xi[t] + (b)))
#define ACC2(k, t, is, f) acz[k][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), (f), acz[k][t])
    const __m512i m80z = _mm512_set1_epi8((char)0x80), m4z = _mm512_set1_epi8(0x0f);
    __m512 acz[2][NT];
    /* the 512-bit accumulators added into the 256-bit ones */
#define FOLD2()                                                                              \
    _Pragma("GCC unroll 4")                                                                  \
    for (int t = 0; t < nt; t++) {                                                           \
        __m512 z = _mm512_add_ps(acz[0][t], acz[1][t]);                                      \
        acc[0][t] = _mm256_add_ps(acc[0][t], _mm256_add_ps(_mm512_castps512_ps256(z),        \
                                                           _mm512_extractf32x8_ps(z, 1)));   \
    }
    const __m512i sh04 = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0,
                                          0x0004000400040004, 0x0004000400040004, 0, 0);

    switch (W->dtype) {
    case KILN_DTYPE_Q8_0:
        /* signed codes made unsigned (+128, an exclusive or); the 128
         * sum(q) this adds is taken out by the block's start value
         * (init_q8_0). Two blocks a round: the accumulators are named,
         * so they stay in registers. */
#define Q8_BLOCK(k, bb)                                                                    \
    do {                                                                                   \
        const uint8_t *wb = w + 34 * (size_t)(bb);                                         \
        __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + 2)), m80); \
        float dw = ld16(wb);                                                               \
        _Pragma("GCC unroll 4")                                                            \
        for (int t = 0; t < nt; t++) {                                                     \
            __m256i is = _mm256_dpbusd_epi32(xi[t][bb], u, XQ(t, bb));                     \
            ACC(k, t, is, _mm256_set1_ps(dw * xd[t][bb]));                                 \
        }                                                                                  \
    } while (0)
        /* 16 blocks a group: their 16 weight scales widened at once and
         * multiplied by the activation scales (F), then pairs of blocks in
         * 512-bit registers (one dpbusd, conversion and FMA for two), the
         * pair's factors picked from F by a permute. The blocks past the
         * last group go one by one, 256 bits wide. */
        #pragma GCC unroll 4
        for (int t = 0; t < NT; t++) acz[0][t] = acz[1][t] = _mm512_setzero_ps();
        for (b = 0; b + 16 <= nb; b += 16) {
            const uint8_t *wg = w + 34 * (size_t)b;
            /* every line of the group's 544 bytes, LQ_PF ahead (one
             * prefetch per 68-byte pair would skip one line in 16) */
            for (int l = 0; l < 9; l++) _mm_prefetch((const char *)(wg + LQ_PF + 64 * l), _MM_HINT_T0);
            __m512 dwv = scales16(wg, 34), F[NT];
            #pragma GCC unroll 4
            for (int t = 0; t < nt; t++) F[t] = _mm512_mul_ps(dwv, _mm512_loadu_ps(xd[t] + b));
#pragma GCC unroll 8
            for (int p = 0; p < 8; p++) {
                const uint8_t *wp = wg + 68 * p;
                __m512i u = _mm512_xor_si512(
                    _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(wp + 2))),
                        _mm256_loadu_si256((const __m256i *)(wp + 36)), 1),
                    m80z);
                #pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    __m512i is = _mm512_dpbusd_epi32(XI2(t, b + 2 * p), u, XQ2(t, b + 2 * p));
                    ACC2(p & 1, t, is, pair_scale(F[t], p));
                }
            }
        }
        for (; b + 1 < nb; b += 2) {
            _mm_prefetch((const char *)(w + 34 * (size_t)b + LQ_PF), _MM_HINT_T0);
            Q8_BLOCK(0, b);
            Q8_BLOCK(1, b + 1);
        }
        if (b < nb) Q8_BLOCK(0, b);
#undef Q8_BLOCK
        FOLD2();
        break;
    case KILN_DTYPE_Q4_0:
#define Q4_BLOCK(k, bb)                                                                    \
    do {                                                                                   \
        const uint8_t *wb = w + 18 * (size_t)(bb);                                         \
        __m128i qs = _mm_loadu_si128((const __m128i *)(wb + 2));                           \
        __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), m4);    \
        float dw = ld16(wb);                                                               \
        _Pragma("GCC unroll 4")                                                            \
        for (int t = 0; t < nt; t++) {                                                     \
            __m256i is = _mm256_dpbusd_epi32(xi[t][bb], u, XQ(t, bb));                     \
            ACC(k, t, is, _mm256_set1_ps(dw * xd[t][bb]));                                 \
        }                                                                                  \
    } while (0)
        /* as Q8_0's groups; a pair's 32 code bytes are spread to the four
         * 128-bit lanes [b low, b high, b+1 low, b+1 high] nibbles (one
         * variable shift, one mask) */
        #pragma GCC unroll 4
        for (int t = 0; t < NT; t++) acz[0][t] = acz[1][t] = _mm512_setzero_ps();
        for (b = 0; b + 16 <= nb; b += 16) {
            const uint8_t *wg = w + 18 * (size_t)b;
            for (int l = 0; l < 5; l++) _mm_prefetch((const char *)(wg + LQ_PF + 64 * l), _MM_HINT_T0);
            __m512 dwv = scales16(wg, 18), F[NT];
            #pragma GCC unroll 4
            for (int t = 0; t < nt; t++) F[t] = _mm512_mul_ps(dwv, _mm512_loadu_ps(xd[t] + b));
#pragma GCC unroll 8
            for (int p = 0; p < 8; p++) {
                const uint8_t *wp = wg + 36 * p;
                __m512i z = _mm512_inserti64x4(
                    _mm512_castsi256_si512(
                        _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(wp + 2)))),
                    _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(wp + 20))), 1);
                __m512i u = _mm512_and_si512(_mm512_srlv_epi16(z, sh04), m4z);
                #pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    __m512i is = _mm512_dpbusd_epi32(XI2(t, b + 2 * p), u, XQ2(t, b + 2 * p));
                    ACC2(p & 1, t, is, pair_scale(F[t], p));
                }
            }
        }
        for (; b + 1 < nb; b += 2) {
            _mm_prefetch((const char *)(w + 18 * (size_t)b + LQ_PF), _MM_HINT_T0);
            Q4_BLOCK(0, b);
            Q4_BLOCK(1, b + 1);
        }
        if (b < nb) Q4_BLOCK(0, b);
#undef Q4_BLOCK
        FOLD2();
        break;
    case KILN_DTYPE_Q4_K: {
        __m256 accm[NT]; /* the minimum terms, 8 sub-blocks a lane each */
        #pragma GCC unroll 4
        for (int t = 0; t < NT; t++) accm[t] = _mm256_setzero_ps();
        for (int sb = 0; sb < nb / 8; sb++, w += 144) {
            _mm_prefetch((const char *)(w + LQ_PF), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + LQ_PF + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + LQ_PF + 128), _MM_HINT_T0);
            const uint8_t *scl = w + 4;
            uint32_t u32[3];
            memcpy(u32, scl, 12);
            /* ggml's unpacking of the eight 6-bit scales and mins */
            const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
            uint32_t sc_lo = u32[0] & k1, mn_lo = u32[1] & k1;
            uint32_t sc_hi = (u32[2] & k2) | (((u32[0] >> 6) & k3) << 4);
            uint32_t mn_hi = ((u32[2] >> 4) & k2) | (((u32[1] >> 6) & k3) << 4);
            __m256 scv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                _mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo)));
            __m256 mnv = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                _mm_set_epi32(0, 0, (int)mn_hi, (int)mn_lo)));
            scv = _mm256_mul_ps(scv, _mm256_set1_ps(ld16(w)));
            mnv = _mm256_mul_ps(mnv, _mm256_set1_ps(ld16(w + 2)));
            __m256 f[NT];
            #pragma GCC unroll 4
            for (int t = 0; t < nt; t++) {
                f[t] = _mm256_mul_ps(scv, _mm256_loadu_ps(xd[t] + 8 * sb));
                accm[t] = _mm256_fmadd_ps(mnv, _mm256_loadu_ps(xds[t] + 8 * sb), accm[t]);
            }
            for (int c = 0; c < 4; c++) {
                __m256i qs = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * c));
                __m256i u0 = _mm256_and_si256(qs, m4);
                __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(qs, 4), m4);
                const __m256i j0 = _mm256_set1_epi32(2 * c), j1 = _mm256_set1_epi32(2 * c + 1);
                int b0 = 8 * sb + 2 * c;
                #pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    __m256i i0 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, XQ(t, b0));
                    __m256i i1 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u1, XQ(t, b0 + 1));
                    ACC(0, t, i0, _mm256_permutevar8x32_ps(f[t], j0));
                    ACC(1, t, i1, _mm256_permutevar8x32_ps(f[t], j1));
                }
            }
        }
        #pragma GCC unroll 4
        for (int t = 0; t < nt; t++) acc[0][t] = _mm256_sub_ps(acc[0][t], accm[t]);
        break;
    }
    case KILN_DTYPE_Q6_K:
        for (int sb = 0; sb < nb / 8; sb++, w += 210) {
            for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)(w + LQ_PF + l), _MM_HINT_T0);
            __m256 dw = _mm256_set1_ps(ld16(w + 208));
            const int8_t *sc = (const int8_t *)(w + 192);
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256i ql0 = _mm256_loadu_si256((const __m256i *)(w + 64 * h));
                __m256i ql1 = _mm256_loadu_si256((const __m256i *)(w + 64 * h + 32));
                __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h));
                /* the four 32-element blocks of this half, codes 0..63 */
                __m256i uk[4] = {
                    _mm256_or_si256(_mm256_and_si256(ql0, m4),
                                    _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4),
                                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4))};
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) { /* x block 8 sb + jb: elements 32 jb .. */
                int jb = 4 * h + k, xb = 8 * sb + jb;
                __m256i u = uk[k];
                __m256 fv = _mm256_mul_ps(
                    dw, _mm256_set_m128(_mm_set1_ps(sc[2 * jb + 1]), _mm_set1_ps(sc[2 * jb])));
                #pragma GCC unroll 4
                for (int t = 0; t < nt; t++) {
                    __m256i is = _mm256_dpbusd_epi32(xi[t][xb], u, XQ(t, xb));
                    ACC(jb & 1, t, is, _mm256_mul_ps(fv, _mm256_set1_ps(xd[t][xb])));
                }
            }
            }
        }
        break;
    default:
        KILN_ASSERT(!"linear_quant: not a Q type");
    }
#undef XQ
#undef ACC
#undef XQ2
#undef XI2
#undef ACC2
#undef FOLD2
    #pragma GCC unroll 4
    for (int t = 0; t < nt; t++) out[t] = hsum8(_mm256_add_ps(acc[0][t], acc[1][t]));
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
    float *ds = malloc(sizeof(float) * (size_t)T * nb);
    __m256i *init = kiln_aligned_alloc(NULL, sizeof(__m256i) * (size_t)T * nb);
    if (!q || !d || !s16 || !ds || !init) {
        free(q), free(d), free(s16), free(ds), free(init);
        return false;
    }
    for (int t = 0; t < T; t++)
        kern_quant_act(X + (size_t)t * K, K, q + (size_t)t * K, d + (size_t)t * nb,
                       s16 + (size_t)t * 2 * nb);
    for (size_t i = 0; i < (size_t)T * nb; i++) {
        ds[i] = d[i] * (float)(s16[2 * i] + s16[2 * i + 1]);
        init[i] = W->dtype == KILN_DTYPE_Q8_0   ? init_q8_0(s16 + 2 * i)
                  : W->dtype == KILN_DTYPE_Q4_0 ? init_q4_0(s16 + 2 * i)
                  : W->dtype == KILN_DTYPE_Q6_K ? init_q6_k(s16 + 2 * i)
                                                : _mm256_setzero_si256();
    }
    qacts a = {q, d, s16, ds, init, K, nb};
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
    free(q), free(d), free(s16), free(ds), free(init);
    return true;
#endif
}
