/*
 * grpo.c — the GRPO policy-gradient objective (DeepSeekMath's Group
 * Relative Policy Optimization, with TRL GRPOTrainer's loss semantics)
 * behind the kiln_objective interface, and the group-relative advantages.
 *
 * Rows of a micro-batch are sampled completions (prompt positions carry
 * target -1). Per learned token t of row i, with r = exp(logp - old):
 *   l = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)
 *       + beta (exp(ref - logp) - (ref - logp) - 1)          (k3 KL)
 * GRPO weighs every token by 1 / (tokens of its row) and divides by the
 * rows (a per-sequence mean, then the mean over sequences); Dr. GRPO
 * weighs every token 1 and divides by rows * max_new_tokens (no length
 * normalisation), with advantages not divided by the group's std. The
 * gradient goes to the logits through kiln_token_logprobs_backward.
 */
#include "kiln.h"
#include "base/base.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

kiln_grpo_opts kiln_grpo_opts_default(void)
{
    return (kiln_grpo_opts){.clip_low = 0.2, .clip_high = 0.2, .beta = 0.0, .dr_grpo = false,
                            .max_new_tokens = 0};
}

kiln_status kiln_grpo_opts_validate(kiln_ctx *ctx, const kiln_grpo_opts *o)
{
    if (!(o->clip_low >= 0 && o->clip_low < 1))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_grpo_opts.clip_low = %g must be in [0, 1)", o->clip_low);
    if (!(o->clip_high >= 0 && o->clip_high <= 1e6))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_grpo_opts.clip_high = %g must be >= 0", o->clip_high);
    if (!(o->beta >= 0 && o->beta <= 1e6))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_grpo_opts.beta = %g must be >= 0 (0: no reference model)", o->beta);
    if (o->dr_grpo && o->max_new_tokens < 1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_grpo_opts.max_new_tokens = %d must be positive with dr_grpo "
                         "(it is the loss's constant normaliser)", o->max_new_tokens);
    return KILN_OK;
}

kiln_status kiln_grpo_advantages(kiln_ctx *ctx, const float *rewards, int n_groups, int G,
                                 bool scale_std, float *adv)
{
    if (n_groups < 1 || G < 2)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "GRPO advantages need at least one group of >= 2 completions "
                         "(%d groups of %d)", n_groups, G);
    for (int g = 0; g < n_groups; g++) {
        const float *r = rewards + (size_t)g * G;
        double mean = 0, var = 0;
        for (int i = 0; i < G; i++) {
            if (!isfinite(r[i]))
                return kiln_fail(ctx, KILN_ERR_NUMERIC, "reward %d of group %d is %g", i, g,
                                 (double)r[i]);
            mean += r[i];
        }
        mean /= G;
        for (int i = 0; i < G; i++) var += ((double)r[i] - mean) * ((double)r[i] - mean);
        double sd = sqrt(var / (G - 1)); /* torch.std: unbiased */
        for (int i = 0; i < G; i++) {
            double a = (double)r[i] - mean;
            adv[(size_t)g * G + i] = (float)(scale_std ? a / (sd + 1e-4) : a);
        }
    }
    return KILN_OK;
}

/* Learned tokens of row b. */
static int row_tokens(const kiln_objective_batch *b, int row)
{
    int n = 0;
    for (int t = 0; t < b->T; t++) n += b->targets[(size_t)row * b->T + t] >= 0;
    return n;
}

static kiln_status grpo_weigh(void *user, kiln_ctx *ctx, kiln_objective_batch *b,
                              double *weight)
{
    (void)ctx;
    const kiln_grpo_state *st = user;
    int rows = 0;
    for (int i = 0; i < b->B; i++) rows += row_tokens(b, i) > 0;
    *weight += st->opts.dr_grpo ? (double)rows * st->opts.max_new_tokens : (double)rows;
    return KILN_OK;
}

/* The surrogate's and KL's derivative per token, in double. */
static kiln_status grpo_loss(void *user, kiln_ctx *ctx, const kiln_objective_batch *b,
                             const float *logits, float grad_scale, float *dlogits,
                             double *loss_sum, double *weight_sum)
{
    kiln_grpo_state *st = user;
    const kiln_grpo_opts *o = &st->opts;
    int64_t N = (int64_t)b->B * b->T;
    if (!st->adv || !st->logp || !st->dlogp)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_grpo_state.adv, .logp and .dlogp must be set for the micro-batch");
    if (o->beta > 0 && !st->ref_logp)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_grpo_state.ref_logp must be set when kiln_grpo_opts.beta > 0");
    kiln_status s = kiln_token_logprobs(ctx, logits, b->targets, N, b->V, st->logp);
    if (s) return s;
    double loss = 0;
    for (int i = 0; i < b->B; i++) {
        int n = row_tokens(b, i);
        if (n == 0) {
            for (int t = 0; t < b->T; t++) st->dlogp[(size_t)i * b->T + t] = 0;
            continue;
        }
        double w = o->dr_grpo ? 1.0 : 1.0 / n;
        double A = st->adv[i];
        for (int t = 0; t < b->T; t++) {
            size_t k = (size_t)i * b->T + t;
            st->dlogp[k] = 0;
            if (b->targets[k] < 0) continue;
            double lp = st->logp[k];
            double old = st->old_logp ? st->old_logp[k] : lp;
            double r = exp(lp - old);
            double rc = r < 1 - o->clip_low ? 1 - o->clip_low
                                             : r > 1 + o->clip_high ? 1 + o->clip_high : r;
            double l1 = r * A, l2 = rc * A;
            /* the clipped branch is the smaller one: it is a constant */
            bool clipped = l2 < l1;
            double l = -(clipped ? l2 : l1), d = clipped ? 0.0 : -A * r;
            st->clipped += clipped;
            if (o->beta > 0) {
                double x = st->ref_logp[k] - lp;
                double kl = exp(x) - x - 1;
                l += o->beta * kl;
                d += o->beta * (1 - exp(x));
                st->kl_sum += kl;
            }
            st->tokens += 1;
            loss += w * l;
            st->dlogp[k] = (float)(w * d);
        }
    }
    *loss_sum += loss;
    grpo_weigh(user, ctx, (kiln_objective_batch *)b, weight_sum);
    return kiln_token_logprobs_backward(ctx, logits, b->targets, st->dlogp, N, b->V, grad_scale,
                                        dlogits);
}

kiln_objective kiln_objective_grpo(kiln_grpo_state *st)
{
    return (kiln_objective){.name = st && st->opts.dr_grpo ? "dr_grpo" : "grpo",
                            .fused_ce = false,
                            .weigh = grpo_weigh,
                            .loss = grpo_loss,
                            .user = st};
}
