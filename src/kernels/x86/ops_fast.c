/*
 * ops_fast.c — the fast kernel table: OpenMP-threaded (and AVX-512 where it
 * pays) versions of the model's ops. Until an op has a faster version the
 * table points at the reference function.
 */
#include "kernels/kernels.h"

const kern_ops *kern_ops_fast(void) { return kern_ops_ref(); }
