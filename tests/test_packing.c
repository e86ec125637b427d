/*
 * test_packing.c — packed rows with document-aware attention
 * (kiln_model_forward_pos, kernels.h kern_attention_doc_fwd / _bwd):
 *   - the document-masked attention of the ref and fast tables against a
 *     naive double-precision attention with the block-diagonal causal mask
 *     (token t sees u <= t of its own document), forward (out, lse) and
 *     backward (dqkv), GQA, documents of 1 token up to a whole row;
 *   - whole models (gpt2: learned positions; llama: RoPE, GQA), fp32: the
 *     same conversations packed several to a row and one per padded row
 *     give the same loss and the same gradient of every parameter
 *     (<= 1e-5 relative to the largest gradient);
 *   - rows that each hold one document (pos 0..T-1): forward_pos gives
 *     kiln_model_forward's logits and gradients;
 *   - bf16 (where the CPU has the AMX attention): packed rows run on the
 *     backend's own attention by document (mp.attention_doc_fwd, the AMX
 *     kernel as unpacked rows use); packed and unpacked give the same loss
 *     (<= 1e-6) and gradients (<= 1e-5 of the largest); with the portable
 *     bf16 kernel (no bf16 attention) packed rows take kern_ops' fp32
 *     attention by document on the rounded values, as unpacked rows take
 *     it whole, with the same bounds;
 *   - positions that do not describe documents are refused, naming the
 *     row and position.
 */
#include "check.h"
#include "kiln.h"
#include "kernels/kernels.h"
#include "model/model.h"

static kiln_rng rng;

static float *rnd(size_t n, float scale)
{
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = scale * kiln_rng_normal(&rng);
    return p;
}

/* Positions of rows laid out by document lengths (len[0..nd), summing to
 * B*T, no document across a row's end). */
static void positions(int32_t *pos, const int *len, int nd)
{
    size_t i = 0;
    for (int d = 0; d < nd; d++)
        for (int j = 0; j < len[d]; j++) pos[i++] = j;
}

/* Naive attention in double where query t of row b sees key u iff u <= t
 * and both lie in the same document (doc ids counted from pos == 0
 * starts); backward from dout and the kernel's float out / lse. */
static void naive_doc(const float *qkv, const int32_t *pos, const float *dout, const float *outf,
                      const float *lsef, int B, int T, int NH, int KVH, int HS, double *out,
                      double *lse, double *dqkv)
{
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, grp = NH / KVH;
    double scale = 1.0 / sqrt((double)HS);
    int *doc = malloc((size_t)B * T * sizeof *doc);
    double *s = malloc((size_t)T * sizeof *s);
    for (int i = 0, d = -1; i < B * T; i++) doc[i] = d += pos[i] == 0;
    for (size_t i = 0; i < (size_t)B * T * S; i++) dqkv[i] = 0;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            int kh = h / grp;
            for (int t = 0; t < T; t++) {
                size_t rt = (size_t)b * T + t;
                const float *q = qkv + rt * S + h * HS;
                double mx = -INFINITY, sum = 0;
                for (int u = 0; u <= t; u++) {
                    s[u] = -INFINITY;
                    if (doc[(size_t)b * T + u] != doc[rt]) continue; /* the mask */
                    const float *k = qkv + ((size_t)b * T + u) * S + (NH + kh) * HS;
                    double dot = 0;
                    for (int i = 0; i < HS; i++) dot += (double)q[i] * k[i];
                    s[u] = dot * scale;
                    mx = fmax(mx, s[u]);
                }
                for (int u = 0; u <= t; u++) sum += exp(s[u] - mx);
                size_t li = ((size_t)b * NH + h) * T + t, oi = rt * OC + h * HS;
                lse[li] = mx + log(sum);
                for (int i = 0; i < HS; i++) out[oi + i] = 0;
                double D = 0;
                for (int i = 0; i < HS; i++) D += (double)dout[oi + i] * outf[oi + i];
                for (int u = 0; u <= t; u++) {
                    if (s[u] == -INFINITY) continue;
                    size_t ku = ((size_t)b * T + u) * S + (NH + kh) * HS;
                    size_t vu = ((size_t)b * T + u) * S + (NH + KVH + kh) * HS;
                    double p = exp(s[u] - mx) / sum, pf = exp(s[u] - (double)lsef[li]), dp = 0;
                    for (int i = 0; i < HS; i++) {
                        out[oi + i] += p * qkv[vu + i];
                        dp += (double)dout[oi + i] * qkv[vu + i];
                    }
                    double ds = pf * (dp - D) * scale;
                    for (int i = 0; i < HS; i++) {
                        dqkv[vu + i] += pf * dout[oi + i];
                        dqkv[ku + i] += ds * q[i];
                        dqkv[rt * S + h * HS + i] += ds * qkv[ku + i];
                    }
                }
            }
        }
    free(s);
    free(doc);
}

static double maxdiff_d(const float *a, const double *b, size_t n, double *scale)
{
    double d = 0, s = 1;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs(b[i]));
        if (a[i] != a[i]) d = INFINITY;
    }
    *scale = s;
    return d;
}

static void test_doc_attention_vs_naive(void)
{
    kiln_rng_seed(&rng, 7);
    /* row 0: 5 + 1 + 8 + 6; row 1: one document of 20; row 2: 1 + 19;
     * row 3: 3 + 17 (T = 20 crosses no 16/64-row tile evenly) */
    const int lens[] = {5, 1, 8, 6, 20, 1, 19, 3, 17};
    const int B = 4, T = 20;
    const int shapes[][3] = {{4, 2, 8}, {2, 2, 16}, {4, 1, 32}}; /* NH, KVH, HS */
    const kern_ops *tables[] = {kern_ops_ref(), kern_ops_fast()};
    kern_gemm *gemms[] = {kern_gemm_ref(), kern_gemm_ref()};
    int32_t pos[4 * 20];
    positions(pos, lens, (int)(sizeof lens / sizeof lens[0]));
    for (int sh = 0; sh < 3; sh++) {
        int NH = shapes[sh][0], KVH = shapes[sh][1], HS = shapes[sh][2];
        size_t S = (size_t)(NH + 2 * KVH) * HS, nq = (size_t)B * T * S, no = (size_t)B * T * NH * HS;
        size_t nl = (size_t)B * NH * T;
        float *qkv = rnd(nq, 1.0f), *dout = rnd(no, 1.0f);
        for (int ti = 0; ti < 2; ti++) {
            const kern_ops *k = tables[ti];
            float *out = malloc(no * 4), *lse = malloc(nl * 4), *dq = malloc(nq * 4);
            float *scratch = malloc((size_t)NH * T * 4);
            double *ro = malloc(no * 8), *rl = malloc(nl * 8), *rd = malloc(nq * 8);
            kern_attention_doc_fwd(k, gemms[ti], out, lse, qkv, pos, B, T, NH, KVH, HS, scratch);
            kern_attention_doc_bwd(k, gemms[ti], dq, dout, qkv, out, lse, pos, B, T, NH, KVH, HS,
                                   scratch);
            naive_doc(qkv, pos, dout, out, lse, B, T, NH, KVH, HS, ro, rl, rd);
            double sc, d;
            d = maxdiff_d(out, ro, no, &sc);
            CHECK_MSG(d <= 1e-5 * sc, "%s HS%d out: %g", k->name, HS, d);
            d = maxdiff_d(lse, rl, nl, &sc);
            CHECK_MSG(d <= 1e-5 * sc, "%s HS%d lse: %g", k->name, HS, d);
            d = maxdiff_d(dq, rd, nq, &sc);
            CHECK_MSG(d <= 2e-5 * sc, "%s HS%d dqkv: %g", k->name, HS, d);
            free(out), free(lse), free(dq), free(scratch), free(ro), free(rl), free(rd);
        }
        free(qkv), free(dout);
    }
}

/* ---- whole models ------------------------------------------------------ */

static kiln_config cfg_of(kiln_arch arch)
{
    kiln_config c = kiln_config_default();
    c.arch = arch;
    c.n_layer = 2;
    c.n_embd = 16;
    c.n_head = 4;
    c.n_kv_head = arch == KILN_ARCH_GPT2 ? 4 : 2;
    c.n_inner = 32;
    c.vocab_size = 23;
    c.n_ctx = 32;
    c.norm_eps = 1e-5f;
    c.rope_theta = 1000.0f;
    c.tie_embeddings = arch == KILN_ARCH_GPT2;
    c.bias = true;
    c.bos_token_id = c.eos_token_id = 22;
    return c;
}

/* The loss sum, weight and gradient of rows (B, T) of tokens / targets,
 * packed (pos) or not (pos NULL). */
static void run(kiln_ctx *ctx, kiln_model *m, const int32_t *tok, const int32_t *tgt,
                const int32_t *pos, int B, int T, double *loss, double *weight, float *grad,
                float *logits_out)
{
    float *logits;
    kiln_model_zero_grad(m);
    CHECK_EQ(kiln_model_forward_pos(ctx, m, tok, pos, B, T, &logits), KILN_OK);
    if (logits_out)
        memcpy(logits_out, logits, (size_t)B * T * kiln_model_config(m)->vocab_size * 4);
    *loss = *weight = 0;
    CHECK_EQ(kiln_model_backward_ce(ctx, m, tgt, NULL, 1.0f, loss, weight), KILN_OK);
    memcpy(grad, kiln_model_grads(m), kiln_model_num_params(m) * sizeof(float));
}

static void packed_equals_unpacked(kiln_arch arch)
{
    kiln_rng_seed(&rng, 11 + arch);
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, 2);
    kiln_config c = cfg_of(arch);
    kiln_model *m;
    CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
    kiln_model_init_random(m, 5);
    /* conversations of n tokens (n-1 positions): inputs ids[0..n-1),
     * targets ids[1..n), the first third of each unlearned (a prompt) */
    enum { ND = 7, TU = 12, TP = 24 };
    const int n[ND] = {13, 5, 9, 2, 8, 11, 6};
    int32_t ids[ND][13];
    for (int d = 0; d < ND; d++)
        for (int j = 0; j < n[d]; j++) ids[d][j] = (int32_t)kiln_rng_below(&rng, 22);
    /* unpacked: one per row, padded (token 22, target -1) */
    int32_t ut[ND * TU], ug[ND * TU];
    for (int d = 0; d < ND; d++)
        for (int j = 0; j < TU; j++) {
            bool in = j < n[d] - 1;
            ut[d * TU + j] = in ? ids[d][j] : 22;
            ug[d * TU + j] = in && j >= (n[d] - 1) / 3 ? ids[d][j + 1] : -1;
        }
    /* packed, first fit in order: row 0 = 12 + 4 + 8 (24); row 1 = 1 + 7 +
     * 10 + 5, then one padding document of 1 */
    int32_t pt[2 * TP], pg[2 * TP], pp[2 * TP];
    int order[ND] = {0, 1, 2, 3, 4, 5, 6}, at = 0;
    for (int oi = 0; oi < ND; oi++) {
        int d = order[oi], L = n[d] - 1;
        for (int j = 0; j < L; j++, at++) {
            pt[at] = ids[d][j];
            pg[at] = j >= L / 3 ? ids[d][j + 1] : -1;
            pp[at] = j;
        }
    }
    CHECK_EQ(at, 2 * TP - 1);
    pt[at] = 22, pg[at] = -1, pp[at] = 0; /* padding: a document of its own */
    size_t np = kiln_model_num_params(m);
    float *gu = malloc(np * 4), *gp = malloc(np * 4);
    double lu, wu, lp, wp;
    run(ctx, m, ut, ug, NULL, ND, TU, &lu, &wu, gu, NULL);
    run(ctx, m, pt, pg, pp, 2, TP, &lp, &wp, gp, NULL);
    CHECK(wu == wp && wu > 20);
    CHECK_MSG(fabs(lu / wu - lp / wp) <= 1e-6 * fabs(lu / wu), "loss %.9g vs %.9g", lu / wu,
              lp / wp);
    double sc, d = check_maxdiff(gp, gu, np, &sc), gmax = 0;
    for (size_t i = 0; i < np; i++) gmax = fmax(gmax, fabs(gu[i]));
    CHECK_MSG(d <= 1e-5 * gmax && gmax > 0, "max grad diff %g (largest %g)", d, gmax);
    /* the mask matters: the same packed rows under a plain causal mask
     * (pos NULL) give another loss */
    double lc, wc;
    run(ctx, m, pt, pg, NULL, 2, TP, &lc, &wc, gp, NULL);
    CHECK_MSG(fabs(lc - lp) > 1e-4 * fabs(lp), "causal %.9g vs packed %.9g", lc, lp);
    free(gu);
    free(gp);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

static void test_packed_equals_unpacked_gpt2(void) { packed_equals_unpacked(KILN_ARCH_GPT2); }

/* bf16 with bf16 activations on the AMX attention (HS 32): the packed
 * rows take the backend's document attention. */
static void packed_bf16(kiln_arch arch, kiln_bf16_kernel kern)
{
    kiln_rng_seed(&rng, 17 + arch);
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, 2);
    kiln_config c = cfg_of(arch);
    c.n_embd = 64, c.n_head = 2, c.n_kv_head = arch == KILN_ARCH_GPT2 ? 2 : 1, c.n_inner = 128;
    c.n_ctx = 64;
    kiln_model *m;
    CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
    kiln_precision_opts po = kiln_precision_opts_default();
    po.precision = KILN_PRECISION_BF16;
    po.bf16_kernel = kern;
    CHECK_EQ(kiln_model_set_precision_opts(ctx, m, &po), KILN_OK);
    kiln_model_init_random(m, 5);
    /* AMX: the backend's document attention; REF: none (kern_ops' fp32
     * attention by document on the bf16-rounded values) */
    bool amx = kern == KILN_BF16_KERNEL_AMX;
    if (!model_bf16_acts(m) || (amx && (!m->be->mp.attention_doc_fwd ||
                                        !m->be->mp.attention_ok(m->be, 32, 24) ||
                                        !m->be->mp.attention_ok(m->be, 32, 48))) ||
        (!amx && m->be->mp.attention_ok(m->be, 32, 48))) {
        kiln_model_free(m);
        kiln_ctx_free(ctx);
        SKIP("no bf16 attention with documents on this CPU (needs AMX)");
    }
    enum { ND = 5, TU = 24, TP = 48 }; /* T the AMX attention takes */
    const int n[ND] = {25, 17, 3, 21, 12}; /* 24 + 16 + 2, pad 6 | 20 + 11, pad 17 */
    int32_t ut[ND * TU], ug[ND * TU], pt[2 * TP], pg[2 * TP], pp[2 * TP];
    int at = 0;
    for (int d = 0; d < ND; d++) {
        int L = n[d] - 1;
        int32_t ids[25];
        for (int j = 0; j < n[d]; j++) ids[j] = (int32_t)kiln_rng_below(&rng, 22);
        if (d == 3) at = TP; /* the second row */
        for (int j = 0; j < TU; j++) {
            ut[d * TU + j] = j < L ? ids[j] : 22;
            ug[d * TU + j] = j < L ? ids[j + 1] : -1;
        }
        for (int j = 0; j < L; j++, at++) pt[at] = ids[j], pg[at] = ids[j + 1], pp[at] = j;
        if (d == 2)
            for (int j = 0; at < TP; j++, at++) pt[at] = 22, pg[at] = -1, pp[at] = j;
    }
    for (int j = 0; at < 2 * TP; j++, at++) pt[at] = 22, pg[at] = -1, pp[at] = j;
    size_t np = kiln_model_num_params(m);
    float *gu = malloc(np * 4), *gp = malloc(np * 4);
    double lu, wu, lp, wp;
    run(ctx, m, ut, ug, NULL, ND, TU, &lu, &wu, gu, NULL);
    run(ctx, m, pt, pg, pp, 2, TP, &lp, &wp, gp, NULL);
    CHECK(wu == wp && wu == 73);
    CHECK_MSG(fabs(lu / wu - lp / wp) <= 1e-6 * fabs(lu / wu), "loss %.9g vs %.9g", lu / wu,
              lp / wp);
    double sc, d = check_maxdiff(gp, gu, np, &sc), gmax = 0;
    for (size_t i = 0; i < np; i++) gmax = fmax(gmax, fabs(gu[i]));
    CHECK_MSG(d <= 1e-5 * gmax && gmax > 0, "max grad diff %g (largest %g)", d, gmax);
    fprintf(stderr, "  bf16 arch %d: loss %.9g vs %.9g, grad diff %.3g of %.3g\n", (int)arch,
            lu / wu, lp / wp, d, gmax);
    double lc, wc;
    run(ctx, m, pt, pg, NULL, 2, TP, &lc, &wc, gp, NULL);
    CHECK_MSG(fabs(lc - lp) > 1e-3 * fabs(lp), "causal %.9g vs packed %.9g", lc, lp);
    free(gu);
    free(gp);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

static void test_packed_bf16_gpt2(void) { packed_bf16(KILN_ARCH_GPT2, KILN_BF16_KERNEL_AMX); }
static void test_packed_bf16_llama(void) { packed_bf16(KILN_ARCH_LLAMA, KILN_BF16_KERNEL_AMX); }
static void test_packed_bf16_ref_gpt2(void) { packed_bf16(KILN_ARCH_GPT2, KILN_BF16_KERNEL_REF); }
static void test_packed_bf16_ref_llama(void) { packed_bf16(KILN_ARCH_LLAMA, KILN_BF16_KERNEL_REF); }
static void test_packed_equals_unpacked_llama(void) { packed_equals_unpacked(KILN_ARCH_LLAMA); }

/* Rows of one document each: the packed path is the unpacked one. */
static void test_one_document_per_row(void)
{
    for (int a = 0; a < 2; a++) {
        kiln_arch arch = a ? KILN_ARCH_LLAMA : KILN_ARCH_GPT2;
        kiln_rng_seed(&rng, 3);
        kiln_ctx *ctx = kiln_ctx_new();
        kiln_set_threads(ctx, 2);
        kiln_config c = cfg_of(arch);
        kiln_model *m;
        CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
        kiln_model_init_random(m, 9);
        enum { B = 3, T = 17 };
        int32_t tok[B * T], tgt[B * T], pos[B * T];
        for (int i = 0; i < B * T; i++) {
            tok[i] = (int32_t)kiln_rng_below(&rng, 23);
            tgt[i] = i % 5 ? (int32_t)kiln_rng_below(&rng, 23) : -1;
            pos[i] = i % T;
        }
        size_t np = kiln_model_num_params(m), nl = (size_t)B * T * 23;
        float *g1 = malloc(np * 4), *g2 = malloc(np * 4), *l1 = malloc(nl * 4), *l2 = malloc(nl * 4);
        double a1, w1, a2, w2, sc;
        run(ctx, m, tok, tgt, NULL, B, T, &a1, &w1, g1, l1);
        run(ctx, m, tok, tgt, pos, B, T, &a2, &w2, g2, l2);
        CHECK_MSG(check_maxdiff(l2, l1, nl, &sc) <= 1e-6 * sc, "arch %d logits", a);
        CHECK_MSG(fabs(a1 - a2) <= 1e-6 * fabs(a1), "arch %d loss %.9g vs %.9g", a, a1, a2);
        double d = check_maxdiff(g2, g1, np, &sc);
        CHECK_MSG(d <= 1e-6 * sc, "arch %d grads %g", a, d);
        free(g1), free(g2), free(l1), free(l2);
        kiln_model_free(m);
        kiln_ctx_free(ctx);
    }
}

static void test_bad_positions(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_config c = cfg_of(KILN_ARCH_LLAMA);
    kiln_model *m;
    CHECK_EQ(kiln_model_new(ctx, &c, &m), KILN_OK);
    kiln_model_init_random(m, 1);
    int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    int32_t bad1[8] = {0, 1, 2, 3, 1, 2, 3, 4}; /* 3 then 1; as 2 rows, row 1 starts at 1 */
    int32_t bad2[8] = {0, 1, 2, 3, 2, 3, 0, 1}; /* row 1 starts at 2 */
    float *logits;
    CHECK_EQ(kiln_model_forward_pos(ctx, m, tok, bad1, 2, 4, &logits), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "batch row 1, position 0 holds 1") != NULL);
    CHECK_EQ(kiln_model_forward_pos(ctx, m, tok, bad1, 1, 8, &logits), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "batch row 0, position 4 holds 1") != NULL);
    CHECK_EQ(kiln_model_forward_pos(ctx, m, tok, bad2, 2, 4, &logits), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "batch row 1, position 0 holds 2") != NULL);
    kiln_model_free(m);
    kiln_ctx_free(ctx);
}

int main(void)
{
    RUN_TEST(test_doc_attention_vs_naive);
    RUN_TEST(test_packed_equals_unpacked_gpt2);
    RUN_TEST(test_packed_equals_unpacked_llama);
    RUN_TEST(test_packed_bf16_gpt2);
    RUN_TEST(test_packed_bf16_llama);
    RUN_TEST(test_packed_bf16_ref_gpt2);
    RUN_TEST(test_packed_bf16_ref_llama);
    RUN_TEST(test_one_document_per_row);
    RUN_TEST(test_bad_positions);
    return TEST_EXIT();
}
