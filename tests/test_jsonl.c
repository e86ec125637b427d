/*
 * test_jsonl.c — the chat template and its loss mask, tuning datasets
 * (SFT, preference, prompts) with validation of every malformed line,
 * truncation, packing with document boundaries, and kiln_tokenize_corpus
 * read back through kiln_data_open.
 */
#include "check.h"
#include "kiln.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static kiln_ctx *ctx;
static char tmp[4096];

static const char *write_tmp(const char *name, const char *text)
{
    static char path[4300];
    snprintf(path, sizeof path, "%s/%s", tmp, name);
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
    return path;
}

/* A small trained tokenizer with the ChatML specials. */
static kiln_tokenizer *trained(void)
{
    const char *p = write_tmp("train.txt",
                              "the user asked and the assistant answered the question\n"
                              "hello hello world, the system says hi\n");
    const char *in[1] = {p};
    kiln_tokenizer_train_opts o = kiln_tokenizer_train_opts_default();
    o.inputs = in;
    o.n_inputs = 1;
    o.vocab_size = 300;
    o.threads = 1;
    kiln_tokenizer *t = NULL;
    CHECK_EQ(kiln_tokenizer_train(ctx, &o, &t, NULL), KILN_OK);
    return t;
}

static char *decode(const kiln_tokenizer *t, const int32_t *ids, size_t n)
{
    char *s = NULL;
    size_t len;
    if (kiln_tokenizer_decode(ctx, t, ids, n, &s, &len)) return NULL;
    return s;
}

/* The rendered text is ChatML; markers are single special ids; the mask
 * covers exactly the assistant content and its <|im_end|>. */
static void check_render(kiln_tokenizer *t, bool specials)
{
    kiln_chat_msg m[3] = {{.role = "system", .content = "be brief"},
                          {.role = "user", .content = "hello <|im_end|> world"},
                          {.role = "assistant", .content = "the answer"}};
    int32_t *ids;
    uint8_t *mask;
    size_t n;
    CHECK_EQ(kiln_chat_render(ctx, t, m, 3, false, &ids, &mask, &n), KILN_OK);
    char *s = decode(t, ids, n);
    CHECK_STREQ(s, "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello "
                   "<|im_end|> world<|im_end|>\n<|im_start|>assistant\nthe answer<|im_end|>\n");
    free(s);
    int st = kiln_tokenizer_special_id(t, "<|im_start|>"), en = kiln_tokenizer_special_id(t, "<|im_end|>");
    int n_st = 0, n_en = 0;
    for (size_t i = 0; i < n; i++) {
        n_st += ids[i] == st;
        n_en += ids[i] == en;
    }
    if (specials) {
        CHECK(st >= 0 && en >= 0);
        CHECK_EQ(n_st, 3);
        CHECK_EQ(n_en, 3); /* the user's literal "<|im_end|>" stays text */
        CHECK_EQ(kiln_chat_stop_id(t), en);
    } else {
        CHECK_EQ(st, -1);
        CHECK_EQ(kiln_chat_stop_id(t), kiln_tokenizer_eot(t));
    }
    /* masked tokens, in order, are the assistant content and its end */
    int32_t *sel = malloc(n * sizeof *sel);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (mask[i]) sel[k++] = ids[i];
    s = decode(t, sel, k);
    CHECK_STREQ(s, "the answer<|im_end|>");
    free(s);
    free(sel);
    free(ids);
    free(mask);
    /* generation prompt */
    CHECK_EQ(kiln_chat_render(ctx, t, m, 2, true, &ids, NULL, &n), KILN_OK);
    s = decode(t, ids, n);
    CHECK(s && strlen(s) > 22 && !strcmp(s + strlen(s) - 22, "<|im_start|>assistant\n"));
    free(s);
    free(ids);
    /* unknown role */
    kiln_chat_msg bad[1] = {{.role = "robot", .content = "x"}};
    CHECK_EQ(kiln_chat_render(ctx, t, bad, 1, false, &ids, NULL, &n), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "robot") != NULL);
}

static void test_chat_render_specials(void)
{
    kiln_tokenizer *t = trained();
    if (!t) return;
    check_render(t, true);
    /* encode_special recognises the markers; encode does not */
    const char *txt = "a<|im_start|>b<|endoftext|>";
    int32_t *ids;
    size_t n;
    CHECK_EQ(kiln_tokenizer_encode_special(ctx, t, txt, strlen(txt), &ids, &n), KILN_OK);
    CHECK_EQ(n, 4);
    if (n == 4) {
        CHECK_EQ(ids[0], 'a');
        CHECK_EQ(ids[1], kiln_tokenizer_special_id(t, "<|im_start|>"));
        CHECK_EQ(ids[2], 'b');
        CHECK_EQ(ids[3], kiln_tokenizer_eot(t));
    }
    free(ids);
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, txt, strlen(txt), &ids, &n), KILN_OK);
    for (size_t i = 0; i < n; i++) CHECK(ids[i] < kiln_tokenizer_eot(t));
    free(ids);
    kiln_tokenizer_free(t);
}

static void test_chat_render_bytes(void)
{
    kiln_tokenizer *t;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &t), KILN_OK);
    check_render(t, false);
    kiln_tokenizer_free(t);
}

static void test_sft_dataset(void)
{
    kiln_tokenizer *t;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &t), KILN_OK);
    const char *p = write_tmp("sft.jsonl",
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n"
        "\n"
        "{\"prompt\":\"2+2=\",\"completion\":\"4\"}\n");
    kiln_dataset *ds;
    CHECK_EQ(kiln_dataset_load(ctx, t, p, KILN_DATASET_SFT, NULL, &ds), KILN_OK);
    if (!ds) { kiln_tokenizer_free(t); return; }
    CHECK_EQ(kiln_dataset_count(ds), 2);
    kiln_example ex;
    kiln_dataset_get(ds, 0, &ex);
    CHECK_EQ(ex.line, 1);
    const char *want = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n";
    CHECK_EQ(ex.n, strlen(want));
    char *s = decode(t, ex.ids, ex.n);
    CHECK_STREQ(s, want);
    free(s);
    size_t off = strlen("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    for (size_t i = 0; i < ex.n; i++)
        CHECK_EQ(ex.mask[i], i >= off && i < off + 2 + strlen("<|im_end|>"));
    kiln_dataset_get(ds, 1, &ex);
    CHECK_EQ(ex.line, 3);
    CHECK_EQ(ex.n, 6); /* "2+2=" "4" eot */
    CHECK_EQ(ex.ids[5], 256);
    for (size_t i = 0; i < ex.n; i++) CHECK_EQ(ex.mask[i], i >= 4);
    kiln_dataset_stats st;
    kiln_dataset_get_stats(ds, &st);
    CHECK_EQ(st.lines, 2);
    CHECK_EQ(st.bad_lines, 0);
    CHECK_EQ(st.loss_tokens, 2 + 10 + 2);

    /* packing: T = 70 holds both (62 + 5 positions); targets follow the mask and stay inside
     * their document; pos restarts at 0 */
    kiln_packed *pk;
    CHECK_EQ(kiln_dataset_pack(ctx, ds, 70, &pk), KILN_OK);
    if (pk) {
        CHECK_EQ(pk->rows, 1);
        CHECK_EQ(pk->examples, 2);
        kiln_example e0, e1;
        kiln_dataset_get(ds, 0, &e0);
        kiln_dataset_get(ds, 1, &e1);
        size_t n0 = e0.n - 1, n1 = e1.n - 1;
        for (size_t j = 0; j < 70; j++) {
            if (j < n0) {
                CHECK_EQ(pk->tokens[j], e0.ids[j]);
                CHECK_EQ(pk->targets[j], e0.mask[j + 1] ? e0.ids[j + 1] : -1);
                CHECK_EQ(pk->pos[j], (int)j);
                CHECK_EQ(pk->doc[j], 0);
            } else if (j < n0 + n1) {
                CHECK_EQ(pk->tokens[j], e1.ids[j - n0]);
                CHECK_EQ(pk->targets[j], e1.mask[j - n0 + 1] ? e1.ids[j - n0 + 1] : -1);
                CHECK_EQ(pk->pos[j], (int)(j - n0));
                CHECK_EQ(pk->doc[j], 1);
            } else {
                CHECK_EQ(pk->targets[j], -1);
                CHECK_EQ(pk->doc[j], -1);
            }
        }
        kiln_packed_free(pk);
    }
    /* T = 40: the chat (63 tokens) is cut to 40 positions in its own row;
     * the short one shares nothing with it */
    CHECK_EQ(kiln_dataset_pack(ctx, ds, 40, &pk), KILN_OK);
    if (pk) {
        CHECK_EQ(pk->rows, 2);
        CHECK_EQ(pk->cut, 1);
        for (int j = 0; j < 40; j++) CHECK_EQ(pk->doc[j], 0);
        CHECK_EQ(pk->doc[40 + 5], -1);
        CHECK_EQ(pk->tokens[40], '2');
        kiln_packed_free(pk);
    }
    kiln_dataset_free(ds);

    /* truncation: max_len 40 cuts the chat before "yo" -> dropped */
    kiln_dataset_opts o = kiln_dataset_opts_default();
    o.max_len = 40;
    CHECK_EQ(kiln_dataset_load(ctx, t, p, KILN_DATASET_SFT, &o, &ds), KILN_OK);
    if (ds) {
        kiln_dataset_get_stats(ds, &st);
        CHECK_EQ(st.truncated, 1);
        CHECK_EQ(st.dropped, 1);
        CHECK_EQ(kiln_dataset_count(ds), 1);
        kiln_dataset_free(ds);
    }
    kiln_tokenizer_free(t);
}

/* Every malformed line is counted; the message names the first. */
static void test_bad_lines(void)
{
    kiln_tokenizer *t;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &t), KILN_OK);
    const char *p = write_tmp("bad.jsonl",
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"ok\"}]}\n"
        "{\"messages\":[{\"role\":\"user\"}]}\n"                              /* 2 no content */
        "{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}\n"           /* 3 role */
        "{\"messages\":[{\"role\":\"user\",\"content\":\"\"}]}\n"             /* 4 empty */
        "{\"messages\":[{\"role\":\"user\",\"content\":\"only user\"}]}\n"    /* 5 no assistant */
        "{\"messages\": 3}\n"                                                 /* 6 type */
        "{\"prompt\": \"p\"}\n"                                               /* 7 missing */
        "[1,2]\n"                                                             /* 8 not object */
        "{\"messages\": [\n");                                                /* 9 bad JSON */
    kiln_dataset *ds = NULL;
    CHECK_EQ(kiln_dataset_load(ctx, t, p, KILN_DATASET_SFT, NULL, &ds), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "8 malformed lines") != NULL);
    CHECK(strstr(kiln_errmsg(ctx), "line 2: messages[0]: field \"content\" is missing") != NULL);
    kiln_dataset_opts o = kiln_dataset_opts_default();
    o.skip_bad = true;
    CHECK_EQ(kiln_dataset_load(ctx, t, p, KILN_DATASET_SFT, &o, &ds), KILN_OK);
    if (ds) {
        kiln_dataset_stats st;
        kiln_dataset_get_stats(ds, &st);
        CHECK_EQ(st.bad_lines, 8);
        CHECK_EQ(kiln_dataset_count(ds), 1);
        kiln_dataset_free(ds);
    }
    kiln_tokenizer_free(t);
}

static void test_preference_and_prompts(void)
{
    kiln_tokenizer *t = trained();
    if (!t) return;
    const char *p = write_tmp("pref.jsonl",
        "{\"prompt\":\"Q: hi\",\"chosen\":\" hello\",\"rejected\":\" go away\"}\n"
        "{\"prompt\":[{\"role\":\"user\",\"content\":\"hi\"}],\"chosen\":[{\"role\":\"assistant\",\"content\":\"hello\"}],\"rejected\":\"no\"}\n");
    kiln_dataset *ds;
    CHECK_EQ(kiln_dataset_load(ctx, t, p, KILN_DATASET_PREFERENCE, NULL, &ds), KILN_OK);
    if (ds) {
        CHECK_EQ(kiln_dataset_count(ds), 2);
        kiln_example ex;
        kiln_dataset_get(ds, 0, &ex);
        char *s = decode(t, ex.ids, ex.n);
        CHECK_STREQ(s, "Q: hi");
        free(s);
        s = decode(t, ex.chosen, ex.n_chosen);
        CHECK_STREQ(s, " hello<|endoftext|>");
        free(s);
        s = decode(t, ex.rejected, ex.n_rejected);
        CHECK_STREQ(s, " go away<|endoftext|>");
        free(s);
        kiln_dataset_get(ds, 1, &ex);
        s = decode(t, ex.ids, ex.n);
        CHECK_STREQ(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        free(s);
        CHECK_EQ(ex.chosen[ex.n_chosen - 1], kiln_tokenizer_special_id(t, "<|im_end|>"));
        s = decode(t, ex.rejected, ex.n_rejected);
        CHECK_STREQ(s, "no<|im_end|>");
        free(s);
        kiln_dataset_free(ds);
    }
    p = write_tmp("prompts.jsonl", "{\"prompt\":\"2+2=\",\"answer\":4}\n{\"prompt\":\"x\",\"answer\":\"y z\"}\n");
    CHECK_EQ(kiln_dataset_load(ctx, t, p, KILN_DATASET_PROMPTS, NULL, &ds), KILN_OK);
    if (ds) {
        kiln_example ex;
        kiln_dataset_get(ds, 0, &ex);
        CHECK_STREQ(ex.answer, "4");
        kiln_dataset_get(ds, 1, &ex);
        CHECK_STREQ(ex.answer, "y z");
        kiln_dataset_free(ds);
    }
    p = write_tmp("prompts_bad.jsonl", "{\"prompt\":\"2+2=\"}\n");
    CHECK_EQ(kiln_dataset_load(ctx, t, p, KILN_DATASET_PROMPTS, NULL, &ds), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "line 1: field \"answer\" is missing") != NULL);
    kiln_tokenizer_free(t);
}

/* kiln_tokenize_corpus output reads back through the train layer. */
static void test_tokenize_corpus_roundtrip(void)
{
    kiln_tokenizer *t;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &t), KILN_OK);
    char in[4400], out[4400];
    snprintf(in, sizeof in, "%s", write_tmp("corpus.txt", "one\n%\ntwo two\n%\nthree\n"));
    snprintf(out, sizeof out, "%s/corpus_data", tmp);
    const char *inputs[1] = {in};
    kiln_tokenize_opts o = kiln_tokenize_opts_default();
    o.inputs = inputs;
    o.n_inputs = 1;
    o.out_dir = out;
    o.doc_separator = "%";
    o.shard_tokens = 7; /* force several shards */
    o.threads = 2;
    kiln_tokenize_stats st;
    CHECK_EQ(kiln_tokenize_corpus(ctx, t, &o, &st), KILN_OK);
    CHECK_EQ(st.docs, 3);
    CHECK_EQ(st.train_tokens, 3 + 4 + 8 + 6);
    CHECK_EQ(st.train_files, 3);
    kiln_data *d;
    CHECK_EQ(kiln_data_open(ctx, out, &d), KILN_OK);
    if (d) {
        CHECK_EQ(kiln_data_vocab_size(d), 257);
        CHECK_EQ(kiln_data_eot(d), 256);
        CHECK_EQ(kiln_data_tokens(d, KILN_SPLIT_TRAIN), 21);
        CHECK_STREQ(kiln_data_tokenizer(d), "bytes");
        kiln_data_close(d);
    }
    kiln_tokenizer_free(t);
}

int main(void)
{
    ctx = kiln_ctx_new();
    const char *t = getenv("KILN_TMP");
    snprintf(tmp, sizeof tmp, "%s", t ? t : "/tmp");
    RUN_TEST(test_chat_render_specials);
    RUN_TEST(test_chat_render_bytes);
    RUN_TEST(test_sft_dataset);
    RUN_TEST(test_bad_lines);
    RUN_TEST(test_preference_and_prompts);
    RUN_TEST(test_tokenize_corpus_roundtrip);
    kiln_ctx_free(ctx);
    return TEST_EXIT();
}
