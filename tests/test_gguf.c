/*
 * test_gguf.c — GGUF: the writer and reader on every metadata type; kiln
 * -> GGUF F32 -> kiln bit-exact for gpt2 and llama (weights, config, the
 * tokenizer's ids on sample texts); llama's q/k permutation against hand
 * -worked rows; the quantized presets' tensors equal the reference
 * quantizer of the GGUF-layout weights, and what kiln loads equals the
 * reference dequantization of the written blocks; the q4_k_m recipe; and
 * hostile files (truncated at every length, wrong magic or version, huge
 * counts and lengths, misaligned, overlapping or outlying offsets, unknown
 * types, duplicate names) refused with the right message.
 */
#include "check.h"
#include "io/gguf.h"
#include "model/model.h"
#include "tokenizer/tok_gguf.h"

#include <unistd.h>

static char dir[64];

static char *path(const char *name)
{
    static char buf[8][256];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 256, "%s/%s", dir, name);
    return p;
}

static unsigned char *slurp(const char *p, size_t *len)
{
    FILE *f = fopen(p, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*len + 1);
    if (fread(b, 1, *len, f) != *len) *len = 0;
    fclose(f);
    return b;
}

static const char *sample_texts[] = {
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  spaces   and\ttabs\nnewlines\n\n don't stop it; it's 1234 or 56789?",
    "caf\xc3\xa9 na\xc3\xafve \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80 <|endoftext|> end",
};

/* ---- writer and reader ---------------------------------------------------- */

static kiln_status fill_iota(kiln_ctx *ctx, void *ud, int i, void *dst, size_t bytes)
{
    (void)ctx;
    (void)ud;
    for (size_t k = 0; k < bytes; k++) ((unsigned char *)dst)[k] = (unsigned char)(k * 7 + (size_t)i);
    return KILN_OK;
}

static void test_metadata_round_trip(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    gguf_writer w;
    gguf_writer_init(&w);
    gguf_w_u32(&w, "a.u32", 4000000000u);
    gguf_w_i32(&w, "a.i32", -7);
    gguf_w_u64(&w, "a.u64", 1ull << 40);
    gguf_w_f32(&w, "a.f32", 0.25f);
    gguf_w_f64(&w, "a.f64", -1.5);
    gguf_w_bool(&w, "a.bool", true);
    gguf_w_str(&w, "a.str", "h\xc3\xa9llo");
    uint8_t u8 = 200;
    int8_t i8 = -100;
    uint16_t u16 = 60000;
    int16_t i16 = -30000;
    int64_t i64 = -(1LL << 50);
    gguf_w_scalar(&w, "s.u8", GGUF_TYPE_UINT8, &u8);
    gguf_w_scalar(&w, "s.i8", GGUF_TYPE_INT8, &i8);
    gguf_w_scalar(&w, "s.u16", GGUF_TYPE_UINT16, &u16);
    gguf_w_scalar(&w, "s.i16", GGUF_TYPE_INT16, &i16);
    gguf_w_scalar(&w, "s.i64", GGUF_TYPE_INT64, &i64);
    int16_t arr[3] = {-1, 2, 300};
    gguf_w_arr(&w, "a.arr", GGUF_TYPE_INT16, arr, 3);
    const char *strs[3] = {"x", "", "a b"};
    gguf_w_arr_str(&w, "a.strs", strs, NULL, 3);
    int64_t ne1[2] = {32, 3}, ne2[1] = {5};
    CHECK_EQ(gguf_w_tensor(ctx, &w, "t.q8", KILN_DTYPE_Q8_0, 2, ne1), KILN_OK);
    CHECK_EQ(gguf_w_tensor(ctx, &w, "t.f32", KILN_DTYPE_F32, 1, ne2), KILN_OK);
    int64_t bad[2] = {33, 1};
    CHECK_EQ(gguf_w_tensor(ctx, &w, "t.bad", KILN_DTYPE_Q8_0, 2, bad), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "t.bad") && strstr(kiln_errmsg(ctx), "multiple of"));
    CHECK_EQ(gguf_write(ctx, &w, path("meta.gguf"), fill_iota, NULL), KILN_OK);
    gguf_writer_free(&w);

    gguf_file f;
    CHECK_EQ(gguf_open(ctx, path("meta.gguf"), &f), KILN_OK);
    CHECK_EQ(f.version, 3u);
    CHECK_EQ((int)f.n_kv, 14);
    static const struct { const char *k; int64_t v; } sc[] = {
        {"s.u8", 200}, {"s.i8", -100}, {"s.u16", 60000}, {"s.i16", -30000}, {"s.i64", -(1LL << 50)}};
    for (size_t i = 0; i < sizeof sc / sizeof *sc; i++) {
        int64_t x = 0;
        CHECK_EQ(gguf_get_int(ctx, &f, "x", sc[i].k, true, &x), KILN_OK);
        CHECK_EQ(x, sc[i].v);
    }
    int64_t v = 0;
    double d = 0;
    bool b = false;
    const char *s;
    size_t sl;
    CHECK_EQ(gguf_get_int(ctx, &f, "x", "a.u32", true, &v), KILN_OK);
    CHECK_EQ(v, 4000000000LL);
    CHECK_EQ(gguf_get_int(ctx, &f, "x", "a.i32", true, &v), KILN_OK);
    CHECK_EQ(v, -7);
    CHECK_EQ(gguf_get_int(ctx, &f, "x", "a.u64", true, &v), KILN_OK);
    CHECK_EQ(v, 1LL << 40);
    CHECK_EQ(gguf_get_float(ctx, &f, "x", "a.f32", true, &d), KILN_OK);
    CHECK(d == 0.25);
    CHECK_EQ(gguf_get_float(ctx, &f, "x", "a.f64", true, &d), KILN_OK);
    CHECK(d == -1.5);
    CHECK_EQ(gguf_get_bool(ctx, &f, "x", "a.bool", true, &b), KILN_OK);
    CHECK(b);
    CHECK_EQ(gguf_get_str(ctx, &f, "x", "a.str", true, &s, &sl), KILN_OK);
    CHECK(sl == 6 && !memcmp(s, "h\xc3\xa9llo", 6));
    const gguf_kv *a;
    CHECK_EQ(gguf_get_arr(ctx, &f, "x", "a.arr", true, GGUF_TYPE_INT64, &a), KILN_OK);
    CHECK(a && a->n == 3 && gguf_arr_int(a, 0) == -1 && gguf_arr_int(a, 2) == 300);
    CHECK_EQ(gguf_get_arr(ctx, &f, "x", "a.strs", true, GGUF_TYPE_STRING, &a), KILN_OK);
    const char **ps;
    size_t *pl;
    CHECK_EQ(gguf_arr_strs(ctx, a, &ps, &pl), KILN_OK);
    CHECK(pl[0] == 1 && pl[1] == 0 && pl[2] == 3 && !memcmp(ps[2], "a b", 3));
    free(ps);
    free(pl);
    /* wrong types and absent keys name the key */
    CHECK_EQ(gguf_get_str(ctx, &f, "x", "a.u32", true, &s, &sl), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "\"a.u32\" is a uint32; expected a string"));
    CHECK_EQ(gguf_get_int(ctx, &f, "x", "nope", true, &v), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "\"nope\" is missing"));
    v = 42;
    CHECK_EQ(gguf_get_int(ctx, &f, "x", "nope", false, &v), KILN_OK);
    CHECK_EQ(v, 42);
    /* tensors: shapes, offsets aligned, the bytes the callback gave */
    CHECK_EQ((int)f.n_tensors, 2);
    const gguf_tensor *t = gguf_find_tensor(&f, "t.q8");
    CHECK(t && t->type == KILN_DTYPE_Q8_0 && t->ne[0] == 32 && t->ne[1] == 3 && t->bytes == 102);
    CHECK(t && t->data[5] == 35 && (size_t)(t->data - f.map.data) % 32 == 0);
    t = gguf_find_tensor(&f, "t.f32");
    CHECK(t && t->offset == 128 && t->bytes == 20 && t->data[1] == 8);
    gguf_close(&f);
    kiln_ctx_free(ctx);
}

/* ---- models --------------------------------------------------------------- */

static kiln_model *make_model(kiln_ctx *ctx, kiln_arch arch, int C, int V, bool tie)
{
    kiln_config c = kiln_config_default();
    c.arch = arch;
    c.n_layer = 2;
    c.n_embd = C;
    c.n_head = 4;
    c.n_kv_head = arch == KILN_ARCH_LLAMA ? 2 : 4;
    c.n_inner = arch == KILN_ARCH_LLAMA ? 2 * C : 4 * C;
    c.vocab_size = V;
    c.n_ctx = 64;
    c.norm_eps = arch == KILN_ARCH_LLAMA ? 1e-6f : 1e-5f;
    c.rope_theta = 50000.0f;
    c.tie_embeddings = tie;
    c.bias = arch == KILN_ARCH_GPT2;
    c.bos_token_id = c.eos_token_id = V - 3 >= 256 ? 256 : V - 1;
    kiln_model *m = NULL;
    if (kiln_model_new(ctx, &c, &m)) return NULL;
    kiln_model_init_random(m, 7 + (uint64_t)arch);
    /* norms and biases away from 1 and 0, so a swap would show */
    float *p = kiln_model_params_mut(m);
    for (int i = 0; i < kiln_model_num_tensors(m); i++) {
        const kiln_tensor_info *t = kiln_model_tensor(m, i);
        if (t->ndim == 1)
            for (size_t k = 0; k < t->numel; k++) p[t->offset + k] = 0.5f + 0.01f * (float)(k % 37);
    }
    return m;
}

static kiln_tokenizer *train_tok(kiln_ctx *ctx, const char *pattern, int V)
{
    FILE *f = fopen(path("corpus.txt"), "w");
    for (int r = 0; r < 40; r++)
        for (size_t i = 0; i < sizeof sample_texts / sizeof *sample_texts; i++)
            fprintf(f, "%s %d the then they there %s\n", sample_texts[i], r, pattern);
    fclose(f);
    const char *in[1] = {path("corpus.txt")};
    kiln_tokenizer_train_opts o = kiln_tokenizer_train_opts_default();
    o.inputs = in;
    o.n_inputs = 1;
    o.vocab_size = V;
    o.pattern = pattern;
    o.min_frequency = 2;
    o.threads = 1;
    kiln_tokenizer *t = NULL;
    kiln_tokenizer_train_stats st;
    if (kiln_tokenizer_train(ctx, &o, &t, &st)) return NULL;
    return t;
}

static void same_ids(kiln_ctx *ctx, const kiln_tokenizer *a, const kiln_tokenizer *b)
{
    CHECK_EQ(kiln_tokenizer_vocab_size(a), kiln_tokenizer_vocab_size(b));
    CHECK_EQ(kiln_tokenizer_eot(a), kiln_tokenizer_eot(b));
    for (size_t i = 0; i < sizeof sample_texts / sizeof *sample_texts; i++) {
        int32_t *x = NULL, *y = NULL;
        size_t nx = 0, ny = 0;
        CHECK_EQ(kiln_tokenizer_encode(ctx, a, sample_texts[i], strlen(sample_texts[i]), &x, &nx), KILN_OK);
        CHECK_EQ(kiln_tokenizer_encode(ctx, b, sample_texts[i], strlen(sample_texts[i]), &y, &ny), KILN_OK);
        CHECK_EQ(nx, ny);
        CHECK(nx == ny && !memcmp(x, y, nx * sizeof *x));
        free(x);
        free(y);
    }
    for (int id = 0; id < kiln_tokenizer_vocab_size(a); id++)
        CHECK_EQ(kiln_tokenizer_is_special(a, id), kiln_tokenizer_is_special(b, id));
}

static void round_trip(kiln_arch arch, bool tie, const char *pattern)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok = pattern ? train_tok(ctx, pattern, 300) : NULL;
    if (!pattern) kiln_tokenizer_load(ctx, "bytes", &tok);
    CHECK(tok != NULL);
    if (!tok) return;
    kiln_model *m = make_model(ctx, arch, 64, kiln_tokenizer_vocab_size(tok), tie);
    CHECK(m != NULL);
    kiln_gguf_export_opts o = kiln_gguf_export_opts_default();
    CHECK_EQ(kiln_gguf_export(ctx, m, tok, path("rt.gguf"), &o, NULL), KILN_OK);
    kiln_model *r = NULL;
    kiln_tokenizer *rt = NULL;
    CHECK_EQ(kiln_model_load(ctx, path("rt.gguf"), &r), KILN_OK);
    CHECK_EQ(kiln_tokenizer_load(ctx, path("rt.gguf"), &rt), KILN_OK);
    if (r) {
        const kiln_config *a = kiln_model_config(m), *b = kiln_model_config(r);
        CHECK_EQ((int)a->arch, (int)b->arch);
        CHECK_EQ(a->n_layer, b->n_layer);
        CHECK_EQ(a->n_embd, b->n_embd);
        CHECK_EQ(a->n_head, b->n_head);
        CHECK_EQ(a->n_kv_head, b->n_kv_head);
        CHECK_EQ(a->n_inner, b->n_inner);
        CHECK_EQ(a->vocab_size, b->vocab_size);
        CHECK_EQ(a->n_ctx, b->n_ctx);
        CHECK(a->norm_eps == b->norm_eps);
        CHECK(a->arch == KILN_ARCH_GPT2 || a->rope_theta == b->rope_theta);
        CHECK_EQ(a->tie_embeddings, b->tie_embeddings);
        CHECK_EQ(a->bias, b->bias);
        CHECK_EQ(a->bos_token_id, b->bos_token_id);
        CHECK_EQ(a->eos_token_id, b->eos_token_id);
        CHECK_EQ(kiln_model_num_params(m), kiln_model_num_params(r));
        CHECK(!memcmp(kiln_model_params(m), kiln_model_params(r),
                      kiln_model_num_params(m) * sizeof(float)));
    }
    if (rt) same_ids(ctx, tok, rt);
    /* the GGUF says what llama.cpp needs */
    gguf_file f;
    CHECK_EQ(gguf_open(ctx, path("rt.gguf"), &f), KILN_OK);
    const char *s;
    size_t sl;
    CHECK_EQ(gguf_get_str(ctx, &f, "t", "general.architecture", true, &s, &sl), KILN_OK);
    CHECK(!memcmp(s, arch == KILN_ARCH_GPT2 ? "gpt2" : "llama", sl));
    CHECK_EQ(gguf_find_tensor(&f, "output.weight") == NULL, tie);
    const gguf_tensor *emb = gguf_find_tensor(&f, "token_embd.weight");
    CHECK(emb && emb->ne[0] == 64 && emb->ne[1] == kiln_tokenizer_vocab_size(tok));
    if (arch == KILN_ARCH_GPT2) {
        /* fused c_attn (C, 3C) transposed: row r of attn_qkv is column r */
        const gguf_tensor *q = gguf_find_tensor(&f, "blk.1.attn_qkv.weight");
        int ci = kiln_model_find_tensor(m, "transformer.h.1.attn.c_attn.weight");
        CHECK(q && q->ne[0] == 64 && q->ne[1] == 192 && ci >= 0);
        if (q && ci >= 0) {
            const float *w = kiln_model_params(m) + kiln_model_tensor(m, ci)->offset;
            const float *g = (const float *)q->data;
            CHECK(g[130 * 64 + 5] == w[5 * 192 + 130] && g[7] == w[7 * 192]);
        }
    } else {
        int64_t hc = 0;
        CHECK_EQ(gguf_get_int(ctx, &f, "t", "llama.attention.head_count_kv", true, &hc), KILN_OK);
        CHECK_EQ(hc, 2);
        /* permuted rows, HS = 16: GGUF row h*16 + 2i + j = HF row h*16 + 8j + i */
        const gguf_tensor *q = gguf_find_tensor(&f, "blk.0.attn_k.weight");
        int ki = kiln_model_find_tensor(m, "model.layers.0.self_attn.k_proj.weight");
        CHECK(q && q->ne[0] == 64 && q->ne[1] == 32 && ki >= 0);
        if (q && ki >= 0) {
            const float *w = kiln_model_params(m) + kiln_model_tensor(m, ki)->offset;
            const float *g = (const float *)q->data;
            static const int pairs[][2] = {{0, 0}, {1, 8}, {2, 1}, {3, 9}, {15, 15}, {17, 24}, {30, 23}};
            for (size_t k = 0; k < sizeof pairs / sizeof *pairs; k++)
                CHECK(!memcmp(g + pairs[k][0] * 64, w + pairs[k][1] * 64, 64 * sizeof(float)));
        }
    }
    gguf_close(&f);
    kiln_model_free(m);
    kiln_model_free(r);
    kiln_tokenizer_free(tok);
    kiln_tokenizer_free(rt);
    kiln_ctx_free(ctx);
}

/* A qwen2 model (q/k/v biases, no o bias, tied): llama.cpp's "qwen2"
 * architecture (qwen2.* keys, attn_q/k/v.bias, q/k rows in HF's order: its
 * NEOX rope needs no permutation) and back, bit for bit; a model read from
 * a "llama" file of that layout (older kiln's) keeps llama's permuted rows
 * and reads back the same. */
static void test_round_trip_qwen2(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok = train_tok(ctx, "llama3", 300);
    CHECK(tok != NULL);
    if (!tok) return;
    kiln_config c = kiln_config_default();
    c.arch = KILN_ARCH_LLAMA;
    c.n_layer = 2, c.n_embd = 64, c.n_head = 4, c.n_kv_head = 2, c.n_inner = 128;
    c.vocab_size = kiln_tokenizer_vocab_size(tok);
    c.n_ctx = 64, c.norm_eps = 1e-6f, c.rope_theta = 1000000.0f, c.tie_embeddings = true;
    c.bias = false, c.qkv_bias = true, c.hf_type = KILN_HF_TYPE_QWEN2;
    c.bos_token_id = c.eos_token_id = 256;
    kiln_model *m = NULL;
    CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
    if (!m) return;
    kiln_model_init_random(m, 21);
    float *p = kiln_model_params_mut(m);
    for (int i = 0; i < kiln_model_num_tensors(m); i++) {
        const kiln_tensor_info *t = kiln_model_tensor(m, i);
        if (t->ndim == 1)
            for (size_t k = 0; k < t->numel; k++) p[t->offset + k] = 0.5f + 0.01f * (float)(k % 37);
    }
    for (int legacy = 0; legacy < 2; legacy++) {
        m->gguf_llama_qk = legacy; /* as if read from a "llama" file */
        kiln_gguf_export_opts o = kiln_gguf_export_opts_default();
        CHECK_EQ(kiln_gguf_export(ctx, m, tok, path("q2.gguf"), &o, NULL), KILN_OK);
        gguf_file f;
        CHECK_EQ(gguf_open(ctx, path("q2.gguf"), &f), KILN_OK);
        const char *s;
        size_t sl;
        CHECK_EQ(gguf_get_str(ctx, &f, "t", "general.architecture", true, &s, &sl), KILN_OK);
        CHECK(sl == 5 && !memcmp(s, legacy ? "llama" : "qwen2", sl));
        int64_t hc = 0;
        CHECK_EQ(gguf_get_int(ctx, &f, "t", legacy ? "llama.attention.head_count_kv"
                                                   : "qwen2.attention.head_count_kv", true, &hc),
                 KILN_OK);
        CHECK_EQ(hc, 2);
        CHECK(gguf_find_tensor(&f, "blk.1.attn_v.bias") != NULL);
        CHECK(gguf_find_tensor(&f, "blk.1.attn_output.bias") == NULL);
        CHECK(gguf_find_tensor(&f, "output.weight") == NULL);
        /* q rows and bias: HF's order in qwen2, permuted (HS 16) in llama */
        const gguf_tensor *q = gguf_find_tensor(&f, "blk.0.attn_q.weight");
        const gguf_tensor *qb = gguf_find_tensor(&f, "blk.0.attn_q.bias");
        int qi = kiln_model_find_tensor(m, "model.layers.0.self_attn.q_proj.weight");
        int bi = kiln_model_find_tensor(m, "model.layers.0.self_attn.q_proj.bias");
        CHECK(q && qb && qi >= 0 && bi >= 0 && q->ne[0] == 64 && q->ne[1] == 64 && qb->ne[0] == 64);
        if (q && qb && qi >= 0 && bi >= 0) {
            const float *w = kiln_model_params(m) + kiln_model_tensor(m, qi)->offset;
            const float *b = kiln_model_params(m) + kiln_model_tensor(m, bi)->offset;
            const float *g = (const float *)q->data, *gb = (const float *)qb->data;
            for (int r = 0; r < 64; r++) {
                int src = legacy ? (int)model_gguf_perm_src(r, 16) : r;
                CHECK(!memcmp(g + r * 64, w + src * 64, 64 * sizeof(float)));
                CHECK(gb[r] == b[src]);
            }
            CHECK(legacy || gb[1] != b[8]); /* the permuted order would differ */
        }
        gguf_close(&f);
        kiln_model *r = NULL;
        CHECK_EQ(kiln_model_load(ctx, path("q2.gguf"), &r), KILN_OK);
        if (r) {
            const kiln_config *b = kiln_model_config(r);
            CHECK(b->qkv_bias && !b->bias && b->hf_type == KILN_HF_TYPE_QWEN2 && b->tie_embeddings);
            CHECK(b->rope_theta == c.rope_theta && b->n_kv_head == 2 && b->n_inner == 128);
            CHECK_EQ(r->gguf_llama_qk, legacy);
            CHECK_EQ(kiln_model_num_params(m), kiln_model_num_params(r));
            CHECK(!memcmp(kiln_model_params(m), kiln_model_params(r),
                          kiln_model_num_params(m) * sizeof(float)));
        }
        kiln_model_free(r);
    }
    kiln_model_free(m);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

static void test_round_trip_gpt2_bytes(void) { round_trip(KILN_ARCH_GPT2, true, NULL); }
static void test_round_trip_gpt2_bpe(void) { round_trip(KILN_ARCH_GPT2, false, "gpt2"); }
static void test_round_trip_llama_bpe(void) { round_trip(KILN_ARCH_LLAMA, false, "llama3"); }
static void test_round_trip_llama_tied(void) { round_trip(KILN_ARCH_LLAMA, true, "gpt2"); }

/* Every quantized tensor equals the reference quantizer of the GGUF-layout
 * fp32 weights, and the loaded model equals the reference dequantization
 * of those blocks put back in kiln's layout. */
static void quantized(const char *preset, kiln_arch arch)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok = NULL;
    kiln_tokenizer_load(ctx, "bytes", &tok);
    kiln_model *m = make_model(ctx, arch, 256, 257, arch == KILN_ARCH_GPT2);
    CHECK(m && tok);
    if (!m || !tok) return;
    kiln_gguf_export_opts o = kiln_gguf_export_opts_default();
    o.type = preset;
    kiln_gguf_export_stats st;
    CHECK_EQ(kiln_gguf_export(ctx, m, tok, path("q.gguf"), &o, &st), KILN_OK);
    kiln_model *r = NULL;
    CHECK_EQ(kiln_model_load(ctx, path("q.gguf"), &r), KILN_OK);
    gguf_file f;
    CHECK_EQ(gguf_open(ctx, path("q.gguf"), &f), KILN_OK);
    int n = model_gguf_tensors(m, NULL);
    model_gguf_tensor *map = calloc((size_t)n, sizeof *map);
    model_gguf_tensors(m, map);
    CHECK_EQ(n, st.n_tensors);
    uint64_t bytes = 0;
    for (int i = 0; i < n && r; i++) {
        const gguf_tensor *g = gguf_find_tensor(&f, map[i].name);
        CHECK(g != NULL);
        if (!g) continue;
        CHECK_EQ((int)g->type, (int)st.tensors[i].dtype);
        bytes += g->bytes;
        size_t numel = (size_t)(map[i].ne[0] * map[i].ne[1]);
        float *x = malloc(numel * sizeof(float)), *y = malloc(numel * sizeof(float));
        unsigned char *q = malloc(g->bytes);
        const dtype_traits *tr = dtype_traits_of(g->type);
        model_gguf_get(m, &map[i], x);
        size_t row = dtype_row_bytes(g->type, map[i].ne[0]);
        for (int64_t k = 0; k < map[i].ne[1]; k++) tr->from_float(x + k * map[i].ne[0], q + k * row, map[i].ne[0]);
        CHECK_MSG(!memcmp(q, g->data, g->bytes), "%s %s: bytes differ from the reference quantizer",
                  preset, map[i].name);
        for (int64_t k = 0; k < map[i].ne[1]; k++) tr->to_float(g->data + k * row, y + k * map[i].ne[0], map[i].ne[0]);
        model_gguf_get(r, &map[i], x);
        CHECK_MSG(!memcmp(x, y, numel * sizeof(float)), "%s %s: loaded weights differ from the "
                  "reference dequantization", preset, map[i].name);
        free(x);
        free(y);
        free(q);
    }
    CHECK_EQ(bytes, st.bytes_after);
    /* the recipe */
    for (int i = 0; i < n; i++) {
        const kiln_gguf_tensor_summary *t = &st.tensors[i];
        if (t->ne[1] == 1) CHECK_EQ((int)t->dtype, (int)KILN_DTYPE_F32);
    }
    /* llama.cpp's rule for the output matrix (the tied embedding): Q6_K for
     * every quantized type but Q8_0 */
    const gguf_tensor *out = gguf_find_tensor(&f, arch == KILN_ARCH_GPT2 ? "token_embd.weight" : "output.weight");
    if (!strcmp(preset, "q8_0")) CHECK(out && out->type == KILN_DTYPE_Q8_0);
    if (!strcmp(preset, "q4_0") || !strcmp(preset, "q6_k") || !strcmp(preset, "q4_k_m"))
        CHECK(out && out->type == KILN_DTYPE_Q6_K);
    if (!strcmp(preset, "q4_0")) {
        const gguf_tensor *t = gguf_find_tensor(&f, "blk.1.attn_qkv.weight");
        CHECK(t && t->type == KILN_DTYPE_Q4_0);
    }
    if (!strcmp(preset, "q4_k_m")) {
        const gguf_tensor *t;
        /* tied gpt2: token_embd is the output -> q6_K; attn_qkv -> q6_K */
        if (arch == KILN_ARCH_GPT2) {
            CHECK((t = gguf_find_tensor(&f, "token_embd.weight")) && t->type == KILN_DTYPE_Q6_K);
            CHECK((t = gguf_find_tensor(&f, "blk.0.attn_qkv.weight")) && t->type == KILN_DTYPE_Q6_K);
            CHECK((t = gguf_find_tensor(&f, "blk.0.attn_output.weight")) && t->type == KILN_DTYPE_Q4_K);
            CHECK((t = gguf_find_tensor(&f, "position_embd.weight")) && t->type == KILN_DTYPE_F32);
            /* ffn_down rows are F = 1024 long; use_more_bits(i, 2): i < 0 || i >= 1 || ... */
            CHECK((t = gguf_find_tensor(&f, "blk.0.ffn_down.weight")) && t->type == KILN_DTYPE_Q4_K);
            CHECK((t = gguf_find_tensor(&f, "blk.1.ffn_down.weight")) && t->type == KILN_DTYPE_Q6_K);
        } else {
            CHECK((t = gguf_find_tensor(&f, "output.weight")) && t->type == KILN_DTYPE_Q6_K);
            CHECK((t = gguf_find_tensor(&f, "token_embd.weight")) && t->type == KILN_DTYPE_Q4_K);
            CHECK((t = gguf_find_tensor(&f, "blk.0.attn_v.weight")) && t->type == KILN_DTYPE_Q4_K);
            CHECK((t = gguf_find_tensor(&f, "blk.1.attn_v.weight")) && t->type == KILN_DTYPE_Q6_K);
            CHECK((t = gguf_find_tensor(&f, "blk.1.ffn_gate.weight")) && t->type == KILN_DTYPE_Q4_K);
        }
        int64_t ft = 0;
        CHECK_EQ(gguf_get_int(ctx, &f, "q", "general.file_type", true, &ft), KILN_OK);
        CHECK_EQ(ft, 15);
    }
    free(map);
    gguf_close(&f);
    kiln_gguf_export_stats_free(&st);
    kiln_model_free(m);
    kiln_model_free(r);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

static void test_q8_0(void) { quantized("q8_0", KILN_ARCH_LLAMA); }
static void test_q4_0(void) { quantized("q4_0", KILN_ARCH_GPT2); }
static void test_q6_k(void) { quantized("q6_k", KILN_ARCH_LLAMA); }
static void test_q4_k_m_llama(void) { quantized("q4_k_m", KILN_ARCH_LLAMA); }
static void test_q4_k_m_gpt2(void) { quantized("q4_k_m", KILN_ARCH_GPT2); }
static void test_f16_bf16(void)
{
    quantized("f16", KILN_ARCH_LLAMA);
    quantized("bf16", KILN_ARCH_GPT2);
}

/* A model vocabulary larger than the tokenizer's: placeholder tokens of
 * type unused fill the rows, llama.cpp's one token per row. */
static void test_padded_vocab(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok = NULL, *rt = NULL;
    kiln_tokenizer_load(ctx, "bytes", &tok);
    kiln_model *m = make_model(ctx, KILN_ARCH_GPT2, 64, 300, true), *r = NULL;
    CHECK_EQ(kiln_gguf_export(ctx, m, tok, path("pad.gguf"), NULL, NULL), KILN_OK);
    gguf_file f;
    CHECK_EQ(gguf_open(ctx, path("pad.gguf"), &f), KILN_OK);
    const gguf_kv *tk = NULL, *tt = NULL;
    CHECK_EQ(gguf_get_arr(ctx, &f, "p", "tokenizer.ggml.tokens", true, GGUF_TYPE_STRING, &tk), KILN_OK);
    CHECK_EQ(gguf_get_arr(ctx, &f, "p", "tokenizer.ggml.token_type", true, GGUF_TYPE_INT64, &tt), KILN_OK);
    CHECK(tk && tk->n == 300 && tt && tt->n == 300);
    if (tt && tt->n == 300)
        CHECK(gguf_arr_int(tt, 255) == 1 && gguf_arr_int(tt, 256) == 3 && gguf_arr_int(tt, 257) == 5 &&
              gguf_arr_int(tt, 299) == 5);
    gguf_close(&f);
    CHECK_EQ(kiln_model_load(ctx, path("pad.gguf"), &r), KILN_OK);
    CHECK_EQ(kiln_tokenizer_load(ctx, path("pad.gguf"), &rt), KILN_OK);
    if (rt) {
        CHECK_EQ(kiln_tokenizer_vocab_size(rt), 300);
        CHECK_EQ(kiln_tokenizer_eot(rt), 256);
        int32_t *ids = NULL;
        size_t n = 0;
        CHECK_EQ(kiln_tokenizer_encode(ctx, rt, "hi", 2, &ids, &n), KILN_OK);
        CHECK(n == 2 && ids[0] == 'h' && ids[1] == 'i');
        free(ids);
    }
    /* a tokenizer larger than the model: refused, naming both sizes */
    kiln_model *small = make_model(ctx, KILN_ARCH_GPT2, 64, 200, true);
    CHECK_EQ(kiln_gguf_export(ctx, small, tok, path("small.gguf"), NULL, NULL), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "257 ids") && strstr(kiln_errmsg(ctx), "vocab_size is 200"));
    kiln_model_free(small);
    kiln_model_free(m);
    kiln_model_free(r);
    kiln_tokenizer_free(tok);
    kiln_tokenizer_free(rt);
    kiln_ctx_free(ctx);
}

/* Rows that are not whole blocks fall back (Q4_K -> Q8_0 -> F16). */
static void test_fallback(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok = NULL;
    kiln_tokenizer_load(ctx, "bytes", &tok);
    kiln_model *m = make_model(ctx, KILN_ARCH_LLAMA, 48, 257, false); /* 48: not 256s, not... */
    kiln_gguf_export_opts o = kiln_gguf_export_opts_default();
    o.type = "q4_k_m";
    kiln_gguf_export_stats st;
    CHECK_EQ(kiln_gguf_export(ctx, m, tok, path("fb.gguf"), &o, &st), KILN_OK);
    int fallbacks = 0;
    for (int i = 0; i < st.n_tensors; i++) {
        const kiln_gguf_tensor_summary *t = &st.tensors[i];
        if (t->ne[1] == 1) continue;
        /* rows of 48 fit Q8_0's 32? no: 48 % 32 = 16 -> F16; rows of 96 -> Q8_0 */
        kiln_dtype want = t->ne[0] % 32 ? KILN_DTYPE_F16 : KILN_DTYPE_Q8_0;
        CHECK_MSG(t->dtype == want, "%s: %s", t->name, kiln_dtype_name(t->dtype));
        if (t->dtype != t->wanted) fallbacks++;
    }
    CHECK(fallbacks > 0);
    kiln_model *r = NULL;
    CHECK_EQ(kiln_model_load(ctx, path("fb.gguf"), &r), KILN_OK);
    kiln_gguf_export_stats_free(&st);
    kiln_model_free(m);
    kiln_model_free(r);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

/* ---- hostile files -------------------------------------------------------- */

typedef struct bb {
    unsigned char b[8192];
    size_t n;
} bb;

static void b_u32(bb *b, uint32_t v)
{
    for (int i = 0; i < 4; i++) b->b[b->n++] = (unsigned char)(v >> (8 * i));
}
static void b_u64(bb *b, uint64_t v)
{
    for (int i = 0; i < 8; i++) b->b[b->n++] = (unsigned char)(v >> (8 * i));
}
static void b_str(bb *b, const char *s)
{
    b_u64(b, strlen(s));
    memcpy(b->b + b->n, s, strlen(s));
    b->n += strlen(s);
}

/* What a hand-built file varies; zero fields mean "the valid value". */
typedef struct spec {
    const char *magic;
    uint32_t version;
    uint64_t n_tensors, n_kv; /* overrides of the counts */
    uint64_t keylen;          /* override of the first key's length */
    uint64_t arr_n;           /* override of the array's count */
    uint32_t arr_type;        /* element type of the array [int32] */
    uint32_t align;           /* general.alignment [32] */
    const char *key2;         /* second key's name ["b.arr"] */
    const char *name2;        /* second tensor's name ["t1"] */
    uint32_t type2;           /* second tensor's type [f32] (+1: 0 means f32) */
    uint32_t ndim2;
    uint64_t ne2[2];          /* second tensor's shape [8, 1] */
    uint64_t off2;            /* second tensor's offset [32] (+1) */
    size_t cut;               /* truncate to this many bytes */
} spec;

/* Two keys (general.alignment, an int32 array of 3) and two F32 tensors:
 * t0 (8) at offset 0 and t1 (8) at offset 32. */
static size_t build(const spec *sp, unsigned char *out)
{
    bb b = {.n = 0};
    memcpy(b.b, sp->magic ? sp->magic : "GGUF", 4);
    b.n = 4;
    b_u32(&b, sp->version ? sp->version : 3);
    b_u64(&b, sp->n_tensors ? sp->n_tensors : 2);
    b_u64(&b, sp->n_kv ? sp->n_kv : 2);
    if (sp->keylen) b_u64(&b, sp->keylen), memcpy(b.b + b.n, "general.alignment", 17), b.n += 17;
    else b_str(&b, "general.alignment");
    b_u32(&b, GGUF_TYPE_UINT32);
    b_u32(&b, sp->align ? sp->align : 32);
    b_str(&b, sp->key2 ? sp->key2 : "b.arr");
    b_u32(&b, GGUF_TYPE_ARRAY);
    b_u32(&b, sp->arr_type ? sp->arr_type : GGUF_TYPE_INT32);
    b_u64(&b, sp->arr_n ? sp->arr_n : 3);
    for (int i = 0; i < 3; i++) b_u32(&b, (uint32_t)i);
    b_str(&b, "t0");
    b_u32(&b, 1);
    b_u64(&b, 8);
    b_u32(&b, KILN_DTYPE_F32);
    b_u64(&b, 0);
    b_str(&b, sp->name2 ? sp->name2 : "t1");
    uint32_t nd = sp->ndim2 ? sp->ndim2 : 2;
    b_u32(&b, nd);
    for (uint32_t d = 0; d < nd; d++) b_u64(&b, d < 2 && sp->ne2[d] ? sp->ne2[d] : d == 0 ? 8 : 1);
    b_u32(&b, sp->type2 ? sp->type2 - 1 : KILN_DTYPE_F32);
    b_u64(&b, sp->off2 ? sp->off2 - 1 : 32);
    while (b.n % (sp->align ? sp->align : 32)) b.b[b.n++] = 0;
    for (int i = 0; i < 128; i++) b.b[b.n++] = (unsigned char)i;
    size_t n = sp->cut ? sp->cut : b.n;
    memcpy(out, b.b, n);
    return n;
}

static void refused(const spec *sp, const char *msg)
{
    kiln_ctx *ctx = kiln_ctx_new();
    unsigned char buf[8192];
    size_t n = build(sp, buf);
    gguf_file f;
    kiln_status s = gguf_parse(ctx, buf, n, "h.gguf", &f);
    CHECK_MSG(s == KILN_ERR_FORMAT && strstr(kiln_errmsg(ctx), msg),
              "status %d, message \"%s\", expected one with \"%s\"", (int)s, kiln_errmsg(ctx), msg);
    if (!s) gguf_close(&f);
    kiln_ctx_free(ctx);
}

static void test_hostile(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    unsigned char buf[8192];
    spec ok = {0};
    size_t n = build(&ok, buf);
    gguf_file f;
    CHECK_EQ(gguf_parse(ctx, buf, n, "ok.gguf", &f), KILN_OK);
    CHECK(f.n_tensors == 2 && f.tensors[1].data[0] == 32);
    gguf_close(&f);
    /* general.alignment 64 moves the data section: the header ends at 196
     * bytes, so the data start at 256, not at 224 */
    spec a64 = {.align = 64, .off2 = 64 + 1, .key2 = "b.arr.with.a.longer.name.xx"};
    unsigned char buf64[8192];
    size_t n64 = build(&a64, buf64);
    CHECK_EQ(gguf_parse(ctx, buf64, n64, "a64.gguf", &f), KILN_OK);
    CHECK(f.n_tensors == 2 && f.alignment == 64 && f.data == buf64 + 256);
    CHECK(f.n_tensors == 2 && f.tensors[0].data[1] == 1 && f.tensors[1].data[0] == 64);
    if (f.n_tensors) gguf_close(&f);
    /* every truncation is refused (ASan: no read past the end) */
    for (size_t cut = 0; cut < n - 64; cut++) { /* the last 64 bytes: no tensor's */
        unsigned char *c = malloc(cut + 1);
        memcpy(c, buf, cut);
        kiln_status s = gguf_parse(ctx, c, cut, "cut.gguf", &f);
        CHECK_MSG(s == KILN_ERR_FORMAT, "truncated to %zu bytes: status %d", cut, (int)s);
        free(c);
    }
    kiln_ctx_free(ctx);
    refused(&(spec){.magic = "GGUG"}, "not a GGUF file");
    refused(&(spec){.version = 1}, "GGUF version 1 is not supported");
    refused(&(spec){.version = 4}, "GGUF version 4 is not supported");
    refused(&(spec){.n_tensors = 1ull << 60}, "more than its");
    refused(&(spec){.n_kv = 1ull << 62}, "more than its");
    refused(&(spec){.keylen = 1ull << 62}, "runs past the end");
    refused(&(spec){.arr_n = 1ull << 61}, "does not fit in the");
    refused(&(spec){.arr_n = 1000}, "does not fit in the");
    /* fits as a count of bytes, not as a count of int32s */
    refused(&(spec){.arr_n = 100}, "does not fit in the");
    refused(&(spec){.arr_type = GGUF_TYPE_ARRAY}, "nested arrays");
    refused(&(spec){.arr_type = 77}, "array element type 77");
    refused(&(spec){.align = 24}, "\"general.alignment\" = 24 is not a power of two");
    refused(&(spec){.key2 = "general.alignment"}, "key \"general.alignment\" appears twice");
    refused(&(spec){.name2 = "t0"}, "tensor \"t0\" appears twice");
    refused(&(spec){.type2 = 99 + 1}, "tensor \"t1\" has ggml type 99");
    refused(&(spec){.type2 = 1000 + 1}, "ggml type 1000");
    refused(&(spec){.type2 = KILN_DTYPE_Q8_0 + 1, .ne2 = {33, 1}}, "row length 33 is not a multiple");
    refused(&(spec){.ndim2 = 5}, "5 dimensions");
    refused(&(spec){.ne2 = {1ull << 40, 1ull << 40}}, "overflows");
    refused(&(spec){.off2 = 4 + 1}, "offset 4 is not a multiple of the alignment 32");
    refused(&(spec){.off2 = 0 + 1}, "overlaps tensor");
    refused(&(spec){.off2 = 128 + 1}, "lie outside");
    refused(&(spec){.off2 = (1ull << 63) + 1}, "lie outside");
    refused(&(spec){.ne2 = {8, 4}}, "lie outside");
    refused(&(spec){.cut = 24 + 8}, "truncated");
    refused(&(spec){.cut = 24 + 8 + 17 + 4 + 4 + 60}, "truncated");
}

/* Model-level refusals name the key or tensor. */
static kiln_status fill_zero(kiln_ctx *ctx, void *ud, int i, void *dst, size_t bytes)
{
    (void)ctx;
    (void)ud;
    (void)i;
    memset(dst, 0, bytes);
    return KILN_OK;
}

/* A llama GGUF of m's tensors (all F32, tensor `odd` as type odd_type)
 * with the hparams minus key `drop` and architecture `arch`. */
static void write_model(kiln_model *m, const char *p, const char *arch, const char *drop,
                        int odd, kiln_dtype odd_type, const char *tok_model)
{
    kiln_ctx *ctx = kiln_ctx_new();
    gguf_writer w;
    gguf_writer_init(&w);
    gguf_w_str(&w, "general.architecture", arch);
    gguf_w_str(&w, "tokenizer.ggml.model", tok_model);
    const kiln_config *c = kiln_model_config(m);
    struct { const char *k; uint32_t v; } keys[] = {
        {"llama.context_length", (uint32_t)c->n_ctx}, {"llama.embedding_length", (uint32_t)c->n_embd},
        {"llama.block_count", (uint32_t)c->n_layer}, {"llama.feed_forward_length", (uint32_t)c->n_inner},
        {"llama.attention.head_count", (uint32_t)c->n_head},
        {"llama.attention.head_count_kv", (uint32_t)c->n_kv_head},
    };
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
        if (!drop || strcmp(drop, keys[i].k)) gguf_w_u32(&w, keys[i].k, keys[i].v);
    gguf_w_f32(&w, "llama.attention.layer_norm_rms_epsilon", 1e-6f);
    int n = model_gguf_tensors(m, NULL);
    model_gguf_tensor *map = calloc((size_t)n, sizeof *map);
    model_gguf_tensors(m, map);
    for (int i = 0; i < n; i++) {
        int64_t ne[2] = {map[i].ne[0], map[i].ne[1]};
        gguf_w_tensor(ctx, &w, map[i].name, i == odd ? odd_type : KILN_DTYPE_F32, map[i].ndim, ne);
    }
    CHECK_EQ(gguf_write(ctx, &w, p, fill_zero, NULL), KILN_OK);
    gguf_writer_free(&w);
    free(map);
    kiln_ctx_free(ctx);
}

static void test_model_refusals(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_model *m = make_model(ctx, KILN_ARCH_LLAMA, 256, 257, true), *r = NULL;
    kiln_tokenizer *t = NULL;
    write_model(m, path("ok.gguf"), "llama", NULL, -1, KILN_DTYPE_F32, "gpt2");
    CHECK_MSG(kiln_model_load(ctx, path("ok.gguf"), &r) == KILN_OK, "%s", kiln_errmsg(ctx));
    kiln_model_free(r);
    write_model(m, path("a.gguf"), "falcon", NULL, -1, KILN_DTYPE_F32, "gpt2");
    CHECK_EQ(kiln_model_load(ctx, path("a.gguf"), &r), KILN_ERR_UNSUPPORTED);
    CHECK(strstr(kiln_errmsg(ctx), "\"general.architecture\" = \"falcon\" is not supported"));
    write_model(m, path("b.gguf"), "llama", "llama.block_count", -1, KILN_DTYPE_F32, "gpt2");
    CHECK_EQ(kiln_model_load(ctx, path("b.gguf"), &r), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "\"llama.block_count\" is missing"));
    write_model(m, path("c.gguf"), "llama", NULL, 3, KILN_DTYPE_Q5_K, "gpt2");
    CHECK_EQ(kiln_model_load(ctx, path("c.gguf"), &r), KILN_ERR_UNSUPPORTED);
    CHECK(strstr(kiln_errmsg(ctx), "has type q5_K, which kiln cannot dequantize"));
    CHECK_EQ(kiln_tokenizer_load(ctx, path("c.gguf"), &t), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "\"tokenizer.ggml.tokens\" is missing"));
    write_model(m, path("d.gguf"), "llama", NULL, -1, KILN_DTYPE_F32, "llama");
    CHECK_EQ(kiln_tokenizer_load(ctx, path("d.gguf"), &t), KILN_ERR_UNSUPPORTED);
    CHECK(strstr(kiln_errmsg(ctx), "\"tokenizer.ggml.model\" = \"llama\" is not supported"));
    /* a file cut short: the reader says so, naming the file */
    size_t len = 0;
    unsigned char *b = slurp(path("ok.gguf"), &len);
    FILE *fp = fopen(path("cut.gguf"), "wb");
    if (b && len > 100) fwrite(b, 1, len - 100, fp);
    fclose(fp);
    free(b);
    CHECK_EQ(kiln_model_load(ctx, path("cut.gguf"), &r), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "cut.gguf") && strstr(kiln_errmsg(ctx), "truncated"));
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* A Llama-3-style template: bos_token first, headers, trimmed content. */
#define L3_TMPL                                                                             \
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] " \
    "+ '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"     \
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}" \
    "{% endif %}"

/* Writes tok as a GGUF file of tokenizer keys only (bos id `bos`). */
static void write_tok(kiln_ctx *ctx, const kiln_tokenizer *tok, const char *p, int32_t bos)
{
    gguf_writer w;
    gguf_writer_init(&w);
    tok_gguf_ids ids = {.bos = bos, .eos = -1, .pad = -1};
    CHECK_EQ(tok_gguf_write(ctx, tok, &w, &ids), KILN_OK);
    CHECK_EQ(gguf_write(ctx, &w, p, fill_zero, NULL), KILN_OK);
    gguf_writer_free(&w);
}

/* GGUF tokenizer.chat_template: written from the tokenizer's own template,
 * read back as the template kiln_chat_render uses, with bos_token the
 * text of tokenizer.ggml.bos_token_id; a template kiln cannot parse is
 * refused naming the key. */
static void test_chat_template(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok = NULL, *back = NULL;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &tok), KILN_OK);
    if (!tok) return;
    CHECK_EQ(kiln_tokenizer_set_chat_template(ctx, tok, L3_TMPL, "<|endoftext|>", "<|eot_id|>"),
             KILN_OK);
    write_tok(ctx, tok, path("tmpl.gguf"), 256);
    CHECK_MSG(kiln_tokenizer_load(ctx, path("tmpl.gguf"), &back) == KILN_OK, "%s",
              kiln_errmsg(ctx));
    if (back) {
        const char *src = kiln_tokenizer_chat_template(back);
        CHECK(src && !strcmp(src, L3_TMPL));
        kiln_chat_msg msgs[] = {{"system", " Be brief. ", 0}, {"user", "hi", 0}};
        int32_t *ids = NULL;
        size_t n = 0;
        CHECK_EQ(kiln_chat_render(ctx, back, msgs, 2, true, &ids, NULL, &n), KILN_OK);
        /* by hand: the bos id, then the text as bytes (the bytes
         * vocabulary has no header specials) */
        const char *text = "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                           "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n";
        size_t tl = strlen(text);
        CHECK_EQ(n, tl + 1);
        if (n == tl + 1) {
            CHECK_EQ(ids[0], 256);
            bool same = true;
            for (size_t i = 0; i < tl; i++) same = same && ids[1 + i] == (unsigned char)text[i];
            CHECK(same);
        }
        free(ids);
        kiln_tokenizer_free(back);
        back = NULL;
    }
    /* no template of its own, no ChatML specials: none written or read */
    CHECK_EQ(kiln_tokenizer_set_chat_template(ctx, tok, NULL, NULL, NULL), KILN_OK);
    write_tok(ctx, tok, path("notmpl.gguf"), -1);
    CHECK_EQ(kiln_tokenizer_load(ctx, path("notmpl.gguf"), &back), KILN_OK);
    if (back) CHECK(kiln_tokenizer_chat_template(back) == NULL);
    kiln_tokenizer_free(back);
    back = NULL;
    /* a template that does not parse */
    CHECK_EQ(kiln_tokenizer_set_chat_template(ctx, tok, "{{ ok }}", NULL, NULL), KILN_OK);
    write_tok(ctx, tok, path("bad.gguf"), -1);
    size_t len = 0;
    unsigned char *b = slurp(path("bad.gguf"), &len);
    unsigned char *at = b ? memmem(b, len, "{{ ok }}", 8) : NULL;
    CHECK(at != NULL);
    if (at) {
        memcpy(at, "{% if x", 7);
        FILE *fp = fopen(path("bad.gguf"), "wb");
        fwrite(b, 1, len, fp);
        fclose(fp);
        CHECK_EQ(kiln_tokenizer_load(ctx, path("bad.gguf"), &back), KILN_ERR_FORMAT);
        CHECK(back == NULL);
        CHECK(strstr(kiln_errmsg(ctx), "tokenizer.chat_template") != NULL);
    }
    free(b);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

int main(void)
{
    snprintf(dir, sizeof dir, "/tmp/kiln_test_gguf_%d", (int)getpid());
    char cmd[128];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", dir);
    if (system(cmd)) return 1;
    RUN_TEST(test_metadata_round_trip);
    RUN_TEST(test_round_trip_gpt2_bytes);
    RUN_TEST(test_round_trip_gpt2_bpe);
    RUN_TEST(test_round_trip_llama_bpe);
    RUN_TEST(test_round_trip_llama_tied);
    RUN_TEST(test_round_trip_qwen2);
    RUN_TEST(test_q8_0);
    RUN_TEST(test_q4_0);
    RUN_TEST(test_q6_k);
    RUN_TEST(test_q4_k_m_llama);
    RUN_TEST(test_q4_k_m_gpt2);
    RUN_TEST(test_f16_bf16);
    RUN_TEST(test_fallback);
    RUN_TEST(test_padded_vocab);
    RUN_TEST(test_hostile);
    RUN_TEST(test_model_refusals);
    RUN_TEST(test_chat_template);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd)) return 1;
    return TEST_EXIT();
}
