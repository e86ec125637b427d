/*
 * fuzz_tokenizer_json.c — libFuzzer harness for the tokenizer.json loader:
 * any byte string is either rejected with a message or loads into a
 * tokenizer that encodes the input itself and decodes it back to exactly
 * the same bytes (its NFC form, with Qwen2's normalizer), and that saves to a tokenizer.json which loads again.
 */
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kiln_ctx *ctx = kiln_ctx_new();
    json_t *root = NULL;
    kiln_tokenizer *t = NULL;
    if (js_load_buf(ctx, (const char *)data, size, "fuzz", &root) == KILN_OK &&
        tok_load_hf_json(ctx, root, "fuzz", &t) == KILN_OK) {
        int32_t *ids;
        size_t n;
        if (kiln_tokenizer_encode(ctx, t, (const char *)data, size, &ids, &n) == KILN_OK) {
            char *back;
            size_t bl;
            KILN_ASSERT(kiln_tokenizer_decode(ctx, t, ids, n, &back, &bl) == KILN_OK);
            /* an NFC normalizer changes text that is not NFC (as HF's) */
            char *norm = NULL;
            size_t nl = 0;
            bool exact = !t->nfc || (tok_nfc((const char *)data, size, &norm, &nl) && !norm);
            free(norm);
            KILN_ASSERT(!exact || (bl == size && memcmp(back, data, size) == 0));
            free(back);
            free(ids);
        }
        json_t *doc = tok_to_hf_json(t);
        if (doc) {
            kiln_tokenizer *u = NULL;
            KILN_ASSERT(tok_load_hf_json(ctx, doc, "fuzz-saved", &u) == KILN_OK);
            KILN_ASSERT(kiln_tokenizer_vocab_size(u) == kiln_tokenizer_vocab_size(t));
            kiln_tokenizer_free(u);
            json_decref(doc);
        }
    }
    kiln_tokenizer_free(t);
    json_decref(root);
    kiln_ctx_free(ctx);
    return 0;
}
