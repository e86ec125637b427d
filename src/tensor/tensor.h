/*
 * tensor.h — element types (tensor layer, private): the one dtype enum
 * (kiln_dtype, public in kiln.h, numbered like GGUF's tensor types), its
 * traits table, and the conversions between types.
 *
 * A dtype stores its elements in blocks: `block` elements in `block_bytes`
 * bytes (block 1 for the plain types F32, BF16, I32, ...; 32 or 256 for
 * the block-quantized Q* types). A row of n elements of type t takes
 * n / block * block_bytes bytes, n a multiple of block. to_float widens
 * such a row to fp32; from_float is the reference quantizer (the portable
 * C that defines the bytes; a backend may have faster ones that must agree
 * with it). The Q layouts are ggml's, byte for byte (quant.c), so GGUF
 * files written by kiln and by llama.cpp read the same in both.
 *
 * fp32 is the master type; bf16 and fp16 are storage/compute types for
 * mixed precision and file formats. Their conversions round to nearest
 * even, keep NaN a NaN (quiet, sign and top payload bits kept), and map
 * overflow to infinity as IEEE does. f32_to_bf16 is THE bf16 rounding of
 * the library: the kernels and the inference engine call it (inline), and
 * their vector forms must give its bits.
 */
#ifndef KILN_TENSOR_H
#define KILN_TENSOR_H

#include "kiln.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Widens a row of n elements (n a multiple of the block) to fp32. */
typedef void (*dtype_to_float_fn)(const void *src, float *dst, int64_t n);
/* Stores a row of n fp32 values (n a multiple of the block) as the type. */
typedef void (*dtype_from_float_fn)(const float *src, void *dst, int64_t n);

typedef struct dtype_traits {
    kiln_dtype type;
    const char *name;    /* GGUF (ggml) name: "f32", "bf16", "q4_K" */
    const char *st_name; /* safetensors spelling ("F32", "BOOL"); NULL if none */
    int64_t block;       /* elements per block (1 for plain types) */
    size_t block_bytes;  /* bytes per block */
    bool quantized;      /* a block-quantized (Q*) type */
    dtype_to_float_fn to_float;     /* NULL: no conversion (yet) */
    dtype_from_float_fn from_float; /* NULL: no conversion (yet) */
} dtype_traits;

/* The traits of t; NULL when t is not a kiln_dtype. Static storage. */
const dtype_traits *dtype_traits_of(kiln_dtype t);
/* Every dtype, in enum order, for iteration: dtype_list[0 .. n-1] with n
 * from dtype_count(). */
extern const kiln_dtype dtype_list[];
int dtype_count(void);
/* Bytes of a row of n elements of t; (size_t)-1 when t is not a dtype, n
 * is negative or not a multiple of the block, or the size overflows. */
size_t dtype_row_bytes(kiln_dtype t, int64_t n);
/* The dtype whose safetensors spelling is s ("F32", "BF16", ...); -1 when
 * none is (GGUF-only types have no safetensors spelling). */
int dtype_from_st_name(const char *s);

/* ---- scalar conversions ------------------------------------------------ */

/* fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN with its
 * sign; overflow rounds to infinity. */
static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

/* Bulk conversions (n elements; vectorised where the CPU allows). */
void f32_to_bf16_n(uint16_t *dst, const float *src, size_t n);
void bf16_to_f32_n(float *dst, const uint16_t *src, size_t n);
void f32_to_f16_n(uint16_t *dst, const float *src, size_t n);
void f16_to_f32_n(float *dst, const uint16_t *src, size_t n);

/* ---- block-quantized types (quant.c; ggml's layouts) ------------------ */

/* Q8_0: 32 elements: fp16 d, int8 q[32]; x = q * d. */
void q8_0_to_float(const void *src, float *dst, int64_t n);
void q8_0_from_float(const float *src, void *dst, int64_t n);
/* Q4_0: 32 elements: fp16 d, 16 bytes; byte j holds element j in its low
 * nibble and element j + 16 in its high nibble; x = (q - 8) * d. */
void q4_0_to_float(const void *src, float *dst, int64_t n);
void q4_0_from_float(const float *src, void *dst, int64_t n);
/* Q4_K: 256 elements in 8 sub-blocks of 32: fp16 d, fp16 dmin, 12 bytes of
 * 6-bit (scale, min) pairs, 128 bytes of nibbles; x = d*sc*q - dmin*m. */
void q4_k_to_float(const void *src, float *dst, int64_t n);
void q4_k_from_float(const float *src, void *dst, int64_t n);
/* Q6_K: 256 elements in 16 sub-blocks of 16: 128 bytes of low nibbles, 64
 * bytes of high 2-bit pairs, int8 scales[16], fp16 d; x = d*sc*(q - 32). */
void q6_k_to_float(const void *src, float *dst, int64_t n);
void q6_k_from_float(const float *src, void *dst, int64_t n);

#endif /* KILN_TENSOR_H */
