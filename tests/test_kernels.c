/*
 * test_kernels.c — every fast kernel (kernels/x86 + kernels/onednn)
 * against the reference kernels (kernels/ref) on random inputs with sizes
 * that exercise vector tails and partial causal blocks. Tolerance: max
 * |fast - ref| <= 2e-5 * max(1, max |ref|) per output.
 */
#include "check.h"
#include "kiln.h"
#include "kernels/kernels.h"

#include <stdlib.h>

static kiln_rng rng;

static float *rnd(size_t n, float scale)
{
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = scale * kiln_rng_normal(&rng);
    return p;
}

static float *dup(const float *x, size_t n)
{
    float *p = malloc(n * sizeof(float));
    memcpy(p, x, n * sizeof(float));
    return p;
}

#define SAME(fast, ref, n, what)                                                   \
    do {                                                                           \
        double sc_, d_ = check_maxdiff(fast, ref, n, &sc_);                               \
        CHECK_MSG(d_ <= 2e-5 * sc_, "%s: max diff %g (scale %g)", what, d_, sc_);  \
    } while (0)

static void test_gemm(void)
{
    kern_gemm *f = kern_gemm_fast_new(), *r = kern_gemm_ref();
    const int sz[][3] = {{1, 1, 1}, {7, 13, 5}, {33, 17, 70}, {64, 96, 128}, {130, 65, 31}};
    for (int s = 0; s < 5; s++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int v = 0; v < 3; v++) {
                    int M = sz[s][0], N = sz[s][1], K = sz[s][2];
                    int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
                    float alpha = v == 2 ? 0.37f : 1.0f, beta = v == 0 ? 0.0f : 1.0f;
                    float *A = rnd((size_t)(ta ? K : M) * lda, 1), *B = rnd((size_t)(tb ? N : K) * ldb, 1);
                    float *C1 = rnd((size_t)M * ldc, 1), *C2 = dup(C1, (size_t)M * ldc);
                    if (beta == 0.0f) C1[0] = C2[0] = NAN; /* must not propagate */
                    f->gemm(f, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C1, ldc);
                    r->gemm(r, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C2, ldc);
                    char what[96];
                    snprintf(what, sizeof what, "%s gemm ta=%d tb=%d %dx%dx%d a=%g b=%g", f->name,
                             ta, tb, M, N, K, alpha, beta);
                    SAME(C1, C2, (size_t)M * ldc, what);
                    /* the nested (inside a parallel region) path too */
                    float *C3 = dup(C2, (size_t)M * ldc);
                    memcpy(C1, C3, (size_t)M * ldc * sizeof(float));
#pragma omp parallel num_threads(2)
                    {
#pragma omp single
                        f->gemm(f, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C1, ldc);
                    }
                    r->gemm(r, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C3, ldc);
                    SAME(C1, C3, (size_t)M * ldc, what);
                    free(A); free(B); free(C1); free(C2); free(C3);
                }
    kern_gemm_free(f);
}

static void test_matmul(void)
{
    const kern_ops *F = kern_ops_fast(), *R = kern_ops_ref();
    kern_gemm *gf = kern_gemm_fast_new(), *gr = kern_gemm_ref();
    int N = 37, C = 45, OC = 51;
    for (int lay = 0; lay < 2; lay++)
        for (int acc = 0; acc < 2; acc++) {
            float *x = rnd((size_t)N * C, 1), *w = rnd((size_t)C * OC, 1), *b = rnd(OC, 1);
            float *o1 = rnd((size_t)N * OC, 1), *o2 = dup(o1, (size_t)N * OC);
            F->matmul_fwd(gf, o1, x, w, b, N, C, OC, (kern_wlayout)lay);
            R->matmul_fwd(gr, o2, x, w, b, N, C, OC, (kern_wlayout)lay);
            SAME(o1, o2, (size_t)N * OC, "matmul_fwd");
            float *d = rnd((size_t)N * OC, 1);
            float *dx1 = rnd((size_t)N * C, 1), *dx2 = dup(dx1, (size_t)N * C);
            float *dw1 = rnd((size_t)C * OC, 1), *dw2 = dup(dw1, (size_t)C * OC);
            float *db1 = rnd(OC, 1), *db2 = dup(db1, OC);
            F->matmul_bwd(gf, dx1, dw1, db1, d, x, w, N, C, OC, (kern_wlayout)lay, acc);
            R->matmul_bwd(gr, dx2, dw2, db2, d, x, w, N, C, OC, (kern_wlayout)lay, acc);
            SAME(dx1, dx2, (size_t)N * C, "matmul_bwd dinp");
            SAME(dw1, dw2, (size_t)C * OC, "matmul_bwd dw");
            SAME(db1, db2, OC, "matmul_bwd db");
            free(x); free(w); free(b); free(o1); free(o2); free(d);
            free(dx1); free(dx2); free(dw1); free(dw2); free(db1); free(db2);
        }
    kern_gemm_free(gf);
}

static void test_elementwise(void)
{
    const kern_ops *F = kern_ops_fast(), *R = kern_ops_ref();
    int N = 300, C = 99, Fd = 77; /* N*C > the threading threshold */
    float *x = rnd((size_t)N * C, 3), *w = rnd(C, 1), *b = rnd(C, 1), *d = rnd((size_t)N * C, 1);
    float *o1 = malloc((size_t)N * C * 4), *o2 = malloc((size_t)N * C * 4);
    float m1[300], m2[300], s1[300], s2[300];
    F->layernorm_fwd(o1, m1, s1, x, w, b, N, C, 1e-5f);
    R->layernorm_fwd(o2, m2, s2, x, w, b, N, C, 1e-5f);
    SAME(o1, o2, (size_t)N * C, "layernorm_fwd");
    SAME(s1, s2, N, "layernorm_fwd rstd");
    float *dx1 = rnd((size_t)N * C, 1), *dx2 = dup(dx1, (size_t)N * C);
    float *dw1 = rnd(C, 1), *dw2 = dup(dw1, C), *db1 = rnd(C, 1), *db2 = dup(db1, C);
    F->layernorm_bwd(dx1, dw1, db1, d, x, w, m2, s2, N, C);
    R->layernorm_bwd(dx2, dw2, db2, d, x, w, m2, s2, N, C);
    SAME(dx1, dx2, (size_t)N * C, "layernorm_bwd dinp");
    SAME(dw1, dw2, C, "layernorm_bwd dw");
    SAME(db1, db2, C, "layernorm_bwd db");
    F->rmsnorm_fwd(o1, s1, x, w, N, C, 1e-6f);
    R->rmsnorm_fwd(o2, s2, x, w, N, C, 1e-6f);
    SAME(o1, o2, (size_t)N * C, "rmsnorm_fwd");
    F->rmsnorm_bwd(dx1, dw1, d, x, w, s2, N, C);
    R->rmsnorm_bwd(dx2, dw2, d, x, w, s2, N, C);
    SAME(dx1, dx2, (size_t)N * C, "rmsnorm_bwd dinp");
    SAME(dw1, dw2, C, "rmsnorm_bwd dw");
    size_t n = (size_t)N * C;
    F->gelu_fwd(o1, x, n);
    R->gelu_fwd(o2, x, n);
    SAME(o1, o2, n, "gelu_fwd");
    F->gelu_bwd(dx1, x, d, n);
    R->gelu_bwd(dx2, x, d, n);
    SAME(dx1, dx2, n, "gelu_bwd");
    /* swiglu: x viewed as (N', 2F) */
    int Ns = (int)(n / (2 * Fd));
    F->swiglu_fwd(o1, x, Ns, Fd);
    R->swiglu_fwd(o2, x, Ns, Fd);
    SAME(o1, o2, (size_t)Ns * Fd, "swiglu_fwd");
    F->swiglu_bwd(dx1, x, d, Ns, Fd);
    R->swiglu_bwd(dx2, x, d, Ns, Fd);
    SAME(dx1, dx2, (size_t)Ns * 2 * Fd, "swiglu_bwd");
    F->add(o1, x, d, n);
    R->add(o2, x, d, n);
    SAME(o1, o2, n, "add");
    /* embeddings */
    int B = 3, T = 50, V = 40, E = 33;
    int32_t tok[150];
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)kiln_rng_below(&rng, (uint64_t)V);
    float *wte = rnd((size_t)V * E, 1), *wpe = rnd((size_t)T * E, 1);
    for (int pos = 0; pos < 2; pos++) {
        F->embed_fwd(o1, tok, wte, pos ? wpe : NULL, B, T, E);
        R->embed_fwd(o2, tok, wte, pos ? wpe : NULL, B, T, E);
        SAME(o1, o2, (size_t)B * T * E, "embed_fwd");
        float *g1 = rnd((size_t)V * E, 1), *g2 = dup(g1, (size_t)V * E);
        float *p1 = rnd((size_t)T * E, 1), *p2 = dup(p1, (size_t)T * E);
        F->embed_bwd(g1, pos ? p1 : NULL, d, tok, B, T, E, V);
        R->embed_bwd(g2, pos ? p2 : NULL, d, tok, B, T, E, V);
        SAME(g1, g2, (size_t)V * E, "embed_bwd wte");
        SAME(p1, p2, (size_t)T * E, "embed_bwd wpe");
        free(g1); free(g2); free(p1); free(p2);
    }
    free(wte); free(wpe);
    free(x); free(w); free(b); free(d); free(o1); free(o2);
    free(dx1); free(dx2); free(dw1); free(dw2); free(db1); free(db2);
}

static void test_attention_rope(void)
{
    const kern_ops *F = kern_ops_fast(), *R = kern_ops_ref();
    kern_gemm *gf = kern_gemm_fast_new(), *gr = kern_gemm_ref();
    const int cfgs[][4] = {{2, 70, 4, 4}, {1, 130, 6, 2}, {3, 5, 2, 1}}; /* B T NH KVH */
    for (int c = 0; c < 3; c++) {
        int B = cfgs[c][0], T = cfgs[c][1], NH = cfgs[c][2], KVH = cfgs[c][3], HS = 16;
        size_t S = (size_t)(NH + 2 * KVH) * HS, nq = (size_t)B * T * S;
        size_t no = (size_t)B * T * NH * HS, na = (size_t)B * NH * T;
        float *qkv = rnd(nq, 1), *q2 = dup(qkv, nq);
        float *cs = malloc((size_t)T * HS / 2 * 4), *sn = malloc((size_t)T * HS / 2 * 4);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < HS / 2; i++) {
                cs[t * HS / 2 + i] = cosf(t * powf(100.0f, -2.0f * i / HS));
                sn[t * HS / 2 + i] = sinf(t * powf(100.0f, -2.0f * i / HS));
            }
        F->rope(qkv, cs, sn, B, T, NH, KVH, HS, false);
        R->rope(q2, cs, sn, B, T, NH, KVH, HS, false);
        SAME(qkv, q2, nq, "rope");
        float *o1 = malloc(no * 4), *o2 = malloc(no * 4);
        float *a1 = malloc(na * 4), *a2 = malloc(na * 4);
        F->attention_fwd(gf, o1, a1, q2, B, T, NH, KVH, HS);
        R->attention_fwd(gr, o2, a2, q2, B, T, NH, KVH, HS);
        SAME(o1, o2, no, "attention_fwd out");
        SAME(a1, a2, na, "attention_fwd lse");
        float *d = rnd(no, 1), *dq1 = malloc(nq * 4), *dq2 = malloc(nq * 4);
        F->attention_bwd(gf, dq1, d, q2, o2, a2, B, T, NH, KVH, HS);
        R->attention_bwd(gr, dq2, d, q2, o2, a2, B, T, NH, KVH, HS);
        SAME(dq1, dq2, nq, "attention_bwd dqkv");
        F->rope(dq1, cs, sn, B, T, NH, KVH, HS, true);
        R->rope(dq2, cs, sn, B, T, NH, KVH, HS, true);
        SAME(dq1, dq2, nq, "rope inverse");
        free(qkv); free(q2); free(cs); free(sn); free(o1); free(o2); free(a1); free(a2);
        free(d); free(dq1); free(dq2);
    }
    kern_gemm_free(gf);
}

static void test_cross_entropy(void)
{
    const kern_ops *F = kern_ops_fast(), *R = kern_ops_ref();
    int64_t N = 97;
    int V = 1003;
    float *x = rnd((size_t)N * V, 4), *d1 = malloc((size_t)N * V * 4), *d2 = malloc((size_t)N * V * 4);
    float mask[97];
    int32_t t[97];
    for (int i = 0; i < N; i++) {
        t[i] = i % 11 == 3 ? -1 : (int32_t)kiln_rng_below(&rng, (uint64_t)V);
        mask[i] = (float)(i % 3);
    }
    x[5 * V + 7] = 80.0f; /* a large logit */
    for (int mk = 0; mk < 2; mk++) {
        double l1 = 0, w1 = 0, l2 = 0, w2 = 0;
        F->cross_entropy(x, t, mk ? mask : NULL, N, V, 0.01f, d1, &l1, &w1);
        R->cross_entropy(x, t, mk ? mask : NULL, N, V, 0.01f, d2, &l2, &w2);
        CHECK_NEAR(l1, l2, 1e-5);
        CHECK_NEAR(w1, w2, 1e-12);
        SAME(d1, d2, (size_t)N * V, "cross_entropy dlogits");
    }
    /* in place (dlogits aliasing logits) gives the same gradient */
    float *x2 = dup(x, (size_t)N * V);
    double l1 = 0, w1 = 0;
    F->cross_entropy(x2, t, mask, N, V, 0.01f, x2, &l1, &w1);
    SAME(x2, d2, (size_t)N * V, "cross_entropy in place");
    free(x); free(x2); free(d1); free(d2);
}

/* linear at decode sizes (T < KERN_GEMM_MIN_T) on fp32 weights stored
 * (in, out), GPT-2's layout: the fast table streams the rows of W itself
 * (not the GEMM). Every T of a decode step (token groups of 6 and their
 * tails), widths that are not a multiple of 16 or 64 and depths that are
 * not a multiple of 8, with and without bias, against ref's double sums;
 * and a token's result is the same bits whatever T it shares the step
 * with (what lets a speculative verify step match the target alone). */
static void test_linear_in_out(void)
{
    const kern_ops *F = kern_ops_fast(), *R = kern_ops_ref();
    kern_gemm *g = kern_gemm_fast_new();
    const int shapes[][2] = {{37, 150}, {384, 1152}, {200, 16}};
    for (int s = 0; s < 3; s++) {
        const int K = shapes[s][0], OC = shapes[s][1], TM = KERN_GEMM_MIN_T - 1;
        float *w = rnd((size_t)K * OC, 0.2f), *x = rnd((size_t)TM * K, 1), *b = rnd(OC, 1);
        float *y = malloc((size_t)TM * OC * 4), *yr = malloc((size_t)TM * OC * 4);
        float *y1 = malloc((size_t)OC * 4);
        kern_wt W = {KILN_DTYPE_F32, KERN_W_IN_OUT, OC, K, w};
        for (int T = 1; T <= TM; T++)
            for (int hb = 0; hb < 2; hb++) {
                const float *bias = hb ? b : NULL;
                F->linear(g, y, x, T, &W, bias);
                R->linear(kern_gemm_ref(), yr, x, T, &W, bias);
                char what[96];
                snprintf(what, sizeof what, "linear in_out K=%d OC=%d T=%d bias=%d", K, OC, T, hb);
                SAME(y, yr, (size_t)T * OC, what);
                bool same = true;
                for (int t = 0; t < T; t++) {
                    F->linear(g, y1, x + (size_t)t * K, 1, &W, bias);
                    same = same && !memcmp(y1, y + (size_t)t * OC, (size_t)OC * 4);
                }
                CHECK_MSG(same, "%s: a token's row differs from its 1-token step", what);
            }
        free(w), free(x), free(b), free(y), free(yr), free(y1);
    }
    kern_gemm_free(g);
}

int main(void)
{
    kiln_rng_seed(&rng, 2024);
    RUN_TEST(test_gemm);
    RUN_TEST(test_matmul);
    RUN_TEST(test_elementwise);
    RUN_TEST(test_attention_rope);
    RUN_TEST(test_cross_entropy);
    RUN_TEST(test_linear_in_out);
    return TEST_EXIT();
}
