/*
 * bench_decode.c — inference speed of the benchmark model
 * (configs/bench-gpt2-30m.json, random weights) in fp32 and bf16: decode
 * tokens/s at batch 1 and batch 8, and prefill tokens/s, each beside the
 * memory-bandwidth roofline measured in the same run: a streaming read of
 * as many bytes as the engine's weights, which bounds decoding (every
 * weight byte is read once per step). The roofline is re-measured around
 * every timing and the faster of the two is used, so a ratio compares
 * numbers taken under the same load (the machine is shared).
 *
 *   bench_decode [CONFIG] [THREADS]
 */
#include "infer/infer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double roofline_bps(const void *buf, size_t n, int nth)
{
    double best = 0;
    volatile double sink = 0;
    for (int r = 0; r < 8; r++) {
        double t0 = kiln_time_now();
        sink += ik_stream_read(buf, n, nth);
        double dt = kiln_time_now() - t0;
        if (n / dt > best) best = n / dt;
    }
    (void)sink;
    return best;
}

static int32_t tok_of(int i, int V) { return (int32_t)((i * 2654435761u) % (unsigned)V); }

/* Seconds of the fastest decode step at batch B (each slot prefilled with
 * 16 tokens first, then `steps` timed decode steps): on a shared machine
 * the fastest step is the one least disturbed, like the best roofline
 * read. *median gets the median step. */
static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double decode_step_secs(kiln_ctx *ctx, kiln_engine *e, int B, int steps, int V,
                               float *logits, double *median)
{
    double best = 1e30;
    kiln_engine_tok tk[64];
    double *all = malloc(sizeof(double) * (size_t)steps * 2);
    int na = 0;
    for (int rep = 0; rep < 2; rep++) {
        for (int b = 0; b < B; b++) {
            int32_t p[16];
            for (int i = 0; i < 16; i++) p[i] = tok_of(b * 16 + i, V);
            kiln_engine_reset(e, b);
            if (kiln_engine_prefill(ctx, e, b, p, 16, logits)) return -1;
        }
        for (int s = 0; s < steps; s++) {
            for (int b = 0; b < B; b++) tk[b] = (kiln_engine_tok){b, tok_of(s * B + b, V), true};
            double t0 = kiln_time_now();
            if (kiln_engine_step(ctx, e, tk, B, logits)) { free(all); return -1; }
            double dt = kiln_time_now() - t0;
            all[na++] = dt;
            if (dt < best) best = dt;
        }
    }
    qsort(all, (size_t)na, sizeof(double), cmp_d);
    if (median) *median = all[na / 2];
    free(all);
    return best;
}

static double prefill_secs(kiln_ctx *ctx, kiln_engine *e, int n, int V, float *logits)
{
    int32_t *p = malloc((size_t)n * sizeof(int32_t));
    for (int i = 0; i < n; i++) p[i] = tok_of(i, V);
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        kiln_engine_reset(e, 0);
        double t0 = kiln_time_now();
        if (kiln_engine_prefill(ctx, e, 0, p, n, logits)) { free(p); return -1; }
        double dt = kiln_time_now() - t0;
        if (dt < best) best = dt;
    }
    free(p);
    return best;
}

int main(int argc, char **argv)
{
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
    printf("model %s: %zu parameters, n_ctx %d; threads %s\n", cfg_path,
           kiln_model_num_params(m), cfg.n_ctx, nth > 0 ? argv[2] : "all");
    float *logits = malloc((size_t)64 * V * sizeof(float));
    for (int w = 0; w < 2; w++) {
        kiln_engine_opts o = kiln_engine_opts_default();
        o.n_slots = 8;
        o.chunk = PRE;
        o.wtype = w ? KILN_WTYPE_BF16 : KILN_WTYPE_F32;
        kiln_engine *e = NULL;
        if (kiln_engine_new(ctx, m, &o, &e)) {
            fprintf(stderr, "bench_decode: %s\n", kiln_errmsg(ctx));
            return 1;
        }
        const char *dt = w ? "bf16" : "fp32";
        size_t wb = kiln_engine_weight_bytes(e);
        unsigned char *buf = kiln_aligned_alloc(ctx, wb);
        memset(buf, 1, wb);
        /* warm up */
        decode_step_secs(ctx, e, 1, 4, V, logits, NULL);

        double bw0 = roofline_bps(buf, wb, nth);
        double med1, med8;
        double s1 = decode_step_secs(ctx, e, 1, 48, V, logits, &med1);
        double bw1 = roofline_bps(buf, wb, nth);
        double bw = bw0 > bw1 ? bw0 : bw1;
        double roof = bw / (double)wb; /* steps/s if only the weights cost */
        printf("decode %s batch 1: %8.1f tok/s (%.2f ms/token; median %.2f) | roofline %8.1f tok/s "
               "(%.1f GB/s over %.1f MB of weights) | %.0f%% of roofline\n",
               dt, 1 / s1, s1 * 1e3, med1 * 1e3, roof, bw / 1e9, wb / 1e6, 100.0 / s1 / roof);

        bw0 = roofline_bps(buf, wb, nth);
        double s8 = decode_step_secs(ctx, e, 8, 24, V, logits, &med8);
        bw1 = roofline_bps(buf, wb, nth);
        bw = bw0 > bw1 ? bw0 : bw1;
        roof = bw / (double)wb;
        printf("decode %s batch 8: %8.1f tok/s (%.2f ms/step; median %.2f) | roofline %8.1f steps/s | "
               "step at %.0f%% of roofline, %.1fx the batch-1 throughput\n",
               dt, 8 / s8, s8 * 1e3, med8 * 1e3, roof, 100.0 / s8 / roof, (8 / s8) * s1);

        bw0 = roofline_bps(buf, wb, nth);
        double sp = prefill_secs(ctx, e, PRE, V, logits);
        bw1 = roofline_bps(buf, wb, nth);
        bw = bw0 > bw1 ? bw0 : bw1;
        double flops = 2.0 * (double)(wb / (w ? 2 : 4)) * PRE;
        printf("prefill %s %d tokens: %8.1f tok/s (%.1f GFLOP/s) | %.1fx the batch-1 decode rate "
               "| roofline-bound rate for one pass %.1f tok/s x %d\n",
               dt, PRE, PRE / sp, flops / sp / 1e9, (PRE / sp) * s1, bw / (double)wb, PRE);
        free(buf);
        kiln_engine_free(e);
    }
    free(logits);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    return 0;
}
