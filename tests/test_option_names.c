/*
 * test_option_names.c — a program on the C API (it has no flags) reads
 * which option was wrong as STRUCT.FIELD of include/kiln.h, in errors and
 * in log lines, never as a kiln command flag (docs/architecture.md,
 * "Errors"). tests/t_option_names.sh checks that the kiln command shows
 * its flags for the same mistakes, and that no library string names one.
 */
#include "check.h"
#include "kiln.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static char tmpdir[512];

/* st is want_st, and the last failure on ctx names `field` and no "--". */
#define CHECK_NAMES(ctx, st, want_st, field)                                  \
    do {                                                                      \
        const char *m_ = kiln_errmsg(ctx);                                    \
        CHECK_MSG((st) == (want_st), "status %s, message '%s'",               \
                  kiln_status_name(st), m_);                                  \
        CHECK_MSG(strstr(m_, field) != NULL, "'%s' does not name %s", m_, field); \
        CHECK_MSG(strstr(m_, "--") == NULL, "'%s' names a flag", m_);         \
    } while (0)

static void test_train_opts(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_opts o = kiln_train_opts_default();
    kiln_train_result res;
    o.progress = KILN_PROGRESS_NONE;
    kiln_status s = kiln_train(ctx, &o, &res);
    CHECK_NAMES(ctx, s, KILN_ERR_INVALID_ARG, "kiln_train_opts.data ");

    o.data = "no-such-data";
    o.out = "no-such-run";
    o.batch = 0;
    s = kiln_train(ctx, &o, &res);
    CHECK_NAMES(ctx, s, KILN_ERR_INVALID_ARG, "kiln_train_opts.batch");
    CHECK(strstr(kiln_errmsg(ctx), "(got 0,") != NULL);

    o.batch = 2;
    o.lr = 0;
    s = kiln_train(ctx, &o, &res);
    CHECK_NAMES(ctx, s, KILN_ERR_INVALID_ARG, "kiln_train_opts.lr must be positive");

    o.lr = 1e-3;
    o.beta2 = 1;
    s = kiln_train(ctx, &o, &res);
    CHECK_NAMES(ctx, s, KILN_ERR_INVALID_ARG, "kiln_train_opts.beta2");

    o.beta2 = 0.95;
    o.zero = 7;
    s = kiln_train(ctx, &o, &res);
    CHECK_NAMES(ctx, s, KILN_ERR_INVALID_ARG, "kiln_train_opts.zero = 7 is not supported");

    o.zero = 0;
    s = kiln_train(ctx, &o, &res); /* the data directory is missing */
    CHECK_NAMES(ctx, s, KILN_ERR_IO, "kiln_tokenize_opts.out_dir = no-such-data");
    kiln_ctx_free(ctx);
}

static void test_sampling_and_serve(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_sampling p = kiln_sampling_default();
    p.top_p = 2;
    CHECK_NAMES(ctx, kiln_sampling_validate(ctx, &p), KILN_ERR_INVALID_ARG,
                "kiln_sampling.top_p = 2 must be in (0, 1]");
    p = kiln_sampling_default();
    p.repetition_penalty = 0;
    CHECK_NAMES(ctx, kiln_sampling_validate(ctx, &p), KILN_ERR_INVALID_ARG,
                "kiln_sampling.repetition_penalty = 0");

    kiln_serve_opts so = kiln_serve_opts_default();
    CHECK_NAMES(ctx, kiln_serve_run(ctx, &so), KILN_ERR_INVALID_ARG,
                "kiln_serve_opts.model_dir is required");
    so.model_dir = "no-such-model";
    so.parallel = 0;
    CHECK_NAMES(ctx, kiln_serve_run(ctx, &so), KILN_ERR_INVALID_ARG,
                "kiln_serve_opts.parallel = 0");
    so.parallel = 1;
    so.watch_ms = -5;
    CHECK_NAMES(ctx, kiln_serve_run(ctx, &so), KILN_ERR_INVALID_ARG,
                "kiln_serve_opts.watch_ms = -5 must be >= 0");
    kiln_ctx_free(ctx);
}

static void test_tokenizer_opts(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer_train_opts to = kiln_tokenizer_train_opts_default();
    const char *in[] = {"no-such-file"};
    to.inputs = in;
    to.n_inputs = 1;
    to.vocab_size = 100;
    kiln_tokenizer *tok = NULL;
    kiln_status s = kiln_tokenizer_train(ctx, &to, &tok, NULL);
    CHECK_NAMES(ctx, s, KILN_ERR_RANGE, "kiln_tokenizer_train_opts.vocab_size = 100");
    kiln_tokenizer_free(tok);
    tok = NULL;
    to.vocab_size = 300;
    s = kiln_tokenizer_train(ctx, &to, &tok, NULL);
    CHECK_NAMES(ctx, s, KILN_ERR_IO, "kiln_tokenizer_train_opts.inputs 'no-such-file'");
    kiln_tokenizer_free(tok);

    CHECK(kiln_tokenizer_load(ctx, "bytes", &tok) == KILN_OK);
    kiln_tokenize_opts ko = kiln_tokenize_opts_default();
    ko.inputs = in;
    ko.n_inputs = 1;
    ko.out_dir = "no-such-out";
    ko.val_fraction = 2;
    CHECK_NAMES(ctx, kiln_tokenize_corpus(ctx, tok, &ko, NULL), KILN_ERR_INVALID_ARG,
                "kiln_tokenize_opts.val_fraction = 2 must be in [0, 1)");
    ko.val_fraction = 0;
    ko.format = "xml";
    CHECK_NAMES(ctx, kiln_tokenize_corpus(ctx, tok, &ko, NULL), KILN_ERR_INVALID_ARG,
                "kiln_tokenize_opts.format = 'xml'");

    kiln_dataset_opts dopt = kiln_dataset_opts_default();
    dopt.max_len = -1;
    kiln_dataset *ds = NULL;
    CHECK_NAMES(ctx, kiln_dataset_load(ctx, tok, "no-such.jsonl", KILN_DATASET_SFT, &dopt, &ds),
                KILN_ERR_INVALID_ARG, "kiln_dataset_opts.max_len = -1");
    kiln_dataset_free(ds);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

/* ---- log lines ---------------------------------------------------------- */

typedef struct logged {
    int n;
    char text[4096];
} logged;

static void keep_log(void *user, kiln_log_level level, const char *msg)
{
    logged *l = user;
    if (level != KILN_LOG_WARN) return;
    l->n++;
    size_t used = strlen(l->text);
    snprintf(l->text + used, sizeof l->text - used, "%s\n", msg);
}

static void test_log_names_fields(void)
{
    /* one document and val_fraction > 0: the warning suggests
     * doc_separator; it goes to the ctx's log function, not stderr */
    char txt[600], out[600];
    snprintf(txt, sizeof txt, "%s/one.txt", tmpdir);
    snprintf(out, sizeof out, "%s/data", tmpdir);
    FILE *f = fopen(txt, "w");
    CHECK(f != NULL);
    if (!f) return;
    for (int i = 0; i < 50; i++) fputs("one document, no separator\n", f);
    fclose(f);
    kiln_ctx *ctx = kiln_ctx_new();
    logged l = {0};
    kiln_set_log_fn(ctx, keep_log, &l);
    kiln_tokenizer *tok = NULL;
    CHECK(kiln_tokenizer_load(ctx, "bytes", &tok) == KILN_OK);
    kiln_tokenize_opts ko = kiln_tokenize_opts_default();
    const char *in[] = {txt};
    ko.inputs = in;
    ko.n_inputs = 1;
    ko.out_dir = out;
    ko.val_fraction = 0.5;
    ko.threads = 1;
    kiln_status s = kiln_tokenize_corpus(ctx, tok, &ko, NULL);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    CHECK_MSG(l.n == 1, "%d warnings: %s", l.n, l.text);
    CHECK_MSG(strstr(l.text, "kiln_tokenize_opts.doc_separator") != NULL, "%s", l.text);
    CHECK_MSG(strstr(l.text, "--") == NULL, "%s", l.text);
    /* NULL gives stderr back; nothing more reaches the old function */
    kiln_set_log_fn(ctx, NULL, NULL);
    kiln_log(ctx, KILN_LOG_WARN, "test_option_names: this line goes to stderr");
    CHECK_EQ(l.n, 1);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "%s/optnames.XXXXXX",
             getenv("KILN_TMP") ? getenv("KILN_TMP") : "/tmp");
    if (!mkdtemp(tmpdir)) return 1;
    RUN_TEST(test_train_opts);
    RUN_TEST(test_sampling_and_serve);
    RUN_TEST(test_tokenizer_opts);
    RUN_TEST(test_log_names_fields);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd)) { /* best effort */ }
    return TEST_EXIT();
}
