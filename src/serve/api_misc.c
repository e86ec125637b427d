/*
 * api_misc.c — the llama.cpp-style routes: POST /tokenize, POST
 * /detokenize and GET /props, each a JSON body in and out.
 */
#include "serve/serve.h"
#include "infer/infer.h"

#include <stdlib.h>
#include <string.h>

/* ---- /tokenize, /detokenize, /props (llama.cpp server's shapes) -------- */

static json_t *load_object(const char *body, size_t len, api_err *e)
{
    json_error_t jerr;
    json_t *o = json_loadb(body, len, JSON_ALLOW_NUL, &jerr);
    if (!o) {
        api_fail(e, 400, NULL, "invalid_json", "the request body is not valid JSON (line %d, column %d: %s)",
             jerr.line, jerr.column, jerr.text);
        return NULL;
    }
    if (!json_is_object(o)) {
        json_decref(o);
        api_fail(e, 400, NULL, "invalid_json", "the request body must be a JSON object");
        return NULL;
    }
    return o;
}

static char *dump(json_t *o, api_err *e)
{
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s) api_fail(e, 500, NULL, NULL, "out of memory");
    return s;
}

char *api_tokenize(const char *body, size_t len, const api_model *m, api_err *e)
{
    json_t *o = load_object(body, len, e);
    if (!o) return NULL;
    json_t *c = json_object_get(o, "content");
    bool add_special = false, with_pieces = false;
    char *out = NULL;
    if (!json_is_string(c)) {
        api_fail(e, 400, "content", "invalid_type", "'content' must be a string");
        goto done;
    }
    if (api_boolean(o, "add_special", &add_special, e) || api_boolean(o, "with_pieces", &with_pieces, e))
        goto done;
    kiln_ctx *ctx = kiln_ctx_new();
    int32_t *ids = NULL, *pids = NULL;
    size_t n = 0, np = 0;
    kiln_status st = ctx ? kiln_tokenizer_encode(ctx, m->tok, json_string_value(c),
                                                 json_string_length(c), &ids, &n)
                         : KILN_ERR_NOMEM;
    if (st) {
        api_fail(e, 400, "content", "invalid_value", "cannot tokenize 'content': %s",
             ctx ? kiln_errmsg(ctx) : "out of memory");
        kiln_ctx_free(ctx);
        goto done;
    }
    if (add_special) {
        /* the ids a completion with this prompt starts from (BOS rule) */
        st = kiln_prompt_ids(ctx, m->cfg, m->tok, ids, n, &pids, &np);
        free(ids);
        ids = pids;
        n = np;
    }
    kiln_ctx_free(ctx);
    if (st) {
        api_fail(e, 500, NULL, NULL, "out of memory");
        goto done;
    }
    json_t *arr = json_array();
    for (size_t i = 0; i < n; i++) {
        if (!with_pieces) {
            json_array_append_new(arr, json_integer(ids[i]));
            continue;
        }
        /* a piece that is not valid UTF-8 on its own comes as its bytes */
        char *p;
        size_t pl;
        api_token_text(m, ids[i], &p, &pl);
        size_t sl;
        char *s = infer_utf8_sanitize(p ? p : "", pl, &sl);
        json_t *piece;
        if (s && sl == pl && !memcmp(s, p ? p : "", pl)) {
            piece = json_stringn(p ? p : "", pl);
        } else {
            piece = json_array();
            for (size_t k = 0; k < pl; k++) json_array_append_new(piece, json_integer((unsigned char)p[k]));
        }
        free(s);
        free(p);
        json_array_append_new(arr, json_pack("{s:i, s:o}", "id", (json_int_t)ids[i], "piece", piece));
    }
    free(ids);
    out = dump(json_pack("{s:o}", "tokens", arr), e);
done:
    json_decref(o);
    return out;
}

char *api_detokenize(const char *body, size_t len, const api_model *m, api_err *e)
{
    json_t *o = load_object(body, len, e);
    if (!o) return NULL;
    json_t *t = json_object_get(o, "tokens");
    char *out = NULL;
    int32_t *ids = NULL;
    if (!json_is_array(t)) {
        api_fail(e, 400, "tokens", "invalid_type", "'tokens' must be an array of token ids");
        goto done;
    }
    size_t n = json_array_size(t);
    ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids) {
        api_fail(e, 500, NULL, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(t, i);
        if (!json_is_integer(v)) {
            api_fail(e, 400, "tokens", "invalid_type", "tokens[%zu] is not an integer", i);
            goto done;
        }
        json_int_t x = json_integer_value(v);
        if (x < 0 || x >= kiln_tokenizer_vocab_size(m->tok)) {
            api_fail(e, 400, "tokens", "invalid_value",
                 "tokens[%zu] = %lld is not a token id of this tokenizer (vocabulary [0, %d))", i,
                 (long long)x, kiln_tokenizer_vocab_size(m->tok));
            goto done;
        }
        ids[i] = (int32_t)x;
    }
    kiln_ctx *ctx = kiln_ctx_new();
    char *text = NULL;
    size_t tl = 0;
    kiln_status st = ctx ? kiln_tokenizer_decode(ctx, m->tok, ids, n, &text, &tl) : KILN_ERR_NOMEM;
    if (st) {
        api_fail(e, 400, "tokens", "invalid_value", "cannot decode 'tokens': %s",
             ctx ? kiln_errmsg(ctx) : "out of memory");
    } else {
        out = dump(json_pack("{s:o}", "content", api_jstr_bytes(text ? text : "", tl)), e);
    }
    free(text);
    kiln_ctx_free(ctx);
done:
    free(ids);
    json_decref(o);
    return out;
}

/* The Jinja form of the ChatML template kiln_chat_render applies (what
 * llama.cpp and Hugging Face clients expect to read in /props). */
static const char chatml_jinja[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

char *api_props(const api_model *m, int n_slots, const char *build, const sckpt *ck,
                api_err *e)
{
    const kiln_config *c = m->cfg;
    json_t *o = json_pack(
        "{s:s, s:i, s:i, s:i, s:{s:i, s:i, s:{s:f, s:f, s:i, s:f, s:i}}, s:s, s:s, s:s, s:s?, "
        "s:i, s:i, s:i}",
        "model", m->name, "n_ctx", m->n_ctx, "total_slots", n_slots, "vocab_size", m->vocab,
        "default_generation_settings", "n_ctx", m->n_ctx, "max_tokens_completions", 16, "params",
        "temperature", 1.0, "top_p", 1.0, "top_k", 0, "min_p", 0.0, "seed", -1, "chat_template",
        chatml_jinja, "chat_template_name", "chatml", "arch",
        c->arch == KILN_ARCH_LLAMA ? "llama" : "gpt2", "build_info", build, "bos_token_id",
        c->bos_token_id, "eos_token_id", c->eos_token_id, "eot_token_id",
        kiln_tokenizer_eot(m->tok));
    if (o && ck)
        json_object_set_new(
            o, "checkpoint",
            json_pack("{s:s, s:I, s:I, s:I, s:I, s:s?}", "name", ck->name, "step",
                      (json_int_t)ck->step, "loaded_at", (json_int_t)ck->loaded_at, "reloads",
                      (json_int_t)ck->reloads, "reload_failures", (json_int_t)ck->failures,
                      "last_error", ck->error[0] ? ck->error : NULL));
    return dump(o, e);
}
