/*
 * ctx.c — status strings, the context (last error, log level, threads),
 * logging, assertions, checked allocation and the monotonic clock.
 */
#include "base.h"

#include <sched.h>
#include <stdio.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define ERRMSG_CAP 2048

struct kiln_ctx {
    char errmsg[ERRMSG_CAP];
    kiln_log_level level;
    int threads;      /* set by kiln_set_threads; 0 = auto */
    int auto_threads; /* physical cores we may run on; 0 = OpenMP decides */
    kiln_log_fn log_fn; /* kiln_set_log_fn; NULL = stderr */
    void *log_user;
    char *cache_dir;    /* kiln_set_cache_dir; NULL = no cache */
    bool no_probe;      /* kiln_set_precision_probe(ctx, false) */
    /* precision AUTO as resolved on this ctx (ctx_auto_get/set): decided
     * and logged once per key (the bf16 kernel and thread count) */
    bool auto_set;
    int auto_key, auto_value;
    char auto_why[CTX_AUTO_WHY_CAP];
    double auto_f32, auto_bf16;
};

/* Physical cores in this process's affinity mask: hyperthreads of one core
 * share its FMA units, so a second thread adds nothing to compute-bound
 * kernels and, when another process holds the sibling, every OpenMP
 * barrier waits for a descheduled thread. Returns 0 when OMP_NUM_THREADS
 * is set (the user's choice wins) and the CPU count when the topology
 * cannot be read. */
static int physical_cores(void)
{
    if (getenv("OMP_NUM_THREADS")) return 0;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 0;
    int ncpu = CPU_COUNT(&set), ncores = 0;
    long seen[CPU_SETSIZE];
    for (int c = 0; c < CPU_SETSIZE; c++) {
        if (!CPU_ISSET(c, &set)) continue;
        char path[128];
        long core = -1, pkg = -1;
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/core_id", c);
        FILE *f = fopen(path, "r");
        if (!f || fscanf(f, "%ld", &core) != 1) core = -1;
        if (f) fclose(f);
        snprintf(path, sizeof path,
                 "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", c);
        f = fopen(path, "r");
        if (!f || fscanf(f, "%ld", &pkg) != 1) pkg = -1;
        if (f) fclose(f);
        if (core < 0 || pkg < 0) return ncpu;
        long key = pkg * 1000000L + core;
        int dup = 0;
        for (int i = 0; i < ncores && !dup; i++) dup = seen[i] == key;
        if (!dup) seen[ncores++] = key;
    }
    return ncores > 0 ? ncores : ncpu;
}

static const char *const status_str[] = {
#define XX(name, msg) msg,
    KILN_STATUS_MAP(XX)
#undef XX
};

static const char *const status_name[] = {
#define XX(name, msg) #name,
    KILN_STATUS_MAP(XX)
#undef XX
};

const char *kiln_status_str(kiln_status s)
{
    if ((unsigned)s >= KILN_STATUS_COUNT) return "unknown status";
    return status_str[s];
}

const char *kiln_status_name(kiln_status s)
{
    if ((unsigned)s >= KILN_STATUS_COUNT) return "UNKNOWN";
    return status_name[s];
}

kiln_ctx *kiln_ctx_new(void)
{
    kiln_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return NULL;
    ctx->level = KILN_LOG_INFO;
    ctx->auto_threads = physical_cores();
    const char *env = getenv("KILN_LOG");
    if (env) {
        if (!strcasecmp(env, "error")) ctx->level = KILN_LOG_ERROR;
        else if (!strcasecmp(env, "warn")) ctx->level = KILN_LOG_WARN;
        else if (!strcasecmp(env, "info")) ctx->level = KILN_LOG_INFO;
        else if (!strcasecmp(env, "debug")) ctx->level = KILN_LOG_DEBUG;
    }
    return ctx;
}

void kiln_ctx_free(kiln_ctx *ctx)
{
    if (!ctx) return;
    free(ctx->cache_dir);
    free(ctx);
}

kiln_status kiln_set_cache_dir(kiln_ctx *ctx, const char *dir)
{
    char *d = NULL;
    if (dir && *dir) {
        d = strdup(dir);
        if (!d) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    free(ctx->cache_dir);
    ctx->cache_dir = d;
    return KILN_OK;
}

const char *kiln_get_cache_dir(const kiln_ctx *ctx) { return ctx->cache_dir; }

void kiln_set_precision_probe(kiln_ctx *ctx, bool on)
{
    if (ctx->no_probe != !on) ctx->auto_set = false; /* decide again */
    ctx->no_probe = !on;
}

bool kiln_get_precision_probe(const kiln_ctx *ctx) { return !ctx->no_probe; }

bool ctx_auto_get(const kiln_ctx *ctx, int key, int *value, const char **why, double *f32,
                  double *bf16)
{
    if (!ctx->auto_set || ctx->auto_key != key) return false;
    *value = ctx->auto_value;
    *why = ctx->auto_why;
    *f32 = ctx->auto_f32;
    *bf16 = ctx->auto_bf16;
    return true;
}

void ctx_auto_set(kiln_ctx *ctx, int key, int value, const char *why, double f32, double bf16)
{
    ctx->auto_set = true;
    ctx->auto_key = key;
    ctx->auto_value = value;
    snprintf(ctx->auto_why, sizeof ctx->auto_why, "%s", why);
    ctx->auto_f32 = f32;
    ctx->auto_bf16 = bf16;
}

const char *kiln_errmsg(const kiln_ctx *ctx)
{
    return ctx ? ctx->errmsg : "";
}

kiln_status kiln_fail(kiln_ctx *ctx, kiln_status s, const char *fmt, ...)
{
    if (ctx) {
        /* format into a copy first: callers wrap the previous message,
         * kiln_fail(ctx, s, "%s: %s", path, kiln_errmsg(ctx)), and vsnprintf
         * into the buffer it reads from garbles it (undefined behaviour) */
        char tmp[sizeof ctx->errmsg];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(tmp, sizeof tmp, fmt, ap);
        va_end(ap);
        memcpy(ctx->errmsg, tmp, sizeof tmp);
    }
    return s;
}

void kiln_clear_error(kiln_ctx *ctx)
{
    if (ctx) ctx->errmsg[0] = 0;
}

void kiln_set_log_level(kiln_ctx *ctx, kiln_log_level level)
{
    ctx->level = level;
}

kiln_log_level kiln_get_log_level(const kiln_ctx *ctx) { return ctx->level; }

void kiln_log(const kiln_ctx *ctx, kiln_log_level level, const char *fmt, ...)
{
    if (ctx && level > ctx->level) return;
    va_list ap;
    if (ctx && ctx->log_fn) {
        char msg[ERRMSG_CAP];
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        ctx->log_fn(ctx->log_user, level, msg);
        return;
    }
    static const char *const tag[] = {"error", "warn", "info", "debug"};
    fprintf(stderr, "kiln: %s: ", tag[level]);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void kiln_set_log_fn(kiln_ctx *ctx, kiln_log_fn fn, void *user)
{
    ctx->log_fn = fn;
    ctx->log_user = fn ? user : NULL;
}

void kiln_set_threads(kiln_ctx *ctx, int n) { ctx->threads = n < 0 ? 0 : n; }
int kiln_get_threads(const kiln_ctx *ctx)
{
    return ctx->threads > 0 ? ctx->threads : ctx->auto_threads;
}

void kiln_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "kiln: internal assertion failed: %s (%s:%d)\n", expr,
            file, line);
    abort();
}

void *kiln_malloc(kiln_ctx *ctx, size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory allocating %zu bytes",
                  n);
    return p;
}

void *kiln_calloc(kiln_ctx *ctx, size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        kiln_fail(ctx, KILN_ERR_NOMEM,
                  "out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

void *kiln_aligned_alloc(kiln_ctx *ctx, size_t n)
{
    size_t sz = (n + 63) & ~(size_t)63;
    if (sz == 0) sz = 64;
    void *p = NULL;
    if (posix_memalign(&p, 64, sz) != 0) {
        kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory allocating %zu bytes",
                  n);
        return NULL;
    }
    memset(p, 0, sz);
    return p;
}

double kiln_time_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
