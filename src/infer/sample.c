/*
 * sample.c — next-token selection with the knobs of the OpenAI API and
 * Hugging Face generate(): repetition penalty (HF: positive logits divided,
 * negative multiplied, over prompt and generated tokens), frequency and
 * presence penalties (OpenAI: logit -= count * freq + (count > 0) * pres,
 * over generated tokens), temperature (0 = greedy, ties to the lowest id),
 * top-k, top-p (the smallest set of most likely tokens whose mass reaches
 * p), min-p (tokens below min_p times the top probability dropped), then
 * one draw from a seeded xoshiro stream. Log-probabilities reported are
 * those of the model's raw distribution (before penalties and warping).
 */
#include "infer/sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct kiln_sampler {
    kiln_sampling p;
    int V;
    kiln_rng rng;
    int *count;      /* (V) times generated */
    uint8_t *seen;   /* (V) in prompt or generated */
    float *prob;     /* (V) scratch */
    int *idx;        /* (V) scratch: candidate ids */
    float *lp;       /* (V) scratch: raw log-probabilities */
};

kiln_sampling kiln_sampling_default(void)
{
    return (kiln_sampling){.temperature = 1.0f, .top_k = 0, .top_p = 1.0f,
                           .min_p = 0.0f, .repetition_penalty = 1.0f,
                           .frequency_penalty = 0.0f, .presence_penalty = 0.0f,
                           .seed = 0, .top_logprobs = 0};
}

/* Messages name the field as kiln_sampling.FIELD (the kiln command shows
 * its flag instead; the HTTP server validates its JSON fields itself, see
 * src/serve/api.c). */
kiln_status kiln_sampling_validate(kiln_ctx *ctx, const kiln_sampling *p)
{
    if (!(p->temperature >= 0.0f && p->temperature <= 100.0f))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_sampling.temperature = %g must be a number in [0, 100]",
                         (double)p->temperature);
    if (p->top_k < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_sampling.top_k = %d must be >= 0 (0 = off)", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_sampling.top_p = %g must be in (0, 1]", (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_sampling.min_p = %g must be in [0, 1]", (double)p->min_p);
    if (!(p->repetition_penalty > 0.0f && p->repetition_penalty <= 100.0f))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_sampling.repetition_penalty = %g must be in (0, 100]",
                         (double)p->repetition_penalty);
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_sampling.frequency_penalty = %g must be in [-2, 2]",
                         (double)p->frequency_penalty);
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_sampling.presence_penalty = %g must be in [-2, 2]",
                         (double)p->presence_penalty);
    if (p->top_logprobs < 0 || p->top_logprobs > 20)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_sampling.top_logprobs = %d must be in [0, 20]", p->top_logprobs);
    return KILN_OK;
}

kiln_status kiln_sampler_new(kiln_ctx *ctx, const kiln_sampling *p, int V,
                             kiln_sampler **out)
{
    *out = NULL;
    kiln_status st = kiln_sampling_validate(ctx, p);
    if (st) return st;
    if (V < 1) return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "sampler: vocabulary size %d", V);
    kiln_sampler *s = kiln_calloc(ctx, 1, sizeof *s);
    if (!s) return KILN_ERR_NOMEM;
    s->p = *p;
    s->V = V;
    kiln_rng_seed(&s->rng, p->seed);
    s->count = kiln_calloc(ctx, (size_t)V, sizeof(int));
    s->seen = kiln_calloc(ctx, (size_t)V, 1);
    s->prob = kiln_calloc(ctx, (size_t)V, sizeof(float));
    s->idx = kiln_calloc(ctx, (size_t)V, sizeof(int));
    s->lp = kiln_calloc(ctx, (size_t)V, sizeof(float));
    if (!s->count || !s->seen || !s->prob || !s->idx || !s->lp) {
        kiln_sampler_free(s);
        return KILN_ERR_NOMEM;
    }
    *out = s;
    return KILN_OK;
}

void kiln_sampler_free(kiln_sampler *s)
{
    if (!s) return;
    free(s->count);
    free(s->seen);
    free(s->prob);
    free(s->idx);
    free(s->lp);
    free(s);
}

void kiln_sampler_add_prompt(kiln_sampler *s, const int32_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < s->V) s->seen[ids[i]] = 1;
}

/* qsort has no context pointer in C11: the comparison reads a
 * thread-local base, so samplers on different threads do not collide. */
static _Thread_local const float *cmp_base;
static int cmp_desc(const void *a, const void *b)
{
    float x = cmp_base[*(const int *)a], y = cmp_base[*(const int *)b];
    if (x != y) return x > y ? -1 : 1;
    return *(const int *)a - *(const int *)b;
}

/* Sorts ids[0..n) by v[] descending (ties: lower id first). */
static void sort_desc(int *ids, int n, const float *v)
{
    cmp_base = v;
    qsort(ids, (size_t)n, sizeof(int), cmp_desc);
}

int infer_sample_probs(kiln_sampler *s, float *logits, int *cand)
{
    const int V = s->V;
    const kiln_sampling *p = &s->p;
    if (p->repetition_penalty != 1.0f) {
        for (int i = 0; i < V; i++)
            if (s->seen[i])
                logits[i] = logits[i] > 0 ? logits[i] / p->repetition_penalty
                                          : logits[i] * p->repetition_penalty;
    }
    if (p->frequency_penalty != 0.0f || p->presence_penalty != 0.0f) {
        for (int i = 0; i < V; i++)
            if (s->count[i])
                logits[i] -= (float)s->count[i] * p->frequency_penalty + p->presence_penalty;
    }
    if (p->temperature < 1e-6f) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        cand[0] = best;
        s->prob[best] = 1.0f;
        return 1;
    }
    float mx = -INFINITY;
    for (int i = 0; i < V; i++) {
        logits[i] /= p->temperature;
        if (logits[i] > mx) mx = logits[i];
    }
    double sum = 0;
    for (int i = 0; i < V; i++) {
        float e = expf(logits[i] - mx);
        if (!(e >= 0.0f)) e = 0.0f; /* NaN logits count as impossible */
        s->prob[i] = e;
        sum += e;
    }
    int n = 0;
    bool need_sort = (p->top_k > 0 && p->top_k < V) || p->top_p < 1.0f;
    for (int i = 0; i < V; i++)
        if (s->prob[i] > 0 || sum == 0) cand[n++] = i;
    if (n == 0) { cand[0] = 0; s->prob[0] = 1; return 1; }
    if (need_sort) {
        if (p->top_k > 0 && p->top_k < n) {
            /* Keep the k largest: a bounded insertion pass, then sort. */
            int k = p->top_k, m = 0;
            for (int j = 0; j < n; j++) {
                int id = cand[j];
                float v = s->prob[id];
                if (m == k && !(v > s->prob[cand[m - 1]])) continue;
                int q = m < k ? m++ : k - 1;
                while (q > 0 && v > s->prob[cand[q - 1]]) { cand[q] = cand[q - 1]; q--; }
                cand[q] = id;
            }
            n = m;
        } else {
            sort_desc(cand, n, s->prob);
        }
        if (p->top_p < 1.0f) {
            double tot = 0;
            for (int j = 0; j < n; j++) tot += s->prob[cand[j]];
            double cum = 0;
            int keep = 0;
            while (keep < n && cum < p->top_p * tot) cum += s->prob[cand[keep++]];
            n = keep > 0 ? keep : 1;
        }
    }
    if (p->min_p > 0.0f) {
        float pmax = 0;
        for (int j = 0; j < n; j++) pmax = fmaxf(pmax, s->prob[cand[j]]);
        int m = 0;
        for (int j = 0; j < n; j++)
            if (s->prob[cand[j]] >= p->min_p * pmax) cand[m++] = cand[j];
        n = m;
    }
    double tot = 0;
    for (int j = 0; j < n; j++) tot += s->prob[cand[j]];
    for (int j = 0; j < n; j++) s->prob[cand[j]] = (float)(s->prob[cand[j]] / tot);
    return n;
}

float infer_sample_prob(const kiln_sampler *s, int id) { return s->prob[id]; }

static void log_softmax_into(const float *x, int V, float *out)
{
    float mx = -INFINITY;
    for (int i = 0; i < V; i++) if (x[i] > mx) mx = x[i];
    double sum = 0;
    for (int i = 0; i < V; i++) sum += exp((double)x[i] - mx);
    float lse = mx + (float)log(sum);
    for (int i = 0; i < V; i++) out[i] = x[i] - lse;
}

/* The reported log-probabilities of a choice: lp = log-softmax of the raw
 * logits (before they are processed), then chosen's and the top ones. */
static void report_logprobs(kiln_sampler *s, const float *lp, int32_t id,
                            kiln_token_logprob *chosen, kiln_token_logprob *top)
{
    const int V = s->V;
    if (chosen) *chosen = (kiln_token_logprob){id, lp ? lp[id] : 0.0f};
    if (top && s->p.top_logprobs > 0 && lp) {
        int k = KILN_MIN(s->p.top_logprobs, V), m = 0;
        for (int i = 0; i < V; i++) {
            float v = lp[i];
            if (m == k && !(v > top[m - 1].logprob)) continue;
            int q = m < k ? m++ : k - 1;
            while (q > 0 && v > top[q - 1].logprob) { top[q] = top[q - 1]; q--; }
            top[q] = (kiln_token_logprob){i, v};
        }
    }
}

int32_t kiln_sampler_sample(kiln_sampler *s, float *logits,
                            kiln_token_logprob *chosen,
                            kiln_token_logprob *top)
{
    const int V = s->V;
    float *lp = NULL;
    if (chosen || (top && s->p.top_logprobs > 0)) {
        lp = s->lp;
        log_softmax_into(logits, V, lp);
    }
    int n = infer_sample_probs(s, logits, s->idx);
    int id = s->idx[0];
    if (n > 1) {
        double r = (double)kiln_rng_uniform(&s->rng), cum = 0;
        id = s->idx[n - 1];
        for (int j = 0; j < n; j++) {
            cum += s->prob[s->idx[j]];
            if (r < cum) { id = s->idx[j]; break; }
        }
    }
    report_logprobs(s, lp, id, chosen, top);
    s->count[id]++;
    s->seen[id] = 1;
    return id;
}

/* ---- what speculative decoding (spec.c) needs of a sampler ---------- */

void infer_sample_dense(kiln_sampler *s, float *logits, float *probs)
{
    int n = infer_sample_probs(s, logits, s->idx);
    memset(probs, 0, (size_t)s->V * sizeof *probs);
    for (int j = 0; j < n; j++) probs[s->idx[j]] = s->prob[s->idx[j]];
}

int32_t infer_sample_draw(kiln_rng *rng, const float *probs, int V)
{
    double tot = 0;
    int last = -1;
    for (int i = 0; i < V; i++)
        if (probs[i] > 0) { tot += probs[i]; last = i; }
    if (last < 0) return 0;
    double r = (double)kiln_rng_uniform(rng) * tot, cum = 0;
    for (int i = 0; i < V; i++) {
        if (!(probs[i] > 0)) continue;
        cum += probs[i];
        if (r < cum) return i;
    }
    return last; /* rounding: the mass ran out just short of r */
}

void infer_sampler_take(kiln_sampler *s, const float *raw, int32_t id,
                        kiln_token_logprob *chosen, kiln_token_logprob *top)
{
    float *lp = NULL;
    if (raw && (chosen || (top && s->p.top_logprobs > 0))) {
        lp = s->lp;
        log_softmax_into(raw, s->V, lp);
    }
    report_logprobs(s, lp, id, chosen, top);
    s->count[id]++;
    s->seen[id] = 1;
}

void infer_sampler_copy_history(kiln_sampler *dst, const kiln_sampler *src)
{
    memcpy(dst->count, src->count, (size_t)src->V * sizeof *dst->count);
    memcpy(dst->seen, src->seen, (size_t)src->V);
}

kiln_rng *infer_sampler_rng(kiln_sampler *s) { return &s->rng; }
