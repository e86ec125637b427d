/*
 * adamw.c — the AdamW optimizer (decoupled weight decay, per-range decay
 * mask), global-norm gradient clipping, learning-rate schedules, and the
 * optimizer-state file (optimizer.safetensors).
 *
 * Everything here is elementwise or reduced in a fixed order, so results
 * do not depend on the OpenMP thread count.
 */
#include "base/base.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct decay_range {
    size_t offset, numel;
    bool decay;
} decay_range;

struct kiln_adamw {
    kiln_adamw_opts opts;
    size_t n;
    int64_t t;
    float *m; /* (n) first moment */
    float *v; /* (n) second moment */
    decay_range *ranges; /* disjoint, sorted, cover [0, n) */
    int nranges;
};

kiln_adamw_opts kiln_adamw_opts_default(void)
{
    return (kiln_adamw_opts){
        .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f};
}

kiln_status kiln_adamw_new(kiln_ctx *ctx, size_t n,
                           const kiln_adamw_opts *opts, kiln_adamw **out)
{
    *out = NULL;
    if (n == 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "AdamW over 0 parameters");
    kiln_adamw *o = kiln_calloc(ctx, 1, sizeof *o);
    if (!o) return KILN_ERR_NOMEM;
    o->opts = opts ? *opts : kiln_adamw_opts_default();
    o->n = n;
    o->m = kiln_aligned_alloc(ctx, n * sizeof(float));
    o->v = kiln_aligned_alloc(ctx, n * sizeof(float));
    o->ranges = kiln_malloc(ctx, sizeof *o->ranges);
    if (!o->m || !o->v || !o->ranges) {
        kiln_adamw_free(o);
        return KILN_ERR_NOMEM;
    }
    o->ranges[0] = (decay_range){0, n, false};
    o->nranges = 1;
    *out = o;
    return KILN_OK;
}

void kiln_adamw_free(kiln_adamw *o)
{
    if (!o) return;
    free(o->m);
    free(o->v);
    free(o->ranges);
    free(o);
}

kiln_status kiln_adamw_set_decay(kiln_ctx *ctx, kiln_adamw *o, size_t offset,
                                 size_t numel, bool decay)
{
    if (offset > o->n || numel > o->n - offset)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "AdamW decay range [%zu, %zu) outside %zu parameters",
                         offset, offset + numel, o->n);
    if (numel == 0) return KILN_OK;
    /* Split ranges at offset and offset+numel, then set the flag. */
    decay_range *nr = kiln_malloc(ctx, ((size_t)o->nranges + 2) * sizeof *nr);
    if (!nr) return KILN_ERR_NOMEM;
    int k = 0;
    size_t lo = offset, hi = offset + numel;
    for (int i = 0; i < o->nranges; i++) {
        decay_range r = o->ranges[i];
        size_t a = r.offset, b = r.offset + r.numel;
        size_t cuts[4] = {a, lo > a && lo < b ? lo : a, hi > a && hi < b ? hi : a, b};
        size_t pts[4];
        int np = 0;
        for (int c = 0; c < 4; c++)
            if (np == 0 || cuts[c] > pts[np - 1]) pts[np++] = cuts[c];
        for (int c = 0; c + 1 < np; c++) {
            decay_range piece = {pts[c], pts[c + 1] - pts[c], r.decay};
            if (piece.offset >= lo && piece.offset < hi) piece.decay = decay;
            nr[k++] = piece;
        }
    }
    /* merge neighbours with equal flags */
    int m = 0;
    for (int i = 0; i < k; i++) {
        if (m > 0 && nr[m - 1].decay == nr[i].decay)
            nr[m - 1].numel += nr[i].numel;
        else
            nr[m++] = nr[i];
    }
    free(o->ranges);
    o->ranges = nr;
    o->nranges = m;
    return KILN_OK;
}

kiln_status kiln_adamw_new_for_model(kiln_ctx *ctx, const kiln_model *m,
                                     const kiln_adamw_opts *opts,
                                     kiln_adamw **out)
{
    kiln_status s = kiln_adamw_new(ctx, kiln_model_num_params(m), opts, out);
    if (s) return s;
    for (int i = 0; i < kiln_model_num_tensors(m); i++) {
        const kiln_tensor_info *ti = kiln_model_tensor(m, i);
        if (!ti->decay) continue;
        s = kiln_adamw_set_decay(ctx, *out, ti->offset, ti->numel, true);
        if (s) {
            kiln_adamw_free(*out);
            *out = NULL;
            return s;
        }
    }
    return KILN_OK;
}

void kiln_adamw_step(kiln_adamw *o, float *params, const float *grads,
                     float lr)
{
    o->t++;
    const float b1 = o->opts.beta1, b2 = o->opts.beta2, eps = o->opts.eps;
    const float bc1 = (float)(1.0 - pow((double)b1, (double)o->t));
    const float bc2 = (float)(1.0 - pow((double)b2, (double)o->t));
    float *restrict m = o->m, *restrict v = o->v;
    for (int r = 0; r < o->nranges; r++) {
        const float wd = o->ranges[r].decay ? o->opts.weight_decay : 0.0f;
        const ptrdiff_t a = (ptrdiff_t)o->ranges[r].offset;
        const ptrdiff_t b = a + (ptrdiff_t)o->ranges[r].numel;
#pragma omp parallel for schedule(static)
        for (ptrdiff_t i = a; i < b; i++) {
            float g = grads[i];
            float mi = b1 * m[i] + (1.0f - b1) * g;
            float vi = b2 * v[i] + (1.0f - b2) * g * g;
            m[i] = mi;
            v[i] = vi;
            float mhat = mi / bc1, vhat = vi / bc2;
            params[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * params[i]);
        }
    }
}

size_t kiln_adamw_size(const kiln_adamw *o) { return o->n; }
int64_t kiln_adamw_t(const kiln_adamw *o) { return o->t; }
void kiln_adamw_set_t(kiln_adamw *o, int64_t t) { o->t = t; }
float *kiln_adamw_m(kiln_adamw *o) { return o->m; }
float *kiln_adamw_v(kiln_adamw *o) { return o->v; }

/* ---- norms and clipping --------------------------------------------- */

#define NORM_BLOCK 16384

double kiln_l2_norm(const float *x, size_t n)
{
    size_t nb = (n + NORM_BLOCK - 1) / NORM_BLOCK;
    double *part = malloc((nb ? nb : 1) * sizeof *part);
    double total = 0;
    if (!part) { /* sequential fallback, same block order */
        for (size_t b = 0; b < nb; b++) {
            double s = 0;
            size_t e = KILN_MIN(n, (b + 1) * NORM_BLOCK);
            for (size_t i = b * NORM_BLOCK; i < e; i++) s += (double)x[i] * x[i];
            total += s;
        }
        return sqrt(total);
    }
#pragma omp parallel for schedule(static)
    for (ptrdiff_t b = 0; b < (ptrdiff_t)nb; b++) {
        double s = 0;
        size_t e = KILN_MIN(n, ((size_t)b + 1) * NORM_BLOCK);
        for (size_t i = (size_t)b * NORM_BLOCK; i < e; i++) s += (double)x[i] * x[i];
        part[b] = s;
    }
    for (size_t b = 0; b < nb; b++) total += part[b];
    free(part);
    return sqrt(total);
}

float kiln_clip_grad_norm(float *x, size_t n, double norm, double max_norm)
{
    if (max_norm <= 0 || !(norm > max_norm)) return 1.0f;
    float f = (float)(max_norm / (norm + 1e-6));
#pragma omp parallel for schedule(static)
    for (ptrdiff_t i = 0; i < (ptrdiff_t)n; i++) x[i] *= f;
    return f;
}

/* ---- schedules ------------------------------------------------------ */

int kiln_schedule_parse(const char *name)
{
    if (!name) return -1;
    if (!strcmp(name, "cosine")) return KILN_SCHEDULE_COSINE;
    if (!strcmp(name, "linear")) return KILN_SCHEDULE_LINEAR;
    if (!strcmp(name, "constant")) return KILN_SCHEDULE_CONSTANT;
    return -1;
}

const char *kiln_schedule_name(kiln_schedule s)
{
    switch (s) {
    case KILN_SCHEDULE_COSINE: return "cosine";
    case KILN_SCHEDULE_LINEAR: return "linear";
    case KILN_SCHEDULE_CONSTANT: return "constant";
    }
    return "?";
}

double kiln_lr_at(kiln_schedule s, double lr, double min_lr, int64_t warmup,
                  int64_t total, int64_t step)
{
    if (warmup > 0 && step < warmup) return lr * (double)(step + 1) / (double)warmup;
    if (s == KILN_SCHEDULE_CONSTANT) return lr;
    int64_t span = total - warmup - 1;
    double p = span > 0 ? (double)(step - warmup) / (double)span : 1.0;
    if (p < 0) p = 0;
    if (p > 1) p = 1;
    if (s == KILN_SCHEDULE_LINEAR) return lr + (min_lr - lr) * p;
    return min_lr + 0.5 * (1.0 + cos(M_PI * p)) * (lr - min_lr);
}

/* ---- optimizer.safetensors ------------------------------------------ */

kiln_status kiln_adamw_save(kiln_ctx *ctx, const kiln_adamw *o,
                            const char *path)
{
    size_t bytes = o->n * sizeof(float);
    char hdr[512];
    int len = snprintf(hdr, sizeof hdr,
                       "{\"__metadata__\":{\"format\":\"kiln-adamw\",\"step\":"
                       "\"%lld\"},\"exp_avg\":{\"dtype\":\"F32\",\"shape\":[%zu],"
                       "\"data_offsets\":[0,%zu]},\"exp_avg_sq\":{\"dtype\":"
                       "\"F32\",\"shape\":[%zu],\"data_offsets\":[%zu,%zu]}}",
                       (long long)o->t, o->n, bytes, o->n, bytes, 2 * bytes);
    while (len % 8) hdr[len++] = ' ';
    unsigned char lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)((uint64_t)len >> (8 * i));
    file_writer w;
    kiln_status s = file_writer_open(ctx, &w, path);
    if (s) return s;
    file_writer_write(&w, lenb, 8);
    file_writer_write(&w, hdr, (size_t)len);
    file_writer_write(&w, o->m, bytes);
    file_writer_write(&w, o->v, bytes);
    return file_writer_commit(ctx, &w);
}

static kiln_status tensor_range(kiln_ctx *ctx, json_t *h, const char *name,
                                const char *path, size_t n, size_t data_size,
                                size_t *off)
{
    json_t *t = json_object_get(h, name);
    json_t *sh = json_object_get(t, "shape");
    json_t *of = json_object_get(t, "data_offsets");
    const char *dt = json_string_value(json_object_get(t, "dtype"));
    if (!t || !dt || strcmp(dt, "F32") || json_array_size(sh) != 1 ||
        json_array_size(of) != 2)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "'%s': tensor \"%s\" is missing or not a 1-D F32 "
                         "tensor",
                         path, name);
    json_int_t len = json_integer_value(json_array_get(sh, 0));
    json_int_t a = json_integer_value(json_array_get(of, 0));
    json_int_t b = json_integer_value(json_array_get(of, 1));
    if ((size_t)len != n)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "'%s': \"%s\" has %lld values but the model has %zu "
                         "parameters (checkpoint of another model?)",
                         path, name, (long long)len, n);
    if (a < 0 || b < a || (size_t)(b - a) != n * sizeof(float) ||
        (size_t)b > data_size)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "'%s': \"%s\" has data offsets outside the file",
                         path, name);
    *off = (size_t)a;
    return KILN_OK;
}

kiln_status kiln_adamw_load(kiln_ctx *ctx, kiln_adamw *o, const char *path)
{
    file_map fm;
    kiln_status s = file_map_open(ctx, path, &fm);
    if (s) return s;
    json_t *h = NULL;
    uint64_t hl = 0;
    if (fm.size >= 8)
        for (int i = 0; i < 8; i++) hl |= (uint64_t)fm.data[i] << (8 * i);
    if (fm.size < 8 || hl > fm.size - 8 || hl > (1u << 20)) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "'%s' is not a safetensors file (bad header length)", path);
        goto done;
    }
    if ((s = js_load_buf(ctx, (const char *)fm.data + 8, (size_t)hl, path, &h)))
        goto done;
    const char *fmt = json_string_value(
        json_object_get(json_object_get(h, "__metadata__"), "format"));
    const char *st = json_string_value(
        json_object_get(json_object_get(h, "__metadata__"), "step"));
    if (!fmt || strcmp(fmt, "kiln-adamw") || !st) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "'%s' is not a kiln AdamW state (metadata format)", path);
        goto done;
    }
    size_t data = (size_t)(8 + hl), moff = 0, voff = 0;
    if ((s = tensor_range(ctx, h, "exp_avg", path, o->n, fm.size - data, &moff)) ||
        (s = tensor_range(ctx, h, "exp_avg_sq", path, o->n, fm.size - data, &voff)))
        goto done;
    memcpy(o->m, fm.data + data + moff, o->n * sizeof(float));
    memcpy(o->v, fm.data + data + voff, o->n * sizeof(float));
    o->t = strtoll(st, NULL, 10);
done:
    json_decref(h);
    file_map_close(&fm);
    return s;
}
