/*
 * load.c — kiln_engine_new: builds an engine from a kiln_model through its
 * named tensors (Hugging Face names and shapes), so the engine does not
 * depend on the model's internal parameter layout.
 */
#include "infer/infer.h"

static const float *model_src(void *ud, const char *name, int *ndim, int64_t shape[4])
{
    kiln_model *m = ud;
    int i = kiln_model_find_tensor(m, name);
    if (i < 0) return NULL;
    const kiln_tensor_info *t = kiln_model_tensor(m, i);
    *ndim = t->ndim;
    for (int d = 0; d < 4; d++) shape[d] = d < t->ndim ? t->shape[d] : 0;
    return kiln_model_params(m) + t->offset;
}

kiln_status kiln_engine_new(kiln_ctx *ctx, const kiln_model *m,
                            const kiln_engine_opts *opts, kiln_engine **out)
{
    return infer_engine_new_src(ctx, kiln_model_config(m), model_src, (void *)m, opts, out);
}
