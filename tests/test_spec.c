/*
 * test_spec.c — speculative decoding (src/infer/spec.c):
 *   - the accept/reject rule on a 5-token vocabulary: with x drawn from q,
 *     the token it returns is distributed as p (400k draws, fixed seed,
 *     every cell within 5 standard errors), for q wider than p, p wider
 *     than q, disjoint supports and p == q;
 *   - whole rounds (infer_spec_draft / infer_spec_decide through a
 *     kiln_gen with temperature, top-k and top-p) on position-dependent
 *     logits: the first three tokens' marginals and the joint of the first
 *     two equal the target's processed distributions, computed here in
 *     double from the raw logits;
 *   - greedy kiln_generate_spec gives the target's own tokens (kiln_generate
 *     alone) for gpt2 and llama, three prompts, K = 1..8, with drafts that
 *     agree always (the same weights), often (the same model in Q8_0) and
 *     rarely (another random model);
 *   - KV rollback: after a speculative generation both caches hold exactly
 *     the committed tokens: the next logits equal a fresh prefill's;
 *   - a draft with another vocabulary size or another tokenizer is refused.
 */
#include "check.h"
#include "kiln.h"
#include "infer/spec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static kiln_ctx *ctx;
static kiln_tokenizer *bytes_tok;

/* ---- the rule alone ---------------------------------------------------- */

static void rule_case(const char *name, const float *p, const float *q)
{
    enum { N = 400000, VV = 5 };
    kiln_rng rq, ra;
    kiln_rng_seed(&rq, 123);
    kiln_rng_seed(&ra, 456);
    long cnt[VV] = {0}, acc = 0;
    float resid[VV];
    for (int i = 0; i < N; i++) {
        int32_t x = infer_sample_draw(&rq, q, VV);
        bool ok;
        int32_t y = infer_spec_accept(&ra, p, q, x, VV, resid, &ok);
        cnt[y]++;
        acc += ok;
    }
    double want_acc = 0;
    for (int j = 0; j < VV; j++) want_acc += fmin(p[j], q[j]); /* P(accept) */
    for (int j = 0; j < VV; j++) {
        double f = (double)cnt[j] / N, se = sqrt(p[j] * (1 - p[j]) / N) + 1e-9;
        CHECK_MSG(fabs(f - p[j]) <= 5 * se, "%s: token %d frequency %.5f, p %.5f", name, j, f,
                  (double)p[j]);
    }
    double fa = (double)acc / N;
    CHECK_MSG(fabs(fa - want_acc) <= 5 * sqrt(fabs(want_acc * (1 - want_acc)) / N) + 1e-6,
              "%s: acceptance %.5f, sum min(p, q) %.5f", name, fa, want_acc);
}

static void test_accept_rule_distribution(void)
{
    const float p1[5] = {0.5f, 0.2f, 0.15f, 0.1f, 0.05f}, q1[5] = {0.2f, 0.2f, 0.2f, 0.2f, 0.2f};
    rule_case("q wider", p1, q1);
    const float p2[5] = {0.2f, 0.2f, 0.2f, 0.2f, 0.2f}, q2[5] = {0.7f, 0.3f, 0, 0, 0};
    rule_case("p wider", p2, q2);
    const float p3[5] = {0, 0, 0.6f, 0.4f, 0}, q3[5] = {0.5f, 0.5f, 0, 0, 0};
    rule_case("disjoint", p3, q3);
    rule_case("equal", p1, p1);
    const float p4[5] = {0, 0, 1, 0, 0}, q4[5] = {0, 1, 0, 0, 0};
    rule_case("greedy, different argmax", p4, q4);
}

/* ---- rounds through a kiln_gen --------------------------------------- */

enum { V = 257, POS = 3 };
static const float temp = 0.8f, top_p = 0.9f;
static const int top_k = 4;

/* logits at position j for the target (who 0) or the draft (who 1) */
static void logits_at(int who, int j, float *l)
{
    for (int i = 0; i < V; i++) l[i] = -4.0f + 0.01f * (float)(i % 13);
    static const float tgt[POS][6] = {{2.0f, 1.5f, 1.0f, 0.6f, 0.2f, 0.0f},
                                      {0.1f, 1.8f, 1.7f, 0.4f, 1.0f, 0.3f},
                                      {1.0f, 1.0f, 2.2f, 0.9f, 0.0f, 1.2f}};
    static const float dft[POS][6] = {{1.0f, 2.0f, 1.2f, 0.2f, 0.9f, 0.5f},
                                      {0.5f, 1.0f, 2.0f, 1.1f, 0.0f, 0.7f},
                                      {2.0f, 0.5f, 1.8f, 0.1f, 0.4f, 1.0f}};
    for (int i = 0; i < 6; i++) l[65 + i] = who ? dft[j][i] : tgt[j][i];
}

/* The target's distribution at position j after temperature, top-k and
 * top-p (the HF order), in double, written independently of sample.c. */
static void reference_p(int j, double *p)
{
    float l[V];
    logits_at(0, j, l);
    double mx = -1e30, e[V];
    for (int i = 0; i < V; i++) mx = fmax(mx, l[i] / temp);
    double sum = 0;
    for (int i = 0; i < V; i++) sum += (e[i] = exp(l[i] / temp - mx));
    int idx[V];
    for (int i = 0; i < V; i++) idx[i] = i;
    for (int a = 0; a < V; a++) /* selection sort, descending */
        for (int b = a + 1; b < V; b++)
            if (e[idx[b]] > e[idx[a]]) { int t = idx[a]; idx[a] = idx[b]; idx[b] = t; }
    int keep = top_k;
    double tot = 0, cum = 0;
    for (int a = 0; a < keep; a++) tot += e[idx[a]];
    int n = 0;
    while (n < keep && cum < top_p * tot) cum += e[idx[n++]];
    memset(p, 0, V * sizeof *p);
    for (int a = 0; a < n; a++) p[idx[a]] = e[idx[a]] / cum;
    (void)sum;
}

static void test_rounds_distribution(void)
{
    enum { N = 60000 };
    static long marg[POS][V], joint[V][V];
    memset(marg, 0, sizeof marg);
    memset(joint, 0, sizeof joint);
    kiln_config c = kiln_config_default();
    c.vocab_size = V;
    c.bos_token_id = -1;
    c.eos_token_id = -1;
    kiln_gen_opts o = kiln_gen_opts_default();
    o.sampling.temperature = temp;
    o.sampling.top_k = top_k;
    o.sampling.top_p = top_p;
    o.ignore_eos = true;
    o.max_tokens = 100;
    int32_t prompt[1] = {65};
    float lg[V];
    long accepted = 0, drafted = 0;
    for (int trial = 0; trial < N; trial++) {
        o.sampling.seed = (uint64_t)trial + 1;
        kiln_gen *g = NULL;
        infer_spec sp;
        if (kiln_gen_new(ctx, bytes_tok, &c, &o, prompt, 1, &g) ||
            infer_spec_init(ctx, &sp, g, V, 2)) {
            CHECK(false);
            kiln_gen_free(g);
            return;
        }
        int32_t out[POS + 2];
        int n = 0;
        while (n < POS) {
            /* a round drafting 2 tokens at positions n, n + 1 */
            int k = KILN_MIN(2, POS - n);
            infer_spec_begin(&sp, g);
            for (int i = 0; i < k; i++) {
                logits_at(1, n + i, lg);
                infer_spec_draft(&sp, lg);
            }
            drafted += k;
            for (int i = 0; i <= k && n < POS; i++) {
                bool ok;
                logits_at(0, n, lg);
                int32_t id = infer_spec_decide(&sp, g, i, lg, &ok);
                kiln_gen_token t;
                CHECK_EQ(infer_gen_push(ctx, g, sp.raw, id, &t), KILN_OK);
                out[n++] = id;
                accepted += ok;
                if (!ok) break;
            }
        }
        for (int j = 0; j < POS; j++) marg[j][out[j]]++;
        joint[out[0]][out[1]]++;
        infer_spec_free(&sp);
        kiln_gen_free(g);
    }
    double p[POS][V];
    for (int j = 0; j < POS; j++) reference_p(j, p[j]);
    int bad = 0;
    for (int j = 0; j < POS; j++)
        for (int i = 0; i < V; i++) {
            double f = (double)marg[j][i] / N, se = sqrt(p[j][i] * (1 - p[j][i]) / N) + 1e-12;
            if (fabs(f - p[j][i]) > 5 * se) {
                fprintf(stderr, "  position %d token %d: frequency %.5f, target p %.5f\n", j, i,
                        f, p[j][i]);
                bad++;
            }
        }
    for (int a = 0; a < V; a++)
        for (int b = 0; b < V; b++) {
            double pj = p[0][a] * p[1][b], f = (double)joint[a][b] / N;
            if (fabs(f - pj) > 5 * (sqrt(pj * (1 - pj) / N) + 1e-12)) {
                fprintf(stderr, "  joint (%d, %d): frequency %.5f, target %.5f\n", a, b, f, pj);
                bad++;
            }
        }
    CHECK_EQ(bad, 0);
    /* the draft is neither always right nor always wrong here */
    CHECK(accepted > drafted / 10 && accepted < drafted * 9 / 10);
}

/* ---- on engines ------------------------------------------------------ */

typedef struct seen {
    int32_t ids[256];
    int n;
} seen;

static bool collect(void *user, const kiln_gen_token *t)
{
    seen *s = user;
    if (t->id >= 0 && s->n < 256) s->ids[s->n++] = t->id;
    return true;
}

static kiln_config small_cfg(kiln_arch arch, int layers, int embd)
{
    kiln_config c = kiln_config_default();
    c.arch = arch;
    c.n_layer = layers;
    c.n_embd = embd;
    c.n_head = 4;
    c.n_kv_head = arch == KILN_ARCH_LLAMA ? 2 : 4;
    c.n_inner = 4 * embd;
    c.vocab_size = V;
    c.n_ctx = 96;
    c.bos_token_id = -1;
    c.eos_token_id = -1;
    return c;
}

static kiln_engine *engine_of(const kiln_config *c, uint64_t seed, kiln_dtype wt)
{
    kiln_model *m = NULL;
    kiln_engine *e = NULL;
    if (kiln_model_new(ctx, c, &m)) return NULL;
    kiln_model_init_random(m, seed);
    /* larger weights than the init's: peaked, varied outputs, so drafts
     * and targets disagree at places (a tiny init repeats one token) */
    float *w = kiln_model_params_mut(m);
    for (size_t i = 0, n = kiln_model_num_params(m); i < n; i++) w[i] *= 4.0f;
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.wtype = wt;
    kiln_engine_new(ctx, m, &eo, &e);
    kiln_model_free(m);
    return e;
}

static kiln_gen *greedy_gen(const kiln_config *c, const int32_t *prompt, int n, int max)
{
    kiln_gen_opts o = kiln_gen_opts_default();
    o.sampling.temperature = 0;
    o.ignore_eos = true;
    o.max_tokens = max;
    kiln_gen *g = NULL;
    kiln_gen_new(ctx, bytes_tok, c, &o, prompt, (size_t)n, &g);
    return g;
}

/* The slot's next-token logits after feeding tok equal those of a fresh
 * prefill of seq[0..n) then tok (the cache holds exactly seq). */
static double rollback_err(kiln_engine *e, const int32_t *seq, int n, int32_t tok)
{
    float a[V], b[V];
    kiln_engine_tok tk = {0, tok, true};
    if (kiln_engine_pos(e, 0) != n || kiln_engine_step(ctx, e, &tk, 1, a)) return 1e9;
    kiln_engine_reset(e, 0);
    if (kiln_engine_prefill(ctx, e, 0, seq, n, NULL) || kiln_engine_step(ctx, e, &tk, 1, b))
        return 1e9;
    double d = 0;
    for (int i = 0; i < V; i++) d = fmax(d, fabs((double)a[i] - b[i]));
    return d;
}

static void greedy_case(kiln_arch arch)
{
    kiln_config tc = small_cfg(arch, 3, 64), dc = small_cfg(arch, 1, 32);
    kiln_engine *e = engine_of(&tc, 7, KILN_DTYPE_F32);
    kiln_engine *same = engine_of(&tc, 7, KILN_DTYPE_F32);   /* always agrees */
    kiln_engine *q8 = engine_of(&tc, 7, KILN_DTYPE_Q8_0);    /* mostly agrees */
    kiln_engine *other = engine_of(&dc, 8, KILN_DTYPE_F32);  /* rarely agrees */
    CHECK(e && same && q8 && other);
    if (!e || !same || !q8 || !other) goto out;
    kiln_engine *drafts[3] = {same, q8, other};
    const int32_t prompts[3][6] = {{72, 101, 108, 108, 111, 32},
                                   {84, 104, 101, 0, 0, 0},
                                   {10, 0, 0, 0, 0, 0}};
    const int np[3] = {6, 3, 1}, max = 40;
    double worst = 0;
    uint64_t acc[3] = {0}, dr[3] = {0};
    for (int pi = 0; pi < 3; pi++) {
        seen want = {.n = 0};
        kiln_gen *g = greedy_gen(&tc, prompts[pi], np[pi], max);
        float lg[V];
        kiln_engine_reset(e, 0);
        CHECK(g && !kiln_generate(ctx, e, 0, g, prompts[pi], (size_t)np[pi], lg, collect, &want));
        kiln_gen_free(g);
        CHECK_EQ(want.n, max);
        for (int di = 0; di < 3; di++)
            for (int K = 1; K <= 8; K++) {
                seen got = {.n = 0};
                kiln_spec_stats ss;
                kiln_spec_opts so = {.n_draft = K};
                g = greedy_gen(&tc, prompts[pi], np[pi], max);
                kiln_engine_reset(e, 0);
                kiln_engine_reset(drafts[di], 0);
                kiln_status st = kiln_generate_spec(ctx, e, drafts[di], &so, 0, g, prompts[pi],
                                                    (size_t)np[pi], collect, &got, &ss);
                CHECK_MSG(st == KILN_OK, "%s", kiln_errmsg(ctx));
                CHECK_EQ(got.n, max);
                CHECK_MSG(!memcmp(got.ids, want.ids, sizeof(int32_t) * max),
                          "prompt %d draft %d K %d: tokens differ from the target's", pi, di, K);
                CHECK_EQ(ss.emitted + ss.plain + 1, (uint64_t)max);
                acc[di] += ss.accepted;
                dr[di] += ss.drafted;
                /* both caches hold the prompt and all generated but the last */
                int32_t seq[128];
                memcpy(seq, prompts[pi], sizeof(int32_t) * np[pi]);
                memcpy(seq + np[pi], got.ids, sizeof(int32_t) * (max - 1));
                int n = np[pi] + max - 1;
                CHECK_EQ(kiln_engine_pos(e, 0), n);
                CHECK_EQ(kiln_engine_pos(drafts[di], 0), n);
                /* (the Q8_0 engine's fresh prefill and its token-by-token
                 * steps round differently, by ~0.3 on these logits of
                 * magnitude ~100, rollback or not: no reference there) */
                if (K == 3 || K == 8) {
                    worst = fmax(worst, rollback_err(e, seq, n, got.ids[max - 1]));
                    if (di != 1)
                        worst = fmax(worst, rollback_err(drafts[di], seq, n, got.ids[max - 1]));
                }
                kiln_gen_free(g);
            }
    }
    CHECK_MSG(worst < 1e-4, "logits after the rounds differ from a fresh prefill by %g", worst);
    CHECK_EQ(acc[0], dr[0]);                /* the same weights: all accepted */
    CHECK(acc[1] > dr[1] / 2);              /* Q8_0: most */
    CHECK(acc[2] < dr[2]);                  /* another model: rejections happened */
    fprintf(stderr, "  %s: accepted %llu/%llu (same), %llu/%llu (q8_0), %llu/%llu (other)\n",
            arch == KILN_ARCH_LLAMA ? "llama" : "gpt2", (unsigned long long)acc[0],
            (unsigned long long)dr[0], (unsigned long long)acc[1], (unsigned long long)dr[1],
            (unsigned long long)acc[2], (unsigned long long)dr[2]);
out:
    kiln_engine_free(e);
    kiln_engine_free(same);
    kiln_engine_free(q8);
    kiln_engine_free(other);
}

static void test_greedy_identical_gpt2(void) { greedy_case(KILN_ARCH_GPT2); }
static void test_greedy_identical_llama(void) { greedy_case(KILN_ARCH_LLAMA); }

/* ---- bad pairs ------------------------------------------------------- */

static void test_vocab_mismatch_refused(void)
{
    kiln_config a = small_cfg(KILN_ARCH_GPT2, 1, 32), b = a;
    b.vocab_size = V + 3;
    CHECK_EQ(kiln_spec_check(ctx, &a, NULL, &b, NULL), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "vocabulary") != NULL);
    CHECK_EQ(kiln_spec_check(ctx, &a, bytes_tok, &a, bytes_tok), KILN_OK);
    /* the engines themselves: kiln_generate_spec refuses too */
    kiln_engine *e = engine_of(&a, 1, KILN_DTYPE_F32), *d = engine_of(&b, 2, KILN_DTYPE_F32);
    kiln_gen *g = greedy_gen(&a, (const int32_t[]){65}, 1, 4);
    kiln_spec_opts so = kiln_spec_opts_default();
    CHECK(e && d && g);
    if (e && d && g)
        CHECK_EQ(kiln_generate_spec(ctx, e, d, &so, 0, g, (const int32_t[]){65}, 1, NULL, NULL,
                                    NULL),
                 KILN_ERR_INVALID_ARG);
    so.n_draft = 0;
    if (e && g)
        CHECK_EQ(kiln_generate_spec(ctx, e, e, &so, 0, g, (const int32_t[]){65}, 1, NULL, NULL,
                                    NULL),
                 KILN_ERR_INVALID_ARG);
    kiln_gen_free(g);
    kiln_engine_free(e);
    kiln_engine_free(d);
}

static void test_tokenizer_mismatch_refused(void)
{
    /* two BPEs of the same size learned from different text */
    const char *dir = getenv("KILN_TMP") ? getenv("KILN_TMP") : "/tmp";
    char pa[512], pb[512];
    snprintf(pa, sizeof pa, "%s/test_spec_a.txt", dir);
    snprintf(pb, sizeof pb, "%s/test_spec_b.txt", dir);
    FILE *fa = fopen(pa, "w"), *fb = fopen(pb, "w");
    CHECK(fa && fb);
    if (!fa || !fb) { if (fa) fclose(fa); if (fb) fclose(fb); return; }
    for (int i = 0; i < 200; i++) {
        fputs("the cat sat on the mat and the hat\n", fa);
        fputs("zebras quietly jump over lazy foxes\n", fb);
    }
    fclose(fa);
    fclose(fb);
    kiln_tokenizer *ta = NULL, *tb = NULL;
    kiln_tokenizer_train_opts o = kiln_tokenizer_train_opts_default();
    o.vocab_size = 270;
    o.threads = 1;
    const char *ia[1] = {pa}, *ib[1] = {pb};
    o.inputs = ia;
    o.n_inputs = 1;
    CHECK_EQ(kiln_tokenizer_train(ctx, &o, &ta, NULL), KILN_OK);
    o.inputs = ib;
    CHECK_EQ(kiln_tokenizer_train(ctx, &o, &tb, NULL), KILN_OK);
    if (ta && tb) {
        CHECK_EQ(kiln_tokenizer_vocab_size(ta), kiln_tokenizer_vocab_size(tb));
        kiln_config c = small_cfg(KILN_ARCH_GPT2, 1, 32);
        c.vocab_size = kiln_tokenizer_vocab_size(ta);
        CHECK_EQ(kiln_spec_check(ctx, &c, ta, &c, tb), KILN_ERR_INVALID_ARG);
        CHECK(strstr(kiln_errmsg(ctx), "tokenizer differs") != NULL);
        CHECK_EQ(kiln_spec_check(ctx, &c, ta, &c, ta), KILN_OK);
    }
    kiln_tokenizer_free(ta);
    kiln_tokenizer_free(tb);
    remove(pa);
    remove(pb);
}

int main(void)
{
    ctx = kiln_ctx_new();
    kiln_set_threads(ctx, 1);
    if (kiln_tokenizer_load(ctx, "bytes", &bytes_tok)) {
        printf("FAIL setup: bytes tokenizer: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    RUN_TEST(test_accept_rule_distribution);
    RUN_TEST(test_rounds_distribution);
    RUN_TEST(test_greedy_identical_gpt2);
    RUN_TEST(test_greedy_identical_llama);
    RUN_TEST(test_vocab_mismatch_refused);
    RUN_TEST(test_tokenizer_mismatch_refused);
    kiln_tokenizer_free(bytes_tok);
    kiln_ctx_free(ctx);
    return TEST_EXIT();
}
