/*
 * test_model.c — the model's math against central finite differences
 * (double-precision harness): every op's backward on its own, then the
 * whole model's parameter gradients on tiny configs of both families
 * (gpt2: learned positions, tied embeddings, biases; llama: RoPE, RMSNorm,
 * SwiGLU, GQA with n_kv_head < n_head, untied head, optional biases).
 * Also: hook order and coverage, determinism, fast vs ref kernels, input
 * checks, save/load round trip.
 */
#include "check.h"
#include "model/model.h"

#include <unistd.h>

/* ---- op-level finite differences -------------------------------------- */

static void fill(float *x, size_t n, kiln_rng *r, float scale)
{
    for (size_t i = 0; i < n; i++) x[i] = scale * kiln_rng_normal(r);
}

/* A scalar function of a parameter vector, L(x) = sum(out(x) * R). */
typedef double (*loss_fn)(void *ud);

/* Finite differences of L w.r.t. every element of x (size n), compared
 * with grad: the fourth-order central stencil
 *   (8 (L(x+h) - L(x-h)) - (L(x+2h) - L(x-2h))) / 12h
 * evaluated in double on top of fp32 forward passes. Returns the worst
 * error relative to max(|g|) over the vector. */
static double fd_check(loss_fn f, void *ud, float *x, const float *grad,
                       size_t n, float eps)
{
    double gmax = 1e-12, worst = 0;
    for (size_t i = 0; i < n; i++) gmax = check_max(gmax, fabs(grad[i]));
    for (size_t i = 0; i < n; i++) {
        float x0 = x[i];
        double l[4];
        const float k[4] = {1, -1, 2, -2};
        for (int j = 0; j < 4; j++) {
            x[i] = x0 + k[j] * eps;
            l[j] = f(ud);
        }
        x[i] = x0;
        double num = (8.0 * (l[0] - l[1]) - (l[2] - l[3])) / (12.0 * eps);
        double err = fabs(num - grad[i]) / gmax;
        if (err > worst) worst = err;
    }
    return worst;
}

static double dotR(const float *out, const float *R, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)out[i] * R[i];
    return s;
}

enum { NB = 2, NT = 5, NC = 12 };

typedef struct op_case {
    const kern_ops *k;
    kern_gemm *g;
    int N, C, OC;
    float *x, *w, *b, *out, *R, *mean, *rstd;
    int which; /* 0 layernorm, 1 rmsnorm, 2 gelu, 3 swiglu, 4 linear OUT_IN, 5 linear IN_OUT */
} op_case;

static double op_loss(void *ud)
{
    op_case *c = ud;
    size_t no;
    switch (c->which) {
    case 0:
        c->k->layernorm_fwd(c->out, c->mean, c->rstd, c->x, c->w, c->b, c->N, c->C, 1e-5f);
        no = (size_t)c->N * c->C;
        break;
    case 1:
        c->k->rmsnorm_fwd(c->out, c->rstd, c->x, c->w, c->N, c->C, 1e-5f);
        no = (size_t)c->N * c->C;
        break;
    case 2:
        c->k->gelu_fwd(c->out, c->x, (size_t)c->N * c->C);
        no = (size_t)c->N * c->C;
        break;
    case 3:
        c->k->swiglu_fwd(c->out, c->x, c->N, c->C / 2);
        no = (size_t)c->N * (c->C / 2);
        break;
    default:
        c->k->matmul_fwd(c->g, c->out, c->x, c->w, c->b, c->N, c->C, c->OC,
                         c->which == 4 ? KERN_W_OUT_IN : KERN_W_IN_OUT);
        no = (size_t)c->N * c->OC;
        break;
    }
    return dotR(c->out, c->R, no);
}

static void run_op_fd(const kern_ops *k, kern_gemm *g, int which, const char *what)
{
    kiln_rng r;
    kiln_rng_seed(&r, 100 + (uint64_t)which);
    op_case c = {.k = k, .g = g, .N = NB * NT, .C = NC, .OC = 7, .which = which};
    size_t nx = (size_t)c.N * c.C, nw = (size_t)c.C * 16;
    float x[NB * NT * NC], w[NC * 16], b[16], out[NB * NT * 16], R[NB * NT * 16];
    float mean[NB * NT], rstd[NB * NT], dx[NB * NT * NC], dw[NC * 16], db[16];
    c.x = x; c.w = w; c.b = b; c.out = out; c.R = R; c.mean = mean; c.rstd = rstd;
    fill(x, nx, &r, 1.0f);
    fill(w, nw, &r, 0.5f);
    for (int i = 0; i < c.C; i++) if (which <= 1) w[i] += 1.0f;
    fill(b, 16, &r, 0.5f);
    fill(R, (size_t)c.N * 16, &r, 1.0f);
    memset(dx, 0, sizeof dx);
    memset(dw, 0, sizeof dw);
    memset(db, 0, sizeof db);
    op_loss(&c);
    size_t nwp = 0, nbp = 0;
    switch (which) {
    case 0: k->layernorm_bwd(dx, dw, db, R, x, w, mean, rstd, c.N, c.C); nwp = nbp = (size_t)c.C; break;
    case 1: k->rmsnorm_bwd(dx, dw, R, x, w, rstd, c.N, c.C); nwp = (size_t)c.C; break;
    case 2: k->gelu_bwd(dx, x, R, nx); break;
    case 3: k->swiglu_bwd(dx, x, R, c.N, c.C / 2); break;
    default:
        k->matmul_bwd(g, dx, dw, db, R, x, w, c.N, c.C, c.OC,
                      which == 4 ? KERN_W_OUT_IN : KERN_W_IN_OUT, false);
        nwp = (size_t)c.C * c.OC;
        nbp = (size_t)c.OC;
        break;
    }
    double e = fd_check(op_loss, &c, x, dx, nx, 1e-2f);
    CHECK_MSG(e < 2e-3, "%s/%s dx: worst relative error %g", k->name, what, e);
    if (nwp) {
        e = fd_check(op_loss, &c, w, dw, nwp, 1e-2f);
        CHECK_MSG(e < 2e-3, "%s/%s dw: worst relative error %g", k->name, what, e);
    }
    if (nbp) {
        e = fd_check(op_loss, &c, b, db, nbp, 1e-2f);
        CHECK_MSG(e < 2e-3, "%s/%s db: worst relative error %g", k->name, what, e);
    }
}

static void test_ops_fd(void)
{
    const kern_ops *tabs[2] = {kern_ops_ref(), kern_ops_fast()};
    kern_gemm *fast = kern_gemm_fast_new();
    kern_gemm *gs[2] = {kern_gemm_ref(), fast};
    const char *names[] = {"layernorm", "rmsnorm", "gelu", "swiglu", "linear", "conv1d"};
    for (int t = 0; t < 2; t++)
        for (int w = 0; w < 6; w++) run_op_fd(tabs[t], gs[t], w, names[w]);
    kern_gemm_free(fast);
}

/* attention + rope */
typedef struct att_case {
    const kern_ops *k;
    kern_gemm *g;
    int B, T, NH, KVH, HS;
    float *qkv, *work, *out, *lse, *R, *cs, *sn;
    bool rope;
} att_case;

static double att_loss(void *ud)
{
    att_case *c = ud;
    size_t n = (size_t)c->B * c->T * (c->NH + 2 * c->KVH) * c->HS;
    memcpy(c->work, c->qkv, n * sizeof(float));
    if (c->rope) c->k->rope(c->work, c->cs, c->sn, c->B, c->T, c->NH, c->KVH, c->HS, false);
    c->k->attention_fwd(c->g, c->out, c->lse, c->work, c->B, c->T, c->NH, c->KVH, c->HS);
    return dotR(c->out, c->R, (size_t)c->B * c->T * c->NH * c->HS);
}

static void test_attention_fd(void)
{
    const kern_ops *tabs[2] = {kern_ops_ref(), kern_ops_fast()};
    kern_gemm *fast = kern_gemm_fast_new();
    kern_gemm *gs[2] = {kern_gemm_ref(), fast};
    for (int t = 0; t < 2; t++)
        for (int v = 0; v < 2; v++) {
            att_case c = {.k = tabs[t], .g = gs[t], .B = 2, .T = 5, .NH = 4,
                          .KVH = v ? 2 : 4, .HS = 4, .rope = v == 1};
            size_t S = (size_t)(c.NH + 2 * c.KVH) * c.HS, n = (size_t)c.B * c.T * S;
            float qkv[2 * 5 * 48], work[2 * 5 * 48], dqkv[2 * 5 * 48];
            float out[2 * 5 * 16], R[2 * 5 * 16], lse[2 * 4 * 5];
            float cs[5 * 2], sn[5 * 2];
            for (int p = 0; p < 5; p++)
                for (int i = 0; i < 2; i++) {
                    cs[p * 2 + i] = cosf(p * (i ? 0.01f : 1.0f));
                    sn[p * 2 + i] = sinf(p * (i ? 0.01f : 1.0f));
                }
            kiln_rng r;
            kiln_rng_seed(&r, 7 + (uint64_t)v);
            fill(qkv, n, &r, 1.0f);
            fill(R, (size_t)c.B * c.T * c.NH * c.HS, &r, 1.0f);
            c.qkv = qkv; c.work = work; c.out = out; c.lse = lse; c.R = R; c.cs = cs; c.sn = sn;
            att_loss(&c);
            c.k->attention_bwd(c.g, dqkv, R, work, out, lse, c.B, c.T, c.NH, c.KVH, c.HS);
            if (c.rope) c.k->rope(dqkv, cs, sn, c.B, c.T, c.NH, c.KVH, c.HS, true);
            double e = fd_check(att_loss, &c, qkv, dqkv, n, 1e-2f);
            CHECK_MSG(e < 2e-3, "%s attention (KVH=%d rope=%d): worst error %g",
                      c.k->name, c.KVH, c.rope, e);
        }
    kern_gemm_free(fast);
}

typedef struct ce_case {
    const kern_ops *k;
    float *x, *mask;
    int32_t *tgt;
    int N, V;
} ce_case;

static double ce_loss(void *ud)
{
    ce_case *c = ud;
    double ls = 0, ws = 0;
    c->k->cross_entropy(c->x, c->tgt, c->mask, c->N, c->V, 1.0f, NULL, &ls, &ws);
    return ls;
}

static void test_cross_entropy(void)
{
    kiln_rng r;
    kiln_rng_seed(&r, 3);
    float x[6 * 9], d[6 * 9], mask[6] = {1, 0.5f, 0, 2, 1, 1};
    int32_t tgt[6] = {0, 8, 3, -1, 4, 4};
    fill(x, 54, &r, 2.0f);
    const kern_ops *tabs[2] = {kern_ops_ref(), kern_ops_fast()};
    for (int t = 0; t < 2; t++) {
        ce_case c = {tabs[t], x, mask, tgt, 6, 9};
        double ls = 0, ws = 0;
        c.k->cross_entropy(x, tgt, mask, 6, 9, 1.0f, d, &ls, &ws);
        CHECK_NEAR(ws, 1 + 0.5 + 0 + 1 + 1, 1e-12);
        double e = fd_check(ce_loss, &c, x, d, 54, 1e-2f);
        CHECK_MSG(e < 2e-3, "%s cross entropy: worst error %g", c.k->name, e);
        /* ignored row and zero-weight row give zero gradient */
        for (int i = 0; i < 9; i++) CHECK(d[3 * 9 + i] == 0.0f && d[2 * 9 + i] == 0.0f);
        /* known answer: uniform logits -> loss log(V) */
        float u[4] = {0, 0, 0, 0};
        int32_t t0 = 2;
        ls = ws = 0;
        c.k->cross_entropy(u, &t0, NULL, 1, 4, 1.0f, u, &ls, &ws);
        CHECK_NEAR(ls, log(4.0), 1e-7);
        CHECK_NEAR(u[2], 0.25 - 1.0, 1e-7);
        CHECK_NEAR(u[0], 0.25, 1e-7);
    }
    /* public API validates targets */
    kiln_ctx *ctx = kiln_ctx_new();
    int32_t bad = 9;
    double ls = 0, ws = 0;
    CHECK(kiln_cross_entropy(ctx, x, &bad, NULL, 1, 9, 1.0f, NULL, &ls, &ws) == KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "vocabulary") != NULL);
    kiln_ctx_free(ctx);
}

/* ---- whole-model finite differences ---------------------------------- */

static kiln_config tiny(kiln_arch arch, bool bias)
{
    kiln_config c = kiln_config_default();
    c.arch = arch;
    c.n_layer = 2;
    c.n_embd = 8;
    c.n_head = arch == KILN_ARCH_GPT2 ? 2 : 4;
    c.n_kv_head = arch == KILN_ARCH_GPT2 ? 2 : 2;
    c.n_inner = arch == KILN_ARCH_GPT2 ? 16 : 12;
    c.vocab_size = 11;
    c.n_ctx = 8;
    c.norm_eps = 1e-5f;
    c.rope_theta = 100.0f;
    c.tie_embeddings = arch == KILN_ARCH_GPT2;
    c.bias = arch == KILN_ARCH_GPT2 ? true : bias;
    c.bos_token_id = c.eos_token_id = 10;
    return c;
}

typedef struct model_case {
    kiln_ctx *ctx;
    kiln_model *m;
    int32_t *tok, *tgt;
    int B, T;
} model_case;

static double model_loss(void *ud)
{
    model_case *c = ud;
    float *logits;
    kiln_status s = kiln_model_forward(c->ctx, c->m, c->tok, c->B, c->T, &logits);
    KILN_ASSERT(s == KILN_OK);
    double ls = 0, ws = 0;
    kern_ops_ref()->cross_entropy(logits, c->tgt, NULL, (int64_t)c->B * c->T,
                                  c->m->V, 1.0f, NULL, &ls, &ws);
    return ls / ws;
}

static void model_grads(model_case *c)
{
    float *logits;
    CHECK(kiln_model_forward(c->ctx, c->m, c->tok, c->B, c->T, &logits) == KILN_OK);
    double ls = 0, ws = 0;
    int64_t N = (int64_t)c->B * c->T;
    int nvalid = 0;
    for (int64_t i = 0; i < N; i++) nvalid += c->tgt[i] >= 0;
    kiln_model_zero_grad(c->m);
    CHECK(kiln_cross_entropy(c->ctx, logits, c->tgt, NULL, N, c->m->V, 1.0f / nvalid,
                             logits, &ls, &ws) == KILN_OK);
    CHECK(kiln_model_backward(c->ctx, c->m, logits) == KILN_OK);
}

static void model_fd(kiln_arch arch, bool bias, bool ref)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = tiny(arch, bias);
    kiln_model *m;
    CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
    model_use_ref_kernels(m, ref);
    kiln_model_init_random(m, 5);
    /* Larger weights than GPT-2 init so every path carries signal; norms
     * and biases perturbed away from 1 / 0. */
    kiln_rng r;
    kiln_rng_seed(&r, 9);
    for (size_t i = 0; i < m->num_params; i++)
        m->params[i] = m->params[i] * 4.0f + 0.1f * kiln_rng_normal(&r);
    enum { B = 2, T = 6 };
    int32_t tok[B * T], tgt[B * T];
    for (int i = 0; i < B * T; i++) {
        tok[i] = (int32_t)kiln_rng_below(&r, (uint64_t)cfg.vocab_size);
        tgt[i] = (int32_t)kiln_rng_below(&r, (uint64_t)cfg.vocab_size);
    }
    tgt[3] = -1; /* an ignored position */
    CHECK(kiln_model_prepare(ctx, m, B, T) == KILN_OK);
    model_case c = {ctx, m, tok, tgt, B, T};
    model_grads(&c);
    float *grad = malloc(m->num_params * sizeof(float));
    memcpy(grad, m->grads, m->num_params * sizeof(float));
    for (int ti = 0; ti < m->n_tensors; ti++) {
        const kiln_tensor_info *t = &m->tensors[ti];
        double e = fd_check(model_loss, &c, m->params + t->offset, grad + t->offset,
                            t->numel, 2e-3f);
        CHECK_MSG(e < 5e-3, "%s %s (%s kernels): worst error %g relative to max |grad|",
                  arch == KILN_ARCH_GPT2 ? "gpt2" : "llama", t->name, ref ? "ref" : "fast", e);
    }
    free(grad);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

static void test_gpt2_fd(void) { model_fd(KILN_ARCH_GPT2, true, true); }
static void test_llama_fd(void) { model_fd(KILN_ARCH_LLAMA, false, true); }
static void test_llama_bias_fd(void) { model_fd(KILN_ARCH_LLAMA, true, true); }
static void test_gpt2_fd_fast(void) { model_fd(KILN_ARCH_GPT2, true, false); }
static void test_llama_fd_fast(void) { model_fd(KILN_ARCH_LLAMA, false, false); }

/* ---- hook, determinism, fast vs ref ----------------------------------- */

typedef struct hook_rec {
    size_t off[64], num[64];
    int n;
} hook_rec;

static void rec_hook(void *ud, size_t off, size_t num)
{
    hook_rec *h = ud;
    if (h->n < 64) {
        h->off[h->n] = off;
        h->num[h->n] = num;
    }
    h->n++;
}

static void test_hook_order(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    for (int a = 0; a < 2; a++) {
        kiln_config cfg = tiny(a ? KILN_ARCH_LLAMA : KILN_ARCH_GPT2, false);
        kiln_model *m;
        CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
        kiln_model_init_random(m, 1);
        hook_rec h = {0};
        kiln_model_set_grad_hook(m, rec_hook, &h);
        int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8}, tgt[8] = {2, 3, 4, 5, 6, 7, 8, 9};
        model_case c = {ctx, m, tok, tgt, 2, 4};
        model_grads(&c);
        CHECK_EQ(h.n, cfg.n_layer + 2);
        /* head first, then layers in reverse, then embeddings: the ranges
         * tile [0, num_params) exactly once */
        size_t end = m->num_params;
        for (int i = 0; i < h.n && i < 64; i++) {
            CHECK_EQ(h.off[i] + h.num[i], end);
            end = h.off[i];
        }
        CHECK_EQ(end, 0);
        kiln_model_free(m);
    }
    kiln_ctx_free(ctx);
}

static void test_determinism_and_fast_vs_ref(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    for (int a = 0; a < 2; a++) {
        kiln_config cfg = kiln_config_default();
        cfg.arch = a ? KILN_ARCH_LLAMA : KILN_ARCH_GPT2;
        cfg.n_layer = 2;
        cfg.n_embd = 64;
        cfg.n_head = 4;
        cfg.n_kv_head = a ? 2 : 4;
        cfg.n_inner = a ? 96 : 256;
        cfg.vocab_size = 97;
        cfg.n_ctx = 32;
        cfg.tie_embeddings = !a;
        cfg.bias = !a;
        cfg.bos_token_id = cfg.eos_token_id = -1;
        enum { B = 3, T = 17 };
        int32_t tok[B * T], tgt[B * T];
        kiln_rng r;
        kiln_rng_seed(&r, 11);
        for (int i = 0; i < B * T; i++) {
            tok[i] = (int32_t)kiln_rng_below(&r, 97);
            tgt[i] = (int32_t)kiln_rng_below(&r, 97);
        }
        float *g[3];
        float *lg[3];
        double loss[3];
        for (int run = 0; run < 3; run++) {
            kiln_model *m;
            CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
            model_use_ref_kernels(m, run == 2);
            kiln_model_init_random(m, 42);
            model_case c = {ctx, m, tok, tgt, B, T};
            loss[run] = model_loss(&c);
            lg[run] = malloc((size_t)B * T * 97 * sizeof(float));
            memcpy(lg[run], m->a.logits, (size_t)B * T * 97 * sizeof(float));
            model_grads(&c);
            g[run] = malloc(m->num_params * sizeof(float));
            memcpy(g[run], m->grads, m->num_params * sizeof(float));
            size_t np = m->num_params;
            if (run == 2) {
                CHECK(memcmp(g[0], g[1], np * sizeof(float)) == 0);
                CHECK(memcmp(lg[0], lg[1], (size_t)B * T * 97 * sizeof(float)) == 0);
                CHECK(loss[0] == loss[1]);
                CHECK_NEAR(loss[0], loss[2], 1e-5);
                double gmax = 0, emax = 0, lmax = 0;
                for (size_t i = 0; i < np; i++) {
                    gmax = check_max(gmax, fabs(g[2][i]));
                    emax = check_max(emax, fabs(g[0][i] - g[2][i]));
                }
                for (size_t i = 0; i < (size_t)B * T * 97; i++)
                    lmax = check_max(lmax, fabs(lg[0][i] - lg[2][i]));
                CHECK_MSG(emax <= 1e-4 * gmax, "fast vs ref grads: max diff %g (max |g| %g)",
                          emax, gmax);
                CHECK_MSG(lmax <= 1e-4, "fast vs ref logits: max diff %g", lmax);
            }
            kiln_model_free(m);
        }
        for (int run = 0; run < 3; run++) {
            free(g[run]);
            free(lg[run]);
        }
    }
    kiln_ctx_free(ctx);
}

/* A model prepared for a large batch runs smaller ones exactly like a
 * model prepared for the small one. */
static void test_smaller_batch_than_prepared(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = tiny(KILN_ARCH_LLAMA, false);
    kiln_model *a, *b;
    CHECK(kiln_model_new(ctx, &cfg, &a) == KILN_OK);
    CHECK(kiln_model_new(ctx, &cfg, &b) == KILN_OK);
    kiln_model_init_random(a, 8);
    kiln_model_init_random(b, 8);
    CHECK(kiln_model_prepare(ctx, a, 4, 8) == KILN_OK);
    int32_t tok[6] = {1, 2, 3, 4, 5, 6}, tgt[6] = {2, 3, 4, 5, 6, 7};
    model_case ca = {ctx, a, tok, tgt, 2, 3}, cb = {ctx, b, tok, tgt, 2, 3};
    CHECK(model_loss(&ca) == model_loss(&cb));
    model_grads(&ca);
    model_grads(&cb);
    CHECK(memcmp(a->grads, b->grads, a->num_params * sizeof(float)) == 0);
    kiln_model_free(a);
    kiln_model_free(b);
    kiln_ctx_free(ctx);
}

static void test_bad_inputs(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config cfg = tiny(KILN_ARCH_GPT2, true);
    kiln_model *m;
    CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
    float *logits;
    int32_t tok[4] = {1, 2, 11, 3};
    CHECK(kiln_model_forward(ctx, m, tok, 1, 4, &logits) == KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "token id 11") != NULL);
    tok[2] = -5;
    CHECK(kiln_model_forward(ctx, m, tok, 1, 4, &logits) == KILN_ERR_RANGE);
    CHECK(kiln_model_prepare(ctx, m, 1, 9) == KILN_ERR_RANGE); /* > n_ctx */
    CHECK(strstr(kiln_errmsg(ctx), "sequence length T = 9") != NULL);
    CHECK(kiln_model_prepare(ctx, m, 0, 4) == KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "batch size B = 0") != NULL);
    {
        /* activations that overflow or cannot exist are refused, not
         * allocated short */
        kiln_config big = cfg;
        big.n_ctx = 1 << 20;
        big.n_head = 8;
        big.n_kv_head = 8;
        kiln_model *mb;
        CHECK(kiln_model_new(ctx, &big, &mb) == KILN_OK);
        CHECK(kiln_model_prepare(ctx, mb, 1 << 20, 1 << 20) == KILN_ERR_RANGE);
        CHECK(kiln_model_prepare(ctx, mb, 1000, 1 << 20) == KILN_ERR_RANGE);
        CHECK(strstr(kiln_errmsg(ctx), "lower B or T") != NULL);
        kiln_model_free(mb);
    }
    kiln_model *m2;
    CHECK(kiln_model_new(ctx, &cfg, &m2) == KILN_OK);
    CHECK(kiln_model_backward(ctx, m2, NULL) == KILN_ERR_INVALID_ARG);
    kiln_model_free(m2);
    kiln_model_free(m);
    kiln_config bad = cfg;
    bad.n_embd = 9;
    CHECK(kiln_model_new(ctx, &bad, &m) != KILN_OK);
    CHECK(m == NULL);
    kiln_ctx_free(ctx);
}

/* ---- names, counts, save/load ------------------------------------------ */

static void test_layout_and_roundtrip(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    char dir[] = "/tmp/kiln-test-model-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    for (int a = 0; a < 2; a++) {
        kiln_config cfg = tiny(a ? KILN_ARCH_LLAMA : KILN_ARCH_GPT2, a == 1);
        kiln_model *m, *m2;
        CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
        CHECK_EQ(kiln_model_num_params(m), kiln_config_num_params(&cfg));
        size_t sum = 0;
        for (int i = 0; i < kiln_model_num_tensors(m); i++) {
            const kiln_tensor_info *t = kiln_model_tensor(m, i);
            CHECK_EQ(t->offset, sum);
            sum += t->numel;
        }
        CHECK_EQ(sum, kiln_model_num_params(m));
        if (a == 0) {
            int i = kiln_model_find_tensor(m, "transformer.h.1.attn.c_attn.weight");
            CHECK(i >= 0);
            CHECK_EQ(kiln_model_tensor(m, i)->shape[0], 8);
            CHECK_EQ(kiln_model_tensor(m, i)->shape[1], 24);
            CHECK(kiln_model_find_tensor(m, "lm_head.weight") < 0); /* tied */
            CHECK(kiln_model_tensor(m, i)->decay);
            CHECK(!kiln_model_tensor(m, kiln_model_find_tensor(m, "transformer.wte.weight"))->decay);
        } else {
            int i = kiln_model_find_tensor(m, "model.layers.0.self_attn.k_proj.weight");
            CHECK(i >= 0);
            CHECK_EQ(kiln_model_tensor(m, i)->shape[0], 4); /* KVH * HS = 2 * 2 */
            CHECK_EQ(kiln_model_tensor(m, i)->shape[1], 8);
            CHECK(kiln_model_find_tensor(m, "lm_head.weight") >= 0);
            CHECK(kiln_model_find_tensor(m, "model.layers.1.self_attn.o_proj.bias") >= 0);
        }
        kiln_model_init_random(m, 77);
        CHECK(kiln_model_save(ctx, m, dir) == KILN_OK);
        CHECK(kiln_model_load(ctx, dir, &m2) == KILN_OK);
        if (m2) {
            const kiln_config *p = &m->cfg, *q = &m2->cfg;
            CHECK(p->arch == q->arch && p->n_layer == q->n_layer && p->n_embd == q->n_embd);
            CHECK(p->n_head == q->n_head && p->n_kv_head == q->n_kv_head);
            CHECK(p->n_inner == q->n_inner && p->vocab_size == q->vocab_size);
            CHECK(p->n_ctx == q->n_ctx && p->norm_eps == q->norm_eps);
            CHECK(p->tie_embeddings == q->tie_embeddings && p->bias == q->bias);
            CHECK(p->bos_token_id == q->bos_token_id && p->eos_token_id == q->eos_token_id);
            CHECK(p->arch == KILN_ARCH_GPT2 || p->rope_theta == q->rope_theta);
            CHECK(memcmp(m->params, m2->params, m->num_params * sizeof(float)) == 0);
            kiln_model_free(m2);
        }
        /* a model with a different config does not load these weights */
        kiln_config other = cfg;
        other.n_inner += 2;
        kiln_model *m3;
        CHECK(kiln_model_new(ctx, &other, &m3) == KILN_OK);
        CHECK(model_load_weights(ctx, m3, dir) == KILN_ERR_FORMAT);
        CHECK(strstr(kiln_errmsg(ctx), "shape") != NULL);
        kiln_model_free(m3);
        kiln_model_free(m);
    }
    /* same seed, same weights; different seed, different weights */
    kiln_config cfg = tiny(KILN_ARCH_GPT2, true);
    kiln_model *x, *y;
    kiln_model_new(ctx, &cfg, &x);
    kiln_model_new(ctx, &cfg, &y);
    kiln_model_init_random(x, 3);
    kiln_model_init_random(y, 3);
    CHECK(memcmp(x->params, y->params, x->num_params * 4) == 0);
    kiln_model_init_random(y, 4);
    CHECK(memcmp(x->params, y->params, x->num_params * 4) != 0);
    CHECK(x->w.layers[0].ln1_w[0] == 1.0f && x->w.layers[0].qkv_b[0] == 0.0f);
    kiln_model_free(x);
    kiln_model_free(y);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
    kiln_ctx_free(ctx);
}

int main(void)
{
    RUN_TEST(test_ops_fd);
    RUN_TEST(test_attention_fd);
    RUN_TEST(test_cross_entropy);
    RUN_TEST(test_gpt2_fd);
    RUN_TEST(test_llama_fd);
    RUN_TEST(test_llama_bias_fd);
    RUN_TEST(test_gpt2_fd_fast);
    RUN_TEST(test_llama_fd_fast);
    RUN_TEST(test_hook_order);
    RUN_TEST(test_determinism_and_fast_vs_ref);
    RUN_TEST(test_smaller_batch_than_prepared);
    RUN_TEST(test_bad_inputs);
    RUN_TEST(test_layout_and_roundtrip);
    return TEST_EXIT();
}
