/*
 * test_bf16.c — the mixed-precision kernels against independent oracles:
 * bf16/fp16 conversions against known values and against the scalar
 * versions bit for bit (random bit patterns, inf, NaN, subnormals); every
 * product backend (portable, AVX512_BF16, AMX) in bf16 and fp16 against a
 * double-precision product of the rounded inputs, over odd shapes,
 * transposes, accumulation and bias; the three linear-layer products; the
 * one-pass packing of an output gradient against the passes it replaces;
 * the AMX peak probe.
 */
#include "check.h"
#include "kernels/kernels.h"
#include "kernels/x86/bf16.h"

#include "kiln.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static float bits_f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t f_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static void test_bf16_known_values(void)
{
    CHECK_EQ(f32_to_bf16(1.0f), 0x3f80);
    CHECK_EQ(f32_to_bf16(-2.0f), 0xc000);
    /* 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even -> 1. */
    CHECK_EQ(f32_to_bf16(1.0f + 1.0f / 256), 0x3f80);
    /* 1 + 3*2^-8 is a tie between 1+2^-7 and 1+2^-6: even -> 1+2^-6. */
    CHECK_EQ(f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
    CHECK_EQ(f32_to_bf16(1.0f + 1.0f / 256 + 1.0f / 65536), 0x3f81);
    CHECK_EQ(f32_to_bf16(bits_f(0x7f800000u)), 0x7f80);     /* inf */
    CHECK_EQ(f32_to_bf16(bits_f(0x7f7fffffu)), 0x7f80);     /* max -> inf */
    uint16_t nan = f32_to_bf16(bits_f(0x7f800001u));       /* sNaN stays NaN */
    CHECK((nan & 0x7f80) == 0x7f80 && (nan & 0x7f) != 0);
    CHECK_EQ(f32_to_bf16(bits_f(0x00010000u)), 0x0001);     /* subnormal kept */
    CHECK(bf16_to_f32(0x4049) == 3.140625f);
}

static void test_f16_known_values(void)
{
    CHECK_EQ(f32_to_f16(1.0f), 0x3c00);
    CHECK_EQ(f32_to_f16(65504.0f), 0x7bff);
    CHECK_EQ(f32_to_f16(65519.0f), 0x7bff);
    CHECK_EQ(f32_to_f16(65520.0f), 0x7c00); /* overflow -> inf */
    CHECK_EQ(f32_to_f16(-1e6f), 0xfc00);
    CHECK_EQ(f32_to_f16(5.9604645e-8f), 0x0001); /* 2^-24 */
    CHECK_EQ(f32_to_f16(2.98e-8f), 0x0000);      /* < 2^-25 -> 0 */
    CHECK_EQ(f32_to_f16(6.1035156e-5f), 0x0400); /* 2^-14 */
    CHECK(f16_to_f32(0x3555) == 0.333251953125f);
    CHECK(f16_to_f32(0x0001) == 5.9604645e-8f);
    CHECK(f16_to_f32(0xfc00) == -__builtin_inff());
    float n = f16_to_f32(0x7e00);
    CHECK(n != n);
}

/* Array paths (AVX-512 / F16C) must equal the scalar ones bit for bit. */
static void test_arrays_match_scalar(void)
{
    enum { N = 200003 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y);
    uint16_t *h = malloc(N * 2);
    kiln_rng r;
    kiln_rng_seed(&r, 7);
    for (int i = 0; i < N; i++) {
        uint32_t u = (uint32_t)kiln_rng_u64(&r);
        if (i % 3 == 0) u = f_bits(kiln_rng_normal(&r) * 100.f); /* typical values */
        if (i % 11 == 0) u &= 0x807fffffu | (0x67u << 23);     /* near f16 range edges */
        x[i] = bits_f(u);
    }
    x[0] = bits_f(0x7f800000u);
    x[1] = bits_f(0xff800001u);
    x[2] = bits_f(0x00000001u);
    int bad = 0;
    mp_f32_to_bf16(x, h, N);
    for (int i = 0; i < N; i++) bad += h[i] != f32_to_bf16(x[i]);
    CHECK_EQ(bad, 0);
    mp_bf16_to_f32(h, y, N);
    bad = 0;
    for (int i = 0; i < N; i++) bad += f_bits(y[i]) != f_bits(bf16_to_f32(h[i]));
    CHECK_EQ(bad, 0);
    mp_f32_to_f16(x, h, N);
    bad = 0;
    for (int i = 0; i < N; i++) {
        uint16_t s = f32_to_f16(x[i]);
        if (h[i] != s && bad++ < 5)
            fprintf(stderr, "  f16 %08x: vector %04x scalar %04x\n", f_bits(x[i]), h[i], s);
    }
    CHECK_EQ(bad, 0);
    /* Every half value round-trips exactly through fp32. */
    bad = 0;
    for (uint32_t v = 0; v < 65536; v++) {
        uint16_t hv = (uint16_t)v;
        float f = f16_to_f32(hv);
        uint16_t back = f32_to_f16(f);
        bool nan = (hv & 0x7c00) == 0x7c00 && (hv & 0x3ff);
        if (!nan && back != hv) bad++;
        float g;
        mp_f16_to_f32(&hv, &g, 1);
        if (!nan && f_bits(g) != f_bits(f)) bad++;
    }
    CHECK_EQ(bad, 0);
    mp_round_f16(x, y, N);
    bad = 0;
    for (int i = 0; i < N; i++)
        if (f_bits(y[i]) != f_bits(f16_to_f32(f32_to_f16(x[i])))) bad++;
    CHECK_EQ(bad, 0);
    free(x);
    free(y);
    free(h);
}

static float round_dt(kiln_dtype dt, float v)
{
    return dt == KILN_DTYPE_BF16 ? bf16_to_f32(f32_to_bf16(v))
                         : f16_to_f32(f32_to_f16(v));
}

/* Oracle: C = (acc ? C : 0) + sum_k rd(A)[m][k] rd(B)[k][n] (+ bias) in
 * double; also returns the scale sum |a||b| for the tolerance. */
static void oracle(kiln_dtype dt, bool ta, bool tb, int M, int N, int K, const float *A,
                   int lda, const float *B, int ldb, float *C, int ldc, bool acc,
                   const float *bias, double *scale)
{
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0, sa = 0;
            for (int k = 0; k < K; k++) {
                double a = round_dt(dt, ta ? A[(size_t)k * lda + m] : A[(size_t)m * lda + k]);
                double b = round_dt(dt, tb ? B[(size_t)n * ldb + k] : B[(size_t)k * ldb + n]);
                s += a * b;
                sa += fabs(a * b);
            }
            float *o = C + (size_t)m * ldc + n;
            *o = (float)((acc ? *o : 0) + s + (bias ? bias[n] : 0));
            scale[(size_t)m * N + n] = sa + 1e-30;
        }
}

static void fill(kiln_rng *r, float *x, size_t n, float s)
{
    for (size_t i = 0; i < n; i++) x[i] = kiln_rng_normal(r) * s;
}

/* One product on one backend against the oracle; returns the worst error
 * in units of sum |a||b|. */
static double gemm_case(mp_backend be, kiln_dtype dt, bool ta, bool tb, int M, int N, int K,
                        bool acc, bool use_bias, bool tc, uint64_t seed)
{
    kiln_rng r;
    kiln_rng_seed(&r, seed);
    int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
    float *A = malloc(sizeof(float) * (size_t)lda * (ta ? K : M));
    float *B = malloc(sizeof(float) * (size_t)ldb * (tb ? N : K));
    float *C = malloc(sizeof(float) * (size_t)ldc * M), *C2 = malloc(sizeof(float) * (size_t)ldc * M);
    float *bias = malloc(sizeof(float) * (size_t)N);
    double *sc = malloc(sizeof(double) * (size_t)M * N);
    fill(&r, A, (size_t)lda * (ta ? K : M), 1.f);
    fill(&r, B, (size_t)ldb * (tb ? N : K), 0.5f);
    fill(&r, C, (size_t)ldc * M, 1.f);
    fill(&r, bias, (size_t)N, 1.f);
    memcpy(C2, C, sizeof(float) * (size_t)ldc * M);
    oracle(dt, ta, tb, M, N, K, A, lda, B, ldb, C2, ldc, acc, use_bias ? bias : NULL, sc);
    uint16_t *pa = aligned_alloc(64, (mp_packa_elems(dt, M, K) * 2 + 63) / 64 * 64);
    uint16_t *pb = aligned_alloc(64, (mp_packb_elems(dt, K, N) * 2 + 63) / 64 * 64);
    mp_pack_a(dt, ta, M, K, A, lda, pa);
    mp_pack_b(dt, tb, K, N, B, ldb, pb);
    if (tc) {
        /* the same product stored transposed: Ct (N, M + 2) */
        int ldt = M + 2;
        float *Ct = malloc(sizeof(float) * (size_t)ldt * N);
        for (int n = 0; n < N; n++)
            for (int m = 0; m < ldt; m++) Ct[(size_t)n * ldt + m] = m < M ? C[(size_t)m * ldc + n] : 7.f;
        mp_gemm_packed_t(be, dt, M, N, K, pa, pb, Ct, ldt, acc, NULL, true);
        for (int n = 0; n < N; n++) {
            for (int m = 0; m < M; m++) C[(size_t)m * ldc + n] = Ct[(size_t)n * ldt + m];
            if (Ct[(size_t)n * ldt + M] != 7.f) C[N] = NAN; /* padding touched */
        }
        free(Ct);
    } else {
        mp_gemm_packed(be, dt, M, N, K, pa, pb, C, ldc, acc, use_bias ? bias : NULL);
    }
    double worst = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double e = fabs((double)C[(size_t)m * ldc + n] - C2[(size_t)m * ldc + n]) /
                       (sc[(size_t)m * N + n] + (acc ? 1 : 0) + (use_bias ? 1 : 0));
            if (e > worst) worst = e;
        }
    /* Padding columns of C (ldc > N) are untouched. */
    int touched = 0;
    for (int m = 0; m < M; m++)
        touched += C[(size_t)m * ldc + N] != C2[(size_t)m * ldc + N];
    if (touched) worst = 1;
    free(A), free(B), free(C), free(C2), free(bias), free(sc), free(pa), free(pb);
    return worst;
}

static void check_backend(mp_backend be)
{
    static const int shapes[][3] = {{1, 1, 1}, {37, 45, 70}, {64, 64, 64}, {33, 17, 96},
                                    {100, 130, 200}, {16, 512, 33}, {40, 36, 1100},
                                    {270, 290, 530}};
    int nshapes = (int)(sizeof shapes / sizeof shapes[0]);
    static const kiln_dtype dts[] = {KILN_DTYPE_BF16, KILN_DTYPE_F16};
    for (int di = 0; di < 2; di++)
        for (int s = 0; s < nshapes; s++)
            for (int t = 0; t < 4; t++) {
                /* the last shape (2 x 2 macro tiles, 2 K chunks) only with
                 * accumulate + bias and without (and C transposed) */
                if (s == nshapes - 1 && t < 2) continue;
                bool ta = t & 1, tb = t & 2, acc = (s + t) % 2, bias = (s + t) % 3 == 0;
                int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
                kiln_dtype dt = dts[di];
                double e = gemm_case(be, dt, ta, tb, M, N, K, acc, bias, false,
                                     1000 + s * 10 + t);
                /* C stored transposed (weight gradients of (in, out) weights) */
                double et = gemm_case(be, dt, ta, tb, M, N, K, !acc, false, true,
                                      2000 + s * 10 + t);
                if (et != et) et = 1;
                if (et > e) e = et;
                /* fp32 accumulation: ~K * 2^-24 relative; fp16 also drops
                 * the lo*lo term (<= 2^-16). */
                double tol = dt == KILN_DTYPE_BF16 ? 2e-6 * sqrt(K) + 1e-6 : 2e-5;
                CHECK_MSG(e <= tol, "%s %s M=%d N=%d K=%d ta=%d tb=%d acc=%d bias=%d: error %.3g > %.3g",
                          mp_backend_name(be), kiln_dtype_name(dt), M, N, K, ta, tb,
                          acc, bias, e, tol);
            }
}

static void test_gemm_ref(void) { check_backend(MP_BACKEND_REF); }

static void test_gemm_avx512_bf16(void)
{
    if (!mp_backend_available(MP_BACKEND_AVX512)) SKIP("CPU has no AVX512_BF16");
    check_backend(MP_BACKEND_AVX512);
}

static void test_gemm_amx(void)
{
    if (!mp_backend_available(MP_BACKEND_AMX)) SKIP("no AMX-BF16 (or the kernel refused tile state)");
    check_backend(MP_BACKEND_AMX);
}

/* A large written-only output goes out with non-temporal stores
 * (MP_AMX_STREAM_BYTES): the same bits as the product added to zeros
 * (accumulate, which never streams), edges not a multiple of 16 (rows and
 * columns through the normal stores), one K chunk and several, with and
 * without bias; the column past N of each row untouched. */
static void test_gemm_amx_stream(void)
{
    if (!mp_backend_available(MP_BACKEND_AMX)) SKIP("no AMX-BF16 (or the kernel refused tile state)");
    static const int shapes[2][3] = {{1030, 2056, 96}, {1040, 2048, 600}};
    for (int si = 0; si < 2; si++) {
        int M = shapes[si][0], N = shapes[si][1], K = shapes[si][2], ldc = (N + 15) / 16 * 16 + 16;
        CHECK((size_t)M * N * 4 >= MP_AMX_STREAM_BYTES);
        kiln_rng r;
        kiln_rng_seed(&r, 77 + si);
        float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N);
        float *bias = malloc(sizeof(float) * N);
        fill(&r, A, (size_t)M * K, 1.f);
        fill(&r, B, (size_t)K * N, 0.5f);
        fill(&r, bias, (size_t)N, 1.f);
        uint16_t *pa = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, M, K) * 2);
        uint16_t *pb = aligned_alloc(64, mp_packb_elems(KILN_DTYPE_BF16, K, N) * 2);
        mp_pack_a(KILN_DTYPE_BF16, false, M, K, A, K, pa);
        mp_pack_b(KILN_DTYPE_BF16, false, K, N, B, N, pb);
        size_t cn = (size_t)M * ldc;
        float *C = aligned_alloc(64, cn * 4), *C0 = aligned_alloc(64, cn * 4);
        for (int b = 0; b < 2; b++) {
            for (size_t i = 0; i < cn; i++) C[i] = 7.f;
            for (int m = 0; m < M; m++)
                for (int j = 0; j < ldc; j++) C0[(size_t)m * ldc + j] = j < N ? (b ? bias[j] : 0.f) : 7.f;
            mp_gemm_packed(MP_BACKEND_AMX, KILN_DTYPE_BF16, M, N, K, pa, pb, C, ldc, false, b ? bias : NULL);
            mp_gemm_packed(MP_BACKEND_AMX, KILN_DTYPE_BF16, M, N, K, pa, pb, C0, ldc, true, NULL);
            size_t bad = 0;
            for (size_t i = 0; i < cn; i++) bad += C[i] != C0[i];
            CHECK_MSG(bad == 0, "M=%d N=%d K=%d bias=%d: %zu of %zu values differ", M, N, K, b, bad,
                      cn);
        }
        free(A), free(B), free(bias), free(pa), free(pb), free(C), free(C0);
    }
}

/* fp16 keeps fp16's range: an input beyond 65504 becomes inf, and the
 * product non-finite (inf, or NaN where the hi/lo split meets inf * 0),
 * which is what the loss scaler looks for. */
static void test_f16_overflow_is_inf(void)
{
    float A[2] = {70000.f, 1.f}, B[2] = {1.f, 1.f}, C[1] = {0};
    mp_scratch s = {0};
    CHECK(mp_gemm_f32io(MP_BACKEND_AUTO, &s, KILN_DTYPE_F16, false, false, 1, 1, 2, A, 2, B, 1, C, 1,
                        false));
    CHECK(!isfinite(C[0]));
    A[0] = 60000.f;
    CHECK(mp_gemm_f32io(MP_BACKEND_AUTO, &s, KILN_DTYPE_F16, false, false, 1, 1, 2, A, 2, B, 1, C, 1,
                        false));
    CHECK_NEAR(C[0], 60001.0, 1e-7);
    CHECK(mp_gemm_f32io(MP_BACKEND_AUTO, &s, KILN_DTYPE_BF16, false, false, 1, 1, 2, A, 2, B, 1, C, 1,
                        false));
    CHECK_NEAR(C[0], 59904.0 + 1.0, 1e-7); /* 60000 in bf16 is 59904 */
    mp_scratch_free(&s);
}

/* The three products of a linear layer against the oracle, in both weight
 * layouts: W (OC, C) (nn.Linear) and W (C, OC) (HF Conv1D). */
static void test_linear_layer(void)
{
    enum { N = 70, C = 96, OC = 80 };
    static const kiln_dtype dts[] = {KILN_DTYPE_BF16, KILN_DTYPE_F16};
    for (int lay = 0; lay < 2; lay++)
    for (int di = 0; di < 2; di++) {
        kiln_dtype dt = dts[di];
        bool io = lay == 1;
        int ldw = io ? OC : C;
        kiln_rng r;
        kiln_rng_seed(&r, 42 + dt);
        float *W = malloc(sizeof(float) * OC * C), *x = malloc(sizeof(float) * N * C);
        float *b = malloc(sizeof(float) * OC), *dy = malloc(sizeof(float) * N * OC);
        float *y = malloc(sizeof(float) * N * OC), *y2 = malloc(sizeof(float) * N * OC);
        float *dx = malloc(sizeof(float) * N * C), *dx2 = malloc(sizeof(float) * N * C);
        float *dW = malloc(sizeof(float) * OC * C), *dW2 = malloc(sizeof(float) * OC * C);
        double *sc = malloc(sizeof(double) * N * (OC > C ? OC : C) * 2);
        fill(&r, W, OC * C, 0.1f);
        fill(&r, x, N * C, 1.f);
        fill(&r, b, OC, 0.1f);
        fill(&r, dy, N * OC, 0.01f);
        fill(&r, dW, OC * C, 0.01f);
        memcpy(dW2, dW, sizeof(float) * OC * C);
        mp_weight w;
        mp_scratch s = {0};
        const char *nm = kiln_dtype_name(dt);
        CHECK(mp_weight_init(&w, dt, OC, C, io));
        mp_weight_refresh(&w, W);
        CHECK(mp_linear_forward(MP_BACKEND_AUTO, &s, &w, x, b, N, y));
        oracle(dt, false, !io, N, OC, C, x, C, W, ldw, y2, OC, false, b, sc);
        double e = 0;
        for (int i = 0; i < N * OC; i++) e = check_max(e, fabs(y[i] - y2[i]) / (sc[i] + 0.1));
        CHECK_MSG(e < 2e-5, "%s in_out=%d forward error %g", nm, io, e);
        CHECK(mp_linear_backward_x(MP_BACKEND_AUTO, &s, &w, dy, N, dx, false));
        oracle(dt, false, io, N, C, OC, dy, OC, W, ldw, dx2, C, false, NULL, sc);
        e = 0;
        for (int i = 0; i < N * C; i++) e = check_max(e, fabs(dx[i] - dx2[i]) / sc[i]);
        CHECK_MSG(e < 2e-5, "%s in_out=%d backward_x error %g", nm, io, e);
        CHECK(mp_linear_backward_w(MP_BACKEND_AUTO, &s, dt, io, dy, x, N, OC, C, dW));
        if (io)
            oracle(dt, true, false, C, OC, N, x, C, dy, OC, dW2, OC, true, NULL, sc);
        else
            oracle(dt, true, false, OC, C, N, dy, OC, x, C, dW2, C, true, NULL, sc);
        e = 0;
        for (int i = 0; i < OC * C; i++) e = check_max(e, fabs(dW[i] - dW2[i]) / (sc[i] + 0.01));
        CHECK_MSG(e < 2e-5, "%s in_out=%d backward_w error %g", nm, io, e);
        /* After a weight update, refresh makes the packed copies follow. */
        for (int i = 0; i < OC * C; i++) W[i] *= -1;
        mp_weight_refresh(&w, W);
        CHECK(mp_linear_forward(MP_BACKEND_AUTO, &s, &w, x, NULL, N, y));
        oracle(dt, false, !io, N, OC, C, x, C, W, ldw, y2, OC, false, NULL, sc);
        e = 0;
        for (int i = 0; i < N * OC; i++) e = check_max(e, fabs(y[i] - y2[i]) / (sc[i] + 0.1));
        CHECK_MSG(e < 2e-5, "%s in_out=%d forward after refresh error %g", nm, io, e);
        mp_weight_free(&w);
        mp_scratch_free(&s);
        free(W), free(x), free(b), free(dy), free(y), free(y2), free(dx), free(dx2);
        free(dW), free(dW2), free(sc);
    }
}

/* The sgemm contract with alpha and beta (attention scores use alpha). */
static void test_sgemm_alpha_beta(void)
{
    enum { M = 40, N = 24, K = 64 };
    static const float ab[][2] = {{0.125f, 0.f}, {1.f, 0.f}, {1.f, 1.f}, {0.5f, 2.f}};
    kiln_rng r;
    kiln_rng_seed(&r, 8);
    float A[M * K], B[N * K], C[M * N], C2[M * N];
    double sc[M * N];
    fill(&r, A, M * K, 1.f);
    fill(&r, B, N * K, 1.f);
    mp_scratch s = {0};
    for (size_t i = 0; i < sizeof ab / sizeof ab[0]; i++) {
        float alpha = ab[i][0], beta = ab[i][1];
        fill(&r, C, M * N, 1.f);
        if (beta == 0) C[3] = __builtin_nanf(""); /* beta 0 ignores C */
        for (int j = 0; j < M * N; j++) C2[j] = C[j];
        CHECK(mp_sgemm(MP_BACKEND_AUTO, &s, KILN_DTYPE_BF16, false, true, M, N, K, alpha, A, K, B, K,
                       beta, C, N));
        float P[M * N];
        oracle(KILN_DTYPE_BF16, false, true, M, N, K, A, K, B, K, P, N, false, NULL, sc);
        double e = 0;
        for (int j = 0; j < M * N; j++) {
            double want = alpha * (double)P[j] + (beta == 0 ? 0 : beta * (double)C2[j]);
            e = check_max(e, fabs(C[j] - want) / (sc[j] + 1));
        }
        CHECK_MSG(e < 1e-5, "alpha %g beta %g: error %g", alpha, beta, e);
    }
    mp_scratch_free(&s);
}

/* bf16 products really are lower precision than fp32 (the oracle is not
 * fooling itself): against an fp32-input double product the error is
 * ~2^-9 relative, far above the fp32 tolerance. */
static void test_bf16_is_not_fp32(void)
{
    enum { M = 32, N = 32, K = 64 };
    kiln_rng r;
    kiln_rng_seed(&r, 3);
    float A[M * K], B[K * N], C[M * N];
    fill(&r, A, M * K, 1.f);
    fill(&r, B, K * N, 1.f);
    mp_scratch s = {0};
    CHECK(mp_gemm_f32io(MP_BACKEND_AUTO, &s, KILN_DTYPE_BF16, false, false, M, N, K, A, K, B, N, C, N,
                        false));
    double worst = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double e = 0, sa = 0;
            for (int k = 0; k < K; k++) {
                e += (double)A[m * K + k] * B[k * N + n];
                sa += fabs((double)A[m * K + k] * B[k * N + n]);
            }
            worst = check_max(worst, fabs(C[m * N + n] - e) / sa);
        }
    CHECK_MSG(worst > 1e-4 && worst < 1e-2, "bf16 relative error %g", worst);
    mp_scratch_free(&s);
}

/* ---- bf16 activation kernels (bf16_act.c) against double formulas ---- */

static double bfd(float x) { return (double)bf16_to_f32(f32_to_bf16(x)); }

static double gelu_d(double x)
{
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

static double gelu_grad_d(double x)
{
    double th = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x));
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x);
}

static double silu_d(double g) { return g / (1 + exp(-g)); }

/* act(x) for column c of row n of x (N, FH), kind as in mp_act_pack. */
static double act_d(const float *x, int FH, int F, int n, int c, int kind)
{
    double g = bfd(x[(size_t)n * FH + c]);
    return kind == MP_ACT_GELU ? gelu_d(g) : silu_d(g) * bfd(x[(size_t)n * FH + F + c]);
}

static void test_act_pack_and_bwd(void)
{
    enum { N = 37, F = 40 };
    for (int kind = MP_ACT_GELU; kind <= MP_ACT_SWIGLU; kind++) {
        int FH = kind == MP_ACT_SWIGLU ? 2 * F : F;
        kiln_rng r;
        kiln_rng_seed(&r, 50 + kind);
        float *x = malloc(sizeof(float) * N * FH), *d = malloc(sizeof(float) * N * F);
        float *dx = malloc(sizeof(float) * N * FH), *xu = malloc(sizeof(float) * N * FH);
        float *au = malloc(sizeof(float) * N * F);
        fill(&r, x, (size_t)N * FH, 2.f);
        fill(&r, d, (size_t)N * F, 1.f);
        uint16_t *xp = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, N, FH) * 2);
        uint16_t *ap = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, N, F) * 2);
        mp_act_pack(xp, ap, x, N, F, kind);
        mp_unpack_a(xu, FH, xp, N, FH);
        mp_unpack_a(au, F, ap, N, F);
        double ex = 0, ea = 0, eg = 0;
        for (int n = 0; n < N; n++)
            for (int c = 0; c < FH; c++) ex = check_max(ex, fabs(xu[n * FH + c] - bfd(x[n * FH + c])));
        for (int n = 0; n < N; n++)
            for (int c = 0; c < F; c++) {
                double want = act_d(x, FH, F, n, c, kind);
                ea = check_max(ea, fabs(au[n * F + c] - want) / (fabs(want) + 1e-3));
            }
        mp_act_bwd(dx, xp, d, N, F, kind);
        for (int n = 0; n < N; n++)
            for (int c = 0; c < F; c++) {
                double g = bfd(x[n * FH + c]), dv = d[n * F + c], want, want2 = 0;
                if (kind == MP_ACT_GELU) {
                    want = gelu_grad_d(g) * dv;
                } else {
                    double u = bfd(x[n * FH + F + c]), sg = 1 / (1 + exp(-g));
                    want = dv * u * sg * (1 + g * (1 - sg));
                    want2 = dv * silu_d(g);
                    eg = check_max(eg, fabs(dx[n * FH + F + c] - want2) / (fabs(want2) + 0.1));
                }
                eg = check_max(eg, fabs(dx[n * FH + c] - want) / (fabs(want) + 0.1));
            }
        /* the stored pre-activation is exactly bf16(x); act(x) is one bf16
         * rounding (2^-9) from the double formula; the gradient is fp32
         * (its tanh form loses ~1e-6 absolute where GELU' is near 0) */
        CHECK_MSG(ex == 0, "kind %d: stored pre-activation differs by %g", kind, ex);
        CHECK_MSG(ea < 4.5e-3, "kind %d: act error %g", kind, ea);
        CHECK_MSG(eg < 5e-5, "kind %d: act gradient error %g", kind, eg);
        /* padding rows and columns of the packed copies are zero */
        int nz = 0;
        for (int n = N; n < 64; n++)
            for (int c = 0; c < 64; c++) nz += ap[mp_packa_off(64, n, c)] != 0;
        for (int n = 0; n < N; n++)
            for (int c = F; c < 64; c++) nz += ap[mp_packa_off(64, n, c)] != 0;
        CHECK_EQ(nz, 0);
        free(x), free(d), free(dx), free(xu), free(au), free(xp), free(ap);
    }
}

/* The weight gradient from packed bf16 activations (with the activation
 * applied on the way, both weight layouts) against a double product of the
 * same bf16-rounded operands; the bias gradient against double sums. */
static void test_weight_grad_from_packed(void)
{
    enum { N = 70, C = 48, OC = 36 };
    for (int kind = MP_ACT_NONE; kind <= MP_ACT_SWIGLU; kind++)
        for (int io = 0; io < 2; io++) {
            int XH = kind == MP_ACT_SWIGLU ? 2 * C : C;
            kiln_rng r;
            kiln_rng_seed(&r, 90 + kind * 2 + io);
            float *x = malloc(sizeof(float) * N * XH), *dy = malloc(sizeof(float) * N * OC);
            float *dW = malloc(sizeof(float) * OC * C), *dW0 = malloc(sizeof(float) * OC * C);
            float *xa = malloc(sizeof(float) * N * C);
            fill(&r, x, (size_t)N * XH, 1.f);
            fill(&r, dy, (size_t)N * OC, 1.f);
            fill(&r, dW, (size_t)OC * C, 1.f);
            memcpy(dW0, dW, sizeof(float) * OC * C);
            uint16_t *xp = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, N, XH) * 2);
            uint16_t *ap = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, N, C) * 2);
            if (kind == MP_ACT_NONE) mp_pack_a(KILN_DTYPE_BF16, false, N, C, x, C, xp);
            else mp_act_pack(xp, ap, x, N, C, kind);
            /* the operand the product should see: act(x) rounded to bf16 */
            for (int n = 0; n < N; n++)
                for (int c = 0; c < C; c++)
                    xa[n * C + c] = kind == MP_ACT_NONE ? (float)bfd(x[n * XH + c])
                                                        : (float)bfd((float)act_d(x, XH, C, n, c, kind));
            mp_scratch s = {0};
            CHECK(mp_linear_backward_w_packed(MP_BACKEND_AUTO, &s, io, dy, xp, kind, N, OC, C, dW));
            double worst = 0;
            for (int o = 0; o < OC; o++)
                for (int c = 0; c < C; c++) {
                    double e = 0, sa = 0;
                    for (int n = 0; n < N; n++) {
                        double t = bfd(dy[n * OC + o]) * xa[n * C + c];
                        e += t;
                        sa += fabs(t);
                    }
                    size_t at = io ? (size_t)c * OC + o : (size_t)o * C + c;
                    /* the act value may round to the neighbouring bf16 */
                    worst = check_max(worst, fabs(dW[at] - dW0[at] - e) / (sa + 1));
                }
            CHECK_MSG(worst < (kind == MP_ACT_NONE ? 2e-6 : 1e-2), "kind %d io %d: error %g", kind,
                      io, worst);
            mp_scratch_free(&s);
            free(x), free(dy), free(dW), free(dW0), free(xa), free(xp), free(ap);
        }
    enum { BN = 300, BOC = 77 };
    kiln_rng r;
    kiln_rng_seed(&r, 7);
    float *d = malloc(sizeof(float) * BN * BOC), db[BOC];
    fill(&r, d, (size_t)BN * BOC, 1.f);
    for (int j = 0; j < BOC; j++) db[j] = 0.5f;
    mp_bias_grad(db, d, BN, BOC);
    double worst = 0;
    for (int j = 0; j < BOC; j++) {
        double e = 0.5;
        for (int n = 0; n < BN; n++) e += d[n * BOC + j];
        worst = check_max(worst, fabs(db[j] - e));
    }
    CHECK_MSG(worst < 1e-4, "bias gradient error %g", worst);
    free(d);
}

/* The one-pass packing of an output gradient against the three passes it
 * replaces (both packed forms bit for bit, padding included; the bias
 * gradient, summed in another order, to fp32 rounding), and the fused
 * linear backward against the separate products. */
static void test_pack_dy(void)
{
    /* the last one: many row blocks, odd edges */
    static const int shapes[][2] = {{1, 1}, {37, 45}, {70, 36}, {64, 32}, {300, 77}, {256, 512},
                                    {2053, 1100}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int threads = 1; threads <= 2; threads++) {
            int N = shapes[si][0], OC = shapes[si][1];
            omp_set_num_threads(threads);
            kiln_rng r;
            kiln_rng_seed(&r, 300 + (uint64_t)si);
            float *dy = malloc(sizeof(float) * N * OC), *db = malloc(sizeof(float) * OC);
            float *db0 = malloc(sizeof(float) * OC);
            fill(&r, dy, (size_t)N * OC, 1.f);
            fill(&r, db, (size_t)OC, 1.f);
            memcpy(db0, db, sizeof(float) * OC);
            size_t na = mp_packa_elems(KILN_DTYPE_BF16, N, OC), nt = mp_packa_elems(KILN_DTYPE_BF16, OC, N);
            uint16_t *pa = aligned_alloc(64, na * 2), *pt = aligned_alloc(64, nt * 2);
            uint16_t *pa0 = aligned_alloc(64, na * 2), *pt0 = aligned_alloc(64, nt * 2);
            memset(pa, 0xff, na * 2); /* padding must be written, not left */
            memset(pt, 0xff, nt * 2);
            float *part = malloc(sizeof(float) * mp_pack_dy_part_floats(N, OC));
            mp_pack_dy(pa, pt, false, db, part, dy, N, OC);
            mp_pack_a(KILN_DTYPE_BF16, false, N, OC, dy, OC, pa0);
            mp_pack_a(KILN_DTYPE_BF16, true, OC, N, dy, OC, pt0);
            mp_bias_grad(db0, dy, N, OC);
            CHECK_MSG(!memcmp(pa, pa0, na * 2), "N %d OC %d: packed dy differs", N, OC);
            CHECK_MSG(!memcmp(pt, pt0, nt * 2), "N %d OC %d: packed dy^T differs", N, OC);
            /* the tok form: packed B of dy over tokens */
            size_t nb = mp_packb_elems(KILN_DTYPE_BF16, N, OC);
            uint16_t *pb = aligned_alloc(64, nb * 2), *pb0 = aligned_alloc(64, nb * 2);
            memset(pb, 0xff, nb * 2);
            mp_pack_dy(pa, pb, true, NULL, NULL, dy, N, OC);
            mp_pack_b(KILN_DTYPE_BF16, false, N, OC, dy, OC, pb0);
            CHECK_MSG(!memcmp(pb, pb0, nb * 2), "N %d OC %d: dy packed over tokens differs", N, OC);
            CHECK_MSG(!memcmp(pa, pa0, na * 2), "N %d OC %d: packed dy differs (tok)", N, OC);
            /* and the activation over tokens as a left operand: dy's packed
             * copy standing in for a stored activation */
            size_t nx = mp_packa_elems(KILN_DTYPE_BF16, OC, N);
            uint16_t *xt = aligned_alloc(64, nx * 2);
            float *g = malloc(sizeof(float) * N * OC);
            for (int act = MP_ACT_NONE; act <= MP_ACT_GELU; act++) {
                memset(xt, 0xff, nx * 2);
                mp_pack_a_tokens(xt, pa0, N, OC, act);
                for (size_t t = 0; t < (size_t)N * OC; t++) {
                    float v = bf16_to_f32(f32_to_bf16(dy[t]));
                    g[t] = act == MP_ACT_GELU ? (float)bfd((float)gelu_d(v)) : v;
                }
                mp_pack_a(KILN_DTYPE_BF16, true, OC, N, g, OC, pt0);
                /* GELU by the vector formula against tanh in double: the
                 * bf16 of the two can differ in the last place (relative
                 * to |GELU| + 1e-3, as in test_act_pack_and_bwd) */
                int bad = 0;
                for (size_t t = 0; t < nx; t++) {
                    double u = bf16_to_f32(xt[t]), v = bf16_to_f32(pt0[t]);
                    bad += act == MP_ACT_NONE ? xt[t] != pt0[t]
                                              : fabs(u - v) / (fabs(v) + 1e-3) > 1.0 / 128;
                }
                CHECK_MSG(!bad, "N %d OC %d act %d: %d packed values of act(x)^T differ", N, OC, act,
                          bad);
            }
            free(pb), free(pb0), free(xt), free(g);
            /* the bias gradient is summed per 32 rows, then over the
             * blocks: fp32 rounding relative to the sum of |terms| */
            double worst = 0;
            for (int j = 0; j < OC; j++) {
                double sa = 1e-30;
                for (int n = 0; n < N; n++) sa += fabs(dy[(size_t)n * OC + j]);
                worst = check_max(worst, fabs((double)db[j] - db0[j]) / sa);
            }
            CHECK_MSG(worst <= N * 6e-8, "N %d OC %d: bias gradient differs by %g", N, OC, worst);
            free(dy), free(db), free(db0), free(pa), free(pt), free(pa0), free(pt0), free(part);
        }
    omp_set_num_threads(2);
    enum { N = 70, C = 48, OC = 36 };
    for (int io = 0; io < 2; io++) {
        kiln_rng r;
        kiln_rng_seed(&r, 400 + io);
        float *x = malloc(sizeof(float) * N * C), *dy = malloc(sizeof(float) * N * OC);
        float *W = malloc(sizeof(float) * OC * C), *dW = malloc(sizeof(float) * OC * C);
        float *dW0 = malloc(sizeof(float) * OC * C), *db = calloc(OC, sizeof(float));
        float *db0 = calloc(OC, sizeof(float)), *dx = malloc(sizeof(float) * N * C);
        float *dx0 = malloc(sizeof(float) * N * C);
        fill(&r, x, (size_t)N * C, 1.f);
        fill(&r, dy, (size_t)N * OC, 1.f);
        fill(&r, W, (size_t)OC * C, 1.f);
        fill(&r, dW, (size_t)OC * C, 1.f);
        memcpy(dW0, dW, sizeof(float) * OC * C);
        uint16_t *xp = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, N, C) * 2);
        mp_pack_a(KILN_DTYPE_BF16, false, N, C, x, C, xp);
        mp_weight w;
        CHECK(mp_weight_init(&w, KILN_DTYPE_BF16, OC, C, io));
        mp_weight_refresh(&w, W);
        mp_scratch s = {0};
        CHECK(mp_linear_backward_packed(MP_BACKEND_AUTO, &s, &w, dy, xp, MP_ACT_NONE, N, dW, true, db, dx));
        CHECK(mp_linear_backward_w_packed(MP_BACKEND_AUTO, &s, io, dy, xp, MP_ACT_NONE, N, OC, C, dW0));
        CHECK(mp_linear_backward_x(MP_BACKEND_AUTO, &s, &w, dy, N, dx0, false));
        mp_bias_grad(db0, dy, N, OC);
        CHECK_MSG(!memcmp(dW, dW0, sizeof(float) * OC * C), "io %d: weight gradient differs", io);
        CHECK_MSG(!memcmp(dx, dx0, sizeof(float) * N * C), "io %d: input gradient differs", io);
        double worst = 0;
        for (int j = 0; j < OC; j++) {
            double sa = 1e-30;
            for (int n = 0; n < N; n++) sa += fabs(dy[(size_t)n * OC + j]);
            worst = check_max(worst, fabs((double)db[j] - db0[j]) / sa);
        }
        CHECK_MSG(worst <= N * 6e-8, "io %d: bias gradient differs by %g", io, worst);
        mp_scratch_free(&s);
        mp_weight_free(&w);
        free(x), free(dy), free(W), free(dW), free(dW0), free(db), free(db0), free(dx), free(dx0), free(xp);
    }
}

/* The products with an epilogue against the same product stored in fp32
 * and the passes the epilogue replaces: the forward's GELU packing bit for
 * bit, and the MLP backward (weight, input gradients bit for bit, the bias
 * gradient of the inner layer to rounding, as it sums by 32-row blocks),
 * with padding rows/columns, on AMX and on the scratch fallback. */
static void test_epilogues(void)
{
    /* the second shape: several macro tiles of the AMX kernel each way */
    static const int shapes[2][4] = {{70, 48, 80, 36}, {2050, 64, 1056, 40}};
    mp_backend bes[2] = {MP_BACKEND_AMX, MP_BACKEND_AVX512};
    for (int si = 0; si < 2; si++)
    for (int bi = 0; bi < 2; bi++) {
        mp_backend be = bes[bi];
        int N = shapes[si][0], C = shapes[si][1], F = shapes[si][2], OC = shapes[si][3];
        if (si && be != MP_BACKEND_AMX) continue; /* the same mp_epi_block as AMX */
        if (!mp_backend_available(be)) {
            printf("  %s not available here: its epilogue case not run\n", mp_backend_name(be));
            continue;
        }
        for (int act = si ? MP_ACT_GELU : MP_ACT_NONE; act <= MP_ACT_GELU; act++) {
            kiln_rng r;
            kiln_rng_seed(&r, 500 + act);
            float *x = malloc(sizeof(float) * N * C), *W1 = malloc(sizeof(float) * F * C);
            float *b1 = malloc(sizeof(float) * F), *h = malloc(sizeof(float) * N * F);
            fill(&r, x, (size_t)N * C, 1.f);
            fill(&r, W1, (size_t)F * C, 0.3f);
            fill(&r, b1, (size_t)F, 0.5f);
            uint16_t *xp = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, N, C) * 2);
            size_t nh = mp_packa_elems(KILN_DTYPE_BF16, N, F);
            uint16_t *hp = aligned_alloc(64, nh * 2), *ap = aligned_alloc(64, nh * 2);
            uint16_t *hp0 = aligned_alloc(64, nh * 2), *ap0 = aligned_alloc(64, nh * 2);
            mp_pack_a(KILN_DTYPE_BF16, false, N, C, x, C, xp);
            mp_weight w1;
            CHECK(mp_weight_init(&w1, KILN_DTYPE_BF16, F, C, false));
            mp_weight_refresh(&w1, W1);
            mp_scratch s = {0};
            memset(hp, 0xff, nh * 2);
            memset(ap, 0xff, nh * 2);
            mp_epi e = {.kind = MP_EPI_ACT, .act = act, .M = N, .N = F, .xp = hp, .ap = ap};
            CHECK(mp_gemm_packed_epi(be, &s, N, F, C, xp, w1.fwd, b1, &e));
            mp_gemm_packed(be, KILN_DTYPE_BF16, N, F, C, xp, w1.fwd, h, F, false, b1);
            if (act == MP_ACT_GELU) mp_act_pack(hp0, ap0, h, N, F, act);
            else {
                mp_pack_a(KILN_DTYPE_BF16, false, N, F, h, F, hp0);
                memcpy(ap0, hp0, nh * 2);
            }
            CHECK_MSG(!memcmp(hp, hp0, nh * 2), "%s act %d: packed pre-activation differs",
                      mp_backend_name(be), act);
            CHECK_MSG(!memcmp(ap, ap0, nh * 2), "%s act %d: packed activation differs",
                      mp_backend_name(be), act);
            /* plain bf16 rows of the same product */
            uint16_t *rows = malloc(sizeof(uint16_t) * N * F), *rows0 = malloc(sizeof(uint16_t) * N * F);
            mp_epi er = {.kind = MP_EPI_ROWS, .M = N, .N = F, .xp = rows};
            CHECK(mp_gemm_packed_epi(be, &s, N, F, C, xp, w1.fwd, b1, &er));
            mp_f32_to_bf16(h, rows0, (size_t)N * F);
            CHECK_MSG(!memcmp(rows, rows0, sizeof(uint16_t) * N * F), "%s: bf16 rows differ",
                      mp_backend_name(be));
            free(rows), free(rows0);
            /* the backward, from the stored hp */
            for (int io = 0; io < 2; io++) {
                float *W2 = malloc(sizeof(float) * OC * F), *dy = malloc(sizeof(float) * N * OC);
                fill(&r, W2, (size_t)OC * F, 0.3f);
                fill(&r, dy, (size_t)N * OC, 1.f);
                mp_weight v1, v2;
                CHECK(mp_weight_init(&v1, KILN_DTYPE_BF16, F, C, io));
                CHECK(mp_weight_init(&v2, KILN_DTYPE_BF16, OC, F, io));
                mp_weight_refresh(&v1, W1);
                mp_weight_refresh(&v2, W2);
                float *g[2][5]; /* dW1 db1 dW2 db2 dx, fused and not */
                size_t sz[5] = {(size_t)F * C, F, (size_t)OC * F, OC, (size_t)N * C};
                for (int k = 0; k < 2; k++)
                    for (int q = 0; q < 5; q++) {
                        g[k][q] = malloc(sizeof(float) * sz[q]);
                        /* with io, the fused path stores the weight
                         * gradients (dw_acc false: NaN there must not be
                         * read); the other one adds them to zeros */
                        float v = io && (q == 0 || q == 2) ? (k == 0 ? NAN : 0.0f) : 0.25f;
                        for (size_t t = 0; t < sz[q]; t++) g[k][q][t] = v;
                    }
                CHECK(mp_mlp_backward_packed(be, &s, &v1, &v2, dy, xp, hp, act, N, g[0][0], g[0][1],
                                             g[0][2], g[0][3], g[0][4], !io));
                float *df = malloc(sizeof(float) * N * F), *dh = malloc(sizeof(float) * N * F);
                CHECK(mp_linear_backward_packed(be, &s, &v2, dy, hp, act, N, g[1][2], true, g[1][3],
                                                df));
                if (act == MP_ACT_GELU) mp_act_bwd(dh, hp, df, N, F, act);
                else memcpy(dh, df, sizeof(float) * N * F);
                CHECK(mp_linear_backward_packed(be, &s, &v1, dh, xp, MP_ACT_NONE, N, g[1][0], true,
                                                g[1][1], g[1][4]));
                const char *nm[5] = {"dW1", "db1", "dW2", "db2", "dx"};
                for (int q = 0; q < 5; q++) {
                    double worst = 0;
                    for (size_t t = 0; t < sz[q]; t++) {
                        /* db1 is summed in 32-row blocks, not row by row:
                         * fp32 rounding, relative to the sum of |terms| */
                        double scale = 1;
                        if (q == 1) {
                            scale = 0;
                            for (int n = 0; n < N; n++) scale += fabs(dh[(size_t)n * F + t]);
                        }
                        worst = check_max(worst, fabs((double)g[0][q][t] - g[1][q][t]) / scale);
                    }
                    CHECK_MSG(worst <= (q == 1 ? N * 6e-8 : 0), "%s act %d io %d: %s differs by %g",
                              mp_backend_name(be), act, io, nm[q], worst);
                }
                for (int k = 0; k < 2; k++)
                    for (int q = 0; q < 5; q++) free(g[k][q]);
                mp_weight_free(&v1);
                mp_weight_free(&v2);
                free(W2), free(dy), free(df), free(dh);
            }
            mp_scratch_free(&s);
            mp_weight_free(&w1);
            free(x), free(W1), free(b1), free(h), free(xp), free(hp), free(ap), free(hp0), free(ap0);
        }
    }
}

/* The fused residual add (MP_EPI_RES): out = res + (x W' + b) against the
 * product stored by mp_gemm_packed (bias included) and then added to res
 * here, bit for bit, on every backend: K within one chunk of the AMX
 * kernel (attention projection) and over several (K = 2048, the MLP
 * projection: the epilogue runs on the last chunk), M and N not multiples
 * of 32 (nothing past them written), and out == res. The MP_EPI_ACT case
 * at K over one chunk too, against mp_act_pack of the stored product. */
static void test_residual_epilogue(void)
{
    static const int shapes[3][3] = {{70, 48, 80}, {300, 100, 2048}, {2050, 64, 1056}};
    mp_backend bes[3] = {MP_BACKEND_AMX, MP_BACKEND_AVX512, MP_BACKEND_REF};
    int ran = 0;
    for (int si = 0; si < 3; si++)
        for (int bi = 0; bi < 3; bi++) {
            mp_backend be = bes[bi];
            int N = shapes[si][0], C = shapes[si][1], K = shapes[si][2];
            if (!mp_backend_available(be)) {
                printf("  %s not available here: its residual case not run\n", mp_backend_name(be));
                continue;
            }
            if (si == 2 && be == MP_BACKEND_REF) continue; /* slow, and as the avx512 case */
            kiln_rng r;
            kiln_rng_seed(&r, 700 + si);
            float *x = malloc(sizeof(float) * N * K), *W = malloc(sizeof(float) * C * K);
            float *b = malloc(sizeof(float) * C), *res = malloc(sizeof(float) * (N + 1) * C);
            float *y = malloc(sizeof(float) * N * C), *out = malloc(sizeof(float) * (N + 1) * C);
            float *ref = malloc(sizeof(float) * N * C), *inpl = malloc(sizeof(float) * N * C);
            fill(&r, x, (size_t)N * K, 1.f);
            fill(&r, W, (size_t)C * K, 0.1f);
            fill(&r, b, (size_t)C, 0.5f);
            fill(&r, res, (size_t)(N + 1) * C, 2.f);
            uint16_t *xp = aligned_alloc(64, mp_packa_elems(KILN_DTYPE_BF16, N, K) * 2);
            mp_pack_a(KILN_DTYPE_BF16, false, N, K, x, K, xp);
            mp_weight w;
            CHECK(mp_weight_init(&w, KILN_DTYPE_BF16, C, K, si == 1));
            mp_weight_refresh(&w, W);
            mp_scratch s = {0};
            mp_gemm_packed(be, KILN_DTYPE_BF16, N, C, K, xp, w.fwd, y, C, false, b);
            for (size_t t = 0; t < (size_t)N * C; t++) ref[t] = y[t] + res[t];
            for (size_t t = 0; t < (size_t)(N + 1) * C; t++) out[t] = -77.f;
            mp_epi e = {.kind = MP_EPI_RES, .M = N, .N = C, .out = out, .res = res};
            CHECK(mp_gemm_packed_epi(be, &s, N, C, K, xp, w.fwd, b, &e));
            CHECK_MSG(!memcmp(out, ref, sizeof(float) * N * C), "%s %dx%dx%d: residual sum differs",
                      mp_backend_name(be), N, C, K);
            bool tail = true;
            for (int j = 0; j < C; j++) tail &= out[(size_t)N * C + j] == -77.f;
            CHECK_MSG(tail, "%s %dx%dx%d: wrote past the last row", mp_backend_name(be), N, C, K);
            /* in place: out is res */
            memcpy(inpl, res, sizeof(float) * N * C);
            mp_epi ei = {.kind = MP_EPI_RES, .M = N, .N = C, .out = inpl, .res = inpl};
            CHECK(mp_gemm_packed_epi(be, &s, N, C, K, xp, w.fwd, b, &ei));
            CHECK_MSG(!memcmp(inpl, ref, sizeof(float) * N * C), "%s %dx%dx%d: in place differs",
                      mp_backend_name(be), N, C, K);
            /* a packing epilogue over several K chunks */
            size_t nh = mp_packa_elems(KILN_DTYPE_BF16, N, C);
            uint16_t *hp = aligned_alloc(64, nh * 2), *ap = aligned_alloc(64, nh * 2);
            uint16_t *hp0 = aligned_alloc(64, nh * 2), *ap0 = aligned_alloc(64, nh * 2);
            memset(hp, 0xff, nh * 2);
            memset(ap, 0xff, nh * 2);
            mp_epi ea = {.kind = MP_EPI_ACT, .act = MP_ACT_GELU, .M = N, .N = C, .xp = hp, .ap = ap};
            CHECK(mp_gemm_packed_epi(be, &s, N, C, K, xp, w.fwd, b, &ea));
            mp_act_pack(hp0, ap0, y, N, C, MP_ACT_GELU);
            CHECK_MSG(!memcmp(hp, hp0, nh * 2) && !memcmp(ap, ap0, nh * 2),
                      "%s %dx%dx%d: GELU epilogue differs", mp_backend_name(be), N, C, K);
            ran++;
            mp_scratch_free(&s);
            mp_weight_free(&w);
            free(x), free(W), free(b), free(res), free(y), free(out), free(ref), free(inpl), free(xp);
            free(hp), free(ap), free(hp0), free(ap0);
        }
    CHECK(ran > 0);
}

/* The fused norm with packed bf16 output (what the bf16 forward's norms
 * run) against the fast table's fp32 norm then mp_pack_a, byte for byte,
 * padding included (the output starts as 0xff), and the same mean and
 * rstd: LayerNorm with and without bias and RMSNorm, rows not a multiple
 * of 16 or 32, C not a multiple of 32, one row, and a training shape
 * (threaded). Inputs with an offset and a spread so that the output has
 * many rounding cases, plus a few rows of exact ties and huge values. */
static void test_norm_packed(void)
{
    static const int shapes[5][2] = {{70, 48}, {33, 100}, {1, 20}, {2048, 512}, {250, 768}};
    const kern_ops *k = kern_ops_fast();
    for (int si = 0; si < 5; si++)
        for (int kind = 0; kind < 3; kind++) { /* LN + bias, LN, RMS */
            int N = shapes[si][0], C = shapes[si][1];
            kiln_rng r;
            kiln_rng_seed(&r, 900 + si * 3 + kind);
            float *x = malloc(sizeof(float) * N * C), *w = malloc(sizeof(float) * C);
            float *b = malloc(sizeof(float) * C), *y = malloc(sizeof(float) * N * C);
            float *mean = malloc(sizeof(float) * N), *rstd = malloc(sizeof(float) * N);
            float *mean0 = malloc(sizeof(float) * N), *rstd0 = malloc(sizeof(float) * N);
            fill(&r, x, (size_t)N * C, 3.f);
            for (int n = 0; n < N; n++)
                for (int i = 0; i < C; i++) x[(size_t)n * C + i] += (float)(n % 7) - 3.f;
            if (N > 3)
                for (int i = 0; i < C; i++) x[(size_t)2 * C + i] = i % 2 ? 1e30f : -1e30f;
            fill(&r, w, (size_t)C, 1.f);
            fill(&r, b, (size_t)C, 0.5f);
            size_t np = mp_packa_elems(KILN_DTYPE_BF16, N, C);
            uint16_t *p = aligned_alloc(64, np * 2), *p0 = aligned_alloc(64, np * 2);
            memset(p, 0xff, np * 2);
            memset(p0, 0xee, np * 2);
            const float *bb = kind == 0 ? b : NULL;
            if (kind < 2) k->layernorm_fwd(y, mean0, rstd0, x, w, bb, N, C, 1e-5f);
            else k->rmsnorm_fwd(y, rstd0, x, w, N, C, 1e-5f);
            mp_pack_a(KILN_DTYPE_BF16, false, N, C, y, C, p0);
            kern_fast_norm_fwd_packed(p, mean, rstd, x, w, bb, N, C, 1e-5f, kind == 2);
            size_t diff = 0;
            for (size_t t = 0; t < np; t++) diff += p[t] != p0[t];
            CHECK_MSG(diff == 0, "%dx%d kind %d: %zu of %zu packed elements differ", N, C, kind,
                      diff, np);
            CHECK_MSG(!memcmp(rstd, rstd0, sizeof(float) * N), "%dx%d kind %d: rstd differs", N, C,
                      kind);
            if (kind < 2)
                CHECK_MSG(!memcmp(mean, mean0, sizeof(float) * N), "%dx%d kind %d: mean differs",
                          N, C, kind);
            /* and the values are the norm's (not, say, all zeros) */
            float v = bf16_to_f32(p[mp_packa_off((C + 31) / 32 * 32, N - 1, C - 1)]);
            CHECK_REL(v, y[(size_t)N * C - 1], 0.008);
            free(x), free(w), free(b), free(y), free(mean), free(rstd), free(mean0), free(rstd0);
            free(p), free(p0);
        }
}

/* The per-thread scratch: aligned, kept while big enough, grown when
 * asked for more, one buffer per slot and per thread. */
static void test_thread_scratch(void)
{
    char *a = mp_thread_scratch(MP_SCRATCH_GEMM, 100);
    CHECK(a && (uintptr_t)a % 64 == 0);
    if (!a) return;
    memset(a, 1, 100);
    CHECK(mp_thread_scratch(MP_SCRATCH_GEMM, 60) == a);
    char *b = mp_thread_scratch(MP_SCRATCH_ATTN_H, 100);
    CHECK(b && b != a);
    char *c = mp_thread_scratch(MP_SCRATCH_GEMM, 1 << 20);
    CHECK(c && (uintptr_t)c % 64 == 0);
    if (c) memset(c, 2, 1 << 20); /* ASan: the whole size is there */
    CHECK(mp_thread_scratch(MP_SCRATCH_ATTN_H, 100) == b);
    void *p[2] = {NULL, NULL};
    #pragma omp parallel num_threads(2)
    p[omp_get_thread_num() & 1] = mp_thread_scratch(MP_SCRATCH_ATTN_F, 4096);
    CHECK(p[0] != NULL);
    if (p[1]) CHECK(p[0] != p[1]);
}

static void test_amx_peak_probe(void)
{
    if (!mp_amx_usable()) SKIP("no AMX-BF16");
    for (int z = 0; z < 2; z++) {
        double pc = 0, g = mp_amx_peak_gflops(0.05, z == 1, &pc);
        printf("  AMX peak probe (%s operands): %.0f GFLOP/s (%.0f per CPU second)\n",
               z ? "zero" : "random", g, pc);
        CHECK(g > 10 && g < 100000);
        CHECK(pc > 100 && pc < 10000); /* 2000-3000 per core on Sapphire Rapids */
    }
}

/* The optimizer's strip-by-strip refresh writes the same bytes as
 * mp_weight_refresh, whatever order the strips come in, for both weight
 * layouts; weights it cannot do (fp16, a side not a multiple of 32, no
 * AVX512_BF16) say so with 0 rows. */
static void test_weight_refresh_strips(void)
{
    kiln_rng r;
    kiln_rng_seed(&r, 77);
    const struct { int OC, C; bool io; } cases[] = {
        {96, 64, true}, {96, 64, false}, {32, 32, true}, {64, 160, false}, {256, 96, true},
    };
    bool hw = mp_cpu_caps()->avx512_bf16;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        int OC = cases[ci].OC, C = cases[ci].C;
        bool io = cases[ci].io;
        int R = io ? C : OC;
        float *W = malloc(sizeof(float) * OC * C);
        fill(&r, W, (size_t)OC * C, 0.5f);
        W[3] = 1e-40f; /* a subnormal: the same flush either way */
        mp_weight a, b;
        CHECK(mp_weight_init(&a, KILN_DTYPE_BF16, OC, C, io));
        CHECK(mp_weight_init(&b, KILN_DTYPE_BF16, OC, C, io));
        size_t nf = mp_packb_elems(KILN_DTYPE_BF16, C, OC), nb = mp_packb_elems(KILN_DTYPE_BF16, OC, C);
        mp_weight_refresh(&a, W);
        memset(b.fwd, 0xab, nf * 2);
        memset(b.bwd, 0xab, nb * 2);
        int strip = mp_weight_strip_rows(&b);
        CHECK_EQ(strip, hw ? 32 : 0);
        if (strip) {
            for (int r0 = R - strip; r0 >= 0; r0 -= strip) mp_weight_refresh_strip(&b, W, r0);
            CHECK_MSG(memcmp(a.fwd, b.fwd, nf * 2) == 0, "OC %d C %d in_out %d: fwd copy differs",
                      OC, C, io);
            CHECK_MSG(memcmp(a.bwd, b.bwd, nb * 2) == 0, "OC %d C %d in_out %d: bwd copy differs",
                      OC, C, io);
        }
        mp_weight_free(&a);
        mp_weight_free(&b);
        free(W);
    }
    mp_weight w;
    CHECK(mp_weight_init(&w, KILN_DTYPE_BF16, 48, 64, true)); /* 48 rows of the (out, in) side */
    CHECK_EQ(mp_weight_strip_rows(&w), 0);
    mp_weight_free(&w);
    CHECK(mp_weight_init(&w, KILN_DTYPE_BF16, 64, 40, true));
    CHECK_EQ(mp_weight_strip_rows(&w), 0);
    mp_weight_free(&w);
    CHECK(mp_weight_init(&w, KILN_DTYPE_F16, 64, 64, true));
    CHECK_EQ(mp_weight_strip_rows(&w), 0);
    mp_weight_free(&w);
}

int main(void)
{
    const mp_caps *c = mp_cpu_caps();
    printf("  caps: avx512f=%d avx512_bf16=%d avx512_fp16=%d f16c=%d amx_bf16=%d amx_usable=%d best=%s\n",
           c->avx512f, c->avx512_bf16, c->avx512_fp16, c->f16c, c->amx_bf16, c->amx_usable,
           mp_backend_name(mp_backend_best()));
    RUN_TEST(test_bf16_known_values);
    RUN_TEST(test_f16_known_values);
    RUN_TEST(test_arrays_match_scalar);
    RUN_TEST(test_gemm_ref);
    RUN_TEST(test_gemm_avx512_bf16);
    RUN_TEST(test_gemm_amx);
    RUN_TEST(test_gemm_amx_stream);
    RUN_TEST(test_f16_overflow_is_inf);
    RUN_TEST(test_linear_layer);
    RUN_TEST(test_sgemm_alpha_beta);
    RUN_TEST(test_bf16_is_not_fp32);
    RUN_TEST(test_act_pack_and_bwd);
    RUN_TEST(test_weight_grad_from_packed);
    RUN_TEST(test_pack_dy);
    RUN_TEST(test_epilogues);
    RUN_TEST(test_residual_epilogue);
    RUN_TEST(test_norm_packed);
    RUN_TEST(test_thread_scratch);
    RUN_TEST(test_weight_refresh_strips);
    RUN_TEST(test_amx_peak_probe);
    return TEST_EXIT();
}
