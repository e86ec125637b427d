/*
 * dtype.c — the traits table of the one dtype enum (sizes, GGUF and
 * safetensors names, conversions to and from fp32) and the fp32 <->
 * bf16/fp16 conversions (round to nearest even; NaN stays NaN; overflow ->
 * inf; fp16 subnormals handled exactly). The bulk loops use F16C / AVX-512
 * instructions when the compiler targets them, else the scalar code. The
 * block-quantized types' conversions are in quant.c.
 */
#include "tensor/tensor.h"

#include <string.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* ---- plain types' row conversions ------------------------------------- */

static void f32_to_float(const void *src, float *dst, int64_t n)
{
    memcpy(dst, src, (size_t)n * 4);
}
static void f32_from_float(const float *src, void *dst, int64_t n)
{
    memcpy(dst, src, (size_t)n * 4);
}
static void f16_row_to_float(const void *src, float *dst, int64_t n)
{
    f16_to_f32_n(dst, src, (size_t)n);
}
static void f16_row_from_float(const float *src, void *dst, int64_t n)
{
    f32_to_f16_n(dst, src, (size_t)n);
}
static void bf16_row_to_float(const void *src, float *dst, int64_t n)
{
    bf16_to_f32_n(dst, src, (size_t)n);
}
static void bf16_row_from_float(const float *src, void *dst, int64_t n)
{
    f32_to_bf16_n(dst, src, (size_t)n);
}
static void f64_from_float(const float *src, void *dst, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        double v = src[i];
        memcpy((char *)dst + 8 * i, &v, 8);
    }
}

/* Integer and f64 rows widen element by element (memcpy: the file's bytes
 * need not be aligned). */
#define WIDEN(fn, T)                                                    \
    static void fn(const void *src, float *dst, int64_t n)              \
    {                                                                   \
        for (int64_t i = 0; i < n; i++) {                               \
            T v;                                                        \
            memcpy(&v, (const char *)src + (size_t)i * sizeof(T), sizeof(T)); \
            dst[i] = (float)v;                                          \
        }                                                               \
    }
WIDEN(f64_to_float, double)
WIDEN(i8_to_float, int8_t)
WIDEN(i16_to_float, int16_t)
WIDEN(i32_to_float, int32_t)
WIDEN(i64_to_float, int64_t)
WIDEN(u8_to_float, uint8_t)
WIDEN(u16_to_float, uint16_t)
WIDEN(u32_to_float, uint32_t)
WIDEN(u64_to_float, uint64_t)
#undef WIDEN

static void bool_to_float(const void *src, float *dst, int64_t n)
{
    for (int64_t i = 0; i < n; i++) dst[i] = ((const uint8_t *)src)[i] ? 1.0f : 0.0f;
}

/* ---- the table -------------------------------------------------------- */

/* Block sizes and bytes per block of the Q types are ggml's (ggml-common.h:
 * QK4_0 = QK8_0 = 32, QK_K = 256). Types with NULL conversions have their
 * sizes here so a file reader can skip or copy them. */
#define PLAIN(T, nm, st, bytes, tf, ff) \
    {KILN_DTYPE_##T, nm, st, 1, bytes, false, tf, ff}
#define QUANT(T, nm, blk, bytes, tf, ff) \
    {KILN_DTYPE_##T, nm, NULL, blk, bytes, true, tf, ff}
static const dtype_traits traits[] = {
    PLAIN(F32, "f32", "F32", 4, f32_to_float, f32_from_float),
    PLAIN(F16, "f16", "F16", 2, f16_row_to_float, f16_row_from_float),
    QUANT(Q4_0, "q4_0", 32, 18, q4_0_to_float, q4_0_from_float),
    QUANT(Q4_1, "q4_1", 32, 20, NULL, NULL),
    QUANT(Q5_0, "q5_0", 32, 22, NULL, NULL),
    QUANT(Q5_1, "q5_1", 32, 24, NULL, NULL),
    QUANT(Q8_0, "q8_0", 32, 34, q8_0_to_float, q8_0_from_float),
    QUANT(Q8_1, "q8_1", 32, 36, NULL, NULL),
    QUANT(Q2_K, "q2_K", 256, 84, NULL, NULL),
    QUANT(Q3_K, "q3_K", 256, 110, NULL, NULL),
    QUANT(Q4_K, "q4_K", 256, 144, q4_k_to_float, q4_k_from_float),
    QUANT(Q5_K, "q5_K", 256, 176, NULL, NULL),
    QUANT(Q6_K, "q6_K", 256, 210, q6_k_to_float, q6_k_from_float),
    QUANT(Q8_K, "q8_K", 256, 292, NULL, NULL),
    PLAIN(I8, "i8", "I8", 1, i8_to_float, NULL),
    PLAIN(I16, "i16", "I16", 2, i16_to_float, NULL),
    PLAIN(I32, "i32", "I32", 4, i32_to_float, NULL),
    PLAIN(I64, "i64", "I64", 8, i64_to_float, NULL),
    PLAIN(F64, "f64", "F64", 8, f64_to_float, f64_from_float),
    PLAIN(BF16, "bf16", "BF16", 2, bf16_row_to_float, bf16_row_from_float),
    PLAIN(U8, "u8", "U8", 1, u8_to_float, NULL),
    PLAIN(BOOL, "bool", "BOOL", 1, bool_to_float, NULL),
    PLAIN(U16, "u16", "U16", 2, u16_to_float, NULL),
    PLAIN(U32, "u32", "U32", 4, u32_to_float, NULL),
    PLAIN(U64, "u64", "U64", 8, u64_to_float, NULL),
};
#undef PLAIN
#undef QUANT
enum { N_TYPES = sizeof traits / sizeof traits[0] };

const kiln_dtype dtype_list[] = {
    KILN_DTYPE_F32,  KILN_DTYPE_F16,  KILN_DTYPE_Q4_0, KILN_DTYPE_Q4_1, KILN_DTYPE_Q5_0,
    KILN_DTYPE_Q5_1, KILN_DTYPE_Q8_0, KILN_DTYPE_Q8_1, KILN_DTYPE_Q2_K, KILN_DTYPE_Q3_K,
    KILN_DTYPE_Q4_K, KILN_DTYPE_Q5_K, KILN_DTYPE_Q6_K, KILN_DTYPE_Q8_K, KILN_DTYPE_I8,
    KILN_DTYPE_I16,  KILN_DTYPE_I32,  KILN_DTYPE_I64,  KILN_DTYPE_F64,  KILN_DTYPE_BF16,
    KILN_DTYPE_U8,   KILN_DTYPE_BOOL, KILN_DTYPE_U16,  KILN_DTYPE_U32,  KILN_DTYPE_U64,
};
_Static_assert(sizeof dtype_list / sizeof dtype_list[0] == N_TYPES,
               "dtype_list and traits list the same types");

int dtype_count(void) { return N_TYPES; }

const dtype_traits *dtype_traits_of(kiln_dtype t)
{
    /* 25 entries: a scan is as fast as an index table and cannot get out
     * of step with the enum (test_dtype checks every entry's type). */
    for (int i = 0; i < N_TYPES; i++)
        if (traits[i].type == t) return &traits[i];
    return NULL;
}

bool kiln_dtype_valid(int t) { return dtype_traits_of((kiln_dtype)t) != NULL; }

const char *kiln_dtype_name(kiln_dtype t)
{
    const dtype_traits *tr = dtype_traits_of(t);
    return tr ? tr->name : "?";
}

size_t dtype_row_bytes(kiln_dtype t, int64_t n)
{
    const dtype_traits *tr = dtype_traits_of(t);
    if (!tr || n < 0 || n % tr->block) return (size_t)-1;
    uint64_t blocks = (uint64_t)(n / tr->block);
    if (blocks > (uint64_t)(SIZE_MAX / 2) / tr->block_bytes) return (size_t)-1;
    return (size_t)blocks * tr->block_bytes;
}

int dtype_from_st_name(const char *s)
{
    for (int i = 0; i < N_TYPES; i++)
        if (traits[i].st_name && !strcmp(s, traits[i].st_name)) return (int)traits[i].type;
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
