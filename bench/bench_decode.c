/*
 * bench_decode.c — inference speed of the benchmark model
 * (configs/bench-gpt2-30m.json, random weights) with its matrices in fp32,
 * bf16 and the block-quantized types Q8_0, Q6_K, Q4_K, Q4_0: decode
 * tokens/s at batch 1 and batch 8, and prefill tokens/s, each beside the
 * memory-bandwidth roofline measured in the same run: a streaming read of
 * as many bytes as the engine's weights, which bounds decoding (every
 * weight byte is read once per step). Roofline reads and engine steps are
 * interleaved round by round and the best of each is compared, so a ratio
 * compares numbers taken under the same load (the machine is shared);
 * medians are printed beside them.
 *
 *   bench_decode [CONFIG] [THREADS]
 *   bench_decode FILE.gguf [THREADS] [REPS]
 *
 * With a .gguf file, the engine runs the file's own tensor types (as
 * `kiln generate` does; an F16 matrix, which the engine does not keep,
 * is prepared as BF16: the same bytes per weight) and prints one line:
 * batch-1 decode and 128-token prefill tok/s, the best of REPS rounds
 * [64], the roofline of the same weight bytes, and the resident memory
 * after load (bench/bench_llamacpp.sh compares it with llama-bench).
 */
#include "infer/infer.h"
#include "kernels/kernels.h"
#include "bench_cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int32_t tok_of(int i, int V) { return (int32_t)((i * 2654435761u) % (unsigned)V); }

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Timings of one kind: best (the least disturbed) and median. */
typedef struct timing {
    double best, median;
} timing;

static timing summarize(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    return (timing){v[0], v[n / 2]};
}

/* Runs `reps` rounds; each round times one streaming read of the weight
 * bytes (the roofline) and then one engine step of `B` decodes (or, when
 * prefill > 0, one prefill of that many tokens). Interleaving puts both
 * under the same load, and the best of each is compared. */
static void measure(kiln_ctx *ctx, kiln_engine *e, const void *buf, size_t wb, int nth, int B,
                    int prefill, int reps, int V, float *logits, timing *roof, timing *eng)
{
    double *tr = malloc(sizeof(double) * (size_t)reps), *te = malloc(sizeof(double) * (size_t)reps);
    int32_t p[256];
    kiln_engine_tok tk[64];
    volatile double sink = 0;
    for (int r = 0; r < reps; r++) {
        /* keep every slot's position small and equal from round to round */
        if (prefill > 0 || r % 32 == 0)
            for (int b = 0; b < (prefill > 0 ? 1 : B); b++) {
                int n = prefill > 0 ? 1 : 16;
                for (int i = 0; i < n; i++) p[i] = tok_of(b * 16 + i, V);
                kiln_engine_reset(e, b);
                kiln_engine_prefill(ctx, e, b, p, n, logits);
                if (prefill > 0) kiln_engine_reset(e, 0);
            }
        double t0 = kiln_time_now();
        sink += kern_stream_read(buf, wb, nth);
        double t1 = kiln_time_now();
        if (prefill > 0) {
            for (int i = 0; i < prefill; i++) p[i] = tok_of(r * 7 + i, V);
            kiln_engine_prefill(ctx, e, 0, p, prefill, logits);
        } else {
            for (int b = 0; b < B; b++) tk[b] = (kiln_engine_tok){b, tok_of(r * B + b, V), true};
            kiln_engine_step(ctx, e, tk, B, logits);
        }
        double t2 = kiln_time_now();
        tr[r] = t1 - t0;
        te[r] = t2 - t1;
    }
    (void)sink;
    *roof = summarize(tr, reps);
    *eng = summarize(te, reps);
    free(tr);
    free(te);
}

/* VmRSS of this process in MB (0 where /proc is absent). */
static double rss_mb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) kb = atof(line + 6);
    if (f) fclose(f);
    return kb / 1024;
}

static int bench_gguf(const char *path, int nth, int reps)
{
    kiln_ctx *ctx = kiln_ctx_new();
    if (nth > 0) kiln_set_threads(ctx, nth);
    kiln_model *m = NULL;
    kiln_engine *e = NULL;
    kiln_engine_opts o = kiln_engine_opts_default();
    o.wtype = KILN_DTYPE_BF16; /* for what the engine does not keep as stored (F16) */
    o.weights_gguf = path;
    if (kiln_model_load(ctx, path, &m)) {
        fprintf(stderr, "bench_decode: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    const kiln_config cfg = *kiln_model_config(m);
    const int V = cfg.vocab_size, PRE = KILN_MIN(128, cfg.n_ctx - 1);
    o.chunk = PRE;
    if (kiln_engine_new(ctx, m, &o, &e)) {
        fprintf(stderr, "bench_decode: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    kiln_model_free(m);
    double rss = rss_mb();
    float *logits = malloc((size_t)PRE * V * sizeof(float));
    size_t wb = kiln_engine_weight_bytes(e);
    unsigned char *buf = kiln_aligned_alloc(ctx, wb);
    memset(buf, 1, wb);
    timing roof, t1, tp;
    measure(ctx, e, buf, wb, nth, 1, 0, 8, V, logits, &roof, &t1); /* warm up */
    measure(ctx, e, buf, wb, nth, 1, 0, reps, V, logits, &roof, &t1);
    timing roof_p;
    measure(ctx, e, buf, wb, nth, 1, PRE, KILN_MAX(3, reps / 8), V, logits, &roof_p, &tp);
    printf("gguf %s: decode %.1f tok/s (median %.1f) | prefill %d %.1f tok/s (median %.1f) | "
           "weights %.2f MB | roofline %.1f tok/s (%.2f GB/s) | %.0f%% of roofline | rss %.1f MB\n",
           path, 1 / t1.best, 1 / t1.median, PRE, PRE / tp.best, PRE / tp.median, wb / 1e6,
           1 / roof.best, wb / roof.best / 1e9, 100.0 * roof.best / t1.best, rss);
    free(buf);
    free(logits);
    kiln_engine_free(e);
    kiln_ctx_free(ctx);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        size_t n = strlen(argv[1]);
        if (n > 5 && !strcmp(argv[1] + n - 5, ".gguf"))
            return bench_gguf(argv[1], argc > 2 ? atoi(argv[2]) : 0, argc > 3 ? atoi(argv[3]) : 64);
    }

    const char *root = getenv("KILN_ROOT");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/bench-gpt2-30m.json", root ? root : ".");
    const char *cfg_path = argc > 1 && argv[1][0] ? argv[1] : path;
    int nth = argc > 2 ? atoi(argv[2]) : 0;
    kiln_ctx *ctx = kiln_ctx_new();
    if (nth > 0) kiln_set_threads(ctx, nth);
    kiln_config cfg;
    kiln_model *m = NULL;
    if (kiln_config_load(ctx, cfg_path, &cfg) || kiln_model_new(ctx, &cfg, &m)) {
        fprintf(stderr, "bench_decode: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    kiln_model_init_random(m, 1);
    const int V = cfg.vocab_size, PRE = KILN_MIN(128, cfg.n_ctx - 1);
    bench_print_cpu();
    printf("model %s: %zu parameters, n_ctx %d; threads %s\n", cfg_path,
           kiln_model_num_params(m), cfg.n_ctx, nth > 0 ? argv[2] : "all");
    /* the kernels the engine's paths take here (kernels.h's linear op) */
    printf("kernels: decode (T < %d) fp32 rows streamed %s; bf16 rows %s; Q types %s; prefill "
           "(T >= %d) fp32 GEMM %s (bf16 and Q weights widened first)\n",
           KERN_GEMM_MIN_T, kern_cpu_avx512() ? "with AVX-512" : "by the portable loop",
           KERN_BF16_DOT ? "dotted with bf16 activations (AVX512_BF16)"
                         : "widened to fp32 (no AVX512_BF16 in this build)",
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__)
           kern_cpu_avx512() ? "in int8 on AVX512-VNNI" : "in int8, portable",
#else
           "in int8, portable (no AVX512-VNNI in this build)",
#endif
           KERN_GEMM_MIN_T, "(the cpu line's)");
    float *logits = malloc((size_t)64 * V * sizeof(float));
    const kiln_dtype types[] = {KILN_DTYPE_F32, KILN_DTYPE_BF16, KILN_DTYPE_Q8_0,
                                KILN_DTYPE_Q6_K, KILN_DTYPE_Q4_K, KILN_DTYPE_Q4_0};
    double n_weights = 0; /* matrix weights streamed per step (from the fp32 engine) */
    for (int w = 0; w < (int)(sizeof types / sizeof types[0]); w++) {
        kiln_engine_opts o = kiln_engine_opts_default();
        o.n_slots = 8;
        o.chunk = PRE;
        o.wtype = types[w];
        kiln_engine *e = NULL;
        if (kiln_engine_new(ctx, m, &o, &e)) {
            fprintf(stderr, "bench_decode: %s\n", kiln_errmsg(ctx));
            return 1;
        }
        const char *dt = types[w] == KILN_DTYPE_F32 ? "fp32" : kiln_dtype_name(types[w]);
        size_t wb = kiln_engine_weight_bytes(e);
        if (w == 0) n_weights = wb / 4.0;
        unsigned char *buf = kiln_aligned_alloc(ctx, wb);
        memset(buf, 1, wb);
        timing roof, t1, t8, tp;
        measure(ctx, e, buf, wb, nth, 1, 0, 8, V, logits, &roof, &t1); /* warm up */
        measure(ctx, e, buf, wb, nth, 1, 0, 64, V, logits, &roof, &t1);
        double bw = wb / roof.best, rt = 1 / roof.best; /* steps/s if only the weights cost */
        printf("decode %s batch 1: %8.1f tok/s (best step %.2f ms, median %.2f) | roofline %8.1f "
               "tok/s (%.1f GB/s over %.1f MB of weights; median read %.2f ms) | %.0f%% of roofline\n",
               dt, 1 / t1.best, t1.best * 1e3, t1.median * 1e3, rt, bw / 1e9, wb / 1e6,
               roof.median * 1e3, 100.0 * roof.best / t1.best);
        measure(ctx, e, buf, wb, nth, 8, 0, 48, V, logits, &roof, &t8);
        printf("decode %s batch 8: %8.1f tok/s (best step %.2f ms, median %.2f) | roofline %8.1f "
               "steps/s | step at %.0f%% of roofline; %.1fx the batch-1 throughput\n",
               dt, 8 / t8.best, t8.best * 1e3, t8.median * 1e3, 1 / roof.best,
               100.0 * roof.best / t8.best, t1.best * 8 / t8.best);
        measure(ctx, e, buf, wb, nth, 1, PRE, 12, V, logits, &roof, &tp);
        double flops = 2.0 * n_weights * PRE;
        printf("prefill %s %d tokens: %8.1f tok/s (best %.1f ms, median %.1f; %.1f GFLOP/s) | "
               "%.1fx the batch-1 decode rate\n",
               dt, PRE, PRE / tp.best, tp.best * 1e3, tp.median * 1e3, flops / tp.best / 1e9,
               (PRE / tp.best) * t1.best);
        free(buf);
        kiln_engine_free(e);
    }
    free(logits);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    return 0;
}
