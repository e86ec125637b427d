/*
 * testdata.h — what the trainer tests share: paths under the test's
 * temporary directory (P), and a token data directory written through the
 * public shard writer (train and val shards plus meta.json, as `kiln
 * tokenize` writes them). Include after check.h and kiln.h; set test_tmp
 * before calling P.
 */
#ifndef KILN_TESTDATA_H
#define KILN_TESTDATA_H

#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>

static char test_tmp[256];

/* test_tmp/<printf format>; 16 results live at once (a ring of buffers). */
static char *P(const char *fmt, ...) __attribute__((format(printf, 1, 2), unused));
static char *P(const char *fmt, ...)
{
    static char buf[16][1024];
    static int k;
    char *p = buf[k++ % 16];
    int n = snprintf(p, 1024, "%s/", test_tmp);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p + n, (size_t)(1024 - n), fmt, ap);
    va_end(ap);
    return p;
}

/* Writes DIR/train_0000.bin (ntrain ids), DIR/val_0000.bin (nval ids;
 * none and no file when nval is 0) and DIR/meta.json for a vocabulary of
 * vocab ids with end-of-text eot and the bytes tokenizer. */
static void test_write_tokens(const char *dir, const int32_t *train, size_t ntrain,
                              const int32_t *val, size_t nval, int vocab, int eot)
    __attribute__((unused));
static void test_write_tokens(const char *dir, const int32_t *train, size_t ntrain,
                              const int32_t *val, size_t nval, int vocab, int eot)
{
    kiln_ctx *ctx = kiln_ctx_new();
    mkdir(dir, 0755);
    for (int split = 0; split < 2; split++) {
        const int32_t *ids = split ? val : train;
        size_t n = split ? nval : ntrain;
        if (n == 0) continue;
        char path[1200];
        snprintf(path, sizeof path, "%s/%s_0000.bin", dir, split ? "val" : "train");
        kiln_shard_writer *sw;
        CHECK_EQ(kiln_shard_writer_open(ctx, path, vocab, &sw), KILN_OK);
        CHECK_EQ(kiln_shard_writer_append(ctx, sw, ids, n), KILN_OK);
        CHECK_EQ(kiln_shard_writer_close(ctx, sw), KILN_OK);
    }
    char path[1200];
    snprintf(path, sizeof path, "%s/meta.json", dir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f) {
        fprintf(f,
                "{\"format\":\"kiln-tokens\",\"version\":1,\"vocab_size\":%d,"
                "\"eot\":%d,\"tokenizer\":\"bytes\",\"train_files\":"
                "[\"train_0000.bin\"],\"val_files\":[%s],"
                "\"train_tokens\":%zu,\"val_tokens\":%zu}\n",
                vocab, eot, nval ? "\"val_0000.bin\"" : "", ntrain, nval);
        fclose(f);
    }
    kiln_ctx_free(ctx);
}

#endif /* KILN_TESTDATA_H */
