/*
 * infer.h — private interface of the inference layer: the weight source an
 * engine is built from (so the engine does not depend on how the model
 * stores its parameters), and the kernels the engine runs.
 *
 * Matrices are packed as (rows = outputs, cols = inputs), row-major, in
 * fp32 or bf16: y = W x streams each row once and dots it with x.
 */
#ifndef KILN_INFER_H
#define KILN_INFER_H

#include "base/base.h"
#include "tensor/tensor.h"

/* Returns the fp32 data of the tensor with this Hugging Face name and its
 * shape, or NULL when the model has no such tensor (optional biases). */
typedef const float *(*infer_src_fn)(void *ud, const char *name, int *ndim,
                                     int64_t shape[4]);

/* Builds an engine for cfg from a weight source (kiln_engine_new is this
 * with the model's named tensors). Shapes are checked against cfg. */
kiln_status infer_engine_new_src(kiln_ctx *ctx, const kiln_config *cfg,
                                 infer_src_fn src, void *ud,
                                 const kiln_engine_opts *opts,
                                 kiln_engine **out);

/* ---- kernels (kernels.c) ------------------------------------------------ */

typedef struct imat {
    int rows, cols;  /* (rows = out, cols = in) */
    float *f32;      /* (rows, cols) when fp32 */
    uint16_t *bf16;  /* (rows, cols) when bf16 */
} imat;

/* With AVX512-BF16, bf16 weights are dotted with activations rounded to
 * bf16 (products exact in fp32, sums in fp32), as bf16 hardware does;
 * without it the weights are widened and the activations stay fp32. The
 * reference follows the same rule, so the two agree to fp32 rounding. */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define IK_BF16_DOT 1
#else
#define IK_BF16_DOT 0
#endif

/* Y (T, rows) = X (T, cols) W^T + b (b may be NULL); when acc, adds into Y
 * instead of overwriting. Streams W once for all T rows (T <= 8 in the
 * register tile; larger T is tiled over blocks of W that stay in cache).
 * Parallel over output rows on nth OpenMP threads (0 = all). */
void ik_linear(float *Y, const float *X, int T, const imat *W,
               const float *b, bool acc, int nth);
/* Portable reference of the same (scalar, no threads). */
void ik_linear_ref(float *Y, const float *X, int T, const imat *W,
                   const float *b, bool acc);

/* Streaming read of n bytes (the bandwidth roofline): returns a checksum
 * so the read cannot be optimised away. Parallel (OpenMP). */
double ik_stream_read(const void *p, size_t n, int nth);

/* Copies n bytes into a malloc'ed NUL-terminated string of valid UTF-8,
 * each invalid byte replaced by U+FFFD; *out_len gets its length. */
char *infer_utf8_sanitize(const char *p, size_t n, size_t *out_len);

#endif /* KILN_INFER_H */
