/*
 * bf16_act.c — the activation kernels of bf16 training (model/pass.c),
 * where every input of a matrix product is stored once, in bf16, already
 * in the packed-A layout the AMX kernel reads (bf16.h):
 *   - the MLP's fused epilogue: the fc product's fp32 output x becomes the
 *     stored pre-activation bf16(x) and the packed input of the next
 *     product act(bf16(x)) in one pass (GELU or SwiGLU);
 *   - its backward from the stored bf16 pre-activation;
 *   - the right-hand operand of a weight gradient over tokens (packed B
 *     with K = tokens) straight from a packed activation, the activation
 *     function applied on the way for the MLP's second product, so that
 *     act(x) is never stored;
 *   - unpacking to fp32 and the column sums of a bias gradient.
 * The activation function of bf16 training is evaluated on the bf16-rounded
 * pre-activation in forward and backward alike (what torch.autocast does:
 * the fc product's output is a bf16 tensor).
 */
#include "kernels/x86/bf16.h"

#include "base/base.h"

#include <math.h>
#include <pthread.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif
#if defined(__AVX512F__) && !defined(__AVX512BW__)
#error "bf16_act.c: an AVX-512 build needs AVX512BW too (every AVX-512 CPU since Skylake-SP has it); ARCH= builds the portable code"
#endif
#ifdef __AVX512F__
#include "kernels/x86/simd.h"
#endif

#define GELU_K 0.7978845608028654f
#define GELU_A 0.044715f

static inline int rup32(int x) { return (x + 31) / 32 * 32; }

static inline float gelu1(float x)
{
    return 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x)));
}

static inline float gelu_grad1(float x)
{
    float th = tanhf(GELU_K * (x + GELU_A * x * x * x));
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * GELU_K * (1.0f + 3.0f * GELU_A * x * x);
}

static inline float silu1(float g) { return g / (1.0f + expf(-g)); }

static inline float bf(float x) { return bf16_to_f32(f32_to_bf16(x)); }

#ifdef __AVX512F__
#define v_f2bf mp_f32x16_to_bf16

static inline __m512 v_bf2f(__m256i h)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 v_gelu(__m512 x)
{
    __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(GELU_K), _mm512_fmadd_ps(_mm512_set1_ps(GELU_A), x3, x));
    __m512 hx = _mm512_mul_ps(_mm512_set1_ps(0.5f), x);
    return _mm512_fmadd_ps(hx, vtanh(u), hx);
}

static inline __m512 v_gelu_grad(__m512 x)
{
    const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
    __m512 x2 = _mm512_mul_ps(x, x);
    __m512 u = _mm512_mul_ps(_mm512_set1_ps(GELU_K),
                             _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(GELU_A), x2), x, x));
    __m512 t = vtanh(u);
    __m512 sech2 = _mm512_fnmadd_ps(t, t, one);
    __m512 du = _mm512_mul_ps(_mm512_set1_ps(GELU_K),
                              _mm512_fmadd_ps(_mm512_set1_ps(3.0f * GELU_A), x2, one));
    return _mm512_fmadd_ps(_mm512_mul_ps(half, x), _mm512_mul_ps(sech2, du),
                           _mm512_mul_ps(half, _mm512_add_ps(one, t)));
}

/* GELU and its derivative at every bf16 value, made by v_gelu and
 * v_gelu_grad themselves: a lookup (a gather from 128 + 256 KiB that stay
 * in L2) gives the same bits as the evaluation at ~1/3 of its cost. Every
 * input of GELU in bf16 training is a bf16 value (the stored
 * pre-activation). */
static uint16_t g_gelu_bf[65536 + 32] __attribute__((aligned(64)));
static float g_gelu_d[65536] __attribute__((aligned(64)));
static pthread_once_t g_gelu_once = PTHREAD_ONCE_INIT;

static void gelu_tabs_init(void)
{
    for (int h = 0; h < 65536; h += 16) {
        __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_add_epi32(_mm512_set1_epi32(h), _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7,
                                                                    6, 5, 4, 3, 2, 1, 0)),
            16));
        _mm256_storeu_si256((__m256i *)(g_gelu_bf + h), v_f2bf(v_gelu(x)));
        _mm512_storeu_ps(g_gelu_d + h, v_gelu_grad(x));
    }
}

static inline void gelu_tabs(void) { pthread_once(&g_gelu_once, gelu_tabs_init); }

/* bf16(GELU(x)) of 16 bf16 values (the tables must be made). */
static inline __m256i v_gelu_bf(__m256i h)
{
    __m512i g = _mm512_i32gather_epi32(_mm512_cvtepu16_epi32(h), (const void *)g_gelu_bf, 2);
    return _mm512_cvtepi32_epi16(g);
}

/* GELU'(x) of 16 bf16 values, fp32. */
static inline __m512 v_gelu_grad_bf(__m256i h)
{
    return _mm512_i32gather_ps(_mm512_cvtepu16_epi32(h), g_gelu_d, 4);
}

static inline __mmask16 v_mask(int cnt)
{
    return cnt >= 16 ? (__mmask16)0xffff : cnt <= 0 ? 0 : (__mmask16)((1u << cnt) - 1);
}
#endif

/* ---- unpacking ---------------------------------------------------------- */

void mp_unpack_a(float *out, int ldo, const uint16_t *pa, int M, int K)
{
    int kk = rup32(K);
    #pragma omp parallel for schedule(static)
    for (int m = 0; m < M; m++)
        for (int k0 = 0; k0 < K; k0 += 32) {
            const uint16_t *s = pa + mp_packa_off(kk, m, k0);
            int cnt = K - k0 < 32 ? K - k0 : 32;
            for (int i = 0; i < cnt; i++) out[(size_t)m * ldo + k0 + i] = bf16_to_f32(s[i]);
        }
}

/* ---- MLP activation: forward epilogue and backward ---------------------- */

/* One row: x (FH fp32) -> xp row (bf16 of x), ap row (act of bf16 x). */
static void act_pack_row(uint16_t *xp, int kx, uint16_t *ap, int ka, const float *x, int m, int F,
                         int kind)
{
    int FH = kind == MP_ACT_SWIGLU ? 2 * F : F;
    for (int k0 = 0; k0 < rup32(FH); k0 += 32) {
        int cnt = FH - k0 < 32 ? FH - k0 : 32;
        uint16_t *o = xp + mp_packa_off(kx, m, k0);
#ifdef __AVX512F__
        __m256i lo = v_f2bf(_mm512_maskz_loadu_ps(v_mask(cnt), x + k0));
        __m256i hi = v_f2bf(_mm512_maskz_loadu_ps(v_mask(cnt - 16), x + k0 + 16));
        _mm512_storeu_si512(o, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
#else
        for (int i = 0; i < 32; i++) o[i] = i < cnt ? f32_to_bf16(x[k0 + i]) : 0;
#endif
    }
    for (int k0 = 0; k0 < rup32(F); k0 += 32) {
        uint16_t h[32];
        int cnt = F - k0 < 32 ? F - k0 : 32, i = 0;
#ifdef __AVX512F__
        if (kind == MP_ACT_GELU) {
            for (; i < cnt; i += 16) {
                __mmask16 mk = v_mask(cnt - i);
                __m512 v = v_bf2f(v_f2bf(_mm512_maskz_loadu_ps(mk, x + k0 + i)));
                _mm256_storeu_si256((__m256i *)(h + i), v_f2bf(_mm512_maskz_mov_ps(mk, v_gelu(v))));
            }
        } else {
            for (; i < cnt; i += 16) {
                __mmask16 mk = v_mask(cnt - i);
                __m512 g = v_bf2f(v_f2bf(_mm512_maskz_loadu_ps(mk, x + k0 + i)));
                __m512 u = v_bf2f(v_f2bf(_mm512_maskz_loadu_ps(mk, x + F + k0 + i)));
                __m512 a = _mm512_mul_ps(_mm512_mul_ps(g, vsigmoid(g)), u);
                _mm256_storeu_si256((__m256i *)(h + i), v_f2bf(_mm512_maskz_mov_ps(mk, a)));
            }
        }
        for (int j = cnt; j < 32; j++) h[j] = 0;
#endif
        for (; i < cnt; i++)
            h[i] = f32_to_bf16(kind == MP_ACT_GELU ? gelu1(bf(x[k0 + i]))
                                                         : silu1(bf(x[k0 + i])) * bf(x[F + k0 + i]));
        for (int j = cnt; j < 32; j++) h[j] = 0;
        memcpy(ap + mp_packa_off(ka, m, k0), h, 64);
    }
}

void mp_act_pack(uint16_t *xp, uint16_t *ap, const float *x, int N, int F, int kind)
{
    int FH = kind == MP_ACT_SWIGLU ? 2 * F : F, kx = rup32(FH), ka = rup32(F);
    #pragma omp parallel for schedule(static)
    for (int m = 0; m < rup32(N); m++) {
        if (m >= N) {
            for (int k0 = 0; k0 < kx; k0 += 32) memset(xp + mp_packa_off(kx, m, k0), 0, 64);
            for (int k0 = 0; k0 < ka; k0 += 32) memset(ap + mp_packa_off(ka, m, k0), 0, 64);
            continue;
        }
        act_pack_row(xp, kx, ap, ka, x + (size_t)m * FH, m, F, kind);
    }
}

void mp_act_bwd(float *dinp, const uint16_t *xp, const float *dout, int N, int F, int kind)
{
    int FH = kind == MP_ACT_SWIGLU ? 2 * F : F, kx = rup32(FH);
    #pragma omp parallel for schedule(static)
    for (int m = 0; m < N; m++) {
        const float *d = dout + (size_t)m * F;
        float *o = dinp + (size_t)m * FH;
        for (int k0 = 0; k0 < F; k0 += 32) {
            int cnt = F - k0 < 32 ? F - k0 : 32, i = 0;
            const uint16_t *xs = xp + mp_packa_off(kx, m, k0);
#ifdef __AVX512F__
            if (kind == MP_ACT_GELU) {
                for (; i + 16 <= cnt; i += 16) {
                    __m512 x = v_bf2f(_mm256_loadu_si256((const __m256i *)(xs + i)));
                    _mm512_storeu_ps(o + k0 + i, _mm512_mul_ps(v_gelu_grad(x), _mm512_loadu_ps(d + k0 + i)));
                }
            }
#endif
            for (; i < cnt; i++) {
                float dv = d[k0 + i];
                if (kind == MP_ACT_GELU) {
                    o[k0 + i] = gelu_grad1(bf16_to_f32(xs[i])) * dv;
                } else {
                    float g = bf16_to_f32(xs[i]);
                    float u = bf16_to_f32(xp[mp_packa_off(kx, m, F + k0 + i)]);
                    float s = 1.0f / (1.0f + expf(-g));
                    o[F + k0 + i] = dv * g * s;
                    o[k0 + i] = dv * u * s * (1.0f + g * (1.0f - s));
                }
            }
        }
    }
}

/* ---- weight-gradient operand over tokens -------------------------------- */

/* 16 values of row t, columns c0..c0+15 (those < ncols; the rest 0) of
 * act(X), X packed with packed K kx, as fp32. */
static inline void cols16(float *v, const uint16_t *xp, int kx, int t, int c0, int ncols, int F,
                          int kind)
{
    for (int i = 0; i < 16; i++) {
        int c = c0 + i;
        if (c >= ncols) {
            v[i] = 0;
            continue;
        }
        float x = bf16_to_f32(xp[mp_packa_off(kx, t, c)]);
        if (kind == MP_ACT_GELU) x = bf16_to_f32(f32_to_bf16(gelu1(x)));
        else if (kind == MP_ACT_SWIGLU)
            x = bf16_to_f32(f32_to_bf16(
                silu1(x) * bf16_to_f32(xp[mp_packa_off(kx, t, F + c)])));
        v[i] = x;
    }
}

void mp_pack_b_tokens(uint16_t *pb, const uint16_t *xp, int M, int K, int kind)
{
    /* K = the columns of act(X) (F for the MLP's activations); the packed
     * X has 2K columns (gate | up) for SwiGLU. */
    int ncols = K, kx = rup32(kind == MP_ACT_SWIGLU ? 2 * K : K), kb = rup32(M);
    int npanel = rup32(K) / 16;
#ifdef __AVX512F__
    if (kind == MP_ACT_GELU) gelu_tabs();
#endif
    #pragma omp parallel for schedule(static)
    for (int p = 0; p < npanel; p++) {
        uint16_t *pan = pb + (size_t)p * kb * 16;
        int c0 = p * 16;
        for (int r2 = 0; r2 < kb / 2; r2++) {
            int t = 2 * r2;
            uint16_t *o = pan + (size_t)r2 * 32;
#ifdef __AVX512F__
            if (kind != MP_ACT_SWIGLU && c0 + 16 <= ncols) {
                /* rows t and t + 1 are zero padding beyond M in packed X */
                __m256i r0 = _mm256_loadu_si256((const __m256i *)(xp + mp_packa_off(kx, t, c0)));
                __m256i r1 = _mm256_loadu_si256((const __m256i *)(xp + mp_packa_off(kx, t + 1, c0)));
                if (kind == MP_ACT_GELU) {
                    r0 = v_gelu_bf(r0);
                    r1 = v_gelu_bf(r1);
                }
                _mm512_storeu_si512(
                    o, mp_pairs16(_mm512_inserti64x4(_mm512_castsi256_si512(r0), r1, 1)));
                continue;
            }
#endif
            float a[16], b[16];
            cols16(a, xp, kx, t, c0, ncols, K, kind);
            cols16(b, xp, kx, t + 1, c0, ncols, K, kind);
            for (int i = 0; i < 16; i++) {
                o[2 * i] = t < M ? f32_to_bf16(a[i]) : 0;
                o[2 * i + 1] = t + 1 < M ? f32_to_bf16(b[i]) : 0;
            }
        }
    }
}

/* ---- bias gradient ------------------------------------------------------- */

void mp_bias_grad(float *db, const float *dout, int N, int OC)
{
    /* fp32 column sums, each column summed over the rows in order: the
     * columns are split between the threads (so the result does not depend
     * on their number) and each thread streams the rows front to back with
     * its accumulators in L1. */
    #pragma omp parallel
    {
        int nt = omp_get_num_threads(), t = omp_get_thread_num();
        int per = (OC + nt - 1) / nt;
        per = (per + 63) / 64 * 64;
        int j0 = t * per, j1 = j0 + per < OC ? j0 + per : OC;
        for (int b0 = j0; b0 < j1; b0 += 256) {
            int b1 = b0 + 256 < j1 ? b0 + 256 : j1;
            float acc[256] __attribute__((aligned(64))) = {0};
            for (int n = 0; n < N; n++) {
                const float *d = dout + (size_t)n * OC;
#ifdef __AVX512F__
                int j = b0;
                for (; j + 16 <= b1; j += 16)
                    _mm512_store_ps(acc + j - b0, _mm512_add_ps(_mm512_load_ps(acc + j - b0),
                                                                _mm512_loadu_ps(d + j)));
                for (; j < b1; j++) acc[j - b0] += d[j];
#else
                for (int j = b0; j < b1; j++) acc[j - b0] += d[j];
#endif
            }
            for (int j = b0; j < b1; j++) db[j] += acc[j - b0];
        }
    }
}

/* ---- the output gradient of a linear layer, read once --------------------- */

#ifdef __AVX512F__
/* One 64-byte row of packed bf16 from 32 floats (lo = the first 16). */
static inline __m512i v_row_bf16(__m512 lo, __m512 hi)
{
#ifdef __AVX512BF16__
    /* VCVTNE2PS2BF16: round to nearest even like mp_f32x16_to_bf16; it
     * flushes fp32 subnormals (|x| < 1.2e-38) to zero. */
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
#else
    return _mm512_inserti64x4(_mm512_castsi256_si512(v_f2bf(lo)), v_f2bf(hi), 1);
#endif
}

static inline void v_put_row(uint16_t *dst, __m512i v) { _mm512_storeu_si512(dst, v); }

/* 32 rows of 32 bf16 (row t in w[t]) -> the transpose, in place: w[c] =
 * column c over the 32 rows. Rows 2j, 2j+1 interleave into 32-bit words
 * (word c = their column c; the lane fix puts columns 0-15 in p0, 16-31
 * in p1), then two 16 x 16 transposes of the words: ~190 instructions,
 * about half of transposing the block widened to fp32. */
static inline void v_transpose32_u16(__m512i w[32])
{
    const __m512i i0 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
    const __m512i i1 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    __m512 p0[16], p1[16], c0[16], c1[16];
    for (int j = 0; j < 16; j++) {
        __m512i lo = _mm512_unpacklo_epi16(w[2 * j], w[2 * j + 1]);
        __m512i hi = _mm512_unpackhi_epi16(w[2 * j], w[2 * j + 1]);
        p0[j] = _mm512_castsi512_ps(_mm512_permutex2var_epi64(lo, i0, hi));
        p1[j] = _mm512_castsi512_ps(_mm512_permutex2var_epi64(lo, i1, hi));
    }
    mp_transpose16(p0, c0);
    mp_transpose16(p1, c1);
    for (int c = 0; c < 16; c++) {
        w[c] = _mm512_castps_si512(c0[c]);
        w[16 + c] = _mm512_castps_si512(c1[c]);
    }
}

/* The 32 bf16 rows w (rows m0.., columns c0..) as 32 rows of the packed A
 * of their transpose (packed K kk): row c0 + c holds column c over rows
 * m0..m0+31. */
static inline void put_rows_t(uint16_t *pt, int kk, int c0, int m0, __m512i w[32])
{
    v_transpose32_u16(w);
    for (int c = 0; c < 32; c++) v_put_row(pt + mp_packa_off(kk, c0 + c, m0), w[c]);
}

/* The same from a 32 x 32 fp32 block r[row half][column half][row],
 * rounded to bf16 row by row first (the same bits as rounding it after
 * the transpose, in half the shuffles). */
static inline void put_block_t(uint16_t *pt, int kk, int c0, int m0, __m512 r[2][2][16])
{
    __m512i w[32];
    for (int t = 0; t < 32; t++) w[t] = v_row_bf16(r[t / 16][0][t % 16], r[t / 16][1][t % 16]);
    put_rows_t(pt, kk, c0, m0, w);
}

/* The same block as packed B over its rows (the K of a weight gradient
 * over tokens, row stride kb = the packed K): panel (c0 + c) / 16 gets
 * the pairs (row m0 + 2i, row m0 + 2i + 1) of its 16 columns. */
static inline void put_block_pairs(uint16_t *pb, int kb, int c0, int m0, __m512 r[2][2][16])
{
    for (int h = 0; h < 2; h++) {
        uint16_t *pan = pb + (size_t)(c0 / 16 + h) * kb * 16 + (size_t)m0 * 16;
        for (int i = 0; i < 16; i++) {
            int q = 2 * i;
            __m512i v = v_row_bf16(r[q / 16][h][q % 16], r[(q + 1) / 16][h][(q + 1) % 16]);
            v_put_row(pan + (size_t)i * 32, mp_pairs16(v));
        }
    }
}
#else
/* Element (m, c) of a packed B with K = rows (m), row stride kb: the pair
 * layout of bf16.h. */
static inline size_t pb_off(int kb, int m, int c)
{
    return (size_t)(c / 16) * kb * 16 + (size_t)(m / 2) * 32 + (size_t)(c % 16) * 2 + (size_t)(m % 2);
}
#endif

size_t mp_pack_dy_part_floats(int N, int OC) { return (size_t)rup32(N) / 32 * rup32(OC); }

void mp_pack_dy_block(uint16_t *pa, uint16_t *pt, bool tok, float *bpart, const float *src,
                      size_t ld, int rows, int cols, int n0, int c0, int np, int op)
{
#ifdef __AVX512F__
    __mmask16 m0 = v_mask(cols), m1 = v_mask(cols - 16);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 r[2][2][16]; /* [token half][channel half][token] */
    for (int t = 0; t < 32; t++) {
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        if (t < rows) {
            const float *d = src + (size_t)t * ld;
            a = _mm512_maskz_loadu_ps(m0, d);
            b = _mm512_maskz_loadu_ps(m1, d + 16);
            acc0 = _mm512_add_ps(acc0, a);
            acc1 = _mm512_add_ps(acc1, b);
        }
        v_put_row(pa + mp_packa_off(op, n0 + t, c0), v_row_bf16(a, b));
        r[t / 16][0][t % 16] = a;
        r[t / 16][1][t % 16] = b;
    }
    if (tok) put_block_pairs(pt, np, c0, n0, r);
    else put_block_t(pt, np, c0, n0, r);
    if (bpart) {
        _mm512_storeu_ps(bpart, acc0);
        _mm512_storeu_ps(bpart + 16, acc1);
    }
#else
    float acc[32] = {0};
    for (int t = 0; t < 32; t++)
        for (int j = 0; j < 32; j++) {
            float v = t < rows && j < cols ? src[(size_t)t * ld + j] : 0.0f;
            uint16_t h = f32_to_bf16(v);
            acc[j] += v;
            pa[mp_packa_off(op, n0 + t, c0 + j)] = h;
            pt[tok ? pb_off(np, n0 + t, c0 + j) : mp_packa_off(np, c0 + j, n0 + t)] = h;
        }
    if (bpart) memcpy(bpart, acc, sizeof acc);
#endif
}

void mp_pack_dy_bias(float *db, const float *part, int N, int OC)
{
    int np = rup32(N), op = rup32(OC);
    #pragma omp parallel for schedule(static)
    for (int j = 0; j < OC; j++) {
        float acc = 0;
        for (int b = 0; b < np / 32; b++) acc += part[(size_t)b * op + j];
        db[j] += acc;
    }
}

void mp_pack_dy(uint16_t *pa, uint16_t *pt, bool tok, float *db, float *part, const float *dy,
                int N, int OC)
{
    /* One task per block of 32 tokens (rows of dy, read in order), each
     * 32 x 32 block becoming 32 rows of pa (one 64-byte tile row each) and
     * 32 rows of pt (transposed as 16-bit words), or, tok, 16 pair rows in
     * each of its two panels. The bias gradient: column sums per block
     * into part, then summed over the blocks in order, so it does not
     * depend on the number of threads. Padding (rows and columns up to
     * multiples of 32) is written as zeros in both. */
    int np = rup32(N), op = rup32(OC);
    KILN_ASSERT(!db || part);
    #pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < np; n0 += 32)
        for (int c0 = 0; c0 < op; c0 += 32)
            mp_pack_dy_block(pa, pt, tok, db ? part + (size_t)(n0 / 32) * op + c0 : NULL,
                             dy + (size_t)n0 * OC + c0, (size_t)OC, N - n0, OC - c0, n0, c0, np, op);
    if (db) mp_pack_dy_bias(db, part, N, OC);
}

/* ---- epilogues of the AMX products ---------------------------------------- */

void mp_epi_block(const mp_epi *e, const float blk[32][32], int i0, int j0)
{
    int M = e->M, N = e->N, kn = rup32(N);
#ifdef __AVX512F__
    if (e->act == MP_ACT_GELU) gelu_tabs();
    __mmask16 m0 = v_mask(N - j0), m1 = v_mask(N - j0 - 16);
    if (e->kind == MP_EPI_RES) {
        for (int r = 0; r < 32 && i0 + r < M; r++) {
            size_t o = (size_t)(i0 + r) * N + j0;
            __m512 a = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, blk[r]), _mm512_maskz_loadu_ps(m0, e->res + o));
            __m512 b = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, blk[r] + 16),
                                     _mm512_maskz_loadu_ps(m1, e->res + o + 16));
            _mm512_mask_storeu_ps(e->out + o, m0, a);
            _mm512_mask_storeu_ps(e->out + o + 16, m1, b);
        }
        return;
    }
    if (e->kind == MP_EPI_ROWS) {
        __mmask32 mw = (__mmask32)m0 | (__mmask32)m1 << 16;
        for (int r = 0; r < 32 && i0 + r < M; r++) {
            __m512i h = v_row_bf16(_mm512_maskz_loadu_ps(m0, blk[r]), _mm512_maskz_loadu_ps(m1, blk[r] + 16));
            _mm512_mask_storeu_epi16(e->xp + (size_t)(i0 + r) * N + j0, mw, h);
        }
        return;
    }
    if (e->kind == MP_EPI_ACT) {
        for (int r = 0; r < 32; r++) {
            int i = i0 + r;
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
            if (i < M) {
                a = _mm512_maskz_loadu_ps(m0, blk[r]);
                b = _mm512_maskz_loadu_ps(m1, blk[r] + 16);
            }
            __m512i h = v_row_bf16(a, b);
            v_put_row(e->xp + mp_packa_off(kn, i, j0), h);
            if (e->act == MP_ACT_GELU) /* masked lanes: GELU(0) = 0 */
                h = _mm512_inserti64x4(_mm512_castsi256_si512(v_gelu_bf(_mm512_castsi512_si256(h))),
                                       v_gelu_bf(_mm512_extracti64x4_epi64(h, 1)), 1);
            v_put_row(e->ap + mp_packa_off(kn, i, j0), h);
        }
        return;
    }
    /* MP_EPI_DACT */
    int km = rup32(M);
    __m512 r[2][2][16]; /* [row half][column half][row] */
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (int q = 0; q < 32; q++) {
        int i = i0 + q;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        if (i < M) {
            a = _mm512_maskz_loadu_ps(m0, blk[q]);
            b = _mm512_maskz_loadu_ps(m1, blk[q] + 16);
            if (e->act == MP_ACT_GELU) {
                __m512i h = _mm512_loadu_si512(e->hp + mp_packa_off(kn, i, j0));
                a = _mm512_mul_ps(a, v_gelu_grad_bf(_mm512_castsi512_si256(h)));
                b = _mm512_mul_ps(b, v_gelu_grad_bf(_mm512_extracti64x4_epi64(h, 1)));
            }
            s0 = _mm512_add_ps(s0, a);
            s1 = _mm512_add_ps(s1, b);
        }
        v_put_row(e->pa + mp_packa_off(kn, i, j0), v_row_bf16(a, b));
        r[q / 16][0][q % 16] = a;
        r[q / 16][1][q % 16] = b;
    }
    if (e->tok) put_block_pairs(e->pt, km, j0, i0, r);
    else put_block_t(e->pt, km, j0, i0, r);
    if (e->bpart) {
        float *bp = e->bpart + (size_t)(i0 / 32) * kn + j0;
        _mm512_storeu_ps(bp, s0);
        _mm512_storeu_ps(bp + 16, s1);
    }
#else
    int km = rup32(M);
    float s[32] = {0};
    for (int q = 0; q < 32; q++) {
        int i = i0 + q;
        for (int c = 0; c < 32; c++) {
            int j = j0 + c;
            float v = i < M && j < N ? blk[q][c] : 0.0f;
            if (e->kind == MP_EPI_RES) {
                if (i < M && j < N) e->out[(size_t)i * N + j] = v + e->res[(size_t)i * N + j];
                continue;
            }
            if (e->kind == MP_EPI_ROWS) {
                if (i < M && j < N) e->xp[(size_t)i * N + j] = f32_to_bf16(v);
                continue;
            }
            if (e->kind == MP_EPI_ACT) {
                uint16_t h = f32_to_bf16(v);
                e->xp[mp_packa_off(kn, i, j)] = h;
                float a = bf16_to_f32(h);
                if (e->act == MP_ACT_GELU && i < M && j < N) a = gelu1(a);
                e->ap[mp_packa_off(kn, i, j)] = f32_to_bf16(a);
                continue;
            }
            if (e->act == MP_ACT_GELU && i < M && j < N)
                v *= gelu_grad1(bf16_to_f32(e->hp[mp_packa_off(kn, i, j)]));
            s[c] += v;
            uint16_t h = f32_to_bf16(v);
            e->pa[mp_packa_off(kn, i, j)] = h;
            e->pt[e->tok ? pb_off(km, i, j) : mp_packa_off(km, j, i)] = h;
        }
    }
    if (e->kind == MP_EPI_DACT && e->bpart)
        memcpy(e->bpart + (size_t)(i0 / 32) * kn + j0, s, sizeof s);
#endif
}

void mp_epi_bias_sum(const mp_epi *e, float *db)
{
    int kn = rup32(e->N), blocks = rup32(e->M) / 32;
    #pragma omp parallel for schedule(static)
    for (int j = 0; j < e->N; j++) {
        float acc = 0;
        for (int b = 0; b < blocks; b++) acc += e->bpart[(size_t)b * kn + j];
        db[j] += acc;
    }
}

/* ---- the activation over tokens as the left operand ---------------------- */

void mp_pack_a_tokens(uint16_t *pa, const uint16_t *xp, int M, int K, int act)
{
    /* 32 x 32 blocks of X (act applied by table), transposed as bf16:
     * the values are copied as they are (bf16 subnormals included, which
     * the AMX products read as zero anyway). */
    KILN_ASSERT(act == MP_ACT_NONE || act == MP_ACT_GELU);
    int km = rup32(M), kx = rup32(K);
#ifdef __AVX512F__
    if (act == MP_ACT_GELU) gelu_tabs();
#endif
    #pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < kx; c0 += 32) {
        for (int n0 = 0; n0 < km; n0 += 32) {
#ifdef __AVX512F__
            __m512i w[32];
            for (int t = 0; t < 32; t++) {
                __m512i h = _mm512_loadu_si512(xp + mp_packa_off(kx, n0 + t, c0));
                if (act == MP_ACT_GELU) {
                    __m256i lo = v_gelu_bf(_mm512_castsi512_si256(h));
                    __m256i hi = v_gelu_bf(_mm512_extracti64x4_epi64(h, 1));
                    h = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                }
                w[t] = h;
            }
            put_rows_t(pa, km, c0, n0, w);
#else
            for (int t = 0; t < 32; t++)
                for (int c = 0; c < 32; c++) {
                    float v = bf16_to_f32(xp[mp_packa_off(kx, n0 + t, c0 + c)]);
                    if (act == MP_ACT_GELU) v = gelu1(v);
                    pa[mp_packa_off(km, c0 + c, n0 + t)] = f32_to_bf16(v);
                }
#endif
        }
    }
}
