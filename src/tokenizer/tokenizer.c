/*
 * tokenizer.c — the tokenizer object: construction of the vocabulary, merge
 * table and pattern shared by every loader, the "bytes" tokenizer, and the
 * public kiln_tokenizer_* entry points (load dispatch, encode, decode).
 *
 * A tokenizer is immutable once loaded, so one may be shared by any number
 * of threads; per-call scratch lives in tok_scratch (bpe.c).
 */
#include "tokenizer/tok_gguf.h"
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

static uint64_t hash_bytes(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        s += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0x94d049bb133111ebull;
    h ^= h >> 29;
    return h;
}

kiln_tokenizer *tok_new(kiln_ctx *ctx, int32_t n_vocab)
{
    kiln_tokenizer *t = kiln_calloc(ctx, 1, sizeof *t);
    if (!t) return NULL;
    t->eot = -1;
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    if (tok_grow(ctx, t, n_vocab)) {
        kiln_tokenizer_free(t);
        return NULL;
    }
    return t;
}

kiln_status tok_grow(kiln_ctx *ctx, kiln_tokenizer *t, int32_t n)
{
    if (n <= t->n_vocab) return KILN_OK;
    size_t *off = realloc(t->off, (size_t)n * sizeof *off);
    if (off) t->off = off;
    uint32_t *len = realloc(t->len, (size_t)n * sizeof *len);
    if (len) t->len = len;
    uint8_t *fl = realloc(t->flags, (size_t)n);
    if (fl) t->flags = fl;
    if (!off || !len || !fl)
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory for a vocabulary of %d", n);
    for (int32_t i = t->n_vocab; i < n; i++) {
        t->off[i] = 0;
        t->len[i] = 0;
        t->flags[i] = TOKF_HOLE;
    }
    t->n_vocab = n;
    return KILN_OK;
}

kiln_status tok_set(kiln_ctx *ctx, kiln_tokenizer *t, int32_t id,
                    const void *bytes, size_t len, uint8_t flags)
{
    KILN_ASSERT(id >= 0 && id < t->n_vocab);
    if (t->blob_len + len + 1 > t->blob_cap) {
        size_t cap = t->blob_cap ? t->blob_cap * 2 : 4096;
        while (cap < t->blob_len + len + 1) cap *= 2;
        char *b = realloc(t->blob, cap);
        if (!b) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        t->blob = b;
        t->blob_cap = cap;
    }
    memcpy(t->blob + t->blob_len, bytes, len);
    t->off[id] = t->blob_len;
    t->len[id] = (uint32_t)len;
    t->flags[id] = flags;
    t->blob_len += len;
    return KILN_OK;
}

int32_t tok_lookup(const kiln_tokenizer *t, const void *bytes, size_t len)
{
    if (!t->vh) return -1;
    uint32_t i = (uint32_t)(hash_bytes(bytes, len) >> 20) & t->vh_mask;
    for (;;) {
        int32_t s = t->vh[i];
        if (s == 0) return -1;
        int32_t id = s - 1;
        if (t->len[id] == len && memcmp(t->blob + t->off[id], bytes, len) == 0)
            return id;
        i = (i + 1) & t->vh_mask;
    }
}

static void quote(char *dst, size_t cap, const char *p, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n && k + 5 < cap; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') dst[k++] = (char)c;
        else k += (size_t)snprintf(dst + k, cap - k, "\\x%02x", c);
    }
    dst[k] = 0;
}

kiln_status tok_finish_vocab(kiln_ctx *ctx, kiln_tokenizer *t, const char *what)
{
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)t->n_vocab + 16) cap *= 2;
    free(t->vh);
    t->vh = calloc(cap, sizeof *t->vh);
    free(t->special_ids);
    t->special_ids = calloc((size_t)t->n_vocab + 1, sizeof *t->special_ids);
    if (!t->vh || !t->special_ids) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    t->vh_mask = cap - 1;
    t->n_special = 0;
    t->n_added = 0;
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        if (t->flags[id] & TOKF_HOLE) continue;
        const char *p = t->blob + t->off[id];
        size_t n = t->len[id];
        if (t->flags[id] & (TOKF_SPECIAL | TOKF_ADDED)) {
            t->special_ids[t->n_special++] = id;
            if (t->flags[id] & TOKF_ADDED) t->n_added++;
            continue;
        }
        if (n == 0)
            return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: token id %d is empty", what, id);
        uint32_t i = (uint32_t)(hash_bytes(p, n) >> 20) & t->vh_mask;
        for (;;) {
            int32_t s = t->vh[i];
            if (s == 0) break;
            int32_t o = s - 1;
            if (t->len[o] == n && memcmp(t->blob + t->off[o], p, n) == 0) {
                char q[96];
                quote(q, sizeof q, p, n);
                return kiln_fail(ctx, KILN_ERR_FORMAT,
                                 "%s: token \"%s\" appears twice (ids %d and %d); "
                                 "every token must have exactly one id",
                                 what, q, o, id);
            }
            i = (i + 1) & t->vh_mask;
        }
        t->vh[i] = id + 1;
        if (n == 1) t->byte_id[(unsigned char)p[0]] = id;
    }
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: the vocabulary has no token for byte 0x%02x; a "
                             "byte-level BPE needs all 256 single-byte tokens",
                             what, b);
    /* longest specials first, so rendering/matching prefers the longest */
    for (int i = 1; i < t->n_special; i++) {
        int32_t x = t->special_ids[i];
        int j = i - 1;
        while (j >= 0 && t->len[t->special_ids[j]] < t->len[x]) {
            t->special_ids[j + 1] = t->special_ids[j];
            j--;
        }
        t->special_ids[j + 1] = x;
    }
    if (t->eot < 0) {
        static const char *names[] = {"<|endoftext|>", "<|end_of_text|>", "</s>",
                                      "<|eot_id|>", "<eos>"};
        for (size_t k = 0; k < sizeof names / sizeof *names && t->eot < 0; k++)
            for (int i = 0; i < t->n_special; i++) {
                int32_t id = t->special_ids[i];
                if (t->len[id] == strlen(names[k]) &&
                    !memcmp(t->blob + t->off[id], names[k], t->len[id])) {
                    t->eot = id;
                    break;
                }
            }
    }
    return KILN_OK;
}

kiln_status tok_set_merges(kiln_ctx *ctx, kiln_tokenizer *t, int32_t n,
                           int32_t *left, int32_t *right, const char *what)
{
    free(t->m_left);
    free(t->m_right);
    free(t->m_result);
    free(t->mh_key);
    free(t->mh_rank);
    t->m_left = left;
    t->m_right = right;
    t->n_merges = n;
    t->m_result = malloc(((size_t)n + 1) * sizeof *t->m_result);
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)n + 16) cap *= 2;
    t->mh_key = malloc((size_t)cap * sizeof *t->mh_key);
    t->mh_rank = malloc((size_t)cap * sizeof *t->mh_rank);
    if (!t->m_result || !t->mh_key || !t->mh_rank)
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    t->mh_mask = cap - 1;
    memset(t->mh_key, 0xff, (size_t)cap * sizeof *t->mh_key);
    char *buf = NULL;
    size_t bcap = 0;
    for (int32_t r = 0; r < n; r++) {
        int32_t a = left[r], b = right[r];
        if (a < 0 || b < 0 || a >= t->n_vocab || b >= t->n_vocab ||
            (t->flags[a] & (TOKF_HOLE | TOKF_SPECIAL | TOKF_ADDED)) ||
            (t->flags[b] & (TOKF_HOLE | TOKF_SPECIAL | TOKF_ADDED))) {
            free(buf);
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: merge %d refers to a token that is not an "
                             "ordinary vocabulary entry", what, r);
        }
        size_t la = t->len[a], lb = t->len[b];
        if (la + lb > bcap) {
            bcap = 2 * (la + lb) + 64;
            char *nb = realloc(buf, bcap);
            if (!nb) { free(buf); return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory"); }
            buf = nb;
        }
        memcpy(buf, t->blob + t->off[a], la);
        memcpy(buf + la, t->blob + t->off[b], lb);
        int32_t res = tok_lookup(t, buf, la + lb);
        if (res < 0) {
            char qa[64], qb[64];
            quote(qa, sizeof qa, t->blob + t->off[a], la);
            quote(qb, sizeof qb, t->blob + t->off[b], lb);
            free(buf);
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: merge %d (\"%s\" + \"%s\") produces a token that "
                             "is not in the vocabulary", what, r, qa, qb);
        }
        t->m_result[r] = res;
        uint64_t k = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        uint32_t i = (uint32_t)((k * 0x9E3779B97F4A7C15ull) >> 32) & t->mh_mask;
        while (t->mh_key[i] != ~0ull && t->mh_key[i] != k) i = (i + 1) & t->mh_mask;
        if (t->mh_key[i] == k) continue; /* duplicate merge: first rank wins */
        t->mh_key[i] = k;
        t->mh_rank[i] = r;
    }
    free(buf);
    /* TOKF_WHOLE: a pre-token equal to this token's bytes encodes to it. */
    tok_scratch *s = tok_scratch_new(t);
    tok_ids ids = {0};
    if (!s) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (int32_t id = 0; id < t->n_vocab; id++) {
        if (t->flags[id] & (TOKF_HOLE | TOKF_SPECIAL | TOKF_ADDED)) continue;
        t->flags[id] &= (uint8_t)~TOKF_WHOLE;
        if (t->ignore_merges || t->len[id] == 1) {
            t->flags[id] |= TOKF_WHOLE;
            continue;
        }
        ids.n = 0;
        if (!tok_bpe_piece(t, s, (const unsigned char *)t->blob + t->off[id],
                           t->len[id], &ids)) {
            tok_scratch_free(s);
            free(ids.v);
            return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        }
        if (ids.n == 1 && ids.v[0] == id) t->flags[id] |= TOKF_WHOLE;
    }
    tok_scratch_free(s);
    free(ids.v);
    return KILN_OK;
}

kiln_status tok_set_pattern(kiln_ctx *ctx, kiln_tokenizer *t, const char *pattern)
{
    if (t->re) pcre2_code_free(t->re);
    t->re = NULL;
    if (!pattern) {
        free(t->pattern);
        t->pattern = NULL;
        return KILN_OK;
    }
    char *p = strdup(pattern);
    if (!p) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    free(t->pattern);
    t->pattern = p;
    int err;
    PCRE2_SIZE eoff;
    t->re = pcre2_compile((PCRE2_SPTR)p, PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err,
                          &eoff, NULL);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "pre-tokenizer pattern does not compile at offset %zu: %s",
                         (size_t)eoff, (const char *)msg);
    }
    pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter */
    return KILN_OK;
}

kiln_status tok_make_bytes(kiln_ctx *ctx, kiln_tokenizer **out)
{
    *out = NULL;
    kiln_tokenizer *t = tok_new(ctx, 257);
    if (!t) return KILN_ERR_NOMEM;
    kiln_status s = KILN_OK;
    for (int b = 0; b < 256 && !s; b++) {
        unsigned char c = (unsigned char)b;
        s = tok_set(ctx, t, b, &c, 1, 0);
    }
    if (!s) s = tok_set(ctx, t, 256, "<|endoftext|>", 13, TOKF_SPECIAL);
    if (!s) {
        t->eot = 256;
        t->pre = TOK_PRE_NONE;
        t->name = strdup("bytes");
        s = tok_finish_vocab(ctx, t, "bytes");
    }
    if (!s) s = tok_set_merges(ctx, t, 0, NULL, NULL, "bytes");
    if (s) {
        kiln_tokenizer_free(t);
        return s;
    }
    *out = t;
    return KILN_OK;
}

/* ---- public API ----------------------------------------------------- */

kiln_status kiln_tokenizer_load(kiln_ctx *ctx, const char *spec,
                                kiln_tokenizer **out)
{
    *out = NULL;
    if (!spec || !*spec)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "no tokenizer given: pass a tokenizer.json, a directory "
                         "holding one (or GPT-2's encoder.json + vocab.bpe), or \"bytes\"");
    if (!strcmp(spec, "bytes")) return tok_make_bytes(ctx, out);
    if (file_is_dir(spec)) {
        char *tj = file_join(spec, "tokenizer.json");
        char *ej = file_join(spec, "encoder.json");
        char *vb = file_join(spec, "vocab.bpe");
        kiln_status s;
        if (!tj || !ej || !vb) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        else if (file_exists(tj)) {
            s = tok_load_hf(ctx, tj, out);
            if (!s && (s = tok_load_chat_config(ctx, *out, spec))) {
                kiln_tokenizer_free(*out);
                *out = NULL;
            }
        }
        else if (file_exists(ej) && file_exists(vb)) s = tok_load_gpt2(ctx, spec, out);
        else
            s = kiln_fail(ctx, KILN_ERR_IO,
                          "directory '%s' holds neither tokenizer.json nor GPT-2's "
                          "encoder.json + vocab.bpe", spec);
        free(tj);
        free(ej);
        free(vb);
        return s;
    }
    if (!file_exists(spec))
        return kiln_fail(ctx, KILN_ERR_IO,
                         "tokenizer '%s' not found: pass a tokenizer.json, a "
                         "directory holding one (or GPT-2's encoder.json + "
                         "vocab.bpe), or \"bytes\"", spec);
    if (gguf_is_gguf(spec)) {
        gguf_file f;
        kiln_status s = gguf_open(ctx, spec, &f);
        if (s) return s;
        s = tok_gguf_read(ctx, &f, spec, out);
        gguf_close(&f);
        return s;
    }
    kiln_status s = tok_load_hf(ctx, spec, out);
    if (s) return s;
    /* a tokenizer.json's directory may hold its tokenizer_config.json */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", spec);
    char *sl = strrchr(dir, '/');
    if (sl) *sl = 0;
    else snprintf(dir, sizeof dir, ".");
    if ((s = tok_load_chat_config(ctx, *out, dir))) {
        kiln_tokenizer_free(*out);
        *out = NULL;
    }
    return s;
}

kiln_status kiln_tokenizer_save(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                const char *path)
{
    json_t *doc = tok_to_hf_json(tok);
    if (!doc) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory building %s", path);
    char *txt = json_dumps(doc, JSON_INDENT(2) | JSON_ENSURE_ASCII);
    json_decref(doc);
    if (!txt) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory writing %s", path);
    size_t n = strlen(txt);
    txt[n] = '\n'; /* replace the NUL: file ends with a newline */
    kiln_status s = file_write_atomic(ctx, path, txt, n + 1);
    free(txt);
    return s;
}

void kiln_tokenizer_free(kiln_tokenizer *t)
{
    if (!t) return;
    free(t->name);
    free(t->blob);
    free(t->off);
    free(t->len);
    free(t->flags);
    free(t->vh);
    free(t->m_left);
    free(t->m_right);
    free(t->m_result);
    free(t->mh_key);
    free(t->mh_rank);
    free(t->special_ids);
    free(t->pattern);
    if (t->re) pcre2_code_free(t->re);
    if (t->hf_extra) json_decref(t->hf_extra);
    tok_chat_free(t);
    free(t);
}

int kiln_tokenizer_vocab_size(const kiln_tokenizer *tok) { return tok->n_vocab; }

int kiln_tokenizer_eot(const kiln_tokenizer *tok) { return tok->eot; }

bool kiln_tokenizer_is_special(const kiln_tokenizer *tok, int32_t id)
{
    return id >= 0 && id < tok->n_vocab && (tok->flags[id] & TOKF_SPECIAL) &&
           !(tok->flags[id] & TOKF_HOLE);
}

kiln_status kiln_tokenizer_encode(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                  const char *text, size_t len, int32_t **ids,
                                  size_t *n)
{
    *ids = NULL;
    *n = 0;
    tok_ids out = {0};
    tok_scratch *s = tok_scratch_new(tok);
    bool ok = s && tok_encode_text(tok, s, text, len, &out);
    tok_scratch_free(s);
    if (!ok) {
        free(out.v);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory encoding %zu bytes", len);
    }
    if (!out.v) out.v = malloc(sizeof(int32_t)); /* never return NULL on success */
    if (!out.v) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    *ids = out.v;
    *n = out.n;
    return KILN_OK;
}

struct kiln_encoder {
    const kiln_tokenizer *tok;
    tok_scratch *s;
};

kiln_status kiln_encoder_new(kiln_ctx *ctx, const kiln_tokenizer *tok, kiln_encoder **out)
{
    *out = NULL;
    kiln_encoder *e = kiln_calloc(ctx, 1, sizeof *e);
    if (!e) return KILN_ERR_NOMEM;
    e->tok = tok;
    e->s = tok_scratch_new(tok);
    if (!e->s) {
        free(e);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    *out = e;
    return KILN_OK;
}

void kiln_encoder_free(kiln_encoder *enc)
{
    if (!enc) return;
    tok_scratch_free(enc->s);
    free(enc);
}

kiln_status kiln_encoder_encode(kiln_ctx *ctx, kiln_encoder *enc, const char *text,
                                size_t len, int32_t **ids, size_t *n)
{
    *ids = NULL;
    *n = 0;
    tok_ids out = {0};
    if (!tok_encode_text(enc->tok, enc->s, text, len, &out)) {
        free(out.v);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory encoding %zu bytes", len);
    }
    if (!out.v && !(out.v = malloc(sizeof(int32_t))))
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    *ids = out.v;
    *n = out.n;
    return KILN_OK;
}

kiln_status kiln_tokenizer_decode(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                  const int32_t *ids, size_t n, char **text,
                                  size_t *len)
{
    *text = NULL;
    if (len) *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= tok->n_vocab || (tok->flags[id] & TOKF_HOLE))
            return kiln_fail(ctx, KILN_ERR_RANGE,
                             "token id %d at position %zu is outside the vocabulary "
                             "(0..%d)", id, i, tok->n_vocab - 1);
        total += tok->len[id];
    }
    char *o = malloc(total + 1);
    if (!o) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory decoding");
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        memcpy(o + k, tok->blob + tok->off[ids[i]], tok->len[ids[i]]);
        k += tok->len[ids[i]];
    }
    o[k] = 0;
    *text = o;
    if (len) *len = k;
    return KILN_OK;
}

size_t kiln_tokenizer_split_point(const kiln_tokenizer *tok, const char *text,
                                  size_t len, size_t from)
{
    if (from >= len) return len;
    if (tok->add_prefix_space) return len; /* a segment would gain a space */
    if (tok->n_added) return len;          /* a cut could split an added token */
    if (tok->n_merges == 0) return from;
    return tok_split_point_pattern(tok->pattern, text, len, from);
}

size_t tok_split_point_pattern(const char *pattern, const char *text, size_t len,
                               size_t from)
{
    if (from >= len) return len;
    if (!pattern || (strcmp(pattern, TOK_PATTERN_GPT2) != 0 &&
                     strcmp(pattern, TOK_PATTERN_HF_GPT2) != 0 &&
                     strcmp(pattern, TOK_PATTERN_LLAMA3) != 0))
        return len;
    /* Cut after "X\n" before an ASCII letter, X printable ASCII and not
     * a space: the newline is then a whitespace run of its own (a lone
     * "\n" pre-token, or absorbed by punctuation X in the Llama-3
     * pattern) whether or not the letter follows, and no alternative
     * continues across a newline into a letter. */
    if (from < 2) from = 2;
    size_t i = from;
    while (i < len) {
        const char *nl = memchr(text + i - 1, '\n', len - i + 1);
        if (!nl) return len;
        size_t c = (size_t)(nl - text) + 1; /* candidate cut */
        if (c >= len) return len;
        unsigned char x = (unsigned char)text[c - 2], a = (unsigned char)text[c];
        if (c >= 2 && x > 0x20 && x < 0x7f && (a | 0x20) >= 'a' && (a | 0x20) <= 'z')
            return c;
        i = c + 1;
    }
    return len;
}
