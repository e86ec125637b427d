/*
 * weight.c — typed weights prepared for the inference ops (kernels.h
 * kern_wt): a weight is converted once, when the engine is built, to what
 * the backend's linear reads. fp32 keeps the model's layout (a prefill is
 * then the training forward's GEMM); bf16 is stored as rows (out, in), the
 * layout that decode streams.
 */
#include "base/base.h"
#include "kernels/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

kiln_dtype kern_weight_dtype(kiln_dtype dt, int cols)
{
    const dtype_traits *tr = dtype_traits_of(dt);
    if (!tr || !tr->quantized || cols % tr->block == 0) return dt;
    return cols % 32 == 0 ? KILN_DTYPE_Q8_0 : KILN_DTYPE_BF16;
}

bool kern_weight_prepare(kiln_dtype dt, const kern_wt *src, kern_wt *out)
{
    KILN_ASSERT(src->dtype == KILN_DTYPE_F32);
    const int R = src->rows, K = src->cols;
    const size_t n = (size_t)R * K;
    const float *w = src->data;
    dt = kern_weight_dtype(dt, K);
    *out = (kern_wt){dt, dt == KILN_DTYPE_F32 ? src->lay : KERN_W_OUT_IN, R, K, NULL};
    const dtype_traits *tr = dtype_traits_of(dt);
    if (tr->quantized) { /* rows (out, in), quantized by the reference */
        size_t rb = dtype_row_bytes(dt, K);
        uint8_t *d = kiln_aligned_alloc(NULL, rb * (size_t)R + 64);
        float *row = malloc((size_t)K * sizeof(float));
        if (!d || !row) {
            free(d), free(row);
            return false;
        }
        for (int r = 0; r < R; r++) {
            for (int k = 0; k < K; k++)
                row[k] = src->lay == KERN_W_IN_OUT ? w[(size_t)k * R + r] : w[(size_t)r * K + k];
            tr->from_float(row, d + rb * (size_t)r, K);
        }
        free(row);
        out->data = d;
        return true;
    }
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

/* ---- activations quantized for the Q types' dot products ---------------- */

void kern_quant_act(const float *x, int K, int8_t *q, float *d, int32_t *s16)
{
    for (int b = 0; b < K / 32; b++) {
        const float *xb = x + (size_t)b * 32;
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float db = amax / 127, id = db != 0 ? 127 / amax : 0.0f;
        int32_t s0 = 0, s1 = 0;
        for (int i = 0; i < 32; i++) {
            int v = (int)lrintf(xb[i] * id);
            q[b * 32 + i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
            if (i < 16) s0 += q[b * 32 + i];
            else s1 += q[b * 32 + i];
        }
        d[b] = db;
        s16[2 * b] = s0;
        s16[2 * b + 1] = s1;
    }
}

/* ---- the Q types' block dot products, scalar (the reference) ------------ */

static float ld16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

/* Q4_K sub-block j's 6-bit scale and min (ggml's get_scale_min_k4). */
static void k4_scale_min(int j, const uint8_t *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

double kern_qdot_ref(kiln_dtype t, const void *row, int K, const int8_t *q, const float *d,
                     const int32_t *s16)
{
    const uint8_t *w = row;
    double sum = 0;
    switch (t) {
    case KILN_DTYPE_Q8_0:
        for (int b = 0; b < K / 32; b++, w += 34) {
            /* int8 codes read through an int8_t pointer: GCC 12 at
             * -march=native compiles sum((int8_t)u8[i] * s8[i]) into
             * vpdpbusd, which takes the first operand as unsigned (wrong
             * for negative codes); two int8_t operands it gets right */
            const int8_t *wq = (const int8_t *)(w + 2);
            int32_t is = 0;
            for (int i = 0; i < 32; i++) is += wq[i] * q[b * 32 + i];
            sum += (double)ld16(w) * d[b] * is;
        }
        break;
    case KILN_DTYPE_Q4_0:
        for (int b = 0; b < K / 32; b++, w += 18) {
            int32_t is = 0;
            for (int i = 0; i < 16; i++)
                is += (w[2 + i] & 15) * q[b * 32 + i] + (w[2 + i] >> 4) * q[b * 32 + 16 + i];
            is -= 8 * (s16[2 * b] + s16[2 * b + 1]);
            sum += (double)ld16(w) * d[b] * is;
        }
        break;
    case KILN_DTYPE_Q4_K:
        for (int sb = 0; sb < K / 256; sb++, w += 144) {
            double dw = ld16(w), dmin = ld16(w + 2);
            for (int j = 0; j < 8; j++) { /* sub-block j = x block 8 sb + j */
                int sc, m, b = 8 * sb + j;
                k4_scale_min(j, w + 4, &sc, &m);
                const uint8_t *qs = w + 16 + 32 * (j / 2);
                int32_t is = 0;
                for (int l = 0; l < 32; l++)
                    is += (j % 2 ? qs[l] >> 4 : qs[l] & 15) * q[b * 32 + l];
                sum += d[b] * (dw * sc * is - dmin * m * (s16[2 * b] + s16[2 * b + 1]));
            }
        }
        break;
    case KILN_DTYPE_Q6_K:
        for (int sb = 0; sb < K / 256; sb++, w += 210) {
            double dw = ld16(w + 208);
            const int8_t *sc = (const int8_t *)(w + 192);
            for (int e = 0; e < 256; e += 16) { /* a 16-element sub-block */
                int h = e / 128, l0 = e % 32, k = (e % 128) / 32, b = 8 * sb + e / 32;
                const uint8_t *ql = w + 64 * h + (k % 2) * 32, *qh = w + 128 + 32 * h;
                int32_t is = 0;
                for (int l = l0; l < l0 + 16; l++) {
                    int lo = k < 2 ? ql[l] & 15 : ql[l] >> 4;
                    int v = lo | (((qh[l] >> (2 * k)) & 3) << 4);
                    is += v * q[(size_t)sb * 256 + e + (l - l0)];
                }
                is -= 32 * s16[2 * b + (e % 32) / 16];
                sum += dw * sc[e / 16] * d[b] * is;
            }
        }
        break;
    default:
        KILN_ASSERT(!"kern_qdot_ref: not a Q type");
    }
    return sum;
}
