/*
 * test_sampling.c — the sampler and the streaming text assembly against
 * known answers: the filtered distributions of temperature, top-k, top-p
 * (Hugging Face's rule), min-p, repetition / frequency / presence
 * penalties; reproducibility from the seed; draw frequencies; raw
 * log-probabilities; parameter validation; UTF-8 and stop-string handling
 * while streaming.
 */
#include "check.h"
#include "infer/sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static kiln_sampler *mk(kiln_sampling p, int V)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_sampler *s = NULL;
    kiln_status st = kiln_sampler_new(ctx, &p, V, &s);
    CHECK_MSG(st == KILN_OK, "%s", kiln_errmsg(ctx));
    kiln_ctx_free(ctx);
    return s;
}

/* probability of id among the candidates (0 when filtered out) */
static double prob_of(kiln_sampler *s, const int *cand, int n, int id)
{
    for (int j = 0; j < n; j++)
        if (cand[j] == id) return infer_sample_prob(s, id);
    return 0;
}

static void test_greedy(void)
{
    kiln_sampling p = kiln_sampling_default();
    p.temperature = 0;
    kiln_sampler *s = mk(p, 5);
    float l[5] = {0.1f, 3.0f, -1.0f, 3.0f, 2.9f};
    CHECK_EQ(kiln_sampler_sample(s, l, NULL, NULL), 1); /* tie -> lowest id */
    float l2[5] = {-5, -4, -3, -2, -1};
    CHECK_EQ(kiln_sampler_sample(s, l2, NULL, NULL), 4);
    kiln_sampler_free(s);
}

static void test_temperature(void)
{
    kiln_sampling p = kiln_sampling_default();
    int cand[3];
    kiln_sampler *s = mk(p, 3);
    float l[3] = {0, logf(2), logf(4)};
    int n = infer_sample_probs(s, l, cand);
    CHECK_EQ(n, 3);
    CHECK_NEAR(prob_of(s, cand, n, 0), 1.0 / 7, 1e-6);
    CHECK_NEAR(prob_of(s, cand, n, 2), 4.0 / 7, 1e-6);
    kiln_sampler_free(s);
    p.temperature = 2;
    s = mk(p, 3);
    float l2[3] = {0, logf(2), logf(4)};
    n = infer_sample_probs(s, l2, cand);
    double z = 1 + sqrt(2.0) + 2;
    CHECK_NEAR(prob_of(s, cand, n, 1), sqrt(2.0) / z, 1e-6);
    CHECK_NEAR(prob_of(s, cand, n, 2), 2 / z, 1e-6);
    kiln_sampler_free(s);
}

static void test_top_k(void)
{
    kiln_sampling p = kiln_sampling_default();
    p.top_k = 2;
    kiln_sampler *s = mk(p, 4);
    int cand[4];
    float l[4] = {1, 4, 2, 3};
    int n = infer_sample_probs(s, l, cand);
    CHECK_EQ(n, 2);
    CHECK_EQ(cand[0], 1);
    CHECK_EQ(cand[1], 3);
    CHECK_NEAR(prob_of(s, cand, n, 1), exp(4) / (exp(3) + exp(4)), 1e-6);
    CHECK_NEAR(prob_of(s, cand, n, 0), 0, 0);
    kiln_sampler_free(s);
}

static void test_top_p(void)
{
    /* probabilities 0.5, 0.3, 0.15, 0.05; HF removes the tokens whose
     * ascending cumulative mass is <= 1 - top_p */
    float base[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    int cand[4];
    kiln_sampling p = kiln_sampling_default();
    p.top_p = 0.7f;
    kiln_sampler *s = mk(p, 4);
    float l[4];
    memcpy(l, base, sizeof l);
    int n = infer_sample_probs(s, l, cand);
    CHECK_EQ(n, 2);
    CHECK_NEAR(prob_of(s, cand, n, 0), 0.625, 1e-5);
    CHECK_NEAR(prob_of(s, cand, n, 1), 0.375, 1e-5);
    kiln_sampler_free(s);
    p.top_p = 0.5f;
    s = mk(p, 4);
    memcpy(l, base, sizeof l);
    n = infer_sample_probs(s, l, cand);
    CHECK_EQ(n, 1);
    CHECK_EQ(cand[0], 0);
    kiln_sampler_free(s);
    p.top_p = 0.9f;
    s = mk(p, 4);
    memcpy(l, base, sizeof l);
    n = infer_sample_probs(s, l, cand);
    CHECK_EQ(n, 3);
    CHECK_NEAR(prob_of(s, cand, n, 2), 0.15 / 0.95, 1e-5);
    kiln_sampler_free(s);
    /* 0.99: the smallest (0.05) is above 1 - top_p, so every token stays */
    p.top_p = 0.99f;
    s = mk(p, 4);
    memcpy(l, base, sizeof l);
    n = infer_sample_probs(s, l, cand);
    CHECK_EQ(n, 4);
    CHECK_NEAR(prob_of(s, cand, n, 3), 0.05, 1e-5);
    kiln_sampler_free(s);
}

static void test_min_p(void)
{
    float l[4] = {logf(0.5f), logf(0.3f), logf(0.15f), logf(0.05f)};
    int cand[4];
    kiln_sampling p = kiln_sampling_default();
    p.min_p = 0.25f; /* threshold 0.125 */
    kiln_sampler *s = mk(p, 4);
    int n = infer_sample_probs(s, l, cand);
    CHECK_EQ(n, 3);
    CHECK_NEAR(prob_of(s, cand, n, 1), 0.3 / 0.95, 1e-5);
    CHECK_NEAR(prob_of(s, cand, n, 3), 0, 0);
    kiln_sampler_free(s);
}

static void test_penalties(void)
{
    /* repetition: HF divides positive and multiplies negative logits of
     * tokens seen in the prompt or output */
    kiln_sampling p = kiln_sampling_default();
    p.repetition_penalty = 2;
    kiln_sampler *s = mk(p, 4);
    int32_t prompt[2] = {0, 1};
    kiln_sampler_add_prompt(s, prompt, 2);
    float l[4] = {2, -1, 1, 0.5f};
    int cand[4];
    int n = infer_sample_probs(s, l, cand);
    double z = exp(1) + exp(-2) + exp(1) + exp(0.5);
    CHECK_EQ(n, 4);
    CHECK_NEAR(prob_of(s, cand, n, 0), exp(1) / z, 1e-6);
    CHECK_NEAR(prob_of(s, cand, n, 1), exp(-2) / z, 1e-6);
    kiln_sampler_free(s);

    /* frequency / presence: logit -= count * f + (count > 0) * p over
     * generated tokens only */
    p = kiln_sampling_default();
    p.temperature = 0;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.25f;
    s = mk(p, 3);
    kiln_sampler_add_prompt(s, (int32_t[]){2}, 1); /* prompt is not penalised */
    float a[3] = {0, 0, 3};
    CHECK_EQ(kiln_sampler_sample(s, a, NULL, NULL), 2); /* count[2] = 1 */
    float b[3] = {0, 2.0f, 3};
    CHECK_EQ(kiln_sampler_sample(s, b, NULL, NULL), 2); /* 3 - 0.75 = 2.25 > 2 */
    float c[3] = {0, 2.0f, 3};
    /* count 2: 3 - 1.25 = 1.75 < 2 */
    CHECK_EQ(kiln_sampler_sample(s, c, NULL, NULL), 1);
    kiln_sampler_free(s);
}

static void test_seed_reproducible(void)
{
    kiln_sampling p = kiln_sampling_default();
    p.seed = 1234;
    p.top_k = 40;
    p.top_p = 0.95f;
    kiln_sampler *a = mk(p, 100), *b = mk(p, 100);
    p.seed = 99;
    kiln_sampler *c = mk(p, 100);
    int same = 0, diff = 0;
    for (int i = 0; i < 200; i++) {
        float la[100], lb[100], lc[100];
        for (int k = 0; k < 100; k++) la[k] = lb[k] = lc[k] = sinf((float)(k * 7 + i));
        int x = kiln_sampler_sample(a, la, NULL, NULL), y = kiln_sampler_sample(b, lb, NULL, NULL);
        int z = kiln_sampler_sample(c, lc, NULL, NULL);
        same += x == y;
        diff += x != z;
    }
    CHECK_EQ(same, 200);
    CHECK(diff > 50);
    kiln_sampler_free(a);
    kiln_sampler_free(b);
    kiln_sampler_free(c);
}

static void test_draw_frequencies(void)
{
    /* top-k 2 over {1,2,3,4}: token 3 with e^4/(e^3+e^4) = 0.7311 */
    kiln_sampling p = kiln_sampling_default();
    p.top_k = 2;
    p.seed = 7;
    kiln_sampler *s = mk(p, 4);
    int cnt[4] = {0};
    const int N = 20000;
    for (int i = 0; i < N; i++) {
        float l[4] = {1, 2, 3, 4};
        cnt[kiln_sampler_sample(s, l, NULL, NULL)]++;
    }
    double pe = exp(4) / (exp(3) + exp(4)), sd = sqrt(pe * (1 - pe) / N);
    CHECK_EQ(cnt[0] + cnt[1], 0);
    CHECK_MSG(fabs((double)cnt[3] / N - pe) < 4 * sd, "freq %g vs %g", (double)cnt[3] / N, pe);
    kiln_sampler_free(s);
}

static void test_logprobs(void)
{
    kiln_sampling p = kiln_sampling_default();
    p.temperature = 0;
    p.top_logprobs = 2;
    p.repetition_penalty = 3; /* does not change the reported logprobs */
    kiln_sampler *s = mk(p, 4);
    kiln_sampler_add_prompt(s, (int32_t[]){3}, 1);
    float l[4] = {logf(0.1f), logf(0.2f), logf(0.3f), logf(0.4f)};
    kiln_token_logprob ch, top[2];
    int id = kiln_sampler_sample(s, l, &ch, top);
    CHECK_EQ(id, 2); /* 0.4 penalised below 0.3 */
    CHECK_EQ(ch.token, 2);
    CHECK_NEAR(ch.logprob, log(0.3), 1e-5);
    CHECK_EQ(top[0].token, 3);
    CHECK_NEAR(top[0].logprob, log(0.4), 1e-5);
    CHECK_EQ(top[1].token, 2);
    kiln_sampler_free(s);
}

static void test_validate(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_sampling p = kiln_sampling_default();
    CHECK(kiln_sampling_validate(ctx, &p) == KILN_OK);
    p.temperature = NAN;
    CHECK(kiln_sampling_validate(ctx, &p) == KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "temperature") != NULL);
    p = kiln_sampling_default();
    p.top_p = 0;
    CHECK(kiln_sampling_validate(ctx, &p) == KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "top_p") != NULL);
    p = kiln_sampling_default();
    p.top_k = -1;
    CHECK(kiln_sampling_validate(ctx, &p) == KILN_ERR_INVALID_ARG);
    p = kiln_sampling_default();
    p.frequency_penalty = 2.5f;
    CHECK(kiln_sampling_validate(ctx, &p) == KILN_ERR_INVALID_ARG);
    p = kiln_sampling_default();
    p.min_p = -0.1f;
    CHECK(kiln_sampling_validate(ctx, &p) == KILN_ERR_INVALID_ARG);
    p = kiln_sampling_default();
    p.top_logprobs = 21;
    CHECK(kiln_sampling_validate(ctx, &p) == KILN_ERR_INVALID_ARG);
    p = kiln_sampling_default();
    p.repetition_penalty = 0;
    CHECK(kiln_sampling_validate(ctx, &p) == KILN_ERR_INVALID_ARG);
    kiln_sampler *s = NULL;
    CHECK(kiln_sampler_new(ctx, &p, 10, &s) == KILN_ERR_INVALID_ARG);
    CHECK(s == NULL);
    kiln_ctx_free(ctx);
}

/* ---- text stream (bytes tokenizer: id = byte) --------------------------- */

typedef struct pushed {
    char out[256];
    size_t n;
    bool stopped;
} pushed;

static void push_bytes(kiln_ctx *ctx, kiln_textstream *ts, const char *b, size_t n, pushed *acc)
{
    for (size_t i = 0; i < n; i++) {
        const char *o;
        size_t len;
        bool st;
        CHECK(kiln_textstream_push(ctx, ts, (unsigned char)b[i], &o, &len, &st) == KILN_OK);
        memcpy(acc->out + acc->n, o, len);
        acc->n += len;
        acc->out[acc->n] = 0;
        acc->stopped = st;
    }
}

static void test_textstream(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok = NULL;
    if (kiln_tokenizer_load(ctx, "bytes", &tok) != KILN_OK) {
        CHECK_MSG(0, "bytes tokenizer: %s", kiln_errmsg(ctx));
        kiln_ctx_free(ctx);
        return;
    }
    kiln_textstream *ts;
    const char *stops[2] = {"END", "\n\n"};
    CHECK(kiln_textstream_new(ctx, tok, stops, 2, &ts) == KILN_OK);
    pushed p = {{0}, 0, false};
    /* a 2-byte character split over two tokens is emitted whole */
    push_bytes(ctx, ts, "a\xC3", 2, &p);
    CHECK_STREQ(p.out, "a");
    push_bytes(ctx, ts, "\xA9", 1, &p);
    CHECK_STREQ(p.out, "a\xC3\xA9");
    /* a possible stop prefix is held, then released */
    push_bytes(ctx, ts, "xE", 2, &p);
    CHECK_STREQ(p.out, "a\xC3\xA9x");
    push_bytes(ctx, ts, "Nd", 2, &p);
    CHECK_STREQ(p.out, "a\xC3\xA9xENd");
    /* an invalid byte becomes U+FFFD */
    push_bytes(ctx, ts, "\xFF", 1, &p);
    CHECK_STREQ(p.out, "a\xC3\xA9xENd\xEF\xBF\xBD");
    /* a stop split over tokens ends the stream, cut before it */
    push_bytes(ctx, ts, "ok\n", 3, &p);
    CHECK(!p.stopped);
    push_bytes(ctx, ts, "\nmore", 5, &p);
    CHECK(p.stopped);
    CHECK_STREQ(p.out, "a\xC3\xA9xENd\xEF\xBF\xBDok");
    size_t tl;
    CHECK_STREQ(kiln_textstream_text(ts, &tl), p.out);
    CHECK_EQ(tl, p.n);
    kiln_textstream_free(ts);

    /* finish flushes a held stop prefix and an incomplete character */
    CHECK(kiln_textstream_new(ctx, tok, stops, 2, &ts) == KILN_OK);
    p = (pushed){{0}, 0, false};
    push_bytes(ctx, ts, "hiEN\xE2\x82", 6, &p);
    CHECK_STREQ(p.out, "hiEN");
    const char *o;
    size_t n;
    kiln_textstream_finish(ts, &o, &n);
    CHECK(n >= 3 && memcmp(o, "\xEF\xBF\xBD", 3) == 0);
    kiln_textstream_free(ts);

    /* the stop at the very start */
    CHECK(kiln_textstream_new(ctx, tok, stops, 2, &ts) == KILN_OK);
    p = (pushed){{0}, 0, false};
    push_bytes(ctx, ts, "END", 3, &p);
    CHECK(p.stopped);
    CHECK_EQ(p.n, 0);
    kiln_textstream_free(ts);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

int main(void)
{
    RUN_TEST(test_greedy);
    RUN_TEST(test_temperature);
    RUN_TEST(test_top_k);
    RUN_TEST(test_top_p);
    RUN_TEST(test_min_p);
    RUN_TEST(test_penalties);
    RUN_TEST(test_seed_reproducible);
    RUN_TEST(test_draw_frequencies);
    RUN_TEST(test_logprobs);
    RUN_TEST(test_validate);
    RUN_TEST(test_textstream);
    return TEST_EXIT();
}
