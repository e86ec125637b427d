/*
 * f16_convert.c — IEEE binary16 <-> fp32: a portable scalar pair (round to
 * nearest even, subnormals, inf/NaN) and array versions on F16C / AVX-512
 * (VCVTPS2PH with round-to-nearest), bit-identical to the scalar ones.
 */
#include "kernels/x86/bf16.h"

#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define MP_X86 1
#endif

uint16_t mp_f32_to_f16_1(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to inf */
    if (a >= 0x38800000u) {                                  /* normal half */
        uint32_t r = a - 0x38000000u; /* rebias exponent 127 -> 15 */
        r += 0xfffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    if (a < 0x33000000u) return (uint16_t)sign; /* below half the smallest subnormal */
    /* subnormal half: value = m * 2^-24 */
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    int shift = (int)(126 - e); /* 14..24 */
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

float mp_f16_to_f32_1(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) u = sign;
    else {
        int k = 0;
        while (!(m & 0x400u)) { m <<= 1; k++; }
        u = sign | ((uint32_t)(113 - k) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#if MP_X86
__attribute__((target("avx2,f16c")))
static void f32_to_f16_f16c(const float *x, uint16_t *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = mp_f32_to_f16_1(x[i]);
}

__attribute__((target("avx2,f16c")))
static void f16_to_f32_f16c(const uint16_t *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) y[i] = mp_f16_to_f32_1(x[i]);
}

__attribute__((target("avx2,f16c")))
static void round_f16_f16c(const float *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm256_cvtps_ph(
                                    _mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
    for (; i < n; i++) y[i] = mp_f16_to_f32_1(mp_f32_to_f16_1(x[i]));
}
#endif

void mp_f32_to_f16(const float *x, uint16_t *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->f16c) { f32_to_f16_f16c(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = mp_f32_to_f16_1(x[i]);
}

void mp_f16_to_f32(const uint16_t *x, float *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->f16c) { f16_to_f32_f16c(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = mp_f16_to_f32_1(x[i]);
}

void mp_round_f16(const float *x, float *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->f16c) { round_f16_f16c(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = mp_f16_to_f32_1(mp_f32_to_f16_1(x[i]));
}
