/*
 * test_shard.c — token shards and the window loader: round trips in both
 * token widths, every bad-file case named in the error, data directories
 * with several shards, and the loader's epoch/shuffle contract (every
 * window once per epoch, order a function of (seed, epoch) only).
 */
#include "check.h"
#include "kiln.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[256];

static char *tpath(const char *name)
{
    static char buf[8][512];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}

static void write_shard(const char *path, int vocab, const int32_t *ids,
                        size_t n)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_shard_writer *w;
    CHECK_EQ(kiln_shard_writer_open(ctx, path, vocab, &w), KILN_OK);
    /* append in two pieces to exercise streaming */
    CHECK_EQ(kiln_shard_writer_append(ctx, w, ids, n / 3), KILN_OK);
    CHECK_EQ(kiln_shard_writer_append(ctx, w, ids + n / 3, n - n / 3), KILN_OK);
    CHECK_EQ(kiln_shard_writer_close(ctx, w), KILN_OK);
    kiln_ctx_free(ctx);
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    fwrite(p, 1, n, f);
    fclose(f);
}

static void *read_bytes(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *p = malloc(*n + 1);
    if (fread(p, 1, *n, f) != *n) *n = 0;
    fclose(f);
    return p;
}

static void test_roundtrip_u16_u32(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    int vocabs[2] = {257, 100000};
    for (int v = 0; v < 2; v++) {
        size_t n = 200003;
        int32_t *ids = malloc(n * sizeof *ids), *back = malloc(n * sizeof *ids);
        kiln_rng r;
        kiln_rng_seed(&r, 7);
        for (size_t i = 0; i < n; i++) ids[i] = (int32_t)kiln_rng_below(&r, (uint64_t)vocabs[v]);
        ids[0] = vocabs[v] - 1;
        write_shard(tpath("rt.bin"), vocabs[v], ids, n);
        size_t sz;
        free(read_bytes(tpath("rt.bin"), &sz));
        CHECK_EQ(sz, 32 + n * (vocabs[v] <= 65536 ? 2 : 4));
        kiln_shard *s;
        CHECK_EQ(kiln_shard_open(ctx, tpath("rt.bin"), &s), KILN_OK);
        CHECK_EQ(kiln_shard_count(s), n);
        CHECK_EQ(kiln_shard_vocab_size(s), vocabs[v]);
        kiln_shard_read(s, 0, n, back);
        CHECK(memcmp(ids, back, n * sizeof *ids) == 0);
        kiln_shard_read(s, 5, 3, back);
        CHECK_EQ(back[0], ids[5]);
        CHECK_EQ(back[2], ids[7]);
        kiln_shard_close(s);
        free(ids);
        free(back);
    }
    /* no temp files left behind */
    CHECK(access(tpath("rt.bin"), F_OK) == 0);
    kiln_ctx_free(ctx);
}

static void test_writer_rejects_bad_ids(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_shard_writer *w;
    CHECK_EQ(kiln_shard_writer_open(ctx, tpath("bad.bin"), 257, &w), KILN_OK);
    int32_t ids[3] = {1, 257, 2};
    CHECK_EQ(kiln_shard_writer_append(ctx, w, ids, 3), KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "257") && strstr(kiln_errmsg(ctx), "position 1"));
    kiln_shard_writer_abort(w);
    CHECK(access(tpath("bad.bin"), F_OK) != 0); /* never committed */
    kiln_ctx_free(ctx);
}

static void expect_open_error(const char *path, kiln_status want,
                              const char *needle)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_shard *s = NULL;
    kiln_status st = kiln_shard_open(ctx, path, &s);
    CHECK_MSG(st == want, "status %s for %s", kiln_status_name(st), needle);
    CHECK(s == NULL);
    CHECK_MSG(strstr(kiln_errmsg(ctx), path) != NULL, "msg: %s", kiln_errmsg(ctx));
    CHECK_MSG(strstr(kiln_errmsg(ctx), needle) != NULL, "msg: %s", kiln_errmsg(ctx));
    kiln_ctx_free(ctx);
}

static void test_bad_shards(void)
{
    int32_t ids[1000];
    for (int i = 0; i < 1000; i++) ids[i] = i % 257;
    write_shard(tpath("good.bin"), 257, ids, 1000);
    size_t n;
    unsigned char *b = read_bytes(tpath("good.bin"), &n);

    unsigned char *c = malloc(n);
    memcpy(c, b, n);
    c[0] = 'X';
    write_bytes(tpath("magic.bin"), c, n);
    expect_open_error(tpath("magic.bin"), KILN_ERR_FORMAT, "wrong magic");

    write_bytes(tpath("trunc.bin"), b, n - 7);
    expect_open_error(tpath("trunc.bin"), KILN_ERR_FORMAT, "truncated");

    write_bytes(tpath("hdr.bin"), b, 20);
    expect_open_error(tpath("hdr.bin"), KILN_ERR_FORMAT, "truncated");

    memcpy(c, b, n);
    c[100] ^= 1;
    write_bytes(tpath("flip.bin"), c, n);
    expect_open_error(tpath("flip.bin"), KILN_ERR_CHECKSUM, "corrupted");

    memcpy(c, b, n);
    c[8] = 9;
    write_bytes(tpath("ver.bin"), c, n);
    expect_open_error(tpath("ver.bin"), KILN_ERR_FORMAT, "version 9");
    c[8] = 2; /* the next version, as much as a far one */
    write_bytes(tpath("ver2.bin"), c, n);
    expect_open_error(tpath("ver2.bin"), KILN_ERR_FORMAT, "version 2");

    /* ids beyond the declared vocabulary, with a valid checksum */
    {
        int32_t big[4] = {1, 2, 300, 4};
        write_shard(tpath("vocab.bin"), 1000, big, 4);
        size_t vn;
        unsigned char *v = read_bytes(tpath("vocab.bin"), &vn);
        v[16] = 0x00; /* header vocab_size 1000 (e8 03) -> 256 (00 01) */
        v[17] = 0x01;
        write_bytes(tpath("vocab.bin"), v, vn);
        free(v);
        expect_open_error(tpath("vocab.bin"), KILN_ERR_FORMAT, "token id 300 at position 2");
    }

    write_bytes(tpath("empty.bin"), b, 0);
    expect_open_error(tpath("empty.bin"), KILN_ERR_FORMAT, "wrong magic");

    expect_open_error(tpath("nope.bin"), KILN_ERR_IO, "nope.bin");
    free(b);
    free(c);
}

/* A data directory with two train shards (the stream crosses a shard
 * boundary) and one val shard; token value = position in its split. */
static void make_datadir(const char *dir, int vocab, size_t n1, size_t n2,
                         size_t nv, int meta_vocab)
{
    char p[600];
    snprintf(p, sizeof p, "mkdir -p %s", dir);
    CHECK(system(p) == 0);
    int32_t *ids = malloc((n1 + n2 + nv) * sizeof *ids);
    for (size_t i = 0; i < n1 + n2 + nv; i++) ids[i] = (int32_t)(i % (size_t)vocab);
    snprintf(p, sizeof p, "%s/train_0000.bin", dir);
    write_shard(p, vocab, ids, n1);
    snprintf(p, sizeof p, "%s/train_0001.bin", dir);
    write_shard(p, vocab, ids + n1, n2);
    snprintf(p, sizeof p, "%s/val_0000.bin", dir);
    write_shard(p, vocab, ids, nv);
    free(ids);
    snprintf(p, sizeof p, "%s/meta.json", dir);
    FILE *f = fopen(p, "w");
    fprintf(f,
            "{\"format\":\"kiln-tokens\",\"version\":1,\"vocab_size\":%d,"
            "\"eot\":%d,\"tokenizer\":\"bytes\",\"train_files\":"
            "[\"train_0000.bin\",\"train_0001.bin\"],\"val_files\":"
            "[\"val_0000.bin\"],\"train_tokens\":%zu,\"val_tokens\":%zu}\n",
            meta_vocab, meta_vocab - 1, n1 + n2, nv);
    fclose(f);
}

static void test_data_dir_and_loader(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    const char *dir = tpath("data");
    make_datadir(dir, 60000, 1000, 1001, 300, 60000);
    kiln_data *d;
    CHECK_EQ(kiln_data_open(ctx, dir, &d), KILN_OK);
    if (!d) {
        fprintf(stderr, "%s\n", kiln_errmsg(ctx));
        kiln_ctx_free(ctx);
        return;
    }
    CHECK_EQ(kiln_data_vocab_size(d), 60000);
    CHECK_EQ(kiln_data_eot(d), 59999);
    CHECK_STREQ(kiln_data_tokenizer(d), "bytes");
    CHECK_EQ(kiln_data_tokens(d, KILN_SPLIT_TRAIN), 2001);
    CHECK_EQ(kiln_data_tokens(d, KILN_SPLIT_VAL), 300);

    int T = 16;
    kiln_loader *seq, *shuf, *shuf2, *other;
    CHECK_EQ(kiln_loader_new(ctx, d, KILN_SPLIT_TRAIN, T, false, 1, &seq), KILN_OK);
    CHECK_EQ(kiln_loader_new(ctx, d, KILN_SPLIT_TRAIN, T, true, 1, &shuf), KILN_OK);
    CHECK_EQ(kiln_loader_new(ctx, d, KILN_SPLIT_TRAIN, T, true, 1, &shuf2), KILN_OK);
    CHECK_EQ(kiln_loader_new(ctx, d, KILN_SPLIT_TRAIN, T, true, 2, &other), KILN_OK);
    int64_t nw = kiln_loader_num_windows(seq);
    CHECK_EQ(nw, 2000 / 16);
    int32_t in[16], tg[16];
    /* sequential: window w is tokens [wT, wT+T], across the shard seam */
    for (int64_t p = 0; p < 2 * nw; p++) {
        kiln_loader_get(seq, p, in, tg);
        int64_t w = p % nw;
        bool ok = true;
        for (int t = 0; t < T; t++)
            ok &= in[t] == (int32_t)(w * T + t) && tg[t] == (int32_t)(w * T + t + 1);
        CHECK_MSG(ok, "sequential window at %lld", (long long)p);
    }
    /* shuffled: a permutation per epoch, reproducible, epoch-dependent,
     * seed-dependent, and independent of the order positions are asked */
    char *seen = calloc((size_t)nw, 1);
    int differs_epoch = 0, differs_seed = 0, moved = 0;
    for (int64_t e = 0; e < 3; e++) {
        memset(seen, 0, (size_t)nw);
        for (int64_t i = 0; i < nw; i++) {
            int64_t w = kiln_loader_window_at(shuf, e * nw + i);
            CHECK(w >= 0 && w < nw);
            seen[w]++;
            moved += w != i;
            if (e == 1) differs_epoch += w != kiln_loader_window_at(shuf2, i);
            if (e == 0) differs_seed += w != kiln_loader_window_at(other, i);
        }
        int all = 1;
        for (int64_t i = 0; i < nw; i++) all &= seen[i] == 1;
        CHECK_MSG(all, "epoch %lld does not visit every window once", (long long)e);
    }
    CHECK(moved > nw);
    CHECK(differs_epoch > nw / 2);
    CHECK(differs_seed > nw / 2);
    /* random access (as after a resume) gives the same answer */
    for (int64_t p = 3 * nw - 1; p >= 0; p -= 7)
        CHECK_EQ(kiln_loader_window_at(shuf2, p), kiln_loader_window_at(shuf, p));
    kiln_loader_get(shuf, 5, in, tg);
    int64_t w5 = kiln_loader_window_at(shuf, 5);
    CHECK_EQ(in[0], w5 * T);
    CHECK_EQ(tg[T - 1], w5 * T + T);
    free(seen);

    /* too-long windows name T */
    kiln_loader *big;
    CHECK_EQ(kiln_loader_new(ctx, d, KILN_SPLIT_VAL, 400, false, 0, &big), KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "window of T = 400 + 1") != NULL);
    kiln_loader_free(seq);
    kiln_loader_free(shuf);
    kiln_loader_free(shuf2);
    kiln_loader_free(other);
    kiln_data_close(d);
    kiln_ctx_free(ctx);
}

static void test_bad_data_dirs(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_data *d = NULL;
    CHECK_EQ(kiln_data_open(ctx, tpath("missing"), &d), KILN_ERR_IO);
    CHECK(strstr(kiln_errmsg(ctx), "does not exist") != NULL);
    CHECK(strstr(kiln_errmsg(ctx), "kiln tokenize") != NULL);

    /* meta.json vocab disagrees with the shard header */
    make_datadir(tpath("vm"), 257, 100, 100, 50, 300);
    CHECK_EQ(kiln_data_open(ctx, tpath("vm"), &d), KILN_ERR_FORMAT);
    CHECK_MSG(strstr(kiln_errmsg(ctx), "vocab_size 257") != NULL, "%s", kiln_errmsg(ctx));

    /* a listed shard that is truncated names that shard */
    make_datadir(tpath("tr"), 257, 100, 100, 50, 257);
    CHECK(truncate(tpath("tr/train_0001.bin"), 100) == 0);
    CHECK_EQ(kiln_data_open(ctx, tpath("tr"), &d), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "train_0001.bin") != NULL);
    CHECK(strstr(kiln_errmsg(ctx), "truncated") != NULL);

    /* not a data dir */
    char cmd[600];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", tpath("plain"));
    CHECK(system(cmd) == 0);
    CHECK_EQ(kiln_data_open(ctx, tpath("plain"), &d), KILN_ERR_IO);
    CHECK(strstr(kiln_errmsg(ctx), "meta.json") != NULL);
    CHECK(d == NULL);
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(tmpdir, sizeof tmpdir, "%s/test_shard.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) return 1;
    RUN_TEST(test_roundtrip_u16_u32);
    RUN_TEST(test_writer_rejects_bad_ids);
    RUN_TEST(test_bad_shards);
    RUN_TEST(test_data_dir_and_loader);
    RUN_TEST(test_bad_data_dirs);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) return 1;
    return TEST_EXIT();
}
