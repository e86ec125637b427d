/*
 * teacher.c — a distillation teacher held for inference only: the model
 * (a directory or a .gguf file) goes into an inference engine with the
 * weight storage asked for (fp32, bf16 or a quantized type; a .gguf's own
 * blocks as they are), the fp32 model is freed, and each row of a batch
 * is one prefill from position 0 with every position's logits kept. No
 * gradient, no optimizer state, no activations kept for a backward: the
 * teacher costs its weights, one slot's KV cache and one chunk of logits.
 * An fp32 teacher's logits are the training forward's bit for bit (the
 * engine runs a fresh sequence's chunk through the same flash attention;
 * test_engine_equals_forward).
 */
#include "infer/infer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kiln_teacher {
    kiln_engine *e;
    int T;
    kiln_engine_tok *toks; /* (T) one row's entries */
};

/* Whether path is a GGUF file (its first bytes are "GGUF"), whose own
 * quantized blocks the engine then keeps. */
static bool is_gguf_file(const char *path)
{
    char magic[4] = {0};
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    size_t n = fread(magic, 1, 4, f);
    fclose(f);
    return n == 4 && !memcmp(magic, "GGUF", 4);
}

kiln_status kiln_teacher_new(kiln_ctx *ctx, const char *path, kiln_dtype wtype, int T,
                             kiln_teacher **out)
{
    *out = NULL;
    if (T < 1)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "teacher: context T = %d must be positive",
                         T);
    kiln_model *m = NULL;
    kiln_status s = kiln_model_load(ctx, path, &m);
    if (s) return kiln_fail(ctx, s, "teacher %s: %s", path, kiln_errmsg(ctx));
    const kiln_config *cfg = kiln_model_config(m);
    if (T > cfg->n_ctx) {
        int n_ctx = cfg->n_ctx; /* cfg is the model's: read before it is freed */
        kiln_model_free(m);
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "teacher %s: sequences of %d tokens exceed its context (n_ctx %d)",
                         path, T, n_ctx);
    }
    kiln_teacher *t = calloc(1, sizeof *t);
    if (!t || !(t->toks = malloc((size_t)T * sizeof *t->toks))) {
        free(t);
        kiln_model_free(m);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "teacher: out of memory");
    }
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.n_slots = 1;
    eo.n_ctx = T;
    eo.chunk = T;
    eo.wtype = wtype;
    eo.weights_gguf = is_gguf_file(path) ? path : NULL;
    s = kiln_engine_new(ctx, m, &eo, &t->e);
    kiln_model_free(m);
    if (s) {
        kiln_teacher_free(t);
        return kiln_fail(ctx, s, "teacher %s: %s", path, kiln_errmsg(ctx));
    }
    t->T = T;
    *out = t;
    return KILN_OK;
}

const kiln_config *kiln_teacher_config(const kiln_teacher *t) { return kiln_engine_config(t->e); }

size_t kiln_teacher_weight_bytes(const kiln_teacher *t) { return kiln_engine_weight_bytes(t->e); }

kiln_status kiln_teacher_logits(void *teacher, kiln_ctx *ctx, const int32_t *tokens, int B,
                                int T, float *logits)
{
    kiln_teacher *t = teacher;
    if (B < 1 || T < 1 || T > t->T)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "teacher: a batch of %d x %d tokens (at most %d per row)", B, T, t->T);
    const size_t V = (size_t)kiln_engine_config(t->e)->vocab_size;
    kiln_status s = KILN_OK;
    for (int b = 0; b < B && !s; b++) {
        kiln_engine_reset(t->e, 0);
        for (int j = 0; j < T; j++)
            t->toks[j] = (kiln_engine_tok){0, tokens[(size_t)b * T + j], true};
        s = kiln_engine_step(ctx, t->e, t->toks, T, logits + (size_t)b * T * V);
    }
    kiln_engine_reset(t->e, 0);
    return s;
}

void kiln_teacher_free(kiln_teacher *t)
{
    if (!t) return;
    kiln_engine_free(t->e);
    free(t->toks);
    free(t);
}
