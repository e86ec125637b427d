/*
 * gguf_export.c — a kiln model and its tokenizer as one GGUF file that
 * llama.cpp runs (`kiln export --format gguf`, `kiln quantize`): the
 * general.* keys, the hyper-parameters (model/gguf_model.c), the tokenizer
 * (tokenizer/tok_gguf.c), and every tensor in the type a preset picks.
 *
 * Presets (kiln_gguf_export_opts.type) and llama.cpp's recipe they follow
 * (src/llama-quant.cpp, llama_tensor_get_type):
 *   f32 f16 bf16   every matrix in that type
 *   q8_0 q4_0 q6_k every matrix in that type, position embeddings F32;
 *                  with q4_0 (and q6_k) the output matrix is Q6_K, as
 *                  llama.cpp does for every type but Q8_0
 *   q4_k_m         Q4_K; Q6_K for the output matrix (the token embedding
 *                  when the embeddings are tied), for attn_v and ffn_down
 *                  of the layers use_more_bits picks (the first and last
 *                  eighth and every third between), and for gpt2's fused
 *                  attn_qkv (llama.cpp uses Q5_K there, which kiln cannot
 *                  write yet: more bits, never fewer)
 * 1-D tensors (norms, biases) stay F32. A matrix whose rows are not a
 * whole number of the chosen type's blocks falls back as llama.cpp does,
 * to types kiln has: Q4_K and Q6_K to Q8_0 (llama.cpp: Q5_0 / Q8_0), then
 * a 32-block type whose rows do not fit to F16. The summary lists it.
 */
#include "model/model.h"
#include "tokenizer/tok_gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct preset {
    const char *name;
    kiln_dtype base;
    uint32_t file_type; /* llama_ftype */
} preset;

static const preset presets[] = {
    {"f32", KILN_DTYPE_F32, 0},     {"f16", KILN_DTYPE_F16, 1},
    {"bf16", KILN_DTYPE_BF16, 32},  {"q8_0", KILN_DTYPE_Q8_0, 7},
    {"q4_0", KILN_DTYPE_Q4_0, 2},   {"q4_k_m", KILN_DTYPE_Q4_K, 15},
    {"q6_k", KILN_DTYPE_Q6_K, 18},  {NULL, KILN_DTYPE_F32, 0},
};

kiln_gguf_export_opts kiln_gguf_export_opts_default(void)
{
    return (kiln_gguf_export_opts){.type = "f32", .name = NULL};
}

static bool use_more_bits(int i, int n)
{
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

/* The fallback for a type whose block does not divide the row length. */
static kiln_dtype fallback(kiln_dtype t, int64_t ncols)
{
    if (t == KILN_DTYPE_Q4_K || t == KILN_DTYPE_Q6_K) t = KILN_DTYPE_Q8_0;
    if (ncols % dtype_traits_of(t)->block) t = KILN_DTYPE_F16;
    return t;
}

/* Chooses tensor t's type under preset p; *wanted is the recipe's choice
 * before any fallback. */
static kiln_dtype pick(const preset *p, const kiln_model *m, const model_gguf_tensor *t,
                       int *i_wv, kiln_dtype *wanted)
{
    kiln_dtype ty = p->base;
    bool quant = dtype_traits_of(p->base)->quantized;
    if (t->ndim == 1) ty = KILN_DTYPE_F32;
    else if (quant && !strcmp(t->name, "position_embd.weight")) ty = KILN_DTYPE_F32;
    else if (quant) {
        bool output = !strcmp(t->name, "output.weight") ||
                      (m->cfg.tie_embeddings && !strcmp(t->name, "token_embd.weight"));
        if (output) {
            /* llama.cpp: the output matrix Q6_K (Q8_0 when its rows are not
             * 256s) for every preset but Q8_0 */
            if (p->base != KILN_DTYPE_Q8_0) ty = t->ne[0] % 256 ? KILN_DTYPE_Q8_0 : KILN_DTYPE_Q6_K;
        } else if (p->base != KILN_DTYPE_Q4_K) {
            /* q8_0, q4_0, q6_k: one type for the other matrices */
        } else if (strstr(t->name, "attn_v.weight")) {
            if (use_more_bits((*i_wv)++, m->L)) ty = KILN_DTYPE_Q6_K;
        } else if (strstr(t->name, "attn_qkv.weight")) {
            ty = KILN_DTYPE_Q6_K;
        } else if (strstr(t->name, "ffn_down.weight")) {
            if (use_more_bits(t->layer, m->L)) ty = KILN_DTYPE_Q6_K;
        }
    }
    *wanted = ty;
    if (t->ne[0] % dtype_traits_of(ty)->block) ty = fallback(ty, t->ne[0]);
    return ty;
}

static const preset *find_preset(const char *name)
{
    for (const preset *p = presets; p->name; p++)
        if (!strcmp(p->name, name)) return p;
    return NULL;
}

typedef struct fill_state {
    const kiln_model *m;
    const model_gguf_tensor *map;
    const kiln_dtype *types;
    float *tmp; /* the largest tensor, fp32 */
    const kiln_gguf_export_opts *o;
    int n;
} fill_state;

/* gguf_fill_fn: tensor i in the GGUF layout, converted row by row with
 * the reference quantizer of its type. */
static kiln_status fill(kiln_ctx *ctx, void *ud, int i, void *dst, size_t bytes)
{
    fill_state *fs = ud;
    const model_gguf_tensor *t = &fs->map[i];
    (void)ctx;
    if (fs->o->progress) fs->o->progress(fs->o->progress_ud, i, fs->n, t->name);
    model_gguf_get(fs->m, t, fs->tmp);
    const dtype_traits *tr = dtype_traits_of(fs->types[i]);
    int64_t K = t->ne[0], R = t->ne[1];
    size_t row = dtype_row_bytes(fs->types[i], K);
    KILN_ASSERT(row * (size_t)R == bytes);
    const float *src = fs->tmp;
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t r = 0; r < R; r++)
        tr->from_float(src + r * K, (unsigned char *)dst + (size_t)r * row, K);
    return KILN_OK;
}

kiln_status kiln_gguf_export(kiln_ctx *ctx, const kiln_model *m, const kiln_tokenizer *tok,
                             const char *path, const kiln_gguf_export_opts *o,
                             kiln_gguf_export_stats *stats)
{
    if (stats) memset(stats, 0, sizeof *stats);
    kiln_gguf_export_opts def = kiln_gguf_export_opts_default();
    if (!o) o = &def;
    const preset *p = find_preset(o->type ? o->type : "f32");
    if (!p)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_gguf_export_opts.type = \"%s\" is not one of f32, f16, bf16, "
                         "q8_0, q4_0, q4_k_m, q6_k", o->type);
    const kiln_config *c = &m->cfg;
    if (c->lora_rank > 0) /* llama.cpp's tensors are the base's */
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "the model has LoRA adapters (a LoRA run's checkpoint): merge them "
                         "first (kiln_model_merge_lora)");
    if (kiln_tokenizer_vocab_size(tok) > c->vocab_size)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "%s: the tokenizer has %d ids but the model's vocab_size is %d",
                         path, kiln_tokenizer_vocab_size(tok), c->vocab_size);
    int n = model_gguf_tensors(m, NULL);
    model_gguf_tensor *map = calloc((size_t)n + 1, sizeof *map);
    kiln_dtype *types = calloc((size_t)n + 1, sizeof *types);
    kiln_gguf_tensor_summary *sum = calloc((size_t)n + 1, sizeof *sum);
    size_t max = 1;
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].numel > max) max = m->tensors[i].numel;
    float *tmp = malloc(max * sizeof(float));
    gguf_writer w;
    gguf_writer_init(&w);
    kiln_status s = KILN_OK;
    if (!map || !types || !sum || !tmp) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!s) {
        model_gguf_tensors(m, map);
        int i_wv = 0;
        for (int i = 0; i < n; i++) {
            kiln_dtype wanted;
            types[i] = pick(p, m, &map[i], &i_wv, &wanted);
            snprintf(sum[i].name, sizeof sum[i].name, "%s", map[i].name);
            sum[i].dtype = types[i];
            sum[i].wanted = wanted;
            sum[i].ne[0] = map[i].ne[0];
            sum[i].ne[1] = map[i].ne[1];
            sum[i].numel = (uint64_t)map[i].ne[0] * (uint64_t)map[i].ne[1];
            sum[i].bytes = dtype_row_bytes(types[i], map[i].ne[0]) * (size_t)map[i].ne[1];
        }
        gguf_w_str(&w, "general.architecture", model_gguf_arch(m));
        gguf_w_str(&w, "general.type", "model");
        gguf_w_str(&w, "general.name", o->name && *o->name ? o->name : "kiln model");
        gguf_w_u32(&w, "general.alignment", GGUF_DEFAULT_ALIGNMENT);
        gguf_w_u32(&w, "general.file_type", p->file_type);
        if (dtype_traits_of(p->base)->quantized) gguf_w_u32(&w, "general.quantization_version", 2);
        model_gguf_write_hparams(&w, m);
        tok_gguf_ids ids = {.bos = c->bos_token_id, .eos = c->eos_token_id, .pad = -1,
                            .add_bos = c->arch == KILN_ARCH_LLAMA && c->bos_token_id >= 0,
                            .n_vocab = c->vocab_size}; /* one token per row */
        s = tok_gguf_write(ctx, tok, &w, &ids);
    }
    for (int i = 0; i < n && !s; i++) {
        int64_t ne[2] = {map[i].ne[0], map[i].ne[1]};
        s = gguf_w_tensor(ctx, &w, map[i].name, types[i], map[i].ndim, ne);
    }
    if (!s) {
        fill_state fs = {.m = m, .map = map, .types = types, .tmp = tmp, .o = o, .n = n};
        s = gguf_write(ctx, &w, path, fill, &fs);
        if (!s && o->progress) o->progress(o->progress_ud, n, n, "");
    }
    if (!s && stats) {
        stats->n_tensors = n;
        stats->tensors = sum;
        sum = NULL;
        stats->params = m->num_params;
        stats->bytes_before = m->num_params * sizeof(float);
        for (int i = 0; i < n; i++) {
            stats->bytes_after += stats->tensors[i].bytes;
            stats->weights += stats->tensors[i].numel;
        }
        FILE *fp = fopen(path, "rb");
        if (fp) {
            fseek(fp, 0, SEEK_END);
            stats->file_bytes = (uint64_t)ftell(fp);
            fclose(fp);
        }
        stats->bits_per_weight =
            stats->weights ? 8.0 * (double)stats->bytes_after / (double)stats->weights : 0;
    }
    gguf_writer_free(&w);
    free(map);
    free(types);
    free(sum);
    free(tmp);
    return s;
}

void kiln_gguf_export_stats_free(kiln_gguf_export_stats *st)
{
    if (!st) return;
    free(st->tensors);
    memset(st, 0, sizeof *st);
}
