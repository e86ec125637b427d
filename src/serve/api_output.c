/*
 * api_output.c — what the output must be: response_format (json_object,
 * json_schema) and tools / tool_choice compiled into the grammar a
 * request's choices decode under (infer/grammar.h), the tools shown to
 * the model in the system message (Hermes / Qwen style), and the
 * generated call turned back into OpenAI's tool_calls.
 */
#include "serve/serve.h"
#include "infer/grammar.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static sgrammar *sgrammar_new(infer_grammar *g)
{
    sgrammar *sg = calloc(1, sizeof *sg);
    if (!sg) {
        infer_grammar_free(g);
        return NULL;
    }
    atomic_init(&sg->refs, 1);
    sg->g = g;
    return sg;
}

/* response_format, tools and tool_choice: the grammar the output must
 * follow (r->gram), whether it is a function call (q->tool_call), and the
 * system text that shows the tools to the model (*tools_sys, malloc'ed). */
int api_parse_output(const json_t *o, bool chat, api_req *q, sreq *r, char **tools_sys,
                        api_err *e)
{
    *tools_sys = NULL;
    kiln_ctx *ctx = NULL;
    char bad[64];
    int rc = 0;
    json_t *rf = json_object_get(o, "response_format");
    json_t *tools = json_object_get(o, "tools");
    json_t *tc = json_object_get(o, "tool_choice");
    bool has_tools = tools && !json_is_null(tools) && !(json_is_array(tools) && json_array_size(tools) == 0);
    if (rf && !json_is_null(rf)) {
        json_t *ty = json_is_object(rf) ? json_object_get(rf, "type") : NULL;
        if (!json_is_string(ty))
            return api_fail(e, 400, "response_format", "invalid_type",
                        "'response_format' must be an object with a 'type': text, json_object "
                        "or json_schema");
        const char *t = json_string_value(ty);
        if (!strcmp(t, "json_object") || !strcmp(t, "json_schema")) {
            char *schema = NULL;
            if (!strcmp(t, "json_schema")) {
                json_t *js = json_object_get(rf, "json_schema");
                json_t *sch = json_is_object(js) ? json_object_get(js, "schema") : NULL;
                if (!json_is_object(sch))
                    return api_fail(e, 400, "response_format", "invalid_value",
                                "'response_format' of type json_schema needs "
                                "'json_schema': {\"name\": ..., \"schema\": {...}}");
                schema = json_dumps(sch, JSON_COMPACT);
                if (!schema) return api_fail(e, 500, NULL, NULL, "out of memory");
            }
            ctx = kiln_ctx_new();
            infer_grammar *g = NULL;
            kiln_status st = ctx ? infer_grammar_json(ctx, schema, schema ? strlen(schema) : 0, &g, bad)
                                 : KILN_ERR_NOMEM;
            free(schema);
            if (st) {
                rc = st == KILN_ERR_INVALID_ARG
                         ? api_fail(e, 400, "response_format", "unsupported_schema",
                                "response_format.json_schema.schema: %s", kiln_errmsg(ctx))
                         : api_fail(e, 500, NULL, NULL, "out of memory");
                goto out;
            }
            kiln_ctx_free(ctx);
            ctx = NULL;
            if (!(r->gram = sgrammar_new(g))) return api_fail(e, 500, NULL, NULL, "out of memory");
        } else if (strcmp(t, "text")) {
            return api_fail(e, 400, "response_format", "invalid_value",
                        "response_format.type '%.100s' is not text, json_object or json_schema", t);
        }
    }
    if (!has_tools) {
        if (tc && !json_is_null(tc) && !(json_is_string(tc) && (!strcmp(json_string_value(tc), "none") ||
                                                                !strcmp(json_string_value(tc), "auto"))))
            return api_fail(e, 400, "tool_choice", "invalid_value", "'tool_choice' names a tool but 'tools' is empty");
        return 0;
    }
    if (!chat)
        return api_fail(e, 400, "tools", "invalid_value", "'tools' is a parameter of /v1/chat/completions");
    if (!json_is_array(tools) || json_array_size(tools) > 128)
        return api_fail(e, 400, "tools", "invalid_type", "'tools' must be an array of at most 128 tools");
    if (r->gram)
        return api_fail(e, 400, "response_format", "invalid_value",
                    "'response_format' json output and 'tools' cannot be combined");
    size_t nt = json_array_size(tools);
    const char **names = calloc(nt, sizeof *names);
    char **schemas = calloc(nt, sizeof *schemas);
    json_t *listing = json_array();
    if (!names || !schemas || !listing) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto tools_out; }
    size_t i;
    json_t *tool;
    json_array_foreach(tools, i, tool) {
        json_t *ty = json_object_get(tool, "type"), *fn = json_object_get(tool, "function");
        json_t *nm = json_object_get(fn, "name"), *par = json_object_get(fn, "parameters");
        if (!json_is_string(ty) || strcmp(json_string_value(ty), "function") || !json_is_object(fn) ||
            !json_is_string(nm)) {
            rc = api_fail(e, 400, "tools", "invalid_value",
                      "tools[%zu] must be {\"type\": \"function\", \"function\": {\"name\": ..., "
                      "\"parameters\": {...}}}", i);
            goto tools_out;
        }
        const char *n = json_string_value(nm);
        size_t nl = strlen(n);
        bool ok = nl > 0 && nl <= 64;
        for (size_t k = 0; k < nl; k++)
            ok &= (n[k] >= 'a' && n[k] <= 'z') || (n[k] >= 'A' && n[k] <= 'Z') ||
                  (n[k] >= '0' && n[k] <= '9') || n[k] == '_' || n[k] == '-';
        for (size_t k = 0; ok && k < i; k++) ok = strcmp(names[k], n) != 0;
        if (!ok) {
            rc = api_fail(e, 400, "tools", "invalid_value",
                      "tools[%zu].function.name must be 1-64 of a-z, A-Z, 0-9, _ and -, and unique", i);
            goto tools_out;
        }
        if (par && !json_is_null(par) && !json_is_object(par)) {
            rc = api_fail(e, 400, "tools", "invalid_type", "tools[%zu].function.parameters must be a JSON Schema object", i);
            goto tools_out;
        }
        names[i] = n;
        schemas[i] = par && json_is_object(par) ? json_dumps(par, JSON_COMPACT) : NULL;
        json_array_append_new(listing, json_pack("{s:s, s:O}", "type", "function", "function", fn));
    }
    /* which tools the output may call */
    int pick = -1; /* -1: any (required), else that one */
    const char *choice = json_is_string(tc) ? json_string_value(tc) : NULL;
    if (json_is_object(tc)) {
        json_t *fnm = json_object_get(json_object_get(tc, "function"), "name");
        for (size_t k = 0; json_is_string(fnm) && k < nt; k++)
            if (!strcmp(names[k], json_string_value(fnm))) pick = (int)k;
        if (pick < 0) {
            rc = api_fail(e, 400, "tool_choice", "invalid_value",
                      "'tool_choice' must name one of 'tools': {\"type\": \"function\", "
                      "\"function\": {\"name\": ...}}");
            goto tools_out;
        }
    } else if (!tc || json_is_null(tc)) {
        choice = "auto"; /* OpenAI's default when tools are given */
    } else if (!choice || (strcmp(choice, "required") && strcmp(choice, "none") &&
                           strcmp(choice, "auto"))) {
        rc = api_fail(e, 400, "tool_choice", "invalid_value",
                  "'tool_choice' must be \"none\", \"required\" or {\"type\": \"function\", "
                  "\"function\": {\"name\": ...}}");
        goto tools_out;
    }
    {
        /* the tools shown to the model (Hermes / Qwen style) */
        char *lst = json_dumps(listing, JSON_COMPACT);
        const char *head = "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                           "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n";
        const char *tail = "\n</tools>\n\nFor each function call, return a json object with function name "
                           "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                           "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>";
        size_t l = lst ? strlen(head) + strlen(lst) + strlen(tail) + 1 : 0;
        *tools_sys = lst ? malloc(l) : NULL;
        if (*tools_sys) snprintf(*tools_sys, l, "%s%s%s", head, lst, tail);
        free(lst);
        if (!*tools_sys) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto tools_out; }
    }
    if (choice && !strcmp(choice, "none")) goto tools_out; /* shown, not called */
    {
        int n = pick >= 0 ? 1 : (int)nt;
        const char *const *nn = pick >= 0 ? &names[pick] : names;
        const char *const *ss = pick >= 0 ? (const char *const *)&schemas[pick] : (const char *const *)schemas;
        ctx = kiln_ctx_new();
        infer_grammar *g = NULL;
        kiln_status st = ctx ? infer_grammar_tool_call(ctx, nn, ss, n, &g, bad) : KILN_ERR_NOMEM;
        if (st) {
            rc = st == KILN_ERR_INVALID_ARG
                     ? api_fail(e, 400, "tools", "unsupported_schema", "tools: function parameters: %s",
                            kiln_errmsg(ctx))
                     : api_fail(e, 500, NULL, NULL, "out of memory");
            goto tools_out;
        }
        if (!(r->gram = sgrammar_new(g))) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto tools_out; }
        r->gram->tools = calloc((size_t)n, sizeof *r->gram->tools);
        for (int k = 0; r->gram->tools && k < n; k++) {
            r->gram->tools[k] = strdup(nn[k]);
            if (r->gram->tools[k]) r->gram->n_tools = k + 1;
        }
        if (r->gram->n_tools != n) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto tools_out; }
        if (choice && !strcmp(choice, "auto")) {
            /* the model decides: free text, checked afterwards against the
             * calls' grammar (the request's grammar is dropped) */
            q->tool_auto = r->gram->g;
            r->gram->g = NULL;
            sgrammar_release(r->gram);
            r->gram = NULL;
        } else {
            q->tool_call = true;
        }
    }
tools_out:
    for (size_t k = 0; schemas && k < nt; k++) free(schemas[k]);
    free(schemas);
    free(names);
    json_decref(listing);
    if (rc) {
        free(*tools_sys);
        *tools_sys = NULL;
    }
out:
    kiln_ctx_free(ctx);
    return rc;
}

/* The function call a tool-call choice generated, as OpenAI's tool_calls
 * array (one call; arguments as a JSON string), or NULL when the output is
 * not a whole call (cut by max_tokens). The id: "call_" + the response id's
 * hex part + the choice index. */
json_t *api_tool_calls(const sreq *r, const char *id, int index)
{
    if (!r->finish || strcmp(r->finish, "stop") || !r->text) return NULL;
    json_t *o = json_loadb(r->text, r->text_len, 0, NULL);
    json_t *nm = json_object_get(o, "name"), *args = json_object_get(o, "arguments");
    char *as = json_is_string(nm) && args ? json_dumps(args, JSON_COMPACT) : NULL;
    json_t *out = NULL;
    if (as) {
        const char *hex = strchr(id, '-');
        char cid[80];
        snprintf(cid, sizeof cid, "call_%s%02x", hex ? hex + 1 : id, index & 0xff);
        out = json_pack("[{s:i, s:s, s:s, s:{s:O, s:s}}]", "index", 0, "id", cid, "type", "function",
                        "function", "name", nm, "arguments", as);
    }
    free(as);
    json_decref(o);
    return out;
}


/* ---- tool_choice auto: <tool_call> blocks in free text ----------------- */

static const char TC_OPEN[] = "<tool_call>", TC_CLOSE[] = "</tool_call>";

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')) p++;
    return p;
}

bool api_auto_hold(const sreq *r)
{
    const char *p = r->text ? r->text : "", *end = p + r->text_len;
    p = skip_ws(p, end);
    size_t n = (size_t)(end - p), k = sizeof TC_OPEN - 1;
    /* a prefix of the tag, or the tag itself: it may be a call */
    return !memcmp(p, TC_OPEN, n < k ? n : k);
}

json_t *api_auto_calls(const api_req *q, const sreq *r, const char *id, int index, char **rest)
{
    *rest = NULL;
    if (!q->tool_auto || !r->text) return NULL;
    const char *p = r->text, *end = r->text + r->text_len;
    json_t *calls = json_array();
    int k = 0;
    for (;;) {
        p = skip_ws(p, end);
        if ((size_t)(end - p) < sizeof TC_OPEN - 1 || memcmp(p, TC_OPEN, sizeof TC_OPEN - 1)) break;
        const char *b = p + sizeof TC_OPEN - 1, *c = NULL;
        for (const char *x = b; x + sizeof TC_CLOSE - 1 <= end && !c; x++)
            if (!memcmp(x, TC_CLOSE, sizeof TC_CLOSE - 1)) c = x;
        json_t *o = c ? json_loadb(b, (size_t)(c - b), 0, NULL) : NULL;
        json_t *nm = json_object_get(o, "name"), *args = json_object_get(o, "arguments");
        /* a call of one of the tools, valid against its parameters: the
         * calls' grammar takes its compact form whole */
        json_t *call = json_is_string(nm) && json_is_object(args)
                           ? json_pack("{s:O, s:O}", "name", nm, "arguments", args)
                           : NULL;
        char *cs = call ? json_dumps(call, JSON_COMPACT) : NULL;
        infer_gstate *st = cs ? infer_gstate_new(q->tool_auto) : NULL;
        bool ok = st && infer_gstate_feed(st, cs, strlen(cs)) && infer_gstate_done(st);
        infer_gstate_free(st);
        char *as = ok ? json_dumps(args, JSON_COMPACT) : NULL;
        if (as) {
            const char *hex = strchr(id, '-');
            char cid[96];
            snprintf(cid, sizeof cid, "call_%s%02x%02x", hex ? hex + 1 : id, index & 0xff, k & 0xff);
            json_array_append_new(calls, json_pack("{s:i, s:s, s:s, s:{s:O, s:s}}", "index", k, "id",
                                                   cid, "type", "function", "function", "name",
                                                   nm, "arguments", as));
            k++;
        }
        free(as);
        free(cs);
        json_decref(call);
        json_decref(o);
        if (!ok) {
            /* not a valid call: the whole output is text */
            json_decref(calls);
            return NULL;
        }
        p = c + sizeof TC_CLOSE - 1;
    }
    if (k == 0) {
        json_decref(calls);
        return NULL;
    }
    p = skip_ws(p, end);
    if (p < end) {
        *rest = malloc((size_t)(end - p) + 1);
        if (*rest) {
            memcpy(*rest, p, (size_t)(end - p));
            (*rest)[end - p] = 0;
        }
    }
    return calls;
}
