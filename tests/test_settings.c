/*
 * test_settings.c — the library's settings live in options structs, not in
 * the environment (docs/architecture.md): each one set through the API
 * takes effect, a value out of range is an error naming the struct field,
 * and the environment variables that used to steer the library (now mapped
 * only by the CLI) change nothing when set around a library call.
 *
 *   kiln_precision_opts.bf16_kernel  the kernel the products run on
 *   kiln_precision_opts.bf16_acts    bf16 activations change the logits
 *   kiln_adamw_opts.kernel           the loop a step runs on
 *   kiln_train_opts.loss_scale       the fp16 scaler's scale after a run
 *   kiln_train_opts.optim_kernel, .bf16_kernel   checked by kiln_train
 *   kiln_dist_opts (kiln_train_opts.dist)        reach the dist handle
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"
#include "train/dist.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>



/* The variables the library used to read; set to non-default values by
 * test_env_ignored around library calls that must not see them. */
static const char *const old_env[][2] = {
    {"KILN_BF16_ACTS", "0"},       {"KILN_BF16_KERNEL", "ref"},
    {"KILN_OPTIM_KERNEL", "portable"}, {"KILN_LOSS_SCALE", "2"},
    {"KILN_DIST_OVERLAP", "0"},    {"KILN_DIST_TIMEOUT", "soon"},
    {"KILN_DIST_BUCKET_MB", "-1"}, {"KILN_DIST_PROGRESS", "0"},
};
enum { N_OLD_ENV = sizeof old_env / sizeof old_env[0] };

static void set_old_env(bool on)
{
    for (int i = 0; i < N_OLD_ENV; i++) {
        if (on) setenv(old_env[i][0], old_env[i][1], 1);
        else unsetenv(old_env[i][0]);
    }
}

static kiln_config tiny_config(void)
{
    kiln_config c = kiln_config_default();
    c.n_layer = 2;
    c.n_embd = 64;
    c.n_head = 2;
    c.n_kv_head = 2;
    c.n_inner = 256;
    c.vocab_size = 257;
    c.n_ctx = 64;
    return c;
}

/* A byte-token data directory (train and val shards, meta.json). */
static void make_data(const char *dir)
{
    enum { N = 4000 };
    static int32_t ids[N];
    kiln_rng r;
    kiln_rng_seed(&r, 5);
    for (int i = 0; i < N; i++) ids[i] = 'a' + (int32_t)kiln_rng_below(&r, 8);
    test_write_tokens(dir, ids, N, ids, 400, 257, 256);
    FILE *f = fopen(P("config.json"), "w");
    fprintf(f, "{\"model_type\":\"gpt2\",\"n_layer\":1,\"n_embd\":32,\"n_head\":2,"
               "\"n_positions\":64,\"vocab_size\":257,\"layer_norm_epsilon\":1e-5,"
               "\"tie_word_embeddings\":true}\n");
    fclose(f);
}

static kiln_train_opts train_opts(const char *out)
{
    kiln_train_opts o = kiln_train_opts_default();
    o.config = P("config.json");
    o.data = P("data");
    o.out = out;
    o.batch = 2;
    o.seq = 16;
    o.steps = 3;
    o.warmup = 1;
    o.eval_every = 0;
    o.save_every = 0;
    o.threads = 1;
    o.progress = KILN_PROGRESS_NONE;
    return o;
}

/* A bf16 model with the given kernel and activation mode, prepared for
 * (B, T); its logits of one forward copied to out (B*T*V). */
static kiln_model *bf16_model(kiln_ctx *ctx, kiln_bf16_kernel k, bool acts, int B, int T,
                              const int32_t *tok, float *out)
{
    kiln_config cfg = tiny_config();
    kiln_model *m = NULL;
    if (kiln_model_new(ctx, &cfg, &m)) {
        fprintf(stderr, "  bf16_model: %s\n", kiln_errmsg(ctx));
        return NULL;
    }
    kiln_model_init_random(m, 42);
    kiln_precision_opts po = kiln_precision_opts_default();
    po.precision = KILN_PRECISION_BF16;
    po.bf16_kernel = k;
    po.bf16_acts = acts;
    float *logits;
    if (kiln_model_set_precision_opts(ctx, m, &po) || kiln_model_prepare(ctx, m, B, T) ||
        kiln_model_forward(ctx, m, tok, B, T, &logits)) {
        fprintf(stderr, "  bf16_model: %s\n", kiln_errmsg(ctx));
        kiln_model_free(m);
        return NULL;
    }
    memcpy(out, logits, sizeof(float) * (size_t)B * T * cfg.vocab_size);
    return m;
}

static void test_precision_opts(void)
{
    enum { B = 2, T = 16 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_precision_opts d = kiln_precision_opts_default();
    CHECK_EQ(d.precision, KILN_PRECISION_AUTO);
    CHECK_EQ(d.bf16_kernel, KILN_BF16_KERNEL_AUTO);
    CHECK(d.bf16_acts);
    for (int k = 0; k <= KILN_BF16_KERNEL_AMX; k++)
        CHECK_EQ(kiln_bf16_kernel_parse(kiln_bf16_kernel_name((kiln_bf16_kernel)k)), k);
    CHECK_EQ(kiln_bf16_kernel_parse("avx2"), -1);

    int V = tiny_config().vocab_size;
    int32_t tok[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = (i * 7) % V;
    float *a = malloc(sizeof(float) * B * T * V), *b = malloc(sizeof(float) * B * T * V);

    /* the kernel asked for is the one that runs (the portable one always
     * exists, so REF never falls back) */
    kiln_model *m = bf16_model(ctx, KILN_BF16_KERNEL_REF, true, B, T, tok, a);
    CHECK(m != NULL);
    if (m) {
        kiln_precision_opts got = kiln_model_precision_opts(m);
        CHECK_EQ(got.precision, KILN_PRECISION_BF16);
        CHECK_EQ(got.bf16_kernel, KILN_BF16_KERNEL_REF);
        CHECK(got.bf16_acts);
        /* AUTO resolves to a real kernel */
        kiln_precision_opts po = got;
        po.bf16_kernel = KILN_BF16_KERNEL_AUTO;
        CHECK_EQ(kiln_model_set_precision_opts(ctx, m, &po), KILN_OK);
        CHECK(kiln_model_precision_opts(m).bf16_kernel != KILN_BF16_KERNEL_AUTO);
        /* out of range: an error naming the field, the model unchanged */
        kiln_bf16_kernel before = kiln_model_precision_opts(m).bf16_kernel;
        po.bf16_kernel = (kiln_bf16_kernel)9;
        CHECK_EQ(kiln_model_set_precision_opts(ctx, m, &po), KILN_ERR_INVALID_ARG);
        CHECK(strstr(kiln_errmsg(ctx), "kiln_precision_opts.bf16_kernel") != NULL);
        CHECK_EQ(kiln_model_precision_opts(m).bf16_kernel, before);
        po.bf16_kernel = KILN_BF16_KERNEL_AUTO;
        po.precision = (kiln_precision)7;
        CHECK_EQ(kiln_model_set_precision_opts(ctx, m, &po), KILN_ERR_INVALID_ARG);
        CHECK(strstr(kiln_errmsg(ctx), "kiln_precision_opts.precision") != NULL);
        /* kiln_model_set_precision keeps the kernel choice */
        CHECK_EQ(kiln_model_set_precision(ctx, m, KILN_PRECISION_FP32), KILN_OK);
        CHECK_EQ(kiln_model_precision_opts(m).bf16_kernel, KILN_BF16_KERNEL_AUTO);
        CHECK_EQ(kiln_model_set_precision(ctx, m, KILN_PRECISION_BF16), KILN_OK);
        CHECK_EQ(kiln_model_precision_opts(m).bf16_kernel, before);
        kiln_model_free(m);
    }

    /* bf16 activations off: products on fp32 activations, other logits */
    m = bf16_model(ctx, KILN_BF16_KERNEL_REF, false, B, T, tok, b);
    CHECK(m != NULL);
    if (m) {
        CHECK(!kiln_model_precision_opts(m).bf16_acts);
        double diff = 0;
        for (int i = 0; i < B * T * V; i++) diff = fmax(diff, fabs((double)a[i] - b[i]));
        printf("  bf16 activations on vs off: largest logit difference %.3g\n", diff);
        CHECK(diff > 0);      /* the setting took effect */
        CHECK(diff < 0.1);    /* and both compute the same model */
        kiln_model_free(m);
    }
    free(a), free(b);
    kiln_ctx_free(ctx);
}

static void test_adamw_kernel(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_adamw_opts ao = kiln_adamw_opts_default();
    CHECK_EQ(ao.kernel, KILN_OPTIM_KERNEL_AUTO);
    CHECK_EQ(kiln_optim_kernel_parse("portable"), KILN_OPTIM_KERNEL_PORTABLE);
    CHECK_EQ(kiln_optim_kernel_parse("auto"), KILN_OPTIM_KERNEL_AUTO);
    CHECK_EQ(kiln_optim_kernel_parse("sse"), -1);
    kiln_adamw *o = NULL;
    CHECK_EQ(kiln_adamw_new(ctx, 100, &ao, &o), KILN_OK);
    if (o) {
#if defined(__x86_64__)
        const char *want = __builtin_cpu_supports("avx512f") ? "avx512" : "portable";
        CHECK_STREQ(kiln_adamw_kernel_name(o), want);
#endif
        kiln_adamw_free(o);
    }
    ao.kernel = KILN_OPTIM_KERNEL_PORTABLE;
    CHECK_EQ(kiln_adamw_new(ctx, 100, &ao, &o), KILN_OK);
    if (o) CHECK_STREQ(kiln_adamw_kernel_name(o), "portable");
    kiln_adamw_free(o);
    ao.kernel = (kiln_optim_kernel)5;
    o = NULL;
    CHECK_EQ(kiln_adamw_new(ctx, 100, &ao, &o), KILN_ERR_INVALID_ARG);
    CHECK(o == NULL);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_adamw_opts.kernel") != NULL);
    kiln_ctx_free(ctx);
}

static void expect_train_error(kiln_train_opts *o, const char *field)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_result res;
    CHECK_EQ(kiln_train(ctx, o, &res), KILN_ERR_INVALID_ARG);
    CHECK_MSG(strstr(kiln_errmsg(ctx), field) != NULL, "'%s' does not name %s",
              kiln_errmsg(ctx), field);
    kiln_ctx_free(ctx);
}

static void test_train_opts(void)
{
    kiln_train_opts d = kiln_train_opts_default();
    CHECK_EQ(d.bf16_kernel, KILN_BF16_KERNEL_AUTO);
    CHECK(d.bf16_acts);
    CHECK_NEAR(d.loss_scale, 0, 0);
    CHECK_EQ(d.optim_kernel, KILN_OPTIM_KERNEL_AUTO);
    CHECK_NEAR(d.dist.timeout_s, 300, 0);
    CHECK_NEAR(d.dist.bucket_mb, 25, 0);
    CHECK(d.dist.overlap && d.dist.progress_table);

    kiln_ctx *ctx = kiln_ctx_new();
    kiln_train_result res;
    /* fp16: the scaler starts from loss_scale (no overflow in 3 steps, no
     * growth before 2000: it ends there), else from 65536 */
    kiln_train_opts o = train_opts(P("run_ls"));
    o.precision = KILN_PRECISION_FP16;
    o.loss_scale = 1024;
    o.optim_kernel = KILN_OPTIM_KERNEL_PORTABLE;
    o.bf16_kernel = KILN_BF16_KERNEL_REF;
    o.dist.overlap = false;
    CHECK_EQ(kiln_train(ctx, &o, &res), KILN_OK);
    CHECK_NEAR(res.loss_scale, 1024, 0);
    CHECK_EQ(res.skipped_steps, 0);
    o = train_opts(P("run_ls_default"));
    o.precision = KILN_PRECISION_FP16;
    CHECK_EQ(kiln_train(ctx, &o, &res), KILN_OK);
    CHECK_NEAR(res.loss_scale, 65536, 0);
    /* ignored outside fp16 */
    o = train_opts(P("run_ls_fp32"));
    o.precision = KILN_PRECISION_FP32;
    o.loss_scale = 1024;
    CHECK_EQ(kiln_train(ctx, &o, &res), KILN_OK);
    CHECK_NEAR(res.loss_scale, 1, 0);
    kiln_ctx_free(ctx);

    /* out of range: errors naming the field */
    o = train_opts(P("run_bad"));
    o.loss_scale = -3;
    expect_train_error(&o, "kiln_train_opts.loss_scale");
    o = train_opts(P("run_bad"));
    o.optim_kernel = (kiln_optim_kernel)4;
    expect_train_error(&o, "kiln_train_opts.optim_kernel");
    o = train_opts(P("run_bad"));
    o.bf16_kernel = (kiln_bf16_kernel)11;
    expect_train_error(&o, "kiln_train_opts.bf16_kernel");
    o = train_opts(P("run_bad"));
    o.dist.timeout_s = 0;
    expect_train_error(&o, "kiln_dist_opts.timeout_s");
    o = train_opts(P("run_bad"));
    o.dist.bucket_mb = -1;
    expect_train_error(&o, "kiln_dist_opts.bucket_mb");
}

static void test_dist_opts(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_dist_opts o = kiln_dist_opts_default();
    o.timeout_s = 42;
    o.overlap = false;
    dist *d = NULL;
    CHECK_EQ(dist_init(ctx, &d, &o), KILN_OK);
    if (d) {
        CHECK_NEAR(dist_timeout(d), 42, 0);
        CHECK(!dist_overlap(d));
        dist_free(d);
    }
    kiln_ctx_free(ctx);
}

/* The old variables set to values the library would have obeyed or
 * rejected: the library's results are the defaults' all the same. */
static void test_env_ignored(void)
{
    enum { B = 1, T = 8 };
    kiln_ctx *ctx = kiln_ctx_new();
    set_old_env(true);
    int V = tiny_config().vocab_size;
    int32_t tok[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = i;
    float *a = malloc(sizeof(float) * B * T * V);
    kiln_model *m = bf16_model(ctx, KILN_BF16_KERNEL_AUTO, true, B, T, tok, a);
    CHECK(m != NULL);
    if (m) {
        kiln_precision_opts got = kiln_model_precision_opts(m);
        CHECK(got.bf16_acts);
        kiln_model_free(m);
    }
    kiln_adamw *o = NULL;
    CHECK_EQ(kiln_adamw_new(ctx, 10, NULL, &o), KILN_OK);
#if defined(__x86_64__)
    if (o && __builtin_cpu_supports("avx512f")) CHECK_STREQ(kiln_adamw_kernel_name(o), "avx512");
#endif
    kiln_adamw_free(o);
    dist *d = NULL;
    CHECK_EQ(dist_init(ctx, &d, NULL), KILN_OK); /* KILN_DIST_TIMEOUT=soon ignored */
    if (d) {
        CHECK(dist_overlap(d));
        CHECK_NEAR(dist_timeout(d), 300, 0);
        dist_free(d);
    }
    kiln_train_opts to = train_opts(P("run_env"));
    to.precision = KILN_PRECISION_FP16;
    kiln_train_result res;
    CHECK_EQ(kiln_train(ctx, &to, &res), KILN_OK);
    CHECK_NEAR(res.loss_scale, 65536, 0); /* not KILN_LOSS_SCALE=2 */
    /* the CLI's KILN_PRECISION_PROBE and XDG_CACHE_HOME: a ctx made with
     * them set probes, and caches nowhere (kiln_set_cache_dir is the setting) */
    setenv("KILN_PRECISION_PROBE", "0", 1);
    setenv("XDG_CACHE_HOME", P("xdg"), 1);
    kiln_ctx *c2 = kiln_ctx_new();
    CHECK(kiln_get_precision_probe(c2));
    CHECK(kiln_get_cache_dir(c2) == NULL);
    kiln_set_log_level(c2, KILN_LOG_WARN);
    kiln_precision_auto_info ai;
    kiln_precision_auto(c2, KILN_BF16_KERNEL_AUTO, &ai);
    struct stat st;
    CHECK(stat(P("xdg"), &st) != 0);
    kiln_ctx_free(c2);
    unsetenv("KILN_PRECISION_PROBE");
    unsetenv("XDG_CACHE_HOME");
    set_old_env(false);
    free(a);
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_settings.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    set_old_env(false);
    make_data(P("data"));
    RUN_TEST(test_precision_opts);
    RUN_TEST(test_adamw_kernel);
    RUN_TEST(test_train_opts);
    RUN_TEST(test_dist_opts);
    RUN_TEST(test_env_ignored);
    return TEST_EXIT();
}
