/*
 * http.c — the HTTP side of kiln serve on libmicrohttpd (one thread per
 * connection): routing, API-key check (constant time), body size limit,
 * OpenAI error objects, non-streamed responses and server-sent-event
 * streams, /health and /metrics. A handler thread submits a request to the
 * scheduler and waits on it; while it waits it watches its socket, and a
 * client that went away cancels its request, which frees the slot. Also
 * CORS, the access log and X-Request-Id. Over ~800 lines: the MHD
 * callbacks, the stream of n choices and the daemon's setup share the
 * connection state.
 */
#include <microhttpd.h> /* before serve.h: declares gate_notify */

#include "serve/serve.h"
#include "infer/grammar.h"

#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A request body this large marks a request whose buffers are given back
 * (malloc_trim) when it completes. */
#define BIG_BODY (64 * 1024)

#ifdef __VERSION__
#define KILN_BUILD_INFO "kiln " KILN_VERSION " (cc " __VERSION__ ")"
#else
#define KILN_BUILD_INFO "kiln " KILN_VERSION
#endif

enum { R_MODELS, R_MODEL, R_COMPL, R_CHAT, R_HEALTH, R_METRICS, R_TOKENIZE, R_DETOKENIZE,
       R_PROPS, R_EMBED, R_OTHER, R_N };
static const char *const route_name[R_N] = {"models",   "model",      "completions",
                                            "chat_completions", "health", "metrics",
                                            "tokenize", "detokenize", "props", "embeddings",
                                            "other"};
static const int code_list[] = {200, 204, 400, 401, 404, 405, 413, 429, 500, 503};
#define N_CODES 11 /* the list plus "other" */

enum { LOG_OFF, LOG_TEXT, LOG_JSON };

struct server {
    struct MHD_Daemon *d;
    gate *g;
    sched *s;
    api_model m;
    kiln_config cfg;     /* m.cfg: a copy (a reload frees the engine's) */
    char *name;
    const char *key;
    size_t key_len;
    size_t max_body;
    pthread_mutex_t mu;
    uint64_t hits[R_N][N_CODES];
    _Atomic uint64_t next_id;
    _Atomic int big_inflight; /* requests with a body >= BIG_BODY */
    long started;
    int n_slots;
    char *cors;          /* "*" or comma-separated origins; NULL = off */
    int log;             /* LOG_OFF, LOG_TEXT, LOG_JSON */
};

typedef struct conn {
    server *sv;
    int route;
    int fd;
    char *body;
    size_t len, cap;
    bool too_big;
    bool big;            /* counted in big_inflight */
    /* generation: the parsed request, its choices (q.n requests) */
    api_req q;
    bool submitted;      /* q.rs are the scheduler's too: release, not free */
    char id[48];
    long created;
    /* streaming */
    char *pend;
    size_t pend_len, pend_off;
    size_t *text_sent;   /* (q.n) per choice */
    int *lp_sent;
    bool *first_sent, *fin_sent;
    bool done;
    /* the access log */
    double t0;
    char method[16];
    char *path;
    char rid[48];        /* request id (X-Request-Id), the completion id on those routes */
    char client[64];
    int status;
    uint64_t bytes;      /* response body bytes sent */
    int n_prompt, n_gen; /* generation routes */
    const char *model;   /* the model id a request named (adapters served), NULL */
} conn;

static int route_of(const char *url)
{
    if (!strcmp(url, "/v1/models")) return R_MODELS;
    if (!strncmp(url, "/v1/models/", 11)) return R_MODEL;
    if (!strcmp(url, "/v1/completions")) return R_COMPL;
    if (!strcmp(url, "/v1/chat/completions")) return R_CHAT;
    if (!strcmp(url, "/v1/embeddings")) return R_EMBED;
    if (!strcmp(url, "/health")) return R_HEALTH;
    if (!strcmp(url, "/metrics")) return R_METRICS;
    if (!strcmp(url, "/tokenize")) return R_TOKENIZE;
    if (!strcmp(url, "/detokenize")) return R_DETOKENIZE;
    if (!strcmp(url, "/props")) return R_PROPS;
    return R_OTHER;
}

static bool post_route(int route)
{
    return route == R_COMPL || route == R_CHAT || route == R_TOKENIZE || route == R_DETOKENIZE ||
           route == R_EMBED;
}

/* The Access-Control-Allow-Origin value for a request from origin (NULL
 * when CORS is off or the origin is not allowed): "*", or the origin
 * itself when it is one of the listed ones. */
static const char *cors_allow(const server *sv, const char *origin)
{
    if (!sv->cors) return NULL;
    if (!strcmp(sv->cors, "*")) return "*";
    if (!origin || !*origin) return NULL;
    size_t ol = strlen(origin);
    for (const char *p = sv->cors; *p;) {
        const char *e = strchr(p, ',');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        while (l && *p == ' ') { p++; l--; }
        while (l && p[l - 1] == ' ') l--;
        if (l == ol && !memcmp(p, origin, l)) return origin;
        if (!e) break;
        p = e + 1;
    }
    return NULL;
}

/* Headers every response carries: the request id and, when enabled, CORS. */
static void common_headers(conn *k, struct MHD_Connection *c, struct MHD_Response *resp)
{
    MHD_add_response_header(resp, "X-Request-Id", k->rid);
    const char *allow =
        cors_allow(k->sv, MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin"));
    if (allow) {
        MHD_add_response_header(resp, "Access-Control-Allow-Origin", allow);
        MHD_add_response_header(resp, "Access-Control-Expose-Headers", "X-Request-Id");
        if (!strcmp(k->method, "OPTIONS")) {
            const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND,
                                                        "Access-Control-Request-Headers");
            MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
            MHD_add_response_header(resp, "Access-Control-Allow-Headers",
                                    h && *h ? h : "Authorization, Content-Type");
            MHD_add_response_header(resp, "Access-Control-Max-Age", "86400");
        }
    }
    if (k->sv->cors && strcmp(k->sv->cors, "*")) MHD_add_response_header(resp, "Vary", "Origin");
}

static void count(server *sv, int route, int status)
{
    int ci = N_CODES - 1;
    for (int i = 0; i < N_CODES - 1; i++)
        if (code_list[i] == status) ci = i;
    pthread_mutex_lock(&sv->mu);
    sv->hits[route][ci]++;
    pthread_mutex_unlock(&sv->mu);
}

static enum MHD_Result send_body(conn *k, struct MHD_Connection *c, int status,
                                 char *body, const char *ctype)
{
    if (!body) {
        status = 500;
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}");
        ctype = "application/json";
        if (!body) return MHD_NO;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        return MHD_NO;
    }
    size_t blen = strlen(body);
    if (ctype) MHD_add_response_header(resp, "Content-Type", ctype);
    /* one request per connection: every request passes the gate */
    MHD_add_response_header(resp, "Connection", "close");
    common_headers(k, c, resp);
    if (status == 405)
        MHD_add_response_header(resp, "Allow", post_route(k->route) ? "POST" : "GET, HEAD");
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    count(k->sv, k->route, status);
    k->status = status;
    k->bytes = blen;
    return ret;
}

static enum MHD_Result send_err(conn *k, struct MHD_Connection *c, const api_err *e)
{
    return send_body(k, c, e->status, api_error_json(e), "application/json");
}

static enum MHD_Result err(conn *k, struct MHD_Connection *c, int status, const char *type,
                           const char *code, const char *msg)
{
    api_err e = {.status = status, .type = type, .code = code};
    snprintf(e.msg, sizeof e.msg, "%s", msg);
    return send_err(k, c, &e);
}

/* "Bearer KEY": the scheme is case-insensitive and followed by one or
 * more spaces (RFC 9110 11.1). Constant-time comparison: time depends
 * only on the key's length. */
static bool key_ok(const server *sv, const char *hdr)
{
    if (!hdr) return false;
    if (strncasecmp(hdr, "Bearer", 6) != 0 || (hdr[6] != ' ' && hdr[6] != '\t')) return false;
    const char *got = hdr + 6;
    while (*got == ' ' || *got == '\t') got++;
    size_t gl = strlen(got);
    unsigned char d = (unsigned char)(gl != sv->key_len);
    for (size_t i = 0; i < sv->key_len; i++)
        d |= (unsigned char)((i < gl ? (unsigned char)got[i] : 0) ^ (unsigned char)sv->key[i]);
    return d == 0;
}

static bool client_gone(int fd)
{
    if (fd < 0) return false;
    char b;
    ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static void deadline(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_nsec += (long)ms * 1000000L;
    ts->tv_sec += ts->tv_nsec / 1000000000L;
    ts->tv_nsec %= 1000000000L;
}

static void new_id(server *sv, conn *k, bool chat)
{
    uint64_t n = atomic_fetch_add(&sv->next_id, 1);
    snprintf(k->id, sizeof k->id, "%s-%08lx%012llx", chat ? "chatcmpl" : "cmpl",
             (unsigned long)sv->started, (unsigned long long)n);
    k->created = (long)time(NULL);
}

/* ---- SSE stream ------------------------------------------------------- */

static bool pend_add(conn *k, char *ev)
{
    if (!ev) return false;
    size_t l = strlen(ev);
    char *p = realloc(k->pend, k->pend_len + l + 1);
    if (!p) {
        free(ev);
        return false;
    }
    k->pend = p;
    memcpy(k->pend + k->pend_len, ev, l + 1);
    k->pend_len += l;
    free(ev);
    return true;
}

/* Something new to send for choice i? mu held. */
static bool progressed(const conn *k, int i)
{
    const sreq *r = k->q.rs[i];
    /* the opening chunk: chat's role; completions' echoed prompt once its
     * logprobs are known (the prompt is through the engine) */
    if (!k->first_sent[i] && k->q.chat) return true;
    if (!k->first_sent[i] && k->q.echo) return r->n_gen > 0 || r->state == SREQ_DONE;
    if (k->q.tool_call || (k->q.tool_auto && r->state != SREQ_DONE && api_auto_hold(r)))
        return r->state == SREQ_DONE && !k->fin_sent[i];
    return r->text_len > k->text_sent[i] || r->n_lps > k->lp_sent[i] ||
           (r->state == SREQ_DONE && !k->fin_sent[i]);
}

/* Marks every choice cancelled (the client went away). mu held. */
static void cancel_all(conn *k, sched *s)
{
    for (int i = 0; i < k->q.n; i++)
        if (k->q.rs[i]->state != SREQ_DONE) k->q.rs[i]->cancelled = true;
    pthread_cond_signal(&s->cv);
}

/* The condition variable a handler waits on: the request's own, or for
 * n > 1 choices the scheduler's group one. */
static pthread_cond_t *wait_cv(conn *k)
{
    return k->q.n > 1 ? &k->sv->s->gcv : &k->q.rs[0]->cv;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    conn *k = cls;
    sched *s = k->sv->s;
    const api_model *m = &k->sv->m;
    int n = k->q.n;
    int idle_ms = 0;
    for (;;) {
        if (k->pend_off < k->pend_len) {
            size_t c = KILN_MIN(max, k->pend_len - k->pend_off);
            memcpy(buf, k->pend + k->pend_off, c);
            k->pend_off += c;
            if (k->pend_off == k->pend_len) {
                k->pend_off = k->pend_len = 0;
            }
            k->bytes += c;
            return (ssize_t)c;
        }
        if (k->done) return MHD_CONTENT_READER_END_OF_STREAM;
        pthread_mutex_lock(&s->mu);
        bool any = false;
        for (int i = 0; i < n && !any; i++) any = progressed(k, i);
        while (!any) {
            struct timespec ts;
            deadline(&ts, 100);
            pthread_cond_timedwait(wait_cv(k), &s->mu, &ts);
            for (int i = 0; i < n && !any; i++) any = progressed(k, i);
            if (any) break;
            pthread_mutex_unlock(&s->mu);
            bool gone = client_gone(k->fd);
            idle_ms += 100;
            pthread_mutex_lock(&s->mu);
            if (gone) {
                cancel_all(k, s);
                pthread_mutex_unlock(&s->mu);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
            if (idle_ms >= 10000) break;
        }
        if (!any) {
            /* nothing for a while: an SSE comment keeps proxies and the
             * connection timeout from closing the stream */
            idle_ms = 0;
            pthread_mutex_unlock(&s->mu);
            pend_add(k, strdup(": keep-alive\n\n"));
            continue;
        }
        /* chunks interleave by choice index, each choice in order */
        bool all_fin = true, failed = false;
        for (int i = 0; i < n && !failed; i++) {
            sreq *r = k->q.rs[i];
            if (!k->first_sent[i] && (k->q.chat || k->q.echo) && progressed(k, i)) {
                k->first_sent[i] = true;
                pend_add(k, api_chunk(&k->q, i, m, k->id, k->created, "", 0, 0, 0, NULL, true,
                                      false));
            }
            if (k->first_sent[i] || !(k->q.chat || k->q.echo)) {
                k->first_sent[i] = true;
                /* a tool call is sent whole with its finish (its text, only
                 * when it was cut short and is no call) */
                bool hold = k->q.tool_call &&
                            (r->state != SREQ_DONE || (r->finish && !strcmp(r->finish, "stop")));
                if (k->q.tool_auto && api_auto_hold(r)) {
                    /* text that may be tool calls waits for the end, then
                     * goes out as calls or, when it is none, as text */
                    char *rest = NULL;
                    json_t *calls = r->state == SREQ_DONE
                                        ? api_auto_calls(&k->q, r, k->id, i, &rest)
                                        : NULL;
                    hold = r->state != SREQ_DONE || calls;
                    json_decref(calls);
                    free(rest);
                }
                if (!hold && (r->text_len > k->text_sent[i] || r->n_lps > k->lp_sent[i])) {
                    pend_add(k, api_chunk(&k->q, i, m, k->id, k->created,
                                          r->text + k->text_sent[i], r->text_len - k->text_sent[i],
                                          k->lp_sent[i], r->n_lps, NULL, false, false));
                    k->text_sent[i] = r->text_len;
                    k->lp_sent[i] = r->n_lps;
                }
                if (r->state == SREQ_DONE && !k->fin_sent[i]) {
                    if (r->err_status) {
                        api_err e = {.status = r->err_status, .type = "server_error"};
                        snprintf(e.msg, sizeof e.msg, "%s", r->err);
                        char *j = api_error_json(&e);
                        if (j) {
                            size_t l = strlen(j);
                            char *ev = malloc(l + 9);
                            if (ev) snprintf(ev, l + 9, "data: %s\n\n", j);
                            pend_add(k, ev);
                            free(j);
                        }
                        failed = true;
                    } else {
                        pend_add(k, api_chunk(&k->q, i, m, k->id, k->created, "", 0, 0, 0,
                                              r->finish ? r->finish : "stop", false, false));
                    }
                    k->fin_sent[i] = true;
                }
            }
            all_fin &= k->fin_sent[i];
        }
        if (failed) {
            cancel_all(k, s);
            pend_add(k, strdup("data: [DONE]\n\n"));
            k->done = true;
        } else if (all_fin) {
            if (k->q.include_usage)
                pend_add(k, api_chunk(&k->q, 0, m, k->id, k->created, "", 0, 0, 0, NULL, false,
                                      true));
            pend_add(k, strdup("data: [DONE]\n\n"));
            k->done = true;
        }
        pthread_mutex_unlock(&s->mu);
    }
}

/* ---- generation routes -------------------------------------------------- */

static enum MHD_Result generate(conn *k, struct MHD_Connection *c, bool chat)
{
    server *sv = k->sv;
    api_err e = {0};
    if (api_parse(k->body ? k->body : "", k->len, chat, &sv->m, &k->q, &e))
        return send_err(k, c, &e);
    if (sv->m.n_adapters) k->model = k->q.model;
    int n = k->q.n;
    sreq *r0 = k->q.rs[0];
    for (int i = 0; i < n; i++)
        if (!k->q.rs[i]->group || k->q.rs[i]->leader) k->n_prompt += k->q.rs[i]->n_prompt;
    int st = sched_submit_group(sv->s, k->q.rs, n);
    if (st) {
        /* api_parse has checked ids and lengths already; this is the
         * scheduler's own guard */
        e = (api_err){.status = st,
                      .type = st == 503 ? "server_error" : "invalid_request_error",
                      .param = st == 503 ? NULL : "prompt",
                      .code = st == 503                      ? "server_overloaded"
                              : r0->n_prompt >= sv->m.n_ctx ? "context_length_exceeded"
                                                            : "invalid_value"};
        snprintf(e.msg, sizeof e.msg, "%s", r0->err);
        api_req_free(&k->q);
        return send_err(k, c, &e);
    }
    k->submitted = true; /* the requests are released in completed() */
    new_id(sv, k, chat);
    snprintf(k->rid, sizeof k->rid, "%s", k->id);
    if (k->q.stream) {
        k->text_sent = calloc((size_t)n, sizeof *k->text_sent);
        k->lp_sent = calloc((size_t)n, sizeof *k->lp_sent);
        k->first_sent = calloc((size_t)n, sizeof *k->first_sent);
        k->fin_sent = calloc((size_t)n, sizeof *k->fin_sent);
        if (!k->text_sent || !k->lp_sent || !k->first_sent || !k->fin_sent) return MHD_NO;
        struct MHD_Response *resp =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_reader, k, NULL);
        if (!resp) return MHD_NO;
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
        MHD_add_response_header(resp, "Connection", "close");
        common_headers(k, c, resp);
        enum MHD_Result ret = MHD_queue_response(c, 200, resp);
        MHD_destroy_response(resp);
        count(sv, k->route, 200);
        k->status = 200;
        return ret;
    }
    sched *s = sv->s;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        int left = 0;
        for (int i = 0; i < n; i++) left += k->q.rs[i]->state != SREQ_DONE;
        if (!left) break;
        struct timespec ts;
        deadline(&ts, 100);
        pthread_cond_timedwait(wait_cv(k), &s->mu, &ts);
        pthread_mutex_unlock(&s->mu);
        bool gone = client_gone(k->fd);
        pthread_mutex_lock(&s->mu);
        if (gone) {
            cancel_all(k, s);
            for (int i = 0; i < n; i++) k->n_gen += k->q.rs[i]->n_gen;
            pthread_mutex_unlock(&s->mu);
            count(sv, k->route, 499);
            k->status = 499;
            return MHD_NO; /* closes the connection */
        }
    }
    const sreq *bad = NULL;
    for (int i = 0; i < n; i++) {
        k->n_gen += k->q.rs[i]->n_gen;
        if (k->q.rs[i]->err_status && !bad) bad = k->q.rs[i];
    }
    pthread_mutex_unlock(&s->mu);
    if (bad) {
        e = (api_err){.status = bad->err_status, .type = "server_error"};
        snprintf(e.msg, sizeof e.msg, "%s", bad->err);
        return send_err(k, c, &e);
    }
    return send_body(k, c, 200, api_response(&k->q, &sv->m, k->id, k->created),
                     "application/json");
}

/* POST /v1/embeddings: one scheduler request per input, waited for like a
 * non-streamed completion. */
static enum MHD_Result embeddings(conn *k, struct MHD_Connection *c)
{
    server *sv = k->sv;
    api_err e = {0};
    if (api_parse_embed(k->body ? k->body : "", k->len, &sv->m, &k->q, &e))
        return send_err(k, c, &e);
    if (sv->m.n_adapters) k->model = k->q.model;
    int n = k->q.n;
    for (int i = 0; i < n; i++) k->n_prompt += k->q.rs[i]->n_prompt;
    int st = sched_submit_group(sv->s, k->q.rs, n);
    if (st) {
        e = (api_err){.status = st,
                      .type = st == 503 ? "server_error" : "invalid_request_error",
                      .param = st == 503 ? NULL : "input",
                      .code = st == 503 ? "server_overloaded" : "invalid_value"};
        snprintf(e.msg, sizeof e.msg, "%s", k->q.rs[0]->err);
        api_req_free(&k->q);
        return send_err(k, c, &e);
    }
    k->submitted = true;
    sched *s = sv->s;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        int w = 0; /* the first input not done: wait on its request */
        while (w < n && k->q.rs[w]->state == SREQ_DONE) w++;
        if (w == n) break;
        struct timespec ts;
        deadline(&ts, 100);
        pthread_cond_timedwait(&k->q.rs[w]->cv, &s->mu, &ts);
        pthread_mutex_unlock(&s->mu);
        bool gone = client_gone(k->fd);
        pthread_mutex_lock(&s->mu);
        if (gone) {
            cancel_all(k, s);
            pthread_mutex_unlock(&s->mu);
            count(sv, k->route, 499);
            k->status = 499;
            return MHD_NO;
        }
    }
    const sreq *bad = NULL;
    for (int i = 0; i < n && !bad; i++)
        if (k->q.rs[i]->err_status) bad = k->q.rs[i];
    pthread_mutex_unlock(&s->mu);
    if (bad) {
        e = (api_err){.status = bad->err_status, .type = "server_error"};
        snprintf(e.msg, sizeof e.msg, "%s", bad->err);
        return send_err(k, c, &e);
    }
    return send_body(k, c, 200, api_embed_response(&k->q, &sv->m), "application/json");
}

/* The followed run's checkpoint now (ck.on false when not following). */
static sckpt checkpoint(server *sv)
{
    pthread_mutex_lock(&sv->s->mu);
    sckpt ck = sv->s->ck;
    pthread_mutex_unlock(&sv->s->mu);
    return ck;
}

static char *props(server *sv, api_err *e)
{
    sckpt ck = checkpoint(sv);
    return api_props(&sv->m, sv->n_slots, KILN_BUILD_INFO, ck.on ? &ck : NULL, e);
}

static enum MHD_Result models(conn *k, struct MHD_Connection *c, const char *url)
{
    server *sv = k->sv;
    json_t *mo = json_pack("{s:s, s:s, s:i, s:s, s:i}", "id", sv->name, "object", "model",
                           "created", (json_int_t)sv->started, "owned_by", "kiln",
                           "context_length", sv->m.n_ctx);
    sckpt ck = checkpoint(sv);
    if (mo && ck.on) {
        /* following a run: the checkpoint served (extension fields) */
        json_object_set_new(mo, "checkpoint", json_string(ck.name));
        json_object_set_new(mo, "checkpoint_step", json_integer(ck.step));
    }
    /* served LoRA adapters: a model each, over the base (vLLM's "parent") */
    json_t *list = json_array();
    if (list && mo) json_array_append(list, mo);
    for (int i = 0; list && i < sv->m.n_adapters; i++) {
        json_t *ao = json_pack("{s:s, s:s, s:i, s:s, s:i, s:s, s:s}", "id", sv->m.adapters[i],
                               "object", "model", "created", (json_int_t)sv->started, "owned_by",
                               "kiln", "context_length", sv->m.n_ctx, "parent", sv->name,
                               "root", sv->s->ad_dirs[i]);
        if (ao) json_array_append_new(list, ao);
    }
    if (k->route == R_MODEL) {
        for (int i = 0; list && i < sv->m.n_adapters; i++)
            if (!strcmp(url + 11, sv->m.adapters[i])) {
                json_decref(mo);
                mo = json_incref(json_array_get(list, (size_t)i + 1));
                break;
            }
        json_decref(list);
        const char *id = mo ? json_string_value(json_object_get(mo, "id")) : NULL;
        if (!id || strcmp(url + 11, id) != 0) {
            json_decref(mo);
            char msg[300];
            snprintf(msg, sizeof msg, "The model '%.200s' does not exist", url + 11);
            return err(k, c, 404, "not_found_error", "model_not_found", msg);
        }
        char *s = json_dumps(mo, JSON_COMPACT);
        json_decref(mo);
        return send_body(k, c, 200, s, "application/json");
    }
    json_decref(mo);
    json_t *o = list ? json_pack("{s:s, s:o}", "object", "list", "data", list) : NULL;
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return send_body(k, c, 200, s, "application/json");
}

static char *render_metrics(server *sv)
{
    metrics hm = {0};
    char *base = metrics_render(sv->s, &hm);
    if (!base) return NULL;
    size_t cap = strlen(base) + 8192, n = strlen(base);
    char *out = realloc(base, cap);
    if (!out) {
        free(base);
        return NULL;
    }
    n += (size_t)snprintf(out + n, cap - n,
                          "# HELP kiln_http_requests_total HTTP requests by route and status.\n"
                          "# TYPE kiln_http_requests_total counter\n");
    pthread_mutex_lock(&sv->mu);
    for (int r = 0; r < R_N; r++)
        for (int ci = 0; ci < N_CODES; ci++) {
            if (!sv->hits[r][ci]) continue;
            char code[8];
            if (ci < N_CODES - 1) snprintf(code, sizeof code, "%d", code_list[ci]);
            else snprintf(code, sizeof code, "other");
            n += (size_t)snprintf(out + n, cap - n,
                                  "kiln_http_requests_total{route=\"%s\",code=\"%s\"} %llu\n",
                                  route_name[r], code, (unsigned long long)sv->hits[r][ci]);
            if (n >= cap) n = cap - 1;
        }
    pthread_mutex_unlock(&sv->mu);
    return out;
}

/* 413 for a body that passed --max-body while arriving, written straight
 * to the socket: MHD queues no response before the whole body is read.
 * Then the write side is shut and the input drained briefly (at most
 * 1 s), so the close does not reset the answer away before the client
 * reads it. */
static void refuse_body(conn *k)
{
    server *sv = k->sv;
    api_err e = {.status = 413, .type = "invalid_request_error", .code = "request_too_large"};
    snprintf(e.msg, sizeof e.msg, "The request body is larger than this server's limit of %zu bytes",
             sv->max_body);
    char *j = api_error_json(&e);
    count(sv, k->route, 413);
    k->status = 413;
    if (k->fd < 0 || !j) {
        free(j);
        return;
    }
    char head[200];
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 413 Content Too Large\r\nContent-Type: application/json\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n", strlen(j));
    (void)!send(k->fd, head, (size_t)hl, MSG_NOSIGNAL | MSG_MORE);
    (void)!send(k->fd, j, strlen(j), MSG_NOSIGNAL);
    k->bytes = strlen(j);
    free(j);
    shutdown(k->fd, SHUT_WR);
    char buf[4096];
    for (int i = 0; i < 10; i++) {
        struct pollfd pf = {k->fd, POLLIN, 0};
        if (poll(&pf, 1, 100) <= 0) continue;
        ssize_t n;
        while ((n = recv(k->fd, buf, sizeof buf, MSG_DONTWAIT)) > 0) {}
        if (n == 0) break;
    }
    free(k->body);
    k->body = NULL;
    k->len = k->cap = 0;
}

/* ---- MHD callbacks -------------------------------------------------------- */

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version,
                               const char *upload, size_t *upload_size, void **con_cls)
{
    (void)version;
    server *sv = cls;
    conn *k = *con_cls;
    if (!k) {
        k = calloc(1, sizeof *k);
        if (!k) return MHD_NO;
        *con_cls = k;
        k->sv = sv;
        k->route = route_of(url);
        k->t0 = kiln_time_now();
        k->status = 0;
        snprintf(k->method, sizeof k->method, "%s", method);
        k->path = strndup(url, 1024);
        snprintf(k->rid, sizeof k->rid, "req-%08lx%012llx", (unsigned long)sv->started,
                 (unsigned long long)atomic_fetch_add(&sv->next_id, 1));
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        k->fd = ci ? ci->connect_fd : -1;
        ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
        if (ci && ci->client_addr) {
            const struct sockaddr *sa = ci->client_addr;
            if (sa->sa_family == AF_INET)
                inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, k->client,
                          sizeof k->client);
            else if (sa->sa_family == AF_INET6)
                inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, k->client,
                          sizeof k->client);
        }
        if (!k->client[0]) snprintf(k->client, sizeof k->client, "-");
        bool post = !strcmp(method, "POST");
        bool get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        if (k->route == R_OTHER)
            return err(k, c, 404, "invalid_request_error", "unknown_url",
                       "Unknown route; kiln serves GET /v1/models, POST /v1/completions, "
                       "POST /v1/chat/completions, POST /v1/embeddings, POST /tokenize, POST /detokenize, "
                       "GET /props, GET /health, GET /metrics");
        if (!strcmp(method, "OPTIONS") && sv->cors) {
            /* a CORS preflight: no API key (browsers send none), no body */
            return send_body(k, c, 204, strdup(""), NULL);
        }
        bool keyed = !strncmp(url, "/v1/", 4) || k->route == R_TOKENIZE ||
                     k->route == R_DETOKENIZE || k->route == R_PROPS;
        if (keyed && sv->key &&
            !key_ok(sv, MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization")))
            return err(k, c, 401, "authentication_error", "invalid_api_key",
                       "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'");
        bool want_post = post_route(k->route);
        if ((want_post && !post) || (!want_post && !get))
            return err(k, c, 405, "invalid_request_error", "method_not_allowed",
                       want_post ? "This route accepts POST only" : "This route accepts GET only");
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > sv->max_body) {
            k->too_big = true;
            char msg[160];
            snprintf(msg, sizeof msg, "The request body is larger than this server's limit of %zu bytes",
                     sv->max_body);
            return err(k, c, 413, "invalid_request_error", "request_too_large", msg);
        }
        return MHD_YES;
    }
    if (*upload_size) {
        if (!k->too_big) {
            if (k->len + *upload_size > sv->max_body) {
                /* a body without Content-Length (chunked) passed the limit:
                 * answer now and close, not when the body ends */
                k->too_big = true;
                refuse_body(k);
                return MHD_NO; /* MHD closes the connection */
            } else {
                if (k->len + *upload_size + 1 > k->cap) {
                    size_t cap = k->cap ? k->cap : 4096;
                    while (cap < k->len + *upload_size + 1) cap *= 2;
                    char *b = realloc(k->body, cap);
                    if (!b) return MHD_NO;
                    k->body = b;
                    k->cap = cap;
                }
                memcpy(k->body + k->len, upload, *upload_size);
                k->len += *upload_size;
                k->body[k->len] = 0;
                if (!k->big && k->len >= BIG_BODY) {
                    k->big = true;
                    atomic_fetch_add(&sv->big_inflight, 1);
                }
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (k->too_big) {
        char msg[160];
        snprintf(msg, sizeof msg, "The request body is larger than this server's limit of %zu bytes",
                 sv->max_body);
        return err(k, c, 413, "invalid_request_error", "request_too_large", msg);
    }
    switch (k->route) {
    case R_HEALTH:
        return send_body(k, c, 200, strdup("{\"status\":\"ok\"}"), "application/json");
    case R_METRICS:
        return send_body(k, c, 200, render_metrics(sv), "text/plain; version=0.0.4");
    case R_MODELS:
    case R_MODEL: return models(k, c, url);
    case R_COMPL: return generate(k, c, false);
    case R_CHAT: return generate(k, c, true);
    case R_EMBED: return embeddings(k, c);
    case R_TOKENIZE:
    case R_DETOKENIZE:
    case R_PROPS: {
        api_err e = {0};
        char *out = k->route == R_TOKENIZE
                        ? api_tokenize(k->body ? k->body : "", k->len, &sv->m, &e)
                    : k->route == R_DETOKENIZE
                        ? api_detokenize(k->body ? k->body : "", k->len, &sv->m, &e)
                        : props(sv, &e);
        return out ? send_body(k, c, 200, out, "application/json") : send_err(k, c, &e);
    }
    default: return MHD_NO;
    }
}

/* One access-log line on stderr for a finished request. */
static void access_log(const conn *k, bool aborted)
{
    const server *sv = k->sv;
    if (sv->log == LOG_OFF) return;
    double ms = (kiln_time_now() - k->t0) * 1e3;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[96];
    snprintf(when, sizeof when, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ts.tv_nsec / 1000000L));
    /* no status queued (the client left first): 499, as nginx logs it */
    int status = k->status ? k->status : 499;
    bool gen = k->route == R_COMPL || k->route == R_CHAT;
    if (sv->log == LOG_JSON) {
        json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:i, s:I, s:f, s:s}", "time", when, "client",
                              k->client, "method", k->method, "path", k->path ? k->path : "",
                              "status", status, "bytes", (json_int_t)k->bytes, "duration_ms",
                              ms, "request_id", k->rid);
        if (o && gen && status == 200) {
            json_object_set_new(o, "prompt_tokens", json_integer(k->n_prompt));
            json_object_set_new(o, "completion_tokens", json_integer(k->n_gen));
        }
        if (o && k->model) json_object_set_new(o, "model", json_string(k->model));
        if (o && aborted) json_object_set_new(o, "aborted", json_true());
        char *s = o ? json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII | JSON_REAL_PRECISION(6)) : NULL;
        json_decref(o);
        if (s) fprintf(stderr, "%s\n", s);
        free(s);
        return;
    }
    /* text: the path with anything outside printable ASCII as %XX */
    char path[1100];
    size_t n = 0;
    for (const char *p = k->path ? k->path : ""; *p && n + 4 < sizeof path; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch > 0x20 && ch < 0x7f && ch != '"') path[n++] = (char)ch;
        else n += (size_t)snprintf(path + n, sizeof path - n, "%%%02X", ch);
    }
    path[n] = 0;
    char toks[400] = "";
    if (gen && status == 200)
        snprintf(toks, sizeof toks, " prompt_tokens=%d completion_tokens=%d", k->n_prompt,
                 k->n_gen);
    if (k->model) /* adapters served: the model id each request ran on */
        snprintf(toks + strlen(toks), sizeof toks - strlen(toks), " model=%.300s", k->model);
    fprintf(stderr, "%s %s %s %s %d %llu %.1fms %s%s%s\n", when, k->client, k->method, path,
            status, (unsigned long long)k->bytes, ms, k->rid, toks, aborted ? " aborted" : "");
}

/* The access-log line of a request the gate answered itself (malformed,
 * too slow, too large, too many connections): method and path "-". */
static void gate_logged(void *ud, const struct sockaddr *sa, int status, size_t bytes, double secs)
{
    server *sv = ud;
    if (sv->log == LOG_OFF) return;
    conn k;
    memset(&k, 0, sizeof k);
    k.sv = sv;
    k.route = R_OTHER;
    k.t0 = kiln_time_now() - secs;
    snprintf(k.method, sizeof k.method, "-");
    k.path = (char *)"-";
    k.status = status;
    k.bytes = bytes;
    snprintf(k.rid, sizeof k.rid, "req-%08lx%012llx", (unsigned long)sv->started,
             (unsigned long long)atomic_fetch_add(&sv->next_id, 1));
    if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, k.client, sizeof k.client);
    else if (sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, k.client, sizeof k.client);
    else
        snprintf(k.client, sizeof k.client, "-");
    access_log(&k, false);
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls,
                      enum MHD_RequestTerminationCode toe)
{
    (void)c;
    server *sv = cls;
    conn *k = *con_cls;
    if (!k) return;
    if (k->submitted) {
        if (k->q.stream) {
            pthread_mutex_lock(&sv->s->mu);
            k->n_gen = 0;
            for (int i = 0; i < k->q.n; i++) k->n_gen += k->q.rs[i]->n_gen;
            pthread_mutex_unlock(&sv->s->mu);
        }
        for (int i = 0; i < k->q.n; i++) {
            sched_cancel(sv->s, k->q.rs[i]);
            sreq_release(sv->s, k->q.rs[i]);
        }
        free(k->q.rs);
        infer_grammar_free(k->q.tool_auto);
    } else {
        api_req_free(&k->q);
    }
    free(k->text_sent);
    free(k->lp_sent);
    free(k->first_sent);
    free(k->fin_sent);
    access_log(k, toe != MHD_REQUEST_TERMINATED_COMPLETED_OK);
    bool big = k->big;
    free(k->path);
    free(k->body);
    free(k->pend);
    free(k);
    *con_cls = NULL;
    /* A big body brings big parses (JSON, token ids, rendered chats); when
     * the last such request is done, hand the freed memory back, so
     * resident memory returns to its baseline after a burst of large or
     * hostile requests (see also the mallopt() in kiln_serve_run). */
    if (big && atomic_fetch_sub(&sv->big_inflight, 1) == 1) malloc_trim(0);
}

kiln_status http_start(kiln_ctx *ctx, server **out, sched *s,
                       const kiln_serve_opts *o, const char *model_name,
                       int *bound_port)
{
    *out = NULL;
    server *sv = kiln_calloc(ctx, 1, sizeof *sv);
    if (!sv) return KILN_ERR_NOMEM;
    sv->s = s;
    sv->name = strdup(model_name);
    sv->cfg = *kiln_engine_config(s->eng);
    sv->m = (api_model){.name = sv->name, .tok = s->tok, .n_ctx = s->n_ctx,
                        .cfg = &sv->cfg, .vocab = s->V,
                        .adapters = s->n_ad ? s->model_ids + 1 : NULL, .n_adapters = s->n_ad};
    sv->key = o->api_key; /* kiln_serve_run refused an empty one */
    sv->key_len = sv->key ? strlen(sv->key) : 0;
    sv->max_body = o->max_body;
    sv->started = (long)time(NULL);
    sv->n_slots = s->n_slots;
    sv->cors = o->cors ? strdup(o->cors) : NULL;
    sv->log = !o->log_format || !strcmp(o->log_format, "text") ? LOG_TEXT
              : !strcmp(o->log_format, "json")                 ? LOG_JSON
                                                               : LOG_OFF;
    pthread_mutex_init(&sv->mu, NULL);

    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t sslen;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD;
    const char *host = o->host && *o->host ? o->host : "127.0.0.1";
    if (!strcmp(host, "localhost")) host = "127.0.0.1";
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (o->port < 0 || o->port > 65535) {
        free(sv->name);
        free(sv->cors);
        free(sv);
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_serve_opts.port = %d is not in 0..65535", o->port);
    }
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)o->port);
        sslen = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)o->port);
        sslen = sizeof *a6;
        flags |= MHD_USE_IPv6;
    } else {
        free(sv->name);
        free(sv->cors);
        free(sv);
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_serve_opts.host = '%s' is not an IPv4 or IPv6 address (e.g. 127.0.0.1 or 0.0.0.0)",
                         host);
    }
    /* The listening socket is ours: SO_REUSEADDR (a restart need not wait
     * out TIME_WAIT) but never SO_REUSEPORT, so a second server on a busy
     * port fails here instead of silently sharing its connections. */
    int lfd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        bind(lfd, (struct sockaddr *)&ss, sslen) || listen(lfd, 128)) {
        int e = errno;
        if (lfd >= 0) close(lfd);
        free(sv->name);
        free(sv->cors);
        free(sv);
        if (e == EADDRINUSE)
            return kiln_fail(ctx, KILN_ERR_IO,
                             "cannot listen on %s:%d: address already in use (another server "
                             "has port %d); stop it or pick another kiln_serve_opts.port",
                             host, o->port, o->port);
        return kiln_fail(ctx, KILN_ERR_IO, "cannot listen on %s:%d: %s; check kiln_serve_opts.host and kiln_serve_opts.port",
                         host, o->port, strerror(e));
    }
    int maxc = o->max_connections > 0 ? o->max_connections : 256;
    struct sockaddr_storage bound;
    socklen_t bl = sizeof bound;
    int port = o->port;
    if (!getsockname(lfd, (struct sockaddr *)&bound, &bl))
        port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                 : ((struct sockaddr_in *)&bound)->sin_port);
    sv->g = gate_new(lfd, maxc, 10.0);
    if (!sv->g) {
        close(lfd);
        free(sv->name);
        free(sv->cors);
        free(sv);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "serve: out of memory");
    }
    /* The gate accepts and screens; MHD gets well-formed connections.
     * The gate enforces --max-connections, counting from the hand-over;
     * MHD's own limit stays far above it: MHD counts a connection until
     * its daemon thread cleans it up, and libmicrohttpd 0.9.75 leaves its
     * cleanup mutex locked when an added connection meets that limit
     * (new_connection_process_'s "firm check under lock"), which
     * deadlocks every connection thread and the shutdown. */
    sv->d = MHD_start_daemon(
        flags | MHD_USE_NO_LISTEN_SOCKET | MHD_USE_ITC, 0, NULL, NULL, handler, sv,
        MHD_OPTION_NOTIFY_COMPLETED, completed, sv, MHD_OPTION_NOTIFY_CONNECTION, gate_notify,
        sv->g, MHD_OPTION_CONNECTION_LIMIT, (unsigned)(4 * maxc + 64), MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)30, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)65536, MHD_OPTION_END);
    gate_set_log(sv->g, gate_logged, sv);
    kiln_status st = sv->d ? gate_start(ctx, sv->g, sv->d)
                           : kiln_fail(ctx, KILN_ERR_IO, "cannot start the HTTP server on %s:%d (%s)",
                                       host, o->port, strerror(errno));
    if (st) {
        if (sv->d) MHD_stop_daemon(sv->d);
        gate_free(sv->g);
        free(sv->name);
        free(sv->cors);
        free(sv);
        return st;
    }
    *bound_port = port;
    *out = sv;
    return KILN_OK;
}

void http_stop(server *sv)
{
    if (!sv) return;
    gate_stop(sv->g);
    MHD_stop_daemon(sv->d);
    gate_free(sv->g);
    pthread_mutex_destroy(&sv->mu);
    free(sv->name);
    free(sv->cors);
    free(sv);
}
