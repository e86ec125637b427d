/*
 * bpe.c — encoding: pre-tokenization with PCRE2 (UTF + UCP, JIT when
 * available, invalid UTF-8 tolerated) and the merge loop of byte-level BPE.
 *
 * Text is split by the tokenizer's pattern into pre-tokens; bytes that the
 * pattern cannot match (invalid UTF-8 sequences) form pre-tokens of their
 * own, so every byte string encodes and decodes back to itself. Each
 * pre-token is first looked up whole (a vocabulary entry whose own BPE is
 * itself, flagged TOKF_WHOLE at load time), else merged: repeatedly the
 * adjacent pair with the lowest merge rank (leftmost on ties) is replaced
 * by its result — a linear scan for short pre-tokens, a binary heap with
 * lazy invalidation (O(n log n)) for long ones.
 */
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

#define SHORT_PIECE 48
#define CACHE_BITS 12

/* Each thread's scratch keeps a direct-mapped cache of short pre-tokens
 * (up to 8 bytes) that encode to one id: frequent words then cost one
 * probe of a small, hot table instead of the vocabulary hash. */
struct tok_scratch {
    pcre2_match_data *md;
    bool jit;
    uint64_t ckey[1 << CACHE_BITS]; /* piece bytes, zero-padded */
    uint32_t cval[1 << CACHE_BITS]; /* len << 24 | id; 0 = empty */
    struct mcache *mc;              /* multi-id results, allocated on use */
    /* merge workspace, grown on demand */
    int32_t *sym, *rank, *res, *prev, *next;
    uint64_t *heap;
    size_t cap;
};

/* Cache of pre-tokens up to 16 bytes whose BPE gives 2..MC_IDS ids. */
#define MC_BITS 12
#define MC_IDS 6
struct mcache {
    uint64_t key[1 << MC_BITS][2];
    uint8_t len[1 << MC_BITS]; /* 0 = empty */
    uint8_t n[1 << MC_BITS];
    int32_t ids[1 << MC_BITS][MC_IDS];
};

bool tok_ids_push(tok_ids *b, int32_t id)
{
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        int32_t *v = realloc(b->v, cap * sizeof *v);
        if (!v) return false;
        b->v = v;
        b->cap = cap;
    }
    b->v[b->n++] = id;
    return true;
}

tok_scratch *tok_scratch_new(const kiln_tokenizer *t)
{
    tok_scratch *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    if (t->re) {
        s->md = pcre2_match_data_create_from_pattern(t->re, NULL);
        if (!s->md) {
            free(s);
            return NULL;
        }
        size_t jsz = 0;
        s->jit = pcre2_pattern_info(t->re, PCRE2_INFO_JITSIZE, &jsz) == 0 && jsz > 0;
    }
    return s;
}

void tok_scratch_free(tok_scratch *s)
{
    if (!s) return;
    if (s->md) pcre2_match_data_free(s->md);
    free(s->mc);
    free(s->sym);
    free(s->rank);
    free(s->res);
    free(s->prev);
    free(s->next);
    free(s->heap);
    free(s);
}

static bool reserve(tok_scratch *s, size_t n)
{
    if (n <= s->cap) return true;
    size_t cap = n < 64 ? 64 : n * 2;
    int32_t *a = realloc(s->sym, cap * sizeof *a);
    if (a) s->sym = a;
    int32_t *b = realloc(s->rank, cap * sizeof *b);
    if (b) s->rank = b;
    int32_t *c = realloc(s->res, cap * sizeof *c);
    if (c) s->res = c;
    int32_t *d = realloc(s->prev, cap * sizeof *d);
    if (d) s->prev = d;
    int32_t *e = realloc(s->next, cap * sizeof *e);
    if (e) s->next = e;
    uint64_t *h = realloc(s->heap, 3 * cap * sizeof *h);
    if (h) s->heap = h;
    if (!a || !b || !c || !d || !e || !h) return false;
    s->cap = cap;
    return true;
}

/* Short pre-tokens: ranks of adjacent pairs kept in an array, the minimum
 * found by a scan; only the neighbours of a merge are looked up again. */
static bool bpe_short(const kiln_tokenizer *t, tok_scratch *s, size_t n,
                      tok_ids *out)
{
    int32_t *sym = s->sym, *rank = s->rank, *res = s->res;
    for (size_t i = 0; i + 1 < n; i++)
        rank[i] = tok_merge_rank(t, sym[i], sym[i + 1], &res[i]);
    size_t m = n;
    while (m > 1) {
        int32_t best = INT32_MAX;
        size_t bi = 0;
        for (size_t i = 0; i + 1 < m; i++)
            if (rank[i] >= 0 && rank[i] < best) {
                best = rank[i];
                bi = i;
            }
        if (best == INT32_MAX) break;
        sym[bi] = res[bi];
        memmove(sym + bi + 1, sym + bi + 2, (m - bi - 2) * sizeof *sym);
        if (m >= bi + 3) { /* drop pair entry bi+1; entries bi-1, bi redone */
            memmove(rank + bi + 1, rank + bi + 2, (m - bi - 3) * sizeof *rank);
            memmove(res + bi + 1, res + bi + 2, (m - bi - 3) * sizeof *res);
        }
        m--;
        if (bi > 0) rank[bi - 1] = tok_merge_rank(t, sym[bi - 1], sym[bi], &res[bi - 1]);
        if (bi + 1 < m) rank[bi] = tok_merge_rank(t, sym[bi], sym[bi + 1], &res[bi]);
    }
    for (size_t i = 0; i < m; i++)
        if (!tok_ids_push(out, sym[i])) return false;
    return true;
}

/* Binary min-heap of (rank << 32 | position). */
static void heap_push(uint64_t *h, size_t *n, uint64_t v)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n)
{
    uint64_t top = h[0], v = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = v;
    return top;
}

static bool bpe_long(const kiln_tokenizer *t, tok_scratch *s, size_t n,
                     tok_ids *out)
{
    int32_t *sym = s->sym, *prev = s->prev, *next = s->next, *res = s->res;
    uint64_t *h = s->heap;
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        int32_t r = tok_merge_rank(t, sym[i], sym[i + 1], &res[i]);
        if (r >= 0) heap_push(h, &hn, ((uint64_t)r << 32) | i);
    }
    while (hn > 0) {
        uint64_t top = heap_pop(h, &hn);
        int32_t r = (int32_t)(top >> 32), i = (int32_t)(uint32_t)top;
        if (sym[i] < 0 || next[i] < 0) continue; /* node merged away */
        int32_t j = next[i], rr = -1;
        int32_t cur = tok_merge_rank(t, sym[i], sym[j], &rr);
        if (cur != r) continue; /* stale entry */
        sym[i] = rr;
        sym[j] = -1;
        next[i] = next[j];
        if (next[j] >= 0) prev[next[j]] = i;
        if (prev[i] >= 0) {
            int32_t p = prev[i], x = -1;
            int32_t pr = tok_merge_rank(t, sym[p], sym[i], &x);
            if (pr >= 0) heap_push(h, &hn, ((uint64_t)pr << 32) | (uint32_t)p);
        }
        if (next[i] >= 0) {
            int32_t x = -1;
            int32_t nr = tok_merge_rank(t, sym[i], sym[next[i]], &x);
            if (nr >= 0) heap_push(h, &hn, ((uint64_t)nr << 32) | (uint32_t)i);
        }
    }
    for (int32_t i = 0; i >= 0; i = next[i])
        if (!tok_ids_push(out, sym[i])) return false;
    return true;
}

bool tok_bpe_piece(const kiln_tokenizer *t, tok_scratch *s,
                   const unsigned char *p, size_t n, tok_ids *out)
{
    if (n == 0) return true;
    if (n == 1) return tok_ids_push(out, t->byte_id[p[0]]);
    uint64_t key = 0;
    uint32_t slot = 0;
    if (n <= 8) {
        memcpy(&key, p, n);
        uint64_t h = (key ^ n) * 0x9E3779B97F4A7C15ull;
        slot = (uint32_t)(h >> (64 - CACHE_BITS));
        uint32_t v = s->cval[slot];
        if (v >> 24 == n && s->ckey[slot] == key) return tok_ids_push(out, (int32_t)(v & 0xFFFFFF));
    }
    int32_t id = tok_lookup(t, p, n);
    if (id >= 0 && (t->flags[id] & TOKF_WHOLE)) {
        if (n <= 8) {
            s->ckey[slot] = key;
            s->cval[slot] = (uint32_t)n << 24 | (uint32_t)id;
        }
        return tok_ids_push(out, id);
    }
    if (t->n_merges == 0) {
        for (size_t i = 0; i < n; i++)
            if (!tok_ids_push(out, t->byte_id[p[i]])) return false;
        return true;
    }
    uint64_t k2[2] = {0, 0};
    uint32_t ms = 0;
    if (n <= 16) {
        if (!s->mc) s->mc = calloc(1, sizeof *s->mc);
        if (s->mc) {
            memcpy(k2, p, n);
            uint64_t h = ((k2[0] * 0x9E3779B97F4A7C15ull) ^ k2[1] ^ n) * 0xbf58476d1ce4e5b9ull;
            ms = (uint32_t)(h >> (64 - MC_BITS));
            struct mcache *c = s->mc;
            if (c->len[ms] == n && c->key[ms][0] == k2[0] && c->key[ms][1] == k2[1]) {
                for (int i = 0; i < c->n[ms]; i++)
                    if (!tok_ids_push(out, c->ids[ms][i])) return false;
                return true;
            }
        }
    }
    if (!reserve(s, n)) return false;
    for (size_t i = 0; i < n; i++) s->sym[i] = t->byte_id[p[i]];
    size_t before = out->n;
    bool ok = n <= SHORT_PIECE ? bpe_short(t, s, n, out) : bpe_long(t, s, n, out);
    size_t got = out->n - before;
    if (ok && n <= 16 && s->mc && got <= MC_IDS) {
        struct mcache *c = s->mc;
        c->key[ms][0] = k2[0];
        c->key[ms][1] = k2[1];
        c->len[ms] = (uint8_t)n;
        c->n[ms] = (uint8_t)got;
        memcpy(c->ids[ms], out->v + before, got * sizeof(int32_t));
    }
    return ok;
}

static size_t utf8_next(const unsigned char *p, size_t len, size_t i)
{
    size_t k = i + 1;
    while (k < len && (p[k] & 0xC0) == 0x80 && k < i + 4) k++;
    return k;
}

static bool encode_plain(const kiln_tokenizer *t, tok_scratch *s, const char *text,
                         size_t len, tok_ids *out);

/* Non-special added tokens (Hugging Face added_tokens with special false)
 * are user vocabulary: like Hugging Face, they are matched in the text
 * (longest first) before pre-tokenization. Special tokens never are. */
bool tok_encode_text(const kiln_tokenizer *t, tok_scratch *s, const char *text,
                     size_t len, tok_ids *out)
{
    if (t->n_added == 0) return encode_plain(t, s, text, len, out);
    size_t start = 0, i = 0;
    while (i < len) {
        int32_t hit = -1;
        for (int k = 0; k < t->n_special && hit < 0; k++) {
            int32_t id = t->special_ids[k];
            size_t sl = t->len[id];
            if ((t->flags[id] & TOKF_ADDED) && sl && sl <= len - i &&
                !memcmp(text + i, t->blob + t->off[id], sl))
                hit = id;
        }
        if (hit < 0) {
            i++;
            continue;
        }
        if (!encode_plain(t, s, text + start, i - start, out) || !tok_ids_push(out, hit))
            return false;
        i += t->len[hit];
        start = i;
    }
    return encode_plain(t, s, text + start, len - start, out);
}

static bool encode_plain_nfc(const kiln_tokenizer *t, tok_scratch *s, const char *text,
                             size_t len, tok_ids *out);

/* The normalizer first (HF: on the text between added tokens, whose
 * normalized flag is false in the tokenizers kiln reads). */
static bool encode_plain(const kiln_tokenizer *t, tok_scratch *s, const char *text,
                         size_t len, tok_ids *out)
{
    if (!t->nfc || len == 0) return encode_plain_nfc(t, s, text, len, out);
    char *norm;
    size_t nl;
    if (!tok_nfc(text, len, &norm, &nl)) return false;
    if (!norm) return encode_plain_nfc(t, s, text, len, out);
    bool ok = encode_plain_nfc(t, s, norm, nl, out);
    free(norm);
    return ok;
}

static bool encode_plain_nfc(const kiln_tokenizer *t, tok_scratch *s, const char *text,
                             size_t len, tok_ids *out)
{
    const unsigned char *p = (const unsigned char *)text;
    if (len == 0) return true;
    if (t->n_merges == 0 || !t->re) {
        if (t->n_merges == 0) {
            if (t->add_prefix_space && p[0] != ' ' && !tok_ids_push(out, t->byte_id[' ']))
                return false;
            if (out->cap < out->n + len) {
                size_t cap = out->n + len;
                int32_t *v = realloc(out->v, cap * sizeof *v);
                if (!v) return false;
                out->v = v;
                out->cap = cap;
            }
            for (size_t i = 0; i < len; i++) out->v[out->n++] = t->byte_id[p[i]];
            return true;
        }
        return tok_bpe_piece(t, s, p, len, out);
    }
    char *copy = NULL;
    if (t->add_prefix_space && p[0] != ' ') {
        copy = malloc(len + 1);
        if (!copy) return false;
        copy[0] = ' ';
        memcpy(copy + 1, text, len);
        p = (const unsigned char *)copy;
        len++;
    }
    size_t pos = 0;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(s->md);
    bool ok = true;
    while (pos < len && ok) {
        int rc = s->jit ? pcre2_jit_match(t->re, p, len, pos, 0, s->md, NULL)
                        : pcre2_match(t->re, p, len, pos, 0, s->md, NULL);
        if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && s->jit) /* e.g. JIT stack */
            rc = pcre2_match(t->re, p, len, pos, 0, s->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) { /* only invalid UTF-8 left: one pre-token */
            ok = tok_bpe_piece(t, s, p + pos, len - pos, out);
            break;
        }
        if (rc < 0) { /* a resource limit: take one character and go on */
            size_t b = utf8_next(p, len, pos);
            ok = tok_bpe_piece(t, s, p + pos, b - pos, out);
            pos = b;
            continue;
        }
        size_t a = ov[0], b = ov[1];
        if (a > pos) ok = tok_bpe_piece(t, s, p + pos, a - pos, out);
        if (b <= a) b = utf8_next(p, len, a); /* empty match: take a character */
        if (ok) ok = tok_bpe_piece(t, s, p + a, b - a, out);
        pos = b;
    }
    free(copy);
    return ok;
}
