/*
 * f16_convert.c — IEEE binary16 <-> fp32 arrays on F16C / AVX-512
 * (VCVTPS2PH with round-to-nearest), bit-identical to the tensor layer's
 * scalar pair (f32_to_f16, f16_to_f32), which the tails and the portable
 * loops use.
 */
#include "kernels/x86/bf16.h"

#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define MP_X86 1
#endif

#if MP_X86
__attribute__((target("avx2,f16c")))
static void f32_to_f16_f16c(const float *x, uint16_t *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) y[i] = f32_to_f16(x[i]);
}

__attribute__((target("avx2,f16c")))
static void f16_to_f32_f16c(const uint16_t *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) y[i] = f16_to_f32(x[i]);
}

__attribute__((target("avx2,f16c")))
static void round_f16_f16c(const float *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm256_cvtps_ph(
                                    _mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
    for (; i < n; i++) y[i] = f16_to_f32(f32_to_f16(x[i]));
}
#endif

void mp_f32_to_f16(const float *x, uint16_t *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->f16c) { f32_to_f16_f16c(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = f32_to_f16(x[i]);
}

void mp_f16_to_f32(const uint16_t *x, float *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->f16c) { f16_to_f32_f16c(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = f16_to_f32(x[i]);
}

void mp_round_f16(const float *x, float *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->f16c) { round_f16_f16c(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = f16_to_f32(f32_to_f16(x[i]));
}
