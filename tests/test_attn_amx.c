/*
 * test_attn_amx.c — the bf16 AMX flash attention (attn_amx.c) against a
 * naive double-precision attention computed on the same bf16-rounded q, k,
 * v: forward out and lse, backward dq, dk, dv (fed the reference's out and
 * lse), over T in {1, 17, 32, 33, 100, 256, 300} (one row, partial
 * blocks, exact blocks, one past, several blocks), HS 32 / 64 / 128 (and
 * 96 once), GQA
 * (NH 4, KVH 2) and MHA, 1 and 2 threads (results must be bit-identical
 * across thread counts and repeats); for T a multiple of 32 also the
 * backward that writes its gradient packed (mp_attention_bwd_amx_packed),
 * which must give mp_pack_dy's bytes and bias sums of the fp32 rows.
 *
 * Tolerance, element by element. With u = 2^-8 (the unit roundoff of
 * bf16, 8 significant bits, round to nearest) and
 * the products exact in fp32 up to ~1e-6 relative:
 *   out  = sum_j bf16(p_j) v_j / l with l the fp32 sum of the p_j, so
 *          |err| <= u * sum_j p_j |v_j|                =: u * Mo
 *   dv_j = sum_i bf16(p_ij) bf16(dO_i): |err| <= (2u + u^2) sum_i p_ij |dO_i|
 *   dS   = bf16(P (dP~ - D) scale) with dP~ from bf16(dO):
 *          |err dS_ij| <= u |dS_ij| + u scale p_ij sum_d |dO_id| |v_jd|,
 *          so dk_j (sum over i of dS_ij q_i) and dq_i (over j of dS_ij k_j)
 *          are off by at most u times the same sums of magnitudes.
 * The test computes those magnitude sums (M) in double next to the
 * reference and checks |got - ref| <= 2u * M + 1e-5 * max|ref| (2u: the
 * first-order bound of dv, twice that of the others; the second-order
 * terms, the fp32 exp and the fp32 accumulation are below 1e-3 u M; the
 * absolute term covers elements whose M is ~0). lse has no bf16 step:
 * |err| <= 1e-5 * max(1, |lse|). The largest observed err / (u * M) is
 * printed (1.45 when this was written, of the 2 allowed).
 */
#include "check.h"
#include "kiln.h"
#include "kernels/x86/bf16.h"
#include "attn_naive.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static kiln_rng rng;
static double worst_ratio; /* max over checks of err / (u * M) */

#define U (1.0 / 256)

/* |got - ref| <= 2u M + 1e-5 max|ref| element by element. */
static void within(const float *got, const double *ref, const double *M, size_t n,
                   const char *what, int T, int NH, int KVH, int HS)
{
    double mref = 0;
    for (size_t i = 0; i < n; i++) mref = check_max(mref, fabs(ref[i]));
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        if (M[i] > 0) worst_ratio = check_max(worst_ratio, (e - 1e-5 * mref) / (U * M[i]));
        if (!(e <= 2 * U * M[i] + 1e-5 * mref)) {
            if (!bad) first = i;
            bad++;
        }
    }
    CHECK_MSG(!bad, "%s T%d NH%d KVH%d HS%d: %zu of %zu outside the bound, first at %zu: got %g ref %g M %g",
              what, T, NH, KVH, HS, bad, n, first, (double)got[first], ref[first], M[first]);
}

/* One shape; q scaled by qs before the rounding (qs 4: scores ~ N(0, 16),
 * the running max of the forward moves past its +8 slack). */
static void one(int B, int T, int NH, int KVH, int HS, float qs)
{
    int S = (NH + 2 * KVH) * HS;
    size_t nq = (size_t)B * T * S, no = (size_t)B * T * NH * HS, nl = (size_t)B * NH * T;
    float *qkv = malloc(nq * 4), *dout = malloc(no * 4);
    uint16_t *qkvh = malloc(nq * 2);
    for (size_t i = 0; i < nq; i++) {
        bool isq = (int)(i % S) < NH * HS;
        qkvh[i] = f32_to_bf16((isq ? qs : 1.0f) * kiln_rng_normal(&rng));
        qkv[i] = bf16_to_f32(qkvh[i]);
    }
    for (size_t i = 0; i < no; i++) dout[i] = kiln_rng_normal(&rng);
    double *out = malloc(no * 8), *lse = malloc(nl * 8), *Mo = malloc(no * 8);
    double *dq = malloc(nq * 8), *Mq = malloc(nq * 8), *lone = malloc(nl * 8);
    float *outf = calloc(no, 4), *lsef = calloc(nl, 4);
    /* the reference forward first (the backward is fed its out and lse) */
    attn_naive(qkv, dout, outf, lsef, B, T, NH, KVH, HS, out, lse, Mo, dq, Mq);
    for (size_t i = 0; i < no; i++) outf[i] = (float)out[i];
    for (size_t i = 0; i < nl; i++) lsef[i] = (float)lse[i];
    attn_naive(qkv, dout, outf, lsef, B, T, NH, KVH, HS, out, lse, Mo, dq, Mq);
    for (size_t i = 0; i < nl; i++) lone[i] = fmax(1.0, fabs(lse[i]));

    float *o[3], *l[3], *g[3];
    for (int r = 0; r < 3; r++) {
        o[r] = malloc(no * 4);
        l[r] = malloc(nl * 4);
        g[r] = malloc(nq * 4);
        for (size_t i = 0; i < nq; i++) g[r][i] = NAN; /* all overwritten */
    }
#ifdef _OPENMP
    int keep = omp_get_max_threads();
#endif
    for (int r = 0; r < 3; r++) { /* 1 thread, 2 threads, 2 threads again */
#ifdef _OPENMP
        omp_set_num_threads(r == 0 ? 1 : 2);
#endif
        mp_attention_fwd_amx(o[r], l[r], qkvh, B, T, NH, KVH, HS);
        mp_attention_bwd_amx(g[r], dout, qkvh, outf, lsef, B, T, NH, KVH, HS);
    }
#ifdef _OPENMP
    omp_set_num_threads(keep);
#endif
    within(o[0], out, Mo, no, "fwd out", T, NH, KVH, HS);
    double lw = 0;
    for (size_t i = 0; i < nl; i++) lw = check_max(lw, fabs(l[0][i] - lse[i]) / lone[i]);
    CHECK_MSG(lw <= 1e-5, "fwd lse T%d NH%d KVH%d HS%d: relative error %g", T, NH, KVH, HS, lw);
    within(g[0], dq, Mq, nq, "bwd dqkv", T, NH, KVH, HS);
    for (int r = 1; r < 3; r++)
        CHECK_MSG(!memcmp(o[0], o[r], no * 4) && !memcmp(l[0], l[r], nl * 4) &&
                      !memcmp(g[0], g[r], nq * 4),
                  "run %d (%d threads) not bit-identical to 1 thread: T%d NH%d KVH%d HS%d", r,
                  r == 0 ? 1 : 2, T, NH, KVH, HS);
    /* out from its packed bf16 copy (the bf16 model's backward) against
     * the fp32 rows of the same bf16 values: bit for bit; and the forward
     * writing that copy itself */
    {
        int M = B * T, K = NH * HS;
        float *ob = malloc(no * 4), *ga = malloc(nq * 4), *gb = malloc(nq * 4);
        uint16_t *op = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, M, K) * 2);
        mp_round_bf16(outf, ob, no);
        mp_pack_a(KILN_DTYPE_BF16, false, M, K, outf, K, op);
        mp_attention_bwd_amx(ga, dout, qkvh, ob, lsef, B, T, NH, KVH, HS);
        for (size_t i = 0; i < nq; i++) gb[i] = NAN;
        mp_attention_bwd_amx_packed(gb, NULL, dout, qkvh, op, lsef, B, T, NH, KVH, HS);
        CHECK_MSG(!memcmp(ga, gb, nq * 4), "bwd from packed out differs: T%d NH%d KVH%d HS%d", T, NH,
                  KVH, HS);
        /* and it is not the fp32 out's result (the rounding is seen;
         * with one key D cancels out) */
        if (T > 1)
            CHECK_MSG(memcmp(ga, g[0], nq * 4), "bwd from bf16 out equals fp32: T%d NH%d KVH%d HS%d", T,
                  NH, KVH, HS);
        if (T % 32 == 0) /* the gradient packed: mp_pack_dy of the rows, bit for bit */
            for (int tok = 0; tok < 2; tok++) {
                int N = B * T;
                size_t na = mp_packa_elems(KILN_DTYPE_BF16, N, S), nt = mp_packa_elems(KILN_DTYPE_BF16, S, N);
                size_t np = mp_pack_dy_part_floats(N, S);
                uint16_t *pa[2] = {malloc(na * 2), malloc(na * 2)}, *pt[2] = {malloc(nt * 2), malloc(nt * 2)};
                float *part = malloc(np * 4), *db[2] = {calloc((size_t)S, 4), calloc((size_t)S, 4)};
                memset(pa[0], 0xff, na * 2);
                memset(pt[0], 0xff, nt * 2);
                mp_dy_out od = {.pa = pa[0], .pt = pt[0], .tok = tok, .part = part, .np = N, .op = S};
                mp_attention_bwd_amx_packed(NULL, &od, dout, qkvh, op, lsef, B, T, NH, KVH, HS);
                mp_pack_dy_bias(db[0], part, N, S);
                mp_pack_dy(pa[1], pt[1], tok, db[1], part, gb, N, S);
                CHECK_MSG(!memcmp(pa[0], pa[1], na * 2) && !memcmp(pt[0], pt[1], nt * 2) &&
                              !memcmp(db[0], db[1], (size_t)S * 4),
                          "packed output (tok %d) differs from mp_pack_dy: T%d NH%d KVH%d HS%d", tok, T,
                          NH, KVH, HS);
                for (int k = 0; k < 2; k++) free(pa[k]), free(pt[k]), free(db[k]);
                free(part);
            }
        free(ob), free(ga), free(gb), free(op);
        /* the forward writing out packed: mp_pack_a of its fp32 out, bit
         * for bit, padding rows included (the buffer starts as 0xff) */
        size_t np = mp_packa_elems(KILN_DTYPE_BF16, M, K);
        uint16_t *p0 = aligned_alloc(64, np * 2), *p1 = aligned_alloc(64, np * 2);
        float *lp = malloc(nl * 4);
        memset(p1, 0xff, np * 2);
        mp_pack_a(KILN_DTYPE_BF16, false, M, K, o[0], K, p0);
        mp_attention_fwd_amx_packed(p1, lp, qkvh, B, T, NH, KVH, HS);
        CHECK_MSG(!memcmp(p0, p1, np * 2) && !memcmp(lp, l[0], nl * 4),
                  "fwd to packed out differs: T%d NH%d KVH%d HS%d", T, NH, KVH, HS);
        free(p0), free(p1), free(lp);
    }
    for (int r = 0; r < 3; r++) {
        free(o[r]);
        free(l[r]);
        free(g[r]);
    }
    free(qkv); free(dout); free(qkvh); free(out); free(lse); free(Mo); free(dq); free(Mq);
    free(lone); free(outf); free(lsef);
}

static void test_amx_ok(void)
{
    bool u = mp_amx_usable() && mp_cpu_caps()->avx512_bf16;
    CHECK_EQ(mp_attention_amx_ok(32, 256), u);
    CHECK_EQ(mp_attention_amx_ok(64, 256), u);
    CHECK_EQ(mp_attention_amx_ok(96, 256), u);
    CHECK_EQ(mp_attention_amx_ok(128, 256), u);
    CHECK_EQ(mp_attention_amx_ok(16, 256), 0);
    CHECK_EQ(mp_attention_amx_ok(48, 256), 0);
    CHECK_EQ(mp_attention_amx_ok(160, 256), 0);
    /* T: at most a quarter of T rounded up to 32 is padding */
    CHECK_EQ(mp_attention_amx_ok(64, 1), 0);
    CHECK_EQ(mp_attention_amx_ok(64, 23), 0);
    CHECK_EQ(mp_attention_amx_ok(64, 24), u);
    CHECK_EQ(mp_attention_amx_ok(64, 32), u);
    CHECK_EQ(mp_attention_amx_ok(64, 33), 0);
    CHECK_EQ(mp_attention_amx_ok(64, 72), u);
    CHECK_EQ(mp_attention_amx_ok(64, 97), u);
    CHECK_EQ(mp_attention_amx_ok(64, 0), 0);
}

static void test_amx_vs_naive(void)
{
    if (!mp_amx_usable()) SKIP("AMX not usable on this CPU/kernel (mp_amx_usable() false)");
    if (!mp_cpu_caps()->avx512_bf16) SKIP("AMX without AVX512_BF16 (the kernels' conversions need it)");
    const int Ts[] = {1, 17, 32, 33, 100, 256, 300};
    const int HSs[] = {32, 64, 128};
    const int heads[][2] = {{4, 2}, {2, 2}};
    worst_ratio = 0;
    for (int t = 0; t < 7; t++)
        for (int s = 0; s < 3; s++)
            for (int h = 0; h < 2; h++)
                one(Ts[t] >= 256 ? 1 : 2, Ts[t], heads[h][0], heads[h][1], HSs[s], 1.0f);
    one(2, 100, 4, 2, 96, 1.0f); /* three tile columns of d */
    one(2, 100, 4, 2, 64, 4.0f); /* peaked softmax, large scores */
    one(1, 300, 2, 2, 32, 4.0f);
    printf("  largest error / (u * bound sum): %.3f (allowed 2)\n", worst_ratio);
    CHECK(worst_ratio > 0.01); /* the bf16 steps are really there */
}

int main(void)
{
    kiln_rng_seed(&rng, 5);
    RUN_TEST(test_amx_ok);
    RUN_TEST(test_amx_vs_naive);
    return TEST_EXIT();
}
