/*
 * weight.c — typed weights prepared for the inference ops (kernels.h
 * kern_wt): a weight is converted once, when the engine is built, to what
 * the backend's linear reads. fp32 keeps the model's layout (a prefill is
 * then the training forward's GEMM); bf16 is stored as rows (out, in), the
 * layout that decode streams.
 */
#include "base/base.h"
#include "kernels/kernels.h"

#include <stdlib.h>
#include <string.h>

bool kern_weight_prepare(kiln_dtype dt, const kern_wt *src, kern_wt *out)
{
    KILN_ASSERT(src->dtype == KILN_DTYPE_F32);
    const int R = src->rows, K = src->cols;
    const size_t n = (size_t)R * K;
    const float *w = src->data;
    *out = (kern_wt){dt, dt == KILN_DTYPE_F32 ? src->lay : KERN_W_OUT_IN, R, K, NULL};
    if (dt == KILN_DTYPE_F32) {
        float *d = kiln_aligned_alloc(NULL, n * sizeof(float) + 64);
        if (!d) return false;
        memcpy(d, w, n * sizeof(float));
        out->data = d;
        return true;
    }
    KILN_ASSERT(dt == KILN_DTYPE_BF16);
    uint16_t *d = kiln_aligned_alloc(NULL, n * sizeof(uint16_t) + 64);
    if (!d) return false;
    bool io = src->lay == KERN_W_IN_OUT;
    for (int r = 0; r < R; r++)
        for (int k = 0; k < K; k++)
            d[(size_t)r * K + k] = f32_to_bf16(io ? w[(size_t)k * R + r] : w[(size_t)r * K + k]);
    out->data = d;
    return true;
}

void kern_weight_free(kern_wt *w)
{
    free((void *)w->data);
    w->data = NULL;
}
