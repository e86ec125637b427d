/*
 * spec.c — speculative decoding (Leviathan et al. 2023, Chen et al. 2023;
 * llama.cpp's and vLLM's draft-model mode). A small draft model proposes
 * K tokens one at a time on its own engine and KV cache; the target then
 * scores the last token and all K drafts in one batched forward step (a
 * prefill-style chunk on its cache) and keeps the longest acceptable
 * prefix. The rule keeps the output distributed exactly as the target's:
 * draft token x, drawn from q, is accepted with probability
 * min(1, p(x)/q(x)); at the first rejection the token is drawn from
 * max(0, p - q) renormalised; when all K are accepted the target's logits
 * at the end give one more (bonus) token. p and q are the two models'
 * distributions after the same sampling settings (penalties with the same
 * history, temperature, top-k, top-p, min-p), so with temperature 0 both
 * are one-hot and the output is the target's greedy output. The KV
 * entries of rejected drafts are dropped by cutting both caches back
 * (kiln_engine_copy_prefix of a slot onto itself).
 */
#include "infer/spec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- the accept/reject rule ------------------------------------------ */

int32_t infer_spec_accept(kiln_rng *rng, const float *p, const float *q, int32_t x, int V,
                          float *resid, bool *accepted)
{
    /* p(x) >= q(x): accepted for certain (greedy never draws here) */
    if (p[x] >= q[x] || (p[x] > 0 && (double)kiln_rng_uniform(rng) * q[x] < p[x])) {
        *accepted = true;
        return x;
    }
    *accepted = false;
    double sum = 0;
    for (int i = 0; i < V; i++) {
        float r = p[i] - q[i];
        resid[i] = r > 0 ? r : 0;
        sum += resid[i];
    }
    /* p == q up to rounding (a rejection then has probability ~0): p */
    return infer_sample_draw(rng, sum > 0 ? resid : p, V);
}

kiln_status infer_spec_init(kiln_ctx *ctx, infer_spec *sp, kiln_gen *g, int V, int K)
{
    memset(sp, 0, sizeof *sp);
    sp->V = V;
    sp->K = K;
    kiln_sampling s = infer_gen_opts(g)->sampling;
    s.seed = s.seed * 0x9E3779B97F4A7C15ull + 0x5bd1e995u; /* its own stream */
    kiln_status st = kiln_sampler_new(ctx, &s, V, &sp->ds);
    if (st) return st;
    sp->q = kiln_malloc(ctx, (size_t)K * V * sizeof *sp->q);
    sp->p = kiln_malloc(ctx, (size_t)V * sizeof *sp->p);
    sp->raw = kiln_malloc(ctx, (size_t)V * sizeof *sp->raw);
    sp->d = kiln_malloc(ctx, (size_t)K * sizeof *sp->d);
    if (!sp->q || !sp->p || !sp->raw || !sp->d) {
        infer_spec_free(sp);
        return KILN_ERR_NOMEM;
    }
    return KILN_OK;
}

void infer_spec_free(infer_spec *sp)
{
    kiln_sampler_free(sp->ds);
    free(sp->q);
    free(sp->p);
    free(sp->raw);
    free(sp->d);
    memset(sp, 0, sizeof *sp);
}

void infer_spec_begin(infer_spec *sp, kiln_gen *g)
{
    infer_sampler_copy_history(sp->ds, infer_gen_sampler(g));
    sp->k = 0;
}

int32_t infer_spec_draft(infer_spec *sp, float *logits)
{
    float *q = sp->q + (size_t)sp->k * sp->V;
    infer_sample_dense(sp->ds, logits, q);
    int32_t x = infer_sample_draw(infer_sampler_rng(sp->ds), q, sp->V);
    infer_sampler_take(sp->ds, NULL, x, NULL, NULL);
    sp->d[sp->k++] = x;
    return x;
}

int32_t infer_spec_decide(infer_spec *sp, kiln_gen *g, int i, float *logits, bool *accepted)
{
    kiln_sampler *s = infer_gen_sampler(g);
    memcpy(sp->raw, logits, (size_t)sp->V * sizeof *sp->raw);
    infer_sample_dense(s, logits, sp->p);
    if (i >= sp->k) { /* every draft accepted: the bonus token, from p */
        *accepted = false;
        return infer_sample_draw(infer_sampler_rng(s), sp->p, sp->V);
    }
    /* the residual may overwrite the logits (scratch) */
    return infer_spec_accept(infer_sampler_rng(s), sp->p, sp->q + (size_t)i * sp->V, sp->d[i],
                             sp->V, logits, accepted);
}

/* ---- the loop for one sequence --------------------------------------- */

kiln_status kiln_spec_check(kiln_ctx *ctx, const kiln_config *target, const kiln_tokenizer *ttok,
                            const kiln_config *draft, const kiln_tokenizer *dtok)
{
    if (target->vocab_size != draft->vocab_size)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "the draft model's vocabulary is %d tokens and the target's %d: a draft "
                         "must share the target's tokenizer and vocabulary",
                         draft->vocab_size, target->vocab_size);
    if (!dtok) return KILN_OK;
    int n = kiln_tokenizer_vocab_size(ttok);
    if (kiln_tokenizer_vocab_size(dtok) != n)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "the draft's tokenizer has %d tokens and the target's %d: a draft must "
                         "share the target's tokenizer",
                         kiln_tokenizer_vocab_size(dtok), n);
    for (int32_t id = 0; id < n; id++) {
        char *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        kiln_status st = kiln_tokenizer_decode(ctx, ttok, &id, 1, &a, &na);
        if (!st) st = kiln_tokenizer_decode(ctx, dtok, &id, 1, &b, &nb);
        bool same = !st && na == nb && !memcmp(a, b, na) &&
                    kiln_tokenizer_is_special(ttok, id) == kiln_tokenizer_is_special(dtok, id);
        free(a);
        free(b);
        if (st) return st;
        if (!same)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "the draft's tokenizer differs from the target's at token %d: a "
                             "draft must share the target's tokenizer",
                             (int)id);
    }
    return KILN_OK;
}

/* The first decode steps run the target alone: their time is the
 * reference the speed-up estimate is reported against. */
enum { SPEC_CALIB = 3, SPEC_PEND = SPEC_CALIB + 8 };

typedef struct spec_run {
    kiln_ctx *ctx;
    kiln_engine *e, *de;
    int slot, n_ctx, d_ctx, V;
    kiln_gen *g;
    kiln_gen_cb cb;
    void *user;
    kiln_spec_stats *stats;
    bool done;         /* finished or cancelled */
} spec_run;

/* Hands token t (fed, when the sequence goes on, at position fed_pos) to
 * the callback with kiln_generate's rules: a full context ends it, a
 * callback returning false cancels it. Sets r->done when it ended. */
static void deliver(spec_run *r, kiln_gen_token *t, int fed_pos)
{
    if (t->finish == KILN_FINISH_NONE && fed_pos >= r->n_ctx) {
        const char *tail;
        size_t nt, n0;
        kiln_gen_end(r->g, KILN_FINISH_LENGTH, &tail, &nt);
        const char *all = kiln_gen_text(r->g, &n0);
        t->text = all + (n0 - nt - t->len);
        t->len += nt;
        t->finish = KILN_FINISH_LENGTH;
    }
    if (r->cb && !r->cb(r->user, t) && t->finish == KILN_FINISH_NONE) {
        const char *tail;
        size_t nt;
        kiln_gen_end(r->g, KILN_FINISH_CANCELLED, &tail, &nt);
        if (nt) {
            kiln_gen_token u = {.id = -1, .text = tail, .len = nt,
                                .finish = KILN_FINISH_CANCELLED};
            r->cb(r->user, &u);
        }
        r->done = true;
    }
    if (t->finish != KILN_FINISH_NONE) r->done = true;
}

static kiln_status timed_step(spec_run *r, kiln_engine *e, const kiln_engine_tok *tk, int T,
                              float *logits, double *acc)
{
    double t0 = kiln_time_now();
    kiln_status st = kiln_engine_step(r->ctx, e, tk, T, logits);
    *acc += kiln_time_now() - t0;
    return st;
}

/* One round: drafts k tokens after `last` (the draft first catches up on
 * pend[0..np), the committed tokens it has not seen), verifies them in one
 * target step and emits the tokens decided. On return *last is the new
 * last token and pend holds what the draft still lacks. */
static kiln_status round_spec(spec_run *r, infer_spec *sp, int k, int32_t *last, int32_t *pend,
                              int *np, float *rows, kiln_engine_tok *tk)
{
    const int tpos = kiln_engine_pos(r->e, r->slot), V = r->V;
    kiln_status st;
    infer_spec_begin(sp, r->g);
    pend[(*np)++] = *last;
    for (int i = 0; i < *np; i++) tk[i] = (kiln_engine_tok){r->slot, pend[i], i == *np - 1};
    if ((st = timed_step(r, r->de, tk, *np, rows, &r->stats->draft_s))) return st;
    *np = 0;
    int32_t x = infer_spec_draft(sp, rows);
    for (int i = 1; i < k; i++) {
        tk[0] = (kiln_engine_tok){r->slot, x, true};
        if ((st = timed_step(r, r->de, tk, 1, rows, &r->stats->draft_s))) return st;
        x = infer_spec_draft(sp, rows);
    }
    /* the target scores last and the k drafts at once */
    tk[0] = (kiln_engine_tok){r->slot, *last, true};
    for (int i = 0; i < k; i++) tk[1 + i] = (kiln_engine_tok){r->slot, sp->d[i], true};
    if ((st = timed_step(r, r->e, tk, k + 1, rows, &r->stats->verify_s))) return st;
    int n_e = 0, acc = 0;
    for (int i = 0; i <= k && !r->done; i++) {
        bool ok;
        int32_t id = infer_spec_decide(sp, r->g, i, rows + (size_t)i * V, &ok);
        kiln_gen_token t;
        if ((st = infer_gen_push(r->ctx, r->g, sp->raw, id, &t))) return st;
        n_e++;
        acc += ok;
        *last = id;
        deliver(r, &t, tpos + 1 + i);
        if (!ok) break;
    }
    r->stats->rounds++;
    r->stats->drafted += (uint64_t)k;
    r->stats->accepted += (uint64_t)acc;
    r->stats->emitted += (uint64_t)n_e;
    /* the caches keep last and the accepted drafts that were emitted and
     * fed; the draft was fed last and d[0..k-2] */
    if ((st = kiln_engine_copy_prefix(r->ctx, r->e, r->slot, r->slot, tpos + n_e))) return st;
    int dkeep = KILN_MIN(tpos + k, tpos + n_e);
    if ((st = kiln_engine_copy_prefix(r->ctx, r->de, r->slot, r->slot, dkeep))) return st;
    if (n_e == k + 1) pend[(*np)++] = sp->d[k - 1];
    return KILN_OK;
}

kiln_spec_opts kiln_spec_opts_default(void) { return (kiln_spec_opts){.n_draft = 4}; }

kiln_status kiln_generate_spec(kiln_ctx *ctx, kiln_engine *e, kiln_engine *draft,
                               const kiln_spec_opts *o, int slot, kiln_gen *g,
                               const int32_t *prompt, size_t n, kiln_gen_cb cb, void *user,
                               kiln_spec_stats *stats)
{
    const int n_draft = o ? o->n_draft : kiln_spec_opts_default().n_draft;
    kiln_spec_stats local;
    if (!stats) stats = &local;
    memset(stats, 0, sizeof *stats);
    const kiln_config *tc = kiln_engine_config(e), *dc = kiln_engine_config(draft);
    kiln_status st = kiln_spec_check(ctx, tc, NULL, dc, NULL);
    if (st) return st;
    if (n_draft < 1 || n_draft > KILN_SPEC_MAX_DRAFT || n_draft + 1 > kiln_engine_chunk(e))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_spec_opts.n_draft = %d must be in 1..%d (and below the target "
                         "engine's kiln_engine_opts.chunk %d)",
                         n_draft, KILN_SPEC_MAX_DRAFT, kiln_engine_chunk(e));
    if (slot < 0 || slot >= kiln_engine_n_slots(e) || slot >= kiln_engine_n_slots(draft))
        return kiln_fail(ctx, KILN_ERR_RANGE, "kiln_generate_spec: slot %d out of range", slot);
    if (kiln_engine_pos(e, slot) != kiln_engine_pos(draft, slot))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_generate_spec: the draft's slot %d holds %d tokens and the "
                         "target's %d; they must hold the same (reset both)",
                         slot, kiln_engine_pos(draft, slot), kiln_engine_pos(e, slot));
    const int V = tc->vocab_size, K = n_draft;
    spec_run r = {ctx, e, draft, slot, kiln_engine_n_ctx(e), kiln_engine_n_ctx(draft), V,
                  g, cb, user, stats, false};
    if (n == 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_generate_spec: an empty prompt (kiln_prompt_ids gives one to start from)");
    if ((size_t)kiln_engine_pos(e, slot) + n >= (size_t)r.n_ctx)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "the prompt is %zu tokens and the slot holds %d; the context is %d", n,
                         kiln_engine_pos(e, slot), r.n_ctx);
    /* a draft whose context cannot hold the prompt is not used */
    bool draft_on = (size_t)kiln_engine_pos(draft, slot) + n < (size_t)r.d_ctx;
    float *rows = kiln_malloc(ctx, (size_t)(K + 1) * V * sizeof *rows);
    kiln_engine_tok *tk = kiln_malloc(ctx, (size_t)(K + SPEC_PEND) * sizeof *tk);
    int32_t pend[SPEC_PEND];
    int np = 0;
    infer_spec sp = {0};
    if (!rows || !tk) st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!st) st = infer_spec_init(ctx, &sp, g, V, K);
    if (!st) st = kiln_engine_prefill(ctx, e, slot, prompt, (int)n, rows);
    if (!st && draft_on) st = kiln_engine_prefill(ctx, draft, slot, prompt, (int)n, NULL);
    int32_t last = -1;
    if (!st) {
        kiln_gen_token t;
        st = kiln_gen_next(ctx, g, rows, &t);
        if (!st) {
            last = t.id;
            deliver(&r, &t, kiln_engine_pos(e, slot));
        }
    }
    while (!st && !r.done) {
        const int tpos = kiln_engine_pos(e, slot);
        int left = infer_gen_opts(g)->max_tokens - kiln_gen_count(g);
        int k = KILN_MIN(K, KILN_MIN(left - 1, KILN_MIN(r.n_ctx - tpos - 1, r.d_ctx - tpos)));
        /* a full draft context (or pending tokens it can no longer take)
         * ends drafting for good; near max_tokens the target goes alone */
        if (draft_on && (r.d_ctx - tpos < 1 || np >= SPEC_PEND - 2)) draft_on = false;
        if (draft_on && k >= 1 && stats->plain >= SPEC_CALIB) {
            st = round_spec(&r, &sp, k, &last, pend, &np, rows, tk);
            continue;
        }
        /* a plain target step (the first ones measure its time) */
        tk[0] = (kiln_engine_tok){slot, last, true};
        double p0 = stats->plain_s;
        if ((st = timed_step(&r, e, tk, 1, rows, &stats->plain_s))) break;
        if (!stats->plain || stats->plain_s - p0 < stats->plain_min_s)
            stats->plain_min_s = stats->plain_s - p0;
        stats->plain++;
        if (draft_on) pend[np++] = last;
        kiln_gen_token t;
        if ((st = kiln_gen_next(ctx, g, rows, &t))) break;
        last = t.id;
        deliver(&r, &t, tpos + 1);
    }
    /* leave the draft holding what the target holds (all but the last) */
    if (!st && draft_on && np > 0) {
        for (int i = 0; i < np; i++) tk[i] = (kiln_engine_tok){slot, pend[i], false};
        st = kiln_engine_step(ctx, draft, tk, np, NULL);
    }
    infer_spec_free(&sp);
    free(rows);
    free(tk);
    return st;
}

double kiln_spec_speedup(const kiln_spec_stats *s)
{
    if (s->plain < 1 || s->rounds < 1) return 0;
    /* one target step, one token: the mean, as the rounds' time is a sum
     * (a best-of against a mean would flatter neither fairly) */
    double t1 = s->plain_s / (double)s->plain;
    double spec_rate = (double)s->emitted / (s->draft_s + s->verify_s);
    return spec_rate * t1;
}
