/*
 * dist.h — the distributed communication layer of the train layer: data
 * parallel training over Open MPI, or world size 1.
 *
 * A process started by `mpirun -np N` (detected through the launcher's
 * environment: OMPI_COMM_WORLD_SIZE, PMIX_RANK, PMI_SIZE) joins an MPI job
 * of N ranks; a plain process, or a build without MPI (no -DKILN_HAVE_MPI),
 * is world size 1 and every collective is a local no-op (bcast) or a copy.
 *
 * Every collective is waited on under a deadline (the watchdog thread):
 * when it does not complete within the timeout the rank prints which
 * collective (name, sequence number, bytes) it waited on and which ranks of
 * its node had not reached it (from a progress table in node-shared
 * memory), and exits with status 3, upon which mpirun terminates the whole
 * job. MPI errors go through an error handler that prints
 * the MPI message with the rank and the collective and aborts the job with
 * a non-zero exit. A dead rank (SIGKILL, crash) is detected by Open MPI's
 * launcher, which terminates the other ranks and names the dead one.
 *
 * Gradient averaging overlaps the backward pass: dist_grads_begin() splits
 * the gradient block into buckets (~25 MB, kiln_dist_opts.bucket_mb) and
 * dist_grad_ready(), installed as the model's kiln_grad_ready_fn, starts an
 * MPI_Iallreduce on each bucket as soon as all of its floats are final.
 * dist_grads_finish() waits for them and scales by 1/world.
 *
 * ZeRO-1 helpers: dist_shard_range() partitions a block of n floats into
 * `world` contiguous shards, dist_reduce_scatter_f32() sums a block across
 * ranks leaving each rank its own shard, dist_allgather_f32() reassembles
 * the block from the shards.
 *
 * Settings come from the public kiln_dist_opts (kiln.h): the watchdog
 * timeout, the bucket size, the overlap (off: all buckets start in
 * dist_grads_finish), the progress table. The launcher's variables above are the only
 * environment read here: they say whether this process is a rank of a
 * job, which is a fact about the process, not a setting.
 *
 * A dist handle is used by one thread (the training loop). Collectives must
 * be called in the same order on every rank (as MPI requires).
 */
#ifndef KILN_DIST_H
#define KILN_DIST_H

#include "kiln.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct dist dist;

/* Communication counters, accumulated since dist_init or the last
 * dist_stats_reset. wait_s is the time this rank spent blocked waiting for
 * communication (the exposed cost: what the step would save if the network
 * were infinitely fast); with overlap on it excludes the time collectives
 * ran behind the backward pass. */
typedef struct dist_stats {
    double wait_s;        /* seconds blocked inside dist collectives */
    double bytes;         /* payload bytes handed to collectives */
    uint64_t collectives; /* number of collectives started */
} dist_stats;

/* Joins the MPI job when launched by mpirun (MPI_Init_thread, a private
 * communicator, the error handler, the progress table), otherwise creates a
 * world-size-1 handle, with the settings of opts (NULL: the defaults).
 * Errors: KILN_ERR_DIST when launched with N > 1 ranks by a build without
 * MPI, or MPI cannot start; KILN_ERR_INVALID_ARG on a timeout_s or
 * bucket_mb out of range (the message names the field). Free with
 * dist_free (which finalizes MPI when dist_init initialized it). MPI can be
 * initialized once per process: do not call dist_init again after
 * dist_free in an MPI job. */
kiln_status dist_init(kiln_ctx *ctx, dist **out, const kiln_dist_opts *opts);
/* Frees d; finalizes MPI if dist_init initialized it. NULL is a no-op. */
void dist_free(dist *d);
/* Frees d after an error on this rank, without MPI_Finalize (which would
 * wait for ranks that are still inside collectives). The process must then
 * exit with a non-zero status, upon which mpirun ends the whole job; the
 * error message printed before exiting is the job's explanation. */
void dist_abandon(dist *d);

int dist_rank(const dist *d);
int dist_world(const dist *d);
/* True on rank 0 (the rank that logs and writes files). */
bool dist_is_root(const dist *d);
/* True when this handle talks to other processes through MPI. */
bool dist_uses_mpi(const dist *d);

/* Watchdog timeout in seconds for every later collective. */
void dist_set_timeout(dist *d, double timeout_s);
double dist_timeout(const dist *d);
/* Gradient bucket size in bytes (>= 4; default from
 * kiln_dist_opts.bucket_mb). Takes effect at the next dist_grads_begin. */
void dist_set_bucket_bytes(dist *d, size_t bytes);
/* Overlap of gradient communication with backward (default from
 * kiln_dist_opts.overlap). Takes effect at the next dist_grads_begin. */
void dist_set_overlap(dist *d, bool on);
bool dist_overlap(const dist *d);

/* Blocks until every rank arrives (with the watchdog). */
kiln_status dist_barrier(kiln_ctx *ctx, dist *d);
/* Broadcasts bytes of buf from root to every rank. */
kiln_status dist_bcast(kiln_ctx *ctx, dist *d, void *buf, size_t bytes,
                       int root);
/* In-place sums across ranks (every rank gets the sum). */
kiln_status dist_allreduce_sum_f32(kiln_ctx *ctx, dist *d, float *buf,
                                   size_t n);
kiln_status dist_allreduce_sum_f64(kiln_ctx *ctx, dist *d, double *buf,
                                   size_t n);
/* In-place maximum across ranks. */
kiln_status dist_allreduce_max_f64(kiln_ctx *ctx, dist *d, double *buf,
                                   size_t n);

/* ---- bucketed gradient averaging --------------------------------- */

/* Starts one round of gradient averaging over grads (n floats). Call
 * before the backward pass of the last micro-step of an optimizer step
 * (accumulation micro-steps before it need no communication), with
 * dist_grad_ready installed as the model's grad hook (ud = d). No-op
 * bookkeeping when world == 1. */
kiln_status dist_grads_begin(kiln_ctx *ctx, dist *d, float *grads, size_t n);
/* After dist_grads_begin: the n ranges [off[i], off[i]+len[i]) (sorted,
 * disjoint) are frozen parameters' gradients, zeros on every rank (the
 * same ranges on all): a bucket made of them only is not reduced. */
void dist_grads_skip(dist *d, const size_t *off, const size_t *len, int n);
/* A kiln_grad_ready_fn (ud is the dist*): marks [offset, offset+numel) of
 * the gradient block final and starts the allreduce of every bucket that
 * became complete. Ignored outside begin/finish. */
void dist_grad_ready(void *ud, size_t offset, size_t numel);
/* Starts the buckets not started yet (ranges never reported), waits for
 * all of them and divides the block by world: afterwards every rank holds
 * the average of the ranks' gradients. */
kiln_status dist_grads_finish(kiln_ctx *ctx, dist *d);

/* ---- ZeRO-1 sharding ----------------------------------------------- */

/* The shard of rank r over a block of n floats: [*off, *off + *len).
 * Shards are contiguous, in rank order, 16-float aligned, cover [0, n)
 * exactly; the last ones may be shorter or empty. */
void dist_shard_range(const dist *d, size_t n, int r, size_t *off,
                      size_t *len);
/* Sums buf (n floats) across ranks; on return this rank's shard of buf
 * (dist_shard_range) holds the sum; the rest of buf is unspecified.
 * Error KILN_ERR_RANGE when a shard exceeds INT_MAX floats. */
kiln_status dist_reduce_scatter_f32(kiln_ctx *ctx, dist *d, float *buf,
                                    size_t n);
/* Every rank contributes its shard of buf (n floats); on return buf holds
 * every rank's shard. */
kiln_status dist_allgather_f32(kiln_ctx *ctx, dist *d, float *buf, size_t n);

/* Collects every rank's shard of a block of n floats on root: shard
 * (this rank's dist_shard_range length) in, full (n floats, read on root
 * only; may be NULL elsewhere) out. For saving sharded optimizer state. */
kiln_status dist_gather_shards_f32(kiln_ctx *ctx, dist *d, const float *shard,
                                   float *full, size_t n, int root);
/* The reverse: root's full block (n floats; NULL elsewhere) is cut into
 * shards, each rank receiving its own in shard. For loading. */
kiln_status dist_scatter_shards_f32(kiln_ctx *ctx, dist *d, const float *full,
                                    float *shard, size_t n, int root);

/* ---- ZeRO-1: AdamW with moments sharded across ranks (dist_zero.c) -- */

/* Each rank owns the moments of its shard (dist_shard_range) of the
 * parameter block and updates only that shard; the block is reassembled
 * with an all-gather. The arithmetic per element is kiln_adamw_step's
 * (it is called on the shard), so results match the unsharded optimizer up
 * to the order of the gradient sums. */
typedef struct dist_zero dist_zero;

/* Creates the sharded optimizer for model m (decay ranges from the
 * model's tensors, intersected with this rank's shard). Free with
 * dist_zero_free. */
kiln_status dist_zero_new(kiln_ctx *ctx, dist *d, const kiln_model *m,
                          const kiln_adamw_opts *opts, dist_zero **out);
void dist_zero_free(dist_zero *z);
/* This rank's shard [*off, *off + *len) of the block. */
void dist_zero_shard(const dist_zero *z, size_t *off, size_t *len);
/* Bytes of optimizer state this rank holds (two moments of its shard). */
size_t dist_zero_state_bytes(const dist_zero *z);
int64_t dist_zero_t(const dist_zero *z);

/* Collective. Sums grads (n floats) across ranks into this rank's shard
 * and divides it by world: the shard holds the mean gradient, the rest of
 * grads is unspecified afterwards. */
kiln_status dist_zero_reduce_grads(kiln_ctx *ctx, dist_zero *z, float *grads);
/* Collective. The global L2 norm of the mean gradient (sum of the shards'
 * squares, allreduced). */
kiln_status dist_zero_grad_norm(kiln_ctx *ctx, dist_zero *z,
                                const float *grads, double *norm);
/* Scales this rank's shard of grads like kiln_clip_grad_norm. */
void dist_zero_clip(dist_zero *z, float *grads, double norm, double max_norm);
/* Collective. AdamW on this rank's shard of params, then an all-gather so
 * every rank holds the whole updated block. */
kiln_status dist_zero_update(kiln_ctx *ctx, dist_zero *z, float *params,
                             const float *grads, float lr);
/* dist_zero_update reading each gradient times grad_mul (loss-scaler
 * unscale x clip coefficient), as kiln_adamw_step_scaled: no pass over the
 * gradients before it. */
kiln_status dist_zero_update_scaled(kiln_ctx *ctx, dist_zero *z, float *params,
                                    const float *grads, float lr, float grad_mul);
/* Collective. Gathers the moments on rank 0 into a new full-size
 * kiln_adamw (*full, freed by the caller; NULL on other ranks) with the
 * same step count, ready for kiln_adamw_save. */
kiln_status dist_zero_gather(kiln_ctx *ctx, dist_zero *z, kiln_adamw **full);
/* Collective. Rank 0 reads a full optimizer.safetensors (written at any
 * world size) and every rank receives its shard. A load error on rank 0 is
 * reported on every rank. */
kiln_status dist_zero_load(kiln_ctx *ctx, dist_zero *z, const char *path);

/* ---- counters ------------------------------------------------------- */

void dist_stats_get(const dist *d, dist_stats *out);
void dist_stats_reset(dist *d);

#endif /* KILN_DIST_H */
