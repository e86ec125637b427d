/*
 * dpo.c — direct preference optimisation: the DPO objective (TRL's
 * sigmoid, ipo and hinge losses) behind the kiln_objective interface, and
 * the reference model's log-probabilities, computed once before training
 * and cached in the run directory.
 *
 * A micro-batch holds pairs of rows (chosen, rejected), kept together by
 * the trainer's row_group = 2; b->rows says which rows they are, so the
 * reference sums are looked up, never recomputed: no second model is held
 * while the policy trains. Per pair, with p/r the policy's/reference's
 * summed log-probabilities of the completion tokens and c/r chosen/
 * rejected, h = (pc - rc) - (pr - rr) and
 *   sigmoid  l = -log sigmoid(beta h)        dl/dh = -beta sigmoid(-beta h)
 *   ipo      l = (h - 1/(2 beta))^2          dl/dh = 2 (h - 1/(2 beta))
 *   hinge    l = max(0, 1 - beta h)          dl/dh = -beta [1 - beta h > 0]
 * (ipo on per-token means, as TRL). dl/dpc = dl/dh, dl/dpr = -dl/dh, spread
 * over the row's tokens as dlogp and taken back to the logits by
 * kiln_token_logprobs_backward.
 */
#include "kiln.h"
#include "base/base.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ST_PAIRS, ST_RC, ST_RR, ST_ACC, ST_LC, ST_LR, N_STATS };
static const char *const metric_names[] = {"rewards/chosen",  "rewards/rejected",
                                           "rewards/accuracies", "rewards/margins",
                                           "logps/chosen",    "logps/rejected"};
#define N_METRICS 6

struct kiln_dpo {
    kiln_dpo_opts o;
    const double *ref[2]; /* train, val */
    int64_t n[2];
    double stats[2][N_STATS];
    float *logp, *dlogp;  /* (cap) scratch */
    size_t cap;
    kiln_objective obj;
};

int kiln_dpo_loss_parse(const char *name)
{
    if (!strcmp(name, "sigmoid")) return KILN_DPO_SIGMOID;
    if (!strcmp(name, "ipo")) return KILN_DPO_IPO;
    if (!strcmp(name, "hinge")) return KILN_DPO_HINGE;
    return -1;
}

const char *kiln_dpo_loss_name(kiln_dpo_loss l)
{
    return l == KILN_DPO_IPO ? "ipo" : l == KILN_DPO_HINGE ? "hinge" : "sigmoid";
}

kiln_dpo_opts kiln_dpo_opts_default(void)
{
    return (kiln_dpo_opts){.beta = 0.1, .loss = KILN_DPO_SIGMOID};
}

/* -log sigmoid(z), stable for large |z|. */
static double neg_log_sigmoid(double z)
{
    return z >= 0 ? log1p(exp(-z)) : -z + log1p(exp(z));
}

static double sigmoid(double z)
{
    return z >= 0 ? 1.0 / (1.0 + exp(-z)) : exp(z) / (1.0 + exp(z));
}

/* The pair loss and dl/dh. */
static double pair_loss(const kiln_dpo_opts *o, double h, double *dldh)
{
    double beta = o->beta;
    switch (o->loss) {
    case KILN_DPO_IPO: {
        double d = h - 1.0 / (2.0 * beta);
        *dldh = 2.0 * d;
        return d * d;
    }
    case KILN_DPO_HINGE: {
        double m = 1.0 - beta * h;
        *dldh = m > 0 ? -beta : 0.0;
        return m > 0 ? m : 0.0;
    }
    default:
        *dldh = -beta * sigmoid(-beta * h);
        return neg_log_sigmoid(beta * h);
    }
}

static kiln_status dpo_weigh(void *user, kiln_ctx *ctx, kiln_objective_batch *b, double *weight)
{
    (void)user;
    (void)ctx;
    *weight += b->B / 2;
    return KILN_OK;
}

/* Checks the batch: pairs of rows (2i, 2i+1) that are a chosen and its
 * rejected row, inside the reference arrays. */
static kiln_status check_pairs(kiln_dpo *d, kiln_ctx *ctx, const kiln_objective_batch *b)
{
    int split = b->eval ? 1 : 0;
    if (b->B % 2 || !b->rows)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "DPO objective: a batch needs an even number of rows in pairs and "
                         "their indices (kiln_objective_batch.rows; the trainer's "
                         "kiln_train_opts.rows with kiln_train_opts.row_group = 2), got B = %d%s",
                         b->B, b->rows ? "" : " and no rows");
    if (!d->ref[split])
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "DPO objective: a %s batch but no reference log-probabilities for "
                         "those rows were given (kiln_dpo_new)",
                         split ? "validation" : "training");
    for (int i = 0; i < b->B; i += 2) {
        int64_t c = b->rows[i], r = b->rows[i + 1];
        if (c < 0 || c % 2 || r != c + 1 || r >= d->n[split])
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "DPO objective: batch rows %d and %d are rows %lld and %lld; a "
                             "pair is a chosen row 2k and its rejected row 2k+1 below %lld "
                             "(kiln_train_opts.row_group = 2 keeps them together)",
                             i, i + 1, (long long)c, (long long)r, (long long)d->n[split]);
    }
    return KILN_OK;
}

static kiln_status grow(kiln_dpo *d, kiln_ctx *ctx, size_t n)
{
    if (n <= d->cap) return KILN_OK;
    float *a = realloc(d->logp, n * sizeof *a);
    if (a) d->logp = a;
    float *g = realloc(d->dlogp, n * sizeof *g);
    if (g) d->dlogp = g;
    if (!a || !g) return kiln_fail(ctx, KILN_ERR_NOMEM, "DPO objective: out of memory");
    d->cap = n;
    return KILN_OK;
}

/* Row i's summed log-probability and its count of learned tokens. */
static double row_sum(const float *logp, const int32_t *tg, int T, int64_t *count)
{
    double s = 0;
    int64_t n = 0;
    for (int t = 0; t < T; t++)
        if (tg[t] >= 0) {
            s += (double)logp[t];
            n++;
        }
    *count = n;
    return s;
}

static kiln_status dpo_loss(void *user, kiln_ctx *ctx, const kiln_objective_batch *b,
                            const float *logits, float grad_scale, float *dlogits,
                            double *loss_sum, double *weight_sum)
{
    kiln_dpo *d = user;
    const int B = b->B, T = b->T, V = b->V;
    const int64_t N = (int64_t)B * T;
    kiln_status s;
    if ((s = check_pairs(d, ctx, b))) return s;
    if ((s = grow(d, ctx, (size_t)N))) return s;
    if ((s = kiln_token_logprobs(ctx, logits, b->targets, N, V, d->logp))) return s;
    const int split = b->eval ? 1 : 0;
    const bool ipo = d->o.loss == KILN_DPO_IPO;
    double *st = d->stats[split];
    for (int i = 0; i < B; i += 2) {
        double pol[2], ref[2], scale[2];
        for (int w = 0; w < 2; w++) {
            int64_t row = (int64_t)(i + w) * T, n;
            pol[w] = row_sum(d->logp + row, b->targets + row, T, &n);
            if (n == 0)
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "DPO objective: row %lld (pair %lld, the %s) has no completion "
                                 "token with a target",
                                 (long long)b->rows[i + w], (long long)b->rows[i] / 2,
                                 w ? "rejected" : "chosen");
            ref[w] = d->ref[split][b->rows[i + w]];
            /* ipo: per-token means (TRL divides both by the completion length) */
            scale[w] = ipo ? 1.0 / (double)n : 1.0;
            pol[w] *= scale[w];
            ref[w] *= scale[w];
        }
        double h = (pol[0] - ref[0]) - (pol[1] - ref[1]), dldh;
        *loss_sum += pair_loss(&d->o, h, &dldh);
        double rc = d->o.beta * (pol[0] - ref[0]), rr = d->o.beta * (pol[1] - ref[1]);
        st[ST_PAIRS] += 1;
        st[ST_RC] += rc;
        st[ST_RR] += rr;
        st[ST_ACC] += rc > rr ? 1 : 0;
        st[ST_LC] += pol[0];
        st[ST_LR] += pol[1];
        for (int w = 0; w < 2; w++) {
            float g = (float)((w ? -dldh : dldh) * scale[w]);
            for (int t = 0; t < T; t++) d->dlogp[(int64_t)(i + w) * T + t] = g;
        }
    }
    *weight_sum += B / 2;
    return kiln_token_logprobs_backward(ctx, logits, b->targets, d->dlogp, N, V, grad_scale,
                                        dlogits);
}

static void dpo_stats_take(void *user, bool eval, double *sums)
{
    kiln_dpo *d = user;
    memcpy(sums, d->stats[eval ? 1 : 0], sizeof d->stats[0]);
    memset(d->stats[eval ? 1 : 0], 0, sizeof d->stats[0]);
}

static void dpo_metrics(void *user, const double *s, double *v)
{
    (void)user;
    double n = s[ST_PAIRS];
    if (!(n > 0)) {
        for (int i = 0; i < N_METRICS; i++) v[i] = NAN;
        return;
    }
    v[0] = s[ST_RC] / n;
    v[1] = s[ST_RR] / n;
    v[2] = s[ST_ACC] / n;
    v[3] = (s[ST_RC] - s[ST_RR]) / n;
    v[4] = s[ST_LC] / n;
    v[5] = s[ST_LR] / n;
}

kiln_status kiln_dpo_new(kiln_ctx *ctx, const kiln_dpo_opts *o, const double *ref_train,
                         int64_t n_train, const double *ref_val, int64_t n_val, kiln_dpo **out)
{
    *out = NULL;
    if (!(o->beta > 0) || !isfinite(o->beta))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_dpo_opts.beta = %g must be > 0",
                         o->beta);
    if (o->loss != KILN_DPO_SIGMOID && o->loss != KILN_DPO_IPO && o->loss != KILN_DPO_HINGE)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_dpo_opts.loss = %d is not sigmoid, ipo or hinge", (int)o->loss);
    kiln_dpo *d = kiln_calloc(ctx, 1, sizeof *d);
    if (!d) return KILN_ERR_NOMEM;
    d->o = *o;
    d->ref[0] = ref_train;
    d->n[0] = ref_train ? n_train : 0;
    d->ref[1] = ref_val;
    d->n[1] = ref_val ? n_val : 0;
    d->obj = (kiln_objective){
        .name = "dpo",
        .fused_ce = false,
        .weigh = dpo_weigh,
        .loss = dpo_loss,
        .user = d,
        .n_stats = N_STATS,
        .n_metrics = N_METRICS,
        .metric_names = metric_names,
        .stats_take = dpo_stats_take,
        .metrics = dpo_metrics,
    };
    *out = d;
    return KILN_OK;
}

const kiln_objective *kiln_dpo_objective(kiln_dpo *d) { return &d->obj; }

void kiln_dpo_free(kiln_dpo *d)
{
    if (!d) return;
    free(d->logp);
    free(d->dlogp);
    free(d);
}

/* ---- the reference's log-probabilities ---------------------------------- */

kiln_status kiln_rows_logprobs(kiln_ctx *ctx, kiln_model *m, const kiln_packed *rows, int B,
                               double *out)
{
    if (B < 1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_rows_logprobs: B = %d must be >= 1", B);
    const int T = rows->T, V = kiln_model_config(m)->vocab_size;
    float *logp = kiln_malloc(ctx, (size_t)B * (size_t)T * sizeof *logp);
    if (!logp) return KILN_ERR_NOMEM;
    kiln_status s = KILN_OK;
    for (int64_t r = 0; r < rows->rows && !s; r += B) {
        int nb = (int)KILN_MIN((int64_t)B, rows->rows - r);
        const int32_t *tg = rows->targets + (size_t)r * (size_t)T;
        float *logits;
        s = kiln_model_forward(ctx, m, rows->tokens + (size_t)r * (size_t)T, nb, T, &logits);
        if (!s) s = kiln_token_logprobs(ctx, logits, tg, (int64_t)nb * T, V, logp);
        for (int i = 0; i < nb && !s; i++) {
            int64_t n;
            out[r + i] = row_sum(logp + (size_t)i * (size_t)T, tg + (size_t)i * (size_t)T, T, &n);
        }
    }
    free(logp);
    return s;
}

#define REF_MAGIC "kiln-dpo-ref 2\n"

/* FNV-1a over the rows' shape, tokens and targets and the reference's id:
 * what the cached numbers belong to. */
static uint64_t rows_key(const kiln_packed *a, const kiln_packed *b, const char *id)
{
    uint64_t h = 1469598103934665603ULL;
    const kiln_packed *p[2] = {a, b};
    for (int k = 0; k < 2; k++) {
        int64_t shape[2] = {p[k] ? p[k]->rows : 0, p[k] ? p[k]->T : 0};
        const unsigned char *x = (const unsigned char *)shape;
        for (size_t i = 0; i < sizeof shape; i++) h = (h ^ x[i]) * 1099511628211ULL;
        if (!p[k]) continue;
        size_t cells = (size_t)p[k]->rows * (size_t)p[k]->T;
        uint32_t c = crc32c(0, p[k]->tokens, cells * sizeof *p[k]->tokens);
        c = crc32c(c, p[k]->targets, cells * sizeof *p[k]->targets);
        for (int i = 0; i < 4; i++) h = (h ^ ((c >> (8 * i)) & 0xff)) * 1099511628211ULL;
    }
    for (const char *s = id ? id : ""; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

/* Reads the cache into the arrays when it is the one for key and its
 * numbers are intact (CRC-32C trailer); false when absent or different. */
static bool cache_read(const char *path, uint64_t key, int64_t nt, int64_t nv, double *rt,
                       double *rv)
{
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    char magic[sizeof REF_MAGIC];
    uint64_t k;
    int64_t n[2];
    uint32_t crc = 0;
    bool ok = fread(magic, 1, sizeof REF_MAGIC - 1, f) == sizeof REF_MAGIC - 1 &&
              !memcmp(magic, REF_MAGIC, sizeof REF_MAGIC - 1) && fread(&k, sizeof k, 1, f) == 1 &&
              fread(n, sizeof n, 1, f) == 1 && k == key && n[0] == nt && n[1] == nv &&
              fread(rt, sizeof *rt, (size_t)nt, f) == (size_t)nt &&
              (nv == 0 || fread(rv, sizeof *rv, (size_t)nv, f) == (size_t)nv) &&
              fread(&crc, sizeof crc, 1, f) == 1 && fgetc(f) == EOF;
    fclose(f);
    if (!ok) return false;
    uint32_t c = crc32c(0, rt, (size_t)nt * sizeof *rt);
    if (nv) c = crc32c(c, rv, (size_t)nv * sizeof *rv);
    return c == crc;
}

static kiln_status cache_write(kiln_ctx *ctx, const char *path, uint64_t key, int64_t nt,
                               int64_t nv, const double *rt, const double *rv)
{
    file_writer w;
    kiln_status s = file_writer_open(ctx, &w, path);
    if (s) return s;
    int64_t n[2] = {nt, nv};
    uint32_t c = crc32c(0, rt, (size_t)nt * sizeof *rt);
    if (nv) c = crc32c(c, rv, (size_t)nv * sizeof *rv);
    file_writer_write(&w, REF_MAGIC, sizeof REF_MAGIC - 1);
    file_writer_write(&w, &key, sizeof key);
    file_writer_write(&w, n, sizeof n);
    file_writer_write(&w, rt, (size_t)nt * sizeof *rt);
    if (nv) file_writer_write(&w, rv, (size_t)nv * sizeof *rv);
    file_writer_write(&w, &c, sizeof c);
    return file_writer_commit(ctx, &w);
}

kiln_status kiln_dpo_reference(kiln_ctx *ctx, const kiln_dpo_ref_opts *o,
                               const kiln_packed *rows, const kiln_packed *val_rows,
                               double *ref_train, double *ref_val, bool *from_cache)
{
    *from_cache = false;
    int64_t nt = rows->rows, nv = val_rows ? val_rows->rows : 0;
    uint64_t key = rows_key(rows, val_rows, o->ref_id ? o->ref_id : o->model_dir);
    if (o->cache_path && cache_read(o->cache_path, key, nt, nv, ref_train, ref_val)) {
        *from_cache = true;
        return KILN_OK;
    }
    if (o->require_cache)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "%s is missing, damaged, or belongs to other data or another reference "
                         "model (%s): the run's reference log-probabilities cannot be reused; start "
                         "a new run (another kiln_train_opts.out) for changed data",
                         o->cache_path ? o->cache_path : "(no cache path)",
                         o->ref_id ? o->ref_id : o->model_dir);
    if (o->threads > 0) {
        kiln_set_threads(ctx, o->threads);
        omp_set_num_threads(o->threads);
    }
    kiln_model *m = NULL;
    kiln_status s = kiln_checkpoint_verify(ctx, o->model_dir);
    if (!s) s = kiln_model_load(ctx, o->model_dir, &m);
    if (!s) s = kiln_model_set_precision_opts(ctx, m, &o->po);
    if (!s && kiln_model_config(m)->n_ctx < rows->T)
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "the reference model %s has n_ctx %d, shorter than the rows' %d positions",
                      o->model_dir, kiln_model_config(m)->n_ctx, rows->T);
    if (!s) s = kiln_model_prepare(ctx, m, o->batch, rows->T);
    if (!s) s = kiln_rows_logprobs(ctx, m, rows, o->batch, ref_train);
    if (!s && val_rows) s = kiln_rows_logprobs(ctx, m, val_rows, o->batch, ref_val);
    kiln_model_free(m);
    if (!s && o->cache_path) s = cache_write(ctx, o->cache_path, key, nt, nv, ref_train, ref_val);
    return s;
}
