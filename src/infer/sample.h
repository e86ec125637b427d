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

#endif
