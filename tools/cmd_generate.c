/*
 * cmd_generate.c — `kiln generate`: sample a continuation of a prompt,
 * streaming the text to stdout as it is produced and reporting prefill and
 * decode speed on stderr; and `kiln chat`'s shared pieces live in
 * cmd_chat.c. Built on kiln.h only.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints each token's text as it comes; notes when the first arrived
 * (the end of the prefill). */
typedef struct gen_clock {
    double t0, t1;
    bool ids; /* --print-ids: token ids instead of text */
} gen_clock;

static bool print_token(void *user, const kiln_gen_token *t)
{
    gen_clock *c = user;
    if (c->t1 == 0) c->t1 = kiln_time_now();
    if (c->ids) {
        if (t->id >= 0) printf(" %d", (int)t->id);
    } else {
        fwrite(t->text, 1, t->len, stdout);
    }
    fflush(stdout);
    return true;
}

int cmd_generate(int argc, char **argv)
{
    const char *model = NULL, *prompt = NULL, *tokenizer = NULL, *dtype = NULL;
    const char *adapter = NULL;
    const char *draft = NULL;
    int draft_tokens = 4;
    int max_tokens = 128, top_k = 0, ctx_len = 0, threads = 0;
    double temperature = 1.0, top_p = 1.0, min_p = 0.0, rep = 1.0, freq = 0.0, pres = 0.0;
    int64_t seed = 0;
    bool ignore_eos = false, no_echo = false, quiet = false, print_ids = false;
    cli_list stops = {0}, stop_tokens = {0};
    cli_opt opts[] = {
        {"model", CLI_STR, &model, "model directory (config.json, model.safetensors, tokenizer.json), or a run directory: its latest checkpoint", true},
        {"adapter", CLI_STR, &adapter, "PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors; e.g. a kiln sft --lora-rank checkpoint) merged into --model at load [none]", false},
        {"prompt", CLI_STR, &prompt, "text to continue [\"\": start from end-of-text]", false},
        {"max-tokens", CLI_INT, &max_tokens, "tokens to generate at most [128]", false},
        {"temperature", CLI_F64, &temperature, "0 = greedy [1.0]", false},
        {"top-k", CLI_INT, &top_k, "keep the k most likely tokens, 0 = off [0]", false},
        {"top-p", CLI_F64, &top_p, "nucleus sampling mass, 1 = off [1.0]", false},
        {"min-p", CLI_F64, &min_p, "drop tokens below min-p x the top probability [0]", false},
        {"repetition-penalty", CLI_F64, &rep, "HF repetition penalty, 1 = off [1.0]", false},
        {"frequency-penalty", CLI_F64, &freq, "OpenAI frequency penalty [0]", false},
        {"presence-penalty", CLI_F64, &pres, "OpenAI presence penalty [0]", false},
        {"seed", CLI_I64, &seed, "sampling seed [0]", false},
        {"stop", CLI_LIST, &stops, "stop strings (generation ends before them)", false},
        {"stop-token", CLI_LIST, &stop_tokens, "token ids that end generation (besides end-of-text)", false},
        {"ignore-eos", CLI_BOOL, &ignore_eos, "keep going past end-of-text", false},
        {"tokenizer", CLI_STR, &tokenizer, "tokenizer.json, a directory, or \"bytes\" [the model directory]", false},
        {"dtype", CLI_STR, &dtype, "weight storage: " CLI_WEIGHT_DTYPES " [fp32; a .gguf model: its own types]", false},
        {"ctx", CLI_INT, &ctx_len, "context length, 0 = the model's [0]", false},
        {"draft", CLI_STR, &draft, "speculative decoding: a smaller draft model (directory or .gguf) sharing the model's tokenizer; the output is distributed exactly as without it [off]", false},
        {"draft-tokens", CLI_INT, &draft_tokens, "tokens the draft proposes per target step, 1..16 [4]", false},
        {"threads", CLI_INT, &threads, "OpenMP threads, 0 = all cores [0]", false},
        {"no-echo", CLI_BOOL, &no_echo, "do not print the prompt before the continuation", false},
        {"quiet", CLI_BOOL, &quiet, "no speed report on stderr", false},
        {"print-ids", CLI_BOOL, &print_ids, "print token ids, not text: the prompt's (BOS included) on one line, the generated ones on the next", false},
        {NULL, 0, NULL, NULL, false},
    };
    int rc = cli_parse("generate",
                       "generate --model DIR [--prompt TEXT] [--max-tokens N] [--temperature T] "
                       "[--top-k K] [--top-p P] [--seed S]",
                       "Samples a continuation of --prompt with a KV cache, streaming text to\n"
                       "stdout as it is produced; prefill and decode speed go to stderr.",
                       opts, argc, argv, NULL);
    if (rc) {
        cli_free(opts, NULL);
        return rc == 1 ? 0 : 2;
    }
    kiln_dtype wt = KILN_DTYPE_F32;
    if (dtype && !cli_weight_dtype("generate", dtype, &wt)) {
        cli_free(opts, NULL);
        return 2;
    }
    if (max_tokens < 0) {
        fprintf(stderr, "kiln generate: --max-tokens must be >= 0\n");
        cli_free(opts, NULL);
        return 2;
    }
    int32_t stop_ids[64];
    int n_stop_ids = 0;
    for (int i = 0; i < stop_tokens.n; i++) {
        char *end;
        long v = strtol(stop_tokens.items[i], &end, 10);
        if (*end || end == stop_tokens.items[i] || v < 0 || v > 1 << 30 || n_stop_ids == 64) {
            fprintf(stderr, "kiln generate: --stop-token '%s' is not a token id (at most 64)\n",
                    stop_tokens.items[i]);
            cli_free(opts, NULL);
            return 2;
        }
        stop_ids[n_stop_ids++] = (int32_t)v;
    }
    kiln_ctx *ctx = cli_ctx_new();
    if (threads > 0) kiln_set_threads(ctx, threads);
    kiln_model *m = NULL;
    kiln_tokenizer *tok = NULL;
    kiln_engine *e = NULL, *de = NULL;
    kiln_spec_stats ss = {0};
    kiln_gen *g = NULL;
    int32_t *ids = NULL;
    float *logits = NULL;
    kiln_sampling sp = kiln_sampling_default();
    sp.temperature = (float)temperature;
    sp.top_k = top_k;
    sp.top_p = (float)top_p;
    sp.min_p = (float)min_p;
    sp.repetition_penalty = (float)rep;
    sp.frequency_penalty = (float)freq;
    sp.presence_penalty = (float)pres;
    sp.seed = (uint64_t)seed;
    kiln_status st = kiln_sampling_validate(ctx, &sp);
    if (st) {
        char eb[4096];
        fprintf(stderr, "kiln generate: %s\n", cli_errmsg(ctx, eb, sizeof eb));
        rc = 2;
        goto out;
    }
    /* a trainer checkpoint carries checksums.json: verify before loading */
    /* a run directory stands for its latest checkpoint */
    char model_dir[4096];
    if ((st = cli_model_dir(ctx, model, model_dir, sizeof model_dir))) goto fail;
    model = model_dir;
    if ((st = kiln_checkpoint_verify(ctx, model))) goto fail;
    if ((st = kiln_model_load(ctx, model, &m))) goto fail;
    if ((st = cli_apply_adapter(ctx, &m, adapter))) goto fail;
    if ((st = kiln_tokenizer_load(ctx, tokenizer ? tokenizer : model, &tok))) goto fail;
    const kiln_config cfg = *kiln_model_config(m);
    if (kiln_tokenizer_vocab_size(tok) > cfg.vocab_size) {
        st = kiln_fail(ctx, KILN_ERR_FORMAT,
                       "the tokenizer has %d tokens but the model's vocabulary is %d; pass the "
                       "model's own tokenizer with --tokenizer",
                       kiln_tokenizer_vocab_size(tok), cfg.vocab_size);
        goto fail;
    }
    for (int i = 0; i < n_stop_ids; i++)
        if (stop_ids[i] >= cfg.vocab_size) {
            st = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                           "--stop-token %d is outside the model's vocabulary [0, %d)",
                           stop_ids[i], cfg.vocab_size);
            goto fail;
        }
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.n_ctx = ctx_len;
    eo.wtype = wt;
    if (!dtype && !adapter && cli_is_gguf(model))
        eo.weights_gguf = model; /* as the file stores them */
    if (draft && (draft_tokens < 1 || draft_tokens > KILN_SPEC_MAX_DRAFT)) {
        st = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "--draft-tokens %d must be in 1..%d",
                       draft_tokens, KILN_SPEC_MAX_DRAFT);
        goto fail;
    }
    if ((st = kiln_engine_new(ctx, m, &eo, &e))) goto fail;
    kiln_model_free(m);
    m = NULL;
    if (draft && (st = cli_load_draft(ctx, draft, tokenizer, &cfg, tok, &eo, &de))) goto fail;
    const int V = cfg.vocab_size, n_ctx = kiln_engine_n_ctx(e);
    size_t n = 0, n_text = 0;
    const char *p = prompt ? prompt : "";
    int32_t *text_ids = NULL;
    if ((st = kiln_tokenizer_encode(ctx, tok, p, strlen(p), &text_ids, &n_text))) goto fail;
    st = kiln_prompt_ids(ctx, &cfg, tok, text_ids, n_text, &ids, &n);
    free(text_ids);
    if (st) goto fail;
    if ((int)n >= n_ctx) {
        st = kiln_fail(ctx, KILN_ERR_RANGE,
                       "the prompt is %zu tokens; the context is %d (shorten --prompt or raise --ctx)",
                       n, n_ctx);
        goto fail;
    }
    if (max_tokens > n_ctx - (int)n) {
        fprintf(stderr, "kiln generate: --max-tokens %d does not fit the context; generating %d\n",
                max_tokens, n_ctx - (int)n);
        max_tokens = n_ctx - (int)n;
    }
    kiln_gen_opts go = kiln_gen_opts_default();
    go.sampling = sp;
    go.max_tokens = max_tokens > 0 ? max_tokens : 1;
    go.ignore_eos = ignore_eos;
    go.stops = (const char *const *)stops.items;
    go.n_stops = stops.n;
    go.stop_ids = stop_ids;
    go.n_stop_ids = n_stop_ids;
    if ((st = kiln_gen_new(ctx, tok, &cfg, &go, ids, n, &g))) goto fail;
    logits = malloc((size_t)V * sizeof(float));
    if (!logits) {
        st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if (print_ids) {
        for (size_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", (int)ids[i]);
        fputc('\n', stdout);
    } else if (!no_echo && prompt) {
        fputs(prompt, stdout);
        fflush(stdout);
    }
    gen_clock clk = {.t0 = kiln_time_now(), .ids = print_ids};
    kiln_spec_opts so = kiln_spec_opts_default();
    so.n_draft = draft_tokens;
    if (max_tokens > 0 && de)
        st = kiln_generate_spec(ctx, e, de, &so, 0, g, ids, n, print_token, &clk, &ss);
    else if (max_tokens > 0)
        st = kiln_generate(ctx, e, 0, g, ids, n, logits, print_token, &clk);
    if (st) goto fail;
    double t2 = kiln_time_now();
    fputc('\n', stdout);
    fflush(stdout);
    if (!quiet) {
        /* decode steps: one forward per generated token after the first */
        int gen = kiln_gen_count(g), steps = gen > 0 ? gen - 1 : 0;
        double t1 = clk.t1 > 0 ? clk.t1 : t2;
        fprintf(stderr,
                "[kiln generate] prefill %zu tokens in %.1f ms (%.0f tok/s); decode %d tokens in "
                "%.1f ms (%.1f tok/s); stopped by %s; %s weights\n",
                n, (t1 - clk.t0) * 1e3, (double)n / (t1 - clk.t0 > 0 ? t1 - clk.t0 : 1e-9), gen,
                (t2 - t1) * 1e3, steps > 0 ? (double)steps / (t2 - t1) : 0.0,
                max_tokens > 0 ? kiln_finish_name(kiln_gen_finished(g)) : "length",
                eo.weights_gguf ? "the .gguf's own" : wt == KILN_DTYPE_F32 ? "fp32" : kiln_dtype_name(wt));
        if (de)
            fprintf(stderr,
                    "[kiln generate] draft %d tokens/step: accepted %llu of %llu (%.1f%%), "
                    "%.2f tokens per target step over %llu steps; draft %.1f ms, target verify "
                    "%.1f ms; estimated speed-up %.2fx over the target alone (its %llu "
                    "single-token steps: %.2f ms each)\n",
                    so.n_draft, (unsigned long long)ss.accepted, (unsigned long long)ss.drafted,
                    ss.drafted ? 100.0 * (double)ss.accepted / (double)ss.drafted : 0.0,
                    ss.rounds ? (double)ss.emitted / (double)ss.rounds : 0.0,
                    (unsigned long long)ss.rounds, ss.draft_s * 1e3, ss.verify_s * 1e3,
                    kiln_spec_speedup(&ss), (unsigned long long)ss.plain,
                    ss.plain ? ss.plain_s / (double)ss.plain * 1e3 : 0.0);
    }
    rc = 0;
    goto out;
fail:
    rc = cli_fail(ctx, "generate", st);
out:
    free(logits);
    free(ids);
    kiln_gen_free(g);
    kiln_engine_free(e);
    kiln_engine_free(de);
    kiln_tokenizer_free(tok);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
    cli_free(opts, NULL);
    return rc;
}
