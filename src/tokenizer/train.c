/*
 * train.c — learning a byte-level BPE from text (`kiln tokenizer train`).
 *
 * Phase 1 counts pre-tokens: the input (text files, JSONL string fields)
 * is cut into ~1 MB units at places that do not change pre-tokenization,
 * and each thread splits its units with the PCRE2 pattern into a private
 * hash table of (bytes -> count); the tables are then summed.
 *
 * Phase 2 learns merges over the unique pre-tokens ("words", each with its
 * count) with incremental pair counts, as in Hugging Face's BPE trainer:
 * pair -> total count and the list of words holding it; a max-heap of
 * (count, pair) with lazy invalidation picks the most frequent pair (ties:
 * smallest left id, then right id); merging it touches only the words
 * that hold it and adjusts the counts of their neighbouring pairs. A merge
 * whose bytes already name a token reuses that id.
 */
#include "tokenizer/tok_internal.h"

#include <errno.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define UNIT_BYTES (1u << 20)
#define MAX_VOCAB (1 << 24)

kiln_tokenizer_train_opts kiln_tokenizer_train_opts_default(void)
{
    return (kiln_tokenizer_train_opts){.field = "text",
                                       .vocab_size = 32000,
                                       .pattern = "gpt2",
                                       .min_frequency = 2};
}

/* ---- a bytes -> count hash table ------------------------------------ */

typedef struct strmap {
    uint32_t *slot; /* entry index + 1, 0 = empty */
    uint32_t mask;
    uint32_t n, cap;
    size_t *off;
    uint32_t *len;
    uint64_t *hash;
    int64_t *count;
    char *buf;
    size_t blen, bcap;
    bool oom;
} strmap;

static uint64_t hash_str(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ull ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
        s += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 31;
    return h;
}

static void sm_free(strmap *m)
{
    free(m->slot);
    free(m->off);
    free(m->len);
    free(m->hash);
    free(m->count);
    free(m->buf);
    memset(m, 0, sizeof *m);
}

static bool sm_rehash(strmap *m, uint32_t slots)
{
    uint32_t *s = calloc(slots, sizeof *s);
    if (!s) return false;
    free(m->slot);
    m->slot = s;
    m->mask = slots - 1;
    for (uint32_t e = 0; e < m->n; e++) {
        uint32_t i = (uint32_t)m->hash[e] & m->mask;
        while (s[i]) i = (i + 1) & m->mask;
        s[i] = e + 1;
    }
    return true;
}

/* Adds c to the count of bytes p[0..n); returns the entry index or -1. */
static int64_t sm_add(strmap *m, const void *p, size_t n, int64_t c, uint64_t h)
{
    if (m->oom) return -1;
    if (!m->slot && !sm_rehash(m, 1024)) { m->oom = true; return -1; }
    uint32_t i = (uint32_t)h & m->mask;
    for (;;) {
        uint32_t e = m->slot[i];
        if (!e) break;
        e--;
        if (m->hash[e] == h && m->len[e] == n && !memcmp(m->buf + m->off[e], p, n)) {
            m->count[e] += c;
            return e;
        }
        i = (i + 1) & m->mask;
    }
    if (m->n == m->cap) {
        uint32_t cap = m->cap ? 2 * m->cap : 1024;
        size_t *o = realloc(m->off, cap * sizeof *o);
        if (o) m->off = o;
        uint32_t *l = realloc(m->len, cap * sizeof *l);
        if (l) m->len = l;
        uint64_t *hh = realloc(m->hash, cap * sizeof *hh);
        if (hh) m->hash = hh;
        int64_t *cc = realloc(m->count, cap * sizeof *cc);
        if (cc) m->count = cc;
        if (!o || !l || !hh || !cc) { m->oom = true; return -1; }
        m->cap = cap;
    }
    if (m->blen + n > m->bcap) {
        size_t cap = m->bcap ? 2 * m->bcap : 1 << 16;
        while (cap < m->blen + n) cap *= 2;
        char *b = realloc(m->buf, cap);
        if (!b) { m->oom = true; return -1; }
        m->buf = b;
        m->bcap = cap;
    }
    memcpy(m->buf + m->blen, p, n);
    uint32_t e = m->n++;
    m->off[e] = m->blen;
    m->len[e] = (uint32_t)n;
    m->hash[e] = h;
    m->count[e] = c;
    m->blen += n;
    m->slot[i] = e + 1;
    if (2u * m->n > m->mask && !sm_rehash(m, 2 * (m->mask + 1))) { m->oom = true; return -1; }
    return e;
}

static int64_t sm_find(const strmap *m, const void *p, size_t n)
{
    if (!m->slot) return -1;
    uint64_t h = hash_str(p, n);
    uint32_t i = (uint32_t)h & m->mask;
    for (;;) {
        uint32_t e = m->slot[i];
        if (!e) return -1;
        e--;
        if (m->hash[e] == h && m->len[e] == n && !memcmp(m->buf + m->off[e], p, n)) return e;
        i = (i + 1) & m->mask;
    }
}

/* ---- input ---------------------------------------------------------- */

typedef struct tfile {
    char *path;
    bool jsonl;
    file_map map;
} tfile;

typedef struct tinput {
    tfile *f;
    int n, cap;
    int64_t bytes;
} tinput;

static bool ends_with(const char *s, const char *suf)
{
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && !strcmp(s + a - b, suf);
}

/* file_walk visitor: maps one input file (binary files inside directories
 * were already skipped by file_walk). */
static kiln_status add_input(kiln_ctx *ctx, void *ud, const char *path, int64_t size)
{
    tinput *in = ud;
    (void)size;
    if (in->n == in->cap) {
        int cap = in->cap ? 2 * in->cap : 64;
        tfile *f = realloc(in->f, (size_t)cap * sizeof *f);
        if (!f) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        in->f = f;
        in->cap = cap;
    }
    tfile *f = &in->f[in->n];
    memset(f, 0, sizeof *f);
    kiln_status s = file_map_open(ctx, path, &f->map);
    if (s) return s;
    f->path = strdup(path);
    f->jsonl = ends_with(path, ".jsonl");
    in->bytes += (int64_t)f->map.size;
    in->n++;
    return KILN_OK;
}

typedef struct tunit {
    const char *p;
    size_t n;
    int file;
    bool jsonl; /* p..p+n holds whole JSONL lines */
} tunit;

/* ---- counting ------------------------------------------------------- */

static void count_text(const kiln_tokenizer *t, pcre2_match_data *md, bool jit,
                       const unsigned char *p, size_t len, strmap *m)
{
    size_t pos = 0;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    while (pos < len) {
        int rc = jit ? pcre2_jit_match(t->re, p, len, pos, 0, md, NULL)
                     : pcre2_match(t->re, p, len, pos, 0, md, NULL);
        if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && jit)
            rc = pcre2_match(t->re, p, len, pos, 0, md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) {
            sm_add(m, p + pos, len - pos, 1, hash_str(p + pos, len - pos));
            return;
        }
        if (rc < 0) { /* a resource limit: count one character */
            size_t b = pos + 1;
            while (b < len && (p[b] & 0xC0) == 0x80) b++;
            sm_add(m, p + pos, b - pos, 1, hash_str(p + pos, b - pos));
            pos = b;
            continue;
        }
        size_t a = ov[0], b = ov[1];
        if (a > pos) sm_add(m, p + pos, a - pos, 1, hash_str(p + pos, a - pos));
        if (b <= a) {
            b = a + 1;
            while (b < len && (p[b] & 0xC0) == 0x80) b++;
        }
        sm_add(m, p + a, b - a, 1, hash_str(p + a, b - a));
        pos = b;
    }
}

static void count_unit(const kiln_tokenizer *t, pcre2_match_data *md, bool jit,
                       const tunit *u, const char *field, strmap *m, int64_t *bad)
{
    if (!u->jsonl) {
        count_text(t, md, jit, (const unsigned char *)u->p, u->n, m);
        return;
    }
    const char *p = u->p, *end = u->p + u->n;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        if (le > p) {
            json_t *v = json_loadb(p, (size_t)(le - p), JSON_ALLOW_NUL, NULL);
            json_t *f = json_object_get(v, field);
            if (json_is_string(f))
                count_text(t, md, jit, (const unsigned char *)json_string_value(f),
                           json_string_length(f), m);
            else {
                bool blank = true;
                for (const char *q = p; q < le; q++)
                    if (*q != ' ' && *q != '\t' && *q != '\r') blank = false;
                if (!blank) (*bad)++;
            }
            json_decref(v);
        }
        p = le + 1;
    }
}

/* ---- merge learning ------------------------------------------------- */

typedef struct wlist {
    int32_t *v;
    uint32_t n, cap;
} wlist;

typedef struct pairs {
    uint64_t *key;   /* (n) */
    int64_t *count;  /* (n) */
    wlist *where;    /* (n) */
    uint32_t n, cap;
    uint32_t *slot;  /* index + 1 */
    uint32_t mask;
    bool oom;
} pairs;

typedef struct hent {
    int64_t count;
    uint64_t key;
} hent;

typedef struct heap {
    hent *v;
    size_t n, cap;
} heap;

static bool hent_before(hent a, hent b) /* a pops first */
{
    return a.count > b.count || (a.count == b.count && a.key < b.key);
}

static bool heap_push(heap *h, hent e)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 4096;
        hent *v = realloc(h->v, cap * sizeof *v);
        if (!v) return false;
        h->v = v;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!hent_before(e, h->v[p])) break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = e;
    return true;
}

static hent heap_pop(heap *h)
{
    hent top = h->v[0], e = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && hent_before(h->v[c + 1], h->v[c])) c++;
        if (!hent_before(h->v[c], e)) break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n) h->v[i] = e;
    return top;
}

static uint32_t pair_hash(uint64_t k)
{
    k *= 0x9E3779B97F4A7C15ull;
    return (uint32_t)(k >> 32);
}

static bool pairs_rehash(pairs *P, uint32_t slots)
{
    uint32_t *s = calloc(slots, sizeof *s);
    if (!s) return false;
    free(P->slot);
    P->slot = s;
    P->mask = slots - 1;
    for (uint32_t e = 0; e < P->n; e++) {
        uint32_t i = pair_hash(P->key[e]) & P->mask;
        while (s[i]) i = (i + 1) & P->mask;
        s[i] = e + 1;
    }
    return true;
}

static int64_t pair_get(pairs *P, uint64_t k, bool create)
{
    uint32_t i = pair_hash(k) & P->mask;
    for (;;) {
        uint32_t e = P->slot[i];
        if (!e) break;
        if (P->key[e - 1] == k) return e - 1;
        i = (i + 1) & P->mask;
    }
    if (!create) return -1;
    if (P->n == P->cap) {
        uint32_t cap = P->cap ? 2 * P->cap : 1 << 16;
        uint64_t *k2 = realloc(P->key, cap * sizeof *k2);
        if (k2) P->key = k2;
        int64_t *c2 = realloc(P->count, cap * sizeof *c2);
        if (c2) P->count = c2;
        wlist *w2 = realloc(P->where, cap * sizeof *w2);
        if (w2) P->where = w2;
        if (!k2 || !c2 || !w2) { P->oom = true; return -1; }
        P->cap = cap;
    }
    uint32_t e = P->n++;
    P->key[e] = k;
    P->count[e] = 0;
    P->where[e] = (wlist){0};
    P->slot[i] = e + 1;
    if (2u * P->n > P->mask && !pairs_rehash(P, 2 * (P->mask + 1))) { P->oom = true; return -1; }
    return e;
}

static void pair_add(pairs *P, int32_t a, int32_t b, int64_t c, int32_t w, uint32_t **touched,
                     uint32_t *nt, uint32_t *tcap)
{
    uint64_t k = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    int64_t e = pair_get(P, k, c > 0);
    if (e < 0) return;
    P->count[e] += c;
    if (c <= 0) return;
    wlist *l = &P->where[e];
    if (!(l->n && l->v[l->n - 1] == w)) {
        if (l->n == l->cap) {
            uint32_t cap = l->cap ? 2 * l->cap : 4;
            int32_t *v = realloc(l->v, cap * sizeof *v);
            if (!v) { P->oom = true; return; }
            l->v = v;
            l->cap = cap;
        }
        l->v[l->n++] = w;
    }
    if (touched) {
        if (*nt == *tcap) {
            uint32_t cap = *tcap ? 2 * *tcap : 1024;
            uint32_t *t = realloc(*touched, cap * sizeof *t);
            if (!t) { P->oom = true; return; }
            *touched = t;
            *tcap = cap;
        }
        (*touched)[(*nt)++] = (uint32_t)e;
    }
}

static void pairs_free(pairs *P)
{
    for (uint32_t e = 0; e < P->n; e++) free(P->where[e].v);
    free(P->key);
    free(P->count);
    free(P->where);
    free(P->slot);
}

/* ---- the trainer ---------------------------------------------------- */

static const char *pattern_for(const char *name)
{
    if (!name || !strcmp(name, "gpt2")) return TOK_PATTERN_HF_GPT2;
    if (!strcmp(name, "llama3") || !strcmp(name, "cl100k")) return TOK_PATTERN_LLAMA3;
    return name;
}

kiln_status kiln_tokenizer_train(kiln_ctx *ctx, const kiln_tokenizer_train_opts *o,
                                 kiln_tokenizer **out, kiln_tokenizer_train_stats *stats)
{
    *out = NULL;
    kiln_tokenizer_train_stats st = {0};
    const char *field = o->field ? o->field : "text";
    static const char *base_specials[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    int n_spec = 3 + (o->n_specials > 0 ? o->n_specials : 0);
    if (o->n_inputs <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_tokenizer_train_opts.inputs: no training text given");
    if (o->vocab_size < 256 + n_spec || o->vocab_size > MAX_VOCAB)
        return kiln_fail(ctx, KILN_ERR_RANGE,
                         "kiln_tokenizer_train_opts.vocab_size = %d must be in %d..%d (256 bytes + %d special "
                         "tokens at least; token ids are stored as 32-bit integers in "
                         "kiln and at most 2^24 are supported)",
                         o->vocab_size, 256 + n_spec, MAX_VOCAB, n_spec);
    for (int i = 0; i < o->n_specials; i++) {
        const char *sp = o->specials[i];
        if (!sp || !*sp)
            return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_tokenizer_train_opts.specials: empty special token");
        for (int j = 0; j < 3; j++)
            if (!strcmp(sp, base_specials[j]))
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                                 "kiln_tokenizer_train_opts.specials: %s is always included; "
                                 "list only extra tokens", sp);
        for (int j = 0; j < i; j++)
            if (!strcmp(sp, o->specials[j]))
                return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_tokenizer_train_opts.specials: %s is given twice", sp);
    }
    int min_freq = o->min_frequency > 0 ? o->min_frequency : 1;
    double t0 = kiln_time_now();

    /* a byte tokenizer carrying the pattern, used for pre-tokenization */
    kiln_tokenizer *pre = tok_new(ctx, 256);
    if (!pre) return KILN_ERR_NOMEM;
    kiln_status s = tok_set_pattern(ctx, pre, pattern_for(o->pattern));
    if (s) {
        kiln_tokenizer_free(pre);
        return kiln_fail(ctx, s, "kiln_tokenizer_train_opts.pattern: %s", kiln_errmsg(ctx));
    }

    tinput in = {0};
    for (int i = 0; i < o->n_inputs && !s; i++)
        s = file_walk(ctx, o->inputs[i], "kiln_tokenizer_train_opts.inputs", add_input, &in);
    if (!s && in.n == 0) s = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "kiln_tokenizer_train_opts.inputs: no text files found");

    /* units of ~1 MB (JSONL: whole lines) */
    tunit *units = NULL;
    size_t nu = 0, ucap = 0;
    int64_t budget = o->max_bytes > 0 ? o->max_bytes : INT64_MAX, taken = 0;
    for (int fi = 0; fi < in.n && !s && taken < budget; fi++) {
        const char *p = (const char *)in.f[fi].map.data;
        size_t size = in.f[fi].map.size, off = 0;
        if ((int64_t)size > budget - taken) size = (size_t)(budget - taken);
        while (off < size) {
            size_t cut = size;
            if (size - off > UNIT_BYTES) {
                if (in.f[fi].jsonl) {
                    const char *nl = memchr(p + off + UNIT_BYTES, '\n', size - off - UNIT_BYTES);
                    cut = nl ? (size_t)(nl - p) + 1 : size;
                } else {
                    cut = off + tok_split_point_pattern(pre->pattern, p + off, size - off,
                                                        UNIT_BYTES);
                }
            }
            if (nu == ucap) {
                ucap = ucap ? 2 * ucap : 256;
                tunit *nu2 = realloc(units, ucap * sizeof *nu2);
                if (!nu2) { s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory"); break; }
                units = nu2;
            }
            units[nu++] = (tunit){p + off, cut - off, fi, in.f[fi].jsonl};
            off = cut;
        }
        taken += (int64_t)size;
    }
    st.bytes = taken;

    /* phase 1: count pre-tokens on all threads */
    int nt = o->threads > 0 ? o->threads : omp_get_num_procs();
    if (nt < 1) nt = 1;
    strmap *maps = s ? NULL : calloc((size_t)nt, sizeof *maps);
    if (!s && !maps) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    int64_t bad = 0, done = 0;
    double last = 0;
    if (!s) {
        json_object_seed(0);
#pragma omp parallel num_threads(nt) reduction(+ : bad)
        {
            int tid = omp_get_thread_num();
            pcre2_match_data *md = pcre2_match_data_create_from_pattern(pre->re, NULL);
            size_t jsz = 0;
            bool jit = pcre2_pattern_info(pre->re, PCRE2_INFO_JITSIZE, &jsz) == 0 && jsz > 0;
#pragma omp for schedule(dynamic, 1)
            for (size_t i = 0; i < nu; i++) {
                if (!md) continue;
                count_unit(pre, md, jit, &units[i], field, &maps[tid], &bad);
#pragma omp atomic
                done += (int64_t)units[i].n;
                if (tid == 0 && o->progress) {
                    double now = kiln_time_now();
                    if (now - last > 0.5) {
                        last = now;
                        int64_t d;
#pragma omp atomic read
                        d = done;
                        o->progress(o->progress_ud, "count", d, st.bytes);
                    }
                }
            }
            if (md) pcre2_match_data_free(md);
            else maps[tid].oom = true;
        }
        if (o->progress) o->progress(o->progress_ud, "count", st.bytes, st.bytes);
        for (int i = 0; i < nt; i++)
            if (maps[i].oom) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory counting pre-tokens");
    }
    if (bad)
        kiln_log(ctx, KILN_LOG_WARN,
                 "tokenizer train: %lld JSONL lines without a string \"%s\" field were skipped",
                 (long long)bad, field);
    /* sum the per-thread tables into maps[0] */
    for (int i = 1; i < nt && !s; i++) {
        for (uint32_t e = 0; e < maps[i].n; e++)
            sm_add(&maps[0], maps[i].buf + maps[i].off[e], maps[i].len[e], maps[i].count[e],
                   maps[i].hash[e]);
        sm_free(&maps[i]);
        if (maps[0].oom) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory counting pre-tokens");
    }
    for (int i = 0; i < in.n; i++) {
        file_map_close(&in.f[i].map);
        free(in.f[i].path);
    }
    free(in.f);
    free(units);
    st.count_seconds = kiln_time_now() - t0;

    /* phase 2: words and merges */
    strmap *W = maps ? &maps[0] : NULL;
    uint32_t nw = W ? W->n : 0;
    st.unique_pretokens = nw;
    int64_t *wstart = NULL;
    int32_t *wlen = NULL, *sym = NULL;
    uint32_t *wmark = NULL, *touched = NULL, ntouch = 0, tcap = 0;
    pairs P = {0};
    heap H = {0};
    strmap V = {0}; /* token bytes -> id */
    int32_t *mleft = NULL, *mright = NULL;
    int n_merges = 0;
    int32_t n_tokens = 256;
    size_t *tok_off = NULL; /* token bytes live in V.buf; id -> V entry */
    int target_tokens = o->vocab_size - n_spec;
    double t1 = kiln_time_now();
    if (!s) {
        wstart = malloc(((size_t)nw + 1) * sizeof *wstart);
        wlen = malloc(((size_t)nw + 1) * sizeof *wlen);
        wmark = calloc((size_t)nw + 1, sizeof *wmark);
        sym = malloc((W->blen + 1) * sizeof *sym);
        mleft = malloc((size_t)target_tokens * sizeof *mleft);
        mright = malloc((size_t)target_tokens * sizeof *mright);
        tok_off = malloc((size_t)target_tokens * sizeof *tok_off);
        if (!wstart || !wlen || !wmark || !sym || !mleft || !mright || !tok_off ||
            !pairs_rehash(&P, 1 << 17))
            s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    if (!s) {
        int64_t k = 0;
        for (uint32_t w = 0; w < nw; w++) {
            wstart[w] = k;
            wlen[w] = (int32_t)W->len[w];
            const unsigned char *p = (const unsigned char *)W->buf + W->off[w];
            for (uint32_t i = 0; i < W->len[w]; i++) sym[k++] = p[i];
            st.pretokens += W->count[w];
        }
        for (int b = 0; b < 256; b++) {
            unsigned char c = (unsigned char)b;
            int64_t e = sm_add(&V, &c, 1, b, hash_str(&c, 1));
            tok_off[b] = (size_t)e;
        }
        for (uint32_t w = 0; w < nw && !P.oom; w++)
            for (int32_t i = 0; i + 1 < wlen[w]; i++)
                pair_add(&P, sym[wstart[w] + i], sym[wstart[w] + i + 1], W->count[w],
                         (int32_t)w, NULL, NULL, NULL);
        for (uint32_t e = 0; e < P.n && !P.oom; e++)
            if (!heap_push(&H, (hent){P.count[e], P.key[e]})) P.oom = true;
        if (P.oom || V.oom) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    char *cat = NULL;
    size_t catcap = 0;
    double lastp = 0;
    while (!s && n_tokens < target_tokens && H.n > 0) {
        hent top = heap_pop(&H);
        int64_t e = pair_get(&P, top.key, false);
        if (e < 0) continue;
        if (P.count[e] != top.count) {
            if (P.count[e] > 0 && !heap_push(&H, (hent){P.count[e], top.key})) P.oom = true;
            if (P.oom) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            continue;
        }
        if (top.count < min_freq) break;
        int32_t a = (int32_t)(top.key >> 32), b = (int32_t)(uint32_t)top.key;
        /* the new token's bytes; reuse the id when they already name one */
        size_t la = V.len[tok_off[a]], lb = V.len[tok_off[b]];
        if (la + lb > catcap) {
            catcap = 2 * (la + lb);
            char *c2 = realloc(cat, catcap);
            if (!c2) { s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory"); break; }
            cat = c2;
        }
        memcpy(cat, V.buf + V.off[tok_off[a]], la);
        memcpy(cat + la, V.buf + V.off[tok_off[b]], lb);
        int64_t ve = sm_find(&V, cat, la + lb);
        int32_t nid;
        if (ve >= 0) {
            nid = (int32_t)V.count[ve];
        } else {
            nid = n_tokens++;
            ve = sm_add(&V, cat, la + lb, nid, hash_str(cat, la + lb));
            if (ve < 0) { s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory"); break; }
            tok_off[nid] = (size_t)ve;
        }
        mleft[n_merges] = a;
        mright[n_merges] = b;
        n_merges++;
        /* apply to every word holding the pair */
        ntouch = 0;
        uint32_t mark = (uint32_t)n_merges;
        int32_t *wl = P.where[e].v;
        uint32_t wn = P.where[e].n;
        for (uint32_t j = 0; j < wn; j++) {
            int32_t w = wl[j];
            if (wmark[w] == mark) continue;
            wmark[w] = mark;
            int32_t *x = sym + wstart[w];
            int32_t n = wlen[w];
            int64_t c = W->count[w];
            for (int32_t i = 0; i + 1 < n; i++) {
                if (x[i] != a || x[i + 1] != b) continue;
                if (i > 0) {
                    pair_add(&P, x[i - 1], a, -c, w, NULL, NULL, NULL);
                    pair_add(&P, x[i - 1], nid, c, w, &touched, &ntouch, &tcap);
                }
                if (i + 2 < n) {
                    pair_add(&P, b, x[i + 2], -c, w, NULL, NULL, NULL);
                    pair_add(&P, nid, x[i + 2], c, w, &touched, &ntouch, &tcap);
                }
                x[i] = nid;
                memmove(x + i + 1, x + i + 2, (size_t)(n - i - 2) * sizeof *x);
                n--;
            }
            wlen[w] = n;
        }
        P.count[e] = 0;
        free(P.where[e].v);
        P.where[e] = (wlist){0};
        for (uint32_t j = 0; j < ntouch && !P.oom; j++) {
            uint32_t t = touched[j];
            if (P.count[t] > 0 && !heap_push(&H, (hent){P.count[t], P.key[t]})) P.oom = true;
        }
        if (P.oom) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        if (o->progress) {
            double now = kiln_time_now();
            if (now - lastp > 0.5) {
                lastp = now;
                o->progress(o->progress_ud, "merge", n_tokens - 256, target_tokens - 256);
            }
        }
    }
    if (!s && o->progress) o->progress(o->progress_ud, "merge", target_tokens - 256, target_tokens - 256);
    free(cat);
    st.merges = n_merges;
    st.merge_seconds = kiln_time_now() - t1;

    /* build the tokenizer */
    kiln_tokenizer *t = NULL;
    if (!s) {
        t = tok_new(ctx, n_tokens + n_spec);
        if (!t) s = KILN_ERR_NOMEM;
    }
    for (int32_t id = 0; id < n_tokens && !s; id++)
        s = tok_set(ctx, t, id, V.buf + V.off[tok_off[id]], V.len[tok_off[id]], 0);
    for (int i = 0; i < n_spec && !s; i++) {
        const char *sp = i < 3 ? base_specials[i] : o->specials[i - 3];
        s = tok_set(ctx, t, n_tokens + i, sp, strlen(sp), TOKF_SPECIAL);
    }
    if (!s) {
        t->eot = n_tokens;
        t->name = strdup("trained");
        const char *pat = pattern_for(o->pattern);
        t->pre = !strcmp(pat, TOK_PATTERN_HF_GPT2) ? TOK_PRE_BYTELEVEL : TOK_PRE_SPLIT;
        s = tok_set_pattern(ctx, t, pat);
    }
    if (!s) s = tok_finish_vocab(ctx, t, "trained tokenizer");
    if (!s) {
        s = tok_set_merges(ctx, t, n_merges, mleft, mright, "trained tokenizer");
        mleft = mright = NULL;
    }
    free(mleft);
    free(mright);
    free(tok_off);
    free(wstart);
    free(wlen);
    free(wmark);
    free(sym);
    free(touched);
    free(H.v);
    pairs_free(&P);
    sm_free(&V);
    if (maps) {
        for (int i = 0; i < nt; i++) sm_free(&maps[i]);
        free(maps);
    }
    kiln_tokenizer_free(pre);
    if (stats) *stats = st;
    if (s) {
        kiln_tokenizer_free(t);
        return s;
    }
    *out = t;
    return KILN_OK;
}
