/*
 * gguf_model.c — the model's side of GGUF: how kiln's tensors (HF names and
 * layouts) become llama.cpp's (token_embd, blk.N.attn_q, ...) and back, the
 * hyper-parameter keys ({arch}.context_length, ...), and loading a model
 * from a .gguf file (any type the traits table can widen, dequantized to
 * the fp32 parameter block).
 *
 * Layouts (GGUF shapes are ggml's: ne[0] is the row length):
 *   gpt2  Conv1D weights (in, out) are transposed to (out, in) rows, as
 *         llama.cpp's converter does; c_attn stays fused (attn_qkv, rows
 *         q | k | v), ne {C, 3C}.
 *   llama q_proj / k_proj rows (and their biases) are permuted within each
 *         head from HF's rotate-half order to llama.cpp's interleaved RoPE
 *         order: GGUF row h*HS + 2i + j = HF row h*HS + j*HS/2 + i
 *         (convert_hf_to_gguf.py's LlamaModel.permute, with NH for q and
 *         KVH for k). The permutation moves whole rows, so it commutes with
 *         block quantization (whose blocks run along a row).
 *   qwen2 (q/k/v biases without an o bias: Qwen2, Qwen2.5) is llama.cpp's
 *         "qwen2" architecture: llama's tensor names plus attn_q/k/v.bias,
 *         and NEOX rope (rotate-half, HF's order), so no permutation, as
 *         convert_hf_to_gguf.py's Qwen2Model writes it. A "llama" file with
 *         those biases (older kiln wrote qwen2 so) reads as before.
 *   Tied embeddings: no output.weight; llama.cpp then uses token_embd.
 */
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct name_map {
    const char *hf;   /* suffix after "<prefix>.<layer>." */
    const char *gguf; /* suffix after "blk.<layer>." */
    int op;
} name_map;

static const name_map gpt2_layer[] = {
    {"ln_1.weight", "attn_norm.weight", MODEL_GGUF_COPY},
    {"ln_1.bias", "attn_norm.bias", MODEL_GGUF_COPY},
    {"attn.c_attn.weight", "attn_qkv.weight", MODEL_GGUF_TRANSPOSE},
    {"attn.c_attn.bias", "attn_qkv.bias", MODEL_GGUF_COPY},
    {"attn.c_proj.weight", "attn_output.weight", MODEL_GGUF_TRANSPOSE},
    {"attn.c_proj.bias", "attn_output.bias", MODEL_GGUF_COPY},
    {"ln_2.weight", "ffn_norm.weight", MODEL_GGUF_COPY},
    {"ln_2.bias", "ffn_norm.bias", MODEL_GGUF_COPY},
    {"mlp.c_fc.weight", "ffn_up.weight", MODEL_GGUF_TRANSPOSE},
    {"mlp.c_fc.bias", "ffn_up.bias", MODEL_GGUF_COPY},
    {"mlp.c_proj.weight", "ffn_down.weight", MODEL_GGUF_TRANSPOSE},
    {"mlp.c_proj.bias", "ffn_down.bias", MODEL_GGUF_COPY},
    {NULL, NULL, 0},
};

static const name_map llama_layer[] = {
    {"input_layernorm.weight", "attn_norm.weight", MODEL_GGUF_COPY},
    {"self_attn.q_proj.weight", "attn_q.weight", MODEL_GGUF_PERMUTE_Q},
    {"self_attn.k_proj.weight", "attn_k.weight", MODEL_GGUF_PERMUTE_K},
    {"self_attn.v_proj.weight", "attn_v.weight", MODEL_GGUF_COPY},
    {"self_attn.q_proj.bias", "attn_q.bias", MODEL_GGUF_PERMUTE_Q},
    {"self_attn.k_proj.bias", "attn_k.bias", MODEL_GGUF_PERMUTE_K},
    {"self_attn.v_proj.bias", "attn_v.bias", MODEL_GGUF_COPY},
    {"self_attn.o_proj.weight", "attn_output.weight", MODEL_GGUF_COPY},
    {"self_attn.o_proj.bias", "attn_output.bias", MODEL_GGUF_COPY},
    {"post_attention_layernorm.weight", "ffn_norm.weight", MODEL_GGUF_COPY},
    {"mlp.gate_proj.weight", "ffn_gate.weight", MODEL_GGUF_COPY},
    {"mlp.up_proj.weight", "ffn_up.weight", MODEL_GGUF_COPY},
    {"mlp.down_proj.weight", "ffn_down.weight", MODEL_GGUF_COPY},
    {NULL, NULL, 0},
};

static bool is_qwen2(const kiln_model *m)
{
    const kiln_config *c = &m->cfg;
    return c->arch == KILN_ARCH_LLAMA && c->qkv_bias && !c->bias && !m->gguf_llama_qk;
}

/* The GGUF name and op of kiln tensor `name`; false when it has none.
 * neox: q/k rows stay in HF's order (qwen2). */
static bool map_name(const kiln_config *c, bool neox, const char *name, char *out, int *op,
                     int *layer)
{
    bool g = c->arch == KILN_ARCH_GPT2;
    *op = MODEL_GGUF_COPY;
    *layer = -1;
    static const char *const top[][2] = {
        {"transformer.wte.weight", "token_embd.weight"},
        {"transformer.wpe.weight", "position_embd.weight"},
        {"transformer.ln_f.weight", "output_norm.weight"},
        {"transformer.ln_f.bias", "output_norm.bias"},
        {"model.embed_tokens.weight", "token_embd.weight"},
        {"model.norm.weight", "output_norm.weight"},
        {"lm_head.weight", "output.weight"},
    };
    for (size_t i = 0; i < sizeof top / sizeof top[0]; i++)
        if (!strcmp(name, top[i][0])) {
            snprintf(out, GGUF_MAX_NAME, "%s", top[i][1]);
            return true;
        }
    const char *pre = g ? "transformer.h." : "model.layers.";
    size_t pl = strlen(pre);
    if (strncmp(name, pre, pl)) return false;
    char *end;
    long l = strtol(name + pl, &end, 10);
    if (*end != '.') return false;
    for (const name_map *nm = g ? gpt2_layer : llama_layer; nm->hf; nm++)
        if (!strcmp(end + 1, nm->hf)) {
            snprintf(out, GGUF_MAX_NAME, "blk.%ld.%s", l, nm->gguf);
            *op = neox && (nm->op == MODEL_GGUF_PERMUTE_Q || nm->op == MODEL_GGUF_PERMUTE_K)
                      ? MODEL_GGUF_COPY
                      : nm->op;
            *layer = (int)l;
            return true;
        }
    return false;
}

int model_gguf_tensors(const kiln_model *m, model_gguf_tensor *out)
{
    int n = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const kiln_tensor_info *ti = &m->tensors[i];
        model_gguf_tensor t = {.src = i};
        if (!map_name(&m->cfg, is_qwen2(m), ti->name, t.name, &t.op, &t.layer)) continue;
        t.ndim = ti->ndim;
        if (ti->ndim == 1) {
            t.ne[0] = ti->shape[0];
            t.ne[1] = 1;
        } else if (t.op == MODEL_GGUF_TRANSPOSE) {
            t.ne[0] = ti->shape[0];
            t.ne[1] = ti->shape[1];
        } else {
            t.ne[0] = ti->shape[1];
            t.ne[1] = ti->shape[0];
        }
        t.n_head = t.op == MODEL_GGUF_PERMUTE_Q ? m->NH : t.op == MODEL_GGUF_PERMUTE_K ? m->KVH : 0;
        if (out) out[n] = t;
        n++;
    }
    return n;
}

int64_t model_gguf_perm_src(int64_t r, int64_t HS)
{
    int64_t h = r / HS, k = r % HS, i = k / 2, j = k % 2;
    return h * HS + j * (HS / 2) + i;
}

void model_gguf_get(const kiln_model *m, const model_gguf_tensor *t, float *dst)
{
    const kiln_tensor_info *ti = &m->tensors[t->src];
    const float *src = m->params + ti->offset;
    int64_t K = t->ne[0], R = t->ne[1];
    if (t->op == MODEL_GGUF_TRANSPOSE) {
        /* src (K, R) -> dst (R, K) */
        for (int64_t r = 0; r < R; r++)
            for (int64_t k = 0; k < K; k++) dst[r * K + k] = src[k * R + r];
    } else if (t->op == MODEL_GGUF_PERMUTE_Q || t->op == MODEL_GGUF_PERMUTE_K) {
        if (t->ndim == 1) { /* a bias: one element per row */
            R = K;
            K = 1;
        }
        int64_t HS = R / t->n_head;
        for (int64_t r = 0; r < R; r++)
            memcpy(dst + r * K, src + model_gguf_perm_src(r, HS) * K, (size_t)K * sizeof(float));
    } else {
        memcpy(dst, src, ti->numel * sizeof(float));
    }
}

void model_gguf_put(kiln_model *m, const model_gguf_tensor *t, const float *src)
{
    const kiln_tensor_info *ti = &m->tensors[t->src];
    float *dst = m->params + ti->offset;
    int64_t K = t->ne[0], R = t->ne[1];
    if (t->op == MODEL_GGUF_TRANSPOSE) {
        for (int64_t r = 0; r < R; r++)
            for (int64_t k = 0; k < K; k++) dst[k * R + r] = src[r * K + k];
    } else if (t->op == MODEL_GGUF_PERMUTE_Q || t->op == MODEL_GGUF_PERMUTE_K) {
        if (t->ndim == 1) {
            R = K;
            K = 1;
        }
        int64_t HS = R / t->n_head;
        for (int64_t r = 0; r < R; r++)
            memcpy(dst + model_gguf_perm_src(r, HS) * K, src + r * K, (size_t)K * sizeof(float));
    } else {
        memcpy(dst, src, ti->numel * sizeof(float));
    }
}

const char *model_gguf_arch(const kiln_model *m)
{
    return m->cfg.arch == KILN_ARCH_GPT2 ? "gpt2" : is_qwen2(m) ? "qwen2" : "llama";
}

void model_gguf_write_hparams(gguf_writer *w, const kiln_model *m)
{
    const kiln_config *c = &m->cfg;
    const char *a = model_gguf_arch(m);
    char k[96];
#define KEY(s) (snprintf(k, sizeof k, "%s.%s", a, s), k)
    gguf_w_u32(w, KEY("context_length"), (uint32_t)c->n_ctx);
    gguf_w_u32(w, KEY("embedding_length"), (uint32_t)c->n_embd);
    gguf_w_u32(w, KEY("block_count"), (uint32_t)c->n_layer);
    gguf_w_u32(w, KEY("feed_forward_length"), (uint32_t)c->n_inner);
    gguf_w_u32(w, KEY("attention.head_count"), (uint32_t)c->n_head);
    gguf_w_u32(w, KEY("attention.head_count_kv"), (uint32_t)c->n_kv_head);
    gguf_w_u32(w, KEY("vocab_size"), (uint32_t)c->vocab_size);
    if (c->arch == KILN_ARCH_GPT2) {
        gguf_w_f32(w, KEY("attention.layer_norm_epsilon"), c->norm_eps);
    } else {
        gguf_w_f32(w, KEY("attention.layer_norm_rms_epsilon"), c->norm_eps);
        gguf_w_f32(w, KEY("rope.freq_base"), c->rope_theta);
        gguf_w_u32(w, KEY("rope.dimension_count"), (uint32_t)(c->n_embd / c->n_head));
    }
#undef KEY
}

/* ---- reading ------------------------------------------------------------ */

static kiln_status get_i(kiln_ctx *ctx, const gguf_file *f, const char *what,
                         const char *arch, const char *key, bool req, int *out)
{
    char k[128];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    int64_t v = *out;
    kiln_status s = gguf_get_int(ctx, f, what, k, req, &v);
    if (s) return s;
    if (v < 0 || v > 2147483647LL)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: metadata key \"%s\" = %lld is out of range",
                         what, k, (long long)v);
    *out = (int)v;
    return KILN_OK;
}

static kiln_status get_f(kiln_ctx *ctx, const gguf_file *f, const char *what,
                         const char *arch, const char *key, bool req, float *out)
{
    char k[128];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    double v = *out;
    kiln_status s = gguf_get_float(ctx, f, what, k, req, &v);
    if (s) return s;
    if (!isfinite(v) || fabs(v) > 3e38)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: metadata key \"%s\" is not finite", what, k);
    *out = (float)v;
    return KILN_OK;
}

kiln_status model_gguf_config(kiln_ctx *ctx, const gguf_file *f, const char *what,
                              kiln_config *out)
{
    const char *as;
    size_t an;
    kiln_status s = gguf_get_str(ctx, f, what, "general.architecture", true, &as, &an);
    if (s) return s;
    kiln_config c = kiln_config_default();
    char arch[16];
    if (an == 5 && !memcmp(as, "qwen2", 5)) { /* llama.cpp's qwen2: q/k/v biases, NEOX rope */
        c.arch = KILN_ARCH_LLAMA;
        c.bias = false;
        c.qkv_bias = true;
        c.hf_type = KILN_HF_TYPE_QWEN2;
        if (gguf_find_tensor(f, "blk.0.attn_output.bias"))
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: a qwen2 file with tensor \"blk.0.attn_output.bias\": kiln's "
                             "qwen2 has q/k/v biases only", what);
    } else if (an == 4 && !memcmp(as, "gpt2", 4)) {
        c.arch = KILN_ARCH_GPT2;
        c.bias = true;
    } else if (an == 5 && !memcmp(as, "llama", 5)) {
        c.arch = KILN_ARCH_LLAMA;
        /* q/k/v biases without an o bias: a qwen2 model written as llama */
        bool qb = gguf_find_tensor(f, "blk.0.attn_q.bias") != NULL;
        c.bias = qb && gguf_find_tensor(f, "blk.0.attn_output.bias") != NULL;
        c.qkv_bias = qb && !c.bias;
        c.hf_type = c.qkv_bias ? KILN_HF_TYPE_QWEN2 : KILN_HF_TYPE_NATIVE;
    } else {
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: metadata key \"general.architecture\" = \"%.*s\" is not "
                         "supported (kiln reads gpt2, llama and qwen2)", what,
                         (int)(an > 64 ? 64 : an), as);
    }
    snprintf(arch, sizeof arch, "%.*s", (int)an, as);
    c.n_ctx = 0;
    if ((s = get_i(ctx, f, what, arch, "context_length", true, &c.n_ctx)) ||
        (s = get_i(ctx, f, what, arch, "embedding_length", true, &c.n_embd)) ||
        (s = get_i(ctx, f, what, arch, "block_count", true, &c.n_layer)) ||
        (s = get_i(ctx, f, what, arch, "feed_forward_length", true, &c.n_inner)) ||
        (s = get_i(ctx, f, what, arch, "attention.head_count", true, &c.n_head)))
        return s;
    c.n_kv_head = c.n_head;
    if ((s = get_i(ctx, f, what, arch, "attention.head_count_kv", false, &c.n_kv_head)))
        return s;
    const gguf_tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    if (!emb)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tensor \"token_embd.weight\" is missing",
                         what);
    c.vocab_size = emb->ne[1] <= 2147483647LL ? (int)emb->ne[1] : -1;
    int vs = c.vocab_size;
    if ((s = get_i(ctx, f, what, arch, "vocab_size", false, &vs))) return s;
    if (vs != c.vocab_size)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: metadata key \"%s.vocab_size\" = %d but token_embd.weight has "
                         "%lld rows", what, arch, vs, (long long)emb->ne[1]);
    if (c.arch == KILN_ARCH_GPT2) {
        c.norm_eps = 1e-5f;
        if ((s = get_f(ctx, f, what, arch, "attention.layer_norm_epsilon", true, &c.norm_eps)))
            return s;
    } else {
        c.norm_eps = 1e-6f;
        if ((s = get_f(ctx, f, what, arch, "attention.layer_norm_rms_epsilon", true,
                       &c.norm_eps)) ||
            (s = get_f(ctx, f, what, arch, "rope.freq_base", false, &c.rope_theta)))
            return s;
        int rd = c.n_head > 0 ? c.n_embd / c.n_head : 0;
        if ((s = get_i(ctx, f, what, arch, "rope.dimension_count", false, &rd))) return s;
        if (c.n_head > 0 && rd != c.n_embd / c.n_head)
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: metadata key \"%s.rope.dimension_count\" = %d: kiln "
                             "rotates whole heads (%d dimensions)", what, arch, rd,
                             c.n_embd / c.n_head);
        char key[64];
        snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
        if (gguf_find(f, key)) {
            const char *st;
            size_t sn;
            if ((s = gguf_get_str(ctx, f, what, key, true, &st, &sn))) return s;
            if (!(sn == 4 && !memcmp(st, "none", 4)))
                return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                                 "%s: metadata key \"%s\" = \"%.*s\" is "
                                 "not supported (kiln has no RoPE scaling)", what, key,
                                 (int)(sn > 32 ? 32 : sn), st);
        }
        int64_t nexp = 0;
        snprintf(key, sizeof key, "%s.expert_count", arch);
        if ((s = gguf_get_int(ctx, f, what, key, false, &nexp))) return s;
        if (nexp > 0)
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: metadata key \"%s\" = %lld: mixture-of-"
                             "experts models are not supported", what, key, (long long)nexp);
    }
    c.tie_embeddings = gguf_find_tensor(f, "output.weight") == NULL;
    /* Token ids: kiln prompts a llama with BOS when bos_token_id is set, so
     * that follows tokenizer.ggml.add_bos_token (llama.cpp's rule). */
    int64_t bos = -1, eos = -1;
    bool add_bos = c.arch == KILN_ARCH_LLAMA;
    if ((s = gguf_get_int(ctx, f, what, "tokenizer.ggml.bos_token_id", false, &bos)) ||
        (s = gguf_get_int(ctx, f, what, "tokenizer.ggml.eos_token_id", false, &eos)) ||
        (s = gguf_get_bool(ctx, f, what, "tokenizer.ggml.add_bos_token", false, &add_bos)))
        return s;
    if (c.arch == KILN_ARCH_LLAMA && !add_bos) bos = -1;
    if (bos >= c.vocab_size || eos >= c.vocab_size || bos < -1 || eos < -1)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: metadata key \"tokenizer.ggml.%s_token_id\" = %lld is outside "
                         "the vocabulary of %d", what,
                         (bos >= c.vocab_size || bos < -1) ? "bos" : "eos",
                         (long long)((bos >= c.vocab_size || bos < -1) ? bos : eos),
                         c.vocab_size);
    c.bos_token_id = (int)bos;
    c.eos_token_id = (int)eos;
    if ((s = kiln_config_validate(ctx, &c)))
        return kiln_fail(ctx, s, "%s: %s", what, kiln_errmsg(ctx));
    *out = c;
    return KILN_OK;
}

static void shape_str(char *buf, size_t cap, int ndim, const int64_t *ne)
{
    int k = 0;
    buf[0] = 0;
    for (int d = 0; d < ndim && k < (int)cap - 24; d++)
        k += snprintf(buf + k, cap - (size_t)k, "%s%lld", d ? ", " : "", (long long)ne[d]);
}

kiln_status model_gguf_load_weights(kiln_ctx *ctx, kiln_model *m, const gguf_file *f,
                                    const char *what)
{
    int n = model_gguf_tensors(m, NULL);
    model_gguf_tensor *map = calloc((size_t)n + 1, sizeof *map);
    float *tmp = NULL;
    size_t max = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].numel > max) max = m->tensors[i].numel;
    tmp = malloc((max ? max : 1) * sizeof(float));
    if (!map || !tmp) {
        free(map);
        free(tmp);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    model_gguf_tensors(m, map);
    kiln_status s = KILN_OK;
    model_params_touched(m);
    for (int i = 0; i < n && !s; i++) {
        const model_gguf_tensor *t = &map[i];
        const gguf_tensor *g = gguf_find_tensor(f, t->name);
        if (!g) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tensor \"%s\" is missing", what, t->name);
            break;
        }
        int gnd = g->ndim;
        while (gnd > 1 && g->ne[gnd - 1] == 1) gnd--;
        bool ok = g->ne[0] == t->ne[0] && (t->ndim == 1 ? gnd == 1 : (gnd <= 2 && g->ne[1] == t->ne[1]));
        if (!ok) {
            char want[64], got[96];
            shape_str(want, sizeof want, t->ndim, t->ne);
            shape_str(got, sizeof got, g->ndim, g->ne);
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tensor \"%s\" has shape [%s] but the metadata implies [%s]",
                          what, t->name, got, want);
            break;
        }
        const dtype_traits *tr = dtype_traits_of(g->type);
        if (!tr->to_float) {
            s = kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                          "%s: tensor \"%s\" has type %s, which kiln cannot dequantize yet "
                          "(it reads f32, f16, bf16, q8_0, q4_0, q4_K, q6_K)", what, t->name,
                          tr->name);
            break;
        }
        size_t row = dtype_row_bytes(g->type, g->ne[0]);
        for (int64_t r = 0; r < t->ne[1]; r++)
            tr->to_float(g->data + (size_t)r * row, tmp + r * t->ne[0], t->ne[0]);
        model_gguf_put(m, t, tmp);
    }
    for (int64_t i = 0; i < f->n_tensors && !s; i++) {
        bool used = false;
        for (int j = 0; j < n && !used; j++) used = !strcmp(map[j].name, f->tensors[i].name);
        if (!used)
            kiln_log(ctx, KILN_LOG_WARN, "%s: ignoring tensor \"%s\" (not part of a kiln %s)",
                     what, f->tensors[i].name, model_gguf_arch(m));
    }
    for (size_t i = 0; i < m->num_params && !s; i++)
        if (!isfinite(m->params[i])) {
            int ti = 0;
            while (ti + 1 < m->n_tensors && m->tensors[ti + 1].offset <= i) ti++;
            s = kiln_fail(ctx, KILN_ERR_NUMERIC, "%s: tensor \"%s\" contains NaN or infinity",
                          what, m->tensors[ti].name);
        }
    free(map);
    free(tmp);
    return s;
}

kiln_status model_load_gguf(kiln_ctx *ctx, const char *path, kiln_model **out)
{
    *out = NULL;
    gguf_file f;
    kiln_status s = gguf_open(ctx, path, &f);
    if (s) return s;
    kiln_config cfg;
    kiln_model *m = NULL;
    if (!(s = model_gguf_config(ctx, &f, path, &cfg)) && !(s = kiln_model_new(ctx, &cfg, &m))) {
        const char *as;
        size_t an;
        /* a "llama" file of qwen2's layout: its q/k rows are permuted */
        m->gguf_llama_qk = cfg.qkv_bias &&
                           !gguf_get_str(ctx, &f, path, "general.architecture", true, &as, &an) &&
                           an == 5 && !memcmp(as, "llama", 5);
        s = model_gguf_load_weights(ctx, m, &f, path);
    }
    gguf_close(&f);
    if (s) {
        kiln_model_free(m);
        return s;
    }
    *out = m;
    return KILN_OK;
}
