/*
 * gguf.c — validated reading (mmap) of GGUF files, and the public
 * kiln_gguf_* API over it. See gguf.h for the rules the reader enforces;
 * the writer is gguf_write.c.
 */
#include "io/gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const type_names[GGUF_TYPE_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
    "bool", "string", "array", "uint64", "int64", "float64",
};
/* Bytes of a scalar of each type; 0 for string and array. */
static const size_t type_size[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

const char *gguf_type_name(uint32_t t)
{
    return t < GGUF_TYPE_COUNT ? type_names[t] : "?";
}

size_t gguf_type_size(uint32_t t) { return t < GGUF_TYPE_COUNT ? type_size[t] : 0; }

/* ---- reading ------------------------------------------------------------ */

typedef struct cursor {
    const unsigned char *p, *end;
} cursor;

static size_t left(const cursor *c) { return (size_t)(c->end - c->p); }

static bool rd_u32(cursor *c, uint32_t *v)
{
    if (left(c) < 4) return false;
    *v = (uint32_t)c->p[0] | (uint32_t)c->p[1] << 8 | (uint32_t)c->p[2] << 16 |
         (uint32_t)c->p[3] << 24;
    c->p += 4;
    return true;
}

static bool rd_u64(cursor *c, uint64_t *v)
{
    if (left(c) < 8) return false;
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--) x = x << 8 | c->p[i];
    *v = x;
    c->p += 8;
    return true;
}

static uint64_t ld_u64(const unsigned char *p)
{
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--) x = x << 8 | p[i];
    return x;
}

/* A GGUF string: u64 length, then bytes. Returns false when it does not
 * fit in what is left. */
static bool rd_str(cursor *c, const char **s, size_t *n)
{
    uint64_t len;
    if (!rd_u64(c, &len) || len > left(c)) return false;
    *s = (const char *)c->p;
    *n = (size_t)len;
    c->p += len;
    return true;
}

/* A NUL-terminated copy of a name; NULL (and *bad set) when it holds a NUL
 * byte. */
static char *dup_name(const char *s, size_t n, bool *bad)
{
    *bad = memchr(s, 0, n) != NULL;
    if (*bad) return NULL;
    char *d = malloc(n + 1);
    if (!d) return NULL;
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

/* Skips one value of type t (a scalar, a string, or an array's element
 * when in_array); sets *size to its bytes. */
static bool skip_value(cursor *c, uint32_t t, size_t *size)
{
    const unsigned char *start = c->p;
    if (t == GGUF_TYPE_STRING) {
        const char *s;
        size_t n;
        if (!rd_str(c, &s, &n)) return false;
    } else {
        if (t >= GGUF_TYPE_COUNT || !type_size[t] || left(c) < type_size[t]) return false;
        c->p += type_size[t];
    }
    *size = (size_t)(c->p - start);
    return true;
}

static kiln_status parse_kv(kiln_ctx *ctx, cursor *c, const char *what, int64_t i,
                            gguf_kv *kv)
{
    const char *ks;
    size_t kn;
    if (!rd_str(c, &ks, &kn))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: key %lld of the metadata: its name's length runs past the "
                         "end of the file (truncated or corrupt)", what, (long long)i);
    bool bad;
    kv->key = dup_name(ks, kn, &bad);
    if (bad || kn == 0)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: key %lld of the metadata has %s name",
                         what, (long long)i, kn ? "a NUL byte in its" : "an empty");
    if (!kv->key) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!rd_u32(c, &kv->type))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: key \"%s\": truncated before its type",
                         what, kv->key);
    if (kv->type >= GGUF_TYPE_COUNT)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: key \"%s\" has unknown value type %u",
                         what, kv->key, kv->type);
    if (kv->type != GGUF_TYPE_ARRAY) {
        kv->n = 1;
        kv->val = c->p;
        if (!skip_value(c, kv->type, &kv->val_size))
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: key \"%s\": its %s value runs past the end of the file "
                             "(truncated or corrupt)", what, kv->key, type_names[kv->type]);
        return KILN_OK;
    }
    uint64_t n;
    if (!rd_u32(c, &kv->arr_type) || !rd_u64(c, &n))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: key \"%s\": truncated array header", what, kv->key);
    if (kv->arr_type >= GGUF_TYPE_COUNT || kv->arr_type == GGUF_TYPE_ARRAY)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: key \"%s\": array element type %u is not supported%s", what,
                         kv->key, kv->arr_type,
                         kv->arr_type == GGUF_TYPE_ARRAY ? " (nested arrays)" : "");
    /* every element takes at least one byte (a string at least 8) */
    size_t min = kv->arr_type == GGUF_TYPE_STRING ? 8 : type_size[kv->arr_type];
    if (n > left(c) / min)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: key \"%s\": array of %llu %s elements does not fit in the %zu "
                         "bytes left (truncated or corrupt)", what, kv->key,
                         (unsigned long long)n, type_names[kv->arr_type], left(c));
    kv->n = n;
    kv->val = c->p;
    if (kv->arr_type != GGUF_TYPE_STRING) {
        c->p += n * min;
    } else {
        for (uint64_t j = 0; j < n; j++) {
            size_t sz;
            if (!skip_value(c, GGUF_TYPE_STRING, &sz))
                return kiln_fail(ctx, KILN_ERR_FORMAT,
                                 "%s: key \"%s\": string %llu of the array runs past the end "
                                 "of the file (truncated or corrupt)", what, kv->key,
                                 (unsigned long long)j);
        }
    }
    kv->val_size = (size_t)(c->p - kv->val);
    return KILN_OK;
}

static kiln_status parse_tensor_info(kiln_ctx *ctx, cursor *c, const char *what,
                                     int64_t i, gguf_tensor *t)
{
    const char *ns;
    size_t nn;
    if (!rd_str(c, &ns, &nn))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor info %lld: its name runs past the end of the file "
                         "(truncated or corrupt)", what, (long long)i);
    bool bad;
    t->name = dup_name(ns, nn, &bad);
    if (bad || nn == 0 || nn >= GGUF_MAX_NAME)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor info %lld: name of %zu bytes%s (1 to %d bytes, no NUL)",
                         what, (long long)i, nn, bad ? " with a NUL byte" : "",
                         GGUF_MAX_NAME - 1);
    if (!t->name) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    uint32_t nd, type;
    if (!rd_u32(c, &nd))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tensor \"%s\": truncated info", what,
                         t->name);
    if (nd < 1 || nd > GGUF_MAX_DIMS)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": %u dimensions (1 to %d supported)", what,
                         t->name, nd, GGUF_MAX_DIMS);
    t->ndim = (int)nd;
    uint64_t numel = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t v;
        if (!rd_u64(c, &v))
            return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tensor \"%s\": truncated shape", what,
                             t->name);
        if (v > (uint64_t)INT64_MAX || (v && numel > (uint64_t)INT64_MAX / v))
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: tensor \"%s\": shape dimension %d = %llu overflows the "
                             "element count", what, t->name, d, (unsigned long long)v);
        t->ne[d] = (int64_t)v;
        numel *= v;
    }
    if (!rd_u32(c, &type) || !rd_u64(c, &t->offset))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tensor \"%s\": truncated info", what,
                         t->name);
    const dtype_traits *tr = dtype_traits_of((kiln_dtype)type);
    if (!tr || type >= 1000)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\" has ggml type %u, which kiln does not know "
                         "(known: f32, f16, bf16, q4_0, q8_0, q4_K, q6_K, ...)", what,
                         t->name, type);
    t->type = (kiln_dtype)type;
    if (t->ne[0] % tr->block)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: tensor \"%s\": row length %lld is not a multiple of %s's "
                         "block of %lld", what, t->name, (long long)t->ne[0], tr->name,
                         (long long)tr->block);
    size_t row = dtype_row_bytes(t->type, t->ne[0]);
    uint64_t rows = t->ne[0] ? numel / (uint64_t)t->ne[0] : 0;
    if (row == (size_t)-1 || (row && rows > (SIZE_MAX / 2) / row))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tensor \"%s\": size overflows", what,
                         t->name);
    t->bytes = t->ne[0] ? row * (size_t)rows : 0;
    return KILN_OK;
}

static int cmp_off(const void *a, const void *b)
{
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sorted copy of the names to find duplicates; returns the duplicate or
 * NULL. *oom when the scratch array cannot be had. */
static const char *find_dup(char **names, int64_t n, bool *oom)
{
    *oom = false;
    if (n < 2) return NULL;
    char **s = malloc((size_t)n * sizeof *s);
    if (!s) {
        *oom = true;
        return NULL;
    }
    memcpy(s, names, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_str);
    const char *dup = NULL;
    for (int64_t i = 1; i < n && !dup; i++)
        if (!strcmp(s[i - 1], s[i])) dup = s[i];
    free(s);
    return dup;
}

static void free_file(gguf_file *f)
{
    for (int64_t i = 0; i < f->n_kv; i++) free(f->kv[i].key);
    for (int64_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->kv);
    free(f->tensors);
    f->kv = NULL;
    f->tensors = NULL;
    f->n_kv = f->n_tensors = 0;
}

static kiln_status check_layout(kiln_ctx *ctx, gguf_file *f, const char *what,
                                size_t header_end, size_t len)
{
    const gguf_kv *al = gguf_find(f, "general.alignment");
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    if (al) {
        if (al->type != GGUF_TYPE_UINT32)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: key \"general.alignment\" is a %s; expected uint32", what,
                             type_names[al->type]);
        uint32_t a = (uint32_t)al->val[0] | (uint32_t)al->val[1] << 8 |
                     (uint32_t)al->val[2] << 16 | (uint32_t)al->val[3] << 24;
        if (a == 0 || (a & (a - 1)) || a > (1u << 20))
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: key \"general.alignment\" = %u is not a power of two "
                             "from 1 to 2^20", what, a);
        f->alignment = a;
    }
    size_t start = (header_end + f->alignment - 1) / f->alignment * f->alignment;
    if (f->n_tensors == 0) {
        f->data = NULL;
        f->data_size = 0;
        return KILN_OK;
    }
    if (start > len)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: the file ends (%zu bytes) before its data section (at %zu): "
                         "truncated", what, len, start);
    f->data_size = len - start;
    gguf_tensor **order = malloc((size_t)f->n_tensors * sizeof *order);
    if (!order) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < f->n_tensors; i++) order[i] = &f->tensors[i];
    qsort(order, (size_t)f->n_tensors, sizeof *order, cmp_off);
    kiln_status s = KILN_OK;
    uint64_t pos = 0;
    for (int64_t i = 0; i < f->n_tensors && !s; i++) {
        gguf_tensor *t = order[i];
        if (t->offset % f->alignment)
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tensor \"%s\": offset %llu is not a multiple of the "
                          "alignment %zu", what, t->name, (unsigned long long)t->offset,
                          f->alignment);
        else if (t->offset > f->data_size || t->bytes > f->data_size - t->offset)
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tensor \"%s\": bytes [%llu, %llu) of the data section lie "
                          "outside its %zu bytes (truncated or corrupt)", what, t->name,
                          (unsigned long long)t->offset,
                          (unsigned long long)t->offset + t->bytes, f->data_size);
        else if (i > 0 && t->offset < pos)
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tensor \"%s\" (offset %llu) overlaps tensor \"%s\" (which "
                          "ends at %llu)", what, t->name, (unsigned long long)t->offset,
                          order[i - 1]->name, (unsigned long long)pos);
        else
            pos = t->offset + t->bytes;
    }
    free(order);
    return s;
}

kiln_status gguf_parse(kiln_ctx *ctx, const unsigned char *buf, size_t len,
                       const char *what, gguf_file *f)
{
    memset(f, 0, sizeof *f);
    cursor c = {buf, buf + len};
    if (len < 4 || memcmp(buf, GGUF_MAGIC, 4))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: not a GGUF file (the first 4 bytes are not \"GGUF\")", what);
    c.p += 4;
    uint64_t nt, nkv;
    if (!rd_u32(&c, &f->version))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: truncated GGUF header", what);
    if (f->version != 2 && f->version != 3)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: GGUF version %u is not supported (kiln reads versions 2 and 3)",
                         what, f->version);
    if (!rd_u64(&c, &nt) || !rd_u64(&c, &nkv))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: truncated GGUF header", what);
    /* a key-value pair takes at least 8 + 1 + 4 + 1 bytes, a tensor info
     * 8 + 1 + 4 + 8 + 4 + 8 */
    if (nkv > left(&c) / 14 || nt > left(&c) / 33 || nkv + nt > left(&c) / 14)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: header counts %llu tensors and %llu metadata keys, more than "
                         "its %zu bytes can hold (truncated or corrupt)", what,
                         (unsigned long long)nt, (unsigned long long)nkv, len);
    f->kv = calloc(nkv ? (size_t)nkv : 1, sizeof *f->kv);
    f->tensors = calloc(nt ? (size_t)nt : 1, sizeof *f->tensors);
    kiln_status s = KILN_OK;
    if (!f->kv || !f->tensors) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (uint64_t i = 0; i < nkv && !s; i++) {
        f->n_kv++;
        s = parse_kv(ctx, &c, what, (int64_t)i, &f->kv[i]);
    }
    for (uint64_t i = 0; i < nt && !s; i++) {
        f->n_tensors++;
        s = parse_tensor_info(ctx, &c, what, (int64_t)i, &f->tensors[i]);
    }
    if (!s) {
        bool oom;
        char **names = malloc(((size_t)(nkv > nt ? nkv : nt) + 1) * sizeof *names);
        if (!names) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        for (int64_t i = 0; !s && i < f->n_kv; i++) names[i] = f->kv[i].key;
        const char *dup = s ? NULL : find_dup(names, f->n_kv, &oom);
        if (!s && (oom || dup))
            s = oom ? kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory")
                    : kiln_fail(ctx, KILN_ERR_FORMAT, "%s: key \"%s\" appears twice", what,
                                dup);
        for (int64_t i = 0; !s && i < f->n_tensors; i++) names[i] = f->tensors[i].name;
        dup = s ? NULL : find_dup(names, f->n_tensors, &oom);
        if (!s && (oom || dup))
            s = oom ? kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory")
                    : kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tensor \"%s\" appears twice",
                                what, dup);
        free(names);
    }
    if (!s) s = check_layout(ctx, f, what, (size_t)(c.p - buf), len);
    if (!s && f->n_tensors) {
        f->data = buf + (len - f->data_size);
        for (int64_t i = 0; i < f->n_tensors; i++)
            f->tensors[i].data = f->data + f->tensors[i].offset;
    }
    if (s) {
        free_file(f);
        memset(f, 0, sizeof *f);
    }
    return s;
}

kiln_status gguf_open(kiln_ctx *ctx, const char *path, gguf_file *f)
{
    memset(f, 0, sizeof *f);
    file_map m;
    kiln_status s = file_map_open(ctx, path, &m);
    if (s) return s;
    s = gguf_parse(ctx, m.data, m.size, path, f);
    if (s) {
        file_map_close(&m);
        memset(f, 0, sizeof *f);
        return s;
    }
    f->map = m;
    return KILN_OK;
}

void gguf_close(gguf_file *f)
{
    if (!f) return;
    free_file(f);
    file_map_close(&f->map);
    memset(f, 0, sizeof *f);
}

bool gguf_is_gguf(const char *path)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) return false;
    char m[4];
    bool ok = fread(m, 1, 4, fp) == 4 && !memcmp(m, GGUF_MAGIC, 4);
    fclose(fp);
    return ok;
}

const gguf_kv *gguf_find(const gguf_file *f, const char *key)
{
    for (int64_t i = 0; i < f->n_kv; i++)
        if (!strcmp(f->kv[i].key, key)) return &f->kv[i];
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name)
{
    for (int64_t i = 0; i < f->n_tensors; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

static kiln_status missing(kiln_ctx *ctx, const char *what, const char *key)
{
    return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: metadata key \"%s\" is missing", what, key);
}

static kiln_status wrong_type(kiln_ctx *ctx, const char *what, const gguf_kv *kv,
                              const char *want)
{
    if (kv->type == GGUF_TYPE_ARRAY)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: metadata key \"%s\" is an array of %s; expected %s", what,
                         kv->key, type_names[kv->arr_type], want);
    return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: metadata key \"%s\" is a %s; expected %s",
                     what, kv->key, type_names[kv->type], want);
}

static bool is_int_type(uint32_t t)
{
    return t <= GGUF_TYPE_INT32 ? t != GGUF_TYPE_FLOAT32
                                : (t == GGUF_TYPE_UINT64 || t == GGUF_TYPE_INT64);
}

/* The integer of type t at p; *ok false when a uint64 exceeds int64. */
static int64_t ld_int(uint32_t t, const unsigned char *p, bool *ok)
{
    *ok = true;
    switch (t) {
    case GGUF_TYPE_UINT8: return p[0];
    case GGUF_TYPE_INT8: return (int8_t)p[0];
    case GGUF_TYPE_UINT16: return (uint16_t)(p[0] | p[1] << 8);
    case GGUF_TYPE_INT16: return (int16_t)(uint16_t)(p[0] | p[1] << 8);
    case GGUF_TYPE_UINT32:
        return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
               (uint32_t)p[3] << 24;
    case GGUF_TYPE_INT32:
        return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                         (uint32_t)p[3] << 24);
    case GGUF_TYPE_UINT64: {
        uint64_t v = ld_u64(p);
        *ok = v <= (uint64_t)INT64_MAX;
        return (int64_t)v;
    }
    case GGUF_TYPE_INT64: return (int64_t)ld_u64(p);
    default: *ok = false; return 0;
    }
}

kiln_status gguf_get_int(kiln_ctx *ctx, const gguf_file *f, const char *what,
                         const char *key, bool required, int64_t *out)
{
    const gguf_kv *kv = gguf_find(f, key);
    if (!kv) return required ? missing(ctx, what, key) : KILN_OK;
    if (kv->type == GGUF_TYPE_ARRAY || !is_int_type(kv->type))
        return wrong_type(ctx, what, kv, "an integer");
    bool ok;
    int64_t v = ld_int(kv->type, kv->val, &ok);
    if (!ok)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: metadata key \"%s\" is out of range",
                         what, key);
    *out = v;
    return KILN_OK;
}

kiln_status gguf_get_float(kiln_ctx *ctx, const gguf_file *f, const char *what,
                           const char *key, bool required, double *out)
{
    const gguf_kv *kv = gguf_find(f, key);
    if (!kv) return required ? missing(ctx, what, key) : KILN_OK;
    if (kv->type == GGUF_TYPE_FLOAT32) {
        float v;
        memcpy(&v, kv->val, 4);
        *out = v;
    } else if (kv->type == GGUF_TYPE_FLOAT64) {
        memcpy(out, kv->val, 8);
    } else {
        return wrong_type(ctx, what, kv, "a float32");
    }
    return KILN_OK;
}

kiln_status gguf_get_bool(kiln_ctx *ctx, const gguf_file *f, const char *what,
                          const char *key, bool required, bool *out)
{
    const gguf_kv *kv = gguf_find(f, key);
    if (!kv) return required ? missing(ctx, what, key) : KILN_OK;
    if (kv->type != GGUF_TYPE_BOOL) return wrong_type(ctx, what, kv, "a bool");
    if (kv->val[0] > 1)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: metadata key \"%s\": bool byte is %u",
                         what, key, kv->val[0]);
    *out = kv->val[0] != 0;
    return KILN_OK;
}

kiln_status gguf_get_str(kiln_ctx *ctx, const gguf_file *f, const char *what,
                         const char *key, bool required, const char **out, size_t *len)
{
    const gguf_kv *kv = gguf_find(f, key);
    if (!kv) return required ? missing(ctx, what, key) : KILN_OK;
    if (kv->type != GGUF_TYPE_STRING) return wrong_type(ctx, what, kv, "a string");
    *len = (size_t)ld_u64(kv->val);
    *out = (const char *)kv->val + 8;
    return KILN_OK;
}

kiln_status gguf_get_arr(kiln_ctx *ctx, const gguf_file *f, const char *what,
                         const char *key, bool required, uint32_t elem_type,
                         const gguf_kv **out)
{
    *out = NULL;
    const gguf_kv *kv = gguf_find(f, key);
    if (!kv) return required ? missing(ctx, what, key) : KILN_OK;
    bool ok = kv->type == GGUF_TYPE_ARRAY &&
              (elem_type == GGUF_TYPE_INT64 ? is_int_type(kv->arr_type)
                                            : kv->arr_type == elem_type);
    if (!ok) {
        char want[48];
        snprintf(want, sizeof want, "an array of %s",
                 elem_type == GGUF_TYPE_INT64 ? "integers" : type_names[elem_type]);
        return wrong_type(ctx, what, kv, want);
    }
    *out = kv;
    return KILN_OK;
}

int64_t gguf_arr_int(const gguf_kv *kv, uint64_t i)
{
    bool ok;
    return ld_int(kv->arr_type, kv->val + i * type_size[kv->arr_type], &ok);
}

kiln_status gguf_arr_strs(kiln_ctx *ctx, const gguf_kv *kv, const char ***ptrs,
                          size_t **lens)
{
    *ptrs = malloc((kv->n ? (size_t)kv->n : 1) * sizeof **ptrs);
    *lens = malloc((kv->n ? (size_t)kv->n : 1) * sizeof **lens);
    if (!*ptrs || !*lens) {
        free(*ptrs);
        free(*lens);
        *ptrs = NULL;
        *lens = NULL;
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    cursor c = {kv->val, kv->val + kv->val_size};
    for (uint64_t i = 0; i < kv->n; i++) {
        bool ok = rd_str(&c, &(*ptrs)[i], &(*lens)[i]);
        KILN_ASSERT(ok); /* validated by the parser */
    }
    return KILN_OK;
}

/* ---- public API (kiln.h) ------------------------------------------------ */

struct kiln_gguf {
    gguf_file f;
};

kiln_status kiln_gguf_open(kiln_ctx *ctx, const char *path, kiln_gguf **out)
{
    *out = NULL;
    kiln_gguf *g = calloc(1, sizeof *g);
    if (!g) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    kiln_status s = gguf_open(ctx, path, &g->f);
    if (s) {
        free(g);
        return s;
    }
    *out = g;
    return KILN_OK;
}

void kiln_gguf_close(kiln_gguf *g)
{
    if (!g) return;
    gguf_close(&g->f);
    free(g);
}

int64_t kiln_gguf_num_tensors(const kiln_gguf *g) { return g->f.n_tensors; }

bool kiln_gguf_tensor_at(const kiln_gguf *g, int64_t i, kiln_gguf_tensor *out)
{
    if (i < 0 || i >= g->f.n_tensors) return false;
    const gguf_tensor *t = &g->f.tensors[i];
    out->name = t->name;
    out->dtype = t->type;
    out->ndim = t->ndim;
    memcpy(out->ne, t->ne, sizeof out->ne);
    out->data = t->data;
    out->bytes = t->bytes;
    return true;
}

int64_t kiln_gguf_find_tensor(const kiln_gguf *g, const char *name)
{
    for (int64_t i = 0; i < g->f.n_tensors; i++)
        if (!strcmp(g->f.tensors[i].name, name)) return i;
    return -1;
}
