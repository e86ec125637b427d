/*
 * api_embed.c — POST /v1/embeddings (OpenAI's shape): the request's
 * inputs as token ids, one scheduler request each, and the response with
 * the pooled final-norm hidden states, unit-normalized, as floats or as
 * base64 of their little-endian float32 bytes.
 */
#include "serve/serve.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One input: a string (tokenized, with the BOS rule of completions) or a
 * token-id array (taken as is). */
static int one_input(const json_t *v, const char *param, const api_model *m, sreq *r,
                     api_err *e)
{
    if (json_is_string(v)) {
        if (json_string_length(v) == 0)
            return api_fail(e, 400, param, "invalid_value", "'%s' is an empty string", param);
        kiln_ctx *ctx = kiln_ctx_new();
        int32_t *ids = NULL;
        size_t n = 0, np = 0;
        kiln_status st = ctx ? kiln_tokenizer_encode(ctx, m->tok, json_string_value(v),
                                                     json_string_length(v), &ids, &n)
                             : KILN_ERR_NOMEM;
        if (!st) st = kiln_prompt_ids(ctx, m->cfg, m->tok, ids, n, &r->prompt, &np);
        free(ids);
        if (st) {
            api_fail(e, 400, param, "invalid_value", "cannot tokenize '%s': %s", param,
                     ctx ? kiln_errmsg(ctx) : "out of memory");
            kiln_ctx_free(ctx);
            return e->status;
        }
        kiln_ctx_free(ctx);
        r->n_prompt = (int)np;
    } else if (json_is_array(v)) {
        size_t n = json_array_size(v);
        if (n == 0) return api_fail(e, 400, param, "invalid_value", "'%s' is an empty token array", param);
        if (n > (size_t)m->n_ctx)
            return api_fail(e, 400, param, "context_length_exceeded",
                            "'%s' is %zu tokens; this server's context is %d tokens", param, n,
                            m->n_ctx);
        r->prompt = malloc(n * sizeof *r->prompt);
        if (!r->prompt) return api_fail(e, 500, NULL, NULL, "out of memory");
        for (size_t i = 0; i < n; i++) {
            json_t *t = json_array_get(v, i);
            if (!json_is_integer(t))
                return api_fail(e, 400, param, "invalid_type", "'%s' must hold only token ids (integers)", param);
            json_int_t id = json_integer_value(t);
            if (id < 0 || id >= m->vocab)
                return api_fail(e, 400, param, "invalid_value",
                                "'%s'[%zu] = %lld is not a token id of this model (vocabulary %d)",
                                param, i, (long long)id, m->vocab);
            r->prompt[i] = (int32_t)id;
        }
        r->n_prompt = (int)n;
    } else {
        return api_fail(e, 400, param, "invalid_type",
                        "'%s' must be a string or an array of token ids", param);
    }
    if (r->n_prompt > m->n_ctx)
        return api_fail(e, 400, param, "context_length_exceeded",
                        "'%s' is %d tokens; this server's context is %d tokens", param,
                        r->n_prompt, m->n_ctx);
    return 0;
}

int api_parse_embed(const char *body, size_t len, const api_model *m, api_req *out, api_err *e)
{
    memset(out, 0, sizeof *out);
    json_error_t jerr;
    json_t *o = json_loadb(body, len, JSON_ALLOW_NUL, &jerr);
    if (!o)
        return api_fail(e, 400, NULL, "invalid_json",
                        "the request body is not valid JSON (line %d, column %d: %s)", jerr.line,
                        jerr.column, jerr.text);
    int rc = 0;
    if (!json_is_object(o)) {
        rc = api_fail(e, 400, NULL, "invalid_json", "the request body must be a JSON object");
        goto done;
    }
    int adapter = 0;
    if ((rc = api_pick_model(json_object_get(o, "model"), m, &adapter, &out->model, e)))
        goto done;
    json_t *fv = json_object_get(o, "encoding_format");
    if (fv && !json_is_null(fv)) {
        const char *f = json_string_value(fv);
        if (!f || (strcmp(f, "float") && strcmp(f, "base64"))) {
            rc = api_fail(e, 400, "encoding_format", "invalid_value",
                          "'encoding_format' must be \"float\" or \"base64\"");
            goto done;
        }
        out->b64 = !strcmp(f, "base64");
    }
    json_t *dv = json_object_get(o, "dimensions");
    if (dv && !json_is_null(dv)) {
        if (!json_is_integer(dv) || json_integer_value(dv) != m->cfg->n_embd) {
            rc = api_fail(e, 400, "dimensions", "unsupported_value",
                          "'dimensions' must be this model's width, %d: kiln does not shorten "
                          "embeddings (omit it)",
                          m->cfg->n_embd);
            goto done;
        }
    }
    json_t *uv = json_object_get(o, "user");
    if (uv && !json_is_null(uv) && !json_is_string(uv)) {
        rc = api_fail(e, 400, "user", "invalid_type", "'user' must be a string");
        goto done;
    }
    json_t *in = json_object_get(o, "input");
    if (!in || json_is_null(in)) { rc = api_fail(e, 400, "input", "missing_required_parameter", "'input' is required"); goto done; }
    /* a string, an array of token ids (one input), or an array of strings
     * or of token arrays (one input each) */
    bool many = json_is_array(in) && json_array_size(in) > 0 && !json_is_integer(json_array_get(in, 0));
    size_t n = many ? json_array_size(in) : 1;
    if (json_is_array(in) && json_array_size(in) == 0) { rc = api_fail(e, 400, "input", "invalid_value", "'input' is an empty array"); goto done; }
    if (n > 2048) { rc = api_fail(e, 400, "input", "invalid_value", "'input' has %zu items; at most 2048", n); goto done; }
    out->rs = calloc(n, sizeof *out->rs);
    if (!out->rs) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto done; }
    out->n = (int)n;
    for (size_t i = 0; i < n; i++) {
        sreq *r = out->rs[i] = sreq_new();
        if (!r) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto done; }
        r->embed = true;
        r->adapter = adapter;
        r->emb = malloc((size_t)m->cfg->n_embd * sizeof *r->emb);
        if (!r->emb) { rc = api_fail(e, 500, NULL, NULL, "out of memory"); goto done; }
        if ((rc = one_input(many ? json_array_get(in, i) : in, many ? "input[]" : "input", m, r, e)))
            goto done;
    }
done:
    json_decref(o);
    if (rc) api_req_free(out);
    return rc;
}

static const char b64c[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static json_t *b64_json(const unsigned char *p, size_t n)
{
    char *s = malloc((n + 2) / 3 * 4 + 1), *d = s;
    if (!s) return NULL;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)p[i] << 16 | (i + 1 < n ? (unsigned)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        *d++ = b64c[v >> 18 & 63];
        *d++ = b64c[v >> 12 & 63];
        *d++ = i + 1 < n ? b64c[v >> 6 & 63] : '=';
        *d++ = i + 2 < n ? b64c[v & 63] : '=';
    }
    *d = 0;
    json_t *j = json_stringn(s, (size_t)(d - s));
    free(s);
    return j;
}

char *api_embed_response(const api_req *q, const api_model *m)
{
    const int C = m->cfg->n_embd;
    json_t *data = json_array();
    float *v = malloc((size_t)C * sizeof *v);
    long long np = 0;
    for (int i = 0; i < q->n && v; i++) {
        const sreq *r = q->rs[i];
        np += r->n_prompt;
        /* unit length, as OpenAI's embeddings are (cosine = dot product) */
        double ss = 0;
        for (int j = 0; j < C; j++) ss += (double)r->emb[j] * r->emb[j];
        float inv = ss > 0 ? (float)(1.0 / sqrt(ss)) : 0.0f;
        for (int j = 0; j < C; j++) v[j] = r->emb[j] * inv;
        json_t *ev;
        if (q->b64) {
            unsigned char *b = malloc((size_t)C * 4);
            for (int j = 0; b && j < C; j++) {
                uint32_t u;
                memcpy(&u, &v[j], 4);
                for (int k = 0; k < 4; k++) b[4 * j + k] = (unsigned char)(u >> (8 * k));
            }
            ev = b ? b64_json(b, (size_t)C * 4) : NULL;
            free(b);
        } else {
            ev = json_array();
            for (int j = 0; j < C; j++) json_array_append_new(ev, json_real(v[j]));
        }
        json_array_append_new(data, json_pack("{s:s, s:i, s:o*}", "object", "embedding",
                                              "index", i, "embedding", ev));
    }
    free(v);
    json_t *o = json_pack("{s:s, s:o, s:s, s:{s:I, s:I}}", "object", "list", "data", data,
                          "model", q->model ? q->model : m->name, "usage", "prompt_tokens", (json_int_t)np,
                          "total_tokens", (json_int_t)np);
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return s;
}
