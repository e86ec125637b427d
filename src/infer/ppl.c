/*
 * ppl.c — next-token loss of the inference engine over a token stream: the
 * perplexity of the weights as they are served (fp32, bf16 or quantized),
 * in the same windows as kiln_eval_tokens, so the two compare directly.
 */
#include "base/base.h"

#include <stdlib.h>

kiln_status kiln_engine_eval_tokens(kiln_ctx *ctx, kiln_engine *e, const int32_t *tokens,
                                    size_t n, int T, double *loss_sum, double *count)
{
    const kiln_config *cfg = kiln_engine_config(e);
    if (T <= 0 || T > kiln_engine_n_ctx(e))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_engine_eval_tokens: T = %d must be in 1..%d (the engine's "
                         "context)", T, kiln_engine_n_ctx(e));
    if (n < 2) return KILN_OK;
    const int V = cfg->vocab_size, chunk = kiln_engine_chunk(e);
    float *lg = kiln_malloc(ctx, (size_t)chunk * V * sizeof *lg);
    kiln_engine_tok *tk = kiln_malloc(ctx, (size_t)chunk * sizeof *tk);
    if (!lg || !tk) {
        free(lg), free(tk);
        return KILN_ERR_NOMEM;
    }
    kiln_status s = KILN_OK;
    /* windows of up to T + 1 tokens, stride T: every token after the first
     * is predicted once */
    for (size_t w0 = 0; w0 + 1 < n && !s; w0 += (size_t)T) {
        int len = (int)KILN_MIN((size_t)T, n - 1 - w0); /* targets of this window */
        kiln_engine_reset(e, 0);
        for (int i0 = 0; i0 < len && !s; i0 += chunk) {
            int m = KILN_MIN(chunk, len - i0);
            for (int j = 0; j < m; j++) tk[j] = (kiln_engine_tok){0, tokens[w0 + i0 + j], true};
            s = kiln_engine_step(ctx, e, tk, m, lg);
            if (!s)
                s = kiln_cross_entropy(ctx, lg, tokens + w0 + i0 + 1, NULL, m, V, 0.0f, NULL,
                                       loss_sum, count);
        }
    }
    kiln_engine_reset(e, 0);
    free(lg), free(tk);
    return s;
}
