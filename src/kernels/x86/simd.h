/*
 * simd.h — small AVX-512 helpers shared by the fast kernels: exp, tanh,
 * sigmoid on 16 floats, horizontal sums. Defined where __AVX512F__ is
 * (vexp: on any x86-64, for functions with an avx512f target attribute);
 * every user keeps a scalar fallback.
 *
 * vexp: Cephes-style range reduction (n = round(x log2 e), r = x - n ln 2
 * in two steps) and a degree-6 polynomial, scaled with vscalefps, which
 * also gives 0 for very negative x and inf for large x. Max relative error
 * ~2 ulp over the float range.
 */
#ifndef KILN_SIMD_H
#define KILN_SIMD_H

#if defined(__x86_64__)
#include <immintrin.h>

/* vexp also serves code that gets AVX-512 from a target attribute rather
 * than from -march (attn_amx.c), so it carries the attribute itself. */
__attribute__((target("avx512f"), always_inline)) static inline __m512 vexp(__m512 x)
{
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(89.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2hi, x);
    r = _mm512_fnmadd_ps(n, ln2lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

#ifdef __AVX512F__

/* 1/x for finite x >= 1 (callers clamp): rcp14 plus one Newton step
 * (~1 ulp), much cheaper than a division. */
static inline __m512 vrcp(__m512 x)
{
    __m512 r = _mm512_rcp14_ps(x);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
}

/* tanh(u) = 1 - 2 / (exp(2u) + 1); |u| clamped to 9, where tanh is 1 to
 * within float precision. */
static inline __m512 vtanh(__m512 u)
{
    u = _mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(-9.0f)), _mm512_set1_ps(9.0f));
    __m512 e = vexp(_mm512_add_ps(u, u));
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_fnmadd_ps(_mm512_set1_ps(2.0f), vrcp(_mm512_add_ps(e, one)), one);
}

/* 1 / (1 + exp(-x)), x clamped to [-80, 80] (sigmoid(-80) ~ 2e-35). */
static inline __m512 vsigmoid(__m512 x)
{
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-80.0f)), _mm512_set1_ps(80.0f));
    __m512 one = _mm512_set1_ps(1.0f);
    return vrcp(_mm512_add_ps(one, vexp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* Mask of the first n (< 16) lanes. */
static inline __mmask16 vtail(int n) { return (__mmask16)((1u << n) - 1u); }
#endif

#endif /* KILN_SIMD_H */
