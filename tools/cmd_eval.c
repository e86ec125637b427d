/*
 * cmd_eval.c — `kiln eval`: mean next-token cross-entropy and perplexity
 * of a model on a token file or on a data directory's validation split.
 */
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Reads FILE as a token shard (magic "KILNTOK") or as raw little-endian
 * uint32 ids. *ids is malloc'ed. */
static kiln_status read_tokens(kiln_ctx *ctx, const char *path, int32_t **ids,
                               size_t *n, const char **kind)
{
    *ids = NULL;
    *n = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return kiln_fail(ctx, KILN_ERR_IO, "--tokens: cannot open '%s'", path);
    char magic[8] = {0};
    size_t got = fread(magic, 1, 8, f);
    if (got == 8 && !memcmp(magic, "KILNTOK", 8)) {
        fclose(f);
        kiln_shard *sh;
        kiln_status s = kiln_shard_open(ctx, path, &sh);
        if (s) return s;
        *n = kiln_shard_count(sh);
        *ids = malloc((*n ? *n : 1) * sizeof **ids);
        if (!*ids) {
            kiln_shard_close(sh);
            return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        }
        kiln_shard_read(sh, 0, *n, *ids);
        kiln_shard_close(sh);
        *kind = "token shard";
        return KILN_OK;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || st.st_size % 4 != 0) {
        fclose(f);
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "--tokens: '%s' is neither a kiln token shard nor raw "
                         "little-endian uint32 ids (its size is not a "
                         "multiple of 4)",
                         path);
    }
    *n = (size_t)st.st_size / 4;
    unsigned char *raw = malloc((size_t)st.st_size + 4);
    *ids = malloc((*n ? *n : 1) * sizeof **ids);
    rewind(f);
    if (!raw || !*ids || fread(raw, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
        free(raw);
        free(*ids);
        *ids = NULL;
        fclose(f);
        return kiln_fail(ctx, KILN_ERR_IO, "--tokens: cannot read '%s'", path);
    }
    fclose(f);
    for (size_t i = 0; i < *n; i++) {
        uint32_t v = (uint32_t)raw[4 * i] | (uint32_t)raw[4 * i + 1] << 8 |
                     (uint32_t)raw[4 * i + 2] << 16 | (uint32_t)raw[4 * i + 3] << 24;
        if (v > INT32_MAX) {
            free(raw);
            free(*ids);
            *ids = NULL;
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "--tokens: '%s': id %u at position %zu is out of "
                             "range",
                             path, v, i);
        }
        (*ids)[i] = (int32_t)v;
    }
    free(raw);
    *kind = "raw uint32";
    return KILN_OK;
}

int cmd_eval(int argc, char **argv)
{
    const char *model_dir = NULL, *tokens = NULL, *data = NULL, *split = "val", *dtype = NULL;
    const char *adapter = NULL;
    bool json = false, engine = false;
    int B = 4, T = 0, threads = 0, chunk = 0;
    int64_t max_tokens = 0;
    cli_opt opts[] = {
        {"model", CLI_STR, &model_dir, "model directory, checkpoint, or run directory (its latest checkpoint)", true},
        {"adapter", CLI_STR, &adapter, "PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors; e.g. a kiln sft --lora-rank checkpoint) merged into --model at load [none]", false},
        {"tokens", CLI_STR, &tokens, "token file: a kiln token shard or raw little-endian uint32 ids", false},
        {"data", CLI_STR, &data, "data directory from kiln tokenize", false},
        {"split", CLI_STR, &split, "with --data: val | train [val]", false},
        {"batch", CLI_INT, &B, "windows per forward pass [4]", false},
        {"seq", CLI_INT, &T, "window length [the model's n_ctx]", false},
        {"max-tokens", CLI_I64, &max_tokens, "evaluate only the first N tokens [all]", false},
        {"threads", CLI_INT, &threads, "compute threads, 0 = all cores [0]", false},
        {"json", CLI_BOOL, &json, "print one JSON object", false},
        {"engine", CLI_BOOL, &engine, "evaluate through the inference engine as generate, chat and serve run the model: a .gguf's matrices in the types it stores, 8-bit activations (a directory: fp32; with --dtype: that type)", false},
        {"chunk", CLI_INT, &chunk, "with --engine or --dtype: tokens per engine step; 1 runs every token as a decode step (generation's path: quantized weights dotted with 8-bit activations), 16 or more the prefill's (quantized rows widened to fp32 for the GEMM) [--seq]", false},
        {"dtype", CLI_STR, &dtype, "evaluate through the inference engine with its weights stored as " CLI_WEIGHT_DTYPES " (the perplexity of a quantized model) [the training forward, fp32]", false},
        {NULL, 0, NULL, NULL, false}};
    int rc = cli_parse("eval", "eval --model DIR (--tokens FILE | --data DIR) [--json] [--batch B] [--seq T]",
                       "Mean next-token cross-entropy (nats/token) and perplexity.\n"
                       "Every token after the first is predicted once, in windows of\n"
                       "--seq tokens of context.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    if (!tokens == !data) {
        fprintf(stderr, "kiln eval: give exactly one of --tokens FILE or --data DIR\n");
        cli_free(opts, NULL);
        return 2;
    }
    if (chunk < 0) {
        fprintf(stderr, "kiln eval: --chunk must be >= 0 (0 = --seq; got %d)\n", chunk);
        cli_free(opts, NULL);
        return 2;
    }
    if (T < 0 || max_tokens < 0) {
        fprintf(stderr, "kiln eval: %s must be >= 0 (0 = %s; got %lld)\n",
                T < 0 ? "--seq" : "--max-tokens",
                T < 0 ? "the model's n_ctx" : "all tokens",
                T < 0 ? (long long)T : (long long)max_tokens);
        cli_free(opts, NULL);
        return 2;
    }
    kiln_dtype wt = KILN_DTYPE_F32;
    if (dtype && !cli_weight_dtype("eval", dtype, &wt)) {
        cli_free(opts, NULL);
        return 2;
    }
    kiln_split sp = KILN_SPLIT_VAL;
    if (!strcmp(split, "train")) sp = KILN_SPLIT_TRAIN;
    else if (strcmp(split, "val")) {
        fprintf(stderr, "kiln eval: --split '%s' is not val or train\n", split);
        cli_free(opts, NULL);
        return 2;
    }
    kiln_ctx *ctx = cli_ctx_new();
    kiln_set_threads(ctx, threads);
    kiln_model *m = NULL;
    kiln_engine *eng = NULL;
    kiln_data *d = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    const char *kind = "";
    int ret = 0;
    char dir[1024];
    /* a run directory stands for its latest checkpoint */
    kiln_status s = cli_model_dir(ctx, model_dir, dir, sizeof dir);
    if (!s) s = kiln_checkpoint_verify(ctx, dir);
    if (!s) s = kiln_model_load(ctx, dir, &m);
    if (!s) s = cli_apply_adapter(ctx, &m, adapter);
    if (s) goto fail;
    const kiln_config *cfg = kiln_model_config(m);
    if (T <= 0) T = cfg->n_ctx;
    if (T > cfg->n_ctx) {
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "--seq %d exceeds the model's context length (n_ctx %d); "
                      "use --seq %d or less",
                      T, cfg->n_ctx, cfg->n_ctx);
        goto fail;
    }
    if (B <= 0) {
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "--batch must be positive");
        goto fail;
    }
    if (tokens) {
        if ((s = read_tokens(ctx, tokens, &ids, &n, &kind))) goto fail;
    } else {
        if ((s = kiln_data_open(ctx, data, &d))) goto fail;
        if (kiln_data_vocab_size(d) > cfg->vocab_size) {
            s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                          "vocab size mismatch: the data in '%s' has vocab_size "
                          "%d but the model has %d",
                          data, kiln_data_vocab_size(d), cfg->vocab_size);
            goto fail;
        }
        n = kiln_data_tokens(d, sp);
        if (n < 2) {
            s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                          "'%s' has no %s split%s", data, split,
                          sp == KILN_SPLIT_VAL ? " (use --split train, or tokenize with --val-fraction)" : "");
            goto fail;
        }
        if (max_tokens > 0 && (size_t)max_tokens < n) n = (size_t)max_tokens;
        ids = malloc(n * sizeof *ids);
        if (!ids) {
            s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            goto fail;
        }
        kiln_data_read(d, sp, 0, n, ids);
        kind = sp == KILN_SPLIT_VAL ? "validation split" : "training split";
    }
    if (max_tokens > 0 && (size_t)max_tokens < n) n = (size_t)max_tokens;
    if (n < 2) {
        s = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                      "%s holds %zu tokens; at least 2 are needed",
                      tokens ? tokens : data, n);
        goto fail;
    }
    double t0 = kiln_time_now(), ls = 0, cnt = 0;
    const bool stored = engine && !dtype && !adapter && cli_is_gguf(dir);
    if (dtype || engine) { /* the weights as the engine serves them */
        kiln_engine_opts eo = kiln_engine_opts_default();
        eo.n_ctx = T;
        eo.chunk = chunk > 0 && chunk < T ? chunk : T;
        eo.wtype = wt;
        if (stored) eo.weights_gguf = dir; /* as the file stores them */
        if ((s = kiln_engine_new(ctx, m, &eo, &eng))) goto fail;
        if ((s = kiln_engine_eval_tokens(ctx, eng, ids, n, T, &ls, &cnt))) goto fail;
    } else if ((s = kiln_eval_tokens(ctx, m, ids, n, B, T, &ls, &cnt))) {
        goto fail;
    }
    double dt = kiln_time_now() - t0, loss = ls / cnt;
    const char *weights = dtype    ? dtype
                          : stored ? "stored types (engine)"
                          : engine ? "fp32 (engine)"
                                   : "fp32 (training forward)";
    if (json) {
        printf("{\"loss\": %.6f, \"perplexity\": %.6f, \"tokens\": %.0f, "
               "\"bits_per_token\": %.6f, \"seq\": %d, \"model\": \"%s\", "
               "\"source\": \"%s\", \"weights\": \"%s\", \"seconds\": %.3f}\n",
               loss, exp(loss), cnt, loss / log(2.0), T, dir,
               tokens ? tokens : data, weights, dt);
    } else {
        printf("%s (%s): %.0f tokens predicted, seq %d, %s\n", tokens ? tokens : data,
               kind, cnt, T, dtype || engine ? weights : "training forward (fp32)");
        printf("loss %.4f nats/token | perplexity %.3f | %.3f bits/token | "
               "%.1fs (%.0f tok/s)\n",
               loss, exp(loss), loss / log(2.0), dt, cnt / dt);
    }
    goto done;
fail:
    ret = cli_fail(ctx, "eval", s);
done:
    free(ids);
    kiln_engine_free(eng);
    kiln_data_close(d);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return ret;
}
