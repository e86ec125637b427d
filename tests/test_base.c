/*
 * test_base.c — the base layer: status table, errors, rng reproducibility,
 * arena, atomic writes, checksums, JSON field access.
 */
#include "base/base.h"
#include "check.h"

#include <unistd.h>

static char tmpdir[512];

static void test_status_table(void)
{
    CHECK_STREQ(kiln_status_str(KILN_OK), "success");
    CHECK_STREQ(kiln_status_name(KILN_ERR_IO), "ERR_IO");
    CHECK_STREQ(kiln_status_str((kiln_status)9999), "unknown status");
    kiln_ctx *ctx = kiln_ctx_new();
    CHECK(kiln_fail(ctx, KILN_ERR_FORMAT, "bad %s", "x") == KILN_ERR_FORMAT);
    CHECK_STREQ(kiln_errmsg(ctx), "bad x");
    kiln_ctx_free(ctx);
}

static void test_rng(void)
{
    kiln_rng a, b;
    kiln_rng_seed(&a, 42);
    kiln_rng_seed(&b, 42);
    for (int i = 0; i < 100; i++) CHECK(kiln_rng_u64(&a) == kiln_rng_u64(&b));
    /* Known answer: splitmix64(42) first output, stable across versions. */
    kiln_rng_seed(&a, 0);
    CHECK(a.s[0] == 0xe220a8397b1dcdafULL);
    double sum = 0, sq = 0;
    int n = 200000;
    for (int i = 0; i < n; i++) {
        float z = kiln_rng_normal(&a);
        sum += z;
        sq += (double)z * z;
    }
    CHECK_NEAR(sum / n, 0.0, 0.01);
    CHECK_NEAR(sq / n, 1.0, 0.02);
    int hist[7] = {0};
    for (int i = 0; i < 70000; i++) hist[kiln_rng_below(&a, 7)]++;
    for (int i = 0; i < 7; i++) CHECK(hist[i] > 9500 && hist[i] < 10500);
    for (int i = 0; i < 1000; i++) {
        float u = kiln_rng_uniform(&a);
        CHECK(u >= 0.0f && u < 1.0f);
    }
}

static void test_arena(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    arena a;
    CHECK(arena_init(ctx, &a, 1000) == KILN_OK);
    void *p = arena_alloc(&a, 10), *q = arena_alloc(&a, 100);
    CHECK(p && q && ((uintptr_t)p % 64) == 0 && ((uintptr_t)q % 64) == 0);
    CHECK((char *)q - (char *)p == 64);
    CHECK(arena_alloc(&a, 5000) == NULL);
    arena_reset(&a);
    CHECK(arena_alloc(&a, 10) == p);
    CHECK(a.peak == 64 + 128);
    arena_free(&a);
    kiln_ctx_free(ctx);
}

static void test_atomic_write(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    char *path = file_join(tmpdir, "a.bin");
    CHECK(file_write_atomic(ctx, path, "hello", 5) == KILN_OK);
    char *buf;
    size_t n;
    CHECK(file_read_all(ctx, path, &buf, &n) == KILN_OK);
    CHECK(n == 5 && memcmp(buf, "hello", 5) == 0);
    free(buf);
    /* An aborted writer leaves the old file untouched and no temp file. */
    file_writer w;
    CHECK(file_writer_open(ctx, &w, path) == KILN_OK);
    file_writer_write(&w, "garbage", 7);
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s", w.tmp_path);
    file_writer_abort(&w);
    CHECK(!file_exists(tmp));
    file_map m;
    CHECK(file_map_open(ctx, path, &m) == KILN_OK);
    CHECK(m.size == 5 && memcmp(m.data, "hello", 5) == 0);
    file_map_close(&m);
    CHECK(file_map_open(ctx, "/nonexistent/x", &m) == KILN_ERR_IO);
    CHECK(strstr(kiln_errmsg(ctx), "/nonexistent/x") != NULL);
    char *sub = file_join(tmpdir, "d1/d2/d3");
    CHECK(file_mkdirs(ctx, sub) == KILN_OK && file_is_dir(sub));
    free(sub);
    free(path);
    kiln_ctx_free(ctx);
}

static void test_crc32c(void)
{
    /* Known answers of CRC-32C (RFC 3720 appendix B.4). */
    CHECK(crc32c(0, "123456789", 9) == 0xE3069283u);
    unsigned char zeros[32] = {0};
    CHECK(crc32c(0, zeros, 32) == 0x8A9136AAu);
    /* Chaining equals one pass. */
    CHECK(crc32c(crc32c(0, "12345", 5), "6789", 4) == 0xE3069283u);
}

static void test_json(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    json_t *v;
    const char *txt = "{\"a\": 3, \"b\": 2.5, \"c\": \"x\", \"d\": true, \"e\": 4.0}";
    CHECK(js_load_buf(ctx, txt, strlen(txt), "t.json", &v) == KILN_OK);
    int64_t i = -1;
    double d = 0;
    const char *s = NULL;
    bool b = false;
    CHECK(js_get_int(ctx, v, "a", "t.json", true, &i) == KILN_OK && i == 3);
    CHECK(js_get_int(ctx, v, "e", "t.json", true, &i) == KILN_OK && i == 4);
    CHECK(js_get_int(ctx, v, "b", "t.json", true, &i) == KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "\"b\"") && strstr(kiln_errmsg(ctx), "t.json"));
    CHECK(js_get_double(ctx, v, "b", "t.json", true, &d) == KILN_OK && d == 2.5);
    CHECK(js_get_str(ctx, v, "c", "t.json", true, &s) == KILN_OK && !strcmp(s, "x"));
    CHECK(js_get_bool(ctx, v, "d", "t.json", true, &b) == KILN_OK && b);
    i = 7;
    CHECK(js_get_int(ctx, v, "zz", "t.json", false, &i) == KILN_OK && i == 7);
    CHECK(js_get_int(ctx, v, "zz", "t.json", true, &i) == KILN_ERR_FORMAT);
    json_decref(v);
    CHECK(js_load_buf(ctx, "{\"a\":", 5, "bad.json", &v) == KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "bad.json") != NULL);
    CHECK(js_load_buf(ctx, "{\"a\":1,\"a\":2}", 13, "dup.json", &v) == KILN_ERR_FORMAT);
    kiln_ctx_free(ctx);
}

static kiln_status record(kiln_ctx *ctx, void *ud, const char *path, int64_t size)
{
    (void)ctx;
    char *out = ud;
    const char *base = strrchr(path, '/');
    snprintf(out + strlen(out), 256 - strlen(out), "%s:%lld ", base ? base + 1 : path,
             (long long)size);
    return KILN_OK;
}

static void test_file_walk(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    char *root = file_join(tmpdir, "walk"), *sub = file_join(root, "b_dir");
    CHECK(file_mkdirs(ctx, sub) == KILN_OK);
    const char *names[] = {"c.txt", ".hidden", "bin.dat", "b_dir/a.txt", "a.txt"};
    const char *data[] = {"ccc", "h", "x\0y", "1", "aa"};
    size_t lens[] = {3, 1, 3, 1, 2};
    for (int i = 0; i < 5; i++) {
        char *p = file_join(root, names[i]);
        CHECK(file_write_atomic(ctx, p, data[i], lens[i]) == KILN_OK);
        free(p);
    }
    char seen[256] = "";
    CHECK(file_walk(ctx, root, "kiln_tokenize_opts.inputs", record, seen) == KILN_OK);
    /* sorted, recursive; hidden and binary files skipped */
    CHECK_STREQ(seen, "a.txt:2 a.txt:1 c.txt:3 ");
    /* a binary file named at the top level is taken as given */
    seen[0] = 0;
    char *bin = file_join(root, "bin.dat");
    CHECK(file_walk(ctx, bin, "kiln_tokenize_opts.inputs", record, seen) == KILN_OK);
    CHECK_STREQ(seen, "bin.dat:3 ");
    char *missing = file_join(root, "nope");
    CHECK(file_walk(ctx, missing, "kiln_tokenize_opts.inputs", record, seen) == KILN_ERR_IO);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_tokenize_opts.inputs '") && strstr(kiln_errmsg(ctx), "nope"));
    free(missing);
    free(bin);
    free(sub);
    free(root);
    kiln_ctx_free(ctx);
}

static void test_threads(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    int n = kiln_get_threads(ctx);
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (getenv("OMP_NUM_THREADS")) {
        CHECK_EQ(n, 0);
    } else {
        /* auto: at least one, at most one per CPU */
        CHECK(n >= 1 && n <= cpus);
    }
    kiln_set_threads(ctx, 3);
    CHECK_EQ(kiln_get_threads(ctx), 3);
    kiln_set_threads(ctx, 0);
    CHECK_EQ(kiln_get_threads(ctx), n);
    kiln_ctx_free(ctx);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "%s/base.XXXXXX",
             getenv("KILN_TMP") ? getenv("KILN_TMP") : "/tmp");
    if (!mkdtemp(tmpdir)) return 1;
    RUN_TEST(test_status_table);
    RUN_TEST(test_rng);
    RUN_TEST(test_arena);
    RUN_TEST(test_atomic_write);
    RUN_TEST(test_crc32c);
    RUN_TEST(test_json);
    RUN_TEST(test_threads);
    RUN_TEST(test_file_walk);
    return TEST_EXIT();
}
