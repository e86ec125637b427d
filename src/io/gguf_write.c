/*
 * gguf_write.c — writing GGUF files (contract and layout in gguf.h): the
 * metadata serialised as it is added, then the header, the tensor infos
 * with their offsets, and each tensor's bytes (from a callback) padded to
 * the alignment, through an atomic file_writer.
 */
#include "io/gguf.h"

#include <stdlib.h>
#include <string.h>

/* ---- writing ------------------------------------------------------------ */

void gguf_writer_init(gguf_writer *w)
{
    memset(w, 0, sizeof *w);
    w->alignment = GGUF_DEFAULT_ALIGNMENT;
}

void gguf_writer_free(gguf_writer *w)
{
    if (!w) return;
    free(w->kv);
    for (int i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->t);
    memset(w, 0, sizeof *w);
}

static void put(gguf_writer *w, const void *p, size_t n)
{
    if (w->oom) return;
    if (w->kv_len + n > w->kv_cap) {
        size_t cap = w->kv_cap ? w->kv_cap : 4096;
        while (cap < w->kv_len + n) cap *= 2;
        unsigned char *b = realloc(w->kv, cap);
        if (!b) {
            w->oom = true;
            return;
        }
        w->kv = b;
        w->kv_cap = cap;
    }
    memcpy(w->kv + w->kv_len, p, n);
    w->kv_len += n;
}

static void put_u32(gguf_writer *w, uint32_t v)
{
    unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 24)};
    put(w, b, 4);
}

static void put_u64(gguf_writer *w, uint64_t v)
{
    unsigned char b[8];
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
    put(w, b, 8);
}

static void put_str(gguf_writer *w, const char *s, size_t n)
{
    put_u64(w, n);
    put(w, s, n);
}

static void key(gguf_writer *w, const char *k, uint32_t type)
{
    put_str(w, k, strlen(k));
    put_u32(w, type);
    w->n_kv++;
}

void gguf_w_u32(gguf_writer *w, const char *k, uint32_t v)
{
    key(w, k, GGUF_TYPE_UINT32);
    put_u32(w, v);
}

void gguf_w_i32(gguf_writer *w, const char *k, int32_t v)
{
    key(w, k, GGUF_TYPE_INT32);
    put_u32(w, (uint32_t)v);
}

void gguf_w_u64(gguf_writer *w, const char *k, uint64_t v)
{
    key(w, k, GGUF_TYPE_UINT64);
    put_u64(w, v);
}

void gguf_w_f32(gguf_writer *w, const char *k, float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    key(w, k, GGUF_TYPE_FLOAT32);
    put_u32(w, u);
}

void gguf_w_f64(gguf_writer *w, const char *k, double v)
{
    uint64_t u;
    memcpy(&u, &v, 8);
    key(w, k, GGUF_TYPE_FLOAT64);
    put_u64(w, u);
}

void gguf_w_bool(gguf_writer *w, const char *k, bool v)
{
    unsigned char b = v ? 1 : 0;
    key(w, k, GGUF_TYPE_BOOL);
    put(w, &b, 1);
}

void gguf_w_strn(gguf_writer *w, const char *k, const char *s, size_t len)
{
    key(w, k, GGUF_TYPE_STRING);
    put_str(w, s, len);
}

void gguf_w_str(gguf_writer *w, const char *k, const char *s)
{
    gguf_w_strn(w, k, s, strlen(s));
}

void gguf_w_scalar(gguf_writer *w, const char *k, uint32_t type, const void *v)
{
    KILN_ASSERT(type < GGUF_TYPE_COUNT && gguf_type_size(type));
    key(w, k, type);
    put(w, v, gguf_type_size(type)); /* little-endian machine: memory order is file order */
}

void gguf_w_arr(gguf_writer *w, const char *k, uint32_t elem_type, const void *data,
                uint64_t n)
{
    KILN_ASSERT(elem_type < GGUF_TYPE_COUNT && gguf_type_size(elem_type));
    key(w, k, GGUF_TYPE_ARRAY);
    put_u32(w, elem_type);
    put_u64(w, n);
    put(w, data, (size_t)n * gguf_type_size(elem_type));
}

void gguf_w_arr_str(gguf_writer *w, const char *k, const char *const *s, const size_t *lens,
                    uint64_t n)
{
    key(w, k, GGUF_TYPE_ARRAY);
    put_u32(w, GGUF_TYPE_STRING);
    put_u64(w, n);
    for (uint64_t i = 0; i < n; i++) put_str(w, s[i], lens ? lens[i] : strlen(s[i]));
}

kiln_status gguf_w_tensor(kiln_ctx *ctx, gguf_writer *w, const char *name, kiln_dtype type,
                          int ndim, const int64_t *ne)
{
    size_t nl = strlen(name);
    if (nl == 0 || nl >= GGUF_MAX_NAME)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "GGUF tensor \"%s\": name must have 1 to %d bytes", name,
                         GGUF_MAX_NAME - 1);
    const dtype_traits *tr = dtype_traits_of(type);
    if (!tr || (int)type >= 1000)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "GGUF tensor \"%s\": type %d is not a GGUF type", name, (int)type);
    if (ndim < 1 || ndim > GGUF_MAX_DIMS)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "GGUF tensor \"%s\": %d dimensions",
                         name, ndim);
    size_t row = dtype_row_bytes(type, ne[0]);
    if (row == (size_t)-1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "GGUF tensor \"%s\": row length %lld is not a multiple of %s's "
                         "block of %lld", name, (long long)ne[0], tr->name,
                         (long long)tr->block);
    size_t bytes = row;
    for (int d = 1; d < ndim; d++) bytes *= (size_t)ne[d];
    if (w->n_t == w->cap_t) {
        int cap = w->cap_t ? 2 * w->cap_t : 64;
        gguf_wtensor *t = realloc(w->t, (size_t)cap * sizeof *t);
        if (!t) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        w->t = t;
        w->cap_t = cap;
    }
    gguf_wtensor *t = &w->t[w->n_t];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    if (!t->name) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    t->type = type;
    t->ndim = ndim;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = d < ndim ? ne[d] : 1;
    t->bytes = bytes;
    w->n_t++;
    return KILN_OK;
}

static size_t pad_to(size_t x, size_t a) { return (x + a - 1) / a * a; }

kiln_status gguf_write(kiln_ctx *ctx, gguf_writer *w, const char *path, gguf_fill_fn fill,
                       void *ud)
{
    if (w->oom) return kiln_fail(ctx, KILN_ERR_NOMEM, "%s: out of memory building the "
                                 "GGUF metadata", path);
    /* the tensor infos go into a second buffer (same serialiser) */
    gguf_writer ti;
    gguf_writer_init(&ti);
    uint64_t off = 0;
    size_t max_bytes = 0;
    for (int i = 0; i < w->n_t; i++) {
        gguf_wtensor *t = &w->t[i];
        t->offset = off;
        put_str(&ti, t->name, strlen(t->name));
        put_u32(&ti, (uint32_t)t->ndim);
        for (int d = 0; d < t->ndim; d++) put_u64(&ti, (uint64_t)t->ne[d]);
        put_u32(&ti, (uint32_t)t->type);
        put_u64(&ti, off);
        off += pad_to(t->bytes, w->alignment);
        if (t->bytes > max_bytes) max_bytes = t->bytes;
    }
    unsigned char *buf = malloc(max_bytes ? max_bytes : 1);
    if (ti.oom || !buf) {
        gguf_writer_free(&ti);
        free(buf);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "%s: out of memory", path);
    }
    gguf_writer hd;
    gguf_writer_init(&hd);
    put(&hd, GGUF_MAGIC, 4);
    put_u32(&hd, GGUF_VERSION);
    put_u64(&hd, (uint64_t)w->n_t);
    put_u64(&hd, w->n_kv);
    file_writer fw;
    kiln_status s = hd.oom ? kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory")
                           : file_writer_open(ctx, &fw, path);
    if (!s) {
        static const unsigned char zeros[64] = {0};
        file_writer_write(&fw, hd.kv, hd.kv_len);
        file_writer_write(&fw, w->kv, w->kv_len);
        file_writer_write(&fw, ti.kv, ti.kv_len);
        size_t pos = hd.kv_len + w->kv_len + ti.kv_len;
        for (size_t p = pad_to(pos, w->alignment) - pos; p;) {
            size_t k = p < sizeof zeros ? p : sizeof zeros;
            file_writer_write(&fw, zeros, k);
            p -= k;
        }
        for (int i = 0; i < w->n_t && !s; i++) {
            const gguf_wtensor *t = &w->t[i];
            s = fill(ctx, ud, i, buf, t->bytes);
            if (s) break;
            file_writer_write(&fw, buf, t->bytes);
            for (size_t p = pad_to(t->bytes, w->alignment) - t->bytes; p;) {
                size_t k = p < sizeof zeros ? p : sizeof zeros;
                file_writer_write(&fw, zeros, k);
                p -= k;
            }
        }
        if (s) file_writer_abort(&fw);
        else s = file_writer_commit(ctx, &fw);
    }
    gguf_writer_free(&hd);
    gguf_writer_free(&ti);
    free(buf);
    return s;
}

