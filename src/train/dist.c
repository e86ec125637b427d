/*
 * dist.c — the communication layer (dist.h): MPI job detection and setup,
 * collectives waited on with a watchdog deadline, bucketed overlapped
 * gradient averaging, ZeRO-1 reduce-scatter / all-gather, and a world-size-1
 * fallback used by plain processes and by builds without MPI. Why it is over
 * ~800 lines: every MPI call of the project is here, behind one watchdog
 * (a rank that waits goes through the same deadline), with its #ifdef
 * KILN_HAVE_MPI fallback beside it.
 *
 * Collectives are Open MPI's blocking ones (its tuned algorithms are much
 * faster than the non-blocking schedules at large sizes), guarded by a
 * watchdog thread: each wait arms a deadline; if the wait is still armed
 * when it passes (checked every min(1 s, timeout/10)), the thread prints what was waited on and exits the
 * process with status 3, and mpirun then terminates every other rank. The
 * thread makes no MPI calls, so MPI runs at MPI_THREAD_FUNNELED. Gradient
 * buckets are MPI_Iallreduce (to overlap backward) finished by a guarded
 * MPI_Waitall. To say *which* ranks
 * are missing when a deadline passes, the ranks of one node share a small
 * progress table (MPI_Win_allocate_shared): each rank stores the sequence
 * number and name of the collective it is in with plain atomic stores, at
 * no communication cost, and the rank whose watchdog fires reads the others'
 * slots. Ranks on other nodes report their own timeouts.
 */
#include "train/dist.h"

#include "base/base.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef KILN_HAVE_MPI
#include <mpi.h>
#include <pthread.h>
#include <stdarg.h>
#include <unistd.h>
#endif

#define DIST_DEFAULT_TIMEOUT 300.0
#define DIST_DEFAULT_BUCKET_MB 25.0
#define DIST_SHARD_ALIGN 16
/* Largest element count handed to one MPI call (counts are int). */
#define DIST_CHUNK ((size_t)1 << 28)

#ifdef KILN_HAVE_MPI
/* One slot of the node's progress table (shared memory). */
typedef struct dist_slot {
    int64_t entered; /* sequence number of the last collective entered */
    int64_t done;    /* sequence number of the last collective completed */
    int32_t world_rank;
    char name[52];   /* name of the last collective entered */
} dist_slot;
#endif

struct dist {
    int rank, world;
    bool mpi;        /* talks to other processes */
    bool we_init;    /* dist_init called MPI_Init_thread */
    double timeout;
    size_t bucket_bytes;
    bool overlap;
    bool progress_table; /* kiln_dist_opts.progress_table */
    dist_stats st;

    /* gradient averaging state */
    bool g_active;
    bool g_overlap;
    bool g_bad;          /* a float was reported twice or out of range */
    float *g;            /* (n) the gradient block */
    size_t gn;
    size_t bucket_floats;
    size_t nb, nb_cap;
    size_t *ready;       /* (nb) floats reported final per bucket */
    bool *started;       /* (nb) */
    double g_bytes_started;

#ifdef KILN_HAVE_MPI
    MPI_Comm comm;
    MPI_Errhandler eh;
    MPI_Request *req;    /* (nb) one per bucket */
    int64_t seq;         /* collectives started on comm */
    const char *cur;     /* name of the collective being waited on */
    size_t cur_bytes;
    /* node-local progress table */
    MPI_Comm node;
    MPI_Win win;
    bool have_win;
    int node_size, node_rank;
    dist_slot *slots;    /* (node_size) */
    /* watchdog thread and the wait it guards */
    pthread_t wd_thread;
    pthread_mutex_t wd_mu;
    pthread_cond_t wd_cv;
    bool wd_init, wd_running, wd_quit, wd_armed;
    double wd_t0, wd_deadline;
    int64_t wd_seq;
    const char *wd_name;
    size_t wd_bytes;
#endif
};

/* ---- environment ----------------------------------------------------- */

static int env_int(const char *name, int dflt)
{
    const char *s = getenv(name);
    if (!s || !*s) return dflt;
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || v < 0 || v > INT_MAX) return dflt;
    return (int)v;
}

/* The world size the launcher announced (0 when not launched by one). */
static int launcher_world(void)
{
    int n = env_int("OMPI_COMM_WORLD_SIZE", 0);
    if (!n) n = env_int("PMIX_SIZE", 0);
    if (!n) n = env_int("PMI_SIZE", 0);
    if (!n && getenv("PMIX_RANK")) n = 1;
    return n;
}

/* ---- MPI parts ------------------------------------------------------- */

#ifdef KILN_HAVE_MPI

/* The attribute key that lets the error handler find its dist. A
 * process-wide MPI handle created once; MPI offers no other way to pass
 * user data to an error handler. */
static int dist_keyval = MPI_KEYVAL_INVALID;

static void on_mpi_error(MPI_Comm *comm, int *code, ...)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(*code, msg, &len);
    dist *d = NULL;
    int flag = 0;
    if (dist_keyval != MPI_KEYVAL_INVALID)
        MPI_Comm_get_attr(*comm, dist_keyval, &d, &flag);
    int r = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    if (flag && d)
        fprintf(stderr,
                "kiln: rank %d: MPI error in collective #%lld '%s': %s; "
                "aborting the job\n",
                r, (long long)d->seq, d->cur ? d->cur : "(none)", msg);
    else
        fprintf(stderr, "kiln: rank %d: MPI error: %s; aborting the job\n", r,
                msg);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 4);
}

static void slot_enter(dist *d, const char *name)
{
    if (!d->have_win) return;
    dist_slot *s = &d->slots[d->node_rank];
    snprintf(s->name, sizeof s->name, "%s", name);
    __atomic_store_n(&s->entered, d->seq, __ATOMIC_RELEASE);
}

static void slot_done(dist *d, int64_t seq)
{
    if (!d->have_win) return;
    __atomic_store_n(&d->slots[d->node_rank].done, seq, __ATOMIC_RELEASE);
}

/* Prints why the watchdog fired: the collective and the node-local ranks
 * that have not reached it. Runs on the watchdog thread (no MPI calls). */
static void watchdog_report(dist *d, int64_t seq, const char *name,
                            size_t bytes, double waited)
{
    char who[1024] = "";
    size_t w = 0;
    int missing = 0;
    if (d->have_win) {
        for (int i = 0; i < d->node_size; i++) {
            dist_slot *s = &d->slots[i];
            int64_t e = __atomic_load_n(&s->entered, __ATOMIC_ACQUIRE);
            if (i == d->node_rank || e >= seq) continue;
            char nm[sizeof s->name];
            memcpy(nm, s->name, sizeof nm);
            nm[sizeof nm - 1] = 0;
            if (w < sizeof who - 128)
                w += (size_t)snprintf(who + w, sizeof who - w,
                                      "%s%d (last entered #%lld '%s')",
                                      missing ? ", " : "", s->world_rank,
                                      (long long)e, e > 0 ? nm : "-");
            missing++;
        }
    }
    fprintf(stderr,
            "kiln: rank %d: watchdog: collective #%lld '%s' (%.1f MB) did "
            "not complete within %.0f s (waited %.1f s); ",
            d->rank, (long long)seq, name ? name : "?", (double)bytes / 1e6,
            d->timeout, waited);
    if (missing)
        fprintf(stderr, "rank%s that did not reach it: %s. ",
                missing > 1 ? "s" : "", who);
    else if (d->have_win && d->node_size == d->world)
        fprintf(stderr, "every rank entered it (a rank is stuck inside it or "
                        "the interconnect failed). ");
    else
        fprintf(stderr, "ranks on other nodes report their own state. ");
    fprintf(stderr, "Aborting the job (raise kiln_dist_opts.timeout_s if the "
                    "ranks are just slow).\n");
    fflush(stderr);
}

static double mono_now(void) { return kiln_time_now(); }

static struct timespec mono_ts(double t)
{
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* The watchdog thread: sleeps until a wait is armed, then until its
 * deadline; if the wait is still armed then, reports and ends the process
 * with exit status 3, which makes mpirun abort every other rank. It makes
 * no MPI calls (MPI runs at MPI_THREAD_FUNNELED). */
static void *watchdog_main(void *arg)
{
    dist *d = arg;
    /* Polls instead of being signalled, so arming a wait costs an
     * uncontended lock and no wake-up; a hang is caught within the
     * timeout plus one period. */
    double period = KILN_MIN(1.0, KILN_MAX(0.01, d->timeout / 10));
    pthread_mutex_lock(&d->wd_mu);
    while (!d->wd_quit) {
        double now = mono_now();
        if (d->wd_armed && now >= d->wd_deadline) {
            watchdog_report(d, d->wd_seq, d->wd_name, d->wd_bytes,
                            now - d->wd_t0);
            _exit(3);
        }
        period = KILN_MIN(1.0, KILN_MAX(0.01, d->timeout / 10));
        struct timespec ts = mono_ts(now + period);
        pthread_cond_timedwait(&d->wd_cv, &d->wd_mu, &ts);
    }
    pthread_mutex_unlock(&d->wd_mu);
    return NULL;
}

/* Marks the start of a collective (for the table, stats and messages). */
static void coll_start(dist *d, const char *name, size_t bytes)
{
    d->seq++;
    d->cur = name;
    d->cur_bytes = bytes;
    d->st.collectives++;
    d->st.bytes += (double)bytes;
    slot_enter(d, name);
}

/* Arms the watchdog around a blocking wait on the current collective. */
static double guard_begin(dist *d)
{
    double t0 = mono_now();
    if (d->wd_running) {
        pthread_mutex_lock(&d->wd_mu);
        d->wd_armed = true;
        d->wd_t0 = t0;
        d->wd_deadline = t0 + d->timeout;
        d->wd_seq = d->seq;
        d->wd_name = d->cur;
        d->wd_bytes = d->cur_bytes;
        pthread_mutex_unlock(&d->wd_mu);
    }
    return t0;
}

static void guard_end(dist *d, double t0)
{
    if (d->wd_running) {
        pthread_mutex_lock(&d->wd_mu);
        d->wd_armed = false;
        pthread_mutex_unlock(&d->wd_mu);
    }
    d->st.wait_s += mono_now() - t0;
    slot_done(d, d->seq);
}

/* Waits for n requests under the watchdog. */
static void wait_all(dist *d, int n, MPI_Request *reqs)
{
    double t0 = guard_begin(d);
    MPI_Waitall(n, reqs, MPI_STATUSES_IGNORE);
    guard_end(d, t0);
}

static kiln_status watchdog_start(kiln_ctx *ctx, dist *d)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&d->wd_mu, NULL);
    pthread_cond_init(&d->wd_cv, &ca);
    pthread_condattr_destroy(&ca);
    d->wd_init = true;
    if (pthread_create(&d->wd_thread, NULL, watchdog_main, d)) {
        kiln_log(ctx, KILN_LOG_WARN,
                 "rank %d: cannot start the collective watchdog thread; "
                 "collectives run without a timeout", d->rank);
        return KILN_OK;
    }
    d->wd_running = true;
    return KILN_OK;
}

static void watchdog_stop(dist *d)
{
    if (d->wd_running) {
        pthread_mutex_lock(&d->wd_mu);
        d->wd_quit = true;
        pthread_cond_signal(&d->wd_cv);
        pthread_mutex_unlock(&d->wd_mu);
        pthread_join(d->wd_thread, NULL);
        d->wd_running = false;
    }
    if (d->wd_init) {
        pthread_mutex_destroy(&d->wd_mu);
        pthread_cond_destroy(&d->wd_cv);
        d->wd_init = false;
    }
}

static kiln_status mpi_setup(kiln_ctx *ctx, dist *d)
{
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided = 0;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) !=
            MPI_SUCCESS)
            return kiln_fail(ctx, KILN_ERR_DIST,
                             "MPI_Init_thread failed; check that mpirun and "
                             "the kiln binary use the same Open MPI");
        d->we_init = true;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
    MPI_Comm_dup(MPI_COMM_WORLD, &d->comm);
    MPI_Comm_rank(d->comm, &d->rank);
    MPI_Comm_size(d->comm, &d->world);
    if (dist_keyval == MPI_KEYVAL_INVALID)
        MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, MPI_COMM_NULL_DELETE_FN,
                               &dist_keyval, NULL);
    MPI_Comm_set_attr(d->comm, dist_keyval, d);
    MPI_Comm_create_errhandler(on_mpi_error, &d->eh);
    MPI_Comm_set_errhandler(d->comm, d->eh);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, d->eh);

    /* node-local progress table */
    d->node = MPI_COMM_NULL;
    if (d->progress_table) {
        MPI_Comm_split_type(d->comm, MPI_COMM_TYPE_SHARED, d->rank,
                            MPI_INFO_NULL, &d->node);
        MPI_Comm_rank(d->node, &d->node_rank);
        MPI_Comm_size(d->node, &d->node_size);
        MPI_Aint sz = (MPI_Aint)sizeof(dist_slot);
        dist_slot *mine = NULL;
        if (MPI_Win_allocate_shared(sz, (int)sizeof(dist_slot), MPI_INFO_NULL,
                                    d->node, &mine, &d->win) == MPI_SUCCESS) {
            MPI_Aint qsz;
            int disp;
            dist_slot *base = NULL;
            MPI_Win_shared_query(d->win, 0, &qsz, &disp, &base);
            /* Slots are contiguous by default (no alloc_shared_noncontig),
             * so slot i is base + i. */
            d->slots = base;
            memset(mine, 0, sizeof *mine);
            mine->world_rank = d->rank;
            d->have_win = true;
            MPI_Barrier(d->node);
        }
    }
    return watchdog_start(ctx, d);
}

static void mpi_teardown(dist *d, bool finalize)
{
    watchdog_stop(d);
    if (!finalize) return;
    if (d->have_win) MPI_Win_free(&d->win);
    if (d->node != MPI_COMM_NULL) MPI_Comm_free(&d->node);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
    MPI_Comm_free(&d->comm);
    MPI_Errhandler_free(&d->eh);
    if (d->we_init) {
        int fin = 0;
        MPI_Finalized(&fin);
        if (!fin) MPI_Finalize();
    }
}

/* Blocking-with-watchdog allreduce of n elements in chunks. */
static void allreduce_chunks(dist *d, const char *name, void *buf, size_t n,
                             MPI_Datatype t, size_t esz, MPI_Op op)
{
    unsigned char *p = buf;
    for (size_t o = 0; o < n; o += DIST_CHUNK) {
        size_t k = KILN_MIN(DIST_CHUNK, n - o);
        coll_start(d, name, k * esz);
        double t0 = guard_begin(d);
        MPI_Allreduce(MPI_IN_PLACE, p + o * esz, (int)k, t, op, d->comm);
        guard_end(d, t0);
    }
}

#endif /* KILN_HAVE_MPI */

/* ---- lifecycle ------------------------------------------------------- */

kiln_dist_opts kiln_dist_opts_default(void)
{
    return (kiln_dist_opts){.timeout_s = DIST_DEFAULT_TIMEOUT,
                            .bucket_mb = DIST_DEFAULT_BUCKET_MB,
                            .overlap = true,
                            .progress_table = true};
}

/* A positive number no larger than 1e9 (NaN fails). */
static bool pos_ok(double v) { return v > 0 && v <= 1e9; }

kiln_status dist_init(kiln_ctx *ctx, dist **out, const kiln_dist_opts *opts)
{
    *out = NULL;
    kiln_dist_opts o = opts ? *opts : kiln_dist_opts_default();
    if (!pos_ok(o.timeout_s) || !pos_ok(o.bucket_mb))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_dist_opts.%s = %g is not a positive number of "
                         "at most 1e9 (default %g)",
                         !pos_ok(o.timeout_s) ? "timeout_s" : "bucket_mb",
                         !pos_ok(o.timeout_s) ? o.timeout_s : o.bucket_mb,
                         !pos_ok(o.timeout_s) ? DIST_DEFAULT_TIMEOUT : DIST_DEFAULT_BUCKET_MB);
    dist *d = kiln_calloc(ctx, 1, sizeof *d);
    if (!d) return KILN_ERR_NOMEM;
    d->world = 1;
    d->timeout = o.timeout_s;
    d->bucket_bytes = (size_t)(o.bucket_mb * 1e6);
    if (d->bucket_bytes < 4) d->bucket_bytes = 4;
    d->overlap = o.overlap;
    d->progress_table = o.progress_table;

    int lw = launcher_world();
#ifdef KILN_HAVE_MPI
    if (lw > 0) {
        d->mpi = true;
        kiln_status st = mpi_setup(ctx, d);
        if (st) {
            free(d);
            return st;
        }
    }
#else
    if (lw > 1) {
        free(d);
        return kiln_fail(ctx, KILN_ERR_DIST,
                         "launched as one of %d MPI ranks, but this kiln was "
                         "built without MPI; install libopenmpi-dev and "
                         "openmpi-bin and rebuild (make), or run without "
                         "mpirun",
                         lw);
    }
#endif
    *out = d;
    return KILN_OK;
}

static void dist_release(dist *d, bool finalize)
{
    if (!d) return;
#ifdef KILN_HAVE_MPI
    if (d->mpi) mpi_teardown(d, finalize);
    free(d->req);
#else
    KILN_UNUSED(finalize);
#endif
    free(d->ready);
    free(d->started);
    free(d);
}

void dist_free(dist *d) { dist_release(d, true); }
void dist_abandon(dist *d) { dist_release(d, false); }

int dist_rank(const dist *d) { return d ? d->rank : 0; }
int dist_world(const dist *d) { return d ? d->world : 1; }
bool dist_is_root(const dist *d) { return dist_rank(d) == 0; }
bool dist_uses_mpi(const dist *d) { return d && d->mpi; }
void dist_set_timeout(dist *d, double timeout_s)
{
    if (timeout_s > 0) d->timeout = timeout_s;
}
double dist_timeout(const dist *d) { return d->timeout; }
void dist_set_bucket_bytes(dist *d, size_t bytes)
{
    d->bucket_bytes = bytes < 4 ? 4 : bytes;
}
void dist_set_overlap(dist *d, bool on) { d->overlap = on; }
bool dist_overlap(const dist *d) { return d->overlap; }

void dist_stats_get(const dist *d, dist_stats *out) { *out = d->st; }
void dist_stats_reset(dist *d) { memset(&d->st, 0, sizeof d->st); }

/* ---- blocking collectives -------------------------------------------- */

kiln_status dist_barrier(kiln_ctx *ctx, dist *d)
{
    KILN_UNUSED(ctx);
    if (!d->mpi) return KILN_OK;
#ifdef KILN_HAVE_MPI
    coll_start(d, "barrier", 0);
    double t0 = guard_begin(d);
    MPI_Barrier(d->comm);
    guard_end(d, t0);
#endif
    return KILN_OK;
}

kiln_status dist_bcast(kiln_ctx *ctx, dist *d, void *buf, size_t bytes,
                       int root)
{
    if (root < 0 || root >= d->world)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "dist_bcast: root %d outside [0, %d)", root,
                         d->world);
    if (!d->mpi) return KILN_OK;
#ifdef KILN_HAVE_MPI
    unsigned char *p = buf;
    for (size_t o = 0; o < bytes; o += DIST_CHUNK) {
        size_t k = KILN_MIN(DIST_CHUNK, bytes - o);
        coll_start(d, "bcast", k);
        double t0 = guard_begin(d);
        MPI_Bcast(p + o, (int)k, MPI_BYTE, root, d->comm);
        guard_end(d, t0);
    }
#else
    KILN_UNUSED(buf);
    KILN_UNUSED(bytes);
#endif
    return KILN_OK;
}

kiln_status dist_allreduce_sum_f32(kiln_ctx *ctx, dist *d, float *buf,
                                   size_t n)
{
    KILN_UNUSED(ctx);
    if (!d->mpi) return KILN_OK;
#ifdef KILN_HAVE_MPI
    allreduce_chunks(d, "allreduce sum f32", buf, n, MPI_FLOAT, 4, MPI_SUM);
#else
    KILN_UNUSED(buf);
    KILN_UNUSED(n);
#endif
    return KILN_OK;
}

kiln_status dist_allreduce_sum_f64(kiln_ctx *ctx, dist *d, double *buf,
                                   size_t n)
{
    KILN_UNUSED(ctx);
    if (!d->mpi) return KILN_OK;
#ifdef KILN_HAVE_MPI
    allreduce_chunks(d, "allreduce sum f64", buf, n, MPI_DOUBLE, 8, MPI_SUM);
#else
    KILN_UNUSED(buf);
    KILN_UNUSED(n);
#endif
    return KILN_OK;
}

kiln_status dist_allreduce_max_f64(kiln_ctx *ctx, dist *d, double *buf,
                                   size_t n)
{
    KILN_UNUSED(ctx);
    if (!d->mpi) return KILN_OK;
#ifdef KILN_HAVE_MPI
    allreduce_chunks(d, "allreduce max f64", buf, n, MPI_DOUBLE, 8, MPI_MAX);
#else
    KILN_UNUSED(buf);
    KILN_UNUSED(n);
#endif
    return KILN_OK;
}

/* ---- bucketed gradient averaging ------------------------------------ */

static size_t bucket_size(const dist *d, size_t b)
{
    size_t o = b * d->bucket_floats;
    return KILN_MIN(d->bucket_floats, d->gn - o);
}

static void bucket_start(dist *d, size_t b)
{
    d->started[b] = true;
#ifdef KILN_HAVE_MPI
    size_t o = b * d->bucket_floats, k = bucket_size(d, b);
    coll_start(d, "allreduce gradient bucket", k * sizeof(float));
    MPI_Iallreduce(MPI_IN_PLACE, d->g + o, (int)k, MPI_FLOAT, MPI_SUM, d->comm,
                   &d->req[b]);
#endif
}

kiln_status dist_grads_begin(kiln_ctx *ctx, dist *d, float *grads, size_t n)
{
    if (d->g_active)
        return kiln_fail(ctx, KILN_ERR_INTERNAL,
                         "dist_grads_begin called twice without "
                         "dist_grads_finish");
    d->g = grads;
    d->gn = n;
    d->g_bad = false;
    d->g_overlap = d->overlap;
    if (!d->mpi || d->world == 1) {
        d->g_active = true;
        d->nb = 0;
        return KILN_OK;
    }
    size_t bf = d->bucket_bytes / sizeof(float);
    if (bf > DIST_CHUNK) bf = DIST_CHUNK;
    if (bf < 1) bf = 1;
    d->bucket_floats = bf;
    d->nb = n ? (n + bf - 1) / bf : 0;
    if (d->nb > d->nb_cap) {
        free(d->ready);
        free(d->started);
        d->ready = kiln_calloc(ctx, d->nb, sizeof *d->ready);
        d->started = kiln_calloc(ctx, d->nb, sizeof *d->started);
#ifdef KILN_HAVE_MPI
        free(d->req);
        d->req = kiln_calloc(ctx, d->nb, sizeof *d->req);
        if (!d->req) {
            d->nb_cap = 0;
            return KILN_ERR_NOMEM;
        }
#endif
        if (!d->ready || !d->started) {
            d->nb_cap = 0;
            return KILN_ERR_NOMEM;
        }
        d->nb_cap = d->nb;
    }
    memset(d->ready, 0, d->nb * sizeof *d->ready);
    memset(d->started, 0, d->nb * sizeof *d->started);
#ifdef KILN_HAVE_MPI
    for (size_t b = 0; b < d->nb; b++) d->req[b] = MPI_REQUEST_NULL;
#endif
    d->g_active = true;
    return KILN_OK;
}

void dist_grad_ready(void *ud, size_t offset, size_t numel)
{
    dist *d = ud;
    if (!d || !d->g_active || d->nb == 0 || numel == 0) return;
    if (offset > d->gn || numel > d->gn - offset) {
        d->g_bad = true;
        return;
    }
    size_t bf = d->bucket_floats, end = offset + numel;
    for (size_t b = offset / bf; b <= (end - 1) / bf; b++) {
        size_t lo = KILN_MAX(offset, b * bf);
        size_t hi = KILN_MIN(end, b * bf + bucket_size(d, b));
        d->ready[b] += hi - lo;
        if (d->ready[b] > bucket_size(d, b)) d->g_bad = true;
        else if (d->ready[b] == bucket_size(d, b) && d->g_overlap && !d->started[b])
            bucket_start(d, b);
    }
#ifdef KILN_HAVE_MPI
    /* Drive the progress engine so started buckets move during backward. */
    if (d->g_overlap) {
        int flag;
        MPI_Testall((int)d->nb, d->req, &flag, MPI_STATUSES_IGNORE);
    }
#endif
}

void dist_grads_skip(dist *d, const size_t *off, const size_t *len, int n)
{
    if (!d->g_active || d->nb == 0) return;
    int j = 0;
    for (size_t b = 0; b < d->nb; b++) {
        size_t lo = b * d->bucket_floats, hi = lo + bucket_size(d, b), fz = 0;
        while (j < n && off[j] + len[j] <= lo) j++;
        for (int k = j; k < n && off[k] < hi; k++)
            fz += KILN_MIN(hi, off[k] + len[k]) - KILN_MAX(lo, off[k]);
        if (fz == hi - lo) d->started[b] = true; /* zeros on every rank: nothing to sum */
    }
}

kiln_status dist_grads_finish(kiln_ctx *ctx, dist *d)
{
    if (!d->g_active)
        return kiln_fail(ctx, KILN_ERR_INTERNAL,
                         "dist_grads_finish without dist_grads_begin");
    d->g_active = false;
    if (d->nb == 0) return KILN_OK;
#ifdef KILN_HAVE_MPI
    if (!d->g_overlap) {
        /* Overlap off: one blocking allreduce per bucket, in a fixed order
         * (Open MPI's blocking algorithms are the faster ones). */
        for (size_t b = d->nb; b-- > 0;) {
            size_t o = b * d->bucket_floats, k = bucket_size(d, b);
            if (d->started[b]) continue; /* frozen: dist_grads_skip */
            d->started[b] = true;
            coll_start(d, "allreduce gradient bucket", k * sizeof(float));
            double t0 = guard_begin(d);
            MPI_Allreduce(MPI_IN_PLACE, d->g + o, (int)k, MPI_FLOAT, MPI_SUM,
                          d->comm);
            guard_end(d, t0);
        }
    } else {
        /* Buckets whose ranges were never reported start now, in a fixed
         * order (the same on every rank). */
        for (size_t b = d->nb; b-- > 0;)
            if (!d->started[b]) bucket_start(d, b);
        d->cur = "allreduce gradient buckets (finish)";
        wait_all(d, (int)d->nb, d->req);
    }
#endif
    float s = 1.0f / (float)d->world;
    float *g = d->g;
    size_t n = d->gn;
#pragma omp parallel for simd schedule(static) if (n > (1u << 16))
    for (size_t i = 0; i < n; i++) g[i] *= s;
    if (d->g_bad)
        return kiln_fail(ctx, KILN_ERR_INTERNAL,
                         "gradient-ready hook reported a range twice or out "
                         "of the block (model backward contract broken)");
    return KILN_OK;
}

/* ---- ZeRO-1 ---------------------------------------------------------- */

void dist_shard_range(const dist *d, size_t n, int r, size_t *off,
                      size_t *len)
{
    size_t w = (size_t)dist_world(d);
    size_t per = (n + w - 1) / w;
    per = (per + DIST_SHARD_ALIGN - 1) / DIST_SHARD_ALIGN * DIST_SHARD_ALIGN;
    size_t o = KILN_MIN(n, per * (size_t)r);
    *off = o;
    *len = KILN_MIN(per, n - o);
}

#ifdef KILN_HAVE_MPI
static kiln_status shard_counts(kiln_ctx *ctx, dist *d, size_t n, int **cnt,
                                int **dis)
{
    *cnt = kiln_malloc(ctx, sizeof(int) * (size_t)d->world);
    *dis = kiln_malloc(ctx, sizeof(int) * (size_t)d->world);
    if (!*cnt || !*dis) {
        free(*cnt);
        free(*dis);
        return KILN_ERR_NOMEM;
    }
    if (n > (size_t)INT_MAX) {
        free(*cnt);
        free(*dis);
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "ZeRO-1: a block of %zu floats exceeds the MPI "
                         "count limit (%d) of one collective; this model is "
                         "too large for kiln_train_opts.zero = 1 in this version",
                         n, INT_MAX);
    }
    for (int r = 0; r < d->world; r++) {
        size_t o, l;
        dist_shard_range(d, n, r, &o, &l);
        (*cnt)[r] = (int)l;
        (*dis)[r] = (int)o;
    }
    return KILN_OK;
}
#endif

kiln_status dist_reduce_scatter_f32(kiln_ctx *ctx, dist *d, float *buf,
                                    size_t n)
{
    if (!d->mpi || d->world == 1) return KILN_OK;
#ifdef KILN_HAVE_MPI
    int *cnt, *dis;
    kiln_status st = shard_counts(ctx, d, n, &cnt, &dis);
    if (st) return st;
    coll_start(d, "reduce-scatter f32", n * sizeof(float));
    double t0 = guard_begin(d);
    /* In place: input from buf, this rank's result at the start of buf. */
    MPI_Reduce_scatter(MPI_IN_PLACE, buf, cnt, MPI_FLOAT, MPI_SUM, d->comm);
    guard_end(d, t0);
    int me = d->rank;
    if (dis[me] && cnt[me])
        memmove(buf + dis[me], buf, (size_t)cnt[me] * sizeof(float));
    free(cnt);
    free(dis);
#else
    KILN_UNUSED(ctx);
    KILN_UNUSED(buf);
    KILN_UNUSED(n);
#endif
    return KILN_OK;
}

kiln_status dist_allgather_f32(kiln_ctx *ctx, dist *d, float *buf, size_t n)
{
    if (!d->mpi || d->world == 1) return KILN_OK;
#ifdef KILN_HAVE_MPI
    int *cnt, *dis;
    kiln_status st = shard_counts(ctx, d, n, &cnt, &dis);
    if (st) return st;
    coll_start(d, "all-gather f32", n * sizeof(float));
    double t0 = guard_begin(d);
    MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, cnt, dis,
                   MPI_FLOAT, d->comm);
    guard_end(d, t0);
    free(cnt);
    free(dis);
#else
    KILN_UNUSED(ctx);
    KILN_UNUSED(buf);
    KILN_UNUSED(n);
#endif
    return KILN_OK;
}

kiln_status dist_gather_shards_f32(kiln_ctx *ctx, dist *d, const float *shard,
                                   float *full, size_t n, int root)
{
    if (root < 0 || root >= d->world)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "dist_gather_shards_f32: root %d outside [0, %d)",
                         root, d->world);
    if (!d->mpi || d->world == 1) {
        if (full != shard && n) memmove(full, shard, n * sizeof(float));
        return KILN_OK;
    }
#ifdef KILN_HAVE_MPI
    int *cnt, *dis;
    kiln_status st = shard_counts(ctx, d, n, &cnt, &dis);
    if (st) return st;
    coll_start(d, "gather shards f32", n * sizeof(float));
    double t0 = guard_begin(d);
    MPI_Gatherv(shard, cnt[d->rank], MPI_FLOAT, full, cnt, dis, MPI_FLOAT,
                root, d->comm);
    guard_end(d, t0);
    free(cnt);
    free(dis);
#endif
    return KILN_OK;
}

kiln_status dist_scatter_shards_f32(kiln_ctx *ctx, dist *d, const float *full,
                                    float *shard, size_t n, int root)
{
    if (root < 0 || root >= d->world)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "dist_scatter_shards_f32: root %d outside [0, %d)",
                         root, d->world);
    if (!d->mpi || d->world == 1) {
        if (full != shard && n) memmove(shard, full, n * sizeof(float));
        return KILN_OK;
    }
#ifdef KILN_HAVE_MPI
    int *cnt, *dis;
    kiln_status st = shard_counts(ctx, d, n, &cnt, &dis);
    if (st) return st;
    coll_start(d, "scatter shards f32", n * sizeof(float));
    double t0 = guard_begin(d);
    MPI_Scatterv(full, cnt, dis, MPI_FLOAT, shard, cnt[d->rank], MPI_FLOAT,
                 root, d->comm);
    guard_end(d, t0);
    free(cnt);
    free(dis);
#endif
    return KILN_OK;
}
