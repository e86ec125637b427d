/*
 * tensor.h — element types and conversions between them (tensor layer,
 * private). fp32 is the master type; bf16 and fp16 are storage/compute
 * types for mixed precision and file formats. Conversions round to nearest
 * even, keep NaN a NaN (quiet), and map overflow to infinity as IEEE does.
 */
#ifndef KILN_TENSOR_H
#define KILN_TENSOR_H

#include <stddef.h>
#include <stdint.h>

typedef enum kiln_dtype {
    KILN_DTYPE_F32 = 0,
    KILN_DTYPE_BF16 = 1,
    KILN_DTYPE_F16 = 2,
    KILN_DTYPE_F64 = 3,
    KILN_DTYPE_I32 = 4,
    KILN_DTYPE_I64 = 5,
    KILN_DTYPE_U8 = 6,
    KILN_DTYPE_I8 = 7,
    KILN_DTYPE_U16 = 8,
    KILN_DTYPE_I16 = 9,
    KILN_DTYPE_U32 = 10,
    KILN_DTYPE_U64 = 11,
    KILN_DTYPE_BOOL = 12,
    KILN_DTYPE_COUNT
} kiln_dtype;

/* Bytes per element. */
size_t dtype_size(kiln_dtype t);
/* safetensors spelling ("F32", "BF16", "F16", ...). */
const char *dtype_name(kiln_dtype t);
/* Parses the safetensors spelling; returns -1 when unknown. */
int dtype_from_name(const char *s);

/* Scalar conversions. */
uint16_t f32_to_bf16(float f);
float bf16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

/* Bulk conversions (n elements; vectorised where the CPU allows). */
void f32_to_bf16_n(uint16_t *dst, const float *src, size_t n);
void bf16_to_f32_n(float *dst, const uint16_t *src, size_t n);
void f32_to_f16_n(uint16_t *dst, const float *src, size_t n);
void f16_to_f32_n(float *dst, const uint16_t *src, size_t n);

#endif /* KILN_TENSOR_H */
