/*
 * adamw_io.c — the AdamW state file, optimizer.safetensors: the moments
 * of the trainable parameters ("exp_avg", "exp_avg_sq", F32, back to back
 * in block order), metadata "step" and, for an optimizer made for a model,
 * "tensors" (the trainable tensors' names), which a load checks against
 * the optimizer's own so that moments never land on another tensor.
 */
#include "train/adamw.h"

#include "base/base.h"

#include <stdlib.h>
#include <string.h>

/* ---- optimizer.safetensors ------------------------------------------ */

kiln_status kiln_adamw_save(kiln_ctx *ctx, const kiln_adamw *o,
                            const char *path)
{
    size_t bytes = kiln_adamw_state_size(o) * sizeof(float);
    char *const *names;
    const bool *trainable;
    int nnames = adamw_tensors(o, &names, &trainable);
    /* the trainable tensors' names, comma-separated (metadata "tensors") */
    size_t cap = 512;
    for (int i = 0; i < nnames; i++) cap += strlen(names[i]) + 1;
    char *hdr = malloc(cap);
    if (!hdr) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    int len = snprintf(hdr, cap, "{\"__metadata__\":{\"format\":\"kiln-adamw\",\"step\":\"%lld\"",
                       (long long)kiln_adamw_t(o));
    if (nnames) {
        len += snprintf(hdr + len, cap - (size_t)len, ",\"tensors\":\"");
        bool first = true;
        for (int i = 0; i < nnames; i++)
            if (trainable[i]) {
                len += snprintf(hdr + len, cap - (size_t)len, "%s%s", first ? "" : ",",
                                names[i]);
                first = false;
            }
        len += snprintf(hdr + len, cap - (size_t)len, "\"");
    }
    len += snprintf(hdr + len, cap - (size_t)len,
                    "},\"exp_avg\":{\"dtype\":\"F32\",\"shape\":[%zu],"
                    "\"data_offsets\":[0,%zu]},\"exp_avg_sq\":{\"dtype\":"
                    "\"F32\",\"shape\":[%zu],\"data_offsets\":[%zu,%zu]}}",
                    kiln_adamw_state_size(o), bytes, kiln_adamw_state_size(o), bytes, 2 * bytes);
    while (len % 8) hdr[len++] = ' ';
    unsigned char lenb[8];
    for (int i = 0; i < 8; i++) lenb[i] = (unsigned char)((uint64_t)len >> (8 * i));
    file_writer w;
    kiln_status s = file_writer_open(ctx, &w, path);
    if (s) {
        free(hdr);
        return s;
    }
    file_writer_write(&w, lenb, 8);
    file_writer_write(&w, hdr, (size_t)len);
    file_writer_write(&w, adamw_moment(o, false), bytes);
    file_writer_write(&w, adamw_moment(o, true), bytes);
    free(hdr);
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
                         "'%s': \"%s\" has %lld values but the optimizer has %zu "
                         "trainable parameters (checkpoint of another model, or other "
                         "tensors frozen?)",
                         path, name, (long long)len, n);
    if (a < 0 || b < a || (size_t)(b - a) != n * sizeof(float) ||
        (size_t)b > data_size)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "'%s': \"%s\" has data offsets outside the file",
                         path, name);
    *off = (size_t)a;
    return KILN_OK;
}

/* Whether the comma-separated list has name. */
static bool list_has(const char *list, const char *name)
{
    size_t len = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l == len && !memcmp(p, name, len)) return true;
        if (!e) break;
        p = e + 1;
    }
    return false;
}

/* The file's trainable tensors (list, from its metadata; NULL when it has
 * none) against o's: the first tensor trainable on one side only. */
static kiln_status check_tensors(kiln_ctx *ctx, const kiln_adamw *o, const char *list,
                                 const char *path)
{
    static const char *what = "resume with the same frozen tensors (kiln_train_opts.freeze)";
    char *const *names;
    const bool *trainable;
    int nnames = adamw_tensors(o, &names, &trainable);
    if (!nnames) return KILN_OK;
    if (!list) { /* a file from before the list: every tensor had state */
        for (int i = 0; i < nnames; i++)
            if (!trainable[i])
                return kiln_fail(ctx, KILN_ERR_FORMAT,
                                 "'%s': the optimizer state has moments for every tensor, but "
                                 "tensor \"%s\" is frozen in this run; %s",
                                 path, names[i], what);
        return KILN_OK;
    }
    for (int i = 0; i < nnames; i++) {
        bool in = list_has(list, names[i]);
        if (trainable[i] && !in)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "'%s': tensor \"%s\" is trainable in this run but the optimizer "
                             "state has no moments for it (it was frozen when the checkpoint "
                             "was written); %s", path, names[i], what);
        if (!trainable[i] && in)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "'%s': the optimizer state has moments for tensor \"%s\", which "
                             "is frozen in this run; %s", path, names[i], what);
    }
    for (const char *p = list; *p;) { /* a name the model does not have */
        const char *e = strchr(p, ',');
        int l = (int)(e ? (size_t)(e - p) : strlen(p));
        bool known = false;
        for (int i = 0; i < nnames && !known; i++)
            known = (int)strlen(names[i]) == l && !memcmp(names[i], p, (size_t)l);
        if (!known)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "'%s': the optimizer state has moments for tensor \"%.*s\", which "
                             "the model does not have (checkpoint of another model?)",
                             path, l, p);
        if (!e) break;
        p = e + 1;
    }
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
    if (fm.size < 8 || hl > fm.size - 8 || hl > (16u << 20)) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "'%s' is not a safetensors file (bad header length)", path);
        goto done;
    }
    if ((s = js_load_buf(ctx, (const char *)fm.data + 8, (size_t)hl, path, &h)))
        goto done;
    json_t *meta = json_object_get(h, "__metadata__");
    const char *fmt = json_string_value(json_object_get(meta, "format"));
    const char *st = json_string_value(json_object_get(meta, "step"));
    if (!fmt || strcmp(fmt, "kiln-adamw") || !st) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "'%s' is not a kiln AdamW state (metadata format)", path);
        goto done;
    }
    if ((s = check_tensors(ctx, o, json_string_value(json_object_get(meta, "tensors")), path)))
        goto done;
    size_t data = (size_t)(8 + hl), moff = 0, voff = 0;
    if ((s = tensor_range(ctx, h, "exp_avg", path, kiln_adamw_state_size(o), fm.size - data, &moff)) ||
        (s = tensor_range(ctx, h, "exp_avg_sq", path, kiln_adamw_state_size(o), fm.size - data, &voff)))
        goto done;
    memcpy(kiln_adamw_m(o), fm.data + data + moff, kiln_adamw_state_size(o) * sizeof(float));
    memcpy(kiln_adamw_v(o), fm.data + data + voff, kiln_adamw_state_size(o) * sizeof(float));
    kiln_adamw_set_t(o, strtoll(st, NULL, 10));
done:
    json_decref(h);
    file_map_close(&fm);
    return s;
}
