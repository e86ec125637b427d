/*
 * cmd_serve.c — `kiln serve`: the OpenAI-compatible HTTP server. Built on
 * kiln.h only; the server itself is kiln_serve_run (src/serve).
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int cmd_serve(int argc, char **argv)
{
    kiln_serve_opts o = kiln_serve_opts_default();
    const char *dtype = NULL, *key_env = NULL, *pooling = "mean";
    int64_t max_body = (int64_t)o.max_body;
    int threads = 0;
    const char *draft = NULL;
    cli_list adapters = {0};
    cli_opt opts[] = {
        {"model", CLI_STR, &o.model_dir, "model directory (config.json, model.safetensors, tokenizer.json), or a run directory: its latest checkpoint", true},
        {"host", CLI_STR, &o.host, "address to bind [127.0.0.1]", false},
        {"port", CLI_INT, &o.port, "port; 0 = any free port (printed) [8080]", false},
        {"api-key", CLI_STR, &o.api_key, "require 'Authorization: Bearer KEY' on /v1 routes, /tokenize, /detokenize and /props (not empty)", false},
        {"api-key-env", CLI_STR, &key_env, "read the API key from this environment variable", false},
        {"parallel", CLI_INT, &o.parallel, "requests decoded together (KV-cache slots) [4]", false},
        {"ctx", CLI_INT, &o.n_ctx, "context per slot, 0 = the model's [0]", false},
        {"draft", CLI_STR, &draft, "speculative decoding: a smaller draft model (directory, run directory or .gguf) sharing the model's tokenizer; outputs are distributed exactly as without it; requests with response_format/tools or echo logprobs decode without it [off]", false},
        {"adapter", CLI_LIST, &adapters, "LoRA adapters served over the one base: NAME=DIR (a PEFT directory, e.g. from kiln sft --lora-rank) is model id NAME in /v1/models, chosen per request by \"model\"; the base's id uses none; several, or the flag repeated [none]", false},
        {"draft-tokens", CLI_INT, &o.draft_tokens, "tokens the draft proposes per slot and step, 1..16 [4]", false},
        {"max-queue", CLI_INT, &o.max_queue, "waiting requests before 503 [64]", false},
        {"max-body", CLI_I64, &max_body, "request body limit in bytes [1048576]", false},
        {"max-connections", CLI_INT, &o.max_connections, "open connections at most; 3/4 of them per client address [256]", false},
        {"name", CLI_STR, &o.model_name, "model id in the API [the directory's name]", false},
        {"tokenizer", CLI_STR, &o.tokenizer, "tokenizer.json, a directory, or \"bytes\" [the model directory]", false},
        {"dtype", CLI_STR, &dtype, "weight storage: " CLI_WEIGHT_DTYPES " [fp32; a .gguf model: its own types]", false},
        {"threads", CLI_INT, &threads, "OpenMP threads of the engine, 0 = all cores [0]", false},
        {"cors", CLI_STR, &o.cors, "allow browsers from these origins: \"*\" or comma-separated origins (CORS, OPTIONS preflight) [off]", false},
        {"log-format", CLI_STR, &o.log_format, "access log on stderr, one line per request: text | json | off [text]", false},
        {"watch-ms", CLI_INT, &o.watch_ms, "--model RUN (a run directory): read RUN/latest this often and swap in a newer checkpoint between requests; 0 = serve the one found at start [1000]", false},
        {"embedding-pooling", CLI_STR, &pooling, "/v1/embeddings: mean (of all positions' final-norm hidden states) | last (the last token's) [mean]", false},
        {NULL, 0, NULL, NULL, false},
    };
    int rc = cli_parse("serve",
                       "serve --model DIR [--host 127.0.0.1] [--port 8080] [--api-key KEY] "
                       "[--parallel N] [--ctx N] [--adapter NAME=DIR ...]",
                       "Serves the model over OpenAI's HTTP API: GET /v1/models, POST\n"
                       "/v1/completions, POST /v1/chat/completions (stream: true for\n"
                       "server-sent events), POST /v1/embeddings, POST /tokenize, POST /detokenize, GET /props,\n"
                       "GET /health, GET /metrics (Prometheus). Requests\n"
                       "share the model through continuous batching over --parallel slots.\n"
                       "Stops on SIGINT / SIGTERM.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    if (dtype && !cli_weight_dtype("serve", dtype, &o.wtype)) return 2;
    if (o.cors && !*o.cors) {
        fprintf(stderr, "kiln serve: --cors is empty; give \"*\" or the allowed origins "
                        "(e.g. https://app.example.com), or leave it out\n");
        cli_free(opts, NULL);
        return 2;
    }
    if (o.log_format && strcmp(o.log_format, "text") && strcmp(o.log_format, "json") &&
        strcmp(o.log_format, "off")) {
        fprintf(stderr, "kiln serve: --log-format '%s' is not text, json or off\n", o.log_format);
        cli_free(opts, NULL);
        return 2;
    }
    if (!strcmp(pooling, "mean") || !strcmp(pooling, "last")) {
        o.embedding_pooling = !strcmp(pooling, "mean") ? KILN_POOLING_MEAN : KILN_POOLING_LAST;
    } else {
        fprintf(stderr, "kiln serve: --embedding-pooling must be mean or last, not '%s'\n", pooling);
        cli_free(opts, NULL);
        return 2;
    }
    if (max_body < 64 || max_body > (int64_t)1 << 32) {
        fprintf(stderr, "kiln serve: --max-body must be in 64..4294967296\n");
        return 2;
    }
    o.max_body = (size_t)max_body;
    if (o.api_key && !*o.api_key) {
        fprintf(stderr, "kiln serve: --api-key is empty, which would serve without "
                        "authentication; give a key, or leave --api-key out\n");
        cli_free(opts, NULL);
        return 2;
    }
    if (key_env) {
        o.api_key = getenv(key_env);
        if (!o.api_key || !*o.api_key) {
            fprintf(stderr, "kiln serve: --api-key-env: environment variable %s is not set\n",
                    key_env);
            return 2;
        }
    }
    kiln_ctx *ctx = cli_ctx_new();
    if (threads > 0) kiln_set_threads(ctx, threads);
    /* a run directory serves its latest checkpoint, under the run's name */
    char model_dir[4096], name[256];
    kiln_status st = cli_model_dir(ctx, o.model_dir, model_dir, sizeof model_dir);
    bool run = !st && strcmp(model_dir, o.model_dir) != 0;
    if (run) o.run_dir = o.model_dir; /* followed: kiln_serve_opts.run_dir */
    if (run && !o.model_name) {
        const char *b = o.model_dir + strlen(o.model_dir);
        while (b > o.model_dir && b[-1] == '/') b--;
        const char *e = b;
        while (b > o.model_dir && b[-1] != '/') b--;
        snprintf(name, sizeof name, "%.*s", (int)(e - b), b);
        if (*name) o.model_name = name;
    }
    char draft_dir[4096];
    if (!st && draft && !(st = cli_model_dir(ctx, draft, draft_dir, sizeof draft_dir)))
        o.draft_dir = draft_dir;
    if (!st) {
        o.model_dir = model_dir;
        o.adapters = adapters.items;
        o.n_adapters = adapters.n;
        if (!dtype && cli_is_gguf(model_dir)) o.weights_gguf = model_dir; /* its own types */
        st = kiln_serve_run(ctx, &o);
    }
    rc = st ? cli_fail(ctx, "serve", st) : 0;
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return rc;
}
