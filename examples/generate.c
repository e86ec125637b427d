/*
 * generate.c — greedy or sampled generation on kiln.h: load a model
 * directory, pack it into an inference engine (KV cache), prefill the
 * prompt in one pass, then decode one token at a time.
 *
 *   build/examples/generate MODEL_DIR [PROMPT] [MAX_TOKENS] [TEMPERATURE]
 *
 * Prints the prompt followed by the continuation, streamed through
 * kiln_textstream (whole UTF-8 characters only).
 */
#include "kiln.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int die(kiln_ctx *ctx, const char *what)
{
    fprintf(stderr, "generate: %s: %s\n", what, kiln_errmsg(ctx));
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [PROMPT] [MAX_TOKENS] [TEMPERATURE]\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    const char *prompt = argc > 2 ? argv[2] : "";
    int max_tokens = argc > 3 ? atoi(argv[3]) : 64;
    float temperature = argc > 4 ? (float)atof(argv[4]) : 0.0f;

    kiln_ctx *ctx = kiln_ctx_new();
    kiln_model *model;
    kiln_tokenizer *tok;
    if (kiln_model_load(ctx, dir, &model)) return die(ctx, "model");
    if (kiln_tokenizer_load(ctx, dir, &tok)) return die(ctx, "tokenizer");
    kiln_engine_opts eo = kiln_engine_opts_default();
    kiln_engine *eng;
    if (kiln_engine_new(ctx, model, &eo, &eng)) return die(ctx, "engine");
    int V = kiln_model_config(model)->vocab_size;
    int n_ctx = kiln_engine_n_ctx(eng);

    /* The prompt's tokens; an empty prompt starts from end-of-text (the
     * document separator the model was trained with). */
    int32_t *seq;
    size_t n;
    if (kiln_tokenizer_encode(ctx, tok, prompt, strlen(prompt), &seq, &n))
        return die(ctx, "encode");
    if (n == 0) {
        seq = realloc(seq, sizeof(int32_t));
        seq[0] = kiln_tokenizer_eot(tok);
        n = 1;
    }
    if ((int)n + max_tokens > n_ctx) max_tokens = n_ctx - (int)n;

    float *logits = malloc(sizeof(float) * V);
    if (kiln_engine_prefill(ctx, eng, 0, seq, (int)n, logits))
        return die(ctx, "prefill");
    kiln_sampling sp = kiln_sampling_default();
    sp.temperature = temperature;
    sp.seed = 1;
    kiln_sampler *smp;
    if (kiln_sampler_new(ctx, &sp, V, &smp)) return die(ctx, "sampler");
    kiln_sampler_add_prompt(smp, seq, n);

    kiln_textstream *ts;
    if (kiln_textstream_new(ctx, tok, NULL, 0, &ts)) return die(ctx, "textstream");
    const char *out;
    size_t len;
    bool stopped = false;
    fputs(prompt, stdout);
    for (int i = 0; i < max_tokens && !stopped; i++) {
        int32_t next = kiln_sampler_sample(smp, logits, NULL, NULL);
        if (next == kiln_tokenizer_eot(tok)) break;
        if (kiln_textstream_push(ctx, ts, next, &out, &len, &stopped))
            return die(ctx, "decode");
        fwrite(out, 1, len, stdout);
        fflush(stdout);
        kiln_engine_tok et = {.slot = 0, .token = next, .want_logits = true};
        if (kiln_engine_step(ctx, eng, &et, 1, logits)) return die(ctx, "decode step");
    }
    kiln_textstream_finish(ts, &out, &len);
    fwrite(out, 1, len, stdout);
    fputc('\n', stdout);

    kiln_textstream_free(ts);
    kiln_sampler_free(smp);
    free(logits);
    free(seq);
    kiln_engine_free(eng);
    kiln_tokenizer_free(tok);
    kiln_model_free(model);
    kiln_ctx_free(ctx);
    return 0;
}
