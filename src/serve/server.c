/*
 * server.c — kiln_serve_run: load the model and tokenizer, build the
 * engine with one KV-cache slot per parallel request, start the scheduler
 * and the HTTP daemon, and run until SIGINT/SIGTERM; plus the Prometheus
 * rendering of the scheduler's metrics.
 */
#include "serve/serve.h"

#include <malloc.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const double metrics_buckets[12] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                    0.5,   1,    2.5,   5,    10,  1e300};

kiln_serve_opts kiln_serve_opts_default(void)
{
    return (kiln_serve_opts){.host = "127.0.0.1", .port = 8080, .parallel = 4,
                             .n_ctx = 0, .max_queue = 64, .max_body = 1 << 20,
                             .max_connections = 256, .wtype = KILN_DTYPE_F32,
                             .watch_ms = 1000};
}

void metrics_observe(uint64_t *b, uint64_t *n, double *sum, double secs)
{
    for (int i = 0; i < 12; i++)
        if (secs <= metrics_buckets[i]) {
            b[i]++;
            break;
        }
    (*n)++;
    *sum += secs;
}

static size_t hist(char *o, size_t cap, const char *name, const char *help,
                   const uint64_t *b, uint64_t n, double sum)
{
    size_t k = (size_t)snprintf(o, cap, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < 12 && k < cap; i++) {
        cum += b[i];
        if (i < 11)
            k += (size_t)snprintf(o + k, cap - k, "%s_bucket{le=\"%g\"} %llu\n", name,
                                  metrics_buckets[i], (unsigned long long)cum);
        else
            k += (size_t)snprintf(o + k, cap - k, "%s_bucket{le=\"+Inf\"} %llu\n", name,
                                  (unsigned long long)cum);
    }
    if (k < cap)
        k += (size_t)snprintf(o + k, cap - k, "%s_sum %.6f\n%s_count %llu\n", name, sum, name,
                              (unsigned long long)n);
    return KILN_MIN(k, cap);
}

char *metrics_render(sched *s, const metrics *http_m)
{
    (void)http_m;
    size_t cap = 8192, k = 0;
    char *o = malloc(cap);
    if (!o) return NULL;
    pthread_mutex_lock(&s->mu);
    metrics m = s->m;
    sckpt ck = s->ck;
    int q = s->qlen, act = s->n_active;
    pthread_mutex_unlock(&s->mu);
#define C(name, help, type, val)                                                   \
    k += (size_t)snprintf(o + k, cap - k, "# HELP " name " " help "\n# TYPE " name " " type \
                          "\n" name " %llu\n", (unsigned long long)(val))
    C("kiln_prompt_tokens_total", "Prompt tokens prefilled.", "counter", m.prompt_tokens);
    C("kiln_prompt_tokens_cached_total", "Prompt tokens whose KV cache was reused (prefix caching), not prefilled.", "counter", m.cached_tokens);
    C("kiln_prefix_cache_hits_total", "Requests that reused a cached prompt prefix.", "counter", m.cache_hits);
    C("kiln_generation_tokens_total", "Tokens generated.", "counter", m.gen_tokens);
    C("kiln_engine_steps_total", "Forward steps run by the scheduler.", "counter", m.steps);
    C("kiln_engine_step_tokens_total", "Tokens processed by forward steps.", "counter", m.step_tokens);
    C("kiln_requests_cancelled_total", "Requests dropped because the client went away.", "counter", m.cancelled);
    C("kiln_requests_rejected_total", "Requests rejected because the queue was full.", "counter", m.rejected_queue);
    C("kiln_queue_depth", "Requests waiting for a slot.", "gauge", (uint64_t)q);
    C("kiln_slots_active", "Slots generating now.", "gauge", (uint64_t)act);
    C("kiln_slots_total", "Slots (parallel sequences).", "gauge", (uint64_t)s->n_slots);
    if (ck.on) {
        C("kiln_checkpoint_reloads_total", "Newer checkpoints of the followed run swapped in.", "counter", ck.reloads);
        C("kiln_checkpoint_reload_failures_total", "Checkpoints of the followed run that failed to load (the old weights stayed).", "counter", ck.failures);
        k += (size_t)snprintf(o + k, cap - k,
                              "# HELP kiln_checkpoint_step The served checkpoint's training step.\n"
                              "# TYPE kiln_checkpoint_step gauge\nkiln_checkpoint_step %ld\n",
                              ck.step);
    }
#undef C
    k += hist(o + k, cap - k, "kiln_time_to_first_token_seconds",
              "Time from arrival to the first generated token.", m.ttft_b, m.ttft_n, m.ttft_sum);
    k += hist(o + k, cap - k, "kiln_request_duration_seconds",
              "Time from arrival to the last generated token.", m.lat_b, m.lat_n, m.lat_sum);
    return o;
}

static const char *base_name(const char *dir)
{
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    size_t i = n;
    while (i > 0 && dir[i - 1] != '/') i--;
    static _Thread_local char buf[256];
    snprintf(buf, sizeof buf, "%.*s", (int)(n - i), dir + i);
    return buf[0] ? buf : "kiln";
}

kiln_status kiln_serve_run(kiln_ctx *ctx, const kiln_serve_opts *opts)
{
    kiln_serve_opts o = *opts;
    if (!o.model_dir && !o.run_dir)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_serve_opts.model_dir is required (or a kiln_serve_opts.run_dir to follow)");
    if (o.parallel < 1 || o.parallel > 256)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_serve_opts.parallel = %d is not in 1..256", o.parallel);
    if (o.max_queue < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_serve_opts.max_queue = %d must be >= 0", o.max_queue);
    if (o.max_body < 64) o.max_body = 64;
    if (o.log_format && strcmp(o.log_format, "text") && strcmp(o.log_format, "json") &&
        strcmp(o.log_format, "off"))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_serve_opts.log_format = '%s' is not text, json or off", o.log_format);
    if (o.embedding_pooling != KILN_POOLING_MEAN && o.embedding_pooling != KILN_POOLING_LAST)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_serve_opts.embedding_pooling = %d is not KILN_POOLING_MEAN or "
                         "KILN_POOLING_LAST", (int)o.embedding_pooling);
    if (o.cors && !*o.cors)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_serve_opts.cors is empty; give \"*\" or the allowed origins "
                         "(e.g. https://app.example.com), or leave it out");
    if (o.api_key && !*o.api_key)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_serve_opts.api_key is empty, which would serve without authentication; "
                         "give a key, or no kiln_serve_opts.api_key to serve without one");

    /* Fixed malloc thresholds (glibc otherwise raises them after each
     * big free, up to 32 MiB / 64 MiB): a request's big buffers (its
     * body, parse, token ids) are mmapped and go back to the system when
     * freed instead of staying in the connection threads' arenas, and an
     * arena's free top over 1 MiB is trimmed at once. Without this a
     * burst of large requests left ~250 MiB resident for good. */
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
    mallopt(M_TRIM_THRESHOLD, 1024 * 1024);
    mallopt(M_ARENA_MAX, 2);

    if (o.watch_ms < 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_serve_opts.watch_ms = %d must be >= 0 (0: do not follow the run)",
                         o.watch_ms);
    /* a run directory: serve its latest checkpoint (and follow it) */
    char ck_dir[4096];
    if (o.run_dir && !o.model_dir) {
        kiln_status rs = kiln_checkpoint_resolve(ctx, o.run_dir, ck_dir, sizeof ck_dir);
        if (rs) return rs;
        o.model_dir = ck_dir;
    }
    kiln_model *model = NULL;
    kiln_tokenizer *tok = NULL;
    kiln_engine *eng = NULL;
    server *sv = NULL;
    reloader *rl = NULL;
    bool sched_owns = false; /* s.eng is the scheduler's (a reload swaps it) */
    sched s;
    memset(&s, 0, sizeof s);
    /* a trainer checkpoint carries checksums.json: verify before loading */
    kiln_status st = kiln_checkpoint_verify(ctx, o.model_dir);
    if (st) return st;
    st = kiln_model_load(ctx, o.model_dir, &model);
    if (st) return st;
    st = kiln_tokenizer_load(ctx, o.tokenizer ? o.tokenizer : o.model_dir, &tok);
    if (st) goto out;
    if (kiln_tokenizer_vocab_size(tok) > kiln_model_config(model)->vocab_size) {
        st = kiln_fail(ctx, KILN_ERR_FORMAT,
                       "the tokenizer has %d tokens but the model's vocabulary is %d",
                       kiln_tokenizer_vocab_size(tok), kiln_model_config(model)->vocab_size);
        goto out;
    }
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.n_slots = o.parallel;
    eo.n_ctx = o.n_ctx;
    eo.wtype = o.wtype;
    eo.weights_gguf = o.weights_gguf;
    eo.chunk = KILN_MAX(64, o.parallel);
    st = kiln_engine_new(ctx, model, &eo, &eng);
    if (st) goto out;
    kiln_model_free(model); /* the engine holds its own packed copy */
    model = NULL;
    st = sched_start(ctx, &s, eng, tok, o.max_queue);
    if (st) goto out;
    sched_owns = true;
    eng = NULL;
    pthread_mutex_lock(&s.mu);
    s.pooling = o.embedding_pooling;
    s.log_ctx = ctx;
    if (o.run_dir) {
        s.ck.on = true;
        snprintf(s.ck.name, sizeof s.ck.name, "%s", base_name(o.model_dir));
        s.ck.step = sckpt_step(s.ck.name);
        s.ck.loaded_at = (long)time(NULL);
    }
    pthread_mutex_unlock(&s.mu);
    if (o.run_dir && o.watch_ms > 0) {
        st = reloader_start(ctx, &rl, &s, o.run_dir, base_name(o.model_dir), &eo, o.watch_ms);
        if (st) goto out;
    }

    /* Signals: block them in every thread (inherited), wait here. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);
    int port = 0;
    const char *name = o.model_name ? o.model_name : base_name(o.run_dir ? o.run_dir : o.model_dir);
    st = http_start(ctx, &sv, &s, &o, name, &port);
    if (st) goto out;
    printf("kiln serve: model '%s' (%s, %d slots x %d context) listening on http://%s:%d\n",
           name, o.weights_gguf ? "the .gguf's own" : o.wtype == KILN_DTYPE_F32 ? "fp32" : kiln_dtype_name(o.wtype), s.n_slots,
           s.n_ctx, o.host ? o.host : "127.0.0.1", port);
    if (o.run_dir)
        printf("kiln serve: serving checkpoint %s of run %s%s\n", s.ck.name, o.run_dir,
               rl ? "; following its 'latest' (new checkpoints load in the background)" : "");
    fflush(stdout);
    int sig = 0;
    sigwait(&set, &sig);
    kiln_log(ctx, KILN_LOG_INFO, "kiln serve: signal %d, shutting down", sig);
    reloader_stop(rl);
    rl = NULL;
    sched_stop(&s);
    http_stop(sv);
    sv = NULL;
out:
    reloader_stop(rl);
    if (sv) http_stop(sv);
    kiln_engine *cur = sched_owns ? s.eng : NULL;
    sched_free(&s);
    kiln_engine_free(cur);
    kiln_engine_free(eng);
    kiln_tokenizer_free(tok);
    kiln_model_free(model);
    return st;
}
