/*
 * bench_attention.c — the bf16 AMX flash attention (attn_amx.c) against
 * the fp32 AVX-512 flash attention of the fast kernel table (the reference,
 * what the bf16 training step ran before), at the benchmark model's
 * attention shape (configs/bench-gpt2-30m.json: B 8, T 256, NH 8, HS 64).
 * Both read the same bf16-rounded q, k, v (fp32 widened for the reference,
 * bf16 for AMX: what model/pass.c hands each). Forward and backward are
 * timed separately, interleaved rep by rep (fp32 fwd, AMX fwd, fp32 bwd,
 * AMX bwd) so that a noisy machine slows both alike; each figure is the
 * best of --reps with the worst in brackets, ratios use the best.
 *
 * Usage: bench_attention [--reps R] [--threads N] [--B b] [--T t] [--NH n]
 *                        [--KVH k] [--HS s]
 * --threads defaults to 1: on this shared 2-vCPU machine two threads wait
 * for each other in scheduler quanta and both kernels read ~16 ms.
 */
#include "kiln.h"
#include "kernels/kernels.h"
#include "kernels/x86/bf16.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct stat {
    double best, worst;
} stat;

static void add(stat *s, double t)
{
    if (t < s->best) s->best = t;
    if (t > s->worst) s->worst = t;
}

int main(int argc, char **argv)
{
    int reps = 15, threads = 1, B = 8, T = 256, NH = 8, KVH = 8, HS = 64;
    for (int i = 1; i + 1 < argc; i += 2) {
        int v = atoi(argv[i + 1]);
        if (!strcmp(argv[i], "--reps")) reps = v;
        else if (!strcmp(argv[i], "--threads")) threads = v;
        else if (!strcmp(argv[i], "--B")) B = v;
        else if (!strcmp(argv[i], "--T")) T = v;
        else if (!strcmp(argv[i], "--NH")) NH = v;
        else if (!strcmp(argv[i], "--KVH")) KVH = v;
        else if (!strcmp(argv[i], "--HS")) HS = v;
        else {
            fprintf(stderr, "bench_attention: unknown flag %s (see the file comment)\n", argv[i]);
            return 2;
        }
    }
    if (reps < 1 || threads < 1 || B < 1 || T < 1 || NH < 1 || KVH < 1 || NH % KVH || HS < 1) {
        fprintf(stderr, "bench_attention: --reps, --threads and the shape must be >= 1, NH a multiple of KVH\n");
        return 2;
    }
#ifdef _OPENMP
    omp_set_num_threads(threads);
#else
    threads = 1;
#endif
    printf("attention B %d T %d NH %d KVH %d HS %d, %d thread(s), best of %d [worst]\n", B, T, NH,
           KVH, HS, threads, reps);
    if (!mp_attention_amx_ok(HS, (T + 31) / 32 * 32)) {
        printf("SKIP: AMX attention not available here (AMX usable: %s, HS %d)\n",
               mp_amx_usable() ? "yes" : "no", HS);
        return 0;
    }
    if (!mp_attention_amx_ok(HS, T))
        printf("(at this T the model runs the fp32 kernel: too much of the last block is padding)\n");
    size_t nq = (size_t)B * T * (NH + 2 * KVH) * HS, no = (size_t)B * T * NH * HS;
    size_t nl = (size_t)B * NH * T;
    float *qkv = malloc(nq * 4), *dout = malloc(no * 4), *out = malloc(no * 4);
    float *lse = malloc(nl * 4), *dqkv = malloc(nq * 4);
    uint16_t *qkvh = malloc(nq * 2);
    kiln_rng rng;
    kiln_rng_seed(&rng, 1);
    for (size_t i = 0; i < nq; i++) qkv[i] = kiln_rng_normal(&rng);
    for (size_t i = 0; i < no; i++) dout[i] = kiln_rng_normal(&rng);
    mp_f32_to_bf16(qkv, qkvh, nq);
    mp_bf16_to_f32(qkvh, qkv, nq);
    const kern_ops *F = kern_ops_fast();
    kern_gemm *g = kern_gemm_fast_new();
    stat s[4];
    for (int k = 0; k < 4; k++) s[k] = (stat){1e30, 0};
    for (int r = 0; r <= reps; r++) { /* rep 0 warms up, not counted */
        double t0 = now();
        F->attention_fwd(g, out, lse, qkv, B, T, NH, KVH, HS);
        double t1 = now();
        mp_attention_fwd_amx(out, lse, qkvh, B, T, NH, KVH, HS);
        double t2 = now();
        F->attention_bwd(g, dqkv, dout, qkv, out, lse, B, T, NH, KVH, HS);
        double t3 = now();
        mp_attention_bwd_amx(dqkv, dout, qkvh, out, lse, B, T, NH, KVH, HS);
        double t4 = now();
        if (r == 0) continue;
        add(&s[0], t1 - t0);
        add(&s[1], t2 - t1);
        add(&s[2], t3 - t2);
        add(&s[3], t4 - t3);
    }
    const char *name[2] = {"forward ", "backward"};
    for (int k = 0; k < 2; k++)
        printf("%s  fp32 %7.2f ms [%7.2f]   amx bf16 %7.2f ms [%7.2f]   speedup %.2fx\n", name[k],
               1e3 * s[2 * k].best, 1e3 * s[2 * k].worst, 1e3 * s[2 * k + 1].best,
               1e3 * s[2 * k + 1].worst, s[2 * k].best / s[2 * k + 1].best);
    free(qkv); free(dout); free(out); free(lse); free(dqkv); free(qkvh);
    kern_gemm_free(g);
    return 0;
}
