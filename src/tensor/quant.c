/*
 * quant.c — the block-quantized dtypes Q8_0, Q4_0, Q4_K and Q6_K: their
 * dequantization (to_float) and reference quantizers (from_float), in the
 * byte layouts of GGUF / ggml (ggml-common.h's block_q8_0, block_q4_0,
 * block_q4_K, block_q6_K; little-endian, no padding), so that a tensor
 * written here and read by llama.cpp, or the other way round, has the same
 * values bit for bit. The quantizers follow ggml's reference algorithm
 * (quantize_row_*_ref: the scale search of make_qkx2_quants for Q4_K and
 * make_qx_quants for Q6_K); they are written here from that description.
 * Dequantization is exact arithmetic on the stored values and agrees with
 * llama.cpp's to the bit; the quantizers' searches compare float sums, so
 * a compiler that contracts them into FMAs differently may, rarely, pick
 * another scale: still a valid block, just not byte-identical.
 *
 * Layouts (offsets in bytes within one block):
 *   Q8_0 (32 elements, 34 bytes): d fp16 @0, q int8[32] @2; x[i] = q[i] d.
 *   Q4_0 (32 elements, 18 bytes): d fp16 @0, qs[16] @2; x[j] = (lo(qs[j])
 *     - 8) d and x[j + 16] = (hi(qs[j]) - 8) d, j < 16.
 *   Q4_K (256 elements, 144 bytes): d fp16 @0, dmin fp16 @2, scales[12] @4,
 *     qs[128] @16. Eight sub-blocks of 32, each with a 6-bit scale sc and
 *     a 6-bit min m (scale_min_k4 below). Elements 64 c + l (l < 32) are
 *     the low nibbles of qs[32 c + l] (sub-block 2c), elements 64 c + 32 +
 *     l the high nibbles (sub-block 2c + 1); x = d sc q - dmin m.
 *   Q6_K (256 elements, 210 bytes): ql[128] @0, qh[64] @128, scales int8[16]
 *     @192, d fp16 @208. Per half h (128 elements) and l < 32: the 6-bit
 *     values of elements 128 h + l + 32 k (k = 0..3) take their low 4 bits
 *     from ql[64 h + l] (k 0: low nibble, k 2: high) or ql[64 h + 32 + l]
 *     (k 1: low, k 3: high), and their high 2 bits from bits 2k..2k+1 of
 *     qh[32 h + l]; element e has scale scales[e / 16]; x = d sc (q - 32).
 */
#include "tensor/tensor.h"

#include <math.h>
#include <string.h>

enum { QK = 32, QKK = 256 };
enum { Q8_0_BYTES = 34, Q4_0_BYTES = 18, Q4_K_BYTES = 144, Q6_K_BYTES = 210 };

/* ggml's GROUP_MAX_EPS: a group whose largest |x| is below it is zero. */
#define GROUP_EPS 1e-15f

static float ld_f16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

static void st_f16(uint8_t *p, float v)
{
    uint16_t h = f32_to_f16(v);
    memcpy(p, &h, 2);
}

/* Round to nearest, ties to even (the default rounding mode), as ggml's
 * nearest_int does for the magnitudes that occur here (|v| < 2^22). */
static int nearest(float v) { return (int)lrintf(v); }

static int imin(int a, int b) { return a < b ? a : b; }
static int imax(int a, int b) { return a > b ? a : b; }

/* ---- Q8_0 ------------------------------------------------------------- */

void q8_0_to_float(const void *src, float *dst, int64_t n)
{
    const uint8_t *b = src;
    for (int64_t i = 0; i < n / QK; i++, b += Q8_0_BYTES) {
        float d = ld_f16(b);
        for (int j = 0; j < QK; j++) dst[i * QK + j] = (float)(int8_t)b[2 + j] * d;
    }
}

void q8_0_from_float(const float *src, void *dst, int64_t n)
{
    uint8_t *b = dst;
    for (int64_t i = 0; i < n / QK; i++, b += Q8_0_BYTES) {
        const float *x = src + i * QK;
        float amax = 0;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127, id = d != 0 ? 1.0f / d : 0.0f;
        st_f16(b, d);
        for (int j = 0; j < QK; j++) b[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

/* ---- Q4_0 ------------------------------------------------------------- */

void q4_0_to_float(const void *src, float *dst, int64_t n)
{
    const uint8_t *b = src;
    for (int64_t i = 0; i < n / QK; i++, b += Q4_0_BYTES) {
        float d = ld_f16(b);
        float *y = dst + i * QK;
        for (int j = 0; j < QK / 2; j++) {
            y[j] = (float)((b[2 + j] & 0x0f) - 8) * d;
            y[j + QK / 2] = (float)((b[2 + j] >> 4) - 8) * d;
        }
    }
}

void q4_0_from_float(const float *src, void *dst, int64_t n)
{
    uint8_t *b = dst;
    for (int64_t i = 0; i < n / QK; i++, b += Q4_0_BYTES) {
        const float *x = src + i * QK;
        /* d maps the value of largest magnitude to -8 (the end of the
         * range -8..7 with the most room), keeping its sign. */
        float amax = 0, max = 0;
        for (int j = 0; j < QK; j++)
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        float d = max / -8, id = d != 0 ? 1.0f / d : 0.0f;
        st_f16(b, d);
        for (int j = 0; j < QK / 2; j++) {
            int lo = imin(15, (int8_t)(x[j] * id + 8.5f));
            int hi = imin(15, (int8_t)(x[j + QK / 2] * id + 8.5f));
            b[2 + j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

/* ---- Q4_K ------------------------------------------------------------- */

/* Sub-block j's 6-bit scale and min from the 12 packed bytes: sub-blocks
 * 0..3 in the low 6 bits of bytes j (scale) and j + 4 (min); sub-blocks
 * 4..7 in the nibbles of byte j + 4 (scale low, min high) with their top 2
 * bits in the top bits of bytes j - 4 (scale) and j (min). */
static void scale_min_k4(int j, const uint8_t *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

void q4_k_to_float(const void *src, float *dst, int64_t n)
{
    const uint8_t *b = src;
    for (int64_t i = 0; i < n / QKK; i++, b += Q4_K_BYTES) {
        float d = ld_f16(b), dmin = ld_f16(b + 2);
        const uint8_t *sc = b + 4, *q = b + 16;
        float *y = dst + i * QKK;
        for (int c = 0; c < 4; c++, q += 32, y += 64) {
            int s0, m0, s1, m1;
            scale_min_k4(2 * c, sc, &s0, &m0);
            scale_min_k4(2 * c + 1, sc, &s1, &m1);
            float d0 = d * (float)s0, n0 = dmin * (float)m0;
            float d1 = d * (float)s1, n1 = dmin * (float)m1;
            for (int l = 0; l < 32; l++) y[l] = d0 * (float)(q[l] & 0x0f) - n0;
            for (int l = 0; l < 32; l++) y[32 + l] = d1 * (float)(q[l] >> 4) - n1;
        }
    }
}

/* The (scale, min) of one sub-block of n values for levels 0..nmax: the
 * least-squares fit, weighted by w, over the levels found with the inverse
 * scale (nmax + rmin + rdelta * is) / (max - min), is = 0..nstep, keeping
 * the best (ggml's make_qkx2_quants with use_mad false). L gets the levels;
 * *the_min the minimum negated (>= 0); returns the scale. */
static float fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L,
                           float *the_min, uint8_t *Laux, float rmin, float rdelta, int nstep)
{
    float min = x[0], max = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.0f;
    }
    float iscale = (float)nmax / (max - min), scale = 1 / iscale, best_error = 0;
    for (int i = 0; i < n; i++) {
        int l = imax(0, imin(nmax, nearest(iscale * (x[i] - min))));
        L[i] = (uint8_t)l;
        float diff = scale * (float)L[i] + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * (float)is + (float)nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(0, imin(nmax, nearest(iscale * (x[i] - min))));
            Laux[i] = (uint8_t)l;
            float wl = w[i] * (float)l;
            sum_l += wl;
            sum_l2 += wl * (float)l;
            sum_xl += wl * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float err = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * (float)Laux[i] + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if (err < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

void q4_k_from_float(const float *src, void *dst, int64_t n)
{
    uint8_t *b = dst;
    for (int64_t i = 0; i < n / QKK; i++, b += Q4_K_BYTES) {
        const float *x = src + i * QKK;
        uint8_t L[QKK], Laux[32];
        float w[32], mins[8], scales[8], max_scale = 0, max_min = 0;
        for (int j = 0; j < 8; j++) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
            float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(x[32 * j + l]);
            scales[j] = fit_scale_min(32, 15, x + 32 * j, w, L + 32 * j, &mins[j], Laux, -1.0f,
                                      0.1f, 20);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
        float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
        uint8_t *sc = b + 4;
        memset(sc, 0, 12);
        for (int j = 0; j < 8; j++) {
            int ls = imin(63, nearest(inv_scale * scales[j]));
            int lm = imin(63, nearest(inv_min * mins[j]));
            if (j < 4) {
                sc[j] = (uint8_t)ls;
                sc[j + 4] = (uint8_t)lm;
            } else {
                sc[j + 4] = (uint8_t)((ls & 0x0f) | ((lm & 0x0f) << 4));
                sc[j - 4] |= (uint8_t)((ls >> 4) << 6);
                sc[j] |= (uint8_t)((lm >> 4) << 6);
            }
        }
        st_f16(b, max_scale / 63.0f);
        st_f16(b + 2, max_min / 63.0f);
        float d = ld_f16(b), dmin = ld_f16(b + 2);
        /* The levels again, against the scales as stored. */
        for (int j = 0; j < 8; j++) {
            int s, m;
            scale_min_k4(j, sc, &s, &m);
            float dj = d * (float)s;
            if (dj == 0) continue;
            float mj = dmin * (float)m;
            for (int l = 0; l < 32; l++)
                L[32 * j + l] = (uint8_t)imax(0, imin(15, nearest((x[32 * j + l] + mj) / dj)));
        }
        uint8_t *q = b + 16;
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                q[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    }
}

/* ---- Q6_K ------------------------------------------------------------- */

void q6_k_to_float(const void *src, float *dst, int64_t n)
{
    const uint8_t *b = src;
    for (int64_t i = 0; i < n / QKK; i++, b += Q6_K_BYTES) {
        float d = ld_f16(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        float *y = dst + i * QKK;
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            const int8_t *s = sc + 8 * h;
            float *yy = y + 128 * h;
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                yy[l] = d * (float)s[is + 0] * (float)q1;
                yy[l + 32] = d * (float)s[is + 2] * (float)q2;
                yy[l + 64] = d * (float)s[is + 4] * (float)q3;
                yy[l + 96] = d * (float)s[is + 6] * (float)q4;
            }
        }
    }
}

/* The scale of one group of n values for signed levels -nmax..nmax-1,
 * weighted by x^2: the levels at -nmax / max(|x|) (signed), then the
 * least-squares scale over inverse scales -(nmax + 0.1 is) / max, is =
 * -9..9, keeping the best (ggml's make_qx_quants with rmse_type 1). L gets
 * the chosen levels plus nmax (all 0 for a zero group). */
static float fit_scale_signed(int n, int nmax, const float *x, uint8_t *L)
{
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < GROUP_EPS) {
        memset(L, 0, (size_t)n);
        return 0.0f;
    }
    float iscale = -(float)nmax / max, sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = imax(-nmax, imin(nmax - 1, nearest(iscale * x[i])));
        L[i] = (uint8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * (float)l;
        suml2 += w * (float)l * (float)l;
    }
    float scale = suml2 != 0 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -((float)nmax + 0.1f * (float)is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(-nmax, imin(nmax - 1, nearest(iscale * x[i])));
            float w = x[i] * x[i];
            sumlx += w * x[i] * (float)l;
            suml2 += w * (float)l * (float)l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++)
                L[i] = (uint8_t)(nmax + imax(-nmax, imin(nmax - 1, nearest(iscale * x[i]))));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

void q6_k_from_float(const float *src, void *dst, int64_t n)
{
    uint8_t *b = dst;
    for (int64_t i = 0; i < n / QKK; i++, b += Q6_K_BYTES) {
        const float *x = src + i * QKK;
        float scales[16], max_scale = 0, max_abs = 0;
        uint8_t L[QKK];
        for (int g = 0; g < 16; g++) {
            scales[g] = fit_scale_signed(16, 32, x + 16 * g, L + 16 * g);
            if (fabsf(scales[g]) > max_abs) {
                max_abs = fabsf(scales[g]);
                max_scale = scales[g];
            }
        }
        memset(b, 0, Q6_K_BYTES);
        if (max_abs < GROUP_EPS) continue; /* all zero (d = +0) */
        float iscale = -128.0f / max_scale;
        st_f16(b + 208, 1 / iscale);
        int8_t *sc = (int8_t *)(b + 192);
        for (int g = 0; g < 16; g++) sc[g] = (int8_t)imin(127, nearest(iscale * scales[g]));
        float d = ld_f16(b + 208);
        /* The levels again, against the scales as stored (a group whose
         * scale rounded to 0 keeps the search's levels, as ggml does). */
        for (int g = 0; g < 16; g++) {
            float dg = d * (float)sc[g];
            if (dg == 0) continue;
            for (int l = 0; l < 16; l++)
                L[16 * g + l] = (uint8_t)(imax(-32, imin(31, nearest(x[16 * g + l] / dg))) + 32);
        }
        for (int h = 0; h < 2; h++) {
            uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            const uint8_t *LL = L + 128 * h;
            for (int l = 0; l < 32; l++) {
                ql[l] = (uint8_t)((LL[l] & 0x0f) | ((LL[l + 64] & 0x0f) << 4));
                ql[l + 32] = (uint8_t)((LL[l + 32] & 0x0f) | ((LL[l + 96] & 0x0f) << 4));
                qh[l] = (uint8_t)((LL[l] >> 4) | ((LL[l + 32] >> 4) << 2) | ((LL[l + 64] >> 4) << 4) |
                                  ((LL[l + 96] >> 4) << 6));
            }
        }
    }
}
