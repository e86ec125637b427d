/*
 * test_step_alloc.c — a training step allocates no memory once it has run
 * once (issue #5: "no allocation inside the step"): the trainer's step
 * (zero_grad, forward, backward with the fused cross-entropy, the gradient
 * norm, AdamW with the bf16 weight copies refreshed) in every precision,
 * for gpt2 and llama. This program defines the malloc family itself, so
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

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>

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

/* One step as the trainer runs it (src/train/trainer.c, bench_precision). */
static bool step(kiln_ctx *ctx, kiln_model *m, kiln_adamw *opt, const int32_t *tok,
                 const int32_t *tgt, int B, int T, double *loss)
{
    float *logits;
    double ls = 0, ws = 0;
    kiln_model_zero_grad(m);
    if (kiln_model_forward(ctx, m, tok, B, T, &logits)) return false;
    if (kiln_model_backward_ce(ctx, m, tgt, NULL, 1.0f / (float)(B * T), &ls, &ws)) return false;
    float *g = kiln_model_grads(m);
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

static void test_gpt2_steps(void)
{
    if (!COUNTING) SKIP("AddressSanitizer build: its allocator cannot be wrapped");
    run("gpt2", KILN_PRECISION_FP32);
    run("gpt2", KILN_PRECISION_BF16);
    run("gpt2", KILN_PRECISION_FP16);
}

static void test_llama_steps(void)
{
    if (!COUNTING) SKIP("AddressSanitizer build: its allocator cannot be wrapped");
    run("llama", KILN_PRECISION_FP32);
    run("llama", KILN_PRECISION_BF16);
    run("llama", KILN_PRECISION_FP16);
}

int main(void)
{
    RUN_TEST(test_counter_counts);
    RUN_TEST(test_gpt2_steps);
    RUN_TEST(test_llama_steps);
    return TEST_EXIT();
}
