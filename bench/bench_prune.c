/*
 * bench_prune.c — would a sparse kernel make a pruned model faster here?
 * (issue 21, item 4: ship a sparse kernel only if it beats dense.)
 *
 * For each matrix shape and row count T it times, in the same process:
 *   dense  the engine's linear layer on the fp32 weight with its zeros
 *          (kern_ops_fast()->linear: weight rows streamed once for all T
 *          rows at decode sizes, the GEMM at prefill sizes) — what
 *          `kiln generate` runs on a pruned model today;
 *   bf16   the same dense layer on the weight in bf16 (`--dtype bf16`):
 *          half the bytes of fp32, the other way to halve them;
 *   csr    50% unstructured: per row, the kept values (fp32) and their
 *          column indices (uint16), y[t][r] = sum_k v[k] x[t][idx[k]];
 *          half the weight bytes of dense plus 2 bytes of index each;
 *   2:4    per row and group of 4 inputs the 2 kept values (fp32) and
 *          their 2-bit positions packed 4 groups to a byte: half the
 *          value bytes and 1/16 more of index, with a fixed structure the
 *          loop can unroll (the layout of NVIDIA's sparse tensor cores);
 *   2:4/T  the same with the activations transposed (x as (cols, T)), so
 *          that the T rows are a contiguous inner loop (prefill);
 *   2:4/avx the 2:4 layout with AVX-512: the kept inputs picked from
 *          registers by permutex2var (no gather), 16 FMAs per 32 inputs
 *          (when the CPU has AVX-512F);
 *   2:4bf  the same with bf16 values: against bf16 dense (ratio bf16 /
 *          2:4bf), the fair pair.
 * Each is checked against dense (|diff| <= 1e-4 * scale) before timing.
 * A figure is the best of --reps runs, in microseconds, and the ratio is
 * dense (fp32) / candidate (> 1: the candidate is faster). OpenMP over rows.
 *
 * Structured pruning needs no kernel of its own: the model kiln_prune
 * writes is smaller, and the last lines time the inference engine (as
 * `kiln generate` runs it, fp32 weights) on the benchmark model
 * (--config, configs/bench-gpt2-30m.json, random weights) and on it with
 * 25% of every layer's MLP channels removed, interleaved round by round:
 * batch-1 decode and 128-token prefill tokens/s, best of the rounds, and
 * the ratio pruned / dense beside the ratio of weight bytes.
 *
 * Usage: bench_prune [--threads N] [--reps R] [--config CONFIG.json]
 */
#include "bench_cpu.h"
#include "kernels/kernels.h"
#include "kiln.h"
#include "tensor/tensor.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <immintrin.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng_state = 88172645463325252ull;
static float frand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 16777216.0)) - 0.5f;
}

typedef struct csr {
    float *v;       /* (rows, nnz_row) */
    uint16_t *idx;  /* (rows, nnz_row) */
    int nnz_row;
} csr;

typedef struct s24 {
    float *v;      /* (rows, cols/2): the 2 kept values of each group */
    uint8_t *pos;  /* (rows, cols/8): 2 x 2 bits per group, 2 groups a byte */
} s24;

static void csr_gemv(const csr *s, int rows, const float *x, int T, int cols, float *y)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *v = s->v + (size_t)r * s->nnz_row;
        const uint16_t *ix = s->idx + (size_t)r * s->nnz_row;
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * cols;
            float acc = 0;
            for (int k = 0; k < s->nnz_row; k++) acc += v[k] * xt[ix[k]];
            y[(size_t)t * rows + r] = acc;
        }
    }
}

static void s24_gemv(const s24 *s, int rows, const float *x, int T, int cols, float *y)
{
    int G = cols / 4;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *v = s->v + (size_t)r * (cols / 2);
        const uint8_t *p = s->pos + (size_t)r * (cols / 8);
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * cols;
            float a0 = 0, a1 = 0;
            for (int g = 0; g < G; g++) {
                unsigned b = (unsigned)p[g >> 1] >> ((g & 1) * 4);
                const float *xg = xt + 4 * g;
                a0 += v[2 * g] * xg[b & 3];
                a1 += v[2 * g + 1] * xg[(b >> 2) & 3];
            }
            y[(size_t)t * rows + r] = a0 + a1;
        }
    }
}

/* 2:4 with AVX-512: 8 groups (32 inputs, 16 kept values) per step. The
 * 16 positions of 8 groups are one 32-bit word (value k's 2 bits at 2k),
 * decoded into lane indices 4*(k/2) + pos with a variable shift, and the
 * inputs picked from the 32 floats of two registers by one
 * permutex2var: no gather. cols must be a multiple of 32. */
__attribute__((target("avx512f"))) static void s24_avx512(const s24 *s, int rows, const float *x,
                                                          int T, int cols, float *y)
{
    const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                            28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28,
                                           28);
    const __m512i three = _mm512_set1_epi32(3);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *v = s->v + (size_t)r * (cols / 2);
        const uint32_t *p = (const uint32_t *)(s->pos + (size_t)r * (cols / 8));
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * cols;
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < cols; c += 32) {
                __m512i w = _mm512_set1_epi32((int)p[c / 32]);
                __m512i idx = _mm512_add_epi32(
                    base, _mm512_and_si512(_mm512_srlv_epi32(w, shift), three));
                __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(xt + c), idx,
                                                   _mm512_loadu_ps(xt + c + 16));
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(v + c / 2), xs, acc);
            }
            y[(size_t)t * rows + r] = _mm512_reduce_add_ps(acc);
        }
    }
}

/* s24_avx512 with the kept values in bf16 (vb, (rows, cols/2)): a quarter
 * of the dense fp32 bytes, half of dense bf16's, plus the positions. */
__attribute__((target("avx512f"))) static void s24_bf16_avx512(const s24 *s, const uint16_t *vb,
                                                               int rows, const float *x, int T,
                                                               int cols, float *y)
{
    const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                            28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28,
                                           28);
    const __m512i three = _mm512_set1_epi32(3);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint16_t *v = vb + (size_t)r * (cols / 2);
        const uint32_t *p = (const uint32_t *)(s->pos + (size_t)r * (cols / 8));
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * cols;
            __m512 acc = _mm512_setzero_ps();
            for (int c = 0; c < cols; c += 32) {
                __m512i w = _mm512_set1_epi32((int)p[c / 32]);
                __m512i idx = _mm512_add_epi32(
                    base, _mm512_and_si512(_mm512_srlv_epi32(w, shift), three));
                __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(xt + c), idx,
                                                   _mm512_loadu_ps(xt + c + 16));
                __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + c / 2))), 16));
                acc = _mm512_fmadd_ps(wv, xs, acc);
            }
            y[(size_t)t * rows + r] = _mm512_reduce_add_ps(acc);
        }
    }
}

/* xT (cols, T): for each kept weight, an axpy over the T rows. */
static void s24_gemm_t(const s24 *s, int rows, const float *xT, int T, int cols, float *yT)
{
    int G = cols / 4;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *v = s->v + (size_t)r * (cols / 2);
        const uint8_t *p = s->pos + (size_t)r * (cols / 8);
        float *yr = yT + (size_t)r * T;
        for (int t = 0; t < T; t++) yr[t] = 0;
        for (int g = 0; g < G; g++) {
            unsigned b = (unsigned)p[g >> 1] >> ((g & 1) * 4);
            const float *x0 = xT + (size_t)(4 * g + (b & 3)) * T;
            const float *x1 = xT + (size_t)(4 * g + ((b >> 2) & 3)) * T;
            float v0 = v[2 * g], v1 = v[2 * g + 1];
#pragma omp simd
            for (int t = 0; t < T; t++) yr[t] += v0 * x0[t] + v1 * x1[t];
        }
    }
}

/* One round of the engine: decode tokens/s at batch 1 (n steps after a
 * 16-token prompt) and prefill tokens/s of pre tokens. */
static void engine_round(kiln_ctx *ctx, kiln_engine *e, int n, int pre, double *dec, double *pf)
{
    int V = kiln_engine_config(e)->vocab_size;
    int32_t toks[512];
    for (int i = 0; i < 512; i++) toks[i] = (int32_t)((i * 2654435761u) % (unsigned)V);
    float *logits = malloc((size_t)V * sizeof *logits);
    kiln_engine_reset(e, 0);
    double t0 = now();
    kiln_engine_prefill(ctx, e, 0, toks, pre, logits);
    *pf = pre / (now() - t0);
    kiln_engine_reset(e, 0);
    kiln_engine_prefill(ctx, e, 0, toks, 16, logits);
    t0 = now();
    for (int i = 0; i < n; i++) {
        kiln_engine_tok tk = {0, toks[16 + i], true};
        kiln_engine_step(ctx, e, &tk, 1, logits);
    }
    *dec = n / (now() - t0);
    free(logits);
}

static void bench_structured(const char *config, int threads, int rounds)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, threads);
    kiln_config cfg;
    kiln_model *m = NULL, *sm = NULL;
    kiln_engine *e[2] = {NULL, NULL};
    if (kiln_config_load(ctx, config, &cfg) || kiln_model_new(ctx, &cfg, &m)) {
        fprintf(stderr, "bench_prune: %s\n", kiln_errmsg(ctx));
        kiln_ctx_free(ctx);
        return;
    }
    kiln_model_init_random(m, 1);
    kiln_prune_opts po = kiln_prune_opts_default();
    po.method = KILN_PRUNE_MLP;
    po.score = KILN_PRUNE_SCORE_MAGNITUDE;
    po.sparsity = 0.25;
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.chunk = 128;
    if (kiln_prune(ctx, m, &po, &sm) || kiln_engine_new(ctx, m, &eo, &e[0]) ||
        kiln_engine_new(ctx, sm, &eo, &e[1])) {
        fprintf(stderr, "bench_prune: %s\n", kiln_errmsg(ctx));
    } else {
        double dec[2] = {0, 0}, pf[2] = {0, 0};
        for (int r = 0; r < rounds; r++)
            for (int k = 0; k < 2; k++) {
                double d, p;
                engine_round(ctx, e[k], 64, 128, &d, &p);
                if (d > dec[k]) dec[k] = d;
                if (p > pf[k]) pf[k] = p;
            }
        double wb0 = (double)kiln_engine_weight_bytes(e[0]), wb1 = (double)kiln_engine_weight_bytes(e[1]);
        printf("\nstructured (%s, engine fp32, best of %d rounds):\n", config, rounds);
        printf("  dense      n_inner %5d  %6.1f MB  decode %7.1f tok/s  prefill %8.1f tok/s\n",
               cfg.n_inner, wb0 / 1e6, dec[0], pf[0]);
        printf("  mlp 25%%    n_inner %5d  %6.1f MB  decode %7.1f tok/s  prefill %8.1f tok/s\n",
               kiln_model_config(sm)->n_inner, wb1 / 1e6, dec[1], pf[1]);
        printf("  pruned / dense: decode %.2fx, prefill %.2fx (weight bytes %.2fx fewer)\n",
               dec[1] / dec[0], pf[1] / pf[0], wb0 / wb1);
    }
    kiln_engine_free(e[0]);
    kiln_engine_free(e[1]);
    kiln_model_free(sm);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

typedef struct shape {
    const char *what;
    int rows, cols;
} shape;

int main(int argc, char **argv)
{
    int threads = 1, reps = 20;
    const char *config = "configs/bench-gpt2-30m.json";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--config")) config = argv[i + 1];
    }
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    bench_print_cpu();
    printf("threads %d, best of %d; times in microseconds; ratio = dense / candidate\n", threads,
           reps);
    const kern_ops *ops = kern_ops_fast();
    kern_gemm *gm = kern_gemm_fast_new();
    static const shape shapes[] = {
        {"demo qkv (576x192)", 576, 192},    {"demo fc (768x192)", 768, 192},
        {"demo fcproj (192x768)", 192, 768}, {"gpt2 proj (768x768)", 768, 768},
        {"gpt2 fc (3072x768)", 3072, 768},   {"gpt2 fcproj (768x3072)", 768, 3072},
    };
    static const int Ts[] = {1, 4, 128};
    bool avx = kern_cpu_avx512();
    printf("%-23s %3s %7s %7s %7s %7s %7s %7s %7s | %5s %5s %5s %5s %7s | %s\n", "matrix", "T",
           "dense", "bf16", "csr50", "2:4", "2:4/T", "2:4/avx", "2:4bf", "bf16", "csr", "2:4",
           "2:4/T", "2:4/avx", "bf16/2:4bf");
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
        int R = shapes[si].rows, C = shapes[si].cols;
        float *W = malloc((size_t)R * C * sizeof *W);
        csr cs = {malloc((size_t)R * C / 2 * sizeof(float)), malloc((size_t)R * C / 2 * 2), C / 2};
        s24 s = {malloc((size_t)R * C / 2 * sizeof(float)), calloc((size_t)R * C / 8, 1)};
        /* a 2:4 matrix (also 50% unstructured, so csr runs on it too) */
        for (int r = 0; r < R; r++)
            for (int g = 0; g < C / 4; g++) {
                int a = (int)((rng_state = rng_state * 6364136223846793005ull + 1) >> 62);
                int b = (a + 1 + (int)(frand() + 0.5f > 0.5f)) % 4;
                int lo = a < b ? a : b, hi = a < b ? b : a;
                for (int q = 0; q < 4; q++) W[(size_t)r * C + 4 * g + q] = 0;
                float v0 = frand(), v1 = frand();
                W[(size_t)r * C + 4 * g + lo] = v0;
                W[(size_t)r * C + 4 * g + hi] = v1;
                s.v[(size_t)r * C / 2 + 2 * g] = v0;
                s.v[(size_t)r * C / 2 + 2 * g + 1] = v1;
                s.pos[(size_t)r * C / 8 + g / 2] |= (uint8_t)((lo | hi << 2) << ((g & 1) * 4));
                cs.v[(size_t)r * C / 2 + 2 * g] = v0;
                cs.v[(size_t)r * C / 2 + 2 * g + 1] = v1;
                cs.idx[(size_t)r * C / 2 + 2 * g] = (uint16_t)(4 * g + lo);
                cs.idx[(size_t)r * C / 2 + 2 * g + 1] = (uint16_t)(4 * g + hi);
            }
        kern_wt wt = {KILN_DTYPE_F32, KERN_W_OUT_IN, R, C, W};
        uint16_t *Wb = malloc((size_t)R * C * sizeof *Wb);
        for (size_t i = 0; i < (size_t)R * C; i++) Wb[i] = f32_to_bf16(W[i]);
        kern_wt wb = {KILN_DTYPE_BF16, KERN_W_OUT_IN, R, C, Wb};
        uint16_t *vb = malloc((size_t)R * C / 2 * sizeof *vb);
        for (size_t i = 0; i < (size_t)R * C / 2; i++) vb[i] = f32_to_bf16(s.v[i]);
        for (size_t ti = 0; ti < sizeof Ts / sizeof *Ts; ti++) {
            int T = Ts[ti];
            float *X = malloc((size_t)T * C * sizeof *X), *XT = malloc((size_t)T * C * sizeof *XT);
            float *Y0 = malloc((size_t)T * R * sizeof *Y0), *Y = malloc((size_t)T * R * sizeof *Y);
            float *YT = malloc((size_t)T * R * sizeof *YT);
            for (size_t i = 0; i < (size_t)T * C; i++) X[i] = frand();
            for (int t = 0; t < T; t++)
                for (int c = 0; c < C; c++) XT[(size_t)c * T + t] = X[(size_t)t * C + c];
            double best[7] = {1e30, 1e30, 1e30, 1e30, 1e30, 1e30, 1e30};
            bool ok = true;
            for (int k = 0; k < 7; k++)
                for (int rep = 0; rep < reps + 1; rep++) {
                    double t0 = now();
                    if (k == 0) ops->linear(gm, Y0, X, T, &wt, NULL);
                    else if (k == 1) csr_gemv(&cs, R, X, T, C, Y);
                    else if (k == 2) s24_gemv(&s, R, X, T, C, Y);
                    else if (k == 3) s24_gemm_t(&s, R, XT, T, C, YT);
                    else if (k == 4 && avx) s24_avx512(&s, R, X, T, C, Y);
                    else if (k == 5) ops->linear(gm, Y, X, T, &wb, NULL);
                    else if (k == 6 && avx) s24_bf16_avx512(&s, vb, R, X, T, C, Y);
                    double dt = now() - t0;
                    if (rep > 0 && dt < best[k]) best[k] = dt; /* rep 0 warms up */
                    if (rep == 0 && k > 0 && k < 5 && (k != 4 || avx))
                        for (int t = 0; t < T; t++)
                            for (int r = 0; r < R; r++) {
                                float want = Y0[(size_t)t * R + r];
                                float got = k == 3 ? YT[(size_t)r * T + t] : Y[(size_t)t * R + r];
                                if (fabsf(want - got) > 1e-4f * (1.0f + fabsf(want))) ok = false;
                            }
                }
            if (!avx) best[4] = best[6] = NAN; /* not run on this CPU */
            printf("%-23s %3d %7.1f %7.1f %7.1f %7.1f %7.1f %7.1f %7.1f | %5.2f %5.2f %5.2f "
                   "%5.2f %7.2f | %.2f%s\n",
                   shapes[si].what, T, best[0] * 1e6, best[5] * 1e6, best[1] * 1e6,
                   best[2] * 1e6, best[3] * 1e6, best[4] * 1e6, best[6] * 1e6,
                   best[0] / best[5], best[0] / best[1], best[0] / best[2], best[0] / best[3],
                   avx ? best[0] / best[4] : 0.0, avx ? best[5] / best[6] : 0.0,
                   ok ? "" : "  MISMATCH");
            free(X);
            free(XT);
            free(Y0);
            free(Y);
            free(YT);
        }
        free(W);
        free(Wb);
        free(vb);
        free(cs.v);
        free(cs.idx);
        free(s.v);
        free(s.pos);
    }
    kern_gemm_free(gm);
    bench_structured(config, threads, 5);
    return 0;
}
