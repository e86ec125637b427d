/*
 * reload.c — `kiln serve --model RUN` follows the run: a thread reads
 * RUN/latest (which the trainer replaces atomically once a checkpoint is
 * complete, train/ckpt.c) every watch_ms, and when it names a checkpoint
 * other than the one served it verifies the checkpoint's checksums, loads
 * its weights and builds a new engine with the same options, all in the
 * background while requests are served; then hands the engine to the
 * scheduler (sched_swap), which swaps it in between requests. A load that
 * fails (a checksum, a truncated or missing file, another architecture
 * or vocabulary) is logged and counted, the old weights stay, and the same
 * checkpoint is tried again only when its files change.
 */
#include "serve/serve.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

struct reloader {
    kiln_ctx *log_ctx;   /* the caller's: kiln_log only */
    kiln_ctx *ctx;       /* this thread's (errors) */
    sched *s;
    char *run_dir;
    char cur[64];        /* the checkpoint served or being swapped in */
    kiln_engine_opts eo;
    kiln_config cfg;     /* the served model's: a new one must match */
    int watch_ms;
    char failed[64];     /* the last checkpoint that failed, and its files then */
    char failed_sig[128];
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
};

/* What the checkpoint's files look like now (size and mtime of the model
 * and checksums): a failed checkpoint is retried when this changes. */
static void files_sig(const char *dir, char *out, size_t cap)
{
    size_t k = 0;
    static const char *const f[] = {"model.safetensors", "checksums.json", "config.json"};
    out[0] = 0;
    for (int i = 0; i < 3 && k < cap; i++) {
        char *p = file_join(dir, f[i]);
        struct stat st;
        if (p && !stat(p, &st))
            k += (size_t)snprintf(out + k, cap - k, "%lld.%ld.%ld;", (long long)st.st_size,
                                  (long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
        else
            k += (size_t)snprintf(out + k, cap - k, "-;");
        free(p);
    }
}

/* Whether a loaded model can take the served one's place: the same
 * architecture and shapes (the engine's slots, the tokenizer and the
 * HTTP side's view of the model stay). */
static kiln_status same_config(kiln_ctx *ctx, const kiln_config *a, const kiln_config *b)
{
#define SAME(f)                                                                                 \
    if (a->f != b->f)                                                                           \
        return kiln_fail(ctx, KILN_ERR_FORMAT,                                                  \
                         "its config.json differs from the served model's in " #f " (%g, not " \
                         "%g); a server follows one architecture: restart it for another",      \
                         (double)b->f, (double)a->f);
    SAME(arch) SAME(n_layer) SAME(n_embd) SAME(n_head) SAME(n_kv_head) SAME(n_inner)
    SAME(vocab_size) SAME(n_ctx) SAME(norm_eps) SAME(rope_theta) SAME(tie_embeddings) SAME(bias)
    SAME(bos_token_id) SAME(eos_token_id)
#undef SAME
    return KILN_OK;
}

/* Verifies and loads checkpoint dir into a new engine. */
static kiln_status load(reloader *r, const char *dir, kiln_engine **out)
{
    *out = NULL;
    kiln_model *m = NULL;
    kiln_status st = kiln_checkpoint_verify(r->ctx, dir);
    if (!st) st = kiln_model_load(r->ctx, dir, &m);
    if (!st) st = same_config(r->ctx, &r->cfg, kiln_model_config(m));
    if (!st) st = kiln_engine_new(r->ctx, m, &r->eo, out);
    /* the served adapters over the new base (their ids in the same order) */
    for (int i = 0; !st && i < r->s->n_ad; i++) {
        int id = 0;
        st = kiln_engine_add_adapter(r->ctx, *out, r->s->ad_dirs[i], &id);
    }
    if (st) {
        kiln_engine_free(*out);
        *out = NULL;
    }
    kiln_model_free(m);
    return st;
}

/* One look at RUN/latest: loads and hands over a new checkpoint. */
static void tick(reloader *r)
{
    char dir[4096];
    /* latest is replaced atomically: a read sees the old or the new name */
    if (kiln_checkpoint_resolve(r->ctx, r->run_dir, dir, sizeof dir)) return;
    const char *base = strrchr(dir, '/');
    char name[64];
    snprintf(name, sizeof name, "%.63s", base ? base + 1 : dir);
    if (!strcmp(name, r->cur)) return;
    char sig[128];
    files_sig(dir, sig, sizeof sig);
    if (!strcmp(name, r->failed) && !strcmp(sig, r->failed_sig)) return;
    kiln_log(r->log_ctx, KILN_LOG_INFO,
             "kiln serve: %s/latest names %s: loading it in the background (still serving %s)",
             r->run_dir, name, r->cur);
    double t0 = kiln_time_now();
    kiln_engine *eng = NULL;
    kiln_status st = load(r, dir, &eng);
    double secs = kiln_time_now() - t0;
    if (st) {
        snprintf(r->failed, sizeof r->failed, "%s", name);
        snprintf(r->failed_sig, sizeof r->failed_sig, "%s", sig);
        pthread_mutex_lock(&r->s->mu);
        r->s->ck.failures++;
        snprintf(r->s->ck.error, sizeof r->s->ck.error, "%s: %.250s", name, kiln_errmsg(r->ctx));
        pthread_mutex_unlock(&r->s->mu);
        kiln_log(r->log_ctx, KILN_LOG_ERROR,
                 "kiln serve: reload failed: cannot load checkpoint %s/%s: %s; still serving %s",
                 r->run_dir, name, kiln_errmsg(r->ctx), r->cur);
        return;
    }
    snprintf(r->cur, sizeof r->cur, "%s", name);
    r->failed[0] = 0;
    sched_swap(r->s, eng, name, secs);
}

static void *reload_main(void *arg)
{
    reloader *r = arg;
    pthread_mutex_lock(&r->mu);
    while (!r->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += (long)(r->watch_ms % 1000) * 1000000L;
        ts.tv_sec += r->watch_ms / 1000 + ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&r->cv, &r->mu, &ts);
        if (r->stop) break;
        pthread_mutex_unlock(&r->mu);
        tick(r);
        pthread_mutex_lock(&r->mu);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

kiln_status reloader_start(kiln_ctx *log_ctx, reloader **out, sched *s, const char *run_dir,
                           const char *current, const kiln_engine_opts *eo, int watch_ms)
{
    *out = NULL;
    reloader *r = calloc(1, sizeof *r);
    if (!r) return kiln_fail(log_ctx, KILN_ERR_NOMEM, "serve: out of memory");
    r->log_ctx = log_ctx;
    r->ctx = kiln_ctx_new();
    r->run_dir = strdup(run_dir);
    r->s = s;
    r->eo = *eo;
    r->eo.weights_gguf = NULL; /* a run's checkpoints are safetensors */
    r->cfg = *kiln_engine_config(s->eng);
    r->watch_ms = watch_ms > 0 ? watch_ms : 1000;
    snprintf(r->cur, sizeof r->cur, "%s", current);
    if (!r->ctx || !r->run_dir) {
        kiln_ctx_free(r->ctx);
        free(r->run_dir);
        free(r);
        return kiln_fail(log_ctx, KILN_ERR_NOMEM, "serve: out of memory");
    }
    /* the loads run beside the scheduler: as many threads as it has */
    kiln_set_threads(r->ctx, kiln_get_threads(log_ctx));
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    if (pthread_create(&r->th, NULL, reload_main, r) != 0) {
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->cv);
        kiln_ctx_free(r->ctx);
        free(r->run_dir);
        free(r);
        return kiln_fail(log_ctx, KILN_ERR_INTERNAL, "serve: cannot start the checkpoint watcher thread");
    }
    *out = r;
    return KILN_OK;
}

void reloader_stop(reloader *r)
{
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    r->stop = true;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->th, NULL);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    kiln_ctx_free(r->ctx);
    free(r->run_dir);
    free(r);
}
