/*
 * test_safetensors.c — the safetensors reader/writer and dtype
 * conversions: round trips, and every kind of malformed file (truncated,
 * header lying about its length or offsets, overlaps, holes, unknown or
 * wrong dtypes, bad shapes) rejected with a message, never a crash. Also
 * model directories with broken weights, and sharded checkpoints
 * (model.safetensors.index.json) with every inconsistency named.
 */
#include "check.h"
#include "io/safetensors.h"
#include "model/model.h"

#include <unistd.h>

static char dir[64];

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*len + 1);
    if (fread(b, 1, *len, f) != *len) *len = 0;
    fclose(f);
    return b;
}

static void spit(const char *path, const void *b, size_t len)
{
    FILE *f = fopen(path, "wb");
    fwrite(b, 1, len, f);
    fclose(f);
}

/* Builds a raw file from a header string and a data buffer size. */
static unsigned char *raw(const char *header, size_t data, size_t *len)
{
    size_t hl = strlen(header);
    *len = 8 + hl + data;
    unsigned char *b = calloc(1, *len);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, header, hl);
    return b;
}

static void expect_reject(const char *header, size_t data, const char *needle)
{
    kiln_ctx *ctx = kiln_ctx_new();
    size_t len;
    unsigned char *b = raw(header, data, &len);
    st_file f;
    kiln_status s = st_parse(ctx, b, len, "x.safetensors", &f);
    CHECK_MSG(s == KILN_ERR_FORMAT, "accepted: %s", header);
    CHECK_MSG(strstr(kiln_errmsg(ctx), needle) != NULL, "'%s' lacks '%s'", kiln_errmsg(ctx),
              needle);
    if (!s) st_close(&f);
    free(b);
    kiln_ctx_free(ctx);
}

static void test_roundtrip(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    char path[128];
    snprintf(path, sizeof path, "%s/a.safetensors", dir);
    float a[6] = {1, -2, 3.5f, 0, 1e-3f, -7};
    uint16_t h[3] = {f32_to_bf16(1.5f), f32_to_bf16(-2.0f), f32_to_bf16(0.25f)};
    st_entry e[3] = {
        {.name = "a", .dtype = KILN_DTYPE_F32, .ndim = 2, .shape = {2, 3}, .data = a},
        {.name = "b.bf16", .dtype = KILN_DTYPE_BF16, .ndim = 1, .shape = {3}, .data = h},
        {.name = "empty", .dtype = KILN_DTYPE_F32, .ndim = 2, .shape = {0, 4}, .data = a},
    };
    const char *meta[2] = {"note", "hello"};
    CHECK(st_save(ctx, path, e, 3, meta, 1) == KILN_OK);
    st_file f;
    CHECK(st_open(ctx, path, &f) == KILN_OK);
    CHECK_EQ(f.n_tensors, 3);
    const st_tensor *t = st_find(&f, "a");
    CHECK(t && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3 && t->numel == 6);
    float out[6];
    CHECK(st_read_f32(ctx, &f, t, path, out) == KILN_OK);
    CHECK(memcmp(out, a, sizeof a) == 0);
    t = st_find(&f, "b.bf16");
    CHECK(st_read_f32(ctx, &f, t, path, out) == KILN_OK);
    CHECK(out[0] == 1.5f && out[1] == -2.0f && out[2] == 0.25f);
    CHECK_STREQ(json_string_value(json_object_get(f.metadata, "format")), "pt");
    CHECK_STREQ(json_string_value(json_object_get(f.metadata, "note")), "hello");
    CHECK(((size_t)(f.data - f.map.data)) % 8 == 0); /* aligned data */
    st_close(&f);
    /* every plain dtype's spelling and element size from the traits table
     * (the safetensors spec's strings) */
    static const struct {
        kiln_dtype t;
        const char *st;
        size_t size;
    } plain[] = {{KILN_DTYPE_I8, "I8", 1},   {KILN_DTYPE_I16, "I16", 2}, {KILN_DTYPE_I64, "I64", 8},
                 {KILN_DTYPE_U8, "U8", 1},   {KILN_DTYPE_U16, "U16", 2}, {KILN_DTYPE_U32, "U32", 4},
                 {KILN_DTYPE_U64, "U64", 8}, {KILN_DTYPE_BOOL, "BOOL", 1}, {KILN_DTYPE_F64, "F64", 8},
                 {KILN_DTYPE_F16, "F16", 2}};
    uint64_t buf[3] = {0};
    for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++) {
        st_entry one = {.name = "x", .dtype = plain[i].t, .ndim = 1, .shape = {3}, .data = buf};
        CHECK(st_save(ctx, path, &one, 1, NULL, 0) == KILN_OK);
        CHECK(st_open(ctx, path, &f) == KILN_OK);
        t = st_find(&f, "x");
        CHECK_MSG(t && t->dtype == plain[i].t && t->end - t->begin == 3 * plain[i].size,
                  "%s", plain[i].st);
        st_close(&f);
        char head[256] = {0}, want[32];
        FILE *fp = fopen(path, "rb");
        CHECK(fp && fread(head, 1, sizeof head - 1, fp) > 8);
        if (fp) fclose(fp);
        snprintf(want, sizeof want, "\"dtype\":\"%s\"", plain[i].st);
        CHECK_MSG(strstr(head + 8, want) != NULL, "%s not in %s", want, head + 8);
    }
    /* a block-quantized type has no safetensors spelling: refused by name */
    st_entry q = {.name = "w", .dtype = KILN_DTYPE_Q8_0, .ndim = 1, .shape = {32}, .data = a};
    CHECK(st_save(ctx, path, &q, 1, NULL, 0) == KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "q8_0") != NULL);
    kiln_ctx_free(ctx);
}

static void test_malformed(void)
{
    /* valid baseline parses */
    kiln_ctx *ctx = kiln_ctx_new();
    size_t len;
    unsigned char *b = raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, &len);
    st_file f;
    CHECK(st_parse(ctx, b, len, "x", &f) == KILN_OK);
    st_close(&f);
    /* truncated: every prefix is rejected cleanly */
    for (size_t cut = 0; cut < len; cut++) {
        kiln_status s = st_parse(ctx, b, cut, "x", &f);
        CHECK_MSG(s == KILN_ERR_FORMAT, "prefix of %zu bytes accepted", cut);
        if (!s) st_close(&f);
    }
    /* header length larger than the file / than 100 MB */
    b[0] = 0xff; b[1] = 0xff;
    CHECK(st_parse(ctx, b, len, "x", &f) == KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "header length") != NULL);
    memset(b, 0xff, 8);
    CHECK(st_parse(ctx, b, len, "x", &f) == KILN_ERR_FORMAT);
    free(b);
    kiln_ctx_free(ctx);

    const char *T = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},";
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8, "outside");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "outside");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "needs");
    expect_reject("{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "dtype");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8, "data_offsets");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8, "shape");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,2],\"data_offsets\":[0,8]}}", 8, "dimensions");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,8]}}", 8, "large");
    expect_reject("{\"a\":[1,2]}", 8, "not an object");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}", 8, "invalid JSON");
    expect_reject("[1]", 0, "JSON object");
    expect_reject("{\"__metadata__\":{\"format\":1}}", 0, "__metadata__");
    char h[256];
    snprintf(h, sizeof h, "%s\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", T);
    expect_reject(h, 12, "overlaps");
    snprintf(h, sizeof h, "%s\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", T);
    expect_reject(h, 16, "unindexed");
    expect_reject("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 12, "trailing");
    snprintf(h, sizeof h, "%s\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", T);
    expect_reject(h, 16, "duplicate");
}

static void test_dtype_conversions(void)
{
    /* exhaustive: every f16 and bf16 value survives f32 and back */
    int bad16 = 0, badb = 0;
    for (uint32_t i = 0; i < 65536; i++) {
        uint16_t x = (uint16_t)i;
        float f = f16_to_f32(x);
        uint16_t y = f32_to_f16(f);
        if (f == f ? y != x : ((y & 0x7c00) != 0x7c00 || !(y & 0x3ff))) bad16++;
        float g = bf16_to_f32(x);
        uint16_t z = f32_to_bf16(g);
        if (g == g ? z != x : !((z & 0x7f80) == 0x7f80 && (z & 0x7f))) badb++;
    }
    CHECK_EQ(bad16, 0);
    CHECK_EQ(badb, 0);
    /* rounding to nearest even, overflow, subnormals */
    CHECK(f32_to_bf16(1.0f + 1.0f / 256) == 0x3f80);           /* tie -> even */
    CHECK(f32_to_bf16(1.0f + 3.0f / 256) == 0x3f82);           /* tie -> even (up) */
    CHECK(f32_to_f16(65504.0f) == 0x7bff);
    CHECK(f32_to_f16(65520.0f) == 0x7c00);                     /* rounds to inf */
    CHECK(f32_to_f16(1e-8f) == 0x0000);
    CHECK(f32_to_f16(5.9604645e-08f) == 0x0001);               /* smallest subnormal */
    CHECK(f32_to_f16(-2.0f) == 0xc000);
    CHECK(f16_to_f32(0x3555) == 0.333251953125f);
    /* bulk == scalar on random data (also exercises the vector paths) */
    enum { N = 1000 };
    float src[N], back[N];
    uint16_t a[N], b[N];
    kiln_rng r;
    kiln_rng_seed(&r, 1);
    for (int i = 0; i < N; i++) src[i] = kiln_rng_normal(&r) * (i % 7 == 0 ? 1e4f : 1.0f);
    f32_to_f16_n(a, src, N);
    for (int i = 0; i < N; i++) b[i] = f32_to_f16(src[i]);
    CHECK(memcmp(a, b, sizeof a) == 0);
    f16_to_f32_n(back, a, N);
    for (int i = 0; i < N; i++) CHECK(back[i] == f16_to_f32(a[i]));
    f32_to_bf16_n(a, src, N);
    for (int i = 0; i < N; i++) b[i] = f32_to_bf16(src[i]);
    CHECK(memcmp(a, b, sizeof a) == 0);
    bf16_to_f32_n(back, a, N);
    for (int i = 0; i < N; i++) CHECK(back[i] == bf16_to_f32(a[i]));
}

/* Model directories with broken weights load with a clear error. */
static void test_model_dir_errors(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = kiln_config_default();
    cfg.n_layer = 1;
    cfg.n_embd = 16;
    cfg.n_head = 2;
    cfg.n_kv_head = 2;
    cfg.n_inner = 32;
    cfg.n_ctx = 8;
    kiln_model *m, *m2 = NULL;
    CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
    kiln_model_init_random(m, 1);
    char md[128], wp[160];
    snprintf(md, sizeof md, "%s/model", dir);
    snprintf(wp, sizeof wp, "%s/model.safetensors", md);
    CHECK(kiln_model_save(ctx, m, md) == KILN_OK);
    size_t len = 0;
    unsigned char *orig = slurp(wp, &len);
    CHECK(orig && len > 100);
    if (!orig || len <= 100) return;
    /* truncated */
    spit(wp, orig, len - 5);
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_ERR_FORMAT && m2 == NULL);
    CHECK(strstr(kiln_errmsg(ctx), wp) != NULL);
    /* empty file */
    spit(wp, orig, 0);
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_ERR_FORMAT && m2 == NULL);
    /* wrong dtype: relabel the first tensor's F32 as I32 */
    unsigned char *mod = malloc(len);
    memcpy(mod, orig, len);
    char *p = memmem(mod, len, "\"F32\"", 5);
    CHECK(p != NULL);
    if (p) memcpy(p, "\"I32\"", 5);
    spit(wp, mod, len);
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_ERR_FORMAT && m2 == NULL);
    CHECK(strstr(kiln_errmsg(ctx), "I32") != NULL);
    /* a NaN in the weights */
    memcpy(mod, orig, len);
    float nan = NAN;
    memcpy(mod + len - 4, &nan, 4);
    spit(wp, mod, len);
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_ERR_NUMERIC && m2 == NULL);
    /* missing tensor: rename one in the header */
    memcpy(mod, orig, len);
    p = memmem(mod, len, "ln_f.weight", 11);
    CHECK(p != NULL);
    if (p) p[0] = 'X';
    spit(wp, mod, len);
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_ERR_FORMAT && m2 == NULL);
    CHECK(strstr(kiln_errmsg(ctx), "missing") != NULL);
    /* the original file loads again */
    spit(wp, orig, len);
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_OK);
    kiln_model_free(m2);
    /* missing directory / config */
    CHECK(kiln_model_load(ctx, "/nonexistent-kiln-dir", &m2) == KILN_ERR_IO);
    free(mod);
    free(orig);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* Writes md's model m as shards: tensors [0, half) in a, [half, n) in b
 * (plus tensor `dup` again in b when dup >= 0), and an index mapping each
 * tensor to its shard (map_fn overrides the shard named for tensor 0 when
 * non-NULL; extra is appended inside weight_map verbatim). */
static void write_shards(kiln_ctx *ctx, const kiln_model *m, const char *md, int dup,
                         const char *map_fn, const char *extra)
{
    int n = m->n_tensors, half = n / 2;
    st_entry *e = calloc((size_t)n + 1, sizeof *e);
    for (int i = 0; i < n; i++) {
        const kiln_tensor_info *t = &m->tensors[i];
        e[i] = (st_entry){.name = t->name, .dtype = KILN_DTYPE_F32, .ndim = t->ndim,
                          .shape = {t->shape[0], t->shape[1]}, .data = m->params + t->offset};
    }
    char p[256];
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", md);
    CHECK(st_save(ctx, p, e, half, NULL, 0) == KILN_OK);
    int nb = n - half;
    if (dup >= 0) e[n] = e[dup], nb++;
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", md);
    CHECK(st_save(ctx, p, e + half, nb, NULL, 0) == KILN_OK);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", md);
    FILE *f = fopen(p, "w");
    fprintf(f, "{\"metadata\": {\"total_size\": %zu}, \"weight_map\": {",
            m->num_params * 4);
    for (int i = 0; i < n; i++)
        fprintf(f, "%s\"%s\": \"%s\"", i ? ", " : "", m->tensors[i].name,
                i == 0 && map_fn ? map_fn
                : i < half       ? "model-00001-of-00002.safetensors"
                                 : "model-00002-of-00002.safetensors");
    fprintf(f, "%s}}\n", extra ? extra : "");
    fclose(f);
    free(e);
}

static void expect_load_error(kiln_ctx *ctx, const char *md, const char *n1, const char *n2)
{
    kiln_model *m2 = NULL;
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_ERR_FORMAT && m2 == NULL);
    CHECK_MSG(strstr(kiln_errmsg(ctx), n1) != NULL, "'%s' lacks '%s'", kiln_errmsg(ctx), n1);
    CHECK_MSG(!n2 || strstr(kiln_errmsg(ctx), n2) != NULL, "'%s' lacks '%s'",
              kiln_errmsg(ctx), n2);
    kiln_model_free(m2);
}

/* HF's sharded checkpoints: model.safetensors.index.json + shards load
 * like model.safetensors; every inconsistency is named. */
static void test_sharded(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = kiln_config_default();
    cfg.arch = KILN_ARCH_LLAMA;
    cfg.n_layer = 2;
    cfg.n_embd = 16;
    cfg.n_head = 2;
    cfg.n_kv_head = 1;
    cfg.n_inner = 24;
    cfg.n_ctx = 8;
    cfg.bias = false;
    cfg.tie_embeddings = false;
    kiln_model *m, *m2 = NULL;
    CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
    kiln_model_init_random(m, 5);
    char md[128], p[256];
    snprintf(md, sizeof md, "%s/sharded", dir);
    CHECK(kiln_model_save(ctx, m, md) == KILN_OK);
    snprintf(p, sizeof p, "%s/model.safetensors", md);
    CHECK(unlink(p) == 0);
    write_shards(ctx, m, md, -1, NULL, NULL);
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_OK);
    if (m2) {
        CHECK(m2->num_params == m->num_params);
        CHECK(memcmp(m->params, m2->params, m->num_params * sizeof(float)) == 0);
        kiln_model_free(m2);
        m2 = NULL;
    }
    const char *last = m->tensors[m->n_tensors - 1].name, *first = m->tensors[0].name;
    /* a shard missing */
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", md);
    CHECK(unlink(p) == 0);
    expect_load_error(ctx, md, "model-00002-of-00002.safetensors", "missing");
    /* a tensor stored in both shards */
    write_shards(ctx, m, md, 0, NULL, NULL);
    expect_load_error(ctx, md, first, "stored twice");
    /* a tensor mapped to the shard that lacks it */
    write_shards(ctx, m, md, -1, "model-00002-of-00002.safetensors", NULL);
    expect_load_error(ctx, md, first, "mapped to shard");
    /* a tensor listed twice in the map */
    char extra[256];
    snprintf(extra, sizeof extra, ", \"%s\": \"model-00002-of-00002.safetensors\"", last);
    write_shards(ctx, m, md, -1, NULL, extra);
    expect_load_error(ctx, md, last, "duplicate");
    /* a tensor mapped to a shard holding none of it */
    snprintf(extra, sizeof extra, ", \"extra.weight\": \"model-00001-of-00002.safetensors\"");
    write_shards(ctx, m, md, -1, NULL, extra);
    expect_load_error(ctx, md, "extra.weight", "no such tensor");
    /* a tensor the config implies in no shard and not in the map */
    write_shards(ctx, m, md, -1, NULL, NULL);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", md);
    size_t il = 0;
    unsigned char *ix = slurp(p, &il);
    char *cut = ix ? strstr((char *)ix, ", \"lm_head.weight\"") : NULL;
    CHECK(cut != NULL);
    if (cut) {
        strcpy(cut, "}}\n");
        spit(p, ix, strlen((char *)ix));
        /* shard 2 without lm_head: rewrite it from the model's tensors */
        st_entry e[64];
        int k = 0;
        for (int i = m->n_tensors / 2; i < m->n_tensors && k < 64; i++) {
            const kiln_tensor_info *t = &m->tensors[i];
            if (!strcmp(t->name, "lm_head.weight")) continue;
            e[k++] = (st_entry){.name = t->name, .dtype = KILN_DTYPE_F32, .ndim = t->ndim,
                                .shape = {t->shape[0], t->shape[1]},
                                .data = m->params + t->offset};
        }
        char sp[256];
        snprintf(sp, sizeof sp, "%s/model-00002-of-00002.safetensors", md);
        CHECK(st_save(ctx, sp, e, k, NULL, 0) == KILN_OK);
        expect_load_error(ctx, md, "\"lm_head.weight\" is missing from every shard", md);
    }
    free(ix);
    /* shard names are file names in the directory, never paths */
    write_shards(ctx, m, md, -1, "../model-00001-of-00002.safetensors", NULL);
    expect_load_error(ctx, md, first, "without '/'");
    /* a map that is not {name: file} */
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", md);
    spit(p, "{\"weight_map\": []}", 18);
    expect_load_error(ctx, md, "weight_map", "model.safetensors.index.json");
    /* a model saved over the directory wins over the stale index */
    write_shards(ctx, m, md, 0, NULL, NULL);
    kiln_model_init_random(m, 6);
    CHECK(kiln_model_save(ctx, m, md) == KILN_OK);
    CHECK(!file_exists(p));
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_OK);
    if (m2) CHECK(memcmp(m->params, m2->params, m->num_params * sizeof(float)) == 0);
    kiln_model_free(m2);
    /* no weights at all */
    snprintf(p, sizeof p, "%s/model.safetensors", md);
    CHECK(unlink(p) == 0);
    CHECK(kiln_model_load(ctx, md, &m2) == KILN_ERR_IO && m2 == NULL);
    CHECK(strstr(kiln_errmsg(ctx), "model.safetensors.index.json") != NULL);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

int main(void)
{
    snprintf(dir, sizeof dir, "/tmp/kiln-test-st-XXXXXX");
    if (!mkdtemp(dir)) return 1;
    RUN_TEST(test_roundtrip);
    RUN_TEST(test_malformed);
    RUN_TEST(test_dtype_conversions);
    RUN_TEST(test_model_dir_errors);
    RUN_TEST(test_sharded);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) return 1;
    return TEST_EXIT();
}
