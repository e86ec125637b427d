/*
 * test_infer.c — the inference engine against an independent reference:
 * a plain full-recompute transformer (double precision, no cache, written
 * from the Hugging Face definitions of GPT-2 and Llama) over random
 * weights stored under HF names and shapes. Checks the kernels against
 * their scalar reference, logits of prefill, KV-cache greedy decoding
 * against recomputing the whole sequence every step, batched decoding of
 * several sequences against each alone, mixed prefill+decode steps, bf16
 * weights, and errors (cache full, bad token).
 */
#include "check.h"
#include "infer/infer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- a tiny named-tensor store ----------------------------------------- */

typedef struct tens {
    char name[96];
    int ndim;
    int64_t shape[2];
    float *data;
} tens;

typedef struct store {
    tens t[256];
    int n;
    kiln_rng rng;
} store;

static float *add(store *s, const char *name, int64_t a, int64_t b, float scale, float base)
{
    tens *t = &s->t[s->n++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = b ? 2 : 1;
    t->shape[0] = a;
    t->shape[1] = b;
    size_t n = (size_t)a * (b ? b : 1);
    t->data = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) t->data[i] = base + scale * kiln_rng_normal(&s->rng);
    return t->data;
}

static const float *find(const store *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->t[i].name, name)) return s->t[i].data;
    return NULL;
}

static const float *src_fn(void *ud, const char *name, int *ndim, int64_t shape[4])
{
    store *s = ud;
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->t[i].name, name)) {
            *ndim = s->t[i].ndim;
            shape[0] = s->t[i].shape[0];
            shape[1] = s->t[i].shape[1];
            return s->t[i].data;
        }
    return NULL;
}

static void store_free(store *s)
{
    for (int i = 0; i < s->n; i++) free(s->t[i].data);
    s->n = 0;
}

static kiln_config tiny_cfg(kiln_arch arch)
{
    kiln_config c = {0};
    c.arch = arch;
    c.n_layer = 2;
    c.n_embd = 32;
    c.n_head = 4;
    c.n_kv_head = arch == KILN_ARCH_LLAMA ? 2 : 4;
    c.n_inner = arch == KILN_ARCH_LLAMA ? 48 : 128;
    c.vocab_size = 61;
    c.n_ctx = 48;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.tie_embeddings = arch == KILN_ARCH_GPT2;
    c.bias = arch == KILN_ARCH_GPT2;
    c.bos_token_id = -1;
    c.eos_token_id = -1;
    return c;
}

static void make_weights(store *s, const kiln_config *c, uint64_t seed)
{
    kiln_rng_seed(&s->rng, seed);
    const int C = c->n_embd, F = c->n_inner, V = c->vocab_size;
    const int KVD = c->n_kv_head * (C / c->n_head);
    char n[128];
    if (c->arch == KILN_ARCH_GPT2) {
        add(s, "transformer.wte.weight", V, C, 0.3f, 0);
        add(s, "transformer.wpe.weight", c->n_ctx, C, 0.1f, 0);
        for (int l = 0; l < c->n_layer; l++) {
#define A(suf, a, b, sc, base) (snprintf(n, sizeof n, "transformer.h.%d.%s", l, suf), add(s, n, a, b, sc, base))
            A("ln_1.weight", C, 0, 0.1f, 1);
            A("ln_1.bias", C, 0, 0.1f, 0);
            A("attn.c_attn.weight", C, 3 * C, 0.2f, 0); /* Conv1D (in, out) */
            A("attn.c_attn.bias", 3 * C, 0, 0.1f, 0);
            A("attn.c_proj.weight", C, C, 0.2f, 0);
            A("attn.c_proj.bias", C, 0, 0.1f, 0);
            A("ln_2.weight", C, 0, 0.1f, 1);
            A("ln_2.bias", C, 0, 0.1f, 0);
            A("mlp.c_fc.weight", C, F, 0.2f, 0);
            A("mlp.c_fc.bias", F, 0, 0.1f, 0);
            A("mlp.c_proj.weight", F, C, 0.1f, 0);
            A("mlp.c_proj.bias", C, 0, 0.1f, 0);
#undef A
        }
        add(s, "transformer.ln_f.weight", C, 0, 0.1f, 1);
        add(s, "transformer.ln_f.bias", C, 0, 0.1f, 0);
    } else {
        add(s, "model.embed_tokens.weight", V, C, 0.3f, 0);
        for (int l = 0; l < c->n_layer; l++) {
#define A(suf, a, b, sc, base) (snprintf(n, sizeof n, "model.layers.%d.%s", l, suf), add(s, n, a, b, sc, base))
            A("input_layernorm.weight", C, 0, 0.1f, 1);
            A("self_attn.q_proj.weight", C, C, 0.3f, 0); /* Linear (out, in) */
            A("self_attn.k_proj.weight", KVD, C, 0.3f, 0);
            A("self_attn.v_proj.weight", KVD, C, 0.3f, 0);
            A("self_attn.o_proj.weight", C, C, 0.2f, 0);
            A("post_attention_layernorm.weight", C, 0, 0.1f, 1);
            A("mlp.gate_proj.weight", F, C, 0.2f, 0);
            A("mlp.up_proj.weight", F, C, 0.2f, 0);
            A("mlp.down_proj.weight", C, F, 0.2f, 0);
#undef A
        }
        add(s, "model.norm.weight", C, 0, 0.1f, 1);
        add(s, "lm_head.weight", V, C, 0.3f, 0);
    }
}

/* ---- the reference: full recompute, double precision ------------------- */

/* logits (n, V) for tokens[0..n). Weights read through `find`; when bf16,
 * matrices are rounded to bf16 first (what the engine stores). */
static const float *nullable(const store *s, const char *name)
{
    return name ? find(s, name) : NULL;
}

static void ref_forward(const store *s, const kiln_config *c, const int32_t *tok,
                        int n, double *logits, bool bf16)
{
    const int C = c->n_embd, F = c->n_inner, V = c->vocab_size, NH = c->n_head;
    const int HS = C / NH, KVH = c->n_kv_head, KVD = KVH * HS;
    const bool llama = c->arch == KILN_ARCH_LLAMA;
    double *x = calloc((size_t)n * C, 8), *xn = calloc((size_t)n * C, 8);
    double *q = calloc((size_t)n * C, 8), *k = calloc((size_t)n * KVD, 8), *v = calloc((size_t)n * KVD, 8);
    double *att = calloc((size_t)n * C, 8), *h = calloc((size_t)n * 2 * F, 8);
    char nm[128];
#define W(name) find(s, name)
#define RD(p, i) (bf16 ? (double)bf16_to_f32(f32_to_bf16((p)[i])) : (double)(p)[i])
    /* activations entering a bf16 product are rounded to bf16 too when the
     * kernels use bf16 dot products (IK_BF16_DOT) */
#define RX(v) (bf16 && IK_BF16_DOT ? (double)bf16_to_f32(f32_to_bf16((float)(v))) : (double)(v))
    const float *wte = W(llama ? "model.embed_tokens.weight" : "transformer.wte.weight");
    for (int t = 0; t < n; t++)
        for (int i = 0; i < C; i++) {
            x[t * C + i] = wte[tok[t] * C + i];
            if (!llama) x[t * C + i] += W("transformer.wpe.weight")[t * C + i];
        }
    /* norm(in -> out) */
#define NORM(out, in, wname, bname)                                            \
    for (int t = 0; t < n; t++) {                                              \
        const float *w_ = W(wname), *b_ = nullable(s, bname);             \
        double m = 0, var = 0;                                                 \
        if (!llama) {                                                          \
            for (int i = 0; i < C; i++) m += in[t * C + i];                    \
            m /= C;                                                            \
        }                                                                      \
        for (int i = 0; i < C; i++) var += (in[t * C + i] - m) * (in[t * C + i] - m); \
        var /= C;                                                              \
        for (int i = 0; i < C; i++)                                            \
            out[t * C + i] = (in[t * C + i] - m) / sqrt(var + c->norm_eps) * w_[i] + (b_ ? b_[i] : 0); \
    }
    for (int l = 0; l < c->n_layer; l++) {
        char a[128], b[128];
        if (llama) {
            snprintf(a, sizeof a, "model.layers.%d.input_layernorm.weight", l);
            NORM(xn, x, a, (const char *)NULL);
            const float *wq, *wk, *wv;
            snprintf(nm, sizeof nm, "model.layers.%d.self_attn.q_proj.weight", l); wq = W(nm);
            snprintf(nm, sizeof nm, "model.layers.%d.self_attn.k_proj.weight", l); wk = W(nm);
            snprintf(nm, sizeof nm, "model.layers.%d.self_attn.v_proj.weight", l); wv = W(nm);
            for (int t = 0; t < n; t++) {
                for (int o = 0; o < C; o++) {
                    double acc = 0;
                    for (int i = 0; i < C; i++) acc += RD(wq, o * C + i) * RX(xn[t * C + i]);
                    q[t * C + o] = acc;
                }
                for (int o = 0; o < KVD; o++) {
                    double ak = 0, av = 0;
                    for (int i = 0; i < C; i++) {
                        ak += RD(wk, o * C + i) * RX(xn[t * C + i]);
                        av += RD(wv, o * C + i) * RX(xn[t * C + i]);
                    }
                    k[t * KVD + o] = ak;
                    v[t * KVD + o] = av;
                }
                /* RoPE, rotate_half */
                for (int hh = 0; hh < NH + KVH; hh++) {
                    double *vec = hh < NH ? &q[t * C + hh * HS] : &k[t * KVD + (hh - NH) * HS];
                    for (int i = 0; i < HS / 2; i++) {
                        double f = pow(c->rope_theta, -2.0 * i / HS), ang = t * f;
                        double x1 = vec[i], x2 = vec[i + HS / 2];
                        vec[i] = x1 * cos(ang) - x2 * sin(ang);
                        vec[i + HS / 2] = x2 * cos(ang) + x1 * sin(ang);
                    }
                }
            }
        } else {
            snprintf(a, sizeof a, "transformer.h.%d.ln_1.weight", l);
            snprintf(b, sizeof b, "transformer.h.%d.ln_1.bias", l);
            NORM(xn, x, a, b);
            snprintf(nm, sizeof nm, "transformer.h.%d.attn.c_attn.weight", l);
            const float *w = W(nm);
            snprintf(nm, sizeof nm, "transformer.h.%d.attn.c_attn.bias", l);
            const float *bb = W(nm);
            for (int t = 0; t < n; t++)
                for (int o = 0; o < 3 * C; o++) {
                    double acc = bb[o];
                    for (int i = 0; i < C; i++) acc += RD(w, i * 3 * C + o) * RX(xn[t * C + i]);
                    if (o < C) q[t * C + o] = acc;
                    else if (o < 2 * C) k[t * C + o - C] = acc;
                    else v[t * C + o - 2 * C] = acc;
                }
        }
        for (int t = 0; t < n; t++)
            for (int hh = 0; hh < NH; hh++) {
                int kh = hh / (NH / KVH);
                double sc[64], mx = -1e300, sum = 0;
                for (int j = 0; j <= t; j++) {
                    double d = 0;
                    for (int i = 0; i < HS; i++) d += q[t * C + hh * HS + i] * k[j * KVD + kh * HS + i];
                    sc[j] = d / sqrt((double)HS);
                    if (sc[j] > mx) mx = sc[j];
                }
                for (int j = 0; j <= t; j++) sum += (sc[j] = exp(sc[j] - mx));
                for (int i = 0; i < HS; i++) {
                    double acc = 0;
                    for (int j = 0; j <= t; j++) acc += sc[j] / sum * v[j * KVD + kh * HS + i];
                    att[t * C + hh * HS + i] = acc;
                }
            }
        /* output projection + residual */
        const float *wo, *bo = NULL;
        if (llama) {
            snprintf(nm, sizeof nm, "model.layers.%d.self_attn.o_proj.weight", l); wo = W(nm);
        } else {
            snprintf(nm, sizeof nm, "transformer.h.%d.attn.c_proj.weight", l); wo = W(nm);
            snprintf(nm, sizeof nm, "transformer.h.%d.attn.c_proj.bias", l); bo = W(nm);
        }
        for (int t = 0; t < n; t++)
            for (int o = 0; o < C; o++) {
                double acc = bo ? bo[o] : 0;
                for (int i = 0; i < C; i++)
                    acc += (llama ? RD(wo, o * C + i) : RD(wo, i * C + o)) * RX(att[t * C + i]);
                x[t * C + o] += acc;
            }
        if (llama) {
            snprintf(a, sizeof a, "model.layers.%d.post_attention_layernorm.weight", l);
            NORM(xn, x, a, (const char *)NULL);
            const float *wg, *wu, *wd;
            snprintf(nm, sizeof nm, "model.layers.%d.mlp.gate_proj.weight", l); wg = W(nm);
            snprintf(nm, sizeof nm, "model.layers.%d.mlp.up_proj.weight", l); wu = W(nm);
            snprintf(nm, sizeof nm, "model.layers.%d.mlp.down_proj.weight", l); wd = W(nm);
            for (int t = 0; t < n; t++) {
                for (int o = 0; o < F; o++) {
                    double g = 0, u = 0;
                    for (int i = 0; i < C; i++) {
                        g += RD(wg, o * C + i) * RX(xn[t * C + i]);
                        u += RD(wu, o * C + i) * RX(xn[t * C + i]);
                    }
                    h[t * F + o] = g / (1 + exp(-g)) * u;
                }
                for (int o = 0; o < C; o++) {
                    double acc = 0;
                    for (int i = 0; i < F; i++) acc += RD(wd, o * F + i) * RX(h[t * F + i]);
                    x[t * C + o] += acc;
                }
            }
        } else {
            snprintf(a, sizeof a, "transformer.h.%d.ln_2.weight", l);
            snprintf(b, sizeof b, "transformer.h.%d.ln_2.bias", l);
            NORM(xn, x, a, b);
            const float *wf, *bf, *wp, *bp;
            snprintf(nm, sizeof nm, "transformer.h.%d.mlp.c_fc.weight", l); wf = W(nm);
            snprintf(nm, sizeof nm, "transformer.h.%d.mlp.c_fc.bias", l); bf = W(nm);
            snprintf(nm, sizeof nm, "transformer.h.%d.mlp.c_proj.weight", l); wp = W(nm);
            snprintf(nm, sizeof nm, "transformer.h.%d.mlp.c_proj.bias", l); bp = W(nm);
            for (int t = 0; t < n; t++) {
                for (int o = 0; o < F; o++) {
                    double acc = bf[o];
                    for (int i = 0; i < C; i++) acc += RD(wf, i * F + o) * RX(xn[t * C + i]);
                    h[t * F + o] = 0.5 * acc * (1 + tanh(sqrt(2 / M_PI) * (acc + 0.044715 * acc * acc * acc)));
                }
                for (int o = 0; o < C; o++) {
                    double acc = bp[o];
                    for (int i = 0; i < F; i++) acc += RD(wp, i * C + o) * RX(h[t * F + i]);
                    x[t * C + o] += acc;
                }
            }
        }
    }
    if (llama) { NORM(xn, x, "model.norm.weight", (const char *)NULL); }
    else { NORM(xn, x, "transformer.ln_f.weight", "transformer.ln_f.bias"); }
    const float *head = W(llama ? "lm_head.weight" : "transformer.wte.weight");
    for (int t = 0; t < n; t++)
        for (int o = 0; o < V; o++) {
            double acc = 0;
            for (int i = 0; i < C; i++) acc += RD(head, o * C + i) * RX(xn[t * C + i]);
            logits[(size_t)t * V + o] = acc;
        }
#undef W
#undef RD
#undef RX
#undef NORM
    free(x); free(xn); free(q); free(k); free(v); free(att); free(h);
}

static int argmax_f(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}
static int argmax_d(const double *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[b]) b = i;
    return b;
}

/* ---- tests ---------------------------------------------------------------- */

static void test_linear_matches_reference(void)
{
    kiln_rng r;
    kiln_rng_seed(&r, 7);
    int shapes[][3] = {{1, 5, 3}, {1, 33, 17}, {3, 64, 48}, {4, 13, 100},
                       {8, 40, 256}, {9, 7, 31}, {70, 65, 129}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int T = shapes[si][0], R = shapes[si][1], K = shapes[si][2];
        float *w = malloc((size_t)R * K * 4), *x = malloc((size_t)T * K * 4);
        float *b = malloc((size_t)R * 4), *y = malloc((size_t)T * R * 4), *y2 = malloc((size_t)T * R * 4);
        uint16_t *wb = malloc((size_t)R * K * 2);
        for (int i = 0; i < R * K; i++) { w[i] = kiln_rng_normal(&r); wb[i] = f32_to_bf16(w[i]); }
        for (int i = 0; i < T * K; i++) x[i] = kiln_rng_normal(&r);
        for (int i = 0; i < R; i++) b[i] = kiln_rng_normal(&r);
        for (int bf = 0; bf < 2; bf++)
            for (int acc = 0; acc < 2; acc++) {
                imat m = {R, K, bf ? NULL : w, bf ? wb : NULL};
                for (int i = 0; i < T * R; i++) y[i] = y2[i] = (float)i * 0.01f;
                ik_linear(y, x, T, &m, acc ? b : NULL, acc, 2);
                ik_linear_ref(y2, x, T, &m, acc ? b : NULL, acc);
                double worst = 0;
                for (int i = 0; i < T * R; i++) worst = check_max(worst, fabs(y[i] - y2[i]));
                CHECK_MSG(worst < 1e-3, "T=%d R=%d K=%d bf16=%d acc=%d: max diff %g",
                          T, R, K, bf, acc, worst);
            }
        free(w); free(x); free(b); free(y); free(y2); free(wb);
    }
}

static kiln_engine *mk(kiln_arch arch, store *s, int slots, int chunk, kiln_dtype wt)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = tiny_cfg(arch);
    kiln_engine_opts o = kiln_engine_opts_default();
    o.n_slots = slots;
    o.chunk = chunk;
    o.wtype = wt;
    kiln_engine *e = NULL;
    kiln_status st = infer_engine_new_src(ctx, &c, src_fn, s, &o, &e);
    CHECK_MSG(st == KILN_OK, "engine_new: %s", kiln_errmsg(ctx));
    kiln_ctx_free(ctx);
    return e;
}

static void prefill_logits_vs_ref_chunk(kiln_arch arch, kiln_dtype wt, double tol, int chunk,
                                        int maxn)
{
    store s = {0};
    kiln_config c = tiny_cfg(arch);
    make_weights(&s, &c, 11 + arch);
    kiln_engine *e = mk(arch, &s, 1, chunk, wt);
    if (!e) { store_free(&s); return; }
    kiln_ctx *ctx = kiln_ctx_new();
    int32_t tok[48];
    for (int i = 0; i < maxn; i++) tok[i] = (i * 7 + 3) % c.vocab_size;
    const int V = c.vocab_size;
    double *ref = malloc(sizeof(double) * (size_t)maxn * V);
    ref_forward(&s, &c, tok, maxn, ref, wt == KILN_DTYPE_BF16);
    float *lg = malloc(sizeof(float) * V);
    /* logits at several prefix lengths n: prefill n tokens from empty */
    for (int n = 1; n <= maxn; n += 4) {
        kiln_engine_reset(e, 0);
        CHECK(kiln_engine_prefill(ctx, e, 0, tok, n, lg) == KILN_OK);
        double worst = 0;
        for (int i = 0; i < V; i++) worst = check_max(worst, fabs(lg[i] - ref[(size_t)(n - 1) * V + i]));
        CHECK_MSG(worst < tol, "arch %d wtype %d n=%d: max |engine - ref| = %g", arch, wt, n, worst);
        CHECK_EQ(kiln_engine_pos(e, 0), n);
    }
    free(ref); free(lg);
    kiln_ctx_free(ctx);
    kiln_engine_free(e);
    store_free(&s);
}

/* chunk 5 makes a 17-token prompt take several chunked steps (the
 * streaming kernel); chunk 40 sends 20..40-token steps through the GEMM */
static void prefill_logits_vs_ref(kiln_arch arch, kiln_dtype wt, double tol)
{
    prefill_logits_vs_ref_chunk(arch, wt, tol, 5, 17);
    prefill_logits_vs_ref_chunk(arch, wt, tol, 40, 41);
}

static void test_prefill_gpt2(void) { prefill_logits_vs_ref(KILN_ARCH_GPT2, KILN_DTYPE_F32, 2e-4); }
static void test_prefill_llama(void) { prefill_logits_vs_ref(KILN_ARCH_LLAMA, KILN_DTYPE_F32, 2e-4); }
static void test_prefill_gpt2_bf16(void) { prefill_logits_vs_ref(KILN_ARCH_GPT2, KILN_DTYPE_BF16, 5e-3); }
static void test_prefill_llama_bf16(void) { prefill_logits_vs_ref(KILN_ARCH_LLAMA, KILN_DTYPE_BF16, 5e-3); }

/* Greedy with the cache == greedy recomputing the whole sequence. */
static void greedy_cache_vs_recompute(kiln_arch arch)
{
    store s = {0};
    kiln_config c = tiny_cfg(arch);
    make_weights(&s, &c, 21 + arch);
    kiln_engine *e = mk(arch, &s, 1, 8, KILN_DTYPE_F32);
    if (!e) { store_free(&s); return; }
    kiln_ctx *ctx = kiln_ctx_new();
    const int V = c.vocab_size, P = 5, N = 30;
    int32_t seq[64] = {1, 9, 4, 33, 17};
    float *lg = malloc(sizeof(float) * V);
    double *ref = malloc(sizeof(double) * 64 * V);
    CHECK(kiln_engine_prefill(ctx, e, 0, seq, P, lg) == KILN_OK);
    int n = P, mismatches = 0;
    double worst = 0;
    for (int step = 0; step < N; step++) {
        ref_forward(&s, &c, seq, n, ref, false);
        int rt = argmax_d(ref + (size_t)(n - 1) * V, V), et = argmax_f(lg, V);
        for (int i = 0; i < V; i++) worst = check_max(worst, fabs(lg[i] - ref[(size_t)(n - 1) * V + i]));
        if (rt != et) mismatches++;
        seq[n++] = rt;
        kiln_engine_tok tk = {0, rt, true};
        CHECK(kiln_engine_step(ctx, e, &tk, 1, lg) == KILN_OK);
    }
    CHECK_MSG(mismatches == 0, "%d greedy tokens differ", mismatches);
    CHECK_MSG(worst < 2e-4, "max logit diff %g over %d steps", worst, N);
    CHECK_EQ(kiln_engine_pos(e, 0), P + N);
    free(lg); free(ref);
    kiln_ctx_free(ctx);
    kiln_engine_free(e);
    store_free(&s);
}
static void test_greedy_cache_gpt2(void) { greedy_cache_vs_recompute(KILN_ARCH_GPT2); }
static void test_greedy_cache_llama(void) { greedy_cache_vs_recompute(KILN_ARCH_LLAMA); }

/* Three sequences of different lengths decoded together (one step per
 * token for all) give the same logits as each decoded alone; the first
 * decode step is mixed with the third sequence's prefill. */
static void batched_vs_alone(kiln_arch arch, kiln_dtype wt)
{
    store s = {0};
    kiln_config c = tiny_cfg(arch);
    make_weights(&s, &c, 31 + arch);
    kiln_engine *eb = mk(arch, &s, 3, 16, wt), *e1 = mk(arch, &s, 1, 16, wt);
    if (!eb || !e1) { kiln_engine_free(eb); kiln_engine_free(e1); store_free(&s); return; }
    kiln_ctx *ctx = kiln_ctx_new();
    const int V = c.vocab_size, N = 12;
    int32_t prompts[3][8] = {{5, 6, 7}, {40, 2, 2, 2, 2, 9, 1}, {3}};
    int plen[3] = {3, 7, 1};
    int32_t gen[3][32];
    float *alone = malloc(sizeof(float) * 3 * N * V), *lg = malloc(sizeof(float) * 3 * V);
    /* alone */
    for (int q = 0; q < 3; q++) {
        kiln_engine_reset(e1, 0);
        CHECK(kiln_engine_prefill(ctx, e1, 0, prompts[q], plen[q], lg) == KILN_OK);
        for (int i = 0; i < N; i++) {
            memcpy(alone + ((size_t)q * N + i) * V, lg, sizeof(float) * V);
            gen[q][i] = argmax_f(lg, V);
            kiln_engine_tok tk = {0, gen[q][i], true};
            CHECK(kiln_engine_step(ctx, e1, &tk, 1, lg) == KILN_OK);
        }
    }
    /* batched: prefill 0 and 1; then a mixed step (decode 0,1 + prefill 2) */
    double worst = 0;
    float *l0 = malloc(sizeof(float) * V * 3);
    CHECK(kiln_engine_prefill(ctx, eb, 0, prompts[0], plen[0], l0) == KILN_OK);
    CHECK(kiln_engine_prefill(ctx, eb, 1, prompts[1], plen[1], l0 + V) == KILN_OK);
    for (int i = 0; i < V; i++) {
        worst = check_max(worst, fabs(l0[i] - alone[i]));
        worst = check_max(worst, fabs(l0[V + i] - alone[(size_t)N * V + i]));
    }
    kiln_engine_tok mixed[3] = {{0, gen[0][0], true}, {1, gen[1][0], true}, {2, prompts[2][0], true}};
    CHECK(kiln_engine_step(ctx, eb, mixed, 3, lg) == KILN_OK);
    /* lg rows: seq0 step1, seq1 step1, seq2 step0 */
    for (int i = 0; i < V; i++) {
        worst = check_max(worst, fabs(lg[i] - alone[((size_t)0 * N + 1) * V + i]));
        worst = check_max(worst, fabs(lg[V + i] - alone[((size_t)1 * N + 1) * V + i]));
        worst = check_max(worst, fabs(lg[2 * V + i] - alone[((size_t)2 * N + 0) * V + i]));
    }
    int step[3] = {1, 1, 0};
    while (step[0] < N - 1) {
        kiln_engine_tok tk[3];
        for (int q = 0; q < 3; q++) tk[q] = (kiln_engine_tok){q, gen[q][step[q]], true};
        CHECK(kiln_engine_step(ctx, eb, tk, 3, lg) == KILN_OK);
        for (int q = 0; q < 3; q++) {
            step[q]++;
            for (int i = 0; i < V; i++)
                worst = check_max(worst, fabs(lg[(size_t)q * V + i] - alone[((size_t)q * N + step[q]) * V + i]));
        }
    }
    CHECK_MSG(worst < 1e-4, "batched vs alone: max logit diff %g", worst);
    free(alone); free(lg); free(l0);
    kiln_ctx_free(ctx);
    kiln_engine_free(eb);
    kiln_engine_free(e1);
    store_free(&s);
}
static void test_batched_gpt2(void) { batched_vs_alone(KILN_ARCH_GPT2, KILN_DTYPE_F32); }
static void test_batched_llama(void) { batched_vs_alone(KILN_ARCH_LLAMA, KILN_DTYPE_F32); }
static void test_batched_llama_bf16(void) { batched_vs_alone(KILN_ARCH_LLAMA, KILN_DTYPE_BF16); }

static void test_errors(void)
{
    store s = {0};
    kiln_config c = tiny_cfg(KILN_ARCH_GPT2);
    make_weights(&s, &c, 5);
    kiln_engine *e = mk(KILN_ARCH_GPT2, &s, 2, 8, KILN_DTYPE_F32);
    if (!e) { store_free(&s); return; }
    kiln_ctx *ctx = kiln_ctx_new();
    float *lg = malloc(sizeof(float) * c.vocab_size * 8);
    kiln_engine_tok bad = {0, c.vocab_size, true};
    CHECK(kiln_engine_step(ctx, e, &bad, 1, lg) == KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "out of range") != NULL);
    bad = (kiln_engine_tok){2, 1, true};
    CHECK(kiln_engine_step(ctx, e, &bad, 1, lg) == KILN_ERR_RANGE);
    CHECK_EQ(kiln_engine_pos(e, 0), 0);
    int32_t *t = calloc(64, sizeof(int32_t));
    CHECK(kiln_engine_prefill(ctx, e, 0, t, c.n_ctx + 1, lg) == KILN_ERR_RANGE);
    CHECK(kiln_engine_prefill(ctx, e, 0, t, c.n_ctx, lg) == KILN_OK);
    kiln_engine_tok one = {0, 1, true};
    CHECK(kiln_engine_step(ctx, e, &one, 1, lg) == KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "full") != NULL);
    CHECK_EQ(kiln_engine_pos(e, 0), c.n_ctx);
    /* a missing tensor names it */
    store s2 = {0};
    make_weights(&s2, &c, 5);
    strcpy(s2.t[4].name, "renamed");
    kiln_engine *e2 = NULL;
    kiln_engine_opts o = kiln_engine_opts_default();
    CHECK(infer_engine_new_src(ctx, &c, src_fn, &s2, &o, &e2) == KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "transformer.h.0.") != NULL);
    CHECK(e2 == NULL);
    /* a weight dtype the engine does not store names the field and type */
    o.wtype = KILN_DTYPE_Q4_0;
    CHECK(infer_engine_new_src(ctx, &c, src_fn, &s, &o, &e2) == KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_engine_opts.wtype") != NULL);
    CHECK(strstr(kiln_errmsg(ctx), "q4_0") != NULL);
    CHECK(e2 == NULL);
    /* the deprecated aliases are the one dtype's values */
    CHECK_EQ(KILN_WTYPE_F32, KILN_DTYPE_F32);
    CHECK_EQ(KILN_WTYPE_BF16, KILN_DTYPE_BF16);
    free(t); free(lg);
    kiln_ctx_free(ctx);
    kiln_engine_free(e);
    store_free(&s);
    store_free(&s2);
}

/* The engine built from a kiln_model (kiln_engine_new) decodes greedily
 * with its KV cache exactly as the model's own forward pass recomputing
 * the whole sequence every step (kiln_model_forward), both families. */
static void greedy_vs_model_forward(kiln_arch arch, kiln_dtype wt, double tol)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = tiny_cfg(arch);
    c.n_ctx = 40;
    kiln_model *m = NULL;
    kiln_status st = kiln_model_new(ctx, &c, &m);
    CHECK_MSG(st == KILN_OK, "model_new: %s", kiln_errmsg(ctx));
    if (st) { kiln_ctx_free(ctx); return; }
    kiln_model_init_random(m, 99 + arch);
    /* larger weights than GPT-2 init so the logits are not all alike */
    float *p = kiln_model_params_mut(m);
    kiln_rng r;
    kiln_rng_seed(&r, 3);
    for (size_t i = 0; i < kiln_model_num_params(m); i++) p[i] += 0.05f * kiln_rng_normal(&r);
    const int N = 24, P = 4, V = c.vocab_size;
    CHECK(kiln_model_prepare(ctx, m, 1, P + N) == KILN_OK);
    kiln_engine_opts o = kiln_engine_opts_default();
    o.wtype = wt;
    o.chunk = 3;
    kiln_engine *e = NULL;
    st = kiln_engine_new(ctx, m, &o, &e);
    CHECK_MSG(st == KILN_OK, "engine_new: %s", kiln_errmsg(ctx));
    if (st) { kiln_model_free(m); kiln_ctx_free(ctx); return; }
    int32_t seq[64] = {7, 1, 50, 3};
    float *lg = malloc(sizeof(float) * V), *ref;
    CHECK(kiln_engine_prefill(ctx, e, 0, seq, P, lg) == KILN_OK);
    int n = P, mismatches = 0;
    double worst = 0;
    for (int step = 0; step < N; step++) {
        CHECK(kiln_model_forward(ctx, m, seq, 1, n, &ref) == KILN_OK);
        const float *last = ref + (size_t)(n - 1) * V;
        int rt = argmax_f(last, V);
        for (int i = 0; i < V; i++) worst = check_max(worst, fabs(lg[i] - last[i]));
        if (argmax_f(lg, V) != rt) mismatches++;
        seq[n++] = rt;
        kiln_engine_tok tk = {0, rt, true};
        CHECK(kiln_engine_step(ctx, e, &tk, 1, lg) == KILN_OK);
    }
    CHECK_MSG(mismatches == 0, "arch %d: %d of %d greedy tokens differ", arch, mismatches, N);
    CHECK_MSG(worst < tol, "arch %d wtype %d: max logit diff vs kiln_model_forward %g", arch, wt, worst);
    free(lg);
    kiln_engine_free(e);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}
static void test_vs_model_gpt2(void) { greedy_vs_model_forward(KILN_ARCH_GPT2, KILN_DTYPE_F32, 1e-3); }
static void test_vs_model_llama(void) { greedy_vs_model_forward(KILN_ARCH_LLAMA, KILN_DTYPE_F32, 1e-3); }

int main(void)
{
    RUN_TEST(test_linear_matches_reference);
    RUN_TEST(test_prefill_gpt2);
    RUN_TEST(test_prefill_llama);
    RUN_TEST(test_prefill_gpt2_bf16);
    RUN_TEST(test_prefill_llama_bf16);
    RUN_TEST(test_greedy_cache_gpt2);
    RUN_TEST(test_greedy_cache_llama);
    RUN_TEST(test_batched_gpt2);
    RUN_TEST(test_batched_llama);
    RUN_TEST(test_batched_llama_bf16);
    RUN_TEST(test_errors);
    RUN_TEST(test_vs_model_gpt2);
    RUN_TEST(test_vs_model_llama);
    return TEST_EXIT();
}
