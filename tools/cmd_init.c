/*
 * cmd_init.c — `kiln init` (write a randomly initialised model directory)
 * and `kiln info` (describe a model directory or a config.json).
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int exists(const char *dir, const char *name)
{
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &st) == 0;
}

int cmd_init(int argc, char **argv)
{
    const char *config = NULL, *out = NULL;
    int64_t seed = 1337;
    bool force = false;
    cli_opt opts[] = {
        {"config", CLI_STR, &config, "HF-style config.json (model_type gpt2 | llama)", true},
        {"out", CLI_STR, &out, "model directory to write (config.json + model.safetensors)", true},
        {"seed", CLI_I64, &seed, "random seed [1337]", false},
        {"force", CLI_BOOL, &force, "overwrite a model already in --out", false},
        {NULL, 0, NULL, NULL, false},
    };
    int rc = cli_parse("init", "init --config C.json --out DIR [--seed N]",
                       "Writes a randomly initialised model (GPT-2 initialisation: N(0, 0.02),\n"
                       "residual projections scaled by 1/sqrt(2L), norms 1, biases 0). The\n"
                       "directory loads in Hugging Face transformers unchanged.",
                       opts, argc, argv, NULL);
    if (rc) return rc == 1 ? 0 : 2;
    if (seed < 0) {
        fprintf(stderr, "kiln init: --seed must be >= 0\n");
        return 2;
    }
    if (!force && (exists(out, "model.safetensors") || exists(out, "config.json"))) {
        fprintf(stderr,
                "kiln init: '%s' already holds a model; choose another --out or pass --force\n",
                out);
        return 1;
    }
    kiln_ctx *ctx = cli_ctx_new();
    kiln_config cfg;
    kiln_model *m = NULL;
    kiln_status s = kiln_config_load(ctx, config, &cfg);
    if (!s) s = kiln_model_new(ctx, &cfg, &m);
    if (!s) {
        kiln_model_init_random(m, (uint64_t)seed);
        s = kiln_model_save(ctx, m, out);
    }
    if (s) rc = cli_fail(ctx, "init", s);
    else
        printf("wrote %s: %s, %zu parameters (seed %lld)\n", out,
               cfg.arch == KILN_ARCH_GPT2 ? "gpt2" : "llama", kiln_model_num_params(m),
               (long long)seed);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    return rc;
}

static void human(char *buf, size_t n, double x)
{
    if (x >= 1e9) snprintf(buf, n, "%.2fB", x / 1e9);
    else if (x >= 1e6) snprintf(buf, n, "%.2fM", x / 1e6);
    else if (x >= 1e3) snprintf(buf, n, "%.1fK", x / 1e3);
    else snprintf(buf, n, "%.0f", x);
}

int cmd_info(int argc, char **argv)
{
    const char *model = NULL, *config = NULL;
    bool tensors = false, json = false;
    cli_opt opts[] = {
        {"model", CLI_STR, &model, "model directory (config.json + model.safetensors) or .gguf file", false},
        {"config", CLI_STR, &config, "a config.json alone (no weights needed)", false},
        {"tensors", CLI_BOOL, &tensors, "list every tensor with its shape", false},
        {"json", CLI_BOOL, &json, "print one JSON object", false},
        {NULL, 0, NULL, NULL, false},
    };
    cli_list pos = {0};
    int rc = cli_parse("info", "info --model DIR | --config C.json [--tensors] [--json]",
                       "Describes a model: architecture, sizes and parameter count.", opts,
                       argc, argv, &pos);
    if (rc) {
        cli_free(opts, &pos);
        return rc == 1 ? 0 : 2;
    }
    if (!model && pos.n == 1) model = pos.items[0];
    if ((!model && !config) || (model && config) || pos.n > 1) {
        fprintf(stderr, "kiln info: give exactly one of --model DIR or --config FILE "
                        "(see kiln info --help)\n");
        cli_free(opts, &pos);
        return 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    kiln_model *m = NULL;
    kiln_config cfg;
    kiln_status s;
    char dir[4096]; /* outlives the block: model may point here */
    if (model) {
        /* a run directory (it has 'latest') stands for its latest checkpoint */
        s = cli_model_dir(ctx, model, dir, sizeof dir);
        if (!s) model = dir;
        if (!s) s = kiln_model_load(ctx, model, &m);
        if (!s) cfg = *kiln_model_config(m);
    } else {
        s = kiln_config_load(ctx, config, &cfg);
        if (!s) s = kiln_model_new(ctx, &cfg, &m);
    }
    if (s) {
        rc = cli_fail(ctx, "info", s);
        goto done;
    }
    size_t np = kiln_model_num_params(m);
    size_t emb = (size_t)cfg.vocab_size * cfg.n_embd +
                 (cfg.arch == KILN_ARCH_GPT2 ? (size_t)cfg.n_ctx * cfg.n_embd : 0);
    const char *arch = cfg.arch == KILN_ARCH_GPT2               ? "gpt2"
                       : cfg.hf_type == KILN_HF_TYPE_QWEN2   ? "qwen2"
                       : cfg.hf_type == KILN_HF_TYPE_MISTRAL ? "mistral"
                                                             : "llama";
    if (json) {
        printf("{\"model_type\": \"%s\", \"n_layer\": %d, \"n_embd\": %d, \"n_head\": %d, "
               "\"n_kv_head\": %d, \"n_inner\": %d, \"vocab_size\": %d, \"n_ctx\": %d, "
               "\"norm_eps\": %g, \"rope_theta\": %g, \"tie_word_embeddings\": %s, "
               "\"bias\": %s, \"qkv_bias\": %s, \"params\": %zu, \"non_embedding_params\": %zu, "
               "\"tensors\": %d}\n",
               arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_inner,
               cfg.vocab_size, cfg.n_ctx, (double)cfg.norm_eps, (double)cfg.rope_theta,
               cfg.tie_embeddings ? "true" : "false", cfg.bias ? "true" : "false",
               cfg.qkv_bias ? "true" : "false", np,
               np - emb, kiln_model_num_tensors(m));
    } else {
        char h1[32], h2[32];
        human(h1, sizeof h1, (double)np);
        human(h2, sizeof h2, (double)(np - emb));
        printf("model       %s\n", model ? model : config);
        printf("model_type  %s (%s)\n", arch,
               cfg.arch == KILN_ARCH_GPT2
                   ? "learned positions, LayerNorm, GELU MLP"
                   : "RoPE, RMSNorm, SwiGLU MLP");
        printf("layers      %d\n", cfg.n_layer);
        printf("width       %d (head size %d)\n", cfg.n_embd, cfg.n_embd / cfg.n_head);
        printf("heads       %d query, %d key/value%s\n", cfg.n_head, cfg.n_kv_head,
               cfg.n_kv_head < cfg.n_head ? " (GQA)" : "");
        printf("mlp         %d\n", cfg.n_inner);
        printf("vocab       %d\n", cfg.vocab_size);
        printf("context     %d\n", cfg.n_ctx);
        printf("norm eps    %g\n", (double)cfg.norm_eps);
        if (cfg.arch == KILN_ARCH_LLAMA) printf("rope theta  %g\n", (double)cfg.rope_theta);
        printf("embeddings  %s\n", cfg.tie_embeddings ? "tied (lm_head = wte)" : "untied");
        printf("bias        %s\n", cfg.bias       ? "yes"
                                    : cfg.qkv_bias ? "q/k/v only (no o_proj bias)"
                                                   : "no");
        printf("parameters  %zu (%s; %s without embeddings)\n", np, h1, h2);
        printf("fp32 size   %.1f MiB\n", (double)np * 4 / (1 << 20));
        kiln_gguf *g = NULL;
        struct stat sb;
        if (model && stat(model, &sb) == 0 && S_ISREG(sb.st_mode) &&
            kiln_gguf_open(ctx, model, &g) == KILN_OK) {
            /* a GGUF file: its tensors' types as stored */
            int64_t nt = kiln_gguf_num_tensors(g);
            size_t bytes = 0;
            kiln_dtype types[32];
            int cnt[32], nty = 0;
            kiln_gguf_tensor t;
            for (int64_t i = 0; kiln_gguf_tensor_at(g, i, &t); i++) {
                bytes += t.bytes;
                int j = 0;
                while (j < nty && types[j] != t.dtype) j++;
                if (j == nty && nty < 32) types[nty] = t.dtype, cnt[nty++] = 0;
                if (j < 32) cnt[j]++;
            }
            printf("gguf        %lld tensors, %.2f MiB:", (long long)nt, (double)bytes / (1 << 20));
            for (int j = 0; j < nty; j++)
                printf("%s %s x%d", j ? "," : "", kiln_dtype_name(types[j]), cnt[j]);
            printf("\n");
            if (tensors)
                for (int64_t i = 0; kiln_gguf_tensor_at(g, i, &t); i++)
                    printf("  %-40s %-5s [%lld, %lld] %zu bytes\n", t.name, kiln_dtype_name(t.dtype),
                           (long long)t.ne[0], (long long)t.ne[1], t.bytes);
            kiln_gguf_close(g);
            tensors = false;
        }
        if (tensors)
            for (int i = 0; i < kiln_model_num_tensors(m); i++) {
                const kiln_tensor_info *t = kiln_model_tensor(m, i);
                if (t->ndim == 1)
                    printf("  %-48s [%lld]\n", t->name, (long long)t->shape[0]);
                else
                    printf("  %-48s [%lld, %lld]\n", t->name, (long long)t->shape[0],
                           (long long)t->shape[1]);
            }
    }
done:
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    cli_free(opts, &pos);
    return rc;
}
