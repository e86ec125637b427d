/*
 * chat.c — special tokens in text, the ChatML chat template with its loss
 * mask, and the model's own (Jinja2) template read from
 * tokenizer_config.json, with the loss mask found from rendered prefixes
 * (contracts in kiln.h, "chat template").
 */
#include "tokenizer/jinja.h"
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

int kiln_tokenizer_special_id(const kiln_tokenizer *tok, const char *text)
{
    size_t n = strlen(text);
    for (int i = 0; i < tok->n_special; i++) {
        int32_t id = tok->special_ids[i];
        if (tok->len[id] == n && !memcmp(tok->blob + tok->off[id], text, n)) return id;
    }
    return -1;
}

int kiln_chat_stop_id(const kiln_tokenizer *tok)
{
    if (tok->chat_tmpl && tok->eos_token) {
        int e = kiln_tokenizer_special_id(tok, tok->eos_token);
        if (e >= 0) return e;
    }
    int id = kiln_tokenizer_special_id(tok, "<|im_end|>");
    return id >= 0 ? id : tok->eot;
}

kiln_status kiln_tokenizer_encode_special(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                          const char *text, size_t len, int32_t **ids,
                                          size_t *n)
{
    *ids = NULL;
    *n = 0;
    tok_ids out = {0};
    tok_scratch *s = tok_scratch_new(tok);
    bool ok = s != NULL;
    bool first[256] = {false}; /* bytes that start some special token */
    for (int k = 0; k < tok->n_special; k++) {
        int32_t id = tok->special_ids[k];
        if (tok->len[id]) first[(unsigned char)tok->blob[tok->off[id]]] = true;
    }
    size_t start = 0, i = 0;
    while (ok && i < len) {
        int32_t hit = -1;
        if (first[(unsigned char)text[i]]) {
            for (int k = 0; k < tok->n_special; k++) { /* longest first */
                int32_t id = tok->special_ids[k];
                size_t sl = tok->len[id];
                if (sl && sl <= len - i && !memcmp(text + i, tok->blob + tok->off[id], sl)) {
                    hit = id;
                    break;
                }
            }
        }
        if (hit < 0) {
            i++;
            continue;
        }
        ok = tok_encode_text(tok, s, text + start, i - start, &out) && tok_ids_push(&out, hit);
        i += tok->len[hit];
        start = i;
    }
    if (ok) ok = tok_encode_text(tok, s, text + start, len - start, &out);
    tok_scratch_free(s);
    if (!ok) {
        free(out.v);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory encoding %zu bytes", len);
    }
    if (!out.v && !(out.v = malloc(sizeof(int32_t))))
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    *ids = out.v;
    *n = out.n;
    return KILN_OK;
}

typedef struct render {
    const kiln_tokenizer *t;
    tok_scratch *s;
    tok_ids ids;
    uint8_t *mask;
    size_t mcap;
    bool ok;
} render;

static void set_mask(render *r, size_t from, uint8_t v)
{
    if (!r->ok) return;
    if (r->ids.n > r->mcap) {
        size_t cap = r->ids.cap > r->ids.n ? r->ids.cap : r->ids.n;
        uint8_t *m = realloc(r->mask, cap);
        if (!m) { r->ok = false; return; }
        r->mask = m;
        r->mcap = cap;
    }
    for (size_t i = from; i < r->ids.n; i++) r->mask[i] = v;
}

static void put_bytes(render *r, const char *text, size_t len, uint8_t m)
{
    size_t from = r->ids.n;
    if (r->ok) r->ok = tok_encode_text(r->t, r->s, text, len, &r->ids);
    set_mask(r, from, m);
}

static void put_text(render *r, const char *text, uint8_t m)
{
    put_bytes(r, text, strlen(text), m);
}

/* A marker: its special id when the vocabulary has it, else its text. */
static void put_marker(render *r, const char *marker, uint8_t m)
{
    int id = kiln_tokenizer_special_id(r->t, marker);
    if (id < 0) {
        put_text(r, marker, m);
        return;
    }
    size_t from = r->ids.n;
    if (r->ok) r->ok = tok_ids_push(&r->ids, id);
    set_mask(r, from, m);
}

/* ---- the model's own template ------------------------------------------ */

void tok_chat_free(kiln_tokenizer *t)
{
    jinja_free(t->chat_tmpl);
    free(t->chat_src);
    free(t->bos_token);
    free(t->eos_token);
    t->chat_tmpl = NULL;
    t->chat_src = t->bos_token = t->eos_token = NULL;
}

kiln_status kiln_tokenizer_set_chat_template(kiln_ctx *ctx, kiln_tokenizer *tok,
                                             const char *src, const char *bos,
                                             const char *eos)
{
    jinja_tmpl *t = NULL;
    if (src) {
        kiln_status s = jinja_parse(ctx, src, strlen(src), &t);
        if (s) return s;
    }
    char *cs = src ? strdup(src) : NULL, *b = bos ? strdup(bos) : NULL, *e = eos ? strdup(eos) : NULL;
    if ((src && !cs) || (bos && !b) || (eos && !e)) {
        jinja_free(t);
        free(cs);
        free(b);
        free(e);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    tok_chat_free(tok);
    tok->chat_tmpl = t;
    tok->chat_src = cs;
    tok->bos_token = b;
    tok->eos_token = e;
    return KILN_OK;
}

const char *kiln_tokenizer_chat_template(const kiln_tokenizer *tok) { return tok->chat_src; }

/* A special-token field of tokenizer_config.json: a string or an
 * AddedToken object {"content": ...}; NULL when absent or null. */
static const char *token_field(const json_t *cfg, const char *key)
{
    const json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_string_value(v);
}

kiln_status tok_load_chat_config(kiln_ctx *ctx, kiln_tokenizer *t, const char *dir)
{
    char *p = file_join(dir, "tokenizer_config.json");
    if (!p) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!file_exists(p)) {
        free(p);
        return KILN_OK;
    }
    json_t *cfg = NULL;
    kiln_status s = js_load_file(ctx, p, &cfg);
    const json_t *ct = cfg ? json_object_get(cfg, "chat_template") : NULL;
    if (!s && json_is_array(ct)) { /* named templates: "default", else the first */
        const json_t *pick = NULL;
        size_t i;
        json_t *it;
        json_array_foreach(ct, i, it)
        {
            const char *name = json_string_value(json_object_get(it, "name"));
            if (!pick || (name && !strcmp(name, "default"))) pick = it;
            if (name && !strcmp(name, "default")) break;
        }
        ct = pick ? json_object_get(pick, "template") : NULL;
    }
    if (!s && ct && !json_is_string(ct))
        s = kiln_fail(ctx, KILN_ERR_FORMAT,
                      "%s: \"chat_template\" must be a string or a list of {\"name\", "
                      "\"template\"}", p);
    if (!s && ct) {
        s = kiln_tokenizer_set_chat_template(ctx, t, json_string_value(ct),
                                             token_field(cfg, "bos_token"),
                                             token_field(cfg, "eos_token"));
        if (s) kiln_fail(ctx, s, "%s: \"chat_template\": %s", p, kiln_errmsg(ctx));
    }
    json_decref(cfg);
    free(p);
    return s;
}

kiln_status kiln_tokenizer_save_chat_config(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                            const char *dir)
{
    if (!tok->chat_src) return KILN_OK;
    char *p = file_join(dir, "tokenizer_config.json");
    json_t *o = json_object();
    kiln_status s = KILN_OK;
    if (!p || !o || json_object_set_new(o, "chat_template", json_string(tok->chat_src)) ||
        (tok->bos_token && json_object_set_new(o, "bos_token", json_string(tok->bos_token))) ||
        (tok->eos_token && json_object_set_new(o, "eos_token", json_string(tok->eos_token))))
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory writing %s/tokenizer_config.json",
                      dir);
    else
        s = js_save_file(ctx, p, o);
    json_decref(o);
    free(p);
    return s;
}

/* Renders msgs[0..n) to malloc'ed text. */
static kiln_status tmpl_text(kiln_ctx *ctx, const kiln_tokenizer *tok, const kiln_chat_msg *msgs,
                             int n, bool gen, char **out, size_t *len)
{
    return jinja_render(ctx, tok->chat_tmpl, msgs, n, gen, tok->bos_token, tok->eos_token, out,
                        len);
}

/* Appends the ids of text[a, b) (special tokens recognised) to r with
 * mask m. */
static kiln_status put_special(kiln_ctx *ctx, render *r, const char *text, size_t a, size_t b,
                               uint8_t m)
{
    if (b <= a) return KILN_OK;
    int32_t *ids;
    size_t n;
    kiln_status s = kiln_tokenizer_encode_special(ctx, r->t, text + a, b - a, &ids, &n);
    if (s) return s;
    size_t from = r->ids.n;
    for (size_t i = 0; i < n && r->ok; i++) r->ok = tok_ids_push(&r->ids, ids[i]);
    free(ids);
    set_mask(r, from, m);
    return r->ok ? KILN_OK : kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory rendering a chat");
}

/* The span [*a, *b) of assistant message i in the full text: from the end
 * of msgs[0..i) rendered with a generation prompt to the end of
 * msgs[0..i] (trailing whitespace left out), when both are prefixes of
 * the full text; else the message's content found after `from`. */
static kiln_status assistant_span(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                  const kiln_chat_msg *msgs, int i, const char *full,
                                  size_t full_len, size_t from, size_t *a, size_t *b)
{
    char *pre = NULL, *post = NULL;
    size_t lp = 0, lq = 0;
    kiln_status s = tmpl_text(ctx, tok, msgs, i, true, &pre, &lp);
    if (s == KILN_ERR_NOMEM) return s;
    if (!s) s = tmpl_text(ctx, tok, msgs, i + 1, false, &post, &lq);
    if (s == KILN_ERR_NOMEM) {
        free(pre);
        return s;
    }
    bool ok = !s && lp >= from && lp < lq && lq <= full_len && !memcmp(pre, full, lp) &&
              !memcmp(post, full, lq);
    free(pre);
    free(post);
    const char *c = msgs[i].content;
    size_t cl = msgs[i].content_len ? msgs[i].content_len : strlen(c);
    if (ok) {
        /* a template that writes no generation prompt renders the role
         * header inside the turn: start at the content (its last
         * occurrence, as the header may contain the same text) */
        char *plain = NULL;
        size_t lz = 0;
        if ((s = tmpl_text(ctx, tok, msgs, i, false, &plain, &lz)) == KILN_ERR_NOMEM) return s;
        bool no_prompt = !s && lz == lp;
        free(plain);
        if (no_prompt && cl)
            for (size_t k = lq; k >= lp + cl; k--)
                if (!memcmp(full + k - cl, c, cl)) {
                    lp = k - cl;
                    break;
                }
        while (lq > lp && strchr(" \t\r\n", full[lq - 1])) lq--;
        *a = lp;
        *b = lq;
        return KILN_OK;
    }
    const char *hit = cl ? memmem(full + from, full_len - from, c, cl) : NULL;
    if (!hit)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "message %d: the chat template's text does not contain this "
                         "assistant message's content, so its loss mask cannot be found", i);
    *a = (size_t)(hit - full);
    *b = *a + cl;
    return KILN_OK;
}

static kiln_status template_render(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                   const kiln_chat_msg *msgs, int n, bool gen, int32_t **ids,
                                   uint8_t **mask, size_t *n_ids)
{
    char *full = NULL;
    size_t len = 0;
    kiln_status s = tmpl_text(ctx, tok, msgs, n, gen, &full, &len);
    if (s) return s;
    render r = {.t = tok, .ok = true};
    size_t at = 0;
    for (int i = 0; i < n && !s && mask; i++) {
        if (strcmp(msgs[i].role, "assistant")) continue;
        size_t a = 0, b = 0;
        if ((s = assistant_span(ctx, tok, msgs, i, full, len, at, &a, &b))) break;
        if (!(s = put_special(ctx, &r, full, at, a, 0))) s = put_special(ctx, &r, full, a, b, 1);
        at = b;
    }
    if (!s) s = put_special(ctx, &r, full, at, len, 0);
    free(full);
    if (!s && !r.ids.v && !(r.ids.v = malloc(sizeof(int32_t)))) s = KILN_ERR_NOMEM;
    if (!s && !r.mask && !(r.mask = calloc(r.ids.n + 1, 1))) s = KILN_ERR_NOMEM;
    if (s) {
        free(r.ids.v);
        free(r.mask);
        return s == KILN_ERR_NOMEM && !*kiln_errmsg(ctx)
                   ? kiln_fail(ctx, s, "out of memory rendering a chat") : s;
    }
    *ids = r.ids.v;
    *n_ids = r.ids.n;
    if (mask) *mask = r.mask;
    else free(r.mask);
    return KILN_OK;
}

kiln_status kiln_chat_render(kiln_ctx *ctx, const kiln_tokenizer *tok,
                             const kiln_chat_msg *msgs, int n, bool add_generation_prompt,
                             int32_t **ids, uint8_t **mask, size_t *n_ids)
{
    *ids = NULL;
    if (mask) *mask = NULL;
    *n_ids = 0;
    static const char *roles[] = {"system", "user", "assistant", "tool"};
    for (int i = 0; i < n; i++) {
        bool known = false;
        for (int k = 0; k < 4; k++)
            if (msgs[i].role && !strcmp(msgs[i].role, roles[k])) known = true;
        if (!known)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                             "message %d: unknown role \"%s\" (expected system, user, "
                             "assistant or tool)", i, msgs[i].role ? msgs[i].role : "(null)");
        if (!msgs[i].content)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "message %d: content is missing", i);
    }
    if (tok->chat_tmpl)
        return template_render(ctx, tok, msgs, n, add_generation_prompt, ids, mask, n_ids);
    render r = {.t = tok, .s = tok_scratch_new(tok), .ok = true};
    if (!r.s) r.ok = false;
    for (int i = 0; i < n && r.ok; i++) {
        uint8_t m = !strcmp(msgs[i].role, "assistant");
        put_marker(&r, "<|im_start|>", 0);
        put_text(&r, msgs[i].role, 0);
        put_text(&r, "\n", 0);
        put_bytes(&r, msgs[i].content,
                  msgs[i].content_len ? msgs[i].content_len : strlen(msgs[i].content), m);
        put_marker(&r, "<|im_end|>", m);
        put_text(&r, "\n", 0);
    }
    if (add_generation_prompt && r.ok) {
        put_marker(&r, "<|im_start|>", 0);
        put_text(&r, "assistant\n", 0);
    }
    tok_scratch_free(r.s);
    if (r.ok && !r.ids.v) r.ok = (r.ids.v = malloc(sizeof(int32_t))) != NULL;
    if (r.ok && !r.mask) r.ok = (r.mask = malloc(1)) != NULL;
    if (!r.ok) {
        free(r.ids.v);
        free(r.mask);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory rendering a chat");
    }
    *ids = r.ids.v;
    *n_ids = r.ids.n;
    if (mask) *mask = r.mask;
    else free(r.mask);
    return KILN_OK;
}
