/*
 * objective.c — what the trainer minimizes: the built-in objectives
 * (cross-entropy, masked cross-entropy) behind the kiln_objective
 * interface of kiln.h, and the per-token log-probability helpers that
 * objectives on sequence likelihoods (DPO, GRPO) are built from.
 *
 * The trainer calls an objective through its function pointers only
 * (trainer.c, train_step); the two cross-entropies declare fused_ce, so
 * the trainer runs the model's fused softmax + cross-entropy + backward
 * (kiln_model_backward_ce) for them, and their loss functions are the same
 * computation for callers outside the trainer.
 */
#include "kiln.h"
#include "base/base.h"

#include <math.h>
#include <string.h>

/* ---- cross-entropy and masked cross-entropy --------------------------- */

/* Both: the weighted sum of -log p[target] over rows with a target,
 * through kiln_cross_entropy (which checks targets and weights). */
static kiln_status ce_loss(void *user, kiln_ctx *ctx, const kiln_objective_batch *b,
                           const float *logits, float grad_scale, float *dlogits,
                           double *loss_sum, double *weight_sum)
{
    (void)user;
    return kiln_cross_entropy(ctx, logits, b->targets, b->weights, (int64_t)b->B * b->T, b->V,
                              grad_scale, dlogits, loss_sum, weight_sum);
}

/* Masked CE's denominator: the summed weights of the rows with a target
 * (PyTorch's count of targets != ignore_index for a 0/1 mask). */
static kiln_status masked_ce_weigh(void *user, kiln_ctx *ctx, kiln_objective_batch *b,
                                   double *weight)
{
    (void)user;
    (void)ctx;
    int64_t N = (int64_t)b->B * b->T;
    double w = 0;
    for (int64_t i = 0; i < N; i++)
        if (b->targets[i] >= 0) w += b->weights ? (double)b->weights[i] : 1.0;
    *weight += w;
    return KILN_OK;
}

static const kiln_objective objective_ce = {
    .name = "ce",
    .fused_ce = true,
    .weigh = NULL,
    .loss = ce_loss,
};

static const kiln_objective objective_masked_ce = {
    .name = "masked_ce",
    .fused_ce = true,
    .weigh = masked_ce_weigh,
    .loss = ce_loss,
};

const kiln_objective *kiln_objective_ce(void) { return &objective_ce; }
const kiln_objective *kiln_objective_masked_ce(void) { return &objective_masked_ce; }

const kiln_objective *kiln_objective_builtin(const char *name)
{
    if (!name) return NULL;
    if (!strcmp(name, objective_ce.name)) return &objective_ce;
    if (!strcmp(name, objective_masked_ce.name)) return &objective_masked_ce;
    return NULL;
}

/* ---- per-token log-probabilities -------------------------------------- */

static kiln_status logprob_check(kiln_ctx *ctx, const int32_t *targets, int64_t N, int V)
{
    if (N < 0 || V < 1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "token log-probs: bad sizes N=%lld V=%d",
                         (long long)N, V);
    for (int64_t i = 0; i < N; i++)
        if (targets[i] >= V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "target token id %d at row %lld is outside the vocabulary "
                             "[0, %d)", targets[i], (long long)i, V);
    return KILN_OK;
}

/* log-sum-exp of one row, in double. */
static double row_lse(const float *x, int V)
{
    float mx = -INFINITY;
    for (int j = 0; j < V; j++) mx = x[j] > mx ? x[j] : mx;
    double sum = 0;
    for (int j = 0; j < V; j++) sum += exp((double)x[j] - mx);
    return mx + log(sum);
}

kiln_status kiln_token_logprobs(kiln_ctx *ctx, const float *logits, const int32_t *targets,
                                int64_t N, int V, float *logp)
{
    kiln_status s = logprob_check(ctx, targets, N, V);
    if (s) return s;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *x = logits + i * V;
        logp[i] = targets[i] < 0 ? 0.0f : (float)((double)x[targets[i]] - row_lse(x, V));
    }
    return KILN_OK;
}

kiln_status kiln_token_logprobs_backward(kiln_ctx *ctx, const float *logits,
                                         const int32_t *targets, const float *dlogp, int64_t N,
                                         int V, float grad_scale, float *dlogits)
{
    kiln_status s = logprob_check(ctx, targets, N, V);
    if (s) return s;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *x = logits + i * V;
        float *d = dlogits + i * V;
        int tgt = targets[i];
        if (tgt < 0) {
            for (int j = 0; j < V; j++) d[j] = 0.0f;
            continue;
        }
        double lse = row_lse(x, V);
        float k = grad_scale * dlogp[i];
        /* d logp / d x_j = onehot_j - softmax_j (x read before d is written:
         * they may alias) */
        for (int j = 0; j < V; j++) {
            float p = (float)exp((double)x[j] - lse);
            d[j] = j == tgt ? k * (1.0f - p) : -k * p;
        }
    }
    return KILN_OK;
}
