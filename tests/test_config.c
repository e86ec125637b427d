/*
 * test_config.c — config.json loading: real HF configs of both families
 * load (informational keys accepted), round trip through save, and every
 * unsupported or inconsistent key is rejected with a message naming it.
 */
#include "check.h"
#include "model/model.h"

#include <unistd.h>

static kiln_status parse(kiln_ctx *ctx, const char *js, kiln_config *c)
{
    json_t *o;
    kiln_status s = js_load_buf(ctx, js, strlen(js), "config.json", &o);
    if (s) return s;
    s = config_from_json(ctx, o, "config.json", c);
    json_decref(o);
    return s;
}

/* The config.json of the Hugging Face "gpt2" model, verbatim keys. */
static const char *hf_gpt2 =
    "{\"activation_function\": \"gelu_new\", \"architectures\": [\"GPT2LMHeadModel\"],"
    " \"attn_pdrop\": 0.1, \"bos_token_id\": 50256, \"embd_pdrop\": 0.1,"
    " \"eos_token_id\": 50256, \"initializer_range\": 0.02, \"layer_norm_epsilon\": 1e-05,"
    " \"model_type\": \"gpt2\", \"n_ctx\": 1024, \"n_embd\": 768, \"n_head\": 12,"
    " \"n_layer\": 12, \"n_positions\": 1024, \"resid_pdrop\": 0.1,"
    " \"summary_activation\": null, \"summary_first_dropout\": 0.1,"
    " \"summary_proj_to_labels\": true, \"summary_type\": \"cls_index\","
    " \"summary_use_proj\": true, \"task_specific_params\": {\"text-generation\":"
    " {\"do_sample\": true, \"max_length\": 50}}, \"vocab_size\": 50257}";

/* A TinyLlama-style llama config with GQA. */
static const char *hf_llama =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false,"
    " \"bos_token_id\": 1, \"eos_token_id\": 2, \"hidden_act\": \"silu\","
    " \"hidden_size\": 2048, \"initializer_range\": 0.02, \"intermediate_size\": 5632,"
    " \"max_position_embeddings\": 2048, \"model_type\": \"llama\","
    " \"num_attention_heads\": 32, \"num_hidden_layers\": 22, \"num_key_value_heads\": 4,"
    " \"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05, \"rope_scaling\": null,"
    " \"rope_theta\": 10000.0, \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\","
    " \"transformers_version\": \"4.35.0\", \"use_cache\": true, \"vocab_size\": 32000}";

/* Qwen2.5-0.5B's config.json (tied embeddings, q/k/v biases). */
static const char *hf_qwen25 =
    "{\"architectures\": [\"Qwen2ForCausalLM\"], \"attention_dropout\": 0.0,"
    " \"bos_token_id\": 151643, \"eos_token_id\": 151643, \"hidden_act\": \"silu\","
    " \"hidden_size\": 896, \"initializer_range\": 0.02, \"intermediate_size\": 4864,"
    " \"max_position_embeddings\": 32768, \"max_window_layers\": 24, \"model_type\": \"qwen2\","
    " \"num_attention_heads\": 14, \"num_hidden_layers\": 24, \"num_key_value_heads\": 2,"
    " \"rms_norm_eps\": 1e-06, \"rope_theta\": 1000000.0, \"sliding_window\": 32768,"
    " \"tie_word_embeddings\": true, \"torch_dtype\": \"bfloat16\","
    " \"transformers_version\": \"4.40.1\", \"use_cache\": true, \"use_sliding_window\": false,"
    " \"vocab_size\": 151936}";

/* Mistral-7B-Instruct-v0.2's (no sliding window); v0.1 has 4096 there. */
static const char *hf_mistral =
    "{\"architectures\": [\"MistralForCausalLM\"], \"attention_dropout\": 0.0,"
    " \"bos_token_id\": 1, \"eos_token_id\": 2, \"hidden_act\": \"silu\", \"hidden_size\": 4096,"
    " \"initializer_range\": 0.02, \"intermediate_size\": 14336,"
    " \"max_position_embeddings\": 32768, \"model_type\": \"mistral\","
    " \"num_attention_heads\": 32, \"num_hidden_layers\": 32, \"num_key_value_heads\": 8,"
    " \"rms_norm_eps\": 1e-05, \"rope_theta\": 1000000.0, \"sliding_window\": null,"
    " \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\","
    " \"transformers_version\": \"4.36.0\", \"use_cache\": true, \"vocab_size\": 32000}";

/* SmolLM2-135M's (llama, tied, head_dim and rope_interleaved keys). */
static const char *hf_smollm2 =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false,"
    " \"attention_dropout\": 0.0, \"bos_token_id\": 0, \"eos_token_id\": 0, \"head_dim\": 64,"
    " \"hidden_act\": \"silu\", \"hidden_size\": 576, \"initializer_range\": 0.041666666666666664,"
    " \"intermediate_size\": 1536, \"is_llama_config\": true, \"max_position_embeddings\": 8192,"
    " \"mlp_bias\": false, \"model_type\": \"llama\", \"num_attention_heads\": 9,"
    " \"num_hidden_layers\": 30, \"num_key_value_heads\": 3, \"pretraining_tp\": 1,"
    " \"rms_norm_eps\": 1e-05, \"rope_interleaved\": false, \"rope_scaling\": null,"
    " \"rope_theta\": 100000, \"tie_word_embeddings\": true, \"torch_dtype\": \"bfloat16\","
    " \"transformers_version\": \"4.42.3\", \"use_cache\": true, \"vocab_size\": 49152}";

static void test_hf_configs(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c;
    CHECK(parse(ctx, hf_gpt2, &c) == KILN_OK);
    CHECK(c.arch == KILN_ARCH_GPT2 && c.n_layer == 12 && c.n_embd == 768);
    CHECK(c.n_inner == 3072 && c.vocab_size == 50257 && c.n_ctx == 1024);
    CHECK(c.tie_embeddings && c.bias && c.eos_token_id == 50256);
    CHECK_EQ(kiln_config_num_params(&c), 124439808); /* GPT-2 small */
    CHECK(parse(ctx, hf_llama, &c) == KILN_OK);
    CHECK(c.arch == KILN_ARCH_LLAMA && c.n_layer == 22 && c.n_kv_head == 4);
    CHECK(c.n_inner == 5632 && !c.tie_embeddings && !c.bias && c.bos_token_id == 1);
    CHECK_EQ(kiln_config_num_params(&c), 1100048384); /* TinyLlama 1.1B */
    CHECK(c.hf_type == KILN_HF_TYPE_NATIVE && !c.qkv_bias);
    /* published parameter counts: 494,032,768 / 7,241,732,096 / 134,515,008 */
    CHECK(parse(ctx, hf_qwen25, &c) == KILN_OK);
    CHECK(c.arch == KILN_ARCH_LLAMA && c.hf_type == KILN_HF_TYPE_QWEN2);
    CHECK(c.qkv_bias && !c.bias && c.tie_embeddings && c.n_kv_head == 2);
    CHECK(c.rope_theta == 1000000.0f && c.n_ctx == 32768 && c.eos_token_id == 151643);
    CHECK_EQ(kiln_config_num_params(&c), 494032768);
    CHECK(parse(ctx, hf_mistral, &c) == KILN_OK);
    CHECK(c.arch == KILN_ARCH_LLAMA && c.hf_type == KILN_HF_TYPE_MISTRAL);
    CHECK(!c.qkv_bias && !c.bias && !c.tie_embeddings && c.n_kv_head == 8);
    CHECK_EQ(kiln_config_num_params(&c), 7241732096);
    CHECK(parse(ctx, hf_smollm2, &c) == KILN_OK);
    CHECK(c.hf_type == KILN_HF_TYPE_NATIVE && c.tie_embeddings && c.n_kv_head == 3);
    CHECK_EQ(kiln_config_num_params(&c), 134515008);
    kiln_ctx_free(ctx);
}

static void test_roundtrip(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    char path[] = "/tmp/kiln-test-config-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    for (int a = 0; a < 4; a++) {
        kiln_config c = kiln_config_default(), d;
        if (a >= 2) {
            c.arch = KILN_ARCH_LLAMA;
            c.bias = false;
            c.tie_embeddings = a == 2;
            c.qkv_bias = a == 2;
            c.hf_type = a == 2 ? KILN_HF_TYPE_QWEN2 : KILN_HF_TYPE_MISTRAL;
        } else if (a) {
            c.arch = KILN_ARCH_LLAMA;
            c.n_kv_head = 2;
            c.rope_theta = 500000.0f;
            c.tie_embeddings = false;
            c.bias = true;
            c.norm_eps = 1e-6f;
            c.bos_token_id = -1;
        }
        CHECK(kiln_config_save(ctx, path, &c) == KILN_OK);
        CHECK(kiln_config_load(ctx, path, &d) == KILN_OK);
        CHECK(d.arch == c.arch && d.n_layer == c.n_layer && d.n_embd == c.n_embd);
        CHECK(d.n_head == c.n_head && d.n_kv_head == c.n_kv_head && d.n_inner == c.n_inner);
        CHECK(d.vocab_size == c.vocab_size && d.n_ctx == c.n_ctx && d.norm_eps == c.norm_eps);
        CHECK(d.tie_embeddings == c.tie_embeddings && d.bias == c.bias);
        CHECK(d.qkv_bias == c.qkv_bias && d.hf_type == c.hf_type);
        CHECK(d.bos_token_id == c.bos_token_id && d.eos_token_id == c.eos_token_id);
        CHECK(!a || d.rope_theta == c.rope_theta);
    }
    unlink(path);
    CHECK(kiln_config_load(ctx, "/nonexistent/config.json", &(kiln_config){0}) == KILN_ERR_IO);
    CHECK(strstr(kiln_errmsg(ctx), "/nonexistent/config.json") != NULL);
    kiln_ctx_free(ctx);
}

/* Each bad config must fail and its message must name `key`. */
static void expect_bad(const char *js, const char *key)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c;
    kiln_status s = parse(ctx, js, &c);
    CHECK_MSG(s != KILN_OK, "accepted: %s", js);
    CHECK_MSG(strstr(kiln_errmsg(ctx), key) != NULL, "message '%s' does not name '%s'",
              kiln_errmsg(ctx), key);
    kiln_ctx_free(ctx);
}

#define G "\"model_type\":\"gpt2\",\"vocab_size\":50,\"n_positions\":16,"
#define MI "\"model_type\":\"mistral\",\"vocab_size\":50,\"hidden_size\":32,\"num_hidden_layers\":2,\"intermediate_size\":64,\"num_attention_heads\":4,"
#define QW "\"model_type\":\"qwen2\",\"vocab_size\":50,\"hidden_size\":32,\"num_hidden_layers\":2,\"intermediate_size\":64,\"num_attention_heads\":4,\"max_position_embeddings\":128,"
#define LL "\"model_type\":\"llama\",\"vocab_size\":50,\"hidden_size\":32,\"num_hidden_layers\":2,\"intermediate_size\":64,"

static void test_rejections(void)
{
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":30,\"n_head\":4}", "n_embd");
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":32,\"n_head\":0}", "n_head");
    expect_bad("{" G "\"n_layer\":0,\"n_embd\":32,\"n_head\":4}", "n_layer");
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":32}", "n_head");
    expect_bad("{" G "\"n_layer\":\"2\",\"n_embd\":32,\"n_head\":4}", "n_layer");
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":32,\"n_head\":4,\"activation_function\":\"relu\"}",
               "activation_function");
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":32,\"n_head\":4,\"scale_attn_by_inverse_layer_idx\":true}",
               "scale_attn_by_inverse_layer_idx");
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":32,\"n_head\":4,\"layer_norm_epsilon\":-1}",
               "layer_norm_epsilon");
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":32,\"n_head\":4,\"eos_token_id\":50}",
               "eos_token_id");
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":32,\"n_head\":4,\"bias\":false}", "bias");
    expect_bad("{" G "\"n_layer\":2,\"n_embd\":32,\"n_head\":4,\"n_layer\":3}", "duplicate");
    expect_bad("{" LL "\"num_attention_heads\":4,\"num_key_value_heads\":3}", "num_key_value_heads");
    expect_bad("{" LL "\"num_attention_heads\":4,\"rope_scaling\":{\"type\":\"linear\",\"factor\":2}}",
               "rope_scaling");
    expect_bad("{" LL "\"num_attention_heads\":4,\"hidden_act\":\"gelu\"}", "hidden_act");
    expect_bad("{" LL "\"num_attention_heads\":4,\"mlp_bias\":true}", "mlp_bias");
    expect_bad("{" LL "\"num_attention_heads\":4,\"head_dim\":16}", "head_dim");
    expect_bad("{" LL "\"num_attention_heads\":4,\"sliding_window\":4096,\"use_sliding_window\":true}",
               "sliding_window");
    expect_bad("{" LL "\"num_attention_heads\":32}", "head size");  /* HS = 1: odd */
    expect_bad("{" LL "\"num_attention_heads\":4,\"rope_theta\":0}", "rope_theta");
    expect_bad("{" LL "\"num_attention_heads\":4,\"rope_interleaved\":true}",
               "rope_interleaved");
    /* mistral's window must cover the context; absent means 4096 */
    expect_bad("{" MI "\"max_position_embeddings\":8192,\"sliding_window\":4096}",
               "sliding_window");
    expect_bad("{" MI "\"max_position_embeddings\":8192}", "sliding_window");
    expect_bad("{" MI "\"sliding_window\":0}", "sliding_window");
    /* qwen2: windowed layers (from max_window_layers on) need a full window */
    expect_bad("{" QW "\"use_sliding_window\":true,\"sliding_window\":64,"
               "\"max_window_layers\":1}", "use_sliding_window");
    expect_bad("{" QW "\"sliding_window\":64,\"layer_types\":[\"full_attention\","
               "\"sliding_attention\"]}", "layer_types");
    expect_bad("{" QW "\"layer_types\":[\"full_attention\",\"chunked\"]}", "layer_types");
    expect_bad("{\"model_type\":\"bert\"}", "model_type");
    expect_bad("{\"n_layer\":2}", "model_type");
    expect_bad("[1,2]", "object");
    expect_bad("{\"model_type\":\"gpt2\",\"n_positions\":16,\"n_layer\":2,\"n_embd\":65536,"
               "\"n_head\":4,\"vocab_size\":1073741824}",
               "parameters");
    /* accepted: informational keys and the neutral values of math keys */
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c;
    CHECK(parse(ctx, "{" LL "\"num_attention_heads\":4,\"sliding_window\":null,"
                     "\"head_dim\":8,\"eos_token_id\":[2,3],\"mlp_bias\":false,"
                     "\"torch_dtype\":\"bfloat16\",\"unknown_key_x\":1}", &c) == KILN_OK);
    CHECK_EQ(c.eos_token_id, 2);
    /* windows that cover the context, or that no layer uses */
    CHECK(parse(ctx, "{" MI "\"max_position_embeddings\":4096}", &c) == KILN_OK);
    CHECK(parse(ctx, "{" MI "\"max_position_embeddings\":8192,\"sliding_window\":null}",
                &c) == KILN_OK);
    CHECK(parse(ctx, "{" QW "\"use_sliding_window\":true,\"sliding_window\":64,"
                     "\"max_window_layers\":2}", &c) == KILN_OK);
    CHECK(parse(ctx, "{" QW "\"use_sliding_window\":true,\"sliding_window\":128,"
                     "\"max_window_layers\":0}", &c) == KILN_OK);
    CHECK(parse(ctx, "{" QW "\"use_sliding_window\":false,\"sliding_window\":64}", &c) ==
          KILN_OK);
    /* qwen2 and mistral hard-code their biases, as HF does */
    CHECK(parse(ctx, "{" QW "\"attention_bias\":false}", &c) == KILN_OK);
    CHECK(c.qkv_bias && !c.bias);
    CHECK(parse(ctx, "{" MI "\"max_position_embeddings\":64,\"attention_bias\":true}", &c) ==
          KILN_OK);
    CHECK(!c.qkv_bias && !c.bias);
    /* the validator keeps qkv_bias and the model type together */
    kiln_config q = c;
    q.qkv_bias = true;
    CHECK(kiln_config_validate(ctx, &q) == KILN_ERR_UNSUPPORTED);
    CHECK(strstr(kiln_errmsg(ctx), "qkv_bias") != NULL);
    q.hf_type = KILN_HF_TYPE_QWEN2;
    CHECK(kiln_config_validate(ctx, &q) == KILN_OK);
    q.bias = true;
    CHECK(kiln_config_validate(ctx, &q) == KILN_ERR_UNSUPPORTED);
    kiln_ctx_free(ctx);
}

int main(void)
{
    RUN_TEST(test_hf_configs);
    RUN_TEST(test_roundtrip);
    RUN_TEST(test_rejections);
    return TEST_EXIT();
}
