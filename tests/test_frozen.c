/*
 * test_frozen.c — the parameter registry and frozen parameters:
 * kiln_model_set_trainable's patterns (exact names, globs, the error when
 * nothing matches), registry fields (dtype, trainable, group), frozen
 * tensors' gradients not computed (zeros where the unfrozen twin has
 * values) while the trainable ones keep their bits, frozen weights
 * bit-for-bit unchanged by N AdamW steps with weight decay in fp32 and
 * bf16 while the trainable ones follow a hand-written AdamW over the
 * unfrozen twin's gradients, the optimizer state shrinking by the frozen
 * count, per-group learning-rate multipliers against a hand-computed step,
 * optimizer.safetensors refusing another trainable set by tensor name, and
 * the trainer's freeze option resuming exactly.
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static kiln_config gpt2_cfg(void)
{
    kiln_config c = kiln_config_default();
    c.n_layer = 2;
    c.n_embd = 64;
    c.n_head = 4;
    c.n_kv_head = 4;
    c.n_inner = 256;
    c.n_ctx = 64;
    return c;
}

static kiln_config llama_cfg(void)
{
    kiln_config c = gpt2_cfg();
    c.arch = KILN_ARCH_LLAMA;
    c.n_kv_head = 2;
    c.n_inner = 128;
    c.bias = false;
    c.tie_embeddings = false;
    c.rope_theta = 10000.0f;
    c.norm_eps = 1e-5f;
    return c;
}

static kiln_model *new_model(kiln_ctx *ctx, const kiln_config *c, kiln_precision p, int B, int T)
{
    kiln_model *m = NULL;
    if (kiln_model_new(ctx, c, &m)) return NULL;
    kiln_model_init_random(m, 4242);
    if (kiln_model_prepare(ctx, m, B, T) || kiln_model_set_precision(ctx, m, p)) {
        kiln_model_free(m);
        return NULL;
    }
    return m;
}

static size_t frozen_count(const kiln_model *m)
{
    return kiln_model_num_params(m) - kiln_model_num_trainable(m);
}

static void test_patterns(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = gpt2_cfg();
    kiln_model *m = NULL;
    CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
    if (!m) return;
    size_t n = kiln_model_num_params(m);
    CHECK_EQ(kiln_model_num_trainable(m), n);
    /* registry fields */
    const kiln_tensor_info *t = kiln_model_tensor(m, kiln_model_find_tensor(m, "transformer.h.1.mlp.c_fc.weight"));
    CHECK(t && t->dtype == KILN_DTYPE_F32 && t->trainable && t->decay);
    CHECK_STREQ(t ? t->group : NULL, "decay");
    const kiln_tensor_info *b = kiln_model_tensor(m, kiln_model_find_tensor(m, "transformer.h.1.mlp.c_fc.bias"));
    CHECK_STREQ(b ? b->group : NULL, "no_decay");
    CHECK_STREQ(kiln_model_tensor(m, 0)->group, "no_decay"); /* wte */
    int k = -1;
    /* an exact name */
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "transformer.wpe.weight", false, &k), KILN_OK);
    CHECK_EQ(k, 1);
    CHECK_EQ(frozen_count(m), (size_t)c.n_ctx * c.n_embd);
    CHECK(!kiln_model_tensor(m, 1)->trainable);
    /* a glob across layers: c_attn and c_proj, weight and bias, 2 layers */
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "*.attn.*", false, &k), KILN_OK);
    CHECK_EQ(k, 8);
    size_t C = (size_t)c.n_embd;
    size_t attn = 2 * (C * 3 * C + 3 * C + C * C + C);
    CHECK_EQ(frozen_count(m), (size_t)c.n_ctx * C + attn);
    /* a layer prefix: 12 tensors, 4 of them already frozen */
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "transformer.h.0.*", false, &k), KILN_OK);
    CHECK_EQ(k, 12);
    /* a pattern that matches nothing: an error naming it, m unchanged */
    size_t before = kiln_model_num_trainable(m);
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "transformer.h.9.*", false, &k), KILN_ERR_INVALID_ARG);
    CHECK_EQ(k, 0);
    CHECK(strstr(kiln_errmsg(ctx), "transformer.h.9.*") != NULL);
    CHECK_EQ(kiln_model_num_trainable(m), before);
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "", false, NULL), KILN_ERR_INVALID_ARG);
    /* '?' and sets */
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "transformer.h.[01].ln_?.bias", true, &k), KILN_OK);
    CHECK_EQ(k, 4);
    /* unfreeze everything */
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "*", true, &k), KILN_OK);
    CHECK_EQ(k, kiln_model_num_tensors(m));
    CHECK_EQ(kiln_model_num_trainable(m), n);
    /* groups */
    CHECK_EQ(kiln_model_set_group(ctx, m, "transformer.w?e.weight", "embed", &k), KILN_OK);
    CHECK_EQ(k, 2);
    CHECK_STREQ(kiln_model_tensor(m, 1)->group, "embed");
    CHECK(!kiln_model_tensor(m, 1)->decay);
    CHECK_EQ(kiln_model_set_group(ctx, m, "nothing", "embed", NULL), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "nothing") != NULL);
    CHECK_EQ(kiln_model_set_group(ctx, m, "*", "bad name!", NULL), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "bad name!") != NULL);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* Forward and backward of one batch; returns the loss. */
static double fwd_bwd(kiln_ctx *ctx, kiln_model *m, const int32_t *tok, const int32_t *tgt, int B,
                      int T)
{
    float *logits;
    double ls = 0, ws = 0;
    kiln_model_zero_grad(m);
    if (kiln_model_forward(ctx, m, tok, B, T, &logits)) return NAN;
    if (kiln_model_backward_ce(ctx, m, tgt, NULL, 1.0f / (float)(B * T), &ls, &ws)) return NAN;
    return ls / ws;
}

static const char *const gpt2_freeze[] = {"transformer.h.0.*", "transformer.wpe.weight",
                                          "transformer.h.1.mlp.c_fc.bias"};
/* a part of llama's fused q|k|v (computed, then zeroed), a whole fused
 * gate|up with down_proj (not computed), a norm */
static const char *const llama_freeze[] = {"model.layers.0.self_attn.q_proj.weight",
                                           "model.layers.1.mlp.*", "model.norm.weight"};

/* The AdamW update the library documents (kiln.h), written out here in
 * the same order of float operations, for the ranges given. */
typedef struct ref_adam {
    float *m, *v;
    int t;
} ref_adam;

static void ref_step(ref_adam *o, float *p, const float *g, size_t off, size_t n, float lr,
                     float wd)
{
    const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
    double bc1 = 1.0 - pow(b1, o->t), bc2 = 1.0 - pow(b2, o->t);
    float step = (float)((double)lr / bc1), rs = (float)(1.0 / sqrt(bc2));
    float lrwd = (float)((double)lr * (double)wd);
    for (size_t i = off; i < off + n; i++) {
        float gi = g[i] * 1.0f;
        float mi = b1 * o->m[i] + (1.0f - b1) * gi;
        float vi = b2 * o->v[i] + (1.0f - b2) * gi * gi;
        o->m[i] = mi;
        o->v[i] = vi;
        float d = sqrtf(vi) * rs + eps;
        p[i] = p[i] - (step * (mi / d) + lrwd * p[i]);
    }
}

/* Frozen model F against its unfrozen twin R: the frozen ranges of F's
 * gradient are zero where R's are not, the trainable ones equal R's bit
 * for bit; after each kiln_model_adamw_step of F (weight decay 0.1), its
 * frozen weights are the initial bits and its trainable ones those of a
 * hand-written AdamW step on R over the trainable ranges; the optimizer
 * state is smaller by the frozen count. */
static void frozen_run(kiln_arch arch, kiln_precision prec)
{
    enum { B = 2, T = 32, STEPS = 4 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = arch == KILN_ARCH_GPT2 ? gpt2_cfg() : llama_cfg();
    kiln_model *F = new_model(ctx, &c, prec, B, T), *R = new_model(ctx, &c, prec, B, T);
    CHECK(F && R);
    if (!F || !R) return;
    const char *const *pat = arch == KILN_ARCH_GPT2 ? gpt2_freeze : llama_freeze;
    int32_t tok[B * T], tgt[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = i % c.vocab_size, tgt[i] = (i + 1) % c.vocab_size;
    fwd_bwd(ctx, F, tok, tgt, B, T); /* gradients there before the freezing */
    for (int i = 0; i < 3; i++) CHECK_EQ(kiln_model_set_trainable(ctx, F, pat[i], false, NULL), KILN_OK);
    size_t n = kiln_model_num_params(F), nf = frozen_count(F);
    CHECK(nf > 0 && nf < n);
    kiln_adamw *of = NULL;
    CHECK_EQ(kiln_adamw_new_for_model(ctx, F, NULL, &of), KILN_OK);
    if (!of) return;
    CHECK_EQ(kiln_adamw_size(of), n);
    CHECK_EQ(kiln_adamw_state_size(of), n - nf);
    float *p0 = malloc(n * sizeof(float));
    memcpy(p0, kiln_model_params(F), n * sizeof(float));
    ref_adam ra = {calloc(n, sizeof(float)), calloc(n, sizeof(float)), 0};
    float *pr = malloc(n * sizeof(float));
    int nt = kiln_model_num_tensors(F);
    for (int s = 0; s < STEPS; s++) {
        if (s == 0) { /* frozen ranges read zeros before any backward of F */
            const float *g0 = kiln_model_grads(F);
            for (int i = 0; i < kiln_model_num_tensors(F); i++) {
                const kiln_tensor_info *ti = kiln_model_tensor(F, i);
                for (size_t k = 0; !ti->trainable && k < ti->numel; k++)
                    if (g0[ti->offset + k] != 0.0f) {
                        CHECK_MSG(0, "%s frozen after a backward: gradient %g", ti->name,
                                  g0[ti->offset + k]);
                        break;
                    }
            }
        }
        for (int i = 0; i < B * T; i++)
            tok[i] = (i * 7 + s * 13) % c.vocab_size, tgt[i] = (i * 5 + s * 3 + 1) % c.vocab_size;
        double lf = fwd_bwd(ctx, F, tok, tgt, B, T), lr_ = fwd_bwd(ctx, R, tok, tgt, B, T);
        CHECK_MSG(lf == lr_, "step %d: loss %.9g (frozen) vs %.9g (twin)", s, lf, lr_);
        const float *gf = kiln_model_grads(F), *gr = kiln_model_grads(R);
        for (int i = 0; i < nt; i++) {
            const kiln_tensor_info *ti = kiln_model_tensor(F, i);
            const float *a = gf + ti->offset, *b = gr + ti->offset;
            if (ti->trainable) {
                CHECK_MSG(!memcmp(a, b, ti->numel * sizeof(float)),
                          "step %d: gradient of trainable %s differs from the twin's", s, ti->name);
            } else {
                double za = 0, zb = 0;
                for (size_t k = 0; k < ti->numel; k++) za += fabs(a[k]), zb += fabs(b[k]);
                CHECK_MSG(za == 0 && zb > 0, "step %d: frozen %s: |g| %g (twin %g)", s,
                          ti->name, za, zb);
            }
        }
        /* the reference update: R's gradients, F's trainable ranges */
        memcpy(pr, kiln_model_params(R), n * sizeof(float));
        ra.t++;
        for (int i = 0; i < nt; i++) {
            const kiln_tensor_info *ti = kiln_model_tensor(F, i);
            if (ti->trainable) ref_step(&ra, pr, gr, ti->offset, ti->numel, 1e-2f, ti->decay ? 0.1f : 0.0f);
        }
        kiln_model_adamw_step(F, of, gf, 1e-2f, 1.0f);
        for (int i = 0; i < nt; i++) {
            const kiln_tensor_info *ti = kiln_model_tensor(R, i);
            CHECK_EQ(kiln_model_set_tensor(ctx, R, ti->name, pr + ti->offset, ti->numel), KILN_OK);
        }
        const float *pf = kiln_model_params(F);
        for (int i = 0; i < nt; i++) {
            const kiln_tensor_info *ti = kiln_model_tensor(F, i);
            const float *want = ti->trainable ? pr + ti->offset : p0 + ti->offset;
            CHECK_MSG(!memcmp(pf + ti->offset, want, ti->numel * sizeof(float)),
                      "step %d: %s %s differs from %s", s, ti->trainable ? "trainable" : "frozen",
                      ti->name, ti->trainable ? "the hand-written AdamW" : "its initial bits");
        }
    }
    /* the trainable weights did move */
    CHECK(memcmp(kiln_model_params(F), p0, n * sizeof(float)) != 0);
    free(ra.m), free(ra.v), free(pr), free(p0);
    kiln_adamw_free(of);
    kiln_model_free(F);
    kiln_model_free(R);
    kiln_ctx_free(ctx);
}

static void test_frozen_fp32(void)
{
    frozen_run(KILN_ARCH_GPT2, KILN_PRECISION_FP32);
    frozen_run(KILN_ARCH_LLAMA, KILN_PRECISION_FP32);
}

static void test_frozen_bf16(void)
{
    frozen_run(KILN_ARCH_GPT2, KILN_PRECISION_BF16);
    frozen_run(KILN_ARCH_LLAMA, KILN_PRECISION_BF16);
}

/* Frozen equals "learning rate 0 and no decay for those tensors" (a group
 * with lr_mul 0): the same bits after N steps, bf16. */
static void test_frozen_equals_zero_lr_group(void)
{
    enum { B = 2, T = 32 };
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = gpt2_cfg();
    kiln_model *F = new_model(ctx, &c, KILN_PRECISION_BF16, B, T);
    kiln_model *Z = new_model(ctx, &c, KILN_PRECISION_BF16, B, T);
    CHECK(F && Z);
    if (!F || !Z) return;
    for (int i = 0; i < 3; i++) {
        CHECK_EQ(kiln_model_set_trainable(ctx, F, gpt2_freeze[i], false, NULL), KILN_OK);
        CHECK_EQ(kiln_model_set_group(ctx, Z, gpt2_freeze[i], "still", NULL), KILN_OK);
    }
    kiln_adamw_opts zo = kiln_adamw_opts_default();
    zo.n_groups = 1;
    zo.groups[0] = (kiln_adamw_group){"still", 0.0f, 0.0f};
    kiln_adamw *of = NULL, *oz = NULL;
    CHECK_EQ(kiln_adamw_new_for_model(ctx, F, NULL, &of), KILN_OK);
    CHECK_EQ(kiln_adamw_new_for_model(ctx, Z, &zo, &oz), KILN_OK);
    if (!of || !oz) return;
    CHECK_EQ(kiln_adamw_state_size(oz), kiln_model_num_params(Z));
    CHECK_EQ(kiln_adamw_state_size(of), kiln_model_num_params(F) - frozen_count(F));
    int32_t tok[B * T], tgt[B * T];
    for (int s = 0; s < 5; s++) {
        for (int i = 0; i < B * T; i++)
            tok[i] = (i * 3 + s) % c.vocab_size, tgt[i] = (i * 11 + s * 7) % c.vocab_size;
        double lf = fwd_bwd(ctx, F, tok, tgt, B, T), lz = fwd_bwd(ctx, Z, tok, tgt, B, T);
        CHECK_MSG(lf == lz, "step %d: %.9g vs %.9g", s, lf, lz);
        kiln_model_adamw_step(F, of, kiln_model_grads(F), 3e-3f, 0.5f);
        kiln_model_adamw_step(Z, oz, kiln_model_grads(Z), 3e-3f, 0.5f);
    }
    CHECK(!memcmp(kiln_model_params(F), kiln_model_params(Z),
                  kiln_model_num_params(F) * sizeof(float)));
    /* a group in the options that no trainable tensor has, a bad lr_mul */
    kiln_adamw *bad = NULL;
    CHECK_EQ(kiln_adamw_new_for_model(ctx, F, &zo, &bad), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "groups[0]") && strstr(kiln_errmsg(ctx), "still"));
    zo.groups[0] = (kiln_adamw_group){"decay", -1.0f, 0.0f};
    CHECK_EQ(kiln_adamw_new_for_model(ctx, F, &zo, &bad), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "groups[0].lr_mul") != NULL);
    CHECK(bad == NULL);
    /* everything frozen: nothing to train */
    CHECK_EQ(kiln_model_set_trainable(ctx, F, "*", false, NULL), KILN_OK);
    CHECK_EQ(kiln_adamw_new_for_model(ctx, F, NULL, &bad), KILN_ERR_INVALID_ARG);
    kiln_adamw_free(of);
    kiln_adamw_free(oz);
    kiln_model_free(F);
    kiln_model_free(Z);
    kiln_ctx_free(ctx);
}

/* One AdamW step by hand: at t = 1, m^ = g and v^ = g^2, so each
 * parameter moves by lr_g (g / (|g| + eps) + wd_g p). */
static void test_group_lr_mul(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_adamw_opts o = kiln_adamw_opts_default();
    o.kernel = KILN_OPTIM_KERNEL_PORTABLE;
    o.n_groups = 2;
    o.groups[0] = (kiln_adamw_group){"no_decay", 0.5f, 0.01f};
    o.groups[1] = (kiln_adamw_group){"decay", 2.0f, 0.2f};
    kiln_adamw *a = NULL;
    CHECK_EQ(kiln_adamw_new(ctx, 4, &o, &a), KILN_OK);
    if (!a) return;
    CHECK_EQ(kiln_adamw_set_decay(ctx, a, 2, 2, true), KILN_OK);
    float p[4] = {1.0f, -2.0f, 0.5f, 3.0f}, g[4] = {0.5f, -1.0f, 2.0f, -0.25f};
    kiln_adamw_step(a, p, g, 0.1f);
    /* no_decay: lr 0.05, wd 0.01; decay: lr 0.2, wd 0.2 */
    const double want[4] = {1 - 0.05 * (1 + 0.01 * 1), -2 - 0.05 * (-1 + 0.01 * -2),
                            0.5 - 0.2 * (1 + 0.2 * 0.5), 3 - 0.2 * (-1 + 0.2 * 3)};
    CHECK(fabs(want[0] - 0.9495) < 1e-12 && fabs(want[3] - 3.08) < 1e-12);
    for (int i = 0; i < 4; i++)
        CHECK_MSG(fabs(p[i] - want[i]) < 1e-6, "p[%d] = %.9g, want %.9g", i, p[i], want[i]);
    /* the same numbers on the AVX-512 loop, where the CPU has it */
    kiln_adamw *b = NULL;
    o.kernel = KILN_OPTIM_KERNEL_AUTO;
    CHECK_EQ(kiln_adamw_new(ctx, 4, &o, &b), KILN_OK);
    CHECK_EQ(kiln_adamw_set_decay(ctx, b, 2, 2, true), KILN_OK);
    float q[4] = {1.0f, -2.0f, 0.5f, 3.0f};
    kiln_adamw_step(b, q, g, 0.1f);
    CHECK(!memcmp(p, q, sizeof p));
    /* a raw optimizer knows only the two default groups */
    o.groups[0].name = "embed";
    kiln_adamw *c = NULL;
    CHECK_EQ(kiln_adamw_new(ctx, 4, &o, &c), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "groups[0].name") != NULL);
    o.groups[0].name = "decay";
    CHECK_EQ(kiln_adamw_new(ctx, 4, &o, &c), KILN_ERR_INVALID_ARG); /* listed twice */
    CHECK(strstr(kiln_errmsg(ctx), "both name") != NULL);
    kiln_adamw_free(a);
    kiln_adamw_free(b);
    kiln_ctx_free(ctx);
}

/* optimizer.safetensors holds the trainable tensors' moments only, and
 * loading it into an optimizer with another trainable set names the
 * tensor. */
static void test_state_file(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = gpt2_cfg();
    kiln_model *m = NULL;
    CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
    if (!m) return;
    kiln_model_init_random(m, 1);
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "transformer.h.1.*", false, NULL), KILN_OK);
    kiln_adamw *a = NULL, *b = NULL, *full = NULL;
    CHECK_EQ(kiln_adamw_new_for_model(ctx, m, NULL, &a), KILN_OK);
    if (!a) return;
    size_t ns = kiln_adamw_state_size(a);
    for (size_t i = 0; i < ns; i++) kiln_adamw_m(a)[i] = (float)i, kiln_adamw_v(a)[i] = 0.5f;
    kiln_adamw_set_t(a, 7);
    CHECK_EQ(kiln_adamw_save(ctx, a, P("opt.safetensors")), KILN_OK);
    FILE *f = fopen(P("opt.safetensors"), "rb");
    long sz = 0;
    if (f) fseek(f, 0, SEEK_END), sz = ftell(f), fclose(f);
    CHECK_MSG(sz > (long)(8 * ns) && sz < (long)(8 * ns) + 8192, "file %ld bytes for %zu", sz, ns);
    /* the same trainable set: loads */
    CHECK_EQ(kiln_adamw_new_for_model(ctx, m, NULL, &b), KILN_OK);
    CHECK_EQ(kiln_adamw_load(ctx, b, P("opt.safetensors")), KILN_OK);
    CHECK_EQ(kiln_adamw_t(b), 7);
    CHECK(!memcmp(kiln_adamw_m(a), kiln_adamw_m(b), ns * sizeof(float)));
    /* another: the error names a tensor frozen on one side only */
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "transformer.h.1.*", true, NULL), KILN_OK);
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "transformer.h.0.ln_1.bias", false, NULL), KILN_OK);
    kiln_adamw_free(b);
    b = NULL;
    CHECK_EQ(kiln_adamw_new_for_model(ctx, m, NULL, &b), KILN_OK);
    CHECK_EQ(kiln_adamw_load(ctx, b, P("opt.safetensors")), KILN_ERR_FORMAT);
    CHECK_MSG(strstr(kiln_errmsg(ctx), "\"transformer.h.0.ln_1.bias\"") != NULL, "%s",
              kiln_errmsg(ctx));
    CHECK(strstr(kiln_errmsg(ctx), "frozen") != NULL);
    /* nothing frozen now but the file lacks transformer.h.1.*: named */
    CHECK_EQ(kiln_model_set_trainable(ctx, m, "*", true, NULL), KILN_OK);
    CHECK_EQ(kiln_adamw_new_for_model(ctx, m, NULL, &full), KILN_OK);
    CHECK_EQ(kiln_adamw_load(ctx, full, P("opt.safetensors")), KILN_ERR_FORMAT);
    CHECK_MSG(strstr(kiln_errmsg(ctx), "\"transformer.h.1.ln_1.weight\"") != NULL, "%s",
              kiln_errmsg(ctx));
    kiln_adamw_free(a);
    kiln_adamw_free(b);
    kiln_adamw_free(full);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* ---- the trainer ----------------------------------------------------- */

static void make_data(const char *dir, size_t ntrain, size_t nval, int vocab)
{
    static const char *words[] = {"the ", "cat ", "sat ", "on ", "a ", "mat. ", "\n"};
    kiln_rng r;
    kiln_rng_seed(&r, 5);
    int32_t *ids = malloc((ntrain + nval) * sizeof *ids);
    size_t k = 0;
    while (k < ntrain + nval) {
        const char *w = words[kiln_rng_below(&r, 7)];
        for (; *w && k < ntrain + nval; w++) ids[k++] = (unsigned char)*w;
    }
    test_write_tokens(dir, ids, ntrain, ids + ntrain, nval, vocab, 256);
    free(ids);
}

static const char *const train_freeze[] = {"transformer.h.0.attn.*", "transformer.wpe.weight"};

static kiln_train_opts base_opts(const char *out)
{
    kiln_train_opts o = kiln_train_opts_default();
    o.config = P("config.json");
    o.data = P("data");
    o.out = out;
    o.batch = 2;
    o.seq = 16;
    o.grad_accum = 2;
    o.lr = 3e-3;
    o.warmup = 2;
    o.steps = 10;
    o.eval_every = 0;
    o.save_every = 5;
    o.keep_last = 0;
    o.threads = 1;
    o.progress = KILN_PROGRESS_NONE;
    o.seed = 3;
    o.precision = KILN_PRECISION_FP32;
    o.freeze = train_freeze;
    o.n_freeze = 2;
    return o;
}

static bool same_file(const char *a, const char *b)
{
    FILE *x = fopen(a, "rb"), *y = fopen(b, "rb");
    bool same = x && y;
    while (same) {
        int p = fgetc(x), q = fgetc(y);
        if (p != q) same = false;
        if (p == EOF) break;
    }
    if (x) fclose(x);
    if (y) fclose(y);
    return same;
}

/* 10 steps straight == 5, stop, 5 more (the freeze taken from the
 * checkpoint), bit for bit; the frozen tensors keep their initial values;
 * a resume with other patterns is refused by name. */
static void test_trainer_resume(kiln_precision prec)
{
    kiln_ctx *ctx = kiln_ctx_new();
    const char *pn = prec == KILN_PRECISION_BF16 ? "bf16" : "fp32";
    char ra_[64], rb_[64];
    snprintf(ra_, sizeof ra_, "run_a_%s", pn);
    snprintf(rb_, sizeof rb_, "run_b_%s", pn);
    char *ra = strdup(P("%s", ra_)), *rb = strdup(P("%s", rb_));
    kiln_train_opts a = base_opts(ra), b = base_opts(rb);
    a.precision = b.precision = prec;
    kiln_train_result res;
    CHECK_EQ(kiln_train(ctx, &a, &res), KILN_OK);
    b.stop_at = 5;
    CHECK_EQ(kiln_train(ctx, &b, &res), KILN_OK);
    CHECK(res.interrupted && res.step == 5);
    char ck[1024], databuf[1024];
    CHECK_EQ(kiln_checkpoint_resolve(ctx, rb, ck, sizeof ck), KILN_OK);
    kiln_train_opts r = kiln_train_opts_default();
    CHECK_EQ(kiln_train_opts_load(ctx, ck, &r, databuf, sizeof databuf), KILN_OK);
    r.out = rb;
    r.resume = ck;
    r.threads = 1;
    r.progress = KILN_PROGRESS_NONE;
    /* other patterns: refused, naming the option */
    static const char *const other[] = {"transformer.h.0.mlp.*"};
    r.freeze = other;
    r.n_freeze = 1;
    CHECK_EQ(kiln_train(ctx, &r, &res), KILN_ERR_INVALID_ARG);
    CHECK_MSG(strstr(kiln_errmsg(ctx), "kiln_train_opts.freeze") != NULL, "%s", kiln_errmsg(ctx));
    r.freeze = NULL; /* the checkpoint's */
    r.n_freeze = 0;
    CHECK_EQ(kiln_train(ctx, &r, &res), KILN_OK);
    CHECK_EQ(res.step, 10);
    char pa[1200], pb[1200];
    snprintf(pa, sizeof pa, "%s/step_00000010/model.safetensors", ra);
    snprintf(pb, sizeof pb, "%s/step_00000010/model.safetensors", rb);
    CHECK_MSG(same_file(pa, pb), "%s: resumed model differs", pn);
    snprintf(pa, sizeof pa, "%s/step_00000010/optimizer.safetensors", ra);
    snprintf(pb, sizeof pb, "%s/step_00000010/optimizer.safetensors", rb);
    CHECK_MSG(same_file(pa, pb), "%s: resumed optimizer state differs", pn);
    /* frozen tensors are the initial ones (a fresh model from the same
     * seed and config); the others moved */
    kiln_model *init = NULL, *fin = NULL;
    kiln_config cfg;
    CHECK_EQ(kiln_config_load(ctx, P("config.json"), &cfg), KILN_OK);
    CHECK_EQ(kiln_model_new(ctx, &cfg, &init), KILN_OK);
    kiln_model_init_random(init, 3);
    snprintf(pa, sizeof pa, "%s/step_00000010", ra);
    CHECK_EQ(kiln_model_load(ctx, pa, &fin), KILN_OK);
    if (init && fin) {
        int frozen = 0;
        for (int i = 0; i < kiln_model_num_tensors(fin); i++) {
            const kiln_tensor_info *t = kiln_model_tensor(fin, i);
            bool fz = strstr(t->name, "h.0.attn.") || !strcmp(t->name, "transformer.wpe.weight");
            bool same = !memcmp(kiln_model_params(fin) + t->offset,
                                kiln_model_params(init) + t->offset, t->numel * sizeof(float));
            CHECK_MSG(same == fz, "%s: %s is %s", pn, t->name, same ? "unchanged" : "changed");
            frozen += fz;
        }
        CHECK_EQ(frozen, 5);
    }
    /* the state file: moments of the trainable parameters only */
    kiln_adamw *o = NULL;
    CHECK_EQ(kiln_model_set_trainable(ctx, init, "transformer.h.0.attn.*", false, NULL), KILN_OK);
    CHECK_EQ(kiln_model_set_trainable(ctx, init, "transformer.wpe.weight", false, NULL), KILN_OK);
    CHECK_EQ(kiln_adamw_new_for_model(ctx, init, NULL, &o), KILN_OK);
    snprintf(pa, sizeof pa, "%s/step_00000010/optimizer.safetensors", ra);
    CHECK_EQ(kiln_adamw_load(ctx, o, pa), KILN_OK);
    CHECK_EQ(kiln_adamw_t(o), 10);
    kiln_adamw_free(o);
    kiln_model_free(init);
    kiln_model_free(fin);
    /* a pattern that matches nothing names the field and the pattern */
    static const char *const none[] = {"transformer.h.7.*"};
    kiln_train_opts c = base_opts(P("run_none"));
    c.freeze = none;
    c.n_freeze = 1;
    CHECK_EQ(kiln_train(ctx, &c, &res), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_train_opts.freeze[0]") &&
          strstr(kiln_errmsg(ctx), "transformer.h.7.*"));
    free(ra), free(rb);
    kiln_ctx_free(ctx);
}

static void test_trainer_fp32(void) { test_trainer_resume(KILN_PRECISION_FP32); }
static void test_trainer_bf16(void) { test_trainer_resume(KILN_PRECISION_BF16); }

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_frozen.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    make_data(P("data"), 8000, 200, 257);
    FILE *f = fopen(P("config.json"), "w");
    fprintf(f, "{\"model_type\":\"gpt2\",\"n_layer\":2,\"n_embd\":32,\"n_head\":2,"
               "\"n_positions\":32,\"vocab_size\":257,\"layer_norm_epsilon\":1e-5,"
               "\"tie_word_embeddings\":true}\n");
    fclose(f);
    RUN_TEST(test_patterns);
    RUN_TEST(test_frozen_fp32);
    RUN_TEST(test_frozen_bf16);
    RUN_TEST(test_frozen_equals_zero_lr_group);
    RUN_TEST(test_group_lr_mul);
    RUN_TEST(test_state_file);
    RUN_TEST(test_trainer_fp32);
    RUN_TEST(test_trainer_bf16);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
