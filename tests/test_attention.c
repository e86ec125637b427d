/*
 * test_attention.c — the flash attention ops (kernels.h attention_fwd /
 * attention_bwd):
 *   - the reference forward against a naive double-precision softmax
 *     attention (attn_naive.h: out and the row log-sum-exp);
 *   - the reference backward against fourth-order finite differences;
 *   - the fast (tiled, AVX-512) ops against the reference: out, lse, dqkv,
 *     on T a multiple of the 64-row blocks or not (1, 7, 65, 130, 256,
 *     600), GQA (KVH = NH, NH/2, 1), head sizes 8, 16, 24, 32, 64, 128
 *     (vector tails) and 160 (above the tiled limit: the fallback), several
 *     thread counts, and bit-identical repeats for a fixed thread count.
 * Tolerance fast vs ref: max |fast - ref| <= 2e-5 * max(1, max |ref|).
 */
#include "check.h"
#include "kiln.h"
#include "kernels/kernels.h"
#include "attn_naive.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static kiln_rng rng;

static float *rnd(size_t n, float scale)
{
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = scale * kiln_rng_normal(&rng);
    return p;
}

#define SAME(fast, ref, n, tol, ...)                                            \
    do {                                                                        \
        double sc_, d_ = check_maxdiff(fast, ref, n, &sc_);                           \
        if (!(d_ <= (tol) * sc_)) {                                             \
            fprintf(stderr, "  max diff %g (scale %g): ", d_, sc_);             \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
            check_fails_++;                                                     \
        }                                                                       \
    } while (0)

static void test_ref_vs_naive(void)
{
    const kern_ops *R = kern_ops_ref();
    const int cfgs[][5] = {{2, 9, 4, 2, 8}, {1, 33, 2, 1, 16}, {2, 4, 3, 3, 5}};
    for (int c = 0; c < 3; c++) {
        int B = cfgs[c][0], T = cfgs[c][1], NH = cfgs[c][2], KVH = cfgs[c][3], HS = cfgs[c][4];
        size_t nq = (size_t)B * T * (NH + 2 * KVH) * HS, no = (size_t)B * T * NH * HS;
        size_t nl = (size_t)B * NH * T;
        float *qkv = rnd(nq, 1.5f), *o = malloc(no * 4), *l = malloc(nl * 4);
        double *od = malloc(no * 8), *ld = malloc(nl * 8);
        R->attention_fwd(kern_gemm_ref(), o, l, qkv, B, T, NH, KVH, HS);
        attn_naive(qkv, NULL, NULL, NULL, B, T, NH, KVH, HS, od, ld, NULL, NULL, NULL);
        double w = 0;
        for (size_t i = 0; i < no; i++) w = check_max(w, fabs(o[i] - od[i]));
        CHECK_MSG(w < 1e-5, "ref out vs naive: %g (cfg %d)", w, c);
        w = 0;
        for (size_t i = 0; i < nl; i++) w = check_max(w, fabs(l[i] - ld[i]));
        CHECK_MSG(w < 1e-5, "ref lse vs naive: %g (cfg %d)", w, c);
        free(qkv); free(o); free(l); free(od); free(ld);
    }
}

/* L(qkv) = sum(out * R), fourth-order central differences in double on
 * top of fp32 forwards, against the reference backward. */
typedef struct fd_case {
    int B, T, NH, KVH, HS;
    float *qkv, *out, *lse, *R;
} fd_case;

static double fd_loss(fd_case *c)
{
    kern_ops_ref()->attention_fwd(kern_gemm_ref(), c->out, c->lse, c->qkv, c->B, c->T, c->NH,
                                  c->KVH, c->HS);
    double s = 0;
    for (size_t i = 0; i < (size_t)c->B * c->T * c->NH * c->HS; i++) s += (double)c->out[i] * c->R[i];
    return s;
}

static void test_ref_bwd_fd(void)
{
    const int cfgs[][5] = {{2, 5, 4, 2, 4}, {1, 6, 2, 1, 3}, {1, 4, 2, 2, 4}};
    for (int cf = 0; cf < 3; cf++) {
        fd_case c = {cfgs[cf][0], cfgs[cf][1], cfgs[cf][2], cfgs[cf][3], cfgs[cf][4],
                     NULL, NULL, NULL, NULL};
        size_t nq = (size_t)c.B * c.T * (c.NH + 2 * c.KVH) * c.HS;
        size_t no = (size_t)c.B * c.T * c.NH * c.HS;
        c.qkv = rnd(nq, 1.0f);
        c.R = rnd(no, 1.0f);
        c.out = malloc(no * 4);
        c.lse = malloc((size_t)c.B * c.NH * c.T * 4);
        float *dqkv = malloc(nq * 4), *o = malloc(no * 4);
        fd_loss(&c);
        memcpy(o, c.out, no * 4);
        kern_ops_ref()->attention_bwd(kern_gemm_ref(), dqkv, c.R, c.qkv, o, c.lse, c.B, c.T,
                                      c.NH, c.KVH, c.HS);
        double gmax = 1e-12, worst = 0;
        for (size_t i = 0; i < nq; i++) gmax = check_max(gmax, fabs(dqkv[i]));
        const float eps = 1e-2f, k[4] = {1, -1, 2, -2};
        for (size_t i = 0; i < nq; i++) {
            float x0 = c.qkv[i];
            double l[4];
            for (int j = 0; j < 4; j++) {
                c.qkv[i] = x0 + k[j] * eps;
                l[j] = fd_loss(&c);
            }
            c.qkv[i] = x0;
            double num = (8.0 * (l[0] - l[1]) - (l[2] - l[3])) / (12.0 * eps);
            worst = check_max(worst, fabs(num - dqkv[i]) / gmax);
        }
        CHECK_MSG(worst < 2e-3, "ref attention backward vs finite differences: worst %g (cfg %d)",
                  worst, cf);
        CHECK(gmax > 1e-3); /* the check is not vacuous */
        free(c.qkv); free(c.R); free(c.out); free(c.lse); free(dqkv); free(o);
    }
}

/* One shape: fast vs ref forward and backward (the backward fed the
 * reference forward's out and lse), and a repeat of the fast ops that must
 * be bit-identical. */
static void fast_vs_ref(int B, int T, int NH, int KVH, int HS, float qscale)
{
    const kern_ops *F = kern_ops_fast(), *R = kern_ops_ref();
    kern_gemm *gf = kern_gemm_fast_new(), *gr = kern_gemm_ref();
    size_t nq = (size_t)B * T * (NH + 2 * KVH) * HS, no = (size_t)B * T * NH * HS;
    size_t nl = (size_t)B * NH * T;
    float *qkv = rnd(nq, qscale), *d = rnd(no, 1.0f);
    float *o1 = malloc(no * 4), *o2 = malloc(no * 4), *o3 = malloc(no * 4);
    float *l1 = malloc(nl * 4), *l2 = malloc(nl * 4), *l3 = malloc(nl * 4);
    float *dq1 = malloc(nq * 4), *dq2 = malloc(nq * 4), *dq3 = malloc(nq * 4);
    for (size_t i = 0; i < nq; i++) dq1[i] = dq3[i] = NAN; /* all overwritten */
    F->attention_fwd(gf, o1, l1, qkv, B, T, NH, KVH, HS);
    R->attention_fwd(gr, o2, l2, qkv, B, T, NH, KVH, HS);
    SAME(o1, o2, no, 2e-5, "fwd out B%d T%d NH%d KVH%d HS%d", B, T, NH, KVH, HS);
    SAME(l1, l2, nl, 2e-5, "fwd lse B%d T%d NH%d KVH%d HS%d", B, T, NH, KVH, HS);
    F->attention_bwd(gf, dq1, d, qkv, o2, l2, B, T, NH, KVH, HS);
    R->attention_bwd(gr, dq2, d, qkv, o2, l2, B, T, NH, KVH, HS);
    SAME(dq1, dq2, nq, 2e-5, "bwd dqkv B%d T%d NH%d KVH%d HS%d", B, T, NH, KVH, HS);
    F->attention_fwd(gf, o3, l3, qkv, B, T, NH, KVH, HS);
    F->attention_bwd(gf, dq3, d, qkv, o2, l2, B, T, NH, KVH, HS);
    CHECK_MSG(!memcmp(o1, o3, no * 4) && !memcmp(l1, l3, nl * 4) && !memcmp(dq1, dq3, nq * 4),
              "fast attention not bit-identical on a repeat (B%d T%d NH%d KVH%d HS%d)", B, T, NH,
              KVH, HS);
    free(qkv); free(d); free(o1); free(o2); free(o3); free(l1); free(l2); free(l3);
    free(dq1); free(dq2); free(dq3);
    kern_gemm_free(gf);
}

static void test_fast_vs_ref(void)
{
    const int Ts[] = {1, 7, 65, 130};
    const int heads[][2] = {{4, 4}, {4, 2}, {4, 1}};
    const int HSs[] = {32, 64};
    for (int t = 0; t < 4; t++)
        for (int h = 0; h < 3; h++)
            for (int s = 0; s < 2; s++)
                fast_vs_ref(2, Ts[t], heads[h][0], heads[h][1], HSs[s], 1.0f);
}

static void test_fast_odd_shapes(void)
{
    fast_vs_ref(1, 256, 2, 1, 64, 1.0f);  /* full blocks only */
    fast_vs_ref(1, 600, 2, 2, 32, 1.0f);  /* ten key blocks, a partial last one */
    fast_vs_ref(1, 1100, 4, 1, 16, 1.0f); /* D not cached (4 x 1100 rows) */
    fast_vs_ref(3, 70, 6, 2, 16, 1.0f);
    fast_vs_ref(2, 67, 2, 2, 8, 1.0f);    /* head size below a vector */
    fast_vs_ref(1, 129, 2, 1, 24, 1.0f);  /* a vector and a masked tail */
    fast_vs_ref(1, 40, 2, 2, 128, 1.0f);
    fast_vs_ref(1, 9, 2, 1, 160, 1.0f);   /* above the tiled limit */
    fast_vs_ref(2, 100, 2, 2, 32, 6.0f);  /* peaked softmax, large scores */
}

static void test_fast_threads(void)
{
#ifdef _OPENMP
    int keep = omp_get_max_threads();
    for (int n = 1; n <= 3; n++) {
        omp_set_num_threads(n);
        fast_vs_ref(2, 130, 4, 2, 64, 1.0f);
    }
    omp_set_num_threads(keep);
#else
    SKIP("built without OpenMP");
#endif
}

int main(void)
{
    kiln_rng_seed(&rng, 77);
    RUN_TEST(test_ref_vs_naive);
    RUN_TEST(test_ref_bwd_fd);
    RUN_TEST(test_fast_vs_ref);
    RUN_TEST(test_fast_odd_shapes);
    RUN_TEST(test_fast_threads);
    return TEST_EXIT();
}
