/*
 * test_grpo.c — GRPO's objective and rewards (kiln.h, "GRPO").
 *
 * The loss and its gradient with respect to the logits against an
 * independent PyTorch implementation of TRL GRPOTrainer's loss
 * (scripts/grpo_ref.py, float64 autograd) on fixed rollouts: GRPO with the
 * k3 KL and clipping taking effect, asymmetric clipping without a
 * reference, and Dr. GRPO; the group advantages come from each side's own
 * code. Known answers for the advantages and for every reward: the
 * markers (####, \boxed{} with nested braces, the last one wins), numeric
 * tolerance, the regex format reward, weighted sums, bad specs, and the
 * external command doing right (a checker reading the JSONL) and wrong
 * (exit status, a signal, a hang past the timeout with and without
 * reading its input, a wrong line count, a line that is not a number, not
 * found) with the rule kiln.h states.
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PY "/usr/bin/python3"

static const char *root(void)
{
    const char *r = getenv("KILN_ROOT");
    return r ? r : ".";
}

static int torch_known = -1; /* importing torch takes seconds: once */

static bool have_torch(void)
{
    if (torch_known < 0)
        torch_known = access(PY, X_OK) == 0 &&
                      system(PY " -c 'import torch, numpy' >/dev/null 2>&1") == 0;
    return torch_known == 1;
}

static void put(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(p, 1, n, f) == n);
    if (f) fclose(f);
}

static bool get(const char *path, void *p, size_t n)
{
    FILE *f = fopen(path, "rb");
    bool ok = f && fread(p, 1, n, f) == n;
    if (f) fclose(f);
    CHECK_MSG(ok, "could not read %s", path);
    return ok;
}

/* ---- the loss against PyTorch ------------------------------------------- */

enum { G = 3, B = 6, T = 7, V = 11, MAXNEW = 6 };

/* Fixed rollouts: rows of B with a 2-token prompt (no loss) and 1..5
 * completion tokens, rewards with ties and spread, old and reference
 * log-probs off the current ones by up to +-0.6 (ratios both sides of the
 * clip range). */
static void make_rollouts(kiln_ctx *ctx, float *logits, int32_t *targets, float *old, float *ref,
                          float *rewards)
{
    kiln_rng r;
    kiln_rng_seed(&r, 11);
    for (int i = 0; i < B * T * V; i++) logits[i] = 2.0f * kiln_rng_normal(&r);
    for (int b = 0; b < B; b++) {
        int len = 1 + b % 5;
        for (int t = 0; t < T; t++)
            targets[b * T + t] = t >= 2 && t < 2 + len ? (int32_t)kiln_rng_below(&r, V) : -1;
    }
    float lp[B * T];
    CHECK_EQ(kiln_token_logprobs(ctx, logits, targets, B * T, V, lp), KILN_OK);
    for (int i = 0; i < B * T; i++) {
        old[i] = lp[i] + 1.2f * (kiln_rng_uniform(&r) - 0.5f);
        ref[i] = lp[i] + 1.2f * (kiln_rng_uniform(&r) - 0.5f);
    }
    const float rw[B] = {1.0f, 0.0f, 0.5f, 0.2f, 0.2f, 1.2f};
    memcpy(rewards, rw, sizeof rw);
}

static void torch_case(kiln_ctx *ctx, double clip_low, double clip_high, double beta, bool dr)
{
    float logits[B * T * V], old[B * T], ref[B * T], rewards[B], adv[B];
    int32_t targets[B * T];
    make_rollouts(ctx, logits, targets, old, ref, rewards);
    double params[4] = {clip_low, clip_high, beta, dr ? 1.0 : 0.0};
    put(P("logits.f32"), logits, sizeof logits);
    put(P("targets.i32"), targets, sizeof targets);
    put(P("old.f32"), old, sizeof old);
    put(P("ref.f32"), ref, sizeof ref);
    put(P("rewards.f32"), rewards, sizeof rewards);
    put(P("params.f64"), params, sizeof params);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, PY " '%s/scripts/grpo_ref.py' '%s' %d %d %d %d %d > '%s' 2>&1",
             root(), test_tmp, B, T, V, G, MAXNEW, P("py.log"));
    int rc = system(cmd);
    CHECK_MSG(rc == 0, "grpo_ref.py failed (rc %d), see %s", rc, P("py.log"));
    static double want[1 + B + B * T * V];
    if (rc || !get(P("out.f64"), want, sizeof want)) return;

    CHECK_EQ(kiln_grpo_advantages(ctx, rewards, B / G, G, !dr, adv), KILN_OK);
    double ea = 0;
    for (int i = 0; i < B; i++) ea = check_max(ea, fabs((double)adv[i] - want[1 + i]));
    CHECK_MSG(ea <= 1e-5, "advantages differ from PyTorch by %g", ea);

    kiln_grpo_state st = {.opts = kiln_grpo_opts_default()};
    st.opts.clip_low = clip_low;
    st.opts.clip_high = clip_high;
    st.opts.beta = beta;
    st.opts.dr_grpo = dr;
    st.opts.max_new_tokens = MAXNEW;
    CHECK_EQ(kiln_grpo_opts_validate(ctx, &st.opts), KILN_OK);
    float logp[B * T], dlogp[B * T];
    static float d[B * T * V];
    st.adv = adv;
    st.old_logp = old;
    st.ref_logp = beta > 0 ? ref : NULL;
    st.logp = logp;
    st.dlogp = dlogp;
    kiln_objective obj = kiln_objective_grpo(&st);
    CHECK(!strcmp(obj.name, dr ? "dr_grpo" : "grpo"));
    /* as the trainer does: weigh, then loss at grad_scale 1 / W */
    kiln_objective_batch b = {.B = B, .T = T, .V = V, .targets = targets};
    double W = 0, ls = 0, ws = 0;
    CHECK_EQ(obj.weigh(obj.user, ctx, &b, &W), KILN_OK);
    CHECK(W == (dr ? (double)B * MAXNEW : (double)B));
    CHECK_EQ(obj.loss(obj.user, ctx, &b, logits, (float)(1.0 / W), d, &ls, &ws), KILN_OK);
    CHECK(ws == W);
    double loss = ls / W;
    CHECK_MSG(fabs(loss - want[0]) <= 1e-5 * (1 + fabs(want[0])), "loss %.9g vs PyTorch %.9g",
              loss, want[0]);
    double ed = 0, scale = 0;
    for (int i = 0; i < B * T * V; i++) {
        ed = check_max(ed, fabs((double)d[i] - want[1 + B + i]));
        scale = check_max(scale, fabs(want[1 + B + i]));
    }
    CHECK_MSG(ed <= 1e-6 + 1e-5 * scale, "dlogits differ from PyTorch by %g (largest %g)", ed,
              scale);
    CHECK(scale > 1e-3); /* the gradient is not trivially zero */
    /* the case exercises clipping: some tokens took the clipped branch,
     * not all of them */
    CHECK_MSG(st.clipped > 0 && st.clipped < st.tokens, "clipped %g of %g tokens", st.clipped,
              st.tokens);
    CHECK(beta == 0 || st.kl_sum > 0);
}

static void test_grpo_against_torch(void)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    kiln_ctx *ctx = kiln_ctx_new();
    torch_case(ctx, 0.2, 0.2, 0.04, false);
    kiln_ctx_free(ctx);
}

static void test_grpo_asymmetric_clip_no_ref_against_torch(void)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    kiln_ctx *ctx = kiln_ctx_new();
    torch_case(ctx, 0.1, 0.28, 0.0, false);
    kiln_ctx_free(ctx);
}

static void test_dr_grpo_against_torch(void)
{
    if (!have_torch()) SKIP("/usr/bin/python3 has no torch (apt-get install python3-torch)");
    kiln_ctx *ctx = kiln_ctx_new();
    torch_case(ctx, 0.2, 0.2, 0.04, true);
    kiln_ctx_free(ctx);
}

/* The first update (old_logp NULL): ratio 1, nothing clipped, and the
 * gradient is -A/len per token through the log-probs' backward. */
static void test_first_update_ratio_one(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    float logits[B * T * V], old[B * T], ref[B * T], rewards[B], adv[B];
    int32_t targets[B * T];
    make_rollouts(ctx, logits, targets, old, ref, rewards);
    CHECK_EQ(kiln_grpo_advantages(ctx, rewards, B / G, G, true, adv), KILN_OK);
    float logp[B * T], dlogp[B * T], want_dlogp[B * T];
    static float d[B * T * V], want[B * T * V];
    kiln_grpo_state st = {.opts = kiln_grpo_opts_default(), .adv = adv, .logp = logp, .dlogp = dlogp};
    kiln_objective obj = kiln_objective_grpo(&st);
    kiln_objective_batch b = {.B = B, .T = T, .V = V, .targets = targets};
    double ls = 0, ws = 0;
    CHECK_EQ(obj.loss(obj.user, ctx, &b, logits, 1.0f, d, &ls, &ws), KILN_OK);
    CHECK(st.clipped == 0);
    double lsum = 0;
    for (int r = 0; r < B; r++) {
        int n = 1 + r % 5;
        lsum += -adv[r]; /* mean over the row of -A * 1 */
        for (int t = 0; t < T; t++)
            want_dlogp[r * T + t] = targets[r * T + t] >= 0 ? -adv[r] / (float)n : 0.0f;
    }
    CHECK_REL(ls, lsum, 1e-5);
    CHECK_EQ(kiln_token_logprobs_backward(ctx, logits, targets, want_dlogp, B * T, V, 1.0f, want),
             KILN_OK);
    double e = 0;
    for (int i = 0; i < B * T * V; i++) e = check_max(e, fabs((double)d[i] - want[i]));
    CHECK_MSG(e <= 1e-6, "dlogits differ from -A/len through the log-probs by %g", e);
    kiln_ctx_free(ctx);
}

static void test_advantages_known(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    const float r[8] = {1, 0, 0, 1, 0.5f, 0.5f, 0.5f, 0.5f};
    float a[8];
    CHECK_EQ(kiln_grpo_advantages(ctx, r, 2, 4, true, a), KILN_OK);
    /* mean 0.5, unbiased std sqrt(1/3) */
    double s = sqrt(1.0 / 3.0) + 1e-4;
    CHECK_REL(a[0], 0.5 / s, 1e-6);
    CHECK_REL(a[1], -0.5 / s, 1e-6);
    for (int i = 4; i < 8; i++) CHECK(a[i] == 0); /* a group that agrees teaches nothing */
    CHECK_EQ(kiln_grpo_advantages(ctx, r, 2, 4, false, a), KILN_OK);
    CHECK_REL(a[0], 0.5, 1e-7);
    CHECK_REL(a[2], -0.5, 1e-7);
    CHECK(kiln_grpo_advantages(ctx, r, 8, 1, true, a) == KILN_ERR_INVALID_ARG);
    const float bad[2] = {1, NAN};
    CHECK(kiln_grpo_advantages(ctx, bad, 1, 2, true, a) == KILN_ERR_NUMERIC);
    kiln_grpo_opts o = kiln_grpo_opts_default();
    o.dr_grpo = true;
    CHECK(kiln_grpo_opts_validate(ctx, &o) == KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_grpo_opts.max_new_tokens") != NULL);
    kiln_ctx_free(ctx);
}

/* ---- rewards ------------------------------------------------------------ */

static float score1(kiln_ctx *ctx, const char *spec, const char *regex, double tol,
                    const char *completion, const char *answer)
{
    kiln_reward_opts o = kiln_reward_opts_default();
    o.spec = spec;
    o.regex = regex;
    o.tolerance = tol;
    kiln_reward *r = NULL;
    float out = -1;
    CHECK_EQ(kiln_reward_new(ctx, &o, &r), KILN_OK);
    if (r) CHECK_EQ(kiln_reward_score(ctx, r, 1, NULL, &completion, &answer, &out, NULL, NULL), KILN_OK);
    kiln_reward_free(r);
    return out;
}

static void test_answer_extract(void)
{
    size_t n;
    const char *a = kiln_answer_extract("so 3 + 4 = 7\n#### 7 \nthanks", &n);
    CHECK(a && n == 1 && *a == '7');
    a = kiln_answer_extract("#### 1 then #### 22", &n);
    CHECK(a && n == 2 && !strncmp(a, "22", 2));
    a = kiln_answer_extract("we get \\boxed{\\frac{1}{2}} finally", &n);
    CHECK(a && n == 11 && !strncmp(a, "\\frac{1}{2}", 11));
    a = kiln_answer_extract("\\boxed{1} or \\boxed{ 2 }", &n);
    CHECK(a && n == 1 && *a == '2');
    CHECK(kiln_answer_extract("the answer is 7", &n) == NULL);
    CHECK(kiln_answer_extract("\\boxed{unclosed", &n) == NULL);
}

static void test_reward_exact(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    CHECK(score1(ctx, "exact", NULL, 0, "3+4 is #### 7", "7") == 1);
    CHECK(score1(ctx, "exact", NULL, 0, "3+4 is #### 8", "7") == 0);
    CHECK(score1(ctx, "exact", NULL, 0, "3+4 is 7", "7") == 0); /* no marker */
    CHECK(score1(ctx, "exact", NULL, 0, "#### 1,000", "1000") == 1); /* equal numbers */
    CHECK(score1(ctx, "exact", NULL, 0, "#### 7.", "7") == 1);
    CHECK(score1(ctx, "exact", NULL, 0, "#### 7.5", "7") == 0);
    CHECK(score1(ctx, "exact", NULL, 0, "\\boxed{\\frac{1}{2}}", " \\frac{1}{2} ") == 1);
    CHECK(score1(ctx, "exact", NULL, 0, "#### Paris", "Paris") == 1);
    CHECK(score1(ctx, "exact", NULL, 0, "#### paris", "Paris") == 0);
    kiln_ctx_free(ctx);
}

static void test_reward_numeric(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    CHECK(score1(ctx, "numeric", NULL, 1e-4, "pi is about #### 3.1416", "3.14159") == 1);
    CHECK(score1(ctx, "numeric", NULL, 1e-7, "pi is about #### 3.1416", "3.14159") == 0);
    CHECK(score1(ctx, "numeric", NULL, 0.01, "#### $1,000.5", "1000") == 1); /* 0.5 <= 10 */
    CHECK(score1(ctx, "numeric", NULL, 1e-4, "#### 0.00005", "0") == 1);      /* max(1,|y|) */
    CHECK(score1(ctx, "numeric", NULL, 1e-4, "#### 0.0002", "0") == 0);
    CHECK(score1(ctx, "numeric", NULL, 1, "#### seven", "7") == 0);
    kiln_ctx_free(ctx);
}

static void test_reward_regex_and_sum(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    CHECK(score1(ctx, "regex", NULL, 0, "work\n#### 12", "x") == 1);     /* the default */
    CHECK(score1(ctx, "regex", NULL, 0, "#### 12 and more", "x") == 0);
    CHECK(score1(ctx, "regex", "^<think>.*</think>", 0, "<think>hm</think> 4", "x") == 1);
    CHECK(score1(ctx, "regex", "^<think>.*</think>", 0, "4 <think>hm</think>", "x") == 0);
    /* weighted sums, with each term's own score */
    kiln_reward_opts o = kiln_reward_opts_default();
    o.spec = "exact:1,regex:0.25,numeric:-0.5";
    o.tolerance = 0.1;
    kiln_reward *r = NULL;
    CHECK_EQ(kiln_reward_new(ctx, &o, &r), KILN_OK);
    if (r) {
        CHECK(kiln_reward_n_terms(r) == 3);
        CHECK(!strcmp(kiln_reward_term_name(r, 2), "numeric"));
        const char *c[3] = {"#### 5", "#### 5.05", "no"};
        const char *ans[3] = {"5", "5", "5"};
        float out[3], terms[9];
        CHECK_EQ(kiln_reward_score(ctx, r, 3, NULL, c, ans, out, terms, NULL), KILN_OK);
        CHECK(out[0] == 1.0f + 0.25f - 0.5f);
        CHECK(out[1] == 0.25f - 0.5f); /* not exact, the format, numerically close */
        CHECK(out[2] == 0.0f);
        CHECK(terms[0] == 1 && terms[1] == 0 && terms[3] == 1 && terms[4] == 1 && terms[5] == 0 &&
              terms[6] == 1 && terms[7] == 1 && terms[8] == 0);
    }
    kiln_reward_free(r);
    /* bad specs name the field */
    const char *bad[] = {"exakt", "exact:x", "exact,", "cmd", "exact,exact", ""};
    for (int i = 0; i < 6; i++) {
        o = kiln_reward_opts_default();
        o.spec = bad[i];
        CHECK_MSG(kiln_reward_new(ctx, &o, &r) == KILN_ERR_INVALID_ARG, "spec '%s'", bad[i]);
        CHECK_MSG(strstr(kiln_errmsg(ctx), "kiln_reward_opts.spec") != NULL, "%s", kiln_errmsg(ctx));
    }
    o = kiln_reward_opts_default();
    o.spec = "regex";
    o.regex = "([unclosed";
    CHECK(kiln_reward_new(ctx, &o, &r) == KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_reward_opts.regex") != NULL);
    kiln_ctx_free(ctx);
}

/* The command's scores and report for three completions. */
static kiln_status run_cmd(kiln_ctx *ctx, const char *cmd, double timeout, const char *const *c,
                           float *out, kiln_reward_report *rep)
{
    kiln_reward_opts o = kiln_reward_opts_default();
    o.spec = "cmd";
    o.cmd = cmd;
    o.cmd_timeout = timeout;
    kiln_reward *r = NULL;
    kiln_status s = kiln_reward_new(ctx, &o, &r);
    const char *p[3] = {"1+1=", "2+2=", "3+3="}, *a[3] = {"2", "4", "6"};
    for (int i = 0; i < 3; i++) out[i] = -7;
    if (!s) s = kiln_reward_score(ctx, r, 3, p, c, a, out, NULL, rep);
    kiln_reward_free(r);
    return s;
}

static void test_reward_cmd(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_log_level(ctx, KILN_LOG_ERROR); /* the warnings are expected */
    const char *c[3] = {"#### 2", "#### 5", "\"quoted\"\nnew line #### 6"};
    float out[3];
    kiln_reward_report rep;
    if (access(PY, X_OK) == 0) {
        /* a real checker: reads the JSONL, compares the answer */
        const char *chk = PY " -c 'import sys, json\n"
                          "for l in sys.stdin:\n"
                          "    o = json.loads(l)\n"
                          "    print(1.5 if o[\"completion\"].endswith(o[\"answer\"]) and "
                          "o[\"prompt\"].endswith(\"=\") else 0)'";
        CHECK_EQ(run_cmd(ctx, chk, 30, c, out, &rep), KILN_OK);
        CHECK(out[0] == 1.5f && out[1] == 0 && out[2] == 1.5f);
        CHECK(rep.cmd_failures == 0 && rep.cmd_bad_lines == 0 && rep.why[0] == 0);
    }
    /* exit status */
    CHECK_EQ(run_cmd(ctx, "cat >/dev/null; echo 1; echo 1; echo 1; exit 3", 30, c, out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 1 && out[0] == 0 && out[1] == 0 && out[2] == 0);
    CHECK_MSG(strstr(rep.why, "status 3") != NULL, "%s", rep.why);
    /* a crash (signal) */
    CHECK_EQ(run_cmd(ctx, "kill -SEGV $$", 30, c, out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 1 && out[0] == 0);
    CHECK_MSG(strstr(rep.why, "signal") != NULL, "%s", rep.why);
    /* a hang, reading nothing: killed at the timeout */
    double t0 = kiln_time_now();
    CHECK_EQ(run_cmd(ctx, "sleep 30", 0.3, c, out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 1 && out[2] == 0);
    CHECK_MSG(strstr(rep.why, "timed out") != NULL, "%s", rep.why);
    CHECK(kiln_time_now() - t0 < 20); /* killed, not waited for */
    /* a hang after answering and closing its stdout */
    CHECK_EQ(run_cmd(ctx, "cat >/dev/null; echo 1; echo 1; echo 1; exec >&-; sleep 30", 0.3, c,
                     out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 1);
    CHECK_MSG(strstr(rep.why, "timed out") != NULL, "%s", rep.why);
    /* wrong line count */
    CHECK_EQ(run_cmd(ctx, "cat >/dev/null; echo 1; echo 1", 30, c, out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 1 && out[0] == 0);
    CHECK_MSG(strstr(rep.why, "2 lines for 3") != NULL, "%s", rep.why);
    /* garbage lines: those completions 0, the rest kept */
    CHECK_EQ(run_cmd(ctx, "cat >/dev/null; printf '0.25\\nabc\\nnan\\n'", 30, c, out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 0 && rep.cmd_bad_lines == 2);
    CHECK(out[0] == 0.25f && out[1] == 0 && out[2] == 0);
    /* no trailing newline is fine */
    CHECK_EQ(run_cmd(ctx, "cat >/dev/null; printf '1\\n2\\n3'", 30, c, out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 0 && out[2] == 3);
    /* exits at once without reading a large input: no SIGPIPE death */
    static char big[3][200000];
    for (int i = 0; i < 3; i++) {
        memset(big[i], 'x', sizeof big[i] - 1);
        big[i][sizeof big[i] - 1] = 0;
    }
    const char *cb[3] = {big[0], big[1], big[2]};
    CHECK_EQ(run_cmd(ctx, "echo 1; echo 1; echo 1", 30, cb, out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 0 && out[0] == 1);
    /* not found */
    CHECK_EQ(run_cmd(ctx, "/nonexistent/checker", 30, c, out, &rep), KILN_OK);
    CHECK(rep.cmd_failures == 1);
    CHECK_MSG(strstr(rep.why, "127") != NULL, "%s", rep.why);
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_grpo.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    RUN_TEST(test_grpo_against_torch);
    RUN_TEST(test_grpo_asymmetric_clip_no_ref_against_torch);
    RUN_TEST(test_dr_grpo_against_torch);
    RUN_TEST(test_first_update_ratio_one);
    RUN_TEST(test_advantages_known);
    RUN_TEST(test_answer_extract);
    RUN_TEST(test_reward_exact);
    RUN_TEST(test_reward_numeric);
    RUN_TEST(test_reward_regex_and_sum);
    RUN_TEST(test_reward_cmd);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
