/*
 * bench_packing.c — SFT with packed rows (kiln_model_forward_pos:
 * attention kept inside each document) against one document per row,
 * padded to the longest (the reference): the same documents, the same
 * model, one training pass (forward + masked cross-entropy backward) over
 * all of them per rep, the two layouts interleaved rep by rep so that a
 * noisy machine slows both alike. Prints the real (non-padding) tokens
 * per second of each (best of --reps, worst in brackets), the ratio, the
 * rows and fill of each layout, and the loss per token of both (equal: the
 * same sum over the same tokens).
 *
 * Documents: --docs of lengths drawn uniformly from [--min-len, --T]
 * (seeded), every position learned. Packed: first fit into rows of --T.
 * Model: gpt2, --layers x --embd (heads of 64), vocab 512, context --T.
 *
 * Usage: bench_packing [--reps R] [--threads N] [--docs D] [--T t]
 *                      [--min-len m] [--batch B] [--layers L] [--embd C]
 *                      [--precision fp32|bf16]
 */
#include "kiln.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct layout {
    int rows, T;
    int32_t *tok, *tgt, *pos; /* pos NULL: plain causal rows */
    long used;                /* positions holding a document */
} layout;

/* One pass over the layout's rows in batches of B: loss sum and count. */
static double pass(kiln_ctx *ctx, kiln_model *m, const layout *l, int B, double *loss,
                   double *cnt)
{
    double t0 = now();
    *loss = *cnt = 0;
    for (int r = 0; r < l->rows; r += B) {
        int nb = l->rows - r < B ? l->rows - r : B;
        size_t o = (size_t)r * l->T;
        float *logits;
        kiln_model_zero_grad(m);
        if (kiln_model_forward_pos(ctx, m, l->tok + o, l->pos ? l->pos + o : NULL, nb, l->T,
                                   &logits) ||
            kiln_model_backward_ce(ctx, m, l->tgt + o, NULL, 1.0f, loss, cnt)) {
            fprintf(stderr, "bench_packing: %s\n", kiln_errmsg(ctx));
            exit(1);
        }
    }
    return now() - t0;
}

int main(int argc, char **argv)
{
    int reps = 3, threads = 1, docs = 64, T = 512, min_len = 16, B = 4, L = 4, C = 256;
    const char *prec = "fp32";
    for (int i = 1; i + 1 < argc; i += 2) {
        int v = atoi(argv[i + 1]);
        if (!strcmp(argv[i], "--reps")) reps = v;
        else if (!strcmp(argv[i], "--threads")) threads = v;
        else if (!strcmp(argv[i], "--docs")) docs = v;
        else if (!strcmp(argv[i], "--T")) T = v;
        else if (!strcmp(argv[i], "--min-len")) min_len = v;
        else if (!strcmp(argv[i], "--batch")) B = v;
        else if (!strcmp(argv[i], "--layers")) L = v;
        else if (!strcmp(argv[i], "--embd")) C = v;
        else if (!strcmp(argv[i], "--precision")) prec = argv[i + 1];
        else {
            fprintf(stderr, "bench_packing: unknown flag %s (see the file comment)\n", argv[i]);
            return 2;
        }
    }
    if (reps < 1 || docs < 1 || T < 2 || min_len < 1 || min_len > T || B < 1 || L < 1 ||
        C < 64 || C % 64) {
        fprintf(stderr, "bench_packing: bad sizes (see the file comment)\n");
        return 2;
    }
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, threads);
    kiln_config c = kiln_config_default();
    c.arch = KILN_ARCH_GPT2;
    c.n_layer = L, c.n_embd = C, c.n_head = C / 64, c.n_kv_head = C / 64, c.n_inner = 4 * C;
    c.vocab_size = 512, c.n_ctx = T, c.bias = true, c.tie_embeddings = true;
    kiln_model *m;
    if (kiln_model_new(ctx, &c, &m) ||
        kiln_model_set_precision(ctx, m, strcmp(prec, "bf16") ? KILN_PRECISION_FP32
                                                              : KILN_PRECISION_BF16)) {
        fprintf(stderr, "bench_packing: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    kiln_model_init_random(m, 1);
    /* the documents */
    kiln_rng g;
    kiln_rng_seed(&g, 42);
    int *len = malloc((size_t)docs * sizeof *len);
    int longest = 0;
    long total = 0;
    for (int d = 0; d < docs; d++) {
        len[d] = min_len + (int)kiln_rng_below(&g, (uint64_t)(T - min_len + 1));
        longest = len[d] > longest ? len[d] : longest;
        total += len[d];
    }
    int32_t *ids = malloc((size_t)total * 2 * sizeof *ids);
    for (long i = 0; i < 2 * total; i++) ids[i] = (int32_t)kiln_rng_below(&g, 512);
    /* padded: one per row of the longest */
    layout pad = {.rows = docs, .T = longest, .used = total};
    size_t cells = (size_t)docs * longest;
    pad.tok = malloc(cells * 4), pad.tgt = malloc(cells * 4);
    /* packed: first fit into rows of T */
    int *row = malloc((size_t)docs * sizeof *row), *at = malloc((size_t)docs * sizeof *at);
    int *fill = calloc((size_t)docs, sizeof *fill), prow = 0;
    for (int d = 0; d < docs; d++) {
        int r = 0;
        while (r < prow && fill[r] + len[d] > T) r++;
        if (r == prow) prow++;
        row[d] = r, at[d] = fill[r];
        fill[r] += len[d];
    }
    layout pk = {.rows = prow, .T = T, .used = total};
    size_t pcells = (size_t)prow * T;
    pk.tok = malloc(pcells * 4), pk.tgt = malloc(pcells * 4), pk.pos = malloc(pcells * 4);
    for (size_t i = 0; i < cells; i++) pad.tok[i] = 0, pad.tgt[i] = -1;
    for (size_t i = 0; i < pcells; i++) pk.tok[i] = 0, pk.tgt[i] = -1, pk.pos[i] = -1;
    long off = 0;
    for (int d = 0; d < docs; d++, off += 2 * len[d - 1]) {
        for (int j = 0; j < len[d]; j++) {
            size_t a = (size_t)d * longest + j, b = (size_t)row[d] * T + at[d] + j;
            pad.tok[a] = pk.tok[b] = ids[off + j];
            pad.tgt[a] = pk.tgt[b] = ids[off + j + 1];
            pk.pos[b] = j;
        }
    }
    for (int r = 0; r < prow; r++) /* each row's padding: a document of its own */
        for (int j = fill[r]; j < T; j++) pk.pos[(size_t)r * T + j] = j - fill[r];
    double best[2] = {1e30, 1e30}, worst[2] = {0, 0}, ls[2], cn[2];
    for (int rep = 0; rep < reps; rep++)
        for (int k = 0; k < 2; k++) {
            double t = pass(ctx, m, k ? &pk : &pad, B, &ls[k], &cn[k]);
            best[k] = t < best[k] ? t : best[k];
            worst[k] = t > worst[k] ? t : worst[k];
        }
    printf("bench_packing: %d documents of %d..%d tokens (%ld in all), gpt2 %d x %d, %s, "
           "batch %d, %d thread(s), best of %d\n",
           docs, min_len, T, total, L, C, prec, B, threads, reps);
    printf("  padded (reference): %d rows of %d, %.1f%% filled: %.0f tok/s [worst %.0f]\n",
           pad.rows, pad.T, 100.0 * total / cells, total / best[0], total / worst[0]);
    printf("  packed:             %d rows of %d, %.1f%% filled: %.0f tok/s [worst %.0f]  "
           "%.2fx the reference\n",
           pk.rows, pk.T, 100.0 * total / pcells, total / best[1], total / worst[1],
           best[0] / best[1]);
    printf("  loss per token: padded %.6f, packed %.6f (%g apart)\n", ls[0] / cn[0],
           ls[1] / cn[1], fabs(ls[0] / cn[0] - ls[1] / cn[1]));
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    free(len), free(ids), free(row), free(at), free(fill);
    free(pad.tok), free(pad.tgt), free(pk.tok), free(pk.tgt), free(pk.pos);
    return 0;
}
