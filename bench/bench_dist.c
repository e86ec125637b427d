/*
 * bench_dist.c — allreduce bus bandwidth over message sizes.
 *
 * Run plainly (as bench/run.sh does) it relaunches itself under
 * `mpirun -np KILN_BENCH_RANKS` (default 2, oversubscribed); under mpirun it
 * measures, for message sizes from 4 KB to 64 MB:
 *   - kiln's dist_allreduce_sum_f32 (non-blocking + watchdog polling),
 *   - a plain blocking MPI_Allreduce of the same buffer (the reference:
 *     ratio = kiln / MPI shows the watchdog's overhead),
 *   - the overlapped bucketed gradient path (dist_grads_begin/finish) for
 *     the large sizes,
 * and prints time per call, algorithm bandwidth (bytes / time) and bus
 * bandwidth (algbw * 2(N-1)/N, the figure comparable across world sizes
 * and with nccl-tests), the slowest rank's time counting. One line per size.
 */
#include "train/dist.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef KILN_HAVE_MPI
#include <mpi.h>
#endif

static int relaunch(char **argv)
{
    const char *np = getenv("KILN_BENCH_RANKS");
    if (!np || !*np) np = "2";
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
    char self[4096];
    ssize_t k = readlink("/proc/self/exe", self, sizeof self - 1);
    if (k <= 0) return 1;
    self[k] = 0;
    char *args[] = {"mpirun", "--oversubscribe", "-np", (char *)np, self, NULL};
    fflush(stdout);
    execvp("mpirun", args);
    printf("bench_dist: mpirun not found (apt-get install openmpi-bin); "
           "nothing measured\n");
    (void)argv;
    return 0;
}

#ifdef KILN_HAVE_MPI
/* Times reps calls of fn over the slowest rank; returns seconds per call. */
static double slowest(double t) {
    MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return t;
}
#endif

int main(int argc, char **argv)
{
    (void)argc;
    const char *lw = getenv("OMPI_COMM_WORLD_SIZE");
    if (!lw) return relaunch(argv);
#ifndef KILN_HAVE_MPI
    printf("bench_dist: built without MPI; nothing measured\n");
    return 0;
#else
    kiln_ctx *ctx = kiln_ctx_new();
    dist *d;
    kiln_dist_opts dopts = kiln_dist_opts_default();
    dopts.timeout_s = 120;
    if (dist_init(ctx, &d, &dopts)) {
        fprintf(stderr, "bench_dist: %s\n", kiln_errmsg(ctx));
        return 1;
    }
    int R = dist_rank(d), W = dist_world(d);
    double busf = 2.0 * (W - 1) / W;
    size_t maxb = (size_t)64 << 20;
    float *buf = malloc(maxb);
    for (size_t i = 0; i < maxb / 4; i++) buf[i] = 1e-6f * (float)(i % 1000);
    if (R == 0) {
        printf("allreduce f32, %d ranks on one node (shared memory), "
               "slowest rank, bus bw = alg bw * 2(N-1)/N\n", W);
        printf("%10s %12s %12s %12s %12s %10s\n", "bytes", "kiln us",
               "kiln busGB/s", "MPI us", "MPI busGB/s", "kiln/MPI");
    }
    for (size_t bytes = 4096; bytes <= maxb; bytes *= 4) {
        size_t n = bytes / 4;
        int reps = (int)(((size_t)256 << 20) / bytes);
        if (reps < 3) reps = 3;
        if (reps > 200) reps = 200;
        /* warm up both paths */
        dist_allreduce_sum_f32(ctx, d, buf, n);
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM,
                      MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int r = 0; r < reps; r++) dist_allreduce_sum_f32(ctx, d, buf, n);
        double tk = slowest((MPI_Wtime() - t0) / reps);
        MPI_Barrier(MPI_COMM_WORLD);
        t0 = MPI_Wtime();
        for (int r = 0; r < reps; r++)
            MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM,
                          MPI_COMM_WORLD);
        double tm = slowest((MPI_Wtime() - t0) / reps);
        if (R == 0)
            printf("%10zu %12.1f %12.3f %12.1f %12.3f %10.2f\n", bytes,
                   tk * 1e6, busf * (double)bytes / tk / 1e9, tm * 1e6,
                   busf * (double)bytes / tm / 1e9, tm / tk);
        /* keep values bounded */
        for (size_t i = 0; i < n; i++) buf[i] = 1e-6f * (float)(i % 1000);
    }
    /* Bucketed gradient averaging of a 64 MB block in 25 MB buckets, with
     * the non-blocking (overlap) path and the blocking (overlap off) path,
     * without compute to overlap with: the raw cost of each path. */
    for (int ov = 1; ov >= 0; ov--) {
        size_t n = maxb / 4;
        int reps = 4;
        dist_set_overlap(d, ov);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int r = 0; r < reps; r++) {
            dist_grads_begin(ctx, d, buf, n);
            dist_grad_ready(d, n / 2, n - n / 2);
            dist_grad_ready(d, 0, n / 2);
            dist_grads_finish(ctx, d);
        }
        double tb = slowest((MPI_Wtime() - t0) / reps);
        if (R == 0)
            printf("gradient averaging, 64 MB in 25 MB buckets, %s: %.1f ms "
                   "(bus %.3f GB/s)\n",
                   ov ? "MPI_Iallreduce (overlap on)"
                      : "blocking MPI_Allreduce (overlap off)",
                   tb * 1e3, busf * (double)maxb / tb / 1e9);
    }
    free(buf);
    dist_free(d);
    kiln_ctx_free(ctx);
    return 0;
#endif
}
