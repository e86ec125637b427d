/*
 * attn_amx.c — causal flash attention (forward and backward) on AMX tiles
 * in bf16, for the bf16 training path: q, k, v are read from the stored
 * bf16 qkv (qkvh), the matrix products run as TDPBF16PS (bf16 operands,
 * fp32 accumulation), the softmax, the log-sum-exp and D = rowsum(dO * O)
 * stay fp32, and the probabilities P, the score gradients dS and dO are
 * rounded to bf16 only as operands of the products (what torch.autocast
 * does). Results and gradients are fp32.
 *
 * Schedule (FlashAttention-2): blocks of 32 queries x 32 keys, blocks
 * above the diagonal skipped, the diagonal block masked per element. Each
 * block product is 2 x 2 fp32 C tiles (tmm0..3) over A tiles tmm4/5 (16
 * rows x 32 bf16) and B tiles tmm6/7 (16 VNNI pairs x 16 columns). The
 * operands of one head are repacked once per task into per-thread buffers
 * (T rounded up to 32 rows, zero padded), in four layouts:
 *   rows   plain (Tp, HS) bf16: an A operand, tile = 16 rows, stride HS;
 *   wt     the 32-bit transpose (pairs of d as one word, 16 rows per
 *          group): the B operand of X Y^T, one tile per group and 32 d;
 *   pairs  rows 2p, 2p+1 interleaved (VNNI): the B operand of X Y, one
 *          tile per 32 rows and 16 columns;
 *   t16    the plain transpose (HS, Tp): V^T, an A operand.
 * Forward, per (batch, query head), all transposed so that the statistics
 * of 16 queries are one vector: S^T = K Q^T (A = K rows, B = Q wt), the
 * online softmax down the key rows (the running max moves only when a
 * score passes it by more than 8, so the fp32 O^T rarely needs a rescale
 * between its tile loads), O^T += V^T bf16(P^T) (A = V^T, B = P^T in
 * pairs), O transposed once per query block. Backward, per (batch, kv
 * head), the query heads of its group in order: S^T = K Q^T and dP^T =
 * V dO^T (keys in rows, so the per-query lse and D are vectors across a
 * row), P^T and dS^T = P^T (dP^T - D) scale in fp32, then dV += P^T dO,
 * dK += dS^T Q, dQ += dS K (dS by an in-register transpose), accumulated
 * in fp32 buffers. Every output is computed by one task in a fixed order:
 * deterministic for any thread count.
 */
#include "kernels/x86/bf16.h"

#include "base/base.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

bool mp_attention_amx_ok(int HS, int T)
{
    /* At most a quarter of T rounded up to 32 blocks is padding: below
     * that the fp32 kernel (16-row strips) was faster (bench_attention,
     * one thread: T 8 0.56x, 16 0.9x, 33 0.8x, 40 0.9x, 65 ~1.0x; 24 1.2x,
     * 48 1.0x, 72 1.1-1.3x, 80 1.2-1.4x, 100 1.2x). */
    int Tp = (T + 31) / 32 * 32;
    return HS >= 32 && HS <= 128 && HS % 32 == 0 && T >= 1 && 4 * (Tp - T) <= Tp &&
           mp_amx_usable() && mp_cpu_caps()->avx512_bf16;
}

#if defined(__x86_64__)
#include <immintrin.h>

#include "kernels/x86/simd.h" /* vexp */

#define MP_TAMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

/* 32 floats (lo, hi) -> 32 bf16 in that order, round to nearest even
 * (VCVTNE2PS2BF16: one instruction; denormals flush to zero, which only
 * moves a probability below 1e-38 to 0). */
#define CVT32(lo, hi) ((__m512i)_mm512_cvtne2ps_pbh((hi), (lo)))

enum { BK = 32, HSMAX = 128 };

static size_t rup32(int x) { return (size_t)(x + 31) / 32 * 32; }

/* Lanes [lo, hi) of 16 (clamped). */
static inline __mmask16 lanes(int lo, int hi)
{
    lo = lo < 0 ? 0 : lo;
    hi = hi > 16 ? 16 : hi;
    if (hi <= lo) return 0;
    return (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

/* Lanes [lo, 16) of 16 (lo clamped to [0, 16]), without branches. */
static inline __mmask16 from_lane(int lo)
{
    lo = lo < 0 ? 0 : lo > 16 ? 16 : lo;
    return (__mmask16)(0xffffu << lo);
}

/* ---- repacking (src: n rows of HS bf16, row stride ld; rows n..np-1 are
 * zero in dst; np a multiple of 32) ----
 * The rows of one head are short runs KiBs apart (qkv, dout, out rows),
 * which the hardware prefetchers do not follow across pages: every loop
 * here prefetches the rows PFR ahead of the ones it reads. */
enum { PFR = 16 };

/* Prefetches row r (bytes long) of src (row stride ld bytes) when r < n. */
MP_TAMX static inline void pf_row(const void *src, size_t ld, int r, int n, int bytes)
{
    if (r < n)
        for (int o = 0; o < bytes; o += 64) _mm_prefetch((const char *)src + (size_t)r * ld + o, _MM_HINT_T0);
}

/* rows: dst (np, HS) plain. */
MP_TAMX static void pk_rows(uint16_t *dst, const uint16_t *src, size_t ld, int n, int np, int HS)
{
    for (int r = 0; r < n; r++) {
        pf_row(src, ld * 2, r + PFR, n, HS * 2);
        memcpy(dst + (size_t)r * HS, src + (size_t)r * ld, (size_t)HS * 2);
    }
    memset(dst + (size_t)n * HS, 0, (size_t)(np - n) * HS * 2);
}

/* rows from fp32 (row stride ld), rounded to bf16. */
MP_TAMX static void pk_rows_f32(uint16_t *dst, const float *src, size_t ld, int n, int np, int HS)
{
    for (int r = 0; r < n; r++) {
        pf_row(src, ld * 4, r + PFR, n, HS * 4);
        for (int d = 0; d < HS; d += 16)
            _mm256_storeu_si256((__m256i *)(dst + (size_t)r * HS + d),
                                mp_f32x16_to_bf16(_mm512_loadu_ps(src + (size_t)r * ld + d)));
    }
    memset(dst + (size_t)n * HS, 0, (size_t)(np - n) * HS * 2);
}

/* wt: word (r, w) (elements 2w, 2w+1 of row r) at 32-bit offset
 * (r / 16) * (HS / 2) * 16 + w * 16 + r % 16; the tile of row group g and
 * d chunk c (32 elements) starts at element g * 16 * HS + c * 512. */
MP_TAMX static void pk_wt(uint16_t *dst, const uint16_t *src, size_t ld, int n, int np, int HS)
{
    int W = HS / 2;
    for (int g = 0; g < np / 16; g++)
        for (int w0 = 0; w0 < W; w0 += 16) {
            if (w0 == 0)
                for (int i = 0; i < 16; i++) pf_row(src, ld * 2, 16 * g + PFR + i, n, HS * 2);
            __m512 r[16], c[16];
            for (int i = 0; i < 16; i++) {
                int row = 16 * g + i;
                r[i] = row < n ? _mm512_loadu_ps((const float *)(src + (size_t)row * ld + 2 * w0))
                               : _mm512_setzero_ps();
            }
            mp_transpose16(r, c); /* bit moves only: any bf16 pair survives */
            float *d = (float *)(dst + (size_t)g * 16 * HS) + (size_t)w0 * 16;
            for (int w = 0; w < 16; w++) _mm512_storeu_ps(d + 16 * w, c[w]);
        }
}

/* pairs: element (r, d) at (r / 32) * 32 * HS + (d / 16) * 512 +
 * ((r % 32) / 2) * 32 + (d % 16) * 2 + r % 2; the tile of row block kb and
 * column tile t starts at kb * 32 * HS + t * 512. */
MP_TAMX static void pk_pairs(uint16_t *dst, const uint16_t *src, size_t ld, int n, int np, int HS)
{
    for (int r = 0; r < np; r += 2) {
        pf_row(src, ld * 2, r + PFR, n, HS * 2);
        pf_row(src, ld * 2, r + PFR + 1, n, HS * 2);
        for (int d = 0; d < HS; d += 16) {
            __m256i a = r < n ? _mm256_loadu_si256((const __m256i *)(src + (size_t)r * ld + d))
                              : _mm256_setzero_si256();
            __m256i b = r + 1 < n ? _mm256_loadu_si256((const __m256i *)(src + (size_t)(r + 1) * ld + d))
                                  : _mm256_setzero_si256();
            __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
            _mm512_storeu_si512(dst + (size_t)(r / 32) * 32 * HS + (size_t)(d / 16) * 512 +
                                    (size_t)((r % 32) / 2) * 32,
                                mp_pairs16(ab));
        }
    }
}

/* dst rows (row stride ld floats) = src rows (HS floats each, contiguous),
 * n rows. The destination rows are KiBs apart (qkv-shaped gradients) and
 * rarely cached: each is prefetched for writing PFD rows ahead, so that
 * more ownership requests are in flight than the store buffer alone
 * allows (measured: the backward ~10% faster than with memcpy at the
 * benchmark shape). */
enum { PFD = 8 };
MP_TAMX static void put_rows(float *dst, size_t ld, const float *src, int n, int HS)
{
    for (int r = 0; r < n; r++) {
        if (r + PFD < n)
            for (int e = 0; e < HS; e += 16) _mm_prefetch((const char *)(dst + (r + PFD) * ld + e), _MM_HINT_ET0);
        for (int e = 0; e < HS; e += 16)
            _mm512_storeu_ps(dst + r * ld + e, _mm512_loadu_ps(src + (size_t)r * HS + e));
    }
}

/* ---- block products ---- */

/* s (32 x 32 fp32) = X Y^T over HS: X = 32 rows (stride HS) from a, Y =
 * two row groups of a wt buffer starting at bw. */
MP_TAMX static void prod_xyt(float s[BK][BK], const uint16_t *a, const uint16_t *bw, int HS)
{
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int c = 0; c < HS / 32; c++) {
        _tile_loadd(4, a + 32 * c, HS * 2);
        _tile_loadd(6, bw + 512 * c, 64);
        _tile_loadd(5, a + (size_t)16 * HS + 32 * c, HS * 2);
        _tile_loadd(7, bw + (size_t)16 * HS + 512 * c, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, &s[0][0], BK * 4);
    _tile_stored(1, &s[0][16], BK * 4);
    _tile_stored(2, &s[16][0], BK * 4);
    _tile_stored(3, &s[16][16], BK * 4);
}

/* c (32 x HS fp32, stride HS) += X0 Y0 (+ X1 Y1 when x1 is not NULL): X
 * (32 x 32 bf16, row-major), Y the 32-row block of a pairs buffer starting
 * at b; one load and store of c for both products. */
MP_TAMX static void prod_acc2(float *c, const uint16_t x0[BK][BK], const uint16_t *b0,
                              const uint16_t x1[BK][BK], const uint16_t *b1, int HS)
{
    for (int t = 0; t < HS / 16; t += 2) {
        _tile_loadd(0, c + 16 * t, HS * 4);
        _tile_loadd(1, c + 16 * t + 16, HS * 4);
        _tile_loadd(2, c + (size_t)16 * HS + 16 * t, HS * 4);
        _tile_loadd(3, c + (size_t)16 * HS + 16 * t + 16, HS * 4);
        for (int h = 0; h < (x1 ? 2 : 1); h++) {
            const uint16_t(*x)[BK] = h ? x1 : x0;
            const uint16_t *bp = h ? b1 : b0;
            _tile_loadd(4, &x[0][0], 64);
            _tile_loadd(5, &x[16][0], 64);
            _tile_loadd(6, bp + 512 * t, 64);
            _tile_loadd(7, bp + 512 * (t + 1), 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c + 16 * t, HS * 4);
        _tile_stored(1, c + 16 * t + 16, HS * 4);
        _tile_stored(2, c + (size_t)16 * HS + 16 * t, HS * 4);
        _tile_stored(3, c + (size_t)16 * HS + 16 * t + 16, HS * 4);
    }
}

/* ---- forward ---- */

/* dst (HS, np) = the transpose of src's first n rows (row stride ld),
 * zero past n: V^T as the A operand of O^T += V^T P^T (the tile of d group
 * g and key block j0 starts at element 16 g np + j0, row stride np). */
MP_TAMX static void pk_t16(uint16_t *dst, const uint16_t *src, size_t ld, int n, int np, int HS)
{
    for (int k0 = 0; k0 < np; k0 += 16)
        for (int d0 = 0; d0 < HS; d0 += 16) {
            __m512 r[16], c[16];
            if (d0 == 0)
                for (int i = 0; i < 16; i++) pf_row(src, ld * 2, k0 + PFR + i, n, HS * 2);
            for (int i = 0; i < 16; i++) /* bf16 in the low half of 32-bit lanes */
                r[i] = k0 + i < n ? _mm512_castsi512_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                        (const __m256i *)(src + (size_t)(k0 + i) * ld + d0))))
                                  : _mm512_setzero_ps();
            mp_transpose16(r, c);
            for (int d = 0; d < 16; d++)
                _mm256_storeu_si256((__m256i *)(dst + (size_t)(d0 + d) * np + k0),
                                    _mm512_cvtepi32_epi16(_mm512_castps_si512(c[d])));
        }
}

typedef struct fwd_buf {
    uint16_t *qt, *k, *vt; /* Q wt (Tp, HS), K rows (Tp, HS), V^T (HS, Tp) */
} fwd_buf;

/* One (batch b, query head h): out rows and lse. Scores are kept
 * transposed, st[key][query], so the softmax statistics of 16 queries are
 * one vector and the running max and sum need no horizontal reductions;
 * the output accumulates transposed too, ot[d][query] = (V^T P^T)[d][q],
 * rescaled by a vector per row, and is transposed once per query block. */
/* out: fp32 rows, or (outp non-NULL) packed bf16 rows (packed A of
 * (B*T, NH*HS), rounded as mp_pack_a rounds). */
MP_TAMX static void fwd_head(const fwd_buf *w, float *out, uint16_t *outp, float *lse,
                             const uint16_t *qkvh, int T, int NH, int KVH, int HS, int b, int h)
{
    _Alignas(64) float st2[2][BK][BK], ot[HSMAX * BK], lo[BK];
    _Alignas(64) uint16_t pp[2][16][32]; /* P^T in pairs: B tiles of 16 queries */
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, kh = h / (NH / KVH), Tp = (int)rup32(T);
    int kk = (int)rup32(OC);
    float scale = 1.0f / sqrtf((float)HS);
    const uint16_t *base = qkvh + (size_t)b * T * S;
    pk_wt(w->qt, base + (size_t)h * HS, (size_t)S, T, Tp, HS);
    pk_rows(w->k, base + (size_t)(NH + kh) * HS, (size_t)S, T, Tp, HS);
    pk_t16(w->vt, base + (size_t)(NH + KVH + kh) * HS, (size_t)S, T, Tp, HS);
    __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    for (int i0 = 0; i0 < T; i0 += BK) {
        /* this block's out rows, for writing at its end (as put_rows) */
        for (int r = 0; r < BK && i0 + r < T; r++)
            for (int d = 0; d < HS; d += outp ? 32 : 16)
                _mm_prefetch(outp ? (const char *)(outp + mp_packa_off(kk, b * T + i0 + r, h * HS + d))
                                  : (const char *)(out + ((size_t)b * T + i0 + r) * OC + (size_t)h * HS + d),
                             _MM_HINT_ET0);
        __m512 m[2] = {ninf, ninf}, l[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        memset(ot, 0, sizeof(float) * HS * BK);
        /* the scores of the next key block are computed one block ahead
         * (two buffers), so that their tile products overlap this
         * block's vector softmax instead of stalling it */
        const uint16_t *qi = w->qt + (size_t)(i0 / 16) * 16 * HS;
        prod_xyt(st2[0], w->k, qi, HS);
        for (int j0 = 0; j0 <= i0; j0 += BK) {
            bool diag = j0 == i0;
            float(*st)[BK] = st2[(j0 / BK) & 1];
            if (j0 + BK <= i0) prod_xyt(st2[(j0 / BK + 1) & 1], w->k + (size_t)(j0 + BK) * HS, qi, HS);
            __m512 al[2];
            for (int v = 0; v < 2; v++) {
                /* on the diagonal query lane q of half v sees key c when 16v + q >= c */
                __m512 mx = ninf;
                for (int c = 0; c < BK; c++) {
                    __mmask16 mk = from_lane(diag ? c - 16 * v : 0);
                    mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_load_ps(&st[c][16 * v]));
                }
                /* the running max moves only when a score passes it by
                 * more than 8: exp(x - m) <= e^8 is still exact enough in
                 * fp32 and bf16, and O (and l) rarely need a rescale */
                mx = _mm512_mul_ps(mx, vs);
                mx = _mm512_mask_mov_ps(m[v], _mm512_cmp_ps_mask(mx, _mm512_add_ps(m[v], _mm512_set1_ps(8.0f)), _CMP_GT_OQ), mx);
                __m512 sum = _mm512_setzero_ps();
                for (int c = 0; c < BK; c += 2) {
                    __mmask16 ka = from_lane(diag ? c - 16 * v : 0);
                    __mmask16 kb = from_lane(diag ? c + 1 - 16 * v : 0);
                    __m512 ea = _mm512_maskz_mov_ps(
                        ka, vexp(_mm512_fmsub_ps(_mm512_load_ps(&st[c][16 * v]), vs, mx)));
                    __m512 eb = _mm512_maskz_mov_ps(
                        kb, vexp(_mm512_fmsub_ps(_mm512_load_ps(&st[c + 1][16 * v]), vs, mx)));
                    sum = _mm512_add_ps(sum, _mm512_add_ps(ea, eb));
                    _mm512_store_si512(&pp[v][c / 2][0], mp_pairs16(CVT32(ea, eb)));
                }
                al[v] = vexp(_mm512_sub_ps(m[v], mx));
                l[v] = _mm512_fmadd_ps(l[v], al[v], sum);
                m[v] = mx;
            }
            /* rescale where a running max moved (rarer as j0 grows: the
             * AVX stores also make the next tile loads of ot wait) */
            for (int v = 0; v < 2 && j0 > 0; v++)
                if (_mm512_cmpneq_ps_mask(al[v], _mm512_set1_ps(1.0f)))
                    for (int d = 0; d < HS; d++)
                        _mm512_store_ps(ot + d * BK + 16 * v,
                                        _mm512_mul_ps(_mm512_load_ps(ot + d * BK + 16 * v), al[v]));
            /* ot += V^T P^T: A = V^T rows of 2 d groups, B = the two query halves */
            const uint16_t *va = w->vt + j0;
            _tile_loadd(6, &pp[0][0][0], 64);
            _tile_loadd(7, &pp[1][0][0], 64);
            for (int g = 0; g < HS / 16; g += 2) {
                float *c0 = ot + 16 * g * BK, *c1 = c0 + 16 * BK;
                _tile_loadd(0, c0, BK * 4);
                _tile_loadd(1, c0 + 16, BK * 4);
                _tile_loadd(2, c1, BK * 4);
                _tile_loadd(3, c1 + 16, BK * 4);
                _tile_loadd(4, va + (size_t)16 * g * Tp, Tp * 2);
                _tile_loadd(5, va + (size_t)16 * (g + 1) * Tp, Tp * 2);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
                _tile_stored(0, c0, BK * 4);
                _tile_stored(1, c0 + 16, BK * 4);
                _tile_stored(2, c1, BK * 4);
                _tile_stored(3, c1 + 16, BK * 4);
            }
        }
        /* out rows = (ot / l)^T, lse = m + log l */
        int nr = T - i0 < BK ? T - i0 : BK;
        for (int v = 0; v < 2 && 16 * v < nr; v++) {
            __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), l[v]);
            _mm512_store_ps(lo + 16 * v, l[v]);
            for (int d0 = 0; d0 < HS && !outp; d0 += 16) {
                __m512 r[16], c[16];
                for (int x = 0; x < 16; x++) r[x] = _mm512_mul_ps(_mm512_load_ps(ot + (d0 + x) * BK + 16 * v), inv);
                mp_transpose16(r, c);
                for (int y = 0; y < 16 && 16 * v + y < nr; y++)
                    _mm512_storeu_ps(out + ((size_t)b * T + i0 + 16 * v + y) * OC + (size_t)h * HS + d0, c[y]);
            }
            for (int d0 = 0; d0 < HS && outp; d0 += 32) { /* 32 columns: one packed piece */
                __m512 r[16], c[2][16];
                for (int q = 0; q < 2; q++) {
                    for (int x = 0; x < 16; x++)
                        r[x] = _mm512_mul_ps(_mm512_load_ps(ot + (d0 + 16 * q + x) * BK + 16 * v), inv);
                    mp_transpose16(r, c[q]);
                }
                for (int y = 0; y < 16 && 16 * v + y < nr; y++) {
                    __m512i pc = _mm512_inserti64x4(_mm512_castsi256_si512(mp_f32x16_to_bf16(c[0][y])),
                                                    mp_f32x16_to_bf16(c[1][y]), 1);
                    _mm512_storeu_si512(outp + mp_packa_off(kk, b * T + i0 + 16 * v + y, h * HS + d0), pc);
                }
            }
            float mv[16];
            _mm512_storeu_ps(mv, m[v]);
            for (int y = 0; y < 16 && 16 * v + y < nr; y++)
                lse[((size_t)b * NH + h) * T + i0 + 16 * v + y] = mv[y] + logf(lo[16 * v + y]);
        }
    }
}

/* The threads' shares of the forward and the backward, called inside
 * their parallel regions (the worksharing loops bind to them): functions
 * of their own so that the tile code carries its target attribute, which
 * clang does not give the outlined body of a parallel region. Their
 * buffers are the threads' own scratch (mp_thread_scratch), made once. */
MP_TAMX static void fwd_thread(float *out, uint16_t *outp, float *lse, const uint16_t *qkvh, int B,
                               int T, int NH, int KVH, int HS)
{
    size_t per = rup32(T) * (size_t)HS;
    uint16_t *buf = mp_thread_scratch(MP_SCRATCH_ATTN_H, 3 * per * sizeof(uint16_t));
    KILN_ASSERT(buf);
    mp_amx_tiles_config();
    fwd_buf w = {buf, buf + per, buf + 2 * per};
    #pragma omp for schedule(dynamic, 1)
    for (int bh = 0; bh < B * NH; bh++)
        fwd_head(&w, out, outp, lse, qkvh, T, NH, KVH, HS, bh / NH, bh % NH);
    _tile_release();
}

void mp_attention_fwd_amx(float *out, float *lse, const uint16_t *qkvh, int B, int T, int NH,
                          int KVH, int HS)
{
    KILN_ASSERT(HS >= 32 && HS % 32 == 0 && HS <= HSMAX && KVH > 0 && NH % KVH == 0);
    if (B <= 0 || T <= 0) return;
    #pragma omp parallel
    fwd_thread(out, NULL, lse, qkvh, B, T, NH, KVH, HS);
}

void mp_attention_fwd_amx_packed(uint16_t *outp, float *lse, const uint16_t *qkvh, int B, int T,
                                 int NH, int KVH, int HS)
{
    KILN_ASSERT(HS >= 32 && HS % 32 == 0 && HS <= HSMAX && KVH > 0 && NH % KVH == 0);
    if (B <= 0 || T <= 0) return;
    #pragma omp parallel
    fwd_thread(NULL, outp, lse, qkvh, B, T, NH, KVH, HS);
    /* the padding rows (all columns: NH * HS is a multiple of 32) */
    int M = B * T, kk = (int)rup32(NH * HS);
    for (int m = M; m < (int)rup32(M); m++)
        for (int k = 0; k < kk; k += 32) memset(outp + mp_packa_off(kk, m, k), 0, 64);
}

/* ---- backward ---- */

typedef struct bwd_buf {
    uint16_t *k, *v, *kp;         /* kv head: K rows, V rows, K pairs */
    uint16_t *qt, *qp, *dor, *dot, *dop; /* query head: Q wt, Q pairs, dO rows / wt / pairs */
    float *dk, *dv, *dq;          /* (Tp, HS) fp32 accumulators */
    float *D, *L;                 /* (Tp) rowsum(dO * O), lse; 0 past T */
} bwd_buf;

/* All of kv head kh of batch row b, its query heads in order. */
/* A finished (T, HS) fp32 gradient block of head column col0 (in
 * elements of a qkv row): as rows of dqkv, or (o) straight into
 * mp_pack_dy's packed forms and bias sums, 32 x 32 blocks at a time. */
MP_TAMX static void put_grad(const mp_dy_out *o, float *dbase, size_t S, const float *src, int b,
                             int T, int col0, int HS)
{
    if (!o) {
        put_rows(dbase + col0, S, src, T, HS);
        return;
    }
    for (int t0 = 0; t0 < T; t0 += 32) {
        int n0 = b * T + t0;
        for (int c = 0; c < HS; c += 32)
            mp_pack_dy_block(o->pa, o->pt, o->tok,
                             o->part ? o->part + (size_t)(n0 / 32) * o->op + col0 + c : NULL,
                             src + (size_t)t0 * HS + c, (size_t)HS, 32, 32, n0, col0 + c, o->np, o->op);
    }
}

/* D[t] = rowsum(dout * out) of query head h's row t, out read from its
 * packed bf16 copy outp (packed K kk; row n = b * T + t): bf16 widens
 * exactly, and the products go in the fp32 path's order (16 columns at
 * a time), so D is the same bit for bit. */
MP_TAMX static inline float rowdot_packed(const float *dor, const uint16_t *outp, int kk, size_t n,
                                          int c0, int HS)
{
    __m512 acc = _mm512_setzero_ps();
    for (int e = 0; e < HS; e += 32) {
        __m512i h = _mm512_loadu_si512(outp + mp_packa_off(kk, (int)n, c0 + e));
        __m512 o0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
        __m512 o1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(dor + e), o0, acc);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(dor + e + 16), o1, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* out: fp32 rows, or (outp non-NULL) the packed bf16 copy; the gradient
 * as rows of dqkv or (o non-NULL) packed (put_grad). */
MP_TAMX static void bwd_kv(const bwd_buf *w, float *dqkv, const mp_dy_out *o, const float *dout,
                           const uint16_t *qkvh, const float *out, const uint16_t *outp,
                           const float *lse, int T, int NH,
                           int KVH, int HS, int b, int kh)
{
    _Alignas(64) float st2[2][BK][BK], dpt2[2][BK][BK], dsf[BK][BK];
    _Alignas(64) uint16_t pt2[2][BK][BK], dst2[2][BK][BK], ds[BK][BK];
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, grp = NH / KVH, Tp = (int)rup32(T);
    size_t per = (size_t)Tp * HS;
    float scale = 1.0f / sqrtf((float)HS);
    const uint16_t *base = qkvh + (size_t)b * T * S;
    float *dbase = dqkv ? dqkv + (size_t)b * T * S : NULL;
    pk_rows(w->k, base + (size_t)(NH + kh) * HS, (size_t)S, T, Tp, HS);
    pk_rows(w->v, base + (size_t)(NH + KVH + kh) * HS, (size_t)S, T, Tp, HS);
    pk_pairs(w->kp, base + (size_t)(NH + kh) * HS, (size_t)S, T, Tp, HS);
    memset(w->dk, 0, per * sizeof(float));
    memset(w->dv, 0, per * sizeof(float));
    __m512 vs = _mm512_set1_ps(scale);
    for (int h = kh * grp; h < (kh + 1) * grp; h++) {
        const float *dob = dout + (size_t)b * T * OC + (size_t)h * HS;
        const float *ob = outp ? NULL : out + (size_t)b * T * OC + (size_t)h * HS;
        int kk = (int)rup32(OC);
        pk_wt(w->qt, base + (size_t)h * HS, (size_t)S, T, Tp, HS);
        pk_pairs(w->qp, base + (size_t)h * HS, (size_t)S, T, Tp, HS);
        pk_rows_f32(w->dor, dob, (size_t)OC, T, Tp, HS);
        pk_wt(w->dot, w->dor, (size_t)HS, T, Tp, HS);
        pk_pairs(w->dop, w->dor, (size_t)HS, T, Tp, HS);
        for (int t = 0; t < Tp; t++) {
            float d = 0.0f;
            if (outp) {
                if (t + PFR < T)
                    for (int e = 0; e < HS; e += 32)
                        _mm_prefetch((const char *)(outp + mp_packa_off(kk, b * T + t + PFR, h * HS + e)),
                                     _MM_HINT_T0);
                if (t < T) d = rowdot_packed(dob + (size_t)t * OC, outp, kk, (size_t)b * T + t, h * HS, HS);
            } else {
                pf_row(ob, (size_t)OC * 4, t + PFR, T, HS * 4);
                if (t < T) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int e = 0; e < HS; e += 16)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(dob + (size_t)t * OC + e),
                                              _mm512_loadu_ps(ob + (size_t)t * OC + e), acc);
                    d = _mm512_reduce_add_ps(acc);
                }
            }
            w->D[t] = d;
            w->L[t] = t < T ? lse[((size_t)b * NH + h) * T + t] : 0.0f;
        }
        memset(w->dq, 0, per * sizeof(float));
        for (int j0 = 0; j0 < T; j0 += BK) {
            /* S^T = K_j Q_i^T, dP^T = V_j dO_i^T (keys x queries), one
             * query block ahead (two buffers, as in the forward) */
            const uint16_t *kj = w->k + (size_t)j0 * HS, *vj = w->v + (size_t)j0 * HS;
            prod_xyt(st2[0], kj, w->qt + (size_t)(j0 / 16) * 16 * HS, HS);
            prod_xyt(dpt2[0], vj, w->dot + (size_t)(j0 / 16) * 16 * HS, HS);
            for (int i0 = j0; i0 < T; i0 += BK) {
                int cur = ((i0 - j0) / BK) & 1;
                float(*st)[BK] = st2[cur], (*dpt)[BK] = dpt2[cur];
                uint16_t(*pt)[BK] = pt2[cur], (*dst)[BK] = dst2[cur];
                if (i0 + BK < T) {
                    prod_xyt(st2[cur ^ 1], kj, w->qt + (size_t)((i0 + BK) / 16) * 16 * HS, HS);
                    prod_xyt(dpt2[cur ^ 1], vj, w->dot + (size_t)((i0 + BK) / 16) * 16 * HS, HS);
                }
                __m512 vl[2], vD[2];
                for (int v = 0; v < 2; v++) {
                    vl[v] = _mm512_loadu_ps(w->L + i0 + 16 * v);
                    vD[v] = _mm512_loadu_ps(w->D + i0 + 16 * v);
                }
                for (int c = 0; c < BK; c++) {
                    __m512 e[2], g[2];
                    for (int v = 0; v < 2; v++) {
                        /* query i0 + 16v + lane sees key j0 + c when >=, and exists when < T */
                        __mmask16 mk = lanes(j0 + c - i0 - 16 * v, T - i0 - 16 * v);
                        e[v] = _mm512_maskz_mov_ps(
                            mk, vexp(_mm512_fmsub_ps(_mm512_load_ps(&st[c][16 * v]), vs, vl[v])));
                        g[v] = _mm512_mul_ps(_mm512_mul_ps(e[v], vs),
                                             _mm512_sub_ps(_mm512_load_ps(&dpt[c][16 * v]), vD[v]));
                        _mm512_store_ps(&dsf[c][16 * v], g[v]);
                    }
                    _mm512_store_si512(&pt[c][0], CVT32(e[0], e[1]));
                    _mm512_store_si512(&dst[c][0], CVT32(g[0], g[1]));
                }
                /* dS = transpose of dS^T (fp32, then rounded: same values) */
                for (int bj = 0; bj < 2; bj++) {
                    __m512 r[16], c0[16], c1[16];
                    for (int x = 0; x < 16; x++) r[x] = _mm512_load_ps(&dsf[x][16 * bj]);
                    mp_transpose16(r, c0);
                    for (int x = 0; x < 16; x++) r[x] = _mm512_load_ps(&dsf[16 + x][16 * bj]);
                    mp_transpose16(r, c1);
                    for (int y = 0; y < 16; y++) _mm512_store_si512(&ds[16 * bj + y][0], CVT32(c0[y], c1[y]));
                }
                size_t qb = (size_t)(i0 / 32) * 32 * HS, kb = (size_t)(j0 / 32) * 32 * HS;
                prod_acc2(w->dq + (size_t)i0 * HS, (const uint16_t(*)[BK])ds, w->kp + kb, NULL, NULL, HS);
                /* dV, dK: two query blocks per accumulation (K = 64) */
                if (cur) {
                    prod_acc2(w->dv + (size_t)j0 * HS, (const uint16_t(*)[BK])pt2[0], w->dop + qb - 32 * HS,
                              (const uint16_t(*)[BK])pt, w->dop + qb, HS);
                    prod_acc2(w->dk + (size_t)j0 * HS, (const uint16_t(*)[BK])dst2[0], w->qp + qb - 32 * HS,
                              (const uint16_t(*)[BK])dst, w->qp + qb, HS);
                } else if (i0 + BK >= T) {
                    prod_acc2(w->dv + (size_t)j0 * HS, (const uint16_t(*)[BK])pt, w->dop + qb, NULL, NULL, HS);
                    prod_acc2(w->dk + (size_t)j0 * HS, (const uint16_t(*)[BK])dst, w->qp + qb, NULL, NULL, HS);
                }
            }
        }
        put_grad(o, dbase, (size_t)S, w->dq, b, T, h * HS, HS);
    }
    put_grad(o, dbase, (size_t)S, w->dk, b, T, (NH + kh) * HS, HS);
    put_grad(o, dbase, (size_t)S, w->dv, b, T, (NH + KVH + kh) * HS, HS);
}

MP_TAMX static void bwd_thread(float *dqkv, const mp_dy_out *o, const float *dout,
                               const uint16_t *qkvh, const float *out, const uint16_t *outp,
                               const float *lse, int B, int T, int NH, int KVH, int HS)
{
    size_t tp = rup32(T), per = tp * (size_t)HS;
    uint16_t *hb = mp_thread_scratch(MP_SCRATCH_ATTN_H, 8 * per * sizeof(uint16_t));
    float *fb = mp_thread_scratch(MP_SCRATCH_ATTN_F, (3 * per + 2 * tp) * sizeof(float));
    KILN_ASSERT(hb && fb);
    mp_amx_tiles_config();
    bwd_buf w = {hb, hb + per, hb + 2 * per, hb + 3 * per, hb + 4 * per, hb + 5 * per,
                 hb + 6 * per, hb + 7 * per, fb, fb + per, fb + 2 * per, fb + 3 * per,
                 fb + 3 * per + tp};
    #pragma omp for schedule(dynamic, 1)
    for (int bk = 0; bk < B * KVH; bk++)
        bwd_kv(&w, dqkv, o, dout, qkvh, out, outp, lse, T, NH, KVH, HS, bk / KVH, bk % KVH);
    _tile_release();
}

void mp_attention_bwd_amx(float *dqkv, const float *dout, const uint16_t *qkvh, const float *out,
                          const float *lse, int B, int T, int NH, int KVH, int HS)
{
    KILN_ASSERT(HS >= 32 && HS % 32 == 0 && HS <= HSMAX && KVH > 0 && NH % KVH == 0);
    if (B <= 0 || T <= 0) return;
    #pragma omp parallel
    bwd_thread(dqkv, NULL, dout, qkvh, out, NULL, lse, B, T, NH, KVH, HS);
}

void mp_attention_bwd_amx_packed(float *dqkv, const mp_dy_out *o, const float *dout,
                                 const uint16_t *qkvh, const uint16_t *outp, const float *lse, int B,
                                 int T, int NH, int KVH, int HS)
{
    KILN_ASSERT(HS >= 32 && HS % 32 == 0 && HS <= HSMAX && KVH > 0 && NH % KVH == 0);
    KILN_ASSERT(!dqkv != !o);
    KILN_ASSERT(!o || (T % 32 == 0 && o->np == B * T && o->op == (NH + 2 * KVH) * HS));
    if (B <= 0 || T <= 0) return;
    #pragma omp parallel
    bwd_thread(dqkv, o, dout, qkvh, NULL, outp, lse, B, T, NH, KVH, HS);
}

#else /* not x86-64: never called (mp_attention_amx_ok() is false) */

void mp_attention_fwd_amx(float *out, float *lse, const uint16_t *qkvh, int B, int T, int NH,
                          int KVH, int HS)
{
    (void)out, (void)lse, (void)qkvh, (void)B, (void)T, (void)NH, (void)KVH, (void)HS;
    KILN_ASSERT(0);
}

void mp_attention_fwd_amx_packed(uint16_t *outp, float *lse, const uint16_t *qkvh, int B, int T,
                                 int NH, int KVH, int HS)
{
    (void)outp, (void)lse, (void)qkvh, (void)B, (void)T, (void)NH, (void)KVH, (void)HS;
    KILN_ASSERT(0);
}

void mp_attention_bwd_amx(float *dqkv, const float *dout, const uint16_t *qkvh,
                          const float *out, const float *lse, int B, int T, int NH, int KVH,
                          int HS)
{
    (void)dqkv, (void)dout, (void)qkvh, (void)out, (void)lse;
    (void)B, (void)T, (void)NH, (void)KVH, (void)HS;
    KILN_ASSERT(0);
}

void mp_attention_bwd_amx_packed(float *dqkv, const mp_dy_out *o, const float *dout,
                                 const uint16_t *qkvh, const uint16_t *outp, const float *lse, int B,
                                 int T, int NH, int KVH, int HS)
{
    (void)dqkv, (void)o, (void)dout, (void)qkvh, (void)outp, (void)lse;
    (void)B, (void)T, (void)NH, (void)KVH, (void)HS;
    KILN_ASSERT(0);
}
#endif
