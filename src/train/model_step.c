/*
 * model_step.c — the optimizer's step on a model's parameters
 * (kiln_model_adamw_step). For a bf16 model the weight matrices whose
 * packed bf16 copies can be refreshed strip by strip (model_wstrips) are
 * updated in strips of rows, each strip packed while it is still in cache,
 * so the next forward does not read every fp32 weight back to repack it;
 * the rest of the block is updated as any parameter; frozen matrices keep
 * their copies (they did not change). The optimizer owns
 * the update; the model only says which matrices have copies and how to
 * refresh a strip of them.
 */
#include "model/model.h"
#include "train/adamw.h"

void kiln_model_adamw_step(kiln_model *m, kiln_adamw *o, const float *grads, float lr,
                           float grad_mul)
{
    const model_wstrip *ws = NULL;
    int n = 0;
    if (kiln_adamw_size(o) == m->num_params) n = model_wstrips(m, &ws);
    adamw_matrix *mats = n ? adamw_matrix_scratch(o, n) : NULL;
    if (!mats) n = 0; /* out of memory: the plain step; the forward repacks */
    for (int i = 0; i < n; i++)
        mats[i] = (adamw_matrix){.offset = ws[i].offset,
                                 .rows = ws[i].rows,
                                 .cols = ws[i].cols,
                                 .strip = ws[i].strip,
                                 .after = ws[i].after,
                                 .ud = ws[i].ud};
    /* m->params itself: the step tells the model what it refreshed */
    adamw_step_matrices(o, m->params, grads, lr, grad_mul, n ? mats : NULL, n);
    for (int i = 0; i < n; i++)
        if (mats[i].done) model_wstrip_fresh(m, i);
    if (kiln_adamw_size(o) == m->num_params) model_wkeep_frozen(m, adamw_untouched, o);
    model_params_stepped(m);
}
