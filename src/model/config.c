/*
 * config.c — the transformer family's hyper-parameters as an HF-style
 * config.json: gpt2 (GPT2Config keys) or llama (LlamaConfig keys), and
 * qwen2 / mistral (Qwen2Config, MistralConfig: arch llama with q/k/v
 * biases, resp. no biases, and sliding windows kiln only accepts when
 * they cover the whole context).
 *
 * Loading validates every key kiln reads, rejects keys whose values change
 * the math in ways kiln does not implement (rope_scaling, sliding windows,
 * other activations, ...) with a message naming the key, and accepts the
 * informational keys of real HF configs (architectures, torch_dtype, ...).
 * Keys it does not know at all are accepted with a warning.
 */
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

kiln_config kiln_config_default(void)
{
    return (kiln_config){
        .arch = KILN_ARCH_GPT2,
        .n_layer = 4,
        .n_embd = 256,
        .n_head = 4,
        .n_kv_head = 4,
        .n_inner = 1024,
        .vocab_size = 257,
        .n_ctx = 256,
        .norm_eps = 1e-5f,
        .rope_theta = 10000.0f,
        .tie_embeddings = true,
        .bias = true,
        .bos_token_id = 256,
        .eos_token_id = 256,
    };
}

size_t kiln_config_num_params(const kiln_config *c)
{
    size_t C = (size_t)c->n_embd, V = (size_t)c->vocab_size, F = (size_t)c->n_inner;
    size_t HS = C / (size_t)(c->n_head > 0 ? c->n_head : 1);
    size_t QKV = ((size_t)c->n_head + 2 * (size_t)c->n_kv_head) * HS;
    size_t NHS = (size_t)c->n_head * HS;
    size_t n = V * C, per;
    if (c->arch == KILN_ARCH_GPT2) {
        n += (size_t)c->n_ctx * C;
        per = 2 * C + C * QKV + QKV + NHS * C + C + 2 * C + C * F + F + F * C + C;
        n += 2 * C; /* ln_f */
    } else {
        per = C + C * QKV + NHS * C + C + 3 * C * F;
        if (c->bias) per += QKV + C;
        else if (c->qkv_bias) per += QKV;
        n += C; /* norm */
    }
    n += per * (size_t)c->n_layer;
    if (!c->tie_embeddings) n += V * C;
    if (c->lora_rank > 0) /* the adapters: A (r, in) and B (out, r) per slot */
        for (int s = 0; s < kiln_lora_num_slots(c->arch); s++)
            if (c->lora_targets >> s & 1) {
                model_lora_slot sl = model_lora_slot_of(c, s);
                n += (size_t)c->lora_rank * (size_t)(sl.in + sl.out) * (size_t)c->n_layer;
            }
    return n;
}

static kiln_status bad(kiln_ctx *ctx, const char *what, const char *key,
                       const char *why)
{
    return kiln_fail(ctx, KILN_ERR_UNSUPPORTED, "%s: \"%s\" %s", what, key, why);
}

static kiln_status validate(kiln_ctx *ctx, const kiln_config *c,
                            const char *what)
{
    bool g = c->arch == KILN_ARCH_GPT2;
    const char *kL = g ? "n_layer" : "num_hidden_layers";
    const char *kC = g ? "n_embd" : "hidden_size";
    const char *kH = g ? "n_head" : "num_attention_heads";
    const char *kF = g ? "n_inner" : "intermediate_size";
    const char *kT = g ? "n_positions" : "max_position_embeddings";
    const char *kE = g ? "layer_norm_epsilon" : "rms_norm_eps";
#define RANGE(v, lo, hi, key)                                                   \
    if ((v) < (lo) || (v) > (hi))                                               \
        return kiln_fail(ctx, KILN_ERR_RANGE,                                   \
                         "%s: \"%s\" = %lld is out of range [%lld, %lld]", what, \
                         key, (long long)(v), (long long)(lo), (long long)(hi));
    if (c->arch != KILN_ARCH_GPT2 && c->arch != KILN_ARCH_LLAMA)
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: \"model_type\" must be \"gpt2\" or \"llama\"", what);
    RANGE(c->n_layer, 1, 1024, kL);
    RANGE(c->n_embd, 1, 65536, kC);
    RANGE(c->n_head, 1, 4096, kH);
    RANGE(c->n_kv_head, 1, c->n_head, g ? "n_head" : "num_key_value_heads");
    RANGE(c->n_inner, 1, 1 << 20, kF);
    RANGE(c->vocab_size, 1, 1 << 30, "vocab_size");
    RANGE(c->n_ctx, 1, 1 << 20, kT);
#undef RANGE
    if (c->n_embd % c->n_head)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "%s: \"%s\" = %d is not divisible by \"%s\" = %d", what,
                         kC, c->n_embd, kH, c->n_head);
    if (c->n_head % c->n_kv_head)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "%s: \"%s\" = %d is not divisible by "
                         "\"num_key_value_heads\" = %d",
                         what, kH, c->n_head, c->n_kv_head);
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps) || c->norm_eps > 1.0f)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "%s: \"%s\" must be a positive number <= 1", what, kE);
    if (g) {
        if (c->n_kv_head != c->n_head)
            return bad(ctx, what, "num_key_value_heads",
                       "must equal n_head for gpt2 (GQA needs model_type llama)");
        if (!c->bias) return bad(ctx, what, "bias", "must be true for gpt2");
        if (c->qkv_bias) return bad(ctx, what, "qkv_bias", "is for llama-arch models (qwen2)");
        if (c->hf_type != KILN_HF_TYPE_NATIVE)
            return bad(ctx, what, "model_type", "qwen2 and mistral are arch llama");
    } else {
        if ((unsigned)c->hf_type > KILN_HF_TYPE_MISTRAL)
            return bad(ctx, what, "model_type", "is not llama, qwen2 or mistral");
        if (c->qkv_bias && c->bias)
            return bad(ctx, what, "qkv_bias",
                       "excludes \"attention_bias\" (which adds q/k/v and o_proj biases)");
        /* the biases each HF model type hard-codes */
        if ((c->hf_type == KILN_HF_TYPE_QWEN2) != c->qkv_bias)
            return bad(ctx, what, "qkv_bias",
                       "(q/k/v biases without an o_proj bias) is qwen2's layout, and only "
                       "qwen2's");
        if (c->hf_type == KILN_HF_TYPE_MISTRAL && c->bias)
            return bad(ctx, what, "attention_bias", "must be false for mistral");
        if ((c->n_embd / c->n_head) % 2)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "%s: head size hidden_size/num_attention_heads = %d "
                             "must be even for rotary embeddings",
                             what, c->n_embd / c->n_head);
        if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta))
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "%s: \"rope_theta\" must be a positive number", what);
    }
    if (c->lora_rank < 0 || c->lora_rank > 4096 ||
        (c->lora_rank > 0 &&
         (!(c->lora_alpha > 0) || !(c->lora_dropout >= 0 && c->lora_dropout < 1) ||
          !c->lora_targets || c->lora_targets >> kiln_lora_num_slots(c->arch))))
        return bad(ctx, what, "kiln_lora",
                   "needs r in [1, 4096], lora_alpha > 0, lora_dropout in [0, 1) and slots "
                   "naming the architecture's linear modules");
    if (c->bos_token_id >= c->vocab_size || c->bos_token_id < -1)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "%s: \"bos_token_id\" = %d is outside the vocabulary [0, %d)",
                         what, c->bos_token_id, c->vocab_size);
    if (c->eos_token_id >= c->vocab_size || c->eos_token_id < -1)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "%s: \"eos_token_id\" = %d is outside the vocabulary [0, %d)",
                         what, c->eos_token_id, c->vocab_size);
    /* Whole-model size bound: the parameter block is indexed with size_t
     * and the activations with int64; 2^36 floats (256 GiB) is beyond any
     * machine kiln targets. */
    double n = (double)kiln_config_num_params(c);
    if (n > 68719476736.0)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "%s: the config implies %.3g parameters, more than kiln "
                         "supports (2^36)", what, n);
    return KILN_OK;
}

kiln_status kiln_config_validate(kiln_ctx *ctx, const kiln_config *cfg)
{
    return validate(ctx, cfg, "config");
}

/* ---- loading ---------------------------------------------------------- */

/* Keys kiln reads or knows to be informational (no effect on the math of
 * forward/backward). Anything else draws a warning. */
static const char *const known_keys[] = {"kiln_lora", 
    /* common */
    "model_type", "architectures", "vocab_size", "torch_dtype",
    "transformers_version", "_name_or_path", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "tie_word_embeddings",
    "initializer_range", "id2label", "label2id", "task_specific_params",
    "problem_type", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "is_encoder_decoder", "prefix",
    "max_length", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "num_beams", "repetition_penalty", "tokenizer_class",
    "kiln_version", "bias",
    /* gpt2 */
    "n_layer", "n_embd", "n_head", "n_inner", "n_positions", "n_ctx",
    "layer_norm_epsilon", "activation_function", "resid_pdrop", "embd_pdrop",
    "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "add_cross_attention", "gradient_checkpointing",
    /* llama */
    "num_hidden_layers", "hidden_size", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act",
    "attention_bias", "mlp_bias", "attention_dropout", "pretraining_tp",
    "head_dim", "sliding_window", "use_sliding_window", "is_llama_config",
    "rope_interleaved",
    /* qwen2 */
    "max_window_layers", "layer_types",
    NULL,
};

static bool is_known(const char *k)
{
    for (int i = 0; known_keys[i]; i++)
        if (!strcmp(known_keys[i], k)) return true;
    return false;
}

static kiln_status get_int(kiln_ctx *ctx, const json_t *o, const char *key,
                           const char *what, bool req, int *out)
{
    int64_t v = *out;
    kiln_status s = js_get_int(ctx, o, key, what, req, &v);
    if (s) return s;
    if (v < -2147483647LL || v > 2147483647LL)
        return kiln_fail(ctx, KILN_ERR_RANGE, "%s: \"%s\" = %lld is out of range",
                         what, key, (long long)v);
    *out = (int)v;
    return KILN_OK;
}

static kiln_status get_float(kiln_ctx *ctx, const json_t *o, const char *key,
                             const char *what, float *out)
{
    double v = *out;
    kiln_status s = js_get_double(ctx, o, key, what, false, &v);
    if (s) return s;
    if (!isfinite(v) || fabs(v) > 3e38)
        return kiln_fail(ctx, KILN_ERR_RANGE, "%s: \"%s\" must be finite", what, key);
    *out = (float)v;
    return KILN_OK;
}

/* Token ids may be an int, null or (llama 3) a list: the first is used. */
static kiln_status get_token_id(kiln_ctx *ctx, const json_t *o,
                                const char *key, const char *what, int *out)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return KILN_OK;
    if (json_is_array(v)) {
        if (json_array_size(v) == 0) return KILN_OK;
        v = json_array_get(v, 0);
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
        json_integer_value(v) > 2147483647LL)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: \"%s\" must be a non-negative integer", what, key);
    *out = (int)json_integer_value(v);
    return KILN_OK;
}

/* A key that must be absent, null, false or a given neutral value. */
static bool is_falsy(const json_t *v)
{
    return !v || json_is_null(v) || json_is_false(v);
}

/* Sliding-window attention, which kiln does not implement, is accepted
 * only where it cannot change the result: absent, disabled, or a window
 * at least the context long (every causal row fits in it).
 *   llama:   sliding_window with use_sliding_window true is refused.
 *   mistral: sliding_window (MistralConfig's default 4096 when absent; null
 *            = none) must be >= max_position_embeddings.
 *   qwen2:   with use_sliding_window true, layers from max_window_layers on
 *            (or those "layer_types" marks "sliding_attention") use the
 *            window: refused unless there are none or the window covers
 *            the context. */
static kiln_status sliding_window(kiln_ctx *ctx, const json_t *o, const char *what,
                                  const kiln_config *c)
{
    json_t *sw = json_object_get(o, "sliding_window");
    json_t *use = json_object_get(o, "use_sliding_window");
    if (use && !json_is_boolean(use) && !json_is_null(use))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: \"use_sliding_window\" must be true or false", what);
    if (c->hf_type == KILN_HF_TYPE_NATIVE) {
        if (!is_falsy(sw) && !is_falsy(use))
            return bad(ctx, what, "sliding_window", "is not supported");
        if (!is_falsy(use))
            return bad(ctx, what, "use_sliding_window", "is not supported");
        return KILN_OK;
    }
    int64_t win = c->hf_type == KILN_HF_TYPE_MISTRAL ? 4096 : -1;
    if (sw && !json_is_null(sw)) {
        if (!json_is_integer(sw) || json_integer_value(sw) < 1)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: \"sliding_window\" must be a positive integer or null",
                             what);
        win = json_integer_value(sw);
    } else if (sw) {
        win = -1;
    }
    const char *key = "sliding_window";
    bool windowed = true;
    if (c->hf_type == KILN_HF_TYPE_QWEN2) {
        int mwl = c->n_layer;
        kiln_status s = get_int(ctx, o, "max_window_layers", what, false, &mwl);
        if (s) return s;
        json_t *lt = json_object_get(o, "layer_types");
        windowed = false;
        if (json_is_array(lt)) {
            size_t i;
            json_t *x;
            json_array_foreach(lt, i, x)
            {
                if (!json_is_string(x))
                    return kiln_fail(ctx, KILN_ERR_FORMAT,
                                     "%s: \"layer_types\"[%zu] must be a string", what, i);
                if (!strcmp(json_string_value(x), "sliding_attention")) windowed = true;
                else if (strcmp(json_string_value(x), "full_attention"))
                    return bad(ctx, what, "layer_types",
                               "holds a layer type other than full_attention and "
                               "sliding_attention");
            }
            key = "layer_types";
        } else if (use && json_is_true(use)) {
            windowed = mwl < c->n_layer;
            key = "use_sliding_window";
        }
    }
    if (windowed && win >= 1 && win < c->n_ctx)
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: \"%s\"%s asks for sliding-window attention with a window of "
                         "%lld tokens, smaller than max_position_embeddings = %d: kiln "
                         "attends to the whole context (set sliding_window to null, or to "
                         "at least %d, or lower max_position_embeddings to %lld)",
                         what, key, sw ? "" : " (absent: MistralConfig's default 4096)",
                         (long long)win, c->n_ctx, c->n_ctx, (long long)win);
    return KILN_OK;
}

kiln_status config_from_json(kiln_ctx *ctx, const json_t *o, const char *what,
                             kiln_config *out)
{
    if (!json_is_object(o))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: must be a JSON object", what);
    const char *mt = NULL;
    kiln_status s = js_get_str(ctx, o, "model_type", what, true, &mt);
    if (s) return s;
    kiln_config c = kiln_config_default();
    c.bos_token_id = c.eos_token_id = -1;
    json_t *v;
    if (!strcmp(mt, "gpt2")) {
        c.arch = KILN_ARCH_GPT2;
        c.vocab_size = 50257;
        c.n_ctx = 1024;
        c.n_embd = 768;
        c.n_layer = 12;
        c.n_head = 12;
        if ((s = get_int(ctx, o, "vocab_size", what, true, &c.vocab_size)) ||
            (s = get_int(ctx, o, "n_layer", what, true, &c.n_layer)) ||
            (s = get_int(ctx, o, "n_embd", what, true, &c.n_embd)) ||
            (s = get_int(ctx, o, "n_head", what, true, &c.n_head)))
            return s;
        if (json_object_get(o, "n_positions")) {
            if ((s = get_int(ctx, o, "n_positions", what, false, &c.n_ctx))) return s;
        } else if ((s = get_int(ctx, o, "n_ctx", what, true, &c.n_ctx))) {
            return s;
        }
        c.n_kv_head = c.n_head;
        c.n_inner = c.n_embd > 0 && c.n_embd < (1 << 28) ? 4 * c.n_embd : 1;
        if ((s = get_int(ctx, o, "n_inner", what, false, &c.n_inner)) ||
            (s = get_float(ctx, o, "layer_norm_epsilon", what, &c.norm_eps)) ||
            (s = js_get_bool(ctx, o, "tie_word_embeddings", what, false,
                             &c.tie_embeddings)))
            return s;
        const char *act = "gelu_new";
        if ((s = js_get_str(ctx, o, "activation_function", what, false, &act))) return s;
        if (strcmp(act, "gelu_new") && strcmp(act, "gelu_pytorch_tanh") &&
            strcmp(act, "gelu_fast"))
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: \"activation_function\" = \"%s\" is not supported "
                             "(kiln implements the tanh GELU: gelu_new)", what, act);
        v = json_object_get(o, "scale_attn_weights");
        if (v && json_is_false(v))
            return bad(ctx, what, "scale_attn_weights",
                       "= false is not supported (attention is scaled by 1/sqrt(head size))");
        if (!is_falsy(json_object_get(o, "scale_attn_by_inverse_layer_idx")))
            return bad(ctx, what, "scale_attn_by_inverse_layer_idx", "is not supported");
        if (!is_falsy(json_object_get(o, "add_cross_attention")))
            return bad(ctx, what, "add_cross_attention", "is not supported (decoder-only)");
        v = json_object_get(o, "bias");
        if (v && json_is_false(v))
            return bad(ctx, what, "bias", "= false is not supported for gpt2");
    } else if (!strcmp(mt, "llama") || !strcmp(mt, "qwen2") || !strcmp(mt, "mistral")) {
        c.arch = KILN_ARCH_LLAMA;
        c.hf_type = !strcmp(mt, "qwen2")     ? KILN_HF_TYPE_QWEN2
                    : !strcmp(mt, "mistral") ? KILN_HF_TYPE_MISTRAL
                                             : KILN_HF_TYPE_NATIVE;
        c.tie_embeddings = false;
        c.bias = false;
        c.qkv_bias = c.hf_type == KILN_HF_TYPE_QWEN2; /* Qwen2Attention's */
        c.norm_eps = 1e-6f;
        c.n_ctx = c.hf_type == KILN_HF_TYPE_NATIVE ? 2048 : 32768;
        if ((s = get_int(ctx, o, "vocab_size", what, true, &c.vocab_size)) ||
            (s = get_int(ctx, o, "num_hidden_layers", what, true, &c.n_layer)) ||
            (s = get_int(ctx, o, "hidden_size", what, true, &c.n_embd)) ||
            (s = get_int(ctx, o, "num_attention_heads", what, true, &c.n_head)) ||
            (s = get_int(ctx, o, "intermediate_size", what, true, &c.n_inner)) ||
            (s = get_int(ctx, o, "max_position_embeddings", what, false, &c.n_ctx)))
            return s;
        c.n_kv_head = c.n_head;
        if ((s = get_int(ctx, o, "num_key_value_heads", what, false, &c.n_kv_head)) ||
            (s = get_float(ctx, o, "rms_norm_eps", what, &c.norm_eps)) ||
            (s = get_float(ctx, o, "rope_theta", what, &c.rope_theta)) ||
            (s = js_get_bool(ctx, o, "tie_word_embeddings", what, false,
                             &c.tie_embeddings)))
            return s;
        /* qwen2 and mistral hard-code their biases and ignore this key */
        if (c.hf_type == KILN_HF_TYPE_NATIVE &&
            (s = js_get_bool(ctx, o, "attention_bias", what, false, &c.bias)))
            return s;
        const char *act = "silu";
        if ((s = js_get_str(ctx, o, "hidden_act", what, false, &act))) return s;
        if (strcmp(act, "silu"))
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: \"hidden_act\" = \"%s\" is not supported (kiln's "
                             "llama MLP is SwiGLU with silu)", what, act);
        if (!is_falsy(json_object_get(o, "rope_scaling")))
            return bad(ctx, what, "rope_scaling",
                       "is not supported (remove it or set it to null)");
        if (!is_falsy(json_object_get(o, "rope_interleaved")))
            return bad(ctx, what, "rope_interleaved",
                       "= true is not supported (kiln's RoPE rotates halves, as HF's "
                       "LlamaForCausalLM does)");
        if (!is_falsy(json_object_get(o, "mlp_bias")))
            return bad(ctx, what, "mlp_bias", "= true is not supported");
        if ((s = sliding_window(ctx, o, what, &c))) return s;
        v = json_object_get(o, "head_dim");
        if (v && !json_is_null(v)) {
            int hd = 0;
            if ((s = get_int(ctx, o, "head_dim", what, false, &hd))) return s;
            if (c.n_head <= 0 || hd * c.n_head != c.n_embd)
                return bad(ctx, what, "head_dim",
                           "must equal hidden_size / num_attention_heads");
        }
    } else {
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: \"model_type\" = \"%s\" is not supported (use gpt2, llama, "
                         "qwen2 or mistral)",
                         what, mt);
    }
    v = json_object_get(o, "bias");
    if (v && !json_is_boolean(v))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: field \"bias\" must be true or false", what);
    if (c.arch == KILN_ARCH_LLAMA && v && json_is_boolean(v) &&
        json_is_true(v) != c.bias)
        return bad(ctx, what, "bias", "disagrees with \"attention_bias\"");
    if ((s = get_token_id(ctx, o, "bos_token_id", what, &c.bos_token_id)) ||
        (s = get_token_id(ctx, o, "eos_token_id", what, &c.eos_token_id)))
        return s;
    json_t *lo = json_object_get(o, "kiln_lora");
    if (lo) { /* a checkpoint of a LoRA run (lora.c) */
        const char *lw = "its \"kiln_lora\"";
        int64_t tg = 0;
        if (!json_is_object(lo)) return bad(ctx, what, "kiln_lora", "must be an object");
        if ((s = get_int(ctx, lo, "r", lw, true, &c.lora_rank)) ||
            (s = get_float(ctx, lo, "lora_alpha", lw, &c.lora_alpha)) ||
            (s = get_float(ctx, lo, "lora_dropout", lw, &c.lora_dropout)) ||
            (s = js_get_int(ctx, lo, "slots", lw, true, &tg)))
            return s;
        c.lora_targets = (unsigned)tg;
    }
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)o, key, val)
    {
        if (!is_known(key))
            kiln_log(ctx, KILN_LOG_WARN, "%s: ignoring unknown key \"%s\"", what, key);
    }
    if ((s = validate(ctx, &c, what))) return s;
    *out = c;
    return KILN_OK;
}

kiln_status kiln_config_load(kiln_ctx *ctx, const char *path, kiln_config *out)
{
    json_t *o;
    kiln_status s = js_load_file(ctx, path, &o);
    if (s) return s;
    s = config_from_json(ctx, o, path, out);
    json_decref(o);
    return s;
}

/* ---- saving ----------------------------------------------------------- */

/* The shortest decimal that reads back as the same float (1e-05, not
 * 9.9999997e-06). */
static json_t *json_float(float f)
{
    char buf[40];
    for (int p = 6; p <= 9; p++) {
        snprintf(buf, sizeof buf, "%.*g", p, (double)f);
        if (strtof(buf, NULL) == f) break;
    }
    return json_real(strtod(buf, NULL));
}

json_t *config_to_json(const kiln_config *c)
{
    json_t *o = json_object();
    bool g = c->arch == KILN_ARCH_GPT2;
    bool qwen2 = !g && c->hf_type == KILN_HF_TYPE_QWEN2;
    bool mistral = !g && c->hf_type == KILN_HF_TYPE_MISTRAL;
    const char *cls = g ? "GPT2LMHeadModel"
                      : qwen2   ? "Qwen2ForCausalLM"
                      : mistral ? "MistralForCausalLM"
                                : "LlamaForCausalLM";
    const char *type = g ? "gpt2" : qwen2 ? "qwen2" : mistral ? "mistral" : "llama";
    json_object_set_new(o, "architectures", json_pack("[s]", cls));
    json_object_set_new(o, "model_type", json_string(type));
    json_object_set_new(o, "vocab_size", json_integer(c->vocab_size));
    if (g) {
        json_object_set_new(o, "n_layer", json_integer(c->n_layer));
        json_object_set_new(o, "n_embd", json_integer(c->n_embd));
        json_object_set_new(o, "n_head", json_integer(c->n_head));
        json_object_set_new(o, "n_inner", c->n_inner == 4 * c->n_embd
                                              ? json_null()
                                              : json_integer(c->n_inner));
        json_object_set_new(o, "n_positions", json_integer(c->n_ctx));
        json_object_set_new(o, "n_ctx", json_integer(c->n_ctx));
        json_object_set_new(o, "layer_norm_epsilon", json_float(c->norm_eps));
        json_object_set_new(o, "activation_function", json_string("gelu_new"));
        json_object_set_new(o, "resid_pdrop", json_real(0.0));
        json_object_set_new(o, "embd_pdrop", json_real(0.0));
        json_object_set_new(o, "attn_pdrop", json_real(0.0));
        json_object_set_new(o, "scale_attn_weights", json_true());
    } else {
        json_object_set_new(o, "num_hidden_layers", json_integer(c->n_layer));
        json_object_set_new(o, "hidden_size", json_integer(c->n_embd));
        json_object_set_new(o, "num_attention_heads", json_integer(c->n_head));
        json_object_set_new(o, "num_key_value_heads", json_integer(c->n_kv_head));
        json_object_set_new(o, "intermediate_size", json_integer(c->n_inner));
        json_object_set_new(o, "max_position_embeddings", json_integer(c->n_ctx));
        json_object_set_new(o, "rms_norm_eps", json_float(c->norm_eps));
        json_object_set_new(o, "rope_theta", json_float(c->rope_theta));
        json_object_set_new(o, "rope_scaling", json_null());
        json_object_set_new(o, "hidden_act", json_string("silu"));
        json_object_set_new(o, "attention_dropout", json_real(0.0));
        if (qwen2) {
            json_object_set_new(o, "use_sliding_window", json_false());
            json_object_set_new(o, "sliding_window", json_null());
            json_object_set_new(o, "max_window_layers", json_integer(c->n_layer));
        } else if (mistral) {
            json_object_set_new(o, "sliding_window", json_null());
        } else {
            json_object_set_new(o, "attention_bias", json_boolean(c->bias));
            json_object_set_new(o, "mlp_bias", json_false());
            json_object_set_new(o, "pretraining_tp", json_integer(1));
        }
    }
    json_object_set_new(o, "tie_word_embeddings", json_boolean(c->tie_embeddings));
    if (c->bos_token_id >= 0)
        json_object_set_new(o, "bos_token_id", json_integer(c->bos_token_id));
    if (c->eos_token_id >= 0)
        json_object_set_new(o, "eos_token_id", json_integer(c->eos_token_id));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "torch_dtype", json_string("float32"));
    json_object_set_new(o, "use_cache", json_true());
    if (c->lora_rank > 0)
        json_object_set_new(o, "kiln_lora",
                            json_pack("{s:i, s:f, s:f, s:i}", "r", c->lora_rank, "lora_alpha",
                                      (double)c->lora_alpha, "lora_dropout",
                                      (double)c->lora_dropout, "slots", (int)c->lora_targets));
    return o;
}

kiln_status kiln_config_save(kiln_ctx *ctx, const char *path,
                             const kiln_config *cfg)
{
    kiln_status s = validate(ctx, cfg, path);
    if (s) return s;
    json_t *o = config_to_json(cfg);
    if (!o) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    s = js_save_file(ctx, path, o);
    json_decref(o);
    return s;
}
