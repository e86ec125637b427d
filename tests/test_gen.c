/*
 * test_gen.c — the one generation loop (kiln_prompt_ids, kiln_gen_*,
 * kiln_generate): the BOS rule per architecture; every finish reason on
 * hand-made logits (end-of-text, ignore_eos, stop token, stop string with
 * the text cut before it, max_tokens with a held-back UTF-8 tail flushed);
 * log-probabilities against a log-softmax computed here in double; and on
 * a small random model, kiln_generate against an independent greedy loop
 * over kiln_engine_step, a callback that cancels, and a full context.
 */
#include "check.h"
#include "kiln.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { V = 257, EOT = 256 };

static kiln_ctx *ctx;
static kiln_tokenizer *bytes_tok;

static kiln_config cfg_of(kiln_arch arch, int bos)
{
    kiln_config c = kiln_config_default();
    c.arch = arch;
    c.vocab_size = V;
    c.bos_token_id = bos;
    c.eos_token_id = -1;
    return c;
}

static void test_prompt_bos_rule(void)
{
    int32_t in[3] = {104, 105, 33}, *out = NULL;
    size_t n = 0;
    kiln_config llama = cfg_of(KILN_ARCH_LLAMA, 1), gpt2 = cfg_of(KILN_ARCH_GPT2, 1);
    CHECK_EQ(kiln_prompt_ids(ctx, &llama, bytes_tok, in, 3, &out, &n), KILN_OK);
    CHECK_EQ(n, 4);
    if (n == 4) CHECK(out[0] == 1 && out[1] == 104 && out[3] == 33);
    free(out);
    CHECK_EQ(kiln_prompt_ids(ctx, &gpt2, bytes_tok, in, 3, &out, &n), KILN_OK);
    CHECK_EQ(n, 3);
    if (n == 3) CHECK(out[0] == 104 && out[2] == 33);
    free(out);
    /* empty: BOS, or end-of-text when the model has none */
    CHECK_EQ(kiln_prompt_ids(ctx, &gpt2, bytes_tok, NULL, 0, &out, &n), KILN_OK);
    CHECK(n == 1 && out[0] == 1);
    free(out);
    kiln_config nobos = cfg_of(KILN_ARCH_LLAMA, -1);
    CHECK_EQ(kiln_prompt_ids(ctx, &nobos, bytes_tok, NULL, 0, &out, &n), KILN_OK);
    CHECK(n == 1 && out[0] == EOT);
    free(out);
    CHECK_EQ(kiln_prompt_ids(ctx, &nobos, bytes_tok, in, 3, &out, &n), KILN_OK);
    CHECK(n == 3 && out[0] == 104);
    free(out);
}

/* logits with one clear winner */
static void peak(float *l, int id)
{
    for (int i = 0; i < V; i++) l[i] = (float)(i % 7) * 0.1f;
    l[id] = 20.0f;
}

/* feeds ids one by one; returns the last token's report */
static kiln_gen_token feed(kiln_gen *g, const int *ids, int n, char *text, size_t cap)
{
    float l[V];
    kiln_gen_token t = {0};
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        peak(l, ids[i]);
        CHECK_EQ(kiln_gen_next(ctx, g, l, &t), KILN_OK);
        if (k + t.len < cap) {
            memcpy(text + k, t.text, t.len);
            k += t.len;
        }
    }
    text[k] = 0;
    return t;
}

static kiln_gen *mk(kiln_gen_opts o)
{
    kiln_config c = cfg_of(KILN_ARCH_GPT2, -1);
    kiln_gen *g = NULL;
    int32_t p = 65;
    o.sampling.temperature = 0;
    CHECK_EQ(kiln_gen_new(ctx, bytes_tok, &c, &o, &p, 1, &g), KILN_OK);
    return g;
}

static void test_finish_reasons(void)
{
    char text[64];
    kiln_gen_opts o = kiln_gen_opts_default();
    /* end-of-text: the token adds no text and ends it */
    kiln_gen *g = mk(o);
    kiln_gen_token t = feed(g, (int[]){104, 105, EOT}, 3, text, sizeof text);
    CHECK_EQ(t.finish, KILN_FINISH_EOS);
    CHECK_EQ(t.id, EOT);
    CHECK_STREQ(text, "hi");
    CHECK_EQ(kiln_gen_count(g), 3);
    /* after the end: nothing more */
    t = feed(g, (int[]){106}, 1, text, sizeof text);
    CHECK(t.id == -1 && t.finish == KILN_FINISH_EOS && t.len == 0);
    CHECK_EQ(kiln_gen_count(g), 3);
    kiln_gen_free(g);
    /* ignore_eos: end-of-text is just a token */
    o.ignore_eos = true;
    g = mk(o);
    t = feed(g, (int[]){104, EOT, 105}, 3, text, sizeof text);
    CHECK_EQ(t.finish, KILN_FINISH_NONE);
    CHECK_EQ(kiln_gen_count(g), 3);
    CHECK(text[0] == 'h' && text[strlen(text) - 1] == 'i');
    kiln_gen_free(g);
    /* a stop token */
    o = kiln_gen_opts_default();
    int32_t stop_id = 'x';
    o.stop_ids = &stop_id;
    o.n_stop_ids = 1;
    g = mk(o);
    t = feed(g, (int[]){'a', 'b', 'x'}, 3, text, sizeof text);
    CHECK_EQ(t.finish, KILN_FINISH_STOP_TOKEN);
    CHECK_STREQ(text, "ab");
    kiln_gen_free(g);
    /* a stop string: held back while it could start, cut before it */
    o = kiln_gen_opts_default();
    const char *stop = "END";
    o.stops = &stop;
    o.n_stops = 1;
    g = mk(o);
    t = feed(g, (int[]){'a', 'E', 'N'}, 3, text, sizeof text);
    CHECK_EQ(t.finish, KILN_FINISH_NONE);
    CHECK_STREQ(text, "a"); /* "EN" held */
    t = feed(g, (int[]){'D'}, 1, text, sizeof text);
    CHECK_EQ(t.finish, KILN_FINISH_STOP_STRING);
    CHECK_EQ(t.len, 0);
    size_t len;
    CHECK_STREQ(kiln_gen_text(g, &len), "a");
    kiln_gen_free(g);
    /* max_tokens: the last token's text and the held-back tail (an
     * unfinished UTF-8 sequence becomes U+FFFD) come with it */
    o = kiln_gen_opts_default();
    o.max_tokens = 3;
    g = mk(o);
    t = feed(g, (int[]){'x', 'y', 0xC3}, 3, text, sizeof text);
    CHECK_EQ(t.finish, KILN_FINISH_LENGTH);
    CHECK_STREQ(text, "xy\xEF\xBF\xBD");
    CHECK_STREQ(kiln_gen_text(g, &len), "xy\xEF\xBF\xBD");
    CHECK_EQ(kiln_gen_count(g), 3);
    kiln_gen_free(g);
    /* a bad option names its field */
    o = kiln_gen_opts_default();
    o.max_tokens = 0;
    kiln_config c = cfg_of(KILN_ARCH_GPT2, -1);
    g = NULL;
    CHECK_EQ(kiln_gen_new(ctx, bytes_tok, &c, &o, NULL, 0, &g), KILN_ERR_INVALID_ARG);
    CHECK(g == NULL && strstr(kiln_errmsg(ctx), "kiln_gen_opts.max_tokens"));
    o = kiln_gen_opts_default();
    int32_t bad = V;
    o.stop_ids = &bad;
    o.n_stop_ids = 1;
    CHECK_EQ(kiln_gen_new(ctx, bytes_tok, &c, &o, NULL, 0, &g), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "stop_ids[0]") != NULL);
}

static void test_logprobs(void)
{
    kiln_gen_opts o = kiln_gen_opts_default();
    o.logprobs = true;
    o.sampling.top_logprobs = 2;
    kiln_gen *g = mk(o);
    float l[V], raw[V];
    for (int i = 0; i < V; i++) raw[i] = l[i] = sinf((float)i) * 3.0f;
    kiln_gen_token t;
    CHECK_EQ(kiln_gen_next(ctx, g, l, &t), KILN_OK);
    double mx = -INFINITY, s = 0;
    int best = 0;
    for (int i = 0; i < V; i++) {
        if (raw[i] > mx) mx = raw[i], best = i;
    }
    for (int i = 0; i < V; i++) s += exp((double)raw[i] - mx);
    CHECK_EQ(t.id, best); /* greedy */
    CHECK_NEAR(t.chosen.logprob, (double)raw[best] - mx - log(s), 1e-5);
    CHECK_EQ(t.n_top, 2);
    CHECK(t.top && t.top[0].token == best);
    kiln_gen_free(g);
}

/* argmax, ties to the lowest id (the greedy sampler's rule) */
static int argmax(const float *l)
{
    int b = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > l[b]) b = i;
    return b;
}

typedef struct {
    int32_t ids[256];
    int n, stop_after;
} seen;

static bool collect(void *user, const kiln_gen_token *t)
{
    seen *s = user;
    if (t->id >= 0 && s->n < 256) s->ids[s->n++] = t->id;
    return s->stop_after <= 0 || s->n < s->stop_after;
}

static void test_generate_on_engine(void)
{
    kiln_config c = kiln_config_default();
    c.arch = KILN_ARCH_GPT2;
    c.n_layer = 2;
    c.n_embd = 64;
    c.n_head = 4;
    c.n_kv_head = 4;
    c.n_inner = 256;
    c.vocab_size = V;
    c.n_ctx = 32;
    c.bos_token_id = -1;
    c.eos_token_id = -1;
    kiln_model *m = NULL;
    CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
    if (!m) return;
    kiln_model_init_random(m, 11);
    kiln_engine *e = NULL;
    kiln_engine_opts eo = kiln_engine_opts_default();
    CHECK_EQ(kiln_engine_new(ctx, m, &eo, &e), KILN_OK);
    kiln_model_free(m);
    if (!e) return;
    int32_t prompt[5] = {72, 101, 108, 108, 111};
    float lg[V];
    /* the reference: prefill, then argmax and feed back, by hand */
    int32_t want[10];
    CHECK_EQ(kiln_engine_prefill(ctx, e, 0, prompt, 5, lg), KILN_OK);
    for (int i = 0; i < 10; i++) {
        want[i] = argmax(lg);
        kiln_engine_tok tk = {0, want[i], true};
        if (i < 9) CHECK_EQ(kiln_engine_step(ctx, e, &tk, 1, lg), KILN_OK);
    }
    kiln_gen_opts o = kiln_gen_opts_default();
    o.sampling.temperature = 0;
    o.ignore_eos = true;
    o.max_tokens = 10;
    kiln_gen *g = NULL;
    CHECK_EQ(kiln_gen_new(ctx, bytes_tok, &c, &o, prompt, 5, &g), KILN_OK);
    seen s = {.n = 0};
    kiln_engine_reset(e, 0);
    CHECK_EQ(kiln_generate(ctx, e, 0, g, prompt, 5, lg, collect, &s), KILN_OK);
    CHECK_EQ(s.n, 10);
    CHECK(!memcmp(s.ids, want, sizeof want));
    CHECK_EQ(kiln_gen_finished(g), KILN_FINISH_LENGTH);
    CHECK_EQ(kiln_engine_pos(e, 0), 5 + 9); /* the last token is not fed back */
    kiln_gen_free(g);
    /* a callback that says stop after 3 */
    CHECK_EQ(kiln_gen_new(ctx, bytes_tok, &c, &o, prompt, 5, &g), KILN_OK);
    s = (seen){.n = 0, .stop_after = 3};
    kiln_engine_reset(e, 0);
    CHECK_EQ(kiln_generate(ctx, e, 0, g, prompt, 5, lg, collect, &s), KILN_OK);
    CHECK_EQ(s.n, 3);
    CHECK_EQ(kiln_gen_count(g), 3);
    CHECK_EQ(kiln_gen_finished(g), KILN_FINISH_CANCELLED);
    CHECK(!memcmp(s.ids, want, 3 * sizeof *want));
    kiln_gen_free(g);
    /* the context (32) fills: prompt 5, then 27 fed back + 1 sampled */
    o.max_tokens = 100;
    CHECK_EQ(kiln_gen_new(ctx, bytes_tok, &c, &o, prompt, 5, &g), KILN_OK);
    s = (seen){.n = 0};
    kiln_engine_reset(e, 0);
    CHECK_EQ(kiln_generate(ctx, e, 0, g, prompt, 5, lg, collect, &s), KILN_OK);
    CHECK_EQ(kiln_gen_finished(g), KILN_FINISH_LENGTH);
    CHECK_EQ(kiln_gen_count(g), 32 - 5 + 1);
    CHECK_EQ(kiln_engine_pos(e, 0), 32);
    kiln_gen_free(g);
    /* a prompt that does not fit is refused before anything runs */
    int32_t big[40] = {0};
    CHECK_EQ(kiln_gen_new(ctx, bytes_tok, &c, &o, big, 40, &g), KILN_OK);
    kiln_engine_reset(e, 0);
    CHECK_EQ(kiln_generate(ctx, e, 0, g, big, 40, lg, collect, &s), KILN_ERR_RANGE);
    CHECK_EQ(kiln_gen_count(g), 0);
    kiln_gen_free(g);
    kiln_engine_free(e);
}

/* kiln_engine_copy_prefix: a copied (or kept) prefix plus the rest of the
 * prompt gives the logits of the whole prompt prefilled at once */
static void test_copy_prefix(void)
{
    kiln_config c = kiln_config_default();
    c.arch = KILN_ARCH_LLAMA;
    c.n_layer = 2;
    c.n_embd = 64;
    c.n_head = 4;
    c.n_kv_head = 2;
    c.n_inner = 128;
    c.vocab_size = V;
    c.n_ctx = 32;
    kiln_model *m = NULL;
    CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
    if (!m) return;
    kiln_model_init_random(m, 5);
    kiln_engine *e = NULL;
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.n_slots = 3;
    CHECK_EQ(kiln_engine_new(ctx, m, &eo, &e), KILN_OK);
    kiln_model_free(m);
    if (!e) return;
    int32_t p[8] = {72, 101, 108, 108, 111, 32, 119, 111};
    float full[V], lg[V];
    CHECK_EQ(kiln_engine_prefill(ctx, e, 0, p, 8, full), KILN_OK);
    /* another slot: the first 5 positions copied, the last 3 fed */
    CHECK_EQ(kiln_engine_prefill(ctx, e, 1, p + 2, 4, NULL), KILN_OK); /* stale content */
    CHECK_EQ(kiln_engine_copy_prefix(ctx, e, 1, 0, 5), KILN_OK);
    CHECK_EQ(kiln_engine_pos(e, 1), 5);
    CHECK_EQ(kiln_engine_prefill(ctx, e, 1, p + 5, 3, lg), KILN_OK);
    double d = 0;
    for (int i = 0; i < V; i++) d = fmax(d, fabs(lg[i] - full[i]));
    CHECK_MSG(d < 1e-4, "copied prefix: logits differ by %g", d);
    /* the same slot: keep 6, feed 2 */
    CHECK_EQ(kiln_engine_copy_prefix(ctx, e, 0, 0, 6), KILN_OK);
    CHECK_EQ(kiln_engine_pos(e, 0), 6);
    CHECK_EQ(kiln_engine_prefill(ctx, e, 0, p + 6, 2, lg), KILN_OK);
    d = 0;
    for (int i = 0; i < V; i++) d = fmax(d, fabs(lg[i] - full[i]));
    CHECK_MSG(d < 1e-4, "kept prefix: logits differ by %g", d);
    /* a copied prefix that is not the prompt's gives other logits */
    CHECK_EQ(kiln_engine_copy_prefix(ctx, e, 2, 1, 4), KILN_OK);
    int32_t q = 7;
    CHECK_EQ(kiln_engine_prefill(ctx, e, 2, &q, 1, lg), KILN_OK);
    CHECK_EQ(kiln_engine_pos(e, 2), 5);
    d = 0;
    for (int i = 0; i < V; i++) d = fmax(d, fabs(lg[i] - full[i]));
    CHECK(d > 1e-3);
    /* bounds */
    CHECK_EQ(kiln_engine_copy_prefix(ctx, e, 2, 0, 9), KILN_ERR_RANGE);
    CHECK_EQ(kiln_engine_copy_prefix(ctx, e, 3, 0, 1), KILN_ERR_RANGE);
    CHECK_EQ(kiln_engine_copy_prefix(ctx, e, 0, -1, 1), KILN_ERR_RANGE);
    CHECK_EQ(kiln_engine_copy_prefix(ctx, e, 2, 0, 0), KILN_OK);
    CHECK_EQ(kiln_engine_pos(e, 2), 0);
    kiln_engine_free(e);
}

int main(void)
{
    ctx = kiln_ctx_new();
    if (kiln_tokenizer_load(ctx, "bytes", &bytes_tok)) {
        printf("FAIL setup: bytes tokenizer: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    RUN_TEST(test_prompt_bos_rule);
    RUN_TEST(test_finish_reasons);
    RUN_TEST(test_logprobs);
    RUN_TEST(test_generate_on_engine);
    RUN_TEST(test_copy_prefix);
    kiln_tokenizer_free(bytes_tok);
    kiln_ctx_free(ctx);
    return TEST_EXIT();
}
