/*
 * test_dist.c — the communication layer (src/train/dist.h) at any world
 * size. tests/run.sh runs it as a plain process (world size 1);
 * tests/t_dist.sh runs it under mpirun with 2 and 4 ranks, where every
 * rank runs every test, failures are summed across ranks and rank 0 prints
 * the PASS/FAIL lines. Expected values are computed in closed form from
 * each rank's known contribution.
 *
 * Fault modes for t_dist.sh (argv[1]): --watchdog (rank 1 is late to a
 * barrier; the watchdog must abort the job naming rank 1), --kill (rank 1
 * kills itself with SIGKILL; the job must end), --abandon (rank 1 fails,
 * leaves with dist_abandon and exit(2); the job must end), --mpi-error (an invalid MPI
 * call must give a clear message and a non-zero exit).
 */
#include "check.h"
#include "train/dist.h"

#include <math.h>
#include <string.h>
#include <signal.h>
#include <stdint.h>
#include <unistd.h>

#ifdef KILN_HAVE_MPI
#include <mpi.h>
#endif

static kiln_ctx *ctx;
static dist *D;
static int R, W;

static void test_world(void)
{
    CHECK(W >= 1);
    CHECK(R >= 0 && R < W);
    const char *e = getenv("OMPI_COMM_WORLD_SIZE");
    CHECK_EQ(W, e ? atoi(e) : 1);
    CHECK_EQ(dist_is_root(D), R == 0);
    /* Every rank agrees on the world size and holds a distinct rank. */
    double v[2] = {(double)W, (double)R};
    CHECK_EQ(dist_allreduce_sum_f64(ctx, D, v, 2), KILN_OK);
    CHECK_EQ((long long)v[0], (long long)W * W);
    CHECK_EQ((long long)v[1], (long long)W * (W - 1) / 2);
}

static void test_bcast(void)
{
    for (int root = 0; root < W; root += (W > 1 ? W - 1 : 1)) {
        size_t n = 100003;
        unsigned char *b = malloc(n);
        for (size_t i = 0; i < n; i++)
            b[i] = R == root ? (unsigned char)(i * 7 + 3) : 0;
        CHECK_EQ(dist_bcast(ctx, D, b, n, root), KILN_OK);
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += b[i] != (unsigned char)(i * 7 + 3);
        CHECK_EQ(bad, 0);
        free(b);
    }
    CHECK_EQ(dist_bcast(ctx, D, NULL, 0, W), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "root") != NULL);
}

static void test_allreduce(void)
{
    size_t n = 70001;
    float *f = malloc(n * sizeof *f);
    double *g = malloc(n * sizeof *g);
    for (size_t i = 0; i < n; i++) {
        f[i] = (float)(R + 1) + 0.5f * (float)(i % 1000);
        g[i] = (double)(R + 1) * 1e-3 + (double)i;
    }
    CHECK_EQ(dist_allreduce_sum_f32(ctx, D, f, n), KILN_OK);
    CHECK_EQ(dist_allreduce_sum_f64(ctx, D, g, n), KILN_OK);
    size_t badf = 0, badg = 0;
    double ws = (double)W * (W + 1) / 2;
    for (size_t i = 0; i < n; i++) {
        double ef = ws + (double)W * 0.5 * (double)(i % 1000);
        double eg = ws * 1e-3 + (double)W * (double)i;
        badf += f[i] != (float)ef;
        badg += fabs(g[i] - eg) > 1e-9 * fabs(eg) + 1e-12;
    }
    CHECK_EQ(badf, 0);
    CHECK_EQ(badg, 0);
    double m = (double)R;
    CHECK_EQ(dist_allreduce_max_f64(ctx, D, &m, 1), KILN_OK);
    CHECK_EQ((long long)m, W - 1);
    CHECK_EQ(dist_barrier(ctx, D), KILN_OK);
    free(f);
    free(g);
}

/* Fills the gradients of this rank: g = (rank+1) * (1 + i % 97). The
 * average over ranks is (W+1)/2 * (1 + i % 97). */
static void fill_grads(float *g, size_t n)
{
    for (size_t i = 0; i < n; i++)
        g[i] = (float)(R + 1) * (float)(1 + i % 97);
}

static size_t check_avg(const float *g, size_t n)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        float e = (float)((W + 1) / 2.0 * (double)(1 + i % 97));
        bad += fabsf(g[i] - e) > 1e-6f * e;
    }
    return bad;
}

/* Reports the block as a backward pass would: "layers" of irregular sizes
 * in reverse order, some ranges spanning bucket boundaries, one range
 * (the first 37 floats) only when report_all. */
static void report_ranges(size_t n, bool report_all)
{
    size_t cuts[] = {37, 1000, 1001, 2500, 4999, 5000, 7777, 9000};
    size_t nc = sizeof cuts / sizeof *cuts;
    size_t hi = n;
    for (size_t c = nc; c-- > 0;) {
        size_t lo = cuts[c];
        /* split each layer's range into two pieces, high half first */
        size_t mid = lo + (hi - lo) / 2;
        dist_grad_ready(D, mid, hi - mid);
        dist_grad_ready(D, lo, mid - lo);
        hi = lo;
    }
    if (report_all) dist_grad_ready(D, 0, hi);
}

static void test_grads_bucketed(void)
{
    size_t n = 10007;
    float *g = malloc(n * sizeof *g);
    for (int mode = 0; mode < 4; mode++) {
        bool overlap = mode & 1, all = !(mode & 2);
        dist_set_bucket_bytes(D, 1000 * sizeof(float));
        dist_set_overlap(D, overlap);
        fill_grads(g, n);
        dist_stats s0, s1;
        dist_stats_get(D, &s0);
        CHECK_EQ(dist_grads_begin(ctx, D, g, n), KILN_OK);
        report_ranges(n, all);
        CHECK_EQ(dist_grads_finish(ctx, D), KILN_OK);
        dist_stats_get(D, &s1);
        size_t bad = check_avg(g, n);
        CHECK_MSG(bad == 0, "mode %d: %zu wrong averages", mode, bad);
        if (W > 1) /* 11 buckets of up to 1000 floats */
            CHECK_EQ(s1.collectives - s0.collectives, 11);
        else
            CHECK_EQ(s1.collectives, s0.collectives);
    }
    /* A range reported twice breaks the contract: reported, not hidden. */
    fill_grads(g, n);
    dist_set_overlap(D, true);
    CHECK_EQ(dist_grads_begin(ctx, D, g, n), KILN_OK);
    report_ranges(n, true);
    dist_grad_ready(D, 0, 10);
    kiln_status st = dist_grads_finish(ctx, D);
    if (W > 1) CHECK_EQ(st, KILN_ERR_INTERNAL);
    CHECK_EQ(dist_grads_finish(ctx, D), KILN_ERR_INTERNAL); /* not begun */
    /* A large block in the default 25 MB buckets, one range. */
    dist_set_bucket_bytes(D, 25u << 20);
    size_t big = 9u << 20; /* 36 MB: two buckets */
    float *gb = malloc(big * sizeof *gb);
    fill_grads(gb, big);
    CHECK_EQ(dist_grads_begin(ctx, D, gb, big), KILN_OK);
    dist_grad_ready(D, big / 2, big - big / 2);
    dist_grad_ready(D, 0, big / 2);
    CHECK_EQ(dist_grads_finish(ctx, D), KILN_OK);
    CHECK_EQ(check_avg(gb, big), 0);
    free(gb);
    free(g);
}

static void test_shards(void)
{
    size_t ns[] = {0, 1, 15, 16, 17, 1000, 100003};
    for (size_t k = 0; k < sizeof ns / sizeof *ns; k++) {
        size_t n = ns[k], next = 0;
        for (int r = 0; r < W; r++) {
            size_t o, l;
            dist_shard_range(D, n, r, &o, &l);
            CHECK_EQ(o, next);
            CHECK(o % 16 == 0 || l == 0);
            next = o + l;
        }
        CHECK_EQ(next, n);
    }
    size_t n = 100003;
    float *b = malloc(n * sizeof *b);
    for (size_t i = 0; i < n; i++) b[i] = (float)(R + 1) * (float)(i % 1013);
    CHECK_EQ(dist_reduce_scatter_f32(ctx, D, b, n), KILN_OK);
    size_t o, l, bad = 0;
    dist_shard_range(D, n, R, &o, &l);
    float ws = (float)(W * (W + 1) / 2);
    for (size_t i = o; i < o + l; i++) bad += b[i] != ws * (float)(i % 1013);
    CHECK_EQ(bad, 0);
    /* all-gather: each rank fills only its own shard */
    for (size_t i = 0; i < n; i++) b[i] = -1.0f;
    for (size_t i = o; i < o + l; i++) b[i] = (float)i * 0.25f;
    CHECK_EQ(dist_allgather_f32(ctx, D, b, n), KILN_OK);
    bad = 0;
    for (size_t i = 0; i < n; i++) bad += b[i] != (float)i * 0.25f;
    CHECK_EQ(bad, 0);
    free(b);
    /* gather shards to the last rank, scatter them back from it */
    int root = W - 1;
    float *shard = malloc((l ? l : 1) * sizeof *shard);
    float *full = malloc(n * sizeof *full);
    for (size_t i = 0; i < l; i++) shard[i] = (float)(o + i) + 0.5f;
    for (size_t i = 0; i < n; i++) full[i] = -7;
    CHECK_EQ(dist_gather_shards_f32(ctx, D, shard, R == root ? full : NULL, n,
                                    root),
             KILN_OK);
    bad = 0;
    if (R == root)
        for (size_t i = 0; i < n; i++) bad += full[i] != (float)i + 0.5f;
    CHECK_EQ(bad, 0);
    for (size_t i = 0; i < l; i++) shard[i] = 0;
    if (R == root)
        for (size_t i = 0; i < n; i++) full[i] = (float)i * 3.0f;
    CHECK_EQ(dist_scatter_shards_f32(ctx, D, R == root ? full : NULL, shard, n,
                                     root),
             KILN_OK);
    bad = 0;
    for (size_t i = 0; i < l; i++) bad += shard[i] != (float)(o + i) * 3.0f;
    CHECK_EQ(bad, 0);
    free(shard);
    free(full);
}

static void test_dist_opts(void)
{
    /* The settings of kiln_dist_opts reach the handle; one out of range is
     * an error naming the field (checked on a fresh handle only at world
     * size 1: MPI cannot be initialized twice). */
    kiln_dist_opts o = kiln_dist_opts_default();
    CHECK_NEAR(o.timeout_s, 300, 0);
    CHECK_NEAR(o.bucket_mb, 25, 0);
    CHECK(o.overlap && o.progress_table);
    dist *d2 = NULL;
    o.timeout_s = -1;
    CHECK_EQ(dist_init(ctx, &d2, &o), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_dist_opts.timeout_s") != NULL);
    CHECK(d2 == NULL);
    o.timeout_s = 12.5;
    o.bucket_mb = NAN;
    CHECK_EQ(dist_init(ctx, &d2, &o), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "kiln_dist_opts.bucket_mb") != NULL);
    CHECK(d2 == NULL);
    o.bucket_mb = 25;
    o.overlap = false;
    CHECK_EQ(dist_init(ctx, &d2, &o), KILN_OK);
    CHECK_NEAR(dist_timeout(d2), 12.5, 1e-12);
    CHECK(!dist_overlap(d2));
    dist_free(d2);
    CHECK_EQ(dist_init(ctx, &d2, NULL), KILN_OK);
    CHECK_NEAR(dist_timeout(d2), 300, 1e-12);
    CHECK(dist_overlap(d2));
    dist_free(d2);
}

static int fails_total;

#define DRUN(fn)                                                           \
    do {                                                                   \
        check_fails_ = 0;                                                  \
        check_skip_ = NULL;                                                \
        fn();                                                              \
        double f_ = check_fails_;                                          \
        dist_allreduce_sum_f64(ctx, D, &f_, 1);                            \
        if (R == 0) {                                                      \
            if (f_ > 0) printf("FAIL %s\n", #fn);                          \
            else if (check_skip_) printf("SKIP %s: %s\n", #fn, check_skip_); \
            else printf("PASS %s\n", #fn);                                 \
            fflush(stdout);                                                \
        }                                                                  \
        fails_total += f_ > 0;                                             \
        check_total_fails_ += f_ > 0;                                      \
    } while (0)

static int fault_mode(const char *mode)
{
    dist_set_timeout(D, 3.0);
    if (!strcmp(mode, "--watchdog")) {
        if (R == 1) sleep(30);
        dist_barrier(ctx, D);
        return 0;
    }
    if (!strcmp(mode, "--kill")) {
        double x = 1;
        dist_allreduce_sum_f64(ctx, D, &x, 1);
        dist_set_timeout(D, 60.0); /* Open MPI's detection, not the watchdog */
        if (R == 1) raise(SIGKILL);
        dist_barrier(ctx, D);
        sleep(60);
        return 0;
    }
    if (!strcmp(mode, "--abandon")) {
        dist_set_timeout(D, 60.0);
        if (R == 1) {
            fprintf(stderr, "rank 1: simulated error, leaving\n");
            dist_abandon(D);
            exit(2);
        }
        dist_barrier(ctx, D);
        sleep(60);
        return 0;
    }
#ifdef KILN_HAVE_MPI
    if (!strcmp(mode, "--mpi-error")) {
        int x = 0;
        if (R == 0) MPI_Send(&x, 1, MPI_INT, W + 5, 0, MPI_COMM_WORLD);
        dist_barrier(ctx, D);
        return 0;
    }
#endif
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}

int main(int argc, char **argv)
{
    ctx = kiln_ctx_new();
    kiln_dist_opts dopts = kiln_dist_opts_default();
    dopts.timeout_s = 60.0;
    if (dist_init(ctx, &D, &dopts)) {
        fprintf(stderr, "dist_init: %s\n", kiln_errmsg(ctx));
        printf("FAIL dist_init\n");
        return 1;
    }
    R = dist_rank(D);
    W = dist_world(D);
    if (argc > 1) {
        int rc = fault_mode(argv[1]);
        dist_free(D);
        kiln_ctx_free(ctx);
        return rc;
    }
    DRUN(test_world);
    DRUN(test_bcast);
    DRUN(test_allreduce);
    DRUN(test_grads_bucketed);
    DRUN(test_shards);
    /* a fresh handle only in a plain process (MPI cannot be initialized
     * twice); the plain run of this program runs it, the mpirun ones not */
    if (W == 1 && !dist_uses_mpi(D)) DRUN(test_dist_opts);
    dist_free(D);
    kiln_ctx_free(ctx);
    return fails_total ? 1 : 0;
}
