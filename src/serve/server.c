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
#include <unistd.h>
#include <time.h>

const double metrics_buckets[12] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                    0.5,   1,    2.5,   5,    10,  1e300};

kiln_serve_opts kiln_serve_opts_default(void)
{
    return (kiln_serve_opts){.host = "127.0.0.1", .port = 8080, .parallel = 4,
                             .n_ctx = 0, .max_queue = 64, .max_body = 1 << 20,
                             .max_connections = 256, .wtype = KILN_DTYPE_F32,
                             .watch_ms = 1000, .draft_tokens = 4};
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

/* Appends kiln_model_requests_total{model="ID"} of every model id (the
 * base and each adapter) to o (k bytes of cap, grown); NULL when out of
 * memory. */
static char *model_counts(sched *s, char *o, size_t *k, size_t *cap)
{
    int n = s->n_ad + 1;
    uint64_t *cnt = malloc((size_t)n * sizeof *cnt);
    if (!cnt) {
        free(o);
        return NULL;
    }
    pthread_mutex_lock(&s->mu);
    memcpy(cnt, s->model_requests, (size_t)n * sizeof *cnt);
    pthread_mutex_unlock(&s->mu);
    const char *head = "# HELP kiln_model_requests_total Requests admitted per model id (the "
                       "base and each LoRA adapter).\n# TYPE kiln_model_requests_total counter\n";
    for (int i = -1; i < n && o; i++) {
        if (*cap - *k < 1024) {
            char *g = realloc(o, *cap * 2);
            if (!g) {
                free(o);
                o = NULL;
                break;
            }
            o = g;
            *cap *= 2;
        }
        if (i < 0) {
            *k += (size_t)snprintf(o + *k, *cap - *k, "%s", head);
            continue;
        }
        char id[600];
        size_t j = 0; /* the label value, \ and " escaped */
        for (const char *p = s->model_ids[i]; *p && j + 3 < sizeof id; p++) {
            if (*p == '\\' || *p == '"') id[j++] = '\\';
            id[j++] = *p == '\n' ? ' ' : *p;
        }
        id[j] = 0;
        *k += (size_t)snprintf(o + *k, *cap - *k, "kiln_model_requests_total{model=\"%s\"} %llu\n",
                               id, (unsigned long long)cnt[i]);
    }
    free(cnt);
    return o;
}

char *metrics_render(sched *s, const metrics *http_m)
{
    (void)http_m;
    size_t cap = 16384, k = 0;
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
    if (s->draft) {
        C("kiln_spec_draft_tokens_total", "Tokens the draft model proposed (speculative decoding).", "counter", m.spec_drafted);
        C("kiln_spec_accepted_tokens_total", "Drafted tokens the target accepted.", "counter", m.spec_accepted);
        C("kiln_spec_verify_total", "Speculative rounds: a slot's drafted tokens verified in a target step.", "counter", m.spec_rounds);
        C("kiln_spec_emitted_tokens_total", "Tokens generated by speculative rounds (accepted drafts plus one per round).", "counter", m.spec_emitted);
        k += (size_t)snprintf(o + k, cap - k,
                              "# HELP kiln_spec_acceptance_rate Accepted / drafted tokens.\n"
                              "# TYPE kiln_spec_acceptance_rate gauge\nkiln_spec_acceptance_rate %.4f\n"
                              "# HELP kiln_spec_tokens_per_verify Tokens a speculative round generates on average (the decode speed-up in target steps: 1 without a draft).\n"
                              "# TYPE kiln_spec_tokens_per_verify gauge\nkiln_spec_tokens_per_verify %.4f\n"
                              "# HELP kiln_spec_draft_seconds_total Time in the draft model's forward steps.\n"
                              "# TYPE kiln_spec_draft_seconds_total counter\nkiln_spec_draft_seconds_total %.6f\n",
                              m.spec_drafted ? (double)m.spec_accepted / (double)m.spec_drafted : 0.0,
                              m.spec_rounds ? (double)m.spec_emitted / (double)m.spec_rounds : 0.0,
                              m.spec_draft_s);
    }
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
    if (s->n_ad > 0) /* served adapters: requests per model id */
        o = model_counts(s, o, &k, &cap);
    return o;
}

/* The served adapters (kiln_serve_opts.adapters, "NAME=DIR" each): added
 * to the engine, their ids and directories in ids[1..n] and dirs[0..n)
 * (ids[0]: the base's, set by the caller), and their memory logged. */
static kiln_status add_adapters(kiln_ctx *ctx, const kiln_serve_opts *o, kiln_engine *eng,
                                const char *base_id, char **ids, char **dirs)
{
    for (int i = 0; i < o->n_adapters; i++) {
        const char *a = o->adapters[i], *eq = a ? strchr(a, '=') : NULL;
        if (!eq || eq == a || !eq[1])
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_serve_opts.adapters entry %d = \"%s\": give NAME=DIR (the model id "
                             "and a PEFT adapter directory)", i + 1, a ? a : "(null)");
        for (const char *p = a; p < eq; p++)
            if ((unsigned char)*p <= ' ' || *p == '"' || *p == '\\' || *p == 0x7f)
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "kiln_serve_opts.adapters entry %d: the model id \"%.*s\" has a "
                                 "space, quote, backslash or control character", i + 1,
                                 (int)(eq - a), a);
        ids[i + 1] = strndup(a, (size_t)(eq - a));
        dirs[i] = strdup(eq + 1);
        if (!ids[i + 1] || !dirs[i]) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        if (!strcmp(ids[i + 1], base_id))
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "kiln_serve_opts.adapters entry %d: the id \"%s\" is the base model's "
                             "(kiln_serve_opts.model_name); name the adapter otherwise", i + 1,
                             ids[i + 1]);
        for (int j = 1; j <= i; j++)
            if (!strcmp(ids[j], ids[i + 1]))
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "kiln_serve_opts.adapters entry %d: the id \"%s\" is given twice",
                                 i + 1, ids[i + 1]);
        int id = 0;
        kiln_status st = kiln_engine_add_adapter(ctx, eng, dirs[i], &id);
        if (st) return st;
        kiln_log(ctx, KILN_LOG_INFO,
                 "kiln serve: adapter '%s' (%s): %zu bytes of fp32 A and B over the shared base",
                 ids[i + 1], dirs[i], kiln_engine_adapter_bytes(eng, id));
    }
    return KILN_OK;
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

/* The draft model of speculative decoding: loaded, checked against the
 * target's vocabulary and tokenizer, and given an engine with the
 * target's slots (its context capped at the draft's own). */
static kiln_status load_draft(kiln_ctx *ctx, const kiln_serve_opts *o, const kiln_config *tcfg,
                              const kiln_tokenizer *tok, const kiln_engine_opts *teo,
                              kiln_engine **out)
{
    char dir[4096];
    kiln_model *m = NULL;
    kiln_tokenizer *dtok = NULL;
    snprintf(dir, sizeof dir, "%s", o->draft_dir);
    char lp[4200];
    snprintf(lp, sizeof lp, "%s/latest", o->draft_dir);
    kiln_status st = access(lp, R_OK) == 0
                         ? kiln_checkpoint_resolve(ctx, o->draft_dir, dir, sizeof dir)
                         : KILN_OK;
    if (!st) st = kiln_checkpoint_verify(ctx, dir);
    if (!st) st = kiln_model_load(ctx, dir, &m);
    if (!st && kiln_tokenizer_load(ctx, dir, &dtok) &&
        (!o->tokenizer || kiln_tokenizer_load(ctx, o->tokenizer, &dtok))) {
        char why[1024];
        snprintf(why, sizeof why, "%s", kiln_errmsg(ctx));
        st = kiln_fail(ctx, KILN_ERR_FORMAT,
                       "the draft %s has no tokenizer to check against the target's (%s)", dir,
                       why);
    }
    if (!st) st = kiln_spec_check(ctx, tcfg, tok, kiln_model_config(m), dtok);
    if (!st) {
        kiln_engine_opts eo = *teo;
        eo.weights_gguf = NULL;
        if (eo.n_ctx == 0 || eo.n_ctx > kiln_model_config(m)->n_ctx) eo.n_ctx = 0;
        st = kiln_engine_new(ctx, m, &eo, out);
    }
    kiln_model_free(m);
    kiln_tokenizer_free(dtok);
    return st;
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
    kiln_engine *eng = NULL, *draft = NULL;
    server *sv = NULL;
    reloader *rl = NULL;
    char **ad_ids = NULL, **ad_dirs = NULL; /* the served adapters: ids (0 the base), dirs */
    uint64_t *ad_count = NULL;
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
    if (o.draft_dir) {
        if (o.draft_tokens < 1 || o.draft_tokens > KILN_SPEC_MAX_DRAFT) {
            st = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                           "kiln_serve_opts.draft_tokens = %d must be in 1..%d", o.draft_tokens,
                           KILN_SPEC_MAX_DRAFT);
            goto out;
        }
        /* every slot's last token and drafts fit one step */
        eo.chunk = KILN_MAX(eo.chunk, o.parallel * (o.draft_tokens + 1));
    }
    st = kiln_engine_new(ctx, model, &eo, &eng);
    if (st) goto out;
    kiln_model_free(model); /* the engine holds its own packed copy */
    model = NULL;
    const char *name = o.model_name ? o.model_name : base_name(o.run_dir ? o.run_dir : o.model_dir);
    if (o.n_adapters < 0 || (o.n_adapters > 0 && !o.adapters)) {
        st = kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                       "kiln_serve_opts.n_adapters = %d without kiln_serve_opts.adapters",
                       o.n_adapters);
        goto out;
    }
    ad_ids = calloc((size_t)o.n_adapters + 1, sizeof *ad_ids);
    ad_dirs = calloc((size_t)o.n_adapters + 1, sizeof *ad_dirs);
    ad_count = calloc((size_t)o.n_adapters + 1, sizeof *ad_count);
    if (!ad_ids || !ad_dirs || !ad_count || !(ad_ids[0] = strdup(name))) {
        st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto out;
    }
    name = ad_ids[0]; /* (base_name's buffer is reused below) */
    if ((st = add_adapters(ctx, &o, eng, name, ad_ids, ad_dirs))) goto out;
    if (o.n_adapters)
        kiln_log(ctx, KILN_LOG_INFO,
                 "kiln serve: base '%s': %zu bytes of weight matrices, held once for it and its %d "
                 "adapter%s", name, kiln_engine_weight_bytes(eng), o.n_adapters,
                 o.n_adapters > 1 ? "s" : "");
    if (o.draft_dir) {
        st = load_draft(ctx, &o, kiln_engine_config(eng), tok, &eo, &draft);
        if (st) goto out;
    }
    st = sched_start(ctx, &s, eng, draft, o.draft_tokens, tok, o.max_queue);
    draft = NULL; /* the scheduler's now (freed by sched_free, even on failure) */
    if (st) goto out;
    sched_owns = true;
    eng = NULL;
    pthread_mutex_lock(&s.mu);
    s.pooling = o.embedding_pooling;
    s.log_ctx = ctx;
    s.n_ad = o.n_adapters;
    s.model_ids = (const char *const *)ad_ids;
    s.ad_dirs = (const char *const *)ad_dirs;
    s.model_requests = ad_count;
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
    st = http_start(ctx, &sv, &s, &o, name, &port);
    if (st) goto out;
    if (s.draft)
        printf("kiln serve: speculative decoding with draft %s, %d tokens a step\n",
               o.draft_dir, s.K);
    for (int i = 1; i <= o.n_adapters; i++)
        printf("kiln serve: LoRA adapter '%s' from %s\n", ad_ids[i], ad_dirs[i - 1]);
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
    kiln_engine_free(draft);
    kiln_tokenizer_free(tok);
    kiln_model_free(model);
    for (int i = 0; ad_ids && i <= o.n_adapters; i++) free(ad_ids[i]);
    for (int i = 0; ad_dirs && i < o.n_adapters; i++) free(ad_dirs[i]);
    free(ad_ids);
    free(ad_dirs);
    free(ad_count);
    return st;
}
