/*
 * test_step_alloc.c — a training step allocates no memory once it has run
 * once (issue #5: "no allocation inside the step"), in every precision, for
 * gpt2 and llama, seen two ways:
 *   - the trainer's own loop (kiln_train): counting is switched on and off
 *     from its on_step callback, so everything the loop runs between two
 *     steps (the step itself, the loss scaler, clipping, the metrics line,
 *     progress) is inside the window; with the default objective, masked
 *     CE (micro-batches weighed first) and CE through the general path;
 *   - a loop written on the public API (zero_grad, forward, backward with
 *     the fused cross-entropy, the gradient norm, AdamW with the bf16 weight
 *     copies refreshed), as examples/train_loop.c does.
 * This program defines the malloc family itself, so
 * every allocation in the process is seen; one made by kiln's code (this
 * executable's text, where libkiln.a is linked) fails the test. Those the
 * OpenMP runtime and oneDNN make inside their own calls (libgomp's team of
 * a parallel region, oneDNN's fp32 GEMM scratch) are counted and printed.
 *
 * Under AddressSanitizer the allocator is ASan's and cannot be wrapped
 * here: the test says so and skips.
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define COUNTING 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define COUNTING 0
#endif
#endif
#ifndef COUNTING
#define COUNTING 1
#endif

static atomic_long g_own, g_lib; /* allocations while g_on: by kiln's code, by libraries */
static atomic_int g_on;

#if COUNTING
/* glibc's own entry points: the definitions below replace malloc & co. in
 * the whole process and forward to them. */
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);
void *memalign(size_t a, size_t n);

/* the linker's bounds of this executable's code */
extern char __executable_start[], etext[];

static void count_caller(const void *caller)
{
    if (!atomic_load_explicit(&g_on, memory_order_relaxed)) return;
    uintptr_t c = (uintptr_t)caller;
    if (c >= (uintptr_t)__executable_start && c < (uintptr_t)etext) atomic_fetch_add(&g_own, 1);
    else atomic_fetch_add(&g_lib, 1);
}
/* the wrappers are never inlined: the return address is their caller's */
#define count() count_caller(__builtin_return_address(0))
#define NOINL __attribute__((noinline))
NOINL void *malloc(size_t n)
{
    count();
    return __libc_malloc(n);
}
NOINL void *calloc(size_t a, size_t b)
{
    count();
    return __libc_calloc(a, b);
}
NOINL void *realloc(void *p, size_t n)
{
    count();
    return __libc_realloc(p, n);
}
NOINL void *aligned_alloc(size_t a, size_t n)
{
    count();
    return __libc_memalign(a, n);
}
NOINL void *memalign(size_t a, size_t n)
{
    count();
    return __libc_memalign(a, n);
}
NOINL int posix_memalign(void **p, size_t a, size_t n)
{
    count();
    *p = __libc_memalign(a, n);
    return *p ? 0 : ENOMEM;
}
void free(void *p) { __libc_free(p); }
#endif

/* One step as a hand-written loop on the public API runs it. */
static bool step(kiln_ctx *ctx, kiln_model *m, kiln_adamw *opt, const int32_t *tok,
                 const int32_t *tgt, int B, int T, double *loss)
{
    float *logits;
    double ls = 0, ws = 0;
    kiln_model_zero_grad(m);
    if (kiln_model_forward(ctx, m, tok, B, T, &logits)) return false;
    if (kiln_model_backward_ce(ctx, m, tgt, NULL, 1.0f / (float)(B * T), &ls, &ws)) return false;
    const float *g = kiln_model_grads(m);
    size_t n = kiln_model_num_params(m);
    double gn = kiln_l2_norm(g, n);
    kiln_model_adamw_step(m, opt, g, 1e-3f, kiln_clip_grad_coef(gn, 1.0));
    *loss = ls / ws;
    return true;
}

static void run(const char *arch, kiln_precision p)
{
    enum { B = 2, T = 64 };
    kiln_ctx *ctx = kiln_ctx_new();
    bool llama = !strcmp(arch, "llama");
    kiln_config cfg = kiln_config_default();
    cfg.arch = llama ? KILN_ARCH_LLAMA : KILN_ARCH_GPT2;
    cfg.n_layer = 2;
    cfg.n_embd = 128;
    cfg.n_head = 4; /* head size 32: the AMX attention where it runs */
    cfg.n_kv_head = llama ? 2 : 4;
    cfg.n_inner = llama ? 352 : 512;
    cfg.tie_embeddings = !llama;
    cfg.bias = !llama;
    cfg.rope_theta = 10000.0f;
    cfg.n_ctx = T;
    cfg.vocab_size = 6000; /* over 64 x 16384 parameters: kiln_l2_norm's blocked sum */
    kiln_model *m = NULL;
    kiln_adamw *opt = NULL;
    kiln_adamw_opts ao = kiln_adamw_opts_default();
    CHECK_EQ(kiln_model_new(ctx, &cfg, &m), KILN_OK);
    if (!m) {
        kiln_ctx_free(ctx);
        return;
    }
    kiln_model_init_random(m, 7);
    CHECK_EQ(kiln_model_set_precision(ctx, m, p), KILN_OK);
    CHECK_EQ(kiln_model_prepare(ctx, m, B, T), KILN_OK);
    CHECK_EQ(kiln_adamw_new_for_model(ctx, m, &ao, &opt), KILN_OK);
    int32_t tok[B * T], tgt[B * T];
    for (int i = 0; i < B * T; i++) {
        tok[i] = (i * 37 + 11) % cfg.vocab_size;
        tgt[i] = (i * 53 + 5) % cfg.vocab_size;
    }
    double l0 = 0, l1 = 0, l2 = 0;
    bool ok = step(ctx, m, opt, tok, tgt, B, T, &l0); /* the first step may allocate */
    atomic_store(&g_own, 0);
    atomic_store(&g_lib, 0);
    atomic_store(&g_on, 1);
    ok = ok && step(ctx, m, opt, tok, tgt, B, T, &l1);
    ok = ok && step(ctx, m, opt, tok, tgt, B, T, &l2);
    atomic_store(&g_on, 0);
    long n = atomic_load(&g_own), nl = atomic_load(&g_lib);
    CHECK_MSG(ok, "%s %s: step failed: %s", arch, kiln_precision_name(p), kiln_errmsg(ctx));
    /* the steps did train (the same batch: the loss goes down) */
    CHECK_MSG(isfinite(l0) && l1 < l0 && l2 < l1, "%s %s: loss %g %g %g", arch,
              kiln_precision_name(p), l0, l1, l2);
    CHECK_MSG(n == 0, "%s %s: kiln's code allocated %ld times in two steps after the first",
              arch, kiln_precision_name(p), n);
    printf("  %s %s, steps 2-3: %ld allocations by kiln, %ld inside OpenMP/oneDNN calls "
           "(loss %.4f -> %.4f)\n", arch, kiln_precision_name(p), n, nl, l0, l2);
    kiln_adamw_free(opt);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* The trainer's loop: counting runs from the callback after step 2 to the
 * one after step 4, so steps 3 and 4 and all the loop does between them are
 * inside it. */
typedef struct {
    int64_t on_at, off_at;
    int64_t steps_seen;
    long own, lib;
    double loss[8];
} loop_probe;

static bool on_step(void *user, const kiln_step_info *si)
{
    loop_probe *p = user;
    if (si->step == p->off_at) {
        atomic_store(&g_on, 0);
        p->own = atomic_load(&g_own);
        p->lib = atomic_load(&g_lib);
    }
    if (si->step >= 1 && si->step <= 8) p->loss[si->step - 1] = si->loss;
    p->steps_seen++;
    if (si->step == p->on_at) {
        atomic_store(&g_own, 0);
        atomic_store(&g_lib, 0);
        atomic_store(&g_on, 1);
    }
    return true;
}

static void write_data(const char *dir, int vocab)
{
    enum { N = 4096 };
    static int32_t ids[N];
    kiln_rng r;
    kiln_rng_seed(&r, 3);
    /* a short repeating phrase: learnable in a few steps */
    for (int i = 0; i < N; i++) ids[i] = (int32_t)((i % 13) * 457 % vocab);
    ids[kiln_rng_below(&r, N)] = (int32_t)kiln_rng_below(&r, (uint32_t)vocab);
    test_write_tokens(dir, ids, N, ids, N, vocab, 0);
}

/* obj: kiln_train_opts.objective (NULL: the default CE). */
static void run_trainer(const char *arch, kiln_precision p, const kiln_objective *obj)
{
    const char *tmp = getenv("KILN_TMP");
    char dir[400], cfgp[600], data[600], out[600];
    snprintf(dir, sizeof dir, "%s/step_alloc", tmp ? tmp : "/tmp");
    mkdir(dir, 0755);
    snprintf(cfgp, sizeof cfgp, "%s/%s.json", dir, arch);
    snprintf(data, sizeof data, "%s/data", dir);
    snprintf(out, sizeof out, "%s/run_%s_%s_%s", dir, arch, kiln_precision_name(p),
             obj ? obj->name : "default");
    kiln_ctx *ctx = kiln_ctx_new();
    bool llama = !strcmp(arch, "llama");
    kiln_config cfg = kiln_config_default();
    cfg.arch = llama ? KILN_ARCH_LLAMA : KILN_ARCH_GPT2;
    cfg.n_layer = 2;
    cfg.n_embd = 128;
    cfg.n_head = 4;
    cfg.n_kv_head = llama ? 2 : 4;
    cfg.n_inner = llama ? 352 : 512;
    cfg.tie_embeddings = !llama;
    cfg.bias = !llama;
    cfg.rope_theta = 10000.0f;
    cfg.n_ctx = 64;
    cfg.vocab_size = 6000; /* over 64 x 16384 parameters: kiln_l2_norm's blocked sum */
    CHECK_EQ(kiln_config_save(ctx, cfgp, &cfg), KILN_OK);
    if (access(data, F_OK) != 0) write_data(data, cfg.vocab_size);
    kiln_train_opts o = kiln_train_opts_default();
    o.config = cfgp;
    o.data = data;
    o.out = out;
    o.batch = 2;
    o.seq = 64;
    o.grad_accum = 2;  /* the micro-batch loop too */
    o.lr = 3e-3;
    o.warmup = 0;
    o.steps = 6;
    o.eval_every = 0;  /* an evaluation or a checkpoint may allocate: */
    o.save_every = 0;  /* neither runs inside the window */
    o.threads = 2;
    o.log_every = 1;   /* a progress line and a metrics line every step */
    o.progress = KILN_PROGRESS_LINES;
    o.precision = p;
    if (obj) o.objective = obj;
    loop_probe pr = {.on_at = 2, .off_at = 4};
    o.on_step = on_step;
    o.on_step_user = &pr;
    kiln_train_result res;
    kiln_status s = kiln_train(ctx, &o, &res);
    atomic_store(&g_on, 0);
    CHECK_MSG(s == KILN_OK, "%s %s: kiln_train: %s", arch, kiln_precision_name(p),
              kiln_errmsg(ctx));
    CHECK_EQ(pr.steps_seen, 6);
    /* it trained: the loss of step 6 is below step 1's */
    CHECK_MSG(isfinite(pr.loss[0]) && pr.loss[5] < pr.loss[0], "%s %s: loss %g -> %g", arch,
              kiln_precision_name(p), pr.loss[0], pr.loss[5]);
    CHECK_MSG(pr.own == 0, "%s %s: the trainer's loop allocated %ld times in kiln's code "
              "over steps 3-4", arch, kiln_precision_name(p), pr.own);
    printf("  kiln_train %s %s %s, steps 3-4 of the trainer's loop: %ld allocations by kiln, "
           "%ld inside library calls (OpenMP, oneDNN, jansson's metrics line)\n",
           arch, kiln_precision_name(p), obj ? obj->name : "ce", pr.own, pr.lib);
    kiln_ctx_free(ctx);
}

static void test_trainer_loop_gpt2(void)
{
    if (!COUNTING) SKIP("AddressSanitizer build: its allocator cannot be wrapped");
    run_trainer("gpt2", KILN_PRECISION_FP32, NULL);
    run_trainer("gpt2", KILN_PRECISION_BF16, NULL);
    run_trainer("gpt2", KILN_PRECISION_FP16, NULL);
}

static void test_trainer_loop_llama(void)
{
    if (!COUNTING) SKIP("AddressSanitizer build: its allocator cannot be wrapped");
    run_trainer("llama", KILN_PRECISION_FP32, NULL);
    run_trainer("llama", KILN_PRECISION_BF16, NULL);
    run_trainer("llama", KILN_PRECISION_FP16, NULL);
}

/* The objectives' paths: masked CE (its weigh: the step's micro-batches
 * drawn and weighed up front) and CE through the general path (dlogits in
 * place, kiln_model_backward). */
static void test_trainer_loop_objectives(void)
{
    if (!COUNTING) SKIP("AddressSanitizer build: its allocator cannot be wrapped");
    kiln_objective general = *kiln_objective_ce();
    general.name = "ce_general";
    general.fused_ce = false;
    for (int p = 0; p < 3; p++) {
        kiln_precision prec = p == 0 ? KILN_PRECISION_FP32
                            : p == 1 ? KILN_PRECISION_BF16 : KILN_PRECISION_FP16;
        run_trainer("gpt2", prec, kiln_objective_masked_ce());
        run_trainer("gpt2", prec, &general);
    }
}

static void test_counter_counts(void)
{
    if (!COUNTING) SKIP("AddressSanitizer build: its allocator cannot be wrapped");
    atomic_store(&g_own, 0);
    atomic_store(&g_lib, 0);
    atomic_store(&g_on, 1);
    void *volatile p = malloc(100);
    void *volatile q = aligned_alloc(64, 128);
    void *volatile r = strdup("libc's own call to malloc"); /* made inside a library */
    atomic_store(&g_on, 0);
    free(p);
    free(q);
    free(r);
    CHECK_EQ(atomic_load(&g_own), 2);
    CHECK_EQ(atomic_load(&g_lib), 1);
}

static void test_api_loop_gpt2(void)
{
    if (!COUNTING) SKIP("AddressSanitizer build: its allocator cannot be wrapped");
    run("gpt2", KILN_PRECISION_FP32);
    run("gpt2", KILN_PRECISION_BF16);
    run("gpt2", KILN_PRECISION_FP16);
}

static void test_api_loop_llama(void)
{
    if (!COUNTING) SKIP("AddressSanitizer build: its allocator cannot be wrapped");
    run("llama", KILN_PRECISION_FP32);
    run("llama", KILN_PRECISION_BF16);
    run("llama", KILN_PRECISION_FP16);
}

int main(void)
{
    RUN_TEST(test_counter_counts);
    RUN_TEST(test_trainer_loop_gpt2);
    RUN_TEST(test_trainer_loop_llama);
    RUN_TEST(test_trainer_loop_objectives);
    RUN_TEST(test_api_loop_gpt2);
    RUN_TEST(test_api_loop_llama);
    return TEST_EXIT();
}
