/*
 * sparsity.h — the trainer's "zero stays zero" mask of a pruned model
 * (sparsity.c). Private to train/.
 */
#ifndef KILN_TRAIN_SPARSITY_H
#define KILN_TRAIN_SPARSITY_H

#include "model/model.h"

/* One bit per parameter of m: set where a weight of a pruned matrix
 * (kiln_prune_target) is exactly zero now. *out (free it) and the count
 * of set bits in *zeros. */
kiln_status sparse_mask_build(kiln_ctx *ctx, const kiln_model *m, uint64_t **out, size_t *zeros);
/* Zeroes g (the gradient block, num_params floats) where the mask is set:
 * with a zero gradient from the first step on, AdamW's moments and its
 * update stay zero there, and so does the weight (decay scales zero). */
void sparse_mask_apply(const kiln_model *m, const uint64_t *mask, float *g);

#endif
