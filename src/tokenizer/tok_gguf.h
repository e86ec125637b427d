/*
 * tok_gguf.h — the tokenizer in GGUF metadata (tokenizer layer, private,
 * for the layers above that write GGUF files): tokenizer.ggml.model
 * "gpt2" with tokens, token_type, merges, pre, the special ids and the
 * chat template (docs/formats.md, "GGUF").
 */
#ifndef KILN_TOK_GGUF_H
#define KILN_TOK_GGUF_H

#include "io/gguf.h"

/* The ids written beside the vocabulary. */
typedef struct tok_gguf_ids {
    int32_t bos, eos, pad; /* -1: the end-of-text id */
    bool add_bos;          /* tokenizer.ggml.add_bos_token */
    int32_t n_vocab;       /* tokens to write (>= the tokenizer's; the ids
                              past it are unused placeholders), 0: its own */
} tok_gguf_ids;

/* Appends the tokenizer.* keys for tok. Fails (naming the tokenizer) when
 * llama.cpp could not reproduce its pre-tokenization: a pattern other
 * than GPT-2's or Llama 3's, or add_prefix_space. */
kiln_status tok_gguf_write(kiln_ctx *ctx, const kiln_tokenizer *tok, gguf_writer *w,
                           const tok_gguf_ids *ids);
/* Builds a tokenizer from f's tokenizer.ggml.* keys (`what` names the
 * file); errors name the key or token. */
kiln_status tok_gguf_read(kiln_ctx *ctx, const gguf_file *f, const char *what,
                          kiln_tokenizer **out);

#endif /* KILN_TOK_GGUF_H */
