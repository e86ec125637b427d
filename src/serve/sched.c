/*
 * sched.c — the continuous-batching scheduler. One thread owns the
 * engine. Each iteration it admits queued requests into free slots, builds
 * one forward step from every active slot (a decode entry for each slot
 * past its prompt, then prefill chunks of newcomers up to the step's
 * capacity), runs it, samples the next token of every slot that produced
 * logits, and publishes the new text to the waiting HTTP threads. A
 * request whose client went away is dropped at the next iteration, which
 * frees its slot. See serve.h for the threading rules.
 */
#include "serve/serve.h"
#include "infer/grammar.h"
#include "infer/spec.h"

#include <malloc.h>
#include <stdatomic.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

sreq *sreq_new(void)
{
    sreq *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    pthread_cond_init(&r->cv, NULL);
    r->refs = 1;
    r->slot = -1;
    r->stop_id = -1;
    return r;
}

void sreq_free(sreq *r)
{
    free(r->prompt);
    for (int i = 0; i < r->n_stops; i++) free(r->stops[i]);
    free(r->bias);
    free(r->text);
    free(r->lps);
    free(r->plps);
    free(r->emb);
    free(r->echo_text);
    infer_gstate_free(r->gst);
    sgrammar_release(r->gram);
    kiln_gen_free(r->gen);
    if (r->spec) infer_spec_free(r->spec);
    free(r->spec);
    pthread_cond_destroy(&r->cv);
    free(r);
}

void sgrammar_release(sgrammar *g)
{
    if (!g || atomic_fetch_sub(&g->refs, 1) != 1) return;
    infer_grammar_free(g->g);
    for (int i = 0; i < g->n_tools; i++) free(g->tools[i]);
    free(g->tools);
    free(g);
}

void sreq_release(sched *s, sreq *r)
{
    if (!r) return;
    pthread_mutex_lock(&s->mu);
    int left = --r->refs;
    pthread_mutex_unlock(&s->mu);
    if (left == 0) sreq_free(r);
}

/* Called with mu held. */
static void finish(sched *s, sreq *r, const char *why, int err_status,
                   const char *err)
{
    r->state = SREQ_DONE;
    r->finish = why;
    r->t_done = kiln_time_now();
    if (err_status) {
        r->err_status = err_status;
        snprintf(r->err, sizeof r->err, "%s", err);
    }
    if (r->slot >= 0) {
        s->slots[r->slot] = NULL;
        s->n_active--;
        r->slot = -1;
    }
    if (!err_status && !r->cancelled)
        metrics_observe(s->m.lat_b, &s->m.lat_n, &s->m.lat_sum, r->t_done - r->t_submit);
    pthread_cond_broadcast(&r->cv);
    if (r->grouped) pthread_cond_broadcast(&s->gcv);
    r->refs--; /* the scheduler's reference */
    if (r->refs == 0) {
        /* the HTTP side is gone too: free outside the lock is not needed,
         * nothing else can reach r any more */
        sreq_free(r);
    }
}

static bool append_text(sreq *r, const char *p, size_t n)
{
    if (r->text_len + n + 1 > r->text_cap) {
        size_t c = r->text_cap ? r->text_cap : 256;
        while (c < r->text_len + n + 1) c *= 2;
        char *t = realloc(r->text, c);
        if (!t) return false;
        r->text = t;
        r->text_cap = c;
    }
    memcpy(r->text + r->text_len, p, n);
    r->text_len += n;
    r->text[r->text_len] = 0;
    return true;
}

/* A choice of an n > 1 request waits while its leader's prompt is being
 * prefilled, then copies that cache instead of computing it again. */
static bool wait_for_leader(const sched *s, const sreq *r)
{
    if (!r->group || r->leader || r->prompt_lps) return false;
    for (int i = 0; i < s->n_slots; i++) {
        const sreq *o = s->slots[i];
        if (o && o->group == r->group && o->leader && !o->cancelled && o->n_fed < o->n_prompt)
            return true;
    }
    return false;
}

/* Prefix caching: puts r in a free slot whose cache holds the longest
 * prefix of its prompt, or copies that prefix from a busy slot into the
 * free slot whose cache is the shortest. At most n_prompt - 1 tokens are
 * reused (the last is fed for its logits); none with echo logprobs. */
static int place(sched *s, sreq *r)
{
    int src = -1, best = 0, dst = -1;
    int most = r->prompt_lps ? 0 : r->n_prompt - 1;
    for (int i = 0; i < s->n_slots; i++) {
        const int32_t *c = s->cache_tok + (size_t)i * s->n_ctx;
        /* a cache holds the keys and values of its slot's adapter */
        int n = kiln_engine_slot_adapter(s->eng, i) == r->adapter ? KILN_MIN(s->cache_n[i], most)
                                                                   : 0, l = 0;
        while (l < n && c[l] == r->prompt[l]) l++;
        if (l > best || (l == best && l > 0 && !s->slots[i] && src >= 0 && s->slots[src])) {
            best = l;
            src = i;
        }
        if (!s->slots[i] && (dst < 0 || s->cache_n[i] < s->cache_n[dst])) dst = i;
    }
    if (src >= 0 && !s->slots[src]) dst = src;
    if (best > 0 && kiln_engine_copy_prefix(s->ctx, s->eng, dst, src, best) == KILN_OK) {
        if (dst != src)
            memcpy(s->cache_tok + (size_t)dst * s->n_ctx, s->cache_tok + (size_t)src * s->n_ctx,
                   (size_t)best * sizeof *s->cache_tok);
        s->cache_n[dst] = best;
        s->m.cached_tokens += (uint64_t)best;
        s->m.cache_hits++;
    } else {
        best = 0;
        kiln_engine_reset(s->eng, dst);
        s->cache_n[dst] = 0;
    }
    kiln_engine_set_slot_adapter(s->ctx, s->eng, dst, r->adapter); /* (a checked id) */
    r->n_fed = r->n_cached = best;
    return dst;
}

/* Starts queued requests in free slots; followers_only (a newer engine
 * waits to be swapped in): only the remaining choices of a request whose
 * first choice already started, so one request's choices share weights. */
static void admit(sched *s, bool followers_only)
{
    while (s->qhead && s->n_active < s->n_slots) {
        sreq *r = s->qhead;
        if (followers_only && !(r->group && !r->leader)) break;
        if (!r->cancelled && wait_for_leader(s, r)) break;
        s->qhead = r->qnext;
        if (!s->qhead) s->qtail = NULL;
        s->qlen--;
        if (r->cancelled) {
            s->m.cancelled++;
            finish(s, r, "cancelled", 0, "");
            continue;
        }
        if (r->embed) {
            /* an embedding takes a free slot, the one whose cache is the
             * shortest (the least prefix-cache lost), for one prefill */
            int slot = -1;
            for (int i = 0; i < s->n_slots; i++)
                if (!s->slots[i] && (slot < 0 || s->cache_n[i] < s->cache_n[slot])) slot = i;
            kiln_engine_set_slot_adapter(s->ctx, s->eng, slot, r->adapter);
            if (s->model_requests) s->model_requests[r->adapter]++;
            r->slot = slot;
            r->state = SREQ_RUNNING;
            s->slots[slot] = r;
            s->n_active++;
            continue;
        }
        /* the library's generation loop, one token per engine step: the
         * chat turn's end (<|im_end|>) is a stop token unless ignore_eos,
         * stop_token_ids always are */
        kiln_gen_opts go = kiln_gen_opts_default();
        go.sampling = r->sp;
        go.max_tokens = r->max_tokens > 0 ? r->max_tokens : 1;
        go.ignore_eos = r->ignore_eos;
        go.skip_special = r->skip_special;
        go.logprobs = r->want_logprobs;
        go.stops = (const char *const *)r->stops;
        go.n_stops = r->n_stops;
        int32_t stop_ids[SREQ_MAX_STOPS + 1];
        int n_ids = 0;
        for (int i = 0; i < r->n_stop_ids; i++) stop_ids[n_ids++] = r->stop_ids[i];
        if (r->stop_id >= 0 && !r->ignore_eos) stop_ids[n_ids++] = r->stop_id;
        go.stop_ids = stop_ids;
        go.n_stop_ids = n_ids;
        kiln_status st = kiln_gen_new(s->ctx, s->tok, kiln_engine_config(s->eng), &go, r->prompt,
                                      (size_t)r->n_prompt, &r->gen);
        if (st) {
            finish(s, r, NULL, 500, kiln_errmsg(s->ctx));
            continue;
        }
        /* speculative decoding: not under a grammar (its masks would need
         * the draft's tokens fed through the parse state) nor for echo
         * logprobs; those decode one token a step */
        if (s->draft && !r->gram && !r->prompt_lps) {
            r->spec = calloc(1, sizeof *r->spec);
            if (!r->spec || infer_spec_init(s->ctx, r->spec, r->gen, s->V, s->K)) {
                free(r->spec);
                r->spec = NULL; /* (out of memory: without the draft) */
            }
        }
        int slot = place(s, r);
        if (s->model_requests) s->model_requests[r->adapter]++;
        r->slot = slot;
        r->state = SREQ_RUNNING;
        s->slots[slot] = r;
        s->n_active++;
    }
}

/* Scores prompt token pos + 1 from the logits at position pos (echo with
 * logprobs): its log-probability and the top_logprobs most likely tokens,
 * of the distribution generated tokens are reported from (the model's,
 * with logit_bias; before penalties and temperature). mu held. */
static void on_prompt_logits(sreq *r, int pos, float *lg, int V)
{
    if (pos + 1 >= r->n_prompt || !r->plps) return;
    /* logit_bias applies as to generated tokens (their logprobs include it) */
    for (int i = 0; i < r->n_bias; i++) lg[r->bias[i].token] += r->bias[i].bias;
    float mx = -INFINITY;
    for (int i = 0; i < V; i++) mx = fmaxf(mx, lg[i]);
    double sum = 0;
    for (int i = 0; i < V; i++) sum += exp((double)lg[i] - mx);
    float lse = mx + (float)log(sum);
    slp *e = &r->plps[pos + 1];
    int32_t t = r->prompt[pos + 1];
    e->token = t;
    e->logprob = lg[t] - lse;
    int k = KILN_MIN(r->sp.top_logprobs, SREQ_MAX_TOP), m = 0;
    for (int i = 0; i < V && k > 0; i++) {
        float v = lg[i] - lse;
        if (m == k && !(v > e->top[m - 1].logprob)) continue;
        int q = m < k ? m++ : k - 1;
        while (q > 0 && v > e->top[q - 1].logprob) { e->top[q] = e->top[q - 1]; q--; }
        e->top[q] = (kiln_token_logprob){i, v};
    }
    e->n_top = m;
    r->n_plps = pos + 2;
}

static bool publish(sched *s, sreq *r, kiln_gen_token *tp, int fed_pos);
static void bias_logits(const sched *s, const sreq *r, float *lg);

/* Samples r's next token from lg (kiln_gen_next) and publishes its text.
 * mu held. */
static void on_logits(sched *s, sreq *r, float *lg)
{
    if (r->max_tokens == 0) {
        /* echo with max_tokens 0: the prompt (and its logprobs) only */
        finish(s, r, "length", 0, "");
        return;
    }
    /* (a model's rows past the tokenizer's vocabulary, padding, are no text) */
    bias_logits(s, r, lg);
    if (r->gst) {
        /* constrained output: only tokens whose bytes extend a valid
         * prefix, and the turn's end once the output is complete */
        memset(s->allowed, 0, (size_t)s->V);
        int n_ok = infer_gstate_allowed(r->gst, s->trie, s->allowed);
        if (infer_gstate_accepting(r->gst)) {
            int32_t ends[SREQ_MAX_STOPS + 3] = {s->eot, s->eos, r->stop_id};
            int ne = 3;
            for (int i = 0; i < r->n_stop_ids; i++) ends[ne++] = r->stop_ids[i];
            for (int i = 0; i < ne; i++)
                if (ends[i] >= 0 && ends[i] < s->V && !s->allowed[ends[i]]) {
                    s->allowed[ends[i]] = 1;
                    n_ok++;
                }
        }
        if (n_ok == 0) {
            finish(s, r, NULL, 500, "constrained decoding: no token of the vocabulary can continue the output");
            return;
        }
        for (int i = 0; i < s->V; i++)
            if (!s->allowed[i]) lg[i] = -INFINITY;
    }
    kiln_gen_token t;
    if (kiln_gen_next(s->ctx, r->gen, lg, &t)) {
        finish(s, r, NULL, 500, kiln_errmsg(s->ctx));
        return;
    }
    publish(s, r, &t, kiln_engine_pos(s->eng, r->slot));
}

/* The logit changes a request asks for before sampling: logit_bias, and
 * no padding rows past the tokenizer's vocabulary. */
static void bias_logits(const sched *s, const sreq *r, float *lg)
{
    for (int i = 0; i < r->n_bias; i++) lg[r->bias[i].token] += r->bias[i].bias;
    for (int i = s->tok_V; i < s->V; i++) lg[i] = -INFINITY;
}

/* Publishes r's token t (its text, logprobs and finish); fed_pos: where
 * the token would be fed next (a full context ends the request). Returns
 * whether r goes on. mu held. */
static bool publish(sched *s, sreq *r, kiln_gen_token *tp, int fed_pos)
{
    kiln_gen_token t = *tp;
    bool complete = false;
    if (r->gst && t.id >= 0 && (t.finish == KILN_FINISH_NONE || t.finish == KILN_FINISH_LENGTH)) {
        char *p = NULL;
        size_t n = 0;
        if (!kiln_tokenizer_is_special(s->tok, t.id) &&
            !kiln_tokenizer_decode(s->ctx, s->tok, &t.id, 1, &p, &n))
            infer_gstate_feed(r->gst, p, n); /* allowed, so it is taken */
        free(p);
        complete = infer_gstate_done(r->gst);
    }
    if (r->n_gen == 0) {
        r->t_first = kiln_time_now();
        metrics_observe(s->m.ttft_b, &s->m.ttft_n, &s->m.ttft_sum, r->t_first - r->t_submit);
    }
    r->n_gen++;
    s->m.gen_tokens++;
    if (t.finish == KILN_FINISH_EOS || t.finish == KILN_FINISH_STOP_TOKEN) {
        /* the ending token is counted but has no text and no logprobs */
        append_text(r, t.text, t.len);
        finish(s, r, "stop", 0, "");
        return false;
    }
    if (r->want_logprobs) {
        slp e = {.token = t.chosen.token, .logprob = t.chosen.logprob, .n_top = t.n_top};
        if (t.n_top > 0 && t.top) memcpy(e.top, t.top, (size_t)t.n_top * sizeof *e.top);
        if (r->n_lps == r->lps_cap) {
            int c = r->lps_cap ? 2 * r->lps_cap : 16;
            slp *p = realloc(r->lps, (size_t)c * sizeof *p);
            if (p) {
                r->lps = p;
                r->lps_cap = c;
            }
        }
        if (r->n_lps < r->lps_cap) r->lps[r->n_lps++] = e;
    }
    append_text(r, t.text, t.len);
    if (t.finish == KILN_FINISH_STOP_STRING) {
        finish(s, r, "stop", 0, "");
        return false;
    }
    if (complete) {
        /* the output is whole and nothing may follow: end the turn here */
        const char *o;
        size_t n;
        kiln_gen_end(r->gen, KILN_FINISH_STOP_TOKEN, &o, &n);
        append_text(r, o, n);
        finish(s, r, "stop", 0, "");
        return false;
    }
    if (t.finish == KILN_FINISH_NONE && fed_pos >= s->n_ctx) {
        /* the context is full: no room to feed this token back */
        const char *o;
        size_t n;
        kiln_gen_end(r->gen, KILN_FINISH_LENGTH, &o, &n);
        append_text(r, o, n);
        t.finish = KILN_FINISH_LENGTH;
    }
    if (t.finish == KILN_FINISH_LENGTH) {
        finish(s, r, "length", 0, "");
        return false;
    }
    r->next = t.id;
    pthread_cond_broadcast(&r->cv);
    if (r->grouped) pthread_cond_broadcast(&s->gcv);
    return true;
}

/* ---- speculative decoding --------------------------------------------
 * Before a step, every decoding slot whose request has a drafting state
 * (r->spec) drafts r->sk tokens on the draft's engine: the draft first
 * catches up on the slot's tokens it lacks (its cache is matched against
 * the target's token record, so prefix caching and reused slots need
 * nothing else), then the K draft steps run batched over those slots. The
 * target's step then takes each such slot's last token and its drafts,
 * all with logits, and spec_rows decides the round's tokens and cuts both
 * caches back to what was kept. */

/* Feeds the draft's slot i the target's tokens it lacks and then `next`;
 * the logits after next go to row. 0 or an error status. */
static kiln_status draft_catch_up(sched *s, int i, int32_t next, float *row)
{
    const int32_t *want = s->cache_tok + (size_t)i * s->n_ctx;
    int32_t *have = s->dcache_tok + (size_t)i * s->n_ctx;
    int nw = s->cache_n[i], l = 0, nh = s->dcache_n[i];
    while (l < nh && l < nw && have[l] == want[l]) l++;
    kiln_status st = kiln_engine_copy_prefix(s->ctx, s->draft, i, i, l);
    if (st) return st;
    s->dcache_n[i] = l;
    int chunk = kiln_engine_chunk(s->draft);
    while (!st && l <= nw) {
        int m = 0;
        for (; m < chunk && l + m <= nw; m++) {
            int32_t t = l + m < nw ? want[l + m] : next;
            s->dtoks[m] = (kiln_engine_tok){i, t, l + m == nw};
            have[l + m] = t;
        }
        st = kiln_engine_step(s->ctx, s->draft, s->dtoks, m, row);
        l += m;
    }
    s->dcache_n[i] = st ? 0 : l;
    if (st) kiln_engine_reset(s->draft, i);
    return st;
}

/* Drafts for the decoding slots (mu held; dropped while the draft runs). */
static void draft_all(sched *s)
{
    int dctx = kiln_engine_n_ctx(s->draft), kmax = 0;
    for (int i = 0; i < s->n_slots; i++) {
        sreq *r = s->slots[i];
        if (!r) continue;
        r->sk = 0;
        if (!r->spec || r->embed || r->cancelled || r->n_fed != r->n_prompt || r->max_tokens <= 0)
            continue;
        int tpos = s->cache_n[i], left = r->max_tokens - r->n_gen;
        int k = KILN_MIN(s->K, KILN_MIN(left - 1, KILN_MIN(s->n_ctx - tpos - 1, dctx - tpos)));
        r->sk = k > 0 ? k : 0;
        kmax = KILN_MAX(kmax, r->sk);
    }
    if (kmax == 0) return;
    pthread_mutex_unlock(&s->mu);
    double t0 = kiln_time_now();
    kiln_status st = KILN_OK;
    for (int i = 0; i < s->n_slots && !st; i++) {
        sreq *r = s->slots[i];
        if (!r || r->sk == 0) continue;
        float *row = s->dlogits + (size_t)i * s->V;
        st = draft_catch_up(s, i, r->next, row);
        if (st) break;
        bias_logits(s, r, row);
        infer_spec_begin(r->spec, r->gen);
        infer_spec_draft(r->spec, row);
    }
    for (int j = 1; j < kmax && !st; j++) {
        int T = 0;
        for (int i = 0; i < s->n_slots; i++) {
            sreq *r = s->slots[i];
            if (!r || r->sk <= j) continue;
            int32_t x = r->spec->d[j - 1];
            s->dtoks[T++] = (kiln_engine_tok){i, x, true};
            s->dcache_tok[(size_t)i * s->n_ctx + s->dcache_n[i]++] = x;
        }
        st = kiln_engine_step(s->ctx, s->draft, s->dtoks, T, s->dlogits);
        for (int i = 0, row = 0; i < s->n_slots && !st; i++) {
            sreq *r = s->slots[i];
            if (!r || r->sk <= j) continue;
            float *lg = s->dlogits + (size_t)row++ * s->V;
            bias_logits(s, r, lg);
            infer_spec_draft(r->spec, lg);
        }
    }
    double dt = kiln_time_now() - t0;
    pthread_mutex_lock(&s->mu);
    s->m.spec_draft_s += dt;
    if (st) {
        /* the draft failed: this step decodes one token a slot */
        kiln_log(s->log_ctx, KILN_LOG_WARN, "kiln serve: the draft model's step failed (%s); "
                 "decoding without it this step", kiln_errmsg(s->ctx));
        for (int i = 0; i < s->n_slots; i++) {
            if (s->slots[i]) s->slots[i]->sk = 0;
            kiln_engine_reset(s->draft, i);
            s->dcache_n[i] = 0;
        }
    }
}

/* The rows of r's round, from row k0 of s->logits: decides and publishes
 * its tokens, then cuts the target's and the draft's caches back to the
 * tokens kept. Returns the number of rows (sk + 1). mu held; r may be
 * finished (and freed) on return. */
static int spec_rows(sched *s, sreq *r, int k0)
{
    const int slot = r->slot, kk = r->sk, tpos = s->cache_n[slot] - (kk + 1);
    int n_e = 0, acc = 0;
    bool alive = true;
    for (int i = 0; i <= kk && alive; i++) {
        float *row = s->logits + (size_t)(k0 + i) * s->V;
        bias_logits(s, r, row);
        bool ok;
        int32_t id = infer_spec_decide(r->spec, r->gen, i, row, &ok);
        kiln_gen_token t;
        if (infer_gen_push(s->ctx, r->gen, r->spec->raw, id, &t)) {
            finish(s, r, NULL, 500, kiln_errmsg(s->ctx));
            alive = false;
            break;
        }
        n_e++;
        acc += ok;
        alive = publish(s, r, &t, tpos + 1 + i);
        if (!ok) break;
    }
    s->m.spec_rounds++;
    s->m.spec_drafted += (uint64_t)kk;
    s->m.spec_accepted += (uint64_t)acc;
    s->m.spec_emitted += (uint64_t)n_e;
    /* keep the last token and the accepted drafts that were emitted */
    if (kiln_engine_copy_prefix(s->ctx, s->eng, slot, slot, tpos + n_e) == KILN_OK)
        s->cache_n[slot] = tpos + n_e;
    int dk = KILN_MIN(s->dcache_n[slot], tpos + n_e);
    if (kiln_engine_copy_prefix(s->ctx, s->draft, slot, slot, dk) == KILN_OK)
        s->dcache_n[slot] = dk;
    if (alive) r->sk = 0;
    return kk + 1;
}

/* Swaps in s->next_eng (no request runs): the caches are the old
 * weights', so the prefix cache starts empty. mu held; dropped while the
 * old engine is freed. */
static void swap_engine(sched *s)
{
    kiln_engine *old = s->eng;
    s->eng = s->next_eng;
    s->next_eng = NULL;
    for (int i = 0; i < s->n_slots; i++) s->cache_n[i] = 0;
    snprintf(s->ck.name, sizeof s->ck.name, "%s", s->next_name);
    s->ck.step = sckpt_step(s->ck.name);
    s->ck.loaded_at = (long)time(NULL);
    s->ck.reloads++;
    s->ck.error[0] = 0;
    kiln_log(s->log_ctx, KILN_LOG_INFO,
             "kiln serve: reloaded: now serving checkpoint %s (step %ld; loaded in %.2f s)",
             s->ck.name, s->ck.step, s->next_secs);
    pthread_mutex_unlock(&s->mu);
    kiln_engine_free(old);
    pthread_mutex_lock(&s->mu);
}

void sched_swap(sched *s, kiln_engine *eng, const char *name, double load_secs)
{
    pthread_mutex_lock(&s->mu);
    kiln_engine *stale = s->next_eng;
    s->next_eng = eng;
    snprintf(s->next_name, sizeof s->next_name, "%s", name);
    s->next_secs = load_secs;
    int running = s->n_active;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (running)
        kiln_log(s->log_ctx, KILN_LOG_INFO,
                 "kiln serve: %s loaded in %.2f s; it takes over when the %d running request(s) "
                 "finish (they finish on the old weights)", name, load_secs, running);
    kiln_engine_free(stale);
}

long sckpt_step(const char *name)
{
    if (strncmp(name, "step_", 5) || !name[5]) return -1;
    char *e;
    long v = strtol(name + 5, &e, 10);
    return *e || v < 0 ? -1 : v;
}

static void *sched_main(void *arg)
{
    sched *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->stop) {
        /* drop requests whose clients went away */
        for (int i = 0; i < s->n_slots; i++) {
            sreq *r = s->slots[i];
            if (r && r->cancelled) {
                s->m.cancelled++;
                finish(s, r, "cancelled", 0, "");
            }
        }
        /* a newer checkpoint's engine: once nothing runs, swap it in; until
         * then nothing new starts (it would run on the old weights), only
         * the rest of a request whose first choice did (queued together,
         * after it) */
        bool follower = s->qhead && s->qhead->group && !s->qhead->leader;
        if (s->next_eng && s->n_active == 0 && !follower) swap_engine(s);
        admit(s, s->next_eng != NULL);
        /* embeddings: each its own prefill (kiln_engine_embed) on this
         * thread, between generation steps; the slot is left empty */
        bool embedded = false;
        for (int i = 0; i < s->n_slots; i++) {
            sreq *r = s->slots[i];
            if (!r || !r->embed) continue;
            kiln_pooling pool = s->pooling;
            s->cache_n[i] = 0;
            pthread_mutex_unlock(&s->mu);
            kiln_status st = kiln_engine_embed(s->ctx, s->eng, i, r->prompt, r->n_prompt, pool, r->emb);
            pthread_mutex_lock(&s->mu);
            s->m.prompt_tokens += (uint64_t)r->n_prompt;
            if (st) finish(s, r, NULL, 500, kiln_errmsg(s->ctx));
            else finish(s, r, "stop", 0, "");
            embedded = true;
        }
        if (embedded) continue;
        if (s->n_active == 0) {
            /* idle: hand memory freed by finished requests (and their
             * connection threads' malloc arenas) back to the system */
            if (s->dirty) {
                s->dirty = false;
                malloc_trim(0);
            }
            pthread_cond_wait(&s->cv, &s->mu);
            continue;
        }
        s->dirty = true;
        if (s->draft) draft_all(s);
        /* build the step: decodes first (a drafting slot's last token and
         * its drafts), then prefill chunks */
        int T = 0, nw = 0;
        for (int i = 0; i < s->n_slots; i++) {
            sreq *r = s->slots[i];
            if (r && r->n_fed == r->n_prompt) {
                int k = s->draft ? r->sk : 0;
                for (int j = 0; j <= k; j++) {
                    int32_t t = j ? r->spec->d[j - 1] : r->next;
                    /* the slot's token record follows what is fed; the
                     * engine's position says how much of it stands after */
                    if (s->cache_n[i] < s->n_ctx) s->cache_tok[(size_t)i * s->n_ctx + s->cache_n[i]++] = t;
                    s->toks[T++] = (kiln_engine_tok){i, t, true};
                    s->opos[nw] = -1;
                    s->orow[nw] = k ? j : -1;
                    s->owner[nw++] = r;
                }
            }
        }
        for (int i = 0; i < s->n_slots && T < s->chunk; i++) {
            sreq *r = s->slots[i];
            if (!r || r->n_fed == r->n_prompt) continue;
            int m = KILN_MIN(s->chunk - T, r->n_prompt - r->n_fed);
            for (int j = 0; j < m; j++) {
                bool last = r->n_fed + j == r->n_prompt - 1;
                /* echo with logprobs: every prompt position's logits score
                 * the next prompt token */
                bool want = last || r->prompt_lps;
                if (s->cache_n[i] < s->n_ctx)
                    s->cache_tok[(size_t)i * s->n_ctx + s->cache_n[i]++] = r->prompt[r->n_fed + j];
                s->toks[T++] = (kiln_engine_tok){i, r->prompt[r->n_fed + j], want};
                if (want) {
                    s->orow[nw] = -1;
                    s->opos[nw] = last ? -1 : r->n_fed + j;
                    s->owner[nw++] = r;
                }
            }
            r->n_fed += m;
            s->m.prompt_tokens += (uint64_t)m;
        }
        pthread_mutex_unlock(&s->mu);
        kiln_status st = kiln_engine_step(s->ctx, s->eng, s->toks, T, s->logits);
        pthread_mutex_lock(&s->mu);
        s->m.steps++;
        s->m.step_tokens += (uint64_t)T;
        for (int i = 0; i < s->n_slots; i++) s->cache_n[i] = kiln_engine_pos(s->eng, i);
        if (st) {
            /* a failed step leaves the caches unchanged; fail its owners */
            for (int i = 0; i < s->n_slots; i++)
                if (s->slots[i]) finish(s, s->slots[i], NULL, 500, kiln_errmsg(s->ctx));
            continue;
        }
        for (int k = 0; k < nw; k++) {
            sreq *r = s->owner[k];
            if (s->orow[k] == 0) { /* a drafting slot's round: its rows together */
                int n = r->sk + 1;
                if (r->state == SREQ_RUNNING && !r->cancelled) n = spec_rows(s, r, k);
                k += n - 1;
                continue;
            }
            if (r->state != SREQ_RUNNING || r->cancelled) continue;
            if (s->opos[k] >= 0) on_prompt_logits(r, s->opos[k], s->logits + (size_t)k * s->V, s->V);
            else on_logits(s, r, s->logits + (size_t)k * s->V);
        }
    }
    /* shutting down: fail what is left */
    for (int i = 0; i < s->n_slots; i++)
        if (s->slots[i]) finish(s, s->slots[i], NULL, 503, "server is shutting down");
    while (s->qhead) {
        sreq *r = s->qhead;
        s->qhead = r->qnext;
        finish(s, r, NULL, 503, "server is shutting down");
    }
    s->qtail = NULL;
    s->qlen = 0;
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

kiln_status sched_start(kiln_ctx *ctx, sched *s, kiln_engine *eng, kiln_engine *draft, int K,
                        const kiln_tokenizer *tok, int max_queue)
{
    memset(s, 0, sizeof *s);
    s->eng = eng;
    s->draft = draft;
    s->K = K;
    s->tok = tok;
    const kiln_config *c = kiln_engine_config(eng);
    s->V = c->vocab_size;
    s->n_slots = kiln_engine_n_slots(eng);
    s->n_ctx = kiln_engine_n_ctx(eng);
    s->chunk = KILN_MAX(KILN_MAX(64, s->n_slots), kiln_engine_chunk(eng));
    s->max_queue = max_queue;
    s->eot = kiln_tokenizer_eot(tok);
    s->tok_V = KILN_MIN(kiln_tokenizer_vocab_size(tok), s->V);
    s->eos = c->eos_token_id;
    s->ctx = kiln_ctx_new();
    s->slots = calloc((size_t)s->n_slots, sizeof(sreq *));
    s->cache_tok = malloc((size_t)s->n_slots * s->n_ctx * sizeof *s->cache_tok);
    s->cache_n = calloc((size_t)s->n_slots, sizeof *s->cache_n);
    s->toks = calloc((size_t)s->chunk, sizeof(kiln_engine_tok));
    s->owner = calloc((size_t)s->chunk, sizeof(sreq *));
    s->opos = calloc((size_t)s->chunk, sizeof(int));
    s->logits = malloc((size_t)s->chunk * s->V * sizeof(float));
    s->allowed = malloc((size_t)s->V);
    s->orow = calloc((size_t)s->chunk, sizeof(int));
    bool draft_ok = true;
    if (draft) {
        int dn = KILN_MAX(s->chunk, kiln_engine_chunk(draft));
        s->dcache_tok = malloc((size_t)s->n_slots * s->n_ctx * sizeof *s->dcache_tok);
        s->dcache_n = calloc((size_t)s->n_slots, sizeof *s->dcache_n);
        s->dlogits = malloc((size_t)s->n_slots * s->V * sizeof(float));
        s->dtoks = calloc((size_t)dn, sizeof(kiln_engine_tok));
        draft_ok = s->dcache_tok && s->dcache_n && s->dlogits && s->dtoks;
    }
    if (s->ctx && infer_vocab_trie_new(s->ctx, tok, &s->trie)) s->trie = NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->gcv, NULL);
    s->mu_init = true;
    if (!s->ctx || !s->slots || !s->cache_tok || !s->cache_n || !s->toks || !s->owner || !s->opos || !s->logits || !s->allowed ||
        !s->trie || !s->orow || !draft_ok) {
        sched_free(s);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "scheduler: out of memory");
    }
    if (pthread_create(&s->th, NULL, sched_main, s) != 0) {
        sched_free(s);
        return kiln_fail(ctx, KILN_ERR_INTERNAL, "scheduler: cannot start thread");
    }
    s->started = true;
    return KILN_OK;
}

void sched_stop(sched *s)
{
    if (!s->started) return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->th, NULL);
    s->started = false;
}

void sched_free(sched *s)
{
    sched_stop(s);
    kiln_engine_free(s->next_eng); /* loaded, never swapped in */
    s->next_eng = NULL;
    if (s->mu_init) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        pthread_cond_destroy(&s->gcv);
        s->mu_init = false;
    }
    free(s->slots);
    free(s->cache_tok);
    free(s->cache_n);
    s->cache_tok = NULL;
    s->cache_n = NULL;
    free(s->toks);
    free(s->owner);
    free(s->opos);
    free(s->logits);
    free(s->allowed);
    free(s->orow);
    free(s->dcache_tok);
    free(s->dcache_n);
    free(s->dlogits);
    free(s->dtoks);
    kiln_engine_free(s->draft);
    s->orow = NULL;
    s->dcache_tok = NULL;
    s->dcache_n = NULL;
    s->dlogits = NULL;
    s->dtoks = NULL;
    s->draft = NULL;
    infer_vocab_trie_free(s->trie);
    s->allowed = NULL;
    s->trie = NULL;
    kiln_ctx_free(s->ctx);
    s->slots = NULL;
    s->toks = NULL;
    s->owner = NULL;
    s->opos = NULL;
    s->logits = NULL;
    s->ctx = NULL;
}

static int check_req(sched *s, sreq *r)
{
    if (r->n_prompt < 1) {
        snprintf(r->err, sizeof r->err, "the prompt is empty");
        return 400;
    }
    if (r->n_prompt >= s->n_ctx + r->embed) {
        snprintf(r->err, sizeof r->err,
                 "the prompt is %d tokens; this server's context is %d tokens "
                 "(prompt plus at least one generated token must fit)",
                 r->n_prompt, s->n_ctx);
        return 400;
    }
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= s->V) {
            snprintf(r->err, sizeof r->err, "prompt token %d is out of range [0, %d)",
                     (int)r->prompt[i], s->V);
            return 400;
        }
    for (int i = 0; i < r->n_bias; i++)
        if (r->bias[i].token < 0 || r->bias[i].token >= s->V) {
            snprintf(r->err, sizeof r->err, "logit_bias token %d is out of range [0, %d)",
                     (int)r->bias[i].token, s->V);
            return 400;
        }
    return 0;
}

int sched_submit_group(sched *s, sreq **rs, int n)
{
    for (int i = 0; i < n; i++) {
        int st = check_req(s, rs[i]);
        if (st) {
            if (i) snprintf(rs[0]->err, sizeof rs[0]->err, "%s", rs[i]->err);
            return st;
        }
    }
    sreq *r = rs[0];
    pthread_mutex_lock(&s->mu);
    if (s->stop) {
        pthread_mutex_unlock(&s->mu);
        snprintf(r->err, sizeof r->err, "the server is shutting down");
        return 503;
    }
    /* a group is one request: an empty queue takes it whole */
    if (s->qlen >= s->max_queue || (s->qlen > 0 && s->qlen + n > s->max_queue)) {
        s->m.rejected_queue++;
        pthread_mutex_unlock(&s->mu);
        snprintf(r->err, sizeof r->err,
                 "the server is overloaded (%d requests waiting); retry later", s->qlen);
        return 503;
    }
    double now = kiln_time_now();
    for (int i = 0; i < n; i++) {
        r = rs[i];
        r->t_submit = now;
        r->state = SREQ_QUEUED;
        r->refs++;
        r->qnext = NULL;
        if (s->qtail) s->qtail->qnext = r;
        else s->qhead = r;
        s->qtail = r;
        s->qlen++;
    }
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int sched_submit(sched *s, sreq *r) { return sched_submit_group(s, &r, 1); }

void sched_cancel(sched *s, sreq *r)
{
    pthread_mutex_lock(&s->mu);
    if (r->state != SREQ_DONE) {
        r->cancelled = true;
        pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
}
