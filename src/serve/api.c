/*
 * api.c — the OpenAI wire format: parsing and validating /v1/completions
 * and /v1/chat/completions bodies into generation requests (every field
 * type- and range-checked; the error names the field), rendering chat
 * messages with the ChatML template, and building responses, streamed
 * chunks and error objects (n choices, echo). Output constraints are in
 * api_output.c, the llama.cpp-style routes in api_misc.c. Over ~800
 * lines: one parser for every field of both routes, and their responses.
 */
#include "serve/serve.h"
#include "infer/infer.h"
#include "infer/grammar.h"

#include <stdatomic.h>

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

int api_fail(api_err *e, int status, const char *param, const char *code,
                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->status = status;
    e->type = status == 404 ? "not_found_error" : "invalid_request_error";
    e->param = param;
    e->code = code;
    return status;
}

/* Optional number in [lo, hi]; absent or null keeps *out. */
static int num(const json_t *o, const char *key, double lo, double hi,
               double *out, api_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v))
        return api_fail(e, 400, key, "invalid_type", "'%s' must be a number", key);
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi))
        return api_fail(e, 400, key, "invalid_value", "'%s' must be in [%g, %g] (got %g)",
                    key, lo, hi, d);
    *out = d;
    return 0;
}

static int integer(const json_t *o, const char *key, long long lo, long long hi,
                   long long *out, api_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    long long x;
    if (json_is_integer(v)) x = json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
             fabs(json_real_value(v)) < 9e15)
        x = (long long)json_real_value(v);
    else
        return api_fail(e, 400, key, "invalid_type", "'%s' must be an integer", key);
    if (x < lo || x > hi)
        return api_fail(e, 400, key, "invalid_value", "'%s' must be in [%lld, %lld] (got %lld)",
                    key, lo, hi, x);
    *out = x;
    return 0;
}

int api_boolean(const json_t *o, const char *key, bool *out, api_err *e)
{
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v))
        return api_fail(e, 400, key, "invalid_type", "'%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

bool api_sbuf_add(char **b, size_t *n, size_t *cap, const char *s, size_t len)
{
    if (*n + len + 1 > *cap) {
        size_t c = *cap ? *cap : 512;
        while (c < *n + len + 1) c *= 2;
        char *t = realloc(*b, c);
        if (!t) return false;
        *b = t;
        *cap = c;
    }
    memcpy(*b + *n, s, len);
    *n += len;
    (*b)[*n] = 0;
    return true;
}

/* OpenAI parameters kiln does not implement: a 400 naming the parameter
 * rather than a plain-text 200 the client would take for what it asked
 * for. Values that mean "the default" (response_format text, no tools,
 * best_of 1, an empty suffix) are accepted. */
static int unsupported(const json_t *o, api_err *e)
{
    /* e->param must outlive the request's JSON: the static names */
    static const char *const names[] = {"functions", "function_call", "best_of", "suffix"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        const char *key = names[i];
        json_t *v = json_object_get(o, key);
        if (!v || json_is_null(v)) continue;
        bool bad;
        if (!strcmp(key, "functions")) {
            bad = !json_is_array(v) || json_array_size(v) > 0;
        } else if (!strcmp(key, "function_call")) {
            bad = !json_is_string(v) || (strcmp(json_string_value(v), "none") != 0 &&
                                         strcmp(json_string_value(v), "auto") != 0);
        } else if (!strcmp(key, "best_of")) {
            bad = !(json_is_integer(v) && json_integer_value(v) == 1);
        } else { /* suffix */
            bad = !json_is_string(v) || json_string_length(v) > 0;
        }
        if (bad)
            return api_fail(e, 400, key, "unsupported_parameter",
                        "Unsupported parameter: '%s' is not supported by this server%s", key,
                        !strcmp(key, "functions") || !strcmp(key, "function_call")
                            ? " (the legacy functions API: use 'tools' and 'tool_choice')"
                            : " (omit it)");
    }
    return 0;
}

/* Renders messages with the tokenizer's chat template (ChatML, see
 * kiln_chat_render) into prompt ids, with the assistant generation prompt. */
static int render_chat(const api_model *m, const json_t *msgs, const char *tools_sys, sreq *r,
                       api_err *e)
{
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        return api_fail(e, 400, "messages", "invalid_type",
                    "'messages' must be a non-empty array of {role, content} objects");
    size_t nm = json_array_size(msgs);
    if (nm > 4096) return api_fail(e, 400, "messages", "invalid_value", "more than 4096 messages");
    /* one slot more: the tools' system message when the first is not one */
    kiln_chat_msg *cm = calloc(nm + 1, sizeof *cm);
    char **owned = calloc(nm + 1, sizeof *owned);
    int rc = 0;
    if (!cm || !owned) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto out; }
    size_t i;
    json_t *msg;
    json_array_foreach(msgs, i, msg) {
        if (!json_is_object(msg)) {
            rc = api_fail(e, 400, "messages", "invalid_type", "messages[%zu] must be an object", i);
            goto out;
        }
        json_t *role = json_object_get(msg, "role"), *content = json_object_get(msg, "content");
        const char *rl = json_is_string(role) ? json_string_value(role) : NULL;
        if (!rl || (strcmp(rl, "system") && strcmp(rl, "user") && strcmp(rl, "assistant") &&
                    strcmp(rl, "developer") && strcmp(rl, "tool"))) {
            rc = api_fail(e, 400, "messages", "invalid_value",
                      "messages[%zu].role must be one of system, developer, user, assistant, tool", i);
            goto out;
        }
        cm[i].role = strcmp(rl, "developer") ? rl : "system";
        if (json_is_string(content)) {
            cm[i].content = json_string_value(content);
            cm[i].content_len = json_string_length(content); /* NULs count */
        } else if (json_is_array(content)) {
            char *b = NULL;
            size_t n = 0, cap = 0;
            size_t j;
            json_t *part;
            json_array_foreach(content, j, part) {
                json_t *ty = json_object_get(part, "type"), *tx = json_object_get(part, "text");
                if (!json_is_string(ty) || strcmp(json_string_value(ty), "text") || !json_is_string(tx)) {
                    free(b);
                    rc = api_fail(e, 400, "messages", "invalid_value",
                              "messages[%zu].content[%zu]: only {\"type\": \"text\", \"text\": ...} "
                              "parts are supported", i, j);
                    goto out;
                }
                if (!api_sbuf_add(&b, &n, &cap, json_string_value(tx), json_string_length(tx))) {
                    free(b);
                    rc = api_fail(e, 500, NULL, NULL, "out of memory");
                    goto out;
                }
            }
            owned[i] = b ? b : strdup("");
            cm[i].content = owned[i];
            cm[i].content_len = n;
        } else if ((!content || json_is_null(content)) && !strcmp(rl, "assistant")) {
            cm[i].content = "";
        } else {
            rc = api_fail(e, 400, "messages", "invalid_type",
                      "messages[%zu].content must be a string or an array of text parts", i);
            goto out;
        }
    }
    /* an assistant turn's tool calls, as the model writes them (Hermes):
     * <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call> after its text */
    json_array_foreach(msgs, i, msg) {
        json_t *tc = json_object_get(msg, "tool_calls");
        if (!tc || json_is_null(tc) || strcmp(cm[i].role, "assistant")) continue;
        if (!json_is_array(tc)) {
            rc = api_fail(e, 400, "messages", "invalid_type", "messages[%zu].tool_calls must be an array", i);
            goto out;
        }
        char *b = NULL;
        size_t n = 0, cap = 0;
        bool ok = api_sbuf_add(&b, &n, &cap, cm[i].content, cm[i].content_len ? cm[i].content_len : strlen(cm[i].content));
        size_t j;
        json_t *call;
        json_array_foreach(tc, j, call) {
            json_t *fn = json_object_get(call, "function");
            json_t *nm_ = json_object_get(fn, "name"), *args = json_object_get(fn, "arguments");
            if (!json_is_string(nm_) || (args && !json_is_string(args) && !json_is_object(args))) {
                free(b);
                rc = api_fail(e, 400, "messages", "invalid_value",
                          "messages[%zu].tool_calls[%zu] must have function.name and "
                          "function.arguments (a JSON string)", i, j);
                goto out;
            }
            json_t *aj = json_is_string(args) ? json_loads(json_string_value(args), 0, NULL)
                                              : json_incref(args);
            json_t *call_j = json_pack("{s:O, s:o}", "name", nm_, "arguments",
                                       aj ? aj : json_object());
            char *cs = call_j ? json_dumps(call_j, JSON_COMPACT) : NULL;
            json_decref(call_j);
            if (n) ok = ok && api_sbuf_add(&b, &n, &cap, "\n", 1);
            ok = ok && cs && api_sbuf_add(&b, &n, &cap, "<tool_call>\n", 12) &&
                 api_sbuf_add(&b, &n, &cap, cs, strlen(cs)) && api_sbuf_add(&b, &n, &cap, "\n</tool_call>", 13);
            free(cs);
        }
        if (!ok) {
            free(b);
            rc = api_fail(e, 500, NULL, NULL, "out of memory");
            goto out;
        }
        free(owned[i]);
        owned[i] = b ? b : strdup("");
        cm[i].content = owned[i];
        cm[i].content_len = n;
    }
    int n_msgs = (int)nm;
    if (tools_sys) {
        /* the tools go into the system message, first in the conversation */
        if (!strcmp(cm[0].role, "system")) {
            char *b = NULL;
            size_t n = 0, cap = 0;
            size_t l0 = cm[0].content_len ? cm[0].content_len : strlen(cm[0].content);
            if (!api_sbuf_add(&b, &n, &cap, cm[0].content, l0) || !api_sbuf_add(&b, &n, &cap, "\n\n", l0 ? 2 : 0) ||
                !api_sbuf_add(&b, &n, &cap, tools_sys, strlen(tools_sys))) {
                free(b);
                rc = api_fail(e, 500, NULL, NULL, "out of memory");
                goto out;
            }
            free(owned[0]);
            owned[0] = b;
            cm[0].content = b;
            cm[0].content_len = n;
        } else {
            memmove(cm + 1, cm, nm * sizeof *cm);
            memmove(owned + 1, owned, nm * sizeof *owned);
            owned[0] = NULL;
            cm[0] = (kiln_chat_msg){.role = "system", .content = tools_sys};
            n_msgs++;
        }
    }
    {
        kiln_ctx *ctx = kiln_ctx_new();
        int32_t *ids = NULL;
        size_t n = 0;
        kiln_status st = ctx ? kiln_chat_render(ctx, m->tok, cm, n_msgs, true, &ids, NULL, &n)
                             : KILN_ERR_NOMEM;
        if (st) {
            rc = api_fail(e, 400, "messages", "invalid_value", "cannot render the messages: %s",
                      ctx ? kiln_errmsg(ctx) : "out of memory");
        } else {
            /* the BOS rule of kiln generate and kiln chat */
            size_t np = 0;
            if (kiln_prompt_ids(ctx, m->cfg, m->tok, ids, n, &r->prompt, &np)) {
                rc = api_fail(e, 500, NULL, NULL, "out of memory");
            } else {
                r->n_prompt = (int)np;
                r->stop_id = kiln_chat_stop_id(m->tok);
            }
        }
        free(ids);
        kiln_ctx_free(ctx);
    }
out:
    if (owned)
        for (size_t k = 0; k < nm + 1; k++) free(owned[k]);
    free(owned);
    free(cm);
    return rc;
}

static int add_stop(sreq *r, const char *s, size_t n, api_err *e)
{
    if (n == 0) return 0;
    if (r->n_stops >= SREQ_MAX_STOPS)
        return api_fail(e, 400, "stop", "invalid_value", "at most %d stop strings are allowed",
                    SREQ_MAX_STOPS - 1);
    if (n > 256) return api_fail(e, 400, "stop", "invalid_value", "a stop string is longer than 256 bytes");
    r->stops[r->n_stops] = strndup(s, n);
    if (!r->stops[r->n_stops]) return api_fail(e, 500, NULL, NULL, "out of memory");
    r->n_stops++;
    return 0;
}

static int tokenize(const api_model *m, const char *text, size_t len, sreq *r, api_err *e)
{
    kiln_ctx *ctx = kiln_ctx_new();
    int32_t *ids = NULL;
    size_t n = 0;
    kiln_status st = ctx ? kiln_tokenizer_encode(ctx, m->tok, text, len, &ids, &n) : KILN_ERR_NOMEM;
    if (st) {
        api_fail(e, 400, "prompt", "invalid_value", "cannot tokenize the prompt: %s",
             ctx ? kiln_errmsg(ctx) : "out of memory");
        kiln_ctx_free(ctx);
        return 400;
    }
    /* the BOS rule of kiln generate and kiln chat (an empty prompt starts
     * from BOS or end-of-text) */
    size_t np = 0;
    st = kiln_prompt_ids(ctx, m->cfg, m->tok, ids, n, &r->prompt, &np);
    kiln_ctx_free(ctx);
    free(ids);
    if (st) return api_fail(e, 500, NULL, NULL, "out of memory");
    r->n_prompt = (int)np;
    r->n_added = (int)(np - n);
    return 0;
}

/* A copy of r for another choice of the same request, with its own seed. */
static sreq *sreq_clone(const sreq *r, uint64_t seed)
{
    sreq *c = sreq_new();
    if (!c) return NULL;
    c->prompt = malloc((size_t)r->n_prompt * sizeof *c->prompt);
    c->bias = r->n_bias ? malloc((size_t)r->n_bias * sizeof *c->bias) : NULL;
    c->plps = r->plps ? calloc((size_t)r->n_prompt, sizeof *c->plps) : NULL;
    bool ok = c->prompt && (!r->n_bias || c->bias) && (!r->plps || c->plps);
    for (int i = 0; ok && i < r->n_stops; i++) {
        c->stops[i] = strdup(r->stops[i]);
        if (!c->stops[i]) ok = false;
        else c->n_stops = i + 1;
    }
    if (!ok) {
        sreq_free(c);
        return NULL;
    }
    memcpy(c->prompt, r->prompt, (size_t)r->n_prompt * sizeof *c->prompt);
    if (r->n_bias) memcpy(c->bias, r->bias, (size_t)r->n_bias * sizeof *c->bias);
    c->n_prompt = r->n_prompt;
    c->n_bias = r->n_bias;
    c->sp = r->sp;
    c->sp.seed = seed;
    c->max_tokens = r->max_tokens;
    c->want_logprobs = r->want_logprobs;
    c->ignore_eos = r->ignore_eos;
    c->skip_special = r->skip_special;
    c->stop_id = r->stop_id;
    memcpy(c->stop_ids, r->stop_ids, sizeof c->stop_ids);
    c->n_stop_ids = r->n_stop_ids;
    c->n_added = r->n_added;
    c->prompt_lps = r->prompt_lps;
    c->adapter = r->adapter;
    if (r->echo_text) {
        c->echo_text = malloc(r->echo_len + 1);
        if (!c->echo_text) {
            sreq_free(c);
            return NULL;
        }
        memcpy(c->echo_text, r->echo_text, r->echo_len + 1);
        c->echo_len = r->echo_len;
    }
    c->grouped = r->grouped;
    c->group = r->group;
    if (r->gram) {
        c->gst = infer_gstate_new(r->gram->g);
        if (!c->gst) {
            sreq_free(c);
            return NULL;
        }
        atomic_fetch_add(&r->gram->refs, 1);
        c->gram = r->gram;
    }
    return c;
}

void api_req_free(api_req *q)
{
    for (int i = 0; i < q->n; i++)
        if (q->rs[i]) sreq_free(q->rs[i]);
    free(q->rs);
    infer_grammar_free(q->tool_auto);
    q->rs = NULL;
    q->tool_auto = NULL;
    q->n = 0;
}

/* A completions prompt value into r->prompt: a string or an array of token
 * ids (item: one of a batch, named prompt[] in errors). */
static int prompt_ids(const json_t *p, bool item, const api_model *m, sreq *r, api_err *e)
{
    if (json_is_string(p))
        return tokenize(m, json_string_value(p), json_string_length(p), r, e);
    if (json_is_array(p) && json_array_size(p) > 0 && json_is_integer(json_array_get(p, 0))) {
        size_t np = json_array_size(p);
        if (np > (size_t)m->n_ctx)
            return api_fail(e, 400, "prompt", "context_length_exceeded",
                            "the prompt is %zu tokens; this server's context is %d tokens", np, m->n_ctx);
        r->prompt = malloc(np * sizeof(int32_t));
        if (!r->prompt) return api_fail(e, 500, NULL, NULL, "out of memory");
        for (size_t i = 0; i < np; i++) {
            json_t *v = json_array_get(p, i);
            if (!json_is_integer(v))
                return api_fail(e, 400, "prompt", "invalid_type", "a token-id prompt must contain only integers");
            json_int_t t = json_integer_value(v);
            if (t < 0 || t >= m->vocab)
                return api_fail(e, 400, "prompt", "invalid_value",
                                "prompt%s[%zu] = %lld is not a token id of this model (vocabulary "
                                "[0, %d))", item ? "[]" : "", i, (long long)t, m->vocab);
            r->prompt[i] = (int32_t)t;
        }
        r->n_prompt = (int)np;
        return 0;
    }
    if (item)
        return api_fail(e, 400, "prompt", "invalid_type",
                        "each prompt of a batch must be a string or a non-empty array of token ids");
    return api_fail(e, 400, "prompt", "invalid_type",
                    "'prompt' must be a string, an array of token ids, or an array of strings or "
                    "of token-id arrays (a batch)");
}

/* What depends on r's prompt: the echoed text (and prompt logprobs), the
 * context check, max_tokens. */
static int prompt_rest(const json_t *o, const api_model *m, bool chat, bool echo, bool logprobs,
                       sreq *r, api_err *e)
{
    if (echo) {
        /* the prompt as the model reads it, without the BOS the server added */
        kiln_ctx *ctx = kiln_ctx_new();
        char *t = NULL;
        size_t tl = 0;
        if (!ctx || kiln_tokenizer_decode(ctx, m->tok, r->prompt + r->n_added,
                                          (size_t)(r->n_prompt - r->n_added), &t, &tl)) {
            kiln_ctx_free(ctx);
            return api_fail(e, 400, "prompt", "invalid_value", "cannot decode the prompt to echo it");
        }
        kiln_ctx_free(ctx);
        r->echo_text = infer_utf8_sanitize(t ? t : "", tl, &r->echo_len);
        free(t);
        if (!r->echo_text) return api_fail(e, 500, NULL, NULL, "out of memory");
        if (logprobs) {
            r->prompt_lps = true;
            r->plps = calloc((size_t)r->n_prompt, sizeof *r->plps);
            if (!r->plps) return api_fail(e, 500, NULL, NULL, "out of memory");
        }
    }
    if (r->n_prompt >= m->n_ctx)
        return api_fail(e, 400, chat ? "messages" : "prompt", "context_length_exceeded",
                        "the prompt is %d tokens; this server's context is %d tokens (prompt plus "
                        "at least one generated token must fit)",
                        r->n_prompt, m->n_ctx);
    int room = m->n_ctx - r->n_prompt;
    long long mt = -1;
    const char *key = "max_tokens";
    if (chat && json_object_get(o, "max_completion_tokens") &&
        !json_is_null(json_object_get(o, "max_completion_tokens")))
        key = "max_completion_tokens";
    /* echo with max_tokens 0 scores the prompt without generating */
    int rc = integer(o, key, echo ? 0 : 1, 1LL << 40, &mt, e);
    if (rc) return rc;
    if (mt < 0) mt = chat ? room : KILN_MIN(16, room);
    if (mt > room)
        return api_fail(e, 400, key, "context_length_exceeded",
                        "'%s' is %lld but only %d tokens fit after the %d-token prompt in "
                        "this server's %d-token context",
                        key, mt, room, r->n_prompt, m->n_ctx);
    r->max_tokens = (int)mt;
    return 0;
}

int api_pick_model(const json_t *mv, const api_model *m, int *adapter, const char **name,
                   api_err *e)
{
    *adapter = 0;
    *name = m->name;
    if (!mv || json_is_null(mv)) return 0;
    if (!json_is_string(mv))
        return api_fail(e, 400, "model", "invalid_type", "'model' must be a string");
    const char *want = json_string_value(mv);
    if (!strcmp(want, m->name)) return 0;
    for (int i = 0; i < m->n_adapters; i++)
        if (!strcmp(want, m->adapters[i])) {
            *adapter = i + 1;
            *name = m->adapters[i];
            return 0;
        }
    if (m->n_adapters)
        return api_fail(e, 404, "model", "model_not_found",
                        "The model '%.200s' does not exist; this server serves '%.200s' and "
                        "%d LoRA adapter%s over it (GET /v1/models)",
                        want, m->name, m->n_adapters, m->n_adapters > 1 ? "s" : "");
    return api_fail(e, 404, "model", "model_not_found",
                    "The model '%.200s' does not exist; this server serves '%.200s' (GET /v1/models)",
                    want, m->name);
}

int api_parse(const char *body, size_t len, bool chat, const api_model *m,
              api_req *out, api_err *e)
{
    memset(out, 0, sizeof *out);
    out->chat = chat;
    json_error_t jerr;
    json_t *o = json_loadb(body, len, JSON_ALLOW_NUL, &jerr);
    if (!o)
        return api_fail(e, 400, NULL, "invalid_json",
                    "the request body is not valid JSON (line %d, column %d: %s)",
                    jerr.line, jerr.column, jerr.text);
    if (!json_is_object(o)) {
        json_decref(o);
        return api_fail(e, 400, NULL, "invalid_json", "the request body must be a JSON object");
    }
    sreq *r = sreq_new();
    out->rs = calloc(1, sizeof *out->rs);
    if (!r || !out->rs) {
        json_decref(o);
        if (r) sreq_free(r);
        free(out->rs);
        out->rs = NULL;
        return api_fail(e, 500, NULL, NULL, "out of memory");
    }
    out->rs[0] = r;
    out->n = 1;
    int rc = 0;
    char *tools_sys = NULL;
    double d;
    long long ll;
    r->sp = kiln_sampling_default();

    if ((rc = api_pick_model(json_object_get(o, "model"), m, &r->adapter, &out->model, e)))
        goto done;
    if ((rc = api_boolean(o, "stream", &out->stream, e))) goto done;
    json_t *so = json_object_get(o, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) { rc = api_fail(e, 400, "stream_options", "invalid_type", "'stream_options' must be an object"); goto done; }
        if ((rc = api_boolean(so, "include_usage", &out->include_usage, e))) goto done;
    }
    ll = 1;
    if ((rc = integer(o, "n", 1, 128, &ll, e))) goto done;
    int n_choices = (int)ll;
    const json_t *batch = NULL;
    size_t n_prompts = 1;
    bool echo = false;
    if ((rc = api_boolean(o, "echo", &echo, e))) goto done;
    if (echo && chat) {
        rc = api_fail(e, 400, "echo", "invalid_value",
                  "'echo' is a parameter of /v1/completions; chat completions do not echo");
        goto done;
    }
    out->echo = echo;
    if ((rc = unsupported(o, e))) goto done;
    if ((rc = api_parse_output(o, chat, out, r, &tools_sys, e))) goto done;
    if (r->gram) {
        if (json_object_get(o, "stop") && !json_is_null(json_object_get(o, "stop"))) {
            rc = api_fail(e, 400, "stop", "invalid_value",
                      "'stop' cannot be combined with 'response_format' json output or a tool "
                      "call: a stop string could cut the JSON");
            goto done;
        }
        if (echo) {
            rc = api_fail(e, 400, "echo", "invalid_value",
                      "'echo' cannot be combined with 'response_format' json output");
            goto done;
        }
        r->gst = infer_gstate_new(r->gram->g);
        if (!r->gst) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto done; }
    }

    d = 1.0;
    if ((rc = num(o, "temperature", 0, 2, &d, e))) goto done;
    r->sp.temperature = (float)d;
    d = 1.0;
    if ((rc = num(o, "top_p", 0, 1, &d, e))) goto done;
    if (d <= 0) { rc = api_fail(e, 400, "top_p", "invalid_value", "'top_p' must be in (0, 1]"); goto done; }
    r->sp.top_p = (float)d;
    ll = 0;
    if ((rc = integer(o, "top_k", -1, 1 << 30, &ll, e))) goto done;
    r->sp.top_k = ll < 0 ? 0 : (int)ll;
    d = 0;
    if ((rc = num(o, "min_p", 0, 1, &d, e))) goto done;
    r->sp.min_p = (float)d;
    d = 0;
    if ((rc = num(o, "frequency_penalty", -2, 2, &d, e))) goto done;
    r->sp.frequency_penalty = (float)d;
    d = 0;
    if ((rc = num(o, "presence_penalty", -2, 2, &d, e))) goto done;
    r->sp.presence_penalty = (float)d;
    d = 1;
    if ((rc = num(o, "repetition_penalty", 1e-3, 100, &d, e))) goto done;
    r->sp.repetition_penalty = (float)d;
    {
        json_t *sv = json_object_get(o, "seed");
        if (sv && !json_is_null(sv)) {
            if (!json_is_integer(sv)) { rc = api_fail(e, 400, "seed", "invalid_type", "'seed' must be an integer"); goto done; }
            r->sp.seed = (uint64_t)json_integer_value(sv);
        } else {
            static _Atomic uint64_t ctr;
            r->sp.seed = (uint64_t)(kiln_time_now() * 1e9) ^ (++ctr * 0x9e3779b97f4a7c15ULL);
        }
    }
    if ((rc = api_boolean(o, "ignore_eos", &r->ignore_eos, e))) goto done;
    r->skip_special = true;
    if ((rc = api_boolean(o, "skip_special_tokens", &r->skip_special, e))) goto done;

    /* logprobs: completions take an integer (0..5 alternatives); chat a
     * boolean plus top_logprobs (0..20). */
    {
        json_t *lv = json_object_get(o, "logprobs");
        if (chat) {
            bool lp = false;
            if ((rc = api_boolean(o, "logprobs", &lp, e))) goto done;
            ll = 0;
            if ((rc = integer(o, "top_logprobs", 0, 20, &ll, e))) goto done;
            if (ll > 0 && !lp) { rc = api_fail(e, 400, "top_logprobs", "invalid_value", "'top_logprobs' requires 'logprobs': true"); goto done; }
            out->logprobs = lp;
            r->sp.top_logprobs = (int)ll;
        } else if (lv && !json_is_null(lv)) {
            ll = 0;
            if ((rc = integer(o, "logprobs", 0, 5, &ll, e))) goto done;
            out->logprobs = true;
            r->sp.top_logprobs = (int)ll;
        }
        r->want_logprobs = out->logprobs;
    }
    {
        json_t *lb = json_object_get(o, "logit_bias");
        if (lb && !json_is_null(lb)) {
            if (!json_is_object(lb)) { rc = api_fail(e, 400, "logit_bias", "invalid_type", "'logit_bias' must be an object of token id -> bias"); goto done; }
            size_t nb = json_object_size(lb);
            if (nb > 1024) { rc = api_fail(e, 400, "logit_bias", "invalid_value", "'logit_bias' has more than 1024 entries"); goto done; }
            r->bias = calloc(nb ? nb : 1, sizeof *r->bias);
            if (!r->bias) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto done; }
            const char *k;
            json_t *v;
            json_object_foreach(lb, k, v) {
                char *end;
                long id = strtol(k, &end, 10);
                if (!*k || *end || id < 0 || id > 1 << 30 || !json_is_number(v) ||
                    !(json_number_value(v) >= -100 && json_number_value(v) <= 100)) {
                    rc = api_fail(e, 400, "logit_bias", "invalid_value",
                              "'logit_bias' keys must be token ids and values numbers in [-100, 100]");
                    goto done;
                }
                if (id >= m->vocab) {
                    rc = api_fail(e, 400, "logit_bias", "invalid_value",
                              "'logit_bias' key %ld is not a token id of this model (vocabulary "
                              "[0, %d))", id, m->vocab);
                    goto done;
                }
                r->bias[r->n_bias++] = (logit_bias){(int32_t)id, (float)json_number_value(v)};
            }
        }
    }
    {
        json_t *st = json_object_get(o, "stop");
        if (json_is_string(st)) {
            if ((rc = add_stop(r, json_string_value(st), json_string_length(st), e))) goto done;
        } else if (json_is_array(st)) {
            size_t i;
            json_t *v;
            json_array_foreach(st, i, v) {
                if (!json_is_string(v)) { rc = api_fail(e, 400, "stop", "invalid_type", "'stop' must be a string or an array of strings"); goto done; }
                if ((rc = add_stop(r, json_string_value(v), json_string_length(v), e))) goto done;
            }
        } else if (st && !json_is_null(st)) {
            rc = api_fail(e, 400, "stop", "invalid_type", "'stop' must be a string or an array of strings");
            goto done;
        }
    }

    {
        json_t *sv = json_object_get(o, "stop_token_ids");
        if (sv && !json_is_null(sv)) {
            size_t i;
            json_t *v;
            if (!json_is_array(sv) || json_array_size(sv) > SREQ_MAX_STOPS) {
                rc = api_fail(e, 400, "stop_token_ids", "invalid_type",
                          "'stop_token_ids' must be an array of at most %d token ids", SREQ_MAX_STOPS);
                goto done;
            }
            json_array_foreach(sv, i, v) {
                if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                    json_integer_value(v) >= m->vocab) {
                    rc = api_fail(e, 400, "stop_token_ids", "invalid_value",
                              "'stop_token_ids' entries must be token ids in [0, %d)", m->vocab);
                    goto done;
                }
                r->stop_ids[r->n_stop_ids++] = (int32_t)json_integer_value(v);
            }
        }
    }

    /* the prompt */
    if (chat) {
        rc = render_chat(m, json_object_get(o, "messages"), tools_sys, r, e);
        free(tools_sys);
        tools_sys = NULL;
        if (rc) goto done;
        /* text-marker tokenizers spell the end of the turn out (not with
         * constrained output: the grammar ends it, and a JSON string may
         * hold that text) */
        if (!r->gram && (rc = add_stop(r, "<|im_end|>", 10, e))) goto done;
    } else {
        json_t *p = json_object_get(o, "prompt");
        if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
            p = json_array_get(p, 0);
        /* batched: an array of strings or of token-id arrays, a prompt each */
        if (json_is_array(p) && json_array_size(p) > 0 &&
            (json_is_string(json_array_get(p, 0)) || json_is_array(json_array_get(p, 0)))) {
            batch = p;
            n_prompts = json_array_size(p);
            if (n_prompts * (size_t)n_choices > 2048) {
                rc = api_fail(e, 400, "prompt", "invalid_value",
                              "%zu prompts x n = %d is %zu choices; at most 2048 in one request",
                              n_prompts, n_choices, n_prompts * (size_t)n_choices);
                goto done;
            }
            p = json_array_get(p, 0);
        }
        if ((rc = prompt_ids(p, batch != NULL, m, r, e))) goto done;
    }
    if ((rc = prompt_rest(o, m, chat, echo, out->logprobs, r, e))) goto done;
    {
        size_t total = n_prompts * (size_t)n_choices;
        sreq **rs = realloc(out->rs, total * sizeof *rs);
        if (!rs) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto done; }
        out->rs = rs;
        static _Atomic uint64_t groups;
        /* several choices: progress wakes the handler's shared condition */
        r->grouped = total > 1;
        for (size_t pi = 0; pi < n_prompts; pi++) {
            sreq *b = r;
            if (pi > 0) {
                /* prompt pi: r's parameters, its own ids, echo and max_tokens */
                b = sreq_clone(r, r->sp.seed);
                if (!b) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto done; }
                rs[out->n++] = b;
                free(b->prompt); free(b->plps); free(b->echo_text);
                b->prompt = NULL; b->plps = NULL; b->echo_text = NULL;
                b->n_prompt = b->n_added = 0;
                b->echo_len = 0;
                b->prompt_lps = false;
                if ((rc = prompt_ids(json_array_get(batch, pi), true, m, b, e)) ||
                    (rc = prompt_rest(o, m, chat, echo, out->logprobs, b, e)))
                    goto done;
            }
            if (n_choices > 1) {
                b->group = ++groups;
                b->leader = true;
            }
            /* choice i draws from seed + i: a fixed seed gives the same n
             * choices again, and choice 0 is the n = 1 answer */
            for (int i = 1; i < n_choices; i++) {
                sreq *c = sreq_clone(b, b->sp.seed + (uint64_t)i);
                if (!c) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto done; }
                c->leader = false;
                rs[out->n++] = c;
            }
        }
    }
done:
    free(tools_sys);
    json_decref(o);
    if (rc) api_req_free(out);
    return rc;
}

char *api_error_json(const api_err *e)
{
    json_t *o = json_pack("{s:{s:s, s:s, s:s?, s:s?}}", "error", "message", e->msg,
                          "type", e->type ? e->type : "invalid_request_error",
                          "param", e->param, "code", e->code);
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}

json_t *api_jstr_bytes(const char *p, size_t n)
{
    size_t l;
    char *s = infer_utf8_sanitize(p, n, &l);
    json_t *j = s ? json_stringn(s, l) : json_string("");
    free(s);
    return j;
}

/* A token's text and bytes. */
void api_token_text(const api_model *m, int32_t id, char **p, size_t *n)
{
    kiln_ctx *ctx = kiln_ctx_new();
    *p = NULL;
    *n = 0;
    if (ctx && kiln_tokenizer_decode(ctx, m->tok, &id, 1, p, n)) {
        *p = NULL;
        *n = 0;
    }
    kiln_ctx_free(ctx);
}

static json_t *lp_entry_chat(const api_model *m, int32_t id, float lp, bool with_top,
                             const slp *e)
{
    char *p;
    size_t n;
    api_token_text(m, id, &p, &n);
    json_t *bytes = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(bytes, json_integer((unsigned char)p[i]));
    json_t *o = json_object();
    json_object_set_new(o, "token", api_jstr_bytes(p ? p : "", n));
    json_object_set_new(o, "logprob", json_real(lp));
    json_object_set_new(o, "bytes", bytes);
    free(p);
    if (with_top) {
        json_t *top = json_array();
        for (int k = 0; k < e->n_top; k++)
            if (isfinite(e->top[k].logprob)) /* (tokens a grammar masked are -inf) */
                json_array_append_new(top, lp_entry_chat(m, e->top[k].token, e->top[k].logprob, false, NULL));
        json_object_set_new(o, "top_logprobs", top);
    }
    return o;
}

/* The completions logprobs object under construction. */
typedef struct lpb {
    json_t *toks, *tlp, *top, *off;
    size_t pos;          /* text offset of the next token */
} lpb;

/* Appends token id with entry e (NULL: the first prompt token, which has
 * no logprob: null as in OpenAI's echo). */
static void lpb_add(lpb *b, const api_model *m, int32_t id, const slp *e)
{
    char *p;
    size_t n;
    api_token_text(m, id, &p, &n);
    json_array_append_new(b->toks, api_jstr_bytes(p ? p : "", n));
    json_array_append_new(b->off, json_integer((json_int_t)b->pos));
    b->pos += n;
    free(p);
    if (!e) {
        json_array_append_new(b->tlp, json_null());
        json_array_append_new(b->top, json_null());
        return;
    }
    json_array_append_new(b->tlp, json_real(e->logprob));
    json_t *alt = json_object();
    for (int k = 0; k < e->n_top; k++) {
        if (!isfinite(e->top[k].logprob)) continue; /* masked by a grammar */
        api_token_text(m, e->top[k].token, &p, &n);
        size_t l;
        char *s = infer_utf8_sanitize(p ? p : "", n, &l);
        if (s) json_object_set_new(alt, s, json_real(e->top[k].logprob));
        free(s);
        free(p);
    }
    json_array_append_new(b->top, alt);
}

/* Logprobs of r: generated entries [lp0, lp1) at text offset text_off;
 * with_prompt (completions echo): the echoed prompt tokens first, from
 * offset 0. */
static json_t *logprobs_json(const api_req *q, const sreq *r, const api_model *m,
                             int lp0, int lp1, size_t text_off, bool with_prompt)
{
    if (!q->logprobs) return json_null();
    if (q->chat) {
        json_t *content = json_array();
        for (int i = lp0; i < lp1; i++)
            json_array_append_new(content, lp_entry_chat(m, r->lps[i].token, r->lps[i].logprob,
                                                         true, &r->lps[i]));
        return json_pack("{s:o}", "content", content);
    }
    lpb b = {json_array(), json_array(), json_array(), json_array(), text_off};
    if (with_prompt) {
        b.pos = 0;
        for (int i = r->n_added; i < r->n_prompt; i++)
            lpb_add(&b, m, r->prompt[i], i > 0 && r->plps && i < r->n_plps ? &r->plps[i] : NULL);
    }
    for (int i = lp0; i < lp1; i++) lpb_add(&b, m, r->lps[i].token, &r->lps[i]);
    return json_pack("{s:o, s:o, s:o, s:o}", "tokens", b.toks, "token_logprobs", b.tlp,
                     "top_logprobs", b.top, "text_offset", b.off);
}

/* Usage of all choices: each prompt once (as OpenAI counts it: the n
 * choices of a prompt share it), the completions of every choice. */
static json_t *usage_json(const api_req *q)
{
    int gen = 0, np = 0, cached = 0;
    for (int i = 0; i < q->n; i++) {
        gen += q->rs[i]->n_gen;
        if (!q->rs[i]->group || q->rs[i]->leader) {
            np += q->rs[i]->n_prompt;
            cached += q->rs[i]->n_cached;
        }
    }
    json_t *u = json_pack("{s:i, s:i, s:i}", "prompt_tokens", np, "completion_tokens", gen,
                          "total_tokens", np + gen);
    /* prefix caching: the prompt tokens whose cache was reused (each
     * prompt's choice 0) */
    if (u && cached > 0)
        json_object_set_new(u, "prompt_tokens_details", json_pack("{s:i}", "cached_tokens", cached));
    return u;
}

/* r's echo text + s[0..n) as a JSON string */
static json_t *with_echo(const api_req *q, const sreq *r, const char *s, size_t n)
{
    if (!q->echo) return api_jstr_bytes(s, n);
    char *b = malloc(r->echo_len + n + 1);
    if (!b) return json_string("");
    memcpy(b, r->echo_text, r->echo_len);
    if (n) memcpy(b + r->echo_len, s, n);
    json_t *j = api_jstr_bytes(b, r->echo_len + n);
    free(b);
    return j;
}

char *api_response(const api_req *q, const api_model *m, const char *id, long created)
{
    json_t *choices = json_array();
    for (int i = 0; i < q->n; i++) {
        const sreq *r = q->rs[i];
        json_t *choice;
        const char *fin = r->finish ? r->finish : "stop";
        char *rest = NULL;
        json_t *calls = q->tool_call ? api_tool_calls(r, id, i)
                        : q->tool_auto ? api_auto_calls(q, r, id, i, &rest)
                                       : NULL;
        if (calls) {
            for (size_t k = 0; k < json_array_size(calls); k++)
                json_object_del(json_array_get(calls, k), "index");
            /* (auto: text after the calls stays the content) */
            choice = json_pack("{s:i, s:{s:s, s:o, s:o}, s:o, s:s}", "index", i, "message", "role",
                               "assistant", "content",
                               rest ? api_jstr_bytes(rest, strlen(rest)) : json_null(),
                               "tool_calls", calls, "logprobs",
                               logprobs_json(q, r, m, 0, r->n_lps, 0, false), "finish_reason",
                               "tool_calls");
            free(rest);
        } else if (q->chat)
            choice = json_pack("{s:i, s:{s:s, s:o}, s:o, s:s}", "index", i, "message", "role",
                               "assistant", "content", api_jstr_bytes(r->text ? r->text : "", r->text_len),
                               "logprobs", logprobs_json(q, r, m, 0, r->n_lps, 0, false),
                               "finish_reason", fin);
        else
            choice = json_pack("{s:i, s:o, s:o, s:s}", "index", i, "text",
                               with_echo(q, r, r->text ? r->text : "", r->text_len), "logprobs",
                               logprobs_json(q, r, m, 0, r->n_lps, q->echo ? r->echo_len : 0,
                                             q->echo),
                               "finish_reason", fin);
        json_array_append_new(choices, choice);
    }
    json_t *o = json_pack("{s:s, s:s, s:i, s:s, s:o, s:o}", "id", id, "object",
                          q->chat ? "chat.completion" : "text_completion", "created",
                          (json_int_t)created, "model", q->model ? q->model : m->name, "choices", choices, "usage",
                          usage_json(q));
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}

char *api_chunk(const api_req *q, int index, const api_model *m,
                const char *id, long created, const char *text, size_t n,
                int lp0, int lp1, const char *finish, bool first, bool usage_only)
{
    json_t *choices = json_array();
    if (!usage_only) {
        const sreq *r = q->rs[index];
        json_t *fin = finish ? json_string(finish) : json_null();
        bool echo = first && !q->chat && q->echo;
        size_t off = (size_t)(text - (r->text ? r->text : text)) + (q->echo ? r->echo_len : 0);
        json_t *lp = lp1 > lp0 || (echo && q->logprobs)
                         ? logprobs_json(q, r, m, lp0, lp1, off, echo)
                         : json_null();
        json_t *c;
        char *rest = NULL;
        json_t *calls = !finish         ? NULL
                        : q->tool_call ? api_tool_calls(r, id, index)
                        : q->tool_auto ? api_auto_calls(q, r, id, index, &rest)
                                       : NULL;
        if (calls) {
            /* a tool call streams whole, in the delta before the finish */
            json_decref(fin);
            fin = json_string("tool_calls");
            json_t *delta = json_pack("{s:o}", "tool_calls", calls);
            if (rest) json_object_set_new(delta, "content", api_jstr_bytes(rest, strlen(rest)));
            free(rest);
            c = json_pack("{s:i, s:o, s:o, s:o}", "index", index, "delta", delta, "logprobs", lp,
                          "finish_reason", fin);
        } else if (q->chat) {
            json_t *delta = json_object();
            if (first) json_object_set_new(delta, "role", json_string("assistant"));
            if (n || first) json_object_set_new(delta, "content", api_jstr_bytes(text, n));
            c = json_pack("{s:i, s:o, s:o, s:o}", "index", index, "delta", delta, "logprobs", lp,
                          "finish_reason", fin);
        } else {
            c = json_pack("{s:i, s:o, s:o, s:o}", "index", index, "text",
                          echo ? with_echo(q, r, text, n) : api_jstr_bytes(text, n), "logprobs", lp,
                          "finish_reason", fin);
        }
        json_array_append_new(choices, c);
    }
    json_t *o = json_pack("{s:s, s:s, s:i, s:s, s:o}", "id", id, "object",
                          q->chat ? "chat.completion.chunk" : "text_completion", "created",
                          (json_int_t)created, "model", q->model ? q->model : m->name, "choices", choices);
    if (usage_only) json_object_set_new(o, "usage", usage_json(q));
    else if (q->include_usage) json_object_set_new(o, "usage", json_null());
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s) return NULL;
    size_t l = strlen(s);
    char *ev = malloc(l + 9);
    if (ev) {
        memcpy(ev, "data: ", 6);
        memcpy(ev + 6, s, l);
        memcpy(ev + 6 + l, "\n\n", 3);
    }
    free(s);
    return ev;
}

