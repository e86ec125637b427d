/*
 * sparsity.c — the mark of a sparse model and the trainer's mask that
 * keeps it sparse.
 *
 * `kiln prune` (compress/prune.c) zeroes weights of the four linear
 * matrices of every layer and writes DIR/sparsity.json beside the model.
 * A training run started from such a directory (kiln_train_opts.init_from
 * or resume) builds a bit mask of the zeros those matrices hold at the
 * start and clears their gradients before every optimizer step, so
 * further training (recovery fine-tuning, SFT) keeps the pattern: AdamW
 * with a gradient that was always zero has zero moments and a zero
 * update, and weight decay scales zero to zero. The mark travels into
 * every checkpoint, so a resume or a later init_from keeps it too.
 * Masking the gradient (rather than re-zeroing the weights after the
 * step) also keeps the gradient norm, and so the clip, that of the
 * weights that exist, and leaves the bf16 packed copies the step
 * refreshes current.
 */
#include "train/sparsity.h"

#include <stdlib.h>
#include <string.h>

#define MARK_FILE "sparsity.json"

static const char *const method_names[] = {"magnitude", "wanda", "2:4", "mlp"};

int kiln_prune_method_parse(const char *name)
{
    for (int i = 0; i < (int)(sizeof method_names / sizeof *method_names); i++)
        if (name && !strcmp(name, method_names[i])) return i;
    return -1;
}

const char *kiln_prune_method_name(kiln_prune_method m)
{
    return (unsigned)m < sizeof method_names / sizeof *method_names ? method_names[m] : "?";
}

/* The four pruned matrices of layer l: offsets and sizes in floats. */
static void layer_ranges(const kiln_model *m, int l, size_t off[4], size_t len[4])
{
    const model_layer *y = &m->w.layers[l];
    int FH = m->cfg.arch == KILN_ARCH_GPT2 ? m->F : 2 * m->F;
    const float *p[4] = {y->qkv_w, y->proj_w, y->fc_w, y->fcproj_w};
    size_t n[4] = {(size_t)m->QKV * m->C, (size_t)m->C * m->NH * m->HS, (size_t)FH * m->C,
                   (size_t)m->C * m->F};
    for (int k = 0; k < 4; k++) {
        off[k] = (size_t)(p[k] - m->params);
        len[k] = n[k];
    }
}

bool kiln_prune_target(const kiln_model *m, int i)
{
    const kiln_tensor_info *t = kiln_model_tensor(m, i);
    if (!t) return false;
    for (int l = 0; l < m->L; l++) {
        size_t off[4], len[4];
        layer_ranges(m, l, off, len);
        for (int k = 0; k < 4; k++)
            if (t->offset >= off[k] && t->offset + t->numel <= off[k] + len[k]) return true;
    }
    return false;
}

kiln_status sparse_mask_build(kiln_ctx *ctx, const kiln_model *m, uint64_t **out, size_t *zeros)
{
    size_t words = (m->num_params + 63) / 64;
    uint64_t *b = calloc(words ? words : 1, sizeof *b);
    if (!b) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory (sparsity mask)");
    size_t z = 0;
    for (int l = 0; l < m->L; l++) {
        size_t off[4], len[4];
        layer_ranges(m, l, off, len);
        for (int k = 0; k < 4; k++)
            for (size_t i = off[k]; i < off[k] + len[k]; i++)
                if (m->params[i] == 0.0f) {
                    b[i / 64] |= (uint64_t)1 << (i % 64);
                    z++;
                }
    }
    *out = b;
    *zeros = z;
    return KILN_OK;
}

void sparse_mask_apply(const kiln_model *m, const uint64_t *mask, float *g)
{
    size_t words = (m->num_params + 63) / 64;
#pragma omp parallel for schedule(static)
    for (size_t w = 0; w < words; w++) {
        uint64_t b = mask[w];
        while (b) {
            int k = __builtin_ctzll(b);
            g[w * 64 + (size_t)k] = 0.0f;
            b &= b - 1;
        }
    }
}

kiln_status kiln_prune_mark_save(kiln_ctx *ctx, const char *dir, const kiln_prune_opts *o)
{
    char *p = file_join(dir, MARK_FILE);
    json_t *j = json_pack("{s:s,s:i,s:s,s:f,s:s}", "format", "kiln-sparsity", "version", 1,
                          "method", kiln_prune_method_name(o->method), "sparsity", o->sparsity,
                          "rule", "weights of the pruned matrices that are zero stay zero");
    kiln_status s = !p || !j ? kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory")
                             : js_save_file(ctx, p, j);
    json_decref(j);
    free(p);
    return s;
}

kiln_status kiln_prune_mark_load(kiln_ctx *ctx, const char *dir, bool *marked)
{
    *marked = false;
    char *p = file_join(dir, MARK_FILE);
    if (!p) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!file_exists(p)) {
        free(p);
        return KILN_OK;
    }
    json_t *j = NULL;
    kiln_status s = js_load_file(ctx, p, &j);
    if (!s) {
        const char *f = json_string_value(json_object_get(j, "format"));
        json_int_t v = json_integer_value(json_object_get(j, "version"));
        if (!f || strcmp(f, "kiln-sparsity") || v != 1)
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "'%s' is not a kiln sparsity mark (format \"kiln-sparsity\", "
                          "version 1); remove it or write it again with kiln prune",
                          p);
        else *marked = true;
    }
    json_decref(j);
    free(p);
    return s;
}
