/*
 * safetensors.c — validated reading (mmap) and atomic writing of
 * safetensors files. See safetensors.h for the rules enforced.
 */
#include "io/safetensors.h"

#include <stdlib.h>
#include <string.h>

static int cmp_begin(const void *a, const void *b)
{
    const st_tensor *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static void free_tensors(st_file *f)
{
    for (int i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    f->tensors = NULL;
    f->n_tensors = 0;
    if (f->metadata) json_decref(f->metadata);
    f->metadata = NULL;
}

static kiln_status parse_entry(kiln_ctx *ctx, const char *what,
                               const char *key, json_t *v, size_t data_size,
                               st_tensor *t)
{
    if (!json_is_object(v))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": header entry is not an object", what, key);
    json_t *dt = json_object_get(v, "dtype"), *sh = json_object_get(v, "shape"),
           *off = json_object_get(v, "data_offsets");
    if (!json_is_string(dt) || !json_is_array(sh) || !json_is_array(off))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": needs \"dtype\" (string), \"shape\" "
                         "(array) and \"data_offsets\" (array)", what, key);
    int d = dtype_from_st_name(json_string_value(dt));
    if (d < 0)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": unknown dtype \"%s\"", what, key,
                         json_string_value(dt));
    t->dtype = (kiln_dtype)d;
    size_t nd = json_array_size(sh);
    if (nd > ST_MAX_DIMS)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": %zu dimensions (at most %d supported)",
                         what, key, nd, ST_MAX_DIMS);
    t->ndim = (int)nd;
    size_t numel = 1;
    for (size_t i = 0; i < nd; i++) {
        json_t *x = json_array_get(sh, i);
        if (!json_is_integer(x) || json_integer_value(x) < 0)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: tensor \"%s\": shape[%zu] is not a non-negative integer",
                             what, key, i);
        uint64_t dim = (uint64_t)json_integer_value(x);
        t->shape[i] = (int64_t)dim;
        if (dim && numel > (SIZE_MAX / 16) / dim)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: tensor \"%s\": shape is too large", what, key);
        numel *= dim;
    }
    t->numel = numel;
    if (json_array_size(off) != 2 || !json_is_integer(json_array_get(off, 0)) ||
        !json_is_integer(json_array_get(off, 1)))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": data_offsets must be [begin, end]", what, key);
    json_int_t b = json_integer_value(json_array_get(off, 0));
    json_int_t e = json_integer_value(json_array_get(off, 1));
    if (b < 0 || e < b || (uint64_t)e > data_size)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": data_offsets [%lld, %lld] lie outside the "
                         "%zu-byte data buffer (file truncated or header corrupt)",
                         what, key, (long long)b, (long long)e, data_size);
    t->begin = (size_t)b;
    t->end = (size_t)e;
    size_t need = numel * dtype_traits_of(t->dtype)->block_bytes; /* block 1 */
    if (t->end - t->begin != need)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": %zu bytes in data_offsets but shape x "
                         "dtype needs %zu", what, key, t->end - t->begin, need);
    return KILN_OK;
}

kiln_status st_parse(kiln_ctx *ctx, const unsigned char *buf, size_t len,
                     const char *what, st_file *f)
{
    memset(f, 0, sizeof *f);
    if (len < 8)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: %zu bytes is too short for a safetensors file", what, len);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | buf[i];
    if (hl > ST_MAX_HEADER || hl > len - 8)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: header length %llu exceeds the file (%zu bytes) or the "
                         "100 MB limit: not a safetensors file, or truncated",
                         what, (unsigned long long)hl, len);
    if (hl < 2 || buf[8] != '{')
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: header does not start with a JSON object", what);
    json_t *h;
    kiln_status s = js_load_buf(ctx, (const char *)buf + 8, (size_t)hl, what, &h);
    if (s) return s;
    if (!json_is_object(h)) {
        json_decref(h);
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: header is not a JSON object", what);
    }
    f->data = buf + 8 + hl;
    f->data_size = len - 8 - (size_t)hl;
    size_t n = json_object_size(h);
    f->tensors = calloc(n ? n : 1, sizeof(st_tensor));
    if (!f->tensors) {
        json_decref(h);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    const char *key;
    json_t *v;
    json_object_foreach(h, key, v)
    {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(v)) {
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: \"__metadata__\" must be an object of strings", what);
                break;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(v, mk, mv)
            {
                if (!json_is_string(mv)) {
                    s = kiln_fail(ctx, KILN_ERR_FORMAT,
                                  "%s: \"__metadata__\".\"%s\" must be a string", what, mk);
                    break;
                }
            }
            if (s) break;
            f->metadata = json_incref(v);
            continue;
        }
        st_tensor *t = &f->tensors[f->n_tensors];
        s = parse_entry(ctx, what, key, v, f->data_size, t);
        if (s) break;
        t->name = strdup(key);
        if (!t->name) {
            s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            break;
        }
        f->n_tensors++;
    }
    json_decref(h);
    if (!s) {
        qsort(f->tensors, (size_t)f->n_tensors, sizeof(st_tensor), cmp_begin);
        size_t pos = 0;
        for (int i = 0; i < f->n_tensors && !s; i++) {
            const st_tensor *t = &f->tensors[i];
            if (t->begin < pos)
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: tensor \"%s\" overlaps tensor \"%s\" (data_offsets)",
                              what, t->name, f->tensors[i - 1].name);
            else if (t->begin > pos)
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: %zu unindexed bytes before tensor \"%s\" (data_offsets "
                              "must tile the data buffer)", what, t->begin - pos, t->name);
            pos = t->end;
        }
        if (!s && pos != f->data_size)
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: the data buffer has %zu bytes but the tensors cover %zu "
                          "(trailing garbage or truncated header)", what, f->data_size, pos);
    }
    if (s) {
        free_tensors(f);
        memset(f, 0, sizeof *f);
    }
    return s;
}

kiln_status st_open(kiln_ctx *ctx, const char *path, st_file *f)
{
    file_map m;
    memset(f, 0, sizeof *f);
    kiln_status s = file_map_open(ctx, path, &m);
    if (s) return s;
    s = st_parse(ctx, m.data, m.size, path, f);
    if (s) {
        file_map_close(&m);
        return s;
    }
    f->map = m;
    return KILN_OK;
}

void st_close(st_file *f)
{
    if (!f) return;
    free_tensors(f);
    file_map_close(&f->map);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    for (int i = 0; i < f->n_tensors; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

kiln_status st_read_f32(kiln_ctx *ctx, const st_file *f, const st_tensor *t,
                        const char *what, float *dst)
{
    const unsigned char *p = f->data + t->begin;
    size_t n = t->numel;
    switch (t->dtype) {
    case KILN_DTYPE_F32: memcpy(dst, p, n * 4); break;
    case KILN_DTYPE_BF16:
    case KILN_DTYPE_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
            dst[i] = t->dtype == KILN_DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
        }
        break;
    case KILN_DTYPE_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            dst[i] = (float)d;
        }
        break;
    default:
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\" has dtype %s; expected a float type "
                         "(F32, BF16, F16 or F64)", what, t->name,
                         dtype_traits_of(t->dtype)->st_name);
    }
    return KILN_OK;
}

kiln_status st_save(kiln_ctx *ctx, const char *path, const st_entry *e,
                    int n, const char *const *meta_kv, int n_meta)
{
    json_t *h = json_object(), *meta = json_object();
    if (!h || !meta) {
        json_decref(h);
        json_decref(meta);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    json_object_set_new(meta, "format", json_string("pt"));
    for (int i = 0; i < n_meta; i++)
        json_object_set_new(meta, meta_kv[2 * i], json_string(meta_kv[2 * i + 1]));
    json_object_set_new(h, "__metadata__", meta);
    size_t pos = 0;
    for (int i = 0; i < n; i++) {
        const dtype_traits *tr = dtype_traits_of(e[i].dtype);
        if (!tr || !tr->st_name || tr->block != 1) {
            json_decref(h);
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "%s: tensor \"%s\": dtype %s has no safetensors spelling "
                             "(safetensors stores plain types: F32, BF16, F16, I32, ...)",
                             path, e[i].name, kiln_dtype_name(e[i].dtype));
        }
        size_t numel = 1;
        json_t *sh = json_array();
        for (int d = 0; d < e[i].ndim; d++) {
            numel *= (size_t)e[i].shape[d];
            json_array_append_new(sh, json_integer(e[i].shape[d]));
        }
        size_t bytes = numel * tr->block_bytes;
        json_t *ent = json_object();
        json_object_set_new(ent, "dtype", json_string(tr->st_name));
        json_object_set_new(ent, "shape", sh);
        json_object_set_new(ent, "data_offsets",
                            json_pack("[II]", (json_int_t)pos, (json_int_t)(pos + bytes)));
        json_object_set_new(h, e[i].name, ent);
        pos += bytes;
    }
    char *js = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(h);
    if (!js) return kiln_fail(ctx, KILN_ERR_NOMEM, "cannot serialise the safetensors header");
    size_t jl = strlen(js);
    size_t padded = (jl + 7) & ~(size_t)7; /* data starts 8-byte aligned */
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    file_writer w;
    kiln_status s = file_writer_open(ctx, &w, path);
    if (s) {
        free(js);
        return s;
    }
    file_writer_write(&w, len8, 8);
    file_writer_write(&w, js, jl);
    file_writer_write(&w, "        ", padded - jl);
    free(js);
    for (int i = 0; i < n; i++) {
        size_t numel = 1;
        for (int d = 0; d < e[i].ndim; d++) numel *= (size_t)e[i].shape[d];
        file_writer_write(&w, e[i].data, numel * dtype_traits_of(e[i].dtype)->block_bytes);
    }
    return file_writer_commit(ctx, &w);
}
