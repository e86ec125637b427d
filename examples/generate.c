/*
 * generate.c — greedy or sampled generation on kiln.h: load a model
 * directory, pack it into an inference engine (KV cache), then run the
 * library's generation loop (kiln_generate: prefill the prompt in one
 * pass, then decode one token at a time), printing each token's text as
 * it comes.
 *
 *   build/examples/generate MODEL_DIR [PROMPT] [MAX_TOKENS] [TEMPERATURE]
 *
 * Prints the prompt followed by the continuation (whole UTF-8 characters
 * only) and, on stderr, why it stopped.
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

/* Called for every generated token: print what it releases. */
static bool print_token(void *user, const kiln_gen_token *t)
{
    (void)user;
    fwrite(t->text, 1, t->len, stdout);
    fflush(stdout);
    return true;
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
    const kiln_config cfg = *kiln_model_config(model);
    kiln_engine_opts eo = kiln_engine_opts_default();
    kiln_engine *eng;
    if (kiln_engine_new(ctx, model, &eo, &eng)) return die(ctx, "engine");
    kiln_model_free(model); /* the engine holds its own copy of the weights */

    /* The prompt's tokens with the model's BOS rule; an empty prompt
     * starts from BOS or end-of-text. */
    int32_t *text_ids, *seq;
    size_t n_text, n;
    if (kiln_tokenizer_encode(ctx, tok, prompt, strlen(prompt), &text_ids, &n_text))
        return die(ctx, "encode");
    if (kiln_prompt_ids(ctx, &cfg, tok, text_ids, n_text, &seq, &n)) return die(ctx, "prompt");
    free(text_ids);

    kiln_gen_opts go = kiln_gen_opts_default();
    go.sampling.temperature = temperature;
    go.sampling.seed = 1;
    go.max_tokens = max_tokens > 0 ? max_tokens : 1;
    kiln_gen *g;
    if (kiln_gen_new(ctx, tok, &cfg, &go, seq, n, &g)) return die(ctx, "generation options");
    float *logits = malloc(sizeof(float) * (size_t)cfg.vocab_size);
    if (!logits) return die(ctx, "out of memory");
    fputs(prompt, stdout);
    if (kiln_generate(ctx, eng, 0, g, seq, n, logits, print_token, NULL))
        return die(ctx, "generate");
    fputc('\n', stdout);
    fprintf(stderr, "generate: %d tokens, stopped by %s\n", kiln_gen_count(g),
            kiln_finish_name(kiln_gen_finished(g)));

    kiln_gen_free(g);
    free(logits);
    free(seq);
    kiln_engine_free(eng);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    return 0;
}
