/*
 * gemm_bf16.c — packing of fp32 operands into the compute dtype (bf16, or
 * fp16 as an exact bf16 hi/lo pair), the portable and AVX512_BF16 product
 * kernels over the packed layout, backend dispatch, and the three products
 * of a linear layer. The AMX kernel lives in amx_bf16.c. Layouts are
 * described in bf16.h. Why it is over ~800 lines: the packers and the
 * kernels that read their layout are kept side by side (a layout change
 * touches both); the backend seam of issue 16 (item 2) will split it by
 * operation.
 */
#include "kernels/x86/bf16.h"

#include "base/base.h"

#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_max_threads(void) { return 1; }
#endif

#define KILN_MP_MIN(a, b) ((a) < (b) ? (a) : (b))

#if defined(__x86_64__)
#include <immintrin.h>
#define MP_X86 1
#endif

/* Implemented in amx_bf16.c. */
void mp_gemm_amx(int M, int N, int Kp, const uint16_t *pa, const uint16_t *pb,
                 float *C, int ldc, bool accumulate, const float *bias, bool transc,
                 const mp_epi *epi);

static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* K of the packed operands: padded to 32, tripled for fp16. */
static inline int packed_k(kiln_dtype dt, int K)
{
    int kp = round_up(K, 32);
    return dt == KILN_DTYPE_F16 ? 3 * kp : kp;
}

#define a_off mp_packa_off
#define bf16x16 mp_f32x16_to_bf16

size_t mp_packb_elems(kiln_dtype dt, int K, int N)
{
    return (size_t)packed_k(dt, K) * (size_t)round_up(N, 32);
}

size_t mp_packa_elems(kiln_dtype dt, int M, int K)
{
    return (size_t)packed_k(dt, K) * (size_t)round_up(M, 32);
}

/* The bf16 part(s) of one fp32 value under dt: bf16 -> (round, 0);
 * fp16 -> round to fp16 first, then hi = bf16(x16), lo = bf16(x16 - hi)
 * (both exact). inf/NaN stay in hi with lo = 0. */
static inline void split(kiln_dtype dt, float x, uint16_t *hi, uint16_t *lo)
{
    if (dt == KILN_DTYPE_BF16) {
        *hi = f32_to_bf16(x);
        *lo = 0;
        return;
    }
    float h = f16_to_f32(f32_to_f16(x));
    uint16_t bh = f32_to_bf16(h);
    float r = h - bf16_to_f32(bh);
    *hi = bh;
    *lo = (r == r && r - r == 0) ? f32_to_bf16(r) : 0;
}

#if MP_X86
#define MP_T512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))


/* 16 values -> hi (and lo for fp16), the vector twin of split(). */
MP_T512 static inline void split16(kiln_dtype dt, __m512 x, __m256i *hi, __m256i *lo)
{
    if (dt == KILN_DTYPE_BF16) {
        *hi = bf16x16(x);
        *lo = _mm256_setzero_si256();
        return;
    }
    __m512 h = _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i bh = bf16x16(h);
    __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bh), 16));
    __m512 r = _mm512_sub_ps(h, hf);
    __mmask16 fin = _mm512_cmp_ps_mask(_mm512_abs_ps(h), _mm512_set1_ps(__builtin_inff()), _CMP_LT_OQ);
    *hi = bh;
    *lo = _mm256_maskz_mov_epi16(fin, bf16x16(r));
}

/* Loads 16 floats: contiguous (st == 1) or strided (gather), cnt valid. */
MP_T512 static inline __m512 load16(const float *p, size_t st, int cnt)
{
    __mmask16 m = cnt >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << cnt) - 1);
    if (st == 1) return _mm512_maskz_loadu_ps(m, p);
    __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32((int)st));
    if (st <= 0x7fffffff / 16)
        return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, p, 4);
    float t[16] = {0};
    for (int i = 0; i < cnt; i++) t[i] = p[(size_t)i * st];
    return _mm512_loadu_ps(t);
}

/* Row of n values (stride st) -> h[0..n) (and l[0..n) for fp16). */
MP_T512 static void convert_row_avx512(kiln_dtype dt, const float *src, size_t st, int n,
                                       uint16_t *h, uint16_t *l)
{
    for (int i = 0; i < n; i += 16) {
        int cnt = KILN_MP_MIN(16, n - i);
        __mmask16 m = (__mmask16)(cnt >= 16 ? 0xffff : (1u << cnt) - 1);
        __m256i hi, lo;
        split16(dt, load16(src + (size_t)i * st, st, cnt), &hi, &lo);
        _mm256_mask_storeu_epi16(h + i, m, hi);
        if (l) _mm256_mask_storeu_epi16(l + i, m, lo);
    }
}

/* Columns k0..k0+31 of every row of packed A from a transposed source
 * (A[m][k] = src[k*ld + m]): 32 source rows are read front to back (32
 * sequential streams), 16 x 16 blocks transposed in registers, and each
 * output row gets one full 64-byte line per visit. Padding is written
 * elsewhere. */
MP_T512 static void pack_a_trans_kblock(kiln_dtype dt, int M, int K, const float *src, int ld,
                                        uint16_t *dst, int kp, int kk, int k0)
{
    for (int m0 = 0; m0 < M; m0 += 16) {
        int mc = KILN_MP_MIN(16, M - m0);
        __mmask16 mm = (__mmask16)(mc >= 16 ? 0xffff : (1u << mc) - 1);
        __m256i hi[2][16], lo[2][16];
        for (int h = 0; h < 2; h++) {
            int kb = k0 + 16 * h;
            __m512 r[16], c[16];
            for (int i = 0; i < 16; i++)
                r[i] = kb + i < K ? _mm512_maskz_loadu_ps(mm, src + (size_t)(kb + i) * ld + m0)
                                  : _mm512_setzero_ps();
            mp_transpose16(r, c);
            for (int j = 0; j < mc; j++) split16(dt, c[j], &hi[h][j], &lo[h][j]);
        }
        for (int j = 0; j < mc; j++) {
            __m512i vh = _mm512_inserti64x4(_mm512_castsi256_si512(hi[0][j]), hi[1][j], 1);
            _mm512_storeu_si512(dst + a_off(kk, m0 + j, k0), vh);
            if (dt == KILN_DTYPE_F16) {
                __m512i vl = _mm512_inserti64x4(_mm512_castsi256_si512(lo[0][j]), lo[1][j], 1);
                _mm512_storeu_si512(dst + a_off(kk, m0 + j, kp + k0), vh);
                _mm512_storeu_si512(dst + a_off(kk, m0 + j, 2 * kp + k0), vl);
            }
        }
    }
}

/* One row of a bf16 packed A from a contiguous fp32 row. */
MP_T512 static void pack_a_row_bf16(const float *src, int K, uint16_t *dst, int kk, int m)
{
    for (int k0 = 0; k0 < kk; k0 += 32) {
        int c0 = K - k0, c1 = K - k0 - 16;
        __mmask16 m0 = (__mmask16)(c0 >= 16 ? 0xffff : c0 <= 0 ? 0 : (1u << c0) - 1);
        __mmask16 m1 = (__mmask16)(c1 >= 16 ? 0xffff : c1 <= 0 ? 0 : (1u << c1) - 1);
        __m256i lo = bf16x16(_mm512_maskz_loadu_ps(m0, src + k0));
        __m256i hi = bf16x16(_mm512_maskz_loadu_ps(m1, src + k0 + 16));
        _mm512_storeu_si512(dst + a_off(kk, m, k0), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
    }
}

/* One 32-element panel row from two K rows: (b0[c], b1[c]) pairs. */
MP_T512 static inline void store_pairs(uint16_t *o, __m256i b0, __m256i b1)
{
    __m512i v = _mm512_or_si512(_mm512_cvtepu16_epi32(b0),
                                _mm512_slli_epi32(_mm512_cvtepu16_epi32(b1), 16));
    _mm512_storeu_si512(o, v);
}

/* The K slice s (32 rows) of columns n0..n0+cnt-1 of B = src^T
 * (B[k][n] = src[n * ld + k]): 16 source rows of 32 contiguous k, two
 * 16 x 16 register transposes instead of a gather per k; col[k / 16][k % 16]
 * holds B's row s * 32 + k (zeros beyond K and cnt). */
__attribute__((target("avx512f"), always_inline)) static inline void
load_trans_slice(const float *src, int ld, int K, int n0, int cnt, int s, __m512 col[2][16])
{
    for (int hf = 0; hf < 2; hf++) {
        int kb = s * 32 + 16 * hf, kc = K - kb;
        __mmask16 km = (__mmask16)(kc >= 16 ? 0xffff : kc <= 0 ? 0 : (1u << kc) - 1);
        __m512 r[16];
        for (int i = 0; i < 16; i++)
            r[i] = i < cnt ? _mm512_maskz_loadu_ps(km, src + (size_t)(n0 + i) * ld + kb)
                           : _mm512_setzero_ps();
        mp_transpose16(r, col[hf]);
    }
}

#define MP_TBF __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* One 32-element panel row of bf16 pairs (b0[c], b1[c]) from two rows of
 * 16 floats, rounded by VCVTNE2PS2BF16 (as bf16x16, except that fp32
 * subnormals become zero). */
MP_TBF static inline void store_pairs_hw(uint16_t *o, __m512 b0, __m512 b1)
{
    _mm512_storeu_si512(o, mp_pairs16((__m512i)_mm512_cvtne2ps_pbh(b1, b0)));
}

/* pack_b_slice_avx512 for bf16 on CPUs with AVX512_BF16. */
MP_TBF static void pack_b_slice_bf16hw(bool trans, int K, int N, const float *src, int ld,
                                       uint16_t *pan, int p, int s)
{
    int n0 = p * 16, cnt = KILN_MP_MIN(16, N - n0);
    __mmask16 nm = (__mmask16)(cnt >= 16 ? 0xffff : cnt <= 0 ? 0 : (1u << cnt) - 1);
    if (trans) {
        /* Each source row's 32 k rounded first: its 32-bit word j is then
         * the pair (k 2j, 2j+1), so the 16 panel rows of pairs are the
         * 16 x 16 transpose of those words (one transpose of rounded words
         * instead of two of fp32; the same bits). */
        int kb = s * 32, kc = K - kb;
        __mmask16 m0 = (__mmask16)(kc >= 16 ? 0xffff : kc <= 0 ? 0 : (1u << kc) - 1);
        __mmask16 m1 = (__mmask16)(kc >= 32 ? 0xffff : kc <= 16 ? 0 : (1u << (kc - 16)) - 1);
        __m512 r[16], c[16];
        for (int i = 0; i < 16; i++) {
            const float *row = src + (size_t)(n0 + i) * ld + kb;
            r[i] = i < cnt ? (__m512)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, row + 16),
                                                         _mm512_maskz_loadu_ps(m0, row))
                           : _mm512_setzero_ps();
        }
        mp_transpose16(r, c);
        for (int j = 0; j < 16; j++)
            _mm512_storeu_ps((float *)(pan + ((size_t)s * 32 + 2 * j) * 16), c[j]);
        return;
    }
    for (int r2 = 0; r2 < 16; r2++) {
        int k = s * 32 + 2 * r2;
        __m512 b0 = k < K ? _mm512_maskz_loadu_ps(nm, src + (size_t)k * ld + n0) : _mm512_setzero_ps();
        __m512 b1 = k + 1 < K ? _mm512_maskz_loadu_ps(nm, src + (size_t)(k + 1) * ld + n0)
                              : _mm512_setzero_ps();
        store_pairs_hw(pan + ((size_t)s * 32 + 2 * r2) * 16, b0, b1);
    }
}

/* Panel p, K slice s (32 rows) of packed B from fp32. */
MP_T512 static void pack_b_slice_avx512(kiln_dtype dt, bool trans, int K, int N, const float *src,
                                        int ld, uint16_t *pan, int kp, int p, int s)
{
    int n0 = p * 16, cnt = KILN_MP_MIN(16, N - n0);
    if (trans) {
        __m512 col[2][16];
        load_trans_slice(src, ld, K, n0, cnt, s, col);
        for (int r2 = 0; r2 < 16; r2++) {
            __m256i h[2], l[2];
            for (int q = 0; q < 2; q++) {
                int kk = 2 * r2 + q;
                split16(dt, col[kk / 16][kk % 16], &h[q], &l[q]);
            }
            store_pairs(pan + ((size_t)s * 32 + 2 * r2) * 16, h[0], h[1]);
            if (dt == KILN_DTYPE_F16) {
                store_pairs(pan + ((size_t)kp + s * 32 + 2 * r2) * 16, l[0], l[1]);
                store_pairs(pan + ((size_t)2 * kp + s * 32 + 2 * r2) * 16, h[0], h[1]);
            }
        }
        return;
    }
    for (int r2 = 0; r2 < 16; r2++) {
        int k = s * 32 + 2 * r2;
        __m256i h[2], l[2];
        for (int q = 0; q < 2; q++) {
            if (k + q >= K || cnt <= 0) {
                h[q] = l[q] = _mm256_setzero_si256();
                continue;
            }
            __m512 v = trans ? load16(src + (size_t)n0 * ld + k + q, (size_t)ld, cnt)
                             : load16(src + (size_t)(k + q) * ld + n0, 1, cnt);
            split16(dt, v, &h[q], &l[q]);
        }
        store_pairs(pan + ((size_t)s * 32 + 2 * r2) * 16, h[0], h[1]);
        if (dt == KILN_DTYPE_F16) {
            store_pairs(pan + ((size_t)kp + s * 32 + 2 * r2) * 16, l[0], l[1]);
            store_pairs(pan + ((size_t)2 * kp + s * 32 + 2 * r2) * 16, h[0], h[1]);
        }
    }
}
#endif

/* Converts one row of n fp32 values (stride st) to bf16 (dt = BF16) or to
 * the fp16 hi/lo pair, writing hi to h[] and lo to l[]. */
static void convert_row(kiln_dtype dt, const float *src, size_t st, int n,
                        uint16_t *h, uint16_t *l)
{
#if MP_X86
    if (mp_cpu_caps()->avx512f && mp_cpu_caps()->f16c) {
        convert_row_avx512(dt, src, st, n, h, l);
        return;
    }
#endif
    for (int i = 0; i < n; i++) {
        uint16_t a, b;
        split(dt, src[(size_t)i * st], &a, &b);
        h[i] = a;
        if (l) l[i] = b;
    }
}

/* Zeroes rows m0..m1 of packed A (the padding rows of the last group). */
static void zero_a_rows(uint16_t *dst, int kk, int m0, int m1)
{
    for (int m = m0; m < m1; m++)
        for (int k = 0; k < kk; k += 32) memset(dst + a_off(kk, m, k), 0, 64);
}

void mp_pack_a(kiln_dtype dt, bool trans, int M, int K, const float *src,
               int ld, uint16_t *dst)
{
    KILN_ASSERT(dt == KILN_DTYPE_BF16 || dt == KILN_DTYPE_F16);
    int kp = round_up(K, 32), kk = packed_k(dt, K), mp = round_up(M, 32);
#if MP_X86
    if (trans && mp_cpu_caps()->avx512f && mp_cpu_caps()->f16c) {
        /* k beyond K within the last 32-block is written as zeros by the
         * block itself (masked loads); rows beyond M are zeroed here. */
        #pragma omp parallel for schedule(static)
        for (int k0 = 0; k0 < kp; k0 += 32) pack_a_trans_kblock(dt, M, K, src, ld, dst, kp, kk, k0);
        zero_a_rows(dst, kk, M, mp);
        return;
    }
#endif
    #pragma omp parallel for schedule(static)
    for (int m = 0; m < mp; m++) {
        if (m >= M) {
            zero_a_rows(dst, kk, m, m + 1);
            continue;
        }
        const float *s = trans ? src + m : src + (size_t)m * ld;
        size_t st = trans ? (size_t)ld : 1;
#if MP_X86
        if (dt == KILN_DTYPE_BF16 && st == 1 && mp_cpu_caps()->avx512f) {
            pack_a_row_bf16(s, K, dst, kk, m);
            continue;
        }
#endif
        for (int k0 = 0; k0 < kp; k0 += 32) {
            /* A' = [hi | hi | lo] for fp16: pairs with B' = [hi; lo; hi]. */
            uint16_t h[32] = {0}, l[32] = {0};
            int cnt = KILN_MP_MIN(32, K - k0);
            convert_row(dt, s + (size_t)k0 * st, st, cnt, h, dt == KILN_DTYPE_F16 ? l : NULL);
            memcpy(dst + a_off(kk, m, k0), h, 64);
            if (dt == KILN_DTYPE_F16) {
                memcpy(dst + a_off(kk, m, kp + k0), h, 64);
                memcpy(dst + a_off(kk, m, 2 * kp + k0), l, 64);
            }
        }
    }
}

static void pack_b_slice_ref(kiln_dtype dt, bool trans, int K, int N, const float *src,
                             int ld, uint16_t *pan, int kp, int p, int s)
{
    uint16_t hi[32][16], lo[32][16];
    for (int c = 0; c < 16; c++) {
        int n = p * 16 + c;
        for (int r = 0; r < 32; r++) {
            int k = s * 32 + r;
            if (n < N && k < K) {
                float v = trans ? src[(size_t)n * ld + k] : src[(size_t)k * ld + n];
                split(dt, v, &hi[r][c], &lo[r][c]);
            } else {
                hi[r][c] = lo[r][c] = 0;
            }
        }
    }
    /* Interleave pairs of K: row (k/2) of the panel holds B[k][c],
     * B[k+1][c] for c = 0..15. Parts: [hi; lo; hi] for fp16. */
    for (int part = 0; part < (dt == KILN_DTYPE_F16 ? 3 : 1); part++) {
        uint16_t (*v)[16] = part == 1 ? lo : hi;
        uint16_t *o = pan + ((size_t)part * kp + (size_t)s * 32) * 16;
        for (int r2 = 0; r2 < 16; r2++)
            for (int c = 0; c < 16; c++) {
                o[r2 * 32 + 2 * c] = v[2 * r2][c];
                o[r2 * 32 + 2 * c + 1] = v[2 * r2 + 1][c];
            }
    }
}

void mp_pack_b(kiln_dtype dt, bool trans, int K, int N, const float *src,
               int ld, uint16_t *dst)
{
    KILN_ASSERT(dt == KILN_DTYPE_BF16 || dt == KILN_DTYPE_F16);
    int kp = round_up(K, 32), kk = packed_k(dt, K), np = round_up(N, 32);
    int npanel = np / 16, nslice = kp / 32;
    bool vec = false, hw = false;
#if MP_X86
    vec = mp_cpu_caps()->avx512f && mp_cpu_caps()->f16c;
    hw = vec && dt == KILN_DTYPE_BF16 && mp_cpu_caps()->avx512_bf16;
#endif
    /* One task per (panel, 32-row slice of K), in the order that reads the
     * source along its rows: slice by slice when B's rows are the source's
     * (a panel alone would walk down a 64-byte column, a page per row),
     * panel by panel when transposed (a panel's 16 source rows). */
    #pragma omp parallel for schedule(static) collapse(2)
    for (int a = 0; a < (trans ? npanel : nslice); a++) {
        for (int b = 0; b < (trans ? nslice : npanel); b++) {
            int p = trans ? a : b, s = trans ? b : a;
            uint16_t *pan = dst + (size_t)p * kk * 16;
#if MP_X86
            if (hw) {
                pack_b_slice_bf16hw(trans, K, N, src, ld, pan, p, s);
                continue;
            }
            if (vec) {
                pack_b_slice_avx512(dt, trans, K, N, src, ld, pan, kp, p, s);
                continue;
            }
#endif
            pack_b_slice_ref(dt, trans, K, N, src, ld, pan, kp, p, s);
        }
    }
    (void)vec, (void)hw;
}

/* ---- portable kernel -------------------------------------------------- */

static void gemm_ref(int M, int N, int Kp, const uint16_t *pa,
                     const uint16_t *pb, float *C, int ldc, bool accumulate,
                     const float *bias, bool transc)
{
    #pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            const uint16_t *pan = pb + (size_t)(n / 16) * Kp * 16;
            int c = n % 16;
            float acc = 0;
            for (int k = 0; k < Kp; k += 2) {
                const uint16_t *row = pan + (size_t)(k / 2) * 32;
                const uint16_t *a = pa + a_off(Kp, m, k);
                acc += bf16_to_f32(a[0]) * bf16_to_f32(row[2 * c]);
                acc += bf16_to_f32(a[1]) * bf16_to_f32(row[2 * c + 1]);
            }
            float *o = transc ? C + (size_t)n * ldc + m : C + (size_t)m * ldc + n;
            *o = (accumulate ? *o : 0.f) + acc + (bias ? bias[n] : 0.f);
        }
    }
}

/* ---- AVX512_BF16 kernel ----------------------------------------------- */

#if MP_X86
/* 8 rows x 32 columns per block; the B rows come straight from the packed
 * panels, the A pairs are broadcast. A function of its own so that it keeps
 * its target attribute under clang, which outlines the body of a parallel
 * loop into a function without it. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void avx512_block(int M, int N, int Kp, const uint16_t *pa, const uint16_t *pb, float *C,
                         int ldc, bool accumulate, const float *bias, bool transc, int i0, int j0)
{
    const uint16_t *p0 = pb + (size_t)(j0 / 16) * Kp * 16;
    const uint16_t *p1 = p0 + (size_t)Kp * 16;
    __m512 acc[8][2];
    for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int k2 = 0; k2 < Kp / 2; k2++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(p0 + (size_t)k2 * 32);
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(p1 + (size_t)k2 * 32);
        for (int r = 0; r < 8; r++) {
            uint32_t pair;
            memcpy(&pair, pa + a_off(Kp, i0 + r, 2 * k2), 4); /* rows padded to 32 */
            __m512bh av = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
        }
    }
    int rows = KILN_MP_MIN(8, M - i0);
    for (int r = 0; r < rows; r++) {
        for (int h = 0; h < 2; h++) {
            int n0 = j0 + 16 * h;
            if (n0 >= N) break;
            int cols = KILN_MP_MIN(16, N - n0);
            __mmask16 mk = (__mmask16)((1u << cols) - 1);
            __m512 v = acc[r][h];
            if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + n0));
            if (transc) {
                float t[16];
                _mm512_storeu_ps(t, v);
                for (int e = 0; e < cols; e++) {
                    float *o = C + (size_t)(n0 + e) * ldc + i0 + r;
                    *o = (accumulate ? *o : 0.f) + t[e];
                }
                continue;
            }
            float *o = C + (size_t)(i0 + r) * ldc + n0;
            if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, o));
            _mm512_mask_storeu_ps(o, mk, v);
        }
    }
}

static void gemm_avx512(int M, int N, int Kp, const uint16_t *pa, const uint16_t *pb, float *C,
                        int ldc, bool accumulate, const float *bias, bool transc)
{
    int mb = (M + 7) / 8, nb = (N + 31) / 32;
    #pragma omp parallel for schedule(static) collapse(2)
    for (int jb = 0; jb < nb; jb++)
        for (int ib = 0; ib < mb; ib++)
            avx512_block(M, N, Kp, pa, pb, C, ldc, accumulate, bias, transc, ib * 8, jb * 32);
}
#endif

void mp_gemm_packed(mp_backend be, kiln_dtype dt, int M, int N, int K,
                    const uint16_t *pa, const uint16_t *pb, float *C,
                    int ldc, bool accumulate, const float *bias)
{
    mp_gemm_packed_t(be, dt, M, N, K, pa, pb, C, ldc, accumulate, bias, false);
}

void mp_gemm_packed_t(mp_backend be, kiln_dtype dt, int M, int N, int K,
                      const uint16_t *pa, const uint16_t *pb, float *C,
                      int ldc, bool accumulate, const float *bias, bool transc)
{
    KILN_ASSERT(!(transc && bias));
    if (M <= 0 || N <= 0) return;
    int kk = packed_k(dt, K);
    if (be == MP_BACKEND_AUTO || !mp_backend_available(be)) be = mp_backend_best();
#if MP_X86
    if (be == MP_BACKEND_AMX) {
        mp_gemm_amx(M, N, kk, pa, pb, C, ldc, accumulate, bias, transc, NULL);
        return;
    }
    if (be == MP_BACKEND_AVX512) {
        gemm_avx512(M, N, kk, pa, pb, C, ldc, accumulate, bias, transc);
        return;
    }
#endif
    gemm_ref(M, N, kk, pa, pb, C, ldc, accumulate, bias, transc);
}

/* ---- linear layer ----------------------------------------------------- */

bool mp_weight_init(mp_weight *w, kiln_dtype dt, int OC, int C, bool in_out)
{
    memset(w, 0, sizeof *w);
    w->dt = dt;
    w->OC = OC;
    w->C = C;
    w->in_out = in_out;
    w->fwd = aligned_alloc(64, (mp_packb_elems(dt, C, OC) * 2 + 63) / 64 * 64);
    w->bwd = aligned_alloc(64, (mp_packb_elems(dt, OC, C) * 2 + 63) / 64 * 64);
    if (!w->fwd || !w->bwd) {
        mp_weight_free(w);
        return false;
    }
    return true;
}

void mp_weight_free(mp_weight *w)
{
    if (!w) return;
    free(w->fwd);
    free(w->bwd);
    w->fwd = w->bwd = NULL;
}

void mp_weight_refresh_fwd(mp_weight *w, const float *W)
{
    /* B = W' (K = C, N = OC): W (C, OC) as is, or W (OC, C) transposed. */
    mp_pack_b(w->dt, !w->in_out, w->C, w->OC, W, w->in_out ? w->OC : w->C, w->fwd);
}

void mp_weight_refresh_bwd(mp_weight *w, const float *W)
{
    /* B = W'^T (K = OC, N = C). */
    mp_pack_b(w->dt, w->in_out, w->OC, w->C, W, w->in_out ? w->OC : w->C, w->bwd);
}

void mp_weight_refresh(mp_weight *w, const float *W)
{
    mp_weight_refresh_fwd(w, W);
    mp_weight_refresh_bwd(w, W);
}

/* Rows of the strips mp_weight_refresh_strip packs: 32 for a bf16 weight
 * on a CPU with AVX512_BF16 whose sides are multiples of 32 (no padding in
 * either layout), else 0 (refresh the whole weight instead). */
int mp_weight_strip_rows(const mp_weight *w)
{
#if MP_X86
    int R = w->in_out ? w->C : w->OC, cols = w->in_out ? w->OC : w->C;
    if (w->dt == KILN_DTYPE_BF16 && mp_cpu_caps()->avx512_bf16 && R > 0 && cols > 0 && R % 32 == 0 &&
        cols % 32 == 0)
        return 32;
#endif
    (void)w;
    return 0;
}

#if MP_X86
/* W is stored row-major, R rows of `cols`: (C, OC) when in_out, else
 * (OC, C). One packed layout has K along W's rows (the "rows form": fwd
 * when in_out, bwd otherwise), the other K along its columns (the "cols
 * form"). Rows r0 .. r0 + 31 fill slice r0 / 32 of every panel of the rows
 * form and panels r0 / 16, r0 / 16 + 1 of the cols form: the same slices
 * mp_pack_b writes, by the same code, so the bytes are mp_pack_b's. */
MP_TBF static void refresh_strip_hw(mp_weight *w, const float *W, int r0)
{
    int R = w->in_out ? w->C : w->OC, cols = w->in_out ? w->OC : w->C;
    uint16_t *rows_form = w->in_out ? w->fwd : w->bwd; /* K = R, N = cols */
    uint16_t *cols_form = w->in_out ? w->bwd : w->fwd; /* K = cols, N = R */
    for (int p = 0; p < cols / 16; p++)
        pack_b_slice_bf16hw(false, R, cols, W, cols, rows_form + (size_t)p * R * 16, p, r0 / 32);
    for (int p = r0 / 16; p < r0 / 16 + 2; p++)
        for (int s = 0; s < cols / 32; s++)
            pack_b_slice_bf16hw(true, cols, R, W, cols, cols_form + (size_t)p * cols * 16, p, s);
}
#endif

void mp_weight_refresh_strip(mp_weight *w, const float *W, int r0)
{
    KILN_ASSERT(mp_weight_strip_rows(w) == 32 && r0 % 32 == 0);
#if MP_X86
    refresh_strip_hw(w, W, r0);
#endif
    (void)W, (void)r0;
}

static uint16_t *grow(uint16_t **p, size_t *cap, size_t need)
{
    if (need <= *cap) return *p;
    free(*p);
    size_t bytes = (need * 2 + 63) / 64 * 64;
    *p = aligned_alloc(64, bytes);
    *cap = *p ? need : 0;
    return *p;
}

static float *grow_f(float **p, size_t *cap, size_t need)
{
    if (need <= *cap) return *p;
    free(*p);
    *p = aligned_alloc(64, (need * 4 + 63) / 64 * 64);
    *cap = *p ? need : 0;
    return *p;
}

void mp_scratch_free(mp_scratch *s)
{
    if (!s) return;
    free(s->a);
    free(s->b);
    free(s->c);
    free(s->t);
    free(s->a2);
    free(s->t2);
    free(s->part);
    memset(s, 0, sizeof *s);
}

bool mp_linear_forward(mp_backend be, mp_scratch *s, const mp_weight *w,
                       const float *x, const float *b, int N, float *y)
{
    uint16_t *pa = grow(&s->a, &s->a_cap, mp_packa_elems(w->dt, N, w->C));
    if (!pa) return false;
    mp_pack_a(w->dt, false, N, w->C, x, w->C, pa);
    mp_gemm_packed(be, w->dt, N, w->OC, w->C, pa, w->fwd, y, w->OC, false, b);
    return true;
}

bool mp_linear_backward_x(mp_backend be, mp_scratch *s, const mp_weight *w,
                          const float *dy, int N, float *dx, bool accumulate)
{
    uint16_t *pa = grow(&s->a, &s->a_cap, mp_packa_elems(w->dt, N, w->OC));
    if (!pa) return false;
    mp_pack_a(w->dt, false, N, w->OC, dy, w->OC, pa);
    mp_gemm_packed(be, w->dt, N, w->C, w->OC, pa, w->bwd, dx, w->C, accumulate, NULL);
    return true;
}

bool mp_linear_backward_w(mp_backend be, mp_scratch *s, kiln_dtype dt,
                          bool in_out, const float *dy, const float *x,
                          int N, int OC, int C, float *dW)
{
    if (in_out) /* dW (C, OC) += x^T dy */
        return mp_gemm_f32io(be, s, dt, true, false, C, OC, N, x, C, dy, OC, dW, OC, true);
    return mp_gemm_f32io(be, s, dt, true, false, OC, C, N, dy, OC, x, C, dW, C, true);
}

/* The weight gradient of an (in, out) weight runs as dW = x^T dy, stored
 * as is (the transposed store of dy^T x cost ~25% more at the benchmark's
 * shapes), from dy packed over tokens; others as dW' = dy^T x. */
static bool w_tok(bool in_out, int act) { return in_out && act != MP_ACT_SWIGLU; }

/* dW (+)= the weight gradient from pt (packed A of dy^T, or with w_tok
 * packed B of dy over tokens) and the packed activation xp. */
static bool backward_w_from(mp_backend be, mp_scratch *s, bool in_out, const uint16_t *pt,
                            const uint16_t *xp, int act, int N, int OC, int C, float *dW,
                            bool acc)
{
    if (!dW) return true; /* a frozen weight: no gradient */
    if (w_tok(in_out, act)) {
        uint16_t *pxt = grow(&s->b, &s->b_cap, mp_packa_elems(KILN_DTYPE_BF16, C, N));
        if (!pxt) return false;
        mp_pack_a_tokens(pxt, xp, N, C, act);
        mp_gemm_packed(be, KILN_DTYPE_BF16, C, OC, N, pxt, pt, dW, OC, acc, NULL);
        return true;
    }
    uint16_t *pb = grow(&s->b, &s->b_cap, mp_packb_elems(KILN_DTYPE_BF16, N, C));
    if (!pb) return false;
    mp_pack_b_tokens(pb, xp, N, C, act); /* x: K = N tokens, C columns */
    mp_gemm_packed_t(be, KILN_DTYPE_BF16, OC, C, N, pt, pb, dW, in_out ? OC : C, acc, NULL, in_out);
    return true;
}

bool mp_linear_backward_w_packed(mp_backend be, mp_scratch *s, bool in_out,
                                 const float *dy, const uint16_t *xp, int act,
                                 int N, int OC, int C, float *dW)
{
    uint16_t *pt = grow(&s->t, &s->t_cap, mp_packa_elems(KILN_DTYPE_BF16, OC, N));
    if (!pt) return false;
    if (w_tok(in_out, act)) mp_pack_b(KILN_DTYPE_BF16, false, N, OC, dy, OC, pt); /* dy over tokens */
    else mp_pack_a(KILN_DTYPE_BF16, true, OC, N, dy, OC, pt);                     /* dy^T: (OC, N) */
    return backward_w_from(be, s, in_out, pt, xp, act, N, OC, C, dW, true);
}

bool mp_dy_tok(const mp_weight *w, int act) { return w_tok(w->in_out, act); }

bool mp_scratch_dy(mp_scratch *s, int N, int OC, bool bias, uint16_t **pa, uint16_t **pt,
                   float **part)
{
    *pa = grow(&s->a, &s->a_cap, mp_packa_elems(KILN_DTYPE_BF16, N, OC));
    *pt = grow(&s->t, &s->t_cap, mp_packa_elems(KILN_DTYPE_BF16, OC, N));
    *part = bias ? grow_f(&s->part, &s->part_cap, mp_pack_dy_part_floats(N, OC)) : NULL;
    return *pa && *pt && (!bias || *part);
}

bool mp_linear_backward_prepacked(mp_backend be, mp_scratch *s, const mp_weight *w,
                                  const uint16_t *pa, const uint16_t *pt, const uint16_t *xp,
                                  int act, int N, float *dW, bool dw_acc, float *dx)
{
    KILN_ASSERT(w->dt == KILN_DTYPE_BF16);
    if (!backward_w_from(be, s, w->in_out, pt, xp, act, N, w->OC, w->C, dW, dw_acc)) return false;
    mp_gemm_packed(be, KILN_DTYPE_BF16, N, w->C, w->OC, pa, w->bwd, dx, w->C, false, NULL);
    return true;
}

bool mp_linear_backward_packed(mp_backend be, mp_scratch *s, const mp_weight *w,
                               const float *dy, const uint16_t *xp, int act, int N,
                               float *dW, bool dw_acc, float *db, float *dx)
{
    uint16_t *pa, *pt;
    float *part;
    if (!mp_scratch_dy(s, N, w->OC, db != NULL, &pa, &pt, &part)) return false;
    mp_pack_dy(pa, pt, w_tok(w->in_out, act), db, part, dy, N, w->OC);
    return mp_linear_backward_prepacked(be, s, w, pa, pt, xp, act, N, dW, dw_acc, dx);
}

bool mp_gemm_packed_epi(mp_backend be, mp_scratch *s, int M, int N, int K, const uint16_t *pa,
                        const uint16_t *pb, const float *bias, const mp_epi *epi)
{
    if (M <= 0 || N <= 0) return true;
    if (be == MP_BACKEND_AUTO || !mp_backend_available(be)) be = mp_backend_best();
#if MP_X86
    if (be == MP_BACKEND_AMX) {
        mp_gemm_amx(M, N, packed_k(KILN_DTYPE_BF16, K), pa, pb, NULL, 0, false, bias, false, epi);
        return true;
    }
#endif
    /* The product into scratch, then the blocks through the epilogue. */
    int Mp = round_up(M, 32), Np = round_up(N, 32);
    size_t need = (size_t)Mp * Np;
    if (need > s->c_cap) {
        free(s->c);
        s->c = aligned_alloc(64, need * 4);
        s->c_cap = s->c ? need : 0;
        if (!s->c) return false;
    }
    mp_gemm_packed(be, KILN_DTYPE_BF16, M, N, K, pa, pb, s->c, Np, false, bias);
    #pragma omp parallel for schedule(static) collapse(2)
    for (int i0 = 0; i0 < Mp; i0 += 32)
        for (int j0 = 0; j0 < Np; j0 += 32) {
            float blk[32][32];
            for (int q = 0; q < 32; q++)
                for (int c = 0; c < 32; c++)
                    blk[q][c] = i0 + q < M && j0 + c < N ? s->c[(size_t)(i0 + q) * Np + j0 + c] : 0.0f;
            mp_epi_block(epi, blk, i0, j0);
        }
    return true;
}

bool mp_mlp_backward_packed(mp_backend be, mp_scratch *s, const mp_weight *w1,
                            const mp_weight *w2, const float *dy, const uint16_t *xp,
                            const uint16_t *hp, int act, int N, float *dW1, float *db1,
                            float *dW2, float *db2, float *dx, bool dw_acc)
{
    KILN_ASSERT(act == MP_ACT_NONE || act == MP_ACT_GELU);
    KILN_ASSERT(w1->dt == KILN_DTYPE_BF16 && w2->dt == KILN_DTYPE_BF16 && w1->OC == w2->C);
    int C = w1->C, F = w1->OC, OC = w2->OC;
    uint16_t *pa = grow(&s->a, &s->a_cap, mp_packa_elems(KILN_DTYPE_BF16, N, OC));
    uint16_t *pt = grow(&s->t, &s->t_cap, mp_packa_elems(KILN_DTYPE_BF16, OC, N));
    uint16_t *pa2 = grow(&s->a2, &s->a2_cap, mp_packa_elems(KILN_DTYPE_BF16, N, F));
    uint16_t *pt2 = grow(&s->t2, &s->t2_cap, mp_packa_elems(KILN_DTYPE_BF16, F, N));
    size_t np = (size_t)round_up(N, 32) / 32 * round_up(F > OC ? F : OC, 32);
    float *part = grow_f(&s->part, &s->part_cap, np);
    if (!pa || !pt || !pa2 || !pt2 || !part) return false;
    /* second layer: its gradients, and its input gradient through the
     * activation's derivative straight into both packed forms */
    mp_pack_dy(pa, pt, w_tok(w2->in_out, act), db2, part, dy, N, OC);
    if (!backward_w_from(be, s, w2->in_out, pt, hp, act, N, OC, F, dW2, dw_acc)) return false;
    mp_epi e = {.kind = MP_EPI_DACT, .act = act, .M = N, .N = F, .hp = hp, .pa = pa2, .pt = pt2,
                .tok = w_tok(w1->in_out, MP_ACT_NONE), .bpart = db1 ? part : NULL};
    if (!mp_gemm_packed_epi(be, s, N, F, OC, pa, w2->bwd, NULL, &e)) return false;
    if (db1) mp_epi_bias_sum(&e, db1);
    /* first layer */
    if (!backward_w_from(be, s, w1->in_out, pt2, xp, MP_ACT_NONE, N, F, C, dW1, dw_acc))
        return false;
    mp_gemm_packed(be, KILN_DTYPE_BF16, N, C, F, pa2, w1->bwd, dx, C, false, NULL);
    return true;
}

bool mp_gemm_f32io(mp_backend be, mp_scratch *s, kiln_dtype dt, bool ta,
                   bool tb, int M, int N, int K, const float *A, int lda,
                   const float *B, int ldb, float *C, int ldc,
                   bool accumulate)
{
    uint16_t *pa = grow(&s->a, &s->a_cap, mp_packa_elems(dt, M, K));
    uint16_t *pb = grow(&s->b, &s->b_cap, mp_packb_elems(dt, K, N));
    if (!pa || !pb) return false;
    mp_pack_a(dt, ta, M, K, A, lda, pa);
    mp_pack_b(dt, tb, K, N, B, ldb, pb);
    mp_gemm_packed(be, dt, M, N, K, pa, pb, C, ldc, accumulate, NULL);
    return true;
}

bool mp_sgemm(mp_backend be, mp_scratch *s, kiln_dtype dt, bool ta, bool tb,
              int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc)
{
    if (M <= 0 || N <= 0) return true;
    if (K <= 0 || alpha == 0.0f) {
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float *o = C + (size_t)i * ldc + j;
                *o = beta == 0.0f ? 0.0f : beta * *o;
            }
        return true;
    }
    if (alpha == 1.0f && (beta == 0.0f || beta == 1.0f))
        return mp_gemm_f32io(be, s, dt, ta, tb, M, N, K, A, lda, B, ldb, C, ldc, beta == 1.0f);
    size_t need = (size_t)M * N;
    if (need > s->c_cap) {
        free(s->c);
        s->c = aligned_alloc(64, (need * 4 + 63) / 64 * 64);
        s->c_cap = s->c ? need : 0;
        if (!s->c) return false;
    }
    if (!mp_gemm_f32io(be, s, dt, ta, tb, M, N, K, A, lda, B, ldb, s->c, N, false)) return false;
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < M; i++) {
        float *o = C + (size_t)i * ldc;
        const float *t = s->c + (size_t)i * N;
        if (beta == 0.0f)
            for (int j = 0; j < N; j++) o[j] = alpha * t[j];
        else
            for (int j = 0; j < N; j++) o[j] = alpha * t[j] + beta * o[j];
    }
    return true;
}
