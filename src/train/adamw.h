/*
 * adamw.h — the AdamW step over a parameter block in which some matrices
 * are updated strip by strip, each strip handed on while it is in cache:
 * the mixed-precision trainer packs the compute-dtype copies of a weight
 * there (kiln_model_adamw_step), instead of reading the updated fp32
 * weight back from memory at the next forward.
 */
#ifndef KILN_TRAIN_ADAMW_H
#define KILN_TRAIN_ADAMW_H

#include "kiln.h"

#include <stdbool.h>
#include <stddef.h>

typedef struct adamw_matrix {
    size_t offset;    /* in floats, into the parameter block */
    int rows, cols;   /* row-major */
    int strip;        /* rows per strip */
    /* called once per strip after its rows are updated, W = the matrix */
    void (*after)(void *ud, const float *W, int r0);
    void *ud;
    bool done;        /* out: updated strip by strip, after() called */
    int range;        /* internal: its trainable range */
    int unit0;        /* internal */
} adamw_matrix;

/* kiln_adamw_step_scaled over all o's parameters; the matrices (sorted by
 * offset, not overlapping) that lie inside one weight-decay range and have
 * a whole number of strips are updated strip by strip, with after() for
 * each strip (done = true); the others are updated as any parameter
 * (done = false). The updated values are the same bits either way. */
void adamw_step_matrices(kiln_adamw *o, float *params, const float *grads, float lr,
                         float grad_mul, adamw_matrix *mats, int nmats);

/* Whether o's steps leave floats [off, off+len) of the block alone (no
 * trainable range overlaps them); ud is the kiln_adamw. */
bool adamw_untouched(void *ud, size_t off, size_t len);

/* For adamw_io.c: the names of all the tensors of the model o was made
 * for and whether each has state (returns their count; 0 when o was made
 * with kiln_adamw_new), and a read-only moment (second: v, else m). */
int adamw_tensors(const kiln_adamw *o, char *const **names, const bool **trainable);
const float *adamw_moment(const kiln_adamw *o, bool second);

/* Room for n adamw_matrix entries, owned by o (grown, never shrunk, so a
 * step after the first allocates nothing); NULL when out of memory. */
adamw_matrix *adamw_matrix_scratch(kiln_adamw *o, int n);

/* kiln_l2_norm on the kernel k asks for (AUTO: AVX-512 when the CPU has
 * it). Both kernels give the same bits; tests compare them. */
double adamw_l2_norm_with(const float *x, size_t n, kiln_optim_kernel k);

#endif /* KILN_TRAIN_ADAMW_H */
