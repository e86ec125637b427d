/*
 * trainer_rows.c — the trainer's second data source (kiln_train_opts.rows):
 * rows of (tokens, targets with -1 = no loss) held in memory, as SFT
 * builds them from a JSONL dataset (kiln_dataset_rows), instead of windows
 * of token shards. A row takes a window's place: the global position pos
 * runs across epochs and epoch e visits the rows in a Fisher-Yates order
 * drawn from an rng seeded by (seed, e) -- the window loader's rule -- so
 * the order depends on nothing else and a resumed run draws the same rows.
 * With row_group g > 1 the shuffle permutes groups of g consecutive rows,
 * which stay together and in order (DPO's chosen/rejected pairs).
 * Validation is the masked cross-entropy over val_rows, or the objective's
 * own loss when it is not the fused cross-entropy.
 */
#include "train/trainer_int.h"

#include <stdlib.h>
#include <string.h>

static kiln_status check_rows(trainer *t, const kiln_packed *p, const char *field)
{
    kiln_ctx *ctx = t->ctx;
    int V = kiln_model_config(t->model)->vocab_size;
    if (p->T != t->o.seq)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "%s holds rows of T = %d positions but kiln_train_opts.seq = %d; "
                         "they must be equal",
                         field, p->T, t->o.seq);
    size_t cells = (size_t)p->rows * (size_t)p->T;
    if (tr_rows_packed(p)) {
        int64_t bad = 0;
        while (!p->pos && p->doc[bad] <= 0) bad++; /* the first packed row */
        if (!p->pos || !kern_doc_pos_ok(p->pos, (int)p->rows, p->T, &bad))
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "%s row %lld holds several documents but its pos is %s at "
                             "position %lld: each document's positions run 0, 1, 2, ...",
                             field, (long long)(bad / p->T), p->pos ? "broken" : "missing",
                             (long long)(bad % p->T));
    }
    for (size_t c = 0; c < cells; c++) {
        if (p->tokens[c] < 0 || p->tokens[c] >= V || p->targets[c] >= V)
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "%s row %zu position %zu: token %d / target %d is outside the "
                             "model's vocabulary [0, %d): the data and the model do not match",
                             field, c / (size_t)p->T, c % (size_t)p->T, (int)p->tokens[c],
                             (int)p->targets[c], V);
    }
    return KILN_OK;
}

bool tr_rows_packed(const kiln_packed *p)
{
    size_t cells = (size_t)p->rows * (size_t)p->T;
    for (size_t c = 0; p->doc && c < cells; c++)
        if (p->doc[c] > 0) return true;
    return false;
}

kiln_status tr_rows_setup(trainer *t)
{
    const kiln_train_opts *o = &t->o;
    kiln_status s;
    if (o->rows->rows < 1)
        return kiln_fail(t->ctx, KILN_ERR_INVALID_ARG, "kiln_train_opts.rows holds no rows");
    int g = t->row_group = o->row_group > 1 ? o->row_group : 1;
    if (o->row_group < 0 || o->batch % g || o->rows->rows % g ||
        (o->val_rows && o->val_rows->rows % g))
        return kiln_fail(t->ctx, KILN_ERR_INVALID_ARG,
                         "kiln_train_opts.row_group = %d: kiln_train_opts.batch (%d) and the "
                         "row counts of kiln_train_opts.rows (%lld) and "
                         "kiln_train_opts.val_rows (%lld) must be multiples of it",
                         o->row_group, o->batch, (long long)o->rows->rows,
                         (long long)(o->val_rows ? o->val_rows->rows : 0));
    if ((s = check_rows(t, o->rows, "kiln_train_opts.rows"))) return s;
    if (o->val_rows && (s = check_rows(t, o->val_rows, "kiln_train_opts.val_rows"))) return s;
    t->row_perm_epoch = -1;
    /* as for token shards: no validation when evals are off */
    t->row_val = o->val_rows && o->val_rows->rows > 0 && o->eval_every > 0 && o->eval_steps > 0;
    if (o->shuffle &&
        !(t->row_perm = kiln_malloc(t->ctx, (size_t)(o->rows->rows / g) * sizeof *t->row_perm)))
        return KILN_ERR_NOMEM;
    return KILN_OK;
}

int64_t tr_num_windows(const trainer *t)
{
    return t->o.rows ? t->o.rows->rows : kiln_loader_num_windows(t->train);
}

void tr_rows_get(trainer *t, int64_t pos, int32_t *in, int32_t *tg, int32_t *ps, int64_t *id)
{
    const kiln_packed *p = t->o.rows;
    const int64_t grp = t->row_group;
    /* the permutation is over the n groups; r the group, w the row in it */
    int64_t n = p->rows / grp, epoch = pos / p->rows, r = (pos % p->rows) / grp, w = pos % grp;
    if (t->row_perm) {
        if (epoch != t->row_perm_epoch) {
            kiln_rng g;
            kiln_rng_seed(&g, t->o.seed ^ (0x9E3779B97F4A7C15ULL * (uint64_t)(epoch + 1)));
            for (int64_t i = 0; i < n; i++) t->row_perm[i] = i;
            for (int64_t i = n - 1; i > 0; i--) {
                int64_t j = (int64_t)kiln_rng_below(&g, (uint64_t)i + 1);
                int64_t x = t->row_perm[i];
                t->row_perm[i] = t->row_perm[j];
                t->row_perm[j] = x;
            }
            t->row_perm_epoch = epoch;
        }
        r = t->row_perm[r];
    }
    r = r * grp + w;
    *id = r;
    size_t T = (size_t)p->T;
    memcpy(in, p->tokens + (size_t)r * T, T * sizeof *in);
    memcpy(tg, p->targets + (size_t)r * T, T * sizeof *tg);
    if (ps) memcpy(ps, p->pos + (size_t)r * T, T * sizeof *ps);
}

kiln_status tr_rows_eval(trainer *t, double sums[2])
{
    const kiln_packed *p = t->o.val_rows;
    const int B = t->o.batch, T = t->o.seq;
    const int64_t g = t->row_group;
    int64_t n = p->rows / g; /* in groups */
    if (t->o.eval_steps > 0)
        n = KILN_MIN(n, t->o.eval_steps * (int64_t)(B / g) * t->world);
    /* this rank's rows [a, b): whole groups */
    int64_t a = n * t->rank / t->world * g, b = n * (t->rank + 1) / t->world * g;
    int V = kiln_model_config(t->model)->vocab_size;
    bool packed = tr_rows_packed(p);
    const kiln_objective *obj = t->obj;
    kiln_status s = KILN_OK;
    for (int64_t r = a; r < b && !s; r += B) {
        int nb = (int)KILN_MIN((int64_t)B, b - r);
        float *logits;
        const int32_t *tg = p->targets + (size_t)r * (size_t)T;
        s = kiln_model_forward_pos(t->ctx, t->model, p->tokens + (size_t)r * (size_t)T,
                                   packed ? p->pos + (size_t)r * (size_t)T : NULL, nb, T, &logits);
        if (s) break;
        if (obj->fused_ce) {
            s = kiln_cross_entropy(t->ctx, logits, tg, NULL, (int64_t)nb * T, V, 0.0f, NULL,
                                   &sums[0], &sums[1]);
            continue;
        }
        for (int i = 0; i < nb; i++) t->row_ids[i] = r + i;
        kiln_objective_batch mb = {
            .B = nb, .T = T, .V = V,
            .tokens = p->tokens + (size_t)r * (size_t)T,
            .targets = tg,
            .step = t->step,
            .rows = t->row_ids,
            .eval = true,
        };
        s = obj->loss(obj->user, t->ctx, &mb, logits, 0.0f, logits, &sums[0], &sums[1]);
    }
    return s;
}
