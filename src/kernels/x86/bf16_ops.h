/*
 * bf16_ops.h — mixed precision behind the model's kernel interface: a
 * kern_gemm running every product in bf16 or fp16 (fp32 accumulation) and
 * the kern_ops table that goes with it (the fast table with linear layers
 * that cache packed compute-dtype weights). See bf16_ops.c.
 */
#ifndef KILN_KERNELS_X86_BF16_OPS_H
#define KILN_KERNELS_X86_BF16_OPS_H

#include "kernels/kernels.h"
#include "kernels/x86/bf16.h"

/* A heap kern_gemm for dtype dt (KILN_DTYPE_BF16 or KILN_DTYPE_F16) on backend be (AUTO:
 * the best this CPU has). Free with kern_gemm_free. NULL on OOM. */
kern_gemm *mp_kern_gemm_new(kiln_dtype dt, mp_backend be);
/* The op table to use with g (lives as long as g). */
const kern_ops *mp_kern_ops(kern_gemm *g);
/* Bytes held by g's packed weight copies. */
size_t mp_kern_cache_bytes(kern_gemm *g);
/* How many weight layouts the cache has packed from fp32 weights so far
 * (not counting the optimizer's strip-by-strip refresh). */
uint64_t mp_kern_repacks(kern_gemm *g);

/* For the bf16 training path (model/pass.c): g's dtype, backend,
 * scratch, and the packed copy of weight w, refreshed for the current
 * epoch (g->invalidate) in the forward (bwd = false) or input-gradient
 * (bwd = true) layout. NULL on OOM. */
kiln_dtype mp_kern_dtype(kern_gemm *g);
mp_backend mp_kern_backend(kern_gemm *g);
mp_scratch *mp_kern_scratch(kern_gemm *g);
const mp_weight *mp_kern_weight(kern_gemm *g, const float *w, int OC, int C, bool in_out,
                                bool bwd);

/* For an optimizer that refreshes the packed copies itself: weight w's
 * cache entry (created if new, not refreshed; NULL on OOM), and the mark
 * that both its copies already hold w's current values for the next epoch
 * (the next forward's), so that forward does not repack them. */
mp_weight *mp_kern_weight_entry(kern_gemm *g, const float *w, int OC, int C, bool in_out);
void mp_kern_weight_fresh(kern_gemm *g, const float *w, int OC, int C, bool in_out);
/* For a weight the optimizer did not change (frozen): each of its packed
 * layouts that is current now stays current for the next epoch. */

/* The cpu backend (backend_cpu.c) lives in the state of its GEMM: the
 * kern_backend of g (filled by kern_backend_cpu_new), its weight entries
 * (mp_kern_backend_weights sets the weight_* entries of b: a kern_weight
 * is a cache entry), and the packed copy of prepared weight w current in
 * this epoch, in the forward (bwd false) or input-gradient layout. */
kern_backend *mp_kern_backend_of(kern_gemm *g);
void mp_kern_backend_weights(kern_backend *b);
const mp_weight *mp_kern_weight_current(kern_backend *b, kern_weight *w, bool bwd);

#endif /* KILN_KERNELS_X86_BF16_OPS_H */
