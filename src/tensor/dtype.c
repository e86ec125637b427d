/*
 * dtype.c — element sizes, safetensors dtype names and fp32 <-> bf16/fp16
 * conversions (round to nearest even; NaN stays NaN; overflow -> inf;
 * fp16 subnormals handled exactly). The bulk loops use F16C / AVX-512 BF16
 * instructions when the compiler targets them, else the scalar code.
 */
#include "tensor/tensor.h"

#include <string.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

static const struct {
    const char *name;
    size_t size;
} dtypes[KILN_DTYPE_COUNT] = {
    [KILN_DTYPE_F32] = {"F32", 4},   [KILN_DTYPE_BF16] = {"BF16", 2},
    [KILN_DTYPE_F16] = {"F16", 2},   [KILN_DTYPE_F64] = {"F64", 8},
    [KILN_DTYPE_I32] = {"I32", 4},   [KILN_DTYPE_I64] = {"I64", 8},
    [KILN_DTYPE_U8] = {"U8", 1},     [KILN_DTYPE_I8] = {"I8", 1},
    [KILN_DTYPE_U16] = {"U16", 2},   [KILN_DTYPE_I16] = {"I16", 2},
    [KILN_DTYPE_U32] = {"U32", 4},   [KILN_DTYPE_U64] = {"U64", 8},
    [KILN_DTYPE_BOOL] = {"BOOL", 1},
};

size_t dtype_size(kiln_dtype t)
{
    return (unsigned)t < KILN_DTYPE_COUNT ? dtypes[t].size : 0;
}

const char *dtype_name(kiln_dtype t)
{
    return (unsigned)t < KILN_DTYPE_COUNT ? dtypes[t].name : "?";
}

int dtype_from_name(const char *s)
{
    for (int i = 0; i < KILN_DTYPE_COUNT; i++)
        if (!strcmp(s, dtypes[i].name)) return i;
    return -1;
}

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f)
{
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

uint16_t f32_to_f16(float f)
{
    uint32_t u = f2u(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ff));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* overflow */
    if (a < 0x38800000u) {                                   /* subnormal */
        /* value * 2^24 rounded to nearest even gives the f16 mantissa. */
        float v = u2f(a) * 16777216.0f; /* exact: a < 2^-14 */
        /* round half to even via the FPU: add and subtract 2^23 */
        float r = (v + 8388608.0f) - 8388608.0f;
        return (uint16_t)(sign | (uint32_t)r);
    }
    uint32_t mant_odd = (a >> 13) & 1;
    a += 0x0fffu + mant_odd;
    a -= 0x38000000u; /* rebias 127 -> 15 */
    return (uint16_t)(sign | (a >> 13));
}

float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
    return u2f(sign | ((e + 112) << 23) | (m << 13));
}

void f32_to_bf16_n(uint16_t *dst, const float *src, size_t n)
{
    for (size_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

void bf16_to_f32_n(float *dst, const uint16_t *src, size_t n)
{
    size_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
        __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(w));
    }
#endif
    for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

void f32_to_f16_n(uint16_t *dst, const float *src, size_t n)
{
    size_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
#endif
    for (; i < n; i++) dst[i] = f32_to_f16(src[i]);
}

void f16_to_f32_n(float *dst, const uint16_t *src, size_t n)
{
    size_t i = 0;
#ifdef __F16C__
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = f16_to_f32(src[i]);
}
