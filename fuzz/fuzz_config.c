/*
 * fuzz_config.c — libFuzzer harness for config.json parsing: any byte
 * string is rejected with a message or yields a config that validates,
 * whose parameter count is computable, and which survives a save/parse
 * round trip unchanged.
 */
#include "model/model.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_log_level(ctx, KILN_LOG_ERROR);
    json_t *o;
    if (js_load_buf(ctx, (const char *)data, size, "fuzz", &o) == KILN_OK) {
        kiln_config c, d;
        if (config_from_json(ctx, o, "fuzz", &c) == KILN_OK) {
            KILN_ASSERT(kiln_config_validate(ctx, &c) == KILN_OK);
            (void)kiln_config_num_params(&c);
            json_t *back = config_to_json(&c);
            KILN_ASSERT(config_from_json(ctx, back, "fuzz", &d) == KILN_OK);
            KILN_ASSERT(c.arch == d.arch && c.n_layer == d.n_layer && c.n_embd == d.n_embd &&
                        c.n_head == d.n_head && c.n_kv_head == d.n_kv_head &&
                        c.n_inner == d.n_inner && c.vocab_size == d.vocab_size &&
                        c.n_ctx == d.n_ctx && c.norm_eps == d.norm_eps &&
                        c.tie_embeddings == d.tie_embeddings && c.bias == d.bias);
            json_decref(back);
        }
        json_decref(o);
    }
    kiln_ctx_free(ctx);
    return 0;
}
