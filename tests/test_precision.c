/*
 * test_precision.c — mixed precision at the model level: bf16 and fp16
 * forward/backward against fp32 on gpt2 and llama configs (close, but
 * really rounded), the weight copies following parameter updates, bit-for-
 * bit determinism, and convergence parity: the same small model trained
 * on real text (the fortunes corpus) with the same seed and data in fp32,
 * bf16 and fp16 (with the loss scaler) reaches validation losses within 2%
 * of each other.
 */
#include "check.h"
#include "kernels/x86/bf16.h"
#include "kernels/x86/bf16_ops.h"
#include "model/model.h"
#include "train/scaler.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

static void test_parse_and_resolve(void)
{
    CHECK_EQ(kiln_precision_parse("fp32"), KILN_PRECISION_FP32);
    CHECK_EQ(kiln_precision_parse("bf16"), KILN_PRECISION_BF16);
    CHECK_EQ(kiln_precision_parse("fp16"), KILN_PRECISION_FP16);
    CHECK_EQ(kiln_precision_parse("auto"), KILN_PRECISION_AUTO);
    CHECK_EQ(kiln_precision_parse("fp8"), -1);
    CHECK_EQ(kiln_precision_parse(NULL), -1);
    kiln_precision a = kiln_precision_resolve(KILN_PRECISION_AUTO);
    const mp_caps *c = mp_cpu_caps();
    CHECK_EQ(a, (c->amx_usable || c->avx512_bf16) ? KILN_PRECISION_BF16 : KILN_PRECISION_FP32);
    CHECK_EQ(kiln_precision_resolve(KILN_PRECISION_FP16), KILN_PRECISION_FP16);
    char buf[256];
    kiln_precision_describe(buf, sizeof buf);
    printf("  %s\n", buf);
    CHECK(strstr(buf, "auto by the table alone = ") != NULL);
}

static kiln_model *make_model(kiln_ctx *ctx, const kiln_config *cfg, kiln_precision p, int B,
                              int T)
{
    kiln_model *m = NULL;
    if (kiln_model_new(ctx, cfg, &m)) return NULL;
    kiln_model_init_random(m, 1234);
    if (kiln_model_prepare(ctx, m, B, T) || kiln_model_set_precision(ctx, m, p)) {
        kiln_model_free(m);
        return NULL;
    }
    return m;
}

/* Loss, logits copy and gradients of one batch. */
static double run_batch(kiln_ctx *ctx, kiln_model *m, const int32_t *tok, const int32_t *tgt,
                        int B, int T, float *logits_out, float scale)
{
    float *logits;
    int V = kiln_model_config(m)->vocab_size;
    if (kiln_model_forward(ctx, m, tok, B, T, &logits)) return NAN;
    if (logits_out) memcpy(logits_out, logits, sizeof(float) * (size_t)B * T * V);
    double ls = 0, ws = 0;
    kiln_model_zero_grad(m);
    if (kiln_cross_entropy(ctx, logits, tgt, NULL, (int64_t)B * T, V, scale / (float)(B * T),
                           logits, &ls, &ws))
        return NAN;
    if (kiln_model_backward(ctx, m, logits)) return NAN;
    return ls / ws;
}

static void compare_to_fp32(const kiln_config *cfg, const char *name)
{
    enum { B = 2, T = 48 };
    kiln_ctx *ctx = kiln_ctx_new();
    int V = cfg->vocab_size;
    int32_t tok[B * T], tgt[B * T];
    kiln_rng r;
    kiln_rng_seed(&r, 77);
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)kiln_rng_below(&r, (uint64_t)V);
    for (int i = 0; i < B * T; i++) tgt[i] = (int32_t)kiln_rng_below(&r, (uint64_t)V);
    float *l32 = malloc(sizeof(float) * B * T * V), *llo = malloc(sizeof(float) * B * T * V);
    kiln_model *m32 = make_model(ctx, cfg, KILN_PRECISION_FP32, B, T);
    CHECK(m32 != NULL);
    if (!m32) return;
    double loss32 = run_batch(ctx, m32, tok, tgt, B, T, l32, 1.f);
    size_t n = kiln_model_num_params(m32);
    const float *g32 = kiln_model_grads(m32);
    for (int p = KILN_PRECISION_BF16; p <= KILN_PRECISION_FP16; p++) {
        kiln_model *m = make_model(ctx, cfg, (kiln_precision)p, B, T);
        CHECK(m && kiln_model_precision(m) == (kiln_precision)p);
        if (!m) continue;
        double loss = run_batch(ctx, m, tok, tgt, B, T, llo, 1.f);
        double num = 0, den = 0;
        for (int i = 0; i < B * T * V; i++) {
            num += (double)(llo[i] - l32[i]) * (llo[i] - l32[i]);
            den += (double)l32[i] * l32[i];
        }
        double rel = sqrt(num / den);
        const float *g = kiln_model_grads(m);
        double dot = 0, na = 0, nb = 0;
        for (size_t i = 0; i < n; i++) {
            dot += (double)g[i] * g32[i];
            na += (double)g[i] * g[i];
            nb += (double)g32[i] * g32[i];
        }
        double cosv = dot / sqrt(na * nb);
        printf("  %s %s: loss %.6f (fp32 %.6f), logits rel. error %.2e, grad cosine %.6f\n",
               name, kiln_precision_name((kiln_precision)p), loss, loss32, rel, cosv);
        /* bf16 has 8 significant bits (2^-9 ~ 2e-3 per rounding), fp16 11. */
        double hi = p == KILN_PRECISION_BF16 ? 3e-2 : 5e-3;
        double lo = p == KILN_PRECISION_BF16 ? 3e-4 : 2e-5;
        CHECK_MSG(rel < hi && rel > lo, "%s %s logits rel. error %g not in (%g, %g)", name,
                  kiln_precision_name((kiln_precision)p), rel, lo, hi);
        CHECK_MSG(cosv > (p == KILN_PRECISION_BF16 ? 0.995 : 0.9995), "grad cosine %g", cosv);
        CHECK_NEAR(loss, loss32, p == KILN_PRECISION_BF16 ? 5e-3 : 1e-3);
        kiln_model_free(m);
    }
    kiln_model_free(m32);
    free(l32), free(llo);
    kiln_ctx_free(ctx);
}

static void test_gpt2_bf16_fp16_vs_fp32(void)
{
    kiln_config cfg = kiln_config_default();
    cfg.n_layer = 2;
    cfg.n_embd = 128;
    cfg.n_inner = 512;
    compare_to_fp32(&cfg, "gpt2");
}

static void test_llama_bf16_fp16_vs_fp32(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg;
    if (kiln_config_load(ctx, "configs/llama-tiny.json", &cfg)) {
        CHECK_MSG(0, "configs/llama-tiny.json: %s", kiln_errmsg(ctx));
        kiln_ctx_free(ctx);
        return;
    }
    cfg.n_layer = 2;
    compare_to_fp32(&cfg, "llama");
    kiln_ctx_free(ctx);
}

/* A 2-layer, 64-wide byte-level GPT-2. */
static kiln_config tiny_config(void)
{
    kiln_config cfg = kiln_config_default();
    cfg.n_layer = 2;
    cfg.n_embd = 64;
    cfg.n_inner = 256;
    return cfg;
}

/* After a parameter update the next forward uses the new weights (the
 * packed copies are refreshed), and repeated forwards are bit-identical. */
static void test_weights_follow_updates_and_determinism(void)
{
    enum { B = 2, T = 32 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = tiny_config();
    int V = cfg.vocab_size;
    int32_t tok[B * T], tgt[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = tgt[i] = (i * 7) % V;
    kiln_model *a = make_model(ctx, &cfg, KILN_PRECISION_BF16, B, T);
    kiln_model *b = make_model(ctx, &cfg, KILN_PRECISION_BF16, B, T);
    CHECK(a && b);
    if (!a || !b) return;
    float *la = malloc(sizeof(float) * B * T * V), *lb = malloc(sizeof(float) * B * T * V);
    run_batch(ctx, a, tok, tgt, B, T, la, 1.f);
    run_batch(ctx, a, tok, tgt, B, T, lb, 1.f);
    CHECK(memcmp(la, lb, sizeof(float) * B * T * V) == 0);
    /* update a's parameters; b gets the same values before its first use */
    float *pa = kiln_model_params_mut(a), *pb = kiln_model_params_mut(b);
    size_t n = kiln_model_num_params(a);
    for (size_t i = 0; i < n; i++) pa[i] = pb[i] = pa[i] * 1.25f + 0.001f;
    run_batch(ctx, a, tok, tgt, B, T, la, 1.f);
    run_batch(ctx, b, tok, tgt, B, T, lb, 1.f);
    CHECK(memcmp(la, lb, sizeof(float) * B * T * V) == 0);
    CHECK(memcmp(kiln_model_grads(a), kiln_model_grads(b), sizeof(float) * n) == 0);
    /* switching back to fp32 works and differs from bf16 */
    CHECK_EQ(kiln_model_set_precision(ctx, a, KILN_PRECISION_FP32), KILN_OK);
    CHECK_EQ(kiln_model_precision(a), KILN_PRECISION_FP32);
    run_batch(ctx, a, tok, tgt, B, T, la, 1.f);
    CHECK(memcmp(la, lb, sizeof(float) * B * T * V) != 0);
    free(la), free(lb);
    kiln_model_free(a);
    kiln_model_free(b);
    kiln_ctx_free(ctx);
}

/* kiln_model_adamw_step against the plain AdamW step on a twin model:
 * the same parameters, logits and gradients step after step; it has
 * written the packed copies itself (they hold the new weights before the
 * next forward); and a write through kiln_model_params afterwards is still
 * seen by the next forward. */
static void test_fused_update(void)
{
    enum { B = 2, T = 32 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = tiny_config();
    int V = cfg.vocab_size;
    int32_t tok[B * T], tgt[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = (i * 7) % V, tgt[i] = (i * 11 + 3) % V;
    kiln_model *a = make_model(ctx, &cfg, KILN_PRECISION_BF16, B, T);
    kiln_model *b = make_model(ctx, &cfg, KILN_PRECISION_BF16, B, T);
    kiln_adamw *oa = NULL, *ob = NULL;
    CHECK(a && b);
    if (!a || !b) return;
    CHECK_EQ(kiln_adamw_new_for_model(ctx, a, NULL, &oa), KILN_OK);
    CHECK_EQ(kiln_adamw_new_for_model(ctx, b, NULL, &ob), KILN_OK);
    size_t n = kiln_model_num_params(a), nl = (size_t)B * T * V;
    float *la = malloc(sizeof(float) * nl), *lb = malloc(sizeof(float) * nl);
    bool hw = mp_cpu_caps()->avx512_bf16;
    for (int step = 0; step < 3; step++) {
        run_batch(ctx, a, tok, tgt, B, T, la, 1.f);
        run_batch(ctx, b, tok, tgt, B, T, lb, 1.f);
        CHECK(memcmp(la, lb, sizeof(float) * nl) == 0);
        CHECK(memcmp(kiln_model_grads(a), kiln_model_grads(b), sizeof(float) * n) == 0);
        kiln_model_adamw_step(a, oa, kiln_model_grads(a), 1e-2f, 0.5f);
        kiln_adamw_step_scaled(ob, b->params, kiln_model_grads(b), 1e-2f, 0.5f);
        model_params_touched(b); /* written behind the model's back, as a test may */
        CHECK(memcmp(a->params, b->params, sizeof(float) * n) == 0);
        /* the copies of a weight already hold its new values (without the
         * strip path they would still hold the old ones) */
        const float *wq = a->w.layers[1].fc_w;
        mp_weight *e = mp_kern_weight_entry(a->gemm, wq, a->F, a->C, true);
        mp_weight ref;
        CHECK(e && mp_weight_init(&ref, KILN_DTYPE_BF16, a->F, a->C, true));
        if (!e) break;
        mp_weight_refresh(&ref, wq);
        size_t nf = mp_packb_elems(KILN_DTYPE_BF16, a->C, a->F), nb = mp_packb_elems(KILN_DTYPE_BF16, a->F, a->C);
        CHECK_EQ(mp_weight_strip_rows(e), hw ? 32 : 0);
        CHECK_EQ(memcmp(e->fwd, ref.fwd, nf * 2) == 0 && memcmp(e->bwd, ref.bwd, nb * 2) == 0, hw);
        mp_weight_free(&ref);
    }
    /* a write by other means right after the fused step */
    float *pa = kiln_model_params_mut(a), *pb = kiln_model_params_mut(b);
    for (size_t i = 0; i < n; i++) pa[i] = pb[i] = pa[i] * -0.75f;
    run_batch(ctx, a, tok, tgt, B, T, la, 1.f);
    run_batch(ctx, b, tok, tgt, B, T, lb, 1.f);
    CHECK(memcmp(la, lb, sizeof(float) * nl) == 0);
    free(la), free(lb);
    kiln_adamw_free(oa);
    kiln_adamw_free(ob);
    kiln_model_free(a);
    kiln_model_free(b);
    kiln_ctx_free(ctx);
}

/* The bf16 backward stores the weight matrices' gradients after a
 * kiln_model_zero_grad instead of adding them to zeros: the gradients read
 * right after zero_grad are zeros, a second backward without zero_grad
 * adds (exactly twice the first), and a zero_grad then backward gives the
 * first gradients again, bit for bit. */
static void test_lazy_zero_grad(void)
{
    enum { B = 2, T = 32 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = tiny_config();
    int V = cfg.vocab_size;
    int32_t tok[B * T], tgt[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = (i * 5) % V, tgt[i] = (i * 3 + 1) % V;
    kiln_model *m = make_model(ctx, &cfg, KILN_PRECISION_BF16, B, T);
    CHECK(m != NULL);
    if (!m) return;
    size_t n = kiln_model_num_params(m);
    float *g1 = malloc(sizeof(float) * n);
    run_batch(ctx, m, tok, tgt, B, T, NULL, 1.f); /* zero_grad, forward, backward */
    CHECK(m->act_mp && !m->grads_lazy);
    memcpy(g1, kiln_model_grads(m), sizeof(float) * n);
    kiln_model_zero_grad(m);
    CHECK(m->grads_lazy); /* the bf16 path: the matrices only marked */
    const float *g = kiln_model_grads(m);
    size_t nonzero = 0;
    for (size_t i = 0; i < n; i++) nonzero += g[i] != 0.0f;
    CHECK_EQ(nonzero, 0);
    /* accumulate two backwards of the same batch */
    run_batch(ctx, m, tok, tgt, B, T, NULL, 1.f);
    float *logits;
    CHECK_EQ(kiln_model_forward(ctx, m, tok, B, T, &logits), KILN_OK);
    double ls = 0, ws = 0;
    CHECK_EQ(kiln_cross_entropy(ctx, logits, tgt, NULL, (int64_t)B * T, V, 1.f / (float)(B * T),
                                logits, &ls, &ws), KILN_OK);
    CHECK_EQ(kiln_model_backward(ctx, m, logits), KILN_OK);
    g = kiln_model_grads(m);
    /* per tensor, to fp32 rounding (the second product accumulates onto
     * the first in its tiles, so the sums round differently): a backward
     * that stored instead of adding would be off by half */
    for (int ti = 0; ti < kiln_model_num_tensors(m); ti++) {
        const kiln_tensor_info *t = kiln_model_tensor(m, ti);
        double d2 = 0, w2 = 0;
        for (size_t i = t->offset; i < t->offset + t->numel; i++) {
            double want = 2.0 * g1[i];
            d2 += (g[i] - want) * (g[i] - want);
            w2 += want * want;
        }
        CHECK_MSG(d2 <= 1e-10 * w2 && w2 > 0, "%s: not twice one backward's gradient (rel %g)",
                  t->name, sqrt(d2 / w2));
    }
    run_batch(ctx, m, tok, tgt, B, T, NULL, 1.f);
    CHECK(memcmp(kiln_model_grads(m), g1, sizeof(float) * n) == 0);
    free(g1);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* kiln_model_backward_ce against kiln_cross_entropy + kiln_model_backward
 * on the same model and batch: the same gradients bit for bit (in bf16 the
 * loss's gradient never exists as fp32 rows there), the same loss to
 * double rounding, for gpt2 and llama in bf16 and fp32, with a mask and an
 * ignored target; and a bad target is an error naming it. */
static void test_backward_ce(void)
{
    enum { B = 2, T = 32 };
    kiln_ctx *ctx = kiln_ctx_new();
    for (int arch = 0; arch < 2; arch++)
        for (int p = 0; p < 2; p++) {
            kiln_config cfg = tiny_config();
            if (arch && kiln_config_load(ctx, "configs/llama-tiny.json", &cfg)) {
                CHECK_MSG(0, "configs/llama-tiny.json: %s", kiln_errmsg(ctx));
                continue;
            }
            if (arch) cfg.n_layer = 2;
            kiln_precision prec = p ? KILN_PRECISION_FP32 : KILN_PRECISION_BF16;
            int V = cfg.vocab_size;
            int32_t tok[B * T], tgt[B * T];
            float mask[B * T];
            for (int i = 0; i < B * T; i++) {
                tok[i] = (i * 7 + 1) % V;
                tgt[i] = i == 5 ? -1 : (i * 13 + 2) % V;
                mask[i] = i % 9 == 0 ? 0.0f : 1.0f + 0.25f * (float)(i % 3);
            }
            kiln_model *m = make_model(ctx, &cfg, prec, B, T);
            CHECK(m != NULL);
            if (!m) continue;
            size_t n = kiln_model_num_params(m);
            float *g1 = malloc(sizeof(float) * n), *logits;
            double l1 = 0, w1 = 0, l2 = 0, w2 = 0;
            CHECK_EQ(kiln_model_forward(ctx, m, tok, B, T, &logits), KILN_OK);
            kiln_model_zero_grad(m);
            CHECK_EQ(kiln_cross_entropy(ctx, logits, tgt, mask, B * T, V, 0.01f, logits, &l1, &w1),
                     KILN_OK);
            CHECK_EQ(kiln_model_backward(ctx, m, logits), KILN_OK);
            memcpy(g1, kiln_model_grads(m), sizeof(float) * n);
            CHECK_EQ(kiln_model_forward(ctx, m, tok, B, T, &logits), KILN_OK);
            kiln_model_zero_grad(m);
            CHECK_EQ(kiln_model_backward_ce(ctx, m, tgt, mask, 0.01f, &l2, &w2), KILN_OK);
            CHECK_MSG(memcmp(g1, kiln_model_grads(m), sizeof(float) * n) == 0,
                      "arch %d %s: gradients differ", arch, kiln_precision_name(prec));
            CHECK(w1 == w2 && w1 > 0);
            CHECK_MSG(fabs(l1 - l2) <= 1e-12 * fabs(l1), "arch %d %s: loss %.17g vs %.17g", arch,
                      kiln_precision_name(prec), l2, l1);
            tgt[7] = V; /* outside the vocabulary */
            CHECK_EQ(kiln_model_backward_ce(ctx, m, tgt, mask, 0.01f, &l2, &w2), KILN_ERR_RANGE);
            CHECK(strstr(kiln_errmsg(ctx), "row 7") != NULL);
            free(g1);
            kiln_model_free(m);
        }
    kiln_ctx_free(ctx);
}

/* The model in bf16 on each kernel this CPU has (AMX, AVX512_BF16, the
 * portable one): the same rounded inputs and fp32 accumulation, so the
 * first product agrees to fp32 summation-order noise and the logits to
 * what bf16 rounding makes of that noise over two layers (below). */
static void test_kernels_agree_in_model(void)
{
    enum { B = 2, T = 32 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = tiny_config();
    int V = cfg.vocab_size;
    int32_t tok[B * T], tgt[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = tgt[i] = (i * 11) % V;
    static const char *kern[3] = {"amx", "avx512", "ref"};
    mp_backend be[3] = {MP_BACKEND_AMX, MP_BACKEND_AVX512, MP_BACKEND_REF};
    float *l[3], *q[3];
    size_t nq = (size_t)B * T * 3 * cfg.n_embd;
    for (int i = 0; i < 3; i++) l[i] = malloc(sizeof(float) * B * T * V);
    for (int i = 0; i < 3; i++) q[i] = malloc(sizeof(float) * nq);
    /* Twice: with fp32 activations between the bf16 products and with
     * bf16 activations (the default). The kernels differ only by fp32
     * summation order (test_bf16: each product to ~1e-7 on the same
     * operands), but every product rounds its input to bf16 in either
     * mode, so a last-bit difference flips the rounding of a few inputs of
     * the next product, and that of a few more in the next layer: the
     * logits then differ by up to ~1e-3, by chance of where the ties fall
     * (measured 8.8e-4 for AVX512_BF16 vs portable with bf16 activations
     * in an -O1 build, 3e-8 at -O2; 4.1e-4 for AMX vs portable with fp32
     * activations in the portable clang build, where the MLP projection of
     * layer 0 alone gives 1.25e-7 on the same input but 4.9e-6 after the
     * 6e-8 difference in its GELU input), still far below a wrong kernel's
     * O(1). */
    for (int acts = 0; acts < 2; acts++) {
        int ran = 0;
        for (int i = 0; i < 3; i++) {
            if (!mp_backend_available(be[i])) continue;
            kiln_precision_opts po = {.precision = KILN_PRECISION_BF16,
                                      .bf16_kernel = (kiln_bf16_kernel)kiln_bf16_kernel_parse(kern[i]),
                                      .bf16_acts = acts};
            kiln_model *m = NULL;
            CHECK_EQ(kiln_model_new(ctx, &cfg, &m), KILN_OK);
            if (!m) continue;
            kiln_model_init_random(m, 1234);
            CHECK_EQ(kiln_model_set_precision_opts(ctx, m, &po), KILN_OK);
            CHECK_EQ(kiln_model_prepare(ctx, m, B, T), KILN_OK);
            kiln_precision_opts got = kiln_model_precision_opts(m);
            CHECK_EQ((int)got.bf16_kernel, (int)po.bf16_kernel);
            CHECK_EQ((int)got.bf16_acts, acts);
            run_batch(ctx, m, tok, tgt, B, T, l[i], 1.f);
            /* with fp32 activations: layer 0's qkv product, whose input
             * (the first norm of the embeddings) is the same bits on every
             * kernel, so nothing has been re-rounded differently yet */
            if (!acts) memcpy(q[i], m->a.qkvh, sizeof(float) * nq); /* f32 rows */
            kiln_model_free(m);
            ran |= 1 << i;
        }
        CHECK(ran & 4); /* the portable kernel always runs */
        for (int i = 0; i < 2; i++) {
            if (!(ran & (1 << i))) continue;
            double num = 0, den = 0;
            for (int j = 0; j < B * T * V; j++) {
                num += (double)(l[i][j] - l[2][j]) * (l[i][j] - l[2][j]);
                den += (double)l[2][j] * l[2][j];
            }
            printf("  bf16 %s vs ref kernel, %s activations: logits rel. difference %.2e\n",
                   kern[i], acts ? "bf16" : "fp32", sqrt(num / den));
            CHECK(sqrt(num / den) < 3e-3);
            if (acts) continue;
            num = den = 0;
            for (size_t j = 0; j < nq; j++) {
                num += (double)(q[i][j] - q[2][j]) * (q[i][j] - q[2][j]);
                den += (double)q[2][j] * q[2][j];
            }
            printf("  bf16 %s vs ref kernel: layer 0 qkv rel. difference %.2e\n", kern[i],
                   sqrt(num / den));
            CHECK(sqrt(num / den) < 1e-6);
        }
    }
    for (int i = 0; i < 3; i++) free(l[i]), free(q[i]);
    kiln_ctx_free(ctx);
}

/* The model through the ref backend (kernels/ref/backend_ref.c: its own
 * activation layout, plain row-major bf16, and its own weight handles):
 * pass.c knows no layout, so the bf16 path runs on it unchanged and
 * agrees with the cpu backend's portable kernel. Both round the same
 * operands to bf16 and differ by fp32 summation order only, so the
 * logits agree within test_kernels_agree_in_model's 3e-3 (last-bit
 * differences flipping a few bf16 roundings downstream), and the
 * gradients at least as closely as bf16 agrees with fp32 (cosine >
 * 0.995, compare_to_fp32). A layout leak (an arena carved with the cpu
 * backend's padded sizes, an offset into the packed layout) gives O(1). */
static void ref_backend_model(const kiln_config *cfg, const char *name)
{
    enum { B = 2, T = 24 };
    kiln_ctx *ctx = kiln_ctx_new();
    int V = cfg->vocab_size;
    int32_t tok[B * T], tgt[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = (i * 11) % V, tgt[i] = (i * 7 + 3) % V;
    float *l[2];
    float *g[2] = {NULL, NULL};
    double loss[2];
    size_t n = 0;
    for (int k = 0; k < 2; k++) {
        l[k] = malloc(sizeof(float) * B * T * V);
        kiln_precision_opts po = {.precision = KILN_PRECISION_BF16,
                                  .bf16_kernel = KILN_BF16_KERNEL_REF, .bf16_acts = true};
        kiln_model *m = NULL;
        CHECK_EQ(kiln_model_new(ctx, cfg, &m), KILN_OK);
        if (!m) return;
        kiln_model_init_random(m, 1234);
        CHECK_EQ(kiln_model_set_precision_opts(ctx, m, &po), KILN_OK);
        CHECK_EQ(kiln_model_prepare(ctx, m, B, T), KILN_OK);
        if (k == 1) {
            kern_backend *be = kern_backend_new("ref", KILN_DTYPE_BF16, KILN_BF16_KERNEL_AUTO);
            CHECK(be != NULL);
            if (!be) return;
            model_use_backend(m, be);
            CHECK_EQ(kiln_model_precision(m), KILN_PRECISION_BF16);
        }
        loss[k] = run_batch(ctx, m, tok, tgt, B, T, l[k], 1.f);
        CHECK(m->act_mp); /* the bf16-activation path ran */
        n = kiln_model_num_params(m);
        g[k] = malloc(n * sizeof(float));
        memcpy(g[k], kiln_model_grads(m), n * sizeof(float));
        kiln_model_free(m);
    }
    double num = 0, den = 0, dot = 0, na = 0, nb = 0;
    for (int j = 0; j < B * T * V; j++) {
        num += (double)(l[1][j] - l[0][j]) * (l[1][j] - l[0][j]);
        den += (double)l[0][j] * l[0][j];
    }
    for (size_t i = 0; i < n; i++) {
        dot += (double)g[0][i] * g[1][i];
        na += (double)g[0][i] * g[0][i];
        nb += (double)g[1][i] * g[1][i];
    }
    double rel = sqrt(num / den), cosv = dot / sqrt(na * nb);
    printf("  %s bf16, ref backend vs cpu backend (portable kernel): loss %.6f vs %.6f, logits "
           "rel. difference %.2e, grad cosine %.6f\n",
           name, loss[1], loss[0], rel, cosv);
    CHECK(rel < 3e-3);
    CHECK(cosv > 0.995);
    for (int k = 0; k < 2; k++) free(l[k]), free(g[k]);
    kiln_ctx_free(ctx);
}

static void test_ref_backend_in_model(void)
{
    kiln_config cfg = tiny_config();
    ref_backend_model(&cfg, "gpt2");
    kiln_ctx *ctx = kiln_ctx_new();
    if (kiln_config_load(ctx, "configs/llama-tiny.json", &cfg)) {
        CHECK_MSG(0, "configs/llama-tiny.json: %s", kiln_errmsg(ctx));
    } else {
        cfg.n_layer = 2;
        ref_backend_model(&cfg, "llama");
    }
    kiln_ctx_free(ctx);
}

/* ---- convergence parity on real text ---------------------------------- */

static int int_env(const char *name, int dflt)
{
    const char *e = getenv(name);
    return e && atoi(e) > 0 ? atoi(e) : dflt;
}

static unsigned char *load_corpus(size_t *len)
{
    const char *dir = "/usr/share/games/fortunes";
    static const char *files[] = {"fortunes", "computers", "science", "literature", "wisdom",
                                  "people", "humorists", "work"};
    size_t cap = 1 << 20, n = 0;
    unsigned char *buf = malloc(cap);
    for (size_t i = 0; i < sizeof files / sizeof files[0] && n < cap; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        n += fread(buf + n, 1, cap - n, f);
        fclose(f);
    }
    *len = n;
    return buf;
}

typedef struct adam {
    float *m, *v;
    int t;
} adam;

static void adam_step(adam *o, float *p, const float *g, size_t n, float lr)
{
    const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.0f;
    o->t++;
    float c1 = 1.f - powf(b1, (float)o->t), c2 = 1.f - powf(b2, (float)o->t);
    for (size_t i = 0; i < n; i++) {
        o->m[i] = b1 * o->m[i] + (1 - b1) * g[i];
        o->v[i] = b2 * o->v[i] + (1 - b2) * g[i] * g[i];
        p[i] -= lr * ((o->m[i] / c1) / (sqrtf(o->v[i] / c2) + eps) + wd * p[i]);
    }
}

/* Trains for `steps` steps in precision p and returns the validation loss. */
static double train_run(kiln_ctx *ctx, kiln_precision p, const unsigned char *text, size_t len,
                        int steps, uint64_t seed, int64_t *skipped)
{
    enum { B = 8, T = 32 };
    kiln_config cfg = kiln_config_default();
    cfg.n_layer = 2;
    cfg.n_embd = 96;
    cfg.n_head = cfg.n_kv_head = 3; /* head size 32: bf16 attention on AMX where it runs */
    cfg.n_inner = 384;
    cfg.n_ctx = T;
    kiln_model *m = make_model(ctx, &cfg, p, B, T);
    if (!m) return NAN;
    size_t n = kiln_model_num_params(m);
    adam o = {calloc(n, 4), calloc(n, 4), 0};
    kiln_scaler sc = scaler_default(p == KILN_PRECISION_FP16);
    size_t split = len * 9 / 10;
    kiln_rng r;
    kiln_rng_seed(&r, seed);
    int32_t tok[B * T], tgt[B * T];
    float *grads = model_grads_deferred(m); /* read after each backward, unscaled in place */
    for (int s = 0; s < steps; s++) {
        for (int b = 0; b < B; b++) {
            size_t off = kiln_rng_below(&r, split - T - 1);
            for (int t = 0; t < T; t++) {
                tok[b * T + t] = text[off + t];
                tgt[b * T + t] = text[off + t + 1];
            }
        }
        double loss = run_batch(ctx, m, tok, tgt, B, T, NULL, scaler_loss_scale(&sc));
        if (!isfinite(loss)) break;
        bool inf = scaler_unscale(&sc, grads, n);
        if (!scaler_update(&sc, inf)) continue; /* skipped step */
        double nn = 0;
        for (size_t i = 0; i < n; i++) nn += (double)grads[i] * grads[i];
        float clip = (float)fmin(1.0, 1.0 / (sqrt(nn) + 1e-12));
        if (clip < 1) for (size_t i = 0; i < n; i++) grads[i] *= clip;
        /* warmup, then cosine decay to 10%: the end point is compared,
         * and a decayed rate makes it a settled value rather than one
         * step's noise at full rate */
        float lr = s < 20 ? 3e-3f * (float)(s + 1) / 20.f
                          : 3e-4f + 2.7e-3f * 0.5f * (1.f + cosf(3.14159265f * (float)(s - 20) /
                                                                 (float)(steps - 20)));
        adam_step(&o, kiln_model_params_mut(m), grads, n, lr);
    }
    *skipped = sc.skipped_steps;
    /* validation: fixed windows of the held-out tail, same for every run */
    double tot = 0;
    int cnt = 0;
    for (size_t off = split; off + T + 1 <= len && cnt < 24; off += (len - split) / 25) {
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                size_t o2 = off + (size_t)b * 3 + t < len - 1 ? off + (size_t)b * 3 + t : len - 2;
                tok[b * T + t] = text[o2];
                tgt[b * T + t] = text[o2 + 1];
            }
        float *logits;
        double ls = 0, ws = 0;
        if (kiln_model_forward(ctx, m, tok, B, T, &logits) ||
            kiln_cross_entropy(ctx, logits, tgt, NULL, B * T, cfg.vocab_size, 1.f, NULL, &ls, &ws))
            break;
        tot += ls / ws;
        cnt++;
    }
    free(o.m), free(o.v);
    kiln_model_free(m);
    return cnt ? tot / cnt : NAN;
}

static void test_convergence_parity(void)
{
    size_t len;
    unsigned char *text = load_corpus(&len);
    if (len < 20000) {
        free(text);
        SKIP("the fortunes corpus (/usr/share/games/fortunes, Debian package fortunes) is missing");
    }
    kiln_ctx *ctx = kiln_ctx_new();
    /* One thread: `make test` runs next to other jobs on small machines,
     * where OpenMP barriers with more threads than free cores crawl. */
    kiln_set_threads(ctx, 1);
    /* Each precision trains from the same initial weights on three data
     * orders and the validation losses are averaged: one run's end point
     * moves by ~2% with any change of rounding (a different fp32 kernel
     * does it too), the mean of three by about half that. */
    int steps = int_env("KILN_PARITY_STEPS", 500), nseed = 3;
    static const uint64_t seeds[3] = {2024, 7, 99};
    int64_t sk[3] = {0};
    double v[3] = {0}, secs[3] = {0};
    static const kiln_precision precs[3] = {KILN_PRECISION_FP32, KILN_PRECISION_BF16,
                                            KILN_PRECISION_FP16};
    for (int q = 0; q < 3; q++) {
        double t0 = kiln_time_now();
        printf("  %-4s", kiln_precision_name(precs[q]));
        for (int i = 0; i < nseed; i++) {
            int64_t s1 = 0;
            double vl = train_run(ctx, precs[q], text, len, steps, seeds[i], &s1);
            printf(" %.4f", vl);
            v[q] += vl / nseed;
            sk[q] += s1;
        }
        secs[q] = kiln_time_now() - t0;
        printf("  mean %.4f (%+.2f%% vs fp32, %.1fs, %lld skipped)\n", v[q],
               100 * (v[q] - v[0]) / v[0], secs[q], (long long)sk[q]);
    }
    double v32 = v[0], vbf = v[1], vfp = v[2];
    printf("  %zu bytes of text, %d steps x %d data orders\n", len, steps, nseed);
    /* it learned something: bytes start at ln(257) = 5.55 */
    CHECK_MSG(v32 < 3.0, "fp32 val loss %g: did not train", v32);
    CHECK_MSG(fabs(vbf - v32) / v32 < 0.02, "bf16 val loss %g vs fp32 %g", vbf, v32);
    CHECK_MSG(fabs(vfp - v32) / v32 < 0.02, "fp16 val loss %g vs fp32 %g", vfp, v32);
    CHECK(sk[0] == 0 && sk[1] == 0);
    free(text);
    kiln_ctx_free(ctx);
}

/* The weight-copy contract (kiln.h, kiln_model_params): gradient
 * accumulation keeps the packed copies by itself (micro-steps with no
 * write in between pack nothing again) and gives the bits of the same
 * micro-steps with a write of unchanged values in between (which repacks);
 * kiln_model_set_tensor after a forward is seen by the next one; and a
 * pointer from kiln_model_params_mut written after a forward is too (no
 * stale weight whatever the caller does). */
static void test_weight_contract(void)
{
    enum { B = 2, T = 32, K = 3 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = tiny_config();
    int V = cfg.vocab_size;
    int32_t tok[K][B * T], tgt[K][B * T];
    for (int k = 0; k < K; k++)
        for (int i = 0; i < B * T; i++)
            tok[k][i] = (i * 5 + k * 11) % V, tgt[k][i] = (i * 3 + k * 7 + 1) % V;
    kiln_model *m = make_model(ctx, &cfg, KILN_PRECISION_BF16, B, T);
    CHECK(m != NULL);
    if (!m) return;
    size_t n = kiln_model_num_params(m);
    float *g[2] = {malloc(sizeof(float) * n), malloc(sizeof(float) * n)};
    uint64_t reps[2];
    float *logits;
    const kiln_tensor_info *ln = kiln_model_tensor(m, kiln_model_find_tensor(m, "transformer.ln_f.weight"));
    CHECK(ln != NULL);
    if (!ln) return;
    for (int touch = 0; touch < 2; touch++) {
        kiln_model_zero_grad(m);
        uint64_t r0 = mp_kern_repacks(m->gemm);
        for (int k = 0; k < K; k++) {
            double ls = 0, ws = 0;
            /* the same values written again: the model must assume a change */
            if (touch)
                CHECK_EQ(kiln_model_set_tensor(ctx, m, ln->name, kiln_model_params(m) + ln->offset,
                                               ln->numel), KILN_OK);
            CHECK_EQ(kiln_model_forward(ctx, m, tok[k], B, T, &logits), KILN_OK);
            CHECK_EQ(kiln_model_backward_ce(ctx, m, tgt[k], NULL, 1.0f / (B * T * K), &ls, &ws),
                     KILN_OK);
        }
        reps[touch] = mp_kern_repacks(m->gemm) - r0;
        memcpy(g[touch], kiln_model_grads(m), sizeof(float) * n);
    }
    printf("  %d micro-steps: %llu layouts packed written between, %llu untouched\n", K,
           (unsigned long long)reps[1], (unsigned long long)reps[0]);
    /* untouched: packed once, at the first micro-step (after the init) */
    CHECK(reps[0] > 0 && reps[1] == K * reps[0]);
    CHECK(!memcmp(g[0], g[1], sizeof(float) * n));
    /* kiln_model_set_tensor of the LM head (tied to the embedding here)
     * after a forward moves that vocabulary column at the next one */
    CHECK_EQ(kiln_model_forward(ctx, m, tok[0], B, T, &logits), KILN_OK);
    float before = logits[5];
    const kiln_tensor_info *wte = kiln_model_tensor(m, 0);
    float *row = malloc(wte->numel * sizeof(float));
    memcpy(row, kiln_model_params(m) + wte->offset, wte->numel * sizeof(float));
    for (int c = 0; c < cfg.n_embd; c++) row[5 * (size_t)cfg.n_embd + c] += 0.5f;
    CHECK_EQ(kiln_model_set_tensor(ctx, m, wte->name, row, wte->numel), KILN_OK);
    CHECK_EQ(kiln_model_set_tensor(ctx, m, wte->name, row, 3), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), wte->name) != NULL);
    CHECK_EQ(kiln_model_set_tensor(ctx, m, "no.such.tensor", row, 3), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "no.such.tensor") != NULL);
    CHECK_EQ(kiln_model_forward(ctx, m, tok[0], B, T, &logits), KILN_OK);
    float after = logits[5];
    CHECK_MSG(fabsf(after - before) > 1e-3f, "logit of token 5 %g -> %g", before, after);
    /* a kiln_model_params_mut pointer written after a forward, not before */
    float *p = kiln_model_params_mut(m);
    CHECK_EQ(kiln_model_forward(ctx, m, tok[0], B, T, &logits), KILN_OK);
    CHECK(logits[5] == after);
    size_t head = (size_t)(m->w.lm_head - m->params);
    for (int c = 0; c < cfg.n_embd; c++) p[head + 5 * (size_t)cfg.n_embd + c] -= 0.5f;
    CHECK_EQ(kiln_model_forward(ctx, m, tok[0], B, T, &logits), KILN_OK);
    CHECK_MSG(fabsf(logits[5] - after) > 1e-3f, "logit of token 5 %g -> %g", after, logits[5]);
    free(row);
    free(g[0]), free(g[1]);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

int main(void)
{
    RUN_TEST(test_parse_and_resolve);
    RUN_TEST(test_gpt2_bf16_fp16_vs_fp32);
    RUN_TEST(test_llama_bf16_fp16_vs_fp32);
    RUN_TEST(test_weights_follow_updates_and_determinism);
    RUN_TEST(test_fused_update);
    RUN_TEST(test_lazy_zero_grad);
    RUN_TEST(test_backward_ce);
    RUN_TEST(test_weight_contract);
    RUN_TEST(test_kernels_agree_in_model);
    RUN_TEST(test_ref_backend_in_model);
    RUN_TEST(test_convergence_parity);
    return TEST_EXIT();
}
