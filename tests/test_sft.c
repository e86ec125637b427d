/*
 * test_sft.c — supervised fine-tuning's pieces on tiny inputs: the rows
 * kiln_dataset_rows builds (tokens, padding and targets for each
 * kiln_loss_on, hand-computed), the trainer's row source (the first
 * step's loss and step 0's val_loss are the masked cross-entropy of the
 * initial model over exactly the targeted tokens, recomputed here from its
 * logits in double; metrics.jsonl's loss_tokens counts them) and the row
 * source's errors.
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static kiln_dataset *load(kiln_ctx *ctx, const kiln_tokenizer *tok, const char *jsonl)
{
    write_file(P("d.jsonl"), jsonl);
    kiln_dataset *ds = NULL;
    kiln_dataset_opts o = kiln_dataset_opts_default();
    kiln_status s = kiln_dataset_load(ctx, tok, P("d.jsonl"), KILN_DATASET_SFT, &o, &ds);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    return ds;
}

/* prompt "ab", completion "cd" with the bytes tokenizer: ids a b c d EOT,
 * mask 0 0 1 1 1 (the completion and the end-of-text id). */
static void test_rows_prompt_completion(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &tok), KILN_OK);
    kiln_dataset *ds = load(ctx, tok, "{\"prompt\":\"ab\",\"completion\":\"cd\"}\n"
                                      "{\"prompt\":\"x\",\"completion\":\"y\"}\n");
    if (!ds) goto out;
    kiln_packed *p = NULL;
    CHECK_EQ(kiln_dataset_rows(ctx, ds, 0, KILN_LOSS_ON_MASK, NULL, 0, &p), KILN_OK);
    CHECK_EQ(p->rows, 2);
    CHECK_EQ(p->T, 4); /* the longest example: 5 tokens, 4 positions */
    const int32_t E = 256;
    const int32_t tok0[4] = {'a', 'b', 'c', 'd'}, tg0[4] = {-1, 'c', 'd', E};
    const int32_t tok1[4] = {'x', 'y', E, E}, tg1[4] = {'y', E, -1, -1};
    const int32_t doc1[4] = {0, 0, -1, -1};
    for (int j = 0; j < 4; j++) {
        CHECK_EQ(p->tokens[j], tok0[j]);
        CHECK_EQ(p->targets[j], tg0[j]);
        CHECK_EQ(p->tokens[4 + j], tok1[j]);
        CHECK_EQ(p->targets[4 + j], tg1[j]);
        CHECK_EQ(p->doc[4 + j], doc1[j]);
    }
    kiln_packed_free(p);
    /* all: every next token of the example */
    CHECK_EQ(kiln_dataset_rows(ctx, ds, 0, KILN_LOSS_ON_ALL, NULL, 0, &p), KILN_OK);
    const int32_t all0[4] = {'b', 'c', 'd', E};
    for (int j = 0; j < 4; j++) CHECK_EQ(p->targets[j], all0[j]);
    kiln_packed_free(p);
    /* an index list, a fixed T that cuts, and a bad index */
    size_t idx[1] = {0};
    CHECK_EQ(kiln_dataset_rows(ctx, ds, 2, KILN_LOSS_ON_MASK, idx, 1, &p), KILN_OK);
    CHECK_EQ(p->rows, 1);
    CHECK_EQ(p->cut, 1);
    CHECK_EQ(p->targets[0], -1);
    CHECK_EQ(p->targets[1], 'c');
    kiln_packed_free(p);
    idx[0] = 2;
    CHECK_EQ(kiln_dataset_rows(ctx, ds, 0, KILN_LOSS_ON_MASK, idx, 1, &p), KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "index 2") != NULL);
    kiln_dataset_free(ds);
out:
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

/* Two assistant turns: assistant learns both, completion only the last. */
static void test_rows_completion_is_last_turn(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &tok), KILN_OK);
    kiln_dataset *ds = load(ctx, tok,
                            "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
                            "{\"role\":\"assistant\",\"content\":\"AAA\"},"
                            "{\"role\":\"user\",\"content\":\"more\"},"
                            "{\"role\":\"assistant\",\"content\":\"BB\"}]}\n");
    if (!ds) goto out;
    kiln_packed *pm = NULL, *pc = NULL, *pa = NULL;
    CHECK_EQ(kiln_dataset_rows(ctx, ds, 0, KILN_LOSS_ON_MASK, NULL, 0, &pm), KILN_OK);
    CHECK_EQ(kiln_dataset_rows(ctx, ds, 0, KILN_LOSS_ON_COMPLETION, NULL, 0, &pc), KILN_OK);
    CHECK_EQ(kiln_dataset_rows(ctx, ds, 0, KILN_LOSS_ON_ALL, NULL, 0, &pa), KILN_OK);
    if (pm && pc && pa) {
        int nm = 0, nc = 0, na = 0;
        char learned_m[64] = "", learned_c[64] = "";
        for (int j = 0; j < pm->T; j++) {
            if (pm->targets[j] >= 0) {
                if (pm->targets[j] < 256 && nm < 63) learned_m[strlen(learned_m)] = (char)pm->targets[j];
                nm++;
            }
            if (pc->targets[j] >= 0) {
                if (pc->targets[j] < 256 && nc < 63) learned_c[strlen(learned_c)] = (char)pc->targets[j];
                nc++;
            }
            na += pa->targets[j] >= 0;
        }
        /* ChatML as text markers (the bytes vocabulary): each turn's content
         * and its "<|im_end|>" text (10 bytes) */
        CHECK_STREQ(learned_m, "AAA<|im_end|>BB<|im_end|>");
        CHECK_STREQ(learned_c, "BB<|im_end|>");
        CHECK_EQ(nm, 3 + 10 + 2 + 10);
        CHECK_EQ(nc, 2 + 10);
        CHECK_EQ(na, pa->T);
    }
    kiln_packed_free(pm);
    kiln_packed_free(pc);
    kiln_packed_free(pa);
    kiln_dataset_free(ds);
out:
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

static double g_first_loss;
static bool first_step(void *user, const kiln_step_info *si)
{
    (void)user;
    g_first_loss = si->loss;
    return false; /* stop after step 1 */
}

static void write_config(const char *path)
{
    write_file(path, "{\"model_type\":\"gpt2\",\"n_layer\":1,\"n_embd\":32,\"n_head\":2,"
                     "\"n_positions\":64,\"vocab_size\":257,\"layer_norm_epsilon\":1e-5,"
                     "\"tie_word_embeddings\":true}\n");
}

/* -mean log softmax(logits)[target] over the rows with a target, in
 * double; *n their count. */
static double masked_ce(const float *logits, const int32_t *tg, int N, int V, int *n)
{
    double sum = 0;
    *n = 0;
    for (int i = 0; i < N; i++) {
        if (tg[i] < 0) continue;
        const float *l = logits + (size_t)i * V;
        double mx = l[0], z = 0;
        for (int v = 1; v < V; v++) mx = l[v] > mx ? l[v] : mx;
        for (int v = 0; v < V; v++) z += exp((double)l[v] - mx);
        sum += -((double)l[tg[i]] - mx - log(z));
        (*n)++;
    }
    return sum / *n;
}

static void test_first_step_is_masked_ce(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &tok), KILN_OK);
    kiln_dataset *ds = load(ctx, tok,
                            "{\"prompt\":\"the cat sat on\",\"completion\":\" the mat\"}\n"
                            "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},"
                            "{\"role\":\"assistant\",\"content\":\"yes\"}]}\n"
                            "{\"prompt\":\"a dog\",\"completion\":\" ran far away\"}\n");
    kiln_packed *rows = NULL;
    if (!ds) goto out;
    CHECK_EQ(kiln_dataset_rows(ctx, ds, 0, KILN_LOSS_ON_MASK, NULL, 0, &rows), KILN_OK);
    if (!rows) goto out;
    write_config(P("cfg.json"));
    kiln_train_opts o = kiln_train_opts_default();
    o.config = P("cfg.json");
    o.out = P("run_first");
    o.rows = rows;
    o.objective = kiln_objective_masked_ce();
    o.batch = 3;
    o.seq = rows->T;
    o.steps = 5;
    o.shuffle = false;
    o.seed = 11;
    o.threads = 1;
    o.val_rows = rows; /* step 0's val_loss: the same masked CE */
    o.eval_every = 100;
    o.eval_steps = 1;
    o.progress = KILN_PROGRESS_NONE;
    o.precision = KILN_PRECISION_FP32;
    o.on_step = first_step;
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, &o, &res);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    CHECK_EQ(res.step, 1);
    /* the same initial model, its logits on the same three rows */
    kiln_config cfg;
    kiln_model *m = NULL;
    CHECK_EQ(kiln_config_load(ctx, P("cfg.json"), &cfg), KILN_OK);
    CHECK_EQ(kiln_model_new(ctx, &cfg, &m), KILN_OK);
    kiln_model_init_random(m, 11);
    CHECK_EQ(kiln_model_set_precision(ctx, m, KILN_PRECISION_FP32), KILN_OK);
    CHECK_EQ(kiln_model_prepare(ctx, m, 3, rows->T), KILN_OK);
    float *logits = NULL;
    CHECK_EQ(kiln_model_forward(ctx, m, rows->tokens, 3, rows->T, &logits), KILN_OK);
    int n = 0, n_all = 0;
    double want = masked_ce(logits, rows->targets, 3 * rows->T, 257, &n);
    CHECK_NEAR(g_first_loss, want, 1e-5);
    /* against every next token of the rows (the padding's included) the loss
     * differs: the mask is what was averaged over */
    int32_t *all = malloc((size_t)3 * rows->T * sizeof *all);
    for (int i = 0; i < 3 * rows->T; i++)
        all[i] = (i + 1) % rows->T ? rows->tokens[i + 1] : 256;
    double unmasked = masked_ce(logits, all, 3 * rows->T, 257, &n_all);
    CHECK_MSG(fabs(unmasked - want) > 1e-3, "masked %g unmasked %g", want, unmasked);
    CHECK(n < n_all);
    free(all);
    kiln_model_free(m);
    /* metrics.jsonl: step 0's val_loss over the held-out rows' targets,
     * then step 1 with the count of its loss tokens */
    FILE *f = fopen(P("run_first/metrics.jsonl"), "r");
    char line[2048] = "";
    CHECK(f && fgets(line, sizeof line, f));
    const char *vl = strstr(line, "\"val_loss\":");
    CHECK_MSG(vl && fabs(strtod(vl + 11, NULL) - want) < 1e-5, "%s: want val_loss %.6f", line, want);
    CHECK(f && fgets(line, sizeof line, f));
    if (f) fclose(f);
    char want_tok[64];
    snprintf(want_tok, sizeof want_tok, "\"loss_tokens\":%d,", n);
    CHECK_MSG(strstr(line, want_tok) != NULL, "%s lacks %s", line, want_tok);
out:
    kiln_packed_free(rows);
    kiln_dataset_free(ds);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

static void expect_fail(kiln_train_opts *o, kiln_status want, const char *needle)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, o, &res);
    CHECK_MSG(s == want, "got %s (%s), want %s", kiln_status_name(s), kiln_errmsg(ctx),
              kiln_status_name(want));
    CHECK_MSG(strstr(kiln_errmsg(ctx), needle) != NULL, "message '%s' lacks '%s'",
              kiln_errmsg(ctx), needle);
    kiln_ctx_free(ctx);
}

static void test_rows_errors(void)
{
    int32_t tokens[8] = {1, 2, 3, 4, 5, 6, 7, 8}, targets[8] = {2, 3, 4, -1, 6, 7, 8, -1};
    int32_t doc[8] = {0, 0, 0, 0, 0, 0, 1, 1};
    kiln_packed p = {.rows = 2, .T = 4, .tokens = tokens, .targets = targets, .doc = doc};
    write_config(P("cfg.json"));
    kiln_train_opts o = kiln_train_opts_default();
    o.out = P("run_err");
    o.rows = &p;
    o.objective = kiln_objective_masked_ce();
    o.batch = 1;
    o.seq = 4;
    o.steps = 1;
    o.threads = 1;
    o.progress = KILN_PROGRESS_NONE;
    expect_fail(&o, KILN_ERR_INVALID_ARG, "kiln_train_opts.init_from or kiln_train_opts.config");
    o.config = P("cfg.json");
    /* packed rows need positions that restart per document */
    expect_fail(&o, KILN_ERR_INVALID_ARG,
                "kiln_train_opts.rows row 1 holds several documents but its pos is missing");
    int32_t pos[8] = {0, 1, 2, 3, 0, 1, 0, 2};
    p.pos = pos;
    expect_fail(&o, KILN_ERR_INVALID_ARG,
                "kiln_train_opts.rows row 1 holds several documents but its pos is broken at "
                "position 3");
    p.pos = NULL;
    doc[6] = doc[7] = 0;
    o.seq = 8;
    expect_fail(&o, KILN_ERR_INVALID_ARG, "T = 4 positions but kiln_train_opts.seq = 8");
    o.seq = 4;
    tokens[5] = 300;
    expect_fail(&o, KILN_ERR_RANGE, "kiln_train_opts.rows row 1 position 1: token 300");
    tokens[5] = 6;
    p.rows = 0;
    expect_fail(&o, KILN_ERR_INVALID_ARG, "kiln_train_opts.rows holds no rows");
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_sft.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    RUN_TEST(test_rows_prompt_completion);
    RUN_TEST(test_rows_completion_is_last_turn);
    RUN_TEST(test_first_step_is_masked_ce);
    RUN_TEST(test_rows_errors);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
