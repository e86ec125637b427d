/*
 * gen.c — the generation loop, once: the BOS rule for prompts, and the
 * per-sequence state that turns next-token logits into a token, its text
 * and a finish reason (sampler, end-of-text and stop tokens, max_tokens,
 * stop strings through the text stream). `kiln generate`, `kiln chat`, the
 * server's scheduler and examples/generate.c all run it: a single sequence
 * through kiln_generate(), the server one kiln_gen_next() per slot of its
 * batched engine step.
 */
#include "infer/spec.h"

#include <stdlib.h>
#include <string.h>

struct kiln_gen {
    kiln_gen_opts o;
    const kiln_tokenizer *tok;
    kiln_sampler *smp;
    kiln_textstream *ts;
    int32_t *stop_ids; /* (n_stop_ids) copied */
    int eot, eos;      /* end-of-text of the tokenizer, eos_token_id of the model (-1) */
    int n;             /* tokens generated */
    kiln_finish finish;
    kiln_token_logprob top[20];
};

kiln_gen_opts kiln_gen_opts_default(void)
{
    return (kiln_gen_opts){.sampling = kiln_sampling_default(), .max_tokens = 256,
                           .skip_special = true};
}

const char *kiln_finish_name(kiln_finish f)
{
    switch (f) {
    case KILN_FINISH_NONE: return "none";
    case KILN_FINISH_LENGTH: return "length";
    case KILN_FINISH_EOS: return "end-of-text";
    case KILN_FINISH_STOP_TOKEN: return "stop token";
    case KILN_FINISH_STOP_STRING: return "stop string";
    case KILN_FINISH_CANCELLED: return "cancelled";
    }
    return "?";
}

kiln_status kiln_prompt_ids(kiln_ctx *ctx, const kiln_config *cfg, const kiln_tokenizer *tok,
                            const int32_t *ids, size_t n, int32_t **out, size_t *n_out)
{
    *out = NULL;
    *n_out = 0;
    /* Llama-family tokenizers add BOS to every prompt (and the model was
     * trained so); GPT-2's add nothing. An empty prompt starts from BOS or,
     * without one, the end-of-text separator the model was trained with. */
    bool bos = cfg->arch == KILN_ARCH_LLAMA && cfg->bos_token_id >= 0;
    /* a tokenizer.json template says itself what goes first (Hugging
     * Face's add_special_tokens); only the part before the text: a prompt
     * is continued, not closed */
    const int32_t *pre = NULL;
    int npre = kiln_tokenizer_post_ids(tok, false, &pre);
    size_t extra = npre >= 0 ? (size_t)npre : bos ? 1 : 0;
    if (n + extra == 0) extra = 1;
    int32_t *p = malloc((n + extra) * sizeof *p);
    if (!p) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (npre > 0) memcpy(p, pre, (size_t)npre * sizeof *p);
    else if (extra) p[0] = cfg->bos_token_id >= 0 ? cfg->bos_token_id : kiln_tokenizer_eot(tok);
    if (n) memcpy(p + extra, ids, n * sizeof *p);
    *out = p;
    *n_out = n + extra;
    return KILN_OK;
}

kiln_status kiln_gen_new(kiln_ctx *ctx, const kiln_tokenizer *tok, const kiln_config *cfg,
                         const kiln_gen_opts *o, const int32_t *prompt, size_t n_prompt,
                         kiln_gen **out)
{
    *out = NULL;
    if (o->max_tokens <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_gen_opts.max_tokens must be > 0 (got %d)", o->max_tokens);
    if (o->n_stops < 0 || o->n_stop_ids < 0 || (o->n_stops && !o->stops) ||
        (o->n_stop_ids && !o->stop_ids))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_gen_opts: n_stops/n_stop_ids without their arrays");
    for (int i = 0; i < o->n_stop_ids; i++)
        if (o->stop_ids[i] < 0 || o->stop_ids[i] >= cfg->vocab_size)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_gen_opts.stop_ids[%d] = %d is outside the vocabulary [0, %d)",
                             i, (int)o->stop_ids[i], cfg->vocab_size);
    kiln_gen *g = kiln_calloc(ctx, 1, sizeof *g);
    if (!g) return KILN_ERR_NOMEM;
    g->o = *o;
    g->o.stops = NULL;
    g->o.stop_ids = NULL;
    g->tok = tok;
    g->eot = kiln_tokenizer_eot(tok);
    g->eos = cfg->eos_token_id;
    kiln_status st = kiln_sampler_new(ctx, &o->sampling, cfg->vocab_size, &g->smp);
    if (!st) st = kiln_textstream_new(ctx, tok, o->stops, o->n_stops, &g->ts);
    if (!st && o->n_stop_ids) {
        g->stop_ids = kiln_malloc(ctx, (size_t)o->n_stop_ids * sizeof *g->stop_ids);
        if (!g->stop_ids) st = KILN_ERR_NOMEM;
        else memcpy(g->stop_ids, o->stop_ids, (size_t)o->n_stop_ids * sizeof *g->stop_ids);
    }
    if (st) {
        kiln_gen_free(g);
        return st;
    }
    kiln_sampler_add_prompt(g->smp, prompt, n_prompt);
    *out = g;
    return KILN_OK;
}

void kiln_gen_free(kiln_gen *g)
{
    if (!g) return;
    kiln_sampler_free(g->smp);
    kiln_textstream_free(g->ts);
    free(g->stop_ids);
    free(g);
}

int kiln_gen_count(const kiln_gen *g) { return g->n; }
kiln_finish kiln_gen_finished(const kiln_gen *g) { return g->finish; }

const char *kiln_gen_text(const kiln_gen *g, size_t *len)
{
    return kiln_textstream_text(g->ts, len);
}

void kiln_gen_end(kiln_gen *g, kiln_finish why, const char **text, size_t *len)
{
    *text = "";
    *len = 0;
    if (g->finish != KILN_FINISH_NONE) return;
    g->finish = why == KILN_FINISH_NONE ? KILN_FINISH_LENGTH : why;
    kiln_textstream_finish(g->ts, text, len);
}

static kiln_status gen_emit(kiln_ctx *ctx, kiln_gen *g, int32_t id, kiln_gen_token *t);

kiln_status kiln_gen_next(kiln_ctx *ctx, kiln_gen *g, float *logits, kiln_gen_token *t)
{
    memset(t, 0, sizeof *t);
    t->text = "";
    t->id = -1;
    if (g->finish != KILN_FINISH_NONE) {
        t->finish = g->finish;
        return KILN_OK;
    }
    bool lp = g->o.logprobs;
    int32_t id = kiln_sampler_sample(g->smp, logits, lp ? &t->chosen : NULL, lp ? g->top : NULL);
    return gen_emit(ctx, g, id, t);
}

kiln_status infer_gen_push(kiln_ctx *ctx, kiln_gen *g, const float *raw, int32_t id,
                           kiln_gen_token *t)
{
    memset(t, 0, sizeof *t);
    t->text = "";
    t->id = -1;
    if (g->finish != KILN_FINISH_NONE) {
        t->finish = g->finish;
        return KILN_OK;
    }
    bool lp = g->o.logprobs;
    infer_sampler_take(g->smp, raw, id, lp ? &t->chosen : NULL, lp ? g->top : NULL);
    return gen_emit(ctx, g, id, t);
}

kiln_sampler *infer_gen_sampler(kiln_gen *g) { return g->smp; }
const kiln_gen_opts *infer_gen_opts(const kiln_gen *g) { return &g->o; }

/* The token id was chosen (and recorded by the sampler): counts it,
 * decides whether it ends the sequence and releases its text into t. */
static kiln_status gen_emit(kiln_ctx *ctx, kiln_gen *g, int32_t id, kiln_gen_token *t)
{
    bool lp = g->o.logprobs;
    t->id = id;
    if (lp) {
        t->top = g->top;
        t->n_top = g->o.sampling.top_logprobs;
    }
    g->n++;
    kiln_finish why = KILN_FINISH_NONE;
    if (!g->o.ignore_eos && (id == g->eot || (g->eos >= 0 && id == g->eos)))
        why = KILN_FINISH_EOS;
    for (int i = 0; why == KILN_FINISH_NONE && i < g->o.n_stop_ids; i++)
        if (id == g->stop_ids[i]) why = KILN_FINISH_STOP_TOKEN;
    if (why != KILN_FINISH_NONE) {
        /* the ending token adds no text; what was held back is released */
        kiln_gen_end(g, why, &t->text, &t->len);
        t->finish = why;
        return KILN_OK;
    }
    bool stopped = false;
    if (!(g->o.skip_special && kiln_tokenizer_is_special(g->tok, id))) {
        /* (a special token is counted but adds no text: skip_special_tokens) */
        kiln_status st = kiln_textstream_push(ctx, g->ts, id, &t->text, &t->len, &stopped);
        if (st) return st;
    }
    if (stopped) {
        g->finish = KILN_FINISH_STOP_STRING;
    } else if (g->n >= g->o.max_tokens) {
        /* the token's text and the held-back tail together: copy the first
         * part, since finishing the stream may move its buffer */
        size_t n0;
        const char *all = kiln_textstream_text(g->ts, &n0);
        size_t start = n0 - t->len;
        const char *tail;
        size_t nt;
        g->finish = KILN_FINISH_LENGTH;
        kiln_textstream_finish(g->ts, &tail, &nt);
        all = kiln_textstream_text(g->ts, &n0);
        t->text = all + start;
        t->len = n0 - start;
    }
    t->finish = g->finish;
    return KILN_OK;
}

kiln_status kiln_generate(kiln_ctx *ctx, kiln_engine *e, int slot, kiln_gen *g,
                          const int32_t *prompt, size_t n, float *logits, kiln_gen_cb cb,
                          void *user)
{
    int n_ctx = kiln_engine_n_ctx(e);
    if (n == 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_generate: an empty prompt (kiln_prompt_ids gives one to start from)");
    if ((size_t)kiln_engine_pos(e, slot) + n >= (size_t)n_ctx)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "the prompt is %zu tokens and the slot holds %d; the context is %d",
                         n, kiln_engine_pos(e, slot), n_ctx);
    kiln_status st = kiln_engine_prefill(ctx, e, slot, prompt, (int)n, logits);
    if (st) return st;
    for (;;) {
        kiln_gen_token t;
        if ((st = kiln_gen_next(ctx, g, logits, &t))) return st;
        if (t.finish == KILN_FINISH_NONE && kiln_engine_pos(e, slot) >= n_ctx) {
            /* the context is full: this token has no room to be fed back */
            const char *tail;
            size_t nt;
            kiln_gen_end(g, KILN_FINISH_LENGTH, &tail, &nt);
            size_t n0;
            const char *all = kiln_gen_text(g, &n0);
            t.text = all + (n0 - nt - t.len);
            t.len += nt;
            t.finish = KILN_FINISH_LENGTH;
        }
        if (cb && !cb(user, &t) && t.finish == KILN_FINISH_NONE) {
            const char *tail;
            size_t nt;
            kiln_gen_end(g, KILN_FINISH_CANCELLED, &tail, &nt);
            if (nt) {
                kiln_gen_token u = {.id = -1, .text = tail, .len = nt,
                                    .finish = KILN_FINISH_CANCELLED};
                cb(user, &u);
            }
            return KILN_OK;
        }
        if (t.finish != KILN_FINISH_NONE) return KILN_OK;
        kiln_engine_tok tk = {slot, t.id, true};
        if ((st = kiln_engine_step(ctx, e, &tk, 1, logits))) return st;
    }
}
