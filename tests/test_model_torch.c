/*
 * test_model_torch.c — kiln against an independent PyTorch implementation
 * (scripts/torch_ref.py, Debian's python3-torch): for gpt2 (tied, biases,
 * learned positions) and llama (RoPE, RMSNorm, SwiGLU, GQA, untied; and a
 * variant with attention biases and tied embeddings) kiln writes its model
 * directory plus its logits, loss and every parameter gradient; the script
 * rebuilds the model from config.json + model.safetensors in float64 and
 * requires every tensor to match within 1e-4 relative (to its max |value|).
 * The same comparison runs on checkpoints written as transformers lays
 * them out (scripts/hf_ckpt_make.py): qwen2 (q/k/v biases, no o bias,
 * tied) in bf16 over 3 shards and fp32 over 2, mistral in fp16 over 2
 * shards, a SmolLM2-style llama in one bf16 file.
 * Skips, saying so, when /usr/bin/python3 has no torch.
 */
#include "check.h"
#include "io/safetensors.h"
#include "model/model.h"

#include <stdio.h>
#include <unistd.h>

#define PY "/usr/bin/python3"

static bool have_torch(void)
{
    return access(PY, X_OK) == 0 &&
           system(PY " -c 'import torch, numpy' >/dev/null 2>&1") == 0;
}

static const char *root(void)
{
    const char *r = getenv("KILN_ROOT");
    return r ? r : ".";
}

/* Runs m (whose files are in dir) forward and backward on random tokens,
 * writes the results beside them and has scripts/torch_ref.py compare;
 * frees m and removes dir. */
static void compare(kiln_ctx *ctx, kiln_model *m, char *dir, int B, int T, const char *name)
{
    kiln_config cfg = m->cfg;
    kiln_rng r;
    kiln_rng_seed(&r, 99);

    int32_t *tok = malloc((size_t)B * T * sizeof(int32_t));
    int32_t *tgt = malloc((size_t)B * T * sizeof(int32_t));
    for (int i = 0; i < B * T; i++) {
        tok[i] = (int32_t)kiln_rng_below(&r, (uint64_t)cfg.vocab_size);
        tgt[i] = (int32_t)kiln_rng_below(&r, (uint64_t)cfg.vocab_size);
    }
    tgt[1] = tgt[B * T - 2] = -1; /* ignored positions */
    float *logits;
    CHECK(kiln_model_forward(ctx, m, tok, B, T, &logits) == KILN_OK);
    size_t nl = (size_t)B * T * cfg.vocab_size;
    float *saved = malloc(nl * sizeof(float));
    memcpy(saved, logits, nl * sizeof(float));
    double ls = 0, ws = 0;
    CHECK(kiln_cross_entropy(ctx, logits, tgt, NULL, (int64_t)B * T, cfg.vocab_size, 0.0f,
                             NULL, &ls, &ws) == KILN_OK);
    float scale = (float)(1.0 / ws);
    ls = ws = 0;
    kiln_model_zero_grad(m);
    CHECK(kiln_cross_entropy(ctx, logits, tgt, NULL, (int64_t)B * T, cfg.vocab_size, scale,
                             logits, &ls, &ws) == KILN_OK);
    CHECK(kiln_model_backward(ctx, m, logits) == KILN_OK);
    float loss = (float)(ls / ws);

    int n = 4 + m->n_tensors;
    st_entry *e = calloc((size_t)n, sizeof *e);
    char **names = calloc((size_t)n, sizeof(char *));
    e[0] = (st_entry){.name = "tokens", .dtype = KILN_DTYPE_I32, .ndim = 2, .shape = {B, T}, .data = tok};
    e[1] = (st_entry){.name = "targets", .dtype = KILN_DTYPE_I32, .ndim = 2, .shape = {B, T}, .data = tgt};
    e[2] = (st_entry){.name = "logits", .dtype = KILN_DTYPE_F32, .ndim = 3,
                      .shape = {B, T, cfg.vocab_size}, .data = saved};
    e[3] = (st_entry){.name = "loss", .dtype = KILN_DTYPE_F32, .ndim = 1, .shape = {1}, .data = &loss};
    for (int i = 0; i < m->n_tensors; i++) {
        const kiln_tensor_info *t = &m->tensors[i];
        names[i] = malloc(strlen(t->name) + 6);
        sprintf(names[i], "grad.%s", t->name);
        e[4 + i] = (st_entry){.name = names[i], .dtype = KILN_DTYPE_F32, .ndim = t->ndim,
                              .shape = {t->shape[0], t->shape[1]}, .data = m->grads + t->offset};
    }
    char path[128], cmd[1024];
    snprintf(path, sizeof path, "%s/kiln_out.safetensors", dir);
    CHECK(st_save(ctx, path, e, n, NULL, 0) == KILN_OK);
    snprintf(cmd, sizeof cmd, PY " '%s/scripts/torch_ref.py' '%s' > '%s/log' 2>&1", root(), dir,
             dir);
    int rc = system(cmd);
    snprintf(cmd, sizeof cmd, "%s/log", dir);
    FILE *f = fopen(cmd, "r");
    char line[512];
    while (f && fgets(line, sizeof line, f))
        if (rc != 0 || strncmp(line, "ok", 2) != 0) fprintf(stderr, "  [%s] %s", name, line);
    if (f) fclose(f);
    CHECK_MSG(rc == 0, "%s: torch reference disagrees (see lines above)", name);
    for (int i = 0; i < m->n_tensors; i++) free(names[i]);
    free(names);
    free(e);
    free(saved);
    free(tok);
    free(tgt);
    kiln_model_free(m);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

static void run_case(kiln_config cfg, int B, int T, const char *name)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    kiln_ctx *ctx = kiln_ctx_new();
    char dir[] = "/tmp/kiln-torch-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    kiln_model *m;
    CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
    kiln_model_init_random(m, 1234);
    kiln_rng r;
    kiln_rng_seed(&r, 98);
    /* Bigger weights than the init so attention is far from uniform and
     * every path carries gradient; norms and biases moved off 1 / 0. */
    for (size_t i = 0; i < m->num_params; i++)
        m->params[i] = m->params[i] * 5.0f + 0.05f * kiln_rng_normal(&r);
    CHECK(kiln_model_save(ctx, m, dir) == KILN_OK);
    compare(ctx, m, dir, B, T, name);
    kiln_ctx_free(ctx);
}

/* A checkpoint as transformers writes it (scripts/hf_ckpt_make.py: that
 * family's config.json keys, weights in dtype over `shards` files with
 * model.safetensors.index.json), loaded by kiln_model_load. */
static void run_hf(const char *arch, const char *dtype, int shards, int B, int T,
                   kiln_hf_type want_type, bool want_tied)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    kiln_ctx *ctx = kiln_ctx_new();
    char dir[] = "/tmp/kiln-torch-XXXXXX", cmd[1024], name[64];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(name, sizeof name, "%s-%s-%d-shards", arch, dtype, shards);
    snprintf(cmd, sizeof cmd, PY " '%s/scripts/hf_ckpt_make.py' '%s' %s %s %d", root(), dir,
             arch, dtype, shards);
    CHECK(system(cmd) == 0);
    kiln_model *m = NULL;
    kiln_status s = kiln_model_load(ctx, dir, &m);
    CHECK_MSG(s == KILN_OK, "%s: %s", name, kiln_errmsg(ctx));
    if (!m) return;
    CHECK(m->cfg.hf_type == want_type && m->cfg.tie_embeddings == want_tied);
    CHECK((m->cfg.hf_type == KILN_HF_TYPE_QWEN2) == m->cfg.qkv_bias);
    /* qwen2: q/k/v biases loaded, no o_proj bias in the registry */
    CHECK((kiln_model_find_tensor(m, "model.layers.0.self_attn.k_proj.bias") >= 0) ==
          m->cfg.qkv_bias);
    CHECK(kiln_model_find_tensor(m, "model.layers.0.self_attn.o_proj.bias") < 0);
    compare(ctx, m, dir, B, T, name);
    kiln_ctx_free(ctx);
}

static void test_hf_qwen2_sharded(void)
{
    run_hf("qwen2", "BF16", 3, 2, 14, KILN_HF_TYPE_QWEN2, true);
    run_hf("qwen2", "F32", 2, 1, 9, KILN_HF_TYPE_QWEN2, true);
}

static void test_hf_mistral_sharded(void)
{
    run_hf("mistral", "F16", 2, 2, 11, KILN_HF_TYPE_MISTRAL, false);
}

static void test_hf_llama_smollm(void)
{
    run_hf("llama", "BF16", 1, 2, 10, KILN_HF_TYPE_NATIVE, true);
}

static kiln_config small(kiln_arch a)
{
    kiln_config c = kiln_config_default();
    c.arch = a;
    c.n_layer = 2;
    c.n_embd = 32;
    c.n_head = 4;
    c.n_kv_head = a == KILN_ARCH_GPT2 ? 4 : 2;
    c.n_inner = a == KILN_ARCH_GPT2 ? 128 : 48;
    c.vocab_size = 53;
    c.n_ctx = 16;
    c.rope_theta = 10000.0f;
    c.tie_embeddings = a == KILN_ARCH_GPT2;
    c.bias = a == KILN_ARCH_GPT2;
    c.bos_token_id = c.eos_token_id = 0;
    return c;
}

static void test_torch_gpt2(void) { run_case(small(KILN_ARCH_GPT2), 2, 12, "gpt2"); }
static void test_torch_llama(void) { run_case(small(KILN_ARCH_LLAMA), 2, 12, "llama"); }

static void test_torch_llama_bias_tied(void)
{
    kiln_config c = small(KILN_ARCH_LLAMA);
    c.bias = true;
    c.tie_embeddings = true;
    c.n_kv_head = 1; /* MQA */
    c.rope_theta = 500000.0f;
    run_case(c, 3, 16, "llama-bias-tied-mqa");
}

int main(void)
{
    RUN_TEST(test_torch_gpt2);
    RUN_TEST(test_torch_llama);
    RUN_TEST(test_torch_llama_bias_tied);
    RUN_TEST(test_hf_qwen2_sharded);
    RUN_TEST(test_hf_mistral_sharded);
    RUN_TEST(test_hf_llama_smollm);
    return TEST_EXIT();
}
