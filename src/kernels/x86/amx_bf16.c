/*
 * amx_bf16.c — the AMX kernel of the bf16 products and the peak probe.
 *
 * Tiles: tmm0..3 accumulate a 32 x 32 block of C in fp32 (2 x 2 tiles of
 * 16 x 16), tmm4/5 are two 16-row x 32-k tiles of A read straight from the
 * packed row-major A (row stride Kp), tmm6/7 are two 16-pair x 16-column
 * tiles of B, i.e. 16 consecutive 64-byte rows of a packed panel. Each
 * 32-wide step of K is 4 loads and 4 TDPBF16PS (16 x 16 x 32 MACs each).
 * Every OpenMP thread configures its own tiles (the configuration is per
 * thread) and releases them at the end.
 */
#include "kernels/x86/bf16.h"

#include "base/base.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- per-thread scratch ------------------------------------------------ */

typedef struct tscratch {
    void *p[MP_SCRATCH_SLOTS];
    size_t n[MP_SCRATCH_SLOTS];
} tscratch;

static pthread_key_t g_scratch_key;
static bool g_scratch_key_ok;

static void tscratch_free(void *v)
{
    tscratch *t = v;
    for (int i = 0; i < MP_SCRATCH_SLOTS; i++) free(t->p[i]);
    free(t);
}

static void scratch_key_make(void)
{
    g_scratch_key_ok = pthread_key_create(&g_scratch_key, tscratch_free) == 0;
}

void *mp_thread_scratch(int slot, size_t bytes)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    KILN_ASSERT(slot >= 0 && slot < MP_SCRATCH_SLOTS);
    pthread_once(&once, scratch_key_make);
    if (!g_scratch_key_ok) return NULL;
    tscratch *t = pthread_getspecific(g_scratch_key);
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t) return NULL;
        if (pthread_setspecific(g_scratch_key, t) != 0) {
            free(t);
            return NULL;
        }
    }
    if (t->n[slot] < bytes) {
        free(t->p[slot]);
        t->p[slot] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        t->n[slot] = t->p[slot] ? bytes : 0;
    }
    return t->p[slot];
}

#if defined(__x86_64__)
#include <immintrin.h>

#define MP_TAMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,prfchw")))

typedef struct tilecfg {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

/* The configuration lives in static memory: this GCC does not model the
 * memory read of ldtilecfg, and with a local struct it dropped the stores
 * that fill colsb and rows once the function was compiled on its own
 * (mp_amx_tiles_config): ldtilecfg then read garbage and faulted. */
static const tilecfg g_tilecfg __attribute__((aligned(64))) = {
    .palette = 1,
    .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16},
};

MP_TAMX static void tiles_config(void) { _tile_loadconfig(&g_tilecfg); }

/* Blocking: a macro tile of MC x NC of C is one task; inside it K runs in
 * chunks of KC, and for each chunk the 2 B panels of a 32-column block
 * (32 KiB at KC = 512) stay in L1 while the A blocks of the macro tile
 * (512 KiB) come from L2; A tiles are 1 KiB runs (packed A, bf16.h), so
 * the hardware prefetchers see plain streams. The next column block's B
 * panels are prefetched into L2 a few lines per k step: without it their
 * first use misses to L3 tile row by tile row (measured 10-15% on
 * 2048 x 1536 x 512 against the same kernel without; prefetching A into L1
 * as well cost more in prefetch instructions than it saved). C tiles are
 * loaded and stored straight from C (fp32, row stride ldc); tiles cut by
 * the edge of C go through a buffer. With an epilogue (epi), the finished
 * 32 x 32 blocks go to mp_epi_block instead of C.
 *
 * A product over more than one K chunk keeps the partial sums of the
 * macro tile between chunks in a per-thread buffer (MC x NC fp32, 256 KiB,
 * which stays in L2), so C is read and written once, not once per chunk
 * (+8-15% on 2048 x 512 x 2048 and 512 x 2048 x 2048 from memory, and
 * C stored transposed needs no transposed reloads); without that buffer
 * (out of memory) they go through C, slower but the same result. */
enum { MC = MP_AMX_MC, NC = MP_AMX_NC, KC = MP_AMX_KC };


/* transc: C is stored transposed (element (i, j) at C[j * ldc + i]); the
 * 16 x 16 blocks go through buf and an in-register transpose. */
MP_TAMX static void tr_load(float buf[16][16], const float *C, int ldc, int i0, int j0, int r,
                            int c)
{
    __m512 row[16], col[16];
    __mmask16 mk = (__mmask16)(r >= 16 ? 0xffff : (1u << (r > 0 ? r : 0)) - 1);
    for (int e = 0; e < 16; e++)
        row[e] = e < c ? _mm512_maskz_loadu_ps(mk, C + (size_t)(j0 + e) * ldc + i0)
                       : _mm512_setzero_ps();
    mp_transpose16(row, col);
    for (int q = 0; q < 16; q++) _mm512_store_ps(buf[q], col[q]);
}

MP_TAMX static void tr_store(float buf[16][16], float *C, int ldc, int i0, int j0, int r, int c)
{
    __m512 row[16], col[16];
    __mmask16 mk = (__mmask16)(r >= 16 ? 0xffff : (1u << (r > 0 ? r : 0)) - 1);
    for (int q = 0; q < 16; q++) row[q] = _mm512_load_ps(buf[q]);
    mp_transpose16(row, col);
    for (int e = 0; e < 16 && e < c; e++)
        _mm512_mask_storeu_ps(C + (size_t)(j0 + e) * ldc + i0, mk, col[e]);
}

/* Accumulator tile t <- C block at (i0, j0) (or bias rows, or zero). */
#define ACC_INIT(t, i0, j0)                                                        \
    do {                                                                           \
        int r_ = M - (i0), c_ = N - (j0);                                          \
        if (sb && !first) {                                                        \
            _tile_loadd(t, sb + 256 * (((i0) & 16) / 8 + ((j0) & 16) / 16), 64);   \
        } else if (transc && !(first && !accumulate)) {                            \
            tr_load(buf, C, ldc, (i0), (j0), r_, c_);                              \
            _tile_loadd(t, buf, 64);                                               \
        } else if (first && !accumulate) {                                         \
            if (!bias || c_ <= 0) _tile_zero(t);                                   \
            else _tile_loadd(t, bbuf[((j0) & 16) / 16], 64);                       \
        } else if (r_ >= 16 && c_ >= 16 && !(first && bias)) {                     \
            _tile_loadd(t, C + (size_t)(i0) * ldc + (j0), cstride);                \
        } else {                                                                   \
            memset(buf, 0, sizeof buf);                                            \
            for (int q_ = 0; q_ < 16 && q_ < r_; q_++)                             \
                for (int e_ = 0; e_ < 16 && e_ < c_; e_++)                         \
                    buf[q_][e_] = C[(size_t)((i0) + q_) * ldc + (j0) + e_] +       \
                                  (first && bias ? bias[(j0) + e_] : 0.f);         \
            _tile_loadd(t, buf, 64);                                               \
        }                                                                          \
    } while (0)

#define ACC_STORE(t, i0, j0)                                                       \
    do {                                                                           \
        int r_ = M - (i0), c_ = N - (j0);                                          \
        if (sb && !last) {                                                         \
            _tile_stored(t, sb + 256 * (((i0) & 16) / 8 + ((j0) & 16) / 16), 64);  \
        } else if (transc) {                                                       \
            if (r_ > 0 && c_ > 0) {                                                \
                _tile_stored(t, buf, 64);                                          \
                tr_store(buf, C, ldc, (i0), (j0), r_, c_);                         \
            }                                                                      \
        } else if (r_ >= 16 && c_ >= 16 && stream) {                               \
            _tile_stored(t, buf, 64);                                              \
            for (int q_ = 0; q_ < 16; q_++)                                        \
                _mm512_stream_ps(C + (size_t)((i0) + q_) * ldc + (j0),             \
                                 _mm512_load_ps(buf[q_]));                         \
        } else if (r_ >= 16 && c_ >= 16) {                                         \
            _tile_stored(t, C + (size_t)(i0) * ldc + (j0), cstride);               \
        } else if (r_ > 0 && c_ > 0) {                                             \
            _tile_stored(t, buf, 64);                                              \
            for (int q_ = 0; q_ < 16 && q_ < r_; q_++)                             \
                memcpy(C + (size_t)((i0) + q_) * ldc + (j0), buf[q_],              \
                       (size_t)(c_ < 16 ? c_ : 16) * 4);                           \
        }                                                                          \
    } while (0)

/* One thread's share of mp_gemm_amx (called inside its parallel region:
 * the worksharing loop below binds to it). A function of its own so that
 * the AMX and AVX-512 code carries its target attribute: clang outlines the
 * body of a parallel region into a function without it. */
MP_TAMX static void gemm_amx_thread(int M, int N, int Kp, const uint16_t *pa, const uint16_t *pb,
                                    float *C, int ldc, bool accumulate, const float *bias,
                                    bool transc, const mp_epi *epi)
{
    int Mp = (M + 31) / 32 * 32, Np = (N + 31) / 32 * 32;
    int mtiles = (Mp + MC - 1) / MC, ntiles = (Np + NC - 1) / NC;
    size_t cstride = (size_t)ldc * 4;
    tiles_config();
    float buf[16][16] __attribute__((aligned(64)));
    float bbuf[2][16][16] __attribute__((aligned(64))); /* bias rows, 2 tiles */
    float eblk[32][32] __attribute__((aligned(64)));    /* a finished block, for epi */
    /* over several K chunks: the partial sums of this thread's macro
     * tile wait here (plain tiles) between chunks */
    float *tbase = Kp > KC ? mp_thread_scratch(MP_SCRATCH_GEMM, (size_t)MC * NC * sizeof(float)) : NULL;
    /* an epilogue has no C to keep the partial sums in */
    KILN_ASSERT(tbase || !epi || Kp <= KC);
    /* The block stores that the prefetch below looks ahead for: C, or the
     * output and the residual of a fused residual add. */
    bool res_epi = epi && epi->kind == MP_EPI_RES;
    float *cw = res_epi ? epi->out : C;
    const float *cr = res_epi ? epi->res : NULL;
    int cld = res_epi ? epi->N : ldc;
    /* A large C that is only written (the LM head's logits, 64 MiB at the
     * benchmark's shape) goes out with non-temporal stores: no read for
     * ownership of lines that are overwritten whole and would not stay
     * in cache anyway (the logits product 20-25% faster, best of 15 with
     * the caches flushed). Full 16 x 16 tiles only, rows 64-byte aligned. */
    bool stream = !epi && !transc && !accumulate && (Kp <= KC || tbase) && ldc % 16 == 0 &&
                  ((uintptr_t)C & 63) == 0 && (size_t)M * (size_t)N * 4 >= MP_AMX_STREAM_BYTES;
    /* Macro tiles go to whichever thread is free: on this VM the two
     * vCPUs often run at different speeds (another tenant on a sibling
     * hyperthread), and a static split then waits for the slower one
     * (2 threads, best of 25 interleaved: 1.3-1.5x on 2048 x {512,
     * 1536, 8192} x 512 in such minutes, 0.9-1.05x when both run at
     * full speed). Each tile is still computed by one thread in one
     * order, so the result does not depend on the schedule. */
    #pragma omp for schedule(dynamic, 1) collapse(2)
    for (int mt = 0; mt < mtiles; mt++) {
        for (int nt = 0; nt < ntiles; nt++) {
            int iend = (mt + 1) * MC < Mp ? (mt + 1) * MC : Mp;
            int jend = (nt + 1) * NC < Np ? (nt + 1) * NC : Np;
            for (int k0 = 0; k0 < Kp; k0 += KC) {
                int k1 = k0 + KC < Kp ? k0 + KC : Kp;
                bool first = k0 == 0, last = k1 == Kp;
                for (int j0 = nt * NC; j0 < jend; j0 += 32) {
                    const uint16_t *b0 = pb + (size_t)(j0 / 16) * Kp * 16;
                    const uint16_t *b1 = b0 + (size_t)Kp * 16;
                    /* The next 32 columns' panels (this K chunk) go to
                     * L2 a few lines per k step while this panel pair
                     * is in use: panel pairs are 2 * Kp * 32 bytes apart. */
                    const char *bn = j0 + 32 < Np
                                         ? (const char *)(b0 + (size_t)Kp * 32)
                                         : NULL;
                    size_t bn_bytes = (size_t)(k1 - k0) * 32, bn_pos = 0;
                    int steps = ((iend - mt * MC) / 32) * ((k1 - k0) / 32);
                    size_t bn_step =
                        steps ? (2 * bn_bytes / 64 + steps - 1) / steps * 64
                              : 0;
                    if (bias && first &&
                        !accumulate) /* the bias rows of this column block */
                        for (int h = 0; h < 2; h++) {
                            int c = N - (j0 + 16 * h);
                            __mmask16 mk =
                                (__mmask16)(c >= 16  ? 0xffff
                                            : c <= 0 ? 0
                                                     : (1u << c) - 1);
                            __m512 v =
                                _mm512_maskz_loadu_ps(mk, bias + j0 + 16 * h);
                            for (int q = 0; q < 16; q++)
                                _mm512_store_ps(bbuf[h][q], v);
                        }
                    for (int i0 = mt * MC; i0 < iend; i0 += 32) {
                        float *sb =
                            tbase ? tbase + (size_t)(((i0 - mt * MC) / 32) *
                                                         (NC / 32) +
                                                     (j0 - nt * NC) / 32) *
                                                1024
                                  : NULL;
                        const uint16_t *a0 =
                            pa + (size_t)i0 * Kp; /* 2 groups */
                        const uint16_t *a1 = a0 + (size_t)16 * Kp;
                        /* The next C block (next rows, or the next
                         * column block's first rows) is fetched for
                         * writing while this one computes: without it
                         * the tile stores of a K = 512 product miss to
                         * memory and stall (measured 15-40% slower on
                         * 2048 x {512..8192} x 512). */
                        const float *cn = NULL, *rn = NULL;
                        int cn_rows = 0;
                        if (!stream && !(sb && !last) && (!epi || res_epi)) {
                            int ni = i0 + 32 < iend ? i0 + 32 : mt * MC;
                            int nj = i0 + 32 < iend ? j0 : j0 + 32;
                            if (nj < jend && ni < M && nj < N) {
                                cn = transc ? cw + (size_t)nj * cld + ni
                                            : cw + (size_t)ni * cld + nj;
                                if (cr) rn = cr + (size_t)ni * cld + nj;
                                cn_rows = transc ? N - nj : M - ni;
                                if (cn_rows > 32) cn_rows = 32;
                            }
                        }
                        int cn_step = (k1 - k0) / 32, cn_q = 0;
                        cn_step =
                            cn_step ? (2 * cn_rows + cn_step - 1) / cn_step : 0;
                        ACC_INIT(0, i0, j0);
                        ACC_INIT(1, i0, j0 + 16);
                        ACC_INIT(2, i0 + 16, j0);
                        ACC_INIT(3, i0 + 16, j0 + 16);
                        for (int k = k0; k < k1; k += 32) {
                            _tile_loadd(4, a0 + (size_t)k * 16, 64);
                            _tile_loadd(6, b0 + (size_t)k * 16, 64);
                            _tile_loadd(5, a1 + (size_t)k * 16, 64);
                            _tile_loadd(7, b1 + (size_t)k * 16, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                            for (int q = 0; q < cn_step && cn_q < 2 * cn_rows;
                                 q++, cn_q++) {
                                size_t off = (size_t)(cn_q >> 1) * cld + (cn_q & 1) * 16;
                                __builtin_prefetch(cn + off, 1, 3);
                                if (rn) __builtin_prefetch(rn + off, 0, 3);
                            }
                            if (bn)
                                for (size_t q = 0;
                                     q < bn_step && bn_pos < 2 * bn_bytes;
                                     q += 64, bn_pos += 64) {
                                    size_t off = bn_pos < bn_bytes
                                                     ? (size_t)k0 * 32 + bn_pos
                                                     : (size_t)Kp * 32 +
                                                           (size_t)k0 * 32 +
                                                           bn_pos - bn_bytes;
                                    _mm_prefetch(bn + off, _MM_HINT_T1);
                                }
                        }
                        if (epi && last) {
                            _tile_stored(0, &eblk[0][0], 128);
                            _tile_stored(1, &eblk[0][16], 128);
                            _tile_stored(2, &eblk[16][0], 128);
                            _tile_stored(3, &eblk[16][16], 128);
                            mp_epi_block(epi, eblk, i0, j0);
                            continue;
                        }
                        ACC_STORE(0, i0, j0);
                        ACC_STORE(1, i0, j0 + 16);
                        ACC_STORE(2, i0 + 16, j0);
                        ACC_STORE(3, i0 + 16, j0 + 16);
                    }
                }
            }
        }
    }
    if (stream) _mm_sfence(); /* the stores visible to the other threads after the barrier */
    _tile_release();
}

void mp_gemm_amx(int M, int N, int Kp, const uint16_t *pa, const uint16_t *pb, float *C, int ldc,
                 bool accumulate, const float *bias, bool transc, const mp_epi *epi);
void mp_gemm_amx(int M, int N, int Kp, const uint16_t *pa, const uint16_t *pb, float *C, int ldc,
                 bool accumulate, const float *bias, bool transc, const mp_epi *epi)
{
    KILN_ASSERT(!epi || (!transc && !accumulate));
    #pragma omp parallel
    gemm_amx_thread(M, N, Kp, pa, pb, C, ldc, accumulate, bias, transc, epi);
}

/* Tile products done by this thread in about secs seconds, on operand
 * tiles of zeros or of pseudo-random bf16 values in [-0.5, 0.5). The
 * unit is faster on zeros (on this Sapphire Rapids host 5.0-5.8 against
 * 4.5-4.9 TFLOP/s with 2 threads, 2.6-2.9 against 2.0-2.3 with 1: less
 * switching, so a higher clock), a speed no product of real data reaches. */
MP_TAMX static double amx_peak_thread(double secs, bool zeros)
{
    tiles_config();
    uint16_t src[4][16 * 32] __attribute__((aligned(64)));
    uint32_t x = 0x9e3779b9u;
    for (int t = 0; t < 4; t++)
        for (int i = 0; i < 16 * 32; i++) {
            x = x * 1664525u + 1013904223u;
            /* the top 16 bits of x scaled to [-0.5, 0.5): exact in fp32 */
            float f = (float)(x >> 16) / 65536.0f - 0.5f;
            uint32_t u;
            memcpy(&u, &f, 4);
            src[t][i] = zeros ? 0 : (uint16_t)(u >> 16);
        }
    _tile_loadd(4, src[0], 64);
    _tile_loadd(5, src[1], 64);
    _tile_loadd(6, src[2], 64);
    _tile_loadd(7, src[3], 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    long iters = 0;
    double t0 = kiln_time_now(), t;
    do {
        for (int i = 0; i < 1000; i++) {
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        iters += 1000;
        t = kiln_time_now();
    } while (t - t0 < secs);
    _tile_release();
    /* 4 tile products of 16 x 16 x 32 multiply-adds per iteration. */
    return (double)iters * 4 * 16 * 16 * 32 * 2;
}

static double cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double mp_amx_peak_gflops(double secs, bool zeros, double *per_cpu)
{
    if (per_cpu) *per_cpu = 0;
    if (!mp_amx_usable()) return 0;
    /* Total work over wall time: threads that do not really run at the same
     * time (shared cores, other load) do not inflate the figure. */
    double total = 0, t0 = kiln_time_now(), c0 = cpu_seconds();
    #pragma omp parallel reduction(+ : total)
    total += amx_peak_thread(secs, zeros);
    double wall = kiln_time_now() - t0, cpu = cpu_seconds() - c0;
    if (per_cpu) *per_cpu = cpu > 0 ? total / cpu / 1e9 : 0;
    return total / wall / 1e9;
}

MP_TAMX void mp_amx_tiles_config(void) { tiles_config(); }

#else /* not x86-64: never called (mp_amx_usable() is false) */

void mp_amx_tiles_config(void) { KILN_ASSERT(0); }

void mp_gemm_amx(int M, int N, int Kp, const uint16_t *pa, const uint16_t *pb,
                 float *C, int ldc, bool accumulate, const float *bias, bool transc,
                 const mp_epi *epi);
void mp_gemm_amx(int M, int N, int Kp, const uint16_t *pa, const uint16_t *pb,
                 float *C, int ldc, bool accumulate, const float *bias, bool transc,
                 const mp_epi *epi)
{
    (void)M, (void)N, (void)Kp, (void)pa, (void)pb, (void)C, (void)ldc;
    (void)accumulate, (void)bias, (void)transc, (void)epi;
    KILN_ASSERT(0);
}

double mp_amx_peak_gflops(double secs, bool zeros, double *per_cpu)
{
    (void)secs, (void)zeros;
    if (per_cpu) *per_cpu = 0;
    return 0;
}
#endif
