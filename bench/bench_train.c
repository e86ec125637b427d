/*
 * bench_train.c — training-step speed of the documented benchmark model
 * (configs/bench-gpt2-30m.json: gpt2, 8 layers, 512 wide, 8 heads, vocab
 * 8192, T=256, batch 8, ~30M parameters), fp32 forward + cross-entropy +
 * backward, against:
 *   - this machine's fp32 FMA peak, measured here by an AVX-512 FMA loop on
 *     the same threads;
 *   - PyTorch (bench/torch_train.py, /usr/bin/python3, OPENBLAS_CORETYPE=
 *     SkylakeX) training the same model in the same run.
 * Figures: mean over the timed steps, and the best (least disturbed) step
 * against the best FMA burst run between steps, since the machine may be
 * shared; plus both programs' tokens per CPU-second.
 * FLOPs per step = tokens * (6 * N + 12 * L * C * T), N = parameters that
 * take part in matrix products (all but the position table; the tied head
 * counts once), the second term being attention's QK^T and PV.
 *
 * Usage: bench_train [--steps N] [--threads N] [--no-torch] [--config F]
 *                    [--batch B] [--seq T] [--cpu-profile]
 * --cpu-profile reports the per-op profile in process CPU seconds.
 */
#include "kiln.h"
#include "model/model.h" /* per-op profile */
#include "bench_cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Peak fp32 FMA rate in GFLOP/s with nthreads threads: each runs 24
 * independent FMA chains (enough to cover latency x ports). */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double fma_peak(int nthreads, long iters, double *cpu_peak)
{
    double best = 0;
    *cpu_peak = 0;
    for (int rep = 0; rep < 1; rep++) {
        double t0 = kiln_time_now(), c0 = cpu_now();
        float sink = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : sink)
        {
#ifdef __AVX512F__
            /* 12 independent chains in registers (FMA latency 4 x 2 ports
             * = 8 needed); written out so the compiler keeps them there. */
            __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-7f);
            __m512 a0 = _mm512_set1_ps(0), a1 = _mm512_set1_ps(1), a2 = _mm512_set1_ps(2),
                   a3 = _mm512_set1_ps(3), a4 = _mm512_set1_ps(4), a5 = _mm512_set1_ps(5),
                   a6 = _mm512_set1_ps(6), a7 = _mm512_set1_ps(7), a8 = _mm512_set1_ps(8),
                   a9 = _mm512_set1_ps(9), a10 = _mm512_set1_ps(10), a11 = _mm512_set1_ps(11);
            for (long it = 0; it < iters * 2; it++) {
                a0 = _mm512_fmadd_ps(a0, x, y); a1 = _mm512_fmadd_ps(a1, x, y);
                a2 = _mm512_fmadd_ps(a2, x, y); a3 = _mm512_fmadd_ps(a3, x, y);
                a4 = _mm512_fmadd_ps(a4, x, y); a5 = _mm512_fmadd_ps(a5, x, y);
                a6 = _mm512_fmadd_ps(a6, x, y); a7 = _mm512_fmadd_ps(a7, x, y);
                a8 = _mm512_fmadd_ps(a8, x, y); a9 = _mm512_fmadd_ps(a9, x, y);
                a10 = _mm512_fmadd_ps(a10, x, y); a11 = _mm512_fmadd_ps(a11, x, y);
            }
            __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                     _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
            s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
            sink += _mm512_reduce_add_ps(s);
#else
            float a[24 * 16];
            for (int i = 0; i < 24 * 16; i++) a[i] = (float)i;
            for (long it = 0; it < iters; it++)
                for (int i = 0; i < 24 * 16; i++) a[i] = a[i] * 0.999999f + 1e-7f;
            for (int i = 0; i < 24 * 16; i++) sink += a[i];
#endif
        }
        double dt = kiln_time_now() - t0, dc = cpu_now() - c0;
        double flops = (double)iters * 24 * 16 * 2 * nthreads;
        if (sink == 12345.0f) printf(" ");
        if (flops / dt / 1e9 > best) best = flops / dt / 1e9;
        if (flops / dc / 1e9 * nthreads > *cpu_peak) *cpu_peak = flops / dc / 1e9 * nthreads;
    }
    return best;
}

/* Runs bench/torch_train.py; returns its tokens/s (0 when unavailable) and
 * fills its thread count and tokens per CPU second. */
static double run_torch(const char *root, const char *config, int B, int T, int steps,
                        int threads, int *torch_threads, double *cpu_tps, double *best_tps)
{
    char cmd[2048], line[512];
    snprintf(cmd, sizeof cmd,
             "OPENBLAS_CORETYPE=SkylakeX /usr/bin/python3 '%s/bench/torch_train.py' "
             "--config '%s' --batch %d --seq %d --steps %d --threads %d 2>/dev/null",
             root, config, B, T, steps, threads);
    FILE *p = popen(cmd, "r");
    double tps = 0;
    while (p && fgets(line, sizeof line, p)) {
        sscanf(line, "torch_threads %d", torch_threads);
        sscanf(line, "torch_tokens_per_s %lf", &tps);
        sscanf(line, "torch_tokens_per_cpu_s %lf", cpu_tps);
        sscanf(line, "torch_best_tokens_per_s %lf", best_tps);
    }
    if (p) pclose(p);
    return tps;
}

int main(int argc, char **argv)
{
    int steps = 3, threads = 0, B = 8, T = 256;
    int torch = 1, cpu = 0;
    const char *config = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) B = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seq") && i + 1 < argc) T = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--config") && i + 1 < argc) config = argv[++i];
        else if (!strcmp(argv[i], "--no-torch")) torch = 0;
        else if (!strcmp(argv[i], "--cpu-profile")) cpu = 1;
        else {
            fprintf(stderr, "usage: bench_train [--steps N] [--threads N] [--no-torch] "
                            "[--config F] [--batch B] [--seq T] [--cpu-profile]\n");
            return 2;
        }
    }
    const char *root = getenv("KILN_ROOT");
    if (!root) root = ".";
    char cpath[1024];
    if (!config) {
        snprintf(cpath, sizeof cpath, "%s/configs/bench-gpt2-30m.json", root);
        config = cpath;
    }
    if (steps < 1) steps = 1;

    bench_print_cpu();
    /* PyTorch first: with --threads 0 both run at PyTorch's default thread
     * count (its physical-core count), so the comparison is like for like. */
    int tthreads = 0;
    double ttps = 0, tcpu = 0, tbest = 0;
    if (torch) ttps = run_torch(root, config, B, T, steps, threads, &tthreads, &tcpu, &tbest);
#ifdef _OPENMP
    int nt = threads > 0 ? threads : tthreads > 0 ? tthreads : omp_get_max_threads();
#else
    int nt = 1;
#endif
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, nt);
    kiln_config cfg;
    kiln_model *m = NULL;
    if (kiln_config_load(ctx, config, &cfg) || kiln_model_new(ctx, &cfg, &m) ||
        kiln_model_prepare(ctx, m, B, T)) {
        fprintf(stderr, "bench_train: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    kiln_model_init_random(m, 1);
    size_t N = kiln_model_num_params(m);
    if (cfg.arch == KILN_ARCH_GPT2) N -= (size_t)cfg.n_ctx * cfg.n_embd;
    double flops = (double)B * T * (6.0 * (double)N + 12.0 * cfg.n_layer * cfg.n_embd * T);

    int32_t *tok = malloc(sizeof(int32_t) * (size_t)B * (T + 1));
    kiln_rng r;
    kiln_rng_seed(&r, 7);
    for (int i = 0; i < B * (T + 1); i++)
        tok[i] = (int32_t)kiln_rng_below(&r, (uint64_t)cfg.vocab_size);
    int32_t *tgt = malloc(sizeof(int32_t) * (size_t)B * T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) tgt[b * T + t] = tok[b * (T + 1) + t + 1];
    int32_t *inp = malloc(sizeof(int32_t) * (size_t)B * T);
    for (int b = 0; b < B; b++) memcpy(inp + b * T, tok + b * (T + 1), sizeof(int32_t) * T);

    double tf = 0, tb = 0, tce = 0, tcpu_k = 0, best = 1e30, loss = 0, peak = 0, peak_c = 0;
    for (int s = 0; s <= steps; s++) { /* step 0 warms up */
        if (s == 1) {
            m->profile = cpu ? 2 : 1;
            memset(m->prof, 0, sizeof m->prof);
        }
        double c0 = cpu_now(), t0 = kiln_time_now();
        float *logits;
        kiln_model_forward(ctx, m, inp, B, T, &logits);
        double ls = 0, ws = 0, tc = kiln_time_now();
        kiln_cross_entropy(ctx, logits, tgt, NULL, (int64_t)B * T, cfg.vocab_size,
                           1.0f / (B * T), logits, &ls, &ws);
        double t1 = kiln_time_now();
        kiln_model_zero_grad(m);
        kiln_model_backward(ctx, m, logits);
        double t2 = kiln_time_now(), c1 = cpu_now();
        loss = ls / ws;
        if (s > 0) {
            tce += t1 - tc;
            tf += t1 - t0;
            tb += t2 - t1;
            tcpu_k += c1 - c0;
            if (t2 - t0 < best) best = t2 - t0;
            /* an FMA burst right after each step samples the peak under
             * the same load (~50 ms) */
            double pc, pw = fma_peak(nt, 10000000, &pc);
            if (pw > peak) peak = pw;
            if (pc > peak_c) peak_c = pc;
        }
    }
    double step = (tf + tb) / steps;
    double tps = B * T / step, gf = flops / step / 1e9;
    double kcpu = (double)B * T * steps / tcpu_k; /* tokens per CPU second */
    double bgf = flops / best / 1e9;
    printf("config      %s (B=%d, T=%d, %zu matmul params, %.1f GFLOP/step)\n", config, B, T,
           N, flops / 1e9);
    printf("threads     %d (kiln and pytorch)\n", nt);
    printf("kernel      fp32 products on %s (kiln_model's GEMM)\n", m->gemm ? m->gemm->name : "?");
    printf("kiln        %.1f tokens/s  %.1f GFLOP/s  (step %.3f s: forward+loss %.3f, "
           "backward %.3f; best step %.3f s; loss %.4f)\n",
           tps, gf, step, tf / steps, tb / steps, best, loss);
    printf("profile%s", cpu ? " (CPU s)" : "    ");
    for (int i = 0; i < MODEL_PROF_N; i++)
        printf(" %s %.3f,", model_prof_names[i], m->prof[i] / steps);
    printf(" cross-entropy %.3f (wall) s/step\n", tce / steps);
    printf("fma peak    %.1f GFLOP/s fp32 (best burst between steps), %.1f per CPU-second "
           "(%d threads)\n", peak, peak_c, nt);
    printf("kiln/peak   %.1f%% best step vs best burst (%.1f GFLOP/s); %.1f%% per CPU-second "
           "(%.1f GFLOP per CPU-second); %.1f%% mean step\n",
           100.0 * bgf / peak, bgf, 100.0 * flops * kcpu / (B * T) / 1e9 / peak_c,
           flops * kcpu / (B * T) / 1e9, 100.0 * gf / peak);
    if (torch && ttps > 0) {
        double tgf = flops * ttps / (B * T) / 1e9;
        double tbgf = flops * tbest / (B * T) / 1e9;
        printf("pytorch     %.1f tokens/s  %.1f GFLOP/s mean; best step %.1f tokens/s "
               "%.1f GFLOP/s (%.1f%% of peak); %.1f tokens per CPU-second\n",
               ttps, tgf, tbest, tbgf, 100.0 * tbgf / peak, tcpu);
        printf("kiln/torch  %.2fx best step, %.2fx mean, %.2fx per CPU-second (kiln: best "
               "%.1f tokens/s, %.1f tokens per CPU-second)\n",
               tbest > 0 ? (B * T / best) / tbest : 0.0, tps / ttps,
               tcpu > 0 ? kcpu / tcpu : 0.0, B * T / best, kcpu);
    } else if (torch) {
        printf("pytorch     not measured (/usr/bin/python3 with torch not available)\n");
    }
    free(tok);
    free(tgt);
    free(inp);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    return 0;
}
