/*
 * dist_api.c — the public kiln_dist handle (kiln.h): the train layer's
 * dist (dist.h) for programs that run their own loop over an MPI job
 * (kiln grpo's rollouts and updates), with the same launcher detection,
 * watchdog and error handler as the trainer.
 */
#include "train/dist.h"
#include "base/base.h"
#include "model/model.h"

#include <stdlib.h>

struct kiln_dist {
    dist *d;
};

kiln_status kiln_dist_new(kiln_ctx *ctx, const kiln_dist_opts *opts, kiln_dist **out)
{
    *out = NULL;
    kiln_dist *k = calloc(1, sizeof *k);
    if (!k) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    kiln_status s = dist_init(ctx, &k->d, opts);
    if (s) {
        free(k);
        return s;
    }
    *out = k;
    return KILN_OK;
}

void kiln_dist_free(kiln_dist *d)
{
    if (!d) return;
    dist_free(d->d);
    free(d);
}

void kiln_dist_abandon(kiln_dist *d)
{
    if (!d) return;
    dist_abandon(d->d);
    free(d);
}

int kiln_dist_rank(const kiln_dist *d) { return dist_rank(d->d); }
int kiln_dist_world(const kiln_dist *d) { return dist_world(d->d); }

kiln_status kiln_dist_sum_f32(kiln_ctx *ctx, kiln_dist *d, float *buf, size_t n)
{
    return dist_allreduce_sum_f32(ctx, d->d, buf, n);
}

kiln_status kiln_dist_sum_f64(kiln_ctx *ctx, kiln_dist *d, double *buf, size_t n)
{
    return dist_allreduce_sum_f64(ctx, d->d, buf, n);
}

kiln_status kiln_dist_max_f64(kiln_ctx *ctx, kiln_dist *d, double *buf, size_t n)
{
    return dist_allreduce_max_f64(ctx, d->d, buf, n);
}

kiln_status kiln_dist_barrier(kiln_ctx *ctx, kiln_dist *d)
{
    return dist_barrier(ctx, d->d);
}

kiln_status kiln_dist_sum_grads(kiln_ctx *ctx, kiln_dist *d, kiln_model *m)
{
    if (dist_world(d->d) == 1) return KILN_OK;
    model_grads_materialize(m); /* lazily zeroed matrices: written out */
    return dist_allreduce_sum_f32(ctx, d->d, model_grads_deferred(m), kiln_model_num_params(m));
}
