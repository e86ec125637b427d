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
#include "kernels/kernels.h"
#include "model/model.h"

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

/* A kiln_model holding the store's tensors (by Hugging Face name; the
 * engine is built from a model). NULL with a message when one is missing. */
static kiln_model *store_model(kiln_ctx *ctx, const store *s, const kiln_config *c)
{
    kiln_model *m = NULL;
    if (kiln_model_new(ctx, c, &m)) return NULL;
    float *p = kiln_model_params_mut(m);
    for (int i = 0; i < kiln_model_num_tensors(m); i++) {
        const kiln_tensor_info *t = kiln_model_tensor(m, i);
        const tens *st = NULL;
        for (int j = 0; j < s->n; j++)
            if (!strcmp(s->t[j].name, t->name)) st = &s->t[j];
        size_t n = st ? (size_t)st->shape[0] * (st->ndim == 2 ? (size_t)st->shape[1] : 1) : 0;
        if (!st || n != t->numel) {
            CHECK_MSG(false, "store lacks %s (or its size differs)", t->name);
            kiln_model_free(m);
            return NULL;
        }
        memcpy(p + t->offset, st->data, n * sizeof(float));
    }
    return m;
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
                        int n, double *logits, bool bf16, const bool *gemm_row)
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
     * kernels use bf16 dot products (KERN_BF16_DOT), in decode-sized steps
     * (gemm_row[t]: row t was in a prefill-sized step, whose GEMM takes
     * them in fp32; NULL: none was) */
    bool round_x = true;
#define RX(v) (bf16 && round_x && KERN_BF16_DOT ? (double)bf16_to_f32(f32_to_bf16((float)(v))) \
                                                : (double)(v))
#define RXT(t, v) (gemm_row && gemm_row[t] ? (double)(v) : RX(v))
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
                    for (int i = 0; i < C; i++) acc += RD(wq, o * C + i) * RXT(t, xn[t * C + i]);
                    q[t * C + o] = acc;
                }
                for (int o = 0; o < KVD; o++) {
                    double ak = 0, av = 0;
                    for (int i = 0; i < C; i++) {
                        ak += RD(wk, o * C + i) * RXT(t, xn[t * C + i]);
                        av += RD(wv, o * C + i) * RXT(t, xn[t * C + i]);
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
                    for (int i = 0; i < C; i++) acc += RD(w, i * 3 * C + o) * RXT(t, xn[t * C + i]);
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
                    acc += (llama ? RD(wo, o * C + i) : RD(wo, i * C + o)) * RXT(t, att[t * C + i]);
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
                        g += RD(wg, o * C + i) * RXT(t, xn[t * C + i]);
                        u += RD(wu, o * C + i) * RXT(t, xn[t * C + i]);
                    }
                    h[t * F + o] = g / (1 + exp(-g)) * u;
                }
                for (int o = 0; o < C; o++) {
                    double acc = 0;
                    for (int i = 0; i < F; i++) acc += RD(wd, o * F + i) * RXT(t, h[t * F + i]);
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
                    for (int i = 0; i < C; i++) acc += RD(wf, i * F + o) * RXT(t, xn[t * C + i]);
                    h[t * F + o] = 0.5 * acc * (1 + tanh(sqrt(2 / M_PI) * (acc + 0.044715 * acc * acc * acc)));
                }
                for (int o = 0; o < C; o++) {
                    double acc = bp[o];
                    for (int i = 0; i < F; i++) acc += RD(wp, i * C + o) * RXT(t, h[t * F + i]);
                    x[t * C + o] += acc;
                }
            }
        }
    }
    if (llama) { NORM(xn, x, "model.norm.weight", (const char *)NULL); }
    else { NORM(xn, x, "transformer.ln_f.weight", "transformer.ln_f.bias"); }
    const float *head = W(llama ? "lm_head.weight" : "transformer.wte.weight");
    /* the engine's head multiplies only the wanted rows: one, decode-sized */
    for (int t = 0; t < n; t++)
        for (int o = 0; o < V; o++) {
            double acc = 0;
            for (int i = 0; i < C; i++) acc += RD(head, o * C + i) * RX(xn[t * C + i]);
            logits[(size_t)t * V + o] = acc;
        }
#undef W
#undef RD
#undef RX
#undef RXT
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

/* The fast table's typed linear against the reference, every storage the
 * engine prepares (fp32 either layout, bf16 rows), decode-sized T (the
 * streaming kernel) and prefill-sized T (the GEMM). */
static void test_linear_matches_reference(void)
{
    kiln_rng r;
    kiln_rng_seed(&r, 7);
    int shapes[][3] = {{1, 5, 3}, {1, 33, 17}, {3, 64, 48}, {4, 13, 100},
                       {8, 40, 256}, {9, 7, 31}, {70, 65, 129}, {16, 48, 40}};
    kern_gemm *g = kern_gemm_fast_new();
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int T = shapes[si][0], R = shapes[si][1], K = shapes[si][2];
        float *w = malloc((size_t)R * K * 4), *x = malloc((size_t)T * K * 4);
        float *b = malloc((size_t)R * 4), *y = malloc((size_t)T * R * 4), *y2 = malloc((size_t)T * R * 4);
        for (int i = 0; i < R * K; i++) w[i] = kiln_rng_normal(&r);
        for (int i = 0; i < T * K; i++) x[i] = kiln_rng_normal(&r);
        for (int i = 0; i < R; i++) b[i] = kiln_rng_normal(&r);
        struct { kiln_dtype dt; kern_wlayout lay; } kinds[] = {
            {KILN_DTYPE_F32, KERN_W_OUT_IN}, {KILN_DTYPE_F32, KERN_W_IN_OUT},
            {KILN_DTYPE_BF16, KERN_W_OUT_IN}};
        for (int ki = 0; ki < 3; ki++)
            for (int bias = 0; bias < 2; bias++) {
                kern_wt src = {KILN_DTYPE_F32, kinds[ki].lay, R, K, w}, W;
                CHECK(kern_weight_prepare(kinds[ki].dt, &src, &W));
                for (int i = 0; i < T * R; i++) y[i] = y2[i] = NAN; /* overwritten */
                kern_ops_fast()->linear(g, y, x, T, &W, bias ? b : NULL);
                kern_ops_ref()->linear(NULL, y2, x, T, &W, bias ? b : NULL);
                double worst = 0;
                for (int i = 0; i < T * R; i++) worst = check_max(worst, fabs(y[i] - y2[i]));
                CHECK_MSG(worst < 1e-3, "T=%d R=%d K=%d dtype %d layout %d bias=%d: max diff %g",
                          T, R, K, kinds[ki].dt, kinds[ki].lay, bias, worst);
                kern_weight_free(&W);
            }
        free(w); free(x); free(b); free(y); free(y2);
    }
    kern_gemm_free(g);
}

/* Block-quantized weights (Q8_0, Q4_0, Q4_K, Q6_K). Decode-sized T: the
 * fast linear against the reference (the same integers: only the float
 * summation order differs), and both against the exact product of the
 * dequantized weights with the unquantized activations, within the bound
 * that 8-bit activations allow: each activation is off by at most half its
 * block's step, so a row's error is at most sum_b (sum |w_b|) * step_b / 2.
 * Prefill-sized T (>= 16): the fast path multiplies the dequantized
 * weights by the unquantized activations through the GEMM, so it equals
 * the exact product to fp32 rounding. */
static void test_linear_quantized(void)
{
    kiln_rng r;
    kiln_rng_seed(&r, 23);
    kiln_dtype types[] = {KILN_DTYPE_Q8_0, KILN_DTYPE_Q4_0, KILN_DTYPE_Q4_K, KILN_DTYPE_Q6_K};
    kern_gemm *g = kern_gemm_fast_new();
    /* K = 1376 (43 blocks of 32; a Llama MLP's down projection): the fast
     * kernels' groups of 16 blocks, then pairs, then one block alone (Q8_0
     * and Q4_0; the K-quants need multiples of 256) */
    int shapes[][3] = {{1, 7, 256}, {3, 33, 512}, {5, 16, 768}, {1, 64, 1024}, {9, 5, 256},
                       {16, 300, 256}, {37, 70, 512}, {1, 9, 1376}, {4, 6, 1376}};
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            kiln_dtype dt = types[ti];
            int T = shapes[si][0], R = shapes[si][1], K = shapes[si][2];
            if (K % dtype_traits_of(dt)->block) continue;
            float *w = malloc((size_t)R * K * 4), *x = malloc((size_t)T * K * 4);
            float *b = malloc((size_t)R * 4), *y = malloc((size_t)T * R * 4);
            float *y2 = malloc((size_t)T * R * 4), *wd = malloc((size_t)K * 4);
            for (int i = 0; i < R * K; i++) w[i] = kiln_rng_normal(&r) * (1 + i % 7);
            for (int i = 0; i < T * K; i++) x[i] = kiln_rng_normal(&r);
            for (int i = 0; i < R; i++) b[i] = kiln_rng_normal(&r);
            kern_wt src = {KILN_DTYPE_F32, KERN_W_OUT_IN, R, K, w}, W;
            CHECK(kern_weight_prepare(dt, &src, &W));
            CHECK_EQ(W.dtype, dt);
            kern_ops_fast()->linear(g, y, x, T, &W, b);
            kern_ops_ref()->linear(NULL, y2, x, T, &W, b);
            const dtype_traits *tr = dtype_traits_of(dt);
            size_t rb = dtype_row_bytes(dt, K);
            double worst_fr = 0, worst_b = 0, worst_g = 0;
            for (int t = 0; t < T; t++)
                for (int i = 0; i < R; i++) {
                    tr->to_float((const uint8_t *)W.data + rb * (size_t)i, wd, K);
                    const float *xt = x + (size_t)t * K;
                    double exact = b[i], bound = 0, mag = fabs(b[i]);
                    for (int bl = 0; bl < K / 32; bl++) {
                        double amax = 0, aw = 0;
                        for (int j = 0; j < 32; j++) {
                            amax = fmax(amax, fabs(xt[bl * 32 + j]));
                            aw += fabs(wd[bl * 32 + j]);
                            exact += (double)wd[bl * 32 + j] * xt[bl * 32 + j];
                            mag += fabs((double)wd[bl * 32 + j] * xt[bl * 32 + j]);
                        }
                        bound += aw * (amax / 127) / 2;
                    }
                    double yf = y[(size_t)t * R + i], yr = y2[(size_t)t * R + i];
                    worst_fr = check_max(worst_fr, fabs(yf - yr) / (mag + 1e-30));
                    /* fp32 rounding of the sums on top of the bound */
                    worst_b = check_max(worst_b, (fabs(yr - exact) - 1e-5 * mag) / (bound + 1e-30));
                    worst_g = check_max(worst_g, fabs(yf - exact) / (mag + 1e-30));
                }
            CHECK_MSG(worst_fr < 2e-6, "%s T=%d R=%d K=%d: fast vs ref %g (of the row's |terms|)",
                      tr->name, T, R, K, worst_fr);
            if (T >= KERN_GEMM_MIN_T) /* dequantized weights, fp32 activations */
                CHECK_MSG(worst_g < 2e-6, "%s T=%d R=%d K=%d: GEMM path vs exact %g (of |terms|)",
                          tr->name, T, R, K, worst_g);
            CHECK_MSG(worst_b <= 1.0, "%s T=%d R=%d K=%d: error %g of the 8-bit activation bound",
                      tr->name, T, R, K, worst_b);
            kern_weight_free(&W);
            free(w); free(x); free(b); free(y); free(y2); free(wd);
        }
    kern_gemm_free(g);
    /* rows that a K-quant's block does not divide fall back as llama.cpp's do */
    CHECK_EQ(kern_weight_dtype(KILN_DTYPE_Q4_K, 96), KILN_DTYPE_Q8_0);
    CHECK_EQ(kern_weight_dtype(KILN_DTYPE_Q6_K, 512), KILN_DTYPE_Q6_K);
    CHECK_EQ(kern_weight_dtype(KILN_DTYPE_Q4_0, 40), KILN_DTYPE_BF16);
    CHECK_EQ(kern_weight_dtype(KILN_DTYPE_BF16, 40), KILN_DTYPE_BF16);
}

/* An engine on block-quantized weights computes what its dequantized
 * weights compute, up to the 8-bit activations of the Q dot products:
 * the logits of a prefill against an fp32 engine on a model whose matrices
 * hold exactly the dequantized values (relative RMS error; measured about
 * 1.2% for every type, bound 2%), and the same greedy token at (nearly) every
 * position. */
static void test_engine_quantized(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = tiny_cfg(KILN_ARCH_LLAMA);
    c.n_embd = 256;
    c.n_inner = 512;
    kiln_model *m = NULL;
    CHECK(kiln_model_new(ctx, &c, &m) == KILN_OK);
    kiln_model_init_random(m, 31);
    float *p = kiln_model_params_mut(m);
    kiln_rng r;
    kiln_rng_seed(&r, 8);
    for (size_t i = 0; i < kiln_model_num_params(m); i++) p[i] += 0.02f * kiln_rng_normal(&r);
    enum { T = 20 };
    const int V = c.vocab_size;
    int32_t tok[T];
    for (int i = 0; i < T; i++) tok[i] = (i * 13 + 5) % V;
    kiln_dtype types[] = {KILN_DTYPE_Q8_0, KILN_DTYPE_Q4_0, KILN_DTYPE_Q4_K, KILN_DTYPE_Q6_K};
    float *lq = malloc(sizeof(float) * T * V), *lf = malloc(sizeof(float) * T * V);
    for (size_t ti = 0; ti < 4; ti++) {
        kiln_model *md = NULL;
        CHECK(kiln_model_new(ctx, &c, &md) == KILN_OK);
        float *pd = kiln_model_params_mut(md);
        memcpy(pd, p, kiln_model_num_params(m) * sizeof(float));
        /* every matrix (not the embedding table) rounded through the type */
        for (int i = 0; i < kiln_model_num_tensors(m); i++) {
            const kiln_tensor_info *t = kiln_model_tensor(m, i);
            if (t->ndim != 2 || strstr(t->name, "embed_tokens")) continue;
            int R = (int)t->shape[0], K = (int)t->shape[1];
            kern_wt src = {KILN_DTYPE_F32, KERN_W_OUT_IN, R, K, p + t->offset}, W;
            CHECK(kern_weight_prepare(types[ti], &src, &W));
            size_t rb = dtype_row_bytes(W.dtype, K);
            for (int row = 0; row < R; row++)
                dtype_traits_of(W.dtype)->to_float((const uint8_t *)W.data + rb * row,
                                                   pd + t->offset + (size_t)row * K, K);
            kern_weight_free(&W);
        }
        kiln_engine_opts o = kiln_engine_opts_default();
        o.chunk = T;
        o.wtype = types[ti];
        kiln_engine *eq = NULL, *ef = NULL;
        CHECK(kiln_engine_new(ctx, m, &o, &eq) == KILN_OK);
        o.wtype = KILN_DTYPE_F32;
        CHECK(kiln_engine_new(ctx, md, &o, &ef) == KILN_OK);
        CHECK(kiln_engine_weight_bytes(eq) * 3 < kiln_engine_weight_bytes(ef));
        kiln_engine_tok tk[T];
        for (int i = 0; i < T; i++) tk[i] = (kiln_engine_tok){0, tok[i], true};
        CHECK(kiln_engine_step(ctx, eq, tk, T, lq) == KILN_OK);
        CHECK(kiln_engine_step(ctx, ef, tk, T, lf) == KILN_OK);
        double se = 0, sr = 0;
        int agree = 0;
        for (int i = 0; i < T * V; i++) se += (double)(lq[i] - lf[i]) * (lq[i] - lf[i]), sr += (double)lf[i] * lf[i];
        for (int t = 0; t < T; t++) agree += argmax_f(lq + t * V, V) == argmax_f(lf + t * V, V);
        double rel = sqrt(se / sr);
        CHECK_MSG(rel < 0.02, "%s: relative RMS logit error %g vs the dequantized fp32 model",
                  kiln_dtype_name(types[ti]), rel);
        CHECK_MSG(agree >= T - 1, "%s: greedy token agrees at %d of %d positions",
                  kiln_dtype_name(types[ti]), agree, T);
        kiln_engine_free(eq);
        kiln_engine_free(ef);
        kiln_model_free(md);
    }
    free(lq); free(lf);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

/* An engine on a .gguf's stored types (kiln_engine_opts.weights_gguf)
 * holds the file's blocks: for a Q8_0 file (whose quantizer reproduces
 * its own blocks) its logits equal, bit for bit, those of an engine that
 * quantizes the model's dequantized weights to Q8_0 again; llama's q/k
 * rows, stored by llama.cpp in another order, come back in rope's. */
static void test_engine_gguf_stored(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = tiny_cfg(KILN_ARCH_LLAMA);
    c.n_embd = 256;
    c.n_inner = 512;
    c.vocab_size = 257;
    kiln_model *m = NULL, *mg = NULL;
    kiln_tokenizer *tok = NULL;
    CHECK(kiln_model_new(ctx, &c, &m) == KILN_OK);
    kiln_model_init_random(m, 41);
    float *p = kiln_model_params_mut(m);
    kiln_rng r;
    kiln_rng_seed(&r, 9);
    for (size_t i = 0; i < kiln_model_num_params(m); i++) p[i] += 0.05f * kiln_rng_normal(&r);
    char path[256];
    snprintf(path, sizeof path, "%s/test_infer_stored.gguf", getenv("KILN_TMP") ? getenv("KILN_TMP") : "/tmp");
    kiln_gguf_export_opts eo = kiln_gguf_export_opts_default();
    eo.type = "q8_0";
    CHECK(kiln_tokenizer_load(ctx, "bytes", &tok) == KILN_OK);
    kiln_status st = kiln_gguf_export(ctx, m, tok, path, &eo, NULL);
    CHECK_MSG(st == KILN_OK, "export: %s", kiln_errmsg(ctx));
    CHECK(kiln_model_load(ctx, path, &mg) == KILN_OK);
    enum { T = 20 };
    const int V = c.vocab_size;
    kiln_engine_opts o = kiln_engine_opts_default();
    o.chunk = T;
    kiln_engine *a = NULL, *b = NULL;
    o.weights_gguf = path;
    CHECK(mg && kiln_engine_new(ctx, mg, &o, &a) == KILN_OK);
    o.weights_gguf = NULL;
    o.wtype = KILN_DTYPE_Q8_0;
    CHECK(mg && kiln_engine_new(ctx, mg, &o, &b) == KILN_OK);
    if (a && b) {
        CHECK_EQ(kiln_engine_weight_bytes(a), kiln_engine_weight_bytes(b));
        kiln_engine_tok tk[T];
        for (int i = 0; i < T; i++) tk[i] = (kiln_engine_tok){0, (i * 29 + 3) % V, true};
        float *la = malloc(sizeof(float) * T * V), *lb = malloc(sizeof(float) * T * V);
        CHECK(kiln_engine_step(ctx, a, tk, T, la) == KILN_OK);
        CHECK(kiln_engine_step(ctx, b, tk, T, lb) == KILN_OK);
        CHECK_MSG(memcmp(la, lb, sizeof(float) * T * V) == 0,
                  "stored q8_0 blocks and requantized ones give different logits");
        /* and decode steps after the prefill */
        kiln_engine_tok one = {0, 5, true};
        CHECK(kiln_engine_step(ctx, a, &one, 1, la) == KILN_OK);
        CHECK(kiln_engine_step(ctx, b, &one, 1, lb) == KILN_OK);
        CHECK(memcmp(la, lb, sizeof(float) * V) == 0);
        free(la), free(lb);
    }
    kiln_engine_free(a), kiln_engine_free(b);
    kiln_model_free(m), kiln_model_free(mg);
    kiln_tokenizer_free(tok);
    remove(path);
    kiln_ctx_free(ctx);
}

/* rope_at and attention_kv (the engine's decode ops): fast against ref,
 * and rope_at at position p against rope at t = p (the training op): the
 * same arithmetic, so the same bits. */
static void test_decode_ops_match_reference(void)
{
    kiln_rng r;
    kiln_rng_seed(&r, 17);
    enum { NH = 4, KVH = 2, HS = 8, QKV = (NH + 2 * KVH) * HS, NCTX = 40, S = 3, T = 5 };
    const int KVD = KVH * HS, half = HS / 2;
    float *cs = malloc(sizeof(float) * NCTX * half), *sn = malloc(sizeof(float) * NCTX * half);
    for (int p = 0; p < NCTX; p++)
        for (int i = 0; i < half; i++) {
            cs[p * half + i] = cosf(p * powf(10000.0f, -2.0f * i / HS));
            sn[p * half + i] = sinf(p * powf(10000.0f, -2.0f * i / HS));
        }
    /* rope_at vs rope: a (1, NCTX) sequence rotated by rope equals each
     * row rotated at its position */
    float *a = malloc(sizeof(float) * NCTX * QKV), *b = malloc(sizeof(float) * NCTX * QKV);
    float *c = malloc(sizeof(float) * NCTX * QKV);
    for (int i = 0; i < NCTX * QKV; i++) a[i] = b[i] = c[i] = kiln_rng_normal(&r);
    int pos[NCTX];
    for (int i = 0; i < NCTX; i++) pos[i] = i;
    kern_ops_fast()->rope(a, cs, sn, 1, NCTX, NH, KVH, HS, false);
    kern_ops_fast()->rope_at(b, NCTX, QKV, pos, cs, sn, NH + KVH, HS);
    kern_ops_ref()->rope_at(c, NCTX, QKV, pos, cs, sn, NH + KVH, HS);
    CHECK(memcmp(a, b, sizeof(float) * NCTX * QKV) == 0);
    double worst = 0;
    for (int i = 0; i < NCTX * QKV; i++) worst = check_max(worst, fabs(b[i] - c[i]));
    CHECK_MSG(worst < 1e-6, "rope_at fast vs ref: %g", worst);
    /* attention_kv: T queries of different slots and positions */
    float *kc = malloc(sizeof(float) * S * NCTX * KVD), *vc = malloc(sizeof(float) * S * NCTX * KVD);
    for (int i = 0; i < S * NCTX * KVD; i++) kc[i] = kiln_rng_normal(&r), vc[i] = kiln_rng_normal(&r);
    int slot[T] = {0, 2, 1, 2, 0}, qpos[T] = {0, 7, 39, 8, 3};
    float *q = malloc(sizeof(float) * T * QKV), *o1 = malloc(sizeof(float) * T * NH * HS);
    float *o2 = malloc(sizeof(float) * T * NH * HS), *sc = malloc(sizeof(float) * T * NH * NCTX);
    for (int i = 0; i < T * QKV; i++) q[i] = kiln_rng_normal(&r);
    kern_ops_fast()->attention_kv(o1, q, QKV, T, slot, qpos, kc, vc, (size_t)NCTX * KVD, NH,
                                  KVH, HS, NCTX, sc);
    kern_ops_ref()->attention_kv(o2, q, QKV, T, slot, qpos, kc, vc, (size_t)NCTX * KVD, NH,
                                 KVH, HS, NCTX, sc);
    worst = 0;
    for (int i = 0; i < T * NH * HS; i++) worst = check_max(worst, fabs(o1[i] - o2[i]));
    CHECK_MSG(worst < 1e-5, "attention_kv fast vs ref: %g", worst);
    /* the first query attends to one position: its output is that value row */
    for (int h = 0; h < NH; h++)
        for (int i = 0; i < HS; i++)
            CHECK_NEAR(o1[h * HS + i], vc[(h / (NH / KVH)) * HS + i], 1e-6);
    free(cs); free(sn); free(a); free(b); free(c); free(kc); free(vc);
    free(q); free(o1); free(o2); free(sc);
}

/* The engine runs the model's own layer: an fp32 prefill of a fresh
 * sequence in one chunk gives the training forward's logits bit for bit,
 * both families (the same ops, in the same order, on the same weights). */
static void engine_equals_forward(kiln_arch arch)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = tiny_cfg(arch);
    kiln_model *m = NULL;
    CHECK(kiln_model_new(ctx, &c, &m) == KILN_OK);
    kiln_model_init_random(m, 5 + arch);
    float *p = kiln_model_params_mut(m);
    kiln_rng r;
    kiln_rng_seed(&r, 4);
    for (size_t i = 0; i < kiln_model_num_params(m); i++) p[i] += 0.05f * kiln_rng_normal(&r);
    enum { T = 24 };
    const int V = c.vocab_size;
    int32_t tok[T];
    for (int i = 0; i < T; i++) tok[i] = (i * 11 + 2) % V;
    float *ref = NULL;
    CHECK(kiln_model_forward(ctx, m, tok, 1, T, &ref) == KILN_OK);
    kiln_engine_opts o = kiln_engine_opts_default();
    o.chunk = T;
    kiln_engine *e = NULL;
    CHECK(kiln_engine_new(ctx, m, &o, &e) == KILN_OK);
    kiln_engine_tok tk[T];
    for (int i = 0; i < T; i++) tk[i] = (kiln_engine_tok){0, tok[i], true};
    float *lg = malloc(sizeof(float) * T * V);
    CHECK(kiln_engine_step(ctx, e, tk, T, lg) == KILN_OK);
    size_t differ = 0;
    double worst = 0;
    for (size_t i = 0; i < (size_t)T * V; i++) {
        differ += memcmp(&lg[i], &ref[i], sizeof(float)) != 0;
        worst = check_max(worst, fabs(lg[i] - ref[i]));
    }
    CHECK_MSG(differ == 0, "arch %d: %zu of %d logits differ from the training forward (max %g)",
              arch, differ, T * V, worst);
    free(lg);
    kiln_engine_free(e);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}
static void test_engine_equals_forward_gpt2(void) { engine_equals_forward(KILN_ARCH_GPT2); }
static void test_engine_equals_forward_llama(void) { engine_equals_forward(KILN_ARCH_LLAMA); }

/* kiln_engine_embed: the mean (and the last) of the final norm's rows
 * of the training forward (its activations a.lnfp), in chunks of 5 so that
 * the prompt takes several steps, in slot 1 of 2 whose cache it leaves
 * empty, without touching slot 0. */
static void engine_embed(kiln_arch arch)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = tiny_cfg(arch);
    kiln_model *m = NULL;
    CHECK(kiln_model_new(ctx, &c, &m) == KILN_OK);
    kiln_model_init_random(m, 7 + arch);
    float *p = kiln_model_params_mut(m);
    kiln_rng r;
    kiln_rng_seed(&r, 9);
    for (size_t i = 0; i < kiln_model_num_params(m); i++) p[i] += 0.05f * kiln_rng_normal(&r);
    enum { T = 17 };
    const int V = c.vocab_size, C = c.n_embd;
    int32_t tok[T];
    for (int i = 0; i < T; i++) tok[i] = (i * 5 + 1) % V;
    float *lg = NULL;
    CHECK(kiln_model_forward(ctx, m, tok, 1, T, &lg) == KILN_OK);
    const float *lnf = m->a.lnfp; /* fp32: the f32 backend's acts are fp32 rows */
    kiln_engine_opts o = kiln_engine_opts_default();
    o.n_slots = 2;
    o.chunk = 5;
    kiln_engine *e = NULL;
    CHECK(kiln_engine_new(ctx, m, &o, &e) == KILN_OK);
    CHECK(kiln_engine_prefill(ctx, e, 0, tok, 3, NULL) == KILN_OK);
    float *mean = malloc(sizeof(float) * C), *last = malloc(sizeof(float) * C);
    CHECK(kiln_engine_embed(ctx, e, 1, tok, T, KILN_POOLING_MEAN, mean) == KILN_OK);
    CHECK_EQ(kiln_engine_pos(e, 1), 0);
    CHECK(kiln_engine_embed(ctx, e, 1, tok, T, KILN_POOLING_LAST, last) == KILN_OK);
    CHECK_EQ(kiln_engine_pos(e, 1), 0);
    CHECK_EQ(kiln_engine_pos(e, 0), 3);
    double wm = 0, wl = 0, norm = 0;
    for (int i = 0; i < C; i++) {
        double s = 0;
        for (int t = 0; t < T; t++) s += lnf[(size_t)t * C + i];
        wm = check_max(wm, fabs(mean[i] - s / T));
        wl = check_max(wl, fabs(last[i] - lnf[(size_t)(T - 1) * C + i]));
        norm += s / T * (s / T);
    }
    CHECK_MSG(norm > 1e-3, "arch %d: the reference embedding is ~0 (|v|^2 = %g)", arch, norm);
    CHECK_MSG(wm < 1e-4, "arch %d: max |embed mean - forward| = %g", arch, wm);
    CHECK_MSG(wl < 1e-4, "arch %d: max |embed last - forward| = %g", arch, wl);
    /* errors leave the engine as it was */
    CHECK(kiln_engine_embed(ctx, e, 2, tok, T, KILN_POOLING_MEAN, mean) == KILN_ERR_RANGE);
    CHECK(kiln_engine_embed(ctx, e, 1, tok, 0, KILN_POOLING_MEAN, mean) == KILN_ERR_INVALID_ARG);
    CHECK(kiln_engine_embed(ctx, e, 1, tok, T, (kiln_pooling)7, mean) == KILN_ERR_INVALID_ARG);
    CHECK_EQ(kiln_engine_pos(e, 0), 3);
    free(mean); free(last);
    kiln_engine_free(e);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}
static void test_engine_embed_gpt2(void) { engine_embed(KILN_ARCH_GPT2); }
static void test_engine_embed_llama(void) { engine_embed(KILN_ARCH_LLAMA); }

static kiln_engine *mk(kiln_arch arch, store *s, int slots, int chunk, kiln_dtype wt)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = tiny_cfg(arch);
    kiln_engine_opts o = kiln_engine_opts_default();
    o.n_slots = slots;
    o.chunk = chunk;
    o.wtype = wt;
    kiln_engine *e = NULL;
    kiln_model *m = store_model(ctx, s, &c);
    kiln_status st = m ? kiln_engine_new(ctx, m, &o, &e) : KILN_ERR_FORMAT;
    CHECK_MSG(st == KILN_OK, "engine_new: %s", kiln_errmsg(ctx));
    kiln_model_free(m); /* the engine keeps its own prepared copy */
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
    bool gemm_row[48] = {0};
    KILN_ASSERT(maxn <= 48);
    float *lg = malloc(sizeof(float) * V);
    /* logits at several prefix lengths n: prefill n tokens from empty */
    for (int n = 1; n <= maxn; n += 4) {
        kiln_engine_reset(e, 0);
        CHECK(kiln_engine_prefill(ctx, e, 0, tok, n, lg) == KILN_OK);
        /* the prompt goes in steps of up to chunk rows; a step of
         * KERN_GEMM_MIN_T rows or more is prefill-sized (the GEMM) */
        for (int t0 = 0; t0 < n; t0 += chunk) {
            int rows = n - t0 < chunk ? n - t0 : chunk;
            for (int t = t0; t < t0 + rows; t++) gemm_row[t] = rows >= KERN_GEMM_MIN_T;
        }
        ref_forward(&s, &c, tok, n, ref, wt == KILN_DTYPE_BF16, gemm_row);
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
        ref_forward(&s, &c, seq, n, ref, false, NULL);
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
    /* a weight dtype the engine does not store names the field and type */
    kiln_engine *e2 = NULL;
    kiln_engine_opts o = kiln_engine_opts_default();
    o.wtype = KILN_DTYPE_Q5_0;
    kiln_model *m = store_model(ctx, &s, &c);
    CHECK(m && kiln_engine_new(ctx, m, &o, &e2) == KILN_ERR_INVALID_ARG);
    kiln_model_free(m);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_engine_opts.wtype") != NULL);
    CHECK(strstr(kiln_errmsg(ctx), "q5_0") != NULL);
    CHECK(e2 == NULL);
    /* the deprecated aliases are the one dtype's values */
    CHECK_EQ(KILN_WTYPE_F32, KILN_DTYPE_F32);
    CHECK_EQ(KILN_WTYPE_BF16, KILN_DTYPE_BF16);
    free(t); free(lg);
    kiln_ctx_free(ctx);
    kiln_engine_free(e);
    store_free(&s);
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
    RUN_TEST(test_linear_quantized);
    RUN_TEST(test_engine_quantized);
    RUN_TEST(test_engine_gguf_stored);
    RUN_TEST(test_decode_ops_match_reference);
    RUN_TEST(test_engine_equals_forward_gpt2);
    RUN_TEST(test_engine_equals_forward_llama);
    RUN_TEST(test_engine_embed_gpt2);
    RUN_TEST(test_engine_embed_llama);
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
