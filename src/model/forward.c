/*
 * forward.c — the public forward and backward (kiln_model_forward,
 * kiln_model_backward, kiln_model_backward_ce) and the cross-entropy
 * loss: their checks, the arena (sized by kiln_model_prepare, carved per
 * step: no allocation inside a step), the weight epoch, then the one pass
 * of every precision (pass.c).
 */
#include "model/model.h"

#include <math.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

const char *const model_prof_names[MODEL_PROF_N] = {
    "matmul fwd", "matmul bwd", "attention fwd", "attention bwd", "norms",
    "activations", "other"};

#define P MODEL_P

static void set_threads(const kiln_model *m)
{
#ifdef _OPENMP
    if (m->threads > 0) omp_set_num_threads(m->threads);
#else
    (void)m;
#endif
}

kiln_status kiln_model_forward(kiln_ctx *ctx, kiln_model *m,
                               const int32_t *tokens, int B, int T,
                               float **logits)
{
    return kiln_model_forward_pos(ctx, m, tokens, NULL, B, T, logits);
}

kiln_status kiln_model_forward_pos(kiln_ctx *ctx, kiln_model *m, const int32_t *tokens,
                                   const int32_t *pos, int B, int T, float **logits)
{
    if (B > m->B_cap || T > m->T_cap || !m->grads || model_bf16_acts(m) != m->act_mp) {
        kiln_status s = kiln_model_prepare(ctx, m, B, T);
        if (s) return s;
    }
    if (B < 1 || T < 1)
        return kiln_fail(ctx, KILN_ERR_RANGE, "forward: empty batch (%d x %d)", B, T);
    size_t N = (size_t)B * T;
    for (size_t i = 0; i < N; i++)
        if (tokens[i] < 0 || tokens[i] >= m->V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "token id %d at batch row %zu, position %zu is outside the "
                             "model's vocabulary [0, %d) (tokenizer and model do not match?)",
                             tokens[i], i / (size_t)T, i % (size_t)T, m->V);
    int64_t bad;
    if (pos && !kern_doc_pos_ok(pos, B, T, &bad))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "positions: batch row %lld, position %lld holds %d; a row starts a "
                         "document at 0 and each position is 0 (a new document) or the one "
                         "before it + 1",
                         (long long)(bad / T), (long long)(bad % T), (int)pos[bad]);
    set_threads(m);
    m->threads = kiln_get_threads(ctx);
    set_threads(m);
    model_pass_carve(m, B, T);
    m->B = B;
    m->T = T;
    memcpy(m->a.tokens, tokens, N * sizeof(int32_t));
    m->packed = pos != NULL;
    if (pos) memcpy(m->a.pos, pos, N * sizeof(int32_t));

    kern_gemm *g = m->gemm;
    /* re-derive the packed weight copies when the parameters were written
     * since the last forward (or may have been: kiln_model_params_mut) */
    if (g->invalidate && (m->weights_changed || m->params_shared)) g->invalidate(g);
    m->weights_changed = false;
    return model_pass_forward(ctx, m, logits);
}

static kiln_status backward(kiln_ctx *ctx, kiln_model *m, const float *dlogits,
                            const model_ce *ce);
static kiln_status ce_check(kiln_ctx *ctx, const int32_t *targets, const float *mask, int64_t N,
                            int V);

kiln_status kiln_model_backward(kiln_ctx *ctx, kiln_model *m,
                                const float *dlogits)
{
    return backward(ctx, m, dlogits, NULL);
}

kiln_status kiln_model_backward_ce(kiln_ctx *ctx, kiln_model *m, const int32_t *targets,
                                   const float *mask, float grad_scale, double *loss_sum,
                                   double *weight_sum)
{
    if (!m->B || !m->grads)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "backward called without a forward pass");
    int64_t N = (int64_t)m->B * m->T;
    kiln_status s = ce_check(ctx, targets, mask, N, m->V);
    if (s) return s;
    model_ce ce = {targets, mask, grad_scale, loss_sum, weight_sum};
    return backward(ctx, m, NULL, &ce);
}

static kiln_status backward(kiln_ctx *ctx, kiln_model *m, const float *dlogits,
                            const model_ce *ce)
{
    if (!m->B || !m->grads)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "backward called without a forward pass");
    set_threads(m);
    kiln_status s = model_pass_backward(ctx, m, dlogits, ce);
    if (s) model_grads_materialize(m); /* a failure leaves no stale matrices */
    m->grads_lazy = false;             /* else every matrix is written */
    return s;
}

kiln_status kiln_cross_entropy(kiln_ctx *ctx, const float *logits,
                               const int32_t *targets, const float *mask,
                               int64_t N, int V, float grad_scale,
                               float *dlogits, double *loss_sum,
                               double *weight_sum)
{
    kiln_status s = ce_check(ctx, targets, mask, N, V);
    if (s) return s;
    kern_ops_fast()->cross_entropy(logits, targets, mask, N, V, grad_scale, dlogits,
                                   loss_sum, weight_sum);
    return KILN_OK;
}

static kiln_status ce_check(kiln_ctx *ctx, const int32_t *targets, const float *mask, int64_t N,
                            int V)
{
    if (N < 0 || V < 1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "cross_entropy: bad sizes N=%lld V=%d", (long long)N, V);
    for (int64_t i = 0; i < N; i++) {
        if (targets[i] >= V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "target token id %d at row %lld is outside the vocabulary "
                             "[0, %d)", targets[i], (long long)i, V);
        if (mask && !(mask[i] >= 0.0f && isfinite(mask[i])))
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "loss mask at row %lld is %g; weights must be finite and >= 0",
                             (long long)i, (double)mask[i]);
    }
    return KILN_OK;
}
