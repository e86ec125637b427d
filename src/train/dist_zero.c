/*
 * dist_zero.c — ZeRO stage 1 over dist.h: AdamW whose moments are sharded
 * across the ranks. Each rank runs the train layer's kiln_adamw on its own
 * contiguous shard of the parameter block (so the per-element update is
 * exactly the unsharded one), gradients arrive by reduce-scatter, the
 * clipping norm is the global one, and an all-gather returns the updated
 * weights to every rank. Checkpoints hold the full optimizer state: the
 * shards are gathered to rank 0 on save and cut again on load, so a run
 * saved at N ranks resumes at M.
 */
#include "train/dist.h"

#include "base/base.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct dist_zero {
    dist *d;
    size_t n;           /* the whole block */
    size_t off, len;    /* this rank's shard */
    kiln_adamw_opts opts;
    kiln_adamw *opt;    /* over the shard; NULL when the shard is empty */
    int64_t t_empty;    /* step count when opt is NULL */
};

kiln_status dist_zero_new(kiln_ctx *ctx, dist *d, const kiln_model *m,
                          const kiln_adamw_opts *opts, dist_zero **out)
{
    *out = NULL;
    dist_zero *z = kiln_calloc(ctx, 1, sizeof *z);
    if (!z) return KILN_ERR_NOMEM;
    z->d = d;
    z->n = kiln_model_num_params(m);
    z->opts = opts ? *opts : kiln_adamw_opts_default();
    dist_shard_range(d, z->n, dist_rank(d), &z->off, &z->len);
    kiln_status s = KILN_OK;
    if (z->len > 0) {
        s = kiln_adamw_new(ctx, z->len, &z->opts, &z->opt);
        for (int i = 0; !s && i < kiln_model_num_tensors(m); i++) {
            const kiln_tensor_info *ti = kiln_model_tensor(m, i);
            if (!ti->decay) continue;
            size_t lo = KILN_MAX(ti->offset, z->off);
            size_t hi = KILN_MIN(ti->offset + ti->numel, z->off + z->len);
            if (lo < hi)
                s = kiln_adamw_set_decay(ctx, z->opt, lo - z->off, hi - lo,
                                         true);
        }
    }
    if (s) {
        dist_zero_free(z);
        return s;
    }
    *out = z;
    return KILN_OK;
}

void dist_zero_free(dist_zero *z)
{
    if (!z) return;
    kiln_adamw_free(z->opt);
    free(z);
}

void dist_zero_shard(const dist_zero *z, size_t *off, size_t *len)
{
    *off = z->off;
    *len = z->len;
}

size_t dist_zero_state_bytes(const dist_zero *z)
{
    return 2 * z->len * sizeof(float);
}

int64_t dist_zero_t(const dist_zero *z)
{
    return z->opt ? kiln_adamw_t(z->opt) : z->t_empty;
}

kiln_status dist_zero_reduce_grads(kiln_ctx *ctx, dist_zero *z, float *grads)
{
    kiln_status s = dist_reduce_scatter_f32(ctx, z->d, grads, z->n);
    if (s) return s;
    int w = dist_world(z->d);
    if (w > 1) {
        float f = 1.0f / (float)w;
        float *g = grads + z->off;
        ptrdiff_t len = (ptrdiff_t)z->len;
#pragma omp parallel for schedule(static) if (len > (1 << 16))
        for (ptrdiff_t i = 0; i < len; i++) g[i] *= f;
    }
    return KILN_OK;
}

kiln_status dist_zero_grad_norm(kiln_ctx *ctx, dist_zero *z,
                                const float *grads, double *norm)
{
    double part = z->len ? kiln_l2_norm(grads + z->off, z->len) : 0.0;
    double ss = part * part;
    kiln_status s = dist_allreduce_sum_f64(ctx, z->d, &ss, 1);
    if (s) return s;
    *norm = sqrt(ss);
    return KILN_OK;
}

void dist_zero_clip(dist_zero *z, float *grads, double norm, double max_norm)
{
    if (z->len) kiln_clip_grad_norm(grads + z->off, z->len, norm, max_norm);
}

kiln_status dist_zero_update(kiln_ctx *ctx, dist_zero *z, float *params,
                             const float *grads, float lr)
{
    return dist_zero_update_scaled(ctx, z, params, grads, lr, 1.0f);
}

kiln_status dist_zero_update_scaled(kiln_ctx *ctx, dist_zero *z, float *params,
                                    const float *grads, float lr, float grad_mul)
{
    if (z->opt)
        kiln_adamw_step_scaled(z->opt, params + z->off, grads + z->off, lr, grad_mul);
    else
        z->t_empty++;
    return dist_allgather_f32(ctx, z->d, params, z->n);
}

kiln_status dist_zero_gather(kiln_ctx *ctx, dist_zero *z, kiln_adamw **full)
{
    *full = NULL;
    bool root = dist_is_root(z->d);
    kiln_adamw *f = NULL;
    double ok = 1;
    if (root && kiln_adamw_new(ctx, z->n, &z->opts, &f)) ok = 0;
    /* every rank learns whether rank 0 could allocate, so none of them
     * waits in a gather rank 0 never joins */
    kiln_status s = dist_bcast(ctx, z->d, &ok, sizeof ok, 0);
    if (s) goto fail;
    if (!ok) {
        s = root ? KILN_ERR_NOMEM
                 : kiln_fail(ctx, KILN_ERR_NOMEM,
                             "rank 0 could not allocate the full optimizer "
                             "state (%zu floats) to save a checkpoint",
                             2 * z->n);
        goto fail;
    }
    float empty = 0;
    const float *m = z->opt ? kiln_adamw_m(z->opt) : &empty;
    const float *v = z->opt ? kiln_adamw_v(z->opt) : &empty;
    if ((s = dist_gather_shards_f32(ctx, z->d, m, root ? kiln_adamw_m(f) : NULL,
                                    z->n, 0)) ||
        (s = dist_gather_shards_f32(ctx, z->d, v, root ? kiln_adamw_v(f) : NULL,
                                    z->n, 0)))
        goto fail;
    if (root) {
        kiln_adamw_set_t(f, dist_zero_t(z));
        *full = f;
    }
    return KILN_OK;
fail:
    kiln_adamw_free(f);
    return s;
}

kiln_status dist_zero_load(kiln_ctx *ctx, dist_zero *z, const char *path)
{
    bool root = dist_is_root(z->d);
    kiln_adamw *f = NULL;
    kiln_status s = KILN_OK;
    double hdr[2] = {0, 0}; /* status on rank 0, step count */
    if (root) {
        s = kiln_adamw_new(ctx, z->n, &z->opts, &f);
        if (!s) s = kiln_adamw_load(ctx, f, path);
        hdr[0] = (double)s;
        hdr[1] = s ? 0 : (double)kiln_adamw_t(f);
    }
    kiln_status b = dist_bcast(ctx, z->d, hdr, sizeof hdr, 0);
    if (b) {
        kiln_adamw_free(f);
        return b;
    }
    if (hdr[0] != 0) {
        kiln_adamw_free(f);
        return root ? s
                    : kiln_fail(ctx, (kiln_status)hdr[0],
                                "rank 0 could not load the optimizer state "
                                "'%s' (see rank 0's message)",
                                path);
    }
    float dummy = 0;
    float *m = z->opt ? kiln_adamw_m(z->opt) : &dummy;
    float *v = z->opt ? kiln_adamw_v(z->opt) : &dummy;
    if ((s = dist_scatter_shards_f32(ctx, z->d, root ? kiln_adamw_m(f) : NULL,
                                     m, z->n, 0)) ||
        (s = dist_scatter_shards_f32(ctx, z->d, root ? kiln_adamw_v(f) : NULL,
                                     v, z->n, 0))) {
        kiln_adamw_free(f);
        return s;
    }
    kiln_adamw_free(f);
    int64_t t = (int64_t)hdr[1];
    if (z->opt) kiln_adamw_set_t(z->opt, t);
    else z->t_empty = t;
    return KILN_OK;
}
