/*
 * sample.h — sampler internals exposed to the tests: the filtered and
 * renormalised distribution a draw is made from.
 */
#ifndef KILN_INFER_SAMPLE_H
#define KILN_INFER_SAMPLE_H

#include "infer/infer.h"

/* Applies penalties, temperature, top-k, top-p and min-p to logits (V,
 * overwritten) and writes the surviving candidate ids to cand (V ints);
 * returns how many. Their probabilities (summing to 1) are then read with
 * infer_sample_prob. Greedy (temperature 0) leaves one candidate. Does not
 * record anything as generated. */
int infer_sample_probs(kiln_sampler *s, float *logits, int *cand);
float infer_sample_prob(const kiln_sampler *s, int id);

/* Speculative decoding (spec.c). The distribution a draw would be made
 * from, dense: probs (V) gets infer_sample_probs' probabilities, 0 for
 * the tokens it dropped; logits are overwritten. Records nothing. */
void infer_sample_dense(kiln_sampler *s, float *logits, float *probs);
/* A draw from probs (V non-negative weights, normalised here). */
int32_t infer_sample_draw(kiln_rng *rng, const float *probs, int V);
/* Records id as generated (penalties' history), as kiln_sampler_sample
 * does after its draw, and reports its log-probabilities from raw (V raw
 * logits, or NULL) into chosen/top when those are non-NULL. */
void infer_sampler_take(kiln_sampler *s, const float *raw, int32_t id,
                        kiln_token_logprob *chosen, kiln_token_logprob *top);
/* dst's penalty history (tokens seen and generated) becomes src's; the
 * two samplers have the same vocabulary size. */
void infer_sampler_copy_history(kiln_sampler *dst, const kiln_sampler *src);
kiln_rng *infer_sampler_rng(kiln_sampler *s);

#endif
