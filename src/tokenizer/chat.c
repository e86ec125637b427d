/*
 * chat.c — special tokens in text and the ChatML chat template with its
 * loss mask (contract in kiln.h, "chat template").
 */
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
