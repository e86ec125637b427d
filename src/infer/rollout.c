/*
 * rollout.c — many sequences sampled at once on one engine: the rollouts
 * of GRPO (a group of completions per prompt) and any other caller that
 * has a batch of prompts. Each sequence has its own slot and its own
 * kiln_gen (sampling, seed, stops); a prompt repeated in consecutive
 * sequences is prefilled once and its cache copied to the others
 * (kiln_engine_copy_prefix), and every decode step feeds one token of
 * each live sequence in a single kiln_engine_step, so the weights are
 * streamed once per step for the whole batch.
 */
#include "infer/infer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

kiln_status kiln_generate_batch(kiln_ctx *ctx, kiln_engine *e, int n,
                                const int32_t *const *prompts, const size_t *n_prompt,
                                kiln_gen **gens, int32_t *ids, int cap, int *n_ids,
                                float *logprobs, int64_t *steps)
{
    const int V = kiln_engine_config(e)->vocab_size, n_ctx = kiln_engine_n_ctx(e);
    if (n < 1 || n > kiln_engine_n_slots(e) || n > kiln_engine_chunk(e))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_generate_batch: %d sequences for an engine of %d slots (chunk %d)",
                         n, kiln_engine_n_slots(e), kiln_engine_chunk(e));
    for (int i = 0; i < n; i++) {
        if (n_prompt[i] == 0 || n_prompt[i] >= (size_t)n_ctx)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "kiln_generate_batch: prompt %d is %zu tokens; it needs 1 to %d "
                             "(the context is %d)", i, n_prompt[i], n_ctx - 1, n_ctx);
        n_ids[i] = 0;
    }
    float *logits = malloc((size_t)n * V * sizeof *logits);
    kiln_engine_tok *toks = malloc((size_t)n * sizeof *toks);
    int *who = malloc((size_t)n * sizeof *who);
    float *raw = malloc((size_t)V * sizeof *raw);
    if (!logits || !toks || !who || !raw) {
        free(logits); free(toks); free(who); free(raw);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory for the batch's logits");
    }
    kiln_status st = KILN_OK;
    /* prefill: the first of a run of equal prompts; the rest copy its cache */
    for (int i = 0; i < n && !st; i++) {
        kiln_engine_reset(e, i);
        float *li = logits + (size_t)i * V;
        bool same = i > 0 && n_prompt[i] == n_prompt[i - 1] &&
                    !memcmp(prompts[i], prompts[i - 1], n_prompt[i] * sizeof(int32_t));
        if (same) {
            st = kiln_engine_copy_prefix(ctx, e, i, i - 1, (int)n_prompt[i]);
            memcpy(li, li - V, (size_t)V * sizeof *li);
        } else
            st = kiln_engine_prefill(ctx, e, i, prompts[i], (int)n_prompt[i], li);
    }
    /* logits[i] holds sequence i's next-token logits while it is live;
     * the step's output rows go back to their sequences through who */
    float *step_out = NULL;
    if (!st && !(step_out = malloc((size_t)n * V * sizeof *step_out)))
        st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory for the batch's logits");
    int64_t n_steps = 0;
    while (!st) {
        int T = 0;
        for (int i = 0; i < n && !st; i++) {
            if (kiln_gen_finished(gens[i]) != KILN_FINISH_NONE) continue;
            kiln_gen_token t;
            float *li = logits + (size_t)i * V;
            /* log-sum-exp of the raw logits before the sampler overwrites them */
            double lse = 0;
            if (logprobs) {
                float mx = li[0];
                for (int j = 1; j < V; j++) mx = li[j] > mx ? li[j] : mx;
                for (int j = 0; j < V; j++) lse += exp((double)li[j] - mx);
                lse = mx + log(lse);
                memcpy(raw, li, (size_t)V * sizeof *raw);
            }
            if ((st = kiln_gen_next(ctx, gens[i], li, &t))) break;
            if (t.id >= 0 && n_ids[i] < cap) {
                if (logprobs) logprobs[(size_t)i * cap + n_ids[i]] = (float)((double)raw[t.id] - lse);
                ids[(size_t)i * cap + n_ids[i]++] = t.id;
            }
            if (t.finish != KILN_FINISH_NONE) continue;
            if (kiln_engine_pos(e, i) >= n_ctx || n_ids[i] >= cap) {
                const char *tail;
                size_t len;
                kiln_gen_end(gens[i], KILN_FINISH_LENGTH, &tail, &len);
                continue;
            }
            toks[T] = (kiln_engine_tok){.slot = i, .token = t.id, .want_logits = true};
            who[T++] = i;
        }
        if (st || T == 0) break;
        if ((st = kiln_engine_step(ctx, e, toks, T, step_out))) break;
        n_steps++;
        for (int k = 0; k < T; k++)
            memcpy(logits + (size_t)who[k] * V, step_out + (size_t)k * V, (size_t)V * sizeof(float));
    }
    if (steps) *steps = n_steps;
    free(step_out);
    free(raw);
    free(logits);
    free(toks);
    free(who);
    return st;
}
