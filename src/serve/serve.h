/*
 * serve.h — private interface of the HTTP server: generation requests as
 * the HTTP threads and the scheduler share them, the continuous-batching
 * scheduler, request parsing (OpenAI JSON) and metrics.
 *
 * Threads: libmicrohttpd runs one thread per connection; each submits a
 * request to the scheduler and waits on the request's condition variable
 * for text. One scheduler thread owns the engine: each step it admits
 * waiting requests into free slots (continuous batching: a new request
 * joins the running batch at the next step), runs one forward pass over
 * every active slot (decodes plus prefill chunks of newcomers), samples,
 * and publishes text. One mutex (sched.mu) guards all shared state.
 */
#ifndef KILN_SERVE_H
#define KILN_SERVE_H

#include "base/base.h"

#include <pthread.h>

#define SREQ_MAX_STOPS 8
#define SREQ_MAX_TOP 20

typedef enum sreq_state {
    SREQ_QUEUED = 0,
    SREQ_RUNNING = 1,
    SREQ_DONE = 2
} sreq_state;

/* One generated token's log-probabilities (when asked for). */
typedef struct slp {
    int32_t token;
    float logprob;
    int n_top;
    kiln_token_logprob top[SREQ_MAX_TOP];
} slp;

/* A compiled output grammar shared by a request's choices (refcounted:
 * each choice holds a reference and its own parse state). */
typedef struct sgrammar {
    _Atomic int refs;
    struct infer_grammar *g;
    char **tools;        /* tool-call grammars: the function names */
    int n_tools;
} sgrammar;
void sgrammar_release(sgrammar *g);

typedef struct logit_bias {
    int32_t token;
    float bias;
} logit_bias;

/* A generation request. Fields above `shared` are set before submit and
 * then read-only; fields below are guarded by the scheduler's mutex. */
typedef struct sreq {
    int32_t *prompt;
    int n_prompt;
    kiln_sampling sp;
    int max_tokens;
    char *stops[SREQ_MAX_STOPS];
    int n_stops;
    bool want_logprobs;
    bool ignore_eos;
    bool skip_special;   /* special tokens add no text (skip_special_tokens) */
    int32_t stop_id;     /* ends the turn (chat: <|im_end|>), -1 none */
    int32_t stop_ids[SREQ_MAX_STOPS]; /* stop_token_ids (extension) */
    int n_stop_ids;
    logit_bias *bias;
    int n_bias;
    int n_added;         /* ids the server put before the prompt (BOS): not echoed */
    bool prompt_lps;     /* echo with logprobs: score every prompt token */
    bool grouped;        /* one of n > 1 choices: progress also wakes sched.gcv */
    uint64_t group;      /* n > 1: the request's choices share it (0: none) */
    bool leader;         /* choice 0 of a group: the others copy its prompt's cache */
    sgrammar *gram;      /* constrained output (response_format, tools) or NULL */
    struct infer_gstate *gst; /* this choice's parse state of gram */
    char *echo_text;     /* echo: the prompt's text (malloc'ed) */
    size_t echo_len;
    int adapter;         /* the engine's adapter id (0: the base) of the model asked for */
    bool embed;          /* /v1/embeddings: pool the prompt's hidden states into emb */
    float *emb;          /* (n_embd) written by the scheduler before SREQ_DONE */

    /* shared (sched.mu) */
    pthread_cond_t cv;
    sreq_state state;
    bool cancelled;      /* client went away */
    char *text;          /* published text (valid UTF-8) */
    size_t text_len, text_cap;
    slp *lps;            /* per generated token when want_logprobs */
    int n_lps, lps_cap;
    slp *plps;           /* (n_prompt) when prompt_lps: plps[i] scores prompt[i]
                            given prompt[0..i) (plps[0] unused) */
    int n_plps;          /* prompt positions scored so far */
    int n_gen;           /* tokens generated */
    int n_cached;        /* prompt tokens whose cache was reused (prefix caching) */
    const char *finish;  /* "stop" | "length" | NULL (running) */
    int err_status;      /* > 0: failed with this HTTP status */
    char err[256];
    double t_submit, t_first, t_done;
    int refs;

    /* scheduler-private */
    int slot;
    int n_fed;           /* prompt tokens already in the cache */
    int32_t next;        /* sampled token to feed next step */
    kiln_gen *gen;       /* the generation loop's state (sched.c) */
    struct infer_spec *spec; /* its drafting state (a draft is served), or NULL */
    int sk;              /* tokens drafted for the coming step (0: one-token step) */
    struct sreq *qnext;  /* queue link */
} sreq;

typedef struct metrics {
    uint64_t requests[8];      /* by route index x status class, see http.c */
    uint64_t req_by_status[6]; /* 1xx..5xx (index 1..5) */
    uint64_t prompt_tokens, gen_tokens;
    uint64_t steps, step_tokens;
    /* histograms (seconds) */
    uint64_t ttft_b[12], lat_b[12];
    uint64_t ttft_n, lat_n;
    double ttft_sum, lat_sum;
    uint64_t cancelled, rejected_queue;
    uint64_t cached_tokens, cache_hits; /* prefix caching */
    /* speculative decoding */
    uint64_t spec_drafted, spec_accepted, spec_rounds, spec_emitted;
    double spec_draft_s;
} metrics;

/* The checkpoint of a followed run directory being served (sched.mu). */
typedef struct sckpt {
    bool on;               /* following kiln_serve_opts.run_dir */
    char name[64];         /* "step_00000012" */
    long step;             /* parsed from the name, -1 when it has no number */
    long loaded_at;        /* unix time it was swapped in (or loaded at start) */
    uint64_t reloads, failures;
    char error[320];       /* the last failed load's message, "" none */
} sckpt;
/* The step number of a checkpoint name "step_00000012" (12), or -1. */
long sckpt_step(const char *name);

typedef struct sched {
    kiln_engine *eng;
    const kiln_tokenizer *tok;
    int V, n_slots, n_ctx, chunk, max_queue;
    int tok_V;             /* the tokenizer's vocabulary (<= V): ids past it are never sampled */
    int eot, eos;
    pthread_mutex_t mu;
    pthread_cond_t cv;     /* work arrived / cancel */
    pthread_cond_t gcv;    /* a grouped request (n > 1) progressed */
    pthread_t th;
    bool stop, started, mu_init;
    bool dirty;            /* ran since the last malloc_trim */
    sreq *qhead, *qtail;
    int qlen;
    sreq **slots;          /* (n_slots) active request or NULL */
    int32_t *cache_tok;    /* (n_slots, n_ctx) the tokens in each slot's cache */
    int *cache_n;          /* (n_slots) how many (the engine's position) */
    int n_active;
    metrics m;
    /* step scratch (scheduler thread) */
    kiln_engine_tok *toks;
    sreq **owner;          /* (chunk) request per logits row */
    int *opos;             /* (chunk) the prompt position of the row, -1: sample */
    float *logits;         /* (chunk, V) */
    kiln_ctx *ctx;
    struct infer_vocab_trie *trie; /* the tokenizer's vocabulary (grammars) */
    uint8_t *allowed;      /* (V) scratch: tokens a grammar allows */
    kiln_pooling pooling;  /* embeddings (kiln_serve_opts.embedding_pooling) */
    /* following a run directory (reload.c): the checkpoint served, and a
     * newer one loaded in the background and waiting to be swapped in */
    const kiln_ctx *log_ctx; /* for log lines (kiln_log only) */
    sckpt ck;
    kiln_engine *next_eng; /* swapped in once no request runs (sched_main) */
    /* speculative decoding (sched.c): the draft's engine (owned; same
     * slots), up to K tokens a round, and the tokens in each draft slot's
     * cache (n_slots, n_ctx) beside how many */
    kiln_engine *draft;
    int K;
    int32_t *dcache_tok;
    int *dcache_n;
    int *orow;             /* (chunk) a logits row's place in its slot's round */
    float *dlogits;        /* (n_slots, V) the draft's rows */
    kiln_engine_tok *dtoks; /* (chunk) */
    char next_name[64];
    double next_secs;      /* its load time */
    /* served adapters (set before requests arrive; read-only then): the
     * model ids (0 the base, i adapter i), the adapters' directories (a
     * reloaded engine adds them again), requests admitted per model id */
    int n_ad;
    const char *const *model_ids; /* (n_ad + 1) */
    const char *const *ad_dirs;   /* (n_ad) */
    uint64_t *model_requests;     /* (n_ad + 1) */
} sched;

/* Creates the scheduler over an engine (not owned) and starts its
 * thread. draft (owned from here on, even on failure; may be NULL): the
 * draft model's engine of speculative decoding, K tokens a round. */
kiln_status sched_start(kiln_ctx *ctx, sched *s, kiln_engine *eng, kiln_engine *draft, int K,
                        const kiln_tokenizer *tok, int max_queue);
/* Stops the thread and fails every queued/active request (503); the
 * mutex stays usable for HTTP threads still draining. */
void sched_stop(sched *s);
/* Stops if needed and frees everything (after the HTTP side stopped). */
void sched_free(sched *s);

/* Allocates a request (refs = 1, held by the caller). */
sreq *sreq_new(void);
/* Frees a request that was never submitted. */
void sreq_free(sreq *r);
/* Drops a reference (takes sched.mu); frees at zero. */
void sreq_release(sched *s, sreq *r);

/* Queues r (the scheduler takes a reference). Returns 0, or an HTTP
 * status (503 queue full, 400 prompt too long) with r->err set. */
int sched_submit(sched *s, sreq *r);
/* Queues the n choices of one request together (all or none): 0, or an
 * HTTP status with rs[0]->err set. An empty queue takes any n; otherwise
 * the queue must have room for all n. */
int sched_submit_group(sched *s, sreq **rs, int n);
/* Marks r cancelled (client gone); its slot is freed at the next step. */
void sched_cancel(sched *s, sreq *r);
/* Hands the scheduler a newly loaded engine (same config, slots and
 * context as the one it runs) for checkpoint name. Requests running now
 * finish on the old engine; none is admitted until they have, then the
 * engine is swapped, the prefix cache dropped, and the old engine freed
 * (on the scheduler's thread). A newer engine replaces one still
 * waiting (freed here). Takes ownership of eng. */
void sched_swap(sched *s, kiln_engine *eng, const char *name, double load_secs);

/* ---- following a run directory (reload.c) ---------------------------- */

typedef struct reloader reloader;
/* Starts a thread that reads RUN/latest every watch_ms and, when it names
 * another checkpoint than the one served (current, a directory name),
 * verifies and loads it with eo and hands it to sched_swap; a checkpoint
 * that fails (checksums, a truncated file, another config) is logged,
 * counted in s->ck and not retried until it changes; the old weights stay.
 * log_ctx: where log lines go (kiln_log only). */
kiln_status reloader_start(kiln_ctx *log_ctx, reloader **out, sched *s, const char *run_dir,
                           const char *current, const kiln_engine_opts *eo, int watch_ms);
/* Stops the thread (waits for a load in progress) and frees. NULL: no-op. */
void reloader_stop(reloader *r);

/* Prometheus text of s's metrics (malloc'ed). */
char *metrics_render(sched *s, const metrics *http_m);
/* Adds one observation to a latency histogram. */
void metrics_observe(uint64_t *b, uint64_t *n, double *sum, double secs);
extern const double metrics_buckets[12];

/* ---- OpenAI requests and responses (api.c) --------------------------- */

typedef struct api_err {
    int status;          /* HTTP status */
    const char *type;    /* invalid_request_error, ... */
    const char *param;   /* offending field or NULL */
    const char *code;    /* machine-readable code or NULL */
    char msg[512];
} api_err;

typedef struct api_req {
    bool chat;
    bool stream;
    bool include_usage;
    bool logprobs;
    bool echo;           /* completions: the prompt comes before the text */
    bool tool_call;      /* the output is a function call: answer tool_calls */
    struct infer_grammar *tool_auto; /* tool_choice auto: the calls' grammar, to
                                        check <tool_call> blocks the model wrote */
    int n;               /* choices: prompts x n, prompt-major (OpenAI's indices) */
    sreq **rs;           /* (n) one request per choice, owned until submitted */
    bool b64;            /* embeddings: encoding_format base64 */
    const char *model;   /* the model id asked for (api_model's string) */
} api_req;

/* Frees q's requests (those never submitted) and buffers. */
void api_req_free(api_req *q);

typedef struct api_model {
    const char *name;
    const kiln_tokenizer *tok;
    int n_ctx;
    const kiln_config *cfg; /* the model's (kiln_prompt_ids' BOS rule) */
    int vocab;           /* the model's vocabulary size */
    const char *const *adapters; /* (n_adapters) served adapters' ids: adapter i + 1 */
    int n_adapters;
} api_model;

/* The model a request's "model" field names (absent or null: the base):
 * its adapter id (0: the base) and id string; 0, or a 404 (an unknown
 * id) / 400 in e. */
int api_pick_model(const json_t *mv, const api_model *m, int *adapter, const char **name,
                   api_err *e);

/* Parses an OpenAI completions (chat=false) or chat completions body into
 * out->r. Returns 0, or fills err (status 400 / 404) and returns it. */
int api_parse(const char *body, size_t len, bool chat, const api_model *m,
              api_req *out, api_err *err);
/* The OpenAI error object as a JSON string (malloc'ed). */
char *api_error_json(const api_err *e);
/* Non-streamed response body (malloc'ed). r must be done. */
char *api_response(const api_req *q, const api_model *m, const char *id, long created);
/* One SSE event "data: {...}\n\n" for streaming (malloc'ed) of choice
 * index (request r = q->rs[index]): text delta [text, text+n), logprob
 * entries [lp0, lp1) of r->lps, finish reason or NULL; when first (chat)
 * the delta carries the role, (completions with echo) the prompt and its
 * logprobs. usage_only: the final usage chunk (choices empty). */
char *api_chunk(const api_req *q, int index, const api_model *m,
                const char *id, long created, const char *text, size_t n,
                int lp0, int lp1, const char *finish, bool first,
                bool usage_only);

/* Helpers shared by api*.c: an error (returns status), an optional
 * boolean field, bytes as a JSON string (invalid UTF-8 as U+FFFD), a
 * token's bytes (malloc'ed, NULL on failure), a growing buffer. */
int api_fail(api_err *e, int status, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
int api_boolean(const json_t *o, const char *key, bool *out, api_err *e);
json_t *api_jstr_bytes(const char *p, size_t n);
/* response_format, tools, tool_choice of request body o (api_output.c):
 * r->gram, q->tool_call, and the tools' system text (*tools_sys). */
int api_parse_output(const json_t *o, bool chat, api_req *q, sreq *r, char **tools_sys,
                     api_err *e);
/* The tool_calls array of a finished tool-call choice, or NULL. */
json_t *api_tool_calls(const sreq *r, const char *id, int index);
/* tool_choice auto: the calls r's text makes — it starts (after
 * whitespace) with <tool_call>{"name": ..., "arguments": {...}}</tool_call>
 * blocks, each a call of one of the tools valid against its parameters —
 * as a tool_calls array (*rest: the text after them, malloc'ed), or NULL
 * when it is text. */
json_t *api_auto_calls(const api_req *q, const sreq *r, const char *id, int index, char **rest);
/* tool_choice auto, streaming: whether r's text so far may still become
 * tool calls (hold it back). */
bool api_auto_hold(const sreq *r);
void api_token_text(const api_model *m, int32_t id, char **p, size_t *n);
bool api_sbuf_add(char **b, size_t *n, size_t *cap, const char *s, size_t len);

/* POST /v1/embeddings (api_embed.c): out->rs are embedding requests (one
 * per input); the response of a done request (malloc'ed). */
int api_parse_embed(const char *body, size_t len, const api_model *m, api_req *out, api_err *e);
char *api_embed_response(const api_req *q, const api_model *m);

/* POST /tokenize {"content", "add_special", "with_pieces"} -> {"tokens"};
 * POST /detokenize {"tokens"} -> {"content"}; GET /props. Each returns the
 * response body (malloc'ed), or NULL with err filled. */
char *api_tokenize(const char *body, size_t len, const api_model *m, api_err *err);
char *api_detokenize(const char *body, size_t len, const api_model *m, api_err *err);
/* ck: the followed run's checkpoint (a "checkpoint" object) or NULL. */
char *api_props(const api_model *m, int n_slots, const char *build, const sckpt *ck,
                api_err *err);

/* ---- gate (gate.c): accepts and screens request heads ---------------- */

typedef struct gate gate;
struct MHD_Daemon;
/* A gate over the listening socket lfd (owned from here on): heads must
 * arrive within head_secs; max_connections open connections at most.
 * NULL when out of memory. */
gate *gate_new(int lfd, int max_connections, double head_secs);
/* Called for every request the gate answers itself (its access-log
 * line): the client, the status, the body bytes, seconds since accept. */
struct sockaddr;
typedef void (*gate_log_fn)(void *ud, const struct sockaddr *sa, int status, size_t bytes,
                            double secs);
void gate_set_log(gate *g, gate_log_fn fn, void *ud);
/* Starts the accept thread, handing screened connections to d. */
kiln_status gate_start(kiln_ctx *ctx, gate *g, struct MHD_Daemon *d);
/* Stops accepting and closes the connections still waiting. */
void gate_stop(gate *g);
/* Stops, closes the listening socket and frees. gate_free(NULL) is a no-op. */
void gate_free(gate *g);
/* Writes an OpenAI error response to fd (best effort) and returns the
 * body's bytes. */
size_t gate_answer(int fd, int status, const char *type, const char *code, const char *msg);

/* ---- relay (relay.c): chunked request bodies ------------------------- */

/* A streaming decoder of chunked transfer coding (RFC 9112 7.1). */
typedef struct chunk_dec chunk_dec;
void chunk_dec_init(chunk_dec *d);
/* Decodes in[0, n) into out (room for n bytes): the data bytes in
 * *out_n. Returns 1 when the body ended (the last chunk and its trailer
 * lines: the bytes after it are left unread), 0 when more is due, -1 when
 * the framing is malformed (msg says how). */
int chunk_dec_feed(chunk_dec *d, const char *in, size_t n, char *out, size_t *out_n, char *msg,
                   size_t cap);
bool chunk_dec_done(const chunk_dec *d);

/* The relay threads of one gate. */
typedef struct relay_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int live;            /* relay threads running */
    int wake;            /* readable: every relay ends */
    double idle_secs;    /* a body with no bytes this long gets a 408 */
    gate_log_fn log;
    void *log_ud;
} relay_pool;
void relay_pool_init(relay_pool *p, int wake, double idle_secs);
/* Waits until every relay ended (after wake turned readable). */
void relay_pool_wait(relay_pool *p);
void relay_pool_destroy(relay_pool *p);
struct sockaddr_storage;
/* Takes over client socket cfd, whose request head (head_len bytes) was
 * peeked and checked and announces a chunked body, and starts its relay
 * thread. Returns the socket for libmicrohttpd, or -1 (out of memory or
 * threads; the head may have been consumed: answer and close cfd). */
int relay_start(relay_pool *p, int cfd, size_t head_len, const struct sockaddr_storage *sa);
#ifdef MHD_VERSION
/* MHD_OPTION_NOTIFY_CONNECTION callback (cls = the gate). */
void gate_notify(void *cls, struct MHD_Connection *c, void **socket_context,
                 enum MHD_ConnectionNotificationCode toe);
#endif

/* ---- http ------------------------------------------------------------ */

typedef struct server server;
kiln_status http_start(kiln_ctx *ctx, server **out, sched *s,
                       const kiln_serve_opts *o, const char *model_name,
                       int *bound_port);
void http_stop(server *sv);

#endif /* KILN_SERVE_H */
