/*
 * fuzz_gguf.c — libFuzzer harness for the GGUF reader: any byte string is
 * either rejected with a message or parsed into metadata and tensors that
 * lie inside the buffer; every value of an accepted file is then read
 * (integers, floats, strings, string arrays), every tensor with a
 * conversion is widened to fp32 (touching every byte), and the model and
 * tokenizer readers run on it.
 */
#include "io/gguf.h"
#include "model/model.h"
#include "tokenizer/tok_gguf.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_log_level(ctx, KILN_LOG_ERROR);
    gguf_file f;
    if (gguf_parse(ctx, data, size, "fuzz", &f) == KILN_OK) {
        for (int64_t i = 0; i < f.n_kv; i++) {
            const gguf_kv *kv = &f.kv[i];
            KILN_ASSERT(kv->val >= data && kv->val + kv->val_size <= data + size);
            int64_t v;
            double d;
            bool b;
            const char *s;
            size_t n;
            gguf_get_int(ctx, &f, "fuzz", kv->key, true, &v);
            gguf_get_float(ctx, &f, "fuzz", kv->key, true, &d);
            gguf_get_bool(ctx, &f, "fuzz", kv->key, true, &b);
            gguf_get_str(ctx, &f, "fuzz", kv->key, true, &s, &n);
            if (kv->type == GGUF_TYPE_ARRAY && kv->arr_type == GGUF_TYPE_STRING) {
                const char **ps;
                size_t *pl;
                if (gguf_arr_strs(ctx, kv, &ps, &pl) == KILN_OK) {
                    for (uint64_t k = 0; k < kv->n; k++)
                        KILN_ASSERT((const uint8_t *)ps[k] + pl[k] <= data + size);
                    free(ps);
                    free(pl);
                }
            }
        }
        for (int64_t i = 0; i < f.n_tensors; i++) {
            const gguf_tensor *t = &f.tensors[i];
            KILN_ASSERT(t->data >= data && t->data + t->bytes <= data + size);
            const dtype_traits *tr = dtype_traits_of(t->type);
            if (!tr->to_float || t->ne[0] <= 0 || t->ne[0] > (1 << 16)) continue;
            float *row = malloc((size_t)t->ne[0] * sizeof(float));
            size_t rb = dtype_row_bytes(t->type, t->ne[0]);
            for (size_t off = 0; row && off + rb <= t->bytes && off < (1u << 20); off += rb)
                tr->to_float(t->data + off, row, t->ne[0]);
            free(row);
        }
        kiln_config c;
        if (model_gguf_config(ctx, &f, "fuzz", &c) == KILN_OK &&
            kiln_config_num_params(&c) < (1u << 22)) {
            kiln_model *m = NULL;
            if (kiln_model_new(ctx, &c, &m) == KILN_OK) model_gguf_load_weights(ctx, m, &f, "fuzz");
            kiln_model_free(m);
        }
        kiln_tokenizer *tok = NULL;
        if (tok_gguf_read(ctx, &f, "fuzz", &tok) == KILN_OK) kiln_tokenizer_free(tok);
        gguf_close(&f);
    }
    kiln_ctx_free(ctx);
    return 0;
}
