/*
 * custom_loss.c — a new training objective is a function from logits to
 * (loss, dlogits); the model never knows which one it trains on. This
 * example writes label-smoothed cross-entropy by hand,
 *
 *   loss_i = -(1-e) log p[y_i] - (e/V) sum_j log p[j],
 *   dlogits_ij = p_ij - (1-e) [j == y_i] - e/V,
 *
 * checks it against kiln_cross_entropy at e = 0 and against a central
 * finite difference at e = 0.1, then trains a few steps with it.
 *
 *   build/examples/custom_loss
 *
 * Prints "ok" lines for the checks and exits non-zero when one fails.
 */
#include "kiln.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* Label-smoothed CE over N rows of V logits, mean over rows. Writes
 * dlogits (N, V) scaled by 1/N when dlogits != NULL. Returns the loss. */
static double smoothed_ce(const float *logits, const int32_t *targets, int N,
                          int V, double eps, float *dlogits)
{
    double total = 0;
    for (int i = 0; i < N; i++) {
        const float *x = logits + (size_t)i * V;
        double mx = x[0];
        for (int j = 1; j < V; j++) mx = fmax(mx, x[j]);
        double z = 0;
        for (int j = 0; j < V; j++) z += exp(x[j] - mx);
        double lz = mx + log(z), sum_logp = 0;
        for (int j = 0; j < V; j++) sum_logp += x[j] - lz;
        total += -(1 - eps) * (x[targets[i]] - lz) - eps / V * sum_logp;
        if (dlogits)
            for (int j = 0; j < V; j++) {
                double g = exp(x[j] - lz) - eps / V - (j == targets[i] ? 1 - eps : 0);
                dlogits[(size_t)i * V + j] = (float)(g / N);
            }
    }
    return total / N;
}

int main(void)
{
    enum { B = 2, T = 8 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = kiln_config_default();
    cfg.n_layer = 1;
    cfg.n_embd = 32;
    cfg.n_head = 2;
    cfg.n_kv_head = 2;
    cfg.n_inner = 64;
    cfg.n_ctx = T;
    cfg.vocab_size = 50;
    cfg.bos_token_id = cfg.eos_token_id = -1;
    kiln_model *m;
    if (kiln_model_new(ctx, &cfg, &m) || kiln_model_prepare(ctx, m, B, T)) {
        fprintf(stderr, "custom_loss: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    kiln_model_init_random(m, 7);
    int V = cfg.vocab_size, N = B * T, bad = 0;
    int32_t in[B * T], tg[B * T];
    kiln_rng r;
    kiln_rng_seed(&r, 3);
    for (int i = 0; i < N; i++) {
        in[i] = (int32_t)kiln_rng_below(&r, (uint64_t)V);
        tg[i] = (int32_t)kiln_rng_below(&r, (uint64_t)V);
    }
    float *logits, *mine = malloc(sizeof(float) * N * V),
                   *ref = malloc(sizeof(float) * N * V);
    kiln_model_forward(ctx, m, in, B, T, &logits);

    /* 1. At eps = 0 it is plain cross-entropy. */
    double ls = 0, ws = 0;
    double l0 = smoothed_ce(logits, tg, N, V, 0.0, mine);
    kiln_cross_entropy(ctx, logits, tg, NULL, N, V, 1.0f / N, ref, &ls, &ws);
    double maxd = 0;
    for (int i = 0; i < N * V; i++) maxd = fmax(maxd, fabs(mine[i] - ref[i]));
    int ok = fabs(l0 - ls / ws) < 1e-5 && maxd < 1e-6;
    printf("%s eps=0 equals kiln_cross_entropy (loss %.6f vs %.6f, max |dlogit diff| %.2e)\n",
           ok ? "ok" : "FAILED", l0, ls / ws, maxd);
    bad += !ok;

    /* 2. Central finite differences of the smoothed loss. */
    double eps = 0.1;
    smoothed_ce(logits, tg, N, V, eps, mine);
    float *x = malloc(sizeof(float) * N * V);
    double worst = 0;
    for (int k = 0; k < 20; k++) {
        int idx = (int)kiln_rng_below(&r, (uint64_t)(N * V));
        for (int i = 0; i < N * V; i++) x[i] = logits[i];
        x[idx] += 1e-2f;
        double lp = smoothed_ce(x, tg, N, V, eps, NULL);
        x[idx] -= 2e-2f;
        double lm = smoothed_ce(x, tg, N, V, eps, NULL);
        double fd = (lp - lm) / 2e-2;
        worst = fmax(worst, fabs(fd - mine[idx]));
    }
    ok = worst < 1e-4;
    printf("%s eps=0.1 gradient matches finite differences (max error %.2e)\n",
           ok ? "ok" : "FAILED", worst);
    bad += !ok;

    /* 3. Train on it: the model only sees dlogits. */
    kiln_adamw_opts ao = kiln_adamw_opts_default();
    kiln_adamw *opt;
    kiln_adamw_new_for_model(ctx, m, &ao, &opt);
    double first = 0, last = 0;
    for (int step = 0; step < 30; step++) {
        kiln_model_forward(ctx, m, in, B, T, &logits);
        double l = smoothed_ce(logits, tg, N, V, eps, mine);
        kiln_model_zero_grad(m);
        kiln_model_backward(ctx, m, mine);
        kiln_model_adamw_step(m, opt, kiln_model_grads(m), 1e-2f, 1.0f);
        if (step == 0) first = l;
        last = l;
    }
    ok = last < 0.5 * first;
    printf("%s training on the smoothed loss: %.4f -> %.4f\n", ok ? "ok" : "FAILED",
           first, last);
    bad += !ok;

    kiln_adamw_free(opt);
    free(x);
    free(mine);
    free(ref);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    return bad ? 1 : 0;
}
