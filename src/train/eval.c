/*
 * eval.c — mean next-token cross-entropy of a model over a token stream,
 * shared by `kiln eval` and the trainer's validation.
 *
 * The stream is cut into windows of up to T+1 tokens with stride T, so
 * every token after the first is predicted exactly once, with as much
 * left context as the window gives it. Full windows run B at a time; the
 * shorter tail window runs alone.
 */
#include "base/base.h"

#include <stdlib.h>
#include <string.h>

kiln_status kiln_eval_tokens(kiln_ctx *ctx, kiln_model *m,
                             const int32_t *tokens, size_t n, int B, int T,
                             double *loss_sum, double *count)
{
    if (B <= 0 || T <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_eval_tokens: B = %d and T = %d must be positive", B, T);
    if (n < 2) return KILN_OK;
    const kiln_config *cfg = kiln_model_config(m);
    if (T > cfg->n_ctx)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "kiln_eval_tokens: T = %d exceeds the model's context length "
                         "(n_ctx %d); use T = %d or less",
                         T, cfg->n_ctx, cfg->n_ctx);
    for (size_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= cfg->vocab_size)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "token %zu is %d, outside the model's vocabulary "
                             "[0, %d): the tokens and the model do not match",
                             i, (int)tokens[i], cfg->vocab_size);
    kiln_status s = kiln_model_prepare(ctx, m, B, T);
    if (s) return s;
    int V = cfg->vocab_size;
    int32_t *in = kiln_malloc(ctx, (size_t)B * T * sizeof *in);
    int32_t *tg = kiln_malloc(ctx, (size_t)B * T * sizeof *tg);
    if (!in || !tg) {
        free(in);
        free(tg);
        return KILN_ERR_NOMEM;
    }
    size_t nfull = (n - 1) / (size_t)T; /* windows with T targets */
    size_t w = 0;
    while (w < nfull && !s) {
        int b = (int)KILN_MIN((size_t)B, nfull - w);
        for (int r = 0; r < b; r++) {
            const int32_t *src = tokens + (w + (size_t)r) * (size_t)T;
            memcpy(in + (size_t)r * T, src, (size_t)T * sizeof *in);
            memcpy(tg + (size_t)r * T, src + 1, (size_t)T * sizeof *tg);
        }
        float *logits;
        s = kiln_model_forward(ctx, m, in, b, T, &logits);
        if (!s)
            s = kiln_cross_entropy(ctx, logits, tg, NULL, (int64_t)b * T, V,
                                   0.0f, NULL, loss_sum, count);
        w += (size_t)b;
    }
    size_t tail = (n - 1) - nfull * (size_t)T; /* targets left */
    if (!s && tail > 0) {
        const int32_t *src = tokens + nfull * (size_t)T;
        memcpy(in, src, tail * sizeof *in);
        memcpy(tg, src + 1, tail * sizeof *tg);
        float *logits;
        s = kiln_model_forward(ctx, m, in, 1, (int)tail, &logits);
        if (!s)
            s = kiln_cross_entropy(ctx, logits, tg, NULL, (int64_t)tail, V,
                                   0.0f, NULL, loss_sum, count);
    }
    free(in);
    free(tg);
    return s;
}
