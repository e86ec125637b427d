/*
 * test_cli_flags.c — the kiln command's map from option fields to flags
 * (cli_flags in tools/cli.c): known fields become flags, "FIELD = V"
 * reads "--flag V", unknown fields and look-alikes stay as they are, and a
 * short buffer is cut, never overrun.
 */
#include "check.h"
#include "../tools/cli.c"

static const char *map(const char *msg)
{
    static char buf[1024];
    return cli_flags(msg, buf, sizeof buf);
}

static void test_known_fields(void)
{
    CHECK_STREQ(map("kiln_train_opts.batch, kiln_train_opts.seq and "
                    "kiln_train_opts.grad_accum must be positive (got 0, 8, 1)"),
                "--batch, --seq and --grad-accum must be positive (got 0, 8, 1)");
    CHECK_STREQ(map("kiln_sampling.top_p = 2 must be in (0, 1]"), "--top-p 2 must be in (0, 1]");
    CHECK_STREQ(map("kiln_tokenize_opts.format = 'xml' must be auto, text or jsonl"),
                "--format 'xml' must be auto, text or jsonl");
    CHECK_STREQ(map("raise kiln_train_opts.dist.timeout_s."), "raise --dist-timeout.");
    CHECK_STREQ(map("(B = kiln_train_opts.batch, T = kiln_train_opts.seq)"),
                "(B = --batch, T = --seq)");
    CHECK_STREQ(map("kiln_serve_opts.n_ctx"), "--ctx");
    /* an element: only " = " right after the field is dropped */
    CHECK_STREQ(map("kiln_gen_opts.stop_ids[3] = 9 is outside"), "--stop-token[3] = 9 is outside");
    CHECK_STREQ(map("kiln_tokenize_opts.inputs 'x': No such file"), "--input 'x': No such file");
}

static void test_left_alone(void)
{
    /* unknown fields, other identifiers, prefixes and look-alikes */
    const char *same[] = {
        "kiln_sampling.top_logprobs = 30 must be in [0, 20]",
        "kiln_train_opts.on_step is not called",
        "kiln_train_opts.batches",
        "mykiln_train_opts.batch",
        "kiln_train_opts.dist",
        "kiln_train_opts.",
        "kiln_train_opts",
        "create it with kiln_tokenize_corpus (kiln tokenize)",
        "",
    };
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++)
        CHECK_STREQ(map(same[i]), same[i]);
    CHECK_STREQ(map("kiln_train_opts.batch."), "--batch.");
    CHECK_STREQ(map("x=kiln_train_opts.lr"), "x=--lr");
    CHECK(cli_flag_of("kiln_train_opts.batch", 21) != NULL);
    CHECK(cli_flag_of("kiln_train_opts.batch", 20) == NULL);
}

static void test_short_buffer(void)
{
    char buf[8];
    memset(buf, 'z', sizeof buf);
    CHECK_STREQ(cli_flags("kiln_train_opts.grad_accum is wrong", buf, 6), "--gra");
    CHECK_EQ(buf[6], 'z');
    CHECK_STREQ(cli_flags("abcdefgh", buf, 4), "abc");
    CHECK_STREQ(cli_flags("kiln_unknown_opts.field", buf, 5), "kiln");
    CHECK_STREQ(cli_flags("x", buf, 1), "");
}

int main(void)
{
    RUN_TEST(test_known_fields);
    RUN_TEST(test_left_alone);
    RUN_TEST(test_short_buffer);
    return TEST_EXIT();
}
